//! What each CRM says about its quota and how it says "stop": rate-limit headers normalized into
//! observations, throttle signals (429, Salesforce 403 `REQUEST_LIMIT_EXCEEDED`, HubSpot
//! `policyName`), per CRM, and Zendesk's batch endpoints. The facts behind them, with their
//! public sources: `docs/crms.md`.

pub mod zendesk_batch;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};

use crate::clock::Time;

/// The CRM dialect an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Crm {
    /// `Retry-After`, `X-RateLimit-*` and `RateLimit-*` headers, 429.
    #[default]
    Generic,
    Zendesk,
    Salesforce,
    HubSpot,
    Freshdesk,
    Kustomer,
    ServiceNow,
    Dynamics,
}

impl Crm {
    pub const ALL: [Crm; 8] = [
        Crm::Generic,
        Crm::Zendesk,
        Crm::Salesforce,
        Crm::HubSpot,
        Crm::Freshdesk,
        Crm::Kustomer,
        Crm::ServiceNow,
        Crm::Dynamics,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Crm::Generic => "generic",
            Crm::Zendesk => "zendesk",
            Crm::Salesforce => "salesforce",
            Crm::HubSpot => "hubspot",
            Crm::Freshdesk => "freshdesk",
            Crm::Kustomer => "kustomer",
            Crm::ServiceNow => "servicenow",
            Crm::Dynamics => "dynamics",
        }
    }
}

impl fmt::Display for Crm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Crm {
    type Err = String;
    fn from_str(s: &str) -> Result<Crm, String> {
        Crm::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Crm::ALL.iter().map(|c| c.name()).collect();
            format!("{s:?} is not a CRM (one of: {})", names.join(", "))
        })
    }
}

impl Crm {
    /// The scopes this CRM reports in its headers (`quotas[].sync` must name one).
    pub fn scopes(self) -> &'static [&'static str] {
        match self {
            Crm::Generic | Crm::Freshdesk | Crm::Kustomer | Crm::ServiceNow => &["account"],
            Crm::Zendesk => &[
                "account",
                "<endpoint> (any zendesk-ratelimit-<endpoint> header)",
            ],
            Crm::Salesforce => &["daily", "per-app"],
            Crm::HubSpot => &["burst", "secondly", "daily"],
            Crm::Dynamics => &[],
        }
    }

    pub fn check_scope(self, scope: &str) -> Result<(), String> {
        let known = self.scopes();
        let endpoint = self == Crm::Zendesk
            && !scope.is_empty()
            && scope
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if known.contains(&scope) || endpoint {
            Ok(())
        } else if known.is_empty() {
            Err(format!(
                "{self} reports no quota headers the proxy trusts; remove sync"
            ))
        } else {
            Err(format!(
                "{scope:?} is not a scope {self} reports (one of: {})",
                known.join(", ")
            ))
        }
    }
}

/// One statement a CRM made about one of its quotas, in one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The CRM's name for the quota: `account`, `daily`, `burst`, or an endpoint such as
    /// `tickets-update`. Matched against `quotas[].sync`.
    pub scope: Cow<'static, str>,
    pub limit: Option<u64>,
    /// Calls left, as the CRM counted them when it answered.
    pub remaining: Option<u64>,
    /// When the CRM's window resets (if it said).
    pub reset: Option<Time>,
    /// Calls this request cost (Freshdesk's `X-RateLimit-Used-CurrentRequest`), if more than one.
    pub cost: Option<u64>,
}

impl Observation {
    fn new(scope: impl Into<Cow<'static, str>>) -> Observation {
        Observation {
            scope: scope.into(),
            limit: None,
            remaining: None,
            reset: None,
            cost: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.cost.is_none()
    }
}

/// A CRM's "stop": which of its quotas ran out and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    /// The CRM scope that ran out, when the CRM said which (else: the route's quotas).
    pub scope: Option<Cow<'static, str>>,
    /// When it may be tried again, when the CRM said or the dialect knows a default.
    pub until: Option<Time>,
    /// Bounded metric label: `429`, `account`, `endpoint`, `daily`, `ten_secondly_rolling`,
    /// `request_limit_exceeded`, `concurrent_limit`.
    pub reason: &'static str,
}

/// Largest response body read to classify a throttle (HubSpot 429, Salesforce 403).
pub const CLASSIFY_BODY_LIMIT: usize = 64 * 1024;

