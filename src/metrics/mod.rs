//! Typed Prometheus metric handles in one registry (no globals). Labels come from config only;
//! callers hand in label values and numbers, never their own types.

mod outlook;
mod registry;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Registry, TextEncoder,
};

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
    "body_timeout",
    "busy",
    "bad_path",
    "method_not_allowed",
    "upstream_error",
    "batched",
    "failed",
];

/// What enforcing would have done with a request in shadow mode
/// (`crm_proxy_shadow_decisions_total`).
pub const SHADOW_DECISIONS: &[&str] = &["allowed", "waited", "queued", "rejected"];

/// Why a call to the CRM got no response (`crm_proxy_upstream_errors_total`).
pub const UPSTREAM_ERROR_KINDS: &[&str] = &["connect", "timeout", "io"];

/// The listeners whose connections are counted.
pub const LISTENERS: &[&str] = &["data", "admin"];

/// Why a listener closed a connection itself.
pub const CLOSE_REASONS: &[&str] = &["over_cap", "header_timeout", "idle"];

/// A route's series of `crm_proxy_requests_total` and `crm_proxy_upstream_*`: the common ones
/// held, the others looked up by label.
#[derive(Debug, Clone)]
pub struct RouteSeries {
    route: String,
    requests: IntCounterVec,
    responses: IntCounterVec,
    forwarded: IntCounter,
    waited: IntCounter,
    answered_2xx: IntCounter,
    duration: Histogram,
}

impl RouteSeries {
    /// How a request of the route ended (`crm_proxy_requests_total`).
    pub fn request(&self, outcome: &str) {
        match outcome {
            "forwarded" => self.forwarded.inc(),
            "waited" => self.waited.inc(),
            _ => self
                .requests
                .with_label_values(&[&self.route, outcome])
                .inc(),
        }
    }

    /// The CRM's answer to one of the route's requests, and how long it took.
    pub fn upstream_response(&self, status: http::StatusCode, seconds: f64) {
        match status_class(status) {
            "2xx" => self.answered_2xx.inc(),
            class => self
                .responses
                .with_label_values(&[&self.route, class])
                .inc(),
        }
        self.duration.observe(seconds);
    }
}

/// A client's series of `crm_proxy_client_requests_total` and `crm_proxy_client_calls_total`.
#[derive(Debug, Clone)]
pub struct ClientSeries {
    requests: IntCounter,
    calls: IntCounter,
}

impl ClientSeries {
    pub fn request(&self) {
        self.requests.inc();
    }

    pub fn call(&self) {
        self.calls.inc();
    }
}

/// The label of a status's class: `2xx` and the like.
fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

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
    shadow_decisions: IntCounterVec,
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
    quota_class_used: IntGaugeVec,
    quota_class_reserved: IntGaugeVec,
    queue_depth: IntGaugeVec,
    queue_oldest_age: GaugeVec,
    queue_drain_eta: prometheus::Gauge,
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
    ledger_shared: IntGauge,
    ledger_decisions: IntCounterVec,
    ledger_call_duration: prometheus::Histogram,
    ledger_errors: prometheus::IntCounter,
    ledger_fallback_seconds: prometheus::Counter,
    ledger_replicas: IntGauge,
    pauses_capped: IntCounterVec,
    results_evicted: prometheus::IntCounter,
    quarantined_records: prometheus::IntCounter,
    config_reloads: IntCounterVec,
    breaker_open: IntGauge,
    quarantined_bytes: prometheus::IntCounter,
    connections: IntGaugeVec,
    connections_closed: IntCounterVec,
    accept_errors: IntCounterVec,
    request_bytes_buffered: IntGauge,
    outlook: outlook::Outlook,
}

impl Metrics {
    /// A client's use of an unkeyed quota's current window, and that use as a share of the limit.
    pub fn set_client_quota(&self, client: &str, quota: &str, used: u64, share: f64) {
        let l = [client, quota];
        self.client_used.with_label_values(&l).set(saturating(used));
        self.client_share.with_label_values(&l).set(share);
    }

