//! Losing the master, the timing rule and operator releases, with real nats-server and
//! broker/slave processes stopped with real signals.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lmbus_schemas::{AlertKind, RejectReason};
use lmbus_slave::{AgentEvent, Outcome, Restriction, SlaveAgent};
use lmbus_tests::*;
use nix::sys::signal::Signal;

fn rejected(o: &Outcome) -> Option<RejectReason> {
    match o {
        Outcome::Rejected { reason, .. } => Some(*reason),
        Outcome::Approved { .. } => None,
    }
}

/// Steps: a slave (grace 1 s, logout-all) holds two agents; the broker stops; the slave
/// notices at its next heartbeat, refuses new registrations with `master_unavailable`
/// during the grace period, then restricts: both agents are logged out with `restricted`
/// and registrations are refused with `restricted`. A broker starts again: the slave
/// reconnects, the `slave_restricted` alert goes out, and registrations work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_master_means_grace_then_restriction() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(5, &[], true).await.unwrap();
    let mut cfg = f.slave_config("site").unwrap();
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.request_timeout = Duration::from_millis(500);
    // One broker, no standby: nothing to ride through.
    cfg.failover_wait = Duration::from_millis(200);
    cfg.grace_period = Duration::from_secs(1);
    cfg.after_grace = Restriction::LogoutAll;
    let slave = SlaveAgent::start(cfg).await.unwrap();
    let mut events = slave.subscribe();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());

    let stopped = Instant::now();
    broker.stop().await.unwrap();
    let mut detected = None;
    let mut logged_out = Vec::new();
    let mut restricted_at = None;
    while restricted_at.is_none() {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap();
        match event {
            AgentEvent::Disconnected { .. } => {
                detected.get_or_insert(stopped.elapsed());
                let outcome = slave.register("a3", "inbound").await.unwrap();
                assert_eq!(rejected(&outcome), Some(RejectReason::MasterUnavailable));
            }
            AgentEvent::LoggedOut(l) if l.reason == RejectReason::Restricted => {
                logged_out.push(l.agent_id)
            }
            AgentEvent::Restricted { logged_out: n } => {
                assert_eq!(n, 2);
                restricted_at = Some(stopped.elapsed());
            }
            _ => {}
        }
    }
    let detected = detected.expect("the slave never noticed the master was gone");
    let restricted_at = restricted_at.unwrap();
    eprintln!(
        "measured: master loss detected after {detected:?}, restricted after {restricted_at:?}"
    );
    assert!(detected < Duration::from_secs(2), "{detected:?}");
    // The grace period runs from the last answered heartbeat, at most one interval
    // before the broker stopped.
    assert!(
        restricted_at >= Duration::from_millis(900),
        "restricted before the grace ended: {restricted_at:?}"
    );
    logged_out.sort();
    assert_eq!(logged_out, ["a1", "a2"]);
    assert!(slave.agents().is_empty());
    assert_eq!(slave.status().mode, "restricted");
    assert_eq!(
        rejected(&slave.register("a4", "inbound").await.unwrap()),
        Some(RejectReason::Restricted)
    );

    let broker = f.broker(5, &[], true).await.unwrap();
    alerts
        .wait_for("slave_restricted", |a| {
            a.kind == AlertKind::SlaveRestricted && a.slave.as_deref() == Some("site")
        })
        .await
        .unwrap();
    assert_eq!(slave.status().mode, "connected");
    assert!(slave.register("a5", "inbound").await.unwrap().is_approved());
    slave.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: a slave daemon (grace 1 s, logout-all, request timeout 300 ms) holds 3 of 4 seats;
