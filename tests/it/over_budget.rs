//! Over budget: parked writes, reads answered 429, bounds, TTL, withdrawal.

use std::time::Duration;

use crm_quota_proxy::sim::SimConfig;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn sim(limit: u32, secs: u64) -> SimConfig {
    SimConfig::new(limit, Duration::from_secs(secs))
}

#[tokio::test]
async fn a_burst_of_three_windows_of_creates_never_overruns_the_crm_and_loses_nothing() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 1s\nquotas:\n  - { name: w, limit: 20, window: 2s }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\n";
    let h = std::sync::Arc::new(Harness::start(sim(20, 2), yaml).await);
    let mut tasks = Vec::new();
    for i in 0..60 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            (i, h.create(&format!("burst-{i}")).await)
        }));
    }
    let mut immediate = 0;
    let mut parked = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r.status.as_u16() {
            201 => {
                immediate += 1;
                assert_eq!(r.json()["ticket"]["subject"], format!("burst-{i}"));
            }
            202 => {
                let v = r.json();
                assert_eq!(v["status"], "queued");
                let id = v["id"].as_str().unwrap().to_string();
                assert_eq!(r.header("location"), format!("/_proxy/requests/{id}"));
                assert!(v["position"].is_u64() && v["estimated_dispatch_at"].is_string());
                parked.push((i, id));
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    assert_eq!(immediate + parked.len(), 60);
    assert!(!parked.is_empty(), "a 3x burst must park some writes");
    for (i, id) in &parked {
        let v = h.until_status(id, "done", Duration::from_secs(15)).await;
        let resp = &v["response"];
        assert_eq!(resp["status"], 201);
        let ticket: serde_json::Value =
            serde_json::from_str(resp["body"].as_str().unwrap()).unwrap();
        assert_eq!(
            ticket["ticket"]["subject"],
            format!("burst-{i}"),
            "each 202 maps to its own ticket"
        );
        // The stored response replays verbatim.
        let replay = h
            .call(Method::GET, &format!("/_proxy/requests/{id}/response"), "")
            .await;
        assert_eq!(replay.status, 201);
        assert_eq!(replay.json()["ticket"]["subject"], format!("burst-{i}"));
    }
    let stats = h.sim.stats();
    assert_eq!(stats.throttled, 0, "the CRM never answered 429");
    assert!(
        stats.max_in_fixed_window <= 20 && stats.max_in_sliding_window <= 20,
        "{stats:?}"
    );
    assert_each_ticket_once(&h.sim, 60);
    assert_eq!(
        h.metric("crm_proxy_dispatched_total{route=\"create\"}")
            .await,
        parked.len() as f64
    );
}

#[tokio::test]
async fn reads_over_budget_get_429_with_retry_after_at_once() {
    let yaml = "upstream: { url: \"{upstream}\" }\nquotas:\n  - { name: w, limit: 2, window: 30s }\nroutes:\n  - { name: search, methods: [GET], path: /api/v2/search.json }\n";
    let h = Harness::start(sim(100, 30), yaml).await;
    for _ in 0..2 {
        assert_eq!(
            h.call(Method::GET, "/api/v2/search.json?query=x", "")
                .await
                .status,
            200
        );
    }
    let started = tokio::time::Instant::now();
    let r = h.call(Method::GET, "/api/v2/search.json?query=x", "").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered without waiting"
    );
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((29..=31).contains(&retry), "retry-after {retry}");
    assert_eq!(r.json()["quota"], "w");
    assert_eq!(r.header("ratelimit"), format!("\"w\";r=0;t={retry}"));
    assert_eq!(
        h.sim.stats().calls,
        2,
        "the CRM never saw the rejected read"
    );
    assert_eq!(
        h.metric("crm_proxy_requests_total{outcome=\"rejected\",route=\"search\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_wait_route_waits_only_when_a_slot_can_come_in_time_and_never_parks() {
    let yaml = "upstream: { url: \"{upstream}\" }\nquotas:\n  - { name: w, limit: 1, window: 1s, margin: 0s }\n  - { name: slow, limit: 1, window: 30s, scope: route }\nroutes:\n  - { name: soon, methods: [PUT], path: \"/api/v2/tickets/{id}.json\", on_limit: wait, max_wait: 3s }\n  - { name: later, methods: [PATCH], path: \"/api/v2/tickets/{id}.json\", on_limit: wait, max_wait: 3s, quotas: [slow] }\n";
    let h = Harness::start(sim(100, 30), yaml).await;
    assert_eq!(h.create("t").await.status, 201);
    // The next slot comes within a second: the client waits for it and gets the CRM's answer.
    let started = tokio::time::Instant::now();
    let r = h
        .call(Method::PUT, "/api/v2/tickets/1.json", "{\"ticket\":{}}")
        .await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "it waited for the slot"
    );
    // The route's 30 s quota is spent after one call: no slot within 3 s, so the answer is at once.
    until_quota_free(&h, "w").await;
    let r = h.call(Method::PATCH, "/api/v2/tickets/1.json", "{}").await;
    assert_eq!(
        r.status, 404,
        "the sim has no PATCH; what matters is that it was sent"
    );
    until_quota_free(&h, "w").await;
    let started = tokio::time::Instant::now();
    let r = h.call(Method::PATCH, "/api/v2/tickets/1.json", "{}").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not held when no slot can come in time"
    );
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 25);
    assert_eq!(r.json()["quota"], "slow");
    let status = h.admin_get("/status").await.json();
    assert_eq!(
        status["queue"]["queued"], 0,
        "a wait route never leaves a parked write behind"
    );
}

