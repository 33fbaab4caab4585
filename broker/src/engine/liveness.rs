//! Whether slaves are alive: heartbeats (with their books, which may ask for a new hello)
//! and the tick (silence, reclaim under the timing rule, counts and license expiry alerts).

use std::time::{Duration, Instant};

use lmbus_schemas::human::{duration, plural};

use lmbus_schemas::{
    AlertKind, ControlMessage, Heartbeat, RejectReason, Reply, SeatChange, Severity, SlaveId,
};
use time::Date;

use super::{Effect, Engine, Output, Slave};

/// What will become of a slave's seats now that it is silent, and when: the second half of
/// its `slave_disconnected` alert. The reclaim comes `grace + margin` after the last word
/// from it (see [`Engine::tick`]), and only for a slave that logs out after its grace.
fn what_becomes_of(
    slave: &Slave,
    silent: Duration,
    margin: Duration,
    forget_after: Duration,
) -> String {
    let seats = slave.agents.len() as u64;
    let allotted = u64::from(slave.blocks.values().sum::<u32>());
    let held = if allotted > 0 {
        format!(
            "its {} and {}",
            plural(seats, "seat", "seats"),
            plural(allotted, "free allotted seat", "free allotted seats")
        )
    } else {
        format!("its {}", plural(seats, "seat", "seats"))
    };
    let (is, stays) = if seats + allotted == 1 {
        ("is", "stays")
    } else {
        ("are", "stay")
    };
    if seats == 0 && allotted == 0 {
        if forget_after.is_zero() {
            "it holds no seats".to_owned()
        } else {
            format!(
                "it holds no seats and is forgotten in {} (after {} of silence, --forget-after) unless it says hello again first",
                duration(forget_after.saturating_sub(silent)),
                duration(forget_after)
            )
        }
    } else if slave.logout_after_grace {
        let after = slave.grace + margin;
        format!(
            "{held} {is} reclaimed in {} (after {} of silence: its {} grace period plus the {} reclaim margin) unless it says hello again first",
            duration(after.saturating_sub(silent)),
            duration(after),
            duration(slave.grace),
            duration(margin),
        )
    } else {
        format!(
            "{held} {stays} taken until it says hello again or an operator releases them (admin release): it does not log its agents out when its grace period ends, so the master never reclaims them"
        )
    }
}

impl Engine {
    pub(super) fn heartbeat(&mut self, now: Instant, id: &SlaveId, heartbeat: Heartbeat) -> Output {
        match self.slaves.get_mut(id) {
            Some(slave) if slave.connected && slave.instance == heartbeat.instance => {
                slave.last_seen = now;
                slave.heard = true;
                slave.master = heartbeat.master;
                // Releases its books already account for: a hello built before them was
                // sent before this beat (one overtaken by it only over-counts).
                if let Some(seq) = heartbeat.books.as_ref().and_then(|b| b.request_seq) {
                    slave.released.retain(|_, n| *n > seq);
                }
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
                retry_after_ms: None,
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
        self.sync_tick(now, &mut out);
        self.handback(now, &mut out);
        self.expire_moves(now);
        let missed = self.cfg.missed_heartbeats;
        let margin = self.cfg.reclaim_margin;
        let forget_after = self.cfg.forget_after;
        let mut lost = Vec::new();
        let mut went_quiet = Vec::new();
        for (id, slave) in &mut self.slaves {
            let silent = now.saturating_duration_since(slave.last_seen);
            if slave.connected && silent > slave.silence_limit(missed) {
                slave.connected = false;
                if !slave.wants.is_empty() {
                    went_quiet.push(id.clone());
                }
                if !slave.heard && slave.agents.is_empty() && slave.blocks.is_empty() {
                    // Known only from the ledger, holding nothing: the previous leader
                    // already said it was silent; it is forgotten in due time.
                    continue;
                }
                lost.push((
                    id.clone(),
                    slave.silence_limit(missed),
                    what_becomes_of(slave, silent, margin, forget_after),
                ));
            }
        }
        // A slave cut off asks for nothing more: its demand is the block it still holds
        // (counted until it is reclaimed), not what it last asked for.
        for id in went_quiet {
            self.set_wants(&id, std::collections::BTreeMap::new());
        }
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
            if allotted > 0 {
                self.allot_counts.reclaims += 1;
                self.allot_counts.seats_reclaimed += u64::from(allotted);
            }
            self.pending.push(SeatChange::Reclaim {
                slave: id.to_string(),
            });
            out.alert(
                self.alert(
                    Severity::Warning,
                    AlertKind::SeatsReclaimed,
                    format!(
                        "reclaimed {}{} of slave {id}: silent for {}, past its grace period plus the {} margin (it has logged its agents out by now)",
                        plural(agents.len() as u64, "seat", "seats"),
                        if allotted > 0 {
                            format!(" and {}", plural(u64::from(allotted), "free allotted seat", "free allotted seats"))
                        } else {
                            String::new()
                        },
                        duration(silent),
                        duration(margin)
                    ),
                )
                .slave(id.as_str())
                .counts(self.counts()),
            );
        }
        for (id, silence, fate) in lost {
            out.alert(
                self.alert(
                    Severity::Warning,
                    AlertKind::SlaveDisconnected,
                    format!(
                        "slave {id} disconnected: no heartbeat for {} ({missed} intervals); {fate}",
                        duration(silence)
                    ),
                )
                .slave(id.as_str())
                .counts(self.counts()),
            );
        }
        self.forget_silent(now, &mut out);
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
            let counts = self.counts();
            let mut alert = self
                .alert(Severity::Info, AlertKind::LicenseCounts, message)
                .counts(counts.clone());
            // The peaks since the previous counts alert, if this engine raised it one
            // interval ago (not a standby's or an earlier term's: their window is unknown).
            if let Some((since, mut peaks)) = self.peaks.take()
                && now.saturating_duration_since(since) <= 2 * self.cfg.counts_interval
            {
                for (key, n) in &counts {
                    let peak = peaks.entry(key.clone()).or_insert(0);
                    *peak = (*peak).max(*n);
                }
                alert.peaks = peaks;
            }
            self.peaks = Some((now, counts));
            out.alert(alert);
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
