//! The data plane: classify → ledger → forward | park | reject, and the `/_proxy/` status
//! endpoints on the data listener.

mod access;
mod answers;

use answers::{accepted, batched, reject, shadow_decision};

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};

use crate::client::Caller;
use crate::clock::Time;
use crate::config::{Class, DEFAULT_ROUTE, KeyPart, OnLimit};
use crate::credentials;
use crate::frames;
use crate::ids::{ClientId, EntryId, Fingerprint, QuotaId};
use crate::intake::IntakeError;
use crate::listener::{InService, RequestBody};
use crate::message::{IDEMPOTENCY_KEY, Outbound, Peer, prepare_request_headers};
use crate::path;
use crate::proxy::Proxy;
use crate::queue::{Enter, Parkable, Ticket, WaitEnd};
use crate::quota::{Demand, Denied, Grant};
use crate::response::{self, Body, PROXY_PREFIX, ProxyError};
use crate::route::Route;
use crate::shared_ledger::Admission;
use crate::units::format_duration;
use crate::upstream::{ForwardError, UpstreamBody};
use crate::verdict::{Attempt, Verdict};

/// The methods CRM APIs use; any other gets 405 at once, before its body is read.
pub const METHODS: &str = "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE";

fn is_crm_method(m: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    ]
    .contains(m)
}

/// Handles one client request on the data listener; `busy` marks its connection in service
/// until the answer is ready.
pub async fn handle(
    proxy: Arc<Proxy>,
    req: Request<RequestBody>,
    peer: Peer,
    busy: InService,
) -> Result<Response<Body>, Infallible> {
    let settings = proxy.config().access_log;
    let resp = if settings.enabled {
        // Boxed: otherwise every request's future would hold room for the request's handling
        // twice, logged or not.
        frames::boxed(|| {
            access::logged(&proxy, settings, req, peer.addr, |req| {
                answer(&proxy, req, &peer)
            })
        })
        .await
    } else {
        // Straight on: the request is not moved through the access log's layer.
        answer(&proxy, req, &peer).await
    };
    drop(busy);
    Ok(resp)
}

async fn answer(proxy: &Proxy, req: Request<RequestBody>, peer: &Peer) -> Response<Body> {
    if !is_crm_method(req.method()) {
        access::outcome(proxy, DEFAULT_ROUTE, "method_not_allowed");
        return response::method_not_allowed(METHODS);
    }
    // Every spelling of a path counts and waits as one; the request goes on as sent. The
    // canonical form may borrow the path, so it borrows a handle on the target (a count, not
    // a copy) while the request moves on.
    let target = req.uri().clone();
    let canon = match path::canonical(target.path()) {
        Ok(c) => c,
        Err(e) => {
            access::outcome(proxy, DEFAULT_ROUTE, "bad_path");
            return response::error(&ProxyError::BadPath(e.to_string()));
        }
    };
    if canon.starts_with(PROXY_PREFIX) || canon == PROXY_PREFIX.trim_end_matches('/') {
        // Ids are read as sent (a canonical form would drop the leading zeros of an all-digit one).
        let raw = req.uri().path();
        let path = if raw.starts_with(PROXY_PREFIX) {
            raw
        } else {
            &canon
        };
        return own_endpoint(proxy, &req, path);
    }
    let routes = proxy.routes();
    let route = routes.classify(req.method(), &canon);
    access::route(&route.name, route.class);
    match forward(proxy, route, req, &canon, peer).await {
        Ok(resp) => resp,
        Err(e) => {
            access::route_outcome(proxy, route, e.outcome());
            if let ProxyError::Upstream(fe) = &e {
                tracing::warn!(route = %route.name, error = %fe, "CRM request failed");
            }
            response::error(&e)
        }
    }
}

