//! Shadow mode (`enforce: false`): every request is forwarded, the ledger counts it, and what
//! enforcing would have done is counted; per quota, a shadow quota only reports while enforced
//! ones still decide.

use std::time::Duration;

use crm_quota_proxy::sim::SimConfig;
use http::Method;

use crate::support::*;

#[tokio::test]
async fn in_shadow_mode_everything_is_forwarded_and_the_would_be_decisions_are_counted() {
    let yaml = "enforce: false\n\
                upstream: { url: \"{upstream}\", crm: zendesk }\n\
                fairness: { read_reserve: 0%, live_reserve: 0%, drain_min: 0% }\n\
                quotas:\n  - { name: w, limit: 5, window: 10s }\n\
                routes:\n\
                \x20 - { name: search, methods: [GET], path: /api/v2/search.json, class: read, on_limit: reject }\n\
                \x20 - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }\n";
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(10)), yaml).await;
    let mut last = None;
    for i in 0..8 {
        let r = h.create(&format!("s-{i}")).await;
        assert_eq!(r.status, 201, "create {i} forwarded: {:?}", r.body);
        last = Some(r);
    }
    // The budget is spent: the RateLimit header says so, though the request went through.
    assert!(last.unwrap().header("ratelimit").starts_with("\"w\";r=0;"));
    for i in 0..3 {
        let r = h
            .call(Method::GET, &format!("/api/v2/search.json?query={i}"), "")
            .await;
        assert_eq!(r.status, 200);
    }
    assert_each_ticket_once(&h.sim, 8);
    assert_eq!(h.sim.stats().calls, 11, "every request reached the CRM");
    let shadow = |route: &str, decision: &str| {
        format!("crm_proxy_shadow_decisions_total{{decision=\"{decision}\",route=\"{route}\"}}")
    };
    assert_eq!(h.metric(&shadow("create", "allowed")).await, 5.0);
    assert_eq!(h.metric(&shadow("create", "queued")).await, 3.0);
    assert_eq!(h.metric(&shadow("search", "rejected")).await, 3.0);
    let status = h.admin_get("/status").await.json();
    assert_eq!(status["queue"]["queued"], 0, "nothing parked");
    assert_eq!(
        status["quotas"][0]["used"], 5,
        "the ledger counted the window full"
    );
    assert_eq!(status["enforce"], false);
}

#[tokio::test]
async fn a_quota_in_shadow_mode_reports_while_the_enforced_ones_still_decide() {
    let yaml = "upstream: { url: \"{upstream}\", crm: zendesk }\n\
                fairness: { read_reserve: 0%, live_reserve: 0%, drain_min: 0% }\n\
                quotas:\n  - { name: trial, limit: 2, window: 10s, enforce: false }\n  - { name: licence, limit: 4, window: 10s }\n\
                routes:\n\
                \x20 - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: reject }\n";
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(10)), yaml).await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(h.create(&format!("q-{i}")).await.status.as_u16());
    }
    assert_eq!(
        statuses,
        [201, 201, 201, 201, 429, 429],
        "the licence decides"
    );
    assert_each_ticket_once(&h.sim, 4);
    assert_eq!(
        h.metric("crm_proxy_shadow_decisions_total{decision=\"rejected\",route=\"create\"}")
            .await,
        2.0,
        "the trial quota would have refused two more"
    );
}

/// With the shared ledger, shadow mode forwards what Redis refuses too, and this replica's
/// count keeps those calls (they reached the CRM).
#[tokio::test]
async fn in_shadow_mode_on_the_shared_ledger_the_refused_calls_still_count() {
    let yaml = format!(
        "enforce: false\n\
         upstream: {{ url: \"{{upstream}}\", crm: zendesk }}\n\
         ledger: {{ store: redis, url: \"{}\", key_prefix: {} }}\n\
         fairness: {{ read_reserve: 0%, live_reserve: 0%, drain_min: 0% }}\n\
         quotas:\n  - {{ name: w, limit: 5, window: 10s }}\n\
         routes:\n\
         \x20 - {{ name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n",
        redis_url(),
        unique_prefix("shadow")
    );
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(10)), &yaml).await;
    for i in 0..8 {
        let r = h.create(&format!("s-{i}")).await;
        assert_eq!(r.status, 201, "create {i} forwarded: {:?}", r.body);
    }
    assert_eq!(h.sim.stats().calls, 8, "every request reached the CRM");
    let status = h.admin_get("/status").await.json();
    assert_eq!(
        status["quotas"][0]["used"], 5,
        "the calls Redis refused were sent and stay counted: {status}"
    );
}
