//! Durability of parked writes: a write-ahead log in a data directory (or nothing, for the memory
//! store), written by one thread that commits in groups: one fsync for every record that arrived
//! while the previous batch was being written.

pub mod codec;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use codec::{Malformed, Reader, Writer, frame, unframe};

/// The log's file name in the data directory.
pub const LOG_FILE: &str = "queue.log";
const LOCK_FILE: &str = "LOCK";

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
    pub record: Option<String>,
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
    /// `reason`: 0 attempts exhausted, 1 ambiguous.
    Failed {
        id: u128,
        at: u64,
        reason: u8,
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
                w.bytes(&s.body).opt_str(s.record.as_deref());
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
                w.u64(*at).u8(*reason).str(error);
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
                let record = r.opt_str()?.map(str::to_string);
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
                    record,
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
                reason: r.u8()?,
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
        reason: u8,
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
    /// Bytes of a torn or corrupt tail that were cut off.
    pub discarded_bytes: u64,
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {0} is in use by another crm-quota-proxy process")]
    Locked(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the log {0} holds a record this version cannot read")]
    Malformed(PathBuf),
    #[error("the parked write could not be stored: {0}")]
    Write(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Waits for a record to be durable.
pub struct Commit(Option<oneshot::Receiver<Result<(), String>>>);

impl Commit {
    /// A commit that is already durable (the memory store).
    pub fn done() -> Commit {
        Commit(None)
    }

    fn failed(why: &str) -> Commit {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(why.to_string()));
        Commit(Some(rx))
    }

    pub async fn durable(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(result) => result.map_err(StoreError::Write),
                Err(_) => Err(StoreError::Write("the log writer stopped".into())),
            },
        }
    }
}

enum Msg {
    Append(Vec<u8>, Option<oneshot::Sender<Result<(), String>>>),
    /// Replace the log with these framed records (a snapshot of the live state).
    Compact(Vec<u8>),
}

/// Statistics the writer keeps (for metrics).
#[derive(Debug, Default)]
pub struct StoreStats {
    pub log_bytes: AtomicU64,
    pub commits: AtomicU64,
    pub errors: AtomicU64,
    /// Total nanoseconds spent in fsync.
    pub sync_nanos: AtomicU64,
}

/// The queue's durable store: nothing (memory) or a write-ahead log.
pub struct Store {
    wal: Option<Wal>,
}

struct Wal {
    tx: mpsc::Sender<Msg>,
    compacting: Arc<AtomicBool>,
    stats: Arc<StoreStats>,
    // Held for the process's lifetime: the lock on the data directory.
    _lock: File,
}

impl Store {
    pub fn memory() -> Store {
        Store { wal: None }
    }

    pub fn is_durable(&self) -> bool {
        self.wal.is_some()
    }

