//! Request, reply and control messages between slaves, the master and monitors.
//!
//! Each request type names its subject in its doc (see `subjects.rs`). Every field added
//! after the first release carries `#[serde(default)]` so older peers keep decoding.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An agent the slave holds (or wants to hold) a seat for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AgentClaim {
    pub agent_id: String,
    pub agent_type: String,
}

/// `lmbus.v1.<cluster>.slave.<id>.hello`: the slave introduces itself, with its signed
/// license text (or none for an unlicensed slave) and the agents it already holds, so a
/// reconnecting or restarted slave is reconciled instead of double counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// A fresh id per slave process; a new value tells the master the slave restarted.
    pub instance: Uuid,
    /// The slave's signed license file, verbatim. `None` asks for unlicensed operation.
    #[serde(default)]
    pub license: Option<String>,
    /// How often this slave will heartbeat; the master derives its silence timeout from it.
    pub heartbeat_interval_ms: u64,
    /// Every agent the slave currently considers registered.
    #[serde(default)]
    pub agents: Vec<AgentClaim>,
    /// Free-form software name and version, for status displays.
    #[serde(default)]
    pub software: String,
    /// Increases with every hello of one slave instance; the master ignores a hello older
    /// than the last it saw (a delayed or replayed one must not roll its state back).
    #[serde(default)]
    pub seq: u64,
    /// How long the slave keeps its agents after losing every master.
    #[serde(default)]
    pub grace_ms: u64,
    /// Whether the slave logs out all its agents when the grace period ends. Only then
    /// may the master reclaim a silent slave's seats (see the timing rule in the README).
    #[serde(default)]
    pub logout_after_grace: bool,
    /// How long the slave waits for an answer; part of the timing rule.
    #[serde(default)]
    pub request_timeout_ms: u64,
    /// The last request number (`RegisterRequest::seq`) this instance had used when it built
    /// the hello. The master's reconcile releases an unclaimed seat only if the request that
    /// granted it is numbered at or below this: a registration sent after the hello was
    /// built is not in `agents`, and its seat must not be taken back. `None` (a slave that
    /// does not say) lets the reconcile release every unclaimed seat.
    #[serde(default)]
    pub request_seq: Option<u64>,
    /// Agents whose registration was in flight when the hello was built: the master keeps
    /// their seats if it granted them (the answer is on its way) and grants nothing for them
    /// here.
    #[serde(default)]
    pub pending: Vec<String>,
    /// In allotment mode: the last journal entry (`AllotOp::n`) reflected in `agents`. The
    /// master empties the slave's blocks at a hello and takes its journal as applied up to
    /// here. `None` from a slave that keeps no journal.
    #[serde(default)]
    pub journal: Option<u64>,
    /// The context the slave runs in: its license's, or for an unlicensed slave the one it
    /// declares (`--context`, default production). The master refuses a context other than
    /// its own (`context_mismatch`); a slave that does not say counts as production.
    #[serde(default)]
    pub context: Option<crate::Context>,
}

/// `lmbus.v1.<cluster>.slave.<id>.register`: ask for a seat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub request_id: Uuid,
    /// Per slave instance, from 1, one more for every register or unregister request; a
    /// retry of the same request keeps its number. The master refuses a number it has
    /// already processed (`replayed`), so a captured request cannot be replayed. 0 (what
    /// a message without the field decodes to) is always refused.
    #[serde(default)]
    pub seq: u64,
    pub agent_id: String,
    pub agent_type: String,
}

/// `lmbus.v1.<cluster>.slave.<id>.unregister`: give a seat back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnregisterRequest {
    pub request_id: Uuid,
    /// Shares the numbering of [`RegisterRequest::seq`].
    #[serde(default)]
    pub seq: u64,
    pub agent_id: String,
}

/// Most items in one [`BatchRequest`].
pub const MAX_BATCH_ITEMS: usize = 128;

/// `lmbus.v1.<cluster>.slave.<id>.batch`: several requests in one message. The master
/// decides them in order, as if each had come on its own subject, and answers
/// `Reply::Batch` with one reply per item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRequest {
    pub items: Vec<BatchItem>,
}

/// One request of a batch: only registrations and unregistrations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchItem {
    Register(RegisterRequest),
    Unregister(UnregisterRequest),
}

/// `lmbus.v1.<cluster>.slave.<id>.heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub instance: Uuid,
    pub seq: u64,
    /// How many agents the slave holds, so the master can notice a disagreement.
    #[serde(default)]
    pub agents: u32,
    /// The slave's books for this master, so the master can reconcile continuously: a
    /// digest of the agents this master granted, leaving out those with a request in
    /// flight. `None` from a slave that does not say.
    #[serde(default)]
    pub books: Option<Books>,
    /// What this master is to the slave, and whether it takes the slave's new registrations
    /// now (for the License Monitor). `None` from a slave that does not say.
    #[serde(default)]
    pub master: Option<MasterUse>,
}

/// A slave's books in a heartbeat: [`agent_digest`] over the agents this master granted it,
/// without the agents in `unsettled` (a registration or unregistration in flight), and
/// how many agents that digest covers. The master computes the same over its own seats of
/// the slave, leaving out `unsettled`, and asks for a hello (`ControlMessage::Rehello`)
/// when they differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Books {
    pub count: u32,
    pub digest: u64,
    #[serde(default)]
    pub unsettled: Vec<String>,
    /// The last request number the slave had used when it took these books: a master that
    /// has already processed a later one (sent after the books were taken) does not
    /// compare, since the books cannot show it yet.
    #[serde(default)]
    pub request_seq: Option<u64>,
}

/// An order-independent digest of a set of (agent id, agent type) pairs: the XOR of each
/// pair's 64-bit FNV-1a hash. Both sides compute it the same way, so adding or removing
/// one pair is one XOR.
pub fn agent_digest<'a>(agents: impl IntoIterator<Item = (&'a str, &'a str)>) -> u64 {
    agents
        .into_iter()
        .fold(0, |acc, (id, agent_type)| acc ^ agent_hash(id, agent_type))
}

