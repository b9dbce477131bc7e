//! The quota ledger: one all-or-nothing decision over every quota a request consumes, corrected
//! (only ever downwards) by what the CRM reports about its own counters.

mod forecast;
mod keyed;
mod learn;
mod pace;
mod reload;
mod schedule;
mod shadow;
mod share;
mod state;
mod views;
pub mod window;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

use crate::clock::Time;
use crate::config::{ClientConfig, Fairness, Pace, QuotaConfig};
use crate::ids::{ClientId, QuotaId};
pub use forecast::Forecast;
use keyed::Keyed;
use learn::start_probe;
pub use learn::{Learned, PauseBounds, Paused};
use pace::Pacer;
pub use reload::shadow_grants;
pub use schedule::Release;
use share::ClientUse;
pub use share::WaitingBoard;
pub use state::Fallback;
use state::{Ask, QuotaState, Sharing};
pub use views::{ClassUse, QuotaStatus, QuotaUsage};
use window::Window;

/// What a request asks of the ledger.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    pub quotas: &'a [QuotaId],
    /// The key of each keyed quota among `quotas` (a missing one counts as the empty key).
    pub keys: &'a [(QuotaId, Arc<str>)],
    pub client: ClientId,
    /// A request whose client is waiting, rather than the drain of a parked write.
    pub live: bool,
    /// A read (a route of class `read`): writes leave it `fairness.read_reserve`.
    pub read: bool,
    /// A live write whose client does not wait (`max_wait: 0s`): held to release schedules
    /// like a parked write, since a 202 serves its client as well.
    pub deferrable: bool,
}

impl<'a> Demand<'a> {
    /// A live request of the default client on unkeyed quotas.
    pub fn live(quotas: &'a [QuotaId]) -> Demand<'a> {
        Demand {
            quotas,
            keys: &[],
            client: ClientId::default(),
            live: true,
            read: false,
            deferrable: false,
        }
    }

    /// Whether release schedules hold it: a parked write, or one whose client does not wait.
    pub fn held_to_schedule(&self) -> bool {
        !self.live || self.deferrable
    }

    fn key(&self, q: QuotaId) -> &str {
        self.keys
            .iter()
            .find(|(k, _)| *k == q)
            .map_or("", |(_, key)| key)
    }
}

/// Why a request cannot be sent now, and when it could.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    /// Earliest time every quota involved could take one more request (if nothing else is charged).
    pub retry_at: Time,
    /// The quota that blocks longest; `None` when the upstream pacer is what blocks.
    pub binding: Option<QuotaId>,
}

/// Proof of one charge: each consumed quota's grant count right after it. The CRM's answer to
/// this request describes its counters as of then, so later grants are accounted for on top.
/// While it lives, the request counts as awaiting its answer on every synced quota it consumed;
/// dropping it (answer read, or no answer coming) releases that.
#[derive(Debug, Default)]
pub struct Grant {
    /// When it was charged, for which client, and whether live.
    pub at: Time,
    client: u32,
    live: bool,
    read: bool,
    /// Charged for a request release schedules hold ([`Demand::held_to_schedule`]).
    scheduled: bool,
    marks: Vec<(QuotaId, u64)>,
    /// Set when the grant holds synced quotas' outstanding counts.
    shared: Option<Arc<Shared>>,
    /// What the shared ledger (Redis) said of it, when one decides too.
    pub remote: Option<Box<Remote>>,
    /// Granted although a quota in shadow mode (`enforce: false`) had no room: what enforcing
    /// it would have done.
    pub would: Option<Denied>,
}

/// The shared ledger's side of a grant: its marks on the account-wide grant counters of the
/// synced quotas (what CRM answers are measured against), and how to release its in-flight
/// count there once the answer is read.
#[derive(Default)]
pub struct Remote {
    pub marks: Vec<(QuotaId, u64)>,
    pub release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("marks", &self.marks)
            .finish()
    }
}

impl Grant {
    /// Whether it was charged for a request that release schedules hold (a parked write, or
    /// one whose client does not wait).
    pub fn held_to_schedule(&self) -> bool {
        self.scheduled
    }

