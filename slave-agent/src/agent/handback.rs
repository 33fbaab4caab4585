//! The handback, slave side: once a production master (the primary, or the secondary) is
//! the active master again and answers while a backup master (the backup slot, or a
//! secondary whose welcome said context `backup`) holds some of this slave's agents, those
//! agents are registered at the active master one by one (from its block first, in
//! allotment mode), and each one it approves is released at the backup. The host's agents
//! keep working through the move; only those production cannot admit stay at the backup,
//! whose handback window then logs them out.
//!
//! Moves run in the background task's heartbeat round, so a round moves for at most half a
//! heartbeat interval (the next round goes on), skips an agent the host is registering or
//! releasing at the moment, and sends no release to a backup that does not answer: that
//! backup is owed the release (`State::owed`) and asked again every heartbeat round
//! (`settle_owed`, for any master that missed a release) until it takes it, or until a
//! hello to it reconciles it. A backup refuses hellos while production is available, but it
//! always honours a release.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use lmbus_schemas::RejectReason;
use tracing::{debug, info, warn};

use super::inner::Inner;
use super::register::Attempt;
use super::state::{InFlight, Release, Seat, State, lock, mark, unmark};
use crate::events::Outcome;
use crate::master::{Master, PerMaster};

/// Most agents moved in one heartbeat round.
const MOVES_PER_ROUND: usize = 64;

/// After production refused a move for capacity (or did not answer), the next try waits
/// this long: each refusal is a `registration_rejected` alert there, so a production
/// master that stays full is asked every 10 s, not every heartbeat.
const MOVE_RETRY: Duration = Duration::from_secs(10);

/// Where one move ended.
enum Moved {
    /// The active master holds the seat now, and the backup's goes.
    Yes,
    /// The agent was released, or logged out, or busy with a host request meanwhile.
    Skipped,
    /// The active master refused it (the reason), or could not decide now (`None`).
    Refused(Option<RejectReason>),
}

/// An agent marked as registering while it moves, unmarked however the move ends.
struct Registering<'a> {
    state: &'a Mutex<State>,
    agent: &'a str,
}

impl Drop for Registering<'_> {
    fn drop(&mut self) {
        unmark(&mut lock(self.state).registering, self.agent);
    }
}

impl Inner {
    /// Asks again for the releases masters did not take (`State::owed`), at most
    /// [`MOVES_PER_ROUND`] and half a heartbeat interval per call; stops at a master that
    /// does not answer. An agent held at that master again (registered there since) is no
    /// longer owed: its seat there is the new one.
    pub(super) async fn settle_owed(&self) {
        let deadline = tokio::time::Instant::now() + self.cfg.heartbeat_interval / 2;
        for link in Master::ALL {
            // A master whose heartbeat is still unanswered would only make this round wait:
            // its releases stay owed until it answers again.
            if self.hangs(link) {
                continue;
            }
            let owed: Vec<String> = lock(&self.state)
                .owed
                .get(link)
                .iter()
                .take(MOVES_PER_ROUND)
                .cloned()
                .collect();
            for agent in owed {
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
                let Ok(_turn) = tokio::time::timeout_at(deadline, self.turns.take(&agent)).await
                else {
                    return;
                };
                {
                    let mut state = lock(&self.state);
                    let held_there = state.agents.get(&agent).is_some_and(|s| s.link == link);
                    if held_there || state.registering.contains_key(&agent) {
                        state.owed.get_mut(link).remove(&agent);
                        continue;
                    }
                    mark(&mut state.unregistering, &agent);
                }
                let in_flight = InFlight {
                    state: &self.state,
                    agent: &agent,
                    registering: false,
                    settled: false,
                };
                // Taken off first: a release that goes unanswered again is owed again.
                lock(&self.state).owed.get_mut(link).remove(&agent);
                let released = self.unregister_at(link, &agent).await;
                let unanswered = {
                    let mut state = lock(&self.state);
                    in_flight.settle(&mut state);
                    if released.is_err() {
                        state.owed.get_mut(link).insert(agent.clone());
                    }
                    state.owed.get(link).contains(&agent)
                };
                if unanswered {
                    break;
                }
                debug!(agent, master = link.name(), "an owed release was taken");
            }
        }
    }

