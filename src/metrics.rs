//! Typed Prometheus metric handles in one registry (no globals); labels come from config only.

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::queue::QueueStatus;
use crate::quota::QuotaStatus;

/// Outcomes of a client request, as counted in `crm_proxy_requests_total`.
pub const OUTCOMES: &[&str] = &[
    "forwarded",
    "waited",
    "queued",
    "rejected",
    "withdrawn",
    "queue_full",
    "not_stored",
    "too_large",
    "bad_body",
    "upstream_error",
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    upstream_responses: IntCounterVec,
    upstream_errors: IntCounterVec,
    upstream_duration: HistogramVec,
    throttled: IntCounterVec,
    frozen_seconds: prometheus::CounterVec,
    crm_remaining: IntGaugeVec,
    crm_limit: IntGaugeVec,
    header_errors: IntCounterVec,
    ambiguous: IntCounterVec,
    idempotent_replays: IntCounterVec,
    dispatched: IntCounterVec,
    expired: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    batch_size: HistogramVec,
    batch_calls_saved: IntCounterVec,
    batch_failures: IntCounterVec,
    job_polls: prometheus::IntCounter,
    quota_limit: IntGaugeVec,
    quota_used: IntGaugeVec,
    quota_remaining: IntGaugeVec,
    quota_frozen: IntGaugeVec,
    queue_depth: IntGaugeVec,
    queue_oldest_age: GaugeVec,
    queue_entries: IntGauge,
    queue_bytes: IntGauge,
    queue_in_flight: IntGauge,
    dead_letters: IntGauge,
    store_log_bytes: IntGauge,
    store_commits: prometheus::IntCounter,
    store_errors: prometheus::IntCounter,
    store_sync_seconds: prometheus::Counter,
    /// Serializes catching the store counters up (two scrapes at once must not both add).
    store_seen: std::sync::Mutex<()>,
    up: Gauge,
    client_requests: IntCounterVec,
    client_calls: IntCounterVec,
    client_used: IntGaugeVec,
    client_share: GaugeVec,
    client_depth: IntGaugeVec,
    client_oldest: GaugeVec,
    quota_keys: IntGaugeVec,
    quota_key_overflow: IntCounterVec,
}

/// One client's state for metrics and `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientView {
    pub name: String,
    pub weight: u32,
    /// Per unkeyed quota: calls of this client in the current window, and their share of the limit.
    pub quotas: Vec<ClientQuotaView>,
    pub parked: usize,
    pub oldest_parked_age_seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientQuotaView {
    pub quota: String,
    pub used: u64,
    pub share: f64,
}

/// A keyed quota's memory for metrics and `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeysView {
    pub quota: String,
    pub tracked: usize,
    pub overflowed: u64,
}

/// Registers a metric without labels and returns its handle.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let m = metric.expect("valid metric");
    registry
        .register(Box::new(m.clone()))
        .expect("unique metric");
    m
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

