//! The offline limit (`sync_within_days`) over a real nats-server: the warnings as the
//! wall clock jumps towards the limit, the refusal past it, what status and metrics say,
//! and a failover that keeps the clock and does not repeat the warnings; the broker binary
//! with the test-only `--fault-clock-skew-days`.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::process::{Command, Stdio};
use std::time::Duration;

use lmbus_broker::config::WallClock;
use lmbus_broker::engine::DAY_MS;
use lmbus_schemas::{AlertKind, Limits, RejectReason, Role, Severity};
use lmbus_slave::{Outcome, SlaveAgent};
use lmbus_tests::*;

/// A master license of 5 seats, issued today, that must sync within 60 days; the deadline
/// (Unix milliseconds) with it.
fn synced_master(vendor: &Vendor) -> (std::path::PathBuf, u64) {
    let mut license = Vendor::license(
        Role::Master,
        Limits {
            total: Some(5),
            ..Limits::default()
        },
    );
    license.issued = time::OffsetDateTime::now_utc().date();
    license.sync_within_days = Some(60);
    let deadline = license.issued_unix_ms() + 60 * DAY_MS;
    (
        vendor.write("synced-master.lic", &license).unwrap(),
        deadline,
    )
}

/// Moves `clock` forward to `target` (Unix milliseconds).
fn jump_to(clock: &WallClock, target: u64) {
    let now = clock.unix_ms();
    assert!(target > now, "the clock only moves forward in this test");
    clock.jump(Duration::from_millis(target - now));
}

/// `GET http://127.0.0.1:{port}/metrics`.
async fn metrics_text(port: u16) -> String {
    tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Steps: broker b1 (in process, on a real nats-server, its wall clock shared with the
/// test) with a license issued today that must sync within 60 days; a slave registers a1.
/// The clock jumps to 30, 14, 7 and 1 days before the limit: one `sync_due` warning each,
/// naming the days left. It jumps past the limit: a critical `sync_due`; a2 is refused
/// `sync_overdue` with a `registration_rejected` alert; a1 keeps its seat; status says
/// overdue with the deadline; the metrics show the deadline and `lmbus_license_sync_overdue
/// 1`. b1 stops and b2 (same clock) takes over from the ledger: no `sync_due` alert again,
/// a3 is still refused `sync_overdue`, a1 still holds its seat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_limit_warns_refuses_and_survives_a_failover() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let (license, deadline) = synced_master(&f.vendor);
    let clock = WallClock::default();
    let metrics_port = free_port();
    let mut cfg = broker_config(&f.nats, &f.cluster, license, &f.vendor, true);
    cfg.broker_id = "b1".into();
    cfg.wall_clock = clock.clone();
    cfg.metrics = Some(([127, 0, 0, 1], metrics_port).into());
    let b1 = Broker::start(cfg.clone()).await.unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    let sync = f.status().await.unwrap().license.sync.unwrap();
    assert_eq!((sync.deadline_ms, sync.last_sync_ms), (deadline, 0));
    assert!(!sync.overdue);

    for days in [30u64, 14, 7, 1] {
        jump_to(&clock, deadline - days * DAY_MS + 60_000);
        let words = if days == 1 {
            "within 1 day:".to_owned()
        } else {
            format!("within {days} days:")
        };
        let warned = alerts
            .wait_for(&format!("sync_due {days}"), |a| {
                a.kind == AlertKind::SyncDue && a.message.contains(&words)
            })
            .await
            .unwrap();
        assert_eq!(warned.severity, Severity::Warning);
    }
    jump_to(&clock, deadline + 60_000);
    let overdue = alerts
        .wait_for("sync_due critical", |a| {
            a.kind == AlertKind::SyncDue && a.severity == Severity::Critical
        })
        .await
        .unwrap();
    assert!(
        overdue.message.contains("no new seats are granted"),
        "{}",
        overdue.message
    );
    match slave.register("a2", "inbound").await.unwrap() {
        Outcome::Rejected { reason, detail } => {
            assert_eq!(reason, RejectReason::SyncOverdue);
            assert!(detail.contains("offline limit of 60 days"), "{detail}");
        }
        other => panic!("a2 past the limit: {other:?}"),
    }
    alerts
        .wait_for("registration_rejected sync_overdue", |a| {
            a.kind == AlertKind::RegistrationRejected && a.reason == Some(RejectReason::SyncOverdue)
        })
        .await
        .unwrap();
    let st = f.status().await.unwrap();
    assert_eq!(st.total_in_use, 1);
    let sync = st.license.sync.unwrap();
    assert!(sync.overdue && sync.deadline_ms == deadline, "{sync:?}");
    eventually("the overdue gauge", || async {
        metrics_text(metrics_port)
            .await
            .contains("\nlmbus_license_sync_overdue 1\n")
    })
    .await
    .unwrap();
    let text = metrics_text(metrics_port).await;
    assert!(
        text.contains(&format!(
            "\nlmbus_license_sync_deadline_timestamp_seconds {}\n",
            deadline / 1000
        )),
        "{text}"
    );
    let sync_alerts = |seen: &[lmbus_schemas::Alert]| {
        seen.iter().filter(|a| a.kind == AlertKind::SyncDue).count()
    };
    assert_eq!(sync_alerts(&alerts.seen), 5, "{:#?}", alerts.seen);

    b1.stop().await.unwrap();
    let mut cfg2 = cfg.clone();
    cfg2.broker_id = "b2".into();
    cfg2.metrics = None;
    let b2 = Broker::start(cfg2).await.unwrap();
    alerts
        .wait_for("b2 leads", |a| {
            a.kind == AlertKind::LeaderElected && a.source == "b2"
        })
        .await
        .unwrap();
    // Ten of b2's ticks at least.
    tokio::time::sleep(Duration::from_secs(1)).await;
    match slave.register("a3", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::SyncOverdue),
        other => panic!("a3 after the failover: {other:?}"),
    }
    let st = f.status().await.unwrap();
    assert_eq!(st.broker_id, "b2");
    assert_eq!(st.total_in_use, 1);
    assert!(st.license.sync.unwrap().overdue);
    alerts
        .wait_for("b2's rejection", |a| {
            a.source == "b2" && a.reason == Some(RejectReason::SyncOverdue)
        })
        .await
        .unwrap();
    assert_eq!(
        sync_alerts(&alerts.seen),
        5,
        "a new leader repeated the warnings: {:#?}",
        alerts.seen
    );
    slave.shutdown().await;
    b2.stop().await.unwrap();
}

