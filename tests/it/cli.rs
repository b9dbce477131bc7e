//! The binary: `check` exit codes and messages, and every example config in `config/`.

use std::path::Path;

use crm_quota_proxy::config::Config;

use crate::support::{Process, bin};

#[test]
fn every_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            Config::from_yaml(&text, None).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
            let out = bin()
                .args(["check", "--config"])
                .arg(&path)
                .env_remove("CRM_PROXY_UPSTREAM_URL")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            seen += 1;
        }
    }
    assert!(seen >= 1, "no example configs found in {}", dir.display());
}

#[test]
fn check_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, "upstream: { url: zendesk }\nquotas:\n  - { name: m, limit: 0, window: 1 dya }\n  - { name: d, limit: 10, window: 1d, kind: sliding, time_zone: UTC }\nroutes:\n  - { name: r, path: nope }\nmystery: 1\n").unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("CRM_PROXY_UPSTREAM_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for line in [
        "invalid config (6 problems)",
        "mystery: unknown field",
        "upstream.url: \"zendesk\" must start with http:// or https://",
        "quotas[0].limit: must be from 1 to 1000000000",
        "quotas[0].window: \"1 dya\" is not a duration",
        "quotas[1].time_zone: applies only to kind: fixed with window: 1d",
        "routes[0].path: \"nope\" must start with '/'",
    ] {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
}

