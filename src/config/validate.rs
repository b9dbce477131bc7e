//! Validation: raw values into a [`Config`], every problem collected with its field path.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{Method, Uri};

use super::raw::{self, NumberOrText, OneOrMany, Raw, RawConfig, Unknown};
use super::*;
use crate::crm::zendesk_batch::MAX_BATCH;
use crate::units::{format_duration, format_size, parse_duration, parse_size};

/// Validates a parsed file into a config, or every problem found.
pub(super) fn config(
    raw: RawConfig,
    upstream_override: Option<&str>,
    redis_override: Option<&str>,
) -> Result<Config, ConfigErrors> {
    let mut v = Validator::default();
    let config = v.config(raw, upstream_override, redis_override);
    if v.errors.is_empty() {
        Ok(config.expect("no errors means a complete config"))
    } else {
        Err(ConfigErrors(v.errors))
    }
}

const TOP_FIELDS: &[&str] = &[
    "preset",
    "plan",
    "clients",
    "fairness",
    "listen",
    "upstream",
    "max_body_bytes",
    "default_max_wait",
    "quotas",
    "routes",
    "queue",
    "shutdown_grace",
    "ledger",
    "credentials",
    "log_level",
    "enforce",
    "access_log",
];
const ACCESS_LOG_FIELDS: &[&str] = &["enabled", "sample", "all_errors"];
const LISTEN_FIELDS: &[&str] = &[
    "data",
    "admin",
    "max_concurrent_requests",
    "max_connections",
    "header_timeout",
    "idle_timeout",
    "body_timeout",
    "body_min_rate",
    "max_buffered_bytes",
    "h2_max_streams",
    "data_threads",
    "admin_token_file",
    "admin_open",
];
const UPSTREAM_FIELDS: &[&str] = &[
    "url",
    "ca_file",
    "connect_timeout",
    "request_timeout",
    "pool_idle_timeout",
    "pool_max_idle",
    "retry_after_default",
    "max_pause",
    "min_pause",
    "pace",
    "crm",
    "retry_status",
];
const PACE_FIELDS: &[&str] = &["per_second", "burst"];
const QUOTA_FIELDS: &[&str] = &[
    "name",
    "limit",
    "window",
    "kind",
    "scope",
    "reset_at",
    "time_zone",
    "margin",
    "sync",
    "reserve",
    "key",
    "max_keys",
    "enforce",
    "schedule",
    "forecast",
];
/// Fixed windows at least this long are forecast unless the config says otherwise.
const FORECAST_FROM: Duration = Duration::from_secs(3_600);
const SCHEDULE_FIELDS: &[&str] = &["hours", "at_once"];
const CLIENT_FIELDS: &[&str] = &["name", "weight", "match", "caps"];
const MATCH_FIELDS: &[&str] = &["header", "user_agent", "credential", "source"];
const HEADER_MATCH_FIELDS: &[&str] = &["name", "value"];
const FAIRNESS_FIELDS: &[&str] = &["live_reserve", "drain_min", "read_reserve"];
const ROUTE_FIELDS: &[&str] = &[
    "name",
    "methods",
    "path",
    "class",
    "on_limit",
    "max_wait",
    "quotas",
    "idempotency_key",
    "retry_ambiguous",
    "batch",
    "enforce",
];
const LEDGER_FIELDS: &[&str] = &[
    "store",
    "url",
    "key_prefix",
    "replicas",
    "timeout",
    "replica_id",
];
const BATCH_FIELDS: &[&str] = &["max_size", "max_linger"];
const QUEUE_FIELDS: &[&str] = &[
    "max_entries",
    "max_bytes",
    "max_results",
    "ttl",
    "result_ttl",
    "max_attempts",
    "backoff_initial",
    "backoff_max",
    "max_in_flight",
    "max_jobs",
    "store",
    "data_dir",
    "compact_bytes",
];

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const HOUR: u64 = 3_600;
const DAY: u64 = 86_400;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

// The bounds of every duration, count and size (the README's configuration reference lists
// them): wide enough for any deployment, narrow enough that no accepted value overflows time
// arithmetic or exhausts memory by itself.
const WAIT: (Duration, Duration) = (Duration::ZERO, secs(HOUR));
const GRACE: (Duration, Duration) = (Duration::ZERO, secs(HOUR));
const UPSTREAM_TIMEOUT: (Duration, Duration) = (ms(10), secs(HOUR));
const POOL_IDLE: (Duration, Duration) = (secs(1), secs(DAY));
const RETRY_AFTER_DEFAULT: (Duration, Duration) = (secs(1), secs(DAY));
const MAX_PAUSE: (Duration, Duration) = (secs(1), secs(7 * DAY));
const MIN_PAUSE: (Duration, Duration) = (ms(10), secs(HOUR));
const TTL: (Duration, Duration) = (secs(1), secs(30 * DAY));
const BACKOFF: (Duration, Duration) = (ms(10), secs(DAY));
const WINDOW: (Duration, Duration) = (secs(1), secs(366 * DAY));
const MARGIN: (Duration, Duration) = (Duration::ZERO, secs(HOUR));
const LINGER: (Duration, Duration) = (Duration::ZERO, secs(60));
const HEADER_TIMEOUT: (Duration, Duration) = (ms(100), secs(600));
const IDLE_TIMEOUT: (Duration, Duration) = (secs(1), secs(DAY));
const BODY_TIMEOUT: (Duration, Duration) = (ms(100), secs(HOUR));
const LEDGER_TIMEOUT: (Duration, Duration) = (ms(10), secs(10));
const CONNECTIONS: (usize, usize) = (1, 1_000_000);
const STREAMS: (u32, u32) = (1, 10_000);
const THREADS: (u32, u32) = (0, 1_024);
const WEIGHT: (u32, u32) = (1, 10_000);
const LIMIT: (u32, u32) = (1, 1_000_000_000);
const BURST: (u32, u32) = (1, 1_000_000);
const ENTRIES: (usize, usize) = (1, 100_000_000);
const ATTEMPTS: (u32, u32) = (1, 100);
const IN_FLIGHT: (usize, usize) = (1, 10_000);
const KEYS: (usize, usize) = (1, 10_000_000);
const POOL_MAX_IDLE: (usize, usize) = (0, 10_000);
const REPLICAS: (u32, u32) = (1, 1_000);
/// Calls per second of `upstream.pace`: one an hour to a million.
const PACE: (f64, f64) = (1.0 / 3_600.0, 1e6);

/// Collects errors while turning raw values into validated ones.
#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
}

impl Validator {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The field's value if present and well-typed; a type error is recorded at `path`.
    fn take<T>(&mut self, path: &str, field: Option<Raw<T>>) -> Option<T> {
        match field {
            None => None,
            Some(Raw(Ok(v))) => Some(v),
            Some(Raw(Err(e))) => {
                self.err(path, e);
                None
            }
        }
    }

