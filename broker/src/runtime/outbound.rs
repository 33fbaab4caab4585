//! Everything the runtime sends: replies, alerts (logged and counted), control messages and
//! status answers, and the registration timings it observes for the metrics.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use lmbus_schemas::{Alert, Decision, Reply, Severity, StatusReply, Subjects, encode};
use tracing::{info, warn};

use crate::engine::{Effect, Output};
use crate::metrics::Metrics;

use super::unix_ms;

/// The runtime's side effects: replies, alerts and control messages.
#[derive(Clone)]
pub(super) struct Io {
    pub(super) client: Client,
    pub(super) subjects: Subjects,
    pub(super) broker_id: String,
    pub(super) metrics: Arc<Metrics>,
}

impl Io {
    pub(super) fn observe(&self, out: &Output, took: Duration, unregistration: bool) {
        match &out.reply {
            // A batch holds only registrations (answered with decisions) and
            // unregistrations (answered `Ack`).
            Some(Reply::Batch(replies)) => {
                for reply in replies {
                    self.observe_reply(reply, took, matches!(reply, Reply::Ack));
                }
            }
            Some(reply) => self.observe_reply(reply, took, unregistration),
            None => {}
        }
    }

    fn observe_reply(&self, reply: &Reply, took: Duration, unregistration: bool) {
        match reply {
            Reply::Decision(Decision::Approved { .. }) => self.metrics.registration(None, took),
            Reply::Decision(Decision::Rejected { reason, .. }) => {
                self.metrics.registration(Some(reason.token()), took)
            }
            Reply::Ack if unregistration => self.metrics.unregistration(took),
            // Errors (bad input) are counted by their `bad_message` alerts.
            _ => {}
        }
    }

    pub(super) async fn apply(&self, reply_to: Option<&async_nats::Subject>, out: Output) {
        if let (Some(reply_to), Some(reply)) = (reply_to, out.reply.as_ref()) {
            self.reply(reply_to, reply).await;
        }
        for effect in out.effects {
            match effect {
                Effect::Alert(alert) => self.alert(alert).await,
                Effect::Control { slave, message } => match encode(&message) {
                    Ok(bytes) => {
                        if let Err(e) = self
                            .client
                            .publish(self.subjects.control(&slave), bytes.into())
                            .await
                        {
                            warn!(%slave, error = %e, "cannot publish control message");
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot encode control message"),
                },
            }
        }
    }

    async fn reply(&self, reply_to: &async_nats::Subject, reply: &Reply) {
        match encode(reply) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(reply_to.clone(), bytes.into()).await {
                    warn!(error = %e, "cannot publish reply");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode reply"),
        }
    }

    pub(super) async fn alert(&self, mut alert: Alert) {
        alert.time_ms = unix_ms();
        if alert.source.is_empty() {
            alert.source = self.broker_id.clone();
        }
        match alert.severity {
            Severity::Info => info!(kind = %alert.kind, slave = ?alert.slave, "{}", alert.message),
            _ => warn!(kind = %alert.kind, slave = ?alert.slave, "{}", alert.message),
        }
        self.metrics
            .alert(alert.kind.token(), alert.severity.token());
        let subject = self.subjects.alert(alert.severity, alert.kind);
        match encode(&alert) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(subject, bytes.into()).await {
                    warn!(error = %e, "cannot publish alert");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode alert"),
        }
    }

    pub(super) async fn admin_reply(&self, msg: &Message, reply: &[u8]) {
        let Some(reply_to) = &msg.reply else {
            return;
        };
        if let Err(e) = self
            .client
            .publish(reply_to.clone(), reply.to_vec().into())
            .await
        {
            warn!(error = %e, "cannot publish admin reply");
        }
    }

    pub(super) async fn status(&self, msg: &Message, status: StatusReply) {
        let Some(reply_to) = &msg.reply else {
            return;
        };
        match encode(&status) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(reply_to.clone(), bytes.into()).await {
                    warn!(error = %e, "cannot publish status reply");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode status reply"),
        }
    }
}
