//! `crm-quota-proxy demo`: a simulated CRM and the proxy on loopback, a burst of ticket creates
//! and contact searches spread over one window, sent first straight at the CRM, then through the
//! proxy, with a live view and a summary of what was measured.

pub mod day;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::clock::SystemClock;
use crate::config::Config;
use crate::server::{Listeners, serve};
use crate::sim::{Sim, SimConfig};
use crate::units::format_duration;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The simulated CRM's quota per window.
    pub limit: u32,
    pub window: Duration,
    pub creates: usize,
    pub searches: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            limit: 30,
            window: Duration::from_secs(20),
            creates: 75,
            searches: 6,
        }
    }
}

/// What the demo saw, for its summary (and for the test that runs it).
#[derive(Debug, Default)]
pub struct DemoReport {
    pub direct_throttled: usize,
    pub direct_created: usize,
    /// Searches answered 200 during the burst, straight at the CRM and through the proxy.
    pub direct_searches: usize,
    pub proxied_searches: usize,
    pub forwarded: usize,
    pub parked: usize,
    pub delivered: usize,
    pub searches_rejected: usize,
    pub crm_throttled: u64,
    pub tickets: usize,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn call(client: &HttpClient, method: Method, url: String, body: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", "Bearer demo-token")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request");
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(_) => (StatusCode::BAD_GATEWAY, Value::Null),
    }
}

/// Sends the burst at `base` over one window: the creates (POST) and the searches (GET) each
/// spread evenly over it, as agents' contact searches keep coming during a burst of writes.
async fn burst(
    client: &HttpClient,
    base: &str,
    opts: &DemoOptions,
    tag: &str,
) -> Vec<(bool, StatusCode, Value)> {
    let spread = |n: usize| opts.window / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    let creates = (0..opts.creates).map(|i| {
        let body =
            format!(r#"{{"ticket":{{"subject":"{tag} call {i}","external_id":"{tag}-{i}"}}}}"#);
        (Method::POST, format!("{base}/api/v2/tickets.json"), body)
    });
    let searches = (0..opts.searches).map(|i| {
        let url = format!("{base}/api/v2/search.json?query=caller{i}");
        (Method::GET, url, String::new())
    });
    let senders = [
        (creates.collect::<Vec<_>>(), spread(opts.creates)),
        (searches.collect(), spread(opts.searches)),
    ]
    .map(|(calls, gap)| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for (i, (method, url, body)) in calls.into_iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    let write = method == Method::POST;
                    let (s, v) = call(&client, method, url, &body).await;
                    (write, s, v)
                }));
            }
            tasks
        })
    });
    let mut out = Vec::new();
    for sender in senders {
        for t in sender.await.unwrap_or_default() {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
    }
    out
}

/// Searches of a burst's results answered 200.
fn searches_answered(results: &[(bool, StatusCode, Value)]) -> usize {
    results
        .iter()
        .filter(|r| !r.0 && r.1 == StatusCode::OK)
        .count()
}

