//! Window kinds: an exact sliding log, a conservative bucketed sliding counter for very large
//! limits, and fixed windows aligned to the clock or to a daily reset in a time zone.

use std::collections::VecDeque;
use std::time::Duration;

use crate::clock::{Time, duration_nanos};
use crate::config::{DailyReset, QuotaConfig, WindowKind};

/// Above this limit a sliding window keeps counts per sub-window instead of one timestamp per grant.
pub const EXACT_SLIDING_MAX_LIMIT: u32 = 65_536;

/// Sub-windows of a bucketed sliding window: its conservatism is at most `window / BUCKETS`.
pub const BUCKETS: u64 = 1_440;

/// The grants a window counts now, as another ledger can take them in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shadow {
    /// Each grant's time (an exact sliding window).
    Times(Vec<Time>),
    /// `count` grants in the fixed window `[start, end)`.
    Count { start: Time, end: Time, count: u32 },
    /// Counts per sub-window of `width` nanoseconds (a bucketed sliding window): `(index, count)`.
    Buckets { width: u64, counts: Vec<(u64, u32)> },
}

/// The admission state of one quota's window.
#[derive(Debug)]
pub enum Window {
    Log(SlidingLog),
    Buckets(SlidingBuckets),
    Fixed(FixedWindow),
}

impl Window {
    pub fn new(q: &QuotaConfig) -> Window {
        match &q.kind {
            WindowKind::Sliding if q.limit <= EXACT_SLIDING_MAX_LIMIT => {
                Window::Log(SlidingLog::new(q.limit, q.window + q.margin))
            }
            WindowKind::Sliding => {
                Window::Buckets(SlidingBuckets::new(q.limit, q.window + q.margin, q.window))
            }
            WindowKind::Fixed { daily } => {
                Window::Fixed(FixedWindow::new(q.limit, q.window, q.margin, daily.clone()))
            }
        }
    }

    /// The fixed window `[start, end)` that contains `t` (`None` for a sliding window).
    pub fn fixed_bounds(&self, t: Time) -> Option<(Time, Time)> {
        match self {
            Window::Fixed(w) => Some(w.bounds(t)),
            _ => None,
        }
    }

    /// `None` if one more request fits now, else the earliest time one could.
    pub fn blocked_until(&mut self, now: Time) -> Option<Time> {
        match self {
            Window::Log(w) => w.blocked_until(now),
            Window::Buckets(w) => w.blocked_until(now),
            Window::Fixed(w) => w.blocked_until(now),
        }
    }

    /// Like `blocked_until`, but one more request fits only while fewer than `threshold`
    /// (at most the limit) are counted: the room a reserve leaves.
    pub fn blocked_below(&mut self, threshold: u32, now: Time) -> Option<Time> {
        match self {
            Window::Log(w) if (threshold as usize) < w.cap() => w.blocked_below(threshold, now),
            Window::Buckets(w) if u64::from(threshold) < w.limit => {
                w.prune(now);
                w.when_free(w.limit - u64::from(threshold) + 1)
                    .map(Time::from_nanos)
            }
            Window::Fixed(w) if threshold < w.limit => w.blocked_below(threshold, now),
            _ => self.blocked_until(now),
        }
    }

    /// Records one request at `now`. Call only after `blocked_until(now)` returned `None`.
    pub fn charge(&mut self, now: Time) {
        match self {
            Window::Log(w) => w.charge(now),
            Window::Buckets(w) => w.charge(now),
            Window::Fixed(w) => w.charge(now),
        }
    }

    /// Takes back a grant charged at `at` whose call never reached the CRM (its slot is free
    /// again); a grant the window no longer counts is left alone.
    pub fn refund(&mut self, at: Time, now: Time) {
        match self {
            Window::Log(w) => w.refund(at),
            Window::Buckets(w) => w.refund(at),
            Window::Fixed(w) => {
                w.roll(now);
                if (w.start..w.end).contains(&at.as_nanos()) {
                    w.count = w.count.saturating_sub(1);
                }
            }
        }
    }