    /// The synced quotas this grant consumed.
    pub fn synced(&self) -> impl Iterator<Item = QuotaId> + '_ {
        self.marks.iter().map(|&(q, _)| q)
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(release) = self.remote.as_mut().and_then(|r| r.release.take()) {
            release();
        }
        if let Some(shared) = self.shared.take() {
            let mut inner = shared.lock();
            for &(q, _) in &self.marks {
                let s = &mut inner.quotas[q.0];
                s.outstanding = s.outstanding.saturating_sub(1);
            }
            drop(inner);
            shared.released.notify_one();
        }
    }
}

struct Inner {
    /// The quotas' configs (replaced on a config reload; indexes stay).
    configs: Arc<Vec<QuotaConfig>>,
    /// How the quotas are shared between clients and classes.
    sharing: Sharing,
    quotas: Vec<QuotaState>,
    pacer: Option<Pacer>,
    /// Grants of unkeyed quotas since the last [`Ledger::take_journal`], while journaling is on
    /// (the disk store's grant log, the shared ledger's fallback).
    journal: Option<Vec<(QuotaId, Time)>>,
}

/// The ledger's state, shared with the grants that hold outstanding counts.
#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Signalled whenever a grant on a synced quota is released (an answer was read).
    released: Notify,
    /// The number of the configs `inner` holds (see [`Ledger::configs_id`]).
    configs_id: AtomicU64,
    /// Whether a quota may have throttles counted: an answer that was no throttle takes the
    /// lock to count them off only then (see [`Ledger::not_throttled`]).
    throttled: AtomicBool,
}

/// Numbers each set of quota configs a ledger is given (at its start and at each reload), in
/// the whole process, so that no two sets ever share one.
static NEXT_CONFIGS: AtomicU64 = AtomicU64::new(1);

fn next_configs_id() -> u64 {
    NEXT_CONFIGS.fetch_add(1, Ordering::Relaxed)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave a window half-updated in a way that
        // over-grants (charge is a single push), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ledger state")
    }
}

impl Inner {
    /// The denial for `d` at `now`, naming the quota that blocks longest; `None` if all have room.
    /// Why `d` cannot go now: the quotas that enforce, and (second) those in shadow mode that
    /// would have held it (`enforce: false`: counted, never enforced).
    fn blocked(
        &mut self,
        board: &WaitingBoard,
        d: &Demand<'_>,
        now: Time,
    ) -> (Option<Denied>, Option<Denied>) {
        let mut denied: Option<Denied> = None;
        let mut would: Option<Denied> = None;
        let Inner {
            configs,
            sharing,
            quotas,
            ..
        } = self;
        for &q in d.quotas {
            let state = &mut quotas[q.0];
            if d.live {
                state.last_live = now;
                state.clients[d.client.0].last_live = now;
            }
            if d.read {
                // Reads are about even when they find no room: that is when they need it.
                state.last_read = now;
            }
            let ask = Ask {
                q,
                cfg: &configs[q.0],
                d,
                sharing,
                board,
                now,
            };
            if let Some(at) = state.blocked_until(&ask) {
                let slot = if configs[q.0].enforce {
                    &mut denied
                } else {
                    &mut would
                };
                if slot.is_none_or(|d| at > d.retry_at) {
                    *slot = Some(Denied {
                        retry_at: at,
                        binding: Some(q),
                    });
                }
            }
        }
        (denied, would)
    }
}

/// All quotas of one upstream behind one lock.
pub struct Ledger {
    shared: Arc<Shared>,
    board: Arc<WaitingBoard>,
}

/// One quota's config as the ledger holds it now (a reload replaces the set, not this one).
pub struct QuotaRef {
    all: Arc<Vec<QuotaConfig>>,
    at: usize,
}

impl std::ops::Deref for QuotaRef {
    type Target = QuotaConfig;
    fn deref(&self) -> &QuotaConfig {
        &self.all[self.at]
    }
}

/// What clients and classes get of each quota: weights, caps and the reserves.
fn sharing(configs: &[QuotaConfig], clients: &[ClientConfig], fairness: Fairness) -> Sharing {
    let caps = configs
        .iter()
        .map(|q| {
            clients
                .iter()
                .map(|c| {
                    c.caps
                        .iter()
                        .find(|(n, _)| *n == q.name)
                        .map(|(_, cap)| *cap)
                })
                .collect()
        })
        .collect();
    Sharing {
        weights: clients.iter().map(|c| c.weight).collect(),
        caps,
        fairness,
    }
}

