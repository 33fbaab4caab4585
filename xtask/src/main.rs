//! `cargo xtask`: the two commands the README starts with.
//!
//! - `cargo xtask demo`: the whole product on one machine, against a local NATS (started
//!   here if none answers), with a workload that goes over the limits and the alert tail.
//! - `cargo xtask test`: installs nats-server if needed, then fmt, clippy, the whole test
//!   suite and a short demo run. `.ci/run` calls exactly this.
//! - `cargo xtask bench-failover`: kill -9 trials of the leader broker on a 3-node NATS
//!   cluster; `cargo xtask bench-catchup`: a cold replica replaying 10^5 and 10^6 seats, or loading a snapshot of them.
//!   Both write their tables into `BENCHMARKS.md`.

mod demo;
mod nats;

use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "lmbus project commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a broker, three slaves, a workload over the limits and the alert tail.
    Demo(demo::DemoArgs),
    /// Install nats-server if needed, then fmt check, clippy, all tests and a short demo.
    Test {
        /// Skip the short demo run at the end.
        #[arg(long)]
        no_demo: bool,
    },
    /// Failover bench: kill -9 the leader broker N times under load (3-node NATS cluster,
    /// three broker processes) and report the time to the first approved registration;
    /// writes the table into BENCHMARKS.md.
    BenchFailover {
        #[arg(long, default_value_t = 20)]
        trials: usize,
    },
    /// Catch-up bench: a cold replica replays a ledger of N seats (default 10^5 and 10^6)
    /// on a real nats-server, or loads a snapshot of the same state; reading the ledger
    /// alone is the baseline. Writes into BENCHMARKS.md.
    BenchCatchup {
        /// Comma-separated seat counts.
        #[arg(long, default_value = "100000,1000000")]
        seats: String,
    },
    /// Fuzz the wire decoder, the license verifier and the admission engine with
    /// cargo-fuzz (libFuzzer; installed if missing), each target for a fixed time. Crashes
    /// land in fuzz/artifacts/<target>/ and fail the command.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run [default: all of decode, license, engine].
        targets: Vec<String>,
    },
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn step(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("\nxtask: == {name} ==");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn test(no_demo: bool) -> anyhow::Result<()> {
    let nats = nats::ensure_server()?;
    eprintln!("xtask: using nats-server at {}", nats.display());
    let nats_env = ("NATS_SERVER_BIN", nats.as_os_str().to_owned());
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "cargo build --bins",
        cargo().args(["build", "--workspace", "--bins"]),
    )?;
    step(
        "cargo test",
        cargo()
            .args(["test", "--workspace"])
            .env(nats_env.0, &nats_env.1),
    )?;
    if !no_demo {
        eprintln!("\nxtask: == demo (short, own nats-server) ==");
        demo::run(demo::DemoArgs {
            duration: Duration::from_secs(12),
            nats: None,
            own_nats: true,
            no_build: true,
        })?;
    }
    eprintln!("\nxtask: all checks passed");
    Ok(())
}

/// Builds release binaries and runs one bench target of `lmbus-tests` (`tests/benches/`);
/// returns its `BENCH` lines.
fn run_bench(name: &str, env: &[(&str, String)]) -> anyhow::Result<Vec<String>> {
    let nats = nats::ensure_server()?;
    step(
        "cargo build --release --bins",
        cargo().args(["build", "--release", "--workspace", "--bins"]),
    )?;
    eprintln!("\nxtask: == bench {name} ==");
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "lmbus-tests", "--bench", name])
        .env("NATS_SERVER_BIN", &nats)
        .stderr(std::process::Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().context("cannot run the bench")?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    print!("{stdout}");
    if !output.status.success() {
        bail!("the bench failed ({})", output.status);
    }
    let lines: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("BENCH "))
        .map(str::to_owned)
        .collect();
    if lines.is_empty() {
        bail!("the bench printed no BENCH line");
    }
    Ok(lines)
}

/// `key=value` from a BENCH line.
fn field(line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or("?")
        .to_owned()
}

/// Machine and date, for the tables' captions.
fn machine() -> String {
    let nats = nats::ensure_server()
        .ok()
        .and_then(|bin| Command::new(bin).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{date}, {cores} cores, {nats}")
}

/// Replaces (or appends) the section between `<!-- key -->` and `<!-- /key -->`.
fn write_section(key: &str, body: &str) -> anyhow::Result<()> {
    let (open, close) = (format!("<!-- {key} -->"), format!("<!-- /{key} -->"));
    let section = format!("{open}\n{body}{close}\n");
    let path = std::path::Path::new("BENCHMARKS.md");
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# lmbus benchmarks\n\nEvery table here is written by the command it names; rerun it to refresh. \
         The machine is shared and noisy: compare the ratios, which are measured within one run.\n\n"
            .to_owned()
    });
    let updated = match (current.find(&open), current.find(&close)) {
        (Some(a), Some(b)) if b > a => {
            let rest = current[b + close.len()..].trim_start_matches('\n');
            format!("{}{section}{rest}", &current[..a])
        }
        _ => format!("{current}{section}"),
    };
    std::fs::write(path, updated).context("cannot write BENCHMARKS.md")?;
    eprintln!("xtask: wrote the {key} table into BENCHMARKS.md");
    Ok(())
}

