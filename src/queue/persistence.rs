//! Parked writes as the log keeps them: the mapping between entries and records, recovery of
//! the queue from what the log held, and compaction of the log to the live entries.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::admission::header_bytes;
use super::book::{Book, Entry, Life};
use super::entry::{Batched, Kept, Owner, State};
use super::{Queue, Restored};
use crate::clock::Time;
use crate::ids::{ClientId, EntryId, Fingerprint, QuotaId};
use crate::message::{BufferedResponse, Outbound};
use crate::status::FailReason;
use crate::store::{Record, RecoveredState, Stored, StoredResponse};

impl Queue {
    /// A parked write as the log keeps it.
    pub(super) fn stored(&self, e: &Entry) -> Stored {
        let (method, path_and_query, headers, body) = match e.request().map(Kept::outbound) {
            Some(r) => (
                r.method.to_string(),
                r.path_and_query.to_string(),
                r.headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                    .collect(),
                r.body.clone(),
            ),
            None => (
                String::new(),
                String::new(),
                Vec::new(),
                bytes::Bytes::new(),
            ),
        };
        Stored {
            id: e.id.as_u128(),
            seq: e.seq,
            route: self.routes().get(e.route).name.clone(),
            client: self.clients()[e.client.0].name.clone(),
            method,
            path_and_query,
            headers,
            body,
            resource: e.resource.as_deref().map(str::to_string),
            keys: e
                .keys
                .iter()
                .map(|(q, k)| (self.quota_names[q.0].clone(), k.to_string()))
                .collect(),
            fingerprint: e.fingerprint.to_bytes(),
            created_at: e.created_at.as_nanos(),
            expires_at: e.expires_at.as_nanos(),
            not_before: e.not_before.as_nanos(),
            attempts: e.attempts,
        }
    }

    /// Rebuilds the queue from what the log held: writes back in their lanes in arrival order;
    /// writes that were being sent are resent only when that cannot apply them twice, else
    /// failed as ambiguous; finished ones readable until their result TTL.
    pub fn restore(&self, recovered: Vec<(Stored, RecoveredState)>, now: Time) -> Restored {
        let mut report = Restored::default();
        let mut in_jobs: HashMap<Arc<str>, Vec<(u32, EntryId)>> = HashMap::new();
        let mut guard = self.lock();
        let book = &mut *guard;
        for (s, state) in recovered {
            let Some(request) = outbound(&s) else {
                tracing::error!(request_id = %EntryId::from_u128(s.id), "a logged write has an unreadable request; skipped");
                continue;
            };
            let raw = request.path_and_query.path();
            let path = crate::path::canonical(raw).unwrap_or(std::borrow::Cow::Borrowed(raw));
            let routes = self.routes();
            let route = routes.find(&s.route, &request.method, &path);
            let client = self
                .clients()
                .iter()
                .position(|c| c.name == s.client)
                .map_or(ClientId(self.clients().len() - 1), ClientId);
            let keys = s
                .keys
                .iter()
                .filter_map(|(q, k)| {
                    let q = self.quota_names.iter().position(|n| n == q)?;
                    route
                        .keyed
                        .iter()
                        .any(|(kq, _)| kq.0 == q)
                        .then(|| (QuotaId(q), Arc::from(k.as_str())))
                })
                .collect();
            let id = EntryId::from_u128(s.id);
            let bytes = request.body.len() + header_bytes(&request);
            // A batch call carries no per-item idempotency key: only retry_ambiguous resends it.
            let safe = match &state {
                RecoveredState::InFlight { batch: true, .. } => route.retry_ambiguous,
                _ => route.resend_safe(&request),
            };
            let batchable = self.batchable(route, &request);
            let mut batched = None;
            let (state, finished_at) = match state {
                RecoveredState::Queued => {
                    report.queued += 1;
                    (State::Queued(Owner::Proxy), None)
                }
                RecoveredState::InJob { job, index, .. } => {
                    report.in_jobs += 1;
                    let job: Arc<str> = Arc::from(job);
                    in_jobs.entry(job.clone()).or_default().push((index, id));
                    batched = Some(Box::new(Batched::Job(job, index)));
                    if let Some(r) = &s.resource {
                        book.busy.insert(Arc::from(r.as_str()));
                    }
                    (State::Dispatching, None)
                }
                RecoveredState::InFlight { .. } if safe => {
                    report.resent += 1;
                    self.log(|| Record::Requeued {
                        id: s.id,
                        attempts: s.attempts,
                        not_before: now.as_nanos(),
                    });
                    (State::Queued(Owner::Proxy), None)
                }
                RecoveredState::InFlight { .. } => {
                    report.ambiguous += 1;
                    let error = "it was being sent when the proxy stopped: the CRM may have applied it, and resending could apply it twice".to_string();
                    self.log(|| Record::Failed {
                        id: s.id,
                        at: now.as_nanos(),
                        reason: FailReason::Ambiguous,
                        error: error.clone(),
                    });
                    self.metrics
                        .failed(&route.name, FailReason::Ambiguous.name());
                    (
                        State::Failed(FailReason::Ambiguous, error.into()),
                        Some(now),
                    )
                }
                RecoveredState::Done { at, response } => {
                    if Time::from_nanos(at) + self.cfg().result_ttl <= now {
                        self.log(|| Record::Removed { id: s.id });
                        continue;
                    }
                    report.finished += 1;
                    (
                        State::Done(Box::new(buffered(&response))),
                        Some(Time::from_nanos(at)),
                    )
                }
                RecoveredState::Failed { at, reason, error } => {
                    report.finished += 1;
                    (
                        State::Failed(reason, error.into()),
                        Some(Time::from_nanos(at)),
                    )
                }
                RecoveredState::Expired { at } => {
                    report.finished += 1;
                    (State::Expired, Some(Time::from_nanos(at)))
                }
            };
            let kept = state.holds_request().then(|| Kept::new(&request));
            let queued = matches!(state, State::Queued(_));
            book.seq = book.seq.max(s.seq);
            let new = Entry {
                id,
                seq: s.seq,
                route: route.id,
                lane: route.lane,
                client,
                keys,
                resource: s.resource.map(Arc::from),
                fingerprint: Fingerprint::from_bytes(s.fingerprint),
                bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
                created_at: Time::from_nanos(s.created_at),
                expires_at: Time::from_nanos(s.expires_at),
                not_before: Time::from_nanos(s.not_before),
                attempts: s.attempts,
                durable: true,
                batchable,
                single: false,
                batched,
                life: Life::unset(),
            };
            book.insert(new, state, kept, finished_at);
            if queued {
                self.link(book, id);
            }
        }
        self.restore_jobs(book, in_jobs, now);
        drop(guard);
        self.wake();
        report
    }