impl Crm {
    /// Reads the CRM's rate-limit headers. A header that is present but malformed yields no
    /// observation and is reported through `bad` (by name), never trusted.
    pub fn observe(
        self,
        headers: &HeaderMap,
        now: Time,
        bad: &mut dyn FnMut(&'static str),
    ) -> Vec<Observation> {
        let mut h = Reader::new(self.rate_limit_headers(), headers, now, bad);
        let mut out = Vec::new();
        // Most answers carry none of the CRM's rate-limit headers: nothing to build (Zendesk's
        // `zendesk-ratelimit-*` family is found by its prefix below, not by the reader).
        if !h.any && self != Crm::Zendesk {
            return out;
        }
        match self {
            Crm::Zendesk => {
                let mut account = Observation::new("account");
                account.limit = h.number("ratelimit-limit").or(h.number("x-rate-limit"));
                account.remaining = min_opt(
                    h.number("ratelimit-remaining"),
                    h.number("x-rate-limit-remaining"),
                );
                account.reset = h.delay("ratelimit-reset");
                out.push(account);
                for (name, value) in headers {
                    if let Some(scope) = name.as_str().strip_prefix("zendesk-ratelimit-") {
                        match parse_zendesk_bucket(value.to_str().unwrap_or(""), now) {
                            Some(mut o) => {
                                o.scope = Cow::Owned(scope.to_string());
                                out.push(o);
                            }
                            None => (h.bad)("zendesk-ratelimit-*"),
                        }
                    }
                }
            }
            Crm::Salesforce => {
                if let Some(v) = h.text("sforce-limit-info") {
                    let mut any = false;
                    for part in v.split([';', ',']) {
                        let Some((key, val)) = part.trim().split_once('=') else {
                            continue;
                        };
                        let scope = match key.trim() {
                            "api-usage" => "daily",
                            "per-app-api-usage" => "per-app",
                            _ => continue,
                        };
                        let val = val.split('(').next().unwrap_or("").trim();
                        let parsed = val.split_once('/').and_then(|(u, l)| {
                            Some((u.trim().parse::<u64>().ok()?, l.trim().parse::<u64>().ok()?))
                        });
                        if let Some((used, limit)) = parsed {
                            let mut o = Observation::new(scope);
                            o.limit = Some(limit);
                            o.remaining = Some(limit.saturating_sub(used));
                            out.push(o);
                            any = true;
                        }
                    }
                    if !any {
                        (h.bad)("sforce-limit-info");
                    }
                }
            }
            Crm::HubSpot => {
                let mut burst = h.counts(
                    "burst",
                    "x-hubspot-ratelimit-max",
                    "x-hubspot-ratelimit-remaining",
                );
                burst.reset = h
                    .number("x-hubspot-ratelimit-interval-milliseconds")
                    .map(|ms| now + Duration::from_millis(ms.min(86_400_000)));
                let mut secondly = h.counts(
                    "secondly",
                    "x-hubspot-ratelimit-secondly",
                    "x-hubspot-ratelimit-secondly-remaining",
                );
                secondly.reset = Some(now + Duration::from_secs(1));
                let daily = h.counts(
                    "daily",
                    "x-hubspot-ratelimit-daily",
                    "x-hubspot-ratelimit-daily-remaining",
                );
                out.extend([burst, secondly, daily]);
            }
            Crm::Freshdesk => {
                let mut o = h.counts("account", "x-ratelimit-total", "x-ratelimit-remaining");
                o.cost = h
                    .number("x-ratelimit-used-currentrequest")
                    .filter(|&c| c > 1);
                out.push(o);
            }
            Crm::Kustomer | Crm::Generic => {
                let mut o = Observation::new("account");
                o.limit = h
                    .number("x-ratelimit-limit")
                    .or(h.number("ratelimit-limit"));
                o.remaining = h
                    .number("x-ratelimit-remaining")
                    .or(h.number("ratelimit-remaining"));
                o.reset = h
                    .instant("x-ratelimit-reset")
                    .or(h.delay("ratelimit-reset"));
                out.push(o);
            }
            Crm::ServiceNow => {
                // Only when a rate-limit rule matches; no remaining count is documented.
                let mut o = Observation::new("account");
                o.limit = h.number("x-ratelimit-limit");
                o.reset = h.instant("x-ratelimit-reset");
                out.push(o);
            }
            // `x-ms-ratelimit-*` are per web server and documented as "don't depend on them".
            Crm::Dynamics => {}
        }
        out.retain(|o| !o.is_empty());
        out
    }

    /// The rate-limit headers [`Crm::observe`] reads, as it names them when one is malformed
    /// (the label values of the header-error metric, known at start).
    pub fn rate_limit_headers(self) -> &'static [&'static str] {
        match self {
            Crm::Zendesk => &[
                "ratelimit-limit",
                "x-rate-limit",
                "ratelimit-remaining",
                "x-rate-limit-remaining",
                "ratelimit-reset",
                "zendesk-ratelimit-*",
            ],
            Crm::Salesforce => &["sforce-limit-info"],
            Crm::HubSpot => &[
                "x-hubspot-ratelimit-max",
                "x-hubspot-ratelimit-remaining",
                "x-hubspot-ratelimit-interval-milliseconds",
                "x-hubspot-ratelimit-secondly",
                "x-hubspot-ratelimit-secondly-remaining",
                "x-hubspot-ratelimit-daily",
                "x-hubspot-ratelimit-daily-remaining",
            ],
            Crm::Freshdesk => &[
                "x-ratelimit-total",
                "x-ratelimit-remaining",
                "x-ratelimit-used-currentrequest",
            ],
            Crm::Kustomer | Crm::Generic => &[
                "x-ratelimit-limit",
                "ratelimit-limit",
                "x-ratelimit-remaining",
                "ratelimit-remaining",
                "x-ratelimit-reset",
                "ratelimit-reset",
            ],
            Crm::ServiceNow => &["x-ratelimit-limit", "x-ratelimit-reset"],
            Crm::Dynamics => &[],
        }
    }

