//! A slave daemon's life as the master sees it, with real `lmbus-slave` processes: one
//! process per slave id (a second daemon with an id in use is refused while the first is
//! alive; a restart after a crash is accepted), a clean stop or a failed start says
//! goodbye, and slaves silent with no seats are forgotten by themselves or by an operator
//! (`lmbus-broker admin forget-slave`), for good: a new leader replays the `Forget`.
//!
//! These tests block on child processes, so they run on a multi-threaded runtime.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lmbus_schemas::{AlertKind, RejectReason, SeatChange, Severity, Subjects};
use lmbus_tests::daemon::SlaveDaemon;
use lmbus_tests::*;
use nix::sys::signal::Signal;

/// `lmbus-slave run` for `id` with the test daemon's timings, run to its end (it is
/// expected to fail), with its API on `api`.
fn run_slave_to_its_end(f: &Fixture, id: &str, api: &str) -> Output {
    let mut child = Command::new(bin("lmbus-slave").unwrap())
        .args(["run", "--nats", &f.nats.url(), "--cluster", &f.cluster])
        .args(["--id", id, "--api", api])
        .args(["--heartbeat-interval", "200ms", "--grace-period", "2s"])
        .args(["--request-timeout", "1s", "--failover-wait", "0s"])
        .args(["--election-wait", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lmbus-slave run --id {id} did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Every ledger change, in order.
async fn ledger_changes(f: &Fixture) -> Vec<SeatChange> {
    let subjects = Subjects::new(&f.cluster).unwrap();
    let ledger = lmbus_broker::ledger::Ledger::open(&f.client, &subjects, 1)
        .await
        .unwrap();
    let records = tokio::time::timeout(WAIT, ledger.read_all())
        .await
        .unwrap()
        .unwrap();
    lmbus_broker::ledger::audit(&records, 1_000, &Default::default()).unwrap();
    records
        .into_iter()
        .filter(|r| r.quarantined.is_none())
        .flat_map(|r| r.entry.changes)
        .collect()
}

/// Steps: daemon site1 holds a seat. A second `lmbus-slave run --id site1` exits with an
/// error naming `slave_id_in_use` within a few seconds (it waits once, in case the first
/// had just died, then gives up), a critical `slave_refused` alert names both instances,
/// and the first keeps its seat: no ledger record touched it, its host still holds it.
/// Then the first is killed with SIGKILL and started again at once: the new process waits
/// for the old one's silence limit, is accepted as a restart, and its reconcile releases
/// the seat it no longer holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_with_a_live_id_is_refused_and_a_crash_restart_is_accepted() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(5, &[], true).await.unwrap();
    let first = SlaveDaemon::start(&f.nats.url(), &f.cluster, "site1", &[]).await;
    assert_eq!(first.register("a1").await, Some(true));
    let records_before = ledger_changes(&f).await.len();

    let api = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let out = tokio::task::block_in_place(|| run_slave_to_its_end(&f, "site1", &api));
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon ran: {stderr}");
    assert!(
        stderr.contains("slave_id_in_use") && stderr.contains("in use by a live process"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(8), "it churned for {took:?}");
    let refused = alerts
        .wait_for("the duplicate's refusal", |a| {
            a.reason == Some(RejectReason::SlaveIdInUse)
        })
        .await
        .unwrap();
    assert_eq!(refused.severity, Severity::Critical);
    assert_eq!(refused.kind, AlertKind::SlaveRefused);
    assert!(
        refused.message.contains("a second process") && refused.message.contains("is alive"),
        "{}",
        refused.message
    );
    assert_eq!(
        refused.message.matches("instance").count(),
        2,
        "both instances are named: {}",
        refused.message
    );
    assert_eq!(first.agents().await, Some(vec!["a1".to_owned()]));
    let st = f.status().await.unwrap();
    assert_eq!(st.total_in_use, 1);
    assert!(
        st.slaves
            .iter()
            .any(|s| s.slave_id == "site1" && s.connected)
    );
    // Whatever the first did meanwhile (heartbeats record nothing), no seat moved.
    let changes = ledger_changes(&f).await;
    assert_eq!(changes.len(), records_before, "{changes:#?}");

    // A crash, and a restart at once.
    first.proc.signal(Signal::SIGKILL).unwrap();
    drop(first);
    let restarted = SlaveDaemon::start(&f.nats.url(), &f.cluster, "site1", &[]).await;
    let connected = alerts
        .wait_for("the restart", |a| {
            a.kind == AlertKind::SlaveConnected && a.message.contains("new process instance")
        })
        .await
        .unwrap();
    assert!(
        connected
            .message
            .contains("1 seat it no longer claims released"),
        "{}",
        connected.message
    );
    f.wait_in_use(0).await.unwrap();
    assert_eq!(restarted.register("a2").await, Some(true));
    drop(restarted);
    broker.stop().await.unwrap();
}

/// Steps: daemon site-t holds two seats and is stopped with SIGTERM: it exits cleanly, an
/// INFO `slave_stopped` alert says its 2 seats were released, its row is gone from the
/// status at once, and no `slave_disconnected` follows. A daemon whose local API port is
/// taken fails at startup after its hello: it says goodbye (`slave_stopped` quoting the
/// startup error) and leaves no row. One given a non-loopback `--api` without
/// `--api-allow-remote` fails before its hello: no alert names it and it leaves no row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_or_a_failed_start_says_goodbye() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(5, &[], true).await.unwrap();
    let mut stopping = SlaveDaemon::start(&f.nats.url(), &f.cluster, "site-t", &[]).await;
    assert_eq!(stopping.register("a1").await, Some(true));
    assert_eq!(stopping.register("a2").await, Some(true));
    stopping.proc.signal(Signal::SIGTERM).unwrap();
    assert!(stopping.proc.wait_timeout(WAIT).unwrap().success());
    let stopped = alerts
        .wait_for("site-t's goodbye", |a| {
            a.kind == AlertKind::SlaveStopped && a.slave.as_deref() == Some("site-t")
        })
        .await
        .unwrap();
    assert_eq!(stopped.severity, Severity::Info);
    assert!(
        stopped.message.contains("stopped") && stopped.message.contains("2 seats released"),
        "{}",
        stopped.message
    );
    let st = f.status().await.unwrap();
    assert!(st.slaves.iter().all(|s| s.slave_id != "site-t"), "{st:?}");
    assert_eq!(st.total_in_use, 0);
    // Past its silence limit (3 x 200 ms) and several ticks.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let remote = format!("0.0.0.0:{}", free_port());
    let out = tokio::task::block_in_place(|| run_slave_to_its_end(&f, "site-r", &remote));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "site-r started: {stderr}");
    assert!(
        stderr.contains("loopback") && stderr.contains("--api-allow-remote"),
        "{stderr}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port_in_use = taken.local_addr().unwrap().to_string();
    let out = tokio::task::block_in_place(|| run_slave_to_its_end(&f, "site-p", &port_in_use));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "site-p started: {stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
    let goodbye = alerts
        .wait_for("a failed start's goodbye", |a| {
            a.kind == AlertKind::SlaveStopped && a.slave.as_deref() == Some("site-p")
        })
        .await
        .unwrap();
    assert!(
        goodbye.message.contains("failed at startup") && goodbye.message.contains("cannot listen"),
        "{}",
        goodbye.message
    );
    drop(taken);
    // site-r never said hello: the goodbye of site-p came after anything it could have sent.
    assert!(
        !alerts
            .seen
            .iter()
            .any(|a| a.slave.as_deref() == Some("site-r")),
        "{:#?}",
        alerts.seen
    );
    let st = f.status().await.unwrap();
    assert!(st.slaves.is_empty(), "ghost rows: {:?}", st.slaves);
    // The goodbyes above came after site-t's silence limit: no disconnect was raised.
    assert!(
        !alerts
            .seen
            .iter()
            .any(|a| a.kind == AlertKind::SlaveDisconnected),
        "{:#?}",
        alerts.seen
    );
    broker.stop().await.unwrap();
}

/// Steps: a broker that forgets slaves silent for 2 s with no seats. Daemon site-g (no
/// seats) is killed: its `slave_disconnected` alert says when it is forgotten, then
/// `slave_forgotten` comes and its row is gone. Daemon site-h (one seat) is killed: it is
/// not forgotten by itself; `lmbus-broker admin forget-slave site-h` (the real binary)
/// releases its seat and removes it, and the same command for a connected slave is
/// refused. The broker is restarted (a new leader replaying the ledger): neither comes
/// back, and the ledger holds their `Forget` records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_slaves_are_forgotten_for_good() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let license = f.vendor.master(5, &[]).unwrap();
    let mut cfg = broker_config(&f.nats, &f.cluster, license, &f.vendor, true);
    cfg.forget_after = Duration::from_secs(2);
    let broker = Broker::start(cfg.clone()).await.unwrap();
    let ghost = SlaveDaemon::start(&f.nats.url(), &f.cluster, "site-g", &[]).await;
    let holder = SlaveDaemon::start(&f.nats.url(), &f.cluster, "site-h", &[]).await;
    let live = SlaveDaemon::start(&f.nats.url(), &f.cluster, "site-l", &[]).await;
    assert_eq!(holder.register("h1").await, Some(true));
    ghost.proc.signal(Signal::SIGKILL).unwrap();
    holder.proc.signal(Signal::SIGKILL).unwrap();
    let lost = alerts
        .wait_for("site-g disconnected", |a| {
            a.kind == AlertKind::SlaveDisconnected && a.slave.as_deref() == Some("site-g")
        })
        .await
        .unwrap();
    assert!(
        lost.message.contains("holds no seats and is forgotten in"),
        "{}",
        lost.message
    );
    alerts
        .wait_for("site-g forgotten", |a| {
            a.kind == AlertKind::SlaveForgotten && a.slave.as_deref() == Some("site-g")
        })
        .await
        .unwrap();
    let st = f.status().await.unwrap();
    let ids: Vec<&str> = st.slaves.iter().map(|s| s.slave_id.as_str()).collect();
    assert_eq!(ids, ["site-h", "site-l"], "site-h holds a seat: kept");

    let forget = |slave: &str| {
        Command::new(bin("lmbus-broker").unwrap())
            .args(["admin", "forget-slave", slave])
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster])
            .args(["--operator", "test-ops"])
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| forget("site-l"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is connected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::task::block_in_place(|| forget("site-h"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("test-ops forgot slave site-h: its 1 seat released"),
        "{stdout}"
    );
    let st = f.status().await.unwrap();
    assert_eq!(st.total_in_use, 0);
    assert_eq!(st.slaves.len(), 1);

    broker.stop().await.unwrap();
    let broker = Broker::start(cfg).await.unwrap();
    eventually("site-l is back, and only it", || async {
        f.status().await.is_ok_and(|st| {
            st.slaves.len() == 1 && st.slaves[0].slave_id == "site-l" && st.slaves[0].connected
        })
    })
    .await
    .unwrap();
    let forgotten: Vec<String> = ledger_changes(&f)
        .await
        .into_iter()
        .filter_map(|c| match c {
            SeatChange::Forget { slave } => Some(slave),
            _ => None,
        })
        .collect();
    assert_eq!(forgotten, ["site-g", "site-h"]);
    drop(live);
    broker.stop().await.unwrap();
}
