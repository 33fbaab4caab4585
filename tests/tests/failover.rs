//! Two masters per slave: a primary and a secondary, each with its own nats-server and
//! cluster name (as two sites would be); failover, return policies, overflow; and a NATS
//! server restart under load. Each test checks that no master counts more than its limit
//! and that every seat is counted once, by the master that granted it.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::time::{Duration, Instant};

use lmbus_schemas::RejectReason;
use lmbus_slave::{AgentEvent, MasterEndpoint, Outcome, ReturnPolicy, SlaveAgent, SlaveConfig};
use lmbus_tests::*;
use tokio::sync::broadcast;

fn two_masters(primary: &Fixture, secondary: &Fixture, id: &str) -> SlaveConfig {
    let mut cfg = primary.slave_config(id).unwrap();
    cfg.secondary = Some(MasterEndpoint {
        nats_url: secondary.nats.url(),
        nats_auth: Default::default(),
        cluster: secondary.cluster.clone(),
    });
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.request_timeout = Duration::from_millis(500);
    cfg
}

/// What `f`'s master is to its (only) slave, as its status says.
async fn master_use(f: &Fixture) -> Option<String> {
    f.status().await.unwrap().slaves[0]
        .master
        .map(|m| m.to_string())
}

/// Waits (bounded) for a `Switched` event to `master`; returns when it came.
async fn switched_to(events: &mut broadcast::Receiver<AgentEvent>, master: &str) -> Instant {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(AgentEvent::Switched { master: m, .. })) if m == master => return Instant::now(),
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event channel: {e}"),
            Err(_) => panic!("no switch to the {master} within {WAIT:?}"),
        }
    }
}

async fn in_use(f: &Fixture) -> u32 {
    f.status().await.unwrap().total_in_use
}

/// Steps: the primary site's nats-server is down when the slave starts: the slave starts on
/// the secondary and its registrations are granted there. The primary's NATS and broker
/// come back: with `return-to-primary` the slave switches back within a few heartbeats; new
/// seats go to the primary; the old seat is released at the secondary, which granted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_at_start_then_return_to_primary() {
    let mut primary = Fixture::new().await.unwrap();
    let secondary = Fixture::new().await.unwrap();
    let sb = secondary.broker(5, &[], true).await.unwrap();
    let watch_secondary = InvariantWatch::start(&secondary);
    primary.nats.kill();

    let slave = SlaveAgent::start(two_masters(&primary, &secondary, "site"))
        .await
        .unwrap();
    let mut events = slave.subscribe();
    assert_eq!(slave.status().active_master, "secondary");
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.granted_by("a1"), Some("secondary"));
    assert_eq!(in_use(&secondary).await, 1);

    primary.nats.restart().unwrap();
    let back = Instant::now();
    let pb = primary.broker(5, &[], true).await.unwrap();
    let at = switched_to(&mut events, "primary").await;
    eprintln!(
        "measured: back on the primary {:?} after its NATS restarted",
        at - back
    );
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.granted_by("a2"), Some("primary"));
    assert_eq!(in_use(&primary).await, 1);
    assert!(slave.unregister("a1").await.unwrap());
    assert_eq!(in_use(&secondary).await, 0);
    assert_eq!(in_use(&primary).await, 1);
    assert!(watch_secondary.finish().await.unwrap() <= 1);
    slave.shutdown().await;
    pb.stop().await.unwrap();
    sb.stop().await.unwrap();
}

