//! The one place that turns proxy decisions and errors into HTTP responses and headers.

use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::json;

use crate::clock::Time;
use crate::config::QuotaConfig;
use crate::crm::Crm;
use crate::ids::EntryId;
use crate::quota::{Ledger, QuotaUsage};
use crate::units::{format_duration, push_decimal};
use crate::upstream::ForwardError;

mod body;

pub use body::{Body, RateLimitFields, fields_into_head};

/// Path prefix of the proxy's own endpoints on the data listener (cannot collide with CRM APIs).
pub const PROXY_PREFIX: &str = "/_proxy/";

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::new(Full::new(bytes.into()))
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub fn json_response(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("serializable response");
    respond(status, "application/json", body)
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn with_retry_after(mut resp: Response<Body>, seconds: u64) -> Response<Body> {
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    resp
}

/// Why the proxy itself answers instead of the CRM.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    #[error("the request body did not arrive in time ({0})")]
    BodyTimeout(String),
    #[error("the proxy holds as many request bytes as it may; send again shortly")]
    Busy { retry_after: u64 },
    #[error("{0}")]
    BadPath(String),
    #[error("the queue of parked writes is full")]
    QueueFull { retry_after: u64 },
    #[error("the proxy is shutting down and accepts no new parked writes")]
    ShuttingDown,
    #[error("the proxy could not store the write durably, so it did not keep it; send it again")]
    NotStored { retry_after: u64 },
    #[error(transparent)]
    Upstream(#[from] ForwardError),
}

impl ProxyError {
    /// Everything the proxy says of this error, in one place: the response status, the `error`
    /// code in its body, its `Retry-After` (if any), and the outcome label it is counted under in
    /// `crm_proxy_requests_total`.
    fn parts(&self) -> (StatusCode, &'static str, Option<u64>, &'static str) {
        match self {
            ProxyError::TooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                None,
                "too_large",
            ),
            ProxyError::BadBody(_) => (StatusCode::BAD_REQUEST, "bad_body", None, "bad_body"),
            ProxyError::BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                None,
                "body_timeout",
            ),
            ProxyError::Busy { retry_after } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                Some(*retry_after),
                "busy",
            ),
            ProxyError::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path", None, "bad_path"),
            ProxyError::QueueFull { retry_after } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                Some(*retry_after),
                "queue_full",
            ),
            ProxyError::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                Some(5),
                "queue_full",
            ),
            ProxyError::NotStored { retry_after } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not_stored",
                Some(*retry_after),
                "not_stored",
            ),
            ProxyError::Upstream(ForwardError::Timeout(_)) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                None,
                "upstream_error",
            ),
            ProxyError::Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                None,
                "upstream_error",
            ),
        }
    }

    /// The outcome label this error is counted under (`crm_proxy_requests_total`).
    pub fn outcome(&self) -> &'static str {
        self.parts().3
    }
}

