use std::time::Duration;

use proptest::prelude::*;

use super::window::{BUCKETS, FixedWindow, SlidingBuckets, SlidingLog, Window, daily_bounds};
use super::*;
use crate::clock::Time;
use crate::config::ClientConfig;
use crate::config::Fairness;
use crate::config::{DailyReset, QuotaScope, WindowKind};
use crate::crm::Observation;
use crate::ids::ClientId;

const SEC: u64 = 1_000_000_000;

fn quota(name: &str, limit: u32, window: Duration, kind: WindowKind) -> QuotaConfig {
    QuotaConfig {
        name: name.into(),
        limit,
        window,
        kind,
        scope: QuotaScope::Account,
        margin: Duration::ZERO,
        sync: None,
        reserve: 0,
        key: Vec::new(),
        max_keys: 10_000,
        schedule: None,
        forecast: false,
        enforce: true,
    }
}

fn daily(at: &str, zone: &str) -> DailyReset {
    let (h, m) = at.split_once(':').unwrap();
    DailyReset {
        at: jiff::civil::Time::new(h.parse().unwrap(), m.parse().unwrap(), 0, 0).unwrap(),
        zone: jiff::tz::TimeZone::get(zone).unwrap(),
        zone_name: zone.into(),
    }
}

fn t(rfc3339: &str) -> Time {
    Time::from_timestamp(rfc3339.parse().unwrap())
}

/// Arrival times: sorted offsets (ns) with bursts (many at one instant) and gaps.
fn arrivals(max_gap_ms: u64) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(
        prop_oneof![
            Just(0u64),
            0..max_gap_ms * 1_000_000,
            0..max_gap_ms * 4_000_000
        ],
        1..300,
    )
    .prop_map(|gaps| {
        let mut now = 1_700_000_000 * SEC;
        gaps.into_iter()
            .map(|g| {
                now += g;
                now
            })
            .collect()
    })
}

