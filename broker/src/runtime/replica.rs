//! The seat state one replica holds, whatever its role: the engine, how far into the ledger
//! it is, the report period's usage, and how a ledger record or the latest snapshot is
//! applied to it.

use lmbus_schemas::human::HumanDuration;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::anyhow;
use lmbus_schemas::SeatChange;
use tokio::time::Instant;
use tracing::{error, info};

use crate::engine::{Engine, EngineConfig, ReplayError};
use crate::ledger::{Gap, Record};
use crate::metrics::Metrics;
use crate::report::{LicenseFacts, Usage};
use crate::snapshot::Snapshots;

use super::clock::{now, unix_ms};

/// The seat state this replica holds and how far into the ledger it is.
pub(super) struct Replica {
    pub(super) engine: Engine,
    /// Sequence of the last ledger record applied (or written) here.
    pub(super) applied: u64,
    /// `applied`, for the presence task's beats.
    shared: Arc<AtomicU64>,
    /// Told the license in force after every record, for its gauges on every replica.
    metrics: Arc<Metrics>,
    /// Seat usage of the report period, fed after every record; carried over when the
    /// replica is rebuilt.
    pub(super) usage: Usage,
    /// Quarantined ledger records (sequence, why) not reported in an alert yet: the
    /// leader reports them when it starts leading. At most [`MAX_QUARANTINED`] are kept.
    pub(super) quarantined: Vec<(u64, String)>,
    /// The replica whose term the ledger is in at `applied` (from the last `Leader`
    /// record, or the loaded snapshot's writer); `None` before any.
    pub(super) leader: Option<String>,
    /// The term of the last `Leader` record applied (or of the loaded snapshot's writer);
    /// 0 before any. A new leader's term is one more.
    pub(super) term: u64,
}

/// Most quarantined ledger records remembered for the next alert.
const MAX_QUARANTINED: usize = 16;

impl Replica {
    pub(super) fn new(
        cfg: &EngineConfig,
        shared: Arc<AtomicU64>,
        metrics: Arc<Metrics>,
        usage: Usage,
    ) -> Self {
        shared.store(0, Ordering::Relaxed);
        metrics.set_license(&cfg.license);
        let engine = Engine::new(cfg.clone());
        metrics.set_sync_deadline(engine.sync_deadline_ms());
        Self {
            engine,
            applied: 0,
            shared,
            metrics,
            usage,
            quarantined: Vec::new(),
            leader: None,
            term: 0,
        }
    }

    pub(super) fn set_applied(&mut self, sequence: u64) {
        self.applied = sequence;
        self.shared.store(sequence, Ordering::Relaxed);
        self.metrics.set_license(&self.engine.config().license);
        self.metrics
            .set_sync_deadline(self.engine.sync_deadline_ms());
        self.observe_usage();
    }

    pub(super) fn observe_usage(&mut self) {
        self.usage.observe(
            unix_ms(),
            self.engine.in_use_by_type(),
            self.engine.total_in_use(),
        );
    }

    /// What a usage report needs from the license in force.
    pub(super) fn license_facts(&self) -> LicenseFacts {
        let license = &self.engine.config().license;
        LicenseFacts {
            id: license.id.to_string(),
            customer: license.customer.clone(),
            context: license.context,
            total: license.limits.total,
            types: license.limits.agent_types.clone(),
        }
    }

