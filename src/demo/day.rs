//! `crm-quota-proxy demo --day`: a licence's day compressed into a minute. Two simulated CRMs
//! with a daily allowance and a short-window cap, two proxies in front of them (one spends the
//! day first come, first served; one releases it to parked writes on a schedule), the same
//! backlog of writes parked at the start of the day and contact searches arriving evenly through
//! it. The summary prints only what was measured.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{HttpClient, Proxied, call};
use crate::sim::{Sim, SimConfig};
use crate::units::format_duration;

#[derive(Debug, Clone)]
pub struct DayOptions {
    /// The length of the simulated "day" and its allowance.
    pub day: Duration,
    pub limit: u32,
    /// The short-window cap beside it (like a licence's per-minute limit).
    pub burst_limit: u32,
    pub burst_window: Duration,
    /// Writes parked at the start of the day, and searches spread evenly through it.
    pub backlog: usize,
    pub searches: usize,
    /// The share of the day released to parked writes at once, in percent.
    pub at_once: u32,
}

impl Default for DayOptions {
    fn default() -> Self {
        DayOptions {
            day: Duration::from_secs(60),
            limit: 120,
            burst_limit: 30,
            burst_window: Duration::from_secs(5),
            backlog: 240,
            searches: 60,
            at_once: 0,
        }
    }
}

/// What one proxy's day measured.
#[derive(Debug, Clone, Default)]
pub struct DayRun {
    pub paced: bool,
    pub searches_answered: usize,
    /// When a search was first refused, seconds into the day.
    pub first_search_refused_at: Option<f64>,
    /// Writes answered 202 (parked) rather than sent at once.
    pub parked: usize,
    /// Tickets the CRM created during the day.
    pub delivered: usize,
    /// Calls the CRM accepted during the day, and when the last of its allowance went.
    pub day_used: usize,
    pub exhausted_at: Option<f64>,
    /// Seconds into the day at which the proxy's forecast, read a quarter into the day, said
    /// the day's allowance runs out (the day's end when it said it lasts).
    pub forecast_at_quarter: Option<f64>,
    pub crm_throttled: u64,
}

#[derive(Debug, Clone, Default)]
pub struct DayReport {
    pub unpaced: DayRun,
    pub paced: DayRun,
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One side of the demo: a simulated CRM and the proxy in front of it.
struct Side {
    paced: bool,
    sim: Sim,
    proxy: Proxied,
}

impl Side {
    async fn start(opts: &DayOptions, paced: bool) -> Result<Side, String> {
        let sim = Sim::start(
            SimConfig::new(opts.burst_limit, opts.burst_window).day(opts.limit, opts.day),
        )
        .await
        .map_err(|e| e.to_string())?;
        let schedule = if paced {
            format!(", schedule: {{ at_once: {}% }}", opts.at_once)
        } else {
            ", forecast: true".to_string()
        };
        let yaml = format!(
            "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\nupstream: {{ url: {url} }}\nquotas:\n  - {{ name: burst, limit: {bl}, window: {bw}, kind: fixed }}\n  - {{ name: day, limit: {l}, window: {d}, kind: fixed{schedule} }}\nfairness: {{ read_reserve: 20% }}\nroutes:\n  - {{ name: bulk-create, methods: [POST], path: /api/v2/tickets.json, max_wait: 0s }}\n  - {{ name: contact-search, methods: [GET], path: /api/v2/search.json, class: read, on_limit: wait, max_wait: 1s }}\n",
            url = sim.url(),
            bl = opts.burst_limit,
            bw = format_duration(opts.burst_window),
            l = opts.limit,
            d = format_duration(opts.day),
        );
        let proxy = Proxied::start(&yaml).await?;
        Ok(Side { paced, sim, proxy })
    }

    /// The day quota's line of `/status`: used, parked writes waiting, forecast.
    async fn look(&self, client: &HttpClient) -> (u64, u64, Option<f64>, f64) {
        let (_, s) = call(
            client,
            Method::GET,
            format!("{}/status", self.proxy.admin),
            "",
        )
        .await;
        let day = |v: &Value| v["quota"] == "day" || v["name"] == "day";
        let used = s["quotas"]
            .as_array()
            .and_then(|q| q.iter().find(|v| day(v)))
            .and_then(|v| v["used"].as_u64())
            .unwrap_or(0);
        let f = s["forecasts"]
            .as_array()
            .and_then(|f| f.iter().find(|v| day(v)))
            .cloned()
            .unwrap_or(Value::Null);
        (
            used,
            s["queue"]["queued"].as_u64().unwrap_or(0),
            f["exhaustion_eta_seconds"].as_f64(),
            f["seconds_to_reset"].as_f64().unwrap_or(0.0),
        )
    }
}

/// Sends the backlog at the start of the day (16 at a time) and the searches evenly through
/// it; returns the writes parked and each search's time into the day and whether it was answered.
async fn traffic(
    client: &HttpClient,
    base: &str,
    opts: &DayOptions,
    start: tokio::time::Instant,
) -> (usize, Vec<(f64, bool)>) {
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (client, base, n) = (client.clone(), base.to_string(), opts.backlog);
            tokio::spawn(async move {
                let mut parked = 0;
                for i in (w..n).step_by(16) {
                    let body = format!(
                        r#"{{"ticket":{{"subject":"backlog {i}","external_id":"backlog-{i}"}}}}"#
                    );
                    let url = format!("{base}/api/v2/tickets.json");
                    let (s, _) = call(&client, Method::POST, url, &body).await;
                    parked += usize::from(s == StatusCode::ACCEPTED);
                }
                parked
            })
        })
        .collect();
    let gap = opts.day / u32::try_from(opts.searches.max(1)).unwrap_or(u32::MAX);
    let searches: Vec<_> = (0..opts.searches)
        .map(|i| {
            let (client, url) = (
                client.clone(),
                format!("{base}/api/v2/search.json?query=caller{i}"),
            );
            let at = start + gap * u32::try_from(i).unwrap_or(u32::MAX) + gap / 2;
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let (s, _) = call(&client, Method::GET, url, "").await;
                (at.duration_since(start).as_secs_f64(), s == StatusCode::OK)
            })
        })
        .collect();
    let mut parked = 0;
    for w in writers {
        parked += w.await.unwrap_or(0);
    }
    let mut answered = Vec::new();
    for s in searches {
        if let Ok(r) = s.await {
            answered.push(r);
        }
    }
    (parked, answered)
}

