//! The leader's snapshots, written in a task beside it so that the leader only pays for
//! copying its state; the ledger is trimmed behind them when `--ledger-trim` asks for it.

use lmbus_schemas::human::HumanDuration;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lmbus_schemas::SeatChange;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ledger::Ledger;
use crate::snapshot::{self, Snapshots};

use super::replica::Replica;

/// Writes the leader's snapshots every `every` ledger records, one at a time, in a task
/// beside it (the leader only pays for copying the state).
pub(super) struct Snapshotter {
    pub(super) snapshots: Snapshots,
    pub(super) ledger: Ledger,
    pub(super) every: u64,
    pub(super) trim: bool,
    pub(super) writer: String,
    /// Ledger sequence of the newest snapshot known here.
    pub(super) last: Arc<AtomicU64>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Snapshotter {
    /// Whether a snapshot should be written now: `every` records since the last one and
    /// none being written.
    pub(super) fn due(&self, replica: &Replica) -> bool {
        self.every != 0
            && replica.applied >= self.last.load(Ordering::Relaxed) + self.every
            && self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Writes a snapshot of the engine as of `replica.applied` (nothing may be in flight).
    pub(super) fn start(&mut self, replica: &Replica, term: u64) {
        let copied = Instant::now();
        let mut changes = vec![SeatChange::Leader {
            replica: self.writer.clone(),
            term,
            context: Some(replica.engine.config().license.context),
        }];
        changes.extend(replica.engine.snapshot(snapshot::AGENTS_PER_CHANGE));
        let copied = copied.elapsed();
        let at = replica.applied;
        let (snapshots, ledger, trim, writer, last) = (
            self.snapshots.clone(),
            self.ledger.clone(),
            self.trim,
            self.writer.clone(),
            self.last.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            let written = Instant::now();
            let previous = match snapshots.latest_stored().await {
                Ok(previous) => previous,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot write a snapshot");
                    return;
                }
            };
            let (previous_at, after) = previous
                .map(|(m, stored)| (m.ledger_sequence, stored))
                .unwrap_or((0, 0));
            if previous_at >= at {
                last.fetch_max(previous_at, Ordering::Relaxed);
                return;
            }
            match snapshots.write(at, &writer, term, changes, after).await {
                Ok(manifest) => {
                    last.fetch_max(at, Ordering::Relaxed);
                    info!(
                        ledger_sequence = at,
                        seats = manifest.seats,
                        chunks = manifest.chunks,
                        ?copied,
                        took = %HumanDuration(written.elapsed()),
                        "wrote a snapshot"
                    );
                    // Keep the records after the previous snapshot: a standby that lags by
                    // less than one interval never meets a gap.
                    if trim && previous_at > 0 {
                        match ledger.trim_before(previous_at + 1).await {
                            Ok(n) => {
                                info!(records = n, before = previous_at + 1, "trimmed the ledger")
                            }
                            Err(e) => warn!(error = %format!("{e:#}"), "cannot trim the ledger"),
                        }
                    }
                }
                Err(e) => warn!(error = %format!("{e:#}"), at, "cannot write a snapshot"),
            }
        }));
    }
}
