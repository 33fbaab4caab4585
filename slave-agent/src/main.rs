//! `lmbus-slave`: the slave agent daemon (`run`) and the CLI that talks to a running
//! daemon's local API (`register`, `unregister`, `agents`, `status`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lmbus_schemas::{SlaveId, parse_public_key};
use lmbus_slave::api::{self, ApiOptions, ApiToken, ErrorBody, RegisterBody, Released};
use lmbus_slave::{
    AgentEvent, GracePolicy, LicenseFile, MasterEndpoint, Outcome, Restriction, ReturnPolicy,
    SlaveAgent, SlaveConfig, SlaveStatusView,
};
use serde::Deserialize;
use tracing::{info, warn};

const DEFAULT_API: &str = "127.0.0.1:7411";

#[derive(Debug, Parser)]
#[command(
    name = "lmbus-slave",
    version,
    about = "The lmbus slave agent: registers agents with the master broker, and the CLI for a running agent's local API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: lmbus_nats::config_file::ConfigArg,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, global = true, env = "LMBUS_LOG", default_value = "info")]
    log: String,
    /// Log line format.
    #[arg(long, global = true, env = "LMBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the slave agent daemon with its local HTTP API.
    Run(Box<RunArgs>),
    /// Register an agent through a running daemon; exits 0 if approved, 3 if rejected.
    Register {
        /// The agent's id, unique on this slave (e.g. a user or session name).
        agent_id: String,
        /// Its agent type, one the master license knows (e.g. inbound).
        agent_type: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// Release an agent's seat through a running daemon.
    Unregister {
        /// The id of the agent whose seat to release.
        agent_id: String,
        #[command(flatten)]
        api: ApiArg,
    },
    /// List the agents holding seats on a running daemon.
    Agents {
        #[command(flatten)]
        api: ApiArg,
    },
    /// Show a running daemon's status (connection, limits, recent logouts) as JSON.
    Status {
        #[command(flatten)]
        api: ApiArg,
    },
}

#[derive(Debug, clap::Args)]
struct ApiArg {
    /// Address of the daemon's local API.
    #[arg(long = "api", env = "LMBUS_SLAVE_API", default_value = DEFAULT_API)]
    addr: String,
    /// File with the daemon's API token, for a daemon run with --api-token-file.
    #[arg(long = "api-token-file", env = "LMBUS_SLAVE_API_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl ApiArg {
    /// The `Authorization` header value, when a token file is given.
    fn authorization(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API token file {}", path.display()))?;
        Ok(Some(format!("Bearer {}", text.trim())))
    }
}