/// The 64-bit FNV-1a hash of `id`, a zero byte and `agent_type`.
pub fn agent_hash(id: &str, agent_type: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in id.bytes().chain([0]).chain(agent_type.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    // Never 0, so that one agent's digest is never the empty set's.
    h | 1
}

/// What one master is to a slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterUse {
    pub role: MasterRole,
    /// The slave sends its new registrations to this master now.
    pub in_use: bool,
    /// The slave's other master, when it has one: its context and how many of the slave's
    /// seats it holds, so this master's status shows where the slave is served (a
    /// production master sees the seats its slave holds at a backup). `None` from a slave
    /// that does not say, or with one master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other: Option<OtherMaster>,
}

/// What a slave says about its other master in a heartbeat to one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtherMaster {
    /// Its license context as its welcome said (`None`: no welcome yet, or an older master).
    #[serde(default)]
    pub context: Option<crate::Context>,
    /// The slave's seats it holds.
    pub seats: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MasterRole {
    /// The slave names no other master.
    Only,
    Primary,
    Secondary,
    /// The slave's backup master (`--backup-nats`), used only while no production master
    /// answers. Sent only to a backup master; a broker older than this role cannot read it.
    Backup,
    /// A role this build does not know (a newer slave's): shown as such.
    #[serde(other)]
    Other,
}

impl fmt::Display for MasterUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.role, self.in_use) {
            (MasterRole::Only, _) => f.write_str("only master"),
            (MasterRole::Primary, true) => f.write_str("primary, in use"),
            (MasterRole::Primary, false) => f.write_str("primary, idle"),
            (MasterRole::Secondary, true) => f.write_str("secondary, in use"),
            (MasterRole::Secondary, false) => f.write_str("secondary, idle"),
            (MasterRole::Backup, true) => f.write_str("backup master, in use"),
            (MasterRole::Backup, false) => f.write_str("backup master, idle"),
            (MasterRole::Other, true) => f.write_str("another role, in use"),
            (MasterRole::Other, false) => f.write_str("another role, idle"),
        }?;
        // Where else the slave is served: "primary, idle; backup holds 2 seats".
        match self.other {
            Some(OtherMaster { context, seats }) if seats > 0 || !self.in_use => {
                let other = context.map_or("other master", |c| c.token());
                write!(
                    f,
                    "; {other} holds {}",
                    crate::human::plural(u64::from(seats), "seat", "seats")
                )
            }
            _ => Ok(()),
        }
    }
}

/// `lmbus.v1.<cluster>.slave.<id>.goodbye`: the slave process is stopping (a clean stop, or a
/// failure after its hello): the master releases every seat and allotted block of this
/// slave id and forgets it, if `instance` is the live session's. Answered `Reply::Ack`, or
/// `Reply::Refused` (`slave_not_connected`) when that instance is not the one the master
/// knows (a duplicate, or a delayed goodbye of an earlier process): nothing changes then.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    pub instance: Uuid,
    /// Why it stops, for the alert ("stopped", or the startup error).
    #[serde(default)]
    pub reason: String,
}

/// `lmbus.v1.<cluster>.slave.<id>.report`: something the slave decided on its own that
/// the master must record and alert on (published, no reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlaveReport {
    pub event: SlaveEvent,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlaveEvent {
    /// The slave refused a registration itself (its local limit) without asking.
    LocalRejection {
        agent_id: String,
        agent_type: String,
        reason: RejectReason,
    },
    /// The slave lost every master for longer than its grace period and restricted
    /// usage; reported once it reaches a master again.
    Restricted {
        /// How long it had no master, in milliseconds.
        lost_for_ms: u64,
        /// How many agents it logged out when the grace period ended.
        logged_out: u32,
    },
    /// Something this build does not know; recorded as is.
    #[serde(other)]
    Other,
}

/// Why a request was refused. Shown to operators and host applications as the
/// snake_case token (`aggregate_limit`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The total across all slaves would exceed the master license's total limit.
    AggregateLimit,
    /// The agent type's limit in the master license is reached.
    TypeLimit,
    /// The slave's own license limit is reached (refused by the slave, or by the master
    /// checking the same license).
    LocalLimit,
    /// The slave has no license and the master does not allow unlicensed slaves.
    UnlicensedNotAllowed,
    /// The master license does not name this agent type.
    UnknownAgentType,
    /// The master has no live session with this slave: it must say hello first.
    SlaveNotConnected,
    /// The agent already holds a seat of another type on this slave.
    AgentTypeMismatch,
    /// The slave's license failed verification or has expired.
    LicenseInvalid,
    /// The slave's license has the wrong role (a master license, say).
    LicenseRole,
    /// Another connected slave presented the same slave license.
    LicenseInUse,
    /// The slave's license context (production, backup, development) differs from the
    /// master's.
    ContextMismatch,
    /// No master answered (set by the slave, never sent by a master).
    MasterUnavailable,
    /// The master's table of slaves is full (`--max-slaves`).
    TooManySlaves,
    /// The slave lost every master for longer than its grace period and is restricted
    /// (set by the slave).
    Restricted,
    /// The master reclaimed the slave's seats while it was silent, or an operator released
    /// them, and there is no room to grant this one again.
    Reclaimed,
    /// An operator released this agent's seat; it must register anew.
    ReleasedByAdmin,
    /// The slave's timings break the timing rule (see the README): the master could
    /// reclaim seats the slave still uses.
    TimingRule,
    /// The request is older than one the master already processed.
    StaleRequest,
    /// The broker replicas are electing a leader (sent by a standby while no replica holds
    /// the lease): nothing was decided, retry.
    NoLeader,
    /// The slave sent more registrations per second than the master allows one slave
    /// (`--slave-rate-limit`), so that one slave cannot starve the others.
    RateLimited,
    /// The request's `seq` was already processed for this slave instance (or is too old
    /// to tell): a replayed request. A slave that did not replay it retries with a new
    /// number.
    Replayed,
    /// The slave holds as many seats as the master allows one slave
    /// (`--max-agents-per-slave`), so that one site cannot take the whole license.
    SlaveLimit,
    /// Allotment mode: the slave admitted the agent from a block of seats the master did
    /// not count for it (emptied by a hello or a reclaim, or never allotted).
    NoAllotment,
    /// Another process of this slave id (another instance) is alive: it heartbeats within
    /// the master's silence limit. A second daemon started with an id in use is refused;
    /// a restart is accepted once the old process is silent past that limit or said
    /// goodbye.
    SlaveIdInUse,
    /// The master license has an offline limit (`sync_within_days`) and the installation
    /// has not synced with the vendor within it: no new seat until a sync succeeds (agents
    /// already registered keep theirs).
    SyncOverdue,
    /// A backup master serves only while production cannot: it hears the production
    /// cluster's leader (its replica beats), so the slave belongs there.
    ProductionAvailable,
    /// A reason this build does not know.
    #[serde(other)]
    Other,
}

