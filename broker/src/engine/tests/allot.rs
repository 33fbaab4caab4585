//! Allotment mode: blocks are counted against the limits, journals apply once, only the
//! slave shrinks its block, and a hello or a reclaim empties it.

use lmbus_schemas::{Admission, AllotOp, AllotOpKind, AllotRequest, Allotment, ControlMessage};

use super::*;

/// A harness whose master runs in allotment mode, with per-slave journal numbers.
struct Allot {
    h: Harness,
    journal: BTreeMap<String, u64>,
}

impl Allot {
    fn new() -> Self {
        let mut h = Harness::new(true);
        h.engine.cfg.allot.admission = Admission::Allotment;
        Allot {
            h,
            journal: BTreeMap::new(),
        }
    }

    fn op(&mut self, slave: &str, kind: AllotOpKind, agent: &str, agent_type: &str) -> AllotOp {
        let n = self.journal.entry(slave.into()).or_insert(0);
        *n += 1;
        AllotOp {
            n: *n,
            kind,
            agent_id: agent.into(),
            agent_type: agent_type.into(),
        }
    }

    fn ask(&mut self, slave: &str, ops: Vec<AllotOp>, want: &[(&str, u32)]) -> Output {
        let seq = self.h.next_seq();
        self.ask_numbered(slave, seq, ops, want)
    }

    fn ask_numbered(
        &mut self,
        slave: &str,
        seq: u64,
        ops: Vec<AllotOp>,
        want: &[(&str, u32)],
    ) -> Output {
        let instance = self.h.instances[slave];
        self.h.engine.handle(
            self.h.now,
            Event::Allot {
                slave: id(slave),
                request: AllotRequest {
                    instance,
                    seq,
                    ops,
                    want: want.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect(),
                },
            },
        )
    }

    /// A master of 20 seats, all of them inbound, with `slaves` connected.
    fn twenty_inbound(slaves: &[&str]) -> Self {
        let mut a = Allot::new();
        let limits = &mut a.h.engine.cfg.license.limits;
        limits.total = Some(20);
        limits.agent_types.insert("inbound".into(), 20);
        for s in slaves {
            a.h.hello(s, None);
        }
        a
    }

    /// `slave` asks for a free block of `want` inbound seats: the inbound block it gets.
    fn inbound_block(&mut self, slave: &str, want: u32) -> u32 {
        let out = self.ask(slave, vec![], &[("inbound", want)]);
        Self::answer(&out)
            .blocks
            .get("inbound")
            .copied()
            .unwrap_or(0)
    }

    fn answer(out: &Output) -> Allotment {
        match reply_of(out) {
            Some(Reply::Allotment(a)) => a,
            other => panic!("expected an allotment, got {other:?}"),
        }
    }

    /// Seats held plus allotted, per the status, within every limit.
    fn assert_within_limits(&mut self) {
        // The running sums of demand are what a count from scratch gives.
        let running = (self.h.engine.demand.clone(), self.h.engine.holders.clone());
        self.h.engine.recount_demand();
        assert_eq!(
            running,
            (self.h.engine.demand.clone(), self.h.engine.holders.clone())
        );
        let s = self.h.engine.status(self.h.now);
        assert!(s.total_in_use + s.allotted_total <= s.total_limit, "{s:?}");
        for (t, limit) in &s.type_limits {
            let n = s.in_use_by_type.get(t).copied().unwrap_or(0)
                + s.allotted_by_type.get(t).copied().unwrap_or(0);
            assert!(n <= *limit, "{t}: {n} > {limit}");
        }
    }
}

#[test]
fn a_strict_master_refuses_allot_requests() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let instance = h.instances["s1"];
    let out = h.engine.handle(
        h.now,
        Event::Allot {
            slave: id("s1"),
            request: AllotRequest {
                instance,
                seq: 1,
                ops: vec![],
                want: [("inbound".to_owned(), 2)].into(),
            },
        },
    );
    assert!(
        matches!(reply_of(&out), Some(Reply::Error(e)) if e.message.contains("--admission strict"))
    );
    assert!(out.changes.is_empty());
}

/// The license: 5 seats, 3 inbound and 3 outbound.
#[test]
fn a_block_counts_against_the_limits_like_held_seats() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    let out = a.ask("s1", vec![], &[("inbound", 2)]);
    assert_eq!(
        Allot::answer(&out).blocks,
        BTreeMap::from([("inbound".into(), 2)])
    );
    assert!(matches!(
        out.changes.as_slice(),
        [SeatChange::Allotment { blocks, .. }] if blocks["inbound"] == 2
    ));
    // One inbound seat is left for everybody else; the second is refused.
    assert!(approved(&a.h.decision("s2", "x1", "inbound")));
    let refused = a.h.decision("s2", "x2", "inbound");
    assert_eq!(rejected_for(&refused), Some(RejectReason::TypeLimit));
    assert!(format!("{refused:?}").contains("2 of them allotted"));
    a.assert_within_limits();
    let status = a.h.engine.status(a.h.now);
    assert_eq!(status.allotted_total, 2);
    assert_eq!(status.admission, Admission::Allotment);
}

