//! A backup master (license context `backup`): it serves only while the production
//! cluster it backs cannot. The runtime watches the production cluster's replica beats
//! and tells the engine, before every event, why it may not serve now, if it may not, and
//! whether production has been available for the whole handback window
//! (`set_production_alive`). While it may not serve, hellos and registrations are refused
//! with that reason (`production_available`, `context_mismatch` when production runs
//! another license, or `license_in_use` when another, older backup cluster
//! runs the same backup license) and allotment blocks are taken back. Once the handback window has
//! passed with production available, the next tick releases every seat the backup holds
//! (the slaves log those agents out, reason `production_available`, to register them with
//! production): the time both masters are in use is bounded by the window.

use std::time::Instant;

use lmbus_schemas::{Context, RejectReason, SlaveId};

use super::{Engine, Output};

impl Engine {
    /// Why this backup master may not serve now (`None`: it may, or it is no backup), and
    /// whether production has been available for the whole handback window.
    pub fn set_production_alive(
        &mut self,
        refusal: Option<(RejectReason, String)>,
        handback_due: bool,
    ) {
        self.production_alive = refusal;
        self.handback_due = handback_due;
    }

    /// Refuses while this is a backup master that may not serve.
    pub(super) fn check_backup_may_serve(&self) -> Result<(), (RejectReason, String)> {
        match &self.production_alive {
            Some((reason, why)) if self.cfg.license.context == Context::Backup => Err((
                *reason,
                format!(
                    "this is a backup master and it may not serve now: {why}; a backup serves only while the production master it backs cannot"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The handback: once production has been available for the handback window, every
    /// seat this backup master holds is released and its slaves told to log those agents
    /// out (they register them with production).
    pub(super) fn handback(&mut self, _now: Instant, out: &mut Output) {
        if self.cfg.license.context != Context::Backup || !self.handback_due {
            return;
        }
        let holding: Vec<(SlaveId, Vec<String>)> = self
            .slaves
            .iter()
            .filter(|(_, s)| !s.agents.is_empty())
            .map(|(id, s)| (id.clone(), s.agents.keys().cloned().collect()))
            .collect();
        for (id, agents) in holding {
            let effects = self.revoke(
                &id,
                &agents,
                "the handback (production has been available for the whole handback window)",
                RejectReason::ProductionAvailable,
            );
            out.effects.extend(effects);
        }
    }
}
