use super::*;
use crate::crm::Crm;

const MINIMAL: &str = r#"
upstream:
  url: https://acme.zendesk.com
quotas:
  - name: minute
    limit: 400
    window: 1m
"#;

fn errors(yaml: &str) -> Vec<String> {
    Config::from_yaml(yaml, None)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = Config::from_yaml(MINIMAL, None).unwrap();
    assert_eq!(c.listen.data.to_string(), "0.0.0.0:8080");
    assert_eq!(c.listen.admin.to_string(), "127.0.0.1:9090");
    assert_eq!(c.max_body_bytes, 10 << 20);
    assert_eq!(c.default_max_wait, Duration::from_secs(5));
    assert_eq!(c.queue.max_entries, 10_000);
    assert_eq!(c.queue.ttl, Duration::from_secs(86_400));
    assert_eq!(c.queue.data_dir, None, "the memory store by default");
    assert_eq!(c.queue.compact_bytes, 64 << 20);
    assert_eq!(c.upstream.request_timeout, Duration::from_secs(30));
    assert_eq!(c.quotas[0].kind, WindowKind::Sliding);
    assert_eq!(c.quotas[0].scope, QuotaScope::Account);
    assert_eq!(c.quotas[0].margin, Duration::from_millis(100));
    assert!(c.routes.is_empty());
}

