//! The guards: the registration rate limit and replay protection by request number.

use super::*;

/// Steps: with a limit of 10 registrations per second per slave, s1 sends 20 at once
/// (the burst) and the 21st is rejected `rate_limited` with one alert; more rejections
/// within 10 s raise no alert; s2 is not affected; 100 ms later s1 may register one
/// more; after 10 s the next rejection's alert counts those not reported yet.
#[test]
fn a_flooding_slave_is_rate_limited_with_few_alerts() {
    let mut h = Harness::new(true);
    h.engine.cfg.slave_rate_limit = 10;
    h.hello("s1", None);
    h.hello("s2", None);
    for _ in 0..20 {
        assert!(approved(&h.decision("s1", "a1", "inbound")));
    }
    let out = h.register("s1", "a1", "inbound");
    assert!(matches!(
        reply_of(&out),
        Some(Reply::Decision(Decision::Rejected {
            reason: RejectReason::RateLimited,
            ..
        }))
    ));
    assert_eq!(alerts(&out).len(), 1);
    assert!(out.changes.is_empty());
    for _ in 0..5 {
        let out = h.register("s1", "a1", "inbound");
        assert_eq!(
            rejected_for(&decision_of(&out)),
            Some(RejectReason::RateLimited)
        );
        assert!(alerts(&out).is_empty());
    }
    assert!(approved(&h.decision("s2", "b1", "inbound")));
    h.advance(Duration::from_millis(100));
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert_eq!(
        rejected_for(&h.decision("s1", "a1", "inbound")),
        Some(RejectReason::RateLimited)
    );
    // 6 rejections since the alert; 10 s later the bucket is full again (20), and the
    // next rejection's alert reports those 6 and itself.
    h.advance(RATE_LIMIT_ALERT_EVERY);
    for _ in 0..20 {
        assert!(approved(&h.decision("s1", "a1", "inbound")));
    }
    let out = h.register("s1", "a1", "inbound");
    let a = alerts(&out);
    assert_eq!(a.len(), 1);
    assert!(
        a[0].message.contains("7 registrations rejected"),
        "{}",
        a[0].message
    );
}

/// A captured registration replayed after its agent was released takes no seat (refused
/// `replayed`, with an alert), while a retry of a granted request gets the same answer;
/// a replayed unregister does not release a seat taken again since.
#[test]
fn a_replayed_request_cannot_retake_or_release_a_seat() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let out = h.register_numbered("s1", "a1", "inbound", 100);
    assert!(approved(&decision_of(&out)));
    // The same request again (a retry after a lost reply): same seat, nothing new.
    let again = h.register_numbered("s1", "a1", "inbound", 100);
    assert_eq!(
        decision_of(&again),
        Decision::Approved { already_held: true }
    );
    assert!(again.changes.is_empty());
    h.unregister_numbered("s1", "a1", 101);
    assert_eq!(h.engine.total_in_use(), 0);
    let replay = h.register_numbered("s1", "a1", "inbound", 100);
    assert_eq!(
        rejected_for(&decision_of(&replay)),
        Some(RejectReason::Replayed)
    );
    assert_eq!(alerts(&replay).len(), 1);
    assert!(replay.changes.is_empty());
    assert_eq!(h.engine.total_in_use(), 0);
    // Taken again under a new number; the old unregister replayed keeps it.
    assert!(approved(&decision_of(
        &h.register_numbered("s1", "a1", "inbound", 102)
    )));
    let replay = h.unregister_numbered("s1", "a1", 101);
    assert_eq!(reply_of(&replay), Some(Reply::Ack));
    // Within 10 s of the last replay alert for this slave: counted, not alerted again.
    assert_eq!(alerts(&replay).len(), 0);
    assert!(replay.changes.is_empty());
    assert_eq!(h.engine.total_in_use(), 1);
    // A number of 0 (a request without one) is never accepted.
    assert_eq!(
        rejected_for(&decision_of(&h.register_numbered("s1", "a2", "inbound", 0))),
        Some(RejectReason::Replayed)
    );
}

