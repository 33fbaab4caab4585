//! The admission engine: the master's whole decision logic as a pure state machine.
//!
//! [`Engine::handle`] takes one [`Event`] and the current monotonic time and returns an
//! [`Output`]: the reply for the requester and the effects (alerts, control messages to
//! slaves) the runtime must carry out. It does no IO, reads no clock and spawns nothing,
//! so every rule here is tested with plain `#[test]`s.
//!
//! Seat accounting invariant: `total_in_use` and `in_use_by_type` always equal the sums
//! over every slave's `agents`, and a grant never takes either above the master license's
//! limits.
//!
//! Silent slaves: after `missed_heartbeats` intervals a slave is marked disconnected and
//! keeps its seats. Its seats are reclaimed only when the slave promised (in its hello) to
//! log out all its agents when its grace period ends, and only once that grace period plus
//! `reclaim_margin` has passed since the master last heard from it: the timing rule that
//! keeps the sum under the limit during a partition (see the README).
//!
//! Determinism: the engine holds only ordered collections (`BTreeMap`, `BTreeSet`), so the
//! order of what it returns (the seats a hello or an operator releases, a snapshot's
//! changes, the agents named in alerts) follows from its state and the events alone, the
//! same on every replica and every run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lmbus_schemas::{
    AgentClaim, Alert, AlertKind, BatchRequest, ControlMessage, Decision, ErrorCode, Heartbeat,
    Hello, License, LicenseSummary, RegisterRequest, RejectReason, RejectedAgent, ReleaseReply,
    ReleaseRequest, ReloadReply, ReloadRequest, Reply, Role, SeatChange, Severity, SlaveEvent,
    SlaveId, SlaveReport, SlaveStatus, StatusReply, UnregisterRequest, VerifyingKey, Welcome,
    WireError, agent_hash, verify_license,
};
use time::Date;
use uuid::Uuid;

use crate::bucket::TokenBucket;

#[cfg(test)]
mod tests;

/// Longest agent id accepted, in bytes.
pub const MAX_AGENT_ID_LEN: usize = 256;

/// Settings of the engine. Everything time-related is a duration; the engine never looks
/// at a wall clock except the `today` its caller passes in for license dates.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This replica's id, the `source` of its alerts.
    pub broker_id: String,
    pub cluster: String,
    /// The verified master license.
    pub license: License,
    /// Verifies slave licenses.
    pub vendor_key: VerifyingKey,
    pub allow_unlicensed_slaves: bool,
    /// A slave is marked disconnected after this many heartbeat intervals of silence.
    pub missed_heartbeats: u32,
    /// How often a `license_counts` alert goes out.
    pub counts_interval: Duration,
    /// Warn when the master license has this many days left or fewer.
    pub expiry_warning_days: i64,
    /// Bound on the slave table; hellos beyond it are refused.
    pub max_slaves: usize,
    /// Added to a slave's grace period before its seats are reclaimed. Must exceed the
    /// slave's request timeout plus clock drift (1% of the grace period); a hello that
    /// breaks this is refused with `timing_rule`.
    pub reclaim_margin: Duration,
    /// Registrations per second one slave may send (with a burst of twice that); beyond
    /// it they are rejected `rate_limited`. 0: no limit.
    pub slave_rate_limit: u32,
    /// Most seats one slave may hold, licensed or not (a slave license's local limit
    /// applies too). 0: no cap beyond the license limits.
    pub max_agents_per_slave: u32,
}

/// How often, at most, a slave's rate limiting is reported in an alert.
pub const RATE_LIMIT_ALERT_EVERY: Duration = Duration::from_secs(10);

/// A slave's registration rate: its token bucket, and the rejections not reported in an
/// alert yet with when the last alert went out.
#[derive(Debug)]
struct Bucket {
    tokens: TokenBucket,
    unreported: u64,
    reported_at: Option<Instant>,
}

impl Bucket {
    fn new(now: Instant, rate: u32) -> Self {
        Self {
            tokens: TokenBucket::new(now, rate),
            unreported: 0,
            reported_at: None,
        }
    }

    fn take(&mut self, now: Instant, rate: u32) -> bool {
        self.tokens.take(now, rate)
    }
}

/// How many request numbers below the highest one seen a slave may still send (requests
/// sent concurrently arrive out of order).
pub const REPLAY_WINDOW: u64 = 1024;

/// How far past the highest request number seen a new one may jump. A genuine slave counts
/// up by one; a number near `u64::MAX` would leave no room for any later request and lock
/// the instance out.
pub const MAX_SEQ_JUMP: u64 = 1 << 32;

/// The request numbers (`seq`) of one slave instance the master has processed: every
/// number up to `floor`, and those marked in a ring of the last [`REPLAY_WINDOW`] numbers
/// up to `highest`. 128 bytes per slave.
#[derive(Debug, Clone, Default)]
struct Window {
    highest: u64,
    floor: u64,
    ring: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Window {
    fn bit(seq: u64) -> (usize, u64) {
        let slot = seq % REPLAY_WINDOW;
        ((slot / 64) as usize, 1 << (slot % 64))
    }

    /// Whether `seq` is new; if so, it is marked as processed.
    fn accept(&mut self, seq: u64) -> bool {
        if seq == 0
            || seq <= self.floor
            || seq.saturating_sub(self.highest.max(self.floor)) > MAX_SEQ_JUMP
        {
            return false;
        }
        if seq > self.highest {
            if seq - self.highest >= REPLAY_WINDOW {
                self.ring = Default::default();
            } else {
                for gone in self.highest + 1..seq {
                    let (word, mask) = Self::bit(gone);
                    self.ring[word] &= !mask;
                }
            }
            self.highest = seq;
            let (word, mask) = Self::bit(seq);
            self.ring[word] |= mask;
            return true;
        }
        if self.highest - seq >= REPLAY_WINDOW {
            return false;
        }
        let (word, mask) = Self::bit(seq);
        let fresh = self.ring[word] & mask == 0;
        self.ring[word] |= mask;
        fresh
    }

    /// From the ledger: every number up to `seq` counts as processed (a new leader does
    /// not know which of them its predecessor saw, so it assumes all).
    fn restore(&mut self, seq: u64) {
        self.floor = self.floor.max(seq);
        self.highest = self.highest.max(seq);
    }
}

/// Something the engine must react to.
#[derive(Debug, Clone)]
pub enum Event {
    Hello {
        slave: SlaveId,
        hello: Hello,
        today: Date,
    },
    Register {
        slave: SlaveId,
        request: RegisterRequest,
    },
    Unregister {
        slave: SlaveId,
        request: UnregisterRequest,
    },
    Heartbeat {
        slave: SlaveId,
        heartbeat: Heartbeat,
    },
    Report {
        slave: SlaveId,
        report: SlaveReport,
    },
    /// Registrations and unregistrations sent together: each item is decided in order, as
    /// if it had come alone on its own subject.
    Batch {
        slave: SlaveId,
        request: BatchRequest,
    },
    /// A message that could not be decoded or did not fit its subject. `slave` is the id
    /// from the subject when there was one.
    BadMessage {
        subject: String,
        slave: Option<SlaveId>,
        error: WireError,
    },
    /// Periodic housekeeping: silent slaves, license counts, expiry warnings.
    Tick {
        today: Date,
    },
    /// An operator's `admin release`: one agent's seat or all of a slave's.
    Release {
        request: ReleaseRequest,
    },
    /// An operator's `admin reload-license`, checked against `today`.
    Reload {
        request: ReloadRequest,
        today: Date,
    },
}

impl Event {
    /// One item of a slave's batch, as the event it would be on its own subject.
    pub fn of_batch_item(slave: &SlaveId, item: lmbus_schemas::BatchItem) -> Self {
        match item {
            lmbus_schemas::BatchItem::Register(request) => Event::Register {
                slave: slave.clone(),
                request,
            },
            lmbus_schemas::BatchItem::Unregister(request) => Event::Unregister {
                slave: slave.clone(),
                request,
            },
        }
    }
}

/// What the runtime must do after an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Alert(Alert),
    Control {
        slave: SlaveId,
        message: ControlMessage,
    },
}

