//! The seat ledger: a JetStream stream holding every change to the seat state
//! ([`LedgerEntry`]), appended by the leader before any slave hears of the decision.
//!
//! Every append is fenced with the stream's expected last sequence: the leader appends
//! only on top of the record it last saw, so a deposed leader (paused, partitioned, slow)
//! whose view is stale has its write refused by the server and steps down. No clocks are
//! compared anywhere.
//!
//! Works on nats-server 2.9 and later: the stream is created with plain stream config,
//! and readers use ordered push consumers.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::Client;
use async_nats::jetstream::{
    self, Context,
    consumer::{DeliverPolicy, push},
    context::PublishErrorKind,
    message::PublishMessage,
    stream,
};
use futures::StreamExt;
use lmbus_schemas::{LedgerEntry, MAX_MESSAGE_BYTES, SeatChange, Subjects, decode, encode};

use crate::jetstream::{js_context, open_stream};

/// How long an append may take before it counts as unacknowledged
/// ([`AppendError::NoAck`]): it may or may not have landed. The leader sends it again
/// ([`Sent::resend`]) while its lease holds, within [`RESEND_WITHIN`].
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the server remembers an append's message id.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10);

/// How long after first sending an append the leader may still send it again; past it the
/// leader steps down (a ledger stream that has had no leader for this long will not be
/// helped by a new lmbus leader either, but the slaves then hear `no_leader`).
pub const RESEND_WITHIN: Duration = Duration::from_secs(20);

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Someone else appended since this replica's last record: it is no longer the
    /// leader the ledger follows.
    #[error(
        "ledger write refused: the ledger moved past sequence {expected} (another replica is writing)"
    )]
    Fenced { expected: u64 },
    /// The server refused the append, or it could not be sent: it did not land.
    #[error("ledger write failed: {0}")]
    Failed(String),
    /// No acknowledgement came (the stream's leader died, or it has none yet): the append
    /// may or may not have landed. Sending it again is safe ([`Sent::resend`]).
    #[error("ledger write not acknowledged: {0}")]
    NoAck(String),
}

/// Why reading the ledger stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream, its consumer or a message failed at the NATS level (the server is
    /// unreachable, the consumer was lost, the stream is electing its leader): read again.
    #[error("{0}")]
    Nats(String),
    /// A record written by a newer lmbus, which this replica cannot read.
    #[error(
        "ledger record {sequence} was written by a newer lmbus ({detail}): upgrade this broker replica"
    )]
    NewerVersion { sequence: u64, detail: String },
}

/// A replica met a record further on than the next one it needs: the records between
/// were trimmed (they are covered by a snapshot, which the replica must load instead).
#[derive(Debug, thiserror::Error)]
#[error(
    "the ledger continues at record {found} but this replica needs record {expected}: the records between were trimmed (after a snapshot)"
)]
pub struct Gap {
    pub expected: u64,
    pub found: u64,
}

/// One record read back from the ledger.
#[derive(Debug)]
pub struct Record {
    pub sequence: u64,
    pub entry: LedgerEntry,
    /// Why the stored message is not a ledger record: garbage no replica wrote (it does not
    /// decode: `entry` is empty), or a record stored away from the sequence its id names
    /// (`entry` is kept for post-mortems). Such a record is quarantined: every replica
    /// skips it the same way, and the leader raises a critical alert; whoever reads
    /// `entry` must check this first. A record from a newer build (a higher envelope
    /// version) is never quarantined: reading stops with an error.
    pub quarantined: Option<String>,
    /// The message id its writer sent it with (`<fence prefix>.<the sequence it was fenced
    /// to land at>`, see [`Ledger::send`]), when the stored message has one. A record stored
    /// at another sequence ([`Record::misplaced`]) is quarantined when read.
    pub id: Option<String>,
}

impl Record {
    /// The sequence this record's id says its writer fenced it at, when that is not where
    /// it is stored. The fence makes a record land only there (nats-server 2.9 does not
    /// check a fence of 0, so a first record can land elsewhere, and its writer, told
    /// another sequence, counts it as failed), so `Some` means the record was copied (by
    /// the store, or from another stream), or written without the fence.
    pub fn misplaced(&self) -> Option<u64> {
        let fenced: u64 = self.id.as_deref()?.rsplit_once('.')?.1.parse().ok()?;
        (fenced != self.sequence).then_some(fenced)
    }
}

type AckFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
                    tokio::time::error::Elapsed,
                >,
            > + Send,
    >,
>;

/// An append sent and not yet acknowledged ([`Ledger::send`]).
pub struct Sent {
    /// The record it must land on.
    expected: u64,
    /// The sequence it lands at when it is recorded.
    pub sequence: u64,
    /// When it was first handed to the client, for the append latency metric.
    pub started: tokio::time::Instant,
    ack: AckFuture,
    /// The acknowledgement came back as a fence refusal of a resend, and whether the first
    /// send landed is being read: a [`Sent::wait`] abandoned meanwhile (in a `select!`)
    /// reads it again when taken up, instead of polling the finished acknowledgement.
    reading_landed: bool,
    /// Everything needed to send it again, unchanged.
    again: Again,
}