    /// The reasons [`Crm::throttle`] names for this CRM's throttle answers (and Zendesk's
    /// `too_many_jobs` for batch calls): the throttle metric's label values, known at start.
    pub fn throttle_reasons(self) -> &'static [&'static str] {
        match self {
            Crm::Zendesk => &["429", "account", "endpoint", "too_many_jobs"],
            Crm::Salesforce => &["429", "request_limit_exceeded", "concurrent_limit"],
            Crm::HubSpot => &["429", "daily", "ten_secondly_rolling", "secondly"],
            _ => &["429"],
        }
    }

    /// Whether classifying a response with this status needs its body.
    pub fn needs_body(self, status: StatusCode) -> bool {
        matches!(
            (self, status),
            (Crm::Salesforce, StatusCode::FORBIDDEN)
                | (Crm::HubSpot, StatusCode::TOO_MANY_REQUESTS)
        )
    }

    /// Whether a response says the CRM throttled the request, and what it said about it.
    pub fn throttle(
        self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        observations: &[Observation],
        now: Time,
    ) -> Option<Throttle> {
        let (scope, reason, default): (Option<Cow<'static, str>>, &'static str, Option<Duration>) =
            match (self, status) {
                (Crm::Salesforce, StatusCode::FORBIDDEN) => {
                    let text = String::from_utf8_lossy(body);
                    if !text.contains("REQUEST_LIMIT_EXCEEDED") {
                        return None; // a permission error, the CRM's final answer
                    }
                    if text.contains("TotalRequests") || !text.contains("Concurrent") {
                        (
                            Some("daily".into()),
                            "request_limit_exceeded",
                            Some(Duration::from_secs(300)),
                        )
                    } else {
                        (None, "concurrent_limit", Some(Duration::from_secs(20)))
                    }
                }
                (_, StatusCode::TOO_MANY_REQUESTS) => match self {
                    Crm::HubSpot => match hubspot_policy(body).as_deref() {
                        Some("DAILY") => (Some("daily".into()), "daily", None),
                        Some("TEN_SECONDLY_ROLLING") => (
                            Some("burst".into()),
                            "ten_secondly_rolling",
                            Some(Duration::from_secs(10)),
                        ),
                        Some("SECONDLY") => (
                            Some("secondly".into()),
                            "secondly",
                            Some(Duration::from_secs(1)),
                        ),
                        _ => (None, "429", Some(Duration::from_secs(10))),
                    },
                    Crm::Zendesk => {
                        // An exhausted endpoint bucket names the wall; else the account may.
                        let empty = |o: &&Observation| o.remaining == Some(0);
                        match observations
                            .iter()
                            .filter(|o| o.scope != "account")
                            .find(empty)
                        {
                            Some(o) => (Some(o.scope.clone()), "endpoint", None),
                            None if observations
                                .iter()
                                .any(|o| o.scope == "account" && o.remaining == Some(0)) =>
                            {
                                (Some("account".into()), "account", None)
                            }
                            None => (None, "429", None),
                        }
                    }
                    _ => (None, "429", None),
                },
                _ => return None,
            };
        let scope_reset = observations
            .iter()
            .find(|o| Some(&o.scope) == scope.as_ref() || (scope.is_none() && o.scope == "account"))
            .and_then(|o| o.reset);
        // Read only once the answer is known to be a throttle: most answers are not.
        let until = crate::message::retry_after(headers, now)
            .or(scope_reset)
            .or_else(|| default.map(|d| now + d));
        Some(Throttle {
            scope,
            until,
            reason,
        })
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `total=100; remaining=99; resets=41` (Zendesk endpoint buckets).
fn parse_zendesk_bucket(value: &str, now: Time) -> Option<Observation> {
    let mut o = Observation::new("");
    for part in value.split([';', ',']) {
        let (k, v) = part.trim().split_once('=')?;
        let n: u64 = v.trim().parse().ok()?;
        match k.trim() {
            "total" => o.limit = Some(n),
            "remaining" => o.remaining = Some(n),
            "resets" => o.reset = Some(now + Duration::from_secs(n.min(7 * 86_400))),
            _ => {}
        }
    }
    (o.limit.is_some() || o.remaining.is_some()).then_some(o)
}

/// The `policyName` of a HubSpot 429 body, if it is JSON with one.
fn hubspot_policy(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("policyName")?.as_str().map(str::to_string)
}

/// Most headers a CRM's rate limits are read from (HubSpot's seven).
const MOST_HEADERS: usize = 8;

/// Typed access to rate-limit headers; malformed values are reported, not trusted.
struct Reader<'a> {
    /// The CRM's rate-limit header names and, at the same index, each one's first value.
    names: &'static [&'static str],
    found: [Option<&'a HeaderValue>; MOST_HEADERS],
    /// Whether any of them was found (most answers carry none).
    any: bool,
    now: Time,
    bad: &'a mut dyn FnMut(&'static str),
}

