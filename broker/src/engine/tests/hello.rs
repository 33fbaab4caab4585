//! Hellos: licensed and unlicensed slaves, one live slave per license, the timing rule,
//! stale hellos, and the reconcile (`seat_truth`: a hello or heartbeat never leaves the
//! hosts' books above the master's).

use super::*;

#[test]
fn unlicensed_slaves_need_permission() {
    let mut h = Harness::new(false);
    let out = h.hello_with("u1", None, vec![]);
    assert!(matches!(
        reply_of(&out),
        Some(Reply::Refused {
            reason: RejectReason::UnlicensedNotAllowed,
            ..
        })
    ));
    assert_eq!(alerts(&out)[0].kind, AlertKind::SlaveRefused);
    assert_eq!(
        rejected_for(&h.decision("u1", "a1", "inbound")),
        Some(RejectReason::SlaveNotConnected)
    );
    // A standalone (role none) license is still an unlicensed slave.
    let standalone = sign_license(&license(Role::None, Limits::default()), &vendor()).unwrap();
    assert!(matches!(
        h.hello("u2", Some(standalone.clone())),
        Reply::Refused {
            reason: RejectReason::UnlicensedNotAllowed,
            ..
        }
    ));

    let mut h = Harness::new(true);
    assert!(matches!(h.hello("u1", None), Reply::Welcome(_)));
    assert!(matches!(h.hello("u2", Some(standalone)), Reply::Welcome(_)));
    assert!(approved(&h.decision("u1", "a1", "inbound")));
}

#[test]
fn bad_slave_licenses_are_refused_with_their_reason() {
    let mut h = Harness::new(true);
    let master_as_slave = sign_license(&license(Role::Master, master_limits()), &vendor()).unwrap();
    assert!(matches!(
        h.hello("s1", Some(master_as_slave)),
        Reply::Refused {
            reason: RejectReason::LicenseRole,
            ..
        }
    ));
    let tampered = slave_license(Some(2)).replace("local = 2", "local = 200");
    match h.hello("s2", Some(tampered)) {
        Reply::Refused {
            reason: RejectReason::LicenseInvalid,
            detail,
            ..
        } => assert!(detail.contains("modified"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let mut dev = license(Role::Slave, Limits::default());
    dev.context = Context::Development;
    assert!(matches!(
        h.hello("s3", Some(sign_license(&dev, &vendor()).unwrap())),
        Reply::Refused {
            reason: RejectReason::ContextMismatch,
            ..
        }
    ));
    let mut expired = license(Role::Slave, Limits::default());
    expired.issued = date!(2020 - 01 - 01);
    expired.expires = date!(2021 - 01 - 01);
    assert!(matches!(
        h.hello("s4", Some(sign_license(&expired, &vendor()).unwrap())),
        Reply::Refused {
            reason: RejectReason::LicenseInvalid,
            ..
        }
    ));
}

#[test]
fn hello_reconciles_without_double_counting() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    h.hello("s2", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "inbound")));
    // s2 fills the rest.
    for a in ["b1", "b2", "b3"] {
        assert!(approved(&h.decision("s2", a, "outbound")));
    }
    // s1 restarts: it now claims a1 (held), and c1/c2 (new). a2 is gone. Only one of c1,c2
    // fits once a2 is released.
    h.restart("s1");
    let claims = ["a1", "c1", "c2"]
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
    assert_eq!(w.rejected_agents[0].agent_id, "c2");
    assert_eq!(w.rejected_agents[0].reason, RejectReason::AggregateLimit);
    assert_eq!(h.engine.total_in_use(), 5);
    let status = h.engine.status(h.now);
    let s1 = status.slaves.iter().find(|s| s.slave_id == "s1").unwrap();
    assert_eq!(s1.in_use, 2);
}

