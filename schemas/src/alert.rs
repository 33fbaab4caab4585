//! Alerts: the events operators see in `lmbus-monitor tail`.
//!
//! The master publishes every alert on `lmbus.v1.<cluster>.alert.<severity>.<kind>`, so a
//! monitor can filter with NATS wildcards as well as on the decoded fields.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::messages::RejectReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn token(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Severity::Info, Severity::Warning, Severity::Critical]
            .into_iter()
            .find(|v| v.token().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.token())
    }
}

/// What happened. New kinds may appear in later versions; a monitor shows an unknown kind
/// as `other` instead of failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    BrokerStarted,
    BrokerStopped,
    SlaveConnected,
    SlaveDisconnected,
    SlaveRefused,
    RegistrationRejected,
    AgentLoggedOut,
    LicenseCounts,
    LicenseExpiringSoon,
    BadMessage,
    /// The master reclaimed a silent slave's seats after its grace period and margin.
    SeatsReclaimed,
    /// An operator force-released seats.
    SeatsReleased,
    /// An operator swapped the master license of a running master (`admin reload-license`).
    LicenseReloaded,
    /// An operator drained a broker replica for maintenance (`admin drain`).
    ReplicaDrained,
    /// A slave lost every master beyond its grace period and restricted usage (reported
    /// when it reconnects).
    SlaveRestricted,
    /// A broker replica won the leader lease and caught up with the ledger.
    LeaderElected,
    /// A leader stopped leading (lease lost, ledger write refused, ledger unreachable).
    LeaderSteppedDown,
    /// The ledger refused a write because another replica wrote first (fencing).
    LedgerWriteRefused,
    /// The leader hears from a broker replica it did not know.
    ReplicaJoined,
    /// The leader stopped hearing from a broker replica.
    ReplicaLost,
    /// How many broker replicas are up, after a change (warning when no standby is left).
    Redundancy,
    /// The master wrote a usage report (info), or could not write, publish or mail it
    /// (warning).
    UsageReport,
    /// A slave process said goodbye (a clean stop, or a failure at startup): its seats are
    /// released and the master forgets it.
    SlaveStopped,
    /// The master forgot a slave: silent past `--forget-after` with no seats, or removed by
    /// an operator (`admin forget-slave`).
    SlaveForgotten,
    /// A master license was refused because its context differs from the running master's
    /// or the ledger's: an `admin reload-license` of another context, or a replica started
    /// with a license of another context than the cluster's ledger.
    LicenseRefused,
    /// The master license's offline limit (`sync_within_days`): a warning 30, 14, 7 and 1
    /// days before it, critical once it passed (no new seats until a vendor sync).
    SyncDue,
    /// A vendor sync (`admin sync now`) failed, and why: no answer, a refusal, or an answer
    /// that does not verify (nothing changed); info when one succeeded.
    VendorSync,
    #[serde(other)]
    Other,
}

impl AlertKind {
    pub const ALL: [AlertKind; 28] = [
        AlertKind::BrokerStarted,
        AlertKind::BrokerStopped,
        AlertKind::SlaveConnected,
        AlertKind::SlaveDisconnected,
        AlertKind::SlaveRefused,
        AlertKind::RegistrationRejected,
        AlertKind::AgentLoggedOut,
        AlertKind::LicenseCounts,
        AlertKind::LicenseExpiringSoon,
        AlertKind::BadMessage,
        AlertKind::SeatsReclaimed,
        AlertKind::SeatsReleased,
        AlertKind::SlaveRestricted,
        AlertKind::LeaderElected,
        AlertKind::LeaderSteppedDown,
        AlertKind::LedgerWriteRefused,
        AlertKind::ReplicaJoined,
        AlertKind::ReplicaLost,
        AlertKind::Redundancy,
        AlertKind::LicenseReloaded,
        AlertKind::ReplicaDrained,
        AlertKind::UsageReport,
        AlertKind::SlaveStopped,
        AlertKind::SlaveForgotten,
        AlertKind::LicenseRefused,
        AlertKind::SyncDue,
        AlertKind::VendorSync,
        AlertKind::Other,
    ];