/// Steps: the `lmbus-broker` binary with the hidden `--fault-clock-skew-days 61` and a
/// license issued today that must sync within 60 days: it starts past the limit; a slave's
/// registration is refused `sync_overdue`; `admin status` says OVERDUE in text and
/// `"overdue":true` in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_binary_takes_a_skewed_clock_for_tests() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let (license, _) = synced_master(&f.vendor);
    let _broker = Proc::spawn(
        Command::new(bin("lmbus-broker").unwrap())
            .args(["run", "--nats", &f.nats.url(), "--cluster", &f.cluster])
            .arg("--license")
            .arg(&license)
            .arg("--vendor-key")
            .arg(f.vendor.public_key_path())
            .args(["--allow-unlicensed-slaves", "--tick-interval", "100ms"])
            .args(["--fault-clock-skew-days", "61"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    alerts
        .wait_for("sync_due critical", |a| {
            a.kind == AlertKind::SyncDue && a.severity == Severity::Critical
        })
        .await
        .unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    match slave.register("a1", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::SyncOverdue),
        other => panic!("a1 past the limit: {other:?}"),
    }
    let admin = |json: bool| {
        let mut cmd = Command::new(bin("lmbus-broker").unwrap());
        cmd.args([
            "admin",
            "status",
            "--nats",
            &f.nats.url(),
            "--cluster",
            &f.cluster,
        ]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = tokio::task::block_in_place(|| admin(false));
    assert!(
        text.contains("vendor sync: within 60 days, last never")
            && text.contains("OVERDUE: no new seats until a vendor sync succeeds"),
        "{text}"
    );
    let json = tokio::task::block_in_place(|| admin(true));
    assert!(json.contains("\"overdue\": true"), "{json}");
    slave.shutdown().await;
}
