#![allow(clippy::unwrap_used)]
//! How long a cold replica takes to catch up with a ledger that holds many seats: the work
//! a new leader does before it answers anyone when it was not a hot standby (a restarted
//! broker). A small size runs here; `cargo xtask bench-catchup` runs 10^5 and 10^6.

use lmbus_tests::catch_up::measure;

/// Steps: write 20,000 seats to a ledger on a real nats-server; a cold engine replays it
/// and holds exactly those seats; a snapshot of that state (several chunks) read back into
/// another cold engine holds the same seats (both checked inside `measure`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_replica_catches_up_from_the_ledger_or_a_snapshot() {
    let m = measure(20_000).await;
    eprintln!("measured: 20,000 seats: {m:?}");
    assert!(m.snapshot_chunks > 0);
}

/// Steps: on a real nats-server, write a snapshot; a second writer that did not see it
/// (fenced on "no manifest yet") is refused; one that saw it succeeds, becomes the latest,
/// and the first snapshot's chunks and manifest are purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_manifests_are_fenced_and_older_snapshots_purged() {
    use lmbus_broker::snapshot::Snapshots;
    use lmbus_schemas::{SeatChange, Subjects};
    let f = lmbus_tests::Fixture::new().await.unwrap();
    let subjects = Subjects::new(&f.cluster).unwrap();
    let snapshots = Snapshots::open(&f.client, &subjects, 1).await.unwrap();
    assert!(snapshots.latest().await.unwrap().is_none());
    let state = |n: usize| {
        vec![
            SeatChange::Session {
                slave: "s1".into(),
                instance: uuid::Uuid::new_v4(),
                license: None,
                local_limit: None,
                heartbeat_interval_ms: 1000,
                grace_ms: 120_000,
                logout_after_grace: true,
                hello_seq: 1,
                request_seq: 0,
                offline_limit: None,
            },
            SeatChange::Seats {
                slave: "s1".into(),
                agent_type: "inbound".into(),
                agent_ids: (0..n).map(|i| format!("agent-{i}")).collect(),
                request_seqs: Vec::new(),
                since_ms: Vec::new(),
                granted_by: Vec::new(),
            },
        ]
    };
    let first = snapshots.write(10, "b1", 1, state(3), 0).await.unwrap();
    let (_, stored) = snapshots.latest_stored().await.unwrap().unwrap();
    let stale = snapshots.write(20, "b2", 2, state(4), 0).await;
    assert!(
        stale.is_err(),
        "a writer that did not see the latest snapshot must be refused"
    );
    let second = snapshots
        .write(30, "b2", 2, state(5), stored)
        .await
        .unwrap();
    let loaded = snapshots.load_latest().await.unwrap().unwrap();
    assert_eq!(loaded.manifest, second);
    assert!(
        matches!(&loaded.changes[1], SeatChange::Seats { agent_ids, .. } if agent_ids.len() == 5),
        "{:?}",
        loaded.changes
    );
    let js = async_nats::jetstream::new(f.client.clone());
    let info = js
        .get_stream(subjects.snapshot_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert!(info.state.first_sequence >= second.first_chunk);
    assert!(first.first_chunk < second.first_chunk);
    assert!(
        snapshots.read(&first).await.is_err(),
        "the first snapshot was purged"
    );
}
