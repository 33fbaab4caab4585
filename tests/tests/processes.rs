//! Real processes and real signals: the monitor CLI tails alerts, the slave daemon's local
//! API and CLI, a slave killed with SIGKILL is marked disconnected with its seats kept,
//! and a restarted slave releases what it no longer holds.
//!
//! These tests block on child processes, so they run on a multi-threaded runtime: an
//! in-process broker must keep answering while the test thread waits.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lmbus_schemas::{AlertKind, Severity};
use lmbus_slave::SlaveAgent;
use lmbus_tests::*;
use nix::sys::signal::Signal;

/// Reads a child's pipe line by line on a thread, so tests can wait with a bound.
fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("no line from {what} within {WAIT:?}"))
}

/// Steps: start a broker and `lmbus-monitor tail --kind registration_rejected --count 2`
/// as a real process; wait for it to subscribe; cause a local-limit rejection and an
/// aggregate-limit rejection; the monitor prints one readable line for each (time,
/// severity, kind, slave, details) and exits by itself. Then `lmbus-monitor licenses`
/// shows the slave and the totals, and `--json` parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_tails_alerts_and_shows_licenses() {
    let f = Fixture::new().await.unwrap();
    let (nats, cluster) = (&f.nats, &f.cluster);
    let broker = f.broker(2, &[("inbound", 2)], true).await.unwrap();
    let mut monitor = Proc::spawn(
        Command::new(bin("lmbus-monitor").unwrap())
            .args(["--nats", &nats.url(), "--cluster", cluster, "tail"])
            .args([
                "--kind",
                "registration_rejected",
                "--count",
                "2",
                "--for",
                "60s",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let out = lines(monitor.child.stdout.take().unwrap());
    let err = lines(monitor.child.stderr.take().unwrap());
    assert!(next_line(&err, "monitor stderr").contains("tailing alerts"));

    let cfg = f
        .licensed_slave_config("site-a", &f.vendor.slave(Some(1)).unwrap())
        .unwrap();
    let a = SlaveAgent::start(cfg).await.unwrap();
    let b = SlaveAgent::start(f.slave_config("site-b").unwrap())
        .await
        .unwrap();
    assert!(a.register("a1", "inbound").await.unwrap().is_approved());
    assert!(!a.register("a2", "inbound").await.unwrap().is_approved());
    assert!(b.register("b1", "inbound").await.unwrap().is_approved());
    assert!(!b.register("b2", "inbound").await.unwrap().is_approved());

    let first = next_line(&out, "monitor stdout");
    let second = next_line(&out, "monitor stdout");
    for line in [&first, &second] {
        assert!(
            line.contains("WARNING") && line.contains("registration_rejected"),
            "{line}"
        );
    }
    // The two alerts come from two slaves' connections (site-a's is relayed from its
    // report), so NATS does not order them against each other.
    let printed = [&first, &second];
    assert!(
        printed
            .iter()
            .any(|l| l.contains("slave=site-a") && l.contains("reason=local_limit")),
        "{first}\n{second}"
    );
    assert!(
        printed
            .iter()
            .any(|l| l.contains("slave=site-b") && l.contains("reason=aggregate_limit")),
        "{first}\n{second}"
    );
    assert!(monitor.wait_timeout(WAIT).unwrap().success());

    let table = Command::new(bin("lmbus-monitor").unwrap())
        .args(["--nats", &nats.url(), "--cluster", cluster, "licenses"])
        .output()
        .unwrap();
    assert!(table.status.success());
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("site-a") && table.contains("site-b"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("TOTAL") && l.contains(" 2 ")),
        "{table}"
    );

    let json = Command::new(bin("lmbus-monitor").unwrap())
        .args([
            "--nats",
            &nats.url(),
            "--cluster",
            cluster,
            "licenses",
            "--json",
        ])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["total_in_use"], 2);
    assert_eq!(doc["slaves"].as_array().unwrap().len(), 2);

    a.shutdown().await;
    b.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: run `lmbus-broker` and `lmbus-slave run` as processes; register two agents with
/// the `lmbus-slave register` CLI through the daemon's local API; SIGKILL the slave; the
/// broker raises `slave_disconnected` after the missed heartbeats, keeps both seats and says
/// when they are reclaimed;
/// a restarted slave with the same id says hello with no agents and the master releases
/// the stale seats; SIGTERM stops the broker cleanly with a `broker_stopped` alert. Its log
/// reads for people (no `slave=None`, plurals that agree, durations not in ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_slave_is_detected_and_restart_releases_stale_seats() {
    let f = Fixture::new().await.unwrap();
    let (nats, vendor, cluster) = (&f.nats, &f.vendor, &f.cluster);
    let mut alerts = f.alerts().await.unwrap();
    let master = vendor.master(10, &[]).unwrap();
    let broker_log = vendor.dir().join("broker.log");
    let log = || std::fs::read_to_string(&broker_log).unwrap_or_default();
    let mut broker = Proc::spawn(
        Command::new(bin("lmbus-broker").unwrap())
            .args(["run", "--nats", &nats.url(), "--cluster", cluster])
            .arg("--license")
            .arg(&master)
            .arg("--vendor-key")
            .arg(vendor.public_key_path())
            .args(["--allow-unlicensed-slaves", "--missed-heartbeats", "2"])
            .args(["--tick-interval", "100ms", "--id", "proc-broker"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&broker_log).unwrap()),
    )
    .unwrap();
    alerts
        .wait_for("leader_elected", |a| a.kind == AlertKind::LeaderElected)
        .await
        .unwrap();

    let api = format!("127.0.0.1:{}", free_port());
    let spawn_slave = || {
        Proc::spawn(
            Command::new(bin("lmbus-slave").unwrap())
                .args([
                    "run",
                    "--nats",
                    &nats.url(),
                    "--cluster",
                    cluster,
                    "--id",
                    "site-k",
                ])
                .args(["--api", &api, "--heartbeat-interval", "200ms"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap()
    };
    let slave = spawn_slave();
    let cli = |args: &[&str]| {
        Command::new(bin("lmbus-slave").unwrap())
            .args(args)
            .args(["--api", &api])
            .output()
            .unwrap()
    };
    eventually("slave API up", || async {
        cli(&["status"]).status.success()
    })
    .await
    .unwrap();
    let reg = cli(&["register", "agent-1", "inbound"]);
    assert!(
        reg.status.success(),
        "{}",
        String::from_utf8_lossy(&reg.stderr)
    );
    assert!(String::from_utf8_lossy(&reg.stdout).contains("approved agent-1"));
    assert!(cli(&["register", "agent-2", "outbound"]).status.success());
    let listed = String::from_utf8_lossy(&cli(&["agents"]).stdout).to_string();
    assert!(listed.contains("agent-1\tinbound") && listed.contains("agent-2\toutbound"));

    slave.signal(Signal::SIGKILL).unwrap();
    let lost = alerts
        .wait_for("slave_disconnected", |a| {
            a.kind == AlertKind::SlaveDisconnected
        })
        .await
        .unwrap();
    assert_eq!(lost.slave.as_deref(), Some("site-k"));
    assert!(
        lost.message.contains("its 2 seats are reclaimed in ")
            && lost.message.contains("unless it says hello again first"),
        "{}",
        lost.message
    );
    let st = f.status().await.unwrap();
    assert!(!st.slaves[0].connected);
    assert_eq!(st.total_in_use, 2);
    drop(slave);

    // Restart with the same id: the new process holds no agents, so the master releases
    // the two stale seats at hello instead of keeping them forever.
    let slave = spawn_slave();
    alerts
        .wait_count("slave_connected", 2, |a| {
            a.kind == AlertKind::SlaveConnected
        })
        .await
        .unwrap();
    f.wait_in_use(0).await.unwrap();
    assert!(f.status().await.unwrap().slaves[0].connected);

    slave.signal(Signal::SIGTERM).unwrap();
    broker.signal(Signal::SIGTERM).unwrap();
    alerts
        .wait_for("broker_stopped", |a| a.kind == AlertKind::BrokerStopped)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\nbroker log:\n{}", log()));
    assert!(
        broker
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .success()
    );
    // The broker's log reads for people: no `slave=None` on alerts about no slave, the
    // slave named where there is one, seats counted in agreement, silence not in ms.
    let log = log();
    assert!(!log.contains("slave=None"), "{log}");
    assert!(log.contains("slave=site-k"), "{log}");
    let started = log
        .lines()
        .find(|l| l.contains("started as a replica"))
        .unwrap();
    assert!(!started.contains("slave="), "{started}");
    assert!(
        started.contains("(production, 10 seats, unlicensed slaves allowed)"),
        "{started}"
    );
    let lost = log
        .lines()
        .find(|l| l.contains("no heartbeat for"))
        .unwrap();
    assert!(lost.contains("its 2 seats are reclaimed in "), "{lost}");
    // Milliseconds only below a second ("400 ms"), never "1600 ms".
    let silence = lost.split("no heartbeat for ").nth(1).unwrap();
    let silence = silence.split(" (").next().unwrap();
    assert!(
        silence
            .strip_suffix(" ms")
            .is_none_or(|n| n.parse::<u32>().is_ok_and(|n| n < 1000))
            || silence.ends_with(" s"),
        "{lost}"
    );
    assert!(log.contains("stopping with 0 seats in use"), "{log}");
}

/// Steps: a broker with 5 seats; a slave takes 3. `lmbus-broker admin reload-license`
/// (the real binary) with a tampered file fails naming the file and changes nothing; with
/// a valid license of 2 seats it succeeds and says nobody is logged out. The status shows
/// the limit of 2 with the 3 seats still held, a `license_reloaded` alert goes out;
/// reloading the same file again says "nothing changed", naming it; a new registration is
/// rejected `aggregate_limit` until usage falls below the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_license_lowers_the_limit_and_logs_nobody_out() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = f.broker(5, &[], true).await.unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    for a in ["a1", "a2", "a3"] {
        assert!(slave.register(a, "inbound").await.unwrap().is_approved());
    }
    let lower = f.vendor.master(2, &[]).unwrap();
    let tampered = f.vendor.dir().join("tampered.lic");
    std::fs::write(
        &tampered,
        std::fs::read_to_string(&lower)
            .unwrap()
            .replace("total = 2", "total = 200"),
    )
    .unwrap();
    let reload = |file: &std::path::Path| {
        Command::new(bin("lmbus-broker").unwrap())
            .args(["admin", "reload-license"])
            .arg(file)
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster])
            .args(["--operator", "test-ops"])
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(|| reload(&tampered));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tampered.lic") && stderr.contains("modified"),
        "{stderr}"
    );
    assert_eq!(f.status().await.unwrap().total_limit, 5);

    let out = tokio::task::block_in_place(|| reload(&lower));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("nobody is logged out"), "{stdout}");
    let st = f.status().await.unwrap();
    assert_eq!((st.total_limit, st.total_in_use), (2, 3));
    let alert = alerts
        .wait_for("license_reloaded", |a| a.kind == AlertKind::LicenseReloaded)
        .await
        .unwrap();
    assert!(alert.message.contains("test-ops"), "{}", alert.message);
    // The same file again changes nothing, and says so.
    let out = tokio::task::block_in_place(|| reload(&lower));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("nothing changed:"), "{stdout}");
    assert!(stdout.contains(&lower.display().to_string()), "{stdout}");
    assert!(!slave.register("a4", "inbound").await.unwrap().is_approved());
    assert_eq!(slave.agents().len(), 3, "nobody was logged out");
    assert!(slave.unregister("a1").await.unwrap());
    assert!(slave.unregister("a2").await.unwrap());
    assert!(slave.register("a4", "inbound").await.unwrap().is_approved());
    slave.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: two broker replicas (b1 preferred and leading, b2 standby) on one nats-server; a
