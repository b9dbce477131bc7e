//! `crm-quota-proxy demo`: a simulated CRM and the proxy on loopback, a burst of ticket creates
//! and contact searches sent first straight at the CRM, then through the proxy, with a live view.

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
            searches: 15,
        }
    }
}

/// What the demo saw, for its summary (and for the test that runs it).
#[derive(Debug, Default)]
pub struct DemoReport {
    pub direct_throttled: usize,
    pub direct_created: usize,
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

/// Sends the burst at `base`: creates (POST) and searches (GET), all at once.
async fn burst(
    client: &HttpClient,
    base: &str,
    opts: &DemoOptions,
    tag: &str,
) -> Vec<(bool, StatusCode, Value)> {
    let mut tasks = Vec::new();
    for i in 0..opts.creates {
        let (client, url) = (client.clone(), format!("{base}/api/v2/tickets.json"));
        let body =
            format!(r#"{{"ticket":{{"subject":"{tag} call {i}","external_id":"{tag}-{i}"}}}}"#);
        tasks.push(tokio::spawn(async move {
            let (s, v) = call(&client, Method::POST, url, &body).await;
            (true, s, v)
        }));
    }
    for i in 0..opts.searches {
        let (client, url) = (
            client.clone(),
            format!("{base}/api/v2/search.json?query=caller{i}"),
        );
        tasks.push(tokio::spawn(async move {
            let (s, v) = call(&client, Method::GET, url, "").await;
            (false, s, v)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await {
            out.push(r);
        }
    }
    out
}

pub async fn run(opts: DemoOptions, out: &mut (impl Write + Send)) -> Result<DemoReport, String> {
    let mut report = DemoReport::default();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let w = format_duration(opts.window);
    let _ = writeln!(
        out,
        "A simulated CRM allows {} calls per {w}. The burst: {} ticket creates and {} contact searches at once.\n",
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
    let _ = writeln!(
        out,
        "Without the proxy: {} of {} calls got 429; only {} of {} tickets exist. The rest are lost unless the platform retries.\n",
        report.direct_throttled,
        results.len(),
        report.direct_created,
        opts.creates
    );
    direct.shutdown().await;

    // 2. Through the proxy.
    let sim = Sim::start(SimConfig::new(opts.limit, opts.window))
        .await
        .map_err(|e| e.to_string())?;
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\nupstream: {{ url: {url} }}\ndefault_max_wait: 2s\nquotas:\n  - {{ name: crm, limit: {limit}, window: {w} }}\nroutes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json }}\n  - {{ name: search, methods: [GET], path: /api/v2/search.json }}\n",
        url = sim.url(),
        limit = opts.limit,
    );
    let config = Config::from_yaml(&yaml, None).map_err(|e| e.to_string())?;
    let listeners = Listeners::bind(&config).await.map_err(|e| e.to_string())?;
    let proxy_url = format!(
        "http://{}",
        listeners.data.local_addr().map_err(|e| e.to_string())?
    );
    let admin_url = format!(
        "http://{}",
        listeners.admin.local_addr().map_err(|e| e.to_string())?
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        config,
        listeners,
        Arc::new(SystemClock::new()),
        async move {
            let _ = stopped.await;
        },
    ));
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
    let _ = writeln!(
        out,
        "  {} creates answered 201 (some after a short wait for quota), {} parked with 202, {} searches answered 429 at once with Retry-After.",
        report.forwarded, report.parked, report.searches_rejected
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
    let _ = writeln!(
        out,
        "\nSummary: {} of {} tickets created ({} parked writes delivered after 202), CRM 429s: {}, most calls in one CRM window: {} (limit {}).",
        report.tickets,
        opts.creates,
        report.delivered,
        report.crm_throttled,
        stats.max_in_fixed_window,
        opts.limit
    );
    let _ = stop.send(());
    let _ = server.await;
    sim.shutdown().await;
    Ok(report)
}
