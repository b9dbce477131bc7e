//! The upstream client: pooled HTTP/1.1 (and HTTP/2 by ALPN) over rustls, timeouts, and what
//! the last requests to the CRM looked like.

mod body;
pub(crate) mod chunked;
mod deadline;
pub(crate) mod head;
pub(crate) mod http1;
mod pool;

use std::cell::{Cell, RefCell};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use http::Response;
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::clock::{SharedClock, Time};
use crate::config::UpstreamConfig;
use crate::message::{BufferedResponse, Outbound, detached, drop_body, strip_hop_by_hop};
use crate::tls;
pub use body::{BodyError, UpstreamBody};
use pool::{Answer, Pool, Target};

/// Why a request to the CRM produced no response.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The connection (TCP or TLS) could not be opened: the request was certainly not sent.
    #[error("cannot connect to the CRM: {0}")]
    Connect(String),
    /// No response head within the request timeout: the CRM may or may not have acted on it.
    #[error("the CRM sent no response within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request was (possibly) sent.
    #[error("the connection to the CRM failed: {0}")]
    Io(String),
}

impl ForwardError {
    pub fn kind(&self) -> &'static str {
        match self {
            ForwardError::Connect(_) => "connect",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::Io(_) => "io",
        }
    }
}

/// Distinguishes the clients a process builds (a reload builds a new one), so a thread's own
/// pool is rebuilt when the client it was built for is replaced.
static GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// On a data-plane thread: its own pool for the client of the given generation.
    static THREAD_POOL: RefCell<Option<(u64, Pool)>> = const { RefCell::new(None) };
    static OWN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as one with a runtime of its own: requests sent from it use a
/// connection pool of its own, so their connections are driven on that thread too.
pub fn use_thread_pool() {
    OWN_POOL.with(|own| own.set(true));
}

/// Pooled client for one upstream.
pub struct UpstreamClient {
    /// The pool of threads without a pool of their own (the shared runtime: the drain, tests).
    client: Pool,
    generation: u64,
    clock: SharedClock,
    prefix: String,
    request_timeout: Duration,
    url: String,
    /// Written on every request, so kept as times; [`UpstreamClient::health`] formats them.
    record: Record,
}

/// What the last requests to the CRM looked like. An answer, the common case, takes no lock
/// (and writes its time at most once a millisecond); an error takes the lock that keeps its
/// message.
#[derive(Default)]
struct Record {
    /// Nanoseconds of the last answer's [`Time`]; 0: none yet.
    last_response_at: AtomicU64,
    consecutive_errors: AtomicU32,
    last_error: Mutex<Option<(Time, String)>>,
}

/// What the last requests to the CRM looked like, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    /// Base URL of the CRM (no credentials: they are refused in config).
    pub url: String,
    pub last_response_at: Option<String>,
    pub last_error_at: Option<String>,
    pub last_error: Option<String>,
    /// Requests in a row that got no response; 0 while the CRM answers.
    pub consecutive_errors: u32,
}

