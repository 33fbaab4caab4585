#![allow(clippy::unwrap_used)]
//! Seat truth seen from the hosts: what a slave's hosts were told against what the master
//! counts, across pauses of the slave process (SIGSTOP past its grace period with
//! registrations in flight, then SIGCONT) and the hellos they cause.

use std::time::Duration;

use lmbus_schemas::{AlertKind, SlaveId};
use lmbus_tests::daemon::SlaveDaemon;
use lmbus_tests::*;
use nix::sys::signal::Signal;

/// Steps: a broker (10 seats) and an `lmbus-slave` daemon (heartbeat 200 ms, grace 2 s)
/// whose hosts register and unregister through its HTTP API. Each of 6 rounds: 8
/// registrations are sent at once and the daemon is frozen (SIGSTOP) while they are in
/// flight, for 3 s (past its grace period), then resumed (SIGCONT); the in-flight
/// registrations get their answers, the slave restricts and says hello again. One second
/// (five heartbeats) later the hosts' books (approvals they were told, less the logouts
/// the daemon reports) equal the daemon's agents and the master's count for it, every
/// round, and the total never exceeded the license. Then a few more registrations, and
/// the same check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_paused_past_its_grace_with_registrations_in_flight_agrees_with_the_master() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(10, &[], true).await.unwrap();
    let slave =
        std::sync::Arc::new(SlaveDaemon::start(&f.nats.url(), &f.cluster, "paused", &[]).await);
    let id = SlaveId::new("paused").unwrap();
    let master_agents = || async {
        let status = f.status().await.unwrap();
        status
            .slaves
            .iter()
            .find(|s| s.slave_id == id.as_str())
            .map_or(0, |s| s.in_use)
    };
    // The hosts' books: agents they were told hold a seat, less those the daemon since
    // reported logged out.
    let mut told = std::collections::BTreeSet::new();
    for round in 0..6 {
        let mut inflight = Vec::new();
        for n in 0..8 {
            let slave = slave.clone();
            let agent = format!("r{round}-a{n}");
            inflight.push(tokio::spawn(async move {
                (slave.register(&agent).await, agent)
            }));
        }
        tokio::time::sleep(Duration::from_millis(round * 2)).await;
        slave.proc.signal(Signal::SIGSTOP).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        slave.proc.signal(Signal::SIGCONT).unwrap();
        let mut approved = 0;
        for t in inflight {
            if let (Some(true), agent) = t.await.unwrap() {
                approved += 1;
                told.insert(agent);
            }
        }
        // One second is five heartbeats: any disagreement is settled by then.
        tokio::time::sleep(Duration::from_secs(1)).await;
        slave.forget_logged_out(&mut told).await;
        let agents = slave.agents().await.unwrap();
        let master = master_agents().await;
        eprintln!(
            "round {round}: {approved} of 8 in-flight registrations answered approved; the hosts hold {} agents, the slave {}, the master counts {master}",
            told.len(),
            agents.len()
        );
        assert_eq!(
            told.iter().cloned().collect::<Vec<_>>(),
            agents,
            "round {round}: the hosts' books differ from the slave's agents"
        );
        assert_eq!(
            told.len() as u32,
            master,
            "round {round}: the hosts' books {told:?} differ from the master's count"
        );
        let status = f.status().await.unwrap();
        assert!(status.total_in_use <= status.total_limit);
        // Release what is held, so each round starts with room.
        for agent in std::mem::take(&mut told) {
            assert!(slave.unregister(&agent).await, "unregister {agent}");
        }
    }
    let mut held = 0;
    for n in 0..4 {
        if slave.register(&format!("final-{n}")).await == Some(true) {
            held += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(master_agents().await, held);
    // Read what the master said meanwhile: it never reclaimed (the pauses stayed within
    // its reclaim margin), so every difference was settled by hellos alone.
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        alerts.wait_for("nothing", |_| false),
    )
    .await;
    assert!(!alerts.seen.is_empty());
    assert!(
        !alerts
            .seen
            .iter()
            .any(|a| a.kind == AlertKind::SeatsReclaimed),
        "{:#?}",
        alerts.seen
    );
    drop(slave);
    broker.stop().await.unwrap();
}

/// Steps: a broker (4 seats, reclaim margin 3 s) and a slave daemon (grace 2 s) whose hosts hold 3 seats. The daemon is frozen (SIGSTOP) for 7 s:
/// the master reclaims the 3 seats (`seats_reclaimed`) and grants them to another slave's
/// hosts (the frozen hosts' books are over the limit now: a freeze breaks the timing
/// rule's clock assumption, as the README says). On SIGCONT the daemon's first act is to log its hosts' agents out with the
/// reason `reclaimed` (not a limit rejection), so its hosts' books empty and, with the
/// other slave's, equal the master's seats and never exceed the license.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_frozen_past_the_reclaim_margin_tells_its_hosts_reclaimed() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    // A margin of 3 s keeps the timing rule for the daemon (1 s + 1 s + 0.02 s).
    let mut cfg = broker_config(
        &f.nats,
        &f.cluster,
        f.vendor.master(4, &[]).unwrap(),
        &f.vendor,
        true,
    );
    cfg.reclaim_margin = Duration::from_secs(3);
    let broker = Broker::start(cfg).await.unwrap();
    let frozen = SlaveDaemon::start(&f.nats.url(), &f.cluster, "frozen", &[]).await;
    let mut told = std::collections::BTreeSet::new();
    for n in 0..3 {
        let agent = format!("f{n}");
        assert_eq!(frozen.register(&agent).await, Some(true), "{agent}");
        told.insert(agent);
    }
    let mut other = f.slave_config("other").unwrap();
    other.request_timeout = Duration::from_secs(1);
    other.election_wait = Duration::from_secs(1);
    other.failover_wait = Duration::ZERO;
    other.grace_period = Duration::from_secs(2);
    let other = lmbus_slave::SlaveAgent::start(other).await.unwrap();
    let paused = tokio::time::Instant::now();
    frozen.proc.signal(Signal::SIGSTOP).unwrap();
    alerts
        .wait_for("the master reclaims the frozen slave's seats", |a| {
            a.kind == AlertKind::SeatsReclaimed
        })
        .await
        .unwrap();
    // The seats are free at the master: another slave's hosts get them.
    let mut others = 0;
    for n in 0..4 {
        if other
            .register(&format!("o{n}"), "inbound")
            .await
            .unwrap()
            .is_approved()
        {
            others += 1;
        }
    }
    assert_eq!(others, 4, "the reclaimed seats went to the other slave");
    eprintln!(
        "measured: the master reclaimed and regranted {:?} after the freeze",
        paused.elapsed()
    );
    tokio::time::sleep_until(paused + Duration::from_secs(7)).await;
    frozen.proc.signal(Signal::SIGCONT).unwrap();
    eventually(
        "the frozen slave's hosts hear their agents are gone",
        || async {
            let status = frozen.status().await.unwrap();
            status.agents == 0 && status.logged_out.len() == 3
        },
    )
    .await
    .unwrap();
    let status = frozen.status().await.unwrap();
    for out in &status.logged_out {
        assert_eq!(
            out.reason,
            lmbus_schemas::RejectReason::Reclaimed,
            "{} was logged out as {:?}: {}",
            out.agent_id,
            out.reason,
            out.detail
        );
    }
    frozen.forget_logged_out(&mut told).await;
    assert!(told.is_empty(), "{told:?}");
    let master = f.status().await.unwrap();
    assert_eq!(master.total_in_use, 4);
    assert!(master.total_in_use <= master.total_limit);
    other.shutdown().await;
    broker.stop().await.unwrap();
}
