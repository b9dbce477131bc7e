//! What the ledger shows: each quota's state for `/status` and metrics, the usage behind the
//! `RateLimit` headers, estimates of when a parked write goes, and keyed quotas' keys.

use serde::Serialize;

use super::state::QuotaState;
use super::{Inner, Ledger};
use crate::clock::Time;
use crate::config::{QuotaConfig, WindowKind};
use crate::ids::QuotaId;
use crate::units::format_duration;

/// One quota's state as a request sees it (for `RateLimit` headers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaUsage {
    pub quota: QuotaId,
    pub remaining: u32,
    pub reset_at: Time,
}

/// One quota's state for `/status` and metrics.
#[derive(Clone, Debug, Serialize)]
pub struct QuotaStatus {
    pub name: String,
    pub limit: u32,
    pub window: String,
    pub kind: &'static str,
    pub used: u32,
    /// What the proxy may still send: the local window and, while it holds, the CRM's own count.
    pub remaining: u32,
    /// When the count next goes down (sliding) or the window resets (fixed).
    pub next_reset_at: String,
    /// `false`: shadow mode, counted but never enforced.
    pub enforce: bool,
    /// Set while a CRM throttle answer paused this quota.
    pub frozen_until: Option<String>,
    /// The CRM's last reported remaining calls for the synced scope (before the reserve).
    pub crm_remaining: Option<u64>,
    pub crm_limit: Option<u64>,
    /// Each class's use of the window and the room now held for it: `read`s, `live` requests
    /// (reads included) and the `drain` of parked writes.
    pub classes: [ClassUse; 3],
}

/// One class of traffic on one quota, for `/status` and metrics.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ClassUse {
    pub class: &'static str,
    /// Calls of the class counted in the window.
    pub used: u64,
    /// Room the others leave it now (its reserve less what it used; 0 while it is not about).
    pub reserved: u64,
}

impl Ledger {
    /// Keys tracked by each keyed quota, and grants that went to its overflow window.
    pub fn keys(&self) -> Vec<(QuotaId, usize, u64)> {
        let inner = self.lock();
        inner
            .quotas
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.keyed
                    .as_ref()
                    .map(|k| (QuotaId(i), k.len(), k.overflowed))
            })
            .collect()
    }

    /// Each client's calls counted in each unkeyed quota's current window.
    pub fn client_use(&self, now: Time) -> Vec<Vec<u64>> {
        let mut inner = self.lock();
        let clients = inner.sharing.weights.len();
        (0..clients)
            .map(|c| {
                inner
                    .quotas
                    .iter_mut()
                    .map(|s| s.clients[c].used(now))
                    .collect()
            })
            .collect()
    }

    fn remaining(cfg: &QuotaConfig, state: &mut QuotaState, now: Time) -> u32 {
        if now < state.frozen_until {
            return 0;
        }
        let local = cfg.limit.saturating_sub(state.window.used(now));
        match state.cap_left(now) {
            Some(left) => local.min(u32::try_from(left).unwrap_or(u32::MAX)),
            None => local,
        }
    }

    /// With room left, when the window's count next goes down; with none, when the next
    /// request fits: the window's next free slot, a CRM pause's end or the CRM's reported
    /// reset, whichever is last (what the ledger will actually do, so `RateLimit` `t=` agrees
    /// with a `Retry-After` beside it).
    fn next_reset(state: &mut QuotaState, remaining: u32, now: Time) -> Time {
        if remaining > 0 {
            return state.window.next_reset(now);
        }
        let mut at = state.window.time_for(0, now).max(state.frozen_until);
        if state.cap_left(now) == Some(0)
            && let Some(c) = state.cap
        {
            at = at.max(c.until);
        }
        at
    }

    /// Remaining requests and reset time of each unkeyed quota, binding (fewest remaining) first.
    pub fn usage(&self, quotas: &[QuotaId], now: Time) -> Vec<QuotaUsage> {
        let mut inner = self.lock();
        // Borrowed apart, not the configs taken (a count both data threads would write).
        let Inner {
            configs,
            quotas: states,
            ..
        } = &mut *inner;
        let mut out: Vec<QuotaUsage> = quotas
            .iter()
            .filter(|q| configs[q.0].key.is_empty())
            .map(|&q| {
                let state = &mut states[q.0];
                let remaining = Self::remaining(&configs[q.0], state, now);
                QuotaUsage {
                    quota: q,
                    remaining,
                    reset_at: Self::next_reset(state, remaining, now),
                }
            })
            .collect();
        out.sort_by_key(|u| (u.remaining, std::cmp::Reverse(u.reset_at)));
        out
    }

    /// Estimated time at which the request `ahead` places behind the next one could be sent,
    /// if only this lane spent the quotas.
    pub fn estimate(&self, quotas: &[QuotaId], ahead: u64, now: Time) -> Time {
        let mut inner = self.lock();
        let configs = inner.configs.clone();
        quotas
            .iter()
            .map(|&q| {
                let state = &mut inner.quotas[q.0];
                let capped = match (state.cap_left(now), state.cap) {
                    (Some(left), Some(c)) if left <= ahead => c.until,
                    _ => now,
                };
                // Parked writes wait for the schedule to release their call too.
                let released = state.release(&configs[q.0], now).map_or(now, |r| {
                    r.time_for(u64::from(state.window.used(now)) + ahead + 1)
                });
                state
                    .window
                    .time_for(ahead, now)
                    .max(state.frozen_until)
                    .max(capped)
                    .max(released)
            })
            .max()
            .unwrap_or(now)
            .max(now)
    }

    pub fn snapshot(&self, now: Time) -> Vec<QuotaStatus> {
        let mut inner = self.lock();
        let configs = inner.configs.clone();
        let fairness = inner.sharing.fairness;
        configs
            .iter()
            .zip(inner.quotas.iter_mut())
            .enumerate()
            .map(|(i, (c, s))| {
                let remaining = Self::remaining(c, s, now);
                QuotaStatus {
                    classes: s.classes(c, &fairness, self.board.any(QuotaId(i)), now),
                    name: c.name.clone(),
                    limit: c.limit,
                    window: format_duration(c.window),
                    kind: match c.kind {
                        WindowKind::Sliding => "sliding",
                        WindowKind::Fixed { .. } => "fixed",
                    },
                    used: s.window.used(now),
                    remaining,
                    next_reset_at: Self::next_reset(s, remaining, now).to_string(),
                    enforce: c.enforce,
                    frozen_until: (now < s.frozen_until).then(|| s.frozen_until.to_string()),
                    crm_remaining: s.crm_remaining,
                    crm_limit: s.crm_limit,
                }
            })
            .collect()
    }
}
