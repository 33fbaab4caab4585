//! Replaying the ledger or a snapshot reproduces the leader's state (unit test and
//! proptest).

use super::*;

/// A standby that applies the leader's ledger records in order holds the same seats as
/// the leader, at every step of a random run that includes reclaims and admin releases.
#[test]
fn replaying_the_records_or_a_snapshot_reproduces_the_seat_state() {
    let mut h = Harness::new(true);
    let mut standby = Engine::new(config(true));
    let mut restored = Engine::new(config(true));
    // Snapshotted (reclaimed slaves, revoked agents): both must occur for the test to mean
    // anything.
    let mut kinds = (0, 0);
    let slaves = ["s1", "s2", "s3", "s4"];
    let types = ["inbound", "outbound", "supervisor"];
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut records = 0;
    for step in 0..4000 {
        let slave = slaves[next(4) as usize];
        let agent = format!("a{}", next(10));
        let out = match next(12) {
            0 => {
                let claims = (0..next(5))
                    .map(|i| AgentClaim {
                        agent_id: format!("a{i}"),
                        agent_type: types[next(3) as usize].into(),
                    })
                    .collect();
                if next(3) == 0 {
                    h.restart(slave);
                }
                let license = (slave == "s4").then(|| slave_license(Some(2)));
                h.hello_with(slave, license, claims)
            }
            1..=5 => h.register(slave, &agent, types[next(3) as usize]),
            6 | 7 => h.unregister_out(slave, &agent),
            8 => {
                let request = lmbus_schemas::ReleaseRequest {
                    slave_id: slave.into(),
                    agent_id: (next(2) == 0).then(|| agent.clone()),
                    operator: "op".into(),
                };
                let released = h.admin_release(&request);
                Output {
                    changes: released.changes,
                    ..Output::default()
                }
            }
            _ => {
                h.advance(Duration::from_millis(next(40_000)));
                h.engine.handle(h.now, Event::Tick { today: TODAY })
            }
        };
        for change in &out.changes {
            standby.apply(h.now, change).unwrap();
            restored.apply(h.now, change).unwrap();
            records += 1;
        }
        if step % 50 == 0 {
            assert_eq!(standby.seats(), h.engine.seats(), "diverged at step {step}");
            assert_eq!(
                seat_details(&standby),
                seat_details(&h.engine),
                "seat details diverged at step {step}"
            );
        }
        // A replica that starts from a snapshot (split into small `Seats` changes) and
        // applies the records after it.
        if step % 300 == 0 {
            restored = Engine::new(config(true));
            for change in standby.snapshot(2) {
                match &change {
                    SeatChange::Reclaim { .. } => kinds.0 += 1,
                    SeatChange::Revoke { .. } => kinds.1 += 1,
                    SeatChange::Seats { agent_ids, .. } => assert!(agent_ids.len() <= 2),
                    _ => {}
                }
                restored.apply(h.now, &change).unwrap();
            }
            assert_eq!(
                durable(&restored),
                durable(&standby),
                "snapshot at step {step}"
            );
        }
    }
    assert!(records > 1000, "the run made only {records} records");
    assert!(
        kinds.0 > 0 && kinds.1 > 0,
        "snapshots held (reclaims, revokes) {kinds:?}"
    );
    assert_eq!(standby.seats(), h.engine.seats());
    assert_eq!(standby.total_in_use(), h.engine.total_in_use());
    assert_eq!(durable(&restored), durable(&standby));
    assert_eq!(restored.total_in_use(), standby.total_in_use());
    assert_eq!(restored.in_use_by_type, standby.in_use_by_type);
}

/// What the ledger decides about each slave (not its connection or silence clock).
/// Every seat with how it was granted (request, time, replica).
fn seat_details(engine: &Engine) -> Vec<(String, String, Option<super::super::Granted>)> {
    engine
        .slaves
        .iter()
        .flat_map(|(id, s)| {
            s.agents
                .keys()
                .map(|a| (id.to_string(), a.clone(), s.granted.get(a).cloned()))
        })
        .collect()
}

