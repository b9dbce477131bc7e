//! Random and mutated configs through `check`: every one is either refused with its problems or
//! accepted, and every accepted one builds a running proxy (ledger, queue, routes, limits,
//! metrics) that decides, pauses and reports without a panic, also years ahead.

use std::path::Path;
use std::time::Duration;

use crm_quota_proxy::clock::{Clock, ManualClock};
use crm_quota_proxy::config::{Config, QueueConfig};
use crm_quota_proxy::ids::ClientId;
use crm_quota_proxy::quota::{Demand, PauseBounds};
use proptest::prelude::*;
use yaml_serde::Value;

/// Values that have broken parsers and time arithmetic before, by the kind of value they
/// replace (so most mutants still parse, and the extremes reach the runtime).
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "100",
    "1000000000",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "1e-300",
    "0.001",
    "0.5",
    "1e300",
];
const DURATIONS: &[&str] = &[
    "0s",
    "1ms",
    "10ms",
    "100ms",
    "1s",
    "59s",
    "1m",
    "1h",
    "1d",
    "7d",
    "30d",
    "366d",
    "367d",
    "18446744073709551615s",
    "999999999d",
];
const SIZES: &[&str] = &["0B", "1B", "1KiB", "1MiB", "1GiB", "1TiB", "2TiB"];
const SHARES: &[&str] = &["0%", "10%", "49%", "50%", "99%"];
const OTHERS: &[&str] = &[
    "''",
    "x",
    "true",
    "null",
    "fixed",
    "sliding",
    "[]",
    "queue",
    "reject",
    "wait",
    "memory",
    "23:59",
    "24:00",
    "Europe/Berlin",
    "Mars/Olympus",
    "/a/{id}",
    "/**",
    "[POST]",
];

/// The replacements for a leaf of this value.
fn extremes(v: &Value) -> &'static [&'static str] {
    match v {
        Value::Number(_) => NUMBERS,
        Value::String(s) if s.ends_with('%') => SHARES,
        Value::String(s) if s.ends_with('B') && s.starts_with(|c: char| c.is_ascii_digit()) => {
            SIZES
        }
        Value::String(s)
            if s.starts_with(|c: char| c.is_ascii_digit()) && s.ends_with(['s', 'm', 'h', 'd']) =>
        {
            DURATIONS
        }
        _ => OTHERS,
    }
}

fn get<'v>(v: &'v Value, path: &[Value]) -> &'v Value {
    path.iter().fold(v, |v, k| match (v, k) {
        (Value::Mapping(m), k) => m.get(k).unwrap_or(&Value::Null),
        (Value::Sequence(s), Value::Number(i)) => &s[i.as_u64().unwrap() as usize],
        _ => v,
    })
}

fn configs() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut out: Vec<Value> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .map(|text| yaml_serde::from_str(&text).unwrap())
        .collect();
    out.sort_by_key(|v| format!("{v:?}"));
    out
}

/// Every scalar's path in `v`.
fn leaves(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                path.push(k.clone());
                leaves(child, path, out);
                path.pop();
            }
        }
        Value::Sequence(s) => {
            for (i, child) in s.iter().enumerate() {
                path.push(Value::Number(i.into()));
                leaves(child, path, out);
                path.pop();
            }
        }
        // Names and references are left alone: a mutant should fail on numbers, not on a typo.
        _ if path.iter().any(|k| {
            matches!(
                k.as_str(),
                Some(
                    "preset"
                        | "plan"
                        | "url"
                        | "name"
                        | "sync"
                        | "crm"
                        | "data_dir"
                        | "path"
                        | "methods"
                        | "quotas"
                        | "key"
                        | "time_zone"
                        | "store"
                        | "data"
                        | "admin"
                )
            )
        }) && !matches!(path.first().and_then(Value::as_str), Some("quotas")) => {}
        _ if matches!(
            path.last().and_then(Value::as_str),
            Some("name" | "sync" | "key" | "time_zone")
        ) => {}
        _ => out.push(path.clone()),
    }
}

/// Sets the value at `path`, creating the mappings on the way.
fn set(v: &mut Value, path: &[Value], to: Value) {
    let Some((first, rest)) = path.split_first() else {
        *v = to;
        return;
    };
    let child = match (v, first) {
        (Value::Mapping(m), k) => Some(
            m.entry(k.clone())
                .or_insert(Value::Mapping(Default::default())),
        ),
        (Value::Sequence(s), Value::Number(i)) => s.get_mut(i.as_u64().unwrap() as usize),
        _ => None,
    };
    if let Some(c) = child {
        set(c, rest, to);
    }
}

