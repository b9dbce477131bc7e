//! What others see of parked writes: a client its own write's status, an operator the list and
//! the detail (credentials redacted), and `/status` the totals and lanes, read from the book's
//! running aggregates so a scrape never walks every parked write.

use std::collections::BTreeMap;

use serde::Serialize;

use super::admission::calls_ahead;
use super::book::Entry;
use super::entry::{Kept, Owner, State};
use super::{LaneStatus, Queue, QueueStatus};
use crate::clock::Time;
use crate::credentials::Credentials;
use crate::ids::{EntryId, Fingerprint, LaneId, QuotaId};
use crate::message::BufferedResponse;
use crate::quota::Ledger;
use crate::status::{FailReason, Status};

/// Dead letters `/status` lists, newest first.
const DEAD_LETTERS_SHOWN: usize = 100;

/// `GET /_proxy/requests/{id}`: a parked write as its client may see it.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub id: String,
    pub status: Status,
    pub route: String,
    pub attempts: u32,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Parked writes ahead of this one in its lane (queued only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_dispatch_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The CRM's answer (done only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseView>,
    #[serde(skip)]
    pub stored: Option<BufferedResponse>,
}

/// A stored CRM response in JSON: the body as text when it is UTF-8, else base64.
#[derive(Debug, Serialize)]
pub struct ResponseView {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl ResponseView {
    /// The answer with its credential headers (`Set-Cookie`, tokens) redacted.
    pub fn of(r: &BufferedResponse, creds: &Credentials) -> ResponseView {
        let headers = creds.headers(&r.headers);
        let (body, body_base64) = match std::str::from_utf8(&r.body) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(base64(&r.body))),
        };
        ResponseView {
            status: r.status.as_u16(),
            headers,
            body,
            body_base64,
        }
    }
}

/// Standard base64 with padding (binary CRM bodies are rare; not worth a crate).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A parked write as the operator tools list it.
#[derive(Debug, Serialize)]
pub struct EntrySummary {
    pub id: String,
    pub status: Status,
    pub route: String,
    pub client: String,
    pub attempts: u32,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One parked write in full for the operator: its request with credentials redacted.
#[derive(Debug, Serialize)]
pub struct EntryDetail {
    #[serde(flatten)]
    pub summary: EntrySummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseView>,
}

#[derive(Debug, Serialize)]
pub struct RequestView {
    pub method: String,
    pub path_and_query: String,
    /// Header values; credentials (see [`Credentials`]) show as `<redacted>`.
    pub headers: Vec<(String, String)>,
    pub body_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl RequestView {
    pub fn of(r: &Kept, creds: &Credentials) -> RequestView {
        let r = &r.outbound();
        RequestView {
            method: r.method.to_string(),
            path_and_query: creds.query(r.path_and_query.as_str()),
            headers: creds.headers(&r.headers),
            body_bytes: r.body.len(),
            body: std::str::from_utf8(&r.body).ok().map(str::to_string),
        }
    }
}

impl Queue {
    /// A parked write as the client who sent it may see it; `None` when unknown or when the
    /// credential differs (both answer 404, so ids cannot be probed).
    pub fn status(
        &self,
        id: EntryId,
        fingerprint: Fingerprint,
        ledger: &Ledger,
        now: Time,
    ) -> Option<StatusView> {
        let book = self.lock();
        let e = book.get(&id)?;
        // Only a 202 makes an id visible: client-owned and live entries are not reported.
        if e.fingerprint != fingerprint
            || matches!(e.state(), State::Queued(Owner::Client(_)) | State::Live)
        {
            return None;
        }
        let queued = matches!(e.state(), State::Queued(_)).then(|| self.eta(&book, e, ledger, now));
        let (reason, error, stored) = match e.state() {
            State::Failed(reason, err) => (Some(*reason), Some(err.to_string()), None),
            State::Expired => (None, Some("expired before quota allowed it".into()), None),
            State::Done(r) => (None, None, Some((**r).clone())),
            _ => (None, None, None),
        };
        Some(StatusView {
            id: id.to_string(),
            status: e.state().status(),
            route: self.routes().get(e.route).name.clone(),
            attempts: e.attempts,
            created_at: e.created_at.to_string(),
            finished_at: e.finished_at().map(|t| t.to_string()),
            position: queued.map(|(p, _)| p),
            estimated_dispatch_at: queued.map(|(_, eta)| eta.to_string()),
            reason,
            error,
            response: stored
                .as_ref()
                .map(|r| ResponseView::of(r, &self.credentials)),
            stored,
        })
    }

    /// Totals, every lane's depth and oldest age, and the newest dead letters: O(lanes + shown
    /// dead letters) under the lock, whatever the backlog.
    /// [`Queue::snapshot`] with the drain's estimated time to empty.
    pub fn overview(&self, ledger: &Ledger, now: Time) -> QueueStatus {
        let mut status = self.snapshot(now);
        status.drain_eta_seconds = self.drain_eta(ledger, now);
        status
    }

