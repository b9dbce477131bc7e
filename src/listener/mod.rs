//! Client connections: how many may be open, how long a new one has to send its first request,
//! how long one may sit idle or trickle a request head, HTTP/2 stream limits, and a graceful
//! stop. A slow or silent client holds its own connection at most, never the listener; when the
//! process runs out of file descriptors the listener backs off and says so once, not per try.
//! HTTP/1.1 is the proxy's own server (`http1`), HTTP/2 hyper's.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::Listen;

mod accept;
mod answer;
mod body;
mod http1;
mod lifetime;

pub use accept::accept_loop;
pub use body::RequestBody;

/// Connections the admin listener keeps open at once (scrapes, probes, an operator).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// What one listener allows each connection.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// From accept to the first request's complete head, and from the first byte of any later
    /// head to its end.
    pub header_timeout: Duration,
    /// With no request in progress, a connection is closed after this long.
    pub idle_timeout: Duration,
    pub h2_max_streams: u32,
}

impl ConnLimits {
    pub fn data(l: &Listen) -> ConnLimits {
        ConnLimits {
            max_connections: l.max_connections,
            header_timeout: l.header_timeout,
            idle_timeout: l.idle_timeout,
            h2_max_streams: l.h2_max_streams,
        }
    }

    pub fn admin(l: &Listen) -> ConnLimits {
        ConnLimits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..ConnLimits::data(l)
        }
    }

    /// The defaults of `listen`, for servers that have no config (the simulated CRM).
    pub fn standard() -> ConnLimits {
        ConnLimits {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            h2_max_streams: 100,
        }
    }

    /// Lowers `max_connections` to what `descriptors` (the process's limit) leaves after
    /// `reserved` for everything else; the new cap, or `None` when it already fit.
    pub fn fit(&mut self, descriptors: u64, reserved: u64) -> Option<usize> {
        let room = usize::try_from(descriptors.saturating_sub(reserved)).unwrap_or(usize::MAX);
        (self.max_connections > room).then(|| {
            self.max_connections = room.max(1);
            self.max_connections
        })
    }
}

/// One listener's counters, read at each scrape.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub open: AtomicUsize,
    /// Connections accepted and closed at once because `max_connections` were open.
    pub over_cap: AtomicU64,
    /// Closed for not sending a complete request head in time.
    pub header_timeouts: AtomicU64,
    /// Closed after `idle_timeout` without a request.
    pub idle_closed: AtomicU64,
    /// `accept` failures (out of file descriptors and the like).
    pub accept_errors: AtomicU64,
    failing_since: Mutex<Option<Instant>>,
}

impl ListenerStats {
    /// How long `accept` has been failing without a success in between.
    pub fn accept_failing_for(&self, now: Instant) -> Option<Duration> {
        let since = *self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        since.map(|t| now.saturating_duration_since(t))
    }

    fn accept_result(&self, ok: bool) {
        let mut since = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        match (ok, *since) {
            (true, Some(_)) => *since = None,
            (false, None) => *since = Some(Instant::now()),
            _ => {}
        }
    }
}

/// One connection's requests in service and the times its deadlines count from.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    active: AtomicUsize,
    served: AtomicBool,
    /// Milliseconds after `base` when the last request in service ended (0: accepted).
    idle_since: AtomicU64,
    /// Milliseconds after `base` (plus one) when a new head began to arrive; 0: none.
    head_since: AtomicU64,
    /// Decided by the first bytes: HTTP/2 frames between requests are not request heads.
    h2: AtomicBool,
    first_read: AtomicBool,
}

/// A request in service on its connection, until dropped.
pub struct InService(Arc<Activity>);

impl Drop for InService {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.millis(), Relaxed);
        a.active.fetch_sub(1, Relaxed);
    }
}

/// Why a connection was closed by the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Header,
    Idle,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            base: Instant::now(),
            active: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            first_read: AtomicBool::new(true),
        })
    }

    fn millis(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Marks a request in service (its head is complete) until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InService {
        self.active.fetch_add(1, Relaxed);
        self.served.store(true, Relaxed);
        self.head_since.store(0, Relaxed);
        InService(self.clone())
    }

    fn read(&self, bytes: &[u8]) {
        if self.first_read.swap(false, Relaxed) {
            self.h2.store(bytes.starts_with(b"PRI "), Relaxed);
        }
        if !self.h2.load(Relaxed)
            && self.active.load(Relaxed) == 0
            && self.head_since.load(Relaxed) == 0
        {
            self.head_since.store(self.millis() + 1, Relaxed);
        }
    }

    /// When the connection's current deadline passes (none while a request is in service), and
    /// what it would be closed for.
    fn deadline(&self, limits: &ConnLimits) -> Option<(Instant, Expired)> {
        if self.active.load(Relaxed) > 0 {
            return None;
        }
        if !self.served.load(Relaxed) {
            return Some((self.base + limits.header_timeout, Expired::Header));
        }
        let idle = (
            self.at(self.idle_since.load(Relaxed)) + limits.idle_timeout,
            Expired::Idle,
        );
        match self.head_since.load(Relaxed) {
            0 => Some(idle),
            ms => {
                let head = (self.at(ms - 1) + limits.header_timeout, Expired::Header);
                Some(if head.0 < idle.0 { head } else { idle })
            }
        }
    }
}

/// The client's socket, telling its connection's [`Activity`] what arrives.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
    /// Bytes already read (and seen) that are read again first: what the HTTP/1.1 loop had read
    /// of a connection it hands to HTTP/2.
    replay: Bytes,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.replay.is_empty() {
            let n = self.replay.len().min(buf.remaining());
            buf.put_slice(&self.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            self.activity.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The process's limit on open file descriptors, raised to its hard limit when `wanted` is
/// more than the soft one; the limit now in force.
pub fn raise_descriptor_limit(wanted: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given, which lives on this stack frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= wanted || lim.rlim_cur >= lim.rlim_max {
        return Ok(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Ok(lim.rlim_cur);
    }
    Ok(raised.rlim_cur)
}
