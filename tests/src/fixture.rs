//! The fixture most integration tests start from (a server, a vendor, a cluster, a client),
//! the tracing set-up, and the poller that checks the seat invariants on a fixture's
//! master throughout a test.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use lmbus_schemas::StatusReply;
use tokio::task::JoinHandle;

use crate::broker::{Broker, broker_config};
use crate::nats::NatsServer;
use crate::observe::{AlertTap, status, wait_in_use};
use crate::vendor::{Vendor, cluster_name};
use crate::wait::WAIT;

/// Sets up `tracing` output for a test run once (`RUST_LOG` controls it; default warn).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// What most integration tests start with: a nats-server, a vendor key, a fresh cluster
/// name and a client.
#[derive(Debug)]
pub struct Fixture {
    pub nats: NatsServer,
    pub vendor: Vendor,
    pub cluster: String,
    pub client: async_nats::Client,
}

impl Fixture {
    pub async fn new() -> anyhow::Result<Self> {
        init_tracing();
        let nats = NatsServer::start()?;
        let client = nats.client().await?;
        Ok(Self {
            nats,
            vendor: Vendor::new()?,
            cluster: cluster_name(),
            client,
        })
    }

    /// Starts an in-process broker with a master license of `total` seats and these type
    /// limits.
    pub async fn broker(
        &self,
        total: u32,
        types: &[(&str, u32)],
        allow_unlicensed: bool,
    ) -> anyhow::Result<Broker> {
        Broker::start(self.broker_settings(total, types, allow_unlicensed)?).await
    }

    /// The settings [`Fixture::broker`] starts a broker with, for a test that changes some
    /// (allotment mode, the reclaim margin) or starts the same broker again.
    pub fn broker_settings(
        &self,
        total: u32,
        types: &[(&str, u32)],
        allow_unlicensed: bool,
    ) -> anyhow::Result<lmbus_broker::BrokerConfig> {
        let license = self.vendor.master(total, types)?;
        Ok(broker_config(
            &self.nats,
            &self.cluster,
            license,
            &self.vendor,
            allow_unlicensed,
        ))
    }

    /// Settings for an unlicensed slave of this cluster.
    pub fn slave_config(&self, id: &str) -> anyhow::Result<lmbus_slave::SlaveConfig> {
        Ok(lmbus_slave::SlaveConfig::new(
            &self.nats.url(),
            &self.cluster,
            lmbus_schemas::SlaveId::new(id)?,
        ))
    }

    /// Settings for a slave with this license file (verified with the fixture's key).
    pub fn licensed_slave_config(
        &self,
        id: &str,
        license: &Path,
    ) -> anyhow::Result<lmbus_slave::SlaveConfig> {
        let mut cfg = self.slave_config(id)?;
        cfg.license = Some(Vendor::license_file(license)?);
        cfg.vendor_key = Some(self.vendor.public_key());
        Ok(cfg)
    }

    pub async fn alerts(&self) -> anyhow::Result<AlertTap> {
        AlertTap::new(&self.client, &self.cluster).await
    }

    /// A subscription to the cluster's usage reports (`report.usage`).
    pub async fn usage_reports(&self) -> anyhow::Result<async_nats::Subscriber> {
        let subject = lmbus_schemas::Subjects::new(&self.cluster)?.usage_report();
        Ok(self.client.subscribe(subject).await?)
    }

    pub async fn status(&self) -> anyhow::Result<StatusReply> {
        status(&self.client, &self.cluster).await
    }

    pub async fn wait_in_use(&self, n: u32) -> anyhow::Result<()> {
        wait_in_use(&self.client, &self.cluster, n).await
    }
}

/// Polls a master's status every 20 ms in the background and checks, every time, that
/// the total is within the limit and equals the sum over slaves (so no seat is counted
/// twice or lost from the books). In allotment mode the free seats allotted to slaves
/// count against the limits too, in total and per type, and the slaves' blocks add up to
/// the master's count of them.
#[derive(Debug)]
pub struct InvariantWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<Result<u32, String>>,
}

impl InvariantWatch {
    pub fn start(f: &Fixture) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (client, cluster, flag) = (f.client.clone(), f.cluster.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut max = 0;
            while !flag.load(Ordering::SeqCst) {
                if let Ok(st) = status(&client, &cluster).await {
                    if let Some(broken) = broken_invariant(&st) {
                        return Err(broken);
                    }
                    max = max.max(st.total_in_use + st.allotted_total);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(max)
        });
        Self { stop, task }
    }

    /// Stops polling; the highest total seen (seats in use plus allotted), or what broke.
    pub async fn finish(self) -> anyhow::Result<u32> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .context("invariant poller did not stop")??;
        result.map_err(|e| anyhow::anyhow!(e))
    }
}

/// What is wrong with a master's counts, if anything: seats held plus allotted above the
/// total or a type limit, or per-slave figures that do not add up to the totals.
pub fn broken_invariant(st: &StatusReply) -> Option<String> {
    let sum: u32 = st.slaves.iter().map(|s| s.in_use).sum();
    let allotted: u32 = st.slaves.iter().flat_map(|s| s.allotted.values()).sum();
    let counted = st.total_in_use + st.allotted_total;
    if sum != st.total_in_use || counted > st.total_limit {
        return Some(format!(
            "invariant broken: {} in use + {} allotted of limit {}, sum over slaves {sum}",
            st.total_in_use, st.allotted_total, st.total_limit
        ));
    }
    // The status lists at most `STATUS_MAX_SLAVES`; compare the blocks when all are there.
    if st.slaves.len() as u32 == st.slaves_total && allotted != st.allotted_total {
        return Some(format!(
            "invariant broken: the slaves' blocks add up to {allotted}, the master counts {} allotted",
            st.allotted_total
        ));
    }
    for (agent_type, limit) in &st.type_limits {
        let n = st.in_use_by_type.get(agent_type).copied().unwrap_or(0)
            + st.allotted_by_type.get(agent_type).copied().unwrap_or(0);
        if n > *limit {
            return Some(format!(
                "invariant broken: {n} '{agent_type}' seats in use or allotted, limit {limit}"
            ));
        }
    }
    None
}
