//! Registration through slave agents to a broker, on a real nats-server: limits, local
//! limits, idempotency, release, unlicensed slaves, a broker restart.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use lmbus_schemas::{
    AlertKind, BatchRequest, RegisterRequest, RejectReason, SlaveId, SlaveOp, Subjects, decode,
};
use lmbus_slave::{AgentEvent, Outcome, SlaveAgent, SlaveError};
use lmbus_tests::*;

fn rejected(o: &Outcome) -> Option<RejectReason> {
    match o {
        Outcome::Rejected { reason, .. } => Some(*reason),
        Outcome::Approved { .. } => None,
    }
}

async fn slave(f: &Fixture, id: &str, license: Option<&Path>) -> Result<SlaveAgent, SlaveError> {
    let cfg = match license {
        Some(path) => f.licensed_slave_config(id, path).unwrap(),
        None => f.slave_config(id).unwrap(),
    };
    tokio::time::timeout(WAIT, SlaveAgent::start(cfg))
        .await
        .unwrap()
}

/// Steps: master with 4 seats (inbound 3, outbound 2), two unlicensed slaves; register
/// under the limit (approved), fill the total, then one more is rejected with
/// `aggregate_limit`, the agent is logged out on the slave and an alert names it.
#[tokio::test]
async fn approves_under_the_limit_and_rejects_at_the_aggregate_limit() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f
        .broker(4, &[("inbound", 3), ("outbound", 2)], true)
        .await
        .unwrap();
    let s1 = slave(&f, "site-1", None).await.unwrap();
    let s2 = slave(&f, "site-2", None).await.unwrap();
    let mut events = s2.subscribe();

    assert!(s1.register("a1", "inbound").await.unwrap().is_approved());
    assert!(s1.register("a2", "inbound").await.unwrap().is_approved());
    assert!(s2.register("b1", "outbound").await.unwrap().is_approved());
    assert!(s2.register("b2", "outbound").await.unwrap().is_approved());
    let outcome = s2.register("b3", "inbound").await.unwrap();
    assert_eq!(rejected(&outcome), Some(RejectReason::AggregateLimit));

    match tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap()
    {
        AgentEvent::LoggedOut(l) => {
            assert_eq!(l.agent_id, "b3");
            assert_eq!(l.reason, RejectReason::AggregateLimit);
        }
        other => panic!("expected a logout, got {other:?}"),
    }
    assert!(s2.agents().iter().all(|a| a.agent_id != "b3"));
    let alert = alerts
        .wait_for("registration_rejected for b3", |a| {
            a.kind == AlertKind::RegistrationRejected && a.agent_id.as_deref() == Some("b3")
        })
        .await
        .unwrap();
    assert_eq!(alert.reason, Some(RejectReason::AggregateLimit));
    assert_eq!(alert.slave.as_deref(), Some("site-2"));

    let st = f.status().await.unwrap();
    assert_eq!(st.total_in_use, 4);
    assert_eq!(st.in_use_by_type.get("inbound"), Some(&2));
    s1.shutdown().await;
    s2.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: a licensed slave with local limit 2; a third registration is rejected with
/// `local_limit` and no register request reaches NATS (a tap on the slave's register
/// subject counts them), and the master relays the slave's report as an alert; the
/// slave's status lists a3 under `rejected`, not `logged_out`.
#[tokio::test]
async fn local_limit_rejects_without_asking_the_master() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let subjects = Subjects::new(&f.cluster).unwrap();
    let id = SlaveId::new("licensed-1").unwrap();
    let mut register_tap = f
        .client
        .subscribe(subjects.slave_op(&id, SlaveOp::Register))
        .await
        .unwrap();
    f.client.flush().await.unwrap();
    let broker = f.broker(10, &[], false).await.unwrap();
    let lic = f.vendor.slave(Some(2)).unwrap();
    let s = slave(&f, "licensed-1", Some(&lic)).await.unwrap();

    assert!(s.register("a1", "inbound").await.unwrap().is_approved());
    assert!(s.register("a2", "outbound").await.unwrap().is_approved());
    let outcome = s.register("a3", "inbound").await.unwrap();
    assert_eq!(rejected(&outcome), Some(RejectReason::LocalLimit));

    let alert = alerts
        .wait_for("local rejection of a3", |a| {
            a.kind == AlertKind::RegistrationRejected && a.agent_id.as_deref() == Some("a3")
        })
        .await
        .unwrap();
    assert_eq!(alert.reason, Some(RejectReason::LocalLimit));
    assert_eq!(alert.source, "slave:licensed-1");

    // Exactly the two approved registrations went over the wire.
    let mut seen = Vec::new();
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(300), register_tap.next()).await
    {
        let req: RegisterRequest = decode(&msg.payload).unwrap();
        seen.push(req.agent_id);
    }
    assert_eq!(seen, vec!["a1".to_owned(), "a2".to_owned()]);
    // a3 never held a seat: a refusal, not a logout.
    let status = s.status();
    assert_eq!(status.rejected.last().unwrap().agent_id, "a3");
    assert!(status.logged_out.is_empty(), "{:?}", status.logged_out);
    s.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: type limit reached → `type_limit`; unknown type → `unknown_agent_type`;
