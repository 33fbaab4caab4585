//! An operator's commands: a license reload and a forced release of seats.

use lmbus_schemas::human::plural;
use lmbus_schemas::{
    AlertKind, ControlMessage, RejectReason, RejectedAgent, ReleaseReply, ReleaseRequest,
    ReloadReply, ReloadRequest, Role, SeatChange, Severity, SlaveId, printable, truncated,
    verify_license,
};
use time::Date;

use super::{Answer, Effect, Engine, Output};

/// Longest license file name an error repeats (it came from the network).
const MAX_FILE_NAME: usize = 256;

impl Engine {
    /// An operator's new master license (`admin reload-license`, like lmreread): verified
    /// (signature, dates, role master) before anything changes, then in force at once and
    /// recorded in the ledger so every replica uses it. A limit below current use logs
    /// nobody out: new registrations are rejected until usage is below it, and the reply
    /// and the alert say so.
    pub(super) fn reload_license(&mut self, request: &ReloadRequest, today: Date) -> Output {
        // The operator's path, shown as a person sees it (from an older client: a
        // description instead).
        let file = if request.file.is_empty() {
            "(reloaded, name not sent)".to_owned()
        } else {
            printable(&truncated(&request.file, MAX_FILE_NAME)).into_owned()
        };
        let checked = verify_license(&request.license, &file, &self.cfg.vendor_key).and_then(|l| {
            l.check_dates(today, &file)?;
            l.require_role(Role::Master, &file)?;
            Ok(l)
        });
        let license = match checked {
            Ok(l) => l,
            Err(e) => {
                return Output {
                    reply: Some(Answer::Reload(ReloadReply::Error {
                        message: format!("{e}; the current license stays in force"),
                    })),
                    ..Output::default()
                };
            }
        };
        let current = &self.cfg.license;
        if license.id == current.id && license.rank() < current.rank() {
            // An older issue of the license in force (more seats, no offline limit, or
            // a license a sync has since replaced): the vendor's later issue stands.
            let message = format!(
                "license {} in {file} is an older issue ({}) of the license in force ({}): a master never goes back to an older issue of its license. The current license stays in force",
                license.id,
                license.issue_text(),
                current.issue_text()
            );
            return self.reload_refused(request, message);
        }
        if license.id != current.id && license.issued < current.issued {
            // Another license issued before the one in force: an older contract's (more
            // seats, no offline limit) must not come back by a reload.
            let message = format!(
                "license {} in {file} ({}) was issued before the license in force, {} ({}): a master takes another license only if it was issued on the same day or later. The current license stays in force",
                license.id,
                license.issue_text(),
                current.id,
                current.issue_text()
            );
            return self.reload_refused(request, message);
        }
        let running = self.cfg.license.context;
        if license.context != running {
            // The master's context is the cluster's: switching it under connected slaves
            // would serve them from a license of a context they do not match, and mix two
            // contexts in one ledger.
            let message = format!(
                "license {} in {file} is for context '{}' but this master runs in '{running}': a master keeps its context (its slaves and its ledger are {running}); start a separate {} cluster for it. The current license stays in force",
                license.id, license.context, license.context
            );
            return self.reload_refused(request, message);
        }
        if running == lmbus_schemas::Context::Backup
            && (license.backs != current.backs
                || license.production_cluster != current.production_cluster)
        {
            // A backup master's watch on production is set when it starts, from the license
            // then and `--production-cluster`: a license that backs another production
            // license, or names another production cluster, would be checked against the
            // old ones. It takes effect with a restart.
            let shown = |backs: Option<uuid::Uuid>, cluster: &Option<String>| {
                format!(
                    "backs production license {}{}",
                    backs.map_or("(none)".to_owned(), |b| b.to_string()),
                    cluster
                        .as_deref()
                        .map_or(String::new(), |c| format!(" of production cluster {c}"))
                )
            };
            let message = format!(
                "backup license {} in {file} {}, but the license in force {}: a backup master watches what its license backed when it started. Restart it with the new license file. The current license stays in force",
                license.id,
                shown(license.backs, &license.production_cluster),
                shown(current.backs, &current.production_cluster)
            );
            return self.reload_refused(request, message);
        }
        if license == self.cfg.license {
            // The same license again: nothing to record, nobody to alert.
            return Output {
                reply: Some(Answer::Reload(ReloadReply::Reloaded {
                    message: format!(
                        "nothing changed: license {} for {} in {file} is already in force",
                        license.id, license.customer
                    ),
                })),
                ..Output::default()
            };
        }
        let old_total = self.total_limit();
        self.cfg.license = license;
        self.license_text = Some(request.license.clone());
        let new_total = self.total_limit();
        let mut over = Vec::new();
        if self.total_in_use > new_total {
            over.push(format!(
                "{} in use, total limit {new_total}",
                plural(u64::from(self.total_in_use), "seat", "seats")
            ));
        }
        for (agent_type, limit) in &self.cfg.license.limits.agent_types {
            let used = self.in_use_by_type.get(agent_type).copied().unwrap_or(0);
            if used > *limit {
                over.push(format!(
                    "{} in use, limit {limit}",
                    plural(
                        u64::from(used),
                        &format!("'{agent_type}' seat"),
                        &format!("'{agent_type}' seats")
                    )
                ));
            }
        }
        let who = if request.operator.is_empty() {
            "an operator"
        } else {
            request.operator.as_str()
        };
        let mut message = format!(
            "license {} for {} is in force (total limit {old_total} -> {new_total})",
            self.cfg.license.id, self.cfg.license.customer
        );
        if !over.is_empty() {
            message.push_str(&format!(
                "; usage is above the new limits ({}): nobody is logged out, new registrations are rejected until usage falls below them",
                over.join("; ")
            ));
        }
        let alert = self
            .alert(
                if over.is_empty() {
                    Severity::Info
                } else {
                    Severity::Warning
                },
                AlertKind::LicenseReloaded,
                format!("{who} reloaded the master license: {message}"),
            )
            .counts(self.counts());
        self.pending.push(SeatChange::License {
            text: request.license.clone(),
        });
        Output {
            reply: Some(Answer::Reload(ReloadReply::Reloaded { message })),
            effects: vec![Effect::Alert(alert)],
            changes: Vec::new(),
        }
    }