#[test]
fn upstream_url_can_come_from_the_environment_value() {
    let c = Config::from_yaml(MINIMAL, Some("http://127.0.0.1:9999/prefix/")).unwrap();
    assert_eq!(c.upstream.url.to_string(), "http://127.0.0.1:9999/prefix/");
    assert_eq!(c.upstream.path_prefix(), "/prefix");
    let e = Config::from_yaml(MINIMAL, Some("ftp://x"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstream.url (from CRM_PROXY_UPSTREAM_URL)"),
        "{e}"
    );
}

#[test]
fn every_problem_is_reported_at_once_with_its_path() {
    let yaml = r#"
listen:
  data: "nowhere"
  admin: 127.0.0.1:9090
  extra: 1
upstream:
  url: "acme.zendesk.com"
  connect_timeout: 5 seconds
  pace: { per_second: 0 }
max_body_bytes: 10 parsecs
quotas:
  - name: minute
    limit: 400
    window: 1m
  - name: day
    limit: 2500
    window: 1 dya
  - name: minute
    limit: -3
    window: 1m
    kind: rolling
  - name: "bad name!"
    limit: 10
    window: 1m
    scope: route
  - name: tz
    limit: 10
    window: 1d
    kind: fixed
    time_zone: Mars/Olympus
    reset_at: "25:00"
  - name: edge
    limit: 10
    window: 10s
    margin: 6s
    reset_at: "00:00"
  - just a string
routes:
  - name: default
    methods: [post, BREW]
    path: tickets
    class: update
    on_limit: park
    quotas: [nope, minute]
  - name: search
    methods: [GET]
    path: /api/v2/search
    on_limit: queue
  - name: search
    path: [/ok, "/bad/**/x"]
    on_limit: reject
    max_wait: 1s
  - methods: [POST]
queue:
  max_entries: 0
  max_bytes: 1KiB
  backoff_initial: 10s
  backoff_max: 1s
  ttl: 1s
"#;
    let got = errors(yaml);
    let expected = [
        "listen.extra: unknown field (expected one of: data, admin, max_concurrent_requests, max_connections, header_timeout, idle_timeout, body_timeout, body_min_rate, max_buffered_bytes, h2_max_streams, data_threads, admin_token_file, admin_open)",
        "listen.data: \"nowhere\" is not an address (write IP:port, e.g. 0.0.0.0:8080)",
        "upstream.url: \"acme.zendesk.com\" must start with http:// or https://",
        "upstream.connect_timeout: \"5 seconds\" is not a duration: unknown unit \"seconds\" (write 5s); units: ms, s, m (or min), h, d, e.g. 250ms, 10s, 1m, 1h30m, 1d",
        "upstream.pace.per_second: must be from 0.000278 (one an hour) to 1000000",
        "max_body_bytes: \"10 parsecs\" is not a size (write bytes or a number and a unit: 512KiB, 10MiB)",
        "queue.max_entries: must be from 1 to 100000000",
        "queue.backoff_max: must be at least queue.backoff_initial",
        "quotas[1].window: \"1 dya\" is not a duration: unknown unit \"dya\"; units: ms, s, m (or min), h, d, e.g. 250ms, 10s, 1m, 1h30m, 1d",
        "quotas[2].limit: invalid value: integer `-3`, expected u32",
        "quotas[2].kind: \"rolling\" is not a window kind (sliding or fixed)",
        "quotas[2].name: \"minute\" is used twice",
        "quotas[3].name: \"bad name!\" must be 1-64 letters, digits, '-' or '_'",
        "quotas[4].reset_at: \"25:00\" is not a time of day (write HH:MM, e.g. 00:00)",
        "quotas[4].time_zone: \"Mars/Olympus\" is not an IANA time zone (e.g. America/New_York)",
        "quotas[5].margin: must be less than half the window",
        "quotas[5].reset_at: applies only to kind: fixed with window: 1d",
        "quotas[6]: invalid type: string \"just a string\", expected struct RawQuota",
        "routes[0].name: \"default\" is reserved for unmatched requests",
        "routes[0].methods[0]: \"post\" is not an HTTP method (write it in capitals, e.g. POST)",
        "routes[0].path: \"tickets\" must start with '/'",
        "routes[0].class: \"update\" is not a class (read or write)",
        "routes[0].on_limit: \"park\" is not an action (queue, wait or reject)",
        "routes[0].quotas[0]: no quota is named \"nope\"",
        "routes[0].quotas[1]: \"minute\" has scope account: every route consumes it already",
        "routes[1].on_limit: a read cannot be queued (a 202 carries no data); use wait or reject",
        "routes[2].path[1]: \"/bad/**/x\": '**' may only be the last segment",
        "routes[2].max_wait: applies only to on_limit: queue or wait",
        "routes[2].name: \"search\" is used twice",
        "routes[3].name: is required",
        "routes[3].path: is required",
        "queue.max_bytes: must be at least max_body_bytes (10485760), or a body of that size could never be parked",
        "default_max_wait: must be shorter than queue.ttl",
        "routes[0].max_wait: must be shorter than queue.ttl",
        "routes[1].max_wait: must be shorter than queue.ttl",
        "quotas[3].scope: quota \"bad name!\" has scope route but no route lists it in its quotas",
    ];
    for e in &expected {
        assert!(
            got.contains(&e.to_string()),
            "missing {e:?} in:\n{}",
            got.join("\n")
        );
    }
    // BREW is a valid extension method token; everything reported is expected.
    let unexpected: Vec<&String> = got
        .iter()
        .filter(|g| !expected.contains(&g.as_str()))
        .collect();
    assert!(unexpected.is_empty(), "unexpected: {unexpected:#?}");
}

#[test]
fn missing_sections_are_required() {
    assert_eq!(
        errors("listen: {}\n"),
        vec!["upstream: is required", "quotas: is required"]
    );
    assert_eq!(errors("  \n"), vec!["the config is empty"]);
    assert_eq!(
        errors("upstream: {}\nquotas: []\n"),
        vec![
            "upstream.url: is required",
            "quotas: must list at least one quota"
        ]
    );
}

#[test]
fn unknown_top_level_and_nested_fields_are_errors() {
    let yaml = format!("{MINIMAL}\nqueu:\n  ttl: 1h\n");
    let got = errors(&yaml);
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with(
        "queu: unknown field (expected one of: preset, plan, clients, fairness, listen, upstream"
    ));
    let yaml = MINIMAL.replace("window: 1m", "window: 1m\n    windw: 2m");
    assert_eq!(
        errors(&yaml),
        vec![
            "quotas[0].windw: unknown field (expected one of: name, limit, window, kind, scope, reset_at, time_zone, margin, sync, reserve, key, max_keys, enforce, schedule, forecast)"
        ]
    );
}

#[test]
fn yaml_syntax_errors_carry_a_position() {
    let got = errors("upstream:\n  url: [unclosed\n");
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with("not valid YAML (line "), "{}", got[0]);
}

