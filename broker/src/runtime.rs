//! The broker's NATS runtime: one task per replica that owns the [`Engine`], follows the
//! seat ledger while it is a standby, and serves slaves while it holds the leader lease.
//!
//! As leader, requests are handled one at a time, in arrival order, by the task that owns
//! the engine, so there is no lock around seat state and decisions are linearizable.
//! Requests that are already waiting are decided together and their seat changes go into
//! one ledger append (group commit); only after the append is acknowledged do the replies
//! and effects go out. A refused or failed append means this replica may no longer speak
//! for the ledger: it sends none of those replies, steps down, and rebuilds its state
//! from the ledger. Nothing from the network can stop the loop: undecodable payloads
//! become error replies and `bad_message` alerts.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use async_nats::{Client, Message, Subscriber};
use futures::{FutureExt as _, StreamExt};
use lmbus_schemas::{
    Alert, AlertKind, BatchRequest, Decision, LedgerEntry, ReplicaBeat, Reply, ReportReply,
    SeatChange, Severity, SlaveOp, StatusReply, Subjects, WireError, decode, encode,
};
use time::{Date, OffsetDateTime};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::config::{self, BrokerConfig};
use crate::election::{Election, ElectionConfig, Role};
use crate::engine::{Effect, Engine, EngineConfig, Event, Output};
use crate::intake::{BadVerdict, Budgets, Intake};
use crate::ledger::{AppendError, Gap, Ledger, Record};
use crate::metrics::{Gauges, Metrics};
use crate::pipeline::{Acked, Pipeline};
use crate::replicas::Replicas;
use crate::report::{LicenseFacts, ReportConfig, Usage};
use crate::snapshot::{self, Snapshots};

/// How long the final alerts may take to leave when shutting down.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a standby holds back a `no_leader` answer (see `answer_while_electing`).
const NO_LEADER_DELAY: Duration = Duration::from_millis(50);

/// Most waiting requests decided together and committed in one ledger append.
const MAX_BATCH: usize = 256;

/// Most attempts at a new leader's `Leader` record while the ledger stream is not writable
/// yet (each `CATCH_UP_RETRY` apart): only failed appends are retried, never fenced ones.
const MARKER_TRIES: u32 = 100;

/// First and longest pause before following the ledger again after a failure.
const FOLLOW_RETRY: Duration = Duration::from_millis(200);
const FOLLOW_RETRY_CAP: Duration = Duration::from_secs(5);

/// How long a new leader may take to read the ledger up to its end.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between a new leader's attempts to read a ledger that is not reachable yet.
const CATCH_UP_RETRY: Duration = Duration::from_millis(100);

fn today_utc() -> Date {
    OffsetDateTime::now_utc().date()
}

fn unix_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Messages the NATS client buffers per subscription before it drops (async-nats: 65,536).
const SUBSCRIPTION_CAPACITY: usize = 256 * 1024;

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The seat state this replica holds and how far into the ledger it is.
struct Replica {
    engine: Engine,
    /// Sequence of the last ledger record applied (or written) here.
    applied: u64,
    /// `applied`, for the presence task's beats.
    shared: Arc<AtomicU64>,
    /// Seat usage of the report period, fed after every record; carried over when the
    /// replica is rebuilt.
    usage: Usage,
    /// Quarantined ledger records (sequence, why) not reported in an alert yet: the
    /// leader reports them when it starts leading. At most [`MAX_QUARANTINED`] are kept.
    quarantined: Vec<(u64, String)>,
    /// The replica whose term the ledger is in at `applied` (from the last `Leader`
    /// record, or the loaded snapshot's writer); `None` before any.
    leader: Option<String>,
}

/// Most quarantined ledger records remembered for the next alert.
const MAX_QUARANTINED: usize = 16;

impl Replica {
    fn new(cfg: &EngineConfig, shared: Arc<AtomicU64>, usage: Usage) -> Self {
        shared.store(0, Ordering::Relaxed);
        Self {
            engine: Engine::new(cfg.clone()),
            applied: 0,
            shared,
            usage,
            quarantined: Vec::new(),
            leader: None,
        }
    }

    fn set_applied(&mut self, sequence: u64) {
        self.applied = sequence;
        self.shared.store(sequence, Ordering::Relaxed);
        self.observe_usage();
    }

