//! The forecast of a long fixed window (a daily quota): from what it has spent, the recent rate
//! of live requests and the backlog of parked writes, when it runs out and how much of the
//! backlog it can still carry before its reset.

use std::time::Duration;

use serde::Serialize;

use super::Ledger;
use super::schedule::Release;
use super::share::ClientUse;
use super::state::{about, reserve_share};
use crate::clock::Time;
use crate::config::{QuotaConfig, QuotaScope};
use crate::ids::QuotaId;

/// Steps of the projection from now to the window's reset.
const STEPS: u32 = 600;

/// One long window's outlook for `/status` and metrics.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Forecast {
    pub quota: String,
    pub limit: u32,
    /// Calls counted in the window (account-wide with the shared ledger).
    pub used: u64,
    pub reset_at: String,
    /// What the release schedule has let parked writes spend by now (`None`: no schedule).
    pub released: Option<u64>,
    /// Live requests' (reads included) recent rate, calls per minute.
    pub live_per_minute: f64,
    /// Seconds until the quota is forecast to run out; `None` when it lasts until its reset.
    pub exhaustion_eta_seconds: Option<f64>,
    /// Seconds left of the business hours (of the window without hours): running out before
    /// they end is what the alert warns of. 0 once they are over.
    pub business_left_seconds: f64,
    pub seconds_to_reset: f64,
    /// Calls the parked writes still need of this quota, and how many of them the window is
    /// forecast to carry before its reset.
    pub backlog_calls: u64,
    pub backlog_deliverable: u64,
}

/// What the projection starts from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    pub limit: u64,
    pub used: u64,
    pub now: Time,
    /// The end of what the window grants (its reset less its margin).
    pub last: Time,
    pub release: Option<Release>,
    /// Calls per second of live requests (reads included), and the most the drain could send
    /// beside them.
    pub live_rate: f64,
    pub drain_rate: f64,
    pub backlog: u64,
    /// What the drain leaves to others: the reads' and live requests' reserves (calls in the
    /// window, 0 while the class is not about), what each has used of it, and the reads' rate.
    pub read_reserve: u64,
    pub read_used: u64,
    pub read_rate: f64,
    pub live_reserve: u64,
    pub live_used: u64,
}

/// When (if before `last`) the spend reaches the limit, and how much of the backlog goes
/// before then: live requests at their recent rate, the drain as fast as `drain_rate`, the
/// release schedule and the reserves it leaves allow, until the backlog is through.
pub fn project(i: &Inputs) -> (Option<Time>, u64) {
    let limit = i.limit as f64;
    let mut total = i.used as f64;
    if total >= limit {
        return (Some(i.now), 0);
    }
    let span = i.last.saturating_since(i.now);
    let step = span / STEPS;
    let mut drained = 0.0_f64;
    let (mut reads, mut lives) = (i.read_used as f64, i.live_used as f64);
    let mut t = i.now;
    for k in 1..=STEPS {
        let next = if k == STEPS { i.last } else { i.now + step * k };
        let dt = next.saturating_since(t).as_secs_f64();
        let live = (i.live_rate * dt).min(limit - total);
        total += live;
        lives += live;
        reads += (i.read_rate * dt).min(live);
        let held = (i.read_reserve as f64 - reads)
            .max(i.live_reserve as f64 - lives)
            .max(0.0);
        let released = i.release.map_or(limit, |r| r.allowed(next) as f64);
        let drain = (i.drain_rate * dt)
            .min(i.backlog as f64 - drained)
            .min((released.min(limit - held) - total).max(0.0));
        total += drain;
        drained += drain;
        if total >= limit - 1e-9 {
            // Linear inside the step: the moment the last call went.
            let before = total - live - drain;
            let frac = ((limit - before) / (live + drain).max(f64::MIN_POSITIVE)).clamp(0.0, 1.0);
            let at = t + Duration::from_secs_f64(dt * frac);
            return (Some(at), drained.floor() as u64);
        }
        t = next;
    }
    (None, drained.floor() as u64)
}

impl Ledger {
    /// A live request (`read`: a read) was refused for want of room on `quotas`: its demand
    /// still counts in the forecast.
    pub fn refused(&self, quotas: &[QuotaId], read: bool, now: Time) {
        let mut inner = self.lock();
        for q in quotas {
            let Some(state) = inner.quotas.get_mut(q.0) else {
                continue;
            };
            state.live_refused.charge(now);
            if read {
                state.read_refused.charge(now);
            }
        }
    }

