//! A fixed window's allowance released over the window to deferrable traffic (parked writes):
//! a share at the window's start, the rest evenly across the business hours (or the whole
//! window), all of it by their end. Reads and live requests are not held to it.

use crate::clock::Time;
use crate::config::{QuotaConfig, WindowKind};

/// One window's release: `at_once` calls from the window's start, `limit` from `end`, evenly in
/// between from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    pub start: Time,
    pub end: Time,
    pub at_once: u64,
    pub limit: u64,
    /// The window's reset.
    pub reset: Time,
}

impl Release {
    /// The release of `cfg`'s window `[ws, we)`; `None` when the quota has no schedule. It ends
    /// no later than the window's margin before its reset, when the window stops granting.
    pub fn of(cfg: &QuotaConfig, (ws, we): (Time, Time)) -> Option<Release> {
        let schedule = cfg.schedule.as_ref()?;
        let last = (we - cfg.margin).max(ws);
        let (start, end) = match (schedule.hours, &cfg.kind) {
            (Some((open, close)), WindowKind::Fixed { daily: Some(d) }) => {
                let at = |date: jiff::civil::Date, time: jiff::civil::Time| {
                    d.zone
                        .to_timestamp(date.to_datetime(time))
                        .map(Time::from_timestamp)
                        .unwrap_or(ws)
                };
                let mut day = d.zone.to_datetime(ws.to_timestamp()).date();
                if at(day, open) < ws {
                    day = day.tomorrow().unwrap_or(day);
                }
                (at(day, open), at(day, close))
            }
            _ => (ws, last),
        };
        let start = start.clamp(ws, last);
        let limit = u64::from(cfg.limit);
        Some(Release {
            start,
            end: end.clamp(start, last),
            at_once: ((limit as f64) * schedule.at_once).floor() as u64,
            limit,
            reset: we,
        })
    }

    /// Calls released by `t` (each as soon as its share of the span has begun, so the last is
    /// released before the end, while the window still grants).
    pub fn allowed(&self, t: Time) -> u64 {
        if t >= self.end {
            return self.limit;
        }
        if t <= self.start {
            return self.at_once;
        }
        let span = u128::from(self.end.as_nanos() - self.start.as_nanos());
        let gone = u128::from(t.as_nanos() - self.start.as_nanos());
        let rest = u128::from(self.limit - self.at_once);
        self.at_once + u64::try_from((rest * gone).div_ceil(span)).unwrap_or(u64::MAX)
    }

    /// The earliest time by which `n` calls are released (the window's reset when `n` is more
    /// than it allows).
    pub fn time_for(&self, n: u64) -> Time {
        if n <= self.at_once {
            return Time::ZERO;
        }
        if n > self.limit {
            return self.reset;
        }
        let span = u128::from(self.end.as_nanos() - self.start.as_nanos());
        let rest = u128::from(self.limit - self.at_once);
        let need = u128::from(n - self.at_once - 1);
        let gone = need * span / rest + 1;
        Time::from_nanos(self.start.as_nanos() + u64::try_from(gone).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{DailyReset, QuotaScope, Schedule};

    fn day(hours: Option<(&str, &str)>, at_once: f64) -> QuotaConfig {
        let clock = |s: &str| {
            let (h, m) = s.split_once(':').unwrap();
            jiff::civil::Time::new(h.parse().unwrap(), m.parse().unwrap(), 0, 0).unwrap()
        };
        QuotaConfig {
            name: "day".into(),
            limit: 2_500,
            window: Duration::from_secs(86_400),
            kind: WindowKind::Fixed {
                daily: Some(DailyReset {
                    at: clock("00:00"),
                    zone: jiff::tz::TimeZone::get("America/New_York").unwrap(),
                    zone_name: "America/New_York".into(),
                }),
            },
            scope: QuotaScope::Account,
            margin: Duration::from_secs(1),
            sync: None,
            reserve: 0,
            key: Vec::new(),
            max_keys: 10_000,
            enforce: true,
            schedule: Some(Schedule {
                hours: hours.map(|(a, b)| (clock(a), clock(b))),
                at_once,
            }),
            forecast: true,
        }
    }

    fn t(s: &str) -> Time {
        Time::from_timestamp(s.parse().unwrap())
    }

    #[test]
    fn business_hours_release_a_share_at_once_and_the_rest_evenly_until_they_close() {
        let cfg = day(Some(("08:00", "18:00")), 0.2);
        // 2 December: New York is on UTC-5, so the day runs 05:00Z to 05:00Z.
        let window = (t("2026-12-02T05:00:00Z"), t("2026-12-03T05:00:00Z"));
        let r = Release::of(&cfg, window).unwrap();
        assert_eq!(r.start, t("2026-12-02T13:00:00Z"));
        assert_eq!(r.end, t("2026-12-02T23:00:00Z"));
        assert_eq!(r.at_once, 500);
        assert_eq!(r.allowed(t("2026-12-02T06:00:00Z")), 500);
        // Half-way through business hours: half of the other 2,000.
        assert_eq!(r.allowed(t("2026-12-02T18:00:00Z")), 1_500);
        assert_eq!(r.allowed(t("2026-12-02T23:00:00Z")), 2_500);
        assert_eq!(r.allowed(t("2026-12-03T02:00:00Z")), 2_500);
        // 2,000 calls over 10 hours: one every 18 s, each as its 18 s begin.
        let ns = Duration::from_nanos(1);
        assert_eq!(r.time_for(501), t("2026-12-02T13:00:00Z") + ns);
        assert_eq!(r.time_for(502), t("2026-12-02T13:00:18Z") + ns);
        assert_eq!(r.allowed(r.time_for(502)), 502);
        assert_eq!(
            r.allowed(r.time_for(502) - ns),
            501,
            "time_for is the earliest such time"
        );
        assert_eq!(r.allowed(r.end - ns), 2_500);
        assert_eq!(r.time_for(2_501), window.1);
        assert_eq!(r.time_for(10), Time::ZERO);
    }

    #[test]
    fn without_hours_the_whole_window_is_used_up_to_its_margin() {
        let cfg = day(None, 0.0);
        let window = (t("2026-07-01T04:00:00Z"), t("2026-07-02T04:00:00Z"));
        let r = Release::of(&cfg, window).unwrap();
        assert_eq!(r.start, window.0);
        assert_eq!(r.end, t("2026-07-02T03:59:59Z"));
        assert_eq!(r.allowed(window.0), 0);
        assert_eq!(r.allowed(r.end - Duration::from_nanos(1)), 2_500);
        assert_eq!(
            r.allowed(r.start + (r.end.saturating_since(r.start)) / 2),
            1_250
        );
        for n in [1, 7, 1_250, 2_499, 2_500] {
            let at = r.time_for(n);
            assert!(r.allowed(at) >= n && r.allowed(at - Duration::from_nanos(1)) < n);
        }
    }

    #[test]
    fn no_schedule_no_release() {
        let cfg = QuotaConfig {
            schedule: None,
            ..day(None, 0.0)
        };
        assert!(Release::of(&cfg, (Time::ZERO, Time::from_nanos(1))).is_none());
    }
}
