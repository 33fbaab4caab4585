#![allow(clippy::unwrap_used)]
//! The durable alert log: alerts kept in the cluster's alert stream and read back by
//! `lmbus-monitor tail` with `--since`, `--last` and filters, across a NATS restart.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use lmbus_schemas::{Alert, AlertKind, Subjects};
use lmbus_slave::SlaveAgent;
use lmbus_tests::*;

fn monitor(f: &Fixture, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("lmbus-monitor").unwrap());
    cmd.args([
        "--nats",
        &f.nats.url(),
        "--cluster",
        &f.cluster,
        "tail",
        "--json",
    ])
    .args(args)
    .stdin(Stdio::null());
    cmd
}

/// Runs a history-only tail to its end (bounded) and returns the alerts it printed.
async fn history(f: &Fixture, args: &[&str]) -> Vec<Alert> {
    let mut cmd = monitor(f, args);
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .expect("a history tail did not end by itself")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn stored(f: &Fixture) -> u64 {
    let js = async_nats::jetstream::new(f.client.clone());
    let mut stream = js
        .get_stream(Subjects::new(&f.cluster).unwrap().alert_stream())
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

/// Steps: a broker (it creates the alert stream) and three slaves, one of which goes over
/// the limit, so alerts are stored while no monitor runs; `tail --since 1h` prints every
/// stored alert and exits; `--last 2` exactly the last two; `--kind slave_connected` only
/// the three connections, and with `--last 2` the last two of those (counted after the
/// filter, though a rejection was stored after them); `--agent-type outbound --severity warning` exactly the one
/// rejection of an outbound agent (s3, over the limit) that the full history holds. Then `tail --since 1h --follow` runs while the nats-server is
/// killed and started again on the same store: the alerts raised after the restart (a
/// fourth slave connecting) are printed too, and no alert is printed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_kept_and_tailed_across_a_nats_restart() {
    let mut f = Fixture::new().await.unwrap();
    let broker = f.broker(1, &[], true).await.unwrap();
    let mut slaves = Vec::new();
    for id in ["s1", "s2", "s3"] {
        slaves.push(
            SlaveAgent::start(f.slave_config(id).unwrap())
                .await
                .unwrap(),
        );
    }
    slaves[0].register("a1", "inbound").await.unwrap();
    slaves[1].register("a2", "inbound").await.unwrap(); // over the 1-seat limit
    eventually("alerts stored", || async { stored(&f).await >= 6 })
        .await
        .unwrap();
    let count = stored(&f).await;

    let all = history(&f, &["--since", "1h"]).await;
    assert_eq!(all.len() as u64, count, "{all:?}");
    // The same start as an RFC 3339 time.
    let hour_ago = (time::OffsetDateTime::now_utc() - time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(history(&f, &["--since", &hour_ago]).await, all);
    assert!(
        all.iter()
            .any(|a| a.kind == AlertKind::RegistrationRejected)
    );
    let last = history(&f, &["--last", "2"]).await;
    assert_eq!(last, all[all.len() - 2..].to_vec());
    let connected = history(&f, &["--since", "1h", "--kind", "slave_connected"]).await;
    assert_eq!(connected.len(), 3, "{connected:?}");
    // --last counts after the filters: the last two connections, although a rejection
    // was stored after them.
    assert_ne!(all.last().map(|a| a.kind), Some(AlertKind::SlaveConnected));
    let last_connected = history(&f, &["--last", "2", "--kind", "slave_connected"]).await;
    assert_eq!(last_connected, connected[1..].to_vec());
    // Filters combine: exactly the alerts of those that match every one.
    slaves[2].register("a3", "outbound").await.unwrap();
    eventually("the outbound rejection stored", || async {
        stored(&f).await > count
    })
    .await
    .unwrap();
    let all = history(&f, &["--since", "1h"]).await;
    let expected: Vec<Alert> = all
        .iter()
        .filter(|a| {
            a.agent_type.as_deref() == Some("outbound")
                && a.severity >= lmbus_schemas::Severity::Warning
        })
        .cloned()
        .collect();
    let outbound = history(
        &f,
        &[
            "--since",
            "1h",
            "--agent-type",
            "outbound",
            "--severity",
            "warning",
        ],
    )
    .await;
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    assert_eq!(outbound, expected);
    assert_eq!(outbound[0].slave.as_deref(), Some("s3"));
    let count = stored(&f).await;

    let mut follow = monitor(&f, &["--since", "1h", "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Alert>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(alert) = serde_json::from_str(&line) {
                let _ = lines_tx.send(alert);
            }
        }
    });
    let mut seen = Vec::new();
    while (seen.len() as u64) < count {
        let alert = tokio::time::timeout(Duration::from_secs(10), lines.recv())
            .await
            .unwrap()
            .unwrap();
        seen.push(alert);
    }
    tokio::task::block_in_place(|| f.nats.restart()).unwrap();
    // The broker and the monitor reconnect on their own; a new slave raises new alerts.
    let s4 = eventually("a slave connects after the restart", || async {
        SlaveAgent::start(f.slave_config("s4").unwrap())
            .await
            .is_ok()
    })
    .await;
    s4.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let alert = lines.recv().await.unwrap();
            let is_s4 =
                alert.kind == AlertKind::SlaveConnected && alert.slave.as_deref() == Some("s4");
            seen.push(alert);
            if is_s4 {
                break;
            }
        }
    })
    .await;
    let _ = follow.kill();
    let stderr = follow
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    after.unwrap_or_else(|_| {
        panic!("no alert after the restart reached the monitor; its stderr: {stderr}")
    });
    eprintln!("seen: the following monitor said: {}", stderr.trim());
    assert!(stderr.contains("reconnected to NATS"), "{stderr}");
    let mut keys: Vec<(i64, String)> = seen
        .iter()
        .map(|a| (a.time_ms, a.message.clone()))
        .collect();
    let printed = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), printed, "an alert was printed twice");
    for s in slaves {
        s.shutdown().await;
    }
    broker.stop().await.unwrap();
}