/// Maps a proxy error to its response: 400, 408 (and the connection closed), 413,
/// 503 + Retry-After, 502 or 504.
pub fn error(e: &ProxyError) -> Response<Body> {
    let (status, code, retry, _) = e.parts();
    let mut resp = json_response(
        status,
        &json!({ "error": code, "description": e.to_string() }),
    );
    if status == StatusCode::REQUEST_TIMEOUT {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    match retry {
        Some(s) => with_retry_after(resp, s),
        None => resp,
    }
}

/// The over-limit answer in the shape the CRM itself uses, always with `Retry-After`:
/// - Salesforce, for a quota synced to its daily allocation: 403 `REQUEST_LIMIT_EXCEEDED`
///   (the only over-limit answer Salesforce clients know; other quotas get 429);
/// - HubSpot: 429 with `errorType: RATE_LIMIT` and the `policyName` of the quota's scope;
/// - ServiceNow and Dynamics: 429 with their error objects;
/// - everyone else (Zendesk's 429 body is not a contract): 429 with a small JSON body.
pub fn over_limit(
    crm: Crm,
    retry_at: Time,
    now: Time,
    quota: Option<&QuotaConfig>,
) -> Response<Body> {
    let secs = retry_at.seconds_after(now, 1);
    let name = quota.map(|q| q.name.as_str());
    let scope = quota.and_then(|q| q.sync.as_deref());
    let generic = || {
        json!({
            "error": "RateLimited",
            "description": "The CRM API quota is spent; retry after the given number of seconds.",
            "quota": name,
            "retry_after": secs,
        })
    };
    let (status, body) = match (crm, scope) {
        (Crm::Salesforce, Some("daily")) => (
            StatusCode::FORBIDDEN,
            json!([{ "message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED" }]),
        ),
        (Crm::HubSpot, _) => {
            let policy = match scope {
                Some("daily") => "DAILY",
                Some("secondly") => "SECONDLY",
                _ => "TEN_SECONDLY_ROLLING",
            };
            (
                StatusCode::TOO_MANY_REQUESTS,
                json!({
                    "status": "error",
                    "message": format!("You have reached your {} limit.", policy.to_ascii_lowercase()),
                    "errorType": "RATE_LIMIT",
                    "policyName": policy,
                }),
            )
        }
        (Crm::ServiceNow, _) => (
            StatusCode::TOO_MANY_REQUESTS,
            json!({
                "error": {
                    "message": "Rate limit exceeded",
                    "detail": format!("Rate limit of {} requests per {} exceeded", quota.map_or(0, |q| q.limit), quota.map_or_else(String::new, |q| format_duration(q.window))),
                },
                "status": "failure",
            }),
        ),
        (Crm::Dynamics, _) => (
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "error": { "code": "0x80072322", "message": format!("Number of requests exceeded the limit of {} over time window of {} seconds.", quota.map_or(0, |q| q.limit), quota.map_or(0, |q| q.window.as_secs())) } }),
        ),
        _ => (StatusCode::TOO_MANY_REQUESTS, generic()),
    };
    with_retry_after(json_response(status, &body), secs)
}

/// Where a parked write's client reads its status (with its token when it has no credential).
pub fn status_url(id: EntryId, token: Option<&str>) -> String {
    match token {
        Some(t) => format!("{PROXY_PREFIX}requests/{id}?token={t}"),
        None => format!("{PROXY_PREFIX}requests/{id}"),
    }
}

/// `202 Accepted`: the proxy now owns delivery of a parked write.
/// The 202 for a parked write. A write that carries no credential gets a status `token` of its
/// own, in its `Location` and `status_url` (the only way to read it back).
pub fn accepted(
    id: EntryId,
    position: usize,
    estimated: Time,
    token: Option<&str>,
) -> Response<Body> {
    let location = status_url(id, token);
    let mut resp = json_response(
        StatusCode::ACCEPTED,
        &json!({
            "id": id.to_string(),
            "status": "queued",
            "position": position,
            "estimated_dispatch_at": estimated.to_string(),
            "status_url": location,
        }),
    );
    resp.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("ids are hex"),
    );
    resp
}

pub fn not_found() -> Response<Body> {
    problem(StatusCode::NOT_FOUND, "not_found", "no such request")
}

/// 404 for a parked write's status: the id is unknown, or the reader is not its owner (both
/// answer alike, so ids cannot be probed).
pub fn status_not_found() -> Response<Body> {
    problem(
        StatusCode::NOT_FOUND,
        "not_found",
        "no parked write with this id for this credential: read it with the Authorization header (or cookie, API key) the write was sent with, or with the `token` of its status URL when it had none",
    )
}

/// 404 on the admin listener for a path it does not serve, listing those it does.
pub fn admin_not_found() -> Response<Body> {
    problem(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such admin endpoint; these exist: GET / (the status page), /healthz, /readyz, /metrics, /status, /requests, /requests/{id}; POST /requests/{id}/retry, /requests/retry, /requests/discard, /quotas/{name}/resume, /reload; DELETE /requests/{id}",
    )
}