impl<'a> Reader<'a> {
    /// Finds the headers `names` lists in one pass over the response's headers (most answers
    /// carry none of them, or a few).
    fn new(
        names: &'static [&'static str],
        headers: &'a HeaderMap,
        now: Time,
        bad: &'a mut dyn FnMut(&'static str),
    ) -> Reader<'a> {
        debug_assert!(names.len() <= MOST_HEADERS);
        let mut found = [None; MOST_HEADERS];
        if !names.is_empty() {
            // The lengths of the names sought, as bits: most fields of an answer are told apart
            // from them by their length alone, with no comparison.
            let bit = |len: usize| 1u64 << len.min(63);
            let lengths = names.iter().fold(0, |bits, n| bits | bit(n.len()));
            for (name, value) in headers {
                let name = name.as_str();
                if lengths & bit(name.len()) == 0 {
                    continue;
                }
                if let Some(i) = names.iter().position(|n| *n == name) {
                    found[i].get_or_insert(value);
                }
            }
        }
        let any = found.iter().any(Option::is_some);
        Reader {
            names,
            found,
            any,
            now,
            bad,
        }
    }

    /// An observation of `scope` from a limit header and a remaining header.
    fn counts(
        &mut self,
        scope: &'static str,
        limit: &'static str,
        remaining: &'static str,
    ) -> Observation {
        let mut o = Observation::new(scope);
        o.limit = self.number(limit);
        o.remaining = self.number(remaining);
        o
    }

    fn text(&mut self, name: &'static str) -> Option<&'a str> {
        debug_assert!(
            self.names.contains(&name),
            "{name} is not in the CRM's rate-limit headers"
        );
        if !self.any {
            return None;
        }
        let at = self.names.iter().position(|n| *n == name)?;
        let v = self.found[at]?;
        match v.to_str() {
            Ok(s) => Some(s.trim()),
            Err(_) => {
                (self.bad)(name);
                None
            }
        }
    }

    /// A non-negative integer.
    fn number(&mut self, name: &'static str) -> Option<u64> {
        let text = self.text(name)?;
        match text.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                (self.bad)(name);
                None
            }
        }
    }

    /// Seconds from now.
    fn delay(&mut self, name: &'static str) -> Option<Time> {
        let now = self.now;
        self.number(name)
            .map(|s| now + Duration::from_secs(s.min(7 * 86_400)))
    }

    /// A reset given as seconds from now, a Unix time (seconds or milliseconds), an RFC 3339
    /// timestamp or an HTTP-date: vendors differ and some do not document which.
    fn instant(&mut self, name: &'static str) -> Option<Time> {
        let text = self.text(name)?.to_string();
        let now = self.now;
        let parsed = if let Ok(n) = text.parse::<u64>() {
            match n {
                0..1_000_000_000 => Some(now + Duration::from_secs(n.min(7 * 86_400))),
                1_000_000_000..1_000_000_000_000 => {
                    Some(Time::from_nanos(n.saturating_mul(1_000_000_000)))
                }
                _ => Some(Time::from_nanos(n.saturating_mul(1_000_000))),
            }
        } else if let Ok(ts) = text.parse::<jiff::Timestamp>() {
            Some(Time::from_timestamp(ts))
        } else {
            jiff::fmt::rfc2822::parse(&text)
                .ok()
                .map(|z| Time::from_timestamp(z.timestamp()))
        };
        // A reset in the past or absurdly far ahead is not trusted.
        match parsed {
            Some(t) if t >= now && t <= now + Duration::from_secs(7 * 86_400) => Some(t),
            _ => {
                (self.bad)(name);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
