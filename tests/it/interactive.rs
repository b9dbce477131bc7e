//! Interactive first, on short windows: a CRM allowing 40 calls per 2 s (1,200 a minute), creates
//! sent through the proxy at three times that for 12 s with every client waiting, and a contact
//! search each second (5% of the budget). Searches are answered, waiting clients get their
//! tickets, the backlog rides in batches that fill, and the CRM applies each lane in arrival order.

use std::sync::Arc;
use std::time::Duration;

use crm_quota_proxy::sim::SimConfig;
use http::Method;
use serde_json::Value;
use tokio::time::Instant;

use crate::support::*;

const YAML: &str = "upstream: { url: \"{upstream}\", crm: zendesk }\n\
queue: { max_entries: 5000 }\n\
fairness: { read_reserve: 10% }\n\
quotas:\n  - { name: calls, limit: 40, window: 2s, margin: 50ms }\n\
routes:\n\
\x20 - { name: contact-search, methods: [GET], path: /api/v2/search.json, class: read, on_limit: wait, max_wait: 1s }\n\
\x20 - { name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 10s, idempotency_key: true, batch: { max_size: 100, max_linger: 2s } }\n\
\x20 - { name: other-reads, methods: [GET], path: /api/v2/**, on_limit: wait, max_wait: 1s }\n";

/// What a burst through the proxy came to.
pub struct Burst {
    /// Creates sent, and those answered `201` with their own ticket.
    pub creates: usize,
    pub with_ticket: usize,
    /// Each search's status.
    pub searches: Vec<u16>,
    /// Creates the CRM applied ahead of one sent half a second or more before them.
    pub overtook: usize,
}

/// Sends creates every `create_gap` and a search every `search_gap` through the proxy for
/// `load`, every client waiting for its answer; then waits for the backlog to drain.
pub async fn burst(
    h: &Arc<Harness>,
    load: Duration,
    create_gap: Duration,
    search_gap: Duration,
) -> Burst {
    let started = Instant::now();
    let searches = {
        let h = h.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(search_gap);
            let mut answers = Vec::new();
            while started.elapsed() < load {
                tick.tick().await;
                let path = format!("/api/v2/search.json?query=s-{}", answers.len());
                answers.push(h.call(Method::GET, &path, "").await.status.as_u16());
            }
            answers
        })
    };
    let mut creates = Vec::new();
    let mut tick = tokio::time::interval(create_gap);
    while started.elapsed() < load {
        tick.tick().await;
        let (h, i) = (h.clone(), creates.len());
        let sent = started.elapsed();
        creates.push((
            sent,
            tokio::spawn(async move { h.create(&format!("b-{i:05}")).await }),
        ));
    }
    let n = creates.len();
    let (mut with_ticket, mut sent_at) = (0, Vec::with_capacity(n));
    for (i, (sent, task)) in creates.into_iter().enumerate() {
        let r = task.await.unwrap();
        sent_at.push(sent);
        match r.status.as_u16() {
            201 => {
                let v: Value = r.json();
                assert_eq!(
                    v["ticket"]["subject"],
                    format!("b-{i:05}"),
                    "its own ticket"
                );
                with_ticket += 1;
            }
            202 => {}
            s => panic!("create {i}: unexpected {s}: {:?}", r.body),
        }
    }
    let searches = searches.await.unwrap();
    let drain = Duration::from_secs(60) + load;
    eventually("the backlog to drain", drain, || async {
        let s = h.admin_get("/status").await.json();
        (s["queue"]["queued"] == 0 && s["queue"]["dispatching"] == 0).then_some(())
    })
    .await;
    // Arrival order per lane, as the CRM applied it.
    let mut id_of = vec![0; n];
    for t in h.sim.tickets() {
        if let Some(i) = t
            .subject
            .strip_prefix("b-")
            .and_then(|i| i.parse::<usize>().ok())
        {
            id_of[i] = t.id;
        }
    }
    let (mut earlier, mut max_id, mut overtook) = (0, 0, 0);
    for j in 0..n {
        while earlier < j && sent_at[earlier] + Duration::from_millis(500) <= sent_at[j] {
            max_id = max_id.max(id_of[earlier]);
            earlier += 1;
        }
        overtook += usize::from(id_of[j] < max_id);
    }
    Burst {
        creates: n,
        with_ticket,
        searches,
        overtook,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_at_three_times_the_budget_answers_searches_and_gives_waiting_clients_tickets() {
    let sim = SimConfig {
        job_delay: Duration::from_millis(300),
        ..SimConfig::new(40, Duration::from_secs(2))
    };
    let h = Arc::new(Harness::start(sim, YAML).await);
    let load = Duration::from_secs(12);
    // 60 creates a second (three times the budget), a search a second (5% of it).
    let b = burst(
        &h,
        load,
        Duration::from_micros(16_667),
        Duration::from_secs(1),
    )
    .await;
    let answered = b.searches.iter().filter(|s| **s == 200).count();
    assert_eq!(
        answered,
        b.searches.len(),
        "every search answered: {:?}",
        b.searches
    );
    let stats = h.sim.stats();
    assert_eq!(stats.throttled, 0, "no CRM 429: {stats:?}");
    assert_each_ticket_once(&h.sim, b.creates);
    assert!(
        b.with_ticket * 100 >= b.creates * 95,
        "{} of {} waiting clients got their ticket",
        b.with_ticket,
        b.creates
    );
    // The backlog's calls (batches, job polls, tickets read back) against the load's budget.
    let backlog = stats.batch_calls + stats.job_polls + stats.ticket_reads;
    let budget = 40 * load.as_secs() / 2;
    assert!(
        backlog * 10 <= budget,
        "the backlog cost {backlog} calls of {budget}: {stats:?}"
    );
    assert_eq!(
        b.overtook, 0,
        "creates applied ahead of ones sent 0.5 s earlier"
    );
    println!(
        "{} creates ({} answered 201 with their ticket), {answered}/{} searches, backlog {backlog} calls of {budget}: {stats:?}",
        b.creates,
        b.with_ticket,
        b.searches.len()
    );
}
