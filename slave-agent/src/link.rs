//! One master as the slave sees it: its own NATS connection and cluster subjects, and the
//! request/reply primitive with a timeout. A slave has one link (the primary), two (a
//! secondary too, usually at another site) or three (a backup master besides).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use lmbus_schemas::{
    BatchItem, BatchRequest, ControlMessage, Heartbeat, Hello, MAX_BATCH_ITEMS, RegisterRequest,
    Reply, SlaveId, SlaveOp, Subjects, UnregisterRequest, decode, encode,
};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::error::SlaveError;
use crate::master::Master;

/// A request the slave sends. Registrations and unregistrations may go out together in
/// one `batch` message when the host asks for several at once (coalescing); everything
/// else goes alone.
pub(crate) trait Request: Serialize {
    fn batch_item(&self) -> Option<BatchItem> {
        None
    }
}

impl Request for RegisterRequest {
    fn batch_item(&self) -> Option<BatchItem> {
        Some(BatchItem::Register(self.clone()))
    }
}

impl Request for UnregisterRequest {
    fn batch_item(&self) -> Option<BatchItem> {
        Some(BatchItem::Unregister(self.clone()))
    }
}

impl Request for Hello {}
impl Request for Heartbeat {}
impl Request for lmbus_schemas::AllotRequest {}
impl Request for lmbus_schemas::Goodbye {}

type Answer = Result<Ask, SlaveError>;

/// Registrations and unregistrations waiting to be sent, and how many senders are at work.
#[derive(Debug, Default)]
struct Coalescer {
    queue: Vec<(BatchItem, oneshot::Sender<Answer>)>,
    senders: usize,
    /// How many requests the last message carried.
    last_round: usize,
}

/// How many coalesced messages a link keeps on their way to the master at once. One: in the
/// throughput bench 2 and 3 measured worse (the batches only get smaller; 2 made 0.6-0.8x
/// the operations a second of 1 in alternating runs).
const ROUNDS_IN_FLIGHT: usize = 1;

/// The slave's links: the primary's, and the secondary's and the backup's when configured.
#[derive(Debug)]
pub(crate) struct Links {
    primary: Arc<Link>,
    secondary: Option<Arc<Link>>,
    backup: Option<Arc<Link>>,
}

impl Links {
    pub(crate) fn new(primary: Link, secondary: Option<Link>, backup: Option<Link>) -> Self {
        Self {
            primary: Arc::new(primary),
            secondary: secondary.map(Arc::new),
            backup: backup.map(Arc::new),
        }
    }

    /// The link to `master`. Only a slave that configured a secondary (or a backup) ever
    /// names it (every choice of master goes through the policy, which knows which are
    /// configured), so asking for a missing one is a bug in this crate, not a condition to
    /// handle.
    pub(crate) fn get(&self, master: Master) -> &Arc<Link> {
        match master {
            Master::Primary => &self.primary,
            Master::Secondary => self
                .secondary
                .as_ref()
                .expect("the secondary is only named when one is configured"),
            Master::Backup => self
                .backup
                .as_ref()
                .expect("the backup master is only named when one is configured"),
        }
    }

    /// The configured links, the primary first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Link>> {
        std::iter::once(&self.primary)
            .chain(&self.secondary)
            .chain(&self.backup)
    }
}

/// What a request to a master came to.
#[derive(Debug, Clone)]
pub(crate) enum Ask {
    /// The master answered, `latency` after the request was sent at `sent`.
    Reply {
        reply: Reply,
        sent: Instant,
        latency: Duration,
    },
    /// Nobody answered: no responders, or the timeout passed.
    Unavailable(String),
}

#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) id: Master,
    pub(crate) client: Client,
    pub(crate) subjects: Subjects,
    pub(crate) nats_url: String,
    /// Serializes hellos on this link, so a burst of requests meeting a lost session says
    /// hello once.
    pub(crate) hello_lock: tokio::sync::Mutex<()>,
    /// Numbers hellos so the master can ignore a delayed old one (and refuse a replayed
    /// one): the first is 1.
    pub(crate) hello_seq: std::sync::atomic::AtomicU64,
    /// How many hellos this link completed: a caller that waited on `hello_lock` while it
    /// moved does not say hello again.
    pub(crate) hellos: std::sync::atomic::AtomicU64,
    /// Counts `new_leader` control messages (a subscription of its own, so that a request
    /// the agent's background task waits on cannot delay it): a request waiting for an
    /// answer is sent again once when it moves.
    leaders: watch::Sender<u64>,
    coalescer: Mutex<Coalescer>,
}

