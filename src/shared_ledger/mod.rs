//! Where quota counts are decided: one interface, two implementations. `Local`: this process's
//! ledger ([`crate::quota::Ledger`]) is the whole truth. `Redis`: every replica spending one CRM
//! account asks one ledger in Redis before each call to the CRM (one script call, all or
//! nothing, exact), shares what the CRM's answers say, and keeps to its own share of each quota
//! while Redis is unreachable. The process's ledger stays the fast first check either way: it
//! keeps fairness between this replica's clients, and its grants are what the replica re-seeds
//! a Redis that lost its state with.

mod redis;
mod spec;

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

use crate::clock::{SharedClock, Time};
use crate::config::{Config, LedgerConfig};
use crate::crm::Observation;
use crate::ids::QuotaId;
use crate::metrics::Metrics;
use crate::quota::{Grant, Ledger};
use redis::RedisLedger;

/// The shared ledger's answer to a grant this process already made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it.
    Granted,
    /// No room account-wide (another replica spent it): try again at `retry_at`.
    Denied {
        retry_at: Time,
        binding: Option<QuotaId>,
    },
}

/// What a request consumes, as [`SharedLedger::admit`] asks it: each of `quotas` with its key
/// from `keys` when it is keyed.
pub fn demand(
    quotas: &[QuotaId],
    keys: &[(QuotaId, Arc<str>)],
) -> Vec<(QuotaId, Option<Arc<str>>)> {
    quotas
        .iter()
        .map(|&q| {
            (
                q,
                keys.iter().find(|(k, _)| *k == q).map(|(_, k)| k.clone()),
            )
        })
        .collect()
}

/// What a CRM answer said of a synced quota, waiting to be handed to the shared ledger.
#[derive(Debug, Clone)]
pub struct PendingObservation {
    pub quota: QuotaId,
    /// The shared ledger's grant count after the request the answer belongs to.
    pub mark: u64,
    pub remaining: Option<u64>,
    pub limit: Option<u64>,
    pub reset: Option<Time>,
    /// How long a report without a reset holds.
    pub hold: Time,
    pub cost: Option<u64>,
}

/// Updates for the shared ledger, handed over with the next call.
#[derive(Debug, Default, Clone)]
pub struct Pending {
    /// In-flight requests answered: `(quota, member)`.
    pub released: Vec<(QuotaId, String)>,
    /// Throttle pauses.
    pub frozen: Vec<(QuotaId, Time)>,
    pub observed: Vec<PendingObservation>,
    /// Pauses and ceilings an operator lifted.
    pub lifted: Vec<QuotaId>,
}

/// The ledger's state for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerView {
    pub store: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
    /// Every grant is decided by the shared ledger (always true for `local`).
    pub shared: bool,
    /// Since when this replica keeps to its own share (the shared ledger unreachable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_its_own_since: Option<String>,
    pub replicas_seen: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Where quota counts are decided.
pub enum SharedLedger {
    Local,
    Redis(Box<RedisLedger>),
}

impl SharedLedger {
    /// The shared ledger `config` names.
    pub fn new(
        config: &Config,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Result<SharedLedger, String> {
        Ok(match &config.ledger {
            LedgerConfig::Local => SharedLedger::Local,
            LedgerConfig::Redis(cfg) => SharedLedger::Redis(Box::new(RedisLedger::new(
                cfg.clone(),
                config.quotas.clone(),
                config.upstream.request_timeout,
                clock,
                metrics,
            )?)),
        })
    }

    /// Joins the shared ledger before the proxy serves (nothing to do for `local`).
    pub async fn start(&self, ledger: &Ledger) {
        if let SharedLedger::Redis(r) = self {
            r.start(ledger).await;
        }
    }

    /// Keeps the shared ledger informed until `stop`, and rejoins it after an outage.
    pub async fn run(&self, ledger: &Ledger, stop: watch::Receiver<bool>) {
        if let SharedLedger::Redis(r) = self {
            r.run(ledger, stop).await;
        }
    }

    /// Whether what `grant` (made by this process's ledger) consumes may go to the CRM: each
    /// quota with its key when it is keyed (a quota may appear once per key: a batch call).
    pub async fn admit(
        &self,
        ledger: &Ledger,
        demand: &[(QuotaId, Option<Arc<str>>)],
        grant: &mut Grant,
        now: Time,
    ) -> Admission {
        match self {
            SharedLedger::Local => Admission::Granted,
            SharedLedger::Redis(r) => r.admit(ledger, demand, grant, now).await,
        }
    }

    /// Hands what a CRM answer said of the synced quotas `grant` consumed to the shared ledger.
    pub fn observe(&self, observations: &[Observation], grant: &Grant, ledger: &Ledger, now: Time) {
        let SharedLedger::Redis(r) = self else { return };
        let Some(remote) = &grant.remote else { return };
        let mut found = Vec::new();
        for &(q, mark) in &remote.marks {
            let cfg = ledger.config(q);
            let Some(obs) = cfg
                .sync
                .as_deref()
                .and_then(|scope| observations.iter().find(|o| o.scope == scope))
            else {
                continue;
            };
            found.push(PendingObservation {
                quota: q,
                mark,
                remaining: obs.remaining,
                limit: obs.limit,
                reset: obs.reset,
                hold: ledger.default_hold_until(q, now),
                cost: obs.cost,
            });
        }
        if !found.is_empty() {
            lock(&r.pending()).observed.extend(found);
        }
    }

    /// Hands a throttle pause to the shared ledger, so every replica pauses.
    pub fn freeze(&self, pauses: &[(QuotaId, Time)]) {
        if let SharedLedger::Redis(r) = self {
            lock(&r.pending()).frozen.extend_from_slice(pauses);
        }
    }

    /// Lifts a quota's pause and ceiling in the shared ledger too.
    pub fn resume(&self, q: QuotaId) {
        if let SharedLedger::Redis(r) = self {
            lock(&r.pending()).lifted.push(q);
        }
    }

    /// The shared ledger's count of unkeyed quota `q` in the fixed window `bounds`, as last
    /// read (`None` with the local ledger, or when the last reading is of another window).
    pub fn account_used(&self, q: QuotaId, bounds: (Time, Time)) -> Option<u64> {
        match self {
            SharedLedger::Local => None,
            SharedLedger::Redis(r) => r.account_used(q, bounds),
        }
    }

    pub fn view(&self) -> LedgerView {
        match self {
            SharedLedger::Local => LedgerView {
                store: "local",
                url: None,
                key_prefix: None,
                replica_id: None,
                shared: true,
                on_its_own_since: None,
                replicas_seen: 1,
                last_error: None,
            },
            SharedLedger::Redis(r) => r.view(),
        }
    }
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
