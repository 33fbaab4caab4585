#![allow(clippy::unwrap_used)]
//! The throughput bench (`cargo xtask bench`, or `cargo bench -p lmbus-tests --bench
//! throughput` with `NATS_SERVER_BIN` and `REDIS_SERVER_BIN` set): one run measures, side
//! by side and on the same machine,
//!
//! 1. the NATS floor: request/reply to an echo responder (its own process) that answers
//!    64 bytes;
//! 2. a JetStream publish with its acknowledgement (the ledger append's own cost);
//! 3. the Redis fair counting semaphore: one Lua script per acquire (ZREMRANGEBYSCORE of
//!    expired holders, ZCARD against the limit, ZADD of the holder), ZREM to release;
//! 4. lmbus strict mode: registrations and unregistrations through slave agents (the
//!    library in this process, and the local HTTP API of `lmbus-slave` daemons) to one
//!    leader broker process with its ledger on;
//! 5. lmbus allotment mode (`lmbus_allotment_library`): the same through slave agents in
//!    this process whose broker (another process, another cluster on the same server) runs
//!    `--admission allotment`, so registrations are decided locally from blocks of seats,
//!    and through the local HTTP API of `lmbus-slave` daemons of that cluster, with one
//!    keep-alive connection per worker (`lmbus_allotment_http`) and with one pipelined
//!    connection per daemon shared by its workers (`lmbus_allotment_http_pipelined`, the
//!    Redis row's shape);
//!
//! each at concurrency 1 and 64 (64 = 4 connections or slaves × 16 workers), alternating
//! acquire and release, `LMBUS_BENCH_REPS` (3) repetitions of `LMBUS_BENCH_SECONDS` (5 s)
//! after a 1 s warm-up. Everything is started first and the repetitions are interleaved
//! (each measures every row once), so the machine's drift falls on all rows alike. Prints
//! one `BENCH` line per row (median repetition, spread) with the CPU of each process, then
//! audits both brokers' ledgers.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use lmbus_broker::ledger::{Ledger, audit};
use lmbus_schemas::{SlaveId, Subjects};
use lmbus_slave::{SlaveAgent, SlaveConfig};
use lmbus_tests::{NatsServer, Proc, Vendor, bin, cluster_name, cpu_ticks, free_port};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::time::Instant;

const ECHO_SUBJECT: &str = "lmbus.bench.echo";
const ECHO_ROLE: &str = "LMBUS_BENCH_ECHO_URL";
/// Connections (NATS clients, Redis connections, slaves) at concurrency 64.
const CONNECTIONS: usize = 4;
const LIMIT: u32 = 10_000;

fn main() {
    if let Ok(url) = std::env::var(ECHO_ROLE) {
        return echo_responder(&url);
    }
    let rt = lmbus_tests::bench::bench_runtime();
    if let Err(e) = rt.block_on(bench()) {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}

/// The echo responder, run as a child process of the bench so its CPU is its own.
fn echo_responder(url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let mut requests = client.subscribe(ECHO_SUBJECT).await.unwrap();
        client.flush().await.unwrap();
        let answer = Bytes::from(vec![b'x'; 64]);
        while let Some(request) = requests.next().await {
            if let Some(reply) = request.reply {
                let _ = client.publish(reply, answer.clone()).await;
            }
        }
    });
}