    /// Requests counted against the window at `now`.
    pub fn used(&mut self, now: Time) -> u32 {
        match self {
            Window::Log(w) => w.used(now),
            Window::Buckets(w) => w.used(now),
            Window::Fixed(w) => w.used(now),
        }
    }

    /// When the count next goes down (sliding) or the window resets (fixed); `now` if nothing is counted.
    pub fn next_reset(&mut self, now: Time) -> Time {
        match self {
            Window::Log(w) => w.next_reset(now),
            Window::Buckets(w) => w.next_reset(now),
            Window::Fixed(w) => w.next_reset(now),
        }
    }

    /// How long a grant counts (sliding windows: the window plus its margin; fixed: the window).
    pub fn span(&self) -> Duration {
        Duration::from_nanos(match self {
            Window::Log(w) => w.span,
            Window::Buckets(w) => w.span,
            Window::Fixed(w) => w.window,
        })
    }

    /// The grants the window counts at `now`.
    pub fn shadow(&mut self, now: Time) -> Shadow {
        match self {
            Window::Log(w) => {
                let first = w.first_live(now);
                Shadow::Times((first..w.len).map(|i| Time::from_nanos(w.at(i))).collect())
            }
            Window::Buckets(w) => {
                w.prune(now);
                Shadow::Buckets {
                    width: w.width,
                    counts: w.buckets.iter().copied().collect(),
                }
            }
            Window::Fixed(w) => {
                w.roll(now);
                Shadow::Count {
                    start: Time::from_nanos(w.start),
                    end: Time::from_nanos(w.end),
                    count: w.count,
                }
            }
        }
    }

    /// Estimated time at which `n` more requests than fit now would fit, if nothing else is charged.
    pub fn time_for(&mut self, n: u64, now: Time) -> Time {
        match self {
            Window::Log(w) => w.time_for(n, now),
            Window::Buckets(w) => w.time_for(n, now),
            Window::Fixed(w) => w.time_for(n, now),
        }
    }
}

/// Exact sliding window: the times of the last `limit` grants in a ring. A request fits when the
/// oldest of them is at least `span` old, so no interval of length `span` ever holds more than `limit`.
#[derive(Debug)]
pub struct SlidingLog {
    span: u64,
    ring: Box<[u64]>,
    head: usize,
    len: usize,
}

