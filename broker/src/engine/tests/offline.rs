//! The offline limit (`sync_within_days`): warnings 30, 14, 7 and 1 days before, then no
//! new seats until a vendor sync; the clock and the warnings survive a failover. Time is the
//! wall clock the tests set, jumped by days.

use lmbus_schemas::{Admission, AllotRequest, ControlMessage, SyncStatus};

use super::*;

/// A strict master whose license (issued 2026-01-01) must sync within 60 days, with the
/// wall clock at `day` days after the issue day's midnight.
fn offline_harness(day: u64) -> (Harness, u64) {
    let mut h = Harness::new(true);
    h.engine.cfg.license.sync_within_days = Some(60);
    let issued = h.engine.cfg.license.issued_unix_ms();
    h.engine.set_wall_clock(issued + day * DAY_MS);
    (h, issued + 60 * DAY_MS)
}

/// The `sync_due` alerts of an output.
fn sync_alerts(out: &Output) -> Vec<Alert> {
    alerts(out)
        .into_iter()
        .filter(|a| a.kind == AlertKind::SyncDue)
        .collect()
}

fn tick(h: &mut Harness) -> Output {
    h.engine.handle(h.now, Event::Tick { today: TODAY })
}

/// Moves the wall clock to `ms` (and the monotonic one a little, as a tick would).
fn at(h: &mut Harness, ms: u64) {
    h.now += Duration::from_millis(100);
    h.engine.set_wall_clock(ms);
}

/// A license without `sync_within_days` has no offline limit, however far time jumps.
#[test]
fn a_license_without_the_field_has_no_offline_limit() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    at(&mut h, 4_000_000_000_000);
    assert!(sync_alerts(&tick(&mut h)).is_empty());
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert_eq!(h.engine.sync_deadline_ms(), None);
    assert_eq!(h.engine.status(h.now).license.sync, None);
}

/// Steps: a slave registers an agent on day 1; the clock jumps to 30, 14, 7 and 1 days
/// before the limit, with two ticks at each: one warning each, recorded as `SyncWarned`,
/// none repeated; at the limit one critical alert; a new registration is refused
/// `sync_overdue` with an alert, the registered agent keeps its seat, and once released it
/// is not granted again; status says overdue; the clock set back 40 days changes nothing.
#[test]
fn it_warns_once_at_each_stage_then_refuses_new_seats_and_keeps_the_old() {
    let (mut h, deadline) = offline_harness(1);
    h.hello("s1", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(sync_alerts(&tick(&mut h)).is_empty());
    assert_eq!(
        h.engine.status(h.now).license.sync,
        Some(SyncStatus {
            within_days: 60,
            last_sync_ms: 0,
            deadline_ms: deadline,
            overdue: false,
        })
    );
    for days in [30u32, 14, 7, 1] {
        // Just inside the stage.
        at(&mut h, deadline - u64::from(days) * DAY_MS + 1);
        let out = tick(&mut h);
        let warned = sync_alerts(&out);
        assert_eq!(warned.len(), 1, "{days} days: {warned:?}");
        assert_eq!(warned[0].severity, Severity::Warning);
        let words = if days == 1 {
            "within 1 day:".to_owned()
        } else {
            format!("within {days} days:")
        };
        assert!(warned[0].message.contains(&words), "{}", warned[0].message);
        // With the hour's clock mark before it (the clock jumped days).
        assert_eq!(
            out.changes,
            vec![
                SeatChange::Clock {
                    at_ms: deadline - u64::from(days) * DAY_MS + 1,
                    reset: false
                },
                SeatChange::SyncWarned {
                    deadline_ms: deadline,
                    days
                }
            ]
        );
        assert!(approved(&h.decision("s1", &format!("b{days}"), "outbound")));
        assert_eq!(h.unregister("s1", &format!("b{days}")), Reply::Ack);
        at(&mut h, deadline - u64::from(days) * DAY_MS + 2);
        assert!(sync_alerts(&tick(&mut h)).is_empty(), "{days} repeated");
    }
    at(&mut h, deadline);
    let out = tick(&mut h);
    let overdue = sync_alerts(&out);
    assert_eq!(overdue.len(), 1, "{overdue:?}");
    assert_eq!(overdue[0].severity, Severity::Critical);
    assert!(
        overdue[0].message.contains("no new seats are granted"),
        "{}",
        overdue[0].message
    );
    assert!(sync_alerts(&tick(&mut h)).is_empty());

    let out = h.register("s1", "a2", "inbound");
    let d = decision_of(&out);
    assert_eq!(rejected_for(&d), Some(RejectReason::SyncOverdue));
    assert!(out.changes.is_empty());
    let rejected = alerts(&out);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].reason, Some(RejectReason::SyncOverdue));
    // Already held: the same answer as before, the seat stays.
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    let status = h.engine.status(h.now);
    assert_eq!(status.total_in_use, 1);
    assert!(status.license.sync.is_some_and(|s| s.overdue));
    assert_eq!(h.unregister("s1", "a1"), Reply::Ack);
    assert_eq!(
        rejected_for(&h.decision("s1", "a1", "inbound")),
        Some(RejectReason::SyncOverdue)
    );
    // Refusals past the limit are told per slave every 10 s, not one alert each.
    assert!(alerts(&h.register("s1", "a3", "inbound")).is_empty());
    // A wall clock set back (by hand) does not undo a limit recorded as passed.
    at(&mut h, deadline - 40 * DAY_MS);
    assert!(sync_alerts(&tick(&mut h)).is_empty());
    assert_eq!(
        rejected_for(&h.decision("s1", "a4", "inbound")),
        Some(RejectReason::SyncOverdue)
    );
}

