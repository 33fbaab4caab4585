//! The seat ledger's records: every change to the master's seat state, in the order the
//! leader decided it. A standby (or a restarted master) that applies the same records in
//! order reaches the same seat state. Written to the ledger stream before the slave gets
//! its reply.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A license's offline limit (`sync_within_days`) as a slave's session records it: new
/// seats stop once that many days have passed since the installation's last vendor sync,
/// or since the start of the license's issue day before any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineLimit {
    pub within_days: u32,
    /// The license's issue day (Unix milliseconds at its start).
    pub issued_ms: u64,
}

/// One change to the seat state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeatChange {
    /// A slave's hello was accepted on these terms (before any grant it implies).
    Session {
        slave: String,
        instance: Uuid,
        #[serde(default)]
        license: Option<Uuid>,
        #[serde(default)]
        local_limit: Option<u32>,
        heartbeat_interval_ms: u64,
        #[serde(default)]
        grace_ms: u64,
        #[serde(default)]
        logout_after_grace: bool,
        #[serde(default)]
        hello_seq: u64,
        /// The highest request `seq` of this instance the master has processed (written
        /// by snapshots; 0 in a hello's record). A new leader refuses numbers up to it.
        #[serde(default)]
        request_seq: u64,
        /// The slave license's offline limit, if it carries one (absent from an older
        /// leader: none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offline_limit: Option<OfflineLimit>,
    },
    Grant {
        slave: String,
        agent_id: String,
        agent_type: String,
        /// The `seq` of the registration that took it; 0 for grants at a hello.
        #[serde(default)]
        request_seq: u64,
        /// When the leader granted it (its wall clock, Unix milliseconds; 0 from an older
        /// leader): every replica takes the seat's "since" from here, never from its own
        /// clock at replay, so they all agree.
        #[serde(default)]
        at_ms: u64,
        /// The replica that granted it (the leader then).
        #[serde(default)]
        by: String,
    },
    /// The slave holds seats of `agent_type` for all these agents: many grants in one
    /// change. Snapshots are written with it.
    Seats {
        slave: String,
        agent_type: String,
        agent_ids: Vec<String>,
        /// The request number that granted each seat, in `agent_ids` order (empty from an
        /// older snapshot: 0 for each).
        #[serde(default)]
        request_seqs: Vec<u64>,
        /// When each seat was granted (Unix milliseconds), in `agent_ids` order (empty from
        /// an older snapshot: unknown).
        #[serde(default)]
        since_ms: Vec<u64>,
        /// The replica that granted each seat, in `agent_ids` order (empty: unknown).
        #[serde(default)]
        granted_by: Vec<String>,
    },
    Release {
        slave: String,
        agent_id: String,
    },
    /// A registration numbered `request_seq` found this seat already held and was approved
    /// with it: from here the seat counts as granted by that request, so a hello built
    /// before the request (which cannot list the agent) keeps the seat instead of releasing
    /// it under the host the approval reached.
    Confirm {
        slave: String,
        agent_id: String,
        request_seq: u64,
    },
    /// Every seat of a silent slave was reclaimed under the timing rule.
    Reclaim {
        slave: String,
    },
    /// An operator released these agents; the slave may not claim them back at hello.
    Revoke {
        slave: String,
        agents: Vec<String>,
    },
    /// An operator reloaded the master license: its signed text, verbatim. Every replica
    /// verifies it and uses its limits from this record on.
    License {
        text: String,
    },
    /// A replica became leader: written before it answers anyone, so a deposed leader's
    /// next append (fenced on the sequence it last saw) is refused.
    Leader {
        replica: String,
        term: u64,
        /// The context of the leader's master license: one ledger serves one context, and a
        /// replica whose license has another refuses to apply it (`None` from an older
        /// leader).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<crate::Context>,
    },
    /// Allotment mode: the slave's free blocks per agent type from here on (absolute: a
    /// type not named has none), the last journal entry applied, and the last allot
    /// request number processed. Every replica counts the blocks against the limits.
    Allotment {
        slave: String,
        #[serde(default)]
        blocks: std::collections::BTreeMap<String, u32>,
        #[serde(default)]
        journal: u64,
        #[serde(default)]
        request: u64,
    },
    /// Allotment mode: the slave admitted this agent from its block: one seat moves from
    /// the block of `agent_type` into the seat table (the counts do not change).
    FromBlock {
        slave: String,
        agent_id: String,
        agent_type: String,
        /// When the leader took the slave's journal entry in (Unix milliseconds; 0 from
        /// an older leader), and which replica that was: the seat's "since" and "by".
        #[serde(default)]
        at_ms: u64,
        #[serde(default)]
        by: String,
    },
    /// Allotment mode: the slave released this agent, admitted from its block or not: its
    /// seat moves from the seat table back into the slave's block of that type (the
    /// counts do not change).
    ToBlock {
        slave: String,
        agent_id: String,
    },
    /// The slave is gone from the master's table: it said goodbye, it was silent past
    /// `--forget-after` with no seats, or an operator forgot it (`admin forget-slave`).
    /// Every seat and block it still had is released with it.
    Forget {
        slave: String,
    },
    /// Vendor sync succeeded at `at_ms` (the leader's wall clock, Unix milliseconds): the
    /// master license's offline limit (`sync_within_days`) counts from the latest of these.
    /// Only a leader writes it, from a vendor answer it verified; `sync` names the exchange
    /// (nil when unknown).
    Synced {
        at_ms: u64,
        #[serde(default)]
        sync: Uuid,
    },
    /// The leader warned that the offline limit ending at `deadline_ms` (Unix milliseconds)
    /// is `days` days away or less (30, 14, 7, 1), or passed (0): a replica that leads next
    /// does not warn again for the same deadline and stage.
    SyncWarned {
        deadline_ms: u64,
        days: u32,
    },
    /// Air-gapped vendor sync: the leader exported the request `sync` to a file
    /// (`admin sync export`); an answer imported later applies only to an exported request
    /// not yet applied (a `Synced` naming it settles it).
    SyncExported {
        sync: Uuid,
    },
    /// The installation's identity (vendor sync: one license id, one installation), drawn
    /// by the cluster's first leader in its `Leader` entry and kept by every replica.
    Installation {
        id: Uuid,
        /// The installation's Ed25519 key seed (base64), which signs its sync requests;
        /// `None` from an older leader (the next leader records one under the same id).
        #[serde(default)]
        key: Option<String>,
    },
    /// The offline limit's clock (vendor sync): a wall time (Unix milliseconds) known to have
    /// passed. The leader writes one every hour while its license has an offline limit, so
    /// that a replica restarted after the clock was set back starts from at most an hour
    /// before the stop; with `reset`, the time replaces what replicas knew instead of
    /// raising it: after a sync over NATS (the vendor's signed time heals a clock that had
    /// run ahead) and at the end of a snapshot (its writer's knowledge).
    Clock {
        at_ms: u64,
        #[serde(default)]
        reset: bool,
    },
    /// A record this build does not know: a newer leader wrote it. A replica that meets
    /// one must stop replaying rather than guess.
    #[serde(other)]
    Unknown,
}

