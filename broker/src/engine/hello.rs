//! A slave's hello: admitting the slave (its license, the one-live-slave rule, the
//! stale-hello guard and the timing rule) and reconciling the seats it claims with the
//! master's.

use lmbus_schemas::human::{duration, plural};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lmbus_schemas::{
    AgentClaim, AlertKind, Context, Hello, OfflineLimit, RejectReason, RejectedAgent, Reply, Role,
    SeatChange, Severity, SlaveId, Welcome, verify_license,
};
use time::Date;

use super::guards::{MAX_SEQ_JUMP, ReplayWindow};
use super::{Answer, Engine, Output, Slave, SlaveLicense};

impl Engine {
    fn refuse_hello(&self, slave: &SlaveId, reason: RejectReason, detail: String) -> Output {
        let mut out = Output::reply(Reply::Refused {
            reason,
            detail: detail.clone(),
            last_hello: None,
            retry_after_ms: None,
        });
        out.alert(
            self.alert(
                Severity::Warning,
                AlertKind::SlaveRefused,
                format!("slave {slave} refused: {detail}"),
            )
            .slave(slave.as_str())
            .reason(reason),
        );
        out
    }

    /// Decides whether a slave may connect and on which terms.
    fn admit_slave(
        &self,
        hello: &Hello,
        today: Date,
    ) -> Result<Option<SlaveLicense>, (RejectReason, String)> {
        let master = self.cfg.license.context;
        let Some(text) = &hello.license else {
            // An unlicensed slave runs in the context it declares (a slave that does not
            // say is taken as production, what `--context` defaults to).
            let declared = hello.context.unwrap_or(Context::Production);
            if !serves(master, declared) {
                return Err((
                    RejectReason::ContextMismatch,
                    format!(
                        "the unlicensed slave declares context '{declared}' but this master's license is for '{master}': start the slave with --context {master}, or point it at a {declared} master"
                    ),
                ));
            }
            return self.unlicensed_allowed();
        };
        let license = verify_license(text, "presented by the slave", &self.cfg.vendor_key)
            .map_err(|e| (RejectReason::LicenseInvalid, e.to_string()))?;
        license
            .check_dates(today, "presented by the slave")
            .map_err(|e| (RejectReason::LicenseInvalid, e.to_string()))?;
        if !serves(master, license.context) {
            return Err((
                RejectReason::ContextMismatch,
                format!(
                    "slave license {} is for context '{}' but this master's is '{master}': a {master} master serves only {} slave licenses",
                    license.id,
                    license.context,
                    served(master)
                ),
            ));
        }
        if let Some(declared) = hello.context.filter(|c| *c != license.context) {
            return Err((
                RejectReason::ContextMismatch,
                format!(
                    "the slave declares context '{declared}' but its license {} is for '{}'",
                    license.id, license.context
                ),
            ));
        }
        match license.role {
            Role::Slave => Ok(Some(SlaveLicense {
                id: license.id,
                local_limit: license.limits.local,
                offline_limit: license.sync_within_days.map(|within_days| OfflineLimit {
                    within_days,
                    issued_ms: license.issued_unix_ms(),
                }),
            })),
            // A standalone license carries neither flag: such an installation may only
            // join as an unlicensed slave.
            Role::None => self.unlicensed_allowed(),
            Role::Master => Err((
                RejectReason::LicenseRole,
                format!(
                    "license {} is a master license; a slave needs a slave license or none",
                    license.id
                ),
            )),
        }
    }

    /// An unlicensed slave (in the master's context) is admitted only where allowed.
    fn unlicensed_allowed(&self) -> Result<Option<SlaveLicense>, (RejectReason, String)> {
        if self.cfg.allow_unlicensed_slaves {
            Ok(None)
        } else {
            Err((
                RejectReason::UnlicensedNotAllowed,
                "the slave has no slave license and this master does not allow unlicensed slaves (start the broker with --allow-unlicensed-slaves)".to_owned(),
            ))
        }
    }

