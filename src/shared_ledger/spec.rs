//! What a call to the shared ledger's scripts carries: the keys it touches (declared, so the
//! script runs on Redis Cluster: every key of one account under one hash tag) and a JSON spec
//! naming them by index. Times are microseconds of the wall clock; fixed and daily window
//! boundaries are calendar instants every replica computes alike, so they key the counters.

use std::collections::HashMap;

use ring::digest;
use serde::Serialize;

use crate::clock::Time;
use crate::config::{QuotaConfig, WindowKind};
use crate::quota::Release;
use crate::quota::window::{BUCKETS, EXACT_SLIDING_MAX_LIMIT, Shadow};

/// The keys of one call, in the order the script sees them (`KEYS[1]` first).
pub struct Keys {
    tag: String,
    list: Vec<String>,
    index: HashMap<String, usize>,
}

impl Keys {
    /// A call's keys: the clock, the epoch and the replicas first (`KEYS[1..3]`), then `extra`
    /// fixed ones (`KEYS[4..]`).
    pub fn new(tag: &str, extra: &[&str]) -> Keys {
        let mut keys = Keys {
            tag: tag.to_string(),
            list: Vec::new(),
            index: HashMap::new(),
        };
        for name in ["time", "epoch", "replicas"].iter().chain(extra) {
            keys.add(name);
        }
        keys
    }

    /// The 1-based index of `{tag}:suffix`.
    pub fn add(&mut self, suffix: &str) -> usize {
        let name = format!("{}:{suffix}", self.tag);
        if let Some(&i) = self.index.get(&name) {
            return i;
        }
        self.list.push(name.clone());
        let i = self.list.len();
        self.index.insert(name, i);
        i
    }

    pub fn names(&self) -> &[String] {
        &self.list
    }
}

/// The hash tag every key of an account carries.
pub fn tag(key_prefix: &str) -> String {
    format!("{{{key_prefix}}}")
}

fn us(t: Time) -> u64 {
    t.as_nanos() / 1_000
}

fn dur_us(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// How the script counts a quota's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Exact: a sorted set of grant times.
    Sliding,
    /// A counter per calendar window.
    Fixed,
    /// Counts per sub-window (limits above the exact range), conservative.
    Buckets,
}

impl Kind {
    pub fn of(q: &QuotaConfig) -> Kind {
        match q.kind {
            WindowKind::Fixed { .. } => Kind::Fixed,
            WindowKind::Sliding if q.limit <= EXACT_SLIDING_MAX_LIMIT => Kind::Sliding,
            WindowKind::Sliding => Kind::Buckets,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Kind::Sliding => "s",
            Kind::Fixed => "f",
            Kind::Buckets => "b",
        }
    }
}

/// A window's keys.
#[derive(Serialize, Default, Clone)]
pub struct WindowSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fw: Option<Vec<(u64, u64, usize)>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bidx: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    btot: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bw: Option<u64>,
}

/// One quota a decision consumes (or an observation applies to).
#[derive(Serialize, Clone)]
pub struct QuotaSpec {
    kind: &'static str,
    lim: u32,
    span: u64,
    mar: u64,
    win: u64,
    w: WindowSpec,
    frz: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    cap: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cnt: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<usize>,
    res: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<KeySpec>,
    /// For a parked write on a scheduled quota, each candidate window's release:
    /// `(window start, at once, release start, release end, limit, reset)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sch: Vec<(u64, u64, u64, u64, u64, u64)>,
}

#[derive(Serialize, Clone)]
struct KeySpec {
    tr: usize,
    max: usize,
    m: String,
    own: WindowSpec,
    ovf: WindowSpec,
}

/// The calendar windows around `now` of a fixed quota: `bounds(t)` gives the one holding `t`.
/// The script picks the one holding its own clock's now.
fn fixed_candidates(bounds: &dyn Fn(Time) -> (Time, Time), now: Time) -> [(Time, Time); 3] {
    let cur = bounds(now);
    let prev = bounds(cur.0.saturating_sub(std::time::Duration::from_nanos(1)));
    let next = bounds(cur.1);
    [prev, cur, next]
}