impl RejectReason {
    pub fn token(self) -> &'static str {
        match self {
            RejectReason::AggregateLimit => "aggregate_limit",
            RejectReason::TypeLimit => "type_limit",
            RejectReason::LocalLimit => "local_limit",
            RejectReason::UnlicensedNotAllowed => "unlicensed_not_allowed",
            RejectReason::UnknownAgentType => "unknown_agent_type",
            RejectReason::SlaveNotConnected => "slave_not_connected",
            RejectReason::AgentTypeMismatch => "agent_type_mismatch",
            RejectReason::LicenseInvalid => "license_invalid",
            RejectReason::LicenseRole => "license_role",
            RejectReason::LicenseInUse => "license_in_use",
            RejectReason::ContextMismatch => "context_mismatch",
            RejectReason::MasterUnavailable => "master_unavailable",
            RejectReason::TooManySlaves => "too_many_slaves",
            RejectReason::Restricted => "restricted",
            RejectReason::Reclaimed => "reclaimed",
            RejectReason::ReleasedByAdmin => "released_by_admin",
            RejectReason::TimingRule => "timing_rule",
            RejectReason::StaleRequest => "stale_request",
            RejectReason::NoLeader => "no_leader",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::Replayed => "replayed",
            RejectReason::SlaveLimit => "slave_limit",
            RejectReason::NoAllotment => "no_allotment",
            RejectReason::SlaveIdInUse => "slave_id_in_use",
            RejectReason::SyncOverdue => "sync_overdue",
            RejectReason::ProductionAvailable => "production_available",
            RejectReason::Other => "other",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.token())
    }
}

/// The master's answer to any slave request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Hello accepted.
    Welcome(Welcome),
    /// Hello refused, or a heartbeat from a slave the master has no session with.
    Refused {
        reason: RejectReason,
        detail: String,
        /// With `replayed` for a hello: the last hello number the master accepted from
        /// this instance, so the slave can say hello again above it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_hello: Option<u64>,
        /// With `slave_id_in_use` for a hello: how long until the live instance holding the
        /// id counts as gone if it stays silent (a restart after a crash may say hello then).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Registration decided.
    Decision(Decision),
    /// Unregistration or heartbeat accepted.
    Ack,
    /// The request itself was bad; nothing was decided.
    Error(WireError),
    /// The answers to a `BatchRequest`'s items, in order.
    Batch(Vec<Reply>),
    /// The answer to an `AllotRequest`.
    Allotment(crate::allot::Allotment),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The answering broker replica.
    pub broker_id: String,
    /// The master license's id.
    pub master_license: Uuid,
    /// After this many missed heartbeats the master marks the slave disconnected.
    pub missed_heartbeats: u32,
    /// Agents from the hello that the master did not (re)grant; the slave must log them
    /// out.
    #[serde(default)]
    pub rejected_agents: Vec<RejectedAgent>,
    /// How this master decides registrations (`strict` from a master that does not say).
    #[serde(default)]
    pub admission: crate::allot::Admission,
    /// In allotment mode: how often the slave sends its journal and asks for blocks.
    #[serde(default)]
    pub allot_refresh_ms: u64,
    /// The context of the master's license (absent from an older broker): a slave whose
    /// secondary is a backup master moves its agents back to the primary when it returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<crate::Context>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedAgent {
    pub agent_id: String,
    pub reason: RejectReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Approved {
        /// True when the agent already held this seat (an idempotent re-registration).
        already_held: bool,
    },
    Rejected {
        reason: RejectReason,
        detail: String,
        /// Allotment mode, a capacity refusal (`aggregate_limit`, `type_limit`) while
        /// seats sit free in slaves' blocks whose holders were just told to give them
        /// back: ask again after this long (a new request number). Sent only to slaves that
        /// take allotments; an older slave would ignore it and take the refusal as final.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// A request that could not be processed at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is not a decodable lmbus message of the expected type.
    Malformed,
    /// The envelope version is not spoken by this broker.
    UnsupportedVersion,
    /// The payload is larger than the protocol allows.
    TooLarge,
    /// A field is out of range (an empty agent id, say).
    Invalid,
    #[serde(other)]
    Other,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Other => "other",
        })
    }
}

impl From<&crate::codec::DecodeError> for WireError {
    fn from(e: &crate::codec::DecodeError) -> Self {
        use crate::codec::DecodeError as D;
        let code = match e {
            D::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            D::TooLarge { .. } => ErrorCode::TooLarge,
            D::Empty | D::NotAnEnvelope(_) | D::Malformed(_) => ErrorCode::Malformed,
        };
        WireError {
            code,
            message: e.to_string(),
        }
    }
}