#[test]
fn journal_entries_apply_once_and_a_release_goes_back_to_the_block() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 2)]));
    let admit = a.op("s1", AllotOpKind::Admit, "a1", "inbound");
    let out = a.ask("s1", vec![admit.clone()], &[("inbound", 1)]);
    let answer = Allot::answer(&out);
    assert_eq!(answer.blocks["inbound"], 1);
    assert_eq!(answer.journal, 1);
    assert!(matches!(out.changes[0], SeatChange::FromBlock { .. }));
    assert_eq!(a.h.engine.total_in_use(), 1);
    // Sent again (the answer was lost): nothing moves twice.
    let out = a.ask("s1", vec![admit], &[("inbound", 1)]);
    assert_eq!(Allot::answer(&out).blocks["inbound"], 1);
    assert!(out.changes.is_empty(), "{:?}", out.changes);
    assert_eq!(a.h.engine.total_in_use(), 1);
    // The release puts the seat back in the block; the slave then keeps 2.
    let release = a.op("s1", AllotOpKind::Release, "a1", "inbound");
    let out = a.ask("s1", vec![release], &[("inbound", 2)]);
    assert_eq!(Allot::answer(&out).blocks["inbound"], 2);
    assert_eq!(a.h.engine.total_in_use(), 0);
    // Wanting none gives everything back to the pool.
    let out = a.ask("s1", vec![], &[]);
    assert!(Allot::answer(&out).blocks.is_empty());
    assert_eq!(a.h.engine.allotted_total(), 0);
    a.assert_within_limits();
}

#[test]
fn an_admission_without_a_block_is_refused_and_alerted() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    let admit = a.op("s1", AllotOpKind::Admit, "a1", "inbound");
    let out = a.ask("s1", vec![admit], &[]);
    let answer = Allot::answer(&out);
    assert_eq!(answer.refused.len(), 1);
    assert_eq!(answer.refused[0].reason, RejectReason::NoAllotment);
    assert_eq!(a.h.engine.total_in_use(), 0);
    let alert = &alerts(&out)[0];
    assert!(alert.message.contains("logged out"), "{}", alert.message);
    // An unknown type is refused as such, even with blocks of other types.
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 1)]));
    let admit = a.op("s1", AllotOpKind::Admit, "a2", "not-in-license");
    let answer = Allot::answer(&a.ask("s1", vec![admit], &[("inbound", 1)]));
    assert_eq!(answer.refused[0].reason, RejectReason::UnknownAgentType);
}

#[test]
fn a_replayed_or_delayed_request_cannot_roll_a_block_back() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    Allot::answer(&a.ask_numbered("s1", 10, vec![], &[("inbound", 3)]));
    let out = a.ask_numbered("s1", 10, vec![], &[]);
    assert!(matches!(
        reply_of(&out),
        Some(Reply::Refused {
            reason: RejectReason::Replayed,
            ..
        })
    ));
    assert_eq!(a.h.engine.allotted_total(), 3);
    let out = a.ask_numbered("s1", 9, vec![], &[]);
    assert!(matches!(reply_of(&out), Some(Reply::Refused { .. })));
    assert_eq!(a.h.engine.allotted_total(), 3);
}

#[test]
fn near_exhaustion_blocks_stop_growing_and_holders_are_asked_to_give_back() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    // s1 takes 3 of the 5 seats (all inbound).
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 3)]));
    assert_eq!(a.h.engine.allotted_total(), 3);
    // 3 outbound seats are not held, for two allotting slaves: below the floor (2 per
    // slave). No growth, and s1 is told to give its block back.
    let out = a.ask("s2", vec![], &[("outbound", 2)]);
    let answer = Allot::answer(&out);
    assert!(answer.exhausted);
    assert!(answer.blocks.is_empty());
    assert!(out.effects.iter().any(|e| matches!(
        e,
        Effect::Control { slave, message: ControlMessage::ReturnAllotment } if slave.as_str() == "s1"
    )));
    // Told once until it answers.
    let out = a.ask("s2", vec![], &[("outbound", 2)]);
    assert!(
        !out.effects
            .iter()
            .any(|e| matches!(e, Effect::Control { .. }))
    );
    // s2 registers strictly and gets the last two seats, first come first served.
    assert!(approved(&a.h.decision("s2", "b1", "outbound")));
    assert!(approved(&a.h.decision("s2", "b2", "outbound")));
    assert_eq!(
        rejected_for(&a.h.decision("s2", "b3", "outbound")),
        Some(RejectReason::AggregateLimit)
    );
    // s1 gives back: the freed seats are there for s2 at once.
    Allot::answer(&a.ask("s1", vec![], &[]));
    assert!(approved(&a.h.decision("s2", "b3", "outbound")));
    a.assert_within_limits();
}

#[test]
fn a_hello_empties_the_blocks_and_grants_what_the_slave_admitted() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 3)]));
    // The slave admitted a1 and a2 locally and says hello before it reported them.
    let claims = vec![
        AgentClaim {
            agent_id: "a1".into(),
            agent_type: "inbound".into(),
        },
        AgentClaim {
            agent_id: "a2".into(),
            agent_type: "inbound".into(),
        },
    ];
    let out = a.h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(w)) = reply_of(&out) else {
        panic!("{out:?}")
    };
    assert!(w.rejected_agents.is_empty());
    assert_eq!(w.admission, Admission::Allotment);
    assert_eq!(a.h.engine.allotted_total(), 0);
    assert_eq!(a.h.engine.total_in_use(), 2);
    // The block is emptied before the grants, in the ledger too.
    let kinds: Vec<&str> = out
        .changes
        .iter()
        .map(|c| match c {
            SeatChange::Session { .. } => "session",
            SeatChange::Allotment { .. } => "allotment",
            SeatChange::Grant { .. } => "grant",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["session", "allotment", "grant", "grant"]);
    a.assert_within_limits();
}

