//! The decision script against the local ledger, on a real Redis: the same arrivals get the
//! same decisions (and the same retry times).

use std::time::Duration;

use proptest::prelude::*;
use redis::Script;

use super::spec::{self, DecideSpec, Keys, SyncSpec, Updates};
use crate::clock::Time;
use crate::config::{QuotaConfig, QuotaScope, WindowKind};
use crate::ids::QuotaId;
use crate::quota::{Demand, Ledger};

/// The machine's Redis (or `CRM_PROXY_TEST_REDIS`); fails saying how to start one.
fn redis() -> redis::Connection {
    let url = std::env::var("CRM_PROXY_TEST_REDIS")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
    redis::Client::open(url.as_str())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .unwrap_or_else(|e| {
            panic!(
                "this test needs Redis at {url} ({e}): start one with \
                 `redis-server --daemonize yes --port 6379 --save \"\" --appendonly no`; \
                 .ci/run starts it when missing"
            )
        })
}

fn quota(name: &str, limit: u32, window: u64, margin: u64, fixed: bool) -> QuotaConfig {
    QuotaConfig {
        name: name.into(),
        limit,
        window: Duration::from_secs(window),
        kind: if fixed {
            WindowKind::Fixed { daily: None }
        } else {
            WindowKind::Sliding
        },
        scope: QuotaScope::Account,
        margin: Duration::from_millis(margin),
        sync: None,
        reserve: 0,
        key: Vec::new(),
        max_keys: 10_000,
        schedule: None,
        forecast: false,
        enforce: true,
    }
}

fn us(t: Time) -> u64 {
    t.as_nanos() / 1_000
}

/// One decision of the script at time `t`, as `(granted, retry_at, binding)`.
fn decide(
    conn: &mut redis::Connection,
    tag: &str,
    ledger: &Ledger,
    quotas: &[QuotaConfig],
    t: Time,
    n: u64,
) -> (bool, Option<Time>, Option<usize>) {
    let (granted, retry_at, binding) = decide_as(conn, tag, ledger, quotas, t, n, false);
    (
        granted,
        retry_at,
        binding.map(|b| usize::try_from(b).unwrap() - 1),
    )
}

/// One decision for a live request or (`parked`) a parked write; the binding quota's index
/// counts from 1, negative when a release schedule holds the write.
fn decide_as(
    conn: &mut redis::Connection,
    tag: &str,
    ledger: &Ledger,
    quotas: &[QuotaConfig],
    t: Time,
    n: u64,
    parked: bool,
) -> (bool, Option<Time>, Option<i64>) {
    let mut keys = Keys::new(tag, &[]);
    let q = quotas
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let id = QuotaId(i);
            let bounds = |at: Time| ledger.fixed_bounds(id, at).unwrap_or((at, at));
            spec::quota(&mut keys, c, None, &bounds, parked, t)
        })
        .collect();
    let spec = DecideSpec {
        t: Some(us(t)),
        e: "e1".into(),
        r: "model".into(),
        g: format!("g{n}"),
        ot: 1_000_000,
        sil: 1_000_000,
        fgt: 10_000_000_000,
        n: 1,
        charge: true,
        u: Updates::default(),
        q,
    };
    let script = Script::new(concat!(
        include_str!("clock.lua"),
        include_str!("decide.lua")
    ));
    let mut inv = script.prepare_invoke();
    for k in keys.names() {
        inv.key(k);
    }
    inv.arg(serde_json::to_string(&spec).unwrap());
    let reply: Vec<i64> = inv.invoke(conn).expect("the script answers");
    match reply[0] {
        1 => (true, None, None),
        0 => (
            false,
            Some(Time::from_nanos(u64::try_from(reply[4]).unwrap() * 1_000)),
            Some(reply[5]),
        ),
        other => panic!("unexpected reply {other}: {reply:?}"),
    }
}

