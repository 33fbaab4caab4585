#![allow(clippy::unwrap_used)]
//! The churn bench (`cargo xtask bench churn`, or `cargo bench -p lmbus-tests --bench churn`
//! with `NATS_SERVER_BIN` set): what a steady churn of registrations costs the leader in
//! strict mode and in allotment mode, with many slaves. For each mode, on a fresh
//! nats-server with one leader broker (release build, `--slave-rate-limit 0`), this process
//! plays `LMBUS_CHURN_SLAVES` slaves (default 10,000), each with its own identity, session
//! and heartbeat every second, and runs `LMBUS_CHURN_RATE` operations a second over all of
//! them (default 1,000; registrations and releases alternate on each slave, one agent at a
//! time), as the protocol has it:
//!
//! - strict: each operation is a register or unregister request the leader decides and
//!   records;
//! - allotment: each operation is decided from the slave's block (an admission) or gives
//!   the seat back to it (a release), with no message; every slave sends an allot request
//!   every refresh interval (2 s, the default), carrying its journal and the free block it
//!   wants (2), as `lmbus-slave` does. A slave skips its operation while its request is in
//!   flight (counted), as a real one would wait for the answer before it uses the block.
//!
//! - allotment+greedy: allotment mode, where one slave (`s0`, with its own credentials, as
//!   a site that wants more seats would) asks for `u32::MAX` free seats in every allot
//!   request once the churn starts and ignores every request to give seats back: its
//!   demand always exceeds the pool, so every allot request that grows a block computes
//!   fair shares.
//!
//! `LMBUS_CHURN_MODES` picks the modes (default `strict,allotment,allotment+greedy`). Measured over
//! `LMBUS_CHURN_SECONDS` (default 10) after a 3 s warm-up: the leader's CPU
//! (percent of one core), ledger records and bytes a second (the stream's state), the
//! operations done, and the allot requests a second. Prints one `BENCH churn` line per mode.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt as _;
use lmbus_schemas::{
    AllotOp, AllotOpKind, AllotRequest, Decision, Heartbeat, Hello, RegisterRequest, Reply,
    SlaveId, SlaveOp, Subjects, UnregisterRequest, encode,
};
use lmbus_tests::bench::{Requester, broker_command};
use lmbus_tests::{NatsServer, Proc, Vendor, cluster_name, cpu_ticks};
use tokio::time::Instant;
use uuid::Uuid;

/// NATS connections the simulated slaves share.
const CONNECTIONS: usize = 4;
/// Requests in flight (hellos, strict operations, allot requests of one slice).
const IN_FLIGHT: usize = 64;
/// Slices of a second (heartbeats) and of a refresh interval (allot requests), as
/// independent slaves' timers spread.
const SLICES: usize = 20;
/// The allot refresh interval, the broker's default.
const REFRESH: Duration = Duration::from_secs(2);
/// The free block each slave wants.
const WANT: u32 = 2;
const TYPE: &str = "inbound";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let slaves = env_or("LMBUS_CHURN_SLAVES", 10_000) as usize;
    let rate = env_or("LMBUS_CHURN_RATE", 1_000);
    let seconds = env_or("LMBUS_CHURN_SECONDS", 10);
    let rt = lmbus_tests::bench::bench_runtime();
    // `LMBUS_CHURN_MODES`: any of `strict`, `allotment`, `allotment+greedy` (all by default).
    let modes = std::env::var("LMBUS_CHURN_MODES")
        .unwrap_or_else(|_| "strict,allotment,allotment+greedy".into());
    for (mode, allotment, greedy) in [
        ("strict", false, false),
        ("allotment", true, false),
        ("allotment+greedy", true, true),
    ] {
        if !modes.split(',').any(|m| m.trim() == mode) {
            continue;
        }
        if let Err(e) = rt.block_on(run(slaves, rate, seconds, allotment, greedy)) {
            eprintln!("churn {mode} failed: {e:#}");
            let reason = format!("{e:#}").replace(' ', "_");
            println!("BENCH churn mode={mode} slaves={slaves} rate={rate} failed={reason}");
        }
    }
}

/// One simulated slave.
struct Sim {
    id: SlaveId,
    instance: Uuid,
    /// The agent it holds, if any (one at a time).
    held: Option<String>,
    /// Agents taken so far (names the next one).
    taken: u64,
    /// Strict mode: the last request number.
    seq: u64,
    /// Allotment mode: free seats of its block, its journal not yet acknowledged, the last
    /// journal number and allot request number, and whether a request is in flight.
    free: u32,
    journal: Vec<AllotOp>,
    journal_n: u64,
    allot_seq: u64,
    asking: bool,
    /// Asks for `u32::MAX` seats once the churn starts (`allotment+greedy`).
    greedy: bool,
}