    /// A client's parked writes waiting, and the age of its oldest.
    pub fn set_client_queue(&self, client: &str, parked: usize, oldest_age_seconds: f64) {
        self.client_depth
            .with_label_values(&[client])
            .set(saturating(parked as u64));
        self.client_oldest
            .with_label_values(&[client])
            .set(oldest_age_seconds);
    }

    /// A keyed quota's tracked keys, and the grants that ever went to its overflow window.
    pub fn set_quota_keys(&self, quota: &str, tracked: usize, overflowed: u64) {
        self.quota_keys
            .with_label_values(&[quota])
            .set(saturating(tracked as u64));
        catch_up(
            &self.quota_key_overflow.with_label_values(&[quota]),
            overflowed,
        );
    }

    pub fn request(&self, route: &str, outcome: &str) {
        self.requests.with_label_values(&[route, outcome]).inc();
    }

    /// The series every forwarded request of `route` counts, looked up once (a labelled
    /// lookup hashes its labels and takes its vector's lock, which every data thread shares).
    pub fn route_series(&self, route: &str) -> RouteSeries {
        RouteSeries {
            route: route.to_string(),
            requests: self.requests.clone(),
            responses: self.upstream_responses.clone(),
            forwarded: self.requests.with_label_values(&[route, "forwarded"]),
            waited: self.requests.with_label_values(&[route, "waited"]),
            answered_2xx: self.upstream_responses.with_label_values(&[route, "2xx"]),
            duration: self.upstream_duration.with_label_values(&[route]),
        }
    }

    /// The two series every request of `client` counts, looked up once.
    pub fn client_series(&self, client: &str) -> ClientSeries {
        ClientSeries {
            requests: self.client_requests.with_label_values(&[client]),
            calls: self.client_calls.with_label_values(&[client]),
        }
    }

    /// 1 while the drain is paused because the CRM fails as a whole.
    pub fn set_breaker_open(&self, open: bool) {
        self.breaker_open.set(i64::from(open));
    }

