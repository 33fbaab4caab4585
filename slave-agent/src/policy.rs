//! The slave's decisions, pure: which master new registrations go to, which masters a
//! registration asks and in what order (failover, overflow), how long a request rides
//! through a master's silence before the master counts as lost, when the grace period ends,
//! what the restriction does and what a registration gets while no master answers.
//!
//! Plain values and `now` go in, a decision comes out: no awaits, no NATS, no locks. The
//! agent (`agent/`) holds the state under its lock and does the IO, and asks the
//! [`Policy`] at each point where a rule applies, so every rule is tested here with plain
//! values (`tests` below) and the integration tests only have to show the wiring.

use std::time::Duration;

use lmbus_schemas::RejectReason;
use tokio::time::Instant;

use crate::config::{GracePolicy, Restriction, ReturnPolicy, SlaveConfig};
use crate::events::{LoggedOut, Outcome};
use crate::master::{Master, PerMaster};

/// First pause between retries of an unanswered request; doubles up to the cap.
pub(crate) const RETRY_BACKOFF: Duration = Duration::from_millis(25);
const RETRY_BACKOFF_CAP: Duration = Duration::from_millis(200);

/// The rules of one slave, from its configuration.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    has_secondary: bool,
    return_policy: ReturnPolicy,
    overflow: bool,
    switch_delay: Duration,
    request_timeout: Duration,
    failover_wait: Duration,
    election_wait: Duration,
    grace_period: Duration,
    during_grace: GracePolicy,
    after_grace: Restriction,
}

/// Make `to` the master new registrations go to, for `reason` (told to the host in
/// `AgentEvent::Switched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Switch {
    pub(crate) to: Master,
    pub(crate) reason: &'static str,
}

/// The grace period ran out: the slave is restricted from `now` on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Restrict {
    /// Every agent is logged out (`logout-all`); otherwise they keep their seats and only
    /// new registrations are refused.
    pub(crate) log_out_all: bool,
    /// Why, for each agent logged out: `restricted`, or `reclaimed` when the silence lasted
    /// past the point where the master may have given the seats to others.
    pub(crate) reason: RejectReason,
    pub(crate) detail: String,
}

impl Restrict {
    /// What the host is told about one agent this restriction logs out.
    pub(crate) fn logout(&self, agent_id: String, agent_type: String) -> LoggedOut {
        LoggedOut {
            agent_id,
            agent_type,
            reason: self.reason,
            detail: self.detail.clone(),
        }
    }
}

impl Policy {
    pub(crate) fn new(cfg: &SlaveConfig) -> Self {
        Self {
            has_secondary: cfg.secondary.is_some(),
            return_policy: cfg.return_policy,
            overflow: cfg.overflow,
            switch_delay: cfg.switch_delay,
            request_timeout: cfg.request_timeout,
            failover_wait: cfg.failover_wait,
            election_wait: cfg.election_wait,
            grace_period: cfg.grace_period,
            during_grace: cfg.during_grace,
            after_grace: cfg.after_grace,
        }
    }

    pub(crate) fn has_secondary(&self) -> bool {
        self.has_secondary
    }

    /// The configured masters, the primary first.
    pub(crate) fn masters(&self) -> impl Iterator<Item = Master> {
        std::iter::once(Master::Primary).chain(self.has_secondary.then_some(Master::Secondary))
    }

    // ---- requests: when a master counts as lost ----

    /// Whether an unanswered request (or one the brokers answered with `no_leader`) is sent
    /// again after `backoff`. A master already known to be lost (`ride_through` false) gets
    /// one try, so requests during an outage fail fast instead of waiting out the failover
    /// window each time. Once the brokers have said they are electing (`saw_election`),
    /// silence in between (a replica stepping down, the lease changing hands) is part of the
    /// same election and the longer `election_wait` applies.
    pub(crate) fn retry(
        &self,
        ride_through: bool,
        saw_election: bool,
        elapsed: Duration,
        backoff: Duration,
    ) -> bool {
        let wait = if saw_election {
            self.election_wait.max(self.failover_wait)
        } else {
            self.failover_wait
        };
        ride_through && elapsed + backoff < wait
    }

    /// The pause before the retry after one of `backoff`.
    pub(crate) fn next_backoff(backoff: Duration) -> Duration {
        (backoff * 2).min(RETRY_BACKOFF_CAP)
    }

    pub(crate) fn election_wait(&self) -> Duration {
        self.election_wait
    }

    /// The longest a request can take before this slave counts the master as lost (what a
    /// hello tells the master, which sizes its reclaim margin on it).
    pub(crate) fn longest_request(&self) -> Duration {
        self.request_timeout + self.failover_wait.max(self.election_wait)
    }