/// 405 naming the methods the resource does allow (e.g. `"GET, HEAD"`).
pub fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({ "error": "method_not_allowed" }),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// An error answer of the proxy's own: `{"error": code, "description": ...}`.
pub fn problem(status: StatusCode, code: &str, description: impl fmt::Display) -> Response<Body> {
    json_response(
        status,
        &json!({ "error": code, "description": description.to_string() }),
    )
}

/// Adds the proxy's `RateLimit-Policy` and `RateLimit` fields ([`rate_limit_fields`]) to
/// `headers`. The CRM's own headers are left untouched.
pub fn add_rate_limit_headers(
    headers: &mut HeaderMap,
    ledger: &Ledger,
    usage: &[QuotaUsage],
    now: Time,
) {
    if let Some(fields) = rate_limit_fields(ledger, usage, now) {
        fields.append_to(headers);
    }
}

/// The proxy's `RateLimit-Policy` and `RateLimit` values (draft-ietf-httpapi-ratelimit-headers-10
/// structured lists), one item per quota the route consumes, the binding quota first; `None`
/// for a route that consumes none.
pub fn rate_limit_fields(
    ledger: &Ledger,
    usage: &[QuotaUsage],
    now: Time,
) -> Option<RateLimitFields> {
    if usage.is_empty() {
        return None;
    }
    QUOTA_ITEMS.with_borrow_mut(|kept| {
        let id = ledger.configs_id();
        let items = match kept {
            Some((written_for, items)) if *written_for == id => items,
            slot => {
                let (configs, id) = ledger.configs_with_id();
                let items = configs.iter().map(QuotaItem::new).collect();
                &mut slot.insert((id, items)).1
            }
        };
        let policy = policy(items, usage)?;
        // The numbers are written without `format!` (this runs on every answer).
        let state = STATE_BYTES.with_borrow_mut(|out| {
            out.clear();
            for (i, u) in usage.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                let reset = u.reset_at.seconds_after(now, 0);
                let name = &items[u.quota.0].name;
                push_item(out, name, [("r", u64::from(u.remaining)), ("t", reset)]);
            }
            Bytes::copy_from_slice(out)
        });
        // SAFETY: every quota here has a policy item (`policy` gave one), and that item, the
        // same name between quotes with parameters of digits, passed the value check; so did
        // this value's every other byte (`"`, `;`, `=`, `,`, a space, letters and digits).
        let state = unsafe { HeaderValue::from_maybe_shared_unchecked(state) };
        Some(RateLimitFields { policy, state })
    })
}

thread_local! {
    /// What the `RateLimit` fields need of each quota's config, and the number of the configs
    /// it was written from ([`Ledger::configs_id`]): an item depends on its quota's config
    /// alone, so it is written once per thread, and again only when a reload replaces the
    /// configs. Nothing of the ledger is taken for it on an answer but one load.
    static QUOTA_ITEMS: RefCell<Option<(u64, Vec<QuotaItem>)>> = const { RefCell::new(None) };
    /// Where a `RateLimit` value is written before it is copied out at its size.
    static STATE_BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A quota's name, and its `RateLimit-Policy` item (`None`: not a valid field value).
struct QuotaItem {
    name: Box<str>,
    policy: Option<HeaderValue>,
}

impl QuotaItem {
    fn new(cfg: &QuotaConfig) -> QuotaItem {
        QuotaItem {
            name: cfg.name.as_str().into(),
            policy: policy_item(cfg),
        }
    }
}

/// The `RateLimit-Policy` value for `usage`: one item per quota, in its order.
fn policy(items: &[QuotaItem], usage: &[QuotaUsage]) -> Option<HeaderValue> {
    if let [only] = usage {
        return items[only.quota.0].policy.clone();
    }
    let mut out = Vec::with_capacity(40 * usage.len());
    for (i, u) in usage.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(items[u.quota.0].policy.as_ref()?.as_bytes());
    }
    HeaderValue::from_maybe_shared(Bytes::from(out)).ok()
}