/// `lmbus.v1.<cluster>.control.<slave>`: the master tells a slave something unasked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlMessage {
    /// Log these agents out: their seats are gone.
    LogOut { agents: Vec<RejectedAgent> },
    /// Say hello again (the master lost the session, e.g. after a restart).
    Rehello,
    /// A new broker replica leads, or the leader records again after its ledger stalled
    /// (JetStream electing the ledger stream's leader): a request still waiting for an
    /// answer (from a leader that froze, say), or waiting to retry after `no_leader`, is
    /// sent again at once instead of after its timeout or back-off. Requests are
    /// idempotent, so the resend is safe. A unit variant, so older slaves read it as
    /// `Other` and ignore it.
    NewLeader,
    /// In allotment mode: the free pool is nearly empty; send the journal now and give
    /// the free blocks back (ask strictly until an answer says the pool is no longer
    /// exhausted). A unit variant, so older slaves ignore it.
    ReturnAllotment,
    /// In allotment mode: other slaves want more than is free; keep no more than these
    /// free seats per agent type (a fair share) and send the journal now. Only slaves
    /// that asked for allotments are told it.
    ShrinkAllotment {
        blocks: std::collections::BTreeMap<String, u32>,
    },
    #[serde(other)]
    Other,
}

/// `lmbus.v1.<cluster>.admin.release`: an operator force-releases one agent's seat, or
/// every seat of a slave (like FLEXlm's lmremove). The slave is told to log them out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub slave_id: String,
    /// `None` releases every seat of the slave.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// Who asked, for the alert and the audit trail.
    #[serde(default)]
    pub operator: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReply {
    Released { agents: Vec<String> },
    Error { message: String },
}

/// `lmbus.v1.<cluster>.admin.reload`: swap the master license of a running master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRequest {
    /// The new signed master license file, verbatim.
    pub license: String,
    /// Who asked, for the alert and the audit trail.
    #[serde(default)]
    pub operator: String,
    /// The file's path as the operator gave it, to name it in errors; empty from an older
    /// client.
    #[serde(default)]
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ReloadReply {
    /// In force from now on; `message` says what it changes (seats above a lower limit).
    Reloaded {
        message: String,
    },
    Error {
        message: String,
    },
}

/// `lmbus.v1.<cluster>.admin.report`: write the usage report of the period so far now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRequest {
    /// Who asked, for the log.
    #[serde(default)]
    pub operator: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ReportReply {
    /// The report, where it was written and whom it was mailed to; `problems` lists the
    /// outputs that failed (each also raised an alert).
    Written {
        report: Box<crate::UsageReport>,
        files: Vec<String>,
        emailed_to: Vec<String>,
        problems: Vec<String>,
    },
    Error {
        message: String,
    },
}

/// `lmbus.v1.<cluster>.admin.drain`: take one broker replica out of the election for
/// maintenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRequest {
    pub replica: String,
    #[serde(default)]
    pub operator: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReply {
    pub message: String,
}

/// `lmbus.v1.<cluster>.admin.forget`: remove a slave that is not connected from the
/// master's table (its seats and blocks, if any, are released), answered by the master;
/// sent by `lmbus-broker admin forget-slave`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetRequest {
    pub slave_id: String,
    /// Who asked, for the alert and the audit trail.
    #[serde(default)]
    pub operator: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForgetReply {
    Forgotten { message: String },
    Error { message: String },
}

/// `lmbus.v1.<cluster>.broker.status`: request for the License Monitor view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// Also list the agents holding a seat on this slave (the monitor's agent list), in
    /// [`StatusReply::agents`]. A master of an older build ignores it and lists none.
    #[serde(default)]
    pub agents_of: Option<String>,
    /// List `agents_of`'s seats with when and by whom each was granted, in
    /// [`StatusReply::seats`], instead of [`StatusReply::agents`] (`admin seats`, the web
    /// dashboard). A master of an older build ignores it and fills `agents`.
    #[serde(default)]
    pub seat_details: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub broker_id: String,
    pub cluster: String,
    pub license: LicenseSummary,
    pub allow_unlicensed_slaves: bool,
    pub total_limit: u32,
    pub type_limits: BTreeMap<String, u32>,
    pub total_in_use: u32,
    pub in_use_by_type: BTreeMap<String, u32>,
    pub slaves: Vec<SlaveStatus>,
    /// The answering replica is the leader in this term (the lease's revision).
    #[serde(default)]
    pub leader_term: u64,
    /// The last ledger sequence the leader wrote or applied.
    #[serde(default)]
    pub ledger_sequence: u64,
    /// Every broker replica the leader hears from, itself included.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    /// How many slaves the master knows, and how many have a live session. `slaves`
    /// lists at most [`STATUS_MAX_SLAVES`] of them (disconnected ones first) so that the
    /// reply stays within the message size limit.
    #[serde(default)]
    pub slaves_total: u32,
    #[serde(default)]
    pub slaves_connected: u32,
    /// How the master decides registrations.
    #[serde(default)]
    pub admission: crate::allot::Admission,
    /// Free seats allotted to slaves (counted as in use against the limits), per agent
    /// type and in total. `total_in_use` and `in_use_by_type` do not include them.
    #[serde(default)]
    pub allotted_by_type: BTreeMap<String, u32>,
    #[serde(default)]
    pub allotted_total: u32,
    /// The agents holding a seat on [`StatusRequest::agents_of`]'s slave, by agent id, at
    /// most [`STATUS_MAX_AGENTS`] (that slave's `in_use` counts them all); empty when not
    /// asked or the slave is unknown.
    #[serde(default)]
    pub agents: Vec<AgentClaim>,
    /// The seats of [`StatusRequest::agents_of`]'s slave with their details, when
    /// [`StatusRequest::seat_details`] asked for them, bounded like `agents`.
    #[serde(default)]
    pub seats: Vec<HeldSeat>,
}

/// One seat a slave holds, as the master's books have it (`admin seats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSeat {
    pub agent_id: String,
    pub agent_type: String,
    /// When it was granted, by the granting leader's wall clock (Unix milliseconds); 0:
    /// unknown (a seat recorded by an older leader).
    #[serde(default)]
    pub since_ms: u64,
    /// The broker replica that granted it (the leader then); empty: unknown.
    #[serde(default)]
    pub granted_by: String,
}

