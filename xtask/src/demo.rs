//! `cargo xtask demo`: a broker, three slaves (one licensed with a local limit, two
//! unlicensed), a workload that goes over the limits, and the alert tail, as real
//! processes against a local NATS. It checks at the end that it showed what it promises
//! (approvals, rejections at the local and aggregate limits, and their alerts in the
//! monitor) and fails otherwise, so CI can run it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::nats;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long the workload runs.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// NATS URL to use if something answers there (any server: the demo's streams are
    /// made there and removed at the end); otherwise a local nats-server is started on a
    /// free port [default: nats://127.0.0.1:4222].
    #[arg(long)]
    pub nats: Option<String>,
    /// Always start a private nats-server, even if one answers at --nats.
    #[arg(long)]
    pub own_nats: bool,
    /// Keep the directory with the keys, licenses and logs [default: removed at the end,
    /// unless the demo failed].
    #[arg(long)]
    pub keep: bool,
    /// Do not run `cargo build` first (the binaries must already be built).
    #[arg(long)]
    pub no_build: bool,
    /// Where the web dashboard (`lmbus-monitor web`, read-only, no login) listens while
    /// the demo runs; a free port on 127.0.0.1 when this one is taken (or is 0).
    #[arg(long, default_value = "127.0.0.1:8470")]
    pub web: std::net::SocketAddr,
}

const SLAVES: [&str; 3] = ["site-licensed", "site-unlicensed-1", "site-unlicensed-2"];

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Child2 {
    name: &'static str,
    child: Child,
}

impl Child2 {
    fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self, sig: Signal) {
        self.signal(sig);
        if self.wait(Duration::from_secs(10)).is_none() {
            eprintln!("demo: {} did not stop on {sig}; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Child2 {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Signal::SIGTERM);
        }
    }
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .context("cannot locate the target directory")?
        .to_path_buf())
}