/// A quota's `RateLimit-Policy` item: its name, limit (`q`) and window in seconds (`w`).
fn policy_item(cfg: &QuotaConfig) -> Option<HeaderValue> {
    let mut out = Vec::new();
    let (limit, window) = (u64::from(cfg.limit), cfg.window.as_secs());
    push_item(&mut out, &cfg.name, [("q", limit), ("w", window)]);
    HeaderValue::from_maybe_shared(Bytes::from(out)).ok()
}

/// Appends one structured-field item: `"name";k=v;k=v` (the header value's own check covers
/// the bytes).
fn push_item(out: &mut Vec<u8>, name: &str, params: [(&str, u64); 2]) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.push(b'"');
    for (key, value) in params {
        out.push(b';');
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        push_decimal(out, value);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{QuotaScope, WindowKind};
    use crate::ids::QuotaId;
    use crate::quota::Demand;

    fn sliding(name: &str, limit: u32, window: Duration) -> QuotaConfig {
        QuotaConfig {
            name: name.into(),
            limit,
            window,
            kind: WindowKind::Sliding,
            scope: QuotaScope::Account,
            margin: Duration::ZERO,
            sync: None,
            reserve: 0,
            key: Vec::new(),
            max_keys: 10,
            schedule: None,
            forecast: false,
            enforce: true,
        }
    }

    #[test]
    fn rate_limit_fields_name_every_quota_binding_first() {
        let now = Time::from_nanos(1_000_000_000_000);
        let ledger = Ledger::new(
            &[
                sliding("hour", 1000, Duration::from_secs(3600)),
                sliding("minute", 400, Duration::from_secs(60)),
            ],
            None,
            now,
        );
        let both = [QuotaId(0), QuotaId(1)];
        ledger.try_acquire(&Demand::live(&both), now).unwrap();
        let usage = ledger.usage(&both, now);
        let mut headers = HeaderMap::new();
        add_rate_limit_headers(&mut headers, &ledger, &usage, now);
        assert_eq!(
            headers["ratelimit-policy"],
            "\"minute\";q=400;w=60, \"hour\";q=1000;w=3600"
        );
        let t = |i: usize| usage[i].reset_at.seconds_after(now, 0);
        assert_eq!(
            headers["ratelimit"],
            format!("\"minute\";r=399;t={}, \"hour\";r=999;t={}", t(0), t(1)).as_str()
        );
    }

    #[test]
    fn rate_limit_fields_follow_a_reload_and_each_ledger_its_own_quotas() {
        let now = Time::from_nanos(1_000_000_000_000);
        let fields = |ledger: &Ledger| {
            let usage = ledger.usage(&[QuotaId(0)], now);
            let mut headers = HeaderMap::new();
            add_rate_limit_headers(&mut headers, ledger, &usage, now);
            let text = |name: &str| headers[name].to_str().unwrap().to_string();
            (text("ratelimit-policy"), text("ratelimit"))
        };
        let minute = Duration::from_secs(60);
        let ledger = Ledger::new(&[sliding("minute", 400, minute)], None, now);
        let other = Ledger::new(&[sliding("burst", 10, minute)], None, now);
        assert_eq!(fields(&ledger).0, "\"minute\";q=400;w=60");
        // Kept per thread, but never one ledger's items for another's.
        assert_eq!(fields(&other).0, "\"burst\";q=10;w=60");
        assert_eq!(fields(&ledger).0, "\"minute\";q=400;w=60");
        let reloaded = [sliding("per-minute", 300, minute)];
        let clients = [crate::config::ClientConfig::default_client()];
        let none = crate::config::Fairness::NONE;
        ledger.reconfigure(&reloaded, &clients, none, None, now);
        let (policy, state) = fields(&ledger);
        assert_eq!(policy, "\"per-minute\";q=300;w=60");
        assert!(state.starts_with("\"per-minute\";r=300;t="), "{state}");
    }
}
