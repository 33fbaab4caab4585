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
//! A slave may also name a backup master (`backup`: a backup-context master, its own
//! cluster). It is asked only once every production master (the primary and the
//! secondary) has been lost for the failover detection time, and is left as soon as one of
//! them answers again, whatever the return policy; the agents it holds then move back (the
//! handback).
//!
//! One background task heartbeats every master it holds seats with, says hello again
//! whenever a master has lost the session, runs the grace-period timer, and obeys control
//! messages (a forced logout, say).
//!
//! The rules (which master, the ask order, overflow, grace, restriction) are decided by
//! `policy.rs` (pure, tested there); this module does the IO around them. `mod.rs` is the handle;
//! `state.rs` what the agent knows, under one lock; `inner.rs` what the handle and the task
//! share and the request primitive; `hello.rs` sessions; `register.rs` registrations and
//! unregistrations; `background.rs` the task; `handback.rs` moving agents from a backup
//! master back to production.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmbus_schemas::{AgentClaim, License, Role, SlaveId, verify_license};

pub use crate::config::{
    DEFAULT_ELECTION_WAIT, DEFAULT_FAILOVER_WAIT, GracePolicy, LicenseFile, MasterEndpoint,
    Restriction, ReturnPolicy, SlaveConfig,
};
pub use crate::error::SlaveError;
pub use crate::events::{AgentEvent, LoggedOut, Outcome};
use crate::link::{Link, Links};
use crate::master::Master;
use crate::policy::Policy;
pub use crate::status::{MasterView, SlaveMode, SlaveStatusView};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::warn;
use uuid::Uuid;

mod allotment;
mod background;
mod handback;
mod hello;
mod inner;
#[cfg(test)]
mod interleavings;
mod register;
mod state;
mod turns;

use hello::HelloError;
use inner::Inner;
use state::{State, lock};

/// Capacity of the event channel; a subscriber that lags this far behind misses events
/// (and is told so by `broadcast::error::RecvError::Lagged`).
const EVENT_CAPACITY: usize = 1024;

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
    if let Some(context) = cfg.context.filter(|c| *c != license.context) {
        return Err(SlaveError::Config(format!(
            "license {} in {} is for context '{}', not '{context}': drop --context (a licensed slave runs in its license's context) or use a {context} license",
            license.id, file.name, license.context
        )));
    }
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

fn lock_beats(inner: &Inner) -> std::sync::MutexGuard<'_, Vec<tokio::task::AbortHandle>> {
    inner.beats.lock().unwrap_or_else(|e| e.into_inner())
}