    /// Moves the agents backup masters hold to the active master when the policy says so
    /// (`Policy::moves_back`), at most [`MOVES_PER_ROUND`] and half a heartbeat interval per
    /// call; stops at the first refusal for the total (`aggregate_limit`) or any other
    /// reason, and skips the rest of an agent type production refused (`type_limit`).
    pub(super) async fn move_back(&self) {
        let now = tokio::time::Instant::now();
        let deadline = now + self.cfg.heartbeat_interval / 2;
        let (to, candidates): (Master, Vec<(String, String, Master)>) = {
            let state = lock(&self.state);
            let from = self.policy.moves_back(
                state.active,
                state.connected(),
                PerMaster::from_fn(|m| state.links.get(m).context),
                state.restricted.is_some(),
            );
            let due = !from.is_empty() && state.moves_paused_until.is_none_or(|until| now >= until);
            if !due {
                return;
            }
            let candidates = state
                .agents
                .iter()
                .filter(|(agent, seat)| {
                    from.contains(&seat.link)
                        && !state.registering.contains_key(agent.as_str())
                        && !state.unregistering.contains_key(agent.as_str())
                })
                .take(MOVES_PER_ROUND)
                .map(|(agent, seat)| (agent.clone(), seat.agent_type.clone(), seat.link))
                .collect();
            (state.active, candidates)
        };
        let (mut moved, mut full) = (0u32, BTreeSet::new());
        for (agent, agent_type, from) in candidates {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            if full.contains(&agent_type) {
                continue;
            }
            match self.move_one(&agent, &agent_type, from, to, deadline).await {
                Moved::Yes => moved += 1,
                Moved::Skipped => {}
                Moved::Refused(reason) => {
                    lock(&self.state).moves_paused_until =
                        Some(tokio::time::Instant::now() + MOVE_RETRY);
                    debug!(
                        agent,
                        ?reason,
                        master = to.name(),
                        "production did not take a backup agent back"
                    );
                    if reason == Some(RejectReason::TypeLimit) {
                        full.insert(agent_type);
                    } else {
                        break;
                    }
                }
            }
        }
        if moved > 0 {
            info!(
                moved,
                master = to.name(),
                "agents moved from the backup master back to production"
            );
            self.metrics.moved_back(moved);
        }
    }

    /// Registers one agent the backup `from` holds at `to` (from `to`'s block when it has a
    /// free seat of the type) and, once approved, makes the seat `to`'s and releases it at
    /// the backup. An agent whose turn is not free by `deadline` (the host is registering
    /// or releasing it) is skipped.
    async fn move_one(
        &self,
        agent: &str,
        agent_type: &str,
        from: Master,
        to: Master,
        deadline: tokio::time::Instant,
    ) -> Moved {
        let Ok(_turn) = tokio::time::timeout_at(deadline, self.turns.take(agent)).await else {
            return Moved::Skipped;
        };
        let from_block = {
            let mut state = lock(&self.state);
            let held_at_backup = state
                .agents
                .get(agent)
                .is_some_and(|s| s.link == from && s.agent_type == agent_type);
            if !held_at_backup {
                return Moved::Skipped;
            }
            // Allotment mode: a free seat of the active master's block takes it, with no
            // message (journaled like any local admission).
            let now = tokio::time::Instant::now();
            let admitted = state.allot.get_mut(to).try_admit(now, agent, agent_type);
            if admitted.is_none() {
                // In flight: a heartbeat's books leave it out and a hello lists it as
                // pending, so neither master takes the seat it is being granted for a lost
                // one. Not in `pending`: the agent holds a seat already, so the local limit
                // counts it once.
                mark(&mut state.registering, agent);
            }
            admitted
        };
        if from_block.is_none() {
            let marked = Registering {
                state: &self.state,
                agent,
            };
            let attempt = self.attempt(to, agent, agent_type).await;
            drop(marked);
            match attempt {
                Ok(Attempt::Decided(Outcome::Approved { .. })) => {}
                Ok(Attempt::Decided(Outcome::Rejected { reason, .. }))
                | Ok(Attempt::Wait {
                    outcome: Outcome::Rejected { reason, .. },
                    ..
                }) => return Moved::Refused(Some(reason)),
                Ok(Attempt::Wait { .. }) | Ok(Attempt::Unavailable(_)) => {
                    return Moved::Refused(None);
                }
                Err(e) => {
                    warn!(agent, master = to.name(), error = %e, "moving an agent back to production failed");
                    return Moved::Refused(None);
                }
            }
        }
        let release = {
            let mut state = lock(&self.state);
            let still_at_backup = state.agents.get(agent).is_some_and(|s| s.link == from);
            if still_at_backup {
                // The active master's seat now; the backup's goes (journaled if from its
                // block).
                let release = state.begin_unregistration(agent);
                state.agents.insert(
                    agent.to_owned(),
                    Seat {
                        agent_type: agent_type.to_owned(),
                        link: to,
                        allot: from_block,
                    },
                );
                release
            } else {
                // Logged out meanwhile (the backup's window ended and a hello to it found
                // the seat gone): the host was told, so the seat just granted goes too.
                match from_block {
                    Some(n) => {
                        state.allot.get_mut(to).release(agent, agent_type, n);
                        return Moved::Skipped;
                    }
                    None => {
                        mark(&mut state.unregistering, agent);
                        Release::Send(Seat {
                            agent_type: agent_type.to_owned(),
                            link: to,
                            allot: None,
                        })
                    }
                }
            }
        };
        let Release::Send(seat) = release else {
            return Moved::Yes;
        };
        let in_flight = InFlight {
            state: &self.state,
            agent,
            registering: false,
            settled: false,
        };
        let connected = lock(&self.state).links.get(seat.link).connected && !self.hangs(seat.link);
        if connected {
            if let Err(e) = self.unregister_at(seat.link, agent).await {
                warn!(agent, error = %e, "releasing a moved agent's old seat failed");
            }
        } else {
            // Not asked now (no session, or its heartbeat is still unanswered): owed, asked
            // again every heartbeat round (`settle_owed`).
            lock(&self.state)
                .owed
                .get_mut(seat.link)
                .insert(agent.to_owned());
        }
        in_flight.settle(&mut lock(&self.state));
        if seat.link == to {
            Moved::Skipped
        } else {
            Moved::Yes
        }
    }
}