pub async fn run(opts: DayOptions, out: &mut (impl Write + Send)) -> Result<DayReport, String> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let d = format_duration(opts.day);
    let _ = writeln!(
        out,
        "A simulated CRM allows {} calls per {d} \"day\" and {} per {}. At the start of the day {} writes are parked (a replay after an outage); {} contact searches arrive evenly through it.\nLeft: the proxy spends the day first come, first served. Right: it releases the day to parked writes evenly (schedule: at_once {}%).\n",
        opts.limit,
        opts.burst_limit,
        format_duration(opts.burst_window),
        opts.backlog,
        opts.searches,
        opts.at_once
    );
    let sides = [
        Side::start(&opts, false).await?,
        Side::start(&opts, true).await?,
    ];
    // Both days begin at the next multiple of the day's length (the CRM's and the proxy's
    // fixed windows are aligned to the Unix epoch).
    let day_ns = u64::try_from(opts.day.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    let now = unix_nanos();
    let day_start = (now / day_ns + 1) * day_ns;
    let _ = writeln!(
        out,
        "Waiting {:.0} s for the day to begin.",
        Duration::from_nanos(day_start - now).as_secs_f64()
    );
    let start = tokio::time::Instant::now() + Duration::from_nanos(day_start - now);
    tokio::time::sleep_until(start).await;
    let runs = sides
        .iter()
        .map(|s| {
            let (client, base, opts) = (client.clone(), s.proxy.url.clone(), opts.clone());
            tokio::spawn(async move { traffic(&client, &base, &opts, start).await })
        })
        .collect::<Vec<_>>();
    let mut forecast = [None, None];
    for tick in 1..12u32 {
        tokio::time::sleep_until(start + opts.day * tick / 12).await;
        let mut line = format!("  t={:>5.1}s", (opts.day * tick / 12).as_secs_f64());
        for (i, side) in sides.iter().enumerate() {
            let (used, queued, eta, to_reset) = side.look(&client).await;
            let into = (opts.day * tick / 12).as_secs_f64();
            if tick == 3 {
                forecast[i] = Some(into + eta.unwrap_or(to_reset));
            }
            line.push_str(&format!(
                " | {}: day {used:>3}/{}, parked {queued:>3}, runs out {}",
                if side.paced { "paced" } else { "unpaced" },
                opts.limit,
                eta.map_or("after the day".to_string(), |e| format!(
                    "at {:.0} s",
                    into + e
                )),
            ));
        }
        let _ = writeln!(out, "{line}");
    }
    tokio::time::sleep_until(start + opts.day).await;
    let mut report = DayReport::default();
    for ((side, run), forecast) in sides.iter().zip(runs).zip(forecast) {
        let day = side.sim.accepted_times();
        let in_day: Vec<u64> = day
            .into_iter()
            .filter(|&t| (day_start..day_start + day_ns).contains(&t))
            .collect();
        let stats = side.sim.stats();
        let (parked, searches) = run.await.map_err(|e| e.to_string())?;
        let r = DayRun {
            paced: side.paced,
            searches_answered: searches.iter().filter(|s| s.1).count(),
            first_search_refused_at: searches.iter().find(|s| !s.1).map(|s| s.0),
            parked,
            delivered: in_day.len() - searches.iter().filter(|s| s.1).count(),
            day_used: in_day.len(),
            exhausted_at: (in_day.len() >= opts.limit as usize).then(|| {
                let last = in_day[opts.limit as usize - 1];
                Duration::from_nanos(last - day_start).as_secs_f64()
            }),
            forecast_at_quarter: forecast,
            crm_throttled: stats.throttled,
        };
        if side.paced {
            report.paced = r;
        } else {
            report.unpaced = r;
        }
    }
    let (u, p) = (&report.unpaced, &report.paced);
    let n = opts.searches;
    let at = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.1} s"));
    let _ = writeln!(
        out,
        "\nSummary, unpaced / paced:\n  searches answered: {}/{n} / {}/{n} (first refused at {} / {})\n  backlog delivered during the day: {} / {} of {} (what the searches left: {} / {})\n  day's allowance spent: {}/{l} at {} / {}/{l} at {}\n  forecast a quarter into the day: runs out at {} / {}\n  CRM 429s: {} / {}",
        u.searches_answered,
        p.searches_answered,
        at(u.first_search_refused_at),
        at(p.first_search_refused_at),
        u.delivered,
        p.delivered,
        opts.backlog,
        opts.limit as usize - u.searches_answered,
        opts.limit as usize - p.searches_answered,
        u.day_used,
        at(u.exhausted_at),
        p.day_used,
        at(p.exhausted_at),
        at(u.forecast_at_quarter),
        at(p.forecast_at_quarter),
        u.crm_throttled,
        p.crm_throttled,
        l = opts.limit,
    );
    let _ = writeln!(
        out,
        "The rest of each backlog waits for the next day; the demo ends here (its queues are in memory)."
    );
    for side in sides {
        side.proxy.stop().await;
        side.sim.shutdown().await;
    }
    Ok(report)
}
