//! One process per slave id (a second instance is refused while the first is alive), and
//! how a slave leaves: its goodbye, being forgotten when silent with nothing held, and an
//! operator's `admin forget-slave`; each recorded so a replay forgets it too.

use super::*;

fn goodbye_of(h: &mut Harness, slave: &str, instance: Uuid) -> Output {
    h.engine.handle(
        h.now,
        Event::Goodbye {
            slave: id(slave),
            goodbye: lmbus_schemas::Goodbye {
                instance,
                reason: "stopped".into(),
            },
        },
    )
}

fn forget(h: &mut Harness, slave: &str) -> Output {
    h.engine.handle(
        h.now,
        Event::Forget {
            request: lmbus_schemas::ForgetRequest {
                slave_id: slave.into(),
                operator: "ops".into(),
            },
        },
    )
}

/// Every change in `outs`, applied to a fresh engine: what a standby would hold.
fn replayed(outs: &[&Output]) -> Engine {
    let mut standby = Engine::new(config(true));
    let now = Instant::now();
    for out in outs {
        for change in &out.changes {
            standby.apply(now, change).unwrap();
        }
    }
    standby
}

/// Steps: s1 holds two seats and heartbeats; a second process with the same id says hello
/// (another instance, claiming nothing): refused `slave_id_in_use` with a critical alert
/// naming both instances, the live one's seats untouched and nothing recorded; repeats
/// are alerted once per 10 s. Once the first has been silent past its limit (3 s) the new
/// instance is accepted as a restart and its reconcile releases what it no longer claims.
#[test]
fn a_second_process_with_a_live_id_is_refused_until_the_first_is_silent() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let first = h.instances["s1"];
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "inbound")));
    h.advance(Duration::from_millis(900));
    assert_eq!(h.heartbeat("s1"), Reply::Ack);

    let second = Uuid::new_v4();
    h.instances.insert("s1".into(), second);
    let out = h.hello_with("s1", None, vec![]);
    match reply_of(&out) {
        Some(Reply::Refused {
            reason: RejectReason::SlaveIdInUse,
            detail,
            retry_after_ms: Some(wait),
            ..
        }) => {
            assert!(detail.contains("in use by a live process"), "{detail}");
            assert_eq!(wait, 3001, "silent for 0 of its 3 s limit");
        }
        other => panic!("expected slave_id_in_use, got {other:?}"),
    }
    assert!(out.changes.is_empty(), "nothing recorded");
    let alert = &alerts(&out)[0];
    assert_eq!(alert.severity, Severity::Critical);
    assert_eq!(alert.reason, Some(RejectReason::SlaveIdInUse));
    assert!(
        alert.message.contains(&first.to_string()) && alert.message.contains(&second.to_string()),
        "{}",
        alert.message
    );
    assert_eq!(h.engine.total_in_use(), 2, "the live one keeps its seats");
    // The first goes on as before.
    h.instances.insert("s1".into(), first);
    assert_eq!(h.heartbeat("s1"), Reply::Ack);
    assert!(approved(&h.decision("s1", "a3", "inbound")));
    // Churn from the second is refused quietly.
    h.instances.insert("s1".into(), second);
    let again = h.hello_with("s1", None, vec![]);
    assert!(matches!(
        reply_of(&again),
        Some(Reply::Refused {
            reason: RejectReason::SlaveIdInUse,
            ..
        })
    ));
    assert!(alerts(&again).is_empty(), "at most one alert per 10 s");

    // The first dies (no more heartbeats): after its limit, the second is a restart.
    h.advance(Duration::from_millis(3100));
    let out = h.hello_with("s1", None, vec![]);
    assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))), "{out:?}");
    assert_eq!(h.engine.total_in_use(), 0, "the restart claims nothing");
}

/// Steps: s1 holds two seats and a block (allotment mode is not needed for the rule: a
/// goodbye empties both); a goodbye from another instance changes nothing; its own
/// goodbye releases everything, raises `slave_stopped`, records `Forget` and removes the
/// slave (a replay holds the same); a new process with the id is then welcomed at once.
#[test]
fn a_goodbye_releases_everything_and_forgets_the_slave() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    h.hello("s2", None);
    let first_hello = h.hello_with("s3", None, vec![]);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "inbound")));
    assert!(approved(&h.decision("s2", "b1", "inbound")));

    let stranger = goodbye_of(&mut h, "s1", Uuid::new_v4());
    assert!(matches!(
        reply_of(&stranger),
        Some(Reply::Refused {
            reason: RejectReason::SlaveNotConnected,
            ..
        })
    ));
    assert!(stranger.changes.is_empty());
    assert_eq!(h.engine.total_in_use(), 3);

    let instance = h.instances["s1"];
    let out = goodbye_of(&mut h, "s1", instance);
    assert_eq!(reply_of(&out), Some(Reply::Ack));
    assert_eq!(out.changes, [SeatChange::Forget { slave: "s1".into() }]);
    let alert = &alerts(&out)[0];
    assert_eq!(
        (alert.kind, alert.severity),
        (AlertKind::SlaveStopped, Severity::Info)
    );
    assert!(
        alert.message.contains("its 2 seats released"),
        "{}",
        alert.message
    );
    assert_eq!(h.engine.total_in_use(), 1, "s2's seat is untouched");
    assert_eq!(h.engine.slave_counts(), (2, 2), "s1 is gone");
    let standby = replayed(&[&first_hello, &out]);
    assert!(!standby.slaves.contains_key(&id("s1")));
    // A snapshot does not bring it back.
    assert!(
        !h.engine
            .snapshot(100)
            .iter()
            .any(|c| matches!(c, SeatChange::Session { slave, .. } if slave == "s1"))
    );
    // Restarted at once: no wait for the old instance's silence.
    h.restart("s1");
    let out = h.hello_with("s1", None, vec![]);
    assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))));
}

