//! Optional smoothing of calls to the CRM inside a window: governor's GCRA, fed the ledger's clock.

use std::num::NonZeroU32;
use std::ops::Add;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::clock::Time;
use crate::config::Pace;

/// A governor instant on the ledger's time line (nanoseconds since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PaceInstant(u64);

impl Add<Nanos> for PaceInstant {
    type Output = PaceInstant;
    fn add(self, d: Nanos) -> PaceInstant {
        PaceInstant(self.0.saturating_add(d.as_u64()))
    }
}

impl Reference for PaceInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        Nanos::from(self.0.saturating_sub(earlier.0))
    }

    fn saturating_sub(&self, d: Nanos) -> Self {
        PaceInstant(self.0.saturating_sub(d.as_u64()))
    }
}

/// A governor clock that reads the instant the ledger is deciding at, so a pacing decision uses
/// exactly the same `now` as the window decisions taken with it under the ledger lock.
#[derive(Clone, Default)]
struct DecisionClock(Arc<AtomicU64>);

impl Clock for DecisionClock {
    type Instant = PaceInstant;
    fn now(&self) -> PaceInstant {
        PaceInstant(self.0.load(Ordering::Relaxed))
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, DecisionClock, NoOpMiddleware<PaceInstant>>;

pub struct Pacer {
    pace: Pace,
    clock: DecisionClock,
    limiter: Limiter,
}

impl Pacer {
    pub fn new(pace: Pace, now: Time) -> Pacer {
        let period = Duration::from_secs_f64(1.0 / pace.per_second).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(pace.burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(burst);
        let clock = DecisionClock::default();
        clock.0.store(now.as_nanos(), Ordering::Relaxed);
        Pacer {
            pace,
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
        }
    }

    /// The pace it keeps.
    pub fn pace(&self) -> Pace {
        self.pace
    }

    /// Takes one cell at `now`, or tells when one will be available.
    pub fn check(&self, now: Time) -> Result<(), Time> {
        self.clock.0.store(now.as_nanos(), Ordering::Relaxed);
        self.limiter
            .check()
            .map_err(|not_until| Time::from_nanos(not_until.earliest_possible().0))
    }
}
