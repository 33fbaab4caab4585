#![allow(clippy::unwrap_used)]
//! The scale bench (`cargo xtask bench-scale`, or `cargo bench -p lmbus-tests --bench
//! scale` with `NATS_SERVER_BIN` set): for each `SLAVESxSEATS` of `LMBUS_SCALE` (default
//! 1k, 10k, 30k and 100k slaves, 10^4 to 10^6 seats), on a fresh nats-server, a leader
//! broker process and a hot standby process, this process plays every slave, each with its
//! own identity (subject), session and heartbeat every second, over a few NATS
//! connections:
//!
//! - hello of every slave (time);
//! - registration of SEATS agents from cold, spread evenly, in batch requests of up to 128
//!   (time);
//! - steady state: the broker's CPU over 5 s with only heartbeats flowing, and its resident
//!   memory;
//! - takeover: kill -9 of the leader, then the time until the standby approves a new
//!   registration (it has followed the ledger all along, so this is election plus
//!   catch-up of what it has not applied).
//!
//! Prints one `BENCH` line per size.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt as _;
use lmbus_schemas::{
    BatchItem, BatchRequest, Decision, Heartbeat, Hello, MAX_BATCH_ITEMS, RegisterRequest, Reply,
    SlaveId, SlaveOp, Subjects, encode,
};
use lmbus_tests::bench::{Requester, broker_command, rss_mib};
use lmbus_tests::{NatsServer, Proc, Vendor, cluster_name, cpu_ticks};
use nix::sys::signal::Signal;
use tokio::time::Instant;
use uuid::Uuid;

/// NATS connections the simulated slaves share.
const CONNECTIONS: usize = 4;
/// Requests in flight while saying hello and registering.
const IN_FLIGHT: usize = 64;