/// An append as sent: the same message, id and fence for every resend.
#[derive(Clone)]
struct Again {
    js: Context,
    stream: String,
    subject: String,
    payload: bytes::Bytes,
    id: String,
    /// The message id it is chained on, when an earlier append was in flight.
    after_id: Option<String>,
    /// How often it was sent again.
    resent: u32,
}

impl Again {
    fn message(&self, expected: u64) -> PublishMessage {
        let mut message = PublishMessage::build()
            .payload(self.payload.clone())
            .expected_last_sequence(expected)
            .message_id(&self.id);
        if let Some(after) = &self.after_id {
            message = message.expected_last_message_id(after);
        }
        message
    }
}

/// Publishes an append, bounded by [`APPEND_TIMEOUT`] for the sending and again for the
/// acknowledgement.
async fn publish(again: &Again, expected: u64) -> Result<AckFuture, AppendError> {
    let ack = match tokio::time::timeout(
        APPEND_TIMEOUT,
        again
            .js
            .send_publish(again.subject.clone(), again.message(expected)),
    )
    .await
    {
        Err(_) => {
            return Err(AppendError::Failed(format!(
                "could not send within {APPEND_TIMEOUT:?}"
            )));
        }
        Ok(Err(e)) => return Err(AppendError::Failed(e.to_string())),
        Ok(Ok(ack)) => ack,
    };
    // The deadline runs from now, not from when the ack is first awaited.
    Ok(Box::pin(tokio::time::timeout(
        APPEND_TIMEOUT,
        ack.into_future(),
    )))
}

impl std::fmt::Debug for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sent")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Sent {
    /// Waits for the server's answer: the record's sequence, or why it was not recorded
    /// (or may not have been).
    pub async fn acked(mut self) -> Result<u64, AppendError> {
        self.wait().await
    }

    /// [`Self::acked`] by reference, so that waiting can be abandoned and taken up again
    /// (in a `select!`), also while it reads whether a refused resend had landed; not to
    /// be called again once it returned, except after [`Self::resend`].
    pub async fn wait(&mut self) -> Result<u64, AppendError> {
        let expected = self.expected;
        if !self.reading_landed {
            match self.answer().await {
                Some(result) => return result,
                None => self.reading_landed = true,
            }
        }
        // Sent again: the fence also refuses a resend of an append that did land
        // (nats-server 2.10 and later check the fence before the message id; 2.9 answers
        // with the duplicate, which is read too). Look at the record it would be.
        let (js, stream, id) = (
            self.again.js.clone(),
            self.again.stream.clone(),
            self.again.id.clone(),
        );
        let landed = landed(js, stream, self.sequence, id).await;
        self.reading_landed = false;
        match landed {
            Some(true) => Ok(self.sequence),
            Some(false) => Err(AppendError::Fenced { expected }),
            None => Err(AppendError::NoAck(format!(
                "refused when sent again, and record {} could not be read to see whether the first send landed",
                self.sequence
            ))),
        }
    }

    /// The acknowledgement as a result, or `None` for a fence refusal of a resend or a
    /// duplicate at the predicted sequence (either may be this very record, landed by an
    /// earlier send: [`Self::wait`] reads it).
    async fn answer(&mut self) -> Option<Result<u64, AppendError>> {
        let expected = self.expected;
        Some(match (&mut self.ack).await {
            Err(_) => Err(AppendError::NoAck(format!(
                "no acknowledgement within {APPEND_TIMEOUT:?}"
            ))),
            // Nobody serves the stream right now (it is electing its leader).
            Ok(Err(e)) if e.kind() == PublishErrorKind::StreamNotFound => {
                Err(AppendError::NoAck(e.to_string()))
            }
            // nats-server 2.10 and later: an earlier send of this very append (same id) is
            // still being replicated by the stream's new leader. Not a refusal: the next
            // resend is answered with that record (or the fence, and `wait` reads it).
            Ok(Err(e)) if in_process(&e) => Err(AppendError::NoAck(format!(
                "{e}: an earlier send of it is still being recorded"
            ))),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
                ) =>
            {
                if self.again.resent > 0 {
                    return None;
                }
                Err(AppendError::Fenced { expected })
            }
            Ok(Err(e)) => Err(AppendError::Failed(e.to_string())),
            // A duplicate of this append's id at the predicted sequence should be this very
            // record, landed by an earlier send whose acknowledgement was lost (ids are
            // unique to one replica's fence). The answer comes from the server's memory of
            // ids, not from the record: `wait` reads the record and compares the id before
            // counting it as recorded.
            Ok(Ok(ack)) if ack.duplicate && ack.sequence == self.sequence => return None,
            // A sequence other than the predicted one cannot pass the fence: this append is
            // not recorded.
            Ok(Ok(ack)) if ack.duplicate || ack.sequence != self.sequence => {
                Err(AppendError::Failed(format!(
                    "acknowledged as sequence {} (duplicate: {}) instead of {}",
                    ack.sequence, ack.duplicate, self.sequence
                )))
            }
            Ok(Ok(ack)) => Ok(ack.sequence),
        })
    }

    /// Sends this append again, unchanged (message id, fence, chain), after it went
    /// unacknowledged; [`Self::wait`] then waits for the new acknowledgement. If the first
    /// send did land, the server answers with that record (a duplicate of its id at the
    /// predicted sequence), which counts as recorded.
    pub async fn resend(&mut self) -> Result<(), AppendError> {
        self.ack = publish(&self.again, self.expected).await?;
        self.reading_landed = false;
        self.again.resent += 1;
        Ok(())
    }

    /// How often it was sent again.
    pub fn resent(&self) -> u32 {
        self.again.resent
    }
}

