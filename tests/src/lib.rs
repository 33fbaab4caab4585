//! The integration-test harness: real `nats-server` processes on free ports with temp
//! store dirs (killed on `Drop`), a vendor key with license builders, an in-process broker
//! handle, and paths to the built binaries for tests that run real processes.
//!
//! Nothing here mocks NATS. Every wait is bounded.

pub mod catch_up;
pub mod daemon;
pub mod ha;
pub mod jwt;

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use lmbus_broker::BrokerConfig;
use lmbus_schemas::{
    Alert, Context, License, Limits, Role, StatusReply, Subjects, VendorKey, VerifyingKey, decode,
    public_key_text, sign_license,
};
use time::macros::date;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

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

/// The nats-server binary: `NATS_SERVER_BIN`, else `nats-server` on PATH, else Debian's
/// `/usr/sbin/nats-server`.
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("/usr/sbin/nats-server")
}

/// `deploy/nats-server.conf` for `cluster`: "acme" renamed, each `$LMBUS_<USER>_PASSWORD`
/// replaced by `"pw-<user>"`, and no store directory (the harness gives one on the command
/// line).
pub fn reference_config(cluster: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats-server.conf");
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .replace("acme", cluster)
        .replace("  store_dir: \"/var/lib/nats/jetstream\"\n", "");
    for who in ["BROKER", "MONITOR", "OPERATOR", "SITE1", "SITE2"] {
        text = text.replace(
            &format!("$LMBUS_{who}_PASSWORD"),
            &format!("\"pw-{}\"", who.to_lowercase()),
        );
    }
    text
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Clock ticks (USER_HZ, 100 a second) of user and system CPU process `pid` has used so
/// far, from `/proc/<pid>/stat`; 0 when it cannot be read. For the benches.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed:
    // utime and stime (fields 14 and 15) are the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// A real nats-server with JetStream, on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
    /// The config file (`-c`) it was started with, if any, kept for restarts.
    config: Option<PathBuf>,
}

impl NatsServer {
    fn spawn(
        port: &str,
        store: &Path,
        ports_dir: Option<&Path>,
        config: Option<&Path>,
    ) -> anyhow::Result<Child> {
        let bin = nats_server_bin();
        let mut cmd = Command::new(&bin);
        if let Some(config) = config {
            cmd.arg("-c").arg(config);
        }
        cmd.args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(dir) = ports_dir {
            cmd.arg("--ports_file_dir").arg(dir);
        }
        cmd.spawn().with_context(|| {
            format!(
                "cannot start {}: install nats-server or set NATS_SERVER_BIN (cargo xtask test does this)",
                bin.display()
            )
        })
    }

    /// Waits until the port accepts connections while `child` is still running (so the
    /// listener is ours, not another test's server); `false` if the process exited first
    /// or 10 s passed.
    fn wait_up(child: &mut Child, port: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                std::thread::sleep(Duration::from_millis(20));
                return matches!(child.try_wait(), Ok(None));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The client port a server started with `-p -1` chose, from the ports file it writes
    /// once every listener is up.
    fn reported_port(child: &mut Child, ports_dir: &Path) -> anyhow::Result<u16> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("nats-server exited at start ({status})");
            }
            for entry in std::fs::read_dir(ports_dir)?.flatten() {
                if entry.path().extension().is_some_and(|e| e == "ports") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let ports: serde_json::Value = match serde_json::from_str(&text) {
                        Ok(v) => v,
                        Err(_) => continue, // still being written
                    };
                    let url = ports["nats"][0].as_str().unwrap_or_default();
                    if let Some(port) = url.rsplit(':').next().and_then(|p| p.parse().ok()) {
                        return Ok(port);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("nats-server wrote no ports file within 10 s")
    }

    /// Starts a server on a port it picks itself (`-p -1`), so parallel tests never race
    /// for a port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_configured(None)
    }

