//! The ledger side: applying a leader's recorded change (`apply`), writing the state as
//! changes that rebuild it (`snapshot`), and what a new leader resets.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lmbus_schemas::{SeatChange, SlaveId, verify_license};

use super::guards::ReplayWindow;
use super::{Engine, Granted, Slave, SlaveLicense};

impl Engine {
    /// Applies one ledger record written by a leader (possibly another replica), the way
    /// that leader's engine changed its own state. Limits are not checked again: the
    /// ledger is the truth. A standby does this for every record to stay hot; a new leader
    /// does it up to the end of the ledger before it answers anyone.
    ///
    /// `Err` names a record that does not fit the state (a grant for a slave with no
    /// session, a record from a newer build); the caller must stop replaying.
    pub fn apply(&mut self, now: Instant, change: &SeatChange) -> Result<(), ReplayError> {
        let slave_id = |s: &str| {
            SlaveId::new(s.to_owned()).map_err(|e| ReplayError::BadSlaveId(e.to_string()))
        };
        match change {
            SeatChange::Session {
                slave,
                instance,
                license,
                local_limit,
                heartbeat_interval_ms,
                grace_ms,
                logout_after_grace,
                hello_seq,
                request_seq,
                offline_limit,
            } => {
                let id = slave_id(slave)?;
                let rate = self.cfg.slave_rate_limit;
                let entry = self.slaves.entry(id).or_insert_with(|| {
                    let interval = Duration::from_millis(*heartbeat_interval_ms);
                    Slave::new(*instance, now, interval, Duration::ZERO, rate)
                });
                if entry.instance != *instance {
                    entry.requests = ReplayWindow::default();
                    entry.released.clear();
                }
                entry.requests.restore(*request_seq);
                entry.instance = *instance;
                entry.license = license.map(|id| SlaveLicense {
                    id,
                    local_limit: *local_limit,
                    offline_limit: *offline_limit,
                });
                entry.connected = true;
                entry.last_seen = now;
                entry.heartbeat_interval = Duration::from_millis(*heartbeat_interval_ms);
                entry.grace = Duration::from_millis(*grace_ms);
                entry.logout_after_grace = *logout_after_grace;
                entry.hello_seq = *hello_seq;
                entry.reclaimed = false;
                entry.revoked.clear();
            }
            SeatChange::Grant {
                slave,
                agent_id,
                agent_type,
                request_seq,
                at_ms,
                by,
            } => {
                let id = slave_id(slave)?;
                self.wall_passed(*at_ms, now);
                let granted = Granted {
                    request_seq: *request_seq,
                    since_ms: *at_ms,
                    by: by.clone(),
                };
                if !self.insert_seat(&id, agent_id, agent_type, granted) {
                    return Err(ReplayError::NoSession {
                        slave: slave.clone(),
                        what: format!("grant of {agent_id}"),
                    });
                }
                if let Some(s) = self.slaves.get_mut(&id) {
                    s.requests.restore(*request_seq);
                }
            }
            SeatChange::Seats {
                slave,
                agent_type,
                agent_ids,
                request_seqs,
                since_ms,
                granted_by,
            } => {
                let id = slave_id(slave)?;
                if let Some(latest) = since_ms.iter().max() {
                    self.wall_passed(*latest, now);
                }
                for (i, agent_id) in agent_ids.iter().enumerate() {
                    let granted = Granted {
                        request_seq: request_seqs.get(i).copied().unwrap_or(0),
                        since_ms: since_ms.get(i).copied().unwrap_or(0),
                        by: granted_by.get(i).cloned().unwrap_or_default(),
                    };
                    if !self.insert_seat(&id, agent_id, agent_type, granted) {
                        return Err(ReplayError::NoSession {
                            slave: slave.clone(),
                            what: "seats".to_owned(),
                        });
                    }
                }
            }
            SeatChange::Release { slave, agent_id } => {
                self.remove_seat(&slave_id(slave)?, agent_id);
            }
            SeatChange::Confirm {
                slave,
                agent_id,
                request_seq,
            } => {
                let id = slave_id(slave)?;
                if let Some(s) = self.slaves.get_mut(&id) {
                    if let Some(granted) = s.granted.get_mut(agent_id.as_str()) {
                        granted.request_seq = granted.request_seq.max(*request_seq);
                    }
                    s.requests.restore(*request_seq);
                }
            }
            SeatChange::Reclaim { slave } => {
                let id = slave_id(slave)?;
                self.clear_blocks(&id);
                let drained: Vec<String> = match self.slaves.get_mut(&id) {
                    Some(s) => {
                        s.connected = false;
                        s.reclaimed = true;
                        s.take_seats().into_iter().map(|(_, t)| t).collect()
                    }
                    None => Vec::new(),
                };
                for agent_type in &drained {
                    self.uncount(agent_type);
                }
            }
            SeatChange::Revoke { slave, agents } => {
                let id = slave_id(slave)?;
                for agent in agents {
                    self.remove_seat(&id, agent);
                }
                if let Some(s) = self.slaves.get_mut(&id) {
                    s.revoked.extend(agents.iter().cloned());
                }
            }
            SeatChange::License { text } => {
                let license = verify_license(
                    text,
                    "the master license in the ledger",
                    &self.cfg.vendor_key,
                )
                .map_err(|e| ReplayError::License(e.to_string()))?;
                if license.context != self.cfg.license.context {
                    return Err(ReplayError::Context {
                        ledger: license.context,
                        mine: self.cfg.license.context,
                    });
                }
                self.cfg.license = license;
                self.license_text = Some(text.clone());
            }
            SeatChange::Allotment {
                slave,
                blocks,
                journal,
                request,
            } => {
                let id = slave_id(slave)?;
                if !self.apply_allotment(&id, blocks, *journal, *request) {
                    return Err(ReplayError::NoSession {
                        slave: slave.clone(),
                        what: "allotment".to_owned(),
                    });
                }
            }
            SeatChange::FromBlock {
                slave,
                agent_id,
                agent_type,
                at_ms,
                by,
            } => {
                let id = slave_id(slave)?;
                self.wall_passed(*at_ms, now);
                let granted = Granted {
                    request_seq: 0,
                    since_ms: *at_ms,
                    by: by.clone(),
                };
                if !self.apply_from_block(&id, agent_id, agent_type, granted) {
                    return Err(ReplayError::NoSession {
                        slave: slave.clone(),
                        what: format!("seat from the block for {agent_id}"),
                    });
                }
            }
            SeatChange::ToBlock { slave, agent_id } => {
                self.apply_to_block(&slave_id(slave)?, agent_id);
            }
            SeatChange::Forget { slave } => {
                self.remove_slave(&slave_id(slave)?);
            }
            SeatChange::Leader {
                context: Some(context),
                ..
            } if *context != self.cfg.license.context => {
                return Err(ReplayError::Context {
                    ledger: *context,
                    mine: self.cfg.license.context,
                });
            }
            SeatChange::Leader { .. } => {}
            SeatChange::Clock { at_ms, reset } => self.apply_clock(*at_ms, *reset, now),
            SeatChange::Synced { at_ms, sync } => {
                self.wall_passed(*at_ms, now);
                self.apply_synced(*at_ms, *sync);
            }
            SeatChange::SyncExported { sync } => self.apply_sync_exported(*sync),
            SeatChange::Installation { id, key } => self.apply_installation(*id, key.as_ref()),
            SeatChange::SyncWarned { deadline_ms, days } => {
                self.apply_sync_warned(*deadline_ms, *days);
            }
            SeatChange::Unknown => {
                return Err(ReplayError::Unknown);
            }
        }
        Ok(())
    }

