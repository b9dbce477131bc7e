//! Durability of parked writes: a write-ahead log in a data directory (or nothing, for the memory
//! store), written by one thread that commits in groups: one fsync for every record that arrived
//! while the previous batch was being written.

pub mod codec;
mod dir;
mod grants;
mod record;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use tokio::sync::oneshot;

use codec::{Parsed, frame, parse};
use dir::replace_file;
pub use grants::{GRANT_LOG_FILE, GrantLog, LoggedGrant};
pub use record::{Quarantined, Record, Recovered, RecoveredState, Stored, StoredResponse, replay};

/// The log's file name in the data directory.
pub const LOG_FILE: &str = "queue.log";

/// Where damaged log bytes are moved, in the data directory.
pub const QUARANTINE_FILE: &str = "queue.log.quarantine";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {0} is in use by another crm-quota-proxy process")]
    Locked(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} {why}; refusing to keep parked writes there ({fix})")]
    Unsafe {
        path: PathBuf,
        why: String,
        fix: String,
    },
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
#[derive(Debug)]
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
    /// The next record's sequence number (records only ever get higher ones).
    seq: AtomicU64,
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
    /// log and starts the writer thread. Damaged records are moved to [`QUARANTINE_FILE`] and
    /// the log rewritten without them; a torn tail is cut; a log of the earlier format is
    /// rewritten in the current one.
    pub fn open(dir: &Path) -> Result<(Store, Recovered), StoreError> {
        let lock = dir::lock(dir)?;
        let path = dir.join(LOG_FILE);
        let _ = std::fs::remove_file(dir.join(format!("{LOG_FILE}.tmp")));
        let mut file = dir::open_file(&path, true, true)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io(&path))?;
        let parsed = parse(&data);
        let read = read_records(&parsed);
        let next_seq = parsed.last_seq() + 1;
        let tail = (data.len() - parsed.end) as u64;
        if !read.quarantined.is_empty() {
            quarantine(dir, &data, &read.quarantined).map_err(io(&dir.join(QUARANTINE_FILE)))?;
        }
        let good = if parsed.legacy || !read.quarantined.is_empty() {
            let mut clean = Vec::new();
            for (seq, payload) in &read.payloads {
                frame(*seq, payload, &mut clean);
            }
            file = replace_file(dir, LOG_FILE, &clean).map_err(io(&path))?;
            clean.len() as u64
        } else {
            if tail > 0 {
                file.set_len(parsed.end as u64).map_err(io(&path))?;
                file.sync_all().map_err(io(&path))?;
            }
            parsed.end as u64
        };
        let recovered = Recovered {
            records: read.records.len(),
            entries: replay(read.records),
            discarded_bytes: tail,
            quarantined: read.quarantined,
            upgraded: parsed.legacy,
        };
        let stats = Arc::new(StoreStats::default());
        stats.log_bytes.store(good, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let compacting = Arc::new(AtomicBool::new(false));
        let writer = LogWriter {
            dir: dir.to_path_buf(),
            path,
            file,
            good,
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
                    seq: AtomicU64::new(next_seq),
                    compacting,
                    stats,
                    _lock: lock,
                }),
            },
            recovered,
        ))
    }

    /// Whether a data directory can be used: created (0700) when missing, trusted, and
    /// writable (a file is created and removed). For `check --runtime`; takes no lock.
    pub fn check_dir(dir: &Path) -> Result<(), StoreError> {
        dir::ensure(dir)?;
        let probe = dir.join(".check");
        let _ = std::fs::remove_file(&probe);
        dir::open_file(&probe, false, true)?;
        std::fs::remove_file(&probe).map_err(io(&probe))
    }

    /// Reads a data directory's log without changing anything (no lock, no cut, no
    /// quarantine): what a stopped or running proxy has parked, for the operator's tools.
    pub fn inspect(dir: &Path) -> Result<Recovered, StoreError> {
        let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
        dir::check(dir, &meta, true)?;
        let path = dir.join(LOG_FILE);
        let mut data = Vec::new();
        match dir::open_file(&path, true, false) {
            Ok(mut f) => {
                f.read_to_end(&mut data).map_err(io(&path))?;
            }
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => return Err(e),
        }
        let parsed = parse(&data);
        let read = read_records(&parsed);
        Ok(Recovered {
            records: read.records.len(),
            entries: replay(read.records),
            discarded_bytes: (data.len() - parsed.end) as u64,
            quarantined: read.quarantined,
            upgraded: false,
        })
    }

    /// Queues a record for the log; the returned commit completes once it is durable. Called
    /// under the queue's lock, so the log's order is the queue's order.
    pub fn append(&self, record: &Record) -> Commit {
        let Some(wal) = &self.wal else {
            return Commit::done();
        };
        let (tx, rx) = oneshot::channel();
        let mut framed = Vec::new();
        frame(
            wal.seq.fetch_add(1, Ordering::Relaxed),
            &record.encode(),
            &mut framed,
        );
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
            frame(
                wal.seq.fetch_add(1, Ordering::Relaxed),
                &r.encode(),
                &mut framed,
            );
        }
        wal.compacting.store(true, Ordering::Relaxed);
        let _ = wal.tx.send(Msg::Compact(framed));
    }

    pub fn stats(&self) -> Option<&StoreStats> {
        self.wal.as_ref().map(|w| &*w.stats)
    }
}

