use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::status::FailReason;
use bytes::Bytes;

/// A data directory the store creates itself (0700), inside a temporary one.
struct DataDir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl DataDir {
    fn path(&self) -> &Path {
        &self.path
    }
}

fn data_dir() -> DataDir {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("data");
    DataDir { _tmp: tmp, path }
}

fn stored(id: u128, seq: u64) -> Stored {
    Stored {
        id,
        seq,
        route: "ticket-create".into(),
        client: "default".into(),
        method: "POST".into(),
        path_and_query: "/api/v2/tickets.json?x=1".into(),
        headers: vec![
            ("authorization".into(), b"Bearer t".to_vec()),
            ("idempotency-key".into(), b"k1".to_vec()),
        ],
        body: Bytes::from_static(b"{\"ticket\":{}}"),
        resource: Some("/api/v2/tickets/1.json".into()),
        keys: vec![("per-ticket".into(), "1".into())],
        fingerprint: [7; 16],
        created_at: 1,
        expires_at: 2,
        not_before: 3,
        attempts: 0,
    }
}

fn every_kind() -> Vec<Record> {
    vec![
        Record::Accepted(Box::new(stored(1, 1))),
        Record::Dispatching { id: 1, attempt: 1 },
        Record::Requeued {
            id: 1,
            attempts: 1,
            not_before: 9,
        },
        Record::Done {
            id: 1,
            at: 10,
            response: StoredResponse {
                status: 201,
                headers: vec![("location".into(), b"/x".to_vec())],
                body: Bytes::from_static(b"{}"),
            },
        },
        Record::Failed {
            id: 2,
            at: 11,
            reason: FailReason::Ambiguous,
            error: "boom".into(),
        },
        Record::Expired { id: 3, at: 12 },
        Record::Retried {
            id: 3,
            at: 13,
            expires_at: 99,
        },
        Record::Removed { id: 4 },
    ]
}

#[test]
fn every_record_kind_round_trips() {
    for r in every_kind() {
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
    }
    assert!(Record::decode(&[99; 20]).is_err());
    assert!(Record::decode(&[1, 2, 3]).is_err());
}

#[test]
fn replay_ends_each_write_in_its_last_state() {
    let records = vec![
        Record::Accepted(Box::new(stored(1, 1))),
        Record::Accepted(Box::new(stored(2, 2))),
        Record::Accepted(Box::new(stored(3, 3))),
        Record::Accepted(Box::new(stored(4, 4))),
        Record::Dispatching { id: 1, attempt: 1 },
        Record::Dispatching { id: 2, attempt: 1 },
        Record::Requeued {
            id: 2,
            attempts: 1,
            not_before: 50,
        },
        Record::Expired { id: 3, at: 60 },
        Record::Retried {
            id: 3,
            at: 70,
            expires_at: 170,
        },
        Record::Removed { id: 4 },
        Record::Done {
            id: 9,
            at: 1,
            response: StoredResponse {
                status: 200,
                headers: vec![],
                body: Bytes::new(),
            },
        },
    ];
    let out = replay(records);
    let ids: Vec<u128> = out.iter().map(|(s, _)| s.id).collect();
    assert_eq!(
        ids,
        vec![1, 2, 3],
        "arrival order; removed and unknown ids are gone"
    );
    assert_eq!(
        out[0].1,
        RecoveredState::InFlight {
            attempt: 1,
            batch: false
        }
    );
    assert_eq!(
        (out[1].1.clone(), out[1].0.not_before),
        (RecoveredState::Queued, 50)
    );
    assert_eq!(
        (out[2].1.clone(), out[2].0.attempts, out[2].0.expires_at),
        (RecoveredState::Queued, 0, 170)
    );
}

