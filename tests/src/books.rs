//! The hosts' books: what each host application was told (the agents approved for it,
//! less those it released and those its slave reported logged out), the truth a user
//! sees, checked against the license at every approval, and [`Host`], an in-process slave
//! whose registrations keep them. Also [`AllotView`], the allotment-mode part of a slave's
//! status.
//!
//! A host stops using an agent before it asks for the release, so its books never count a
//! seat it has given up; an approval is counted when the answer arrives. Then the hosts
//! together holding more than the license, at any approval, means some slave admitted a
//! seat that was not free: the failure allotment mode must never have.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use lmbus_slave::{AgentEvent, Outcome, SlaveAgent, SlaveStatusView};
use serde::Deserialize;
use tokio::task::JoinHandle;

use crate::wait::WAIT;

/// The license the books are checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub total: u32,
    pub types: BTreeMap<String, u32>,
}

impl Limits {
    pub fn new(total: u32, types: &[(&str, u32)]) -> Self {
        Self {
            total,
            types: types.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect(),
        }
    }
}

#[derive(Debug, Default)]
struct Kept {
    /// slave → agent → agent type, of every agent its host holds.
    held: BTreeMap<String, BTreeMap<String, String>>,
    /// (slave, agent) of every logout a slave reported, approved or not (a rejected
    /// registration is reported as a logout too). Agent ids are used once each, so a
    /// logout that arrives before its approval is recorded still wins.
    logged_out: BTreeSet<(String, String)>,
    approvals: u64,
    /// Logouts of agents the host held: none may happen while nothing fails.
    logouts_of_held: Vec<String>,
    /// Every approval after which the hosts held more than a limit.
    over: Vec<String>,
    /// Most seats the hosts held at once.
    max_total: u32,
    /// Events a host's subscription missed (it lagged): its books are then unknown.
    lost_events: u64,
}

/// The books of every host of a test, behind one lock, so each approval is checked against
/// all the others at the moment it is counted.
#[derive(Debug)]
pub struct Books {
    limits: Limits,
    kept: Mutex<Kept>,
}

impl Books {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            kept: Mutex::new(Kept::default()),
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A host of `slave` was told `agent` holds a seat: counted, then the hosts' totals are
    /// checked against the license.
    pub fn approved(&self, slave: &str, agent: &str, agent_type: &str) {
        let mut k = self.kept();
        k.approvals += 1;
        if k.logged_out.contains(&(slave.to_owned(), agent.to_owned())) {
            return;
        }
        k.held
            .entry(slave.to_owned())
            .or_default()
            .insert(agent.to_owned(), agent_type.to_owned());
        let total = k.held.values().map(|h| h.len() as u32).sum::<u32>();
        k.max_total = k.max_total.max(total);
        let of_type = k
            .held
            .values()
            .flat_map(|h| h.values())
            .filter(|t| *t == agent_type)
            .count() as u32;
        if total > self.limits.total {
            let text = format!(
                "after {agent} on {slave} was approved the hosts held {total} seats, limit {}: {:?}",
                self.limits.total, k.held
            );
            k.over.push(text);
        }
        if let Some(limit) = self.limits.types.get(agent_type)
            && of_type > *limit
        {
            let text = format!(
                "after {agent} on {slave} was approved the hosts held {of_type} '{agent_type}' seats, limit {limit}"
            );
            k.over.push(text);
        }
    }

    /// A host of `slave` stops using `agent` (before it asks the slave for the release).
    pub fn releasing(&self, slave: &str, agent: &str) {
        if let Some(h) = self.kept().held.get_mut(slave) {
            h.remove(agent);
        }
    }

    /// `slave` reported `agent` logged out.
    pub fn logged_out(&self, slave: &str, agent: &str) {
        let mut k = self.kept();
        k.logged_out.insert((slave.to_owned(), agent.to_owned()));
        if k.held
            .get_mut(slave)
            .and_then(|h| h.remove(agent))
            .is_some()
        {
            k.logouts_of_held.push(format!("{slave}: {agent}"));
        }
    }

