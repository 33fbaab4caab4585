//! The leader role once its term has started (`term.rs`): the [`Leader`] loop decides slave
//! requests in batches, records their changes through the [`Pipeline`] and answers once they
//! are recorded, serving status, admin requests, replica beats and the tick beside them.
//! Each `select!` arm of the loop is one method.

use lmbus_schemas::human::{duration, plural};
use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::{Message, Subject, Subscriber};
use futures::{FutureExt as _, StreamExt};
use lmbus_schemas::{
    Alert, AlertKind, LedgerEntry, ReloadReply, ReloadRequest, ReplicaBeat, SeatChange, SeatUsage,
    Severity, SlaveOp, SyncNowReply, UsageSummary, decode,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::config::BrokerConfig;
use crate::election::{Election, Role};
use crate::engine::{Answer, Event, Output};
use crate::intake::{Budgets, Intake};
use crate::ledger::{AppendError, Ledger, RESEND_WITHIN};
use crate::metrics::{Gauges, SLAVE_SEATS_PAIRS};
use crate::pipeline::{Acked, Pipeline};
use crate::replicas::Replicas;

use super::clock::{now, today_utc, unix_ms};
use super::inbound::{
    Intook, admin_forget, admin_release, admin_reload, bad_message, client_reply_ok,
    handle_slave_message,
};
use super::outbound::Io;
use super::replica::Replica;
use super::reporter::spawn_report;
use super::snapshotter::Snapshotter;
use super::vendor_sync::{Ask, SyncDone, spawn_sync};

/// Most waiting requests decided together and committed in one ledger append.
const MAX_BATCH: usize = 256;

/// An append in flight for this long means the ledger stalled (its stream lost its leader,
/// say) and the loop stopped reading slave requests, heartbeats among them: their silence
/// meanwhile is the leader's deafness, not theirs (see [`Leader::on_tick`]).
const STALLED: Duration = Duration::from_millis(500);

/// Pause before sending again appends that went unacknowledged (the server refuses them
/// at once while the stream has no leader).
const RESEND_PAUSE: Duration = Duration::from_millis(50);

/// How a stretch as leader ended.
pub(super) enum Led {
    Shutdown,
    SteppedDown {
        reason: String,
        /// The engine may hold changes the ledger does not: rebuild it from the ledger.
        rebuild: bool,
    },
}

/// What `run` lends a replica for one term as leader.
pub(super) struct Term<'a> {
    /// The lease revision the election gave this replica (what it checks and resigns).
    pub(super) lease: u64,
    /// The term its `Leader` record opens: the last record's term plus one, set once it
    /// has caught up with the ledger (0 before).
    pub(super) number: u64,
    pub(super) replica: &'a mut Replica,
    pub(super) ledger: &'a mut Ledger,
    /// Read before every loop turn and every append: this replica acts only while it holds
    /// a valid lease.
    pub(super) election: &'a mut Election,
    pub(super) snapshotter: &'a mut Snapshotter,
    pub(super) cfg: &'a BrokerConfig,
    pub(super) io: &'a Io,
}

/// The leader's subscriptions, open for its term.
pub(super) struct Subscriptions {
    slave: Subscriber,
    status: Subscriber,
    admin: Subscriber,
    replica: Subscriber,
}

impl Subscriptions {
    pub(super) async fn open(io: &Io) -> anyhow::Result<Self> {
        let (client, subjects) = (&io.client, &io.subjects);
        let slave = client
            .subscribe(subjects.all_slave_ops())
            .await
            .context("cannot subscribe to slave requests")?;
        let status = client
            .subscribe(subjects.status())
            .await
            .context("cannot subscribe to status requests")?;
        let admin = client
            .subscribe(subjects.admin_all())
            .await
            .context("cannot subscribe to admin requests")?;
        let replica = client
            .subscribe(subjects.replica())
            .await
            .context("cannot subscribe to replica beats")?;
        Ok(Self {
            slave,
            status,
            admin,
            replica,
        })
    }

    async fn close(&mut self) {
        for sub in [
            &mut self.slave,
            &mut self.status,
            &mut self.admin,
            &mut self.replica,
        ] {
            let _ = sub.unsubscribe().await;
        }
    }
}

/// A leader serving its term: what [`Term`] lent it, its subscriptions and the state of the
/// loop. Its methods that await take `&mut self`: the broker's future must be `Send`, and a
/// `&Leader` held across an await would need the appends in flight to be `Sync`.
pub(super) struct Leader<'a> {
    term: u64,
    replica: &'a mut Replica,
    ledger: &'a mut Ledger,
    election: &'a mut Election,
    snapshotter: &'a mut Snapshotter,
    cfg: &'a BrokerConfig,
    io: &'a Io,
    subscriptions: Subscriptions,
    /// Appends in flight: decisions go on while earlier ones are being recorded; each is
    /// answered once its append is acknowledged (the `pipeline` module).
    pipeline: Pipeline<Decided>,
    /// How often what was in flight was sent again ([`Leader::settle`]), this term.
    resends: u64,
    /// Sending again now (until an acknowledgement comes).
    resending: bool,
    /// The ledger records again after a stall: tell the slaves once `no_leader` stops.
    ready_again: bool,
    /// JetStream's stream-leader elections: while resending, one means send again now.
    news: watch::Receiver<u64>,
    /// The other replicas, from their beats.
    replicas: Replicas,
    /// Budgets and bad-message summaries for what slaves and clients send.
    intake: Intake,
    /// Vendor syncs finished beside the loop (`vendor_sync`); one at a time (`syncing`), so
    /// the channel (bound 1) is never full.
    sync_done: (mpsc::Sender<SyncDone>, mpsc::Receiver<SyncDone>),
    syncing: bool,
    /// The schedule does not sync before this after a failed sync.
    sync_retry_at: Option<Instant>,
}

