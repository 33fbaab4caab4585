//! The handback, slave side: once the primary is the active master again and answers
//! while a backup secondary holds some of this slave's agents, those agents are
//! registered at the primary one by one, and each one the primary approves is released at
//! the backup. The host's agents keep working through the move; only those the primary
//! cannot admit stay at the backup, whose handback window then logs them out.

use std::collections::BTreeSet;
use std::time::Duration;

use lmbus_schemas::RejectReason;
use tracing::{debug, info, warn};

use super::inner::Inner;
use super::register::Attempt;
use super::state::{InFlight, Release, Seat, lock, mark, unmark};
use crate::events::Outcome;
use crate::master::Master;

/// Most agents moved in one heartbeat round (the round waits for them).
const MOVES_PER_ROUND: usize = 64;

/// After the primary refused a move for capacity (or did not answer), the next try waits
/// this long: each refusal is a `registration_rejected` alert at the primary, so a primary
/// that stays full is asked a few times per handback window, not every heartbeat.
const MOVE_RETRY: Duration = Duration::from_secs(10);

/// Where one move ended.
enum Moved {
    /// The primary holds the seat now, and the backup was told to release it.
    Yes,
    /// The agent was released, or logged out, or moved by someone else meanwhile.
    Gone,
    /// The primary refused it (the reason), or could not decide now (`None`).
    Refused(Option<RejectReason>),
}

impl Inner {
    /// Moves the agents a backup secondary holds to the primary when the policy says so
    /// (`Policy::moves_back`), at most [`MOVES_PER_ROUND`] per call; stops at the first
    /// refusal for the total (`aggregate_limit`) or any other reason, and skips the rest of
    /// an agent type the primary refused (`type_limit`).
    pub(super) async fn move_back(&self) {
        let now = tokio::time::Instant::now();
        let candidates: Vec<(String, String)> = {
            let state = lock(&self.state);
            let due = self.policy.moves_back(
                state.active,
                state.connected(),
                state.links.secondary.context,
                state.restricted.is_some(),
            ) && state.moves_paused_until.is_none_or(|until| now >= until);
            if !due {
                return;
            }
            state
                .agents
                .iter()
                .filter(|(agent, seat)| {
                    seat.link == Master::Secondary
                        && !state.registering.contains_key(agent.as_str())
                        && !state.unregistering.contains_key(agent.as_str())
                })
                .take(MOVES_PER_ROUND)
                .map(|(agent, seat)| (agent.clone(), seat.agent_type.clone()))
                .collect()
        };
        let (mut moved, mut full) = (0u32, BTreeSet::new());
        for (agent, agent_type) in candidates {
            if full.contains(&agent_type) {
                continue;
            }
            match self.move_one(&agent, &agent_type).await {
                Moved::Yes => moved += 1,
                Moved::Gone => {}
                Moved::Refused(reason) => {
                    lock(&self.state).moves_paused_until =
                        Some(tokio::time::Instant::now() + MOVE_RETRY);
                    debug!(
                        agent,
                        ?reason,
                        "the primary did not take a backup agent back"
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
                "agents moved from the backup master back to the primary"
            );
            self.metrics.moved_back(moved);
        }
    }

    /// Registers one agent the backup holds at the primary and, once approved, makes the
    /// seat the primary's and releases it at the backup.
    async fn move_one(&self, agent: &str, agent_type: &str) -> Moved {
        let _turn = self.turns.take(agent).await;
        {
            let mut state = lock(&self.state);
            let held_at_backup = state
                .agents
                .get(agent)
                .is_some_and(|s| s.link == Master::Secondary && s.agent_type == agent_type);
            if !held_at_backup {
                return Moved::Gone;
            }
            // In flight: a heartbeat's books leave it out and a hello lists it as pending,
            // so neither master takes the seat it is being granted for a lost one. Not in
            // `pending`: the agent holds a seat already, so the local limit counts it once.
            mark(&mut state.registering, agent);
        }
        let attempt = self.attempt(Master::Primary, agent, agent_type).await;
        let release = {
            let mut state = lock(&self.state);
            unmark(&mut state.registering, agent);
            match attempt {
                Ok(Attempt::Decided(Outcome::Approved { .. })) => {}
                Ok(Attempt::Decided(Outcome::Rejected { reason, .. })) => {
                    return Moved::Refused(Some(reason));
                }
                Ok(Attempt::Wait { .. }) => {
                    return Moved::Refused(Some(RejectReason::AggregateLimit));
                }
                Ok(Attempt::Unavailable(_)) => return Moved::Refused(None),
                Err(e) => {
                    warn!(agent, error = %e, "moving an agent to the primary failed");
                    return Moved::Refused(None);
                }
            }
            let still_at_backup = state
                .agents
                .get(agent)
                .is_some_and(|s| s.link == Master::Secondary);
            if still_at_backup {
                // The primary's seat now; the backup's goes (journaled if from a block).
                let release = state.begin_unregistration(agent);
                state.agents.insert(
                    agent.to_owned(),
                    Seat {
                        agent_type: agent_type.to_owned(),
                        link: Master::Primary,
                        allot: None,
                    },
                );
                release
            } else {
                // Logged out by the backup meanwhile (its window ended): the host was told,
                // so the seat just granted goes back too.
                mark(&mut state.unregistering, agent);
                Release::Send(Seat {
                    agent_type: agent_type.to_owned(),
                    link: Master::Primary,
                    allot: None,
                })
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
        let released = self.unregister_at(seat.link, agent).await;
        in_flight.settle(&mut lock(&self.state));
        if let Err(e) = released {
            warn!(agent, error = %e, "releasing a moved agent's old seat failed");
        }
        if seat.link == Master::Primary {
            Moved::Gone
        } else {
            Moved::Yes
        }
    }
}
