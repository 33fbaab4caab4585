//! Allotment mode: blocks of free seats a slave admits from locally (see
//! `lmbus_schemas::allot` for the protocol).
//!
//! The master counts every block as in use: at every ledger record, per agent type and in
//! total, the seats held plus the blocks never exceed the license (`check_admit` and the
//! sizing here both count `allotted`). Only the slave shrinks its block (it asks for less
//! and stops using the rest when it sends); the master grows one only from free seats, and
//! empties it only at the slave's hello (the slave admits nothing locally while its hello
//! is in flight) or when it reclaims a silent slave under the timing rule (the slave has
//! logged every agent out by then). A journal entry moves one seat between the block and
//! the seat table without changing the counts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lmbus_schemas::{
    Admission, AlertKind, AllotOpKind, AllotRequest, Allotment, ControlMessage, ErrorCode,
    RejectReason, RejectedAgent, Reply, SeatChange, Severity, SlaveId, WireError,
};

use super::guards::MAX_SEQ_JUMP;
use super::{Effect, Engine, Granted, Output, demand};

/// Below this many seats not held per slave in allotment mode (in total or for a type),
/// the pool is exhausted: blocks stop growing, slaves are asked to give theirs back, and the
/// last seats are granted one by one to whoever asks first.
pub const ALLOT_MIN_BLOCK: u32 = 2;

/// What allotment mode did on a leader, for its metrics: counted when decided, never when
/// a ledger record is replayed, so a replica counts only its own decisions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AllotCounts {
    /// Allot answers that grew a block, and the seats they added.
    pub grants: u64,
    pub seats_granted: u64,
    /// Allot answers that gave less than the slave asked for (the pool was short, nearly
    /// exhausted, or the slave's local limit was reached).
    pub partial_grants: u64,
    /// Allot requests in which a slave gave free seats back, and how many.
    pub returns: u64,
    pub seats_returned: u64,
    /// Silent slaves whose blocks were reclaimed under the timing rule, and the seats.
    pub reclaims: u64,
    pub seats_reclaimed: u64,
    /// Registrations told to ask again while seats of blocks were being given back.
    pub waits: u64,
    /// Capacity refusals made final while free seats sat in the blocks of holders that
    /// did not answer within the return wait (stranded until the reclaim rule).
    pub stranded_refusals: u64,
    /// Capacity moves whose clock was dropped without an observation (see `moves`): past
    /// the horizon, the slave's session ended, or too many clocks ran.
    pub moves_untimed: u64,
}

/// One slave's seats of one agent type in allotment mode, for the per-slave gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaveSeats {
    pub slave: String,
    pub agent_type: String,
    /// Seats its agents hold.
    pub used: u32,
    /// Free seats in its block.
    pub free: u32,
}

/// The (slave, agent type) pairs with the most seats, and how many were left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopSlaveSeats {
    /// Most seats (used plus free) first, then by slave id and agent type.
    pub pairs: Vec<SlaveSeats>,
    /// Pairs holding at least one seat (used or free) that are not in `pairs`.
    pub omitted: u64,
}

/// The allotment settings of a master.
#[derive(Debug, Clone)]
pub struct AllotConfig {
    pub admission: Admission,
    /// Longest a slave admits from its blocks after it sent the request that last renewed
    /// them (also capped by the slave's grace period).
    pub lease: Duration,
    /// How often a slave sends its journal and asks for blocks.
    pub refresh: Duration,
}

impl Default for AllotConfig {
    fn default() -> Self {
        AllotConfig {
            admission: Admission::Strict,
            lease: Duration::from_secs(30),
            refresh: Duration::from_secs(2),
        }
    }
}

impl Engine {
    /// Free seats of the license: not held and not allotted.
    pub(super) fn free_total(&self) -> u32 {
        self.total_limit()
            .saturating_sub(self.total_in_use)
            .saturating_sub(self.allotted_total)
    }

    /// Free seats of one agent type (`None`: the license names no such type, and it has
    /// type limits).
    pub(super) fn free_of_type(&self, agent_type: &str) -> Option<u32> {
        let limits = &self.cfg.license.limits.agent_types;
        if limits.is_empty() {
            return Some(u32::MAX);
        }
        let limit = *limits.get(agent_type)?;
        let used = self.in_use_by_type.get(agent_type).copied().unwrap_or(0);
        let allotted = self.allotted_by_type.get(agent_type).copied().unwrap_or(0);
        Some(limit.saturating_sub(used).saturating_sub(allotted))
    }

