//! [`Inner`], what the handle and the background task share, and its basic moves: ask a
//! master (riding through a broker failover by the policy's retry window, keeping the grace
//! clock and watching the primary's latency), mark a master lost, switch the active master,
//! and tell the host (events, logouts) and the master (reports).

use lmbus_schemas::human::HumanDuration;
use std::sync::Mutex;

use lmbus_schemas::{Context, License, RejectReason, RejectedAgent, Reply, SlaveOp, SlaveReport};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::state::{State, lock, remember};
use crate::config::SlaveConfig;
use crate::error::SlaveError;
use crate::events::{AgentEvent, LoggedOut};
use crate::link::{Ask, Links};
use crate::master::Master;
use crate::policy::{Policy, RETRY_BACKOFF};

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) cfg: SlaveConfig,
    /// The decisions, from `cfg`.
    pub(super) policy: Policy,
    /// The primary, and the secondary if configured.
    pub(super) links: Links,
    pub(super) instance: Uuid,
    /// The verified license when running licensed.
    pub(super) license: Option<License>,
    pub(super) local_limit: Option<u32>,
    /// Plain mutex: never held across an await.
    pub(super) state: Mutex<State>,
    /// One registration or unregistration per agent at a time, answered in the order the
    /// host asked (see `turns.rs`).
    pub(super) turns: super::turns::Turns,
    /// The host's events (bounded: `EVENT_CAPACITY`); a subscriber that lags that far
    /// behind misses the oldest and is told so. Sending never waits.
    pub(super) events: broadcast::Sender<AgentEvent>,
    pub(super) heartbeat_seq: std::sync::atomic::AtomicU64,
    /// The last request number used (see `RegisterRequest::seq`).
    pub(super) request_seq: std::sync::atomic::AtomicU64,
    pub(super) metrics: crate::metrics::SlaveMetrics,
    /// Wakes the background task to send an allot request now (a block ran low, the
    /// master asked for blocks back, more journal entries wait).
    pub(super) allot_wake: tokio::sync::Notify,
    /// Per master: a heartbeat (or hello) of the heartbeat round is still waiting for its
    /// answer. The next round skips that master instead of waiting behind it, so one master
    /// that hangs (paused, cut off) delays no other master's heartbeats.
    pub(super) beating: crate::master::PerMaster<std::sync::atomic::AtomicBool>,
    /// The heartbeats still running, aborted when the agent stops (a late one must not say
    /// hello again after the goodbye).
    pub(super) beats: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Inner {
    /// The context this slave runs in: its license's (checked against `--context` at
    /// start), or the declared one, production by default.
    pub(super) fn context(&self) -> Context {
        match &self.license {
            Some(license) => license.context,
            None => self.cfg.context.unwrap_or(Context::Production),
        }
    }

    pub(super) fn emit(&self, event: AgentEvent) {
        // No subscriber is fine: events are a convenience, the state is the truth.
        let _ = self.events.send(event);
    }

    /// An agent that held a seat lost it: the status lists it under `logged_out` and the
    /// host is told.
    pub(super) fn logged_out(&self, state: &mut State, out: LoggedOut) {
        remember(&mut state.logged_out, &out);
        self.emit(AgentEvent::LoggedOut(out));
    }

    /// A registration was refused to an agent that held no seat (or kept the one it had):
    /// the status lists it under `rejected`, apart from the logouts, and the host is told
    /// with the same event as ever (the agent does not hold the seat it asked for).
    pub(super) fn refused(&self, state: &mut State, out: LoggedOut) {
        remember(&mut state.rejected, &out);
        self.emit(AgentEvent::LoggedOut(out));
    }

    /// Logs out the agents `link`'s master rejected, with `detail`. Only that master's own
    /// seats: another master cannot log ours out.
    pub(super) fn log_out_rejected(
        &self,
        state: &mut State,
        link: Master,
        rejected: impl IntoIterator<Item = RejectedAgent>,
        detail: &str,
    ) {
        for out in state.not_regranted(link, rejected, detail) {
            self.logged_out(state, out);
        }
    }

    /// Asks one master, keeping the books: any answer is contact (the grace period restarts
    /// from the request's sending time) and the primary's latency is watched.
    pub(super) async fn ask<T: crate::link::Request>(
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
            // Subscribed before asking, so a `new_leader` sent after the answer below still
            // cuts the back-off short.
            let mut ready = self.links.get(link).new_leaders();
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
                        "the {} master's brokers elected no leader within {}",
                        link.name(),
                        HumanDuration(self.policy.election_wait())
                    ));
                }
                answer => break answer,
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                Ok(()) = ready.changed() => {}
            }
            backoff = Policy::next_backoff(backoff);
        };
        if let Ask::Reply { sent, latency, .. } = &answer {
            self.metrics.master_answer(link, *latency);
            let mut state = lock(&self.state);
            state.last_contact = state.last_contact.max(*sent);
            if link == Master::Primary {
                let slow = self.policy.too_slow(*latency);
                if slow {
                    warn!(latency = %HumanDuration(*latency), delay = %HumanDuration(self.cfg.switch_delay), "the primary master answers slower than the switch delay");
                }
                // Sticky until the next decision (`choose_active`), so a slow answer is not
                // forgotten because a fast one (a re-hello, say) followed it.
                state.primary_slow |= slow;
            }
        }
        Ok(answer)
    }

    pub(super) fn set_disconnected(&self, link: Master, detail: String) {
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
    pub(super) fn switch(&self, link: Master, reason: &str) {
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

    /// Tells a master about something decided here (published, no reply: if no master
    /// listens, the local log is the only record).
    /// Tells `link`'s master this process stops: it releases what this slave still holds
    /// there and forgets it. Whether the master took it.
    pub(super) async fn goodbye(&self, link: Master, reason: &str) -> bool {
        let goodbye = lmbus_schemas::Goodbye {
            instance: self.instance,
            reason: lmbus_schemas::truncated(&lmbus_schemas::printable(reason), 400).into_owned(),
        };
        match self.ask(link, SlaveOp::Goodbye, &goodbye).await {
            Ok(Ask::Reply {
                reply: Reply::Ack, ..
            }) => {
                info!(master = link.name(), "said goodbye");
                true
            }
            Ok(other) => {
                warn!(master = link.name(), answer = ?other, "goodbye not taken");
                false
            }
            Err(e) => {
                warn!(master = link.name(), error = %e, "cannot say goodbye");
                false
            }
        }
    }

    pub(super) async fn report(&self, link: Master, report: SlaveReport) {
        self.links
            .get(link)
            .publish(&self.cfg.slave_id, SlaveOp::Report, &report)
            .await;
    }

    pub(super) fn next_request_seq(&self) -> u64 {
        self.request_seq
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1
    }
}