/// Whether the server refused a send because an earlier one with the same message id is
/// still in process (JetStream error 10158, "duplicate message id is in process").
fn in_process(e: &async_nats::jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|js| {
            js.error_code() == async_nats::jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT
        })
}

/// Whether the record at `sequence` of `stream` has the message id `id`, read from the
/// stream's leader; `None` when it cannot be read.
async fn landed(js: Context, stream: String, sequence: u64, id: String) -> Option<bool> {
    let read = async {
        let stream = js.get_stream_no_info(&stream).await.ok()?;
        match stream.get_raw_message(sequence).await {
            Ok(message) => Some(
                message
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .is_some_and(|stored| stored.as_str() == id),
            ),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                Some(false)
            }
            Err(_) => None,
        }
    };
    tokio::time::timeout(APPEND_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// The ledger stream of one cluster, as one replica sees it.
#[derive(Debug, Clone)]
pub struct Ledger {
    client: Client,
    js: Context,
    stream: String,
    subject: String,
    /// The sequence this replica's next append must sit on: its last append's.
    last: u64,
    /// The message id of this replica's last append (see [`Self::send`]).
    last_id: String,
    /// Starts every message id of this replica's appends; new for each fence, so ids never
    /// repeat across terms or replicas (a repeated id would be acknowledged as a duplicate).
    id_prefix: String,
}

impl Ledger {
    /// Opens the cluster's ledger stream, creating it (file storage, `replicas` copies)
    /// if it does not exist yet.
    pub async fn open(
        client: &Client,
        subjects: &Subjects,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let js = js_context(client);
        let name = subjects.ledger_stream();
        let subject = subjects.ledger();
        open_stream(
            &js,
            stream::Config {
            name: name.clone(),
            description: Some(format!(
                "lmbus seat ledger of cluster {}: every seat change, in decision order",
                subjects.cluster()
            )),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            // Message ids only chain pipelined appends (`Ledger::send`); the server keeps
            // each id for this long, so a short window keeps its memory small.
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
            },
            "ledger",
            |name| format!("the broker needs JetStream enabled on its NATS account and permission to use $JS.API.STREAM.* for {name}"),
        )
        .await?;
        Ok(Self {
            client: client.clone(),
            js,
            stream: name,
            subject,
            last: 0,
            last_id: String::new(),
            id_prefix: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The sequence the next append is fenced on.
    pub fn fence(&self) -> u64 {
        self.last
    }

    /// Sets the sequence the next append is fenced on: the last record this replica has
    /// applied.
    pub fn set_fence(&mut self, sequence: u64) {
        self.last = sequence;
        self.last_id.clear();
        self.id_prefix = uuid::Uuid::new_v4().simple().to_string();
    }

    /// The stream's last sequence now (0 when empty).
    pub async fn last_sequence(&self) -> anyhow::Result<u64> {
        // Looking the stream up fetches its info: one request, not two.
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .with_context(|| format!("cannot look up the ledger stream {}", self.stream))?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Deletes every record before `sequence` (they are covered by a snapshot).
    pub async fn trim_before(&self, sequence: u64) -> anyhow::Result<u64> {
        // The server reads a purge "up to sequence 0 or 1" as "purge everything".
        if sequence <= 1 {
            return Ok(0);
        }
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .with_context(|| format!("cannot look up the ledger stream {}", self.stream))?;
        let purged = stream
            .purge()
            .sequence(sequence)
            .await
            .with_context(|| format!("cannot trim the ledger stream {}", self.stream))?;
        Ok(purged.purged)
    }

    /// Appends one entry on top of [`Self::fence`] and waits for it; on success the fence
    /// has moved to the new record. Only with nothing else in flight.
    pub async fn append(&mut self, entry: &LedgerEntry) -> Result<u64, AppendError> {
        let (last, last_id) = (self.last, self.last_id.clone());
        let result = match self.send(entry, false).await {
            Ok(sent) => sent.acked().await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            (self.last, self.last_id) = (last, last_id);
        }
        result
    }

    /// Sends one entry without waiting for it (pipelining): it must land right after the
    /// record [`Self::fence`] names, which moves on to it at once. With `chained` (an
    /// earlier append of this replica is still unacknowledged) it must also land right
    /// after that append, by its message id: if the earlier one was refused because
    /// another writer's record landed first, a fence on the predicted sequence alone would
    /// let this one land on top of the intruder's.
    pub async fn send(&mut self, entry: &LedgerEntry, chained: bool) -> Result<Sent, AppendError> {
        let started = tokio::time::Instant::now();
        let payload = encode(entry).map_err(|e| AppendError::Failed(e.to_string()))?;
        if payload.len() > MAX_MESSAGE_BYTES {
            // No reader could decode it: refuse rather than block every standby.
            return Err(AppendError::Failed(format!(
                "a ledger entry of {} bytes exceeds the {MAX_MESSAGE_BYTES}-byte message limit (split_entries bounds them)",
                payload.len()
            )));
        }
        let expected = self.last;
        let sequence = expected + 1;
        let again = Again {
            js: self.js.clone(),
            stream: self.stream.clone(),
            subject: self.subject.clone(),
            payload: payload.into(),
            id: format!("{}.{sequence}", self.id_prefix),
            after_id: chained.then(|| self.last_id.clone()),
            resent: 0,
        };
        let ack = publish(&again, expected).await?;
        self.last = sequence;
        self.last_id = again.id.clone();
        Ok(Sent {
            expected,
            sequence,
            started,
            ack,
            reading_landed: false,
            again,
        })
    }

    /// Every record from `from` on, in order, as they are appended (an ordered consumer:
    /// gaps are repaired by the client).
    pub async fn follow(
        &self,
        from: u64,
    ) -> Result<impl futures::Stream<Item = Result<Record, ReadError>> + Unpin + use<>, ReadError>
    {
        let nats = |e: &dyn std::fmt::Display| {
            ReadError::Nats(format!(
                "cannot read the ledger stream {}: {e}",
                self.stream
            ))
        };
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| nats(&e))?;
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: self.subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| nats(&e))?;
        let messages = consumer.messages().await.map_err(|e| nats(&e))?;
        Ok(messages.map(|item| {
            let message = item.map_err(|e| ReadError::Nats(format!("reading the ledger: {e}")))?;
            let sequence = message
                .info()
                .map_err(|e| ReadError::Nats(format!("a ledger message without stream info: {e}")))?
                .stream_sequence;
            let id = message_id(message.headers.as_ref());
            record_of(sequence, &message.payload, id)
        }))
    }

    /// Record `sequence`, asked of the stream's leader: no consumer, so it works while
    /// JetStream's meta leader (which creates consumers) is still being elected after a
    /// NATS node died. `Ok(None)`: no such record (trimmed, or not written).
    pub async fn get(&self, sequence: u64) -> Result<Option<Record>, ReadError> {
        let stream = self
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| {
                ReadError::Nats(format!(
                    "cannot read the ledger stream {}: {e}",
                    self.stream
                ))
            })?;
        match stream.get_raw_message(sequence).await {
            Ok(message) => {
                let id = message_id(Some(&message.headers));
                record_of(sequence, &message.payload, id).map(Some)
            }
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(e) => Err(ReadError::Nats(format!(
                "cannot read record {sequence} of the ledger stream {}: {e}",
                self.stream
            ))),
        }
    }
}

/// The `Nats-Msg-Id` header of a stored message, if any.
fn message_id(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers?
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_owned())
}

/// A stored ledger message as a [`Record`]: quarantined if it does not decode or is stored
/// away from the sequence its writer fenced it at, an error if a newer lmbus wrote it.
fn record_of(sequence: u64, payload: &[u8], id: Option<String>) -> Result<Record, ReadError> {
    match decode::<LedgerEntry>(payload) {
        Ok(entry) => {
            let mut record = Record {
                sequence,
                entry,
                quarantined: None,
                id,
            };
            // The fence lets an append land only at the sequence its id names, so a record
            // stored elsewhere was never acknowledged there: a copy of a record (the history
            // a NATS cluster recovered after every node stopped is not always the one it
            // acknowledged), or a writer without the fence. Every reader skips it alike; the
            // entry is kept for the post-mortem.
            if let Some(fenced) = record.misplaced() {
                record.quarantined = Some(format!(
                    "stored at sequence {sequence} but its writer fenced it at {fenced} (message id {})",
                    lmbus_schemas::printable(&lmbus_schemas::truncated(
                        record.id.as_deref().unwrap_or_default(),
                        80
                    ))
                ));
            }
            Ok(record)
        }
        Err(e @ lmbus_schemas::DecodeError::UnsupportedVersion { .. }) => {
            Err(ReadError::NewerVersion {
                sequence,
                detail: e.to_string(),
            })
        }
        Err(e) => Ok(Record {
            sequence,
            entry: LedgerEntry {
                writer: String::new(),
                changes: Vec::new(),
            },
            quarantined: Some(lmbus_schemas::truncated(&e.to_string(), 200).into_owned()),
            id,
        }),
    }
}

/// What [`audit`] found in a ledger that keeps every invariant.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Audit {
    pub records: u64,
    /// Stored messages that were not ledger records (see [`Record::quarantined`]).
    pub quarantined: u64,
    pub grants: u64,
    pub releases: u64,
    /// Most seats in use at any ledger position.
    pub max_in_use: u32,
    /// `(replica, term)` of every `Leader` record, in ledger order.
    pub leaders: Vec<(String, u64)>,
    /// Seats held at the end: slave → agent → agent type.
    pub seats: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
    /// Free seats allotted at the end (allotment mode): slave → agent type → seats.
    pub allotted: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u32>>,
    /// Most seats in use plus allotted at any ledger position.
    pub max_counted: u32,
}

