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