    /// A verified license the master will not take: the error reply and a
    /// `license_refused` warning naming who tried.
    fn reload_refused(&self, request: &ReloadRequest, message: String) -> Output {
        let who = if request.operator.is_empty() {
            "an operator"
        } else {
            request.operator.as_str()
        };
        let alert = self.alert(
            Severity::Warning,
            AlertKind::LicenseRefused,
            format!("{who} tried to reload the master license: {message}"),
        );
        Output {
            reply: Some(Answer::Reload(ReloadReply::Error { message })),
            effects: vec![Effect::Alert(alert)],
            changes: Vec::new(),
        }
    }

    /// An operator force-releases one agent's seat or all seats of a slave. The slave is
    /// told to log the agents out; if it misses that (it is offline), its next hello is
    /// refused those agents, so it cannot silently take them back.
    pub(super) fn admin_release(&mut self, request: &ReleaseRequest) -> Output {
        let error = |message: String| Output {
            reply: Some(Answer::Release(ReleaseReply::Error { message })),
            ..Output::default()
        };
        let Ok(id) = SlaveId::new(request.slave_id.clone()) else {
            return error(format!("{:?} is not a valid slave id", request.slave_id));
        };
        let Some(slave) = self.slaves.get(&id) else {
            return error(format!("the master knows no slave {id}"));
        };
        let targets: Vec<(String, String)> = match &request.agent_id {
            Some(agent) => match slave.agents.get(agent) {
                Some(t) => vec![(agent.clone(), t.clone())],
                None => return error(format!("agent {agent} holds no seat on slave {id}")),
            },
            None => slave
                .agents
                .iter()
                .map(|(a, t)| (a.clone(), t.clone()))
                .collect(),
        };
        let agents: Vec<String> = targets.into_iter().map(|(a, _)| a).collect();
        let who = if request.operator.is_empty() {
            "an operator"
        } else {
            request.operator.as_str()
        };
        let effects = self.revoke(&id, &agents, who, RejectReason::ReleasedByAdmin);
        Output {
            reply: Some(Answer::Release(ReleaseReply::Released { agents })),
            effects,
            changes: Vec::new(),
        }
    }

    /// Releases `agents` of slave `id` for good: recorded (`Revoke`), the slave told to log
    /// them out with `reason`, a hello claiming them again refused, and a `seats_released`
    /// alert saying `who` did it.
    pub(super) fn revoke(
        &mut self,
        id: &SlaveId,
        agents: &[String],
        who: &str,
        reason: RejectReason,
    ) -> Vec<Effect> {
        for agent in agents {
            self.release(id, agent);
        }
        if let Some(slave) = self.slaves.get_mut(id) {
            slave.revoked.extend(agents.iter().cloned());
        }
        self.pending.push(SeatChange::Revoke {
            slave: id.to_string(),
            agents: agents.to_vec(),
        });
        let alert = self
            .alert(
                Severity::Warning,
                AlertKind::SeatsReleased,
                format!(
                    "{who} released {} of slave {id}: {}",
                    plural(agents.len() as u64, "seat", "seats"),
                    agents.join(", ")
                ),
            )
            .slave(id.as_str())
            .counts(self.counts());
        let logout = ControlMessage::LogOut {
            agents: agents
                .iter()
                .map(|a| RejectedAgent {
                    agent_id: a.clone(),
                    reason,
                })
                .collect(),
        };
        vec![
            Effect::Control {
                slave: id.clone(),
                message: logout,
            },
            Effect::Alert(alert),
        ]
    }
}