/// Steps: a broker with 2 seats; slave s1 registers a1 and a2 (granted), slave s2 registers
/// b1 (rejected: the master's total is used up); a second later s1 unregisters a1. The
/// audit for s1 holds its hello, both grants and the release from the ledger, and its
/// connection alert, in time order; the audit for agent b1 is exactly the rejection, with
/// its reason, from the alert stream (a refusal makes no ledger record); the audit since
/// the pause holds only the release; `lmbus-monitor audit --slave s2` prints the rejection;
/// `--last` keeps the last records about s1 (in the library and the binary, `--last 2`).
/// `lmbus-broker admin status` (lmstat) then shows 1 of 2 seats in use and both slaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_by_slave_agent_and_time() {
    use lmbus_monitor::{AuditQuery, audit};
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(2, &[], true).await.unwrap();
    let s1 = SlaveAgent::start(f.slave_config("s1").unwrap())
        .await
        .unwrap();
    let s2 = SlaveAgent::start(f.slave_config("s2").unwrap())
        .await
        .unwrap();
    assert!(s1.register("a1", "inbound").await.unwrap().is_approved());
    assert!(s1.register("a2", "inbound").await.unwrap().is_approved());
    assert!(!s2.register("b1", "inbound").await.unwrap().is_approved());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let pause = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s1.unregister("a1").await.unwrap());
    let subjects = Subjects::new(&f.cluster).unwrap();
    // The alert of the rejection is stored asynchronously: wait until it is.
    eventually("the rejection is stored", || async {
        let q = AuditQuery {
            agent: Some("b1".into()),
            ..AuditQuery::default()
        };
        audit(&f.client, &subjects, &q).await.unwrap().records.len() == 1
    })
    .await
    .unwrap();

    let q = AuditQuery {
        slave: Some("s1".into()),
        ..AuditQuery::default()
    };
    let trail = audit(&f.client, &subjects, &q).await.unwrap();
    let ledger: Vec<(&str, Option<&str>)> = trail
        .records
        .iter()
        .filter(|r| r.source == "ledger")
        .map(|r| (r.event.as_str(), r.agent.as_deref()))
        .collect();
    assert_eq!(
        ledger,
        [
            ("session", None),
            ("granted", Some("a1")),
            ("granted", Some("a2")),
            ("released", Some("a1"))
        ],
        "{trail:#?}"
    );
    assert!(
        trail
            .records
            .iter()
            .all(|r| r.slave.as_deref() == Some("s1"))
    );
    assert!(
        trail
            .records
            .iter()
            .any(|r| r.source == "alert" && r.event == "slave_connected")
    );
    assert!(
        trail
            .records
            .windows(2)
            .all(|w| w[0].time_ms <= w[1].time_ms)
    );

    let q = AuditQuery {
        agent: Some("b1".into()),
        ..AuditQuery::default()
    };
    let rejected = audit(&f.client, &subjects, &q).await.unwrap().records;
    assert_eq!(rejected.len(), 1, "{rejected:#?}");
    assert_eq!(rejected[0].source, "alert");
    assert_eq!(rejected[0].event, "registration_rejected");
    assert_eq!(rejected[0].slave.as_deref(), Some("s2"));
    assert!(rejected[0].detail.starts_with("reason="), "{rejected:?}");

    let q = AuditQuery {
        since: Some(pause),
        ..AuditQuery::default()
    };
    let late = audit(&f.client, &subjects, &q).await.unwrap().records;
    let late_ledger: Vec<_> = late.iter().filter(|r| r.source == "ledger").collect();
    assert_eq!(late_ledger.len(), 1, "{late:#?}");
    assert_eq!(late_ledger[0].event, "released");
    assert!(late.iter().all(|r| r.agent.as_deref() != Some("b1")));

    let text = stdout_of(
        Command::new(bin("lmbus-monitor").unwrap())
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster])
            .args(["audit", "--slave", "s2"]),
    )
    .unwrap();
    eprintln!("seen: lmbus-monitor audit --slave s2:\n{text}");
    assert!(text.contains("registration_rejected"), "{text}");
    assert!(text.contains("agent=b1"), "{text}");
    assert!(!text.contains("slave=s1"), "{text}");

    // --last counts after the filters: the last records about s1, whatever came after.
    let q = AuditQuery {
        slave: Some("s1".into()),
        last: Some(1),
        ..AuditQuery::default()
    };
    let last = audit(&f.client, &subjects, &q).await.unwrap().records;
    assert_eq!(last, trail.records[trail.records.len() - 1..].to_vec());
    let text = stdout_of(
        Command::new(bin("lmbus-monitor").unwrap())
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster])
            .args(["audit", "--slave", "s1", "--last", "2"]),
    )
    .unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("slave=s1")).collect();
    assert_eq!(lines.len(), 2, "{text}");

    let text = stdout_of(Command::new(bin("lmbus-broker").unwrap()).args([
        "admin",
        "status",
        "--nats",
        &f.nats.url(),
        "--cluster",
        &f.cluster,
    ]))
    .unwrap();
    eprintln!("seen: lmbus-broker admin status:\n{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().take(3).eq(["TOTAL", "1", "2"])),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("s1 ")), "{text}");
    s1.shutdown().await;
    s2.shutdown().await;
    broker.stop().await.unwrap();
}

