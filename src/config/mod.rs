//! Configuration: the YAML file is read leniently (`raw`), then validated into `Config`, reporting
//! every problem at once with its field path.

pub mod preset;
mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::{Method, Uri};

use crate::crm::Crm;
use crate::matching::{Cidr, PathPattern};
use raw::RawConfig;

/// Environment variable that overrides `upstream.url`.
pub const UPSTREAM_URL_ENV: &str = "CRM_PROXY_UPSTREAM_URL";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The preset this config was built on, and its plan (for display; already applied).
    pub preset: Option<(String, String)>,
    pub listen: Listen,
    pub upstream: UpstreamConfig,
    pub max_body_bytes: usize,
    pub default_max_wait: Duration,
    pub quotas: Vec<QuotaConfig>,
    pub routes: Vec<RouteConfig>,
    pub queue: QueueConfig,
    pub shutdown_grace: Duration,
    /// Configured clients, the built-in `default` last.
    pub clients: Vec<ClientConfig>,
    pub fairness: Fairness,
    pub ledger: LedgerConfig,
    /// Extra header and query-parameter names (lower-case) that carry credentials.
    pub credentials: Vec<String>,
    /// The log filter (`RUST_LOG` syntax).
    pub log_level: String,
    /// `false`: shadow mode for every route (forward all, count, report what would have been done).
    pub enforce: bool,
    pub access_log: AccessLog,
}

/// The access log: one structured line per request (log target `access`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccessLog {
    pub enabled: bool,
    /// Fraction of requests logged (evenly spread: 0.1 logs every tenth).
    pub sample: f64,
    /// Answers of 400 and above, and requests whose client went away, are logged whatever the
    /// sample.
    pub all_errors: bool,
}

impl Default for AccessLog {
    fn default() -> AccessLog {
        AccessLog {
            enabled: false,
            sample: 1.0,
            all_errors: true,
        }
    }
}

/// The tracing target of access-log lines.
pub const ACCESS_TARGET: &str = "access";

/// Environment variable that overrides `ledger.url` (keeps a Redis password out of the file).
pub const REDIS_URL_ENV: &str = "CRM_PROXY_REDIS_URL";

/// Where quota counts live.
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerConfig {
    /// In this process only (and in its data directory with `store: disk`).
    Local,
    /// In Redis, shared by every replica spending one CRM account.
    Redis(RedisLedgerConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisLedgerConfig {
    /// The connection URL (may carry a password: never log or show it; see [`Self::display_url`]).
    pub url: String,
    /// Every key is under `{key_prefix}`.
    pub key_prefix: String,
    /// Replicas expected; the fallback share is `1/max(replicas, seen)`.
    pub replicas: u32,
    pub timeout: Duration,
    pub replica_id: String,
}

impl RedisLedgerConfig {
    /// The URL without its password, for logs and status.
    pub fn display_url(&self) -> String {
        display_redis_url(&self.url)
    }
}

/// A Redis URL with any password replaced by `***`.
pub fn display_redis_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => "<not a URL>".to_string(),
    }
}

/// Name of the client that unmatched requests belong to.
pub const DEFAULT_CLIENT: &str = "default";

/// Name of the built-in route used by requests that match no configured route.
pub const DEFAULT_ROUTE: &str = "default";

/// A validated client: how to recognize it and how much of a contended quota it gets.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    pub weight: u32,
    /// All must hold; no rules (only `default`) matches nothing.
    pub rules: Vec<Rule>,
    /// Quota name → most calls per window.
    pub caps: Vec<(String, u32)>,
}

impl ClientConfig {
    /// The built-in `default` client: weight 1, no rules, no caps.
    pub fn default_client() -> ClientConfig {
        ClientConfig {
            name: DEFAULT_CLIENT.into(),
            weight: 1,
            rules: Vec::new(),
            caps: Vec::new(),
        }
    }
}

/// One condition of a client's `match`.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    Header {
        name: HeaderName,
        value: String,
    },
    /// `*` matches any run of characters.
    UserAgent(String),
    /// The credential's fingerprint (32 hex digits), see `crm-quota-proxy fingerprint`.
    Credential(String),
    Source(Cidr),
}