async fn forward(
    p: &Proxy,
    route: &Route,
    req: Request<RequestBody>,
    canon: &str,
    peer: &Peer,
) -> Result<Response<Body>, ProxyError> {
    let max = p.config().max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    // The body is read before a processing slot is taken: a slow client holds only its own.
    let mut received = p.intake.read(body, declared).await.map_err(|e| match e {
        IntakeError::TooLarge => ProxyError::TooLarge { limit: max },
        IntakeError::TimedOut => ProxyError::BodyTimeout(format!(
            "listen.body_timeout {} plus 1s per {} bytes",
            format_duration(p.config().listen.body_timeout),
            p.config().listen.body_min_rate
        )),
        IntakeError::Busy => ProxyError::Busy { retry_after: 1 },
        IntakeError::Broken(e) => ProxyError::BadBody(e),
    })?;
    let body = std::mem::take(&mut received.body);
    let _slot = p.intake.slot().await;
    let mut headers = parts.headers;
    // The credential's fingerprint may identify the client or key a quota.
    let fingerprint = (p.clients().needs_fingerprint()
        || route
            .keyed
            .iter()
            .any(|(_, parts)| parts.contains(&KeyPart::Credential)))
    .then(|| Fingerprint::of(&headers));
    // Who may read a parked write back: the same credential, or (when it carries none) the
    // holder of a status token of its own, handed out with the 202.
    let owner = route
        .parks()
        .then(|| match p.credentials.owner(&headers, parts.uri.query()) {
            Some(fp) => (fp, None),
            None => {
                let (token, fp) = credentials::status_token();
                (fp, Some(token))
            }
        });
    let clients = p.clients();
    let client = clients.identify(&Caller {
        headers: &headers,
        source: peer.addr.ip(),
        fingerprint,
    });
    let name = &clients.get(client).name;
    clients.series(client, &p.metrics).request();
    access::client(name);
    let keys = keys(p, route, canon, &headers, client, fingerprint);
    prepare_request_headers(&mut headers, peer);
    if route.idempotency_key && !headers.contains_key(IDEMPOTENCY_KEY) {
        // Generated once, kept with the request through every resend.
        let key = EntryId::random().to_string();
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(&key).expect("hex"));
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let resource = resource_key(&parts.method, canon, route);
    let out = Outbound {
        method: parts.method,
        path_and_query,
        headers,
        body,
    };
    let now = p.clock.now();
    if !route.enforce {
        let call = Call {
            route,
            client,
            keys: &keys,
            token: None,
        };
        return frames::boxed(|| shadow(p, &call, out, now)).await;
    }

    if !route.parks() {
        let demand = Demand {
            quotas: &route.quotas,
            keys: &keys,
            client,
            live: true,
            read: route.class == Class::Read,
            deferrable: false,
        };
        let mut grant = match p.ledger.try_acquire(&demand, now) {
            Ok(grant) => grant,
            Err(denied) => return Ok(reject(p, route, denied.retry_at, denied.binding, now)),
        };
        if grant.would.is_some() {
            shadow_decision(p, route, grant.would, now);
        }
        return match p.admit(&route.quotas, &keys, &mut grant).await {
            Admission::Granted => {
                let call = Call {
                    route,
                    client,
                    keys: &keys,
                    token: None,
                };
                forward_live(p, &call, out, grant, "forwarded", None).await
            }
            Admission::Denied { retry_at, binding } => {
                Ok(reject(p, route, retry_at, binding, p.clock.now()))
            }
        };
    }
    // The client is held at most `max_wait` from here, however many tries it takes.
    let deadline = tokio::time::Instant::now() + route.max_wait;
    let (owner, token) = owner.expect("computed for parking routes");
    let token = token.as_deref();
    let call = Call {
        route,
        client,
        keys: &keys,
        token,
    };
    let parkable = Parkable {
        request: out,
        fingerprint: owner,
        resource,
        client,
        keys: keys.to_vec(),
    };
    match p.queue.enter(&p.ledger, route, parkable, now) {
        Enter::Go(ticket, out, grant) => {
            access::id(ticket.id());
            if grant.would.is_some() {
                shadow_decision(p, route, grant.would, now);
            }
            let next = Some((out, grant, "forwarded"));
            frames::boxed(|| live_write(p, &call, ticket, next, deadline)).await
        }
        Enter::Parked(ticket) => {
            access::id(ticket.id());
            frames::boxed(|| live_write(p, &call, ticket, None, deadline)).await
        }
        Enter::Full => {
            let retry_at = p
                .ledger
                .check(&Demand::live(&route.quotas), now)
                .err()
                .map_or(now, |d| d.retry_at);
            tracing::warn!(route = %route.name, "parked-write queue full; answering 503");
            Err(ProxyError::QueueFull {
                retry_after: retry_at.seconds_after(now, 1),
            })
        }
        Enter::Closed => Err(ProxyError::ShuttingDown),
        Enter::Accepted(a) => {
            accepted(
                p,
                route,
                a,
                token,
                "write parked; answered 202 at once (no slot within max_wait)",
            )
            .await
        }
        Enter::Refused { retry_at } => Ok(reject(p, route, retry_at, None, now)),
    }
}

