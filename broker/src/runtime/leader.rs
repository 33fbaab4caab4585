//! The leader role: catching up and fencing the ledger at the start of a term, then the loop
//! that decides slave requests in batches, records their changes through the [`Pipeline`]
//! and answers once they are recorded; status, admin requests, replica beats and the tick
//! are served beside them.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::Subscriber;
use futures::{FutureExt as _, StreamExt};
use lmbus_schemas::{
    Alert, AlertKind, LedgerEntry, ReplicaBeat, SeatChange, Severity, SlaveOp, WireError, decode,
};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::config::BrokerConfig;
use crate::election::{Election, Role};
use crate::engine::{Effect, Event, Output};
use crate::intake::{Budgets, Intake};
use crate::ledger::{AppendError, Gap, Ledger};
use crate::metrics::Gauges;
use crate::pipeline::{Acked, Pipeline};
use crate::replicas::Replicas;

use super::inbound::{Intook, admin_release, admin_reload, client_reply_ok, handle_slave_message};
use super::outbound::Io;
use super::replica::Replica;
use super::reporter::spawn_report;
use super::snapshotter::Snapshotter;
use super::standby::catch_up;
use super::{now, today_utc, unix_ms};

/// Most waiting requests decided together and committed in one ledger append.
const MAX_BATCH: usize = 256;

/// Most attempts at a new leader's `Leader` record while the ledger stream is not writable
/// yet (each `CATCH_UP_RETRY` apart): only failed appends are retried, never fenced ones.
const MARKER_TRIES: u32 = 100;

/// Pause between a new leader's attempts to read a ledger that is not reachable yet.
const CATCH_UP_RETRY: Duration = Duration::from_millis(100);

/// How a stretch as leader ended.
pub(super) enum Led {
    Shutdown,
    SteppedDown {
        reason: String,
        /// The engine may hold changes the ledger does not: rebuild it from the ledger.
        rebuild: bool,
    },
}