/// Replays a ledger from its first record (or from a snapshot, given as a record whose
/// changes rebuild the state) and checks, at every position: granted seats plus the free
/// seats allotted to slaves never exceed the total or a type limit; a seat taken from a
/// block comes from a block that holds one; no agent holds two seats; terms only grow; and once a replica
/// has written its `Leader` record, no other replica writes until the next `Leader` record
/// (a deposed leader's writes were all refused).
pub fn audit<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    total_limit: u32,
    type_limits: &std::collections::BTreeMap<String, u32>,
) -> Result<Audit, AuditError> {
    use lmbus_schemas::SeatChange;
    let mut tally = Tally {
        audit: Audit::default(),
        in_use: 0,
        in_use_by_type: Default::default(),
        allotted_total: 0,
        allotted_by_type: Default::default(),
        total_limit,
        type_limits: std::borrow::Cow::Borrowed(type_limits),
    };
    let mut leader: Option<(String, u64)> = None;
    for record in records {
        tally.audit.records += 1;
        if record.quarantined.is_some() {
            // Not a record any replica wrote, and skipped by all of them alike.
            tally.audit.quarantined += 1;
            continue;
        }
        let at = record.sequence;
        let writer = &record.entry.writer;
        let starts_term = matches!(
            record.entry.changes.first(),
            Some(SeatChange::Leader { .. })
        );
        if !starts_term {
            match &leader {
                Some((current, _)) if current != writer => {
                    return Err(AuditError::Unfenced {
                        at,
                        writer: writer.clone(),
                        leader: current.clone(),
                    });
                }
                _ => {}
            }
        }
        for change in &record.entry.changes {
            match change {
                SeatChange::License { text } => {
                    let license = lmbus_schemas::read_license_unverified(text)
                        .ok_or(AuditError::UnreadableLicense { at })?;
                    tally.total_limit = license.limits.total.unwrap_or(0);
                    tally.type_limits = std::borrow::Cow::Owned(license.limits.agent_types);
                }
                SeatChange::Leader { replica, term, .. } => {
                    if let Some((_, last)) = &leader {
                        if term <= last {
                            return Err(AuditError::TermOrder {
                                at,
                                term: *term,
                                replica: replica.clone(),
                                last: *last,
                            });
                        }
                    }
                    leader = Some((replica.clone(), *term));
                    tally.audit.leaders.push((replica.clone(), *term));
                }
                SeatChange::Session { .. } => {}
                SeatChange::Grant {
                    slave,
                    agent_id,
                    agent_type,
                    ..
                } => tally.grant(at, slave, agent_id, agent_type)?,
                SeatChange::Seats {
                    slave,
                    agent_type,
                    agent_ids,
                    ..
                } => {
                    for agent_id in agent_ids {
                        tally.grant(at, slave, agent_id, agent_type)?;
                    }
                }
                SeatChange::Release { slave, agent_id } => tally.release(slave, agent_id),
                SeatChange::Confirm {
                    slave, agent_id, ..
                } => {
                    let held = tally
                        .audit
                        .seats
                        .get(slave)
                        .is_some_and(|s| s.contains_key(agent_id));
                    if !held {
                        return Err(AuditError::ConfirmedUnheld {
                            at,
                            slave: slave.clone(),
                            agent: agent_id.clone(),
                        });
                    }
                }
                SeatChange::Allotment { slave, blocks, .. } => {
                    tally.set_blocks(slave, blocks.clone());
                    for agent_type in blocks.keys() {
                        tally.check(at, agent_type)?;
                    }
                }
                SeatChange::FromBlock {
                    slave,
                    agent_id,
                    agent_type,
                    ..
                } => {
                    let mut blocks = tally.audit.allotted.get(slave).cloned().unwrap_or_default();
                    match blocks.get_mut(agent_type) {
                        Some(n) if *n > 0 => *n -= 1,
                        _ => {
                            return Err(AuditError::EmptyBlock {
                                at,
                                slave: slave.clone(),
                                agent: agent_id.clone(),
                                agent_type: agent_type.clone(),
                            });
                        }
                    }
                    blocks.retain(|_, n| *n > 0);
                    tally.set_blocks(slave, blocks);
                    tally.grant(at, slave, agent_id, agent_type)?;
                }
                SeatChange::ToBlock { slave, agent_id } => {
                    let held = tally
                        .audit
                        .seats
                        .get(slave)
                        .and_then(|s| s.get(agent_id).cloned());
                    if let Some(agent_type) = held {
                        tally.release(slave, agent_id);
                        let mut blocks =
                            tally.audit.allotted.get(slave).cloned().unwrap_or_default();
                        *blocks.entry(agent_type.clone()).or_insert(0) += 1;
                        tally.set_blocks(slave, blocks);
                        tally.check(at, &agent_type)?;
                    }
                }
                SeatChange::Reclaim { slave } | SeatChange::Forget { slave } => {
                    tally.set_blocks(slave, Default::default());
                    let held: Vec<String> = tally
                        .audit
                        .seats
                        .get(slave)
                        .map(|s| s.keys().cloned().collect())
                        .unwrap_or_default();
                    for agent in held {
                        tally.release(slave, &agent);
                    }
                }
                SeatChange::Revoke { slave, agents } => {
                    for agent in agents {
                        tally.release(slave, agent);
                    }
                }
                SeatChange::Synced { .. }
                | SeatChange::SyncWarned { .. }
                | SeatChange::SyncExported { .. }
                | SeatChange::Installation { .. }
                | SeatChange::Clock { .. } => {}
                SeatChange::Unknown => {
                    return Err(AuditError::Unknown { at });
                }
            }
        }
    }
    let mut a = tally.audit;
    a.seats.retain(|_, s| !s.is_empty());
    Ok(a)
}

