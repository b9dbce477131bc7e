//! Sharing one quota between clients: each client's use of the window (in sub-windows), and the
//! parked writes each client has waiting, which together decide who is active and what is fair.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::clock::{Time, duration_nanos};
use crate::ids::{ClientId, QuotaId};

/// Sub-windows per window for a client's use: an approximation good enough for fairness (the
/// quota's own window, not this, is what keeps the CRM's limit).
const SUB_WINDOWS: u64 = 60;

/// One client's (or one class's: live, drain) use of one quota.
#[derive(Debug)]
pub struct ClientUse {
    width: u64,
    span: u64,
    buckets: VecDeque<(u64, u32)>,
    total: u64,
    /// Last live request of this client on this quota.
    pub last_live: Time,
}

impl ClientUse {
    pub fn new(window: Duration, margin: Duration) -> ClientUse {
        ClientUse {
            width: (duration_nanos(window) / SUB_WINDOWS).max(1),
            span: duration_nanos(window + margin),
            buckets: VecDeque::new(),
            total: 0,
            last_live: Time::ZERO,
        }
    }

    /// A sub-window stops counting when its start is a window old: in step with (never after)
    /// the quota's own slots freeing, so shares are judged on the same window as the limit.
    fn expires(&self, bucket: u64) -> u64 {
        bucket.saturating_mul(self.width).saturating_add(self.span)
    }

    fn prune(&mut self, now: Time) {
        while let Some(&(b, n)) = self.buckets.front() {
            if self.expires(b) > now.as_nanos() {
                break;
            }
            self.total -= u64::from(n);
            self.buckets.pop_front();
        }
    }

    /// Calls of this client counted in the window at `now`.
    pub fn used(&mut self, now: Time) -> u64 {
        self.prune(now);
        self.total
    }

    /// Calls counted in the sub-windows of the last `horizon` (at least the current one), and
    /// the time they cover: a recent rate.
    pub fn recent(&mut self, horizon: Duration, now: Time) -> (u64, Duration) {
        self.prune(now);
        let first = now.as_nanos().saturating_sub(duration_nanos(horizon)) / self.width;
        let calls = self
            .buckets
            .iter()
            .rev()
            .take_while(|&&(b, _)| b >= first)
            .map(|&(_, n)| u64::from(n))
            .sum();
        (
            calls,
            now.saturating_since(Time::from_nanos(first * self.width)),
        )
    }

    pub fn charge(&mut self, now: Time) {
        let b = now.as_nanos() / self.width;
        match self.buckets.back_mut() {
            Some((last, n)) if *last == b => *n += 1,
            _ => self.buckets.push_back((b, 1)),
        }
        self.total += 1;
    }

    /// Takes back a call charged at `at`, if it still counts.
    pub fn refund(&mut self, at: Time) {
        if super::window::uncount(&mut self.buckets, at.as_nanos() / self.width) {
            self.total -= 1;
        }
    }

    /// When this client's count next goes down.
    pub fn next_drop(&self) -> Option<Time> {
        self.buckets
            .front()
            .map(|&(b, _)| Time::from_nanos(self.expires(b)))
    }
}

/// Parked writes the proxy owns, waiting per (quota, client). The queue keeps it under its own
/// lock; the ledger reads it without taking that lock.
#[derive(Debug)]
pub struct WaitingBoard {
    clients: usize,
    counts: Box<[AtomicU32]>,
}

impl WaitingBoard {
    pub fn new(quotas: usize, clients: usize) -> WaitingBoard {
        WaitingBoard {
            clients,
            counts: (0..quotas * clients).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn slot(&self, q: QuotaId, c: ClientId) -> &AtomicU32 {
        &self.counts[q.0 * self.clients + c.0]
    }

    /// Adds (or with `up == false` removes) one waiting write of `client` on each quota.
    pub fn mark(&self, quotas: &[QuotaId], client: ClientId, up: bool) {
        for &q in quotas {
            let slot = self.slot(q, client);
            if up {
                slot.fetch_add(1, Ordering::Relaxed);
            } else {
                let _ =
                    slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
        }
    }

    pub fn waiting(&self, q: QuotaId, c: ClientId) -> u32 {
        self.slot(q, c).load(Ordering::Relaxed)
    }

    /// Whether any client has parked writes waiting on `q`.
    pub fn any(&self, q: QuotaId) -> bool {
        (0..self.clients).any(|c| self.waiting(q, ClientId(c)) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_use_ages_out_with_the_window() {
        let mut u = ClientUse::new(Duration::from_secs(60), Duration::ZERO);
        let t = Time::from_nanos(600_000_000_000);
        u.charge(t);
        u.charge(t + Duration::from_secs(30));
        assert_eq!(u.used(t + Duration::from_secs(59)), 2);
        assert_eq!(
            u.used(t + Duration::from_secs(60)),
            1,
            "the first call's sub-window passed"
        );
        assert_eq!(u.used(t + Duration::from_secs(90)), 0);
        assert_eq!(u.next_drop(), None);
    }

    #[test]
    fn the_board_counts_per_quota_and_client_and_never_goes_negative() {
        let b = WaitingBoard::new(2, 3);
        b.mark(&[QuotaId(0), QuotaId(1)], ClientId(2), true);
        assert_eq!(b.waiting(QuotaId(1), ClientId(2)), 1);
        assert!(b.any(QuotaId(0)));
        b.mark(&[QuotaId(0)], ClientId(2), false);
        b.mark(&[QuotaId(0)], ClientId(2), false);
        assert_eq!(b.waiting(QuotaId(0), ClientId(2)), 0);
        assert!(!b.any(QuotaId(0)));
    }
}