#[tokio::test]
async fn queue_full_answers_503_before_acceptance() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nqueue: { max_entries: 2 }\nquotas:\n  - { name: w, limit: 1, window: 60s }\n";
    let h = Harness::start(sim(100, 60), yaml).await;
    assert_eq!(h.create("first").await.status, 201);
    assert_eq!(h.create("parked-1").await.status, 202);
    assert_eq!(h.create("parked-2").await.status, 202);
    let r = h.create("refused").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "queue_full");
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((59..=61).contains(&retry), "{retry}");
    assert_eq!(
        h.metric("crm_proxy_requests_total{outcome=\"queue_full\",route=\"default\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_whether_declared_or_streamed() {
    let yaml = "upstream: { url: \"{upstream}\" }\nmax_body_bytes: 1KiB\nquotas:\n  - { name: w, limit: 100, window: 60s }\n";
    let h = Harness::start(sim(100, 60), yaml).await;
    let r = h
        .call(Method::POST, "/api/v2/tickets.json", vec![b'x'; 2048])
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "body_too_large");
    // Chunked, so the size is only known while reading.
    let mut s = tokio::net::TcpStream::connect(h.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let chunk = format!("800\r\n{}\r\n", "y".repeat(0x800));
    s.write_all(format!("POST /api/v2/tickets.json HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}0\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"));
    assert_eq!(h.sim.stats().calls, 0, "nothing reached the CRM");
}

#[tokio::test]
async fn a_parked_write_past_its_ttl_expires_visibly() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nqueue: { ttl: 1s }\nquotas:\n  - { name: w, limit: 1, window: 60s }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\n";
    let h = Harness::start(sim(100, 60), yaml).await;
    assert_eq!(h.create("first").await.status, 201);
    let r = h.create("late").await;
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let v = h.until_status(&id, "expired", Duration::from_secs(5)).await;
    assert_eq!(v["error"], "expired before quota allowed it");
    assert_eq!(
        h.metric("crm_proxy_expired_total{route=\"create\"}").await,
        1.0
    );
    assert_eq!(h.sim.stats().tickets, 1);
}

