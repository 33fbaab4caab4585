//! The offline limit (vendor sync): a master license with `sync_within_days` stops
//! granting new seats once that many days have passed since the installation's last
//! successful sync with the vendor.
//!
//! The clock starts at the latest `Synced` record in the ledger, or, before any, at the
//! start of the day the license was issued: a license fresh from the vendor is itself
//! contact with the vendor, the date is signed (no operator or slave can move it), every
//! replica reads the same one with no record of its own, and deleting the cluster's
//! streams (`admin remove-state`) cannot move the clock back. Both survive a failover: the
//! `Synced` record is replayed and carried by snapshots like the seats.
//!
//! Time here is the wall clock the runtime passes in with `set_wall_clock` before every
//! event (0, never set: the limit is not enforced, as in the engine's own tests that do
//! not care), never earlier than the engine's floor: the latest time a record applied or a
//! reading handled showed, plus the monotonic time since (`Engine::handle`). A clock set
//! back therefore gains nothing while a replica runs, and after a restart the clock starts
//! from the ledger's latest grant; a vendor sync over NATS resets the floor to the vendor's
//! signed time, so a clock that ran ahead by accident is healed by the next sync. The warnings (30, 14, 7 and 1 days before, then the limit itself) are each
//! given once per deadline: the leader records each as `SyncWarned`, so a new leader does
//! not give them again; once the limit's passing is recorded, a wall clock set back does not
//! undo it. Past the limit registrations are refused `sync_overdue`, agents
//! already registered keep their seats (as with a lowered limit), allotment blocks stop
//! growing and their holders are told to give them back.

use std::time::Instant;

use lmbus_schemas::{
    AlertKind, ControlMessage, OfflineLimit, RejectReason, SeatChange, Severity, SlaveId,
    SyncStatus,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::{Effect, Engine, Output, Slave};

/// One day in milliseconds.
pub const DAY_MS: u64 = 86_400_000;

/// Air-gapped sync requests kept waiting for their answer; an older one's answer is refused.
pub const MAX_EXPORTED: usize = 16;

/// How often the leader records its clock (`Clock`) while the license has an offline limit:
/// what a restart after the clock was set back can gain, at most, besides the downtime.
pub const CLOCK_MARK_EVERY_MS: u64 = 3_600_000;

/// How many days before the offline limit the master warns (each once per deadline).
pub const SYNC_WARN_DAYS: [u32; 4] = [30, 14, 7, 1];

/// A Unix millisecond time as people read it in alerts (RFC 3339, UTC, to the second).
fn when(unix_ms: u64) -> String {
    i64::try_from(unix_ms / 1000)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix_ms} ms after 1970"))
}

impl Engine {
    /// When the master license's offline limit ends (Unix milliseconds), if it has one.
    pub fn sync_deadline_ms(&self) -> Option<u64> {
        let days = self.cfg.license.sync_within_days?;
        let from = self.last_sync_ms.max(self.cfg.license.issued_unix_ms());
        Some(from.saturating_add(u64::from(days).saturating_mul(DAY_MS)))
    }

    /// The latest vendor sync in the ledger (Unix milliseconds; 0: none).
    pub fn last_sync_ms(&self) -> u64 {
        self.last_sync_ms
    }

    /// The offline limit has passed: at the wall clock of the event being handled, or at
    /// the one a leader recorded passing it (`SyncWarned` with 0 days for this deadline), so
    /// that a clock set back afterwards does not grant seats again.
    pub fn sync_overdue(&self) -> bool {
        self.sync_deadline_ms().is_some_and(|d| {
            (self.wall_ms > 0 && self.wall_ms >= d) || self.sync_warned == Some((d, 0))
        })
    }

    /// The offline limit as `admin status` shows it.
    pub(super) fn sync_status(&self) -> Option<SyncStatus> {
        Some(SyncStatus {
            within_days: self.cfg.license.sync_within_days?,
            last_sync_ms: self.last_sync_ms,
            deadline_ms: self.sync_deadline_ms()?,
            overdue: self.sync_overdue(),
        })
    }

    /// Refuses a new seat past the offline limit.
    pub(super) fn check_sync(&self) -> Result<(), (RejectReason, String)> {
        if !self.sync_overdue() {
            return Ok(());
        }
        Err((
            RejectReason::SyncOverdue,
            format!(
                "the master license has not synced with the vendor within its offline limit of {} days (passed {}): no new seats until a sync succeeds",
                self.cfg.license.sync_within_days.unwrap_or(0),
                when(self.sync_deadline_ms().unwrap_or(0))
            ),
        ))
    }