    /// Starts a server with this configuration file text (authorization, TLS…); the
    /// address, port, JetStream and store flags still come from the command line. Paths
    /// in the text are used as written.
    pub fn start_with_config(text: &str) -> anyhow::Result<Self> {
        Self::start_configured(Some(text))
    }

    fn start_configured(text: Option<&str>) -> anyhow::Result<Self> {
        let store = tempfile::tempdir()?;
        let ports_dir = tempfile::tempdir()?;
        let config = match text {
            Some(text) => {
                let path = store.path().join("nats-server.conf");
                std::fs::write(&path, text)?;
                Some(path)
            }
            None => None,
        };
        let mut child = Self::spawn(
            "-1",
            store.path(),
            Some(ports_dir.path()),
            config.as_deref(),
        )?;
        match Self::reported_port(&mut child, ports_dir.path()) {
            Ok(port) => Ok(Self {
                child,
                port,
                _store: store,
                config,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store, as an
    /// operator restarting it would.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + WAIT;
        loop {
            let mut child = Self::spawn(
                &self.port.to_string(),
                self._store.path(),
                None,
                self.config.as_deref(),
            )?;
            if Self::wait_up(&mut child, self.port) {
                self.child = child;
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            if Instant::now() > deadline {
                bail!("nats-server did not come back on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server for good (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's process id (for CPU accounting in benches).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("cannot connect to the test nats-server at {}", self.url()))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 3-node (or n-node) nats-server cluster with clustered JetStream, on free loopback
/// ports, each node with its own store dir; killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Option<Child>>,
    ports: Vec<u16>,
    cluster_ports: Vec<u16>,
    stores: Vec<tempfile::TempDir>,
}

impl NatsCluster {
    fn spawn_node(&self, i: usize) -> anyhow::Result<Child> {
        let bin = nats_server_bin();
        let routes: Vec<String> = self
            .cluster_ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
            .collect();
        Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &self.ports[i].to_string(), "-js"])
            .arg("-sd")
            .arg(self.stores[i].path())
            .args([
                "--server_name",
                &format!("n{i}"),
                "--cluster_name",
                "lmbus-test",
            ])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.cluster_ports[i]),
            ])
            .args(["--routes", &routes.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))
    }

    /// Starts `n` nodes and waits until JetStream has a meta leader.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let mut last_error = anyhow::anyhow!("not tried");
        for _ in 0..3 {
            let mut cluster = Self {
                nodes: Vec::new(),
                ports: (0..n).map(|_| free_port()).collect(),
                cluster_ports: (0..n).map(|_| free_port()).collect(),
                stores: (0..n)
                    .map(|_| tempfile::tempdir())
                    .collect::<Result<_, _>>()?,
            };
            for i in 0..n {
                let child = cluster.spawn_node(i)?;
                cluster.nodes.push(Some(child));
            }
            match cluster.wait_ready() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_error = e,
            }
        }
        Err(last_error.context("the NATS cluster did not come up"))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if let Some(child) = self.nodes[i].as_mut() {
                if !NatsServer::wait_up(child, self.ports[i]) {
                    bail!("node n{i} did not start on port {}", self.ports[i]);
                }
            }
        }
        // JetStream answers once the cluster has elected its meta leader.
        let url = self.url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let client = async_nats::connect(lmbus_nats::nats_urls(&url)).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let info = client
                    .request("$JS.API.INFO", bytes::Bytes::new())
                    .await
                    .map(|m| String::from_utf8_lossy(&m.payload).to_string());
                match info {
                    Ok(text) if !text.contains("\"error\"") => return Ok(()),
                    _ if tokio::time::Instant::now() > deadline => {
                        bail!("JetStream did not become ready in the cluster: {info:?}")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })
    }