/// The answer to whoever sent the event: a slave or an operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// To a slave's request.
    Slave(Reply),
    /// To an operator's `admin release`.
    Release(ReleaseReply),
    /// To an operator's `admin reload-license`.
    Reload(ReloadReply),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// The answer to the requester, when the event was a request.
    pub reply: Option<Answer>,
    pub effects: Vec<Effect>,
    /// The seat changes this event made, in order: the runtime appends them to the ledger
    /// before it sends the reply or any effect.
    pub changes: Vec<SeatChange>,
}

impl Output {
    fn reply(reply: Reply) -> Self {
        Self {
            reply: Some(Answer::Slave(reply)),
            ..Self::default()
        }
    }

    fn alert(&mut self, alert: Alert) {
        self.effects.push(Effect::Alert(alert));
    }
}

/// What the master accepted from a slave's hello.
#[derive(Debug, Clone)]
struct SlaveLicense {
    id: Uuid,
    local_limit: Option<u32>,
}

#[derive(Debug)]
struct Slave {
    instance: Uuid,
    /// `None`: an unlicensed slave.
    license: Option<SlaveLicense>,
    connected: bool,
    last_seen: Instant,
    heartbeat_interval: Duration,
    /// Agent id → agent type, for every seat the slave holds.
    agents: BTreeMap<String, String>,
    /// Agent id → the request number that granted its seat (0: a grant at a hello, or
    /// unknown), for the hello reconcile (`Hello::request_seq`).
    granted: BTreeMap<String, u64>,
    /// `agent_digest` of `agents`, kept up to date, for the heartbeat's books.
    digest: u64,
    /// The slave's grace period, from its hello.
    grace: Duration,
    /// The slave logs out all agents when its grace period ends, so its seats may be
    /// reclaimed after `grace + reclaim_margin` of silence.
    logout_after_grace: bool,
    /// The `seq` of the last hello accepted from this instance.
    hello_seq: u64,
    /// Its seats were reclaimed while it was silent; cleared at its next hello.
    reclaimed: bool,
    /// Agents an operator released whose logout the slave may have missed: refused at
    /// the next hello's reconcile. Bounded by the slave's seat count at release time.
    revoked: BTreeSet<String>,
    /// Its registration rate (not in the ledger: a new leader starts it full).
    bucket: Bucket,
    /// The request numbers of this instance already processed (replay protection).
    requests: Window,
    /// What this master is to the slave, from its last heartbeat (not in the ledger: a new
    /// leader learns it from the next one).
    master: Option<lmbus_schemas::MasterUse>,
}

impl Slave {
    /// Empties the seat table (its counters are the caller's), returning the seats in agent
    /// id order.
    fn take_seats(&mut self) -> Vec<(String, String)> {
        self.granted.clear();
        self.digest = 0;
        std::mem::take(&mut self.agents).into_iter().collect()
    }

    /// This slave's books as its heartbeat would show them: how many seats and their
    /// digest, leaving out `unsettled` agents.
    fn books(&self, unsettled: &[String]) -> (u32, u64) {
        let mut count = self.agents.len() as u32;
        let mut digest = self.digest;
        let mut seen = BTreeSet::new();
        for agent in unsettled {
            if let Some(agent_type) = self.agents.get(agent)
                && seen.insert(agent.as_str())
            {
                count -= 1;
                digest ^= agent_hash(agent, agent_type);
            }
        }
        (count, digest)
    }

    fn silence_limit(&self, missed: u32) -> Duration {
        self.heartbeat_interval.saturating_mul(missed.max(1))
    }

    fn by_type(&self) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for agent_type in self.agents.values() {
            *counts.entry(agent_type.clone()).or_insert(0) += 1;
        }
        counts
    }
}

#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    slaves: BTreeMap<SlaveId, Slave>,
    total_in_use: u32,
    in_use_by_type: BTreeMap<String, u32>,
    next_counts_at: Option<Instant>,
    last_expiry_warning: Option<Date>,
    /// Seat changes made by the event being handled, moved into its [`Output`].
    pending: Vec<SeatChange>,
    /// The signed text of a license reloaded by an operator (`None`: the one the replica
    /// started with), for snapshots.
    license_text: Option<String>,
    /// Refusals that say nothing new when repeated (replayed numbers, requests without a
    /// session), counted per slave and reason so that each is alerted at most once every
    /// [`RATE_LIMIT_ALERT_EVERY`]. Bounded: at most `max_slaves` entries, the oldest
    /// forgotten first (not in the ledger: a new leader starts it empty).
    quiet: BTreeMap<(SlaveId, &'static str), Quiet>,
}