/// A classified request on its way: its route, client, the keys of its keyed quotas, and the
/// status token a parked write without a credential is read back with.
struct Call<'a> {
    route: &'a Route,
    client: ClientId,
    keys: &'a [(QuotaId, Arc<str>)],
    token: Option<&'a str>,
}

/// A write whose client waits (until `deadline`) on `ticket`: a grant of this process's ledger
/// (`next`, or one the ticket brings) goes to the CRM once the shared ledger agrees; when it
/// does not (another replica spent the slot), the write goes back to its place in line and the
/// client waits on. When the wait runs out the proxy takes the write over (202) or, on a `wait`
/// route, the client gets the over-limit answer.
async fn live_write(
    p: &Proxy,
    call: &Call<'_>,
    mut ticket: Ticket,
    mut next: Option<(Outbound, Grant, &'static str)>,
    deadline: tokio::time::Instant,
) -> Result<Response<Body>, ProxyError> {
    let (route, token) = (call.route, call.token);
    loop {
        let (out, mut grant, outcome) = match next.take() {
            Some(granted) => granted,
            None => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match ticket.wait(left, &p.ledger, p.clock.as_ref()).await {
                    WaitEnd::Granted(out, grant) => (out, grant, "waited"),
                    WaitEnd::Accepted(a) => {
                        return accepted(p, route, a, token, "write parked; answered 202").await;
                    }
                    WaitEnd::Settled(id, settled) => {
                        return Ok(batched(p, route, id, settled, token));
                    }
                    WaitEnd::GaveUp { retry_at } => {
                        return Ok(reject(p, route, retry_at, None, p.clock.now()));
                    }
                    WaitEnd::Closed => return Err(ProxyError::ShuttingDown),
                }
            }
        };
        match p.admit(&route.quotas, call.keys, &mut grant).await {
            Admission::Granted => {
                return forward_live(p, call, out, grant, outcome, Some(ticket)).await;
            }
            Admission::Denied { .. } => {
                drop(grant);
                if !ticket.back_in_line(out, p.clock.now()) {
                    return Err(ProxyError::ShuttingDown);
                }
            }
        }
    }
}

/// The key of each keyed quota the route consumes, from the request's parts.
fn keys(
    p: &Proxy,
    route: &Route,
    path: &str,
    headers: &HeaderMap,
    client: ClientId,
    fingerprint: Option<Fingerprint>,
) -> Vec<(QuotaId, Arc<str>)> {
    if route.keyed.is_empty() {
        return Vec::new();
    }
    let captures = route
        .paths
        .iter()
        .find_map(|p| p.captures(path))
        .unwrap_or_default();
    route
        .keyed
        .iter()
        .map(|(q, parts)| {
            let key: Vec<String> = parts
                .iter()
                .map(|part| match part {
                    KeyPart::Client => p.clients().get(client).name.clone(),
                    KeyPart::Credential => fingerprint.map(|f| f.to_hex()).unwrap_or_default(),
                    KeyPart::Path(param) => captures
                        .iter()
                        .find(|(n, _)| n == param)
                        .map(|(_, v)| v.to_string())
                        .unwrap_or_default(),
                    KeyPart::Header(name) => headers
                        .get(name)
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default(),
                })
                .collect();
            (*q, Arc::from(key.join("|")))
        })
        .collect()
}

