//! What the shared ledger and the disk store need of this process's ledger: a hold when the
//! shared ledger had no room, this replica's share while the shared ledger is unreachable, the
//! journal of grants (for the grant log, and for telling the shared ledger what was spent while
//! it was away), this replica's own grants in open windows (to re-seed a ledger that lost them),
//! and replaying logged grants after a restart.

use super::state::Fallback;
use super::window::{Shadow, Window};
use super::{Ledger, QuotaId};
use crate::clock::Time;

impl Ledger {
    /// The shared ledger has no room for `q` before `until`: this ledger grants none of it before
    /// then either (never shortening an earlier hold).
    pub fn hold(&self, q: QuotaId, until: Time) {
        let mut inner = self.lock();
        let s = &mut inner.quotas[q.0];
        s.held_until = s.held_until.max(until);
    }

    /// Starts (`Some`) or ends (`None`) this replica's fallback share of `q`.
    pub fn set_fallback(&self, q: QuotaId, fallback: Option<Fallback>) {
        self.lock().quotas[q.0].fallback = fallback;
    }

    /// The grants of `q` this process's window counts now.
    pub fn used(&self, q: QuotaId, now: Time) -> u32 {
        self.lock().quotas[q.0].window.used(now)
    }

    /// Whether `q` is under a fallback share now.
    pub fn in_fallback(&self, q: QuotaId) -> bool {
        self.lock().quotas[q.0].fallback.is_some()
    }

    /// Whether a grant of `quotas` made just before the fallback shares were set still fits in
    /// them (it is already counted in the windows); if so it is counted against the first
    /// window's share. `Err` carries when it would fit.
    pub fn fits_fallback(&self, quotas: &[QuotaId], now: Time) -> Result<(), Time> {
        let mut inner = self.lock();
        let mut blocked: Option<Time> = None;
        for &q in quotas {
            let s = &mut inner.quotas[q.0];
            let (Some(f), None) = (s.fallback, &s.keyed) else {
                continue;
            };
            let at = if now < f.first_end {
                (f.first_left == 0).then_some(f.first_end)
            } else if f.per_window == 0 || s.window.used(now) > f.per_window {
                Some(
                    s.window
                        .next_reset(now)
                        .max(now + std::time::Duration::from_millis(1)),
                )
            } else {
                None
            };
            if let Some(at) = at {
                blocked = Some(blocked.map_or(at, |b| b.max(at)));
            }
        }
        if let Some(at) = blocked {
            return Err(at);
        }
        for &q in quotas {
            let s = &mut inner.quotas[q.0];
            if let Some(f) = &mut s.fallback
                && s.keyed.is_none()
                && now < f.first_end
            {
                f.first_left = f.first_left.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Starts or stops recording grants of unkeyed quotas for [`Ledger::take_journal`].
    pub fn journal(&self, on: bool) {
        let mut inner = self.lock();
        match (on, inner.journal.is_some()) {
            (true, false) => inner.journal = Some(Vec::new()),
            (false, true) => inner.journal = None,
            _ => {}
        }
    }

    /// Records a grant of `quotas` (unkeyed ones) made before the journal was on.
    pub fn journal_grant(&self, quotas: &[QuotaId], now: Time) {
        let mut inner = self.lock();
        let unkeyed: Vec<QuotaId> = quotas
            .iter()
            .copied()
            .filter(|q| inner.quotas[q.0].keyed.is_none())
            .collect();
        if let Some(journal) = &mut inner.journal {
            journal.extend(unkeyed.into_iter().map(|q| (q, now)));
        }
    }

    /// Stops the journal and returns what it still held.
    pub fn end_journal(&self) -> Vec<(QuotaId, Time)> {
        self.lock().journal.take().unwrap_or_default()
    }

    /// The grants recorded since the last call (oldest first).
    pub fn take_journal(&self) -> Vec<(QuotaId, Time)> {
        self.lock()
            .journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// This process's own grants that each unkeyed quota's window still counts.
    pub fn shadow(&self, now: Time) -> Vec<(QuotaId, Shadow)> {
        let mut inner = self.lock();
        inner
            .quotas
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.keyed.is_none())
            .map(|(i, s)| (QuotaId(i), s.window.shadow(now)))
            .collect()
    }

    /// Charges grants logged before a restart (`(quota, time, count)`) to the windows that still
    /// count them; returns how many still counted.
    pub fn replay(&self, grants: &[(QuotaId, Time, u32)], now: Time) -> u64 {
        let mut inner = self.lock();
        let mut sorted: Vec<&(QuotaId, Time, u32)> = grants
            .iter()
            .filter(|(q, t, _)| q.0 < inner.quotas.len() && *t <= now)
            .collect();
        sorted.sort_by_key(|(_, t, _)| *t);
        let mut counted = 0;
        for &&(q, t, n) in &sorted {
            let s = &mut inner.quotas[q.0];
            if s.keyed.is_some() || !still_counted(&mut s.window, t, now) {
                continue;
            }
            for _ in 0..n {
                s.window.charge(t);
            }
            s.grants += u64::from(n);
            counted += u64::from(n);
        }
        counted
    }

    /// The fixed window `[start, end)` of `q` that contains `t` (`None` for a sliding quota).
    pub fn fixed_bounds(&self, q: QuotaId, t: Time) -> Option<(Time, Time)> {
        self.lock().quotas[q.0].window.fixed_bounds(t)
    }
}

/// Whether a grant at `t` is still counted by `window` at `now`.
fn still_counted(window: &mut Window, t: Time, now: Time) -> bool {
    match window {
        Window::Fixed(w) => w.bounds(now).0 <= t,
        _ => {
            let span = window.span();
            t + span > now
        }
    }
}
