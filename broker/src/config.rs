//! Broker settings, resolved from flags, environment variables and an optional TOML
//! config file, in that order of precedence (the file is applied as flags by
//! `lmbus_nats::config_file`, before these checks).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use lmbus_schemas::{License, Role, VerifyingKey, parse_public_key, verify_license};
use time::Date;

/// Everything `run` needs, already validated.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// How this replica authenticates to NATS (credentials, TLS).
    pub nats_auth: lmbus_nats::NatsAuth,
    /// Cluster name: the `<cluster>` token of every subject.
    pub cluster: String,
    /// The master license file.
    pub license_path: PathBuf,
    /// The vendor's public key, to verify the master and slave licenses.
    pub vendor_key: VerifyingKey,
    pub allow_unlicensed_slaves: bool,
    /// This replica's id (alerts' `source`, status).
    pub broker_id: String,
    /// Missed heartbeat intervals before a slave is marked disconnected.
    pub missed_heartbeats: u32,
    /// How often housekeeping runs (silence checks, counts, expiry).
    pub tick_interval: Duration,
    /// How often a `license_counts` alert goes out.
    pub counts_interval: Duration,
    /// Warn this many days before the master license expires.
    pub expiry_warning_days: i64,
    /// Bound on the number of slaves tracked.
    pub max_slaves: usize,
    /// Added to a silent slave's grace period before its seats are reclaimed.
    pub reclaim_margin: Duration,
    /// A slave silent this long with no seats is forgotten; zero: never.
    pub forget_after: Duration,
    /// Election preference, 1 = most preferred (like the first SERVER line of FLEXlm).
    pub priority: u32,
    /// How long the leader lease lives on the server without a renewal. Every replica of
    /// a cluster must use the same value.
    pub lease: Duration,
    /// Copies JetStream keeps of the ledger and the election state (3 on a 3-node NATS
    /// cluster; 1 on a single server).
    pub stream_replicas: usize,
    /// Registrations per second one slave may send (burst: twice that); 0 = no limit.
    pub slave_rate_limit: u32,
    /// Most seats one slave may hold; 0 = no cap beyond the license limits.
    pub max_agents_per_slave: u32,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None`: not served.
    pub metrics: Option<std::net::SocketAddr>,
    /// How long, and how many bytes of, alerts the alert stream keeps (when it creates it).
    pub alert_max_age: Duration,
    pub alert_max_bytes: i64,
    /// The leader writes a snapshot of the seat state every this many ledger records
    /// (0: never), so a replica that starts reads the snapshot and the records after it.
    pub snapshot_every: u64,
    /// After each snapshot, delete the ledger records older than the previous snapshot
    /// (bounds the stream's size; the deleted history is gone from the audit trail).
    pub ledger_trim: bool,
    /// Fault injection for tests only: keep acting as leader after the lease is lost, so
    /// that the ledger's fencing is the only thing that stops a deposed leader.
    pub fault_ignore_lease: bool,
    /// The vendor's NATS as a second connection (its URL and credentials) for vendor sync;
    /// `None`: sync requests go out on the main connection (a leaf node of the customer's
    /// NATS carries them to the vendor's).
    pub vendor_nats: Option<(String, lmbus_nats::NatsAuth)>,
    /// How often the leader syncs with the vendor by itself, counted from the last sync in
    /// the ledger (`--sync-every`, default a day), when the master license has an offline
    /// limit; zero: only on `admin sync now`.
    pub sync_every: Duration,
    /// The wall clock the engine decides the offline limit by (and records grants with):
    /// the system's, shifted only by tests (`WallClock::jump`, the hidden
    /// `--fault-clock-skew-days`).
    pub wall_clock: WallClock,
    /// Usage reports: the time of day, the directory, the mail.
    pub report: crate::report::ReportConfig,
    /// Strict or allotment admission (`--admission`), with the allotments' lease and
    /// refresh interval.
    pub allot: crate::engine::AllotConfig,
    /// A backup master: the production cluster it backs, whose leader it watches
    /// (`--production-cluster`); required with a backup master license that names none
    /// (`License::production_cluster`, which wins and which this must match), refused otherwise.
    pub production_cluster: Option<String>,
    /// A backup master: how long production must have been available again before the
    /// backup releases every seat it holds (`--handback-window`).
    pub handback_window: Duration,
}

/// The wall clock handed to the engine: the system clock plus a skew that is zero except
/// in tests, which jump it forward to reach the offline limit's dates without waiting
/// (`jump`, shared by every clone: a test keeps one and the broker another). It only moves
/// forward (a sync counts from the vendor's answer time when that is earlier, so a clock
/// set ahead buys no time). Besides the offline
/// limit, only the "since" a grant records reads it; the lease, the timing rule, alert
/// times and report periods read the system clocks.
#[derive(Debug, Clone, Default)]
pub struct WallClock {
    ahead_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl WallClock {
    /// The system clock `days` ahead (the hidden `--fault-clock-skew-days`).
    pub fn ahead_by_days(days: u32) -> Self {
        let clock = Self::default();
        clock.jump(Duration::from_secs(u64::from(days) * 86_400));
        clock
    }

    /// Moves this clock (and every clone of it) forward by `by`.
    pub fn jump(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let ahead = &self.ahead_ms;
        let _ = ahead.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |old| Some(old.saturating_add(ms)),
        );
    }

    /// Now, in Unix milliseconds (0 before 1970).
    pub fn unix_ms(&self) -> u64 {
        let system = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        u64::try_from(system)
            .unwrap_or(0)
            .saturating_add(self.ahead_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The vendor sync schedule's default: once a day.
pub const DEFAULT_SYNC_EVERY: Duration = Duration::from_secs(86_400);

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 3;

/// A backup master's default handback window: production available again this long, and
/// the backup releases every seat it holds (LumenVox's two minutes offline, mirrored).
pub const DEFAULT_HANDBACK_WINDOW: Duration = Duration::from_secs(120);
pub const DEFAULT_TICK_INTERVAL: Duration = Duration::from_millis(500);
pub const DEFAULT_COUNTS_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_EXPIRY_WARNING_DAYS: i64 = 30;
pub const DEFAULT_MAX_SLAVES: usize = 100_000;
/// Covers the default slave's longest request (2 s timeout plus its 30 s election wait),
/// 1% drift of the default 2-minute grace period (1.2 s) and tick granularity.
pub const DEFAULT_RECLAIM_MARGIN: Duration = Duration::from_secs(40);
/// A slave silent this long with no seats (it crashed after its seats were reclaimed, or
/// failed before it held any) is forgotten: an hour, so a slave that is only restarting
/// or briefly cut off keeps its row, and a dead one does not stay a ghost for good.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(3600);
pub const DEFAULT_PRIORITY: u32 = 1;
/// Failover budget: a dead leader's lease is gone after at most this long, and a standby
/// takes over within one poll after that (see `election`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(1);
pub const DEFAULT_STREAM_REPLICAS: usize = 1;
/// Far above what a site's agents do (a shift of 10,000 agents logging in within 10 s),
/// low enough that one flooding slave cannot monopolize the leader.
pub const DEFAULT_SLAVE_RATE_LIMIT: u32 = 1000;
/// A cold replica reads at most this many records after the latest snapshot.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 50_000;

/// The allotment timing rule: a slave renews its blocks every refresh interval and admits
/// from them until the lease runs out, so the lease must cover at least this many refresh
/// intervals for a request that is lost or slow not to stop local decisions.
pub const ALLOT_LEASE_REFRESHES: u32 = 3;

/// `--admission`: `strict` or `allotment`.
pub fn parse_admission(text: &str) -> anyhow::Result<lmbus_schemas::Admission> {
    match text {
        "strict" => Ok(lmbus_schemas::Admission::Strict),
        "allotment" => Ok(lmbus_schemas::Admission::Allotment),
        other => bail!(
            "--admission must be 'strict' (every registration decided by the master) or 'allotment' (slaves admit from blocks of seats), not '{}'",
            lmbus_schemas::printable(other)
        ),
    }
}

/// Checks the allotment settings against the timing rule.
pub fn check_allot(allot: &crate::engine::AllotConfig) -> anyhow::Result<()> {
    if allot.refresh.is_zero() {
        bail!("--allot-refresh must be more than 0");
    }
    if allot.lease < allot.refresh * ALLOT_LEASE_REFRESHES {
        bail!(
            "--allot-lease ({} ms) must be at least {ALLOT_LEASE_REFRESHES} times --allot-refresh ({} ms), so that one lost or slow refresh does not stop the slaves' local decisions",
            allot.lease.as_millis(),
            allot.refresh.as_millis()
        );
    }
    Ok(())
}

/// Reads the vendor's public key file.
pub fn load_vendor_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read vendor public key file {}", path.display()))?;
    parse_public_key(&text).with_context(|| format!("vendor key file {}", path.display()))
}

/// Reads and checks the master license: signature, dates and role. Any failure is an
/// error that names the file and says what to do.
pub fn load_master_license(
    path: &Path,
    key: &VerifyingKey,
    today: Date,
) -> anyhow::Result<License> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read license file {name}"))?;
    let text = lmbus_schemas::license_text(bytes, &name)?;
    let license = verify_license(&text, &name, key)?;
    license.check_dates(today, &name)?;
    license.require_role(Role::Master, &name)?;
    Ok(license)
}

pub fn check(cfg: &BrokerConfig) -> anyhow::Result<()> {
    if cfg.missed_heartbeats == 0 {
        bail!("--missed-heartbeats must be at least 1");
    }
    if cfg.tick_interval.is_zero() || cfg.counts_interval.is_zero() {
        bail!("--tick-interval and --counts-interval must be greater than zero");
    }
    if cfg.reclaim_margin <= cfg.tick_interval {
        bail!(
            "--reclaim-margin ({:?}) must be longer than --tick-interval ({:?}): the master checks for silent slaves once per tick",
            cfg.reclaim_margin,
            cfg.tick_interval
        );
    }
    if cfg.alert_max_age.is_zero() {
        bail!(
            "--alert-max-age must be greater than zero: the alert stream would keep nothing (the default is 30 days)"
        );
    }
    if cfg.max_slaves == 0 {
        bail!("--max-slaves must be at least 1");
    }
    if cfg.priority == 0 {
        bail!("--priority must be at least 1 (1 is the most preferred replica)");
    }
    if cfg.lease < Duration::from_millis(200) || cfg.lease > Duration::from_secs(60) {
        bail!(
            "--lease must be between 200ms and 60s, got {}",
            lmbus_schemas::human::duration(cfg.lease)
        );
    }
    if !(1..=5).contains(&cfg.stream_replicas) {
        bail!(
            "--stream-replicas must be 1 to 5 (JetStream's limit), got {}",
            cfg.stream_replicas
        );
    }
    Ok(())
}
