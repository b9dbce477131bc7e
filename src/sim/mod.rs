//! A simulated CRM (Zendesk-shaped) for tests, benches and `demo`: it enforces a per-window quota
//! and answers 429 like the real one, stores tickets, counts calls, runs batch jobs
//! (`create_many`, `update_many`, job statuses: see [`jobs`]), and can inject faults.

mod api;
pub mod command;
mod jobs;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Request, Response, StatusCode, header};
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
    /// Whether it has Zendesk's batch endpoints; without, they answer 404 like any unknown path
    /// (a CRM, or a stub, that only knows single calls).
    pub batch_endpoints: bool,
    /// A second, longer allowance (a licence's daily cap): calls per window aligned to
    /// multiples of its length since the Unix epoch; more get 429 until it resets.
    pub day: Option<(u32, Duration)>,
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
            batch_endpoints: true,
            day: None,
        }
    }

    pub fn day(mut self, limit: u32, window: Duration) -> SimConfig {
        self.day = Some((limit, window));
        self
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
    /// Answer with this status and these headers instead of acting, whatever the quota says (a
    /// careless CRM's `Retry-After` or reset headers); a 429 counts as throttled.
    Answer(u16, Vec<(&'static str, String)>),
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
    /// `tickets/show_many` reads (tickets read back for clients waiting on a batch).
    pub ticket_reads: u64,
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
    ticket_reads: u64,
    /// Arrival times (ns since the Unix epoch) of the calls it answered 429 over its quota.
    throttled_at: Vec<u64>,
    calls: u64,
    throttled: u64,
    tickets: BTreeMap<u64, Ticket>,
    next_id: u64,
    faults: VecDeque<Fault>,
    /// Until this time (ns since the epoch) every call meets this fault: an outage.
    outage: Option<(u64, Fault)>,
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
            ticket_reads: self.ticket_reads,
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
        Sim::start_on(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts it on `addr` (the `sim` command).
    pub async fn start_on(cfg: SimConfig, addr: SocketAddr) -> std::io::Result<Sim> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            cfg,
            accepted: Vec::new(),
            others: Vec::new(),
            idempotency: BTreeMap::new(),
            updates_at: BTreeMap::new(),
            ticket_throttled: 0,
            ticket_reads: 0,
            throttled_at: Vec::new(),
            calls: 0,
            throttled: 0,
            tickets: BTreeMap::new(),
            next_id: 1,
            faults: VecDeque::new(),
            outage: None,
            jobs: jobs::Jobs::default(),
        }));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = state.clone();
        let task = tokio::spawn(crate::listener::accept_loop(
            listener,
            crate::listener::ConnLimits::standard(),
            Arc::default(),
            move |_peer, activity: Arc<crate::listener::Activity>| {
                let state = served.clone();
                hyper::service::service_fn(move |req: Request<crate::listener::RequestBody>| {
                    let (state, activity) = (state.clone(), activity.clone());
                    async move {
                        let _busy = activity.begin();
                        handle(state, req).await
                    }
                })
            },
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
            &[],
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

    /// Arrival times (ns since the Unix epoch) of the calls answered 429 over the quota.
    pub fn throttled_times(&self) -> Vec<u64> {
        self.lock().throttled_at.clone()
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

    /// For `length` from now, every call meets `fault` (an outage of the whole CRM).
    pub fn outage(&self, length: Duration, fault: Fault) {
        let until = now_ns() + length.as_nanos() as u64;
        self.lock().outage = Some((until, fault));
    }

    /// Drops the faults not yet used: the CRM answers normally again.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
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
    req: Request<crate::listener::RequestBody>,
) -> Result<Response<Body>, std::io::Error> {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let (fault, latency) = {
        let mut s = lock();
        s.calls += 1;
        let outage = match &s.outage {
            Some((until, f)) if now_ns() < *until => Some(f.clone()),
            _ => None,
        };
        (outage.or_else(|| s.faults.pop_front()), s.cfg.latency)
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
        Some(Fault::Answer(code, headers)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status == StatusCode::TOO_MANY_REQUESTS {
                lock().throttled += 1;
            }
            let mut resp = response::text(status, "injected answer\n");
            for (name, value) in headers {
                if let Ok(v) = http::HeaderValue::from_str(&value) {
                    resp.headers_mut().insert(name, v);
                }
            }
            return Ok(resp);
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
        let day_over = s.cfg.day.and_then(|(day_limit, day)| {
            let w = day.as_nanos() as u64;
            let start = now - now % w;
            let spent = s.accepted.iter().rev().take_while(|&&t| t >= start).count()
                + s.others.iter().rev().take_while(|&&t| t >= start).count();
            (spent >= day_limit as usize).then(|| (start + w - now).div_ceil(1_000_000_000).max(1))
        });
        if let Some(secs) = day_over {
            s.throttled += 1;
            s.throttled_at.push(now);
            drop(s);
            let mut resp = over_limit(flavor, secs);
            rate_headers(
                &mut resp,
                flavor,
                limit,
                limit - used.min(limit),
                reset_secs,
                window,
            );
            return Ok(resp);
        }
        if used >= limit {
            s.throttled += 1;
            s.throttled_at.push(now);
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
    let mut resp = api::route(&state, req).await;
    if matches!(fault, Some(Fault::DropResponse)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected: answer lost after acting",
        ));
    }
    rate_headers(&mut resp, flavor, limit, remaining, reset_secs, window);
    Ok(resp)
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
