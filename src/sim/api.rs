//! The simulated CRM's API once a call is inside the quota: ticket create, read, update (with
//! Zendesk's per-ticket limit), search, a Salesforce-shaped case create, the batch endpoints
//! ([`super::jobs`]), and `/echo` for transparency tests.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Frame;

use crate::listener::RequestBody;
use serde_json::{Value, json};

use super::{State, Ticket, create, jobs, now_ns};
use crate::response::{self, Body};

pub(super) async fn route(state: &Arc<Mutex<State>>, req: Request<RequestBody>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path.starts_with("/echo") {
        return echo(req).await;
    }
    let idempotency_key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // A test or benchmark asks for a large answer (a CRM that returns big records).
    let pad = req
        .headers()
        .get("x-sim-answer-pad")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let trimmed = path.trim_end_matches(".json");
    let segments: Vec<&str> = trimmed.trim_start_matches('/').split('/').collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let batch_endpoints = lock().cfg.batch_endpoints;
    if batch_endpoints
        && let Some(resp) = jobs::route(&mut lock(), &method, &segments, &query, &body)
    {
        return resp;
    }
    match (&method, segments.as_slice()) {
        (&Method::POST, ["api", "v2", "tickets"]) => {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return response::json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "InvalidJSON"}),
                );
            };
            let t = &v["ticket"];
            let (ticket, lookup) = create(
                &mut lock(),
                t["subject"].as_str().unwrap_or_default(),
                t["external_id"].as_str(),
                idempotency_key.as_deref(),
            );
            let mut answer = json!({ "ticket": ticket });
            if let Some(n) = pad {
                answer["pad"] = Value::String("x".repeat(n));
            }
            let mut resp = response::json_response(StatusCode::CREATED, &answer);
            if let Ok(loc) = HeaderValue::from_str(&format!("/api/v2/tickets/{}.json", ticket.id)) {
                resp.headers_mut().insert(header::LOCATION, loc);
            }
            if let Some(lookup) = lookup {
                resp.headers_mut()
                    .insert("x-idempotency-lookup", HeaderValue::from_static(lookup));
            }
            resp
        }
        (&Method::POST, ["services", "data", _, "sobjects", "Case"]) => {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let (ticket, _) = create(
                &mut lock(),
                v["Subject"].as_str().unwrap_or_default(),
                None,
                None,
            );
            response::json_response(
                StatusCode::CREATED,
                &json!({ "id": format!("500{:012}", ticket.id), "success": true, "errors": [] }),
            )
        }
        (&Method::GET, ["api", "v2", "tickets", "show_many"]) => {
            let mut s = lock();
            s.ticket_reads += 1;
            let tickets: Vec<&Ticket> = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ids="))
                .unwrap_or("")
                .split(',')
                .filter_map(|id| s.tickets.get(&id.parse::<u64>().ok()?))
                .collect();
            response::json_response(StatusCode::OK, &json!({ "tickets": tickets }))
        }
        (&Method::GET, ["api", "v2", "tickets", id]) => match id
            .parse::<u64>()
            .ok()
            .and_then(|id| lock().tickets.get(&id).cloned())
        {
            Some(t) => response::json_response(StatusCode::OK, &json!({ "ticket": t })),
            None => {
                response::json_response(StatusCode::NOT_FOUND, &json!({"error": "RecordNotFound"}))
            }
        },
        (&Method::PUT, ["api", "v2", "tickets", id]) => {
            let update: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut s = lock();
            if let (Some((limit, window)), Ok(tid)) = (s.cfg.per_ticket, id.parse::<u64>()) {
                let now = now_ns();
                let w = window.as_nanos() as u64;
                let times = s.updates_at.entry(tid).or_default();
                let live: Vec<u64> = times.iter().copied().filter(|&t| t + w > now).collect();
                if live.len() >= limit as usize {
                    let retry = (live[0] + w - now).div_ceil(1_000_000_000).max(1);
                    s.ticket_throttled += 1;
                    let mut resp = response::text(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Too many updates to this ticket\n",
                    );
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
                    return resp;
                }
                times.push(now);
            }
            match id.parse::<u64>().ok().and_then(|id| s.tickets.get_mut(&id)) {
                Some(t) => {
                    t.updates.push(update);
                    let t = t.clone();
                    response::json_response(StatusCode::OK, &json!({ "ticket": t }))
                }
                None => response::json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "RecordNotFound"}),
                ),
            }
        }
        (&Method::GET, ["api", "v2", "search"]) => {
            let s = lock();
            let needle = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("query="))
                .unwrap_or("");
            let results: Vec<&Ticket> = s
                .tickets
                .values()
                .filter(|t| !needle.is_empty() && t.subject.contains(needle))
                .collect();
            response::json_response(
                StatusCode::OK,
                &json!({ "results": results, "count": results.len() }),
            )
        }
        _ => response::json_response(StatusCode::NOT_FOUND, &json!({"error": "InvalidEndpoint"})),
    }
}

/// `/echo/...`: describes the request it got. `?status=N` sets the status, `?bytes=N` answers N
/// bytes in 16 KiB chunks (no Content-Length), `?delay_ms=N` waits first.
async fn echo(req: Request<RequestBody>) -> Response<Body> {
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(ms) = query.get("delay_ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = query
        .get("status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    if let Some(n) = query.get("bytes").and_then(|v| v.parse::<usize>().ok()) {
        let body = Chunked { left: n, sent: 0 };
        let mut resp = Response::new(Body::new(body));
        *resp.status_mut() = status;
        return resp;
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().map(str::to_string);
    let headers: BTreeMap<String, Vec<String>> = req
        .headers()
        .keys()
        .map(|k| {
            (
                k.to_string(),
                req.headers()
                    .get_all(k)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &body);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut resp = response::json_response(
        status,
        &json!({
            "method": method,
            "path": path,
            "query": raw_query,
            "headers": headers,
            "body_len": body.len(),
            "body_sha256": hex,
        }),
    );
    resp.headers_mut()
        .insert("x-echo", HeaderValue::from_static("1"));
    resp
}

/// A body of `left` bytes made on demand in 16 KiB frames, with no length announced (chunked).
/// Byte `i` of the body is `b'a' + (i / 16384) % 26`.
struct Chunked {
    left: usize,
    sent: usize,
}

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        const CHUNK: usize = 16 * 1024;
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let len = self.left.min(CHUNK);
        let fill = b'a' + ((self.sent / CHUNK) % 26) as u8;
        self.left -= len;
        self.sent += len;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![fill; len])))))
    }
}
