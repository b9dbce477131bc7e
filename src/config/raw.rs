//! The config file as written: serde types whose every field is read leniently, so validation can
//! report all problems at once with their paths instead of stopping at the first.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use yaml_serde::Value;

/// A field value that failed to convert keeps its error here instead of aborting the whole parse.
#[derive(Debug, Clone)]
pub struct Raw<T>(pub Result<T, String>);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        Ok(Raw(
            yaml_serde::from_value(value).map_err(|e| tidy(&e.to_string()))
        ))
    }
}

/// yaml_serde messages end with a position that means nothing after `from_value`; drop it.
fn tidy(msg: &str) -> String {
    msg.split(" at line ").next().unwrap_or(msg).to_string()
}

/// Keys nobody asked for; each one is reported as an unknown field.
pub type Unknown = BTreeMap<String, Value>;

/// A number, or a string with a unit: a size (`10MiB`) or a share (`10%`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NumberOrText {
    Bytes(u64),
    Text(String),
}

/// One item or a list of them (`path: /a` or `path: [/a, /b]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The whole config file.
#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    /// A CRM preset (`zendesk`, `salesforce`, `hubspot`, `freshdesk`, `kustomer`, `servicenow`,
    /// `dynamics`): its quotas, routes and CRM dialect are the base this file is merged onto.
    pub preset: Option<Raw<String>>,
    /// The preset's plan, which sets its quota limits (e.g. Zendesk `team`, `professional`).
    pub plan: Option<Raw<String>>,
    /// Listen addresses: `data` (client traffic) and `admin` (metrics, status, health).
    pub listen: Option<Raw<RawListen>>,
    /// The CRM the proxy forwards to.
    pub upstream: Option<Raw<RawUpstream>>,
    /// Largest request body accepted; a larger one gets 413. Default `10MiB`.
    pub max_body_bytes: Option<Raw<NumberOrText>>,
    /// How long a client whose write is parked is held waiting for a slot before it gets
    /// `202 Accepted` (`on_limit: queue`) or the over-limit answer (`on_limit: wait`), for routes
    /// that set no `max_wait` and for unmatched writes. Default `5s`.
    pub default_max_wait: Option<Raw<String>>,
    /// The CRM's budgets. At least one.
    pub quotas: Option<Raw<Vec<Raw<RawQuota>>>>,
    /// Request classes, first match wins; unmatched requests use the built-in `default` route.
    pub routes: Option<Raw<Vec<Raw<RawRoute>>>>,
    /// The parked-write queue.
    pub queue: Option<Raw<RawQueue>>,
    /// On SIGTERM/SIGINT: how long in-flight requests may finish and parked writes keep draining.
    /// Default `30s`.
    pub shutdown_grace: Option<Raw<String>>,
    /// Integrations sharing the CRM budget, matched in order; unmatched requests belong to
    /// `default` (an entry named `default` without `match` sets its weight and caps).
    pub clients: Option<Raw<Vec<Raw<RawClient>>>>,
    /// How the budget is shared between live requests and the drain of parked writes.
    pub fairness: Option<Raw<RawFairness>>,
    /// Where quota counts live: `local` (this process) or `redis` (shared by every replica).
    pub ledger: Option<Raw<RawLedger>>,
    /// Header and query-parameter names that carry credentials, besides those the proxy knows
    /// (`Authorization`, cookies, names with `auth`, `key`, `token`, `secret`, ...): redacted in
    /// every view, and they tell who owns a parked write.
    pub credentials: Option<Raw<Vec<String>>>,
    /// What is logged: a level (`error`, `warn`, `info`, `debug`, `trace`) or filter directives
    /// (`info,crm_quota_proxy=debug`). `RUST_LOG`, when set, wins. Default `info`.
    pub log_level: Option<Raw<String>>,
    /// `false`: shadow mode for the whole proxy; every request is forwarded, the ledger counts
    /// it, and what the proxy would have done is counted in metrics. Default `true`.
    pub enforce: Option<Raw<bool>>,
    /// One structured line per request: method, path (never its query), route, class, client,
    /// outcome, status, time waited, CRM latency, request id.
    pub access_log: Option<Raw<RawAccessLog>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAccessLog {
    /// Default `false`.
    pub enabled: Option<Raw<bool>>,
    /// Share of requests logged, evenly spread (`10%` logs every tenth). Default `100%`.
    pub sample: Option<Raw<String>>,
    /// Answers of 400 and above, and requests whose client went away before the answer, are
    /// logged whatever the sample. Default `true`.
    pub all_errors: Option<Raw<bool>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLedger {
    /// `local` (default): counts in this process. `redis`: one ledger for every replica that
    /// spends the same CRM account.
    pub store: Option<Raw<String>>,
    /// `redis://[:password@]host:port[/db]` or `rediss://…` (TLS). `CRM_PROXY_REDIS_URL`
    /// overrides it, so a password need not be written in the file.
    pub url: Option<Raw<String>>,
    /// The CRM account these counts belong to: every key is under `{key_prefix}` (one hash tag,
    /// so the script runs on Redis Cluster). Replicas of one account share it; another
    /// account needs another prefix.
    pub key_prefix: Option<Raw<String>>,
    /// Replicas expected to share the account. While Redis is unreachable each replica spends
    /// at most `1/replicas` of each quota (or less, if it has seen more replicas). Default `1`.
    pub replicas: Option<Raw<u32>>,
    /// How long one ledger call may take before the replica decides on its own. Default `250ms`.
    pub timeout: Option<Raw<String>>,
    /// This replica's name in the ledger (stable across restarts: a StatefulSet pod's name).
    /// Default: the host name.
    pub replica_id: Option<Raw<String>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawClient {
    /// Unique name (letters, digits, `-`, `_`); a metric label.
    pub name: Option<Raw<String>>,
    /// Share of contended quota relative to other active clients. Default `1`.
    pub weight: Option<Raw<u32>>,
    /// Conditions that all must hold: `header: {name, value}`, `user_agent` (glob with `*`),
    /// `credential` (fingerprint from `crm-quota-proxy fingerprint`), `source` (CIDR).
    #[serde(rename = "match")]
    pub matches: Option<Raw<RawMatch>>,
    /// Hard caps: most calls per window this client may spend of each named quota.
    pub caps: Option<Raw<BTreeMap<String, u32>>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMatch {
    pub header: Option<Raw<RawHeaderMatch>>,
    pub user_agent: Option<Raw<String>>,
    pub credential: Option<Raw<String>>,
    pub source: Option<Raw<String>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawHeaderMatch {
    pub name: Option<Raw<String>>,
    pub value: Option<Raw<String>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawFairness {
    /// Share of each window the drain of parked writes leaves to live requests while live
    /// traffic is about (a request in the last window, or the proxy started within it).
    /// Default `10%`.
    pub live_reserve: Option<Raw<String>>,
    /// Share of each window live requests leave to the drain while parked writes wait, so the
    /// drain never starves. Default `10%`.
    pub drain_min: Option<Raw<String>>,
    /// Share of each window writes, live or parked, leave to reads (routes of class `read`)
    /// while reads are about (one in the last two windows). Default `10%`.
    pub read_reserve: Option<Raw<String>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawListen {
    /// Client traffic (the CRM base URL points here). Default `0.0.0.0:8080`.
    pub data: Option<Raw<String>>,
    /// `/metrics`, `/status`, `/healthz`, `/readyz`. Default `127.0.0.1:9090`.
    pub admin: Option<Raw<String>>,
    /// Client requests processed at once (after their body is read); more wait their turn.
    /// Default `1024`.
    pub max_concurrent_requests: Option<Raw<usize>>,
    /// Client connections open at once on the data listener; one more is accepted and closed at
    /// once. Lowered at start to what the process's file-descriptor limit allows. Default `10000`.
    pub max_connections: Option<Raw<usize>>,
    /// A new connection must deliver its first request's head within this. Default `10s`.
    pub header_timeout: Option<Raw<String>>,
    /// A connection with no request in progress is closed after this long. Default `60s`.
    pub idle_timeout: Option<Raw<String>>,
    /// A request body must arrive within this plus one second per `body_min_rate` bytes; a
    /// client that sends slower gets 408. Default `10s`.
    pub body_timeout: Option<Raw<String>>,
    /// Bytes per second a request body must keep up, beyond `body_timeout`. Default `1KiB`.
    pub body_min_rate: Option<Raw<NumberOrText>>,
    /// Request bytes being read or waiting for processing, over all connections; a body that
    /// would go beyond waits (up to its body deadline) and then gets 503. Default `256MiB`.
    pub max_buffered_bytes: Option<Raw<NumberOrText>>,
    /// Concurrent HTTP/2 streams per connection. Default `100`.
    pub h2_max_streams: Option<Raw<u32>>,
    /// Threads that serve client connections, each with a runtime and a CRM connection pool of
    /// its own, so a request and its CRM call run on one thread. Default: one per core; `0`
    /// serves them on the shared multi-threaded runtime.
    pub data_threads: Option<Raw<u32>>,
    /// A file holding the admin listener's bearer token (never the token itself in this file;
    /// `CRM_PROXY_ADMIN_TOKEN` takes precedence). Unset: the admin listener asks for none.
    pub admin_token_file: Option<Raw<String>>,
    /// Admin paths served without the token: any of `/metrics`, `/healthz`, `/readyz`. Default
    /// all three.
    pub admin_open: Option<Raw<Vec<String>>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawUpstream {
    /// Base URL of the CRM API, `https://acme.zendesk.com`. Required; the environment variable
    /// `CRM_PROXY_UPSTREAM_URL` overrides it.
    pub url: Option<Raw<String>>,
    /// Which CRM's rate-limit headers, throttle answers and over-limit shape to speak: `generic`
    /// (default), `zendesk`, `salesforce`, `hubspot`, `freshdesk`, `kustomer`, `servicenow`,
    /// `dynamics`.
    pub crm: Option<Raw<String>>,
    /// CRM statuses after which a parked write is retried (with backoff). Default `[502, 503, 504]`.
    /// Other 5xx leave the outcome unknown (see `routes[].retry_ambiguous`).
    pub retry_status: Option<Raw<Vec<u16>>>,
    /// PEM file of extra CA certificates trusted besides the built-in web roots.
    pub ca_file: Option<Raw<String>>,
    /// Time allowed to open a TCP (and TLS) connection. Default `5s`.
    pub connect_timeout: Option<Raw<String>>,
    /// Time allowed from sending a request to receiving the response head (for parked writes,
    /// the whole body). A live request that runs out gets 504. Default `30s`.
    pub request_timeout: Option<Raw<String>>,
    /// Idle pooled connections are closed after this long. Default `90s`.
    pub pool_idle_timeout: Option<Raw<String>>,
    /// Idle pooled connections kept, per pool (each data thread has one, the drain another).
    /// Default `32`.
    pub pool_max_idle: Option<Raw<usize>>,
    /// After a CRM 429 without `Retry-After`, the quotas of that route pause this long.
    /// Default `60s`.
    pub retry_after_default: Option<Raw<String>>,
    /// Longest pause the CRM's answers can impose (`Retry-After`, reset headers); a quota whose
    /// window is shorter is paused at most one window, a fixed or daily window at most until its
    /// end. Default `1h`.
    pub max_pause: Option<Raw<String>>,
    /// Shortest pause after a CRM throttle answer that gives no usable delay (`Retry-After: 0`,
    /// a date in the past); doubled at each throttle in a row, up to `max_pause`. Default `1s`.
    pub min_pause: Option<Raw<String>>,
    /// Optional smoothing of every call to the CRM (GCRA): at most `burst` back to back, then
    /// `per_second` on average. Off by default.
    pub pace: Option<Raw<RawPace>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawPace {
    /// Sustained calls per second.
    pub per_second: Option<Raw<f64>>,
    /// Calls allowed back to back. Default `1`.
    pub burst: Option<Raw<u32>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawQuota {
    /// Unique name (letters, digits, `-`, `_`); used in metrics, status and `RateLimit` headers.
    pub name: Option<Raw<String>>,
    /// Most requests allowed in one window.
    pub limit: Option<Raw<u32>>,
    /// Window length, e.g. `10s`, `1m`, `10m`, `1d`.
    pub window: Option<Raw<String>>,
    /// `sliding` (default): at most `limit` in any interval of `window`, safe against any CRM.
    /// `fixed`: at most `limit` per window aligned to the clock (UTC multiples of `window`), or for
    /// `1d` to `reset_at` in `time_zone`; use only when the CRM's boundary is known.
    pub kind: Option<Raw<String>>,
    /// `account` (default): every request consumes it. `route`: only routes that list it.
    pub scope: Option<Raw<String>>,
    /// Daily fixed windows only: the local reset time, `HH:MM`. Default `00:00`.
    pub reset_at: Option<Raw<String>>,
    /// Daily fixed windows only: IANA time zone of `reset_at`. Default `UTC`.
    pub time_zone: Option<Raw<String>>,
    /// Safety margin for network delay: a sliding window is treated as `window + margin` long, a
    /// fixed window stops granting `margin` before it ends. Default `100ms`.
    pub margin: Option<Raw<String>>,
    /// The CRM scope whose rate-limit headers correct this quota (e.g. Zendesk `account` or
    /// `tickets-update`, Salesforce `daily`, HubSpot `burst`/`daily`). Off by default.
    pub sync: Option<Raw<String>>,
    /// Left for other apps when the CRM reports what remains: a count (`20`) or a share (`10%`).
    /// Default `0`.
    pub reserve: Option<Raw<NumberOrText>>,
    /// Count this quota separately per key, built from request parts: `client`, `credential`,
    /// `path:<param>` (a `{param}` of the routes listing it), `header:<name>`. E.g. Zendesk's
    /// 30 updates per 10 min per (user, ticket): `[credential, "path:id"]`.
    pub key: Option<Raw<Vec<String>>>,
    /// Most keys tracked at once; keys beyond it share one overflow window (still within the
    /// limit, more strictly). Idle keys are dropped once their window has passed. Default `10000`.
    pub max_keys: Option<Raw<usize>>,
    /// `false`: counted, never enforced (shadow mode for this quota). Default `true`.
    pub enforce: Option<Raw<bool>>,
    /// Fixed windows only: release the allowance to parked writes over the window instead of
    /// all at once (reads and live requests may still spend it all).
    pub schedule: Option<Raw<RawSchedule>>,
    /// Fixed windows only: forecast when the window runs out and how much of the backlog it
    /// carries. Default: on for windows of an hour or more and for scheduled ones.
    pub forecast: Option<Raw<bool>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawSchedule {
    /// Daily windows only: business hours `HH:MM-HH:MM` in the quota's time zone; the allowance
    /// is released evenly across them. Default: evenly across the whole window.
    pub hours: Option<Raw<String>>,
    /// The share of the limit released at the window's start, e.g. `10%`. Default `0%`.
    pub at_once: Option<Raw<String>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawRoute {
    /// Unique name (letters, digits, `-`, `_`); used as a metric label.
    pub name: Option<Raw<String>>,
    /// HTTP methods matched. Default: any.
    pub methods: Option<Raw<OneOrMany<String>>>,
    /// Path pattern(s): literal segments, `{name}` (one segment, may carry a suffix such as
    /// `{id}.json`), `*` (one segment), `**` (the rest). Required.
    pub path: Option<Raw<OneOrMany<String>>>,
    /// `read` or `write`. Default: `read` when every method is GET, HEAD or OPTIONS, else `write`.
    pub class: Option<Raw<String>>,
    /// Over budget: `queue` (park; 202 after `max_wait`), `wait` (park up to `max_wait`, then the
    /// CRM-native over-limit answer) or `reject` (that answer at once). Default: `queue` for
    /// writes, `reject` for reads.
    pub on_limit: Option<Raw<String>>,
    /// For `queue` and `wait`: how long the client is held. Default `default_max_wait`.
    pub max_wait: Option<Raw<String>>,
    /// Route-scoped quotas this route consumes besides the account-wide ones.
    pub quotas: Option<Raw<Vec<String>>>,
    /// Send an `Idempotency-Key` (the client's own, else one generated per request) so a write
    /// whose outcome is unknown can be retried without creating a duplicate. Default `false`.
    pub idempotency_key: Option<Raw<bool>>,
    /// Retry a write whose outcome is unknown (timeout or reset after sending, 500) even without
    /// an idempotency key; it may then be applied twice. Default `false`.
    pub retry_ambiguous: Option<Raw<bool>>,
    /// `false`: shadow mode for this route's requests. Default `true`.
    pub enforce: Option<Raw<bool>>,
    /// Zendesk only: parked ticket creates and updates of this route share `create_many` /
    /// `update_many` calls. Default: off.
    pub batch: Option<Raw<RawBatch>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawBatch {
    /// Most writes per batch call (2 to 100). Default `100`.
    pub max_size: Option<Raw<usize>>,
    /// How long a parked write may wait for others to share its call. Default `1s`.
    pub max_linger: Option<Raw<String>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawQueue {
    /// Most parked writes held at once (queued, being sent, or failed and kept). A write that
    /// would exceed it gets 503 before acceptance. Default `10000`.
    pub max_entries: Option<Raw<usize>>,
    /// Most bytes held at once: parked requests and the kept CRM answers of delivered writes
    /// (the oldest answers make room for new parked writes). Default `256MiB`.
    pub max_bytes: Option<Raw<NumberOrText>>,
    /// Most delivered writes whose CRM answer is kept for their client (`result_ttl`); beyond
    /// it the oldest is dropped early. Default `10000`.
    pub max_results: Option<Raw<usize>>,
    /// A parked write not sent within this time is dropped as `expired` (counted). Default `24h`.
    pub ttl: Option<Raw<String>>,
    /// How long a finished write's status and CRM response stay readable. Default `1h`.
    pub result_ttl: Option<Raw<String>>,
    /// Sends of a parked write before it is marked `failed` (5xx, connect errors, timeouts).
    /// Default `5`.
    pub max_attempts: Option<Raw<u32>>,
    /// First retry delay, doubled per attempt with full jitter. Default `1s`.
    pub backoff_initial: Option<Raw<String>>,
    /// Largest retry delay. Default `1m`.
    pub backoff_max: Option<Raw<String>>,
    /// Parked writes sent to the CRM concurrently. Default `8`.
    pub max_in_flight: Option<Raw<usize>>,
    /// CRM background jobs (batch calls being processed) in flight at once. Zendesk allows 30
    /// queued or running jobs per account. Default `10`.
    pub max_jobs: Option<Raw<usize>>,
    /// Where accepted writes are kept: `memory` (lost on restart) or `disk` (a write-ahead log in
    /// `data_dir`, fsynced before the 202). Default `memory`.
    pub store: Option<Raw<String>>,
    /// The disk store's directory (created 0700; its files 0600). Required with `store: disk`.
    pub data_dir: Option<Raw<String>>,
    /// Log size that triggers a rewrite of only the live entries. Default `64MiB`.
    pub compact_bytes: Option<Raw<NumberOrText>>,
    #[serde(flatten)]
    pub unknown: Unknown,
}