#[test]
fn a_silent_slave_keeps_its_block_until_the_timing_rule_reclaims_it() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    let answer = Allot::answer(&a.ask("s1", vec![], &[("inbound", 3)]));
    // The lease is capped by the slave's grace period (60 s here).
    assert_eq!(answer.lease_ms, 30_000);
    // Grace 60 s + margin 10 s: at 65 s the block is still counted.
    a.h.advance(Duration::from_secs(65));
    a.h.tick();
    assert_eq!(a.h.engine.allotted_total(), 3);
    a.h.advance(Duration::from_secs(6));
    let alerts = a.h.tick();
    assert_eq!(a.h.engine.allotted_total(), 0);
    assert!(
        alerts
            .iter()
            .any(|al| al.message.contains("3 free allotted seats")),
        "{alerts:?}"
    );
    // Its next request finds no session.
    let out = a.ask("s1", vec![], &[("inbound", 3)]);
    assert!(matches!(
        reply_of(&out),
        Some(Reply::Refused {
            reason: RejectReason::SlaveNotConnected,
            ..
        })
    ));
}

#[test]
fn the_local_limit_caps_blocks_and_held_seats_together() {
    let mut a = Allot::new();
    a.h.hello("s3", Some(slave_license(Some(2))));
    assert!(approved(&a.h.decision("s3", "x1", "inbound")));
    let answer = Allot::answer(&a.ask("s3", vec![], &[("inbound", 3)]));
    assert_eq!(answer.blocks["inbound"], 1);
    assert_eq!(
        rejected_for(&a.h.decision("s3", "x2", "outbound")),
        Some(RejectReason::LocalLimit)
    );
}

#[test]
fn a_storm_of_rejections_is_told_per_slave_and_reason_with_the_exact_count() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    for i in 0..5 {
        assert!(approved(&a.h.decision(
            "s1",
            &format!("x{i}"),
            if i < 3 { "inbound" } else { "outbound" }
        )));
    }
    let mut told = 0;
    for i in 0..37 {
        let out = a.h.register("s1", &format!("y{i}"), "outbound");
        assert_eq!(
            rejected_for(&decision_of(&out)),
            Some(RejectReason::AggregateLimit)
        );
        told += alerts(&out).len();
    }
    assert_eq!(told, 1, "the first one is told at once, the rest counted");
    // Within the quiet time nothing more; after it, the tick tells the other 36.
    a.h.advance(Duration::from_secs(5));
    assert!(
        a.h.tick()
            .iter()
            .all(|al| al.kind != AlertKind::RegistrationRejected)
    );
    a.h.advance(Duration::from_secs(6));
    let summaries: Vec<Alert> =
        a.h.tick()
            .into_iter()
            .filter(|al| al.kind == AlertKind::RegistrationRejected)
            .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert!(
        summaries[0].message.starts_with("36 refusals of slave s1"),
        "{}",
        summaries[0].message
    );
    assert_eq!(summaries[0].reason, Some(RejectReason::AggregateLimit));
    // Told once: the next tick says nothing.
    a.h.advance(Duration::from_secs(11));
    assert!(
        a.h.tick()
            .iter()
            .all(|al| al.kind != AlertKind::RegistrationRejected)
    );
}

