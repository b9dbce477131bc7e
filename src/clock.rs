//! Time for every quota decision and timer: a `Clock` trait, the tokio-backed system clock and a manual clock for tests.

use std::fmt;
use std::future::Future;
use std::ops::{Add, Sub};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// A point in time: nanoseconds since the Unix epoch, as told by a [`Clock`].
///
/// Clocks here are monotonic: a later reading is never smaller than an earlier one, so windows
/// computed from these values never run backwards when the wall clock is stepped.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(u64);

impl Time {
    pub const ZERO: Time = Time(0);
    pub const MAX: Time = Time(u64::MAX);

    pub const fn from_nanos(nanos: u64) -> Time {
        Time(nanos)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn from_unix_duration(d: Duration) -> Time {
        Time(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    pub fn saturating_sub(self, d: Duration) -> Time {
        Time(self.0.saturating_sub(duration_nanos(d)))
    }

    /// The same instant as a `jiff` timestamp, for calendar arithmetic (daily resets, JSON).
    pub fn to_timestamp(self) -> jiff::Timestamp {
        jiff::Timestamp::from_nanosecond(i128::from(self.0)).unwrap_or(jiff::Timestamp::MAX)
    }

    pub fn from_timestamp(ts: jiff::Timestamp) -> Time {
        Time(u64::try_from(ts.as_nanosecond().max(0)).unwrap_or(u64::MAX))
    }

    /// Seconds from `now` until `self`, rounded up, at least `min`: what a `Retry-After` carries.
    pub fn seconds_after(self, now: Time, min: u64) -> u64 {
        let nanos = self.0.saturating_sub(now.0);
        nanos.div_ceil(1_000_000_000).max(min)
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(duration_nanos(d)))
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    fn sub(self, d: Duration) -> Time {
        self.saturating_sub(d)
    }
}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_timestamp())
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_timestamp())
    }
}

/// Nanoseconds in a duration, saturating at `u64::MAX` (about 584 years).
pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A future that completes at a point in a clock's time.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The source of time for the ledger, the queue and the dispatcher.
pub trait Clock: Send + Sync + 'static {
    /// The current time. Never smaller than an earlier reading.
    fn now(&self) -> Time;
    /// A future that completes once `now() >= deadline`.
    fn sleep_until(&self, deadline: Time) -> Sleep;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// Wall time anchored once at start, advanced by tokio's monotonic clock.
///
/// Because it reads `tokio::time::Instant`, tests running under `#[tokio::test(start_paused = true)]`
/// drive it with virtual time, and NTP steps of the wall clock never move a window backwards.
pub struct SystemClock {
    anchor_wall: Time,
    anchor_mono: tokio::time::Instant,
}

impl SystemClock {
    pub fn new() -> SystemClock {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        SystemClock {
            anchor_wall: Time::from_unix_duration(wall),
            anchor_mono: tokio::time::Instant::now(),
        }
    }

    /// A clock whose `now()` starts at `start` (useful with tokio's paused time).
    pub fn starting_at(start: Time) -> SystemClock {
        SystemClock {
            anchor_wall: start,
            anchor_mono: tokio::time::Instant::now(),
        }
    }

    pub fn shared() -> SharedClock {
        Arc::new(SystemClock::new())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Time {
        self.anchor_wall + self.anchor_mono.elapsed()
    }

    fn sleep_until(&self, deadline: Time) -> Sleep {
        let at = self.anchor_mono + deadline.saturating_since(self.anchor_wall);
        Box::pin(tokio::time::sleep_until(at))
    }
}

/// A clock that moves only when told to: unit tests walk a whole day in microseconds with it.
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<Time>>,
    tick: watch::Sender<Time>,
}

impl ManualClock {
    pub fn new(start: Time) -> ManualClock {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
            tick: watch::Sender::new(start),
        }
    }

    /// A manual clock starting at an RFC 3339 instant, e.g. `2026-03-08T00:00:00Z`.
    pub fn at(rfc3339: &str) -> ManualClock {
        let ts: jiff::Timestamp = rfc3339.parse().expect("valid RFC 3339 timestamp");
        ManualClock::new(Time::from_timestamp(ts))
    }

    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().expect("clock lock");
        *now = *now + d;
        self.tick.send_replace(*now);
    }

    /// Moves the clock to `t` (never backwards).
    pub fn set(&self, t: Time) {
        let mut now = self.now.lock().expect("clock lock");
        if t > *now {
            *now = t;
            self.tick.send_replace(t);
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Time {
        *self.now.lock().expect("clock lock")
    }

    fn sleep_until(&self, deadline: Time) -> Sleep {
        let mut rx = self.tick.subscribe();
        Box::pin(async move {
            // `wait_for` checks the current value first, so a deadline already passed returns at once.
            let _ = rx.wait_for(|now| *now >= deadline).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_after_rounds_up_with_a_floor() {
        let now = Time::from_nanos(10_000_000_000);
        assert_eq!((now + Duration::from_millis(1)).seconds_after(now, 1), 1);
        assert_eq!((now + Duration::from_millis(1500)).seconds_after(now, 1), 2);
        assert_eq!((now + Duration::from_secs(3)).seconds_after(now, 1), 3);
        assert_eq!(now.seconds_after(now, 1), 1);
        assert_eq!(now.seconds_after(now, 0), 0);
    }

    #[tokio::test]
    async fn manual_clock_sleep_wakes_when_advanced_past_deadline() {
        let clock = ManualClock::at("2026-01-01T00:00:00Z");
        let deadline = clock.now() + Duration::from_secs(5);
        let sleep = clock.sleep_until(deadline);
        let waiter = tokio::spawn(sleep);
        clock.advance(Duration::from_secs(4));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        clock.advance(Duration::from_secs(1));
        waiter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn system_clock_follows_paused_tokio_time() {
        let clock = SystemClock::starting_at(Time::from_nanos(1_000));
        let t0 = clock.now();
        clock.sleep_until(t0 + Duration::from_secs(60)).await;
        assert_eq!(clock.now().saturating_since(t0), Duration::from_secs(60));
    }
}