/// Creates the ledger's epoch (`e1`), as a replica's first sync does.
fn join(conn: &mut redis::Connection, tag: &str, t: Time) {
    let keys = Keys::new(tag, &["synced"]);
    let spec = SyncSpec {
        t: Some(us(t)),
        e: "e1".into(),
        sil: 1_000_000,
        new: "e1".into(),
        full: true,
        r: "model".into(),
        g: "join".into(),
        push: Vec::new(),
    };
    let script = Script::new(concat!(include_str!("clock.lua"), include_str!("sync.lua")));
    let mut inv = script.prepare_invoke();
    for k in keys.names() {
        inv.key(k);
    }
    inv.arg(serde_json::to_string(&spec).unwrap());
    let _: redis::Value = inv.invoke(conn).expect("the sync script answers");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A fixed quota with a release schedule, parked writes and live requests arriving at
    /// random: the script grants exactly when the local ledger does, and names the same time (to
    /// its microsecond) when the schedule holds a parked write.
    #[test]
    fn the_script_keeps_to_the_release_schedule_as_the_local_ledger(
        limit in 4u32..40,
        at_once in 0u32..60,
        window in 2u64..8,
        arrivals in proptest::collection::vec((0u64..400_000, any::<bool>()), 1..80),
    ) {
        let quotas = vec![QuotaConfig {
            schedule: Some(crate::config::Schedule { hours: None, at_once: f64::from(at_once) / 100.0 }),
            ..quota("day", limit, window, 50, true)
        }];
        let mut conn = redis();
        let tag = spec::tag(&format!("release-{:x}", std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
        let mut t = Time::from_nanos(1_800_000_000_123_000_000);
        let ledger = Ledger::new(&quotas, None, t);
        join(&mut conn, &tag, t);
        let q = [QuotaId(0)];
        for (n, (gap, parked)) in arrivals.iter().enumerate() {
            t = t + Duration::from_micros(*gap);
            let demand = Demand { live: !parked, ..Demand::live(&q) };
            let local = ledger.try_acquire(&demand, t);
            let (granted, retry_at, binding) =
                decide_as(&mut conn, &tag, &ledger, &quotas, t, n as u64, *parked);
            prop_assert_eq!(granted, local.is_ok(), "at step {} ({:?}, parked {})", n, t, parked);
            if let (Err(denied), Some(at)) = (local, retry_at) {
                let gap = at.as_nanos().abs_diff(denied.retry_at.as_nanos());
                prop_assert!(gap <= 1_000, "retry {:?} vs {:?} at step {}", at, denied.retry_at, n);
                // The schedule binds only parked writes, and then it is not a hold.
                prop_assert!(binding == Some(1) || (*parked && binding == Some(-1)), "binding {:?}", binding);
            }
        }
    }

    /// Two quotas (sliding or fixed, a few calls per window of seconds), a random arrival
    /// sequence: the script grants exactly when the local ledger does, charging both or neither,
    /// and names the same time and quota when it refuses.
    #[test]
    fn the_script_decides_as_the_local_ledger(
        a in (1u32..6, 1u64..4, 0u64..300, any::<bool>()),
        b in (1u32..9, 1u64..6, 0u64..300, any::<bool>()),
        gaps in proptest::collection::vec(0u64..1_500_000, 1..60),
    ) {
        let quotas = vec![
            quota("a", a.0, a.1, a.2.min(a.1 * 1000 / 2 - 1), a.3),
            quota("b", b.0, b.1, b.2.min(b.1 * 1000 / 2 - 1), b.3),
        ];
        let mut conn = redis();
        let tag = spec::tag(&format!("model-{:x}", std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
        // A start on a whole second plus an odd offset, times in whole microseconds.
        let mut t = Time::from_nanos(1_800_000_000_123_000_000);
        let ledger = Ledger::new(&quotas, None, t);
        join(&mut conn, &tag, t);
        let both = [QuotaId(0), QuotaId(1)];
        for (n, gap) in gaps.iter().enumerate() {
            t = t + Duration::from_micros(*gap);
            let local = ledger.try_acquire(&Demand::live(&both), t);
            let (granted, retry_at, binding) = decide(&mut conn, &tag, &ledger, &quotas, t, n as u64);
            prop_assert_eq!(granted, local.is_ok(), "at step {} ({:?})", n, t);
            if let Err(denied) = local {
                prop_assert_eq!(retry_at, Some(denied.retry_at), "retry time at step {}", n);
                prop_assert_eq!(binding.map(QuotaId), denied.binding, "binding quota at step {}", n);
            }
        }
    }
}
