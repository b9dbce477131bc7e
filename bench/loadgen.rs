//! The benchmark harness's own measurements (driven by `bench/run.sh`; see the README's
//! Benchmarks section). Each mode prints one line of `key=value` pairs.
//!
//! - `loadgen rate URL RATE SECS`: an open-loop GET load at a fixed rate. Each request's latency
//!   counts from the moment it was due, so a stall is charged to every request it delayed
//!   (no coordinated omission).
//! - `loadgen rates URL,URL.. RATE SLICE_SECS SLICES`: the same load at each URL in turn for
//!   SLICE_SECS, SLICES times over; one line per URL (in the order given) with its latencies
//!   pooled, so targets compared side by side meet the same moments of the machine's noise.
//! - `loadgen backlog BIN sliding|fixed LIMIT WINDOW_SECS WINDOWS`: the proxy binary in front of
//!   the simulated CRM (an epoch-aligned fixed window of LIMIT calls, Zendesk headers), with its
//!   quota of that kind; ticket creates offered at three times the budget for WINDOWS windows,
//!   then drained: quota utilization, CRM 429s, and how soon after a window opens the first
//!   parked write goes. `loadgen backlog BIN KIND LIMIT WINDOW_SECS WINDOWS REDIS_URL REPLICAS`:
//!   the same with REPLICAS proxies sharing one ledger on Redis, the creates spread over them.
//! - `loadgen memory BIN ENTRIES`: the proxy binary's resident memory before and after ENTRIES
//!   parked 1 KiB ticket creates (memory store), and the overhead per entry beyond its body.
//! - `loadgen ledger REDIS_URL REPLICAS SECS`: REPLICAS ledgers in this process sharing one
//!   account on Redis, each deciding (its own grant, then the shared ledger's script call) as
//!   fast as it can for SECS: decision latency (p50, p99) and decisions per second.
//! - `loadgen scrape BIN ENTRIES RATE SECS ROUNDS`: with ENTRIES parked writes in the proxy's
//!   queue, live reads at a fixed RATE for SECS, alone and while `/metrics` and `/status` are
//!   scraped every 100 ms, alternating for ROUNDS rounds: what the scrapes add to the live p99
//!   (medians of the rounds), and what a scrape costs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crm_quota_proxy::sim::{Sim, SimConfig};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const TOKEN: &str = "Bearer bench-token-0123456789abcdef0123456789abcdef";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("usage: loadgen rate URL RATE SECS | rates URL,URL.. RATE SLICE_SECS SLICES | backlog BIN sliding|fixed LIMIT WINDOW_SECS WINDOWS [REDIS_URL REPLICAS] | memory BIN ENTRIES | scrape BIN ENTRIES RATE SECS ROUNDS | ledger REDIS_URL REPLICAS SECS");
            std::process::exit(64)
        })
    };
    let num = |i: usize| -> u64 {
        arg(i).parse().unwrap_or_else(|_| {
            eprintln!("{} is not a number", arg(i));
            std::process::exit(64)
        })
    };
    // One thread for the load: the other core is left to what is measured.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let line = match arg(0) {
        "rate" => rt.block_on(rate(arg(1), num(2), num(3))),
        "rates" => rt.block_on(rates(arg(1), num(2), num(3), num(4))),
        "backlog" => rt.block_on(backlog(
            Path::new(arg(1)),
            arg(2),
            num(3) as u32,
            num(4),
            num(5),
            args.get(6).map(|url| (url.as_str(), num(7) as usize)),
        )),
        "memory" => rt.block_on(memory(Path::new(arg(1)), num(2) as usize)),
        "ledger" => rt.block_on(ledger(arg(1), num(2) as usize, num(3))),
        "scrape" => rt.block_on(scrape(
            Path::new(arg(1)),
            num(2) as usize,
            num(3),
            num(4),
            num(5),
        )),
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(64)
        }
    };
    println!("{line}");
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build_http()
}

/// Sends one request; its status, or `None` when no answer came.
async fn call(
    client: &HttpClient,
    method: Method,
    url: &str,
    body: Bytes,
) -> Option<(StatusCode, Bytes)> {
    let mut req = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", TOKEN)
        .header("user-agent", "crm-quota-proxy-bench/1");
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let resp = client.request(req.body(Full::new(body)).ok()?).await.ok()?;
    let status = resp.status();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_micros()
}

