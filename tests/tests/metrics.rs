//! The broker's Prometheus endpoint: its text parses as the exposition format and its
//! counters and gauges match a scripted workload.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::collections::BTreeMap;

use lmbus_slave::SlaveAgent;
use lmbus_tests::*;

/// Samples of a Prometheus text exposition, `name{labels}` → value. Panics on any line
/// that is not a comment, a blank or `name{k="v",…} value`, and on a sample whose family
/// has no `# TYPE` line before it.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "bad type line: {line}"
            );
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment: {line}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("unclosed labels");
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').unwrap();
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "bad label name: {line}"
                    );
                    assert!(
                        v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                        "bad label value: {line}"
                    );
                }
                name
            }
            None => series,
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no # TYPE before {line}");
        samples.insert(series.to_owned(), value);
    }
    samples
}

async fn scrape(port: u16) -> BTreeMap<String, f64> {
    let text = tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    })
    .await
    .unwrap();
    if std::env::var_os("LMBUS_PRINT_METRICS").is_some() {
        eprintln!("{text}");
    }
    parse(&text)
}

/// Steps: a broker with `--metrics` and a license of 3 seats (inbound 3); one slave
/// registers a1..a3 (approved), a4 (rejected: aggregate_limit) and an agent of an unknown
/// type (rejected), unregisters a1, then registers a4 (approved). The scrape shows 4
/// approvals, one rejection per reason, 1 unregistration, 7 timed decisions, 3 seats in
/// use of 3, one connected slave, leadership, no ledger lag, and the rejection alerts.
#[tokio::test]
async fn metrics_match_a_scripted_workload() {
    let f = Fixture::new().await.unwrap();
    let port = free_port();
    let mut cfg = broker_config(
        &f.nats,
        &f.cluster,
        f.vendor.master(3, &[("inbound", 3)]).unwrap(),
        &f.vendor,
        true,
    );
    cfg.metrics = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let broker = Broker::start(cfg).await.unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    for a in ["a1", "a2", "a3"] {
        assert!(slave.register(a, "inbound").await.unwrap().is_approved());
    }
    assert!(!slave.register("a4", "inbound").await.unwrap().is_approved());
    assert!(!slave.register("b1", "bogus").await.unwrap().is_approved());
    assert!(slave.unregister("a1").await.unwrap());
    assert!(slave.register("a4", "inbound").await.unwrap().is_approved());

    // The gauges are refreshed every tick (100 ms here).
    let mut m = scrape(port).await;
    for _ in 0..100 {
        if m.get("lmbus_seats_in_use_total") == Some(&3.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = scrape(port).await;
    }
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in {m:#?}"))
    };
    assert_eq!(
        get(r#"lmbus_registrations_total{outcome="approved",reason=""}"#),
        4.0
    );
    assert_eq!(
        get(r#"lmbus_registrations_total{outcome="rejected",reason="aggregate_limit"}"#),
        1.0
    );
    assert_eq!(
        get(r#"lmbus_registrations_total{outcome="rejected",reason="unknown_agent_type"}"#),
        1.0
    );
    assert_eq!(get("lmbus_unregistrations_total"), 1.0);
    assert_eq!(get("lmbus_decision_seconds_count"), 7.0);
    assert_eq!(get(r#"lmbus_decision_seconds_bucket{le="+Inf"}"#), 7.0);
    assert!(get(r#"lmbus_decision_seconds_bucket{le="2.5"}"#) <= 7.0);
    // At least the leader's record, the hello and the 5 seat changes were appended.
    let appends = get("lmbus_ledger_append_seconds_count");
    assert!(appends >= 7.0, "{appends} appends");
    assert_eq!(
        get(r#"lmbus_ledger_append_seconds_bucket{le="+Inf"}"#),
        appends
    );
    assert!(get("lmbus_ledger_append_seconds_sum") > 0.0);
    assert_eq!(get("lmbus_seats_in_use_total"), 3.0);
    assert_eq!(get(r#"lmbus_seats_in_use{agent_type="inbound"}"#), 3.0);
    assert_eq!(get(r#"lmbus_seat_limit{agent_type="inbound"}"#), 3.0);
    assert_eq!(get("lmbus_seat_limit_total"), 3.0);
    assert_eq!(get("lmbus_slaves_connected"), 1.0);
    assert_eq!(get("lmbus_leader"), 1.0);
    assert_eq!(get("lmbus_ledger_lag_records"), 0.0);
    assert!(get("lmbus_ledger_applied_sequence") >= 5.0);
    assert_eq!(
        get(r#"lmbus_alerts_total{kind="registration_rejected",severity="warning"}"#),
        2.0
    );
    slave.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: a broker with 2 seats; a slave daemon's API (served in process) in front of a
/// slave that registers a1, a2 (approved) and a3 (rejected: aggregate_limit) and releases
/// a1. Its `/metrics` parses and shows 2 approvals, 1 rejection by reason, 3 timed
/// answers, 1 unregistration, 1 agent held, the primary master connected, mode connected.
#[tokio::test]
async fn the_slave_daemon_serves_its_metrics() {
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(2, &[], true).await.unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) =
        lmbus_slave::api::bind(slave.clone(), "127.0.0.1:0".parse().unwrap(), async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    let server = tokio::spawn(server);
    for a in ["a1", "a2"] {
        assert!(slave.register(a, "inbound").await.unwrap().is_approved());
    }
    assert!(!slave.register("a3", "inbound").await.unwrap().is_approved());
    assert!(slave.unregister("a1").await.unwrap());
    let m = scrape(addr.port()).await;
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in {m:#?}"))
    };
    assert_eq!(
        get(r#"lmbus_slave_registrations_total{outcome="approved",reason=""}"#),
        2.0
    );
    assert_eq!(
        get(r#"lmbus_slave_registrations_total{outcome="rejected",reason="aggregate_limit"}"#),
        1.0
    );
    assert_eq!(get("lmbus_slave_registration_seconds_count"), 3.0);
    // The hello, 3 registrations and 1 unregistration were answered by the primary.
    let answered = get(r#"lmbus_slave_master_seconds_count{master="primary"}"#);
    assert!(answered >= 5.0, "{answered} answers");
    assert_eq!(
        get(r#"lmbus_slave_master_seconds_bucket{master="primary",le="+Inf"}"#),
        answered
    );
    assert_eq!(get("lmbus_slave_unregistrations_total"), 1.0);
    assert_eq!(get("lmbus_slave_agents_total"), 1.0);
    assert_eq!(get(r#"lmbus_slave_agents{agent_type="inbound"}"#), 1.0);
    assert_eq!(
        get(r#"lmbus_slave_master_connected{master="primary"}"#),
        1.0
    );
    assert_eq!(get(r#"lmbus_slave_mode{mode="connected"}"#), 1.0);
    assert_eq!(get(r#"lmbus_slave_mode{mode="restricted"}"#), 0.0);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    slave.shutdown().await;
    broker.stop().await.unwrap();
}
