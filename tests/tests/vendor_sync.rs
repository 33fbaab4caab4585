//! Vendor sync over a real nats-server: `lmbus-vendor serve` answers, `lmbus-broker admin
//! sync now` takes the vendor's license in and restarts the offline limit's clock, kept
//! across a failover; answers that are not the vendor's, or not for this sync, change
//! nothing.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use futures::StreamExt as _;
use lmbus_broker::config::WallClock;
use lmbus_broker::engine::DAY_MS;
use lmbus_schemas::{
    AlertKind, License, Limits, RejectReason, Role, Severity, Subjects, SyncAnswer, SyncRequest,
    decode, encode,
};
use lmbus_slave::{Outcome, SlaveAgent};
use lmbus_tests::*;

/// A master license of `total` seats, issued today, to sync within 60 days.
fn synced_master(total: u32) -> License {
    let mut license = Vendor::license(
        Role::Master,
        Limits {
            total: Some(total),
            ..Limits::default()
        },
    );
    license.issued = time::OffsetDateTime::now_utc().date();
    license.sync_within_days = Some(60);
    license
}

/// `lmbus-broker admin sync now` against the fixture's cluster, run on the blocking pool
/// (the test may answer as the vendor meanwhile).
async fn sync_now(f: &Fixture) -> Output {
    let mut cmd = Command::new(bin("lmbus-broker").unwrap());
    cmd.args(["admin", "sync", "now", "--nats", &f.nats.url()])
        .args(["--cluster", &f.cluster, "--operator", "test-ops"]);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// A broker of the fixture with `license`, its wall clock shared with the test.
async fn broker(f: &Fixture, license: &License, id: &str, clock: &WallClock) -> Broker {
    let path = f
        .vendor
        .write(&format!("master-{id}.lic"), license)
        .unwrap();
    let mut cfg = broker_config(&f.nats, &f.cluster, path, &f.vendor, true);
    cfg.broker_id = id.into();
    cfg.wall_clock = clock.clone();
    Broker::start(cfg).await.unwrap()
}

/// How far ahead the vendor's clock runs in these tests: they jump the brokers' wall clock
/// up to 61 days, and a leader records a sync at the vendor's answer time when that is
/// earlier than its own clock.
const VENDOR_AHEAD_DAYS: &str = "61";

/// `lmbus-vendor`, its clock [`VENDOR_AHEAD_DAYS`] ahead.
fn vendor_command() -> Command {
    let mut cmd = Command::new(bin("lmbus-vendor").unwrap());
    cmd.env("LMBUS_VENDOR_FAULT_CLOCK_AHEAD_DAYS", VENDOR_AHEAD_DAYS);
    cmd
}

/// Puts `license` in a fresh vendor store and runs `lmbus-vendor serve` on the fixture's
/// NATS until it answers; the store and the process.
async fn vendor_serving(f: &Fixture, license: &License) -> (tempfile::TempDir, Proc) {
    vendor_serving_ahead(f, license, VENDOR_AHEAD_DAYS).await
}

/// [`vendor_serving`] with the vendor's clock `ahead_days` ahead.
async fn vendor_serving_ahead(
    f: &Fixture,
    license: &License,
    ahead_days: &str,
) -> (tempfile::TempDir, Proc) {
    let store = tempfile::tempdir().unwrap();
    let file = f.vendor.write("stored.lic", license).unwrap();
    let stored = vendor_command()
        .arg("store")
        .arg(&file)
        .arg("--key")
        .arg(f.vendor.secret_key_path().unwrap())
        .arg("--store")
        .arg(store.path())
        .output()
        .unwrap();
    assert!(
        stored.status.success(),
        "{}",
        String::from_utf8_lossy(&stored.stderr)
    );
    let vendor = Proc::spawn(
        vendor_command()
            .env("LMBUS_VENDOR_FAULT_CLOCK_AHEAD_DAYS", ahead_days)
            .args(["serve", "--nats", &f.nats.url()])
            .arg("--key")
            .arg(f.vendor.secret_key_path().unwrap())
            .arg("--store")
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    // Up once it answers a request.
    eventually("lmbus-vendor answers", || async {
        let probe = SyncRequest {
            sync: uuid::Uuid::new_v4(),
            license: uuid::Uuid::new_v4(),
            cluster: "probe".into(),
            installation: uuid::Uuid::nil(),
            summary: None,
            signed: None,
        };
        tokio::time::timeout(
            Duration::from_millis(500),
            f.client
                .request(Subjects::vendor_sync(), encode(&probe).unwrap().into()),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    })
    .await
    .unwrap();
    (store, vendor)
}

/// Steps: the vendor (its clock true) serves the customer's license; broker b1's clock runs
/// 100 days ahead, past the offline limit, as a customer might set it to buy time. `admin
/// sync now` succeeds, but the sync is recorded at the vendor's time: status still says
/// overdue, the last sync is not later than the true time, a registration is still refused
/// `sync_overdue`, and the `vendor_sync` alert says the leader's clock is ahead. Catches: a
/// sync recorded at the leader's own clock, which a clock set ahead pushes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_clock_set_ahead_buys_no_time() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let license = synced_master(5);
    let (_store, _vendor) = vendor_serving_ahead(&f, &license, "0").await;
    let clock = WallClock::default();
    clock.jump(Duration::from_millis(100 * DAY_MS));
    let _b1 = broker(&f, &license, "b1", &clock).await;
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    let out = sync_now(&f).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let synced = alerts
        .wait_for("vendor_sync", |a| a.kind == AlertKind::VendorSync)
        .await
        .unwrap();
    assert!(
        synced.message.contains("ahead of the vendor's answer"),
        "{}",
        synced.message
    );
    let true_now = time::OffsetDateTime::now_utc().unix_timestamp() as u64 * 1000;
    let sync = f.status().await.unwrap().license.sync.unwrap();
    assert!(
        sync.last_sync_ms <= true_now + 60_000 && sync.overdue,
        "{sync:?} (true time {true_now})"
    );
    match slave.register("a1", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::SyncOverdue),
        other => panic!("a registration after a sync from a clock set ahead: {other:?}"),
    }
    slave.shutdown().await;
}

/// Steps: the vendor stores a purchase for the customer's license (5 seats → 8) and runs
/// `lmbus-vendor serve`; broker b1 runs with the 5-seat license. The clock jumps past the
/// offline limit: a registration is refused `sync_overdue`. `admin sync now` succeeds: the
/// limit is 8, the maintenance date the purchase's, the last sync recorded, not overdue, a
/// `vendor_sync` info alert, and the registration is approved; the vendor logged the sync.
/// b1 stops, b2 (the same clock, started with the old 5-seat file) takes over from the
/// ledger: 8 seats, the same last sync, not overdue. The vendor then removes seats (2):
/// the next sync lowers the limit below the 3 in use, nobody is logged out, a new
/// registration is refused `aggregate_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_brings_the_purchase_and_restarts_the_offline_clock() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let license = synced_master(5);
    let mut purchase = license.clone();
    purchase.limits.total = Some(8);
    purchase.maintenance_expires = time::macros::date!(2098 - 06 - 30);
    let (store, _vendor) = vendor_serving(&f, &purchase).await;
    let clock = WallClock::default();
    let b1 = broker(&f, &license, "b1", &clock).await;
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    clock.jump(Duration::from_millis(61 * DAY_MS));
    match slave.register("a2", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::SyncOverdue),
        other => panic!("a2 past the limit: {other:?}"),
    }

    let out = sync_now(&f).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("succeeded") && stdout.contains("total limit 5 -> 8"),
        "{stdout}"
    );
    let synced = alerts
        .wait_for("vendor_sync", |a| a.kind == AlertKind::VendorSync)
        .await
        .unwrap();
    assert_eq!(synced.severity, Severity::Info, "{}", synced.message);
    let st = f.status().await.unwrap();
    assert_eq!(st.total_limit, 8);
    assert_eq!(st.license.maintenance_expires, "2098-06-30");
    let sync = st.license.sync.unwrap();
    assert!(!sync.overdue && sync.last_sync_ms > 0, "{sync:?}");
    assert_eq!(sync.deadline_ms, sync.last_sync_ms + 60 * DAY_MS);
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());
    let log = std::fs::read_to_string(store.path().join("syncs.jsonl")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(&license.id.to_string()) && l.contains("\"answered\"")),
        "{log}"
    );

    b1.stop().await.unwrap();
    let b2 = broker(&f, &license, "b2", &clock).await;
    eventually("b2 leads", || async {
        f.status().await.is_ok_and(|st| st.broker_id == "b2")
    })
    .await
    .unwrap();
    let st = f.status().await.unwrap();
    assert_eq!((st.total_limit, st.total_in_use), (8, 2));
    let after = st.license.sync.unwrap();
    assert_eq!(after.last_sync_ms, sync.last_sync_ms);
    assert!(!after.overdue);
    assert!(slave.register("a3", "inbound").await.unwrap().is_approved());

    // Seats removed at the vendor: the next sync lowers the limit below use; nobody is
    // logged out, new registrations wait until use is below it.
    let mut removal = purchase.clone();
    removal.limits.total = Some(2);
    let text = std::fs::read_to_string(f.vendor.write("removal.lic", &removal).unwrap()).unwrap();
    std::fs::write(
        store
            .path()
            .join("licenses")
            .join(format!("{}.lic", license.id)),
        text,
    )
    .unwrap();
    let out = sync_now(&f).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("total limit 8 -> 2"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = f.status().await.unwrap();
    assert_eq!((st.total_limit, st.total_in_use), (2, 3));
    match slave.register("a4", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::AggregateLimit),
        other => panic!("a4 above a lowered limit: {other:?}"),
    }
    slave.shutdown().await;
    b2.stop().await.unwrap();
}

