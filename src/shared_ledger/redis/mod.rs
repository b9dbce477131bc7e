//! The shared ledger on Redis: one script call per decision (all or nothing, exact), CRM
//! corrections and in-flight counts shared between replicas, and a replica's own fallback share
//! while Redis is unreachable, re-joined (and re-seeded, when Redis lost its state) afterwards.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use ring::rand::{SecureRandom, SystemRandom};

mod membership;

use super::spec::{self, DecideSpec, Keys, ObservationSpec, Updates};
use super::{Admission, LedgerView, Pending};
use crate::clock::{SharedClock, Time};
use crate::config::{QuotaConfig, RedisLedgerConfig};
use crate::ids::QuotaId;
use crate::metrics::Metrics;
use crate::quota::{Grant, Ledger, Remote};

/// A replica that has not called the ledger for its heartbeat interval, a call's timeout and
/// this slack may be deciding on its own (its call failed): the others leave its share to it.
const SILENCE_SLACK: Duration = Duration::from_millis(250);
/// After a replica is unheard for this long it is forgotten (no share is left to it).
const FORGET: Duration = Duration::from_secs(86_400 + 3_600);
/// How often a replica tells the ledger it is alive, hands over what it learned and reads the
/// counts (what its share is computed from if the ledger becomes unreachable).
const HEARTBEAT: Duration = Duration::from_millis(100);
/// How often a replica deciding on its own tries to reach the ledger again.
const RETRY: Duration = Duration::from_millis(250);
/// After the ledger lost its state, how long the replicas that re-seeded it wait for the others
/// they knew before granting from it again.
const RESEED_WAIT: Duration = Duration::from_secs(30);
/// In-flight requests count in the ledger this much longer than the request timeout, so a
/// replica that dies leaves no stuck count.
const IN_FLIGHT_SLACK: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every grant is decided by the ledger.
    Shared,
    /// The ledger is unreachable (or not yet re-seeded): this replica keeps to its share.
    OnItsOwn,
}

struct Link {
    mode: Mode,
    /// The epoch this replica synced in (`""` before its first sync).
    epoch: String,
    /// The ledger's clock minus this replica's, in nanoseconds.
    offset_ns: i128,
    /// Per quota: the count the ledger last reported for its window, and when (this clock).
    last: Vec<Option<(u64, Time)>>,
    /// Most replicas seen alive at once, and the others alive at the last look.
    seen: u32,
    peers: BTreeSet<String>,
    since: Option<Time>,
    /// The next sync pushes every grant in open windows (the ledger may have lost its state).
    full_push: bool,
    /// After a re-seed: the replicas still to sync, and until when to wait for them.
    waiting_for: Option<(BTreeSet<String>, Time)>,
    /// Grants made on this replica's own that could not be handed over yet.
    unpushed: Vec<(QuotaId, Time)>,
    last_error: Option<String>,
}

pub struct RedisLedger {
    cfg: RedisLedgerConfig,
    tag: String,
    quotas: Vec<QuotaConfig>,
    conn: ConnectionManager,
    decide: Script,
    sync: Script,
    /// Unique per process start: grant members never collide with a previous run's.
    instance: String,
    seq: AtomicU64,
    out_ttl: Duration,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    link: Mutex<Link>,
    pending: Arc<Mutex<Pending>>,
}

/// Random hex, for ids.
fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let _ = SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        _ => String::new(),
    }
}

