//! What the agent knows, under one plain mutex: the seat table (which master granted each
//! seat), the registrations and unregistrations in flight, each master's session, the
//! active master, the grace clock and the restriction, and the recent logouts and refused
//! registrations the status shows.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use lmbus_schemas::{AgentClaim, Books, RejectedAgent, agent_digest};

use crate::allot::{AllotBook, Leftover};
use crate::events::{LoggedOut, Outcome};
use crate::master::{Master, PerMaster};
use crate::policy::Policy;
use crate::status::AgentNotice;

/// One seat held by an agent of this slave.
#[derive(Debug, Clone)]
pub(super) struct Seat {
    pub(super) agent_type: String,
    /// The master that granted it; its release goes there.
    pub(super) link: Master,
    /// Admitted here from that master's block (allotment mode): its journal number.
    pub(super) allot: Option<u64>,
}

/// The restriction in force: since when, and how many agents it logged out (the master is
/// told both when one answers again).
#[derive(Debug, Clone, Copy)]
pub(super) struct Restricted {
    pub(super) since: tokio::time::Instant,
    pub(super) logged_out: u32,
}

/// What the slave knows about one master.
#[derive(Debug, Default, Clone)]
pub(super) struct LinkState {
    pub(super) connected: bool,
    pub(super) broker_id: Option<String>,
    /// Its license context, as its last welcome said (`None` before one, or from an older
    /// broker).
    pub(super) context: Option<lmbus_schemas::Context>,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) agents: BTreeMap<String, Seat>,
    /// Registrations sent to a master and not yet answered: they count against the local
    /// limit so concurrent requests cannot overshoot it.
    pub(super) pending: u32,
    /// Agents with a registration in flight (how many): a hello lists them as pending, so
    /// the master keeps a seat it granted them whose answer is on its way.
    pub(super) registering: BTreeMap<String, u32>,
    /// Agents with an unregistration in flight: with `registering`, what a heartbeat's
    /// books leave out, since the master may or may not have decided them yet.
    pub(super) unregistering: BTreeMap<String, u32>,
    /// What the slave knows about each master (the secondary's stays disconnected when
    /// none is configured).
    pub(super) links: PerMaster<LinkState>,
    /// Where new registrations go.
    pub(super) active: Master,
    /// Recent logouts of agents that held a seat, oldest first (at most
    /// `NOTICE_HISTORY`).
    pub(super) logged_out: VecDeque<AgentNotice>,
    /// Recent registrations refused to agents that held no seat, oldest first (at most
    /// `NOTICE_HISTORY`).
    pub(super) rejected: VecDeque<AgentNotice>,
    pub(super) last_error: Option<String>,
    /// When the last request that any master answered was sent. The grace period runs
    /// from here (from the start if no master ever answered).
    pub(super) last_contact: tokio::time::Instant,
    /// Set when the grace period ran out.
    pub(super) restricted: Option<Restricted>,
    /// The primary answered slower than `switch_delay` since the last failover decision.
    pub(super) primary_slow: bool,
    /// Each master's allotments (allotment mode): free seats, journal, lease.
    pub(super) allot: PerMaster<AllotBook>,
    /// The handback: no agent is moved back to the primary before then (it refused one).
    pub(super) moves_paused_until: Option<tokio::time::Instant>,
    /// Releases a master did not take (it did not answer, or was not asked because it was
    /// not connected), by agent: asked again every heartbeat round until that master
    /// acknowledges one (a master always honours a release, even one that refuses hellos,
    /// as a backup does while production is available) or a hello to it reconciles them
    /// all. The master stays a heartbeat target meanwhile.
    pub(super) owed: PerMaster<BTreeSet<String>>,
}

