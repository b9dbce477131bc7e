//! Accepting connections and serving each on a thread. With data threads, the first of them
//! accepts (one listening socket, not `SO_REUSEPORT`: a second process cannot join the port
//! unnoticed) and serves a new connection itself, its first request read with no hand-over
//! between threads, unless it already serves more than [`SLACK`] connections more than the
//! least busy thread, which then takes it: a burst of connections is spread over the threads.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;

use super::lifetime::watch_connection;
use super::{Activity, ConnLimits, ListenerStats, RequestBody, Watched, http1};
use crate::frames;
use crate::message::strip_hop_by_hop;
use crate::response::{Body, fields_into_head};

/// A repeated accept failure or refusal is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How many connections more than the least busy data thread the accepting one may serve
/// before it hands a new connection over.
const SLACK: usize = 1;

/// Accepts connections until `stop` completes, then closes the listener, asks every open
/// connection to finish its requests and close, and waits up to `grace` for them. With
/// `runtimes` (the data threads), the first accepts and they serve; with none, a task on the
/// calling runtime accepts and the connections are served there.
pub async fn accept_loop<F, S>(
    listener: TcpListener,
    limits: ConnLimits,
    stats: Arc<ListenerStats>,
    make_service: F,
    stop: impl Future<Output = ()>,
    grace: Duration,
    runtimes: &[Handle],
) where
    F: Fn(SocketAddr, Arc<Activity>) -> S + Send + Sync + 'static,
    S: Serves,
{
    // HTTP/1.1 is served by `http1`; a connection opening with HTTP/2's preface goes to hyper.
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_streams)
        .keep_alive_interval(Some(limits.idle_timeout.min(Duration::from_secs(30))))
        .keep_alive_timeout(limits.header_timeout);
    let (closing_tx, closing) = watch::channel(false);
    let (stop_accepting, accepting) = watch::channel(false);
    let (done_tx, mut done) = mpsc::channel::<()>(1);
    let shared = Arc::new(Accepting {
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        stats,
        make_service,
        h2,
        closing,
        _done: done_tx,
        runtimes: runtimes.to_vec(),
        open: runtimes.iter().map(|_| AtomicUsize::new(0)).collect(),
    });
    // The first data thread accepts (it alone is woken for a new connection); with none, a
    // task on this runtime does.
    let (listener, home, runtime) = match runtimes.first() {
        None => (listener, None, Handle::current()),
        Some(first) => match registered_on(first, &listener) {
            Ok(moved) => {
                // Off this runtime's driver, which would be woken for every connection.
                drop(listener);
                (moved, Some(0), first.clone())
            }
            Err(e) => {
                tracing::error!(error = %e, "the data listener cannot move to the first data thread; connections are accepted on the shared runtime and handed to the data threads");
                (listener, None, Handle::current())
            }
        },
    };
    let (task_shared, task_accepting) = (shared.clone(), accepting.clone());
    let task = runtime.spawn(async move {
        accept_on(listener, home, &task_shared, task_accepting).await;
    });
    drop((shared, accepting));
    stop.await;
    let _ = stop_accepting.send(true);
    // The task drops the listener as it ends (or as its runtime stops): the port is closed.
    let _ = task.await;
    let _ = closing_tx.send(true);
    if tokio::time::timeout(grace, done.recv()).await.is_err() {
        tracing::warn!("grace period over; closing connections still open");
    }
}

/// The listening socket registered with `runtime`'s driver (a second descriptor of it: the
/// first closes as `listener` is dropped).
fn registered_on(runtime: &Handle, listener: &TcpListener) -> std::io::Result<TcpListener> {
    let copy = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    let _in = runtime.enter();
    TcpListener::from_std(copy)
}

/// What serves a connection's requests (made for each connection by the listener's owner).
pub trait Serves:
    hyper::service::Service<
        Request<RequestBody>,
        Response = Response<Body>,
        Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        Future: Send + 'static,
    > + Send
    + Sync
    + 'static
{
}

impl<T> Serves for T where
    T: hyper::service::Service<
            Request<RequestBody>,
            Response = Response<Body>,
            Error: Into<Box<dyn std::error::Error + Send + Sync>>,
            Future: Send + 'static,
        > + Send
        + Sync
        + 'static
{
}

