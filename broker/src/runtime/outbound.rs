//! Everything the runtime sends: replies, alerts (logged and counted), control messages and
//! status answers, and the registration timings it observes for the metrics.

use std::sync::Arc;
use std::time::Duration;
use tracing::field::display;

use async_nats::{Client, Message, Subject, ToSubject};
use lmbus_schemas::{Alert, Decision, Reply, Severity, StatusReply, Subjects, encode, truncated};
use serde::Serialize;
use tracing::{info, warn};

use crate::engine::{Answer, Effect, Output};
use crate::metrics::Metrics;

use super::clock::unix_ms;

/// The runtime's side effects: replies, alerts and control messages.
#[derive(Clone)]
pub(super) struct Io {
    pub(super) client: Client,
    /// Where vendor sync requests go: the vendor's NATS (`--vendor-nats`) or `client`.
    pub(super) vendor: Client,
    pub(super) subjects: Subjects,
    pub(super) broker_id: String,
    /// The context of the license this replica started with, stamped on every alert it
    /// publishes: a replica never changes context (a reload or a ledger of another is
    /// refused).
    pub(super) context: lmbus_schemas::Context,
    pub(super) metrics: Arc<Metrics>,
    /// Every task spawned beside the loop (the side tasks, reports, delayed `no_leader`
    /// answers), so that a shutdown can wait for what they are sending.
    pub(super) tasks: tokio_util::task::TaskTracker,
    /// JetStream's stream-leader elections for the broker's streams
    /// ([`crate::jetstream::leader_news`]): waits on a stream without a leader end on them.
    pub(super) news: tokio::sync::watch::Receiver<u64>,
    /// A backup master's watch on the production cluster it backs (`None` otherwise).
    pub(super) production: Option<super::backup::ProductionWatch>,
    /// A production master's view of its backup masters' seats (`None` otherwise).
    pub(super) backups: Option<super::backup::BackupsWatch>,
}

impl Io {
    /// Counts a registration's or unregistration's answer and how long it took.
    pub(super) fn observe(&self, out: &Output, took: Duration, unregistration: bool) {
        match &out.reply {
            // A batch holds only registrations (answered with decisions) and
            // unregistrations (answered `Ack`).
            Some(Answer::Slave(Reply::Batch(replies))) => {
                for reply in replies {
                    self.observe_reply(reply, took, matches!(reply, Reply::Ack));
                }
            }
            Some(Answer::Slave(reply)) => self.observe_reply(reply, took, unregistration),
            _ => {}
        }
    }

    fn observe_reply(&self, reply: &Reply, took: Duration, unregistration: bool) {
        match reply {
            Reply::Decision(Decision::Approved { .. }) => self.metrics.registration(None, took),
            // Not decided yet: the slave asks again (counted as lmbus_allot_waits_total).
            Reply::Decision(Decision::Rejected {
                retry_after_ms: Some(_),
                ..
            }) => {}
            Reply::Decision(Decision::Rejected { reason, .. }) => {
                self.metrics.registration(Some(reason.token()), took)
            }
            Reply::Ack if unregistration => self.metrics.unregistration(took),
            // Errors (bad input) are counted by their `bad_message` alerts.
            _ => {}
        }
    }

    /// Sends what the engine decided: the reply to `reply_to` (no reply without one), then
    /// the effects in order.
    pub(super) async fn carry_out(&self, reply_to: Option<&Subject>, out: Output) {
        if let (Some(reply_to), Some(reply)) = (reply_to, out.reply.as_ref()) {
            let reply_to = reply_to.clone();
            match reply {
                Answer::Slave(reply) => self.send(reply_to, reply, "reply").await,
                Answer::Release(reply) => self.send(reply_to, reply, "admin reply").await,
                Answer::Reload(reply) => self.send(reply_to, reply, "admin reply").await,
                Answer::Forget(reply) => self.send(reply_to, reply, "admin reply").await,
            }
        }
        for effect in out.effects {
            match effect {
                Effect::Alert(alert) => self.alert(alert).await,
                Effect::Control { slave, message } => {
                    self.send(self.subjects.control(&slave), &message, "control message")
                        .await;
                }
            }
        }
    }

    /// Logs `alert`, counts it and publishes it on its subject.
    pub(super) async fn alert(&self, mut alert: Alert) {
        alert.time_ms = unix_ms();
        if alert.source.is_empty() {
            alert.source = self.broker_id.clone();
        }
        if alert.context.is_empty() {
            alert = alert.in_context(self.context);
        }
        // No slave field at all when the alert is about none (not `slave=None`).
        let slave = alert.slave.as_deref().map(display);
        match alert.severity {
            Severity::Info => info!(kind = %alert.kind, slave, "{}", alert.message),
            _ => warn!(kind = %alert.kind, slave, "{}", alert.message),
        }
        self.metrics
            .alert(alert.kind.token(), alert.severity.token());
        let subject = self.subjects.alert(alert.severity, alert.kind);
        self.send(subject, &alert, "alert").await;
    }

    /// Answers a status request, where it asked (if it asked).
    pub(super) async fn status(&self, msg: &Message, status: StatusReply) {
        let Some(reply_to) = &msg.reply else {
            return;
        };
        self.send(reply_to.clone(), &status, "status reply").await;
    }

    /// Encodes `message` and publishes it on `subject`. Nothing waits for it: a failure
    /// (the message cannot be encoded, the client is closed) is logged as `what` and the
    /// runtime goes on, as it would after a message lost on the way.
    pub(super) async fn send(&self, subject: impl ToSubject, message: &impl Serialize, what: &str) {
        let subject = subject.to_subject();
        let bytes = match encode(message) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "cannot encode {what}");
                return;
            }
        };
        if let Err(e) = self.client.publish(subject.clone(), bytes.into()).await {
            warn!(error = %e, subject = %truncated(subject.as_str(), 160), "cannot publish {what}");
        }
    }
}
