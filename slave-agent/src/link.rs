//! One master as the slave sees it: its own NATS connection and cluster subjects, and the
//! request/reply primitive with a timeout. A slave has one link (the primary) or two (a
//! secondary too, usually at another site).

use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use lmbus_schemas::{Reply, SlaveId, SlaveOp, Subjects, decode, encode};
use serde::Serialize;
use tokio::time::Instant;

/// Which master: index into the slave's links.
pub(crate) type LinkId = usize;
pub(crate) const PRIMARY: LinkId = 0;
pub(crate) const SECONDARY: LinkId = 1;

pub(crate) fn link_name(link: LinkId) -> &'static str {
    if link == PRIMARY {
        "primary"
    } else {
        "secondary"
    }
}

/// What a request to a master came to.
pub(crate) enum Ask {
    /// The master answered, `latency` after the request was sent at `sent`.
    Reply {
        reply: Reply,
        sent: Instant,
        latency: Duration,
    },
    /// Nobody answered: no responders, or the timeout passed.
    Unavailable(String),
}

#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) id: LinkId,
    pub(crate) client: Client,
    pub(crate) subjects: Subjects,
    pub(crate) nats_url: String,
    /// Serializes hellos on this link, so a burst of requests meeting a lost session says
    /// hello once.
    pub(crate) hello_lock: tokio::sync::Mutex<()>,
    /// Numbers hellos so the master can ignore a delayed old one.
    pub(crate) hello_seq: std::sync::atomic::AtomicU64,
}

impl Link {
    /// Connects to one master's NATS. With `retry` the connection is made in the
    /// background (the master may be down at start and a second one is configured);
    /// otherwise an unreachable NATS is an error at once.
    pub(crate) async fn connect(
        id: LinkId,
        nats_url: &str,
        auth: &lmbus_nats::NatsAuth,
        cluster: &str,
        slave: &SlaveId,
        retry: bool,
    ) -> Result<Self, crate::SlaveError> {
        let subjects =
            Subjects::new(cluster).map_err(|e| crate::SlaveError::Config(e.to_string()))?;
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("lmbus-slave {slave} ({})", link_name(id)))
            .custom_inbox_prefix(subjects.slave_inbox_prefix(slave));
        if retry {
            options = options.retry_on_initial_connect();
        }
        let client = lmbus_nats::connect(nats_url, options, auth)
            .await
            .map_err(|e| crate::SlaveError::Connect {
                url: nats_url.to_owned(),
                detail: match e {
                    lmbus_nats::ConnectFailure::Connect { detail, .. } => detail,
                    other => other.to_string(),
                },
            })?;
        Ok(Self {
            id,
            client,
            subjects,
            nats_url: nats_url.to_owned(),
            hello_lock: tokio::sync::Mutex::new(()),
            hello_seq: Default::default(),
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        link_name(self.id)
    }

    /// Sends `body` on the slave's `op` subject of this master and waits `timeout` for
    /// the answer.
    pub(crate) async fn ask<T: Serialize>(
        &self,
        slave: &SlaveId,
        op: SlaveOp,
        body: &T,
        timeout: Duration,
    ) -> Result<Ask, crate::SlaveError> {
        let payload = encode(body).map_err(|e| crate::SlaveError::Nats(e.to_string()))?;
        let subject = self.subjects.slave_op(slave, op);
        let sent = Instant::now();
        let request = self.client.request(subject.clone(), payload.into());
        match tokio::time::timeout(timeout, request).await {
            Err(_) => Ok(Ask::Unavailable(format!(
                "no answer from the {} master on {subject} within {timeout:?}",
                self.name()
            ))),
            Ok(Err(e)) => match e.kind() {
                RequestErrorKind::NoResponders => Ok(Ask::Unavailable(format!(
                    "no {} master is listening on {subject}",
                    self.name()
                ))),
                RequestErrorKind::TimedOut => Ok(Ask::Unavailable(format!(
                    "no answer from the {} master on {subject}",
                    self.name()
                ))),
                _ => Ok(Ask::Unavailable(format!(
                    "cannot reach the {} master's NATS at {}: {e}",
                    self.name(),
                    self.nats_url
                ))),
            },
            Ok(Ok(msg)) => match decode::<Reply>(&msg.payload) {
                Ok(reply) => Ok(Ask::Reply {
                    reply,
                    sent,
                    latency: sent.elapsed(),
                }),
                Err(e) => Err(crate::SlaveError::Nats(format!(
                    "the {} master's reply on {subject} could not be decoded: {e}",
                    self.name()
                ))),
            },
        }
    }

    /// Publishes without waiting for an answer.
    pub(crate) async fn publish<T: Serialize>(&self, slave: &SlaveId, op: SlaveOp, body: &T) {
        let subject = self.subjects.slave_op(slave, op);
        match encode(body) {
            Ok(bytes) => {
                if let Err(e) = self.client.publish(subject, bytes.into()).await {
                    tracing::warn!(error = %e, "cannot publish to the {} master", self.name());
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode a message"),
        }
    }
}