    /// One process per slave id: a hello from another instance while the known one is alive
    /// (connected and heard from within its silence limit) is a second daemon started with
    /// an id in use, not a restart. It is refused, critically alerted (at most once per
    /// [`super::RATE_LIMIT_ALERT_EVERY`] per slave), and the live instance's seats are left
    /// untouched. A restart after a crash is accepted once the old instance has been silent
    /// past its limit (the refusal says how long that is, and the slave waits that long
    /// at start); one after a clean stop at once, since the goodbye removed the old
    /// session.
    fn refuse_second_instance(
        &mut self,
        now: Instant,
        id: &SlaveId,
        hello: &Hello,
    ) -> Option<Output> {
        let known = self.slaves.get(id)?;
        if known.instance == hello.instance || !known.connected {
            return None;
        }
        let silent = now.saturating_duration_since(known.last_seen);
        let limit = known.silence_limit(self.cfg.missed_heartbeats);
        if silent > limit {
            return None;
        }
        let live = known.instance;
        let held = known.agents.len();
        let retry_after = limit - silent;
        let detail = format!(
            "slave id {id} is in use by a live process (instance {live}, heard from {} ago, holding {}): stop that process or give this one another --id. If that process has just died, this one is accepted once it has been silent for {} ({} from now)",
            duration(silent),
            plural(held as u64, "seat", "seats"),
            duration(limit),
            duration(retry_after)
        );
        let alert = self
            .alert(
                Severity::Critical,
                AlertKind::SlaveRefused,
                format!(
                    "slave {id}: a second process (instance {}) said hello while instance {live} is alive (heard from {} ago): refused, the live one keeps its {}. Two daemons run with the same --id: stop one",
                    hello.instance,
                    duration(silent),
                    plural(held as u64, "seat", "seats")
                ),
            )
            .slave(id.as_str())
            .reason(RejectReason::SlaveIdInUse);
        let mut out = Output::reply(Reply::Refused {
            reason: RejectReason::SlaveIdInUse,
            detail,
            last_hello: None,
            retry_after_ms: Some(retry_after.as_millis() as u64 + 1),
        });
        if let Some(alert) = self.quietly(now, id, "slave id in use", alert) {
            out.alert(alert);
        }
        Some(out)
    }