impl Ledger {
    /// A ledger with one client (`default`) and no live/drain reserves.
    pub fn new(configs: &[QuotaConfig], pace: Option<Pace>, now: Time) -> Ledger {
        let default = ClientConfig::default_client();
        Ledger::shared_by(configs, pace, now, &[default], Fairness::NONE)
    }

    /// Reads are expected on these quotas (a route of class `read` spends them): the reads'
    /// reserve holds from `now`, as if a read had just asked, so a burst of writes at the start
    /// cannot take the room of the first searches.
    pub fn expect_reads(&self, quotas: &[QuotaId], now: Time) {
        let mut inner = self.lock();
        for q in quotas {
            inner.quotas[q.0].last_read = inner.quotas[q.0].last_read.max(now);
        }
    }

    /// The ledger a config describes: its quotas, pacing, clients and fairness.
    pub fn for_config(config: &crate::config::Config, now: Time) -> Ledger {
        Ledger::shared_by(
            &config.quotas,
            config.upstream.pace,
            now,
            &config.clients,
            config.fairness,
        )
    }

    /// A ledger whose quotas are shared by `clients` (weights, caps) under `fairness`.
    pub fn shared_by(
        configs: &[QuotaConfig],
        pace: Option<Pace>,
        now: Time,
        clients: &[ClientConfig],
        fairness: Fairness,
    ) -> Ledger {
        Ledger {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    configs: Arc::new(configs.to_vec()),
                    sharing: sharing(configs, clients, fairness),
                    quotas: configs
                        .iter()
                        .map(|q| QuotaState {
                            window: Window::new(q),
                            frozen_until: Time::ZERO,
                            grants: 0,
                            cap: q.sync.as_ref().map(|_| start_probe(q, now)),
                            crm_remaining: None,
                            crm_limit: None,
                            outstanding: 0,
                            keyed: (!q.key.is_empty()).then(|| Keyed::new(q)),
                            clients: clients
                                .iter()
                                .map(|_| ClientUse::new(q.window, q.margin))
                                .collect(),
                            live_use: ClientUse::new(q.window, q.margin),
                            drain_use: ClientUse::new(q.window, q.margin),
                            read_use: ClientUse::new(q.window, q.margin),
                            live_refused: ClientUse::new(q.window, q.margin),
                            read_refused: ClientUse::new(q.window, q.margin),
                            last_live: now,
                            last_read: Time::ZERO,
                            held_until: Time::ZERO,
                            fallback: None,
                            throttles: 0,
                            capped_before: false,
                        })
                        .collect(),
                    pacer: pace.map(|p| Pacer::new(p, now)),
                    journal: None,
                }),
                released: Notify::new(),
                configs_id: AtomicU64::new(next_configs_id()),
                throttled: AtomicBool::new(false),
            }),
            board: Arc::new(WaitingBoard::new(configs.len(), clients.len())),
        }
    }

    /// The board on which the queue marks parked writes waiting (shared with it).
    pub fn board(&self) -> Arc<WaitingBoard> {
        self.board.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    /// Completes when a request on a synced quota got its answer (a careful quota may go on).
    pub async fn released(&self) {
        self.shared.released.notified().await
    }

    pub fn config(&self, id: QuotaId) -> QuotaRef {
        QuotaRef {
            all: self.configs(),
            at: id.0,
        }
    }

    /// Every quota's config as the ledger holds it now.
    pub fn configs(&self) -> Arc<Vec<QuotaConfig>> {
        self.lock().configs.clone()
    }

    /// A number for the configs the ledger holds now, another after each reload and unique in
    /// the process: what is derived from the configs alone can be kept under it and checked
    /// with one load, without taking the lock or the configs.
    pub fn configs_id(&self) -> u64 {
        self.shared.configs_id.load(Ordering::Acquire)
    }

    /// The configs the ledger holds now, and their number ([`Ledger::configs_id`]).
    pub fn configs_with_id(&self) -> (Arc<Vec<QuotaConfig>>, u64) {
        let inner = self.lock();
        (inner.configs.clone(), self.configs_id())
    }

    /// Charges every quota of `d` if all of them have room now; otherwise charges none.
    pub fn try_acquire(&self, d: &Demand<'_>, now: Time) -> Result<Grant, Denied> {
        let mut inner = self.lock();
        let (denied, would) = inner.blocked(&self.board, d, now);
        if let Some(denied) = denied {
            return Err(denied);
        }
        if let Some(pacer) = &inner.pacer
            && let Err(at) = pacer.check(now)
        {
            return Err(Denied {
                retry_at: at,
                binding: None,
            });
        }
        Ok(Self::charge(&mut inner, &self.shared, d, would, now))
    }

    /// Shadow mode: charges `d` whatever the budget says (the CRM counts the call all the
    /// same); the grant tells what enforcing would have done.
    pub fn acquire_anyway(&self, d: &Demand<'_>, now: Time) -> Grant {
        let mut inner = self.lock();
        let (denied, would) = inner.blocked(&self.board, d, now);
        let mut would = match (denied, would) {
            (Some(a), Some(b)) => Some(if b.retry_at > a.retry_at { b } else { a }),
            (a, b) => a.or(b),
        };
        if let Some(pacer) = &inner.pacer
            && let Err(at) = pacer.check(now)
            && would.is_none()
        {
            would = Some(Denied {
                retry_at: at,
                binding: None,
            });
        }
        Self::charge(&mut inner, &self.shared, d, would, now)
    }

    /// Charges every quota of `d` and returns the grant.
    fn charge(
        inner: &mut Inner,
        shared: &Arc<Shared>,
        d: &Demand<'_>,
        would: Option<Denied>,
        now: Time,
    ) -> Grant {
        // Only synced quotas need marks and count answers outstanding.
        let mut marks = Vec::new();
        for &q in d.quotas {
            let state = &mut inner.quotas[q.0];
            match &mut state.keyed {
                Some(keyed) => keyed.charge(&Arc::from(d.key(q)), now),
                None => {
                    if let Some(f) = &mut state.fallback
                        && now < f.first_end
                    {
                        f.first_left = f.first_left.saturating_sub(1);
                    }
                    if let Some(journal) = &mut inner.journal {
                        journal.push((q, now));
                    }
                    state.window.charge(now);
                    state.clients[d.client.0].charge(now);
                    if d.live {
                        state.live_use.charge(now);
                    } else {
                        state.drain_use.charge(now);
                    }
                    if d.read {
                        state.read_use.charge(now);
                    }
                }
            }
            state.grants += 1;
            if inner.configs[q.0].sync.is_some() {
                state.outstanding += 1;
                marks.push((q, state.grants));
            }
        }
        let shared = (!marks.is_empty()).then(|| shared.clone());
        Grant {
            at: now,
            client: d.client.0 as u32,
            live: d.live,
            read: d.read,
            scheduled: d.held_to_schedule(),
            marks,
            shared,
            remote: None,
            would,
        }
    }

    /// Takes back what `grant` charged to `quotas` (unkeyed ones) in this process: its call
    /// never reached the CRM, so the slot is free again. What the shared ledger or the grant log
    /// recorded stays counted (the safe side: a slot too few, never one too many).
    pub fn refund(&self, grant: &Grant, quotas: &[QuotaId], now: Time) {
        if grant.remote.is_some() {
            return;
        }
        let mut inner = self.lock();
        for &q in quotas {
            let Some(state) = inner.quotas.get_mut(q.0) else {
                continue;
            };
            if state.keyed.is_some() {
                continue;
            }
            state.window.refund(grant.at, now);
            if let Some(c) = state.clients.get_mut(grant.client as usize) {
                c.refund(grant.at);
            }
            if grant.live {
                state.live_use.refund(grant.at);
            } else {
                state.drain_use.refund(grant.at);
            }
            if grant.read {
                state.read_use.refund(grant.at);
            }
        }
    }

    /// Whether `try_acquire` would grant now, without charging (the pacer is not consulted).
    pub fn check(&self, d: &Demand<'_>, now: Time) -> Result<(), Denied> {
        self.lock()
            .blocked(&self.board, d, now)
            .0
            .map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