fn bench_failover(trials: usize) -> anyhow::Result<()> {
    let lines = run_bench("failover", &[("LMBUS_BENCH_TRIALS", trials.to_string())])?;
    let line = &lines[0];
    let all = line
        .split_once("all_ms=")
        .map(|(_, rest)| rest.split(" ledger_records").next().unwrap_or(""))
        .unwrap_or("?");
    let lease_ms = 1000.0;
    let ratio = |v: String| {
        v.parse::<f64>()
            .map(|ms| format!("{:.2}", ms / lease_ms))
            .unwrap_or_else(|_| "?".into())
    };
    let body = format!(
        "## Failover: kill -9 of the leader broker\n\n\
         `cargo xtask bench-failover --trials {trials}` on {}: a 3-node NATS cluster on loopback, three \
         `lmbus-broker` processes (release build, default `--lease 1s`), four slaves registering and \
         unregistering in a loop. Each trial kills the current leader with SIGKILL and measures the time \
         from the kill to the first approved registration sent after it; the killed replica is restarted \
         before the next trial. The baseline is the lease (1 s): no standby may take over before the \
         server drops the dead leader's lease.\n\n\
         | trials | median | worst | best | median / lease | worst / lease |\n\
         | --- | --- | --- | --- | --- | --- |\n\
         | {} | {} ms | {} ms | {} ms | {} | {} |\n\n\
         All trials (ms, sorted): {all}. The ledger audit passed afterwards ({} records).\n",
        machine(),
        field(line, "trials"),
        field(line, "median_ms"),
        field(line, "worst_ms"),
        field(line, "best_ms"),
        ratio(field(line, "median_ms")),
        ratio(field(line, "worst_ms")),
        field(line, "ledger_records"),
    );
    write_section("failover", &body)
}

fn bench_catchup(seats: &str) -> anyhow::Result<()> {
    let lines = run_bench("catch_up", &[("LMBUS_BENCH_SEATS", seats.to_owned())])?;
    let mut body = format!(
        "## Catch-up of a cold replica\n\n\
         `cargo xtask bench-catchup --seats {seats}` on {}: a ledger holding N seats (grants in entries \
         of 1,000 changes, one slave session per 100 seats) on a single nats-server. A cold replica \
         (a restarted broker; hot standbys have already applied everything) either replays the whole \
         ledger, or loads the latest snapshot of the same state (`--snapshot-every`; its chunks read \
         and applied) and then only the records after it, none here. Baseline: reading and decoding \
         the ledger without applying it, in the same run. The ledger here is the smallest one that \
         holds N seats; a real one also holds every past grant and release, which replay reads and \
         a snapshot does not. Copy: the pause the leader takes to copy its state for a snapshot; \
         write: storing it, in a task beside the leader.\n\n\
         | seats | read only | replay | snapshot load | replay / read | snapshot load / read | snapshot copy | snapshot write (chunks) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        machine()
    );
    for line in &lines {
        body.push_str(&format!(
            "| {} | {} ms | {} ms | {} ms | {} | {} | {} ms | {} ms ({}) |\n",
            field(line, "seats"),
            field(line, "read_ms"),
            field(line, "replay_ms"),
            field(line, "snapshot_load_ms"),
            field(line, "replay_ratio"),
            field(line, "snapshot_ratio"),
            field(line, "snapshot_copy_ms"),
            field(line, "snapshot_write_ms"),
            field(line, "chunks"),
        ));
    }
    body.push('\n');
    write_section("catchup", &body)
}

const FUZZ_TARGETS: [&str; 3] = ["decode", "license", "engine"];

/// cargo-fuzz needs nightly-only compiler flags; `RUSTC_BOOTSTRAP=1` lets the machine's one
/// (stable) toolchain accept them, and `--sanitizer none` keeps to what stable rustc
/// ships (safe Rust gains little from AddressSanitizer).
fn fuzz(seconds: u64, targets: Vec<String>) -> anyhow::Result<()> {
    let has_fuzz = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        step(
            "cargo install cargo-fuzz",
            cargo().args(["install", "cargo-fuzz", "--locked"]),
        )?;
    }
    let targets: Vec<String> = if targets.is_empty() {
        FUZZ_TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        targets
    };
    for target in &targets {
        if !FUZZ_TARGETS.contains(&target.as_str()) {
            bail!("unknown fuzz target {target}: one of {FUZZ_TARGETS:?}");
        }
        let corpus = format!("fuzz/corpus/{target}");
        std::fs::create_dir_all(&corpus).with_context(|| format!("cannot create {corpus}"))?;
        step(
            &format!("fuzzing {target} for {seconds} s"),
            cargo()
                .args(["fuzz", "run", "--sanitizer", "none", target, &corpus])
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .env("RUSTC_BOOTSTRAP", "1"),
        )
        .with_context(|| format!("see fuzz/artifacts/{target}/ for the input"))?;
    }
    eprintln!("xtask: fuzzed {targets:?} for {seconds} s each, no crash");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Demo(args) => demo::run(args),
        Cmd::Test { no_demo } => test(no_demo),
        Cmd::BenchFailover { trials } => bench_failover(trials),
        Cmd::BenchCatchup { seats } => bench_catchup(&seats),
        Cmd::Fuzz { seconds, targets } => fuzz(seconds, targets),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
