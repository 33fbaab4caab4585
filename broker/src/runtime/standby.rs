//! The standby role: following the ledger into this replica's engine until it wins the
//! lease, and the catch-up a new leader does before it answers anyone.

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use futures::StreamExt;
use tokio::sync::watch;
use tracing::error;

use crate::election::Role;
use crate::ledger::Ledger;

use super::replica::Replica;

/// How long a new leader may take to read the ledger up to its end.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a stretch as standby ended.
pub(super) enum Followed {
    Elected {
        term: u64,
    },
    Shutdown,
    /// Reading the ledger failed (NATS unreachable, consumer lost): try again.
    Interrupted(anyhow::Error),
}

/// Standby: applies ledger records as they are appended until this replica wins the
/// lease. `Err` only for a record that cannot be applied.
pub(super) async fn follow<S: Future<Output = ()> + Unpin>(
    replica: &mut Replica,
    ledger: &Ledger,
    role: &mut watch::Receiver<Role>,
    shutdown: &mut S,
) -> anyhow::Result<Followed> {
    // Setting up the consumer can hang while the stream elects a leader: an election
    // win meanwhile must not wait for it.
    let setup = ledger.follow(replica.applied + 1);
    tokio::pin!(setup);
    let mut records = loop {
        if let Role::Leader { term, .. } = *role.borrow_and_update() {
            return Ok(Followed::Elected { term });
        }
        tokio::select! {
            _ = &mut *shutdown => return Ok(Followed::Shutdown),
            changed = role.changed() => {
                if changed.is_err() {
                    return Err(anyhow!("the election task ended"));
                }
            }
            records = &mut setup => match records {
                Ok(records) => break records,
                Err(e) => return Ok(Followed::Interrupted(e)),
            },
        }
    };
    loop {
        if let Role::Leader { term, .. } = *role.borrow_and_update() {
            return Ok(Followed::Elected { term });
        }
        tokio::select! {
            _ = &mut *shutdown => return Ok(Followed::Shutdown),
            changed = role.changed() => {
                if changed.is_err() {
                    return Err(anyhow!("the election task ended"));
                }
            }
            record = records.next() => match record {
                Some(Ok(record)) => replica.apply(&record)?,
                Some(Err(e)) => return Ok(Followed::Interrupted(e)),
                None => return Ok(Followed::Interrupted(anyhow!("the ledger consumer ended"))),
            },
        }
    }
}

/// Reads the ledger up to its current end before a new leader answers anyone.
pub(super) async fn catch_up(replica: &mut Replica, ledger: &Ledger) -> anyhow::Result<u64> {
    let last = ledger.last_sequence().await?;
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
    if last > replica.applied {
        let mut records = ledger.follow(replica.applied + 1).await?;
        let read = async {
            while replica.applied < last {
                match records.next().await {
                    Some(record) => replica.apply(&record?)?,
                    None => return Err(anyhow!("the ledger consumer ended")),
                }
            }
            Ok(())
        };
        tokio::time::timeout(CATCH_UP_TIMEOUT, read)
            .await
            .map_err(|_| {
                anyhow!("could not read the ledger up to {last} within {CATCH_UP_TIMEOUT:?}: check that the broker's NATS user may publish on $JS.FC.> (JetStream flow control; see deploy/nats-server.conf)")
            })??;
    }
    Ok(last)
}
