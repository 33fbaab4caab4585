//! The fixture most integration tests start from: a server, a vendor, a cluster, a client.

use std::path::Path;

use lmbus_schemas::StatusReply;

use crate::{
    AlertTap, Broker, NatsServer, Vendor, broker_config, cluster_name, init_tracing, status,
    wait_in_use,
};

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
