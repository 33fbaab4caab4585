//! License contexts end to end: a master serves only slaves of its own context, a
//! development master marks what it reports as not for production use, a reload of
//! another context is refused, and a replica of another context refuses to join a
//! cluster's ledger. Real `nats-server`, in-process brokers and slaves, and the real
//! `lmbus-broker` and `lmbus-slave` binaries where an operator would use them.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use lmbus_schemas::{Alert, AlertKind, Context, Limits, RejectReason, Role, Severity};
use lmbus_slave::{SlaveAgent, SlaveError};
use lmbus_tests::daemon::SlaveDaemon;
use lmbus_tests::*;

/// A license of `role` and `context` written into the vendor's directory.
fn license_in(
    f: &Fixture,
    name: &str,
    role: Role,
    context: Context,
    total: Option<u32>,
) -> PathBuf {
    let mut l = Vendor::license(
        role,
        Limits {
            total,
            ..Limits::default()
        },
    );
    l.context = context;
    f.vendor.write(name, &l).unwrap()
}

/// Starts a slave with `cfg` and returns the `context_mismatch` refusal's detail; any other
/// outcome fails.
async fn refused(cfg: lmbus_slave::SlaveConfig) -> String {
    refused_with(cfg, RejectReason::ContextMismatch).await
}

/// Starts a slave with `cfg` and returns the detail of its refusal for `reason`; any other
/// outcome fails.
async fn refused_with(cfg: lmbus_slave::SlaveConfig, reason: RejectReason) -> String {
    match tokio::time::timeout(WAIT, SlaveAgent::start(cfg)).await {
        Ok(Err(SlaveError::Refused { reason: r, detail })) if r == reason => detail,
        Ok(Err(e)) => panic!("refused for another reason than {reason:?}: {e}"),
        Ok(Ok(_)) => panic!("admitted, where a refusal for {reason:?} was due"),
        Err(_) => panic!("the slave did not start or fail within {WAIT:?}"),
    }
}

/// The master's `slave_refused` alert for `slave` (waited for, bounded).
async fn refusal_alert(alerts: &mut AlertTap, slave: &str) -> Alert {
    alerts
        .wait_for(&format!("refusing {slave}"), |a| {
            a.kind == AlertKind::SlaveRefused && a.slave.as_deref() == Some(slave)
        })
        .await
        .unwrap()
}

/// Runs `cmd` to its end (bounded by [`WAIT`]) and returns its exit success, stdout and
/// stderr.
fn run_bounded(cmd: &mut Command) -> (bool, String, String) {
    let mut proc = Proc::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped())).unwrap();
    let status = proc.wait_timeout(WAIT).unwrap();
    let mut out = String::new();
    let mut err = String::new();
    proc.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    proc.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.success(), out, err)
}

/// Steps: a development master (4 seats, unlicensed slaves allowed).
/// 1. Slaves of other contexts are refused at hello with `context_mismatch`, a detail that
///    names both contexts and a `slave_refused` alert marked development / not for
///    production: a production slave license, a backup one, an unlicensed slave that
///    declares nothing (production), and the real `lmbus-slave` daemon run with
///    `--context backup`, which exits with the reason. A development-licensed slave given
///    `--context production` is refused at start, before any hello.
/// 2. A development slave license and an unlicensed slave with `--context development`
///    are admitted and register.
/// 3. `admin status` (text and `--json`) and `admin report --json` (the real binary) say
///    development and not for production use; so does the `slave_connected` alert.
/// 4. `admin reload-license` with a production master license fails with a clear error,
///    raises a `license_refused` alert, and the development license stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_development_master_serves_only_development_and_says_so() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let dev_master = license_in(
        &f,
        "dev-master.lic",
        Role::Master,
        Context::Development,
        Some(4),
    );
    let broker = Broker::start(broker_config(
        &f.nats, &f.cluster, dev_master, &f.vendor, true,
    ))
    .await
    .unwrap();

    // 1. Other contexts, refused at hello.
    for (slave, context) in [
        ("prod-site", Context::Production),
        ("dr-site", Context::Backup),
    ] {
        let lic = license_in(&f, &format!("{slave}.lic"), Role::Slave, context, None);
        let detail = refused(f.licensed_slave_config(slave, &lic).unwrap()).await;
        assert!(
            detail.contains(&format!("is for context '{context}'"))
                && detail.contains("this master's is 'development'"),
            "{detail}"
        );
        let alert = refusal_alert(&mut alerts, slave).await;
        assert_eq!(alert.reason, Some(RejectReason::ContextMismatch));
        assert_eq!(alert.context, "development");
        assert!(alert.not_for_production, "{alert:?}");
        assert!(alert.message.contains(&detail), "{}", alert.message);
    }
    let detail = refused(f.slave_config("plain-site").unwrap()).await;
    assert!(
        detail.contains("declares context 'production'")
            && detail.contains("--context development"),
        "{detail}"
    );
    let alert = refusal_alert(&mut alerts, "plain-site").await;
    assert_eq!(alert.reason, Some(RejectReason::ContextMismatch));
    let api = format!("127.0.0.1:{}", free_port());
    let (ok, _, stderr) = tokio::task::block_in_place(|| {
        run_bounded(
            Command::new(bin("lmbus-slave").unwrap())
                .args(["run", "--nats", &f.nats.url(), "--cluster", &f.cluster])
                .args(["--id", "daemon-site", "--api", &api, "--context", "backup"]),
        )
    });
    assert!(!ok, "the daemon of another context kept running: {stderr}");
    assert!(
        stderr.contains("context_mismatch") || stderr.contains("declares context 'backup'"),
        "{stderr}"
    );
    refusal_alert(&mut alerts, "daemon-site").await;

    // A licensed slave runs in its license's context: another --context is refused at
    // start, before any hello.
    let dev_slave = license_in(&f, "dev-slave.lic", Role::Slave, Context::Development, None);
    let mut cfg = f.licensed_slave_config("odd-site", &dev_slave).unwrap();
    cfg.context = Some(Context::Production);
    match tokio::time::timeout(WAIT, SlaveAgent::start(cfg)).await {
        Ok(Err(SlaveError::Config(m))) => assert!(
            m.contains("is for context 'development', not 'production'")
                && m.contains("drop --context"),
            "{m}"
        ),
        Ok(Err(e)) => panic!("refused for another reason: {e}"),
        Ok(Ok(_)) => panic!("a slave started with a --context its license does not have"),
        Err(_) => panic!("the slave did not start or fail within {WAIT:?}"),
    }

    // 2. The master's own context, admitted.
    let licensed = SlaveAgent::start(f.licensed_slave_config("dev-site", &dev_slave).unwrap())
        .await
        .unwrap();
    let mut cfg = f.slave_config("lab-site").unwrap();
    cfg.context = Some(Context::Development);
    let unlicensed = SlaveAgent::start(cfg).await.unwrap();
    assert!(
        licensed
            .register("a1", "inbound")
            .await
            .unwrap()
            .is_approved()
    );
    assert!(
        unlicensed
            .register("a2", "inbound")
            .await
            .unwrap()
            .is_approved()
    );
    f.wait_in_use(2).await.unwrap();
    // Each slave's own status names the context it runs in.
    assert_eq!(licensed.status().context, Some(Context::Development));
    assert_eq!(unlicensed.status().context, Some(Context::Development));
    let connected = alerts
        .wait_for("lab-site connected", |a| {
            a.kind == AlertKind::SlaveConnected && a.slave.as_deref() == Some("lab-site")
        })
        .await
        .unwrap();
    assert!(connected.not_for_production && connected.context == "development");

    // 3. Status and report, through the real binary.
    let admin = |args: &[&str]| {
        let mut cmd = Command::new(bin("lmbus-broker").unwrap());
        cmd.arg("admin")
            .args(args)
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster]);
        cmd
    };
    let json: serde_json::Value = serde_json::from_str(
        &tokio::task::block_in_place(|| stdout_of(&mut admin(&["status", "--json"]))).unwrap(),
    )
    .unwrap();
    assert_eq!(json["license"]["context"], "development", "{json}");
    assert_eq!(json["license"]["not_for_production"], true, "{json}");
    let text = tokio::task::block_in_place(|| stdout_of(&mut admin(&["status"]))).unwrap();
    assert!(
        text.contains("development: not for production use"),
        "{text}"
    );
    let report: serde_json::Value = serde_json::from_str(
        &tokio::task::block_in_place(|| stdout_of(&mut admin(&["report", "--json"]))).unwrap(),
    )
    .unwrap();
    eprintln!("seen: admin report --json: {report}");
    assert_eq!(report["context"], "development", "{report}");
    assert_eq!(report["not_for_production"], true, "{report}");

    // 4. A reload of another context, refused; the license in force stays.
    let prod_master = license_in(
        &f,
        "prod-master.lic",
        Role::Master,
        Context::Production,
        Some(9),
    );
    let (ok, _, stderr) = tokio::task::block_in_place(|| {
        run_bounded(
            admin(&["reload-license"])
                .arg(&prod_master)
                .args(["--operator", "test-ops"]),
        )
    });
    assert!(
        !ok,
        "a production license was reloaded on a development master"
    );
    assert!(
        stderr.contains("is for context 'production'")
            && stderr.contains("this master runs in 'development'")
            && stderr.contains("prod-master.lic"),
        "{stderr}"
    );
    let alert = alerts
        .wait_for("license_refused", |a| a.kind == AlertKind::LicenseRefused)
        .await
        .unwrap();
    assert_eq!(alert.severity, Severity::Warning);
    assert!(alert.message.contains("test-ops"), "{}", alert.message);
    let st = f.status().await.unwrap();
    assert_eq!(
        (st.license.context.as_str(), st.total_limit, st.total_in_use),
        ("development", 4, 2)
    );

    licensed.shutdown().await;
    unlicensed.shutdown().await;
    broker.stop().await.unwrap();
}