    /// The seat state as changes that rebuild it when applied in order to an empty engine
    /// (what a snapshot stores): the reloaded license, the last vendor sync and offline-limit
    /// warning (`Synced`, `SyncWarned`), then per slave its `Session`, a `Reclaim` if its seats were
    /// reclaimed, `Revoke`s of the agents an operator released that it may not claim back,
    /// its `Allotment` (blocks and journal position) if it has one, and its seats as `Seats` changes, at most `per_change` agents per change. Connection
    /// state and silence clocks are not included: like a replay, they start fresh.
    pub fn snapshot(&self, per_change: usize) -> Vec<SeatChange> {
        let per_change = per_change.max(1);
        let mut changes = Vec::with_capacity(self.slaves.len() * 2);
        if let Some(text) = &self.license_text {
            changes.push(SeatChange::License { text: text.clone() });
        }
        changes.extend(self.sync_snapshot());
        for (id, s) in &self.slaves {
            let slave = id.to_string();
            changes.push(SeatChange::Session {
                slave: slave.clone(),
                instance: s.instance,
                license: s.license.as_ref().map(|l| l.id),
                local_limit: s.license.as_ref().and_then(|l| l.local_limit),
                offline_limit: s.license.as_ref().and_then(|l| l.offline_limit),
                heartbeat_interval_ms: s.heartbeat_interval.as_millis() as u64,
                grace_ms: s.grace.as_millis() as u64,
                logout_after_grace: s.logout_after_grace,
                hello_seq: s.hello_seq,
                request_seq: s.requests.highest,
            });
            if s.reclaimed {
                changes.push(SeatChange::Reclaim {
                    slave: slave.clone(),
                });
            }
            // Revoked agents hold no seat (a new grant takes an agent out of the set).
            let revoked: Vec<String> = s.revoked.iter().cloned().collect();
            for part in revoked.chunks(per_change) {
                changes.push(SeatChange::Revoke {
                    slave: slave.clone(),
                    agents: part.to_vec(),
                });
            }
            let mut by_type: BTreeMap<&str, Vec<(&String, Granted)>> = BTreeMap::new();
            for (agent, agent_type) in &s.agents {
                let granted = s.granted.get(agent).cloned().unwrap_or_default();
                by_type
                    .entry(agent_type.as_str())
                    .or_default()
                    .push((agent, granted));
            }
            if !s.blocks.is_empty() || s.journal > 0 || s.allot_seq > 0 {
                changes.push(SeatChange::Allotment {
                    slave: slave.clone(),
                    blocks: s.blocks.clone(),
                    journal: s.journal,
                    request: s.allot_seq,
                });
            }
            // In agent id order already (`agents` is ordered).
            for (agent_type, agents) in by_type {
                for part in agents.chunks(per_change) {
                    changes.push(SeatChange::Seats {
                        slave: slave.clone(),
                        agent_type: agent_type.to_owned(),
                        agent_ids: part.iter().map(|(a, _)| (*a).clone()).collect(),
                        request_seqs: part.iter().map(|(_, g)| g.request_seq).collect(),
                        since_ms: part.iter().map(|(_, g)| g.since_ms).collect(),
                        granted_by: part.iter().map(|(_, g)| g.by.clone()).collect(),
                    });
                }
            }
        }
        // Last, so that the seats' grant times (possibly stamped by a clock that ran ahead
        // before a sync healed it) do not outlast what this replica knows.
        if let Some((at_ms, _)) = self.wall_floor {
            changes.push(SeatChange::Clock { at_ms, reset: true });
        }
        changes
    }

