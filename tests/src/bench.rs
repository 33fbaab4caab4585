//! What every bench shares: the runtime it runs on, the number of trials it is asked for, a
//! slave's request as the simulated slaves of the scale and churn benches send it, and a
//! process's resident memory.

use std::time::Duration;

use anyhow::Context as _;
use lmbus_schemas::{Reply, decode};

/// The runtime of a bench: two worker threads, as many as the machine the numbers in
/// `BENCHMARKS.md` come from.
#[allow(clippy::expect_used)]
pub fn bench_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build the bench's tokio runtime")
}

/// `LMBUS_BENCH_TRIALS`, or 20 when it is unset or not a number.
pub fn bench_trials() -> usize {
    std::env::var("LMBUS_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// The requests of simulated slaves over one NATS connection, answered on each slave's own
/// inbox (`Subjects::slave_inbox_prefix`: the broker answers nowhere else): one
/// subscription to every slave's inbox of the cluster, and the answers handed to whoever
/// waits for them. Answers nobody waits for (heartbeats') are dropped.
#[derive(Debug, Clone)]
pub struct Requester {
    client: async_nats::Client,
    subjects: lmbus_schemas::Subjects,
    pending: std::sync::Arc<
        std::sync::Mutex<
            std::collections::HashMap<String, tokio::sync::oneshot::Sender<bytes::Bytes>>,
        >,
    >,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Requester {
    pub async fn new(
        client: async_nats::Client,
        subjects: &lmbus_schemas::Subjects,
    ) -> anyhow::Result<Requester> {
        use futures::StreamExt as _;
        // Every slave's inbox (see `Subjects::slave_inbox_prefix`).
        let all = format!("_INBOX.lmbus.{}.>", subjects.cluster());
        let mut sub = client.subscribe(all).await?;
        let requester = Requester {
            client,
            subjects: subjects.clone(),
            pending: Default::default(),
            next: Default::default(),
        };
        let pending = requester.pending.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let waiter = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(msg.subject.as_str());
                if let Some(waiter) = waiter {
                    let _ = waiter.send(msg.payload);
                }
            }
        });
        Ok(requester)
    }

    /// A fresh reply subject under `slave`'s inbox.
    fn reply_for(&self, slave: &lmbus_schemas::SlaveId) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}.{n}", self.subjects.slave_inbox_prefix(slave))
    }

    /// One request of `slave` and its decoded answer, within 30 s.
    pub async fn ask(
        &self,
        slave: &lmbus_schemas::SlaveId,
        op: lmbus_schemas::SlaveOp,
        payload: Vec<u8>,
    ) -> anyhow::Result<Reply> {
        let reply = self.reply_for(slave);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(reply.clone(), tx);
        let subject = self.subjects.slave_op(slave, op);
        let sent = self
            .client
            .publish_with_reply(subject, reply.clone(), payload.into())
            .await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .context("no answer within 30 s")
                .and_then(|r| r.context("the answer was lost")),
            Err(e) => Err(e.into()),
        };
        if answer.is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&reply);
        }
        Ok(decode::<Reply>(&answer?)?)
    }

    /// Publishes a request of `slave` whose answer nobody waits for (a heartbeat).
    pub async fn tell(
        &self,
        slave: &lmbus_schemas::SlaveId,
        op: lmbus_schemas::SlaveOp,
        payload: Vec<u8>,
    ) -> anyhow::Result<()> {
        let reply = self.reply_for(slave);
        let subject = self.subjects.slave_op(slave, op);
        self.client
            .publish_with_reply(subject, reply, payload.into())
            .await?;
        Ok(())
    }
}

/// Resident memory of process `pid` in MiB (0 when it cannot be read).
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `lmbus-broker run` as every bench starts it: on `nats`, `cluster`, with `license` and the
/// vendor's key, unlicensed slaves allowed, as replica `id`, and no rate limit per slave (a
/// bench is one client pushing as hard as it can, not a rogue slave). The caller adds its
/// own flags and output.
pub fn broker_command(
    nats: &crate::NatsServer,
    cluster: &str,
    license: &std::path::Path,
    vendor: &crate::Vendor,
    id: &str,
) -> anyhow::Result<std::process::Command> {
    let mut cmd = std::process::Command::new(crate::bin("lmbus-broker")?);
    cmd.args(["run", "--nats", &nats.url(), "--cluster", cluster])
        .arg("--license")
        .arg(license)
        .arg("--vendor-key")
        .arg(vendor.public_key_path())
        .args(["--allow-unlicensed-slaves", "--id", id])
        .args(["--slave-rate-limit", "0"]);
    Ok(cmd)
}
