//! Every NATS subject lmbus uses, built and parsed here and nowhere else.
//!
//! All subjects live under `lmbus.v1.<cluster>.`; the cluster name lets several licensed
//! deployments share one NATS cluster. A slave's id is a subject token of its own, so NATS
//! permissions can bind a slave's credentials to its subjects (see `schemas/README.md`).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::alert::{AlertKind, Severity};

/// The first two tokens of every lmbus subject. The `v1` moves only with an incompatible
/// change of the subject layout, independently of the envelope version.
pub const ROOT: &str = "lmbus.v1";

/// Longest cluster name or slave id accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 64;

/// A subject was asked for with a name that cannot be a subject token, or a received
/// subject does not have the shape lmbus publishes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error(
        "invalid {what} {value:?}: use 1 to {MAX_TOKEN_LEN} characters from A-Z, a-z, 0-9, '-' and '_'"
    )]
    InvalidToken { what: &'static str, value: String },
    #[error("subject {0:?} is not an lmbus slave request subject for this cluster")]
    NotASlaveSubject(String),
    #[error("subject {subject:?} names unknown operation {op:?}")]
    UnknownOp { subject: String, op: String },
}

fn validate_token(what: &'static str, value: &str) -> Result<(), SubjectError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_TOKEN_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SubjectError::InvalidToken {
            what,
            value: value.to_owned(),
        })
    }
}

/// A slave's identity: a valid subject token, unique within a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SlaveId(String);

impl SlaveId {
    pub fn new(id: impl Into<String>) -> Result<Self, SubjectError> {
        let id = id.into();
        validate_token("slave id", &id)?;
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SlaveId {
    type Error = SubjectError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<SlaveId> for String {
    fn from(value: SlaveId) -> Self {
        value.0
    }
}

impl fmt::Display for SlaveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a slave asks the master, one subject each (the last token of the subject).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlaveOp {
    /// Request: `Hello` → `Reply::Welcome` or `Reply::Refused`.
    Hello,
    /// Request: `RegisterRequest` → `Reply::Decision`.
    Register,
    /// Request: `UnregisterRequest` → `Reply::Ack`.
    Unregister,
    /// Request: `Heartbeat` → `Reply::Ack` (or `Reply::Refused` when the master does not
    /// know the slave, which makes the slave say hello again).
    Heartbeat,
    /// Publish, no reply: `SlaveReport`, an event the slave saw locally (a registration it
    /// refused at its local limit, say). The master records it and raises the alert.
    Report,
    /// Request: `BatchRequest` (registrations and unregistrations sent together by a
    /// slave whose host asks concurrently) → `Reply::Batch`, one reply per item in order.
    Batch,
    /// Request: `AllotRequest` (allotment mode: the slave's journal and the blocks it
    /// wants) → `Reply::Allotment`.
    Allot,
    /// Request: `Goodbye` (the slave process stops) → `Reply::Ack`: the master releases
    /// its seats and blocks and forgets it.
    Goodbye,
}

impl SlaveOp {
    pub const ALL: [SlaveOp; 8] = [
        SlaveOp::Hello,
        SlaveOp::Register,
        SlaveOp::Unregister,
        SlaveOp::Heartbeat,
        SlaveOp::Report,
        SlaveOp::Batch,
        SlaveOp::Allot,
        SlaveOp::Goodbye,
    ];

    pub fn token(self) -> &'static str {
        match self {
            SlaveOp::Hello => "hello",
            SlaveOp::Register => "register",
            SlaveOp::Unregister => "unregister",
            SlaveOp::Heartbeat => "heartbeat",
            SlaveOp::Report => "report",
            SlaveOp::Batch => "batch",
            SlaveOp::Allot => "allot",
            SlaveOp::Goodbye => "goodbye",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.token() == token)
    }
}

/// Builds and parses the subjects of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    cluster: String,
    /// `lmbus.v1.<cluster>`, kept to avoid rebuilding it per message.
    prefix: String,
}

impl Subjects {
    pub fn new(cluster: &str) -> Result<Self, SubjectError> {
        validate_token("cluster name", cluster)?;
        Ok(Self {
            cluster: cluster.to_owned(),
            prefix: format!("{ROOT}.{cluster}"),
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// `lmbus.v1.<cluster>.slave.<slave>.<op>`: published by the slave, subscribed by the
    /// master.
    pub fn slave_op(&self, slave: &SlaveId, op: SlaveOp) -> String {
        format!("{}.slave.{}.{}", self.prefix, slave, op.token())
    }

    /// `lmbus.v1.<cluster>.slave.>`: what the master subscribes to. A full wildcard, not
    /// `slave.*.*`: nats-server 2.9 does not carry interest in a subject with a `*` token
    /// across a leaf node link whose user may publish only one slave's subjects, so a site
    /// behind a leaf node would find no master. A subject with more tokens than a slave
    /// operation is refused by [`Self::parse_slave_op`] as an unknown operation.
    pub fn all_slave_ops(&self) -> String {
        format!("{}.slave.>", self.prefix)
    }

    /// `lmbus.v1.<cluster>.slave.<slave>.>`: everything one slave may publish (for NATS
    /// permissions).
    pub fn one_slave_ops(&self, slave: &SlaveId) -> String {
        format!("{}.slave.{}.>", self.prefix, slave)
    }

    /// Splits a subject received on [`Self::all_slave_ops`] into the slave's id and the
    /// operation. The slave's identity comes from here, never from a payload.
    pub fn parse_slave_op(&self, subject: &str) -> Result<(SlaveId, SlaveOp), SubjectError> {
        let not_ours = || SubjectError::NotASlaveSubject(subject.to_owned());
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix(".slave."))
            .ok_or_else(not_ours)?;
        let (slave, op) = rest.split_once('.').ok_or_else(not_ours)?;
        let slave = SlaveId::new(slave).map_err(|_| not_ours())?;
        let op = SlaveOp::from_token(op).ok_or_else(|| SubjectError::UnknownOp {
            subject: subject.to_owned(),
            op: op.to_owned(),
        })?;
        Ok((slave, op))
    }

    /// The slave a subject received on [`Self::all_slave_ops`] came from, even when its
    /// operation is unknown (a newer slave's): NATS permissions bind the `<slave>` token to
    /// the sender. `None` when that token is not a valid slave id.
    pub fn slave_of(&self, subject: &str) -> Option<SlaveId> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".slave.")?;
        SlaveId::new(rest.split('.').next()?).ok()
    }

