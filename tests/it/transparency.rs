//! Within budget the proxy is a plain reverse proxy: same status, headers and body as the CRM.

use std::time::Duration;

use crm_quota_proxy::sim::SimConfig;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const ROOMY: &str =
    "upstream: { url: \"{upstream}\" }\nquotas:\n  - { name: minute, limit: 1000, window: 1m }\n";

fn roomy_sim() -> SimConfig {
    SimConfig::new(10_000, Duration::from_secs(60))
}

#[tokio::test]
async fn methods_paths_queries_and_bodies_pass_through_unchanged() {
    let h = Harness::start(roomy_sim(), ROOMY).await;
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ] {
        let body = if method == Method::GET {
            ""
        } else {
            "{\"hello\":\"crm\"}"
        };
        let r = h
            .call(method.clone(), "/echo/a/b?x=1&y=%20z&x=2", body)
            .await;
        assert_eq!(r.status, 200, "{method}");
        let v = r.json();
        assert_eq!(v["method"], method.as_str());
        assert_eq!(v["path"], "/echo/a/b");
        assert_eq!(v["query"], "x=1&y=%20z&x=2");
        assert_eq!(v["body_len"], body.len());
    }
}

#[tokio::test]
async fn status_codes_and_crm_headers_come_back_as_sent() {
    let h = Harness::start(roomy_sim(), ROOMY).await;
    for code in [200u16, 201, 204, 301, 400, 404, 409, 418, 422, 500, 503] {
        let r = h
            .call(Method::GET, &format!("/echo/s?status={code}"), "")
            .await;
        assert_eq!(r.status.as_u16(), code);
        if code != 204 && code != 301 {
            assert_eq!(r.header("x-echo"), "1", "the CRM's own header survives");
        }
        // The CRM's rate-limit headers are passed through untouched, next to the proxy's own.
        assert_eq!(r.header("x-rate-limit"), "10000");
        assert!(
            r.header("ratelimit-policy")
                .starts_with("\"minute\";q=1000;w=60")
        );
        assert!(r.header("ratelimit").starts_with("\"minute\";r="));
    }
}

#[tokio::test]
async fn request_headers_are_cleaned_and_forwarded_headers_added() {
    let h = Harness::start(roomy_sim(), ROOMY).await;
    let url = format!("{}/echo/h", h.url);
    let r = send(
        &h.client,
        Method::GET,
        &url,
        &[
            ("authorization", TOKEN),
            ("x-custom", "kept"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
        "",
    )
    .await;
    let headers = &r.json()["headers"];
    assert_eq!(headers["authorization"][0], TOKEN);
    assert_eq!(headers["x-custom"][0], "kept");
    assert_eq!(headers["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"][0], "http");
    assert_eq!(
        headers["x-forwarded-host"][0],
        h.url.trim_start_matches("http://")
    );
    assert_eq!(
        headers["host"][0],
        h.sim.addr.to_string(),
        "Host is the upstream's"
    );
    for gone in ["x-hop", "te", "proxy-authorization"] {
        assert!(headers.get(gone).is_none(), "{gone} must not be forwarded");
    }
}

#[tokio::test]
async fn over_http2_hop_by_hop_fields_are_not_forwarded_and_ratelimit_fields_come_back() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let h = Harness::start(roomy_sim(), ROOMY).await;
    let tcp = tokio::net::TcpStream::connect(h.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // HTTP/2 has no `Connection` field; these are the hop-by-hop ones it may carry.
    let req = http::Request::get(format!("{}/echo/h", h.url))
        .header("authorization", TOKEN)
        .header("x-custom", "kept")
        .header("te", "trailers")
        .header("trailer", "x-t")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::OK);
    // The proxy's own fields, which reach the HTTP/1.1 writer beside the map, are in HTTP/2's.
    let field = |name: &str| resp.headers()[name].to_str().unwrap().to_string();
    assert_eq!(field("ratelimit-policy"), "\"minute\";q=1000;w=60");
    assert!(field("ratelimit").starts_with("\"minute\";r="));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let headers = &echoed["headers"];
    assert_eq!(headers["x-custom"][0], "kept");
    for gone in ["te", "trailer", "proxy-authorization"] {
        assert!(headers.get(gone).is_none(), "{gone} must not be forwarded");
    }
    drop(sender);
    conn.abort();
}

#[tokio::test]
async fn large_request_and_streamed_chunked_responses_arrive_intact() {
    let h = Harness::start(roomy_sim(), ROOMY).await;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let r = h.call(Method::POST, "/echo/upload", big.clone()).await;
    let digest = ring::digest::digest(&ring::digest::SHA256, &big);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(r.json()["body_len"], big.len());
    assert_eq!(r.json()["body_sha256"], hex);

    // 5 MiB produced in 16 KiB chunks without a Content-Length.
    let n = 5 * 1024 * 1024;
    let r = h
        .call(Method::GET, &format!("/echo/download?bytes={n}"), "")
        .await;
    assert_eq!(r.body.len(), n);
    assert!(r.headers.get("content-length").is_none());
    assert!(
        r.body
            .chunks(16 * 1024)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == b'a' + (i % 26) as u8))
    );
}

#[tokio::test]
async fn chunked_request_bodies_are_accepted() {
    let h = Harness::start(roomy_sim(), ROOMY).await;
    let mut s = tokio::net::TcpStream::connect(h.url.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(b"POST /echo/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"body_len\":11"), "{text}");
}