    /// The outlook of every quota with `forecast` on (long fixed windows): `backlog(q)` gives
    /// the calls parked writes need of `q`, `account(q, window)` the shared ledger's count of
    /// `q` in that window, when one is known.
    pub fn forecasts(
        &self,
        backlog: &dyn Fn(QuotaId) -> u64,
        account: &dyn Fn(QuotaId, (Time, Time)) -> Option<u64>,
        now: Time,
    ) -> Vec<Forecast> {
        let mut inner = self.lock();
        let configs = inner.configs.clone();
        let pace = inner.pacer.as_ref().map(|p| p.pace().per_second);
        let fairness = inner.sharing.fairness;
        let mut out = Vec::new();
        for (i, cfg) in configs.iter().enumerate() {
            if !cfg.forecast {
                continue;
            }
            let state = &mut inner.quotas[i];
            let Some(bounds) = state.window.fixed_bounds(now) else {
                continue;
            };
            let local = u64::from(state.window.used(now));
            let used = account(QuotaId(i), bounds).map_or(local, |a| a.max(local));
            let horizon = (cfg.window / 12).min(now.saturating_since(bounds.0));
            // With the shared ledger, this replica's mix of traffic scaled to the account's.
            let scale = if local > 0 {
                used as f64 / local as f64
            } else {
                1.0
            };
            // Demand: what was granted and what was refused for want of room (it spends the
            // quota as soon as there is room again).
            let rate = |granted: &mut ClientUse, refused: &mut ClientUse| {
                let (calls, over) = granted.recent(horizon, now);
                let (more, _) = refused.recent(horizon, now);
                (calls + more) as f64 / over.as_secs_f64().max(1e-3) * scale
            };
            let live_rate = rate(&mut state.live_use, &mut state.live_refused);
            let read_rate = rate(&mut state.read_use, &mut state.read_refused);
            let reserve = |f: f64, at: Time| {
                if about(cfg, at, now) {
                    reserve_share(cfg, f)
                } else {
                    0
                }
            };
            let drain_rate = (drain_ceiling(&configs, cfg, pace) - live_rate).max(0.0);
            let release = Release::of(cfg, bounds);
            let backlog_calls = backlog(QuotaId(i));
            let (runs_out, deliverable) = project(&Inputs {
                limit: u64::from(cfg.limit),
                used,
                now,
                last: (bounds.1 - cfg.margin).max(now),
                release,
                live_rate,
                drain_rate,
                backlog: backlog_calls,
                read_reserve: reserve(fairness.read_reserve, state.last_read),
                read_used: (state.read_use.used(now) as f64 * scale) as u64,
                read_rate,
                live_reserve: reserve(fairness.live_reserve, state.last_live),
                live_used: (state.live_use.used(now) as f64 * scale) as u64,
            });
            let business_end = release
                .filter(|_| matches!(cfg.schedule, Some(ref s) if s.hours.is_some()))
                .map_or(bounds.1, |r| r.end);
            out.push(Forecast {
                quota: cfg.name.clone(),
                limit: cfg.limit,
                used,
                reset_at: bounds.1.to_string(),
                released: release.map(|r| r.allowed(now)),
                live_per_minute: live_rate * 60.0,
                exhaustion_eta_seconds: runs_out.map(|t| t.saturating_since(now).as_secs_f64()),
                business_left_seconds: business_end.saturating_since(now).as_secs_f64(),
                seconds_to_reset: bounds.1.saturating_since(now).as_secs_f64(),
                backlog_calls,
                backlog_deliverable: deliverable.min(backlog_calls),
            });
        }
        out
    }
}

/// The most calls per second the drain could send on `cfg` if its own window had room: what
/// the shorter account-wide windows and the upstream pace allow (unbounded without them).
fn drain_ceiling(configs: &[QuotaConfig], cfg: &QuotaConfig, pace: Option<f64>) -> f64 {
    configs
        .iter()
        .filter(|c| {
            c.scope == QuotaScope::Account && c.enforce && c.key.is_empty() && c.window < cfg.window
        })
        .map(|c| f64::from(c.limit) / c.window.as_secs_f64())
        .chain(pace)
        .fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn at(s: u64) -> Time {
        Time::from_nanos(s * S)
    }

    fn inputs() -> Inputs {
        Inputs {
            limit: 300,
            used: 0,
            now: at(0),
            last: at(600),
            release: None,
            live_rate: 0.2,
            drain_rate: 1.0,
            backlog: 600,
            read_reserve: 0,
            read_used: 0,
            read_rate: 0.0,
            live_reserve: 0,
            live_used: 0,
        }
    }

    #[test]
    fn an_unpaced_backlog_spends_the_window_early() {
        // 1.2 calls per second: 300 gone at 250 s; the drain took 250 of them.
        let (runs_out, delivered) = project(&inputs());
        let secs = runs_out.unwrap().saturating_since(at(0)).as_secs_f64();
        assert!((secs - 250.0).abs() < 1.0, "{secs}");
        assert_eq!(delivered, 250);
    }

    #[test]
    fn a_paced_backlog_lasts_to_the_end_of_the_release_and_gets_what_live_requests_leave() {
        let release = Release {
            start: at(0),
            end: at(600),
            at_once: 0,
            limit: 300,
            reset: at(600),
        };
        let (runs_out, delivered) = project(&Inputs {
            release: Some(release),
            ..inputs()
        });
        let secs = runs_out.unwrap().saturating_since(at(0)).as_secs_f64();
        assert!(secs > 590.0, "{secs}");
        // Live requests take 0.2/s of the 0.5/s released: 120; the backlog the other 180.
        assert!((178..=180).contains(&delivered), "{delivered}");
    }

    #[test]
    fn the_drain_leaves_the_reads_their_reserve_until_they_have_used_it() {
        // 60 held for reads that come at 0.1/s (of 0.2/s live) and have used 10: the drain
        // (1/s) meets the reserve at 227 s (250/1.1 s, 272.7 spent); then only live
        // requests spend, 0.2/s, for the last 27.3: gone at 363.6 s.
        let (runs_out, delivered) = project(&Inputs {
            read_reserve: 60,
            read_used: 10,
            read_rate: 0.1,
            ..inputs()
        });
        let secs = runs_out.unwrap().saturating_since(at(0)).as_secs_f64();
        assert!((secs - 363.6).abs() < 2.0, "{secs}");
        assert!((226..=228).contains(&delivered), "{delivered}");
    }

    #[test]
    fn a_quiet_window_lasts_and_a_small_backlog_is_all_deliverable() {
        let (runs_out, delivered) = project(&Inputs {
            backlog: 40,
            live_rate: 0.1,
            ..inputs()
        });
        assert_eq!(runs_out, None);
        assert_eq!(delivered, 40);
        let (runs_out, _) = project(&Inputs {
            used: 300,
            ..inputs()
        });
        assert_eq!(runs_out, Some(at(0)));
    }
}
