//! [`SlaveAgent`]: the slave side of master/slave licensing, as a handle a host
//! application holds.
//!
//! The registration flow is CallGem's: check the local limit first (no network call when it
//! is reached), then ask the master; a rejected agent is logged out (the host learns it from
//! the returned [`Outcome`] and from [`AgentEvent::LoggedOut`]) and an alert goes out (the
//! master raises it for its own rejections; the slave reports its local ones).
//!
//! A slave may name a second master (a secondary, usually another site with its own NATS and
//! cluster name). It starts on the primary and fails over to the secondary when the primary
//! does not answer (NATS says "no responders" at once when no broker listens; a broker that
//! is alive but stuck is caught by the request timeout) or answers slower than
//! `switch_delay`. While on the secondary it keeps probing the primary and returns to it by
//! policy. With overflow enabled, a capacity rejection by the primary is retried on the
//! secondary. Each seat remembers which master granted it; releases and heartbeats go
//! there.
//!
//! One background task heartbeats every master it holds seats with, says hello again
//! whenever a master has lost the session, runs the grace-period timer, and obeys control
//! messages (a forced logout, say).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use lmbus_schemas::{
    AgentClaim, Books, ControlMessage, Decision, Heartbeat, Hello, License, MasterRole, MasterUse,
    RegisterRequest, RejectReason, RejectedAgent, Reply, Role, SlaveEvent, SlaveId, SlaveOp,
    SlaveReport, UnregisterRequest, Welcome, agent_digest, decode, verify_license,
};

pub use crate::config::{
    DEFAULT_ELECTION_WAIT, DEFAULT_FAILOVER_WAIT, GracePolicy, LicenseFile, MasterEndpoint,
    Restriction, ReturnPolicy, SlaveConfig,
};
pub use crate::error::SlaveError;
pub use crate::events::{AgentEvent, LoggedOut, Outcome};
use crate::link::{Ask, Link, Links};
use crate::master::{Master, PerMaster};
use crate::policy::{Answered, Policy, RETRY_BACKOFF, Switch};
pub use crate::status::{MasterView, SlaveMode, SlaveStatusView};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// How many recent logouts `status()` remembers.
const LOGGED_OUT_HISTORY: usize = 100;
/// Capacity of the event channel; a subscriber that lags this far behind misses events
/// (and is told so by `broadcast::error::RecvError::Lagged`).
const EVENT_CAPACITY: usize = 1024;

/// One seat held by an agent of this slave.
#[derive(Debug, Clone)]
struct Seat {
    agent_type: String,
    /// The master that granted it; its release goes there.
    link: Master,
}

/// What the slave knows about one master.
#[derive(Debug, Default, Clone)]
struct LinkState {
    connected: bool,
    broker_id: Option<String>,
}

#[derive(Debug)]
struct State {
    agents: BTreeMap<String, Seat>,
    /// Registrations sent to a master and not yet answered: they count against the local
    /// limit so concurrent requests cannot overshoot it.
    pending: u32,
    /// Agents with a registration in flight (how many): a hello lists them as pending, so
    /// the master keeps a seat it granted them whose answer is on its way.
    registering: BTreeMap<String, u32>,
    /// Agents with an unregistration in flight: with `registering`, what a heartbeat's
    /// books leave out, since the master may or may not have decided them yet.
    unregistering: BTreeMap<String, u32>,
    /// What the slave knows about each master (the secondary's stays disconnected when
    /// none is configured).
    links: PerMaster<LinkState>,
    /// Where new registrations go.
    active: Master,
    logged_out: VecDeque<LoggedOut>,
    last_error: Option<String>,
    /// When the last request that any master answered was sent. The grace period runs
    /// from here (from the start if no master ever answered).
    last_contact: tokio::time::Instant,
    /// Set when the grace period ran out: since when, and how many agents were logged out.
    restricted: Option<(tokio::time::Instant, u32)>,
    /// The primary answered slower than `switch_delay` since the last failover decision.
    primary_slow: bool,
}

/// A registration (counted in `pending` and `registering`) or an unregistration (in
/// `unregistering`) in flight, taken off those books exactly once: by `settle`, or on drop
/// when the caller's future is dropped before the answer.
struct InFlight<'a> {
    state: &'a Mutex<State>,
    agent: &'a str,
    registering: bool,
    settled: bool,
}

impl InFlight<'_> {
    fn undo(&self, state: &mut State) {
        if self.registering {
            state.pending = state.pending.saturating_sub(1);
            unmark(&mut state.registering, self.agent);
        } else {
            unmark(&mut state.unregistering, self.agent);
        }
    }

    /// Takes it off the books under a lock the caller already holds.
    fn settle(mut self, state: &mut State) {
        self.undo(state);
        self.settled = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.undo(&mut lock(self.state));
        }
    }
}

fn mark(set: &mut BTreeMap<String, u32>, agent: &str) {
    *set.entry(agent.to_owned()).or_insert(0) += 1;
}

fn unmark(set: &mut BTreeMap<String, u32>, agent: &str) {
    if let Some(n) = set.get_mut(agent) {
        *n -= 1;
        if *n == 0 {
            set.remove(agent);
        }
    }
}

impl State {
    /// This slave's books for `link`'s master, as a heartbeat carries them: the agents it
    /// granted, without those with a request in flight (listed as unsettled).
    fn books(&self, link: Master) -> Books {
        let unsettled: Vec<String> = self
            .registering
            .keys()
            .chain(self.unregistering.keys())
            .cloned()
            .collect();
        let settled = self.agents.iter().filter(|(agent, seat)| {
            seat.link == link
                && !self.registering.contains_key(agent.as_str())
                && !self.unregistering.contains_key(agent.as_str())
        });
        let mut count = 0;
        let digest = agent_digest(settled.map(|(agent, seat)| {
            count += 1;
            (agent.as_str(), seat.agent_type.as_str())
        }));
        Books {
            count,
            digest,
            unsettled,
            request_seq: None,
        }
    }

