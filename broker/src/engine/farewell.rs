//! How a slave leaves the master's table: its own goodbye (a clean stop, or a failure after
//! its hello), forgetting a slave silent past `forget_after` with nothing held (the tick),
//! and an operator's `admin forget-slave`. Each releases whatever the slave still held and
//! records one `Forget`, so a forgotten slave stays forgotten on every replica and in
//! snapshots; if it says hello again it is a new slave.

use std::time::Instant;

use lmbus_schemas::human::{duration, plural};
use lmbus_schemas::{
    AlertKind, ForgetReply, ForgetRequest, Goodbye, RejectReason, Reply, SeatChange, Severity,
    SlaveId, printable, truncated,
};

use super::{Answer, Engine, Output};

/// What leaving took with it: seats and free allotted seats released.
pub(super) struct Released {
    pub(super) seats: usize,
    pub(super) allotted: u32,
}

impl Released {
    fn describe(&self) -> String {
        let seats = plural(self.seats as u64, "seat", "seats");
        match (self.seats, self.allotted) {
            (0, 0) => "it held no seats".to_owned(),
            (_, 0) => format!("its {seats} released"),
            (_, allotted) => format!(
                "its {seats} and {} released",
                plural(
                    u64::from(allotted),
                    "free allotted seat",
                    "free allotted seats"
                )
            ),
        }
    }
}

impl Engine {
    /// Takes a slave out of the table with every seat and block it held, without a record
    /// (the callers record `Forget`, and a replay applies it through here).
    pub(super) fn remove_slave(&mut self, id: &SlaveId) -> Released {
        let allotted = self.clear_blocks(id);
        let seats = match self.slaves.get_mut(id) {
            Some(slave) => slave.take_seats(),
            None => Vec::new(),
        };
        for (_, agent_type) in &seats {
            self.uncount(agent_type);
        }
        self.slaves.remove(id);
        self.quiet.retain(|(slave, _), _| slave != id);
        Released {
            seats: seats.len(),
            allotted,
        }
    }

    fn forget(&mut self, id: &SlaveId) -> Released {
        let released = self.remove_slave(id);
        self.pending.push(SeatChange::Forget {
            slave: id.to_string(),
        });
        released
    }

    /// A slave process stops and says so: only the live session's instance may (a
    /// duplicate process, or a delayed goodbye of an earlier one, changes nothing). The
    /// slave's identity is its subject's token, so a goodbye can only ever release the
    /// sender's own seats.
    pub(super) fn goodbye(&mut self, id: &SlaveId, goodbye: Goodbye) -> Output {
        let ours = self
            .slaves
            .get(id)
            .is_some_and(|s| s.instance == goodbye.instance);
        if !ours {
            return Output::reply(Reply::Refused {
                reason: RejectReason::SlaveNotConnected,
                detail: "the master has no session with this slave instance: nothing to release"
                    .to_owned(),
                last_hello: None,
                retry_after_ms: None,
            });
        }
        let released = self.forget(id);
        let reason = if goodbye.reason.is_empty() {
            "stopped".to_owned()
        } else {
            printable(&truncated(&goodbye.reason, 200)).into_owned()
        };
        let mut out = Output::reply(Reply::Ack);
        out.alert(
            self.alert(
                Severity::Info,
                AlertKind::SlaveStopped,
                format!(
                    "slave {id} said goodbye ({reason}): {}; the master forgets it",
                    released.describe()
                ),
            )
            .slave(id.as_str())
            .counts(self.counts()),
        );
        out
    }

    /// The tick's part: slaves silent for `forget_after` (not connected, no seats, no
    /// blocks) are forgotten. 0 keeps them.
    pub(super) fn forget_silent(&mut self, now: Instant, out: &mut Output) {
        let after = self.cfg.forget_after;
        if after.is_zero() {
            return;
        }
        let gone: Vec<(SlaveId, std::time::Duration)> = self
            .slaves
            .iter()
            .filter(|(_, s)| !s.connected && s.agents.is_empty() && s.blocks.is_empty())
            .map(|(id, s)| (id.clone(), now.saturating_duration_since(s.last_seen)))
            .filter(|(_, silent)| *silent > after)
            .collect();
        for (id, silent) in gone {
            self.forget(&id);
            out.alert(
                self.alert(
                    Severity::Info,
                    AlertKind::SlaveForgotten,
                    format!(
                        "slave {id} forgotten: silent for {} with no seats (--forget-after {}); if it says hello again it is a new slave",
                        duration(silent),
                        duration(after)
                    ),
                )
                .slave(id.as_str()),
            );
        }
    }

    /// An operator's `admin forget-slave`: refused while the slave is connected (it would
    /// only say hello again); otherwise its seats and blocks are released and it is gone.
    pub(super) fn admin_forget(&mut self, now: Instant, request: &ForgetRequest) -> Output {
        let answer = |reply: ForgetReply| Output {
            reply: Some(Answer::Forget(reply)),
            ..Output::default()
        };
        let Ok(id) = SlaveId::new(request.slave_id.clone()) else {
            return answer(ForgetReply::Error {
                message: format!(
                    "{:?} is not a valid slave id",
                    printable(&truncated(&request.slave_id, 80))
                ),
            });
        };
        let Some(slave) = self.slaves.get(&id) else {
            return answer(ForgetReply::Error {
                message: format!("the master knows no slave {id}"),
            });
        };
        if slave.connected {
            return answer(ForgetReply::Error {
                message: format!(
                    "slave {id} is connected (heard from {} ago): stop it (a stopping slave says goodbye), or release its seats with `admin release`",
                    duration(now.saturating_duration_since(slave.last_seen))
                ),
            });
        }
        let released = self.forget(&id);
        let who = if request.operator.is_empty() {
            "an operator"
        } else {
            request.operator.as_str()
        };
        let message = format!(
            "{who} forgot slave {id}: {}; if it says hello again it is a new slave",
            released.describe()
        );
        let severity = if released.seats > 0 || released.allotted > 0 {
            Severity::Warning
        } else {
            Severity::Info
        };
        let mut out = answer(ForgetReply::Forgotten {
            message: message.clone(),
        });
        out.alert(
            self.alert(severity, AlertKind::SlaveForgotten, message)
                .slave(id.as_str())
                .counts(self.counts()),
        );
        out
    }
}
