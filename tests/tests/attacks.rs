#![allow(clippy::unwrap_used)]
//! Attacks by a site that wants more seats or to hurt the service, with nothing but its
//! own NATS credentials under `deploy/nats-server.conf`: crafted reply subjects on every
//! message class, replayed and forged hellos, floods of every class, hostile ids and
//! texts on every path, and readers of streams large enough to need flow control. The
//! hosts' books (what each slave was told) are compared with the master's ledger.

use std::time::{Duration, Instant};

use lmbus_nats::NatsAuth;
use lmbus_schemas::{
    AgentClaim, AlertKind, BatchItem, BatchRequest, Heartbeat, Hello, RegisterRequest,
    RejectReason, Reply, Severity, SlaveEvent, SlaveId, SlaveOp, SlaveReport, Subjects,
    UnregisterRequest, decode, encode,
};
use lmbus_slave::{Outcome, SlaveAgent};
use lmbus_tests::*;

fn user(name: &str) -> NatsAuth {
    NatsAuth {
        user: Some(name.into()),
        password: Some(format!("pw-{name}")),
        ..NatsAuth::default()
    }
}

/// A license cluster on a nats-server running the reference configuration: one broker
/// (as user `broker`), and clients as `broker` (to read the ledger, as an auditor would)
/// and `monitor`.
struct Deployment {
    nats: NatsServer,
    vendor: Vendor,
    cluster: String,
    subjects: Subjects,
    broker: Option<Broker>,
    /// The broker as a process instead (`start_process`), with its log file.
    process: Option<(Proc, std::path::PathBuf)>,
    auditor: async_nats::Client,
    monitor: async_nats::Client,
}

impl Deployment {
    async fn start(total: u32) -> Self {
        Self::start_with(total, |config| config).await
    }

    /// With the reference configuration changed by `edit` first.
    async fn start_with(total: u32, edit: impl FnOnce(String) -> String) -> Self {
        Self::start_in(total, edit, lmbus_schemas::Admission::Strict).await
    }

    /// With the master in allotment mode.
    async fn start_allotment(total: u32) -> Self {
        Self::start_in(total, |c| c, lmbus_schemas::Admission::Allotment).await
    }

    async fn start_in(
        total: u32,
        edit: impl FnOnce(String) -> String,
        admission: lmbus_schemas::Admission,
    ) -> Self {
        init_tracing();
        let cluster = cluster_name();
        let nats = NatsServer::start_with_config(&edit(reference_config(&cluster))).unwrap();
        let vendor = Vendor::new().unwrap();
        let license = vendor.master(total, &[]).unwrap();
        let mut cfg = broker_config(&nats, &cluster, license, &vendor, true);
        cfg.nats_auth = user("broker");
        cfg.allot.admission = admission;
        let broker = Broker::start(cfg).await.unwrap();
        let connect = |who: &str| {
            let url = nats.url();
            let auth = user(who);
            async move {
                lmbus_nats::connect(&url, async_nats::ConnectOptions::new(), &auth)
                    .await
                    .unwrap()
            }
        };
        let auditor = connect("broker").await;
        let monitor = connect("monitor").await;
        Self {
            subjects: Subjects::new(&cluster).unwrap(),
            nats,
            vendor,
            cluster,
            broker: Some(broker),
            process: None,
            auditor,
            monitor,
        }
    }

    /// Like `start`, with the broker as an `lmbus-broker run` process whose log (stderr)
    /// goes to a file, to measure what an attack makes it write.
    async fn start_process(total: u32) -> Self {
        let mut d = Self::start(total).await;
        d.broker.take().unwrap().stop().await.unwrap();
        let log = d.vendor.dir().join("broker.log");
        let license = d.vendor.master(total, &[]).unwrap();
        let proc = Proc::spawn(
            std::process::Command::new(bin("lmbus-broker").unwrap())
                .args(["run", "--nats", &d.nats.url(), "--cluster", &d.cluster])
                .arg("--license")
                .arg(&license)
                .arg("--vendor-key")
                .arg(d.vendor.public_key_path())
                .args(["--allow-unlicensed-slaves", "--tick-interval", "100ms"])
                .args(["--id", "test-broker", "--nats-user", "broker"])
                .env("LMBUS_NATS_PASSWORD", "pw-broker")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        )
        .unwrap();
        let (monitor, subjects) = (d.monitor.clone(), d.subjects.clone());
        eventually("the broker process leads", || {
            let (monitor, subjects) = (monitor.clone(), subjects.clone());
            async move {
                lmbus_ops::fetch_status(&monitor, &subjects, Duration::from_millis(500))
                    .await
                    .is_ok_and(|s| s.broker_id == "test-broker")
            }
        })
        .await
        .unwrap();
        d.process = Some((proc, log));
        d
    }

    /// A raw NATS client with site `id`'s credentials and its inbox prefix: what the
    /// attacker has.
    async fn site(&self, id: &str) -> async_nats::Client {
        let slave = SlaveId::new(id).unwrap();
        lmbus_nats::connect(
            &self.nats.url(),
            async_nats::ConnectOptions::new()
                .custom_inbox_prefix(self.subjects.slave_inbox_prefix(&slave)),
            &user(id),
        )
        .await
        .unwrap()
    }

    fn slave_config(&self, id: &str) -> lmbus_slave::SlaveConfig {
        let mut cfg = lmbus_slave::SlaveConfig::new(
            &self.nats.url(),
            &self.cluster,
            SlaveId::new(id).unwrap(),
        );
        cfg.nats_auth = user(id);
        cfg.heartbeat_interval = Duration::from_millis(200);
        cfg
    }

    async fn slave(&self, id: &str) -> SlaveAgent {
        tokio::time::timeout(WAIT, SlaveAgent::start(self.slave_config(id)))
            .await
            .unwrap()
            .unwrap()
    }

    async fn status(&self) -> lmbus_schemas::StatusReply {
        lmbus_ops::fetch_status(&self.monitor, &self.subjects, Duration::from_secs(5))
            .await
            .unwrap()
    }

    /// Every ledger record, decoded (a record that does not decode fails the test), and
    /// the ledger audit's seats.
    async fn ledger(
        &self,
    ) -> (
        Vec<lmbus_broker::ledger::Record>,
        lmbus_broker::ledger::Audit,
    ) {
        let ledger = lmbus_broker::ledger::Ledger::open(&self.auditor, &self.subjects, 1)
            .await
            .unwrap();
        let records = tokio::time::timeout(WAIT, ledger.read_all())
            .await
            .unwrap()
            .unwrap();
        let audit = lmbus_broker::ledger::audit(&records, 1_000_000, &Default::default()).unwrap();
        (records, audit)
    }

    async fn stop(mut self) {
        if let Some(b) = self.broker.take() {
            b.stop().await.unwrap();
        }
        if let Some((mut proc, _)) = self.process.take() {
            proc.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
            let _ = proc.wait_timeout(Duration::from_secs(10));
        }
    }
}

const WAIT: Duration = Duration::from_secs(20);

fn hello(seq: u64, agents: Vec<AgentClaim>) -> Hello {
    Hello {
        instance: uuid::Uuid::new_v4(),
        heartbeat_interval_ms: 1000,
        seq,
        grace_ms: 60_000,
        request_timeout_ms: 2_000,
        agents,
        ..Hello::default()
    }
}

fn register(seq: u64, agent: &str) -> RegisterRequest {
    RegisterRequest {
        request_id: uuid::Uuid::new_v4(),
        seq,
        agent_id: agent.into(),
        agent_type: "inbound".into(),
    }
}

