//! Zendesk's batch endpoints: which parked writes may share one call (`create_many`,
//! `update_many`), the batch request, the job-status polls, and mapping a job's results back to
//! each write. Pure functions; the queue decides when to batch, the dispatcher sends.

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::message::{BufferedResponse, Outbound, own_path};

/// Most items Zendesk takes in one `create_many` or `update_many` call.
pub const MAX_BATCH: usize = 100;

/// Most job ids one `show_many` poll asks about.
pub const MAX_POLL: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    /// `POST /api/v2/tickets.json` → `POST /api/v2/tickets/create_many.json`.
    Create,
    /// `PUT /api/v2/tickets/{id}.json` → `PUT /api/v2/tickets/update_many.json` (batch form).
    Update,
}

impl BatchKind {
    pub fn name(self) -> &'static str {
        match self {
            BatchKind::Create => "create",
            BatchKind::Update => "update",
        }
    }
}

/// One parked write's part of a batch: its ticket object and, for an update, the ticket's id.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub kind: BatchKind,
    pub ticket: Value,
    pub ticket_id: Option<u64>,
}

/// What a write becomes in a batch, or `None` when it must go alone: a ticket create or an update
/// of one ticket, without a query, whose body is exactly `{"ticket": {…}}`.
pub fn item(req: &Outbound) -> Option<Item> {
    if req.path_and_query.query().is_some() {
        return None;
    }
    let path = req.path_and_query.path().trim_end_matches(".json");
    let (kind, ticket_id) = match (&req.method, path.strip_prefix("/api/v2/tickets")) {
        (&Method::POST, Some("")) => (BatchKind::Create, None),
        (&Method::PUT, Some(rest)) => {
            let id = rest.strip_prefix('/')?;
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (BatchKind::Update, Some(id.parse::<u64>().ok()?))
        }
        _ => return None,
    };
    let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(&req.body) else {
        return None;
    };
    if body.len() != 1 {
        return None;
    }
    let Some(Value::Object(mut ticket)) = body.remove("ticket") else {
        return None;
    };
    if let Some(id) = ticket_id {
        match ticket.get("id") {
            None => {
                ticket.insert("id".into(), json!(id));
            }
            Some(v) if v.as_u64() == Some(id) => {}
            Some(_) => return None,
        }
    }
    Some(Item {
        kind,
        ticket: Value::Object(ticket),
        ticket_id,
    })
}

/// Headers that differ per request and do not change what the CRM does with it.
const PER_REQUEST: [&str; 6] = [
    "idempotency-key",
    "content-length",
    "x-forwarded-for",
    "x-request-id",
    "traceparent",
    "tracestate",
];

/// Whether two writes may share one call: the same method and path kind (checked by the caller)
/// and the same headers, credential included, apart from per-request ones.
pub fn compatible(a: &HeaderMap, b: &HeaderMap) -> bool {
    fn relevant(h: &HeaderMap) -> Vec<(&str, &[u8])> {
        let mut v: Vec<(&str, &[u8])> = h
            .iter()
            .filter(|(k, _)| !PER_REQUEST.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        v.sort_unstable();
        v
    }
    relevant(a) == relevant(b)
}

/// The headers a batch or poll call carries: the first write's, minus per-request ones.
fn shared_headers(from: &HeaderMap) -> HeaderMap {
    let mut headers = from.clone();
    for h in PER_REQUEST {
        headers.remove(h);
    }
    headers
}

/// The batch call for `items` (all of `kind`), sent with `headers` (the first write's).
pub fn request(kind: BatchKind, items: Vec<Value>, headers: &HeaderMap) -> Outbound {
    let (method, path) = match kind {
        BatchKind::Create => (Method::POST, "/api/v2/tickets/create_many.json"),
        BatchKind::Update => (Method::PUT, "/api/v2/tickets/update_many.json"),
    };
    let mut headers = shared_headers(headers);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Outbound {
        method,
        path_and_query: PathAndQuery::from_static(path),
        headers,
        body: Bytes::from(json!({ "tickets": items }).to_string()),
    }
}

/// The poll for some jobs' statuses: `job_statuses/{id}` for one, `show_many` for several.
pub fn poll_request(jobs: &[&str], headers: &HeaderMap) -> Outbound {
    let path_and_query = match jobs {
        [one] => format!("/api/v2/job_statuses/{one}.json"),
        many => format!("/api/v2/job_statuses/show_many.json?ids={}", many.join(",")),
    };
    let mut headers = shared_headers(headers);
    headers.remove(header::CONTENT_TYPE);
    Outbound {
        method: Method::GET,
        path_and_query: own_path(path_and_query),
        headers,
        body: Bytes::new(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// `queued` or `working`: poll again later.
    Running,
    Completed,
    /// `failed` or `killed`.
    Failed,
}

/// A job status as the CRM reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub state: JobState,
    pub results: Vec<Value>,
    pub message: Option<String>,
}

fn job(v: &Value) -> Option<Job> {
    let id = match &v["id"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    // It goes into the poll's path as is.
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return None;
    }
    let state = match v["status"].as_str()? {
        "queued" | "working" => JobState::Running,
        "completed" => JobState::Completed,
        "failed" | "killed" => JobState::Failed,
        _ => return None,
    };
    Some(Job {
        id,
        state,
        results: v["results"].as_array().cloned().unwrap_or_default(),
        message: v["message"].as_str().map(str::to_string),
    })
}

/// `{"job_status": {…}}` (a batch call's answer, or a single poll's).
pub fn parse_job_status(body: &[u8]) -> Option<Job> {
    job(&serde_json::from_slice::<Value>(body).ok()?["job_status"])
}

/// `{"job_statuses": [{…}, …]}` (a `show_many` poll's answer).
pub fn parse_job_statuses(body: &[u8]) -> Option<Vec<Job>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    Some(
        v["job_statuses"]
            .as_array()?
            .iter()
            .filter_map(job)
            .collect(),
    )
}

/// What a finished job says about one write of its batch.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemResult {
    /// Created or updated: the ticket's id.
    Applied(u64),
    /// The CRM refused this item; the others are unaffected.
    Rejected(String),
    /// The job holds no result for it.
    Missing,
}

