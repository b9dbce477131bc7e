//! Connections to the CRM kept open for reuse: HTTP/1.1 connections, one request at a time
//! each, or one HTTP/2 connection for every request when the CRM offers it by ALPN.
//!
//! A checkout looks for a kept connection ready for its next request, from the one the reaper
//! last found most recently used, and opens a new one when none is. A request that meets a kept
//! connection closing under it before any of it was written goes again, once, on a new
//! connection. Once a second while the pool holds any connection, a task closes those unused for
//! the idle timeout and the ready ones beyond the idle maximum (the least recently used first);
//! with a maximum of 0 no connection is kept.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower_service::Service;

use super::{ForwardError, error_chain};

type Body = Full<Bytes>;

/// Where the pool connects, and the `Host` an HTTP/1.1 request carries.
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
}

impl Target {
    pub fn new(scheme: Scheme, authority: Authority) -> Result<Target, String> {
        // The port is named only when it is not the scheme's own.
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_string(),
        };
        let host = HeaderValue::from_str(&host).map_err(|e| format!("upstream host: {e}"))?;
        Ok(Target {
            scheme,
            authority,
            host,
        })
    }

    fn uri(&self) -> Uri {
        Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            parts
        })
        .expect("scheme and authority make a URI")
    }
}

/// A pool for one CRM; cloning it shares the pool.
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    target: Arc<Target>,
    idle_timeout: Duration,
    max_idle: usize,
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    http1: Vec<Http1>,
    http2: Option<http2::SendRequest<Body>>,
    /// A task closes idle connections while the pool holds any.
    reaping: bool,
}

struct Http1 {
    sender: http1::SendRequest<Body>,
    /// When its last request was sent.
    used: Instant,
}

/// A new connection.
enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

type Sent = Result<Response<Incoming>, TrySendError<Request<Body>>>;

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        target: Target,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Pool {
        Pool(Arc::new(Inner {
            connector,
            target: Arc::new(target),
            idle_timeout,
            max_idle,
            conns: Mutex::default(),
        }))
    }

    /// Another pool to the same CRM with the same limits, holding no connection yet.
    pub fn sibling(&self) -> Pool {
        Pool(Arc::new(Inner {
            connector: self.0.connector.clone(),
            target: self.0.target.clone(),
            idle_timeout: self.0.idle_timeout,
            max_idle: self.0.max_idle,
            conns: Mutex::default(),
        }))
    }

    /// Sends `req` (origin-form URI) on a kept connection, or a new one.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, ForwardError> {
        let target = &self.0.target;
        let req = match self.checkout(req) {
            Checkout::Http1(sent) => match sent.await {
                Ok(resp) => return Ok(resp),
                Err(e) => unsent(e)?,
            },
            Checkout::Http2(mut h2, req) => match send_http2(&mut h2, req, target).await {
                Ok(resp) => return Ok(resp),
                Err(e) => unsent(e)?,
            },
            Checkout::None(req) => req,
        };
        // Boxed: opening a connection (TLS, an HTTP/2 handshake) takes a large future that a
        // request on a kept connection should not carry.
        Box::pin(self.send_fresh(req)).await
    }

    /// Sends `req` on a new connection, kept by the pool from then on.
    async fn send_fresh(&self, req: Request<Body>) -> Result<Response<Incoming>, ForwardError> {
        let target = &self.0.target;
        let sent = match self.connect().await? {
            Sender::Http1(mut h1) => {
                let sent = send_http1(&mut h1, req, target);
                let used = Instant::now();
                self.keep(|conns| conns.http1.push(Http1 { sender: h1, used }));
                sent.await
            }
            Sender::Http2(mut h2) => {
                let sent = send_http2(&mut h2, req, target);
                self.keep(|conns| conns.http2 = Some(h2));
                sent.await
            }
        };
        sent.map_err(|e| ForwardError::Io(error_chain(&e.into_error())))
    }

    /// Hands `req` to a kept HTTP/1.1 connection ready for it, or names the HTTP/2 connection.
    fn checkout(&self, req: Request<Body>) -> Checkout<impl Future<Output = Sent> + use<>> {
        let mut conns = self.0.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h2) = &conns.http2 {
            if !h2.is_closed() {
                return Checkout::Http2(h2.clone(), req);
            }
            conns.http2 = None;
        }
        match conns.http1.iter_mut().rev().find(|c| c.sender.is_ready()) {
            Some(conn) => {
                conn.used = Instant::now();
                Checkout::Http1(send_http1(&mut conn.sender, req, &self.0.target))
            }
            None => Checkout::None(req),
        }
    }

    /// Adds a new connection to the pool (unless it keeps none), starting the reaper if none
    /// runs.
    fn keep(&self, add: impl FnOnce(&mut Conns)) {
        if self.0.max_idle == 0 {
            return;
        }
        let mut conns = self.0.conns.lock().unwrap_or_else(|e| e.into_inner());
        add(&mut conns);
        if !conns.reaping {
            conns.reaping = true;
            tokio::spawn(reap(Arc::downgrade(&self.0)));
        }
    }

    /// Opens a connection (TCP, then TLS with ALPN for an `https` CRM) and starts its protocol.
    async fn connect(&self) -> Result<Sender, ForwardError> {
        let fail = |e: &dyn std::error::Error| ForwardError::Connect(error_chain(e));
        let mut connector = self.0.connector.clone();
        let io = connector
            .call(self.0.target.uri())
            .await
            .map_err(|e| fail(&*e))?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|e| fail(&e))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "HTTP/2 connection to the CRM ended");
                }
            });
            return Ok(Sender::Http2(sender));
        }
        let (sender, conn) = http1::handshake(io).await.map_err(|e| fail(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection to the CRM ended");
            }
        });
        Ok(Sender::Http1(sender))
    }
}