    /// `lmbus.v1.<cluster>.control.<slave>`: published by the master to tell one slave
    /// something it did not ask (`ControlMessage`), subscribed by that slave.
    pub fn control(&self, slave: &SlaveId) -> String {
        format!("{}.control.{}", self.prefix, slave)
    }

    /// `lmbus.v1.<cluster>.alert.<severity>.<kind>`: published by the master, subscribed by
    /// monitors.
    pub fn alert(&self, severity: Severity, kind: AlertKind) -> String {
        format!(
            "{}.alert.{}.{}",
            self.prefix,
            severity.token(),
            kind.token()
        )
    }

    /// `lmbus.v1.<cluster>.alert.>`: every alert of the cluster.
    pub fn all_alerts(&self) -> String {
        format!("{}.alert.>", self.prefix)
    }

    /// `LMBUS_ALERTS_<cluster>`: the JetStream stream that keeps every alert published on
    /// [`Self::all_alerts`] (created by the brokers), read by `lmbus-monitor tail --since`.
    pub fn alert_stream(&self) -> String {
        format!("LMBUS_ALERTS_{}", self.cluster)
    }

    /// `lmbus.v1.<cluster>.admin.release`: request `ReleaseRequest` → `ReleaseReply`,
    /// answered by the master; sent by operators (`lmbus-broker admin release`).
    pub fn admin_release(&self) -> String {
        format!("{}.admin.release", self.prefix)
    }

