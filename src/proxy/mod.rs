//! The running proxy's shared state: config, clock, ledger, routes, queue, upstream client and
//! metrics, which the data plane, the dispatcher and the admin listener all use; what a CRM
//! answer teaches the ledger; and the views of clients and keys that `/status` and metrics show.

mod views;
pub use views::{ClientQuotaView, ClientView, KeysView};

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use http::{HeaderMap, StatusCode};
use serde::Serialize;
use std::hash::{BuildHasher, RandomState};

use crate::admin_guard::AdminGuard;
use crate::breaker::Breaker;
use crate::client::Clients;
use crate::clock::{SharedClock, Time};
use crate::config::{Class, Config, DEFAULT_ROUTE, QueueConfig};
use crate::credentials::Credentials;
use crate::crm::{Observation, Throttle};
use crate::frames;
use crate::ids::QuotaId;
use crate::intake::Intake;
use crate::listener::ListenerStats;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::quota::{Grant, Ledger, PauseBounds};
use crate::route::{Route, RouteTable};
use crate::shared_ledger::{Admission, SharedLedger};
use crate::store::{GrantLog, Store};
use crate::upstream::UpstreamClient;
use crate::verdict::{self, Attempt, Policy, Verdict};
use ring::digest;
use std::path::{Path, PathBuf};

/// Sets the log filter of the running process.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where a reload reads the config from, and how it sets the log level.
pub struct Reloader {
    pub path: PathBuf,
    pub log_level: Option<SetLogLevel>,
}

/// The config in force: the hash of the file it came from and when it was loaded.
#[derive(Debug, Clone, Serialize)]
pub struct Loaded {
    pub sha256: Option<String>,
    pub loaded_at: String,
}