/// How long the schedule waits after a failed sync before it asks again (at most).
const SYNC_RETRY: Duration = Duration::from_secs(3600);

/// How the loop goes on after one of its arms.
enum Turn {
    /// Record what the arm decided (often nothing), then take a snapshot if one is due.
    Decided(Vec<Decided>),
    /// Wait for the next event straight away.
    Wait,
    /// The term is over.
    End(Led),
}

impl<'a> Leader<'a> {
    pub(super) fn new(term: Term<'a>, subscriptions: Subscriptions) -> Self {
        let Term {
            lease: _,
            number,
            replica,
            ledger,
            election,
            snapshotter,
            cfg,
            io,
        } = term;
        Self {
            term: number,
            replica,
            ledger,
            election,
            snapshotter,
            cfg,
            io,
            subscriptions,
            pipeline: Pipeline::default(),
            resends: 0,
            resending: false,
            ready_again: false,
            news: crate::jetstream::fresh(&io.news),
            replicas: Replicas::new(&cfg.broker_id, now(), cfg.lease * 3 / 2, cfg.lease * 3 / 2),
            intake: Intake::new(
                Budgets::for_rate_limit(cfg.slave_rate_limit),
                &cfg.broker_id,
            ),
            sync_done: mpsc::channel(1),
            syncing: false,
            sync_retry_at: None,
        }
    }

    /// The `leader_elected` alert.
    pub(super) async fn announce(&mut self, caught_up: u64, started: Instant) {
        let (cfg, term) = (self.cfg, self.term);
        self.io.alert(
            Alert::new(
                Severity::Info,
                AlertKind::LeaderElected,
                format!(
                    "broker {} leads cluster {} in term {term}: it won the free lease (priority {}) and caught up with the ledger to sequence {caught_up} in {}; {} in use",
                    cfg.broker_id,
                    cfg.cluster,
                    cfg.priority,
                    duration(started.elapsed()),
                    plural(u64::from(self.replica.engine.total_in_use()), "seat", "seats")
                ),
            )
            .counts(std::collections::BTreeMap::from([(
                "total".to_owned(),
                self.replica.engine.total_in_use(),
            )])),
        )
        .await;
        info!(cluster = %cfg.cluster, term, subject = %self.io.subjects.all_slave_ops(), "leading");
    }

