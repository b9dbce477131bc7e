//! The grant log: the quota grants of this process (quota name and time), appended in batches
//! without waiting for their fsync, so a restart knows what the windows still open had spent (a
//! daily allowance the CRM never reports, say). Framed and checked like the parked-write log; a
//! torn tail is cut, and the log is rewritten to what the open windows still count once it grows.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::StoreError;
use super::codec::{Malformed, Reader, Writer, frame, parse};
use super::dir::{open_file, replace_file};

/// The grant log's file name in the data directory.
pub const GRANT_LOG_FILE: &str = "grants.log";

/// Grants of one quota at one time: the quota's name, the time they were charged (nanoseconds
/// since the Unix epoch) and how many.
pub type LoggedGrant = (String, u64, u32);

/// The grant log of one data directory (whose lock the parked-write store holds).
pub struct GrantLog {
    dir: PathBuf,
    /// The file, and the next batch's sequence number.
    file: Mutex<(File, u64)>,
}

fn encode(seq: u64, grants: &[LoggedGrant]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(grants.len() as u32);
    for (quota, at, count) in grants {
        w.str(quota).u64(*at).u32(*count);
    }
    let mut framed = Vec::new();
    frame(seq, &w.0, &mut framed);
    framed
}

fn decode(payload: &[u8]) -> Result<Vec<LoggedGrant>, Malformed> {
    let mut r = Reader::new(payload);
    let n = r.u32()?;
    (0..n)
        .map(|_| Ok((r.str()?.to_string(), r.u64()?, r.u32()?)))
        .collect()
}

impl GrantLog {
    /// Opens (creating, 0600) the grant log of `dir` and reads what it holds: damaged batches
    /// are skipped (a few grants forgotten, never a refusal to start), a torn tail is cut.
    pub fn open(dir: &Path) -> Result<(GrantLog, Vec<LoggedGrant>), StoreError> {
        let path = dir.join(GRANT_LOG_FILE);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut file = open_file(&path, true, true)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io)?;
        let parsed = parse(&data);
        let mut grants = Vec::new();
        let mut skipped = parsed.damaged.len();
        for &(_, payload, _) in &parsed.records {
            match decode(payload) {
                Ok(g) => grants.extend(g),
                Err(_) => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                path = %path.display(),
                skipped,
                "damaged batches in the grant log were skipped: the grants in them are forgotten"
            );
        }
        let next = parsed.last_seq() + 1;
        if parsed.legacy || skipped > 0 {
            file = replace_file(dir, GRANT_LOG_FILE, &encode(1, &grants)).map_err(io)?;
        } else if parsed.end < data.len() {
            file.set_len(parsed.end as u64).map_err(io)?;
        }
        Ok((
            GrantLog {
                dir: dir.to_path_buf(),
                file: Mutex::new((file, next.max(2))),
            },
            grants,
        ))
    }

    /// Appends grants and syncs them; returns the log's size after. (Called off the request
    /// path: nothing waits for it.)
    pub fn append(&self, grants: &[LoggedGrant]) -> std::io::Result<u64> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, seq) = &mut *guard;
        if !grants.is_empty() {
            file.write_all(&encode(*seq, grants))?;
            *seq += 1;
            file.sync_data()?;
        }
        Ok(file.metadata()?.len())
    }

    /// The log's size in bytes.
    pub fn size(&self) -> u64 {
        let guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.metadata().map_or(0, |m| m.len())
    }

    /// Replaces the log with `grants` (what the open windows still count): a new file, synced,
    /// renamed over the old one.
    pub fn rewrite(&self, grants: &[LoggedGrant]) -> std::io::Result<()> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, seq) = &mut *guard;
        *file = replace_file(&self.dir, GRANT_LOG_FILE, &encode(*seq, grants))?;
        *seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_come_back_after_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (log, found) = GrantLog::open(dir.path()).unwrap();
        assert!(found.is_empty());
        log.append(&[("daily".into(), 1, 1), ("minute".into(), 2, 5)])
            .unwrap();
        log.append(&[("daily".into(), 3, 1)]).unwrap();
        drop(log);
        // A torn last batch (a crash mid-write) is cut; the batches before it stay.
        let path = dir.path().join(GRANT_LOG_FILE);
        let mut data = std::fs::read(&path).unwrap();
        data.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        std::fs::write(&path, &data).unwrap();
        let (log, found) = GrantLog::open(dir.path()).unwrap();
        assert_eq!(
            found,
            vec![
                ("daily".to_string(), 1, 1),
                ("minute".to_string(), 2, 5),
                ("daily".to_string(), 3, 1)
            ]
        );
        log.rewrite(&[("daily".into(), 3, 1)]).unwrap();
        log.append(&[("daily".into(), 4, 1)]).unwrap();
        drop(log);
        let (_, found) = GrantLog::open(dir.path()).unwrap();
        assert_eq!(
            found,
            vec![("daily".to_string(), 3, 1), ("daily".to_string(), 4, 1)]
        );
    }
}
