//! The foundation issue's acceptance run, at full size: a CRM allowing 400 calls per minute, ticket
//! creates sent through the proxy at 3x that rate for three minutes. Takes about ten minutes, so it
//! is ignored by default: `cargo test --release --test it acceptance -- --ignored --nocapture`.
//! `ACCEPTANCE_SECS` shortens the load phase. The second run drives the shipped Zendesk config.

use std::sync::Arc;
use std::time::Duration;

use crm_quota_proxy::sim::SimConfig;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ten-minute load run; see the module doc"]
async fn three_minutes_at_three_times_a_400_per_minute_budget() {
    let secs: u64 = std::env::var("ACCEPTANCE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let yaml = "upstream: { url: \"{upstream}\" }\nquotas:\n  - { name: minute, limit: 400, window: 1m }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\n";
    let h = Arc::new(Harness::start(SimConfig::new(400, Duration::from_secs(60)), yaml).await);
    let per_second = 20; // 1,200 per minute: three times the budget
    let total = secs * per_second;
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second));
    for i in 0..total {
        tick.tick().await;
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            (i, h.create(&format!("acc-{i}")).await)
        }));
    }
    let (mut created, mut parked) = (0, Vec::new());
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r.status.as_u16() {
            201 => created += 1,
            202 => parked.push((i, r.json()["id"].as_str().unwrap().to_string())),
            s => panic!("write {i}: unexpected {s}"),
        }
    }
    println!(
        "load done: {created} answered 201, {} answered 202",
        parked.len()
    );
    let drain = Duration::from_secs(120 + parked.len() as u64 * 60 / 400);
    for (i, id) in &parked {
        let v = h.until_status(id, "done", drain).await;
        assert_eq!(v["response"]["status"], 201, "write {i}");
    }
    let stats = h.sim.stats();
    println!("CRM: {stats:?}");
    assert_eq!(stats.throttled, 0, "zero 429s from the CRM");
    assert!(
        stats.max_in_fixed_window <= 400 && stats.max_in_sliding_window <= 400,
        "no window over 400"
    );
    assert_each_ticket_once(&h.sim, total as usize);
}

/// Interactive first at full size, with the shipped `config/zendesk.yaml`: a simulated Zendesk
/// at 400 calls per minute, creates at three times that for three minutes (`ACCEPTANCE_SECS`),
/// searches at 5% of the budget, every client waiting:
/// `cargo test --test it interactive_first -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a three-minute load run; see the module doc"]
async fn interactive_first_with_the_shipped_zendesk_config() {
    let secs: u64 = std::env::var("ACCEPTANCE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let sim = crm_quota_proxy::sim::Sim::start(SimConfig {
        job_delay: Duration::from_millis(500),
        ..SimConfig::new(400, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/zendesk.yaml"),
    )
    .unwrap();
    let yaml = shipped
        .replace("0.0.0.0:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("https://acme.zendesk.com", &sim.url())
        .replace(
            "/var/lib/crm-quota-proxy",
            dir.path().join("data").to_str().unwrap(),
        );
    let h = Arc::new(Harness::with_config(sim, &yaml).await);
    let load = Duration::from_secs(secs);
    // 20 creates a second (1,200 a minute: three times the budget), a search every 3 s (5%).
    let b = crate::interactive::burst(&h, load, Duration::from_millis(50), Duration::from_secs(3))
        .await;
    let answered = b.searches.iter().filter(|s| **s == 200).count();
    let stats = h.sim.stats();
    let backlog = stats.batch_calls + stats.job_polls + stats.ticket_reads;
    let budget = 400 * secs / 60;
    println!(
        "{} creates, {} answered 201 with their ticket; {answered}/{} searches answered; backlog {backlog} calls of {budget}; overtaken {}; CRM: {stats:?}",
        b.creates,
        b.with_ticket,
        b.searches.len(),
        b.overtook
    );
    assert!(answered * 100 >= b.searches.len() * 99, "{:?}", b.searches);
    assert_eq!(stats.throttled, 0, "zero 429s from the CRM");
    assert_each_ticket_once(&h.sim, b.creates);
    assert_eq!(b.overtook, 0, "arrival order per lane");
    assert!(backlog * 10 <= budget, "the backlog's share of the budget");
    assert!(
        b.with_ticket * 100 >= b.creates * 95,
        "waiting clients got tickets"
    );
}
