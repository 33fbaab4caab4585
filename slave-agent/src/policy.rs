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

use lmbus_schemas::{Context, RejectReason};
use tokio::time::Instant;

use crate::config::{GracePolicy, Restriction, ReturnPolicy, SlaveConfig};
use crate::events::{LoggedOut, Outcome};
use crate::master::{Master, PerMaster};
use crate::status::SlaveMode;

/// First pause between retries of an unanswered request; doubles up to the cap.
pub(crate) const RETRY_BACKOFF: Duration = Duration::from_millis(25);
const RETRY_BACKOFF_CAP: Duration = Duration::from_millis(200);

/// The rules of one slave, from its configuration.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    has_secondary: bool,
    has_backup: bool,
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
            has_backup: cfg.backup.is_some(),
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

    /// Whether this slave names more than one master (a secondary, a backup or both).
    pub(crate) fn has_others(&self) -> bool {
        self.has_secondary || self.has_backup
    }

    /// The configured masters, the primary first and a backup last.
    pub(crate) fn masters(&self) -> impl Iterator<Item = Master> {
        std::iter::once(Master::Primary)
            .chain(self.has_secondary.then_some(Master::Secondary))
            .chain(self.has_backup.then_some(Master::Backup))
    }

    /// The configured production masters (every one but a backup), the primary first.
    fn production(&self) -> impl Iterator<Item = Master> {
        self.masters().filter(|&m| m != Master::Backup)
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
    ///
    /// A backup master is chosen only when no production master (the primary, the
    /// secondary) answers, and is left for the first one that answers again, whatever the
    /// return policy: a backup license may only be used while production cannot serve.
    /// "Does not answer" is the failover detection: a master counts as lost once a request
    /// rode through `failover_wait` (or `election_wait`) unanswered.
    pub(crate) fn choose_active(
        &self,
        active: Master,
        connected: PerMaster<bool>,
        primary_slow: bool,
    ) -> Option<Switch> {
        let to = |to, reason| Some(Switch { to, reason });
        let answering = self.production().find(|&m| *connected.get(m));
        if active == Master::Backup {
            return match answering {
                Some(Master::Primary) => to(
                    Master::Primary,
                    "the primary master answers again (a backup serves only while production cannot)",
                ),
                Some(_) => to(
                    Master::Secondary,
                    "the secondary master answers again (a backup serves only while production cannot)",
                ),
                None => None,
            };
        }
        if self.has_backup && answering.is_none() && connected.backup {
            return to(Master::Backup, "no production master answers");
        }
        if !self.has_secondary {
            return None;
        }
        let (primary_ok, secondary_ok) = (connected.primary, connected.secondary);
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
    /// hello when not): the active one, every one holding seats of this slave, the primary
    /// while on the secondary when the policy is to return to it (the probe), and every
    /// production master while on the backup (which is left as soon as one answers).
    pub(crate) fn heartbeat_targets(
        &self,
        active: Master,
        holds_seats: PerMaster<bool>,
    ) -> Vec<Master> {
        self.masters()
            .filter(|&master| {
                let probe_primary = master == Master::Primary
                    && active == Master::Secondary
                    && self.return_policy == ReturnPolicy::ReturnToPrimary;
                let probe_production = active == Master::Backup && master != Master::Backup;
                master == active || *holds_seats.get(master) || probe_primary || probe_production
            })
            .collect()
    }

    /// The handback: the masters whose agents go back to the active master now. Those are
    /// the backup masters among the others (a welcome said context `backup`: the backup
    /// slot, or a secondary that is a backup), whose seats stand in for production's until
    /// production is back; only while the active master is not a backup itself, answers,
    /// and usage is not restricted. A master of any other context keeps its seats until
    /// they are released, as before.
    pub(crate) fn moves_back(
        &self,
        active: Master,
        connected: PerMaster<bool>,
        contexts: PerMaster<Option<Context>>,
        restricted: bool,
    ) -> Vec<Master> {
        // The backup slot stands in for production whatever its welcome said (a
        // misconfigured master there still hands back); another master, by its context.
        let backup = |m: Master| m == Master::Backup || *contexts.get(m) == Some(Context::Backup);
        if restricted || !*connected.get(active) || backup(active) {
            return Vec::new();
        }
        self.masters()
            .filter(|&m| m != active && backup(m))
            .collect()
    }

    /// After a heartbeat round: the other masters to say hello to now, in turn until one
    /// accepts, because the active one just failed (or the primary is too slow) and no
    /// other production master is ready to take over. A backup master comes last, only when
    /// the active master failed (never for slowness), and a backup that still counts as
    /// connected (from before) never stands in for a hello to a production master.
    pub(crate) fn prepare_other(
        &self,
        active: Master,
        connected: PerMaster<bool>,
        primary_slow: bool,
    ) -> Vec<Master> {
        let failed = !*connected.get(active);
        let slow = active == Master::Primary && primary_slow;
        if !failed && !slow {
            return Vec::new();
        }
        let production: Vec<Master> = self.production().filter(|&m| m != active).collect();
        if production.iter().any(|&m| *connected.get(m)) {
            return Vec::new();
        }
        let backup = failed && self.has_backup && active != Master::Backup && !connected.backup;
        production
            .into_iter()
            .chain(backup.then_some(Master::Backup))
            .collect()
    }

    /// The other masters a heartbeat to `to` tells about, as one (`MasterUse::other`: their
    /// seats added up), so that master's status shows where else the slave is served: for a
    /// production master its backup master when one is configured, else the other
    /// production master; for the backup, every production master. Empty with one master.
    pub(crate) fn others_to_show(&self, to: Master) -> Vec<Master> {
        match to {
            Master::Backup => self.production().collect(),
            _ if self.has_backup => vec![Master::Backup],
            _ => self.production().filter(|&m| m != to).collect(),
        }
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
    /// for a re-registration; otherwise the active master, then the other production
    /// master, then a backup master (asked only after every production master could not
    /// answer this request).
    pub(crate) fn ask_order(&self, held_on: Option<Master>, active: Master) -> AskOrder {
        let order = match held_on {
            Some(master) => vec![master],
            None => std::iter::once(active)
                .chain(self.masters().filter(|&m| m != active))
                .collect(),
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

    /// The slave's mode: connected while any master answers, then in grace until the
    /// restriction.
    pub(crate) fn mode(any_connected: bool, restricted: bool) -> SlaveMode {
        if any_connected {
            SlaveMode::Connected
        } else if restricted {
            SlaveMode::Restricted
        } else {
            SlaveMode::Grace
        }
    }

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
        // Overflow is production's: a backup master is never asked for a primary's capacity.
        if self.overflowing && master == Master::Backup {
            return None;
        }
        self.asked += 1;
        self.current = master;
        Some(master)
    }

    /// The master last handed out could not decide now (`detail` says why).
    pub(crate) fn unavailable(&mut self, detail: String) {
        self.unavailable.push(detail);
    }

    /// The master last handed out decided: the final answer, or `None` when the next master
    /// is asked instead (the primary's capacity rejection with overflow on, or a backup
    /// master that may not serve while production masters are left to ask).
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
                // A backup master that may not serve now (production is up, or another
                // backup serves) is as good as unavailable while production masters are
                // left to ask: the slave was on the backup and production is back.
                let may_not_serve = matches!(
                    reason,
                    RejectReason::ProductionAvailable | RejectReason::LicenseInUse
                );
                if by == Master::Backup && may_not_serve && self.asked < self.order.len() {
                    self.unavailable
                        .push(format!("the backup master refused: {reason}: {detail}"));
                    return None;
                }
                let capacity = matches!(
                    reason,
                    RejectReason::AggregateLimit | RejectReason::TypeLimit
                );
                if self.overflow
                    && capacity
                    && by == Master::Primary
                    && self.order.get(self.asked) == Some(&Master::Secondary)
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

#[cfg(test)]
mod tests {
    use lmbus_schemas::SlaveId;

    use super::*;
    use crate::config::MasterEndpoint;

    const GRACE: Duration = Duration::from_secs(120);

    /// A slave's policy with two masters (the defaults otherwise: return-to-primary, no
    /// overflow, refuse during grace, log out all after it), changed by `change`.
    fn policy(change: impl FnOnce(&mut SlaveConfig)) -> Policy {
        let slave = SlaveId::new("s1").unwrap();
        let mut cfg = SlaveConfig::new("nats://127.0.0.1:4222", "main", slave);
        cfg.secondary = Some(MasterEndpoint {
            nats_url: "nats://127.0.0.1:4223".to_owned(),
            nats_auth: Default::default(),
            cluster: "backup".to_owned(),
        });
        cfg.grace_period = GRACE;
        change(&mut cfg);
        Policy::new(&cfg)
    }

    fn up(primary: bool, secondary: bool) -> PerMaster<bool> {
        up3(primary, secondary, false)
    }

    fn up3(primary: bool, secondary: bool, backup: bool) -> PerMaster<bool> {
        PerMaster {
            primary,
            secondary,
            backup,
        }
    }

    /// A policy with a backup master besides the primary (and the secondary unless
    /// `change` drops it).
    fn with_backup(change: impl FnOnce(&mut SlaveConfig)) -> Policy {
        policy(|c| {
            c.backup = Some(MasterEndpoint {
                nats_url: "nats://127.0.0.1:4224".to_owned(),
                nats_auth: Default::default(),
                cluster: "dr".to_owned(),
            });
            change(c);
        })
    }

    fn switch(to: Master, reason: &'static str) -> Option<Switch> {
        Some(Switch { to, reason })
    }

    fn rejected(reason: RejectReason) -> Outcome {
        Outcome::Rejected {
            reason,
            detail: "full".to_owned(),
        }
    }

    const APPROVED: Outcome = Outcome::Approved {
        already_held: false,
    };

    // ---- which master ----

    #[test]
    fn fails_over_to_the_secondary_when_the_primary_does_not_answer() {
        let p = policy(|_| {});
        assert_eq!(
            p.choose_active(Master::Primary, up(false, true), false),
            switch(Master::Secondary, "the primary master does not answer")
        );
    }

    #[test]
    fn stays_on_a_silent_primary_while_the_secondary_is_silent_too() {
        let p = policy(|_| {});
        assert_eq!(
            p.choose_active(Master::Primary, up(false, false), false),
            None
        );
        assert_eq!(
            p.choose_active(Master::Primary, up(true, true), false),
            None
        );
    }

    #[test]
    fn a_slow_primary_switches_to_an_answering_secondary() {
        let p = policy(|_| {});
        assert_eq!(
            p.choose_active(Master::Primary, up(true, true), true),
            switch(
                Master::Secondary,
                "the primary master answers slower than the switch delay"
            )
        );
        assert_eq!(
            p.choose_active(Master::Primary, up(true, false), true),
            None
        );
    }

    #[test]
    fn return_to_primary_goes_back_once_the_primary_answers_in_time() {
        let p = policy(|c| c.return_policy = ReturnPolicy::ReturnToPrimary);
        assert_eq!(
            p.choose_active(Master::Secondary, up(true, true), false),
            switch(
                Master::Primary,
                "the primary master answers again (return-to-primary)"
            )
        );
        // Still slow: no return yet, and no switch away from an answering secondary.
        assert_eq!(
            p.choose_active(Master::Secondary, up(true, true), true),
            None
        );
        assert_eq!(
            p.choose_active(Master::Secondary, up(false, true), false),
            None
        );
    }

    #[test]
    fn stay_keeps_the_secondary_until_it_fails() {
        let p = policy(|c| c.return_policy = ReturnPolicy::Stay);
        assert_eq!(
            p.choose_active(Master::Secondary, up(true, true), false),
            None
        );
        assert_eq!(
            p.choose_active(Master::Secondary, up(true, false), false),
            switch(Master::Primary, "the secondary master does not answer")
        );
    }

    #[test]
    fn a_single_master_never_switches_or_prepares_another() {
        let p = policy(|c| c.secondary = None);
        assert_eq!(
            p.choose_active(Master::Primary, up(false, true), true),
            None
        );
        assert_eq!(
            p.prepare_other(Master::Primary, up(false, false), true),
            vec![]
        );
        assert_eq!(p.masters().collect::<Vec<_>>(), vec![Master::Primary]);
        assert!(p.others_to_show(Master::Primary).is_empty());
        let mut order = p.ask_order(None, Master::Primary);
        assert_eq!(order.next(), Some(Master::Primary));
        assert_eq!(order.next(), None);
    }

    #[test]
    fn heartbeats_go_to_the_active_master_the_seat_holders_and_the_primary_probe() {
        let no_seats = up(false, false);
        let returning = policy(|c| c.return_policy = ReturnPolicy::ReturnToPrimary);
        assert_eq!(
            returning.heartbeat_targets(Master::Secondary, no_seats),
            vec![Master::Primary, Master::Secondary],
            "the primary is probed to return to it"
        );
        assert_eq!(
            returning.heartbeat_targets(Master::Primary, no_seats),
            vec![Master::Primary]
        );
        let staying = policy(|c| c.return_policy = ReturnPolicy::Stay);
        assert_eq!(
            staying.heartbeat_targets(Master::Secondary, no_seats),
            vec![Master::Secondary]
        );
        assert_eq!(
            staying.heartbeat_targets(Master::Secondary, up(true, false)),
            vec![Master::Primary, Master::Secondary],
            "the primary still holds seats"
        );
        assert_eq!(
            staying.heartbeat_targets(Master::Primary, up(false, true)),
            vec![Master::Primary, Master::Secondary],
            "the secondary still holds seats"
        );
    }

    /// The handback moves agents from a backup secondary to the primary once the primary is
    /// active again and answers; never from a secondary of another context, one whose
    /// context is not known, while restricted, or without a secondary.
    #[test]
    fn agents_move_back_from_a_backup_secondary_once_the_primary_is_active_again() {
        let p = policy(|_| {});
        let contexts = |secondary| PerMaster {
            primary: Some(Context::Production),
            secondary,
            backup: None,
        };
        let backup = contexts(Some(Context::Backup));
        let both = up(true, true);
        let from_secondary = vec![Master::Secondary];
        assert_eq!(
            p.moves_back(Master::Primary, both, backup, false),
            from_secondary
        );
        assert_eq!(
            p.moves_back(Master::Primary, up(true, false), backup, false),
            from_secondary,
            "a backup that stopped answering keeps no agent from moving"
        );
        assert!(
            p.moves_back(Master::Secondary, both, backup, false)
                .is_empty(),
            "not active yet"
        );
        assert!(
            p.moves_back(Master::Primary, up(false, true), backup, false)
                .is_empty()
        );
        assert!(
            p.moves_back(Master::Primary, both, backup, true).is_empty(),
            "restricted"
        );
        for other in [Some(Context::Production), Some(Context::Development), None] {
            assert!(
                p.moves_back(Master::Primary, both, contexts(other), false)
                    .is_empty(),
                "{other:?}"
            );
        }
        let alone = policy(|c| c.secondary = None);
        assert!(
            alone
                .moves_back(Master::Primary, both, backup, false)
                .is_empty()
        );
    }

    /// With a backup master configured (the backup slot), its agents go back to whichever
    /// production master is active and answers: the primary, or the secondary when the
    /// primary is still down.
    #[test]
    fn agents_move_back_from_the_backup_master_to_the_active_production_master() {
        let p = with_backup(|_| {});
        let contexts = PerMaster {
            primary: Some(Context::Production),
            secondary: Some(Context::Production),
            backup: Some(Context::Backup),
        };
        let all = up3(true, true, true);
        assert_eq!(
            p.moves_back(Master::Primary, all, contexts, false),
            vec![Master::Backup]
        );
        assert_eq!(
            p.moves_back(Master::Secondary, up3(false, true, true), contexts, false),
            vec![Master::Backup]
        );
        assert!(
            p.moves_back(Master::Backup, all, contexts, false)
                .is_empty(),
            "still on the backup: nothing to move to"
        );
        assert!(
            p.moves_back(Master::Primary, all, contexts, true)
                .is_empty()
        );
        let misnamed = PerMaster {
            backup: Some(Context::Production),
            ..contexts
        };
        assert_eq!(
            p.moves_back(Master::Primary, all, misnamed, false),
            vec![Master::Backup],
            "the backup slot hands back whatever its master's context"
        );
    }

    /// The backup master is chosen only once no production master answers, and left for
    /// the first production master that answers again, whatever the return policy.
    #[test]
    fn the_backup_master_serves_only_while_no_production_master_answers() {
        let p = with_backup(|c| c.return_policy = ReturnPolicy::Stay);
        assert_eq!(
            p.choose_active(Master::Primary, up3(false, true, true), false),
            switch(Master::Secondary, "the primary master does not answer"),
            "the secondary is production: it comes before the backup"
        );
        assert_eq!(
            p.choose_active(Master::Primary, up3(false, false, true), false),
            switch(Master::Backup, "no production master answers")
        );
        assert_eq!(
            p.choose_active(Master::Secondary, up3(false, false, true), false),
            switch(Master::Backup, "no production master answers")
        );
        assert_eq!(
            p.choose_active(Master::Primary, up3(false, false, false), false),
            None,
            "the backup does not answer either"
        );
        assert_eq!(
            p.choose_active(Master::Primary, up3(true, false, true), true),
            None,
            "a slow primary never sends the slave to the backup"
        );
        assert_eq!(
            p.choose_active(Master::Backup, up3(false, true, true), false),
            switch(
                Master::Secondary,
                "the secondary master answers again (a backup serves only while production cannot)"
            ),
            "left for production even with the stay policy"
        );
        assert_eq!(
            p.choose_active(Master::Backup, up3(true, true, true), false),
            switch(
                Master::Primary,
                "the primary master answers again (a backup serves only while production cannot)"
            )
        );
        assert_eq!(
            p.choose_active(Master::Backup, up3(false, false, false), false),
            None
        );
        // Without a secondary: primary, then backup.
        let two = with_backup(|c| c.secondary = None);
        assert_eq!(
            two.choose_active(Master::Primary, up3(false, false, true), false),
            switch(Master::Backup, "no production master answers")
        );
        assert_eq!(
            two.choose_active(Master::Primary, up3(true, false, true), false),
            None
        );
    }

    /// A registration asks the active master, then the other production master, and the
    /// backup master last: only after every production master could not answer it.
    #[test]
    fn a_registration_asks_the_backup_master_last() {
        let p = with_backup(|_| {});
        let order = |active| {
            let mut order = p.ask_order(None, active);
            std::iter::from_fn(move || order.next()).collect::<Vec<_>>()
        };
        assert_eq!(
            order(Master::Primary),
            [Master::Primary, Master::Secondary, Master::Backup]
        );
        assert_eq!(
            order(Master::Secondary),
            [Master::Secondary, Master::Primary, Master::Backup]
        );
        assert_eq!(
            order(Master::Backup),
            [Master::Backup, Master::Primary, Master::Secondary]
        );
        // The backup approving after both production masters could not: fail over to it.
        let mut asking = p.ask_order(None, Master::Primary);
        asking.next();
        asking.unavailable("primary silent".to_owned());
        asking.next();
        asking.unavailable("secondary silent".to_owned());
        assert_eq!(asking.next(), Some(Master::Backup));
        let answered = asking.decided(APPROVED).unwrap();
        assert_eq!(answered.by, Master::Backup);
        assert_eq!(answered.switch.map(|s| s.to), Some(Master::Backup));
        // On the backup, with production back: the backup's refusal sends the registration
        // on to production; the same refusal as the last answer is final.
        let mut asking = p.ask_order(None, Master::Backup);
        assert_eq!(asking.next(), Some(Master::Backup));
        assert_eq!(
            asking.decided(rejected(RejectReason::ProductionAvailable)),
            None
        );
        assert_eq!(asking.next(), Some(Master::Primary));
        let answered = asking.decided(APPROVED).unwrap();
        assert_eq!(answered.by, Master::Primary);
        assert_eq!(answered.switch.map(|s| s.to), Some(Master::Primary));
        let mut asking = p.ask_order(None, Master::Primary);
        for _ in 0..2 {
            asking.next();
            asking.unavailable("silent".to_owned());
        }
        assert_eq!(asking.next(), Some(Master::Backup));
        assert!(matches!(
            asking.decided(rejected(RejectReason::ProductionAvailable)),
            Some(Answered {
                by: Master::Backup,
                ..
            })
        ));
        // Overflow goes to the secondary, never to the backup: not when the secondary is
        // silent, nor without a secondary.
        let all = with_backup(|c| c.overflow = true);
        let mut asking = all.ask_order(None, Master::Primary);
        asking.next();
        assert_eq!(asking.decided(rejected(RejectReason::AggregateLimit)), None);
        assert_eq!(asking.next(), Some(Master::Secondary));
        asking.unavailable("secondary silent".to_owned());
        assert_eq!(asking.next(), None, "the backup is not asked for capacity");
        let overflow = with_backup(|c| {
            c.secondary = None;
            c.overflow = true;
        });
        let mut asking = overflow.ask_order(None, Master::Primary);
        asking.next();
        let answered = asking.decided(rejected(RejectReason::AggregateLimit));
        assert!(
            matches!(
                answered,
                Some(Answered {
                    by: Master::Primary,
                    ..
                })
            ),
            "{answered:?}"
        );
    }

    #[test]
    fn production_masters_are_probed_and_the_backup_readied_last() {
        let p = with_backup(|c| c.return_policy = ReturnPolicy::Stay);
        let none = up3(false, false, false);
        assert_eq!(
            p.heartbeat_targets(Master::Backup, none),
            vec![Master::Primary, Master::Secondary, Master::Backup],
            "on the backup, every production master is probed"
        );
        assert_eq!(
            p.heartbeat_targets(Master::Primary, none),
            vec![Master::Primary]
        );
        assert_eq!(
            p.heartbeat_targets(Master::Primary, up3(false, false, true)),
            vec![Master::Primary, Master::Backup],
            "the backup still holds seats"
        );
        assert_eq!(
            p.prepare_other(Master::Primary, none, false),
            vec![Master::Secondary, Master::Backup]
        );
        assert_eq!(
            p.prepare_other(Master::Primary, up3(true, false, false), true),
            vec![Master::Secondary],
            "slowness readies the secondary, never the backup"
        );
        assert_eq!(
            p.prepare_other(Master::Primary, up3(false, false, true), false),
            vec![Master::Secondary],
            "a backup still connected from before does not stand in for the secondary's hello"
        );
        assert_eq!(
            p.prepare_other(Master::Primary, up3(false, true, true), false),
            vec![],
            "the secondary is ready"
        );
        assert_eq!(
            p.prepare_other(Master::Backup, none, false),
            vec![Master::Primary, Master::Secondary]
        );
    }

    #[test]
    fn each_master_is_told_where_else_the_slave_is_served() {
        let p = with_backup(|_| {});
        assert_eq!(p.others_to_show(Master::Primary), [Master::Backup]);
        assert_eq!(p.others_to_show(Master::Secondary), [Master::Backup]);
        assert_eq!(
            p.others_to_show(Master::Backup),
            [Master::Primary, Master::Secondary]
        );
        let pair = policy(|_| {});
        assert_eq!(pair.others_to_show(Master::Primary), [Master::Secondary]);
        assert_eq!(pair.others_to_show(Master::Secondary), [Master::Primary]);
    }

    #[test]
    fn the_other_master_is_readied_when_the_active_one_fails_or_the_primary_is_slow() {
        let p = policy(|_| {});
        assert_eq!(
            p.prepare_other(Master::Primary, up(false, false), false),
            vec![Master::Secondary]
        );
        assert_eq!(
            p.prepare_other(Master::Primary, up(true, false), true),
            vec![Master::Secondary]
        );
        assert_eq!(
            p.prepare_other(Master::Primary, up(true, false), false),
            vec![]
        );
        assert_eq!(
            p.prepare_other(Master::Primary, up(false, true), false),
            vec![],
            "already ready"
        );
        assert_eq!(
            p.prepare_other(Master::Secondary, up(false, false), true),
            vec![Master::Primary]
        );
        assert_eq!(
            p.prepare_other(Master::Secondary, up(false, true), true),
            vec![],
            "a slow primary matters only while it is the active one"
        );
    }

    // ---- requests ----

    #[test]
    fn a_request_rides_through_the_failover_wait_and_longer_while_electing() {
        let p = policy(|c| {
            c.failover_wait = Duration::from_secs(5);
            c.election_wait = Duration::from_secs(30);
        });
        let ms = Duration::from_millis;
        assert!(p.retry(true, false, ms(4_900), ms(25)));
        assert!(!p.retry(true, false, ms(4_980), ms(25)));
        assert!(
            !p.retry(false, false, ms(0), ms(25)),
            "a master known lost gets one try"
        );
        assert!(p.retry(true, true, ms(20_000), ms(200)));
        assert!(!p.retry(true, true, ms(29_900), ms(200)));
        assert_eq!(Policy::next_backoff(RETRY_BACKOFF), ms(50));
        assert_eq!(Policy::next_backoff(ms(150)), ms(200), "capped");
        assert_eq!(p.longest_request(), Duration::from_secs(2 + 30));
    }

    #[test]
    fn the_primary_is_slow_only_past_the_switch_delay() {
        let p = policy(|c| c.switch_delay = Duration::from_secs(10));
        assert!(!p.too_slow(Duration::from_secs(10)));
        assert!(p.too_slow(Duration::from_millis(10_001)));
    }

    // ---- registrations: ask order, failover, overflow ----

    #[test]
    fn a_new_agent_asks_the_active_master_then_the_other() {
        let p = policy(|_| {});
        let mut order = p.ask_order(None, Master::Secondary);
        assert_eq!(order.next(), Some(Master::Secondary));
        assert_eq!(order.next(), Some(Master::Primary));
        assert_eq!(order.next(), None);
    }

    #[test]
    fn approval_by_the_second_master_asked_fails_over_to_it() {
        let p = policy(|_| {});
        let mut order = p.ask_order(None, Master::Primary);
        assert_eq!(order.next(), Some(Master::Primary));
        order.unavailable("no primary master is listening".to_owned());
        assert_eq!(order.next(), Some(Master::Secondary));
        assert_eq!(
            order.decided(APPROVED),
            Some(Answered {
                outcome: APPROVED,
                by: Master::Secondary,
                switch: switch(Master::Secondary, "the other master does not answer"),
            })
        );
    }

    #[test]
    fn approval_by_the_active_master_switches_nothing() {
        let p = policy(|_| {});
        let mut order = p.ask_order(None, Master::Primary);
        order.next();
        assert_eq!(
            order.decided(APPROVED),
            Some(Answered {
                outcome: APPROVED,
                by: Master::Primary,
                switch: None,
            })
        );
    }

    #[test]
    fn a_re_registration_asks_only_the_master_holding_the_seat() {
        let p = policy(|c| c.overflow = true);
        let mut order = p.ask_order(Some(Master::Secondary), Master::Primary);
        assert_eq!(order.next(), Some(Master::Secondary));
        assert_eq!(order.next(), None);
        order.unavailable("no answer".to_owned());
        assert_eq!(order.no_master(), "no answer");
    }

    #[test]
    fn overflow_sends_the_primarys_capacity_rejection_to_the_secondary() {
        let p = policy(|c| c.overflow = true);
        for reason in [RejectReason::AggregateLimit, RejectReason::TypeLimit] {
            let mut order = p.ask_order(None, Master::Primary);
            assert_eq!(order.next(), Some(Master::Primary));
            assert_eq!(order.decided(rejected(reason)), None, "{reason}");
            assert_eq!(order.next(), Some(Master::Secondary));
            assert_eq!(
                order.decided(APPROVED),
                Some(Answered {
                    outcome: APPROVED,
                    by: Master::Secondary,
                    switch: None,
                }),
                "an overflow is not a failover"
            );
        }
    }

    #[test]
    fn an_overflow_the_secondary_cannot_take_says_why_for_both() {
        let p = policy(|c| c.overflow = true);
        let mut order = p.ask_order(None, Master::Primary);
        order.next();
        assert_eq!(order.decided(rejected(RejectReason::AggregateLimit)), None);
        order.next();
        order.unavailable("no secondary master is listening".to_owned());
        assert_eq!(order.next(), None);
        assert_eq!(
            order.no_master(),
            "the primary master rejected: aggregate_limit: full; no secondary master is listening"
        );
    }

    #[test]
    fn no_overflow_when_off_for_other_reasons_or_from_the_secondary() {
        let off = policy(|c| c.overflow = false);
        let mut order = off.ask_order(None, Master::Primary);
        order.next();
        assert_eq!(
            order.decided(rejected(RejectReason::AggregateLimit)),
            Some(Answered {
                outcome: rejected(RejectReason::AggregateLimit),
                by: Master::Primary,
                switch: None,
            })
        );
        let on = policy(|c| c.overflow = true);
        let mut order = on.ask_order(None, Master::Primary);
        order.next();
        assert_eq!(
            order.decided(rejected(RejectReason::AgentTypeMismatch)),
            Some(Answered {
                outcome: rejected(RejectReason::AgentTypeMismatch),
                by: Master::Primary,
                switch: None,
            })
        );
        let mut order = on.ask_order(None, Master::Secondary);
        order.next();
        assert_eq!(
            order.decided(rejected(RejectReason::TypeLimit)),
            Some(Answered {
                outcome: rejected(RejectReason::TypeLimit),
                by: Master::Secondary,
                switch: None,
            }),
            "only the primary overflows"
        );
    }

    #[test]
    fn the_local_limit_counts_held_and_pending_seats_but_not_a_held_agent() {
        assert_eq!(
            Policy::local_rejection(Some(2), false, 2),
            Some("local limit of 2 agents reached".to_owned())
        );
        assert_eq!(Policy::local_rejection(Some(2), false, 1), None);
        assert_eq!(Policy::local_rejection(Some(2), true, 2), None);
        assert_eq!(Policy::local_rejection(None, false, 1_000), None);
    }

    #[test]
    fn only_a_type_mismatch_keeps_the_seat_held() {
        assert!(Policy::keeps_seat(RejectReason::AgentTypeMismatch));
        assert!(!Policy::keeps_seat(RejectReason::AggregateLimit));
        assert!(!Policy::keeps_seat(RejectReason::Reclaimed));
    }

    // ---- grace and restriction ----

    #[test]
    fn the_mode_is_connected_while_any_master_answers_then_grace_then_restricted() {
        assert_eq!(Policy::mode(true, false), SlaveMode::Connected);
        assert_eq!(
            Policy::mode(true, true),
            SlaveMode::Connected,
            "a master answering ends the restriction"
        );
        assert_eq!(Policy::mode(false, false), SlaveMode::Grace);
        assert_eq!(Policy::mode(false, true), SlaveMode::Restricted);
        // The wire and the API keep the strings.
        assert_eq!(
            serde_json::to_string(&SlaveMode::Restricted).unwrap(),
            "\"restricted\""
        );
        assert_eq!(SlaveMode::Grace.to_string(), "grace");
        assert!(SlaveMode::Connected == "connected");
    }

    #[test]
    fn without_a_master_the_grace_policy_refuses_or_admits() {
        let refuse = policy(|c| c.during_grace = GracePolicy::Refuse);
        assert_eq!(
            refuse.without_master(false, "no master".to_owned()),
            Outcome::Rejected {
                reason: RejectReason::MasterUnavailable,
                detail: "no master".to_owned(),
            }
        );
        let allow = policy(|c| c.during_grace = GracePolicy::Allow);
        assert_eq!(
            allow.without_master(false, "no master".to_owned()),
            APPROVED
        );
        assert_eq!(
            allow.without_master(true, "no master".to_owned()),
            Outcome::Rejected {
                reason: RejectReason::Restricted,
                detail: "no master for the whole grace period (no master)".to_owned(),
            },
            "restricted refuses whatever the grace policy"
        );
    }

    #[test]
    fn the_grace_period_ends_just_after_its_length_without_contact() {
        let p = policy(|_| {});
        let t0 = Instant::now();
        let deadline = t0 + GRACE + Duration::from_millis(1);
        assert_eq!(p.grace_deadline(t0, false), Some(deadline));
        assert_eq!(p.grace_deadline(t0, true), None, "already restricted");
        assert_eq!(p.restriction(t0 + GRACE, t0, false), None);
        assert_eq!(
            p.grace_left(t0 + Duration::from_secs(20), t0),
            Duration::from_secs(100)
        );
        assert_eq!(p.grace_left(deadline, t0), Duration::ZERO);
        assert_eq!(
            p.restriction(deadline, t0, false),
            Some(Restrict {
                log_out_all: true,
                reason: RejectReason::Restricted,
                detail: "no master answered for the whole grace period".to_owned(),
            })
        );
        assert_eq!(p.restriction(deadline, t0, true), None, "restricts once");
    }

    #[test]
    fn refuse_new_keeps_the_agents_logout_all_logs_them_out() {
        let t0 = Instant::now();
        let late = t0 + GRACE + Duration::from_secs(1);
        let refuse_new = policy(|c| c.after_grace = Restriction::RefuseNew);
        let restrict = refuse_new.restriction(late, t0, false).unwrap();
        assert!(!restrict.log_out_all);
        assert!(!refuse_new.logout_after_grace());
        let logout_all = policy(|c| c.after_grace = Restriction::LogoutAll);
        let restrict = logout_all.restriction(late, t0, false).unwrap();
        assert!(restrict.log_out_all);
        assert!(logout_all.logout_after_grace());
        assert_eq!(
            restrict.logout("a1".to_owned(), "asr".to_owned()),
            LoggedOut {
                agent_id: "a1".to_owned(),
                agent_type: "asr".to_owned(),
                reason: RejectReason::Restricted,
                detail: "no master answered for the whole grace period".to_owned(),
            }
        );
    }

    #[test]
    fn resumed_past_the_reclaim_margin_the_agents_are_told_reclaimed() {
        // The least margin a master may use: the longest request (2 s + 30 s) plus 1% of
        // the grace period (1.2 s).
        let p = policy(|_| {});
        let margin = Duration::from_millis(33_200);
        let t0 = Instant::now();
        let at_margin = p.restriction(t0 + GRACE + margin, t0, false).unwrap();
        assert_eq!(at_margin.reason, RejectReason::Restricted);
        let past = p
            .restriction(t0 + GRACE + margin + Duration::from_millis(1), t0, false)
            .unwrap();
        assert_eq!(past.reason, RejectReason::Reclaimed);
        assert!(past.log_out_all);
        assert!(
            past.detail
                .starts_with("no master answered for 153 s, past the grace period"),
            "{}",
            past.detail
        );
        let refuse_new = policy(|c| c.after_grace = Restriction::RefuseNew);
        let past = refuse_new
            .restriction(t0 + Duration::from_secs(3_600), t0, false)
            .unwrap();
        assert_eq!(past.reason, RejectReason::Reclaimed);
        assert!(!past.log_out_all, "refuse-new keeps the agents even then");
    }

    /// Steps: pause the clock; take the last contact; advance to the end of the grace
    /// period (no restriction yet), one more millisecond (restricted), then past the
    /// reclaim margin (reclaimed).
    #[tokio::test(start_paused = true)]
    async fn in_paused_time_the_grace_period_runs_from_the_last_contact() {
        let p = policy(|_| {});
        let last_contact = Instant::now();
        tokio::time::advance(GRACE).await;
        assert_eq!(p.restriction(Instant::now(), last_contact, false), None);
        assert_eq!(
            p.grace_deadline(last_contact, false),
            Some(Instant::now() + Duration::from_millis(1))
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let restrict = p.restriction(Instant::now(), last_contact, false).unwrap();
        assert_eq!(restrict.reason, RejectReason::Restricted);
        tokio::time::advance(Duration::from_secs(60)).await;
        let restrict = p.restriction(Instant::now(), last_contact, false).unwrap();
        assert_eq!(restrict.reason, RejectReason::Reclaimed);
    }
}
