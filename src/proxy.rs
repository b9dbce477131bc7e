//! The data plane: classify → ledger → forward | park | reject, and the `/_proxy/` status endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::client::{Caller, ClientId, Clients};
use crate::clock::{SharedClock, Time};
use crate::config::{Config, KeyPart, OnLimit};
use crate::crm::Throttle;
use crate::forward::{self, ForwardError, Outbound, Upstream};
use crate::metrics::{ClientQuotaView, ClientView, KeysView, Metrics};
use crate::queue::{
    Accepted, Enter, EntryId, Fingerprint, Parkable, Queue, QueueStatus, Ticket, Timeout,
};
use crate::quota::{Demand, Grant, Ledger, QuotaId};
use crate::response::{self, Body, PROXY_PREFIX, ProxyError};
use crate::route::{IDEMPOTENCY_KEY, Route, RouteTable};
use crate::store::Store;

/// Where the proxy is in its life, as `/readyz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Restoring parked writes from the store; no data traffic yet.
    Starting = 0,
    Ready = 1,
    /// Shutdown began: no new connections or parked writes.
    Stopping = 2,
}

/// Everything the data plane, the dispatcher and the admin endpoints share.
pub struct Proxy {
    pub config: Arc<Config>,
    pub clock: SharedClock,
    pub ledger: Ledger,
    pub routes: Arc<RouteTable>,
    pub queue: Arc<Queue>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub clients: Clients,
    /// Starting (the queue is being restored), ready, or stopping: `/readyz` answers it.
    phase: AtomicU8,
}

