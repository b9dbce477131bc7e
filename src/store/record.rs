//! The log's records: one per change to a parked write, their binary encoding, and the replay
//! that turns a log back into the state each write ended in.

use std::collections::HashMap;

use bytes::Bytes;

use super::codec::{Malformed, Reader, Writer};
use crate::status::FailReason;

/// A parked write as the log keeps it. Routes, clients and quotas are kept by name: the config
/// may change between restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub id: u128,
    pub seq: u64,
    pub route: String,
    pub client: String,
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    pub resource: Option<String>,
    /// (quota name, key) of the keyed quotas it consumes.
    pub keys: Vec<(String, String)>,
    pub fingerprint: [u8; 16],
    pub created_at: u64,
    pub expires_at: u64,
    pub not_before: u64,
    pub attempts: u32,
}

/// A stored CRM answer.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

/// One change to the queue's durable state.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// The proxy took the write over (a 202 follows only once this is durable).
    Accepted(Box<Stored>),
    /// About to be sent (durable before the send: after a crash, exactly these may have reached the CRM).
    Dispatching {
        id: u128,
        attempt: u32,
    },
    /// Back in its lane (retry, throttle, or after recovery).
    Requeued {
        id: u128,
        attempts: u32,
        not_before: u64,
    },
    Done {
        id: u128,
        at: u64,
        response: StoredResponse,
    },
    /// Given up, kept as a dead letter. `reason` is written as [`FailReason::code`]: 0 attempts
    /// exhausted, 1 ambiguous (the CRM may have applied it), 2 rejected (a batch item the CRM
    /// refused).
    Failed {
        id: u128,
        at: u64,
        reason: FailReason,
        error: String,
    },
    Expired {
        id: u128,
        at: u64,
    },
    /// Queued again by an operator, with fresh attempts and TTL.
    Retried {
        id: u128,
        at: u64,
        expires_at: u64,
    },
    /// Gone: purged after its result TTL, or discarded by an operator.
    Removed {
        id: u128,
    },
    /// About to be sent as one item of a batch call (durable before the send). A batch call
    /// carries no per-item idempotency key, so after a crash it is never resent blindly.
    BatchSent {
        id: u128,
        attempt: u32,
    },
    /// Its batch call was accepted as this CRM job, as item `index`: recovery polls the job.
    Job {
        id: u128,
        job: String,
        index: u32,
    },
}

const ACCEPTED: u8 = 1;
const DISPATCHING: u8 = 2;
const REQUEUED: u8 = 3;
const DONE: u8 = 4;
const FAILED: u8 = 5;
const EXPIRED: u8 = 6;
const RETRIED: u8 = 7;
const REMOVED: u8 = 8;
const BATCH_SENT: u8 = 9;
const JOB: u8 = 10;

fn put_headers(w: &mut Writer, headers: &[(String, Vec<u8>)]) {
    w.u32(headers.len() as u32);
    for (k, v) in headers {
        w.str(k).bytes(v);
    }
}