#[tokio::test]
async fn status_reads_need_the_same_credential_and_unknown_ids_are_404() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nquotas:\n  - { name: w, limit: 1, window: 60s }\n";
    let h = Harness::start(sim(100, 60), yaml).await;
    h.create("first").await;
    let id = h.create("second").await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(h.status_of(&id).await.status, 200);
    let other = send(
        &h.client,
        Method::GET,
        &format!("{}/_proxy/requests/{id}", h.url),
        &[("authorization", "Bearer someone-else")],
        "",
    )
    .await;
    assert_eq!(other.status, 404, "another credential cannot read it");
    let none = send(
        &h.client,
        Method::GET,
        &format!("{}/_proxy/requests/{id}", h.url),
        &[],
        "",
    )
    .await;
    assert_eq!(none.status, 404);
    assert_eq!(
        h.status_of("0123456789abcdef0123456789abcdef").await.status,
        404
    );
    assert_eq!(h.status_of("not-an-id").await.status, 404);
    assert_eq!(h.call(Method::GET, "/_proxy/other", "").await.status, 404);
    assert!(
        !String::from_utf8_lossy(&h.status_of(&id).await.body).contains("test-token"),
        "no credential in the status body"
    );
}

/// However its body was framed (counted and sent with the head, chunked, or sent after a
/// `100 Continue`), a write whose client hangs up while it waits is withdrawn.
#[tokio::test]
async fn a_client_that_disconnects_before_acceptance_withdraws_its_write() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 30s\nquotas:\n  - { name: w, limit: 1, window: 2s }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\n";
    let h = Harness::start(sim(100, 2), yaml).await;
    assert_eq!(h.create("first").await.status, 201);
    let head =
        "POST /api/v2/tickets.json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
    for (n, framing) in ["length", "chunked", "expect"].into_iter().enumerate() {
        // A raw client sends a write that must park, then hangs up while waiting.
        let mut s = tokio::net::TcpStream::connect(h.url.trim_start_matches("http://"))
            .await
            .unwrap();
        let body = ticket_body(&format!("abandoned ({framing})"));
        match framing {
            "length" => {
                let len = body.len();
                s.write_all(format!("{head}Content-Length: {len}\r\n\r\n{body}").as_bytes())
                    .await
                    .unwrap();
            }
            "chunked" => {
                let (a, b) = body.split_at(body.len() / 2);
                let (la, lb) = (a.len(), b.len());
                let wire = format!(
                    "{head}Transfer-Encoding: chunked\r\n\r\n{la:x}\r\n{a}\r\n{lb:x}\r\n{b}\r\n0\r\n\r\n"
                );
                s.write_all(wire.as_bytes()).await.unwrap();
            }
            _ => {
                let len = body.len();
                s.write_all(
                    format!("{head}Expect: 100-continue\r\nContent-Length: {len}\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
                let mut interim = [0u8; 25];
                s.read_exact(&mut interim).await.unwrap();
                assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
                s.write_all(body.as_bytes()).await.unwrap();
            }
        }
        eventually("the write to be parked", Duration::from_secs(5), || async {
            (h.admin_get("/status").await.json()["queue"]["queued"] == 1).then_some(())
        })
        .await;
        drop(s);
        let withdrawn = (n + 1) as f64;
        eventually(
            "the withdrawal to be counted",
            Duration::from_secs(5),
            || async {
                (h.metric("crm_proxy_requests_total{outcome=\"withdrawn\",route=\"create\"}")
                    .await
                    == withdrawn)
                    .then_some(())
            },
        )
        .await;
    }
    // A later write of the same lane is delivered; had an abandoned one stayed, it would have gone first.
    assert_eq!(h.create("after").await.status, 201);
    let subjects: Vec<String> = h.sim.tickets().into_iter().map(|t| t.subject).collect();
    assert_eq!(subjects, vec!["first", "after"]);
}

#[tokio::test]
async fn a_new_write_never_overtakes_parked_writes_of_its_lane() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nquotas:\n  - { name: w, limit: 2, window: 2s }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\n";
    let h = Harness::start(sim(100, 2), yaml).await;
    assert_eq!(h.create("a").await.status, 201);
    assert_eq!(h.create("b").await.status, 201);
    let mut ids = Vec::new();
    for s in ["c", "d", "e"] {
        let r = h.create(s).await;
        assert_eq!(r.status, 202);
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        h.until_status(id, "done", Duration::from_secs(10)).await;
    }
    let subjects: Vec<String> = h.sim.tickets().into_iter().map(|t| t.subject).collect();
    assert_eq!(
        subjects,
        vec!["a", "b", "c", "d", "e"],
        "arrival order kept"
    );
}

