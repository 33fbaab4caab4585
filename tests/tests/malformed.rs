//! Hostile and broken input: every inbound subject gets an error reply and a
//! `bad_message` alert for every kind of malformed payload, and the broker keeps serving.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use lmbus_schemas::{
    AlertKind, ErrorCode, Heartbeat, MAX_MESSAGE_BYTES, Reply, SlaveId, SlaveOp, Subjects, decode,
    encode,
};
use lmbus_slave::SlaveAgent;
use lmbus_tests::*;
use serde::Serialize;

#[derive(Serialize)]
struct FutureEnvelope {
    v: u16,
    body: u8,
}

/// Steps: start a broker; for each slave operation subject (and an unknown operation),
/// send an empty payload, garbage, a truncated message, a message of the wrong type, an
/// unknown envelope version and an oversized payload as a request from slave "evil" (its
/// replies in its own inbox, paced within the budget of error replies); each gets a
/// `Reply::Error` with the matching code. The `bad_message` alerts name the slave and count
/// the messages instead of echoing each one (at most one per slave every 10 s). Afterwards
/// a real slave registers an agent normally.
#[tokio::test]
async fn malformed_messages_get_error_replies_and_alerts() {
    let f = Fixture::new().await.unwrap();
    let cluster = &f.cluster;
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(5, &[], true).await.unwrap();
    let subjects = Subjects::new(cluster).unwrap();
    let evil = SlaveId::new("evil").unwrap();
    let client = &async_nats::ConnectOptions::new()
        .custom_inbox_prefix(subjects.slave_inbox_prefix(&evil))
        .connect(f.nats.url())
        .await
        .unwrap();

    let valid = encode(&lmbus_schemas::RegisterRequest {
        request_id: uuid::Uuid::new_v4(),
        seq: 1,
        agent_id: "agent-with-a-long-name".into(),
        agent_type: "inbound".into(),
    })
    .unwrap();
    let wrong_type = encode(&Heartbeat {
        instance: uuid::Uuid::new_v4(),
        seq: 1,
        agents: 0,
        master: None,
        ..Default::default()
    })
    .unwrap();
    let future = rmp_serde::to_vec_named(&FutureEnvelope { v: 99, body: 1 }).unwrap();
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("empty", vec![], ErrorCode::Malformed),
        (
            "garbage",
            b"\xc1\xff not msgpack".to_vec(),
            ErrorCode::Malformed,
        ),
        (
            "truncated",
            valid[..valid.len() / 2].to_vec(),
            ErrorCode::Malformed,
        ),
        ("unknown version", future, ErrorCode::UnsupportedVersion),
        (
            "huge",
            vec![0x90; MAX_MESSAGE_BYTES + 10],
            ErrorCode::TooLarge,
        ),
    ];
    let mut expected_alerts = 0;
    for op in SlaveOp::ALL {
        let subject = subjects.slave_op(&evil, op);
        let mut op_cases = cases.clone();
        match op {
            SlaveOp::Heartbeat => {}
            // A heartbeat's fields (instance, seq) are an allot request's required ones:
            // it decodes, and this strict master refuses it as such.
            SlaveOp::Allot => op_cases.push(("wrong type", wrong_type.clone(), ErrorCode::Invalid)),
            // A heartbeat holds a goodbye's one required field (instance): it decodes as a
            // goodbye from no live session, refused `slave_not_connected` (attacks.rs).
            SlaveOp::Goodbye => {}
            _ => op_cases.push(("wrong type", wrong_type.clone(), ErrorCode::Malformed)),
        }
        for (name, payload, code) in op_cases {
            // The broker answers at most 5 bad messages a second per slave (bursts of 10).
            if expected_alerts % 4 == 3 {
                tokio::time::sleep(std::time::Duration::from_millis(800)).await;
            }
            let msg = tokio::time::timeout(WAIT, client.request(subject.clone(), payload.into()))
                .await
                .unwrap_or_else(|_| panic!("{name} on {subject}: no reply"))
                .unwrap();
            match decode::<Reply>(&msg.payload).unwrap() {
                Reply::Error(e) => assert_eq!(e.code, code, "{name} on {subject}: {e}"),
                other => panic!("{name} on {subject}: expected an error, got {other:?}"),
            }
            expected_alerts += 1;
        }
    }
    // An operation that does not exist, and one with a token more than any operation (the
    // master subscribes to `slave.>`, so it hears those too).
    for subject in [
        format!("lmbus.v1.{cluster}.slave.evil.dance"),
        format!("lmbus.v1.{cluster}.slave.evil.register.twice"),
    ] {
        let msg = tokio::time::timeout(WAIT, client.request(subject.clone(), "x".into()))
            .await
            .unwrap_or_else(|_| panic!("{subject}: no reply"))
            .unwrap();
        assert!(
            matches!(decode::<Reply>(&msg.payload).unwrap(), Reply::Error(_)),
            "{subject}"
        );
        expected_alerts += 1;
    }

    let bad = alerts
        .wait_for("bad_message", |a| a.kind == AlertKind::BadMessage)
        .await
        .unwrap();
    assert_eq!(bad.slave.as_deref(), Some("evil"));
    assert!(bad.message.contains("bad messages"), "{}", bad.message);
    let about_evil = alerts
        .seen
        .iter()
        .filter(|a| a.slave.as_deref() == Some("evil"))
        .count();
    assert!(
        about_evil <= 3,
        "{expected_alerts} bad messages made {about_evil} alerts: {:#?}",
        alerts.seen
    );

    // Still serving.
    let mut cfg = f.slave_config("good").unwrap();
    cfg.request_timeout = std::time::Duration::from_secs(5);
    let good = SlaveAgent::start(cfg).await.unwrap();
    assert!(good.register("a1", "inbound").await.unwrap().is_approved());
    good.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: a real slave registers an agent while a tap (with the rights of an eavesdropper
/// on the slave's subjects) captures the request's bytes; the slave unregisters it; the
/// captured request is sent again, as is. The broker refuses it `replayed` with an alert
/// naming the slave, no seat is taken, and the slave's next registration is approved.
#[tokio::test]
async fn a_captured_registration_replayed_after_release_takes_no_seat() {
    use futures::StreamExt as _;
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(5, &[], true).await.unwrap();
    let subjects = Subjects::new(&f.cluster).unwrap();
    let site = SlaveId::new("site1").unwrap();
    let mut tap = f
        .client
        .subscribe(subjects.slave_op(&site, SlaveOp::Register))
        .await
        .unwrap();
    f.client.flush().await.unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    let captured = tokio::time::timeout(WAIT, tap.next())
        .await
        .unwrap()
        .unwrap()
        .payload;
    assert!(slave.unregister("a1").await.unwrap());
    f.wait_in_use(0).await.unwrap();

    // Sent from the site's own inbox, as the site's credentials would have to.
    let replayer = async_nats::ConnectOptions::new()
        .custom_inbox_prefix(subjects.slave_inbox_prefix(&site))
        .connect(f.nats.url())
        .await
        .unwrap();
    let answer = replayer
        .request(subjects.slave_op(&site, SlaveOp::Register), captured)
        .await
        .unwrap();
    match decode::<Reply>(&answer.payload).unwrap() {
        Reply::Decision(lmbus_schemas::Decision::Rejected { reason, detail, .. }) => {
            assert_eq!(reason, lmbus_schemas::RejectReason::Replayed, "{detail}");
        }
        other => panic!("expected a replayed rejection, got {other:?}"),
    }
    let alert = alerts
        .wait_for("replayed", |a| {
            a.reason == Some(lmbus_schemas::RejectReason::Replayed)
        })
        .await
        .unwrap();
    assert_eq!(alert.slave.as_deref(), Some("site1"));
    assert_eq!(f.status().await.unwrap().total_in_use, 0);
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    f.wait_in_use(1).await.unwrap();
    slave.shutdown().await;
    broker.stop().await.unwrap();
}