/// re-registering a held agent is approved as `already_held` without a second seat;
/// unregistering frees the seat for someone else; a clean slave shutdown frees the rest.
#[tokio::test]
async fn type_limits_idempotency_and_release() {
    let f = Fixture::new().await.unwrap();
    let broker = f
        .broker(10, &[("inbound", 2), ("supervisor", 1)], true)
        .await
        .unwrap();
    let s = slave(&f, "s", None).await.unwrap();

    assert!(s.register("a1", "inbound").await.unwrap().is_approved());
    assert!(s.register("a2", "inbound").await.unwrap().is_approved());
    assert_eq!(
        rejected(&s.register("a3", "inbound").await.unwrap()),
        Some(RejectReason::TypeLimit)
    );
    assert_eq!(
        rejected(&s.register("a3", "outbound").await.unwrap()),
        Some(RejectReason::UnknownAgentType)
    );
    assert_eq!(
        s.register("a1", "inbound").await.unwrap(),
        Outcome::Approved { already_held: true }
    );
    let st = f.status().await.unwrap();
    assert_eq!(
        st.total_in_use, 2,
        "re-registration must not take a second seat"
    );

    assert!(s.unregister("a1").await.unwrap());
    assert!(!s.unregister("a1").await.unwrap());
    assert!(s.register("a3", "inbound").await.unwrap().is_approved());
    let st = f.status().await.unwrap();
    assert_eq!(st.total_in_use, 2);
    assert_eq!(st.slaves[0].in_use_by_type.get("inbound"), Some(&2));
    s.shutdown().await;
    f.wait_in_use(0).await.unwrap();
    broker.stop().await.unwrap();
}