/// Starts a replica of `f`'s cluster with a development master license as `id` and returns
/// the error `run` ends with (bounded); panics if it joins or keeps running.
async fn dev_replica_error(f: &Fixture, id: &str) -> String {
    let dev_master = license_in(
        f,
        &format!("{id}.lic"),
        Role::Master,
        Context::Development,
        Some(5),
    );
    let mut cfg = broker_config(&f.nats, &f.cluster, dev_master, &f.vendor, true);
    cfg.broker_id = id.into();
    cfg.priority = 2;
    let ended = tokio::time::timeout(WAIT, lmbus_broker::run(cfg, std::future::pending::<()>()))
        .await
        .expect("the replica of another context kept running");
    format!(
        "{:#}",
        ended.expect_err("the replica of another context joined")
    )
}

/// Steps: a production master leads cluster C (a snapshot every 2 records) and has
/// written its `Leader` record (its context) in C's ledger.
/// 1. A replica started on C with a development master license, before any snapshot,
///    meets the context in the ledger and refuses to join: `run` returns an error naming
///    both contexts (bounded), and a critical `license_refused` alert from that replica
///    goes out.
/// 2. The production master keeps serving: a slave registers 3 agents, and a snapshot is
///    written.
/// 3. Another development replica meets the context in the latest snapshot and refuses
///    the same way, with its own alert; the production master still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_context_refuses_to_join_the_ledger() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let mut prod = f.broker_settings(5, &[], true).unwrap();
    prod.snapshot_every = 2;
    let broker = Broker::start(prod).await.unwrap();

    // 1. From the ledger.
    let error = dev_replica_error(&f, "dev-replica").await;
    assert!(
        error.contains("ledger is in context 'production'")
            && error.contains("license is for 'development'")
            && !error.contains("snapshot"),
        "{error}"
    );
    let alert = alerts
        .wait_for("license_refused from dev-replica", |a| {
            a.kind == AlertKind::LicenseRefused && a.source == "dev-replica"
        })
        .await
        .unwrap();
    assert_eq!(alert.severity, Severity::Critical);
    assert!(
        alert.message.contains("refuses to join"),
        "{}",
        alert.message
    );
    assert_eq!(alert.context, "development");

    // 2. Production serves and writes a snapshot.
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    for a in ["a1", "a2", "a3"] {
        assert!(slave.register(a, "inbound").await.unwrap().is_approved());
    }
    let subjects = lmbus_schemas::Subjects::new(&f.cluster).unwrap();
    let snapshots = lmbus_broker::snapshot::Snapshots::open(&f.client, &subjects, 1)
        .await
        .unwrap();
    eventually("a snapshot is written", || async {
        snapshots.latest().await.ok().flatten().is_some()
    })
    .await
    .unwrap();

    // 3. From the snapshot.
    let error = dev_replica_error(&f, "dev-replica-2").await;
    assert!(
        error.contains("latest snapshot") && error.contains("ledger is in context 'production'"),
        "{error}"
    );
    alerts
        .wait_for("license_refused from dev-replica-2", |a| {
            a.kind == AlertKind::LicenseRefused && a.source == "dev-replica-2"
        })
        .await
        .unwrap();
    assert!(slave.register("a4", "inbound").await.unwrap().is_approved());
    let st = f.status().await.unwrap();
    assert_eq!(
        (st.license.context.as_str(), st.total_in_use),
        ("production", 4)
    );
    slave.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), broker.stop())
        .await
        .unwrap()
        .unwrap();
}

/// A backup master license of `total` seats backing `backs`.
fn backup_license(f: &Fixture, name: &str, backs: uuid::Uuid, total: u32) -> PathBuf {
    let mut l = Vendor::license(
        Role::Master,
        Limits {
            total: Some(total),
            ..Limits::default()
        },
    );
    l.context = Context::Backup;
    l.backs = Some(backs);
    f.vendor.write(name, &l).unwrap()
}

/// A production master `p1` (5 seats, the fixture's cluster) and a backup master `d1`
/// (its own cluster, 2 seats, backing p1's license; `production_cluster` not set yet),
/// both with a 1 s lease.
/// The backup's handback window in these tests.
const HANDBACK: Duration = Duration::from_secs(2);

struct Pair {
    prod_id: uuid::Uuid,
    prod_cfg: lmbus_broker::BrokerConfig,
    dr_cluster: String,
    dr_cfg: lmbus_broker::BrokerConfig,
}