#[tokio::test]
async fn records_survive_a_reopen_and_the_directory_is_private() {
    let dir = data_dir();
    let data = dir.path().join("data");
    {
        let (store, recovered) = Store::open(&data).unwrap();
        assert_eq!(recovered.records, 0);
        store
            .append(&Record::Accepted(Box::new(stored(1, 1))))
            .durable()
            .await
            .unwrap();
        store
            .append(&Record::Dispatching { id: 1, attempt: 1 })
            .durable()
            .await
            .unwrap();
    }
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join(LOG_FILE)), 0o600);
    assert_eq!(mode(&data.join("LOCK")), 0o600);
    let (_store, recovered) = Store::open(&data).unwrap();
    assert_eq!(recovered.records, 2);
    assert_eq!(
        recovered.entries[0].1,
        RecoveredState::InFlight {
            attempt: 1,
            batch: false
        }
    );
}

#[tokio::test]
async fn a_torn_tail_is_cut_off_and_reported() {
    let dir = data_dir();
    {
        let (store, _) = Store::open(dir.path()).unwrap();
        for i in 0..3 {
            store
                .append(&Record::Accepted(Box::new(stored(i, i as u64))))
                .durable()
                .await
                .unwrap();
        }
    }
    // A crash in the middle of writing the fourth record.
    let path = dir.path().join(LOG_FILE);
    let mut partial = Vec::new();
    frame(
        4,
        &Record::Accepted(Box::new(stored(3, 3))).encode(),
        &mut partial,
    );
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(&partial[..partial.len() / 2]).unwrap();
    drop(f);
    let before = fs::metadata(&path).unwrap().len();
    let (store, recovered) = Store::open(dir.path()).unwrap();
    assert_eq!(recovered.entries.len(), 3);
    assert_eq!(recovered.discarded_bytes, (partial.len() / 2) as u64);
    assert!(
        fs::metadata(&path).unwrap().len() < before,
        "the torn bytes were cut off"
    );
    // New records follow the good prefix, not the garbage.
    store
        .append(&Record::Removed { id: 0 })
        .durable()
        .await
        .unwrap();
    drop(store);
    let (_, recovered) = Store::open(dir.path()).unwrap();
    assert_eq!((recovered.entries.len(), recovered.discarded_bytes), (2, 0));
}

#[test]
fn a_second_process_cannot_open_a_directory_in_use() {
    let dir = data_dir();
    let (_store, _) = Store::open(dir.path()).unwrap();
    match Store::open(dir.path()) {
        Err(StoreError::Locked(p)) => assert_eq!(p, dir.path()),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn concurrent_appends_share_fsyncs() {
    let dir = data_dir();
    let (store, _) = Store::open(dir.path()).unwrap();
    let commits: Vec<Commit> = (0..500u128)
        .map(|i| store.append(&Record::Accepted(Box::new(stored(i, i as u64)))))
        .collect();
    for c in commits {
        c.durable().await.unwrap();
    }
    let syncs = store.stats().unwrap().commits.load(Ordering::Relaxed);
    assert!(syncs < 500, "500 records took {syncs} fsyncs");
}

#[tokio::test]
async fn compaction_keeps_exactly_the_snapshot_and_what_follows() {
    let dir = data_dir();
    let (store, _) = Store::open(dir.path()).unwrap();
    for i in 0..50u128 {
        store.append(&Record::Accepted(Box::new(stored(i, i as u64))));
        store.append(&Record::Removed { id: i });
    }
    store.append(&Record::Accepted(Box::new(stored(100, 100))));
    store.compact(&[Record::Accepted(Box::new(stored(100, 100)))]);
    store
        .append(&Record::Dispatching {
            id: 100,
            attempt: 1,
        })
        .durable()
        .await
        .unwrap();
    drop(store);
    let (_, recovered) = Store::open(dir.path()).unwrap();
    assert_eq!(recovered.records, 2);
    assert_eq!(
        recovered.entries[0].1,
        RecoveredState::InFlight {
            attempt: 1,
            batch: false
        }
    );
}

/// A log of `n` parked writes (ids 0..n), and where each record starts and ends.
async fn small_log(dir: &Path, n: u128) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
    {
        let (store, _) = Store::open(dir).unwrap();
        for i in 0..n {
            store
                .append(&Record::Accepted(Box::new(stored(i, i as u64))))
                .durable()
                .await
                .unwrap();
        }
    }
    let data = fs::read(dir.join(LOG_FILE)).unwrap();
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
        ranges.push(at..at + codec::HEADER + len);
        at += codec::HEADER + len;
    }
    (data, ranges)
}

