//! Catch-up of a cold replica: a ledger holding many seats is written to a real
//! nats-server, then read back from its first record into a fresh engine, as a restarted
//! broker does before it leads. Used by `tests/catch_up.rs` and `benches/catch_up.rs`.
//!
//! A failure anywhere here is a test failure, so it unwraps.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use lmbus_broker::engine::{Engine, EngineConfig};
use lmbus_broker::ledger::Ledger;
use lmbus_broker::snapshot::Snapshots;
use lmbus_schemas::{LedgerEntry, Limits, Role, SeatChange, Subjects};
use uuid::Uuid;

use crate::{Fixture, Vendor};

/// Seats per ledger entry when writing: the group-commit batch size.
pub const PER_ENTRY: usize = 1000;
pub const SEATS_PER_SLAVE: usize = 100;

pub fn engine(vendor: &Vendor, cluster: &str, seats: usize) -> Engine {
    let license = Vendor::license(
        Role::Master,
        Limits {
            total: Some(seats as u32),
            local: None,
            agent_types: Default::default(),
        },
    );
    Engine::new(EngineConfig {
        broker_id: "catch-up".into(),
        cluster: cluster.into(),
        license,
        vendor_key: vendor.public_key(),
        allow_unlicensed_slaves: true,
        missed_heartbeats: 3,
        counts_interval: Duration::from_secs(60),
        expiry_warning_days: 30,
        max_slaves: 1_000_000,
        reclaim_margin: Duration::from_secs(30),
        slave_rate_limit: 0,
        max_agents_per_slave: 0,
        forget_after: Duration::ZERO,
        allot: Default::default(),
    })
}

/// Writes `seats` grants (one session per 100 seats) in entries of 1000 changes.
pub async fn write_ledger(ledger: &mut Ledger, seats: usize) -> u64 {
    let mut changes = Vec::with_capacity(PER_ENTRY + 1);
    let mut last = 0;
    for n in 0..seats {
        let slave = format!("s{}", n / SEATS_PER_SLAVE);
        if n % SEATS_PER_SLAVE == 0 {
            changes.push(SeatChange::Session {
                slave: slave.clone(),
                instance: Uuid::new_v4(),
                license: None,
                local_limit: None,
                heartbeat_interval_ms: 1000,
                grace_ms: 120_000,
                logout_after_grace: true,
                hello_seq: 1,
                request_seq: 0,
                offline_limit: None,
            });
        }
        changes.push(SeatChange::Grant {
            slave,
            agent_id: format!("agent-{n}"),
            agent_type: "inbound".into(),
            request_seq: (n % SEATS_PER_SLAVE + 1) as u64,
            at_ms: 0,
            by: String::new(),
        });
        if changes.len() >= PER_ENTRY || n + 1 == seats {
            let entry = LedgerEntry {
                writer: "writer".into(),
                changes: std::mem::take(&mut changes),
            };
            last = ledger.append(&entry).await.unwrap();
        }
    }
    last
}

/// Reads the ledger to `last`; with an engine, applies every record (what a new leader
/// does), without one only decodes (the baseline: reading alone).
pub async fn replay(ledger: &Ledger, last: u64, mut engine: Option<&mut Engine>) -> Duration {
    let started = Instant::now();
    let mut records = ledger.follow(1).await.unwrap();
    let now = std::time::Instant::now();
    loop {
        let record = tokio::time::timeout(Duration::from_secs(30), records.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(engine) = engine.as_deref_mut()
            && record.quarantined.is_none()
        {
            for change in &record.entry.changes {
                engine.apply(now, change).unwrap();
            }
        }
        if record.sequence >= last {
            return started.elapsed();
        }
    }
}

/// What [`measure`] timed.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Reading and decoding the whole ledger, applying nothing (the baseline).
    pub read: Duration,
    /// Reading and applying the whole ledger: a cold replica without snapshots.
    pub replay: Duration,
    /// The leader copying its state for a snapshot (the pause it takes).
    pub snapshot_copy: Duration,
    /// Writing the snapshot (in a task beside the leader).
    pub snapshot_write: Duration,
    /// Reading the latest snapshot and applying it: a cold replica with snapshots (plus
    /// the records after the snapshot, none here).
    pub snapshot_load: Duration,
    pub snapshot_chunks: u32,
}

/// Writes a ledger of `seats` seats on a fresh nats-server, then times a cold replica
/// catching up with it by replaying it and by loading a snapshot of the same state.
pub async fn measure(seats: usize) -> Measured {
    let f = Fixture::new().await.unwrap();
    let subjects = Subjects::new(&f.cluster).unwrap();
    let mut ledger = Ledger::open(&f.client, &subjects, 1).await.unwrap();
    let last = write_ledger(&mut ledger, seats).await;
    let read = replay(&ledger, last, None).await;
    let mut replayed = engine(&f.vendor, &f.cluster, seats);
    let replay_took = replay(&ledger, last, Some(&mut replayed)).await;
    assert_eq!(replayed.total_in_use() as usize, seats);

    let snapshots = Snapshots::open(&f.client, &subjects, 1).await.unwrap();
    let started = Instant::now();
    let changes = replayed.snapshot(lmbus_broker::snapshot::AGENTS_PER_CHANGE);
    let snapshot_copy = started.elapsed();
    let started = Instant::now();
    let manifest = snapshots.write(last, "bench", 1, changes, 0).await.unwrap();
    let snapshot_write = started.elapsed();
    let started = Instant::now();
    let loaded = snapshots.load_latest().await.unwrap().unwrap();
    let mut restored = engine(&f.vendor, &f.cluster, seats);
    let now = std::time::Instant::now();
    for change in &loaded.changes {
        restored.apply(now, change).unwrap();
    }
    let snapshot_load = started.elapsed();
    assert_eq!(loaded.manifest.ledger_sequence, last);
    assert_eq!(restored.seats(), replayed.seats());
    Measured {
        read,
        replay: replay_took,
        snapshot_copy,
        snapshot_write,
        snapshot_load,
        snapshot_chunks: manifest.chunks,
    }
}
