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
//!
//! This module is [`run`], which switches one replica between its two roles; the roles
//! are in `standby` and in `term` (a term's start) and `leader` (its loop), the state they
//! share in `replica`. What comes in from NATS is turned into engine events by `inbound` and
//! what goes out is sent by `outbound`; `tasks`, `snapshotter` and `reporter` are the tasks
//! beside the loop, and `clock` the time readings handed to the engine.
//!
//! [`Engine`]: crate::engine::Engine

mod backup;
mod clock;
mod inbound;
mod leader;
mod outbound;
mod replica;
mod reporter;
mod snapshotter;
mod standby;
mod tasks;
mod term;
mod vendor_sync;

use lmbus_schemas::human::plural;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::Client;
use futures::StreamExt;
use lmbus_schemas::{Alert, AlertKind, Severity, Subjects};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{self, BrokerConfig};
use crate::election::{Election, ElectionConfig, Role};
use crate::engine::EngineConfig;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::report::Usage;
use crate::snapshot::Snapshots;

use self::clock::today_utc;
use self::leader::Led;
use self::outbound::Io;
use self::replica::{ApplyError, Replica, RestoreError, restore};
use self::snapshotter::Snapshotter;
use self::standby::{FollowError, Followed, follow};

/// How long the final alerts may take to leave when shutting down.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutdown waits for the side tasks, a report being mailed or a snapshot
/// being written.
const TASKS_TIMEOUT: Duration = Duration::from_secs(10);

/// First and longest pause before following the ledger again after a failure.
const FOLLOW_RETRY: Duration = Duration::from_millis(200);
const FOLLOW_RETRY_CAP: Duration = Duration::from_secs(5);

/// Messages the NATS client buffers per subscription before it drops (async-nats: 65,536).
const SUBSCRIPTION_CAPACITY: usize = 256 * 1024;

/// This replica stops because it cannot apply its cluster's ledger: said in a critical
/// alert before `run` returns the error. `context` when the ledger is another context's
/// (a replica started with a license of another context than the cluster's).
async fn refuse_ledger(io: &Io, cfg: &BrokerConfig, context: bool, error: String) {
    let (kind, what) = if context {
        (
            AlertKind::LicenseRefused,
            "refuses to join the cluster's ledger",
        )
    } else {
        (AlertKind::BadMessage, "cannot apply the cluster's ledger")
    };
    error!(%error, "{what}");
    io.alert(Alert::new(
        Severity::Critical,
        kind,
        format!("broker {} {what} and stops: {error}", cfg.broker_id),
    ))
    .await;
}

