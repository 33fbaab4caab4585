//! The background task: the grace timer, heartbeat rounds (a heartbeat, or a hello when
//! the session is lost, to every master in use; the other master readied; the active one
//! chosen again) and the masters' control messages, until told to stop.

use lmbus_schemas::human::HumanDuration;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use lmbus_schemas::{
    ControlMessage, Heartbeat, MasterRole, MasterUse, OtherMaster, Reply, SlaveOp, decode,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::hello::HelloError;
use super::inner::Inner;
use super::state::{Restricted, State, lock};
use crate::events::AgentEvent;
use crate::link::Ask;
use crate::master::{Master, PerMaster};
use crate::policy::Switch;

/// Clears a master's `Inner::beating` when its heartbeat ends, however it ends.
struct Beating<'a>(&'a Inner, Master);

impl Drop for Beating<'_> {
    fn drop(&mut self) {
        self.0.beating.get(self.1).store(false, Ordering::Release);
    }
}

impl Inner {
    /// Applies the restriction once no master has answered for the whole grace period.
    /// Checked before every heartbeat and registration, and by a timer, so a slave resumed
    /// after being frozen restricts before it talks to anyone.
    pub(super) fn check_grace(&self) {
        let now = tokio::time::Instant::now();
        let restricted = self.restrict_if_grace_over(&mut lock(&self.state), now);
        if let Some(logged_out) = restricted {
            self.announce_restricted(logged_out);
        }
    }

    /// [`Inner::check_grace`] under a lock the caller holds, at `now`: whether usage was
    /// restricted now, and how many agents were logged out (for
    /// [`Inner::announce_restricted`], once the lock is released).
    pub(super) fn restrict_if_grace_over(
        &self,
        state: &mut State,
        now: tokio::time::Instant,
    ) -> Option<u32> {
        let restrict =
            self.policy
                .restriction(now, state.last_contact, state.restricted.is_some())?;
        for link in state.links.iter_mut() {
            link.connected = false;
        }
        let mut logged_out = 0;
        if restrict.log_out_all {
            let agents = std::mem::take(&mut state.agents);
            logged_out = agents.len() as u32;
            for (agent_id, seat) in agents {
                self.logged_out(state, restrict.logout(agent_id, seat.agent_type));
            }
        }
        state.restricted = Some(Restricted {
            since: now,
            logged_out,
        });
        Some(logged_out)
    }

