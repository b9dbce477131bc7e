//! A replica's membership of the shared ledger: joining at start, heartbeats, going on its own
//! share when Redis is unreachable, handing over what it granted meanwhile and rejoining, and
//! re-seeding a ledger that lost its state.

use std::collections::BTreeSet;

use tokio::sync::watch;

use super::{HEARTBEAT, Link, Mode, RESEED_WAIT, RETRY, RedisLedger, int, random_hex, text};
use crate::clock::Time;
use crate::ids::QuotaId;
use crate::quota::window::Shadow;
use crate::quota::{Fallback, Ledger};
use crate::shared_ledger::spec::{self, Keys, SyncSpec};

impl RedisLedger {
    /// The ledger is unreachable: from now on this replica keeps to its share of each quota.
    pub(super) fn go_on_its_own(&self, link: &mut Link, ledger: &Ledger, now: Time, why: &str) {
        link.last_error = Some(why.to_string());
        if link.mode == Mode::OnItsOwn {
            return;
        }
        link.mode = Mode::OnItsOwn;
        link.since = Some(now);
        let n = u64::from(self.cfg.replicas.max(link.seen).max(1));
        for (i, q) in self.quotas.iter().enumerate() {
            let q_id = QuotaId(i);
            let span = q.window + q.margin;
            let limit = u64::from(q.limit);
            let per_window = limit / n;
            // Until every grant made before now has left the window, this replica adds at most
            // its share of what the ledger last said was left (less what the others may have
            // granted since, at the limit's pace), and never more than its share of the limit.
            let (first_end, first_left) = match link.last[i] {
                Some((count, at)) => {
                    let stale = now.saturating_since(at).as_secs_f64() / q.window.as_secs_f64();
                    let since = (limit as f64 * stale).ceil() as u64;
                    let own = u64::from(ledger.used(q_id, now));
                    (
                        ledger
                            .fixed_bounds(q_id, now)
                            .map_or(now + span, |(_, end)| end),
                        (limit.saturating_sub(count + since) / n)
                            .min(per_window.saturating_sub(own)),
                    )
                }
                // Nothing known of what the others spent: nothing more until a window passed.
                None => (
                    ledger
                        .fixed_bounds(q_id, now)
                        .map_or(now + span, |(_, end)| end),
                    0,
                ),
            };
            ledger.set_fallback(
                q_id,
                Some(Fallback {
                    first_end,
                    first_left,
                    per_window: u32::try_from(per_window).unwrap_or(u32::MAX),
                }),
            );
        }
        ledger.journal(true);
        self.metrics.ledger_shared(false);
        tracing::warn!(
            error = why,
            replicas = n,
            "the shared ledger cannot be reached; this replica keeps to its share (1/{n}) of each quota until it can"
        );
    }

    /// Hands the ledger what it does not know and, unless it must wait for other replicas to
    /// re-seed it, goes back to deciding every grant there.
    async fn rejoin(&self, ledger: &Ledger) {
        if !self.push(ledger).await {
            return;
        }
        let now = self.clock.now();
        {
            let mut link = self.link();
            if link.mode == Mode::Shared {
                return;
            }
            // From here every grant is asked of the ledger; what was granted on this replica's
            // own until now is handed over next (a grant in between may count twice: never
            // less than it should).
            self.back_to_shared(&mut link, ledger, now);
        }
        let rest = ledger.end_journal();
        if !rest.is_empty() {
            self.link().unpushed.extend(rest);
            if !self.push(ledger).await {
                let now = self.clock.now();
                let mut link = self.link();
                self.go_on_its_own(&mut link, ledger, now, "cannot hand over the last grants");
            }
        }
    }