#[test]
fn when_demand_exceeds_what_is_free_holders_above_a_fair_share_are_told_to_shrink() {
    let mut a = Allot::new();
    a.h.engine.cfg.license.limits.total = Some(20);
    a.h.engine
        .cfg
        .license
        .limits
        .agent_types
        .insert("inbound".into(), 20);
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    // s1 takes 14 of 20 while it is the only slave asking.
    assert_eq!(a.inbound_block("s1", 14), 14);
    // s2 wants 16: 6 are free, it gets them (its fair share is 10), and s1, whose 14 free
    // seats are above the fair share (water-filling 20 unheld seats over demands of 14 and
    // 16: 10 each), is told to keep 10.
    let out = a.ask("s2", vec![], &[("inbound", 16)]);
    let answer = Allot::answer(&out);
    assert!(!answer.exhausted);
    assert!(answer.blocks["inbound"] < 16);
    let told: Vec<_> = out
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Control {
                slave,
                message: ControlMessage::ShrinkAllotment { blocks },
            } => Some((slave.to_string(), blocks.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(told.len(), 1, "{:?}", out.effects);
    assert_eq!(told[0].0, "s1");
    assert_eq!(
        told[0].1["inbound"], 10,
        "fair share: 20 unheld seats over demands of 14 and 16"
    );
    // The held seats are never part of it: a slave holding 8 of its seats keeps them.
    a.assert_within_limits();
}

/// Fair shares follow demand (max-min, water-filling): 20 seats, s1 asks for 2, s2 for 14
/// (both fit), then s3 for 14. The fair level is 9 (s1 keeps its 2, the other 18 are split
/// evenly), so s3 grows only to what is free (4) and s2 is told to keep 9, not the even
/// split's 6; s1 is not told. Once s2 has given back, s3's next ask brings it to 9: 2, 9
/// and 9, every seat allotted.
#[test]
fn fair_shares_follow_demand() {
    let mut a = Allot::twenty_inbound(&["s1", "s2", "s3"]);
    assert_eq!(a.inbound_block("s1", 2), 2);
    assert_eq!(a.inbound_block("s2", 14), 14);
    let out = a.ask("s3", vec![], &[("inbound", 14)]);
    assert_eq!(Allot::answer(&out).blocks["inbound"], 4);
    assert_eq!(controls(&out), shrink_inbound("s2", 9));
    a.assert_within_limits();
    assert_eq!(a.inbound_block("s2", 9), 9);
    assert_eq!(a.inbound_block("s3", 14), 9);
    assert_eq!(a.h.engine.allotted_total(), 20);
    a.assert_within_limits();
}

/// A slave asking for billions of seats (its own credentials, a field it controls) gets
/// no more than a fair share, and its recorded demand is capped at what it could hold, so
/// the others' shares and the cost of sizing stay what honest demands give.
#[test]
fn a_greedy_want_is_capped_and_takes_no_more_than_a_fair_share() {
    let mut a = Allot::twenty_inbound(&["greedy", "s2", "s3"]);
    let got = Allot::answer(&a.ask("greedy", vec![], &[("inbound", u32::MAX)]));
    assert_eq!(
        got.blocks["inbound"], 20,
        "alone, it may take the free pool"
    );
    let book = a.h.engine.demand.of(Some("inbound")).cloned().unwrap();
    assert_eq!(
        book.level(20),
        u32::MAX,
        "its demand is capped at the pool: {book:?}"
    );
    // Two honest slaves ask for 6 each: the greedy one is told to keep its fair share.
    let out = a.ask("s2", vec![], &[("inbound", 6)]);
    assert_eq!(Allot::answer(&out).blocks.get("inbound"), None);
    assert_eq!(controls(&out), shrink_inbound("greedy", 14));
    // It keeps asking for billions, ignoring the request: its block does not grow (only
    // a slave shrinks its own block, so the seats it holds stay counted), and nobody's
    // share is smaller for it.
    let got = Allot::answer(&a.ask("greedy", vec![], &[("inbound", u32::MAX)]));
    assert_eq!(got.blocks["inbound"], 20);
    // It complies (the slave caps what it asks for at what it was told).
    assert_eq!(a.inbound_block("greedy", 14), 14);
    assert_eq!(a.inbound_block("s2", 6), 6);
    // s3 finds nothing free: the greedy one is over the fair level of 20 seats among
    // demands of 14, 6 and 6, which is 8.
    let out = a.ask("s3", vec![], &[("inbound", 6)]);
    assert_eq!(Allot::answer(&out).blocks.get("inbound"), None);
    assert_eq!(controls(&out), shrink_inbound("greedy", 8));
    assert_eq!(a.inbound_block("greedy", 8), 8);
    assert_eq!(a.inbound_block("s3", 6), 6);
    assert_eq!(a.h.engine.allotted_total(), 20);
    a.assert_within_limits();
}

/// A slave cut off asks for nothing more: once it is marked disconnected its demand is the
/// block it still holds (counted until it is reclaimed), not what it last asked for, which
/// would keep the others' shares low for a slave that is gone.
#[test]
fn a_silent_slave_demands_only_the_block_it_holds() {
    let mut a = Allot::twenty_inbound(&["s1", "s2"]);
    assert_eq!(a.inbound_block("s2", 16), 16);
    assert_eq!(a.inbound_block("s1", 20), 4);
    let level = |a: &Allot| a.h.engine.demand.of(Some("inbound")).unwrap().level(20);
    assert_eq!(level(&a), 10, "demands of 16 and 20 for 20 seats");
    // s1 goes silent; s2 keeps beating.
    let mut waited = 0;
    while a.h.engine.slave_counts().0 == 2 {
        assert!(waited < 60, "s1 was never marked disconnected");
        a.h.advance(Duration::from_secs(1));
        a.h.heartbeat("s2");
        a.h.tick();
        waited += 1;
    }
    assert_eq!(
        a.h.engine.allotted_total(),
        20,
        "s1's block is still counted"
    );
    assert_eq!(level(&a), u32::MAX, "demands of 16 and 4: both fit");
    a.assert_within_limits();
}

/// The retry hint of a refusal (`None`: final).
fn retry_of(out: &Output) -> Option<u64> {
    match decision_of(out) {
        Decision::Rejected { retry_after_ms, .. } => retry_after_ms,
        Decision::Approved { .. } => panic!("approved: {out:?}"),
    }
}

/// One `ShrinkAllotment` to `slave`: keep no more than `seats` inbound.
fn shrink_inbound(slave: &str, seats: u32) -> Vec<(String, ControlMessage)> {
    vec![(
        slave.to_owned(),
        ControlMessage::ShrinkAllotment {
            blocks: BTreeMap::from([("inbound".into(), seats)]),
        },
    )]
}

/// The control messages an output sends, by slave.
fn controls(out: &Output) -> Vec<(String, ControlMessage)> {
    out.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Control { slave, message } => Some((slave.to_string(), message.clone())),
            Effect::Alert(_) => None,
        })
        .collect()
}

