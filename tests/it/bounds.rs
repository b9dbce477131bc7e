//! Memory bounds that hold: kept CRM answers count in `queue.max_bytes` and `queue.max_entries`
//! (the oldest evicted to make room for parked writes), and an answer too large to keep still
//! ends `done` with its status and headers.

use std::time::Duration;

use crm_quota_proxy::sim::{Sim, SimConfig};
use http::{Method, StatusCode};
use serde_json::Value;

use crate::support::*;

const MIB: usize = 1 << 20;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_crm_answers_stay_within_queue_max_bytes() {
    let sim = Sim::start(SimConfig::new(10_000, Duration::from_secs(60)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        "listen: { data: 127.0.0.1:0, admin: 127.0.0.1:0 }\n\
         upstream: { url: http://placeholder }\n\
         max_body_bytes: 8MiB\n\
         queue: { max_bytes: 8MiB, max_in_flight: 2 }\n\
         quotas:\n  - { name: second, limit: 20, window: 1s }\n\
         routes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }\n",
    )
    .unwrap();
    let proxy = Process::start(&path, &sim.url()).await;
    let client = client();
    let pad = (7 * MIB).to_string();
    // All at once: twenty go at once, the rest are parked.
    let tasks: Vec<_> = (0..80)
        .map(|i| {
            let (client, url, pad) = (
                client.clone(),
                format!("{}/api/v2/tickets.json", proxy.data),
                pad.clone(),
            );
            tokio::spawn(async move {
                send(
                    &client,
                    Method::POST,
                    &url,
                    &[
                        ("authorization", TOKEN),
                        ("content-type", "application/json"),
                        ("x-sim-answer-pad", &pad),
                    ],
                    ticket_body(&format!("big-{i:02}")),
                )
                .await
            })
        })
        .collect();
    let mut parked = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::ACCEPTED => parked.push(r.json()["id"].as_str().unwrap().to_string()),
            other => assert_eq!(other, StatusCode::CREATED),
        }
    }
    assert!(parked.len() >= 50, "{} parked", parked.len());
    let status_url = format!("{}/status", proxy.admin);
    eventually("the backlog to drain", Duration::from_secs(30), || async {
        let v: Value = send(&client, Method::GET, &status_url, &[], "")
            .await
            .json();
        (v["queue"]["queued"] == 0 && v["queue"]["dispatching"] == 0).then_some(())
    })
    .await;
    assert_eq!(sim.stats().tickets, 80);
    let text = proxy.metrics(&client).await;
    let queue_bytes = metric_value(&text, "crm_proxy_queue_bytes").unwrap();
    assert!(queue_bytes <= (8 * MIB) as f64, "{queue_bytes}");
    assert!(metric_value(&text, "crm_proxy_results_evicted_total").unwrap() >= 40.0);
    // The newest answer is kept whole; older ones made room for it.
    let mut kept = Vec::new();
    for id in &parked {
        let r = send(
            &client,
            Method::GET,
            &format!("{}/_proxy/requests/{id}/response", proxy.data),
            &[("authorization", TOKEN)],
            "",
        )
        .await;
        if r.status == StatusCode::CREATED {
            assert!(r.body.len() > 7 * MIB);
            kept.push(id);
        } else {
            assert_eq!(r.status, StatusCode::NOT_FOUND, "evicted");
        }
    }
    assert_eq!(kept.len(), 1, "one 7 MiB answer fits 8 MiB");
    // Resident memory: the kept answers (8 MiB), the answers being read (2 × 8 MiB) and the
    // process itself, far below the 80 × 7 MiB the CRM sent.
    let rss = rss_bytes(proxy.pid());
    eprintln!("RSS after the drain: {} MiB", rss / MIB as u64);
    assert!(rss < 96 * MIB as u64, "RSS {} MiB", rss / MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_to_keep_still_ends_done_with_its_status() {
    let h = Harness::start(
        SimConfig::new(1, Duration::from_secs(2)),
        "upstream: { url: \"{upstream}\" }\n\
         max_body_bytes: 1MiB\n\
         quotas:\n  - { name: second, limit: 1, window: 2s }\n\
         routes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }\n",
    )
    .await;
    assert_eq!(h.create("first").await.status, StatusCode::CREATED);
    let pad = (2 * MIB).to_string();
    let r = send(
        &h.client,
        Method::POST,
        &format!("{}/api/v2/tickets.json", h.url),
        &[
            ("authorization", TOKEN),
            ("content-type", "application/json"),
            ("x-sim-answer-pad", &pad),
        ],
        ticket_body("big"),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let v = h.until_status(&id, "done", Duration::from_secs(10)).await;
    assert_eq!(v["response"]["status"], 201, "{v}");
    let dropped = v["response"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "crm-proxy-body-dropped")
        .map(|h| h[1].as_str().unwrap().parse::<usize>().unwrap());
    assert!(dropped.is_some_and(|n| n > 2 * MIB), "{v}");
    assert_eq!(v["response"]["body"], "");
    assert_each_ticket_once(&h.sim, 2);
}

const PARKING: &str = "upstream: { url: \"{upstream}\" }\n\
     credentials: [x-tenant-pin]\n\
     quotas:\n  - { name: second, limit: 1, window: 1m }\n\
     routes:\n  - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }\n";

/// Parks a create carrying `headers` (and the query `query`), after spending the window.
async fn park(h: &Harness, headers: &[(&str, &str)], query: &str) -> Reply {
    let url = format!("{}/api/v2/tickets.json{query}", h.url);
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(&h.client, Method::POST, &url, &all, ticket_body("parked")).await
}

async fn read_status(h: &Harness, path: &str, headers: &[(&str, &str)]) -> StatusCode {
    send(
        &h.client,
        Method::GET,
        &format!("{}{path}", h.url),
        headers,
        "",
    )
    .await
    .status
}

#[tokio::test]
async fn a_write_without_a_credential_is_read_back_only_with_its_own_token() {
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(60)), PARKING).await;
    assert_eq!(h.create("spend").await.status, StatusCode::CREATED);
    let r = park(&h, &[], "").await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let v = r.json();
    let id = v["id"].as_str().unwrap();
    let url = v["status_url"].as_str().unwrap().to_string();
    assert_eq!(r.header("location"), url);
    let token = url.split_once("?token=").expect("a token of its own").1;
    assert_eq!(token.len(), 32);
    assert_eq!(read_status(&h, &url, &[]).await, StatusCode::OK);
    let bare = format!("/_proxy/requests/{id}");
    assert_eq!(
        read_status(&h, &bare, &[]).await,
        StatusCode::NOT_FOUND,
        "no credential, no token"
    );
    assert_eq!(
        read_status(
            &h,
            &format!("{bare}?token=00000000000000000000000000000000"),
            &[]
        )
        .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        read_status(&h, &bare, &[("authorization", TOKEN)]).await,
        StatusCode::NOT_FOUND,
        "someone else's credential"
    );
    // Another credential-less write gets another token; neither reads the other.
    let other = park(&h, &[], "").await.json();
    let other_url = other["status_url"].as_str().unwrap();
    let swapped = format!(
        "/_proxy/requests/{}?token={token}",
        other["id"].as_str().unwrap()
    );
    assert_ne!(other_url, url);
    assert_eq!(read_status(&h, &swapped, &[]).await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn cookies_key_headers_and_query_credentials_own_their_writes() {
    let h = Harness::start(SimConfig::new(100, Duration::from_secs(60)), PARKING).await;
    assert_eq!(h.create("spend").await.status, StatusCode::CREATED);
    for (headers, query) in [
        (vec![("cookie", "session=abc")], ""),
        (vec![("x-api-key", "k-1")], ""),
        (vec![("x-tenant-pin", "4711")], ""),
        (vec![], "?api_key=q-1"),
    ] {
        let r = park(&h, &headers, query).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        let v = r.json();
        let url = v["status_url"].as_str().unwrap();
        assert!(!url.contains("token="), "a credential owns it: {url}");
        let own = format!("{url}{query}");
        assert_eq!(
            read_status(&h, &own, &headers).await,
            StatusCode::OK,
            "{headers:?}{query}"
        );
        assert_eq!(read_status(&h, url, &[]).await, StatusCode::NOT_FOUND);
        assert_eq!(
            read_status(
                &h,
                url,
                &[("cookie", "session=other"), ("x-api-key", "k-2")]
            )
            .await,
            StatusCode::NOT_FOUND
        );
    }
}

#[tokio::test]
async fn credentials_never_show_in_operator_or_status_views() {
    let h = Harness::start(
        SimConfig::new(100, Duration::from_secs(60)),
        &PARKING.replace("window: 1m", "window: 2s"),
    )
    .await;
    assert_eq!(h.create("spend").await.status, StatusCode::CREATED);
    let secrets = [
        ("authorization", "Bearer very-secret-1"),
        ("x-access-key", "very-secret-2"),
        ("x-auth", "very-secret-3"),
        ("authentication", "very-secret-4"),
        ("x-tenant-pin", "very-secret-5"),
        ("cookie", "sid=very-secret-6"),
    ];
    h.sim.inject([crm_quota_proxy::sim::Fault::Answer(
        201,
        vec![
            ("set-cookie", "crm_session=very-secret-12".into()),
            ("x-csrf-token", "very-secret-13".into()),
            ("x-ticket", "35436".into()),
        ],
    )]);
    let r = park(
        &h,
        &secrets,
        "?key=very-secret-7;auth=very-secret-8&pwd=very-secret-9&jwt=very-secret-10&sig=very-secret-11&page=2",
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json()["id"].as_str().unwrap().to_string();
    // While parked, the operator sees the request.
    let queued = h.admin_get(&format!("/requests/{id}")).await;
    assert_eq!(queued.json()["status"], "queued");
    // Once sent, the operator and the client see the CRM's answer.
    let done = eventually("the write to be sent", Duration::from_secs(10), || async {
        let r = h.admin_get(&format!("/requests/{id}")).await;
        (r.json()["status"] == "done").then_some(r)
    })
    .await;
    let client_view = send(
        &h.client,
        Method::GET,
        &format!("{}/_proxy/requests/{id}", h.url),
        &secrets,
        "",
    )
    .await;
    assert_eq!(client_view.status, StatusCode::OK);
    for view in [&queued, &done, &client_view] {
        let text = String::from_utf8_lossy(&view.body);
        assert!(!text.contains("very-secret"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
    let text = String::from_utf8_lossy(&queued.body);
    assert!(text.contains("page=2"), "ordinary parameters stay: {text}");
    let text = String::from_utf8_lossy(&done.body);
    assert!(text.contains("35436"), "ordinary headers stay: {text}");
}