/// Shadow mode: the request goes to the CRM whatever the budget says; the ledger counts it, what
/// enforcing would have done is counted (`crm_proxy_shadow_decisions_total`) and shows in its
/// `RateLimit` headers; nothing is parked, and a CRM 429 reaches the client as is.
async fn shadow(
    p: &Proxy,
    call: &Call<'_>,
    out: Outbound,
    now: Time,
) -> Result<Response<Body>, ProxyError> {
    let route = call.route;
    let demand = Demand {
        quotas: &route.quotas,
        keys: call.keys,
        client: call.client,
        live: true,
        read: route.class == Class::Read,
        deferrable: false,
    };
    let mut grant = p.ledger.acquire_anyway(&demand, now);
    let mut would = grant.would;
    let demand = crate::shared_ledger::demand(&route.quotas, call.keys);
    if let Admission::Denied { retry_at, binding } = p.admit_counted(&demand, &mut grant).await {
        // The shared ledger had no room either (and charges nothing when it refuses); the call
        // goes all the same, so this replica's count keeps it.
        would = would.or(Some(Denied { retry_at, binding }));
    }
    shadow_decision(p, route, would, now);
    forward_live(p, call, out, grant, "forwarded", None).await
}

/// Sends a live request (quota already charged) and streams the CRM's answer back. For a
/// parking route the ticket keeps the write's place: when the verdict on the attempt is to try
/// again (a CRM throttle, or no answer and a resend is safe), the write goes to the proxy (202)
/// instead of failing the client. Any answer that is not a throttle reaches the client as is.
async fn forward_live(
    p: &Proxy,
    call: &Call<'_>,
    out: Outbound,
    grant: Grant,
    outcome: &'static str,
    mut ticket: Option<Ticket>,
) -> Result<Response<Body>, ProxyError> {
    let (route, client, token) = (call.route, call.client, call.token);
    let parkable = (route.on_limit == OnLimit::Queue && ticket.is_some()).then(|| out.clone());
    let safe = route.resend_safe(&out);
    let sent_at = p.clock.now();
    p.clients().series(client, &p.metrics).call();
    let result = p.upstream().send(out).await;
    // The proxy's clock is monotonic between two reads (a wall time fixed at start plus the
    // monotonic time since), so the call's duration is the difference of the two.
    let now = p.clock.now();
    let took = now.saturating_since(sent_at);
    access::crm(took);
    // A live request is its write's first attempt.
    let attempt = Some(1);
    let resp = match result {
        Ok(resp) => {
            p.crm_outcome(Some(resp.status()), sent_at, now);
            resp
        }
        Err(e) => {
            p.metrics.upstream_error(&route.name, e.kind());
            let outage = p.crm_outcome(None, sent_at, now);
            if let ForwardError::Connect(_) = e {
                // Nothing reached the CRM: the slot is free again.
                p.ledger.refund(&grant, &route.quotas, now);
            }
            let what = match e {
                ForwardError::Connect(_) => Attempt::NotSent,
                _ => Attempt::Lost,
            };
            // While the CRM fails as a whole, the write waits without spending its attempt.
            let spent = match p.verdict(what, safe, attempt, outage, now) {
                Verdict::Retry { .. } => Some(true),
                Verdict::Wait { .. } => Some(false),
                _ => None,
            };
            if let (Some(spent), Some(t), Some(req)) = (spent, ticket.as_mut(), parkable)
                && let Some(a) = t.repark(req, spent, &p.ledger, now)
            {
                let why = "the CRM did not answer; write parked for a safe resend";
                return accepted(p, route, a, token, why).await;
            }
            return Err(ProxyError::Upstream(e));
        }
    };
    route
        .series(&p.metrics)
        .upstream_response(resp.status(), took.as_secs_f64());
    let (parts, body) = resp.into_parts();
    let crm = p.config().upstream.crm;
    // The body streams through, or was read (then it is both the answer's and what `learn` reads).
    let (body, read): (Option<UpstreamBody>, Option<Bytes>) = if crm.needs_body(parts.status) {
        // Small error bodies (a Salesforce 403, a HubSpot 429) say whether it is a throttle.
        match Limited::new(body, p.config().max_body_bytes)
            .collect()
            .await
        {
            Ok(c) => (None, Some(c.to_bytes())),
            Err(e) => {
                return Err(ProxyError::Upstream(ForwardError::Io(format!(
                    "reading the CRM's error body: {e}"
                ))));
            }
        }
    } else {
        (Some(body), None)
    };
    let throttled = p
        .learn(
            route,
            &grant,
            parts.status,
            &parts.headers,
            read.as_deref().unwrap_or_default(),
            now,
        )
        .is_some();
    let answered = Attempt::Answered {
        status: parts.status,
        headers: &parts.headers,
        throttled,
    };
    // Only a write with a ticket can go back in line; for the rest the verdict is not asked.
    if parkable.is_some()
        && p.verdict(answered, safe, attempt, None, now) == Verdict::Throttled
        && let (Some(t), Some(req)) = (ticket.as_mut(), parkable)
        && let Some(a) = t.repark(req, false, &p.ledger, now)
    {
        return accepted(
            p,
            route,
            a,
            token,
            "the CRM throttled a live write; parked it",
        )
        .await;
    }
    drop(ticket);
    access::route_outcome(p, route, outcome);
    let usage = p.ledger.usage(&route.quotas, now);
    let fields = response::rate_limit_fields(&p.ledger, &usage, now);
    // The body carries the `RateLimit` fields to the writer (see `response::Body`).
    let body = match body {
        Some(streamed) => Body::carrying(streamed, fields),
        None => Body::carrying(Full::new(read.unwrap_or_default()), fields),
    };
    Ok(Response::from_parts(parts, body))
}