/// A clock that jumps past several stages at once gives one warning, for the stage it is
/// in; the stages it skipped are not given afterwards.
#[test]
fn a_jump_over_several_stages_warns_once() {
    let (mut h, deadline) = offline_harness(0);
    at(&mut h, deadline - 3 * DAY_MS);
    let warned = sync_alerts(&tick(&mut h));
    assert_eq!(warned.len(), 1);
    assert!(warned[0].message.contains("within 7 days"), "{warned:?}");
    at(&mut h, deadline - 2 * DAY_MS);
    assert!(sync_alerts(&tick(&mut h)).is_empty());
    at(&mut h, deadline + 5 * DAY_MS);
    let warned = sync_alerts(&tick(&mut h));
    assert_eq!(warned.len(), 1);
    assert_eq!(warned[0].severity, Severity::Critical);
}

/// Steps: the leader passes the limit and is synced back (the records it wrote are kept);
/// a standby that applied them, and an engine restored from the leader's snapshot, hold
/// the same last sync and warnings: leading next, neither warns again nor refuses, and at
/// the new deadline each warns once.
#[test]
fn a_failover_keeps_the_clock_and_does_not_repeat_the_warnings() {
    let (mut h, deadline) = offline_harness(0);
    let mut records = Vec::new();
    let mut keep = |out: Output| records.extend(out.changes);
    h.hello("s1", None);
    at(&mut h, deadline - 20 * DAY_MS);
    keep(tick(&mut h));
    at(&mut h, deadline + DAY_MS);
    keep(tick(&mut h));
    let synced_at = deadline + DAY_MS + 1000;
    at(&mut h, synced_at);
    let out = h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: synced_at,
            sync: Uuid::nil(),
        },
    );
    // A sync over NATS (not an imported answer) resets every replica's clock floor too.
    assert_eq!(
        out.changes,
        vec![
            SeatChange::Synced {
                at_ms: synced_at,
                sync: Uuid::nil()
            },
            SeatChange::Clock {
                at_ms: synced_at,
                reset: true
            }
        ]
    );
    assert!(
        sync_alerts(&out)[0]
            .message
            .contains("new seats are granted again")
    );
    keep(out);
    let new_deadline = synced_at + 60 * DAY_MS;
    // 29 days before the new deadline: warned once here, then a failover.
    at(&mut h, new_deadline - 29 * DAY_MS);
    keep(tick(&mut h));

    let mut standby = Engine::new(h.engine.cfg.clone());
    for change in &records {
        standby.apply(h.now, change).unwrap();
    }
    let mut restored = Engine::new(h.engine.cfg.clone());
    for change in h.engine.snapshot(100) {
        restored.apply(h.now, &change).unwrap();
    }
    for mut next in [standby, restored] {
        assert_eq!(next.sync_deadline_ms(), Some(new_deadline));
        next.set_wall_clock(new_deadline - 29 * DAY_MS + 1);
        let out = next.handle(h.now, Event::Tick { today: TODAY });
        assert!(sync_alerts(&out).is_empty(), "{out:?}");
        assert!(out.changes.is_empty());
        next.set_wall_clock(new_deadline - 10 * DAY_MS);
        let warned = sync_alerts(&next.handle(h.now, Event::Tick { today: TODAY }));
        assert_eq!(warned.len(), 1);
        assert!(warned[0].message.contains("within 14 days"), "{warned:?}");
    }
}

