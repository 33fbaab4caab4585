//! Registrations and unregistrations: the local limit, the masters asked in the policy's
//! order (failover and overflow), a hello when a session is lost, renumbering a refused
//! request number, and the seat table kept in step with the answers.

use lmbus_schemas::human::HumanDuration;
use lmbus_schemas::{
    Decision, RegisterRequest, RejectReason, Reply, SlaveEvent, SlaveOp, SlaveReport,
    UnregisterRequest,
};
use tracing::{debug, warn};
use uuid::Uuid;

use super::hello::HelloError;
use super::inner::Inner;
use super::state::{InFlight, Refusal, Release, Seat, State, lock};
use crate::error::SlaveError;
use crate::events::{LoggedOut, Outcome};

/// Most times one registration is asked again under a new number after the master said
/// its number was used (each time a copy sent earlier may have been decided meanwhile).
const MAX_RENUMBERS: u32 = 3;
use crate::link::Ask;
use crate::master::Master;
use crate::policy::{Answered, Policy, Switch};

/// The longest wait between two asks this slave accepts from a master's retry hint.
const MAX_RETRY_AFTER_MS: u64 = 1000;

/// Where one registration attempt ended.
pub(super) enum Attempt {
    Decided(Outcome),
    /// Refused for capacity while seats of slaves' blocks are being given back: ask again
    /// after `after` (`outcome` is the refusal, should the wait run out).
    Wait {
        outcome: Outcome,
        after: std::time::Duration,
    },
    /// This master cannot decide now; try another.
    Unavailable(String),
}

/// Where one try at a registration ended.
enum Step {
    /// Answered, at that instant.
    Decided(Outcome, tokio::time::Instant),
    /// The master said to ask again (seats of blocks are being given back); waited as told.
    Waited,
    /// The agent's admission or release was still in an unacknowledged journal; waited
    /// for it.
    Flushed,
}

/// A registration's answer, the master that gave it (`None`: none did, and the grace
/// policy answered) and, for a capacity refusal while blocks are being given back, how
/// long to wait before asking again.
struct Decided {
    outcome: Outcome,
    by: Option<Master>,
    retry_after: Option<std::time::Duration>,
}

/// What the locked part of one try at a registration decided (acted on by
/// `Inner::act_on`, once the lock is released).
struct Tried {
    /// The grace period ran out at this try: how many agents were logged out.
    restricted_now: Option<u32>,
    /// The next allot request is to go now (the block runs low, or could not serve this).
    wake: bool,
    next: Next,
}

/// A registration's strings for an admission from the block, made before the locks (what
/// is not used is dropped after them): the journal entry's and the seat table's.
struct Entry {
    journal: (String, String),
    seat: Option<(String, String)>,
}

impl Entry {
    fn new(agent_id: &str, agent_type: &str) -> Self {
        Self {
            journal: Self::names(agent_id, agent_type),
            seat: Some(Self::names(agent_id, agent_type)),
        }
    }

    fn names(agent_id: &str, agent_type: &str) -> (String, String) {
        (agent_id.to_owned(), agent_type.to_owned())
    }
}

/// Where the locked part of a try left a registration.
enum Next {
    /// Admitted from the active master's block: decided, with no message to anyone.
    Admitted,
    /// Refused by the local limit (recorded; reported to the master after the lock).
    LocalRejection(String),
    /// The agent's admission or release is in a journal the master has not acknowledged.
    Flush,
    /// To be asked of the masters (counted in `pending` and `registering`).
    Strict,
}

