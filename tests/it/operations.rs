//! Operating the binary: SIGHUP reloads the config (a broken one changes nothing), SIGTERM says
//! in its exit status whether accepted writes were lost, startup failures name their key and
//! exit with the status of their class, and the read-only queue commands change nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crm_quota_proxy::sim::{Fault, Sim, SimConfig};
use http::{Method, StatusCode};
use serde_json::Value;

use crate::support::*;

fn write_config(dir: &Path, limit: u32, extra: &str) -> PathBuf {
    let path = dir.join("proxy.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
             upstream: {{ url: http://example.invalid }}\n\
             shutdown_grace: 0s\n\
             queue: {{ store: disk, data_dir: {} }}\n\
             quotas:\n  - {{ name: calls, limit: {limit}, window: 1m }}\n\
             routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

async fn status(client: &HttpClient, proxy: &Process) -> Value {
    send(
        client,
        Method::GET,
        &format!("{}/status", proxy.admin),
        &[],
        "",
    )
    .await
    .json()
}

async fn park(client: &HttpClient, proxy: &Process, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = send(
            client,
            Method::POST,
            &format!("{}/api/v2/tickets.json", proxy.data),
            &[
                ("authorization", TOKEN),
                ("content-type", "application/json"),
            ],
            ticket_body(&format!("w-{i}")),
        )
        .await;
        if r.status == StatusCode::ACCEPTED {
            ids.push(r.json()["id"].as_str().unwrap().to_string());
        } else {
            assert_eq!(r.status, StatusCode::CREATED);
        }
    }
    ids
}

/// A CRM with room to spare and an empty directory for the proxy's config and data.
async fn roomy_sim() -> (Sim, tempfile::TempDir) {
    let sim = Sim::start(SimConfig::new(1_000, Duration::from_secs(60)))
        .await
        .unwrap();
    (sim, tempfile::tempdir().unwrap())
}

fn kill(proxy: &Process, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_raised_limit_and_keeps_every_parked_write() {
    let (sim, dir) = roomy_sim().await;
    let config = write_config(dir.path(), 2, "");
    let proxy = Process::start(&config, &sim.url()).await;
    let client = client();
    let parked = park(&client, &proxy, 6).await;
    assert_eq!(
        parked.len(),
        4,
        "two went at once, four wait for the window"
    );
    let before = status(&client, &proxy).await;
    // A plan upgrade: the limit is raised and the proxy told.
    write_config(dir.path(), 100, "");
    kill(&proxy, "HUP");
    eventually(
        "the parked writes to go",
        Duration::from_secs(10),
        || async {
            let v = status(&client, &proxy).await;
            (v["queue"]["queued"] == 0 && v["queue"]["dispatching"] == 0).then_some(())
        },
    )
    .await;
    assert_each_ticket_once(&sim, 6);
    let after = status(&client, &proxy).await;
    assert_eq!(after["quotas"][0]["limit"], 100);
    assert_ne!(after["config"]["sha256"], before["config"]["sha256"]);
    assert!(
        proxy.lines().iter().any(|l| l.contains("config reloaded")),
        "{:?}",
        proxy.lines()
    );
    // A listen change waits for a restart, and says so.
    let moved = write_config(dir.path(), 100, "");
    let text = std::fs::read_to_string(&moved)
        .unwrap()
        .replace("admin: 127.0.0.1:0", "admin: 127.0.0.1:1");
    std::fs::write(&moved, text).unwrap();
    let r = send(
        &client,
        Method::POST,
        &format!("{}/reload", proxy.admin),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let report = r.json();
    assert_eq!(report["result"], "partial", "{report}");
    assert_eq!(report["needs_restart"][0], "listen.admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_on_sighup_keeps_the_running_config() {
    let (sim, dir) = roomy_sim().await;
    let config = write_config(dir.path(), 2, "");
    let proxy = Process::start(&config, &sim.url()).await;
    let client = client();
    std::fs::write(
        &config,
        "quotas: [ { name: calls, limit: 0 } ]\nmystery: 1\n",
    )
    .unwrap();
    kill(&proxy, "HUP");
    // The refusal and each problem are lines of their own: wait for the last one to be read.
    eventually("the reload to be refused", Duration::from_secs(10), || {
        let lines = proxy.lines();
        let refused = lines
            .iter()
            .any(|l| l.contains("the reloaded config is invalid"))
            && lines.iter().any(|l| l.contains("mystery"));
        async move { refused.then_some(()) }
    })
    .await;
    let lines = proxy.lines();
    assert!(
        lines.iter().any(|l| l.contains("mystery: unknown field")),
        "{lines:?}"
    );
    assert_eq!(status(&client, &proxy).await["quotas"][0]["limit"], 2);
    let text = proxy.metrics(&client).await;
    assert_eq!(
        metric_value(&text, "crm_proxy_config_reloads_total{result=\"invalid\"}"),
        Some(1.0)
    );
    kill(&proxy, "USR1");
    let r = send(
        &client,
        Method::GET,
        &format!("{}/healthz", proxy.admin),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "SIGUSR1 is logged and ignored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_non_zero_only_when_accepted_writes_are_lost() {
    let sim = Sim::start(SimConfig::new(1_000, Duration::from_secs(60)))
        .await
        .unwrap();
    let client = client();
    for (store, lost) in [("memory", true), ("disk", false)] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), 1, "");
        if store == "memory" {
            let text = std::fs::read_to_string(&config).unwrap();
            let text = text
                .lines()
                .filter(|l| !l.starts_with("queue:"))
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(&config, text).unwrap();
        }
        let proxy = Process::start(&config, &sim.url()).await;
        assert_eq!(park(&client, &proxy, 3).await.len(), 2);
        let (exit, lines) = proxy.signal("TERM");
        if lost {
            assert_eq!(exit.code(), Some(1), "{lines:?}");
            assert!(
                lines.iter().any(|l| l.contains("accepted writes lost")),
                "{lines:?}"
            );
        } else {
            assert_eq!(exit.code(), Some(0), "{lines:?}");
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("kept in the data directory")),
                "{lines:?}"
            );
        }
    }
}

fn run_briefly(config: &Path, extra_env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = bin();
    cmd.args(args)
        .args(["run", "--config"])
        .arg(config)
        .env("CRM_PROXY_UPSTREAM_URL", "http://127.0.0.1:9");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn startup_failures_name_their_key_and_exit_with_their_class() {
    let dir = tempfile::tempdir().unwrap();
    // A data directory that is a file: I/O, 74.
    let config = write_config(dir.path(), 1, "");
    std::fs::write(dir.path().join("data"), b"").unwrap();
    let (code, err) = run_briefly(&config, &[("RUST_BACKTRACE", "1")], &[]);
    assert_eq!(code, Some(74), "{err}");
    assert!(
        err.contains("queue.data_dir") && err.contains("not a directory"),
        "{err}"
    );
    assert!(!err.contains("stack backtrace"), "{err}");
    // The same in JSON: one JSON object per line.
    let (code, err) = run_briefly(&config, &[], &["--log-format", "json"]);
    assert_eq!(code, Some(74));
    let line = err.lines().find(|l| l.contains("queue.data_dir")).unwrap();
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "ERROR");
    std::fs::remove_file(dir.path().join("data")).unwrap();
    // A port in use: 75, naming the listener.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("data: 127.0.0.1:0", &format!("data: 127.0.0.1:{port}"));
    std::fs::write(&config, text).unwrap();
    let (code, err) = run_briefly(&config, &[], &[]);
    assert_eq!(code, Some(75), "{err}");
    assert!(
        err.contains(&format!("listen.data: 127.0.0.1:{port} is already in use")),
        "{err}"
    );
    // An invalid config: 64, every problem listed.
    std::fs::write(&config, "quotas: []\n").unwrap();
    let (code, err) = run_briefly(&config, &[], &["--log-format", "json"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_reads_a_damaged_log_without_changing_it() {
    let (sim, dir) = roomy_sim().await;
    let config = write_config(dir.path(), 1, "");
    let proxy = Process::start(&config, &sim.url()).await;
    let client = client();
    assert_eq!(park(&client, &proxy, 11).await.len(), 10);
    let _ = proxy.signal("KILL");
    let log = dir.path().join("data").join("queue.log");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[0] ^= 0xFF;
    std::fs::write(&log, &bytes).unwrap();
    let list = |args: &str| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "\"$0\" queue --config \"$1\" list {args}; echo \"exit=$?\" >&2"
            ))
            .arg(env!("CARGO_BIN_EXE_crm-quota-proxy"))
            .arg(&config)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (out, err) = list("");
    assert!(err.contains("exit=0"), "{err}");
    assert_eq!(
        out.lines().count(),
        1 + 9,
        "the header and the 9 writes left: {out}"
    );
    assert!(err.contains("would be quarantined"), "{err}");
    assert_eq!(
        std::fs::read(&log).unwrap(),
        bytes,
        "nothing changed on disk"
    );
    assert!(
        !dir.path()
            .join("data")
            .join("queue.log.quarantine")
            .exists()
    );
    // A reader that goes away is not an error.
    let (_, err) = list("| head -1");
    assert!(!err.contains("panicked"), "{err}");
    // The next start quarantines the damage and keeps the other nine.
    let proxy = Process::start(&config, &sim.url()).await;
    let all = send(
        &client,
        Method::GET,
        &format!("{}/requests", proxy.admin),
        &[],
        "",
    )
    .await;
    assert_eq!(all.json()["total"], 9, "{}", all.json());
    assert!(
        dir.path()
            .join("data")
            .join("queue.log.quarantine")
            .exists()
    );
}

#[test]
fn check_runtime_tries_the_data_directory_and_the_ports() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1, "");
    let check = || {
        let out = bin()
            .args(["check", "--runtime", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = check();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("data directory and listen addresses usable"),
        "{out}"
    );
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data"), b"").unwrap();
    let (code, out) = check();
    assert_eq!(code, Some(74), "{out}");
    std::fs::remove_file(dir.path().join("data")).unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("admin: 127.0.0.1:0", &format!("admin: 127.0.0.1:{port}"));
    std::fs::write(&config, text).unwrap();
    let (code, out) = check();
    assert_eq!(code, Some(75), "{out}");
    assert!(out.contains("listen.admin"), "{out}");
}

/// `queue retry` and `queue discard` without an id take every dead letter the filters select:
/// a count first (read-only), `--yes` acts; a typo names what is configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_act_on_dead_letters_in_bulk() {
    let (sim, dir) = roomy_sim().await;
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
             upstream: {{ url: http://example.invalid }}\n\
             shutdown_grace: 0s\n\
             queue: {{ store: disk, data_dir: {}, max_attempts: 1 }}\n\
             quotas:\n  - {{ name: calls, limit: 2, window: 1s }}\n\
             routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let proxy = Process::start(&config, &sim.url()).await;
    let client = client();
    assert_eq!(
        park(&client, &proxy, 2).await.len(),
        0,
        "the first two go live"
    );
    sim.inject((0..4).map(|_| Fault::Status(500)));
    let parked = park(&client, &proxy, 4).await;
    assert_eq!(parked.len(), 4);
    eventually("four dead letters", Duration::from_secs(10), || async {
        (status(&client, &proxy).await["queue"]["failed"] == 4).then_some(())
    })
    .await;
    let _ = proxy.signal("TERM");
    let queue = |args: &[&str]| {
        let out = bin()
            .args(["queue", "--config"])
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let log = dir.path().join("data").join("queue.log");
    let bytes = std::fs::read(&log).unwrap();
    let (code, out) = queue(&["retry", "--reason", "ambiguous"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("4 dead letters match (4 ambiguous"), "{out}");
    assert_eq!(
        std::fs::read(&log).unwrap(),
        bytes,
        "a count changes nothing"
    );
    let (code, out) = queue(&["discard", "--route", "ticket-creat", "--reason", "nope"]);
    assert_ne!(code, Some(0));
    assert!(out.contains("\"nope\" is not a reason"), "{out}");
    let (code, out) = queue(&["retry", "--route", "ticket-creat"]);
    assert_ne!(code, Some(0));
    assert!(
        out.contains("route \"ticket-creat\" is not configured (ticket-create"),
        "{out}"
    );
    let (code, out) = queue(&["retry"]);
    assert_ne!(code, Some(0), "neither an id nor a filter: {out}");
    let (code, out) = queue(&["retry", "--reason", "ambiguous", "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("retry: 4 done, 0 skipped"), "{out}");
    let (_, out) = queue(&["list", "--status", "queued"]);
    for id in &parked {
        assert!(out.contains(id.as_str()), "{id} queued again: {out}");
    }
}
