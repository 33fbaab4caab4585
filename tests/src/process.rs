//! Child processes in tests: the workspace's built binaries, a child killed on drop that
//! tests can signal (SIGSTOP, SIGKILL), its output, and its CPU time for the benches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

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
