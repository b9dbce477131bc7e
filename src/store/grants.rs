//! The grant log: the quota grants of this process (quota name and time), appended in batches
//! without waiting for their fsync, so a restart knows what the windows still open had spent (a
//! daily allowance the CRM never reports, say). Framed and checked like the parked-write log; a
//! torn tail is cut, and the log is rewritten to what the open windows still count once it grows.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::codec::{Malformed, Reader, Writer, frame, unframe};
use super::{StoreError, replace_file};

/// The grant log's file name in the data directory.
pub const GRANT_LOG_FILE: &str = "grants.log";

/// Grants of one quota at one time: the quota's name, the time they were charged (nanoseconds
/// since the Unix epoch) and how many.
pub type LoggedGrant = (String, u64, u32);

/// The grant log of one data directory (whose lock the parked-write store holds).
pub struct GrantLog {
    dir: PathBuf,
    file: Mutex<File>,
}

fn encode(grants: &[LoggedGrant]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(grants.len() as u32);
    for (quota, at, count) in grants {
        w.str(quota).u64(*at).u32(*count);
    }
    let mut framed = Vec::new();
    frame(&w.0, &mut framed);
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
    /// Opens (creating, 0600) the grant log of `dir` and reads what it holds; a torn or corrupt
    /// tail is cut off.
    pub fn open(dir: &Path) -> Result<(GrantLog, Vec<LoggedGrant>), StoreError> {
        let path = dir.join(GRANT_LOG_FILE);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io)?;
        let (payloads, valid) = unframe(&data);
        let mut grants = Vec::new();
        for p in payloads {
            grants.extend(decode(p).map_err(|_| StoreError::Malformed(path.clone()))?);
        }
        if valid < data.len() {
            file.set_len(valid as u64).map_err(io)?;
        }
        Ok((
            GrantLog {
                dir: dir.to_path_buf(),
                file: Mutex::new(file),
            },
            grants,
        ))
    }

    /// Appends grants and syncs them; returns the log's size after. (Called off the request
    /// path: nothing waits for it.)
    pub fn append(&self, grants: &[LoggedGrant]) -> std::io::Result<u64> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if !grants.is_empty() {
            file.write_all(&encode(grants))?;
            file.sync_data()?;
        }
        Ok(file.metadata()?.len())
    }

    /// The log's size in bytes.
    pub fn size(&self) -> u64 {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.metadata().map_or(0, |m| m.len())
    }

    /// Replaces the log with `grants` (what the open windows still count): a new file, synced,
    /// renamed over the old one.
    pub fn rewrite(&self, grants: &[LoggedGrant]) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        *file = replace_file(&self.dir, GRANT_LOG_FILE, &encode(grants))?;
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
