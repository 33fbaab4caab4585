//! Heartbeat silence, reclaim under the timing rule, and the tick's counts and expiry
//! alerts.

use super::*;

#[test]
fn silent_slave_is_marked_disconnected_and_keeps_its_seats() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    h.advance(Duration::from_millis(2500));
    assert_eq!(h.heartbeat("s1"), Reply::Ack);
    h.advance(Duration::from_millis(2900));
    assert!(
        !h.tick()
            .iter()
            .any(|a| a.kind == AlertKind::SlaveDisconnected)
    );
    h.advance(Duration::from_millis(200));
    let lost: Vec<_> = h
        .tick()
        .into_iter()
        .filter(|a| a.kind == AlertKind::SlaveDisconnected)
        .collect();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].severity, Severity::Warning);
    // It says what will happen and when, for people: the reclaim 70 s after its last
    // heartbeat, 3.1 s of which have passed; "1 seat is", no milliseconds.
    assert!(
        lost[0].message.contains(
            "its 1 seat is reclaimed in 67 s (after 70 s of silence: its 60 s grace period plus the 10 s reclaim margin) unless it says hello again first"
        ),
        "{}",
        lost[0].message
    );
    assert!(!lost[0].message.contains(" ms"), "{}", lost[0].message);
    assert_eq!(h.engine.total_in_use(), 1);
    // Only alerted once.
    h.advance(Duration::from_secs(10));
    assert!(
        !h.tick()
            .iter()
            .any(|a| a.kind == AlertKind::SlaveDisconnected)
    );
    // It must say hello again; its seat is still its own.
    assert!(matches!(
        h.heartbeat("s1"),
        Reply::Refused {
            reason: RejectReason::SlaveNotConnected,
            ..
        }
    ));
    assert_eq!(
        rejected_for(&h.decision("s1", "a2", "inbound")),
        Some(RejectReason::SlaveNotConnected)
    );
    let claim = AgentClaim {
        agent_id: "a1".into(),
        agent_type: "inbound".into(),
    };
    let out = h.hello_with("s1", None, vec![claim]);
    assert!(matches!(reply_of(&out), Some(Reply::Welcome(ref w)) if w.rejected_agents.is_empty()));
    assert_eq!(h.engine.total_in_use(), 1);
}

/// A slave that keeps its agents after its grace period is never reclaimed: its alert says
/// the seats stay taken, not that they are reclaimed; one with no seats says so.
#[test]
fn the_disconnect_alert_says_what_becomes_of_the_seats() {
    let mut h = Harness::new(true);
    let hello = |instance, seq| Event::Hello {
        slave: id("keeper"),
        hello: Hello {
            instance,
            heartbeat_interval_ms: 1000,
            seq,
            grace_ms: 60_000,
            logout_after_grace: false,
            request_timeout_ms: 2000,
            ..Default::default()
        },
        today: TODAY,
    };
    let instance = Uuid::new_v4();
    h.engine.handle(h.now, hello(instance, 1));
    h.hello("empty", None);
    h.instances.insert("keeper".into(), instance);
    assert!(approved(&h.decision("keeper", "k1", "inbound")));
    h.advance(Duration::from_millis(3100));
    let lost: Vec<_> = h
        .tick()
        .into_iter()
        .filter(|a| a.kind == AlertKind::SlaveDisconnected)
        .collect();
    let of = |slave: &str| {
        lost.iter()
            .find(|a| a.slave.as_deref() == Some(slave))
            .map(|a| a.message.clone())
            .unwrap_or_default()
    };
    assert!(
        of("keeper").contains(
            "its 1 seat stays taken until it says hello again or an operator releases them"
        ),
        "{}",
        of("keeper")
    );
    assert!(
        of("empty").contains("it holds no seats and is forgotten in 59 min 57 s (after 60 min of silence, --forget-after) unless it says hello again first"),
        "{}",
        of("empty")
    );
    // Much later: still held, never reclaimed.
    h.advance(Duration::from_secs(600));
    h.tick();
    assert_eq!(h.engine.total_in_use(), 1);
}

/// A `license_counts` alert carries the most seats in use since the previous one, so a
/// burst between two alerts is not lost; the first alert of an engine carries none (its
/// window is unknown), and neither does one after a gap of more than two intervals (a
/// standby's or an earlier term's).
#[test]
fn counts_alerts_carry_the_peak_since_the_last_one() {
    let counts_alert = |alerts: Vec<Alert>| {
        alerts
            .into_iter()
            .find(|a| a.kind == AlertKind::LicenseCounts)
            .expect("a license_counts alert")
    };
    let mut h = Harness::new(true);
    h.hello("s1", None);
    assert!(counts_alert(h.tick()).peaks.is_empty());
    // A burst of three inbound seats between two alerts, gone again before the next.
    for a in ["a1", "a2", "a3"] {
        assert!(approved(&h.decision("s1", a, "inbound")));
    }
    assert!(approved(&h.decision("s1", "o1", "outbound")));
    for a in ["a1", "a2", "a3"] {
        h.unregister_out("s1", a);
    }
    h.advance(Duration::from_secs(61));
    let alert = counts_alert(h.tick());
    assert_eq!(alert.counts.get("total"), Some(&1));
    assert_eq!(
        alert.peaks,
        BTreeMap::from([
            ("inbound".to_owned(), 3),
            ("outbound".to_owned(), 1),
            ("total".to_owned(), 4)
        ])
    );
    // The next window starts at the counts of the last alert.
    h.advance(Duration::from_secs(61));
    let alert = counts_alert(h.tick());
    assert_eq!(
        alert.peaks,
        BTreeMap::from([("outbound".to_owned(), 1), ("total".to_owned(), 1)])
    );
    // After a gap (a leader that was not leading, say): no peaks claimed.
    h.advance(Duration::from_secs(600));
    assert!(counts_alert(h.tick()).peaks.is_empty());
}