    pub(super) fn apply_record(&mut self, record: &Record) -> Result<(), ApplyError> {
        if record.sequence <= self.applied {
            return Ok(());
        }
        if record.sequence != self.applied + 1 {
            return Err(ApplyError::Gap(Gap {
                expected: self.applied + 1,
                found: record.sequence,
            }));
        }
        // Who leads from here: a term starts with its leader's `Leader` record, and every
        // other record of the term is that leader's. One written by anyone else was not
        // written by the replica the ledger follows (fencing stops a deposed leader), so it
        // is quarantined like garbage.
        let marker = match record.entry.changes.first() {
            // A quarantined record starts no term, whatever its entry says.
            _ if record.quarantined.is_some() => None,
            Some(SeatChange::Leader { replica, term, .. }) => Some((replica.clone(), *term)),
            _ => None,
        };
        let foreign = match (&marker, &self.leader) {
            (None, Some(leader))
                if record.quarantined.is_none() && record.entry.writer != *leader =>
            {
                Some(format!(
                    "written by {} while {leader} led",
                    lmbus_schemas::printable(&lmbus_schemas::truncated(&record.entry.writer, 64))
                ))
            }
            _ => None,
        };
        if let Some((leader, term)) = marker {
            self.leader = Some(leader);
            self.term = self.term.max(term);
        }
        if let Some(why) = record.quarantined.clone().or(foreign) {
            // Every replica skips it the same way, so they stay in agreement; the fence
            // moves past it (a leader's next append sits on this sequence).
            error!(sequence = record.sequence, %why, "ledger record quarantined: it is not a record any replica wrote; skipped");
            if self.quarantined.len() < MAX_QUARANTINED {
                self.quarantined.push((record.sequence, why));
            }
            self.set_applied(record.sequence);
            return Ok(());
        }
        for change in &record.entry.changes {
            self.engine
                .apply(now(), change)
                .map_err(|detail| ApplyError::Unappliable {
                    sequence: record.sequence,
                    writer: record.entry.writer.clone(),
                    detail,
                })?;
        }
        self.set_applied(record.sequence);
        Ok(())
    }
}

impl ApplyError {
    /// The record is another context's (a `Leader` or `License` record): this replica's
    /// license is not the cluster's context.
    pub(super) fn is_context_mismatch(&self) -> bool {
        matches!(
            self,
            ApplyError::Unappliable {
                detail: ReplayError::Context { .. },
                ..
            }
        )
    }
}

/// Why a ledger record was not applied.
#[derive(Debug, thiserror::Error)]
pub(super) enum ApplyError {
    /// The records before it were trimmed: load the snapshot that covers them.
    #[error(transparent)]
    Gap(#[from] Gap),
    /// The engine refuses it: this replica must not lead on a state it cannot build.
    #[error("ledger record {sequence} (written by {writer}) cannot be applied: {detail}")]
    Unappliable {
        sequence: u64,
        writer: String,
        detail: ReplayError,
    },
}

/// Why the latest snapshot was not loaded.
#[derive(Debug, thiserror::Error)]
pub(super) enum RestoreError {
    /// The snapshot is another context's ledger state: this replica must not join it
    /// (neither from the snapshot nor by replaying the ledger).
    #[error("the latest snapshot (ledger sequence {sequence}) cannot be applied: {detail}")]
    Refused { sequence: u64, detail: ReplayError },
    /// It could not be read or applied: replaying the ledger from its first record may do.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A replica built from the latest snapshot (or empty when there is none), ready to follow
/// the ledger from the record after it.
pub(super) async fn restore(
    cfg: &EngineConfig,
    shared: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    snapshots: &Snapshots,
    usage: Usage,
) -> Result<Replica, RestoreError> {
    let started = Instant::now();
    let mut replica = Replica::new(cfg, shared, metrics, usage);
    let Some(loaded) = snapshots.load_latest().await? else {
        return Ok(replica);
    };
    let now = now();
    for change in &loaded.changes {
        replica.engine.apply(now, change).map_err(|e| {
            let sequence = loaded.manifest.ledger_sequence;
            match e {
                ReplayError::Context { .. } => RestoreError::Refused {
                    sequence,
                    detail: e,
                },
                e => anyhow!("the snapshot at ledger sequence {sequence} cannot be applied: {e}")
                    .into(),
            }
        })?;
    }
    replica.set_applied(loaded.manifest.ledger_sequence);
    // The snapshot was taken by the leader of the term it ends in.
    replica.leader = Some(loaded.manifest.writer.clone());
    replica.term = loaded.manifest.term;
    info!(
        ledger_sequence = loaded.manifest.ledger_sequence,
        seats = loaded.manifest.seats,
        slaves = loaded.manifest.slaves,
        took = %HumanDuration(started.elapsed()),
        "loaded the latest snapshot"
    );
    Ok(replica)
}
