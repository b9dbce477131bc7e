//! Tests of Zendesk's batch endpoints: items, requests, job statuses, results per write.

use super::*;

fn out(method: Method, path: &str, body: &str) -> Outbound {
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
    headers.insert("idempotency-key", HeaderValue::from_static("k1"));
    Outbound {
        method,
        path_and_query: path.parse().unwrap(),
        headers,
        body: Bytes::from(body.to_string()),
    }
}

#[test]
fn only_plain_ticket_creates_and_single_ticket_updates_can_be_batched() {
    let create = item(&out(
        Method::POST,
        "/api/v2/tickets.json",
        r#"{"ticket":{"subject":"a"}}"#,
    ))
    .unwrap();
    assert_eq!((create.kind, create.ticket_id), (BatchKind::Create, None));
    assert_eq!(create.ticket, json!({"subject": "a"}));
    let update = item(&out(
        Method::PUT,
        "/api/v2/tickets/42",
        r#"{"ticket":{"status":"solved"}}"#,
    ))
    .unwrap();
    assert_eq!(
        (update.kind, update.ticket_id),
        (BatchKind::Update, Some(42))
    );
    assert_eq!(update.ticket, json!({"status": "solved", "id": 42}));
    for (method, path, body) in [
        (
            Method::POST,
            "/api/v2/tickets.json?async=true",
            r#"{"ticket":{}}"#,
        ),
        (
            Method::POST,
            "/api/v2/tickets/create_many.json",
            r#"{"tickets":[]}"#,
        ),
        (
            Method::POST,
            "/api/v2/tickets.json",
            r#"{"ticket":{},"extra":1}"#,
        ),
        (Method::POST, "/api/v2/tickets.json", "not json"),
        (
            Method::PUT,
            "/api/v2/tickets/12/tags.json",
            r#"{"ticket":{}}"#,
        ),
        (Method::PUT, "/api/v2/tickets/x.json", r#"{"ticket":{}}"#),
        (
            Method::PUT,
            "/api/v2/tickets/7.json",
            r#"{"ticket":{"id":8}}"#,
        ),
        (Method::PATCH, "/api/v2/tickets/7.json", r#"{"ticket":{}}"#),
    ] {
        assert!(
            item(&out(method.clone(), path, body)).is_none(),
            "{method} {path} {body}"
        );
    }
}

#[test]
fn writes_share_a_call_only_with_the_same_credential_and_headers() {
    let a = out(Method::POST, "/api/v2/tickets.json", "{}");
    let mut b = a.clone();
    b.headers
        .insert("idempotency-key", HeaderValue::from_static("k2"));
    assert!(
        compatible(&a.headers, &b.headers),
        "per-request headers differ freely"
    );
    b.headers
        .insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
    assert!(
        !compatible(&a.headers, &b.headers),
        "another credential never joins"
    );
    let mut c = a.clone();
    c.headers
        .insert("x-on-behalf-of", HeaderValue::from_static("u"));
    assert!(!compatible(&a.headers, &c.headers));
}

#[test]
fn the_batch_and_poll_calls_carry_the_shared_headers_only() {
    let a = out(Method::POST, "/api/v2/tickets.json", "{}");
    let req = request(
        BatchKind::Create,
        vec![json!({"subject":"a"}), json!({"subject":"b"})],
        &a.headers,
    );
    assert_eq!(
        (req.method.clone(), req.path_and_query.as_str()),
        (Method::POST, "/api/v2/tickets/create_many.json")
    );
    assert!(!req.headers.contains_key("idempotency-key"));
    assert_eq!(req.headers[header::AUTHORIZATION], "Bearer a");
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body, json!({"tickets": [{"subject":"a"}, {"subject":"b"}]}));
    let req = request(BatchKind::Update, vec![json!({"id": 1})], &a.headers);
    assert_eq!(
        (req.method.clone(), req.path_and_query.as_str()),
        (Method::PUT, "/api/v2/tickets/update_many.json")
    );
    assert_eq!(
        poll_request(&["j1"], &a.headers).path_and_query,
        "/api/v2/job_statuses/j1.json"
    );
    assert_eq!(
        poll_request(&["j1", "j2"], &a.headers).path_and_query,
        "/api/v2/job_statuses/show_many.json?ids=j1,j2"
    );
}

#[test]
fn job_results_map_back_by_index_for_creates_and_by_id_for_updates() {
    let job = parse_job_status(
        br#"{"job_status":{"id":"j1","status":"completed","results":[
            {"id":245,"index":1},{"index":2,"error":"TicketCreateFailed","details":"Subject: blank"},{"id":244,"index":0}]}}"#,
    )
    .unwrap();
    assert_eq!((job.id.as_str(), job.state), ("j1", JobState::Completed));
    assert_eq!(
        item_results(BatchKind::Create, &job, &[None, None, None, None]),
        [
            ItemResult::Applied(244),
            ItemResult::Applied(245),
            ItemResult::Rejected("TicketCreateFailed: Subject: blank".into()),
            ItemResult::Missing,
        ]
    );
    let job = parse_job_status(
        br#"{"job_status":{"id":"j2","status":"completed","results":[
            {"id":7,"action":"update","success":true,"status":"Updated"},
            {"id":5,"action":"update","success":false,"error":"TicketUpdateFailed","details":"closed"}]}}"#,
    )
    .unwrap();
    assert_eq!(
        item_results(BatchKind::Update, &job, &[Some(5), Some(7)]),
        [
            ItemResult::Rejected("TicketUpdateFailed: closed".into()),
            ItemResult::Applied(7)
        ]
    );
    let many = parse_job_statuses(
        br#"{"job_statuses":[{"id":"a","status":"working"},{"id":"b","status":"killed"},{"id":"c","status":"odd"}]}"#,
    )
    .unwrap();
    assert_eq!(
        many.iter()
            .map(|j| (j.id.as_str(), j.state))
            .collect::<Vec<_>>(),
        [("a", JobState::Running), ("b", JobState::Failed)]
    );
    assert!(parse_job_status(b"{}").is_none());
    // A job id goes into the poll's path as is: one that could not is not a job.
    for id in ["", "a b", "../x", "a?b", "a%2F"] {
        let body = json!({ "job_status": { "id": id, "status": "queued" } }).to_string();
        assert!(parse_job_status(body.as_bytes()).is_none(), "{id:?}");
    }
}

#[test]
fn a_batched_write_keeps_an_answer_shaped_like_the_crms() {
    let r = member_response(BatchKind::Create, 244, "j1", 3);
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.headers[header::LOCATION], "/api/v2/tickets/244.json");
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        body,
        json!({"ticket": {"id": 244}, "batch": {"job_id": "j1", "index": 3}})
    );
    assert_eq!(
        member_response(BatchKind::Update, 5, "j2", 0).status,
        StatusCode::OK
    );
}
