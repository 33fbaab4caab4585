//! Leader election among the broker replicas of one cluster, on NATS itself.
//!
//! The lease is the key `leader` in a JetStream KV bucket whose stream has `max_age` set
//! to the lease time: the *server* drops the key when the leader stops renewing, so no
//! two machines ever compare clocks. A candidate that finds the key gone creates it
//! (compare-and-set on "no value"); the leader renews it with compare-and-set on its own
//! last revision. The revision of the winning create names that hold of the lease (`lease`
//! in [`Role::Leader`]): it only grows, but every renewal moves the revision, so it is not
//! a count of leaderships. The *term* operators see is the ledger's: each new leader's
//! `Leader` record carries the previous record's term plus one (`runtime/term.rs`).
//!
//! A leader that cannot renew steps down on its own monotonic timer, `lease - lease/5`
//! after it *sent* its last successful renewal, which is before the server can have
//! dropped the key (the server counts from when it stored the renewal, later). Fencing
//! in the ledger covers the rest: a leader paused between checking its lease and writing
//! is refused by the ledger.
//!
//! A key the server still holds but whose revision a candidate has seen unchanged for a
//! whole lease on its own clock is stale (every renewal moves the revision, and its holder
//! stopped acting 4/5 of a lease after sending it): the candidate takes it over with
//! compare-and-set on that revision. That matters after a NATS node died: the bucket
//! stream's new leader may keep an expired key for another second before its own timer
//! drops it. For the same reason a leader that could not renew deletes its own key
//! (compare-and-set on its last revision) once the bucket answers again: it stopped acting
//! on it already.
//!
//! Preference (`priority`, like the order of FLEXlm's SERVER lines): when the key is
//! gone, a candidate with priority `p` waits `(p - 1) * PRIORITY_STEP` before it tries, so
//! the most preferred replica that is up wins. A running leader is never preempted, so a
//! preferred replica that comes and goes does not make leadership flap.
//!
//! The bucket's stream is created by hand (`KV_<bucket>`, subjects `$KV.<bucket>.>`,
//! rollup allowed, discard new; no direct get, so reads are the stream leader's) because async-nats 0.51's
//! `create_key_value` fails against nats-server 2.9; it is then opened with
//! `get_key_value`.

use std::time::Duration;

use anyhow::anyhow;
use async_nats::Client;
use async_nats::jetstream::{kv, stream};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use lmbus_schemas::Subjects;

use crate::jetstream::open_stream;

/// The key holding the lease.
const KEY: &str = "leader";

/// How long a replica keeps trying to delete a lease it could not renew.
const RELEASE_FOR: Duration = Duration::from_secs(60);

/// Extra wait per priority step when the lease is free.
pub const PRIORITY_STEP: Duration = Duration::from_millis(100);

/// Election settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub replica: String,
    /// 1 is the most preferred.
    pub priority: u32,
    /// How long the lease lives on the server without a renewal.
    pub lease: Duration,
    /// Copies of the election stream (3 on a 3-node cluster).
    pub replicas: usize,
}

impl ElectionConfig {
    /// How often the leader renews, and a candidate looks at the lease.
    pub fn renew_every(&self) -> Duration {
        self.lease / 5
    }

    fn poll_every(&self) -> Duration {
        (self.lease / 20).clamp(Duration::from_millis(20), Duration::from_millis(200))
    }

    /// How long after sending a renewal the leader may still act on it.
    fn valid_for(&self) -> Duration {
        self.lease - self.lease / 5
    }
}

/// Why this replica stopped leading, for the `leader_stepped_down` alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepDown {
    /// It gave the lease up: `admin drain` (the runtime's own resign after a refused
    /// ledger write comes after its leader loop has ended).
    Resigned,
    /// The broker is shutting down.
    Stopping,
    /// No renewal came back within the lease's validity on this replica's clock.
    NotRenewed,
    /// Another replica's write replaced the lease.
    Superseded,
}

impl std::fmt::Display for StepDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StepDown::Resigned => "it resigned the lease (admin drain, or its own step-down)",
            StepDown::Stopping => "the broker is stopping",
            StepDown::NotRenewed => "it could not renew the lease in time",
            StepDown::Superseded => "another replica holds the lease",
        })
    }
}