/// The records a parsed log holds, and what could not be read between them.
struct LogRead<'a> {
    records: Vec<Record>,
    /// The good records' sequence numbers and payloads (to rewrite the log with).
    payloads: Vec<(u64, &'a [u8])>,
    quarantined: Vec<Quarantined>,
}

/// Decodes every good record; damaged ranges and records this version cannot decode are
/// quarantined, each with the ids of the readable records around it.
fn read_records<'a>(parsed: &Parsed<'a>) -> LogRead<'a> {
    let mut out = LogRead {
        records: Vec::new(),
        payloads: Vec::new(),
        quarantined: Vec::new(),
    };
    let mut bad: Vec<std::ops::Range<usize>> = parsed.damaged.clone();
    for &(seq, payload, at) in &parsed.records {
        match Record::decode(payload) {
            Ok(r) => {
                out.records.push(r);
                out.payloads.push((seq, payload));
            }
            Err(_) => bad.push(at..at + codec::HEADER + payload.len()),
        }
    }
    bad.sort_by_key(|r| r.start);
    let id_near = |range: &std::ops::Range<usize>, before: bool| {
        let found = if before {
            parsed.records.iter().rev().find(|r| r.2 < range.start)
        } else {
            parsed.records.iter().find(|r| r.2 >= range.end)
        };
        found.and_then(|r| Record::id_of(r.1))
    };
    for range in bad {
        out.quarantined.push(Quarantined {
            offset: range.start as u64,
            bytes: (range.end - range.start) as u64,
            after: id_near(&range, true),
            before: id_near(&range, false),
        });
    }
    out
}

/// Appends the damaged ranges of `data` to the quarantine file (0600), each after a line that
/// says where it was and between which records, and syncs it.
fn quarantine(dir: &Path, data: &[u8], ranges: &[Quarantined]) -> std::io::Result<()> {
    let path = dir.join(QUARANTINE_FILE);
    let mut f = dir::open_file(&path, false, true).map_err(std::io::Error::other)?;
    let id = |i: Option<u128>| i.map_or("none".to_string(), |i| format!("{i:032x}"));
    for q in ranges {
        let (from, to) = (q.offset as usize, (q.offset + q.bytes) as usize);
        writeln!(
            f,
            "# crm-quota-proxy quarantine: {LOG_FILE} bytes {from}..{to}, after record {} and before record {}",
            id(q.after),
            id(q.before)
        )?;
        f.write_all(&data[from..to])?;
        writeln!(f)?;
    }
    f.sync_all()
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
        self.file = replace_file(&self.dir, LOG_FILE, snapshot)?;
        self.good = snapshot.len() as u64;
        self.stats.log_bytes.store(self.good, Ordering::Relaxed);
        tracing::info!(bytes = self.good, "compacted the parked-write log");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