/// Steps: a master that refuses unlicensed slaves refuses one at start (clear error,
/// `slave_refused` alert); one that allows them accepts it and approves its agents up to
/// the aggregate limit; a master license cannot be used by a slave.
#[tokio::test]
async fn unlicensed_slaves_allowed_and_refused() {
    let strict = Fixture::new().await.unwrap();
    let mut alerts = strict.alerts().await.unwrap();
    let broker = strict.broker(5, &[], false).await.unwrap();
    match slave(&strict, "u1", None).await {
        Err(SlaveError::Refused { reason, detail }) => {
            assert_eq!(reason, RejectReason::UnlicensedNotAllowed);
            assert!(detail.contains("--allow-unlicensed-slaves"), "{detail}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    alerts
        .wait_for("slave_refused", |a| {
            a.kind == AlertKind::SlaveRefused && a.slave.as_deref() == Some("u1")
        })
        .await
        .unwrap();
    broker.stop().await.unwrap();

    let open = Fixture::new().await.unwrap();
    let broker = open.broker(5, &[], true).await.unwrap();
    let u = slave(&open, "u1", None).await.unwrap();
    for i in 0..5 {
        let outcome = u.register(&format!("a{i}"), "any").await.unwrap();
        assert!(outcome.is_approved());
    }
    assert_eq!(
        rejected(&u.register("a5", "any").await.unwrap()),
        Some(RejectReason::AggregateLimit)
    );
    assert_eq!(open.status().await.unwrap().slaves[0].license, None);

    // A master license on a slave is refused locally, before any network call.
    let master_lic = open.vendor.master(5, &[]).unwrap();
    match slave(&open, "m1", Some(&master_lic)).await {
        Err(SlaveError::Config(msg)) => assert!(msg.contains("master flag"), "{msg}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    u.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: a slave holds two seats; the broker stops and a new broker starts on the same
/// cluster with an empty table; the slave's next heartbeat is refused, it says hello again
/// with its agents, and the new broker counts both seats (no agent is logged out, no seat is
/// granted twice).
#[tokio::test]
async fn restarted_broker_rebuilds_seats_from_slave_hellos() {
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(5, &[], true).await.unwrap();
    let mut cfg = f.slave_config("s").unwrap();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let s = SlaveAgent::start(cfg).await.unwrap();
    assert!(s.register("a1", "inbound").await.unwrap().is_approved());
    assert!(s.register("a2", "inbound").await.unwrap().is_approved());
    broker.stop().await.unwrap();

    let broker = f.broker(5, &[], true).await.unwrap();
    f.wait_in_use(2).await.unwrap();
    assert_eq!(f.status().await.unwrap().slaves.len(), 1);
    assert_eq!(s.agents().len(), 2);
    assert!(s.status().logged_out.is_empty());
    assert_eq!(
        s.register("a1", "inbound").await.unwrap(),
        Outcome::Approved { already_held: true }
    );
    s.shutdown().await;
    broker.stop().await.unwrap();
}

/// Registers 30 distinct agents on `slave` one after another; returns the slowest.
async fn slowest_of_30(slave: &SlaveAgent, prefix: &str) -> Duration {
    let mut slowest = Duration::ZERO;
    for n in 0..30 {
        let sent = std::time::Instant::now();
        let outcome = slave
            .register(&format!("{prefix}{n}"), "inbound")
            .await
            .unwrap();
        slowest = slowest.max(sent.elapsed());
        assert!(outcome.is_approved(), "{outcome:?}");
    }
    slowest
}

/// Steps: a broker allowing 200 registrations per second per slave; the slave `good`
/// registers 30 agents (its slowest registration is the baseline); then `rogue` floods with
/// 32 concurrent registration loops for 3 s while `good` registers 30 more: every one of
/// them is approved, the slowest within a generous bound; the rogue got `rate_limited`
/// rejections and an alert says so (that it is one per 10 s is the engine's test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_slave_does_not_starve_the_others() {
    let f = Fixture::new().await.unwrap();
    let mut cfg = broker_config(
        &f.nats,
        &f.cluster,
        f.vendor.master(1000, &[]).unwrap(),
        &f.vendor,
        true,
    );
    cfg.slave_rate_limit = 200;
    let broker = Broker::start(cfg).await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let good = slave(&f, "good", None).await.unwrap();
    let baseline = slowest_of_30(&good, "calm-").await;

    let rogue = std::sync::Arc::new(slave(&f, "rogue", None).await.unwrap());
    let stop = std::time::Instant::now() + Duration::from_secs(3);
    let flood: Vec<_> = (0..32)
        .map(|n| {
            let rogue = rogue.clone();
            tokio::spawn(async move {
                let (mut sent, mut limited) = (0u64, 0u64);
                while std::time::Instant::now() < stop {
                    sent += 1;
                    if let Ok(Outcome::Rejected {
                        reason: RejectReason::RateLimited,
                        ..
                    }) = rogue.register(&format!("r{}", n % 8), "inbound").await
                    {
                        limited += 1;
                    }
                }
                (sent, limited)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = slowest_of_30(&good, "busy-").await;
    let (mut sent, mut limited) = (0, 0);
    for task in flood {
        let (s, l) = task.await.unwrap();
        sent += s;
        limited += l;
    }
    eprintln!(
        "measured: good's slowest registration {baseline:?} alone, {during:?} during a flood of {sent} registrations from rogue ({limited} rate_limited)"
    );
    assert!(limited > 0, "the flood was never limited ({sent} sent)");
    assert!(during < Duration::from_secs(2), "{during:?}");
    let alert = alerts
        .wait_for("a rate limit alert", |a| {
            a.reason == Some(RejectReason::RateLimited)
        })
        .await
        .unwrap();
    assert_eq!(alert.slave.as_deref(), Some("rogue"));
    broker.stop().await.unwrap();
}

/// A broker with `limit` seats and the slave `site1`, with a tap on every message the
/// slave sends the master (subscribed before the slave starts, so it misses none).
async fn tapped_slave(
    f: &Fixture,
    limit: u32,
) -> (Broker, Subjects, async_nats::Subscriber, SlaveAgent) {
    let broker = f.broker(limit, &[], true).await.unwrap();
    let subjects = Subjects::new(&f.cluster).unwrap();
    let site = SlaveId::new("site1").unwrap();
    let tap = f
        .client
        .subscribe(subjects.one_slave_ops(&site))
        .await
        .unwrap();
    f.client.flush().await.unwrap();
    let slave = slave(f, "site1", None).await.unwrap();
    (broker, subjects, tap, slave)
}

/// Steps: 16 callers on one slave, each registering and unregistering its agent in a
/// loop (as a busy host does), 20 times. A tap on the slave's subjects counts the messages
/// and the items in them: a caller asking again right after its answer must not go out
/// alone with the others a round behind it, so the messages carry 11 items or more on
/// average (16 callers; about 8 when the round's first caller went alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_asking_again_share_one_message() {
    const CALLERS: usize = 16;
    const ROUNDS: usize = 20;
    let f = Fixture::new().await.unwrap();
    let (broker, subjects, mut tap, slave) = tapped_slave(&f, 100).await;
    let callers = (0..CALLERS).map(|n| {
        let slave = slave.clone();
        tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let agent = format!("a{n}");
                assert!(
                    slave
                        .register(&agent, "inbound")
                        .await
                        .unwrap()
                        .is_approved()
                );
                assert!(slave.unregister(&agent).await.unwrap());
            }
        })
    });
    for caller in futures::future::join_all(callers).await {
        caller.unwrap();
    }
    let (mut messages, mut items) = (0, 0);
    while items < CALLERS * ROUNDS * 2
        && let Ok(Some(msg)) = tokio::time::timeout(WAIT, tap.next()).await
    {
        match subjects.parse_slave_op(msg.subject.as_str()).unwrap().1 {
            SlaveOp::Register | SlaveOp::Unregister => items += 1,
            SlaveOp::Batch => items += decode::<BatchRequest>(&msg.payload).unwrap().items.len(),
            _ => continue,
        }
        messages += 1;
    }
    assert_eq!(items, CALLERS * ROUNDS * 2);
    let per_message = items as f64 / messages as f64;
    eprintln!("measured: {items} items in {messages} messages, {per_message:.1} per message");
    assert!(per_message >= 11.0, "{per_message:.1} items per message");
    slave.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: a broker with 40 seats; one slave's host asks for 60 registrations at once.
/// Exactly 40 are approved and 20 rejected `aggregate_limit` (coalescing changes no
/// decision), a tap on the slave's subjects sees fewer messages than registrations (they
/// went out in `batch` requests), and 60 concurrent unregistrations free every seat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_are_coalesced_into_batches() {
    let f = Fixture::new().await.unwrap();
    let (broker, subjects, mut tap, slave) = tapped_slave(&f, 40).await;
    let asks = (0..60).map(|n| {
        let slave = slave.clone();
        async move { slave.register(&format!("a{n}"), "inbound").await.unwrap() }
    });
    let outcomes = futures::future::join_all(asks).await;
    let approved = outcomes.iter().filter(|o| o.is_approved()).count();
    assert_eq!(approved, 40, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .filter(|o| !o.is_approved())
            .all(|o| rejected(o) == Some(RejectReason::AggregateLimit))
    );
    f.wait_in_use(40).await.unwrap();
    let (mut registers, mut batches) = (0, 0);
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), tap.next()).await {
        match subjects.parse_slave_op(msg.subject.as_str()).unwrap().1 {
            SlaveOp::Register => registers += 1,
            SlaveOp::Batch => batches += 1,
            _ => {}
        }
    }
    eprintln!(
        "measured: 60 concurrent registrations went out as {registers} single requests and {batches} batches"
    );
    assert!(batches > 0 && registers + batches < 60);
    let releases = (0..60).map(|n| {
        let slave = slave.clone();
        async move { slave.unregister(&format!("a{n}")).await.unwrap() }
    });
    let released = futures::future::join_all(releases).await;
    assert_eq!(released.iter().filter(|r| **r).count(), 40);
    f.wait_in_use(0).await.unwrap();
    slave.shutdown().await;
    broker.stop().await.unwrap();
}
