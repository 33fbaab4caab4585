//! The redundancy rig: a 3-node NATS cluster, three `lmbus-broker` processes (b1, b2, b3
//! with priorities 1-3), slaves under a registration/unregistration workload that keeps
//! books of what they were told, and the ledger audit that checks those books. Used by
//! `tests/redundancy.rs` and the failover bench (`benches/failover.rs`).
//!
//! A failure anywhere here is a test failure, so it unwraps.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmbus_broker::ledger::{Ledger, Record, audit};
use lmbus_broker::snapshot::Snapshots;
use lmbus_schemas::{AlertKind, LedgerEntry, RejectReason, SlaveId, Subjects};
use lmbus_slave::{Outcome, SlaveAgent, SlaveConfig};
use tokio::time::Instant;

use crate::{AlertTap, NatsCluster, Proc, Vendor, bin, init_tracing};

/// The master license's seat limit in the rig.
pub const LIMIT: u32 = 12;

/// One rig at a time: three brokers and three NATS nodes per test already load two cores,
/// and a starved leader that misses its renewals would fail over for the wrong reason.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
pub const SLAVES: usize = 4;
pub const AGENTS_PER_SLAVE: usize = 6;

#[derive(Debug)]
pub struct Rig {
    pub nats: NatsCluster,
    pub cluster: String,
    pub vendor: Vendor,
    pub license: PathBuf,
    pub brokers: BTreeMap<String, Proc>,
    pub client: async_nats::Client,
    /// Where the brokers' logs go, and the temp dir that removes them (unless kept).
    pub logs: (PathBuf, Option<tempfile::TempDir>),
    /// Flags every broker of this rig gets.
    pub flags: Vec<String>,
    /// The master license's seat limit ([`LIMIT`] unless started with another).
    pub limit: u32,
}

impl Rig {
    pub async fn start() -> Rig {
        Self::start_with(&[]).await
    }

    /// Like `start`, with extra flags for b1, the first leader.
    pub async fn start_with(b1_flags: &[&str]) -> Rig {
        Self::start_configured(&[], b1_flags).await
    }

    /// Like `start`, with extra flags for every broker, and more for b1.
    pub async fn start_configured(flags: &[&str], b1_flags: &[&str]) -> Rig {
        Self::start_licensed(LIMIT, flags, b1_flags).await
    }