fn get_headers(r: &mut Reader<'_>) -> Result<Vec<(String, Vec<u8>)>, Malformed> {
    let n = r.u32()?;
    (0..n)
        .map(|_| Ok((r.str()?.to_string(), r.bytes()?.to_vec())))
        .collect()
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Record::Accepted(s) => {
                w.u8(ACCEPTED).0.extend_from_slice(&s.id.to_le_bytes());
                w.u64(s.seq)
                    .str(&s.route)
                    .str(&s.client)
                    .str(&s.method)
                    .str(&s.path_and_query);
                put_headers(&mut w, &s.headers);
                w.bytes(&s.body).opt_str(s.resource.as_deref());
                w.u32(s.keys.len() as u32);
                for (q, k) in &s.keys {
                    w.str(q).str(k);
                }
                w.0.extend_from_slice(&s.fingerprint);
                w.u64(s.created_at)
                    .u64(s.expires_at)
                    .u64(s.not_before)
                    .u32(s.attempts);
            }
            Record::Dispatching { id, attempt } => {
                w.u8(DISPATCHING).0.extend_from_slice(&id.to_le_bytes());
                w.u32(*attempt);
            }
            Record::Requeued {
                id,
                attempts,
                not_before,
            } => {
                w.u8(REQUEUED).0.extend_from_slice(&id.to_le_bytes());
                w.u32(*attempts).u64(*not_before);
            }
            Record::Done { id, at, response } => {
                w.u8(DONE).0.extend_from_slice(&id.to_le_bytes());
                w.u64(*at).u16(response.status);
                put_headers(&mut w, &response.headers);
                w.bytes(&response.body);
            }
            Record::Failed {
                id,
                at,
                reason,
                error,
            } => {
                w.u8(FAILED).0.extend_from_slice(&id.to_le_bytes());
                w.u64(*at).u8(reason.code()).str(error);
            }
            Record::Expired { id, at } => {
                w.u8(EXPIRED).0.extend_from_slice(&id.to_le_bytes());
                w.u64(*at);
            }
            Record::Retried { id, at, expires_at } => {
                w.u8(RETRIED).0.extend_from_slice(&id.to_le_bytes());
                w.u64(*at).u64(*expires_at);
            }
            Record::Removed { id } => {
                w.u8(REMOVED).0.extend_from_slice(&id.to_le_bytes());
            }
            Record::BatchSent { id, attempt } => {
                w.u8(BATCH_SENT).0.extend_from_slice(&id.to_le_bytes());
                w.u32(*attempt);
            }
            Record::Job { id, job, index } => {
                w.u8(JOB).0.extend_from_slice(&id.to_le_bytes());
                w.str(job).u32(*index);
            }
        }
        w.0
    }

    /// The id of the write a record is about, read from its first fields.
    pub fn id_of(payload: &[u8]) -> Option<u128> {
        Some(u128::from_le_bytes(payload.get(1..17)?.try_into().ok()?))
    }

    pub fn decode(payload: &[u8]) -> Result<Record, Malformed> {
        let mut r = Reader::new(payload);
        let kind = r.u8()?;
        let id = u128::from_le_bytes(
            (0..16)
                .map(|_| r.u8())
                .collect::<Result<Vec<u8>, _>>()?
                .try_into()
                .map_err(|_| Malformed)?,
        );
        Ok(match kind {
            ACCEPTED => {
                let seq = r.u64()?;
                let route = r.str()?.to_string();
                let client = r.str()?.to_string();
                let method = r.str()?.to_string();
                let path_and_query = r.str()?.to_string();
                let headers = get_headers(&mut r)?;
                let body = Bytes::copy_from_slice(r.bytes()?);
                let resource = r.opt_str()?.map(str::to_string);
                let nkeys = r.u32()?;
                let keys = (0..nkeys)
                    .map(|_| Ok((r.str()?.to_string(), r.str()?.to_string())))
                    .collect::<Result<_, Malformed>>()?;
                let mut fingerprint = [0u8; 16];
                for b in &mut fingerprint {
                    *b = r.u8()?;
                }
                Record::Accepted(Box::new(Stored {
                    id,
                    seq,
                    route,
                    client,
                    method,
                    path_and_query,
                    headers,
                    body,
                    resource,
                    keys,
                    fingerprint,
                    created_at: r.u64()?,
                    expires_at: r.u64()?,
                    not_before: r.u64()?,
                    attempts: r.u32()?,
                }))
            }
            DISPATCHING => Record::Dispatching {
                id,
                attempt: r.u32()?,
            },
            REQUEUED => Record::Requeued {
                id,
                attempts: r.u32()?,
                not_before: r.u64()?,
            },
            DONE => {
                let at = r.u64()?;
                let status = r.u16()?;
                let headers = get_headers(&mut r)?;
                let body = Bytes::copy_from_slice(r.bytes()?);
                Record::Done {
                    id,
                    at,
                    response: StoredResponse {
                        status,
                        headers,
                        body,
                    },
                }
            }
            FAILED => Record::Failed {
                id,
                at: r.u64()?,
                reason: FailReason::from_code(r.u8()?).ok_or(Malformed)?,
                error: r.str()?.to_string(),
            },
            EXPIRED => Record::Expired { id, at: r.u64()? },
            RETRIED => Record::Retried {
                id,
                at: r.u64()?,
                expires_at: r.u64()?,
            },
            REMOVED => Record::Removed { id },
            BATCH_SENT => Record::BatchSent {
                id,
                attempt: r.u32()?,
            },
            JOB => Record::Job {
                id,
                job: r.str()?.to_string(),
                index: r.u32()?,
            },
            _ => return Err(Malformed),
        })
    }
}