    pub fn token(self) -> &'static str {
        match self {
            AlertKind::BrokerStarted => "broker_started",
            AlertKind::BrokerStopped => "broker_stopped",
            AlertKind::SlaveConnected => "slave_connected",
            AlertKind::SlaveDisconnected => "slave_disconnected",
            AlertKind::SlaveRefused => "slave_refused",
            AlertKind::RegistrationRejected => "registration_rejected",
            AlertKind::AgentLoggedOut => "agent_logged_out",
            AlertKind::LicenseCounts => "license_counts",
            AlertKind::LicenseExpiringSoon => "license_expiring_soon",
            AlertKind::BadMessage => "bad_message",
            AlertKind::SeatsReclaimed => "seats_reclaimed",
            AlertKind::SeatsReleased => "seats_released",
            AlertKind::SlaveRestricted => "slave_restricted",
            AlertKind::LeaderElected => "leader_elected",
            AlertKind::LeaderSteppedDown => "leader_stepped_down",
            AlertKind::LedgerWriteRefused => "ledger_write_refused",
            AlertKind::ReplicaJoined => "replica_joined",
            AlertKind::ReplicaLost => "replica_lost",
            AlertKind::Redundancy => "redundancy",
            AlertKind::LicenseReloaded => "license_reloaded",
            AlertKind::ReplicaDrained => "replica_drained",
            AlertKind::UsageReport => "usage_report",
            AlertKind::SlaveStopped => "slave_stopped",
            AlertKind::SlaveForgotten => "slave_forgotten",
            AlertKind::LicenseRefused => "license_refused",
            AlertKind::SyncDue => "sync_due",
            AlertKind::VendorSync => "vendor_sync",
            AlertKind::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.token() == s)
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.token())
    }
}

/// One alert. `time_ms` is wall-clock Unix milliseconds stamped by the publisher when the
/// alert leaves the process; decision logic never reads the wall clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    #[serde(default)]
    pub time_ms: i64,
    pub severity: Severity,
    pub kind: AlertKind,
    /// Who raised it: the broker's id, or `slave:<id>` for a report relayed from a slave.
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub slave: Option<String>,
    #[serde(default)]
    pub agent_type: Option<String>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub reason: Option<RejectReason>,
    /// Seat counts per agent type (for `license_counts` and rejections).
    #[serde(default)]
    pub counts: BTreeMap<String, u32>,
    pub message: String,
    /// The context of the master license the raising broker runs in (`production`,
    /// `backup`, `development`); empty from an older broker and in a slave's own reports.
    #[serde(default)]
    pub context: String,
    /// Set by a development master: what it decided is not for production use.
    #[serde(default)]
    pub not_for_production: bool,
    /// `license_counts` only: the most seats in use per agent type and `total` since the
    /// master's previous `license_counts` alert (at least `counts`), so that a peak
    /// between two alerts is not lost; empty in a new leader's first one and from an
    /// older broker.
    #[serde(default)]
    pub peaks: BTreeMap<String, u32>,
}

impl Alert {
    pub fn new(severity: Severity, kind: AlertKind, message: impl Into<String>) -> Self {
        Self {
            time_ms: 0,
            severity,
            kind,
            source: String::new(),
            slave: None,
            agent_type: None,
            agent_id: None,
            reason: None,
            counts: BTreeMap::new(),
            message: message.into(),
            context: String::new(),
            not_for_production: false,
            peaks: BTreeMap::new(),
        }
    }

    /// Marks the alert as raised by a master running in `context`.
    pub fn in_context(mut self, context: crate::Context) -> Self {
        self.context = context.token().to_owned();
        self.not_for_production = context.not_for_production();
        self
    }

    pub fn slave(mut self, slave: impl Into<String>) -> Self {
        self.slave = Some(slave.into());
        self
    }

    pub fn agent(mut self, agent_id: impl Into<String>, agent_type: impl Into<String>) -> Self {
        self.agent_id = Some(agent_id.into());
        self.agent_type = Some(agent_type.into());
        self
    }

    pub fn reason(mut self, reason: RejectReason) -> Self {
        self.reason = Some(reason);
        self
    }

    pub fn counts(mut self, counts: BTreeMap<String, u32>) -> Self {
        self.counts = counts;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn alert_round_trip() {
        let a = Alert::new(Severity::Warning, AlertKind::RegistrationRejected, "full")
            .slave("s1")
            .agent("a1", "inbound")
            .reason(RejectReason::AggregateLimit)
            .counts(BTreeMap::from([("inbound".into(), 3)]))
            .in_context(crate::Context::Development);
        assert!(a.not_for_production);
        assert_eq!(a.context, "development");
        assert_eq!(decode::<Alert>(&encode(&a).unwrap()).unwrap(), a);
    }

    #[test]
    fn unknown_kind_decodes_as_other() {
        #[derive(Serialize)]
        struct Future<'a> {
            severity: &'a str,
            kind: &'a str,
            message: &'a str,
        }
        let bytes = encode(&Future {
            severity: "info",
            kind: "quantum_event",
            message: "m",
        })
        .unwrap();
        assert_eq!(decode::<Alert>(&bytes).unwrap().kind, AlertKind::Other);
    }

    #[test]
    fn tokens_parse_back() {
        for k in AlertKind::ALL {
            assert_eq!(AlertKind::parse(k.token()), Some(k));
        }
        assert_eq!(Severity::parse("WARNING"), Some(Severity::Warning));
    }
}