    /// What the hosts hold: slave → agent → type, without empty entries.
    pub fn held(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.kept()
            .held
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(s, h)| (s.clone(), h.clone()))
            .collect()
    }

    /// The agents the hosts of `slave` hold.
    pub fn held_by(&self, slave: &str) -> BTreeMap<String, String> {
        self.kept().held.get(slave).cloned().unwrap_or_default()
    }

    /// How many seats the hosts hold together.
    pub fn total(&self) -> u32 {
        self.kept().held.values().map(|h| h.len() as u32).sum()
    }

    pub fn approvals(&self) -> u64 {
        self.kept().approvals
    }

    pub fn max_total(&self) -> u32 {
        self.kept().max_total
    }

    /// Fails if the hosts ever held more than the license, or a host missed events.
    pub fn check(&self) -> anyhow::Result<()> {
        let k = self.kept();
        anyhow::ensure!(
            k.over.is_empty(),
            "the hosts held more seats than the license {} time(s); the first: {}",
            k.over.len(),
            k.over[0]
        );
        anyhow::ensure!(
            k.lost_events == 0,
            "a host missed {} events of its slave: its books are unknown",
            k.lost_events
        );
        Ok(())
    }

    /// Like [`Books::check`], and no host saw an agent it held logged out (nothing failed,
    /// so every logout of a held agent is an admission the master did not count).
    pub fn check_no_logouts(&self) -> anyhow::Result<()> {
        self.check()?;
        let k = self.kept();
        anyhow::ensure!(
            k.logouts_of_held.is_empty(),
            "hosts saw agents they held logged out while nothing failed: {:?}",
            k.logouts_of_held
        );
        Ok(())
    }
}

/// An in-process slave and its host: every registration and release goes through here, so
/// the books are kept; the slave's logouts are taken off them as they are reported.
#[derive(Debug)]
pub struct Host {
    pub id: String,
    pub slave: SlaveAgent,
    books: Arc<Books>,
    listener: JoinHandle<()>,
}

impl Host {
    /// Starts the slave with `cfg` and listens to its events.
    pub async fn start(cfg: lmbus_slave::SlaveConfig, books: &Arc<Books>) -> anyhow::Result<Self> {
        let id = cfg.slave_id.to_string();
        let slave = tokio::time::timeout(WAIT, SlaveAgent::start(cfg))
            .await
            .context("the slave did not start in time")??;
        let mut events = slave.subscribe();
        let (of, books_of) = (id.clone(), books.clone());
        let listener = tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(AgentEvent::LoggedOut(l)) => books_of.logged_out(&of, &l.agent_id),
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => books_of.kept().lost_events += n,
                    Err(RecvError::Closed) => break,
                }
            }
        });
        Ok(Self {
            id,
            slave,
            books: books.clone(),
            listener,
        })
    }

    /// Registers `agent` (bounded by [`WAIT`]); an approval goes into the books.
    pub async fn register(&self, agent: &str, agent_type: &str) -> anyhow::Result<Outcome> {
        let outcome = tokio::time::timeout(WAIT, self.slave.register(agent, agent_type))
            .await
            .with_context(|| format!("{}: no answer for {agent} within {WAIT:?}", self.id))??;
        if outcome.is_approved() {
            self.books.approved(&self.id, agent, agent_type);
        }
        Ok(outcome)
    }

    /// Stops using `agent`, then asks the slave to release its seat.
    pub async fn release(&self, agent: &str) -> anyhow::Result<()> {
        self.books.releasing(&self.id, agent);
        let released = tokio::time::timeout(WAIT, self.slave.unregister(agent))
            .await
            .with_context(|| format!("{}: release of {agent} not answered", self.id))??;
        anyhow::ensure!(released, "{}: {agent} held no seat to release", self.id);
        Ok(())
    }

    /// The allotment-mode part of the slave's status.
    pub fn allot(&self) -> anyhow::Result<AllotView> {
        AllotView::of(&self.slave.status())
    }

    pub async fn shutdown(&self) {
        self.slave.shutdown().await;
        self.listener.abort();
    }
}

/// The allotment-mode fields of a slave's status (`SlaveStatusView`, also the daemon's
/// `/v1/status`), read by name from its JSON so that a slave without them fails the test
/// with a message that says so.
#[derive(Debug, Clone, Deserialize)]
pub struct AllotView {
    /// `strict` or `allotment`: what the master's welcome said.
    pub admission: String,
    /// Free seats usable locally now, per agent type.
    pub allotted: BTreeMap<String, u32>,
    /// How long the slave may still admit from its blocks.
    pub allot_lease_left_ms: Option<u64>,
    /// Local decisions the master has not acknowledged yet.
    pub journal_unacked: u32,
    /// Registrations decided locally since the slave started.
    pub local_decisions: u64,
}

impl AllotView {
    pub fn of(status: &SlaveStatusView) -> anyhow::Result<Self> {
        serde_json::from_value(serde_json::to_value(status)?).context(
            "the slave's status has no allotment fields (admission, allotted, allot_lease_left_ms, journal_unacked, local_decisions)",
        )
    }

    /// Free seats allotted to the slave, of every type.
    pub fn free(&self) -> u32 {
        self.allotted.values().sum()
    }
}
