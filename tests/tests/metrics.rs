//! The broker's and the slave's Prometheus endpoints: their text parses as the exposition
//! format (with the `prometheus-parse` crate), follows the naming conventions and its
//! counters and gauges match a scripted workload; the broker's `/healthz` answers.

#![allow(clippy::unwrap_used)] // in a test, a panic is the failure report

use std::collections::BTreeMap;

use lmbus_slave::SlaveAgent;
use lmbus_tests::*;

/// Samples of a Prometheus text exposition, `name{labels}` → value (labels sorted by name;
/// a histogram's buckets as `name_bucket{…,le="…"}`), parsed by the `prometheus-parse`
/// crate. Panics on what that parser skips or cannot type and on a name that breaks
/// Prometheus' conventions: a line it ignores, a sample without `# TYPE` and `# HELP`, a
/// counter not ending in `_total`, a gauge or histogram ending in it, an empty label value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    use prometheus_parse::{LineInfo, Scrape, Value};
    for line in text.lines() {
        assert!(
            !matches!(LineInfo::parse(line), LineInfo::Ignored),
            "the parser skips this line: {line:?}"
        );
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let histograms: std::collections::BTreeSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| matches!(s.value, Value::Histogram(_)))
        .map(|s| s.metric.as_str())
        .collect();
    let series = |name: &str, labels: &BTreeMap<&String, &String>| {
        if labels.is_empty() {
            name.to_owned()
        } else {
            let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", pairs.join(","))
        }
    };
    let mut samples = BTreeMap::new();
    for s in &scrape.samples {
        let labels: BTreeMap<&String, &String> = s.labels.iter().collect();
        assert!(
            labels.values().all(|v| !v.is_empty()),
            "an empty label value on {}: {labels:?}",
            s.metric
        );
        let family = match &s.value {
            // Only a histogram's _sum and _count have no # TYPE line of their own.
            Value::Untyped(_) => ["_sum", "_count"]
                .iter()
                .find_map(|suffix| s.metric.strip_suffix(suffix))
                .filter(|f| histograms.contains(f))
                .unwrap_or_else(|| panic!("no # TYPE for {}", s.metric)),
            _ => s.metric.as_str(),
        };
        assert!(scrape.docs.contains_key(family), "no # HELP for {family}");
        match &s.value {
            Value::Counter(v) => {
                assert!(
                    s.metric.ends_with("_total"),
                    "counter {} without _total",
                    s.metric
                );
                samples.insert(series(&s.metric, &labels), *v);
            }
            Value::Gauge(v) | Value::Untyped(v) => {
                assert!(!s.metric.ends_with("_total"), "{} ends in _total", s.metric);
                samples.insert(series(&s.metric, &labels), *v);
            }
            Value::Histogram(buckets) => {
                assert!(
                    s.metric.ends_with("_seconds"),
                    "histogram {} has no unit",
                    s.metric
                );
                for b in buckets {
                    let le = if b.less_than.is_infinite() {
                        "+Inf".to_owned()
                    } else {
                        b.less_than.to_string()
                    };
                    let mut labels = s.labels.iter().collect::<BTreeMap<_, _>>();
                    let key = "le".to_owned();
                    labels.insert(&key, &le);
                    samples.insert(series(&format!("{}_bucket", s.metric), &labels), b.count);
                }
            }
            Value::Summary(_) => panic!("no summaries expected: {}", s.metric),
        }
    }
    samples
}