    /// Whether an answer from the primary this late counts as slow (a reason to switch).
    pub(crate) fn too_slow(&self, latency: Duration) -> bool {
        latency > self.switch_delay
    }

    // ---- which master ----

    /// Fails over when the active master is gone (or the primary is too slow) and the other
    /// one answers; returns to the primary by policy. `primary_slow`: the primary answered
    /// slower than the switch delay since the last decision.
    pub(crate) fn choose_active(
        &self,
        active: Master,
        connected: PerMaster<bool>,
        primary_slow: bool,
    ) -> Option<Switch> {
        if !self.has_secondary {
            return None;
        }
        let (primary_ok, secondary_ok) = (connected.primary, connected.secondary);
        let to = |to, reason| Some(Switch { to, reason });
        if active == Master::Primary {
            if !primary_ok && secondary_ok {
                to(Master::Secondary, "the primary master does not answer")
            } else if primary_slow && secondary_ok {
                to(
                    Master::Secondary,
                    "the primary master answers slower than the switch delay",
                )
            } else {
                None
            }
        } else if primary_ok && !primary_slow && self.return_policy == ReturnPolicy::ReturnToPrimary
        {
            to(
                Master::Primary,
                "the primary master answers again (return-to-primary)",
            )
        } else if !secondary_ok && primary_ok {
            to(Master::Primary, "the secondary master does not answer")
        } else {
            None
        }
    }

    /// The masters one heartbeat round talks to (a heartbeat when the session is live, a
    /// hello when not): the active one, every one holding seats of this slave, and the
    /// primary while on the secondary when the policy is to return to it (the probe).
    pub(crate) fn heartbeat_targets(
        &self,
        active: Master,
        holds_seats: PerMaster<bool>,
    ) -> Vec<Master> {
        self.masters()
            .filter(|&master| {
                let probe_primary = master == Master::Primary
                    && active != Master::Primary
                    && self.return_policy == ReturnPolicy::ReturnToPrimary;
                master == active || *holds_seats.get(master) || probe_primary
            })
            .collect()
    }

    /// After a heartbeat round: the other master to say hello to now, because the active
    /// one just failed (or the primary is too slow) and the other one is not ready to take
    /// over.
    pub(crate) fn prepare_other(
        &self,
        active: Master,
        connected: PerMaster<bool>,
        primary_slow: bool,
    ) -> Option<Master> {
        if !self.has_secondary {
            return None;
        }
        let other = active.other();
        let wanted = !*connected.get(active) || (active == Master::Primary && primary_slow);
        (wanted && !*connected.get(other)).then_some(other)
    }

    // ---- registrations ----

    /// The local limit: the detail of the rejection when a new agent (`held` false) would
    /// exceed it, with `used` seats held or asked for.
    pub(crate) fn local_rejection(limit: Option<u32>, held: bool, used: u64) -> Option<String> {
        match limit {
            Some(limit) if !held && used >= u64::from(limit) => {
                Some(format!("local limit of {limit} agents reached"))
            }
            _ => None,
        }
    }

    /// The masters to ask for a registration, in order: the one holding the agent's seat
    /// for a re-registration; otherwise the active master, then the other one.
    pub(crate) fn ask_order(&self, held_on: Option<Master>, active: Master) -> AskOrder {
        let order = match held_on {
            Some(master) => vec![master],
            None if self.has_secondary => vec![active, active.other()],
            None => vec![Master::Primary],
        };
        AskOrder {
            current: Master::Primary,
            order,
            asked: 0,
            held: held_on.is_some(),
            overflow: self.overflow,
            overflowing: false,
            unavailable: Vec::new(),
        }
    }

    /// Whether a rejected agent keeps the seat it holds: an agent refused a second seat of
    /// another type keeps the one it has.
    pub(crate) fn keeps_seat(reason: RejectReason) -> bool {
        reason == RejectReason::AgentTypeMismatch
    }

    /// The answer to a registration no master could decide (`detail` says why): refused
    /// once restricted, and during the grace period by the `during_grace` policy
    /// (`Approved` admits it locally).
    pub(crate) fn without_master(&self, restricted: bool, detail: String) -> Outcome {
        if restricted {
            return Outcome::Rejected {
                reason: RejectReason::Restricted,
                detail: format!("no master for the whole grace period ({detail})"),
            };
        }
        match self.during_grace {
            GracePolicy::Refuse => Outcome::Rejected {
                reason: RejectReason::MasterUnavailable,
                detail,
            },
            GracePolicy::Allow => Outcome::Approved {
                already_held: false,
            },
        }
    }

    // ---- grace and restriction ----

    /// When the grace period ends if no master answers before (none once restricted).
    /// `last_contact`: when the last request that any master answered was sent.
    pub(crate) fn grace_deadline(
        &self,
        last_contact: Instant,
        restricted: bool,
    ) -> Option<Instant> {
        (!restricted).then(|| last_contact + self.grace_period + Duration::from_millis(1))
    }

