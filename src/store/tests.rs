use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::status::FailReason;
use bytes::Bytes;

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
    let dir = tempfile::tempdir().unwrap();
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
    assert_eq!(mode(&data.join(LOCK_FILE)), 0o600);
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
    let dir = tempfile::tempdir().unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let (_store, _) = Store::open(dir.path()).unwrap();
    match Store::open(dir.path()) {
        Err(StoreError::Locked(p)) => assert_eq!(p, dir.path()),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
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
    let dir = tempfile::tempdir().unwrap();
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
