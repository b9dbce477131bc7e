//! Test harness: a simulated CRM and the proxy on 127.0.0.1:0, an HTTP client, and polling helpers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crm_quota_proxy::clock::SystemClock;
use crm_quota_proxy::config::Config;
use crm_quota_proxy::sim::{Sim, SimConfig};
use crm_quota_proxy::{Listeners, Stopped, serve};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub const TOKEN: &str = "Bearer test-token-0123456789";

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }
}

/// How long one exchange of a test may take, head and body: far beyond any wait a test provokes
/// (the longest are a 30 s `max_wait` and the 30 s default `request_timeout`), so that a server
/// that never answers fails the test, naming the request, instead of hanging the run.
pub const EXCHANGE_LIMIT: Duration = Duration::from_secs(120);

pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder().method(method.clone()).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let exchange = async {
        let resp = client
            .request(req.body(Full::new(body.into())).unwrap())
            .await
            .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
        let (parts, body) = resp.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    };
    tokio::time::timeout(EXCHANGE_LIMIT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {url}: no whole answer within {EXCHANGE_LIMIT:?}"))
}

pub fn ticket_body(subject: &str) -> String {
    format!(r#"{{"ticket":{{"subject":"{subject}","external_id":"{subject}"}}}}"#)
}

/// Polls `check` every 20 ms until it returns `Some`, or fails the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The simulated CRM and a running proxy in front of it.
pub struct Harness {
    pub sim: Sim,
    pub url: String,
    pub admin: String,
    pub client: HttpClient,
    served: Served,
}

impl Harness {
    /// Starts a sim and a proxy whose config is `yaml` with `{upstream}` replaced by the sim's
    /// URL; the listeners are always `127.0.0.1:0`.
    pub async fn start(sim: SimConfig, yaml: &str) -> Harness {
        let sim = Sim::start(sim).await.unwrap();
        let yaml = yaml.replace("{upstream}", &sim.url());
        Harness::with_config(sim, &yaml).await
    }

    pub async fn with_config(sim: Sim, yaml: &str) -> Harness {
        let served = Served::start(yaml).await;
        Harness {
            sim,
            url: served.url.clone(),
            admin: served.admin.clone(),
            client: client(),
            served,
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: impl Into<Bytes>) -> Reply {
        self.call_with(&[], method, path, body).await
    }

    /// A request identified as `client` (by the `X-Client-Id` header the tests' configs match).
    pub async fn call_as(
        &self,
        client: &str,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Reply {
        self.call_with(&[("x-client-id", client)], method, path, body)
            .await
    }

    /// A request to the proxy with the test credential, JSON content and `extra` headers.
    async fn call_with(
        &self,
        extra: &[(&str, &str)],
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut headers = vec![
            ("authorization", TOKEN),
            ("content-type", "application/json"),
        ];
        headers.extend_from_slice(extra);
        send(
            &self.client,
            method,
            &format!("{}{path}", self.url),
            &headers,
            body,
        )
        .await
    }

    pub async fn create(&self, subject: &str) -> Reply {
        self.call(Method::POST, "/api/v2/tickets.json", ticket_body(subject))
            .await
    }

    pub async fn status_of(&self, id: &str) -> Reply {
        self.call(Method::GET, &format!("/_proxy/requests/{id}"), "")
            .await
    }

    /// Waits until a parked write reaches `status` and returns its JSON view.
    pub async fn until_status(&self, id: &str, status: &str, limit: Duration) -> Value {
        eventually(&format!("request {id} to be {status}"), limit, || async {
            let v = self.status_of(id).await.json();
            (v["status"] == status).then_some(v)
        })
        .await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        send(
            &self.client,
            Method::GET,
            &format!("{}{path}", self.admin),
            &[],
            "",
        )
        .await
    }

    pub async fn admin_post(&self, path: &str) -> Reply {
        send(
            &self.client,
            Method::POST,
            &format!("{}{path}", self.admin),
            &[],
            "",
        )
        .await
    }

    /// The value of one metric series, e.g. `crm_proxy_expired_total{route="create"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = String::from_utf8(self.admin_get("/metrics").await.body.to_vec()).unwrap();
        metric_value(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    /// Stops the proxy (as on SIGTERM) and returns what it reported. (Dropping a harness stops
    /// it too: the stop channel closes.)
    pub async fn stop(self) -> (Stopped, Sim) {
        (self.served.stop().await, self.sim)
    }
}

/// Asserts the CRM holds `expected` tickets with distinct subjects: every write delivered, once.
pub fn assert_each_ticket_once(sim: &Sim, expected: usize) {
    let mut per_subject: std::collections::HashMap<String, usize> = Default::default();
    for t in sim.tickets() {
        *per_subject.entry(t.subject).or_default() += 1;
    }
    let twice: Vec<_> = per_subject.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(per_subject.len(), expected, "every write delivered");
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The proxy binary as an operator runs it: a real process whose log (stderr) is collected.
pub struct Process {
    child: std::process::Child,
    pub data: String,
    pub admin: String,
    log: StderrLines,
}

/// What a child process writes to stderr, line by line, collected by a thread of its own as it
/// comes (so the pipe never fills).
pub struct StderrLines {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl StderrLines {
    /// Follows the stderr of `child`, spawned with `Stdio::piped()` for it.
    pub fn follow(child: &mut std::process::Child) -> StderrLines {
        use std::io::{BufRead, BufReader};
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        StderrLines {
            lines,
            reader: Some(reader),
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to `limit` for a line that `find` takes something from (`Ok`), or for `child`,
    /// the process followed, to exit without one (`Err`).
    pub async fn line_or_exit<T>(
        &self,
        what: &str,
        limit: Duration,
        child: &mut std::process::Child,
        find: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ()> {
        eventually(what, limit, || {
            let found = self.lines().iter().find_map(|l| find(l));
            let exited = child.try_wait().unwrap().is_some();
            async move {
                match (found, exited) {
                    (Some(v), _) => Some(Ok(v)),
                    (None, true) => Some(Err(())),
                    (None, false) => None,
                }
            }
        })
        .await
    }

    /// Waits for the end of the stream: call once the child has exited.
    pub fn finish(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_crm-quota-proxy"))
}

impl Process {
    /// `crm-quota-proxy run --config <config>` with the upstream URL from the environment.
    pub fn command(config: &std::path::Path, upstream: &str) -> std::process::Command {
        let mut cmd = bin();
        cmd.args(["run", "--config"])
            .arg(config)
            .env("CRM_PROXY_UPSTREAM_URL", upstream)
            .env("RUST_LOG", "info");
        cmd
    }

    /// Spawns `cmd` and waits for its "listening" line; `Err` holds the log if it exited first.
    pub async fn spawn(mut cmd: std::process::Command) -> Result<Process, Vec<String>> {
        let mut child = cmd
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let log = StderrLines::follow(&mut child);
        let mut process = Process {
            child,
            data: String::new(),
            admin: String::new(),
            log,
        };
        let listening = process
            .log
            .line_or_exit(
                "the proxy to listen or exit",
                Duration::from_secs(20),
                &mut process.child,
                |l| {
                    l.contains("crm-quota-proxy listening")
                        .then(|| l.to_string())
                },
            )
            .await;
        let Ok(listening) = listening else {
            let _ = process.child.wait();
            process.log.finish();
            return Err(process.lines());
        };
        let json = serde_json::from_str::<Value>(&listening).ok();
        let field = |name: &str| -> String {
            if let Some(line) = &json {
                return line["fields"][name].as_str().unwrap().to_string();
            }
            let at = listening.find(&format!("{name}=")).unwrap() + name.len() + 1;
            listening[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        process.data = format!("http://{}", field("data"));
        process.admin = format!("http://{}", field("admin"));
        Ok(process)
    }

    pub async fn start(config: &std::path::Path, upstream: &str) -> Process {
        Process::spawn(Process::command(config, upstream))
            .await
            .unwrap_or_else(|log| panic!("the proxy exited at start:\n{}", log.join("\n")))
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.lines()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A GET on the admin listener.
    pub async fn admin_get(&self, client: &HttpClient, path: &str) -> Reply {
        send(
            client,
            Method::GET,
            &format!("{}{path}", self.admin),
            &[],
            "",
        )
        .await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self, client: &HttpClient) -> String {
        String::from_utf8_lossy(&self.admin_get(client, "/metrics").await.body).into_owned()
    }

    /// Sends `signal` (e.g. "KILL", "TERM") and waits for the exit; returns it with the log.
    pub fn signal(mut self, signal: &str) -> (std::process::ExitStatus, Vec<String>) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let exit = self.child.wait().unwrap();
        self.log.finish();
        (exit, self.lines())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failing test shows what the proxy said last (captured with the test's output).
            self.log.finish();
            let lines = self.lines();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("the proxy's last log lines:\n{}", tail.join("\n"));
        }
    }
}

/// A proxy served in this process (listeners on 127.0.0.1:0), without a simulated CRM of its
/// own: several can share one.
pub struct Served {
    pub url: String,
    pub admin: String,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<Stopped, crm_quota_proxy::server::Failure>>,
}

impl Served {
    /// Serves `yaml`; its listeners are put on `127.0.0.1:0` unless it has a `listen` section
    /// of its own (which must do so).
    pub async fn start(yaml: &str) -> Served {
        let yaml = if yaml.starts_with("listen:") || yaml.contains("\nlisten:") {
            yaml.to_string()
        } else {
            format!("listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n{yaml}")
        };
        let config = Config::from_yaml(&yaml, None).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let listeners = Listeners::bind(&config).await.unwrap();
        let url = format!("http://{}", listeners.data.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            config,
            listeners,
            Arc::new(SystemClock::new()),
            async move {
                let _ = stopped.await;
            },
        ));
        Served {
            url,
            admin,
            stop,
            server,
        }
    }

    pub async fn stop(self) -> Stopped {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap()
    }
}

/// The Redis the shared-ledger tests use: `CRM_PROXY_TEST_REDIS` or `redis://127.0.0.1:6379`.
/// Fails the test, saying how to start one, when none answers.
pub fn redis_url() -> String {
    let url = std::env::var("CRM_PROXY_TEST_REDIS")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
    let addr = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let answered = std::net::TcpStream::connect_timeout(
        &addr.parse().expect("a host:port Redis address"),
        Duration::from_secs(2),
    )
    .and_then(|mut s| {
        use std::io::{Read, Write};
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        Ok(buf[..n].starts_with(b"+PONG"))
    })
    .unwrap_or(false);
    assert!(
        answered,
        "this test needs Redis at {url} and none answers: start one with \
         `redis-server --daemonize yes --port 6379 --save \"\" --appendonly no` \
         (or point CRM_PROXY_TEST_REDIS at one); .ci/run starts it when missing"
    );
    url
}

/// A loopback port nothing listens on now, for a server that must be told its port (a process
/// of someone else's that cannot report one the kernel chose: chromedriver).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until a GET of `url` answers with a success status (a server that was just started).
pub async fn until_serving(what: &str, url: &str) {
    let http = client();
    eventually(what, Duration::from_secs(30), || {
        let (http, url) = (http.clone(), url.to_string());
        async move {
            let req = Request::get(&url).body(Full::new(Bytes::new())).unwrap();
            // An attempt that gets no answer within 2 s counts as "not yet".
            let resp = tokio::time::timeout(Duration::from_secs(2), http.request(req)).await;
            resp.ok()?.ok()?.status().is_success().then_some(())
        }
    })
    .await;
}

/// A key prefix no other test (or earlier run) uses.
pub fn unique_prefix(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test-{name}-{nanos:x}")
}

/// A `redis-server` of this test's own on a free port, stopped (SIGKILL) on drop.
pub struct OwnRedis {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    persistent: bool,
}

impl OwnRedis {
    /// Starts one; `persistent`: `appendonly yes` + `appendfsync always` in a directory of its
    /// own (else nothing is kept across a restart).
    pub async fn start(persistent: bool) -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = OwnRedis {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            persistent,
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port (and directory) after a kill.
    pub async fn restart(&mut self) {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--dir", self.dir.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("this test starts its own redis-server and cannot ({e}): install Debian's redis-server package (.ci/run does)")
        });
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        eventually(
            "the test's redis-server to answer",
            Duration::from_secs(10),
            || {
                let addr = addr.clone();
                async move { std::net::TcpStream::connect(&addr).ok().map(|_| ()) }
            },
        )
        .await;
    }

    /// SIGKILL: no shutdown, no last save.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