    /// Seconds until the writes waiting now would all have been sent, if only the drain spent
    /// the quotas: each quota's calls (a batch counts once) from the lanes that spend it, at the
    /// pace its window (and its release schedule) allows, and no sooner than a write's backoff
    /// allows.
    fn drain_eta(&self, ledger: &Ledger, now: Time) -> f64 {
        let (calls, mut empty_at) = self.backlog(now);
        for (q, n) in calls {
            empty_at = empty_at.max(ledger.estimate(&[q], n - 1, now));
        }
        empty_at.saturating_since(now).as_secs_f64()
    }

    /// The calls the writes waiting now need of each quota (a batch counts once), and the
    /// earliest time their backoffs let the last of them go.
    pub fn backlog(&self, now: Time) -> (BTreeMap<QuotaId, u64>, Time) {
        let book = self.lock();
        let routes = self.routes();
        let mut calls: BTreeMap<QuotaId, u64> = BTreeMap::new();
        let mut empty_at = now;
        for client in &book.clients {
            for (l, lane) in client.lanes.iter().enumerate() {
                let Some((_, last)) = lane.back() else {
                    continue;
                };
                let e = book.entry(last);
                let n = calls_ahead(routes.get(e.route), e.batchable, lane.len() - 1) + 1;
                for &q in &routes.lane(LaneId(l)).quotas {
                    *calls.entry(q).or_default() += n;
                }
                empty_at = empty_at.max(e.not_before);
            }
        }
        (calls, empty_at)
    }

    pub fn snapshot(&self, now: Time) -> QueueStatus {
        let book = self.lock();
        let mut lanes = Vec::new();
        for (c, q) in book.clients.iter().enumerate() {
            for (l, lane) in q.lanes.iter().enumerate() {
                // Every lane of the default client is listed; other clients' only when in use.
                if lane.is_empty() && c + 1 != book.clients.len() {
                    continue;
                }
                lanes.push(LaneStatus {
                    name: self.routes().lane(LaneId(l)).name.clone(),
                    client: self.clients()[c].name.clone(),
                    depth: lane.len(),
                    oldest_age_seconds: lane
                        .front()
                        .map(|(_, id)| {
                            now.saturating_since(book.entry(id).created_at)
                                .as_secs_f64()
                        })
                        .unwrap_or(0.0),
                });
            }
        }
        let counts = book.counts();
        QueueStatus {
            drain_eta_seconds: 0.0,
            entries: counts.held,
            bytes: counts.held_bytes + counts.done_bytes,
            results: counts.done,
            queued: book.queued(),
            dispatching: counts.dispatching,
            failed: counts.failed,
            expired: counts.expired,
            dead_letters: book
                .dead_letters()
                .take(DEAD_LETTERS_SHOWN)
                .map(|e| self.summary(e))
                .collect(),
            lanes,
        }
    }

    fn summary(&self, e: &Entry) -> EntrySummary {
        let (reason, error) = match e.state() {
            State::Failed(reason, err) => (Some(*reason), Some(err.to_string())),
            State::Expired => (None, Some("expired before quota allowed it".into())),
            _ => (None, None),
        };
        EntrySummary {
            id: e.id.to_string(),
            status: e.state().status(),
            route: self.routes().get(e.route).name.clone(),
            client: self.clients()[e.client.0].name.clone(),
            attempts: e.attempts,
            created_at: e.created_at.to_string(),
            finished_at: e.finished_at().map(|t| t.to_string()),
            reason,
            error,
        }
    }

    /// The parked writes the proxy owns, optionally only those in one status, oldest first.
    pub fn list(&self, status: Option<Status>) -> Vec<EntrySummary> {
        let book = self.lock();
        let mut out: Vec<&Entry> = book
            .entries()
            .filter(|e| !matches!(e.state(), State::Queued(Owner::Client(_)) | State::Live))
            .filter(|e| status.is_none_or(|s| e.state().status() == s))
            .collect();
        out.sort_by_key(|e| e.seq);
        out.into_iter().map(|e| self.summary(e)).collect()
    }

    /// One parked write in full (credentials redacted), for the operator.
    pub fn inspect(&self, id: EntryId) -> Option<EntryDetail> {
        let book = self.lock();
        let e = book
            .get(&id)
            .filter(|e| !matches!(e.state(), State::Queued(Owner::Client(_)) | State::Live))?;
        Some(EntryDetail {
            summary: self.summary(e),
            request: e.request().map(|r| RequestView::of(r, &self.credentials)),
            response: match e.state() {
                State::Done(r) => Some(ResponseView::of(r, &self.credentials)),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }
}
