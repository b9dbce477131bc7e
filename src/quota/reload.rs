//! A config reload applied to a running ledger: the same quotas (same names, same order) with
//! new limits, windows, margins, reserves, CRM scopes or key bounds, and new client weights,
//! caps and reserves. A quota whose window changed gets a new one holding the grants the old
//! one still counted, so usage carries over.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::keyed::Keyed;
use super::pace::Pacer;
use super::share::ClientUse;
use super::window::{Shadow, Window};
use super::{Ledger, QuotaId, next_configs_id, sharing};
use crate::clock::Time;
use crate::config::{ClientConfig, Fairness, Pace, QuotaConfig};

/// The grants a window's shadow stands for, as `(time, count)`: exact times, a fixed window's
/// count at its start, or each sub-window's count at its end (never earlier than the grants it
/// holds, so a replay counts them at least as long as the window did).
pub fn shadow_grants(shadow: Shadow, now: Time) -> Vec<(Time, u32)> {
    match shadow {
        Shadow::Times(times) => times.into_iter().map(|t| (t, 1)).collect(),
        Shadow::Count { start, count, .. } if count > 0 => vec![(start, count)],
        Shadow::Count { .. } => Vec::new(),
        Shadow::Buckets { width, counts } => counts
            .into_iter()
            .map(|(b, n)| {
                let end = Time::from_nanos(b.saturating_add(1).saturating_mul(width) - 1);
                (end.min(now), n)
            })
            .collect(),
    }
}

impl Ledger {
    /// Applies new configs of the same quotas and new sharing between `clients` (the same
    /// clients, in the same order).
    pub fn reconfigure(
        &self,
        configs: &[QuotaConfig],
        clients: &[ClientConfig],
        fairness: Fairness,
        pace: Option<Pace>,
        now: Time,
    ) {
        let mut inner = self.lock();
        debug_assert_eq!(inner.configs.len(), configs.len(), "the same quotas");
        let old = inner.configs.clone();
        let mut replays = Vec::new();
        for (i, (was, new)) in old.iter().zip(configs).enumerate() {
            if was == new {
                continue;
            }
            let state = &mut inner.quotas[i];
            if was.window != new.window
                || was.kind != new.kind
                || was.margin != new.margin
                || was.limit != new.limit
            {
                let counted = shadow_grants(state.window.shadow(now), now);
                state.window = Window::new(new);
                replays.extend(counted.into_iter().map(|(t, n)| (QuotaId(i), t, n)));
                if was.window != new.window || was.margin != new.margin {
                    state.live_use = ClientUse::new(new.window, new.margin);
                    state.drain_use = ClientUse::new(new.window, new.margin);
                    state.read_use = ClientUse::new(new.window, new.margin);
                    for c in &mut state.clients {
                        *c = ClientUse::new(new.window, new.margin);
                    }
                }
            }
            if was.key != new.key || was.max_keys != new.max_keys || was.window != new.window {
                state.keyed = (!new.key.is_empty()).then(|| Keyed::new(new));
            }
            if new.sync.is_none() {
                state.cap = None;
            }
        }
        inner.configs = Arc::new(configs.to_vec());
        self.shared
            .configs_id
            .store(next_configs_id(), Ordering::Release);
        inner.sharing = sharing(configs, clients, fairness);
        let same_pace = match (&inner.pacer, pace) {
            (Some(p), Some(new)) => p.pace() == new,
            (None, None) => true,
            _ => false,
        };
        if !same_pace {
            inner.pacer = pace.map(|p| Pacer::new(p, now));
        }
        drop(inner);
        self.replay(&replays, now);
    }
}
