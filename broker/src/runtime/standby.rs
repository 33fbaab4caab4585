//! The standby role: following the ledger into this replica's engine until it wins the
//! lease, and the catch-up a new leader does before it answers anyone.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tracing::error;

use crate::election::Role;
use crate::ledger::{Ledger, ReadError};

use super::replica::{ApplyError, Replica};

/// How long a new leader may take to read the ledger up to its end.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Most records a new leader reads one by one to catch up (see [`catch_up`]); more go
/// through a consumer.
const DIRECT_READS: u64 = 4096;

/// How many of those reads are in flight at once.
const DIRECT_READS_IN_FLIGHT: usize = 32;

/// How a stretch as standby ended.
pub(super) enum Followed {
    /// Won the lease at this revision (`Role::Leader::lease`).
    Elected {
        lease: u64,
    },
    Shutdown,
}

/// Why following the ledger stopped before an election or a shutdown.
#[derive(Debug, thiserror::Error)]
pub(super) enum FollowError {
    /// Reading the ledger failed (NATS unreachable, consumer lost): try again.
    #[error(transparent)]
    Interrupted(#[from] ReadError),
    /// A record was not applied: a gap (load a snapshot) or one the engine refuses.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("the election task ended")]
    ElectionEnded,
}

/// Why a new leader could not read the ledger up to its end.
#[derive(Debug, thiserror::Error)]
pub(super) enum CatchUpError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("cannot find the ledger's end: {0}")]
    End(String),
    #[error(
        "could not read the ledger up to {last} within {CATCH_UP_TIMEOUT:?}: check that the broker's NATS user may publish on $JS.FC.> (JetStream flow control; see deploy/nats-server.conf)"
    )]
    Timeout { last: u64 },
}

/// Standby: applies ledger records as they are appended until this replica wins the
/// lease or is told to stop.
pub(super) async fn follow<S: Future<Output = ()> + Unpin>(
    replica: &mut Replica,
    ledger: &Ledger,
    role: &mut watch::Receiver<Role>,
    shutdown: &mut S,
) -> Result<Followed, FollowError> {
    // Setting up the consumer can hang while the stream elects a leader: an election
    // win meanwhile must not wait for it.
    let setup = ledger.follow(replica.applied + 1);
    tokio::pin!(setup);
    let mut records = loop {
        if let Role::Leader { lease, .. } = *role.borrow_and_update() {
            return Ok(Followed::Elected { lease });
        }
        tokio::select! {
            _ = &mut *shutdown => return Ok(Followed::Shutdown),
            changed = role.changed() => {
                if changed.is_err() {
                    return Err(FollowError::ElectionEnded);
                }
            }
            records = &mut setup => match records {
                Ok(records) => break records,
                Err(e) => return Err(e.into()),
            },
        }
    };
    loop {
        if let Role::Leader { lease, .. } = *role.borrow_and_update() {
            return Ok(Followed::Elected { lease });
        }
        tokio::select! {
            _ = &mut *shutdown => return Ok(Followed::Shutdown),
            changed = role.changed() => {
                if changed.is_err() {
                    return Err(FollowError::ElectionEnded);
                }
            }
            record = records.next() => match record {
                Some(Ok(record)) => replica.apply_record(&record)?,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ReadError::Nats("the ledger consumer ended".to_owned()).into()),
            },
        }
    }
}

/// Reads the ledger up to its current end before a new leader answers anyone.
pub(super) async fn catch_up(replica: &mut Replica, ledger: &Ledger) -> Result<u64, CatchUpError> {
    let last = ledger
        .last_sequence()
        .await
        .map_err(|e| CatchUpError::End(format!("{e:#}")))?;
    if last < replica.applied {
        // The ledger ends before the snapshot this replica loaded: the stream was deleted
        // and created again. The snapshot is the best state there is; go on from it at the
        // ledger's end (every append is fenced on that), rather than wait for records
        // that will never come.
        error!(
            ledger_ends_at = last,
            snapshot_at = replica.applied,
            "the ledger is shorter than the latest snapshot (was its stream deleted?): going on from the snapshot's state at the ledger's end"
        );
        replica.set_applied(last);
    }
    // A standby is usually a few records behind, or a few thousand when its consumer was
    // lost with a NATS node: ask the stream's leader for each record, several at a time
    // (no consumer, so no wait for JetStream's meta leader, which creates consumers and
    // may be being elected too). A record not found (trimmed) leaves the rest to the
    // consumer, which reports the gap.
    if last > replica.applied && last - replica.applied <= DIRECT_READS {
        let mut records = futures::stream::iter(replica.applied + 1..=last)
            .map(|sequence| ledger.get(sequence))
            .buffered(DIRECT_READS_IN_FLIGHT);
        let read = async {
            while let Some(record) = records.next().await {
                match record? {
                    Some(record) => replica.apply_record(&record)?,
                    None => break,
                }
            }
            Ok::<(), CatchUpError>(())
        };
        tokio::time::timeout(CATCH_UP_TIMEOUT, read)
            .await
            .map_err(|_| CatchUpError::Timeout { last })??;
    }
    if last > replica.applied {
        let mut records = ledger.follow(replica.applied + 1).await?;
        let read = async {
            while replica.applied < last {
                match records.next().await {
                    Some(record) => replica.apply_record(&record?)?,
                    None => {
                        return Err(ReadError::Nats("the ledger consumer ended".to_owned()).into());
                    }
                }
            }
            Ok::<(), CatchUpError>(())
        };
        tokio::time::timeout(CATCH_UP_TIMEOUT, read)
            .await
            .map_err(|_| CatchUpError::Timeout { last })??;
    }
    Ok(last)
}