/// Runs `tmux -L <socket> args…` and returns its stdout.
fn tmux(socket: &str, args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .args(["-L", socket])
        .args(args)
        .output()
        .expect("tmux runs (Debian package tmux)")
}

async fn screen_shows(socket: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let started = std::time::Instant::now();
    loop {
        let out = tmux(socket, &["capture-pane", "-p", "-t", "lm"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if check(&text) {
            return text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the live view never showed {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Steps: a broker whose license allows 1 `inbound` seat, slave site1 holding it (the type
/// at its limit) and an `outbound` agent; `lmbus-monitor licenses` runs in a detached tmux
/// session of 80x24. The pane shows `1 / 1 FULL` for inbound and the days to expiry; `?`
/// opens the help and Esc closes it; Enter on the selected slave (site1) asks the real
/// broker for its agents and lists both with their types; Esc closes it. Then the broker
/// stops: the view says STALE with the age of the last good refresh. q quits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_monitor_at_80x24_pins_limits_lists_agents_and_marks_stale_data() {
    let f = Fixture::new().await.unwrap();
    let broker = f
        .broker(10, &[("inbound", 1), ("outbound", 3)], true)
        .await
        .unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    assert!(
        slave
            .register("b2", "outbound")
            .await
            .unwrap()
            .is_approved()
    );
    let socket = format!("lmbus-test-small-{}", f.cluster);
    let command = format!(
        "{} --nats {} --cluster {} licenses --every 500ms --timeout 500ms",
        bin("lmbus-monitor").unwrap().display(),
        f.nats.url(),
        f.cluster
    );
    let started = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "lm",
            "-x",
            "80",
            "-y",
            "24",
            &command,
        ],
    );
    assert!(started.status.success(), "{started:?}");
    let keys = |k: &str| {
        assert!(
            tmux(&socket, &["send-keys", "-t", "lm", k])
                .status
                .success()
        );
    };
    let text = screen_shows(&socket, "inbound at its limit", |t| {
        t.lines()
            .any(|l| l.contains("inbound") && l.contains("1 / 1 FULL"))
    })
    .await;
    eprintln!("seen: the live view at 80x24:\n{text}");
    assert!(text.contains("expires in "), "{text}");
    keys("?");
    screen_shows(&socket, "the help", |t| t.contains("select a slave")).await;
    keys("Escape");
    screen_shows(&socket, "the help closed", |t| {
        !t.contains("select a slave")
    })
    .await;
    keys("Enter");
    let text = screen_shows(&socket, "site1's agents", |t| {
        t.contains("agents of site1 (2)")
            && t.lines().any(|l| l.contains("a1") && l.contains("inbound"))
            && t.lines()
                .any(|l| l.contains("b2") && l.contains("outbound"))
    })
    .await;
    eprintln!("seen: Enter on site1:\n{text}");
    keys("Escape");
    screen_shows(&socket, "the agent list closed", |t| {
        !t.contains("agents of site1")
    })
    .await;
    slave.shutdown().await;
    broker.stop().await.unwrap();
    let text = screen_shows(&socket, "stale data", |t| {
        t.contains("STALE: last good refresh") && t.contains("refresh failed")
    })
    .await;
    eprintln!("seen: no master answering:\n{text}");
    keys("q");
    let started = std::time::Instant::now();
    while tmux(&socket, &["has-session", "-t", "lm"]).status.success() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "q did not end the live view"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tmux(&socket, &["kill-server"]);
}

/// Steps: a broker with 10 seats and slave site1 holding one agent; `lmbus-monitor
/// licenses` runs in a detached tmux session (a real terminal, 150x45). The captured pane
/// shows the leader, the usage line `TOTAL 1 / 10`, site1 and the alert of its connection;
/// a second registration shows up as `TOTAL 2 / 10` by itself (refresh every 500 ms);
/// pressing q ends the program and the session. `licenses --once` prints the plain table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_license_monitor_in_tmux() {
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(10, &[], true).await.unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    let socket = format!("lmbus-test-{}", f.cluster);
    let command = format!(
        "{} --nats {} --cluster {} licenses --every 500ms",
        bin("lmbus-monitor").unwrap().display(),
        f.nats.url(),
        f.cluster
    );
    let started = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "lm",
            "-x",
            "150",
            "-y",
            "45",
            &command,
        ],
    );
    assert!(started.status.success(), "{started:?}");
    let total = |n: u32| {
        move |text: &str| {
            text.lines().any(|l| {
                l.replace('│', " ")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(4)
                    .any(|w| w == ["TOTAL", &n.to_string(), "/", "10"])
            })
        }
    };
    let text = screen_shows(&socket, "one seat in use", total(1)).await;
    eprintln!("seen: the live view in tmux:\n{text}");
    for expected in ["test-broker (term", "site1", "connected", "slave_connected"] {
        assert!(text.contains(expected), "{expected:?}:\n{text}");
    }
    assert!(slave.register("a2", "inbound").await.unwrap().is_approved());
    screen_shows(&socket, "two seats in use", total(2)).await;
    assert!(
        tmux(&socket, &["send-keys", "-t", "lm", "q"])
            .status
            .success()
    );
    let started = std::time::Instant::now();
    while tmux(&socket, &["has-session", "-t", "lm"]).status.success() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "q did not end the live view"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tmux(&socket, &["kill-server"]);

    let table = stdout_of(
        Command::new(bin("lmbus-monitor").unwrap())
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster])
            .args(["licenses", "--once"]),
    )
    .unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().take(3).eq(["TOTAL", "2", "10"])),
        "{table}"
    );
    slave.shutdown().await;
    broker.stop().await.unwrap();
}
