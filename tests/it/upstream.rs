//! The CRM misbehaving: unreachable, slow, failing, throttling; and an HTTPS upstream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crm_quota_proxy::sim::{Fault, Sim, SimConfig};
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::*;

fn roomy() -> SimConfig {
    SimConfig::new(1_000, Duration::from_secs(60))
}

#[tokio::test]
async fn an_unreachable_crm_gives_502_and_a_slow_one_504() {
    // A port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let sim = Sim::start(roomy()).await.unwrap();
    let yaml = format!(
        "upstream: {{ url: \"{dead}\", connect_timeout: 1s }}\nquotas:\n  - {{ name: w, limit: 100, window: 60s }}\n"
    );
    let h = Harness::with_config(sim, &yaml).await;
    let r = h.call(Method::GET, "/api/v2/search.json", "").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"], "upstream_unreachable");
    assert!(!String::from_utf8_lossy(&r.body).contains("test-token"));
    let status = h.admin_get("/status").await.json();
    assert!(status["upstream"]["consecutive_errors"].as_u64().unwrap() >= 1);

    let yaml = "upstream: { url: \"{upstream}\", request_timeout: 300ms }\nquotas:\n  - { name: w, limit: 100, window: 60s }\n";
    let h = Harness::start(roomy(), yaml).await;
    let r = h.call(Method::GET, "/echo/slow?delay_ms=3000", "").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"], "upstream_timeout");
    assert_eq!(
        h.metric("crm_proxy_upstream_errors_total{kind=\"timeout\",route=\"default\"}")
            .await,
        1.0
    );
}

const PARK_NOW: &str = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nqueue: { backoff_initial: 50ms, backoff_max: 200ms, max_attempts: 3 }\nquotas:\n  - { name: w, limit: 100, window: 60s }\n  - { name: gate, limit: 1, window: 1s, scope: route }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json, quotas: [gate], idempotency_key: true }\n";

