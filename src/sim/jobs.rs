//! The simulated CRM's batch endpoints, shaped like Zendesk's: `create_many` and `update_many`
//! queue a job (at most `max_jobs` queued or running, else 429 `TooManyJobs`), which runs
//! `job_delay` later; `job_statuses/{id}` and `job_statuses/show_many?ids=` report it. Creates
//! map back by `index`, updates by `id`. A create whose subject contains `reject` is refused as
//! an item; an update of an unknown ticket too; a job listed in `fail_jobs` fails whole without
//! applying anything. An `update_many` naming one ticket twice is refused (400).

use std::collections::BTreeMap;

use http::{HeaderValue, Method, Response, StatusCode, header};
use serde_json::{Value, json};

use super::{State, create, now_ns};
use crate::response::{self, Body};

#[derive(Default)]
pub(super) struct Jobs {
    jobs: BTreeMap<String, Job>,
    seq: u64,
    pub batch_calls: u64,
    pub polls: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Create,
    Update,
}

struct Job {
    kind: Kind,
    items: Vec<Value>,
    /// When it runs (ns since the Unix epoch).
    due: u64,
    fail: bool,
    /// `None` until it ran.
    results: Option<Vec<Value>>,
}

/// Runs every job whose time has come.
pub(super) fn run_due(s: &mut State, now: u64) {
    let due: Vec<String> = s
        .jobs
        .jobs
        .iter()
        .filter(|(_, j)| j.results.is_none() && j.due <= now)
        .map(|(id, _)| id.clone())
        .collect();
    for id in due {
        let job = s.jobs.jobs.get_mut(&id).expect("listed");
        if job.fail {
            job.results = Some(Vec::new());
            continue;
        }
        let (kind, items) = (job.kind, std::mem::take(&mut job.items));
        let mut results = Vec::with_capacity(items.len());
        for (index, t) in items.iter().enumerate() {
            results.push(match kind {
                Kind::Create => {
                    let subject = t["subject"].as_str().unwrap_or_default();
                    if subject.contains("reject") {
                        json!({ "index": index, "error": "TicketCreateFailed", "details": "Subject: rejected by the simulator" })
                    } else {
                        let (ticket, _) = create(s, subject, t["external_id"].as_str(), None);
                        json!({ "id": ticket.id, "index": index })
                    }
                }
                Kind::Update => {
                    let id = t["id"].as_u64().unwrap_or(0);
                    match s.tickets.get_mut(&id) {
                        Some(ticket) => {
                            let mut update = t.clone();
                            if let Some(o) = update.as_object_mut() {
                                o.remove("id");
                            }
                            ticket.updates.push(json!({ "ticket": update }));
                            json!({ "id": id, "action": "update", "success": true, "status": "Updated" })
                        }
                        None => json!({ "id": id, "action": "update", "success": false,
                                        "error": "TicketNotFound", "details": "no such ticket" }),
                    }
                }
            });
        }
        s.jobs.jobs.get_mut(&id).expect("listed").results = Some(results);
    }
}

fn view(id: &str, job: &Job) -> Value {
    let total = job.results.as_ref().map_or(job.items.len(), Vec::len);
    match &job.results {
        None => {
            json!({ "id": id, "url": format!("/api/v2/job_statuses/{id}.json"), "status": "queued",
                        "total": total, "progress": 0, "message": null, "results": null })
        }
        Some(_) if job.fail => json!({ "id": id, "url": format!("/api/v2/job_statuses/{id}.json"),
                        "status": "failed", "total": total, "progress": 0,
                        "message": "injected job failure", "results": null }),
        Some(results) => json!({ "id": id, "url": format!("/api/v2/job_statuses/{id}.json"),
                        "status": "completed", "total": total, "progress": total,
                        "message": "Completed", "results": results }),
    }
}

/// Answers a batch or job-status call; `None` for any other path.
pub(super) fn route(
    s: &mut State,
    method: &Method,
    segments: &[&str],
    query: &str,
    body: &[u8],
) -> Option<Response<Body>> {
    let now = now_ns();
    run_due(s, now);
    let kind = match (method, segments) {
        (&Method::POST, ["api", "v2", "tickets", "create_many"]) => Kind::Create,
        (&Method::PUT, ["api", "v2", "tickets", "update_many"]) => Kind::Update,
        (&Method::GET, ["api", "v2", "job_statuses", "show_many"]) => {
            s.jobs.polls += 1;
            let ids = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ids="))
                .unwrap_or("");
            let found: Vec<Value> = ids
                .split(',')
                .filter_map(|id| s.jobs.jobs.get(id).map(|j| view(id, j)))
                .collect();
            return Some(response::json_response(
                StatusCode::OK,
                &json!({ "job_statuses": found }),
            ));
        }
        (&Method::GET, ["api", "v2", "job_statuses", id]) => {
            s.jobs.polls += 1;
            return Some(match s.jobs.jobs.get(*id) {
                Some(j) => {
                    response::json_response(StatusCode::OK, &json!({ "job_status": view(id, j) }))
                }
                None => response::json_response(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": "RecordNotFound" }),
                ),
            });
        }
        _ => return None,
    };
    let running = s.jobs.jobs.values().filter(|j| j.results.is_none()).count();
    if running >= s.cfg.max_jobs {
        let mut resp = response::json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({ "error": "TooManyJobs", "description": "Too many jobs are currently queued or running. Try again later." }),
        );
        let h = resp.headers_mut();
        h.insert(header::RETRY_AFTER, HeaderValue::from(1));
        let limit = format!("total={}; remaining=0; resets=1", s.cfg.max_jobs);
        if let Ok(v) = HeaderValue::from_str(&limit) {
            h.insert("zendesk-ratelimit-inflight-jobs", v);
        }
        return Some(resp);
    }
    let items = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["tickets"].as_array().cloned());
    let items = match items {
        Some(items) if !items.is_empty() && items.len() <= 100 => items,
        _ => {
            return Some(response::json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": "InvalidValue", "description": "tickets: 1 to 100 items" }),
            ));
        }
    };
    if kind == Kind::Update {
        let mut ids: Vec<Option<u64>> = items.iter().map(|t| t["id"].as_u64()).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        if ids.iter().any(Option::is_none) || ids.len() != n {
            return Some(response::json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": "InvalidValue", "description": "every ticket needs an id, once" }),
            ));
        }
    }
    s.jobs.seq += 1;
    s.jobs.batch_calls += 1;
    let id = format!("job{:06}", s.jobs.seq);
    let job = Job {
        kind,
        items,
        due: now + s.cfg.job_delay.as_nanos() as u64,
        fail: s.cfg.fail_jobs.contains(&s.jobs.seq),
        results: None,
    };
    let resp = response::json_response(StatusCode::OK, &json!({ "job_status": view(&id, &job) }));
    s.jobs.jobs.insert(id, job);
    Some(resp)
}
