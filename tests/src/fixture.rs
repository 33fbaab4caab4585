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
        let license = self.vendor.master(total, types)?;
        Broker::start(broker_config(
            &self.nats,
            &self.cluster,
            license,
            &self.vendor,
            allow_unlicensed,
        ))
        .await
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
/// twice or lost from the books).
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
                    let sum: u32 = st.slaves.iter().map(|s| s.in_use).sum();
                    if sum != st.total_in_use || st.total_in_use > st.total_limit {
                        return Err(format!(
                            "invariant broken: total {} of limit {}, sum over slaves {sum}",
                            st.total_in_use, st.total_limit
                        ));
                    }
                    max = max.max(st.total_in_use);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(max)
        });
        Self { stop, task }
    }

    /// Stops polling; the highest total seen, or what broke.
    pub async fn finish(self) -> anyhow::Result<u32> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .context("invariant poller did not stop")??;
        result.map_err(|e| anyhow::anyhow!(e))
    }
}