/// The invariant a ledger breaks, at the record where [`audit`] found it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error(
        "record {at} was written by {writer} while {leader} led: a deposed leader's write was not fenced"
    )]
    Unfenced {
        at: u64,
        writer: String,
        leader: String,
    },
    #[error("record {at} holds a license that cannot be read")]
    UnreadableLicense { at: u64 },
    #[error("record {at}: term {term} of {replica} does not follow term {last}")]
    TermOrder {
        at: u64,
        term: u64,
        replica: String,
        last: u64,
    },
    #[error("record {at}: a record kind this build does not know")]
    Unknown { at: u64 },
    #[error(
        "record {at}: agent {agent} of slave {slave} granted a second seat (already holds a {held} seat)"
    )]
    SecondSeat {
        at: u64,
        agent: String,
        slave: String,
        held: String,
    },
    #[error(
        "record {at}: slave {slave} took a seat for agent {agent} from its {agent_type} block, which holds none"
    )]
    EmptyBlock {
        at: u64,
        slave: String,
        agent: String,
        agent_type: String,
    },
    #[error(
        "record {at}: a registration of agent {agent} of slave {slave} was approved with a seat it does not hold"
    )]
    ConfirmedUnheld {
        at: u64,
        slave: String,
        agent: String,
    },
    #[error("record {at}: {in_use} seats in use or allotted, over the limit of {limit}")]
    OverLimit { at: u64, in_use: u32, limit: u32 },
    #[error(
        "record {at}: {in_use} {agent_type} seats in use or allotted, over the limit of {limit}"
    )]
    OverTypeLimit {
        at: u64,
        in_use: u32,
        agent_type: String,
        limit: u32,
    },
}

