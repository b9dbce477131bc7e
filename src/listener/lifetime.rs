//! How long a client connection may stay: closed when its header or idle deadline passes
//! with no request in service, and closed gracefully (after the request in service) when the
//! listener stops.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Activity, ConnLimits, Expired, ListenerStats};

/// How long after a graceful close was asked a connection that has not closed is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Serves one connection until it ends, closing it when a deadline of `limits` passes with no
/// request in service, or (after its requests finish) when `closing` turns true; what it ended
/// with, or `None` when it failed or was dropped after a close it did not finish in time.
///
/// The connection is not woken for each request to move its timer. Every deadline lies at
/// least `step` (the shorter timeout) after the change that set it: a request ending starts the
/// idle timeout, a head beginning the header timeout. So a timer never set later than `step`
/// from now fires before any deadline a later change can bring; when it fires early it is set
/// again, to the deadline in force or `step` on.
///
/// Nor are the timer and the close polled at each of the connection's wake-ups (two a request):
/// once registered, each is polled again only when it may be ready, the timer when it has fired
/// and the close when its value has moved (two loads, where a poll of each cost some 600
/// instructions a request).
pub(super) async fn watch_connection<C, T, E>(
    mut conn: Pin<&mut C>,
    close_gracefully: impl Fn(Pin<&mut C>),
    activity: &Activity,
    limits: &ConnLimits,
    stats: &ListenerStats,
    mut closing: watch::Receiver<bool>,
    peer: SocketAddr,
) -> Option<T>
where
    C: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let step = limits.header_timeout.min(limits.idle_timeout);
    let next_check = |now: Instant| match activity.deadline(limits) {
        Some((at, _)) => at.min(now + step),
        None => now + step,
    };
    let timer = tokio::time::sleep_until(next_check(Instant::now()));
    tokio::pin!(timer);
    // Only looked at, never marked seen: whether the close's value moved since the start.
    let moved = closing.clone();
    let asked = closing.wait_for(|c| *c);
    tokio::pin!(asked);
    // Each needs a poll to register (and the close may already be asked).
    let (mut timer_set, mut close_unpolled) = (true, true);
    let mut stopping = false;
    // Set once a close was asked: past it the connection is dropped.
    let mut give_up = false;
    loop {
        let woke = poll_fn(|cx| {
            if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
                return Poll::Ready(Woke::Ended(ended));
            }
            if !stopping && (close_unpolled || moved.has_changed().unwrap_or(true)) {
                close_unpolled = false;
                if asked.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::Closing);
                }
            }
            if timer_set || timer.is_elapsed() {
                timer_set = false;
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::Timer);
                }
            }
            Poll::Pending
        })
        .await;
        match woke {
            Woke::Ended(Ok(ended)) => return Some(ended),
            Woke::Ended(Err(e)) => {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
                return None;
            }
            Woke::Closing => {
                stopping = true;
                close_gracefully(conn.as_mut());
            }
            Woke::Timer => {
                if give_up {
                    return None;
                }
                let now = Instant::now();
                match activity.deadline(limits) {
                    Some((at, why)) if now >= at => {
                        match why {
                            Expired::Header => stats.header_timeouts.fetch_add(1, Relaxed),
                            Expired::Idle => stats.idle_closed.fetch_add(1, Relaxed),
                        };
                        tracing::debug!(%peer, reason = ?why, "closing a connection");
                        close_gracefully(conn.as_mut());
                        give_up = true;
                        timer.as_mut().reset(now + CLOSE_WAIT);
                    }
                    _ => timer.as_mut().reset(next_check(now)),
                }
                timer_set = true;
            }
        }
    }
}

/// What woke [`watch_connection`].
enum Woke<T> {
    Ended(T),
    Closing,
    Timer,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use tokio::sync::{Notify, mpsc};

    use super::*;

