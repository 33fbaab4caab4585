//! Allotment mode's capacity moves, timed for the metrics: how long free seats take to
//! move through blocks alone, from the blocks of slaves that hold them to a slave that
//! needs them (`lmbus_allot_capacity_move_seconds`).
//!
//! A clock starts, for one slave instance and one agent type, when the leader tells at
//! least one slave to give seats back (`ReturnAllotment`, `ShrinkAllotment`) because that
//! slave needed seats of that type: its allot request wanted more than was free (fair
//! shares, or the pool nearly exhausted: other slaves are told), or its registration found
//! no free seat (the wait for blocks: other slaves, and the slave itself for its blocks of
//! other types, are told). A tell for another reason (the offline limit) starts none. A clock already running for the pair keeps its start. The clock stops when
//! a seat of that type is next granted to that instance: its block grows in an allot
//! answer, or the leader approves one of its registrations with a new seat. The time
//! between, on the engine's monotonic `now`, is one observation, however many seats the
//! grant gives. Which seats arrive is not traced: any seat of the type counts, whoever gave
//! it back.
//!
//! A clock is dropped without an observation, and counted (`AllotCounts::moves_untimed`),
//! when it has run longer than [`Engine::move_horizon`] (past it the seats come from a
//! reclaim or not at all, not through blocks alone), when the slave's session ends
//! (silent, reclaimed, forgotten, a new instance), or when it cannot start because
//! `max_slaves` clocks run. None of this is in the ledger: a replica that becomes leader
//! starts with no clock and starts only those of the tells it sends itself
//! ([`Engine::restart_silence_clocks`] clears what it still had from an earlier term), so
//! no observation spans a change of leader.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lmbus_schemas::SlaveId;
use uuid::Uuid;

use super::Engine;

/// Most observations kept between two reads by the runtime (one per tick); beyond it they
/// are dropped and counted as untimed.
pub const MAX_UNTAKEN_MOVES: usize = 4096;

/// A running clock: when it started, for which instance of the slave.
#[derive(Debug, Clone, Copy)]
struct Clock {
    started: Instant,
    instance: Uuid,
}

/// The running clocks and the observations the runtime has not taken yet.
#[derive(Debug, Default)]
pub(super) struct Moves {
    /// (slave, agent type) → its clock. Bounded by `max_slaves` entries.
    running: BTreeMap<(SlaveId, String), Clock>,
    /// Stopped clocks' times, oldest first, at most [`MAX_UNTAKEN_MOVES`].
    timed: Vec<Duration>,
}

impl Engine {
    /// The longest a capacity move is timed: twice the return wait (4 refresh intervals).
    /// A holder told to give back answers within the return wait or is stranded, and the
    /// slave that needed the seats asks again within a refresh interval.
    pub fn move_horizon(&self) -> Duration {
        self.return_wait().saturating_mul(2)
    }

    /// Other slaves were just told to give seats back because `id` needed seats of
    /// `agent_type`: its clock starts, unless one already runs.
    pub(super) fn start_move(&mut self, now: Instant, id: &SlaveId, agent_type: &str) {
        let Some(instance) = self.slaves.get(id).map(|s| s.instance) else {
            return;
        };
        let key = (id.clone(), agent_type.to_owned());
        if self.moves.running.contains_key(&key) {
            return;
        }
        if self.moves.running.len() >= self.cfg.max_slaves.max(1) {
            self.allot_counts.moves_untimed += 1;
            return;
        }
        self.moves.running.insert(
            key,
            Clock {
                started: now,
                instance,
            },
        );
    }

    /// A seat of `agent_type` was granted to `id` (its block grew, or a registration got
    /// a new seat): its clock, if one runs, stops and is observed.
    pub(super) fn stop_move(&mut self, now: Instant, id: &SlaveId, agent_type: &str) {
        if self.moves.running.is_empty() {
            return;
        }
        let Some(clock) = self
            .moves
            .running
            .remove(&(id.clone(), agent_type.to_owned()))
        else {
            return;
        };
        let took = now.saturating_duration_since(clock.started);
        let same = self
            .slaves
            .get(id)
            .is_some_and(|s| s.connected && s.instance == clock.instance);
        if same && took <= self.move_horizon() && self.moves.timed.len() < MAX_UNTAKEN_MOVES {
            self.moves.timed.push(took);
        } else {
            self.allot_counts.moves_untimed += 1;
        }
    }

    /// At every tick: clocks past the horizon, or whose slave's session ended, are
    /// dropped and counted as untimed.
    pub(super) fn expire_moves(&mut self, now: Instant) {
        if self.moves.running.is_empty() {
            return;
        }
        let horizon = self.move_horizon();
        let slaves = &self.slaves;
        let before = self.moves.running.len();
        self.moves.running.retain(|(id, _), clock| {
            now.saturating_duration_since(clock.started) <= horizon
                && slaves
                    .get(id)
                    .is_some_and(|s| s.connected && s.instance == clock.instance)
        });
        self.allot_counts.moves_untimed += (before - self.moves.running.len()) as u64;
    }

    /// A new term: no clock of an earlier one runs on (none is observed or counted).
    pub(super) fn clear_moves(&mut self) {
        self.moves = Moves::default();
    }

    /// The capacity moves timed since the last call, oldest first; the runtime reads them
    /// at every tick while leading, into `lmbus_allot_capacity_move_seconds`.
    pub fn take_capacity_moves(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.moves.timed)
    }

    /// How many clocks run (for tests).
    #[cfg(test)]
    pub(super) fn moves_running(&self) -> usize {
        self.moves.running.len()
    }
}
