//! How a slave agent is configured: its masters, timings and the failover, grace and
//! restriction policies. Plain data, read by the policy and the agent alike.

use std::time::Duration;

use lmbus_schemas::{Context, SlaveId, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Default [`SlaveConfig::failover_wait`]: a broker leader failover takes about one lease
/// (1 s by default) plus a poll, and a request that went to a leader that froze waits out
/// one request timeout (2 s) before its retry reaches the new leader; this covers both
/// with room to spare.
pub const DEFAULT_FAILOVER_WAIT: Duration = Duration::from_secs(5);
/// Default [`SlaveConfig::election_wait`].
pub const DEFAULT_ELECTION_WAIT: Duration = Duration::from_secs(30);

/// How a slave agent connects and behaves.
#[derive(Debug, Clone)]
pub struct SlaveConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// How to authenticate to the primary master's NATS.
    pub nats_auth: lmbus_nats::NatsAuth,
    pub cluster: String,
    pub slave_id: SlaveId,
    /// The slave's license: `None` runs unlicensed.
    pub license: Option<LicenseFile>,
    /// Run unlicensed even though a license file is given (only allowed for a license
    /// with neither the master nor the slave flag).
    pub unlicensed: bool,
    /// The vendor's public key; required when a license is given.
    pub vendor_key: Option<VerifyingKey>,
    /// The context this slave runs in, told to the master at every hello: it must be the
    /// master's. `None`: the license's, or production when unlicensed. With a license, a
    /// context other than the license's is refused at start.
    pub context: Option<Context>,
    pub heartbeat_interval: Duration,
    /// How long to wait for the master's answer to one request.
    pub request_timeout: Duration,
    /// How long a request keeps being retried (with backoff) while nobody answers, before
    /// the master counts as lost: long enough to ride through a broker leader failover
    /// (about one lease, 1 s by default) without the host application seeing an error.
    pub failover_wait: Duration,
    /// How long a request keeps being retried while the master's broker replicas answer
    /// `no_leader` (they are alive and electing a leader; when a NATS node dies this lasts
    /// as long as JetStream's own stream-leader election, about 10 s).
    pub election_wait: Duration,
    /// How long the slave keeps working after losing every master.
    pub grace_period: Duration,
    /// What to do with new registrations during the grace period.
    pub during_grace: GracePolicy,
    /// What to do when the grace period ends.
    pub after_grace: Restriction,
    /// A second master to fail over (or overflow) to.
    pub secondary: Option<MasterEndpoint>,
    /// A backup-context master: asked only once every production master (the primary and
    /// the secondary) has been lost for the failover detection time, and left as soon as
    /// one answers again, its agents moved back (the handback).
    pub backup: Option<MasterEndpoint>,
    /// While on the secondary: go back when the primary answers again, or stay.
    pub return_policy: ReturnPolicy,
    /// Ask the secondary when the primary rejects for capacity (`aggregate_limit`,
    /// `type_limit`); the secondary's own limits apply.
    pub overflow: bool,
    /// Switch to the secondary when the primary answers slower than this (LumenVox's
    /// 10 s network delay). Dead masters are detected faster: see the module doc.
    pub switch_delay: Duration,
}

/// Where a master is: its NATS and its cluster name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterEndpoint {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// How to authenticate to that NATS.
    pub nats_auth: lmbus_nats::NatsAuth,
    pub cluster: String,
}

/// What a slave on its secondary master does when the primary answers again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReturnPolicy {
    /// New registrations go to the primary again as soon as it answers a hello; seats the
    /// secondary granted stay there until released, except a backup master's, which are
    /// moved to the primary (the handback).
    ReturnToPrimary,
    /// Keep using the secondary until it fails.
    Stay,
}

/// New registrations while no master answers, within the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GracePolicy {
    /// Refuse them (`master_unavailable`): the aggregate limit is never exceeded.
    Refuse,
    /// Admit them locally (the local limit still applies); the master reconciles them on
    /// reconnect and logs out what no longer fits. The aggregate can be exceeded meanwhile.
    Allow,
}

/// What happens when the grace period ends without a master.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restriction {
    /// Log out every agent and refuse new ones. The master may then reclaim this slave's
    /// seats after the grace period plus its margin (the timing rule).
    LogoutAll,
    /// Keep current agents, refuse new ones. The master never reclaims this slave's seats
    /// on its own, since the agents may still be working.
    RefuseNew,
}

impl SlaveConfig {
    pub fn new(nats_url: &str, cluster: &str, slave_id: SlaveId) -> Self {
        Self {
            nats_url: nats_url.to_owned(),
            nats_auth: Default::default(),
            cluster: cluster.to_owned(),
            slave_id,
            license: None,
            unlicensed: false,
            vendor_key: None,
            context: None,
            heartbeat_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(2),
            failover_wait: DEFAULT_FAILOVER_WAIT,
            election_wait: DEFAULT_ELECTION_WAIT,
            grace_period: Duration::from_secs(120),
            during_grace: GracePolicy::Refuse,
            after_grace: Restriction::LogoutAll,
            secondary: None,
            backup: None,
            return_policy: ReturnPolicy::ReturnToPrimary,
            overflow: false,
            switch_delay: Duration::from_secs(10),
        }
    }
}

/// A license file as read from disk: its name (for errors) and its verbatim text.
#[derive(Debug, Clone)]
pub struct LicenseFile {
    pub name: String,
    pub text: String,
}