/// One well-formed payload per slave operation, plus garbage.
fn payloads() -> Vec<(SlaveOp, Vec<u8>)> {
    vec![
        (SlaveOp::Hello, encode(&hello(1, vec![])).unwrap()),
        (SlaveOp::Register, encode(&register(1, "x1")).unwrap()),
        (
            SlaveOp::Unregister,
            encode(&UnregisterRequest {
                request_id: uuid::Uuid::new_v4(),
                seq: 2,
                agent_id: "x1".into(),
            })
            .unwrap(),
        ),
        (SlaveOp::Heartbeat, encode(&Heartbeat::default()).unwrap()),
        (
            SlaveOp::Batch,
            encode(&BatchRequest {
                items: vec![BatchItem::Register(register(3, "x2"))],
            })
            .unwrap(),
        ),
        (
            SlaveOp::Report,
            encode(&SlaveReport {
                event: SlaveEvent::Other,
                message: "hi".into(),
            })
            .unwrap(),
        ),
        (
            SlaveOp::Allot,
            encode(&lmbus_schemas::AllotRequest {
                instance: uuid::Uuid::new_v4(),
                seq: 1,
                ops: vec![lmbus_schemas::AllotOp {
                    n: 1,
                    kind: lmbus_schemas::AllotOpKind::Admit,
                    agent_id: "x3".into(),
                    agent_type: "inbound".into(),
                }],
                want: [("inbound".to_owned(), 1000)].into(),
            })
            .unwrap(),
        ),
        (
            SlaveOp::Goodbye,
            encode(&lmbus_schemas::Goodbye {
                instance: uuid::Uuid::new_v4(),
                reason: "bye".into(),
            })
            .unwrap(),
        ),
        (SlaveOp::Register, b"\x00garbage".to_vec()),
    ]
}

/// Sends `payload` as site `from` on operation `op` and returns the decoded answer, if any
/// came within a second.
async fn ask(
    client: &async_nats::Client,
    subjects: &Subjects,
    from: &str,
    op: SlaveOp,
    payload: Vec<u8>,
) -> Option<Reply> {
    let subject = subjects.slave_op(&SlaveId::new(from).unwrap(), op);
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        client.request(subject, payload.into()),
    )
    .await
    .ok()?
    .ok()?;
    Some(decode::<Reply>(&answer.payload).unwrap())
}

/// Steps: the reference configuration, a broker, and an honest site2 holding a seat. As
/// site1 (its own credentials only), every slave operation and garbage are published
/// three times with each of these reply subjects: the ledger's subject, the ledger's purge
/// and delete API, the election lease key, an alert subject, the snapshot manifest,
/// site2's control subject and site2's inbox. Then: the leader is still in its term, every
/// ledger record decodes and was written by the broker, the alert stream holds only alerts,
/// site2 registers again at once, site1 never got a seat or a session, one critical
/// `bad_message` alert names site1, and no alert is blamed on site2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_subjects_outside_the_slaves_inbox_are_never_answered() {
    let d = Deployment::start(5).await;
    let mut tap = AlertTap::new(&d.monitor, &d.cluster).await.unwrap();
    let site2 = d.slave("site2").await;
    assert!(matches!(
        site2.register("b1", "inbound").await.unwrap(),
        Outcome::Approved { .. }
    ));
    let before = d.status().await;
    let (records_before, _) = d.ledger().await;

    let s = &d.subjects;
    let site2_id = SlaveId::new("site2").unwrap();
    let targets = [
        s.ledger(),
        format!("$JS.API.STREAM.PURGE.{}", s.ledger_stream()),
        format!("$JS.API.STREAM.DELETE.{}", s.ledger_stream()),
        format!("$KV.{}.leader", s.election_bucket()),
        s.alert(Severity::Critical, AlertKind::BadMessage),
        s.snapshot_manifest(),
        s.control(&site2_id),
        format!("{}.stolen", s.slave_inbox_prefix(&site2_id)),
    ];
    let attacker = d.site("site1").await;
    let site1 = SlaveId::new("site1").unwrap();
    for _round in 0..3 {
        for target in &targets {
            for (op, payload) in payloads() {
                attacker
                    .publish_with_reply(s.slave_op(&site1, op), target.clone(), payload.into())
                    .await
                    .unwrap();
            }
        }
        attacker.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    assert!(matches!(
        site2.register("b2", "inbound").await.unwrap(),
        Outcome::Approved { .. }
    ));
    eprintln!(
        "seen: site2's registration after the attack took {:?}",
        started.elapsed()
    );
    let after = d.status().await;
    assert_eq!(
        after.leader_term, before.leader_term,
        "the leader stepped down"
    );
    assert!(
        !after.slaves.iter().any(|sl| sl.slave_id == "site1"),
        "site1 got a session: {:?}",
        after.slaves
    );
    let (records, audit) = d.ledger().await;
    assert!(
        records.len() > records_before.len(),
        "site2's grant is recorded"
    );
    assert!(
        records.iter().all(|r| r.entry.writer == "test-broker"),
        "a record not written by the broker: {records:?}"
    );
    assert_eq!(
        audit.seats.get("site2").map(|m| m.len()),
        Some(2),
        "{:?}",
        audit.seats
    );
    assert!(!audit.seats.contains_key("site1"));
    let (mut stored, until) = lmbus_monitor::alert_source(
        &d.monitor,
        s,
        lmbus_monitor::Start::Since(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let until = until.unwrap();
    let mut read = 0u64;
    while read < until {
        let next = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut stored))
            .await
            .unwrap()
            .unwrap();
        let incoming = next.unwrap_or_else(|e| panic!("an alert record that is not an alert: {e}"));
        decode::<lmbus_schemas::Alert>(&incoming.payload)
            .unwrap_or_else(|e| panic!("a record in the alert stream that is not an alert: {e}"));
        read = incoming.sequence.unwrap_or(until);
    }
    let flagged = tap
        .wait_for("naming site1's forged reply subjects", |a| {
            a.kind == AlertKind::BadMessage
                && a.severity == Severity::Critical
                && a.slave.as_deref() == Some("site1")
        })
        .await
        .unwrap();
    eprintln!("seen: {}", flagged.message);
    assert!(
        flagged.message.contains("outside its inbox"),
        "{}",
        flagged.message
    );
    assert!(
        !tap.seen
            .iter()
            .any(|a| a.kind == AlertKind::BadMessage && a.slave.as_deref() == Some("site2")),
        "an alert blamed site2: {:#?}",
        tap.seen
    );
    site2.shutdown().await;
    d.stop().await;
}