    /// Which masters answer.
    fn connected(&self) -> PerMaster<bool> {
        PerMaster {
            primary: self.links.primary.connected,
            secondary: self.links.secondary.connected,
        }
    }

    fn claims(&self, link: Master) -> Vec<AgentClaim> {
        self.agents
            .iter()
            .filter(|(_, seat)| seat.link == link)
            .map(|(a, seat)| AgentClaim {
                agent_id: a.clone(),
                agent_type: seat.agent_type.clone(),
            })
            .collect()
    }
}

#[derive(Debug)]
struct Inner {
    cfg: SlaveConfig,
    /// The decisions, from `cfg`.
    policy: Policy,
    /// The primary, and the secondary if configured.
    links: Links,
    instance: Uuid,
    /// The verified license when running licensed.
    license: Option<License>,
    local_limit: Option<u32>,
    /// Plain mutex: never held across an await.
    state: Mutex<State>,
    events: broadcast::Sender<AgentEvent>,
    heartbeat_seq: std::sync::atomic::AtomicU64,
    /// The last request number used (see `RegisterRequest::seq`).
    request_seq: std::sync::atomic::AtomicU64,
    metrics: crate::metrics::SlaveMetrics,
}

/// The handle a host application holds. Cheap to clone; the background task stops when
/// [`SlaveAgent::shutdown`] is called.
#[derive(Debug, Clone)]
pub struct SlaveAgent {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Checks the slave's license locally and decides licensed or unlicensed operation.
fn check_license(cfg: &SlaveConfig) -> Result<(Option<License>, Option<License>), SlaveError> {
    let Some(file) = &cfg.license else {
        return Ok((None, None));
    };
    let key = cfg.vendor_key.as_ref().ok_or_else(|| {
        SlaveError::Config(format!(
            "a license file ({}) needs the vendor public key to verify it: pass --vendor-key",
            file.name
        ))
    })?;
    let license = verify_license(&file.text, &file.name, key)?;
    let today = time::OffsetDateTime::now_utc().date();
    license.check_dates(today, &file.name)?;
    match (license.role, cfg.unlicensed) {
        (Role::Slave, false) => Ok((Some(license.clone()), Some(license))),
        (Role::None, _) => Ok((None, Some(license))),
        (Role::Master, _) => Err(SlaveError::Config(format!(
            "license {} in {} has the master flag: a slave needs a slave license, or no license to run unlicensed",
            license.id, file.name
        ))),
        (Role::Slave, true) => Err(SlaveError::Config(format!(
            "license {} in {} has the slave flag and cannot be used as an unlicensed slave: drop --unlicensed to use it, or run without a license",
            license.id, file.name
        ))),
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding this lock would be a bug in this file; the state itself stays
    // consistent (every critical section is a few assignments), so keep going.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl SlaveAgent {
    /// Verifies the license, connects to NATS and says hello to the master(s). Fails if the
    /// license is unusable, the primary's NATS is unreachable and there is no secondary, or
    /// a master refuses this slave for good (unlicensed not allowed, invalid license…). If
    /// no master answers yet, the agent starts disconnected and keeps trying in the
    /// background (its grace period runs from the start).
    pub async fn start(cfg: SlaveConfig) -> Result<Self, SlaveError> {
        let (licensed, presented) = check_license(&cfg)?;
        let two = cfg.secondary.is_some();
        let primary = Link::connect(
            Master::Primary,
            &cfg.nats_url,
            &cfg.nats_auth,
            &cfg.cluster,
            &cfg.slave_id,
            two,
        )
        .await?;
        let secondary = match &cfg.secondary {
            Some(secondary) => Some(
                Link::connect(
                    Master::Secondary,
                    &secondary.nats_url,
                    &secondary.nats_auth,
                    &secondary.cluster,
                    &cfg.slave_id,
                    true,
                )
                .await?,
            ),
            None => None,
        };
        let links = Links::new(primary, secondary);
        let mut controls = Vec::new();
        for link in links.iter() {
            controls.push((
                link.id,
                link.client
                    .subscribe(link.subjects.control(&cfg.slave_id))
                    .await
                    .map_err(|e| SlaveError::Nats(e.to_string()))?,
            ));
        }
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let local_limit = licensed.as_ref().and_then(|l| l.limits.local);
        let inner = Arc::new(Inner {
            license: presented,
            local_limit,
            state: Mutex::new(State {
                agents: BTreeMap::new(),
                pending: 0,
                registering: BTreeMap::new(),
                unregistering: BTreeMap::new(),
                links: PerMaster::default(),
                active: Master::Primary,
                logged_out: VecDeque::new(),
                last_error: None,
                last_contact: tokio::time::Instant::now(),
                restricted: None,
                primary_slow: false,
            }),
            policy: Policy::new(&cfg),
            cfg,
            links,
            instance: Uuid::new_v4(),
            events,
            heartbeat_seq: Default::default(),
            request_seq: Default::default(),
            metrics: Default::default(),
        });
        match inner.hello(Master::Primary).await {
            Ok(()) => {}
            Err(HelloError::Refused { reason, detail }) if !two => {
                return Err(SlaveError::Refused { reason, detail });
            }
            Err(e) => {
                warn!(detail = %e.detail(), "the primary master did not accept us yet");
                if two {
                    match inner.hello(Master::Secondary).await {
                        Ok(()) => inner.switch(
                            Master::Secondary,
                            "the primary master is not available at start",
                        ),
                        Err(HelloError::Refused { reason, detail }) => {
                            if let HelloError::Refused { .. } = e {
                                return Err(SlaveError::Refused { reason, detail });
                            }
                            warn!(%reason, %detail, "the secondary master refuses this slave");
                        }
                        Err(HelloError::Unavailable(detail)) => {
                            warn!(%detail, "no master answered yet; will keep trying");
                        }
                    }
                }
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(background(inner.clone(), controls, stop_rx));
        Ok(Self {
            inner,
            stop,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }

    pub fn slave_id(&self) -> &SlaveId {
        &self.inner.cfg.slave_id
    }

    /// Events (logouts, connection changes, switches) from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.inner.events.subscribe()
    }

    /// Asks for a seat for `agent_id` of `agent_type`: local limit first, then the
    /// master(s).
    pub async fn register(&self, agent_id: &str, agent_type: &str) -> Result<Outcome, SlaveError> {
        let asked = tokio::time::Instant::now();
        let outcome = self.inner.register(agent_id, agent_type).await;
        if let Ok(o) = &outcome {
            let reason = match o {
                Outcome::Approved { .. } => None,
                Outcome::Rejected { reason, .. } => Some(reason.token()),
            };
            self.inner.metrics.registration(reason, asked.elapsed());
        }
        outcome
    }

    /// Gives the agent's seat back to the master that granted it. `Ok(false)` when it held
    /// none here.
    pub async fn unregister(&self, agent_id: &str) -> Result<bool, SlaveError> {
        let released = self.inner.unregister(agent_id).await;
        if let Ok(true) = released {
            self.inner.metrics.unregistration();
        }
        released
    }

    /// This slave's metrics as Prometheus text (what the daemon serves on `/metrics`).
    pub fn metrics_text(&self) -> String {
        self.inner.metrics.render(&self.status())
    }

    pub fn agents(&self) -> Vec<AgentClaim> {
        lock(&self.inner.state)
            .agents
            .iter()
            .map(|(a, seat)| AgentClaim {
                agent_id: a.clone(),
                agent_type: seat.agent_type.clone(),
            })
            .collect()
    }

    /// Which master (`primary` or `secondary`) granted this agent's seat.
    pub fn granted_by(&self, agent_id: &str) -> Option<&'static str> {
        lock(&self.inner.state)
            .agents
            .get(agent_id)
            .map(|seat| seat.link.name())
    }

    pub fn status(&self) -> SlaveStatusView {
        let inner = &self.inner;
        let state = lock(&inner.state);
        let mut by_type = BTreeMap::new();
        for seat in state.agents.values() {
            *by_type.entry(seat.agent_type.clone()).or_insert(0) += 1;
        }
        let any_connected = state.links.iter().any(|l| l.connected);
        let active = state.links.get(state.active);
        let masters = inner
            .links
            .iter()
            .map(|link| MasterView {
                name: link.name().to_owned(),
                cluster: link.subjects.cluster().to_owned(),
                connected: state.links.get(link.id).connected,
                broker_id: state.links.get(link.id).broker_id.clone(),
                agents: state.agents.values().filter(|s| s.link == link.id).count() as u32,
            })
            .collect();
        SlaveStatusView {
            slave_id: inner.cfg.slave_id.to_string(),
            cluster: inner.links.get(state.active).subjects.cluster().to_owned(),
            connected: active.connected,
            broker_id: active.broker_id.clone(),
            active_master: state.active.name().to_owned(),
            masters,
            licensed: inner.local_limit.is_some()
                || inner
                    .license
                    .as_ref()
                    .is_some_and(|l| l.role == Role::Slave),
            license_id: inner.license.as_ref().map(|l| l.id),
            local_limit: inner.local_limit,
            agents: state.agents.len() as u32,
            agents_by_type: by_type,
            pending: state.pending,
            logged_out: state.logged_out.iter().cloned().collect(),
            last_error: state.last_error.clone(),
            mode: Policy::mode(any_connected, state.restricted.is_some()),
            grace_left_ms: (!any_connected && state.restricted.is_none()).then(|| {
                inner
                    .policy
                    .grace_left(tokio::time::Instant::now(), state.last_contact)
                    .as_millis() as u64
            }),
        }
    }

    /// Stops heartbeating, releases every seat this slave holds (its agents are gone with
    /// it) at the master that granted it, and closes the NATS connections.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        // Release every seat at once, within one request timeout: a slave whose master is
        // gone must not take a timeout per agent to stop. Seats a master does not hear
        // about are released when this slave id says hello again (it then claims none).
        let agents: Vec<String> = lock(&self.inner.state).agents.keys().cloned().collect();
        let releases = futures::future::join_all(agents.iter().map(|agent| async move {
            if let Err(e) = self.inner.unregister(agent).await {
                warn!(%agent, error = %e, "could not release seat at shutdown");
            }
        }));
        let limit = self.inner.cfg.request_timeout + Duration::from_millis(500);
        if tokio::time::timeout(limit, releases).await.is_err() {
            warn!("some seats could not be released at shutdown: the master did not answer");
        }
        // The releases above were confirmed by the masters' replies; `flush` writes any
        // report still buffered before `drain` closes the connection.
        for link in self.inner.links.iter() {
            let closing = async {
                let _ = link.client.flush().await;
                let _ = link.client.drain().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
        }
    }
}

enum HelloError {
    Refused {
        reason: RejectReason,
        detail: String,
    },
    Unavailable(String),
}

impl HelloError {
    fn detail(&self) -> String {
        match self {
            HelloError::Refused { reason, detail } => format!("{reason}: {detail}"),
            HelloError::Unavailable(detail) => detail.clone(),
        }
    }
}

/// Where one registration attempt ended.
enum Attempt {
    Decided(Outcome),
    /// This master cannot decide now; try another.
    Unavailable(String),
}

impl Inner {
    fn emit(&self, event: AgentEvent) {
        // No subscriber is fine: events are a convenience, the state is the truth.
        let _ = self.events.send(event);
    }

    fn logged_out(&self, state: &mut State, out: LoggedOut) {
        if state.logged_out.len() >= LOGGED_OUT_HISTORY {
            state.logged_out.pop_front();
        }
        state.logged_out.push_back(out.clone());
        self.emit(AgentEvent::LoggedOut(out));
    }

    /// Asks one master, keeping the books: any answer is contact (the grace period restarts
    /// from the request's sending time) and the primary's latency is watched.
    async fn ask<T: crate::link::Request>(
        &self,
        link: Master,
        op: SlaveOp,
        body: &T,
    ) -> Result<Ask, SlaveError> {
        // Ride through a broker failover: while nobody answers, retry with backoff until
        // `failover_wait` has passed (`Policy::retry` says how long). Every request is safe
        // to repeat (registration is idempotent per agent, hellos carry a sequence number).
        let ride_through = lock(&self.state).links.get(link).connected;
        let first = tokio::time::Instant::now();
        let mut backoff = RETRY_BACKOFF;
        let mut saw_election = false;
        let answer = loop {
            let answer = self
                .links
                .get(link)
                .ask(&self.cfg.slave_id, op, body, self.cfg.request_timeout)
                .await?;
            let electing = matches!(
                &answer,
                Ask::Reply {
                    reply: Reply::Refused {
                        reason: RejectReason::NoLeader,
                        ..
                    },
                    ..
                }
            );
            saw_election |= electing;
            let retry = self
                .policy
                .retry(ride_through, saw_election, first.elapsed(), backoff);
            match answer {
                Ask::Unavailable(_) if retry => {
                    debug!(
                        op = op.token(),
                        ?backoff,
                        "no answer from the master yet; retrying"
                    );
                }
                Ask::Reply { .. } if electing && retry => {
                    debug!(
                        op = op.token(),
                        ?backoff,
                        "the master's brokers are electing a leader; retrying"
                    );
                }
                // No leader within the election wait: as good as no master (and not a
                // contact: the grace period keeps counting from the last real answer).
                Ask::Reply { .. } if electing => {
                    break Ask::Unavailable(format!(
                        "the {} master's brokers elected no leader within {:?}",
                        link.name(),
                        self.policy.election_wait()
                    ));
                }
                answer => break answer,
            }
            tokio::time::sleep(backoff).await;
            backoff = Policy::next_backoff(backoff);
        };
        if let Ask::Reply { sent, latency, .. } = &answer {
            self.metrics.master_answer(link, *latency);
            let mut state = lock(&self.state);
            state.last_contact = state.last_contact.max(*sent);
            if link == Master::Primary {
                let slow = self.policy.too_slow(*latency);
                if slow {
                    warn!(?latency, delay = ?self.cfg.switch_delay, "the primary master answers slower than the switch delay");
                }
                // Sticky until the next decision (`choose_active`), so a slow answer is not
                // forgotten because a fast one (a re-hello, say) followed it.
                state.primary_slow |= slow;
            }
        }
        Ok(answer)
    }

    fn set_disconnected(&self, link: Master, detail: String) {
        let mut state = lock(&self.state);
        let was = state.links.get(link).connected;
        state.links.get_mut(link).connected = false;
        state.last_error = Some(detail.clone());
        drop(state);
        if was {
            warn!(master = link.name(), %detail, "lost a master");
            self.emit(AgentEvent::Disconnected {
                master: link.name().to_owned(),
                detail,
            });
        }
    }

    /// Makes `link` the master new registrations go to.
    fn switch(&self, link: Master, reason: &str) {
        let mut state = lock(&self.state);
        if state.active == link {
            return;
        }
        state.active = link;
        drop(state);
        info!(
            master = link.name(),
            reason,
            "new registrations now go to the {} master",
            link.name()
        );
        self.emit(AgentEvent::Switched {
            master: link.name().to_owned(),
            reason: reason.to_owned(),
        });
    }

    /// Says hello to `link`'s master: once per reconnect however many callers find the
    /// session lost at the same time (a caller that waited while another's hello succeeded
    /// uses that one), built from the books as they are when it is sent, with what is in
    /// flight.
    async fn hello(&self, link: Master) -> Result<(), HelloError> {
        let l = self.links.get(link);
        let generation = l.hellos.load(std::sync::atomic::Ordering::Acquire);
        let _guard = l.hello_lock.lock().await;
        if l.hellos.load(std::sync::atomic::Ordering::Acquire) != generation
            && lock(&self.state).links.get(link).connected
        {
            return Ok(());
        }
        let mut renumbered = false;
        loop {
            match self.hello_once(link).await {
                Err(HelloError::Refused {
                    reason: RejectReason::Replayed,
                    detail,
                }) if !renumbered => {
                    // A hello of ours that the master processed but whose answer we missed
                    // (a retry reached a new leader): say it again under a new number.
                    debug!(master = link.name(), %detail, "hello number refused; renumbering");
                    renumbered = true;
                }
                Ok(()) => {
                    l.hellos.fetch_add(1, std::sync::atomic::Ordering::Release);
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    async fn hello_once(&self, link: Master) -> Result<(), HelloError> {
        let l = self.links.get(link);
        // Read before the books, as for a heartbeat: every request numbered up to it was
        // marked in flight before it took its number, so the hello claims it or lists it
        // as pending; a later one is numbered above it and its seat is kept.
        let request_seq = self.request_seq.load(std::sync::atomic::Ordering::Acquire);
        let (agents, pending) = {
            let state = lock(&self.state);
            (
                state.claims(link),
                state.registering.keys().cloned().collect(),
            )
        };
        let hello = Hello {
            instance: self.instance,
            license: self.cfg.license.as_ref().map(|f| f.text.clone()),
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            agents,
            software: format!("lmbus-slave {}", env!("CARGO_PKG_VERSION")),
            seq: l
                .hello_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
            grace_ms: self.policy.grace_period().as_millis() as u64,
            logout_after_grace: self.policy.logout_after_grace(),
            request_timeout_ms: self.policy.longest_request().as_millis() as u64,
            request_seq: Some(request_seq),
            pending,
        };
        let reply = match self.ask(link, SlaveOp::Hello, &hello).await {
            Ok(Ask::Reply { reply, .. }) => reply,
            Ok(Ask::Unavailable(detail)) => {
                self.set_disconnected(link, detail.clone());
                return Err(HelloError::Unavailable(detail));
            }
            Err(e) => {
                self.set_disconnected(link, e.to_string());
                return Err(HelloError::Unavailable(e.to_string()));
            }
        };
        match reply {
            Reply::Welcome(welcome) => {
                let was_restricted = self.accept_welcome(link, &welcome);
                info!(master = link.name(), broker = %welcome.broker_id, "connected to the {} master", link.name());
                if let Some((since, logged_out)) = was_restricted {
                    let lost_for = since.elapsed() + self.policy.grace_period();
                    info!(
                        "back from restriction after {} s without a master",
                        lost_for.as_secs()
                    );
                    self.report(
                        link,
                        SlaveReport {
                            event: SlaveEvent::Restricted {
                                lost_for_ms: lost_for.as_millis() as u64,
                                logged_out,
                            },
                            message: String::new(),
                        },
                    )
                    .await;
                }
                self.emit(AgentEvent::Connected {
                    master: link.name().to_owned(),
                    broker_id: welcome.broker_id,
                });
                Ok(())
            }
            Reply::Refused {
                reason: RejectReason::StaleRequest,
                detail,
                ..
            } => Err(HelloError::Unavailable(detail)),
            Reply::Refused {
                reason: RejectReason::Replayed,
                detail,
                last_hello,
            } => {
                // Number the next hello above the master's last (one it processed whose
                // answer was lost, or one someone forged with this slave's credentials).
                if let Some(last) = last_hello {
                    // The master bounds how far a hello number may jump, so this never
                    // nears the end of the range; saturate all the same.
                    l.hello_seq
                        .fetch_max(last.min(u64::MAX / 2), std::sync::atomic::Ordering::Relaxed);
                }
                Err(HelloError::Refused {
                    reason: RejectReason::Replayed,
                    detail,
                })
            }
            Reply::Refused { reason, detail, .. } => {
                let mut state = lock(&self.state);
                state.links.get_mut(link).connected = false;
                state.last_error = Some(format!("{reason}: {detail}"));
                Err(HelloError::Refused { reason, detail })
            }
            other => {
                let detail = format!("unexpected answer to hello: {other:?}");
                self.set_disconnected(link, detail.clone());
                Err(HelloError::Unavailable(detail))
            }
        }
    }

    /// Takes in a welcome: logs out what the master did not re-grant, marks the link
    /// connected and ends any restriction (returned, to be reported).
    fn accept_welcome(
        &self,
        link: Master,
        welcome: &Welcome,
    ) -> Option<(tokio::time::Instant, u32)> {
        let mut state = lock(&self.state);
        for RejectedAgent { agent_id, reason } in welcome.rejected_agents.iter().cloned() {
            let held_here = state.agents.get(&agent_id).is_some_and(|s| s.link == link);
            if held_here {
                if let Some(seat) = state.agents.remove(&agent_id) {
                    self.logged_out(
                        &mut state,
                        LoggedOut {
                            agent_id,
                            agent_type: seat.agent_type,
                            reason,
                            detail: format!(
                                "the {} master did not re-grant this seat on reconnect",
                                link.name()
                            ),
                        },
                    );
                }
            }
        }
        *state.links.get_mut(link) = LinkState {
            connected: true,
            broker_id: Some(welcome.broker_id.clone()),
        };
        state.last_error = None;
        state.restricted.take()
    }

    fn next_request_seq(&self) -> u64 {
        self.request_seq
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1
    }

    async fn register(&self, agent_id: &str, agent_type: &str) -> Result<Outcome, SlaveError> {
        validate(agent_id, agent_type)?;
        self.check_grace();
        // Decide under the lock, act (await) after it is released.
        let local_rejection = {
            let mut state = lock(&self.state);
            let held = state.agents.contains_key(agent_id);
            let used = state.agents.len() as u64 + u64::from(state.pending);
            match Policy::local_rejection(self.local_limit, held, used) {
                Some(detail) => {
                    self.logged_out(
                        &mut state,
                        LoggedOut {
                            agent_id: agent_id.to_owned(),
                            agent_type: agent_type.to_owned(),
                            reason: RejectReason::LocalLimit,
                            detail: detail.clone(),
                        },
                    );
                    Some(detail)
                }
                None => {
                    state.pending += 1;
                    mark(&mut state.registering, agent_id);
                    None
                }
            }
        };
        if let Some(detail) = local_rejection {
            self.report_local_rejection(agent_id, agent_type, &detail)
                .await;
            return Ok(Outcome::Rejected {
                reason: RejectReason::LocalLimit,
                detail,
            });
        }
        // Settled below; a caller that gives up (a dropped future, an HTTP client gone)
        // settles it on drop, so the agent is never left "in flight" for good.
        let in_flight = InFlight {
            state: &self.state,
            agent: agent_id,
            registering: true,
            settled: false,
        };
        let decided = self.register_with_masters(agent_id, agent_type).await;
        let mut state = lock(&self.state);
        in_flight.settle(&mut state);
        match decided {
            Ok((Outcome::Approved { already_held }, granted_by)) => {
                // `None`: admitted locally during the grace period; recorded on the active
                // master, which reconciles it at the next hello.
                let link = granted_by.unwrap_or(state.active);
                state.agents.insert(
                    agent_id.to_owned(),
                    Seat {
                        agent_type: agent_type.to_owned(),
                        link,
                    },
                );
                Ok(Outcome::Approved { already_held })
            }
            Ok((Outcome::Rejected { reason, detail }, _)) => {
                if !Policy::keeps_seat(reason) {
                    state.agents.remove(agent_id);
                }
                self.logged_out(
                    &mut state,
                    LoggedOut {
                        agent_id: agent_id.to_owned(),
                        agent_type: agent_type.to_owned(),
                        reason,
                        detail: detail.clone(),
                    },
                );
                Ok(Outcome::Rejected { reason, detail })
            }
            Err(e) => Err(e),
        }
    }

    /// Asks the masters in the policy's order (`Policy::ask_order`: the seat's master for
    /// a re-registration; otherwise the active one, then the other on failure, or on a
    /// capacity rejection by the primary when overflow is on). Returns the outcome and the
    /// master that granted it (`None` when no master answered and the grace policy
    /// admitted the agent locally).
    async fn register_with_masters(
        &self,
        agent_id: &str,
        agent_type: &str,
    ) -> Result<(Outcome, Option<Master>), SlaveError> {
        let mut order = {
            let state = lock(&self.state);
            self.policy
                .ask_order(state.agents.get(agent_id).map(|s| s.link), state.active)
        };
        while let Some(link) = order.next() {
            match self.attempt(link, agent_id, agent_type).await? {
                Attempt::Unavailable(detail) => order.unavailable(detail),
                Attempt::Decided(outcome) => match order.decided(outcome) {
                    Some(Answered {
                        outcome,
                        by,
                        switch,
                    }) => {
                        if let Some(Switch { to, reason }) = switch {
                            self.switch(to, reason);
                        }
                        return Ok((outcome, Some(by)));
                    }
                    None => debug!(
                        agent = agent_id,
                        "the primary is full; overflowing to the secondary"
                    ),
                },
            }
        }
        let detail = order.no_master();
        Ok((self.without_master(agent_id, detail), None))
    }

    /// One master's decision on a registration; says hello first if the session is not
    /// live, and once more if the master lost it meanwhile.
    async fn attempt(
        &self,
        link: Master,
        agent_id: &str,
        agent_type: &str,
    ) -> Result<Attempt, SlaveError> {
        let mut request = RegisterRequest {
            request_id: Uuid::new_v4(),
            seq: self.next_request_seq(),
            agent_id: agent_id.to_owned(),
            agent_type: agent_type.to_owned(),
        };
        let connected = lock(&self.state).links.get(link).connected;
        if !connected {
            match self.hello(link).await {
                Ok(()) => {}
                Err(HelloError::Refused { reason, detail }) => {
                    return Ok(Attempt::Decided(Outcome::Rejected { reason, detail }));
                }
                Err(HelloError::Unavailable(detail)) => return Ok(Attempt::Unavailable(detail)),
            }
        }
        let (mut said_hello_again, mut renumbered) = (false, false);
        loop {
            let reply = match self.ask(link, SlaveOp::Register, &request).await? {
                Ask::Unavailable(detail) => {
                    self.set_disconnected(link, detail.clone());
                    return Ok(Attempt::Unavailable(detail));
                }
                Ask::Reply { reply, .. } => reply,
            };
            match reply {
                Reply::Decision(Decision::Approved { already_held }) => {
                    return Ok(Attempt::Decided(Outcome::Approved { already_held }));
                }
                Reply::Decision(Decision::Rejected {
                    reason: RejectReason::SlaveNotConnected,
                    detail,
                }) => {
                    if said_hello_again {
                        return Ok(Attempt::Decided(Outcome::Rejected {
                            reason: RejectReason::SlaveNotConnected,
                            detail,
                        }));
                    }
                    said_hello_again = true;
                    debug!(
                        master = link.name(),
                        "the master lost our session; saying hello again"
                    );
                    lock(&self.state).links.get_mut(link).connected = false;
                    match self.hello(link).await {
                        Ok(()) => {}
                        Err(HelloError::Refused { reason, detail }) => {
                            return Ok(Attempt::Decided(Outcome::Rejected { reason, detail }));
                        }
                        Err(HelloError::Unavailable(detail)) => {
                            return Ok(Attempt::Unavailable(detail));
                        }
                    }
                }
                Reply::Decision(Decision::Rejected {
                    reason: RejectReason::Replayed,
                    detail,
                }) if !renumbered => {
                    // We did not replay it: a new leader assumes every number up to the
                    // last one its ledger shows was used. Ask again under a new number.
                    debug!(master = link.name(), %detail, "request number refused; renumbering");
                    renumbered = true;
                    request.seq = self.next_request_seq();
                }
                Reply::Decision(Decision::Rejected { reason, detail }) => {
                    return Ok(Attempt::Decided(Outcome::Rejected { reason, detail }));
                }
                Reply::Error(e) => return Err(SlaveError::InvalidInput(e.to_string())),
                other => {
                    return Err(SlaveError::Nats(format!(
                        "unexpected answer to a registration: {other:?}"
                    )));
                }
            }
        }
    }

    /// The answer to a registration no master could decide (`Policy::without_master`),
    /// with the grace period checked first.
    fn without_master(&self, agent_id: &str, detail: String) -> Outcome {
        self.check_grace();
        let restricted = lock(&self.state).restricted.is_some();
        let outcome = self.policy.without_master(restricted, detail);
        if outcome.is_approved() {
            warn!(
                agent = agent_id,
                "approved locally during the grace period; the master reconciles it on reconnect"
            );
        }
        outcome
    }

    async fn report_local_rejection(&self, agent_id: &str, agent_type: &str, detail: &str) {
        warn!(agent = agent_id, agent_type, "{detail}: agent logged out");
        let active = lock(&self.state).active;
        self.report(
            active,
            SlaveReport {
                event: SlaveEvent::LocalRejection {
                    agent_id: agent_id.to_owned(),
                    agent_type: agent_type.to_owned(),
                    reason: RejectReason::LocalLimit,
                },
                message: detail.to_owned(),
            },
        )
        .await;
    }

    /// Tells a master about something decided here (published, no reply: if no master
    /// listens, the local log is the only record).
    async fn report(&self, link: Master, report: SlaveReport) {
        self.links
            .get(link)
            .publish(&self.cfg.slave_id, SlaveOp::Report, &report)
            .await;
    }

    async fn unregister(&self, agent_id: &str) -> Result<bool, SlaveError> {
        if agent_id.is_empty() {
            return Err(SlaveError::InvalidInput("agent id is empty".into()));
        }
        let seat = {
            let mut state = lock(&self.state);
            let seat = state.agents.remove(agent_id);
            if seat.is_some() {
                mark(&mut state.unregistering, agent_id);
            }
            seat
        };
        let Some(seat) = seat else {
            return Ok(false);
        };
        let in_flight = InFlight {
            state: &self.state,
            agent: agent_id,
            registering: false,
            settled: false,
        };
        let answer = self.unregister_at(seat.link, agent_id).await;
        in_flight.settle(&mut lock(&self.state));
        answer
    }

    async fn unregister_at(&self, link: Master, agent_id: &str) -> Result<bool, SlaveError> {
        let request = UnregisterRequest {
            request_id: Uuid::new_v4(),
            seq: self.next_request_seq(),
            agent_id: agent_id.to_owned(),
        };
        // The seat is gone locally either way; if its master does not hear about it now,
        // the next hello carries the agent list without it and the master releases it then.
        match self.ask(link, SlaveOp::Unregister, &request).await? {
            Ask::Reply {
                reply: Reply::Ack, ..
            } => {}
            Ask::Reply {
                reply: Reply::Error(e),
                ..
            } => return Err(SlaveError::InvalidInput(e.to_string())),
            Ask::Reply { reply, .. } => warn!(?reply, "unexpected answer to an unregistration"),
            Ask::Unavailable(detail) => self.set_disconnected(link, detail),
        }
        Ok(true)
    }

    /// Applies the restriction once no master has answered for the whole grace period.
    /// Checked before every heartbeat and registration, and by a timer, so a slave resumed
    /// after being frozen restricts before it talks to anyone.
    fn check_grace(&self) {
        let now = tokio::time::Instant::now();
        let mut state = lock(&self.state);
        let Some(restrict) =
            self.policy
                .restriction(now, state.last_contact, state.restricted.is_some())
        else {
            return;
        };
        for link in state.links.iter_mut() {
            link.connected = false;
        }
        let mut logged_out = 0;
        if restrict.log_out_all {
            let agents = std::mem::take(&mut state.agents);
            logged_out = agents.len() as u32;
            for (agent_id, seat) in agents {
                self.logged_out(&mut state, restrict.logout(agent_id, seat.agent_type));
            }
        }
        state.restricted = Some((now, logged_out));
        drop(state);
        warn!(
            grace = ?self.policy.grace_period(),
            logged_out,
            policy = ?self.policy.after_grace(),
            "no master for the whole grace period: usage restricted"
        );
        self.emit(AgentEvent::Restricted { logged_out });
    }

    /// When the grace period ends if no master answers before.
    fn grace_deadline(&self) -> Option<tokio::time::Instant> {
        let state = lock(&self.state);
        self.policy
            .grace_deadline(state.last_contact, state.restricted.is_some())
    }

    /// One heartbeat round: every master this slave holds seats with or sends new
    /// registrations to gets a heartbeat (or a hello when its session is not live); a
    /// primary that is not in use is probed with a hello when the policy is to return to
    /// it. Then the active master is chosen again.
    async fn heartbeat_round(&self) {
        self.check_grace();
        let (active, links, seats_on) = {
            let state = lock(&self.state);
            let seats_on = |master| state.agents.values().any(|s| s.link == master);
            let seats_on = PerMaster {
                primary: seats_on(Master::Primary),
                secondary: seats_on(Master::Secondary),
            };
            (state.active, state.links.clone(), seats_on)
        };
        for link in self.policy.heartbeat_targets(active, seats_on) {
            if links.get(link).connected {
                self.heartbeat(link).await;
            } else if let Err(HelloError::Refused { reason, detail }) = self.hello(link).await {
                warn!(master = link.name(), %reason, %detail, "the master refuses this slave");
            }
        }
        // The active master just failed, or the primary is too slow: make sure the other
        // one is ready to take over.
        let other = {
            let state = lock(&self.state);
            self.policy
                .prepare_other(active, state.connected(), state.primary_slow)
        };
        if let Some(other) = other {
            if let Err(HelloError::Refused { reason, detail }) = self.hello(other).await {
                warn!(master = other.name(), %reason, %detail, "the master refuses this slave");
            }
        }
        self.choose_active();
    }

    /// Switches the active master if the policy says so (`Policy::choose_active`); the
    /// primary's slowness is forgotten once decided on.
    fn choose_active(&self) {
        if !self.policy.has_secondary() {
            return;
        }
        let switch = {
            let mut state = lock(&self.state);
            let slow = std::mem::take(&mut state.primary_slow);
            self.policy
                .choose_active(state.active, state.connected(), slow)
        };
        if let Some(Switch { to, reason }) = switch {
            self.switch(to, reason);
        }
    }

    async fn heartbeat(&self, link: Master) {
        let seq = self
            .heartbeat_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Read before the books: every request numbered up to it was marked in flight
        // before it took its number, so the books show it (or list it as unsettled).
        let request_seq = self.request_seq.load(std::sync::atomic::Ordering::Acquire);
        let (agents, in_use, mut books) = {
            let state = lock(&self.state);
            (
                state.claims(link).len() as u32,
                state.active == link,
                state.books(link),
            )
        };
        books.request_seq = Some(request_seq);
        let role = match (self.policy.has_secondary(), link) {
            (false, _) => MasterRole::Only,
            (true, Master::Primary) => MasterRole::Primary,
            (true, _) => MasterRole::Secondary,
        };
        let heartbeat = Heartbeat {
            instance: self.instance,
            seq,
            agents,
            master: Some(MasterUse { role, in_use }),
            books: Some(books),
        };
        match self.ask(link, SlaveOp::Heartbeat, &heartbeat).await {
            Ok(Ask::Reply {
                reply: Reply::Ack, ..
            }) => {}
            Ok(Ask::Reply {
                reply: Reply::Refused { .. },
                ..
            }) => {
                info!(
                    master = link.name(),
                    "the master lost this slave's session; saying hello again"
                );
                lock(&self.state).links.get_mut(link).connected = false;
                let _ = self.hello(link).await;
            }
            Ok(Ask::Reply { reply, .. }) => warn!(?reply, "unexpected answer to a heartbeat"),
            Ok(Ask::Unavailable(detail)) => self.set_disconnected(link, detail),
            Err(e) => self.set_disconnected(link, e.to_string()),
        }
    }

    /// Obeys a control message from `link`'s master; `true` when it asks for a new hello.
    fn control(&self, link: Master, message: ControlMessage) -> bool {
        match message {
            ControlMessage::LogOut { agents } => {
                let mut state = lock(&self.state);
                for RejectedAgent { agent_id, reason } in agents {
                    // Only that master's own seats: another master cannot log ours out.
                    if state.agents.get(&agent_id).is_some_and(|s| s.link == link) {
                        if let Some(seat) = state.agents.remove(&agent_id) {
                            self.logged_out(
                                &mut state,
                                LoggedOut {
                                    agent_id,
                                    agent_type: seat.agent_type,
                                    reason,
                                    detail: format!("logged out by the {} master", link.name()),
                                },
                            );
                        }
                    }
                }
                false
            }
            ControlMessage::Rehello => true,
            // Acted on by the link itself (`Link::send` asks again at once).
            ControlMessage::NewLeader | ControlMessage::Other => false,
        }
    }
}

/// The protocol crate's rules, the ones the master applies: an id or type it would refuse
/// is refused here first, so nothing this slave holds can make its hellos invalid.
fn validate(agent_id: &str, agent_type: &str) -> Result<(), SlaveError> {
    lmbus_schemas::validate::check_agent_id(agent_id)
        .and_then(|()| lmbus_schemas::validate::check_agent_type(agent_type))
        .map_err(|e| SlaveError::InvalidInput(e.to_string()))
}

/// Heartbeats, reconnects, failover, the grace timer and control messages until told to
/// stop.
async fn background(
    inner: Arc<Inner>,
    controls: Vec<(Master, async_nats::Subscriber)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(inner.cfg.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // One stream of (master, message) for every master's control subject.
    let mut control = futures::stream::select_all(
        controls
            .into_iter()
            .map(|(link, sub)| sub.map(move |msg| (link, msg)).boxed()),
    );
    loop {
        let grace_end = inner.grace_deadline();
        tokio::select! {
            _ = stop.changed() => break,
            _ = async {
                match grace_end {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => inner.check_grace(),
            _ = ticker.tick() => inner.heartbeat_round().await,
            msg = control.next() => match msg {
                Some((link, msg)) => match decode::<ControlMessage>(&msg.payload) {
                    Ok(message) => {
                        if inner.control(link, message) {
                            lock(&inner.state).links.get_mut(link).connected = false;
                            let _ = inner.hello(link).await;
                        }
                    }
                    Err(e) => warn!(error = %e, "undecodable control message ignored"),
                },
                None => {
                    warn!("control subscriptions closed");
                    break;
                }
            },
        }
    }
}
