//! Seats: limits, idempotent registration, unregistration, the per-slave cap, batches, and
//! a random run that never breaks a limit.

use super::*;

#[test]
fn approves_under_the_limit_and_rejects_at_the_aggregate_limit() {
    let mut h = Harness::new(true);
    assert!(matches!(h.hello("s1", None), Reply::Welcome(_)));
    assert!(matches!(h.hello("s2", None), Reply::Welcome(_)));
    for (slave, agent, t) in [
        ("s1", "a1", "inbound"),
        ("s1", "a2", "inbound"),
        ("s2", "a3", "outbound"),
        ("s2", "a4", "outbound"),
        ("s2", "a5", "inbound"),
    ] {
        assert!(approved(&h.decision(slave, agent, t)), "{agent}");
    }
    let out = h.register("s1", "a6", "outbound");
    let Some(Reply::Decision(d)) = &reply_of(&out) else {
        panic!()
    };
    assert_eq!(rejected_for(d), Some(RejectReason::AggregateLimit));
    let a = alerts(&out);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].kind, AlertKind::RegistrationRejected);
    assert_eq!(a[0].reason, Some(RejectReason::AggregateLimit));
    assert_eq!(a[0].slave.as_deref(), Some("s1"));
    assert_eq!(a[0].agent_type.as_deref(), Some("outbound"));
    assert_eq!(h.engine.total_in_use(), 5);
}

#[test]
fn per_type_limit_and_unknown_type() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    for a in ["a1", "a2", "a3"] {
        assert!(approved(&h.decision("s1", a, "inbound")));
    }
    assert_eq!(
        rejected_for(&h.decision("s1", "a4", "inbound")),
        Some(RejectReason::TypeLimit)
    );
    assert!(approved(&h.decision("s1", "a4", "outbound")));
    assert_eq!(
        rejected_for(&h.decision("s1", "a5", "supervisor")),
        Some(RejectReason::UnknownAgentType)
    );
}

#[test]
fn re_registration_is_idempotent() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    assert_eq!(
        h.decision("s1", "a1", "inbound"),
        Decision::Approved {
            already_held: false
        }
    );
    assert_eq!(
        h.decision("s1", "a1", "inbound"),
        Decision::Approved { already_held: true }
    );
    assert_eq!(h.engine.total_in_use(), 1);
    assert_eq!(
        rejected_for(&h.decision("s1", "a1", "outbound")),
        Some(RejectReason::AgentTypeMismatch)
    );
    assert_eq!(h.engine.total_in_use(), 1);
}

#[test]
fn unregister_frees_the_seat() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    for a in ["a1", "a2", "a3"] {
        assert!(approved(&h.decision("s1", a, "inbound")));
    }
    assert!(!approved(&h.decision("s1", "a4", "inbound")));
    assert_eq!(h.unregister("s1", "a1"), Reply::Ack);
    assert_eq!(
        h.unregister("s1", "a1"),
        Reply::Ack,
        "second release is a no-op"
    );
    assert!(approved(&h.decision("s1", "a4", "inbound")));
    assert_eq!(h.engine.total_in_use(), 3);
}

#[test]
fn slave_license_local_limit_is_enforced_by_the_master_too() {
    let mut h = Harness::new(false);
    assert!(matches!(
        h.hello("s1", Some(slave_license(Some(1)))),
        Reply::Welcome(_)
    ));
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert_eq!(
        rejected_for(&h.decision("s1", "a2", "inbound")),
        Some(RejectReason::LocalLimit)
    );
}