/// Steps: a 2-seat license; site1's slave holds a1 and a2 (its hello captured on the way,
/// as anyone with the broker's view could). As site1, the captured hello is sent again
/// verbatim: refused `replayed`, and site2 still cannot take a seat. Then a forged hello
/// (a far higher number, no agents) does release site1's seats; site1's next heartbeat
/// books disagree, the master asks for a hello, and the slave (numbering above the forged
/// one) gets its seats back: within two seconds the master's seats equal the hosts'
/// books again, and site2 is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_hello_takes_no_seat_and_a_forged_one_is_reconciled() {
    let d = Deployment::start(2).await;
    let mut tap = AlertTap::new(&d.monitor, &d.cluster).await.unwrap();
    let s = &d.subjects;
    let site1_id = SlaveId::new("site1").unwrap();
    let mut hellos = d
        .auditor
        .subscribe(s.slave_op(&site1_id, SlaveOp::Hello))
        .await
        .unwrap();
    d.auditor.flush().await.unwrap();
    let site1 = d.slave("site1").await;
    for a in ["a1", "a2"] {
        assert!(matches!(
            site1.register(a, "inbound").await.unwrap(),
            Outcome::Approved { .. }
        ));
    }
    let captured = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut hellos))
        .await
        .unwrap()
        .unwrap()
        .payload
        .to_vec();

    let attacker = d.site("site1").await;
    let replayed = ask(&attacker, s, "site1", SlaveOp::Hello, captured.clone()).await;
    assert!(
        matches!(
            replayed,
            Some(Reply::Refused {
                reason: RejectReason::Replayed,
                ..
            })
        ),
        "{replayed:?}"
    );
    let site2 = d.slave("site2").await;
    let refused = site2.register("c1", "inbound").await.unwrap();
    assert!(
        matches!(
            refused,
            Outcome::Rejected {
                reason: RejectReason::AggregateLimit,
                ..
            }
        ),
        "the license was exceeded after a replayed hello: {refused:?}"
    );
    tap.wait_for("about the replayed hello", |a| {
        a.kind == AlertKind::SlaveRefused && a.reason == Some(RejectReason::Replayed)
    })
    .await
    .unwrap();

    let mut forged: Hello = decode(&captured).unwrap();
    forged.seq = 1_000_000;
    forged.agents.clear();
    forged.pending.clear();
    forged.request_seq = None;
    let answer = ask(
        &attacker,
        s,
        "site1",
        SlaveOp::Hello,
        encode(&forged).unwrap(),
    )
    .await;
    assert!(matches!(answer, Some(Reply::Welcome(_))), "{answer:?}");
    let forged_at = Instant::now();
    let hosts = |slave: &SlaveAgent| {
        slave
            .agents()
            .into_iter()
            .map(|c| c.agent_id)
            .collect::<Vec<_>>()
    };
    eventually("the master holds site1's seats again", || async {
        d.status()
            .await
            .slaves
            .iter()
            .any(|sl| sl.slave_id == "site1" && sl.in_use == 2)
    })
    .await
    .unwrap();
    let healed = forged_at.elapsed();
    eprintln!("seen: the forged hello's damage lasted {healed:?} (heartbeat every 200 ms)");
    assert!(healed < Duration::from_secs(2), "{healed:?}");
    let (_, audit) = d.ledger().await;
    let master: Vec<String> = audit
        .seats
        .get("site1")
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(
        master,
        hosts(&site1),
        "the master's books and site1's hosts' differ"
    );
    assert!(hosts(&site2).is_empty());
    assert!(matches!(
        site2.register("c2", "inbound").await.unwrap(),
        Outcome::Rejected { .. }
    ));
    site1.shutdown().await;
    site2.shutdown().await;
    d.stop().await;
}

/// Steps: honest site1 and site2 hold seats. With site1's credentials only: a goodbye on
/// site2's subject is refused by NATS (no answer, nothing changes); goodbyes on site1's own
/// subject naming another instance (site2's process cannot be named: the slave id is the
/// subject's token), with a text over the limit, with control characters, or garbage, are
/// refused or invalid and change nothing; a flood of 200 goodbyes is budgeted (a few
/// decided, none of them by the live session). Then: both sites keep their seats, site2
/// registers at once, the ledger holds no `Forget` and its audit matches both hosts' books.
/// Finally site1 stops for real: its own goodbye releases its seats and says
/// `slave_stopped`, and site2 is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goodbye_releases_only_the_senders_own_live_session() {
    let d = Deployment::start(5).await;
    let mut tap = AlertTap::new(&d.monitor, &d.cluster).await.unwrap();
    let s = &d.subjects;
    let site1 = d.slave("site1").await;
    let site2 = d.slave("site2").await;
    assert!(site1.register("a1", "inbound").await.unwrap().is_approved());
    assert!(site2.register("b1", "inbound").await.unwrap().is_approved());
    assert!(site2.register("b2", "inbound").await.unwrap().is_approved());
    let attacker = d.site("site1").await;
    let goodbye = |reason: &str| {
        encode(&lmbus_schemas::Goodbye {
            instance: uuid::Uuid::new_v4(),
            reason: reason.into(),
        })
        .unwrap()
    };

    // Another site's subject: the reference permissions refuse the publish.
    assert_eq!(
        ask(&attacker, s, "site2", SlaveOp::Goodbye, goodbye("bye")).await,
        None
    );
    // Its own subject, not its live instance.
    let answer = ask(&attacker, s, "site1", SlaveOp::Goodbye, goodbye("bye")).await;
    assert!(
        matches!(
            answer,
            Some(Reply::Refused {
                reason: RejectReason::SlaveNotConnected,
                ..
            })
        ),
        "{answer:?}"
    );
    for bad in [
        goodbye(&"x".repeat(600)),
        goodbye("a\u{7}b\u{202e}c"),
        b"\x00junk".to_vec(),
    ] {
        let answer = ask(&attacker, s, "site1", SlaveOp::Goodbye, bad).await;
        assert!(
            matches!(answer, Some(Reply::Error(_)) | None),
            "a bad goodbye was decided: {answer:?}"
        );
    }
    let mut answered = 0;
    for _ in 0..200 {
        let subject = s.slave_op(&SlaveId::new("site1").unwrap(), SlaveOp::Goodbye);
        let inbox = attacker.new_inbox();
        attacker
            .publish_with_reply(subject, inbox, goodbye("flood").into())
            .await
            .unwrap();
        answered += 1;
    }
    attacker.flush().await.unwrap();
    assert_eq!(answered, 200);
    assert!(site2.register("b3", "inbound").await.unwrap().is_approved());
    let status = d.status().await;
    let in_use = |slave: &str| {
        status
            .slaves
            .iter()
            .find(|sl| sl.slave_id == slave)
            .map(|sl| sl.in_use)
    };
    assert_eq!((in_use("site1"), in_use("site2")), (Some(1), Some(3)));
    let (records, audit) = d.ledger().await;
    assert!(
        !records
            .iter()
            .filter(|r| r.quarantined.is_none())
            .flat_map(|r| &r.entry.changes)
            .any(|c| matches!(c, lmbus_schemas::SeatChange::Forget { .. })),
        "a forged goodbye was recorded"
    );
    let held = |slave: &str| -> Vec<String> {
        audit
            .seats
            .get(slave)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let books =
        |a: &SlaveAgent| -> Vec<String> { a.agents().into_iter().map(|c| c.agent_id).collect() };
    assert_eq!(held("site1"), books(&site1));
    assert_eq!(held("site2"), books(&site2));

    // The budget refills; site1's own stop is its right.
    tokio::time::sleep(Duration::from_secs(3)).await;
    site1.shutdown().await;
    let stopped = tap
        .wait_for("site1's goodbye", |a| a.kind == AlertKind::SlaveStopped)
        .await
        .unwrap();
    assert_eq!(stopped.slave.as_deref(), Some("site1"));
    let status = d.status().await;
    assert!(status.slaves.iter().all(|sl| sl.slave_id != "site1"));
    assert_eq!(status.total_in_use, 3, "site2 keeps its three seats");
    site2.shutdown().await;
    d.stop().await;
}

