//! One quota's state inside the ledger: its window, the CRM's reported ceiling and pauses, and
//! the decision whether one more request fits, with the reserves and weighted shares.

use std::time::Duration;

use super::Demand;
use super::keyed::Keyed;
use super::schedule::Release;
use super::share::{ClientUse, WaitingBoard};
use super::window::Window;
use crate::clock::Time;
use crate::config::{Fairness, QuotaConfig};
use crate::ids::{ClientId, QuotaId};

/// How quotas are shared: client weights and caps, and the live/drain reserves.
#[derive(Debug)]
pub(super) struct Sharing {
    pub(super) weights: Vec<u32>,
    /// Per quota, per client: the hard cap, if any.
    pub(super) caps: Vec<Vec<Option<u32>>>,
    pub(super) fairness: Fairness,
}

/// What the CRM's headers impose: at most `ceiling` grants in total until `until`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cap {
    pub(super) ceiling: u64,
    pub(super) until: Time,
    /// The grant count the observation was made against (newer observations replace older ones).
    pub(super) mark: u64,
    /// Set when the CRM named its reset (a fixed window): at each reset the cap rolls on to the
    /// CRM's own limit for the next window instead of lapsing.
    pub(super) period: Option<Duration>,
    /// False for a cap rolled into a new window: what other apps spent in it is unknown until
    /// the first answer, so until then requests go one at a time (a probe).
    pub(super) confirmed: bool,
    /// When the CRM's count behind `ceiling` was true (the answer, or the window's start).
    pub(super) observed_at: Time,
    /// Calls per second other apps spend of the same CRM scope, estimated from successive
    /// answers: what the CRM's count loses beyond this proxy's own calls. The news ages by it.
    pub(super) others_per_sec: f64,
}

impl Cap {
    /// What other apps have likely spent since the CRM's count was true.
    pub(super) fn others_since(&self, now: Time) -> u64 {
        (self.others_per_sec * now.saturating_since(self.observed_at).as_secs_f64()).ceil() as u64
    }
}

/// The calls a reserve of share `f` holds in each window of `cfg`.
pub(super) fn reserve_share(cfg: &QuotaConfig, f: f64) -> u64 {
    (f64::from(cfg.limit) * f).ceil() as u64
}

/// Whether a class last seen at `at` is still about: within two windows.
pub(super) fn about(cfg: &QuotaConfig, at: Time, now: Time) -> bool {
    now.saturating_since(at) < cfg.window.saturating_mul(2)
}

/// News older than this (no answer of the CRM's since) is stale: near the wall, calls go one at a
/// time until an answer says what is left.
pub(super) const STALE_AFTER: Duration = Duration::from_secs(1);

/// CRMs give their reset in whole seconds, rounded up, counted from before the answer left
/// them: each answer's reset is at or after the true one, by up to a second. In a window of
/// 10 s or more, two answers whose resets lie less than a second apart name the same reset,
/// and the earlier is the closer estimate (still never early). Windows then open on time
/// instead of up to a second late. `None` when the two are not the same reset.
pub(super) fn same_reset(old: Cap, new: Cap, window: Duration) -> Option<Time> {
    let (lo, hi) = (old.until.min(new.until), old.until.max(new.until));
    (old.period.is_some()
        && new.period.is_some()
        && window >= Duration::from_secs(10)
        && hi.saturating_since(lo) < Duration::from_secs(1))
    .then_some(lo)
}

/// Below this many calls left (by the CRM's count), a synced quota sends one request at a time,
/// so at most one can meet the wall if another app spends the rest first.
pub(super) fn careful_below(limit: u64) -> u64 {
    (limit / 10).max(2)
}

pub(super) struct QuotaState {
    pub(super) window: Window,
    pub(super) frozen_until: Time,
    /// Grants ever charged (including extra cost the CRM reported).
    pub(super) grants: u64,
    pub(super) cap: Option<Cap>,
    pub(super) crm_remaining: Option<u64>,
    pub(super) crm_limit: Option<u64>,
    /// Granted requests of a synced quota whose answers have not been read yet.
    pub(super) outstanding: u64,
    /// Per-key windows, for a keyed quota.
    pub(super) keyed: Option<Keyed>,
    /// Each client's use of the window (for caps and weighted shares).
    pub(super) clients: Vec<ClientUse>,
    /// Use of the window by live requests and by the drain (for the reserves).
    pub(super) live_use: ClientUse,
    pub(super) drain_use: ClientUse,
    /// Use of the window by reads (for the read reserve).
    pub(super) read_use: ClientUse,
    /// Live requests (and of them reads) refused for want of room: demand the forecast counts.
    pub(super) live_refused: ClientUse,
    pub(super) read_refused: ClientUse,
    /// Last live request of any client (the proxy's start counts as one).
    pub(super) last_live: Time,
    /// Last read that asked for room, granted or not.
    pub(super) last_read: Time,
    /// The shared ledger (Redis) had no room for this quota before this time.
    pub(super) held_until: Time,
    /// While the shared ledger is unreachable: what this replica may still spend on its own.
    pub(super) fallback: Option<Fallback>,
    /// Throttle answers in a row (no other answer in between): the minimum pause doubles.
    pub(super) throttles: u32,
    /// A pause of this quota was cut to its limit before (logged once).
    pub(super) capped_before: bool,
}