/// How the budget is shared between live requests and the drain of parked writes (fractions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fairness {
    pub live_reserve: f64,
    pub drain_min: f64,
    /// Share of each window writes (live or parked) leave to reads while reads are about.
    pub read_reserve: f64,
}

impl Fairness {
    /// No reserve for anyone: whoever asks first takes the room.
    pub const NONE: Fairness = Fairness {
        live_reserve: 0.0,
        drain_min: 0.0,
        read_reserve: 0.0,
    };
}

/// A part of a keyed quota's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    Client,
    Credential,
    /// A `{param}` of the route's path.
    Path(String),
    Header(http::HeaderName),
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub data: SocketAddr,
    pub admin: SocketAddr,
    pub max_concurrent_requests: usize,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    /// Bytes per second.
    pub body_min_rate: u64,
    pub max_buffered_bytes: u64,
    pub h2_max_streams: u32,
    /// Threads serving client connections, each with its own runtime and CRM connection pool
    /// (`None`: one per core; `Some(0)`: the shared multi-threaded runtime).
    pub data_threads: Option<usize>,
    /// Where the admin listener's bearer token is read from at start (`ADMIN_TOKEN_ENV` first).
    pub admin_token_file: Option<PathBuf>,
    /// Admin paths served without the token (a subset of [`ADMIN_OPEN`]).
    pub admin_open: Vec<String>,
}

/// Environment variable holding the admin listener's bearer token (before `admin_token_file`).
pub const ADMIN_TOKEN_ENV: &str = "CRM_PROXY_ADMIN_TOKEN";

/// The admin paths that may be served without the token: what probes and scrapers read.
pub const ADMIN_OPEN: &[&str] = &["/metrics", "/healthz", "/readyz"];

/// The CRM the proxy forwards to, and how.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Scheme and authority of the CRM, plus an optional path prefix (no trailing `/`).
    pub url: Uri,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    pub retry_after_default: Duration,
    /// Longest pause a CRM answer can impose (see `quota` for the per-window cap).
    pub max_pause: Duration,
    /// Shortest pause after a throttle answer without a usable delay.
    pub min_pause: Duration,
    pub pace: Option<Pace>,
    pub crm: Crm,
    /// CRM statuses after which a parked write is retried.
    pub retry_status: Vec<u16>,
}

impl UpstreamConfig {
    /// The path prefix of the upstream URL, without a trailing slash (empty for none).
    pub fn path_prefix(&self) -> &str {
        self.url.path().trim_end_matches('/')
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaScope {
    /// Consumed by every request.
    Account,
    /// Consumed only by routes that list it.
    Route,
}

/// How a quota's window is laid over time.
#[derive(Debug, Clone, PartialEq)]
pub enum WindowKind {
    /// At most `limit` in any interval of `window`.
    Sliding,
    /// At most `limit` per aligned window: UTC multiples of `window`, or a daily reset.
    Fixed { daily: Option<DailyReset> },
}

/// A daily window boundary at a local time in a time zone (DST-aware: such a day may last 23 or 25 h).
#[derive(Debug, Clone, PartialEq)]
pub struct DailyReset {
    pub at: jiff::civil::Time,
    pub zone: jiff::tz::TimeZone,
    pub zone_name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuotaConfig {
    pub name: String,
    pub limit: u32,
    pub window: Duration,
    pub kind: WindowKind,
    pub scope: QuotaScope,
    pub margin: Duration,
    /// The CRM scope whose headers correct this quota.
    pub sync: Option<String>,
    /// Calls left for other apps when the CRM reports what remains.
    pub reserve: u32,
    /// Parts of the key when the quota is counted per key (empty: one count).
    pub key: Vec<KeyPart>,
    /// `false`: counted but never the reason a request waits, parks or is refused (shadow mode).
    pub enforce: bool,
    pub max_keys: usize,
    /// A fixed window's allowance released to parked writes over the window rather than all
    /// at once (`None`: all at once).
    pub schedule: Option<Schedule>,
    /// Whether `/status` and the metrics forecast when the window runs out (fixed windows).
    pub forecast: bool,
}

/// How a fixed window releases its allowance to deferrable traffic (parked writes): a share at
/// the window's start, the rest evenly across the business hours (or the whole window), all of
/// it by their end. Live requests and reads may spend beyond it, up to the limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Business hours in the quota's time zone (daily windows only): `[start, end)`.
    pub hours: Option<(jiff::civil::Time, jiff::civil::Time)>,
    /// The share of the limit released at the window's start.
    pub at_once: f64,
}

/// Whether a request reads or writes; decides the default `on_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Read,
    Write,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
        }
    }

    /// `read` for GET, HEAD and OPTIONS, `write` for everything else.
    pub fn for_method(m: &Method) -> Class {
        if matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS) {
            Class::Read
        } else {
            Class::Write
        }
    }

    pub fn default_on_limit(self) -> OnLimit {
        match self {
            Class::Read => OnLimit::Reject,
            Class::Write => OnLimit::Queue,
        }
    }
}