    /// One sync: pushes every grant in open windows (when the ledger may have lost them) or the
    /// grants journaled on this replica's own. Whether the replica may share again.
    async fn push(&self, ledger: &Ledger) -> bool {
        let now = self.clock.now();
        let (full, epoch, offset) = {
            let link = self.link();
            (
                link.full_push || link.epoch.is_empty(),
                link.epoch.clone(),
                link.offset_ns,
            )
        };
        let mut journal = std::mem::take(&mut self.link().unpushed);
        journal.extend(ledger.take_journal());
        let shadows: Vec<(QuotaId, Shadow)> = if full {
            ledger.shadow(now)
        } else {
            journal_shadows(ledger, &journal)
        };
        let mut keys = Keys::new(&self.tag, &["synced"]);
        let push = shadows
            .iter()
            .filter_map(|(q, s)| spec::push(&mut keys, &self.quotas[q.0], s, offset))
            .collect();
        let spec = SyncSpec {
            t: None,
            e: epoch.clone(),
            sil: self.silence_us(),
            new: random_hex(8),
            full,
            r: self.cfg.replica_id.clone(),
            g: self.member(),
            push,
        };
        let json = serde_json::to_string(&spec).expect("a spec is JSON");
        let reply = self.call(&self.sync, &keys, json).await;
        let now = self.clock.now();
        let mut link = self.link();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                if !full {
                    link.unpushed.extend(journal);
                }
                link.last_error = Some(e);
                return false;
            }
        };
        if int(&reply[0]) == -1 {
            link.full_push = true;
            return false;
        }
        let created = int(&reply[0]) == 1;
        let ledger_epoch = reply.get(2).map(text).unwrap_or_default();
        link.offset_ns =
            i128::from(reply.get(1).map_or(0, int)) * 1_000 - i128::from(now.as_nanos());
        let synced: BTreeSet<String> = reply.iter().skip(3).map(text).collect();
        if created || (!epoch.is_empty() && ledger_epoch != epoch) {
            let others: BTreeSet<String> = link
                .peers
                .iter()
                .filter(|p| **p != self.cfg.replica_id)
                .cloned()
                .collect();
            if created && !epoch.is_empty() {
                tracing::warn!(
                    waiting_for = others.len(),
                    "the shared ledger had lost its state; this replica re-seeded it with its own grants"
                );
            }
            link.waiting_for = Some((others, now + RESEED_WAIT));
        }
        link.epoch = ledger_epoch;
        link.full_push = false;
        if let Some((others, until)) = &link.waiting_for {
            if others.difference(&synced).next().is_some() && now < *until {
                return false; // keep to this replica's share until the others re-seeded too
            }
            link.waiting_for = None;
        }
        true
    }

    fn back_to_shared(&self, link: &mut Link, ledger: &Ledger, now: Time) {
        for i in 0..self.quotas.len() {
            ledger.set_fallback(QuotaId(i), None);
        }
        if let Some(since) = link.since.take() {
            self.metrics
                .ledger_fallback_seconds(now.saturating_since(since).as_secs_f64());
            tracing::info!(
                after = ?now.saturating_since(since),
                "the shared ledger answers again; every grant is decided there"
            );
        }
        link.mode = Mode::Shared;
        link.last_error = None;
        self.metrics.ledger_shared(true);
    }

    /// Tells the ledger this replica is alive, hands over what it learned, reads the counts.
    async fn heartbeat(&self, ledger: &Ledger) {
        let now = self.clock.now();
        let unkeyed: Vec<(QuotaId, Option<&str>)> = (0..self.quotas.len())
            .filter(|&i| self.quotas[i].key.is_empty())
            .map(|i| (QuotaId(i), None))
            .collect();
        let pending = self.take_pending();
        let (keys, spec) = {
            let link = self.link();
            self.decide_spec(ledger, &link, &unkeyed, None, false, pending.clone(), now)
        };
        let json = serde_json::to_string(&spec).expect("a spec is JSON");
        let reply = self.call(&self.decide, &keys, json).await;
        if reply.is_err() {
            self.requeue(pending);
        }
        let now = self.clock.now();
        let mut link = self.link();
        match reply {
            Ok(r) if int(&r[0]) == 2 => {
                self.learn_clock(&mut link, &r, now);
                for (i, &(q, _)) in unkeyed.iter().enumerate() {
                    let count = r.get(4 + i).map_or(0, int);
                    link.last[q.0] = Some((u64::try_from(count).unwrap_or(0), now));
                }
                link.peers = r.iter().skip(4 + unkeyed.len()).map(text).collect();
            }
            Ok(r) if int(&r[0]) == -1 => {
                link.full_push = true;
                self.go_on_its_own(&mut link, ledger, now, "the ledger's epoch changed");
            }
            Ok(_) => {}
            Err(e) => self.go_on_its_own(&mut link, ledger, now, &e),
        }
    }

    /// Joins the ledger at start (before serving, so the first requests are decided there);
    /// when it cannot, the replica starts on its own share.
    pub async fn start(&self, ledger: &Ledger) {
        let joined = self.push(ledger).await;
        let now = self.clock.now();
        {
            let mut link = self.link();
            // Start as if shared, so that going on its own sets the shares (and says why).
            link.mode = Mode::Shared;
            if joined {
                self.metrics.ledger_shared(true);
                tracing::info!(
                    url = %self.cfg.display_url(),
                    key_prefix = %self.cfg.key_prefix,
                    replica = %self.cfg.replica_id,
                    "joined the shared ledger"
                );
            } else {
                let why = link
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "waiting for other replicas to re-seed it".into());
                self.go_on_its_own(&mut link, ledger, now, &why);
            }
        }
        self.check_settings().await;
    }

    /// Warns when Redis may evict the ledger's keys or forget them at a restart.
    async fn check_settings(&self) {
        let mut conn = self.conn.clone();
        let get = |name: &'static str| {
            let mut conn = conn.clone();
            async move {
                let v: Result<Vec<String>, _> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut conn)
                    .await;
                v.ok().and_then(|v| v.get(1).cloned())
            }
        };
        if let Some(policy) = get("maxmemory-policy").await
            && policy != "noeviction"
        {
            tracing::warn!(
                policy,
                "Redis may evict keys (maxmemory-policy is not noeviction): an evicted count lets a limit be exceeded; set maxmemory-policy noeviction"
            );
        }
        let aof = get("appendonly").await;
        let fsync = get("appendfsync").await;
        if aof.is_some() && (aof.as_deref() != Some("yes") || fsync.as_deref() != Some("always")) {
            tracing::warn!(
                appendonly = aof.as_deref().unwrap_or("?"),
                appendfsync = fsync.as_deref().unwrap_or("?"),
                "Redis does not persist every write (appendonly yes, appendfsync always): after a Redis restart the replicas re-seed it from their own records, which cannot know a replica that died meanwhile"
            );
        }
        let _ = redis::cmd("PING").query_async::<String>(&mut conn).await;
    }

    /// Heartbeats while shared, tries to rejoin while on its own; leaves the ledger at `stop`.
    pub async fn run(&self, ledger: &Ledger, mut stop: watch::Receiver<bool>) {
        loop {
            let mode = self.link().mode;
            let wait = if mode == Mode::Shared {
                HEARTBEAT
            } else {
                RETRY
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                let mut conn = self.conn.clone();
                let key = format!("{}:replicas", self.tag);
                let _ = tokio::time::timeout(
                    self.cfg.timeout,
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&self.cfg.replica_id)
                        .query_async::<i64>(&mut conn),
                )
                .await;
                return;
            }
            match mode {
                Mode::Shared => self.heartbeat(ledger).await,
                Mode::OnItsOwn => self.rejoin(ledger).await,
            }
        }
    }
}

/// Grants journaled while on its own, per quota, as the ledger takes them in.
fn journal_shadows(ledger: &Ledger, journal: &[(QuotaId, Time)]) -> Vec<(QuotaId, Shadow)> {
    let mut out: Vec<(QuotaId, Shadow)> = Vec::new();
    for &(q, t) in journal {
        match ledger.fixed_bounds(q, t) {
            Some((start, end)) => {
                match out.iter_mut().find(|(oq, s)| {
                    *oq == q && matches!(s, Shadow::Count { start: s0, .. } if *s0 == start)
                }) {
                    Some((_, Shadow::Count { count, .. })) => *count += 1,
                    _ => out.push((
                        q,
                        Shadow::Count {
                            start,
                            end,
                            count: 1,
                        },
                    )),
                }
            }
            None => match out.iter_mut().find(|(oq, _)| *oq == q) {
                Some((_, Shadow::Times(times))) => times.push(t),
                _ => out.push((q, Shadow::Times(vec![t]))),
            },
        }
    }
    out
}