/// Steps: past the limit a sync restores registrations, and its time starts the next 60
/// days; a sync older than the last one recorded changes nothing.
#[test]
fn a_sync_restores_service_and_an_older_one_changes_nothing() {
    let (mut h, deadline) = offline_harness(0);
    h.hello("s1", None);
    at(&mut h, deadline + 10 * DAY_MS);
    assert_eq!(
        rejected_for(&h.decision("s1", "a1", "inbound")),
        Some(RejectReason::SyncOverdue)
    );
    let now_ms = deadline + 10 * DAY_MS;
    let out = h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: now_ms,
            sync: Uuid::nil(),
        },
    );
    assert_eq!(out.changes.len(), 2, "{:?}", out.changes);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert_eq!(h.engine.sync_deadline_ms(), Some(now_ms + 60 * DAY_MS));
    let older = h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: now_ms - 1,
            sync: Uuid::nil(),
        },
    );
    assert!(older.changes.is_empty() && older.effects.is_empty());
    assert_eq!(h.engine.sync_deadline_ms(), Some(now_ms + 60 * DAY_MS));
}

/// A reloaded license issued later starts the clock from its own issue day (a license
/// fresh from the vendor is contact with the vendor).
#[test]
fn the_clock_starts_at_the_issue_day_of_the_license_in_force() {
    let (h, deadline) = offline_harness(0);
    let mut later = h.engine.cfg.license.clone();
    later.issued = date!(2026 - 03 - 01);
    let mut engine = Engine::new(EngineConfig {
        license: later.clone(),
        ..h.engine.cfg.clone()
    });
    assert!(engine.sync_deadline_ms() > Some(deadline));
    engine.set_wall_clock(deadline + DAY_MS);
    assert!(!engine.sync_overdue());
    assert_eq!(
        engine.sync_deadline_ms(),
        Some(later.issued_unix_ms() + 60 * DAY_MS)
    );
}

/// A slave's hello past the limit keeps the seats the master knows and refuses the ones
/// it does not (`sync_overdue`): it logs those out.
#[test]
fn a_hello_past_the_limit_keeps_known_seats_and_refuses_new_ones() {
    let (mut h, deadline) = offline_harness(0);
    h.hello("s1", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    at(&mut h, deadline);
    let claims = vec![
        AgentClaim {
            agent_id: "a1".into(),
            agent_type: "inbound".into(),
        },
        AgentClaim {
            agent_id: "a9".into(),
            agent_type: "inbound".into(),
        },
    ];
    let out = h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(welcome)) = reply_of(&out) else {
        panic!("{out:?}")
    };
    assert_eq!(welcome.rejected_agents.len(), 1);
    assert_eq!(welcome.rejected_agents[0].agent_id, "a9");
    assert_eq!(welcome.rejected_agents[0].reason, RejectReason::SyncOverdue);
    assert_eq!(h.engine.seats()["s1"].len(), 1);
}

