//! A simulated CRM (Zendesk-shaped) for tests, benches and `demo`: it enforces a per-window quota
//! and answers 429 like the real one, stores tickets, counts calls, runs batch jobs
//! (`create_many`, `update_many`, job statuses: see [`jobs`]), and can inject faults.

mod jobs;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::response::{self, Body};

/// How the simulated CRM counts its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimWindow {
    /// Windows aligned to multiples of the window length since the Unix epoch (like Zendesk's minute).
    Fixed,
    /// Any interval of the window's length.
    Sliding,
}

/// Which CRM's headers and over-limit answer the simulator imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimFlavor {
    /// `X-Rate-Limit(-Remaining)`, `ratelimit-*`; 429 + `Retry-After` over the limit.
    Zendesk,
    /// `Sforce-Limit-Info: api-usage=u/l`; 403 `REQUEST_LIMIT_EXCEEDED` over the limit, no reset.
    Salesforce,
    /// `X-HubSpot-RateLimit-*`; 429 JSON with `policyName: TEN_SECONDLY_ROLLING`, no Retry-After.
    HubSpot,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Calls accepted per window; more are refused.
    pub limit: u32,
    pub window: Duration,
    pub kind: SimWindow,
    pub flavor: SimFlavor,
    /// Added before every answer.
    pub latency: Duration,
    /// Like Zendesk's 30 updates per 10 minutes per ticket: updates allowed per ticket in any
    /// interval of this length; more get 429.
    pub per_ticket: Option<(u32, Duration)>,
    /// How long a batch job takes before its results are readable.
    pub job_delay: Duration,
    /// Batch jobs queued or running at once (Zendesk: 30); more get 429 `TooManyJobs`.
    pub max_jobs: usize,
    /// Jobs (numbered from 1 in the order their batch calls arrive) that fail as a whole,
    /// applying nothing.
    pub fail_jobs: Vec<u64>,
}

impl SimConfig {
    pub fn new(limit: u32, window: Duration) -> SimConfig {
        SimConfig {
            limit,
            window,
            kind: SimWindow::Fixed,
            flavor: SimFlavor::Zendesk,
            latency: Duration::ZERO,
            per_ticket: None,
            job_delay: Duration::from_millis(200),
            max_jobs: 30,
            fail_jobs: Vec::new(),
        }
    }

    pub fn per_ticket(mut self, limit: u32, window: Duration) -> SimConfig {
        self.per_ticket = Some((limit, window));
        self
    }

    pub fn flavor(mut self, flavor: SimFlavor) -> SimConfig {
        self.flavor = flavor;
        self
    }

    pub fn kind(mut self, kind: SimWindow) -> SimConfig {
        self.kind = kind;
        self
    }
}

/// A fault applied to one upcoming API call (in order).
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (e.g. 500, 503) without acting; the call still counts.
    Status(u16),
    /// Close the connection without answering, before acting.
    Reset,
    /// Act (e.g. create the ticket), then close the connection without answering: the answer
    /// is lost after the CRM applied the write.
    DropResponse,
    /// Wait this long before answering.
    Delay(Duration),
    /// Answer normally (to interleave faults with successes).
    Pass,
}

/// A ticket the simulated CRM stored.
#[derive(Debug, Clone, Serialize)]
pub struct Ticket {
    pub id: u64,
    pub subject: String,
    pub external_id: Option<String>,
    /// Bodies of the updates it received, in arrival order.
    pub updates: Vec<Value>,
}

/// Counters for assertions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimStats {
    /// Every API call received.
    pub calls: u64,
    /// Calls accepted within the quota.
    pub accepted: u64,
    /// Calls answered 429.
    pub throttled: u64,
    /// Most accepted calls seen in one fixed (epoch-aligned) window.
    pub max_in_fixed_window: u32,
    /// Most accepted calls in any interval of the window's length.
    pub max_in_sliding_window: u32,
    pub tickets: usize,
    /// Ticket updates answered 429 by the per-ticket limit.
    pub ticket_throttled: u64,
    /// Accepted `create_many` / `update_many` calls, and job status polls.
    pub batch_calls: u64,
    pub job_polls: u64,
}

struct State {
    cfg: SimConfig,
    /// Arrival times (ns since the Unix epoch) of accepted calls.
    accepted: Vec<u64>,
    /// Times of calls other apps made directly (they count against the same quota).
    others: Vec<u64>,
    /// Idempotency keys seen on creates, with the ticket each created.
    idempotency: BTreeMap<String, u64>,
    /// Arrival times of accepted updates, per ticket.
    updates_at: BTreeMap<u64, Vec<u64>>,
    ticket_throttled: u64,
    calls: u64,
    throttled: u64,
    tickets: BTreeMap<u64, Ticket>,
    next_id: u64,
    faults: VecDeque<Fault>,
    jobs: jobs::Jobs,
}

