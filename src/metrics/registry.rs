//! Registering every metric, with the series for known routes, quotas, lanes and clients
//! created at zero.

use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::{CLOSE_REASONS, LISTENERS, Metrics, OUTCOMES, SHADOW_DECISIONS, UPSTREAM_ERROR_KINDS};
use crate::status::FailReason;

/// Registers a metric without labels and returns its handle.
pub(super) fn register<M: prometheus::core::Collector + Clone + 'static>(
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
        let ledger_shared = register(
            r,
            IntGauge::new(
                "crm_proxy_ledger_shared",
                "1 while every grant is decided by the shared ledger (always 1 with the local ledger); 0 while this replica keeps to its own share because the shared ledger is unreachable.",
            ),
        );
        ledger_shared.set(1);
        let ledger_decisions = counter(
            r,
            "crm_proxy_ledger_decisions_total",
            "Decisions of the shared ledger (Redis): granted, denied (another replica spent it), on_its_own (decided on this replica's share while Redis was unreachable).",
            &["result"],
        );
        for result in ["granted", "denied", "on_its_own"] {
            ledger_decisions.with_label_values(&[result]);
        }
        let ledger_call_duration = register(
            r,
            prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "crm_proxy_ledger_call_duration_seconds",
                    "Time of one call to the shared ledger (one script call per decision).",
                )
                .buckets(vec![
                    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
            ),
        );
        let ledger_errors = register(
            r,
            prometheus::IntCounter::new(
                "crm_proxy_ledger_errors_total",
                "Calls to the shared ledger that failed or got no answer in time.",
            ),
        );
        let ledger_fallback_seconds = register(
            r,
            prometheus::Counter::new(
                "crm_proxy_ledger_fallback_seconds_total",
                "Time this replica kept to its own share because the shared ledger was unreachable (counted when it rejoins).",
            ),
        );
        let ledger_replicas = register(
            r,
            IntGauge::new(
                "crm_proxy_ledger_replicas",
                "Replicas the shared ledger heard from in the last seconds (1 with the local ledger).",
            ),
        );
        ledger_replicas.set(1);
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
        let quota_class_used = gauge(
            r,
            "crm_proxy_quota_class_used",
            "Requests of a class counted in the quota's window: read, live (reads included), drain.",
            &["quota", "class"],
        );
        let quota_class_reserved = gauge(
            r,
            "crm_proxy_quota_class_reserved",
            "Room of the quota's window the other classes leave to this one now (0 while it is not about).",
            &["quota", "class"],
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
        let queue_drain_eta = register(
            r,
            prometheus::Gauge::new(
                "crm_proxy_queue_drain_eta_seconds",
                "Estimated seconds until the parked writes waiting now are sent, if only the drain spent the quotas.",
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

        let results_evicted = register(
            r,
            prometheus::IntCounter::new(
                "crm_proxy_results_evicted_total",
                "Delivered writes whose kept CRM answer was dropped before queue.result_ttl to make room for parked writes (queue.max_entries, queue.max_bytes).",
            ),
        );
        let quarantined_records = register(
            r,
            prometheus::IntCounter::new(
                "crm_proxy_store_quarantined_records_total",
                "Damaged stretches of the parked-write log skipped at start and moved to the quarantine file.",
            ),
        );
        let quarantined_bytes = register(
            r,
            prometheus::IntCounter::new(
                "crm_proxy_store_quarantined_bytes_total",
                "Bytes of the parked-write log moved to the quarantine file at start.",
            ),
        );
        let breaker_open = plain(
            "crm_proxy_breaker_open",
            "1 while the drain is paused because calls to the CRM keep failing as a whole (it probes one write at a time).",
        );
        let shadow_decisions = counter(
            r,
            "crm_proxy_shadow_decisions_total",
            "Requests in shadow mode (enforce: false), by route and what enforcing would have done: allowed, waited (a slot within max_wait), queued (parked, 202), rejected (over-limit answer). Every one was forwarded.",
            &["route", "decision"],
        );
        let build_info = gauge(
            r,
            "crm_proxy_build_info",
            "Always 1; the labels say which build runs (version, and profile: release or debug).",
            &["version", "profile"],
        );
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), profile])
            .set(1);
        let config_reloads = counter(
            r,
            "crm_proxy_config_reloads_total",
            "Config reloads (SIGHUP, POST /reload) by result: applied, partial (some changes wait for a restart), unchanged, invalid (the previous config kept).",
            &["result"],
        );
        for result in ["applied", "partial", "unchanged", "invalid"] {
            config_reloads.with_label_values(&[result]);
        }
        let pauses_capped = counter(
            r,
            "crm_proxy_pauses_capped_total",
            "CRM pauses (Retry-After, reset headers) longer than the quota's window or upstream.max_pause, cut to that, by quota.",
            &["quota"],
        );
        let connections = gauge(
            r,
            "crm_proxy_connections",
            "Client connections open, by listener (data, admin).",
            &["listener"],
        );
        let connections_closed = counter(
            r,
            "crm_proxy_connections_closed_total",
            "Connections the proxy closed itself, by listener and reason (over_cap: max_connections were open; header_timeout: no complete request head in time; idle: idle_timeout without a request).",
            &["listener", "reason"],
        );
        let accept_errors = counter(
            r,
            "crm_proxy_accept_errors_total",
            "Failed accepts (out of file descriptors and the like), by listener.",
            &["listener"],
        );
        let request_bytes_buffered = plain(
            "crm_proxy_request_bytes_buffered",
            "Bytes of client request bodies held while read or waiting to be processed (listen.max_buffered_bytes).",
        );
        for l in LISTENERS {
            connections.with_label_values(&[l]);
            accept_errors.with_label_values(&[l]);
            for reason in CLOSE_REASONS {
                connections_closed.with_label_values(&[l, reason]);
            }
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
            for reason in FailReason::ALL {
                failed.with_label_values(&[route, reason.name()]);
            }
            batch_calls_saved.with_label_values(&[route]);
            for kind in ["batch", "job", "item"] {
                batch_failures.with_label_values(&[route, kind]);
            }
            for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
                upstream_responses.with_label_values(&[route, class]);
            }
            for kind in UPSTREAM_ERROR_KINDS {
                upstream_errors.with_label_values(&[route, kind]);
            }
            upstream_duration.with_label_values(&[route]);
            batch_size.with_label_values(&[route]);
            for decision in SHADOW_DECISIONS {
                shadow_decisions.with_label_values(&[route, decision]);
            }
        }
        for q in quotas {
            for g in [&quota_limit, &quota_used, &quota_remaining, &quota_frozen] {
                g.with_label_values(&[q]);
            }
            frozen_seconds.with_label_values(&[q]);
            pauses_capped.with_label_values(&[q]);
            for class in ["read", "live", "drain"] {
                quota_class_used.with_label_values(&[q, class]);
                quota_class_reserved.with_label_values(&[q, class]);
            }
        }
        for l in lanes {
            queue_depth.with_label_values(&[l]);
            queue_oldest_age.with_label_values(&[l]);
        }
        let outlook = super::outlook::Outlook::register(r);
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
            shadow_decisions,
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
            quota_class_used,
            quota_class_reserved,
            queue_depth,
            queue_oldest_age,
            queue_drain_eta,
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
            ledger_shared,
            ledger_decisions,
            ledger_call_duration,
            ledger_errors,
            ledger_fallback_seconds,
            ledger_replicas,
            pauses_capped,
            results_evicted,
            quarantined_records,
            config_reloads,
            breaker_open,
            quarantined_bytes,
            connections,
            connections_closed,
            accept_errors,
            request_bytes_buffered,
            outlook,
        }
    }
}