impl SlidingLog {
    pub fn new(limit: u32, span: Duration) -> SlidingLog {
        SlidingLog {
            span: duration_nanos(span),
            ring: vec![0; limit as usize].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    fn cap(&self) -> usize {
        self.ring.len()
    }

    /// The i-th oldest recorded grant.
    fn at(&self, i: usize) -> u64 {
        self.ring[(self.head + i) % self.cap()]
    }

    fn blocked_below(&self, threshold: u32, now: Time) -> Option<Time> {
        let first = self.first_live(now);
        let used = self.len - first;
        if used < threshold as usize {
            return None;
        }
        // The count drops below the threshold when this many of the live grants have aged out.
        let i = first + (used - threshold as usize);
        Some(Time::from_nanos(self.at(i).saturating_add(self.span)))
    }

    fn blocked_until(&self, now: Time) -> Option<Time> {
        if self.len < self.cap() {
            return None;
        }
        let free_at = self.at(0).saturating_add(self.span);
        (now.as_nanos() < free_at).then_some(Time::from_nanos(free_at))
    }

    fn charge(&mut self, now: Time) {
        let cap = self.cap();
        if self.len < cap {
            self.ring[(self.head + self.len) % cap] = now.as_nanos();
            self.len += 1;
        } else {
            self.ring[self.head] = now.as_nanos();
            self.head = (self.head + 1) % cap;
        }
    }

    /// Removes the newest grant recorded at `at`, if it is still recorded.
    fn refund(&mut self, at: Time) {
        let Some(i) = (0..self.len).rev().find(|&i| self.at(i) == at.as_nanos()) else {
            return;
        };
        let cap = self.cap();
        for j in i..self.len - 1 {
            self.ring[(self.head + j) % cap] = self.ring[(self.head + j + 1) % cap];
        }
        self.len -= 1;
    }

    /// Index of the oldest grant still inside the window (grants are recorded in time order).
    fn first_live(&self, now: Time) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.at(mid).saturating_add(self.span) > now.as_nanos() {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    fn used(&self, now: Time) -> u32 {
        (self.len - self.first_live(now)) as u32
    }

    fn next_reset(&self, now: Time) -> Time {
        let i = self.first_live(now);
        if i == self.len {
            now
        } else {
            Time::from_nanos(self.at(i).saturating_add(self.span))
        }
    }

    fn time_for(&self, n: u64, now: Time) -> Time {
        let cap = self.cap() as u64;
        let free_now = cap - u64::from(self.used(now));
        if n < free_now {
            return now;
        }
        // The (n - free_now)-th live grant frees the needed slot; later ones wrap around windows.
        let k = n - free_now;
        let live = self.first_live(now) as u64;
        let idx = live + (k % cap);
        let rounds = k / cap;
        let base = if idx < self.len as u64 {
            self.at(idx as usize)
        } else {
            now.as_nanos()
        };
        Time::from_nanos(base.saturating_add(self.span.saturating_mul(rounds + 1)))
    }
}

/// Conservative sliding window for very large limits: counts per sub-window of `width`. A
/// sub-window's grants count until its *end* is `span` old, so the window acts at most one
/// sub-window longer than configured, never shorter.
#[derive(Debug)]
pub struct SlidingBuckets {
    limit: u64,
    span: u64,
    width: u64,
    buckets: VecDeque<(u64, u32)>,
    total: u64,
}

/// Takes one count out of `bucket` (dropping it when empty); whether it was there.
pub(super) fn uncount(buckets: &mut VecDeque<(u64, u32)>, bucket: u64) -> bool {
    let Some(pos) = buckets.iter().position(|&(x, _)| x == bucket) else {
        return false;
    };
    buckets[pos].1 -= 1;
    if buckets[pos].1 == 0 {
        buckets.remove(pos);
    }
    true
}

impl SlidingBuckets {
    pub fn new(limit: u32, span: Duration, window: Duration) -> SlidingBuckets {
        SlidingBuckets {
            limit: u64::from(limit),
            span: duration_nanos(span),
            width: (duration_nanos(window) / BUCKETS).max(1),
            buckets: VecDeque::new(),
            total: 0,
        }
    }

    fn expires(&self, bucket: u64) -> u64 {
        (bucket + 1)
            .saturating_mul(self.width)
            .saturating_add(self.span)
    }

    fn prune(&mut self, now: Time) {
        while let Some(&(b, n)) = self.buckets.front() {
            if self.expires(b) <= now.as_nanos() {
                self.total -= u64::from(n);
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    /// The time at which the count drops to `limit - need` or lower (when `need` slots are free).
    fn when_free(&self, need: u64) -> Option<u64> {
        let must_drop = (self.total + need).saturating_sub(self.limit);
        if must_drop == 0 {
            return None;
        }
        let mut dropped = 0u64;
        for &(b, n) in &self.buckets {
            dropped += u64::from(n);
            if dropped >= must_drop {
                return Some(self.expires(b));
            }
        }
        None
    }

    fn blocked_until(&mut self, now: Time) -> Option<Time> {
        self.prune(now);
        self.when_free(1).map(Time::from_nanos)
    }

    fn refund(&mut self, at: Time) {
        if uncount(&mut self.buckets, at.as_nanos() / self.width) {
            self.total -= 1;
        }
    }

    fn charge(&mut self, now: Time) {
        let b = now.as_nanos() / self.width;
        match self.buckets.back_mut() {
            Some((last, n)) if *last == b => *n += 1,
            _ => self.buckets.push_back((b, 1)),
        }
        self.total += 1;
    }

    fn used(&mut self, now: Time) -> u32 {
        self.prune(now);
        u32::try_from(self.total).unwrap_or(u32::MAX)
    }

    fn next_reset(&mut self, now: Time) -> Time {
        self.prune(now);
        self.buckets
            .front()
            .map_or(now, |&(b, _)| Time::from_nanos(self.expires(b)))
    }

    fn time_for(&mut self, n: u64, now: Time) -> Time {
        self.prune(now);
        let need = n + 1;
        if need > self.limit {
            // More than a whole window's worth: whole windows after the current backlog clears.
            let rounds = (need - 1) / self.limit;
            let rest = need - rounds * self.limit;
            let base = self.when_free(rest).unwrap_or(now.as_nanos());
            return Time::from_nanos(base.saturating_add(self.span.saturating_mul(rounds)));
        }
        self.when_free(need).map_or(now, Time::from_nanos)
    }
}

/// Fixed window: at most `limit` grants per window `[start, end)`; none in its last `margin`.
#[derive(Debug)]
pub struct FixedWindow {
    limit: u32,
    window: u64,
    margin: u64,
    daily: Option<DailyReset>,
    start: u64,
    end: u64,
    count: u32,
}

impl FixedWindow {
    pub fn new(
        limit: u32,
        window: Duration,
        margin: Duration,
        daily: Option<DailyReset>,
    ) -> FixedWindow {
        FixedWindow {
            limit,
            window: duration_nanos(window),
            margin: duration_nanos(margin),
            daily,
            start: 0,
            end: 0,
            count: 0,
        }
    }

    /// The window `[start, end)` that contains `t`.
    pub fn bounds(&self, t: Time) -> (Time, Time) {
        match &self.daily {
            None => {
                let start = t.as_nanos() - t.as_nanos() % self.window;
                (
                    Time::from_nanos(start),
                    Time::from_nanos(start.saturating_add(self.window)),
                )
            }
            Some(d) => daily_bounds(d, t),
        }
    }

    fn roll(&mut self, now: Time) {
        let n = now.as_nanos();
        if n >= self.end || n < self.start {
            let (s, e) = self.bounds(now);
            self.start = s.as_nanos();
            self.end = e.as_nanos();
            self.count = 0;
        }
    }

    fn blocked_until(&mut self, now: Time) -> Option<Time> {
        self.blocked_below(self.limit, now)
    }

    fn blocked_below(&mut self, threshold: u32, now: Time) -> Option<Time> {
        self.roll(now);
        let closing = now.as_nanos() >= self.end.saturating_sub(self.margin);
        (closing || self.count >= threshold).then_some(Time::from_nanos(self.end))
    }

    fn charge(&mut self, now: Time) {
        self.roll(now);
        self.count += 1;
    }

    fn used(&mut self, now: Time) -> u32 {
        self.roll(now);
        self.count
    }

    fn next_reset(&mut self, now: Time) -> Time {
        self.roll(now);
        if self.count == 0 {
            now
        } else {
            Time::from_nanos(self.end)
        }
    }

    fn time_for(&mut self, n: u64, now: Time) -> Time {
        self.roll(now);
        let open = now.as_nanos() < self.end.saturating_sub(self.margin);
        let free_now = if open {
            u64::from(self.limit.saturating_sub(self.count))
        } else {
            0
        };
        if n < free_now {
            return now;
        }
        let rounds = (n - free_now) / u64::from(self.limit);
        // Daily windows vary by an hour around DST; an estimate of whole days is good enough here.
        Time::from_nanos(self.end.saturating_add(self.window.saturating_mul(rounds)))
    }
}

/// The daily window containing `t`: from the latest reset at or before `t` to the next one.
pub fn daily_bounds(d: &DailyReset, t: Time) -> (Time, Time) {
    let ts = t.to_timestamp();
    let local = d.zone.to_datetime(ts);
    let reset_on = |date: jiff::civil::Date| -> Time {
        d.zone
            .to_timestamp(date.to_datetime(d.at))
            .map(Time::from_timestamp)
            .unwrap_or(t)
    };
    let today = local.date();
    let today_reset = reset_on(today);
    if today_reset <= t {
        let next = today.tomorrow().map(reset_on).unwrap_or(Time::MAX);
        (today_reset, next)
    } else {
        let prev = today.yesterday().map(reset_on).unwrap_or(Time::ZERO);
        (prev, today_reset)
    }
}
