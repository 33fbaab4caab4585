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
//!
//! This file holds the types and [`Engine::handle`]; the rules are in one file per family:
//! `hello` (admission and reconcile), `seats` (limits, grants, registrations and batches),
//! `liveness` (heartbeats and the tick: silence, reclaim, counts, expiry), `moves` (the
//! clocks of capacity moving through blocks, for the metrics), `farewell` (a
//! slave's goodbye, forgetting silent slaves, `admin forget-slave`), `admin` (an
//! operator's release and license reload), `reports` (what only raises an alert),
//! `refusals` (invalid requests, quiet repeated refusals), `replay` (applying the ledger,
//! snapshots) and `status` (views), all methods of [`Engine`]; `guards` holds the plain
//! types and checks they share (rate limit, replay window, the agent id and type check) and
//! imports nothing from the engine. The tests are split the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lmbus_schemas::{
    Alert, AlertKind, BatchRequest, ControlMessage, ForgetReply, ForgetRequest, Goodbye, Heartbeat,
    Hello, License, RegisterRequest, ReleaseReply, ReleaseRequest, ReloadReply, ReloadRequest,
    Reply, SeatChange, Severity, SlaveId, SlaveReport, UnregisterRequest, VerifyingKey, WireError,
    agent_hash,
};
use time::Date;
use uuid::Uuid;

mod admin;
mod allot;
mod backup;
mod demand;
mod farewell;
mod guards;
mod hello;
mod liveness;
mod moves;
mod offline;
mod refusals;
mod replay;
mod reports;
mod seats;
mod status;
#[cfg(test)]
mod tests;

pub use allot::{ALLOT_MIN_BLOCK, AllotConfig, AllotCounts, SlaveSeats, TopSlaveSeats};
use guards::{Bucket, Quiet, ReplayWindow};
pub use guards::{MAX_AGENT_ID_LEN, MAX_SEQ_JUMP, RATE_LIMIT_ALERT_EVERY, REPLAY_WINDOW};
pub use moves::MAX_UNTAKEN_MOVES;
pub use offline::{DAY_MS, SYNC_WARN_DAYS};
pub use replay::ReplayError;

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
    /// Strict or allotment admission, and the allotments' lease and refresh interval.
    pub allot: AllotConfig,
    /// A slave silent this long, holding no seats and no blocks, is forgotten (removed
    /// from the table, recorded). Counted from its last message, or from the start of the
    /// current leader's term, whichever is later. Zero: never.
    pub forget_after: Duration,
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
    /// Allotment mode: a slave's journal of local decisions and the blocks it wants.
    Allot {
        slave: SlaveId,
        request: lmbus_schemas::AllotRequest,
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
    /// A slave process stops (its goodbye).
    Goodbye {
        slave: SlaveId,
        goodbye: Goodbye,
    },
    /// An operator's `admin forget-slave`.
    Forget {
        request: ForgetRequest,
    },
    /// A vendor sync succeeded at `at_ms` (Unix milliseconds): the runtime verified the
    /// vendor's answer. The offline limit counts from there (`offline`).
    Synced {
        at_ms: u64,
        sync: Uuid,
    },
    /// The leader exported an air-gapped sync request (`admin sync export`).
    SyncExported {
        sync: Uuid,
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
    /// To an operator's `admin forget-slave`.
    Forget(ForgetReply),
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

/// How a seat was granted, as its ledger record says (so every replica agrees).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Granted {
    /// The `seq` of the registration that took it (0: a grant at a hello, from a block, or
    /// unknown).
    request_seq: u64,
    /// The granting leader's wall clock, Unix milliseconds (0: unknown).
    since_ms: u64,
    /// The replica that granted it (empty: unknown).
    by: String,
}

/// What the master accepted from a slave's hello.
#[derive(Debug, Clone)]
struct SlaveLicense {
    id: Uuid,
    local_limit: Option<u32>,
    /// The slave license's own offline limit (`sync_within_days`), if it has one.
    offline_limit: Option<lmbus_schemas::OfflineLimit>,
}

/// How many released agents a slave's session remembers for its next hello
/// (`Slave::released`); beyond it the oldest are forgotten (a stale hello may then re-grant
/// one, an over-count the next heartbeat corrects).
const RELEASED_MEMORY: usize = 4096;

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
    /// Agent id → how its seat was granted: the request number (for the hello reconcile,
    /// `Hello::request_seq`), when and by which replica (for `admin seats`).
    granted: BTreeMap<String, Granted>,
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
    /// Agents an unregistration released, by its request number, until a hello or a
    /// heartbeat's books account for that number: a hello built before the release still
    /// claims the agent, and must not grant it again (the host gave it back). A hello skips
    /// such a claim once, then forgets it (unregistrations name no instance: one from an
    /// earlier process must not keep a claim out for good). Not in the ledger, and cleared
    /// when a term begins: a new leader re-grants such a claim, which over-counts until the
    /// slave's next heartbeat books ask for a hello. At most [`RELEASED_MEMORY`] entries.
    released: BTreeMap<String, u64>,
    /// Its registration rate (not in the ledger: a new leader starts it full).
    bucket: Bucket,
    /// The request numbers of this instance already processed (replay protection).
    requests: ReplayWindow,
    /// What this master is to the slave, from its last heartbeat (not in the ledger: a new
    /// leader learns it from the next one).
    master: Option<lmbus_schemas::MasterUse>,
    /// Allotment mode: free seats allotted to the slave per agent type (counted against
    /// the limits like held seats), the last journal entry applied and the last allot
    /// request number processed (all in the ledger's `Allotment` records).
    blocks: BTreeMap<String, u32>,
    journal: u64,
    allot_seq: u64,
    /// Allotment mode: the blocks it asked for in its last allot request, its demand for
    /// fair shares (not in the ledger: a new leader learns it at the next request, within
    /// one refresh interval, and takes the blocks meanwhile).
    wants: BTreeMap<String, u32>,
    /// Its demand over all types and the seats its blocks hold, kept with `blocks` and
    /// `wants` (`set_block`, `set_wants`) for the demand book.
    demand_total: u64,
    held_total: u64,
    /// When it was told to give (part of) its blocks back (`ReturnAllotment`,
    /// `ShrinkAllotment`), if it has sent no allot request since.
    asked_to_return: Option<Instant>,
    /// This leader heard from it (a hello, heartbeat or registration) since its term
    /// began (not in the ledger). A slave with no seats that a new leader never heard from
    /// goes quiet without a second `slave_disconnected`.
    heard: bool,
}