fn ids(r: &Recovered) -> Vec<u128> {
    r.entries.iter().map(|(s, _)| s.id).collect()
}

#[tokio::test]
async fn a_flipped_byte_anywhere_loses_only_the_record_it_touches() {
    let dir = data_dir();
    let (data, ranges) = small_log(dir.path(), 6).await;
    let path = dir.path().join(LOG_FILE);
    for offset in 0..data.len() {
        let mut bad = data.clone();
        bad[offset] ^= 0x5A;
        fs::write(&path, &bad).unwrap();
        let hit = ranges.iter().position(|r| r.contains(&offset)).unwrap() as u128;
        let r = Store::inspect(dir.path()).unwrap();
        let expected: Vec<u128> = (0..6).filter(|&i| i != hit).collect();
        assert_eq!(ids(&r), expected, "flip at {offset}");
        if hit < 5 {
            assert_eq!(r.quarantined.len(), 1, "flip at {offset}");
            assert_eq!(r.quarantined[0].offset as usize, ranges[hit as usize].start);
        } else {
            assert_eq!(
                r.discarded_bytes as usize,
                ranges[5].len(),
                "the last one is a tail"
            );
        }
        assert_eq!(fs::read(&path).unwrap(), bad, "inspection changes nothing");
    }
    assert!(!dir.path().join(QUARANTINE_FILE).exists());
}