/// Every setting can come from a flag, an environment variable or the config file, in that
/// order of precedence.
#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    daemon: lmbus_nats::DaemonArgs,
    /// Cluster name, the same as the master's.
    #[arg(help_heading = "NATS", long, env = "LMBUS_CLUSTER")]
    cluster: Option<String>,
    /// This slave's id, unique in the cluster (A-Z a-z 0-9 - _).
    #[arg(help_heading = "Operations", long, env = "LMBUS_SLAVE_ID")]
    id: Option<String>,
    /// The slave license file [default: none: the slave runs unlicensed].
    ///
    /// Unlicensed, the slave has no local limit, and the master must allow unlicensed
    /// slaves.
    #[arg(help_heading = "License", long, env = "LMBUS_LICENSE")]
    license: Option<PathBuf>,
    /// Run unlicensed even with --license.
    ///
    /// Only for a license with neither the master nor the slave role.
    #[arg(help_heading = "License", long, env = "LMBUS_UNLICENSED", num_args = 0..=1, default_missing_value = "true")]
    unlicensed: Option<bool>,
    /// The vendor's public key file, to verify --license.
    #[arg(help_heading = "License", long, env = "LMBUS_VENDOR_KEY")]
    vendor_key: Option<PathBuf>,
    /// The context this slave runs in: production, backup or development [default: the
    /// license's; production when unlicensed].
    ///
    /// It must be the master's: a master refuses a slave of another context at hello
    /// (`context_mismatch`). An unlicensed slave declares it with this flag; a licensed one
    /// runs in its license's context, and a different --context is refused at start.
    #[arg(help_heading = "License", long, env = "LMBUS_CONTEXT", value_enum)]
    context: Option<ContextArg>,
    /// Where the local HTTP API listens [default: 127.0.0.1:7411].
    ///
    /// A loopback address unless --api-allow-remote is given.
    #[arg(help_heading = "Operations", long, env = "LMBUS_SLAVE_API")]
    api: Option<SocketAddr>,
    /// Let the API listen on a non-loopback address (a sidecar in another container).
    ///
    /// Needs --api-token-file: anyone who reaches the API could take and release seats.
    #[arg(help_heading = "Operations", long, env = "LMBUS_SLAVE_API_ALLOW_REMOTE", num_args = 0..=1, default_missing_value = "true")]
    api_allow_remote: Option<bool>,
    /// File holding the API's bearer token (one line, at least 16 characters).
    ///
    /// Every request but /healthz and /readyz must then carry `Authorization: Bearer
    /// <token>`; the CLI subcommands take the same --api-token-file.
    #[arg(help_heading = "Operations", long, env = "LMBUS_SLAVE_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Heartbeat interval [default: 1s].
    #[arg(help_heading = "Timing", long, env = "LMBUS_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// How long to wait for the master's answer [default: 2s].
    #[arg(help_heading = "Timing", long, env = "LMBUS_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    request_timeout: Option<Duration>,
    /// How long an unanswered request is retried before the master counts as lost [default: 5s].
    ///
    /// Retried with backoff; rides through a broker leader failover. 0 fails over to the
    /// secondary master at the first "no responders".
    #[arg(help_heading = "Timing", long, env = "LMBUS_FAILOVER_WAIT", value_parser = humantime::parse_duration)]
    failover_wait: Option<Duration>,
    /// How long a request is retried while the master's replicas elect a leader [default: 30s].
    ///
    /// They are alive and answer that they have no leader yet; 5-20 s when a NATS node that
    /// led the JetStream streams dies.
    #[arg(help_heading = "Timing", long, env = "LMBUS_ELECTION_WAIT", value_parser = humantime::parse_duration)]
    election_wait: Option<Duration>,
    /// How long to keep working after losing every master [default: 2m].
    #[arg(help_heading = "Grace period", long, env = "LMBUS_GRACE_PERIOD", value_parser = humantime::parse_duration)]
    grace_period: Option<Duration>,
    /// New registrations during the grace period: refuse, or allow locally [default: refuse].
    ///
    /// Allowed ones are reconciled with the master when it answers again.
    #[arg(
        help_heading = "Grace period",
        long,
        env = "LMBUS_DURING_GRACE",
        value_enum
    )]
    during_grace: Option<GraceArg>,
    /// When the grace period ends: log out all agents, or refuse new ones [default: logout-all].
    ///
    /// logout-all lets the master reclaim the seats; refuse-new keeps the current agents,
    /// and the master never reclaims them.
    #[arg(
        help_heading = "Grace period",
        long,
        env = "LMBUS_AFTER_GRACE",
        value_enum
    )]
    after_grace: Option<RestrictionArg>,
    /// NATS URL(s) of a secondary master (usually another site) to fail over to.
    #[arg(
        help_heading = "Secondary master",
        long,
        env = "LMBUS_SECONDARY_NATS_URL"
    )]
    secondary_nats: Option<String>,
    /// Cluster name of the secondary master [default: the primary's].
    #[arg(
        help_heading = "Secondary master",
        long,
        env = "LMBUS_SECONDARY_CLUSTER"
    )]
    secondary_cluster: Option<String>,
    #[command(flatten)]
    secondary_nats_auth: lmbus_nats::SecondaryNatsAuthArgs,
    /// On the secondary, go back when the primary answers again, or stay
    /// [default: return-to-primary].
    #[arg(
        help_heading = "Secondary master",
        long,
        env = "LMBUS_RETURN_POLICY",
        value_enum
    )]
    return_policy: Option<ReturnArg>,
    /// Ask the secondary when the primary rejects for capacity.
    #[arg(help_heading = "Secondary master", long, env = "LMBUS_OVERFLOW", num_args = 0..=1, default_missing_value = "true")]
    overflow: Option<bool>,
    /// Switch to the secondary when the primary answers slower than this [default: 10s].
    #[arg(help_heading = "Secondary master", long, env = "LMBUS_SWITCH_DELAY", value_parser = humantime::parse_duration)]
    switch_delay: Option<Duration>,
    /// NATS URL(s) of a backup master (a backup-context license) to use only while no
    /// production master answers.
    ///
    /// Asked once the primary (and the secondary, if any) have been lost for the failover
    /// wait; left as soon as one answers again, its agents moved back.
    #[arg(help_heading = "Backup master", long, env = "LMBUS_BACKUP_NATS_URL")]
    backup_nats: Option<String>,
    /// Cluster name of the backup master (it is its own cluster) [required with --backup-nats].
    #[arg(help_heading = "Backup master", long, env = "LMBUS_BACKUP_CLUSTER")]
    backup_cluster: Option<String>,
    #[command(flatten)]
    backup_nats_auth: lmbus_nats::BackupNatsAuthArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ReturnArg {
    ReturnToPrimary,
    Stay,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GraceArg {
    Refuse,
    Allow,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RestrictionArg {
    LogoutAll,
    RefuseNew,
}

impl RunArgs {
    fn resolve(self) -> anyhow::Result<(SlaveConfig, ApiOptions)> {
        let cluster = self
            .cluster
            .context("no cluster name: pass --cluster or set LMBUS_CLUSTER")?;
        let id = self
            .id
            .context("no slave id: pass --id or set LMBUS_SLAVE_ID")?;
        let slave_id = SlaveId::new(id)?;
        let nats = self
            .daemon
            .nats
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
        let mut cfg = SlaveConfig::new(&nats, &cluster, slave_id);
        cfg.nats_auth = lmbus_nats::NatsAuth::from(self.daemon.nats_auth);
        let license_path = self.license;
        if let Some(path) = license_path {
            let bytes = std::fs::read(&path)
                .with_context(|| format!("cannot read license file {}", path.display()))?;
            let text = lmbus_schemas::license_text(bytes, &path.display().to_string())?;
            cfg.license = Some(LicenseFile {
                name: path.display().to_string(),
                text,
            });
        }
        if let Some(path) = self.vendor_key {
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("cannot read vendor public key file {}", path.display())
            })?;
            cfg.vendor_key = Some(
                parse_public_key(&text)
                    .with_context(|| format!("vendor key file {}", path.display()))?,
            );
        }
        cfg.unlicensed = self.unlicensed.unwrap_or(false);
        cfg.context = self.context.map(Into::into);
        if let Some(d) = self.heartbeat_interval {
            if d.is_zero() {
                bail!("--heartbeat-interval must be greater than zero");
            }
            cfg.heartbeat_interval = d;
        }
        if let Some(d) = self.request_timeout {
            if d.is_zero() {
                bail!(
                    "--request-timeout must be greater than zero: every request would time out at once (the default is 2s)"
                );
            }
            cfg.request_timeout = d;
        }
        if let Some(d) = self.failover_wait {
            cfg.failover_wait = d;
        }
        if let Some(d) = self.election_wait {
            cfg.election_wait = d;
        }
        if let Some(d) = self.grace_period {
            if d.is_zero() {
                bail!(
                    "--grace-period must be greater than zero: the slave would restrict at its first missed answer (the default is 2 minutes)"
                );
            }
            cfg.grace_period = d;
        }
        if let Some(p) = self.during_grace {
            cfg.during_grace = match p {
                GraceArg::Refuse => GracePolicy::Refuse,
                GraceArg::Allow => GracePolicy::Allow,
            };
        }
        if let Some(r) = self.after_grace {
            cfg.after_grace = match r {
                RestrictionArg::LogoutAll => Restriction::LogoutAll,
                RestrictionArg::RefuseNew => Restriction::RefuseNew,
            };
        }
        if let Some(url) = self.secondary_nats {
            let cluster = self
                .secondary_cluster
                .unwrap_or_else(|| cfg.cluster.clone());
            cfg.secondary = Some(MasterEndpoint {
                nats_url: url,
                nats_auth: lmbus_nats::NatsAuth::from(self.secondary_nats_auth),
                cluster,
            });
        } else if self.secondary_cluster.is_some() {
            bail!("--secondary-cluster needs --secondary-nats");
        }
        match (self.backup_nats, self.backup_cluster) {
            (Some(url), Some(cluster)) => {
                let taken = std::iter::once((&cfg.nats_url, &cfg.cluster))
                    .chain(cfg.secondary.as_ref().map(|s| (&s.nats_url, &s.cluster)))
                    .any(|(u, c)| *u == url && *c == cluster);
                if taken {
                    bail!(
                        "--backup-cluster {cluster} on {url} is a production master's cluster: a backup master runs its own cluster (the backup license's)"
                    );
                }
                cfg.backup = Some(MasterEndpoint {
                    nats_url: url,
                    nats_auth: lmbus_nats::NatsAuth::from(self.backup_nats_auth),
                    cluster,
                });
            }
            (Some(_), None) => bail!(
                "--backup-nats needs --backup-cluster: a backup master runs its own cluster, with its own name"
            ),
            (None, Some(_)) => bail!("--backup-cluster needs --backup-nats"),
            (None, None) => {}
        }
        if let Some(r) = self.return_policy {
            cfg.return_policy = match r {
                ReturnArg::ReturnToPrimary => ReturnPolicy::ReturnToPrimary,
                ReturnArg::Stay => ReturnPolicy::Stay,
            };
        }
        cfg.overflow = self.overflow.unwrap_or(false);
        if cfg.overflow && cfg.secondary.is_none() {
            bail!("--overflow needs a secondary master (--secondary-nats)");
        }
        if let Some(d) = self.switch_delay {
            cfg.switch_delay = d;
        }
        let api = match self.api {
            Some(a) => a,
            None => DEFAULT_API.parse()?,
        };
        let token = match self.api_token_file {
            Some(path) => Some(ApiToken::read(&path)?),
            None => None,
        };
        let api = ApiOptions {
            addr: api,
            allow_remote: self.api_allow_remote.unwrap_or(false),
            token,
        };
        // Before the agent says hello: a daemon that cannot serve its API never joins.
        api.check()?;
        Ok((cfg, api))
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// Runs the daemon until `shutdown`: the agent, its local API and a log of agent events.
async fn run(cfg: SlaveConfig, api: ApiOptions) -> anyhow::Result<()> {
    let slave_id = cfg.slave_id.clone();
    let agent = SlaveAgent::start(cfg)
        .await
        .with_context(|| format!("slave {slave_id} cannot start"))?;
    let (stop_api, stop_api_rx) = tokio::sync::oneshot::channel::<()>();
    let bound = api::bind_with(agent.clone(), api, async move {
        let _ = stop_api_rx.await;
    })
    .await;
    let (bound, server) = match bound {
        Ok(bound) => bound,
        Err(e) => {
            // It said hello already: say goodbye, so the master does not keep a ghost row.
            agent
                .stop(&format!(
                    "failed at startup: {}",
                    lmbus_schemas::printable(&format!("{e:#}"))
                ))
                .await;
            return Err(e);
        }
    };
    info!(slave = %slave_id, "local API listening on http://{bound}");
    let server = tokio::spawn(server);
    let mut events = agent.subscribe();
    let log_events = tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                AgentEvent::LoggedOut(l) => warn!(
                    agent = %l.agent_id, agent_type = %l.agent_type, reason = %l.reason,
                    "agent logged out: {}", l.detail
                ),
                AgentEvent::Connected { master, broker_id } => {
                    info!(%master, broker = %broker_id, "connected")
                }
                AgentEvent::Disconnected { master, detail } => {
                    warn!(%master, "disconnected: {detail}")
                }
                AgentEvent::Switched { master, reason } => {
                    warn!(%master, "new registrations go to the {master} master: {reason}")
                }
                AgentEvent::Restricted { logged_out } => warn!(
                    logged_out,
                    "no master for the whole grace period: usage restricted"
                ),
            }
        }
    });
    shutdown_signal().await;
    info!("shutting down: releasing seats");
    let _ = stop_api.send(());
    let _ = server.await;
    agent.shutdown().await;
    log_events.abort();
    Ok(())
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn api_url(addr: &str, path: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        format!("{}{path}", addr.trim_end_matches('/'))
    } else {
        format!("http://{addr}{path}")
    }
}