/// Steps: drive the engine with a long pseudo-random mix of hellos, registrations,
/// unregistrations, heartbeats and ticks over 4 slaves; after every event, check that the
/// counters equal the per-slave sums and stay within every limit.
#[test]
fn random_events_never_break_the_limits() {
    let mut h = Harness::new(true);
    let slaves = ["s1", "s2", "s3", "s4"];
    let types = ["inbound", "outbound", "supervisor"];
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    h.hello("s4", Some(slave_license(Some(2))));
    for _ in 0..5000 {
        let slave = slaves[next(4) as usize];
        let agent = format!("a{}", next(12));
        match next(10) {
            0 => {
                let claims = (0..next(4))
                    .map(|i| AgentClaim {
                        agent_id: format!("a{i}"),
                        agent_type: types[next(3) as usize].into(),
                    })
                    .collect();
                if next(2) == 0 {
                    h.restart(slave);
                }
                h.hello_with(slave, None, claims);
            }
            1..=5 => {
                h.register(slave, &agent, types[next(3) as usize]);
            }
            6 | 7 => {
                h.unregister(slave, &agent);
            }
            8 => {
                if h.instances.contains_key(slave) {
                    h.heartbeat(slave);
                }
            }
            _ => {
                h.advance(Duration::from_millis(next(2000)));
                h.tick();
            }
        }
        let status = h.engine.status(h.now);
        let sum: u32 = status.slaves.iter().map(|s| s.in_use).sum();
        assert_eq!(sum, status.total_in_use);
        assert!(status.total_in_use <= status.total_limit);
        for (t, limit) in &status.type_limits {
            let used: u32 = status
                .slaves
                .iter()
                .map(|s| s.in_use_by_type.get(t).copied().unwrap_or(0))
                .sum();
            assert_eq!(used, status.in_use_by_type.get(t).copied().unwrap_or(0));
            assert!(used <= *limit);
        }
        for s in &status.slaves {
            if let Some(local) = s.local_limit {
                assert!(s.in_use <= local);
            }
        }
    }
}

/// With `max_agents_per_slave`, one slave (here an unlicensed one, which has no local
/// limit) stops at the cap with `slave_limit` while another slave still gets seats.
#[test]
fn one_slave_stops_at_the_per_slave_cap() {
    let mut h = Harness::new(true);
    h.engine.cfg.max_agents_per_slave = 2;
    h.hello("s1", None);
    h.hello("s2", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "outbound")));
    let out = h.register("s1", "a3", "outbound");
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::SlaveLimit)
    );
    assert_eq!(alerts(&out).len(), 1);
    // Re-registering a held agent is not a new seat.
    assert_eq!(
        h.decision("s1", "a1", "inbound"),
        Decision::Approved { already_held: true }
    );
    assert!(approved(&h.decision("s2", "b1", "inbound")));
    h.unregister("s1", "a2");
    assert!(approved(&h.decision("s1", "a3", "outbound")));
}

/// Steps: a slave sends one batch (register a1, register a2, unregister a1, register a1
/// again with a used number); the reply holds one answer per item in order (approved,
/// approved, ack, replayed) and the changes are the items' own, in order.
#[test]
fn a_batch_is_its_items_decided_in_order() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let register = |seq: u64, agent: &str| {
        lmbus_schemas::BatchItem::Register(RegisterRequest {
            request_id: Uuid::new_v4(),
            seq,
            agent_id: agent.into(),
            agent_type: "inbound".into(),
        })
    };
    let first = h.next_seq();
    let items = vec![
        register(first, "a1"),
        register(first + 1, "a2"),
        lmbus_schemas::BatchItem::Unregister(UnregisterRequest {
            request_id: Uuid::new_v4(),
            seq: first + 2,
            agent_id: "a1".into(),
        }),
        register(first + 1, "a1"),
    ];
    let out = h.engine.handle(
        h.now,
        Event::Batch {
            slave: id("s1"),
            request: lmbus_schemas::BatchRequest { items },
        },
    );
    let Some(Reply::Batch(replies)) = reply_of(&out) else {
        panic!("{:?}", out.reply)
    };
    assert_eq!(replies.len(), 4);
    assert!(matches!(&replies[0], Reply::Decision(d) if approved(d)));
    assert!(matches!(&replies[1], Reply::Decision(d) if approved(d)));
    assert_eq!(replies[2], Reply::Ack);
    assert!(
        matches!(&replies[3], Reply::Decision(Decision::Rejected { reason, .. }) if *reason == RejectReason::Replayed),
        "{:?}",
        replies[3]
    );
    let grants: Vec<&SeatChange> = out.changes.iter().collect();
    assert!(
        matches!(grants.as_slice(), [
            SeatChange::Grant { agent_id: a, .. },
            SeatChange::Grant { agent_id: b, .. },
            SeatChange::Release { agent_id: c, .. },
        ] if a == "a1" && b == "a2" && c == "a1"),
        "{:?}",
        out.changes
    );
    assert_eq!(h.engine.total_in_use(), 1);
}