fn main() {
    let sizes: Vec<(usize, usize)> = std::env::var("LMBUS_SCALE")
        .unwrap_or_else(|_| {
            "1000x10000,10000x10000,10000x100000,10000x1000000,30000x100000,100000x100000".into()
        })
        .split(',')
        .filter_map(|s| {
            let (a, b) = s.trim().split_once('x')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    let rt = lmbus_tests::bench::bench_runtime();
    // A size the machine cannot carry is a result too: reported, and the next size runs.
    for (slaves, seats) in sizes {
        if let Err(e) = rt.block_on(run(slaves, seats)) {
            eprintln!("scale {slaves}x{seats} failed: {e:#}");
            let reason = format!("{e:#}").replace(' ', "_");
            println!("BENCH scale slaves={slaves} seats={seats} failed={reason}");
        }
    }
}

/// What every broker of one scale run shares.
struct Brokers<'a> {
    nats: &'a NatsServer,
    cluster: &'a str,
    license: &'a std::path::Path,
    vendor: &'a Vendor,
    slaves: usize,
    logs: &'a std::path::Path,
}

impl Brokers<'_> {
    fn spawn(&self, id: &str, priority: u32) -> anyhow::Result<Proc> {
        let Brokers {
            nats,
            cluster,
            license,
            vendor,
            slaves,
            logs,
        } = *self;
        Proc::spawn(
            broker_command(nats, cluster, license, vendor, id)?
                .args(["--priority", &priority.to_string()])
                .args(["--max-slaves", &(slaves + 10).to_string()])
                .env("LMBUS_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(logs.join(format!("{id}.log")))?),
        )
    }
}

struct Slave {
    id: SlaveId,
    instance: Uuid,
}

/// Runs one size; on failure, the tail of each broker's log goes to stderr with the error.
async fn run(n_slaves: usize, seats: usize) -> anyhow::Result<()> {
    let logs = tempfile::tempdir()?;
    let result = run_in(n_slaves, seats, logs.path()).await;
    if result.is_err() {
        for id in ["b1", "b2"] {
            let text =
                std::fs::read_to_string(logs.path().join(format!("{id}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {id}'s log ---");
            for line in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{line}");
            }
        }
    }
    result
}

async fn run_in(n_slaves: usize, seats: usize, logs: &std::path::Path) -> anyhow::Result<()> {
    eprintln!("== {n_slaves} slaves, {seats} seats ==");
    let nats = NatsServer::start()?;
    let vendor = Vendor::new()?;
    let cluster = cluster_name();
    let subjects = Subjects::new(&cluster)?;
    let license = vendor.master(seats as u32 + 1000, &[])?;
    let brokers = Brokers {
        nats: &nats,
        cluster: &cluster,
        license: &license,
        vendor: &vendor,
        slaves: n_slaves,
        logs,
    };
    let b1 = brokers.spawn("b1", 1)?;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(nats.client().await?);
    }
    let mut reqs = Vec::new();
    for client in &clients {
        reqs.push(Requester::new(client.clone(), &subjects).await?);
    }
    lmbus_tests::eventually("b1 leads", || {
        let (c, cl) = (clients[0].clone(), cluster.clone());
        async move { lmbus_tests::status(&c, &cl).await.is_ok() }
    })
    .await?;
    let b2 = brokers.spawn("b2", 2)?;
    let slaves: Arc<Vec<Slave>> = Arc::new(
        (0..n_slaves)
            .map(|i| Slave {
                id: SlaveId::new(format!("s{i}")).unwrap(),
                instance: Uuid::new_v4(),
            })
            .collect(),
    );

    // Heartbeats, every slave every second, published (no answer wanted), from before the
    // hellos so no slave falls silent while the others say hello.
    let beating = Arc::new(AtomicBool::new(true));
    let heartbeats = {
        let (reqs, slaves, beating) = (reqs.clone(), slaves.clone(), beating.clone());
        tokio::spawn(async move {
            // Spread over the second in slices, as independent slaves' beats are
            // (LMBUS_SCALE_BEAT_SLICES, default 20; 1 sends every slave's beat in one burst).
            let slices: usize = std::env::var("LMBUS_SCALE_BEAT_SLICES")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n >= 1)
                .unwrap_or(20);
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / slices as u64));
            let mut seq = 0;
            let mut slice = 0;
            while beating.load(Ordering::Relaxed) {
                tick.tick().await;
                if slice == 0 {
                    seq += 1;
                }
                let part = slaves.len().div_ceil(slices);
                let range =
                    (slice * part).min(slaves.len())..((slice + 1) * part).min(slaves.len());
                slice = (slice + 1) % slices;
                for (i, s) in slaves
                    .iter()
                    .enumerate()
                    .skip(range.start)
                    .take(range.len())
                {
                    let beat = Heartbeat {
                        instance: s.instance,
                        seq,
                        agents: 0,
                        master: None,
                        ..Default::default()
                    };
                    let _ = reqs[i % CONNECTIONS]
                        .tell(&s.id, SlaveOp::Heartbeat, encode(&beat).unwrap())
                        .await;
                }
            }
        })
    };

    // Hello from every slave.
    let started = Instant::now();
    let hellos = futures::stream::iter(0..n_slaves)
        .map(|i| {
            let (req, slaves) = (reqs[i % CONNECTIONS].clone(), slaves.clone());
            async move {
                let s = &slaves[i];
                let hello = Hello {
                    instance: s.instance,
                    license: None,
                    heartbeat_interval_ms: 1000,
                    agents: vec![],
                    software: "lmbus scale bench".into(),
                    seq: 1,
                    grace_ms: 0,
                    logout_after_grace: false,
                    request_timeout_ms: 2000,
                    ..Default::default()
                };
                match req.ask(&s.id, SlaveOp::Hello, encode(&hello)?).await? {
                    Reply::Welcome(_) => Ok(()),
                    other => bail!("hello of {} answered {other:?}", s.id),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<anyhow::Result<()>>>()
        .await;
    hellos.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let hello_time = started.elapsed();
    eprintln!("hellos: {hello_time:?}");

    // Registration from cold: every slave's share, in batches.
    let per_slave = seats / n_slaves;
    let mut jobs = Vec::new();
    for i in 0..n_slaves {
        let mut next = 0;
        while next < per_slave {
            let n = (per_slave - next).min(MAX_BATCH_ITEMS);
            jobs.push((i, next, n));
            next += n;
        }
    }
    let started = Instant::now();
    let results = futures::stream::iter(jobs)
        .map(|(i, from, n)| {
            let (req, slaves) = (reqs[i % CONNECTIONS].clone(), slaves.clone());
            async move {
                let s = &slaves[i];
                let items = (from..from + n)
                    .map(|k| {
                        BatchItem::Register(RegisterRequest {
                            request_id: Uuid::new_v4(),
                            seq: k as u64 + 1,
                            agent_id: format!("agent-{k}"),
                            agent_type: "inbound".into(),
                        })
                    })
                    .collect();
                match req
                    .ask(&s.id, SlaveOp::Batch, encode(&BatchRequest { items })?)
                    .await?
                {
                    Reply::Batch(replies)
                        if replies
                            .iter()
                            .all(|r| matches!(r, Reply::Decision(Decision::Approved { .. }))) =>
                    {
                        Ok(replies.len())
                    }
                    other => bail!("a batch of {} was answered {other:?}", s.id),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<anyhow::Result<usize>>>()
        .await;
    let registered: usize = results
        .into_iter()
        .collect::<anyhow::Result<Vec<usize>>>()?
        .iter()
        .sum();
    let register_time = started.elapsed();
    eprintln!("registered {registered} in {register_time:?}");

    // Steady state: heartbeats only.
    let b1_pid = b1.pid().as_raw() as u32;
    let b2_pid = b2.pid().as_raw() as u32;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (t0, c1, c2) = (Instant::now(), cpu_ticks(b1_pid), cpu_ticks(b2_pid));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu_leader = (cpu_ticks(b1_pid) - c1) as f64 / 100.0 / secs * 100.0;
    let cpu_standby = (cpu_ticks(b2_pid) - c2) as f64 / 100.0 / secs * 100.0;
    let (rss_leader, rss_standby) = (rss_mib(b1_pid), rss_mib(b2_pid));
    let status = lmbus_tests::status(&clients[0], &cluster).await?;
    if status.slaves_connected as usize != n_slaves {
        bail!(
            "only {} of {n_slaves} slaves are connected: heartbeats are not keeping up",
            status.slaves_connected
        );
    }
    if status.total_in_use as usize != registered || status.broker_id != "b1" {
        bail!(
            "the leader reports {} seats (expected {registered}), led by {}",
            status.total_in_use,
            status.broker_id
        );
    }
    eprintln!(
        "steady: leader {cpu_leader:.0}% CPU, {rss_leader:.0} MiB; standby {cpu_standby:.0}% CPU, {rss_standby:.0} MiB"
    );

    // Takeover: kill -9 the leader, probe with a new registration until one is approved.
    let killed = Instant::now();
    b1.signal(Signal::SIGKILL)?;
    let mut seq = per_slave as u64 + 1;
    let takeover = loop {
        seq += 1;
        let request = RegisterRequest {
            request_id: Uuid::new_v4(),
            seq,
            agent_id: format!("probe-{seq}"),
            agent_type: "inbound".into(),
        };
        let answer = tokio::time::timeout(
            Duration::from_millis(250),
            reqs[0].ask(&slaves[0].id, SlaveOp::Register, encode(&request)?),
        )
        .await;
        if let Ok(Ok(Reply::Decision(Decision::Approved { .. }))) = answer {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("no approval within 60 s of the kill");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!("takeover: {takeover:?}");
    let after = lmbus_tests::status(&clients[0], &cluster).await?;
    if after.broker_id != "b2" || (after.total_in_use as usize) < registered {
        bail!(
            "after the takeover {} reports {} seats (expected at least {registered})",
            after.broker_id,
            after.total_in_use
        );
    }
    beating.store(false, Ordering::Relaxed);
    heartbeats.abort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "BENCH scale slaves={n_slaves} seats={registered} hello_ms={:.0} register_ms={:.0} register_per_s={:.0} cpu_leader={cpu_leader:.1} cpu_standby={cpu_standby:.1} rss_leader_mib={rss_leader:.0} rss_standby_mib={rss_standby:.0} bytes_per_seat={:.0} takeover_ms={:.0}",
        ms(hello_time),
        ms(register_time),
        registered as f64 / register_time.as_secs_f64(),
        rss_leader * 1024.0 * 1024.0 / registered.max(1) as f64,
        ms(takeover),
    );
    drop(b2);
    Ok(())
}