fn now_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    )
    .unwrap_or(u64::MAX)
}

impl State {
    fn window_ns(&self) -> u64 {
        self.cfg.window.as_nanos() as u64
    }

    /// Calls counted against the window that `now` falls in, and when that count next drops.
    /// Calls counted (ours and other apps') in the window `now` falls in, and when that
    /// count next drops.
    fn used(&self, now: u64) -> (u32, u64) {
        let w = self.window_ns();
        let live = |times: &[u64], from: u64| -> Vec<u64> {
            times
                .iter()
                .rev()
                .take_while(|&&t| t >= from)
                .copied()
                .collect()
        };
        match self.cfg.kind {
            SimWindow::Fixed => {
                let start = now - now % w;
                let n = live(&self.accepted, start).len() + live(&self.others, start).len();
                (n as u32, start + w)
            }
            SimWindow::Sliding => {
                let from = (now + 1).saturating_sub(w);
                let mut all = live(&self.accepted, from);
                all.extend(live(&self.others, from));
                let reset = all.iter().min().map_or(now, |t| t + w);
                (all.len() as u32, reset)
            }
        }
    }

    fn stats(&self) -> SimStats {
        let w = self.window_ns();
        let mut per_window: BTreeMap<u64, u32> = BTreeMap::new();
        for t in &self.accepted {
            *per_window.entry(t - t % w).or_default() += 1;
        }
        let mut max_sliding = 0usize;
        let mut lo = 0;
        for hi in 0..self.accepted.len() {
            while self.accepted[hi] >= self.accepted[lo] + w {
                lo += 1;
            }
            max_sliding = max_sliding.max(hi - lo + 1);
        }
        SimStats {
            calls: self.calls,
            accepted: self.accepted.len() as u64,
            throttled: self.throttled,
            max_in_fixed_window: per_window.values().copied().max().unwrap_or(0),
            max_in_sliding_window: max_sliding as u32,
            tickets: self.tickets.len(),
            ticket_throttled: self.ticket_throttled,
            batch_calls: self.jobs.batch_calls,
            job_polls: self.jobs.polls,
        }
    }
}

/// A running simulated CRM on `127.0.0.1:0`.
pub struct Sim {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Sim {
    /// Binds `127.0.0.1:0` and serves until [`Sim::shutdown`] (or drop).
    pub async fn start(cfg: SimConfig) -> std::io::Result<Sim> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            cfg,
            accepted: Vec::new(),
            others: Vec::new(),
            idempotency: BTreeMap::new(),
            updates_at: BTreeMap::new(),
            ticket_throttled: 0,
            calls: 0,
            throttled: 0,
            tickets: BTreeMap::new(),
            next_id: 1,
            faults: VecDeque::new(),
            jobs: jobs::Jobs::default(),
        }));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = state.clone();
        let task = tokio::spawn(crate::server::accept_loop(
            listener,
            move |_peer| {
                let state = served.clone();
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    handle(state, req)
                })
            },
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        Ok(Sim {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> SimStats {
        let mut s = self.lock();
        jobs::run_due(&mut s, now_ns());
        s.stats()
    }

    pub fn tickets(&self) -> Vec<Ticket> {
        let mut s = self.lock();
        jobs::run_due(&mut s, now_ns());
        s.tickets.values().cloned().collect()
    }

    /// Arrival times (ns since the Unix epoch) of every call accepted within the quota.
    pub fn accepted_times(&self) -> Vec<u64> {
        self.lock().accepted.clone()
    }

    /// Another app spends `n` calls directly on the CRM, now.
    pub fn spend_elsewhere(&self, n: u32) {
        let now = now_ns();
        self.lock()
            .others
            .extend(std::iter::repeat_n(now, n as usize));
    }

    /// Arrival times (ns since the Unix epoch) of the updates a ticket accepted (per-ticket limit only).
    pub fn update_times(&self, ticket: u64) -> Vec<u64> {
        self.lock()
            .updates_at
            .get(&ticket)
            .cloned()
            .unwrap_or_default()
    }

    /// Queues faults for the next API calls, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.extend(faults);
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Sets the Zendesk-style account headers on a response.
/// Sets the flavor's rate-limit headers on a response.
fn rate_headers(
    resp: &mut Response<Body>,
    flavor: SimFlavor,
    limit: u32,
    remaining: u32,
    reset_secs: u64,
    window: Duration,
) {
    let h = resp.headers_mut();
    match flavor {
        SimFlavor::Zendesk => {
            h.insert("x-rate-limit", HeaderValue::from(limit));
            h.insert("x-rate-limit-remaining", HeaderValue::from(remaining));
            h.insert("ratelimit-limit", HeaderValue::from(limit));
            h.insert("ratelimit-remaining", HeaderValue::from(remaining));
            h.insert("ratelimit-reset", HeaderValue::from(reset_secs));
        }
        SimFlavor::Salesforce => {
            let usage = format!("api-usage={}/{limit}", limit - remaining);
            h.insert(
                "sforce-limit-info",
                HeaderValue::from_str(&usage).expect("ascii"),
            );
        }
        SimFlavor::HubSpot => {
            h.insert("x-hubspot-ratelimit-max", HeaderValue::from(limit));
            h.insert(
                "x-hubspot-ratelimit-remaining",
                HeaderValue::from(remaining),
            );
            h.insert(
                "x-hubspot-ratelimit-interval-milliseconds",
                HeaderValue::from(window.as_millis() as u64),
            );
        }
    }
}

/// The flavor's over-limit answer.
fn over_limit(flavor: SimFlavor, reset_secs: u64) -> Response<Body> {
    match flavor {
        SimFlavor::Zendesk => {
            let mut resp = response::text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests\n");
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(reset_secs));
            resp
        }
        SimFlavor::Salesforce => response::json_response(
            StatusCode::FORBIDDEN,
            &json!([{ "message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED" }]),
        ),
        SimFlavor::HubSpot => response::json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({ "status": "error", "message": "You have reached your ten_secondly_rolling limit.",
                     "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING" }),
        ),
    }
}

