//! What needs no decision, only an alert: a slave's report of what it refused locally or
//! how it restricted usage, and a message that could not be read.

use lmbus_schemas::{AlertKind, Reply, Severity, SlaveEvent, SlaveId, SlaveReport, WireError};

use super::{Engine, Output};

impl Engine {
    pub(super) fn report(&mut self, id: SlaveId, report: SlaveReport) -> Output {
        let mut out = Output::default();
        let source = format!("slave:{id}");
        match report.event {
            SlaveEvent::LocalRejection {
                agent_id,
                agent_type,
                reason,
            } => {
                let mut alert = self
                    .alert(
                        Severity::Warning,
                        AlertKind::RegistrationRejected,
                        format!(
                            "agent {agent_id} ({agent_type}) on slave {id} rejected by the slave: {reason}: {}",
                            report.message
                        ),
                    )
                    .slave(id.as_str())
                    .agent(agent_id, agent_type)
                    .reason(reason)
                    .counts(self.counts());
                alert.source = source;
                out.alert(alert);
            }
            SlaveEvent::Restricted {
                lost_for_ms,
                logged_out,
            } => {
                let mut alert = self
                    .alert(
                        Severity::Warning,
                        AlertKind::SlaveRestricted,
                        format!(
                            "slave {id} had no master for {} s, beyond its grace period, and restricted usage ({logged_out} agents logged out)",
                            lost_for_ms / 1000
                        ),
                    )
                    .slave(id.as_str());
                alert.source = source;
                out.alert(alert);
            }
            SlaveEvent::Other => {
                let mut alert = self
                    .alert(
                        Severity::Info,
                        AlertKind::Other,
                        format!("slave {id} reported: {}", report.message),
                    )
                    .slave(id.as_str());
                alert.source = source;
                out.alert(alert);
            }
        }
        out
    }

    pub(super) fn bad_message(
        &mut self,
        subject: String,
        slave: Option<SlaveId>,
        error: WireError,
    ) -> Output {
        let mut alert = self.alert(
            Severity::Warning,
            AlertKind::BadMessage,
            format!("bad message on {subject}: {error}"),
        );
        if let Some(slave) = &slave {
            alert = alert.slave(slave.as_str());
        }
        let mut out = Output::reply(Reply::Error(error));
        out.alert(alert);
        out
    }
}