/// One slave's repeated refusals of one reason since its last alert.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    unreported: u64,
    reported_at: Option<Instant>,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            slaves: BTreeMap::new(),
            total_in_use: 0,
            in_use_by_type: BTreeMap::new(),
            next_counts_at: None,
            last_expiry_warning: None,
            pending: Vec::new(),
            license_text: None,
            quiet: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn total_in_use(&self) -> u32 {
        self.total_in_use
    }

    /// Seats in use by agent type.
    pub fn in_use_by_type(&self) -> &BTreeMap<String, u32> {
        &self.in_use_by_type
    }

    /// Slaves with a live session, and slaves in the table.
    /// The slaves with a live session (for the new leader's `new_leader` message).
    pub fn connected_slaves(&self) -> Vec<SlaveId> {
        self.slaves
            .iter()
            .filter(|(_, s)| s.connected)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn slave_counts(&self) -> (u32, u32) {
        let connected = self.slaves.values().filter(|s| s.connected).count();
        (connected as u32, self.slaves.len() as u32)
    }

    pub fn handle(&mut self, now: Instant, event: Event) -> Output {
        let mut out = self.dispatch(now, event);
        out.changes = std::mem::take(&mut self.pending);
        out
    }

    fn dispatch(&mut self, now: Instant, event: Event) -> Output {
        match event {
            Event::Hello {
                slave,
                hello,
                today,
            } => self.hello(now, slave, hello, today),
            Event::Register { slave, request } => self.register(now, slave, request),
            Event::Unregister { slave, request } => self.unregister(now, &slave, request),
            Event::Heartbeat { slave, heartbeat } => self.heartbeat(now, &slave, heartbeat),
            Event::Report { slave, report } => self.report(slave, report),
            Event::Batch { slave, request } => self.batch(now, &slave, request),
            Event::BadMessage {
                subject,
                slave,
                error,
            } => self.bad_message(subject, slave, error),
            Event::Tick { today } => self.tick(now, today),
            Event::Release { request } => self.admin_release(&request),
            Event::Reload { request, today } => self.reload_license(&request, today),
        }
    }

    fn alert(&self, severity: Severity, kind: AlertKind, message: impl Into<String>) -> Alert {
        let mut alert = Alert::new(severity, kind, message);
        alert.source = self.cfg.broker_id.clone();
        alert
    }

    fn counts(&self) -> BTreeMap<String, u32> {
        let mut counts = self.in_use_by_type.clone();
        counts.insert("total".into(), self.total_in_use);
        counts
    }

    fn total_limit(&self) -> u32 {
        self.cfg.license.limits.total.unwrap_or(0)
    }

    // ---- hello -------------------------------------------------------------------------

    fn refuse_hello(&self, slave: &SlaveId, reason: RejectReason, detail: String) -> Output {
        let mut out = Output::reply(Reply::Refused {
            reason,
            detail: detail.clone(),
            last_hello: None,
        });
        out.alert(
            self.alert(
                Severity::Warning,
                AlertKind::SlaveRefused,
                format!("slave {slave} refused: {detail}"),
            )
            .slave(slave.as_str())
            .reason(reason),
        );
        out
    }

    /// Decides whether a slave may connect and on which terms.
    fn admit_slave(
        &self,
        hello: &Hello,
        today: Date,
    ) -> Result<Option<SlaveLicense>, (RejectReason, String)> {
        let unlicensed = || {
            if self.cfg.allow_unlicensed_slaves {
                Ok(None)
            } else {
                Err((
                    RejectReason::UnlicensedNotAllowed,
                    "the slave has no slave license and this master does not allow unlicensed slaves (start the broker with --allow-unlicensed-slaves)".to_owned(),
                ))
            }
        };
        let Some(text) = &hello.license else {
            return unlicensed();
        };
        let license = verify_license(text, "presented by the slave", &self.cfg.vendor_key)
            .map_err(|e| (RejectReason::LicenseInvalid, e.to_string()))?;
        license
            .check_dates(today, "presented by the slave")
            .map_err(|e| (RejectReason::LicenseInvalid, e.to_string()))?;
        if license.context != self.cfg.license.context {
            return Err((
                RejectReason::ContextMismatch,
                format!(
                    "slave license {} is for context '{}' but this master's is '{}'",
                    license.id, license.context, self.cfg.license.context
                ),
            ));
        }
        match license.role {
            Role::Slave => Ok(Some(SlaveLicense {
                id: license.id,
                local_limit: license.limits.local,
            })),
            // A standalone license carries neither flag: such an installation may only
            // join as an unlicensed slave.
            Role::None => unlicensed(),
            Role::Master => Err((
                RejectReason::LicenseRole,
                format!(
                    "license {} is a master license; a slave needs a slave license or none",
                    license.id
                ),
            )),
        }
    }

    fn hello(&mut self, now: Instant, id: SlaveId, hello: Hello, today: Date) -> Output {
        let license = match self.admit_slave(&hello, today) {
            Ok(l) => l,
            Err((reason, detail)) => return self.refuse_hello(&id, reason, detail),
        };
        // A slave license serves one live slave: a second site presenting a copy of it is
        // refused while the first is connected.
        if let Some(l) = &license {
            let holder = self
                .slaves
                .iter()
                .find(|(other, s)| {
                    **other != id && s.connected && s.license.as_ref().is_some_and(|h| h.id == l.id)
                })
                .map(|(other, _)| other.clone());
            if let Some(holder) = holder {
                return self.refuse_hello(
                    &id,
                    RejectReason::LicenseInUse,
                    format!(
                        "slave license {} is in use by slave {holder}, which is connected: a slave license serves one slave at a time",
                        l.id
                    ),
                );
            }
        }
        if !self.slaves.contains_key(&id) && self.slaves.len() >= self.cfg.max_slaves {
            return self.refuse_hello(
                &id,
                RejectReason::TooManySlaves,
                format!(
                    "the master already tracks {} slaves (--max-slaves)",
                    self.slaves.len()
                ),
            );
        }
        let grace = Duration::from_millis(hello.grace_ms);
        if hello.logout_after_grace {
            let needed = Duration::from_millis(hello.request_timeout_ms) + grace / 100;
            if self.cfg.reclaim_margin <= needed {
                return self.refuse_hello(
                    &id,
                    RejectReason::TimingRule,
                    format!(
                        "the master's reclaim margin ({} ms) must exceed the slave's longest request (request timeout plus the longer of its failover and election waits) plus 1% of its grace period ({} ms): raise --reclaim-margin on the broker or lower --request-timeout / --failover-wait / --election-wait on the slave",
                        self.cfg.reclaim_margin.as_millis(),
                        needed.as_millis()
                    ),
                );
            }
        }
        if let Some(known) = self.slaves.get(&id) {
            // Every hello of an instance carries a new, higher number: one at or below the
            // last accepted is a replay (or a retry of a hello that was processed, which
            // the slave sends again under a new number), and must not roll back the seats.
            // A number more than MAX_SEQ_JUMP ahead is refused the same way: accepted, it
            // would leave the genuine slave no number to say hello with.
            if known.instance == hello.instance
                && (hello.seq <= known.hello_seq || hello.seq - known.hello_seq > MAX_SEQ_JUMP)
            {
                let mut out = Output::reply(Reply::Refused {
                    last_hello: Some(known.hello_seq),
                    reason: RejectReason::Replayed,
                    detail: format!(
                        "hello number {} of this instance was already processed (the last was {}): a replayed hello; say hello under a new number",
                        hello.seq, known.hello_seq
                    ),
                });
                let alert = self
                    .alert(
                        Severity::Warning,
                        AlertKind::SlaveRefused,
                        format!(
                            "slave {id}: hello number {} refused as replayed (the last accepted was {}); its seats are untouched",
                            hello.seq, known.hello_seq
                        ),
                    )
                    .slave(id.as_str())
                    .reason(RejectReason::Replayed);
                if let Some(alert) = self.quietly(now, &id, "replayed hello", alert) {
                    out.alert(alert);
                }
                return out;
            }
        }
        let mut out = Output::default();
        let interval = Duration::from_millis(hello.heartbeat_interval_ms.clamp(100, 600_000));
        let rate = self.cfg.slave_rate_limit;
        let slave = self.slaves.entry(id.clone()).or_insert_with(|| Slave {
            instance: hello.instance,
            license: None,
            connected: false,
            last_seen: now,
            heartbeat_interval: interval,
            agents: BTreeMap::new(),
            granted: BTreeMap::new(),
            digest: 0,
            grace,
            logout_after_grace: false,
            hello_seq: 0,
            reclaimed: false,
            revoked: BTreeSet::new(),
            bucket: Bucket::new(now, rate),
            requests: Window::default(),
            master: None,
        });
        let restarted = slave.instance != hello.instance;
        let was_connected = slave.connected && !restarted;
        if restarted {
            // A new process numbers its requests from 1 again.
            slave.requests = Window::default();
        }
        slave.instance = hello.instance;
        slave.license = license;
        slave.connected = true;
        slave.last_seen = now;
        slave.heartbeat_interval = interval;
        slave.grace = grace;
        slave.logout_after_grace = hello.logout_after_grace;
        slave.hello_seq = hello.seq;
        let was_reclaimed = std::mem::take(&mut slave.reclaimed);
        let revoked = std::mem::take(&mut slave.revoked);
        let session = SeatChange::Session {
            slave: id.to_string(),
            instance: slave.instance,
            license: slave.license.as_ref().map(|l| l.id),
            local_limit: slave.license.as_ref().and_then(|l| l.local_limit),
            heartbeat_interval_ms: interval.as_millis() as u64,
            grace_ms: hello.grace_ms,
            logout_after_grace: hello.logout_after_grace,
            hello_seq: hello.seq,
            request_seq: 0,
        };
        self.pending.push(session);

        // Reconcile: the slave's list is what it really holds. Seats it no longer claims
        // are released; claims the master does not hold are granted again if there is
        // room. Either way no agent ends up with two seats. A seat the hello cannot know
        // about is kept: one whose registration was in flight when the hello was built
        // (`pending`), or one granted by a request numbered after it (`request_seq`) by
        // this same instance.
        let claimed: BTreeMap<&str, &AgentClaim> = hello
            .agents
            .iter()
            .map(|c| (c.agent_id.as_str(), c))
            .collect();
        let pending: BTreeSet<&str> = hello.pending.iter().map(String::as_str).collect();
        let accounts_for = |seq: u64| restarted || hello.request_seq.is_none_or(|last| seq <= last);
        let mut stale: Vec<String> = slave
            .agents
            .iter()
            .filter(|(agent, agent_type)| {
                claimed
                    .get(agent.as_str())
                    .is_none_or(|c| &c.agent_type != *agent_type)
                    && !pending.contains(agent.as_str())
                    && accounts_for(slave.granted.get(agent.as_str()).copied().unwrap_or(0))
            })
            .map(|(a, _)| a.clone())
            .collect();
        stale.sort();
        for agent in &stale {
            self.release(&id, agent);
        }
        let mut rejected = Vec::new();
        for claim in &hello.agents {
            if pending.contains(claim.agent_id.as_str()) {
                // Its own registration decides it.
                continue;
            }
            let result = if revoked.contains(&claim.agent_id) {
                Err((
                    RejectReason::ReleasedByAdmin,
                    "an operator released this seat; register the agent again".to_owned(),
                ))
            } else {
                self.try_grant(&id, &claim.agent_id, &claim.agent_type, 0)
                    .map_err(|(reason, detail)| {
                        if was_reclaimed {
                            (
                                RejectReason::Reclaimed,
                                format!("its seat was reclaimed while the slave was silent and there is no room now ({reason}: {detail})"),
                            )
                        } else {
                            (reason, detail)
                        }
                    })
            };
            match result {
                Ok(_) => {}
                Err((reason, detail)) => {
                    out.alert(self.rejection_alert(&id, claim, reason, &detail));
                    rejected.push(RejectedAgent {
                        agent_id: claim.agent_id.clone(),
                        reason,
                    });
                }
            }
        }

        let terms = match self.slaves.get(&id).and_then(|s| s.license.as_ref()) {
            Some(l) => match l.local_limit {
                Some(n) => format!("licensed (license {}, local limit {n})", l.id),
                None => format!("licensed (license {}, no local limit)", l.id),
            },
            None => "unlicensed".to_owned(),
        };
        let held = self.slaves.get(&id).map_or(0, |s| s.agents.len());
        let mut message = if was_connected {
            format!("slave {id} reconciled its seats, {terms}, holding {held} agents")
        } else {
            format!("slave {id} connected, {terms}, holding {held} agents")
        };
        if !stale.is_empty() {
            message.push_str(&format!(
                ", {} seats it no longer claims released",
                stale.len()
            ));
        }
        if restarted {
            message.push_str(" (new process instance)");
        }
        if !rejected.is_empty() {
            message.push_str(&format!(", {} agents refused on reconcile", rejected.len()));
        }
        // A reconcile of a live session that changed nothing is not news.
        if !was_connected || !stale.is_empty() || !rejected.is_empty() {
            out.alert(
                self.alert(Severity::Info, AlertKind::SlaveConnected, message)
                    .slave(id.as_str())
                    .counts(self.counts()),
            );
        }
        out.reply = Some(Answer::Slave(Reply::Welcome(Welcome {
            broker_id: self.cfg.broker_id.clone(),
            master_license: self.cfg.license.id,
            missed_heartbeats: self.cfg.missed_heartbeats,
            rejected_agents: rejected,
        })));
        out
    }

    // ---- seats ---------------------------------------------------------------------------

    /// Checks the limits for one more seat of `agent_type` on `slave`. The slave must be
    /// in the table.
    fn check_admit(&self, slave: &Slave, agent_type: &str) -> Result<(), (RejectReason, String)> {
        let limits = &self.cfg.license.limits;
        if !limits.agent_types.is_empty() && !limits.agent_types.contains_key(agent_type) {
            let known: Vec<&str> = limits.agent_types.keys().map(String::as_str).collect();
            return Err((
                RejectReason::UnknownAgentType,
                format!(
                    "agent type '{agent_type}' is not in the master license (known: {})",
                    known.join(", ")
                ),
            ));
        }
        if let Some(local) = slave.license.as_ref().and_then(|l| l.local_limit) {
            if slave.agents.len() as u64 >= u64::from(local) {
                return Err((
                    RejectReason::LocalLimit,
                    format!("the slave's license allows {local} agents and all are in use"),
                ));
            }
        }
        let cap = self.cfg.max_agents_per_slave;
        if cap > 0 && slave.agents.len() as u64 >= u64::from(cap) {
            return Err((
                RejectReason::SlaveLimit,
                format!(
                    "the master allows one slave {cap} agents (--max-agents-per-slave) and all are in use"
                ),
            ));
        }
        let total = self.total_limit();
        if self.total_in_use >= total {
            return Err((
                RejectReason::AggregateLimit,
                format!("all {total} seats of the master license are in use"),
            ));
        }
        if let Some(&type_limit) = limits.agent_types.get(agent_type) {
            let used = self.in_use_by_type.get(agent_type).copied().unwrap_or(0);
            if used >= type_limit {
                return Err((
                    RejectReason::TypeLimit,
                    format!("all {type_limit} '{agent_type}' seats are in use"),
                ));
            }
        }
        Ok(())
    }

    /// Grants a seat, or reports that the agent already holds it. `Ok(true)` when it was
    /// already held.
    fn try_grant(
        &mut self,
        id: &SlaveId,
        agent: &str,
        agent_type: &str,
        request_seq: u64,
    ) -> Result<bool, (RejectReason, String)> {
        let Some(slave) = self.slaves.get(id) else {
            return Err((
                RejectReason::SlaveNotConnected,
                "the master has no session with this slave: say hello first".to_owned(),
            ));
        };
        match slave.agents.get(agent) {
            Some(held) if held == agent_type => return Ok(true),
            Some(held) => {
                return Err((
                    RejectReason::AgentTypeMismatch,
                    format!(
                        "agent '{agent}' already holds a '{held}' seat on this slave: unregister it first"
                    ),
                ));
            }
            None => {}
        }
        self.check_admit(slave, agent_type)?;
        self.insert_seat(id, agent, agent_type, request_seq);
        self.pending.push(SeatChange::Grant {
            slave: id.to_string(),
            agent_id: agent.to_owned(),
            agent_type: agent_type.to_owned(),
            request_seq,
        });
        Ok(false)
    }

    fn release(&mut self, id: &SlaveId, agent: &str) -> bool {
        let removed = self.remove_seat(id, agent);
        if removed {
            self.pending.push(SeatChange::Release {
                slave: id.to_string(),
                agent_id: agent.to_owned(),
            });
        }
        removed
    }

    /// Puts a seat in the table and the counters, without checks or records.
    fn insert_seat(
        &mut self,
        id: &SlaveId,
        agent: &str,
        agent_type: &str,
        request_seq: u64,
    ) -> bool {
        let Some(slave) = self.slaves.get_mut(id) else {
            return false;
        };
        // Granted again since an operator released it: the slave holds it rightly now.
        slave.revoked.remove(agent);
        slave.granted.insert(agent.to_owned(), request_seq);
        slave.digest ^= agent_hash(agent, agent_type);
        if let Some(old) = slave.agents.insert(agent.to_owned(), agent_type.to_owned()) {
            // Already held (only possible in a replay): keep the counts exact.
            slave.digest ^= agent_hash(agent, &old);
            self.uncount(&old);
        }
        self.total_in_use += 1;
        *self
            .in_use_by_type
            .entry(agent_type.to_owned())
            .or_insert(0) += 1;
        true
    }

    /// Takes a seat out of the table and the counters, without records.
    fn remove_seat(&mut self, id: &SlaveId, agent: &str) -> bool {
        let removed = self.slaves.get_mut(id).and_then(|s| {
            let agent_type = s.agents.remove(agent)?;
            s.granted.remove(agent);
            s.digest ^= agent_hash(agent, &agent_type);
            Some(agent_type)
        });
        match removed {
            Some(agent_type) => {
                self.uncount(&agent_type);
                true
            }
            None => false,
        }
    }

    fn uncount(&mut self, agent_type: &str) {
        self.total_in_use = self.total_in_use.saturating_sub(1);
        if let Some(n) = self.in_use_by_type.get_mut(agent_type) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_use_by_type.remove(agent_type);
            }
        }
    }

    /// `alert` now if no alert of this slave and reason went out within
    /// [`RATE_LIMIT_ALERT_EVERY`] (saying how many more were refused meanwhile), else
    /// `None` and the refusal is counted: however many a site sends, a few alerts.
    fn quietly(
        &mut self,
        now: Instant,
        id: &SlaveId,
        what: &'static str,
        mut alert: Alert,
    ) -> Option<Alert> {
        if !self.quiet.contains_key(&(id.clone(), what))
            && self.quiet.len() >= self.cfg.max_slaves.max(1)
        {
            let oldest = self
                .quiet
                .iter()
                .min_by_key(|(_, q)| q.reported_at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.quiet.remove(&oldest);
            }
        }
        let q = self.quiet.entry((id.clone(), what)).or_insert(Quiet {
            unreported: 0,
            reported_at: None,
        });
        let due = q
            .reported_at
            .is_none_or(|at| now.saturating_duration_since(at) >= RATE_LIMIT_ALERT_EVERY);
        if !due {
            q.unreported += 1;
            return None;
        }
        if q.unreported > 0 {
            alert.message.push_str(&format!(
                " ({} more such refusals of slave {id} since the last alert)",
                q.unreported
            ));
        }
        q.unreported = 0;
        q.reported_at = Some(now);
        Some(alert)
    }

    fn rejection_alert(
        &self,
        slave: &SlaveId,
        claim: &AgentClaim,
        reason: RejectReason,
        detail: &str,
    ) -> Alert {
        self.alert(
            Severity::Warning,
            AlertKind::RegistrationRejected,
            format!(
                "agent {} ({}) on slave {slave} rejected: {reason}: {detail}",
                claim.agent_id, claim.agent_type
            ),
        )
        .slave(slave.as_str())
        .agent(&claim.agent_id, &claim.agent_type)
        .reason(reason)
        .counts(self.counts())
    }

    fn invalid_request(&self, slave: &SlaveId, subject_op: &str, message: String) -> Output {
        let error = WireError {
            code: ErrorCode::Invalid,
            message,
        };
        let mut out = Output::reply(Reply::Error(error.clone()));
        out.alert(
            self.alert(
                Severity::Warning,
                AlertKind::BadMessage,
                format!("invalid {subject_op} from slave {slave}: {}", error.message),
            )
            .slave(slave.as_str()),
        );
        out
    }

    fn register(&mut self, now: Instant, id: SlaveId, request: RegisterRequest) -> Output {
        if let Some(problem) = validate_agent(&request.agent_id, Some(&request.agent_type)) {
            return self.invalid_request(&id, "register", problem);
        }
        let claim = AgentClaim {
            agent_id: request.agent_id,
            agent_type: request.agent_type,
        };
        let rate = self.cfg.slave_rate_limit;
        let mut limited = None;
        let mut replayed = None;
        let connected = match self.slaves.get_mut(&id) {
            Some(slave) if slave.connected => {
                slave.last_seen = now;
                if !slave.requests.accept(request.seq) {
                    // A retry of a request that was granted finds its seat: same answer.
                    // Anything else with a used number is a replay.
                    replayed = Some(slave.agents.get(&claim.agent_id) == Some(&claim.agent_type));
                } else if rate > 0 && !slave.bucket.take(now, rate) {
                    let b = &mut slave.bucket;
                    b.unreported += 1;
                    let due = b.reported_at.is_none_or(|at| {
                        now.saturating_duration_since(at) >= RATE_LIMIT_ALERT_EVERY
                    });
                    if due {
                        b.reported_at = Some(now);
                        limited = Some(std::mem::take(&mut b.unreported));
                    } else {
                        limited = Some(0);
                    }
                }
                true
            }
            _ => false,
        };
        match replayed {
            Some(true) => {
                return Output::reply(Reply::Decision(Decision::Approved { already_held: true }));
            }
            Some(false) => {
                let detail = format!(
                    "request number {} of slave {id} was already processed or is too old: a replayed request",
                    request.seq
                );
                let mut out = Output::reply(Reply::Decision(Decision::Rejected {
                    reason: RejectReason::Replayed,
                    detail: detail.clone(),
                }));
                let alert = self.rejection_alert(&id, &claim, RejectReason::Replayed, &detail);
                if let Some(alert) = self.quietly(now, &id, "replayed request", alert) {
                    out.alert(alert);
                }
                return out;
            }
            None => {}
        }
        if let Some(unreported) = limited {
            // Cheap and quiet: no ledger change, and at most one alert per slave every
            // RATE_LIMIT_ALERT_EVERY, however hard it floods.
            let detail = format!(
                "slave {id} sends more than {rate} registrations per second (--slave-rate-limit)"
            );
            let mut out = Output::reply(Reply::Decision(Decision::Rejected {
                reason: RejectReason::RateLimited,
                detail: detail.clone(),
            }));
            if unreported > 0 {
                out.alert(
                    self.alert(
                        Severity::Warning,
                        AlertKind::RegistrationRejected,
                        format!(
                            "{detail}: {unreported} registrations rejected since the last such alert"
                        ),
                    )
                    .slave(id.as_str())
                    .reason(RejectReason::RateLimited),
                );
            }
            return out;
        }
        let result = if connected {
            self.try_grant(&id, &claim.agent_id, &claim.agent_type, request.seq)
        } else {
            Err((
                RejectReason::SlaveNotConnected,
                "the master has no live session with this slave: say hello first".to_owned(),
            ))
        };
        match result {
            Ok(already_held) => Output::reply(Reply::Decision(Decision::Approved { already_held })),
            Err((reason, detail)) => {
                let mut out = Output::reply(Reply::Decision(Decision::Rejected {
                    reason,
                    detail: detail.clone(),
                }));
                let alert = self.rejection_alert(&id, &claim, reason, &detail);
                // Without a session a slave says hello and asks again: repeats are noise.
                let alert = if reason == RejectReason::SlaveNotConnected {
                    self.quietly(now, &id, "no session", alert)
                } else {
                    Some(alert)
                };
                if let Some(alert) = alert {
                    out.alert(alert);
                }
                out
            }
        }
    }

    fn unregister(&mut self, now: Instant, id: &SlaveId, request: UnregisterRequest) -> Output {
        if let Some(problem) = validate_agent(&request.agent_id, None) {
            return self.invalid_request(id, "unregister", problem);
        }
        let (held_type, fresh) = match self.slaves.get_mut(id) {
            Some(s) => {
                s.last_seen = now;
                (
                    s.agents.get(&request.agent_id).cloned(),
                    s.requests.accept(request.seq),
                )
            }
            None => (None, true),
        };
        // Releasing is always safe, so it is honoured even from a slave marked
        // disconnected; releasing an agent that holds no seat is a no-op. A used number
        // releases nothing: a retry finds the seat already gone, and a replay must not
        // take away a seat the agent has taken again since.
        match held_type {
            Some(agent_type) if !fresh => {
                let claim = AgentClaim {
                    agent_id: request.agent_id.clone(),
                    agent_type,
                };
                let detail = format!(
                    "unregister number {} of slave {id} was already processed or is too old: a replayed request; the seat is kept",
                    request.seq
                );
                let mut out = Output::reply(Reply::Ack);
                let alert = self.rejection_alert(id, &claim, RejectReason::Replayed, &detail);
                if let Some(alert) = self.quietly(now, id, "replayed request", alert) {
                    out.alert(alert);
                }
                return out;
            }
            Some(_) => {
                self.release(id, &request.agent_id);
            }
            None => {}
        }
        Output::reply(Reply::Ack)
    }

    fn heartbeat(&mut self, now: Instant, id: &SlaveId, heartbeat: Heartbeat) -> Output {
        match self.slaves.get_mut(id) {
            Some(slave) if slave.connected && slave.instance == heartbeat.instance => {
                slave.last_seen = now;
                slave.master = heartbeat.master;
                let mut out = Output::reply(Reply::Ack);
                // Continuous reconcile: books that differ (leaving out what is in flight)
                // get a new hello, whose reconcile settles them within this interval.
                // Books taken before a request this master has already processed cannot
                // show it: no comparison then (the next heartbeat's will).
                let current = heartbeat.books.as_ref().filter(|b| {
                    b.request_seq
                        .is_none_or(|seq| slave.requests.highest <= seq)
                });
                if let Some(books) = current {
                    let (count, digest) = slave.books(&books.unsettled);
                    if (count, digest) != (books.count, books.digest) {
                        out.effects.push(Effect::Control {
                            slave: id.clone(),
                            message: ControlMessage::Rehello,
                        });
                    }
                }
                out
            }
            _ => Output::reply(Reply::Refused {
                last_hello: None,
                reason: RejectReason::SlaveNotConnected,
                detail: "the master has no live session with this slave instance: say hello again"
                    .to_owned(),
            }),
        }
    }

    fn report(&mut self, id: SlaveId, report: SlaveReport) -> Output {
        let mut out = Output::default();
        let source = format!("slave:{id}");
        match report.event {
            SlaveEvent::LocalRejection {
                agent_id,
                agent_type,
                reason,
            } => {
                let mut alert = self
                    .alert(
                        Severity::Warning,
                        AlertKind::RegistrationRejected,
                        format!(
                            "agent {agent_id} ({agent_type}) on slave {id} rejected by the slave: {reason}: {}",
                            report.message
                        ),
                    )
                    .slave(id.as_str())
                    .agent(agent_id, agent_type)
                    .reason(reason)
                    .counts(self.counts());
                alert.source = source;
                out.alert(alert);
            }
            SlaveEvent::Restricted {
                lost_for_ms,
                logged_out,
            } => {
                let mut alert = self
                    .alert(
                        Severity::Warning,
                        AlertKind::SlaveRestricted,
                        format!(
                            "slave {id} had no master for {} s, beyond its grace period, and restricted usage ({logged_out} agents logged out)",
                            lost_for_ms / 1000
                        ),
                    )
                    .slave(id.as_str());
                alert.source = source;
                out.alert(alert);
            }
            SlaveEvent::Other => {
                let mut alert = self
                    .alert(
                        Severity::Info,
                        AlertKind::Other,
                        format!("slave {id} reported: {}", report.message),
                    )
                    .slave(id.as_str());
                alert.source = source;
                out.alert(alert);
            }
        }
        out
    }

    /// One output for a batch: its reply is `Reply::Batch` with the items' replies, its
    /// effects and changes are theirs in order (the changes gather in `pending`).
    fn batch(&mut self, now: Instant, slave: &SlaveId, batch: BatchRequest) -> Output {
        let mut out = Output::default();
        let mut replies = Vec::with_capacity(batch.items.len());
        for item in batch.items {
            let one = self.dispatch(now, Event::of_batch_item(slave, item));
            // Every registration and unregistration has a reply; `Ack` keeps the count
            // right should one ever not.
            replies.push(match one.reply {
                Some(Answer::Slave(reply)) => reply,
                _ => Reply::Ack,
            });
            out.effects.extend(one.effects);
        }
        out.reply = Some(Answer::Slave(Reply::Batch(replies)));
        out
    }

    fn bad_message(&mut self, subject: String, slave: Option<SlaveId>, error: WireError) -> Output {
        let mut alert = self.alert(
            Severity::Warning,
            AlertKind::BadMessage,
            format!("bad message on {subject}: {error}"),
        );
        if let Some(slave) = &slave {
            alert = alert.slave(slave.as_str());
        }
        let mut out = Output::reply(Reply::Error(error));
        out.alert(alert);
        out
    }

    fn tick(&mut self, now: Instant, today: Date) -> Output {
        let mut out = Output::default();
        let missed = self.cfg.missed_heartbeats;
        let mut lost = Vec::new();
        for (id, slave) in &mut self.slaves {
            if slave.connected
                && now.saturating_duration_since(slave.last_seen) > slave.silence_limit(missed)
            {
                slave.connected = false;
                lost.push((id.clone(), slave.agents.len(), slave.silence_limit(missed)));
            }
        }
        let margin = self.cfg.reclaim_margin;
        let mut reclaim = Vec::new();
        for (id, slave) in &mut self.slaves {
            let silent = now.saturating_duration_since(slave.last_seen);
            if slave.logout_after_grace && !slave.agents.is_empty() && silent > slave.grace + margin
            {
                slave.connected = false;
                slave.reclaimed = true;
                let agents = slave.take_seats();
                reclaim.push((id.clone(), agents, silent));
            }
        }
        for (id, agents, silent) in reclaim {
            for (_, agent_type) in &agents {
                self.uncount(agent_type);
            }
            self.pending.push(SeatChange::Reclaim {
                slave: id.to_string(),
            });
            out.alert(
                self.alert(
                    Severity::Warning,
                    AlertKind::SeatsReclaimed,
                    format!(
                        "reclaimed {} seats of slave {id}: silent for {} ms, past its grace period plus the {} ms margin (it has logged its agents out by now)",
                        agents.len(),
                        silent.as_millis(),
                        margin.as_millis()
                    ),
                )
                .slave(id.as_str())
                .counts(self.counts()),
            );
        }
        for (id, seats, silence) in lost {
            out.alert(
                self.alert(
                    Severity::Warning,
                    AlertKind::SlaveDisconnected,
                    format!(
                        "slave {id} disconnected: no heartbeat for {} ms ({missed} intervals); its {seats} seats are kept until it reconnects",
                        silence.as_millis()
                    ),
                )
                .slave(id.as_str())
                .counts(self.counts()),
            );
        }
        if self.next_counts_at.is_none_or(|at| now >= at) {
            self.next_counts_at = Some(now + self.cfg.counts_interval);
            let total = self.total_limit();
            let types: Vec<String> = self
                .cfg
                .license
                .limits
                .agent_types
                .iter()
                .map(|(t, limit)| {
                    format!(
                        "{t} {}/{limit}",
                        self.in_use_by_type.get(t).copied().unwrap_or(0)
                    )
                })
                .collect();
            let connected = self.slaves.values().filter(|s| s.connected).count();
            let mut message = format!(
                "license counts: {}/{total} seats in use, {connected} of {} slaves connected",
                self.total_in_use,
                self.slaves.len()
            );
            if !types.is_empty() {
                message.push_str(&format!("; {}", types.join(", ")));
            }
            out.alert(
                self.alert(Severity::Info, AlertKind::LicenseCounts, message)
                    .counts(self.counts()),
            );
        }
        let days_left = self.cfg.license.days_left(today);
        if days_left <= self.cfg.expiry_warning_days && self.last_expiry_warning != Some(today) {
            self.last_expiry_warning = Some(today);
            let severity = if days_left <= 7 {
                Severity::Critical
            } else {
                Severity::Warning
            };
            let message = if days_left < 0 {
                format!(
                    "master license {} expired on {}: renew it and reload",
                    self.cfg.license.id, self.cfg.license.expires
                )
            } else {
                format!(
                    "master license {} expires on {} ({days_left} days left)",
                    self.cfg.license.id, self.cfg.license.expires
                )
            };
            out.alert(self.alert(severity, AlertKind::LicenseExpiringSoon, message));
        }
        out
    }

    /// An operator's new master license (`admin reload-license`, like lmreread): verified
    /// (signature, dates, role master) before anything changes, then in force at once and
    /// recorded in the ledger so every replica uses it. A limit below current use logs
    /// nobody out: new registrations are rejected until usage is below it, and the reply
    /// and the alert say so.
    fn reload_license(&mut self, request: &ReloadRequest, today: Date) -> Output {
        let checked = verify_license(
            &request.license,
            "the reloaded license",
            &self.cfg.vendor_key,
        )
        .and_then(|l| {
            l.check_dates(today, "the reloaded license")?;
            l.require_role(Role::Master, "the reloaded license")?;
            Ok(l)
        });
        let license = match checked {
            Ok(l) => l,
            Err(e) => {
                return Output {
                    reply: Some(Answer::Reload(ReloadReply::Error {
                        message: format!("{e}; the current license stays in force"),
                    })),
                    ..Output::default()
                };
            }
        };
        let old_total = self.total_limit();
        self.cfg.license = license;
        self.license_text = Some(request.license.clone());
        let new_total = self.total_limit();
        let mut over = Vec::new();
        if self.total_in_use > new_total {
            over.push(format!(
                "{} seats in use, total limit {new_total}",
                self.total_in_use
            ));
        }
        for (agent_type, limit) in &self.cfg.license.limits.agent_types {
            let used = self.in_use_by_type.get(agent_type).copied().unwrap_or(0);
            if used > *limit {
                over.push(format!("{used} '{agent_type}' seats in use, limit {limit}"));
            }
        }
        let who = if request.operator.is_empty() {
            "an operator"
        } else {
            request.operator.as_str()
        };
        let mut message = format!(
            "license {} for {} is in force (total limit {old_total} -> {new_total})",
            self.cfg.license.id, self.cfg.license.customer
        );
        if !over.is_empty() {
            message.push_str(&format!(
                "; usage is above the new limits ({}): nobody is logged out, new registrations are rejected until usage falls below them",
                over.join("; ")
            ));
        }
        let alert = self
            .alert(
                if over.is_empty() {
                    Severity::Info
                } else {
                    Severity::Warning
                },
                AlertKind::LicenseReloaded,
                format!("{who} reloaded the master license: {message}"),
            )
            .counts(self.counts());
        self.pending.push(SeatChange::License {
            text: request.license.clone(),
        });
        Output {
            reply: Some(Answer::Reload(ReloadReply::Reloaded { message })),
            effects: vec![Effect::Alert(alert)],
            changes: Vec::new(),
        }
    }

    /// An operator force-releases one agent's seat or all seats of a slave. The slave is
    /// told to log the agents out; if it misses that (it is offline), its next hello is
    /// refused those agents, so it cannot silently take them back.
    fn admin_release(&mut self, request: &ReleaseRequest) -> Output {
        let error = |message: String| Output {
            reply: Some(Answer::Release(ReleaseReply::Error { message })),
            ..Output::default()
        };
        let Ok(id) = SlaveId::new(request.slave_id.clone()) else {
            return error(format!("{:?} is not a valid slave id", request.slave_id));
        };
        let Some(slave) = self.slaves.get(&id) else {
            return error(format!("the master knows no slave {id}"));
        };
        let targets: Vec<(String, String)> = match &request.agent_id {
            Some(agent) => match slave.agents.get(agent) {
                Some(t) => vec![(agent.clone(), t.clone())],
                None => return error(format!("agent {agent} holds no seat on slave {id}")),
            },
            None => slave
                .agents
                .iter()
                .map(|(a, t)| (a.clone(), t.clone()))
                .collect(),
        };
        for (agent, _) in &targets {
            self.release(&id, agent);
        }
        if let Some(slave) = self.slaves.get_mut(&id) {
            slave.revoked.extend(targets.iter().map(|(a, _)| a.clone()));
        }
        let agents: Vec<String> = targets.into_iter().map(|(a, _)| a).collect();
        self.pending.push(SeatChange::Revoke {
            slave: id.to_string(),
            agents: agents.clone(),
        });
        let who = if request.operator.is_empty() {
            "an operator"
        } else {
            request.operator.as_str()
        };
        let alert = self
            .alert(
                Severity::Warning,
                AlertKind::SeatsReleased,
                format!(
                    "{who} released {} seats of slave {id}: {}",
                    agents.len(),
                    agents.join(", ")
                ),
            )
            .slave(id.as_str())
            .counts(self.counts());
        let logout = ControlMessage::LogOut {
            agents: agents
                .iter()
                .map(|a| RejectedAgent {
                    agent_id: a.clone(),
                    reason: RejectReason::ReleasedByAdmin,
                })
                .collect(),
        };
        let effects = vec![
            Effect::Control {
                slave: id,
                message: logout,
            },
            Effect::Alert(alert),
        ];
        Output {
            reply: Some(Answer::Release(ReleaseReply::Released { agents })),
            effects,
            changes: Vec::new(),
        }
    }

    // ---- the ledger ------------------------------------------------------------------------

    /// Applies one ledger record written by a leader (possibly another replica), the way
    /// that leader's engine changed its own state. Limits are not checked again: the
    /// ledger is the truth. A standby does this for every record to stay hot; a new leader
    /// does it up to the end of the ledger before it answers anyone.
    ///
    /// `Err` names a record that does not fit the state (a grant for a slave with no
    /// session, a record from a newer build); the caller must stop replaying.
    pub fn apply(&mut self, now: Instant, change: &SeatChange) -> Result<(), String> {
        let slave_id = |s: &str| SlaveId::new(s.to_owned()).map_err(|e| e.to_string());
        match change {
            SeatChange::Session {
                slave,
                instance,
                license,
                local_limit,
                heartbeat_interval_ms,
                grace_ms,
                logout_after_grace,
                hello_seq,
                request_seq,
            } => {
                let id = slave_id(slave)?;
                let entry = self.slaves.entry(id).or_insert_with(|| Slave {
                    instance: *instance,
                    license: None,
                    connected: true,
                    last_seen: now,
                    heartbeat_interval: Duration::from_millis(*heartbeat_interval_ms),
                    agents: BTreeMap::new(),
                    granted: BTreeMap::new(),
                    digest: 0,
                    grace: Duration::ZERO,
                    logout_after_grace: false,
                    hello_seq: 0,
                    reclaimed: false,
                    revoked: BTreeSet::new(),
                    bucket: Bucket::new(now, self.cfg.slave_rate_limit),
                    requests: Window::default(),
                    master: None,
                });
                if entry.instance != *instance {
                    entry.requests = Window::default();
                }
                entry.requests.restore(*request_seq);
                entry.instance = *instance;
                entry.license = license.map(|id| SlaveLicense {
                    id,
                    local_limit: *local_limit,
                });
                entry.connected = true;
                entry.last_seen = now;
                entry.heartbeat_interval = Duration::from_millis(*heartbeat_interval_ms);
                entry.grace = Duration::from_millis(*grace_ms);
                entry.logout_after_grace = *logout_after_grace;
                entry.hello_seq = *hello_seq;
                entry.reclaimed = false;
                entry.revoked.clear();
            }
            SeatChange::Grant {
                slave,
                agent_id,
                agent_type,
                request_seq,
            } => {
                let id = slave_id(slave)?;
                if !self.insert_seat(&id, agent_id, agent_type, *request_seq) {
                    return Err(format!(
                        "grant of {agent_id} for slave {slave}, which has no session"
                    ));
                }
                if let Some(s) = self.slaves.get_mut(&id) {
                    s.requests.restore(*request_seq);
                }
            }
            SeatChange::Seats {
                slave,
                agent_type,
                agent_ids,
                request_seqs,
            } => {
                let id = slave_id(slave)?;
                for (i, agent_id) in agent_ids.iter().enumerate() {
                    let seq = request_seqs.get(i).copied().unwrap_or(0);
                    if !self.insert_seat(&id, agent_id, agent_type, seq) {
                        return Err(format!("seats for slave {slave}, which has no session"));
                    }
                }
            }
            SeatChange::Release { slave, agent_id } => {
                self.remove_seat(&slave_id(slave)?, agent_id);
            }
            SeatChange::Reclaim { slave } => {
                let id = slave_id(slave)?;
                let drained: Vec<String> = match self.slaves.get_mut(&id) {
                    Some(s) => {
                        s.connected = false;
                        s.reclaimed = true;
                        s.take_seats().into_iter().map(|(_, t)| t).collect()
                    }
                    None => Vec::new(),
                };
                for agent_type in &drained {
                    self.uncount(agent_type);
                }
            }
            SeatChange::Revoke { slave, agents } => {
                let id = slave_id(slave)?;
                for agent in agents {
                    self.remove_seat(&id, agent);
                }
                if let Some(s) = self.slaves.get_mut(&id) {
                    s.revoked.extend(agents.iter().cloned());
                }
            }
            SeatChange::License { text } => {
                let license = verify_license(
                    text,
                    "the master license in the ledger",
                    &self.cfg.vendor_key,
                )
                .map_err(|e| e.to_string())?;
                self.cfg.license = license;
                self.license_text = Some(text.clone());
            }
            SeatChange::Leader { .. } => {}
            SeatChange::Unknown => {
                return Err("a ledger record this build does not know (written by a newer broker): upgrade this replica".to_owned());
            }
        }
        Ok(())
    }

    /// The seat state as changes that rebuild it when applied in order to an empty engine
    /// (what a snapshot stores): per slave its `Session`, a `Reclaim` if its seats were
    /// reclaimed, `Revoke`s of the agents an operator released that it may not claim back,
    /// and its seats as `Seats` changes, at most `per_change` agents per change. Connection
    /// state and silence clocks are not included: like a replay, they start fresh.
    pub fn snapshot(&self, per_change: usize) -> Vec<SeatChange> {
        let per_change = per_change.max(1);
        let mut changes = Vec::with_capacity(self.slaves.len() * 2);
        if let Some(text) = &self.license_text {
            changes.push(SeatChange::License { text: text.clone() });
        }
        for (id, s) in &self.slaves {
            let slave = id.to_string();
            changes.push(SeatChange::Session {
                slave: slave.clone(),
                instance: s.instance,
                license: s.license.as_ref().map(|l| l.id),
                local_limit: s.license.as_ref().and_then(|l| l.local_limit),
                heartbeat_interval_ms: s.heartbeat_interval.as_millis() as u64,
                grace_ms: s.grace.as_millis() as u64,
                logout_after_grace: s.logout_after_grace,
                hello_seq: s.hello_seq,
                request_seq: s.requests.highest,
            });
            if s.reclaimed {
                changes.push(SeatChange::Reclaim {
                    slave: slave.clone(),
                });
            }
            // Revoked agents hold no seat (a new grant takes an agent out of the set).
            let revoked: Vec<String> = s.revoked.iter().cloned().collect();
            for part in revoked.chunks(per_change) {
                changes.push(SeatChange::Revoke {
                    slave: slave.clone(),
                    agents: part.to_vec(),
                });
            }
            let mut by_type: BTreeMap<&str, Vec<(String, u64)>> = BTreeMap::new();
            for (agent, agent_type) in &s.agents {
                let seq = s.granted.get(agent).copied().unwrap_or(0);
                by_type
                    .entry(agent_type.as_str())
                    .or_default()
                    .push((agent.clone(), seq));
            }
            for (agent_type, mut agents) in by_type {
                agents.sort();
                for part in agents.chunks(per_change) {
                    changes.push(SeatChange::Seats {
                        slave: slave.clone(),
                        agent_type: agent_type.to_owned(),
                        agent_ids: part.iter().map(|(a, _)| a.clone()).collect(),
                        request_seqs: part.iter().map(|(_, q)| *q).collect(),
                    });
                }
            }
        }
        changes
    }

    /// Called when this replica becomes leader: every slave's silence is counted from now,
    /// since a standby saw no heartbeats. This only delays disconnect alerts and reclaims,
    /// never brings them forward, so the timing rule still holds.
    pub fn restart_silence_clocks(&mut self, now: Instant) {
        for slave in self.slaves.values_mut() {
            slave.last_seen = now;
            // What a replay of the ledger gives: a slave with a session is connected until
            // its seats are reclaimed. A replica that led before (and marked slaves
            // disconnected on its own clock, perhaps while it was paused) starts its new
            // term from that, not from what it believed then.
            slave.connected = !slave.reclaimed;
        }
    }

    /// Seats per slave (agent id → type), for comparing replicas in tests and checks.
    pub fn seats(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.slaves
            .iter()
            .map(|(id, s)| {
                (
                    id.to_string(),
                    s.agents
                        .iter()
                        .map(|(a, t)| (a.clone(), t.clone()))
                        .collect(),
                )
            })
            .collect()
    }

    /// The License Monitor view of the current state.
    pub fn status(&self, now: Instant) -> StatusReply {
        let license = &self.cfg.license;
        let (slaves_connected, slaves_total) = self.slave_counts();
        // Disconnected slaves first (what an operator looks for), then by id; at most
        // STATUS_MAX_SLAVES.
        let listed = self
            .slaves
            .iter()
            .filter(|(_, s)| !s.connected)
            .chain(self.slaves.iter().filter(|(_, s)| s.connected))
            .take(lmbus_schemas::STATUS_MAX_SLAVES);
        StatusReply {
            slaves_total,
            slaves_connected,
            broker_id: self.cfg.broker_id.clone(),
            cluster: self.cfg.cluster.clone(),
            license: LicenseSummary {
                id: license.id,
                customer: license.customer.clone(),
                context: license.context.to_string(),
                expires: license.expires.to_string(),
            },
            allow_unlicensed_slaves: self.cfg.allow_unlicensed_slaves,
            total_limit: self.total_limit(),
            type_limits: license.limits.agent_types.clone(),
            total_in_use: self.total_in_use,
            in_use_by_type: self.in_use_by_type.clone(),
            slaves: listed
                .map(|(id, s)| SlaveStatus {
                    slave_id: id.to_string(),
                    connected: s.connected,
                    license: s.license.as_ref().map(|l| l.id),
                    local_limit: s.license.as_ref().and_then(|l| l.local_limit),
                    in_use: s.agents.len() as u32,
                    in_use_by_type: s.by_type(),
                    last_seen_ms_ago: now.saturating_duration_since(s.last_seen).as_millis() as u64,
                    master: s.master,
                })
                .collect(),
            leader_term: 0,
            ledger_sequence: 0,
            replicas: Vec::new(),
        }
    }
}

/// Checks an agent id (and type) from the network; `Some(problem)` when unusable.
fn validate_agent(agent_id: &str, agent_type: Option<&str>) -> Option<String> {
    if agent_id.is_empty() || agent_id.len() > MAX_AGENT_ID_LEN {
        return Some(format!(
            "agent id must be 1 to {MAX_AGENT_ID_LEN} bytes, got {}",
            agent_id.len()
        ));
    }
    if agent_id.chars().any(char::is_control) {
        return Some("agent id contains control characters".to_owned());
    }
    if let Some(t) = agent_type {
        let ok = !t.is_empty()
            && t.len() <= 64
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Some(format!(
                "agent type {t:?} must be 1 to 64 characters from A-Z, a-z, 0-9, '-' and '_'"
            ));
        }
    }
    None
}