/// The flake this fixes (tests/allotment.rs, phase 1): the total (20) is below the sum of
/// the type limits (12 + 16), and blocks of one type hold every free seat, so a strict
/// registration of the other type found none. Now it waits: the holders (the requester
/// too, for its own block of the other type) are told to give half of their blocks back,
/// the answer says when to ask again, nothing is alerted or recorded, and once a holder
/// has answered the registration is approved.
#[test]
fn a_strict_registration_waits_for_seats_free_in_other_blocks_and_gets_one() {
    let mut a = Allot::new();
    let limits = &mut a.h.engine.cfg.license.limits;
    limits.total = Some(20);
    limits.agent_types = BTreeMap::from([("inbound".into(), 12), ("outbound".into(), 16)]);
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    // 4 held by s1; the other 16 sit in blocks: 8 inbound at s1, 8 outbound at s2.
    for n in 0..4 {
        assert!(approved(&a.h.decision("s1", &format!("h{n}"), "outbound")));
    }
    a.ask("s1", vec![], &[("inbound", 8)]);
    // The demands (8 and 8) fit in the 16 seats not held: s2 gets its 8 in one answer, and
    // asking again changes nothing.
    for _ in 0..3 {
        a.ask("s2", vec![], &[("outbound", 8)]);
    }
    assert_eq!(a.h.engine.allotted_total(), 16);
    a.assert_within_limits();

    // s1 wants an outbound seat its block cannot give: the total is used up.
    let out = a.h.register("s1", "x1", "outbound");
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::AggregateLimit)
    );
    let retry = retry_of(&out).expect("a wait, not a final refusal");
    assert!((20..=250).contains(&retry), "{retry}");
    assert!(alerts(&out).is_empty(), "{:?}", alerts(&out));
    assert!(out.changes.is_empty());
    let told = controls(&out);
    assert_eq!(
        told,
        vec![
            (
                "s1".to_owned(),
                ControlMessage::ShrinkAllotment {
                    blocks: BTreeMap::from([("inbound".into(), 4)])
                }
            ),
            (
                "s2".to_owned(),
                ControlMessage::ShrinkAllotment {
                    blocks: BTreeMap::from([("outbound".into(), 4)])
                }
            ),
        ]
    );
    // Asked again before anyone answered: still a wait, nobody told twice.
    a.h.advance(Duration::from_millis(retry));
    let out = a.h.register("s1", "x1", "outbound");
    assert!(retry_of(&out).is_some());
    assert!(controls(&out).is_empty());
    // s2 answers (keeps 4): the seats it gave back are free, s1's next ask gets one.
    a.ask("s2", vec![], &[("outbound", 4)]);
    assert!(approved(&a.h.decision("s1", "x1", "outbound")));
    a.assert_within_limits();
    // Counted for the metrics: 2 answers grew a block (none partial), the two waits, s2's
    // return of 4 seats.
    let c = a.h.engine.allot_counts();
    assert_eq!(
        (c.grants, c.seats_granted, c.partial_grants),
        (2, 16, 0),
        "{c:?}"
    );
    assert_eq!((c.waits, c.returns, c.seats_returned), (2, 1, 4), "{c:?}");
    assert_eq!(c.stranded_refusals, 0);
}

/// A holder told to give back that stays silent past the return wait (2 refresh
/// intervals: frozen, cut off) no longer makes a registration wait: the refusal is final
/// and alerted, and its block stays counted until the reclaim timing rule.
#[test]
fn a_holder_that_does_not_answer_makes_the_refusal_final_after_the_return_wait() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    // s1 takes the 3 inbound seats into its block; s2 takes allotments too.
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 3)]));
    Allot::answer(&a.ask("s2", vec![], &[]));
    let out = a.h.register("s2", "b1", "inbound");
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::TypeLimit)
    );
    assert!(retry_of(&out).is_some());
    assert_eq!(controls(&out).len(), 1, "{:?}", out.effects);
    let wait = a.h.engine.return_wait();
    a.h.advance(wait - Duration::from_millis(1));
    assert!(retry_of(&a.h.register("s2", "b1", "inbound")).is_some());
    a.h.advance(Duration::from_millis(2));
    let out = a.h.register("s2", "b1", "inbound");
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::TypeLimit)
    );
    assert_eq!(retry_of(&out), None, "s1 never answered: final");
    assert_eq!(alerts(&out).len(), 1);
    assert!(controls(&out).is_empty());
    assert_eq!(a.h.engine.allotted_total(), 3);
    assert_eq!(a.h.engine.allot_counts().stranded_refusals, 1);
}

/// Near exhaustion (fewer unheld seats than 2 per allotting slave), a strict
/// registration refused while another slave holds a free block tells it to give the whole
/// block back; without any block anywhere the refusal is final at once; strict mode never
/// waits.
#[test]
fn near_exhaustion_a_waiting_registration_asks_for_whole_blocks_and_strict_mode_never_waits() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 2)]));
    // s2 takes allotments too (two slaves share the pool), but asks for no block.
    Allot::answer(&a.ask("s2", vec![], &[]));
    for n in 1..=3 {
        assert!(approved(&a.h.decision("s2", &format!("h{n}"), "outbound")));
    }
    // 5 seats: 3 held by s2, 2 in s1's block; s2 asks for one more.
    let out = a.h.register("s2", "h4", "inbound");
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::AggregateLimit)
    );
    assert!(retry_of(&out).is_some());
    assert_eq!(
        controls(&out),
        vec![("s1".to_owned(), ControlMessage::ReturnAllotment)]
    );
    Allot::answer(&a.ask("s1", vec![], &[]));
    assert!(approved(&a.h.decision("s2", "h4", "inbound")));
    assert!(approved(&a.h.decision("s2", "h5", "inbound")));
    // Nothing free anywhere: final at once.
    let out = a.h.register("s1", "x", "inbound");
    assert_eq!(retry_of(&out), None);
    assert_eq!(alerts(&out).len(), 1);

    let mut h = Harness::new(true);
    h.hello("s1", None);
    for n in 0..5 {
        let t = if n < 3 { "inbound" } else { "outbound" };
        assert!(approved(&h.decision("s1", &format!("a{n}"), t)));
    }
    assert_eq!(retry_of(&h.register("s1", "a9", "outbound")), None);
}

/// Property test: with four connected slaves that take blocks, give seats back when told
/// and register strictly, a registration refused for capacity either waits (seats of
/// blocks are being given back) or is final only when no slave holds a free block seat
/// counted against the limit that refused it; retried while the told slaves obey, it is
/// decided within a few rounds; and held plus allotted seats never pass a limit.
mod properties {
    use super::*;
    use proptest::prelude::*;

    const TYPES: [&str; 2] = ["inbound", "outbound"];

