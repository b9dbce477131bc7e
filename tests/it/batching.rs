//! Zendesk batching against the simulated CRM's `create_many`, `update_many` and job statuses:
//! a backlog drains in a handful of calls, each write mapped to its own ticket or error.

use std::collections::HashMap;
use std::time::Duration;

use crm_quota_proxy::sim::SimConfig;
use http::{Method, StatusCode};
use serde_json::Value;

use crate::support::*;

/// A Zendesk-dialect config: `limit` calls per 2 s, creates and updates parked at once
/// (`max_wait`) and batched, job polls as other reads.
fn config(limit: u32, max_wait: &str) -> String {
    format!(
        "upstream: {{ url: \"{{upstream}}\", crm: zendesk }}\n\
         queue: {{ max_entries: 5000 }}\n\
         quotas:\n  - {{ name: calls, limit: {limit}, window: 2s, margin: 0s }}\n\
         routes:\n\
         \x20 - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: {max_wait}, idempotency_key: true, batch: {{ max_size: 100, max_linger: 200ms }} }}\n\
         \x20 - {{ name: ticket-update, methods: [PUT], path: \"/api/v2/tickets/{{id}}.json\", on_limit: queue, max_wait: {max_wait}, batch: {{ max_size: 100, max_linger: 200ms }} }}\n\
         \x20 - {{ name: other-reads, methods: [GET], path: /api/v2/**, on_limit: wait, max_wait: 1s }}\n"
    )
}

fn sim(limit: u32) -> SimConfig {
    SimConfig {
        job_delay: Duration::from_millis(300),
        ..SimConfig::new(limit, Duration::from_secs(2))
    }
}

/// Waits until nothing is queued or being sent (jobs included).
async fn until_drained(h: &Harness, limit: Duration) {
    eventually("the backlog to drain", limit, || async {
        let s = h.admin_get("/status").await.json();
        (s["queue"]["queued"] == 0 && s["queue"]["dispatching"] == 0).then_some(())
    })
    .await
}