    /// A connection that counts its wake-ups (messages on `rx`) and ends, with the count, once
    /// a close was asked.
    async fn counting(
        mut rx: mpsc::UnboundedReceiver<()>,
        asked: &AtomicBool,
        told: &Notify,
    ) -> Result<u32, String> {
        let mut woken = 0;
        loop {
            tokio::select! {
                Some(()) = rx.recv() => woken += 1,
                () = told.notified() => {}
            }
            if asked.load(Relaxed) {
                return Ok(woken);
            }
        }
    }

    fn watched() -> (Arc<Activity>, ConnLimits, ListenerStats, SocketAddr) {
        let limits = ConnLimits::standard();
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        (Activity::new(), limits, ListenerStats::default(), peer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_asked_after_many_wake_ups_is_seen_and_the_connection_ends() {
        let (activity, limits, stats, peer) = watched();
        let _in_service = activity.begin();
        let (tx, rx) = mpsc::unbounded_channel();
        let (closing_tx, closing) = watch::channel(false);
        let (asked, told) = (AtomicBool::new(false), Notify::new());
        let conn = counting(rx, &asked, &told);
        tokio::pin!(conn);
        let close = |_: Pin<&mut _>| {
            asked.store(true, Relaxed);
            told.notify_one();
        };
        let watching = watch_connection(conn, close, &activity, &limits, &stats, closing, peer);
        let feeding = async {
            for _ in 0..100 {
                tx.send(()).unwrap();
                tokio::task::yield_now().await;
            }
            closing_tx.send(true).unwrap();
        };
        let both = async { tokio::join!(watching, feeding) };
        let (ended, ()) = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("the close was not seen");
        assert_eq!(ended, Some(100), "every wake-up served, then the close");
        assert_eq!(stats.header_timeouts.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_at_its_header_timeout_then_dropped() {
        let (activity, limits, stats, peer) = watched();
        let (_closing_tx, closing) = watch::channel(false);
        let asked = AtomicBool::new(false);
        let conn = std::future::pending::<Result<(), String>>();
        tokio::pin!(conn);
        let start = Instant::now();
        let close = |_: Pin<&mut _>| asked.store(true, Relaxed);
        let watching = watch_connection(conn, close, &activity, &limits, &stats, closing, peer);
        let ended = tokio::time::timeout(limits.header_timeout * 3, watching)
            .await
            .expect("the deadline was not seen");
        assert_eq!(ended, None, "not closed in time: dropped");
        assert!(asked.load(Relaxed));
        assert_eq!(stats.header_timeouts.load(Relaxed), 1);
        let took = start.elapsed();
        let want = limits.header_timeout + CLOSE_WAIT;
        assert!(
            want <= took && took < want + Duration::from_millis(10),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_woken_often_is_closed_at_its_idle_timeout() {
        let (activity, limits, stats, peer) = watched();
        drop(activity.begin());
        let (tx, rx) = mpsc::unbounded_channel();
        let (_closing_tx, closing) = watch::channel(false);
        let (asked, told) = (AtomicBool::new(false), Notify::new());
        let conn = counting(rx, &asked, &told);
        tokio::pin!(conn);
        let start = Instant::now();
        let close = |_: Pin<&mut _>| {
            asked.store(true, Relaxed);
            told.notify_one();
        };
        let watching = watch_connection(conn, close, &activity, &limits, &stats, closing, peer);
        // Woken every 300 ms (no request: the activity does not move) until it ends.
        let feeding = async {
            while tx.send(()).is_ok() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        };
        let ended = tokio::select! {
            ended = watching => ended,
            () = feeding => unreachable!("the feed goes on while the connection is open"),
            () = tokio::time::sleep(limits.idle_timeout * 2) => panic!("not closed when idle"),
        };
        assert_eq!(stats.idle_closed.load(Relaxed), 1);
        let took = start.elapsed();
        assert!(ended.is_some_and(|woken| woken >= 190), "{ended:?}");
        let want = limits.idle_timeout;
        assert!(
            want <= took && took < want + Duration::from_millis(10),
            "{took:?}"
        );
    }
}