/// What the accepting task and every connection share.
struct Accepting<F> {
    limits: ConnLimits,
    stats: Arc<ListenerStats>,
    make_service: F,
    slots: Arc<Semaphore>,
    h2: http2::Builder<TokioExecutor>,
    closing: watch::Receiver<bool>,
    /// Dropped with the last holder of this (every open connection and accepting task holds
    /// it): the stop waits for that.
    _done: mpsc::Sender<()>,
    runtimes: Vec<Handle>,
    /// Connections open on each data thread.
    open: Box<[AtomicUsize]>,
}

/// The data thread a new connection is served on: `home` (the accepting one) unless it serves
/// more than [`SLACK`] connections more than the least busy, which then takes it; `None` when
/// there are no data threads. Counts it as open there.
fn pick(open: &[AtomicUsize], home: Option<usize>) -> Option<usize> {
    let (least, fewest) = open
        .iter()
        .map(|n| n.load(Relaxed))
        .enumerate()
        .min_by_key(|&(_, n)| n)?;
    let chosen = match home {
        Some(h) if open[h].load(Relaxed) <= fewest + SLACK => h,
        _ => least,
    };
    open[chosen].fetch_add(1, Relaxed);
    Some(chosen)
}

/// One connection counted as open on its data thread, until dropped.
struct OpenOn<'a>(&'a [AtomicUsize], usize);

impl Drop for OpenOn<'_> {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Relaxed);
    }
}

