//! The circuit breaker of the drain: when calls to the CRM keep failing as a whole (nothing
//! sent, a gateway status, no answer), parked writes stop going out one after another to fail;
//! one probe goes per probe interval, spaced out with backoff (at most a second apart, so the
//! drain resumes within a second of the CRM answering again), and the writes waiting spend no
//! attempt. Any answer of the CRM's own (a success, a 4xx) closes it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

use crate::clock::Time;

/// Failures in a row (no answer of the CRM's own between them) that open the breaker, or fewer
/// when a write may have fewer attempts (so none runs out of them before it opens).
pub const OPEN_AFTER: u32 = 3;
/// The first wait between probes; doubled after each failed one.
pub const FIRST_PROBE: Duration = Duration::from_millis(100);
/// The longest wait between probes.
pub const MAX_PROBE: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct State {
    failures: u32,
    /// Set while open: since when, when the next probe may go, and the wait after it.
    open: Option<Open>,
    /// The last outage, from its opening to the answer that closed it.
    last: Option<(Time, Time)>,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    since: Time,
    next_probe: Time,
    wait: Duration,
}

/// What `/status` shows of the breaker.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerView {
    pub open: bool,
    pub failures_in_a_row: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_probe_at: Option<String>,
}

/// What a send the breaker lets go is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Closed: an ordinary send.
    No,
    /// Open: the one probe of this interval.
    Yes,
}

#[derive(Debug, Default)]
pub struct Breaker {
    state: Mutex<State>,
    /// Whether a failure was counted since the last answer (or it is open): an answer, which
    /// closes it, takes the lock only then, not on every call (both data threads make them).
    troubled: AtomicBool,
    /// Woken when it closes (the drain goes on at once).
    closed: Notify,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A call sent at `sent_at` failed as the CRM's whole failure would; `max_attempts` is a
    /// write's allowance. Returns, when the breaker is (now) open, the time the write that
    /// failed should wait for: the next probe. A call sent during the outage that has just ended
    /// (a probe that hung until its timeout while the CRM came back) is that outage's, not a
    /// new failure: its write may go again at once, and spends no attempt.
    pub fn failed(&self, sent_at: Time, now: Time, max_attempts: u32) -> Option<Time> {
        let mut s = self.lock();
        if s.open.is_none()
            && s.last
                .is_some_and(|(since, closed)| since <= sent_at && sent_at < closed)
        {
            return Some(now);
        }
        s.failures = s.failures.saturating_add(1);
        self.troubled.store(true, Ordering::Release);
        let failures = s.failures;
        match &mut s.open {
            Some(o) => {
                o.wait = (o.wait * 2).min(MAX_PROBE);
                o.next_probe = o.next_probe.max(now + o.wait);
                Some(o.next_probe)
            }
            None if failures >= OPEN_AFTER.min(max_attempts.max(1)) => {
                let next_probe = now + FIRST_PROBE;
                s.open = Some(Open {
                    since: now,
                    next_probe,
                    wait: FIRST_PROBE,
                });
                tracing::warn!(
                    failures,
                    "the CRM keeps failing: the drain pauses and probes it with one write at a time"
                );
                Some(next_probe)
            }
            None => None,
        }
    }

    /// The CRM answered with an answer of its own: the breaker closes.
    pub fn answered(&self, now: Time) {
        // An answer that races a failure counted on another thread is as if it came first.
        if !self.troubled.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        s.failures = 0;
        self.troubled.store(false, Ordering::Release);
        if let Some(o) = s.open.take() {
            s.last = Some((o.since, now));
            tracing::info!(
                outage_seconds = now.saturating_since(o.since).as_secs_f64(),
                "the CRM answers again: the drain resumes"
            );
            drop(s);
            self.closed.notify_waiters();
        }
    }

    /// Whether a parked write may go now: always while closed; while open, one probe per
    /// interval once its time has come (`Err` says when to ask again). A probe whose call never
    /// comes back holds nothing: the next goes an interval later.
    pub fn may_send(&self, now: Time) -> Result<Probe, Time> {
        let mut s = self.lock();
        match &mut s.open {
            None => Ok(Probe::No),
            Some(o) if now >= o.next_probe => {
                o.next_probe = now + o.wait;
                Ok(Probe::Yes)
            }
            Some(o) => Err(o.next_probe),
        }
    }

    /// The probe just let go was not sent after all (nothing was ready): the next may go at once.
    pub fn probe_not_sent(&self, now: Time) {
        if let Some(o) = &mut self.lock().open {
            o.next_probe = o.next_probe.min(now);
        }
    }

    /// Completes when the breaker closes.
    pub async fn closed(&self) {
        self.closed.notified().await
    }

    pub fn view(&self) -> BreakerView {
        let s = self.lock();
        BreakerView {
            open: s.open.is_some(),
            failures_in_a_row: s.failures,
            open_since: s.open.map(|o| o.since.to_string()),
            next_probe_at: s.open.map(|o| o.next_probe.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Time {
        Time::from_nanos(1_700_000_000_000_000_000 + ms * 1_000_000)
    }

    #[test]
    fn it_opens_after_failures_in_a_row_and_probes_one_at_a_time_with_backoff() {
        let b = Breaker::default();
        assert_eq!(b.failed(at(0), at(0), 5), None);
        assert_eq!(b.failed(at(1), at(1), 5), None);
        b.answered(at(2));
        assert_eq!(
            b.failed(at(3), at(3), 5),
            None,
            "an answer in between starts over"
        );
        assert_eq!(b.failed(at(4), at(4), 5), None);
        assert_eq!(
            b.failed(at(5), at(5), 5),
            Some(at(105)),
            "open: the next probe"
        );
        assert!(b.view().open);
        assert_eq!(b.may_send(at(50)), Err(at(105)));
        assert_eq!(b.may_send(at(105)), Ok(Probe::Yes), "the probe");
        assert_eq!(b.may_send(at(106)), Err(at(205)), "one probe per interval");
        b.probe_not_sent(at(107));
        assert_eq!(
            b.may_send(at(107)),
            Ok(Probe::Yes),
            "an unused probe is given back"
        );
        // Probes that fail space out: 200 ms, 400, 800, then at most a second.
        let mut now = 110;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let next = b.failed(at(now), at(now), 5).unwrap();
            waits.push((next.as_nanos() - at(now).as_nanos()) / 1_000_000);
            now = (next.as_nanos() - at(0).as_nanos()) / 1_000_000;
            assert_eq!(b.may_send(at(now)), Ok(Probe::Yes));
        }
        assert_eq!(waits, vec![200, 400, 800, 1000, 1000, 1000]);
        // A write with fewer attempts than that opens it sooner.
        let short = Breaker::default();
        assert_eq!(short.failed(at(0), at(0), 2), None);
        assert!(short.failed(at(1), at(1), 2).is_some());
        // The CRM answers: closed, everything may go.
        b.answered(at(now + 5));
        assert!(!b.view().open);
        assert_eq!(b.may_send(at(now + 5)), Ok(Probe::No));
        assert_eq!(b.may_send(at(now + 5)), Ok(Probe::No));
        // A probe sent during that outage fails after it ended: the outage's, not a new one.
        assert_eq!(b.failed(at(now), at(now + 2_500), 5), Some(at(now + 2_500)));
        assert_eq!(b.view().failures_in_a_row, 0);
        // A call sent after it ended counts.
        assert_eq!(b.failed(at(now + 6), at(now + 2_506), 5), None);
        assert_eq!(b.view().failures_in_a_row, 1);
    }
}