    /// `lmbus.v1.<cluster>.admin.sync`: request `SyncNowRequest` → `SyncNowReply`, answered
    /// by the master after it synced with the vendor; sent by `lmbus-broker admin sync now`.
    pub fn admin_sync(&self) -> String {
        format!("{}.admin.sync", self.prefix)
    }

    /// `lmbus.v1.<cluster>.admin.sync_export`: request `SyncExportRequest` →
    /// `SyncExportReply`, answered by the master (`lmbus-broker admin sync export`).
    pub fn admin_sync_export(&self) -> String {
        format!("{}.admin.sync_export", self.prefix)
    }

    /// `lmbus.v1.<cluster>.admin.sync_import`: request `SyncImportRequest` →
    /// `SyncNowReply`, answered by the master (`lmbus-broker admin sync import`).
    pub fn admin_sync_import(&self) -> String {
        format!("{}.admin.sync_import", self.prefix)
    }

    /// `lmbus.vendor.v1.sync`: request `SyncRequest` → `SignedSyncAnswer`, answered by
    /// `lmbus-vendor serve` on the vendor's NATS (reached through a leaf node of the
    /// customer's, or a second connection). The same for every customer and cluster.
    pub fn vendor_sync() -> &'static str {
        "lmbus.vendor.v1.sync"
    }

    /// `lmbus.v1.<cluster>.admin.reload`: request `ReloadRequest` → `ReloadReply`, answered
    /// by the master; sent by operators (`lmbus-broker admin reload-license`).
    pub fn admin_reload(&self) -> String {
        format!("{}.admin.reload", self.prefix)
    }

    /// `lmbus.v1.<cluster>.admin.drain`: request `DrainRequest` → `DrainReply`, answered by
    /// the replica it names (every replica listens); sent by `lmbus-broker admin drain`.
    pub fn admin_drain(&self) -> String {
        format!("{}.admin.drain", self.prefix)
    }

    /// `lmbus.v1.<cluster>.admin.undrain`: request `DrainRequest` → `DrainReply`, answered
    /// by the replica it names, which may lead again; sent by `lmbus-broker admin undrain`.
    pub fn admin_undrain(&self) -> String {
        format!("{}.admin.undrain", self.prefix)
    }

    /// `lmbus.v1.<cluster>.admin.forget`: request `ForgetRequest` → `ForgetReply`, answered
    /// by the master; sent by `lmbus-broker admin forget-slave`.
    pub fn admin_forget(&self) -> String {
        format!("{}.admin.forget", self.prefix)
    }

    /// `lmbus.v1.<cluster>.admin.report`: request `ReportRequest` → `ReportReply`, answered
    /// by the master: it writes (files, subject, email) the usage report of the period so
    /// far; sent by `lmbus-broker admin report`.
    pub fn admin_report(&self) -> String {
        format!("{}.admin.report", self.prefix)
    }

    /// `lmbus.v1.<cluster>.report.usage`: the master publishes each usage report here, a
    /// `UsageReport` in the envelope like every message.
    pub fn usage_report(&self) -> String {
        format!("{}.report.usage", self.prefix)
    }

    /// Every admin subject, for the master's subscription.
    pub fn admin_all(&self) -> String {
        format!("{}.admin.>", self.prefix)
    }

    /// `lmbus.v1.<cluster>.broker.status`: request `StatusRequest` → `StatusReply`, answered
    /// by the master; used by `lmbus-monitor licenses`.
    pub fn status(&self) -> String {
        format!("{}.broker.status", self.prefix)
    }

    /// `lmbus.v1.<cluster>.replica`: `ReplicaBeat`s, published by every broker replica,
    /// subscribed by the leader.
    pub fn replica(&self) -> String {
        format!("{}.replica", self.prefix)
    }

    /// `lmbus.v1.<cluster>.backups`: `BackupBeat`s, published a few times per lease by every
    /// replica of each backup master that backs this (production) cluster, and subscribed
    /// by them: a second backup cluster running the same backup license refuses to serve.
    pub fn backups(&self) -> String {
        format!("{}.backups", self.prefix)
    }

