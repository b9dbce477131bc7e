//! The foundation issue's acceptance run, at full size: a CRM allowing 400 calls per minute, ticket
//! creates sent through the proxy at 3x that rate for three minutes. Takes about ten minutes, so it
//! is ignored by default: `cargo test --release --test it acceptance -- --ignored --nocapture`.
//! `ACCEPTANCE_SECS` shortens the load phase.

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