impl UpstreamClient {
    /// A client for the CRM `cfg` names; health times are read from `clock`.
    pub fn new(cfg: &UpstreamConfig, clock: SharedClock) -> Result<UpstreamClient, String> {
        let tls = tls::client_config(cfg.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let scheme = cfg
            .url
            .scheme()
            .cloned()
            .ok_or("upstream URL has no scheme")?;
        let authority = cfg
            .url
            .authority()
            .cloned()
            .ok_or("upstream URL has no host")?;
        let client = Pool::new(
            connector,
            Target::new(scheme, authority)?,
            cfg.pool_idle_timeout,
            cfg.pool_max_idle,
        );
        Ok(UpstreamClient {
            client,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            clock,
            prefix: cfg.path_prefix().to_string(),
            request_timeout: cfg.request_timeout,
            url: cfg.url.to_string(),
            record: Record::default(),
        })
    }

    /// The pool to send from: the calling thread's own on a data-plane thread, else the shared one.
    fn pool(&self) -> Pool {
        if !OWN_POOL.with(Cell::get) {
            return self.client.clone();
        }
        THREAD_POOL.with(|slot| {
            let mut slot = slot.borrow_mut();
            match &*slot {
                Some((generation, pool)) if *generation == self.generation => pool.clone(),
                _ => {
                    let own = self.client.sibling();
                    *slot = Some((self.generation, own.clone()));
                    own
                }
            }
        })
    }

    /// Sends a request and returns the response head with its streaming body. The head holds
    /// no field that ends at this hop (see [`strip_hop_by_hop`]): the HTTP/1.1 reader keeps
    /// none, and an HTTP/2 answer is stripped here.
    pub async fn send(&self, mut out: Outbound) -> Result<Response<UpstreamBody>, ForwardError> {
        if !self.prefix.is_empty() {
            out.path_and_query = format!("{}{}", self.prefix, out.path_and_query)
                .parse()
                .map_err(|e| ForwardError::Io(format!("cannot build upstream path: {e}")))?;
        }
        let pool = self.pool();
        // The request goes to the pool as it is (no `Request` built from it and taken apart
        // again); pinned where it is made: the timeout holds a reference, so the call's future
        // is not moved into it (a copy of its whole state).
        let call = std::pin::pin!(pool.send(out));
        let timed = if OWN_POOL.with(Cell::get) {
            deadline::within(self.request_timeout, call).await.ok()
        } else {
            tokio::time::timeout(self.request_timeout, call).await.ok()
        };
        let result = match timed {
            None => Err(ForwardError::Timeout(self.request_timeout)),
            Some(Err(e)) => Err(e),
            Some(Ok(Answer::Http1(head, conn))) => {
                let body = UpstreamBody::http1(conn, head.framing, head.reusable, &pool);
                Ok(head.response.map(|()| body))
            }
            Some(Ok(Answer::Http2(mut resp))) => {
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp.map(UpstreamBody::http2))
            }
        };
        self.record(&result);
        result
    }

    fn record(&self, result: &Result<Response<UpstreamBody>, ForwardError>) {
        let now = self.clock.now();
        let r = &self.record;
        match result {
            Ok(_) => {
                // Written at most once a millisecond: both data threads answer here, and a
                // line one writes on every request moves between their cores each time.
                let nanos = now.as_nanos();
                if nanos.saturating_sub(r.last_response_at.load(Ordering::Relaxed)) >= 1_000_000 {
                    r.last_response_at.store(nanos, Ordering::Relaxed);
                }
                // Looked at first: the line is written only when errors were counted.
                if r.consecutive_errors.load(Ordering::Relaxed) != 0 {
                    r.consecutive_errors.store(0, Ordering::Relaxed);
                }
            }
            Err(e) => {
                let mut last = r.last_error.lock().unwrap_or_else(|e| e.into_inner());
                *last = Some((now, e.to_string()));
                r.consecutive_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn health(&self) -> Health {
        let r = &self.record;
        let last = r.last_error.lock().unwrap_or_else(|e| e.into_inner());
        let answered = r.last_response_at.load(Ordering::Relaxed);
        Health {
            url: self.url.clone(),
            last_response_at: (answered != 0).then(|| Time::from_nanos(answered).to_string()),
            last_error_at: last.as_ref().map(|(t, _)| t.to_string()),
            last_error: last.as_ref().map(|(_, e)| e.clone()),
            consecutive_errors: r.consecutive_errors.load(Ordering::Relaxed),
        }
    }

    /// Sends a request and reads the whole response within the timeout. A body over
    /// `max_body` bytes is not kept: the answer comes back with its status and headers and an
    /// empty body marked with [`crate::message::BODY_DROPPED`] (the CRM acted; only its body is lost).
    pub async fn send_buffered(
        &self,
        out: Outbound,
        max_body: usize,
    ) -> Result<BufferedResponse, ForwardError> {
        let started = tokio::time::Instant::now();
        let resp = self.send(out).await?;
        let (parts, mut body) = resp.into_parts();
        let deadline = started + self.request_timeout;
        let mut kept = BytesMut::new();
        let mut dropped: Option<u64> = None;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(ForwardError::Timeout(self.request_timeout)),
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(ForwardError::Io(format!("reading the response: {e}")));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if kept.len() + data.len() > max_body {
                // Not read further: the connection is dropped with the rest of the body.
                let declared = parts
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                dropped = Some(declared.unwrap_or((kept.len() + data.len()) as u64));
                break;
            }
            kept.extend_from_slice(&data);
        }
        let mut answer = BufferedResponse {
            status: parts.status,
            headers: detached(&parts.headers),
            body: kept.freeze(),
        };
        if let Some(bytes) = dropped {
            drop_body(&mut answer, bytes);
        }
        Ok(answer)
    }
}

/// An error and its sources on one line (hyper's top-level messages alone are vague).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