/// What a replica may spend of a quota while the shared ledger is unreachable. Until the end of
/// the window the ledger last reported on, at most `first_left` more (its share of what was left
/// then); after it, at most `per_window` of its own grants in any window (its share of the
/// limit). With every replica keeping to its share, together they keep to the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fallback {
    pub first_end: Time,
    pub first_left: u64,
    pub per_window: u32,
}

impl QuotaState {
    /// Each class's use of the window and the room its reserve holds now.
    pub(super) fn classes(
        &mut self,
        cfg: &QuotaConfig,
        fairness: &Fairness,
        backlog: bool,
        now: Time,
    ) -> [super::ClassUse; 3] {
        let share = |f: f64| reserve_share(cfg, f);
        let recent = |at: Time| about(cfg, at, now);
        let class = |class, use_: &mut ClientUse, reserve: f64, about: bool| {
            let used = use_.used(now);
            super::ClassUse {
                class,
                used,
                reserved: if about {
                    share(reserve).saturating_sub(used)
                } else {
                    0
                },
            }
        };
        [
            class(
                "read",
                &mut self.read_use,
                fairness.read_reserve,
                recent(self.last_read),
            ),
            class(
                "live",
                &mut self.live_use,
                fairness.live_reserve,
                recent(self.last_live),
            ),
            class("drain", &mut self.drain_use, fairness.drain_min, backlog),
        ]
    }

    pub(super) fn cap_left(&self, now: Time) -> Option<u64> {
        self.cap.filter(|c| now < c.until).map(|c| {
            c.ceiling
                .saturating_sub(self.grants)
                .saturating_sub(c.others_since(now))
        })
    }

    /// Rolls a lapsed periodic cap on to the next CRM window: the CRM's limit, less the reserve
    /// and the requests still awaiting answers (they may land in the new window).
    pub(super) fn roll_cap(&mut self, reserve: u32, now: Time) {
        let (Some(c), Some(limit)) = (self.cap, self.crm_limit) else {
            return;
        };
        let Some(period) = c.period.filter(|_| now >= c.until) else {
            return;
        };
        let behind = now.saturating_since(c.until).as_nanos() / period.as_nanos().max(1);
        let until = c.until + period * (u32::try_from(behind).unwrap_or(u32::MAX - 1) + 1);
        self.cap = Some(Cap {
            ceiling: self.grants
                + limit
                    .saturating_sub(u64::from(reserve))
                    .saturating_sub(self.outstanding),
            until,
            mark: self.grants,
            period: c.period,
            confirmed: false,
            observed_at: until - period,
            others_per_sec: c.others_per_sec,
        });
    }

    /// When one more request of `ask.d` could fit, or `None` if it fits now.
    pub(super) fn blocked_until(&mut self, ask: &Ask<'_>) -> Option<Time> {
        let Ask {
            q,
            cfg,
            d,
            sharing,
            board,
            now,
        } = *ask;
        if now < self.frozen_until {
            return Some(self.frozen_until);
        }
        if let Some(keyed) = &mut self.keyed {
            let share = self.fallback.map(|f| f.per_window);
            return keyed.blocked_until(d.key(q), share, now);
        }
        if now < self.held_until {
            return Some(self.held_until);
        }
        // Reserves guarantee each class a minimum of every window: the drain leaves what live
        // requests have not yet used of theirs while live traffic is about (a live request
        // within two windows, or the proxy's start); live requests (but reads within the reads'
        // reserve) leave what the drain has not yet used of its minimum while parked writes
        // wait; and writes, live or parked, leave
        // what reads have not yet used of theirs while reads are about (one within two
        // windows, or the proxy's start when a read route spends the quota). A reserve nobody
        // is about to use is lent back.
        let share = |f: f64| reserve_share(cfg, f);
        let recent = |at: Time| about(cfg, at, now);
        let for_reads = if !d.read && recent(self.last_read) {
            share(sharing.fairness.read_reserve).saturating_sub(self.read_use.used(now))
        } else {
            0
        };
        // A read within the reads' own reserve goes before the drain's minimum too: writes,
        // parked ones included, leave reads their share.
        let read_room = if d.read {
            share(sharing.fairness.read_reserve).saturating_sub(self.read_use.used(now))
        } else {
            0
        };
        let held_for_others = if d.live {
            let for_drain = if board.any(q) && read_room == 0 {
                share(sharing.fairness.drain_min).saturating_sub(self.drain_use.used(now))
            } else {
                0
            };
            for_drain + for_reads
        } else if recent(self.last_live) {
            let for_live =
                share(sharing.fairness.live_reserve).saturating_sub(self.live_use.used(now));
            for_live.max(for_reads)
        } else {
            for_reads
        };
        let threshold = cfg.limit
            - u32::try_from(held_for_others)
                .unwrap_or(cfg.limit)
                .min(cfg.limit);
        if let Some(at) = self.window.blocked_below(threshold.max(1), now) {
            return Some(at);
        }
        if d.held_to_schedule()
            && let Some(at) = self.unreleased(cfg, now)
        {
            return Some(at);
        }
        if let Some(at) = self.fallback_blocked(cfg, now) {
            return Some(at);
        }
        if let Some(at) = self.client_blocked(ask, threshold.max(1)) {
            return Some(at);
        }
        self.roll_cap(cfg.reserve, now);
        let crm_limit = self.crm_limit.unwrap_or(u64::from(cfg.limit));
        match (self.cap_left(now), self.cap) {
            // Spent by the CRM's own count: until its reset.
            (Some(0), Some(c)) if c.ceiling <= self.grants => return Some(c.until),
            // Spent only by the estimate of what other apps spent since: one call may go to
            // find out (its answer corrects the estimate); more wait for it.
            (Some(0), Some(_)) if self.outstanding > 0 => {
                return Some(now + Duration::from_secs(1));
            }
            // Near the wall (closer when other apps spend fast: what they spend in a second
            // counts as gone), probing a new window, or near it on news older than a second:
            // wait for the answers still out.
            (Some(left), Some(c))
                if self.outstanding > 0
                    && (!c.confirmed
                        || left < careful_below(crm_limit) + c.others_per_sec.ceil() as u64
                        || (now.saturating_since(c.observed_at) > STALE_AFTER
                            && left < crm_limit / 4)) =>
            {
                return Some(now + Duration::from_secs(1));
            }
            _ => {}
        }
        self.window.blocked_until(now)
    }

