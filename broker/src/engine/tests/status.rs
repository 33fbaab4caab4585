//! The License Monitor status.

use super::*;

/// The status reply lists at most `STATUS_MAX_SLAVES` slaves, disconnected ones first, and
/// counts them all, so it stays within the message size limit at any number of slaves.
#[test]
fn status_lists_a_bounded_number_of_slaves_and_counts_all() {
    let mut h = Harness::new(true);
    h.engine.cfg.max_slaves = 5000;
    let n = lmbus_schemas::STATUS_MAX_SLAVES + 5;
    for i in 0..n {
        h.hello(&format!("s{i:05}"), None);
    }
    // s01000 goes silent and is marked disconnected.
    h.advance(Duration::from_secs(2));
    for i in (0..n).filter(|i| *i != 1000) {
        h.heartbeat(&format!("s{i:05}"));
    }
    h.advance(Duration::from_secs(2));
    h.engine.handle(h.now, Event::Tick { today: TODAY });
    let status = h.engine.status(h.now);
    assert_eq!(status.slaves.len(), lmbus_schemas::STATUS_MAX_SLAVES);
    assert_eq!(status.slaves_total as usize, n);
    assert_eq!(status.slaves_connected as usize, n - 1);
    assert_eq!(status.slaves[0].slave_id, "s01000");
    assert!(!status.slaves[0].connected);
    assert!(lmbus_schemas::encode(&status).unwrap().len() < lmbus_schemas::MAX_MESSAGE_BYTES);
}

/// The agent list of one slave (the monitor's Enter): its agents by id with their types;
/// nothing for an unknown slave or an id that is not one.
#[test]
fn agents_of_lists_one_slaves_agents() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    h.hello("s2", None);
    h.register("s1", "b-agent", "inbound");
    h.register("s1", "a-agent", "outbound");
    h.register("s2", "c-agent", "inbound");
    let claim = |id: &str, t: &str| lmbus_schemas::AgentClaim {
        agent_id: id.into(),
        agent_type: t.into(),
    };
    assert_eq!(
        h.engine.agents_of("s1"),
        [claim("a-agent", "outbound"), claim("b-agent", "inbound")]
    );
    assert!(h.engine.agents_of("nobody").is_empty());
    assert!(h.engine.agents_of("not a slave id!").is_empty());
}

/// `admin seats`: each seat with the wall time and replica of its grant, as recorded, so a
/// standby replaying the ledger later (on a clock of its own) lists the same.
///
/// Steps: a1 is granted at T, a2 a minute later; a standby applies the records an hour
/// later and lists the same times and replica; an unknown slave lists nothing.
#[test]
fn seats_of_lists_when_and_by_whom_each_seat_was_granted() {
    let mut h = Harness::new(true);
    let t0 = h.engine.wall_ms;
    let mut changes = h.hello_with("s1", None, vec![]).changes;
    changes.extend(h.register("s1", "a1", "inbound").changes);
    h.advance(Duration::from_secs(60));
    changes.extend(h.register("s1", "a2", "outbound").changes);
    let seats = h.engine.seats_of("s1");
    let summary: Vec<_> = seats
        .iter()
        .map(|s| (s.agent_id.as_str(), s.since_ms, s.granted_by.as_str()))
        .collect();
    assert_eq!(summary, [("a1", t0, "b1"), ("a2", t0 + 60_000, "b1")]);
    let mut standby = Engine::new(config(true));
    standby.set_wall_clock(t0 + 3_600_000);
    for change in &changes {
        standby.apply(h.now, change).unwrap();
    }
    assert_eq!(standby.seats_of("s1"), seats);
    assert!(h.engine.seats_of("nobody").is_empty());
    assert!(h.engine.seats_of("not a slave id!").is_empty());
}
