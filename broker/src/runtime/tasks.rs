//! Tasks that run beside the replica loop for the whole life of the process, whatever its
//! role: `admin drain` and `admin undrain` requests, this replica's presence beats, the
//! watch for a cluster where no replica can lead, and `no_leader` answers while nobody
//! holds the lease. Each stops between two messages when `run` cancels its
//! `stop` token at shutdown, and `run` waits for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::Subscriber;
use futures::StreamExt;
use lmbus_schemas::{Alert, AlertKind, DrainReply, ReplicaBeat, Reply, Severity, decode};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::BrokerConfig;
use crate::election::{Drainer, Role};

use super::outbound::Io;

/// How long a standby holds back a `no_leader` answer (see `answer_while_electing`).
const NO_LEADER_DELAY: Duration = Duration::from_millis(50);

/// Answers `admin drain` and `admin undrain` requests that name this replica: drained, it
/// stops campaigning and, when leading, resigns; undrained, it campaigns again. A
/// `replica_drained` alert says which.
pub(super) async fn answer_drain_requests(io: Io, drainer: Drainer, stop: CancellationToken) {
    let me = &io.broker_id;
    let subscribe = async |subject: String| match io.client.subscribe(subject.clone()).await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, %subject, "cannot subscribe to drain requests");
            None
        }
    };
    let (Some(mut drains), Some(mut undrains)) = (
        subscribe(io.subjects.admin_drain()).await,
        subscribe(io.subjects.admin_undrain()).await,
    ) else {
        return;
    };
    loop {
        let (msg, undrain) = tokio::select! {
            _ = stop.cancelled() => return,
            msg = drains.next() => match msg {
                Some(msg) => (msg, false),
                None => return,
            },
            msg = undrains.next() => match msg {
                Some(msg) => (msg, true),
                None => return,
            },
        };
        let request = match decode::<lmbus_schemas::DrainRequest>(&msg.payload) {
            Ok(r) if r.replica == *me => r,
            Ok(_) => continue,
            Err(e) => {
                // Every replica gets it; none answers, the sender's request times out.
                warn!(error = %e, "undecodable drain request");
                continue;
            }
        };
        let who = if request.operator.is_empty() {
            "an operator"
        } else {
            request.operator.as_str()
        };
        let (severity, message) = if undrain {
            let message = if drainer.undrain() {
                format!(
                    "broker {me} is undrained: it campaigns again and leads when the lease is free and no more preferred replica takes it first"
                )
            } else {
                format!("broker {me} was not drained: nothing changed")
            };
            (
                Severity::Info,
                format!("{who} undrained a replica: {message}"),
            )
        } else {
            let message = if drainer.drain() {
                format!(
                    "broker {me} is drained: it was leading and resigned; a replica that can lead takes over within about one lease (if none can, no master answers and a critical redundancy alert says so). It will not lead again until `admin undrain --replica {me}` or a restart"
                )
            } else {
                format!(
                    "broker {me} is drained: it was a standby and will not campaign until `admin undrain --replica {me}` or a restart"
                )
            };
            (
                Severity::Warning,
                format!("{who} drained a replica: {message}"),
            )
        };
        // At once, not at the next presence beat.
        io.metrics.set_drained(drainer.is_drained());
        info!(operator = %who, "{message}");
        io.alert(Alert::new(
            severity,
            AlertKind::ReplicaDrained,
            message.clone(),
        ))
        .await;
        if let Some(reply_to) = msg.reply
            && lmbus_schemas::is_client_reply(&reply_to)
        {
            io.send(reply_to, &DrainReply { message }, "drain reply")
                .await;
        }
    }
}

/// Publishes this replica's `ReplicaBeat` four times per lease, so the leader knows its
/// standbys (and which are drained), and operators' tools who is up when none leads.
pub(super) async fn presence(
    io: Io,
    cfg: BrokerConfig,
    role: watch::Receiver<Role>,
    drainer: Drainer,
    applied: Arc<AtomicU64>,
    license: uuid::Uuid,
    stop: CancellationToken,
) {
    let subject = io.subjects.replica();
    let mut every = tokio::time::interval(cfg.lease / 4);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let beat = ReplicaBeat {
            replica: cfg.broker_id.clone(),
            priority: cfg.priority,
            leader: matches!(*role.borrow(), Role::Leader { .. }),
            applied: applied.load(Ordering::Relaxed),
            drained: drainer.is_drained(),
            context: Some(io.context),
            // The license in force (a reload in the ledger changes it on every replica),
            // that of the start before the first record.
            license: Some(io.metrics.license_id().unwrap_or(license)),
        };
        io.metrics.set_drained(beat.drained);
        io.send(subject.clone(), &beat, "replica beat").await;
    }
}