/// Steps: an honest site2 registers and unregisters in a loop, measuring each answer,
/// first alone (the baseline), then while site1 (its own credentials) floods: 3,000
/// garbage messages, 2,000 hellos, 5,000 heartbeats and 300 reports of 200 kB, all with
/// replies in its own inbox. Then: site2 got every answer, its slowest within a generous
/// bound, the leader (an `lmbus-broker` process) kept its term, at most a few
/// `bad_message` alerts name site1 (each a count, each short), the alert stream grew by
/// little, the broker's log by little too (no payload in it), and the ledger took at most a
/// budget's worth of site1's hellos.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_every_class_are_budgeted_per_slave() {
    let d = Deployment::start_process(10).await;
    let log_before = std::fs::metadata(&d.process.as_ref().unwrap().1)
        .unwrap()
        .len();
    let mut tap = AlertTap::new(&d.monitor, &d.cluster).await.unwrap();
    let s = d.subjects.clone();
    let site2 = d.slave("site2").await;
    let measure = |site2: SlaveAgent, for_how_long: Duration| async move {
        let mut slowest = Duration::ZERO;
        let mut ops = 0u32;
        let until = Instant::now() + for_how_long;
        while Instant::now() < until {
            let started = Instant::now();
            let outcome = site2.register("b1", "inbound").await.unwrap();
            assert!(matches!(outcome, Outcome::Approved { .. }), "{outcome:?}");
            assert!(site2.unregister("b1").await.unwrap());
            slowest = slowest.max(started.elapsed());
            ops += 1;
        }
        (slowest, ops)
    };
    let (baseline, _) = measure(site2.clone(), Duration::from_secs(1)).await;
    let before = d.status().await;
    let (records_before, _) = d.ledger().await;
    let alert_bytes_before = alert_stream_bytes(&d).await;

    let attacker = d.site("site1").await;
    let site1 = SlaveId::new("site1").unwrap();
    let inbox = format!("{}.flood", s.slave_inbox_prefix(&site1));
    let flood = {
        let s = s.clone();
        tokio::spawn(async move {
            let big = SlaveReport {
                event: SlaveEvent::Other,
                message: "r".repeat(200_000),
            };
            let big = encode(&big).unwrap();
            let instance = uuid::Uuid::new_v4();
            for i in 0..5_000u64 {
                let (op, payload) = match i % 10 {
                    0..=2 => (SlaveOp::Register, format!("\u{1b}[2Jjunk {i}").into_bytes()),
                    3 | 4 => {
                        let mut h = hello(i + 1, vec![]);
                        h.instance = instance;
                        (SlaveOp::Hello, encode(&h).unwrap())
                    }
                    5..=8 => (SlaveOp::Heartbeat, encode(&Heartbeat::default()).unwrap()),
                    _ if i < 3_000 => (SlaveOp::Report, big.clone()),
                    _ => (SlaveOp::Heartbeat, encode(&Heartbeat::default()).unwrap()),
                };
                attacker
                    .publish_with_reply(s.slave_op(&site1, op), inbox.clone(), payload.into())
                    .await
                    .unwrap();
                if i % 500 == 0 {
                    attacker.flush().await.unwrap();
                }
            }
            attacker.flush().await.unwrap();
        })
    };
    let (slowest, ops) = measure(site2.clone(), Duration::from_secs(4)).await;
    flood.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!(
        "seen: site2 alone: slowest {baseline:?}; during site1's flood: {ops} register+unregister pairs, slowest {slowest:?}"
    );
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    let after = d.status().await;
    assert_eq!(
        after.leader_term, before.leader_term,
        "the leader lost its lease"
    );
    let (records, _) = d.ledger().await;
    let site1_sessions = records
        .iter()
        .skip(records_before.len())
        .filter(|r| r.quarantined.is_none())
        .flat_map(|r| &r.entry.changes)
        .filter(
            |c| matches!(c, lmbus_schemas::SeatChange::Session { slave, .. } if slave == "site1"),
        )
        .count();
    eprintln!("seen: {site1_sessions} of site1's 1,000 hellos reached the ledger");
    assert!(site1_sessions <= 80, "{site1_sessions}");
    let summaries = tap
        .wait_count("counting site1's flood", 1, |a| {
            a.kind == AlertKind::BadMessage && a.slave.as_deref() == Some("site1")
        })
        .await
        .unwrap();
    for a in &summaries {
        eprintln!("seen: {}", a.message);
        assert!(a.message.len() < 800, "{}", a.message);
        assert!(!a.message.contains('\u{1b}'), "{}", a.message);
    }
    let about_site1 = tap
        .seen
        .iter()
        .filter(|a| a.slave.as_deref() == Some("site1"))
        .count();
    assert!(
        about_site1 <= 20,
        "{about_site1} alerts about site1: {:#?}",
        tap.seen
    );
    let grown = alert_stream_bytes(&d).await - alert_bytes_before;
    eprintln!("seen: the alert stream grew by {grown} bytes");
    assert!(grown < 200_000, "{grown}");
    let log = std::fs::read_to_string(&d.process.as_ref().unwrap().1).unwrap();
    let log_grown = log.len() as u64 - log_before;
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    eprintln!(
        "seen: the broker's log grew by {log_grown} bytes; its longest line is {longest} bytes"
    );
    assert!(log_grown < 200_000, "{log_grown}");
    assert!(longest < 2_000, "{longest}");
    site2.shutdown().await;
    d.stop().await;
}

/// Publishes every payload on `subject` through JetStream, up to 512 acknowledgements
/// outstanding, and waits for all of them.
async fn store_all(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payloads: impl IntoIterator<Item = Vec<u8>>,
) {
    let mut acks = Vec::new();
    for payload in payloads {
        acks.push(
            js.publish(subject.to_owned(), payload.into())
                .await
                .unwrap(),
        );
        if acks.len() >= 512 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

async fn alert_stream_bytes(d: &Deployment) -> u64 {
    let js = async_nats::jetstream::new(d.monitor.clone());
    let mut stream = js.get_stream(d.subjects.alert_stream()).await.unwrap();
    stream.info().await.unwrap().state.bytes
}

/// Steps: as site1, ids of 1,000 bytes, ids with ANSI escape and title sequences,
/// newlines and a right-to-left override, and a 3,000-character type are sent through a
/// hello's agent list, a hello's pending list, a registration, an unregistration, a batch
/// and a report: each is answered with an `invalid` error and nothing reaches the ledger.
/// `lmbus-monitor tail`, `audit` and `licenses --once` print no escape character.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_and_texts_are_refused_on_every_path() {
    let d = Deployment::start(10).await;
    let s = &d.subjects;
    let attacker = d.site("site1").await;
    let long = "x".repeat(1_000);
    let ugly = "\u{1b}]0;owned\u{7}\u{1b}[2J";
    let forged_line = "a\n2026-11-27T00:00:00Z INFO forged";
    let rtl = "a\u{202e}b";
    let long_type = "t".repeat(3_000);
    let mut cases: Vec<(SlaveOp, Vec<u8>)> = Vec::new();
    for id in [long.as_str(), ugly, forged_line, rtl] {
        let claim = AgentClaim {
            agent_id: id.into(),
            agent_type: "inbound".into(),
        };
        cases.push((SlaveOp::Hello, encode(&hello(1, vec![claim])).unwrap()));
        let mut h = hello(1, vec![]);
        h.pending = vec![id.into()];
        cases.push((SlaveOp::Hello, encode(&h).unwrap()));
        cases.push((SlaveOp::Register, encode(&register(1, id)).unwrap()));
        cases.push((
            SlaveOp::Unregister,
            encode(&UnregisterRequest {
                request_id: uuid::Uuid::new_v4(),
                seq: 2,
                agent_id: id.into(),
            })
            .unwrap(),
        ));
        cases.push((
            SlaveOp::Batch,
            encode(&BatchRequest {
                items: vec![BatchItem::Register(register(3, id))],
            })
            .unwrap(),
        ));
    }
    let mut typed = register(4, "ok");
    typed.agent_type = long_type.clone();
    cases.push((SlaveOp::Register, encode(&typed).unwrap()));
    let claim = AgentClaim {
        agent_id: "ok".into(),
        agent_type: long_type,
    };
    cases.push((SlaveOp::Hello, encode(&hello(1, vec![claim])).unwrap()));
    let mut answered = 0;
    for (i, (op, payload)) in cases.into_iter().enumerate() {
        // Within the bad-message budget (a burst of 10, 5 a second).
        if i % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        match ask(&attacker, s, "site1", op, payload).await {
            Some(Reply::Error(e)) => {
                assert_eq!(e.code, lmbus_schemas::ErrorCode::Invalid, "{e}");
                answered += 1;
            }
            other => panic!("{op:?}: {other:?}"),
        }
    }
    eprintln!("seen: {answered} hostile requests answered `invalid`");
    for report in [
        SlaveReport {
            event: SlaveEvent::Other,
            message: ugly.into(),
        },
        SlaveReport {
            event: SlaveEvent::LocalRejection {
                agent_id: forged_line.into(),
                agent_type: "inbound".into(),
                reason: RejectReason::LocalLimit,
            },
            message: String::new(),
        },
    ] {
        attacker
            .publish(
                s.slave_op(&SlaveId::new("site1").unwrap(), SlaveOp::Report),
                encode(&report).unwrap().into(),
            )
            .await
            .unwrap();
    }
    attacker.flush().await.unwrap();
    let (records, audit) = d.ledger().await;
    assert!(audit.seats.is_empty(), "{:?}", audit.seats);
    assert!(
        records
            .iter()
            .filter(|r| r.quarantined.is_none())
            .flat_map(|r| &r.entry.changes)
            .all(
            |c| !matches!(c, lmbus_schemas::SeatChange::Session { slave, .. } if slave == "site1")
        ),
        "a hostile hello opened a session"
    );
    // Wait for the summary alert (at most one tick) before reading the trail.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let monitor = bin("lmbus-monitor").unwrap();
    for args in [
        vec!["tail", "--since", "1h"],
        vec!["audit"],
        vec!["licenses", "--once"],
    ] {
        let out = std::process::Command::new(&monitor)
            .args(["--nats", &d.nats.url(), "--cluster", &d.cluster])
            .args(&args)
            .env("LMBUS_NATS_USER", "monitor")
            .env("LMBUS_NATS_PASSWORD", "pw-monitor")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{args:?} printed raw control characters: {text}"
        );
        assert!(!text.contains("\nforged"), "{args:?}: {text}");
    }
    d.stop().await;
}