/// Each member's result, in batch order. Creates are matched by `index` (the position in the
/// batch), updates by ticket `id`; an item that reports `success: false` or an `error` is
/// rejected, with the CRM's `error` and `details`.
pub fn item_results(kind: BatchKind, job: &Job, members: &[Option<u64>]) -> Vec<ItemResult> {
    let mut out = vec![ItemResult::Missing; members.len()];
    for r in &job.results {
        let slot = match kind {
            BatchKind::Create => r["index"]
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i < members.len()),
            BatchKind::Update => r["id"]
                .as_u64()
                .and_then(|id| members.iter().position(|m| *m == Some(id))),
        };
        let Some(slot) = slot else { continue };
        let failed = r["success"] == Value::Bool(false) || !r["error"].is_null();
        out[slot] = match r["id"].as_u64() {
            Some(id) if !failed => ItemResult::Applied(id),
            _ => {
                let text = |k: &str| match &r[k] {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                };
                let error = [text("error"), text("details")]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": ");
                ItemResult::Rejected(if error.is_empty() {
                    "the CRM reported no success for this item".into()
                } else {
                    error
                })
            }
        };
    }
    out
}

/// Whether a CRM answer is Zendesk's `TooManyJobs` (too many background jobs open for the
/// account), a limit on jobs rather than on calls.
pub fn too_many_jobs(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v["error"] == "TooManyJobs")
}

/// The answer kept for a write that went in a batch: what its client reads at
/// `GET /_proxy/requests/{id}/response`. A create: `201`, `Location` of the new ticket, body
/// `{"ticket":{"id":N},"batch":{"job_id":…,"index":i}}`; an update: `200` and the same body.
pub fn member_response(
    kind: BatchKind,
    ticket_id: u64,
    job_id: &str,
    index: usize,
) -> BufferedResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let status = match kind {
        BatchKind::Create => {
            if let Ok(v) = HeaderValue::from_str(&format!("/api/v2/tickets/{ticket_id}.json")) {
                headers.insert(header::LOCATION, v);
            }
            StatusCode::CREATED
        }
        BatchKind::Update => StatusCode::OK,
    };
    let mut batch = Map::new();
    batch.insert("job_id".into(), json!(job_id));
    batch.insert("index".into(), json!(index));
    BufferedResponse {
        status,
        headers,
        body: Bytes::from(json!({ "ticket": { "id": ticket_id }, "batch": batch }).to_string()),
    }
}

/// The read of tickets a batch created, for the clients waiting on them:
/// `GET /api/v2/tickets/show_many.json?ids=…` (up to 100 ids, Zendesk's Show Multiple Tickets).
pub fn show_tickets_request(ids: &[u64], headers: &HeaderMap) -> Outbound {
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    let mut headers = shared_headers(headers);
    headers.remove(header::CONTENT_TYPE);
    Outbound {
        method: Method::GET,
        path_and_query: own_path(format!(
            "/api/v2/tickets/show_many.json?ids={}",
            ids.join(",")
        )),
        headers,
        body: Bytes::new(),
    }
}

/// The tickets of a `show_many` answer, by id.
pub fn parse_tickets(body: &[u8]) -> Option<Vec<(u64, Value)>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    Some(
        v["tickets"]
            .as_array()?
            .iter()
            .filter_map(|t| Some((t["id"].as_u64()?, t.clone())))
            .collect(),
    )
}

/// The answer Zendesk's single create gives, for a ticket a batch created and read back:
/// `201`, `Location` and `{"ticket": {…}}`.
pub fn created_answer(ticket: &Value) -> Option<BufferedResponse> {
    let id = ticket["id"].as_u64()?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let location = HeaderValue::from_str(&format!("/api/v2/tickets/{id}.json")).ok()?;
    headers.insert(header::LOCATION, location);
    Some(BufferedResponse {
        status: StatusCode::CREATED,
        headers,
        body: Bytes::from(json!({ "ticket": ticket }).to_string()),
    })
}

#[cfg(test)]
#[path = "zendesk_batch_tests.rs"]
mod tests;