    /// Opens (creating, 0700) a data directory, locks it against other processes, reads the
    /// log (cutting off a torn or corrupt tail), and starts the writer thread.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), StoreError> {
        let lock = lock_dir(dir)?;
        let path = dir.join(LOG_FILE);
        let _ = fs::remove_file(dir.join(format!("{LOG_FILE}.tmp")));
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io(&path))?;
        let (payloads, valid) = unframe(&data);
        let records = payloads
            .iter()
            .map(|p| Record::decode(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| StoreError::Malformed(path.clone()))?;
        let discarded = (data.len() - valid) as u64;
        if discarded > 0 {
            file.set_len(valid as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        let recovered = Recovered {
            records: records.len(),
            entries: replay(records),
            discarded_bytes: discarded,
        };
        let stats = Arc::new(StoreStats::default());
        stats.log_bytes.store(valid as u64, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let compacting = Arc::new(AtomicBool::new(false));
        let writer = LogWriter {
            dir: dir.to_path_buf(),
            path,
            file,
            good: valid as u64,
            stats: stats.clone(),
            compacting: compacting.clone(),
        };
        std::thread::Builder::new()
            .name("crm-proxy-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io(dir))?;
        Ok((
            Store {
                wal: Some(Wal {
                    tx,
                    compacting,
                    stats,
                    _lock: lock,
                }),
            },
            recovered,
        ))
    }

    /// Queues a record for the log; the returned commit completes once it is durable. Called
    /// under the queue's lock, so the log's order is the queue's order.
    pub fn append(&self, record: &Record) -> Commit {
        let Some(wal) = &self.wal else {
            return Commit::done();
        };
        let (tx, rx) = oneshot::channel();
        let mut framed = Vec::new();
        frame(&record.encode(), &mut framed);
        match wal.tx.send(Msg::Append(framed, Some(tx))) {
            Ok(()) => Commit(Some(rx)),
            Err(_) => Commit::failed("the log writer stopped"),
        }
    }

    /// Completes once everything appended before it is durable (used at shutdown).
    pub fn sync(&self) -> Commit {
        let Some(wal) = &self.wal else {
            return Commit::done();
        };
        let (tx, rx) = oneshot::channel();
        match wal.tx.send(Msg::Append(Vec::new(), Some(tx))) {
            Ok(()) => Commit(Some(rx)),
            Err(_) => Commit::failed("the log writer stopped"),
        }
    }

    /// Whether the log has grown past `limit` bytes and beyond twice what is live.
    pub fn wants_compaction(&self, limit: u64, live_bytes: u64) -> bool {
        self.wal.as_ref().is_some_and(|w| {
            let size = w.stats.log_bytes.load(Ordering::Relaxed);
            size > limit
                && size > live_bytes.saturating_mul(2)
                && !w.compacting.load(Ordering::Relaxed)
        })
    }

    /// Replaces the log with `snapshot` (the live state); records appended after this call
    /// follow it. Called under the queue's lock.
    pub fn compact(&self, snapshot: &[Record]) {
        let Some(wal) = &self.wal else { return };
        let mut framed = Vec::new();
        for r in snapshot {
            frame(&r.encode(), &mut framed);
        }
        wal.compacting.store(true, Ordering::Relaxed);
        let _ = wal.tx.send(Msg::Compact(framed));
    }

    pub fn stats(&self) -> Option<&StoreStats> {
        self.wal.as_ref().map(|w| &*w.stats)
    }
}

/// Creates the data directory (0700) and takes an exclusive lock on it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(io(&path)(e)),
    }
}

/// Reads a data directory's log without taking it over (for the offline CLI, which must hold
/// the lock itself: see [`Store::open`]).
pub fn read_log(dir: &Path) -> Result<Recovered, StoreError> {
    let path = dir.join(LOG_FILE);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&path)(e)),
    };
    let (payloads, valid) = unframe(&data);
    let records = payloads
        .iter()
        .map(|p| Record::decode(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| StoreError::Malformed(path))?;
    Ok(Recovered {
        records: records.len(),
        entries: replay(records),
        discarded_bytes: (data.len() - valid) as u64,
    })
}

struct LogWriter {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// The log's length up to its last durable record.
    good: u64,
    stats: Arc<StoreStats>,
    compacting: Arc<AtomicBool>,
}

impl LogWriter {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            // Group commit: everything already waiting goes into this batch.
            while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
                match msg {
                    Msg::Append(bytes, waiter) => {
                        batch.extend_from_slice(&bytes);
                        waiters.extend(waiter);
                    }
                    Msg::Compact(snapshot) => {
                        self.flush(&mut batch, &mut waiters);
                        if let Err(e) = self.replace(&snapshot) {
                            tracing::error!(error = %e, "log compaction failed; the log keeps growing");
                        }
                        self.compacting.store(false, Ordering::Relaxed);
                    }
                }
                if batch.len() >= 4 << 20 {
                    break;
                }
            }
            self.flush(&mut batch, &mut waiters);
        }
    }

    /// Writes and fsyncs the batch, then answers its waiters. On failure the log is cut back to
    /// its last durable record, so later records never follow garbage.
    fn flush(
        &mut self,
        batch: &mut Vec<u8>,
        waiters: &mut Vec<oneshot::Sender<Result<(), String>>>,
    ) {
        if batch.is_empty() && waiters.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = self
            .file
            .write_all(batch)
            .and_then(|()| self.file.sync_data());
        let answer = match result {
            Ok(()) => {
                self.good += batch.len() as u64;
                self.stats.log_bytes.store(self.good, Ordering::Relaxed);
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, path = %self.path.display(), "cannot write the parked-write log");
                if let Err(t) = self.file.set_len(self.good) {
                    tracing::error!(error = %t, "cannot cut the log back to its last good record");
                }
                Err(format!("{}: {e}", self.path.display()))
            }
        };
        self.stats
            .sync_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        for w in waiters.drain(..) {
            let _ = w.send(answer.clone());
        }
        batch.clear();
    }

    /// Writes `snapshot` to a new file and renames it over the log.
    fn replace(&mut self, snapshot: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{LOG_FILE}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(snapshot)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.good = snapshot.len() as u64;
        self.stats.log_bytes.store(self.good, Ordering::Relaxed);
        tracing::info!(bytes = self.good, "compacted the parked-write log");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