#[tokio::test]
async fn admin_endpoints_are_not_served_on_the_data_listener() {
    let h = Harness::start(roomy_sim(), ROOMY).await;
    for path in ["/metrics", "/status", "/healthz"] {
        let r = h.call(Method::GET, path, "").await;
        assert_eq!(
            r.status, 404,
            "{path} is forwarded to the CRM, which does not know it"
        );
        assert_eq!(r.json()["error"], "InvalidEndpoint");
    }
}

/// Every metric the README lists exists on a fresh proxy, before any event: dashboards and alert
/// rules see zero, not "no data", while all is well.
#[tokio::test]
async fn every_metric_of_the_readme_is_there_from_the_start() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut names: Vec<&str> = Vec::new();
    for line in readme.lines().filter(|l| l.starts_with("| `crm_proxy_")) {
        let cell = line.split('|').nth(1).unwrap();
        names.extend(cell.split('`').filter(|n| n.starts_with("crm_proxy_")));
    }
    assert!(names.len() > 40, "{names:?}");
    let yaml = "upstream: { url: \"{upstream}\", crm: zendesk }\n\
                queue: { store: disk, data_dir: \"{data}\" }\n\
                quotas:\n  - { name: minute, limit: 100, window: 1m }\n  - { name: day, limit: 2500, window: 1d, kind: fixed, schedule: { at_once: 50% } }\n  - { name: per-ticket, limit: 30, window: 10m, scope: route, key: [\"path:id\"] }\n\
                routes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json, batch: { max_size: 10 } }\n  - { name: update, methods: [PUT], path: \"/api/v2/tickets/{id}.json\", quotas: [per-ticket] }\n";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let yaml = yaml.replace("{data}", data.to_str().unwrap());
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(60)), &yaml).await;
    let text = String::from_utf8(h.admin_get("/metrics").await.body.to_vec()).unwrap();
    // What the CRM reported is unknown until it reports: a zero there would say "nothing left".
    let reported = ["crm_proxy_quota_crm_remaining", "crm_proxy_quota_crm_limit"];
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !reported.contains(n))
        .filter(|n| {
            !text.lines().any(|l| {
                l.strip_prefix(**n)
                    .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
                    && !l.starts_with('#')
            })
        })
        .collect();
    assert!(missing.is_empty(), "no sample at start for {missing:?}");
    for series in [
        "crm_proxy_throttled_total{reason=\"too_many_jobs\",route=\"create\"} 0",
        "crm_proxy_upstream_errors_total{kind=\"timeout\",route=\"create\"} 0",
        "crm_proxy_upstream_header_errors_total{header=\"ratelimit-remaining\"} 0",
        "crm_proxy_batch_size_count{route=\"create\"} 0",
    ] {
        assert!(text.contains(series), "{series}");
    }
    assert!(text.contains("crm_proxy_build_info{profile="), "build info");
}

/// Connections held open at once are spread over the data threads: the accepting thread hands
/// a new one to the least busy once it serves more than one connection more. Every connection,
/// kept or handed over, serves its requests to the end, and a connection closed frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_held_open_at_once_are_served_on_every_data_thread() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    let yaml =
        format!("listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0, data_threads: 3 }}\n{ROOMY}");
    let h = Harness::start(roomy_sim(), &yaml).await;
    let addr = h.url.trim_start_matches("http://").to_string();
    let connect = |addr: &str| {
        let addr = addr.to_string();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            (sender, tokio::spawn(conn))
        }
    };
    let mut conns = Vec::new();
    for _ in 0..7 {
        conns.push(connect(&addr).await);
    }
    for round in 0..3 {
        if round > 0 {
            // One connection closes and a new one takes its place.
            let (sender, conn) = conns.remove(0);
            drop(sender);
            conn.await.unwrap().unwrap();
            conns.push(connect(&addr).await);
        }
        for (i, (sender, _)) in conns.iter_mut().enumerate() {
            let req = http::Request::get(format!("/echo/c{i}/r{round}"))
                .header("host", &addr)
                .header("authorization", TOKEN)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(
                resp.status(),
                http::StatusCode::OK,
                "connection {i}, round {round}"
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(echoed["path"], format!("/echo/c{i}/r{round}"));
        }
    }
    assert_eq!(h.sim.stats().calls, 21);
    // The two closed are counted out once the proxy has seen them close.
    eventually(
        "7 open data connections",
        Duration::from_secs(5),
        || async {
            (h.metric("crm_proxy_connections{listener=\"data\"}").await == 7.0).then_some(())
        },
    )
    .await;
}

/// The data plane on threads of its own (the default, one per core) and on the shared runtime
/// (`listen.data_threads: 0`) answer alike, over many connections spread across the threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_threads_and_the_shared_runtime_answer_alike() {
    let mut answers = Vec::new();
    for threads in ["0", "3"] {
        let yaml = format!(
            "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0, data_threads: {threads} }}\n{ROOMY}"
        );
        let h = Harness::start(roomy_sim(), &yaml).await;
        let mut got = Vec::new();
        // A fresh client (and connection) per request: they are handed to the threads in turn.
        for i in 0..6 {
            let url = format!("{}/echo/t/{i}?q={i}", h.url);
            let r = send(&client(), Method::POST, &url, &[], format!("body {i}")).await;
            let v = r.json();
            got.push((r.status, v["path"].clone(), v["body_sha256"].clone()));
        }
        assert_eq!(h.sim.stats().calls, 6, "data_threads {threads}");
        answers.push(got);
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0][5].1, "/echo/t/5");
}
