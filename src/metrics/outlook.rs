//! The forecast of long (daily) quotas as gauges: when each runs out, what is left of its
//! business hours, its backlog and how much of it the window can still carry.

use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};

use super::Metrics;
use super::registry::register;

pub struct Outlook {
    eta: GaugeVec,
    business_left: GaugeVec,
    backlog: IntGaugeVec,
    deliverable: IntGaugeVec,
    released: IntGaugeVec,
}

impl Outlook {
    pub(super) fn register(r: &Registry) -> Outlook {
        let q = &["quota"];
        let f = |name: &str, help: &str| register(r, GaugeVec::new(Opts::new(name, help), q));
        let i = |name: &str, help: &str| register(r, IntGaugeVec::new(Opts::new(name, help), q));
        Outlook {
            eta: f(
                "crm_proxy_quota_exhaustion_eta_seconds",
                "Seconds until a daily (long fixed) quota is forecast to run out; the seconds to its reset when it lasts.",
            ),
            business_left: f(
                "crm_proxy_quota_business_left_seconds",
                "Seconds left of a daily quota's business hours (of its window when it has none); 0 once they are over.",
            ),
            backlog: i(
                "crm_proxy_quota_backlog_calls",
                "Calls the parked writes waiting now need of a daily quota (a batch counts once).",
            ),
            deliverable: i(
                "crm_proxy_quota_backlog_deliverable",
                "Of those calls, how many the quota is forecast to carry before its reset.",
            ),
            released: i(
                "crm_proxy_quota_released",
                "Calls a quota's release schedule has let parked writes spend so far in its window.",
            ),
        }
    }
}

impl Metrics {
    /// One daily quota's forecast: `eta` in seconds (to its reset when it lasts).
    pub fn set_forecast(
        &self,
        quota: &str,
        eta: f64,
        business_left: f64,
        backlog: u64,
        deliverable: u64,
        released: Option<u64>,
    ) {
        let o = &self.outlook;
        let l = [quota];
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        o.eta.with_label_values(&l).set(eta);
        o.business_left.with_label_values(&l).set(business_left);
        o.backlog.with_label_values(&l).set(int(backlog));
        o.deliverable.with_label_values(&l).set(int(deliverable));
        if let Some(r) = released {
            o.released.with_label_values(&l).set(int(r));
        }
    }
}