/// Spends the gate quota so the next create parks, then returns that parked write's id.
async fn park_one(h: &Harness, subject: &str) -> String {
    assert_eq!(h.create(&format!("{subject}-opener")).await.status, 201);
    let r = h.create(subject).await;
    assert_eq!(r.status, 202);
    r.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_parked_write_is_retried_through_5xx_and_resets_and_delivered_once() {
    let h = Harness::start(roomy(), PARK_NOW).await;
    let id = park_one(&h, "flaky").await;
    h.sim.inject([Fault::Status(503), Fault::Reset]);
    let v = h.until_status(&id, "done", Duration::from_secs(10)).await;
    assert_eq!(v["attempts"], 3);
    assert_eq!(v["response"]["status"], 201);
    assert_each_ticket_once(&h.sim, 2);
    assert_eq!(
        h.metric("crm_proxy_retries_total{route=\"create\"}").await,
        2.0
    );
    // The reset left the outcome unknown; the idempotency key made resending it safe.
    assert_eq!(
        h.metric("crm_proxy_idempotent_replays_total{route=\"create\"}")
            .await,
        1.0
    );
}

/// Failures that are the write's own (a 500 between the gateway errors says the CRM itself
/// answers, so the breaker stays closed) spend its attempts until it is a dead letter.
#[tokio::test]
async fn a_write_out_of_attempts_is_kept_as_a_dead_letter() {
    let h = Harness::start(roomy(), PARK_NOW).await;
    let id = park_one(&h, "doomed").await;
    h.sim
        .inject([Fault::Status(502), Fault::Status(500), Fault::Status(504)]);
    let v = h.until_status(&id, "failed", Duration::from_secs(10)).await;
    assert_eq!(v["attempts"], 3);
    assert_eq!(v["reason"], "attempts_exhausted");
    assert!(
        v["error"].as_str().unwrap().contains("after 3 attempts"),
        "{v}"
    );
    let status = h.admin_get("/status").await.json();
    assert_eq!(status["queue"]["failed"], 1);
    assert_eq!(status["queue"]["dead_letters"][0]["id"], id);
    assert_eq!(
        status["queue"]["dead_letters"][0]["reason"],
        "attempts_exhausted"
    );
    assert_eq!(
        h.metric("crm_proxy_failed_total{reason=\"attempts_exhausted\",route=\"create\"}")
            .await,
        1.0
    );
    assert_eq!(h.metric("crm_proxy_dead_letters").await, 1.0);
}

#[tokio::test]
async fn a_crm_429_pauses_the_scope_and_re_parks_without_spending_an_attempt() {
    // The CRM allows 2 per 2 s but the proxy was told 10 and reads no headers: it learns only
    // from the 429s, one per CRM window (sends are one at a time here).
    let yaml = "upstream: { url: \"{upstream}\" }\ndefault_max_wait: 0s\nqueue: { max_attempts: 1, max_in_flight: 1 }\nquotas:\n  - { name: w, limit: 10, window: 2s }\nroutes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json }\n";
    let h = Harness::start(SimConfig::new(2, Duration::from_secs(2)), yaml).await;
    let mut ids = Vec::new();
    let mut passed = 0;
    for i in 0..6 {
        let r = h.create(&format!("w{i}")).await;
        match r.status.as_u16() {
            201 => passed += 1,
            202 => ids.push(r.json()["id"].as_str().unwrap().to_string()),
            s => panic!(
                "unexpected {s}: a live write that meets the wall on a queue route is parked"
            ),
        }
    }
    assert!(passed <= 2);
    for id in &ids {
        let v = h.until_status(id, "done", Duration::from_secs(15)).await;
        assert_eq!(v["attempts"], 1, "429s cost no attempt (max_attempts is 1)");
    }
    assert_each_ticket_once(&h.sim, 6);
    let stats = h.sim.stats();
    assert!(
        stats.throttled <= 3,
        "at most one 429 per CRM window (6 writes, 2 per window): {stats:?}"
    );
    assert!(
        h.metric("crm_proxy_throttled_total{reason=\"429\",route=\"create\"}")
            .await
            >= 1.0
    );
}

/// A TLS server for `localhost` that answers with the HTTP version it saw.
async fn tls_upstream() -> (
    String,
    std::path::PathBuf,
    tempfile::TempDir,
    tokio::task::JoinHandle<()>,
) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let field = |name: &str| {
                        req.headers()
                            .get(name)
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    };
                    let (host, forwarded) = (field("host"), field("x-forwarded-host"));
                    let proto = field("x-forwarded-proto");
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        format!(
                            "{:?} {} host={host:?} forwarded={forwarded:?} proto={proto:?}",
                            req.version(),
                            req.uri().path()
                        ),
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (url, ca, dir, task)
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_the_extra_ca_and_spoken_to_over_http2() {
    let (url, ca, _dir, server) = tls_upstream().await;
    let sim = Sim::start(roomy()).await.unwrap();
    let yaml = format!(
        "upstream: {{ url: \"{url}\", ca_file: \"{}\" }}\nquotas:\n  - {{ name: w, limit: 100, window: 60s }}\n",
        ca.display()
    );
    let h = Harness::with_config(sim, &yaml).await;
    let r = h.call(Method::GET, "/api/v2/users/me.json", "").await;
    assert_eq!(r.status, 200);
    // The client's Host goes as X-Forwarded-Host, not as a field beside the CRM's authority.
    let proxy = h.url.trim_start_matches("http://");
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        format!(
            "HTTP/2.0 /api/v2/users/me.json host=None forwarded=Some({proxy:?}) \
             proto=Some(\"http\")"
        )
    );

    // Without the extra CA the self-signed certificate is refused.
    let sim = Sim::start(roomy()).await.unwrap();
    let yaml = format!(
        "upstream: {{ url: \"{url}\" }}\nquotas:\n  - {{ name: w, limit: 100, window: 60s }}\n"
    );
    let h = Harness::with_config(sim, &yaml).await;
    let r = h.call(Method::GET, "/api/v2/users/me.json", "").await;
    assert_eq!(r.status, 502);
    server.abort();
}

