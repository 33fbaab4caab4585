//! Real `nats-server` processes for tests: the binary to run, free ports, the reference
//! configuration of `deploy/`, one server or an n-node cluster with JetStream, each with its
//! own temp store dir and killed on drop.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::wait::WAIT;

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
    // Leaf nodes on a free port, not the standard one every test would share.
    text.replace(
        "listen: \"0.0.0.0:7422\"",
        &format!("listen: \"127.0.0.1:{}\"", free_port()),
    )
}

/// `deploy/leafnode-site.conf` for `site` of `cluster`: "acme" and "site1" renamed, its
/// remote pointed at `hub_leaf_urls` (host:port each) with the test password, the site
/// slave's password `"pw-<site>"` (for its local user and the link), and no fixed client
/// port (the harness gives one).
pub fn reference_leaf_config(cluster: &str, site: &str, hub_leaf_urls: &[String]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/leafnode-site.conf");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .replace("acme", cluster)
        .replace("site1", site)
        .replace("port: 4222\n", "")
        .replace("$LMBUS_SITE1_PASSWORD", &format!("\"pw-{site}\""));
    let remotes: Vec<String> = hub_leaf_urls
        .iter()
        .map(|hostport| format!("        \"nats-leaf://{site}:pw-{site}@{hostport}\""))
        .collect();
    let start = text
        .find("      urls: [\n")
        .map(|i| i + "      urls: [\n".len());
    let end = text.find("      ]\n    }\n  ]");
    match (start, end) {
        (Some(start), Some(end)) => {
            format!("{}{}\n{}", &text[..start], remotes.join("\n"), &text[end..])
        }
        _ => text,
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// A real nats-server with JetStream, on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
    /// The config file (`-c`) it was started with, if any, kept for restarts.
    config: Option<PathBuf>,
    /// Started with JetStream (every server but a site's leaf server).
    jetstream: bool,
}

impl NatsServer {
    fn spawn(
        port: &str,
        store: &Path,
        ports_dir: Option<&Path>,
        config: Option<&Path>,
        jetstream: bool,
    ) -> anyhow::Result<Child> {
        let bin = nats_server_bin();
        let mut cmd = Command::new(&bin);
        if let Some(config) = config {
            cmd.arg("-c").arg(config);
        }
        cmd.args(["-a", "127.0.0.1", "-p", port]);
        if jetstream {
            cmd.arg("-js");
        }
        cmd.arg("-sd")
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
        Self::start_configured(None, true)
    }

    /// Starts a server with this configuration file text (authorization, TLS…); the
    /// address, port, JetStream and store flags still come from the command line. Paths
    /// in the text are used as written.
    pub fn start_with_config(text: &str) -> anyhow::Result<Self> {
        Self::start_configured(Some(text), true)
    }

    /// A site's leaf server: this configuration, without JetStream.
    pub fn start_leaf(text: &str) -> anyhow::Result<Self> {
        Self::start_configured(Some(text), false)
    }

    fn start_configured(text: Option<&str>, jetstream: bool) -> anyhow::Result<Self> {
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
            jetstream,
        )?;
        match Self::reported_port(&mut child, ports_dir.path()) {
            Ok(port) => Ok(Self {
                child,
                port,
                _store: store,
                config,
                jetstream,
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
                self.jetstream,
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
    /// Each node's config file (`-c`), when started with one.
    configs: Vec<Option<PathBuf>>,
    /// The user and password the readiness check logs in with, on a cluster that
    /// requires one.
    ready_auth: Option<(String, String)>,
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
        let mut cmd = Command::new(&bin);
        if let Some(Some(config)) = self.configs.get(i) {
            cmd.arg("-c").arg(config);
        }
        cmd.args(["-a", "127.0.0.1", "-p", &self.ports[i].to_string(), "-js"])
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
        Self::start_configured(n, |_| None, None)
    }

    /// Like `start`, each node `i` with the config file text `config(i)` if any
    /// (authorization, leaf nodes…; its address, ports, routes and JetStream still come from
    /// the command line), and the readiness check logged in as `ready_auth`.
    pub fn start_configured(
        n: usize,
        config: impl Fn(usize) -> Option<String>,
        ready_auth: Option<(String, String)>,
    ) -> anyhow::Result<Self> {
        let mut last_error = anyhow::anyhow!("not tried");
        for _ in 0..3 {
            let stores: Vec<tempfile::TempDir> = (0..n)
                .map(|_| tempfile::tempdir())
                .collect::<Result<_, _>>()?;
            let mut configs = Vec::new();
            for (i, store) in stores.iter().enumerate() {
                configs.push(match config(i) {
                    Some(text) => {
                        let path = store.path().join("nats-server.conf");
                        std::fs::write(&path, text)?;
                        Some(path)
                    }
                    None => None,
                });
            }
            let mut cluster = Self {
                nodes: Vec::new(),
                ports: (0..n).map(|_| free_port()).collect(),
                cluster_ports: (0..n).map(|_| free_port()).collect(),
                stores,
                configs,
                ready_auth: ready_auth.clone(),
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
            let mut options = async_nats::ConnectOptions::new();
            if let Some((user, password)) = &self.ready_auth {
                options = options.user_and_password(user.clone(), password.clone());
            }
            let client = options.connect(lmbus_nats::nats_urls(&url)).await?;
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

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].as_ref().map(|c| c.id())
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops every node the way an operator's restart of the whole NATS cluster does: SIGTERM
    /// to all at once, so that each shuts down cleanly (nats-server writes out its stores and
    /// raft logs), then waits for each to exit (SIGKILL after 10 s).
    ///
    /// Not SIGKILL for all: once in CI (nats-server 2.9.10), every node killed within a
    /// millisecond while ledger appends were in flight left a ledger in which a replica's
    /// record followed the previous leader's records without its own `Leader` record: the
    /// stream's history after recovery was not the one whose acknowledgement the new leader
    /// had. The fence is checked by JetStream itself, so no client-side check can hold when
    /// JetStream's own recovery disagrees with what it acknowledged (ARCHITECTURE.md, "What
    /// the ledger relies on"). A single node killed is tested elsewhere (`node_loss`).
    pub fn stop_all(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for child in self.nodes.iter().flatten() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for slot in self.nodes.iter_mut() {
            if let Some(mut child) = slot.take() {
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
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