#[test]
fn routes_take_their_class_and_action_from_their_methods() {
    let yaml = format!(
        "{MINIMAL}  - name: updates\n    limit: 100\n    window: 1m\n    scope: route\nroutes:\n  - name: search\n    methods: GET\n    path: /api/v2/search.json\n  - name: update\n    methods: [PUT]\n    path: /api/v2/tickets/{{id}}.json\n    quotas: [updates]\n    max_wait: 2s\n"
    );
    let c = Config::from_yaml(&yaml, None).unwrap();
    assert_eq!(c.routes[0].class, Class::Read);
    assert_eq!(c.routes[0].on_limit, OnLimit::Reject);
    assert_eq!(c.routes[0].max_wait, Duration::ZERO);
    assert_eq!(c.routes[1].class, Class::Write);
    assert_eq!(c.routes[1].on_limit, OnLimit::Queue);
    assert_eq!(c.routes[1].max_wait, Duration::from_secs(2));
    assert_eq!(c.routes[1].quotas, vec!["updates".to_string()]);
}

#[test]
fn daily_fixed_windows_default_to_midnight_utc() {
    let yaml = MINIMAL.replace("window: 1m", "window: 1d\n    kind: fixed");
    let c = Config::from_yaml(&yaml, None).unwrap();
    match &c.quotas[0].kind {
        WindowKind::Fixed { daily: Some(d) } => {
            assert_eq!(d.zone_name, "UTC");
            assert_eq!(d.at, jiff::civil::Time::midnight());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_preset_and_a_plan_are_a_whole_config() {
    let c = Config::from_yaml(
        "preset: zendesk\nplan: enterprise\nupstream: { url: https://acme.zendesk.com }\n",
        None,
    )
    .unwrap();
    assert_eq!(c.preset, Some(("zendesk".into(), "enterprise".into())));
    assert_eq!(c.upstream.crm, Crm::Zendesk);
    assert_eq!(c.quotas[0].name, "account-minute");
    assert_eq!(c.quotas[0].limit, 700, "the plan sets the limit");
    assert_eq!(c.quotas[0].sync.as_deref(), Some("account"));
    assert_eq!(c.quotas[1].limit, 100);
    let create = c.routes.iter().find(|r| r.name == "ticket-create").unwrap();
    assert!(create.idempotency_key);
    // The default plan.
    let c = Config::from_yaml(
        "preset: zendesk\nupstream: { url: https://acme.zendesk.com }\n",
        None,
    )
    .unwrap();
    assert_eq!(c.quotas[0].limit, 400);
    assert_eq!(c.preset, Some(("zendesk".into(), "professional".into())));
}

#[test]
fn a_user_file_overrides_and_extends_a_preset() {
    let yaml = r#"
preset: zendesk
plan: high-volume
upstream: { url: "https://acme.zendesk.com", retry_after_default: 30s }
quotas:
  - { name: account-minute, reserve: 10% }
  - { name: account-day, limit: 2500, window: 1d, kind: fixed, time_zone: Europe/Paris }
routes:
  - { name: ticket-create, max_wait: 2s }
  - { name: users, methods: [GET], path: "/api/v2/users/{id}.json", on_limit: wait, max_wait: 1s }
"#;
    let c = Config::from_yaml(yaml, None).unwrap();
    assert_eq!(c.upstream.retry_after_default, Duration::from_secs(30));
    assert_eq!(c.upstream.crm, Crm::Zendesk, "untouched preset fields stay");
    let minute = &c.quotas[0];
    assert_eq!(
        (minute.limit, minute.reserve, minute.window),
        (2500, 250, Duration::from_secs(60))
    );
    assert_eq!(c.quotas[1].limit, 300, "high-volume raises ticket updates");
    assert_eq!(
        c.quotas[3].name, "account-day",
        "new quotas come after the preset's"
    );
    assert_eq!(
        c.routes[0].name, "users",
        "a user's new route is matched first"
    );
    let create = c.routes.iter().find(|r| r.name == "ticket-create").unwrap();
    assert_eq!(create.max_wait, Duration::from_secs(2));
    assert_eq!(
        create.methods,
        vec![Method::POST],
        "the rest of the preset's route stays"
    );
}

#[test]
fn every_preset_and_plan_validates() {
    for (name, _) in preset::PRESETS {
        let plans = preset::plans(name);
        assert!(!plans.is_empty(), "{name} has plans");
        for plan in plans {
            let yaml = format!(
                "preset: {name}\nplan: {plan}\nupstream: {{ url: https://crm.example.com }}\n"
            );
            let c = Config::from_yaml(&yaml, None).unwrap_or_else(|e| panic!("{name}/{plan}: {e}"));
            assert_eq!(c.upstream.crm.name(), *name);
            assert!(
                c.routes
                    .iter()
                    .any(|r| r.name == "contact-search" && r.class == Class::Read)
            );
        }
    }
}

#[test]
fn preset_and_new_field_errors_name_their_path() {
    assert_eq!(
        errors("preset: zendsk\nupstream: { url: http://x }\n"),
        vec![
            "preset: \"zendsk\" is not a preset (one of: zendesk, salesforce, hubspot, freshdesk, kustomer, servicenow, dynamics)"
        ]
    );
    assert_eq!(
        errors("preset: zendesk\nplan: gold\nupstream: { url: http://x }\n"),
        vec![
            "plan: \"gold\" is not a zendesk plan (one of: team, growth, professional, enterprise, enterprise-plus, high-volume)"
        ]
    );
    assert_eq!(
        errors("plan: gold\nupstream: { url: http://x }\n"),
        vec!["plan: applies only together with preset"]
    );
    let yaml = r#"
upstream: { url: "http://x", crm: oracle, retry_status: [503, 404] }
quotas:
  - { name: a, limit: 10, window: 1m, reserve: "half" }
  - { name: b, limit: 10, window: 1m, reserve: 10 }
routes:
  - { name: r, path: /x, idempotency_key: "yes" }
"#;
    let got = errors(yaml);
    for e in [
        "upstream.crm: \"oracle\" is not a CRM (one of: generic, zendesk, salesforce, hubspot, freshdesk, kustomer, servicenow, dynamics)",
        "upstream.retry_status[1]: 404 is not a 5xx status (a 4xx is the CRM's final answer; 429 is always a throttle)",
        "quotas[0].reserve: \"half\" is not a reserve (write a count, or a share under 100%, e.g. 10%)",
        "quotas[1].reserve: must leave the proxy something: below the limit",
        "routes[0].idempotency_key: invalid type: string \"yes\", expected a boolean",
    ] {
        assert!(got.contains(&e.to_string()), "missing {e:?} in {got:#?}");
    }
    let got = errors(
        "upstream: { url: \"http://x\", crm: salesforce }\nquotas:\n  - { name: a, limit: 10, window: 1m, sync: dayly }\n",
    );
    assert_eq!(
        got,
        vec![
            "quotas[0].sync: \"dayly\" is not a scope salesforce reports (one of: daily, per-app)"
        ]
    );
}

#[test]
fn the_disk_store_needs_a_data_directory_and_nothing_else_takes_one() {
    let disk = format!(
        "{MINIMAL}queue: {{ store: disk, data_dir: /var/lib/crm-quota-proxy, compact_bytes: 1MiB }}\n"
    );
    let c = Config::from_yaml(&disk, None).unwrap();
    assert_eq!(
        c.queue.data_dir.as_deref(),
        Some(std::path::Path::new("/var/lib/crm-quota-proxy"))
    );
    assert_eq!(c.queue.compact_bytes, 1 << 20);
    for (queue, error) in [
        (
            "{ store: disk }",
            "queue.data_dir: is required with `store: disk`",
        ),
        (
            "{ store: disk, data_dir: \"\" }",
            "queue.data_dir: must not be empty",
        ),
        (
            "{ data_dir: /tmp/q }",
            "queue.data_dir: is only used with `store: disk`",
        ),
        (
            "{ store: redis }",
            "queue.store: \"redis\" is not a store (memory or disk)",
        ),
        (
            "{ store: disk, data_dir: /tmp/q, compact_bytes: 0 }",
            "queue.compact_bytes: must be from 1 byte to 1TiB",
        ),
    ] {
        assert_eq!(
            errors(&format!("{MINIMAL}queue: {queue}\n")),
            [error],
            "{queue}"
        );
    }
}

#[test]
fn the_shared_ledger_is_validated_and_its_password_never_shown() {
    let yaml = format!(
        "{MINIMAL}ledger:\n  store: redis\n  url: redis://:hunter2@redis.internal:6379/0\n  key_prefix: acme-zendesk\n  replicas: 3\n  replica_id: proxy-0\n"
    );
    let config = Config::from_yaml(&yaml, None).unwrap();
    let LedgerConfig::Redis(r) = &config.ledger else {
        panic!("a redis ledger: {:?}", config.ledger);
    };
    assert_eq!(
        (r.key_prefix.as_str(), r.replicas, r.replica_id.as_str()),
        ("acme-zendesk", 3, "proxy-0")
    );
    assert_eq!(r.timeout, Duration::from_millis(250));
    assert_eq!(r.display_url(), "redis://***@redis.internal:6379/0");
    assert_eq!(
        Config::from_yaml(MINIMAL, None).unwrap().ledger,
        LedgerConfig::Local,
        "local by default"
    );

    let bad = format!(
        "{MINIMAL}ledger:\n  store: redis\n  url: http://:hunter2@redis:6379\n  replicas: 0\n  timeout: 1m\n"
    );
    let got = errors(&bad);
    assert_eq!(
        got,
        vec![
            "ledger.timeout: must be from 10ms to 10s",
            "ledger.url: http://***@redis:6379 must start with redis:// or rediss://",
            "ledger.key_prefix: is required with `store: redis`: name the CRM account the replicas share (e.g. acme-zendesk)",
            "ledger.replicas: must be from 1 to 1000",
        ]
    );
    assert!(got.iter().all(|e| !e.contains("hunter2")));
    for (url, problem) in [
        ("redis://", "has no host"),
        ("redis://host:port", "is not a port"),
        ("redis://host:6379/x", "is not a number"),
        ("redis-host:6379", "is not a URL"),
    ] {
        let yaml = format!("{MINIMAL}ledger: {{ store: redis, url: \"{url}\", key_prefix: a }}\n");
        let got = errors(&yaml);
        assert!(got.len() == 1 && got[0].contains(problem), "{url}: {got:?}");
    }
    let local = format!("{MINIMAL}ledger: {{ url: redis://x:6379, store: lokal }}\n");
    assert_eq!(
        errors(&local),
        vec!["ledger.store: \"lokal\" is not a ledger store (local or redis)"]
    );
    let local = format!("{MINIMAL}ledger: {{ url: redis://x:6379 }}\n");
    assert_eq!(
        errors(&local),
        vec!["ledger.url: is only used with `store: redis`"]
    );
}

/// A margin too large to double is an error like any other, not a panic.
#[test]
fn an_enormous_margin_is_refused_without_a_panic() {
    let yaml = r#"
upstream: { url: "http://x" }
quotas:
  - { name: a, limit: 10, window: 1m, margin: 10000000000000000000s }
"#;
    let got = errors(yaml);
    assert!(
        got.iter()
            .any(|e| e.starts_with("quotas[0].margin: must be from")),
        "{got:#?}"
    );
}

#[test]
fn the_admin_token_is_named_by_file_and_only_probes_and_scrapes_may_be_open() {
    let c = Config::from_yaml(MINIMAL, None).unwrap();
    assert_eq!(c.listen.admin_token_file, None);
    assert_eq!(c.listen.admin_open, ["/metrics", "/healthz", "/readyz"]);
    let yaml = format!(
        "{MINIMAL}listen: {{ admin_token_file: /run/secrets/t, admin_open: [/healthz] }}\n"
    );
    let c = Config::from_yaml(&yaml, None).unwrap();
    assert_eq!(
        c.listen.admin_token_file.as_deref(),
        Some(std::path::Path::new("/run/secrets/t"))
    );
    assert_eq!(c.listen.admin_open, ["/healthz"]);
    let yaml = format!(
        "{MINIMAL}listen: {{ admin_token_file: \" \", admin_open: [/healthz, /status] }}\n"
    );
    assert_eq!(
        errors(&yaml),
        [
            "listen.admin_token_file: is empty (name a file holding the token)",
            "listen.admin_open[1]: \"/status\" cannot be opened (only /metrics, /healthz, /readyz)",
        ]
    );
}

#[test]
fn a_release_schedule_is_validated_with_every_problem_at_its_path() {
    let ok = r#"
upstream: { url: "https://acme.zendesk.com" }
quotas:
  - name: day
    limit: 2500
    window: 1d
    kind: fixed
    time_zone: America/New_York
    schedule: { hours: "08:00-18:00", at_once: 10% }
  - { name: short-day, limit: 300, window: 10m, kind: fixed, schedule: {} }
"#;
    let c = Config::from_yaml(ok, None).unwrap();
    let s = c.quotas[0].schedule.clone().unwrap();
    assert_eq!(s.at_once, 0.1);
    assert_eq!(
        s.hours,
        Some((
            jiff::civil::Time::constant(8, 0, 0, 0),
            jiff::civil::Time::constant(18, 0, 0, 0)
        ))
    );
    assert_eq!(
        c.quotas[1].schedule,
        Some(Schedule {
            hours: None,
            at_once: 0.0
        })
    );
    let bad = r#"
upstream: { url: "https://acme.zendesk.com" }
quotas:
  - { name: a, limit: 10, window: 1m, schedule: {} }
  - { name: b, limit: 10, window: 10m, kind: fixed, schedule: { hours: "08:00-18:00" } }
  - { name: c, limit: 10, window: 1d, kind: fixed, schedule: { hours: "18:00-08:00", at_once: 100% } }
  - { name: d, limit: 10, window: 1d, kind: fixed, reset_at: "12:00", schedule: { hours: "8-18", houres: 1 } }
  - { name: e, limit: 10, window: 1d, kind: fixed, reset_at: "12:00", schedule: { hours: "08:00-18:00" } }
"#;
    assert_eq!(
        errors(bad),
        [
            "quotas[0].schedule: applies only to kind: fixed (a schedule releases a window that starts and ends on the clock)",
            "quotas[1].schedule.hours: applies only to daily windows (kind: fixed, window: 1d)",
            "quotas[2].schedule.at_once: \"100%\" is not a share (write a percentage under 100%, e.g. 10%)",
            "quotas[2].schedule.hours: must start before they end (hours across midnight are not supported)",
            "quotas[3].schedule.houres: unknown field (expected one of: hours, at_once)",
            "quotas[3].schedule.hours: \"8-18\" is not business hours (write HH:MM-HH:MM, e.g. 08:00-18:00)",
            "quotas[4].schedule.hours: must not span the window's reset at 12:00:00",
        ]
    );
}

#[test]
fn the_forecast_is_on_for_long_fixed_windows_and_scheduled_ones_unless_said_otherwise() {
    let yaml = r#"
upstream: { url: "https://acme.zendesk.com" }
quotas:
  - { name: minute, limit: 400, window: 1m }
  - { name: ten, limit: 300, window: 10m, kind: fixed }
  - { name: paced, limit: 300, window: 10m, kind: fixed, schedule: {} }
  - { name: day, limit: 2500, window: 1d, kind: fixed }
  - { name: quiet-day, limit: 2500, window: 1d, kind: fixed, forecast: false }
  - { name: asked, limit: 300, window: 10m, kind: fixed, forecast: true }
"#;
    let c = Config::from_yaml(yaml, None).unwrap();
    let on: Vec<bool> = c.quotas.iter().map(|q| q.forecast).collect();
    assert_eq!(on, [false, false, true, true, false, true]);
    let bad = r#"
upstream: { url: "https://acme.zendesk.com" }
quotas:
  - { name: minute, limit: 400, window: 1m, forecast: true }
"#;
    assert_eq!(
        errors(bad),
        [
            "quotas[0].forecast: applies only to unkeyed quotas of kind: fixed (a window that resets on the clock)"
        ]
    );
}
