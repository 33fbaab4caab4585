//! Saying hello to a master: once per reconnect however many callers find the session
//! lost, renumbered when the master says a number was used, built from the books as they
//! are when sent; a welcome logs out what the master did not re-grant and ends a
//! restriction.

use lmbus_schemas::{Hello, RejectReason, Reply, SlaveEvent, SlaveOp, SlaveReport, Welcome};
use tracing::{debug, info, warn};

use super::inner::Inner;
use super::state::{LinkState, Restricted, lock};
use crate::events::AgentEvent;
use crate::link::Ask;
use crate::master::Master;

pub(super) enum HelloError {
    Refused {
        reason: RejectReason,
        detail: String,
        /// With `slave_id_in_use`: when the live process holding the id counts as gone if
        /// it stays silent.
        retry_after: Option<std::time::Duration>,
    },
    Unavailable(String),
}

impl HelloError {
    pub(super) fn detail(&self) -> String {
        match self {
            HelloError::Refused { reason, detail, .. } => format!("{reason}: {detail}"),
            HelloError::Unavailable(detail) => detail.clone(),
        }
    }
}

impl Inner {
    /// Says hello to `link`'s master: once per reconnect however many callers find the
    /// session lost at the same time (a caller that waited while another's hello succeeded
    /// uses that one), built from the books as they are when it is sent, with what is in
    /// flight.
    pub(super) async fn hello(&self, link: Master) -> Result<(), HelloError> {
        let l = self.links.get(link);
        let generation = l.hellos.load(std::sync::atomic::Ordering::Acquire);
        let _guard = l.hello_lock.lock().await;
        if l.hellos.load(std::sync::atomic::Ordering::Acquire) != generation
            && lock(&self.state).links.get(link).connected
        {
            return Ok(());
        }
        let mut renumbered = false;
        loop {
            match self.hello_once(link).await {
                Err(HelloError::Refused {
                    reason: RejectReason::Replayed,
                    detail,
                    ..
                }) if !renumbered => {
                    // A hello of ours that the master processed but whose answer we missed
                    // (a retry reached a new leader): say it again under a new number.
                    debug!(master = link.name(), %detail, "hello number refused; renumbering");
                    renumbered = true;
                }
                Ok(()) => {
                    l.hellos.fetch_add(1, std::sync::atomic::Ordering::Release);
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    /// The first hello of this process. A master that refuses it because another process
    /// of this slave id is alive (`slave_id_in_use`) says when that one counts as gone if it
    /// stays silent: a restart right after a crash (kill -9, then start) waits that long
    /// once and says hello again, so it is accepted as soon as the master may take the old
    /// process for dead. If the other process is still heartbeating then, it is a second
    /// daemon with the same `--id`, and the refusal stands (the caller fails to start).
    pub(super) async fn hello_at_start(&self, link: Master) -> Result<(), HelloError> {
        let mut deadline = None;
        loop {
            match self.hello(link).await {
                Err(HelloError::Refused {
                    reason: RejectReason::SlaveIdInUse,
                    detail,
                    retry_after: Some(wait),
                }) => {
                    let now = tokio::time::Instant::now();
                    let until = *deadline.get_or_insert(now + wait + self.cfg.request_timeout);
                    if now + wait > until {
                        return Err(HelloError::Refused {
                            reason: RejectReason::SlaveIdInUse,
                            detail,
                            retry_after: Some(wait),
                        });
                    }
                    warn!(
                        master = link.name(),
                        "slave id {} is in use by another process that the master heard from recently; waiting {} ms in case it has just died (a restart), then saying hello again",
                        self.cfg.slave_id,
                        wait.as_millis()
                    );
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn hello_once(&self, link: Master) -> Result<(), HelloError> {
        let l = self.links.get(link);
        // Read before the books, as for a heartbeat: every request numbered up to it was
        // marked in flight before it took its number, so the hello claims it or lists it
        // as pending; a later one is numbered above it and its seat is kept.
        let request_seq = self.request_seq.load(std::sync::atomic::Ordering::Acquire);
        // Allotment mode: from here until the answer nothing is admitted from this master's
        // block, which the hello empties; the journal so far is in the agent list.
        let (agents, pending, journal) = {
            let mut state = lock(&self.state);
            let journal = state.allot.get_mut(link).begin_hello();
            let (agents, pending) = state.hello_lists(link);
            (agents, pending, journal)
        };
        let hello = Hello {
            instance: self.instance,
            license: self.cfg.license.as_ref().map(|f| f.text.clone()),
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            agents,
            software: format!("lmbus-slave {}", env!("CARGO_PKG_VERSION")),
            seq: l
                .hello_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
            grace_ms: self.policy.grace_period().as_millis() as u64,
            logout_after_grace: self.policy.logout_after_grace(),
            request_timeout_ms: self.policy.longest_request().as_millis() as u64,
            request_seq: Some(request_seq),
            pending,
            journal: Some(journal),
            context: Some(self.context()),
        };
        let answer = self.ask(link, SlaveOp::Hello, &hello).await;
        if !matches!(
            &answer,
            Ok(Ask::Reply {
                reply: Reply::Welcome(_),
                ..
            })
        ) {
            lock(&self.state).allot.get_mut(link).hello_failed();
        }
        let reply = match answer {
            Ok(Ask::Reply { reply, .. }) => reply,
            Ok(Ask::Unavailable(detail)) => {
                self.set_disconnected(link, detail.clone());
                return Err(HelloError::Unavailable(detail));
            }
            Err(e) => {
                self.set_disconnected(link, e.to_string());
                return Err(HelloError::Unavailable(e.to_string()));
            }
        };
        match reply {
            Reply::Welcome(welcome) => {
                let was_restricted = self.accept_welcome(link, &welcome, journal);
                info!(master = link.name(), broker = %welcome.broker_id, "connected to the {} master", link.name());
                if let Some(Restricted { since, logged_out }) = was_restricted {
                    let lost_for = since.elapsed() + self.policy.grace_period();
                    info!(
                        "back from restriction after {} s without a master",
                        lost_for.as_secs()
                    );
                    self.report(
                        link,
                        SlaveReport {
                            event: SlaveEvent::Restricted {
                                lost_for_ms: lost_for.as_millis() as u64,
                                logged_out,
                            },
                            message: String::new(),
                        },
                    )
                    .await;
                }
                self.emit(AgentEvent::Connected {
                    master: link.name().to_owned(),
                    broker_id: welcome.broker_id,
                });
                Ok(())
            }
            Reply::Refused {
                reason: RejectReason::StaleRequest,
                detail,
                ..
            } => Err(HelloError::Unavailable(detail)),
            Reply::Refused {
                reason: RejectReason::Replayed,
                detail,
                last_hello,
                ..
            } => {
                // Number the next hello above the master's last (one it processed whose
                // answer was lost, or one someone forged with this slave's credentials).
                if let Some(last) = last_hello {
                    // The master bounds how far a hello number may jump, so this never
                    // nears the end of the range; saturate all the same.
                    l.hello_seq
                        .fetch_max(last.min(u64::MAX / 2), std::sync::atomic::Ordering::Relaxed);
                }
                Err(HelloError::Refused {
                    reason: RejectReason::Replayed,
                    detail,
                    retry_after: None,
                })
            }
            Reply::Refused {
                reason,
                detail,
                retry_after_ms,
                ..
            } => {
                let mut state = lock(&self.state);
                state.links.get_mut(link).connected = false;
                state.last_error = Some(format!("{reason}: {detail}"));
                Err(HelloError::Refused {
                    reason,
                    detail,
                    retry_after: retry_after_ms.map(std::time::Duration::from_millis),
                })
            }
            other => {
                let detail = format!("unexpected answer to hello: {other:?}");
                self.set_disconnected(link, detail.clone());
                Err(HelloError::Unavailable(detail))
            }
        }
    }

    /// Takes in a welcome: logs out what the master did not re-grant, marks the link
    /// connected and ends any restriction (returned, to be reported).
    fn accept_welcome(&self, link: Master, welcome: &Welcome, journal: u64) -> Option<Restricted> {
        let mut state = lock(&self.state);
        state.allot.get_mut(link).welcomed(
            journal,
            welcome.admission == lmbus_schemas::Admission::Allotment,
            std::time::Duration::from_millis(welcome.allot_refresh_ms),
        );
        let detail = format!(
            "the {} master did not re-grant this seat on reconnect",
            link.name()
        );
        self.log_out_rejected(
            &mut state,
            link,
            welcome.rejected_agents.iter().cloned(),
            &detail,
        );
        let was = state.links.get(link).context;
        if link == Master::Backup
            && welcome
                .context
                .is_some_and(|c| c != lmbus_schemas::Context::Backup)
            && was != welcome.context
        {
            warn!(
                context = ?welcome.context,
                "the backup master (--backup-nats) runs a license that is not a backup one: it is used only while no production master answers, and its agents still move back"
            );
        }
        *state.links.get_mut(link) = LinkState {
            connected: true,
            broker_id: Some(welcome.broker_id.clone()),
            context: welcome.context,
        };
        // The hello listed only the seats still held there: a release it missed is done.
        state.owed.get_mut(link).clear();
        state.last_error = None;
        state.restricted.take()
    }
}
