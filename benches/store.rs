//! The disk store: parked writes per second through HTTP (each 202 sent only after its record is
//! fsynced, commits grouped), and recovery time for 100,000 parked entries.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crm_quota_proxy::clock::SystemClock;
use crm_quota_proxy::config::Config;
use crm_quota_proxy::sim::{Sim, SimConfig};
use crm_quota_proxy::store::{Record, Store, Stored};
use crm_quota_proxy::{Listeners, open, serve};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Concurrent clients parking writes.
const CLIENTS: usize = 64;
/// Writes per measured batch.
const BATCH: usize = 1_024;
/// Entries in the recovery bench.
const RECOVERED: usize = 100_000;

fn config(dir: &std::path::Path, upstream: &str) -> Config {
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
         upstream: {{ url: \"{upstream}\" }}\n\
         max_body_bytes: 4KiB\n\
         queue: {{ store: disk, data_dir: {}, max_entries: 1000000, max_bytes: 4GiB }}\n\
         quotas:\n  - {{ name: calls, limit: 1, window: 1h, margin: 0s }}\n\
         routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n",
        dir.join("data").display()
    );
    Config::from_yaml(&yaml, None).unwrap()
}

/// A ticket create with a 1 KiB JSON body.
fn body(i: usize) -> Bytes {
    let head = format!("{{\"ticket\":{{\"subject\":\"bench {i}\",\"comment\":{{\"body\":\"");
    let pad = 1024 - head.len() - 4;
    Bytes::from(format!("{head}{}\"}}}}}}", "x".repeat(pad)))
}

fn park_over_http(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (url, admin, stop, server, sim) = rt.block_on(async {
        let sim = Sim::start(SimConfig::new(1, Duration::from_secs(3600)))
            .await
            .unwrap();
        let config = config(dir.path(), &sim.url());
        let listeners = Listeners::bind(&config).await.unwrap();
        let url = format!(
            "http://{}/api/v2/tickets.json",
            listeners.data.local_addr().unwrap()
        );
        let admin = format!("http://{}/metrics", listeners.admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            config,
            listeners,
            SystemClock::shared(),
            async move {
                let _ = stopped.await;
            },
        ));
        (url, admin, stop, server, sim)
    });
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CLIENTS)
        .build_http::<Full<Bytes>>();
    let mut group = c.benchmark_group("disk store");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.bench_function(
        "park 1 KiB writes over HTTP, 202 after fsync, 64 clients (per 1,024)",
        |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        let workers: Vec<_> = (0..CLIENTS)
                            .map(|w| {
                                let (client, url) = (client.clone(), url.clone());
                                tokio::spawn(async move {
                                    for i in (w..BATCH).step_by(CLIENTS) {
                                        let req = http::Request::post(&url)
                                            .header("authorization", "Bearer bench-token")
                                            .header("content-type", "application/json")
                                            .body(Full::new(body(i)))
                                            .unwrap();
                                        let resp = client.request(req).await.unwrap();
                                        let status = resp.status();
                                        resp.into_body().collect().await.unwrap();
                                        assert!(
                                            status == 202 || status == 201,
                                            "unexpected {status}"
                                        );
                                    }
                                })
                            })
                            .collect();
                        for w in workers {
                            w.await.unwrap();
                        }
                    }
                    started.elapsed()
                })
            })
        },
    );
    group.finish();
    rt.block_on(async {
        // How well commits were grouped: parked writes per fsync.
        let resp = client
            .request(http::Request::get(&admin).body(Full::default()).unwrap())
            .await
            .unwrap();
        let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec())
            .unwrap();
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let parked = value("crm_proxy_requests_total{outcome=\"queued\",route=\"ticket-create\"}");
        let commits = value("crm_proxy_store_commits_total");
        let sync = value("crm_proxy_store_sync_seconds_total");
        println!(
            "parked {parked} writes in {commits} group commits: {:.1} writes per fsync, {:.2} ms per commit",
            parked / commits.max(1.0),
            sync * 1e3 / commits.max(1.0)
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        sim.shutdown().await;
    });
}

/// A parked ticket create as the log holds it.
fn stored(i: usize, now: u64) -> Stored {
    Stored {
        id: i as u128 + 1,
        seq: i as u64 + 1,
        route: "ticket-create".into(),
        client: "default".into(),
        method: "POST".into(),
        path_and_query: "/api/v2/tickets.json".into(),
        headers: vec![
            ("authorization".into(), b"Bearer bench-token".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
        ],
        body: body(i),
        resource: None,
        keys: Vec::new(),
        fingerprint: [1; 16],
        created_at: now,
        expires_at: now + 86_400_000_000_000,
        not_before: now,
        attempts: 0,
    }
}

fn recovery(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "http://127.0.0.1:9");
    let now = SystemClock::shared().now().as_nanos();
    rt.block_on(async {
        let (store, _) = Store::open(config.queue.data_dir.as_ref().unwrap()).unwrap();
        for i in 0..RECOVERED {
            drop(store.append(&Record::Accepted(Box::new(stored(i, now)))));
        }
        store.sync().durable().await.unwrap();
    });
    let mut group = c.benchmark_group("disk store");
    group.sample_size(10);
    group.bench_function(
        "recover 100,000 parked 1 KiB writes (read, check, replay, rebuild lanes)",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let proxy =
                        rt.block_on(async { open(config.clone(), SystemClock::shared()).unwrap() });
                    total += started.elapsed();
                    assert_eq!(proxy.queue.snapshot(proxy.clock.now()).queued, RECOVERED);
                    // Dropped outside the measurement; it releases the directory's lock.
                    drop(proxy);
                }
                total
            })
        },
    );
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(10));
    targets = park_over_http, recovery
}
criterion_main!(benches);