async fn rate(url: &str, per_second: u64, secs: u64) -> String {
    let (mut latencies, errors, elapsed) = paced(url, per_second, secs).await;
    summary(&mut latencies, errors, elapsed)
}

/// `rates`: each URL in turn at the fixed rate for SLICE seconds, SLICES times over, so every
/// target meets the same moments of the machine's noise; one line per URL, its latencies pooled.
async fn rates(urls: &str, per_second: u64, slice: u64, slices: u64) -> String {
    let urls: Vec<&str> = urls.split(',').collect();
    let mut pooled = vec![(Vec::new(), 0, Duration::ZERO); urls.len()];
    for _ in 0..slices {
        for (url, (latencies, errors, spent)) in urls.iter().zip(&mut pooled) {
            let (mut more, failed, took) = paced(url, per_second, slice).await;
            latencies.append(&mut more);
            *errors += failed;
            *spent += took;
        }
    }
    let lines: Vec<String> = urls
        .iter()
        .zip(&mut pooled)
        .map(|(url, (latencies, errors, spent))| {
            format!("url={url} {}", summary(latencies, *errors, *spent))
        })
        .collect();
    lines.join("\n")
}

/// What `rate` and `rates` print for one target: requests, errors, rate achieved over `spent`,
/// and the latencies' percentiles.
fn summary(latencies: &mut [Duration], errors: u64, spent: Duration) -> String {
    latencies.sort();
    format!(
        "requests={} errors={errors} rps={:.0} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
        latencies.len(),
        latencies.len() as f64 / spent.as_secs_f64(),
        percentile(latencies, 50.0),
        percentile(latencies, 90.0),
        percentile(latencies, 99.0),
        percentile(latencies, 99.9),
        latencies.last().map_or(0, Duration::as_micros),
    )
}

/// GETs at `per_second` for `secs`, open loop: each request's latency, how many failed, and the
/// time from the first request's due time to the last answer.
async fn paced(url: &str, per_second: u64, secs: u64) -> (Vec<Duration>, u64, Duration) {
    let client = client();
    // Warm the connection pool (not measured).
    for _ in 0..20 {
        call(&client, Method::GET, url, Bytes::new()).await;
    }
    let total = per_second * secs;
    let interval = Duration::from_secs_f64(1.0 / per_second as f64);
    // Requests are released on time by a thread of their own (a sleeping thread wakes within
    // microseconds; tokio's timer only to the millisecond, which would add up to 1 ms to each).
    let start = Instant::now() + Duration::from_millis(50);
    let handle = tokio::runtime::Handle::current();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let url = url.to_string();
    let releaser = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (client, url) = (client.clone(), url.clone());
            let task = handle.spawn(async move {
                let ok = matches!(
                    call(&client, Method::GET, &url, Bytes::new()).await,
                    Some((s, _)) if s.is_success()
                );
                (ok, due.elapsed())
            });
            if tx.send(task).is_err() {
                return;
            }
        }
    });
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0;
    while let Some(task) = rx.recv().await {
        let (ok, latency) = task.await.expect("request task");
        if !ok {
            errors += 1;
        }
        latencies.push(latency);
    }
    let _ = releaser.join();
    (latencies, errors, start.elapsed())
}

/// The proxy binary on `127.0.0.1:0`, until dropped.
struct Proxy {
    child: Child,
    data: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(bin: &Path, yaml: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config: PathBuf = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml).expect("config");
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn,crm_quota_proxy=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("crm-quota-proxy listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the proxy did not start listening");
        let field = |name: &str| -> String {
            let at = line.find(&format!("{name}=")).expect("address in log") + name.len() + 1;
            line[at..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        Proxy {
            data: format!("http://{}", field("data")),
            admin: format!("http://{}", field("admin")),
            child,
            _dir: dir,
        }
    }

    /// Resident memory, from `/proc`.
    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// The queue's `crm_proxy_queue_bytes` gauge.
    async fn queue_bytes(&self, client: &HttpClient) -> f64 {
        let url = format!("{}/metrics", self.admin);
        let (_, body) = call(client, Method::GET, &url, Bytes::new())
            .await
            .expect("metrics");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("crm_proxy_queue_bytes "))
            .and_then(|v| v.trim().parse().ok())
            .expect("crm_proxy_queue_bytes")
    }