    /// When a slave license's own offline limit ends (Unix milliseconds): that many days
    /// after the installation's last vendor sync (the master syncs for every slave), or
    /// after the license's issue day before any.
    pub(super) fn slave_sync_deadline_ms(&self, limit: &OfflineLimit) -> u64 {
        self.last_sync_ms
            .max(limit.issued_ms)
            .saturating_add(u64::from(limit.within_days).saturating_mul(DAY_MS))
    }

    /// Refuses a new seat to a slave whose license's offline limit has passed (agents it
    /// already holds keep their seats, as under the master license's own limit).
    pub(super) fn check_slave_sync(&self, slave: &Slave) -> Result<(), (RejectReason, String)> {
        let Some((id, limit)) = slave
            .license
            .as_ref()
            .and_then(|l| Some((l.id, l.offline_limit?)))
        else {
            return Ok(());
        };
        let deadline = self.slave_sync_deadline_ms(&limit);
        if self.wall_ms == 0 || self.wall_ms < deadline {
            return Ok(());
        }
        Err((
            RejectReason::SyncOverdue,
            format!(
                "slave license {id} has not been synced with the vendor within its offline limit of {} days (passed {}): no new seats on this slave until the master's next vendor sync",
                limit.within_days,
                when(deadline)
            ),
        ))
    }

    /// The warning stage the wall clock is in for `deadline`: the fewest days of
    /// [`SYNC_WARN_DAYS`] the time left is within, 0 once passed, `None` before the first.
    fn sync_stage(&self, deadline: u64) -> Option<u32> {
        if self.wall_ms == 0 {
            return None;
        }
        let left = deadline.saturating_sub(self.wall_ms);
        if left == 0 {
            return Some(0);
        }
        SYNC_WARN_DAYS
            .iter()
            .rev()
            .copied()
            .find(|&days| left <= u64::from(days) * DAY_MS)
    }

    /// The tick's part: one alert (and `SyncWarned` record) when the wall clock reached a
    /// stage not yet warned of for this deadline; at the limit, the slaves holding blocks
    /// are told to give them back.
    pub(super) fn sync_tick(&mut self, now: Instant, out: &mut Output) {
        let Some(deadline) = self.sync_deadline_ms() else {
            return;
        };
        if self.wall_ms > 0
            && self.wall_ms >= self.last_clock_mark.saturating_add(CLOCK_MARK_EVERY_MS)
        {
            self.last_clock_mark = self.wall_ms;
            self.pending.push(SeatChange::Clock {
                at_ms: self.wall_ms,
                reset: false,
            });
        }
        let Some(stage) = self.sync_stage(deadline) else {
            return;
        };
        let warned = match self.sync_warned {
            Some((d, days)) if d == deadline => stage >= days,
            _ => false,
        };
        if warned {
            return;
        }
        self.sync_warned = Some((deadline, stage));
        self.pending.push(SeatChange::SyncWarned {
            deadline_ms: deadline,
            days: stage,
        });
        let license = &self.cfg.license;
        let within = license.sync_within_days.unwrap_or(0);
        let since = if self.last_sync_ms == 0 {
            format!("no sync since the license was issued ({})", license.issued)
        } else {
            format!("last sync {}", when(self.last_sync_ms))
        };
        let alert = if stage == 0 {
            self.alert(
                Severity::Critical,
                AlertKind::SyncDue,
                format!(
                    "master license {} passed its offline limit of {within} days at {} ({since}): no new seats are granted until a vendor sync succeeds; agents already registered keep theirs",
                    license.id,
                    when(deadline)
                ),
            )
        } else {
            self.alert(
                Severity::Warning,
                AlertKind::SyncDue,
                format!(
                    "master license {} must sync with the vendor within {}: its offline limit of {within} days ends {} ({since}); after that no new seats are granted until a sync succeeds",
                    license.id,
                    lmbus_schemas::human::plural(u64::from(stage), "day", "days"),
                    when(deadline)
                ),
            )
        };
        out.alert(alert.counts(self.counts()));
        if stage == 0 {
            let holders: Vec<SlaveId> = self
                .slaves
                .iter_mut()
                .filter(|(_, s)| s.connected && !s.blocks.is_empty())
                .map(|(id, s)| {
                    s.asked_to_return.get_or_insert(now);
                    id.clone()
                })
                .collect();
            for slave in holders {
                out.effects.push(Effect::Control {
                    slave,
                    message: ControlMessage::ReturnAllotment,
                });
            }
        }
    }

