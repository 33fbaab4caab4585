#![allow(clippy::unwrap_used)]
//! Usage reports: the leader's daily report at its time of day and `admin report` on
//! demand, written as JSON and CSV, published on the report subject and mailed to a local
//! SMTP sink process (`tests/tools/smtp_sink.py`), with the right peaks and no agent ids.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use lmbus_broker::report::{ReportConfig, SmtpConfig, SmtpTls};
use lmbus_schemas::UsageReport;
use lmbus_schemas::report::TypeUsage;
use lmbus_slave::{Outcome, SlaveAgent};
use lmbus_tests::*;

/// The SMTP sink: a real process listening on a free port, writing each message to `dir`.
fn smtp_sink(dir: &Path) -> (Proc, u16) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/smtp_sink.py");
    let mut proc = Proc::spawn(
        Command::new("python3")
            .arg(script)
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )
    .expect("python3 runs the SMTP sink");
    let stdout = proc.child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let port = line
        .trim()
        .strip_prefix("port ")
        .unwrap_or_else(|| panic!("the SMTP sink said {line:?}"))
        .parse()
        .unwrap();
    (proc, port)
}

fn mails(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "eml"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

const AGENTS: [&str; 5] = [
    "agent-in-1",
    "agent-in-2",
    "agent-in-3",
    "agent-out-1",
    "agent-x-9",
];

fn no_agent_ids(what: &str, text: &str) {
    for agent in AGENTS {
        assert!(!text.contains(agent), "{what} names agent {agent}:\n{text}");
    }
}

fn line<'a>(r: &'a UsageReport, agent_type: &str) -> &'a TypeUsage {
    r.agent_types
        .iter()
        .find(|t| t.agent_type == agent_type)
        .unwrap_or_else(|| panic!("no line for {agent_type}: {r:#?}"))
}

/// The scripted period: 3 seats in all, 2 inbound. s1 registers two inbound agents, a third
/// (rejected: type limit) and an outbound one (total 3: the peak); s2 registers
/// one (rejected: the total is used up); s1 unregisters one inbound agent.
fn check(r: &UsageReport) {
    assert_eq!(line(r, "inbound").peak, 2, "{r:#?}");
    assert_eq!(line(r, "inbound").limit, Some(2));
    assert_eq!(line(r, "outbound").peak, 1);
    assert_eq!(line(r, "total").peak, 3);
    assert_eq!(line(r, "total").limit, Some(3));
    assert!(line(r, "total").average > 0.0);
    assert_eq!(r.rejections.get("type_limit"), Some(&1), "{r:#?}");
    assert_eq!(r.rejections.get("aggregate_limit"), Some(&1), "{r:#?}");
    assert_eq!(r.events.slave_connects, 2);
    let s2 = r.slaves.iter().find(|s| s.slave == "s2").unwrap();
    assert_eq!((s2.connects, s2.rejections), (1, 1));
    assert_eq!(r.context, "production");
}