/// A plain HTTP CRM that counts the connections it accepts and those that have ended. A path
/// `/api/v2/close` is answered with `Connection: close`; `/api/v2/held{n}` is answered once `n`
/// such requests are in.
struct CountingCrm {
    url: String,
    opened: Arc<std::sync::atomic::AtomicUsize>,
    ended: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingCrm {
    async fn start(held: &[usize]) -> CountingCrm {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let opened = Arc::new(AtomicUsize::new(0));
        let (ended_tx, ended) = tokio::sync::watch::channel(0usize);
        let barriers: Arc<std::collections::HashMap<String, Arc<tokio::sync::Barrier>>> = Arc::new(
            held.iter()
                .map(|&n| {
                    (
                        format!("/api/v2/held{n}"),
                        Arc::new(tokio::sync::Barrier::new(n)),
                    )
                })
                .collect(),
        );
        let counted = opened.clone();
        let task = tokio::spawn(async move {
            let ended_tx = Arc::new(ended_tx);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let (barriers, ended_tx) = (barriers.clone(), ended_tx.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let barriers = barriers.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            if let Some(b) = barriers.get(&path) {
                                b.wait().await;
                            }
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
                            if path == "/api/v2/close" {
                                resp.headers_mut()
                                    .insert(http::header::CONNECTION, "close".parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                    ended_tx.send_modify(|n| *n += 1);
                });
            }
        });
        CountingCrm {
            url,
            opened,
            ended,
            task,
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (at most 10 s) until `n` connections have ended.
    async fn ended(&mut self, n: usize) {
        let seen = tokio::time::timeout(Duration::from_secs(10), self.ended.wait_for(|e| *e >= n))
            .await
            .map(|r| *r.unwrap());
        assert_eq!(
            seen,
            Ok(n),
            "connections ended (of {} opened)",
            self.opened()
        );
    }
}

async fn through(crm: &CountingCrm, pool: &str) -> Harness {
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0, data_threads: 1 }}\n\
         upstream: {{ url: \"{}\", {pool} }}\n\
         quotas:\n  - {{ name: w, limit: 1000, window: 60s }}\n",
        crm.url
    );
    Harness::with_config(Sim::start(roomy()).await.unwrap(), &yaml).await
}

#[tokio::test]
async fn crm_connections_are_reused_and_closed_when_the_crm_says_or_after_the_idle_timeout() {
    let mut crm = CountingCrm::start(&[3]).await;
    let h = through(&crm, "pool_idle_timeout: 1s").await;
    for _ in 0..5 {
        assert_eq!(
            h.call(Method::GET, "/api/v2/users.json", "").await.status,
            200
        );
    }
    assert_eq!(
        crm.opened(),
        1,
        "one connection for requests one after another"
    );

    // A connection the CRM closes is not used again: the next request opens another.
    assert_eq!(h.call(Method::GET, "/api/v2/close", "").await.status, 200);
    crm.ended(1).await;
    assert_eq!(
        h.call(Method::GET, "/api/v2/users.json", "").await.status,
        200
    );
    assert_eq!(crm.opened(), 2);

    // Requests at once take a connection each; all are closed once unused for the idle timeout.
    let held = || h.call(Method::GET, "/api/v2/held3", "");
    let (a, b, c) = tokio::join!(held(), held(), held());
    assert_eq!([a.status, b.status, c.status], [200; 3]);
    assert_eq!(crm.opened(), 4, "the kept one and two more");
    crm.ended(4).await;
    crm.task.abort();
}

#[tokio::test]
async fn idle_crm_connections_beyond_the_maximum_are_closed_and_the_rest_reused() {
    let mut crm = CountingCrm::start(&[5, 2]).await;
    let h = through(&crm, "pool_idle_timeout: 60s, pool_max_idle: 2").await;
    let held = || h.call(Method::GET, "/api/v2/held5", "");
    let (a, b, c, d, e) = tokio::join!(held(), held(), held(), held(), held());
    assert_eq!([a.status, b.status, c.status, d.status, e.status], [200; 5]);
    assert_eq!(crm.opened(), 5);
    crm.ended(3).await;
    let held = || h.call(Method::GET, "/api/v2/held2", "");
    let (a, b) = tokio::join!(held(), held());
    assert_eq!([a.status, b.status], [200; 2]);
    assert_eq!(
        crm.opened(),
        5,
        "the two kept connections served the next two at once"
    );
    crm.task.abort();
}
