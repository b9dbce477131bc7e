//! Cost of one ledger decision for a route consuming a minute and a day quota (target: median < 200 ns).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use crm_quota_proxy::clock::Time;
use crm_quota_proxy::config::Config;
use crm_quota_proxy::ids::QuotaId;
use crm_quota_proxy::quota::{Demand, Ledger};

fn ledger(yaml_quotas: &str) -> Ledger {
    let yaml = format!("upstream: {{ url: http://crm.test }}\nquotas:\n{yaml_quotas}");
    let config = Config::from_yaml(&yaml, None).unwrap();
    Ledger::new(&config.quotas, None, Time::ZERO)
}

const MINUTE_DAY: &str = "  - { name: minute, limit: 400, window: 1m }\n  - { name: day, limit: 2500, window: 1d, kind: fixed, time_zone: America/New_York }\n";

fn decisions(c: &mut Criterion) {
    let both = [QuotaId(0), QuotaId(1)];
    let start = Time::from_timestamp("2026-06-01T00:00:00Z".parse().unwrap());

    // Granted every time: time advances 35 s per decision, just over 1/2500 of a day.
    let l = ledger(MINUTE_DAY);
    let mut now = start;
    c.bench_function("ledger/grant minute+day", |b| {
        b.iter(|| {
            now = now + Duration::from_secs(35);
            black_box(l.try_acquire(black_box(&Demand::live(&both)), now)).ok();
        })
    });

    // Refused every time: the minute is spent.
    let l = ledger(MINUTE_DAY);
    for _ in 0..400 {
        l.try_acquire(&Demand::live(&both), start).unwrap();
    }
    c.bench_function("ledger/deny minute+day", |b| {
        b.iter(|| black_box(l.try_acquire(black_box(&Demand::live(&both)), start)).err())
    });

    // A Salesforce-sized rolling day (bucketed sliding window) plus a minute, granted every time.
    let l = ledger(
        "  - { name: minute, limit: 2000, window: 1m }\n  - { name: day, limit: 1000000, window: 1d }\n",
    );
    let mut now = start;
    c.bench_function("ledger/grant minute+rolling day (bucketed)", |b| {
        b.iter(|| {
            now = now + Duration::from_millis(100);
            black_box(l.try_acquire(black_box(&Demand::live(&both)), now)).ok();
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = decisions
}
criterion_main!(benches);
