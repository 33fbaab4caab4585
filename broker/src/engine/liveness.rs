//! Whether slaves are alive: heartbeats (with their books, which may ask for a new hello)
//! and the tick (silence, reclaim under the timing rule, counts and license expiry alerts).

use std::time::Instant;

use lmbus_schemas::{
    AlertKind, ControlMessage, Heartbeat, RejectReason, Reply, SeatChange, Severity, SlaveId,
};
use time::Date;

use super::{Effect, Engine, Output};

impl Engine {
    pub(super) fn heartbeat(&mut self, now: Instant, id: &SlaveId, heartbeat: Heartbeat) -> Output {
        match self.slaves.get_mut(id) {
            Some(slave) if slave.connected && slave.instance == heartbeat.instance => {
                slave.last_seen = now;
                slave.master = heartbeat.master;
                let mut out = Output::reply(Reply::Ack);
                // Continuous reconcile: books that differ (leaving out what is in flight)
                // get a new hello, whose reconcile settles them within this interval.
                // Books taken before a request this master has already processed cannot
                // show it: no comparison then (the next heartbeat's will).
                let current = heartbeat.books.as_ref().filter(|b| {
                    b.request_seq
                        .is_none_or(|seq| slave.requests.highest <= seq)
                });
                if let Some(books) = current {
                    let (count, digest) = slave.books(&books.unsettled);
                    if (count, digest) != (books.count, books.digest) {
                        out.effects.push(Effect::Control {
                            slave: id.clone(),
                            message: ControlMessage::Rehello,
                        });
                    }
                }
                out
            }
            _ => Output::reply(Reply::Refused {
                last_hello: None,
                reason: RejectReason::SlaveNotConnected,
                detail: "the master has no live session with this slave instance: say hello again"
                    .to_owned(),
            }),
        }
    }

    pub(super) fn tick(&mut self, now: Instant, today: Date) -> Output {
        let mut out = Output::default();
        for alert in self.quiet_summaries(now) {
            out.alert(alert);
        }
        let missed = self.cfg.missed_heartbeats;
        let mut lost = Vec::new();
        for (id, slave) in &mut self.slaves {
            if slave.connected
                && now.saturating_duration_since(slave.last_seen) > slave.silence_limit(missed)
            {
                slave.connected = false;
                lost.push((id.clone(), slave.agents.len(), slave.silence_limit(missed)));
            }
        }
        let margin = self.cfg.reclaim_margin;
        let mut reclaim = Vec::new();
        for (id, slave) in &mut self.slaves {
            let silent = now.saturating_duration_since(slave.last_seen);
            let holds = !slave.agents.is_empty() || !slave.blocks.is_empty();
            if slave.logout_after_grace && holds && silent > slave.grace + margin {
                slave.connected = false;
                slave.reclaimed = true;
                let agents = slave.take_seats();
                reclaim.push((id.clone(), agents, silent));
            }
        }
        for (id, agents, silent) in reclaim {
            for (_, agent_type) in &agents {
                self.uncount(agent_type);
            }
            // Its free allotted seats too: it admits nothing from them after its lease,
            // which the grace period bounds, and the timing rule covers the rest.
            let allotted = self.clear_blocks(&id);
            self.pending.push(SeatChange::Reclaim {
                slave: id.to_string(),
            });
            out.alert(
                self.alert(
                    Severity::Warning,
                    AlertKind::SeatsReclaimed,
                    format!(
                        "reclaimed {} seats{} of slave {id}: silent for {} ms, past its grace period plus the {} ms margin (it has logged its agents out by now)",
                        agents.len(),
                        if allotted > 0 {
                            format!(" and {allotted} free allotted seats")
                        } else {
                            String::new()
                        },
                        silent.as_millis(),
                        margin.as_millis()
                    ),
                )
                .slave(id.as_str())
                .counts(self.counts()),
            );
        }
        for (id, seats, silence) in lost {
            out.alert(
                self.alert(
                    Severity::Warning,
                    AlertKind::SlaveDisconnected,
                    format!(
                        "slave {id} disconnected: no heartbeat for {} ms ({missed} intervals); its {seats} seats are kept until it reconnects",
                        silence.as_millis()
                    ),
                )
                .slave(id.as_str())
                .counts(self.counts()),
            );
        }
        if self.next_counts_at.is_none_or(|at| now >= at) {
            self.next_counts_at = Some(now + self.cfg.counts_interval);
            let total = self.total_limit();
            let types: Vec<String> = self
                .cfg
                .license
                .limits
                .agent_types
                .iter()
                .map(|(t, limit)| {
                    format!(
                        "{t} {}/{limit}",
                        self.in_use_by_type.get(t).copied().unwrap_or(0)
                    )
                })
                .collect();
            let connected = self.slaves.values().filter(|s| s.connected).count();
            let mut message = format!(
                "license counts: {}/{total} seats in use, {connected} of {} slaves connected",
                self.total_in_use,
                self.slaves.len()
            );
            if !types.is_empty() {
                message.push_str(&format!("; {}", types.join(", ")));
            }
            out.alert(
                self.alert(Severity::Info, AlertKind::LicenseCounts, message)
                    .counts(self.counts()),
            );
        }
        let days_left = self.cfg.license.days_left(today);
        if days_left <= self.cfg.expiry_warning_days && self.last_expiry_warning != Some(today) {
            self.last_expiry_warning = Some(today);
            let severity = if days_left <= 7 {
                Severity::Critical
            } else {
                Severity::Warning
            };
            let message = if days_left < 0 {
                format!(
                    "master license {} expired on {}: renew it and reload",
                    self.cfg.license.id, self.cfg.license.expires
                )
            } else {
                format!(
                    "master license {} expires on {} ({days_left} days left)",
                    self.cfg.license.id, self.cfg.license.expires
                )
            };
            out.alert(self.alert(severity, AlertKind::LicenseExpiringSoon, message));
        }
        out
    }
}