    /// Sets one block of a slave, keeping the counters; no record.
    pub(super) fn set_block(&mut self, id: &SlaveId, agent_type: &str, seats: u32) {
        let Some(slave) = self.slaves.get_mut(id) else {
            return;
        };
        let demand_before = demand(slave, agent_type);
        let (total_before, held_before) = (slave.demand_total, slave.held_total);
        let old = if seats == 0 {
            slave.blocks.remove(agent_type).unwrap_or(0)
        } else {
            slave
                .blocks
                .insert(agent_type.to_owned(), seats)
                .unwrap_or(0)
        };
        // Only this type moved: the slave's totals follow by the difference.
        let demand_after = demand(slave, agent_type);
        slave.demand_total = total_before
            .saturating_sub(demand_before)
            .saturating_add(demand_after);
        slave.held_total = held_before
            .saturating_sub(u64::from(old))
            .saturating_add(u64::from(seats));
        self.demand.moved(agent_type, demand_before, demand_after);
        self.demand.moved_total(total_before, slave.demand_total);
        self.holders.moved(id, agent_type, old, seats);
        self.holders.moved_total(id, held_before, slave.held_total);
        self.allotted_total = self
            .allotted_total
            .saturating_sub(old)
            .saturating_add(seats);
        let entry = self
            .allotted_by_type
            .entry(agent_type.to_owned())
            .or_insert(0);
        *entry = entry.saturating_sub(old).saturating_add(seats);
        if *entry == 0 {
            self.allotted_by_type.remove(agent_type);
        }
    }

    /// Empties every block of a slave, keeping the counters; no record. Returns how many
    /// seats they held. Its demand is forgotten too, until its next allot request.
    pub(super) fn clear_blocks(&mut self, id: &SlaveId) -> u32 {
        self.set_wants(id, BTreeMap::new());
        let types: Vec<String> = self
            .slaves
            .get(id)
            .map(|s| s.blocks.keys().cloned().collect())
            .unwrap_or_default();
        let mut freed = 0;
        for agent_type in types {
            freed += self
                .slaves
                .get(id)
                .and_then(|s| s.blocks.get(&agent_type).copied())
                .unwrap_or(0);
            self.set_block(id, &agent_type, 0);
        }
        freed
    }

    /// The `Allotment` record of a slave's current blocks and journal position.
    pub(super) fn allotment_record(&self, id: &SlaveId) -> Option<SeatChange> {
        let s = self.slaves.get(id)?;
        Some(SeatChange::Allotment {
            slave: id.to_string(),
            blocks: s.blocks.clone(),
            journal: s.journal,
            request: s.allot_seq,
        })
    }

    /// Replaces a slave's demand (`Slave::wants`), keeping the demand book.
    pub(super) fn set_wants(&mut self, id: &SlaveId, wants: BTreeMap<String, u32>) {
        let Some(s) = self.slaves.get_mut(id) else {
            return;
        };
        let mut types: Vec<String> = s.wants.keys().chain(wants.keys()).cloned().collect();
        types.sort();
        types.dedup();
        let before: Vec<u64> = types.iter().map(|t| demand(s, t)).collect();
        let total_before = s.demand_total;
        s.wants = wants;
        let after: Vec<u64> = types.iter().map(|t| demand(s, t)).collect();
        s.demand_total = total_demand(s);
        for ((t, b), a) in types.iter().zip(before).zip(after) {
            self.demand.moved(t, b, a);
        }
        self.demand.moved_total(total_before, s.demand_total);
    }

    /// The demand book and the holders counted again from scratch (after demands were
    /// dropped in bulk, and by the tests, which compare it with the running one).
    pub(super) fn recount_demand(&mut self) {
        for s in self.slaves.values_mut() {
            s.demand_total = total_demand(s);
            s.held_total = held(s);
        }
        self.demand = demand::DemandBook::recount(self.slaves.values().map(|s| {
            s.blocks
                .keys()
                .chain(s.wants.keys())
                .map(|t| (t.as_str(), demand(s, t)))
                .collect()
        }));
        self.holders = demand::Holders::recount(self.slaves.iter().map(|(id, s)| (id, &s.blocks)));
    }

