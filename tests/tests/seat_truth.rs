#![allow(clippy::unwrap_used)]
//! Seat truth seen from the hosts: what a slave's hosts were told against what the master
//! counts, across pauses of the slave process (SIGSTOP past its grace period with
//! registrations in flight, then SIGCONT) and the hellos they cause.

use std::process::{Command, Stdio};
use std::time::Duration;

use lmbus_schemas::{AlertKind, SlaveId};
use lmbus_slave::Outcome;
use lmbus_tests::*;
use nix::sys::signal::Signal;

/// Registers `agent` through the daemon's HTTP API; `Some(true)` approved, `Some(false)`
/// rejected, `None` no answer (the daemon was paused past the timeout).
fn register(api: &str, agent: &str) -> Option<bool> {
    let answer = ureq::post(&format!("http://{api}/v1/agents"))
        .config()
        .timeout_global(Some(Duration::from_secs(15)))
        .http_status_as_error(false)
        .build()
        .send_json(serde_json::json!({"agent_id": agent, "agent_type": "inbound"}))
        .ok()?
        .into_body()
        .read_json::<Outcome>()
        .ok()?;
    Some(answer.is_approved())
}

fn unregister(api: &str, agent: &str) {
    let _ = ureq::delete(&format!("http://{api}/v1/agents/{agent}"))
        .config()
        .timeout_global(Some(Duration::from_secs(15)))
        .build()
        .call();
}

/// The daemon's agents, sorted.
fn slave_agents(api: &str) -> Vec<String> {
    let list: Vec<lmbus_schemas::AgentClaim> = ureq::get(&format!("http://{api}/v1/agents"))
        .call()
        .unwrap()
        .into_body()
        .read_json()
        .unwrap();
    let mut agents: Vec<String> = list.into_iter().map(|c| c.agent_id).collect();
    agents.sort();
    agents
}

/// Steps: a broker (10 seats) and an `lmbus-slave` daemon (heartbeat 200 ms, grace 2 s)
/// whose hosts register and unregister through its HTTP API. Each of 6 rounds: 8
/// registrations are sent at once and the daemon is frozen (SIGSTOP) while they are in
/// flight, for 3 s (past its grace period), then resumed (SIGCONT); the in-flight
/// registrations get their answers, the slave restricts and says hello again. One second
/// (five heartbeats) later the daemon's agents equal the master's seats for it, every
/// round, and the total never exceeded the license. Then a few more registrations, and
/// the same check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_paused_past_its_grace_with_registrations_in_flight_agrees_with_the_master() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(10, &[], true).await.unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let slave = Proc::spawn(
        Command::new(bin("lmbus-slave").unwrap())
            .args(["run", "--nats", &f.nats.url(), "--cluster", &f.cluster])
            .args(["--id", "paused", "--api", &api])
            .args(["--heartbeat-interval", "200ms", "--grace-period", "2s"])
            .args([
                "--request-timeout",
                "1s",
                "--failover-wait",
                "0s",
                "--election-wait",
                "1s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let probe = api.clone();
    eventually("the slave's API answers", || {
        let probe = probe.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                ureq::get(&format!("http://{probe}/v1/status"))
                    .call()
                    .is_ok()
            })
            .await
            .unwrap()
        }
    })
    .await
    .unwrap();
    let id = SlaveId::new("paused").unwrap();
    let master_agents = || async {
        let status = f.status().await.unwrap();
        status
            .slaves
            .iter()
            .find(|s| s.slave_id == id.as_str())
            .map_or(0, |s| s.in_use)
    };
    for round in 0..6 {
        let mut inflight = Vec::new();
        for n in 0..8 {
            let api = api.clone();
            let agent = format!("r{round}-a{n}");
            inflight.push(tokio::task::spawn_blocking(move || register(&api, &agent)));
        }
        tokio::time::sleep(Duration::from_millis(round * 2)).await;
        slave.signal(Signal::SIGSTOP).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        slave.signal(Signal::SIGCONT).unwrap();
        let mut told = 0;
        for t in inflight {
            if t.await.unwrap() == Some(true) {
                told += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let api2 = api.clone();
        let agents = tokio::task::spawn_blocking(move || slave_agents(&api2))
            .await
            .unwrap();
        let master = master_agents().await;
        eprintln!(
            "round {round}: {told} of 8 in-flight registrations answered approved; the slave holds {} agents, the master counts {master}",
            agents.len()
        );
        assert_eq!(
            agents.len() as u32,
            master,
            "round {round}: the slave's agents {agents:?} differ from the master's count"
        );
        let status = f.status().await.unwrap();
        assert!(status.total_in_use <= status.total_limit);
        // Release what is held, so each round starts with room.
        for agent in agents {
            let api = api.clone();
            tokio::task::spawn_blocking(move || unregister(&api, &agent))
                .await
                .unwrap();
        }
    }
    let mut held = Vec::new();
    for n in 0..4 {
        let api2 = api.clone();
        let agent = format!("final-{n}");
        let a = agent.clone();
        if tokio::task::spawn_blocking(move || register(&api2, &a))
            .await
            .unwrap()
            == Some(true)
        {
            held.push(agent);
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(master_agents().await, held.len() as u32);
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