impl Inner {
    /// A registration asked at `asked`: its outcome, and when it was answered.
    pub(super) async fn register(
        &self,
        agent_id: &str,
        agent_type: &str,
        asked: tokio::time::Instant,
    ) -> Result<(Outcome, tokio::time::Instant), SlaveError> {
        validate(agent_id, agent_type)?;
        // The agent's turn. While no operation holds or waits for it, the first try decides
        // under the turns' lock, so no operation on the agent can start meanwhile: the same
        // as taking the turn first. A decision from the block awaits nothing and ends
        // there, needing no turn (no entry, no allocation); any other takes the turn before
        // the lock is released. Otherwise the turn is waited for, and a local decision is
        // timed from when it came.
        // (The turns' lock is let go by the end of this statement, before any await.)
        // The seat table's strings are made before the locks, not under them (what is not
        // used is dropped after them).
        let mut entry = Some(Entry::new(agent_id, agent_type));
        let decided_free = self.turns.free(agent_id).map(|free| {
            let tried = self.try_locally(agent_id, agent_type, true, false, &mut entry);
            let turn = match tried.next {
                Next::Admitted => {
                    drop(free);
                    None
                }
                _ => Some(free.take()),
            };
            (turn, tried)
        });
        let (_turn, mut tried, since) = match decided_free {
            Some((turn, tried)) => (turn, Some(tried), asked),
            None => {
                let turn = self.turns.take(agent_id).await;
                (Some(turn), None, tokio::time::Instant::now())
            }
        };
        // Allotment mode: a capacity refusal while other slaves give back seats of their
        // blocks is asked again (from the block first) until then.
        let mut wait_until = None;
        let mut waited_since = None;
        let (mut first, mut flushed) = (true, false);
        loop {
            // A local decision is timed from its try: the first from the call, or from the
            // turn when it had to wait for it.
            let tried_at = if first {
                since
            } else {
                tokio::time::Instant::now()
            };
            let tried = match tried.take() {
                Some(tried) => tried,
                None => self.try_locally(agent_id, agent_type, first, flushed, &mut entry),
            };
            first = false;
            match self
                .act_on(tried, agent_id, agent_type, tried_at, &mut wait_until)
                .await
            {
                Ok(Step::Waited) => {
                    waited_since.get_or_insert(tried_at);
                }
                // Once: a master that has not answered the journal by then is asked
                // strictly all the same (and decides as it can).
                Ok(Step::Flushed) => flushed = true,
                Ok(Step::Decided(outcome, at)) => {
                    if let Some(since) = waited_since {
                        self.metrics.allot_wait(at.saturating_duration_since(since));
                    }
                    return Ok((outcome, at));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The locked part of one try at a registration (`first`: its demand is not counted
    /// yet; `flushed`: the journal was waited for once already): the grace period, the
    /// local limit, a seat from the active master's block, or else a request to the
    /// masters counted in flight. A seat taken from the block is entered with `entry`'s
    /// strings when it still has them.
    fn try_locally(
        &self,
        agent_id: &str,
        agent_type: &str,
        first: bool,
        flushed: bool,
        entry: &mut Option<Entry>,
    ) -> Tried {
        let mut state = lock(&self.state);
        // One clock reading under the lock for the grace period and the block's lease.
        let now = tokio::time::Instant::now();
        // The grace period first (as `check_grace`), under the same lock.
        let restricted_now = self.restrict_if_grace_over(&mut state, now);
        let held = state.agents.contains_key(agent_id);
        // An admission or release of the agent is in a journal the master has not
        // acknowledged: a strict request now could reach the master first. A
        // re-registration would find no seat (the admission not applied yet) and log the
        // agent out; a registration after a release would find the agent still held
        // (already_held), and the journal's release would then take the seat the host was
        // just told it holds. The journal goes first. (Looked up only off the block's
        // path: it scans the journals.)
        let journaled = |state: &State| {
            !flushed
                && state.restricted.is_none()
                && state.allot.iter().any(|b| b.journaled(agent_id))
        };
        let used = state.agents.len() as u64 + u64::from(state.pending);
        let mut wake = false;
        let next = match Policy::local_rejection(self.local_limit, held, used) {
            // Allotment mode: a free seat of the active master's block decides it here,
            // with no message to anyone.
            None if !held && state.restricted.is_none() => {
                let active = state.active;
                let book = state.allot.get_mut(active);
                // The strings made before the lock, if any are left: one set goes into
                // the journal, one into the seat table.
                let (journal, seat) = match entry.take() {
                    Some(Entry { journal, seat }) => (journal, seat),
                    None => (Entry::names(agent_id, agent_type), None),
                };
                // Tried again: its demand was counted the first time.
                let admitted = if first {
                    book.try_admit(now, journal.0, journal.1)
                } else {
                    book.try_admit_again(now, journal.0, journal.1)
                };
                if let Some(n) = admitted {
                    // Running low: ask early (at most every quarter refresh).
                    wake = book.low(agent_type) && book.ask_early(now);
                    let (agent, agent_type) =
                        seat.unwrap_or_else(|| Entry::names(agent_id, agent_type));
                    state.agents.insert(
                        agent,
                        Seat {
                            agent_type,
                            link: active,
                            allot: Some(n),
                        },
                    );
                    Next::Admitted
                } else {
                    let early = book.ask_early(now);
                    if journaled(&state) {
                        wake = true;
                        Next::Flush
                    } else {
                        // Not from a block: asked strictly; the next allot request goes
                        // early so that the block catches up with the demand.
                        wake = early;
                        state.begin_registration(agent_id);
                        Next::Strict
                    }
                }
            }
            Some(detail) => {
                // `local_rejection` refuses only agents that hold no seat.
                self.refused(
                    &mut state,
                    LoggedOut {
                        agent_id: agent_id.to_owned(),
                        agent_type: agent_type.to_owned(),
                        reason: RejectReason::LocalLimit,
                        detail: detail.clone(),
                    },
                );
                Next::LocalRejection(detail)
            }
            None if journaled(&state) => {
                wake = true;
                Next::Flush
            }
            None => {
                state.begin_registration(agent_id);
                Next::Strict
            }
        };
        Tried {
            restricted_now,
            wake,
            next,
        }
    }

    /// Acts on what the locked part of a try decided (`since`: when the try began):
    /// decided, or to be tried again because the master said to ask again (seats are being
    /// given back) and `wait_until` has not passed, or because the agent was still named
    /// in the journal.
    async fn act_on(
        &self,
        tried: Tried,
        agent_id: &str,
        agent_type: &str,
        since: tokio::time::Instant,
        wait_until: &mut Option<tokio::time::Instant>,
    ) -> Result<Step, SlaveError> {
        if let Some(logged_out) = tried.restricted_now {
            self.announce_restricted(logged_out);
        }
        if tried.wake {
            self.allot_wake.notify_one();
        }
        match tried.next {
            Next::Admitted => {
                let at = tokio::time::Instant::now();
                self.metrics
                    .local_decision(at.saturating_duration_since(since));
                return Ok(Step::Decided(
                    Outcome::Approved {
                        already_held: false,
                    },
                    at,
                ));
            }
            Next::LocalRejection(detail) => {
                self.report_local_rejection(agent_id, agent_type, &detail)
                    .await;
                return Ok(Step::Decided(
                    Outcome::Rejected {
                        reason: RejectReason::LocalLimit,
                        detail,
                    },
                    tokio::time::Instant::now(),
                ));
            }
            Next::Flush => {
                self.wait_for_journal(agent_id).await;
                return Ok(Step::Flushed);
            }
            Next::Strict => {}
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
        let wait = {
            let mut state = lock(&self.state);
            in_flight.settle(&mut state);
            let Decided {
                mut outcome,
                by: granted_by,
                retry_after,
            } = decided?;
            let now = tokio::time::Instant::now();
            let wait = match (retry_after, granted_by) {
                (Some(after), Some(by)) => {
                    let allowed = state.allot.get(by).return_wait();
                    let until = *wait_until.get_or_insert(now + allowed);
                    let wait = (now + after < until).then_some(after);
                    if wait.is_none()
                        && let Outcome::Rejected { detail, .. } = &mut outcome
                    {
                        detail.push_str(&format!(
                            ", but none came back within {}",
                            HumanDuration(allowed)
                        ));
                    }
                    wait
                }
                _ => None,
            };
            if wait.is_none() {
                match state.record_decision(agent_id, agent_type, &outcome, granted_by) {
                    Some(Refusal::LoggedOut(out)) => self.logged_out(&mut state, out),
                    Some(Refusal::Refused(out)) => self.refused(&mut state, out),
                    None => {}
                }
                return Ok(Step::Decided(outcome, now));
            }
            wait
        };
        if let Some(after) = wait {
            debug!(
                agent = agent_id,
                "no free seat while seats of other blocks are given back; asking again"
            );
            tokio::time::sleep(after).await;
        }
        Ok(Step::Waited)
    }

    /// Waits until no journal holds an unacknowledged entry naming `agent_id` (the allot
    /// request that carries it is answered), for at most two request timeouts: a master
    /// that does not answer by then will not decide a strict request either.
    async fn wait_for_journal(&self, agent_id: &str) {
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout * 2;
        loop {
            let pending = lock(&self.state)
                .allot
                .iter()
                .any(|b| b.journaled(agent_id));
            if !pending || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
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
    ) -> Result<Decided, SlaveError> {
        let mut order = {
            let state = lock(&self.state);
            self.policy
                .ask_order(state.agents.get(agent_id).map(|s| s.link), state.active)
        };
        while let Some(link) = order.next() {
            match self.attempt(link, agent_id, agent_type).await? {
                Attempt::Unavailable(detail) => order.unavailable(detail),
                // Seats come back to this master's pool soon: no overflow meanwhile.
                Attempt::Wait { outcome, after } => {
                    return Ok(Decided {
                        outcome,
                        by: Some(link),
                        retry_after: Some(after),
                    });
                }
                Attempt::Decided(outcome) => match order.decided(outcome) {
                    Some(Answered {
                        outcome,
                        by,
                        switch,
                    }) => {
                        if let Some(Switch { to, reason }) = switch {
                            self.switch(to, reason);
                        }
                        return Ok(Decided {
                            outcome,
                            by: Some(by),
                            retry_after: None,
                        });
                    }
                    None => debug!(
                        agent = agent_id,
                        "the primary is full; overflowing to the secondary"
                    ),
                },
            }
        }
        let detail = order.no_master();
        Ok(Decided {
            outcome: self.without_master(agent_id, detail),
            by: None,
            retry_after: None,
        })
    }

    /// One master's decision on a registration; says hello first if the session is not
    /// live, and once more if the master lost it meanwhile.
    pub(super) async fn attempt(
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
                Err(HelloError::Refused { reason, detail, .. }) => {
                    return Ok(Attempt::Decided(Outcome::Rejected { reason, detail }));
                }
                Err(HelloError::Unavailable(detail)) => return Ok(Attempt::Unavailable(detail)),
            }
        }
        let (mut said_hello_again, mut renumbered) = (false, 0u32);
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
                    ..
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
                        Err(HelloError::Refused { reason, detail, .. }) => {
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
                    ..
                }) if renumbered < MAX_RENUMBERS => {
                    // We did not replay it: a new leader assumes every number up to the
                    // last one its ledger shows was used, and a copy of it sent before an
                    // answer of `no_leader` (the master's ledger stalled) may have been
                    // decided since. Ask again under a new number: registering is
                    // idempotent per agent.
                    debug!(master = link.name(), %detail, "request number refused; renumbering");
                    renumbered += 1;
                    request.seq = self.next_request_seq();
                }
                Reply::Decision(Decision::Rejected {
                    reason,
                    detail,
                    retry_after_ms: Some(ms),
                }) if matches!(
                    reason,
                    RejectReason::AggregateLimit | RejectReason::TypeLimit
                ) =>
                {
                    return Ok(Attempt::Wait {
                        outcome: Outcome::Rejected { reason, detail },
                        after: std::time::Duration::from_millis(ms.min(MAX_RETRY_AFTER_MS)),
                    });
                }
                Reply::Decision(Decision::Rejected { reason, detail, .. }) => {
                    return Ok(Attempt::Decided(Outcome::Rejected { reason, detail }));
                }
                Reply::Error(e) => return Err(SlaveError::InvalidInput(e.to_string())),
                other => {
                    return Err(SlaveError::Protocol(format!("{other:?} to a registration")));
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

    pub(super) async fn unregister(&self, agent_id: &str) -> Result<bool, SlaveError> {
        if agent_id.is_empty() {
            return Err(SlaveError::InvalidInput("agent id is empty".into()));
        }
        // As for a registration: while the agent's turn is free, the release is decided
        // under the turns' lock, and only one that sends a message takes the turn.
        let decided_free = self.turns.free(agent_id).map(|free| {
            let release = lock(&self.state).begin_unregistration(agent_id);
            match release {
                Release::Send(_) => (Some(free.take()), release),
                Release::NotHeld | Release::Journaled { .. } => {
                    drop(free);
                    (None, release)
                }
            }
        });
        let (_turn, release) = match decided_free {
            Some(decided) => decided,
            None => {
                let turn = self.turns.take(agent_id).await;
                let release = lock(&self.state).begin_unregistration(agent_id);
                (Some(turn), release)
            }
        };
        let seat = match release {
            Release::NotHeld => return Ok(false),
            Release::Journaled { .. } => return Ok(true),
            Release::Send(seat) => seat,
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

    pub(super) async fn unregister_at(
        &self,
        link: Master,
        agent_id: &str,
    ) -> Result<bool, SlaveError> {
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
            Ask::Unavailable(detail) => {
                lock(&self.state)
                    .owed
                    .get_mut(link)
                    .insert(agent_id.to_owned());
                self.set_disconnected(link, detail);
            }
        }
        Ok(true)
    }
}

/// The protocol crate's rules, the ones the master applies: an id or type it would refuse
/// is refused here first, so nothing this slave holds can make its hellos invalid.
fn validate(agent_id: &str, agent_type: &str) -> Result<(), SlaveError> {
    lmbus_schemas::validate::check_agent_id(agent_id)
        .and_then(|()| lmbus_schemas::validate::check_agent_type(agent_type))
        .map_err(|e| SlaveError::InvalidInput(e.to_string()))
}