    fn required<T>(&mut self, path: &str, field: Option<Raw<T>>) -> Option<T> {
        if field.is_none() {
            self.err(path, "is required");
        }
        self.take(path, field)
    }

    fn unknown(&mut self, path: &str, unknown: &Unknown, known: &[&str]) {
        for key in unknown.keys() {
            let at = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            self.err(
                at,
                format!("unknown field (expected one of: {})", known.join(", ")),
            );
        }
    }

    fn duration(&mut self, path: &str, field: Option<Raw<String>>, default: Duration) -> Duration {
        match self.take(path, with_unit_hint(field)) {
            None => default,
            Some(text) => parse_duration(&text).unwrap_or_else(|e| {
                self.err(path, e);
                default
            }),
        }
    }

    /// A duration within `[min, max]` (both shown when it is not).
    fn duration_in(
        &mut self,
        path: &str,
        field: Option<Raw<String>>,
        default: Duration,
        (min, max): (Duration, Duration),
    ) -> Duration {
        let d = self.duration(path, field, default);
        if d < min || d > max {
            self.err(
                path,
                format!(
                    "must be from {} to {}",
                    format_duration(min),
                    format_duration(max)
                ),
            );
        }
        d
    }

    /// A size in bytes within `[1, max]`.
    fn size(
        &mut self,
        path: &str,
        field: Option<Raw<NumberOrText>>,
        default: u64,
        max: u64,
    ) -> u64 {
        let n = match self.take(path, field) {
            None => default,
            Some(NumberOrText::Bytes(n)) => n,
            Some(NumberOrText::Text(t)) => parse_size(&t).unwrap_or_else(|e| {
                self.err(path, e);
                default
            }),
        };
        if n == 0 || n > max {
            self.err(path, format!("must be from 1 byte to {}", format_size(max)));
        }
        n
    }

    /// A count within `[min, max]`.
    fn count<T: PartialOrd + fmt::Display + Copy>(
        &mut self,
        path: &str,
        field: Option<Raw<T>>,
        default: T,
        (min, max): (T, T),
    ) -> T {
        let n = self.take(path, field).unwrap_or(default);
        if n < min || n > max {
            self.err(path, format!("must be from {min} to {max}"));
        }
        n
    }