impl Link {
    /// Connects to one master's NATS. With `retry` the connection is made in the
    /// background (the master may be down at start and a second one is configured);
    /// otherwise an unreachable NATS is an error at once.
    pub(crate) async fn connect(
        id: Master,
        nats_url: &str,
        auth: &lmbus_nats::NatsAuth,
        cluster: &str,
        slave: &SlaveId,
        retry: bool,
    ) -> Result<Self, SlaveError> {
        let subjects = Subjects::new(cluster).map_err(|e| SlaveError::Config(e.to_string()))?;
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("lmbus-slave {slave} ({})", id.name()))
            .custom_inbox_prefix(subjects.slave_inbox_prefix(slave));
        if retry {
            options = options.retry_on_initial_connect();
        }
        let client = lmbus_nats::connect(nats_url, options, auth)
            .await
            .map_err(|e| SlaveError::Connect {
                url: nats_url.to_owned(),
                detail: match e {
                    lmbus_nats::ConnectFailure::Connect { detail, .. } => detail,
                    other => other.to_string(),
                },
            })?;
        let (leaders, _) = watch::channel(0u64);
        match client.subscribe(subjects.control(slave)).await {
            Ok(mut control) => {
                let leaders = leaders.clone();
                tokio::spawn(async move {
                    while let Some(msg) = futures::StreamExt::next(&mut control).await {
                        if let Ok(ControlMessage::NewLeader) =
                            decode::<ControlMessage>(&msg.payload)
                        {
                            leaders.send_modify(|n| *n += 1);
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for new leaders; requests wait out their timeout")
            }
        }
        Ok(Self {
            id,
            client,
            subjects,
            nats_url: nats_url.to_owned(),
            hello_lock: tokio::sync::Mutex::new(()),
            hello_seq: Default::default(),
            hellos: Default::default(),
            leaders,
            coalescer: Mutex::default(),
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        self.id.name()
    }

    /// `new_leader` control messages from now on: the master can decide again (a new
    /// leader, or the same one after its ledger stalled), so a retry need not wait.
    pub(crate) fn new_leaders(&self) -> watch::Receiver<u64> {
        self.leaders.subscribe()
    }

    /// Sends `body` to this master and waits `timeout` for the answer. Registrations and
    /// unregistrations are coalesced: while [`ROUNDS_IN_FLIGHT`] messages of them are on
    /// their way, those asked for meanwhile wait and then go out together in one `batch`
    /// request (at most `MAX_BATCH_ITEMS`), each caller getting its own item's reply. One
    /// alone goes on its own subject, so a host asking one at a time pays nothing for this.
    pub(crate) async fn ask<T: Request>(
        self: &Arc<Self>,
        slave: &SlaveId,
        op: SlaveOp,
        body: &T,
        timeout: Duration,
    ) -> Answer {
        let Some(item) = body.batch_item() else {
            return self.send(slave, op, body, timeout).await;
        };
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut c = self.coalescer.lock().unwrap_or_else(|e| e.into_inner());
            c.queue.push((item, tx));
            let free = c.senders < ROUNDS_IN_FLIGHT;
            c.senders += usize::from(free);
            free
        };
        if first {
            // Send this round (ours, and whatever queued meanwhile) from here; a task
            // sends the rounds after it, if any.
            self.send_round(slave, timeout).await;
            if self.more_rounds() {
                let (link, slave) = (self.clone(), slave.clone());
                tokio::spawn(async move {
                    loop {
                        link.send_round(&slave, timeout).await;
                        if !link.more_rounds() {
                            break;
                        }
                    }
                });
            }
        }
        rx.await.unwrap_or_else(|_| {
            Ok(Ask::Unavailable(format!(
                "the request to the {} master was dropped",
                self.name()
            )))
        })
    }

    /// `true` when requests are waiting; otherwise the sender stops (under the same lock,
    /// so a request queued right after finds a free sender's place and sends itself).
    fn more_rounds(&self) -> bool {
        let mut c = self.coalescer.lock().unwrap_or_else(|e| e.into_inner());
        if c.queue.is_empty() {
            c.senders -= 1;
            false
        } else {
            true
        }
    }

    /// Sends the waiting requests, one message for all of them, and hands out the replies.
    async fn send_round(&self, slave: &SlaveId, timeout: Duration) {
        // Let the callers that are ready to run join this round first. When a round's
        // replies go out, the sender's own caller usually asks again before the others
        // have run; without this it would go out alone, and the rest would wait a whole
        // round behind it (rounds alternating one item and fifteen). One yield is enough:
        // a woken caller reaches the queue without waiting on anything else. Measured in
        // the throughput bench (16 callers per slave): 8.1 items per message without it,
        // 14.8 with it. Only after a shared message: a caller asking alone (the last
        // message carried one request) has nobody to wait for, and the yield (a pass of
        // the scheduler) showed in its latency: concurrency-1 p50 / echo p50 1.66 with it,
        // 1.62 without, four alternating runs each.
        let shared = self
            .coalescer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_round
            > 1;
        if shared {
            tokio::task::yield_now().await;
        }
        let mut round: Vec<(BatchItem, oneshot::Sender<Answer>)> = {
            let mut c = self.coalescer.lock().unwrap_or_else(|e| e.into_inner());
            let n = c.queue.len().min(MAX_BATCH_ITEMS);
            c.last_round = n;
            c.queue.drain(..n).collect()
        };
        if round.is_empty() {
            return;
        }
        if round.len() == 1 {
            let (item, tx) = round.remove(0);
            let answer = match &item {
                BatchItem::Register(r) => self.send(slave, SlaveOp::Register, r, timeout).await,
                BatchItem::Unregister(u) => self.send(slave, SlaveOp::Unregister, u, timeout).await,
            };
            let _ = tx.send(answer);
            return;
        }
        let (items, waiting): (Vec<BatchItem>, Vec<oneshot::Sender<Answer>>) =
            round.into_iter().unzip();
        let n = items.len();
        let answer = self
            .send(slave, SlaveOp::Batch, &BatchRequest { items }, timeout)
            .await;
        match answer {
            Ok(Ask::Reply {
                reply: Reply::Batch(replies),
                sent,
                latency,
            }) if replies.len() == n => {
                for (reply, tx) in replies.into_iter().zip(waiting) {
                    let _ = tx.send(Ok(Ask::Reply {
                        reply,
                        sent,
                        latency,
                    }));
                }
            }
            // One answer for the whole message (a standby's `no_leader`, an error, no
            // answer at all): it is every item's answer.
            Ok(other) => {
                for tx in waiting {
                    let _ = tx.send(Ok(other.clone()));
                }
            }
            Err(e) => {
                let detail = e.to_string();
                for tx in waiting {
                    let _ = tx.send(Err(SlaveError::Nats(detail.clone())));
                }
            }
        }
    }

    /// Sends `body` on the slave's `op` subject of this master and waits `timeout` for
    /// the answer.
    async fn send<T: Serialize>(
        &self,
        slave: &SlaveId,
        op: SlaveOp,
        body: &T,
        timeout: Duration,
    ) -> Answer {
        let payload: bytes::Bytes = encode(body)
            .map_err(|e| SlaveError::Nats(e.to_string()))?
            .into();
        let subject = self.subjects.slave_op(slave, op);
        let sent = Instant::now();
        let mut leaders = self.leaders.subscribe();
        let mut resent = false;
        let result = loop {
            let request = self.client.request(subject.clone(), payload.clone());
            tokio::select! {
                result = tokio::time::timeout(timeout, request) => break result,
                // A new leader: the one this went to may be frozen. Ask the new one now
                // (once) rather than wait out the timeout.
                Ok(()) = leaders.changed(), if !resent => {
                    resent = true;
                    tracing::debug!(%subject, "a new leader; sending the request again");
                }
            }
        };
        match result {
            Err(_) => Ok(Ask::Unavailable(format!(
                "no answer from the {} master on {subject} within {}",
                self.name(),
                lmbus_schemas::human::duration(timeout)
            ))),
            Ok(Err(e)) => match e.kind() {
                RequestErrorKind::NoResponders => Ok(Ask::Unavailable(format!(
                    "no {} master is listening on {subject}",
                    self.name()
                ))),
                RequestErrorKind::TimedOut => Ok(Ask::Unavailable(format!(
                    "no answer from the {} master on {subject}",
                    self.name()
                ))),
                _ => Ok(Ask::Unavailable(format!(
                    "cannot reach the {} master's NATS at {}: {e}",
                    self.name(),
                    self.nats_url
                ))),
            },
            Ok(Ok(msg)) => match decode::<Reply>(&msg.payload) {
                Ok(reply) => Ok(Ask::Reply {
                    reply,
                    sent,
                    latency: sent.elapsed(),
                }),
                Err(e) => Err(SlaveError::Protocol(format!(
                    "the {} master's reply on {subject} could not be decoded: {e}",
                    self.name()
                ))),
            },
        }
    }

    /// Publishes without waiting for an answer.
    pub(crate) async fn publish<T: Serialize>(&self, slave: &SlaveId, op: SlaveOp, body: &T) {
        let subject = self.subjects.slave_op(slave, op);
        match encode(body) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(subject, bytes.into()).await {
                    tracing::warn!(error = %e, "cannot publish to the {} master", self.name());
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode a message"),
        }
    }
}