/// What the lease says about this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Standby {
        /// The replica holding the lease, when known.
        leader: Option<String>,
        /// Why this replica stopped leading, right after it did.
        after: Option<StepDown>,
    },
    Leader {
        /// The lease revision this replica won (see the module doc): what `resign` names.
        lease: u64,
        /// Monotonic deadline: the leader must not act after it without a renewal.
        valid_until: Instant,
    },
}

impl Role {
    pub fn is_valid_leader(&self, now: Instant) -> bool {
        matches!(self, Role::Leader { valid_until, .. } if now < *valid_until)
    }

    /// True while this replica still holds, unexpired, the lease it won at revision
    /// `lease`.
    pub fn leads(&self, lease: u64, now: Instant) -> bool {
        matches!(self, Role::Leader { lease: l, valid_until } if *l == lease && now < *valid_until)
    }
}

/// The lease's value.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseValue {
    replica: String,
    priority: u32,
}

/// A handle on the election task.
#[derive(Debug)]
pub struct Election {
    pub role: watch::Receiver<Role>,
    /// True only while this replica has seen, itself, that nobody holds the lease: the key
    /// was absent, or unreadable for a whole lease. Never right after its own step-down.
    pub electing: watch::Receiver<bool>,
    resign: tokio::sync::mpsc::Sender<u64>,
    /// Set by `admin drain` ([`Drainer`]): this replica no longer campaigns (until
    /// `admin undrain` or a restart).
    draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While this replica rebuilds its state after stepping down ([`Self::stand_aside`]).
    aside: Aside,
}

/// A replica rebuilding its state after it stepped down does not campaign until it has
/// applied the ledger up to where it was (`until`), or for [`ASIDE_AT_MOST`].
#[derive(Debug, Clone, Default)]
struct Aside {
    /// The ledger position to reach; 0: not standing aside.
    until: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The replica's applied position (shared with the runtime).
    applied: std::sync::Arc<std::sync::atomic::AtomicU64>,
    since: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
}

/// The longest a replica stands aside: it may be the only one left.
pub const ASIDE_AT_MOST: Duration = Duration::from_secs(10);

impl Aside {
    fn active(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let until = self.until.load(SeqCst);
        if until == 0 {
            return false;
        }
        let expired = self
            .since
            .lock()
            .map(|since| since.is_none_or(|t| t.elapsed() >= ASIDE_AT_MOST))
            .unwrap_or(true);
        if self.applied.load(SeqCst) >= until || expired {
            self.until.store(0, SeqCst);
            return false;
        }
        true
    }
}

impl Election {
    /// Opens (creating if needed) the election bucket and starts campaigning in a task.
    /// `news` ([`crate::jetstream::leader_news`]) cuts short a lease read that waits on a
    /// bucket stream without a leader.
    /// `applied` is the replica's applied ledger position, which [`Self::stand_aside`]
    /// waits on.
    pub async fn start(
        client: &Client,
        subjects: &Subjects,
        news: watch::Receiver<u64>,
        applied: std::sync::Arc<std::sync::atomic::AtomicU64>,
        cfg: ElectionConfig,
    ) -> anyhow::Result<Self> {
        let store = open_bucket(client, subjects, &cfg).await?;
        let (tx, rx) = watch::channel(Role::Standby {
            leader: None,
            after: None,
        });
        let (electing_tx, electing_rx) = watch::channel(false);
        let (resign_tx, resign_rx) = tokio::sync::mpsc::channel(4);
        let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let aside = Aside {
            applied,
            ..Aside::default()
        };
        tokio::spawn(campaign(
            store,
            news,
            cfg,
            tx,
            electing_tx,
            resign_rx,
            (draining.clone(), aside.clone()),
        ));
        Ok(Self {
            role: rx,
            electing: electing_rx,
            resign: resign_tx,
            draining,
            aside,
        })
    }

    /// Stops leading on the lease won at revision `lease` at once (the ledger refused a
    /// write, say): the lease is left to expire and this replica does not campaign again
    /// until it has. A resign for an older lease is ignored.
    pub fn resign(&self, lease: u64) {
        let _ = self.resign.try_send(lease);
    }