/// Allotment mode: the tick that passes the limit asks every slave holding a block to give
/// it back, and past it every allot answer takes the blocks back whatever the slave wants
/// (a slave that ignores the ask, or renews with the block it has, keeps nothing).
#[test]
fn allotment_blocks_are_taken_back_past_the_limit() {
    let (mut h, deadline) = offline_harness(0);
    h.engine.cfg.allot.admission = Admission::Allotment;
    h.hello("s1", None);
    let ask = |h: &mut Harness, want: u32| {
        let seq = h.next_seq();
        let instance = h.instances["s1"];
        let out = h.engine.handle(
            h.now,
            Event::Allot {
                slave: id("s1"),
                request: AllotRequest {
                    instance,
                    seq,
                    ops: vec![],
                    want: [("inbound".to_owned(), want)].into(),
                },
            },
        );
        match reply_of(&out) {
            Some(Reply::Allotment(a)) => a.blocks.get("inbound").copied().unwrap_or(0),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(ask(&mut h, 2), 2);
    at(&mut h, deadline);
    let out = tick(&mut h);
    assert!(out.effects.iter().any(|e| matches!(
        e,
        Effect::Control { slave, message: ControlMessage::ReturnAllotment } if slave.as_str() == "s1"
    )));
    assert_eq!(ask(&mut h, 3), 0, "a block kept or grown past the limit");
    assert_eq!(ask(&mut h, 2), 0);
    assert_eq!(h.engine.status(h.now).allotted_total, 0);
}

/// An exported request waits for its answer through a failover (replay and snapshot); the
/// `Synced` that answers it settles it, so the same answer cannot apply twice; at most
/// `MAX_EXPORTED` wait, the oldest dropped.
#[test]
fn exported_requests_wait_once_for_their_answer() {
    let (mut h, deadline) = offline_harness(0);
    let first = Uuid::new_v4();
    let out = h.engine.handle(h.now, Event::SyncExported { sync: first });
    assert_eq!(out.changes, vec![SeatChange::SyncExported { sync: first }]);
    assert!(h.engine.awaits_import(first));
    let mut standby = Engine::new(h.engine.cfg.clone());
    for change in &out.changes {
        standby.apply(h.now, change).unwrap();
    }
    let mut restored = Engine::new(h.engine.cfg.clone());
    for change in h.engine.snapshot(100) {
        restored.apply(h.now, &change).unwrap();
    }
    assert!(standby.awaits_import(first) && restored.awaits_import(first));
    at(&mut h, deadline + DAY_MS);
    let synced = h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: deadline + DAY_MS,
            sync: first,
        },
    );
    assert!(!h.engine.awaits_import(first));
    for change in &synced.changes {
        standby.apply(h.now, change).unwrap();
    }
    assert!(!standby.awaits_import(first));
    let oldest = Uuid::new_v4();
    h.engine.handle(h.now, Event::SyncExported { sync: oldest });
    for _ in 0..super::super::offline::MAX_EXPORTED {
        let sync = Uuid::new_v4();
        h.engine.handle(h.now, Event::SyncExported { sync });
    }
    assert!(!h.engine.awaits_import(oldest));
    assert_eq!(h.engine.exported.len(), super::super::offline::MAX_EXPORTED);
}

/// Steps: a day before the limit the wall clock is set back 40 days; a day later (by the
/// monotonic clock) the limit has passed all the same: refused `sync_overdue`.
#[test]
fn a_clock_set_back_while_running_gains_nothing() {
    let (mut h, deadline) = offline_harness(1);
    h.hello("s1", None);
    at(&mut h, deadline - DAY_MS);
    keep_out(tick(&mut h));
    h.now += Duration::from_millis(DAY_MS + 1);
    h.engine.set_wall_clock(deadline - 41 * DAY_MS);
    let overdue = sync_alerts(&tick(&mut h));
    assert!(
        overdue.iter().any(|a| a.severity == Severity::Critical),
        "{overdue:?}"
    );
    assert!(h.engine.sync_overdue());
}

