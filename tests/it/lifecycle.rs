//! Admin endpoints and graceful shutdown.

use std::time::Duration;

use crm_quota_proxy::sim::SimConfig;
use http::Method;

use crate::support::*;

#[tokio::test]
async fn admin_serves_health_readiness_status_and_metrics() {
    let yaml = "upstream: { url: \"{upstream}\" }\nquotas:\n  - { name: minute, limit: 400, window: 1m }\n  - { name: day, limit: 2500, window: 1d, kind: fixed, time_zone: America/New_York }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\n";
    let h = Harness::start(SimConfig::new(1000, Duration::from_secs(60)), yaml).await;
    assert_eq!(h.create("one").await.status, 201);
    assert_eq!(h.admin_get("/healthz").await.status, 200);
    assert_eq!(h.admin_get("/readyz").await.status, 200);
    assert_eq!(h.admin_get("/nope").await.status, 404);

    let s = h.admin_get("/status").await.json();
    assert_eq!(s["ready"], true);
    assert_eq!(s["quotas"][0]["name"], "minute");
    assert_eq!(s["quotas"][0]["used"], 1);
    assert_eq!(s["quotas"][0]["remaining"], 399);
    assert_eq!(s["quotas"][1]["kind"], "fixed");
    assert_eq!(s["quotas"][1]["remaining"], 2499);
    assert!(s["quotas"][1]["next_reset_at"].is_string());
    assert_eq!(s["queue"]["lanes"][0]["name"], "minute+day");
    assert_eq!(s["queue"]["lanes"][0]["depth"], 0);
    assert!(s["upstream"]["last_response_at"].is_string());

    let text = String::from_utf8(h.admin_get("/metrics").await.body.to_vec()).unwrap();
    for series in [
        "crm_proxy_requests_total{outcome=\"forwarded\",route=\"create\"} 1",
        "crm_proxy_upstream_responses_total{class=\"2xx\",route=\"create\"} 1",
        "crm_proxy_upstream_duration_seconds_count{route=\"create\"} 1",
        "crm_proxy_quota_limit{quota=\"day\"} 2500",
        "crm_proxy_quota_used{quota=\"minute\"} 1",
        "crm_proxy_quota_remaining{quota=\"minute\"} 399",
        "crm_proxy_queue_depth{lane=\"minute+day\"} 0",
        "crm_proxy_queue_oldest_age_seconds{lane=\"minute+day\"} 0",
        "crm_proxy_queue_bytes 0",
        "crm_proxy_dispatched_total{route=\"create\"} 0",
        "crm_proxy_expired_total{route=\"create\"} 0",
        "crm_proxy_failed_total{reason=\"ambiguous\",route=\"create\"} 0",
        "crm_proxy_retries_total{route=\"create\"} 0",
        "crm_proxy_up 1",
    ] {
        assert!(text.contains(series), "missing {series}");
    }
    assert!(!text.contains("test-token"), "no credential in metrics");
    assert!(!text.contains("/api/v2"), "no raw paths as labels");
}

#[tokio::test]
async fn shutdown_keeps_draining_parked_writes_within_the_grace_period() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nshutdown_grace: 10s\nquotas:\n  - { name: w, limit: 2, window: 1s }\n";
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(1)), yaml).await;
    let mut parked = 0;
    for i in 0..6 {
        if h.create(&format!("s{i}")).await.status == 202 {
            parked += 1;
        }
    }
    assert!(parked >= 3);
    let (stopped, sim) = h.stop().await;
    assert_eq!(stopped.undelivered, 0);
    assert_eq!(
        sim.stats().tickets,
        6,
        "all parked writes drained before exit"
    );
}

#[tokio::test]
async fn shutdown_reports_parked_writes_it_could_not_deliver() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nshutdown_grace: 300ms\nquotas:\n  - { name: w, limit: 1, window: 60s }\n";
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(60)), yaml).await;
    assert_eq!(h.create("a").await.status, 201);
    assert_eq!(h.create("b").await.status, 202);
    assert_eq!(h.create("c").await.status, 202);
    let started = tokio::time::Instant::now();
    let (stopped, _) = h.stop().await;
    assert_eq!(stopped.undelivered, 2);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the grace period bounds shutdown"
    );
}

#[tokio::test]
async fn readiness_fails_and_new_parked_writes_are_refused_once_shutdown_begins() {
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nshutdown_grace: 3s\nquotas:\n  - { name: w, limit: 1, window: 60s }\n";
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(60)), yaml).await;
    assert_eq!(h.create("a").await.status, 201);
    assert_eq!(h.create("b").await.status, 202);
    let admin = h.admin.clone();
    let client = h.client.clone();
    let stopping = tokio::spawn(h.stop());
    eventually("readyz to fail", Duration::from_secs(2), || async {
        let r = send(&client, Method::GET, &format!("{admin}/readyz"), &[], "").await;
        (r.status == 503).then_some(())
    })
    .await;
    let (stopped, _) = stopping.await.unwrap();
    assert_eq!(stopped.undelivered, 1);
}

#[tokio::test]
async fn readiness_follows_the_phases_starting_ready_stopping() {
    use crm_quota_proxy::proxy::{Phase, Proxy};
    let config = crm_quota_proxy::config::Config::from_yaml(
        "upstream: { url: http://127.0.0.1:9 }\nquotas:\n  - { name: m, limit: 1, window: 1m }\n",
        None,
    )
    .unwrap();
    let proxy = std::sync::Arc::new(
        Proxy::new(
            config,
            crm_quota_proxy::clock::SystemClock::shared(),
            crm_quota_proxy::store::Store::memory(),
        )
        .unwrap(),
    );
    let readyz = || async {
        let req = http::Request::get("/readyz").body(()).unwrap();
        let resp = crm_quota_proxy::admin::handle(proxy.clone(), req).await;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status.as_u16(), String::from_utf8(body.to_vec()).unwrap())
    };
    assert_eq!(
        readyz().await,
        (503, "starting: restoring parked writes\n".into()),
        "not ready until the queue is restored"
    );
    proxy.set_phase(Phase::Ready);
    assert_eq!(readyz().await, (200, "ready\n".into()));
    proxy.set_phase(Phase::Stopping);
    assert_eq!(readyz().await, (503, "shutting down\n".into()));
}