/// Answers one call; an `Err` makes hyper close the connection without a response.
async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let (fault, latency) = {
        let mut s = lock();
        s.calls += 1;
        (s.faults.pop_front(), s.cfg.latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Reset) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "injected reset",
            ));
        }
        _ => {}
    }
    // Quota check at arrival, like the CRM.
    let now = now_ns();
    let (flavor, window) = {
        let s = lock();
        (s.cfg.flavor, s.cfg.window)
    };
    let (limit, remaining, reset_secs) = {
        let mut s = lock();
        let (used, reset_at) = s.used(now);
        let limit = s.cfg.limit;
        let reset_secs = (reset_at.saturating_sub(now))
            .div_ceil(1_000_000_000)
            .max(1);
        if used >= limit {
            s.throttled += 1;
            drop(s);
            let mut resp = over_limit(flavor, reset_secs);
            rate_headers(&mut resp, flavor, limit, 0, reset_secs, window);
            return Ok(resp);
        }
        s.accepted.push(now);
        (limit, limit - used - 1, reset_secs)
    };
    if let Some(Fault::Status(code)) = fault {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = response::text(status, "injected fault\n");
        rate_headers(&mut resp, flavor, limit, remaining, reset_secs, window);
        return Ok(resp);
    }
    let mut resp = route(&state, req).await;
    if matches!(fault, Some(Fault::DropResponse)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected: answer lost after acting",
        ));
    }
    rate_headers(&mut resp, flavor, limit, remaining, reset_secs, window);
    Ok(resp)
}