/// The running counts of [`audit`].
struct Tally<'l> {
    audit: Audit,
    in_use: u32,
    in_use_by_type: std::collections::BTreeMap<String, u32>,
    allotted_total: u32,
    allotted_by_type: std::collections::BTreeMap<String, u32>,
    total_limit: u32,
    type_limits: std::borrow::Cow<'l, std::collections::BTreeMap<String, u32>>,
}

impl Tally<'_> {
    fn grant(
        &mut self,
        at: u64,
        slave: &str,
        agent_id: &str,
        agent_type: &str,
    ) -> Result<(), AuditError> {
        let seats = self.audit.seats.entry(slave.to_owned()).or_default();
        if let Some(held) = seats.get(agent_id) {
            return Err(AuditError::SecondSeat {
                at,
                agent: agent_id.to_owned(),
                slave: slave.to_owned(),
                held: held.clone(),
            });
        }
        seats.insert(agent_id.to_owned(), agent_type.to_owned());
        self.in_use += 1;
        let n = self
            .in_use_by_type
            .entry(agent_type.to_owned())
            .or_insert(0);
        *n += 1;
        self.audit.grants += 1;
        self.audit.max_in_use = self.audit.max_in_use.max(self.in_use);
        self.check(at, agent_type)
    }

    /// Seats in use plus allotted, in total and of `agent_type`, within the limits.
    fn check(&mut self, at: u64, agent_type: &str) -> Result<(), AuditError> {
        let counted = self.in_use + self.allotted_total;
        self.audit.max_counted = self.audit.max_counted.max(counted);
        if counted > self.total_limit {
            return Err(AuditError::OverLimit {
                at,
                in_use: counted,
                limit: self.total_limit,
            });
        }
        if let Some(limit) = self.type_limits.get(agent_type) {
            let n = self.in_use_by_type.get(agent_type).copied().unwrap_or(0)
                + self.allotted_by_type.get(agent_type).copied().unwrap_or(0);
            if n > *limit {
                return Err(AuditError::OverTypeLimit {
                    at,
                    in_use: n,
                    agent_type: agent_type.to_owned(),
                    limit: *limit,
                });
            }
        }
        Ok(())
    }

    /// A slave's blocks from here on.
    fn set_blocks(&mut self, slave: &str, blocks: std::collections::BTreeMap<String, u32>) {
        let old = self.audit.allotted.remove(slave).unwrap_or_default();
        for (t, n) in old {
            self.allotted_total -= n;
            if let Some(m) = self.allotted_by_type.get_mut(&t) {
                *m -= n;
            }
        }
        for (t, n) in &blocks {
            self.allotted_total += n;
            *self.allotted_by_type.entry(t.clone()).or_insert(0) += n;
        }
        if !blocks.is_empty() {
            self.audit.allotted.insert(slave.to_owned(), blocks);
        }
    }

    fn release(&mut self, slave: &str, agent_id: &str) {
        if let Some(t) = self
            .audit
            .seats
            .get_mut(slave)
            .and_then(|s| s.remove(agent_id))
        {
            self.in_use -= 1;
            if let Some(n) = self.in_use_by_type.get_mut(&t) {
                *n -= 1;
            }
            self.audit.releases += 1;
        }
    }
}