/// Steps: no vendor; the test answers on the vendor's subject itself, each request in
/// turn: signed by another key, a right signature for another sync's id, a body with one
/// byte changed. Each `admin sync now` fails saying why, with a `vendor_sync` warning, and
/// nothing changes: limit 5, no sync recorded, still overdue. Finally the vendor's own
/// answer: the sync succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_not_from_the_vendor_or_for_another_sync_change_nothing() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let license = synced_master(5);
    let mut purchase = license.clone();
    purchase.limits.total = Some(8);
    let text = std::fs::read_to_string(f.vendor.write("p.lic", &purchase).unwrap()).unwrap();
    let other = Vendor::new().unwrap();
    let mut requests = f.client.subscribe(Subjects::vendor_sync()).await.unwrap();
    f.client.flush().await.unwrap();
    let clock = WallClock::default();
    clock.jump(Duration::from_millis(61 * DAY_MS));
    let _b1 = broker(&f, &license, "b1", &clock).await;

    let cases: [(&str, &str); 4] = [
        ("foreign key", "not signed by the vendor key"),
        ("other sync", "not for this one"),
        ("changed byte", "not signed by the vendor key"),
        ("vendor", ""),
    ];
    for (case, error) in cases {
        let client = f.client.clone();
        let next = requests.next();
        let (vendor, other, text) = (&f.vendor, &other, text.clone());
        let answering = async move {
            let msg = tokio::time::timeout(WAIT, next).await.unwrap().unwrap();
            let request: SyncRequest = decode(&msg.payload).unwrap();
            let mut answer = SyncAnswer {
                sync: request.sync,
                at_ms: clock_now_ms() + 61 * DAY_MS,
                license: Some(text),
                refused: None,
            };
            let signed = match case {
                "foreign key" => other.sign_sync(&answer).unwrap(),
                "other sync" => {
                    answer.sync = uuid::Uuid::new_v4();
                    vendor.sign_sync(&answer).unwrap()
                }
                "changed byte" => {
                    use base64::Engine as _;
                    let b64 = base64::engine::general_purpose::STANDARD;
                    let mut signed = vendor.sign_sync(&answer).unwrap();
                    let mut body = b64.decode(&signed.body).unwrap();
                    let last = body.len() - 1;
                    body[last] ^= 1;
                    signed.body = b64.encode(&body);
                    signed
                }
                _ => vendor.sign_sync(&answer).unwrap(),
            };
            client
                .publish(msg.reply.unwrap(), encode(&signed).unwrap().into())
                .await
                .unwrap();
        };
        let (out, ()) = tokio::join!(sync_now(&f), answering);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let st = f.status().await.unwrap();
        let sync = st.license.sync.clone().unwrap();
        if error.is_empty() {
            assert!(out.status.success(), "{case}: {stderr}");
            assert_eq!(st.total_limit, 8);
            assert!(!sync.overdue);
            break;
        }
        assert!(!out.status.success(), "{case} was taken");
        assert!(stderr.contains(error), "{case}: {stderr}");
        let alert = alerts
            .wait_for(case, |a| {
                a.kind == AlertKind::VendorSync && a.message.contains(error)
            })
            .await
            .unwrap();
        assert_eq!(alert.severity, Severity::Warning);
        assert_eq!(st.total_limit, 5, "{case}");
        assert!(sync.overdue && sync.last_sync_ms == 0, "{case}: {sync:?}");
        alerts.seen.clear();
    }
}

