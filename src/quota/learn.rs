//! What the CRM's answers teach the ledger: its reported remaining count caps a synced quota
//! until its reset (only ever tightening the local window), its throttle answers pause quotas,
//! and after a start a synced quota probes before sending in parallel.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::state::{Cap, same_reset};
use super::window::Window;
use super::{Grant, Ledger, QuotaId};
use crate::clock::Time;
use crate::config::QuotaConfig;
use crate::crm::Observation;

/// The shortest and longest pause a throttle answer imposes (`upstream.min_pause`,
/// `upstream.max_pause`).
#[derive(Debug, Clone, Copy)]
pub struct PauseBounds {
    pub min: Duration,
    pub max: Duration,
}

/// One quota's pause after a throttle answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paused {
    pub quota: QuotaId,
    pub until: Time,
    /// How much longer the quota is paused than it was.
    pub gained: Duration,
    /// The CRM asked for longer than the quota's limit.
    pub capped: bool,
    /// ... for the first time in this process (worth a warning).
    pub first_cap: bool,
}

/// What applying a response's observations changed, for metrics.
#[derive(Debug, Default)]
pub struct Learned {
    /// (quota, CRM remaining, CRM limit) for each quota an observation matched.
    pub reported: Vec<(QuotaId, Option<u64>, Option<u64>)>,
}

impl Ledger {
    /// Quotas whose `sync` names this CRM scope.
    pub fn synced_to(&self, scope: &str) -> Vec<QuotaId> {
        self.configs()
            .iter()
            .enumerate()
            .filter(|(_, c)| c.sync.as_deref() == Some(scope))
            .map(|(i, _)| QuotaId(i))
            .collect()
    }

    /// Applies what the CRM said in its answer to the request behind `grant`. Only quotas that
    /// request consumed and that sync to the observation's scope are affected, and only ever made
    /// stricter than their local window: at most `remaining - reserve` more grants after the
    /// request, until the CRM's reset (or, without one, for a short while). An extra cost (the
    /// CRM charged more than one call) is charged to the local window too.
    pub fn observe(&self, observations: &[Observation], grant: &Grant, now: Time) -> Learned {
        let mut learned = Learned::default();
        if observations.is_empty() {
            return learned;
        }
        let mut inner = self.lock();
        let configs = inner.configs.clone();
        for &(q, mark) in &grant.marks {
            let cfg = &configs[q.0];
            let Some(scope) = cfg.sync.as_deref() else {
                continue;
            };
            let Some(obs) = observations.iter().find(|o| o.scope == scope) else {
                continue;
            };
            let state = &mut inner.quotas[q.0];
            if let Some(cost) = obs.cost {
                for _ in 1..cost.min(u64::from(cfg.limit)) {
                    state.window.charge(now);
                }
                state.grants += cost.saturating_sub(1);
            }
            state.crm_limit = obs.limit.or(state.crm_limit);
            state.crm_remaining = obs.remaining.or(state.crm_remaining);
            learned.reported.push((q, obs.remaining, obs.limit));
            let Some(remaining) = obs.remaining else {
                continue;
            };
            let until = obs
                .reset
                .unwrap_or_else(|| default_hold(cfg, &mut state.window, now));
            let mut cap = Cap {
                ceiling: mark + remaining.saturating_sub(u64::from(cfg.reserve)),
                until,
                mark,
                period: obs.reset.map(|_| cfg.window),
                confirmed: true,
                observed_at: now,
                others_per_sec: state.cap.map_or(0.0, |old| {
                    others_rate(old, remaining, mark, cfg.reserve, now)
                }),
            };
            if let Some(old) = state.cap {
                cap.until = same_reset(old, cap, cfg.window).unwrap_or(cap.until);
            }
            state.cap = match state.cap {
                // An answer to an older request says less than the one already applied.
                Some(old) if now < old.until && old.mark > mark => Some(old),
                _ => Some(cap),
            };
        }
        learned
    }

    /// The latest instant a CRM answer may pause `q` until, or hold a ceiling on it: one window
    /// from now and `max_pause` from now, whichever is sooner; a fixed window (a daily quota)
    /// may always wait for its own end.
    pub fn pause_limit(&self, q: QuotaId, now: Time, max_pause: Duration) -> Time {
        let mut inner = self.lock();
        let configs = inner.configs.clone();
        let cfg = &configs[q.0];
        let mut limit = now + cfg.window.min(max_pause);
        if let Window::Fixed(w) = &mut inner.quotas[q.0].window {
            limit = limit.max(w.bounds(now).1.min(now + cfg.window));
        }
        limit
    }

    /// Pauses `quotas` after a throttle answer, until `until` within bounds: no later than each
    /// quota's [`Ledger::pause_limit`], and no sooner than `bounds.min` doubled for each throttle
    /// in a row before this one (so `Retry-After: 0` cannot make a hot loop). Never shortens a
    /// pause already in force.
    pub fn pause(
        &self,
        quotas: &[QuotaId],
        until: Time,
        now: Time,
        bounds: PauseBounds,
    ) -> Vec<Paused> {
        let limits: Vec<Time> = quotas
            .iter()
            .map(|&q| self.pause_limit(q, now, bounds.max))
            .collect();
        let mut inner = self.lock();
        quotas
            .iter()
            .zip(limits)
            .map(|(&q, limit)| {
                let state = &mut inner.quotas[q.0];
                let doubling = 2u32.saturating_pow(state.throttles.min(30));
                state.throttles = state.throttles.saturating_add(1);
                self.shared.throttled.store(true, Ordering::Relaxed);
                let floor = (now + bounds.min.saturating_mul(doubling)).min(limit);
                let capped = until > limit;
                let first_cap = capped && !std::mem::replace(&mut state.capped_before, true);
                let at = until.max(floor).min(limit);
                let gained = at.saturating_since(state.frozen_until.max(now));
                state.frozen_until = state.frozen_until.max(at);
                Paused {
                    quota: q,
                    until: at,
                    gained,
                    capped,
                    first_cap,
                }
            })
            .collect()
    }