impl Ledger {
    /// Reads every record from the first to the current end (for audits and tests).
    pub async fn read_all(&self) -> anyhow::Result<Vec<Record>> {
        let last = self.last_sequence().await?;
        let mut out = Vec::new();
        if last == 0 {
            return Ok(out);
        }
        let mut records = self.follow(1).await?;
        while out.last().is_none_or(|r: &Record| r.sequence < last) {
            match tokio::time::timeout(Duration::from_secs(10), records.next()).await {
                Ok(Some(record)) => out.push(record?),
                Ok(None) => anyhow::bail!("the ledger consumer ended"),
                Err(_) => anyhow::bail!(
                    "the ledger stalled before sequence {last}: check that this NATS user may publish on $JS.FC.> (JetStream flow control)"
                ),
            }
        }
        Ok(out)
    }
}

/// Most agents in one `Seats` or `Revoke` change, in a ledger entry or a snapshot chunk:
/// with 256-byte agent ids, still well under [`ENTRY_BYTES`] and the snapshot's chunk size.
pub const AGENTS_PER_CHANGE: usize = 512;

/// Most bytes (by [`SeatChange::size_bound`]) of changes in one ledger entry: well under the
/// message size limit every reader enforces, so no record is ever too big to read.
pub const ENTRY_BYTES: usize = 192 * 1024;