/// Concurrent requests arrive out of order: any unused number within the window is
/// accepted once; a number older than the window is refused.
#[test]
fn request_numbers_may_arrive_out_of_order_within_the_window() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    // Accepted = decided on its merits (the type limit of 3 may refuse it), not refused
    // as a replay.
    let accepted = |h: &mut Harness, agent: &str, seq: u64| {
        let out = h.register_numbered("s1", agent, "outbound", seq);
        rejected_for(&decision_of(&out)) != Some(RejectReason::Replayed)
    };
    let base = 5000;
    for (n, seq) in [base + 3, base + 1, base + 2].into_iter().enumerate() {
        assert!(accepted(&mut h, &format!("a{n}"), seq), "{seq}");
    }
    assert!(!accepted(&mut h, "b", base + 2));
    let far = base + 3 + super::REPLAY_WINDOW;
    assert!(accepted(&mut h, "c", far));
    // base + 3 is now exactly one window behind: too old to tell, refused.
    assert!(!accepted(&mut h, "d", base + 3));
    assert!(accepted(&mut h, "d", far - 1));
    assert!(!accepted(&mut h, "d", far - 1));
    // A new instance of the slave numbers from 1 again.
    h.restart("s1");
    h.hello("s1", None);
    assert!(accepted(&mut h, "e", 1));
}

/// A standby that replayed the ledger (or loaded a snapshot) refuses every number up to
/// the last granted one, so a request captured before a failover cannot be replayed to
/// the new leader; numbers after it are accepted.
#[test]
fn a_new_leader_refuses_numbers_its_ledger_shows_were_used() {
    let mut h = Harness::new(true);
    let mut standby = Engine::new(config(true));
    let instance = Uuid::new_v4();
    h.instances.insert("s1".into(), instance);
    let mut outs = vec![h.hello_with("s1", None, vec![])];
    outs.push(h.register_numbered("s1", "a1", "inbound", 7));
    outs.push(h.register_numbered("s1", "a2", "inbound", 9));
    outs.push(h.unregister_numbered("s1", "a2", 10));
    for out in &outs {
        for change in &out.changes {
            standby.apply(h.now, change).unwrap();
        }
    }
    let mut from_snapshot = Engine::new(config(true));
    for change in standby.snapshot(100) {
        from_snapshot.apply(h.now, &change).unwrap();
    }
    for engine in [&mut standby, &mut from_snapshot] {
        let mut register = |agent: &str, seq: u64| {
            let out = engine.handle(
                h.now,
                Event::Register {
                    slave: id("s1"),
                    request: RegisterRequest {
                        request_id: Uuid::new_v4(),
                        seq,
                        agent_id: agent.into(),
                        agent_type: "inbound".into(),
                    },
                },
            );
            decision_of(&out)
        };
        // The captured grant of a2 (9), replayed after its release: refused.
        assert_eq!(
            rejected_for(&register("a2", 9)),
            Some(RejectReason::Replayed)
        );
        // A number never granted but below the last grant: refused too (a genuine
        // slave renumbers and asks again).
        assert_eq!(
            rejected_for(&register("a3", 8)),
            Some(RejectReason::Replayed)
        );
        assert!(approved(&register("a3", 11)));
    }
}

/// Steps: a request numbered u64::MAX (or any jump past `MAX_SEQ_JUMP`) is refused as
/// replayed and does not move the window, so the slave's next ordinary numbers still work.
#[test]
fn a_huge_request_number_cannot_lock_a_slave_out() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let out = h.register_numbered("s1", "a1", "inbound", u64::MAX);
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::Replayed)
    );
    let out = h.register_numbered("s1", "a1", "inbound", 100 + MAX_SEQ_JUMP + 1);
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::Replayed)
    );
    let seq = h.next_seq();
    assert!(approved(&decision_of(
        &h.register_numbered("s1", "a1", "inbound", seq)
    )));
    let seq = h.next_seq();
    assert!(approved(&decision_of(
        &h.register_numbered("s1", "a2", "inbound", seq)
    )));
}