    /// The window's release schedule, if it has one, at `now`.
    pub(super) fn release(&self, cfg: &QuotaConfig, now: Time) -> Option<Release> {
        Release::of(cfg, self.window.fixed_bounds(now)?)
    }

    /// When the schedule has released one more call than the window holds, if it holds all it
    /// released so far (what parked writes wait for).
    fn unreleased(&mut self, cfg: &QuotaConfig, now: Time) -> Option<Time> {
        let release = self.release(cfg, now)?;
        let used = u64::from(self.window.used(now));
        (used >= release.allowed(now)).then(|| release.time_for(used + 1).max(now))
    }

    /// While the shared ledger is unreachable: this replica's share is spent until then.
    fn fallback_blocked(&mut self, cfg: &QuotaConfig, now: Time) -> Option<Time> {
        let f = self.fallback?;
        if now < f.first_end {
            return (f.first_left == 0).then_some(f.first_end);
        }
        if f.per_window == 0 {
            return Some(now + cfg.window);
        }
        self.window.blocked_below(f.per_window, now)
    }

    /// The client's hard cap, then its weighted share among the clients with parked writes
    /// waiting (the demand that can be measured): a client under its fair share may go; one over
    /// it only with what the others' unused shares leave. A client without a backlog lends its
    /// share; live requests are protected by the live reserve and caps instead.
    pub(super) fn client_blocked(&mut self, ask: &Ask<'_>, threshold: u32) -> Option<Time> {
        let Ask {
            q,
            cfg,
            d,
            sharing,
            board,
            now,
        } = *ask;
        let c = d.client.0;
        let used_c = self.clients[c].used(now);
        let retry = |u: &ClientUse| u.next_drop().unwrap_or(now + cfg.window);
        if let Some(cap) = sharing.caps[q.0][c]
            && used_c >= u64::from(cap)
        {
            return Some(retry(&self.clients[c]));
        }
        if sharing.weights.len() < 2 {
            return None;
        }
        let active: Vec<usize> = (0..sharing.weights.len())
            .filter(|&a| a == c || board.waiting(q, ClientId(a)) > 0)
            .collect();
        if active.len() < 2 {
            return None;
        }
        let total_weight: u64 = active.iter().map(|&a| u64::from(sharing.weights[a])).sum();
        let fair =
            |a: usize| u64::from(threshold) * u64::from(sharing.weights[a]) / total_weight.max(1);
        if used_c < fair(c) {
            return None;
        }
        let used_all = u64::from(self.window.used(now));
        let others_owed: u64 = active
            .iter()
            .filter(|&&a| a != c)
            .map(|&a| fair(a).saturating_sub(self.clients[a].used(now)))
            .sum();
        if u64::from(threshold).saturating_sub(used_all + 1) >= others_owed {
            return None;
        }
        Some(retry(&self.clients[c]))
    }
}

/// What one quota's decision looks at besides the quota's own state.
#[derive(Clone, Copy)]
pub(super) struct Ask<'a> {
    pub(super) q: QuotaId,
    pub(super) cfg: &'a QuotaConfig,
    pub(super) d: &'a Demand<'a>,
    pub(super) sharing: &'a Sharing,
    pub(super) board: &'a WaitingBoard,
    pub(super) now: Time,
}