fn production_and_backup(f: &Fixture) -> Pair {
    let prod_license = f.vendor.master(5, &[]).unwrap();
    let prod_id =
        lmbus_schemas::read_license_unverified(&std::fs::read_to_string(&prod_license).unwrap())
            .unwrap()
            .id;
    let mut prod_cfg = broker_config(&f.nats, &f.cluster, prod_license, &f.vendor, true);
    prod_cfg.broker_id = "p1".into();
    prod_cfg.lease = Duration::from_secs(1);
    let dr_cluster = format!("{}dr", f.cluster);
    let mut dr_cfg = broker_config(
        &f.nats,
        &dr_cluster,
        backup_license(f, "dr.lic", prod_id, 2),
        &f.vendor,
        true,
    );
    dr_cfg.broker_id = "d1".into();
    dr_cfg.lease = Duration::from_secs(1);
    dr_cfg.handback_window = HANDBACK;
    Pair {
        prod_id,
        prod_cfg,
        dr_cluster,
        dr_cfg,
    }
}

/// [`production_and_backup`], the backup watching production's cluster and handing back
/// after `window`.
fn watched_pair(f: &Fixture, window: Duration) -> Pair {
    let mut pair = production_and_backup(f);
    pair.dr_cfg.production_cluster = Some(f.cluster.clone());
    pair.dr_cfg.handback_window = window;
    pair
}

/// A slave that counts a master lost at its first unanswered request (failover wait 0,
/// 1 s request timeout and election wait), so failovers take about a lease.
fn fails_over_fast(cfg: &mut lmbus_slave::SlaveConfig) {
    cfg.request_timeout = Duration::from_secs(1);
    cfg.failover_wait = Duration::ZERO;
    cfg.election_wait = Duration::from_secs(1);
}

/// Steps (issue 19, the backup master's half): one NATS; production master `prod` (its
/// cluster, a 5-seat production license P) and backup master `dr` (its own cluster, a
/// 2-seat backup license that backs P, `--production-cluster` naming prod's).
/// 1. While prod leads, a production slave saying hello to dr is refused
///    `production_available` (the detail names prod's leader), with a `slave_refused` alert
///    in context backup.
/// 2. prod stops: within its lease plus slack dr serves the slave; dr's own limits apply
///    (2 approved, the third refused `aggregate_limit`), dr's status counts what the host
///    holds, and dr's alerts say backup; prod's seats are untouched (0).
/// 3. prod is back: dr refuses the slave's next registration `production_available`; once
///    production has been available for the handback window (2 s) dr releases the 2 seats
///    and the slave logs the agents out (no sooner than the window less 0.5 s), with a
///    `seats_released` alert in context backup: the host and dr both hold nothing.
/// 4. A second backup master `dr2` whose license backs another production license, while
///    prod leads: a critical `license_refused` alert naming both licenses, and a hello to
///    dr2 is refused `context_mismatch`.
/// Also: a backup master license without `--production-cluster`, and a production one
/// with it, do not start, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_master_serves_only_while_production_is_silent() {
    let f = Fixture::new().await.unwrap();
    let Pair {
        prod_id,
        prod_cfg,
        dr_cluster,
        mut dr_cfg,
    } = production_and_backup(&f);

    // Misconfigurations refused at start.
    let mut no_prod = dr_cfg.clone();
    no_prod.production_cluster = None;
    let err = lmbus_broker::run(no_prod, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("--production-cluster"), "{err}");
    let mut prod_naming = prod_cfg.clone();
    prod_naming.production_cluster = Some(dr_cluster.clone());
    let err = lmbus_broker::run(prod_naming, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("only for a backup master"), "{err}");

    dr_cfg.production_cluster = Some(f.cluster.clone());
    let mut dr_alerts = AlertTap::new(&f.client, &dr_cluster).await.unwrap();
    let prod = Broker::start(prod_cfg.clone()).await.unwrap();
    let dr = Broker::start(dr_cfg).await.unwrap();
    let site = || {
        let mut cfg = f.slave_config("site1").unwrap();
        cfg.cluster = dr_cluster.clone();
        cfg
    };

    // 1. Production leads: the backup refuses (in its first lease because it cannot know
    // yet, then because it hears p1).
    let started = std::time::Instant::now();
    loop {
        let detail = match tokio::time::timeout(WAIT, SlaveAgent::start(site())).await {
            Ok(Err(SlaveError::Refused {
                reason: RejectReason::ProductionAvailable,
                detail,
            })) => detail,
            Ok(Err(e)) => panic!("refused for another reason: {e}"),
            Ok(Ok(_)) => panic!("the backup admitted a slave while production leads"),
            Err(_) => panic!("no answer within {WAIT:?}"),
        };
        if detail.contains("leader p1") {
            break;
        }
        assert!(
            detail.contains("production may be available") && started.elapsed() < WAIT,
            "{detail}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alert = refusal_alert(&mut dr_alerts, "site1").await;
    assert_eq!(alert.reason, Some(RejectReason::ProductionAvailable));
    assert_eq!(alert.context, "backup");

    // 2. Production stops: the backup serves within its own limits.
    prod.stop().await.unwrap();
    let stopped = std::time::Instant::now();
    let slave = loop {
        match SlaveAgent::start(site()).await {
            Ok(slave) => break slave,
            Err(SlaveError::Refused {
                reason: RejectReason::ProductionAvailable,
                ..
            }) if stopped.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the backup did not serve after production stopped: {e}"),
        }
    };
    eprintln!(
        "measured: the backup served {:?} after production stopped (lease 1 s)",
        stopped.elapsed()
    );
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());
    match slave.register("a3", "inbound").await.unwrap() {
        lmbus_slave::Outcome::Rejected { reason, .. } => {
            assert_eq!(reason, RejectReason::AggregateLimit)
        }
        other => panic!("a3 beyond the backup's 2 seats: {other:?}"),
    }
    let held = slave.agents().len() as u32;
    let st = status(&f.client, &dr_cluster).await.unwrap();
    assert_eq!((held, st.total_in_use, st.total_limit), (2, 2, 2));
    let connected = dr_alerts
        .wait_for("dr's slave_connected", |a| {
            a.kind == AlertKind::SlaveConnected && a.slave.as_deref() == Some("site1")
        })
        .await
        .unwrap();
    assert_eq!(connected.context, "backup");

    // 3. Production is back: no new backup seat.
    let prod = Broker::start(prod_cfg.clone()).await.unwrap();
    assert_eq!(f.status().await.unwrap().total_in_use, 0);
    lmbus_tests::eventually("the backup refuses again", || async {
        matches!(
            slave.register("a4", "inbound").await,
            Ok(lmbus_slave::Outcome::Rejected {
                reason: RejectReason::ProductionAvailable,
                ..
            })
        )
    })
    .await
    .unwrap();
    let back = std::time::Instant::now();
    // The handback: production available for the whole window (2 s here), the backup
    // releases its seats and the slave logs the agents out.
    lmbus_tests::eventually("the backup hands back", || async {
        slave.agents().is_empty()
    })
    .await
    .unwrap();
    let handed_back = back.elapsed();
    eprintln!(
        "measured: the backup handed back {handed_back:?} after production was back (window 2 s)"
    );
    assert!(
        handed_back >= HANDBACK - Duration::from_millis(500),
        "handed back {handed_back:?} after production was back, before the window"
    );
    assert_eq!(
        status(&f.client, &dr_cluster).await.unwrap().total_in_use,
        0,
        "the backup's books against the host's (empty)"
    );
    let released = dr_alerts
        .wait_for("the handback's release", |a| {
            a.kind == AlertKind::SeatsReleased && a.message.contains("handback")
        })
        .await
        .unwrap();
    assert_eq!(released.context, "backup");
    // The backup's report: its seat-hours, and the overlap (seats held while production was
    // heard), which the handback window bounds: the 2 s window plus a tick, not less than
    // the time the test saw between production's return and the handback, less a beat.
    let json = stdout_of(
        Command::new(bin("lmbus-broker").unwrap())
            .args(["admin", "report", "--json", "--nats", &f.nats.url()])
            .args(["--cluster", &dr_cluster]),
    )
    .unwrap();
    let report: lmbus_schemas::report::UsageReport = serde_json::from_str(&json).unwrap();
    let overlap = report
        .backup
        .clone()
        .expect("a backup report says its overlap");
    let overlap = Duration::from_secs_f64(overlap.overlap_minutes * 60.0);
    eprintln!(
        "measured: the backup's report shows {overlap:?} of overlap (window 2 s, handback seen {handed_back:?} after production's return)"
    );
    assert!(
        overlap >= handed_back.saturating_sub(Duration::from_millis(600))
            && overlap <= HANDBACK + Duration::from_secs(2),
        "overlap {overlap:?}: {json}"
    );
    let total = report.agent_types.last().unwrap();
    assert!(total.seat_hours > 0.0, "{json}");

    // 4. A backup license for another production license.
    let dr2_cluster = format!("{}dr2", f.cluster);
    let mut dr2_cfg = broker_config(
        &f.nats,
        &dr2_cluster,
        backup_license(&f, "dr2.lic", uuid::Uuid::new_v4(), 2),
        &f.vendor,
        true,
    );
    dr2_cfg.broker_id = "e1".into();
    dr2_cfg.lease = Duration::from_secs(1);
    dr2_cfg.production_cluster = Some(f.cluster.clone());
    let mut dr2_alerts = AlertTap::new(&f.client, &dr2_cluster).await.unwrap();
    let dr2 = Broker::start(dr2_cfg).await.unwrap();
    let refused = dr2_alerts
        .wait_for("dr2's license refused", |a| {
            a.kind == AlertKind::LicenseRefused && a.severity == Severity::Critical
        })
        .await
        .unwrap();
    assert!(
        refused.message.contains(&prod_id.to_string()),
        "{}",
        refused.message
    );
    let mut cfg = f.slave_config("site2").unwrap();
    cfg.cluster = dr2_cluster.clone();
    let detail = refused_with(cfg, RejectReason::ContextMismatch).await;
    assert!(detail.contains("not a backup for it"), "{detail}");
    slave.shutdown().await;
    dr2.stop().await.unwrap();
    dr.stop().await.unwrap();
    prod.stop().await.unwrap();
}

