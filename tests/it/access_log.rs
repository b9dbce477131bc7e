//! The access log (`access_log`): one structured line per request, in the process's log format,
//! evenly sampled, errors and abandoned requests always, never a credential.

use std::time::Duration;

use crm_quota_proxy::sim::{Sim, SimConfig};
use http::Method;
use serde_json::Value;

use crate::support::*;

const SECRET: &str = "s3cr3t-credential-value";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_leaves_one_sampled_line_and_errors_always_do() {
    let sim = Sim::start(SimConfig::new(100, Duration::from_secs(60)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    // The config's log level shows none of the proxy's own info lines but the startup one; the
    // access log's target is switched on by `access_log.enabled`.
    std::fs::write(
        &path,
        "listen: { data: 127.0.0.1:0, admin: 127.0.0.1:0 }\n\
         upstream: { url: http://example.invalid }\n\
         log_level: warn,crm_quota_proxy=info\n\
         access_log: { enabled: true, sample: 50%, all_errors: true }\n\
         fairness: { read_reserve: 0%, live_reserve: 0%, drain_min: 0% }\n\
         quotas:\n  - { name: m, limit: 4, window: 1m }\n\
         routes:\n\
         \x20 - { name: search, methods: [GET], path: /api/v2/search.json, class: read, on_limit: reject }\n\
         \x20 - { name: create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 90s }\n",
    )
    .unwrap();
    let mut cmd = Process::command(&path, &sim.url());
    cmd.env_remove("RUST_LOG").args(["--log-format", "json"]);
    let proxy = Process::spawn(cmd)
        .await
        .unwrap_or_else(|l| panic!("{l:?}"));
    let http = client();
    let auth = format!("Bearer {SECRET}");
    let create = |n: usize, request_id: Option<&'static str>| {
        let (http, auth, url) = (http.clone(), auth.clone(), proxy.data.clone());
        async move {
            let mut headers = vec![
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ];
            if let Some(id) = request_id {
                headers.push(("x-request-id", id));
            }
            let url = format!("{url}/api/v2/tickets.json?api_token={SECRET}");
            send(
                &http,
                Method::POST,
                &url,
                &headers,
                ticket_body(&format!("a-{n}")),
            )
            .await
        }
    };
    // Requests 0-2: creates, forwarded; 3: a search, forwarded; 4: a search over the limit.
    assert_eq!(create(0, None).await.status, 201);
    assert_eq!(create(1, Some("trace-1")).await.status, 201);
    assert_eq!(create(2, None).await.status, 201);
    let search = format!(
        "{}/api/v2/search.json?query=a&api_token={SECRET}",
        proxy.data
    );
    let headers = [("authorization", auth.as_str())];
    assert_eq!(
        send(&http, Method::GET, &search, &headers, "").await.status,
        200
    );
    assert_eq!(
        send(&http, Method::GET, &search, &headers, "").await.status,
        429
    );
    // Request 5: a create that waits for the next window; its client gives up.
    let gone = tokio::time::timeout(Duration::from_millis(300), create(5, None)).await;
    assert!(gone.is_err(), "the create waited for quota: {gone:?}");

    let access = |lines: Vec<String>| -> Vec<Value> {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .map(|v| v["fields"].clone())
            .collect()
    };
    let logged = eventually(
        "the abandoned request's line",
        Duration::from_secs(10),
        || {
            let found = access(proxy.lines());
            async move { (found.len() >= 4).then_some(found) }
        },
    )
    .await;
    let (_, log) = proxy.signal("TERM");
    assert!(
        !log.iter().any(|l| l.contains(SECRET)),
        "a credential in the log:\n{}",
        log.join("\n")
    );
    assert!(
        !log.iter()
            .any(|l| l.contains("\"target\":\"crm_quota_proxy::")
                && l.contains("\"level\":\"DEBUG\"")),
        "the log level still applies to the proxy's own lines"
    );
    // Half the answered requests below 400 (the 2nd and 4th: evenly spread), the 429 and the
    // abandoned one.
    assert_eq!(logged.len(), 4, "{logged:#?}");
    let created = &logged[0];
    assert_eq!(created["message"], "request");
    for (field, value) in [
        ("method", "POST"),
        ("path", "/api/v2/tickets.json"),
        ("route", "create"),
        ("class", "write"),
        ("client", "default"),
        ("outcome", "forwarded"),
        ("x_request_id", "trace-1"),
    ] {
        assert_eq!(created[field], value, "{field} in {created}");
    }
    assert_eq!(created["status"], 201);
    assert!(created["crm_ms"].as_f64().unwrap() > 0.0, "{created}");
    assert!(created["waited_ms"].as_f64().unwrap() >= 0.0, "{created}");
    let id = created["request_id"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{created}"
    );

    let searched = &logged[1];
    assert_eq!(
        (
            &searched["route"],
            &searched["class"],
            &searched["outcome"],
            &searched["status"]
        ),
        (
            &Value::from("search"),
            &Value::from("read"),
            &Value::from("forwarded"),
            &Value::from(200)
        )
    );
    assert!(
        searched.get("request_id").is_none(),
        "a read has no queue id: {searched}"
    );

    let refused = &logged[2];
    assert_eq!(
        (&refused["outcome"], &refused["status"]),
        (&Value::from("rejected"), &Value::from(429))
    );
    assert!(refused.get("crm_ms").is_none(), "never sent: {refused}");

    let abandoned = &logged[3];
    assert_eq!(abandoned["outcome"], "gone", "{abandoned}");
    let id = abandoned["request_id"].as_str().unwrap_or_default();
    assert_eq!(id.len(), 32, "a parked write has its queue id: {abandoned}");
    assert!(
        abandoned.get("status").is_none(),
        "no answer was given: {abandoned}"
    );
    assert!(
        abandoned["waited_ms"].as_f64().unwrap() >= 250.0,
        "{abandoned}"
    );
}
