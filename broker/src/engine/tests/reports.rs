//! Bad input and slaves' reports: alerts, and an error reply where one is due.

use super::*;

#[test]
fn bad_input_gets_an_error_reply_and_an_alert() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let out = h.engine.handle(
        h.now,
        Event::BadMessage {
            subject: "lmbus.v1.c.slave.s1.register".into(),
            slave: Some(id("s1")),
            error: WireError {
                code: ErrorCode::Malformed,
                message: "garbage".into(),
            },
        },
    );
    assert!(matches!(reply_of(&out), Some(Reply::Error(_))));
    assert_eq!(alerts(&out)[0].kind, AlertKind::BadMessage);

    for (agent, t) in [("", "inbound"), ("a", "in bound"), ("a\u{0}", "inbound")] {
        let out = h.register("s1", agent, t);
        assert!(
            matches!(
                reply_of(&out),
                Some(Reply::Error(WireError {
                    code: ErrorCode::Invalid,
                    ..
                }))
            ),
            "{agent:?} {t:?}"
        );
        assert_eq!(alerts(&out)[0].kind, AlertKind::BadMessage);
    }
    assert_eq!(h.engine.total_in_use(), 0);
}

#[test]
fn local_rejection_reports_become_alerts() {
    let mut h = Harness::new(true);
    let out = h.engine.handle(
        h.now,
        Event::Report {
            slave: id("s9"),
            report: SlaveReport {
                event: SlaveEvent::LocalRejection {
                    agent_id: "a".into(),
                    agent_type: "inbound".into(),
                    reason: RejectReason::LocalLimit,
                },
                message: "local limit 2 reached".into(),
            },
        },
    );
    let a = alerts(&out);
    assert_eq!(a[0].kind, AlertKind::RegistrationRejected);
    assert_eq!(a[0].reason, Some(RejectReason::LocalLimit));
    assert_eq!(a[0].source, "slave:s9");
}