/// Fields a base may not set, mutated too (with the kind of value they take).
const ABSENT: &[(&str, &[&str])] = &[
    ("max_body_bytes", SIZES),
    ("default_max_wait", DURATIONS),
    ("shutdown_grace", DURATIONS),
    ("listen.max_connections", NUMBERS),
    ("listen.max_concurrent_requests", NUMBERS),
    ("listen.header_timeout", DURATIONS),
    ("listen.idle_timeout", DURATIONS),
    ("listen.body_timeout", DURATIONS),
    ("listen.body_min_rate", SIZES),
    ("listen.max_buffered_bytes", SIZES),
    ("listen.h2_max_streams", NUMBERS),
    ("upstream.max_pause", DURATIONS),
    ("upstream.min_pause", DURATIONS),
    ("upstream.retry_after_default", DURATIONS),
    ("upstream.pace.per_second", NUMBERS),
    ("queue.ttl", DURATIONS),
    ("queue.result_ttl", DURATIONS),
    ("queue.max_entries", NUMBERS),
    ("queue.max_bytes", SIZES),
    ("queue.backoff_initial", DURATIONS),
    ("queue.backoff_max", DURATIONS),
    ("queue.max_in_flight", NUMBERS),
    ("fairness.live_reserve", SHARES),
];

/// Exercises an accepted config's runtime: build it, decide for every route now and far ahead,
/// pause every quota as long as a CRM could ask, report.
fn run(mut config: Config) {
    let dir = tempfile::tempdir().unwrap();
    if config.listen.admin_token_file.is_some() {
        let token = dir.path().join("admin-token");
        std::fs::write(&token, "a-token").unwrap();
        config.listen.admin_token_file = Some(token);
    }
    if config.queue.data_dir.is_some() {
        config.queue = QueueConfig {
            data_dir: Some(dir.path().join("data")),
            ..config.queue
        };
    }
    let clock = ManualClock::at("2026-03-08T01:59:59Z");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let proxy = crm_quota_proxy::open(config, std::sync::Arc::new(clock.clone()))
            .expect("an accepted config opens");
        let bounds = PauseBounds {
            min: proxy.config().upstream.min_pause,
            max: proxy.config().upstream.max_pause,
        };
        for step in [
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(86_400 * 400),
        ] {
            clock.advance(step);
            let now = clock.now();
            let routes = proxy.routes();
            for route in routes.routes() {
                for live in [true, false] {
                    let d = Demand {
                        quotas: &route.quotas,
                        keys: &[],
                        client: ClientId::default(),
                        live,
                        read: route.class == crm_quota_proxy::config::Class::Read,
                        deferrable: false,
                    };
                    // Spend what a small quota has, then ask once more: the refusal's
                    // arithmetic (retry times, reserves, shares) runs too.
                    let mut grants = Vec::new();
                    while grants.len() < 64 {
                        match proxy.ledger.try_acquire(&d, now) {
                            Ok(g) => grants.push(g),
                            Err(_) => break,
                        }
                    }
                    let _ = proxy.ledger.check(&d, now);
                }
                let _ = proxy.ledger.usage(&route.quotas, now);
                let far = now + Duration::from_secs(u64::MAX / 4);
                let _ = proxy.ledger.pause(&route.quotas, far, now, bounds);
            }
            let _ = proxy.ledger.snapshot(now);
            let _ = proxy.queue.snapshot(now);
            proxy.refresh_metrics(now);
            for attempt in 0..=proxy.config().queue.max_attempts {
                let _ = proxy.backoff(attempt);
            }
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_config_check_accepts_panics_when_run(
        base in 0usize..9,
        picks in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 1..3),
        small_limits in any::<bool>(),
    ) {
        let bases = configs();
        let mut v = bases[base % bases.len()].clone();
        // Quotas small enough to spend, so refusals (retry times, reserves) run as well.
        if small_limits && let Some(Value::Sequence(quotas)) = v.get_mut("quotas") {
            for q in quotas.iter_mut() {
                set(q, &[Value::String("limit".into())], Value::Number(2.into()));
            }
        }
        let mut paths = Vec::new();
        leaves(&v, &mut Vec::new(), &mut paths);
        let mut targets: Vec<(Vec<Value>, Option<&[&str]>)> =
            paths.into_iter().map(|p| (p, None)).collect();
        for (field, kind) in ABSENT {
            let path = field.split('.').map(|k| Value::String(k.into())).collect();
            targets.push((path, Some(*kind)));
        }
        for (at, extreme) in picks {
            let (path, kind) = at.get(&targets).clone();
            let kind = kind.unwrap_or_else(|| extremes(get(&v, &path)));
            let text: &&str = extreme.get(kind);
            let value: Value = yaml_serde::from_str(text).unwrap();
            set(&mut v, &path, value);
        }
        let text = yaml_serde::to_string(&v).unwrap();
        match Config::from_yaml(&text, None) {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(config) => run(config),
        }
    }
}