/// A vendor answer timed after this leader's clock counts from the leader's clock.
#[test]
fn a_sync_counts_from_the_leaders_clock_when_that_is_earlier() {
    let (mut h, deadline) = offline_harness(1);
    let out = h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: deadline,
            sync: Uuid::nil(),
        },
    );
    let leader = h.engine.cfg.license.issued_unix_ms() + DAY_MS;
    assert_eq!(
        out.changes,
        vec![
            SeatChange::Synced {
                at_ms: leader,
                sync: Uuid::nil()
            },
            SeatChange::Clock {
                at_ms: leader,
                reset: true
            }
        ]
    );
}

/// Steps: a leader grants a seat a day before the limit; a new replica (a restart) replays
/// the ledger, its clock set back 40 days: a day later by its monotonic clock it refuses
/// new seats, counting from the latest grant's time.
#[test]
fn after_a_restart_the_clock_starts_from_the_ledgers_latest_grant() {
    let (mut h, deadline) = offline_harness(1);
    h.hello("s1", None);
    at(&mut h, deadline - DAY_MS);
    let out = h.register("s1", "a1", "inbound");
    assert!(approved(&decision_of(&out)));
    let mut restarted = Engine::new(h.engine.cfg.clone());
    for change in h.engine.snapshot(100) {
        restarted.apply(h.now, &change).unwrap();
    }
    restarted.set_wall_clock(deadline - 41 * DAY_MS);
    let later = h.now + Duration::from_millis(DAY_MS + 1);
    restarted.handle(later, Event::Tick { today: TODAY });
    assert!(restarted.sync_overdue());
}

/// Steps: the clock runs 100 days ahead by accident (the limit passes and is recorded),
/// then a sync over NATS answers with the vendor's real time: service is back and the
/// clock is real again (the next 60 days count from the vendor's time). An air-gapped
/// answer imported late, with the clock set back, moves the floor only up: the limit
/// still ends 60 days after the vendor's answer by the monotonic clock.
#[test]
fn a_sync_over_nats_heals_a_clock_that_ran_ahead_and_an_import_does_not_lower_it() {
    let (mut h, deadline) = offline_harness(10);
    h.hello("s1", None);
    let real = deadline - 30 * DAY_MS;
    at(&mut h, real + 100 * DAY_MS);
    keep_out(tick(&mut h));
    assert!(h.engine.sync_overdue());
    h.engine.set_wall_clock(real);
    keep_out(h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: real,
            sync: Uuid::new_v4(),
        },
    ));
    assert!(!h.engine.sync_overdue());
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert_eq!(h.engine.sync_deadline_ms(), Some(real + 60 * DAY_MS));

    // An export, then the clock set back 30 days and the answer imported 5 days late.
    let export = Uuid::new_v4();
    keep_out(h.engine.handle(h.now, Event::SyncExported { sync: export }));
    h.now += Duration::from_millis(5 * DAY_MS);
    h.engine.set_wall_clock(real - 25 * DAY_MS);
    keep_out(h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: real + 1,
            sync: export,
        },
    ));
    assert_eq!(h.engine.sync_deadline_ms(), Some(real + 1 + 60 * DAY_MS));
    // 56 days on by the monotonic clock (61 since the vendor answered), the raw clock
    // still 30 days behind: overdue.
    h.now += Duration::from_millis(56 * DAY_MS);
    h.engine.set_wall_clock(real + 31 * DAY_MS);
    keep_out(tick(&mut h));
    assert!(h.engine.sync_overdue());
}

fn keep_out(_: Output) {}

