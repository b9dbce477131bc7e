//! What the proxy shows of itself: each client's and keyed quota's state for `/status`, and the
//! gauges copied from the running aggregates at scrape time.

use serde::Serialize;

use super::Proxy;
use crate::clock::Time;
use crate::queue::QueueStatus;
use crate::quota::Forecast;

/// One client's state for metrics and `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub name: String,
    pub weight: u32,
    /// Per unkeyed quota: calls of this client in the current window, and their share of the limit.
    pub quotas: Vec<ClientQuotaView>,
    pub parked: usize,
    pub oldest_parked_age_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientQuotaView {
    pub quota: String,
    pub used: u64,
    pub share: f64,
}

/// A keyed quota's memory for metrics and `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct KeysView {
    pub quota: String,
    pub tracked: usize,
    pub overflowed: u64,
}

impl Proxy {
    /// Each client's use of the quotas and its parked writes, for `/status` and metrics.
    pub fn client_views(&self, queue: &QueueStatus, now: Time) -> Vec<ClientView> {
        let uses = self.ledger.client_use(now);
        self.clients()
            .all()
            .iter()
            .enumerate()
            .map(|(c, cfg)| {
                let lanes = queue.lanes.iter().filter(|l| l.client == cfg.name);
                ClientView {
                    name: cfg.name.clone(),
                    weight: cfg.weight,
                    quotas: self
                        .config()
                        .quotas
                        .iter()
                        .enumerate()
                        .filter(|(_, q)| q.key.is_empty())
                        .map(|(q, qc)| ClientQuotaView {
                            quota: qc.name.clone(),
                            used: uses[c][q],
                            share: uses[c][q] as f64 / f64::from(qc.limit),
                        })
                        .collect(),
                    parked: lanes.clone().map(|l| l.depth).sum(),
                    oldest_parked_age_seconds: lanes
                        .map(|l| l.oldest_age_seconds)
                        .fold(0.0, f64::max),
                }
            })
            .collect()
    }

    /// The outlook of each daily (long fixed) quota: when it runs out, and how much of the
    /// backlog it can still carry (account-wide counts with the shared ledger).
    pub fn forecasts(&self, now: Time) -> Vec<Forecast> {
        let (backlog, _) = self.queue.backlog(now);
        self.ledger.forecasts(
            &|q| backlog.get(&q).copied().unwrap_or(0),
            &|q, bounds| self.shared.account_used(q, bounds),
            now,
        )
    }

    /// The keyed quotas' memory.
    pub fn keys_views(&self) -> Vec<KeysView> {
        self.ledger
            .keys()
            .into_iter()
            .map(|(q, tracked, overflowed)| KeysView {
                quota: self.ledger.config(q).name.clone(),
                tracked,
                overflowed,
            })
            .collect()
    }

    /// Copies the ledger's, queue's, store's and clients' state into the gauges (at scrape
    /// time), from their running aggregates.
    pub fn refresh_metrics(&self, now: Time) {
        let m = &self.metrics;
        for q in self.ledger.snapshot(now) {
            m.set_quota(
                &q.name,
                q.limit,
                q.used,
                q.remaining,
                q.frozen_until.is_some(),
            );
            for c in q.classes {
                m.set_quota_class(&q.name, c.class, c.used, c.reserved);
            }
        }
        for (name, c) in [("data", &self.data_conns), ("admin", &self.admin_conns)] {
            use std::sync::atomic::Ordering::Relaxed;
            m.set_connections(
                name,
                c.open.load(Relaxed),
                [
                    c.over_cap.load(Relaxed),
                    c.header_timeouts.load(Relaxed),
                    c.idle_closed.load(Relaxed),
                ],
                c.accept_errors.load(Relaxed),
            );
        }
        m.set_breaker_open(self.breaker.view().open);
        m.set_request_bytes_buffered(
            self.intake
                .buffered(self.config().listen.max_buffered_bytes),
        );
        let queue = self.queue.overview(&self.ledger, now);
        m.set_drain_eta(queue.drain_eta_seconds);
        for f in self.forecasts(now) {
            m.set_forecast(
                &f.quota,
                f.exhaustion_eta_seconds.unwrap_or(f.seconds_to_reset),
                f.business_left_seconds,
                f.backlog_calls,
                f.backlog_deliverable,
                f.released,
            );
        }
        // The queue keeps a lane per (client, quotas); the metric is per quota set.
        let mut by_name: Vec<(&str, usize, f64)> = Vec::new();
        for lane in &queue.lanes {
            match by_name.iter_mut().find(|(n, _, _)| *n == lane.name) {
                Some(e) => {
                    e.1 += lane.depth;
                    e.2 = e.2.max(lane.oldest_age_seconds);
                }
                None => by_name.push((&lane.name, lane.depth, lane.oldest_age_seconds)),
            }
        }
        for (name, depth, oldest) in by_name {
            m.set_lane(name, depth, oldest);
        }
        m.set_queue(
            queue.entries,
            queue.bytes,
            queue.dispatching,
            queue.failed + queue.expired,
        );
        if let Some(stats) = self.queue.store_stats() {
            use std::sync::atomic::Ordering::Relaxed;
            m.set_store(
                stats.log_bytes.load(Relaxed),
                stats.commits.load(Relaxed),
                stats.errors.load(Relaxed),
                stats.sync_nanos.load(Relaxed) as f64 / 1e9,
            );
        }
        for c in self.client_views(&queue, now) {
            for q in &c.quotas {
                m.set_client_quota(&c.name, &q.quota, q.used, q.share);
            }
            m.set_client_queue(&c.name, c.parked, c.oldest_parked_age_seconds);
        }
        for k in self.keys_views() {
            m.set_quota_keys(&k.quota, k.tracked, k.overflowed);
        }
    }
}