pub async fn run(opts: DemoOptions, out: &mut (impl Write + Send)) -> Result<DemoReport, String> {
    let mut report = DemoReport::default();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let w = format_duration(opts.window);
    let _ = writeln!(
        out,
        "A simulated CRM allows {} calls per {w}. The burst, spread over {w}: {} ticket creates and {} contact searches.\n",
        opts.limit, opts.creates, opts.searches
    );

    // 1. Straight at the CRM.
    let direct = Sim::start(SimConfig::new(opts.limit, opts.window))
        .await
        .map_err(|e| e.to_string())?;
    let results = burst(&client, &direct.url(), &opts, "direct").await;
    report.direct_throttled = results
        .iter()
        .filter(|r| r.1 == StatusCode::TOO_MANY_REQUESTS)
        .count();
    report.direct_created = direct.stats().tickets;
    report.direct_searches = searches_answered(&results);
    let _ = writeln!(
        out,
        "Without the proxy: {} of {} calls got 429; {} of {} tickets exist; {} of {} searches answered.\n",
        report.direct_throttled,
        results.len(),
        report.direct_created,
        opts.creates,
        report.direct_searches,
        opts.searches
    );
    direct.shutdown().await;

    // 2. Through the proxy.
    let sim = Sim::start(SimConfig::new(opts.limit, opts.window))
        .await
        .map_err(|e| e.to_string())?;
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\nupstream: {{ url: {url} }}\ndefault_max_wait: 2s\nquotas:\n  - {{ name: crm, limit: {limit}, window: {w} }}\nfairness: {{ read_reserve: {reserve}% }}\nroutes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json }}\n  - {{ name: contact-search, methods: [GET], path: /api/v2/search.json, class: read, on_limit: wait, max_wait: 1s }}\n",
        url = sim.url(),
        limit = opts.limit,
        reserve = read_reserve(&opts),
    );
    let proxy = Proxied::start(&yaml).await?;
    let (proxy_url, admin_url) = (proxy.url.clone(), proxy.admin.clone());
    let _ = writeln!(
        out,
        "With the proxy ({proxy_url}, status at {admin_url}/status):"
    );
    let started = tokio::time::Instant::now();
    let results = burst(&client, &proxy_url, &opts, "proxied").await;
    report.forwarded = results
        .iter()
        .filter(|r| r.0 && r.1 == StatusCode::CREATED)
        .count();
    let parked: Vec<String> = results
        .iter()
        .filter(|r| r.1 == StatusCode::ACCEPTED)
        .filter_map(|r| r.2["id"].as_str().map(str::to_string))
        .collect();
    report.parked = parked.len();
    report.searches_rejected = results
        .iter()
        .filter(|r| !r.0 && r.1 == StatusCode::TOO_MANY_REQUESTS)
        .count();
    report.proxied_searches = searches_answered(&results);
    let _ = writeln!(
        out,
        "  {} creates answered 201, {} parked with 202; {} of {} searches answered, {} answered 429 with Retry-After.",
        report.forwarded,
        report.parked,
        report.proxied_searches,
        opts.searches,
        report.searches_rejected
    );

    // 3. Live view until every parked write is delivered.
    loop {
        let (_, status) = call(&client, Method::GET, format!("{admin_url}/status"), "").await;
        let queued = status["queue"]["queued"].as_u64().unwrap_or(0);
        let sending = status["queue"]["dispatching"].as_u64().unwrap_or(0);
        let stats = sim.stats();
        let _ = writeln!(
            out,
            "  t={:>3}s  CRM accepted {:>3} | CRM 429s {} | parked waiting {:>3} | tickets {:>3}/{}",
            started.elapsed().as_secs(),
            stats.accepted,
            stats.throttled,
            queued,
            stats.tickets,
            opts.creates
        );
        if queued == 0 && sending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for id in &parked {
        let (_, v) = call(
            &client,
            Method::GET,
            format!("{proxy_url}/_proxy/requests/{id}"),
            "",
        )
        .await;
        if v["status"] == "done" && v["response"]["status"] == 201 {
            report.delivered += 1;
        }
    }
    let stats = sim.stats();
    report.crm_throttled = stats.throttled;
    report.tickets = stats.tickets;
    let n = opts.searches;
    let _ = writeln!(
        out,
        "\nSummary, straight to the CRM / through the proxy:\n  searches answered during the burst: {}/{n} / {}/{n}\n  tickets created: {}/{c} / {}/{c} ({} of them delivered after a 202)\n  CRM 429s: {} / {}; most calls in one CRM window through the proxy: {} (limit {}).",
        report.direct_searches,
        report.proxied_searches,
        report.direct_created,
        report.tickets,
        report.delivered,
        report.direct_throttled,
        report.crm_throttled,
        stats.max_in_fixed_window,
        opts.limit,
        c = opts.creates,
    );
    proxy.stop().await;
    sim.shutdown().await;
    Ok(report)
}

/// The proxy serving a config on loopback, until [`Proxied::stop`].
struct Proxied {
    url: String,
    admin: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<crate::server::Stopped, crate::server::Failure>>,
}

impl Proxied {
    async fn start(yaml: &str) -> Result<Proxied, String> {
        let config = Config::from_yaml(yaml, None).map_err(|e| e.to_string())?;
        let listeners = Listeners::bind(&config).await.map_err(|e| e.to_string())?;
        let addr = |l: &tokio::net::TcpListener| {
            l.local_addr()
                .map(|a| format!("http://{a}"))
                .map_err(|e| e.to_string())
        };
        let (url, admin) = (addr(&listeners.data)?, addr(&listeners.admin)?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            config,
            listeners,
            Arc::new(SystemClock::new()),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Proxied {
            url,
            admin,
            stop,
            server,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}

/// The share of each window the proxy keeps for the demo's searches: what they take of the
/// budget, rounded up to whole percents, so the writes' burst cannot crowd them out.
fn read_reserve(opts: &DemoOptions) -> u64 {
    let limit = u64::from(opts.limit.max(1));
    (opts.searches as u64 * 100).div_ceil(limit).clamp(1, 50)
}
