//! Clients that stall, trickle, hoard connections or speak odd methods: each holds at most its
//! own connection, gets a precise answer, and never stops the listener serving others.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use crm_quota_proxy::sim::SimConfig;
use http::{Method, Request, StatusCode};
use hyper::body::{Body, Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

fn roomy() -> SimConfig {
    SimConfig::new(10_000, Duration::from_secs(60))
}

/// A proxy with `listen` extras (`max_concurrent_requests: 2` unless they say otherwise).
fn config(listen: &str) -> String {
    format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0, {listen} }}\n\
         upstream: {{ url: \"{{upstream}}\" }}\n\
         quotas:\n  - {{ name: minute, limit: 1000, window: 1m }}\n\
         routes:\n  - {{ name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue }}\n"
    )
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the peer closes (or `limit` passes, which fails the test): all it sent.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut got))
        .await
        .expect("the proxy closed the connection in time")
        .ok();
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether `stream` has nothing to read yet (and is still open).
fn nothing_yet(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

const STALLED_POST: &str = "POST /api/v2/tickets.json HTTP/1.1\r\nhost: crm\r\nauthorization: Bearer t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_hold_no_processing_slot_and_get_408() {
    let h = Harness::start(
        roomy(),
        &config("max_concurrent_requests: 2, body_timeout: 3s"),
    )
    .await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr(&h.url)).await.unwrap();
        s.write_all(STALLED_POST.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    // Twenty bodies stall with two processing slots: a search is answered while they still do.
    let r = h
        .call(Method::GET, "/api/v2/search.json?query=ada", "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        stalled.iter().all(nothing_yet),
        "answered while every stalled body was still held"
    );
    for mut s in stalled {
        let answer = read_to_close(&mut s, Duration::from_secs(20)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("body_timeout"), "{answer}");
    }
    assert_eq!(
        h.metric("crm_proxy_requests_total{outcome=\"body_timeout\",route=\"create\"}")
            .await,
        20.0
    );
    assert_eq!(h.sim.stats().calls, 1, "only the search reached the CRM");
}

/// A request body that sends one byte and then nothing.
struct OneByteThenStall(bool);

