//! Tasks that run beside the replica loop for the whole life of the process, whatever its
//! role: `admin drain` requests, this replica's presence beats, and `no_leader` answers
//! while nobody holds the lease. Each stops between two messages when `run` cancels its
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
use tracing::{debug, info, warn};

use crate::config::BrokerConfig;
use crate::election::{Drainer, Role};

use super::outbound::Io;

/// How long a standby holds back a `no_leader` answer (see `answer_while_electing`).
const NO_LEADER_DELAY: Duration = Duration::from_millis(50);

/// Answers `admin drain` requests that name this replica: it stops campaigning and, when
/// leading, resigns; a `replica_drained` alert says which.
pub(super) async fn answer_drain_requests(io: Io, drainer: Drainer, stop: CancellationToken) {
    let subject = io.subjects.admin_drain();
    let me = &io.broker_id;
    let mut requests = match io.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, %subject, "cannot subscribe to drain requests");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            msg = requests.next() => match msg {
                Some(msg) => msg,
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
        let message = match drainer.drain() {
            Some(term) => format!(
                "broker {me} is drained: it led term {term} and resigned; another replica takes over within about one lease. It will not lead again until it restarts"
            ),
            None => format!(
                "broker {me} is drained: it was a standby and will not campaign until it restarts"
            ),
        };
        let who = if request.operator.is_empty() {
            "an operator"
        } else {
            request.operator.as_str()
        };
        info!(operator = %who, "{message}");
        io.alert(Alert::new(
            Severity::Warning,
            AlertKind::ReplicaDrained,
            format!("{who} drained a replica: {message}"),
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
/// standbys.
pub(super) async fn presence(
    io: Io,
    cfg: BrokerConfig,
    role: watch::Receiver<Role>,
    applied: Arc<AtomicU64>,
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
        };
        io.send(subject.clone(), &beat, "replica beat").await;
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
                    reason: lmbus_schemas::RejectReason::NoLeader,
                    detail: format!(
                        "the broker replicas of cluster {} are electing a leader; retry",
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