/// SIGSTOP it for 3 s: the master marks it disconnected, then reclaims its seats after
/// grace + margin (1 s) with a `seats_reclaimed` alert; another slave takes 3 seats; SIGCONT:
/// the resumed slave restricts first (its grace and the least reclaim margin are long over, so
/// it logs its agents out as `reclaimed`), says hello with no agents,
/// and nothing is granted twice. A status poller checks throughout that the total never
/// exceeds the limit and always equals the sum over slaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_slave_is_reclaimed_and_reconciles_without_double_seats() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let mut cfg = broker_config(
        &f.nats,
        &f.cluster,
        f.vendor.master(4, &[]).unwrap(),
        &f.vendor,
        true,
    );
    cfg.reclaim_margin = Duration::from_secs(1);
    let broker = Broker::start(cfg).await.unwrap();
    let invariant = InvariantWatch::start(&f);

    let api = format!("127.0.0.1:{}", free_port());
    let frozen = Proc::spawn(
        Command::new(bin("lmbus-slave").unwrap())
            .args(["run", "--nats", &f.nats.url(), "--cluster", &f.cluster])
            .args([
                "--id",
                "frozen",
                "--api",
                &api,
                "--heartbeat-interval",
                "200ms",
            ])
            .args(["--grace-period", "1s", "--request-timeout", "300ms"])
            // The timing rule: margin (1 s) > request timeout + the longer of the failover
            // and election waits + 1% grace.
            .args(["--failover-wait", "200ms", "--election-wait", "200ms"])
            .args(["--after-grace", "logout-all"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        Command::new(bin("lmbus-slave").unwrap())
            .args(args)
            .args(["--api", &api])
            .output()
            .unwrap()
    };
    eventually("slave API up", || async {
        cli(&["status"]).status.success()
    })
    .await
    .unwrap();
    for a in ["f1", "f2", "f3"] {
        assert!(cli(&["register", a, "inbound"]).status.success());
    }
    f.wait_in_use(3).await.unwrap();

    frozen.signal(Signal::SIGSTOP).unwrap();
    let frozen_at = Instant::now();
    let reclaimed = alerts
        .wait_for("seats_reclaimed", |a| a.kind == AlertKind::SeatsReclaimed)
        .await
        .unwrap();
    let reclaim_after = frozen_at.elapsed();
    assert!(
        reclaimed
            .message
            .contains("reclaimed 3 seats of slave frozen")
    );
    assert!(
        reclaim_after >= Duration::from_secs(2) - Duration::from_millis(250),
        "reclaimed before grace + margin: {reclaim_after:?}"
    );
    // The other slave's timings must fit the 1 s margin too (timing rule).
    let mut other_cfg = f.slave_config("other").unwrap();
    other_cfg.request_timeout = Duration::from_millis(300);
    other_cfg.failover_wait = Duration::from_millis(200);
    other_cfg.election_wait = Duration::from_millis(200);
    other_cfg.grace_period = Duration::from_secs(10);
    let other = SlaveAgent::start(other_cfg).await.unwrap();
    for a in ["o1", "o2", "o3"] {
        assert!(other.register(a, "inbound").await.unwrap().is_approved());
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(frozen_at.elapsed())).await;
    frozen.signal(Signal::SIGCONT).unwrap();

    alerts
        .wait_count("slave_connected twice for frozen", 2, |a| {
            a.kind == AlertKind::SlaveConnected && a.slave.as_deref() == Some("frozen")
        })
        .await
        .unwrap();
    eventually("the resumed slave is reconciled", || async {
        let st = f.status().await.unwrap();
        st.slaves
            .iter()
            .any(|s| s.slave_id == "frozen" && s.connected && s.in_use == 0)
    })
    .await
    .unwrap();
    let status = String::from_utf8_lossy(&cli(&["status"]).stdout).to_string();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["agents"], 0, "{status}");
    assert!(
        status["logged_out"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["reason"] == "reclaimed"),
        "frozen past its grace and the reclaim margin, the slave logs its agents out as reclaimed: {status}"
    );
    // One seat left: exactly one more registration fits, whoever asks.
    assert!(cli(&["register", "f4", "inbound"]).status.success());
    assert_eq!(
        rejected(&other.register("o4", "inbound").await.unwrap()),
        Some(RejectReason::AggregateLimit)
    );
    eprintln!("measured: seats reclaimed {reclaim_after:?} after SIGSTOP (grace 1 s + margin 1 s)");
    let max_seen = invariant.finish().await.unwrap();
    assert!(max_seen <= 4);
    other.shutdown().await;
    frozen.signal(Signal::SIGTERM).unwrap();
    broker.stop().await.unwrap();
}

/// Steps: a slave holds two agents; `lmbus-broker admin release --slave S --agent A` frees
/// one seat: the slave logs the agent out (`released_by_admin`), the master counts one
/// seat, a `seats_released` alert names the operator; releasing all frees the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_release_logs_the_agent_out() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(5, &[], true).await.unwrap();
    let slave = SlaveAgent::start(f.slave_config("site").unwrap())
        .await
        .unwrap();
    let mut events = slave.subscribe();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());

    let admin = |extra: &[&str]| {
        Command::new(bin("lmbus-broker").unwrap())
            .args([
                "admin",
                "release",
                "--nats",
                &f.nats.url(),
                "--cluster",
                &f.cluster,
            ])
            .args(["--slave", "site", "--operator", "alice"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = admin(&["--agent", "a1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("released 1 seat of slave site: a1"));
    match tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap()
    {
        AgentEvent::LoggedOut(l) => {
            assert_eq!(l.agent_id, "a1");
            assert_eq!(l.reason, RejectReason::ReleasedByAdmin);
        }
        other => panic!("expected a logout, got {other:?}"),
    }
    assert_eq!(slave.agents().len(), 1);
    f.wait_in_use(1).await.unwrap();
    let alert = alerts
        .wait_for("seats_released", |a| a.kind == AlertKind::SeatsReleased)
        .await
        .unwrap();
    assert!(alert.message.contains("alice"), "{}", alert.message);

    // Releasing every seat of a slave asks for confirmation unless `--yes`.
    let out = admin(&[]);
    assert!(!out.status.success());
    let out = admin(&["--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_in_use(0).await.unwrap();
    eventually("a2 logged out on the slave", || async {
        slave.agents().is_empty()
    })
    .await
    .unwrap();
    let out = admin(&["--agent", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no seat"));
    slave.shutdown().await;
    broker.stop().await.unwrap();
}