/// Steps: 20,000 alerts (about 7 MB) are stored in the alert stream; under the reference
/// permissions the monitor user reads all of them back (`alert_source` from an hour ago,
/// and the audit trail), which takes JetStream flow control ($JS.FC.>) past the first
/// window; the operator user, here without $JS.FC.>, gets a quick error from
/// `lmbus-monitor tail --since` and `audit` that names it instead of a hang; then, with the
/// broker stopped, 20,000 records (about 8 MB) are added to its ledger, and the broker
/// started again replays them all (flow control again) and leads within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_get_through_streams_that_need_flow_control() {
    let mut d = Deployment::start_with(10, |config| {
        // The operator block's own "$JS.FC.>" line (the first after "OPERATOR = {").
        let operator = config.find("OPERATOR = {").expect("an operator block");
        let line = "\n      \"$JS.FC.>\"";
        let at = operator
            + config[operator..]
                .find(line)
                .expect("$JS.FC.> for the operator");
        let without = format!("{}{}", &config[..at], &config[at + line.len()..]);
        assert_ne!(without, config, "the operator block changed shape");
        without
    })
    .await;
    let js = async_nats::jetstream::new(d.auditor.clone());
    let subject = d.subjects.alert(Severity::Info, AlertKind::Other);
    let filler = "f".repeat(300);
    let n = 20_000u64;
    store_all(
        &js,
        &subject,
        (0..n).map(|i| {
            let mut alert = lmbus_schemas::Alert::new(
                Severity::Info,
                AlertKind::Other,
                format!("{i} {filler}"),
            );
            alert.source = "test".into();
            encode(&alert).unwrap()
        }),
    )
    .await;
    let started = Instant::now();
    let (mut stored, until) = lmbus_monitor::alert_source(
        &d.monitor,
        &d.subjects,
        lmbus_monitor::Start::Since(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let until = until.unwrap();
    let mut read = 0u64;
    let mut count = 0u64;
    while read < until {
        let next = tokio::time::timeout(
            Duration::from_secs(10),
            futures::StreamExt::next(&mut stored),
        )
        .await
        .unwrap_or_else(|_| panic!("the alert stream stopped delivering after {count} records"))
        .unwrap()
        .unwrap();
        read = next.sequence.unwrap_or(until);
        count += 1;
    }
    eprintln!(
        "seen: the monitor read {count} stored alerts in {:?}",
        started.elapsed()
    );
    assert!(count >= n);
    let trail = tokio::time::timeout(
        Duration::from_secs(60),
        lmbus_monitor::audit(&d.monitor, &d.subjects, &Default::default()),
    )
    .await
    .unwrap()
    .unwrap();
    let alerts = trail.records.iter().filter(|r| r.source == "alert").count() as u64;
    assert!(alerts >= n, "{alerts}");
    let monitor = bin("lmbus-monitor").unwrap();
    for args in [vec!["tail", "--since", "1h"], vec!["audit"]] {
        let started = Instant::now();
        let mut cmd = std::process::Command::new(&monitor);
        cmd.args(["--nats", &d.nats.url(), "--cluster", &d.cluster])
            .args(&args)
            .env("LMBUS_NATS_USER", "operator")
            .env("LMBUS_NATS_PASSWORD", "pw-operator")
            .stdout(std::process::Stdio::null());
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || cmd.output().unwrap()),
        )
        .await
        .expect("the monitor hung without $JS.FC.>")
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "seen: {args:?} without $JS.FC.>, after {:?}: {}",
            started.elapsed(),
            err.trim()
        );
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains("$JS.FC.>"), "{args:?}: {err}");
    }
    d.broker.take().unwrap().stop().await.unwrap();
    // Padding the broker itself could have written: its id, a change that changes nothing.
    let pad = encode(&lmbus_schemas::LedgerEntry {
        writer: "test-broker".into(),
        changes: vec![lmbus_schemas::SeatChange::Seats {
            slave: "padding".into(),
            agent_type: "p".repeat(400),
            agent_ids: Vec::new(),
            request_seqs: Vec::new(),
            since_ms: Vec::new(),
            granted_by: Vec::new(),
        }],
    })
    .unwrap();
    store_all(&js, &d.subjects.ledger(), std::iter::repeat_n(pad, 20_000)).await;
    let js_monitor = async_nats::jetstream::new(d.monitor.clone());
    let ledger_bytes = js_monitor
        .get_stream(d.subjects.ledger_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .bytes;
    let license = d.vendor.master(10, &[]).unwrap();
    let mut cfg = broker_config(&d.nats, &d.cluster, license, &d.vendor, true);
    cfg.nats_auth = user("broker");
    let started = Instant::now();
    d.broker = Some(Broker::start(cfg).await.unwrap());
    let took = started.elapsed();
    eprintln!("seen: the broker led again on a {ledger_bytes}-byte ledger after {took:?}");
    assert!(ledger_bytes > 6_000_000, "{ledger_bytes}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(d.status().await.ledger_sequence > 20_000);
    d.stop().await;
}

/// Steps: as the broker's own user (the only one that may publish on the ledger's subject,
/// as the old reply-subject attack did through the broker), garbage is stored in the
/// ledger: an encoded reply, random bytes, and a well-formed entry granting a seat written
/// by an "intruder" (not the leader of the term); then a well-formed grant in the leader's
/// own name whose message id says it was fenced at sequence 2 (what a copy of an earlier
/// record looks like, the kind a NATS cluster recovering from a whole-cluster stop could
/// store). site2's next registration makes the leader's fenced append fail, the leader
/// rebuilds, quarantines all four (a critical alert names them) and leads again: site2 is
/// approved within the failover wait, and neither stored seat was granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_ledger_is_quarantined_and_the_master_keeps_serving() {
    let d = Deployment::start(5).await;
    let mut tap = AlertTap::new(&d.monitor, &d.cluster).await.unwrap();
    let site2 = d.slave("site2").await;
    assert!(matches!(
        site2.register("b1", "inbound").await.unwrap(),
        Outcome::Approved { .. }
    ));
    let js = async_nats::jetstream::new(d.auditor.clone());
    let error_reply = encode(&Reply::Error(lmbus_schemas::WireError {
        code: lmbus_schemas::ErrorCode::Invalid,
        message: "x".into(),
    }))
    .unwrap();
    let intruder = encode(&lmbus_schemas::LedgerEntry {
        writer: "intruder".into(),
        changes: vec![lmbus_schemas::SeatChange::Grant {
            slave: "site2".into(),
            agent_id: "stolen".into(),
            agent_type: "inbound".into(),
            request_seq: 0,
            at_ms: 0,
            by: String::new(),
        }],
    })
    .unwrap();
    for garbage in [error_reply, b"\xc1\xc1 not msgpack".to_vec(), intruder] {
        js.publish(d.subjects.ledger(), garbage.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let leader = d.status().await.broker_id;
    let copy = encode(&lmbus_schemas::LedgerEntry {
        writer: leader.clone(),
        changes: vec![lmbus_schemas::SeatChange::Grant {
            slave: "site2".into(),
            agent_id: "copied".into(),
            agent_type: "inbound".into(),
            request_seq: 0,
            at_ms: 0,
            by: leader.clone(),
        }],
    })
    .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, "0f3a9c.2");
    js.publish_with_headers(d.subjects.ledger(), headers, copy.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let started = Instant::now();
    let outcome = site2.register("b2", "inbound").await.unwrap();
    assert!(matches!(outcome, Outcome::Approved { .. }), "{outcome:?}");
    eprintln!("seen: approved {:?} after the garbage", started.elapsed());
    let alert = tap
        .wait_for("about the quarantined records", |a| {
            a.severity == Severity::Critical && a.message.contains("quarantined")
        })
        .await
        .unwrap();
    eprintln!("seen: {}", alert.message);
    assert!(
        alert.message.contains("written by intruder"),
        "{}",
        alert.message
    );
    assert!(
        alert.message.contains("its writer fenced it at 2"),
        "{}",
        alert.message
    );
    let ledger = lmbus_broker::ledger::Ledger::open(&d.auditor, &d.subjects, 1)
        .await
        .unwrap();
    let records = ledger.read_all().await.unwrap();
    assert_eq!(
        records.iter().filter(|r| r.quarantined.is_some()).count(),
        3,
        "the undecodable records and the copy"
    );
    let status = d.status().await;
    let seen = status
        .slaves
        .iter()
        .find(|s| s.slave_id == "site2")
        .unwrap();
    assert_eq!(
        seen.in_use, 2,
        "the intruder's or the copy's grant was applied"
    );
    site2.shutdown().await;
    d.stop().await;
}

/// Steps: zero durations for the slave's request timeout and grace period and the
/// broker's alert retention are refused at start with a message naming the flag; a
/// license file that is not UTF-8 is refused naming the file and what to do; an expired
/// license says what to do.
#[test]
fn bad_flags_and_files_get_clear_errors() {
    let vendor = Vendor::new().unwrap();
    let license = vendor.master(5, &[]).unwrap();
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for (flag, needle) in [
        (
            "--request-timeout",
            "--request-timeout must be greater than zero",
        ),
        ("--grace-period", "--grace-period must be greater than zero"),
    ] {
        let err = run(
            std::process::Command::new(bin("lmbus-slave").unwrap()).args([
                "run",
                "--nats",
                "nats://127.0.0.1:1",
                "--cluster",
                "c",
                "--id",
                "s1",
                flag,
                "0s",
            ]),
        );
        assert!(err.contains(needle), "{err}");
    }
    let broker = |extra: &[&str], license: &std::path::Path| {
        run(std::process::Command::new(bin("lmbus-broker").unwrap())
            .args(["run", "--nats", "nats://127.0.0.1:1", "--cluster", "c"])
            .arg("--license")
            .arg(license)
            .arg("--vendor-key")
            .arg(vendor.public_key_path())
            .args(extra))
    };
    let err = broker(&["--alert-max-age", "0s"], &license);
    assert!(
        err.contains("--alert-max-age must be greater than zero"),
        "{err}"
    );
    let binary = vendor.dir().join("binary.lic");
    std::fs::write(&binary, [0xff, 0xfe, b'i', b'd']).unwrap();
    let err = broker(&[], &binary);
    assert!(
        err.contains("binary.lic") && err.contains("not UTF-8"),
        "{err}"
    );
    let mut old = Vendor::license(
        lmbus_schemas::Role::Master,
        lmbus_schemas::Limits {
            total: Some(5),
            ..Default::default()
        },
    );
    old.expires = time::macros::date!(2020 - 01 - 01);
    old.issued = time::macros::date!(2019 - 01 - 01);
    old.maintenance_expires = old.expires;
    let expired = vendor.write("expired.lic", &old).unwrap();
    let err = broker(&[], &expired);
    assert!(
        err.contains("expired on 2020-01-01") && err.contains("ask the vendor"),
        "{err}"
    );
}

/// Steps: as site1, without ever saying hello, twice 40 batches of 128 well-formed
/// registrations (each item refused `slave_not_connected`): the batches are charged per
/// item against site1's budget, the refusals make at most one alert every 10 s (not one per
/// item, as before), and an honest site2 is still served at once with the leader in its
/// term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_looking_batches_cannot_flood_the_alert_stream() {
    let d = Deployment::start(10).await;
    let mut tap = AlertTap::new(&d.monitor, &d.cluster).await.unwrap();
    let site2 = d.slave("site2").await;
    let before = d.status().await;
    let attacker = d.site("site1").await;
    let site1 = SlaveId::new("site1").unwrap();
    let inbox = format!("{}.b", d.subjects.slave_inbox_prefix(&site1));
    for round in 0..2u64 {
        for b in 0..40u64 {
            let batch = BatchRequest {
                items: (0..128u64)
                    .map(|i| {
                        BatchItem::Register(register(1 + (b * 128 + i) % 5_000, &format!("x{i}")))
                    })
                    .collect(),
            };
            attacker
                .publish_with_reply(
                    d.subjects.slave_op(&site1, SlaveOp::Batch),
                    inbox.clone(),
                    encode(&batch).unwrap().into(),
                )
                .await
                .unwrap();
        }
        attacker.flush().await.unwrap();
        eprintln!("seen: round {round} of 40 batches of 128 sent");
    }
    let started = Instant::now();
    assert!(matches!(
        site2.register("b1", "inbound").await.unwrap(),
        Outcome::Approved { .. }
    ));
    eprintln!(
        "seen: site2 approved {:?} after the batches",
        started.elapsed()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), tap.wait_for("nothing", |_| false)).await;
    let about_site1: Vec<String> = tap
        .seen
        .iter()
        .filter(|a| a.slave.as_deref() == Some("site1"))
        .map(|a| a.message.clone())
        .collect();
    eprintln!(
        "seen: {} alerts about site1 for 10,240 refused items",
        about_site1.len()
    );
    assert!(about_site1.len() <= 5, "{about_site1:#?}");
    assert_eq!(d.status().await.leader_term, before.leader_term);
    site2.shutdown().await;
    d.stop().await;
}

