//! License files at start: the broker and the slave refuse tampered, wrong-key, expired,
//! missing and wrong-role licenses, each with its own clear error that names the file.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::process::{Command, Stdio};

use lmbus_schemas::{Limits, Role, SlaveId};
use lmbus_slave::{SlaveAgent, SlaveConfig, SlaveError};
use lmbus_tests::*;
use time::macros::date;

async fn broker_error(nats: &NatsServer, vendor: &Vendor, license: std::path::PathBuf) -> String {
    let cfg = broker_config(nats, &cluster_name(), license, vendor, false);
    match Broker::start(cfg).await {
        Ok(_) => panic!("broker started with a bad license"),
        Err(e) => format!("{e:#}"),
    }
}

/// Steps: for each bad master license (tampered, signed by another key, expired, a slave
/// license, missing file), start the broker and check the error names the file and says
/// what is wrong.
#[tokio::test]
async fn broker_refuses_bad_master_licenses() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let vendor = Vendor::new().unwrap();
    let other_vendor = Vendor::new().unwrap();

    let tampered = vendor.master(5, &[]).unwrap();
    let text = std::fs::read_to_string(&tampered).unwrap();
    std::fs::write(&tampered, text.replace("total = 5", "total = 5000")).unwrap();
    let err = broker_error(&nats, &vendor, tampered.clone()).await;
    assert!(err.contains(&tampered.display().to_string()), "{err}");
    assert!(err.contains("was modified after it was signed"), "{err}");

    let foreign = other_vendor.master(5, &[]).unwrap();
    let err = broker_error(&nats, &vendor, foreign.clone()).await;
    assert!(err.contains(&foreign.display().to_string()), "{err}");
    assert!(err.contains("signed by another vendor key"), "{err}");

    let mut old = Vendor::license(
        Role::Master,
        Limits {
            total: Some(5),
            ..Limits::default()
        },
    );
    old.issued = date!(2020 - 01 - 01);
    old.expires = date!(2021 - 06 - 30);
    let expired = vendor.write("expired.lic", &old).unwrap();
    let err = broker_error(&nats, &vendor, expired).await;
    assert!(err.contains("expired on 2021-06-30"), "{err}");

    let slave_lic = vendor.slave(Some(3)).unwrap();
    let err = broker_error(&nats, &vendor, slave_lic).await;
    assert!(
        err.contains("has role 'slave'") && err.contains("'master'"),
        "{err}"
    );

    let missing = vendor.dir().join("nope.lic");
    let err = broker_error(&nats, &vendor, missing.clone()).await;
    assert!(
        err.contains("cannot read license file") && err.contains("nope.lic"),
        "{err}"
    );
}

/// Steps: start slaves with a tampered slave license, one signed by another vendor, an
/// expired one, a master license, and a slave license with --unlicensed; each fails at
/// start with its own error, before contacting any master.
#[tokio::test]
async fn slave_refuses_bad_licenses() {
    init_tracing();
    let nats = NatsServer::start().unwrap();
    let vendor = Vendor::new().unwrap();
    let other = Vendor::new().unwrap();
    let cluster = cluster_name();
    let start = |license: std::path::PathBuf, unlicensed: bool| {
        let mut cfg = SlaveConfig::new(&nats.url(), &cluster, SlaveId::new("s").unwrap());
        cfg.license = Some(Vendor::license_file(&license).unwrap());
        cfg.vendor_key = Some(vendor.public_key());
        cfg.unlicensed = unlicensed;
        async move {
            match SlaveAgent::start(cfg).await {
                Ok(_) => panic!("slave started with a bad license"),
                Err(e) => e,
            }
        }
    };
    let tampered = vendor.slave(Some(2)).unwrap();
    let text = std::fs::read_to_string(&tampered).unwrap();
    std::fs::write(&tampered, text.replace("local = 2", "local = 20")).unwrap();
    let err = start(tampered, false).await;
    assert!(err.to_string().contains("was modified"), "{err}");

    let err = start(other.slave(Some(2)).unwrap(), false).await;
    assert!(err.to_string().contains("another vendor key"), "{err}");

    let mut old = Vendor::license(Role::Slave, Limits::default());
    old.issued = date!(2020 - 01 - 01);
    old.expires = date!(2020 - 12 - 31);
    let err = start(vendor.write("old.lic", &old).unwrap(), false).await;
    assert!(err.to_string().contains("expired"), "{err}");

    let err = start(vendor.master(3, &[]).unwrap(), false).await;
    assert!(
        matches!(err, SlaveError::Config(ref m) if m.contains("master flag")),
        "{err}"
    );

    let err = start(vendor.slave(None).unwrap(), true).await;
    assert!(
        matches!(err, SlaveError::Config(ref m) if m.contains("cannot be used as an unlicensed slave")),
        "{err}"
    );
}