impl SlaveAgent {
    /// Verifies the license, connects to NATS and says hello to the master(s). Fails if the
    /// license is unusable, the primary's NATS is unreachable and there is no secondary, or
    /// a master refuses this slave for good (unlicensed not allowed, invalid license…). If
    /// no master answers yet, the agent starts disconnected and keeps trying in the
    /// background (its grace period runs from the start).
    pub async fn start(cfg: SlaveConfig) -> Result<Self, SlaveError> {
        let (licensed, presented) = check_license(&cfg)?;
        let two = cfg.secondary.is_some() || cfg.backup.is_some();
        let primary = Link::connect(
            Master::Primary,
            &cfg.nats_url,
            &cfg.nats_auth,
            &cfg.cluster,
            &cfg.slave_id,
            two,
        )
        .await?;
        let mut others = Vec::new();
        for (master, endpoint) in [
            (Master::Secondary, &cfg.secondary),
            (Master::Backup, &cfg.backup),
        ] {
            others.push(match endpoint {
                Some(endpoint) => Some(
                    Link::connect(
                        master,
                        &endpoint.nats_url,
                        &endpoint.nats_auth,
                        &endpoint.cluster,
                        &cfg.slave_id,
                        true,
                    )
                    .await?,
                ),
                None => None,
            });
        }
        let backup = others.pop().flatten();
        let secondary = others.pop().flatten();
        let links = Links::new(primary, secondary, backup);
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
            state: Mutex::new(State::new()),
            turns: Default::default(),
            policy: Policy::new(&cfg),
            cfg,
            links,
            instance: Uuid::new_v4(),
            events,
            heartbeat_seq: Default::default(),
            request_seq: Default::default(),
            metrics: Default::default(),
            allot_wake: Default::default(),
            beating: Default::default(),
            beats: Default::default(),
        });
        match inner.hello_at_start(Master::Primary).await {
            Ok(()) => {}
            Err(HelloError::Refused { reason, detail, .. }) if !two => {
                return Err(SlaveError::Refused { reason, detail });
            }
            Err(e) => {
                warn!(detail = %e.detail(), "the primary master did not accept us yet");
                // The other masters in the policy's order (the secondary, then a backup): the
                // first that accepts this slave is the active one. Refused by every one: the
                // last refusal is the error.
                let mut refused = matches!(e, HelloError::Refused { .. });
                let mut last = None;
                for master in inner.policy.masters().skip(1) {
                    match inner.hello_at_start(master).await {
                        Ok(()) => {
                            inner.switch(
                                master,
                                match master {
                                    Master::Backup => "no production master is available at start",
                                    _ => "the primary master is not available at start",
                                },
                            );
                            refused = false;
                            break;
                        }
                        Err(HelloError::Refused { reason, detail, .. }) => {
                            warn!(master = master.name(), %reason, %detail, "the master refuses this slave");
                            last = Some(SlaveError::Refused { reason, detail });
                        }
                        Err(HelloError::Unavailable(detail)) => {
                            refused = false;
                            warn!(master = master.name(), %detail, "the master did not answer yet; will keep trying");
                        }
                    }
                }
                if let (true, Some(error)) = (refused, last) {
                    return Err(error);
                }
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(background::background(inner.clone(), controls, stop_rx));
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
        // A decision from an allotted block awaits nothing: a host calling in a tight loop
        // would never yield, starving this slave's own heartbeats and allot requests on a
        // small runtime. Counting against the task's cooperative budget makes it yield now
        // and then (before the clock starts: the runtime's turn is not the library's time).
        tokio::task::consume_budget().await;
        let asked = tokio::time::Instant::now();
        let (outcome, answered) = self.inner.register(agent_id, agent_type, asked).await?;
        let reason = match &outcome {
            Outcome::Approved { .. } => None,
            Outcome::Rejected { reason, .. } => Some(reason.token()),
        };
        self.inner
            .metrics
            .registration(reason, answered.saturating_duration_since(asked));
        Ok(outcome)
    }

    /// Gives the agent's seat back to the master that granted it. `Ok(false)` when it held
    /// none here.
    pub async fn unregister(&self, agent_id: &str) -> Result<bool, SlaveError> {
        tokio::task::consume_budget().await;
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

    /// Which master (`primary`, `secondary` or `backup`) granted this agent's seat.
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
        let book = state.allot.get(state.active);
        let masters = inner
            .links
            .iter()
            .map(|link| MasterView {
                name: link.name().to_owned(),
                cluster: link.subjects.cluster().to_owned(),
                connected: state.links.get(link.id).connected,
                broker_id: state.links.get(link.id).broker_id.clone(),
                context: state.links.get(link.id).context,
                agents: state.agents.values().filter(|s| s.link == link.id).count() as u32,
            })
            .collect();
        SlaveStatusView {
            slave_id: inner.cfg.slave_id.to_string(),
            cluster: inner.links.get(state.active).subjects.cluster().to_owned(),
            connected: active.connected,
            broker_id: active.broker_id.clone(),
            active_master: state.active.name().to_owned(),
            served_by: active.connected.then_some(active.context).flatten(),
            masters,
            licensed: inner.local_limit.is_some()
                || inner
                    .license
                    .as_ref()
                    .is_some_and(|l| l.role == Role::Slave),
            license_id: inner.license.as_ref().map(|l| l.id),
            context: Some(inner.context()),
            local_limit: inner.local_limit,
            agents: state.agents.len() as u32,
            agents_by_type: by_type,
            pending: state.pending,
            logged_out: state.logged_out.iter().cloned().collect(),
            rejected: state.rejected.iter().cloned().collect(),
            last_error: state.last_error.clone(),
            mode: Policy::mode(any_connected, state.restricted.is_some()),
            grace_left_ms: (!any_connected && state.restricted.is_none()).then(|| {
                inner
                    .policy
                    .grace_left(tokio::time::Instant::now(), state.last_contact)
                    .as_millis() as u64
            }),
            admission: if book.is_active() {
                lmbus_schemas::Admission::Allotment
            } else {
                lmbus_schemas::Admission::Strict
            },
            allotted: book.free().clone(),
            allot_lease_left_ms: book
                .lease_left(tokio::time::Instant::now())
                .map(|d| d.as_millis() as u64),
            journal_unacked: state.allot.iter().map(|b| b.journal_len() as u32).sum(),
            local_decisions: state.allot.iter().map(|b| b.local_decisions).sum(),
            churned: state.allot.iter().map(|b| b.churned).sum(),
        }
    }

    /// Stops heartbeating, releases every seat this slave holds (its agents are gone with
    /// it) at the master that granted it, says goodbye (the master forgets this slave) and
    /// closes the NATS connections.
    pub async fn shutdown(&self) {
        self.stop("stopped").await;
    }

    /// [`Self::shutdown`], with the reason the goodbye gives the master (the daemon's
    /// startup error, say), which its `slave_stopped` alert quotes.
    pub async fn stop(&self, reason: &str) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        for beat in std::mem::take(&mut *lock_beats(&self.inner)) {
            beat.abort();
        }
        let limit = self.inner.cfg.request_timeout + Duration::from_millis(500);
        let connected = |link: Master| lock(&self.inner.state).links.get(link).connected;
        // Allotment mode: send the journal (every local admission and release, so the
        // ledger names them) and give the blocks back first.
        let give_back = async {
            for link in Master::ALL {
                if !connected(link) {
                    continue;
                }
                lock(&self.inner.state)
                    .allot
                    .get_mut(link)
                    .return_all(tokio::time::Instant::now());
                for _ in 0..64 {
                    if !self.inner.allot_round(link).await {
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(limit, give_back).await.is_err() {
            warn!(
                "the allotted seats could not be given back at shutdown: the master did not answer"
            );
        }
        // Goodbye: each master releases every seat and block this slave holds there in one
        // record, says `slave_stopped` and forgets it (no ghost row, no
        // `slave_disconnected`), and a restart with this id is accepted at once.
        let links: Vec<Master> = Master::ALL
            .into_iter()
            .filter(|link| connected(*link))
            .collect();
        let goodbyes = futures::future::join_all(
            links
                .iter()
                .map(|link| async move { (*link, self.inner.goodbye(*link, reason).await) }),
        );
        let said: Vec<Master> = match tokio::time::timeout(limit, goodbyes).await {
            Ok(answers) => answers
                .into_iter()
                .filter(|(_, acked)| *acked)
                .map(|(link, _)| link)
                .collect(),
            Err(_) => Vec::new(),
        };
        // Seats at a master that did not take the goodbye (an older broker, no answer):
        // released one by one, all at once within one request timeout, so a slave whose
        // master is gone does not take a timeout per agent to stop. Seats a master does
        // not hear about are released when this slave id says hello again (it then claims
        // none) or at the reclaim.
        let agents: Vec<String> = lock(&self.inner.state)
            .agents
            .iter()
            .filter(|(_, seat)| !said.contains(&seat.link))
            .map(|(agent, _)| agent.clone())
            .collect();
        let releases = futures::future::join_all(agents.iter().map(|agent| async move {
            if let Err(e) = self.inner.unregister(agent).await {
                warn!(%agent, error = %e, "could not release seat at shutdown");
            }
        }));
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