/// Allotment mode attacked with a slave's own credentials, through every field of the
/// allot request it controls: a block asked far beyond the license, admissions beyond the
/// block, a replayed request, an older request number (which would shrink the block the
/// master counts below what the slave was told), another instance's id, and a reply
/// subject outside its inbox. The master never counts more than the license, refuses every
/// admission it did not allot, and an honest slave gets exactly what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_cannot_take_more_than_the_license_through_allotments() {
    use lmbus_schemas::{AllotOp, AllotOpKind, AllotRequest};
    let d = Deployment::start_allotment(6).await;
    let s = &d.subjects;
    let attacker = d.site("site1").await;
    let instance = uuid::Uuid::new_v4();
    let mut h = hello(1, vec![]);
    h.instance = instance;
    let welcome = ask(&attacker, s, "site1", SlaveOp::Hello, encode(&h).unwrap()).await;
    assert!(
        matches!(&welcome, Some(Reply::Welcome(w)) if w.admission == lmbus_schemas::Admission::Allotment),
        "{welcome:?}"
    );
    let allot = |seq: u64, ops: Vec<AllotOp>, want: u32| AllotRequest {
        instance,
        seq,
        ops,
        want: [("inbound".to_owned(), want)].into(),
    };
    let admit = |n: u64, agent: &str| AllotOp {
        n,
        kind: AllotOpKind::Admit,
        agent_id: agent.into(),
        agent_type: "inbound".into(),
    };
    // Far beyond the license: the master gives at most what is free.
    let first = ask(
        &attacker,
        s,
        "site1",
        SlaveOp::Allot,
        encode(&allot(5, vec![], u32::MAX)).unwrap(),
    )
    .await;
    let Some(Reply::Allotment(first)) = first else {
        panic!("{first:?}")
    };
    let block = first.blocks.get("inbound").copied().unwrap_or(0);
    assert!(block <= 6, "{first:?}");
    let status = d.status().await;
    assert!(
        status.total_in_use + status.allotted_total <= 6,
        "{status:?}"
    );
    // Ten admissions against that block: only `block` are taken, the rest refused.
    let ops: Vec<AllotOp> = (1..=10).map(|n| admit(n, &format!("x{n}"))).collect();
    let answer = ask(
        &attacker,
        s,
        "site1",
        SlaveOp::Allot,
        encode(&allot(6, ops, 0)).unwrap(),
    )
    .await;
    let Some(Reply::Allotment(answer)) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(answer.refused.len() as u32, 10 - block, "{answer:?}");
    assert!(
        answer
            .refused
            .iter()
            .all(|r| r.reason == RejectReason::NoAllotment)
    );
    let after_admits = d.status().await;
    assert_eq!(after_admits.total_in_use, block);
    assert_eq!(after_admits.allotted_total, 0);
    // The same request again, and an older number: refused, nothing moves.
    for seq in [6, 5, 1] {
        let replayed = ask(
            &attacker,
            s,
            "site1",
            SlaveOp::Allot,
            encode(&allot(seq, vec![], 6)).unwrap(),
        )
        .await;
        assert!(
            matches!(
                replayed,
                Some(Reply::Refused {
                    reason: RejectReason::Replayed,
                    ..
                })
            ),
            "{replayed:?}"
        );
    }
    // Another instance's id: no session.
    let mut foreign = allot(7, vec![], 6);
    foreign.instance = uuid::Uuid::new_v4();
    let refused = ask(
        &attacker,
        s,
        "site1",
        SlaveOp::Allot,
        encode(&foreign).unwrap(),
    )
    .await;
    assert!(
        matches!(
            refused,
            Some(Reply::Refused {
                reason: RejectReason::SlaveNotConnected,
                ..
            })
        ),
        "{refused:?}"
    );
    // A reply subject outside its inbox: never answered (a grown block there would be a
    // block nobody was told of, so it must not be granted either).
    let ledger_before = d.ledger().await.0.len();
    attacker
        .publish_with_reply(
            s.slave_op(&SlaveId::new("site1").unwrap(), SlaveOp::Allot),
            s.ledger(),
            encode(&allot(8, vec![], 6)).unwrap().into(),
        )
        .await
        .unwrap();
    attacker.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(d.status().await.allotted_total, 0);
    assert_eq!(d.ledger().await.0.len(), ledger_before);
    let status = d.status().await;
    assert_eq!(status.total_in_use + status.allotted_total, block);

    // An honest slave gets exactly what is left, no more.
    let site2 = d.slave("site2").await;
    let mut got = 0;
    for i in 0..10 {
        if site2
            .register(&format!("h{i}"), "inbound")
            .await
            .unwrap()
            .is_approved()
        {
            got += 1;
        }
    }
    assert_eq!(got, 6 - block, "the honest slave's share");
    let status = d.status().await;
    assert!(
        status.total_in_use + status.allotted_total <= 6,
        "{status:?}"
    );
    let (records, _) = d.ledger().await;
    lmbus_broker::ledger::audit(&records, 6, &Default::default()).unwrap();
    site2.shutdown().await;
    d.stop().await;
}