    /// Called when this replica becomes leader: every slave's silence is counted from now,
    /// since a standby saw no heartbeats. This only delays disconnect alerts and reclaims,
    /// never brings them forward, so the timing rule still holds. No capacity move of an
    /// earlier term is timed on (`moves`): only the tells this term sends start clocks.
    pub fn restart_silence_clocks(&mut self, now: Instant) {
        self.clear_moves();
        // The next counts alert claims no peaks: this term's window starts with it.
        self.peaks = None;
        for slave in self.slaves.values_mut() {
            slave.last_seen = now;
            slave.heard = false;
            // What a replay of the ledger gives: a slave with a session is connected until
            // its seats are reclaimed. A replica that led before (and marked slaves
            // disconnected on its own clock, perhaps while it was paused) starts its new
            // term from that, not from what it believed then.
            slave.connected = !slave.reclaimed;
            // Leader-only memory from an earlier term of this replica is stale: a new
            // leader starts without it (the slave's next requests teach it again).
            slave.released.clear();
            slave.wants.clear();
        }
        self.recount_demand();
    }

    /// Called when the leader reads slave messages again after the ledger stalled: it heard
    /// nobody meanwhile, so a connected slave's silence counts from now. Like
    /// [`Self::restart_silence_clocks`] this only delays disconnects and reclaims.
    pub fn deaf_until(&mut self, now: Instant) {
        for slave in self.slaves.values_mut().filter(|s| s.connected) {
            slave.last_seen = slave.last_seen.max(now);
        }
    }
}

/// A ledger change that does not fit the replayed state: replaying must stop there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("{what} for slave {slave}, which has no session")]
    NoSession { slave: String, what: String },
    #[error("a slave id the protocol does not allow: {0}")]
    BadSlaveId(String),
    #[error("the master license in the ledger does not verify: {0}")]
    License(String),
    /// The ledger is another context's: one cluster name serves one context.
    #[error(
        "this cluster's ledger is in context '{ledger}' but this replica's master license is for '{mine}': a cluster runs one context; start this replica with the cluster's {ledger} license, or give it another --cluster"
    )]
    Context {
        ledger: lmbus_schemas::Context,
        mine: lmbus_schemas::Context,
    },
    #[error(
        "a ledger record this build does not know (written by a newer broker): upgrade this replica"
    )]
    Unknown,
}