#[tokio::test]
async fn opening_a_damaged_log_quarantines_the_damage_and_keeps_the_rest() {
    let dir = data_dir();
    let (data, ranges) = small_log(dir.path(), 6).await;
    let path = dir.path().join(LOG_FILE);
    let mut bad = data.clone();
    bad[ranges[2].start + 30] ^= 0xFF;
    fs::write(&path, &bad).unwrap();
    let (store, r) = Store::open(dir.path()).unwrap();
    assert_eq!(ids(&r), vec![0, 1, 3, 4, 5]);
    assert_eq!(
        r.quarantined,
        vec![Quarantined {
            offset: ranges[2].start as u64,
            bytes: ranges[2].len() as u64,
            after: Some(1),
            before: Some(3),
        }]
    );
    let q = fs::read(dir.path().join(QUARANTINE_FILE)).unwrap();
    assert!(q.ends_with(&[&bad[ranges[2].clone()], &b"\n"[..]].concat()));
    let mode = fs::metadata(dir.path().join(QUARANTINE_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The log was rewritten clean, and new records follow.
    store
        .append(&Record::Removed { id: 0 })
        .durable()
        .await
        .unwrap();
    drop(store);
    let (_, r) = Store::open(dir.path()).unwrap();
    assert_eq!(ids(&r), vec![1, 3, 4, 5]);
    assert!(r.quarantined.is_empty());
}

#[tokio::test]
async fn truncation_at_any_offset_keeps_every_whole_record() {
    let dir = data_dir();
    let (data, ranges) = small_log(dir.path(), 4).await;
    let path = dir.path().join(LOG_FILE);
    for cut in 0..=data.len() {
        fs::write(&path, &data[..cut]).unwrap();
        let whole = ranges.iter().filter(|r| r.end <= cut).count() as u128;
        let r = Store::inspect(dir.path()).unwrap();
        assert_eq!(ids(&r), (0..whole).collect::<Vec<_>>(), "cut at {cut}");
        assert!(
            r.quarantined.is_empty(),
            "a tail is no damage (cut at {cut})"
        );
    }
}

#[tokio::test]
async fn zeros_at_the_tail_start_cleanly() {
    let dir = data_dir();
    let (data, _) = small_log(dir.path(), 3).await;
    let path = dir.path().join(LOG_FILE);
    for zeros in [8, 4096] {
        let mut padded = data.clone();
        padded.extend(std::iter::repeat_n(0u8, zeros));
        fs::write(&path, &padded).unwrap();
        let (_store, r) = Store::open(dir.path()).unwrap();
        assert_eq!(ids(&r), vec![0, 1, 2]);
        assert_eq!(r.discarded_bytes as usize, zeros);
        assert!(r.quarantined.is_empty());
    }
}

#[tokio::test]
async fn duplicated_and_swapped_records_are_read_once_in_order() {
    let dir = data_dir();
    let (data, ranges) = small_log(dir.path(), 5).await;
    let path = dir.path().join(LOG_FILE);
    // Record 2 written twice.
    let mut dup = data.clone();
    dup.splice(
        ranges[3].start..ranges[3].start,
        data[ranges[2].clone()].to_vec(),
    );
    fs::write(&path, &dup).unwrap();
    let r = Store::inspect(dir.path()).unwrap();
    assert_eq!(ids(&r), vec![0, 1, 2, 3, 4]);
    assert_eq!(r.quarantined.len(), 1);
    // Records 2 and 3 swapped: the later-numbered one stays, the other is out of order.
    let mut swapped = data[..ranges[2].start].to_vec();
    swapped.extend_from_slice(&data[ranges[3].clone()]);
    swapped.extend_from_slice(&data[ranges[2].clone()]);
    swapped.extend_from_slice(&data[ranges[4].clone()]);
    fs::write(&path, &swapped).unwrap();
    let r = Store::inspect(dir.path()).unwrap();
    assert_eq!(ids(&r), vec![0, 1, 3, 4]);
}

#[tokio::test]
async fn a_log_of_the_earlier_format_is_read_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let mut old = Vec::new();
    for i in 0..3u128 {
        let p = Record::Accepted(Box::new(stored(i, i as u64))).encode();
        old.extend_from_slice(&(p.len() as u32).to_le_bytes());
        old.extend_from_slice(&codec::crc32c(&p).to_le_bytes());
        old.extend_from_slice(&p);
    }
    fs::create_dir(dir.path().join("d")).unwrap();
    fs::set_permissions(dir.path().join("d"), fs::Permissions::from_mode(0o700)).unwrap();
    let d = dir.path().join("d");
    let path = d.join(LOG_FILE);
    fs::write(&path, &old).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let (_store, r) = Store::open(&d).unwrap();
    assert!(r.upgraded);
    assert_eq!(ids(&r), vec![0, 1, 2]);
    assert!(fs::read(&path).unwrap().starts_with(&codec::MAGIC));
}

#[test]
fn an_untrusted_data_directory_is_refused_with_its_reason() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let refused = |p: &Path| match Store::open(p) {
        Err(e @ StoreError::Unsafe { .. }) => e.to_string(),
        other => panic!("{} was trusted: {:?}", p.display(), other.map(|_| ())),
    };
    let why = refused(&open);
    assert!(
        why.contains("mode 777") && why.contains("chmod 700"),
        "{why}"
    );
    let link = dir.path().join("link");
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    symlink(&real, &link).unwrap();
    assert!(refused(&link).contains("symbolic link"));
    // A planted log symlink is never followed (its target untouched).
    let victim = dir.path().join("victim");
    fs::write(&victim, b"someone else's file").unwrap();
    symlink(&victim, real.join(LOG_FILE)).unwrap();
    assert!(refused(&real).contains("symbolic link"));
    assert_eq!(fs::read(&victim).unwrap(), b"someone else's file");
    // A log open to others is refused too.
    fs::remove_file(real.join(LOG_FILE)).unwrap();
    fs::write(real.join(LOG_FILE), b"").unwrap();
    fs::set_permissions(real.join(LOG_FILE), fs::Permissions::from_mode(0o666)).unwrap();
    assert!(refused(&real).contains("chmod 600"));
    // A file where the directory should be.
    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(refused(&file).contains("not a directory"));
}