    /// How much of the grace period is left at `now`.
    pub(crate) fn grace_left(&self, now: Instant, last_contact: Instant) -> Duration {
        (last_contact + self.grace_period).saturating_duration_since(now)
    }

    /// The restriction, once no master has answered for the whole grace period (`None`
    /// before that, and when already restricted).
    pub(crate) fn restriction(
        &self,
        now: Instant,
        last_contact: Instant,
        restricted: bool,
    ) -> Option<Restrict> {
        let silent = now.saturating_duration_since(last_contact);
        if restricted || silent <= self.grace_period {
            return None;
        }
        // Past the grace period plus the least reclaim margin a master may use (the timing
        // rule), the master may already have given these seats to others: this process was
        // frozen or its clock stopped, and its hosts must hear that the seats are gone.
        let least_margin = self.longest_request() + self.grace_period / 100;
        let (reason, detail) = if silent > self.grace_period + least_margin {
            (
                RejectReason::Reclaimed,
                format!(
                    "no master answered for {} s, past the grace period and the reclaim margin (was this process paused?): the master may have given the seat to another agent",
                    silent.as_secs()
                ),
            )
        } else {
            (
                RejectReason::Restricted,
                "no master answered for the whole grace period".to_owned(),
            )
        };
        Some(Restrict {
            log_out_all: self.after_grace == Restriction::LogoutAll,
            reason,
            detail,
        })
    }

    /// Whether the master may reclaim this slave's seats after the grace period (a hello
    /// tells it): only when the slave logs its agents out then.
    pub(crate) fn logout_after_grace(&self) -> bool {
        self.after_grace == Restriction::LogoutAll
    }

    pub(crate) fn grace_period(&self) -> Duration {
        self.grace_period
    }

    pub(crate) fn after_grace(&self) -> Restriction {
        self.after_grace
    }
}

/// The masters one registration asks, in turn, and what their answers come to. The agent
/// asks [`AskOrder::next`] and reports each answer back until it gets a final one.
#[derive(Debug)]
pub(crate) struct AskOrder {
    order: Vec<Master>,
    /// How many of `order` were handed out.
    asked: usize,
    /// The master last handed out (the primary until the first).
    current: Master,
    /// A re-registration: it goes to the seat's master only, and never switches.
    held: bool,
    overflow: bool,
    /// The primary rejected for capacity and the secondary is being asked instead.
    overflowing: bool,
    /// Why each master asked so far did not grant the seat.
    unavailable: Vec<String>,
}

/// A master's final answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answered {
    pub(crate) outcome: Outcome,
    /// The master that decided (and, when approved, holds the seat).
    pub(crate) by: Master,
    /// The active master could not answer and the other one granted the seat: fail over.
    pub(crate) switch: Option<Switch>,
}

impl AskOrder {
    /// The next master to ask, `None` when every one was asked.
    pub(crate) fn next(&mut self) -> Option<Master> {
        let master = self.order.get(self.asked).copied()?;
        self.asked += 1;
        self.current = master;
        Some(master)
    }

    /// The master last handed out (the primary until the first).could not decide now (`detail` says why).
    pub(crate) fn unavailable(&mut self, detail: String) {
        self.unavailable.push(detail);
    }

    /// The master last handed out (the primary until the first).decided: the final answer, or `None` when it is the
    /// primary's capacity rejection and overflow sends the agent to the secondary.
    pub(crate) fn decided(&mut self, outcome: Outcome) -> Option<Answered> {
        let by = self.current;
        // Not the first master asked: the active one could not answer (or was full).
        let later = self.asked > 1;
        match outcome {
            Outcome::Approved { .. } => {
                let switch = (later && !self.held && !self.overflowing).then_some(Switch {
                    to: by,
                    reason: "the other master does not answer",
                });
                Some(Answered {
                    outcome,
                    by,
                    switch,
                })
            }
            Outcome::Rejected { reason, detail } => {
                let capacity = matches!(
                    reason,
                    RejectReason::AggregateLimit | RejectReason::TypeLimit
                );
                if self.overflow
                    && capacity
                    && by == Master::Primary
                    && self.asked < self.order.len()
                {
                    self.overflowing = true;
                    self.unavailable
                        .push(format!("the primary master rejected: {reason}: {detail}"));
                    return None;
                }
                Some(Answered {
                    outcome: Outcome::Rejected { reason, detail },
                    by,
                    switch: None,
                })
            }
        }
    }

    /// Why no master decided, once every one was asked: each one's reason, in order.
    pub(crate) fn no_master(self) -> String {
        self.unavailable.join("; ")
    }
}