/// Steps: under the reference permissions, site1's credentials ask for a vendor sync
/// themselves (`admin.sync`: not theirs to publish, so nobody answers and nothing is
/// recorded), and subscribe to the vendor's subject to answer in the vendor's place with
/// a forged answer. The operator's `admin sync now` then reaches nobody: it fails saying
/// the vendor did not answer (not that an answer was refused: the site never heard the
/// request), with a `vendor_sync` warning, and the ledger holds no `Synced` record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_can_neither_sync_nor_answer_as_the_vendor() {
    use futures::StreamExt as _;
    let d = Deployment::start(5).await;
    let mut alerts = AlertTap::new(&d.monitor, &d.cluster).await.unwrap();
    let site = d.site("site1").await;
    let asked = tokio::time::timeout(
        Duration::from_secs(2),
        site.request(
            d.subjects.admin_sync(),
            encode(&lmbus_schemas::SyncNowRequest {
                operator: "site1".into(),
            })
            .unwrap()
            .into(),
        ),
    )
    .await;
    assert!(
        !matches!(asked, Ok(Ok(_))),
        "site1 was answered on admin.sync"
    );

    let mut heard = site.subscribe(Subjects::vendor_sync()).await.unwrap();
    let forger = site.clone();
    let forging = tokio::spawn(async move {
        let mut n = 0;
        while let Some(msg) = heard.next().await {
            n += 1;
            let Ok(request) = decode::<lmbus_schemas::SyncRequest>(&msg.payload) else {
                continue;
            };
            let forged = lmbus_schemas::sign_sync_answer(
                &lmbus_schemas::SyncAnswer {
                    sync: request.sync,
                    at_ms: 0,
                    license: None,
                    refused: None,
                },
                &lmbus_schemas::VendorKey::from_bytes(&[9; 32]),
            )
            .unwrap();
            if let Some(to) = msg.reply {
                let _ = forger.publish(to, encode(&forged).unwrap().into()).await;
            }
        }
        n
    });
    let operator = lmbus_nats::connect(
        &d.nats.url(),
        async_nats::ConnectOptions::new(),
        &user("operator"),
    )
    .await
    .unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(40),
        operator.request(
            d.subjects.admin_sync(),
            encode(&lmbus_schemas::SyncNowRequest {
                operator: "ops".into(),
            })
            .unwrap()
            .into(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    match decode::<lmbus_schemas::SyncNowReply>(&answer.payload).unwrap() {
        lmbus_schemas::SyncNowReply::Error { message } => {
            assert!(message.contains("no answer from the vendor"), "{message}");
        }
        other => panic!("the sync succeeded: {other:?}"),
    }
    let warned = alerts
        .wait_for("vendor_sync", |a| a.kind == AlertKind::VendorSync)
        .await
        .unwrap();
    assert_eq!(warned.severity, Severity::Warning);
    assert!(
        !alerts
            .seen
            .iter()
            .any(|a| a.kind == AlertKind::VendorSync && a.message.contains("site1")),
        "{:#?}",
        alerts.seen
    );
    let (records, _) = d.ledger().await;
    assert!(
        !records.iter().any(|r| r
            .entry
            .changes
            .iter()
            .any(|c| matches!(c, lmbus_schemas::SeatChange::Synced { .. }))),
        "a Synced record without a vendor answer"
    );
    forging.abort();
    d.stop().await;
}

/// Steps: under the reference permissions, site1's credentials publish a forged replica
/// beat (a production leader, as a backup master listens for) and a forged backup beat
/// (as a second backup cluster that has been up for a year) on the cluster's `replica` and
/// `backups` subjects. A broker-user listener on both hears neither, and hears the
/// replica beat sent with the broker's own credentials (so the listener works; no user of
/// the reference configuration may publish on `backups`: a backup cluster's broker user
/// adds it): a site can make no backup master refuse or serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cannot_forge_the_beats_a_backup_master_listens_to() {
    use futures::StreamExt as _;
    let d = Deployment::start(5).await;
    let broker = lmbus_nats::connect(
        &d.nats.url(),
        async_nats::ConnectOptions::new(),
        &user("broker"),
    )
    .await
    .unwrap();
    let mut heard = futures::stream::select(
        broker.subscribe(d.subjects.replica()).await.unwrap(),
        broker.subscribe(d.subjects.backups()).await.unwrap(),
    );
    broker.flush().await.unwrap();
    let replica = encode(&lmbus_schemas::ReplicaBeat {
        replica: "forged".into(),
        priority: 1,
        leader: true,
        applied: 0,
        drained: false,
        context: Some(lmbus_schemas::Context::Production),
        license: Some(uuid::Uuid::new_v4()),
    })
    .unwrap();
    let backup = encode(&lmbus_schemas::BackupBeat {
        seats: Some(0),
        backs: None,
        cluster: "forged-dr".into(),
        replica: "forged".into(),
        license: uuid::Uuid::new_v4(),
        up_ms: 365 * 24 * 3600 * 1000,
    })
    .unwrap();
    let site = d.site("site1").await;
    for (subject, payload) in [
        (d.subjects.replica(), replica.clone()),
        (d.subjects.backups(), backup.clone()),
    ] {
        // A publish the server refuses is dropped, and the connection stays up.
        let _ = site.publish(subject, payload.into()).await;
    }
    let _ = site.flush().await;
    let from_site = tokio::time::timeout(Duration::from_secs(1), async {
        // Beats of the deployment's own broker replicas are not the site's.
        loop {
            let msg = heard.next().await.unwrap();
            let forged = decode::<lmbus_schemas::ReplicaBeat>(&msg.payload)
                .is_ok_and(|b| b.replica == "forged")
                || decode::<lmbus_schemas::BackupBeat>(&msg.payload)
                    .is_ok_and(|b| b.replica == "forged");
            if forged {
                return msg.subject;
            }
        }
    })
    .await;
    assert!(
        from_site.is_err(),
        "a site's beat reached the brokers on {:?}",
        from_site
    );
    broker
        .publish(d.subjects.replica(), replica.into())
        .await
        .unwrap();
    broker.flush().await.unwrap();
    let mut forged = 0;
    let deadline = Instant::now() + WAIT;
    while forged < 1 {
        let msg = tokio::time::timeout_at(deadline.into(), heard.next())
            .await
            .expect("the broker's own replica beat did not arrive")
            .unwrap();
        if decode::<lmbus_schemas::ReplicaBeat>(&msg.payload).is_ok_and(|b| b.replica == "forged")
            || decode::<lmbus_schemas::BackupBeat>(&msg.payload)
                .is_ok_and(|b| b.replica == "forged")
        {
            forged += 1;
        }
    }
    d.stop().await;
}