    /// This replica stepped down with the ledger acknowledged up to `until` and rebuilds its
    /// state: it does not campaign until it has applied the ledger that far again (or for
    /// [`ASIDE_AT_MOST`]). Loading a snapshot and reading the ledger may take as long as
    /// JetStream's own elections after a NATS node died (the snapshot stream may have no
    /// leader either), and a replica that won the lease meanwhile would hold it without
    /// serving, or with a long catch-up, while the standbys that kept following are
    /// current.
    pub fn stand_aside(&self, until: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        if let Ok(mut since) = self.aside.since.lock() {
            *since = Some(Instant::now());
        }
        self.aside.until.store(until.max(1), SeqCst);
    }

    /// A handle that drains this replica from another task.
    pub fn drainer(&self) -> Drainer {
        Drainer {
            role: self.role.clone(),
            resign: self.resign.clone(),
            draining: self.draining.clone(),
        }
    }
}

/// Drains a replica (see [`Drainer::drain`]) from outside its election task.
#[derive(Debug, Clone)]
pub struct Drainer {
    role: watch::Receiver<Role>,
    resign: tokio::sync::mpsc::Sender<u64>,
    draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drainer {
    /// Maintenance (`admin drain`): stop campaigning (until `admin undrain` or the process
    /// restarts) and, when leading, resign so another replica takes over. Returns whether
    /// this replica was leading.
    pub fn drain(&self) -> bool {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        match *self.role.borrow() {
            Role::Leader { lease, .. } => {
                let _ = self.resign.try_send(lease);
                true
            }
            Role::Standby { .. } => false,
        }
    }

    /// `admin undrain`: campaign again (this replica leads when the lease is free and no
    /// more preferred replica takes it first). Returns whether it was drained.
    pub fn undrain(&self) -> bool {
        self.draining
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    /// Drained: up, following the ledger, but not campaigning.
    pub fn is_drained(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn open_bucket(
    client: &Client,
    subjects: &Subjects,
    cfg: &ElectionConfig,
) -> anyhow::Result<kv::Store> {
    let js = crate::jetstream::js_context(client);
    let bucket = subjects.election_bucket();
    let stream_name = subjects.election_stream();
    open_stream(
        &js,
        stream::Config {
            name: stream_name.clone(),
            description: Some(format!(
                "lmbus leader lease of cluster {}",
                subjects.cluster()
            )),
            subjects: vec![subjects.election_subjects()],
            max_messages_per_subject: 1,
            max_age: cfg.lease,
            duplicate_window: cfg.lease.min(Duration::from_secs(120)),
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            allow_rollup: true,
            deny_delete: true,
            discard: stream::DiscardPolicy::New,
            // Reads go to the stream leader: a follower answering a direct get may not have
            // dropped an expired lease yet, which would skew who sees it free first.
            allow_direct: false,
            ..Default::default()
        },
        "election",
        |_| {
            "if it exists with another lease time, every replica must use the same --lease"
                .to_owned()
        },
    )
    .await?;
    js.get_key_value(&bucket)
        .await
        .map_err(|e| anyhow!("cannot open the election bucket {bucket}: {e}"))
}

fn lease_value(cfg: &ElectionConfig) -> bytes::Bytes {
    serde_json::to_vec(&LeaseValue {
        replica: cfg.replica.clone(),
        priority: cfg.priority,
    })
    .unwrap_or_default()
    .into()
}

/// Publishes `next` only when it differs, so watchers wake only on real changes.
fn set<T: PartialEq>(watch: &watch::Sender<T>, next: T) {
    watch.send_if_modified(|current| {
        if *current == next {
            false
        } else {
            *current = next;
            true
        }
    });
}

async fn campaign(
    store: kv::Store,
    mut news: watch::Receiver<u64>,
    cfg: ElectionConfig,
    role: watch::Sender<Role>,
    electing: watch::Sender<bool>,
    mut resign: tokio::sync::mpsc::Receiver<u64>,
    (draining, aside): (std::sync::Arc<std::sync::atomic::AtomicBool>, Aside),
) {
    let value = lease_value(&cfg);
    let mut holdoff_until: Option<Instant> = None;
    // The lease revision last read, and when this replica first read it.
    let mut seen: Option<(u64, Instant)> = None;
    // This replica's own lease that it could not renew, still to be deleted (with
    // compare-and-set on its revision) so that nobody waits for the server to expire it,
    // and until when to keep trying.
    let mut release: Option<(u64, Instant)> = None;
    let mut last_read = Instant::now();
    loop {
        if role.is_closed() {
            return;
        }
        // ---- candidate ----
        // A lease this replica could not renew is past its validity here: it no longer
        // acts on it, so it deletes it (only if nobody replaced it since), and a standby
        // takes over as soon as the bucket's stream answers again (after a NATS node
        // died, its new stream leader may keep the expired key for another second).
        if let Some((revision, until)) = release {
            let delete = tokio::time::timeout(
                cfg.lease / 2,
                store.delete_expect_revision(KEY, Some(revision)),
            )
            .await;
            match delete {
                Ok(Ok(())) => {
                    info!(replica = %cfg.replica, lease = revision, "deleted the lease it could not renew");
                    release = None;
                }
                // Replaced meanwhile (the read below then shows another revision and
                // stops this), or the bucket unreachable for too long.
                _ if Instant::now() >= until => release = None,
                _ => {}
            }
        }
        let now = Instant::now();
        if holdoff_until.is_some_and(|t| now < t) {
            tokio::time::sleep(cfg.poll_every()).await;
            continue;
        }
        while resign.try_recv().is_ok() {}
        // Bounded: while the bucket's stream has no leader a read can hang far longer than
        // the client's request timeout. JetStream announcing a new stream leader ends the
        // wait at once: read again (a read changes nothing, so it may be dropped).
        let read = tokio::select! {
            read = tokio::time::timeout(cfg.lease / 2, store.entry(KEY)) => read
                .unwrap_or_else(|_| Err(kv::EntryError::new(kv::EntryErrorKind::TimedOut))),
            _ = crate::jetstream::next_news(&mut news) => continue,
        };
        let current = match read {
            Ok(entry) => {
                last_read = Instant::now();
                entry.filter(|e| e.operation == kv::Operation::Put)
            }
            Err(e) => {
                // The lease cannot be read (JetStream electing its own stream leader, NATS
                // unreachable): once that has lasted a whole lease, nobody can be leading.
                debug!(error = %e, "cannot read the leader lease");
                if last_read.elapsed() < cfg.lease {
                    tokio::time::sleep(cfg.poll_every()).await;
                    continue;
                }
                set(&electing, true);
                set(
                    &role,
                    Role::Standby {
                        leader: None,
                        after: None,
                    },
                );
                tokio::time::sleep(cfg.poll_every()).await;
                continue;
            }
        };
        // A lease the server still holds but nobody has renewed for a whole lease, on this
        // replica's own clock (the revision it first read then has not moved: every
        // renewal moves it): its holder stopped acting on it long ago (4/5 of a lease after
        // *sending* the renewal that wrote it, which was before this replica first read
        // it). The server drops it on its own timer, but a bucket stream that just elected
        // a new leader (a NATS node died) may keep it for another second: take it over
        // with compare-and-set on that revision instead. No clocks are compared.
        let stale = match &current {
            Some(entry) => match seen {
                Some((revision, since)) if revision == entry.revision => {
                    since.elapsed() >= cfg.lease
                }
                _ => {
                    seen = Some((entry.revision, Instant::now()));
                    false
                }
            },
            None => {
                seen = None;
                false
            }
        };
        if release.is_some_and(|(mine, _)| current.as_ref().map(|e| e.revision) != Some(mine)) {
            release = None;
        }
        let stale_revision = current.as_ref().filter(|_| stale).map(|e| e.revision);
        if let Some(entry) = current.filter(|_| !stale) {
            set(&electing, false);
            let leader = serde_json::from_slice::<LeaseValue>(&entry.value)
                .map(|v| v.replica)
                .ok();
            set(
                &role,
                Role::Standby {
                    leader,
                    after: None,
                },
            );
            tokio::time::sleep(cfg.poll_every()).await;
            continue;
        }
        // The lease is free: let more preferred replicas try first. A drained replica
        // never tries, nor one standing aside while it rebuilds.
        if draining.load(std::sync::atomic::Ordering::SeqCst) || aside.active() {
            set(&electing, true);
            set(
                &role,
                Role::Standby {
                    leader: None,
                    after: None,
                },
            );
            tokio::time::sleep(cfg.poll_every()).await;
            continue;
        }
        set(&electing, true);
        let wait = PRIORITY_STEP.saturating_mul(cfg.priority.saturating_sub(1));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let sent = Instant::now();
        let write = async {
            match stale_revision {
                Some(stale) => store
                    .update(KEY, value.clone(), stale)
                    .await
                    .map_err(|e| e.to_string()),
                None => store
                    .create(KEY, value.clone())
                    .await
                    .map_err(|e| e.to_string()),
            }
        };
        let mut revision = match tokio::time::timeout(cfg.valid_for(), write).await {
            Ok(Ok(revision)) => revision,
            Err(_) => {
                debug!("writing the lease timed out");
                tokio::time::sleep(cfg.poll_every()).await;
                continue;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "lost the election or cannot write the lease");
                tokio::time::sleep(cfg.poll_every()).await;
                continue;
            }
        };
        let lease = revision;
        match stale_revision {
            Some(stale) => {
                info!(replica = %cfg.replica, lease, stale, "took over a lease nobody renewed for a whole lease")
            }
            None => info!(replica = %cfg.replica, lease, "won the leader lease"),
        }
        let mut valid_until = sent + cfg.valid_for();
        set(&electing, false);
        role.send_replace(Role::Leader { lease, valid_until });

        // ---- leader ----
        let mut renew = tokio::time::interval(cfg.renew_every());
        renew.tick().await;
        let reason = loop {
            tokio::select! {
                resigned = resign.recv() => match resigned {
                    Some(l) if l == lease => break StepDown::Resigned,
                    Some(_) => continue, // for an older lease
                    None => break StepDown::Stopping,
                },
                _ = renew.tick() => {}
            }
            if Instant::now() >= valid_until {
                break StepDown::NotRenewed;
            }
            let sent = Instant::now();
            let update = tokio::time::timeout(
                valid_until.saturating_duration_since(sent),
                store.update(KEY, value.clone(), revision),
            )
            .await;
            match update {
                Ok(Ok(next)) => {
                    revision = next;
                    valid_until = sent + cfg.valid_for();
                    role.send_modify(|r| {
                        if let Role::Leader { valid_until: v, .. } = r {
                            *v = valid_until;
                        }
                    });
                }
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    break StepDown::Superseded;
                }
                Ok(Err(e)) => warn!(error = %e, "cannot renew the leader lease"),
                Err(_) => break StepDown::NotRenewed,
            }
        };
        warn!(replica = %cfg.replica, lease, %reason, "stepping down");
        role.send_replace(Role::Standby {
            leader: None,
            after: Some(reason),
        });
        // Do not campaign again before the lease this replica held has surely expired.
        holdoff_until = Some(Instant::now() + cfg.lease);
        if reason == StepDown::NotRenewed {
            release = Some((revision, Instant::now() + RELEASE_FOR));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(lease: Duration) -> ElectionConfig {
        ElectionConfig {
            replica: "b1".into(),
            priority: 1,
            lease,
            replicas: 1,
        }
    }

    /// The server drops a lease `lease` after the renewal reached it, which is after the
    /// leader sent it: the leader stops acting `lease / 5` before that, on its own clock.
    #[tokio::test(start_paused = true)]
    async fn a_leader_acts_on_a_renewal_for_four_fifths_of_the_lease_from_sending_it() {
        let cfg = cfg(Duration::from_secs(1));
        let sent = Instant::now();
        let role = Role::Leader {
            lease: 3,
            valid_until: sent + cfg.valid_for(),
        };
        assert!(cfg.valid_for() < cfg.lease);
        assert!(
            cfg.renew_every() < cfg.valid_for(),
            "a renewal comes before the end"
        );
        tokio::time::advance(Duration::from_millis(799)).await;
        assert!(role.leads(3, Instant::now()));
        assert!(!role.leads(4, Instant::now()), "another lease");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!role.leads(3, Instant::now()));
        assert!(!role.is_valid_leader(Instant::now()));
        assert!(
            !Role::Standby {
                leader: None,
                after: None
            }
            .is_valid_leader(sent)
        );
    }

    /// A candidate polls often enough to see a free lease well within one lease, and never
    /// faster than 20 ms or slower than 200 ms.
    #[test]
    fn polling_is_bounded() {
        assert_eq!(
            cfg(Duration::from_secs(1)).poll_every(),
            Duration::from_millis(50)
        );
        assert_eq!(
            cfg(Duration::from_millis(100)).poll_every(),
            Duration::from_millis(20)
        );
        assert_eq!(
            cfg(Duration::from_secs(30)).poll_every(),
            Duration::from_millis(200)
        );
    }
}