/// Largest number of grants in any half-open interval `[a, a + span)`.
fn max_in_any_interval(grants: &[u64], span: u64) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..grants.len() {
        while grants[hi] >= grants[lo] + span {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// The reference model of a sliding window: grants in `(now - span, now]`.
fn reference_room(grants: &[u64], now: u64, span: u64, limit: u32) -> bool {
    grants.iter().filter(|&&g| g + span > now).count() < limit as usize
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The exact sliding log grants exactly when the reference model has room, and no interval of
    /// the window's length ever holds more than `limit` grants.
    #[test]
    fn sliding_log_matches_reference(limit in 1u32..20, window_ms in 1_000u64..60_000, margin_ms in 0u64..300, times in arrivals(3_000)) {
        let span = (window_ms + margin_ms) * 1_000_000;
        let mut w = Window::Log(SlidingLog::new(limit, Duration::from_nanos(span)));
        let mut grants: Vec<u64> = Vec::new();
        for &now in &times {
            let now_t = Time::from_nanos(now);
            let room = reference_room(&grants, now, span, limit);
            match w.blocked_until(now_t) {
                None => {
                    prop_assert!(room, "granted at {now} but the reference is full");
                    w.charge(now_t);
                    grants.push(now);
                }
                Some(at) => {
                    prop_assert!(!room, "refused at {now} but the reference has room");
                    prop_assert!(at > now_t);
                    // The promised time is exact: the reference has room then and not a nanosecond before.
                    prop_assert!(reference_room(&grants, at.as_nanos(), span, limit));
                    prop_assert!(!reference_room(&grants, at.as_nanos() - 1, span, limit));
                }
            }
            prop_assert_eq!(w.used(now_t) as usize, grants.iter().filter(|&&g| g + span > now).count());
        }
        prop_assert!(max_in_any_interval(&grants, window_ms * 1_000_000) <= limit as usize);
    }

    /// The bucketed sliding counter never over-grants, and refuses only where the reference window
    /// stretched by one sub-window (its documented conservatism) is full too.
    #[test]
    fn sliding_buckets_are_safe_and_at_most_one_bucket_conservative(limit in 1u32..20, window_ms in 1_000u64..60_000, times in arrivals(3_000)) {
        let window = Duration::from_millis(window_ms);
        let width = window.as_nanos() as u64 / BUCKETS;
        let span = window_ms * 1_000_000;
        let mut w = Window::Buckets(SlidingBuckets::new(limit, window, window));
        let mut grants: Vec<u64> = Vec::new();
        for &now in &times {
            let now_t = Time::from_nanos(now);
            match w.blocked_until(now_t) {
                None => {
                    prop_assert!(reference_room(&grants, now, span, limit));
                    w.charge(now_t);
                    grants.push(now);
                }
                Some(at) => {
                    prop_assert!(at > now_t);
                    prop_assert!(!reference_room(&grants, now, span + width, limit),
                        "refused at {now} though even the stretched reference has room");
                }
            }
        }
        prop_assert!(max_in_any_interval(&grants, span) <= limit as usize);
    }

    /// A fixed window grants while its aligned window has room and is not in its closing margin.
    #[test]
    fn fixed_window_matches_reference(limit in 1u32..20, window_s in 1u64..120, margin_ms in 0u64..400, times in arrivals(5_000)) {
        let window = window_s * SEC;
        let margin = margin_ms * 1_000_000;
        let mut w = Window::Fixed(FixedWindow::new(limit, Duration::from_nanos(window), Duration::from_nanos(margin), None));
        let mut grants: Vec<u64> = Vec::new();
        for &now in &times {
            let start = now - now % window;
            let in_window = grants.iter().filter(|&&g| g >= start).count();
            let room = in_window < limit as usize && now < start + window - margin;
            match w.blocked_until(Time::from_nanos(now)) {
                None => {
                    prop_assert!(room);
                    w.charge(Time::from_nanos(now));
                    grants.push(now);
                }
                Some(at) => {
                    prop_assert!(!room);
                    prop_assert_eq!(at.as_nanos(), start + window);
                }
            }
        }
        for g in &grants {
            let start = g - g % window;
            prop_assert!(grants.iter().filter(|&&x| x >= start && x < start + window).count() <= limit as usize);
        }
    }

    /// All-or-nothing: a denied request charges no quota.
    #[test]
    fn ledger_denial_charges_nothing(minute_limit in 1u32..10, day_limit in 1u32..30, times in arrivals(2_000)) {
        let ledger = Ledger::new(&[
            quota("minute", minute_limit, Duration::from_secs(60), WindowKind::Sliding),
            quota("day", day_limit, Duration::from_secs(86_400), WindowKind::Sliding),
        ], None, Time::ZERO);
        let both = [QuotaId(0), QuotaId(1)];
        let mut granted = 0u32;
        for &now in &times {
            let now = Time::from_nanos(now);
            if ledger.try_acquire(&Demand::live(&both), now).is_ok() {
                granted += 1;
            }
            let s = ledger.snapshot(now);
            prop_assert_eq!(s[1].used, granted, "the day quota counts exactly the grants");
        }
    }
}

#[test]
fn a_whole_day_of_2500_per_day_walks_in_milliseconds() {
    // One request per second for 48 hours against 2,500/day: a daily fixed window (midnight UTC)
    // grants exactly 2,500 per calendar day; a rolling 24 h window never holds more than 2,500.
    let fixed = Ledger::new(
        &[quota(
            "day",
            2_500,
            Duration::from_secs(86_400),
            WindowKind::Fixed {
                daily: Some(daily("00:00", "UTC")),
            },
        )],
        None,
        Time::ZERO,
    );
    let rolling = Ledger::new(
        &[quota(
            "day",
            2_500,
            Duration::from_secs(86_400),
            WindowKind::Sliding,
        )],
        None,
        Time::ZERO,
    );
    let start = t("2026-06-01T00:00:00Z");
    let mut per_day = [0u32; 2];
    let mut rolling_grants = Vec::new();
    for s in 0..(2 * 86_400u64) {
        let now = start + Duration::from_secs(s);
        if fixed.try_acquire(&Demand::live(&[QuotaId(0)]), now).is_ok() {
            per_day[(s / 86_400) as usize] += 1;
        }
        if rolling
            .try_acquire(&Demand::live(&[QuotaId(0)]), now)
            .is_ok()
        {
            rolling_grants.push(now.as_nanos());
        }
    }
    assert_eq!(per_day, [2_500, 2_500]);
    // Rolling: the first 2,500 seconds, then again exactly 24 h after each of them.
    assert_eq!(rolling_grants.len(), 5_000);
    assert_eq!(
        rolling_grants[2_500] - rolling_grants[0],
        86_400 * SEC,
        "the 2,501st call waits exactly until the 1st is 24 h old"
    );
    assert!(max_in_any_interval(&rolling_grants, 86_400 * SEC) <= 2_500);
}

#[test]
fn daily_reset_follows_daylight_saving_changes() {
    let ny = daily("00:00", "America/New_York");
    // Spring forward (2026-03-08): that local day lasts 23 hours.
    let (s, e) = daily_bounds(&ny, t("2026-03-08T12:00:00Z"));
    assert_eq!(s, t("2026-03-08T05:00:00Z"));
    assert_eq!(e, t("2026-03-09T04:00:00Z"));
    assert_eq!(e.saturating_since(s), Duration::from_secs(23 * 3_600));
    // Fall back (2026-11-01): 25 hours.
    let (s, e) = daily_bounds(&ny, t("2026-11-01T12:00:00Z"));
    assert_eq!(s, t("2026-11-01T04:00:00Z"));
    assert_eq!(e, t("2026-11-02T05:00:00Z"));
    assert_eq!(e.saturating_since(s), Duration::from_secs(25 * 3_600));
    // Just before local midnight belongs to the previous day.
    let (_, e) = daily_bounds(&ny, t("2026-03-08T04:59:59Z"));
    assert_eq!(e, t("2026-03-08T05:00:00Z"));
    // A reset time that does not exist on the spring-forward day (02:30) moves to 03:30 local.
    let odd = daily("02:30", "America/New_York");
    let (s, _) = daily_bounds(&odd, t("2026-03-08T12:00:00Z"));
    assert_eq!(s, t("2026-03-08T07:30:00Z"));
}

#[test]
fn daily_quota_resets_at_local_midnight_across_a_dst_change() {
    let ledger = Ledger::new(
        &[quota(
            "day",
            3,
            Duration::from_secs(86_400),
            WindowKind::Fixed {
                daily: Some(daily("00:00", "America/New_York")),
            },
        )],
        None,
        Time::ZERO,
    );
    let q = [QuotaId(0)];
    let evening = t("2026-03-07T23:00:00-05:00");
    for _ in 0..3 {
        ledger.try_acquire(&Demand::live(&q), evening).unwrap();
    }
    let denied = ledger.try_acquire(&Demand::live(&q), evening).unwrap_err();
    assert_eq!(denied.retry_at, t("2026-03-08T00:00:00-05:00"));
    // The new (23-hour) day admits three again, then refuses until the next local midnight (EDT).
    let next = t("2026-03-08T00:00:00-05:00");
    for _ in 0..3 {
        ledger.try_acquire(&Demand::live(&q), next).unwrap();
    }
    let denied = ledger.try_acquire(&Demand::live(&q), next).unwrap_err();
    assert_eq!(denied.retry_at, t("2026-03-09T00:00:00-04:00"));
}

#[test]
fn denial_names_the_quota_that_blocks_longest() {
    let ledger = Ledger::new(
        &[
            quota("minute", 1, Duration::from_secs(60), WindowKind::Sliding),
            quota("ten-min", 1, Duration::from_secs(600), WindowKind::Sliding),
        ],
        None,
        Time::ZERO,
    );
    let now = t("2026-01-01T00:00:00Z");
    let both = [QuotaId(0), QuotaId(1)];
    ledger.try_acquire(&Demand::live(&both), now).unwrap();
    let d = ledger.try_acquire(&Demand::live(&both), now).unwrap_err();
    assert_eq!(d.binding, Some(QuotaId(1)));
    assert_eq!(d.retry_at, now + Duration::from_secs(600));
    // Only the first quota: free after a minute, and the denial above charged nothing.
    assert!(
        ledger
            .try_acquire(&Demand::live(&[QuotaId(0)]), now + Duration::from_secs(60))
            .is_ok()
    );
}

fn bounds(min_s: u64, max_s: u64) -> PauseBounds {
    PauseBounds {
        min: Duration::from_secs(min_s),
        max: Duration::from_secs(max_s),
    }
}

#[test]
fn a_crm_pause_is_cut_to_the_quotas_window_and_max_pause() {
    let ledger = Ledger::new(
        &[
            quota("minute", 100, Duration::from_secs(60), WindowKind::Sliding),
            quota(
                "day",
                2_500,
                Duration::from_secs(86_400),
                WindowKind::Fixed {
                    daily: Some(daily("00:00", "UTC")),
                },
            ),
            quota(
                "rolling-day",
                2_500,
                Duration::from_secs(86_400),
                WindowKind::Sliding,
            ),
        ],
        None,
        Time::ZERO,
    );
    let now = t("2026-01-01T10:00:00Z");
    let year_2100 = t("2100-12-31T00:00:00Z");
    let paused = ledger.pause(
        &[QuotaId(0), QuotaId(1), QuotaId(2)],
        year_2100,
        now,
        bounds(1, 3_600),
    );
    let until: Vec<Time> = paused.iter().map(|p| p.until).collect();
    assert_eq!(
        until,
        vec![
            now + Duration::from_secs(60),
            t("2026-01-02T00:00:00Z"),
            now + Duration::from_secs(3_600)
        ],
        "a minute quota at most a minute; a daily window until its reset; else max_pause"
    );
    assert!(paused.iter().all(|p| p.capped && p.first_cap));
    let again = ledger.pause(&[QuotaId(0)], year_2100, now, bounds(1, 3_600));
    assert!(again[0].capped && !again[0].first_cap, "warned once");
    let d = ledger
        .try_acquire(&Demand::live(&[QuotaId(0)]), now)
        .unwrap_err();
    assert_eq!(d.retry_at, now + Duration::from_secs(60));
    // The operator lifts it.
    assert!(ledger.resume(QuotaId(0), now));
    assert!(
        ledger
            .try_acquire(&Demand::live(&[QuotaId(0)]), now)
            .is_ok()
    );
    assert!(!ledger.resume(QuotaId(0), now), "nothing left to lift");
}

#[test]
fn throttles_without_a_usable_delay_pause_at_least_min_pause_doubling() {
    let ledger = Ledger::new(
        &[quota(
            "minute",
            100,
            Duration::from_secs(60),
            WindowKind::Sliding,
        )],
        None,
        Time::ZERO,
    );
    let q = [QuotaId(0)];
    let mut now = t("2026-01-01T10:00:00Z");
    let mut pauses = Vec::new();
    for _ in 0..8 {
        // `Retry-After: 0`: the CRM says "now".
        let p = ledger.pause(&q, now, now, bounds(1, 3_600))[0];
        pauses.push(p.until.saturating_since(now).as_secs());
        now = p.until;
    }
    assert_eq!(
        pauses,
        vec![1, 2, 4, 8, 16, 32, 60, 60],
        "doubling, up to the window"
    );
    ledger.not_throttled(&q);
    let p = ledger.pause(&q, now, now, bounds(1, 3_600))[0];
    assert_eq!(
        p.until,
        now + Duration::from_secs(1),
        "an answer in between starts over"
    );
    // A longer delay the CRM gives is kept as is.
    let later = now + Duration::from_secs(30);
    assert_eq!(
        ledger.pause(&q, later, now, bounds(1, 3_600))[0].until,
        later
    );
}

#[test]
fn freeze_blocks_until_its_end_and_never_shortens() {
    let ledger = Ledger::new(
        &[quota(
            "minute",
            100,
            Duration::from_secs(60),
            WindowKind::Sliding,
        )],
        None,
        Time::ZERO,
    );
    let now = t("2026-01-01T00:00:00Z");
    let q = [QuotaId(0)];
    let gained = ledger.freeze(&q, now + Duration::from_secs(30), now);
    assert_eq!(gained, vec![(QuotaId(0), Duration::from_secs(30))]);
    let gained = ledger.freeze(&q, now + Duration::from_secs(10), now);
    assert_eq!(gained, vec![(QuotaId(0), Duration::ZERO)]);
    let d = ledger.try_acquire(&Demand::live(&q), now).unwrap_err();
    assert_eq!(d.retry_at, now + Duration::from_secs(30));
    assert_eq!(ledger.usage(&q, now)[0].remaining, 0);
    assert!(
        ledger
            .try_acquire(&Demand::live(&q), now + Duration::from_secs(30))
            .is_ok()
    );
}

#[test]
fn usage_lists_the_binding_quota_first() {
    let ledger = Ledger::new(
        &[
            quota("minute", 10, Duration::from_secs(60), WindowKind::Sliding),
            quota("day", 3, Duration::from_secs(86_400), WindowKind::Sliding),
        ],
        None,
        Time::ZERO,
    );
    let now = t("2026-01-01T00:00:00Z");
    let both = [QuotaId(0), QuotaId(1)];
    ledger.try_acquire(&Demand::live(&both), now).unwrap();
    let u = ledger.usage(&both, now);
    assert_eq!(u[0].quota, QuotaId(1));
    assert_eq!(u[0].remaining, 2);
    assert_eq!(u[0].reset_at, now + Duration::from_secs(86_400));
    assert_eq!(u[1].remaining, 9);
}

#[test]
fn estimate_counts_whole_windows_for_a_long_backlog() {
    let ledger = Ledger::new(
        &[quota("w", 10, Duration::from_secs(10), WindowKind::Sliding)],
        None,
        Time::ZERO,
    );
    let q = [QuotaId(0)];
    let now = t("2026-01-01T00:00:00Z");
    assert_eq!(ledger.estimate(&q, 9, now), now);
    for _ in 0..10 {
        ledger.try_acquire(&Demand::live(&q), now).unwrap();
    }
    assert_eq!(ledger.estimate(&q, 0, now), now + Duration::from_secs(10));
    assert_eq!(ledger.estimate(&q, 9, now), now + Duration::from_secs(10));
    assert_eq!(ledger.estimate(&q, 10, now), now + Duration::from_secs(20));
}

#[test]
fn pacer_spaces_calls_inside_a_window() {
    let ledger = Ledger::new(
        &[quota(
            "minute",
            100,
            Duration::from_secs(60),
            WindowKind::Sliding,
        )],
        Some(Pace {
            per_second: 2.0,
            burst: 2,
        }),
        t("2026-01-01T00:00:00Z"),
    );
    let q = [QuotaId(0)];
    let now = t("2026-01-01T00:00:01Z");
    ledger.try_acquire(&Demand::live(&q), now).unwrap();
    ledger.try_acquire(&Demand::live(&q), now).unwrap();
    let d = ledger.try_acquire(&Demand::live(&q), now).unwrap_err();
    assert_eq!(d.binding, None);
    assert_eq!(d.retry_at, now + Duration::from_millis(500));
    // A paced denial charges no window.
    assert_eq!(ledger.snapshot(now)[0].used, 2);
    assert!(ledger.try_acquire(&Demand::live(&q), d.retry_at).is_ok());
}

fn synced(name: &str, limit: u32, window: Duration, reserve: u32) -> QuotaConfig {
    QuotaConfig {
        sync: Some("account".into()),
        reserve,
        ..quota(name, limit, window, WindowKind::Sliding)
    }
}

/// A ledger of one 100-per-minute quota synced to the CRM's `account` scope, no reserve.
fn minute_synced() -> Ledger {
    Ledger::new(
        &[synced("m", 100, Duration::from_secs(60), 0)],
        None,
        Time::ZERO,
    )
}

fn account(remaining: u64, reset: Option<Time>) -> Observation {
    Observation {
        scope: "account".into(),
        limit: Some(100),
        remaining: Some(remaining),
        reset,
        cost: None,
    }
}

/// Another app keeps spending while this proxy is quiet: the CRM's last count ages by the rate
/// measured between two answers, so what is left shrinks without a new answer; when the estimate
/// says nothing is left, one call goes to find out and the rest wait for its answer.
#[test]
fn the_crms_count_ages_by_what_other_apps_spend() {
    let ledger = minute_synced();
    let q = [QuotaId(0)];
    let t0 = t("2026-01-01T00:00:00Z");
    let reset = Some(t0 + Duration::from_secs(50));
    let g = ledger.try_acquire(&Demand::live(&q), t0).unwrap();
    ledger.observe(&[account(50, reset)], &g, t0);
    drop(g);
    // Two seconds later the CRM says 39: one call was ours, ten were another app's (5/s).
    let t1 = t0 + Duration::from_secs(2);
    let g = ledger.try_acquire(&Demand::live(&q), t1).unwrap();
    ledger.observe(&[account(39, reset)], &g, t1);
    drop(g);
    assert_eq!(ledger.usage(&q, t1)[0].remaining, 39);
    // Four quiet seconds on, the other app has likely spent 20 more.
    let t2 = t1 + Duration::from_secs(4);
    assert_eq!(ledger.usage(&q, t2)[0].remaining, 19);
    // Eight seconds on, the estimate says none: one call may go to find out, no more.
    let t3 = t1 + Duration::from_secs(8);
    assert_eq!(ledger.usage(&q, t3)[0].remaining, 0);
    let probe = ledger.try_acquire(&Demand::live(&q), t3).unwrap();
    let d = ledger.try_acquire(&Demand::live(&q), t3).unwrap_err();
    assert_eq!(
        d.retry_at,
        t3 + Duration::from_secs(1),
        "waits for the probe's answer"
    );
    // The answer says 12 are left after all: the count is true again.
    ledger.observe(&[account(12, reset)], &probe, t3);
    drop(probe);
    assert_eq!(ledger.usage(&q, t3)[0].remaining, 12);
}

/// News older than a second near the wall: calls go one at a time until an answer comes.
#[test]
fn stale_news_near_the_wall_sends_one_call_at_a_time() {
    let ledger = minute_synced();
    let q = [QuotaId(0)];
    let t0 = t("2026-01-01T00:00:00Z");
    let g = ledger.try_acquire(&Demand::live(&q), t0).unwrap();
    ledger.observe(&[account(20, Some(t0 + Duration::from_secs(50)))], &g, t0);
    drop(g);
    // Fresh news, 20 of 100 left: calls may go in parallel.
    let a = ledger.try_acquire(&Demand::live(&q), t0).unwrap();
    let b = ledger.try_acquire(&Demand::live(&q), t0).unwrap();
    drop((a, b));
    // Two seconds without an answer: one at a time.
    let later = t0 + Duration::from_secs(2);
    let one = ledger.try_acquire(&Demand::live(&q), later).unwrap();
    assert!(ledger.try_acquire(&Demand::live(&q), later).is_err());
    drop(one);
    assert!(ledger.try_acquire(&Demand::live(&q), later).is_ok());
}

#[test]
fn a_crm_report_caps_what_is_left_until_its_reset() {
    let ledger = Ledger::new(
        &[synced("m", 100, Duration::from_secs(60), 2)],
        None,
        Time::ZERO,
    );
    let q = [QuotaId(0)];
    let now = t("2026-01-01T00:00:00Z");
    let g = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    // Another app spent most of the minute: the CRM says 5 left, reset in 40 s. Reserve 2.
    ledger.observe(&[account(5, Some(now + Duration::from_secs(40)))], &g, now);
    drop(g);
    for _ in 0..3 {
        ledger.try_acquire(&Demand::live(&q), now).unwrap();
    }
    let d = ledger.try_acquire(&Demand::live(&q), now).unwrap_err();
    assert_eq!(d.retry_at, now + Duration::from_secs(40));
    assert_eq!(ledger.usage(&q, now)[0].remaining, 0);
    assert_eq!(ledger.snapshot(now)[0].crm_remaining, Some(5));
    // After the CRM's reset only the local window counts again.
    assert!(
        ledger
            .try_acquire(&Demand::live(&q), now + Duration::from_secs(40))
            .is_ok()
    );
}

#[test]
fn resets_in_whole_seconds_are_narrowed_to_the_earliest_a_window_named() {
    let ledger = minute_synced();
    let q = [QuotaId(0)];
    // The CRM's minute really resets at 00:01:00.000. An answer at 00:00:00.200 says "60 s"
    // (rounded up: 00:01:00.200); one at 00:00:00.900 says "60 s" too (00:01:00.900).
    let t0 = t("2026-01-01T00:00:00Z");
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let g = ledger.try_acquire(&Demand::live(&q), at(200)).unwrap();
    ledger.observe(&[account(0, Some(at(60_200)))], &g, at(200));
    drop(g);
    let g = ledger.try_acquire(&Demand::live(&q), at(900));
    assert!(g.is_err(), "the CRM said none are left");
    let probe = ledger.try_acquire(&Demand::live(&q), at(60_200)).unwrap();
    drop(probe);
    // A later answer in the same window naming a later reset keeps the earlier one.
    let ledger = minute_synced();
    let g = ledger.try_acquire(&Demand::live(&q), at(200)).unwrap();
    ledger.observe(&[account(50, Some(at(60_200)))], &g, at(200));
    drop(g);
    let g = ledger.try_acquire(&Demand::live(&q), at(900)).unwrap();
    ledger.observe(&[account(0, Some(at(60_900)))], &g, at(900));
    drop(g);
    assert!(ledger.try_acquire(&Demand::live(&q), at(60_199)).is_err());
    assert!(
        ledger.try_acquire(&Demand::live(&q), at(60_200)).is_ok(),
        "the window opens at the earlier estimate, not 700 ms later"
    );
}

#[test]
fn requests_in_flight_when_the_crm_answered_are_counted_on_top() {
    let ledger = minute_synced();
    let q = [QuotaId(0)];
    let now = t("2026-01-01T00:00:00Z");
    let first = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    // Two more are sent before the first one's answer (remaining 3) arrives.
    ledger.try_acquire(&Demand::live(&q), now).unwrap();
    ledger.try_acquire(&Demand::live(&q), now).unwrap();
    ledger.observe(
        &[account(3, Some(now + Duration::from_secs(30)))],
        &first,
        now,
    );
    drop(first);
    ledger.try_acquire(&Demand::live(&q), now).unwrap();
    assert!(
        ledger.try_acquire(&Demand::live(&q), now).is_err(),
        "3 left after the first request, 2 of them already spent"
    );
}

#[test]
fn an_older_answer_never_replaces_a_newer_one_and_reports_never_loosen_the_window() {
    let ledger = Ledger::new(
        &[synced("m", 3, Duration::from_secs(60), 0)],
        None,
        Time::ZERO,
    );
    let q = [QuotaId(0)];
    let now = t("2026-01-01T00:00:00Z");
    let old = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    let new = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    let reset = Some(now + Duration::from_secs(30));
    ledger.observe(&[account(0, reset)], &new, now);
    ledger.observe(&[account(50, reset)], &old, now);
    assert!(
        ledger.try_acquire(&Demand::live(&q), now).is_err(),
        "the stale, rosier answer was ignored"
    );
    // The CRM claiming plenty never lifts the local limit of 3.
    let ledger = Ledger::new(
        &[synced("m", 3, Duration::from_secs(60), 0)],
        None,
        Time::ZERO,
    );
    let g = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    ledger.observe(&[account(1_000, reset)], &g, now);
    ledger.try_acquire(&Demand::live(&q), now).unwrap();
    ledger.try_acquire(&Demand::live(&q), now).unwrap();
    assert!(ledger.try_acquire(&Demand::live(&q), now).is_err());
}

#[test]
fn an_unsynced_quota_or_an_unconsumed_one_ignores_reports() {
    let ledger = Ledger::new(
        &[
            quota("plain", 10, Duration::from_secs(60), WindowKind::Sliding),
            synced("other", 10, Duration::from_secs(60), 0),
        ],
        None,
        Time::ZERO,
    );
    let now = t("2026-01-01T00:00:00Z");
    let g = ledger
        .try_acquire(&Demand::live(&[QuotaId(0)]), now)
        .unwrap();
    let learned = ledger.observe(&[account(0, None)], &g, now);
    assert!(learned.reported.is_empty());
    assert!(
        ledger
            .try_acquire(&Demand::live(&[QuotaId(0), QuotaId(1)]), now)
            .is_ok()
    );
}

#[test]
fn a_call_that_cost_more_is_charged_in_full() {
    let ledger = Ledger::new(
        &[synced("m", 10, Duration::from_secs(60), 0)],
        None,
        Time::ZERO,
    );
    let q = [QuotaId(0)];
    let now = t("2026-01-01T00:00:00Z");
    let g = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    let obs = Observation {
        cost: Some(4),
        remaining: None,
        ..account(0, None)
    };
    ledger.observe(&[obs], &g, now);
    assert_eq!(ledger.snapshot(now)[0].used, 4);
}

#[test]
fn a_report_without_reset_holds_to_the_end_of_a_fixed_window_or_briefly_on_a_sliding_one() {
    let day = QuotaConfig {
        sync: Some("account".into()),
        ..quota(
            "d",
            100,
            Duration::from_secs(86_400),
            WindowKind::Fixed {
                daily: Some(daily("00:00", "UTC")),
            },
        )
    };
    let ledger = Ledger::new(
        &[day, synced("s", 100, Duration::from_secs(86_400), 0)],
        None,
        Time::ZERO,
    );
    let now = t("2026-01-01T10:00:00Z");
    let g = ledger
        .try_acquire(&Demand::live(&[QuotaId(0), QuotaId(1)]), now)
        .unwrap();
    ledger.observe(&[account(0, None)], &g, now);
    assert_eq!(
        ledger
            .check(&Demand::live(&[QuotaId(0)]), now)
            .unwrap_err()
            .retry_at,
        t("2026-01-02T00:00:00Z")
    );
    assert_eq!(
        ledger
            .check(&Demand::live(&[QuotaId(1)]), now)
            .unwrap_err()
            .retry_at,
        now + Duration::from_secs(60)
    );
}

#[test]
fn near_the_wall_a_synced_quota_sends_one_request_at_a_time() {
    let ledger = minute_synced();
    let q = [QuotaId(0)];
    let now = t("2026-01-01T00:00:00Z");
    let first = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    // The CRM says 9 left: under the careful threshold (10 of 100).
    ledger.observe(
        &[account(9, Some(now + Duration::from_secs(30)))],
        &first,
        now,
    );
    drop(first);
    let second = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    let d = ledger.try_acquire(&Demand::live(&q), now).unwrap_err();
    assert_eq!(
        d.retry_at,
        now + Duration::from_secs(1),
        "waits for the answer in flight"
    );
    drop(second);
    assert!(
        ledger.try_acquire(&Demand::live(&q), now).is_ok(),
        "the answer came back: the next one may go"
    );
}

#[test]
fn a_learned_crm_limit_carries_into_the_next_windows() {
    // Configured for 100 per minute, but the CRM says its limit is 10 and its window resets in 20 s.
    let ledger = Ledger::new(
        &[synced("m", 100, Duration::from_secs(60), 1)],
        None,
        Time::ZERO,
    );
    let q = [QuotaId(0)];
    let now = t("2026-01-01T00:00:00Z");
    let g = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    let reset = now + Duration::from_secs(20);
    let obs = Observation {
        limit: Some(10),
        ..account(9, Some(reset))
    };
    ledger.observe(&[obs], &g, now);
    drop(g);
    let mut granted = 1;
    while ledger.try_acquire(&Demand::live(&q), now).is_ok() {
        granted += 1;
    }
    assert_eq!(granted, 9, "10 - reserve 1 in this window");
    // The next CRM window (reset + 60 s) again allows the CRM's 10, less the reserve, but
    // first one probe: other apps may have spent some of it.
    let probe = ledger.try_acquire(&Demand::live(&q), reset).unwrap();
    assert!(
        ledger.try_acquire(&Demand::live(&q), reset).is_err(),
        "one at a time until the probe's answer"
    );
    drop(probe);
    let mut next = 1;
    while ledger.try_acquire(&Demand::live(&q), reset).is_ok() {
        next += 1;
    }
    assert_eq!(next, 9);
    assert_eq!(
        ledger.check(&Demand::live(&q), reset).unwrap_err().retry_at,
        reset + Duration::from_secs(60)
    );
}

fn two_clients(weights: [u32; 2], cap: Option<u32>, fairness: Fairness) -> Ledger {
    two_clients_at(weights, cap, fairness, Time::ZERO)
}

fn two_clients_at(weights: [u32; 2], cap: Option<u32>, fairness: Fairness, start: Time) -> Ledger {
    let clients: Vec<ClientConfig> = ["a", "default"]
        .iter()
        .zip(weights)
        .map(|(name, weight)| ClientConfig {
            name: (*name).into(),
            weight,
            rules: Vec::new(),
            caps: cap.map(|c| vec![("m".to_string(), c)]).unwrap_or_default(),
        })
        .collect();
    Ledger::shared_by(
        &[quota("m", 40, Duration::from_secs(60), WindowKind::Sliding)],
        None,
        start,
        &clients,
        fairness,
    )
}

fn ask(ledger: &Ledger, client: usize, live: bool, now: Time) -> bool {
    ask_as(ledger, client, live, false, now)
}

fn ask_as(ledger: &Ledger, client: usize, live: bool, read: bool, now: Time) -> bool {
    let q = [QuotaId(0)];
    let d = Demand {
        quotas: &q,
        keys: &[],
        client: ClientId(client),
        live,
        read,
        deferrable: false,
    };
    ledger.try_acquire(&d, now).is_ok()
}

#[test]
fn two_clients_with_backlogs_split_a_window_by_weight() {
    let ledger = two_clients([3, 1], None, Fairness::NONE);
    let now = t("2026-01-01T00:00:00Z");
    // Both have parked writes waiting; A asks first and greedily.
    ledger.board().mark(&[QuotaId(0)], ClientId(0), true);
    ledger.board().mark(&[QuotaId(0)], ClientId(1), true);
    assert!(ask(&ledger, 1, true, now));
    let mut a = 0;
    while ask(&ledger, 0, true, now) {
        a += 1;
    }
    let mut b = 1;
    while ask(&ledger, 1, true, now) {
        b += 1;
    }
    assert_eq!((a, b), (30, 10));
}

#[test]
fn an_idle_clients_share_is_lent_and_returned_when_it_comes_back() {
    let ledger = two_clients([1, 1], None, Fairness::NONE);
    let t0 = t("2026-01-01T00:00:00Z");
    // B is idle: A may take the whole window.
    let mut a = 0;
    while ask(&ledger, 0, true, t0) {
        a += 1;
    }
    assert_eq!(a, 40);
    // B comes back with a backlog while the window is full; when it frees, B gets its half.
    ledger.board().mark(&[QuotaId(0)], ClientId(0), true);
    ledger.board().mark(&[QuotaId(0)], ClientId(1), true);
    let later = t0 + Duration::from_secs(30);
    assert!(!ask(&ledger, 1, true, later));
    let freed = t0 + Duration::from_secs(61);
    assert!(ask(&ledger, 1, true, freed));
    let mut got = (0, 1);
    for _ in 0..60 {
        if ask(&ledger, 0, true, freed) {
            got.0 += 1;
        }
        if ask(&ledger, 1, true, freed) {
            got.1 += 1;
        }
    }
    assert_eq!(got, (20, 20));
}

#[test]
fn a_hard_cap_holds_even_without_contention() {
    let ledger = two_clients([1, 1], Some(5), Fairness::NONE);
    let now = t("2026-01-01T00:00:00Z");
    let mut a = 0;
    while ask(&ledger, 0, true, now) {
        a += 1;
    }
    assert_eq!(a, 5);
}

#[test]
fn the_drain_leaves_a_reserve_while_live_traffic_is_about() {
    let fairness = Fairness {
        live_reserve: 0.1,
        drain_min: 0.0,
        read_reserve: 0.0,
    };
    let t0 = t("2026-01-01T00:00:00Z");
    let ledger = two_clients_at([1, 1], None, fairness, t0);
    // The proxy just started: live traffic counts as about. The drain stops at 36 of 40.
    let mut drained = 0;
    while ask(&ledger, 1, false, t0) {
        drained += 1;
    }
    assert_eq!(drained, 36);
    assert!(ask(&ledger, 0, true, t0), "a live request still finds room");
    // A window later without live requests, the drain may use everything.
    let quiet = t0 + Duration::from_secs(122);
    let mut drained = 0;
    while ask(&ledger, 1, false, quiet) {
        drained += 1;
    }
    assert_eq!(drained, 40);
}

#[test]
fn live_traffic_leaves_the_drain_its_minimum_while_writes_wait() {
    let fairness = Fairness {
        live_reserve: 0.0,
        drain_min: 0.25,
        read_reserve: 0.0,
    };
    let ledger = two_clients([1, 1], None, fairness);
    let now = t("2026-01-01T00:00:00Z");
    // The same client has writes parked and sends live requests (no sharing between clients).
    ledger.board().mark(&[QuotaId(0)], ClientId(1), true);
    let mut live = 0;
    while ask(&ledger, 1, true, now) {
        live += 1;
    }
    assert_eq!(live, 30, "10 of 40 stay for the drain");
    assert!(ask(&ledger, 1, false, now), "the drain gets its minimum");
}

/// Writes, live and parked, leave reads their reserve while reads are about, even when the
/// reads found no room before (that is when they need it); with no read about, writes may take
/// the whole window (the reserve is lent back).
#[test]
fn writes_leave_reads_their_reserve_while_reads_are_about() {
    let fairness = Fairness {
        live_reserve: 0.0,
        drain_min: 0.0,
        read_reserve: 0.25,
    };
    let t0 = t("2026-01-01T00:00:00Z");
    let ledger = two_clients_at([1, 1], None, fairness, t0);
    // No read yet: live writes and the drain take the whole window of 40.
    let mut writes = 0;
    while ask(&ledger, 0, writes % 2 == 0, t0) {
        writes += 1;
    }
    assert_eq!(writes, 40);
    // A read comes and finds nothing; a window later, writes stop at 30 and reads get 10.
    assert!(!ask_as(&ledger, 1, true, true, t0));
    let t1 = t0 + Duration::from_secs(61);
    let mut writes = 0;
    while ask(&ledger, 0, writes % 2 == 0, t1) {
        writes += 1;
    }
    assert_eq!(writes, 30, "10 of 40 stay for reads");
    let mut reads = 0;
    while ask_as(&ledger, 1, true, true, t1) {
        reads += 1;
    }
    assert_eq!(reads, 10);
    // Reads that used their reserve leave writes nothing more; two windows without a read and
    // the reserve is lent back.
    let quiet = t1 + Duration::from_secs(121);
    let mut writes = 0;
    while ask(&ledger, 0, false, quiet) {
        writes += 1;
    }
    assert_eq!(writes, 40);
}

/// A read within the reads' reserve goes before the drain's minimum: live writes took the window
/// before anything was parked, and the room left goes to searches first, then the drain.
#[test]
fn reads_within_their_reserve_go_before_the_drains_minimum() {
    let fairness = Fairness {
        live_reserve: 0.0,
        drain_min: 0.1,
        read_reserve: 0.25,
    };
    let t0 = t("2026-01-01T00:00:00Z");
    let ledger = two_clients_at([1, 1], None, fairness, t0);
    ledger.expect_reads(&[QuotaId(0)], t0);
    let mut writes = 0;
    while ask(&ledger, 0, true, t0) {
        writes += 1;
    }
    assert_eq!(writes, 30, "10 of 40 stay for reads");
    // Now writes are parked: the drain's minimum (4) is held against live writes...
    ledger.board().mark(&[QuotaId(0)], ClientId(0), true);
    assert!(!ask(&ledger, 0, true, t0));
    // ... but not against reads within their reserve: all 10 go.
    let mut reads = 0;
    while ask_as(&ledger, 1, true, true, t0) {
        reads += 1;
    }
    assert_eq!(reads, 10);
}

proptest! {
    /// With a threshold below the limit, the exact sliding log grants exactly while the
    /// reference count is under the threshold.
    #[test]
    fn sliding_log_thresholds_match_reference(limit in 2u32..20, cut in 1u32..20, window_ms in 1_000u64..30_000, times in arrivals(2_000)) {
        let threshold = cut.min(limit);
        let span = window_ms * 1_000_000;
        let mut w = Window::Log(SlidingLog::new(limit, Duration::from_nanos(span)));
        let mut grants: Vec<u64> = Vec::new();
        for &now in &times {
            let count = grants.iter().filter(|&&g| g + span > now).count();
            match w.blocked_below(threshold, Time::from_nanos(now)) {
                None => {
                    prop_assert!(count < threshold as usize);
                    w.charge(Time::from_nanos(now));
                    grants.push(now);
                }
                Some(at) => {
                    prop_assert!(count >= threshold as usize);
                    let later = grants.iter().filter(|&&g| g + span > at.as_nanos()).count();
                    prop_assert!(later < threshold as usize, "room by the promised time");
                }
            }
        }
    }
}

#[test]
fn a_synced_quota_starts_with_one_request_at_a_time_until_an_answer_says_what_is_left() {
    // After a start, what other apps (or this proxy before a restart) spent of the CRM's window
    // is unknown: one probe goes first.
    let now = t("2026-01-01T00:00:00Z");
    let ledger = Ledger::new(&[synced("m", 100, Duration::from_secs(60), 0)], None, now);
    let q = [QuotaId(0)];
    let probe = ledger.try_acquire(&Demand::live(&q), now).unwrap();
    let d = ledger.try_acquire(&Demand::live(&q), now).unwrap_err();
    assert!(
        d.retry_at > now,
        "a second request waits for the probe's answer"
    );
    // The answer: 40 left. Requests go in parallel again, up to what the CRM said.
    ledger.observe(
        &[account(40, Some(now + Duration::from_secs(30)))],
        &probe,
        now,
    );
    drop(probe);
    let parallel: Vec<_> = (0..5)
        .map(|_| ledger.try_acquire(&Demand::live(&q), now).unwrap())
        .collect();
    assert_eq!(parallel.len(), 5);
}

#[test]
fn a_fallback_share_allows_its_first_window_then_its_share_of_each_window() {
    let now = t("2026-01-01T00:00:00Z");
    let ledger = Ledger::new(
        &[quota("m", 30, Duration::from_secs(10), WindowKind::Sliding)],
        None,
        now,
    );
    let q = [QuotaId(0)];
    // Before the shared ledger became unreachable this replica granted 4 of its own.
    for _ in 0..4 {
        ledger.try_acquire(&Demand::live(&q), now).unwrap();
    }
    let first_end = now + Duration::from_secs(10);
    ledger.set_fallback(
        QuotaId(0),
        Some(super::Fallback {
            first_end,
            first_left: 2,
            per_window: 10,
        }),
    );
    // Until every earlier grant left the window: 2 more, then nothing.
    for _ in 0..2 {
        ledger.try_acquire(&Demand::live(&q), now).unwrap();
    }
    let d = ledger.try_acquire(&Demand::live(&q), now).unwrap_err();
    assert_eq!(d.retry_at, first_end);
    // After it: at most its share (10) of its own grants in any window.
    let later = first_end + Duration::from_millis(1);
    let mut granted = 0;
    while ledger.try_acquire(&Demand::live(&q), later).is_ok() {
        granted += 1;
    }
    assert_eq!(granted, 10, "the 6 earlier ones have left the 10 s window");
    // Back to the shared ledger: the whole limit again.
    ledger.set_fallback(QuotaId(0), None);
    assert!(ledger.try_acquire(&Demand::live(&q), later).is_ok());
}

/// A call that never reached the CRM gives back exactly its own slot, in every window kind and
/// in the client's share; the other grants stay counted.
#[test]
fn a_refund_frees_exactly_the_grant_it_names() {
    for kind in [WindowKind::Sliding, WindowKind::Fixed { daily: None }] {
        for window in [Duration::from_secs(60), Duration::from_secs(86_400)] {
            let ledger = Ledger::new(&[quota("q", 3, window, kind.clone())], None, Time::ZERO);
            let q = [QuotaId(0)];
            let start = t("2026-01-01T00:00:10Z");
            let first = ledger.try_acquire(&Demand::live(&q), start).unwrap();
            let later = start + Duration::from_secs(1);
            let second = ledger.try_acquire(&Demand::live(&q), later).unwrap();
            ledger.try_acquire(&Demand::live(&q), later).unwrap();
            assert!(ledger.try_acquire(&Demand::live(&q), later).is_err());
            let now = later + Duration::from_millis(5);
            ledger.refund(&second, &q, now);
            assert_eq!(ledger.snapshot(now)[0].used, 2, "{kind:?} {window:?}");
            assert_eq!(ledger.client_use(now)[0][0], 2, "{kind:?} {window:?}");
            ledger.refund(&first, &q, now);
            assert_eq!(ledger.snapshot(now)[0].used, 1, "{kind:?} {window:?}");
            ledger.try_acquire(&Demand::live(&q), now).unwrap();
            ledger.try_acquire(&Demand::live(&q), now).unwrap();
            assert!(ledger.try_acquire(&Demand::live(&q), now).is_err());
        }
    }
}

#[test]
fn a_schedule_holds_parked_writes_to_what_it_released_and_lets_live_requests_past_it() {
    let span = Duration::from_secs(600);
    let cfg = QuotaConfig {
        schedule: Some(crate::config::Schedule {
            hours: None,
            at_once: 0.1,
        }),
        ..quota("day", 300, span, WindowKind::Fixed { daily: None })
    };
    let ledger = Ledger::new(&[cfg], None, Time::ZERO);
    let q = [QuotaId(0)];
    let drain = Demand {
        live: false,
        ..Demand::live(&q)
    };
    let read = Demand {
        read: true,
        ..Demand::live(&q)
    };
    let start = Time::from_nanos(span.as_nanos() as u64 * 3_000_000);
    for _ in 0..30 {
        ledger.try_acquire(&drain, start).unwrap();
    }
    // 270 calls released evenly over 600 s, each as its 2.22… s begin.
    let ns = Duration::from_nanos(1);
    let d = ledger.try_acquire(&drain, start).unwrap_err();
    assert_eq!(d.retry_at, start + ns);
    assert_eq!(d.binding, Some(QuotaId(0)));
    assert_eq!(ledger.estimate(&q, 0, start), start + ns);
    let step = Duration::from_nanos(600_000_000_000u64 / 270) + ns;
    assert_eq!(ledger.estimate(&q, 1, start), start + step);
    ledger.try_acquire(&drain, start + ns).unwrap();
    let d = ledger.try_acquire(&drain, start + ns).unwrap_err();
    assert_eq!(d.retry_at, start + step);
    assert_eq!(ledger.estimate(&q, 0, start + ns), start + step);
    // Reads and live writes are not held to the schedule.
    for _ in 0..40 {
        ledger.try_acquire(&read, start).unwrap();
        ledger.try_acquire(&Demand::live(&q), start).unwrap();
    }
    // Half-way: 165 released, 111 spent; the drain may take 54 more, then waits again.
    let mid = start + span / 2;
    for _ in 0..54 {
        ledger.try_acquire(&drain, mid).unwrap();
    }
    let d = ledger.try_acquire(&drain, mid).unwrap_err();
    assert!(d.retry_at > mid && d.retry_at <= mid + step, "{d:?}");
    // What nobody used by the end is released to the drain before the reset.
    let late = start + span - Duration::from_nanos(1);
    let mut drained = 0;
    while ledger.try_acquire(&drain, late).is_ok() {
        drained += 1;
    }
    assert_eq!(drained, 300 - 165);
    assert_eq!(ledger.snapshot(late)[0].used, 300);
}
