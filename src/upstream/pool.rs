//! Connections to the CRM kept open for reuse: HTTP/1.1 connections, one request at a time
//! each, or one HTTP/2 connection for every request when the CRM offers it by ALPN.
//!
//! An HTTP/1.1 connection is held by one request at a time, whose task writes the request and
//! reads the answer on it ([`super::http1`]); it comes back to the pool once the answer's body
//! has been read to its end, if it can take another request. A checkout takes the most recently
//! returned one, looking first whether the CRM closed it (or sent anything) while it was idle: a
//! closed one is dropped and the next one tried, so a request never goes out on a connection
//! found closed; with none left a new one is opened. Beyond the idle maximum the least recently
//! used kept connection is closed, and with a maximum of 0 none is kept. Once a second while the
//! pool holds any connection, a task closes those the CRM closed and those unused for the idle
//! timeout. The HTTP/2 connection, shared by every request, runs in a task of its own (hyper's).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{self, Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;
use tower_service::Service;

use super::http1::{Conn, Head};
use super::{ForwardError, error_chain};
use crate::frames;
use crate::message::{Outbound, forwarded_fields};

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
    /// Kept HTTP/1.1 connections, none in use, the least recently used first.
    http1: Vec<Http1>,
    http2: Option<http2::SendRequest<Body>>,
    /// A task closes idle connections while the pool holds any.
    reaping: bool,
}

struct Http1 {
    /// Boxed: it holds the TLS state inline, kilobytes that would be copied at every move.
    conn: Box<Conn>,
    /// When it came back from its last request.
    used: Instant,
}

/// A new connection.
enum Sender {
    Http1(Box<Conn>),
    Http2(http2::SendRequest<Body>),
}

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

    /// Sends `out` on a kept connection, or a new one.
    pub async fn send(&self, out: Outbound) -> Result<Answer, ForwardError> {
        let out = match self.checkout() {
            Checkout::Http1(conn) => return self.exchange(conn, out).await,
            Checkout::Http2(mut h2) => match send_http2(&mut h2, out, &self.0.target).await {
                Ok(resp) => return Ok(resp),
                Err(unsent) => unsent?,
            },
            Checkout::None => out,
        };
        // Boxed: opening a connection (TLS, an HTTP/2 handshake) takes a large future that a
        // request on a kept connection should not carry, nor have room for in its frame.
        match frames::boxed(|| self.connect()).await? {
            Sender::Http1(conn) => self.exchange(conn, out).await,
            Sender::Http2(mut h2) => {
                self.keep(|conns| conns.http2 = Some(h2.clone()));
                send_http2(&mut h2, out, &self.0.target)
                    .await
                    .map_err(|unsent| {
                        unsent.err().unwrap_or_else(|| {
                            ForwardError::Io(
                                "a new HTTP/2 connection to the CRM refused the request".into(),
                            )
                        })
                    })
            }
        }
    }

    /// Writes `out` on `conn` and reads its answer's head; the body reads the rest.
    async fn exchange(
        &self,
        mut conn: Box<Conn>,
        mut out: Outbound,
    ) -> Result<Answer, ForwardError> {
        let head = conn
            .exchange(
                &out.method,
                out.path_and_query.as_str(),
                &self.0.target.host,
                &mut out.headers,
                &out.body,
            )
            .await
            .map_err(ForwardError::Io)?;
        Ok(Answer::Http1(head, conn))
    }

    /// Takes the most recently returned kept HTTP/1.1 connection still open, or names the
    /// HTTP/2 connection. Kept connections found closed are dropped.
    fn checkout(&self) -> Checkout {
        let mut conns = self.0.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h2) = &conns.http2 {
            if !h2.is_closed() {
                return Checkout::Http2(h2.clone());
            }
            conns.http2 = None;
        }
        while let Some(mut kept) = conns.http1.pop() {
            if kept.conn.idle_open() {
                return Checkout::Http1(kept.conn);
            }
        }
        Checkout::None
    }

    /// Takes back a connection whose answer has been read; beyond the idle maximum the least
    /// recently used kept one is closed.
    pub fn check_in(&self, conn: Box<Conn>) {
        let max_idle = self.0.max_idle;
        self.keep(|conns| {
            if conns.http1.len() >= max_idle {
                conns.http1.remove(0);
            }
            conns.http1.push(Http1 {
                conn,
                used: Instant::now(),
            });
        });
    }

    /// Adds a connection to the pool (unless it keeps none), starting the reaper if none runs.
    /// Outside a runtime (a body dropped as its runtime shuts down) nothing is kept.
    fn keep(&self, add: impl FnOnce(&mut Conns)) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.0.max_idle == 0 {
            return;
        }
        let mut conns = self.0.conns.lock().unwrap_or_else(|e| e.into_inner());
        add(&mut conns);
        if !conns.reaping {
            conns.reaping = true;
            runtime.spawn(reap(Arc::downgrade(&self.0)));
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
        Ok(Sender::Http1(Box::new(Conn::new(TokioIo::new(io)))))
    }
}