impl Metrics {
    /// Registers every metric and creates the series for known routes, quotas and lanes at zero.
    pub fn new(routes: &[&str], quotas: &[&str], lanes: &[&str], clients: &[&str]) -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let requests = counter(
            r,
            "crm_proxy_requests_total",
            "Client requests by route and outcome (forwarded: sent at once; waited: sent after waiting for quota; queued: answered 202; rejected: over-limit answer; withdrawn: client left while parked).",
            &["route", "outcome"],
        );
        let upstream_responses = counter(
            r,
            "crm_proxy_upstream_responses_total",
            "CRM responses by route and status class (live and parked requests).",
            &["route", "class"],
        );
        let upstream_errors = counter(
            r,
            "crm_proxy_upstream_errors_total",
            "Requests to the CRM that got no response, by route and kind (connect, timeout, io).",
            &["route", "kind"],
        );
        let upstream_duration = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "crm_proxy_upstream_duration_seconds",
                    "Time from sending a request to the CRM to its response head.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["route"],
            ),
        );
        let batch_size = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "crm_proxy_batch_size",
                    "Parked writes per batch call (create_many, update_many).",
                )
                .buckets(vec![2.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0]),
                &["route"],
            ),
        );
        let batch_calls_saved = counter(
            r,
            "crm_proxy_batch_calls_saved_total",
            "Calls batching saved: writes sent in batches minus the batch calls.",
            &["route"],
        );
        let batch_failures = counter(
            r,
            "crm_proxy_batch_failures_total",
            "Batches refused whole (kind=batch; their writes go one by one), failed or lost CRM jobs (job), and items a job refused (item).",
            &["route", "kind"],
        );
        let job_polls = register(
            r,
            prometheus::IntCounter::new(
                "crm_proxy_job_polls_total",
                "Job status polls sent to the CRM (each is one call on the budget).",
            ),
        );
        let throttled = counter(
            r,
            "crm_proxy_throttled_total",
            "CRM throttle answers (429, Salesforce 403 REQUEST_LIMIT_EXCEEDED) by route and reason; each pauses the quotas it names.",
            &["route", "reason"],
        );
        let frozen_seconds = register(
            r,
            prometheus::CounterVec::new(
                Opts::new(
                    "crm_proxy_quota_frozen_seconds_total",
                    "Time each quota was paused by CRM throttle answers.",
                ),
                &["quota"],
            ),
        );
        let crm_remaining = gauge(
            r,
            "crm_proxy_quota_crm_remaining",
            "Calls left as the CRM last reported them for the quota's synced scope.",
            &["quota"],
        );
        let crm_limit = gauge(
            r,
            "crm_proxy_quota_crm_limit",
            "The limit the CRM last reported for the quota's synced scope.",
            &["quota"],
        );
        let header_errors = counter(
            r,
            "crm_proxy_upstream_header_errors_total",
            "Malformed CRM rate-limit headers, ignored, by header.",
            &["header"],
        );
        let ambiguous = counter(
            r,
            "crm_proxy_ambiguous_total",
            "Parked writes whose outcome was unknown and that could not be resent safely, by route.",
            &["route"],
        );
        let idempotent_replays = counter(
            r,
            "crm_proxy_idempotent_replays_total",
            "Writes of unknown outcome resent under their idempotency key, by route.",
            &["route"],
        );
        let dispatched = counter(
            r,
            "crm_proxy_dispatched_total",
            "Parked writes delivered by the proxy (after a 202), by route.",
            &["route"],
        );
        let expired = counter(
            r,
            "crm_proxy_expired_total",
            "Parked writes dropped because their TTL passed before quota allowed them, by route.",
            &["route"],
        );
        let failed = counter(
            r,
            "crm_proxy_failed_total",
            "Parked writes given up and kept as dead letters, by route and reason (attempts_exhausted, ambiguous, rejected).",
            &["route", "reason"],
        );
        let retried = counter(
            r,
            "crm_proxy_retries_total",
            "Retries of parked writes after a connect error, timeout or 5xx, by route.",
            &["route"],
        );
        let quota_limit = gauge(
            r,
            "crm_proxy_quota_limit",
            "Requests allowed per window.",
            &["quota"],
        );
        let quota_used = gauge(
            r,
            "crm_proxy_quota_used",
            "Requests counted in the current window.",
            &["quota"],
        );
        let quota_remaining = gauge(
            r,
            "crm_proxy_quota_remaining",
            "Requests the proxy may still send in the current window.",
            &["quota"],
        );
        let quota_frozen = gauge(
            r,
            "crm_proxy_quota_frozen",
            "1 while a CRM 429 pauses the quota.",
            &["quota"],
        );
        let queue_depth = gauge(
            r,
            "crm_proxy_queue_depth",
            "Parked writes waiting, by lane.",
            &["lane"],
        );
        let queue_oldest_age = register(
            r,
            GaugeVec::new(
                Opts::new(
                    "crm_proxy_queue_oldest_age_seconds",
                    "Age of the oldest parked write waiting, by lane.",
                ),
                &["lane"],
            ),
        );
        let plain = |name: &str, help: &str| register(r, IntGauge::new(name, help));
        let queue_entries = plain(
            "crm_proxy_queue_entries",
            "Parked writes holding a request (queued, being sent, or failed and kept).",
        );
        let queue_bytes = plain("crm_proxy_queue_bytes", "Bytes of parked requests held.");
        let queue_in_flight = plain(
            "crm_proxy_queue_in_flight",
            "Parked writes being sent to the CRM now.",
        );
        let dead_letters = plain(
            "crm_proxy_dead_letters",
            "Failed or expired parked writes kept for the operator (retry or discard them).",
        );
        let store_log_bytes = plain(
            "crm_proxy_store_log_bytes",
            "Size of the parked-write log (disk store).",
        );
        let store_commits = register(
            r,
            prometheus::IntCounter::new(
                "crm_proxy_store_commits_total",
                "Group commits (write + fsync) of the parked-write log.",
            ),
        );
        let store_errors = register(
            r,
            prometheus::IntCounter::new(
                "crm_proxy_store_errors_total",
                "Failed writes to the parked-write log (each answered 503 or retried, never lost).",
            ),
        );
        let store_sync_seconds = register(
            r,
            prometheus::Counter::new(
                "crm_proxy_store_sync_seconds_total",
                "Time spent writing and fsyncing the parked-write log.",
            ),
        );
        let up = register(
            r,
            Gauge::new("crm_proxy_up", "1 while the proxy serves traffic."),
        );
        let client_requests = counter(
            r,
            "crm_proxy_client_requests_total",
            "Client requests by client (as identified by the clients rules).",
            &["client"],
        );
        let client_calls = counter(
            r,
            "crm_proxy_client_calls_total",
            "Calls sent to the CRM on behalf of each client (live and parked).",
            &["client"],
        );
        let client_used = gauge(
            r,
            "crm_proxy_client_quota_used",
            "Calls of each client counted in each quota's current window.",
            &["client", "quota"],
        );
        let client_share = register(
            r,
            GaugeVec::new(
                Opts::new(
                    "crm_proxy_client_quota_share",
                    "Each client's calls in each quota's current window as a fraction of the limit.",
                ),
                &["client", "quota"],
            ),
        );
        let client_depth = gauge(
            r,
            "crm_proxy_client_queue_depth",
            "Parked writes waiting, by client.",
            &["client"],
        );
        let client_oldest = register(
            r,
            GaugeVec::new(
                Opts::new(
                    "crm_proxy_client_queue_oldest_age_seconds",
                    "Age of each client's oldest waiting parked write.",
                ),
                &["client"],
            ),
        );
        let quota_keys = gauge(
            r,
            "crm_proxy_quota_keys",
            "Keys a keyed quota tracks now (bounded by max_keys).",
            &["quota"],
        );
        let quota_key_overflow = counter(
            r,
            "crm_proxy_quota_key_overflow_total",
            "Grants of keyed quotas that went to the shared overflow window because max_keys was reached.",
            &["quota"],
        );
        for c in clients {
            client_requests.with_label_values(&[c]);
            client_calls.with_label_values(&[c]);
            client_depth.with_label_values(&[c]);
            client_oldest.with_label_values(&[c]);
        }

        for route in routes {
            for outcome in OUTCOMES {
                requests.with_label_values(&[route, outcome]);
            }
            for c in [
                &dispatched,
                &expired,
                &retried,
                &ambiguous,
                &idempotent_replays,
            ] {
                c.with_label_values(&[route]);
            }
            for reason in ["attempts_exhausted", "ambiguous", "rejected"] {
                failed.with_label_values(&[route, reason]);
            }
            batch_calls_saved.with_label_values(&[route]);
            for kind in ["batch", "job", "item"] {
                batch_failures.with_label_values(&[route, kind]);
            }
        }
        for q in quotas {
            for g in [&quota_limit, &quota_used, &quota_remaining, &quota_frozen] {
                g.with_label_values(&[q]);
            }
            frozen_seconds.with_label_values(&[q]);
        }
        for l in lanes {
            queue_depth.with_label_values(&[l]);
            queue_oldest_age.with_label_values(&[l]);
        }
        Metrics {
            registry,
            requests,
            upstream_responses,
            upstream_errors,
            upstream_duration,
            throttled,
            frozen_seconds,
            crm_remaining,
            crm_limit,
            header_errors,
            ambiguous,
            idempotent_replays,
            dispatched,
            expired,
            failed,
            retried,
            batch_size,
            batch_calls_saved,
            batch_failures,
            job_polls,
            quota_limit,
            quota_used,
            quota_remaining,
            quota_frozen,
            queue_depth,
            queue_oldest_age,
            queue_entries,
            queue_bytes,
            queue_in_flight,
            dead_letters,
            store_log_bytes,
            store_commits,
            store_errors,
            store_sync_seconds,
            store_seen: std::sync::Mutex::new(()),
            up,
            client_requests,
            client_calls,
            client_used,
            client_share,
            client_depth,
            client_oldest,
            quota_keys,
            quota_key_overflow,
        }
    }

    pub fn client_request(&self, client: &str) {
        self.client_requests.with_label_values(&[client]).inc();
    }

    pub fn client_call(&self, client: &str) {
        self.client_calls.with_label_values(&[client]).inc();
    }

    /// Copies the clients' and keyed quotas' state into their gauges (at scrape time).
    pub fn observe_clients(&self, clients: &[ClientView], keys: &[KeysView]) {
        for c in clients {
            for q in &c.quotas {
                let l = [c.name.as_str(), q.quota.as_str()];
                self.client_used
                    .with_label_values(&l)
                    .set(i64::try_from(q.used).unwrap_or(i64::MAX));
                self.client_share.with_label_values(&l).set(q.share);
            }
            self.client_depth
                .with_label_values(&[&c.name])
                .set(c.parked as i64);
            self.client_oldest
                .with_label_values(&[&c.name])
                .set(c.oldest_parked_age_seconds);
        }
        for k in keys {
            self.quota_keys
                .with_label_values(&[&k.quota])
                .set(k.tracked as i64);
            let counter = self.quota_key_overflow.with_label_values(&[&k.quota]);
            counter.inc_by(k.overflowed.saturating_sub(counter.get()));
        }
    }

    pub fn request(&self, route: &str, outcome: &str) {
        self.requests.with_label_values(&[route, outcome]).inc();
    }

    pub fn upstream_response(&self, route: &str, status: http::StatusCode, seconds: f64) {
        let class = match status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.upstream_responses
            .with_label_values(&[route, class])
            .inc();
        self.upstream_duration
            .with_label_values(&[route])
            .observe(seconds);
    }

    pub fn throttled(&self, route: &str, reason: &str) {
        self.throttled.with_label_values(&[route, reason]).inc();
    }

    pub fn frozen(&self, quota: &str, gained: std::time::Duration) {
        self.frozen_seconds
            .with_label_values(&[quota])
            .inc_by(gained.as_secs_f64());
    }

    pub fn crm_reported(&self, quota: &str, remaining: Option<u64>, limit: Option<u64>) {
        if let Some(r) = remaining {
            self.crm_remaining
                .with_label_values(&[quota])
                .set(i64::try_from(r).unwrap_or(i64::MAX));
        }
        if let Some(l) = limit {
            self.crm_limit
                .with_label_values(&[quota])
                .set(i64::try_from(l).unwrap_or(i64::MAX));
        }
    }

    pub fn header_error(&self, header: &str) {
        self.header_errors.with_label_values(&[header]).inc();
    }

    pub fn ambiguous(&self, route: &str) {
        self.ambiguous.with_label_values(&[route]).inc();
    }

    pub fn idempotent_replay(&self, route: &str) {
        self.idempotent_replays.with_label_values(&[route]).inc();
    }

    pub fn upstream_error(&self, route: &str, kind: &str) {
        self.upstream_errors.with_label_values(&[route, kind]).inc();
    }

    pub fn dispatched(&self, route: &str) {
        self.dispatched.with_label_values(&[route]).inc();
    }

    pub fn expired(&self, route: &str) {
        self.expired.with_label_values(&[route]).inc();
    }

    pub fn failed(&self, route: &str, reason: crate::queue::FailReason) {
        let reason = match reason {
            crate::queue::FailReason::AttemptsExhausted => "attempts_exhausted",
            crate::queue::FailReason::Ambiguous => "ambiguous",
            crate::queue::FailReason::Rejected => "rejected",
        };
        self.failed.with_label_values(&[route, reason]).inc();
    }

    /// A batch call of `size` writes left for the CRM.
    pub fn batch_sent(&self, route: &str, size: usize) {
        self.batch_size
            .with_label_values(&[route])
            .observe(size as f64);
        self.batch_calls_saved
            .with_label_values(&[route])
            .inc_by(size.saturating_sub(1) as u64);
    }

    /// `kind`: `batch` (refused whole), `job` (failed or unknown job), `item` (one refused item).
    pub fn batch_failure(&self, route: &str, kind: &str) {
        self.batch_failures.with_label_values(&[route, kind]).inc();
    }

    pub fn job_poll(&self) {
        self.job_polls.inc();
    }

    pub fn retried(&self, route: &str) {
        self.retried.with_label_values(&[route]).inc();
    }

    pub fn set_up(&self, up: bool) {
        self.up.set(if up { 1.0 } else { 0.0 });
    }

    /// Copies the ledger's and queue's current state into the gauges (called at scrape time).
    pub fn observe(&self, quotas: &[QuotaStatus], queue: &QueueStatus) {
        for q in quotas {
            let l = [q.name.as_str()];
            self.quota_limit
                .with_label_values(&l)
                .set(i64::from(q.limit));
            self.quota_used.with_label_values(&l).set(i64::from(q.used));
            self.quota_remaining
                .with_label_values(&l)
                .set(i64::from(q.remaining));
            self.quota_frozen
                .with_label_values(&l)
                .set(i64::from(q.frozen_until.is_some()));
        }
        // A lane per (client, quotas) in the queue; per quota set here.
        let mut by_name: Vec<(&str, usize, f64)> = Vec::new();
        for lane in &queue.lanes {
            match by_name.iter_mut().find(|(n, _, _)| *n == lane.name) {
                Some(e) => {
                    e.1 += lane.depth;
                    e.2 = e.2.max(lane.oldest_age_seconds);
                }
                None => by_name.push((&lane.name, lane.depth, lane.oldest_age_seconds)),
            }
        }
        for (name, depth, oldest) in by_name {
            self.queue_depth
                .with_label_values(&[name])
                .set(depth as i64);
            self.queue_oldest_age.with_label_values(&[name]).set(oldest);
        }
        self.queue_entries.set(queue.entries as i64);
        self.queue_bytes.set(queue.bytes as i64);
        self.queue_in_flight.set(queue.dispatching as i64);
        self.dead_letters.set((queue.failed + queue.expired) as i64);
    }

    /// The disk store's counters (kept by its writer thread) as of now.
    pub fn observe_store(&self, stats: &crate::store::StoreStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let _one = self.store_seen.lock().unwrap_or_else(|e| e.into_inner());
        self.store_log_bytes
            .set(stats.log_bytes.load(Relaxed) as i64);
        let commits = stats.commits.load(Relaxed);
        self.store_commits
            .inc_by(commits.saturating_sub(self.store_commits.get()));
        let errors = stats.errors.load(Relaxed);
        self.store_errors
            .inc_by(errors.saturating_sub(self.store_errors.get()));
        let seconds = stats.sync_nanos.load(Relaxed) as f64 / 1e9;
        self.store_sync_seconds
            .inc_by((seconds - self.store_sync_seconds.get()).max(0.0));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