impl Slave {
    /// `agent` was released by the unregistration numbered `seq` (see `released`).
    fn remember_release(&mut self, agent: &str, seq: u64) {
        if self.released.len() >= RELEASED_MEMORY
            && !self.released.contains_key(agent)
            && let Some(oldest) = self
                .released
                .iter()
                .min_by_key(|(_, n)| **n)
                .map(|(a, _)| a.clone())
        {
            self.released.remove(&oldest);
        }
        self.released.insert(agent.to_owned(), seq);
    }

    /// A slave first heard of now (at its hello, or in a replayed `Session` record), with no
    /// seats and not yet connected; the caller sets the rest from the hello or the record.
    fn new(
        instance: Uuid,
        now: Instant,
        heartbeat_interval: Duration,
        grace: Duration,
        rate: u32,
    ) -> Self {
        Slave {
            instance,
            license: None,
            connected: false,
            last_seen: now,
            heartbeat_interval,
            agents: BTreeMap::new(),
            granted: BTreeMap::new(),
            digest: 0,
            grace,
            logout_after_grace: false,
            hello_seq: 0,
            reclaimed: false,
            revoked: BTreeSet::new(),
            released: BTreeMap::new(),
            bucket: Bucket::new(now, rate),
            requests: ReplayWindow::default(),
            master: None,
            blocks: BTreeMap::new(),
            journal: 0,
            allot_seq: 0,
            wants: BTreeMap::new(),
            demand_total: 0,
            held_total: 0,
            asked_to_return: None,
            heard: false,
        }
    }

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
    /// Free seats in slaves' blocks (allotment mode), in total and per type: counted
    /// against the limits with the seats in use.
    allotted_total: u32,
    /// Allotment mode: every slave's demand for free seats per agent type and in total
    /// (what it last asked for, or its block if more), and the slaves by the seats their
    /// blocks hold, kept with each change of a block or a demand, so that sizing an allot
    /// answer needs no pass over the slaves (`demand.rs`).
    demand: demand::DemandBook,
    holders: demand::Holders,
    allotted_by_type: BTreeMap<String, u32>,
    next_counts_at: Option<Instant>,
    /// The most seats in use per type and `total` since the last `license_counts` alert
    /// (when that was): the alert's `peaks`. `None` until this engine raised one.
    peaks: Option<(Instant, BTreeMap<String, u32>)>,
    last_expiry_warning: Option<Date>,
    /// Seat changes made by the event being handled, moved into its [`Output`].
    pending: Vec<SeatChange>,
    /// The signed text of a license reloaded by an operator (`None`: the one the replica
    /// started with), for snapshots.
    license_text: Option<String>,
    /// The wall clock (Unix milliseconds) of the event being handled, set by the runtime
    /// before it hands the engine an event (`set_wall_clock`). It is written into the
    /// grants recorded (the seat's "since") and decides one thing: whether the offline
    /// limit has passed (`offline`), against times from the ledger and the license, never
    /// against another machine's clock.
    wall_ms: u64,
    /// A backup master: what it last heard of the production cluster's leader, when that
    /// leader is alive (set by the runtime before every event, like the wall clock); while
    /// it is, the backup admits no slave and grants no seat (`backup`).
    production_alive: Option<(lmbus_schemas::RejectReason, String)>,
    /// A backup master: production has been available for the whole handback window, so
    /// the next tick releases every seat this backup holds (`backup::handback`).
    handback_due: bool,
    /// A wall time known to have passed (Unix milliseconds) and the monotonic instant it
    /// was known at: the latest time in a record applied or a clock reading handled, or the
    /// latest vendor sync (which resets it, so an accidental jump ahead heals at the next
    /// sync). The wall clock of an event is never earlier than this plus the monotonic
    /// time since: a clock set back gains the offline limit nothing while a replica runs,
    /// and after a restart it starts from the ledger's latest time.
    wall_floor: Option<(u64, Instant)>,
    /// The time of the last `Clock` record written or applied (Unix milliseconds).
    last_clock_mark: u64,
    /// The latest vendor sync in the ledger (`Synced`, Unix milliseconds; 0: none).
    last_sync_ms: u64,
    /// The last offline-limit warning given: its deadline and stage (`SyncWarned`).
    sync_warned: Option<(u64, u32)>,
    /// The installation's identity (`Installation`), once the first leader drew it.
    installation: Option<Uuid>,
    /// The installation's key seed (base64), once a leader recorded one.
    installation_key: Option<String>,
    /// Air-gapped sync requests exported and not yet answered (`SyncExported`), oldest
    /// first, at most [`offline::MAX_EXPORTED`] (the oldest is dropped).
    exported: std::collections::VecDeque<Uuid>,
    /// Refusals that say nothing new when repeated (replayed numbers, requests without a
    /// session), counted per slave and reason so that each is alerted at most once every
    /// [`RATE_LIMIT_ALERT_EVERY`]. Bounded: at most `max_slaves` entries, the oldest
    /// forgotten first (not in the ledger: a new leader starts it empty).
    quiet: BTreeMap<(SlaveId, &'static str), Quiet>,
    /// What allotment mode did while this engine decided (not in the ledger: counted by
    /// the leader for its metrics; replaying the ledger counts nothing).
    allot_counts: allot::AllotCounts,
    /// Clocks of capacity moving through blocks to a slave that needed it, and the times
    /// observed (`moves`; not in the ledger: a new leader starts none it did not see).
    moves: moves::Moves,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            slaves: BTreeMap::new(),
            total_in_use: 0,
            in_use_by_type: BTreeMap::new(),
            allotted_total: 0,
            allotted_by_type: BTreeMap::new(),
            demand: demand::DemandBook::default(),
            holders: demand::Holders::default(),
            next_counts_at: None,
            peaks: None,
            last_expiry_warning: None,
            pending: Vec::new(),
            license_text: None,
            wall_ms: 0,
            production_alive: None,
            handback_due: false,
            wall_floor: None,
            last_clock_mark: 0,
            last_sync_ms: 0,
            sync_warned: None,
            exported: std::collections::VecDeque::new(),
            installation: None,
            installation_key: None,
            quiet: BTreeMap::new(),
            allot_counts: allot::AllotCounts::default(),
            moves: moves::Moves::default(),
        }
    }

    /// The wall clock (Unix milliseconds) the next events happen at: recorded in the grants
    /// they make (when a seat was taken), and compared with the offline limit's deadline.
    pub fn set_wall_clock(&mut self, unix_ms: u64) {
        self.wall_ms = unix_ms;
    }

    /// The wall time known to have passed by `now` (0: none known).
    fn floor_at(&self, now: Instant) -> u64 {
        self.wall_floor.map_or(0, |(ms, at)| {
            let since = now.saturating_duration_since(at).as_millis();
            ms.saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
        })
    }

    /// A record says `ms` had passed (when it was written): the floor rises to it.
    fn wall_passed(&mut self, ms: u64, now: Instant) {
        if ms > self.floor_at(now) {
            self.wall_floor = Some((ms, now));
        }
    }

    /// How a seat granted now is recorded: the current wall clock and this replica.
    fn granted_now(&self, request_seq: u64) -> Granted {
        Granted {
            request_seq,
            since_ms: self.wall_ms,
            by: self.cfg.broker_id.clone(),
        }
    }

    /// The signed text of the master license the ledger holds in force (`None`: no
    /// `License` record yet; the replica runs the license it started with).
    pub fn license_text(&self) -> Option<&str> {
        self.license_text.as_deref()
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
        if self.wall_ms > 0 {
            self.wall_ms = self.wall_ms.max(self.floor_at(now));
            self.wall_floor = Some((self.wall_ms, now));
        }
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
            Event::Allot { slave, request } => self.allot(now, &slave, request),
            Event::Release { request } => self.admin_release(&request),
            Event::Reload { request, today } => self.reload_license(&request, today),
            Event::Goodbye { slave, goodbye } => self.goodbye(&slave, goodbye),
            Event::Forget { request } => self.admin_forget(now, &request),
            Event::Synced { at_ms, sync } => self.synced(now, at_ms, sync),
            Event::SyncExported { sync } => {
                self.apply_sync_exported(sync);
                self.pending.push(SeatChange::SyncExported { sync });
                Output::default()
            }
        }
    }

    fn alert(&self, severity: Severity, kind: AlertKind, message: impl Into<String>) -> Alert {
        let mut alert = Alert::new(severity, kind, message).in_context(self.cfg.license.context);
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
}