    fn observe_usage(&mut self) {
        self.usage.observe(
            unix_ms(),
            self.engine.in_use_by_type(),
            self.engine.total_in_use(),
        );
    }

    /// What a usage report needs from the license in force.
    fn license_facts(&self) -> LicenseFacts {
        let license = &self.engine.config().license;
        LicenseFacts {
            id: license.id.to_string(),
            customer: license.customer.clone(),
            context: license.context.to_string(),
            total: license.limits.total,
            types: license.limits.agent_types.clone(),
        }
    }

    fn apply(&mut self, record: &Record) -> anyhow::Result<()> {
        if record.sequence <= self.applied {
            return Ok(());
        }
        if record.sequence != self.applied + 1 {
            return Err(Gap {
                expected: self.applied + 1,
                found: record.sequence,
            }
            .into());
        }
        // Who leads from here: a term starts with its leader's `Leader` record, and every
        // other record of the term is that leader's. One written by anyone else was not
        // written by the replica the ledger follows (fencing stops a deposed leader), so it
        // is quarantined like garbage.
        let marker = match record.entry.changes.first() {
            Some(SeatChange::Leader { replica, .. }) => Some(replica.clone()),
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
        if let Some(leader) = marker {
            self.leader = Some(leader);
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
            self.engine.apply(now(), change).map_err(|e| {
                anyhow!(
                    "ledger record {} (written by {}) cannot be applied: {e}",
                    record.sequence,
                    record.entry.writer
                )
            })?;
        }
        self.set_applied(record.sequence);
        Ok(())
    }
}

/// How a stretch as standby ended.
enum Followed {
    Elected {
        term: u64,
    },
    Shutdown,
    /// Reading the ledger failed (NATS unreachable, consumer lost): try again.
    Interrupted(anyhow::Error),
}

/// How a stretch as leader ended.
enum Led {
    Shutdown,
    SteppedDown {
        reason: String,
        /// The engine may hold changes the ledger does not: rebuild it from the ledger.
        rebuild: bool,
    },
}

/// A replica built from the latest snapshot (or empty when there is none), ready to follow
/// the ledger from the record after it.
async fn restore(
    cfg: &EngineConfig,
    shared: Arc<AtomicU64>,
    snapshots: &Snapshots,
    usage: Usage,
) -> anyhow::Result<Replica> {
    let started = Instant::now();
    let mut replica = Replica::new(cfg, shared, usage);
    let Some(loaded) = snapshots.load_latest().await? else {
        return Ok(replica);
    };
    let now = now();
    for change in &loaded.changes {
        replica.engine.apply(now, change).map_err(|e| {
            anyhow!(
                "the snapshot at ledger sequence {} cannot be applied: {e}",
                loaded.manifest.ledger_sequence
            )
        })?;
    }
    replica.set_applied(loaded.manifest.ledger_sequence);
    // The snapshot was taken by the leader of the term it ends in.
    replica.leader = Some(loaded.manifest.writer.clone());
    info!(
        ledger_sequence = loaded.manifest.ledger_sequence,
        seats = loaded.manifest.seats,
        slaves = loaded.manifest.slaves,
        took = ?started.elapsed(),
        "loaded the latest snapshot"
    );
    Ok(replica)
}

/// Writes the leader's snapshots every `every` ledger records, one at a time, in a task
/// beside it (the leader only pays for copying the state).
struct Snapshotter {
    snapshots: Snapshots,
    ledger: Ledger,
    every: u64,
    trim: bool,
    writer: String,
    /// Ledger sequence of the newest snapshot known here.
    last: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Snapshotter {
    /// Whether a snapshot should be written now: `every` records since the last one and
    /// none being written.
    fn due(&self, replica: &Replica) -> bool {
        self.every != 0
            && replica.applied >= self.last.load(Ordering::Relaxed) + self.every
            && self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Writes a snapshot of the engine as of `replica.applied` (nothing may be in flight).
    fn start(&mut self, replica: &Replica, term: u64) {
        let copied = Instant::now();
        let mut changes = vec![SeatChange::Leader {
            replica: self.writer.clone(),
            term,
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
                        took = ?written.elapsed(),
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

/// Runs one broker replica until `shutdown` completes. Fails before serving anything if
/// the license, the configuration, NATS or JetStream is not usable.
pub async fn run(cfg: BrokerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config::check(&cfg)?;
    let license = config::load_master_license(&cfg.license_path, &cfg.vendor_key, today_utc())?;
    let subjects = Subjects::new(&cfg.cluster)?;
    info!(
        license = %license.id,
        customer = %license.customer,
        total = license.limits.total.unwrap_or(0),
        "master license verified"
    );
    let client = lmbus_nats::connect(
        &cfg.nats_url,
        async_nats::ConnectOptions::new()
            .name(format!("lmbus-broker {}", cfg.broker_id))
            // Room for a burst of every slave's heartbeat at once (100,000 slaves, say) on
            // top of the requests, so that nothing is dropped while the leader catches up.
            .subscription_capacity(SUBSCRIPTION_CAPACITY),
        &cfg.nats_auth,
    )
    .await?;
    info!(nats = %cfg.nats_url, auth = %cfg.nats_auth.describe(), "connected to NATS");
    let mut ledger = Ledger::open(&client, &subjects, cfg.stream_replicas).await?;
    let snapshots = Snapshots::open(&client, &subjects, cfg.stream_replicas).await?;
    crate::alert_log::open(
        &client,
        &subjects,
        cfg.stream_replicas,
        cfg.alert_max_age,
        cfg.alert_max_bytes,
    )
    .await?;
    let mut election = Election::start(
        &client,
        &subjects,
        ElectionConfig {
            replica: cfg.broker_id.clone(),
            priority: cfg.priority,
            lease: cfg.lease,
            replicas: cfg.stream_replicas,
        },
    )
    .await?;

    let engine_cfg = EngineConfig {
        broker_id: cfg.broker_id.clone(),
        cluster: cfg.cluster.clone(),
        license: license.clone(),
        vendor_key: cfg.vendor_key,
        allow_unlicensed_slaves: cfg.allow_unlicensed_slaves,
        missed_heartbeats: cfg.missed_heartbeats,
        counts_interval: cfg.counts_interval,
        expiry_warning_days: cfg.expiry_warning_days,
        max_slaves: cfg.max_slaves,
        reclaim_margin: cfg.reclaim_margin,
        slave_rate_limit: cfg.slave_rate_limit,
        max_agents_per_slave: cfg.max_agents_per_slave,
    };
    let metrics = Metrics::new(
        license.limits.total.unwrap_or(0),
        license.limits.agent_types.clone().into_iter().collect(),
    );
    let io = Io {
        client: client.clone(),
        subjects: subjects.clone(),
        broker_id: cfg.broker_id.clone(),
        metrics: metrics.clone(),
    };
    io.alert(Alert::new(
        Severity::Info,
        AlertKind::BrokerStarted,
        format!(
            "broker {} started as a replica of cluster {} (priority {}) with license {} ({} seats{}); ledger {}",
            cfg.broker_id,
            cfg.cluster,
            cfg.priority,
            license.id,
            license.limits.total.unwrap_or(0),
            if cfg.allow_unlicensed_slaves {
                ", unlicensed slaves allowed"
            } else {
                ""
            },
            ledger.stream_name()
        ),
    ))
    .await;
    client.flush().await.context("cannot reach NATS")?;

    let applied = Arc::new(AtomicU64::new(0));
    let metrics_server = match cfg.metrics {
        Some(addr) => {
            let (bound, task) =
                crate::metrics::serve(addr, metrics.clone(), applied.clone(), ledger.clone())
                    .await?;
            info!("Prometheus metrics on http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let drains = tokio::spawn(drains(
        client.clone(),
        subjects.admin_drain(),
        cfg.broker_id.clone(),
        election.drainer(),
        Io {
            client: client.clone(),
            subjects: subjects.clone(),
            broker_id: cfg.broker_id.clone(),
            metrics: metrics.clone(),
        },
    ));
    let presence = tokio::spawn(presence(
        client.clone(),
        subjects.replica(),
        cfg.clone(),
        election.role.clone(),
        applied.clone(),
    ));
    // True while this replica holds the lease but cannot serve yet (catching up with a
    // ledger whose stream is electing its own leader, say).
    let (not_ready, not_ready_rx) = watch::channel(false);
    let electing = tokio::spawn(answer_while_electing(
        client.clone(),
        subjects.clone(),
        election.electing.clone(),
        not_ready_rx,
    ));
    let usage = Usage::new(cfg.report.at_minute);
    let mut replica = restore(&engine_cfg, applied.clone(), &snapshots, usage.clone())
        .await
        .unwrap_or_else(|e| {
            warn!(error = %format!("{e:#}"), "cannot load the latest snapshot: replaying the ledger from its first record");
            Replica::new(&engine_cfg, applied.clone(), usage)
        });
    let mut snapshotter = Snapshotter {
        snapshots: snapshots.clone(),
        ledger: ledger.clone(),
        every: cfg.snapshot_every,
        trim: cfg.ledger_trim,
        writer: cfg.broker_id.clone(),
        last: Arc::new(AtomicU64::new(replica.applied)),
        task: None,
    };
    tokio::pin!(shutdown);
    // The gap the last snapshot load was for: when the latest snapshot does not close it
    // either, the records are gone for good (purged) and the replica goes on without them.
    let mut last_gap: Option<u64> = None;
    // Grows while following keeps failing, so a ledger that cannot be read costs a
    // consumer every few seconds, not five a second (each lives 30 s on the server).
    let mut retry = FOLLOW_RETRY;
    let result = loop {
        let term = match follow(&mut replica, &ledger, &mut election.role, &mut shutdown).await {
            Ok(Followed::Shutdown) => break Ok(()),
            Ok(Followed::Elected { term }) => term,
            Err(e)
                if e.downcast_ref::<Gap>()
                    .is_some_and(|g| last_gap == Some(g.found)) =>
            {
                let Some(gap) = e.downcast_ref::<Gap>() else {
                    continue;
                };
                let (expected, found) = (gap.expected, gap.found);
                let message = format!(
                    "the ledger {} has no records {expected} to {} and the latest snapshot does not cover them (purged?): going on from the snapshot and record {found}. Seats granted in those records are missing from the master's books until each slave's next heartbeat reconciles them",
                    subjects.ledger_stream(),
                    found - 1
                );
                error!("{message}");
                io.alert(Alert::new(
                    Severity::Critical,
                    AlertKind::BadMessage,
                    message,
                ))
                .await;
                replica.set_applied(found - 1);
                // The skipped records may have opened a term: accept any writer until the
                // next `Leader` record rather than quarantine the current leader's.
                replica.leader = None;
                last_gap = None;
                continue;
            }
            // The records this replica needs next were trimmed: load the snapshot that
            // covers them (retrying while it cannot be read).
            Err(e) if e.downcast_ref::<Gap>().is_some() => {
                let found = e.downcast_ref::<Gap>().map(|g| g.found);
                warn!(error = %format!("{e:#}"), "loading the latest snapshot");
                match restore(
                    &engine_cfg,
                    applied.clone(),
                    &snapshots,
                    replica.usage.clone(),
                )
                .await
                {
                    Ok(restored) => {
                        // Only a snapshot that was read and still ends before the gap
                        // proves the records are gone; a failed read proves nothing.
                        last_gap = found.filter(|f| restored.applied + 1 < *f);
                        replica = restored;
                    }
                    Err(e) => {
                        last_gap = None;
                        warn!(error = %format!("{e:#}"), "cannot load the latest snapshot; retrying");
                        tokio::select! {
                            _ = &mut shutdown => break Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                continue;
            }
            Ok(Followed::Interrupted(e)) => {
                warn!(error = %format!("{e:#}"), ?retry, "following the ledger was interrupted; retrying");
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(FOLLOW_RETRY_CAP);
                continue;
            }
            // A record this replica cannot apply: it must not lead on a wrong state.
            Err(e) => break Err(e),
        };
        retry = FOLLOW_RETRY;
        not_ready.send_replace(true);
        let led = lead(
            &mut replica,
            &mut ledger,
            &mut election,
            term,
            &cfg,
            &io,
            &mut shutdown,
            &not_ready,
            &mut snapshotter,
        )
        .await;
        not_ready.send_replace(false);
        io.metrics.set_gauges(None);
        match led {
            Ok(Led::Shutdown) => break Ok(()),
            Ok(Led::SteppedDown { reason, rebuild }) => {
                election.resign(term);
                io.alert(Alert::new(
                    Severity::Warning,
                    AlertKind::LeaderSteppedDown,
                    format!(
                        "broker {} stopped leading cluster {} (term {term}): {reason}",
                        cfg.broker_id, cfg.cluster
                    ),
                ))
                .await;
                if rebuild {
                    let usage = replica.usage.clone();
                    replica = restore(&engine_cfg, applied.clone(), &snapshots, usage.clone())
                        .await
                        .unwrap_or_else(|e| {
                            warn!(error = %format!("{e:#}"), "cannot load the latest snapshot: replaying the ledger from its first record");
                            Replica::new(&engine_cfg, applied.clone(), usage)
                        });
                }
            }
            Err(e) => break Err(e),
        }
    };

    io.alert(Alert::new(
        Severity::Info,
        AlertKind::BrokerStopped,
        format!(
            "broker {} stopping with {} seats in use",
            cfg.broker_id,
            replica.engine.total_in_use()
        ),
    ))
    .await;
    presence.abort();
    electing.abort();
    drains.abort();
    if let Some(task) = metrics_server {
        task.abort();
    }
    drop(election);
    let closing = async {
        sync_with_server(&client).await;
        let _ = client.drain().await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, closing).await.is_err() {
        warn!("NATS sync and drain did not finish within {DRAIN_TIMEOUT:?}");
    }
    info!("broker stopped");
    result
}

/// Answers `admin drain` requests that name this replica: it stops campaigning and, when
/// leading, resigns; a `replica_drained` alert says which.
async fn drains(
    client: Client,
    subject: String,
    me: String,
    drainer: crate::election::Drainer,
    io: Io,
) {
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, %subject, "cannot subscribe to drain requests");
            return;
        }
    };
    while let Some(msg) = requests.next().await {
        let request = match decode::<lmbus_schemas::DrainRequest>(&msg.payload) {
            Ok(r) if r.replica == me => r,
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
        if let Some(reply_to) = &msg.reply
            && lmbus_schemas::is_client_reply(reply_to)
            && let Ok(bytes) = encode(&lmbus_schemas::DrainReply { message })
        {
            let _ = client.publish(reply_to.clone(), bytes.into()).await;
        }
    }
}

/// Publishes this replica's `ReplicaBeat` four times per lease, so the leader knows its
/// standbys.
async fn presence(
    client: Client,
    subject: String,
    cfg: BrokerConfig,
    role: watch::Receiver<Role>,
    applied: Arc<AtomicU64>,
) {
    let mut every = tokio::time::interval(cfg.lease / 4);
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let beat = ReplicaBeat {
            replica: cfg.broker_id.clone(),
            priority: cfg.priority,
            leader: matches!(*role.borrow(), Role::Leader { .. }),
            applied: applied.load(Ordering::Relaxed),
        };
        if let Ok(bytes) = encode(&beat) {
            if let Err(e) = client.publish(subject.clone(), bytes.into()).await {
                debug!(error = %e, "cannot publish the replica beat");
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
async fn answer_while_electing(
    client: Client,
    subjects: Subjects,
    mut electing: watch::Receiver<bool>,
    mut not_ready: watch::Receiver<bool>,
) {
    let mut sub: Option<Subscriber> = None;
    loop {
        let now_electing = *electing.borrow_and_update() || *not_ready.borrow_and_update();
        match (now_electing, sub.is_some()) {
            (true, false) => match client.subscribe(subjects.all_slave_ops()).await {
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
                let client = client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(NO_LEADER_DELAY).await;
                    if let Ok(bytes) = encode(&reply) {
                        let _ = client.publish(reply_to, bytes.into()).await;
                    }
                });
            }
        }
    }
}

/// Standby: applies ledger records as they are appended until this replica wins the
/// lease. `Err` only for a record that cannot be applied.
async fn follow<S: Future<Output = ()> + Unpin>(
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
async fn catch_up(replica: &mut Replica, ledger: &Ledger) -> anyhow::Result<u64> {
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

/// Leader: catches up, fences the ledger with a `Leader` record, then serves slaves until
/// the lease is lost, a ledger write fails or `shutdown` completes.
#[allow(clippy::too_many_arguments)]
async fn lead<S: Future<Output = ()> + Unpin>(
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

/// Whether a status or admin request may be answered where it asks: an `_INBOX.` subject.
/// A request without a reply subject is served (admin actions are then simply unanswered).
fn client_reply_ok(intake: &mut Intake, source: &str, msg: &Message) -> bool {
    match &msg.reply {
        Some(reply) if !lmbus_schemas::is_client_reply(reply) => {
            intake.foreign_client_reply(now(), source, reply);
            false
        }
        _ => true,
    }
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

/// Waits until the server has processed everything this client published so far, by
/// sending a message to ourselves on a fresh inbox and receiving it (the server keeps a
/// connection's messages in order). `flush` only writes to the socket: a process that exits
/// right after it can lose what the kernel had not delivered yet.
async fn sync_with_server(client: &Client) {
    let inbox = client.new_inbox();
    let Ok(mut echo) = client.subscribe(inbox.clone()).await else {
        return;
    };
    if client.publish(inbox, bytes::Bytes::new()).await.is_ok() {
        let _ = echo.next().await;
    }
}

/// Turns one message on a slave subject into an engine event and runs it.
/// Decides one message on a slave subject; also returns its operation when the subject
/// named one.
/// A slave's message after intake and decoding: what to answer where, or nothing at all.
struct Intook {
    /// Where the answer goes: the checked reply subject (`None`: no answer).
    reply_to: Option<async_nats::Subject>,
    out: Output,
    op: Option<SlaveOp>,
}

/// Takes one slave message through the intake (reply subject, budgets), decoding and
/// validation, then the engine. `None`: dropped undecided (counted by the intake).
fn handle_slave_message(
    engine: &mut Engine,
    intake: &mut Intake,
    subjects: &Subjects,
    msg: &Message,
) -> Option<Intook> {
    let at = now();
    let reply = msg.reply.as_ref().map(|r| r.as_str());
    let (slave, op) = match subjects.parse_slave_op(msg.subject.as_str()) {
        Ok(parsed) => parsed,
        Err(e) => {
            // The subscription's wildcard gives `slave.<token>.<token>`: the first token
            // is the sender (NATS permissions bind it) even when the rest is unknown.
            let sender = subjects.slave_of(msg.subject.as_str());
            let source = sender.as_ref().map_or("unknown slave", |s| s.as_str());
            let answer = intake.bad(at, source, "subject", &e.to_string());
            // An unknown operation (a newer slave's, say) is told so, in its own inbox.
            let home = sender
                .as_ref()
                .zip(reply)
                .is_some_and(|(s, r)| subjects.is_slave_reply(s, r));
            if answer != BadVerdict::Answer || !home {
                return None;
            }
            return Some(Intook {
                reply_to: msg.reply.clone(),
                out: Output {
                    reply: Some(Reply::Error(WireError {
                        code: lmbus_schemas::ErrorCode::Invalid,
                        message: e.to_string(),
                    })),
                    ..Output::default()
                },
                op: None,
            });
        }
    };
    if intake.admit(at, subjects, &slave, op, reply).is_err() {
        return None;
    }
    let reply_to = msg.reply.clone();
    let out = match crate::intake::decode(msg.payload.as_ref(), &slave, op, today_utc()) {
        Ok(crate::intake::Decoded::One(event)) => {
            debug!(%slave, op = op.token(), "request");
            engine.handle(at, event)
        }
        Ok(crate::intake::Decoded::Batch(batch)) => {
            if !intake.charge_batch(at, &slave, batch.items.len()) {
                return None;
            }
            decide_batch(engine, &slave, batch)
        }
        Err(problem) => {
            let answer = intake.bad(at, slave.as_str(), op.token(), &problem.message);
            let reply = (answer == BadVerdict::Answer).then_some(Reply::Error(problem));
            return Some(Intook {
                reply_to: reply.as_ref().and(reply_to),
                out: Output {
                    reply,
                    ..Output::default()
                },
                op: None,
            });
        }
    };
    Some(Intook {
        reply_to,
        out,
        op: Some(op),
    })
}

/// Each item of a batch decided in order, as if it had come alone: one output whose reply
/// is `Reply::Batch` with the items' replies, and whose effects and changes are theirs in
/// order.
fn decide_batch(
    engine: &mut Engine,
    slave: &lmbus_schemas::SlaveId,
    batch: BatchRequest,
) -> Output {
    let mut out = Output::default();
    let mut replies = Vec::with_capacity(batch.items.len());
    for item in batch.items {
        let one = engine.handle(now(), Event::of_batch_item(slave, item));
        // Every registration and unregistration has a reply; `Ack` keeps the count right
        // should one ever not.
        replies.push(one.reply.unwrap_or(Reply::Ack));
        out.effects.extend(one.effects);
        out.changes.extend(one.changes);
    }
    debug!(%slave, items = replies.len(), "batch");
    out.reply = Some(Reply::Batch(replies));
    out
}

/// An operator's request on an admin subject: decoded, decided by `decide`, the reply
/// encoded. Undecodable input gets `refuse`'s reply and a `bad_message` alert.
fn admin_request<Req, Rep>(
    engine: &mut Engine,
    msg: &Message,
    decide: impl FnOnce(&mut Engine, Req) -> (Rep, Output),
    refuse: impl FnOnce(String) -> Rep,
) -> (Vec<u8>, Output)
where
    Req: serde::de::DeserializeOwned,
    Rep: serde::Serialize,
{
    let (reply, out) = match decode::<Req>(&msg.payload) {
        Ok(request) => decide(engine, request),
        Err(e) => {
            let out = engine.handle(
                now(),
                Event::BadMessage {
                    subject: msg.subject.to_string(),
                    slave: None,
                    error: WireError::from(&e),
                },
            );
            (refuse(e.to_string()), out)
        }
    };
    match encode(&reply) {
        Ok(bytes) => (bytes, out),
        Err(e) => {
            warn!(error = %e, "cannot encode an admin reply");
            (Vec::new(), out)
        }
    }
}

/// An operator's release request: the reply, and the effects (the slave is told, an
/// alert) with the seat changes to record first.
fn admin_release(engine: &mut Engine, msg: &Message) -> (Vec<u8>, Output) {
    admin_request(
        engine,
        msg,
        |engine, request: lmbus_schemas::ReleaseRequest| {
            info!(slave = %request.slave_id, agent = ?request.agent_id, operator = %request.operator, "admin release");
            let released = engine.admin_release(&request);
            let out = Output {
                reply: None,
                effects: released.effects,
                changes: released.changes,
            };
            (released.reply, out)
        },
        |message| lmbus_schemas::ReleaseReply::Error { message },
    )
}

/// An operator's license reload: the reply, and the alert with the ledger record to write
/// first.
fn admin_reload(engine: &mut Engine, msg: &Message) -> (Vec<u8>, Output) {
    admin_request(
        engine,
        msg,
        |engine, request: lmbus_schemas::ReloadRequest| {
            info!(operator = %request.operator, "admin reload-license");
            engine.reload_license(&request, today_utc())
        },
        |message| lmbus_schemas::ReloadReply::Error { message },
    )
}

/// Makes a usage report of `period` in a task beside the leader (reading the alert stream
/// and mailing take seconds), raises a `usage_report` alert saying where it went, and
/// answers `reply_to` (an `admin report` request) with it.
fn spawn_report(
    io: &Io,
    cfg: &ReportConfig,
    license: LicenseFacts,
    period: Option<crate::report::UsageWindow>,
    daily: bool,
    reply_to: Option<async_nats::Subject>,
) {
    let io = io.clone();
    let cfg = cfg.clone();
    tokio::spawn(async move {
        let reply = match period {
            None => ReportReply::Error {
                message: "this replica has not counted any usage yet".into(),
            },
            Some(period) => {
                let (report, delivered) = crate::report::make_and_deliver(
                    &cfg,
                    &io.client,
                    &io.subjects,
                    &io.broker_id,
                    &license,
                    &period,
                    daily,
                )
                .await;
                let (severity, problems) = if delivered.problems.is_empty() {
                    (Severity::Info, String::new())
                } else {
                    (
                        Severity::Warning,
                        format!("; problems: {}", delivered.problems.join("; ")),
                    )
                };
                let what = if daily {
                    "daily usage report"
                } else {
                    "usage report"
                };
                let period_text = report.as_ref().map_or_else(String::new, |r| {
                    format!(" for {} to {}", r.period_start, r.period_end)
                });
                io.alert(Alert::new(
                    severity,
                    AlertKind::UsageReport,
                    format!(
                        "{what}{period_text} published on {}; files: {}; mailed to: {}{problems}",
                        io.subjects.usage_report(),
                        if delivered.files.is_empty() {
                            "none".to_string()
                        } else {
                            delivered.files.join(", ")
                        },
                        if delivered.emailed_to.is_empty() {
                            "nobody".to_string()
                        } else {
                            delivered.emailed_to.join(", ")
                        },
                    ),
                ))
                .await;
                match report.map(|r| serde_json::to_string_pretty(&r)) {
                    Some(Ok(report)) => ReportReply::Written {
                        report,
                        files: delivered.files,
                        emailed_to: delivered.emailed_to,
                        problems: delivered.problems,
                    },
                    _ => ReportReply::Error {
                        message: delivered.problems.join("; "),
                    },
                }
            }
        };
        if let Some(reply_to) = reply_to {
            match encode(&reply) {
                Ok(bytes) => {
                    if let Err(e) = io.client.publish(reply_to, bytes.into()).await {
                        warn!(error = %e, "cannot answer the report request");
                    }
                }
                Err(e) => warn!(error = %e, "cannot encode the report reply"),
            }
        }
    });
}

/// The runtime's side effects: replies, alerts and control messages.
#[derive(Clone)]
struct Io {
    client: Client,
    subjects: Subjects,
    broker_id: String,
    metrics: Arc<Metrics>,
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

impl Io {
    fn observe(&self, out: &Output, took: Duration, unregistration: bool) {
        match &out.reply {
            // A batch holds only registrations (answered with decisions) and
            // unregistrations (answered `Ack`).
            Some(Reply::Batch(replies)) => {
                for reply in replies {
                    self.observe_reply(reply, took, matches!(reply, Reply::Ack));
                }
            }
            Some(reply) => self.observe_reply(reply, took, unregistration),
            None => {}
        }
    }

    fn observe_reply(&self, reply: &Reply, took: Duration, unregistration: bool) {
        match reply {
            Reply::Decision(Decision::Approved { .. }) => self.metrics.registration(None, took),
            Reply::Decision(Decision::Rejected { reason, .. }) => {
                self.metrics.registration(Some(reason.token()), took)
            }
            Reply::Ack if unregistration => self.metrics.unregistration(took),
            // Errors (bad input) are counted by their `bad_message` alerts.
            _ => {}
        }
    }

    async fn apply(&self, reply_to: Option<&async_nats::Subject>, out: Output) {
        if let (Some(reply_to), Some(reply)) = (reply_to, out.reply.as_ref()) {
            self.reply(reply_to, reply).await;
        }
        for effect in out.effects {
            match effect {
                Effect::Alert(alert) => self.alert(alert).await,
                Effect::Control { slave, message } => match encode(&message) {
                    Ok(bytes) => {
                        if let Err(e) = self
                            .client
                            .publish(self.subjects.control(&slave), bytes.into())
                            .await
                        {
                            warn!(%slave, error = %e, "cannot publish control message");
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot encode control message"),
                },
            }
        }
    }

    async fn reply(&self, reply_to: &async_nats::Subject, reply: &Reply) {
        match encode(reply) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(reply_to.clone(), bytes.into()).await {
                    warn!(error = %e, "cannot publish reply");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode reply"),
        }
    }

    async fn alert(&self, mut alert: Alert) {
        alert.time_ms = unix_ms();
        if alert.source.is_empty() {
            alert.source = self.broker_id.clone();
        }
        match alert.severity {
            Severity::Info => info!(kind = %alert.kind, slave = ?alert.slave, "{}", alert.message),
            _ => warn!(kind = %alert.kind, slave = ?alert.slave, "{}", alert.message),
        }
        self.metrics
            .alert(alert.kind.token(), alert.severity.token());
        let subject = self.subjects.alert(alert.severity, alert.kind);
        match encode(&alert) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(subject, bytes.into()).await {
                    warn!(error = %e, "cannot publish alert");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode alert"),
        }
    }

    async fn admin_reply(&self, msg: &Message, reply: &[u8]) {
        let Some(reply_to) = &msg.reply else {
            return;
        };
        if let Err(e) = self
            .client
            .publish(reply_to.clone(), reply.to_vec().into())
            .await
        {
            warn!(error = %e, "cannot publish admin reply");
        }
    }

    async fn status(&self, msg: &Message, status: StatusReply) {
        let Some(reply_to) = &msg.reply else {
            return;
        };
        match encode(&status) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(reply_to.clone(), bytes.into()).await {
                    warn!(error = %e, "cannot publish status reply");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode status reply"),
        }
    }
}