/// Steps: s1 connects with a slave license; s2 presents the same license while s1 is
/// connected: refused `license_in_use` with an alert naming s1; s1 saying hello again
/// with it is fine; once s1 has gone silent (marked disconnected), s2 may use it, and then
/// s1 is the one refused.
#[test]
fn a_slave_license_serves_one_live_slave() {
    let mut h = Harness::new(false);
    let shared = slave_license(Some(5));
    assert!(matches!(
        h.hello("s1", Some(shared.clone())),
        Reply::Welcome(_)
    ));
    let out = h.hello_with("s2", Some(shared.clone()), vec![]);
    match reply_of(&out) {
        Some(Reply::Refused {
            reason: RejectReason::LicenseInUse,
            ref detail,
            ..
        }) => assert!(detail.contains("s1"), "{detail}"),
        ref other => panic!("{other:?}"),
    }
    let a = alerts(&out);
    assert!(
        a.iter().any(|a| a.kind == AlertKind::SlaveRefused
            && a.reason == Some(RejectReason::LicenseInUse)
            && a.slave.as_deref() == Some("s2")),
        "{a:?}"
    );
    assert!(matches!(
        h.hello("s1", Some(shared.clone())),
        Reply::Welcome(_)
    ));
    h.advance(Duration::from_secs(30));
    h.tick();
    assert!(!h.engine.status(h.now).slaves[0].connected);
    assert!(matches!(
        h.hello("s2", Some(shared.clone())),
        Reply::Welcome(_)
    ));
    assert!(matches!(
        h.hello("s1", Some(shared)),
        Reply::Refused {
            reason: RejectReason::LicenseInUse,
            ..
        }
    ));
}

/// Steps: a hello whose timings break the rule (margin not above request timeout + 1% of
/// grace) is refused with `timing_rule`; a stale hello (lower seq, same instance) and a
/// replayed one (the same seq) are refused with `replayed`; the next number is welcome.
#[test]
fn timing_rule_and_stale_hellos() {
    let mut h = Harness::new(true);
    let hello = |seq, grace_ms, timeout_ms| Hello {
        instance: Uuid::from_u128(7),
        license: None,
        heartbeat_interval_ms: 1000,
        agents: vec![],
        software: String::new(),
        seq,
        grace_ms,
        logout_after_grace: true,
        request_timeout_ms: timeout_ms,
        ..Default::default()
    };
    let send = |h: &mut Harness, hello: Hello| {
        h.engine
            .handle(
                h.now,
                Event::Hello {
                    slave: id("s1"),
                    hello,
                    today: TODAY,
                },
            )
            .into_slave_reply()
            .unwrap()
    };
    // margin 10 s; timeout 9 s + 1% of 120 s = 10.2 s: broken.
    assert!(matches!(
        send(&mut h, hello(1, 120_000, 9_000)),
        Reply::Refused {
            reason: RejectReason::TimingRule,
            ..
        }
    ));
    assert!(matches!(
        send(&mut h, hello(5, 120_000, 2_000)),
        Reply::Welcome(_)
    ));
    // An older hello, and the same hello again (a verbatim replay), are both refused.
    for seq in [4, 5] {
        assert!(matches!(
            send(&mut h, hello(seq, 120_000, 2_000)),
            Reply::Refused {
                reason: RejectReason::Replayed,
                ..
            }
        ));
    }
    assert!(matches!(
        send(&mut h, hello(6, 120_000, 2_000)),
        Reply::Welcome(_)
    ));
}

/// The hello race of issue 16 and the replayed hello of issue 15, one rule at a time.
mod seat_truth {
    use super::*;

    fn claim(agent: &str, agent_type: &str) -> AgentClaim {
        AgentClaim {
            agent_id: agent.into(),
            agent_type: agent_type.into(),
        }
    }

    /// A hello from `slave`'s current instance with explicit `seq`, claims, pending
    /// registrations and the last request number it accounts for.
    fn hello_at(
        h: &mut Harness,
        slave: &str,
        seq: u64,
        agents: Vec<AgentClaim>,
        pending: Vec<&str>,
        request_seq: u64,
    ) -> Output {
        let request_seq = Some(request_seq);
        let instance = *h.instances.entry(slave.into()).or_insert_with(Uuid::new_v4);
        h.engine.handle(
            h.now,
            Event::Hello {
                slave: id(slave),
                hello: Hello {
                    instance,
                    heartbeat_interval_ms: 1000,
                    seq,
                    grace_ms: 60_000,
                    logout_after_grace: true,
                    request_timeout_ms: 2000,
                    agents,
                    pending: pending.into_iter().map(String::from).collect(),
                    request_seq,
                    ..Default::default()
                },
                today: TODAY,
            },
        )
    }