    #[derive(Debug, Clone)]
    enum Op {
        /// Registered strictly, asked again while the answer says to wait, the slaves
        /// told to give back obeying between two asks.
        Register {
            slave: usize,
            agent: usize,
            kind: usize,
        },
        Unregister {
            slave: usize,
            agent: usize,
        },
        /// An allot request with no journal, wanting these blocks.
        Allot {
            slave: usize,
            want: Vec<(usize, u32)>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..4usize, 0..6usize, 0..2usize)
                .prop_map(|(slave, agent, kind)| Op::Register { slave, agent, kind }),
            2 => (0..4usize, 0..6usize).prop_map(|(slave, agent)| Op::Unregister { slave, agent }),
            3 => (0..4usize, prop::collection::vec((0..2usize, 0..6u32), 0..3))
                .prop_map(|(slave, want)| Op::Allot { slave, want }),
        ]
    }

    /// Block seats of connected slaves counted against the limit `reason` names.
    fn counted_blocks(a: &Allot, reason: RejectReason, agent_type: &str) -> u32 {
        a.h.engine
            .slaves
            .values()
            .filter(|s| s.connected)
            .flat_map(|s| s.blocks.iter())
            .filter(|(t, _)| reason == RejectReason::AggregateLimit || *t == agent_type)
            .map(|(_, n)| *n)
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The master allows 5 seats, 3 inbound and 3 outbound.
        #[test]
        fn a_capacity_refusal_waits_exactly_while_block_seats_are_given_back(
            ops in prop::collection::vec(op(), 1..80)
        ) {
            let mut a = Allot::new();
            for s in 0..4 {
                a.h.hello(&format!("s{s}"), None);
                // Each takes allotments (a build that knows the retry hint).
                a.ask(&format!("s{s}"), vec![], &[]);
            }
            let mut told: BTreeMap<String, ControlMessage> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Register { slave, agent, kind } => {
                        let (name, agent, t) = (format!("s{slave}"), format!("a{agent}"), TYPES[kind]);
                        let mut rounds = 0;
                        loop {
                            rounds += 1;
                            prop_assert!(rounds <= 12, "{name} {agent} still waits after 12 rounds");
                            let out = a.h.register(&name, &agent, t);
                            for (slave, message) in controls(&out) {
                                told.insert(slave, message);
                            }
                            a.assert_within_limits();
                            match decision_of(&out) {
                                Decision::Approved { .. } => break,
                                Decision::Rejected { reason, retry_after_ms: None, .. } => {
                                    if matches!(reason, RejectReason::AggregateLimit | RejectReason::TypeLimit) {
                                        prop_assert_eq!(counted_blocks(&a, reason, t), 0, "final {:?} with block seats left", reason);
                                    }
                                    break;
                                }
                                Decision::Rejected { reason, retry_after_ms: Some(_), .. } => {
                                    prop_assert!(counted_blocks(&a, reason, t) > 0);
                                    prop_assert!(out.changes.is_empty() && alerts(&out).is_empty());
                                    // The told slaves give back (no time passes).
                                    for (slave, message) in std::mem::take(&mut told) {
                                        let want: Vec<(String, u32)> = match message {
                                            ControlMessage::ShrinkAllotment { blocks } => blocks.into_iter().collect(),
                                            _ => Vec::new(),
                                        };
                                        let want: Vec<(&str, u32)> = want.iter().map(|(t, n)| (t.as_str(), *n)).collect();
                                        let out = a.ask(&slave, vec![], &want);
                                        prop_assert!(matches!(reply_of(&out), Some(Reply::Allotment(_))));
                                        a.assert_within_limits();
                                    }
                                }
                            }
                        }
                    }
                    Op::Unregister { slave, agent } => {
                        a.h.unregister(&format!("s{slave}"), &format!("a{agent}"));
                    }
                    Op::Allot { slave, want } => {
                        let want: Vec<(&str, u32)> = want.into_iter().map(|(t, n)| (TYPES[t], n)).collect();
                        let out = a.ask(&format!("s{slave}"), vec![], &want);
                        for (slave, message) in controls(&out) {
                            told.insert(slave, message);
                        }
                        a.assert_within_limits();
                    }
                }
            }
        }
    }
}

/// Fair shares count the total too: a slave wants outbound seats the total no longer has
/// because another slave's blocks (mostly inbound) hold it; that slave, over its fair share
/// of the total (the seats not held / the allotting slaves), is told to keep each of its
/// blocks in proportion, not only blocks of the type asked for.
#[test]
fn when_the_total_runs_short_a_holder_of_other_types_is_told_to_shrink_in_proportion() {
    let mut a = Allot::new();
    let limits = &mut a.h.engine.cfg.license.limits;
    limits.total = Some(20);
    limits.agent_types = BTreeMap::from([("inbound".into(), 12), ("outbound".into(), 16)]);
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    let answer = Allot::answer(&a.ask("s1", vec![], &[("inbound", 10), ("outbound", 2)]));
    assert_eq!(answer.blocks.values().sum::<u32>(), 12, "{answer:?}");
    // s2 wants 10 outbound: 8 seats are free in total (14 of the type), and the demands (12
    // and 10) exceed the 20 not held: s2 gets the 8 free (under its fair share of 10).
    let out = a.ask("s2", vec![], &[("outbound", 10)]);
    assert_eq!(Allot::answer(&out).blocks["outbound"], 8);
    // s1 holds 12 free seats, over its fair share of the total (water-filling 20 among
    // demands of 12 and 10: 10 each): it keeps 10 in proportion (inbound 10 * 10 / 12 = 8,
    // outbound 2 * 10 / 12 = 1).
    assert_eq!(
        controls(&out),
        vec![(
            "s1".to_owned(),
            ControlMessage::ShrinkAllotment {
                blocks: BTreeMap::from([("inbound".into(), 8), ("outbound".into(), 1)])
            }
        )]
    );
    a.assert_within_limits();
}

