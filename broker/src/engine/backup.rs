//! A backup master (license context `backup`): it serves only while the production
//! cluster it backs cannot. The runtime watches the production cluster's replica beats
//! and tells the engine, before every event, why it may not serve now, if it may not
//! (`set_production_alive`): production's leader is alive (`production_available`), or
//! production runs another license than the backed one (`context_mismatch`). Meanwhile
//! hellos and registrations are refused with that reason and allotment blocks are taken
//! back, so backup seats are handed out only while production is silent.

use lmbus_schemas::{Context, RejectReason};

use super::Engine;

impl Engine {
    /// Why this backup master may not serve now (`None`: it may, or it is no backup).
    pub fn set_production_alive(&mut self, refusal: Option<(RejectReason, String)>) {
        self.production_alive = refusal;
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
}
