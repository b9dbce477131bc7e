//! The CRM side of HTTP/1.1 on the wire: a CRM written byte by byte answers with every framing
//! HTTP/1.1 allows, and the proxy relays each answer whole, sends each request as it came, and
//! reuses a connection only where the protocol lets it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crm_quota_proxy::sim::{Sim, SimConfig};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::*;

/// What the scripted CRM sends for a request: the bytes, then whether it closes the connection.
type Script = fn(&Method, &str) -> (Vec<u8>, bool);

/// A CRM speaking raw HTTP/1.1 from a script, counting its connections and keeping every
/// request as it arrived (head and body).
struct WireCrm {
    url: String,
    opened: Arc<AtomicUsize>,
    closed: watch::Receiver<usize>,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Tells a connection that answered `/api/v2/then-stray` to send bytes nobody asked for.
    stray: Arc<tokio::sync::Notify>,
    /// How many such unasked answers were sent.
    strays: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl WireCrm {
    async fn start(script: Script) -> WireCrm {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let opened = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (closed_tx, closed) = watch::channel(0);
        let closed_tx = Arc::new(closed_tx);
        let (strays_tx, strays) = watch::channel(0);
        let unasked = Unasked {
            told: Arc::new(tokio::sync::Notify::new()),
            sent: Arc::new(strays_tx),
        };
        let stray = unasked.told.clone();
        let (counted, kept) = (opened.clone(), received.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let (kept, closed_tx, unasked) = (kept.clone(), closed_tx.clone(), unasked.clone());
                tokio::spawn(async move {
                    serve(tcp, script, &kept, &unasked).await;
                    closed_tx.send_modify(|n| *n += 1);
                });
            }
        });
        WireCrm {
            url,
            opened,
            closed,
            received,
            stray,
            strays,
            task,
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    /// Waits (at most 10 s) until the CRM has closed `n` connections.
    async fn closed(&mut self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), self.closed.wait_for(|c| *c >= n))
            .await
            .expect("the CRM closes its connections")
            .unwrap();
    }

    fn received(&self) -> Vec<String> {
        let seen = self.received.lock().unwrap();
        seen.iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }
}

/// Where a connection that answered `/api/v2/then-stray` waits to be told to send an answer
/// nobody asked for, and counts it sent.
#[derive(Clone)]
struct Unasked {
    told: Arc<tokio::sync::Notify>,
    sent: Arc<watch::Sender<usize>>,
}

/// Reads requests (head, then a `Content-Length` body) and answers each from the script.
async fn serve(mut tcp: TcpStream, script: Script, kept: &Mutex<Vec<Vec<u8>>>, unasked: &Unasked) {
    let mut buf = Vec::new();
    loop {
        let (head_len, method, path, body_len) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut fields);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let body_len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |h| {
                        std::str::from_utf8(h.value).unwrap().parse().unwrap()
                    });
                let method = Method::from_bytes(req.method.unwrap().as_bytes()).unwrap();
                break (n, method, req.path.unwrap().to_string(), body_len);
            }
            if !read_more(&mut tcp, &mut buf).await {
                return;
            }
        };
        while buf.len() < head_len + body_len {
            if !read_more(&mut tcp, &mut buf).await {
                return;
            }
        }
        kept.lock()
            .unwrap()
            .push(buf.drain(..head_len + body_len).collect());
        let (answer, close) = script(&method, &path);
        // Sent in two writes, so the proxy may well see the answer in pieces.
        let half = answer.len() / 2;
        for part in [&answer[..half], &answer[half..]] {
            if tcp.write_all(part).await.is_err() {
                return;
            }
            let _ = tcp.flush().await;
            tokio::task::yield_now().await;
        }
        if close {
            let _ = tcp.shutdown().await;
            return;
        }
        if path == "/api/v2/then-stray" {
            unasked.told.notified().await;
            let stray = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray";
            if tcp.write_all(stray).await.is_err() {
                return;
            }
            unasked.sent.send_modify(|n| *n += 1);
        }
    }
}

async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match tcp.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

const BIG: usize = 1 << 20;

fn big_body() -> Vec<u8> {
    (0..BIG).map(|i| b"0123456789abcdef"[i % 16]).collect()
}