/// slave holds a seat. `lmbus-broker admin drain --replica b1` (the real binary) says b1
/// resigned; b2 leads within a few leases, the seat is still there, the slave registers
/// another agent through the change, a `replica_drained` alert names b1, and b1 does not
/// take the lead back. b1 is shown `drained` (never `standby`) in `admin status`, and b2's
/// redundancy alert warns that no standby can lead. Then b2 is drained too: nobody leads,
/// b1 (the first id up) raises the critical alert that no replica can lead, and `admin
/// status` says both are up but drained and how to undrain, instead of asking whether
/// lmbus-broker runs. `admin undrain --replica b1` lets b1 lead again, and the slave
/// registers. The ledger's `Leader` records count leaderships: b1's term 1, b2's term 2,
/// b1's term 3, however many times each renewed its lease (b1 leads for 1.5 s, about seven
/// renewals, first). Draining a replica that does not exist fails with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_hands_the_lead_to_another_replica() {
    let f = Fixture::new().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let license = f.vendor.master(5, &[]).unwrap();
    let replica = |id: &str, priority: u32| {
        let mut cfg = broker_config(&f.nats, &f.cluster, license.clone(), &f.vendor, true);
        cfg.broker_id = id.into();
        cfg.priority = priority;
        cfg
    };
    let b1 = Broker::start(replica("b1", 1)).await.unwrap();
    let b2 = Broker::start(replica("b2", 2)).await.unwrap();
    assert_eq!(f.status().await.unwrap().broker_id, "b1");
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    // Long enough for b1 to renew its 1 s lease several times.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let admin = |args: &[&str]| {
        Command::new(bin("lmbus-broker").unwrap())
            .arg("admin")
            .args(args)
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster])
            .output()
            .unwrap()
    };
    let drain = |replica: &str| admin(&["drain", "--replica", replica]);
    let out = tokio::task::block_in_place(|| drain("b1"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("resigned"), "{stdout}");
    eventually("b2 leads", || async {
        f.status().await.is_ok_and(|s| s.broker_id == "b2")
    })
    .await
    .unwrap();
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());
    assert_eq!(f.status().await.unwrap().total_in_use, 2);
    let alert = alerts
        .wait_for("replica_drained", |a| a.kind == AlertKind::ReplicaDrained)
        .await
        .unwrap();
    assert!(alert.message.contains("b1"), "{}", alert.message);
    // b1's own account of its term's end gives the real reason.
    let stepped = alerts
        .wait_for("b1 stepped down", |a| {
            a.kind == AlertKind::LeaderSteppedDown && a.source == "b1"
        })
        .await
        .unwrap();
    assert!(
        stepped.message.contains("resigned the lease (admin drain"),
        "{}",
        stepped.message
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        f.status().await.unwrap().broker_id,
        "b2",
        "b1 took the lead back"
    );
    let status = f.status().await.unwrap();
    assert_eq!(status.leader_term, 2, "the term counts leaderships");
    let out = tokio::task::block_in_place(|| admin(&["status"]));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("b1 (drained") && table.contains("b2 (leader"),
        "{table}"
    );
    let redundancy = alerts
        .wait_for("b2's redundancy state", |a| {
            a.kind == AlertKind::Redundancy && a.source == "b2"
        })
        .await
        .unwrap();
    assert_eq!(redundancy.severity, Severity::Warning);
    assert!(
        redundancy
            .message
            .contains("b2 leading, no standby that can lead, drained b1"),
        "{}",
        redundancy.message
    );

    // No replica can lead.
    let out = tokio::task::block_in_place(|| drain("b2"));
    assert!(out.status.success());
    let stuck = alerts
        .wait_for("no replica can lead", |a| {
            a.kind == AlertKind::Redundancy && a.severity == Severity::Critical
        })
        .await
        .unwrap();
    assert_eq!(stuck.source, "b1");
    assert!(
        stuck.message.contains("(b1, b2) are all drained"),
        "{}",
        stuck.message
    );
    let out = tokio::task::block_in_place(|| admin(&["status"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("b1 (drained), b2 (drained)")
            && stderr.contains("admin undrain --replica b1")
            && !stderr.contains("is lmbus-broker running"),
        "{stderr}"
    );
    let out = tokio::task::block_in_place(|| admin(&["undrain", "--replica", "b1"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("undrained"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("b1 leads again", || async {
        f.status().await.is_ok_and(|s| s.broker_id == "b1")
    })
    .await
    .unwrap();
    assert!(slave.register("a3", "inbound").await.unwrap().is_approved());
    let status = f.status().await.unwrap();
    assert_eq!(status.leader_term, 3);
    let subjects = lmbus_schemas::Subjects::new(&f.cluster).unwrap();
    let ledger = lmbus_broker::ledger::Ledger::open(&f.client, &subjects, 1)
        .await
        .unwrap();
    let records = tokio::time::timeout(WAIT, ledger.read_all())
        .await
        .unwrap()
        .unwrap();
    let audit = lmbus_broker::ledger::audit(&records, 5, &Default::default()).unwrap();
    assert_eq!(
        audit.leaders,
        [
            ("b1".to_owned(), 1),
            ("b2".to_owned(), 2),
            ("b1".to_owned(), 3)
        ],
        "one term per leadership, not per lease renewal"
    );

    let out = tokio::task::block_in_place(|| drain("nobody"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no broker replica nobody answered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    slave.shutdown().await;
    b2.stop().await.unwrap();
    b1.stop().await.unwrap();
}

/// Steps: `lmbus-broker run --stream-replicas 3` (the real binary) against one
/// nats-server, which is not clustered: it exits with an error within a bound that says
/// "this NATS is not clustered: use --stream-replicas 1", and no permission hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_replicas_above_one_on_a_single_server_say_so() {
    let f = Fixture::new().await.unwrap();
    let master = f.vendor.master(10, &[]).unwrap();
    let log_path = f.vendor.dir().join("replicas.log");
    let mut broker = Proc::spawn(
        Command::new(bin("lmbus-broker").unwrap())
            .args(["run", "--nats", &f.nats.url(), "--cluster", &f.cluster])
            .arg("--license")
            .arg(&master)
            .arg("--vendor-key")
            .arg(f.vendor.public_key_path())
            .args(["--stream-replicas", "3"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap()),
    )
    .unwrap();
    let status = tokio::task::block_in_place(|| broker.wait_timeout(WAIT)).unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!status.success(), "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("lmbus-broker: error:"))
        .unwrap_or_else(|| panic!("no error line in\n{log}"));
    assert!(
        error.contains("this NATS is not clustered: use --stream-replicas 1"),
        "{error}"
    );
    assert!(!error.contains("permission"), "{error}");
}