/// Sends one create per subject through the proxy from 32 concurrent clients; the answers.
async fn create_all(h: &Harness, subjects: &[String]) -> Vec<(String, Reply)> {
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let subjects = std::sync::Arc::new(subjects.to_vec());
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (url, client, subjects, answers, next) = (
                h.url.clone(),
                h.client.clone(),
                subjects.clone(),
                answers.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(subject) = subjects.get(i) else {
                        return;
                    };
                    let r = send(
                        &client,
                        Method::POST,
                        &format!("{url}/api/v2/tickets.json"),
                        &[
                            ("authorization", TOKEN),
                            ("content-type", "application/json"),
                        ],
                        ticket_body(subject),
                    )
                    .await;
                    answers.lock().unwrap().push((subject.clone(), r));
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    std::mem::take(&mut *answers.lock().unwrap())
}

/// The real Zendesk client library, zenpy, creating tickets over budget gets its tickets (with
/// ids), not the string "queued" it makes of a 202. Needs a Python with zenpy
/// (`python3 -m pip install zenpy`, or `CRM_PROXY_TEST_PYTHON` naming one; `.ci/run` makes one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zenpy_creating_over_budget_gets_tickets_with_ids() {
    let python = std::env::var("CRM_PROXY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_zenpy = std::process::Command::new(&python)
        .args(["-c", "import zenpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_zenpy,
        "this test drives the real zenpy client, and {python} cannot import it: install it \
         (`python3 -m pip install zenpy`) or set CRM_PROXY_TEST_PYTHON to a Python that has it"
    );
    let h = Harness::start(sim(100), &config(2, "20s")).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/zenpy_creates.py"
    );
    let addr = h.url.trim_start_matches("http://").to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args([script, &addr, "6"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let got: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 6, "{stdout}");
    for (i, g) in got.iter().enumerate() {
        assert!(g["id"].is_u64(), "create {i} returned no ticket: {g}");
        assert_eq!(g["subject"], format!("zenpy-{i}"), "{g}");
    }
    assert_each_ticket_once(&h.sim, 6);
    assert!(h.sim.stats().batch_calls >= 1, "some rode a batch");
    h.stop().await;
}

/// An upstream without Zendesk's batch endpoints (a stub, another CRM behind a zendesk config):
/// the first batch call's 404 turns batching off, and every write goes on its own instead of
/// becoming a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_without_batch_endpoints_gets_single_calls_and_no_dead_letters() {
    let sim = SimConfig {
        batch_endpoints: false,
        ..sim(100)
    };
    let h = Harness::start(sim, &config(2, "0s")).await;
    let subjects: Vec<String> = (0..12).map(|i| format!("s-{i:02}")).collect();
    let answers = create_all(&h, &subjects).await;
    until_drained(&h, Duration::from_secs(30)).await;
    for (subject, r) in &answers {
        if r.status == StatusCode::ACCEPTED {
            let id = r.json()["id"].as_str().unwrap().to_string();
            let v = h.status_of(&id).await.json();
            assert_eq!(v["status"], "done", "{subject}: {v}");
        }
    }
    assert_each_ticket_once(&h.sim, 12);
    let status = h.admin_get("/status").await.json();
    assert_eq!(status["queue"]["failed"], 0, "{status}");
    assert_eq!(
        h.metric("crm_proxy_batch_failures_total{kind=\"batch\",route=\"ticket-create\"}")
            .await,
        1.0,
        "one batch call found out, the rest went alone"
    );
    h.stop().await;
}

/// The README's batching measurement: the same backlog of 1,000 creates drained with and
/// without batching (the latter takes about a minute, so it runs on request:
/// `cargo test --release --test it batching_measurement -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for the README; about a minute"]
async fn batching_measurement() {
    let subjects: Vec<String> = (0..1000).map(|i| format!("m-{i:04}")).collect();
    for batch in [true, false] {
        let mut cfg = config(40, "0s");
        if !batch {
            cfg = cfg.replace(", batch: { max_size: 100, max_linger: 200ms }", "");
        }
        let h = Harness::start(sim(40), &cfg).await;
        let answers = create_all(&h, &subjects).await;
        let started = tokio::time::Instant::now();
        until_drained(&h, Duration::from_secs(120)).await;
        let drain = started.elapsed();
        let created = answers
            .iter()
            .filter(|(_, r)| r.status == StatusCode::CREATED)
            .count();
        let stats = h.sim.stats();
        assert_eq!(h.sim.tickets().len(), subjects.len(), "each ticket once");
        assert_eq!(stats.throttled, 0);
        eprintln!(
            "batching {}: {created} live, {} parked; the backlog took {} calls ({} batch, {} polls), drained in {drain:.1?}",
            if batch { "on" } else { "off" },
            subjects.len() - created,
            stats.calls - created as u64,
            stats.batch_calls,
            stats.job_polls,
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_1000_creates_drains_in_about_ten_batch_calls() {
    let mut sim = sim(40);
    sim.fail_jobs = vec![3]; // one whole job fails: its writes are sent again
    let h = Harness::start(sim, &config(40, "0s")).await;
    let subjects: Vec<String> = (0..1000)
        .map(|i| {
            if i % 50 == 49 {
                format!("t-{i:04}-reject")
            } else {
                format!("t-{i:04}")
            }
        })
        .collect();
    let sending = tokio::time::Instant::now();
    let answers = create_all(&h, &subjects).await;
    let sent_in = sending.elapsed();
    let started = tokio::time::Instant::now();
    until_drained(&h, Duration::from_secs(60)).await;
    let drain = started.elapsed();

    let tickets: HashMap<u64, String> = h
        .sim
        .tickets()
        .into_iter()
        .map(|t| (t.id, t.subject))
        .collect();
    let mut per_subject: HashMap<&str, usize> = HashMap::new();
    for s in tickets.values() {
        *per_subject.entry(s).or_default() += 1;
    }
    let (mut created, mut parked, mut rejected) = (0, 0, 0);
    for (subject, r) in &answers {
        match r.status {
            StatusCode::CREATED => created += 1,
            StatusCode::ACCEPTED => {
                parked += 1;
                let id = r.json()["id"].as_str().unwrap().to_string();
                let v = h.status_of(&id).await.json();
                if subject.ends_with("reject") {
                    rejected += 1;
                    assert_eq!(
                        (v["status"].as_str(), v["reason"].as_str()),
                        (Some("failed"), Some("rejected")),
                        "{v}"
                    );
                    assert!(
                        v["error"].as_str().unwrap().contains("TicketCreateFailed"),
                        "{v}"
                    );
                    continue;
                }
                assert_eq!(v["status"], "done", "{subject}: {v}");
                // The stored answer names the ticket this very write created.
                let resp = h
                    .call(Method::GET, &format!("/_proxy/requests/{id}/response"), "")
                    .await;
                assert_eq!(resp.status, StatusCode::CREATED);
                let ticket = resp.json()["ticket"]["id"].as_u64().unwrap();
                assert_eq!(
                    tickets.get(&ticket).map(String::as_str),
                    Some(subject.as_str())
                );
                assert_eq!(
                    resp.header("location"),
                    format!("/api/v2/tickets/{ticket}.json")
                );
            }
            other => panic!("{subject}: unexpected {other}"),
        }
        let expected = usize::from(!subject.ends_with("reject") || r.status == StatusCode::CREATED);
        assert_eq!(
            per_subject.get(subject.as_str()).copied().unwrap_or(0),
            expected,
            "{subject}"
        );
    }
    // Live creates had only the windows the sending spanned (40 per 2 s); the rest parked.
    let windows = (sent_in.as_secs_f64() / 2.0).ceil() as usize + 1;
    assert_eq!(created + parked, subjects.len());
    assert!(
        created <= 40 * windows,
        "{created} live in {sent_in:?}: more than {windows} windows allow"
    );
    let stats = h.sim.stats();
    let spent = stats.calls - created as u64;
    eprintln!(
        "1,000 creates: {created} live, {parked} parked ({rejected} rejected items); the backlog took {spent} calls ({} batch calls, {} job polls) and drained in {drain:?}",
        stats.batch_calls, stats.job_polls
    );
    assert_eq!(stats.throttled, 0, "no CRM 429");
    assert!(
        spent * 20 <= parked as u64,
        "{spent} calls for {parked} parked writes: more than 5% of one-by-one"
    );
    assert!(h.metric("crm_proxy_job_polls_total").await >= 1.0);
    assert_eq!(
        h.metric("crm_proxy_batch_failures_total{kind=\"job\",route=\"ticket-create\"}")
            .await,
        1.0
    );
    assert_eq!(
        h.metric("crm_proxy_batch_failures_total{kind=\"item\",route=\"ticket-create\"}")
            .await,
        rejected as f64
    );
    assert!(
        h.metric("crm_proxy_batch_calls_saved_total{route=\"ticket-create\"}")
            .await
            >= 800.0
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_of_different_tickets_share_calls_and_each_tickets_keep_their_order() {
    let h = Harness::start(sim(100), &config(8, "0s")).await;
    // Five tickets while the budget allows, then spend the rest of the window.
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = h.create(&format!("base-{i}")).await;
        assert_eq!(r.status, StatusCode::CREATED);
        ids.push(r.json()["ticket"]["id"].as_u64().unwrap());
    }
    ids.push(999_999); // no such ticket: its item is refused
    let mut parked = Vec::new();
    for round in 0..3 {
        for id in &ids {
            let body = format!(r#"{{"ticket":{{"comment":{{"body":"u{round}"}}}}}}"#);
            let r = h
                .call(Method::PUT, &format!("/api/v2/tickets/{id}.json"), body)
                .await;
            if r.status == StatusCode::ACCEPTED {
                parked.push((*id, r.json()["id"].as_str().unwrap().to_string()));
            } else {
                assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            }
        }
    }
    assert!(parked.len() >= 12, "{} parked", parked.len());
    until_drained(&h, Duration::from_secs(30)).await;
    for t in h.sim.tickets() {
        let seen: Vec<&str> = t
            .updates
            .iter()
            .map(|u| u["ticket"]["comment"]["body"].as_str().unwrap())
            .collect();
        assert_eq!(seen, ["u0", "u1", "u2"], "ticket {} updates in order", t.id);
    }
    for (ticket, id) in &parked {
        let v = h.status_of(id).await.json();
        if *ticket == 999_999 {
            assert_eq!(
                (v["status"].as_str(), v["reason"].as_str()),
                (Some("failed"), Some("rejected")),
                "{v}"
            );
        } else {
            assert_eq!(v["status"], "done", "{v}");
        }
    }
    let stats = h.sim.stats();
    assert!(
        stats.batch_calls >= 3,
        "one ticket's updates never share a call: {stats:?}"
    );
    assert!(stats.batch_calls < parked.len() as u64, "{stats:?}");
    assert_eq!(
        h.metric("crm_proxy_batch_failures_total{kind=\"batch\",route=\"ticket-update\"}")
            .await,
        0.0,
        "no batch named one ticket twice (the simulator refuses that)"
    );
    h.stop().await;
}

/// Clients still waiting ride in the backlog's batch and get what a single create answers:
/// `201`, `Location` and the ticket itself, read back once for the whole batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_waiting_rides_in_the_batch_and_gets_its_ticket() {
    let h = Harness::start(sim(100), &config(2, "10s")).await;
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let (url, client) = (h.url.clone(), h.client.clone());
            tokio::spawn(async move {
                let r = send(
                    &client,
                    Method::POST,
                    &format!("{url}/api/v2/tickets.json"),
                    &[
                        ("authorization", TOKEN),
                        ("content-type", "application/json"),
                    ],
                    ticket_body(&format!("live-{i}")),
                )
                .await;
                (i, r)
            })
        })
        .collect();
    for c in calls {
        let (i, r) = c.await.unwrap();
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let v: Value = r.json();
        let id = v["ticket"]["id"].as_u64().expect("the ticket's id");
        assert_eq!(
            v["ticket"]["subject"],
            format!("live-{i}"),
            "the ticket itself"
        );
        assert_eq!(r.header("location"), format!("/api/v2/tickets/{id}.json"));
    }
    assert_each_ticket_once(&h.sim, 6);
    let stats = h.sim.stats();
    assert_eq!(
        stats.batch_calls, 1,
        "those that waited shared one call: {stats:?}"
    );
    assert_eq!(
        stats.ticket_reads, 1,
        "read back once for the batch: {stats:?}"
    );
    // The reads' reserve holds one of the two slots: one went at once, five rode the batch.
    let route = "route=\"ticket-create\"";
    let batched = h
        .metric(&format!(
            "crm_proxy_requests_total{{outcome=\"batched\",{route}}}"
        ))
        .await;
    let live = h
        .metric(&format!(
            "crm_proxy_requests_total{{outcome=\"forwarded\",{route}}}"
        ))
        .await;
    assert_eq!((live, batched), (1.0, 5.0));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_open_jobs_holds_only_the_batches_and_loses_nothing() {
    // The CRM takes one job at a time (other apps hold the rest of Zendesk's 30), the proxy
    // would keep ten open: the CRM answers `TooManyJobs` until the open one finishes.
    // Another app keeps a job of its own open most of the time.
    let mut sim = sim(40);
    sim.max_jobs = 1;
    sim.job_delay = Duration::from_millis(800);
    let h = Harness::start(
        sim,
        &config(30, "0s").replace("max_size: 100", "max_size: 20"),
    )
    .await;
    let other_app = {
        let (url, client) = (h.sim.url(), h.client.clone());
        tokio::spawn(async move {
            for i in 0.. {
                let body = format!(r#"{{"tickets":[{{"subject":"other-{i}"}}]}}"#);
                send(
                    &client,
                    Method::POST,
                    &format!("{url}/api/v2/tickets/create_many.json"),
                    &[("content-type", "application/json")],
                    body,
                )
                .await;
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
        })
    };
    let subjects: Vec<String> = (0..200).map(|i| format!("j-{i:03}")).collect();
    let answers = create_all(&h, &subjects).await;
    let series = "crm_proxy_throttled_total{reason=\"too_many_jobs\",route=\"ticket-create\"}";
    eventually(
        "the CRM to refuse a batch for its open jobs",
        Duration::from_secs(30),
        || async {
            let text = String::from_utf8(h.admin_get("/metrics").await.body.to_vec()).unwrap();
            metric_value(&text, series).filter(|n| *n >= 1.0)
        },
    )
    .await;
    other_app.abort();
    until_drained(&h, Duration::from_secs(60)).await;

    let mut per_subject: HashMap<String, usize> = HashMap::new();
    for t in h
        .sim
        .tickets()
        .into_iter()
        .filter(|t| t.subject.starts_with("j-"))
    {
        *per_subject.entry(t.subject).or_default() += 1;
    }
    let mut parked = 0;
    for (subject, r) in &answers {
        if r.status == StatusCode::ACCEPTED {
            parked += 1;
            let id = r.json()["id"].as_str().unwrap().to_string();
            assert_eq!(h.status_of(&id).await.json()["status"], "done");
        } else {
            assert_eq!(r.status, StatusCode::CREATED);
        }
        assert_eq!(per_subject.get(subject), Some(&1), "{subject} exactly once");
    }
    assert!(parked >= 100, "{parked} parked");
    assert_eq!(
        h.metric("crm_proxy_quota_frozen_seconds_total{quota=\"calls\"}")
            .await,
        0.0,
        "a limit on jobs never pauses the call quota"
    );
    h.stop().await;
}
