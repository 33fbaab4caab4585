//! Views of the state: the License Monitor status and the seat table.

use std::collections::BTreeMap;
use std::time::Instant;

use lmbus_schemas::{AgentClaim, HeldSeat, LicenseSummary, SlaveId, SlaveStatus, StatusReply};

use super::Engine;

impl Engine {
    /// Seats per slave (agent id → type), for comparing replicas in tests and checks.
    pub fn seats(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.slaves
            .iter()
            .map(|(id, s)| {
                (
                    id.to_string(),
                    s.agents
                        .iter()
                        .map(|(a, t)| (a.clone(), t.clone()))
                        .collect(),
                )
            })
            .collect()
    }

    /// The License Monitor view of the current state.
    pub fn status(&self, now: Instant) -> StatusReply {
        let license = &self.cfg.license;
        let (slaves_connected, slaves_total) = self.slave_counts();
        // Disconnected slaves first (what an operator looks for), then by id; at most
        // STATUS_MAX_SLAVES.
        let listed = self
            .slaves
            .iter()
            .filter(|(_, s)| !s.connected)
            .chain(self.slaves.iter().filter(|(_, s)| s.connected))
            .take(lmbus_schemas::STATUS_MAX_SLAVES);
        StatusReply {
            slaves_total,
            slaves_connected,
            broker_id: self.cfg.broker_id.clone(),
            cluster: self.cfg.cluster.clone(),
            license: LicenseSummary {
                id: license.id,
                customer: license.customer.clone(),
                context: license.context.to_string(),
                expires: license.expires.to_string(),
                maintenance_expires: license.maintenance_expires.to_string(),
                not_for_production: license.context.not_for_production(),
                sync: self.sync_status(),
            },
            allow_unlicensed_slaves: self.cfg.allow_unlicensed_slaves,
            total_limit: self.total_limit(),
            type_limits: license.limits.agent_types.clone(),
            total_in_use: self.total_in_use,
            in_use_by_type: self.in_use_by_type.clone(),
            slaves: listed
                .map(|(id, s)| SlaveStatus {
                    slave_id: id.to_string(),
                    connected: s.connected,
                    license: s.license.as_ref().map(|l| l.id),
                    local_limit: s.license.as_ref().and_then(|l| l.local_limit),
                    in_use: s.agents.len() as u32,
                    in_use_by_type: s.by_type(),
                    last_seen_ms_ago: now.saturating_duration_since(s.last_seen).as_millis() as u64,
                    master: s.master,
                    allotted: s.blocks.clone(),
                    grace_ms: Some(s.grace.as_millis() as u64),
                    logout_after_grace: s.logout_after_grace,
                    reclaimed: s.reclaimed,
                })
                .collect(),
            leader_term: 0,
            ledger_sequence: 0,
            replicas: Vec::new(),
            admission: self.cfg.allot.admission,
            allotted_by_type: self.allotted_by_type.clone(),
            allotted_total: self.allotted_total,
            agents: Vec::new(),
            seats: Vec::new(),
        }
    }

    /// The agents holding a seat on `slave`, by agent id, bounded in count and bytes
    /// (`bounded_agent_list`; the monitor's agent list); none for an unknown slave or an
    /// invalid id.
    pub fn agents_of(&self, slave: &str) -> Vec<AgentClaim> {
        let Some(s) = SlaveId::new(slave).ok().and_then(|id| self.slaves.get(&id)) else {
            return Vec::new();
        };
        lmbus_schemas::bounded_agent_list(&s.agents)
    }

    /// The seats `slave` holds, by agent id, with when and by which replica each was
    /// granted (`admin seats`), bounded like `agents_of`; none for an unknown slave.
    pub fn seats_of(&self, slave: &str) -> Vec<HeldSeat> {
        let Some(s) = SlaveId::new(slave).ok().and_then(|id| self.slaves.get(&id)) else {
            return Vec::new();
        };
        lmbus_schemas::bounded_seat_list(s.agents.iter().map(|(agent, agent_type)| {
            let granted = s.granted.get(agent);
            HeldSeat {
                agent_id: agent.clone(),
                agent_type: agent_type.clone(),
                since_ms: granted.map_or(0, |g| g.since_ms),
                granted_by: granted.map(|g| g.by.clone()).unwrap_or_default(),
            }
        }))
    }
}