impl Body for OneByteThenStall {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.0 {
            return Poll::Pending;
        }
        self.0 = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{")))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_streams_hold_no_processing_slot() {
    let h = Harness::start(
        roomy(),
        &config("max_concurrent_requests: 2, body_timeout: 3s"),
    )
    .await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let tcp = TcpStream::connect(addr(&h.url)).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        for _ in 0..50 {
            let mut sender = sender.clone();
            let req = Request::post(format!("{}/api/v2/tickets.json", h.url))
                .header("authorization", "Bearer t")
                .header("content-type", "application/json")
                .body(OneByteThenStall(false))
                .unwrap();
            streams.push(tokio::spawn(async move {
                sender.ready().await.unwrap();
                sender.send_request(req).await.map(|r| r.status())
            }));
        }
    }
    let r = h
        .call(Method::GET, "/api/v2/search.json?query=ada", "")
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        streams.iter().all(|s| !s.is_finished()),
        "answered while every stalled stream was still held"
    );
    for s in streams {
        let status = tokio::time::timeout(Duration::from_secs(20), s)
            .await
            .expect("the stalled stream was answered in time")
            .unwrap();
        assert_eq!(status.ok(), Some(StatusCode::REQUEST_TIMEOUT));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_slow_heads_are_closed_after_header_timeout() {
    let h = Harness::start(roomy(), &config("header_timeout: 500ms")).await;
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(TcpStream::connect(addr(&h.url)).await.unwrap());
    }
    let mut slow = TcpStream::connect(addr(&h.url)).await.unwrap();
    slow.write_all(b"GET /api/v2/search.json HTTP/1.1\r\nhost: crm\r\n")
        .await
        .unwrap();
    for mut s in silent {
        assert_eq!(read_to_close(&mut s, Duration::from_secs(10)).await, "");
    }
    let answer = read_to_close(&mut slow, Duration::from_secs(10)).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    assert_eq!(
        h.metric("crm_proxy_connections_closed_total{listener=\"data\",reason=\"header_timeout\"}")
            .await,
        31.0
    );
    assert_eq!(h.sim.stats().calls, 0);
    // The listener still serves.
    let r = h.call(Method::GET, "/api/v2/search.json", "").await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_after_a_served_request_is_closed_at_the_header_timeout() {
    // The idle timeout is far beyond the read limit below: only the header timeout, counted
    // from the second head's first bytes, can close this connection in time.
    let h = Harness::start(roomy(), &config("header_timeout: 1s, idle_timeout: 10m")).await;
    let mut s = TcpStream::connect(addr(&h.url)).await.unwrap();
    s.write_all(
        b"GET /api/v2/search.json HTTP/1.1\r\nhost: crm\r\nauthorization: Bearer t\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the first answer in time")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    s.write_all(b"GET /api/v2/search.json HTTP/1.1\r\nhost: crm\r\n")
        .await
        .unwrap();
    let rest = read_to_close(&mut s, Duration::from_secs(8)).await;
    assert!(!rest.contains("HTTP/1.1 200"), "{rest}");
    assert_eq!(
        h.metric("crm_proxy_connections_closed_total{listener=\"data\",reason=\"header_timeout\"}")
            .await,
        1.0
    );
    assert_eq!(h.sim.stats().calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let h = Harness::start(roomy(), &config("idle_timeout: 1s")).await;
    let mut s = TcpStream::connect(addr(&h.url)).await.unwrap();
    s.write_all(
        b"GET /api/v2/search.json HTTP/1.1\r\nhost: crm\r\nauthorization: Bearer t\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        h.metric("crm_proxy_connections_closed_total{listener=\"data\",reason=\"idle\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let h = Harness::start(roomy(), &config("max_connections: 3")).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr(&h.url)).await.unwrap());
    }
    // Each held connection is accepted (the next one connects after it).
    eventually("three open connections", Duration::from_secs(5), || async {
        (h.metric("crm_proxy_connections{listener=\"data\"}").await == 3.0).then_some(())
    })
    .await;
    let mut extra = TcpStream::connect(addr(&h.url)).await.unwrap();
    // Closed long before the 10 s a silent connection would be given.
    assert_eq!(read_to_close(&mut extra, Duration::from_secs(5)).await, "");
    assert_eq!(
        h.metric("crm_proxy_connections_closed_total{listener=\"data\",reason=\"over_cap\"}")
            .await,
        1.0
    );
    drop(held.pop());
    let r = eventually(
        "a slot for a new client",
        Duration::from_secs(5),
        || async {
            let mut s = TcpStream::connect(addr(&h.url)).await.ok()?;
            s.write_all(
                b"GET /api/v2/search.json HTTP/1.1\r\nhost: crm\r\nconnection: close\r\n\r\n",
            )
            .await
            .ok()?;
            let answer = read_to_close(&mut s, Duration::from_secs(5)).await;
            answer.starts_with("HTTP/1.1 200").then_some(answer)
        },
    )
    .await;
    assert!(r.contains("200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_descriptor_limit_lowers_the_connection_cap_instead_of_failing_accepts() {
    let sim = crm_quota_proxy::sim::Sim::start(roomy()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        "listen: { data: 127.0.0.1:0, admin: 127.0.0.1:0, max_concurrent_requests: 16, header_timeout: 1s }\n\
         upstream: { url: http://placeholder, pool_max_idle: 4 }\n\
         queue: { max_in_flight: 2 }\n\
         quotas:\n  - { name: minute, limit: 1000, window: 1m }\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_crm-quota-proxy"))
        .args(["run", "--config"])
        .arg(&path)
        .env("CRM_PROXY_UPSTREAM_URL", sim.url())
        .env("RUST_LOG", "info");
    let proxy = Process::spawn(cmd).await.expect("the proxy starts");
    assert!(
        proxy
            .lines()
            .iter()
            .any(|l| l.contains("listen.max_connections lowered")),
        "{:?}",
        proxy.lines()
    );
    // More silent connections than descriptors: the ones over the cap are closed at once, the
    // rest after header_timeout; none fails an accept.
    let mut conns = Vec::new();
    for _ in 0..300 {
        conns.push(TcpStream::connect(addr(&proxy.data)).await.unwrap());
    }
    for mut c in conns {
        assert_eq!(read_to_close(&mut c, Duration::from_secs(20)).await, "");
    }
    let client = client();
    let r = send(
        &client,
        Method::GET,
        &format!("{}/api/v2/search.json", proxy.data),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let text = proxy.metrics(&client).await;
    assert_eq!(
        metric_value(&text, "crm_proxy_accept_errors_total{listener=\"data\"}"),
        Some(0.0)
    );
    assert!(
        metric_value(
            &text,
            "crm_proxy_connections_closed_total{listener=\"data\",reason=\"over_cap\"}"
        )
        .unwrap()
            > 0.0
    );
}

#[tokio::test]
async fn methods_no_crm_uses_get_405_and_never_reach_the_crm() {
    let h = Harness::start(roomy(), &config("max_concurrent_requests: 8")).await;
    let long = "X".repeat(5_000);
    for method in ["FOO", "get", "TRACE", "CONNECT", long.as_str()] {
        let mut s = TcpStream::connect(addr(&h.url)).await.unwrap();
        let target = if method == "CONNECT" {
            "crm.example:443"
        } else {
            "/api/v2/tickets.json"
        };
        s.write_all(
            format!(
                "{method} {target} HTTP/1.1\r\nhost: crm\r\nauthorization: Bearer t\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let answer = read_to_close(&mut s, Duration::from_secs(10)).await;
        let shown = &method[..method.len().min(10)];
        assert!(answer.starts_with("HTTP/1.1 405"), "{shown}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("allow: get, head, options, post, put, patch, delete"),
            "{shown}: {answer}"
        );
    }
    assert_eq!(h.sim.stats().calls, 0, "nothing reached the CRM");
    assert_eq!(h.metric("crm_proxy_queue_entries").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_request_bytes_stay_within_their_budget() {
    let yaml = "listen: { data: 127.0.0.1:0, admin: 127.0.0.1:0, max_buffered_bytes: 1KiB, body_timeout: 1s }\n\
                max_body_bytes: 1KiB\n\
                upstream: { url: \"{upstream}\" }\n\
                quotas:\n  - { name: minute, limit: 1000, window: 1m }\n";
    let h = Harness::start(roomy(), yaml).await;
    // One client sends 1,000 of its 1,024 bytes and stalls: the budget is spent.
    let mut hog = TcpStream::connect(addr(&h.url)).await.unwrap();
    let head = "POST /echo/hog HTTP/1.1\r\nhost: crm\r\ncontent-length: 1024\r\n\r\n";
    hog.write_all(format!("{head}{}", "x".repeat(1_000)).as_bytes())
        .await
        .unwrap();
    eventually(
        "the hog's bytes buffered",
        Duration::from_secs(5),
        || async { (h.metric("crm_proxy_request_bytes_buffered").await == 1_000.0).then_some(()) },
    )
    .await;
    // Another body waits for room until its own deadline, then is told to come back.
    let r = h.call(Method::POST, "/echo/next", "y".repeat(100)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.json()["error"], "busy");
    assert_eq!(r.header("retry-after"), "1");
    let answer = read_to_close(&mut hog, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(h.metric("crm_proxy_request_bytes_buffered").await, 0.0);
    let r = h.call(Method::POST, "/echo/next", "y".repeat(100)).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_ticket_counts_against_that_ticket() {
    let h = Harness::start(
        roomy(),
        "upstream: { url: \"{upstream}\" }\n\
         quotas:\n  - { name: minute, limit: 1000, window: 1m }\n  \
           - { name: per-ticket, limit: 3, window: 10m, scope: route, key: [\"path:id\"] }\n\
         routes:\n  - { name: update, methods: [PUT], path: \"/api/v2/tickets/{id}.json\", quotas: [per-ticket], on_limit: queue, max_wait: 0s }\n",
    )
    .await;
    for subject in ["one"] {
        let url = format!("{}/api/v2/tickets.json", h.sim.url());
        let r = send(&h.client, Method::POST, &url, &[], ticket_body(subject)).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let body = r#"{"ticket":{"comment":{"body":"x"}}}"#;
    for _ in 0..3 {
        let r = h.call(Method::PUT, "/api/v2/tickets/1.json", body).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    for spelling in [
        "/api/v2/tickets/1.json",
        "/api/v2/tickets/%31.json",
        "/api/v2/tickets/01.json",
        "//api/v2//tickets/1.json",
        "/api/v2/./tickets/1.json",
        "/api/v2/users/../tickets/1.json",
        "/api/v2/tickets/1.json/",
        "/api/v2/tickets/1.json;x",
        "/API/V2/tickets/1.json",
    ] {
        let r = h.call(Method::PUT, spelling, body).await;
        assert_eq!(
            r.status,
            StatusCode::ACCEPTED,
            "{spelling}: parked, not forwarded"
        );
    }
    assert_eq!(
        h.sim.stats().calls,
        1 + 3,
        "only the first three updates reached the CRM"
    );
    // A path whose escapes would change its structure is refused, not guessed at.
    let r = h.call(Method::PUT, "/api/v2/tickets%2F1.json", body).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "bad_path");
    assert_eq!(h.sim.stats().calls, 1 + 3);
}