/// A registration (counted in `pending` and `registering`) or an unregistration (in
/// `unregistering`) in flight, taken off those books exactly once: by `settle`, or on drop
/// when the caller's future is dropped before the answer.
pub(super) struct InFlight<'a> {
    pub(super) state: &'a Mutex<State>,
    pub(super) agent: &'a str,
    pub(super) registering: bool,
    pub(super) settled: bool,
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
    pub(super) fn settle(mut self, state: &mut State) {
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

pub(super) fn mark(set: &mut BTreeMap<String, u32>, agent: &str) {
    *set.entry(agent.to_owned()).or_insert(0) += 1;
}

pub(super) fn unmark(set: &mut BTreeMap<String, u32>, agent: &str) {
    if let Some(n) = set.get_mut(agent) {
        *n -= 1;
        if *n == 0 {
            set.remove(agent);
        }
    }
}

/// What a refused registration was: a logout (it took the seat the agent held) or a
/// refusal of an agent that held none, or kept the one it had.
#[derive(Debug)]
pub(super) enum Refusal {
    LoggedOut(LoggedOut),
    Refused(LoggedOut),
}

/// What an unregistration does with the seat table.
#[derive(Debug)]
pub(super) enum Release {
    /// The agent holds no seat here.
    NotHeld,
    /// Admitted from a block: the release went into that master's journal; no message.
    /// What the book no longer needs comes back, to be dropped after the lock.
    Journaled { _leftover: Option<Leftover> },
    /// Taken off the table and marked in flight: the release goes to the seat's master.
    Send(Seat),
}

impl State {
    pub(super) fn new() -> State {
        State {
            agents: BTreeMap::new(),
            pending: 0,
            registering: BTreeMap::new(),
            unregistering: BTreeMap::new(),
            links: PerMaster::default(),
            active: Master::Primary,
            logged_out: VecDeque::new(),
            rejected: VecDeque::new(),
            last_error: None,
            last_contact: tokio::time::Instant::now(),
            restricted: None,
            primary_slow: false,
            allot: PerMaster::default(),
            moves_paused_until: None,
            owed: PerMaster::default(),
        }
    }

    /// A registration about to be sent to a master: it counts against the local limit and
    /// a hello lists it as pending until an [`InFlight`] settles it. Marked before the
    /// request takes its number, so a hello numbered at or above that number accounts for it.
    pub(super) fn begin_registration(&mut self, agent: &str) {
        self.pending += 1;
        mark(&mut self.registering, agent);
    }

    /// A master's answer to a registration, into the seat table: an approval holds the seat
    /// at the master that granted it (`None`: admitted locally in the grace period, so the
    /// active master, which reconciles it at the next hello); a rejection frees the agent's
    /// seat unless the policy keeps it. Returns what a rejection is for the status: a
    /// logout when it took a seat the agent held, a refusal otherwise.
    pub(super) fn record_decision(
        &mut self,
        agent_id: &str,
        agent_type: &str,
        outcome: &Outcome,
        granted_by: Option<Master>,
    ) -> Option<Refusal> {
        match outcome {
            Outcome::Approved { .. } => {
                let link = granted_by.unwrap_or(self.active);
                // A re-registration keeps the seat as it was admitted.
                let allot = self.agents.get(agent_id).and_then(|s| s.allot);
                self.agents.insert(
                    agent_id.to_owned(),
                    Seat {
                        agent_type: agent_type.to_owned(),
                        link,
                        allot,
                    },
                );
                None
            }
            Outcome::Rejected { reason, detail } => {
                let lost = !Policy::keeps_seat(*reason) && self.agents.remove(agent_id).is_some();
                let out = LoggedOut {
                    agent_id: agent_id.to_owned(),
                    agent_type: agent_type.to_owned(),
                    reason: *reason,
                    detail: detail.clone(),
                };
                Some(if lost {
                    Refusal::LoggedOut(out)
                } else {
                    Refusal::Refused(out)
                })
            }
        }
    }

    /// An unregistration: the seat leaves the table at once (the host is told it is
    /// released), and the release is journaled or marked in flight to its master.
    pub(super) fn begin_unregistration(&mut self, agent_id: &str) -> Release {
        let Some((agent, seat)) = self.agents.remove_entry(agent_id) else {
            return Release::NotHeld;
        };
        // Admitted from a block: the release goes in that master's journal (no message
        // now; the entry's names move into it), unless the master is no longer in
        // allotment mode.
        if let Some(n) = seat.allot {
            let book = self.allot.get_mut(seat.link);
            if book.takes_releases() {
                let leftover = book.release(agent, seat.agent_type, n);
                return Release::Journaled {
                    _leftover: leftover,
                };
            }
        }
        mark(&mut self.unregistering, agent_id);
        Release::Send(seat)
    }

    /// What a hello to `link`'s master says: the seats it granted, and the agents with a
    /// registration in flight (the master keeps a seat it granted them).
    pub(super) fn hello_lists(&self, link: Master) -> (Vec<AgentClaim>, Vec<String>) {
        (
            self.claims(link),
            self.registering.keys().cloned().collect(),
        )
    }

    /// Takes the agents `link`'s master rejected off the table (only that master's own
    /// seats: another master cannot log ours out); returns their logouts.
    pub(super) fn not_regranted(
        &mut self,
        link: Master,
        rejected: impl IntoIterator<Item = RejectedAgent>,
        detail: &str,
    ) -> Vec<LoggedOut> {
        let mut out = Vec::new();
        for RejectedAgent { agent_id, reason } in rejected {
            if self.agents.get(&agent_id).is_some_and(|s| s.link == link)
                && let Some(seat) = self.agents.remove(&agent_id)
            {
                out.push(LoggedOut {
                    agent_id,
                    agent_type: seat.agent_type,
                    reason,
                    detail: detail.to_owned(),
                });
            }
        }
        out
    }

    /// This slave's books for `link`'s master, as a heartbeat carries them: the agents it
    /// granted, without those with a request in flight or a journal entry the master has
    /// not acknowledged (listed as unsettled).
    pub(super) fn books(&self, link: Master) -> Books {
        let journal: std::collections::BTreeSet<&str> = self.allot.get(link).unsettled().collect();
        let unsettled: Vec<String> = self
            .registering
            .keys()
            .map(String::as_str)
            .chain(self.unregistering.keys().map(String::as_str))
            .chain(journal.iter().copied())
            .map(str::to_owned)
            .collect();
        let settled = self.agents.iter().filter(|(agent, seat)| {
            seat.link == link
                && !self.registering.contains_key(agent.as_str())
                && !self.unregistering.contains_key(agent.as_str())
                && !journal.contains(agent.as_str())
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
    pub(super) fn connected(&self) -> PerMaster<bool> {
        PerMaster::from_fn(|master| self.links.get(master).connected)
    }

    /// How large a block `link`'s master may allot under the local limit: what the held
    /// agents, the registrations in flight and the other masters' free seats leave.
    pub(super) fn room(&self, local_limit: Option<u32>, link: Master) -> u32 {
        let Some(limit) = local_limit else {
            return u32::MAX;
        };
        let free: u32 = Master::ALL
            .into_iter()
            .filter(|&other| other != link)
            .map(|other| self.allot.get(other).free().values().sum::<u32>())
            .sum();
        limit.saturating_sub(self.agents.len() as u32 + self.pending + free)
    }

    pub(super) fn claims(&self, link: Master) -> Vec<AgentClaim> {
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

pub(super) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding this lock would be a bug in this module; the state itself stays
    // consistent (every critical section is a few assignments), so keep going.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many recent logouts, and how many recent refusals, `status()` remembers.
pub(super) const NOTICE_HISTORY: usize = 100;

/// Appends `out`, stamped with the wall-clock time now, to `list`, dropping the oldest
/// beyond [`NOTICE_HISTORY`].
pub(super) fn remember(list: &mut VecDeque<AgentNotice>, out: &LoggedOut) {
    if list.len() >= NOTICE_HISTORY {
        list.pop_front();
    }
    list.push_back(AgentNotice::now(out));
}