/// Steps: a backup master license that names its production cluster (signed). Started with
/// `--production-cluster` naming another (silent) cluster, the broker does not start, and
/// says why; started without the flag, it watches the named cluster: while production
/// leads, a hello is refused `production_available` naming production's leader p1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_license_that_names_its_production_cluster_watches_only_that_one() {
    let f = Fixture::new().await.unwrap();
    let Pair {
        prod_id,
        prod_cfg,
        dr_cluster,
        mut dr_cfg,
    } = production_and_backup(&f);
    let mut l = Vendor::license(
        Role::Master,
        Limits {
            total: Some(2),
            ..Limits::default()
        },
    );
    l.context = Context::Backup;
    l.backs = Some(prod_id);
    l.production_cluster = Some(f.cluster.clone());
    dr_cfg.license_path = f.vendor.write("dr-bound.lic", &l).unwrap();
    let mut elsewhere = dr_cfg.clone();
    elsewhere.production_cluster = Some(format!("{}quiet", f.cluster));
    let err = lmbus_broker::run(elsewhere, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("differs from the production cluster") && err.contains(&f.cluster),
        "{err}"
    );
    let prod = Broker::start(prod_cfg).await.unwrap();
    dr_cfg.production_cluster = None;
    let dr = Broker::start(dr_cfg).await.unwrap();
    let mut cfg = f.slave_config("site1").unwrap();
    cfg.cluster = dr_cluster.clone();
    let started = std::time::Instant::now();
    loop {
        match tokio::time::timeout(WAIT, SlaveAgent::start(cfg.clone())).await {
            Ok(Err(SlaveError::Refused {
                reason: RejectReason::ProductionAvailable,
                detail,
            })) if detail.contains("leader p1") => break,
            Ok(Err(SlaveError::Refused {
                reason: RejectReason::ProductionAvailable,
                ..
            })) if started.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => panic!("refused for another reason: {e}"),
            Ok(Ok(_)) => {
                panic!("the backup served while the production cluster its license names leads")
            }
            Err(_) => panic!("no answer within {WAIT:?}"),
        }
    }
    dr.stop().await.unwrap();
    prod.stop().await.unwrap();
}

/// Steps (issue 19, one backup license at one backup master): production is silent (never
/// started). Backup master d1 (cluster `dr`) serves a slave once its first lease is over.
/// Two seconds later a second backup cluster `dr2` (a name that sorts first) is started with
/// the same backup license file: dr2 raises a
/// critical `license_refused` alert naming dr, dr a warning naming dr2; a hello to dr2 is
/// refused `license_in_use` naming dr, while dr goes on approving. dr stops: dr2 serves
/// within its lease plus slack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backup_master_with_the_same_backup_license_is_refused() {
    let f = Fixture::new().await.unwrap();
    let Pair {
        dr_cluster,
        mut dr_cfg,
        ..
    } = production_and_backup(&f);
    dr_cfg.production_cluster = Some(f.cluster.clone());
    // A name that sorts before dr's: dr2 yields because dr is older, not by name.
    let dr2_cluster = format!("{}a-dr2", f.cluster);
    let mut dr2_cfg = dr_cfg.clone();
    dr2_cfg.cluster = dr2_cluster.clone();
    dr2_cfg.broker_id = "e1".into();
    let at = |cluster: &str, id: &str| {
        let mut cfg = f.slave_config(id).unwrap();
        cfg.cluster = cluster.to_owned();
        cfg
    };
    let mut dr_alerts = AlertTap::new(&f.client, &dr_cluster).await.unwrap();
    let mut dr2_alerts = AlertTap::new(&f.client, &dr2_cluster).await.unwrap();
    let dr = Broker::start(dr_cfg).await.unwrap();
    let serving = |cluster: String, id: &'static str, allowed: &'static [RejectReason]| {
        let cfg = at(&cluster, id);
        async move {
            let since = std::time::Instant::now();
            loop {
                match SlaveAgent::start(cfg.clone()).await {
                    Ok(slave) => return (slave, since.elapsed()),
                    Err(SlaveError::Refused { reason, .. })
                        if allowed.contains(&reason) && since.elapsed() < WAIT =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("{cluster} did not serve {id}: {e}"),
                }
            }
        }
    };
    let (site1, _) = serving(
        dr_cluster.clone(),
        "site1",
        &[RejectReason::ProductionAvailable],
    )
    .await;

    // dr older than dr2 by more than the 1 s lease (the margin within which names decide).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dr2 = Broker::start(dr2_cfg).await.unwrap();
    let yielded = dr2_alerts
        .wait_for("dr2 yields to dr", |a| {
            a.kind == AlertKind::LicenseRefused && a.severity == Severity::Critical
        })
        .await
        .unwrap();
    assert!(
        yielded
            .message
            .contains(&format!("backup cluster {dr_cluster} ")),
        "{}",
        yielded.message
    );
    let warned = dr_alerts
        .wait_for("dr goes on", |a| {
            a.kind == AlertKind::LicenseRefused && a.severity == Severity::Warning
        })
        .await
        .unwrap();
    assert!(warned.message.contains(&dr2_cluster), "{}", warned.message);
    let detail = refused_with(at(&dr2_cluster, "site2"), RejectReason::LicenseInUse).await;
    assert!(
        detail.contains(&format!("backup cluster {dr_cluster} ")),
        "{detail}"
    );
    assert!(site1.register("a1", "inbound").await.unwrap().is_approved());

    // The first backup stops: the second takes over once it is silent for a lease.
    dr.stop().await.unwrap();
    let (site2, took_over) =
        serving(dr2_cluster.clone(), "site2", &[RejectReason::LicenseInUse]).await;
    eprintln!(
        "measured: the second backup served {took_over:?} after the first stopped (lease 1 s)"
    );
    assert!(site2.register("b1", "inbound").await.unwrap().is_approved());
    site1.shutdown().await;
    site2.shutdown().await;
    dr2.stop().await.unwrap();
}