    fn held(h: &Harness, slave: &str) -> Vec<String> {
        h.engine
            .seats()
            .get(slave)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Steps: s1 says hello (1) and registers a1 (request 1, granted). Hello 2 was built
    /// while a2's registration (request 2) was in flight and before the answer for a1
    /// arrived... no: it claims a1 and lists a2 as pending; the master granted a2 before
    /// the hello arrived. a2 keeps its seat. Then a3 is granted by request 4, and hello 3,
    /// built after request 3 only, arrives late: a3 keeps its seat too. A hello that
    /// accounts for every request and claims neither releases them (the slave gave them up).
    #[test]
    fn a_hello_never_releases_a_seat_granted_after_it_was_built() {
        let mut h = Harness::new(true);
        hello_at(&mut h, "s1", 1, vec![], vec![], 0);
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a1", "inbound", 1)
        )));
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a2", "inbound", 2)
        )));
        let out = hello_at(&mut h, "s1", 2, vec![claim("a1", "inbound")], vec!["a2"], 2);
        assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))));
        assert_eq!(held(&h, "s1"), ["a1", "a2"]);
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a3", "outbound", 4)
        )));
        let out = hello_at(
            &mut h,
            "s1",
            3,
            vec![claim("a1", "inbound"), claim("a2", "inbound")],
            vec![],
            3,
        );
        assert!(
            out.changes
                .iter()
                .all(|c| !matches!(c, SeatChange::Release { .. })),
            "{:?}",
            out.changes
        );
        assert_eq!(held(&h, "s1"), ["a1", "a2", "a3"]);
        // Nothing changed for a live session: no alert.
        assert!(alerts(&out).is_empty(), "{:?}", alerts(&out));
        let out = hello_at(&mut h, "s1", 4, vec![claim("a1", "inbound")], vec![], 4);
        assert_eq!(held(&h, "s1"), ["a1"]);
        assert!(
            alerts(&out)
                .iter()
                .any(|a| a.message.contains("2 seats it no longer claims released"))
        );
    }

    /// The interleaving the slave's proptest found: a0's seat is held from a hello (a
    /// re-grant, request 0), the slave registers a0 again as request 5 and the master
    /// approves it with the seat it holds; hello 2, built before request 5 (it accounts for
    /// request 4 only) and not listing a0, arrives after. The approval is on its way to the
    /// host, so the hello keeps the seat, and a standby that applies the records keeps it
    /// too. A hello that accounts for request 5 and does not claim a0 releases it.
    #[test]
    fn a_seat_approved_again_counts_from_the_later_request() {
        let mut h = Harness::new(true);
        // Every record the leader writes, for a standby to apply.
        let mut records = Vec::new();
        let out = hello_at(&mut h, "s1", 1, vec![claim("a0", "inbound")], vec![], 0);
        records.extend(out.changes);
        assert_eq!(held(&h, "s1"), ["a0"]);
        let out = h.register_numbered("s1", "a0", "inbound", 5);
        assert!(matches!(
            decision_of(&out),
            Decision::Approved { already_held: true }
        ));
        assert!(
            out.changes.iter().any(|c| matches!(
                c,
                SeatChange::Confirm { agent_id, request_seq: 5, .. } if agent_id == "a0"
            )),
            "{:?}",
            out.changes
        );
        records.extend(out.changes);
        let out = hello_at(&mut h, "s1", 2, vec![], vec![], 4);
        assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))));
        records.extend(out.changes);
        assert_eq!(
            held(&h, "s1"),
            ["a0"],
            "a hello built before request 5 released a0"
        );
        // A retry of request 5 writes nothing more.
        let retry = h.register_numbered("s1", "a0", "inbound", 5);
        assert!(retry.changes.is_empty(), "{:?}", retry.changes);

        // A standby applying the records, and one restored from its snapshot, agree.
        let mut standby = Engine::new(config(true));
        for change in &records {
            standby.apply(h.now, change).unwrap();
        }
        let mut restored = Engine::new(config(true));
        for change in standby.snapshot(100) {
            restored.apply(h.now, &change).unwrap();
        }
        for (name, engine) in [("standby", &standby), ("restored", &restored)] {
            let granted = engine.slaves[&id("s1")].granted["a0"].request_seq;
            assert_eq!(granted, 5, "the {name}'s seat of a0 counts from request 5");
        }
        let audit = crate::ledger::audit(
            &records
                .iter()
                .enumerate()
                .map(|(i, c)| crate::ledger::Record {
                    sequence: i as u64 + 1,
                    entry: lmbus_schemas::LedgerEntry {
                        writer: "b1".into(),
                        changes: vec![c.clone()],
                    },
                    quarantined: None,
                    id: None,
                })
                .collect::<Vec<_>>(),
            5,
            &Default::default(),
        );
        assert!(audit.is_ok(), "{audit:?}");

        hello_at(&mut h, "s1", 3, vec![], vec![], 5);
        assert!(held(&h, "s1").is_empty());
    }

    /// The other half of that interleaving: hello 2 is built while a0 holds a seat (it
    /// accounts for request 1 and claims a0), then the host releases a0 (request 2) and
    /// the release overtakes the hello. The hello does not grant a0 again, nor refuse it
    /// (the slave no longer holds it); a later hello accounting for request 2 that claims
    /// a0 (admitted in the grace period, say) is granted as usual.
    #[test]
    fn a_hello_does_not_grant_back_a_seat_released_after_it_was_built() {
        let mut h = Harness::new(true);
        hello_at(&mut h, "s1", 1, vec![], vec![], 0);
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a0", "inbound", 1)
        )));
        assert!(matches!(
            h.unregister_numbered("s1", "a0", 2).into_slave_reply(),
            Some(Reply::Ack)
        ));
        let out = hello_at(&mut h, "s1", 2, vec![claim("a0", "inbound")], vec![], 1);
        match reply_of(&out) {
            Some(Reply::Welcome(w)) => assert!(w.rejected_agents.is_empty(), "{w:?}"),
            other => panic!("expected a welcome, got {other:?}"),
        }
        assert!(held(&h, "s1").is_empty(), "the stale hello granted a0 back");
        assert!(
            out.changes
                .iter()
                .all(|c| !matches!(c, SeatChange::Grant { .. }))
        );
        hello_at(&mut h, "s1", 3, vec![claim("a0", "inbound")], vec![], 2);
        assert_eq!(held(&h, "s1"), ["a0"]);
    }

    /// The memory of releases stays small and never keeps a claim out for good: a hello
    /// skips a remembered claim once (the release may be an earlier process's: a second
    /// stale hello grants it, the safe side), a heartbeat whose books account for a release
    /// forgets it, and so does a new term.
    #[test]
    fn remembered_releases_are_forgotten_soon() {
        let released = |h: &Harness| h.engine.slaves[&id("s1")].released.len();
        let mut h = Harness::new(true);
        hello_at(&mut h, "s1", 1, vec![], vec![], 0);
        for (n, agent) in ["a0", "a1", "a2"].into_iter().enumerate() {
            let n = n as u64 * 2 + 1;
            h.register_numbered("s1", agent, "inbound", n);
            h.unregister_numbered("s1", agent, n + 1);
        }
        assert_eq!(released(&h), 3);
        let stale = vec![claim("a0", "inbound")];
        hello_at(&mut h, "s1", 2, stale.clone(), vec![], 1);
        assert!(held(&h, "s1").is_empty());
        assert_eq!(released(&h), 2, "a0 skipped once, then forgotten");
        hello_at(&mut h, "s1", 3, stale, vec![], 1);
        assert_eq!(held(&h, "s1"), ["a0"], "a second stale hello grants it");
        // Books taken after request 4: a1's release (4) is accounted for, a2's (6) not.
        heartbeat_with(
            &mut h,
            "s1",
            Some(lmbus_schemas::Books {
                count: 0,
                digest: 0,
                unsettled: vec![],
                request_seq: Some(4),
            }),
        );
        assert_eq!(released(&h), 1);
        h.engine.restart_silence_clocks(h.now);
        assert_eq!(released(&h), 0, "a new term starts without it");
    }

    /// Steps: s1 holds two seats; its hello is replayed verbatim (same instance, same
    /// number) and an older one too: both refused `replayed` with an alert, no change, and
    /// s2 cannot take the seats; a hello under a new number from the genuine slave works.
    #[test]
    fn a_replayed_hello_takes_no_seat_back() {
        let mut h = Harness::new(true);
        hello_at(&mut h, "s1", 1, vec![], vec![], 0);
        h.hello("s2", None);
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a1", "inbound", 1)
        )));
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a2", "inbound", 2)
        )));
        for (seq, alerted) in [(1, 1), (1, 0), (0, 0)] {
            let out = hello_at(&mut h, "s1", seq, vec![], vec![], 0);
            assert!(
                matches!(
                    reply_of(&out),
                    Some(Reply::Refused {
                        reason: RejectReason::Replayed,
                        ..
                    })
                ),
                "{:?}",
                reply_of(&out)
            );
            assert!(out.changes.is_empty());
            // One alert, then quiet for RATE_LIMIT_ALERT_EVERY.
            assert_eq!(alerts(&out).len(), alerted);
        }
        h.advance(RATE_LIMIT_ALERT_EVERY);
        let again = alerts(&hello_at(&mut h, "s1", 1, vec![], vec![], 0));
        assert_eq!(again.len(), 1);
        assert!(
            again[0].message.contains("2 more such refusals"),
            "{}",
            again[0].message
        );
        assert_eq!(held(&h, "s1"), ["a1", "a2"]);
        assert_eq!(h.engine.total_in_use(), 2);
    }

    fn heartbeat_with(h: &mut Harness, slave: &str, books: Option<lmbus_schemas::Books>) -> Output {
        let instance = h.instances[slave];
        h.engine.handle(
            h.now,
            Event::Heartbeat {
                slave: id(slave),
                heartbeat: Heartbeat {
                    instance,
                    seq: 1,
                    books,
                    ..Default::default()
                },
            },
        )
    }

    fn rehello(out: &Output) -> bool {
        out.effects.iter().any(|e| {
            matches!(
                e,
                Effect::Control {
                    message: ControlMessage::Rehello,
                    ..
                }
            )
        })
    }

    /// Steps: s1 holds a1 and a2. A heartbeat whose books match (or match once the agent in
    /// flight is left out on both sides) is acknowledged; books that differ (a seat the
    /// slave does not know, or a wrong type) get a `Rehello`; a heartbeat without books
    /// (an older slave) gets none.
    #[test]
    fn heartbeats_whose_books_differ_ask_for_a_hello() {
        let mut h = Harness::new(true);
        h.hello("s1", None);
        assert!(approved(&h.decision("s1", "a1", "inbound")));
        assert!(approved(&h.decision("s1", "a2", "outbound")));
        let books = |agents: &[(&str, &str)], unsettled: &[&str]| {
            Some(lmbus_schemas::Books {
                count: agents.len() as u32,
                digest: lmbus_schemas::agent_digest(agents.iter().copied()),
                unsettled: unsettled.iter().map(|a| a.to_string()).collect(),
                request_seq: None,
            })
        };
        let out = heartbeat_with(
            &mut h,
            "s1",
            books(&[("a1", "inbound"), ("a2", "outbound")], &[]),
        );
        assert_eq!(reply_of(&out), Some(Reply::Ack));
        assert!(!rehello(&out));
        assert!(!rehello(&heartbeat_with(
            &mut h,
            "s1",
            books(&[("a1", "inbound")], &["a2", "a9"])
        )));
        assert!(rehello(&heartbeat_with(
            &mut h,
            "s1",
            books(&[("a1", "inbound")], &[])
        )));
        assert!(rehello(&heartbeat_with(
            &mut h,
            "s1",
            books(&[("a1", "inbound"), ("a2", "inbound")], &[])
        )));
        assert!(!rehello(&heartbeat_with(&mut h, "s1", None)));
    }

    /// The slave as the hosts see it, and the two FIFO queues between it and the master
    /// (NATS keeps one publisher's order).
    #[derive(Default)]
    struct Model {
        /// What the hosts were told they hold.
        books: BTreeMap<String, String>,
        /// Registrations sent and not answered: agent → request number.
        registering: BTreeMap<String, u64>,
        unregistering: BTreeMap<String, u64>,
        request_seq: u64,
        hello_seq: u64,
        to_master: std::collections::VecDeque<Event>,
        to_slave: std::collections::VecDeque<(Sent, Option<Reply>, Vec<Effect>)>,
    }

    enum Sent {
        Register(String, String),
        Unregister(String),
        Hello,
        Heartbeat,
    }

    #[derive(Debug, Clone)]
    enum Step {
        Register(usize, usize),
        Unregister(usize),
        Hello,
        Heartbeat,
        DeliverToMaster,
        DeliverToSlave,
        /// The second message to the master overtakes the first (a retry at a new leader).
        Overtake,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..6usize, 0..2usize).prop_map(|(a, t)| Step::Register(a, t)),
            2 => (0..6usize).prop_map(Step::Unregister),
            1 => Just(Step::Hello),
            1 => Just(Step::Heartbeat),
            5 => Just(Step::DeliverToMaster),
            5 => Just(Step::DeliverToSlave),
            1 => Just(Step::Overtake),
        ]
    }

    const KINDS: [&str; 2] = ["inbound", "outbound"];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

        /// Any interleaving of registrations, unregistrations, hellos (built from the
        /// slave's books as they are when sent, with what is in flight) and heartbeats,
        /// with answers arriving whenever: every agent the hosts were told they hold has
        /// a seat at the master at every moment, and once everything is delivered and one
        /// heartbeat round has run, the master holds exactly the hosts' books.
        #[test]
        fn the_hosts_books_never_exceed_the_masters(steps in proptest::collection::vec(step(), 1..120)) {
            let mut h = Harness::new(true);
            let instance = Uuid::new_v4();
            h.instances.insert("s1".into(), instance);
            let mut m = Model::default();
            let hello = |m: &mut Model| {
                m.hello_seq += 1;
                Event::Hello {
                    slave: id("s1"),
                    hello: Hello {
                        instance,
                        heartbeat_interval_ms: 1000,
                        seq: m.hello_seq,
                        grace_ms: 60_000,
                        logout_after_grace: true,
                        request_timeout_ms: 2000,
                        agents: m.books.iter().map(|(a, t)| claim(a, t)).collect(),
                        pending: m.registering.keys().cloned().collect(),
                        request_seq: Some(m.request_seq),
                        ..Default::default()
                    },
                    today: TODAY,
                }
            };
            let first = hello(&mut m);
            h.engine.handle(h.now, first);
            let mut sent = std::collections::VecDeque::new();
            let heartbeat = |m: &Model| {
                let unsettled: Vec<String> = m.registering.keys().chain(m.unregistering.keys()).cloned().collect();
                let settled: Vec<(&str, &str)> = m.books.iter()
                    .filter(|(a, _)| !unsettled.contains(a))
                    .map(|(a, t)| (a.as_str(), t.as_str())).collect();
                Event::Heartbeat {
                    slave: id("s1"),
                    heartbeat: Heartbeat {
                        instance,
                        seq: 1,
                        books: Some(lmbus_schemas::Books {
                            count: settled.len() as u32,
                            digest: lmbus_schemas::agent_digest(settled.iter().copied()),
                            unsettled,
                            request_seq: Some(m.request_seq),
                        }),
                        ..Default::default()
                    },
                }
            };
            let run = |h: &mut Harness, m: &mut Model, sent: &mut std::collections::VecDeque<Sent>, s: Step| {
                match s {
                    Step::Register(a, t) => {
                        let agent = format!("a{a}");
                        if m.registering.contains_key(&agent) || m.unregistering.contains_key(&agent) {
                            return;
                        }
                        m.request_seq += 1;
                        m.registering.insert(agent.clone(), m.request_seq);
                        m.to_master.push_back(Event::Register {
                            slave: id("s1"),
                            request: RegisterRequest {
                                request_id: Uuid::new_v4(),
                                seq: m.request_seq,
                                agent_id: agent.clone(),
                                agent_type: KINDS[t].into(),
                            },
                        });
                        sent.push_back(Sent::Register(agent, KINDS[t].into()));
                    }
                    Step::Unregister(a) => {
                        let agent = format!("a{a}");
                        if m.registering.contains_key(&agent) || m.unregistering.contains_key(&agent) {
                            return;
                        }
                        if m.books.remove(&agent).is_none() {
                            return;
                        }
                        m.request_seq += 1;
                        m.unregistering.insert(agent.clone(), m.request_seq);
                        m.to_master.push_back(Event::Unregister {
                            slave: id("s1"),
                            request: UnregisterRequest {
                                request_id: Uuid::new_v4(),
                                seq: m.request_seq,
                                agent_id: agent.clone(),
                            },
                        });
                        sent.push_back(Sent::Unregister(agent));
                    }
                    Step::Hello => {
                        let e = hello(m);
                        m.to_master.push_back(e);
                        sent.push_back(Sent::Hello);
                    }
                    Step::Heartbeat => {
                        let e = heartbeat(m);
                        m.to_master.push_back(e);
                        sent.push_back(Sent::Heartbeat);
                    }
                    Step::DeliverToMaster => {
                        if let (Some(e), Some(what)) = (m.to_master.pop_front(), sent.pop_front()) {
                            let out = h.engine.handle(h.now, e);
                            m.to_slave.push_back((what, reply_of(&out), out.effects));
                        }
                    }
                    Step::Overtake => {
                        if m.to_master.len() >= 2 {
                            m.to_master.swap(0, 1);
                            sent.swap(0, 1);
                        }
                    }
                    Step::DeliverToSlave => {
                        let Some((what, reply, effects)) = m.to_slave.pop_front() else { return };
                        match (what, reply) {
                            (Sent::Register(agent, t), Some(Reply::Decision(Decision::Approved { .. }))) => {
                                m.registering.remove(&agent);
                                m.books.insert(agent, t);
                            }
                            (Sent::Register(agent, _), _) => {
                                m.registering.remove(&agent);
                            }
                            (Sent::Unregister(agent), _) => {
                                m.unregistering.remove(&agent);
                            }
                            (Sent::Hello, Some(Reply::Welcome(w))) => {
                                for r in w.rejected_agents {
                                    m.books.remove(&r.agent_id);
                                }
                            }
                            _ => {}
                        }
                        let asked = effects.iter().any(|e| matches!(e, Effect::Control { message: ControlMessage::Rehello, .. }));
                        if asked {
                            let e = hello(m);
                            m.to_master.push_back(e);
                            sent.push_back(Sent::Hello);
                        }
                    }
                }
            };
            for s in steps {
                run(&mut h, &mut m, &mut sent, s);
                let master = h.engine.seats().remove("s1").unwrap_or_default();
                for (agent, t) in &m.books {
                    proptest::prop_assert_eq!(master.get(agent), Some(t), "the hosts hold {} but the master does not: {:?}", agent, master);
                }
            }
            // Deliver everything, then one heartbeat round (and the hello it may ask for).
            for _ in 0..3 {
                while !m.to_master.is_empty() || !m.to_slave.is_empty() {
                    run(&mut h, &mut m, &mut sent, Step::DeliverToMaster);
                    run(&mut h, &mut m, &mut sent, Step::DeliverToSlave);
                }
                run(&mut h, &mut m, &mut sent, Step::Heartbeat);
            }
            while !m.to_master.is_empty() || !m.to_slave.is_empty() {
                run(&mut h, &mut m, &mut sent, Step::DeliverToMaster);
                run(&mut h, &mut m, &mut sent, Step::DeliverToSlave);
            }
            let master = h.engine.seats().remove("s1").unwrap_or_default();
            let books: BTreeMap<String, String> = m.books.clone();
            proptest::prop_assert_eq!(master.into_iter().collect::<BTreeMap<_, _>>(), books);
        }
    }
}
