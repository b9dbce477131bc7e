//! Durability of parked writes: a write-ahead log in a data directory (or nothing, for the memory
//! store), written by one thread that commits in groups: one fsync for every record that arrived
//! while the previous batch was being written.

pub mod codec;
mod grants;
mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use tokio::sync::oneshot;

use codec::{frame, unframe};
pub use grants::{GRANT_LOG_FILE, GrantLog, LoggedGrant};
pub use record::{Record, Recovered, RecoveredState, Stored, StoredResponse, replay};

/// The log's file name in the data directory.
pub const LOG_FILE: &str = "queue.log";
const LOCK_FILE: &str = "LOCK";

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

/// Replaces `dir/name` with `contents` as one step a crash cannot tear: a new file (0600),
/// synced, renamed over the old one, the directory synced. Returns the new file, for appending.
fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<File> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    OpenOptions::new().append(true).open(&path)
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