/// Steps: a slave with no seats goes silent: disconnected after 3 s (its alert says when
/// it is forgotten), forgotten after `forget_after` (1 h) with `slave_forgotten` and a
/// `Forget` record; a silent slave that still holds a seat it keeps after its grace is
/// never forgotten.
#[test]
fn a_silent_slave_with_nothing_is_forgotten_after_the_documented_time() {
    let mut h = Harness::new(true);
    h.hello("gone", None);
    let keeper = Uuid::new_v4();
    h.engine.handle(
        h.now,
        Event::Hello {
            slave: id("keeper"),
            hello: Hello {
                instance: keeper,
                heartbeat_interval_ms: 1000,
                seq: 1,
                grace_ms: 60_000,
                logout_after_grace: false,
                request_timeout_ms: 2000,
                ..Default::default()
            },
            today: TODAY,
        },
    );
    h.instances.insert("keeper".into(), keeper);
    assert!(approved(&h.decision("keeper", "k1", "inbound")));
    h.advance(Duration::from_secs(5));
    h.tick();
    h.advance(Duration::from_secs(3590));
    let out = h.engine.handle(h.now, Event::Tick { today: TODAY });
    assert!(
        !out.changes
            .iter()
            .any(|c| matches!(c, SeatChange::Forget { .. })),
        "not before the hour"
    );
    h.advance(Duration::from_secs(10));
    let out = h.engine.handle(h.now, Event::Tick { today: TODAY });
    assert_eq!(
        out.changes,
        [SeatChange::Forget {
            slave: "gone".into()
        }]
    );
    let forgotten: Vec<_> = alerts(&out)
        .into_iter()
        .filter(|a| a.kind == AlertKind::SlaveForgotten)
        .collect();
    assert_eq!(forgotten.len(), 1);
    assert!(
        forgotten[0]
            .message
            .contains("silent for 60 min 5 s with no seats"),
        "{}",
        forgotten[0].message
    );
    assert_eq!(h.engine.slave_counts(), (0, 1), "only the keeper is left");
    assert_eq!(h.engine.total_in_use(), 1);
}

/// Steps: a slave with no seats and one with a seat, then a new leader (silence clocks
/// restarted) that never hears from either: the one holding a seat gets its
/// `slave_disconnected` (its seat's fate matters), the empty one goes quiet without a
/// second alert, and is still forgotten after `forget_after`.
#[test]
fn a_new_leader_does_not_repeat_the_disconnect_of_a_slave_that_holds_nothing() {
    let mut h = Harness::new(true);
    h.hello("ghost", None);
    h.hello("holder", None);
    assert!(approved(&h.decision("holder", "a1", "inbound")));
    h.engine.restart_silence_clocks(h.now);
    h.advance(Duration::from_secs(4));
    let lost: Vec<Option<String>> = h
        .tick()
        .into_iter()
        .filter(|a| a.kind == AlertKind::SlaveDisconnected)
        .map(|a| a.slave)
        .collect();
    assert_eq!(lost, [Some("holder".to_owned())]);
    assert_eq!(h.engine.slave_counts(), (0, 2));
    h.advance(Duration::from_secs(3600));
    let out = h.engine.handle(h.now, Event::Tick { today: TODAY });
    assert!(
        out.changes.contains(&SeatChange::Forget {
            slave: "ghost".into()
        }),
        "{:?}",
        out.changes
    );
}

/// Steps: `admin forget-slave` of a connected slave is refused; of an unknown one too;
/// once the slave is silent, it is forgotten with its seat released (a warning, since a
/// seat went), and a replay of the records holds no trace of it.
#[test]
fn an_operator_forgets_a_slave_that_is_not_connected() {
    let mut h = Harness::new(true);
    let hello = h.hello_with("s1", None, vec![]);
    let grant = h.register("s1", "a1", "inbound");
    let refused = forget(&mut h, "s1");
    match &refused.reply {
        Some(Answer::Forget(lmbus_schemas::ForgetReply::Error { message })) => {
            assert!(message.contains("is connected"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        forget(&mut h, "nobody").reply,
        Some(Answer::Forget(lmbus_schemas::ForgetReply::Error { .. }))
    ));
    h.advance(Duration::from_secs(4));
    h.tick();
    let out = forget(&mut h, "s1");
    match &out.reply {
        Some(Answer::Forget(lmbus_schemas::ForgetReply::Forgotten { message })) => {
            assert!(
                message.contains("ops forgot slave s1: its 1 seat released"),
                "{message}"
            )
        }
        other => panic!("expected forgotten, got {other:?}"),
    }
    assert_eq!(alerts(&out)[0].severity, Severity::Warning);
    assert_eq!(h.engine.total_in_use(), 0);
    let standby = replayed(&[&hello, &grant, &out]);
    assert_eq!(standby.total_in_use(), 0);
    assert_eq!(standby.slave_counts(), (0, 0));
}