#[tokio::test]
async fn updates_to_one_ticket_keep_their_order() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nqueue: { max_in_flight: 8 }\nquotas:\n  - { name: w, limit: 3, window: 2s }\nroutes:\n  - { name: update, methods: [PUT], path: \"/api/v2/tickets/{id}.json\" }\n";
    let h = Harness::start(sim(100, 2), yaml).await;
    assert_eq!(h.create("t").await.status, 201);
    let mut ids = Vec::new();
    for n in 0..8 {
        let r = h
            .call(
                Method::PUT,
                "/api/v2/tickets/1.json",
                format!("{{\"n\":{n}}}"),
            )
            .await;
        if r.status == 202 {
            ids.push(r.json()["id"].as_str().unwrap().to_string());
        }
    }
    for id in &ids {
        h.until_status(id, "done", Duration::from_secs(15)).await;
    }
    let order: Vec<i64> = h.sim.tickets()[0]
        .updates
        .iter()
        .map(|u| u["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order, (0..8).collect::<Vec<_>>());
}

/// Waits until the named quota has room again (as `/status` reports it).
async fn until_quota_free(h: &Harness, quota: &str) {
    eventually(
        &format!("quota {quota} to have room"),
        Duration::from_secs(5),
        || async {
            let s = h.admin_get("/status").await.json();
            let q = s["quotas"]
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["name"] == quota)
                .cloned()
                .unwrap();
            (q["remaining"].as_u64().unwrap() > 0).then_some(())
        },
    )
    .await;
}

/// A write refused while the window still shows room (reads hold their reserve) says so in one
/// voice: the binding quota's `RateLimit` shows nothing left until `Retry-After`.
#[tokio::test]
async fn a_refusal_and_its_ratelimit_header_agree() {
    let yaml = "upstream: { url: \"{upstream}\" }\n\
                fairness: { read_reserve: 40% }\n\
                quotas:\n  - { name: w, limit: 10, window: 10s }\n\
                routes:\n\
                \x20 - { name: search, methods: [GET], path: /api/v2/search.json, on_limit: reject }\n\
                \x20 - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: reject }\n";
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(10)), yaml).await;
    assert_eq!(
        h.call(Method::GET, "/api/v2/search.json?query=x", "")
            .await
            .status,
        200
    );
    let mut created = 0;
    let r = loop {
        let r = h.create(&format!("c-{created}")).await;
        if r.status != 201 {
            break r;
        }
        created += 1;
    };
    assert_eq!(created, 6, "4 of 10 held for reads, one of them used");
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert_eq!(r.header("ratelimit"), format!("\"w\";r=0;t={retry}"));
    // The room held for reads is still there for a read.
    assert_eq!(
        h.call(Method::GET, "/api/v2/search.json?query=y", "")
            .await
            .status,
        200
    );
}

/// A CRM throttle passed through to the client says one thing: the proxy's `RateLimit` for the
/// quota the CRM paused shows nothing left until the CRM's own `Retry-After` (not the end of
/// the proxy's minute).
#[tokio::test]
async fn a_forwarded_crm_throttle_and_its_ratelimit_header_agree() {
    let yaml = "upstream: { url: \"{upstream}\" }\n\
                quotas:\n  - { name: w, limit: 100, window: 1m }\n\
                routes:\n\
                \x20 - { name: search, methods: [GET], path: /api/v2/search.json, on_limit: reject }\n";
    let h = Harness::start(SimConfig::new(5, Duration::from_secs(8)), yaml).await;
    h.sim.spend_elsewhere(5);
    let r = h.call(Method::GET, "/api/v2/search.json?query=x", "").await;
    assert_eq!(r.status, 429, "the CRM's own throttle, forwarded");
    let retry: u64 = r.header("retry-after").parse().unwrap();
    assert!((1..=8).contains(&retry), "{retry}");
    assert_eq!(r.header("ratelimit"), format!("\"w\";r=0;t={retry}"));
}