/// What happens to a request that finds its quotas spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    Queue,
    Wait,
    Reject,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub methods: Vec<Method>,
    pub paths: Vec<PathPattern>,
    pub class: Class,
    pub on_limit: OnLimit,
    pub max_wait: Duration,
    pub quotas: Vec<String>,
    pub idempotency_key: bool,
    pub retry_ambiguous: bool,
    /// `false`: shadow mode for this route.
    pub enforce: bool,
    pub batch: Option<BatchConfig>,
}

/// Coalescing of parked writes into the CRM's batch endpoints (Zendesk only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    pub max_size: usize,
    pub max_linger: Duration,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub max_results: usize,
    pub ttl: Duration,
    pub result_ttl: Duration,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_in_flight: usize,
    pub max_jobs: usize,
    /// `None`: memory only; `Some(dir)`: the disk store's directory.
    pub data_dir: Option<PathBuf>,
    pub compact_bytes: u64,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where, e.g. `quotas[1].window` (empty for the file as a whole).
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn one(path: &str, message: impl Into<String>) -> ConfigErrors {
        ConfigErrors(vec![ConfigError {
            path: path.to_string(),
            message: message.into(),
        }])
    }
}

impl Config {
    /// The log filter the process runs with: `log_level`, plus the access log's target at
    /// `info` when the access log is on (unless `log_level` names that target itself).
    pub fn log_filter(&self) -> String {
        let named = self
            .log_level
            .split(',')
            .any(|d| d.trim().starts_with(&format!("{ACCESS_TARGET}=")));
        if self.access_log.enabled && !named {
            format!("{},{ACCESS_TARGET}=info", self.log_level)
        } else {
            self.log_level.clone()
        }
    }

    /// Reads and validates a config file; `CRM_PROXY_UPSTREAM_URL` overrides `upstream.url`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::one("", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(
            &text,
            std::env::var(UPSTREAM_URL_ENV).ok().as_deref(),
            std::env::var(REDIS_URL_ENV).ok().as_deref(),
        )
    }

    /// Validates YAML text; `upstream_override` replaces `upstream.url` when given.
    pub fn from_yaml(text: &str, upstream_override: Option<&str>) -> Result<Config, ConfigErrors> {
        Config::parse(text, upstream_override, None)
    }

    /// Validates YAML text with the environment's overrides of `upstream.url` and `ledger.url`.
    fn parse(
        text: &str,
        upstream_override: Option<&str>,
        redis_override: Option<&str>,
    ) -> Result<Config, ConfigErrors> {
        if text.trim().is_empty() {
            return Err(ConfigErrors::one("", "the config is empty"));
        }
        let doc: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                .unwrap_or_default();
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg);
            ConfigErrors::one("", format!("not valid YAML{at}: {msg}"))
        })?;
        let doc = preset::apply(doc)?;
        let raw: RawConfig = yaml_serde::from_value(doc).map_err(|e| {
            ConfigErrors::one(
                "",
                format!("not a config (a mapping of settings is expected): {e}"),
            )
        })?;
        validate::config(raw, upstream_override, redis_override)
    }
}

#[cfg(test)]
mod tests;