/// On every replica: listens to the replica beats and raises the critical alert when the
/// replicas that are up are all drained and none leads (no leader is there to say so).
/// Only the replica with the smallest id among those up raises it, once per such stretch.
pub(super) async fn watch_for_no_leader(io: Io, cfg: BrokerConfig, stop: CancellationToken) {
    let subject = io.subjects.replica();
    let mut beats = match io.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, %subject, "cannot subscribe to replica beats");
            return;
        }
    };
    let mut watch = crate::replicas::NoLeaderWatch::new(
        &cfg.broker_id,
        &cfg.cluster,
        cfg.lease * 3 / 2,
        cfg.lease * 3,
    );
    let mut every = tokio::time::interval(cfg.lease / 2);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = beats.next() => match msg {
                Some(msg) => {
                    if let Ok(beat) = decode::<ReplicaBeat>(&msg.payload) {
                        watch.observe(super::clock::now(), beat);
                    }
                }
                None => return,
            },
            _ = every.tick() => {
                if let Some(alert) = watch.sweep(super::clock::now()) {
                    error!("{}", alert.message);
                    io.alert(alert).await;
                }
            }
        }
    }
}

/// While this replica has seen that nobody holds the lease, answers slave requests with
/// `no_leader`, so slaves keep retrying through an election (which can last as long as
/// JetStream's own stream-leader election when a NATS node dies) instead of taking the
/// silence for a dead master. Subscribed only during such a gap. Each answer waits
/// `NO_LEADER_DELAY` first, so that where a leader does exist after all (a new one, not yet
/// seen here) its real answer reaches the slave first.
pub(super) async fn answer_while_electing(
    io: Io,
    mut electing: watch::Receiver<bool>,
    mut not_ready: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let subjects = &io.subjects;
    let mut sub: Option<Subscriber> = None;
    loop {
        let now_electing = *electing.borrow_and_update() || *not_ready.borrow_and_update();
        match (now_electing, sub.is_some()) {
            (true, false) => match io.client.subscribe(subjects.all_slave_ops()).await {
                Ok(s) => {
                    info!("no replica is ready to lead: answering slave requests with no_leader");
                    sub = Some(s);
                }
                Err(e) => debug!(error = %e, "cannot subscribe to answer during the election"),
            },
            (false, true) => {
                if let Some(mut s) = sub.take() {
                    let _ = s.unsubscribe().await;
                }
                info!("stopped answering no_leader");
            }
            _ => {}
        }
        let next = async {
            match sub.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = electing.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            changed = not_ready.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            msg = next => {
                let Some(msg) = msg else {
                    sub = None;
                    continue;
                };
                let Some(reply_to) = msg.reply else { continue };
                // The same rule as the leader's intake: answer only in the sender's own
                // inbox, whatever the message asks (nothing here is decided or counted).
                let home = subjects
                    .parse_slave_op(msg.subject.as_str())
                    .is_ok_and(|(slave, _)| subjects.is_slave_reply(&slave, reply_to.as_str()));
                if !home {
                    debug!(subject = %lmbus_schemas::truncated(msg.subject.as_str(), 160), "not answering no_leader outside the sender's inbox");
                    continue;
                }
                let reply = Reply::Refused {
                    last_hello: None,
                retry_after_ms: None,
                    reason: lmbus_schemas::RejectReason::NoLeader,
                    detail: format!(
                        "the broker replicas of cluster {} are electing a leader, or waiting for JetStream to elect the ledger's; retry",
                        subjects.cluster()
                    ),
                };
                let sender = io.clone();
                io.tasks.spawn(async move {
                    tokio::time::sleep(NO_LEADER_DELAY).await;
                    sender.send(reply_to, &reply, "no_leader answer").await;
                });
            }
        }
    }
}