    /// Seats of `agent_type` not held by any agent (`None`: in total), free or in blocks:
    /// what fair shares split.
    fn unheld(&self, agent_type: Option<&str>) -> u32 {
        let total_pool = self.total_limit().saturating_sub(self.total_in_use);
        match agent_type {
            Some(t) => self
                .cfg
                .license
                .limits
                .agent_types
                .get(t)
                .map_or(total_pool, |l| {
                    l.saturating_sub(self.in_use_by_type.get(t).copied().unwrap_or(0))
                })
                .min(total_pool),
            None => total_pool,
        }
    }

    /// The fair share of the seats not held, of `agent_type` (`None`: in total), when the
    /// slaves' demands exceed them: the max-min fair level (water-filling, as Doorman's
    /// FairShare), so a slave that asks for less than an equal split keeps all it asks for
    /// and what it leaves is split among the others. A slave's demand is the block it asked
    /// for in its last allot request (capped at what it could get then), or the block it
    /// holds if more (a new leader knows no requests yet: it takes the blocks; a slave cut
    /// off keeps its block as its demand until it is reclaimed). `u32::MAX` when every
    /// demand fits. Seats in use are not part of it: they are never taken back. One pass
    /// over the distinct demands, none over the slaves (`demand.rs`).
    fn fair_level(&self, agent_type: Option<&str>) -> u32 {
        self.demand
            .of(agent_type)
            .map_or(u32::MAX, |d| d.level(self.unheld(agent_type)))
    }