    /// A vendor sync succeeded at `at_ms` (the vendor's signed answer time; the runtime
    /// verified the answer): the offline limit counts from there, or from this leader's
    /// clock if that is earlier. Recorded as `Synced`; an earlier time than the last
    /// sync recorded changes nothing.
    pub(super) fn synced(&mut self, now: Instant, at_ms: u64, sync: Uuid) -> Output {
        let mut out = Output::default();
        // Never later than this leader's clock (which is never earlier than its floor).
        let at_ms = if self.wall_ms > 0 {
            at_ms.min(self.wall_ms)
        } else {
            at_ms
        };
        if at_ms <= self.last_sync_ms {
            if self.exported.contains(&sync) {
                // A late import (a later sync is in the ledger already): it moves no clock,
                // but its request is settled, so the answer applies once.
                self.apply_synced(at_ms, sync);
                self.pending.push(SeatChange::Synced { at_ms, sync });
            }
            return out;
        }
        // An answer over NATS is fresh (the leader waited for it): the vendor's signed time
        // is real time, so a clock that had run ahead (the floor with it) is healed. An
        // imported answer may be days old: it moves the floor only up.
        let imported = self.exported.contains(&sync);
        if imported {
            self.wall_passed(at_ms, now);
        } else {
            self.apply_clock(at_ms, true, now);
            self.wall_ms = at_ms;
        }
        // An imported answer settles its exported request (the runtime checked it waits).
        let was_overdue = self.sync_overdue();
        self.apply_synced(at_ms, sync);
        self.pending.push(SeatChange::Synced { at_ms, sync });
        if !imported {
            // Recorded, so that every replica (and a snapshot) is healed too.
            self.pending.push(SeatChange::Clock { at_ms, reset: true });
        }
        if let Some(deadline) = self.sync_deadline_ms() {
            out.alert(self.alert(
                Severity::Info,
                AlertKind::SyncDue,
                format!(
                    "vendor sync succeeded at {}: the offline limit of master license {} now ends {}{}",
                    when(at_ms),
                    self.cfg.license.id,
                    when(deadline),
                    if was_overdue {
                        "; new seats are granted again"
                    } else {
                        ""
                    }
                ),
            ));
        }
        out
    }

    /// Replays a `Clock` record: the floor rises to `at_ms`, or with `reset` becomes it.
    pub(super) fn apply_clock(&mut self, at_ms: u64, reset: bool, now: Instant) {
        if reset {
            self.wall_floor = Some((at_ms, now));
        } else {
            self.wall_passed(at_ms, now);
        }
        self.last_clock_mark = self.last_clock_mark.max(at_ms);
    }

    /// Replays a `Synced` record: the clock, and the exported request it answers is settled.
    pub(super) fn apply_synced(&mut self, at_ms: u64, sync: Uuid) {
        self.last_sync_ms = self.last_sync_ms.max(at_ms);
        self.exported.retain(|s| *s != sync);
    }

    /// The installation's identity, once a leader recorded it.
    pub fn installation(&self) -> Option<Uuid> {
        self.installation
    }

    /// The installation's key seed (base64), once a leader recorded one: it signs the
    /// sync requests.
    pub fn installation_key(&self) -> Option<&str> {
        self.installation_key.as_deref()
    }

    /// Replays an `Installation` record (the first id counts, and the first key).
    pub(super) fn apply_installation(&mut self, id: Uuid, key: Option<&String>) {
        self.installation.get_or_insert(id);
        if self.installation_key.is_none() {
            self.installation_key = key.cloned();
        }
    }

    /// Replays a `SyncExported` record.
    pub(super) fn apply_sync_exported(&mut self, sync: Uuid) {
        if !self.exported.contains(&sync) {
            self.exported.push_back(sync);
        }
        while self.exported.len() > MAX_EXPORTED {
            self.exported.pop_front();
        }
    }

    /// Whether `sync` is an exported request still waiting for its answer: an imported
    /// answer applies only then (once, to the request it answers).
    pub fn awaits_import(&self, sync: Uuid) -> bool {
        self.exported.contains(&sync)
    }

    /// Replays a `SyncWarned` record.
    pub(super) fn apply_sync_warned(&mut self, deadline_ms: u64, days: u32) {
        self.sync_warned = Some((deadline_ms, days));
    }

    /// The offline limit's state as changes that rebuild it (for snapshots).
    pub(super) fn sync_snapshot(&self) -> Vec<SeatChange> {
        let mut changes = Vec::new();
        if let Some(id) = self.installation {
            changes.push(SeatChange::Installation {
                id,
                key: self.installation_key.clone(),
            });
        }
        if self.last_sync_ms > 0 {
            changes.push(SeatChange::Synced {
                at_ms: self.last_sync_ms,
                sync: Uuid::nil(),
            });
        }
        if let Some((deadline_ms, days)) = self.sync_warned {
            changes.push(SeatChange::SyncWarned { deadline_ms, days });
        }
        for sync in &self.exported {
            changes.push(SeatChange::SyncExported { sync: *sync });
        }
        changes
    }
}