/// What a checkout found: a kept HTTP/1.1 connection the request is on its way over, the
/// HTTP/2 connection, or nothing ready (the request comes back).
enum Checkout<F> {
    Http1(F),
    Http2(http2::SendRequest<Body>, Request<Body>),
    None(Request<Body>),
}

/// The request back when none of it reached the CRM (a kept connection closed under it): it may
/// go again on a new connection. Any other failure is final.
fn unsent(mut e: TrySendError<Request<Body>>) -> Result<Request<Body>, ForwardError> {
    e.take_message()
        .ok_or_else(|| ForwardError::Io(error_chain(&e.into_error())))
}

/// HTTP/1.1 names the host in a header and the resource in origin form (as the request has it).
fn send_http1(
    sender: &mut http1::SendRequest<Body>,
    mut req: Request<Body>,
    target: &Target,
) -> impl Future<Output = Sent> + use<> {
    req.headers_mut().insert(header::HOST, target.host.clone());
    sender.try_send_request(req)
}

/// HTTP/2 names scheme and authority in the request's URI (its pseudo-headers).
fn send_http2(
    sender: &mut http2::SendRequest<Body>,
    mut req: Request<Body>,
    target: &Target,
) -> impl Future<Output = Sent> + use<> {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(target.scheme.clone());
    parts.authority = Some(target.authority.clone());
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    sender.try_send_request(req)
}

/// How often the reaper looks.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Closes the pool's connections that are closed, unused for the idle timeout, or ready beyond
/// the idle maximum (the least recently used first); ends with the pool, or when it holds none.
async fn reap(pool: Weak<Inner>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(inner) = pool.upgrade() else {
            return;
        };
        let mut conns = inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let idle =
            |c: &Http1| c.sender.is_ready() && now.duration_since(c.used) >= inner.idle_timeout;
        conns.http1.retain(|c| !c.sender.is_closed() && !idle(c));
        conns.http1.sort_by_key(|c| c.used);
        let mut ready = conns.http1.iter().filter(|c| c.sender.is_ready()).count();
        conns.http1.retain(|c| {
            let surplus = ready > inner.max_idle && c.sender.is_ready();
            if surplus {
                ready -= 1;
            }
            !surplus
        });
        if conns.http2.as_ref().is_some_and(|h2| h2.is_closed()) {
            conns.http2 = None;
        }
        if conns.http1.is_empty() && conns.http2.is_none() {
            conns.reaping = false;
            return;
        }
    }
}