    /// The loop: one turn per event, each begun by checking the lease.
    /// While the ledger stalls ([`STALLED`]), `not_ready` is set: the replica answers slave
    /// requests with `no_leader` as during an election (`tasks::answer_while_electing`), so
    /// slaves ride through within their election wait instead of counting this master as
    /// lost after their shorter failover wait; the loop reads no slave request meanwhile
    /// (they wait in its subscription).
    pub(super) async fn serve<S: Future<Output = ()> + Unpin>(
        mut self,
        shutdown: &mut S,
        not_ready: &watch::Sender<bool>,
    ) -> Led {
        let mut ticker = tokio::time::interval(self.cfg.tick_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let ended = loop {
            let valid_until = match self.valid_until() {
                Ok(at) => at,
                Err(end) => break end,
            };
            let oldest = self.pipeline.oldest_sent();
            let stalled = oldest.is_some_and(|age| age >= STALLED);
            not_ready.send_if_modified(|was| std::mem::replace(was, stalled) != stalled);
            if !stalled && std::mem::take(&mut self.ready_again) {
                self.io.carry_out(None, ready_again(self.replica)).await;
            }
            // When the oldest append in flight will count as stalled.
            let stalls_at = Instant::now() + STALLED.saturating_sub(oldest.unwrap_or_default());
            let turn = tokio::select! {
                _ = &mut *shutdown => break Led::Shutdown,
                _ = self.election.role.changed() => continue,
                _ = tokio::time::sleep_until(valid_until) => continue,
                _ = tokio::time::sleep_until(stalls_at), if oldest.is_some() && !stalled => continue,
                acked = self.pipeline.next(), if !self.pipeline.is_empty() => {
                    self.on_acked(acked).await
                }
                // The ledger stream has a leader again: what waits for an acknowledgement
                // that will not come is sent again now, not after its timeout.
                _ = crate::jetstream::next_news(&mut self.news), if self.resending => {
                    match self.resend().await {
                        Some(end) => Turn::End(end),
                        None => Turn::Wait,
                    }
                }
                // Not while stalled: slaves are answered `no_leader` then, and a request
                // decided now would be decided again when its sender retries (refused as a
                // replay, then renumbered by the slave).
                msg = self.subscriptions.slave.next(), if self.pipeline.has_room() && !stalled => {
                    self.on_slave_requests(msg)
                }
                msg = self.subscriptions.status.next() => self.on_status(msg).await,
                msg = self.subscriptions.admin.next() => self.on_admin(msg).await,
                msg = self.subscriptions.replica.next() => self.on_replica_beat(msg).await,
                Some(done) = self.sync_done.1.recv() => self.on_sync_done(done).await,
                _ = ticker.tick() => self.on_tick(valid_until).await,
            };
            match turn {
                Turn::Decided(batch) => {
                    if let Some(end) = self.record(batch).await {
                        break end;
                    }
                }
                Turn::Wait => continue,
                Turn::End(end) => break end,
            }
        };
        let ended = match ended {
            // The engine holds decisions the ledger may not: rebuild it from the ledger.
            Led::SteppedDown { reason, rebuild } => Led::SteppedDown {
                reason,
                rebuild: rebuild || !self.pipeline.is_empty(),
            },
            // Answer what is already on its way to the ledger before leaving.
            Led::Shutdown => {
                let _ = self.settle_all().await;
                Led::Shutdown
            }
        };
        self.subscriptions.close().await;
        ended
    }

    /// Until when this replica may act in this turn; `Err` when it no longer leads.
    fn valid_until(&mut self) -> Result<Instant, Led> {
        let valid_until = match *self.election.role.borrow_and_update() {
            _ if self.cfg.fault_ignore_lease => Instant::now() + Duration::from_secs(86_400 * 365),
            Role::Leader { valid_until, .. } => valid_until,
            Role::Standby { ref leader, after } => {
                return Err(Led::SteppedDown {
                    reason: match (leader, after) {
                        (Some(other), _) => format!("{other} holds the lease"),
                        (None, Some(why)) => why.to_string(),
                        (None, None) => "the lease was lost".to_owned(),
                    },
                    rebuild: false,
                });
            }
        };
        // Checked first, on this replica's own clock: after a pause (SIGSTOP, a stalled
        // VM) several branches of the loop are ready at once, and none of them may act,
        // alert or decide for a term this replica may no longer hold.
        if Instant::now() >= valid_until {
            return Err(Led::SteppedDown {
                reason: "the lease ran out on this replica's clock before a renewal came back (the process was paused, or the renewals did not get through)".to_owned(),
                rebuild: false,
            });
        }
        Ok(valid_until)
    }

    /// An append in flight was acknowledged (or failed).
    async fn on_acked(&mut self, acked: Acked<Decided>) -> Turn {
        match self.settle(acked).await {
            Some(end) => Turn::End(end),
            None => Turn::Wait,
        }
    }

    /// Sets the wall clock the engine's next decisions are made at: what a grant records as
    /// its seat's "since" (every replica then reads it from the ledger record, not from its
    /// own clock at replay) and what the offline limit is compared with.
    fn set_wall_clock(&mut self) {
        self.replica
            .engine
            .set_wall_clock(self.cfg.wall_clock.unix_ms());
        if let Some(watch) = &self.io.production {
            let refusal = watch.refusal(self.cfg.lease);
            let handback_due = refusal.as_ref().is_some_and(|(reason, _, alive_for)| {
                *reason == lmbus_schemas::RejectReason::ProductionAvailable
                    && *alive_for >= self.cfg.handback_window
                    && !alive_for.is_zero()
            });
            self.replica
                .engine
                .set_production_alive(refusal.map(|(reason, why, _)| (reason, why)), handback_due);
            let heard = watch.production_heard(self.cfg.lease);
            self.replica
                .usage
                .set_overlapping(super::clock::unix_ms(), heard);
            watch.set_held(self.replica.engine.total_in_use());
        }
        if let Some(backups) = &self.io.backups {
            let in_use = backups.in_use(self.cfg.lease);
            self.replica
                .usage
                .set_overlapping(super::clock::unix_ms(), in_use);
        }
    }

    /// Slave requests: the first, and what is already waiting behind it.
    fn on_slave_requests(&mut self, msg: Option<Message>) -> Turn {
        let Some(msg) = msg else {
            return Turn::End(closed("slave requests"));
        };
        let mut batch = Vec::new();
        let mut next = Some(msg);
        // Group commit: decide what is already waiting in the same append. Dropped messages
        // count towards the batch so a flood cannot hold the loop here.
        let mut seen = 0;
        while let Some(msg) = next.take() {
            seen += 1;
            let arrived = Instant::now();
            self.set_wall_clock();
            if let Some(Intook { reply_to, out, op }) = handle_slave_message(
                &mut self.replica.engine,
                &mut self.intake,
                &self.io.subjects,
                &msg,
            ) {
                batch.push(Decided {
                    reply_to,
                    out,
                    timing: Timing::of(op, arrived),
                });
            }
            if seen < MAX_BATCH {
                next = self.subscriptions.slave.next().now_or_never().flatten();
            }
        }
        Turn::Decided(batch)
    }

    /// A status request (`admin status`, the monitor).
    async fn on_status(&mut self, msg: Option<Message>) -> Turn {
        let Some(msg) = msg else {
            return Turn::End(closed("status requests"));
        };
        if client_reply_ok(&mut self.intake, "status requests", &msg) {
            self.set_wall_clock();
            let mut status = self.replica.engine.status(now());
            status.leader_term = self.term;
            status.ledger_sequence = self.replica.applied;
            status.replicas = self.replicas.status(now());
            // An undecodable request still gets the status, without an agent list.
            let request: lmbus_schemas::StatusRequest =
                lmbus_schemas::decode(&msg.payload).unwrap_or_default();
            match request.agents_of {
                Some(slave) if request.seat_details => {
                    status.seats = self.replica.engine.seats_of(&slave);
                }
                Some(slave) => status.agents = self.replica.engine.agents_of(&slave),
                None => {}
            }
            self.io.status(&msg, status).await;
        }
        Turn::Decided(Vec::new())
    }

    /// An operator's request on `admin.>`.
    async fn on_admin(&mut self, msg: Option<Message>) -> Turn {
        let Some(msg) = msg else {
            return Turn::End(closed("admin requests"));
        };
        if !client_reply_ok(&mut self.intake, "admin requests", &msg) {
            return Turn::Decided(Vec::new());
        }
        self.set_wall_clock();
        let subjects = &self.io.subjects;
        let subject = msg.subject.as_str();
        if subject == subjects.admin_report() {
            let period = self.replica.usage.so_far(unix_ms());
            spawn_report(
                self.io,
                &self.cfg.report,
                self.replica.license_facts(),
                period,
                false,
                msg.reply.clone(),
            );
            return Turn::Wait;
        }
        if subject == subjects.admin_sync_export() {
            return self.on_sync_export(&msg).await;
        }
        if subject == subjects.admin_sync_import() {
            return self.on_sync_import(&msg).await;
        }
        if subject == subjects.admin_sync() {
            let request: lmbus_schemas::SyncNowRequest = match decode(&msg.payload) {
                Ok(request) => request,
                Err(e) => {
                    let mut out = bad_message(&mut self.replica.engine, &msg, &e);
                    out.reply = None;
                    self.io.carry_out(None, out).await;
                    let reply = SyncNowReply::Error {
                        message: e.to_string(),
                    };
                    if let Some(to) = &msg.reply {
                        self.io.send(to.clone(), &reply, "admin reply").await;
                    }
                    return Turn::Wait;
                }
            };
            if self.syncing {
                if let Some(to) = &msg.reply {
                    let reply = SyncNowReply::Error {
                        message: "a vendor sync is in progress: wait for its alert".into(),
                    };
                    self.io.send(to.clone(), &reply, "admin reply").await;
                }
                return Turn::Wait;
            }
            self.start_sync(request.operator, msg.reply.clone());
            return Turn::Wait;
        }
        let out = if subject == subjects.admin_reload() {
            admin_reload(&mut self.replica.engine, &msg)
        } else if subject == subjects.admin_release() {
            admin_release(&mut self.replica.engine, &msg)
        } else if subject == subjects.admin_forget() {
            admin_forget(&mut self.replica.engine, &msg)
        } else {
            // `admin.drain` and `admin.undrain` are answered by the replica they name
            // (`answer_drain_requests`).
            return Turn::Wait;
        };
        // Admin changes are recorded on their own, after everything in flight.
        if let Some(end) = self.settle_all().await {
            return Turn::End(end);
        }
        let changes = out.changes.clone();
        if let Some(end) = self.commit_all(changes).await {
            return Turn::End(end);
        }
        // An answer without a record (a refused reload, say) is not checked by an append.
        if let Some(end) = self.lapsed_now() {
            return Turn::End(end);
        }
        self.io.carry_out(msg.reply.as_ref(), out).await;
        Turn::Decided(Vec::new())
    }

    /// Starts a vendor sync beside the loop (`vendor_sync`), with the usage summary of the
    /// period so far: per type and in total, no agent or slave ids.
    fn start_sync(&mut self, operator: String, reply_to: Option<Subject>) {
        self.syncing = true;
        let summary = self.usage_summary();
        let engine = &self.replica.engine;
        spawn_sync(
            self.io,
            Ask {
                vendor_key: self.cfg.vendor_key,
                license: engine.config().license.id,
                installation: engine.installation().unwrap_or_default(),
                installation_key: engine.installation_key().map(str::to_owned),
                summary,
                operator,
                reply_to,
            },
            self.sync_done.0.clone(),
        );
    }

    /// What a sync tells the vendor about usage: the period so far, per type and in total,
    /// and the slaves connected; no agent or slave ids.
    fn usage_summary(&self) -> Option<UsageSummary> {
        let engine = &self.replica.engine;
        self.replica.usage.so_far(unix_ms()).map(|w| {
            let usage = |(peak, average): (u32, f64)| SeatUsage { peak, average };
            UsageSummary {
                context: engine.config().license.context.token().to_owned(),
                period_start_ms: w.start_ms,
                period_end_ms: w.end_ms,
                counted_from_ms: w.covered_from_ms,
                total: usage(w.total),
                by_type: w.types.into_iter().map(|(t, u)| (t, usage(u))).collect(),
                slaves_connected: engine.slave_counts().0,
                // Counted from the alert stream by the sync task (`vendor_sync`).
                rejections: Default::default(),
                events: Default::default(),
                events_counted: false,
            }
        })
    }

    /// `admin sync export`: a sync request for an air-gapped site, its id recorded
    /// (`SyncExported`) so that its answer, imported later, applies once.
    async fn on_sync_export(&mut self, msg: &Message) -> Turn {
        let request: lmbus_schemas::SyncExportRequest = match decode(&msg.payload) {
            Ok(request) => request,
            Err(e) => return self.admin_undecodable(msg, e).await,
        };
        let sync = uuid::Uuid::new_v4();
        let out = self
            .replica
            .engine
            .handle(now(), Event::SyncExported { sync });
        if let Some(end) = self.settle_all().await {
            return Turn::End(end);
        }
        if let Some(end) = self.commit_all(out.changes).await {
            return Turn::End(end);
        }
        let exported = lmbus_schemas::SyncRequest {
            sync,
            license: self.replica.engine.config().license.id,
            cluster: self.cfg.cluster.clone(),
            installation: self.replica.engine.installation().unwrap_or_default(),
            summary: self.usage_summary(),
            signed: None,
        };
        // The event counts are read from the alert stream in a task, as for a sync over
        // NATS, so the loop goes on serving meanwhile.
        super::vendor_sync::spawn_export(
            self.io,
            exported,
            self.replica.engine.installation_key().map(str::to_owned),
            lmbus_schemas::printable(&request.operator).into_owned(),
            msg.reply.clone(),
        );
        Turn::Decided(Vec::new())
    }

    /// `admin sync import`: the vendor's answer to an exported request, taken in like a
    /// sync over NATS, only when it is signed by the vendor and answers a request exported
    /// here and not applied yet.
    async fn on_sync_import(&mut self, msg: &Message) -> Turn {
        let request: lmbus_schemas::SyncImportRequest = match decode(&msg.payload) {
            Ok(request) => request,
            Err(e) => return self.admin_undecodable(msg, e).await,
        };
        if self.syncing {
            if let Some(to) = &msg.reply {
                let reply = SyncNowReply::Error {
                    message: "a vendor sync is in progress: import when its alert is out".into(),
                };
                self.io.send(to.clone(), &reply, "admin reply").await;
            }
            return Turn::Wait;
        }
        let (sync, result) = match lmbus_schemas::open_sync_answer(
            &request.answer,
            &self.cfg.vendor_key,
        ) {
            Ok(answer) if self.replica.engine.awaits_import(answer.sync) => {
                (answer.sync, Ok(answer))
            }
            Ok(answer) => (
                answer.sync,
                Err(format!(
                    "the answer is for sync request {}, which this installation did not export or has applied already: an answer applies once, to the request it answers",
                    answer.sync
                )),
            ),
            Err(e) => (uuid::Uuid::nil(), Err(e.to_string())),
        };
        self.syncing = true;
        // An import that fails (a wrong, stale or forged file) says nothing of whether the
        // vendor can be reached: the schedule keeps its own retry time.
        let retry_at = self.sync_retry_at;
        let failed = result.as_ref().map_or(true, |a| a.refused.is_some());
        let turn = self
            .on_sync_done(SyncDone {
                reply_to: msg.reply.clone(),
                operator: request.operator,
                sync,
                result,
            })
            .await;
        if failed {
            self.sync_retry_at = retry_at;
        }
        turn
    }

    /// An admin request that does not decode: a `bad_message` alert, and the error to the
    /// asker.
    async fn admin_undecodable(&mut self, msg: &Message, e: lmbus_schemas::DecodeError) -> Turn {
        let out = bad_message(&mut self.replica.engine, msg, &e);
        self.io.carry_out(None, out).await;
        if let Some(to) = &msg.reply {
            let reply = SyncNowReply::Error {
                message: e.to_string(),
            };
            self.io.send(to.clone(), &reply, "admin reply").await;
        }
        Turn::Wait
    }

    /// The schedule (`--sync-every`, for a license with an offline limit): due when the
    /// last sync in the ledger is that old, and not before `sync_retry_at` after a failure.
    fn sync_due(&self) -> bool {
        let every = self.cfg.sync_every;
        let engine = &self.replica.engine;
        !self.syncing
            && !every.is_zero()
            && engine.config().license.sync_within_days.is_some()
            && self.sync_retry_at.is_none_or(|at| Instant::now() >= at)
            && self.cfg.wall_clock.unix_ms()
                >= engine
                    .last_sync_ms()
                    .saturating_add(u64::try_from(every.as_millis()).unwrap_or(u64::MAX))
    }

    /// A vendor sync finished: a verified answer's license goes through the engine's reload
    /// (as `admin reload-license`), then the sync is recorded (`Synced`); a failure or a
    /// refusal changes nothing and says why in a `vendor_sync` alert.
    async fn on_sync_done(&mut self, done: SyncDone) -> Turn {
        self.syncing = false;
        // After a failure the schedule waits (an hour at most) before it asks again.
        self.sync_retry_at = (done.result.is_err()
            || done.result.as_ref().is_ok_and(|a| a.refused.is_some()))
        .then(|| Instant::now() + self.cfg.sync_every.min(SYNC_RETRY));
        self.set_wall_clock();
        let who = if done.operator.is_empty() {
            "an operator".to_owned()
        } else {
            lmbus_schemas::printable(&done.operator).into_owned()
        };
        let failed = |message: String| {
            (
                SyncNowReply::Error {
                    message: message.clone(),
                },
                Alert::new(
                    Severity::Warning,
                    AlertKind::VendorSync,
                    format!("vendor sync {} asked by {who} failed: {message}", done.sync),
                ),
            )
        };
        let answer = match done.result {
            Ok(answer) => answer,
            Err(message) => {
                let (reply, alert) = failed(message);
                return self
                    .sync_answered(done.reply_to, reply, Output::default(), alert)
                    .await;
            }
        };
        if let Some(why) = answer.refused {
            let (reply, alert) = failed(format!(
                "the vendor refused: {}",
                lmbus_schemas::printable(&why)
            ));
            return self
                .sync_answered(done.reply_to, reply, Output::default(), alert)
                .await;
        }
        let mut out = Output::default();
        let mut said = String::new();
        if let Some(text) = answer.license {
            let reloaded = self.replica.engine.handle(
                now(),
                Event::Reload {
                    request: ReloadRequest {
                        license: text,
                        operator: format!("vendor sync {}", done.sync),
                        file: "the vendor's answer".into(),
                    },
                    today: today_utc(),
                },
            );
            match &reloaded.reply {
                Some(Answer::Reload(ReloadReply::Reloaded { message })) => {
                    said = format!("; {message}");
                }
                Some(Answer::Reload(ReloadReply::Error { message })) => {
                    let (reply, alert) =
                        failed(format!("the vendor's license is refused: {message}"));
                    let mut refused = reloaded.clone();
                    refused.reply = None;
                    return self
                        .sync_answered(done.reply_to, reply, refused, alert)
                        .await;
                }
                _ => {}
            }
            out.effects.extend(reloaded.effects);
            out.changes.extend(reloaded.changes);
        }
        // The sync counts from when the vendor answered (its signed time), never later than
        // this leader's wall clock: a leader whose clock runs ahead cannot push the deadline
        // out by syncing, and an answer held back (an air-gapped import weeks later)
        // restarts the clock from the day the vendor gave it, not from the import.
        // (The engine takes the earlier of the two, against its own clock, which a clock
        // set back cannot move back: see `offline`.)
        self.set_wall_clock();
        let wall_ms = self.cfg.wall_clock.unix_ms();
        let at_ms = answer.at_ms;
        let ahead = if wall_ms.saturating_sub(answer.at_ms) > 3_600_000 {
            format!(
                "; this leader's clock is {} ahead of the vendor's answer: the offline limit counts from the vendor's time",
                lmbus_schemas::human::duration(Duration::from_millis(wall_ms - answer.at_ms))
            )
        } else {
            String::new()
        };
        let synced = self.replica.engine.handle(
            now(),
            Event::Synced {
                at_ms,
                sync: done.sync,
            },
        );
        out.effects.extend(synced.effects);
        out.changes.extend(synced.changes);
        let message = format!(
            "vendor sync {} succeeded (the vendor answered at {} ms after 1970){said}{ahead}",
            done.sync, answer.at_ms
        );
        let alert = Alert::new(
            Severity::Info,
            AlertKind::VendorSync,
            format!("{who} synced with the vendor: {message}"),
        );
        self.sync_answered(done.reply_to, SyncNowReply::Synced { message }, out, alert)
            .await
    }

    /// Records what a sync changed, then tells: the effects, the alert and the operator.
    async fn sync_answered(
        &mut self,
        reply_to: Option<Subject>,
        reply: SyncNowReply,
        out: Output,
        alert: Alert,
    ) -> Turn {
        if !out.changes.is_empty() {
            if let Some(end) = self.settle_all().await {
                return Turn::End(end);
            }
            if let Some(end) = self.commit_all(out.changes.clone()).await {
                return Turn::End(end);
            }
        }
        self.io.carry_out(None, out).await;
        self.io.alert(alert).await;
        if let Some(to) = reply_to {
            self.io.send(to, &reply, "admin reply").await;
        }
        Turn::Decided(Vec::new())
    }

    /// Another replica's beat (or our own).
    async fn on_replica_beat(&mut self, msg: Option<Message>) -> Turn {
        let Some(msg) = msg else {
            return Turn::End(closed("replica beats"));
        };
        // Beats read just after a pause past the lease: this replica says nothing of them.
        if let Some(end) = self.lapsed_now() {
            return Turn::End(end);
        }
        match decode::<ReplicaBeat>(&msg.payload) {
            Ok(beat) => {
                for alert in self.replicas.observe(now(), beat) {
                    self.io.alert(alert).await;
                }
            }
            Err(e) => {
                let out = bad_message(&mut self.replica.engine, &msg, &e);
                self.io.carry_out(None, out).await;
            }
        }
        Turn::Decided(Vec::new())
    }

    /// The engine's timers, the metrics gauges, the replicas' and intake's summaries, and
    /// the report period.
    async fn on_tick(&mut self, valid_until: Instant) -> Turn {
        if Instant::now() >= valid_until {
            return Turn::Wait;
        }
        // While the ledger stalls, slave requests and heartbeats wait unread: the engine's
        // timers (silence, reclaims) must not run on a clock that hears nobody.
        if self
            .pipeline
            .oldest_sent()
            .is_some_and(|age| age >= STALLED)
        {
            return Turn::Wait;
        }
        self.set_wall_clock();
        if self.sync_due() {
            self.start_sync("the sync schedule (--sync-every)".into(), None);
        }
        let (replica, io) = (&mut *self.replica, self.io);
        let out = replica
            .engine
            .handle(now(), Event::Tick { today: today_utc() });
        let batch = vec![Decided {
            reply_to: None,
            out,
            timing: None,
        }];
        let (slaves_connected, slaves_known) = replica.engine.slave_counts();
        io.metrics.set_gauges(Some(Gauges {
            seats_by_type: replica.engine.in_use_by_type().clone(),
            seats_total: replica.engine.total_in_use(),
            slaves_connected,
            slaves_known,
            allotted_by_type: replica.engine.allotted_by_type().clone(),
            allotted_total: replica.engine.allotted_total(),
            slave_seats: replica.engine.top_slave_seats(SLAVE_SEATS_PAIRS),
            sync_overdue: replica
                .engine
                .sync_deadline_ms()
                .map(|_| replica.engine.sync_overdue()),
        }));
        io.metrics.count_allot(replica.engine.allot_counts());
        io.metrics
            .capacity_moves(&replica.engine.take_capacity_moves());
        for alert in self.replicas.sweep(now()) {
            io.alert(alert).await;
        }
        for alert in self.intake.summaries(now()) {
            io.alert(alert).await;
        }
        replica.observe_usage();
        if let Some(period) = replica.usage.take_closed() {
            spawn_report(
                io,
                &self.cfg.report,
                replica.license_facts(),
                Some(period),
                true,
                None,
            );
        }
        Turn::Decided(batch)
    }

    /// Sends what was decided to the ledger, then starts a snapshot if one is due. `Some`:
    /// the term is over.
    async fn record(&mut self, mut batch: Vec<Decided>) -> Option<Led> {
        let changes: Vec<SeatChange> = batch
            .iter_mut()
            .flat_map(|decided| std::mem::take(&mut decided.out.changes))
            .collect();
        if let Some(end) = self.send_all(changes, batch).await {
            return Some(end);
        }
        if self.snapshotter.due(self.replica) {
            // A snapshot copies the engine at `applied`: nothing may be in flight.
            if let Some(end) = self.settle_all().await {
                return Some(end);
            }
            self.snapshotter.start(self.replica, self.term);
        }
        None
    }

    /// Appends `changes` in as many entries as they need (`split_entries`), each fenced and
    /// under a valid lease. A failure part way leaves the earlier parts recorded and nobody
    /// told of any of them: like a reply lost after its append, which slaves retry.
    async fn commit_all(&mut self, changes: Vec<SeatChange>) -> Option<Led> {
        for changes in crate::ledger::split_entries(changes) {
            let entry = LedgerEntry {
                writer: self.cfg.broker_id.clone(),
                changes,
            };
            let end = self.commit(&entry, Instant::now()).await;
            if end.is_some() {
                return end;
            }
        }
        None
    }

    /// `Some` (step down) unless this replica holds a valid lease now.
    fn lapsed_now(&self) -> Option<Led> {
        lapsed(
            &self.election.role,
            self.cfg.fault_ignore_lease,
            Instant::now(),
        )
    }

    /// Appends `entry` if this replica still holds a valid lease, and waits for it (nothing
    /// may be in flight). `Some` means it must step down (and says why); nothing decided
    /// since the last good append may be told to anyone.
    async fn commit(&mut self, entry: &LedgerEntry, at: Instant) -> Option<Led> {
        if let Some(end) = lapsed(&self.election.role, self.cfg.fault_ignore_lease, at) {
            return Some(end);
        }
        let started = Instant::now();
        match self.ledger.append(entry).await {
            Ok(sequence) => {
                self.io.metrics.ledger_append(started.elapsed());
                self.replica.set_applied(sequence);
                None
            }
            Err(e) => Some(not_recorded(self.io, e).await),
        }
    }

    /// Sends `changes` into the pipeline (in as many entries as they need), `answers`
    /// riding on the last; with no changes the answers wait for what is in flight, or go
    /// out now.
    async fn send_all(&mut self, changes: Vec<SeatChange>, answers: Vec<Decided>) -> Option<Led> {
        if changes.is_empty() {
            // Decided without a record (a refusal, say), perhaps just after a pause (the
            // loop checked the lease before it waited): a replica whose lease ran out
            // tells nobody.
            if let Some(end) = self.lapsed_now() {
                return Some(end);
            }
            if let Some(now) = self.pipeline.hold(answers) {
                answer(self.io, now).await;
            }
            return None;
        }
        let mut parts = crate::ledger::split_entries(changes).into_iter().peekable();
        let mut answers = Some(answers);
        while let Some(changes) = parts.next() {
            if let Some(end) = lapsed(
                &self.election.role,
                self.cfg.fault_ignore_lease,
                Instant::now(),
            ) {
                return Some(end);
            }
            let entry = LedgerEntry {
                writer: self.cfg.broker_id.clone(),
                changes,
            };
            match self.ledger.send(&entry, !self.pipeline.is_empty()).await {
                Ok(sent) => {
                    let released = match parts.peek() {
                        None => answers.take().unwrap_or_default(),
                        Some(_) => Vec::new(),
                    };
                    self.pipeline.push(sent, released);
                }
                Err(e) => return Some(not_recorded(self.io, e).await),
            }
        }
        None
    }

    /// One acknowledgement from the pipeline: on success the record is applied here and its
    /// answers go out; a failure ends the leadership with everything behind it untold. An
    /// append that went unacknowledged (the ledger stream's NATS node died, and JetStream
    /// is electing another) is sent again, with everything behind it, while the lease holds
    /// and within [`RESEND_WITHIN`]: the first resend after the stream has a leader lands
    /// (or is recognised as landed), so the pause ends with NATS's election, not with a
    /// new lmbus one.
    async fn settle(&mut self, acked: Acked<Decided>) -> Option<Led> {
        match acked.result {
            Ok(sequence) => {
                self.io.metrics.ledger_append(acked.took);
                self.replica.set_applied(sequence);
                if std::mem::take(&mut self.resending) {
                    info!(
                        resends = self.resends,
                        sequence, "the ledger acknowledged again after sending again"
                    );
                }
                // The acknowledgement may be read only after a pause (SIGSTOP, a stalled
                // VM) past the lease: the decisions are recorded, but another replica may
                // lead by now, so this one tells nobody (the slaves' retries are answered
                // from the ledger) and steps down.
                if self.lapsed_now().is_some() {
                    return Some(Led::SteppedDown {
                        reason: format!(
                            "the lease ran out while sequence {sequence} was being recorded; its answers were not sent"
                        ),
                        rebuild: true,
                    });
                }
                answer(self.io, acked.answers).await;
                if acked.took >= STALLED {
                    // Slaves were not heard while the ledger stalled: count their silence
                    // from now, as a new leader does; and tell them to send what waits
                    // (they were answered `no_leader` meanwhile) now, not after a back-off
                    // (once `no_leader` answers have stopped: `serve`).
                    self.replica.engine.deaf_until(now());
                    self.ready_again = true;
                }
                None
            }
            Err(AppendError::NoAck(e))
                if self.pipeline.oldest_sent().unwrap_or_default() < RESEND_WITHIN =>
            {
                // Refused at once while the stream has no leader ("no stream found"): do
                // not spin. JetStream announcing the new leader ends the pause.
                let mut news = crate::jetstream::fresh(&self.io.news);
                tokio::select! {
                    _ = tokio::time::sleep(RESEND_PAUSE) => {}
                    _ = crate::jetstream::next_news(&mut news) => {}
                }
                if !self.resending {
                    warn!(error = %e, "a ledger append was not acknowledged; sending what is in flight again while the lease holds");
                }
                self.resend().await
            }
            Err(e) => Some(not_recorded(self.io, e).await),
        }
    }

    /// Sends everything in flight again, if the lease still holds.
    async fn resend(&mut self) -> Option<Led> {
        if let Some(end) = lapsed(
            &self.election.role,
            self.cfg.fault_ignore_lease,
            Instant::now(),
        ) {
            return Some(end);
        }
        self.resends += 1;
        self.resending = true;
        match self.pipeline.resend().await {
            Ok(()) => None,
            Err(e) => Some(not_recorded(self.io, e).await),
        }
    }

    /// Waits for everything in flight, answering as it is recorded.
    async fn settle_all(&mut self) -> Option<Led> {
        while !self.pipeline.is_empty() {
            let acked = self.pipeline.next().await;
            if let Some(end) = self.settle(acked).await {
                return Some(end);
            }
        }
        None
    }
}

/// `new_leader` to every connected slave: this replica decides (again) from now on.
pub(super) fn ready_again(replica: &Replica) -> Output {
    Output {
        effects: replica
            .engine
            .connected_slaves()
            .into_iter()
            .map(|slave| crate::engine::Effect::Control {
                slave,
                message: lmbus_schemas::ControlMessage::NewLeader,
            })
            .collect(),
        ..Output::default()
    }
}

/// One of the leader's subscriptions ended.
fn closed(what: &str) -> Led {
    Led::SteppedDown {
        reason: format!("the NATS subscription for {what} closed"),
        rebuild: false,
    }
}

/// `Some` (step down) unless this replica holds a valid lease at `at`.
pub(super) fn lapsed(role: &watch::Receiver<Role>, ignore_lease: bool, at: Instant) -> Option<Led> {
    let reason = match &*role.borrow() {
        _ if ignore_lease => return None,
        role if role.is_valid_leader(at) => return None,
        Role::Leader { .. } => "the lease ran out".to_owned(),
        Role::Standby {
            leader: Some(other),
            ..
        } => format!("{other} holds the lease"),
        Role::Standby {
            after: Some(why), ..
        } => why.to_string(),
        Role::Standby { .. } => "the lease was lost".to_owned(),
    };
    Some(Led::SteppedDown {
        reason: format!("{reason} before the decisions could be recorded"),
        rebuild: true,
    })
}

/// An append failed: the leader steps down (a refusal is alerted: another replica writes).
pub(super) async fn not_recorded(io: &Io, e: AppendError) -> Led {
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

/// Tells what was decided (replies, alerts, control messages), in decision order.
async fn answer(io: &Io, answers: Vec<Decided>) {
    for decided in answers {
        if let Some(timing) = decided.timing {
            io.observe(
                &decided.out,
                timing.arrived.elapsed(),
                timing.unregistration,
            );
        }
        io.carry_out(decided.reply_to.as_ref(), decided.out).await;
    }
}

/// A decision waiting for its ledger append to be acknowledged.
struct Decided {
    /// Where the reply goes (`None`: no reply is sent).
    reply_to: Option<Subject>,
    out: Output,
    /// Registrations and unregistrations are timed for the metrics.
    timing: Option<Timing>,
}

/// When a registration or unregistration arrived, and which it was.
struct Timing {
    arrived: Instant,
    unregistration: bool,
}

impl Timing {
    /// Registrations and unregistrations are timed for the metrics; nothing else is.
    fn of(op: Option<SlaveOp>, arrived: Instant) -> Option<Self> {
        let unregistration = match op? {
            SlaveOp::Register | SlaveOp::Batch => false,
            SlaveOp::Unregister => true,
            SlaveOp::Hello
            | SlaveOp::Heartbeat
            | SlaveOp::Report
            | SlaveOp::Allot
            | SlaveOp::Goodbye => return None,
        };
        Some(Self {
            arrived,
            unregistration,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader frozen past its lease (SIGSTOP, a stalled VM) and resumed: its own clock
    /// says the lease ran out, so it records nothing more and rebuilds before leading again.
    #[tokio::test(start_paused = true)]
    async fn a_leader_resumed_past_its_lease_stops_recording() {
        let valid_until = Instant::now() + Duration::from_secs(1);
        let (_tx, role) = watch::channel(Role::Leader {
            lease: 1,
            valid_until,
        });
        assert!(lapsed(&role, false, Instant::now()).is_none());
        tokio::time::advance(Duration::from_secs(5)).await;
        match lapsed(&role, false, Instant::now()) {
            Some(Led::SteppedDown { reason, rebuild }) => {
                assert!(rebuild);
                assert!(reason.contains("lease ran out"), "{reason}");
            }
            _ => panic!("a leader past its lease must step down"),
        }
        // The test-only fault keeps it leading, so that only the ledger's fence stops it.
        assert!(lapsed(&role, true, Instant::now()).is_none());
        let (_tx, lost) = watch::channel(Role::Standby {
            leader: None,
            after: None,
        });
        assert!(matches!(
            lapsed(&lost, false, Instant::now()),
            Some(Led::SteppedDown { rebuild: true, .. })
        ));
    }
}
