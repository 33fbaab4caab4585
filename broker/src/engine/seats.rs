//! Seats: the limits a grant must fit, granting and releasing with their counters, and a
//! slave's registrations and unregistrations (alone or in a batch).

use std::time::Instant;

use lmbus_schemas::{
    AgentClaim, Alert, AlertKind, BatchRequest, Decision, RegisterRequest, RejectReason, Reply,
    SeatChange, Severity, SlaveId, UnregisterRequest, agent_hash,
};

use super::guards::{RATE_LIMIT_ALERT_EVERY, validate_agent};
use super::{Answer, Engine, Event, Granted, Output, Slave};

/// How many of the seats a rejection calls in use are free seats allotted to slaves.
fn allotted_note(allotted: u32) -> String {
    if allotted == 0 {
        String::new()
    } else {
        format!(" ({allotted} of them allotted to slaves, free there)")
    }
}

impl Engine {
    /// Checks the limits for one more seat of `agent_type` on `slave`. The slave must be
    /// in the table.
    fn check_admit(&self, slave: &Slave, agent_type: &str) -> Result<(), (RejectReason, String)> {
        let limits = &self.cfg.license.limits;
        if !limits.agent_types.is_empty() && !limits.agent_types.contains_key(agent_type) {
            let known: Vec<&str> = limits.agent_types.keys().map(String::as_str).collect();
            return Err((
                RejectReason::UnknownAgentType,
                format!(
                    "agent type '{agent_type}' is not in the master license (known: {})",
                    known.join(", ")
                ),
            ));
        }
        // Seats allotted to the slave count as its own (allotment mode).
        let has =
            slave.agents.len() as u64 + slave.blocks.values().map(|&n| u64::from(n)).sum::<u64>();
        if let Some(local) = slave.license.as_ref().and_then(|l| l.local_limit) {
            if has >= u64::from(local) {
                return Err((
                    RejectReason::LocalLimit,
                    format!("the slave's license allows {local} agents and all are in use"),
                ));
            }
        }
        let cap = self.cfg.max_agents_per_slave;
        if cap > 0 && has >= u64::from(cap) {
            return Err((
                RejectReason::SlaveLimit,
                format!(
                    "the master allows one slave {cap} agents (--max-agents-per-slave) and all are in use"
                ),
            ));
        }
        let total = self.total_limit();
        if self.total_in_use.saturating_add(self.allotted_total) >= total {
            return Err((
                RejectReason::AggregateLimit,
                format!(
                    "all {total} seats of the master license are in use{}",
                    allotted_note(self.allotted_total)
                ),
            ));
        }
        if let Some(&type_limit) = limits.agent_types.get(agent_type) {
            let used = self.in_use_by_type.get(agent_type).copied().unwrap_or(0)
                + self.allotted_by_type.get(agent_type).copied().unwrap_or(0);
            if used >= type_limit {
                return Err((
                    RejectReason::TypeLimit,
                    format!(
                        "all {type_limit} '{agent_type}' seats are in use{}",
                        allotted_note(self.allotted_by_type.get(agent_type).copied().unwrap_or(0))
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Grants a seat, or reports that the agent already holds it. `Ok(true)` when it was
    /// already held.
    pub(super) fn try_grant(
        &mut self,
        id: &SlaveId,
        agent: &str,
        agent_type: &str,
        request_seq: u64,
    ) -> Result<bool, (RejectReason, String)> {
        let Some(slave) = self.slaves.get(id) else {
            return Err((
                RejectReason::SlaveNotConnected,
                "the master has no session with this slave: say hello first".to_owned(),
            ));
        };
        match slave.agents.get(agent) {
            Some(held) if held == agent_type => {
                self.confirm(id, agent, request_seq);
                return Ok(true);
            }
            Some(held) => {
                return Err((
                    RejectReason::AgentTypeMismatch,
                    format!(
                        "agent '{agent}' already holds a '{held}' seat on this slave: unregister it first"
                    ),
                ));
            }
            None => {}
        }
        // Past the offline limit first: no capacity refusal with a retry hint then.
        self.check_backup_may_serve()?;
        self.check_sync()?;
        self.check_slave_sync(slave)?;
        self.check_admit(slave, agent_type)?;
        let granted = self.granted_now(request_seq);
        self.pending.push(SeatChange::Grant {
            slave: id.to_string(),
            agent_id: agent.to_owned(),
            agent_type: agent_type.to_owned(),
            request_seq,
            at_ms: granted.since_ms,
            by: granted.by.clone(),
        });
        self.insert_seat(id, agent, agent_type, granted);
        Ok(false)
    }

    /// A registration numbered `request_seq` found `agent`'s seat already held: the seat
    /// counts as granted by it from now on (recorded, so every replica agrees), or a hello
    /// built before the request, which cannot list the agent, would release the seat the
    /// approval is about to give the host. Nothing when the seat already counts from that
    /// request or a later one (a hello's re-grant is 0).
    fn confirm(&mut self, id: &SlaveId, agent: &str, request_seq: u64) {
        let Some(granted) = self
            .slaves
            .get_mut(id)
            .and_then(|s| s.granted.get_mut(agent))
        else {
            return;
        };
        if request_seq <= granted.request_seq {
            return;
        }
        granted.request_seq = request_seq;
        self.pending.push(SeatChange::Confirm {
            slave: id.to_string(),
            agent_id: agent.to_owned(),
            request_seq,
        });
    }

    pub(super) fn release(&mut self, id: &SlaveId, agent: &str) -> bool {
        let removed = self.remove_seat(id, agent);
        if removed {
            self.pending.push(SeatChange::Release {
                slave: id.to_string(),
                agent_id: agent.to_owned(),
            });
        }
        removed
    }

    /// Puts a seat in the table and the counters, without checks or records.
    pub(super) fn insert_seat(
        &mut self,
        id: &SlaveId,
        agent: &str,
        agent_type: &str,
        granted: Granted,
    ) -> bool {
        let Some(slave) = self.slaves.get_mut(id) else {
            return false;
        };
        // Granted again since an operator released it: the slave holds it rightly now.
        slave.revoked.remove(agent);
        slave.granted.insert(agent.to_owned(), granted);
        slave.digest ^= agent_hash(agent, agent_type);
        if let Some(old) = slave.agents.insert(agent.to_owned(), agent_type.to_owned()) {
            // Already held (only possible in a replay): keep the counts exact.
            slave.digest ^= agent_hash(agent, &old);
            self.uncount(&old);
        }
        self.total_in_use += 1;
        let of_type = self
            .in_use_by_type
            .entry(agent_type.to_owned())
            .or_insert(0);
        *of_type += 1;
        if let Some((_, peaks)) = &mut self.peaks {
            for (key, n) in [("total", self.total_in_use), (agent_type, *of_type)] {
                let peak = peaks.entry(key.to_owned()).or_insert(0);
                *peak = (*peak).max(n);
            }
        }
        true
    }

    /// Takes a seat out of the table and the counters, without records.
    pub(super) fn remove_seat(&mut self, id: &SlaveId, agent: &str) -> bool {
        let removed = self.slaves.get_mut(id).and_then(|s| {
            let agent_type = s.agents.remove(agent)?;
            s.granted.remove(agent);
            s.digest ^= agent_hash(agent, &agent_type);
            Some(agent_type)
        });
        match removed {
            Some(agent_type) => {
                self.uncount(&agent_type);
                true
            }
            None => false,
        }
    }

    pub(super) fn uncount(&mut self, agent_type: &str) {
        self.total_in_use = self.total_in_use.saturating_sub(1);
        if let Some(n) = self.in_use_by_type.get_mut(agent_type) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_use_by_type.remove(agent_type);
            }
        }
    }

    pub(super) fn rejection_alert(
        &self,
        slave: &SlaveId,
        claim: &AgentClaim,
        reason: RejectReason,
        detail: &str,
    ) -> Alert {
        self.alert(
            Severity::Warning,
            AlertKind::RegistrationRejected,
            format!(
                "agent {} ({}) on slave {slave} rejected: {reason}: {detail}",
                claim.agent_id, claim.agent_type
            ),
        )
        .slave(slave.as_str())
        .agent(&claim.agent_id, &claim.agent_type)
        .reason(reason)
        .counts(self.counts())
    }

    pub(super) fn register(
        &mut self,
        now: Instant,
        id: SlaveId,
        request: RegisterRequest,
    ) -> Output {
        if let Some(problem) = validate_agent(&request.agent_id, Some(&request.agent_type)) {
            return self.invalid_request(&id, "register", problem);
        }
        let claim = AgentClaim {
            agent_id: request.agent_id,
            agent_type: request.agent_type,
        };
        let rate = self.cfg.slave_rate_limit;
        let mut limited = None;
        let mut replayed = None;
        let connected = match self.slaves.get_mut(&id) {
            Some(slave) if slave.connected => {
                slave.last_seen = now;
                slave.heard = true;
                if !slave.requests.accept(request.seq) {
                    // A retry of a request that was granted finds its seat: same answer.
                    // Anything else with a used number is a replay.
                    replayed = Some(slave.agents.get(&claim.agent_id) == Some(&claim.agent_type));
                } else if rate > 0 && !slave.bucket.take(now, rate) {
                    let b = &mut slave.bucket;
                    b.unreported += 1;
                    let due = b.reported_at.is_none_or(|at| {
                        now.saturating_duration_since(at) >= RATE_LIMIT_ALERT_EVERY
                    });
                    if due {
                        b.reported_at = Some(now);
                        limited = Some(std::mem::take(&mut b.unreported));
                    } else {
                        limited = Some(0);
                    }
                }
                true
            }
            _ => false,
        };
        match replayed {
            Some(true) => {
                return Output::reply(Reply::Decision(Decision::Approved { already_held: true }));
            }
            Some(false) => {
                let detail = format!(
                    "request number {} of slave {id} was already processed or is too old: a replayed request",
                    request.seq
                );
                let mut out = Output::reply(Reply::Decision(Decision::Rejected {
                    reason: RejectReason::Replayed,
                    detail: detail.clone(),
                    retry_after_ms: None,
                }));
                let alert = self.rejection_alert(&id, &claim, RejectReason::Replayed, &detail);
                if let Some(alert) = self.quietly(now, &id, "replayed request", alert) {
                    out.alert(alert);
                }
                return out;
            }
            None => {}
        }
        if let Some(unreported) = limited {
            // Cheap and quiet: no ledger change, and at most one alert per slave every
            // RATE_LIMIT_ALERT_EVERY, however hard it floods.
            let detail = format!(
                "slave {id} sends more than {rate} registrations per second (--slave-rate-limit)"
            );
            let mut out = Output::reply(Reply::Decision(Decision::Rejected {
                reason: RejectReason::RateLimited,
                detail: detail.clone(),
                retry_after_ms: None,
            }));
            if unreported > 0 {
                out.alert(
                    self.alert(
                        Severity::Warning,
                        AlertKind::RegistrationRejected,
                        format!(
                            "{detail}: {unreported} registrations rejected since the last such alert"
                        ),
                    )
                    .slave(id.as_str())
                    .reason(RejectReason::RateLimited),
                );
            }
            return out;
        }
        let result = if connected {
            self.try_grant(&id, &claim.agent_id, &claim.agent_type, request.seq)
        } else {
            Err((
                RejectReason::SlaveNotConnected,
                "the master has no live session with this slave: say hello first".to_owned(),
            ))
        };
        match result {
            Ok(already_held) => {
                if !already_held {
                    self.stop_move(now, &id, &claim.agent_type);
                }
                Output::reply(Reply::Decision(Decision::Approved { already_held }))
            }
            Err((reason, detail)) => {
                let mut out = Output::default();
                // Allotment mode: seats free in blocks whose holders give them back soon
                // make this a wait, not a refusal (no alert: the slave asks again).
                if let Some(retry) =
                    self.wait_for_blocks(now, &id, reason, &claim.agent_type, &mut out)
                {
                    out.reply = Some(Answer::Slave(Reply::Decision(Decision::Rejected {
                        reason,
                        detail: format!(
                            "{detail}; free seats of slaves' blocks are being given back"
                        ),
                        retry_after_ms: Some(retry.as_millis() as u64),
                    })));
                    return out;
                }
                out.reply = Some(Answer::Slave(Reply::Decision(Decision::Rejected {
                    reason,
                    detail: detail.clone(),
                    retry_after_ms: None,
                })));
                let alert = self.rejection_alert(&id, &claim, reason, &detail);
                // Without a session a slave says hello and asks again: repeats are noise.
                // In allotment mode a storm of capacity rejections (the blocks are empty and
                // the pool is too) is told per slave and reason every 10 s, with the exact
                // count, rather than one alert per agent.
                let storm = self.cfg.allot.admission == lmbus_schemas::Admission::Allotment
                    && matches!(
                        reason,
                        RejectReason::AggregateLimit
                            | RejectReason::TypeLimit
                            | RejectReason::LocalLimit
                            | RejectReason::SlaveLimit
                    );
                let alert = if reason == RejectReason::SlaveNotConnected {
                    self.quietly(now, &id, "no session", alert)
                } else if storm || reason == RejectReason::SyncOverdue {
                    // Past the offline limit every registration is refused until a sync:
                    // one alert per slave every 10 s with the count (the `sync_due` alert
                    // said why).
                    self.quietly(now, &id, reason.token(), alert)
                } else {
                    Some(alert)
                };
                if let Some(alert) = alert {
                    out.alert(alert);
                }
                out
            }
        }
    }

    pub(super) fn unregister(
        &mut self,
        now: Instant,
        id: &SlaveId,
        request: UnregisterRequest,
    ) -> Output {
        if let Some(problem) = validate_agent(&request.agent_id, None) {
            return self.invalid_request(id, "unregister", problem);
        }
        let (held_type, fresh) = match self.slaves.get_mut(id) {
            Some(s) => {
                s.last_seen = now;
                (
                    s.agents.get(&request.agent_id).cloned(),
                    s.requests.accept(request.seq),
                )
            }
            None => (None, true),
        };
        // Releasing is always safe, so it is honoured even from a slave marked
        // disconnected; releasing an agent that holds no seat is a no-op. A used number
        // releases nothing: a retry finds the seat already gone, and a replay must not
        // take away a seat the agent has taken again since.
        match held_type {
            Some(agent_type) if !fresh => {
                let claim = AgentClaim {
                    agent_id: request.agent_id.clone(),
                    agent_type,
                };
                let detail = format!(
                    "unregister number {} of slave {id} was already processed or is too old: a replayed request; the seat is kept",
                    request.seq
                );
                let mut out = Output::reply(Reply::Ack);
                let alert = self.rejection_alert(id, &claim, RejectReason::Replayed, &detail);
                if let Some(alert) = self.quietly(now, id, "replayed request", alert) {
                    out.alert(alert);
                }
                return out;
            }
            Some(_) => {
                self.release(id, &request.agent_id);
                if let Some(s) = self.slaves.get_mut(id) {
                    s.remember_release(&request.agent_id, request.seq);
                }
            }
            None => {}
        }
        Output::reply(Reply::Ack)
    }

    /// One output for a batch: its reply is `Reply::Batch` with the items' replies, its
    /// effects and changes are theirs in order (the changes gather in `pending`).
    pub(super) fn batch(&mut self, now: Instant, slave: &SlaveId, batch: BatchRequest) -> Output {
        let mut out = Output::default();
        let mut replies = Vec::with_capacity(batch.items.len());
        for item in batch.items {
            let one = self.dispatch(now, Event::of_batch_item(slave, item));
            // Every registration and unregistration has a reply; `Ack` keeps the count
            // right should one ever not.
            replies.push(match one.reply {
                Some(Answer::Slave(reply)) => reply,
                _ => Reply::Ack,
            });
            out.effects.extend(one.effects);
        }
        out.reply = Some(Answer::Slave(Reply::Batch(replies)));
        out
    }
}