    pub(super) fn hello(&mut self, now: Instant, id: SlaveId, hello: Hello, today: Date) -> Output {
        if let Err((reason, detail)) = self.check_backup_may_serve() {
            return self.refuse_hello(&id, reason, detail);
        }
        let license = match self.admit_slave(&hello, today) {
            Ok(l) => l,
            Err((reason, detail)) => return self.refuse_hello(&id, reason, detail),
        };
        if let Some(refused) = self.refuse_second_instance(now, &id, &hello) {
            return refused;
        }
        // A slave license serves one live slave: a second site presenting a copy of it is
        // refused while the first is connected.
        if let Some(l) = &license {
            let holder = self
                .slaves
                .iter()
                .find(|(other, s)| {
                    **other != id && s.connected && s.license.as_ref().is_some_and(|h| h.id == l.id)
                })
                .map(|(other, _)| other.clone());
            if let Some(holder) = holder {
                return self.refuse_hello(
                    &id,
                    RejectReason::LicenseInUse,
                    format!(
                        "slave license {} is in use by slave {holder}, which is connected: a slave license serves one slave at a time",
                        l.id
                    ),
                );
            }
        }
        if !self.slaves.contains_key(&id) && self.slaves.len() >= self.cfg.max_slaves {
            return self.refuse_hello(
                &id,
                RejectReason::TooManySlaves,
                format!(
                    "the master already tracks {} slaves (--max-slaves)",
                    self.slaves.len()
                ),
            );
        }
        let grace = Duration::from_millis(hello.grace_ms);
        if hello.logout_after_grace {
            let needed = Duration::from_millis(hello.request_timeout_ms) + grace / 100;
            if self.cfg.reclaim_margin <= needed {
                return self.refuse_hello(
                    &id,
                    RejectReason::TimingRule,
                    format!(
                        "the master's reclaim margin ({}) must exceed the slave's longest request (request timeout plus the longer of its failover and election waits) plus 1% of its grace period ({}): raise --reclaim-margin on the broker or lower --request-timeout / --failover-wait / --election-wait on the slave",
                        duration(self.cfg.reclaim_margin),
                        duration(needed)
                    ),
                );
            }
        }
        if let Some(known) = self.slaves.get(&id) {
            // Every hello of an instance carries a new, higher number: one at or below the
            // last accepted is a replay (or a retry of a hello that was processed, which
            // the slave sends again under a new number), and must not roll back the seats.
            // A number more than MAX_SEQ_JUMP ahead is refused the same way: accepted, it
            // would leave the genuine slave no number to say hello with.
            if known.instance == hello.instance
                && (hello.seq <= known.hello_seq || hello.seq - known.hello_seq > MAX_SEQ_JUMP)
            {
                let mut out = Output::reply(Reply::Refused {
                    last_hello: Some(known.hello_seq),
                    retry_after_ms: None,
                    reason: RejectReason::Replayed,
                    detail: format!(
                        "hello number {} of this instance was already processed (the last was {}): a replayed hello; say hello under a new number",
                        hello.seq, known.hello_seq
                    ),
                });
                let alert = self
                    .alert(
                        Severity::Warning,
                        AlertKind::SlaveRefused,
                        format!(
                            "slave {id}: hello number {} refused as replayed (the last accepted was {}); its seats are untouched",
                            hello.seq, known.hello_seq
                        ),
                    )
                    .slave(id.as_str())
                    .reason(RejectReason::Replayed);
                if let Some(alert) = self.quietly(now, &id, "replayed hello", alert) {
                    out.alert(alert);
                }
                return out;
            }
        }
        let mut out = Output::default();
        let interval = Duration::from_millis(hello.heartbeat_interval_ms.clamp(100, 600_000));
        let rate = self.cfg.slave_rate_limit;
        let slave = self
            .slaves
            .entry(id.clone())
            .or_insert_with(|| Slave::new(hello.instance, now, interval, grace, rate));
        let restarted = slave.instance != hello.instance;
        let was_connected = slave.connected && !restarted;
        if restarted {
            // A new process numbers its requests from 1 again.
            slave.requests = ReplayWindow::default();
        }
        slave.instance = hello.instance;
        slave.license = license;
        slave.connected = true;
        slave.last_seen = now;
        slave.heard = true;
        slave.heartbeat_interval = interval;
        slave.grace = grace;
        slave.logout_after_grace = hello.logout_after_grace;
        slave.hello_seq = hello.seq;
        let was_reclaimed = std::mem::take(&mut slave.reclaimed);
        let revoked = std::mem::take(&mut slave.revoked);
        let session = SeatChange::Session {
            slave: id.to_string(),
            instance: slave.instance,
            license: slave.license.as_ref().map(|l| l.id),
            local_limit: slave.license.as_ref().and_then(|l| l.local_limit),
            offline_limit: slave.license.as_ref().and_then(|l| l.offline_limit),
            heartbeat_interval_ms: interval.as_millis() as u64,
            grace_ms: hello.grace_ms,
            logout_after_grace: hello.logout_after_grace,
            hello_seq: hello.seq,
            request_seq: 0,
        };
        self.pending.push(session);
        // Allotment mode: the hello's agent list holds every agent the slave admitted from
        // its blocks, and the slave admits nothing locally until it is answered, so its
        // blocks are emptied here (their seats are free for the reconcile below) and its
        // journal counts as applied up to the hello.
        let journal = match (restarted, hello.journal) {
            (_, Some(n)) => n,
            (true, None) => 0,
            (false, None) => slave.journal,
        };
        let allot_seq = if restarted { 0 } else { slave.allot_seq };
        if !slave.blocks.is_empty() || journal != slave.journal || allot_seq != slave.allot_seq {
            self.clear_blocks(&id);
            if let Some(s) = self.slaves.get_mut(&id) {
                s.journal = journal;
                s.allot_seq = allot_seq;
                s.asked_to_return = None;
            }
            if let Some(record) = self.allotment_record(&id) {
                self.pending.push(record);
            }
        }
        let Some(slave) = self.slaves.get(&id) else {
            return out;
        };

        // Reconcile: the slave's list is what it really holds. Seats it no longer claims
        // are released; claims the master does not hold are granted again if there is
        // room. Either way no agent ends up with two seats. A seat the hello cannot know
        // about is kept: one whose registration was in flight when the hello was built
        // (`pending`), or one granted by a request numbered after it (`request_seq`) by
        // this same instance.
        let claimed: BTreeMap<&str, &AgentClaim> = hello
            .agents
            .iter()
            .map(|c| (c.agent_id.as_str(), c))
            .collect();
        let pending: BTreeSet<&str> = hello.pending.iter().map(String::as_str).collect();
        let accounts_for = |seq: u64| restarted || hello.request_seq.is_none_or(|last| seq <= last);
        // Claims of agents an unregistration numbered after the hello released: the host
        // gave the seat back since the hello was built, so it is not granted again (and not
        // refused: the slave no longer holds it).
        let released_since: BTreeSet<String> = slave
            .released
            .iter()
            .filter(|&(_, &seq)| !accounts_for(seq))
            .map(|(agent, _)| agent.clone())
            .collect();
        let mut stale: Vec<String> = slave
            .agents
            .iter()
            .filter(|(agent, agent_type)| {
                claimed
                    .get(agent.as_str())
                    .is_none_or(|c| &c.agent_type != *agent_type)
                    && !pending.contains(agent.as_str())
                    && accounts_for(
                        slave
                            .granted
                            .get(agent.as_str())
                            .map_or(0, |g| g.request_seq),
                    )
            })
            .map(|(a, _)| a.clone())
            .collect();
        stale.sort();
        for agent in &stale {
            self.release(&id, agent);
        }
        let mut rejected = Vec::new();
        if let Some(s) = self.slaves.get_mut(&id) {
            match hello.request_seq {
                Some(last) if !restarted => s.released.retain(|_, seq| *seq > last),
                _ => s.released.clear(),
            }
        }
        for claim in &hello.agents {
            if pending.contains(claim.agent_id.as_str()) {
                // Its own registration decides it.
                continue;
            }
            if released_since.contains(&claim.agent_id)
                && !self
                    .slaves
                    .get(&id)
                    .is_some_and(|s| s.agents.contains_key(&claim.agent_id))
            {
                // Skipped once, then forgotten: should the release have come from an
                // earlier process of the slave (unregistrations carry no instance), the
                // next hello grants the claim again.
                if let Some(s) = self.slaves.get_mut(&id) {
                    s.released.remove(&claim.agent_id);
                }
                continue;
            }
            let result = if revoked.contains(&claim.agent_id) {
                Err((
                    RejectReason::ReleasedByAdmin,
                    "an operator released this seat; register the agent again".to_owned(),
                ))
            } else {
                self.try_grant(&id, &claim.agent_id, &claim.agent_type, 0)
                    .map_err(|(reason, detail)| {
                        if was_reclaimed {
                            (
                                RejectReason::Reclaimed,
                                format!("its seat was reclaimed while the slave was silent and there is no room now ({reason}: {detail})"),
                            )
                        } else {
                            (reason, detail)
                        }
                    })
            };
            match result {
                Ok(_) => {}
                Err((reason, detail)) => {
                    out.alert(self.rejection_alert(&id, claim, reason, &detail));
                    rejected.push(RejectedAgent {
                        agent_id: claim.agent_id.clone(),
                        reason,
                    });
                }
            }
        }

        let terms = match self.slaves.get(&id).and_then(|s| s.license.as_ref()) {
            Some(l) => match l.local_limit {
                Some(n) => format!("licensed (license {}, local limit {n})", l.id),
                None => format!("licensed (license {}, no local limit)", l.id),
            },
            None => "unlicensed".to_owned(),
        };
        let held = self.slaves.get(&id).map_or(0, |s| s.agents.len());
        let held = plural(held as u64, "agent", "agents");
        let mut message = if was_connected {
            format!("slave {id} reconciled its seats, {terms}, holding {held}")
        } else {
            format!("slave {id} connected, {terms}, holding {held}")
        };
        if !stale.is_empty() {
            message.push_str(&format!(
                ", {} it no longer claims released",
                plural(stale.len() as u64, "seat", "seats")
            ));
        }
        if restarted {
            message.push_str(" (new process instance)");
        }
        if !rejected.is_empty() {
            message.push_str(&format!(
                ", {} refused on reconcile",
                plural(rejected.len() as u64, "agent", "agents")
            ));
        }
        // A reconcile of a live session that changed nothing is not news.
        if !was_connected || !stale.is_empty() || !rejected.is_empty() {
            out.alert(
                self.alert(Severity::Info, AlertKind::SlaveConnected, message)
                    .slave(id.as_str())
                    .counts(self.counts()),
            );
        }
        out.reply = Some(Answer::Slave(Reply::Welcome(Welcome {
            broker_id: self.cfg.broker_id.clone(),
            master_license: self.cfg.license.id,
            missed_heartbeats: self.cfg.missed_heartbeats,
            rejected_agents: rejected,
            admission: self.cfg.allot.admission,
            allot_refresh_ms: self.cfg.allot.refresh.as_millis() as u64,
            context: Some(self.cfg.license.context),
        })));
        out
    }
}

/// Whether a `master` master serves slaves of context `slave`: its own, and a backup
/// master the production slaves whose masters it backs.
pub(super) fn serves(master: Context, slave: Context) -> bool {
    slave == master || (master == Context::Backup && slave == Context::Production)
}

/// The slave contexts a `master` master serves, as people read them.
fn served(master: Context) -> String {
    match master {
        Context::Backup => "production and backup".to_owned(),
        other => other.to_string(),
    }
}