    fn name(&mut self, path: &str, field: Option<Raw<String>>) -> Option<String> {
        let name = self.required(path, field)?;
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            self.err(
                path,
                format!("{name:?} must be 1-64 letters, digits, '-' or '_'"),
            );
        }
        Some(name)
    }

    /// Records a duplicate `name` among list items.
    fn unique(&mut self, path: &str, name: Option<String>, seen: &mut Vec<String>) {
        if let Some(name) = name {
            if seen.contains(&name) {
                self.err(format!("{path}.name"), format!("{name:?} is used twice"));
            }
            seen.push(name);
        }
    }

    fn config(
        &mut self,
        raw: RawConfig,
        upstream_override: Option<&str>,
        redis_override: Option<&str>,
    ) -> Option<Config> {
        self.unknown("", &raw.unknown, TOP_FIELDS);
        let preset = self.take("preset", raw.preset);
        let plan = self.take("plan", raw.plan);
        let listen = self.listen(raw.listen);
        let upstream = self.upstream(raw.upstream, upstream_override);
        let max_body_bytes = self.size("max_body_bytes", raw.max_body_bytes, 10 << 20, GIB);
        let default_max_wait = self.duration_in(
            "default_max_wait",
            raw.default_max_wait,
            Duration::from_secs(5),
            WAIT,
        );
        let queue = self.queue(raw.queue);
        let crm = upstream.as_ref().map_or(Crm::Generic, |u| u.crm);
        let quotas = self.quotas(raw.quotas, crm);
        let quota_list: Vec<QuotaConfig> = quotas.iter().map(|(_, q)| q.clone()).collect();
        let routes = self.routes(raw.routes, &quota_list, default_max_wait, crm);
        let shutdown_grace = self.duration_in(
            "shutdown_grace",
            raw.shutdown_grace,
            Duration::from_secs(30),
            GRACE,
        );
        let clients = self.clients(raw.clients, &quota_list);
        let fairness = self.fairness(raw.fairness);
        let ledger = self.ledger(raw.ledger, redis_override);
        let enforce = self.take("enforce", raw.enforce).unwrap_or(true);
        let access_log = self.access_log(raw.access_log);
        let log_level = self
            .take("log_level", raw.log_level)
            .unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            self.err(
                "log_level",
                format!("{log_level:?} is not a log level or filter (e.g. info, or info,crm_quota_proxy=debug): {e}"),
            );
        }
        let credentials = self
            .take("credentials", raw.credentials)
            .unwrap_or_default();
        for (i, name) in credentials.iter().enumerate() {
            let token = !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !token {
                self.err(
                    format!("credentials[{i}]"),
                    format!("{name:?} must be a header or parameter name: 1-128 letters, digits, '-', '_' or '.'"),
                );
            }
        }
        // A key part from a path must be a parameter of every route that consumes the quota.
        for (i, q) in &quotas {
            for part in &q.key {
                let KeyPart::Path(param) = part else { continue };
                if q.scope == QuotaScope::Account {
                    self.err(
                        format!("quotas[{i}].key"),
                        format!("\"path:{param}\" needs scope: route (routes without {{{param}}} consume an account quota too)"),
                    );
                    continue;
                }
                for (j, r) in &routes {
                    if r.quotas.contains(&q.name)
                        && !r.paths.iter().all(|p| p.params().any(|n| n == param))
                    {
                        self.err(
                            format!("routes[{j}].path"),
                            format!(
                                "every pattern must have {{{param}}}: quota {:?} is keyed by it",
                                q.name
                            ),
                        );
                    }
                }
            }
            if q.sync.is_some() && !q.key.is_empty() {
                self.err(
                    format!("quotas[{i}].key"),
                    "a keyed quota cannot also sync to CRM headers (they count the whole account)",
                );
            }
        }

        // Cross-field rules.
        if let Some(q) = &queue {
            if (q.max_bytes as u64) < max_body_bytes {
                self.err(
                    "queue.max_bytes",
                    format!(
                        "must be at least max_body_bytes ({max_body_bytes}), or a body of that size could never be parked"
                    ),
                );
            }
            if default_max_wait >= q.ttl {
                self.err("default_max_wait", "must be shorter than queue.ttl");
            }
            for (i, r) in &routes {
                if r.max_wait >= q.ttl {
                    self.err(
                        format!("routes[{i}].max_wait"),
                        "must be shorter than queue.ttl",
                    );
                }
            }
        }
        for (i, q) in &quotas {
            if q.scope == QuotaScope::Route
                && !routes.iter().any(|(_, r)| r.quotas.contains(&q.name))
            {
                self.err(
                    format!("quotas[{i}].scope"),
                    format!(
                        "quota {:?} has scope route but no route lists it in its quotas",
                        q.name
                    ),
                );
            }
        }
        if let Some(l) = &listen
            && l.max_buffered_bytes < max_body_bytes
        {
            self.err(
                "listen.max_buffered_bytes",
                format!("must be at least max_body_bytes ({max_body_bytes})"),
            );
        }
        if let Some(l) = &listen
            && l.data == l.admin
            && l.data.port() != 0
        {
            self.err("listen.admin", "must differ from listen.data");
        }

        Some(Config {
            preset: preset.zip(plan),
            listen: listen?,
            upstream: upstream?,
            max_body_bytes: usize::try_from(max_body_bytes).ok()?,
            default_max_wait,
            quotas: quota_list,
            routes: routes.into_iter().map(|(_, r)| r).collect(),
            queue: queue?,
            shutdown_grace,
            clients,
            fairness,
            ledger: ledger?,
            credentials: credentials.iter().map(|n| n.to_ascii_lowercase()).collect(),
            log_level,
            enforce,
            access_log,
        })
    }

    fn access_log(&mut self, field: Option<Raw<raw::RawAccessLog>>) -> AccessLog {
        let raw = self.take("access_log", field).unwrap_or_default();
        self.unknown("access_log", &raw.unknown, ACCESS_LOG_FIELDS);
        let default = AccessLog::default();
        let sample = match self.take("access_log.sample", raw.sample) {
            None => default.sample,
            Some(t) => match parse_share(&t, 100.0 + f64::EPSILON * 100.0) {
                Some(f) if f > 0.0 => f.min(1.0),
                _ => {
                    self.err(
                        "access_log.sample",
                        format!("{t:?} is not a share above 0% and at most 100% (e.g. 10%)"),
                    );
                    default.sample
                }
            },
        };
        AccessLog {
            enabled: self
                .take("access_log.enabled", raw.enabled)
                .unwrap_or(default.enabled),
            sample,
            all_errors: self
                .take("access_log.all_errors", raw.all_errors)
                .unwrap_or(default.all_errors),
        }
    }

    fn ledger(
        &mut self,
        field: Option<Raw<raw::RawLedger>>,
        url_override: Option<&str>,
    ) -> Option<LedgerConfig> {
        let raw = self.take("ledger", field).unwrap_or_default();
        self.unknown("ledger", &raw.unknown, LEDGER_FIELDS);
        let store = self.take("ledger.store", raw.store);
        let url = self.take("ledger.url", raw.url);
        let key_prefix = self.take("ledger.key_prefix", raw.key_prefix);
        let replicas = self.take("ledger.replicas", raw.replicas);
        let timeout_set = raw.timeout.is_some();
        let timeout = self.duration_in(
            "ledger.timeout",
            raw.timeout,
            Duration::from_millis(250),
            LEDGER_TIMEOUT,
        );
        let replica_id = self.take("ledger.replica_id", raw.replica_id);
        match store.as_deref() {
            None | Some("local") => {
                for (field, set) in [
                    ("url", url.is_some()),
                    ("key_prefix", key_prefix.is_some()),
                    ("replicas", replicas.is_some()),
                    ("timeout", timeout_set),
                    ("replica_id", replica_id.is_some()),
                ] {
                    if set {
                        self.err(
                            format!("ledger.{field}"),
                            "is only used with `store: redis`",
                        );
                    }
                }
                Some(LedgerConfig::Local)
            }
            Some("redis") => {
                let (url, path) = match url_override {
                    Some(u) => (
                        Some(u.to_string()),
                        format!("ledger.url (from {REDIS_URL_ENV})"),
                    ),
                    None => (url, "ledger.url".to_string()),
                };
                let url = match url {
                    None => {
                        self.err(
                            "ledger.url",
                            format!("is required with `store: redis` (or set {REDIS_URL_ENV})"),
                        );
                        None
                    }
                    Some(u) => match redis_url_problem(&u) {
                        Some(problem) => {
                            self.err(path, problem);
                            None
                        }
                        None => Some(u),
                    },
                };
                let key_prefix = match key_prefix {
                    None => {
                        self.err(
                            "ledger.key_prefix",
                            "is required with `store: redis`: name the CRM account the replicas share (e.g. acme-zendesk)",
                        );
                        None
                    }
                    Some(p)
                        if p.is_empty()
                            || p.len() > 64
                            || !p.chars().all(|c| {
                                c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
                            }) =>
                    {
                        self.err(
                            "ledger.key_prefix",
                            format!("{p:?} must be 1-64 letters, digits, '-', '_', '.' or ':'"),
                        );
                        None
                    }
                    Some(p) => Some(p),
                };
                let replicas = replicas.unwrap_or(1);
                if !(REPLICAS.0..=REPLICAS.1).contains(&replicas) {
                    self.err(
                        "ledger.replicas",
                        format!("must be from {} to {}", REPLICAS.0, REPLICAS.1),
                    );
                }
                let replica_id = match replica_id {
                    Some(id) => {
                        if id.is_empty()
                            || id.len() > 128
                            || id.chars().any(|c| c.is_whitespace() || c.is_control())
                        {
                            self.err(
                                "ledger.replica_id",
                                format!("{id:?} must be 1-128 characters without spaces"),
                            );
                        }
                        id
                    }
                    None => default_replica_id(),
                };
                Some(LedgerConfig::Redis(RedisLedgerConfig {
                    url: url?,
                    key_prefix: key_prefix?,
                    replicas,
                    timeout,
                    replica_id,
                }))
            }
            Some(other) => {
                self.err(
                    "ledger.store",
                    format!("{other:?} is not a ledger store (local or redis)"),
                );
                None
            }
        }
    }

    /// Configured clients with `default` last (added when not configured).
    fn clients(
        &mut self,
        field: Option<Raw<Vec<Raw<raw::RawClient>>>>,
        quotas: &[QuotaConfig],
    ) -> Vec<ClientConfig> {
        let mut out: Vec<ClientConfig> = Vec::new();
        let mut default = None;
        let mut seen = Vec::new();
        for (i, item) in self
            .take("clients", field)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let path = format!("clients[{i}]");
            let Some(raw) = self.take(&path, Some(item)) else {
                continue;
            };
            self.unknown(&path, &raw.unknown, CLIENT_FIELDS);
            let name = written_name(&raw.name);
            self.unique(&path, name.clone(), &mut seen);
            let name = self.name(&format!("{path}.name"), raw.name);
            let weight = self.count(&format!("{path}.weight"), raw.weight, 1, WEIGHT);
            let mut caps = Vec::new();
            for (quota, cap) in self
                .take(&format!("{path}.caps"), raw.caps)
                .unwrap_or_default()
            {
                match quotas.iter().find(|q| q.name == quota) {
                    None => self.err(
                        format!("{path}.caps.{quota}"),
                        format!("no quota is named {quota:?}"),
                    ),
                    Some(_) if cap == 0 => {
                        self.err(format!("{path}.caps.{quota}"), "must be at least 1")
                    }
                    Some(_) => caps.push((quota, cap)),
                }
            }
            let rules = self
                .take(&format!("{path}.match"), raw.matches)
                .map(|m| self.rules(&format!("{path}.match"), m))
                .unwrap_or_default();
            let Some(name) = name else { continue };
            let client = ClientConfig {
                name,
                weight,
                rules,
                caps,
            };
            if client.name == DEFAULT_CLIENT {
                if !client.rules.is_empty() {
                    self.err(
                        format!("{path}.match"),
                        "the default client takes what no other matches; it has no match",
                    );
                }
                default = Some(client);
            } else {
                if client.rules.is_empty() {
                    self.err(
                        format!("{path}.match"),
                        "is required (only the default client has none)",
                    );
                }
                out.push(client);
            }
        }
        out.push(default.unwrap_or_else(ClientConfig::default_client));
        out
    }

    fn rules(&mut self, path: &str, m: raw::RawMatch) -> Vec<Rule> {
        self.unknown(path, &m.unknown, MATCH_FIELDS);
        let mut rules = Vec::new();
        if let Some(h) = self.take(&format!("{path}.header"), m.header) {
            self.unknown(&format!("{path}.header"), &h.unknown, HEADER_MATCH_FIELDS);
            let name = self.required(&format!("{path}.header.name"), h.name);
            let value = self.required(&format!("{path}.header.value"), h.value);
            if let (Some(name), Some(value)) = (name, value) {
                match http::HeaderName::from_bytes(name.as_bytes()) {
                    Ok(name) => rules.push(Rule::Header { name, value }),
                    Err(_) => self.err(
                        format!("{path}.header.name"),
                        format!("{name:?} is not a header name"),
                    ),
                }
            }
        }
        if let Some(ua) = self.take(&format!("{path}.user_agent"), m.user_agent) {
            rules.push(Rule::UserAgent(ua));
        }
        if let Some(fp) = self.take(&format!("{path}.credential"), m.credential) {
            if fp.len() == 32 && fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                rules.push(Rule::Credential(fp));
            } else {
                self.err(
                    format!("{path}.credential"),
                    "must be a fingerprint of 32 lowercase hex digits (print one with: crm-quota-proxy fingerprint)",
                );
            }
        }
        if let Some(net) = self.take(&format!("{path}.source"), m.source) {
            match Cidr::parse(&net) {
                Ok(c) => rules.push(Rule::Source(c)),
                Err(e) => self.err(format!("{path}.source"), e),
            }
        }
        rules
    }

    fn fairness(&mut self, field: Option<Raw<raw::RawFairness>>) -> Fairness {
        let raw = self.take("fairness", field).unwrap_or_default();
        self.unknown("fairness", &raw.unknown, FAIRNESS_FIELDS);
        let share = |v: &mut Validator, path: &str, f: Option<Raw<String>>| -> f64 {
            match v.take(path, f) {
                None => 0.1,
                Some(t) => parse_share(&t, 50.0).unwrap_or_else(|| {
                    v.err(path, format!("{t:?} is not a share under 50% (e.g. 10%)"));
                    0.1
                }),
            }
        };
        Fairness {
            live_reserve: share(self, "fairness.live_reserve", raw.live_reserve),
            drain_min: share(self, "fairness.drain_min", raw.drain_min),
            read_reserve: share(self, "fairness.read_reserve", raw.read_reserve),
        }
    }

    fn listen(&mut self, field: Option<Raw<raw::RawListen>>) -> Option<Listen> {
        let raw = self.take("listen", field).unwrap_or_default();
        self.unknown("listen", &raw.unknown, LISTEN_FIELDS);
        let addr = |v: &mut Validator, path: &str, f: Option<Raw<String>>, default: &str| {
            let text = v.take(path, f).unwrap_or_else(|| default.to_string());
            text.parse::<SocketAddr>()
                .map_err(|_| {
                    v.err(
                        path,
                        format!("{text:?} is not an address (write IP:port, e.g. 0.0.0.0:8080)"),
                    )
                })
                .ok()
        };
        let data = addr(self, "listen.data", raw.data, "0.0.0.0:8080");
        let admin = addr(self, "listen.admin", raw.admin, "127.0.0.1:9090");
        let max_concurrent_requests = self.count(
            "listen.max_concurrent_requests",
            raw.max_concurrent_requests,
            1024,
            CONNECTIONS,
        );
        let max_connections = self.count(
            "listen.max_connections",
            raw.max_connections,
            10_000,
            CONNECTIONS,
        );
        let header_timeout = self.duration_in(
            "listen.header_timeout",
            raw.header_timeout,
            Duration::from_secs(10),
            HEADER_TIMEOUT,
        );
        let idle_timeout = self.duration_in(
            "listen.idle_timeout",
            raw.idle_timeout,
            Duration::from_secs(60),
            IDLE_TIMEOUT,
        );
        let body_timeout = self.duration_in(
            "listen.body_timeout",
            raw.body_timeout,
            Duration::from_secs(10),
            BODY_TIMEOUT,
        );
        let body_min_rate = self.size("listen.body_min_rate", raw.body_min_rate, 1 << 10, GIB);
        let max_buffered_bytes = self.size(
            "listen.max_buffered_bytes",
            raw.max_buffered_bytes,
            256 << 20,
            TIB,
        );
        let h2_max_streams = self.count("listen.h2_max_streams", raw.h2_max_streams, 100, STREAMS);
        let data_threads = raw
            .data_threads
            .is_some()
            .then(|| self.count("listen.data_threads", raw.data_threads, 0, THREADS) as usize);
        let admin_token_file = self
            .take("listen.admin_token_file", raw.admin_token_file)
            .and_then(|f| match f.trim() {
                "" => {
                    self.err(
                        "listen.admin_token_file",
                        "is empty (name a file holding the token)",
                    );
                    None
                }
                f => Some(PathBuf::from(f)),
            });
        let admin_open = match self.take("listen.admin_open", raw.admin_open) {
            None => ADMIN_OPEN.iter().map(|p| p.to_string()).collect(),
            Some(paths) => {
                for (i, p) in paths.iter().enumerate() {
                    if !ADMIN_OPEN.contains(&p.as_str()) {
                        self.err(
                            format!("listen.admin_open[{i}]"),
                            format!("{p:?} cannot be opened (only {})", ADMIN_OPEN.join(", ")),
                        );
                    }
                }
                paths
            }
        };
        Some(Listen {
            data: data?,
            admin: admin?,
            max_concurrent_requests,
            max_connections,
            header_timeout,
            idle_timeout,
            body_timeout,
            body_min_rate,
            max_buffered_bytes,
            h2_max_streams,
            data_threads,
            admin_token_file,
            admin_open,
        })
    }

    fn upstream(
        &mut self,
        field: Option<Raw<raw::RawUpstream>>,
        url_override: Option<&str>,
    ) -> Option<UpstreamConfig> {
        let raw = self.required("upstream", field)?;
        self.unknown("upstream", &raw.unknown, UPSTREAM_FIELDS);
        let url_text = match url_override {
            Some(u) => {
                // Still report a malformed value in the file: the override may not be set next time.
                self.take("upstream.url", raw.url);
                Some(u.to_string())
            }
            None => self.required("upstream.url", raw.url),
        };
        let path = if url_override.is_some() {
            format!("upstream.url (from {UPSTREAM_URL_ENV})")
        } else {
            "upstream.url".to_string()
        };
        let url = url_text.and_then(|t| self.upstream_url(&path, &t));
        let ca_file = self
            .take("upstream.ca_file", raw.ca_file)
            .map(PathBuf::from);
        if let Some(ca) = &ca_file
            && let Err(e) = crate::tls::load_ca_file(ca)
        {
            self.err("upstream.ca_file", e);
        }
        let connect_timeout = self.duration_in(
            "upstream.connect_timeout",
            raw.connect_timeout,
            Duration::from_secs(5),
            UPSTREAM_TIMEOUT,
        );
        let request_timeout = self.duration_in(
            "upstream.request_timeout",
            raw.request_timeout,
            Duration::from_secs(30),
            UPSTREAM_TIMEOUT,
        );
        let pool_idle_timeout = self.duration_in(
            "upstream.pool_idle_timeout",
            raw.pool_idle_timeout,
            Duration::from_secs(90),
            POOL_IDLE,
        );
        let pool_max_idle = self.count(
            "upstream.pool_max_idle",
            raw.pool_max_idle,
            32,
            POOL_MAX_IDLE,
        );
        let retry_after_default = self.duration_in(
            "upstream.retry_after_default",
            raw.retry_after_default,
            Duration::from_secs(60),
            RETRY_AFTER_DEFAULT,
        );
        let max_pause = self.duration_in(
            "upstream.max_pause",
            raw.max_pause,
            Duration::from_secs(3_600),
            MAX_PAUSE,
        );
        let min_pause = self.duration_in(
            "upstream.min_pause",
            raw.min_pause,
            Duration::from_secs(1),
            MIN_PAUSE,
        );
        if min_pause > max_pause {
            self.err("upstream.min_pause", "must be at most upstream.max_pause");
        }
        let crm = match self.take("upstream.crm", raw.crm) {
            None => Crm::Generic,
            Some(name) => name.parse().unwrap_or_else(|e: String| {
                self.err("upstream.crm", e);
                Crm::Generic
            }),
        };
        let retry_status = self
            .take("upstream.retry_status", raw.retry_status)
            .unwrap_or_else(|| vec![502, 503, 504]);
        for (i, code) in retry_status.iter().enumerate() {
            if !(500..=599).contains(code) {
                self.err(
                    format!("upstream.retry_status[{i}]"),
                    format!("{code} is not a 5xx status (a 4xx is the CRM's final answer; 429 is always a throttle)"),
                );
            }
        }
        let pace = self.take("upstream.pace", raw.pace).and_then(|p| {
            self.unknown("upstream.pace", &p.unknown, PACE_FIELDS);
            let per_second = self.required("upstream.pace.per_second", p.per_second);
            if let Some(r) = per_second
                && !(r.is_finite() && (PACE.0..=PACE.1).contains(&r))
            {
                self.err(
                    "upstream.pace.per_second",
                    format!("must be from {:.6} (one an hour) to {}", PACE.0, PACE.1),
                );
            }
            let burst = self.count("upstream.pace.burst", p.burst, 1, BURST);
            Some(Pace {
                per_second: per_second?,
                burst,
            })
        });
        Some(UpstreamConfig {
            url: url?,
            ca_file,
            connect_timeout,
            request_timeout,
            pool_idle_timeout,
            pool_max_idle,
            retry_after_default,
            max_pause,
            min_pause,
            pace,
            crm,
            retry_status,
        })
    }

    fn upstream_url(&mut self, path: &str, text: &str) -> Option<Uri> {
        let uri: Uri = match text.parse() {
            Ok(u) => u,
            Err(_) => {
                self.err(path, format!("{text:?} is not a URL"));
                return None;
            }
        };
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                self.err(
                    path,
                    format!("{text:?} must start with http:// or https://"),
                );
                return None;
            }
        }
        let Some(authority) = uri.authority() else {
            self.err(path, format!("{text:?} has no host"));
            return None;
        };
        if authority.as_str().contains('@') {
            self.err(
                path,
                "must not carry credentials; clients send their own Authorization header",
            );
            return None;
        }
        if uri.query().is_some() {
            self.err(path, format!("{text:?} must not have a query"));
            return None;
        }
        Some(uri)
    }

    fn queue(&mut self, field: Option<Raw<raw::RawQueue>>) -> Option<QueueConfig> {
        let raw = self.take("queue", field).unwrap_or_default();
        self.unknown("queue", &raw.unknown, QUEUE_FIELDS);
        let max_entries = self.count("queue.max_entries", raw.max_entries, 10_000, ENTRIES);
        let max_bytes = self.size("queue.max_bytes", raw.max_bytes, 256 << 20, TIB);
        let max_results = self.count("queue.max_results", raw.max_results, 10_000, ENTRIES);
        let ttl = self.duration_in("queue.ttl", raw.ttl, Duration::from_secs(86_400), TTL);
        let result_ttl = self.duration_in(
            "queue.result_ttl",
            raw.result_ttl,
            Duration::from_secs(3_600),
            TTL,
        );
        let max_attempts = self.count("queue.max_attempts", raw.max_attempts, 5, ATTEMPTS);
        let backoff_initial = self.duration_in(
            "queue.backoff_initial",
            raw.backoff_initial,
            Duration::from_secs(1),
            BACKOFF,
        );
        let backoff_max = self.duration_in(
            "queue.backoff_max",
            raw.backoff_max,
            Duration::from_secs(60),
            BACKOFF,
        );
        if backoff_max < backoff_initial {
            self.err(
                "queue.backoff_max",
                "must be at least queue.backoff_initial",
            );
        }
        let max_in_flight = self.count("queue.max_in_flight", raw.max_in_flight, 8, IN_FLIGHT);
        // Zendesk's limit on queued and running jobs.
        let max_jobs = self.count("queue.max_jobs", raw.max_jobs, 10, (1, 30));
        let data_dir = self.take("queue.data_dir", raw.data_dir);
        let data_dir = match self.take("queue.store", raw.store).as_deref() {
            None | Some("memory") => {
                if data_dir.is_some() {
                    self.err("queue.data_dir", "is only used with `store: disk`");
                }
                None
            }
            Some("disk") => match data_dir {
                Some(dir) if dir.is_empty() => {
                    self.err("queue.data_dir", "must not be empty");
                    None
                }
                Some(dir) => Some(PathBuf::from(dir)),
                None => {
                    self.err("queue.data_dir", "is required with `store: disk`");
                    None
                }
            },
            Some(other) => {
                self.err(
                    "queue.store",
                    format!("{other:?} is not a store (memory or disk)"),
                );
                None
            }
        };
        let compact_bytes = self.size("queue.compact_bytes", raw.compact_bytes, 64 << 20, TIB);
        Some(QueueConfig {
            max_entries,
            max_bytes: usize::try_from(max_bytes).ok()?,
            max_results,
            ttl,
            result_ttl,
            max_attempts,
            backoff_initial,
            backoff_max,
            max_in_flight,
            max_jobs,
            data_dir,
            compact_bytes,
        })
    }

    /// Valid quotas with their index in the file.
    fn quotas(
        &mut self,
        field: Option<Raw<Vec<Raw<raw::RawQuota>>>>,
        crm: Crm,
    ) -> Vec<(usize, QuotaConfig)> {
        let Some(list) = self.required("quotas", field) else {
            return Vec::new();
        };
        if list.is_empty() {
            self.err("quotas", "must list at least one quota");
        }
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for (i, item) in list.into_iter().enumerate() {
            let path = format!("quotas[{i}]");
            let Some(raw) = self.take(&path, Some(item)) else {
                continue;
            };
            let name = written_name(&raw.name);
            if let Some(q) = self.quota(&path, raw, crm) {
                out.push((i, q));
            }
            self.unique(&path, name, &mut seen);
        }
        out
    }

    fn quota(&mut self, path: &str, raw: raw::RawQuota, crm: Crm) -> Option<QuotaConfig> {
        self.unknown(path, &raw.unknown, QUOTA_FIELDS);
        let name = self.name(&format!("{path}.name"), raw.name);
        let limit_path = format!("{path}.limit");
        let limit = self.required(&limit_path, raw.limit);
        if let Some(l) = limit
            && !(LIMIT.0..=LIMIT.1).contains(&l)
        {
            self.err(
                &limit_path,
                format!("must be from {} to {}", LIMIT.0, LIMIT.1),
            );
        }
        let window_path = format!("{path}.window");
        let window = match self.required(&window_path, with_unit_hint(raw.window)) {
            None => None,
            Some(text) => match parse_duration(&text) {
                Ok(d) if d < WINDOW.0 || d > WINDOW.1 => {
                    self.err(
                        &window_path,
                        format!(
                            "must be from {} to {}",
                            format_duration(WINDOW.0),
                            format_duration(WINDOW.1)
                        ),
                    );
                    None
                }
                Ok(d) => Some(d),
                Err(e) => {
                    self.err(&window_path, e);
                    None
                }
            },
        };
        let scope = match self.take(&format!("{path}.scope"), raw.scope).as_deref() {
            None | Some("account") => QuotaScope::Account,
            Some("route") => QuotaScope::Route,
            Some(other) => {
                self.err(
                    format!("{path}.scope"),
                    format!("{other:?} is not a scope (account or route)"),
                );
                QuotaScope::Account
            }
        };
        let margin = self.duration_in(
            &format!("{path}.margin"),
            raw.margin,
            Duration::from_millis(100),
            MARGIN,
        );
        if let Some(w) = window
            && margin.saturating_mul(2) >= w
        {
            self.err(
                format!("{path}.margin"),
                "must be less than half the window",
            );
        }
        let reset_at = self.take(&format!("{path}.reset_at"), raw.reset_at);
        let time_zone = self.take(&format!("{path}.time_zone"), raw.time_zone);
        let kind = match self.take(&format!("{path}.kind"), raw.kind).as_deref() {
            None | Some("sliding") => {
                for (field, set) in [
                    ("reset_at", reset_at.is_some()),
                    ("time_zone", time_zone.is_some()),
                ] {
                    if set {
                        self.err(
                            format!("{path}.{field}"),
                            "applies only to kind: fixed with window: 1d",
                        );
                    }
                }
                WindowKind::Sliding
            }
            Some("fixed") => {
                let daily = window == Some(Duration::from_secs(86_400));
                if !daily {
                    for (field, set) in [
                        ("reset_at", reset_at.is_some()),
                        ("time_zone", time_zone.is_some()),
                    ] {
                        if set {
                            self.err(
                                format!("{path}.{field}"),
                                "applies only to kind: fixed with window: 1d",
                            );
                        }
                    }
                }
                let reset = daily
                    .then(|| self.daily_reset(path, reset_at, time_zone))
                    .flatten();
                WindowKind::Fixed { daily: reset }
            }
            Some(other) => {
                self.err(
                    format!("{path}.kind"),
                    format!("{other:?} is not a window kind (sliding or fixed)"),
                );
                WindowKind::Sliding
            }
        };
        let sync = self.take(&format!("{path}.sync"), raw.sync);
        if let Some(s) = &sync
            && let Err(e) = crm.check_scope(s)
        {
            self.err(format!("{path}.sync"), e);
        }
        let reserve = match self.take(&format!("{path}.reserve"), raw.reserve) {
            None => 0,
            Some(NumberOrText::Bytes(n)) => u32::try_from(n).unwrap_or(u32::MAX),
            Some(NumberOrText::Text(t)) => match parse_share(&t, 100.0) {
                Some(p) => (f64::from(limit.unwrap_or(0)) * p).ceil() as u32,
                None => {
                    self.err(
                        format!("{path}.reserve"),
                        format!("{t:?} is not a reserve (write a count, or a share under 100%, e.g. 10%)"),
                    );
                    0
                }
            },
        };
        let mut key = Vec::new();
        for (j, part) in self
            .take(&format!("{path}.key"), raw.key)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let parsed = match part.split_once(':') {
                None if part == "client" => Some(KeyPart::Client),
                None if part == "credential" => Some(KeyPart::Credential),
                Some(("path", p)) if !p.is_empty() => Some(KeyPart::Path(p.to_string())),
                Some(("header", h)) => http::HeaderName::from_bytes(h.as_bytes())
                    .ok()
                    .map(KeyPart::Header),
                _ => None,
            };
            match parsed {
                Some(k) => key.push(k),
                None => self.err(
                    format!("{path}.key[{j}]"),
                    format!("{part:?} is not a key part (client, credential, path:<param>, header:<name>)"),
                ),
            }
        }
        let max_keys = self.count(&format!("{path}.max_keys"), raw.max_keys, 10_000, KEYS);
        if let Some(l) = limit
            && reserve >= l
            && l > 0
        {
            self.err(
                format!("{path}.reserve"),
                "must leave the proxy something: below the limit",
            );
        }
        let enforce = self
            .take(&format!("{path}.enforce"), raw.enforce)
            .unwrap_or(true);
        let schedule = self
            .take(&format!("{path}.schedule"), raw.schedule)
            .and_then(|s| self.schedule(&format!("{path}.schedule"), s, &kind));
        let fixed = matches!(kind, WindowKind::Fixed { .. });
        let forecast = match self.take(&format!("{path}.forecast"), raw.forecast) {
            Some(true) if !fixed || !key.is_empty() => {
                self.err(
                    format!("{path}.forecast"),
                    "applies only to unkeyed quotas of kind: fixed (a window that resets on the clock)",
                );
                false
            }
            Some(on) => on,
            None => {
                fixed
                    && key.is_empty()
                    && (schedule.is_some() || window.is_some_and(|w| w >= FORECAST_FROM))
            }
        };
        Some(QuotaConfig {
            name: name?,
            limit: limit?,
            window: window?,
            kind,
            scope,
            margin,
            sync,
            reserve,
            key,
            max_keys,
            enforce,
            schedule,
            forecast,
        })
    }

    /// A quota's release schedule: a fixed window's, with business hours only on a daily one
    /// (and not across its reset).
    fn schedule(
        &mut self,
        path: &str,
        raw: raw::RawSchedule,
        kind: &WindowKind,
    ) -> Option<Schedule> {
        self.unknown(path, &raw.unknown, SCHEDULE_FIELDS);
        let WindowKind::Fixed { daily } = kind else {
            self.err(
                path,
                "applies only to kind: fixed (a schedule releases a window that starts and ends on the clock)",
            );
            return None;
        };
        let at_once = match self.take(&format!("{path}.at_once"), raw.at_once) {
            None => 0.0,
            Some(t) => parse_share(&t, 100.0).unwrap_or_else(|| {
                self.err(
                    format!("{path}.at_once"),
                    format!("{t:?} is not a share (write a percentage under 100%, e.g. 10%)"),
                );
                0.0
            }),
        };
        let hours_path = format!("{path}.hours");
        let hours = match self.take(&hours_path, raw.hours) {
            None => None,
            Some(text) => {
                let parsed = text.split_once('-').and_then(|(a, b)| {
                    Some((parse_clock_time(a.trim())?, parse_clock_time(b.trim())?))
                });
                match (parsed, daily) {
                    (None, _) => {
                        self.err(
                            &hours_path,
                            format!("{text:?} is not business hours (write HH:MM-HH:MM, e.g. 08:00-18:00)"),
                        );
                        None
                    }
                    (Some((start, end)), _) if start >= end => {
                        self.err(
                            &hours_path,
                            "must start before they end (hours across midnight are not supported)",
                        );
                        None
                    }
                    (Some(_), None) => {
                        self.err(
                            &hours_path,
                            "applies only to daily windows (kind: fixed, window: 1d)",
                        );
                        None
                    }
                    (Some((start, end)), Some(d)) if start < d.at && d.at < end => {
                        self.err(
                            &hours_path,
                            format!("must not span the window's reset at {}", d.at),
                        );
                        None
                    }
                    (Some(h), Some(_)) => Some(h),
                }
            }
        };
        Some(Schedule { hours, at_once })
    }

    fn daily_reset(
        &mut self,
        path: &str,
        reset_at: Option<String>,
        time_zone: Option<String>,
    ) -> Option<DailyReset> {
        let at_text = reset_at.unwrap_or_else(|| "00:00".into());
        let at = parse_clock_time(&at_text);
        if at.is_none() {
            self.err(
                format!("{path}.reset_at"),
                format!("{at_text:?} is not a time of day (write HH:MM, e.g. 00:00)"),
            );
        }
        let zone_name = time_zone.unwrap_or_else(|| "UTC".into());
        let zone = jiff::tz::TimeZone::get(&zone_name)
            .map_err(|_| {
                self.err(
                    format!("{path}.time_zone"),
                    format!("{zone_name:?} is not an IANA time zone (e.g. America/New_York)"),
                )
            })
            .ok();
        Some(DailyReset {
            at: at?,
            zone: zone?,
            zone_name,
        })
    }

    fn routes(
        &mut self,
        field: Option<Raw<Vec<Raw<raw::RawRoute>>>>,
        quotas: &[QuotaConfig],
        default_max_wait: Duration,
        crm: Crm,
    ) -> Vec<(usize, RouteConfig)> {
        let list = self.take("routes", field).unwrap_or_default();
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for (i, item) in list.into_iter().enumerate() {
            let path = format!("routes[{i}]");
            let Some(raw) = self.take(&path, Some(item)) else {
                continue;
            };
            let name = written_name(&raw.name);
            if let Some(r) = self.route(&path, raw, quotas, default_max_wait, crm) {
                out.push((i, r));
            }
            self.unique(&path, name, &mut seen);
        }
        out
    }

    fn route(
        &mut self,
        path: &str,
        raw: raw::RawRoute,
        quotas: &[QuotaConfig],
        default_max_wait: Duration,
        crm: Crm,
    ) -> Option<RouteConfig> {
        self.unknown(path, &raw.unknown, ROUTE_FIELDS);
        let name = self.name(&format!("{path}.name"), raw.name);
        if name.as_deref() == Some(DEFAULT_ROUTE) {
            self.err(
                format!("{path}.name"),
                "\"default\" is reserved for unmatched requests",
            );
        }
        let mut methods = Vec::new();
        for (j, m) in self
            .take(&format!("{path}.methods"), raw.methods)
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let upper = m.to_ascii_uppercase();
            match Method::from_bytes(upper.as_bytes()) {
                Ok(method) if upper == m => methods.push(method),
                _ => self.err(
                    format!("{path}.methods[{j}]"),
                    format!("{m:?} is not an HTTP method (write it in capitals, e.g. POST)"),
                ),
            }
        }
        let mut paths = Vec::new();
        let path_list = self
            .required(&format!("{path}.path"), raw.path)
            .map(OneOrMany::into_vec);
        if let Some(list) = path_list {
            if list.is_empty() {
                self.err(format!("{path}.path"), "must list at least one pattern");
            }
            for (j, p) in list.iter().enumerate() {
                match PathPattern::parse(p) {
                    Ok(pat) => paths.push(pat),
                    Err(e) => {
                        let at = if list.len() == 1 {
                            format!("{path}.path")
                        } else {
                            format!("{path}.path[{j}]")
                        };
                        self.err(at, e);
                    }
                }
            }
        }
        let class = match self.take(&format!("{path}.class"), raw.class).as_deref() {
            Some("read") => Class::Read,
            Some("write") => Class::Write,
            None if !methods.is_empty()
                && methods.iter().all(|m| Class::for_method(m) == Class::Read) =>
            {
                Class::Read
            }
            None => Class::Write,
            Some(other) => {
                self.err(
                    format!("{path}.class"),
                    format!("{other:?} is not a class (read or write)"),
                );
                Class::Write
            }
        };
        let on_limit = match self
            .take(&format!("{path}.on_limit"), raw.on_limit)
            .as_deref()
        {
            None => class.default_on_limit(),
            Some("queue") => OnLimit::Queue,
            Some("wait") => OnLimit::Wait,
            Some("reject") => OnLimit::Reject,
            Some(other) => {
                self.err(
                    format!("{path}.on_limit"),
                    format!("{other:?} is not an action (queue, wait or reject)"),
                );
                class.default_on_limit()
            }
        };
        if class == Class::Read && on_limit == OnLimit::Queue {
            self.err(
                format!("{path}.on_limit"),
                "a read cannot be queued (a 202 carries no data); use wait or reject",
            );
        }
        let max_wait_set = raw.max_wait.is_some();
        let max_wait = self.duration_in(
            &format!("{path}.max_wait"),
            raw.max_wait,
            default_max_wait,
            WAIT,
        );
        let max_wait = if on_limit == OnLimit::Reject {
            if max_wait_set {
                self.err(
                    format!("{path}.max_wait"),
                    "applies only to on_limit: queue or wait",
                );
            }
            Duration::ZERO
        } else {
            max_wait
        };
        let extra = self
            .take(&format!("{path}.quotas"), raw.quotas)
            .unwrap_or_default();
        for (j, q) in extra.iter().enumerate() {
            let at = format!("{path}.quotas[{j}]");
            match quotas.iter().find(|c| &c.name == q) {
                None => self.err(at, format!("no quota is named {q:?}")),
                Some(c) if c.scope == QuotaScope::Account => self.err(
                    at,
                    format!("{q:?} has scope account: every route consumes it already"),
                ),
                Some(_) => {}
            }
        }
        let idempotency_key = self
            .take(&format!("{path}.idempotency_key"), raw.idempotency_key)
            .unwrap_or(false);
        let retry_ambiguous = self
            .take(&format!("{path}.retry_ambiguous"), raw.retry_ambiguous)
            .unwrap_or(false);
        let batch = self.batch(&format!("{path}.batch"), raw.batch, on_limit, crm);
        let enforce = self
            .take(&format!("{path}.enforce"), raw.enforce)
            .unwrap_or(true);
        Some(RouteConfig {
            enforce,
            name: name?,
            methods,
            paths,
            class,
            on_limit,
            max_wait,
            quotas: extra,
            idempotency_key,
            retry_ambiguous,
            batch,
        })
    }

    fn batch(
        &mut self,
        path: &str,
        field: Option<Raw<raw::RawBatch>>,
        on_limit: OnLimit,
        crm: Crm,
    ) -> Option<BatchConfig> {
        let raw = self.take(path, field)?;
        self.unknown(path, &raw.unknown, BATCH_FIELDS);
        if crm != Crm::Zendesk {
            self.err(
                path,
                "batching uses Zendesk's create_many and update_many: it needs upstream.crm: zendesk",
            );
        }
        if on_limit != OnLimit::Queue {
            self.err(
                path,
                "only writes the proxy owns are batched: it needs on_limit: queue",
            );
        }
        // Zendesk's limit on items per batch call.
        let max_size = self.count(
            &format!("{path}.max_size"),
            raw.max_size,
            MAX_BATCH,
            (2, MAX_BATCH),
        );
        let max_linger = self.duration_in(
            &format!("{path}.max_linger"),
            raw.max_linger,
            Duration::from_secs(1),
            LINGER,
        );
        Some(BatchConfig {
            max_size,
            max_linger,
        })
    }
}