/// Leader: catches up, fences the ledger with a `Leader` record, then serves slaves until
/// the lease is lost, a ledger write fails or `shutdown` completes.
#[allow(clippy::too_many_arguments)]
pub(super) async fn lead<S: Future<Output = ()> + Unpin>(
    replica: &mut Replica,
    ledger: &mut Ledger,
    election: &mut Election,
    term: u64,
    cfg: &BrokerConfig,
    io: &Io,
    shutdown: &mut S,
    not_ready: &watch::Sender<bool>,
    snapshotter: &mut Snapshotter,
) -> anyhow::Result<Led> {
    let started = Instant::now();
    // While the ledger's stream elects its own leader (a NATS node died), reads time out:
    // keep the lease and retry rather than resign and run a new election each time, so the
    // first read that succeeds ends the pause. What was applied stays right: no rebuild.
    let mut failures = 0u32;
    let caught_up = loop {
        let error = tokio::select! {
            _ = &mut *shutdown => return Ok(Led::Shutdown),
            read = catch_up(replica, ledger) => match read {
                Ok(last) => break last,
                Err(e) if e.downcast_ref::<Gap>().is_some() => {
                    return Ok(Led::SteppedDown {
                        reason: format!("cannot catch up with the ledger: {e:#}"),
                        rebuild: true,
                    });
                }
                Err(e) => e,
            },
        };
        failures += 1;
        if !election.role.borrow().leads(term, Instant::now()) {
            return Ok(Led::SteppedDown {
                reason: format!("the lease was lost while catching up with the ledger: {error:#}"),
                rebuild: false,
            });
        }
        if failures == 1 {
            warn!(error = %format!("{error:#}"), term, "cannot catch up with the ledger yet; retrying while the lease holds");
        }
        tokio::select! {
            _ = &mut *shutdown => return Ok(Led::Shutdown),
            _ = tokio::time::sleep(CATCH_UP_RETRY) => {}
        }
    };
    if failures > 0 {
        info!(failures, waited = ?started.elapsed(), "caught up with the ledger after retrying");
    }
    ledger.set_fence(replica.applied);
    let marker = LedgerEntry {
        writer: cfg.broker_id.clone(),
        changes: vec![SeatChange::Leader {
            replica: cfg.broker_id.clone(),
            term,
        }],
    };
    // Right after the whole NATS cluster restarted, the ledger stream may be readable but
    // not yet writable ("no stream found" while its raft group settles): retry the marker
    // while the lease holds instead of resigning and running a new election. The retry has
    // the same message id, so one that did land is acknowledged as a duplicate.
    let mut tries = 0u32;
    loop {
        if let Some(end) = lapsed(&election.role, cfg.fault_ignore_lease, Instant::now()) {
            return Ok(end);
        }
        let started = Instant::now();
        match ledger.append(&marker).await {
            Ok(sequence) => {
                io.metrics.ledger_append(started.elapsed());
                replica.set_applied(sequence);
                break;
            }
            Err(AppendError::Failed(e)) if tries < MARKER_TRIES => {
                tries += 1;
                if tries == 1 {
                    warn!(error = %e, term, "cannot write the leader record yet; retrying while the lease holds");
                }
            }
            Err(e) => return Ok(not_recorded(io, e).await),
        }
        tokio::select! {
            _ = &mut *shutdown => return Ok(Led::Shutdown),
            _ = tokio::time::sleep(CATCH_UP_RETRY) => {}
        }
    }
    if tries > 0 {
        info!(tries, "wrote the leader record after retrying");
    }
    replica.leader = Some(cfg.broker_id.clone());
    replica.engine.restart_silence_clocks(now());
    let quarantined = std::mem::take(&mut replica.quarantined);
    if !quarantined.is_empty() {
        let list: Vec<String> = quarantined
            .iter()
            .map(|(sequence, why)| format!("{sequence} ({why})"))
            .collect();
        io.alert(Alert::new(
            Severity::Critical,
            AlertKind::BadMessage,
            format!(
                "the ledger {} held records no broker replica wrote, quarantined and skipped: {}. Only the brokers' NATS user may publish on {}: check who else can (deploy/nats-server.conf), and rotate the broker credentials if they leaked",
                io.subjects.ledger_stream(),
                list.join(", "),
                io.subjects.ledger()
            ),
        ))
        .await;
    }
    if let Some(missed) = replica.usage.take_closed() {
        // It closed while another replica led, which reported it (or failed over while
        // doing so: `admin report` makes the current period's report on demand).
        info!(
            period_end = missed.end_ms,
            "a usage period ended before this replica led; not reporting it again"
        );
    }

    let client = &io.client;
    let subjects = &io.subjects;
    let mut slave_sub = client
        .subscribe(subjects.all_slave_ops())
        .await
        .context("cannot subscribe to slave requests")?;
    let mut status_sub = client
        .subscribe(subjects.status())
        .await
        .context("cannot subscribe to status requests")?;
    let mut admin_sub = client
        .subscribe(subjects.admin_all())
        .await
        .context("cannot subscribe to admin requests")?;
    let mut replica_sub = client
        .subscribe(subjects.replica())
        .await
        .context("cannot subscribe to replica beats")?;
    // Subscribed: tell every slave, so that a request still waiting on the previous leader
    // (frozen, say) is sent here now rather than after its timeout. Sent after the
    // subscriptions on the same connection, so the server has them first.
    let hello_new = Output {
        effects: replica
            .engine
            .connected_slaves()
            .into_iter()
            .map(|slave| Effect::Control {
                slave,
                message: lmbus_schemas::ControlMessage::NewLeader,
            })
            .collect(),
        ..Output::default()
    };
    io.apply(None, hello_new).await;
    let mut replicas = Replicas::new(&cfg.broker_id, now(), cfg.lease * 3 / 2, cfg.lease * 3 / 2);
    let mut intake = Intake::new(
        Budgets::for_rate_limit(cfg.slave_rate_limit),
        &cfg.broker_id,
    );
    not_ready.send_replace(false);
    io.alert(
        Alert::new(
            Severity::Info,
            AlertKind::LeaderElected,
            format!(
                "broker {} leads cluster {} in term {term}: it won the free lease (priority {}) and caught up with the ledger to sequence {caught_up} in {} ms; {} seats in use",
                cfg.broker_id,
                cfg.cluster,
                cfg.priority,
                started.elapsed().as_millis(),
                replica.engine.total_in_use()
            ),
        )
        .counts(std::collections::BTreeMap::from([(
            "total".to_owned(),
            replica.engine.total_in_use(),
        )])),
    )
    .await;
    info!(cluster = %cfg.cluster, term, subject = %subjects.all_slave_ops(), "leading");

    let mut ticker = tokio::time::interval(cfg.tick_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    // Appends in flight: decisions go on while earlier ones are being recorded; each is
    // answered once its append is acknowledged (the `pipeline` module).
    let mut pipeline: Pipeline<Decided> = Pipeline::default();
    let ended = loop {
        let valid_until = match *election.role.borrow_and_update() {
            _ if cfg.fault_ignore_lease => far,
            Role::Leader { valid_until, .. } => valid_until,
            Role::Standby { ref leader } => {
                break Led::SteppedDown {
                    reason: match leader {
                        Some(other) => format!("{other} holds the lease"),
                        None => "the lease was lost".to_owned(),
                    },
                    rebuild: false,
                };
            }
        };
        // Checked first, on this replica's own clock: after a pause (SIGSTOP, a stalled
        // VM) several branches below are ready at once, and none of them may act, alert or
        // decide for a term this replica may no longer hold.
        if Instant::now() >= valid_until {
            break Led::SteppedDown {
                reason: "the lease ran out on this replica's clock before it was renewed (was the process paused?)".to_owned(),
                rebuild: false,
            };
        }
        let mut batch: Vec<Decided> = Vec::new();
        tokio::select! {
            _ = &mut *shutdown => break Led::Shutdown,
            _ = election.role.changed() => continue,
            _ = tokio::time::sleep_until(valid_until) => continue,
            acked = pipeline.next(), if !pipeline.is_empty() => {
                if let Some(end) = settle(replica, io, acked).await {
                    break end;
                }
                continue;
            }
            msg = slave_sub.next(), if pipeline.has_room() => match msg {
                Some(msg) => {
                    let mut next = Some(msg);
                    // Group commit: decide what is already waiting in the same append.
                    // Dropped messages count towards the batch so a flood cannot hold the
                    // loop here.
                    let mut seen = 0;
                    while let Some(msg) = next.take() {
                        seen += 1;
                        let arrived = Instant::now();
                        if let Some(Intook { reply_to, out, op }) =
                            handle_slave_message(&mut replica.engine, &mut intake, subjects, &msg)
                        {
                            batch.push((reply_to, out, timed(op, arrived)));
                        }
                        if seen < MAX_BATCH {
                            next = slave_sub.next().now_or_never().flatten();
                        }
                    }
                }
                None => break Led::SteppedDown {
                    reason: "the NATS subscription for slave requests closed".to_owned(),
                    rebuild: false,
                },
            },
            msg = status_sub.next() => match msg {
                Some(msg) if !client_reply_ok(&mut intake, "status requests", &msg) => {}
                Some(msg) => {
                    let mut status = replica.engine.status(now());
                    status.leader_term = term;
                    status.ledger_sequence = replica.applied;
                    status.replicas = replicas.status(now());
                    io.status(&msg, status).await;
                }
                None => break Led::SteppedDown {
                    reason: "the NATS subscription for status requests closed".to_owned(),
                    rebuild: false,
                },
            },
            msg = admin_sub.next() => match msg {
                Some(msg) if !client_reply_ok(&mut intake, "admin requests", &msg) => {}
                Some(msg) => {
                    let subject = msg.subject.as_str();
                    if subject == subjects.admin_report() {
                        let period = replica.usage.so_far(unix_ms());
                        spawn_report(io, &cfg.report, replica.license_facts(), period, false, msg.reply.clone());
                        continue;
                    }
                    let (reply, out) = if subject == subjects.admin_reload() {
                        admin_reload(&mut replica.engine, &msg)
                    } else if subject == subjects.admin_release() {
                        admin_release(&mut replica.engine, &msg)
                    } else {
                        // `admin.drain` is answered by the replica it names (`drains`).
                        continue;
                    };
                    // Admin changes are recorded on their own, after everything in flight.
                    if let Some(end) = drain(replica, io, &mut pipeline).await {
                        break end;
                    }
                    let changes = out.changes.clone();
                    if let Some(end) = commit_all(replica, ledger, &election.role, cfg, io, changes).await {
                        break end;
                    }
                    io.admin_reply(&msg, &reply).await;
                    io.apply(None, out).await;
                }
                None => break Led::SteppedDown {
                    reason: "the NATS subscription for admin requests closed".to_owned(),
                    rebuild: false,
                },
            },
            msg = replica_sub.next() => match msg {
                Some(msg) => match decode::<ReplicaBeat>(&msg.payload) {
                    Ok(beat) => {
                        for alert in replicas.observe(now(), beat) {
                            io.alert(alert).await;
                        }
                    }
                    Err(e) => {
                        let out = replica.engine.handle(now(), Event::BadMessage {
                            subject: msg.subject.to_string(),
                            slave: None,
                            error: WireError::from(&e),
                        });
                        io.apply(None, out).await;
                    }
                },
                None => break Led::SteppedDown {
                    reason: "the NATS subscription for replica beats closed".to_owned(),
                    rebuild: false,
                },
            },
            _ = ticker.tick() => {
                if Instant::now() >= valid_until {
                    continue;
                }
                let out = replica.engine.handle(now(), Event::Tick { today: today_utc() });
                batch.push((None, out, None));
                let (slaves_connected, slaves_known) = replica.engine.slave_counts();
                io.metrics.set_gauges(Some(Gauges {
                    seats_by_type: replica.engine.in_use_by_type().clone(),
                    seats_total: replica.engine.total_in_use(),
                    slaves_connected,
                    slaves_known,
                }));
                for alert in replicas.sweep(now()) {
                    io.alert(alert).await;
                }
                for alert in intake.summaries(now()) {
                    io.alert(alert).await;
                }
                replica.observe_usage();
                if let Some(period) = replica.usage.take_closed() {
                    spawn_report(io, &cfg.report, replica.license_facts(), Some(period), true, None);
                }
            }
        }
        let changes: Vec<SeatChange> = batch
            .iter_mut()
            .flat_map(|(_, out, _)| std::mem::take(&mut out.changes))
            .collect();
        if let Some(end) = send_all(
            ledger,
            &mut pipeline,
            &election.role,
            cfg,
            io,
            changes,
            batch,
        )
        .await
        {
            break end;
        }
        if snapshotter.due(replica) {
            // A snapshot copies the engine at `applied`: nothing may be in flight.
            if let Some(end) = drain(replica, io, &mut pipeline).await {
                break end;
            }
            snapshotter.start(replica, term);
        }
    };
    let ended = match ended {
        // The engine holds decisions the ledger may not: rebuild it from the ledger.
        Led::SteppedDown { reason, rebuild } => Led::SteppedDown {
            reason,
            rebuild: rebuild || !pipeline.is_empty(),
        },
        // Answer what is already on its way to the ledger before leaving.
        Led::Shutdown => {
            let _ = drain(replica, io, &mut pipeline).await;
            Led::Shutdown
        }
    };
    for sub in [
        &mut slave_sub,
        &mut status_sub,
        &mut admin_sub,
        &mut replica_sub,
    ] {
        unsubscribe(sub).await;
    }
    Ok(ended)
}

async fn unsubscribe(sub: &mut Subscriber) {
    let _ = sub.unsubscribe().await;
}

/// Appends `changes` in as many entries as they need (`split_entries`), each fenced and
/// under a valid lease. A failure part way leaves the earlier parts recorded and nobody
/// told of any of them: like a reply lost after its append, which slaves retry.
async fn commit_all(
    replica: &mut Replica,
    ledger: &mut Ledger,
    role: &watch::Receiver<Role>,
    cfg: &BrokerConfig,
    io: &Io,
    changes: Vec<SeatChange>,
) -> Option<Led> {
    for changes in crate::ledger::split_entries(changes) {
        let entry = LedgerEntry {
            writer: cfg.broker_id.clone(),
            changes,
        };
        let end = commit(
            replica,
            ledger,
            role,
            cfg.fault_ignore_lease,
            io,
            &entry,
            Instant::now(),
        )
        .await;
        if end.is_some() {
            return end;
        }
    }
    None
}

/// Appends `entry` if this replica still holds a valid lease, and waits for it (nothing
/// may be in flight). `Some` means it must step down (and says why); nothing decided since
/// the last good append may be told to anyone.
#[allow(clippy::too_many_arguments)]
async fn commit(
    replica: &mut Replica,
    ledger: &mut Ledger,
    role: &watch::Receiver<Role>,
    ignore_lease: bool,
    io: &Io,
    entry: &LedgerEntry,
    at: Instant,
) -> Option<Led> {
    if let Some(end) = lapsed(role, ignore_lease, at) {
        return Some(end);
    }
    let started = Instant::now();
    match ledger.append(entry).await {
        Ok(sequence) => {
            io.metrics.ledger_append(started.elapsed());
            replica.set_applied(sequence);
            None
        }
        Err(e) => Some(not_recorded(io, e).await),
    }
}

/// `Some` (step down) unless this replica holds a valid lease at `at`.
fn lapsed(role: &watch::Receiver<Role>, ignore_lease: bool, at: Instant) -> Option<Led> {
    let reason = match &*role.borrow() {
        _ if ignore_lease => return None,
        role if role.is_valid_leader(at) => return None,
        Role::Leader { .. } => "the lease ran out before the decisions could be recorded",
        Role::Standby { .. } => "the lease was lost before the decisions could be recorded",
    };
    Some(Led::SteppedDown {
        reason: reason.to_owned(),
        rebuild: true,
    })
}

/// An append failed: the leader steps down (a refusal is alerted: another replica writes).
async fn not_recorded(io: &Io, e: AppendError) -> Led {
    if let AppendError::Fenced { .. } = e {
        io.alert(Alert::new(
            Severity::Critical,
            AlertKind::LedgerWriteRefused,
            format!(
                "broker {}: {e}; the seat changes it had not yet recorded were dropped and nobody was told of them",
                io.broker_id
            ),
        ))
        .await;
    }
    Led::SteppedDown {
        reason: e.to_string(),
        rebuild: true,
    }
}

/// Sends `changes` into the pipeline (in as many entries as they need), `answers` riding on
/// the last; with no changes the answers wait for what is in flight, or go out now.
#[allow(clippy::too_many_arguments)]
async fn send_all(
    ledger: &mut Ledger,
    pipeline: &mut Pipeline<Decided>,
    role: &watch::Receiver<Role>,
    cfg: &BrokerConfig,
    io: &Io,
    changes: Vec<SeatChange>,
    answers: Vec<Decided>,
) -> Option<Led> {
    if changes.is_empty() {
        if let Some(now) = pipeline.hold(answers) {
            answer(io, now).await;
        }
        return None;
    }
    let mut parts = crate::ledger::split_entries(changes).into_iter().peekable();
    let mut answers = Some(answers);
    while let Some(changes) = parts.next() {
        if let Some(end) = lapsed(role, cfg.fault_ignore_lease, Instant::now()) {
            return Some(end);
        }
        let entry = LedgerEntry {
            writer: cfg.broker_id.clone(),
            changes,
        };
        match ledger.send(&entry, !pipeline.is_empty()).await {
            Ok(sent) => {
                let released = match parts.peek() {
                    None => answers.take().unwrap_or_default(),
                    Some(_) => Vec::new(),
                };
                pipeline.push(sent, released);
            }
            Err(e) => return Some(not_recorded(io, e).await),
        }
    }
    None
}

/// One acknowledgement from the pipeline: on success the record is applied here and its
/// answers go out; a failure ends the leadership with everything behind it untold.
async fn settle(replica: &mut Replica, io: &Io, acked: Acked<Decided>) -> Option<Led> {
    match acked.result {
        Ok(sequence) => {
            io.metrics.ledger_append(acked.took);
            replica.set_applied(sequence);
            answer(io, acked.answers).await;
            None
        }
        Err(e) => Some(not_recorded(io, e).await),
    }
}

/// Waits for everything in flight, answering as it is recorded.
async fn drain(replica: &mut Replica, io: &Io, pipeline: &mut Pipeline<Decided>) -> Option<Led> {
    while !pipeline.is_empty() {
        let acked = pipeline.next().await;
        if let Some(end) = settle(replica, io, acked).await {
            return Some(end);
        }
    }
    None
}

/// Tells what was decided (replies, alerts, control messages), in decision order.
async fn answer(io: &Io, answers: Vec<Decided>) {
    for (reply_to, out, timing) in answers {
        if let Some((arrived, unregistration)) = timing {
            io.observe(&out, arrived.elapsed(), unregistration);
        }
        io.apply(reply_to.as_ref(), out).await;
    }
}

/// A decision waiting for its ledger append: the reply subject, the output, and for
/// registrations and unregistrations their arrival and whether it was an unregistration
/// (for the metrics).
type Decided = (Option<async_nats::Subject>, Output, Option<(Instant, bool)>);

/// Registrations and unregistrations are timed for the metrics.
fn timed(op: Option<SlaveOp>, arrived: Instant) -> Option<(Instant, bool)> {
    match op? {
        SlaveOp::Register | SlaveOp::Batch => Some((arrived, false)),
        SlaveOp::Unregister => Some((arrived, true)),
        SlaveOp::Hello | SlaveOp::Heartbeat | SlaveOp::Report => None,
    }
}
