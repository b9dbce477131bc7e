use http::{HeaderName, HeaderValue};
use proptest::prelude::*;

use super::*;

fn now() -> Time {
    Time::from_timestamp("2026-11-24T10:00:00Z".parse().unwrap())
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn observe(crm: Crm, pairs: &[(&str, &str)]) -> (Vec<Observation>, Vec<&'static str>) {
    let mut bad = Vec::new();
    let obs = crm.observe(&headers(pairs), now(), &mut |name| bad.push(name));
    (obs, bad)
}

#[test]
fn zendesk_account_and_endpoint_buckets() {
    let (obs, bad) = observe(
        Crm::Zendesk,
        &[
            ("x-rate-limit", "700"),
            ("x-rate-limit-remaining", "699"),
            ("ratelimit-limit", "700"),
            ("ratelimit-remaining", "650"),
            ("ratelimit-reset", "41"),
            (
                "zendesk-ratelimit-tickets-update",
                "total=100; remaining=99; resets=41",
            ),
        ],
    );
    assert!(bad.is_empty());
    assert_eq!(obs[0].scope, "account");
    assert_eq!(
        (obs[0].limit, obs[0].remaining),
        (Some(700), Some(650)),
        "the lower remaining wins"
    );
    assert_eq!(obs[0].reset, Some(now() + Duration::from_secs(41)));
    assert_eq!(obs[1].scope, "tickets-update");
    assert_eq!((obs[1].limit, obs[1].remaining), (Some(100), Some(99)));
}

#[test]
fn salesforce_daily_usage_and_per_app_usage() {
    let (obs, _) = observe(
        Crm::Salesforce,
        &[(
            "sforce-limit-info",
            "api-usage=10018/100000; per-app-api-usage=17/250(appName=ccai)",
        )],
    );
    assert_eq!(obs.len(), 2);
    assert_eq!(
        (obs[0].scope.as_ref(), obs[0].limit, obs[0].remaining),
        ("daily", Some(100_000), Some(89_982))
    );
    assert_eq!(
        (obs[1].scope.as_ref(), obs[1].remaining),
        ("per-app", Some(233))
    );
    let (obs, bad) = observe(Crm::Salesforce, &[("sforce-limit-info", "api-usage=lots")]);
    assert!(obs.is_empty());
    assert_eq!(bad, vec!["sforce-limit-info"]);
}

#[test]
fn hubspot_burst_and_daily() {
    let (obs, _) = observe(
        Crm::HubSpot,
        &[
            ("x-hubspot-ratelimit-max", "190"),
            ("x-hubspot-ratelimit-remaining", "12"),
            ("x-hubspot-ratelimit-interval-milliseconds", "10000"),
            ("x-hubspot-ratelimit-daily", "625000"),
            ("x-hubspot-ratelimit-daily-remaining", "600000"),
        ],
    );
    let burst = obs.iter().find(|o| o.scope == "burst").unwrap();
    assert_eq!(
        (burst.remaining, burst.reset),
        (Some(12), Some(now() + Duration::from_secs(10)))
    );
    let daily = obs.iter().find(|o| o.scope == "daily").unwrap();
    assert_eq!(
        (daily.limit, daily.remaining, daily.reset),
        (Some(625_000), Some(600_000), None)
    );
}

#[test]
fn freshdesk_reports_the_cost_of_a_call() {
    let (obs, _) = observe(
        Crm::Freshdesk,
        &[
            ("x-ratelimit-total", "400"),
            ("x-ratelimit-remaining", "390"),
            ("x-ratelimit-used-currentrequest", "3"),
        ],
    );
    assert_eq!((obs[0].remaining, obs[0].cost), (Some(390), Some(3)));
    let (obs, _) = observe(Crm::Freshdesk, &[("x-ratelimit-used-currentrequest", "1")]);
    assert!(obs.is_empty(), "a cost of one says nothing new");
}

#[test]
fn resets_are_read_as_delays_unix_times_or_dates() {
    let unix = now().as_nanos() / 1_000_000_000 + 30;
    for (value, expected) in [
        ("30".to_string(), now() + Duration::from_secs(30)),
        (unix.to_string(), now() + Duration::from_secs(30)),
        ((unix * 1000).to_string(), now() + Duration::from_secs(30)),
        (
            "2026-11-24T10:00:30Z".to_string(),
            now() + Duration::from_secs(30),
        ),
        (
            "Tue, 24 Nov 2026 10:00:30 GMT".to_string(),
            now() + Duration::from_secs(30),
        ),
    ] {
        let (obs, bad) = observe(
            Crm::Kustomer,
            &[
                ("x-ratelimit-remaining", "5"),
                ("x-ratelimit-reset", &value),
            ],
        );
        assert!(bad.is_empty(), "{value}");
        assert_eq!(obs[0].reset, Some(expected), "{value}");
    }
    // In the past, or months ahead: not trusted.
    for value in ["1000000000", "2030-01-01T00:00:00Z"] {
        let (obs, bad) = observe(
            Crm::Kustomer,
            &[("x-ratelimit-remaining", "5"), ("x-ratelimit-reset", value)],
        );
        assert_eq!(obs[0].reset, None);
        assert_eq!(bad, vec!["x-ratelimit-reset"]);
    }
}

#[test]
fn servicenow_gives_a_limit_and_a_reset_but_no_remaining() {
    let reset = (now().as_nanos() / 1_000_000_000 + 600).to_string();
    let (obs, _) = observe(
        Crm::ServiceNow,
        &[
            ("x-ratelimit-limit", "1000"),
            ("x-ratelimit-reset", &reset),
            ("x-ratelimit-rule", "abc"),
        ],
    );
    assert_eq!((obs[0].limit, obs[0].remaining), (Some(1000), None));
    assert_eq!(obs[0].reset, Some(now() + Duration::from_secs(600)));
}

#[test]
fn malformed_values_are_counted_and_ignored() {
    let (obs, bad) = observe(
        Crm::Zendesk,
        &[
            ("x-rate-limit-remaining", "-4"),
            ("zendesk-ratelimit-search-index", "total=abc"),
        ],
    );
    assert!(obs.is_empty());
    assert_eq!(bad, vec!["x-rate-limit-remaining", "zendesk-ratelimit-*"]);
}

#[test]
fn salesforce_403_is_a_throttle_only_with_request_limit_exceeded() {
    let h = HeaderMap::new();
    let denied = br#"[{"message":"Insufficient access","errorCode":"INSUFFICIENT_ACCESS"}]"#;
    assert_eq!(
        Crm::Salesforce.throttle(StatusCode::FORBIDDEN, &h, denied, &[], now()),
        None
    );
    let limit =
        br#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
    let t = Crm::Salesforce
        .throttle(StatusCode::FORBIDDEN, &h, limit, &[], now())
        .unwrap();
    assert_eq!(
        (t.scope.as_deref(), t.reason),
        (Some("daily"), "request_limit_exceeded")
    );
    assert_eq!(t.until, Some(now() + Duration::from_secs(300)));
    assert!(
        Crm::Zendesk
            .throttle(StatusCode::FORBIDDEN, &h, limit, &[], now())
            .is_none()
    );
}

#[test]
fn hubspot_policy_names_pick_the_scope() {
    let h = HeaderMap::new();
    let daily = br#"{"status":"error","message":"You have reached your daily limit.","errorType":"RATE_LIMIT","policyName":"DAILY"}"#;
    let t = Crm::HubSpot
        .throttle(StatusCode::TOO_MANY_REQUESTS, &h, daily, &[], now())
        .unwrap();
    assert_eq!(
        (t.scope.as_deref(), t.until),
        (Some("daily"), None),
        "until the daily window ends"
    );
    let burst = br#"{"policyName":"TEN_SECONDLY_ROLLING"}"#;
    let t = Crm::HubSpot
        .throttle(StatusCode::TOO_MANY_REQUESTS, &h, burst, &[], now())
        .unwrap();
    assert_eq!(
        (t.scope.as_deref(), t.until),
        (Some("burst"), Some(now() + Duration::from_secs(10)))
    );
}

#[test]
fn a_zendesk_429_names_the_exhausted_bucket_and_retry_after_wins() {
    let h = headers(&[
        ("retry-after", "7"),
        ("x-rate-limit-remaining", "300"),
        (
            "zendesk-ratelimit-tickets-update",
            "total=100; remaining=0; resets=41",
        ),
    ]);
    let mut bad = |_| {};
    let obs = Crm::Zendesk.observe(&h, now(), &mut bad);
    let t = Crm::Zendesk
        .throttle(StatusCode::TOO_MANY_REQUESTS, &h, b"", &obs, now())
        .unwrap();
    assert_eq!(
        (t.scope.as_deref(), t.reason),
        (Some("tickets-update"), "endpoint")
    );
    assert_eq!(t.until, Some(now() + Duration::from_secs(7)));
    // Without Retry-After, the bucket's own reset.
    let h = headers(&[(
        "zendesk-ratelimit-tickets-update",
        "total=100; remaining=0; resets=41",
    )]);
    let obs = Crm::Zendesk.observe(&h, now(), &mut bad);
    let t = Crm::Zendesk
        .throttle(StatusCode::TOO_MANY_REQUESTS, &h, b"", &obs, now())
        .unwrap();
    assert_eq!(t.until, Some(now() + Duration::from_secs(41)));
    assert!(
        Crm::Zendesk
            .throttle(StatusCode::OK, &h, b"", &obs, now())
            .is_none()
    );
}

const NAMES: &[&str] = &[
    "retry-after",
    "x-rate-limit",
    "x-rate-limit-remaining",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "zendesk-ratelimit-tickets-update",
    "sforce-limit-info",
    "x-hubspot-ratelimit-max",
    "x-hubspot-ratelimit-remaining",
    "x-hubspot-ratelimit-interval-milliseconds",
    "x-hubspot-ratelimit-daily",
    "x-hubspot-ratelimit-daily-remaining",
    "x-ratelimit-total",
    "x-ratelimit-remaining",
    "x-ratelimit-used-currentrequest",
    "x-ratelimit-limit",
    "x-ratelimit-reset",
];

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        any::<i64>().prop_map(|n| n.to_string().into_bytes()),
        "[ -~]{0,40}".prop_map(String::into_bytes),
        "(total|remaining|resets|api-usage)=[0-9a-z/;= ]{0,20}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

proptest! {
    /// Random and malformed header values never panic, and whatever is read stays sane.
    #[test]
    fn header_fuzz_never_panics(pairs in prop::collection::vec((0..NAMES.len(), value()), 0..12), status in 100u16..600, body in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut h = HeaderMap::new();
        for (i, v) in pairs {
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                h.append(HeaderName::from_static(NAMES[i]), v);
            }
        }
        let status = StatusCode::from_u16(status).unwrap();
        for crm in Crm::ALL {
            let mut bad = 0;
            let obs = crm.observe(&h, now(), &mut |_| bad += 1);
            for o in &obs {
                if let Some(r) = o.reset {
                    prop_assert!(r >= now() && r <= now() + Duration::from_secs(7 * 86_400));
                }
            }
            if let Some(t) = crm.throttle(status, &h, &body, &obs, now())
                && let Some(u) = t.until
            {
                prop_assert!(u >= now());
            }
        }
    }
}

/// The header-error metric's label values known at start are exactly the names `observe`
/// reports for malformed headers: every listed header, garbled, is reported under its name,
/// and nothing else is.
#[test]
fn the_listed_rate_limit_headers_are_those_observe_reads() {
    for crm in Crm::ALL {
        let mut headers = HeaderMap::new();
        for name in crm.rate_limit_headers() {
            let name = name.replace('*', "bucket");
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_static("garbage"),
            );
        }
        let mut reported = Vec::new();
        crm.observe(&headers, Time::from_nanos(1), &mut |h| reported.push(h));
        reported.sort_unstable();
        reported.dedup();
        let mut listed = crm.rate_limit_headers().to_vec();
        listed.sort_unstable();
        assert_eq!(reported, listed, "{}", crm.name());
    }
}
