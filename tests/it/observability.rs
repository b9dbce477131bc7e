//! The dashboard and alert rules under `deploy/`, checked against reality: `promtool check
//! rules` and `promtool test rules` (a firing and a quiet case for every alert), the
//! PrometheusRule carrying the same groups, and a real Prometheus (Debian's `prometheus`)
//! scraping a running proxy through a burst: every dashboard panel's query answers with data,
//! and every alert rule evaluates without error on the real series.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crm_quota_proxy::sim::{Sim, SimConfig};
use http::Method;
use serde_json::Value;

use crate::support::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn need(tool: &str) {
    assert!(
        Path::new(tool).exists(),
        "this test needs {tool}, from Debian's prometheus package: `apt-get install prometheus` (.ci/run installs it)"
    );
}

fn promtool(args: &[&str]) {
    need(PROMTOOL);
    let out = std::process::Command::new(PROMTOOL)
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    assert!(text.contains("SUCCESS"), "promtool {args:?}:\n{text}");
}

fn alert_names(rules: &Value) -> Vec<String> {
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_and_each_alert_is_tested_firing_and_quiet() {
    promtool(&["check", "rules", "alerts.yaml"]);
    promtool(&["test", "rules", "alerts.test.yaml"]);
    let rules = yaml("prometheus/alerts.yaml");
    let tests = yaml("prometheus/alerts.test.yaml");
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    for alert in alert_names(&rules) {
        let of = |firing: bool| {
            cases.iter().any(|c| {
                c["alertname"] == alert.as_str()
                    && c["exp_alerts"]
                        .as_array()
                        .is_some_and(|a| a.is_empty() != firing)
            })
        };
        assert!(of(true), "{alert} has no promtool case where it fires");
        assert!(
            of(false),
            "{alert} has no promtool case where it stays quiet"
        );
    }
    for r in rules["groups"][0]["rules"].as_array().unwrap() {
        let runbook = r["annotations"]["runbook"].as_str().unwrap_or_default();
        assert!(runbook.len() > 80, "{} needs a runbook", r["alert"]);
    }
    // The Kubernetes copy carries the same groups.
    let operator = yaml("kubernetes/prometheusrule.yaml");
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(
        operator["spec"]["groups"], rules["groups"],
        "deploy/kubernetes/prometheusrule.yaml differs from deploy/prometheus/alerts.yaml"
    );
}

/// A Prometheus server of its own: a config scraping `target` every second and evaluating the
/// alert rules, its data in a temporary directory, its HTTP API on a loopback port the kernel
/// chose for it (read back from its log: no other server can take it in between).
struct Prometheus {
    child: std::process::Child,
    log: StderrLines,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> Prometheus {
        need(PROMETHEUS);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 rule_files: [\"{}\"]\n\
                 scrape_configs:\n\
                 \x20 - job_name: crm-integration\n\
                 \x20   static_configs: [{{ targets: [\"{target}\"] }}]\n",
                deploy("prometheus/alerts.yaml").display()
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let log = StderrLines::follow(&mut child);
        let mut p = Prometheus {
            child,
            log,
            url: String::new(),
            _dir: dir,
        };
        // Its line `msg="Listening on" address=127.0.0.1:PORT` names the port.
        let address = p
            .log
            .line_or_exit(
                "Prometheus to listen",
                Duration::from_secs(30),
                &mut p.child,
                |l| {
                    let rest = &l[l.find("msg=\"Listening on\"")?..];
                    let at = rest.find("address=")? + "address=".len();
                    rest[at..].split_whitespace().next().map(str::to_string)
                },
            )
            .await;
        let Ok(address) = address else {
            panic!("Prometheus exited at start:\n{}", p.log.lines().join("\n"));
        };
        p.url = format!("http://{address}");
        until_serving("Prometheus to be ready", &format!("{}/-/ready", p.url)).await;
        p
    }

    /// An instant query at `at` (Unix seconds): the result vector.
    async fn query(&self, http: &HttpClient, expr: &str, at: f64) -> Vec<Value> {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .append_pair("time", &format!("{at:.3}"))
            .finish();
        let r = send(
            http,
            Method::GET,
            &format!("{}/api/v1/query?{q}", self.url),
            &[],
            "",
        )
        .await;
        let v = r.json();
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.finish();
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scraping_the_proxy_answers_every_dashboard_query() {
    // The Zendesk preset on the shared ledger, its minute shrunk to 20 calls per 10 s, with a
    // paced daily quota, in front of a simulated Zendesk with the same budget.
    let sim = Sim::start(SimConfig::new(20, Duration::from_secs(10)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "preset: zendesk\nplan: team\n\
             listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
             upstream: {{ url: http://example.invalid }}\n\
             ledger: {{ store: redis, url: \"{}\", key_prefix: {} }}\n\
             quotas:\n  - {{ name: account-minute, limit: 20, window: 10s }}\n\
             \x20 - {{ name: account-day, limit: 2500, window: 1d, kind: fixed, schedule: {{ at_once: 50% }} }}\n",
            redis_url(),
            unique_prefix("dashboard")
        ),
    )
    .unwrap();
    let proxy = Process::start(&config, &sim.url()).await;
    let prometheus = Prometheus::start(proxy.admin.trim_start_matches("http://")).await;
    let http = client();
    eventually(
        "Prometheus to scrape the proxy",
        Duration::from_secs(20),
        || async {
            let up = prometheus
                .query(&http, "up{job=\"crm-integration\"}", unix_now())
                .await;
            (up.first().is_some_and(|s| s["value"][1] == "1")).then_some(())
        },
    )
    .await;

    // The burst: 60 ticket creates at once (parked and batched past the budget) and a contact
    // search a second, for six seconds.
    let mut clients = Vec::new();
    for i in 0..60 {
        let (http, url) = (http.clone(), format!("{}/api/v2/tickets.json", proxy.data));
        clients.push(tokio::spawn(async move {
            send(
                &http,
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                ticket_body(&format!("d-{i}")),
            )
            .await
            .status
        }));
    }
    for i in 0..6 {
        let url = format!("{}/api/v2/search.json?query=type:user%20{i}", proxy.data);
        send(&http, Method::GET, &url, &[], "").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let at = unix_now();
    // Scrapes after the moment queried, so every series has its sample at `at`.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/crm-quota-proxy.json")).unwrap(),
    )
    .unwrap();
    let mut answered = 0;
    let mut missing = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            // Grafana's variables: this job, and a rate window of a few scrapes.
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$job", "crm-integration")
                .replace("$__rate_interval", "5s");
            let result = prometheus.query(&http, &expr, at).await;
            let data = result
                .iter()
                .any(|s| s["value"][1].as_str().is_some_and(|v| v != "NaN"));
            if data {
                answered += 1;
            } else {
                missing.push(format!("{}: {expr} → {result:?}", panel["title"]));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "panels without data:\n{}",
        missing.join("\n")
    );
    assert!(answered >= 25, "{answered} queries");

    // The burst is there to see: every request counted, the minute's budget in use.
    let value = |r: Vec<Value>| r[0]["value"][1].as_str().unwrap().parse::<f64>().unwrap();
    let requests = prometheus
        .query(&http, "sum(crm_proxy_client_requests_total)", at)
        .await;
    assert_eq!(value(requests), 66.0);
    let used = prometheus
        .query(
            &http,
            "max(crm_proxy_quota_used{quota=\"account-minute\"})",
            at,
        )
        .await;
    assert!(value(used) > 0.0);

    // Every alert rule evaluated on the real series without an error.
    let r = send(
        &http,
        Method::GET,
        &format!("{}/api/v1/rules", prometheus.url),
        &[],
        "",
    )
    .await;
    let rules = r.json();
    let evaluated: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(
        evaluated.len(),
        alert_names(&yaml("prometheus/alerts.yaml")).len()
    );
    for rule in evaluated {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    for c in clients {
        c.abort();
    }
}