/// Where a recovered write stood when the log ends.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveredState {
    Queued,
    /// A send may have reached the CRM (`batch`: as an item of a batch call).
    InFlight {
        attempt: u32,
        batch: bool,
    },
    /// Its batch call became this CRM job (item `index`); the job's result is still to be read.
    InJob {
        attempt: u32,
        job: String,
        index: u32,
    },
    Done {
        at: u64,
        response: StoredResponse,
    },
    Failed {
        at: u64,
        reason: FailReason,
        error: String,
    },
    Expired {
        at: u64,
    },
}

/// What the log held: every write not removed, in arrival order.
#[derive(Debug, Default)]
pub struct Recovered {
    pub entries: Vec<(Stored, RecoveredState)>,
    pub records: usize,
    /// Bytes of a torn tail that were cut off (a write a crash interrupted).
    pub discarded_bytes: u64,
    /// Damaged stretches between good records, moved to the quarantine file.
    pub quarantined: Vec<Quarantined>,
    /// The log was in the format before sequence numbers, and was rewritten.
    pub upgraded: bool,
}

/// A damaged stretch of the log: where, how long, and the ids of the readable records around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub offset: u64,
    pub bytes: u64,
    pub after: Option<u128>,
    pub before: Option<u128>,
}

/// Replays records into the state each write ended in.
pub fn replay(records: impl IntoIterator<Item = Record>) -> Vec<(Stored, RecoveredState)> {
    let mut map: HashMap<u128, (Stored, RecoveredState)> = HashMap::new();
    for rec in records {
        match rec {
            Record::Accepted(s) => {
                map.insert(s.id, (*s, RecoveredState::Queued));
            }
            Record::Removed { id } => {
                map.remove(&id);
            }
            other => {
                let id = match &other {
                    Record::Dispatching { id, .. }
                    | Record::Requeued { id, .. }
                    | Record::Done { id, .. }
                    | Record::Failed { id, .. }
                    | Record::Expired { id, .. }
                    | Record::Retried { id, .. }
                    | Record::BatchSent { id, .. }
                    | Record::Job { id, .. } => *id,
                    Record::Accepted(_) | Record::Removed { .. } => unreachable!("matched above"),
                };
                let Some((stored, state)) = map.get_mut(&id) else {
                    continue;
                };
                *state = match other {
                    Record::Dispatching { attempt, .. } => {
                        stored.attempts = attempt;
                        RecoveredState::InFlight {
                            attempt,
                            batch: false,
                        }
                    }
                    Record::BatchSent { attempt, .. } => {
                        stored.attempts = attempt;
                        RecoveredState::InFlight {
                            attempt,
                            batch: true,
                        }
                    }
                    Record::Job { job, index, .. } => RecoveredState::InJob {
                        attempt: stored.attempts,
                        job,
                        index,
                    },
                    Record::Requeued {
                        attempts,
                        not_before,
                        ..
                    } => {
                        stored.attempts = attempts;
                        stored.not_before = not_before;
                        RecoveredState::Queued
                    }
                    Record::Done { at, response, .. } => RecoveredState::Done { at, response },
                    Record::Failed {
                        at, reason, error, ..
                    } => RecoveredState::Failed { at, reason, error },
                    Record::Expired { at, .. } => RecoveredState::Expired { at },
                    Record::Retried { at, expires_at, .. } => {
                        stored.attempts = 0;
                        stored.not_before = at;
                        stored.expires_at = expires_at;
                        RecoveredState::Queued
                    }
                    Record::Accepted(_) | Record::Removed { .. } => unreachable!("matched above"),
                };
            }
        }
    }
    let mut entries: Vec<_> = map.into_values().collect();
    entries.sort_by_key(|(s, _)| s.seq);
    entries
}