    /// Like `start_configured`, with a master license of `limit` seats.
    pub async fn start_licensed(limit: u32, flags: &[&str], b1_flags: &[&str]) -> Rig {
        init_tracing();
        let nats = tokio::task::spawn_blocking(|| NatsCluster::start(3))
            .await
            .unwrap()
            .unwrap();
        let vendor = Vendor::new().unwrap();
        let license = vendor.master(limit, &[]).unwrap();
        let client = async_nats::connect(lmbus_nats::nats_urls(&nats.url()))
            .await
            .unwrap();
        let mut rig = Rig {
            nats,
            cluster: format!("ha-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            vendor,
            license,
            brokers: BTreeMap::new(),
            client,
            // LMBUS_TEST_KEEP_LOGS=1 keeps the brokers' logs for a post-mortem.
            logs: {
                let dir = tempfile::Builder::new()
                    .prefix("lmbus-ha-")
                    .tempdir()
                    .unwrap();
                if std::env::var_os("LMBUS_TEST_KEEP_LOGS").is_some() {
                    let kept = dir.keep();
                    eprintln!("broker logs kept in {}", kept.display());
                    (kept, None)
                } else {
                    (dir.path().to_owned(), Some(dir))
                }
            },
            flags: flags.iter().map(|f| f.to_string()).collect(),
            limit,
        };
        // b1 first, so the first election is b1's; then the standbys.
        let mut alerts = rig.alerts().await;
        rig.spawn_broker_with("b1", 1, b1_flags);
        assert_eq!(next_leader(&mut alerts, None).await, "b1");
        rig.spawn_broker("b2", 2);
        rig.spawn_broker("b3", 3);
        alerts
            .wait_count("both standbys started", 2, |a| {
                a.kind == AlertKind::BrokerStarted && a.source != "b1"
            })
            .await
            .unwrap();
        // The leader hears both standbys and says so.
        let state = alerts
            .wait_for("redundancy with three replicas", |a| {
                a.kind == AlertKind::Redundancy && a.message.contains("3 broker replicas up")
            })
            .await
            .unwrap();
        assert_eq!(state.source, "b1");
        let subjects = Subjects::new(&rig.cluster).unwrap();
        let status = lmbus_ops::fetch_status(&rig.client, &subjects, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status.broker_id, "b1");
        assert!(status.leader_term > 0);
        let names: Vec<&str> = status.replicas.iter().map(|r| r.replica.as_str()).collect();
        assert_eq!(names, ["b1", "b2", "b3"], "{status:?}");
        rig
    }

    pub fn spawn_broker(&mut self, id: &str, priority: u32) {
        self.spawn_broker_with(id, priority, &[]);
    }

    pub fn spawn_broker_with(&mut self, id: &str, priority: u32, flags: &[&str]) {
        let log = std::fs::File::create(self.logs.0.join(format!("{id}.log"))).unwrap();
        let proc = Proc::spawn(
            Command::new(bin("lmbus-broker").unwrap())
                .args([
                    "run",
                    "--nats",
                    &self.nats.url(),
                    "--cluster",
                    &self.cluster,
                ])
                .arg("--license")
                .arg(&self.license)
                .arg("--vendor-key")
                .arg(self.vendor.public_key_path())
                .args(["--allow-unlicensed-slaves", "--id", id])
                .args([
                    "--priority",
                    &priority.to_string(),
                    "--stream-replicas",
                    "3",
                ])
                .args(["--tick-interval", "100ms"])
                .args(&self.flags)
                .args(flags)
                .env("LMBUS_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap();
        self.brokers.insert(id.to_owned(), proc);
    }

    pub async fn alerts(&self) -> AlertTap {
        AlertTap::new(&self.client, &self.cluster).await.unwrap()
    }

    pub fn slave_config(&self, id: &str) -> SlaveConfig {
        let mut cfg = SlaveConfig::new(&self.nats.url(), &self.cluster, SlaveId::new(id).unwrap());
        cfg.heartbeat_interval = Duration::from_millis(250);
        cfg
    }

    /// Replays the ledger and checks every invariant; returns the audit.
    pub async fn audit(&self) -> lmbus_broker::ledger::Audit {
        // Right after a NATS node died the stream may still be electing its leader.
        let subjects = Subjects::new(&self.cluster).unwrap();
        let mut tries = 0;
        let records = loop {
            let read = async {
                Ledger::open(&self.client, &subjects, 3)
                    .await?
                    .read_all()
                    .await
            };
            // JetStream's own time: after the whole NATS cluster restarts, its meta leader
            // and the stream's can take longer than 10 s on a loaded 2-core runner (CI saw
            // "JetStream system temporarily unavailable" for 10 s once), so the checker
            // waits up to 30 s for the stream it audits.
            match read.await {
                Ok(records) => break records,
                Err(e) if tries < 60 => {
                    tries += 1;
                    eprintln!("reading the ledger failed ({e:#}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("cannot read the ledger: {e:#}"),
            }
        };
        // Every record this build writes carries its fence in its id.
        let unnamed: Vec<u64> = records
            .iter()
            .filter(|r| r.id.is_none())
            .map(|r| r.sequence)
            .collect();
        assert!(
            unnamed.is_empty(),
            "ledger records without a message id: {unnamed:?}\n{}",
            outline(&records)
        );
        // The fence makes a record land only where its id says (past the first record: 2.9
        // does not check a fence of 0): one stored elsewhere is a copy JetStream made
        // (every reader quarantines it alike, and the audit skips it), reported here. Its
        // original must be in place: a copy standing in for a lost original would hold a
        // decision every reader skips.
        let ids: BTreeMap<u64, Option<&str>> = records
            .iter()
            .map(|r| (r.sequence, r.id.as_deref()))
            .collect();
        let first = records.first().map_or(0, |r| r.sequence);
        let misplaced: Vec<String> = records
            .iter()
            .filter_map(|r| {
                let at = r.misplaced()?;
                let original = ids.get(&at).copied().flatten();
                assert!(
                    at < first || original == r.id.as_deref(),
                    "ledger record {} is a copy of record {at}, whose original is not in place (it holds {original:?}): JetStream lost an acknowledged record\n{}",
                    r.sequence,
                    outline(&records)
                );
                Some(format!("record {} fenced at {at}", r.sequence))
            })
            .collect();
        if !misplaced.is_empty() {
            eprintln!(
                "measured: {} ledger records stored away from their fence, quarantined: {misplaced:?}",
                misplaced.len()
            );
        }
        let records = self.root_at_snapshot(records).await;
        match audit(&records, self.limit, &BTreeMap::new()) {
            Ok(a) => a,
            Err(e) => panic!(
                "ledger audit failed: {e}\n{}\n{}",
                outline(&records),
                self.dump_logs()
            ),
        }
    }

    /// A trimmed ledger no longer starts at record 1: audit it from the latest snapshot
    /// (its changes as one record), then the records after it.
    async fn root_at_snapshot(&self, records: Vec<Record>) -> Vec<Record> {
        if records.first().is_none_or(|r| r.sequence == 1) {
            return records;
        }
        let subjects = Subjects::new(&self.cluster).unwrap();
        let loaded = Snapshots::open(&self.client, &subjects, 3)
            .await
            .unwrap()
            .load_latest()
            .await
            .unwrap()
            .expect("the ledger was trimmed but there is no snapshot");
        let at = loaded.manifest.ledger_sequence;
        assert!(
            records[0].sequence <= at + 1,
            "the ledger was trimmed past the latest snapshot ({at}): it starts at {}",
            records[0].sequence
        );
        let mut rooted = vec![Record {
            quarantined: None,
            id: None,
            sequence: at,
            entry: LedgerEntry {
                writer: loaded.manifest.writer.clone(),
                changes: loaded.changes,
            },
        }];
        rooted.extend(records.into_iter().filter(|r| r.sequence > at));
        rooted
    }

    pub fn dump_logs(&self) -> String {
        let mut out = String::new();
        for id in self.brokers.keys() {
            let text =
                std::fs::read_to_string(self.logs.0.join(format!("{id}.log"))).unwrap_or_default();
            // Rejections at the limit are the workload's normal noise; every other warning
            // and each leadership change is kept (a post-mortem needs what happened around
            // a NATS restart, not only the last lines).
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .filter(|l| !l.contains("registration_rejected"))
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("kind=leader_"))
                .take(120)
                .collect();
            out.push_str(&format!(
                "--- {id} (warnings and leadership changes, newest first)\n{}\n",
                tail.join("\n")
            ));
        }
        out
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump_logs());
        }
    }
}

/// One line per record (sequence, writer, the kinds of its changes), for a failed audit's
/// post-mortem.
pub fn outline(records: &[Record]) -> String {
    let mut out = String::from("--- the ledger (sequence writer: changes)\n");
    for r in records {
        let kinds: Vec<String> = r
            .entry
            .changes
            .iter()
            .map(|c| match c {
                lmbus_schemas::SeatChange::Leader { replica, term, .. } => {
                    format!("Leader({replica}, term {term})")
                }
                // Long enough for a grant's request number and granting replica.
                other => format!("{other:?}").chars().take(200).collect(),
            })
            .collect();
        // Where the writer fenced it, when that is not where it is stored.
        let misplaced = r
            .misplaced()
            .map(|at| format!(" MISPLACED: its id says sequence {at}"))
            .unwrap_or_default();
        let quarantined = r
            .quarantined
            .as_deref()
            .map(|q| format!(" QUARANTINED: {q}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "{} {} [{}]: {}{quarantined}{misplaced}\n",
            r.sequence,
            r.entry.writer,
            r.id.as_deref().unwrap_or("no id"),
            kinds.join("; ")
        ));
    }
    out
}

pub async fn next_leader(alerts: &mut AlertTap, not: Option<&str>) -> String {
    let elected = alerts
        .wait_for("leader_elected", |a| {
            a.kind == AlertKind::LeaderElected && Some(a.source.as_str()) != not
        })
        .await
        .unwrap();
    elected.source
}

/// What the slaves were told, kept by the workload.
#[derive(Debug, Default)]
pub struct Books {
    /// slave → agents it was told hold a seat (approved and not since unregistered).
    pub held: BTreeMap<String, BTreeSet<String>>,
    /// When each approval arrived and when its request was sent.
    pub approvals: Vec<(Instant, Instant)>,
    /// Outcomes other than approved / capacity rejections.
    pub errors: Vec<String>,
}

/// Makes the workload stop between operations, so the books can be compared with the
/// master's while nothing is in flight.
#[derive(Debug, Default)]
pub struct Hold {
    /// Set: every workload task finishes its operation and waits.
    on: std::sync::atomic::AtomicBool,
    /// How many tasks are waiting.
    waiting: std::sync::atomic::AtomicUsize,
}

impl Hold {
    /// Waits (while held) at the top of a workload pass.
    async fn gate(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.on.load(SeqCst) {
            return;
        }
        self.waiting.fetch_add(1, SeqCst);
        while self.on.load(SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.waiting.fetch_sub(1, SeqCst);
    }
}

/// Registers and unregisters agents on every slave in a loop until `stop` is set; waits
/// between operations while `hold` is on.
pub fn workload(
    slaves: Vec<(String, SlaveAgent)>,
    books: Arc<Mutex<Books>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    hold: Arc<Hold>,
) -> Vec<tokio::task::JoinHandle<SlaveAgent>> {
    slaves
        .into_iter()
        .enumerate()
        .map(|(n, (id, slave))| {
            let books = books.clone();
            let stop = stop.clone();
            let hold = hold.clone();
            tokio::spawn(async move {
                let mut i = n;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    hold.gate().await;
                    i += 1;
                    let agent = format!("a{}", i % AGENTS_PER_SLAVE);
                    let held = books
                        .lock()
                        .unwrap()
                        .held
                        .get(&id)
                        .is_some_and(|h| h.contains(&agent));
                    // Release every other pass over the agents, so seats keep changing hands.
                    if held && (i / AGENTS_PER_SLAVE) % 2 == 0 {
                        match slave.unregister(&agent).await {
                            Ok(_) => {
                                books
                                    .lock()
                                    .unwrap()
                                    .held
                                    .entry(id.clone())
                                    .or_default()
                                    .remove(&agent);
                            }
                            Err(e) => books
                                .lock()
                                .unwrap()
                                .errors
                                .push(format!("unregister: {e}")),
                        }
                        continue;
                    }
                    let sent = Instant::now();
                    match slave.register(&agent, "inbound").await {
                        Ok(Outcome::Approved { .. }) => {
                            let mut b = books.lock().unwrap();
                            b.held.entry(id.clone()).or_default().insert(agent);
                            b.approvals.push((Instant::now(), sent));
                        }
                        Ok(Outcome::Rejected {
                            reason: RejectReason::AggregateLimit,
                            ..
                        }) => {}
                        Ok(other) => books
                            .lock()
                            .unwrap()
                            .errors
                            .push(format!("{agent}: {other:?}")),
                        Err(e) => books.lock().unwrap().errors.push(format!("{agent}: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                slave
            })
        })
        .collect()
}

/// Waits (bounded) for the first approval of a registration sent after `t`; returns how
/// long after `t` it came.
pub async fn first_approval_after(books: &Arc<Mutex<Books>>, t: Instant) -> Duration {
    crate::eventually("an approval after the kill", || async {
        books
            .lock()
            .unwrap()
            .approvals
            .iter()
            .any(|(_, sent)| *sent > t)
    })
    .await
    .unwrap();
    books
        .lock()
        .unwrap()
        .approvals
        .iter()
        .filter(|(_, sent)| *sent > t)
        .map(|(at, _)| *at - t)
        .min()
        .unwrap()
}

pub async fn start_slaves(rig: &Rig) -> Vec<(String, SlaveAgent)> {
    let mut slaves = Vec::new();
    for n in 0..SLAVES {
        let id = format!("site{n}");
        slaves.push((
            id.clone(),
            SlaveAgent::start(rig.slave_config(&id)).await.unwrap(),
        ));
    }
    slaves
}

/// Slaves running the workload against a rig, with their books.
#[derive(Debug)]
pub struct Load {
    pub books: Arc<Mutex<Books>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    hold: Arc<Hold>,
    tasks: Vec<tokio::task::JoinHandle<SlaveAgent>>,
}

impl Load {
    /// Starts the slaves and their workload.
    pub async fn start(rig: &Rig) -> Load {
        let books = Arc::new(Mutex::new(Books::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hold = Arc::new(Hold::default());
        let tasks = workload(
            start_slaves(rig).await,
            books.clone(),
            stop.clone(),
            hold.clone(),
        );
        Load {
            books,
            stop,
            hold,
            tasks,
        }
    }

    /// Stops the workload between operations (every answer in), runs `check`, and lets
    /// the workload go on.
    pub async fn held<F: Future<Output = T>, T>(&self, check: F) -> T {
        use std::sync::atomic::Ordering::SeqCst;
        self.hold.on.store(true, SeqCst);
        crate::eventually("the workload to stop between operations", || async {
            self.hold.waiting.load(SeqCst) == self.tasks.len()
        })
        .await
        .unwrap();
        let out = check.await;
        self.hold.on.store(false, SeqCst);
        out
    }

    /// Waits (bounded) until `n` more registrations were approved than when called: the
    /// workload is running against a leader, instead of a fixed sleep that hopes so.
    pub async fn progress(&self, n: usize) {
        let count = || self.books.lock().unwrap().approvals.len();
        let target = count() + n;
        crate::eventually("the workload makes progress", || async {
            count() >= target
        })
        .await
        .unwrap();
    }

    /// What the hosts of the in-process slaves were told hold a seat, per slave.
    pub fn told(&self) -> BTreeMap<String, BTreeSet<String>> {
        told(&self.books)
    }

    /// Stops the workload; see [`finish`].
    pub async fn finish(self, rig: &Rig) -> (lmbus_broker::ledger::Audit, Vec<SlaveAgent>) {
        finish(rig, self.tasks, self.stop, &self.books, Duration::ZERO).await
    }

    /// Stops the workload and gives the ledger up to `settle` to hold what the slaves were
    /// told (in allotment mode, local decisions reach it with the next refresh); see
    /// [`finish`].
    pub async fn finish_settled(
        self,
        rig: &Rig,
        settle: Duration,
    ) -> (lmbus_broker::ledger::Audit, Vec<SlaveAgent>) {
        finish(rig, self.tasks, self.stop, &self.books, settle).await
    }
}

/// Stops the workload and checks the ledger against what the slaves were told: equal now,
/// or (given a `settle` time) within it.
pub async fn finish(
    rig: &Rig,
    tasks: Vec<tokio::task::JoinHandle<SlaveAgent>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    books_of: &Arc<Mutex<Books>>,
    settle: Duration,
) -> (lmbus_broker::ledger::Audit, Vec<SlaveAgent>) {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut slaves = Vec::new();
    for t in tasks {
        slaves.push(t.await.unwrap());
    }
    let stopped = Instant::now();
    let errors = books_of.lock().unwrap().errors.clone();
    assert!(
        errors.is_empty(),
        "the host application saw errors: {errors:?}"
    );
    let told = told(books_of);
    loop {
        let audit = rig.audit().await;
        let recorded = seats_of(&audit);
        if recorded == told {
            return (audit, slaves);
        }
        if stopped.elapsed() >= settle {
            assert_eq!(
                recorded, told,
                "the ledger's seats differ from what the slaves were told ({settle:?} after the workload stopped)"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The slaves' books without empty entries.
fn told(books: &Arc<Mutex<Books>>) -> BTreeMap<String, BTreeSet<String>> {
    books
        .lock()
        .unwrap()
        .held
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(s, h)| (s.clone(), h.clone()))
        .collect()
}

/// The ledger's seats per slave (agent ids), from an audit.
pub fn seats_of(audit: &lmbus_broker::ledger::Audit) -> BTreeMap<String, BTreeSet<String>> {
    audit
        .seats
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(s, h)| (s.clone(), h.keys().cloned().collect()))
        .collect()
}

/// The replica answering status requests right now (the leader), if any.
pub async fn current_leader(rig: &Rig) -> Option<String> {
    let subjects = Subjects::new(&rig.cluster).unwrap();
    lmbus_ops::fetch_status(&rig.client, &subjects, Duration::from_secs(2))
        .await
        .ok()
        .map(|s| s.broker_id)
}

pub fn priority_of(id: &str) -> u32 {
    id.trim_start_matches('b').parse().unwrap()
}