/// Steps: production master `p1` and backup master `d1` (backing p1's license, 2 seats) on
/// one NATS; a production slave with p1's cluster as primary and d1's as secondary
/// (failover wait 0, request timeout 1 s). It registers a1 at production. Production
/// stops: within the failover wait plus the backup's lease and slack the slave's
/// registrations are approved by the backup (a2, a3), the backup's limit applies (a4
/// refused), and the hosts' books (a1..a3) against the masters: production is not there to
/// ask, the backup counts 2. The slave's status says it is served by the backup, and which
/// master holds what.
///
/// Then the handback, slave side: production restarts with at most 2 seats per slave (so
/// it can take one of the two backup agents back), and the backup's handback window is
/// 10 s. Before the window ends the slave moves one backup agent to production (registered
/// there, released at the backup) while the host still holds all three; production's
/// status row for the slave says the backup holds 1 seat. At the window's end the backup
/// releases the one production refused and the host logs it out (`production_available`):
/// the host holds a1 and the moved agent, production holds exactly those, the backup none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_fails_over_to_its_backup_master_when_production_stops() {
    let f = Fixture::new().await.unwrap();
    let window = Duration::from_secs(10);
    let Pair {
        prod_cfg,
        dr_cluster,
        dr_cfg,
        ..
    } = watched_pair(&f, window);
    let prod = Broker::start(prod_cfg.clone()).await.unwrap();
    let dr = Broker::start(dr_cfg).await.unwrap();
    let mut cfg = f.slave_config("site1").unwrap();
    cfg.secondary = Some(lmbus_slave::MasterEndpoint {
        nats_url: f.nats.url(),
        nats_auth: Default::default(),
        cluster: dr_cluster.clone(),
    });
    fails_over_fast(&mut cfg);
    let slave = SlaveAgent::start(cfg).await.unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert_eq!(f.status().await.unwrap().total_in_use, 1);

    prod.stop().await.unwrap();
    let stopped = std::time::Instant::now();
    let mut told = vec!["a1".to_owned()];
    let mut n = 2;
    while told.len() < 3 {
        let agent = format!("a{n}");
        match slave.register(&agent, "inbound").await {
            Ok(outcome) if outcome.is_approved() => {
                told.push(agent);
                n += 1;
            }
            other => {
                assert!(
                    stopped.elapsed() < Duration::from_secs(15),
                    "the backup did not serve {agent} within 15 s: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!(
        "measured: the slave's registrations were approved by the backup {:?} after production stopped",
        stopped.elapsed()
    );
    match slave.register("a9", "inbound").await.unwrap() {
        lmbus_slave::Outcome::Rejected { reason, .. } => {
            assert_eq!(reason, RejectReason::AggregateLimit)
        }
        other => panic!("beyond the backup's 2 seats: {other:?}"),
    }
    let mut held: Vec<String> = slave.agents().into_iter().map(|c| c.agent_id).collect();
    held.sort();
    told.sort();
    assert_eq!(held, told, "the host's books");
    let st = status(&f.client, &dr_cluster).await.unwrap();
    assert_eq!(st.total_in_use, 2, "the backup holds what it granted");
    // The slave's view: served by the backup, and what each master holds.
    let view = slave.status();
    assert_eq!(view.served_by, Some(Context::Backup));
    let masters: Vec<_> = view
        .masters
        .iter()
        .map(|m| (m.name.as_str(), m.context, m.agents))
        .collect();
    assert_eq!(
        masters,
        [
            ("primary", Some(Context::Production), 1),
            ("secondary", Some(Context::Backup), 2)
        ]
    );

    // Production is back, with room for one of the two backup agents (2 seats per slave).
    let mut prod_cfg = prod_cfg;
    prod_cfg.max_agents_per_slave = 2;
    let prod = Broker::start(prod_cfg).await.unwrap();
    let back = std::time::Instant::now();
    let (moved_after, host_held) = loop {
        // The host's books first: an agent logged out before the move shows here.
        let host_held = slave.agents().len();
        if f.status().await.is_ok_and(|st| st.total_in_use >= 2) {
            break (back.elapsed(), host_held);
        }
        assert!(back.elapsed() < WAIT, "no backup agent moved to production");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "measured: a backup agent moved to production {moved_after:?} after production was back (window {window:?})"
    );
    assert_eq!(
        host_held, 3,
        "the host kept all three agents through the move"
    );
    assert!(
        moved_after < window / 2,
        "moved {moved_after:?} after production was back"
    );
    // The slave takes the seat as the primary's once the approval reaches it.
    lmbus_tests::eventually("the slave's books: production 2, backup 1", || async {
        let view = slave.status();
        (view.masters[0].agents, view.masters[1].agents) == (2, 1)
    })
    .await
    .unwrap();
    assert_eq!(slave.status().served_by, Some(Context::Production));
    // The backup hears the release just after the slave took the seat as the primary's.
    lmbus_tests::eventually("the backup holds 1", || async {
        status(&f.client, &dr_cluster)
            .await
            .is_ok_and(|st| st.total_in_use == 1)
    })
    .await
    .unwrap();
    // Production's status row for the slave says where the rest of it is served.
    lmbus_tests::eventually("production's row names the backup's seat", || async {
        f.status().await.is_ok_and(|st| {
            st.slaves.iter().any(|s| {
                s.slave_id == "site1"
                    && s.master
                        .is_some_and(|m| m.to_string() == "primary, in use; backup holds 1 seat")
            })
        })
    })
    .await
    .unwrap();

    // The window ends: the agent production refused is logged out, nothing is on both.
    lmbus_tests::eventually("the backup hands back the rest", || async {
        slave.agents().len() == 2
    })
    .await
    .unwrap();
    eprintln!(
        "measured: the backup released its last agent {:?} after production was back (window {window:?})",
        back.elapsed()
    );
    let view = slave.status();
    let out = view
        .logged_out
        .last()
        .expect("the logout of the refused agent");
    assert_eq!(out.reason, RejectReason::ProductionAvailable, "{out:?}");
    let mut host: Vec<String> = slave.agents().into_iter().map(|c| c.agent_id).collect();
    host.sort();
    assert!(
        host.contains(&"a1".to_owned()) && !host.contains(&out.agent_id),
        "{host:?}"
    );
    let st = f.status().await.unwrap();
    let prod_row = st.slaves.iter().find(|s| s.slave_id == "site1").unwrap();
    assert_eq!(
        (st.total_in_use, prod_row.in_use),
        (2, 2),
        "production's books against the host's {host:?}"
    );
    assert_eq!(
        status(&f.client, &dr_cluster).await.unwrap().total_in_use,
        0,
        "the backup holds nothing once the window ended"
    );
    // Both reports show the overlap (both held seats from production's return to the
    // window's end, and each heard the other): the backup's while it heard production's
    // leader, production's while the backup's leader said it held seats.
    let handed_back = back.elapsed();
    for (cluster, side) in [(&f.cluster, "production"), (&dr_cluster, "backup")] {
        let overlap = overlap_of(&f, cluster).expect("the report shows the overlap");
        eprintln!(
            "measured: {side}'s report shows {overlap:?} of overlap (window {window:?}, handback seen {handed_back:?} after production was back)"
        );
        assert!(
            overlap >= window.saturating_sub(Duration::from_secs(2))
                && overlap <= handed_back + Duration::from_secs(1),
            "{side}'s overlap {overlap:?}"
        );
    }
    slave.shutdown().await;
    prod.stop().await.unwrap();
    dr.stop().await.unwrap();
}

/// The overlap a master's usage report shows so far (`admin report --json`).
fn overlap_of(f: &Fixture, cluster: &str) -> Option<Duration> {
    let json = stdout_of(
        Command::new(bin("lmbus-broker").unwrap())
            .args(["admin", "report", "--json", "--nats", &f.nats.url()])
            .args(["--cluster", cluster]),
    )
    .unwrap();
    let report: lmbus_schemas::report::UsageReport = serde_json::from_str(&json).unwrap();
    report
        .backup
        .map(|b| Duration::from_secs_f64(b.overlap_minutes * 60.0))
}

/// Steps (issue 19, a split neither master hears): production master `p1` on NATS A with
/// slave site1; backup master `d1` on NATS B, with no link to A, backing p1's license and
/// watching p1's cluster, which it cannot hear there. site2 sits at the backup's site: its
/// primary is production's cluster on NATS B, where no production broker answers (it is
/// cut off from production only), its secondary the backup.
/// 1. site1 holds a1 at production; once its first lease has passed the backup serves
///    site2 (b1), within its own limits: both are in use at once.
/// 2. site2 releases b1 about 2 s later. The hosts' books against the masters: site1 holds
///    a1 and production 1; site2 nothing and the backup 0.
/// 3. Neither master heard the other, so neither one's own overlap counts it (the backup's
///    is 0, production's report has none). The backup's report, asked on NATS B and saved,
///    printed beside production's (`admin report --beside-file`) shows "both in use" in
///    both columns: the time b1 was held, from the two reports' spans of use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_cut_off_only_from_production_is_served_by_the_backup_and_the_reports_show_both_in_use()
 {
    let f = Fixture::new().await.unwrap();
    let Pair {
        prod_id, prod_cfg, ..
    } = production_and_backup(&f);
    let nats_b = NatsServer::start().unwrap();
    let client_b = nats_b.client().await.unwrap();
    let dr_cluster = format!("{}dr", f.cluster);
    let mut dr_cfg = broker_config(
        &nats_b,
        &dr_cluster,
        backup_license(&f, "dr.lic", prod_id, 2),
        &f.vendor,
        true,
    );
    dr_cfg.broker_id = "d1".into();
    dr_cfg.lease = Duration::from_secs(1);
    dr_cfg.handback_window = HANDBACK;
    dr_cfg.production_cluster = Some(f.cluster.clone());
    let prod = Broker::start(prod_cfg).await.unwrap();
    let dr = Broker::start(dr_cfg).await.unwrap();

    // 1. Production serves site1; the backup, hearing no production, serves site2.
    let site1 = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    assert!(site1.register("a1", "inbound").await.unwrap().is_approved());
    let mut cfg = lmbus_slave::SlaveConfig::new(
        &nats_b.url(),
        &f.cluster,
        lmbus_schemas::SlaveId::new("site2").unwrap(),
    );
    cfg.secondary = Some(lmbus_slave::MasterEndpoint {
        nats_url: nats_b.url(),
        nats_auth: Default::default(),
        cluster: dr_cluster.clone(),
    });
    fails_over_fast(&mut cfg);
    let started = std::time::Instant::now();
    let site2 = loop {
        match SlaveAgent::start(cfg.clone()).await {
            Ok(slave) => break slave,
            Err(SlaveError::Refused {
                reason: RejectReason::ProductionAvailable,
                ..
            }) if started.elapsed() < WAIT => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the backup did not serve site2: {e}"),
        }
    };
    // The backup refuses during its first lease (it cannot know yet whether production is
    // alive): asked again until it serves.
    loop {
        match site2.register("b1", "inbound").await.unwrap() {
            outcome if outcome.is_approved() => break,
            other => {
                assert!(
                    started.elapsed() < WAIT,
                    "the backup never served b1: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let held_from = std::time::Instant::now();
    eprintln!(
        "measured: the backup served site2 {:?} after it started",
        started.elapsed()
    );
    assert_eq!(site2.status().served_by, Some(Context::Backup));
    assert_eq!(site2.granted_by("b1"), Some("secondary"));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 2. site2 releases b1; the books on both sides.
    assert!(site2.unregister("b1").await.unwrap());
    let held = held_from.elapsed();
    assert_eq!(
        (site1.agents().len(), f.status().await.unwrap().total_in_use),
        (1, 1),
        "site1's books against production's"
    );
    lmbus_tests::eventually("the backup released b1", || async {
        status(&client_b, &dr_cluster)
            .await
            .is_ok_and(|st| st.total_in_use == 0 && site2.agents().is_empty())
    })
    .await
    .unwrap();

    // 3. The reports. Each master's own overlap: nothing heard, nothing counted.
    assert_eq!(
        overlap_of(&f, &f.cluster),
        None,
        "production heard no backup"
    );
    let json = stdout_of(
        Command::new(bin("lmbus-broker").unwrap())
            .args(["admin", "report", "--json", "--nats", &nats_b.url()])
            .args(["--cluster", &dr_cluster]),
    )
    .unwrap();
    let backup: lmbus_schemas::report::UsageReport = serde_json::from_str(&json).unwrap();
    assert_eq!(
        backup.backup.as_ref().map(|b| b.overlap_minutes),
        Some(0.0),
        "the backup heard no production"
    );
    let saved = tempfile::tempdir().unwrap();
    let file = saved.path().join("dr.json");
    std::fs::write(&file, &json).unwrap();
    let beside = |json: bool| {
        let mut cmd = Command::new(bin("lmbus-broker").unwrap());
        cmd.args(["admin", "report", "--nats", &f.nats.url()])
            .args(["--cluster", &f.cluster])
            .arg("--beside-file")
            .arg(&file);
        if json {
            cmd.arg("--json");
        }
        stdout_of(&mut cmd).unwrap()
    };
    let both: Vec<lmbus_schemas::report::UsageReport> =
        serde_json::from_str(&beside(true)).unwrap();
    assert_eq!(both.len(), 2);
    let spans = |r: &lmbus_schemas::report::UsageReport| r.in_use.clone().unwrap();
    let overlap = Duration::from_millis(lmbus_schemas::report::overlap_ms(
        &spans(&both[0]),
        &spans(&both[1]),
    ));
    eprintln!(
        "measured: the two reports' spans show both in use for {overlap:?} (site2 held b1 for {held:?})"
    );
    assert!(
        overlap + Duration::from_millis(500) >= held && overlap <= held + Duration::from_secs(1),
        "both in use {overlap:?}, b1 held {held:?}"
    );
    let text = beside(false);
    let row = text
        .lines()
        .find(|l| l.starts_with("both in use (min)"))
        .unwrap_or_else(|| panic!("{text}"));
    let minutes: Vec<f64> = row
        .trim_start_matches("both in use (min)")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(minutes.len(), 2, "{row}");
    assert!(
        minutes.iter().all(|m| *m > 0.0 && *m == minutes[0]),
        "{row}"
    );
    site1.shutdown().await;
    site2.shutdown().await;
    prod.stop().await.unwrap();
    dr.stop().await.unwrap();
}

/// Steps (the handback with a paused backup, real processes and signals): production as two
/// `lmbus-broker` processes `p1` and `p2` (5 seats) and the backup `d1` as another (2 seats,
/// 30 s window) on one NATS; a slave daemon (`lmbus-slave run`) with production as primary
/// and the backup as its backup master (`--backup-nats`, `--backup-cluster`).
/// 1. a1 at production; both production replicas are killed (SIGKILL); a2 and a3 at the
///    backup.
/// 2. The backup is paused (SIGSTOP), then production restarts (in process): the slave moves a2 and a3
///    to production; the paused backup takes no release (it is owed them). The host holds
///    a1..a3, production counts the same 3, nobody is logged out.
/// 3. The backup resumes (SIGCONT): the slave's hello releases a2 and a3 there, long before
///    the window's end: the backup counts 0, the host and production still 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_backup_is_released_from_the_moved_agents_when_it_resumes() {
    use nix::sys::signal::Signal;
    let f = Fixture::new().await.unwrap();
    let Pair {
        prod_id,
        prod_cfg,
        dr_cluster,
        ..
    } = production_and_backup(&f);
    // A broker process of `cluster` with `license`, replica `id`, a 1 s lease.
    let broker = |cluster: &str, license: &std::path::Path, id: &str, extra: &[&str]| {
        Proc::spawn(
            Command::new(bin("lmbus-broker").unwrap())
                .args(["run", "--nats", &f.nats.url(), "--cluster", cluster])
                .arg("--license")
                .arg(license)
                .arg("--vendor-key")
                .arg(f.vendor.public_key_path())
                .args(["--allow-unlicensed-slaves", "--id", id])
                .args(["--stream-replicas", "1", "--lease", "1s"])
                .args(["--tick-interval", "100ms"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap()
    };
    // Production: two replicas, both killed with SIGKILL below.
    let prod_license = prod_cfg.license_path.clone();
    let p1 = broker(&f.cluster, &prod_license, "p1", &[]);
    let p2 = broker(&f.cluster, &prod_license, "p2", &[]);
    lmbus_tests::eventually("production leads", || async { f.status().await.is_ok() })
        .await
        .unwrap();
    let license = backup_license(&f, "dr.lic", prod_id, 2);
    let dr = broker(
        &dr_cluster,
        &license,
        "d1",
        &[
            "--handback-window",
            "30s",
            "--production-cluster",
            &f.cluster,
        ],
    );
    let host = SlaveDaemon::start(
        &f.nats.url(),
        &f.cluster,
        "site1",
        &[
            "--backup-nats",
            &f.nats.url(),
            "--backup-cluster",
            &dr_cluster,
        ],
    )
    .await;

    // 1. a1 at production, then a2 and a3 at the backup once every production replica was
    //    killed.
    assert_eq!(host.register("a1").await, Some(true));
    for p in [&p1, &p2] {
        p.signal(Signal::SIGKILL).unwrap();
    }
    let killed = std::time::Instant::now();
    for agent in ["a2", "a3"] {
        let since = std::time::Instant::now();
        while host.register(agent).await != Some(true) {
            assert!(since.elapsed() < WAIT, "the backup did not serve {agent}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "measured: the backup served a2 and a3 {:?} after both production replicas were killed (SIGKILL)",
        killed.elapsed()
    );
    assert_eq!(
        status(&f.client, &dr_cluster).await.unwrap().total_in_use,
        2
    );

    // 2. The backup paused; production back: a2 and a3 move, the backup is owed them.
    dr.signal(Signal::SIGSTOP).unwrap();
    let mut prod_alerts = AlertTap::new(&f.client, &f.cluster).await.unwrap();
    let prod = Broker::start(prod_cfg).await.unwrap();
    let back = std::time::Instant::now();
    lmbus_tests::eventually("a2 and a3 moved to production", || async {
        f.status().await.is_ok_and(|st| st.total_in_use == 3)
            && host
                .status()
                .await
                .is_some_and(|s| s.masters.iter().map(|m| m.agents).collect::<Vec<_>>() == [3, 0])
    })
    .await
    .unwrap();
    eprintln!(
        "measured: both backup agents moved to production {:?} after it was back, the backup paused",
        back.elapsed()
    );
    let held = host.agents().await.unwrap();
    assert_eq!(held, ["a1", "a2", "a3"], "the host's books");
    assert!(host.status().await.unwrap().logged_out.is_empty());

    // 3. The backup resumes: the hello it is owed releases both seats there.
    dr.signal(Signal::SIGCONT).unwrap();
    let resumed = std::time::Instant::now();
    lmbus_tests::eventually("the resumed backup releases the moved agents", || async {
        status(&f.client, &dr_cluster)
            .await
            .is_ok_and(|st| st.total_in_use == 0)
    })
    .await
    .unwrap();
    eprintln!(
        "measured: the resumed backup released them {:?} after SIGCONT",
        resumed.elapsed()
    );
    assert_eq!(host.agents().await.unwrap(), held, "the host's books");
    assert_eq!(f.status().await.unwrap().total_in_use, 3, "production's");
    assert!(host.status().await.unwrap().logged_out.is_empty());
    // The paused backup never held up production's heartbeats (each master's heartbeat
    // runs on its own): production never lost the slave.
    let lost: Vec<_> = prod_alerts
        .drain(Duration::from_millis(500))
        .await
        .unwrap()
        .iter()
        .filter(|a| a.kind == AlertKind::SlaveDisconnected)
        .cloned()
        .collect();
    assert!(lost.is_empty(), "production lost the slave: {lost:#?}");
    prod.stop().await.unwrap();
    let _ = dr.signal(Signal::SIGTERM);
}

/// Steps (issue 19, a backup master beside a primary and a secondary): one NATS;
/// production master `p1` (the fixture's cluster, 5 seats), a second production master `s1`
/// (its own cluster and license, 5 seats) as the slave's secondary, and backup master `d1`
/// (its own cluster, 2 seats, backing p1's license) as the slave's backup master
/// (`SlaveConfig::backup`, `--backup-nats` on the daemon).
/// 1. p1 stops: the next registration goes to the secondary, and the backup is not even
///    asked (it has no session of the slave).
/// 2. s1 stops too: the backup serves, within its own 2 seats (the next one is refused
///    `aggregate_limit`); the slave's status says it is served by the backup.
/// 3. p1 is back: the slave returns to it and moves the backup's agents there before the
///    backup's window; the backup ends with nothing.
/// Throughout, the host's books (what each registration was told) equal the masters'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_master_beside_a_primary_and_a_secondary_serves_only_while_both_are_down() {
    let f = Fixture::new().await.unwrap();
    let window = Duration::from_secs(20);
    let Pair {
        prod_cfg,
        dr_cluster,
        dr_cfg,
        ..
    } = watched_pair(&f, window);
    let second_cluster = format!("{}b", f.cluster);
    let mut second_cfg = broker_config(
        &f.nats,
        &second_cluster,
        f.vendor.master(5, &[]).unwrap(),
        &f.vendor,
        true,
    );
    second_cfg.broker_id = "s1".into();
    second_cfg.lease = Duration::from_secs(1);
    let prod = Broker::start(prod_cfg.clone()).await.unwrap();
    let second = Broker::start(second_cfg).await.unwrap();
    let dr = Broker::start(dr_cfg).await.unwrap();
    let endpoint = |cluster: &str| lmbus_slave::MasterEndpoint {
        nats_url: f.nats.url(),
        nats_auth: Default::default(),
        cluster: cluster.to_owned(),
    };
    let mut cfg = f.slave_config("site1").unwrap();
    cfg.secondary = Some(endpoint(&second_cluster));
    cfg.backup = Some(endpoint(&dr_cluster));
    fails_over_fast(&mut cfg);
    let slave = SlaveAgent::start(cfg).await.unwrap();
    let mut told: Vec<String> = Vec::new();
    // Registers `agent` until it is approved (within 15 s), and keeps the host's books.
    let approve = |agent: &'static str| {
        let slave = &slave;
        async move {
            let since = std::time::Instant::now();
            loop {
                match slave.register(agent, "inbound").await {
                    Ok(outcome) if outcome.is_approved() => return since.elapsed(),
                    other => {
                        assert!(
                            since.elapsed() < Duration::from_secs(15),
                            "{agent} was not approved within 15 s: {other:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    let books = |slave: &SlaveAgent| {
        slave
            .status()
            .masters
            .iter()
            .map(|m| (m.name.clone(), m.agents))
            .collect::<Vec<_>>()
    };
    let at = |p: u32, s: u32, b: u32| {
        vec![
            ("primary".to_owned(), p),
            ("secondary".to_owned(), s),
            ("backup".to_owned(), b),
        ]
    };
    approve("a1").await;
    told.push("a1".into());
    assert_eq!(books(&slave), at(1, 0, 0));

    // 1. The primary stops: the secondary, a production master, serves; the backup is
    //    not asked.
    prod.stop().await.unwrap();
    let took = approve("a2").await;
    told.push("a2".into());
    eprintln!("measured: the secondary approved a2 {took:?} after the primary stopped");
    assert_eq!(books(&slave), at(1, 1, 0));
    assert_eq!(slave.status().active_master, "secondary");
    assert_eq!(slave.status().served_by, Some(Context::Production));
    let st = status(&f.client, &dr_cluster).await.unwrap();
    assert!(
        st.total_in_use == 0 && !st.slaves.iter().any(|s| s.slave_id == "site1"),
        "the backup was asked while a production master answered: {:?}",
        st.slaves
    );

    // 2. The secondary stops too: now the backup serves, within its own limit.
    second.stop().await.unwrap();
    let took = approve("a3").await;
    told.push("a3".into());
    eprintln!(
        "measured: the backup approved a3 {took:?} after the secondary stopped (the primary already down)"
    );
    approve("a4").await;
    told.push("a4".into());
    match slave.register("a5", "inbound").await.unwrap() {
        lmbus_slave::Outcome::Rejected { reason, .. } => {
            assert_eq!(reason, RejectReason::AggregateLimit)
        }
        other => panic!("beyond the backup's 2 seats: {other:?}"),
    }
    assert_eq!(books(&slave), at(1, 1, 2));
    let view = slave.status();
    assert_eq!(
        (view.active_master.as_str(), view.served_by),
        ("backup", Some(Context::Backup))
    );
    let st = status(&f.client, &dr_cluster).await.unwrap();
    assert_eq!(st.total_in_use, 2, "the backup's books against the host's");
    // The backup's status row for the slave, once a heartbeat told it.
    lmbus_tests::eventually("the backup's row says backup master, in use", || async {
        status(&f.client, &dr_cluster).await.is_ok_and(|st| {
            st.slaves.iter().any(|s| {
                s.slave_id == "site1"
                    && s.master.is_some_and(|m| {
                        m.to_string() == "backup master, in use; production holds 2 seats"
                    })
            })
        })
    })
    .await
    .unwrap();

    // 3. The primary is back: the slave returns to it and moves the backup's agents.
    let prod = Broker::start(prod_cfg).await.unwrap();
    let back = std::time::Instant::now();
    lmbus_tests::eventually("both backup agents moved to the primary", || async {
        books(&slave) == at(3, 1, 0)
    })
    .await
    .unwrap();
    let moved = back.elapsed();
    eprintln!(
        "measured: the backup's agents moved to the primary {moved:?} after it was back (window {window:?})"
    );
    assert!(
        moved < window / 2,
        "moved {moved:?} after the primary was back"
    );
    assert_eq!(slave.status().active_master, "primary");
    lmbus_tests::eventually("the backup holds nothing", || async {
        status(&f.client, &dr_cluster)
            .await
            .is_ok_and(|st| st.total_in_use == 0)
    })
    .await
    .unwrap();
    let mut host: Vec<String> = slave.agents().into_iter().map(|c| c.agent_id).collect();
    host.sort();
    assert_eq!(host, told, "the host's books: nothing logged out");
    assert!(slave.status().logged_out.is_empty());
    let st = f.status().await.unwrap();
    let row = st.slaves.iter().find(|s| s.slave_id == "site1").unwrap();
    assert_eq!(
        (st.total_in_use, row.in_use),
        (3, 3),
        "the primary's books: a1 and the two moved (a2 stays at the stopped secondary)"
    );
    slave.shutdown().await;
    prod.stop().await.unwrap();
    dr.stop().await.unwrap();
}