fn tool(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

fn check(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A small deterministic pseudo-random sequence, so a demo run is reproducible.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[derive(Default)]
struct Tally {
    approved: usize,
    rejected: BTreeMap<String, usize>,
}

struct Workload {
    http: ureq::Agent,
    apis: BTreeMap<&'static str, String>,
    held: Vec<(&'static str, String)>,
    tally: Tally,
}

impl Workload {
    fn register(
        &mut self,
        slave: &'static str,
        agent: &str,
        agent_type: &str,
    ) -> anyhow::Result<()> {
        let url = format!("http://{}/v1/agents", self.apis[slave]);
        let answer: Value = self
            .http
            .post(&url)
            .send_json(json!({ "agent_id": agent, "agent_type": agent_type }))
            .with_context(|| format!("POST {url}"))?
            .body_mut()
            .read_json()?;
        match answer["outcome"].as_str() {
            Some("approved") => {
                self.tally.approved += 1;
                self.held.push((slave, agent.to_owned()));
                println!(
                    "[workload] {slave:<18} register {agent:<8} ({agent_type:<8}) -> approved"
                );
            }
            Some("rejected") => {
                let reason = answer["reason"].as_str().unwrap_or("?").to_owned();
                println!(
                    "[workload] {slave:<18} register {agent:<8} ({agent_type:<8}) -> REJECTED {reason}: {}",
                    answer["detail"].as_str().unwrap_or("")
                );
                *self.tally.rejected.entry(reason).or_default() += 1;
            }
            _ => println!("[workload] {slave:<18} register {agent}: unexpected answer {answer}"),
        }
        Ok(())
    }

    fn unregister(&mut self, index: usize) -> anyhow::Result<()> {
        let (slave, agent) = self.held.swap_remove(index);
        let url = format!("http://{}/v1/agents/{agent}", self.apis[slave]);
        self.http
            .delete(&url)
            .call()
            .with_context(|| format!("DELETE {url}"))?;
        println!("[workload] {slave:<18} unregister {agent:<8}            -> released");
        Ok(())
    }
}

/// The text of the element with this `id` in a dashboard page, up to its first tag.
fn text_of<'a>(html: &'a str, id: &str) -> &'a str {
    let Some(at) = html.find(&format!("id=\"{id}\"")) else {
        return "?";
    };
    let rest = &html[at..];
    let start = rest.find('>').map_or(rest.len(), |i| i + 1);
    let rest = &rest[start..];
    &rest[..rest.find('<').unwrap_or(rest.len())]
}

/// Each dashboard page fetched once, in a line that says what it shows; a page that does
/// not answer 200 fails the demo.
fn dashboard_pages(http: &ureq::Agent, base: &str) -> anyhow::Result<Vec<String>> {
    let get = |path: &str| -> anyhow::Result<String> {
        let mut answer = http
            .get(&format!("{base}{path}"))
            .call()
            .with_context(|| format!("the web dashboard at {base} did not answer {path}"))?;
        let status = answer.status();
        let body = answer.body_mut().read_to_string()?;
        if status != 200 {
            bail!("the web dashboard answered {path} with {status}: {body}");
        }
        Ok(body)
    };
    let rows = |html: &str, marker: &str| html.matches(marker).count();
    let overview = get("/")?;
    let slaves = get("/slaves")?;
    let seats = get("/seats")?;
    let denials = get("/denials")?;
    let history = get("/history")?;
    let licenses = get("/licenses")?;
    let alerts = get("/alerts")?;
    let total_peak = history
        .find("data-series=\"total\"")
        .and_then(|at| history[at..].split("<td class=\"peak\">").nth(1))
        .and_then(|rest| rest.split('<').next())
        .unwrap_or("?");
    Ok(vec![
        format!(
            "/ (overview): seats in use {}, leader {}, slaves connected {}",
            text_of(&overview, "total-in-use"),
            text_of(&overview, "leader"),
            text_of(&overview, "slaves-connected"),
        ),
        format!(
            "/slaves: slaves listed {}",
            rows(&slaves, "<tr data-slave=")
        ),
        format!("/seats: seats held {}", text_of(&seats, "seat-count")),
        format!(
            "/denials: refused registrations {}",
            text_of(&denials, "denial-count")
        ),
        format!(
            "/history: series charted {}, peak of the total {total_peak}",
            rows(&history, "<tr data-series=")
        ),
        format!(
            "/licenses: days left {}",
            text_of(&licenses, "license-days")
        ),
        format!("/alerts: recent alerts {}", text_of(&alerts, "alert-count")),
    ])
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !ok() {
        if Instant::now() > deadline {
            bail!("{what}: not ready within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Ctrl-C also reaches the child processes (same process group); they shut down
        // gracefully on their own and the demo then summarizes.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    if !args.no_build {
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--quiet", "--workspace", "--bins"])
            .status()?;
        if !status.success() {
            bail!("cargo build failed");
        }
    }
    let bins = bin_dir()?;
    let (broker_bin, slave_bin, monitor_bin, license_bin) = (
        tool(&bins, "lmbus-broker")?,
        tool(&bins, "lmbus-slave")?,
        tool(&bins, "lmbus-monitor")?,
        tool(&bins, "lmbus-license")?,
    );

    let url = args
        .nats
        .clone()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let _own_server;
    let using_shared_nats = !args.own_nats && nats::reachable(&url);
    let url = if using_shared_nats {
        println!(
            "demo: using the NATS server already answering at {url}{}; pass --own-nats to start a private one instead",
            if args.nats.is_none() {
                " (the default --nats)"
            } else {
                ""
            }
        );
        url
    } else {
        let bin = nats::ensure_server()?;
        let server = nats::LocalServer::start(&bin)?;
        println!(
            "demo: {}; started {} with JetStream at {}",
            if args.own_nats {
                "a private NATS (--own-nats)".to_owned()
            } else {
                format!("no NATS answers at {url}")
            },
            bin.display(),
            server.url
        );
        let started = server.url.clone();
        _own_server = server;
        started
    };

    // Each run gets its own cluster name, so a ledger left by an earlier run (on a shared
    // NATS) is never replayed into this one.
    let cluster = format!("demo-{}", std::process::id());
    let cluster = cluster.as_str();
    let mut work = tempfile::Builder::new().prefix("lmbus-demo-").tempdir()?;
    work.disable_cleanup(args.keep);
    let work_dir = work.path().to_owned();
    let dir = work_dir.as_path();
    println!(
        "demo: keys, licenses and logs in {} ({})",
        dir.display(),
        if args.keep {
            "kept afterwards"
        } else {
            "removed at the end unless the demo fails; --keep keeps it"
        }
    );
    check(
        Command::new(&license_bin)
            .args(["keygen", "--out"])
            .arg(dir),
    )?;
    let expires = "2099-12-31";
    check(
        Command::new(&license_bin)
            .args(["sign", "--key"])
            .arg(dir.join("vendor.key"))
            .arg("--out")
            .arg(dir.join("master.lic"))
            .args(["--customer", "Demo Contact Centres", "--role", "master"])
            .args([
                "--total",
                "8",
                "--agent-type",
                "inbound=5",
                "--agent-type",
                "outbound=4",
            ])
            .args(["--expires", expires]),
    )?;
    check(
        Command::new(&license_bin)
            .args(["sign", "--key"])
            .arg(dir.join("vendor.key"))
            .arg("--out")
            .arg(dir.join("slave.lic"))
            .args(["--customer", "Demo Contact Centres", "--role", "slave"])
            .args(["--local", "3", "--expires", expires]),
    )?;
    println!(
        "demo: master license: 8 seats (inbound 5, outbound 4); site-licensed has a slave license with a local limit of 3; the other two sites are unlicensed"
    );

    let log =
        |name: &str| -> anyhow::Result<File> { Ok(File::create(dir.join(format!("{name}.log")))?) };
    let mut broker = Child2 {
        name: "lmbus-broker",
        child: Command::new(&broker_bin)
            .args([
                "run",
                "--nats",
                &url,
                "--cluster",
                cluster,
                "--id",
                "demo-master",
            ])
            .arg("--license")
            .arg(dir.join("master.lic"))
            .arg("--vendor-key")
            .arg(dir.join("vendor.pub"))
            .args(["--allow-unlicensed-slaves", "--counts-interval", "10s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("broker")?)
            .spawn()?,
    };
    let monitor_ready = |timeout: &str| {
        Command::new(&monitor_bin)
            .args([
                "--nats",
                &url,
                "--cluster",
                cluster,
                "licenses",
                "--timeout",
                timeout,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    wait_until("broker", Duration::from_secs(20), || monitor_ready("1s"))?;
    println!(
        "demo: broker up (logs: {})",
        dir.join("broker.log").display()
    );

    let mut tail = Child2 {
        name: "lmbus-monitor tail",
        child: Command::new(&monitor_bin)
            .args(["--nats", &url, "--cluster", cluster, "tail"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    };
    let monitor_lines = Arc::new(AtomicUsize::new(0));
    let monitor_rejections = Arc::new(AtomicUsize::new(0));
    let tail_out = tail.child.stdout.take().context("monitor stdout")?;
    let tail_err = tail.child.stderr.take().context("monitor stderr")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(tail_err).lines().map_while(Result::ok) {
            let _ = ready_tx.send(());
            eprintln!("[monitor] {line}");
        }
    });
    let printer = {
        let (lines, rejections) = (monitor_lines.clone(), monitor_rejections.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(tail_out).lines().map_while(Result::ok) {
                lines.fetch_add(1, Ordering::SeqCst);
                if line.contains("registration_rejected") {
                    rejections.fetch_add(1, Ordering::SeqCst);
                }
                println!("[monitor] {line}");
            }
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .context("the monitor did not start tailing")?;

    let web_addr = if args.web.port() != 0 && std::net::TcpListener::bind(args.web).is_ok() {
        args.web.to_string()
    } else {
        format!("127.0.0.1:{}", nats::free_port()?)
    };
    let _web = Child2 {
        name: "lmbus-monitor web",
        child: Command::new(&monitor_bin)
            .args(["--nats", &url, "--cluster", cluster, "web", "--listen"])
            .arg(&web_addr)
            .args(["--every", "1s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log("web")?)
            .spawn()?,
    };
    let web_url = format!("http://{web_addr}");

    let mut slaves = Vec::new();
    let mut apis = BTreeMap::new();
    for name in SLAVES {
        let api = format!("127.0.0.1:{}", nats::free_port()?);
        let mut cmd = Command::new(&slave_bin);
        cmd.args(["run", "--nats", &url, "--cluster", cluster, "--id", name])
            .args(["--api", &api])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log(name)?);
        if name == "site-licensed" {
            cmd.arg("--license")
                .arg(dir.join("slave.lic"))
                .arg("--vendor-key")
                .arg(dir.join("vendor.pub"));
        }
        slaves.push(Child2 {
            name: "lmbus-slave",
            child: cmd.spawn()?,
        });
        apis.insert(name, api);
    }
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    for (name, api) in &apis {
        wait_until(&format!("slave {name}"), Duration::from_secs(20), || {
            http.get(&format!("http://{api}/v1/status"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| v["connected"] == json!(true))
        })?;
    }
    println!(
        "demo: 3 slaves connected; workload starts; the web dashboard is at {web_url}/ while the demo runs"
    );

    let mut w = Workload {
        http,
        apis,
        held: Vec::new(),
        tally: Tally::default(),
    };
    // A scripted opening that reaches every limit, then a random mix.
    let script: [(&str, &str, &str); 9] = [
        ("site-licensed", "lic-1", "inbound"),
        ("site-licensed", "lic-2", "inbound"),
        ("site-licensed", "lic-3", "outbound"),
        ("site-licensed", "lic-4", "inbound"),
        ("site-unlicensed-1", "u1-1", "outbound"),
        ("site-unlicensed-1", "u1-2", "outbound"),
        ("site-unlicensed-1", "u1-3", "outbound"),
        ("site-unlicensed-2", "u2-1", "outbound"),
        ("site-unlicensed-2", "u2-2", "inbound"),
    ];
    for (slave, agent, t) in script {
        let slave = SLAVES
            .into_iter()
            .find(|s| *s == slave)
            .unwrap_or(SLAVES[0]);
        w.register(slave, agent, t)?;
        std::thread::sleep(Duration::from_millis(150));
    }
    w.register("site-unlicensed-2", "u2-3", "inbound")?;
    w.register("site-unlicensed-2", "u2-4", "inbound")?;

    let mut rng = Xorshift(0x2545_F491_4F6C_DD1D);
    let deadline = Instant::now() + args.duration;
    let mut next_id = 0;
    while Instant::now() < deadline && !interrupted.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(400));
        let step = if !w.held.is_empty() && rng.below(2) == 0 {
            let i = rng.below(w.held.len());
            w.unregister(i)
        } else {
            next_id += 1;
            let slave = SLAVES[rng.below(3)];
            let t = ["inbound", "outbound"][rng.below(2)];
            w.register(slave, &format!("w-{next_id}"), t)
        };
        if let Err(e) = step {
            // After Ctrl-C the slaves are already stopping; anything else is a real failure.
            if interrupted.load(Ordering::SeqCst) {
                break;
            }
            return Err(e);
        }
    }
    if interrupted.load(Ordering::SeqCst) {
        println!("demo: interrupted; shutting down");
    } else {
        println!("demo: workload done; License Monitor view:");
        match check(Command::new(&monitor_bin).args([
            "--nats",
            &url,
            "--cluster",
            cluster,
            "licenses",
        ])) {
            Ok(table) => {
                for line in table.lines() {
                    println!("[licenses] {line}");
                }
            }
            Err(e) => println!("demo: could not show the License Monitor view: {e:#}"),
        }
        // The dashboard polls the status every second (--every 1s): let it see the end.
        std::thread::sleep(Duration::from_secs(2));
        for line in dashboard_pages(&w.http, &web_url)? {
            println!("[web] {line}");
        }
    }

    for slave in &mut slaves {
        slave.stop(Signal::SIGTERM);
    }
    broker.stop(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    tail.stop(Signal::SIGINT);
    let _ = printer.join();
    if using_shared_nats {
        // Leave nothing behind in someone else's JetStream.
        if let Err(e) = check(Command::new(&broker_bin).args([
            "admin",
            "remove-state",
            "--nats",
            &url,
            "--cluster",
            cluster,
            "--yes",
        ])) {
            println!("demo: could not remove the demo's ledger streams: {e:#}");
        }
    }

    let rejected: Vec<String> = w
        .tally
        .rejected
        .iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect();
    println!(
        "demo summary: {} approved; rejected: {}; the monitor printed {} alerts, {} of them registration_rejected",
        w.tally.approved,
        if rejected.is_empty() {
            "none".to_owned()
        } else {
            rejected.join(", ")
        },
        monitor_lines.load(Ordering::SeqCst),
        monitor_rejections.load(Ordering::SeqCst)
    );
    if interrupted.load(Ordering::SeqCst) {
        return Ok(());
    }
    let seen = |r: &str| w.tally.rejected.get(r).copied().unwrap_or(0) > 0;
    let mut missing = Vec::new();
    if w.tally.approved == 0 {
        missing.push("an approval");
    }
    if !seen("local_limit") {
        missing.push("a local_limit rejection");
    }
    if !seen("aggregate_limit") {
        missing.push("an aggregate_limit rejection");
    }
    if monitor_rejections.load(Ordering::SeqCst) == 0 {
        missing.push("a registration_rejected alert in the monitor");
    }
    if !missing.is_empty() {
        // The logs explain it: they stay.
        work.disable_cleanup(true);
        bail!(
            "the demo did not show {}: see the logs in {} (kept)",
            missing.join(", "),
            dir.display()
        );
    }
    if args.keep {
        println!("demo: keys, licenses and logs kept in {}", dir.display());
    } else {
        println!(
            "demo: removed {} (run with --keep to keep it)",
            dir.display()
        );
    }
    Ok(())
}