fn durable(engine: &Engine) -> Vec<String> {
    engine
        .slaves
        .iter()
        .map(|(id, s)| {
            // With when and by whom each seat was granted: the ledger's times, not the
            // replaying replica's.
            let agents: Vec<_> = s
                .agents
                .iter()
                .map(|(a, t)| (a, t, s.granted.get(a)))
                .collect();
            let mut revoked: Vec<_> = s.revoked.iter().collect();
            revoked.sort();
            format!(
                "{id} {} {:?} {:?} {:?} {} {} {} {agents:?} {revoked:?}",
                s.instance,
                s.license.as_ref().map(|l| (l.id, l.local_limit)),
                s.heartbeat_interval,
                s.grace,
                s.logout_after_grace,
                s.hello_seq,
                s.reclaimed
            )
        })
        .collect()
}

/// Property tests: any sequence of slave events keeps every limit, and a standby that
/// applies the resulting ledger changes holds the same seats.
mod properties {
    use super::*;
    use proptest::prelude::*;

    const TYPES: [&str; 4] = ["inbound", "outbound", "supervisor", "not-in-license"];

    #[derive(Debug, Clone)]
    enum Op {
        /// A hello claiming (agent, type) pairs, from a new process or the same one.
        Hello {
            slave: usize,
            claims: Vec<(usize, usize)>,
            restarted: bool,
        },
        Register {
            slave: usize,
            agent: usize,
            kind: usize,
        },
        Unregister {
            slave: usize,
            agent: usize,
        },
        Heartbeat {
            slave: usize,
        },
        /// Time passes (up to 70 s: past the 60 s grace plus margin) and the master ticks.
        Wait {
            ms: u64,
        },
        Release {
            slave: usize,
            agent: Option<usize>,
        },
        /// Allotment mode: a journal of admissions (true) and releases (false) and the
        /// blocks wanted, from an honest or a lying slave alike; `replay` sends it under
        /// an old request number.
        Allot {
            slave: usize,
            journal: Vec<(usize, usize, bool)>,
            want: Vec<(usize, u32)>,
            replay: bool,
        },
        /// Allotment mode: the slave does what the master's last control message to it
        /// asked (give its blocks back, or keep no more than the caps), as an allot request
        /// with no journal.
        Obey {
            slave: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (0..4usize, prop::collection::vec((0..8usize, 0..4usize), 0..5), any::<bool>())
                .prop_map(|(slave, claims, restarted)| Op::Hello { slave, claims, restarted }),
            6 => (0..4usize, 0..8usize, 0..4usize)
                .prop_map(|(slave, agent, kind)| Op::Register { slave, agent, kind }),
            3 => (0..4usize, 0..8usize).prop_map(|(slave, agent)| Op::Unregister { slave, agent }),
            1 => (0..4usize).prop_map(|slave| Op::Heartbeat { slave }),
            2 => (0..70_000u64).prop_map(|ms| Op::Wait { ms }),
            1 => (0..4usize, prop::option::of(0..8usize))
                .prop_map(|(slave, agent)| Op::Release { slave, agent }),
            4 => (
                0..4usize,
                prop::collection::vec((0..8usize, 0..4usize, any::<bool>()), 0..4),
                prop::collection::vec((0..4usize, 0..5u32), 0..3),
                prop::bool::weighted(0.1),
            )
                .prop_map(|(slave, journal, want, replay)| Op::Allot { slave, journal, want, replay }),
            2 => (0..4usize).prop_map(|slave| Op::Obey { slave }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Slave s3 holds a slave license with a local limit of 2; the others are
        /// unlicensed. The master allows 5 seats, 3 inbound and 3 outbound.
        #[test]
        fn no_sequence_of_events_breaks_a_limit_or_the_replay(
            ops in prop::collection::vec(op(), 1..150)
        ) {
            let mut h = Harness::new(true);
            h.engine.cfg.allot.admission = lmbus_schemas::Admission::Allotment;
            let mut standby = Engine::new(config(true));
            let licensed = slave_license(Some(2));
            let mut journal_n: BTreeMap<String, u64> = BTreeMap::new();
            // Every event's changes as one ledger record, for the audit at the end.
            let mut records = Vec::new();
            // The last control message each slave was sent, for `Obey`.
            let mut told: BTreeMap<String, lmbus_schemas::ControlMessage> = BTreeMap::new();
            for op in ops {
                // Before a registration: whether a refusal for capacity may wait, i.e.
                // whether seats sit free in a connected slave's block whose holder was not
                // told to give back longer ago than the return wait.
                let wait = h.engine.return_wait();
                let now = h.now;
                let may_wait = |engine: &Engine, requester: &str, t: &str, total: bool| {
                    // Only a slave that takes allotments knows the hint.
                    let hinted = engine
                        .slaves
                        .get(&SlaveId::new(requester).unwrap())
                        .is_some_and(|s| s.allot_seq > 0);
                    hinted && engine.slaves.values().any(|s| {
                        s.connected
                            && s.blocks.iter().any(|(bt, n)| *n > 0 && (total || bt == t))
                            && s.asked_to_return.is_none_or(|at| now.saturating_duration_since(at) < wait)
                    })
                };
                let waits = match &op {
                    Op::Register { slave, kind, .. } => Some((
                        may_wait(&h.engine, &format!("s{slave}"), TYPES[*kind], true),
                        may_wait(&h.engine, &format!("s{slave}"), TYPES[*kind], false),
                    )),
                    _ => None,
                };
                let out = match op {
                    Op::Hello { slave, claims, restarted } => {
                        let name = format!("s{slave}");
                        if restarted {
                            h.restart(&name);
                        }
                        let claims = claims
                            .into_iter()
                            .map(|(a, t)| AgentClaim {
                                agent_id: format!("a{a}"),
                                agent_type: TYPES[t].into(),
                            })
                            .collect();
                        let license = (slave == 3).then(|| licensed.clone());
                        h.hello_with(&name, license, claims)
                    }
                    Op::Register { slave, agent, kind } => {
                        h.register(&format!("s{slave}"), &format!("a{agent}"), TYPES[kind])
                    }
                    Op::Obey { slave } => {
                        let name = format!("s{slave}");
                        let instance = h.instances.get(&name).copied().unwrap_or_default();
                        let want = match told.remove(&name) {
                            Some(lmbus_schemas::ControlMessage::ShrinkAllotment { blocks }) => blocks,
                            Some(lmbus_schemas::ControlMessage::ReturnAllotment) => BTreeMap::new(),
                            _ => h
                                .engine
                                .slaves
                                .get(&SlaveId::new(name.clone()).unwrap())
                                .map(|s| s.blocks.clone())
                                .unwrap_or_default(),
                        };
                        let seq = h.next_seq();
                        h.engine.handle(
                            h.now,
                            Event::Allot {
                                slave: SlaveId::new(name).unwrap(),
                                request: lmbus_schemas::AllotRequest { instance, seq, ops: vec![], want },
                            },
                        )
                    }
                    Op::Unregister { slave, agent } => {
                        h.unregister_out(&format!("s{slave}"), &format!("a{agent}"))
                    }
                    Op::Heartbeat { slave } => {
                        let name = format!("s{slave}");
                        if h.instances.contains_key(&name) {
                            h.heartbeat(&name);
                        }
                        Output::default()
                    }
                    Op::Wait { ms } => {
                        h.advance(Duration::from_millis(ms));
                        h.engine.handle(h.now, Event::Tick { today: TODAY })
                    }
                    Op::Release { slave, agent } => {
                        let released = h.admin_release(&lmbus_schemas::ReleaseRequest {
                            slave_id: format!("s{slave}"),
                            agent_id: agent.map(|a| format!("a{a}")),
                            operator: "op".into(),
                        });
                        Output {
                            changes: released.changes,
                            ..Output::default()
                        }
                    }
                    Op::Allot { slave, journal, want, replay } => {
                        let name = format!("s{slave}");
                        let instance = h.instances.get(&name).copied().unwrap_or_default();
                        let n = journal_n.entry(name.clone()).or_insert(0);
                        let ops = journal
                            .into_iter()
                            .map(|(a, t, admit)| {
                                *n += 1;
                                lmbus_schemas::AllotOp {
                                    n: *n,
                                    kind: if admit {
                                        lmbus_schemas::AllotOpKind::Admit
                                    } else {
                                        lmbus_schemas::AllotOpKind::Release
                                    },
                                    agent_id: format!("a{a}"),
                                    agent_type: TYPES[t].into(),
                                }
                            })
                            .collect();
                        let seq = if replay { h.seq.saturating_sub(3).max(1) } else { h.next_seq() };
                        h.engine.handle(
                            h.now,
                            Event::Allot {
                                slave: SlaveId::new(name).unwrap(),
                                request: lmbus_schemas::AllotRequest {
                                    instance,
                                    seq,
                                    ops,
                                    want: want.into_iter().map(|(t, k)| (TYPES[t].to_owned(), k)).collect(),
                                },
                            },
                        )
                    }
                };
                for change in &out.changes {
                    prop_assert!(standby.apply(h.now, change).is_ok());
                }
                for effect in &out.effects {
                    if let Effect::Control { slave, message } = effect {
                        told.insert(slave.to_string(), message.clone());
                    }
                }
                // Exact near the limits: a capacity refusal waits only while seats sit free
                // in a block that is being given back, and is final only when none does.
                if let (Some((total_waits, type_waits)), Some(Reply::Decision(Decision::Rejected { reason, retry_after_ms, .. }))) =
                    (waits, reply_of(&out))
                {
                    let may = match reason {
                        RejectReason::AggregateLimit => total_waits,
                        RejectReason::TypeLimit => type_waits,
                        _ => false,
                    };
                    prop_assert_eq!(retry_after_ms.is_some(), may, "{:?}: {:?}", reason, out);
                    if retry_after_ms.is_some() {
                        prop_assert!(out.changes.is_empty());
                        prop_assert!(alerts(&out).is_empty());
                    }
                }
                if !out.changes.is_empty() {
                    records.push(crate::ledger::Record {
                        sequence: records.len() as u64 + 1,
                        entry: lmbus_schemas::LedgerEntry {
                            writer: "b1".into(),
                            changes: out.changes.clone(),
                        },
                        quarantined: None,
                        id: None,
                    });
                }
                let status = h.engine.status(h.now);
                let sum: u32 = status.slaves.iter().map(|s| s.in_use).sum();
                prop_assert_eq!(sum, status.total_in_use);
                // The running sums of demand are what a count from scratch gives.
                let running = (h.engine.demand.clone(), h.engine.holders.clone());
                h.engine.recount_demand();
                prop_assert_eq!(running, (h.engine.demand.clone(), h.engine.holders.clone()));
                let allotted: u32 = status.slaves.iter().flat_map(|s| s.allotted.values()).sum();
                prop_assert_eq!(allotted, status.allotted_total);
                // Held plus allotted: the limit the hosts can reach.
                prop_assert!(status.total_in_use + status.allotted_total <= status.total_limit);
                for (t, limit) in &status.type_limits {
                    let used: u32 = status
                        .slaves
                        .iter()
                        .map(|s| s.in_use_by_type.get(t).copied().unwrap_or(0))
                        .sum();
                    prop_assert_eq!(used, status.in_use_by_type.get(t).copied().unwrap_or(0));
                    let blocks: u32 = status
                        .slaves
                        .iter()
                        .map(|s| s.allotted.get(t).copied().unwrap_or(0))
                        .sum();
                    prop_assert_eq!(blocks, status.allotted_by_type.get(t).copied().unwrap_or(0));
                    prop_assert!(used + blocks <= *limit);
                }
                prop_assert!(!status.in_use_by_type.contains_key("not-in-license"));
                prop_assert!(!status.allotted_by_type.contains_key("not-in-license"));
                for s in &status.slaves {
                    if let Some(local) = s.local_limit {
                        prop_assert!(s.in_use + s.allotted.values().sum::<u32>() <= local);
                    }
                }
                prop_assert_eq!(standby.seats(), h.engine.seats());
                let standby_status = standby.status(h.now);
                prop_assert_eq!(&standby_status.allotted_by_type, &status.allotted_by_type);
                prop_assert_eq!(standby_status.allotted_total, status.allotted_total);
            }
            // The ledger audit, record by record, agrees: held plus allotted within the
            // limits at every record, every seat taken from a block that held one.
            let limits = &h.engine.cfg.license.limits;
            let audit = crate::ledger::audit(&records, limits.total.unwrap_or(0), &limits.agent_types);
            prop_assert!(audit.is_ok(), "{:?}", audit);
            let audit = audit.unwrap();
            prop_assert_eq!(&audit.seats, &h.engine.seats().into_iter().filter(|(_, s)| !s.is_empty()).collect());
        }
    }
}