/// `GET /_proxy/requests/{id}` (JSON status) and `GET /_proxy/requests/{id}/response` (the
/// CRM's stored answer, replayed). Unknown ids and other credentials both get 404.
fn own_endpoint(p: &Proxy, req: &Request<RequestBody>, path: &str) -> Response<Body> {
    let rest = path.get(PROXY_PREFIX.len()..).unwrap_or_default();
    let Some(rest) = rest.strip_prefix("requests/") else {
        return response::not_found();
    };
    let (id_text, replay) = match rest.strip_suffix("/response") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    let Ok(id) = id_text.parse::<EntryId>() else {
        return response::status_not_found();
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response::method_not_allowed("GET, HEAD");
    }
    // The reader proves ownership with the write's status token, or the same credential.
    let token = req
        .uri()
        .query()
        .and_then(|q| q.split(['&', ';']).find_map(|kv| kv.strip_prefix("token=")));
    let owner = match token {
        Some(t) => Some(credentials::token_owner(t)),
        None => p.credentials.owner(req.headers(), req.uri().query()),
    };
    let now = p.clock.now();
    let Some(view) = owner.and_then(|o| p.queue.status(id, o, &p.ledger, now)) else {
        return response::status_not_found();
    };
    if replay {
        return match view.stored {
            Some(stored) => {
                let mut resp = Response::new(response::full(stored.body));
                *resp.status_mut() = stored.status;
                *resp.headers_mut() = stored.headers;
                resp
            }
            None => response::not_found(),
        };
    }
    response::json_response(StatusCode::OK, &view)
}

/// Writes that change one existing resource (PUT, PATCH, DELETE) are ordered by their path.
fn resource_key(method: &Method, path: &str, route: &Route) -> Option<Arc<str>> {
    (route.class == Class::Write && matches!(*method, Method::PUT | Method::PATCH | Method::DELETE))
        .then(|| Arc::from(path))
}