/// Steps: an SMTP sink process; a broker whose reports go to a directory, the report
/// subject and the sink (plain SMTP), with its daily report due at the next minute (UTC);
/// the scripted period above. `lmbus-broker admin report --json` (the real binary) prints
/// the report of the period so far: right peaks, limits, rejections by reason, connects;
/// the JSON and CSV files are in the directory, the same report was published on
/// `report.usage`, one mail reached the sink with the text table and both attachments;
/// none of them names an agent. Then the daily report comes by itself at its minute
/// (waited for up to 150 s): marked daily, same peaks, its period ends at that minute,
/// and a second mail arrives. Each report raised a `usage_report` alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_daily_and_on_demand_with_files_subject_and_mail() {
    let f = Fixture::new().await.unwrap();
    let mail_dir = tempfile::tempdir().unwrap();
    let report_dir = tempfile::tempdir().unwrap();
    let (_sink, port) = smtp_sink(mail_dir.path());
    let now = time::OffsetDateTime::now_utc();
    // The next whole minute, or the one after when this one is nearly over.
    let ahead = if now.second() > 45 { 2 } else { 1 };
    let at_minute = (u32::from(now.hour()) * 60 + u32::from(now.minute()) + ahead) % 1440;
    let mut cfg = broker_config(
        &f.nats,
        &f.cluster,
        f.vendor
            .master(3, &[("inbound", 2), ("outbound", 3)])
            .unwrap(),
        &f.vendor,
        true,
    );
    cfg.report = ReportConfig {
        dir: Some(report_dir.path().to_path_buf()),
        at_minute,
        smtp: Some(SmtpConfig {
            host: "127.0.0.1".into(),
            port,
            tls: SmtpTls::None,
            user: None,
            password: None,
            from: "lmbus <lmbus@example.test>".into(),
            to: vec!["ops@example.test".into(), "finance@example.test".into()],
        }),
    };
    let mut published = f.usage_reports().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = Broker::start(cfg).await.unwrap();
    let s1 = SlaveAgent::start(f.slave_config("s1").unwrap())
        .await
        .unwrap();
    let s2 = SlaveAgent::start(f.slave_config("s2").unwrap())
        .await
        .unwrap();
    for (agent, agent_type) in [("agent-in-1", "inbound"), ("agent-in-2", "inbound")] {
        assert!(s1.register(agent, agent_type).await.unwrap().is_approved());
    }
    let third = s1.register("agent-in-3", "inbound").await.unwrap();
    assert!(matches!(third, Outcome::Rejected { .. }), "{third:?}");
    assert!(
        s1.register("agent-out-1", "outbound")
            .await
            .unwrap()
            .is_approved()
    );
    let over = s2.register("agent-x-9", "outbound").await.unwrap();
    assert!(matches!(over, Outcome::Rejected { .. }), "{over:?}");
    assert!(s1.unregister("agent-in-2").await.unwrap());
    // The rejections' alerts must be in the alert stream before the report reads it.
    alerts
        .wait_count("two rejections", 2, |a| {
            a.kind == lmbus_schemas::AlertKind::RegistrationRejected
        })
        .await
        .unwrap();
    // Published is not stored yet: wait until the alert stream holds them.
    let js = async_nats::jetstream::new(f.client.clone());
    let stream = lmbus_schemas::Subjects::new(&f.cluster)
        .unwrap()
        .alert_stream();
    eventually("the rejections are in the alert stream", || async {
        lmbus_ops::stored(&js, &stream, None)
            .await
            .is_ok_and(|stored| {
                stored
                    .messages
                    .iter()
                    .filter_map(|(_, _, m)| lmbus_schemas::decode::<lmbus_schemas::Alert>(m).ok())
                    .filter(|a| a.kind == lmbus_schemas::AlertKind::RegistrationRejected)
                    .count()
                    == 2
            })
    })
    .await
    .unwrap();

    let stdout = stdout_of(
        Command::new(bin("lmbus-broker").unwrap())
            .args(["admin", "report", "--json", "--nats", &f.nats.url()])
            .args(["--cluster", &f.cluster]),
    )
    .unwrap();
    let on_demand: UsageReport = serde_json::from_str(&stdout).unwrap();
    eprintln!("seen: admin report --json:\n{stdout}");
    assert!(!on_demand.daily);
    check(&on_demand);
    no_agent_ids("the report", &stdout);

    let mut files: Vec<_> = std::fs::read_dir(report_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].ends_with(".csv") && names[1].ends_with(".json"),
        "{names:?}"
    );
    let csv = std::fs::read_to_string(&files[0]).unwrap();
    let json = std::fs::read_to_string(&files[1]).unwrap();
    assert_eq!(
        serde_json::from_str::<UsageReport>(&json).unwrap(),
        on_demand
    );
    assert!(csv.starts_with("section,name,metric,value\n"), "{csv}");
    assert!(csv.contains("agent_type,total,peak,3\n"), "{csv}");
    assert!(csv.contains("rejections,type_limit,count,1\n"), "{csv}");
    no_agent_ids("the CSV file", &csv);

    let message = tokio::time::timeout(Duration::from_secs(5), published.next())
        .await
        .unwrap()
        .unwrap();
    let from_subject: UsageReport = lmbus_schemas::decode(&message.payload).unwrap();
    // `on_demand` went through JSON text, which may move an average by one unit in the
    // last place: compare the published one through the same text.
    let through_json: UsageReport =
        serde_json::from_str(&serde_json::to_string(&from_subject).unwrap()).unwrap();
    assert_eq!(through_json, on_demand);

    let first = mails(mail_dir.path());
    assert_eq!(first.len(), 1);
    let mail = &first[0];
    eprintln!("seen: the mail at the sink (first 40 lines):");
    for l in mail.lines().take(40) {
        eprintln!("  {l}");
    }
    assert!(
        mail.contains("X-Envelope-To: <ops@example.test>, <finance@example.test>"),
        "{mail}"
    );
    assert!(
        mail.contains("Subject: lmbus usage report, cluster"),
        "{mail}"
    );
    assert!(mail.contains("AGENT TYPE"), "{mail}");
    assert!(
        mail.contains("usage.csv") && mail.contains("usage.json"),
        "{mail}"
    );
    no_agent_ids("the mail", mail);

    // The daily report, at its minute.
    let message = tokio::time::timeout(Duration::from_secs(150), published.next())
        .await
        .expect("no daily report within 150 s of its time")
        .unwrap();
    let daily: UsageReport = lmbus_schemas::decode(&message.payload).unwrap();
    eprintln!(
        "seen: daily report for {} to {}, usage counted from {}",
        daily.period_start, daily.period_end, daily.usage_counted_from
    );
    assert!(daily.daily);
    check(&daily);
    let end = time::OffsetDateTime::parse(
        &daily.period_end,
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(
        (
            u32::from(end.hour()) * 60 + u32::from(end.minute()),
            end.second()
        ),
        (at_minute, 0)
    );
    eventually("the daily report's mail", || async {
        mails(mail_dir.path()).len() == 2
    })
    .await
    .unwrap();
    let reported = alerts
        .wait_count("two usage_report alerts", 2, |a| {
            a.kind == lmbus_schemas::AlertKind::UsageReport
        })
        .await
        .unwrap();
    eprintln!("seen: {}", reported[1].message);
    s1.shutdown().await;
    s2.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: a production master (cluster P, 10 seats, 5 inbound) and a backup master
/// (cluster B, a backup-context license, 4 seats) on one NATS; two agents on a slave of P,
/// one on a slave of B. `lmbus-broker admin report --cluster P --beside B` (the real
/// binary) asks both masters and prints their reports side by side: each master's limit,
/// peak and average per type in its own column, and the backup column says backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_and_backup_reports_side_by_side() {
    use lmbus_schemas::{Context, Limits, Role};
    let f = Fixture::new().await.unwrap();
    let production = Broker::start(broker_config(
        &f.nats,
        &f.cluster,
        f.vendor.master(10, &[("inbound", 5)]).unwrap(),
        &f.vendor,
        true,
    ))
    .await
    .unwrap();
    let backup_cluster = cluster_name();
    let mut backup_license = Vendor::license(
        Role::Master,
        Limits {
            total: Some(4),
            ..Limits::default()
        },
    );
    backup_license.context = Context::Backup;
    backup_license.backs = Some(uuid::Uuid::new_v4());
    let backup_license = f.vendor.write("backup.lic", &backup_license).unwrap();
    let mut backup_cfg = broker_config(&f.nats, &backup_cluster, backup_license, &f.vendor, true);
    backup_cfg.broker_id = "backup-broker".into();
    // The production it backs is at a site whose beats do not reach this NATS (a split):
    // both serve at once, which is what a side-by-side report is there to show.
    backup_cfg.production_cluster = Some(cluster_name());
    let backup = Broker::start(backup_cfg).await.unwrap();
    let p1 = SlaveAgent::start(f.slave_config("p1").unwrap())
        .await
        .unwrap();
    let mut b1_cfg = f.slave_config("b1").unwrap();
    b1_cfg.cluster = backup_cluster.clone();
    // An unlicensed slave declares its context; the backup master refuses production's.
    b1_cfg.context = Some(Context::Backup);
    // The backup serves once it has listened for one lease and heard no production.
    let started = std::time::Instant::now();
    let b1 = loop {
        match SlaveAgent::start(b1_cfg.clone()).await {
            Ok(b1) => break b1,
            Err(e) if started.elapsed() < WAIT => {
                eprintln!("the backup does not serve yet: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the backup never served: {e}"),
        }
    };
    assert!(
        p1.register("agent-p-1", "inbound")
            .await
            .unwrap()
            .is_approved()
    );
    assert!(
        p1.register("agent-p-2", "inbound")
            .await
            .unwrap()
            .is_approved()
    );
    assert!(
        b1.register("agent-b-1", "inbound")
            .await
            .unwrap()
            .is_approved()
    );

    let text = stdout_of(
        Command::new(bin("lmbus-broker").unwrap())
            .args(["admin", "report", "--nats", &f.nats.url()])
            .args(["--cluster", &f.cluster, "--beside", &backup_cluster]),
    )
    .unwrap();
    eprintln!("seen: admin report --beside:\n{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row:\n{text}"))
            .split_whitespace()
            .skip(1)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(
        text.contains(&format!("{} (production)", f.cluster)),
        "{text}"
    );
    assert!(
        text.contains(&format!("{backup_cluster} (backup)")),
        "{text}"
    );
    // LIMIT PEAK (average left out: it depends on timing) for each master.
    let inbound = row("inbound");
    assert_eq!(inbound[..2], ["5", "2"], "{text}");
    assert_eq!(inbound[3..5], ["-", "1"], "{text}");
    let total = row("total");
    assert_eq!(total[..2], ["10", "2"], "{text}");
    assert_eq!(total[3..5], ["4", "1"], "{text}");
    no_agent_ids("the side-by-side report", &text);
    p1.shutdown().await;
    b1.shutdown().await;
    production.stop().await.unwrap();
    backup.stop().await.unwrap();
}