    /// Whether a cut pause of `q` is the first in this process (then it is worth a warning).
    pub fn first_cap(&self, q: QuotaId) -> bool {
        !std::mem::replace(&mut self.lock().quotas[q.0].capped_before, true)
    }

    /// An answer that was not a throttle reached requests of `quotas`: their minimum pause
    /// starts over.
    pub fn not_throttled(&self, quotas: &[QuotaId]) {
        // Set under the lock with each throttle counted: when clear, there is none to count
        // off (an answer racing a throttle on another thread is as if it came first).
        if !self.shared.throttled.load(Ordering::Relaxed) {
            return;
        }
        let mut inner = self.lock();
        for &q in quotas {
            inner.quotas[q.0].throttles = 0;
        }
        let left = inner.quotas.iter().any(|s| s.throttles > 0);
        self.shared.throttled.store(left, Ordering::Relaxed);
    }

    /// Lifts a pause (and a ceiling the CRM reported) on `q` now: the operator's override.
    /// Whether there was one.
    pub fn resume(&self, q: QuotaId, now: Time) -> bool {
        let mut inner = self.lock();
        let state = &mut inner.quotas[q.0];
        let paused = state.frozen_until > now || state.cap.is_some_and(|c| now < c.until);
        state.frozen_until = Time::ZERO;
        state.cap = None;
        state.throttles = 0;
        paused
    }

    /// Pauses `quotas` until `until` (never shortens an existing pause); returns how much pause
    /// each quota gained. (Unbounded: what the CRM says goes through [`Ledger::pause`].)
    pub fn freeze(&self, quotas: &[QuotaId], until: Time, now: Time) -> Vec<(QuotaId, Duration)> {
        let mut inner = self.lock();
        quotas
            .iter()
            .map(|&q| {
                let state = &mut inner.quotas[q.0];
                let gained = until.saturating_since(state.frozen_until.max(now));
                state.frozen_until = state.frozen_until.max(until);
                (q, gained)
            })
            .collect()
    }

    /// When the current window of a quota ends (fixed), or one window from now (sliding).
    pub fn window_end(&self, q: QuotaId, now: Time) -> Time {
        let mut inner = self.lock();
        let configs = inner.configs.clone();
        let cfg = &configs[q.0];
        match &mut inner.quotas[q.0].window {
            Window::Fixed(w) => w.bounds(now).1,
            _ => now + cfg.window,
        }
    }

    /// Until when a CRM report about `q` without a reset holds, from `now`.
    pub fn default_hold_until(&self, q: QuotaId, now: Time) -> Time {
        let mut inner = self.lock();
        let configs = inner.configs.clone();
        default_hold(&configs[q.0], &mut inner.quotas[q.0].window, now)
    }
}

/// A synced quota starts with a probe: what other apps (or this proxy before a restart) spent of
/// the CRM's window is unknown until an answer tells, so until then requests go one at a time.
/// An answer that reports what remains replaces it; without one it lapses like a report without
/// a reset would.
pub(super) fn start_probe(q: &QuotaConfig, now: Time) -> Cap {
    Cap {
        ceiling: u64::MAX,
        until: now + q.window.min(Duration::from_secs(60)),
        mark: 0,
        period: None,
        confirmed: false,
        observed_at: now,
        others_per_sec: 0.0,
    }
}

/// Other apps' spending rate, from the last applied report `old` and a new one (`remaining` after
/// grant `mark`): what the CRM's count lost between them beyond this proxy's own grants, per
/// second, averaged with the earlier estimate. Kept as it was across a reset, for a report that
/// is not newer, or one too close to the last to measure (under 200 ms).
fn others_rate(old: Cap, remaining: u64, mark: u64, reserve: u32, now: Time) -> f64 {
    let dt = now.saturating_since(old.observed_at).as_secs_f64();
    if !old.confirmed || now >= old.until || mark <= old.mark || old.ceiling == u64::MAX || dt < 0.2
    {
        return old.others_per_sec;
    }
    let before = old.ceiling.saturating_sub(old.mark) + u64::from(reserve);
    let lost = before.saturating_sub(remaining);
    let others = lost.saturating_sub(mark - old.mark) as f64 / dt;
    if old.others_per_sec == 0.0 {
        others
    } else {
        (old.others_per_sec + others) / 2.0
    }
}

/// How long an observation without a reset holds: to the end of a fixed window, else briefly
/// (a rolling window has no reset instant; the next answer refreshes it, and with no traffic the
/// quota is probed again after this).
pub(super) fn default_hold(cfg: &QuotaConfig, window: &mut Window, now: Time) -> Time {
    match window {
        Window::Fixed(w) => w.bounds(now).1,
        _ => now + cfg.window.min(Duration::from_secs(60)),
    }
}