    /// `lmbus.v1.<cluster>.ledger`: the seat ledger's records (`LedgerEntry`), appended by
    /// the leader broker only, read by every replica. Stored in [`Self::ledger_stream`].
    pub fn ledger(&self) -> String {
        format!("{}.ledger", self.prefix)
    }

    /// `LMBUS_LEDGER_<cluster>`: the JetStream stream that holds [`Self::ledger`].
    pub fn ledger_stream(&self) -> String {
        format!("LMBUS_LEDGER_{}", self.cluster)
    }

    /// `lmbus.v1.<cluster>.snapshot.chunk`: the pieces (`SnapshotChunk`) of a snapshot of
    /// the seat state, written by the leader broker, read by a replica that starts or
    /// rebuilds. Stored in [`Self::snapshot_stream`].
    pub fn snapshot_chunk(&self) -> String {
        format!("{}.snapshot.chunk", self.prefix)
    }

    /// `lmbus.v1.<cluster>.snapshot.manifest`: a `SnapshotManifest`, written after all the
    /// chunks it names; the last one is the snapshot to load.
    pub fn snapshot_manifest(&self) -> String {
        format!("{}.snapshot.manifest", self.prefix)
    }

    /// `lmbus.v1.<cluster>.snapshot.>`: the subjects of [`Self::snapshot_stream`].
    pub fn snapshot_subjects(&self) -> String {
        format!("{}.snapshot.>", self.prefix)
    }

    /// `LMBUS_SNAPSHOTS_<cluster>`: the JetStream stream holding the latest snapshot.
    pub fn snapshot_stream(&self) -> String {
        format!("LMBUS_SNAPSHOTS_{}", self.cluster)
    }

    /// `lmbus_election_<cluster>`: the JetStream KV bucket (stream `KV_<bucket>`) holding
    /// the leader lease under the key `leader`; written by brokers only.
    pub fn election_bucket(&self) -> String {
        format!("lmbus_election_{}", self.cluster)
    }

    /// `KV_lmbus_election_<cluster>`: the stream behind [`Self::election_bucket`], named as
    /// JetStream KV names it.
    pub fn election_stream(&self) -> String {
        format!("KV_{}", self.election_bucket())
    }

    /// `$KV.lmbus_election_<cluster>.>`: the subjects of [`Self::election_stream`].
    pub fn election_subjects(&self) -> String {
        format!("$KV.{}.>", self.election_bucket())
    }

    /// The inbox prefix a slave's NATS client uses for its replies,
    /// `_INBOX.lmbus.<cluster>.<slave>`, so that permissions can let each slave read only
    /// its own replies.
    pub fn slave_inbox_prefix(&self, slave: &SlaveId) -> String {
        format!("_INBOX.lmbus.{}.{}", self.cluster, slave)
    }

    /// Whether the broker may answer a request from `slave` on `reply`: only a plain
    /// subject under that slave's own inbox prefix ([`Self::slave_inbox_prefix`]). The
    /// reply subject is chosen by whoever published the request, and the broker publishes
    /// its answer there with its own, wider permissions: answering anywhere else would let a
    /// slave write on the ledger, the JetStream API or the election bucket.
    pub fn is_slave_reply(&self, slave: &SlaveId, reply: &str) -> bool {
        let prefix = self.slave_inbox_prefix(slave);
        reply
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| plain_subject(rest) && reply.len() <= MAX_REPLY_LEN)
    }
}

/// Longest reply subject the broker answers on, in bytes.
pub const MAX_REPLY_LEN: usize = 256;

/// The prefix of every inbox an operator's or monitor's NATS client uses (async-nats's
/// default); status and admin requests are answered only there.
pub const CLIENT_INBOX_PREFIX: &str = "_INBOX.";

/// Whether the broker may answer a status or admin request on `reply`: a plain subject
/// under `_INBOX.`, never an lmbus, JetStream (`$JS.…`) or KV (`$KV.…`) subject.
pub fn is_client_reply(reply: &str) -> bool {
    reply
        .strip_prefix(CLIENT_INBOX_PREFIX)
        .is_some_and(|rest| plain_subject(rest) && reply.len() <= MAX_REPLY_LEN)
}