/// A slave that takes no allotments (an older build, served strictly) does not know the
/// retry hint: its refusal is final and alerted as in strict mode, while the holders of
/// free block seats are told to give back all the same, so its next ask finds them.
#[test]
fn a_slave_that_takes_no_allotments_gets_a_final_refusal_and_the_holders_are_told() {
    let mut a = Allot::new();
    a.h.hello("s1", None);
    a.h.hello("old", None);
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 3)]));
    let out = a.h.register("old", "b1", "inbound");
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::TypeLimit)
    );
    assert_eq!(retry_of(&out), None);
    assert_eq!(alerts(&out).len(), 1);
    assert_eq!(controls(&out).len(), 1, "{:?}", out.effects);
    assert_eq!(a.h.engine.allot_counts().waits, 0);
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 1)]));
    assert!(approved(&a.h.decision("old", "b1", "inbound")));
}

/// The start of the capacity-move test: s1 holds all 3 inbound seats in its block, s2
/// takes allotments and registers an inbound agent: no seat is free, s1 is told to give
/// half back, and s2's clock starts.
fn s2_waits_for_s1s_block(a: &mut Allot) {
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 3)]));
    Allot::answer(&a.ask("s2", vec![], &[]));
    let out = a.h.register("s2", "b1", "inbound");
    assert!(retry_of(&out).is_some(), "{out:?}");
    assert_eq!(controls(&out).len(), 1, "{:?}", out.effects);
    assert_eq!(a.h.engine.moves_running(), 1);
}

/// Steps: s2 waits for seats of s1's block (the tell starts its clock); 300 ms later s1
/// answers, and a grant to another slave or one s2 already held stops nothing; s2's
/// registration is approved: one observation of exactly 300 ms, taken once. A second
/// round through an allot request (fair shares) is timed from the tell to the answer that
/// grows s2's block. A grant with no tell before it is not timed.
#[test]
fn a_capacity_move_is_timed_from_the_tell_to_the_grant_to_the_slave_that_asked() {
    let mut a = Allot::new();
    s2_waits_for_s1s_block(&mut a);
    // Asking again tells nobody: the clock keeps its start.
    a.h.advance(Duration::from_millis(100));
    assert!(retry_of(&a.h.register("s2", "b1", "inbound")).is_some());
    a.h.advance(Duration::from_millis(200));
    // s1 gives back all but one; an outbound seat of s1's stops nothing of s2's.
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 1)]));
    assert!(approved(&a.h.decision("s1", "o1", "outbound")));
    assert!(a.h.engine.take_capacity_moves().is_empty());
    assert!(approved(&a.h.decision("s2", "b1", "inbound")));
    assert_eq!(
        a.h.engine.take_capacity_moves(),
        vec![Duration::from_millis(300)]
    );
    assert!(a.h.engine.take_capacity_moves().is_empty(), "taken once");
    assert_eq!(a.h.engine.moves_running(), 0);
    // A second grant without a tell is not a move.
    assert!(approved(&a.h.decision("s2", "b2", "inbound")));
    assert!(a.h.engine.take_capacity_moves().is_empty());
    assert_eq!(a.h.engine.allot_counts().moves_untimed, 0);

    // Through allot requests: a 20-seat pool, s1 takes 14, s2 wants 16 (fair shares).
    let mut a = Allot::new();
    let limits = &mut a.h.engine.cfg.license.limits;
    limits.total = Some(20);
    limits.agent_types.insert("inbound".into(), 20);
    a.h.hello("s1", None);
    a.h.hello("s2", None);
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 14)]));
    assert!(
        a.h.engine.take_capacity_moves().is_empty(),
        "no tell, no move"
    );
    let out = a.ask("s2", vec![], &[("inbound", 16)]);
    assert_eq!(controls(&out).len(), 1, "{:?}", out.effects);
    assert_eq!(a.h.engine.moves_running(), 1);
    // The same answer grew s2's block from free seats, before the tell: not a move.
    assert!(a.h.engine.take_capacity_moves().is_empty());
    a.h.advance(Duration::from_millis(700));
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 10)]));
    a.h.advance(Duration::from_millis(500));
    let grown = Allot::answer(&a.ask("s2", vec![], &[("inbound", 16)]));
    assert!(grown.blocks["inbound"] > 3, "{grown:?}");
    assert_eq!(
        a.h.engine.take_capacity_moves(),
        vec![Duration::from_millis(1200)]
    );
    a.assert_within_limits();
}

