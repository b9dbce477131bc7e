//! The admin listener's guard: a bearer token for data and actions (probes and scrapes stay
//! open), no state change from another origin or with a body a foreign page could send, and an
//! explicit confirmation before an ambiguous write is sent again.

use std::time::Duration;

use crm_quota_proxy::sim::{Fault, SimConfig};
use http::{Method, StatusCode};

use crate::support::*;

const ADMIN_TOKEN: &str = "admin-token-for-tests";

async fn admin(h: &Harness, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(
        &h.client,
        method,
        &format!("{}{path}", h.admin),
        headers,
        "",
    )
    .await
}

#[tokio::test]
async fn the_admin_token_guards_data_and_actions_while_probes_and_scrapes_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let yaml = format!(
        "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0, admin_token_file: {} }}\n\
         upstream: {{ url: \"{{upstream}}\", crm: zendesk }}\n\
         default_max_wait: 0s\n\
         quotas:\n  - {{ name: w, limit: 1000, window: 60s }}\n  - {{ name: gate, limit: 1, window: 1s, scope: route }}\n\
         routes:\n  - {{ name: bare, methods: [POST], path: /api/v2/tickets, quotas: [gate] }}\n",
        token_file.display()
    );
    let h = Harness::start(SimConfig::new(1000, Duration::from_secs(60)), &yaml).await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            admin(&h, Method::GET, path, &[]).await.status,
            200,
            "{path}"
        );
    }
    for path in ["/status", "/requests"] {
        let r = admin(&h, Method::GET, path, &[]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(r.header("www-authenticate").starts_with("Bearer"));
        let wrong = [("authorization", "Bearer admin-token-for-testz")];
        assert_eq!(admin(&h, Method::GET, path, &wrong).await.status, 401);
        assert_eq!(
            admin(&h, Method::GET, path, &auth).await.status,
            200,
            "{path}"
        );
    }
    assert_eq!(admin(&h, Method::POST, "/reload", &[]).await.status, 401);

    // An ambiguous dead letter: the CRM applied the write and the answer was lost.
    assert_eq!(
        h.call(Method::POST, "/api/v2/tickets", ticket_body("opener"))
            .await
            .status,
        201
    );
    let r = h
        .call(Method::POST, "/api/v2/tickets", ticket_body("lost"))
        .await;
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_string();
    h.sim.inject([Fault::DropResponse]);
    eventually(
        "the write to end ambiguous",
        Duration::from_secs(10),
        || async {
            let v = admin(&h, Method::GET, &format!("/requests/{id}"), &auth)
                .await
                .json();
            (v["reason"] == "ambiguous").then_some(())
        },
    )
    .await;

    // State changes from a browser on another site are refused, token or not.
    let retry = format!("/requests/{id}/retry");
    let foreign = [auth[0], ("origin", "http://evil.example")];
    let r = admin(&h, Method::POST, &retry, &foreign).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    let cross_site = [auth[0], ("sec-fetch-site", "cross-site")];
    assert_eq!(
        admin(&h, Method::POST, &retry, &cross_site).await.status,
        403
    );
    let form = [auth[0], ("content-type", "text/plain")];
    assert_eq!(admin(&h, Method::POST, &retry, &form).await.status, 415);
    assert_eq!(
        admin(&h, Method::DELETE, &format!("/requests/{id}"), &[])
            .await
            .status,
        401
    );
    // The admin's own origin with the token: an ambiguous write needs the explicit confirmation.
    let own_origin = h.admin.clone();
    let own = [auth[0], ("origin", own_origin.as_str())];
    let r = admin(&h, Method::POST, &retry, &own).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);
    assert_eq!(r.json()["error"], "ambiguous");
    let bulk = admin(
        &h,
        Method::POST,
        "/requests/retry?reason=ambiguous&confirm=1",
        &auth,
    )
    .await;
    assert_eq!(bulk.status, StatusCode::CONFLICT, "{:?}", bulk.body);
    let r = admin(
        &h,
        Method::POST,
        &format!("{retry}?confirm_ambiguous=true"),
        &own,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["status"], "queued");
}
