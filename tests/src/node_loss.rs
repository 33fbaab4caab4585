//! Losing a NATS node under load, measured from outside in two parts: NATS's (from the
//! kill until JetStream has elected new leaders for the streams the killed node led) and
//! lmbus's (from then until a slave is told "approved" again). Used by
//! `redundancy.rs::losing_one_nats_node_stops_nothing` and the node-loss row of the
//! failover bench (`benches/failover.rs`).
//!
//! NATS's part ends when JetStream says the stream has a new leader both ways: its own
//! advisory (`$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.<stream>`, published by the new
//! leader's server) has arrived, and its API answers a stream info naming a leader other
//! than the dead node (polled every 25 ms; while JetStream's meta leader is being elected
//! too, the API answers "temporarily unavailable" for a while after the advisory). lmbus's
//! part is the first approval a slave's host receives after that.
//!
//! A failure anywhere here is a test failure, so it unwraps.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lmbus_schemas::Subjects;
use tokio::time::Instant;

use crate::ha::{Books, Rig};

/// The longest any part of a trial is waited for.
const TRIAL_BOUND: Duration = Duration::from_secs(60);

/// One kill -9 of the NATS node leading the ledger stream.
#[derive(Debug, Clone)]
pub struct Trial {
    /// The node killed (`n0`…).
    pub node: String,
    /// Whether that node also led the leader-lease bucket's stream.
    pub led_lease: bool,
    /// From the kill until the ledger stream (and the lease bucket's, when the node led it
    /// too) had a new leader, as JetStream announced it (advisories), and its API answered
    /// about it (which may come later, while the meta leader is elected too).
    pub nats: Duration,
    /// From the kill until the advisories alone.
    pub elected: Duration,
    /// From the kill until the first approval a host received after the ledger's new
    /// leader was announced (none can be decided before; earlier ones were on the wire).
    pub resumed: Duration,
    /// The kill's wall-clock time (UTC, `HH:MM:SS.mmm`), to find it in the brokers' logs.
    pub at: String,
}

/// Now as `HH:MM:SS.mmm` UTC.
fn wall_clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}

impl Trial {
    /// lmbus's share: from the streams having leaders again to the first approval (zero if
    /// the approval came before this client heard the advisory).
    pub fn lmbus(&self) -> Duration {
        self.resumed.saturating_sub(self.nats)
    }

    /// lmbus's share counted from the advisories alone: an upper bound, which includes any
    /// time JetStream's API still answered "temporarily unavailable".
    pub fn lmbus_after_elected(&self) -> Duration {
        self.resumed.saturating_sub(self.elected)
    }
}

impl std::fmt::Display for Trial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} UTC killed NATS node {} (ledger leader{}): new leaders announced after {:?}, JetStream serving them after {:?} (NATS), first approval {:?} after the kill, lmbus's share {:?} ({:?} after the announcements)",
            self.at,
            self.node,
            if self.led_lease {
                " and lease leader"
            } else {
                ""
            },
            self.elected,
            self.nats,
            self.resumed,
            self.lmbus(),
            self.lmbus_after_elected()
        )
    }
}

/// Stream → when each new leader was heard of, and who it is.
type Elected = BTreeMap<String, Vec<(Instant, String)>>;

/// Watches JetStream's stream-leader advisories: when this client heard each stream's
/// newest leader, and who it is.
#[derive(Debug, Clone)]
pub struct LeaderWatch {
    elected: Arc<Mutex<Elected>>,
}

impl LeaderWatch {
    pub async fn start(client: &async_nats::Client) -> LeaderWatch {
        let mut sub = client
            .subscribe("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.>")
            .await
            .unwrap();
        client.flush().await.unwrap();
        let elected: Arc<Mutex<Elected>> = Arc::default();
        let book = elected.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let at = Instant::now();
                let stream = msg
                    .subject
                    .as_str()
                    .trim_start_matches("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.")
                    .to_owned();
                let leader = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                    .ok()
                    .and_then(|v| v.get("leader").and_then(|l| l.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                book.lock()
                    .unwrap()
                    .entry(stream)
                    .or_default()
                    .push((at, leader));
            }
        });
        LeaderWatch { elected }
    }

    /// When a leader other than `not` was first announced for `stream` after `after`.
    fn elected_after(&self, stream: &str, after: Instant, not: &str) -> Option<Instant> {
        self.elected
            .lock()
            .unwrap()
            .get(stream)?
            .iter()
            .find(|(at, leader)| *at > after && leader != not)
            .map(|(at, _)| *at)
    }
}