/// Steps: run the real `lmbus-broker` binary with a tampered license: it exits non-zero
/// and prints one clear error line naming the file.
#[test]
fn broker_binary_exits_with_a_clear_error() {
    let vendor = Vendor::new().unwrap();
    let lic = vendor.master(5, &[]).unwrap();
    let text = std::fs::read_to_string(&lic).unwrap();
    std::fs::write(&lic, text.replace("Test Customer", "Test Customer!")).unwrap();
    let out = Command::new(bin("lmbus-broker").unwrap())
        .args(["run", "--cluster", "c", "--nats", "nats://127.0.0.1:1"])
        .arg("--license")
        .arg(&lic)
        .arg("--vendor-key")
        .arg(vendor.public_key_path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lmbus-broker: error: license file") && stderr.contains("was modified"),
        "{stderr}"
    );

    let out = Command::new(bin("lmbus-broker").unwrap())
        .args(["run", "--cluster", "c"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no master license: pass --license"),
        "{stderr}"
    );
}

/// Steps: the vendor tool signs, verifies and rejects an edited file, as a vendor would
/// use it.
#[test]
fn license_tool_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let tool = bin("lmbus-license").unwrap();
    let run = |args: &[&str]| {
        Command::new(&tool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    assert!(run(&["keygen", "--out", "."]).status.success());
    let again = run(&["keygen", "--out", "."]);
    assert!(
        !again.status.success(),
        "keygen must not overwrite a key silently"
    );
    let sign = run(&[
        "sign",
        "--key",
        "vendor.key",
        "--out",
        "m.lic",
        "--customer",
        "Acme",
        "--role",
        "master",
        "--total",
        "500",
        "--agent-type",
        "inbound=300",
        "--expires",
        "2099-01-01",
    ]);
    assert!(
        sign.status.success(),
        "{}",
        String::from_utf8_lossy(&sign.stderr)
    );
    let verify = run(&[
        "verify",
        "--vendor-key",
        "vendor.pub",
        "--role",
        "master",
        "m.lic",
    ]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("inbound=300"));
    let path = dir.path().join("m.lic");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("inbound = 300", "inbound = 400")).unwrap();
    let verify = run(&["verify", "--vendor-key", "vendor.pub", "m.lic"]);
    assert!(!verify.status.success());
    assert!(String::from_utf8_lossy(&verify.stderr).contains("m.lic was modified"));
}

/// Steps: a broker (unlicensed slaves not allowed); slave site1 starts with a slave
/// license and registers an agent; site2 starts with a copy of the same license file: the
/// master refuses it (`license_in_use`, naming site1) with a `slave_refused` alert, and
/// site1 keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_slave_license_is_refused_while_its_slave_is_connected() {
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(10, &[], false).await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let license = f.vendor.slave(Some(5)).unwrap();
    let site1 = SlaveAgent::start(f.licensed_slave_config("site1", &license).unwrap())
        .await
        .unwrap();
    assert!(matches!(
        site1.register("a1", "inbound").await.unwrap(),
        lmbus_slave::Outcome::Approved { .. }
    ));
    let copy = SlaveAgent::start(f.licensed_slave_config("site2", &license).unwrap()).await;
    match copy {
        Err(SlaveError::Refused {
            reason: lmbus_schemas::RejectReason::LicenseInUse,
            detail,
        }) => assert!(detail.contains("site1"), "{detail}"),
        Err(other) => panic!("expected license_in_use, got {other}"),
        Ok(_) => panic!("a copied license was accepted"),
    }
    let alert = alerts
        .wait_for("slave_refused for site2", |a| {
            a.kind == lmbus_schemas::AlertKind::SlaveRefused && a.slave.as_deref() == Some("site2")
        })
        .await
        .unwrap();
    assert_eq!(
        alert.reason,
        Some(lmbus_schemas::RejectReason::LicenseInUse)
    );
    assert!(matches!(
        site1.register("a2", "inbound").await.unwrap(),
        lmbus_slave::Outcome::Approved { .. }
    ));
    site1.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: with a fresh vendor key, the real `lmbus-license sign` refuses each of: an
/// existing --out without --force (the file is left as it was), --total on a slave
/// license, and --agent-type inbound=9 above --total 5, each with a message naming the
/// problem and nothing written; with --force it replaces the file, which then verifies.
#[test]
fn license_tool_refuses_overwrites_and_contradictory_limits() {
    let dir = tempfile::tempdir().unwrap();
    let tool = bin("lmbus-license").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&tool)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stderr)
    };
    assert!(run(&["keygen", "--out", "."]).0);
    let sign = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "sign",
            "--key",
            "vendor.key",
            "--out",
            out,
            "--customer",
            "Acme",
            "--expires",
            "2099-01-01",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    std::fs::write(dir.path().join("m.lic"), "keep me").unwrap();
    let (ok, stderr) = sign("m.lic", &["--role", "master", "--total", "5"]);
    assert!(!ok);
    assert!(
        stderr.contains("m.lic already exists: pass --force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("m.lic")).unwrap(),
        "keep me"
    );

    let (ok, stderr) = sign("s.lic", &["--role", "slave", "--total", "5"]);
    assert!(!ok);
    assert!(
        stderr.contains("a slave license has none: use --local"),
        "{stderr}"
    );
    let (ok, stderr) = sign(
        "t.lic",
        &[
            "--role",
            "master",
            "--total",
            "5",
            "--agent-type",
            "inbound=9",
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("--agent-type inbound=9 is above --total 5"),
        "{stderr}"
    );
    for never in ["s.lic", "t.lic"] {
        assert!(!dir.path().join(never).exists(), "{never} was written");
    }

    let (ok, stderr) = sign(
        "m.lic",
        &[
            "--role",
            "master",
            "--total",
            "5",
            "--agent-type",
            "inbound=5",
            "--force",
        ],
    );
    assert!(ok, "{stderr}");
    let (ok, stderr) = run(&["verify", "--vendor-key", "vendor.pub", "m.lic"]);
    assert!(ok, "{stderr}");
}

/// Steps: a broker starts with issue 1 of a license (total 2); it is restarted with a
/// later issue of the same id (total 3), which is in force; then with issue 1 again, now
/// carrying 50 seats: the later issue stays in force (3) and a `license_refused` alert
/// says the file is an older issue. Catches: a site getting more seats back by starting
/// its brokers with an old license file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_an_older_issue_of_the_license_keeps_the_later_one() {
    let f = Fixture::new().await.unwrap();
    let limits = |total| Limits {
        total: Some(total),
        local: None,
        agent_types: Default::default(),
    };
    let mut first = Vendor::license(Role::Master, limits(2));
    first.issued = date!(2026 - 01 - 01);
    let later = lmbus_schemas::License {
        issued: date!(2026 - 02 - 01),
        limits: limits(3),
        ..first.clone()
    };
    let first_path = f.vendor.write("first.lic", &first).unwrap();
    let later_path = f.vendor.write("later.lic", &later).unwrap();
    first.limits = limits(50);
    let old_path = f.vendor.write("old-more.lic", &first).unwrap();
    let total = |f: &Fixture| {
        let client = f.client.clone();
        let cluster = f.cluster.clone();
        async move {
            lmbus_ops::fetch_status(
                &client,
                &lmbus_schemas::Subjects::new(&cluster).unwrap(),
                std::time::Duration::from_secs(3),
            )
            .await
            .map(|s| s.total_limit)
            .ok()
        }
    };
    for (path, expected) in [(first_path, 2), (later_path, 3)] {
        let broker = Broker::start(broker_config(&f.nats, &f.cluster, path, &f.vendor, true))
            .await
            .unwrap();
        assert_eq!(total(&f).await, Some(expected));
        broker.stop().await.unwrap();
    }
    let mut alerts = f.alerts().await.unwrap();
    let broker = Broker::start(broker_config(
        &f.nats, &f.cluster, old_path, &f.vendor, true,
    ))
    .await
    .unwrap();
    let refused = alerts
        .wait_for("the refusal", |a| {
            a.kind == lmbus_schemas::AlertKind::LicenseRefused
        })
        .await
        .unwrap();
    assert!(
        refused
            .message
            .contains("an older issue (issued 2026-01-01)"),
        "{}",
        refused.message
    );
    assert_eq!(total(&f).await, Some(3));
    broker.stop().await.unwrap();
}
