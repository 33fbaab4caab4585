//! The `--config` file across real processes: one rule (every long flag, with `_` for `-`,
//! is a key) for the broker's `run` and `admin` commands, the slave daemon and its CLI and
//! the monitor, against a real nats-server that requires a user and password; unknown keys
//! refused before anything connects.
//!
//! These tests block on child processes, so they run on a multi-threaded runtime.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::process::{Command, Stdio};
use std::time::Duration;

use lmbus_tests::*;

/// Steps: start a nats-server that requires user `lmbus` with a password; write one
/// config file with flat keys (`nats`, `nats_user`, `nats_password`, `cluster`, `license`
/// and `vendor_key` relative to the file, `id`, `log`, `allow_unlicensed_slaves`); run
/// `lmbus-broker run --config F` as a process and wait until it leads; then
/// `lmbus-broker admin --config F status` (nats, credentials and cluster from the same
/// file) and `lmbus-monitor --config M licenses --once` (its own file with the same keys)
/// print its status; the broker's file given to the monitor is refused (`license` is not
/// a monitor flag); `lmbus-slave run --config S` (flat credentials, `api`) registers an
/// agent asked by `lmbus-slave register --config S` (the same file gives the CLI the API
/// address), seen in the status; a flag given on
/// the command line (`--cluster` of another cluster) wins over the file; a mistyped key
/// and the old `[nats_auth]` table are refused with the key and the file named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_admin_and_monitor_read_one_config_file() {
    init_tracing();
    let nats = NatsServer::start_with_config("authorization { user: lmbus, password: pw-lmbus }\n")
        .unwrap();
    let vendor = Vendor::new().unwrap();
    let cluster = cluster_name();
    let license = vendor.master(5, &[("inbound", 3)]).unwrap();
    let dir = vendor.dir();
    let relative = |p: &std::path::Path| p.file_name().unwrap().to_str().unwrap().to_owned();
    let config = dir.join("lmbus.toml");
    std::fs::write(
        &config,
        format!(
            "nats = \"{}\"\nnats_user = \"lmbus\"\nnats_password = \"pw-lmbus\"\n\
             cluster = \"{cluster}\"\nlicense = \"{}\"\nvendor_key = \"{}\"\n\
             id = \"cfg-broker\"\nlog = \"warn\"\nallow_unlicensed_slaves = true\n",
            nats.url(),
            relative(&license),
            relative(&vendor.public_key_path()),
        ),
    )
    .unwrap();
    assert_eq!(
        license.parent(),
        Some(dir),
        "the license sits beside the file"
    );
    let log = dir.join("broker.log");
    let _broker = Proc::spawn(
        Command::new(bin("lmbus-broker").unwrap())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("LMBUS_NATS_URL")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    )
    .unwrap();

    let admin_status = |extra: &[&str]| {
        Command::new(bin("lmbus-broker").unwrap())
            .arg("admin")
            .arg("--config")
            .arg(&config)
            .arg("status")
            .args(extra)
            .output()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + WAIT;
    let text = loop {
        let out = tokio::task::block_in_place(|| admin_status(&[]));
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "admin status never succeeded: {}\nbroker log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("seen: lmbus-broker admin --config F status:\n{text}");
    assert!(
        text.contains("cfg-broker") && text.contains("inbound"),
        "{text}"
    );

    // The monitor has its own file: its keys are its own flags (a broker key such as
    // `license` is not one).
    let monitor_config = dir.join("monitor.toml");
    std::fs::write(
        &monitor_config,
        format!(
            "nats = \"{}\"\nnats_user = \"lmbus\"\nnats_password = \"pw-lmbus\"\n\
             cluster = \"{cluster}\"\ntimeout = \"5s\"\n",
            nats.url()
        ),
    )
    .unwrap();
    let monitor = tokio::task::block_in_place(|| {
        stdout_of(
            Command::new(bin("lmbus-monitor").unwrap())
                .arg("--config")
                .arg(&monitor_config)
                .args(["licenses", "--once"]),
        )
    })
    .unwrap();
    assert!(monitor.contains("cfg-broker"), "{monitor}");

    let out = tokio::task::block_in_place(|| {
        Command::new(bin("lmbus-monitor").unwrap())
            .arg("--config")
            .arg(&config)
            .args(["licenses", "--once"])
            .output()
            .unwrap()
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown key allow_unlicensed_slaves") && err.contains("lmbus-monitor"),
        "{err}"
    );

    // The slave daemon and its CLI share one file: `api` is where `run` listens and where
    // `register` and `status` ask; the NATS credentials are flat keys.
    let slave_config = dir.join("slave.toml");
    std::fs::write(
        &slave_config,
        format!(
            "nats = \"{}\"\nnats_user = \"lmbus\"\nnats_password = \"pw-lmbus\"\n\
             cluster = \"{cluster}\"\nid = \"site1\"\napi = \"127.0.0.1:{}\"\n\
             heartbeat_interval = \"200ms\"\nlog = \"warn\"\n",
            nats.url(),
            free_port()
        ),
    )
    .unwrap();
    let _slave = Proc::spawn(
        Command::new(bin("lmbus-slave").unwrap())
            .args(["run", "--config"])
            .arg(&slave_config)
            .env_remove("LMBUS_SLAVE_API")
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let slave_cli = |args: &[&str]| {
        Command::new(bin("lmbus-slave").unwrap())
            .arg("--config")
            .arg(&slave_config)
            .args(args)
            .env_remove("LMBUS_SLAVE_API")
            .output()
            .unwrap()
    };
    eventually("the slave's API answers at the file's address", || async {
        tokio::task::block_in_place(|| slave_cli(&["status"]))
            .status
            .success()
    })
    .await
    .unwrap();
    let out = tokio::task::block_in_place(|| slave_cli(&["register", "a1", "inbound"]));
    assert!(out.status.success(), "{out:?}");
    let text = tokio::task::block_in_place(|| admin_status(&[]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("site1 ") && l.contains("inbound=1")),
        "{text}"
    );

    // A flag wins over the file: no master answers for another cluster.
    let out = tokio::task::block_in_place(|| admin_status(&["--cluster", "nobody-here"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nobody-here"), "{err}");

    // A mistyped key and the old nested table: refused, naming the key and the file.
    let bad = dir.join("bad.toml");
    for (text, expected) in [
        (
            "clustr = \"x\"\n",
            "unknown key clustr (did you mean cluster?)",
        ),
        (
            "[nats_auth]\nuser = \"lmbus\"\n",
            "unknown key nats_auth (a table; keys are flat, at the top level: write nats_user instead)",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        for binary in ["lmbus-broker", "lmbus-monitor"] {
            let mut cmd = Command::new(bin(binary).unwrap());
            cmd.arg("--config").arg(&bad);
            if binary == "lmbus-broker" {
                cmd.args(["admin", "status"]);
            } else {
                cmd.args(["licenses", "--once"]);
            }
            let out = tokio::task::block_in_place(|| cmd.output().unwrap());
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{binary}: {err}");
            assert!(
                err.contains(bad.to_str().unwrap()) && err.contains(expected),
                "{binary}: {err}"
            );
        }
    }
}