/// A backup master (license context `backup`) watches the production cluster it names with
/// `--production-cluster`; any other master must not name one.
fn production_watch(
    cfg: &BrokerConfig,
    license: &lmbus_schemas::License,
) -> anyhow::Result<Option<backup::ProductionWatch>> {
    // A cluster named in the signed license is the one watched; a flag must agree with it.
    let named = match (&license.production_cluster, &cfg.production_cluster) {
        (Some(signed), Some(flag)) if signed != flag => anyhow::bail!(
            "--production-cluster {flag} differs from the production cluster {signed} that license {} names (signed): a backup master watches only the cluster its license names",
            license.id
        ),
        (Some(signed), _) => Some(signed),
        (None, flag) => flag.as_ref(),
    };
    match (license.backs, named) {
        (Some(backs), Some(cluster)) => {
            Subjects::new(cluster).context("--production-cluster")?;
            if *cluster == cfg.cluster {
                anyhow::bail!(
                    "--production-cluster {cluster} is this backup master's own cluster: name the production cluster it backs (a backup master is a cluster of its own)"
                );
            }
            Ok(Some(backup::ProductionWatch::new(
                cluster.clone(),
                backs,
                cfg.cluster.clone(),
                license.id,
            )))
        }
        (Some(backs), None) => anyhow::bail!(
            "license {} is a backup master license (it backs production license {backs}) that names no production cluster: start the broker with --production-cluster NAME, the production cluster whose leader it watches (it serves only while that leader is silent)",
            license.id
        ),
        (None, Some(cluster)) => anyhow::bail!(
            "--production-cluster {cluster} is only for a backup master, and license {} is a {} license",
            license.id,
            license.context
        ),
        (None, None) => Ok(None),
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
    let news = crate::jetstream::leader_news(
        &client,
        &[
            subjects.ledger_stream(),
            subjects.election_stream(),
            subjects.snapshot_stream(),
        ],
    )
    .await;
    let applied = Arc::new(AtomicU64::new(0));
    let mut election = Election::start(
        &client,
        &subjects,
        crate::jetstream::fresh(&news),
        applied.clone(),
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
        forget_after: cfg.forget_after,
        slave_rate_limit: cfg.slave_rate_limit,
        max_agents_per_slave: cfg.max_agents_per_slave,
        allot: cfg.allot.clone(),
    };
    let metrics = Metrics::new(&license);
    // The vendor's NATS, when it is not reached through a leaf node: connected in the
    // background (the broker serves while the vendor is unreachable; a sync then says so).
    let vendor = match &cfg.vendor_nats {
        Some((url, auth)) => lmbus_nats::connect(
            url,
            async_nats::ConnectOptions::new()
                .name(format!("lmbus-broker {} vendor sync", cfg.broker_id))
                .retry_on_initial_connect(),
            auth,
        )
        .await
        .with_context(|| format!("the vendor's NATS (--vendor-nats {url})"))?,
        None => client.clone(),
    };
    let io = Io {
        client: client.clone(),
        vendor,
        subjects: subjects.clone(),
        broker_id: cfg.broker_id.clone(),
        context: license.context,
        metrics: metrics.clone(),
        tasks: TaskTracker::new(),
        news,
        production: production_watch(&cfg, &license)?,
        backups: (license.context == lmbus_schemas::Context::Production)
            .then(backup::BackupsWatch::default),
    };
    io.alert(Alert::new(
        Severity::Info,
        AlertKind::BrokerStarted,
        format!(
            "broker {} started as a replica of cluster {} (priority {}) with license {} ({}, {}{}); ledger {}",
            cfg.broker_id,
            cfg.cluster,
            cfg.priority,
            license.id,
            license.context.describe(),
            plural(u64::from(license.limits.total.unwrap_or(0)), "seat", "seats"),
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

    let metrics_server = match cfg.metrics {
        Some(addr) => {
            let (bound, task) = crate::metrics::serve(
                addr,
                client.clone(),
                metrics.clone(),
                applied.clone(),
                ledger.clone(),
            )
            .await?;
            info!("Prometheus metrics on http://{bound}/metrics, health on http://{bound}/healthz");
            Some(task)
        }
        None => None,
    };
    // Told to stop at shutdown; each side task finishes what it is doing first.
    let stop = CancellationToken::new();
    io.tasks.spawn(tasks::answer_drain_requests(
        io.clone(),
        election.drainer(),
        stop.clone(),
    ));
    io.tasks.spawn(tasks::presence(
        io.clone(),
        cfg.clone(),
        election.role.clone(),
        election.drainer(),
        applied.clone(),
        license.id,
        stop.clone(),
    ));
    if let Some(watch) = &io.production {
        io.tasks.spawn(backup::watch_production(
            io.clone(),
            watch.clone(),
            cfg.lease,
            stop.clone(),
        ));
    }
    if let Some(watch) = &io.backups {
        io.tasks.spawn(backup::watch_backups(
            io.clone(),
            watch.clone(),
            cfg.lease,
            stop.clone(),
        ));
    }
    io.tasks.spawn(tasks::watch_for_no_leader(
        io.clone(),
        cfg.clone(),
        stop.clone(),
    ));
    // True while this replica holds the lease but cannot serve yet (catching up with a
    // ledger whose stream is electing its own leader, say).
    let (not_ready, not_ready_rx) = watch::channel(false);
    io.tasks.spawn(tasks::answer_while_electing(
        io.clone(),
        election.electing.clone(),
        not_ready_rx,
        stop.clone(),
    ));
    let usage = Usage::new(cfg.report.at_minute);
    // A snapshot of another context's ledger: this replica stops (through the shutdown
    // below, so its side tasks end and its alert leaves) before following anything.
    let mut refused: Option<RestoreError> = None;
    let mut replica = match restore(
        &engine_cfg,
        applied.clone(),
        metrics.clone(),
        &snapshots,
        usage.clone(),
    )
    .await
    {
        Ok(replica) => replica,
        Err(e @ RestoreError::Refused { .. }) => {
            refuse_ledger(&io, &cfg, true, e.to_string()).await;
            refused = Some(e);
            Replica::new(&engine_cfg, applied.clone(), metrics.clone(), usage)
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "cannot load the latest snapshot: replaying the ledger from its first record");
            Replica::new(&engine_cfg, applied.clone(), metrics.clone(), usage)
        }
    };
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
        if let Some(e) = refused.take() {
            break Err(e.into());
        }
        let lease = match follow(&mut replica, &ledger, &mut election.role, &mut shutdown).await {
            Ok(Followed::Shutdown) => break Ok(()),
            Ok(Followed::Elected { lease }) => lease,
            Err(FollowError::Apply(ApplyError::Gap(gap))) if last_gap == Some(gap.found) => {
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
            Err(FollowError::Apply(ApplyError::Gap(gap))) => {
                let found = Some(gap.found);
                warn!(error = %gap, "loading the latest snapshot");
                match restore(
                    &engine_cfg,
                    applied.clone(),
                    metrics.clone(),
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
                    Err(e @ RestoreError::Refused { .. }) => {
                        refuse_ledger(&io, &cfg, true, e.to_string()).await;
                        break Err(e.into());
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
            Err(FollowError::Interrupted(e)) => {
                warn!(error = %e, ?retry, "following the ledger was interrupted; retrying");
                // A lease won meanwhile ends the pause: leading starts by catching up
                // anyway, and a replica holding the lease without serving stalls everyone
                // (the pause grows to 5 s while a NATS node is lost).
                let mut news = crate::jetstream::fresh(&io.news);
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    _ = tokio::time::sleep(retry) => {}
                    _ = election.role.wait_for(|r| matches!(r, Role::Leader { .. })) => {}
                    // The stream has a leader again: read now, from the start of the pause.
                    _ = crate::jetstream::next_news(&mut news) => retry = FOLLOW_RETRY / 2,
                }
                retry = (retry * 2).min(FOLLOW_RETRY_CAP);
                continue;
            }
            // A record this replica cannot apply: it must not lead on a wrong state.
            Err(FollowError::Apply(e)) => {
                refuse_ledger(&io, &cfg, e.is_context_mismatch(), e.to_string()).await;
                break Err(e.into());
            }
            Err(e) => break Err(e.into()),
        };
        retry = FOLLOW_RETRY;
        not_ready.send_replace(true);
        let led = leader::Term {
            lease,
            number: 0,
            replica: &mut replica,
            ledger: &mut ledger,
            election: &mut election,
            snapshotter: &mut snapshotter,
            cfg: &cfg,
            io: &io,
        }
        .lead(&mut shutdown, &not_ready)
        .await;
        not_ready.send_replace(false);
        io.metrics.set_gauges(None);
        // Only a leader is told whether the other side is in use: a follower counts no
        // overlap until it leads again.
        replica.usage.set_overlapping(clock::unix_ms(), false);
        match led {
            Ok(Led::Shutdown) => break Ok(()),
            Ok(Led::SteppedDown { reason, rebuild }) => {
                election.resign(lease);
                // The term is the one this replica's `Leader` record opened, if it got
                // that far.
                let term = if replica.leader.as_deref() == Some(cfg.broker_id.as_str()) {
                    format!("term {}", replica.term)
                } else {
                    "before it could open its term".to_owned()
                };
                io.alert(Alert::new(
                    Severity::Warning,
                    AlertKind::LeaderSteppedDown,
                    format!(
                        "broker {} stopped leading cluster {} ({term}): {reason}",
                        cfg.broker_id, cfg.cluster
                    ),
                ))
                .await;
                if rebuild {
                    let usage = replica.usage.clone();
                    // Acknowledged up to here: the ledger holds at least this much.
                    election.stand_aside(replica.applied);
                    replica = match restore(
                        &engine_cfg,
                        applied.clone(),
                        metrics.clone(),
                        &snapshots,
                        usage.clone(),
                    )
                    .await
                    {
                        Ok(replica) => replica,
                        Err(e @ RestoreError::Refused { .. }) => {
                            refuse_ledger(&io, &cfg, true, e.to_string()).await;
                            break Err(e.into());
                        }
                        Err(e) => {
                            warn!(error = %format!("{e:#}"), "cannot load the latest snapshot: replaying the ledger from its first record");
                            Replica::new(&engine_cfg, applied.clone(), metrics.clone(), usage)
                        }
                    };
                }
            }
            Err(e) => break Err(e),
        }
    };

    io.alert(Alert::new(
        Severity::Info,
        AlertKind::BrokerStopped,
        format!(
            "broker {} stopping with {} in use",
            cfg.broker_id,
            plural(u64::from(replica.engine.total_in_use()), "seat", "seats")
        ),
    ))
    .await;
    // Give the lease up first, so another replica can lead while this one finishes.
    if let Role::Leader { lease, .. } = *election.role.borrow() {
        election.resign(lease);
    }
    drop(election);
    // Tell the side tasks, then wait for them and for a report or snapshot being written
    // (bounded: a mail server that does not answer must not hold the process).
    stop.cancel();
    io.tasks.close();
    let snapshot = snapshotter.task.take();
    let finishing = async {
        io.tasks.wait().await;
        if let Some(task) = snapshot {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(TASKS_TIMEOUT, finishing)
        .await
        .is_err()
    {
        warn!("the side tasks did not finish within {TASKS_TIMEOUT:?}; stopping anyway");
    }
    // The metrics endpoint holds no state: it just stops answering.
    if let Some(task) = metrics_server {
        task.abort();
    }
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