/// The seat list of a [`StatusReply`], in the given order, bounded like
/// [`bounded_agent_list`]: at most [`STATUS_MAX_AGENTS`] entries and
/// [`STATUS_MAX_AGENT_BYTES`] bytes.
pub fn bounded_seat_list(seats: impl IntoIterator<Item = HeldSeat>) -> Vec<HeldSeat> {
    let mut bytes = 0;
    seats
        .into_iter()
        .take(STATUS_MAX_AGENTS)
        .take_while(|seat| {
            bytes += seat.agent_id.len() + seat.agent_type.len() + seat.granted_by.len() + 64;
            bytes <= STATUS_MAX_AGENT_BYTES
        })
        .collect()
}

/// Most slaves listed in a [`StatusReply`] (about 100 bytes each).
pub const STATUS_MAX_SLAVES: usize = 1000;

/// Most agents listed in a [`StatusReply`].
pub const STATUS_MAX_AGENTS: usize = 5000;

/// Most bytes the agent list of a [`StatusReply`] takes (its ids and types, and at most 32
/// bytes of encoding each): with the slave rows the reply stays under [`MAX_MESSAGE_BYTES`]
/// whatever length a slave gives its agents' ids (up to 256 bytes each).
///
/// [`MAX_MESSAGE_BYTES`]: crate::MAX_MESSAGE_BYTES
pub const STATUS_MAX_AGENT_BYTES: usize = 64 * 1024;

/// The agent list of a [`StatusReply`] from one slave's `(agent id, type)` pairs, in their
/// order: at most [`STATUS_MAX_AGENTS`] entries and [`STATUS_MAX_AGENT_BYTES`] bytes (the
/// slave's `in_use` still counts them all).
pub fn bounded_agent_list<'a>(
    agents: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<AgentClaim> {
    let mut bytes = 0;
    agents
        .into_iter()
        .take(STATUS_MAX_AGENTS)
        .take_while(|(id, agent_type)| {
            bytes += id.len() + agent_type.len() + 32;
            bytes <= STATUS_MAX_AGENT_BYTES
        })
        .map(|(agent_id, agent_type)| AgentClaim {
            agent_id: agent_id.clone(),
            agent_type: agent_type.clone(),
        })
        .collect()
}

/// `lmbus.v1.<cluster>.replica`: every broker replica publishes one a few times per lease,
/// so the leader knows its standbys (and raises `replica_joined` / `replica_lost`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaBeat {
    pub replica: String,
    pub priority: u32,
    pub leader: bool,
    /// The last ledger sequence this replica applied.
    #[serde(default)]
    pub applied: u64,
    /// Drained (`admin drain`): up, following the ledger, but it will not lead.
    #[serde(default)]
    pub drained: bool,
    /// The context of the license this replica runs (absent from an older broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<crate::Context>,
    /// The id of the master license this replica runs (absent from an older broker): a
    /// backup master checks it against the production license it backs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<Uuid>,
}

/// `lmbus.v1.<production cluster>.backups`: a backup master's replicas say, on the
/// namespace of the production cluster they back, which backup license they run and for how
/// long their watch has run (a duration on the sender's own monotonic clock, never a time
/// of day): of two backup clusters with one backup license, the one up longer serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupBeat {
    /// The backup master's own cluster name.
    pub cluster: String,
    pub replica: String,
    /// The backup master license it runs.
    pub license: Uuid,
    /// How long this replica's watch on production has run, in milliseconds.
    pub up_ms: u64,
    /// The seats the backup master holds, from its leader (`None` from a standby or an
    /// older broker): production counts the time both hold seats (its overlap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seats: Option<u32>,
    /// The production license the backup license backs (`None` from an older broker):
    /// production counts only its own backups' seats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backs: Option<Uuid>,
}

/// One broker replica in the leader's view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub replica: String,
    pub priority: u32,
    pub leader: bool,
    #[serde(default)]
    pub applied: u64,
    /// Drained: it will not lead until `admin undrain` or a restart.
    #[serde(default)]
    pub drained: bool,
    pub last_seen_ms_ago: u64,
}