/// Steps: s2's clock starts as above (refresh 500 ms: the horizon is 2 s, under the 3 s
/// after which a silent slave is disconnected). (1) Past the horizon the grant is not
/// timed and the clock counts as untimed. (2) Past the horizon a tick drops it. (3) A new
/// instance of s2 does not stop its predecessor's clock. (4) A new term clears the clocks
/// without counting them: a new leader times only the tells it sends.
#[test]
fn a_capacity_move_clock_is_dropped_past_the_horizon_at_a_new_instance_and_a_new_term() {
    let mut a = Allot::new();
    a.h.engine.cfg.allot.refresh = Duration::from_millis(500);
    let horizon = a.h.engine.move_horizon();
    assert_eq!(horizon, Duration::from_secs(2));
    s2_waits_for_s1s_block(&mut a);
    a.h.advance(horizon + Duration::from_millis(1));
    a.h.heartbeat("s1");
    a.h.heartbeat("s2");
    Allot::answer(&a.ask("s1", vec![], &[]));
    assert!(approved(&a.h.decision("s2", "b1", "inbound")));
    assert!(a.h.engine.take_capacity_moves().is_empty());
    assert_eq!(a.h.engine.allot_counts().moves_untimed, 1);

    // (2) A tick past the horizon.
    let mut a = Allot::new();
    a.h.engine.cfg.allot.refresh = Duration::from_millis(500);
    s2_waits_for_s1s_block(&mut a);
    a.h.advance(horizon);
    a.h.tick();
    assert_eq!(
        a.h.engine.moves_running(),
        1,
        "at the horizon it still runs"
    );
    a.h.advance(Duration::from_millis(1));
    a.h.tick();
    assert_eq!(a.h.engine.moves_running(), 0);
    assert_eq!(a.h.engine.allot_counts().moves_untimed, 1);

    // (3) s2 restarts: its new instance's grant does not stop the old clock.
    let mut a = Allot::new();
    s2_waits_for_s1s_block(&mut a);
    a.h.restart("s2");
    a.h.hello("s2", None);
    Allot::answer(&a.ask("s1", vec![], &[]));
    assert!(approved(&a.h.decision("s2", "b1", "inbound")));
    assert!(a.h.engine.take_capacity_moves().is_empty());
    assert_eq!(a.h.engine.allot_counts().moves_untimed, 1);

    // (4) A new term.
    let mut a = Allot::new();
    s2_waits_for_s1s_block(&mut a);
    a.h.engine.restart_silence_clocks(a.h.now);
    assert_eq!(a.h.engine.moves_running(), 0);
    Allot::answer(&a.ask("s1", vec![], &[]));
    assert!(approved(&a.h.decision("s2", "b1", "inbound")));
    assert!(a.h.engine.take_capacity_moves().is_empty());
    assert_eq!(a.h.engine.allot_counts().moves_untimed, 0);
}

/// Steps: in allotment mode, slaves with held seats and blocks of two types; the gauges
/// list each (slave, agent type) pair's used and free seats, most seats first (ties by
/// slave id), at most the bound, and count the pairs left out; a slave with nothing is not
/// listed; a bound of 0 lists nothing. In strict mode there is nothing to list.
#[test]
fn the_per_slave_gauges_list_the_pairs_with_the_most_seats_up_to_the_bound() {
    let mut a = Allot::new();
    let limits = &mut a.h.engine.cfg.license.limits;
    limits.total = Some(40);
    limits.agent_types = BTreeMap::from([("inbound".into(), 20), ("outbound".into(), 20)]);
    for s in ["s1", "s2", "s3", "s4"] {
        a.h.hello(s, None);
    }
    // s1: 2 inbound held, a block of 3 inbound; s2: a block of 4 outbound and 1 inbound
    // held; s3: 1 outbound held; s4: nothing.
    assert!(approved(&a.h.decision("s1", "a1", "inbound")));
    assert!(approved(&a.h.decision("s1", "a2", "inbound")));
    Allot::answer(&a.ask("s1", vec![], &[("inbound", 3)]));
    Allot::answer(&a.ask("s2", vec![], &[("outbound", 4)]));
    assert!(approved(&a.h.decision("s2", "b1", "inbound")));
    assert!(approved(&a.h.decision("s3", "c1", "outbound")));
    let pair = |slave: &str, agent_type: &str, used, free| SlaveSeats {
        slave: slave.into(),
        agent_type: agent_type.into(),
        used,
        free,
    };
    let all = a.h.engine.top_slave_seats(10).unwrap();
    assert_eq!(
        all.pairs,
        vec![
            pair("s1", "inbound", 2, 3),
            pair("s2", "outbound", 0, 4),
            pair("s2", "inbound", 1, 0),
            pair("s3", "outbound", 1, 0),
        ]
    );
    assert_eq!(all.omitted, 0);
    let top = a.h.engine.top_slave_seats(2).unwrap();
    assert_eq!(top.pairs, all.pairs[..2]);
    assert_eq!(top.omitted, 2);
    let none = a.h.engine.top_slave_seats(0).unwrap();
    assert!(none.pairs.is_empty());
    assert_eq!(none.omitted, 4);

    let mut h = Harness::new(true);
    h.hello("s1", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert_eq!(h.engine.top_slave_seats(10), None);
}

/// 10,000 slaves with one seat each and one with three: the bound keeps 100 pairs, the
/// largest first, and counts the rest.
#[test]
fn the_per_slave_gauges_stay_bounded_with_ten_thousand_slaves() {
    let mut a = Allot::new();
    let limits = &mut a.h.engine.cfg.license.limits;
    limits.total = Some(20_000);
    limits.agent_types = BTreeMap::new();
    a.h.engine.cfg.max_slaves = 20_000;
    for n in 0..10_000 {
        let s = format!("s{n:05}");
        a.h.hello(&s, None);
        assert!(approved(&a.h.decision(&s, "a", "inbound")));
    }
    for agent in ["b", "c"] {
        assert!(approved(&a.h.decision("s09999", agent, "inbound")));
    }
    let top = a.h.engine.top_slave_seats(100).unwrap();
    assert_eq!(top.pairs.len(), 100);
    assert_eq!(top.omitted, 9_900);
    assert_eq!(top.pairs[0].slave, "s09999");
    assert_eq!(top.pairs[0].used, 3);
    assert_eq!(top.pairs[1].slave, "s00000");
    assert_eq!(top.pairs[99].slave, "s00098");
}