impl RedisLedger {
    /// A client for the ledger `cfg` names (connecting lazily: Redis may be down at start).
    pub fn new(
        cfg: RedisLedgerConfig,
        quotas: Vec<QuotaConfig>,
        request_timeout: Duration,
        clock: SharedClock,
        metrics: Arc<Metrics>,
    ) -> Result<RedisLedger, String> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| format!("ledger.url {}: {e}", cfg.display_url()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(cfg.timeout))
            .set_connection_timeout(Some(cfg.timeout.max(Duration::from_millis(100))))
            .set_number_of_retries(1)
            .set_max_delay(RETRY);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("ledger.url {}: {e}", cfg.display_url()))?;
        let n = quotas.len();
        Ok(RedisLedger {
            tag: spec::tag(&cfg.key_prefix),
            cfg,
            quotas,
            conn,
            decide: Script::new(concat!(
                include_str!("../clock.lua"),
                include_str!("../decide.lua")
            )),
            sync: Script::new(concat!(
                include_str!("../clock.lua"),
                include_str!("../sync.lua")
            )),
            instance: random_hex(4),
            seq: AtomicU64::new(0),
            out_ttl: request_timeout + IN_FLIGHT_SLACK,
            clock,
            metrics,
            link: Mutex::new(Link {
                mode: Mode::OnItsOwn,
                epoch: String::new(),
                offset_ns: 0,
                last: vec![None; n],
                seen: 1,
                peers: BTreeSet::new(),
                since: None,
                full_push: true,
                waiting_for: None,
                unpushed: Vec::new(),
                last_error: None,
            }),
            pending: Arc::new(Mutex::new(Pending::default())),
        })
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a replica may go unheard before its share is left to it, in microseconds.
    fn silence_us(&self) -> u64 {
        u64::try_from((HEARTBEAT + self.cfg.timeout + SILENCE_SLACK).as_micros())
            .unwrap_or(u64::MAX)
    }

    /// Takes the updates queued for the next call.
    fn take_pending(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Queues updates a failed call did not hand over. Each is safe to apply twice: a release
    /// removes a member, a pause keeps the latest end, an observation the newest mark.
    fn requeue(&self, p: Pending) {
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        q.released.extend(p.released);
        q.frozen.extend(p.frozen);
        q.observed.extend(p.observed);
        q.lifted.extend(p.lifted);
    }

    pub fn pending(&self) -> Arc<Mutex<Pending>> {
        self.pending.clone()
    }

    fn member(&self) -> String {
        format!(
            "{}:{}:{}",
            self.cfg.replica_id,
            self.instance,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn to_ledger(offset_ns: i128, t: Time) -> u64 {
        u64::try_from((i128::from(t.as_nanos()) + offset_ns).max(0) / 1_000).unwrap_or(0)
    }

    fn to_local(offset_ns: i128, us: i64) -> Time {
        Time::from_nanos(
            u64::try_from((i128::from(us) * 1_000 - offset_ns).max(0)).unwrap_or(u64::MAX),
        )
    }

    /// Builds a decision charged to `member` (`None`: a look at the counts, nothing charged);
    /// `parked`: for a parked write, held to the quotas' release schedules.
    #[allow(clippy::too_many_arguments)]
    fn decide_spec(
        &self,
        ledger: &Ledger,
        link: &Link,
        quotas: &[(QuotaId, Option<&str>)],
        member: Option<String>,
        parked: bool,
        pending: Pending,
        now: Time,
    ) -> (Keys, DecideSpec) {
        let charge = member.is_some();
        let member = member.unwrap_or_else(|| self.member());
        let mut keys = Keys::new(&self.tag, &[]);
        let bounds = |q: QuotaId| move |t: Time| ledger.fixed_bounds(q, t).unwrap_or((t, t));
        let q = quotas
            .iter()
            .map(|&(q, key)| {
                spec::quota(&mut keys, &self.quotas[q.0], key, &bounds(q), parked, now)
            })
            .collect();
        let u = self.updates(&mut keys, ledger, link, pending, now);
        let spec = DecideSpec {
            t: None,
            e: link.epoch.clone(),
            r: self.cfg.replica_id.clone(),
            g: member,
            ot: u64::try_from(self.out_ttl.as_micros()).unwrap_or(u64::MAX),
            sil: self.silence_us(),
            fgt: u64::try_from(FORGET.as_micros()).unwrap_or(u64::MAX),
            n: self.cfg.replicas.max(link.seen),
            charge,
            u,
            q,
        };
        (keys, spec)
    }

    /// The updates queued since the last call, as the script applies them.
    fn updates(
        &self,
        keys: &mut Keys,
        ledger: &Ledger,
        link: &Link,
        p: Pending,
        now: Time,
    ) -> Updates {
        let bounds = |q: QuotaId| move |t: Time| ledger.fixed_bounds(q, t).unwrap_or((t, t));
        let at = |t: Time| Self::to_ledger(link.offset_ns, t);
        Updates {
            rel: p
                .released
                .into_iter()
                .map(|(q, m)| (keys.add(&format!("q:{}:out", self.quotas[q.0].name)), m))
                .collect(),
            lift: p
                .lifted
                .iter()
                .flat_map(|q| {
                    let name = &self.quotas[q.0].name;
                    [
                        keys.add(&format!("q:{name}:frz")),
                        keys.add(&format!("q:{name}:cap")),
                    ]
                })
                .collect(),
            frz: p
                .frozen
                .into_iter()
                .map(|(q, until)| {
                    (
                        keys.add(&format!("q:{}:frz", self.quotas[q.0].name)),
                        at(until),
                    )
                })
                .collect(),
            obs: p
                .observed
                .into_iter()
                .map(|o| ObservationSpec {
                    q: spec::quota(
                        keys,
                        &self.quotas[o.quota.0],
                        None,
                        &bounds(o.quota),
                        false,
                        now,
                    ),
                    mark: o.mark,
                    rem: o.remaining,
                    lim: o.limit,
                    reset: o.reset.map(at),
                    hold: at(o.hold),
                    cost: o.cost,
                })
                .collect(),
        }
    }

    async fn call(&self, script: &Script, keys: &Keys, spec: String) -> Result<Vec<Value>, String> {
        let mut inv = script.prepare_invoke();
        for k in keys.names() {
            inv.key(k);
        }
        inv.arg(spec);
        let mut conn = self.conn.clone();
        let started = tokio::time::Instant::now();
        let result =
            tokio::time::timeout(self.cfg.timeout, inv.invoke_async::<Vec<Value>>(&mut conn)).await;
        self.metrics
            .ledger_call(started.elapsed().as_secs_f64(), result.is_ok());
        match result {
            Err(_) => Err(format!("no answer within {:?}", self.cfg.timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Asks the ledger to grant what `grant` (already granted here) consumes: `quotas` with
    /// their keys.
    pub async fn admit(
        &self,
        ledger: &Ledger,
        demand: &[(QuotaId, Option<Arc<str>>)],
        grant: &mut Grant,
        now: Time,
    ) -> Admission {
        let asked: Vec<(QuotaId, Option<&str>)> = demand
            .iter()
            .map(|(q, key)| {
                let keyed = !self.quotas[q.0].key.is_empty();
                (*q, keyed.then(|| key.as_deref().unwrap_or("")))
            })
            .collect();
        let quotas: Vec<QuotaId> = demand.iter().map(|(q, _)| *q).collect();
        let quotas = &quotas[..];
        let member = self.member();
        let pending = self.take_pending();
        let (call_keys, spec) = {
            let link = self.link();
            if link.mode == Mode::OnItsOwn {
                // Granted here within this replica's share (and journaled for the ledger).
                self.requeue(pending);
                self.metrics.ledger_decision("on_its_own");
                return Admission::Granted;
            }
            self.decide_spec(
                ledger,
                &link,
                &asked,
                Some(member.clone()),
                grant.held_to_schedule(),
                pending.clone(),
                now,
            )
        };
        let json = serde_json::to_string(&spec).expect("a spec is JSON");
        let reply = self.call(&self.decide, &call_keys, json).await;
        let now = self.clock.now();
        let mut link = self.link();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                self.requeue(pending);
                self.go_on_its_own(&mut link, ledger, now, &e);
                return self.on_its_own(ledger, quotas, now);
            }
        };
        match int(&reply[0]) {
            1 => {
                self.learn_clock(&mut link, &reply, now);
                let n = asked.len();
                let mut marks = Vec::new();
                for (i, &(q, key)) in asked.iter().enumerate() {
                    let mark = reply.get(4 + i).map_or(0, int);
                    let count = reply.get(4 + n + i).map_or(0, int);
                    if key.is_none() {
                        link.last[q.0] = Some((u64::try_from(count).unwrap_or(0), now));
                    }
                    if self.quotas[q.0].sync.is_some() {
                        marks.push((q, u64::try_from(mark).unwrap_or(0), i + 1));
                    }
                }
                let pending = self.pending.clone();
                let released: Vec<(QuotaId, String)> = marks
                    .iter()
                    .map(|&(q, _, i)| (q, format!("{member}:{i}")))
                    .collect();
                grant.remote = Some(Box::new(Remote {
                    marks: marks.iter().map(|&(q, m, _)| (q, m)).collect(),
                    release: Some(Box::new(move || {
                        let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                        p.released.extend(released);
                    })),
                }));
                self.metrics.ledger_decision("granted");
                Admission::Granted
            }
            0 => {
                self.learn_clock(&mut link, &reply, now);
                let retry_at = Self::to_local(link.offset_ns, reply.get(4).map_or(0, int));
                // A negative index: the quota's release schedule holds this parked write (and
                // not the requests that are not held to it).
                let index = reply.get(5).map_or(0, int);
                let binding = usize::try_from(index.unsigned_abs())
                    .ok()
                    .and_then(|i| asked.get(i.checked_sub(1)?))
                    .map(|&(q, _)| q);
                if let Some(q) = binding
                    && index > 0
                    && self.quotas[q.0].key.is_empty()
                {
                    ledger.hold(q, retry_at);
                }
                self.metrics.ledger_decision("denied");
                Admission::Denied {
                    retry_at: retry_at.max(now),
                    binding,
                }
            }
            -1 => {
                link.full_push = true;
                self.go_on_its_own(
                    &mut link,
                    ledger,
                    now,
                    "the ledger's epoch changed (it lost its state, or was re-seeded)",
                );
                self.on_its_own(ledger, quotas, now)
            }
            _ => {
                self.go_on_its_own(
                    &mut link,
                    ledger,
                    now,
                    "no fixed window holds the ledger's clock: is this host's clock far off?",
                );
                self.on_its_own(ledger, quotas, now)
            }
        }
    }

    /// A grant made here just before this replica went on its own: it stands if it fits the
    /// fallback share.
    fn on_its_own(&self, ledger: &Ledger, quotas: &[QuotaId], now: Time) -> Admission {
        self.metrics.ledger_decision("on_its_own");
        match ledger.fits_fallback(quotas, now) {
            Ok(()) => {
                ledger.journal_grant(quotas, now);
                Admission::Granted
            }
            Err(retry_at) => Admission::Denied {
                retry_at,
                binding: None,
            },
        }
    }

    fn learn_clock(&self, link: &mut Link, reply: &[Value], now: Time) {
        let ledger_us = reply.get(1).map_or(0, int);
        link.offset_ns = i128::from(ledger_us) * 1_000 - i128::from(now.as_nanos());
        let alive = u32::try_from(reply.get(2).map_or(1, int)).unwrap_or(1);
        link.seen = link.seen.max(alive);
        self.metrics.ledger_replicas(alive);
    }

    /// The count of `q` last read from the ledger, if it was read inside `bounds`.
    pub fn account_used(&self, q: QuotaId, bounds: (Time, Time)) -> Option<u64> {
        let link = self.link();
        let (count, at) = (*link.last.get(q.0)?)?;
        (bounds.0 <= at && at < bounds.1 && link.mode == Mode::Shared).then_some(count)
    }

    pub fn view(&self) -> LedgerView {
        let link = self.link();
        LedgerView {
            store: "redis",
            url: Some(self.cfg.display_url()),
            key_prefix: Some(self.cfg.key_prefix.clone()),
            replica_id: Some(self.cfg.replica_id.clone()),
            shared: link.mode == Mode::Shared,
            on_its_own_since: link.since.map(|t| t.to_string()),
            replicas_seen: link.seen,
            last_error: link.last_error.clone(),
        }
    }
}