impl ReplicaStatus {
    /// How the replica is shown everywhere: `leader`, `drained` (up, will not lead) or
    /// `standby` (can take over).
    pub fn role(&self) -> &'static str {
        if self.leader {
            "leader"
        } else if self.drained {
            "drained"
        } else {
            "standby"
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LicenseSummary {
    pub id: Uuid,
    pub customer: String,
    pub context: String,
    pub expires: String,
    /// The last day of software maintenance (YYYY-MM-DD); empty from an older master.
    #[serde(default)]
    pub maintenance_expires: String,
    /// A development master: nothing it serves is for production use.
    #[serde(default)]
    pub not_for_production: bool,
    /// The offline limit, when the license has one: see [`SyncStatus`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
}

/// Where the master license's offline limit stands (`sync_within_days`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// The license's `sync_within_days`.
    pub within_days: u32,
    /// The last successful vendor sync in the ledger (Unix milliseconds); 0: none yet, the
    /// limit counts from the day the license was issued.
    #[serde(default)]
    pub last_sync_ms: u64,
    /// When new seats stop being granted without a sync (Unix milliseconds).
    pub deadline_ms: u64,
    /// The deadline has passed: registrations are refused `sync_overdue`.
    #[serde(default)]
    pub overdue: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlaveStatus {
    pub slave_id: String,
    pub connected: bool,
    /// The slave license id, `None` for an unlicensed slave.
    #[serde(default)]
    pub license: Option<Uuid>,
    #[serde(default)]
    pub local_limit: Option<u32>,
    pub in_use: u32,
    pub in_use_by_type: BTreeMap<String, u32>,
    /// Milliseconds since the last heartbeat or request.
    #[serde(default)]
    pub last_seen_ms_ago: u64,
    /// What this master is to the slave (from its heartbeats).
    #[serde(default)]
    pub master: Option<MasterUse>,
    /// The free blocks allotted to the slave, per agent type (allotment mode).
    #[serde(default)]
    pub allotted: BTreeMap<String, u32>,
    /// The slave's grace period, as its hello said (`None` from a master that does not
    /// say).
    #[serde(default)]
    pub grace_ms: Option<u64>,
    /// The slave logs its agents out when its grace period ends (its seats are then
    /// reclaimed after the master's reclaim margin).
    #[serde(default)]
    pub logout_after_grace: bool,
    /// Its seats were reclaimed while it was silent (until its next hello).
    #[serde(default)]
    pub reclaimed: bool,
}

/// What a silent slave is doing on its side, as the master can tell from its last word
/// and the grace period its hello announced: a slave that reaches no master admits
/// locally for its grace period, then restricts (and, with `logout-all`, logs its agents
/// out). The master cannot hear it, so this is an estimate by the master's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// In its grace period (if it still runs), which ends in `left_ms`.
    InGrace { left_ms: u64 },
    /// Past its grace period for `for_ms`: restricted on its side.
    PastGrace { for_ms: u64 },
}

impl SlaveStatus {
    /// `None` while connected, or when the master did not say the grace period.
    pub fn silence(&self) -> Option<Silence> {
        if self.connected {
            return None;
        }
        let grace = self.grace_ms?;
        Some(if self.last_seen_ms_ago < grace {
            Silence::InGrace {
                left_ms: grace - self.last_seen_ms_ago,
            }
        } else {
            Silence::PastGrace {
                for_ms: self.last_seen_ms_ago - grace,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    fn round_trip<T>(value: &T)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        let bytes = encode(value).unwrap();
        assert_eq!(&decode::<T>(&bytes).unwrap(), value);
    }

    /// A silent slave is in its grace period until its grace has passed since its last
    /// word, then past it; a connected one, or one whose grace is not known, is neither.
    #[test]
    fn a_silent_slave_is_in_grace_then_past_it() {
        let mut slave = SlaveStatus {
            slave_id: "s".into(),
            connected: true,
            license: None,
            local_limit: None,
            in_use: 0,
            in_use_by_type: BTreeMap::new(),
            last_seen_ms_ago: 30_000,
            master: None,
            allotted: BTreeMap::new(),
            grace_ms: Some(120_000),
            logout_after_grace: false,
            reclaimed: false,
        };
        assert_eq!(slave.silence(), None);
        slave.connected = false;
        assert_eq!(slave.silence(), Some(Silence::InGrace { left_ms: 90_000 }));
        slave.last_seen_ms_ago = 120_000;
        assert_eq!(slave.silence(), Some(Silence::PastGrace { for_ms: 0 }));
        slave.last_seen_ms_ago = 150_000;
        assert_eq!(slave.silence(), Some(Silence::PastGrace { for_ms: 30_000 }));
        slave.grace_ms = None;
        assert_eq!(slave.silence(), None);
    }

    /// An agent list of the longest ids a slave may use stays within its byte budget, well
    /// under the message size limit; with short ids it holds at least 1000 agents.
    #[test]
    fn the_agent_list_of_a_status_reply_is_bounded_in_bytes() {
        let long: BTreeMap<String, String> = (0..STATUS_MAX_AGENTS)
            .map(|i| (format!("{i:0>256}"), "t".repeat(64)))
            .collect();
        let list = bounded_agent_list(&long);
        assert!(!list.is_empty() && list.len() < STATUS_MAX_AGENTS);
        // Within its budget as encoded, leaving the rest of the reply for the slave rows.
        let encoded = encode(&list).unwrap().len();
        assert!(encoded <= STATUS_MAX_AGENT_BYTES, "{encoded} bytes");
        const { assert!(STATUS_MAX_AGENT_BYTES < crate::MAX_MESSAGE_BYTES / 2) };
        let short: BTreeMap<String, String> = (0..STATUS_MAX_AGENTS + 10)
            .map(|i| (format!("a{i}"), "inbound".to_owned()))
            .collect();
        assert!(bounded_agent_list(&short).len() >= 1000);
    }

    /// The seat list is bounded like the agent list, with the granting replica's id too.
    #[test]
    fn the_seat_list_of_a_status_reply_is_bounded_in_bytes() {
        let seat = |i: usize| HeldSeat {
            agent_id: format!("{i:0>256}"),
            agent_type: "t".repeat(64),
            since_ms: u64::MAX,
            granted_by: "b".repeat(64),
        };
        let list = bounded_seat_list((0..STATUS_MAX_AGENTS).map(seat));
        assert!(!list.is_empty() && list.len() < STATUS_MAX_AGENTS);
        let encoded = encode(&list).unwrap().len();
        assert!(encoded <= STATUS_MAX_AGENT_BYTES, "{encoded} bytes");
        let short = (0..STATUS_MAX_AGENTS + 10).map(|i| HeldSeat {
            agent_id: format!("a{i}"),
            agent_type: "inbound".to_owned(),
            since_ms: 1_700_000_000_000,
            granted_by: "broker-1".to_owned(),
        });
        assert!(bounded_seat_list(short).len() >= 500);
    }

    #[test]
    fn the_agent_digest_ignores_order_and_sees_types() {
        let ab = agent_digest([("a", "in"), ("b", "out")]);
        assert_eq!(ab, agent_digest([("b", "out"), ("a", "in")]));
        assert_ne!(ab, agent_digest([("a", "out"), ("b", "in")]));
        assert_ne!(
            agent_digest([("a", "in")]),
            agent_digest(std::iter::empty())
        );
        assert_eq!(ab ^ agent_hash("b", "out"), agent_digest([("a", "in")]));
    }

    #[test]
    fn every_message_round_trips() {
        let claim = AgentClaim {
            agent_id: "a1".into(),
            agent_type: "inbound".into(),
        };
        round_trip(&Hello {
            instance: Uuid::new_v4(),
            license: Some("text".into()),
            heartbeat_interval_ms: 1000,
            agents: vec![claim.clone()],
            software: "lmbus-slave 0.1".into(),
            seq: 3,
            grace_ms: 120_000,
            logout_after_grace: true,
            request_timeout_ms: 2000,
            request_seq: Some(41),
            pending: vec!["a2".into()],
            journal: Some(12),
            context: Some(crate::Context::Backup),
        });
        round_trip(&SlaveReport {
            event: SlaveEvent::Restricted {
                lost_for_ms: 130_000,
                logged_out: 4,
            },
            message: String::new(),
        });
        round_trip(&ReleaseRequest {
            slave_id: "s".into(),
            agent_id: Some("a".into()),
            operator: "ops".into(),
        });
        round_trip(&ReleaseReply::Released {
            agents: vec!["a".into()],
        });
        round_trip(&ReportRequest {
            operator: "ops".into(),
        });
        round_trip(&ReportReply::Written {
            report: Box::new(crate::report::tests::sample()),
            files: vec!["/var/lib/lmbus/r.json".into()],
            emailed_to: vec!["ops@example.com".into()],
            problems: Vec::new(),
        });
        round_trip(&ReportReply::Error {
            message: "m".into(),
        });
        round_trip(&RegisterRequest {
            request_id: Uuid::new_v4(),
            seq: 7,
            agent_id: "a".into(),
            agent_type: "t".into(),
        });
        round_trip(&BatchRequest {
            items: vec![
                BatchItem::Register(RegisterRequest {
                    request_id: Uuid::new_v4(),
                    seq: 9,
                    agent_id: "a".into(),
                    agent_type: "t".into(),
                }),
                BatchItem::Unregister(UnregisterRequest {
                    request_id: Uuid::new_v4(),
                    seq: 10,
                    agent_id: "a".into(),
                }),
            ],
        });
        round_trip(&Reply::Batch(vec![
            Reply::Ack,
            Reply::Decision(Decision::Approved {
                already_held: false,
            }),
        ]));
        round_trip(&UnregisterRequest {
            request_id: Uuid::new_v4(),
            seq: 8,
            agent_id: "a".into(),
        });
        round_trip(&Heartbeat {
            instance: Uuid::new_v4(),
            seq: 9,
            agents: 2,
            master: Some(MasterUse {
                role: MasterRole::Secondary,
                in_use: true,
                other: Some(OtherMaster {
                    context: Some(crate::Context::Production),
                    seats: 2,
                }),
            }),
            books: Some(Books {
                count: 2,
                digest: agent_digest([("a", "t"), ("b", "t")]),
                unsettled: vec!["c".into()],
                request_seq: Some(12),
            }),
        });
        round_trip(&SlaveReport {
            event: SlaveEvent::LocalRejection {
                agent_id: "a".into(),
                agent_type: "t".into(),
                reason: RejectReason::LocalLimit,
            },
            message: "m".into(),
        });
        for reply in [
            Reply::Welcome(Welcome {
                broker_id: "b".into(),
                master_license: Uuid::new_v4(),
                missed_heartbeats: 3,
                rejected_agents: vec![RejectedAgent {
                    agent_id: "x".into(),
                    reason: RejectReason::AggregateLimit,
                }],
                admission: crate::Admission::Allotment,
                allot_refresh_ms: 2000,
                context: Some(crate::Context::Backup),
            }),
            Reply::Allotment(crate::Allotment {
                blocks: BTreeMap::from([("inbound".into(), 3)]),
                lease_ms: 30_000,
                journal: 4,
                refused: vec![RejectedAgent {
                    agent_id: "y".into(),
                    reason: RejectReason::NoAllotment,
                }],
                exhausted: true,
            }),
            Reply::Refused {
                reason: RejectReason::UnlicensedNotAllowed,
                detail: "d".into(),
                last_hello: None,
                retry_after_ms: None,
            },
            Reply::Decision(Decision::Rejected {
                reason: RejectReason::SyncOverdue,
                detail: "d".into(),
                retry_after_ms: None,
            }),
            Reply::Refused {
                reason: RejectReason::SlaveIdInUse,
                detail: "d".into(),
                last_hello: None,
                retry_after_ms: Some(2500),
            },
            Reply::Refused {
                reason: RejectReason::Replayed,
                detail: "d".into(),
                last_hello: Some(9),
                retry_after_ms: None,
            },
            Reply::Decision(Decision::Approved { already_held: true }),
            Reply::Decision(Decision::Rejected {
                reason: RejectReason::TypeLimit,
                detail: "d".into(),
                retry_after_ms: None,
            }),
            Reply::Decision(Decision::Rejected {
                reason: RejectReason::AggregateLimit,
                detail: "d".into(),
                retry_after_ms: Some(50),
            }),
            Reply::Ack,
            Reply::Error(WireError {
                code: ErrorCode::Malformed,
                message: "m".into(),
            }),
        ] {
            round_trip(&reply);
        }
        round_trip(&ControlMessage::LogOut { agents: vec![] });
        round_trip(&ControlMessage::Rehello);
        round_trip(&ControlMessage::NewLeader);
        round_trip(&ControlMessage::ReturnAllotment);
        round_trip(&ControlMessage::ShrinkAllotment {
            blocks: BTreeMap::from([("inbound".into(), 3)]),
        });
        round_trip(&StatusRequest::default());
        round_trip(&StatusRequest {
            agents_of: Some("s".into()),
            seat_details: true,
        });
        round_trip(&StatusReply {
            broker_id: "b".into(),
            cluster: "c".into(),
            license: LicenseSummary {
                id: Uuid::new_v4(),
                customer: "x".into(),
                context: "development".into(),
                expires: "2030-01-01".into(),
                maintenance_expires: "2029-06-30".into(),
                not_for_production: true,
                sync: Some(SyncStatus {
                    within_days: 60,
                    last_sync_ms: 1_700_000_000_000,
                    deadline_ms: 1_705_184_000_000,
                    overdue: true,
                }),
            },
            allow_unlicensed_slaves: true,
            total_limit: 5,
            type_limits: BTreeMap::from([("inbound".into(), 3)]),
            total_in_use: 1,
            in_use_by_type: BTreeMap::new(),
            slaves_total: 1,
            slaves_connected: 1,
            slaves: vec![SlaveStatus {
                slave_id: "s".into(),
                connected: true,
                license: None,
                local_limit: Some(2),
                in_use: 1,
                in_use_by_type: BTreeMap::new(),
                last_seen_ms_ago: 10,
                master: None,
                allotted: BTreeMap::from([("inbound".into(), 2)]),
                grace_ms: Some(120_000),
                logout_after_grace: true,
                reclaimed: false,
            }],
            leader_term: 4,
            ledger_sequence: 17,
            admission: crate::Admission::Allotment,
            allotted_by_type: BTreeMap::from([("inbound".into(), 2)]),
            allotted_total: 2,
            agents: vec![AgentClaim {
                agent_id: "a".into(),
                agent_type: "inbound".into(),
            }],
            seats: vec![HeldSeat {
                agent_id: "a".into(),
                agent_type: "inbound".into(),
                since_ms: 1_700_000_000_000,
                granted_by: "b".into(),
            }],
            replicas: vec![ReplicaStatus {
                replica: "b2".into(),
                priority: 2,
                leader: false,
                applied: 17,
                drained: true,
                last_seen_ms_ago: 40,
            }],
        });
        round_trip(&ReplicaBeat {
            replica: "b1".into(),
            priority: 1,
            leader: true,
            applied: 3,
            drained: false,
            context: Some(crate::Context::Production),
            license: Some(Uuid::new_v4()),
        });
        round_trip(&Goodbye {
            instance: Uuid::new_v4(),
            reason: "stopped".into(),
        });
        round_trip(&ForgetRequest {
            slave_id: "s".into(),
            operator: "ops".into(),
        });
        round_trip(&ForgetReply::Forgotten {
            message: "m".into(),
        });
    }

    /// A role a newer slave sends (as this build sends `backup` to older brokers) decodes
    /// as `Other` instead of failing the whole heartbeat.
    #[test]
    fn an_unknown_master_role_decodes_as_other() {
        #[derive(Serialize)]
        struct FutureUse<'a> {
            role: &'a str,
            in_use: bool,
        }
        let bytes = encode(&FutureUse {
            role: "tertiary",
            in_use: false,
        })
        .unwrap();
        let decoded = decode::<MasterUse>(&bytes).unwrap();
        assert_eq!(decoded.role, MasterRole::Other);
        assert_eq!(decoded.to_string(), "another role, idle");
        let backup = encode(&FutureUse {
            role: "backup",
            in_use: true,
        })
        .unwrap();
        assert_eq!(
            decode::<MasterUse>(&backup).unwrap().role,
            MasterRole::Backup
        );
    }

    #[test]
    fn unknown_reason_decodes_as_other() {
        #[derive(Serialize)]
        struct FutureRejected<'a> {
            reason: &'a str,
            detail: &'a str,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "snake_case")]
        enum FutureDecision<'a> {
            Rejected(FutureRejected<'a>),
        }
        let bytes = encode(&FutureDecision::Rejected(FutureRejected {
            reason: "moon_phase",
            detail: "",
        }))
        .unwrap();
        assert_eq!(
            decode::<Decision>(&bytes).unwrap(),
            Decision::Rejected {
                reason: RejectReason::Other,
                detail: String::new(),
                retry_after_ms: None,
            }
        );
    }

    /// A slave of an older build reads a refusal with a retry hint as a plain refusal.
    #[test]
    fn an_older_slave_reads_a_retry_hint_as_a_refusal() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(rename_all = "snake_case")]
        enum OldDecision {
            Rejected {
                reason: RejectReason,
                detail: String,
            },
        }
        let bytes = encode(&Decision::Rejected {
            reason: RejectReason::AggregateLimit,
            detail: "d".into(),
            retry_after_ms: Some(50),
        })
        .unwrap();
        assert_eq!(
            decode::<OldDecision>(&bytes).unwrap(),
            OldDecision::Rejected {
                reason: RejectReason::AggregateLimit,
                detail: "d".into()
            }
        );
    }