#[test]
fn counts_and_expiry_alerts() {
    let mut h = Harness::new(true);
    let first = h.tick();
    assert!(first.iter().any(|a| a.kind == AlertKind::LicenseCounts));
    h.advance(Duration::from_secs(30));
    assert!(!h.tick().iter().any(|a| a.kind == AlertKind::LicenseCounts));
    h.advance(Duration::from_secs(31));
    assert!(h.tick().iter().any(|a| a.kind == AlertKind::LicenseCounts));

    let mut cfg = config(true);
    cfg.license.expires = date!(2026 - 12 - 10);
    let mut e = Engine::new(cfg);
    let now = Instant::now();
    let out = alerts(&e.handle(now, Event::Tick { today: TODAY }));
    let warn: Vec<_> = out
        .iter()
        .filter(|a| a.kind == AlertKind::LicenseExpiringSoon)
        .collect();
    assert_eq!(warn.len(), 1);
    assert!(
        warn[0].message.contains("17 days left"),
        "{}",
        warn[0].message
    );
    // Once per day.
    let again = alerts(&e.handle(now, Event::Tick { today: TODAY }));
    assert!(
        !again
            .iter()
            .any(|a| a.kind == AlertKind::LicenseExpiringSoon)
    );
}

/// Steps: a slave that logs out at the end of its 60 s grace holds two seats and goes
/// silent; at grace + margin the master still counts them, just after it reclaims them
/// (alert, counts drop); when the slave says hello again claiming them, they are granted
/// again if there is room, and refused with `reclaimed` when another slave took the room.
#[test]
fn silent_slave_seats_are_reclaimed_after_grace_plus_margin() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    h.hello("s2", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "inbound")));
    h.advance(Duration::from_secs(70)); // grace 60 s + margin 10 s
    assert!(!h.tick().iter().any(|a| a.kind == AlertKind::SeatsReclaimed));
    assert_eq!(h.engine.total_in_use(), 2);
    h.advance(Duration::from_millis(1));
    let reclaimed: Vec<_> = h
        .tick()
        .into_iter()
        .filter(|a| a.kind == AlertKind::SeatsReclaimed)
        .collect();
    assert_eq!(reclaimed.len(), 1);
    assert!(
        reclaimed[0]
            .message
            .contains("reclaimed 2 seats of slave s1")
    );
    // Durations for people, not "silent for 70001 ms".
    assert!(
        reclaimed[0]
            .message
            .contains("silent for 70 s, past its grace period plus the 10 s margin"),
        "{}",
        reclaimed[0].message
    );
    assert_eq!(h.engine.total_in_use(), 0);
    // s2 takes all 3 inbound seats meanwhile (its own hello keeps it alive).
    h.hello("s2", None);
    for a in ["b1", "b2"] {
        assert!(approved(&h.decision("s2", a, "inbound")));
    }
    let claims = ["a1", "a2"]
        .map(|a| AgentClaim {
            agent_id: a.into(),
            agent_type: "inbound".into(),
        })
        .to_vec();
    let out = h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(w)) = reply_of(&out) else {
        panic!()
    };
    assert_eq!(w.rejected_agents.len(), 1);
    assert_eq!(w.rejected_agents[0].reason, RejectReason::Reclaimed);
    assert_eq!(h.engine.total_in_use(), 3);
}

/// Steps: a slave that does not log out after its grace keeps its seats however long it
/// is silent: reclaiming them could hand out a seat it still uses.
#[test]
fn seats_of_a_slave_that_keeps_its_agents_are_never_reclaimed() {
    let mut h = Harness::new(true);
    let instance = Uuid::new_v4();
    h.engine.handle(
        h.now,
        Event::Hello {
            slave: id("s1"),
            hello: Hello {
                instance,
                license: None,
                heartbeat_interval_ms: 1000,
                agents: vec![],
                software: String::new(),
                seq: 1,
                grace_ms: 1000,
                logout_after_grace: false,
                request_timeout_ms: 2000,
                ..Default::default()
            },
            today: TODAY,
        },
    );
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    h.advance(Duration::from_secs(3600));
    assert!(!h.tick().iter().any(|a| a.kind == AlertKind::SeatsReclaimed));
    assert_eq!(h.engine.total_in_use(), 1);
}