#[test]
fn check_reads_the_upstream_from_the_environment_and_reports_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        "quotas:\n  - { name: m, limit: 10, window: 1m }\nupstream: {}\n",
    )
    .unwrap();
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .env("CRM_PROXY_UPSTREAM_URL", "https://acme.zendesk.com")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = bin()
        .args(["check", "--config"])
        .arg(dir.path().join("absent.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[tokio::test]
async fn the_demo_answers_its_searches_and_delivers_every_parked_write_without_a_crm_429() {
    let opts = crm_quota_proxy::demo::DemoOptions {
        limit: 5,
        window: std::time::Duration::from_secs(2),
        creates: 20,
        searches: 2,
    };
    let mut out = Vec::new();
    let report = crm_quota_proxy::demo::run(opts, &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        report.direct_throttled > 0,
        "the direct burst shows the problem:\n{text}"
    );
    assert_eq!(report.tickets, 20, "{text}");
    assert_eq!(report.delivered, report.parked, "{text}");
    assert_eq!(report.crm_throttled, 0, "{text}");
    assert_eq!(
        report.proxied_searches, 2,
        "searches answered during the burst:\n{text}"
    );
    assert!(text.contains("tickets created: "), "{text}");
    assert!(
        text.contains(&format!("/20 / 20/20 ({} of them", report.delivered)),
        "{text}"
    );
}

/// `run` as an operator starts it: real process, real SIGTERM, clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_until_sigterm_and_exits_cleanly() {
    let sim = crm_quota_proxy::sim::Sim::start(crm_quota_proxy::sim::SimConfig::new(
        100,
        std::time::Duration::from_secs(60),
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "listen: { data: 127.0.0.1:0, admin: 127.0.0.1:0 }\nupstream: { url: http://example.invalid }\nshutdown_grace: 2s\nquotas:\n  - { name: m, limit: 10, window: 1m }\n").unwrap();
    let proxy = Process::start(&path, &sim.url()).await;
    assert!(
        proxy
            .lines()
            .iter()
            .any(|l| l.contains(&format!("upstream={}", sim.url()))),
        "env override used: {:?}",
        proxy.lines()
    );

    let client = crate::support::client();
    let r = crate::support::send(
        &client,
        http::Method::GET,
        &format!("{}/api/v2/search.json?query=x", proxy.data),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = crate::support::send(
        &client,
        http::Method::GET,
        &format!("{}/healthz", proxy.admin),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);

    let (exit, log) = proxy.signal("TERM");
    assert!(exit.success(), "exit {exit:?}; log:\n{}", log.join("\n"));
    assert!(
        log.iter().any(|l| l.contains("shutting down")),
        "{}",
        log.join("\n")
    );
    assert!(
        log.iter()
            .any(|l| l.contains("every accepted parked write was delivered")),
        "{}",
        log.join("\n")
    );
}

#[test]
fn fingerprint_prints_what_credential_rules_match_and_never_the_credential() {
    use std::io::Write;
    let mut child = bin()
        .arg("fingerprint")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Bearer secret-token\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        "Bearer secret-token".parse().unwrap(),
    );
    assert_eq!(
        printed.trim(),
        crm_quota_proxy::ids::Fingerprint::of(&h).to_hex()
    );
    assert!(!printed.contains("secret"));
}

/// The rough edges a new operator met: a bare number for a duration gets the unit hint, `1min`
/// is a minute, one problem is "1 problem", `fingerprint` with nothing on standard input says
/// what it wants, and `-c` works after the `queue` action too.
#[test]
fn small_mistakes_get_a_hint_and_flags_go_where_users_put_them() {
    let dir = tempfile::tempdir().unwrap();
    let check = |yaml: &str| {
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = bin().args(["check", "-c"]).arg(&path).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, text) = check(
        "upstream: { url: https://a.example }\nquotas:\n  - { name: m, limit: 10, window: 60 }\n",
    );
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("(1 problem):"), "{text}");
    assert!(
        text.contains("quotas[0].window: 60 has no unit: write it with one, e.g. \"60s\""),
        "{text}"
    );
    let (code, text) = check(
        "upstream: { url: https://a.example }\nquotas:\n  - { name: m, limit: 10, window: 1min }\n",
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("valid (1 quota, 0 routes"), "{text}");
    let (_, text) = check(
        "upstream: { url: https://a.example }\nquotas:\n  - { name: m, limit: 10, window: 10secs }\n",
    );
    assert!(text.contains("unknown unit \"secs\" (write 10s)"), "{text}");

    let out = bin()
        .arg("fingerprint")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no credential on standard input"));

    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!(
            "upstream: {{ url: https://a.example }}\nqueue: {{ store: disk, data_dir: {} }}\nquotas:\n  - {{ name: m, limit: 10, window: 1m }}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = bin()
        .args(["queue", "list", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's "Try it locally", with its commands (on free ports): `sim` with the README's
/// arguments, the proxy on `config/local-trial.yaml`, 30 creates at once. Every create gets its
/// ticket and the sim answers no 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_local_trial_runs_as_written() {
    use std::io::{BufRead, BufReader};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let trial = &readme[readme.find("### Try it locally").unwrap()..];
    let sim_args: Vec<&str> = trial
        .lines()
        .find_map(|l| l.strip_prefix("cargo run --release -- sim"))
        .unwrap()
        .split_whitespace()
        .collect();
    let config = trial
        .lines()
        .find_map(|l| l.strip_prefix("cargo run --release -- run --config "))
        .unwrap()
        .trim();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sim = bin()
        .arg("sim")
        .args(&sim_args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(sim.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains("simulated Zendesk CRM on"), "{first}");

    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join(config))
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    let path = dir.path().join("trial.yaml");
    std::fs::write(&path, text).unwrap();
    let proxy = Process::start(&path, &format!("http://127.0.0.1:{port}")).await;
    let client = crate::support::client();
    let creates: Vec<_> = (1..=30)
        .map(|i| {
            let (client, url) = (
                client.clone(),
                format!("{}/api/v2/tickets.json", proxy.data),
            );
            tokio::spawn(async move {
                let body = format!(r#"{{"ticket":{{"subject":"trial {i}"}}}}"#);
                let headers = [
                    ("authorization", "Bearer local-trial"),
                    ("content-type", "application/json"),
                ];
                (
                    i,
                    crate::support::send(&client, http::Method::POST, &url, &headers, body).await,
                )
            })
        })
        .collect();
    for c in creates {
        let (i, r) = c.await.unwrap();
        assert_eq!(r.status, 201, "create {i}: {:?}", r.body);
        assert_eq!(r.json()["ticket"]["subject"], format!("trial {i}"));
    }
    assert_eq!(proxy.admin_get(&client, "/status").await.status, 200);
    drop(proxy);
    let ok = std::process::Command::new("kill")
        .args(["-INT", &sim.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let rest: Vec<String> = out.lines().map(Result::unwrap).collect();
    assert!(sim.wait().unwrap().success());
    let last = rest.last().unwrap();
    assert!(last.contains(", 0 answered 429, 30 tickets"), "{rest:?}");
}

/// `config/zendesk-explicit.yaml` says it spells out what `config/zendesk.yaml` gets from the
/// preset: the two configs agree setting by setting.
#[test]
fn the_explicit_zendesk_example_is_the_preset_spelled_out() {
    let load = |name: &str| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        Config::from_yaml(&std::fs::read_to_string(path).unwrap(), None).unwrap()
    };
    let (preset, explicit) = (load("zendesk.yaml"), load("zendesk-explicit.yaml"));
    let same = |what: &str, a: String, b: String| assert_eq!(a, b, "{what} differ");
    // Quotas by name (their order is not a setting); routes in order (first match wins).
    let by_name = |c: &Config| {
        let mut q: Vec<String> = c.quotas.iter().map(|q| format!("{q:?}")).collect();
        q.sort();
        q.join("\n")
    };
    same("quotas", by_name(&preset), by_name(&explicit));
    for (what, a, b) in [
        (
            "routes",
            format!("{:?}", preset.routes),
            format!("{:?}", explicit.routes),
        ),
        (
            "clients",
            format!("{:?}", preset.clients),
            format!("{:?}", explicit.clients),
        ),
        (
            "fairness",
            format!("{:?}", preset.fairness),
            format!("{:?}", explicit.fairness),
        ),
        (
            "queue",
            format!("{:?}", preset.queue),
            format!("{:?}", explicit.queue),
        ),
        (
            "upstream",
            format!("{:?}", preset.upstream),
            format!("{:?}", explicit.upstream),
        ),
        (
            "listen",
            format!("{:?}", preset.listen),
            format!("{:?}", explicit.listen),
        ),
    ] {
        same(what, a, b);
    }
}

/// `completions <shell>` prints a script the shell accepts, naming every command.
#[test]
fn completions_are_scripts_the_shells_accept() {
    let out = bin().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    for command in [
        "run",
        "check",
        "queue",
        "fingerprint",
        "sim",
        "demo",
        "completions",
    ] {
        assert!(script.contains(command), "{command} is completed");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crm-quota-proxy.bash");
    std::fs::write(&path, &script).unwrap();
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = bin().args(["completions", shell]).output().unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
}
