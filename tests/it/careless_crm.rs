//! A CRM that answers carelessly (a `Retry-After` decades ahead, `Retry-After: 0` on every
//! throttle, reset headers years out) can pause a quota at most its window or
//! `upstream.max_pause`, cannot make a hot loop, and an operator can lift a pause at once.

use std::time::Duration;

use crm_quota_proxy::sim::{Fault, SimConfig};
use http::{Method, StatusCode};

use crate::support::*;

fn roomy() -> SimConfig {
    SimConfig::new(10_000, Duration::from_secs(60))
}

const READS: &str = "upstream: { url: \"{upstream}\", crm: zendesk }\n\
     quotas:\n  - { name: minute, limit: 100, window: 2s, sync: account }\n\
     routes:\n  - { name: search, methods: [GET], path: /api/v2/search.json, on_limit: reject }\n";

fn frozen_until(status: &serde_json::Value) -> Option<String> {
    status["quotas"][0]["frozen_until"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_decades_ahead_pauses_a_quota_at_most_its_window() {
    let h = Harness::start(roomy(), READS).await;
    h.sim.inject([Fault::Answer(
        429,
        vec![("retry-after", "Fri, 31 Dec 2100 23:59:59 GMT".into())],
    )]);
    let r = h.call(Method::GET, "/api/v2/search.json?query=a", "").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "the CRM's answer");
    let r = h.call(Method::GET, "/api/v2/search.json?query=a", "").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "paused");
    let wait: u64 = r.header("retry-after").parse().unwrap();
    assert!(wait <= 2, "the client is told at most one window: {wait}");
    assert_eq!(
        h.metric("crm_proxy_pauses_capped_total{quota=\"minute\"}")
            .await,
        1.0
    );
    // After the window the quota serves again.
    eventually("the pause to end", Duration::from_secs(10), || async {
        let r = h.call(Method::GET, "/api/v2/search.json?query=a", "").await;
        (r.status == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_years_ahead_holds_a_ceiling_at_most_one_window() {
    let h = Harness::start(roomy(), READS).await;
    h.sim.inject([Fault::Answer(
        200,
        vec![
            ("x-rate-limit", "100".into()),
            ("x-rate-limit-remaining", "0".into()),
            ("ratelimit-reset", "999999999".into()),
        ],
    )]);
    let r = h.call(Method::GET, "/api/v2/search.json?query=a", "").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = h.call(Method::GET, "/api/v2/search.json?query=a", "").await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "none left, says the CRM"
    );
    let wait: u64 = r.header("retry-after").parse().unwrap();
    assert!(wait <= 2, "{wait}");
    eventually("the ceiling to lapse", Duration::from_secs(10), || async {
        let r = h.call(Method::GET, "/api/v2/search.json?query=a", "").await;
        (r.status == StatusCode::OK).then_some(())
    })
    .await;
    assert!(
        h.metric("crm_proxy_pauses_capped_total{quota=\"minute\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_zero_on_every_throttle_costs_a_few_calls_not_a_hot_loop() {
    let h = Harness::start(
        roomy(),
        "upstream: { url: \"{upstream}\", min_pause: 1s }\n\
         quotas:\n  - { name: minute, limit: 100, window: 1m }\n\
         routes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }\n",
    )
    .await;
    h.sim
        .inject((0..1_000).map(|_| Fault::Answer(429, vec![("retry-after", "0".into())])));
    let r = h.create("looped").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    // Pauses of 1, 2, 4, 8 s...: in 4 s at most the first call and two or three retries.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = h.sim.stats().calls;
    assert!((2..=4).contains(&calls), "{calls} CRM calls in 4 s");
    assert_eq!(
        h.status_of(&id).await.json()["status"],
        "queued",
        "kept, not failed"
    );
    // The CRM is right again and the operator lifts the pause: delivered at once, not after
    // the next (8 s) pause.
    h.sim.clear_faults();
    let lift = h.admin_post("/quotas/minute/resume").await;
    assert_eq!(lift.json()["was_paused"], true);
    h.until_status(&id, "done", Duration::from_secs(3)).await;
    assert_each_ticket_once(&h.sim, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lifts_a_pause_at_once() {
    let h = Harness::start(roomy(), READS).await;
    h.sim
        .inject([Fault::Answer(429, vec![("retry-after", "30".into())])]);
    let r = h.call(Method::GET, "/api/v2/search.json?query=a", "").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let status = h.admin_get("/status").await.json();
    assert!(frozen_until(&status).is_some(), "{status}");
    let lift = h.admin_post("/quotas/minute/resume").await;
    assert_eq!(lift.status, StatusCode::OK);
    assert_eq!(lift.json()["was_paused"], true);
    let r = h.call(Method::GET, "/api/v2/search.json?query=a", "").await;
    assert_eq!(r.status, StatusCode::OK, "sent at once");
    let status = h.admin_get("/status").await.json();
    assert_eq!(frozen_until(&status), None);
    let unknown = h.admin_post("/quotas/nope/resume").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

/// A backlog meets a CRM outage of `fault`: nothing becomes a dead letter, every write arrives
/// once, and the drain resumes within a second of the CRM answering again, plus `held`: how long
/// a probe sent into the outage's last moment can hold the next (a hanging CRM keeps a probe
/// until `request_timeout`).
async fn outage_costs_no_dead_letters(
    fault: Fault,
    request_timeout: &str,
    max_in_flight: u32,
    held: Duration,
) {
    let h = Harness::start(
        roomy(),
        &format!(
            "upstream: {{ url: \"{{upstream}}\", request_timeout: {request_timeout} }}\n\
             queue: {{ max_attempts: 2, backoff_initial: 50ms, backoff_max: 100ms, max_in_flight: {max_in_flight} }}\n\
             quotas:\n  - {{ name: second, limit: 10, window: 1s }}\n\
             routes:\n  - {{ name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s, idempotency_key: true }}\n"
        ),
    )
    .await;
    let outage = Duration::from_secs(5);
    let mut parked = Vec::new();
    for i in 0..30 {
        let r = h.create(&format!("o-{i:02}")).await;
        assert!(r.status.is_success(), "{:?}", r.body);
        if r.status == StatusCode::ACCEPTED {
            parked.push(r.json()["id"].as_str().unwrap().to_string());
        }
        if i == 12 {
            h.sim.outage(outage, fault.clone());
        }
    }
    let ended = std::time::SystemTime::now() + outage;
    for id in &parked {
        h.until_status(id, "done", Duration::from_secs(60)).await;
    }
    assert_each_ticket_once(&h.sim, 30);
    let status = h.admin_get("/status").await.json();
    assert_eq!(status["queue"]["failed"], 0, "{status}");
    assert_eq!(status["breaker"]["open"], false);
    // The first write the CRM took after the outage, within a second of its end.
    let ended_ns = ended
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let first_after = h
        .sim
        .accepted_times()
        .into_iter()
        .filter(|&t| t >= ended_ns)
        .min()
        .unwrap();
    let resumed_ms = (first_after - ended_ns) / 1_000_000;
    let bound = 1_100 + held.as_millis() as u64;
    assert!(
        resumed_ms <= bound,
        "resumed {resumed_ms} ms after the CRM came back (bound {bound} ms)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_503s_costs_no_dead_letters() {
    outage_costs_no_dead_letters(Fault::Status(503), "1s", 8, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_reset_connections_costs_no_dead_letters() {
    outage_costs_no_dead_letters(Fault::Reset, "1s", 8, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_hanging_connections_costs_no_dead_letters() {
    // Calls hung in the silent CRM hold both in-flight slots for longer than the drain may
    // take to resume: the probe goes past them.
    // A probe sent just before the CRM answers again hangs until its timeout (2.5 s).
    outage_costs_no_dead_letters(
        Fault::Delay(Duration::from_secs(60)),
        "2500ms",
        2,
        Duration::from_millis(2_500),
    )
    .await;
}

/// A CRM nobody answers for (connections refused): no write reached it, so no quota is spent
/// and no attempt is counted; the breaker says so on `/status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_spend_neither_quota_nor_attempts() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let h = Harness::start(
        roomy(),
        &format!(
            "upstream: {{ url: \"http://{dead}\" }}\n\
             queue: {{ max_attempts: 2, backoff_initial: 50ms, backoff_max: 100ms }}\n\
             quotas:\n  - {{ name: minute, limit: 20, window: 1m }}\n\
             routes:\n  - {{ name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n"
        ),
    )
    .await;
    let mut parked = Vec::new();
    for i in 0..5 {
        let r = h.create(&format!("r-{i}")).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        parked.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let status = eventually("the breaker to open", Duration::from_secs(5), || async {
        let s = h.admin_get("/status").await.json();
        (s["breaker"]["open"] == true).then_some(s)
    })
    .await;
    // Probes go and fail; none of their slots stays spent (a probe caught in flight holds
    // one, so the check is for a moment with none out).
    let failures = status["breaker"]["failures_in_a_row"].as_u64().unwrap();
    let status2 = eventually(
        "probes that gave their slots back",
        Duration::from_secs(5),
        || async {
            let s = h.admin_get("/status").await.json();
            let probed = s["breaker"]["failures_in_a_row"].as_u64().unwrap() >= failures + 3;
            let unspent = s["quotas"][0]["used"] == 0 && s["clients"][0]["quotas"][0]["used"] == 0;
            (probed && unspent).then_some(s)
        },
    )
    .await;
    assert_eq!(status2["breaker"]["open"], true, "{status2}");
    assert_eq!(status2["queue"]["failed"], 0, "{status2}");
    assert!(status["breaker"]["open_since"].is_string(), "{status}");
    for id in &parked {
        let w = h.status_of(id).await.json();
        assert_eq!(w["status"], "queued", "{w}");
    }
}

/// Dead letters are retried or discarded by filter: a dry run counts first, `confirm` must
/// match that count, a typo in a name is an error, and only the selected ones move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_retried_and_discarded_in_bulk_by_filter() {
    let h = Harness::start(
        roomy(),
        "upstream: { url: \"{upstream}\" }\n\
         queue: { max_attempts: 1 }\n\
         quotas:\n  - { name: second, limit: 2, window: 1s }\n\
         routes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }\n\
         \x20 - { name: update, methods: [PUT], path: \"/api/v2/tickets/*\", on_limit: queue, max_wait: 0s }\n",
    )
    .await;
    let before = std::time::SystemTime::now();
    for i in 0..2 {
        assert_eq!(
            h.create(&format!("live-{i}")).await.status,
            StatusCode::CREATED
        );
    }
    // Every parked write then meets a 500: the creates become ambiguous dead letters (the CRM
    // may have applied them), the updates run out of their one attempt.
    h.sim.inject((0..6).map(|_| Fault::Status(500)));
    let mut parked = Vec::new();
    for i in 0..4 {
        let r = h.create(&format!("d-{i}")).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
        parked.push(r.json()["id"].as_str().unwrap().to_string());
    }
    for t in 1..=2 {
        let r = h
            .call(Method::PUT, &format!("/api/v2/tickets/{t}.json"), "{}")
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    }
    let failed = eventually("six dead letters", Duration::from_secs(10), || async {
        let s = h.admin_get("/status").await.json();
        (s["queue"]["failed"] == 6).then_some(s)
    })
    .await;
    assert_eq!(failed["queue"]["failed"], 6);

    // A dry run counts and changes nothing.
    let dry = h.admin_post("/requests/retry?reason=ambiguous").await;
    assert_eq!(dry.status, StatusCode::OK);
    let dry = dry.json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["matched"], 4, "{dry}");
    assert_eq!(dry["ambiguous"], 4);
    assert_eq!(dry["ids"].as_array().unwrap().len(), 4);
    let all = h.admin_post("/requests/discard").await.json();
    assert_eq!(all["matched"], 6, "no filter: every dead letter");
    let none = format!("/requests/discard?until={}", jiff_time(before));
    assert_eq!(
        h.admin_post(&none).await.json()["matched"],
        0,
        "given up after `before`"
    );
    let since = format!("/requests/discard?since={}", jiff_time(before));
    assert_eq!(h.admin_post(&since).await.json()["matched"], 6);

    // Mistakes are refused with every problem named.
    let typo = h
        .admin_post("/requests/discard?route=updte&status=done&reason=x")
        .await;
    assert_eq!(typo.status, StatusCode::BAD_REQUEST);
    let text = typo.json()["description"].as_str().unwrap().to_string();
    for part in [
        "status=done",
        "\"x\" is not a reason",
        "route \"updte\" is not configured (create, update",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert_eq!(
        h.admin_get("/requests/retry").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    // A count that no longer holds does nothing.
    let stale = h
        .admin_post("/requests/discard?route=update&confirm=5")
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT);

    let gone = h
        .admin_post("/requests/discard?route=update&confirm=2")
        .await
        .json();
    assert_eq!(
        (gone["done"].clone(), gone["skipped"].clone()),
        (2.into(), 0.into()),
        "{gone}"
    );
    let left = h.admin_get("/requests?status=failed").await.json();
    assert_eq!(left["total"], 4);
    let again = h
        .admin_post("/requests/retry?reason=ambiguous&confirm=4&confirm_ambiguous=true")
        .await
        .json();
    assert_eq!(again["done"], 4, "{again}");
    for id in &parked {
        h.until_status(id, "done", Duration::from_secs(10)).await;
    }
    // The 500s applied nothing: the two live creates and the four retried ones, once each.
    assert_each_ticket_once(&h.sim, 6);
}

fn jiff_time(t: std::time::SystemTime) -> String {
    let ns = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    jiff::Timestamp::from_nanosecond(ns as i128)
        .unwrap()
        .to_string()
}