    /// Waits until nothing is queued or being sent.
    async fn drained(&self, client: &HttpClient, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let url = format!("{}/status", self.admin);
        while Instant::now() < deadline {
            if let Some((_, body)) = call(client, Method::GET, &url, Bytes::new()).await {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if v["queue"]["queued"] == 0 && v["queue"]["dispatching"] == 0 {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ticket(subject: &str, pad: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"ticket":{{"subject":"{subject}","comment":{{"body":"{}"}}}}}}"#,
        "x".repeat(pad)
    ))
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn backlog(
    bin: &Path,
    kind: &str,
    limit: u32,
    window_secs: u64,
    windows: u64,
    shared: Option<(&str, usize)>,
) -> String {
    let window = Duration::from_secs(window_secs);
    let sim = Sim::start(SimConfig::new(limit, window))
        .await
        .expect("simulated CRM");
    // As the zendesk preset (sliding, corrected by the CRM's headers), or a fixed window for a
    // CRM whose window boundaries are known (here: aligned to the epoch, as the simulator's).
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
         upstream: {{ url: \"{}\", crm: zendesk }}\n\
         queue: {{ max_entries: 100000 }}\n\
         quotas:\n  - {{ name: account-minute, limit: {limit}, window: {window_secs}s, kind: {kind}, sync: account, margin: 250ms }}\n\
         routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n",
        sim.url()
    );
    let proxies: Vec<Proxy> = match shared {
        None => vec![Proxy::start(bin, &yaml)],
        Some((redis, n)) => {
            let prefix = format!("bench-backlog-{:x}", unix_ns());
            (0..n)
                .map(|r| {
                    let ledger = format!(
                        "ledger: {{ store: redis, url: \"{redis}\", key_prefix: {prefix}, replicas: {n}, replica_id: r{r} }}\n"
                    );
                    Proxy::start(bin, &format!("{yaml}{ledger}"))
                })
                .collect()
        }
    };
    let client = client();
    // Start at a window boundary of the CRM, so the first window is a whole one.
    let w_ns = window.as_nanos() as u64;
    let now = unix_ns();
    tokio::time::sleep(Duration::from_nanos(w_ns - now % w_ns)).await;
    let offered = 3 * u64::from(limit) * windows;
    let interval = window / (3 * limit);
    let start = tokio::time::Instant::now();
    let (parked, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for i in 0..offered {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let proxy = &proxies[i as usize % proxies.len()];
        let (client, url) = (
            client.clone(),
            format!("{}/api/v2/tickets.json", proxy.data),
        );
        let (parked, refused) = (parked.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            match call(&client, Method::POST, &url, ticket(&format!("b-{i}"), 64)).await {
                Some((StatusCode::ACCEPTED, _)) => parked.fetch_add(1, Ordering::Relaxed),
                Some((s, _)) if s.is_success() => 0,
                _ => refused.fetch_add(1, Ordering::Relaxed),
            };
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut drained = true;
    for proxy in &proxies {
        drained &= proxy
            .drained(&client, window * (3 * windows as u32 + 3))
            .await;
    }
    let stats = sim.stats();
    let times = sim.accepted_times();
    let first = times.first().map_or(0, |t| t / w_ns);
    let last = times.last().map_or(0, |t| t / w_ns);
    // Whole windows with a backlog: the first to the one before the last (where it ran out).
    let full: Vec<u64> = (first..last).collect();
    let used = times.iter().filter(|t| *t / w_ns < last).count() as u64;
    let allowed = u64::from(limit) * full.len() as u64;
    let mut delays: Vec<Duration> = (first + 1..=last)
        .filter_map(|k| {
            times
                .iter()
                .find(|t| *t / w_ns == k)
                .map(|t| Duration::from_nanos(t - k * w_ns))
        })
        .collect();
    delays.sort();
    sim.shutdown().await;
    format!(
        "kind={kind} replicas={} offered={offered} parked={} refused={} drained={drained} tickets={} crm_429={} windows={} utilization={:.4} first_call_p50_ms={:.0} first_call_max_ms={:.0}",
        proxies.len(),
        parked.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        stats.tickets,
        stats.throttled,
        full.len(),
        used as f64 / allowed.max(1) as f64,
        delays
            .get(delays.len() / 2)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3),
        delays.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    )
}

/// Parks the writes numbered `range` from 64 concurrent clients; how many got a 202.
async fn park_all(
    client: &HttpClient,
    url: &str,
    range: std::ops::Range<usize>,
    pad: usize,
) -> usize {
    let next = Arc::new(AtomicUsize::new(range.start));
    let parked = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (client, url, next, parked) = (
                client.clone(),
                url.to_string(),
                next.clone(),
                parked.clone(),
            );
            let end = range.end;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        return;
                    }
                    let body = ticket(&format!("m-{i:07}"), pad);
                    if let Some((StatusCode::ACCEPTED, _)) =
                        call(&client, Method::POST, &url, body).await
                    {
                        parked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    parked.load(Ordering::Relaxed)
}

async fn memory(bin: &Path, entries: usize) -> String {
    let sim = Sim::start(SimConfig::new(1, Duration::from_secs(3600)))
        .await
        .expect("simulated CRM");
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
         upstream: {{ url: \"{}\" }}\n\
         max_body_bytes: 4KiB\n\
         queue: {{ max_entries: {}, max_bytes: 4GiB }}\n\
         quotas:\n  - {{ name: calls, limit: 1, window: 1h, margin: 0s }}\n\
         routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n",
        sim.url(),
        entries + 2048
    );
    let proxy = Proxy::start(bin, &yaml);
    let client = client();
    let url = format!("{}/api/v2/tickets.json", proxy.data);
    let body_len = ticket("m-0000000", 0).len();
    let pad = 1024 - body_len;
    // Warm-up (not counted): the one call the quota allows, then 1,024 parked writes over the
    // 64 connections, so connection buffers and every structure exist before the baseline.
    park_all(&client, &url, 0..1024, pad).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proxy.rss_bytes();
    let held_before = proxy.queue_bytes(&client).await;
    let parked = park_all(&client, &url, 1024..1024 + entries, pad).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = proxy.rss_bytes();
    let held = proxy.queue_bytes(&client).await - held_before;
    let per_entry = (after.saturating_sub(before)) as f64 / parked.max(1) as f64;
    // What the queue counts per write: the body, and the request line and headers it keeps
    // to send it (the client's, plus X-Forwarded-*).
    let request = held / parked.max(1) as f64;
    drop(proxy);
    sim.shutdown().await;
    format!(
        "parked={parked} body_bytes=1024 request_head_bytes={:.0} rss_before_mib={:.1} rss_after_mib={:.1} bytes_per_entry={per_entry:.0} overhead_beyond_body={:.0} overhead_beyond_request={:.0}",
        request - 1024.0,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per_entry - 1024.0,
        per_entry - request,
    )
}

/// A `key=value` of a line `rate` printed.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The median of some numbers.
fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

async fn scrape(bin: &Path, entries: usize, per_second: u64, secs: u64, rounds: u64) -> String {
    let sim = Sim::start(SimConfig::new(u32::MAX, Duration::from_secs(60)))
        .await
        .expect("simulated CRM");
    // Creates park (their quota is spent), reads have a budget of their own that never binds.
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
         upstream: {{ url: \"{}\" }}\n\
         max_body_bytes: 4KiB\n\
         queue: {{ max_entries: {}, max_bytes: 4GiB }}\n\
         quotas:\n  - {{ name: creates, limit: 1, window: 1h, margin: 0s, scope: route }}\n  - {{ name: reads, limit: 6000000, window: 1m, scope: route }}\n\
         routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s, quotas: [creates] }}\n  - {{ name: contact-search, methods: [GET], path: /api/v2/search.json, on_limit: reject, quotas: [reads] }}\n",
        sim.url(),
        entries + 16
    );
    let proxy = Proxy::start(bin, &yaml);
    let client = client();
    let url = format!("{}/api/v2/tickets.json", proxy.data);
    let parked = park_all(&client, &url, 0..entries, 256).await;
    let search = format!("{}/api/v2/search.json?query=nothing", proxy.data);
    let (mut quiet, mut scraped, mut took, mut errors) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        let line = rate(&search, per_second, secs).await;
        errors += field(&line, "errors");
        quiet.push(field(&line, "p99_us"));
        // The same load while a scraper reads /metrics and /status every 100 ms.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scraper = {
            let (client, admin, stop) = (client.clone(), proxy.admin.clone(), stop.clone());
            tokio::spawn(async move {
                let mut took = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    for path in ["/metrics", "/status"] {
                        let started = Instant::now();
                        call(
                            &client,
                            Method::GET,
                            &format!("{admin}{path}"),
                            Bytes::new(),
                        )
                        .await;
                        took.push(started.elapsed());
                    }
                }
                took
            })
        };
        let line = rate(&search, per_second, secs).await;
        stop.store(true, Ordering::Relaxed);
        errors += field(&line, "errors");
        scraped.push(field(&line, "p99_us"));
        took.extend(scraper.await.expect("scraper"));
    }
    took.sort();
    drop(proxy);
    sim.shutdown().await;
    let (p99_quiet, p99_scraped) = (median(quiet), median(scraped));
    format!(
        "parked={parked} rate={per_second} rounds={rounds} errors={errors} p99_us_quiet={p99_quiet} p99_us_scraped={p99_scraped} added_pct={:.1} scrapes={} scrape_p50_us={} scrape_p99_us={} scrape_max_us={}",
        (p99_scraped as f64 / p99_quiet.max(1) as f64 - 1.0) * 100.0,
        took.len(),
        percentile(&took, 50.0),
        percentile(&took, 99.0),
        took.last().map_or(0, Duration::as_micros),
    )
}

/// Decisions through the shared ledger: `replicas` ledgers of one account, each deciding in a
/// loop of its own for `secs`.
async fn ledger(redis: &str, replicas: usize, secs: u64) -> String {
    use crm_quota_proxy::clock::SystemClock;
    use crm_quota_proxy::config::Config;
    use crm_quota_proxy::ids::QuotaId;
    use crm_quota_proxy::metrics::Metrics;
    use crm_quota_proxy::quota::{Demand, Ledger};
    use crm_quota_proxy::shared_ledger::{Admission, SharedLedger, demand};

    let prefix = format!("bench-{:x}", unix_ns());
    let mut tasks = Vec::new();
    let start = Instant::now() + Duration::from_millis(200);
    for r in 0..replicas {
        // A minute and a day quota that never bind: what is measured is the round trip.
        let yaml = format!(
            "upstream: {{ url: http://127.0.0.1:9 }}\n\
             ledger: {{ store: redis, url: \"{redis}\", key_prefix: {prefix}, replicas: {replicas}, replica_id: bench-{r} }}\n\
             quotas:\n  - {{ name: minute, limit: 6000000, window: 1m }}\n  - {{ name: day, limit: 60000000, window: 1d, kind: fixed }}\n"
        );
        let config = Config::from_yaml(&yaml, None).expect("bench config");
        let clock = SystemClock::shared();
        let metrics = Arc::new(Metrics::new(
            &["default"],
            &["minute", "day"],
            &[],
            &["default"],
        ));
        let local = Ledger::for_config(&config, clock.now());
        let shared = SharedLedger::new(&config, clock.clone(), metrics).expect("ledger");
        shared.start(&local).await;
        tasks.push(tokio::spawn(async move {
            let quotas = [QuotaId(0), QuotaId(1)];
            let asked = demand(&quotas, &[]);
            tokio::time::sleep_until(start.into()).await;
            let (mut took, mut refused) = (Vec::new(), 0usize);
            while start.elapsed() < Duration::from_secs(secs) {
                let began = Instant::now();
                let now = clock.now();
                let mut grant = local
                    .try_acquire(&Demand::live(&quotas), now)
                    .expect("room");
                if let Admission::Denied { .. } =
                    shared.admit(&local, &asked, &mut grant, now).await
                {
                    refused += 1;
                }
                took.push(began.elapsed());
            }
            (took, refused)
        }));
    }
    let mut took = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (t, r) = t.await.expect("replica");
        took.extend(t);
        refused += r;
    }
    took.sort();
    format!(
        "replicas={replicas} decisions={} refused={refused} per_second={:.0} p50_us={} p99_us={} max_us={}",
        took.len(),
        took.len() as f64 / secs as f64,
        percentile(&took, 50.0),
        percentile(&took, 99.0),
        took.last().map_or(0, Duration::as_micros),
    )
}