fn settings() -> (usize, Duration) {
    let reps = std::env::var("LMBUS_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let secs = std::env::var("LMBUS_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    (reps, Duration::from_secs_f64(secs))
}

/// The processes whose CPU a row reports, by name.
type Watched = Vec<(String, Vec<u32>)>;

struct Window {
    started: Instant,
    ticks: Vec<u64>,
}

fn open_window(watched: &Watched) -> Window {
    Window {
        started: Instant::now(),
        ticks: watched
            .iter()
            .map(|(_, pids)| pids.iter().map(|p| cpu_ticks(*p)).sum())
            .collect(),
    }
}

/// Percent of one core each watched process used since the window opened.
fn close_window(watched: &Watched, window: &Window) -> Vec<(String, f64)> {
    let secs = window.started.elapsed().as_secs_f64();
    // USER_HZ is 100 on every Linux this runs on.
    let hz = 100.0;
    watched
        .iter()
        .zip(&window.ticks)
        .map(|((name, pids), before)| {
            let now: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
            (
                name.clone(),
                (now.saturating_sub(*before)) as f64 / hz / secs * 100.0,
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Sample {
    ops_per_sec: f64,
    mean_us: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    cpu: Vec<(String, f64)>,
    split: Option<Split>,
}

/// Reads the Prometheus text of the processes an lmbus row goes through (its slaves and
/// the broker), all concatenated.
type Probe = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<String>> + Send + Sync>;

/// Where an lmbus operation's time went over a window, from the slaves' and the broker's
/// own histograms (means, in µs): the master's answer as the slave saw it, the leader's
/// decision (arrival to reply, its append included) and the ledger append alone.
#[derive(Debug, Clone)]
struct Split {
    master_us: f64,
    decision_us: f64,
    append_us: f64,
}

/// The sum and count of every series of histogram `name` in `text`, added up.
fn totals(text: &str, name: &str) -> (f64, f64) {
    let (sum, count) = (format!("{name}_sum"), format!("{name}_count"));
    let mut t = (0.0, 0.0);
    for line in text.lines() {
        let series = line.split(['{', ' ']).next().unwrap_or_default();
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if series == sum {
            t.0 += value;
        } else if series == count {
            t.1 += value;
        }
    }
    t
}

impl Split {
    /// From the probe's text before and after the window; `None` when a histogram saw
    /// nothing in it.
    fn between(before: &str, after: &str) -> Option<Self> {
        let mean = |name: &str| {
            let (s0, c0) = totals(before, name);
            let (s1, c1) = totals(after, name);
            (c1 > c0).then(|| (s1 - s0) / (c1 - c0) * 1e6)
        };
        Some(Self {
            master_us: mean("lmbus_slave_master_seconds")?,
            decision_us: mean("lmbus_decision_seconds")?,
            append_us: mean("lmbus_ledger_append_seconds")?,
        })
    }
}

/// Runs `concurrency` workers calling `op(worker, i)` in a loop for a warm-up second,
/// then for `length`, and measures the window. Odd `i` releases what even `i` took, and a
/// worker only stops after a release, so nothing stays held.
async fn measure<F, Fut>(
    concurrency: usize,
    length: Duration,
    watched: &Watched,
    probe: Option<&Probe>,
    op: F,
) -> anyhow::Result<Sample>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (op, measuring, stop) = (op.clone(), measuring.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut i: u64 = 0;
            loop {
                if i % 2 == 0 && stop.load(Ordering::Relaxed) {
                    break;
                }
                let on = measuring.load(Ordering::Relaxed);
                let t0 = Instant::now();
                op(w, i).await?;
                if on && measuring.load(Ordering::Relaxed) {
                    latencies.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                i += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = match probe {
        Some(p) => Some(p().await?),
        None => None,
    };
    let window = open_window(watched);
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(length).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = window.started.elapsed().as_secs_f64();
    let cpu = close_window(watched, &window);
    let split = match (probe, before) {
        (Some(p), Some(before)) => Split::between(&before, &p().await?),
        _ => None,
    };
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await??);
    }
    if all.is_empty() {
        bail!("no operation completed in the window");
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64;
    Ok(Sample {
        ops_per_sec: all.len() as f64 / secs,
        mean_us: all.iter().map(|&l| f64::from(l)).sum::<f64>() / all.len() as f64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        cpu,
        split,
    })
}

/// One operation of a row, called by worker `w` as its `i`th.
type Op = Arc<dyn Fn(usize, u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// A row of the table: what it calls, at which concurrency, whose CPU it reports, and its
/// samples so far.
struct Row {
    name: &'static str,
    concurrency: usize,
    watched: Watched,
    probe: Option<Probe>,
    op: Op,
    samples: Vec<Sample>,
}

impl Row {
    fn new<F, Fut>(name: &'static str, concurrency: usize, watched: &Watched, op: F) -> Self
    where
        F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self {
            name,
            concurrency,
            watched: watched.clone(),
            probe: None,
            op: Arc::new(move |w, i| op(w, i).boxed()),
            samples: Vec::new(),
        }
    }

    /// Splits this row's time by the histograms `probe` reads (see [`Split`]).
    fn probed(mut self, probe: Probe) -> Self {
        self.probe = Some(probe);
        self
    }

    /// `LMBUS_BENCH_ROWS` (comma-separated row names) measures only those rows, for
    /// profiling.
    fn selected(&self) -> bool {
        std::env::var("LMBUS_BENCH_ROWS")
            .map_or(true, |rows| rows.split(',').any(|r| r.trim() == self.name))
    }

    async fn measure(&mut self, rep: usize, length: Duration) -> anyhow::Result<()> {
        let (name, concurrency) = (self.name, self.concurrency);
        let op = self.op.clone();
        let s = measure(
            concurrency,
            length,
            &self.watched,
            self.probe.as_ref(),
            move |w, i| op(w, i),
        )
        .await
        .with_context(|| format!("{name} at concurrency {concurrency}"))?;
        eprintln!(
            "{name} c={concurrency} rep {rep}: {:.0} ops/s, p50 {:.0} us",
            s.ops_per_sec, s.p50_us
        );
        self.samples.push(s);
        Ok(())
    }

    /// Prints the median sample (by ops/s) as a `BENCH` line with the spread, and this
    /// row's ratios to the `floor` and `peer` rows of its concurrency, taken repetition by
    /// repetition (the rows of one repetition ran minutes apart at most, so a change in the
    /// machine's speed between repetitions cancels out of each ratio).
    fn report(&self, floor: Option<&Row>, peer: Option<&Row>) {
        if self.samples.is_empty() {
            return;
        }
        let mut samples = self.samples.clone();
        samples.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
        let median = &samples[samples.len() / 2];
        let cpu: Vec<String> = median
            .cpu
            .iter()
            .map(|(n, pct)| format!("{n}:{pct:.0}"))
            .collect();
        let ops = |s: &Sample| s.ops_per_sec;
        let p50 = |s: &Sample| s.p50_us;
        let ratios = [
            ("ops_per_floor", floor, ops as fn(&Sample) -> f64),
            ("ops_per_peer", peer, ops),
            ("p50_per_floor", floor, p50),
        ]
        .into_iter()
        .filter_map(|(name, other, value)| {
            let (m, lo, hi) = paired(&self.samples, &other?.samples, value)?;
            Some(format!(" {name}={m:.3},{lo:.3},{hi:.3}"))
        })
        .collect::<String>();
        let split = median.split.as_ref().map_or(String::new(), |s| {
            format!(
                " master_us={:.0} decision_us={:.0} append_us={:.0}",
                s.master_us, s.decision_us, s.append_us
            )
        });
        println!(
            "BENCH throughput row={} concurrency={} ops={:.0} min_ops={:.0} max_ops={:.0} mean_us={:.0} p50_us={:.0} p99_us={:.0} p999_us={:.0} cpu={}{ratios}{split}",
            self.name,
            self.concurrency,
            median.ops_per_sec,
            samples[0].ops_per_sec,
            samples[samples.len() - 1].ops_per_sec,
            median.mean_us,
            median.p50_us,
            median.p99_us,
            median.p999_us,
            cpu.join(",")
        );
    }
}

/// The median, lowest and highest of `value(a[i]) / value(b[i])` over the repetitions both
/// rows measured; `None` when they measured different repetitions.
fn paired(a: &[Sample], b: &[Sample], value: fn(&Sample) -> f64) -> Option<(f64, f64, f64)> {
    if a.is_empty() || a.len() != b.len() {
        return None;
    }
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, b)| value(b) > 0.0)
        .map(|(a, b)| value(a) / value(b))
        .collect();
    if ratios.len() != a.len() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    Some((
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1],
    ))
}

/// A `redis-server` on a free loopback port, without persistence (the semaphore as it is
/// usually run: its state is lost with the process).
fn start_redis() -> anyhow::Result<(Proc, u16)> {
    let bin = std::env::var_os("REDIS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "redis-server".into());
    let port = free_port();
    let proc = Proc::spawn(
        Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .with_context(|| {
        format!(
            "cannot start {}: set REDIS_SERVER_BIN (cargo xtask bench does)",
            bin.display()
        )
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not listen on {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proc, port))
}

/// The fair counting semaphore's acquire, as one script: drop holders older than the
/// timeout, count, add the holder if under the limit.
const ACQUIRE: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
    return 1
end
return 0
";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A minimal HTTP/1.1 keep-alive client for the slave's local API: one request at a time
/// on one connection, answers read by their Content-Length.
struct Http {
    stream: BufReader<tokio::net::TcpStream>,
}

impl Http {
    async fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    async fn call(&mut self, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
        self.stream
            .get_mut()
            .write_all(request(method, path, body).as_bytes())
            .await?;
        let (ok, answer) = read_answer(&mut self.stream).await?;
        if !ok {
            bail!("{method} {path}: {answer}");
        }
        Ok(answer)
    }
}

fn request(method: &str, path: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One answer: whether it is a success (200, or 201 for a registration that took a seat)
/// and its body (with the status code if it is not a success).
async fn read_answer(
    stream: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> anyhow::Result<(bool, String)> {
    let (code, body) = lmbus_tests::http1::read_answer(stream).await?;
    if (200..300).contains(&code) {
        Ok((true, body))
    } else {
        Ok((false, format!("{code} {body}")))
    }
}

/// A pipelining HTTP/1.1 client of the slave's local API (RFC 9112 §9.3.2): one keep-alive
/// connection that many workers share. A writer task sends every request queued since its
/// last write in one write; a reader task hands each answer, in order, to the request it
/// answers. The shape of the Redis row's multiplexed connection, over HTTP.
#[derive(Clone)]
struct Pipelined {
    queue: tokio::sync::mpsc::UnboundedSender<(Vec<u8>, Answer)>,
}

type Answer = tokio::sync::oneshot::Sender<anyhow::Result<(bool, String)>>;

impl Pipelined {
    async fn connect(port: u16) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let (queue, mut requests) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, Answer)>();
        // The writer passes each request's answer slot to the reader before it writes the
        // request, so the reader always finds the slot of the answer it reads.
        let (slots, mut waiting) = tokio::sync::mpsc::unbounded_channel::<Answer>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some((request, slot)) = requests.recv().await {
                // The workers just answered ask again one after the other: let them queue
                // before writing, so they go out together.
                tokio::task::yield_now().await;
                batch.clear();
                batch.extend_from_slice(&request);
                let _ = slots.send(slot);
                while let Ok((request, slot)) = requests.try_recv() {
                    batch.extend_from_slice(&request);
                    let _ = slots.send(slot);
                }
                if write.write_all(&batch).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut read = BufReader::new(read);
            while let Some(slot) = waiting.recv().await {
                let answer = read_answer(&mut read).await;
                // After a broken answer the stream is out of step: every request still
                // waiting fails (its slot is dropped) rather than get another's answer.
                let broken = answer.is_err();
                let _ = slot.send(answer);
                if broken {
                    return;
                }
            }
        });
        Ok(Self { queue })
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
        let (slot, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send((request(method, path, body).into_bytes(), slot))
            .map_err(|_| anyhow::anyhow!("the pipelined connection closed"))?;
        let (ok, answer) = answer
            .await
            .map_err(|_| anyhow::anyhow!("the pipelined connection closed"))??;
        if !ok {
            bail!("{method} {path}: {answer}");
        }
        Ok(answer)
    }
}

/// How a row's workers reach the slaves' local HTTP API.
#[derive(Clone, Copy)]
enum Transport {
    /// HTTP/1.1, one keep-alive connection per worker (one request at a time on each).
    Http1,
    /// HTTP/1.1 pipelined: one keep-alive connection per slave daemon, shared by its
    /// workers.
    Pipelined,
}

enum Conn {
    Http1(tokio::sync::Mutex<Http>),
    Pipelined(Pipelined),
}

impl Conn {
    async fn call(&self, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
        match self {
            Conn::Http1(http) => http.lock().await.call(method, path, body).await,
            Conn::Pipelined(p) => p.call(method, path, body).await,
        }
    }
}

/// Reads `GET /metrics` from each of `ports` (the broker, slave daemons) and the metrics
/// of the in-process `slaves`, all concatenated.
fn probe(ports: Vec<u16>, slaves: Vec<SlaveAgent>) -> Probe {
    let (ports, slaves) = (Arc::new(ports), Arc::new(slaves));
    Arc::new(move || {
        let (ports, slaves) = (ports.clone(), slaves.clone());
        async move {
            let mut text = String::new();
            for port in ports.iter() {
                text.push_str(
                    &Http::connect(*port)
                        .await?
                        .call("GET", "/metrics", "")
                        .await?,
                );
            }
            for slave in slaves.iter() {
                text.push_str(&slave.metrics_text());
            }
            Ok(text)
        }
        .boxed()
    })
}

/// A leader `lmbus-broker` process for the bench's cluster `cluster` with a master license
/// of `LIMIT` inbound seats, its metrics on `metrics_port`, plus `flags`; its log goes to
/// `log`.
fn broker_process(
    nats: &NatsServer,
    cluster: &str,
    license: &std::path::Path,
    vendor: &Vendor,
    metrics_port: u16,
    flags: &[&str],
    log: &std::path::Path,
) -> anyhow::Result<Proc> {
    Proc::spawn(
        lmbus_tests::bench::broker_command(nats, cluster, license, vendor, "bench-broker")?
            .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
            .args(flags)
            .env("LMBUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?),
    )
}

/// Waits (bounded) until the broker of `cluster` answers status requests.
async fn wait_leader(client: &async_nats::Client, cluster: &str) -> anyhow::Result<()> {
    lmbus_tests::eventually("the broker leads", || {
        let (client, cluster) = (client.clone(), cluster.to_owned());
        async move { lmbus_tests::status(&client, &cluster).await.is_ok() }
    })
    .await
}

/// Replays `cluster`'s ledger through the audit (held plus allotted seats within the
/// license at every record) and prints it as `BENCH <name> …`.
async fn audit_ledger(
    client: &async_nats::Client,
    cluster: &str,
    name: &str,
) -> anyhow::Result<()> {
    let subjects = Subjects::new(cluster)?;
    let records = Ledger::open(client, &subjects, 1).await?.read_all().await?;
    let types: BTreeMap<String, u32> = [("inbound".to_owned(), LIMIT)].into();
    let checked = audit(&records, LIMIT, &types).map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "BENCH {name} records={} grants={} releases={} max_in_use={} max_counted={}",
        checked.records, checked.grants, checked.releases, checked.max_in_use, checked.max_counted
    );
    Ok(())
}

/// The row of registrations and unregistrations through `slaves` (in this process), alternating per
/// worker's `i`, each agent approved and released.
fn library_row(
    name: &'static str,
    c: usize,
    watched: &Watched,
    slaves: &'static [SlaveAgent],
) -> Row {
    let n = spread(c);
    // Each worker's agent name, made once (as the Redis row's holder names are), and the
    // slaves and names borrowed for the bench's lifetime rather than counted (an `Arc`
    // cloned per operation is two atomic writes on a line both cores share): the harness's
    // own work stays out of a sub-microsecond operation's cost.
    let names: &'static [String] = (0..c)
        .map(|w| format!("c{c}-w{w}"))
        .collect::<Vec<_>>()
        .leak();
    Row::new(name, c, watched, move |w, i| async move {
        let slave = &slaves[w % n];
        let agent = names[w].as_str();
        if i % 2 == 0 {
            let outcome = slave.register(agent, "inbound").await?;
            if !outcome.is_approved() {
                bail!("{agent} was not approved: {outcome:?}");
            }
        } else if !slave.unregister(agent).await? {
            bail!("{agent} held no seat to release");
        }
        Ok(())
    })
}

/// The slaves' `lmbus_slave_local_decision_seconds` buckets, summed: (upper bound in
/// seconds, cumulative count), `+Inf` last.
fn decision_buckets(slaves: &[SlaveAgent]) -> Vec<(f64, f64)> {
    const PREFIX: &str = "lmbus_slave_local_decision_seconds_bucket{le=\"";
    let mut sum: Vec<(f64, f64)> = Vec::new();
    for slave in slaves {
        let text = slave.metrics_text();
        let buckets = text.lines().filter_map(|l| {
            let (bound, count) = l.strip_prefix(PREFIX)?.split_once("\"} ")?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, count.trim().parse::<f64>().ok()?))
        });
        add_buckets(&mut sum, buckets);
    }
    sum
}

/// Adds `buckets` (bound, count) to `sum`, bucket by bucket.
fn add_buckets(sum: &mut Vec<(f64, f64)>, buckets: impl Iterator<Item = (f64, f64)>) {
    for (i, (bound, n)) in buckets.enumerate() {
        match sum.get_mut(i) {
            Some(s) => s.1 += n,
            None => sum.push((bound, n)),
        }
    }
}

/// One `BENCH local_decision` line: how many local decisions the allotment library rows at
/// `concurrency` made, the bucket bounds their median and 99th percentile fall within, and
/// the share within 20 µs (the target for the p99).
fn report_decisions(concurrency: usize, buckets: &[(f64, f64)]) {
    let count = buckets.last().map_or(0.0, |b| b.1);
    if count <= 0.0 {
        return;
    }
    let within = |q: f64| {
        buckets
            .iter()
            .find(|(_, n)| *n >= q * count)
            .map_or("?".to_owned(), |(bound, _)| {
                if bound.is_finite() {
                    format!("{}", (bound * 1e7).round() / 10.0)
                } else {
                    "inf".to_owned()
                }
            })
    };
    let under_20 = buckets
        .iter()
        .find(|(bound, _)| (*bound - 0.000_02).abs() < 1e-12)
        .map_or(0.0, |b| b.1);
    println!(
        "BENCH local_decision concurrency={concurrency} decisions={count:.0} p50_le_us={} p99_le_us={} within_20us_pct={:.2}",
        within(0.5),
        within(0.99),
        under_20 * 100.0 / count
    );
}

fn spread(concurrency: usize) -> usize {
    if concurrency == 1 { 1 } else { CONNECTIONS }
}

/// `CONNECTIONS` `lmbus-slave` daemons of `cluster` (ids `{prefix}0`…) and, once each
/// one's API says it is connected, one row `name` per concurrency level through their
/// local HTTP APIs (one keep-alive connection per worker, like a host application's HTTP
/// client). `watched` gains the daemons' CPU. Returns the daemons, which the rows need
/// alive, and their API ports.
#[allow(clippy::too_many_arguments)]
async fn http_rows(
    names: &[(&'static str, Transport)],
    nats_url: &str,
    cluster: &str,
    prefix: &str,
    metrics_port: u16,
    logs: &std::path::Path,
    levels: &[usize],
    mut watched: Watched,
    rows: &mut Vec<Row>,
) -> anyhow::Result<(Vec<Proc>, Vec<u16>)> {
    let mut daemons = Vec::new();
    let mut ports = Vec::new();
    for s in 0..CONNECTIONS {
        let port = free_port();
        daemons.push(Proc::spawn(
            Command::new(bin("lmbus-slave")?)
                .args(["run", "--nats", nats_url, "--cluster", cluster])
                .args(["--id", &format!("{prefix}{s}")])
                .args(["--api", &format!("127.0.0.1:{port}")])
                .env("LMBUS_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(
                    logs.join(format!("{prefix}{s}.log")),
                )?),
        )?);
        ports.push(port);
    }
    for port in &ports {
        let port = *port;
        lmbus_tests::eventually("the slave's API answers", || async move {
            match Http::connect(port).await {
                Ok(mut http) => http
                    .call("GET", "/v1/status", "")
                    .await
                    .is_ok_and(|s| s.contains("\"connected\":true")),
                Err(_) => false,
            }
        })
        .await?;
    }
    let http_probe = probe(
        [metrics_port].into_iter().chain(ports.clone()).collect(),
        Vec::new(),
    );
    watched.push((
        "lmbus-slave".into(),
        daemons.iter().map(|d| d.pid().as_raw() as u32).collect(),
    ));
    for &(name, transport) in names {
        for &c in levels {
            let n = spread(c);
            let mut conns = Vec::new();
            let mut shared = Vec::new();
            for w in 0..c {
                conns.push(match transport {
                    Transport::Http1 => {
                        Conn::Http1(tokio::sync::Mutex::new(Http::connect(ports[w % n]).await?))
                    }
                    Transport::Pipelined => {
                        if shared.len() < n {
                            shared.push(Pipelined::connect(ports[w % n]).await?);
                        }
                        Conn::Pipelined(shared[w % n].clone())
                    }
                });
            }
            let conns = Arc::new(conns);
            // Each worker's agent, its registration's body and its release's path, made
            // once (as the Redis row's holder names are).
            let calls: Arc<Vec<_>> = Arc::new(
                (0..c)
                    .map(|w| {
                        let agent = format!("{name}-{c}-w{w}");
                        let body = format!(r#"{{"agent_id":"{agent}","agent_type":"inbound"}}"#);
                        let path = format!("/v1/agents/{agent}");
                        (agent, body, path)
                    })
                    .collect(),
            );
            rows.push(
                Row::new(name, c, &watched, move |w, i| {
                    let (conns, calls) = (conns.clone(), calls.clone());
                    async move {
                        let (agent, body, path) = &calls[w];
                        let http = &conns[w];
                        if i % 2 == 0 {
                            let answer = http.call("POST", "/v1/agents", body).await?;
                            if !answer.contains("\"approved\"") {
                                bail!("{agent} was not approved: {answer}");
                            }
                        } else {
                            let answer = http.call("DELETE", path, "").await?;
                            if !answer.contains("true") {
                                bail!("{agent} held no seat to release: {answer}");
                            }
                        }
                        Ok(())
                    }
                })
                .probed(http_probe.clone()),
            );
        }
    }
    Ok((daemons, ports))
}

async fn bench() -> anyhow::Result<()> {
    lmbus_tests::init_tracing();
    let nats = NatsServer::start()?;
    let nats_pid = nats.pid();
    let me = std::process::id();
    let levels = [1usize, 64];
    let mut rows = Vec::new();

    // 1. The NATS floor.
    let echo = Proc::spawn(
        Command::new(std::env::current_exe()?)
            .env(ECHO_ROLE, nats.url())
            .stdout(Stdio::null()),
    )?;
    let watched: Watched = vec![
        ("bench".into(), vec![me]),
        ("nats-server".into(), vec![nats_pid]),
        ("echo".into(), vec![echo.pid().as_raw() as u32]),
    ];
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(nats.client().await?);
    }
    let clients = Arc::new(clients);
    lmbus_tests::eventually("the echo responder answers", || {
        let c = clients[0].clone();
        async move {
            tokio::time::timeout(
                Duration::from_millis(500),
                c.request(ECHO_SUBJECT, Bytes::new()),
            )
            .await
            .is_ok_and(|r| r.is_ok())
        }
    })
    .await?;
    let payload = Bytes::from(vec![b'r'; 64]);
    for c in levels {
        let (clients, payload) = (clients.clone(), payload.clone());
        let n = spread(c);
        rows.push(Row::new("nats_echo", c, &watched, move |w, _| {
            let (client, payload) = (clients[w % n].clone(), payload.clone());
            async move {
                client.request(ECHO_SUBJECT, payload).await?;
                Ok(())
            }
        }));
    }

    // The ledger's cost alone: a JetStream publish acknowledged by a file-store stream.
    let watched: Watched = vec![
        ("bench".into(), vec![me]),
        ("nats-server".into(), vec![nats_pid]),
    ];
    let js = async_nats::jetstream::new(clients[0].clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "LMBUS_BENCH_JS".into(),
        subjects: vec!["lmbus.bench.js".into()],
        max_messages: 100_000,
        ..Default::default()
    })
    .await?;
    let streams: Arc<Vec<_>> = Arc::new(
        clients
            .iter()
            .map(|c| async_nats::jetstream::new(c.clone()))
            .collect(),
    );
    for c in levels {
        let (streams, payload) = (streams.clone(), payload.clone());
        let n = spread(c);
        rows.push(Row::new("jetstream_publish", c, &watched, move |w, _| {
            let (js, payload) = (streams[w % n].clone(), payload.clone());
            async move {
                js.publish("lmbus.bench.js", payload).await?.await?;
                Ok(())
            }
        }));
    }

    // 2. The Redis semaphore.
    let (redis, port) = start_redis()?;
    let watched: Watched = vec![
        ("bench".into(), vec![me]),
        ("redis-server".into(), vec![redis.pid().as_raw() as u32]),
    ];
    let redis_client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(redis_client.get_multiplexed_async_connection().await?);
    }
    let conns = Arc::new(conns);
    let script = Arc::new(redis::Script::new(ACQUIRE));
    for c in levels {
        let (conns, script) = (conns.clone(), script.clone());
        let n = spread(c);
        // Each worker's holder name, made once (as the library rows' agent names are).
        let names: Arc<Vec<String>> = Arc::new((0..c).map(|w| format!("w{w}")).collect());
        rows.push(Row::new("redis_semaphore", c, &watched, move |w, i| {
            let (mut conn, script, names) = (conns[w % n].clone(), script.clone(), names.clone());
            async move {
                let holder = names[w].as_str();
                if i % 2 == 0 {
                    let got: i64 = script
                        .key("lmbus-bench-sem")
                        .arg(now_ms())
                        .arg(60_000)
                        .arg(LIMIT)
                        .arg(holder)
                        .invoke_async(&mut conn)
                        .await?;
                    if got != 1 {
                        bail!("the semaphore refused {holder}");
                    }
                } else {
                    let _: i64 = redis::cmd("ZREM")
                        .arg("lmbus-bench-sem")
                        .arg(holder)
                        .query_async(&mut conn)
                        .await?;
                }
                Ok(())
            }
        }));
    }

    // 3. lmbus strict mode: a leader broker with its ledger on.
    let vendor = Vendor::new()?;
    let cluster = cluster_name();
    let license = vendor.master(LIMIT, &[("inbound", LIMIT)])?;
    let logs = tempfile::tempdir()?;
    let metrics_port = free_port();
    let broker = broker_process(
        &nats,
        &cluster,
        &license,
        &vendor,
        metrics_port,
        &[],
        &logs.path().join("broker.log"),
    )?;
    let client = nats.client().await?;
    wait_leader(&client, &cluster).await?;
    let broker_pid = broker.pid().as_raw() as u32;
    eprintln!("broker pid {broker_pid} (for a profiler)");
    let watched: Watched = vec![
        ("bench".into(), vec![me]),
        ("nats-server".into(), vec![nats_pid]),
        ("broker".into(), vec![broker_pid]),
    ];
    let mut slaves = Vec::new();
    for s in 0..CONNECTIONS {
        let cfg = SlaveConfig::new(&nats.url(), &cluster, SlaveId::new(format!("lib{s}"))?);
        slaves.push(SlaveAgent::start(cfg).await?);
    }
    // Kept for the bench's lifetime (see `library_row`).
    let slaves: &'static [SlaveAgent] = slaves.leak();
    let library_probe = probe(vec![metrics_port], slaves.to_vec());
    for c in levels {
        rows.push(library_row("lmbus_library", c, &watched, slaves).probed(library_probe.clone()));
    }
    // The same through `lmbus-slave` daemons and their local HTTP API.
    let (daemons, _) = http_rows(
        &[("lmbus_http", Transport::Http1)],
        &nats.url(),
        &cluster,
        "http",
        metrics_port,
        logs.path(),
        &levels,
        watched,
        &mut rows,
    )
    .await?;
    // 5. lmbus allotment mode: its own broker and cluster on the same server, so the
    // strict rows' broker and ledger are untouched. The slaves admit from blocks of seats
    // (the default refresh, 2 s, and lease, 30 s); each registration is a local decision
    // once the first block arrived (the warm-up second covers it).
    let allot_cluster = cluster_name();
    let allot_metrics_port = free_port();
    let allot_broker = broker_process(
        &nats,
        &allot_cluster,
        &license,
        &vendor,
        allot_metrics_port,
        &["--admission", "allotment"],
        &logs.path().join("allot-broker.log"),
    )?;
    wait_leader(&client, &allot_cluster).await?;
    let watched: Watched = vec![
        ("bench".into(), vec![me]),
        ("nats-server".into(), vec![nats_pid]),
        ("broker".into(), vec![allot_broker.pid().as_raw() as u32]),
    ];
    let mut allot_slaves = Vec::new();
    for s in 0..CONNECTIONS {
        let cfg = SlaveConfig::new(
            &nats.url(),
            &allot_cluster,
            SlaveId::new(format!("allot{s}"))?,
        );
        allot_slaves.push(SlaveAgent::start(cfg).await?);
    }
    let allot_slaves: &'static [SlaveAgent] = allot_slaves.leak();
    for c in levels {
        rows.push(library_row(
            "lmbus_allotment_library",
            c,
            &watched,
            allot_slaves,
        ));
    }
    // And through `lmbus-slave` daemons of the allotment cluster: the same local decisions
    // behind the local HTTP API.
    let (allot_daemons, _) = http_rows(
        &[
            ("lmbus_allotment_http", Transport::Http1),
            ("lmbus_allotment_http_pipelined", Transport::Pipelined),
        ],
        &nats.url(),
        &allot_cluster,
        "allothttp",
        allot_metrics_port,
        logs.path(),
        &levels,
        watched,
        &mut rows,
    )
    .await?;

    // Each repetition measures every row once, so a change in the machine's speed during
    // the run (it is shared) falls on all rows alike, not on the ones measured last.
    let (reps, length) = settings();
    // The allotment library rows also read the slaves' own histogram of local decisions
    // (`lmbus_slave_local_decision_seconds`: from the call to the answer inside the
    // library, without the worker task's wait for the runtime), before and after each
    // measurement: concurrency → cumulative counts per bucket bound.
    let mut decisions: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for rep in 0..reps {
        for row in rows.iter_mut().filter(|r| r.selected()) {
            let timed = row.name == "lmbus_allotment_library";
            let before = timed.then(|| decision_buckets(allot_slaves));
            row.measure(rep, length).await?;
            if let Some(before) = before {
                let after = decision_buckets(allot_slaves);
                let grown = after
                    .iter()
                    .enumerate()
                    .map(|(i, &(bound, n))| (bound, n - before.get(i).map_or(0.0, |b| b.1)));
                add_buckets(decisions.entry(row.concurrency).or_default(), grown);
            }
        }
    }
    let find = |name: &str, c: usize| rows.iter().find(|r| r.name == name && r.concurrency == c);
    for row in &rows {
        let c = row.concurrency;
        row.report(find("nats_echo", c), find("redis_semaphore", c));
    }
    for (c, buckets) in &decisions {
        report_decisions(*c, buckets);
    }
    for slave in slaves.iter().chain(allot_slaves.iter()) {
        slave.shutdown().await;
    }
    drop((daemons, allot_daemons));
    drop((echo, redis));

    // The invariant checker from the redundancy issue, on the bench's ledgers.
    audit_ledger(&client, &cluster, "audit").await?;
    audit_ledger(&client, &allot_cluster, "audit_allotment").await?;
    drop((broker, allot_broker));
    Ok(())
}