    /// What a master is to a slave, as status tables show it, with where else the slave
    /// is served.
    #[test]
    fn a_master_use_names_the_other_masters_seats() {
        let other = |context, seats| Some(OtherMaster { context, seats });
        let shown = |role, in_use, other| {
            MasterUse {
                role,
                in_use,
                other,
            }
            .to_string()
        };
        assert_eq!(shown(MasterRole::Only, true, None), "only master");
        assert_eq!(
            shown(
                MasterRole::Primary,
                true,
                other(Some(crate::Context::Backup), 1)
            ),
            "primary, in use; backup holds 1 seat"
        );
        assert_eq!(
            shown(MasterRole::Primary, false, other(None, 0)),
            "primary, idle; other master holds 0 seats"
        );
        assert_eq!(
            shown(
                MasterRole::Secondary,
                true,
                other(Some(crate::Context::Production), 0)
            ),
            "secondary, in use",
            "nothing held elsewhere while in use"
        );
        assert_eq!(
            shown(
                MasterRole::Backup,
                false,
                other(Some(crate::Context::Production), 2)
            ),
            "backup master, idle; production holds 2 seats"
        );
    }

    /// A hello from a slave that does not declare a context decodes with none (the master
    /// counts it as production).
    #[test]
    fn an_older_hello_has_no_context() {
        #[derive(Serialize)]
        struct OldHello {
            instance: Uuid,
            heartbeat_interval_ms: u64,
        }
        let bytes = encode(&OldHello {
            instance: Uuid::new_v4(),
            heartbeat_interval_ms: 1000,
        })
        .unwrap();
        assert_eq!(decode::<Hello>(&bytes).unwrap().context, None);
    }
}
