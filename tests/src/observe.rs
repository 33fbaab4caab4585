//! What tests watch: the alerts of a cluster and the master's status.

use std::time::Duration;

use anyhow::Context as _;
use lmbus_schemas::{Alert, StatusReply, Subjects, decode};

use crate::wait::{WAIT, eventually};

/// Collects alerts of one cluster from the moment it is created.
#[derive(Debug)]
pub struct AlertTap {
    sub: async_nats::Subscriber,
    pub seen: Vec<Alert>,
}

impl AlertTap {
    pub async fn new(client: &async_nats::Client, cluster: &str) -> anyhow::Result<Self> {
        let sub = client
            .subscribe(Subjects::new(cluster)?.all_alerts())
            .await?;
        client.flush().await?;
        Ok(Self {
            sub,
            seen: Vec::new(),
        })
    }

    /// Waits (bounded) for an alert matching `pred` and returns it.
    pub async fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&Alert) -> bool,
    ) -> anyhow::Result<Alert> {
        use futures::StreamExt;
        if let Some(a) = self.seen.iter().find(|a| pred(a)) {
            return Ok(a.clone());
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.sub.next())
                .await
                .with_context(|| format!("no alert {what} within {WAIT:?}; saw {:#?}", self.seen))?
                .context("alert subscription closed")?;
            let alert: Alert = decode(&msg.payload)?;
            self.seen.push(alert.clone());
            if pred(&alert) {
                return Ok(alert);
            }
        }
    }
}

impl AlertTap {
    /// Takes in every alert that arrives until none has for `quiet`; returns all seen.
    pub async fn drain(&mut self, quiet: std::time::Duration) -> anyhow::Result<&[Alert]> {
        use futures::StreamExt;
        while let Ok(Some(msg)) = tokio::time::timeout(quiet, self.sub.next()).await {
            self.seen.push(decode(&msg.payload)?);
        }
        Ok(&self.seen)
    }

    /// Waits (bounded) until `n` alerts seen so far match `pred`; returns them.
    pub async fn wait_count(
        &mut self,
        what: &str,
        n: usize,
        pred: impl Fn(&Alert) -> bool,
    ) -> anyhow::Result<Vec<Alert>> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let matching: Vec<Alert> = self.seen.iter().filter(|a| pred(a)).cloned().collect();
            if matching.len() >= n {
                return Ok(matching);
            }
            let msg = tokio::time::timeout_at(deadline, self.sub.next())
                .await
                .with_context(|| {
                    format!(
                        "only {} of {n} alerts {what} within {WAIT:?}",
                        matching.len()
                    )
                })?
                .context("alert subscription closed")?;
            self.seen.push(decode(&msg.payload)?);
        }
    }
}

/// The License Monitor view, fetched from the broker.
pub async fn status(client: &async_nats::Client, cluster: &str) -> anyhow::Result<StatusReply> {
    lmbus_ops::fetch_status(client, &Subjects::new(cluster)?, Duration::from_secs(5))
        .await
        .map_err(Into::into)
}

/// Waits (bounded) until the master reports `n` seats in use.
pub async fn wait_in_use(client: &async_nats::Client, cluster: &str, n: u32) -> anyhow::Result<()> {
    eventually(&format!("{n} seats in use"), || async move {
        status(client, cluster)
            .await
            .is_ok_and(|st| st.total_in_use == n)
    })
    .await
}
