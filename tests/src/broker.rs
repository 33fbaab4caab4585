//! A broker running inside the test process, with the settings tests use.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use lmbus_broker::BrokerConfig;
use lmbus_schemas::Subjects;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::nats::NatsServer;
use crate::vendor::Vendor;
use crate::wait::WAIT;

/// Broker settings for tests: fast ticks, counts alert rarely.
pub fn broker_config(
    nats: &NatsServer,
    cluster: &str,
    license: PathBuf,
    vendor: &Vendor,
    allow_unlicensed: bool,
) -> BrokerConfig {
    broker_config_at(nats.url(), cluster, license, vendor, allow_unlicensed)
}

/// Like `broker_config`, for the NATS at `nats_url` (a cluster's URLs, comma-separated).
pub fn broker_config_at(
    nats_url: String,
    cluster: &str,
    license: PathBuf,
    vendor: &Vendor,
    allow_unlicensed: bool,
) -> BrokerConfig {
    BrokerConfig {
        nats_url,
        cluster: cluster.to_owned(),
        license_path: license,
        vendor_key: vendor.public_key(),
        allow_unlicensed_slaves: allow_unlicensed,
        broker_id: "test-broker".into(),
        missed_heartbeats: 3,
        tick_interval: Duration::from_millis(100),
        counts_interval: Duration::from_secs(3600),
        expiry_warning_days: 30,
        max_slaves: 1000,
        reclaim_margin: lmbus_broker::config::DEFAULT_RECLAIM_MARGIN,
        forget_after: lmbus_broker::config::DEFAULT_FORGET_AFTER,
        priority: 1,
        lease: lmbus_broker::config::DEFAULT_LEASE,
        stream_replicas: 1,
        nats_auth: Default::default(),
        slave_rate_limit: lmbus_broker::config::DEFAULT_SLAVE_RATE_LIMIT,
        max_agents_per_slave: 0,
        metrics: None,
        alert_max_age: lmbus_broker::alert_log::DEFAULT_MAX_AGE,
        alert_max_bytes: lmbus_broker::alert_log::DEFAULT_MAX_BYTES,
        snapshot_every: lmbus_broker::config::DEFAULT_SNAPSHOT_EVERY,
        ledger_trim: false,
        fault_ignore_lease: false,
        wall_clock: Default::default(),
        // Tests sync when they say so (a test of the schedule sets it).
        sync_every: Duration::ZERO,
        vendor_nats: None,
        allot: Default::default(),
        report: lmbus_broker::report::ReportConfig::default(),
        production_cluster: None,
        handback_window: lmbus_broker::config::DEFAULT_HANDBACK_WINDOW,
    }
}

/// Allotment mode (`--admission allotment`) with this refresh interval and lease; tests
/// use shorter ones than the defaults so that capacity moves within a few seconds.
pub fn allotment(refresh: Duration, lease: Duration) -> lmbus_broker::engine::AllotConfig {
    lmbus_broker::engine::AllotConfig {
        admission: lmbus_schemas::Admission::Allotment,
        lease,
        refresh,
    }
}

/// A broker running in this process (as a tokio task), stopped on [`Broker::stop`].
#[derive(Debug)]
pub struct Broker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Broker {
    /// Starts `lmbus_broker::run` and waits until it answers status requests.
    pub async fn start(cfg: BrokerConfig) -> anyhow::Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let client = lmbus_nats::connect(
            &cfg.nats_url,
            async_nats::ConnectOptions::new(),
            &cfg.nats_auth,
        )
        .await?;
        let subjects = Subjects::new(&cfg.cluster)?;
        let task = tokio::spawn(lmbus_broker::run(cfg, async move {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + WAIT;
        loop {
            if task.is_finished() {
                return match task.await {
                    Ok(Ok(())) => bail!("broker exited at once"),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                };
            }
            if lmbus_ops::fetch_status(&client, &subjects, Duration::from_millis(300))
                .await
                .is_ok()
            {
                return Ok(Self {
                    stop: Some(stop),
                    task,
                });
            }
            if Instant::now() > deadline {
                bail!("broker did not answer status within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .context("broker did not stop in time")??
    }
}