fn read_answer<T: for<'de> Deserialize<'de>>(
    mut response: ureq::http::Response<ureq::Body>,
    url: &str,
) -> anyhow::Result<T> {
    let status = response.status();
    if !status.is_success() {
        match response.body_mut().read_json::<ErrorBody>() {
            Ok(body) => bail!("{url}: {} ({})", body.error.message, body.error.hint),
            Err(_) => bail!("{url}: HTTP {status}"),
        }
    }
    response
        .body_mut()
        .read_json()
        .with_context(|| format!("{url}: unexpected answer"))
}

/// `request` with the `Authorization` header when `api` names a token file.
fn with_token<B>(
    request: ureq::RequestBuilder<B>,
    api: &ApiArg,
) -> anyhow::Result<ureq::RequestBuilder<B>> {
    Ok(match api.authorization()? {
        Some(value) => request.header("Authorization", value),
        None => request,
    })
}

fn client_command(command: Command) -> anyhow::Result<ExitCode> {
    let agent = http();
    let unreachable = |url: &str| {
        format!(
            "cannot reach the lmbus-slave local API at {url}: is `lmbus-slave run` running there (see --api)?"
        )
    };
    match command {
        Command::Register {
            agent_id,
            agent_type,
            api,
        } => {
            let url = api_url(&api.addr, "/v1/agents");
            let mut response = with_token(agent.post(&url), &api)?
                .send_json(&RegisterBody {
                    agent_id: agent_id.clone(),
                    agent_type,
                })
                .with_context(|| unreachable(&url))?;
            // A refusal is 409 (503 when no master could decide) with the outcome in the
            // body; it still exits 3.
            let status = response.status();
            let outcome: Outcome = if status == ureq::http::StatusCode::CONFLICT
                || status == ureq::http::StatusCode::SERVICE_UNAVAILABLE
            {
                let body: serde_json::Value = response
                    .body_mut()
                    .read_json()
                    .with_context(|| format!("{url}: HTTP {status}, unexpected answer"))?;
                match serde_json::from_value::<Outcome>(body.clone()) {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        let error: ErrorBody = serde_json::from_value(body)
                            .with_context(|| format!("{url}: HTTP {status}"))?;
                        bail!("{url}: {} ({})", error.error.message, error.error.hint);
                    }
                }
            } else {
                read_answer(response, &url)?
            };
            match outcome {
                Outcome::Approved { already_held } => {
                    println!(
                        "approved {agent_id}{}",
                        if already_held { " (already held)" } else { "" }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Outcome::Rejected { reason, detail } => {
                    println!("rejected {agent_id}: {reason}: {detail}");
                    Ok(ExitCode::from(3))
                }
            }
        }
        Command::Unregister { agent_id, api } => {
            // An agent id may hold `?`, `#` or `/`: one path segment, percent-encoded.
            let segment = percent_encoding::utf8_percent_encode(
                &agent_id,
                percent_encoding::NON_ALPHANUMERIC,
            );
            let url = api_url(&api.addr, &format!("/v1/agents/{segment}"));
            let mut response = with_token(agent.delete(&url), &api)?
                .call()
                .with_context(|| unreachable(&url))?;
            // An agent that held no seat is a 404 `agent_not_found`: not a failure here.
            let released = if response.status() == ureq::http::StatusCode::NOT_FOUND {
                let body: ErrorBody = response
                    .body_mut()
                    .read_json()
                    .with_context(|| format!("{url}: HTTP 404, unexpected answer"))?;
                if body.error.code != "agent_not_found" {
                    bail!("{url}: {} ({})", body.error.message, body.error.hint);
                }
                false
            } else {
                read_answer::<Released>(response, &url)?.released
            };
            println!(
                "{agent_id}: {}",
                if released { "released" } else { "held no seat" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents { api } => {
            let url = api_url(&api.addr, "/v1/agents");
            let response = with_token(agent.get(&url), &api)?
                .call()
                .with_context(|| unreachable(&url))?;
            let agents: Vec<lmbus_schemas::AgentClaim> = read_answer(response, &url)?;
            for a in agents {
                println!("{}\t{}", a.agent_id, a.agent_type);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { api } => {
            let url = api_url(&api.addr, "/v1/status");
            let response = with_token(agent.get(&url), &api)?
                .call()
                .with_context(|| unreachable(&url))?;
            let status: SlaveStatusView = read_answer(response, &url)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(_) => unreachable!("run is handled by main"),
    }
}

fn init_tracing(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli: Cli = lmbus_nats::config_file::parse();
    init_tracing(&cli.log, cli.log_format);
    let result = match cli.command {
        Command::Run(args) => args.resolve().and_then(|(cfg, api)| {
            // One thread, like the broker's: the daemon only waits on sockets, and without a
            // second worker no wake-up crosses threads (the throughput bench's lmbus_http
            // row at concurrency 64 made 1.15-1.2x the operations a second of the
            // two-thread runtime, alternating runs).
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?
                .block_on(run(cfg, api))
                .map(|()| ExitCode::SUCCESS)
        }),
        other => client_command(other),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lmbus-slave: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--context`: one of the three license contexts (a clap value enum, so `--help` and
/// the config file check list them).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ContextArg {
    Production,
    Backup,
    Development,
}

impl From<ContextArg> for lmbus_schemas::Context {
    fn from(c: ContextArg) -> Self {
        match c {
            ContextArg::Production => lmbus_schemas::Context::Production,
            ContextArg::Backup => lmbus_schemas::Context::Backup,
            ContextArg::Development => lmbus_schemas::Context::Development,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every subcommand says what it is in `--help`.
    #[test]
    fn every_argument_has_help() {
        let missing =
            lmbus_nats::cli_help::undocumented_arguments(&<Cli as clap::CommandFactory>::command());
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }

    /// Every long flag of `run` and of the client commands is a config file key that
    /// takes effect (a new flag is one by construction; this checks that each value
    /// reaches it), and a key no command takes is refused, naming the key and the file.
    #[test]
    fn every_flag_is_a_config_key_and_unknown_keys_are_refused() {
        let failed = lmbus_nats::config_file::keys_not_applied::<Cli>(&[]);
        assert!(
            failed.is_empty(),
            "flags the config file cannot set: {failed:#?}"
        );
        let keys = lmbus_nats::config_file::keys(&<Cli as clap::CommandFactory>::command());
        for key in [
            "nats_user",
            "secondary_nats_creds",
            "log",
            "api",
            "grace_period",
        ] {
            assert!(keys.contains(key), "{key} is not a key: {keys:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slave.toml");
        std::fs::write(&path, "[secondary_nats_auth]\nuser = \"s\"\n").unwrap();
        let e = lmbus_nats::config_file::try_parse_from::<Cli, _, _>([
            "lmbus-slave",
            "run",
            "--config",
            path.to_str().unwrap(),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(path.to_str().unwrap())
                && e.contains("unknown key secondary_nats_auth")
                && e.contains("write secondary_nats_user instead"),
            "{e}"
        );
    }

    /// `--backup-nats` names a backup master: its own cluster name is required and may not
    /// be a production master's on the same NATS; its credentials are its own flags.
    #[test]
    fn a_backup_master_needs_its_own_cluster() {
        let resolve = |extra: &[&str]| {
            let mut args = vec!["lmbus-slave", "run", "--cluster", "acme", "--id", "site1"];
            args.extend_from_slice(extra);
            let cli: Cli = lmbus_nats::config_file::try_parse_from(args).unwrap();
            let Command::Run(run) = cli.command else {
                panic!("not run")
            };
            run.resolve().map(|(cfg, _)| cfg).map_err(|e| e.to_string())
        };
        let e = resolve(&["--backup-nats", "nats://dr:4222"]).unwrap_err();
        assert!(e.contains("--backup-nats needs --backup-cluster"), "{e}");
        let e = resolve(&["--backup-cluster", "acmedr"]).unwrap_err();
        assert!(e.contains("--backup-cluster needs --backup-nats"), "{e}");
        let e = resolve(&[
            "--nats",
            "nats://n:4222",
            "--backup-nats",
            "nats://n:4222",
            "--backup-cluster",
            "acme",
        ])
        .unwrap_err();
        assert!(e.contains("is a production master's cluster"), "{e}");
        let cfg = resolve(&[
            "--backup-nats",
            "nats://dr:4222",
            "--backup-cluster",
            "acmedr",
            "--backup-nats-user",
            "site1dr",
        ])
        .unwrap();
        let backup = cfg.backup.expect("the backup master");
        assert_eq!(
            (backup.nats_url.as_str(), backup.cluster.as_str()),
            ("nats://dr:4222", "acmedr")
        );
        assert_eq!(backup.nats_auth.user.as_deref(), Some("site1dr"));
        assert!(cfg.secondary.is_none());
    }

    /// One file serves the daemon and its CLI: `api` is the address `run` listens on and
    /// the one `status` asks; paths are relative to the file; flags win.
    #[test]
    fn one_file_serves_run_and_the_client_commands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slave.toml");
        std::fs::write(
            &path,
            "cluster = \"acme\"\nid = \"site1\"\nnats_user = \"site1\"\nnats_password = \"pw\"\n\
             license = \"site1.lic\"\napi = \"127.0.0.1:7499\"\ngrace_period = \"90s\"\n\
             during_grace = \"allow\"\noverflow = false\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let cli: Cli =
            lmbus_nats::config_file::try_parse_from(["lmbus-slave", "run", "--config", file])
                .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.daemon.nats_auth.nats_user.as_deref(), Some("site1"));
        assert_eq!(run.license, Some(dir.path().join("site1.lic")));
        assert_eq!(run.api, Some("127.0.0.1:7499".parse().unwrap()));
        assert_eq!(run.grace_period, Some(Duration::from_secs(90)));
        assert!(matches!(run.during_grace, Some(GraceArg::Allow)));
        let cli: Cli =
            lmbus_nats::config_file::try_parse_from(["lmbus-slave", "--config", file, "status"])
                .unwrap();
        let Command::Status { api } = cli.command else {
            panic!("not status")
        };
        assert_eq!(api.addr, "127.0.0.1:7499");
        let cli: Cli = lmbus_nats::config_file::try_parse_from([
            "lmbus-slave",
            "agents",
            "--api",
            "127.0.0.1:1",
            "--config",
            file,
        ])
        .unwrap();
        let Command::Agents { api } = cli.command else {
            panic!("not agents")
        };
        assert_eq!(api.addr, "127.0.0.1:1");
    }
}