/// The SHA-256 of a config file, hex.
pub fn file_hash(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let d = digest::digest(&digest::SHA256, &bytes);
    Some(d.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// A number in `[0, 1)` for backoff jitter: spread, not secret, so no system call is spent on
/// it. A xorshift generator per thread, seeded once from a `RandomState` (fresh keys each), as
/// the verdict on every CRM answer asks for one and a hash each time cost 300 instructions.
fn jitter() -> f64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(RandomState::new().hash_one(0u8) | 1);
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// Where the proxy is in its life, as `/readyz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Restoring parked writes from the store; no data traffic yet.
    Starting = 0,
    Ready = 1,
    /// Shutdown began: no new connections or parked writes.
    Stopping = 2,
}

/// Everything the data plane, the dispatcher and the admin endpoints share.
pub struct Proxy {
    /// The config in force (a reload replaces it; see [`Proxy::config`]).
    config: Live<Config>,
    /// Who may use the admin listener (the token is read at start).
    pub admin_guard: AdminGuard,
    pub clock: SharedClock,
    pub ledger: Ledger,
    /// Shared with the queue.
    routes: Arc<Live<RouteTable>>,
    pub queue: Arc<Queue>,
    upstream: Live<UpstreamClient>,
    pub metrics: Arc<Metrics>,
    clients: Live<Clients>,
    /// Where grants are decided: this process alone, or a ledger every replica shares.
    pub shared: SharedLedger,
    /// Where the local ledger's grants are kept across restarts (disk store, local ledger).
    pub grant_log: Option<Arc<GrantLog>>,
    /// Request bodies being read and requests waiting for a processing slot.
    pub intake: Intake,
    /// Pauses the drain while the CRM fails as a whole.
    pub breaker: Breaker,
    /// Which request parts carry credentials (owners of parked writes, redaction).
    pub credentials: Credentials,
    /// Connections of the data and the admin listener.
    pub data_conns: Arc<ListenerStats>,
    pub admin_conns: Arc<ListenerStats>,
    /// Starting (the queue is being restored), ready, or stopping: `/readyz` answers it.
    phase: AtomicU8,
    /// Requests the data listener has taken: the access log's sample is spread evenly by it.
    pub access_seq: AtomicU64,
    /// Where a reload reads the config (set when started from a file).
    reloader: std::sync::OnceLock<Reloader>,
    /// The config in force: its file's hash and when it was loaded.
    loaded: Live<Loaded>,
}

impl Proxy {
    /// A proxy keeping its parked writes in `store` (opened by the caller: see [`crate::serve`]).
    pub fn new(config: Config, clock: SharedClock, store: Store) -> Result<Proxy, String> {
        let upstream = UpstreamClient::new(&config.upstream, clock.clone())?;
        let routes = RouteTable::new(&config);
        let quota_names: Vec<&str> = config.quotas.iter().map(|q| q.name.as_str()).collect();
        let lane_names: Vec<&str> = routes.lanes().iter().map(|l| l.name.as_str()).collect();
        let clients = Clients::new(config.clients.clone());
        let metrics = Arc::new(Metrics::new(
            &routes.names(),
            &quota_names,
            &lane_names,
            &clients.names(),
        ));
        let crm = config.upstream.crm;
        metrics.expect_crm(
            &routes.names(),
            crm.throttle_reasons(),
            crm.rate_limit_headers(),
        );
        let now = clock.now();
        let ledger = Ledger::for_config(&config, now);
        // A configured read route (not the built-in default) says searches will come.
        let read_routes = routes.routes().iter().filter(|r| r.name != DEFAULT_ROUTE);
        for route in read_routes.filter(|r| r.class == Class::Read) {
            ledger.expect_reads(&route.quotas, now);
        }
        let shared = SharedLedger::new(&config, clock.clone(), metrics.clone())?;
        let routes = Arc::new(Live::new(routes));
        let queue = Arc::new(Queue::new(
            &config,
            routes.clone(),
            metrics.clone(),
            ledger.board(),
            store,
        ));
        let intake = Intake::new(&config.listen, config.max_body_bytes);
        let admin_guard = AdminGuard::new(&config.listen)?;
        Ok(Proxy {
            intake,
            admin_guard,
            breaker: Breaker::default(),
            credentials: Credentials::new(&config.credentials),
            data_conns: Arc::default(),
            admin_conns: Arc::default(),
            config: Live::new(config),
            clock,
            ledger,
            routes,
            queue,
            upstream: Live::new(upstream),
            metrics,
            clients: Live::new(clients),
            shared,
            grant_log: None,
            phase: AtomicU8::new(Phase::Starting as u8),
            access_seq: AtomicU64::new(0),
            reloader: std::sync::OnceLock::new(),
            loaded: Live::new(Loaded {
                sha256: None,
                loaded_at: now.to_string(),
            }),
        })
    }

    /// Makes `POST /reload` and SIGHUP read `reloader`'s file (once, at start).
    pub fn set_reloader(&self, reloader: Reloader) {
        if let Some(hash) = file_hash(&reloader.path) {
            self.loaded.set(Loaded {
                sha256: Some(hash),
                loaded_at: self.clock.now().to_string(),
            });
        }
        let _ = self.reloader.set(reloader);
    }

    pub(crate) fn reloader(&self) -> Option<&Reloader> {
        self.reloader.get()
    }

    /// The config in force: its file's hash and when it was loaded.
    pub fn loaded(&self) -> Arc<Loaded> {
        self.loaded.get()
    }

    pub(crate) fn set_config(&self, config: Config, sha256: Option<String>) {
        self.config.set(config);
        self.loaded.set(Loaded {
            sha256,
            loaded_at: self.clock.now().to_string(),
        });
    }

    pub(crate) fn set_routes(&self, routes: RouteTable) {
        self.routes.set(routes);
    }

    pub(crate) fn set_clients(&self, clients: Clients) {
        self.clients.set(clients);
    }

    pub(crate) fn set_upstream(&self, upstream: UpstreamClient) {
        self.upstream.set(upstream);
    }

    /// The config in force; a reload replaces it for later callers.
    pub fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    /// The route table in force.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes.get()
    }

    /// The client to the CRM in force.
    pub fn upstream(&self) -> Arc<UpstreamClient> {
        self.upstream.get()
    }

    /// The configured clients in force.
    pub fn clients(&self) -> Arc<Clients> {
        self.clients.get()
    }

    /// Tells the breaker what a call to the CRM came to: a failure of the CRM as a whole
    /// (nothing sent, a `retry_status` answer, no answer) or an answer of its own. For a failure
    /// while the breaker is open, the time the write should wait for (the next probe).
    pub fn crm_outcome(
        &self,
        status: Option<StatusCode>,
        sent_at: Time,
        now: Time,
    ) -> Option<Time> {
        let failed = match status {
            None => true,
            Some(s) => self.config().upstream.retry_status.contains(&s.as_u16()),
        };
        if failed {
            self.breaker
                .failed(sent_at, now, self.config().queue.max_attempts)
        } else {
            self.breaker.answered(now);
            None
        }
    }

    /// Why the data plane is not moving, for `/healthz`: every processing slot held and requests
    /// waiting for one, none freed to them, for longer than any request may take (the longest
    /// `max_wait`, plus connecting and the CRM's answer, plus 10 s), or the data listener unable
    /// to accept for 10 s.
    pub fn stuck(&self) -> Option<String> {
        let now = tokio::time::Instant::now();
        let c = &self.config();
        let longest = c
            .routes
            .iter()
            .map(|r| r.max_wait)
            .max()
            .unwrap_or_default()
            + c.upstream.connect_timeout
            + c.upstream.request_timeout
            + std::time::Duration::from_secs(10);
        if let Some(stalled) = self.intake.stalled_for(now)
            && stalled > longest
        {
            return Some(format!(
                "requests have waited {}s for a processing slot and none was freed: all {} are held (listen.max_concurrent_requests)",
                stalled.as_secs(),
                c.listen.max_concurrent_requests
            ));
        }
        match self.data_conns.accept_failing_for(now) {
            Some(failing) if failing.as_secs() >= 10 => Some(format!(
                "the data listener cannot accept connections for {}s (out of file descriptors?)",
                failing.as_secs()
            )),
            _ => None,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Takes in what a CRM answer says: its rate-limit headers correct the quotas the request
    /// consumed, and a throttle answer pauses the quotas it names (or the route's) until the
    /// reset the CRM gave, a dialect default, or `retry_after_default`. Returns the throttle.
    pub fn learn(
        &self,
        route: &Route,
        grant: &Grant,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        now: Time,
    ) -> Option<Throttle> {
        let crm = self.config().upstream.crm;
        let mut observations = crm.observe(headers, now, &mut |h| self.metrics.header_error(h));
        self.bound_resets(&mut observations, now);
        for (q, remaining, limit) in self.ledger.observe(&observations, grant, now).reported {
            self.metrics
                .crm_reported(&self.ledger.config(q).name, remaining, limit);
        }
        self.shared.observe(&observations, grant, &self.ledger, now);
        let Some(throttle) = crm.throttle(status, headers, body, &observations, now) else {
            self.ledger.not_throttled(&route.quotas);
            return None;
        };
        let named = throttle
            .scope
            .as_deref()
            .map(|s| self.ledger.synced_to(s))
            .unwrap_or_default();
        let quotas = if named.is_empty() {
            route.quotas.clone()
        } else {
            named.clone()
        };
        let until = throttle.until.unwrap_or_else(|| {
            named
                .iter()
                .map(|&q| self.ledger.window_end(q, now))
                .max()
                .unwrap_or(now + self.config().upstream.retry_after_default)
        });
        let bounds = PauseBounds {
            min: self.config().upstream.min_pause,
            max: self.config().upstream.max_pause,
        };
        let paused = self.ledger.pause(&quotas, until, now, bounds);
        for p in &paused {
            let name = &self.ledger.config(p.quota).name;
            self.metrics.frozen(name, p.gained);
            if p.capped {
                self.pause_capped(name, until, p.until, p.first_cap, now);
            }
        }
        // Every replica pauses: the shared ledger holds the pause too.
        let pauses: Vec<(QuotaId, Time)> = paused.iter().map(|p| (p.quota, p.until)).collect();
        self.shared.freeze(&pauses);
        self.metrics.throttled(&route.name, throttle.reason);
        let until = paused.iter().map(|p| p.until).max().unwrap_or(until);
        tracing::warn!(route = %route.name, reason = throttle.reason, until = %until, "the CRM throttled a request; pausing its quotas");
        Some(throttle)
    }

    /// Cuts each reset the CRM reported to the pause limit of the quotas synced to its scope, so
    /// a reset years ahead cannot hold a ceiling of zero for years.
    fn bound_resets(&self, observations: &mut [Observation], now: Time) {
        for o in observations.iter_mut() {
            let Some(reset) = o.reset else { continue };
            let quotas = self.ledger.synced_to(&o.scope);
            let Some(limit) = quotas
                .iter()
                .map(|&q| {
                    self.ledger
                        .pause_limit(q, now, self.config().upstream.max_pause)
                })
                .min()
            else {
                continue;
            };
            if reset > limit {
                o.reset = Some(limit);
                let first = quotas.iter().any(|&q| self.ledger.first_cap(q));
                let name = &self.ledger.config(quotas[0]).name;
                self.pause_capped(name, reset, limit, first, now);
            }
        }
    }

    /// Counts (and the first time, logs) a CRM pause or reset cut to its limit.
    fn pause_capped(&self, quota: &str, asked: Time, kept: Time, first: bool, now: Time) {
        self.metrics.pause_capped(quota);
        let asked = asked.saturating_since(now).as_secs();
        let kept = kept.saturating_since(now).as_secs();
        if first {
            tracing::warn!(
                quota,
                asked_seconds = asked,
                kept_seconds = kept,
                "the CRM asked for a pause longer than the quota's window or upstream.max_pause; cut to that (logged once per quota; see crm_proxy_pauses_capped_total)"
            );
        } else {
            tracing::debug!(
                quota,
                asked_seconds = asked,
                kept_seconds = kept,
                "CRM pause cut to its limit"
            );
        }
    }

    /// Whether a grant this process made of `quotas` (with the keys of the keyed ones) may go to
    /// the CRM: the shared ledger's decision (always yes with the local ledger). A refused grant
    /// gives its slot back to this replica's count: the call is not sent.
    pub async fn admit(
        &self,
        quotas: &[QuotaId],
        keys: &[(QuotaId, Arc<str>)],
        grant: &mut Grant,
    ) -> Admission {
        match self.shared {
            SharedLedger::Local => Admission::Granted,
            // Boxed: a Redis round trip's future is large, and every caller's future would
            // carry its size (and its frame the room to build it) for the local ledger too.
            SharedLedger::Redis(_) => {
                let demand = crate::shared_ledger::demand(quotas, keys);
                frames::boxed(|| self.admit_demand(&demand, grant)).await
            }
        }
    }

    /// As [`Proxy::admit`], for a demand that names a keyed quota once per key (a batch call).
    pub async fn admit_demand(
        &self,
        demand: &[(QuotaId, Option<Arc<str>>)],
        grant: &mut Grant,
    ) -> Admission {
        let admission = self.admit_counted(demand, grant).await;
        if let Admission::Denied { .. } = admission {
            // Not sent: this replica's count gives the slot back (the account's never took it).
            let quotas: Vec<QuotaId> = demand.iter().map(|(q, _)| *q).collect();
            self.ledger.refund(grant, &quotas, self.clock.now());
        }
        admission
    }

    /// The shared ledger's decision on a grant whose call goes to the CRM whatever it says
    /// (shadow mode): this replica's count keeps it.
    pub async fn admit_counted(
        &self,
        demand: &[(QuotaId, Option<Arc<str>>)],
        grant: &mut Grant,
    ) -> Admission {
        let now = self.clock.now();
        self.shared.admit(&self.ledger, demand, grant, now).await
    }

    /// The one retry verdict on an attempt (see [`crate::verdict`]), under this proxy's policy:
    /// `attempt` is the attempt's number (`None`: not counted), backoff drawn with jitter.
    pub fn verdict(
        &self,
        what: Attempt<'_>,
        resend_safe: bool,
        attempt: Option<u32>,
        outage: Option<Time>,
        now: Time,
    ) -> Verdict {
        let config = self.config();
        let q = &config.queue;
        let policy = Policy {
            resend_safe,
            retry_status: &config.upstream.retry_status,
            attempts: attempt.map(|n| (n, q.max_attempts)),
            backoff: backoff(q, attempt.unwrap_or(1)),
            outage,
            now,
        };
        verdict::verdict(what, &policy)
    }

    /// The wait after attempt `attempt` before the next: doubled per attempt, capped, jittered.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        backoff(&self.config().queue, attempt)
    }
}

/// The wait after attempt `attempt` before the next, under queue settings `q`.
fn backoff(q: &QueueConfig, attempt: u32) -> std::time::Duration {
    verdict::backoff(q.backoff_initial, q.backoff_max, attempt, jitter())
}
