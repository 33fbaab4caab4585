#![allow(clippy::unwrap_used)]
//! The observability kit in `deploy/` (issue 23 item 5): the Grafana dashboard and the
//! Prometheus alert rules name only metrics the binaries really export, and the rules pass
//! `promtool check rules` (Debian's `prometheus` package; `cargo xtask test` installs it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lmbus_schemas::{Limits, Role};
use lmbus_slave::SlaveAgent;
use lmbus_tests::*;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// The metric names an exposition offers: each `# TYPE` family, and for a histogram its
/// `_bucket`, `_sum` and `_count` series.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Every `lmbus_…` name in `text`.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("lmbus_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let before = rest[..at].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LMBUS_PROMTOOL") {
        return Some(PathBuf::from(p));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
}

/// Steps: a broker in allotment mode with `--metrics` and a master license with an offline
/// limit (so that the per-slave seat gauges and the offline-limit gauges are exported too),
/// and an embedded slave that registers an agent; the broker's scrape (as leader) and the
/// slave's metrics give the names the binaries export. Every `lmbus_` name in
/// `deploy/grafana/lmbus.json` (each panel's queries) and in
/// `deploy/prometheus/lmbus-rules.yaml` is among them, every panel has a query, the
/// dashboard shows every `lmbus_allot_` and `lmbus_license_sync_` metric (a histogram
/// through its series), and `promtool check rules` accepts the rules (when promtool is
/// installed; `cargo xtask test` installs it, and then `LMBUS_REQUIRE_PROMTOOL=1` makes its
/// absence a failure).
#[tokio::test]
async fn the_dashboard_and_the_alert_rules_use_only_exported_metrics() {
    let f = Fixture::new().await.unwrap();
    let port = free_port();
    let mut license = Vendor::license(
        Role::Master,
        Limits {
            total: Some(3),
            agent_types: [("inbound".to_owned(), 3)].into(),
            ..Limits::default()
        },
    );
    license.issued = time::OffsetDateTime::now_utc().date();
    license.sync_within_days = Some(60);
    let mut cfg = broker_config(
        &f.nats,
        &f.cluster,
        f.vendor.write("offline-master.lic", &license).unwrap(),
        &f.vendor,
        true,
    );
    cfg.allot = allotment(Duration::from_millis(500), Duration::from_secs(5));
    cfg.metrics = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let _broker = Broker::start(cfg).await.unwrap();
    let slave = SlaveAgent::start(f.slave_config("site1").unwrap())
        .await
        .unwrap();
    assert!(slave.register("a1", "inbound").await.unwrap().is_approved());
    // The leader's seat gauges appear within a tick.
    let leader_only = [
        "lmbus_seats_in_use",
        "lmbus_allot_slave_seats",
        "lmbus_allot_slave_seats_omitted",
        "lmbus_license_sync_overdue",
        "lmbus_license_sync_deadline_timestamp_seconds",
    ];
    let mut names = BTreeSet::new();
    for _ in 0..100 {
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
        names = exported(&text);
        if leader_only.iter().all(|n| names.contains(*n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    names.extend(exported(&slave.metrics_text()));
    for name in leader_only {
        assert!(names.contains(name), "{name} not exported: {names:?}");
    }
    assert!(names.contains("lmbus_slave_mode"), "{names:?}");

    let dashboard_text = std::fs::read_to_string(deploy("grafana/lmbus.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for panel in panels {
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["expr"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            !exprs.is_empty() && exprs.iter().all(|e| !e.trim().is_empty()),
            "panel {} has no query",
            panel["title"]
        );
    }
    // Allotment mode's and the offline limit's metrics each have a panel.
    let shown = referenced(&dashboard_text);
    let unshown: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("lmbus_allot_") || n.starts_with("lmbus_license_sync_"))
        .filter(|n| {
            let histogram_series = ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                n.strip_suffix(suffix)
                    .is_some_and(|base| names.contains(base))
            });
            let through_series = ["_bucket", "_count"]
                .iter()
                .any(|suffix| shown.contains(&format!("{n}{suffix}")));
            !histogram_series && !shown.contains(*n) && !through_series
        })
        .collect();
    assert!(
        unshown.is_empty(),
        "deploy/grafana/lmbus.json has no panel for {unshown:?}"
    );
    let rules_path = deploy("prometheus/lmbus-rules.yaml");
    let rules_text = std::fs::read_to_string(&rules_path).unwrap();
    for (file, text) in [
        ("grafana/lmbus.json", &dashboard_text),
        ("prometheus/lmbus-rules.yaml", &rules_text),
    ] {
        let used = referenced(text);
        assert!(used.len() >= 5, "{file}: {used:?}");
        let unknown: Vec<&String> = used.difference(&names).collect();
        assert!(
            unknown.is_empty(),
            "deploy/{file} names metrics no binary exports: {unknown:?} (exported: {names:?})"
        );
    }

    match promtool() {
        Some(promtool) => {
            let out = std::process::Command::new(&promtool)
                .args(["check", "rules"])
                .arg(&rules_path)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "promtool check rules: {said}");
            eprintln!("checked: {}", said.trim());
        }
        None => {
            assert!(
                std::env::var_os("LMBUS_REQUIRE_PROMTOOL").is_none(),
                "promtool is not installed (Debian's prometheus package)"
            );
            eprintln!(
                "promtool is not installed: the rules' syntax was not checked (cargo xtask test installs Debian's prometheus package)"
            );
        }
    }
    slave.shutdown().await;
}

#[test]
fn names_are_found_in_queries() {
    assert_eq!(
        referenced("max(lmbus_seats_in_use) >= min(lmbus_seats_limit) and xlmbus_no"),
        BTreeSet::from([
            "lmbus_seats_in_use".to_owned(),
            "lmbus_seats_limit".to_owned()
        ])
    );
    let text = "# TYPE lmbus_decision_seconds histogram\n# TYPE lmbus_leader gauge\n";
    assert!(exported(text).contains("lmbus_decision_seconds_bucket"));
    assert!(exported(text).contains("lmbus_leader"));
}