/// Steps: a 2-seat license; an honest site2 holds one seat. As site1 (its own credentials),
/// a hello, then heartbeats whose `MasterUse` claims its other master is a backup holding
/// u32::MAX seats, then one naming no context and in use elsewhere, then one claiming this
/// production master is its backup master, and one with a role this build does not know
/// (decoded as another role, not refused). The master shows
/// the claim in site1's status row, as the slave's word, and decides nothing on it: the
/// totals and limits stay as the ledger says, site1 holds nothing, site2's next
/// registration is approved and the one after it refused `aggregate_limit` at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sites_claim_about_its_other_master_is_shown_and_decides_nothing() {
    let d = Deployment::start(2).await;
    let site2 = d.slave("site2").await;
    assert!(site2.register("b1", "inbound").await.unwrap().is_approved());
    let attacker = d.site("site1").await;
    let hello = hello(1, vec![]);
    let instance = hello.instance;
    assert!(matches!(
        ask(
            &attacker,
            &d.subjects,
            "site1",
            SlaveOp::Hello,
            encode(&hello).unwrap()
        )
        .await,
        Some(Reply::Welcome(_))
    ));
    use lmbus_schemas::MasterRole;
    let beat = |seq, role, other| Heartbeat {
        instance,
        seq,
        master: Some(lmbus_schemas::MasterUse {
            role,
            in_use: false,
            other,
        }),
        ..Heartbeat::default()
    };
    let claims = [
        (
            MasterRole::Primary,
            Some(lmbus_schemas::OtherMaster {
                context: Some(lmbus_schemas::Context::Backup),
                seats: u32::MAX,
            }),
        ),
        (
            MasterRole::Primary,
            Some(lmbus_schemas::OtherMaster {
                context: None,
                seats: 0,
            }),
        ),
        (
            MasterRole::Backup,
            Some(lmbus_schemas::OtherMaster {
                context: Some(lmbus_schemas::Context::Production),
                seats: 7,
            }),
        ),
        (MasterRole::Other, None),
    ];
    let shown = [
        format!("primary, idle; backup holds {} seats", u32::MAX),
        "primary, idle; other master holds 0 seats".to_owned(),
        "backup master, idle; production holds 7 seats".to_owned(),
        "another role, idle".to_owned(),
    ];
    for (seq, ((role, claim), shown)) in claims.into_iter().zip(shown).enumerate() {
        let answer = ask(
            &attacker,
            &d.subjects,
            "site1",
            SlaveOp::Heartbeat,
            encode(&beat(seq as u64 + 1, role, claim)).unwrap(),
        )
        .await;
        assert_eq!(answer, Some(Reply::Ack));
        let st = d.status().await;
        let row = st.slaves.iter().find(|s| s.slave_id == "site1").unwrap();
        assert_eq!(row.master.map(|m| m.to_string()), Some(shown));
        assert_eq!((row.in_use, st.total_in_use, st.total_limit), (0, 1, 2));
    }
    assert!(site2.register("b2", "inbound").await.unwrap().is_approved());
    match site2.register("b3", "inbound").await.unwrap() {
        Outcome::Rejected { reason, .. } => assert_eq!(reason, RejectReason::AggregateLimit),
        other => panic!("b3 beyond the 2 seats: {other:?}"),
    }
    site2.shutdown().await;
}