/// The installation's key is the first one recorded under its id (a later record, from
/// an older leader's gap filled, does not replace it), and a snapshot carries it.
#[test]
fn the_installation_key_is_kept_once_and_carried_by_snapshots() {
    let mut engine = Engine::new(config(true));
    let id = Uuid::new_v4();
    let now = Instant::now();
    engine
        .apply(now, &SeatChange::Installation { id, key: None })
        .unwrap();
    assert_eq!(engine.installation_key(), None);
    for key in ["first", "second"] {
        engine
            .apply(
                now,
                &SeatChange::Installation {
                    id: Uuid::new_v4(),
                    key: Some(key.to_owned()),
                },
            )
            .unwrap();
    }
    assert_eq!(
        (engine.installation(), engine.installation_key()),
        (Some(id), Some("first"))
    );
    let mut restored = Engine::new(config(true));
    for change in engine.snapshot(100) {
        restored.apply(now, &change).unwrap();
    }
    assert_eq!(
        (restored.installation(), restored.installation_key()),
        (Some(id), Some("first"))
    );
}

/// Steps: a seat is granted on day 1, then the leader's ticks run to day 11 (it records its
/// clock each hour, `Clock`); every replica stops, the clock is set back to day 1, and a
/// replica replays the ledger: 50 days later by its monotonic clock the limit (day 60) has
/// passed. Without the hourly record the floor would be the day-1 grant and 10 days gained.
#[test]
fn a_restart_after_an_idle_stretch_starts_from_the_last_clock_record() {
    let (mut h, deadline) = offline_harness(1);
    let mut records = Vec::new();
    records.extend(h.hello_with("s1", None, vec![]).changes);
    let out = h.register("s1", "a1", "inbound");
    records.extend(out.changes);
    let day1 = deadline - 59 * DAY_MS;
    for hour in 1..=240u64 {
        at(&mut h, day1 + hour * 3_600_000);
        records.extend(tick(&mut h).changes);
    }
    let marks = records
        .iter()
        .filter(|c| matches!(c, SeatChange::Clock { .. }))
        .count();
    assert!((239..=241).contains(&marks), "{marks} clock records");
    let mut restarted = Engine::new(h.engine.cfg.clone());
    for change in &records {
        restarted.apply(h.now, change).unwrap();
    }
    restarted.set_wall_clock(day1);
    let later = h.now + Duration::from_millis(50 * DAY_MS + 1);
    restarted.handle(later, Event::Tick { today: TODAY });
    assert!(restarted.sync_overdue());
}

/// Steps: the clock runs 100 days ahead by accident and the limit passes; a sync over NATS
/// at the real time heals it on the leader, and on a standby that replays every record (the
/// future-stamped ones included) and on an engine restored from that standby's snapshot:
/// neither is overdue at the real time.
#[test]
fn the_heal_of_a_sync_over_nats_reaches_every_replica_and_snapshots() {
    let (mut h, deadline) = offline_harness(10);
    let mut records = Vec::new();
    records.extend(h.hello_with("s1", None, vec![]).changes);
    let real = deadline - 30 * DAY_MS;
    at(&mut h, real + 100 * DAY_MS);
    records.extend(h.register("s1", "a1", "inbound").changes);
    records.extend(tick(&mut h).changes);
    assert!(h.engine.sync_overdue());
    h.engine.set_wall_clock(real);
    records.extend(
        h.engine
            .handle(
                h.now,
                Event::Synced {
                    at_ms: real,
                    sync: Uuid::new_v4(),
                },
            )
            .changes,
    );
    assert!(!h.engine.sync_overdue());
    let mut standby = Engine::new(h.engine.cfg.clone());
    for change in &records {
        standby.apply(h.now, change).unwrap();
    }
    let mut restored = Engine::new(h.engine.cfg.clone());
    for change in standby.snapshot(100) {
        restored.apply(h.now, &change).unwrap();
    }
    for mut next in [standby, restored] {
        next.set_wall_clock(real + DAY_MS);
        next.handle(h.now, Event::Tick { today: TODAY });
        assert!(!next.sync_overdue());
    }
}