/// Cuts the changes of one commit into entries that each fit [`ENTRY_BYTES`], in order; an
/// operator's `Revoke` of many agents is cut into several (the same effect applied in
/// parts). A group commit of many batches, or a hello that reconciles thousands of agents,
/// needs more than one entry.
pub fn split_entries(changes: Vec<SeatChange>) -> Vec<Vec<SeatChange>> {
    let mut entries = Vec::new();
    let mut part: Vec<SeatChange> = Vec::new();
    let mut part_bytes = 0;
    let pieces = changes.into_iter().flat_map(|change| match change {
        SeatChange::Revoke { slave, agents } if agents.len() > AGENTS_PER_CHANGE => agents
            .chunks(AGENTS_PER_CHANGE)
            .map(|a| SeatChange::Revoke {
                slave: slave.clone(),
                agents: a.to_vec(),
            })
            .collect::<Vec<_>>(),
        other => vec![other],
    });
    for change in pieces {
        let size = change.size_bound();
        if !part.is_empty() && part_bytes + size > ENTRY_BYTES {
            entries.push(std::mem::take(&mut part));
            part_bytes = 0;
        }
        part_bytes += size;
        part.push(change);
    }
    if !part.is_empty() {
        entries.push(part);
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmbus_schemas::SeatChange;
    use std::collections::BTreeMap;

    fn rec(sequence: u64, writer: &str, changes: Vec<SeatChange>) -> Record {
        Record {
            quarantined: None,
            sequence,
            entry: LedgerEntry {
                writer: writer.into(),
                changes,
            },
            id: None,
        }
    }

    fn grant(agent: &str) -> SeatChange {
        SeatChange::Grant {
            slave: "s".into(),
            agent_id: agent.into(),
            agent_type: "inbound".into(),
            request_seq: 0,
            at_ms: 0,
            by: String::new(),
        }
    }

    fn leader(replica: &str, term: u64) -> SeatChange {
        SeatChange::Leader {
            replica: replica.into(),
            term,
            context: None,
        }
    }

    #[test]
    fn a_copy_stored_away_from_its_fence_is_quarantined_and_skipped() {
        let entry = LedgerEntry {
            writer: "b1".into(),
            changes: vec![grant("a0")],
        };
        let payload = encode(&entry).unwrap();
        let first = record_of(20, &payload, Some("0f3a9c.20".into())).unwrap();
        assert_eq!(first.quarantined, None);
        let copy = record_of(22, &payload, Some("0f3a9c.20".into())).unwrap();
        let why = copy.quarantined.clone().unwrap();
        assert!(why.contains("fenced it at 20"), "{why}");
        assert_eq!(copy.entry.changes.len(), 1, "kept for the post-mortem");
        // Older records (before the pipeline) have no id: read as before.
        let old = record_of(21, &payload, None).unwrap();
        assert_eq!(old.quarantined, None);
        let term = rec(19, "b1", vec![leader("b1", 1)]);
        let a = audit([&term, &first, &copy], 10, &BTreeMap::new()).unwrap();
        assert_eq!((a.grants, a.quarantined), (1, 1));
    }

    #[test]
    fn a_record_stored_away_from_its_fence_is_misplaced() {
        let mut r = rec(22, "b1", vec![]);
        assert_eq!(r.misplaced(), None, "no id: nothing to compare");
        r.id = Some("0f3a9c.22".into());
        assert_eq!(r.misplaced(), None);
        r.id = Some("0f3a9c.20".into());
        assert_eq!(r.misplaced(), Some(20));
        r.id = Some("not-an-lmbus-id".into());
        assert_eq!(r.misplaced(), None);
    }

    #[test]
    fn audit_catches_each_broken_invariant() {
        let types = BTreeMap::from([("inbound".to_owned(), 2)]);
        let good = vec![
            rec(1, "b1", vec![leader("b1", 1)]),
            rec(2, "b1", vec![grant("a1"), grant("a2")]),
            rec(3, "b2", vec![leader("b2", 5)]),
            rec(
                4,
                "b2",
                vec![
                    SeatChange::Release {
                        slave: "s".into(),
                        agent_id: "a1".into(),
                    },
                    grant("a3"),
                ],
            ),
        ];
        let a = audit(&good, 3, &types).unwrap();
        assert_eq!((a.grants, a.releases, a.max_in_use), (3, 1, 2));
        assert_eq!(a.leaders.len(), 2);
        assert_eq!(a.seats["s"].len(), 2);

        let over_type = vec![rec(1, "b1", vec![grant("a1"), grant("a2"), grant("a3")])];
        assert!(
            audit(&over_type, 5, &types)
                .unwrap_err()
                .to_string()
                .contains("inbound")
        );
        let over_total = vec![rec(1, "b1", vec![grant("a1"), grant("a2")])];
        assert!(
            audit(&over_total, 1, &types)
                .unwrap_err()
                .to_string()
                .contains("over the limit")
        );
        let twice = vec![
            rec(1, "b1", vec![grant("a1")]),
            rec(2, "b1", vec![grant("a1")]),
        ];
        assert!(
            audit(&twice, 5, &types)
                .unwrap_err()
                .to_string()
                .contains("second seat")
        );
        let unfenced = vec![
            rec(1, "b1", vec![leader("b1", 1)]),
            rec(2, "b2", vec![leader("b2", 2)]),
            rec(3, "b1", vec![grant("a1")]),
        ];
        assert!(
            audit(&unfenced, 5, &types)
                .unwrap_err()
                .to_string()
                .contains("deposed")
        );
        let backwards = vec![
            rec(1, "b1", vec![leader("b1", 4)]),
            rec(2, "b2", vec![leader("b2", 2)]),
        ];
        assert!(
            audit(&backwards, 5, &types)
                .unwrap_err()
                .to_string()
                .contains("term")
        );
    }

    /// Regression: a group commit of 256 batches of 128 grants made one 400 KB entry that
    /// no standby could read. Split, every entry encodes under the limit and the changes
    /// keep their order; a huge revoke is cut into parts.
    #[test]
    fn split_entries_keeps_every_record_readable() {
        let long = "x".repeat(200);
        let mut changes: Vec<SeatChange> = (0..32_768)
            .map(|n| SeatChange::Grant {
                slave: format!("slave-{}", n % 100),
                agent_id: format!("{long}-{n}"),
                agent_type: "inbound".into(),
                request_seq: n,
                at_ms: 0,
                by: String::new(),
            })
            .collect();
        changes.push(SeatChange::Revoke {
            slave: "slave-1".into(),
            agents: (0..20_000).map(|n| format!("{long}-{n}")).collect(),
        });
        let total = changes.len();
        let entries = split_entries(changes.clone());
        assert!(entries.len() > 10);
        for part in &entries {
            let bytes = encode(&LedgerEntry {
                writer: "b1".into(),
                changes: part.clone(),
            })
            .unwrap();
            assert!(bytes.len() <= MAX_MESSAGE_BYTES, "{} bytes", bytes.len());
        }
        let flat: Vec<SeatChange> = entries.into_iter().flatten().collect();
        assert_eq!(&flat[..total - 1], &changes[..total - 1]);
        let revoked: Vec<String> = flat[total - 1..]
            .iter()
            .flat_map(|c| match c {
                SeatChange::Revoke { agents, .. } => agents.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(revoked.len(), 20_000);
        assert_eq!(split_entries(vec![]).len(), 0);
    }
}