/// Dot-separated, non-empty tokens of printable ASCII without wildcards.
fn plain_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        let s = Subjects::new("acme-prod").unwrap();
        assert_eq!(s.ledger(), "lmbus.v1.acme-prod.ledger");
        assert_eq!(s.ledger_stream(), "LMBUS_LEDGER_acme-prod");
        assert_eq!(s.election_stream(), "KV_lmbus_election_acme-prod");
        assert_eq!(s.election_subjects(), "$KV.lmbus_election_acme-prod.>");
        assert_eq!(s.replica(), "lmbus.v1.acme-prod.replica");
        assert_eq!(s.backups(), "lmbus.v1.acme-prod.backups");
        let slave = SlaveId::new("site_1").unwrap();
        for op in SlaveOp::ALL {
            let subject = s.slave_op(&slave, op);
            assert_eq!(s.parse_slave_op(&subject).unwrap(), (slave.clone(), op));
        }
        assert_eq!(
            s.slave_op(&slave, SlaveOp::Register),
            "lmbus.v1.acme-prod.slave.site_1.register"
        );
    }

    #[test]
    fn replies_go_only_to_the_requesters_inbox() {
        let s = Subjects::new("acme").unwrap();
        let site1 = SlaveId::new("site1").unwrap();
        assert!(s.is_slave_reply(&site1, "_INBOX.lmbus.acme.site1.abc.7"));
        for bad in [
            "lmbus.v1.acme.ledger",
            "$JS.API.STREAM.PURGE.LMBUS_LEDGER_acme",
            "$KV.lmbus_election_acme.leader",
            "lmbus.v1.acme.alert.critical.bad_message",
            "_INBOX.lmbus.acme.site2.abc",
            "_INBOX.lmbus.acme.site10.abc",
            "_INBOX.lmbus.acme.site1",
            "_INBOX.lmbus.acme.site1.",
            "_INBOX.lmbus.acme.site1.>",
            "_INBOX.lmbus.acme.site1.*.x",
            "_INBOX.lmbus.acme.site1..x",
            "_INBOX.lmbus.acme.site1.a b",
            "_INBOX.abc",
        ] {
            assert!(!s.is_slave_reply(&site1, bad), "{bad}");
        }
        assert!(!s.is_slave_reply(
            &site1,
            &format!("_INBOX.lmbus.acme.site1.{}", "x".repeat(300))
        ));
        assert!(is_client_reply("_INBOX.Nuid123.4"));
        for bad in [
            "lmbus.v1.acme.ledger",
            "$JS.API.STREAM.PURGE.LMBUS_LEDGER_acme",
            "$KV.lmbus_election_acme.leader",
            "_INBOX.",
            "_INBOX.>",
            "_INBOXES.x",
        ] {
            assert!(!is_client_reply(bad), "{bad}");
        }
    }

    #[test]
    fn bad_names_and_subjects_are_refused() {
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(Subjects::new(bad).is_err(), "{bad:?}");
            assert!(SlaveId::new(bad).is_err(), "{bad:?}");
        }
        let s = Subjects::new("c").unwrap();
        assert!(s.parse_slave_op("lmbus.v1.other.slave.a.hello").is_err());
        assert!(s.parse_slave_op("lmbus.v1.c.slave.a").is_err());
        assert!(matches!(
            s.parse_slave_op("lmbus.v1.c.slave.a.dance"),
            Err(SubjectError::UnknownOp { .. })
        ));
        assert_eq!(
            s.slave_of("lmbus.v1.c.slave.a.dance"),
            Some(SlaveId::new("a").unwrap())
        );
        assert_eq!(s.slave_of("lmbus.v1.c.slave.a*b.hello"), None);
        assert_eq!(s.slave_of("lmbus.v1.other.slave.a.hello"), None);
    }
}