/// Steps: a master license without an offline limit; slave s1 presents a slave license
/// that must sync within 60 days, s2 is unlicensed. At the limit s1's new registrations
/// are refused `sync_overdue` naming its license, its agent keeps its seat, s2 is served;
/// a standby that replayed the ledger refuses the same; the master's next vendor sync
/// serves s1 again (the master syncs for the whole installation).
#[test]
fn a_slave_licenses_own_offline_limit_stops_its_new_seats() {
    let mut h = Harness::new(true);
    let mut slave_license = license(Role::Slave, Limits::default());
    slave_license.sync_within_days = Some(60);
    let issued = slave_license.issued_unix_ms();
    let text = sign_license(&slave_license, &vendor()).unwrap();
    at(&mut h, issued + DAY_MS);
    let mut records = Vec::new();
    let out = h.hello_with("s1", Some(text), vec![]);
    assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))), "{out:?}");
    records.extend(out.changes);
    h.hello("s2", None);
    let out = h.register("s1", "a1", "inbound");
    assert!(approved(&decision_of(&out)));
    records.extend(out.changes);
    at(&mut h, issued + 60 * DAY_MS);
    let refused = decision_of(&h.register("s1", "a2", "inbound"));
    let Decision::Rejected { reason, detail, .. } = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(reason, RejectReason::SyncOverdue);
    assert!(detail.contains(&slave_license.id.to_string()), "{detail}");
    assert_eq!(h.engine.seats()["s1"].len(), 1, "a1 keeps its seat");
    assert!(approved(&h.decision("s2", "b1", "inbound")));

    let mut standby = Engine::new(h.engine.cfg.clone());
    for change in &records {
        standby.apply(h.now, change).unwrap();
    }
    standby.set_wall_clock(issued + 60 * DAY_MS);
    let out = standby.handle(
        h.now,
        Event::Register {
            slave: id("s1"),
            request: RegisterRequest {
                request_id: Uuid::new_v4(),
                seq: 1_000,
                agent_id: "a3".into(),
                agent_type: "inbound".into(),
            },
        },
    );
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::SyncOverdue)
    );

    h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: issued + 60 * DAY_MS,
            sync: Uuid::nil(),
        },
    );
    assert!(approved(&h.decision("s1", "a2", "inbound")));
}

/// Steps: a request is exported; before its answer is imported, a sync over NATS succeeds.
/// The late import moves no clock, but it settles its request (recorded, so a standby
/// knows too): importing the same answer again is refused as applied.
#[test]
fn a_late_import_is_settled_once() {
    let (mut h, deadline) = offline_harness(0);
    let exported = Uuid::new_v4();
    h.engine
        .handle(h.now, Event::SyncExported { sync: exported });
    at(&mut h, deadline - 10 * DAY_MS);
    h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: deadline - 10 * DAY_MS,
            sync: Uuid::new_v4(),
        },
    );
    let synced_deadline = h.engine.sync_deadline_ms();
    assert!(h.engine.awaits_import(exported));
    let late = h.engine.handle(
        h.now,
        Event::Synced {
            at_ms: deadline - 20 * DAY_MS,
            sync: exported,
        },
    );
    assert_eq!(
        late.changes,
        vec![SeatChange::Synced {
            at_ms: deadline - 20 * DAY_MS,
            sync: exported
        }]
    );
    assert!(!h.engine.awaits_import(exported));
    assert_eq!(
        h.engine.sync_deadline_ms(),
        synced_deadline,
        "no clock moved"
    );
    let mut restored = Engine::new(h.engine.cfg.clone());
    for change in h.engine.snapshot(100) {
        restored.apply(h.now, &change).unwrap();
    }
    assert!(!restored.awaits_import(exported));
    assert_eq!(restored.sync_deadline_ms(), synced_deadline);
}