/// A share written as a percentage (`10%`) under `max` percent, as a fraction.
fn parse_share(text: &str, max: f64) -> Option<f64> {
    let p: f64 = text.strip_suffix('%')?.trim().parse().ok()?;
    (0.0..max).contains(&p).then_some(p / 100.0)
}

/// The name as written, if it is a string (for duplicate checks that must not wait for validity).
fn written_name(field: &Option<Raw<String>>) -> Option<String> {
    field.as_ref().and_then(|r| r.0.as_ref().ok().cloned())
}

/// Parses `HH:MM` or `HH:MM:SS` (24-hour).
fn parse_clock_time(text: &str) -> Option<jiff::civil::Time> {
    let mut parts = text.split(':');
    let h: i8 = parts.next()?.parse().ok()?;
    let m: i8 = parts.next()?.parse().ok()?;
    let s: i8 = match parts.next() {
        Some(s) => s.parse().ok()?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    jiff::civil::Time::new(h, m, s, 0).ok()
}

/// What is wrong with a Redis URL, if anything (never repeating a password it carries).
fn redis_url_problem(url: &str) -> Option<String> {
    let shown = display_redis_url(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some(format!(
            "{shown} is not a URL (write redis://host:6379 or rediss://host:6379)"
        ));
    };
    if scheme != "redis" && scheme != "rediss" {
        return Some(format!("{shown} must start with redis:// or rediss://"));
    }
    let host_part = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let authority = host_part.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() {
        return Some(format!("{shown} has no host"));
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !authority.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Some(format!("{shown}: {port:?} is not a port"));
    }
    if let Some(db) = host_part
        .split_once('/')
        .map(|(_, d)| d.split('?').next().unwrap_or_default())
        && !db.is_empty()
        && db.parse::<u32>().is_err()
    {
        return Some(format!("{shown}: the database {db:?} is not a number"));
    }
    None
}

/// This machine's host name (a pod's name in Kubernetes), else a fixed name.
fn default_replica_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "replica".to_string())
}

/// A bare number where a duration is due (`window: 60`) gets the unit hint, not a type error.
fn with_unit_hint(field: Option<Raw<String>>) -> Option<Raw<String>> {
    field.map(|Raw(r)| {
        Raw(r.map_err(|e| {
            let number = e
                .strip_prefix("invalid type: integer `")
                .or_else(|| e.strip_prefix("invalid type: floating point `"))
                .and_then(|rest| rest.split('`').next());
            match number {
                Some(n) => format!(
                    "{n} has no unit: write it with one, e.g. \"{n}s\" (units: ms, s, m, h, d)"
                ),
                None => e,
            }
        }))
    })
}