/// Steps: both masters up, policy `stay`; a seat on the primary; the primary broker
/// stops: the slave switches to the secondary (measured from the stop) and the next
/// registration is granted there. The primary broker comes back with an empty table: the
/// slave still heartbeats it (it holds a seat there), says hello and the primary counts the
/// seat again, but new registrations stay on the secondary. The primary's status shows the
/// slave as "primary, idle; production holds 1 seat", the secondary's as "secondary, in use;
/// production holds 1 seat" (each master holds one of its seats).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_dies_while_serving_then_stay_on_secondary() {
    let primary = Fixture::new().await.unwrap();
    let secondary = Fixture::new().await.unwrap();
    let pb = primary.broker(5, &[], true).await.unwrap();
    let sb = secondary.broker(5, &[], true).await.unwrap();
    let watch_secondary = InvariantWatch::start(&secondary);
    let mut cfg = two_masters(&primary, &secondary, "site");
    cfg.return_policy = ReturnPolicy::Stay;
    let slave = SlaveAgent::start(cfg).await.unwrap();
    let mut events = slave.subscribe();
    assert_eq!(slave.status().active_master, "primary");
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.granted_by("a1"), Some("primary"));

    let stopped = Instant::now();
    pb.stop().await.unwrap();
    let at = switched_to(&mut events, "secondary").await;
    let detection = at - stopped;
    eprintln!("measured: switched to the secondary {detection:?} after the primary stopped");
    // The slave first rides through what could be a leader failover of the primary's
    // brokers (failover_wait, 5 s by default), then switches.
    assert!(detection < Duration::from_secs(8), "{detection:?}");
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.granted_by("a2"), Some("secondary"));

    let pb = primary.broker(5, &[], true).await.unwrap();
    primary.wait_in_use(1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(slave.status().active_master, "secondary", "policy stay");
    // Each master's License Monitor says what it is to the slave, from its heartbeats,
    // and what the other (a production master here) holds of it.
    eventually("each master knows what it is to the slave", || async {
        master_use(&primary).await.as_deref() == Some("primary, idle; production holds 1 seat")
            && master_use(&secondary).await.as_deref()
                == Some("secondary, in use; production holds 1 seat")
    })
    .await
    .unwrap();
    assert!(slave.register("a3", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.granted_by("a3"), Some("secondary"));
    assert_eq!(in_use(&primary).await, 1);
    assert_eq!(in_use(&secondary).await, 2);
    assert!(watch_secondary.finish().await.unwrap() <= 2);
    slave.shutdown().await;
    primary.wait_in_use(0).await.unwrap();
    secondary.wait_in_use(0).await.unwrap();
    pb.stop().await.unwrap();
    sb.stop().await.unwrap();
}

/// Steps: the primary has 1 seat, the secondary 5. With overflow on, the second agent is
/// rejected by the primary for capacity and granted by the secondary; its release goes to
/// the secondary. A slave without overflow gets the primary's `aggregate_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_to_the_secondary_at_capacity() {
    let primary = Fixture::new().await.unwrap();
    let secondary = Fixture::new().await.unwrap();
    let pb = primary.broker(1, &[], true).await.unwrap();
    let sb = secondary.broker(5, &[], true).await.unwrap();
    let watches = [
        InvariantWatch::start(&primary),
        InvariantWatch::start(&secondary),
    ];
    let mut cfg = two_masters(&primary, &secondary, "site");
    cfg.overflow = true;
    let slave = SlaveAgent::start(cfg).await.unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.granted_by("a1"), Some("primary"));
    assert_eq!(slave.granted_by("a2"), Some("secondary"));
    assert_eq!(
        slave.status().active_master,
        "primary",
        "overflow is not a failover"
    );
    assert_eq!(in_use(&primary).await, 1);
    assert_eq!(in_use(&secondary).await, 1);
    assert!(slave.unregister("a2").await.unwrap());
    assert_eq!(in_use(&secondary).await, 0);

    let plain = SlaveAgent::start(two_masters(&primary, &secondary, "plain"))
        .await
        .unwrap();
    match plain.register("p1", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::AggregateLimit),
        other => panic!("expected a rejection, got {other:?}"),
    }
    plain.shutdown().await;
    for watch in watches {
        watch.finish().await.unwrap();
    }
    slave.shutdown().await;
    pb.stop().await.unwrap();
    sb.stop().await.unwrap();
}

