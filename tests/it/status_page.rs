//! The admin status page in a real headless Chromium: it asks for the admin token, then shows
//! the numbers `/status` shows while a burst parks writes (updating by itself), its retry button
//! sends a dead letter again, and the browser reports no console error throughout.
//! `CRM_PROXY_SCREENSHOT=docs/status-page.png` saves the README's screenshot from this run.

use std::time::Duration;

use crm_quota_proxy::sim::{Fault, SimConfig};
use http::Method;
use serde_json::Value;

use crate::browser::Browser;
use crate::support::*;

const ADMIN_TOKEN: &str = "status-page-token-for-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_status_shows_and_its_retry_button_works() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    // `account` (10 an hour) fills during the burst and stays full: the numbers hold still
    // while the page and the test read them. `gate` lets one `bare` write through a second.
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0, admin_token_file: {} }}\n\
         upstream: {{ url: \"{{upstream}}\" }}\n\
         default_max_wait: 0s\n\
         queue: {{ max_attempts: 1 }}\n\
         fairness: {{ read_reserve: 0%, live_reserve: 0%, drain_min: 0% }}\n\
         quotas:\n  - {{ name: account, limit: 10, window: 1h, scope: route }}\n  - {{ name: gate, limit: 1, window: 1s, scope: route }}\n\
         \x20 - {{ name: day, limit: 1000, window: 1d, kind: fixed, scope: route, schedule: {{ at_once: 50% }} }}\n\
         routes:\n\
         \x20 - {{ name: bare, methods: [POST], path: /api/v2/tickets, quotas: [gate] }}\n\
         \x20 - {{ name: create, methods: [POST], path: /api/v2/tickets.json, quotas: [account, day] }}\n",
        token_file.display()
    );
    let h = Harness::start(SimConfig::new(1000, Duration::from_secs(60)), &yaml).await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let status = || async {
        send(
            &h.client,
            Method::GET,
            &format!("{}/status", h.admin),
            &auth,
            "",
        )
        .await
        .json()
    };

    // A dead letter: a parked write whose one attempt the CRM fails (ambiguous: a 500 to a
    // create may have been applied).
    let r = h
        .call(Method::POST, "/api/v2/tickets", ticket_body("opener"))
        .await;
    assert_eq!(r.status, 201);
    let r = h
        .call(Method::POST, "/api/v2/tickets", ticket_body("refused"))
        .await;
    assert_eq!(r.status, 202);
    let dead = r.json()["id"].as_str().unwrap().to_string();
    h.sim.inject([Fault::Status(500)]);
    eventually(
        "the refused write to be a dead letter",
        Duration::from_secs(10),
        || async { (status().await["queue"]["failed"] == 1).then_some(()) },
    )
    .await;

    let browser = Browser::start().await;
    browser.open(&format!("{}/", h.admin)).await;
    // The proxy needs a token: the page asks for it before reading anything.
    let asks = browser
        .run("return !document.getElementById('token-form').hidden && document.getElementById('main').hidden")
        .await;
    assert_eq!(asks, true, "the page asks for the admin token first");
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click("#token-form button").await;
    let shown = |key: String| {
        let browser = &browser;
        async move {
            let script = format!(
                "const e = document.querySelector('[data-k=\"{key}\"]'); return e && e.textContent"
            );
            browser.run(&script).await
        }
    };
    eventually(
        "the page to show the dead letter",
        Duration::from_secs(10),
        || async { (shown(format!("dead.{dead}.status")).await == "failed").then_some(()) },
    )
    .await;

    // The burst, while the page is open: ten go through, five are parked.
    for i in 0..15 {
        let r = h.create(&format!("burst-{i}")).await;
        assert_eq!(r.status, if i < 10 { 201 } else { 202 }, "create {i}");
    }
    eventually(
        "the page to show the parked writes by itself",
        Duration::from_secs(10),
        || async { (shown("queue.queued".into()).await == "5").then_some(()) },
    )
    .await;
    let page = browser
        .run("return Object.fromEntries([...document.querySelectorAll('[data-k]')].map(e => [e.dataset.k, e.textContent]))")
        .await;
    let s = status().await;
    let mut expected: Vec<(String, String)> = Vec::new();
    for q in s["quotas"].as_array().unwrap() {
        let name = q["name"].as_str().unwrap();
        for field in ["used", "limit", "remaining"] {
            expected.push((format!("quota.{name}.{field}"), q[field].to_string()));
        }
    }
    for f in s["forecasts"].as_array().unwrap() {
        let name = f["quota"].as_str().unwrap();
        for (field, key) in [
            ("used", "used"),
            ("backlog_calls", "backlog"),
            ("backlog_deliverable", "deliverable"),
        ] {
            expected.push((format!("forecast.{name}.{key}"), f[field].to_string()));
        }
    }
    for field in ["queued", "dispatching", "failed", "expired"] {
        expected.push((format!("queue.{field}"), s["queue"][field].to_string()));
    }
    for c in s["clients"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        expected.push((format!("client.{name}.parked"), c["parked"].to_string()));
    }
    for l in s["queue"]["lanes"].as_array().unwrap() {
        if l["depth"] != 0 {
            let key = format!(
                "lane.{}.{}.depth",
                l["client"].as_str().unwrap(),
                l["name"].as_str().unwrap()
            );
            expected.push((key, l["depth"].to_string()));
        }
    }
    assert!(
        expected
            .iter()
            .any(|(k, v)| k == "quota.account.used" && v == "10"),
        "{s}"
    );
    assert!(
        expected
            .iter()
            .any(|(k, v)| k.starts_with("lane.") && v == "5"),
        "{s}"
    );
    assert!(
        expected
            .iter()
            .any(|(k, v)| k == "forecast.day.backlog" && v == "5"),
        "the day's forecast counts the parked writes: {s}"
    );
    for (key, value) in &expected {
        assert_eq!(
            page[key].as_str(),
            Some(value.as_str()),
            "{key} on the page vs /status:\npage {page}\nstatus {s}"
        );
    }
    let drain = page["queue.drain"].as_str().unwrap();
    assert!(drain.starts_with("empties in about "), "{drain}");
    if let Ok(path) = std::env::var("CRM_PROXY_SCREENSHOT") {
        std::fs::write(path, browser.screenshot_png().await).unwrap();
    }

    // Retry from the page: the dead letter goes back in line and is delivered.
    browser
        .click(&format!(
            "button[data-action=\"retry\"][data-id=\"{dead}\"]"
        ))
        .await;
    // A 500 to a create may have been applied: the page asks before sending it again.
    let asked = browser.accept_dialog().await;
    assert!(asked.contains("apply it twice"), "{asked}");
    let delivered = eventually(
        "the retried write to be delivered",
        Duration::from_secs(10),
        || async {
            let v = send(
                &h.client,
                Method::GET,
                &format!("{}/requests/{dead}", h.admin),
                &auth,
                "",
            )
            .await
            .json();
            (v["status"] == "done").then_some(v)
        },
    )
    .await;
    assert_eq!(delivered["attempts"], 1, "a fresh attempt: {delivered}");
    eventually(
        "the page to drop the dead letter",
        Duration::from_secs(10),
        || async {
            shown(format!("dead.{dead}.status"))
                .await
                .is_null()
                .then_some(())
        },
    )
    .await;
    let errors: Vec<Value> = browser
        .console()
        .await
        .into_iter()
        .filter(|m| m["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "the browser's console: {errors:#?}");
}