impl Proxy {
    /// A proxy keeping its parked writes in `store` (opened by the caller: see [`crate::serve`]).
    pub fn new(config: Config, clock: SharedClock, store: Store) -> Result<Proxy, String> {
        let upstream = Upstream::new(&config.upstream)?;
        let routes = Arc::new(RouteTable::new(&config));
        let quota_names: Vec<&str> = config.quotas.iter().map(|q| q.name.as_str()).collect();
        let lane_names: Vec<&str> = routes.lanes().iter().map(|l| l.name.as_str()).collect();
        let clients = Clients::new(config.clients.clone());
        let metrics = Arc::new(Metrics::new(
            &routes.names(),
            &quota_names,
            &lane_names,
            &clients.names(),
        ));
        let ledger = Ledger::for_config(&config, clock.now());
        let queue = Arc::new(Queue::new(
            &config,
            routes.clone(),
            metrics.clone(),
            ledger.board(),
            store,
        ));
        Ok(Proxy {
            config: Arc::new(config),
            clock,
            ledger,
            routes,
            queue,
            upstream,
            metrics,
            clients,
            phase: AtomicU8::new(Phase::Starting as u8),
        })
    }

    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Handles one client request on the data listener.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        if req.uri().path().starts_with(PROXY_PREFIX) {
            return self.own_endpoint(&req);
        }
        let route = self.routes.classify(req.method(), req.uri().path());
        match self.proxy(route, req, peer).await {
            Ok(resp) => resp,
            Err(e) => {
                let outcome = match &e {
                    ProxyError::TooLarge { .. } => "too_large",
                    ProxyError::QueueFull { .. } | ProxyError::ShuttingDown => "queue_full",
                    ProxyError::NotStored { .. } => "not_stored",
                    ProxyError::Upstream(_) => "upstream_error",
                    ProxyError::BadBody(_) => "bad_body",
                };
                self.metrics.request(&route.name, outcome);
                if let ProxyError::Upstream(fe) = &e {
                    tracing::warn!(route = %route.name, error = %fe, "CRM request failed");
                }
                response::error(&e)
            }
        }
    }

    async fn proxy(
        &self,
        route: &Route,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, ProxyError> {
        let max = self.config.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(ProxyError::TooLarge { limit: max });
        }
        let (parts, body) = req.into_parts();
        let body: Bytes = match Limited::new(body, max).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(ProxyError::TooLarge { limit: max });
            }
            Err(e) => return Err(ProxyError::BadBody(e.to_string())),
        };
        let mut headers = parts.headers;
        // The credential's fingerprint guards a parked write's status, and may identify the
        // client or key a quota; nothing else needs it.
        let fingerprint = (route.parks()
            || self.clients.needs_fingerprint()
            || route
                .keyed
                .iter()
                .any(|(_, parts)| parts.contains(&KeyPart::Credential)))
        .then(|| Fingerprint::of(&headers));
        let client = self.clients.identify(&Caller {
            headers: &headers,
            source: peer.ip(),
            fingerprint,
        });
        self.metrics.client_request(&self.clients.get(client).name);
        let keys = self.keys(route, parts.uri.path(), &headers, client, fingerprint);
        forward::prepare_request_headers(&mut headers, peer.ip());
        if route.idempotency_key && !headers.contains_key(IDEMPOTENCY_KEY) {
            // Generated once, kept with the request through every resend.
            let key = EntryId::random().to_string();
            headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_str(&key).expect("hex"));
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string());
        let record = record_key(&parts.method, parts.uri.path(), route);
        let out = Outbound {
            method: parts.method,
            path_and_query,
            headers,
            body,
        };
        let now = self.clock.now();

        if !route.parks() {
            let demand = Demand {
                quotas: &route.quotas,
                keys: &keys,
                client,
                live: true,
            };
            return match self.ledger.try_acquire(&demand, now) {
                Ok(grant) => {
                    self.forward_live(route, client, out, grant, "forwarded", None)
                        .await
                }
                Err(denied) => Ok(self.reject(route, denied.retry_at, denied.binding, now)),
            };
        }
        let parkable = Parkable {
            request: out,
            fingerprint: fingerprint.expect("computed for parking routes"),
            record,
            client,
            keys,
        };
        match self.queue.enter(&self.ledger, route, parkable, now) {
            Enter::Go(ticket, out, grant) => {
                self.forward_live(route, client, out, grant, "forwarded", Some(ticket))
                    .await
            }
            Enter::Full => {
                let retry_at = self
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
                self.accepted(
                    route,
                    a,
                    "write parked; answered 202 at once (no slot within max_wait)",
                )
                .await
            }
            Enter::Refused { retry_at } => Ok(self.reject(route, retry_at, None, now)),
            Enter::Parked(mut ticket) => {
                match ticket
                    .wait(route.max_wait, &self.ledger, self.clock.as_ref())
                    .await
                {
                    Timeout::Granted(out, grant) => {
                        self.forward_live(route, client, out, grant, "waited", Some(ticket))
                            .await
                    }
                    Timeout::Accepted(a) => {
                        self.accepted(route, a, "write parked; answered 202").await
                    }
                    Timeout::GaveUp { retry_at } => {
                        let now = self.clock.now();
                        Ok(self.reject(route, retry_at, None, now))
                    }
                    Timeout::Closed => Err(ProxyError::ShuttingDown),
                }
            }
        }
    }

    /// Each client's use of the quotas and its parked writes, for `/status` and metrics.
    pub fn client_views(&self, queue: &QueueStatus, now: Time) -> Vec<ClientView> {
        let uses = self.ledger.client_use(now);
        self.clients
            .all()
            .iter()
            .enumerate()
            .map(|(c, cfg)| {
                let lanes = queue.lanes.iter().filter(|l| l.client == cfg.name);
                ClientView {
                    name: cfg.name.clone(),
                    weight: cfg.weight,
                    quotas: self
                        .config
                        .quotas
                        .iter()
                        .enumerate()
                        .filter(|(_, q)| q.key.is_empty())
                        .map(|(q, qc)| ClientQuotaView {
                            quota: qc.name.clone(),
                            used: uses[c][q],
                            share: uses[c][q] as f64 / f64::from(qc.limit),
                        })
                        .collect(),
                    parked: lanes.clone().map(|l| l.depth).sum(),
                    oldest_parked_age_seconds: lanes
                        .map(|l| l.oldest_age_seconds)
                        .fold(0.0, f64::max),
                }
            })
            .collect()
    }

    /// The keyed quotas' memory.
    pub fn keys_views(&self) -> Vec<KeysView> {
        self.ledger
            .keys()
            .into_iter()
            .map(|(q, tracked, overflowed)| KeysView {
                quota: self.ledger.config(q).name.clone(),
                tracked,
                overflowed,
            })
            .collect()
    }

    /// The key of each keyed quota the route consumes, from the request's parts.
    fn keys(
        &self,
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
                        KeyPart::Client => self.clients.get(client).name.clone(),
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

    /// The 202 for a write the proxy took over, once the store holds it; when it cannot, the
    /// write is dropped and the client told 503, so a 202 always means "kept".
    async fn accepted(
        &self,
        route: &Route,
        a: Accepted,
        why: &str,
    ) -> Result<Response<Body>, ProxyError> {
        if let Err(e) = a.commit.durable().await {
            self.queue.settle(a.id, false);
            tracing::error!(request_id = %a.id, route = %route.name, error = %e, "cannot store a parked write; answering 503");
            return Err(ProxyError::NotStored {
                retry_after: self.config.upstream.retry_after_default.as_secs().max(1),
            });
        }
        self.queue.settle(a.id, true);
        self.metrics.request(&route.name, "queued");
        tracing::info!(request_id = %a.id, route = %route.name, position = a.position, "{why}");
        Ok(response::accepted(
            a.id,
            a.position,
            a.estimated_dispatch_at,
        ))
    }

    /// The over-limit answer for a request that cannot be sent in time.
    fn reject(
        &self,
        route: &Route,
        retry_at: Time,
        binding: Option<QuotaId>,
        now: Time,
    ) -> Response<Body> {
        self.metrics.request(&route.name, "rejected");
        let usage = self.ledger.usage(&route.quotas, now);
        // When the decision came from the queue, the binding quota is the one with least left.
        let binding = binding.or_else(|| usage.first().map(|u| u.quota));
        let quota = binding.map(|q| self.ledger.config(q));
        let mut resp = response::over_limit(self.config.upstream.crm, retry_at, now, quota);
        response::add_rate_limit_headers(resp.headers_mut(), &self.ledger, &usage, now);
        resp
    }

    /// Sends a live request (quota already charged) and streams the CRM's answer back. For a
    /// parking route the ticket keeps the write's place: a CRM throttle, or no answer when a
    /// resend is safe, hands it to the proxy (202) instead of failing the client.
    #[allow(clippy::too_many_arguments)]
    async fn forward_live(
        &self,
        route: &Route,
        client: ClientId,
        out: Outbound,
        grant: Grant,
        outcome: &'static str,
        mut ticket: Option<Ticket>,
    ) -> Result<Response<Body>, ProxyError> {
        let parkable = (route.on_limit == OnLimit::Queue && ticket.is_some()).then(|| out.clone());
        let safe = route.resend_safe(&out);
        let started = tokio::time::Instant::now();
        self.metrics.client_call(&self.clients.get(client).name);
        let result = self.upstream.send(out).await;
        let now = self.clock.now();
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                self.metrics.upstream_error(&route.name, e.kind());
                let resendable = matches!(e, ForwardError::Connect(_)) || safe;
                if let (Some(t), Some(req)) = (ticket.as_mut(), parkable)
                    && resendable
                    && let Some(a) = t.repark(req, true, &self.ledger, now)
                {
                    return self
                        .accepted(
                            route,
                            a,
                            "the CRM did not answer; write parked for a safe resend",
                        )
                        .await;
                }
                return Err(ProxyError::Upstream(e));
            }
        };
        self.metrics
            .upstream_response(&route.name, resp.status(), started.elapsed().as_secs_f64());
        let (mut parts, body) = resp.into_parts();
        let crm = self.config.upstream.crm;
        let (body, read): (Body, Option<Bytes>) = if crm.needs_body(parts.status) {
            // Small error bodies (a Salesforce 403, a HubSpot 429) say whether it is a throttle.
            match Limited::new(body, self.config.max_body_bytes)
                .collect()
                .await
            {
                Ok(c) => {
                    let bytes = c.to_bytes();
                    (response::full(bytes.clone()), Some(bytes))
                }
                Err(e) => {
                    return Err(ProxyError::Upstream(ForwardError::Io(format!(
                        "reading the CRM's error body: {e}"
                    ))));
                }
            }
        } else {
            (body.boxed(), None)
        };
        let throttled = self
            .learn(
                route,
                &grant,
                parts.status,
                &parts.headers,
                read.as_deref().unwrap_or_default(),
                now,
            )
            .is_some();
        if throttled
            && let (Some(t), Some(req)) = (ticket.as_mut(), parkable)
            && let Some(a) = t.repark(req, false, &self.ledger, now)
        {
            return self
                .accepted(route, a, "the CRM throttled a live write; parked it")
                .await;
        }
        drop(ticket);
        self.metrics.request(&route.name, outcome);
        forward::strip_hop_by_hop(&mut parts.headers);
        let usage = self.ledger.usage(&route.quotas, now);
        response::add_rate_limit_headers(&mut parts.headers, &self.ledger, &usage, now);
        Ok(Response::from_parts(parts, body))
    }

    /// Takes in what a CRM answer says: its rate-limit headers correct the quotas the request
    /// consumed, and a throttle answer pauses the quotas it names (or the route's) until the
    /// reset the CRM gave, a dialect default, or `retry_after_default`. Returns the throttle.
    pub fn learn(
        &self,
        route: &Route,
        grant: &Grant,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        now: Time,
    ) -> Option<Throttle> {
        let crm = self.config.upstream.crm;
        let observations = crm.observe(headers, now, &mut |h| self.metrics.header_error(h));
        for (q, remaining, limit) in self.ledger.observe(&observations, grant, now).reported {
            self.metrics
                .crm_reported(&self.ledger.config(q).name, remaining, limit);
        }
        let throttle = crm.throttle(status, headers, body, &observations, now)?;
        let named = throttle
            .scope
            .as_deref()
            .map(|s| self.ledger.synced_to(s))
            .unwrap_or_default();
        let quotas = if named.is_empty() {
            route.quotas.clone()
        } else {
            named.clone()
        };
        let until = throttle.until.unwrap_or_else(|| {
            named
                .iter()
                .map(|&q| self.ledger.window_end(q, now))
                .max()
                .unwrap_or(now + self.config.upstream.retry_after_default)
        });
        for (q, gained) in self.ledger.freeze(&quotas, until, now) {
            self.metrics.frozen(&self.ledger.config(q).name, gained);
        }
        self.metrics.throttled(&route.name, throttle.reason);
        tracing::warn!(route = %route.name, reason = throttle.reason, until = %until, "the CRM throttled a request; pausing its quotas");
        Some(throttle)
    }

    /// `GET /_proxy/requests/{id}` (JSON status) and `GET /_proxy/requests/{id}/response` (the
    /// CRM's stored answer, replayed). Unknown ids and other credentials both get 404.
    fn own_endpoint(&self, req: &Request<Incoming>) -> Response<Body> {
        let rest = &req.uri().path()[PROXY_PREFIX.len()..];
        let Some(rest) = rest.strip_prefix("requests/") else {
            return response::not_found();
        };
        let (id_text, replay) = match rest.strip_suffix("/response") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        let Ok(id) = id_text.parse::<EntryId>() else {
            return response::not_found();
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return response::method_not_allowed("GET, HEAD");
        }
        let now = self.clock.now();
        let Some(view) = self
            .queue
            .status(id, Fingerprint::of(req.headers()), &self.ledger, now)
        else {
            return response::not_found();
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
}

/// Writes that change one existing record (PUT, PATCH, DELETE) are ordered by their path.
fn record_key(method: &Method, path: &str, route: &Route) -> Option<Arc<str>> {
    (route.class == crate::config::Class::Write
        && matches!(*method, Method::PUT | Method::PATCH | Method::DELETE))
    .then(|| Arc::from(path))
}