/// `GET http://127.0.0.1:{port}{path}`: its status and body.
async fn get_text(port: u16, path: &'static str) -> (u16, String) {
    try_get_text(port, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// The same, `Err` while nothing listens there yet.
async fn try_get_text(port: u16, path: &'static str) -> Result<(u16, String), String> {
    tokio::task::spawn_blocking(move || {
        let mut response = ureq::get(&format!("http://127.0.0.1:{port}{path}"))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        Ok((
            status,
            response
                .body_mut()
                .read_to_string()
                .map_err(|e| e.to_string())?,
        ))
    })
    .await
    .unwrap()
}

async fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, text) = get_text(port, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    if std::env::var_os("LMBUS_PRINT_METRICS").is_some() {
        eprintln!("{text}");
    }
    parse(&text)
}

/// Steps: a broker with `--metrics` and a license of 3 seats (inbound 3); one slave
/// registers a1..a3 (approved), a4 (rejected: aggregate_limit) and an agent of an unknown
/// type (rejected), unregisters a1, then registers a4 (approved). The scrape shows 4
/// approvals (without a reason label), one rejection per reason, 1 unregistration, 7 timed
/// decisions, 3 seats in use of 3, the license's expiry, one connected slave, leadership,
/// no ledger lag, the rejection alerts, the build and this process's `process_*` metrics;
/// `/healthz` answers 200 as leader.
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
        if m.get("lmbus_seats_in_use") == Some(&3.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = scrape(port).await;
    }
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in {m:#?}"))
    };
    assert_eq!(get(r#"lmbus_registrations_total{outcome="approved"}"#), 4.0);
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
    assert_eq!(get("lmbus_seats_in_use"), 3.0);
    assert_eq!(
        get(r#"lmbus_agent_type_seats_in_use{agent_type="inbound"}"#),
        3.0
    );
    assert_eq!(
        get(r#"lmbus_agent_type_seats_limit{agent_type="inbound"}"#),
        3.0
    );
    assert_eq!(get("lmbus_seats_limit"), 3.0);
    // The vendor's licenses end on their last valid day; the gauge is the instant after it.
    let license = f.vendor.master(3, &[("inbound", 3)]).unwrap();
    let expires =
        lmbus_schemas::read_license_unverified(&std::fs::read_to_string(&license).unwrap())
            .unwrap()
            .expires;
    assert_eq!(
        get("lmbus_license_expiry_timestamp_seconds"),
        (expires.midnight().assume_utc().unix_timestamp() + 86_400) as f64
    );
    assert_eq!(
        get(&format!(
            r#"lmbus_build_info{{build_date="{}",commit="{}",version="{}"}}"#,
            lmbus_nats::release::BUILD_DATE,
            lmbus_nats::release::COMMIT,
            lmbus_nats::release::VERSION
        )),
        1.0
    );
    // This process's own (the broker runs in it): Linux's /proc read at scrape time.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = get("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "started {started}, now {now}"
    );
    assert!(get("process_resident_memory_bytes") > 1e6);
    assert!(get("process_open_fds") >= 3.0);
    assert!(get("process_max_fds") >= get("process_open_fds"));
    assert!(get("process_cpu_seconds_total") >= 0.0);
    let (status, health) = get_text(port, "/healthz").await;
    assert_eq!(
        (status, health.as_str()),
        (200, "ok: leader, connected to NATS\n")
    );
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
/// answers, 1 unregistration, 1 agent held, the primary master connected, mode connected,
/// the build and the `process_*` metrics.
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
        get(r#"lmbus_slave_registrations_total{outcome="approved"}"#),
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
        get(r#"lmbus_slave_master_seconds_bucket{le="+Inf",master="primary"}"#),
        answered
    );
    assert_eq!(get("lmbus_slave_unregistrations_total"), 1.0);
    assert_eq!(get("lmbus_slave_seats_in_use"), 1.0);
    assert_eq!(
        get(r#"lmbus_slave_agent_type_seats_in_use{agent_type="inbound"}"#),
        1.0
    );
    assert_eq!(
        get(&format!(
            r#"lmbus_build_info{{build_date="{}",commit="{}",version="{}"}}"#,
            lmbus_nats::release::BUILD_DATE,
            lmbus_nats::release::COMMIT,
            lmbus_nats::release::VERSION
        )),
        1.0
    );
    assert!(get("process_open_fds") >= 3.0);
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

/// Steps: a leader with `--metrics` (priority 1) and a second replica of the same cluster
/// with its own `--metrics` (priority 2), which stays standby. The standby's scrape parses,
/// says `lmbus_leader 0`, has the license's limits and expiry and none of the seat and slave
/// gauges; its `/healthz` answers 200 as standby. After its NATS server stops, `/healthz`
/// answers 503.
#[tokio::test]
async fn a_standby_says_it_omits_the_seat_gauges() {
    let f = Fixture::new().await.unwrap();
    let license = f.vendor.master(3, &[("inbound", 3)]).unwrap();
    let (leader_port, standby_port) = (free_port(), free_port());
    let mut cfg = broker_config(&f.nats, &f.cluster, license.clone(), &f.vendor, true);
    cfg.metrics = Some(format!("127.0.0.1:{leader_port}").parse().unwrap());
    let leader = Broker::start(cfg).await.unwrap();
    let mut cfg = broker_config(&f.nats, &f.cluster, license, &f.vendor, true);
    cfg.broker_id = "test-standby".into();
    cfg.priority = 2;
    cfg.metrics = Some(format!("127.0.0.1:{standby_port}").parse().unwrap());
    let standby = Broker::start(cfg).await.unwrap();
    // The metrics servers start beside the brokers: retried until they listen.
    eventually("the leader exports its seat gauges", || async {
        let Ok((200, text)) = try_get_text(leader_port, "/metrics").await else {
            return false;
        };
        let m = parse(&text);
        m.get("lmbus_leader") == Some(&1.0) && m.contains_key("lmbus_seats_in_use")
    })
    .await
    .unwrap();
    eventually("the standby's metrics server listens", || async {
        try_get_text(standby_port, "/metrics").await.is_ok()
    })
    .await
    .unwrap();
    let m = scrape(standby_port).await;
    assert_eq!(m.get("lmbus_leader"), Some(&0.0), "{m:#?}");
    assert_eq!(m.get("lmbus_seats_limit"), Some(&3.0), "{m:#?}");
    assert!(
        m.contains_key("lmbus_license_expiry_timestamp_seconds"),
        "{m:#?}"
    );
    for name in m.keys() {
        assert!(
            !name.contains("seats_in_use") && !name.starts_with("lmbus_slaves_"),
            "a standby exports {name}"
        );
    }
    let (status, health) = get_text(standby_port, "/healthz").await;
    assert_eq!(
        (status, health.as_str()),
        (200, "ok: standby, connected to NATS\n")
    );
    let Fixture { nats, .. } = f;
    drop(nats);
    eventually("/healthz answers 503 without NATS", || async {
        get_text(standby_port, "/healthz").await.0 == 503
    })
    .await
    .unwrap();
    let (_, health) = get_text(standby_port, "/healthz").await;
    assert!(
        health.starts_with("unhealthy: standby, NATS connection"),
        "{health}"
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), standby.stop()).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), leader.stop()).await;
}

/// Registers agents of `host` (type inbound) until it holds `target` seats in the books,
/// waiting 50 ms after a refusal; fails after 20 s.
async fn fill(host: &lmbus_tests::books::Host, books: &lmbus_tests::books::Books, target: usize) {
    let started = tokio::time::Instant::now();
    let mut n = 0;
    while books.held_by(&host.id).len() < target {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{} holds {} of {target} seats after 20 s",
            host.id,
            books.held_by(&host.id).len()
        );
        n += 1;
        let outcome = host
            .register(&format!("{}-{n}", host.id), "inbound")
            .await
            .unwrap();
        if !outcome.is_approved() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Steps: a broker with `--metrics` in allotment mode (refresh 1 s, lease 10 s) and a
/// license of 10 seats; slaves A and B (heartbeat 250 ms) follow it. A's host takes 2
/// seats and releases them: A keeps a free block. B's host registers until it holds all
/// 10, which needs A's block: the leader tells A to give it back, and B's clock runs to its
/// next grant. B then releases 3 (they go to its block). The scrape (polled until it
/// agrees; at most 15 s) shows, for each slave, `lmbus_allot_slave_seats` used and free
/// equal to what the slave's own status says (its agents, and the free seats it may admit
/// from; an absent series counts as 0), no pair omitted, and at least one observation in
/// `lmbus_allot_capacity_move_seconds`, each within 5 s (the horizon is 4 refreshes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allotment_mode_exports_each_slaves_seats_and_the_time_capacity_took_to_move() {
    use lmbus_tests::books::{Books, Host, Limits};
    use std::time::Duration;

    let f = Fixture::new().await.unwrap();
    let port = free_port();
    let mut cfg = f.broker_settings(10, &[], true).unwrap();
    cfg.allot = allotment(Duration::from_secs(1), Duration::from_secs(10));
    cfg.metrics = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let broker = Broker::start(cfg).await.unwrap();
    let books = Books::new(Limits::new(10, &[]));
    let mut hosts = Vec::new();
    for id in ["gauge-a", "gauge-b"] {
        let mut c = f.slave_config(id).unwrap();
        c.heartbeat_interval = Duration::from_millis(250);
        let host = Host::start(c, &books).await.unwrap();
        eventually(&format!("{id} in allotment mode"), || async {
            host.allot().is_ok_and(|v| v.admission == "allotment")
        })
        .await
        .unwrap();
        hosts.push(host);
    }
    let (a, b) = (&hosts[0], &hosts[1]);

    fill(a, &books, 2).await;
    for agent in books.held_by(&a.id).into_keys() {
        a.release(&agent).await.unwrap();
    }
    eventually("the master allots A a block", || async {
        f.status().await.is_ok_and(|s| {
            s.slaves
                .iter()
                .any(|s| s.slave_id == "gauge-a" && s.allotted.values().sum::<u32>() > 0)
        })
    })
    .await
    .unwrap();
    fill(b, &books, 10).await;
    for agent in books.held_by(&b.id).into_keys().take(3) {
        b.release(&agent).await.unwrap();
    }

    let seen = std::sync::Mutex::new(String::new());
    let agreed = eventually("the per-slave gauges equal the slaves' status", || async {
        let m = scrape(port).await;
        let mut diff = Vec::new();
        for h in [a, b] {
            let status = h.slave.status();
            let used = status.agents_by_type.get("inbound").copied().unwrap_or(0);
            let free = h
                .allot()
                .unwrap()
                .allotted
                .get("inbound")
                .copied()
                .unwrap_or(0);
            let gauge = |state: &str| {
                m.get(&format!(
                    r#"lmbus_allot_slave_seats{{agent_type="inbound",slave="{}",state="{state}"}}"#,
                    h.id
                ))
                .copied()
                .unwrap_or(0.0)
            };
            if (gauge("used"), gauge("free")) != (f64::from(used), f64::from(free)) {
                diff.push(format!(
                    "{}: gauges used {} free {}, its status {used} and {free}",
                    h.id,
                    gauge("used"),
                    gauge("free")
                ));
            }
        }
        *seen.lock().unwrap() = diff.join("; ");
        diff.is_empty()
    })
    .await;
    if let Err(e) = agreed {
        panic!("{e}: {}", seen.lock().unwrap());
    }
    let m = scrape(port).await;
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in {m:#?}"))
    };
    assert_eq!(get("lmbus_allot_slave_seats_omitted"), 0.0);
    assert_eq!(
        get(r#"lmbus_allot_slave_seats{agent_type="inbound",slave="gauge-b",state="used"}"#),
        7.0
    );
    let moves = get("lmbus_allot_capacity_move_seconds_count");
    eprintln!(
        "measured: {moves} capacity moves timed, {:.0} ms on average; {} untimed",
        get("lmbus_allot_capacity_move_seconds_sum") * 1000.0 / moves.max(1.0),
        get("lmbus_allot_capacity_moves_untimed_total")
    );
    assert!(moves >= 1.0, "no capacity move timed: {m:#?}");
    assert_eq!(
        get(r#"lmbus_allot_capacity_move_seconds_bucket{le="5"}"#),
        moves
    );
    for h in &hosts {
        h.shutdown().await;
    }
    broker.stop().await.unwrap();
}