fn clock_now_ms() -> u64 {
    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap()
}

/// Steps: the vendor serves the customer's license; broker b1 runs with `sync_every` 1 h.
/// It syncs by itself at once (no sync yet), with a `vendor_sync` alert naming the
/// schedule. site-secret-s registers agent-secret-1 and agent-secret-2; the clock jumps 2 h
/// and b1 syncs again by itself. The second request's usage summary counts the 2 seats in
/// total and per type, the one refusal (agent-secret-1 again, as another type) by reason and the
/// slave's connect, and no request sent to the vendor contains an agent id or the slave
/// id; the vendor logged both syncs with their summaries, and `lmbus-vendor usage` shows
/// them by customer (CSV) and since an hour ago (JSON).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_syncs_by_itself_with_a_summary_that_names_no_agent() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let license = synced_master(5);
    let (store, _vendor) = vendor_serving(&f, &license).await;
    let mut sent = f.client.subscribe(Subjects::vendor_sync()).await.unwrap();
    f.client.flush().await.unwrap();
    let clock = WallClock::default();
    let path = f.vendor.write("master.lic", &license).unwrap();
    let mut cfg = broker_config(&f.nats, &f.cluster, path, &f.vendor, true);
    cfg.wall_clock = clock.clone();
    cfg.sync_every = Duration::from_secs(3600);
    let b1 = Broker::start(cfg).await.unwrap();
    let first = alerts
        .wait_for("the scheduled sync", |a| a.kind == AlertKind::VendorSync)
        .await
        .unwrap();
    assert_eq!(first.severity, Severity::Info, "{}", first.message);
    assert!(
        first.message.contains("the sync schedule"),
        "{}",
        first.message
    );

    let slave = SlaveAgent::start(f.slave_config("site-secret-s").unwrap())
        .await
        .unwrap();
    for agent in ["agent-secret-1", "agent-secret-2"] {
        assert!(
            slave
                .register(agent, "inbound")
                .await
                .unwrap()
                .is_approved()
        );
    }
    // A refusal for the summary's rejections by reason (held as another type).
    assert!(
        !slave
            .register("agent-secret-1", "outbound")
            .await
            .unwrap()
            .is_approved()
    );
    alerts
        .wait_for("the refusal", |a| a.kind == AlertKind::RegistrationRejected)
        .await
        .unwrap();
    // The usage period sees the seats at the next tick.
    tokio::time::sleep(Duration::from_millis(300)).await;
    clock.jump(Duration::from_secs(2 * 3600));
    alerts
        .wait_count("two scheduled syncs", 2, |a| {
            a.kind == AlertKind::VendorSync && a.severity == Severity::Info
        })
        .await
        .unwrap();

    let mut requests = Vec::new();
    while requests.len() < 2 {
        let msg = tokio::time::timeout(WAIT, sent.next())
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&msg.payload).into_owned();
        for secret in ["agent-secret", "site-secret"] {
            assert!(
                !text.contains(secret),
                "{secret} sent to the vendor: {text:?}"
            );
        }
        // A retry (no answer within its timeout on a slow machine) repeats a sync id.
        let request = decode::<SyncRequest>(&msg.payload).unwrap();
        if !requests
            .iter()
            .any(|r: &SyncRequest| r.sync == request.sync)
        {
            requests.push(request);
        }
    }
    let summary = requests[1].summary.clone().unwrap();
    assert_eq!(summary.total.peak, 2, "{summary:?}");
    assert_eq!(summary.by_type["inbound"].peak, 2, "{summary:?}");
    assert_eq!(summary.slaves_connected, 1);
    assert_eq!(summary.context, "production");
    // Counts of the period's events from the alert stream, by reason, never by agent.
    assert!(summary.events_counted, "{summary:?}");
    assert_eq!(summary.rejections.values().sum::<u64>(), 1, "{summary:?}");
    assert!(summary.events.slave_connects >= 1, "{summary:?}");
    // Both signed by the installation's one key (the ledger's), bound at the vendor at
    // the first sync; the signed summary is the one sent.
    let keys: Vec<String> = requests
        .iter()
        .map(|r| {
            let (key, body) = lmbus_schemas::open_sync_request(r).unwrap().unwrap();
            assert_eq!(body.summary, r.summary);
            key
        })
        .collect();
    assert_eq!(keys[0], keys[1]);
    let bound = std::fs::read_to_string(
        store
            .path()
            .join("installation-keys")
            .join(requests[0].installation.to_string()),
    )
    .unwrap();
    assert_eq!(bound, keys[0]);
    eprintln!(
        "seen: the summary as sent: {}",
        serde_json::to_string(&summary).unwrap()
    );
    let log = std::fs::read_to_string(store.path().join("syncs.jsonl")).unwrap();
    let answered: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&license.id.to_string()) && l.contains("\"answered\""))
        .collect();
    eprintln!("seen: syncs.jsonl:\n{log}");
    assert_eq!(answered.len(), 2, "{log}");
    assert!(answered[1].contains("\"peak\":2"), "{log}");
    // Queried at the vendor: CSV rows per sync and type, JSON, by customer.
    let usage = |args: &[&str]| {
        let out = vendor_command()
            .arg("usage")
            .args(args)
            .arg("--store")
            .arg(store.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let csv = tokio::task::block_in_place(|| usage(&["--customer", "Test Customer"]));
    let inbound: Vec<&str> = csv
        .lines()
        .filter(|l| l.contains(",\"inbound\","))
        .collect();
    assert_eq!(inbound.len(), 1, "{csv}");
    assert!(inbound[0].contains(",\"inbound\",2,"), "{csv}");
    assert!(csv.starts_with("time_ms,customer,license,"), "{csv}");
    let json = tokio::task::block_in_place(|| usage(&["--json", "--since", "1h"]));
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ours = parsed
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["license"] == license.id.to_string() && l["customer"] == "Test Customer")
        .count();
    assert_eq!(ours, 2, "{json}");
    let none = tokio::task::block_in_place(|| usage(&["--customer", "Nobody"]));
    assert_eq!(none.lines().count(), 1, "{none}");
    slave.shutdown().await;
    b1.stop().await.unwrap();
}

