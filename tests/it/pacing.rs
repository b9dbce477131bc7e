//! The day's budget: a simulated CRM with a short "day" and a short-window cap, a backlog of
//! parked writes at the start of the day and contact searches arriving evenly through it, sent
//! through a proxy that spends the day first come, first served and one that paces it (the
//! `demo --day` scenario, measured at the CRM).

use std::time::Duration;

use crm_quota_proxy::demo::day::{self, DayOptions, DayReport};

async fn run(opts: DayOptions) -> (DayReport, String) {
    let mut out = Vec::new();
    let report = day::run(opts, &mut out).await.unwrap();
    (report, String::from_utf8(out).unwrap())
}

/// What the issue's check asks of the two days.
fn check(opts: &DayOptions, report: &DayReport, text: &str) {
    let (u, p) = (&report.unpaced, &report.paced);
    let limit = opts.limit as usize;
    let day = opts.day.as_secs_f64();
    // Paced: searches answered through the whole day, no CRM 429, the backlog got what the
    // searches left of the day by its end, and the forecast a quarter in was right within 10%.
    assert!(
        p.searches_answered * 100 >= opts.searches * 99,
        "paced searches:\n{text}"
    );
    assert_eq!(p.crm_throttled, 0, "{text}");
    assert_eq!(p.day_used, limit, "the whole day was spent:\n{text}");
    assert_eq!(p.delivered, limit - p.searches_answered, "{text}");
    let exhausted = p.exhausted_at.expect("the day ran out at its end");
    assert!(exhausted > day * 0.95, "not before the end: {text}");
    let forecast = p.forecast_at_quarter.unwrap();
    assert!(
        (forecast - exhausted).abs() <= exhausted * 0.1,
        "forecast {forecast} vs {exhausted}:\n{text}"
    );
    // Unpaced: the backlog spends the day early and the searches after it are refused.
    assert_eq!(u.crm_throttled, 0, "{text}");
    assert_eq!(u.day_used, limit, "{text}");
    let early = u.exhausted_at.unwrap();
    assert!(early < day * 0.75, "{text}");
    assert!(
        u.searches_answered * 100 < opts.searches * 75,
        "unpaced searches fail after the backlog spent the day:\n{text}"
    );
    // The issue asks 10% of the paced day's forecast; the unpaced day's, read while the drain
    // and the refused searches change course, is held to a looser 25%.
    let forecast = u.forecast_at_quarter.unwrap();
    assert!(
        (forecast - early).abs() <= early * 0.25,
        "forecast {forecast} vs {early}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_day_answers_every_search_and_gives_the_backlog_the_rest() {
    let opts = DayOptions::default();
    let (report, text) = run(opts.clone()).await;
    println!("{text}");
    check(&opts, &report, &text);
}

/// The issue's size: 300 calls per 10-minute day and 60 per minute, 600 parked writes, a
/// search every 5 s. Twenty minutes at most (the wait for the day, then the day).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 10-minute day: cargo test --test it -- --ignored ten_minute"]
async fn ten_minute_day_at_the_issues_size() {
    let opts = DayOptions {
        day: Duration::from_secs(600),
        limit: 300,
        burst_limit: 60,
        burst_window: Duration::from_secs(60),
        backlog: 600,
        searches: 120,
        at_once: 0,
    };
    let (report, text) = run(opts.clone()).await;
    println!("{text}");
    check(&opts, &report, &text);
}