    /// Says that usage was restricted (a warning and the event), outside the lock.
    pub(super) fn announce_restricted(&self, logged_out: u32) {
        warn!(
            grace = %HumanDuration(self.policy.grace_period()),
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
    async fn heartbeat_round(self: &Arc<Self>) {
        self.check_grace();
        let (active, links, seats_on) = {
            let state = lock(&self.state);
            // A master owed a release counts as holding seats until a hello settles it.
            let seats_on = |master| {
                !state.owed.get(master).is_empty()
                    || state.agents.values().any(|s| s.link == master)
            };
            let seats_on = PerMaster::from_fn(seats_on);
            (state.active, state.links.clone(), seats_on)
        };
        // Each master's heartbeat runs on its own: the round waits for them for at most half
        // an interval, and a master whose last one is still unanswered is skipped, so a
        // master that hangs delays no other master's heartbeats.
        let mut beats = Vec::new();
        for link in self.policy.heartbeat_targets(active, seats_on) {
            if self.beating.get(link).swap(true, Ordering::AcqRel) {
                debug!(
                    master = link.name(),
                    "the last heartbeat is still unanswered"
                );
                continue;
            }
            let inner = Arc::clone(self);
            let connected = links.get(link).connected;
            let beat = tokio::spawn(async move {
                let _beating = Beating(&inner, link);
                if connected {
                    inner.heartbeat(link).await;
                } else if let Err(HelloError::Refused { reason, detail, .. }) =
                    inner.hello(link).await
                {
                    warn!(master = link.name(), %reason, %detail, "the master refuses this slave");
                }
            });
            {
                let mut running = self.beats.lock().unwrap_or_else(|e| e.into_inner());
                running.retain(|b| !b.is_finished());
                running.push(beat.abort_handle());
            }
            beats.push(beat);
        }
        let _ = tokio::time::timeout(
            self.cfg.heartbeat_interval / 2,
            futures::future::join_all(beats),
        )
        .await;
        // The active master just failed, or the primary is too slow: make sure another
        // one is ready to take over (the first of them that accepts a hello).
        let others = {
            let state = lock(&self.state);
            self.policy
                .prepare_other(active, state.connected(), state.primary_slow)
        };
        for other in others {
            // Its heartbeat or hello of this round still hangs: a hello now would wait
            // behind it (on the link's hello lock) and hold up the whole round.
            if self.hangs(other) {
                continue;
            }
            match self.hello(other).await {
                Ok(()) => break,
                Err(HelloError::Refused { reason, detail, .. }) => {
                    warn!(master = other.name(), %reason, %detail, "the master refuses this slave");
                }
                Err(HelloError::Unavailable(_)) => {}
            }
        }
        self.choose_active();
        self.settle_owed().await;
        self.move_back().await;
    }

    /// Whether a heartbeat round's heartbeat to `link` is still unanswered (that master
    /// hangs): nothing else waits on it meanwhile.
    pub(super) fn hangs(&self, link: Master) -> bool {
        self.beating.get(link).load(Ordering::Acquire)
    }

    /// Switches the active master if the policy says so (`Policy::choose_active`); the
    /// primary's slowness is forgotten once decided on.
    fn choose_active(&self) {
        if !self.policy.has_others() {
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
        let (agents, in_use, mut books, other) = {
            let state = lock(&self.state);
            let others = self.policy.others_to_show(link);
            let other = (!others.is_empty()).then(|| OtherMaster {
                context: others.iter().find_map(|&m| state.links.get(m).context),
                seats: others.iter().map(|&m| state.claims(m).len() as u32).sum(),
            });
            (
                state.claims(link).len() as u32,
                state.active == link,
                state.books(link),
                other,
            )
        };
        books.request_seq = Some(request_seq);
        let role = match (self.policy.has_others(), link) {
            (false, _) => MasterRole::Only,
            (true, Master::Primary) => MasterRole::Primary,
            (true, Master::Secondary) => MasterRole::Secondary,
            (true, Master::Backup) => MasterRole::Backup,
        };
        let heartbeat = Heartbeat {
            instance: self.instance,
            seq,
            agents,
            master: Some(MasterUse {
                role,
                in_use,
                other,
            }),
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
                let detail = format!("logged out by the {} master", link.name());
                self.log_out_rejected(&mut state, link, agents, &detail);
                false
            }
            ControlMessage::Rehello => true,
            // Acted on by the link itself (`Link::send` asks again at once).
            ControlMessage::ReturnAllotment => {
                lock(&self.state)
                    .allot
                    .get_mut(link)
                    .return_all(tokio::time::Instant::now());
                self.allot_wake.notify_one();
                false
            }
            ControlMessage::ShrinkAllotment { blocks } => {
                lock(&self.state)
                    .allot
                    .get_mut(link)
                    .shrink_to(tokio::time::Instant::now(), &blocks);
                self.allot_wake.notify_one();
                false
            }
            // Acted on by the link itself (`Link::send` asks again at once).
            ControlMessage::NewLeader | ControlMessage::Other => false,
        }
    }
}

/// Heartbeats, reconnects, failover, the grace timer and control messages until told to
/// stop.
pub(super) async fn background(
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
        let allot = inner.next_allot();
        tokio::select! {
            _ = stop.changed() => break,
            // Allotment mode: the journal and the blocks, every refresh interval or at once
            // when woken (a block ran low, blocks asked back).
            _ = async {
                match allot {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some((_, link)) = allot {
                    if inner.allot_round(link).await {
                        inner.allot_wake.notify_one();
                    }
                }
            }
            _ = inner.allot_wake.notified() => {
                for link in Master::ALL {
                    let due = lock(&inner.state).links.get(link).connected;
                    if due && inner.allot_round(link).await {
                        inner.allot_wake.notify_one();
                    }
                }
            }
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