/// A CRM's answer as the pool got it: an HTTP/1.1 head and the connection its body is on (to
/// come back with [`Pool::check_in`] once read), or hyper's HTTP/2 response.
pub enum Answer {
    Http1(Head, Box<Conn>),
    Http2(Response<Incoming>),
}

/// What a checkout found: a kept HTTP/1.1 connection, the HTTP/2 connection, or neither.
enum Checkout {
    Http1(Box<Conn>),
    Http2(http2::SendRequest<Body>),
    None,
}

/// HTTP/2 names scheme and authority in the request's URI (its pseudo-headers). A request the
/// connection refused before any of it was sent (it was closing) comes back as `Err(Ok(out))`,
/// free to go on a new connection; any other failure is `Err(Err(_))`.
async fn send_http2(
    sender: &mut http2::SendRequest<Body>,
    out: Outbound,
    target: &Target,
) -> Result<Answer, Result<Outbound, ForwardError>> {
    let Outbound {
        method,
        path_and_query,
        mut headers,
        body,
    } = out;
    forwarded_fields(&mut headers);
    let mut uri = uri::Parts::default();
    uri.scheme = Some(target.scheme.clone());
    uri.authority = Some(target.authority.clone());
    uri.path_and_query = Some(path_and_query.clone());
    let mut req = Request::new(Full::new(body.clone()));
    *req.method_mut() = method;
    *req.headers_mut() = headers;
    if let Ok(uri) = Uri::from_parts(uri) {
        *req.uri_mut() = uri;
    }
    match sender.try_send_request(req).await {
        Ok(resp) => Ok(Answer::Http2(resp)),
        Err(mut e) => match e.take_message() {
            Some(unsent) => {
                let parts = unsent.into_parts().0;
                Err(Ok(Outbound {
                    method: parts.method,
                    path_and_query,
                    headers: parts.headers,
                    body,
                }))
            }
            None => Err(Err(ForwardError::Io(error_chain(&e.into_error())))),
        },
    }
}

/// How often the reaper looks.
const REAP_EVERY: Duration = Duration::from_secs(1);

/// Closes the pool's connections that the CRM closed or that went unused for the idle timeout;
/// ends with the pool, or when it holds none.
async fn reap(pool: Weak<Inner>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        let Some(inner) = pool.upgrade() else {
            return;
        };
        let mut conns = inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        conns
            .http1
            .retain_mut(|c| now.duration_since(c.used) < inner.idle_timeout && c.conn.idle_open());
        if conns.http2.as_ref().is_some_and(|h2| h2.is_closed()) {
            conns.http2 = None;
        }
        if conns.http1.is_empty() && conns.http2.is_none() {
            conns.reaping = false;
            return;
        }
    }
}