/// Runs a binary on the blocking pool: its output.
async fn run(bin_name: &str, args: Vec<std::ffi::OsString>) -> Output {
    let mut cmd = if bin_name == "lmbus-vendor" {
        vendor_command()
    } else {
        Command::new(bin(bin_name).unwrap())
    };
    cmd.args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

/// Steps (air-gapped): the vendor stores a purchase (5 seats → 8); broker b1 runs past the
/// offline limit. `admin sync export REQ` writes the request (its license id, no agent id);
/// `lmbus-vendor answer REQ --out ANS` answers it from the store; `admin sync import ANS`
/// applies it: 8 seats, not overdue. Importing ANS again is refused (an answer applies
/// once) and changes nothing; so is an answer file with one byte of its signature changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_air_gapped_round_trip_applies_an_answer_once() {
    let f = Fixture::new().await.unwrap();
    let license = synced_master(5);
    let mut purchase = license.clone();
    purchase.limits.total = Some(8);
    let store = tempfile::tempdir().unwrap();
    let key = f.vendor.secret_key_path().unwrap();
    let purchased = f.vendor.write("purchase.lic", &purchase).unwrap();
    let stored = run(
        "lmbus-vendor",
        vec![
            "store".into(),
            purchased.into(),
            "--key".into(),
            key.clone().into(),
            "--store".into(),
            store.path().into(),
        ],
    )
    .await;
    assert!(stored.status.success());
    let clock = WallClock::default();
    clock.jump(Duration::from_millis(61 * DAY_MS));
    let _b1 = broker(&f, &license, "b1", &clock).await;
    let slave = SlaveAgent::start(f.slave_config("site-hidden-s").unwrap())
        .await
        .unwrap();
    match slave.register("agent-hidden-1", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::SyncOverdue),
        other => panic!("past the limit: {other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let (req, ans) = (dir.path().join("req.json"), dir.path().join("ans.json"));
    let admin = |what: &str, file: &std::path::Path| -> Vec<std::ffi::OsString> {
        vec![
            "admin".into(),
            "sync".into(),
            what.into(),
            file.into(),
            "--nats".into(),
            f.nats.url().into(),
            "--cluster".into(),
            f.cluster.clone().into(),
        ]
    };
    let out = run("lmbus-broker", admin("export", &req)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let request = std::fs::read_to_string(&req).unwrap();
    assert!(request.contains(&license.id.to_string()), "{request}");
    assert!(!request.contains("hidden"), "{request}");
    // The exported summary counts the period's events too (the refusal above), as a
    // sync over NATS does.
    let exported: SyncRequest = serde_json::from_str(&request).unwrap();
    let summary = exported.summary.expect("the export carries a summary");
    assert!(summary.events_counted, "{summary:?}");
    assert!(summary.rejections.values().sum::<u64>() >= 1, "{summary:?}");

    let out = run(
        "lmbus-vendor",
        vec![
            "answer".into(),
            req.clone().into(),
            "--out".into(),
            ans.clone().into(),
            "--key".into(),
            key.into(),
            "--store".into(),
            store.path().into(),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("lmbus-broker", admin("import", &ans)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = f.status().await.unwrap();
    assert_eq!(st.total_limit, 8);
    let sync = st.license.sync.unwrap();
    assert!(!sync.overdue && sync.last_sync_ms > 0, "{sync:?}");

    let again = run("lmbus-broker", admin("import", &ans)).await;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(stderr.contains("applies once"), "{stderr}");
    let text = std::fs::read_to_string(&ans).unwrap();
    let mut signed: lmbus_schemas::SignedSyncAnswer = serde_json::from_str(&text).unwrap();
    let flipped = if signed.signature.starts_with('A') {
        "B"
    } else {
        "A"
    };
    signed.signature.replace_range(0..1, flipped);
    let forged = dir.path().join("forged.json");
    std::fs::write(&forged, serde_json::to_string(&signed).unwrap()).unwrap();
    let out = run("lmbus-broker", admin("import", &forged)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("not signed by the vendor key"), "{stderr}");
    let after = f.status().await.unwrap().license.sync.unwrap();
    assert_eq!(after.last_sync_ms, sync.last_sync_ms);
    assert!(
        slave
            .register("agent-hidden-1", "inbound")
            .await
            .unwrap()
            .is_approved()
    );
    slave.shutdown().await;
}

/// Steps: one license and one vendor; two installations (clusters with their own ledgers)
/// on the same NATS. The first syncs and is bound to the license. The second's sync is
/// refused as another installation, with a `vendor_sync` warning, and nothing changes
/// there (still overdue). The first's broker is replaced by another replica (a failover:
/// the ledger keeps the installation's identity) and syncs again. The vendor logged the
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_license_synced_from_a_second_installation_is_refused() {
    let f = Fixture::new().await.unwrap();
    let license = synced_master(5);
    let (store, _vendor) = vendor_serving(&f, &license).await;
    let clock = WallClock::default();
    clock.jump(Duration::from_millis(61 * DAY_MS));
    let first = broker(&f, &license, "first-1", &clock).await;
    let out = sync_now(&f).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let other_cluster = cluster_name();
    let mut alerts = AlertTap::new(&f.client, &other_cluster).await.unwrap();
    let path = f.vendor.write("second.lic", &license).unwrap();
    let mut cfg = broker_config(&f.nats, &other_cluster, path, &f.vendor, true);
    cfg.broker_id = "second".into();
    cfg.wall_clock = clock.clone();
    let second = Broker::start(cfg).await.unwrap();
    let out = tokio::task::spawn_blocking({
        let (url, cluster) = (f.nats.url(), other_cluster.clone());
        move || {
            Command::new(bin("lmbus-broker").unwrap())
                .args([
                    "admin",
                    "sync",
                    "now",
                    "--nats",
                    &url,
                    "--cluster",
                    &cluster,
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("in use by another installation"),
        "{stderr}"
    );
    let warned = alerts
        .wait_for("vendor_sync", |a| a.kind == AlertKind::VendorSync)
        .await
        .unwrap();
    assert_eq!(warned.severity, Severity::Warning);
    let st = status(&f.client, &other_cluster).await.unwrap();
    let sync = st.license.sync.unwrap();
    assert!(sync.overdue && sync.last_sync_ms == 0, "{sync:?}");

    first.stop().await.unwrap();
    let replacement = broker(&f, &license, "first-2", &clock).await;
    eventually("first-2 leads", || async {
        f.status().await.is_ok_and(|st| st.broker_id == "first-2")
    })
    .await
    .unwrap();
    let out = sync_now(&f).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(store.path().join("syncs.jsonl")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("in use by another installation"))
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains(&license.id.to_string()) && l.contains("\"answered\""))
            .count(),
        2,
        "{log}"
    );
    second.stop().await.unwrap();
    replacement.stop().await.unwrap();
}

/// Steps: the vendor's hub runs `deploy/vendor-hub.conf` (one account per customer, the
/// sync service exported by the vendor's); `lmbus-vendor serve` logs in there as `vendor`;
/// the customer's own NATS (with JetStream, the broker on it) links to the hub as a leaf
/// node with the customer's user. `admin sync now` on the customer's side goes through the
/// link and succeeds (the purchase arrives); a client of the hub in another customer's
/// account cannot reach the sync service, and the customer's subjects do not cross (the
/// vendor's user hears nothing of the customer's alerts, and neither does a listener on
/// the hub in the customer's own account: the link's user permissions stop them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_crosses_a_leaf_node_link_to_the_vendors_hub() {
    init_tracing();
    let hub_leaf = free_port();
    let hub_conf = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vendor-hub.conf"),
    )
    .unwrap()
    .replace("0.0.0.0:7422", &format!("127.0.0.1:{hub_leaf}"))
    .replace("$LMBUS_VENDOR_PASSWORD", "\"pw-vendor\"")
    .replace("$LMBUS_CUSTOMER_ACME_PASSWORD", "\"pw-acme\"")
    .replace(
        "accounts {",
        "accounts {\n  CUSTOMER_OTHER {\n    users = [ { user: other, password: \"pw-other\" } ]\n  }",
    )
    // Someone on the hub in the customer's own account, without the link's permissions,
    // listening to everything: the link's permissions keep the customer's subjects home.
    .replace(
        "users = [\n      { user: acme,",
        "users = [\n      { user: spy, password: \"pw-spy\" }\n      { user: acme,",
    );
    let hub = NatsServer::start_leaf(&hub_conf).unwrap();
    let customer = NatsServer::start_with_config(&format!(
        "leafnodes {{\n  remotes = [ {{ url: \"nats-leaf://acme:pw-acme@127.0.0.1:{hub_leaf}\" }} ]\n}}\n"
    ))
    .unwrap();
    let vendor = Vendor::new().unwrap();
    let license = synced_master(5);
    let mut purchase = license.clone();
    purchase.limits.total = Some(8);
    let store = tempfile::tempdir().unwrap();
    let key = vendor.secret_key_path().unwrap();
    lmbus_vendor::store_license(
        store.path(),
        &std::fs::read_to_string(vendor.write("purchase.lic", &purchase).unwrap()).unwrap(),
        &lmbus_schemas::parse_secret_key(&std::fs::read_to_string(&key).unwrap()).unwrap(),
    )
    .unwrap();
    let _serve = Proc::spawn(
        vendor_command()
            .args(["serve", "--nats", &hub.url(), "--nats-user", "vendor"])
            .env("LMBUS_NATS_PASSWORD", "pw-vendor")
            .arg("--key")
            .arg(&key)
            .arg("--store")
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let cluster = cluster_name();
    let client = customer.client().await.unwrap();
    // The link is up and the vendor serves once a request from the customer's side is
    // answered.
    eventually("the vendor answers across the leaf link", || async {
        let probe = SyncRequest {
            sync: uuid::Uuid::new_v4(),
            license: uuid::Uuid::new_v4(),
            cluster: "probe".into(),
            installation: uuid::Uuid::nil(),
            summary: None,
            signed: None,
        };
        tokio::time::timeout(
            Duration::from_millis(500),
            client.request(Subjects::vendor_sync(), encode(&probe).unwrap().into()),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    })
    .await
    .unwrap();

    let vendor_user = lmbus_nats::connect(
        &hub.url(),
        async_nats::ConnectOptions::new(),
        &lmbus_nats::NatsAuth {
            user: Some("vendor".into()),
            password: Some("pw-vendor".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut overheard = vendor_user
        .subscribe(Subjects::new(&cluster).unwrap().all_alerts())
        .await
        .unwrap();
    vendor_user.flush().await.unwrap();
    let spy = lmbus_nats::connect(
        &hub.url(),
        async_nats::ConnectOptions::new(),
        &lmbus_nats::NatsAuth {
            user: Some("spy".into()),
            password: Some("pw-spy".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut spied = spy.subscribe("lmbus.v1.>").await.unwrap();
    spy.flush().await.unwrap();

    let path = vendor.write("master.lic", &license).unwrap();
    let mut cfg = broker_config(&customer, &cluster, path, &vendor, true);
    let clock = WallClock::default();
    clock.jump(Duration::from_millis(61 * DAY_MS));
    cfg.wall_clock = clock;
    let b1 = Broker::start(cfg).await.unwrap();
    let out = tokio::task::spawn_blocking({
        let (url, cluster) = (customer.url(), cluster.clone());
        move || {
            Command::new(bin("lmbus-broker").unwrap())
                .args([
                    "admin",
                    "sync",
                    "now",
                    "--nats",
                    &url,
                    "--cluster",
                    &cluster,
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = status(&client, &cluster).await.unwrap();
    assert_eq!(st.total_limit, 8);
    assert!(!st.license.sync.unwrap().overdue);

    let other = lmbus_nats::connect(
        &hub.url(),
        async_nats::ConnectOptions::new(),
        &lmbus_nats::NatsAuth {
            user: Some("other".into()),
            password: Some("pw-other".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let probe = SyncRequest {
        sync: uuid::Uuid::new_v4(),
        license: license.id,
        cluster: "intruder".into(),
        installation: uuid::Uuid::new_v4(),
        summary: None,
        signed: None,
    };
    let asked = tokio::time::timeout(
        Duration::from_secs(2),
        other.request(Subjects::vendor_sync(), encode(&probe).unwrap().into()),
    )
    .await;
    assert!(
        !matches!(asked, Ok(Ok(_))),
        "another account reached the sync service"
    );
    let heard = tokio::time::timeout(Duration::from_millis(500), overheard.next()).await;
    assert!(
        heard.is_err(),
        "the customer's alerts crossed to the vendor"
    );
    let spied = tokio::time::timeout(Duration::from_millis(500), spied.next()).await;
    assert!(
        spied.is_err(),
        "the customer's subjects crossed the leaf link into its account on the hub: {:?}",
        spied.ok().flatten().map(|m| m.subject)
    );
    b1.stop().await.unwrap();
}

/// Steps: the vendor's NATS is a server of its own, not linked to the customer's;
/// `lmbus-vendor serve` runs there. The broker, on the customer's NATS, reaches it as a
/// second connection (`vendor_nats`, the `--vendor-nats` flag): `admin sync now` succeeds and
/// brings the purchase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_goes_over_a_second_connection_to_the_vendors_nats() {
    let f = Fixture::new().await.unwrap();
    let hub = NatsServer::start().unwrap();
    let license = synced_master(5);
    let mut purchase = license.clone();
    purchase.limits.total = Some(7);
    let store = tempfile::tempdir().unwrap();
    let key = f.vendor.secret_key_path().unwrap();
    lmbus_vendor::store_license(
        store.path(),
        &std::fs::read_to_string(f.vendor.write("purchase.lic", &purchase).unwrap()).unwrap(),
        &lmbus_schemas::parse_secret_key(&std::fs::read_to_string(&key).unwrap()).unwrap(),
    )
    .unwrap();
    let _serve = Proc::spawn(
        vendor_command()
            .args(["serve", "--nats", &hub.url()])
            .arg("--key")
            .arg(&key)
            .arg("--store")
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let hub_client = hub.client().await.unwrap();
    eventually("lmbus-vendor answers on its NATS", || async {
        let probe = SyncRequest {
            sync: uuid::Uuid::new_v4(),
            license: uuid::Uuid::new_v4(),
            cluster: "probe".into(),
            installation: uuid::Uuid::nil(),
            summary: None,
            signed: None,
        };
        tokio::time::timeout(
            Duration::from_millis(500),
            hub_client.request(Subjects::vendor_sync(), encode(&probe).unwrap().into()),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    })
    .await
    .unwrap();
    let path = f.vendor.write("master.lic", &license).unwrap();
    let mut cfg = broker_config(&f.nats, &f.cluster, path, &f.vendor, true);
    cfg.vendor_nats = Some((hub.url(), Default::default()));
    let b1 = Broker::start(cfg).await.unwrap();
    let out = sync_now(&f).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(f.status().await.unwrap().total_limit, 7);
    b1.stop().await.unwrap();
}

/// Steps (dashboard): the vendor serves a purchase (5 seats → 6); the broker is past the
/// offline limit. The overview shows the vendor sync line as overdue to both users; only
/// the admin's has the "Sync with the vendor now" button. The viewer's sync is refused
/// (403), the admin's without its CSRF token too; with it the sync succeeds, the page says
/// so, the limit is 6 and the `vendor_sync` alert names `web:ann`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_offline_limit_and_an_admin_syncs_from_it() {
    use lmbus_tests::dashboard::{Dashboard, WebClient, csrf_of};
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let license = synced_master(5);
    let mut purchase = license.clone();
    purchase.limits.total = Some(6);
    let (_store, _vendor) = vendor_serving(&f, &purchase).await;
    let clock = WallClock::default();
    clock.jump(Duration::from_millis(61 * DAY_MS));
    let b1 = broker(&f, &license, "b1", &clock).await;
    let dash = Dashboard::start(
        &f,
        &[("ann", "admin", "pw-ann"), ("vic", "viewer", "pw-vic")],
        Duration::from_millis(300),
    )
    .await;

    let mut vic = WebClient::new(&dash.url);
    assert_eq!(vic.log_in("vic", "pw-vic").await.status, 303);
    let page = vic.get("/").await;
    assert!(
        page.body.contains("vendor sync: within 60 days") && page.body.contains("OVERDUE"),
        "{}",
        page.body
    );
    assert!(
        !page.body.contains("Sync with the vendor now"),
        "{}",
        page.body
    );
    let csrf = csrf_of(&vic.get("/seats").await.body).unwrap();
    let refused = vic.post("/sync", &[("csrf", &csrf)]).await;
    assert_eq!(refused.status, 403, "{}", refused.body);

    let mut ann = WebClient::new(&dash.url);
    assert_eq!(ann.log_in("ann", "pw-ann").await.status, 303);
    let page = ann.get("/").await;
    assert!(
        page.body.contains("Sync with the vendor now"),
        "{}",
        page.body
    );
    assert_eq!(ann.post("/sync", &[]).await.status, 403);
    assert_eq!(f.status().await.unwrap().total_limit, 5);
    let csrf = csrf_of(&page.body).unwrap();
    let synced = ann.post("/sync", &[("csrf", &csrf)]).await;
    assert_eq!(synced.status, 200, "{}", synced.body);
    assert!(synced.body.contains("succeeded"), "{}", synced.body);
    assert_eq!(f.status().await.unwrap().total_limit, 6);
    let alert = alerts
        .wait_for("vendor_sync", |a| a.kind == AlertKind::VendorSync)
        .await
        .unwrap();
    assert!(alert.message.contains("web:ann"), "{}", alert.message);
    dash.stop().await;
    b1.stop().await.unwrap();
}
