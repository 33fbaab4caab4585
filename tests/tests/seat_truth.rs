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

/// Steps: a broker (40 seats) and an embedded slave. Each of 20 agents is registered; then,
/// for each, a second registration and a release of the same agent are called together,
/// the registration first. The slave answers them in that order (one operation per agent
/// at a time), so the release is the last word: afterwards the host's books (approvals, less
/// the releases it asked for, in the order the answers came) are empty, the slave holds no
/// agent and the master counts no seat for it. Before the slave kept one operation per
/// agent, the second approval came back after the release had taken the seat off the
/// slave's table, and put it back there while the master had released it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_called_while_a_registration_is_in_flight_is_the_last_word() {
    let f = Fixture::new().await.unwrap();
    let _broker = f.broker(40, &[], true).await.unwrap();
    let slave = lmbus_slave::SlaveAgent::start(f.slave_config("racing").unwrap())
        .await
        .unwrap();
    let agents: Vec<String> = (0..20).map(|n| format!("a{n}")).collect();
    for agent in &agents {
        let first = tokio::time::timeout(Duration::from_secs(10), slave.register(agent, "inbound"))
            .await
            .unwrap()
            .unwrap();
        assert!(first.is_approved(), "{first:?}");
    }
    let mut books = std::collections::BTreeSet::new();
    for agent in &agents {
        // Polled in order: the registration asks first, the release right after it.
        let (again, released) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(slave.register(agent, "inbound"), slave.unregister(agent))
        })
        .await
        .unwrap();
        if again.unwrap().is_approved() {
            books.insert(agent.clone());
        }
        if released.unwrap() {
            books.remove(agent);
        }
    }
    assert!(books.is_empty(), "the host's books: {books:?}");
    assert!(
        slave.agents().is_empty(),
        "the slave holds {:?}",
        slave.agents()
    );
    let status = f.status().await.unwrap();
    let at_master = status
        .slaves
        .iter()
        .find(|s| s.slave_id == "racing")
        .map_or(0, |s| s.in_use);
    assert_eq!(at_master, 0, "the master still counts seats for the slave");
    slave.shutdown().await;
}