/// Logs a repeated event at most every [`LOG_EVERY`], with how many were not logged.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttled {
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now < t + LOG_EVERY) {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Accepts on `listener` (on the data thread `home`, or with none on the shared runtime) until
/// `stop` turns true, serving each connection on the thread [`pick`] gives.
async fn accept_on<F, S>(
    listener: TcpListener,
    home: Option<usize>,
    a: &Arc<Accepting<F>>,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(SocketAddr, Arc<Activity>) -> S + Send + Sync + 'static,
    S: Serves,
{
    let (mut refused_log, mut failed_log) = (Throttled::default(), Throttled::default());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                a.stats.accept_errors.fetch_add(1, Relaxed);
                a.stats.accept_result(false);
                if let Some(unlogged) = failed_log.due() {
                    tracing::warn!(error = %e, repeated = unlogged, "accepting a connection failed; retrying in 100ms (out of file descriptors? see listen.max_connections)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        a.stats.accept_result(true);
        let Ok(slot) = a.slots.clone().try_acquire_owned() else {
            a.stats.over_cap.fetch_add(1, Relaxed);
            if let Some(unlogged) = refused_log.due() {
                tracing::warn!(
                    max_connections = a.limits.max_connections,
                    repeated = unlogged,
                    "connection refused: max_connections are open"
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let service = (a.make_service)(peer, activity.clone());
        match pick(&a.open, home) {
            Some(on) if Some(on) != home => hand_over(stream, peer, service, activity, a, slot, on),
            on => {
                tokio::spawn(serve(stream, peer, service, activity, a.clone(), slot, on));
            }
        }
    }
}

/// Serves a connection on another data thread than the accepting one: the socket moves to
/// it, registered with its driver there.
fn hand_over<F, S>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    activity: Arc<Activity>,
    a: &Arc<Accepting<F>>,
    slot: OwnedSemaphorePermit,
    on: usize,
) where
    F: Send + Sync + 'static,
    S: Serves,
{
    let a = a.clone();
    match stream.into_std() {
        Ok(stream) => {
            let runtime = a.runtimes[on].clone();
            runtime.spawn(async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve(stream, peer, service, activity, a, slot, Some(on)).await,
                    Err(e) => {
                        let _open = OpenOn(&a.open, on);
                        tracing::warn!(error = %e, %peer, "cannot serve an accepted connection on its thread; closed");
                    }
                }
            });
        }
        Err(e) => {
            let _open = OpenOn(&a.open, on);
            tracing::warn!(error = %e, %peer, "cannot hand an accepted connection to a data thread; closed");
        }
    }
}

/// Serves one connection: HTTP/1.1 by the proxy's own loop, or HTTP/2 by hyper when it opens
/// with HTTP/2's preface; closed when its deadlines pass or, between requests, when the
/// listener stops.
async fn serve<F, S>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    activity: Arc<Activity>,
    a: Arc<Accepting<F>>,
    slot: OwnedSemaphorePermit,
    on: Option<usize>,
) where
    F: Send + Sync + 'static,
    S: Serves,
{
    let _open = on.map(|i| OpenOn(&a.open, i));
    let (limits, stats) = (&a.limits, &a.stats);
    let io = Watched {
        io: stream,
        activity: activity.clone(),
        replay: Bytes::new(),
    };
    stats.open.fetch_add(1, Relaxed);
    // HTTP/1.1 is served by the proxy's own loop; a close asked of it is taken between requests.
    let ended = {
        let shut = AtomicBool::new(false);
        let conn = http1::serve(http1::Conn::new(io), &service, &shut);
        tokio::pin!(conn);
        let close = |_: Pin<&mut _>| shut.store(true, Relaxed);
        watch_connection(
            conn,
            close,
            &activity,
            limits,
            stats,
            a.closing.clone(),
            peer,
        )
        .await
    };
    if let Some(http1::Ended::Http2(mut io, read)) = ended {
        io.replay = read;
        // Boxed: hyper's connection is large; inside this future it would make every HTTP/1.1
        // connection's task larger, and this poll's stack frame deeper.
        frames::boxed(|| serve_http2(io, service, &activity, &a, peer)).await;
    }
    stats.open.fetch_sub(1, Relaxed);
    drop(slot);
}

/// Serves a connection that opened with HTTP/2's preface, by hyper.
async fn serve_http2<F, S>(
    io: Watched,
    service: S,
    activity: &Activity,
    a: &Accepting<F>,
    peer: SocketAddr,
) where
    F: Send + Sync + 'static,
    S: Serves,
{
    // As from the HTTP/1.1 reader: no field that ends at this hop. And as to the HTTP/1.1
    // writer: hyper writes the map's fields only, so those a body carries go into the map.
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        strip_hop_by_hop(req.headers_mut());
        let call = service.call(req.map(RequestBody::http2));
        async move {
            let mut resp = call.await?;
            fields_into_head(&mut resp);
            Ok::<_, S::Error>(resp)
        }
    });
    let conn = a.h2.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let close = |c: Pin<&mut _>| http2::Connection::graceful_shutdown(c);
    watch_connection(
        conn,
        close,
        activity,
        &a.limits,
        &a.stats,
        a.closing.clone(),
        peer,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::{AtomicUsize, Relaxed, pick};

    fn counts(open: &[AtomicUsize]) -> Vec<usize> {
        open.iter().map(|n| n.load(Relaxed)).collect()
    }

    #[test]
    fn a_connection_stays_on_the_thread_that_accepted_it_unless_that_one_is_busier() {
        let open: Vec<AtomicUsize> = [0, 0, 0].into_iter().map(AtomicUsize::new).collect();
        // Within the slack of the least busy, the accepting thread keeps what it accepts.
        assert_eq!(pick(&open, Some(1)), Some(1));
        assert_eq!(pick(&open, Some(1)), Some(1));
        assert_eq!(counts(&open), [0, 2, 0]);
        // Two more than the least busy: the next goes to the least busy (the first of them).
        assert_eq!(pick(&open, Some(1)), Some(0));
        assert_eq!(pick(&open, Some(1)), Some(2));
        assert_eq!(counts(&open), [1, 2, 1]);
        // A burst of connections all accepted by one thread ends up spread evenly.
        for _ in 0..96 {
            pick(&open, Some(1)).unwrap();
        }
        let spread = counts(&open);
        assert_eq!(spread.iter().sum::<usize>(), 100);
        assert!(
            spread.iter().max().unwrap() - spread.iter().min().unwrap() <= 1,
            "{spread:?}"
        );
        // Accepted off the data threads (a fallback): always the least busy.
        let least = spread.iter().position(|&n| n == 33);
        assert_eq!(pick(&open, None), least);
        // No data threads: served where accepted.
        assert_eq!(pick(&[], Some(0)), None);
        assert_eq!(pick(&[], None), None);
    }
}