async fn route(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path.starts_with("/echo") {
        return echo(req).await;
    }
    let idempotency_key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let trimmed = path.trim_end_matches(".json");
    let segments: Vec<&str> = trimmed.trim_start_matches('/').split('/').collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(resp) = jobs::route(&mut lock(), &method, &segments, &query, &body) {
        return resp;
    }
    match (&method, segments.as_slice()) {
        (&Method::POST, ["api", "v2", "tickets"]) => {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return response::json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "InvalidJSON"}),
                );
            };
            let t = &v["ticket"];
            let (ticket, lookup) = create(
                &mut lock(),
                t["subject"].as_str().unwrap_or_default(),
                t["external_id"].as_str(),
                idempotency_key.as_deref(),
            );
            let mut resp =
                response::json_response(StatusCode::CREATED, &json!({ "ticket": ticket }));
            if let Ok(loc) = HeaderValue::from_str(&format!("/api/v2/tickets/{}.json", ticket.id)) {
                resp.headers_mut().insert(header::LOCATION, loc);
            }
            if let Some(lookup) = lookup {
                resp.headers_mut()
                    .insert("x-idempotency-lookup", HeaderValue::from_static(lookup));
            }
            resp
        }
        (&Method::POST, ["services", "data", _, "sobjects", "Case"]) => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let (ticket, _) = create(
                &mut lock(),
                v["Subject"].as_str().unwrap_or_default(),
                None,
                None,
            );
            response::json_response(
                StatusCode::CREATED,
                &json!({ "id": format!("500{:012}", ticket.id), "success": true, "errors": [] }),
            )
        }
        (&Method::GET, ["api", "v2", "tickets", id]) => match id
            .parse::<u64>()
            .ok()
            .and_then(|id| lock().tickets.get(&id).cloned())
        {
            Some(t) => response::json_response(StatusCode::OK, &json!({ "ticket": t })),
            None => {
                response::json_response(StatusCode::NOT_FOUND, &json!({"error": "RecordNotFound"}))
            }
        },
        (&Method::PUT, ["api", "v2", "tickets", id]) => {
            let update: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut s = lock();
            if let (Some((limit, window)), Ok(tid)) = (s.cfg.per_ticket, id.parse::<u64>()) {
                let now = now_ns();
                let w = window.as_nanos() as u64;
                let times = s.updates_at.entry(tid).or_default();
                let live: Vec<u64> = times.iter().copied().filter(|&t| t + w > now).collect();
                if live.len() >= limit as usize {
                    let retry = (live[0] + w - now).div_ceil(1_000_000_000).max(1);
                    s.ticket_throttled += 1;
                    let mut resp = response::text(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Too many updates to this ticket\n",
                    );
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
                    return resp;
                }
                times.push(now);
            }
            match id.parse::<u64>().ok().and_then(|id| s.tickets.get_mut(&id)) {
                Some(t) => {
                    t.updates.push(update);
                    let t = t.clone();
                    response::json_response(StatusCode::OK, &json!({ "ticket": t }))
                }
                None => response::json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "RecordNotFound"}),
                ),
            }
        }
        (&Method::GET, ["api", "v2", "search"]) => {
            let s = lock();
            let needle = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("query="))
                .unwrap_or("");
            let results: Vec<&Ticket> = s
                .tickets
                .values()
                .filter(|t| !needle.is_empty() && t.subject.contains(needle))
                .collect();
            response::json_response(
                StatusCode::OK,
                &json!({ "results": results, "count": results.len() }),
            )
        }
        _ => response::json_response(StatusCode::NOT_FOUND, &json!({"error": "InvalidEndpoint"})),
    }
}

/// Creates a ticket, unless `key` already created one (then that one, like Zendesk's
/// `x-idempotency-lookup: hit`). The lookup header value is `None` when no key was sent.
fn create(
    s: &mut State,
    subject: &str,
    external_id: Option<&str>,
    key: Option<&str>,
) -> (Ticket, Option<&'static str>) {
    if let Some(id) = key.and_then(|k| s.idempotency.get(k)) {
        return (s.tickets[id].clone(), Some("hit"));
    }
    let id = s.next_id;
    s.next_id += 1;
    let ticket = Ticket {
        id,
        subject: subject.to_string(),
        external_id: external_id.map(str::to_string),
        updates: Vec::new(),
    };
    s.tickets.insert(id, ticket.clone());
    if let Some(k) = key {
        s.idempotency.insert(k.to_string(), id);
    }
    (ticket, key.map(|_| "miss"))
}

/// `/echo/...`: describes the request it got. `?status=N` sets the status, `?bytes=N` answers N
/// bytes in 16 KiB chunks (no Content-Length), `?delay_ms=N` waits first.
async fn echo(req: Request<Incoming>) -> Response<Body> {
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(ms) = query.get("delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = query
        .get("status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(n) = query.get("bytes").and_then(|v| v.parse::<usize>().ok()) {
        let body = Chunked { left: n, sent: 0 };
        let mut resp = Response::new(body.map_err(|never| match never {}).boxed());
        *resp.status_mut() = status;
        return resp;
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().map(str::to_string);
    let headers: BTreeMap<String, Vec<String>> = req
        .headers()
        .keys()
        .map(|k| {
            (
                k.to_string(),
                req.headers()
                    .get_all(k)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &body);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut resp = response::json_response(
        status,
        &json!({
            "method": method,
            "path": path,
            "query": raw_query,
            "headers": headers,
            "body_len": body.len(),
            "body_sha256": hex,
        }),
    );
    resp.headers_mut()
        .insert("x-echo", HeaderValue::from_static("1"));
    resp
}

/// A body of `left` bytes made on demand in 16 KiB frames, with no length announced (chunked).
/// Byte `i` of the body is `b'a' + (i / 16384) % 26`.
struct Chunked {
    left: usize,
    sent: usize,
}

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        const CHUNK: usize = 16 * 1024;
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let len = self.left.min(CHUNK);
        let fill = b'a' + ((self.sent / CHUNK) % 26) as u8;
        self.left -= len;
        self.sent += len;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![fill; len])))))
    }
}
