//! The proxy's own answers to a client: the 202 of a write it took over, the over-limit answer,
//! a batched write's result, and the count of what shadow mode would have decided.

use http::{HeaderValue, Response, StatusCode, header};

use super::access;
use crate::clock::Time;
use crate::config::{Class, OnLimit};
use crate::frames;
use crate::ids::{EntryId, QuotaId};
use crate::proxy::Proxy;
use crate::queue::{Accepted, Settled};
use crate::quota::Denied;
use crate::response::{self, Body, ProxyError};
use crate::route::Route;
use crate::status::FailReason;

/// The 202 for a write the proxy took over, once the store holds it; when it cannot, the
/// write is dropped and the client told 503, so a 202 always means "kept".
pub(super) async fn accepted(
    p: &Proxy,
    route: &Route,
    a: Accepted,
    token: Option<&str>,
    why: &str,
) -> Result<Response<Body>, ProxyError> {
    // Boxed: the store's future is large, and every caller's would carry its size.
    if let Err(e) = frames::boxed(|| a.commit.durable()).await {
        p.queue.settle(a.id, false);
        tracing::error!(request_id = %a.id, route = %route.name, error = %e, "cannot store a parked write; answering 503");
        return Err(ProxyError::NotStored {
            retry_after: p.config().upstream.retry_after_default.as_secs().max(1),
        });
    }
    p.queue.settle(a.id, true);
    access::route_outcome(p, route, "queued");
    access::id(a.id);
    tracing::info!(request_id = %a.id, route = %route.name, position = a.position, "{why}");
    Ok(response::accepted(
        a.id,
        a.position,
        a.estimated_dispatch_at,
        token,
    ))
}

/// The answer to a client whose write went in a batch call and ended within its `max_wait`:
/// what the CRM's single call would have answered (for a create, `201` with the ticket); an
/// item the CRM refused gets `422` with its error; a write given up otherwise (a dead letter)
/// `502`. Both refusals point at the write's status.
pub(super) fn batched(
    p: &Proxy,
    route: &Route,
    id: EntryId,
    settled: Settled,
    token: Option<&str>,
) -> Response<Body> {
    let now = p.clock.now();
    access::id(id);
    let mut resp = match settled {
        Settled::Answer(answer) => {
            access::route_outcome(p, route, "batched");
            let mut resp = Response::new(response::full(answer.body));
            *resp.status_mut() = answer.status;
            *resp.headers_mut() = answer.headers;
            resp
        }
        Settled::Failed(reason, error) => {
            access::route_outcome(p, route, "failed");
            let status_url = response::status_url(id, token);
            let mut resp = if reason == FailReason::Rejected {
                response::problem(StatusCode::UNPROCESSABLE_ENTITY, "RecordInvalid", &error)
            } else {
                let why = format!("{error}; the write is kept as a dead letter at {status_url}");
                response::problem(StatusCode::BAD_GATEWAY, reason.name(), why)
            };
            if let Ok(v) = HeaderValue::from_str(&status_url) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
    };
    let usage = p.ledger.usage(&route.quotas, now);
    response::add_rate_limit_headers(resp.headers_mut(), &p.ledger, &usage, now);
    resp
}

/// The over-limit answer for a request that cannot be sent in time.
pub(super) fn reject(
    p: &Proxy,
    route: &Route,
    retry_at: Time,
    binding: Option<QuotaId>,
    now: Time,
) -> Response<Body> {
    access::route_outcome(p, route, "rejected");
    p.ledger
        .refused(&route.quotas, route.class == Class::Read, now);
    let mut usage = p.ledger.usage(&route.quotas, now);
    // When the decision came from the queue, the binding quota is the one with least left.
    let binding = binding.or_else(|| usage.first().map(|u| u.quota));
    // One truth: for this request the binding quota has nothing left until `Retry-After` (a
    // reserve, a share or a CRM pause may hold room the window alone would show).
    for u in usage.iter_mut().filter(|u| Some(u.quota) == binding) {
        u.remaining = 0;
        u.reset_at = u.reset_at.max(retry_at);
    }
    let quota = binding.map(|q| p.ledger.config(q));
    let mut resp = response::over_limit(p.config().upstream.crm, retry_at, now, quota.as_deref());
    response::add_rate_limit_headers(resp.headers_mut(), &p.ledger, &usage, now);
    resp
}

/// Counts what enforcing would have done with a request a shadow-mode quota (or route) let go.
pub(super) fn shadow_decision(p: &Proxy, route: &Route, would: Option<Denied>, now: Time) {
    let in_time = |d: &Denied| d.retry_at <= now + route.max_wait;
    let decision = match (would, route.on_limit) {
        (None, _) => "allowed",
        (Some(d), OnLimit::Wait | OnLimit::Queue) if in_time(&d) => "waited",
        (Some(_), OnLimit::Queue) => "queued",
        (Some(_), _) => "rejected",
    };
    p.metrics.shadow_decision(&route.name, decision);
}
