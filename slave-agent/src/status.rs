//! The status snapshot the host, the local API and the metrics read.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use lmbus_schemas::RejectReason;

use crate::events::LoggedOut;

/// A snapshot for status displays and the local API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlaveStatusView {
    pub slave_id: String,
    /// The cluster of the master new registrations go to.
    pub cluster: String,
    /// Whether that master answers.
    pub connected: bool,
    pub broker_id: Option<String>,
    /// `primary`, `secondary` or `backup`: where new registrations go.
    pub active_master: String,
    /// The context of that master's license while it answers (`production`, `backup` or
    /// `development`): whether this slave is served by production or by a backup master
    /// now. `None` while it does not answer, or from an older broker.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "production")]
    pub served_by: Option<lmbus_schemas::Context>,
    /// Every configured master.
    pub masters: Vec<MasterView>,
    pub licensed: bool,
    pub license_id: Option<Uuid>,
    /// The context this slave runs in (its license's, else `--context`, else
    /// production), which its masters must share: `production`, `backup` or `development`.
    /// Absent from a daemon older than this field.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "production")]
    pub context: Option<lmbus_schemas::Context>,
    pub local_limit: Option<u32>,
    pub agents: u32,
    pub agents_by_type: BTreeMap<String, u32>,
    pub pending: u32,
    /// Recent logouts of agents that held a seat (the master reclaimed or an operator
    /// released it, a re-registration was refused, the grace period ended), oldest first,
    /// at most 100.
    pub logged_out: Vec<AgentNotice>,
    /// Recent registrations refused to agents that held no seat (they were never
    /// admitted, or keep the seat they had), oldest first, at most 100.
    #[serde(default)]
    pub rejected: Vec<AgentNotice>,
    pub last_error: Option<String>,
    pub mode: SlaveMode,
    /// Milliseconds left in the grace period while in `grace`.
    pub grace_left_ms: Option<u64>,
    /// How the active master decides registrations: `strict` or `allotment`.
    #[serde(default)]
    #[schema(value_type = String, example = "strict")]
    pub admission: lmbus_schemas::Admission,
    /// Allotment mode: the free seats of the active master's blocks this slave may admit
    /// from now, per agent type.
    #[serde(default)]
    pub allotted: BTreeMap<String, u32>,
    /// Allotment mode: how long this slave may still admit from its blocks without hearing
    /// from the master.
    #[serde(default)]
    pub allot_lease_left_ms: Option<u64>,
    /// Allotment mode: local decisions the master has not acknowledged yet (every master).
    #[serde(default)]
    pub journal_unacked: u32,
    /// Registrations decided here from a block since the slave started, and agents that
    /// came and went between two allot requests (counted, not named, on the master).
    #[serde(default)]
    pub local_decisions: u64,
    #[serde(default)]
    pub churned: u64,
}

/// One agent in the status's `logged_out` or `rejected` list: who, why and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentNotice {
    pub agent_id: String,
    pub agent_type: String,
    /// The snake_case reason (`aggregate_limit`, `reclaimed`, …; see the README).
    #[schema(value_type = String, example = "aggregate_limit")]
    pub reason: RejectReason,
    pub detail: String,
    /// When the slave learnt it: RFC 3339 in UTC with milliseconds
    /// (`2026-11-27T10:00:00.123Z`), from this host's clock.
    #[schema(example = "2026-11-27T10:00:00.123Z")]
    pub at: String,
}

impl AgentNotice {
    /// `out`, stamped with the wall-clock time now.
    pub(crate) fn now(out: &LoggedOut) -> Self {
        let now = time::OffsetDateTime::now_utc();
        let now = now
            .replace_nanosecond(now.millisecond() as u32 * 1_000_000)
            .unwrap_or(now);
        Self {
            agent_id: out.agent_id.clone(),
            agent_type: out.agent_type.clone(),
            reason: out.reason,
            detail: out.detail.clone(),
            at: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MasterView {
    pub name: String,
    pub cluster: String,
    pub connected: bool,
    pub broker_id: Option<String>,
    /// Its license context, as its last welcome said (`None` before one, or from an older
    /// broker).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "backup")]
    pub context: Option<lmbus_schemas::Context>,
    /// Seats this master granted.
    pub agents: u32,
}

/// What the slave does about registrations, by whether a master answers. In JSON, in the
/// metrics and in logs it is `connected`, `grace` or `restricted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SlaveMode {
    /// A master answers.
    Connected,
    /// No master answers and the grace period runs: registrations follow the
    /// `during_grace` policy.
    Grace,
    /// No master answered for the whole grace period: new registrations are refused (and
    /// with `logout-all` every agent was logged out).
    Restricted,
}

impl SlaveMode {
    pub const ALL: [SlaveMode; 3] = [
        SlaveMode::Connected,
        SlaveMode::Grace,
        SlaveMode::Restricted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SlaveMode::Connected => "connected",
            SlaveMode::Grace => "grace",
            SlaveMode::Restricted => "restricted",
        }
    }
}

impl fmt::Display for SlaveMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So that `status.mode == "restricted"` reads as it did when the mode was a string.
impl PartialEq<&str> for SlaveMode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}