/// For each of `streams`, when the JetStream API first answered its info with a leader
/// other than `dead` (polled every 25 ms from now on, each ask bounded by 250 ms).
fn info_reports(
    client: &async_nats::Client,
    streams: &[&str],
    dead: &str,
) -> Arc<Mutex<Vec<Option<Instant>>>> {
    let reports = Arc::new(Mutex::new(vec![None; streams.len()]));
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(250))
        .build(client.clone());
    for (i, stream) in streams.iter().enumerate() {
        let (js, stream, dead, reports) = (
            js.clone(),
            stream.to_string(),
            dead.to_owned(),
            reports.clone(),
        );
        tokio::spawn(async move {
            let deadline = Instant::now() + TRIAL_BOUND;
            while Instant::now() < deadline {
                let leader = js
                    .get_stream(&stream)
                    .await
                    .ok()
                    .and_then(|s| s.cached_info().cluster.as_ref()?.leader.clone());
                if leader.is_some_and(|l| l != dead) {
                    reports.lock().unwrap()[i] = Some(Instant::now());
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        });
    }
    reports
}

/// The node leading `stream` now, as the meta layer reports it (bounded retries: right
/// after a node loss the answer may lag).
pub async fn stream_leader(client: &async_nats::Client, stream: &str) -> String {
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + TRIAL_BOUND;
    loop {
        let leader = async {
            let mut s = js.get_stream(stream).await.ok()?;
            s.info().await.ok()?.cluster.as_ref()?.leader.clone()
        }
        .await;
        if let Some(leader) = leader {
            return leader;
        }
        assert!(Instant::now() < deadline, "{stream} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until every replica of `stream` is current again (after a restarted
/// node caught up), so the next trial starts from a whole cluster. This is nats-server's
/// time, not lmbus's: under the workload a restarted node of 2.10+ was once not current
/// within 15 s in CI, and a 2.15.1 node once not within 60 s on a loaded CI machine, so the
/// bound is two minutes; a timeout prints the replicas as the stream last showed them.
pub async fn wait_whole(client: &async_nats::Client, stream: &str, nodes: usize) {
    let js = async_nats::jetstream::new(client.clone());
    let waited = crate::eventually_within(
        &format!("{stream} to have all its replicas current"),
        Duration::from_secs(120),
        || async {
            let Ok(mut s) = js.get_stream(stream).await else {
                return false;
            };
            let Ok(info) = s.info().await else {
                return false;
            };
            info.cluster.as_ref().is_some_and(|c| {
                c.leader.is_some()
                    && c.replicas.len() + 1 == nodes
                    && c.replicas.iter().all(|r| r.current && !r.offline)
            })
        },
    )
    .await;
    if let Err(e) = waited {
        let cluster = match js.get_stream(stream).await {
            Ok(mut s) => match s.info().await {
                Ok(info) => format!("{:?}", info.cluster),
                Err(e) => format!("no stream info: {e}"),
            },
            Err(e) => format!("no stream: {e}"),
        };
        panic!("{e:#}; the stream's cluster last showed: {cluster}");
    }
}

/// Kills (SIGKILL) the NATS node leading the ledger stream while the workload runs, and
/// measures both parts (see the module doc). The node stays down; the caller restarts it
/// (its index is returned).
pub async fn kill_ledger_leader(rig: &mut Rig, books: &Arc<Mutex<Books>>) -> (usize, Trial) {
    let subjects = Subjects::new(&rig.cluster).unwrap();
    let ledger = subjects.ledger_stream();
    let lease = subjects.election_stream();
    let node = stream_leader(&rig.client, &ledger).await;
    let led_lease = stream_leader(&rig.client, &lease).await == node;
    let index: usize = node.trim_start_matches('n').parse().unwrap();
    // Advisories are heard on a node that survives, so no reconnect can miss one.
    let survivor = (index + 1) % 3;
    let observer = async_nats::connect(rig.nats.node_url(survivor))
        .await
        .unwrap();
    let watch = LeaderWatch::start(&observer).await;
    let at = wall_clock();
    let killed = Instant::now();
    rig.nats.kill(index);
    let deadline = killed + TRIAL_BOUND;
    let mut streams = vec![ledger.as_str()];
    if led_lease {
        streams.push(lease.as_str());
    }
    let answered = info_reports(&observer, &streams, &node);
    let (nats, elected, ledger_elected) = loop {
        let elected: Vec<Option<Instant>> = streams
            .iter()
            .map(|s| watch.elected_after(s, killed, &node))
            .collect();
        let answered: Vec<Option<Instant>> = answered.lock().unwrap().clone();
        if elected.iter().chain(&answered).all(Option::is_some) {
            let elected: Vec<Instant> = elected.into_iter().flatten().collect();
            let last_elected = *elected.iter().max().unwrap();
            let served = answered
                .into_iter()
                .flatten()
                .max()
                .unwrap()
                .max(last_elected);
            break (served - killed, last_elected - killed, elected[0]);
        }
        assert!(
            Instant::now() < deadline,
            "JetStream announced no new leader for {streams:?} within {TRIAL_BOUND:?} of killing {node}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let resumed = loop {
        let first = books
            .lock()
            .unwrap()
            .approvals
            .iter()
            .map(|(at, _)| *at)
            .filter(|at| *at > ledger_elected)
            .min();
        if let Some(at) = first {
            break at - killed;
        }
        assert!(
            Instant::now() < deadline,
            "no approval within {TRIAL_BOUND:?} of killing {node}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    (
        index,
        Trial {
            node,
            led_lease,
            nats,
            elected,
            resumed,
            at,
        },
    )
}