/// Steps: a broker whose report mail goes to a port where nothing listens and whose report
/// directory cannot be created (a path under a regular file). `admin report` still prints
/// the report, then fails naming both problems; the report was still published on the
/// subject, and a `usage_report` alert of severity warning lists the problems.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_outputs_that_fail_are_named_and_alerted() {
    let f = Fixture::new().await.unwrap();
    let blocker = tempfile::NamedTempFile::new().unwrap();
    let closed_port = free_port();
    let mut cfg = broker_config(
        &f.nats,
        &f.cluster,
        f.vendor.master(3, &[]).unwrap(),
        &f.vendor,
        true,
    );
    cfg.report = ReportConfig {
        dir: Some(blocker.path().join("reports")),
        at_minute: 0,
        smtp: Some(SmtpConfig {
            host: "127.0.0.1".into(),
            port: closed_port,
            tls: SmtpTls::None,
            user: None,
            password: None,
            from: "lmbus@example.test".into(),
            to: vec!["ops@example.test".into()],
        }),
    };
    let mut published = f.usage_reports().await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let broker = Broker::start(cfg).await.unwrap();
    let out = Command::new(bin("lmbus-broker").unwrap())
        .args(["admin", "report", "--nats", &f.nats.url()])
        .args(["--cluster", &f.cluster])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("seen: admin report with broken outputs:\n{stdout}{stderr}");
    assert!(!out.status.success());
    assert!(stdout.contains("AGENT TYPE"), "{stdout}");
    assert!(
        stderr.contains("cannot create the report directory"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "cannot mail the report through 127.0.0.1:{closed_port}"
        )),
        "{stderr}"
    );
    let message = tokio::time::timeout(Duration::from_secs(5), published.next())
        .await
        .unwrap()
        .unwrap();
    assert!(lmbus_schemas::decode::<UsageReport>(&message.payload).is_ok());
    let alert = alerts
        .wait_for("the usage_report alert", |a| {
            a.kind == lmbus_schemas::AlertKind::UsageReport
        })
        .await
        .unwrap();
    assert_eq!(alert.severity, lmbus_schemas::Severity::Warning);
    assert!(alert.message.contains("problems:"), "{}", alert.message);
    broker.stop().await.unwrap();
}