    /// Rewrites the log as the live state when it has grown far beyond it.
    pub(super) fn compact_if_due(&self, book: &Book) {
        let counts = book.counts();
        let live = counts.held_bytes as u64 + book.len() as u64 * 256;
        if !self.store.wants_compaction(self.cfg().compact_bytes, live) {
            return;
        }
        let mut entries: Vec<&Entry> = book.entries().collect();
        let mut snapshot = Vec::with_capacity(entries.len() * 2);
        entries.sort_by_key(|e| e.seq);
        for e in entries {
            let uid = e.id.as_u128();
            let finished = e.finished_at().unwrap_or_default().as_nanos();
            let mut job = None;
            let state = match e.state() {
                State::Queued(Owner::Client(_)) | State::Live => continue,
                State::Queued(Owner::Proxy) => None,
                State::Dispatching if e.batched.is_some() => {
                    if let Some(Batched::Job(j, index)) = e.batched.as_deref() {
                        job = Some(Record::Job {
                            id: uid,
                            job: j.to_string(),
                            index: *index,
                        });
                    }
                    Some(Record::BatchSent {
                        id: uid,
                        attempt: e.attempts,
                    })
                }
                State::Dispatching => Some(Record::Dispatching {
                    id: uid,
                    attempt: e.attempts,
                }),
                State::Done(r) => Some(Record::Done {
                    id: uid,
                    at: finished,
                    response: stored_response(r),
                }),
                State::Failed(reason, error) => Some(Record::Failed {
                    id: uid,
                    at: finished,
                    reason: *reason,
                    error: error.to_string(),
                }),
                State::Expired => Some(Record::Expired {
                    id: uid,
                    at: finished,
                }),
            };
            snapshot.push(Record::Accepted(Box::new(self.stored(e))));
            snapshot.extend(state);
            snapshot.extend(job);
        }
        self.store.compact(&snapshot);
    }
}

pub(super) fn stored_response(r: &BufferedResponse) -> StoredResponse {
    StoredResponse {
        status: r.status.as_u16(),
        headers: r
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: r.body.clone(),
    }
}

fn buffered(r: &StoredResponse) -> BufferedResponse {
    let mut headers = HeaderMap::new();
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            headers.append(k, v);
        }
    }
    BufferedResponse {
        status: StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK),
        headers,
        body: r.body.clone(),
    }
}

/// The request a logged write carries, or `None` if it does not parse.
fn outbound(s: &Stored) -> Option<Outbound> {
    let mut headers = HeaderMap::new();
    for (k, v) in &s.headers {
        headers.append(
            HeaderName::from_bytes(k.as_bytes()).ok()?,
            HeaderValue::from_bytes(v).ok()?,
        );
    }
    Some(Outbound {
        method: Method::from_bytes(s.method.as_bytes()).ok()?,
        path_and_query: s.path_and_query.parse().ok()?,
        headers,
        body: s.body.clone(),
    })
}