/// One ledger message: the changes of one or more decisions, appended together (group
/// commit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The replica that wrote it.
    pub writer: String,
    pub changes: Vec<SeatChange>,
}

/// One piece of a snapshot of the seat state, stored on
/// [`crate::Subjects::snapshot_chunk`]. Applying every chunk's changes, in index order, to
/// an empty state gives the state after ledger record `ledger_sequence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub ledger_sequence: u64,
    /// 0, 1, ... within the snapshot.
    pub index: u32,
    pub changes: Vec<SeatChange>,
}

/// Written on [`crate::Subjects::snapshot_manifest`] after every chunk of a snapshot is
/// stored: a snapshot without its manifest does not exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// The last ledger record the snapshot includes.
    pub ledger_sequence: u64,
    /// How many chunks, and the stream sequence of the first one.
    pub chunks: u32,
    pub first_chunk: u64,
    pub slaves: u64,
    pub seats: u64,
    /// The leader that wrote it, and its term.
    pub writer: String,
    pub term: u64,
}

impl SeatChange {
    /// An upper bound on this change's MessagePack size (named fields): ledger entries and
    /// snapshot chunks are cut by it without encoding twice.
    pub fn size_bound(&self) -> usize {
        const FIELDS: usize = 96;
        match self {
            SeatChange::Seats {
                slave,
                agent_type,
                agent_ids,
                request_seqs,
                since_ms,
                granted_by,
            } => {
                // A u64 is at most 9 bytes in MessagePack.
                FIELDS
                    + slave.len()
                    + agent_type.len()
                    + agent_ids.iter().map(|a| a.len() + 5).sum::<usize>()
                    + 9 * request_seqs.len()
                    + 9 * since_ms.len()
                    + granted_by.iter().map(|b| b.len() + 5).sum::<usize>()
            }
            SeatChange::Revoke { slave, agents } => {
                FIELDS + slave.len() + agents.iter().map(|a| a.len() + 5).sum::<usize>()
            }
            SeatChange::Session { slave, .. } => 3 * FIELDS + slave.len(),
            SeatChange::Grant {
                slave,
                agent_id,
                agent_type,
                by,
                ..
            } => FIELDS + 16 + slave.len() + agent_id.len() + agent_type.len() + by.len(),
            SeatChange::Release { slave, agent_id } => FIELDS + slave.len() + agent_id.len(),
            SeatChange::Confirm {
                slave, agent_id, ..
            } => FIELDS + 8 + slave.len() + agent_id.len(),
            SeatChange::Reclaim { slave } | SeatChange::Forget { slave } => FIELDS + slave.len(),
            SeatChange::Allotment { slave, blocks, .. } => {
                FIELDS + 40 + slave.len() + blocks.keys().map(|t| t.len() + 8).sum::<usize>()
            }
            SeatChange::FromBlock {
                slave,
                agent_id,
                agent_type,
                by,
                ..
            } => FIELDS + 16 + slave.len() + agent_id.len() + agent_type.len() + by.len(),
            SeatChange::ToBlock { slave, agent_id } => FIELDS + slave.len() + agent_id.len(),
            SeatChange::License { text } => FIELDS + text.len(),
            SeatChange::Leader { replica, .. } => FIELDS + 24 + replica.len(),
            SeatChange::Synced { .. } => FIELDS + 40,
            SeatChange::SyncWarned { .. } => FIELDS + 16,
            SeatChange::SyncExported { .. } => FIELDS + 24,
            SeatChange::Clock { .. } => FIELDS + 16,
            SeatChange::Installation { key, .. } => {
                FIELDS + 24 + key.as_ref().map_or(0, String::len)
            }
            SeatChange::Unknown => FIELDS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn entry_round_trips() {
        let entry = LedgerEntry {
            writer: "b1".into(),
            changes: vec![
                SeatChange::Session {
                    slave: "s".into(),
                    instance: Uuid::new_v4(),
                    license: None,
                    local_limit: Some(3),
                    heartbeat_interval_ms: 1000,
                    grace_ms: 120_000,
                    logout_after_grace: true,
                    hello_seq: 1,
                    request_seq: 41,
                    offline_limit: None,
                },
                SeatChange::Grant {
                    slave: "s".into(),
                    agent_id: "a".into(),
                    agent_type: "inbound".into(),
                    request_seq: 42,
                    at_ms: 1_700_000_000_000,
                    by: "b1".into(),
                },
                SeatChange::Release {
                    slave: "s".into(),
                    agent_id: "a".into(),
                },
                SeatChange::Seats {
                    slave: "s".into(),
                    agent_type: "inbound".into(),
                    agent_ids: vec!["b".into(), "c".into()],
                    request_seqs: vec![4, 0],
                    since_ms: vec![1_700_000_000_000, 0],
                    granted_by: vec!["b1".into(), String::new()],
                },
                SeatChange::Reclaim { slave: "s".into() },
                SeatChange::Forget { slave: "s".into() },
                SeatChange::Revoke {
                    slave: "s".into(),
                    agents: vec!["a".into()],
                },
                SeatChange::Leader {
                    replica: "b2".into(),
                    term: 7,
                    context: Some(crate::Context::Development),
                },
                SeatChange::Allotment {
                    slave: "s".into(),
                    blocks: [("inbound".to_owned(), 5)].into(),
                    journal: 9,
                    request: 3,
                },
                SeatChange::FromBlock {
                    slave: "s".into(),
                    agent_id: "d".into(),
                    agent_type: "inbound".into(),
                    at_ms: 1_700_000_000_001,
                    by: "b2".into(),
                },
                SeatChange::ToBlock {
                    slave: "s".into(),
                    agent_id: "d".into(),
                },
                SeatChange::Confirm {
                    slave: "s".into(),
                    agent_id: "d".into(),
                    request_seq: 12,
                },
                SeatChange::Synced {
                    at_ms: 1_700_000_000_002,
                    sync: Uuid::new_v4(),
                },
                SeatChange::SyncWarned {
                    deadline_ms: 1_705_000_000_000,
                    days: 14,
                },
                SeatChange::SyncExported {
                    sync: Uuid::new_v4(),
                },
                SeatChange::Installation {
                    id: Uuid::new_v4(),
                    key: Some("k".repeat(44)),
                },
            ],
        };
        assert_eq!(
            decode::<LedgerEntry>(&encode(&entry).unwrap()).unwrap(),
            entry
        );
    }
    #[test]
    fn size_bound_bounds_the_encoding() {
        let changes = vec![
            SeatChange::Session {
                slave: "site-1".into(),
                instance: Uuid::new_v4(),
                license: Some(Uuid::new_v4()),
                local_limit: Some(10),
                heartbeat_interval_ms: 1000,
                grace_ms: 120_000,
                logout_after_grace: true,
                hello_seq: 12,
                request_seq: u64::MAX,
                offline_limit: Some(OfflineLimit {
                    within_days: u32::MAX,
                    issued_ms: u64::MAX,
                }),
            },
            SeatChange::Seats {
                slave: "site-1".into(),
                agent_type: "inbound".into(),
                agent_ids: (0..1000).map(|n| format!("agent-{n}")).collect(),
                request_seqs: (0..1000).collect(),
                since_ms: vec![u64::MAX; 1000],
                granted_by: vec!["b".repeat(64); 1000],
            },
            SeatChange::Revoke {
                slave: "site-1".into(),
                agents: vec!["x".into()],
            },
            SeatChange::Reclaim {
                slave: "site-1".into(),
            },
            SeatChange::Leader {
                replica: "b1".into(),
                term: 9,
                context: Some(crate::Context::Production),
            },
            SeatChange::Allotment {
                slave: "site-1".into(),
                blocks: (0..64)
                    .map(|n| (format!("type-{n:040}"), u32::MAX))
                    .collect(),
                journal: u64::MAX,
                request: u64::MAX,
            },
            SeatChange::FromBlock {
                slave: "site-1".into(),
                agent_id: "a".repeat(256),
                agent_type: "inbound".into(),
                at_ms: u64::MAX,
                by: "b".repeat(64),
            },
            SeatChange::Grant {
                slave: "site-1".into(),
                agent_id: "a".repeat(256),
                agent_type: "inbound".into(),
                request_seq: u64::MAX,
                at_ms: u64::MAX,
                by: "b".repeat(64),
            },
            SeatChange::Synced {
                at_ms: u64::MAX,
                sync: Uuid::new_v4(),
            },
            SeatChange::SyncWarned {
                deadline_ms: u64::MAX,
                days: u32::MAX,
            },
            SeatChange::SyncExported {
                sync: Uuid::new_v4(),
            },
            SeatChange::Installation {
                id: Uuid::new_v4(),
                key: Some("k".repeat(44)),
            },
        ];
        for change in &changes {
            let encoded = encode(change).unwrap().len();
            assert!(
                encoded <= change.size_bound(),
                "{change:?}: {encoded} > {}",
                change.size_bound()
            );
        }
    }
}