    pub(super) fn allot(&mut self, now: Instant, id: &SlaveId, request: AllotRequest) -> Output {
        if self.cfg.allot.admission != Admission::Allotment {
            return Output::reply(Reply::Error(WireError {
                code: ErrorCode::Invalid,
                message: "this master decides every registration itself (--admission strict): ask for seats one by one".to_owned(),
            }));
        }
        let live = self
            .slaves
            .get(id)
            .is_some_and(|s| s.connected && s.instance == request.instance);
        if !live {
            return Output::reply(Reply::Refused {
                reason: RejectReason::SlaveNotConnected,
                detail: "the master has no live session with this slave instance: say hello again"
                    .to_owned(),
                last_hello: None,
                retry_after_ms: None,
            });
        }
        let last = self.slaves.get(id).map_or(0, |s| s.allot_seq);
        if request.seq <= last || request.seq - last > MAX_SEQ_JUMP {
            let detail = format!(
                "allot request number {} was already processed or is out of range (the last was {last}): a replayed or delayed request; the blocks are untouched",
                request.seq
            );
            let mut out = Output::reply(Reply::Refused {
                reason: RejectReason::Replayed,
                detail: detail.clone(),
                last_hello: None,
                retry_after_ms: None,
            });
            let alert = self
                .alert(
                    Severity::Warning,
                    AlertKind::RegistrationRejected,
                    format!("slave {id}: {detail}"),
                )
                .slave(id.as_str())
                .reason(RejectReason::Replayed);
            if let Some(alert) = self.quietly(now, id, "replayed allot request", alert) {
                out.alert(alert);
            }
            return out;
        }
        let mut out = Output::default();
        let (journal_before, blocks_before) = {
            let s = self.slaves.get_mut(id).expect("checked live above");
            s.last_seen = now;
            s.allot_seq = request.seq;
            (s.journal, s.blocks.clone())
        };

        // The journal, in order; entries already applied are skipped.
        let mut refused = Vec::new();
        for op in request.ops.iter().filter(|op| op.n > journal_before) {
            match op.kind {
                AllotOpKind::Admit => {
                    if let Err((reason, detail)) =
                        self.seat_from_block(id, &op.agent_id, &op.agent_type)
                    {
                        refused.push((op.agent_id.clone(), op.agent_type.clone(), reason, detail));
                    }
                }
                AllotOpKind::Release => {
                    let held = self
                        .slaves
                        .get(id)
                        .and_then(|s| s.agents.get(&op.agent_id).cloned());
                    if let Some(agent_type) = held {
                        // The seat goes back to the slave's block: the counts do not move.
                        self.remove_seat(id, &op.agent_id);
                        let block = self.block_of(id, &agent_type);
                        self.set_block(id, &agent_type, block + 1);
                        self.pending.push(SeatChange::ToBlock {
                            slave: id.to_string(),
                            agent_id: op.agent_id.clone(),
                        });
                    }
                }
                AllotOpKind::Other => {}
            }
            if let Some(s) = self.slaves.get_mut(id) {
                s.journal = op.n;
            }
        }

        // Sizing: shrink to what the slave wants (it no longer uses the rest), grow from
        // free seats unless the pool is nearly empty.
        let mut exhausted = false;
        // Types for which the pool was nearly exhausted (holders are asked to return all).
        let mut exhausted_types: Vec<String> = Vec::new();
        // Types this slave wanted more of than it got (free seats ran short).
        let mut short: Vec<String> = Vec::new();
        let (mut granted, mut returned, mut partial) = (0u64, 0u64, false);
        let mut total_short = false;
        let types: Vec<String> = {
            let s = &self.slaves[id];
            let mut t: Vec<String> = s.blocks.keys().cloned().collect();
            t.extend(request.want.keys().cloned());
            t.sort();
            t.dedup();
            t
        };
        // Past the offline limit no free seat stays in a block: every answer takes the
        // blocks back, whatever the slave wants (it admits from what it holds only until
        // this answer, or until its lease ends if it stops asking).
        let overdue = self.sync_overdue()
            || self.check_slave_sync(&self.slaves[id]).is_err()
            || self.check_backup_may_serve().is_err();
        // Its demand for fair shares: what it asks for, of the types there are seats of
        // (bounded by the license's types), capped at what it could hold (its block plus
        // its local room, and no more than the seats not held): a slave asking for
        // billions is one more demand that cannot exceed the pool.
        let wants: BTreeMap<String, u32> = if overdue {
            BTreeMap::new()
        } else {
            let room = self.local_room(id);
            request
                .want
                .iter()
                .filter(|(t, n)| **n > 0 && self.free_of_type(t).is_some())
                .map(|(t, n)| {
                    let most = self
                        .block_of(id, t)
                        .saturating_add(room)
                        .min(self.unheld(Some(t)));
                    (t.clone(), (*n).min(most))
                })
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        self.set_wants(id, wants);
        for agent_type in types {
            let want = if overdue {
                0
            } else {
                request.want.get(&agent_type).copied().unwrap_or(0)
            };
            let block = self.block_of(id, &agent_type);
            if want < block {
                self.set_block(id, &agent_type, want);
                returned += u64::from(block - want);
                continue;
            }
            if want == block {
                continue;
            }
            let Some(free_type) = self.free_of_type(&agent_type) else {
                continue;
            };
            let free_total = self.free_total();
            if self.nearly_exhausted(id, &agent_type) {
                exhausted = true;
                partial = true;
                exhausted_types.push(agent_type);
                continue;
            }
            let room = self.local_room(id);
            // No slave grows past its fair share while others' demands are unmet.
            let share = want
                .min(self.fair_level(Some(&agent_type)))
                .saturating_sub(block);
            let grow = (want - block)
                .min(free_total)
                .min(free_type)
                .min(room)
                .min(share);
            if grow > 0 {
                self.set_block(id, &agent_type, block + grow);
                granted += u64::from(grow);
                self.stop_move(now, id, &agent_type);
            }
            partial |= block + grow < want;
            if block + grow < want && grow < room {
                // The total, not the type, is what ran short: blocks of other types hold it.
                total_short |= free_total <= free_type;
                short.push(agent_type);
            }
        }
        let counts = &mut self.allot_counts;
        if granted > 0 {
            counts.grants += 1;
            counts.seats_granted += granted;
        }
        counts.partial_grants += u64::from(partial);
        if returned > 0 {
            counts.returns += 1;
            counts.seats_returned += returned;
        }
        if !exhausted && !short.is_empty() {
            self.ask_for_fair_shares(now, id, &short, total_short, &mut out);
        }
        if exhausted {
            // The last seats go to whoever asks first: every other slave with a free block
            // is asked to give it back (once until it answers).
            let mut holders: Vec<SlaveId> = Vec::new();
            let slaves = &mut self.slaves;
            for other in self.holders.above_total(0) {
                let Some(s) = slaves.get_mut(other) else {
                    continue;
                };
                if other != id && s.connected && s.asked_to_return.is_none() {
                    s.asked_to_return = Some(now);
                    holders.push(other.clone());
                }
            }
            if !holders.is_empty() {
                for agent_type in &exhausted_types {
                    self.start_move(now, id, agent_type);
                }
            }
            for slave in holders {
                out.effects.push(Effect::Control {
                    slave,
                    message: ControlMessage::ReturnAllotment,
                });
            }
        }
        let s = self.slaves.get_mut(id).expect("checked live above");
        s.asked_to_return = None;
        let changed = s.journal != journal_before || s.blocks != blocks_before;
        if changed && let Some(record) = self.allotment_record(id) {
            self.pending.push(record);
        }

        if !refused.is_empty() {
            let names: Vec<String> = refused
                .iter()
                .take(5)
                .map(|(agent, t, reason, _)| format!("{agent} ({t}: {reason})"))
                .collect();
            let more = refused.len().saturating_sub(names.len());
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            out.alert(
                self.alert(
                    Severity::Warning,
                    AlertKind::RegistrationRejected,
                    format!(
                        "slave {id} admitted {} agents from an allotment the master does not count for it; they are logged out: {}{more} ({})",
                        refused.len(),
                        names.join(", "),
                        refused[0].3
                    ),
                )
                .slave(id.as_str())
                .reason(refused[0].2)
                .counts(self.counts()),
            );
        }
        let s = &self.slaves[id];
        let lease = self
            .cfg
            .allot
            .lease
            .min(s.grace.max(self.cfg.allot.refresh));
        out.reply = Some(super::Answer::Slave(Reply::Allotment(Allotment {
            blocks: s.blocks.clone(),
            lease_ms: lease.as_millis() as u64,
            journal: s.journal,
            refused: refused
                .into_iter()
                .map(|(agent_id, _, reason, _)| RejectedAgent { agent_id, reason })
                .collect(),
            exhausted,
        })));
        out
    }

    /// Demand exceeds what is free: every other slave whose free block of a short type is
    /// above its fair share (the max-min fair level of the seats not held among the
    /// allotting slaves' demands, [`Engine::fair_level`]) is told to keep no more than that (once until it answers). When the total ran short
    /// (`total_short`), a slave whose blocks of all types add up to more than its fair
    /// share of the total is also told to keep each in proportion, so that blocks of one
    /// type do not hold the total another type needs. Seats in use are never taken.
    fn ask_for_fair_shares(
        &mut self,
        now: Instant,
        id: &SlaveId,
        short: &[String],
        total_short: bool,
        out: &mut Output,
    ) {
        let fair: BTreeMap<String, u32> = short
            .iter()
            .map(|t| (t.clone(), self.fair_level(Some(t)).max(ALLOT_MIN_BLOCK)))
            .collect();
        let fair_total = if total_short {
            self.fair_level(None).max(ALLOT_MIN_BLOCK)
        } else {
            u32::MAX
        };
        // Only holders above a fair share can be over it: a range of the holders' index.
        let mut over_share: Vec<SlaveId> = fair
            .iter()
            .flat_map(|(t, f)| self.holders.above(t, *f))
            .collect();
        if total_short {
            over_share.extend(self.holders.above_total(u64::from(fair_total)).cloned());
        }
        over_share.sort();
        over_share.dedup();
        let mut told = false;
        for other in over_share {
            let Some(s) = self.slaves.get_mut(&other) else {
                continue;
            };
            if other == *id || !s.connected || s.asked_to_return.is_some() {
                continue;
            }
            let mut over: BTreeMap<String, u32> = fair
                .iter()
                .filter(|(t, f)| s.blocks.get(*t).is_some_and(|b| b > f))
                .map(|(t, f)| (t.clone(), *f))
                .collect();
            let held: u64 = s.blocks.values().map(|&n| u64::from(n)).sum();
            if total_short && held > u64::from(fair_total) {
                for (t, &b) in &s.blocks {
                    let cap = (u64::from(b) * u64::from(fair_total) / held) as u32;
                    let cap = over.get(t).map_or(cap, |&c| c.min(cap));
                    if cap < b {
                        over.insert(t.clone(), cap);
                    }
                }
            }
            if over.is_empty() {
                continue;
            }
            s.asked_to_return = Some(now);
            told = true;
            out.effects.push(Effect::Control {
                slave: other.clone(),
                message: ControlMessage::ShrinkAllotment { blocks: over },
            });
        }
        if told {
            for agent_type in short {
                self.start_move(now, id, agent_type);
            }
        }
    }

    /// Nearly exhausted: fewer seats than [`ALLOT_MIN_BLOCK`] per slave that wants seats
    /// are not held (free or in anyone's block), in total or of `agent_type`. The slaves
    /// that want seats are those with a demand (they asked for a block in their last allot
    /// request, or hold one), and `id`, the one asking now. Blocks then stop growing and
    /// are given back whole, so the last seats go one by one to whoever asks. (Free seats
    /// that only sit in blocks while the pool is larger are shared out by fair shares
    /// instead.) A slave cut off counts while it holds a block (whose seats are in the
    /// pool too), not for what it last asked for. No pass over the slaves: the demand book
    /// counts them.
    fn nearly_exhausted(&self, id: &SlaveId, agent_type: &str) -> bool {
        // The seats of the type not held are never more than the total's (`unheld`).
        let unheld = self.unheld(Some(agent_type));
        let asking_too = self.slaves.get(id).is_none_or(|s| s.demand_total == 0);
        let wanting = self
            .demand
            .of(None)
            .map_or(0, |d| d.slaves())
            .saturating_add(u32::from(asking_too));
        unheld < ALLOT_MIN_BLOCK.saturating_mul(wanting)
    }

    /// How long a slave told to give seats back may take to send its allot request: it
    /// sends one at once when told, and one every refresh interval anyway, so one that
    /// stays silent for two has stopped (frozen, cut off) and its blocks wait for the
    /// reclaim timing rule.
    pub(super) fn return_wait(&self) -> Duration {
        self.cfg.allot.refresh.saturating_mul(2)
    }

    /// A registration decided strictly found no free seat (`reason`: the total limit, or
    /// `agent_type`'s) while seats counted against that limit sit free in connected
    /// slaves' blocks (the requester's own blocks of other types included). Their holders
    /// not told yet are told now to give seats back: every free seat when the pool is
    /// nearly exhausted (`ReturnAllotment`), else half of each such block
    /// (`ShrinkAllotment`), so that each round frees at least one seat per holder. While
    /// some holder was told within [`Engine::return_wait`], the registration waits rather
    /// than fails: the answer is how long until the slave asks again (no alert, no
    /// record). A holder told longer ago without answering no longer counts, and the
    /// refusal is final. Only a slave that takes allotments (it has sent an allot request,
    /// so its build knows the hint) waits; another's refusal is final, its holders told all
    /// the same. Seats in use are never taken back.
    pub(super) fn wait_for_blocks(
        &mut self,
        now: Instant,
        id: &SlaveId,
        reason: RejectReason,
        agent_type: &str,
        out: &mut Output,
    ) -> Option<Duration> {
        if self.cfg.allot.admission != Admission::Allotment {
            return None;
        }
        let hinted = self.slaves.get(id).is_some_and(|s| s.allot_seq > 0);
        let counts = |t: &str| match reason {
            RejectReason::AggregateLimit => true,
            RejectReason::TypeLimit => t == agent_type,
            _ => false,
        };
        if !matches!(
            reason,
            RejectReason::AggregateLimit | RejectReason::TypeLimit
        ) {
            return None;
        }
        let whole = self.nearly_exhausted(id, agent_type);
        let wait = self.return_wait();
        let (mut coming, mut stranded, mut told) = (false, false, false);
        // Only slaves with blocks can give seats back: the holders' index, no pass over
        // every slave.
        let slaves = &mut self.slaves;
        for holder in self.holders.above_total(0) {
            let Some(s) = slaves.get_mut(holder) else {
                continue;
            };
            if !s.connected {
                continue;
            }
            let part: BTreeMap<String, u32> = s
                .blocks
                .iter()
                .filter(|(t, n)| **n > 0 && counts(t))
                .map(|(t, n)| (t.clone(), n / 2))
                .collect();
            if part.is_empty() {
                continue;
            }
            match s.asked_to_return {
                Some(at) if now.saturating_duration_since(at) < wait => coming = true,
                Some(_) => stranded = true,
                None => {
                    s.asked_to_return = Some(now);
                    coming = true;
                    told = true;
                    let message = if whole {
                        ControlMessage::ReturnAllotment
                    } else {
                        ControlMessage::ShrinkAllotment { blocks: part }
                    };
                    out.effects.push(Effect::Control {
                        slave: holder.clone(),
                        message,
                    });
                }
            }
        }
        if told {
            self.start_move(now, id, agent_type);
        }
        if coming && hinted {
            self.allot_counts.waits += 1;
        } else if stranded {
            self.allot_counts.stranded_refusals += 1;
        }
        (coming && hinted).then(|| self.retry_after())
    }

    /// How long a registration waiting for seats given back waits between asks: a
    /// twentieth of the refresh interval, from 20 to 250 ms (a holder answers within a
    /// round trip and an append).
    fn retry_after(&self) -> Duration {
        (self.cfg.allot.refresh / 20).clamp(Duration::from_millis(20), Duration::from_millis(250))
    }

    fn block_of(&self, id: &SlaveId, agent_type: &str) -> u32 {
        self.slaves
            .get(id)
            .and_then(|s| s.blocks.get(agent_type).copied())
            .unwrap_or(0)
    }

    /// How many more seats (held or allotted) the slave may have under its license's local
    /// limit and `--max-agents-per-slave`.
    pub(super) fn local_room(&self, id: &SlaveId) -> u32 {
        let Some(s) = self.slaves.get(id) else {
            return 0;
        };
        let has = s.agents.len() as u32 + s.blocks.values().sum::<u32>();
        let mut room = u32::MAX;
        if let Some(local) = s.license.as_ref().and_then(|l| l.local_limit) {
            room = room.min(local.saturating_sub(has));
        }
        let cap = self.cfg.max_agents_per_slave;
        if cap > 0 {
            room = room.min(cap.saturating_sub(has));
        }
        room
    }

    /// An agent the slave admitted from its block: its seat moves into the seat table.
    fn seat_from_block(
        &mut self,
        id: &SlaveId,
        agent: &str,
        agent_type: &str,
    ) -> Result<(), (RejectReason, String)> {
        let s = &self.slaves[id];
        match s.agents.get(agent) {
            Some(held) if held == agent_type => return Ok(()),
            Some(held) => {
                return Err((
                    RejectReason::AgentTypeMismatch,
                    format!("it already holds a '{held}' seat on this slave"),
                ));
            }
            None => {}
        }
        if self.free_of_type(agent_type).is_none() {
            return Err((
                RejectReason::UnknownAgentType,
                format!("agent type '{agent_type}' is not in the master license"),
            ));
        }
        let block = self.block_of(id, agent_type);
        if block == 0 {
            return Err((
                RejectReason::NoAllotment,
                format!("the slave holds no allotted '{agent_type}' seat"),
            ));
        }
        self.set_block(id, agent_type, block - 1);
        let granted = self.granted_now(0);
        self.pending.push(SeatChange::FromBlock {
            slave: id.to_string(),
            agent_id: agent.to_owned(),
            agent_type: agent_type.to_owned(),
            at_ms: granted.since_ms,
            by: granted.by.clone(),
        });
        self.insert_seat(id, agent, agent_type, granted);
        Ok(())
    }

    /// Applies a replayed `Allotment` record.
    pub(super) fn apply_allotment(
        &mut self,
        id: &SlaveId,
        blocks: &BTreeMap<String, u32>,
        journal: u64,
        request: u64,
    ) -> bool {
        if !self.slaves.contains_key(id) {
            return false;
        }
        self.clear_blocks(id);
        for (agent_type, seats) in blocks {
            self.set_block(id, agent_type, *seats);
        }
        let s = self.slaves.get_mut(id).expect("checked above");
        s.journal = journal;
        s.allot_seq = request;
        true
    }

    /// Applies a replayed `ToBlock` record.
    pub(super) fn apply_to_block(&mut self, id: &SlaveId, agent: &str) {
        let held = self
            .slaves
            .get(id)
            .and_then(|s| s.agents.get(agent).cloned());
        if let Some(agent_type) = held {
            self.remove_seat(id, agent);
            let block = self.block_of(id, &agent_type);
            self.set_block(id, &agent_type, block + 1);
        }
    }

    /// Applies a replayed `FromBlock` record.
    pub(super) fn apply_from_block(
        &mut self,
        id: &SlaveId,
        agent: &str,
        agent_type: &str,
        granted: Granted,
    ) -> bool {
        if !self.slaves.contains_key(id) {
            return false;
        }
        let block = self.block_of(id, agent_type);
        self.set_block(id, agent_type, block.saturating_sub(1));
        self.insert_seat(id, agent, agent_type, granted)
    }

    /// Free seats allotted to slaves, per agent type.
    pub fn allotted_by_type(&self) -> &BTreeMap<String, u32> {
        &self.allotted_by_type
    }

    pub fn allotted_total(&self) -> u32 {
        self.allotted_total
    }

    /// Allotment mode: the `most` (slave, agent type) pairs with the most seats, used plus
    /// free in the slave's block, over every slave in the table (connected or not), and how
    /// many pairs with a seat were left out; pairs with no seat are not listed. `None` in
    /// strict mode. The bound is on pairs, not slaves, so the series it makes stay at most
    /// `2 × most` however many types a slave uses.
    pub fn top_slave_seats(&self, most: usize) -> Option<TopSlaveSeats> {
        if self.cfg.allot.admission != Admission::Allotment {
            return None;
        }
        /// A pair before the cut, borrowed: only the pairs kept are copied out.
        struct Pair<'a> {
            seats: u64,
            slave: &'a SlaveId,
            agent_type: &'a str,
            used: u32,
            free: u32,
        }
        let mut pairs: Vec<Pair<'_>> = Vec::new();
        for (id, s) in &self.slaves {
            let mut by_type: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
            for agent_type in s.agents.values() {
                by_type.entry(agent_type).or_default().0 += 1;
            }
            for (agent_type, n) in &s.blocks {
                by_type.entry(agent_type).or_default().1 = *n;
            }
            for (agent_type, (used, free)) in by_type {
                if used > 0 || free > 0 {
                    pairs.push(Pair {
                        seats: u64::from(used) + u64::from(free),
                        slave: id,
                        agent_type,
                        used,
                        free,
                    });
                }
            }
        }
        let order = |a: &Pair<'_>, b: &Pair<'_>| {
            b.seats
                .cmp(&a.seats)
                .then_with(|| a.slave.as_str().cmp(b.slave.as_str()))
                .then_with(|| a.agent_type.cmp(b.agent_type))
        };
        let omitted = pairs.len().saturating_sub(most);
        if omitted > 0 {
            // Only the first `most` in order are sorted: 10,000 slaves stay cheap per tick.
            // `omitted > 0`: more than `most` pairs, so `most - 1` is an index.
            if most > 0 {
                pairs.select_nth_unstable_by(most - 1, order);
            }
            pairs.truncate(most);
        }
        pairs.sort_unstable_by(order);
        let pairs = pairs
            .into_iter()
            .map(|p| SlaveSeats {
                slave: p.slave.to_string(),
                agent_type: p.agent_type.to_owned(),
                used: p.used,
                free: p.free,
            })
            .collect();
        Some(TopSlaveSeats {
            pairs,
            omitted: omitted as u64,
        })
    }

    /// What allotment mode did while this engine decided (see [`AllotCounts`]).
    pub fn allot_counts(&self) -> AllotCounts {
        self.allot_counts
    }
}

/// A slave's demand for free seats of `agent_type`: what it last asked for, or the block it
/// holds if more.
fn demand(s: &super::Slave, agent_type: &str) -> u64 {
    let want = s.wants.get(agent_type).copied().unwrap_or(0);
    let block = s.blocks.get(agent_type).copied().unwrap_or(0);
    u64::from(want.max(block))
}

/// A slave's demand for free seats of all types.
fn total_demand(s: &super::Slave) -> u64 {
    let mut types: Vec<&String> = s.blocks.keys().chain(s.wants.keys()).collect();
    types.sort();
    types.dedup();
    types.into_iter().map(|t| demand(s, t)).sum()
}

/// The free seats a slave's blocks hold, of all types.
fn held(s: &super::Slave) -> u64 {
    s.blocks.values().map(|n| u64::from(*n)).sum()
}