/// Steps: a broker and a slave share one nats-server; a load loop registers and releases
/// agents; the nats-server is killed and restarted on the same port mid-load. Clients
/// reconnect on their own, registrations are approved again afterwards, and the master's
/// count equals the agents the slave holds, within the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_under_load() {
    let mut f = Fixture::new().await.unwrap();
    let broker = f.broker(20, &[], true).await.unwrap();
    let watch = InvariantWatch::start(&f);
    let mut cfg = f.slave_config("site").unwrap();
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.request_timeout = Duration::from_millis(500);
    let slave = SlaveAgent::start(cfg).await.unwrap();
    let load = {
        let slave = slave.clone();
        tokio::spawn(async move {
            let (mut approved, mut unavailable) = (0u32, 0u32);
            let started = Instant::now();
            let mut i = 0u32;
            while started.elapsed() < Duration::from_secs(4) {
                i += 1;
                let agent = format!("a{}", i % 15);
                if slave.agents().iter().any(|a| a.agent_id == agent) {
                    let _ = slave.unregister(&agent).await;
                } else {
                    match slave.register(&agent, "inbound").await.unwrap() {
                        Outcome::Approved { .. } => approved += 1,
                        Outcome::Rejected {
                            reason: RejectReason::MasterUnavailable,
                            ..
                        } => unavailable += 1,
                        Outcome::Rejected { reason, detail } => panic!("{reason}: {detail}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (approved, unavailable)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.nats.restart().unwrap();
    let (approved, unavailable) = tokio::time::timeout(WAIT, load).await.unwrap().unwrap();
    eprintln!(
        "measured: {approved} approvals, {unavailable} refused as master_unavailable across the restart"
    );
    assert!(approved > 10);
    // After the load: the master agrees with the slave.
    eventually("master and slave agree", || async {
        let held = slave.agents().len() as u32;
        f.status()
            .await
            .is_ok_and(|st| st.total_in_use == held && st.total_in_use <= 20)
    })
    .await
    .unwrap();
    assert!(
        slave
            .register("after", "inbound")
            .await
            .unwrap()
            .is_approved()
    );
    assert!(watch.finish().await.unwrap() <= 20);
    slave.shutdown().await;
    f.wait_in_use(0).await.unwrap();
    broker.stop().await.unwrap();
}

/// Steps: a primary broker process and a secondary; the slave (switch delay 300 ms,
/// request timeout 3 s, policy `stay`) is on the primary. SIGSTOP the primary broker for
/// 800 ms, then SIGCONT: it answers the pending heartbeat late, slower than the switch
/// delay, and the slave switches to the secondary, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_primary_switches_to_the_secondary() {
    use nix::sys::signal::Signal;
    use std::process::{Command, Stdio};
    let primary = Fixture::new().await.unwrap();
    let secondary = Fixture::new().await.unwrap();
    let sb = secondary.broker(5, &[], true).await.unwrap();
    let mut alerts = primary.alerts().await.unwrap();
    let license = primary.vendor.master(5, &[]).unwrap();
    let pb = Proc::spawn(
        Command::new(bin("lmbus-broker").unwrap())
            .args([
                "run",
                "--nats",
                &primary.nats.url(),
                "--cluster",
                &primary.cluster,
            ])
            .arg("--license")
            .arg(&license)
            .arg("--vendor-key")
            .arg(primary.vendor.public_key_path())
            .arg("--allow-unlicensed-slaves")
            // A pause shorter than the lease is slowness, not a failover.
            .args(["--lease", "5s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    alerts
        .wait_for("leader_elected", |a| {
            a.kind == lmbus_schemas::AlertKind::LeaderElected
        })
        .await
        .unwrap();
    let mut cfg = two_masters(&primary, &secondary, "site");
    cfg.switch_delay = Duration::from_millis(300);
    cfg.request_timeout = Duration::from_secs(3);
    cfg.return_policy = ReturnPolicy::Stay;
    let slave = SlaveAgent::start(cfg).await.unwrap();
    let mut events = slave.subscribe();
    assert_eq!(slave.status().active_master, "primary");

    pb.signal(Signal::SIGSTOP).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    pb.signal(Signal::SIGCONT).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap();
        if let AgentEvent::Switched { master, reason } = event {
            assert_eq!(master, "secondary");
            assert!(reason.contains("slower"), "{reason}");
            break;
        }
    }
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.granted_by("a1"), Some("secondary"));
    slave.shutdown().await;
    pb.signal(Signal::SIGTERM).unwrap();
    sb.stop().await.unwrap();
}

/// Steps: both masters stop; the slave (grace 1 s) restricts after its grace period even
/// though it has two masters, refuses registrations with `restricted`, and reports the
/// restriction to the first master that comes back, which then serves it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_masters_down_means_grace_then_restriction() {
    let primary = Fixture::new().await.unwrap();
    let secondary = Fixture::new().await.unwrap();
    let pb = primary.broker(5, &[], true).await.unwrap();
    let sb = secondary.broker(5, &[], true).await.unwrap();
    let mut cfg = two_masters(&primary, &secondary, "site");
    cfg.grace_period = Duration::from_secs(1);
    let slave = SlaveAgent::start(cfg).await.unwrap();
    let mut events = slave.subscribe();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    pb.stop().await.unwrap();
    sb.stop().await.unwrap();
    let stopped = Instant::now();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap();
        if let AgentEvent::Restricted { logged_out } = event {
            assert_eq!(logged_out, 1);
            break;
        }
    }
    eprintln!(
        "measured: restricted {:?} after both masters stopped (grace 1 s)",
        stopped.elapsed()
    );
    assert_eq!(slave.status().mode, "restricted");
    match slave.register("a2", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::Restricted),
        other => panic!("{other:?}"),
    }
    let mut alerts = secondary.alerts().await.unwrap();
    let sb = secondary.broker(5, &[], true).await.unwrap();
    alerts
        .wait_for("slave_restricted", |a| {
            a.kind == lmbus_schemas::AlertKind::SlaveRestricted
        })
        .await
        .unwrap();
    assert!(slave.register("a3", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.granted_by("a3"), Some("secondary"));
    slave.shutdown().await;
    sb.stop().await.unwrap();
}