/// A short, fixed-length digest of a quota key (keys may carry header values or ids).
pub fn key_digest(key: &str) -> String {
    let d = digest::digest(&digest::SHA256, key.as_bytes());
    d.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Builds the spec of one quota: `base` names its keys (`q:<name>` or `k:<name>:<digest>`).
fn window(
    keys: &mut Keys,
    kind: Kind,
    base: &str,
    q: &QuotaConfig,
    bounds: &dyn Fn(Time) -> (Time, Time),
    now: Time,
) -> WindowSpec {
    match kind {
        Kind::Sliding => WindowSpec {
            log: Some(keys.add(&format!("{base}:log"))),
            ..WindowSpec::default()
        },
        Kind::Fixed => WindowSpec {
            fw: Some(
                fixed_candidates(bounds, now)
                    .iter()
                    .map(|&(s, e)| (us(s), us(e), keys.add(&format!("{base}:f:{}", us(s)))))
                    .collect(),
            ),
            ..WindowSpec::default()
        },
        Kind::Buckets => WindowSpec {
            log: Some(keys.add(&format!("{base}:b"))),
            bidx: Some(keys.add(&format!("{base}:bi"))),
            btot: Some(keys.add(&format!("{base}:bt"))),
            bw: Some((dur_us(q.window) / BUCKETS).max(1)),
            ..WindowSpec::default()
        },
    }
}

/// The spec of quota `q` for a decision (with its key when it is keyed) or an observation;
/// `parked`: for a parked write, held to the quota's release schedule.
pub fn quota(
    keys: &mut Keys,
    q: &QuotaConfig,
    key: Option<&str>,
    bounds: &dyn Fn(Time) -> (Time, Time),
    parked: bool,
    now: Time,
) -> QuotaSpec {
    let kind = Kind::of(q);
    let base = format!("q:{}", q.name);
    let synced = q.sync.is_some();
    let span = match kind {
        Kind::Fixed => q.window,
        _ => q.window + q.margin,
    };
    let key = key.filter(|_| !q.key.is_empty()).map(|k| {
        let digest = key_digest(k);
        KeySpec {
            tr: keys.add(&format!("k:{}:tracked", q.name)),
            max: q.max_keys,
            own: window(
                keys,
                kind,
                &format!("k:{}:{digest}", q.name),
                q,
                bounds,
                now,
            ),
            ovf: window(keys, kind, &format!("k:{}:~", q.name), q, bounds, now),
            m: digest,
        }
    });
    QuotaSpec {
        kind: kind.code(),
        lim: q.limit,
        span: dur_us(span),
        mar: dur_us(q.margin),
        win: dur_us(q.window),
        w: if key.is_some() {
            WindowSpec::default()
        } else {
            window(keys, kind, &base, q, bounds, now)
        },
        frz: keys.add(&format!("{base}:frz")),
        cap: synced.then(|| keys.add(&format!("{base}:cap"))),
        cnt: synced.then(|| keys.add(&format!("{base}:cnt"))),
        out: synced.then(|| keys.add(&format!("{base}:out"))),
        res: q.reserve,
        sch: if parked && key.is_none() && kind == Kind::Fixed {
            fixed_candidates(bounds, now)
                .iter()
                .filter_map(|&b| {
                    let r = Release::of(q, b)?;
                    Some((
                        us(b.0),
                        r.at_once,
                        us(r.start),
                        us(r.end),
                        r.limit,
                        us(r.reset),
                    ))
                })
                .collect()
        } else {
            Vec::new()
        },
        key,
    }
}

/// What a CRM answer said about a synced quota, as the script applies it.
#[derive(Serialize)]
pub struct ObservationSpec {
    pub q: QuotaSpec,
    pub mark: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rem: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lim: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<u64>,
    pub hold: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
}

/// Updates a replica hands over with its next call.
#[derive(Serialize, Default)]
pub struct Updates {
    /// `(out key, member)`: in-flight requests answered.
    pub rel: Vec<(usize, String)>,
    /// Pause and ceiling keys an operator lifted (deleted before the pauses below apply).
    pub lift: Vec<usize>,
    /// `(frozen key, until)`: throttle pauses.
    pub frz: Vec<(usize, u64)>,
    pub obs: Vec<ObservationSpec>,
}

/// The spec of a decision (`charge`) or a look at the counts with the updates applied.
#[derive(Serialize)]
pub struct DecideSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t: Option<u64>,
    pub e: String,
    pub r: String,
    pub g: String,
    pub ot: u64,
    pub sil: u64,
    pub fgt: u64,
    pub n: u32,
    pub charge: bool,
    pub u: Updates,
    pub q: Vec<QuotaSpec>,
}

/// Grants a replica adds to the shared ledger, per quota.
#[derive(Serialize)]
pub struct PushSpec {
    kind: &'static str,
    span: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    times: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fend: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    buckets: Vec<(u64, u32)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bidx: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    btot: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bw: Option<u64>,
}

/// The push of a quota's grants: `shadow` in this replica's clock, `offset_ns` added to reach
/// the shared ledger's.
pub fn push(
    keys: &mut Keys,
    q: &QuotaConfig,
    shadow: &Shadow,
    offset_ns: i128,
) -> Option<PushSpec> {
    let shift = |t: Time| -> u64 {
        u64::try_from((i128::from(t.as_nanos()) + offset_ns).max(0) / 1_000).unwrap_or(0)
    };
    let base = format!("q:{}", q.name);
    let empty = PushSpec {
        kind: Kind::of(q).code(),
        span: dur_us(q.window + q.margin),
        log: None,
        times: Vec::new(),
        fend: None,
        count: None,
        buckets: Vec::new(),
        bidx: None,
        btot: None,
        bw: None,
    };
    match shadow {
        Shadow::Times(times) if !times.is_empty() => Some(PushSpec {
            log: Some(keys.add(&format!("{base}:log"))),
            times: times.iter().map(|&t| shift(t)).collect(),
            ..empty
        }),
        // Calendar windows are the same for every replica: no shift.
        Shadow::Count { start, end, count } if *count > 0 => Some(PushSpec {
            span: dur_us(q.window),
            log: Some(keys.add(&format!("{base}:f:{}", us(*start)))),
            fend: Some(us(*end)),
            count: Some(*count),
            ..empty
        }),
        Shadow::Buckets { width, counts } if !counts.is_empty() => {
            let bw = (dur_us(q.window) / BUCKETS).max(1);
            Some(PushSpec {
                log: Some(keys.add(&format!("{base}:b"))),
                bidx: Some(keys.add(&format!("{base}:bi"))),
                btot: Some(keys.add(&format!("{base}:bt"))),
                buckets: counts
                    .iter()
                    .map(|&(b, n)| (shift(Time::from_nanos(b.saturating_mul(*width))) / bw, n))
                    .collect(),
                bw: Some(bw),
                ..empty
            })
        }
        _ => None,
    }
}

/// The spec of a sync: `full` when every grant in open windows is pushed (the ledger may have
/// lost its state), else only the grants made while it was unreachable.
#[derive(Serialize)]
pub struct SyncSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t: Option<u64>,
    pub e: String,
    /// The silence after which a replica's share is left to it (see the decide script).
    pub sil: u64,
    pub new: String,
    pub full: bool,
    pub r: String,
    pub g: String,
    pub push: Vec<PushSpec>,
}
