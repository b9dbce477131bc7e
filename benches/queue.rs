//! Park/drain throughput of the in-memory queue: 1,000 writes parked (202) and then drained.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use crm_quota_proxy::clock::{Clock, ManualClock};
use crm_quota_proxy::config::Config;
use crm_quota_proxy::ids::{ClientId, Fingerprint};
use crm_quota_proxy::live::Live;
use crm_quota_proxy::message::{BufferedResponse, Outbound};
use crm_quota_proxy::metrics::Metrics;
use crm_quota_proxy::queue::{Enter, Outcome, Parkable, Queue, Step, WaitEnd};
use crm_quota_proxy::quota::Ledger;
use crm_quota_proxy::route::RouteTable;
use crm_quota_proxy::store::Store;
use http::{HeaderMap, HeaderValue, Method};

const N: usize = 1_000;

struct Setup {
    clock: ManualClock,
    ledger: Ledger,
    routes: Arc<RouteTable>,
    queue: Arc<Queue>,
}

fn setup() -> Setup {
    let yaml = "upstream: { url: http://crm.test }\nquotas:\n  - { name: w, limit: 1, window: 1s, margin: 0s }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\n";
    let config = Config::from_yaml(yaml, None).unwrap();
    let clock = ManualClock::at("2026-06-01T00:00:00Z");
    let table = Arc::new(Live::new(RouteTable::new(&config)));
    let routes = table.get();
    let metrics = Arc::new(Metrics::new(&routes.names(), &["w"], &[], &["default"]));
    let ledger = Ledger::for_config(&config, clock.now());
    let queue = Arc::new(Queue::new(
        &config,
        table,
        metrics,
        ledger.board(),
        Store::memory(),
    ));
    Setup {
        clock,
        ledger,
        routes,
        queue,
    }
}

fn write(i: usize) -> Parkable {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer bench-token"),
    );
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Parkable {
        request: Outbound {
            method: Method::POST,
            path_and_query: http::uri::PathAndQuery::from_static("/api/v2/tickets.json"),
            headers,
            body: Bytes::from(format!("{{\"ticket\":{{\"subject\":\"call {i}\"}}}}").repeat(20)),
        },
        fingerprint: Fingerprint::of(&HeaderMap::new()),
        resource: None,
        client: ClientId::default(),
        keys: Vec::new(),
    }
}

async fn park_all(s: &Setup) {
    let route = s.routes.classify(&Method::POST, "/api/v2/tickets.json");
    for i in 0..N {
        match s.queue.enter(&s.ledger, route, write(i), s.clock.now()) {
            Enter::Parked(mut t) => match t.wait(Duration::ZERO, &s.ledger, &s.clock).await {
                WaitEnd::Accepted(_) => {}
                _ => panic!("not accepted"),
            },
            // No slot expected within max_wait: the 202 at once.
            Enter::Go(..) | Enter::Accepted(_) => {}
            _ => panic!("refused"),
        }
    }
}

fn drain_all(s: &Setup) {
    let mut sent = 0;
    while sent < N - 1 {
        s.clock.advance(Duration::from_secs(1));
        if let Step::Send(d) = s.queue.next(&s.ledger, s.clock.now()) {
            let resp = BufferedResponse {
                status: http::StatusCode::CREATED,
                headers: HeaderMap::new(),
                body: Bytes::from_static(b"{}"),
            };
            s.queue.complete(d.id, Outcome::Done(resp), s.clock.now());
            sent += 1;
        }
    }
}

fn park_and_drain(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("park 1000 writes (202)", |b| {
        b.iter_batched(setup, |s| rt.block_on(park_all(&s)), BatchSize::LargeInput)
    });
    g.bench_function("drain 1000 parked writes", |b| {
        b.iter_batched(
            || {
                let s = setup();
                rt.block_on(park_all(&s));
                s
            },
            |s| drain_all(&s),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// A queue with `lanes` clients, each with one lane holding `per_lane` parked writes.
fn scheduler_setup(lanes: usize, per_lane: usize) -> Setup {
    let mut yaml = String::from(
        "upstream: { url: http://crm.test }\ndefault_max_wait: 0s\nfairness: { live_reserve: 0%, drain_min: 0% }\nqueue: { max_in_flight: 10000, max_entries: 1000000, max_bytes: 4GiB }\nquotas:\n  - { name: w, limit: 1000000, window: 10s }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\nclients:\n",
    );
    for c in 0..lanes {
        yaml.push_str(&format!("  - {{ name: c{c}, weight: {}, match: {{ header: {{ name: x-client, value: c{c} }} }} }}\n", 1 + c % 3));
    }
    let config = Config::from_yaml(&yaml, None).unwrap();
    let clock = ManualClock::at("2026-06-01T00:00:00Z");
    let table = Arc::new(Live::new(RouteTable::new(&config)));
    let routes = table.get();
    let names: Vec<&str> = config.clients.iter().map(|c| c.name.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&routes.names(), &["w"], &[], &names));
    let ledger = Ledger::for_config(&config, clock.now());
    let queue = Arc::new(Queue::new(
        &config,
        table,
        metrics,
        ledger.board(),
        Store::memory(),
    ));
    let s = Setup {
        clock,
        ledger,
        routes,
        queue,
    };
    let route = s.routes.classify(&Method::POST, "/api/v2/tickets.json");
    // Park everything while the quota is paused, then let it go.
    let until = s.clock.now() + Duration::from_secs(1);
    s.ledger.freeze(&route.quotas, until, s.clock.now());
    for i in 0..per_lane {
        for c in 0..lanes {
            let mut w = write(i);
            w.client = ClientId(c);
            match s.queue.enter(&s.ledger, route, w, s.clock.now()) {
                Enter::Accepted(_) => {}
                _ => panic!("expected an immediate 202"),
            }
        }
    }
    s.clock.advance(Duration::from_secs(2));
    s
}

fn scheduler(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler");
    for lanes in [10usize, 1_000] {
        // A decision that sends: the client at the front of the round has a write that can go.
        g.bench_function(format!("pick and send, {lanes} active lanes"), |b| {
            b.iter_batched(
                || scheduler_setup(lanes, 4),
                |s| {
                    for _ in 0..lanes {
                        let Step::Send(d) = s.queue.next(&s.ledger, s.clock.now()) else {
                            panic!("idle")
                        };
                        let resp = BufferedResponse {
                            status: http::StatusCode::CREATED,
                            headers: HeaderMap::new(),
                            body: Bytes::new(),
                        };
                        s.queue.complete(d.id, Outcome::Done(resp), s.clock.now());
                    }
                },
                BatchSize::LargeInput,
            )
        });
        // A decision that finds nothing: every lane is blocked by the spent quota, all are scanned.
        let s = scheduler_setup(lanes, 1);
        let route = s.routes.classify(&Method::POST, "/api/v2/tickets.json");
        s.ledger.freeze(
            &route.quotas,
            s.clock.now() + Duration::from_secs(3600),
            s.clock.now(),
        );
        g.bench_function(format!("all blocked, {lanes} active lanes"), |b| {
            b.iter(|| {
                assert!(matches!(
                    s.queue.next(&s.ledger, s.clock.now()),
                    Step::Idle(_)
                ))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = park_and_drain, scheduler
}
criterion_main!(benches);