fn framings(method: &Method, path: &str) -> (Vec<u8>, bool) {
    let text = |s: &str| (s.as_bytes().to_vec(), false);
    match path.split('?').next().unwrap_or_default() {
        "/api/v2/length" if *method == Method::HEAD => {
            text("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        }
        "/api/v2/length" => text("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        "/api/v2/chunked" => text(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-crm: 1\r\n\r\n\
             5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
        ),
        "/api/v2/interim" => {
            text("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
        }
        "/api/v2/empty" => text("HTTP/1.1 204 No Content\r\n\r\n"),
        "/api/v2/big" => {
            let mut answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
            answer.extend(big_body());
            (answer, false)
        }
        "/api/v2/to-the-close" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(), true),
        "/api/v2/says-close" => (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye".to_vec(),
            true,
        ),
        "/api/v2/then-stray" => text("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        "/api/v2/then-closes" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            true,
        ),
        "/api/v2/bad-length" => text("HTTP/1.1 200 OK\r\ncontent-length: 12x\r\n\r\n"),
        "/api/v2/mute" => (Vec::new(), true),
        "/api/v2/cut-short" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
            true,
        ),
        _ => text("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
    }
}

async fn through(crm: &WireCrm) -> Harness {
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0, data_threads: 1 }}\n\
         upstream: {{ url: \"{}\", pool_idle_timeout: 60s }}\n\
         quotas:\n  - {{ name: w, limit: 1000, window: 60s }}\n",
        crm.url
    );
    Harness::with_config(
        Sim::start(SimConfig::new(1_000, Duration::from_secs(60)))
            .await
            .unwrap(),
        &yaml,
    )
    .await
}

#[tokio::test]
async fn every_framing_reaches_the_client_whole_on_one_reused_connection() {
    let mut crm = WireCrm::start(framings).await;
    let h = through(&crm).await;
    let get = |path: &'static str| h.call(Method::GET, path, "");

    let r = get("/api/v2/length").await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello"[..]));
    let r = get("/api/v2/chunked").await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello world"[..]));
    assert_eq!(r.headers["x-crm"], "1");
    let r = get("/api/v2/interim").await;
    assert_eq!(
        (r.status.as_u16(), &r.body[..]),
        (201, &b"ok"[..]),
        "the 100 is skipped"
    );
    let r = get("/api/v2/empty").await;
    assert_eq!((r.status.as_u16(), r.body.len()), (204, 0));
    let r = h.call(Method::HEAD, "/api/v2/length", "").await;
    assert_eq!(
        (r.status.as_u16(), r.body.len()),
        (200, 0),
        "no body after HEAD"
    );
    assert_eq!(r.headers["content-length"], "5");
    let r = get("/api/v2/big").await;
    assert_eq!(r.status, 200);
    assert!(r.body[..] == big_body()[..], "a 1 MiB body arrives whole");
    assert_eq!(
        crm.opened(),
        1,
        "every answer above leaves the connection reusable"
    );

    // A body delimited by the close: read to the end, and the connection is not reused.
    let r = get("/api/v2/to-the-close").await;
    assert_eq!(
        (r.status.as_u16(), &r.body[..]),
        (200, &b"until the end"[..])
    );
    crm.closed(1).await;
    assert_eq!(get("/api/v2/length").await.body, "hello");
    assert_eq!(crm.opened(), 2);

    // `Connection: close` from the CRM: not reused either.
    assert_eq!(get("/api/v2/says-close").await.body, "bye");
    crm.closed(2).await;
    assert_eq!(get("/api/v2/length").await.body, "hello");
    assert_eq!(crm.opened(), 3);
    crm.task.abort();
}

#[tokio::test]
async fn a_connection_the_crm_closed_while_idle_is_not_used_again() {
    let mut crm = WireCrm::start(framings).await;
    let h = through(&crm).await;
    // The CRM answers (keep-alive by default) and then closes the connection, idle in the pool.
    assert_eq!(
        h.call(Method::GET, "/api/v2/then-closes", "").await.body,
        "ok"
    );
    crm.closed(1).await;
    // The next request finds it closed and goes on a new connection: no error for the client.
    let r = h.call(Method::POST, "/api/v2/length", r#"{"a":1}"#).await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello"[..]));
    assert_eq!(crm.opened(), 2);
    crm.task.abort();
}

#[tokio::test]
async fn a_connection_the_crm_sent_bytes_on_while_idle_is_not_used_again() {
    let mut crm = WireCrm::start(framings).await;
    let h = through(&crm).await;
    assert_eq!(
        h.call(Method::GET, "/api/v2/then-stray", "").await.body,
        "ok"
    );
    // The answer was read to its end and its connection kept; then the CRM sends an answer
    // nobody asked for on it.
    crm.stray.notify_one();
    tokio::time::timeout(Duration::from_secs(10), crm.strays.wait_for(|n| *n == 1))
        .await
        .expect("the CRM sends its stray answer")
        .unwrap();
    // The next request does not take that answer for its own: it goes on a new connection.
    let r = h.call(Method::POST, "/api/v2/length", r#"{"a":1}"#).await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello"[..]));
    assert_eq!(crm.opened(), 2);
    crm.task.abort();
}

#[tokio::test]
async fn a_request_reaches_the_crm_as_sent_with_its_length_counted_once() {
    let crm = WireCrm::start(framings).await;
    let h = through(&crm).await;
    let body = r#"{"ticket":{"subject":"wire"}}"#;
    let r = h.call(Method::POST, "/api/v2/length?x=1", body).await;
    assert_eq!(r.status, 200);
    assert_eq!(h.call(Method::GET, "/api/v2/length", "").await.status, 200);
    let seen = crm.received();
    let post = &seen[0];
    assert!(
        post.starts_with("POST /api/v2/length?x=1 HTTP/1.1\r\n"),
        "{post}"
    );
    let lower = post.to_ascii_lowercase();
    let host = crm.url.trim_start_matches("http://");
    assert_eq!(
        lower.matches(&format!("\r\nhost: {host}\r\n")).count(),
        1,
        "{post}"
    );
    assert_eq!(
        lower.matches("\r\nx-forwarded-proto: http\r\n").count(),
        1,
        "{post}"
    );
    // The client's own Host goes once, as X-Forwarded-Host.
    let proxy = h.url.trim_start_matches("http://");
    assert_eq!(lower.matches("\r\nhost: ").count(), 1, "{post}");
    assert_eq!(
        lower
            .matches(&format!("\r\nx-forwarded-host: {proxy}\r\n"))
            .count(),
        1,
        "{post}"
    );
    assert_eq!(
        lower
            .matches(&format!("\r\ncontent-length: {}\r\n", body.len()))
            .count(),
        1,
        "{post}"
    );
    assert!(
        post.contains("\r\nauthorization: "),
        "the credential goes on: {post}"
    );
    assert!(post.ends_with(&format!("\r\n\r\n{body}")), "{post}");
    let get = &seen[1];
    assert!(get.starts_with("GET /api/v2/length HTTP/1.1\r\n"), "{get}");
    assert!(
        !get.to_ascii_lowercase().contains("content-length"),
        "{get}"
    );
    crm.task.abort();
}

#[tokio::test]
async fn a_bad_or_missing_answer_is_a_502_and_its_connection_is_dropped() {
    let mut crm = WireCrm::start(framings).await;
    let h = through(&crm).await;
    let r = h.call(Method::GET, "/api/v2/bad-length", "").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "upstream_unreachable");
    crm.closed(1).await;
    let r = h.call(Method::GET, "/api/v2/mute", "").await;
    assert_eq!(
        r.status, 502,
        "the CRM closed the connection without answering"
    );
    let status = h.admin_get("/status").await.json();
    let last = status["upstream"]["last_error"].as_str().unwrap();
    assert!(
        last.contains("closed the connection before answering"),
        "{last}"
    );
    assert_eq!(
        h.call(Method::GET, "/api/v2/length", "").await.body,
        "hello"
    );
    assert_eq!(crm.opened(), 3, "neither failed connection was used again");
    crm.task.abort();
}

#[tokio::test]
async fn a_body_the_crm_cuts_short_is_cut_short_for_the_client_too() {
    use http_body_util::{BodyExt, Full};

    let mut crm = WireCrm::start(framings).await;
    let h = through(&crm).await;
    let req = http::Request::get(format!("{}/api/v2/cut-short", h.url))
        .header("authorization", TOKEN)
        .body(Full::new(bytes::Bytes::new()))
        .unwrap();
    // The proxy may have sent the head (and "abc") before the CRM's close, or not: either way
    // the client is told, by an error, that the answer broke off, and is not left waiting.
    let whole = tokio::time::timeout(Duration::from_secs(10), async {
        let resp = h.client.request(req).await.map_err(|e| e.to_string())?;
        assert_eq!(resp.status(), 200);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(body.to_bytes())
    })
    .await
    .expect("the client is not left waiting");
    assert!(
        whole.is_err(),
        "3 bytes of 10 are not a whole answer: {whole:?}"
    );
    crm.closed(1).await;
    assert_eq!(
        h.call(Method::GET, "/api/v2/length", "").await.body,
        "hello"
    );
    assert_eq!(crm.opened(), 2);
    crm.task.abort();
}
