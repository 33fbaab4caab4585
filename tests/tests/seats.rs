//! Who holds what: `lmbus-broker admin seats` (every seat with its slave, agent, type, since
//! when and the replica that granted it; filters; JSON) and `admin release` finding the
//! slave from the agent, against a real broker and nats-server.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lmbus_slave::SlaveAgent;
use lmbus_tests::*;

fn admin(f: &Fixture, args: &[&str]) -> Output {
    Command::new(bin("lmbus-broker").unwrap())
        .arg("admin")
        .args(args)
        .args(["--nats", &f.nats.url(), "--cluster", &f.cluster])
        .env("USER", "seat-test")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn seats_json(f: &Fixture, filters: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["seats", "--json"];
    args.extend_from_slice(filters);
    let doc: serde_json::Value = serde_json::from_str(&ok(&admin(f, &args))).unwrap();
    doc["seats"].as_array().unwrap().clone()
}

fn now_ms() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

/// Steps: slaves s1 (a1 inbound, a2 outbound), s2 (a1 inbound) and s3 (b1 inbound) register
/// through one broker. `admin seats --json` lists the four seats, each granted by the
/// broker's id at a time between before and after the registrations; the table names them
/// too; --slave, --type and --agent filter. The broker is restarted a second later: the
/// new one, rebuilt from the ledger, lists the same times (from the records, not its own
/// clock). `admin release --agent b1` finds s3 alone; `--agent a1` is refused naming s1 and
/// s2; releasing all of s2 without --yes and without a terminal is refused and changes
/// nothing; with --yes it releases. Every step is checked in `admin seats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_seats_lists_who_holds_what_and_release_finds_the_slave() {
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(10, &[], true).await.unwrap();
    let before = now_ms();
    let s1 = SlaveAgent::start(f.slave_config("s1").unwrap())
        .await
        .unwrap();
    let s2 = SlaveAgent::start(f.slave_config("s2").unwrap())
        .await
        .unwrap();
    let s3 = SlaveAgent::start(f.slave_config("s3").unwrap())
        .await
        .unwrap();
    for (slave, agent, agent_type) in [
        (&s1, "a1", "inbound"),
        (&s1, "a2", "outbound"),
        (&s2, "a1", "inbound"),
        (&s3, "b1", "inbound"),
    ] {
        let outcome = tokio::time::timeout(WAIT, slave.register(agent, agent_type))
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.is_approved(), "{agent}: {outcome:?}");
    }
    let after = now_ms();

    let seats = seats_json(&f, &[]);
    let rows: Vec<(&str, &str, &str)> = seats
        .iter()
        .map(|s| {
            (
                s["slave"].as_str().unwrap(),
                s["agent_id"].as_str().unwrap(),
                s["agent_type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("s1", "a1", "inbound"),
            ("s1", "a2", "outbound"),
            ("s2", "a1", "inbound"),
            ("s3", "b1", "inbound")
        ],
        "{seats:#?}"
    );
    for seat in &seats {
        let since = seat["since_ms"].as_u64().unwrap();
        assert!(before <= since && since <= after, "{seat}");
        assert_eq!(seat["granted_by"], "test-broker", "{seat}");
    }
    let table = ok(&admin(&f, &["seats"]));
    eprintln!("seen: lmbus-broker admin seats:\n{table}");
    assert!(
        table.contains("GRANTED BY") && table.contains("test-broker"),
        "{table}"
    );
    assert!(table.contains("4 seats on cluster"), "{table}");
    assert_eq!(seats_json(&f, &["--slave", "s1"]).len(), 2);
    assert_eq!(seats_json(&f, &["--type", "outbound"]).len(), 1);
    let a1 = seats_json(&f, &["--agent", "a1"]);
    assert_eq!(a1.len(), 2, "{a1:#?}");
    assert!(seats_json(&f, &["--slave", "nobody"]).is_empty());

    // Rebuilt from the ledger a second later: the same grant times.
    broker.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let broker = f.broker(10, &[], true).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let again = loop {
        let out = admin(&f, &["seats", "--json"]);
        if out.status.success() {
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let listed = doc["seats"].as_array().unwrap().clone();
            if listed.len() == 4 {
                break listed;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted broker never listed the four seats"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // What the master is to each slave comes from heartbeats, not the ledger: compare the rest.
    let without_master = |list: &[serde_json::Value]| -> Vec<serde_json::Value> {
        list.iter()
            .map(|s| {
                let mut s = s.clone();
                s.as_object_mut().unwrap().remove("master");
                s
            })
            .collect()
    };
    assert_eq!(
        without_master(&again),
        without_master(&seats),
        "the seats as the rebuilt broker lists them"
    );

    let text = ok(&admin(&f, &["release", "--agent", "b1"]));
    assert!(text.contains("released 1 seat of slave s3: b1"), "{text}");
    let error = refused(&admin(&f, &["release", "--agent", "a1"]));
    assert!(
        error.contains("agent a1 holds seats on 2 slaves (s1, s2): name one with --slave"),
        "{error}"
    );
    let error = refused(&admin(&f, &["release", "--agent", "ghost"]));
    assert!(error.contains("agent ghost holds no seat"), "{error}");
    let error = refused(&admin(&f, &["release", "--slave", "s2"]));
    assert!(
        error.contains("needs confirmation") && error.contains("--yes"),
        "{error}"
    );
    assert_eq!(seats_json(&f, &["--slave", "s2"]).len(), 1);
    let text = ok(&admin(&f, &["release", "--slave", "s2", "--yes"]));
    assert!(text.contains("released 1 seat of slave s2: a1"), "{text}");
    let left: Vec<_> = seats_json(&f, &[])
        .iter()
        .map(|s| s["slave"].as_str().unwrap().to_owned() + "/" + s["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["s1/a1", "s1/a2"]);
    s1.shutdown().await;
    s2.shutdown().await;
    s3.shutdown().await;
    broker.stop().await.unwrap();
}