    /// Every node's client URL, comma-separated (what brokers and slaves are given).
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on the same ports and store.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let mut child = self.spawn_node(i)?;
        if !NatsServer::wait_up(&mut child, self.ports[i]) {
            bail!("node n{i} did not come back");
        }
        self.nodes[i] = Some(child);
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// A vendor key pair in a temp dir, with helpers to issue license files.
#[derive(Debug)]
pub struct Vendor {
    key: VendorKey,
    dir: tempfile::TempDir,
}

impl Vendor {
    pub fn new() -> anyhow::Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).context("no randomness for a vendor key")?;
        let vendor = Self {
            key: VendorKey::from_bytes(&seed),
            dir: tempfile::tempdir()?,
        };
        std::fs::write(
            vendor.public_key_path(),
            public_key_text(&vendor.key.verifying_key()),
        )?;
        Ok(vendor)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn public_key_path(&self) -> PathBuf {
        self.dir.path().join("vendor.pub")
    }

    /// A license valid from 2026-01-01 to 2099-12-31.
    pub fn license(role: Role, limits: Limits) -> License {
        License {
            id: uuid::Uuid::new_v4(),
            customer: "Test Customer".into(),
            issued: date!(2026 - 01 - 01),
            expires: date!(2099 - 12 - 31),
            maintenance_expires: date!(2099 - 12 - 31),
            role,
            context: Context::Production,
            limits,
        }
    }

    /// Signs `license` into `<dir>/<name>` and returns the path.
    pub fn write(&self, name: &str, license: &License) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, sign_license(license, &self.key)?)?;
        Ok(path)
    }

    /// A master license with `total` seats and the given type limits.
    pub fn master(&self, total: u32, types: &[(&str, u32)]) -> anyhow::Result<PathBuf> {
        let limits = Limits {
            total: Some(total),
            local: None,
            agent_types: types
                .iter()
                .map(|(t, n)| ((*t).to_owned(), *n))
                .collect::<BTreeMap<_, _>>(),
        };
        self.write(
            &format!("master-{}.lic", uuid::Uuid::new_v4().simple()),
            &Self::license(Role::Master, limits),
        )
    }

    /// A slave license with an optional local limit.
    pub fn slave(&self, local: Option<u32>) -> anyhow::Result<PathBuf> {
        let limits = Limits {
            local,
            ..Limits::default()
        };
        self.write(
            &format!("slave-{}.lic", uuid::Uuid::new_v4().simple()),
            &Self::license(Role::Slave, limits),
        )
    }

    pub fn license_file(path: &Path) -> anyhow::Result<lmbus_slave::LicenseFile> {
        Ok(lmbus_slave::LicenseFile {
            name: path.display().to_string(),
            text: std::fs::read_to_string(path)?,
        })
    }
}

/// A unique cluster name per test, so tests never see each other's traffic.
pub fn cluster_name() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Broker settings for tests: fast ticks, counts alert rarely.
pub fn broker_config(
    nats: &NatsServer,
    cluster: &str,
    license: PathBuf,
    vendor: &Vendor,
    allow_unlicensed: bool,
) -> BrokerConfig {
    BrokerConfig {
        nats_url: nats.url(),
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
        report: lmbus_broker::report::ReportConfig::default(),
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

/// Runs `cmd` to its end and returns its stdout; an error with its output when it fails.
pub fn stdout_of(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Path of a workspace binary (`lmbus-broker`, `lmbus-slave`, …). They are built by
/// `cargo build --workspace --bins`, which `cargo xtask test` runs first.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is not built: run `cargo build --workspace --bins` (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A child process killed (SIGKILL) on drop unless it has already exited.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        Ok(Self {
            child: cmd
                .spawn()
                .with_context(|| format!("cannot spawn {cmd:?}"))?,
        })
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
        nix::sys::signal::kill(self.pid(), sig)?;
        Ok(())
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub fn wait_timeout(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("process {} did not exit within {limit:?}", self.child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits (bounded) until `check` returns true.
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        if Instant::now() > deadline {
            bail!("{what}: not true within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