    /// A config reload and how it ended: `applied`, `partial`, `unchanged`, `invalid`.
    pub fn config_reload(&self, result: &str) {
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// Damaged stretches of the log skipped at start, and their bytes.
    pub fn set_quarantined(&self, records: u64, bytes: u64) {
        catch_up(&self.quarantined_records, records);
        catch_up(&self.quarantined_bytes, bytes);
    }

    /// A delivered write's kept answer evicted before `result_ttl` to make room.
    pub fn result_evicted(&self) {
        self.results_evicted.inc();
    }

    /// A CRM pause or reset cut to the quota's limit (`upstream.max_pause`, its window).
    pub fn pause_capped(&self, quota: &str) {
        self.pauses_capped.with_label_values(&[quota]).inc();
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

    /// Creates at zero the series a CRM dialect can produce: its throttle reasons per route, its
    /// rate-limit headers' error counts; and the build-info series.
    pub fn expect_crm(&self, routes: &[&str], throttle_reasons: &[&str], headers: &[&str]) {
        for route in routes {
            for reason in throttle_reasons {
                self.throttled.with_label_values(&[route, reason]);
            }
        }
        for header in headers {
            self.header_errors.with_label_values(&[header]);
        }
    }

    pub fn shadow_decision(&self, route: &str, decision: &str) {
        self.shadow_decisions
            .with_label_values(&[route, decision])
            .inc();
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

    /// A parked write given up; `reason` is a [`crate::status::FailReason`]'s name.
    pub fn failed(&self, route: &str, reason: &str) {
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

    /// One quota's window as the ledger sees it now.
    pub fn set_quota(&self, quota: &str, limit: u32, used: u32, remaining: u32, frozen: bool) {
        let l = [quota];
        self.quota_limit.with_label_values(&l).set(i64::from(limit));
        self.quota_used.with_label_values(&l).set(i64::from(used));
        self.quota_remaining
            .with_label_values(&l)
            .set(i64::from(remaining));
        self.quota_frozen
            .with_label_values(&l)
            .set(i64::from(frozen));
    }

    /// One class's use of a quota's window and the room held for it now.
    pub fn set_quota_class(&self, quota: &str, class: &str, used: u64, reserved: u64) {
        let l = [quota, class];
        self.quota_class_used
            .with_label_values(&l)
            .set(saturating(used));
        self.quota_class_reserved
            .with_label_values(&l)
            .set(saturating(reserved));
    }

    /// A lane's parked writes waiting (over every client), and the age of its oldest.
    pub fn set_lane(&self, lane: &str, depth: usize, oldest_age_seconds: f64) {
        self.queue_depth
            .with_label_values(&[lane])
            .set(saturating(depth as u64));
        self.queue_oldest_age
            .with_label_values(&[lane])
            .set(oldest_age_seconds);
    }

    pub fn set_drain_eta(&self, seconds: f64) {
        self.queue_drain_eta.set(seconds);
    }

    /// The queue's totals: entries and bytes the bounds count, writes being sent, dead letters.
    pub fn set_queue(&self, entries: usize, bytes: usize, in_flight: usize, dead_letters: usize) {
        self.queue_entries.set(saturating(entries as u64));
        self.queue_bytes.set(saturating(bytes as u64));
        self.queue_in_flight.set(saturating(in_flight as u64));
        self.dead_letters.set(saturating(dead_letters as u64));
    }

    /// The disk store's counters as of now (kept by its writer thread, which only adds to them).
    pub fn set_store(&self, log_bytes: u64, commits: u64, errors: u64, sync_seconds: f64) {
        let _one = self.store_seen.lock().unwrap_or_else(|e| e.into_inner());
        self.store_log_bytes.set(saturating(log_bytes));
        catch_up(&self.store_commits, commits);
        catch_up(&self.store_errors, errors);
        self.store_sync_seconds
            .inc_by((sync_seconds - self.store_sync_seconds.get()).max(0.0));
    }

    /// One call to the shared ledger and its time; `answered` false when it failed or timed out.
    pub fn ledger_call(&self, seconds: f64, answered: bool) {
        self.ledger_call_duration.observe(seconds);
        if !answered {
            self.ledger_errors.inc();
        }
    }

    /// A decision of the shared ledger: `granted`, `denied`, or `on_its_own` (decided here on
    /// this replica's share while the shared ledger was unreachable).
    pub fn ledger_decision(&self, result: &str) {
        self.ledger_decisions.with_label_values(&[result]).inc();
    }

    /// Whether every grant is decided by the shared ledger (1), or this replica keeps to its
    /// share on its own (0).
    pub fn ledger_shared(&self, shared: bool) {
        self.ledger_shared.set(i64::from(shared));
    }

    pub fn ledger_fallback_seconds(&self, seconds: f64) {
        self.ledger_fallback_seconds.inc_by(seconds);
    }

    /// Replicas the shared ledger heard from recently.
    pub fn ledger_replicas(&self, alive: u32) {
        self.ledger_replicas.set(i64::from(alive));
    }

    /// One listener's connections: open now, and its running totals (closed by the listener, by
    /// reason in [`CLOSE_REASONS`] order; failed accepts).
    pub fn set_connections(
        &self,
        listener: &str,
        open: usize,
        closed: [u64; 3],
        accept_errors: u64,
    ) {
        let _one = self.store_seen.lock().unwrap_or_else(|e| e.into_inner());
        self.connections
            .with_label_values(&[listener])
            .set(saturating(open as u64));
        for (reason, total) in CLOSE_REASONS.iter().zip(closed) {
            catch_up(
                &self
                    .connections_closed
                    .with_label_values(&[listener, reason]),
                total,
            );
        }
        catch_up(
            &self.accept_errors.with_label_values(&[listener]),
            accept_errors,
        );
    }

    /// Bytes of request bodies held before or while they are processed.
    pub fn set_request_bytes_buffered(&self, bytes: u64) {
        self.request_bytes_buffered.set(saturating(bytes));
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

/// A count as a gauge value.
fn saturating(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Brings a counter up to a total kept elsewhere (never down).
fn catch_up(counter: &prometheus::IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}