/// What the run counts.
#[derive(Default)]
struct Counts {
    ops: AtomicU64,
    skipped: AtomicU64,
    allots: AtomicU64,
    errors: AtomicU64,
}

fn spawn_broker(
    nats: &NatsServer,
    cluster: &str,
    license: &std::path::Path,
    vendor: &Vendor,
    slaves: usize,
    allotment: bool,
    log: &std::path::Path,
) -> anyhow::Result<Proc> {
    Proc::spawn(
        broker_command(nats, cluster, license, vendor, "b1")?
            .args(["--max-slaves", &(slaves + 10).to_string()])
            .args([
                "--admission",
                if allotment { "allotment" } else { "strict" },
            ])
            .env("LMBUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?),
    )
}

async fn ledger_state(js: &async_nats::jetstream::Context, stream: &str) -> (u64, u64) {
    match js.get_stream(stream).await {
        Ok(mut s) => match s.info().await {
            Ok(info) => (info.state.last_sequence, info.state.bytes),
            Err(_) => (0, 0),
        },
        Err(_) => (0, 0),
    }
}

/// Runs one mode; on failure, the tail of the broker's log goes to stderr with the error.
async fn run(
    n: usize,
    rate: u64,
    seconds: u64,
    allotment: bool,
    greedy: bool,
) -> anyhow::Result<()> {
    let logs = tempfile::tempdir()?;
    let result = run_in(n, rate, seconds, allotment, greedy, logs.path()).await;
    if result.is_err() {
        let text = std::fs::read_to_string(logs.path().join("b1.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- last lines of the broker's log ---");
        for line in &lines[lines.len().saturating_sub(15)..] {
            eprintln!("{line}");
        }
    }
    result
}

async fn run_in(
    n: usize,
    rate: u64,
    seconds: u64,
    allotment: bool,
    greedy: bool,
    logs: &std::path::Path,
) -> anyhow::Result<()> {
    let mode = match (allotment, greedy) {
        (false, _) => "strict",
        (true, false) => "allotment",
        (true, true) => "allotment+greedy",
    };
    eprintln!("== churn: {mode}, {n} slaves, {rate} operations/s ==");
    let nats = NatsServer::start()?;
    let vendor = Vendor::new()?;
    let cluster = cluster_name();
    let subjects = Subjects::new(&cluster)?;
    let seats = (n as u32) * (WANT + 2) + 1000;
    let license = vendor.master(seats, &[(TYPE, seats)])?;
    let log = logs.join("b1.log");
    let b1 = spawn_broker(&nats, &cluster, &license, &vendor, n, allotment, &log)?;
    let mut clients = Vec::new();
    let mut reqs = Vec::new();
    for _ in 0..CONNECTIONS {
        let client = nats.client().await?;
        reqs.push(Requester::new(client.clone(), &subjects).await?);
        clients.push(client);
    }
    let leads = lmbus_tests::eventually("b1 leads", || {
        let (c, cl) = (clients[0].clone(), cluster.clone());
        async move { lmbus_tests::status(&c, &cl).await.is_ok() }
    })
    .await;
    leads?;
    let sims: Arc<Vec<Mutex<Sim>>> = Arc::new(
        (0..n)
            .map(|i| {
                Mutex::new(Sim {
                    id: SlaveId::new(format!("s{i}")).unwrap(),
                    instance: Uuid::new_v4(),
                    held: None,
                    taken: 0,
                    seq: 0,
                    free: 0,
                    journal: Vec::new(),
                    journal_n: 0,
                    allot_seq: 0,
                    asking: false,
                    greedy: false,
                })
            })
            .collect(),
    );
    let ident = |i: usize| {
        let s = sims[i].lock().unwrap();
        (s.id.clone(), s.instance)
    };
    let running = Arc::new(AtomicBool::new(true));
    let counts = Arc::new(Counts::default());

    // Heartbeats, every slave every second, spread over the second.
    let heartbeats = {
        let (reqs, sims, running) = (reqs.clone(), sims.clone(), running.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / SLICES as u64));
            let (mut seq, mut slice) = (0, 0);
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                if slice == 0 {
                    seq += 1;
                }
                let part = sims.len().div_ceil(SLICES);
                let range = (slice * part).min(sims.len())..((slice + 1) * part).min(sims.len());
                slice = (slice + 1) % SLICES;
                for i in range {
                    let (id, instance) = {
                        let s = sims[i].lock().unwrap();
                        (s.id.clone(), s.instance)
                    };
                    let beat = Heartbeat {
                        instance,
                        seq,
                        ..Default::default()
                    };
                    let _ = reqs[i % CONNECTIONS]
                        .tell(&id, SlaveOp::Heartbeat, encode(&beat).unwrap())
                        .await;
                }
            }
        })
    };

    // Hello from every slave.
    let started = Instant::now();
    let hellos = futures::stream::iter(0..n)
        .map(|i| {
            let req = reqs[i % CONNECTIONS].clone();
            let (id, instance) = ident(i);
            async move {
                let hello = Hello {
                    instance,
                    heartbeat_interval_ms: 1000,
                    software: "lmbus churn bench".into(),
                    seq: 1,
                    request_timeout_ms: 2000,
                    request_seq: Some(0),
                    ..Default::default()
                };
                match req.ask(&id, SlaveOp::Hello, encode(&hello)?).await? {
                    Reply::Welcome(_) => Ok(()),
                    other => bail!("hello of {id} answered {other:?}"),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<anyhow::Result<()>>>()
        .await;
    hellos.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    eprintln!("hellos: {:?}", started.elapsed());

    // Allotment mode: every slave's allot request, every refresh interval, spread over it.
    let refreshes = allotment.then(|| {
        let (reqs, sims, running, counts) =
            (reqs.clone(), sims.clone(), running.clone(), counts.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REFRESH / SLICES as u32);
            let mut slice = 0;
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                let part = sims.len().div_ceil(SLICES);
                let range = (slice * part).min(sims.len())..((slice + 1) * part).min(sims.len());
                slice = (slice + 1) % SLICES;
                let (reqs, sims, counts) = (reqs.clone(), sims.clone(), counts.clone());
                // Not awaited here: a slice that takes longer overlaps the next, as
                // independent slaves' requests would.
                tokio::spawn(async move {
                    futures::stream::iter(range)
                        .for_each_concurrent(IN_FLIGHT, |i| {
                            refresh(&reqs[i % CONNECTIONS], &sims[i], &counts)
                        })
                        .await;
                });
            }
        })
    });
    if allotment {
        // Every slave has its first block before the churn starts.
        lmbus_tests::eventually_within("every slave has a block", Duration::from_secs(120), || {
            let sims = sims.clone();
            async move {
                sims.iter().all(|s| {
                    let s = s.lock().unwrap();
                    s.allot_seq > 0 && !s.asking
                })
            }
        })
        .await?;
    }

    // The greedy slave starts asking for everything once every slave has its block.
    if greedy {
        sims[0].lock().unwrap().greedy = true;
    }

    // The churn: `rate` operations a second, round robin over the slaves.
    let churn = {
        let (reqs, sims, running, counts) =
            (reqs.clone(), sims.clone(), running.clone(), counts.clone());
        tokio::spawn(async move {
            let per_tick = (rate / 100).max(1) as usize;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut next = 0usize;
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                let batch: Vec<usize> = (0..per_tick).map(|k| (next + k) % sims.len()).collect();
                next = (next + per_tick) % sims.len();
                if allotment {
                    for i in batch {
                        local_op(&sims[i], &counts);
                    }
                } else {
                    let (reqs, sims, counts) = (reqs.clone(), sims.clone(), counts.clone());
                    tokio::spawn(async move {
                        futures::stream::iter(batch)
                            .for_each_concurrent(IN_FLIGHT, |i| {
                                strict_op(&reqs[i % CONNECTIONS], &sims[i], &counts)
                            })
                            .await;
                    });
                }
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = b1.pid().as_raw() as u32;
    let js = async_nats::jetstream::new(clients[0].clone());
    let stream = subjects.ledger_stream();
    let (r0, bytes0) = ledger_state(&js, &stream).await;
    let (ops0, allots0, skipped0) = (
        counts.ops.load(Ordering::Relaxed),
        counts.allots.load(Ordering::Relaxed),
        counts.skipped.load(Ordering::Relaxed),
    );
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - c0) as f64 / 100.0 / secs * 100.0;
    let (r1, bytes1) = ledger_state(&js, &stream).await;
    let ops = counts.ops.load(Ordering::Relaxed) - ops0;
    let allots = counts.allots.load(Ordering::Relaxed) - allots0;
    let skipped = counts.skipped.load(Ordering::Relaxed) - skipped0;
    running.store(false, Ordering::Relaxed);
    churn.abort();
    heartbeats.abort();
    if let Some(r) = refreshes {
        r.abort();
    }
    let errors = counts.errors.load(Ordering::Relaxed);
    let greedy_block = sims[0].lock().unwrap().free;
    // A leader that stepped down under the load leads again once it is gone.
    lmbus_tests::eventually_within("a leader answers", Duration::from_secs(30), || {
        let (c, cl) = (clients[0].clone(), cluster.clone());
        async move { lmbus_tests::status(&c, &cl).await.is_ok() }
    })
    .await?;
    let status = lmbus_tests::status(&clients[0], &cluster).await?;
    if status.slaves_connected as usize != n {
        bail!(
            "only {} of {n} slaves are connected: heartbeats are not keeping up",
            status.slaves_connected
        );
    }
    let greedy_block = if greedy {
        format!(" greedy_block={greedy_block} seats={seats}")
    } else {
        String::new()
    };
    println!(
        "BENCH churn mode={mode} slaves={n} rate={rate} ops_per_s={:.0} skipped_per_s={:.1} allot_per_s={:.0} cpu_leader={cpu:.1} records_per_s={:.0} ledger_kib_per_s={:.1} cpu_us_per_op={:.1} errors={errors}{greedy_block}",
        ops as f64 / secs,
        skipped as f64 / secs,
        allots as f64 / secs,
        (r1 - r0) as f64 / secs,
        (bytes1.saturating_sub(bytes0)) as f64 / 1024.0 / secs,
        cpu / 100.0 * 1e6 / (ops as f64 / secs).max(1.0),
    );
    Ok(())
}

/// Allotment mode: one operation decided locally, from the slave's block.
fn local_op(sim: &Mutex<Sim>, counts: &Counts) {
    let mut s = sim.lock().unwrap();
    if s.asking {
        counts.skipped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let (kind, agent) = match s.held.take() {
        Some(agent) => {
            s.free += 1;
            (AllotOpKind::Release, agent)
        }
        None if s.free > 0 => {
            s.free -= 1;
            s.taken += 1;
            let agent = format!("agent-{}", s.taken);
            s.held = Some(agent.clone());
            (AllotOpKind::Admit, agent)
        }
        None => {
            counts.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    s.journal_n += 1;
    let n = s.journal_n;
    s.journal.push(AllotOp {
        n,
        kind,
        agent_id: agent,
        agent_type: TYPE.into(),
    });
    counts.ops.fetch_add(1, Ordering::Relaxed);
}

/// Allotment mode: one slave's allot request and its answer taken in.
async fn refresh(req: &Requester, sim: &Mutex<Sim>, counts: &Counts) {
    let (id, request) = {
        let mut s = sim.lock().unwrap();
        if s.asking {
            return;
        }
        s.asking = true;
        s.allot_seq += 1;
        let request = AllotRequest {
            instance: s.instance,
            seq: s.allot_seq,
            ops: s.journal.clone(),
            want: BTreeMap::from([(TYPE.to_owned(), if s.greedy { u32::MAX } else { WANT })]),
        };
        (s.id.clone(), request)
    };
    let answer = req
        .ask(&id, SlaveOp::Allot, encode(&request).unwrap())
        .await;
    let mut s = sim.lock().unwrap();
    s.asking = false;
    match answer {
        Ok(Reply::Allotment(a)) => {
            counts.allots.fetch_add(1, Ordering::Relaxed);
            s.free = a.blocks.get(TYPE).copied().unwrap_or(0);
            s.journal.retain(|op| op.n > a.journal);
            if !a.refused.is_empty() {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Strict mode: one operation as a request the leader decides.
async fn strict_op(req: &Requester, sim: &Mutex<Sim>, counts: &Counts) {
    let (id, op, payload, releasing) = {
        let mut s = sim.lock().unwrap();
        if s.asking {
            counts.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.asking = true;
        s.seq += 1;
        match s.held.clone() {
            Some(agent) => {
                let request = UnregisterRequest {
                    request_id: Uuid::new_v4(),
                    seq: s.seq,
                    agent_id: agent,
                };
                (
                    s.id.clone(),
                    SlaveOp::Unregister,
                    encode(&request).unwrap(),
                    true,
                )
            }
            None => {
                s.taken += 1;
                let request = RegisterRequest {
                    request_id: Uuid::new_v4(),
                    seq: s.seq,
                    agent_id: format!("agent-{}", s.taken),
                    agent_type: TYPE.into(),
                };
                (
                    s.id.clone(),
                    SlaveOp::Register,
                    encode(&request).unwrap(),
                    false,
                )
            }
        }
    };
    let answer = req.ask(&id, op, payload).await;
    let mut s = sim.lock().unwrap();
    s.asking = false;
    match (answer, releasing) {
        (Ok(Reply::Ack), true) => {
            s.held = None;
            counts.ops.fetch_add(1, Ordering::Relaxed);
        }
        (Ok(Reply::Decision(Decision::Approved { .. })), false) => {
            s.held = Some(format!("agent-{}", s.taken));
            counts.ops.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}
