//! `lmbus-broker`: parses the command line, sets up logging and runs the master broker
//! until Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lmbus_broker::config::{
    self, BrokerConfig, DEFAULT_COUNTS_INTERVAL, DEFAULT_EXPIRY_WARNING_DAYS, DEFAULT_MAX_SLAVES,
    DEFAULT_MISSED_HEARTBEATS, DEFAULT_NATS_URL, DEFAULT_TICK_INTERVAL,
};

#[derive(Debug, Parser)]
#[command(
    name = "lmbus-broker",
    version,
    about = "The lmbus master broker: enforces one aggregate concurrent-license limit across many slave agents over NATS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: lmbus_nats::config_file::ConfigArg,
    /// Log filter (tracing's EnvFilter syntax, e.g. `info` or `lmbus_broker=debug`)
    /// [default: info for `run`, warn for the admin commands, whose output is their answer].
    #[arg(long, global = true, env = "LMBUS_LOG")]
    log: Option<String>,
    /// Log line format.
    #[arg(long, global = true, env = "LMBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at startup: the size of the flag set does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the master broker.
    Run(RunArgs),
    /// Operator commands sent to a running master.
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// Where an admin command goes: the master's NATS and cluster.
#[derive(Debug, clap::Args)]
struct AdminTarget {
    /// NATS server URL(s) of the master.
    #[arg(long, env = "LMBUS_NATS_URL", default_value = DEFAULT_NATS_URL, help_heading = "NATS")]
    nats: String,
    #[command(flatten)]
    nats_auth: lmbus_nats::NatsAuthArgs,
    /// Cluster name of the master (as its `run --cluster`).
    #[arg(long, env = "LMBUS_CLUSTER")]
    cluster: String,
}

#[derive(Debug, Subcommand)]
enum SyncCommand {
    /// Sync with the vendor now and wait for the outcome.
    ///
    /// The leader asks the vendor (on lmbus.vendor.v1.sync, through the leaf node to the
    /// vendor's NATS) for the master license's current state, checks the answer's vendor
    /// signature, applies its license as `admin reload-license` would and records the sync
    /// in the ledger: the offline limit (sync_within_days) counts from it.
    Now {
        #[command(flatten)]
        target: AdminTarget,
        /// Who is asking, for the alert [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
    /// Air-gapped sites: write a sync request to FILE for the vendor (`lmbus-vendor answer`).
    ///
    /// The request's id is recorded in the ledger: the vendor's answer applies once, to it,
    /// with `admin sync import`.
    Export {
        /// Where to write the request (JSON: the license id, the cluster name, the usage
        /// summary; no agent ids).
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
        #[command(flatten)]
        target: AdminTarget,
        /// Who is asking, for the alert [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
    /// Air-gapped sites: apply the vendor's answer FILE to a request made by `sync export`.
    ///
    /// Checked like a sync over NATS (the vendor's signature; its license through the
    /// reload path), and only for an exported request not applied yet.
    Import {
        /// The vendor's answer (JSON, from `lmbus-vendor answer`).
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
        #[command(flatten)]
        target: AdminTarget,
        /// Who is asking, for the alert [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Show the license, limits, usage by slave and agent type, leader and replicas (lmstat).
    ///
    /// The same view as `lmbus-monitor licenses --once`.
    Status {
        #[command(flatten)]
        target: AdminTarget,
        /// Print the master's status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the usage report of the period so far now, and print it.
    ///
    /// The leader writes it (files, the report subject, mail) as it does the daily one.
    Report {
        #[command(flatten)]
        target: AdminTarget,
        /// Print the report as JSON instead of text (with --beside, a JSON array).
        #[arg(long)]
        json: bool,
        /// Also ask the master of this cluster and print the reports side by side (repeat).
        ///
        /// E.g. the backup master, on the same NATS.
        #[arg(long)]
        beside: Vec<String>,
        /// Also print this usage report file beside (repeat).
        ///
        /// The JSON a master wrote: its report file (`--report-dir`), or `admin report
        /// --json` asked on its own NATS. E.g. a backup master at another site: the minutes
        /// both were in use come from the two reports' spans of use.
        #[arg(long, value_name = "FILE")]
        beside_file: Vec<std::path::PathBuf>,
        /// Who is asking, for the alert and the audit trail [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
    /// List who holds what: every seat with its slave, agent, type, since when and which
    /// replica granted it (like lmstat -a).
    ///
    /// One status request for the slave list, then one per slave that holds seats. MASTER
    /// is what this master is to the slave now (only, primary or secondary).
    Seats {
        #[command(flatten)]
        target: AdminTarget,
        /// Only this slave's seats.
        #[arg(long)]
        slave: Option<String>,
        /// Only seats of this agent type.
        #[arg(long = "type", value_name = "TYPE")]
        agent_type: Option<String>,
        /// Only this agent's seats (on any slave).
        #[arg(long)]
        agent: Option<String>,
        /// Print the seats as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Force-release one agent's seat, or every seat of a slave (like lmremove).
    ///
    /// The slave is told and logs the agents out; they must register again. With --agent
    /// alone, the slave is found from the master's seats (refused, naming the slaves, when
    /// the agent holds seats on several). Releasing every seat of a slave asks first
    /// unless --yes (and is refused without --yes when there is no terminal to ask on).
    Release {
        #[command(flatten)]
        target: AdminTarget,
        /// The slave whose seats to release [default: the one slave where --agent holds a
        /// seat].
        #[arg(long)]
        slave: Option<String>,
        /// Release only this agent's seat [default: every seat of the slave].
        #[arg(long)]
        agent: Option<String>,
        /// Release every seat of the slave without asking.
        #[arg(long)]
        yes: bool,
        /// Who is asking, for the alert and the audit trail [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
    /// Swap the master license of the running master (like lmreread).
    ///
    /// The new file is verified (signature, dates, role master) before anything changes,
    /// recorded in the ledger so every replica uses it, and in force at once; a limit below
    /// current use logs nobody out but rejects new registrations until usage is below it.
    /// The license already in force changes nothing. Replace the file given to `run
    /// --license` too, for the next start.
    ReloadLicense {
        /// The new signed master license file.
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
        #[command(flatten)]
        target: AdminTarget,
        /// Who is asking, for the alert and the audit trail [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
    /// Vendor sync: `sync now` asks the vendor for this installation's current license.
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
    },
    /// Take one broker replica out of the election for maintenance.
    ///
    /// It stops campaigning and, if it leads, resigns so another replica takes over (slaves
    /// ride through it like a failover). Status shows it `drained` meanwhile. Stop it, do
    /// the maintenance, start it again: a restarted replica campaigns as usual; or let it
    /// campaign again with `admin undrain`.
    Drain {
        /// The replica's `--id`.
        #[arg(long)]
        replica: String,
        #[command(flatten)]
        target: AdminTarget,
        /// Who is asking, for the alert and the audit trail [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
    /// Let a drained broker replica campaign again.
    ///
    /// It leads when the lease is free and no more preferred replica takes it first.
    Undrain {
        /// The replica's `--id`.
        #[arg(long)]
        replica: String,
        #[command(flatten)]
        target: AdminTarget,
        /// Who is asking, for the alert and the audit trail [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
    /// Remove a slave that is not connected from the master's table.
    ///
    /// Its row leaves the status, recorded in the ledger, and seats it still holds are
    /// released. A stopping slave says goodbye by itself, and one silent past `run
    /// --forget-after` with no seats is forgotten by itself; this is for the rest. If it
    /// says hello again it is a new slave.
    ForgetSlave {
        /// The slave's id.
        slave: String,
        #[command(flatten)]
        target: AdminTarget,
        /// Who is asking, for the alert and the audit trail [default: $USER, or operator].
        #[arg(
            long,
            env = "USER",
            hide_env = true,
            default_value = "operator",
            hide_default_value = true
        )]
        operator: String,
    },
    /// Delete a cluster's ledger, snapshots, election state and alert log (test clusters).
    ///
    /// Deletes the JetStream streams LMBUS_LEDGER_<cluster>, LMBUS_SNAPSHOTS_<cluster>,
    /// KV_lmbus_election_<cluster> and LMBUS_ALERTS_<cluster>. Every seat record is lost:
    /// only for tearing down a test or demo cluster, with all its brokers stopped.
    RemoveState {
        #[command(flatten)]
        target: AdminTarget,
        /// Required: confirms that the cluster's seat records may be destroyed.
        #[arg(long)]
        yes: bool,
    },
}

/// The operator's connection to the master's NATS.
async fn admin_client(
    nats: &str,
    nats_auth: lmbus_nats::NatsAuthArgs,
) -> anyhow::Result<async_nats::Client> {
    Ok(lmbus_nats::connect(nats, async_nats::ConnectOptions::new(), &nats_auth.into()).await?)
}

/// Sends an operator's request to `subject` and decodes the answer; `nobody` is the error
/// when none comes within `wait`.
async fn ask_admin<Req, Rep>(
    client: &async_nats::Client,
    subject: String,
    request: &Req,
    nobody: String,
    wait: Duration,
) -> anyhow::Result<Rep>
where
    Req: serde::Serialize,
    Rep: serde::de::DeserializeOwned,
{
    let payload = lmbus_schemas::encode(request)?;
    // The wait, not the NATS client's default request timeout (10 s), bounds the answer.
    let asked = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(wait));
    let answer = tokio::time::timeout(wait, client.send_request(subject, asked))
        .await
        .ok()
        .and_then(Result::ok)
        .context(nobody)?;
    Ok(lmbus_schemas::decode(&answer.payload)?)
}

/// The one slave where `agent` holds a seat, for `admin release --agent` without
/// `--slave`: an error naming the slaves when there are several, or saying there is none.
async fn slave_of_agent(
    client: &async_nats::Client,
    subjects: &lmbus_schemas::Subjects,
    agent: &str,
) -> anyhow::Result<String> {
    let filter = lmbus_ops::SeatFilter {
        agent: Some(agent.to_owned()),
        ..lmbus_ops::SeatFilter::default()
    };
    let list = lmbus_ops::fetch_seats(client, subjects, &filter, ADMIN_WAIT).await?;
    let mut slaves: Vec<String> = list.seats.into_iter().map(|s| s.slave).collect();
    slaves.dedup();
    match slaves.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!(
            "agent {} holds no seat on any slave of cluster {}: check the id with `admin seats`",
            lmbus_schemas::printable(agent),
            subjects.cluster()
        ),
        many => anyhow::bail!(
            "agent {} holds seats on {} slaves ({}): name one with --slave",
            lmbus_schemas::printable(agent),
            many.len(),
            many.iter()
                .map(|s| lmbus_schemas::printable(s).into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Asks on the terminal before every seat of `slave` is released; refuses when there is
/// no terminal to ask on (a script must say --yes).
fn confirm_release_all(slave: &str) -> anyhow::Result<()> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    let slave = lmbus_schemas::printable(slave);
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "releasing every seat of slave {slave} needs confirmation and there is no terminal to ask on: pass --yes (or --agent for one seat)"
        );
    }
    eprint!("release every seat of slave {slave}? Its agents are logged out. [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        anyhow::bail!("nothing released")
    }
}

/// How long an admin command waits for its answer.
const ADMIN_WAIT: Duration = Duration::from_secs(5);
/// A sync waits for the vendor (three attempts of 5 s with back-off, at most).
const SYNC_WAIT: Duration = Duration::from_secs(30);

/// How long `admin status` listens for replica beats when no master answered: several
/// beats at the default lease (each replica sends four per lease).
const REPLICA_LISTEN: Duration = Duration::from_millis(1500);

fn no_master(subject: &str, cluster: &str) -> String {
    format!("no master answered on {subject}: is lmbus-broker running for cluster {cluster}?")
}

async fn admin(command: AdminCommand) -> anyhow::Result<()> {
    use lmbus_schemas::{ReleaseReply, ReleaseRequest, Subjects};
    match command {
        AdminCommand::Status {
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            json,
        } => {
            let subjects = Subjects::new(&cluster)?;
            let client = admin_client(&nats, nats_auth).await?;
            let status = match lmbus_ops::fetch_status(&client, &subjects, ADMIN_WAIT).await {
                Ok(status) => status,
                // Say who is up (drained, electing) rather than only "is it running?".
                Err(e @ lmbus_ops::StatusError::NoAnswer { .. }) => {
                    let beats = lmbus_ops::replicas_up(&client, &subjects, REPLICA_LISTEN).await;
                    match lmbus_ops::explain_no_master(&beats) {
                        Some(why) => {
                            anyhow::bail!("no master answered on {}: {why}", subjects.status())
                        }
                        None => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", lmbus_ops::render_status(&status));
            }
            Ok(())
        }
        AdminCommand::Report {
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            json,
            beside,
            beside_file,
            operator,
        } => {
            // Files first: a wrong path fails before any master writes a report.
            let from_files = beside_file
                .iter()
                .map(|path| {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("--beside-file {}", path.display()))?;
                    serde_json::from_str::<lmbus_schemas::UsageReport>(&text).with_context(|| {
                        format!(
                            "--beside-file {}: not a usage report in JSON (a master's report file, or `admin report --json` of one master)",
                            path.display()
                        )
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let client = admin_client(&nats, nats_auth).await?;
            // The reports, and where each went (files, recipients).
            let mut reports = Vec::new();
            let mut outputs = Vec::new();
            let mut problems = Vec::new();
            for cluster in std::iter::once(cluster).chain(beside) {
                let subject = Subjects::new(&cluster)?.admin_report();
                let nobody = no_master(&subject, &cluster);
                let request = lmbus_schemas::ReportRequest {
                    operator: operator.clone(),
                };
                // Reading the day's alerts and mailing can take a while.
                let wait = Duration::from_secs(60);
                let reply = ask_admin(&client, subject, &request, nobody, wait).await?;
                match reply {
                    lmbus_schemas::ReportReply::Written {
                        report,
                        files,
                        emailed_to,
                        problems: theirs,
                    } => {
                        reports.push(*report);
                        outputs.push((files, emailed_to));
                        problems.extend(theirs.into_iter().map(|p| format!("{cluster}: {p}")));
                    }
                    lmbus_schemas::ReportReply::Error { message } => {
                        anyhow::bail!("cluster {cluster}: {message}")
                    }
                }
            }
            for (report, path) in from_files.into_iter().zip(&beside_file) {
                // Counted once: the same master twice would count its use twice.
                if reports.iter().any(|r| r.cluster == report.cluster) {
                    anyhow::bail!(
                        "--beside-file {}: cluster {} is already in the table (named with --cluster, --beside or another file)",
                        path.display(),
                        lmbus_schemas::printable(&report.cluster)
                    );
                }
                reports.push(report);
            }
            if json {
                if let [one] = reports.as_slice() {
                    println!("{}", serde_json::to_string_pretty(one)?);
                } else {
                    println!("{}", serde_json::to_string_pretty(&reports)?);
                }
            } else {
                if let [one] = reports.as_slice() {
                    print!("{}", lmbus_broker::report::to_text(one));
                } else {
                    print!("{}", lmbus_broker::report::side_by_side(&reports));
                }
                for (r, (files, emailed_to)) in reports.iter().zip(&outputs) {
                    println!(
                        "\n{}: files: {}; mailed to: {}",
                        r.cluster,
                        if files.is_empty() {
                            "none".to_string()
                        } else {
                            files.join(", ")
                        },
                        if emailed_to.is_empty() {
                            "nobody".to_string()
                        } else {
                            emailed_to.join(", ")
                        }
                    );
                }
            }
            anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
            Ok(())
        }
        AdminCommand::Release {
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            slave,
            agent,
            yes,
            operator,
        } => {
            let subjects = Subjects::new(&cluster)?;
            let client = admin_client(&nats, nats_auth).await?;
            let slave = match (slave, &agent) {
                (Some(slave), _) => slave,
                (None, Some(agent)) => slave_of_agent(&client, &subjects, agent).await?,
                (None, None) => anyhow::bail!(
                    "name the seat to release: --agent AGENT (and --slave SLAVE when the agent is on several slaves), or --slave SLAVE for all of its seats"
                ),
            };
            if agent.is_none() && !yes {
                confirm_release_all(&slave)?;
            }
            let subject = subjects.admin_release();
            let request = ReleaseRequest {
                slave_id: slave,
                agent_id: agent,
                operator,
            };
            let nobody = no_master(&subject, &cluster);
            match ask_admin(&client, subject, &request, nobody, ADMIN_WAIT).await? {
                ReleaseReply::Released { agents } => {
                    println!(
                        "released {} of slave {}: {}",
                        lmbus_schemas::human::plural(agents.len() as u64, "seat", "seats"),
                        request.slave_id,
                        agents.join(", ")
                    );
                    Ok(())
                }
                ReleaseReply::Error { message } => anyhow::bail!("{message}"),
            }
        }
        AdminCommand::Seats {
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            slave,
            agent_type,
            agent,
            json,
        } => {
            let subjects = Subjects::new(&cluster)?;
            let client = admin_client(&nats, nats_auth).await?;
            let filter = lmbus_ops::SeatFilter {
                slave,
                agent_type,
                agent,
            };
            let list = lmbus_ops::fetch_seats(&client, &subjects, &filter, ADMIN_WAIT).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let now_ms =
                    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64;
                print!("{}", lmbus_ops::render_seats(&list, now_ms));
            }
            Ok(())
        }
        AdminCommand::ReloadLicense {
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            file,
            operator,
        } => {
            let license = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read license file {}", file.display()))?;
            let client = admin_client(&nats, nats_auth).await?;
            let subject = Subjects::new(&cluster)?.admin_reload();
            let request = lmbus_schemas::ReloadRequest {
                license,
                operator,
                file: file.display().to_string(),
            };
            let nobody = no_master(&subject, &cluster);
            match ask_admin(&client, subject, &request, nobody, ADMIN_WAIT).await? {
                lmbus_schemas::ReloadReply::Reloaded { message } => {
                    println!("{message}");
                    Ok(())
                }
                // The message names the file.
                lmbus_schemas::ReloadReply::Error { message } => anyhow::bail!("{message}"),
            }
        }
        AdminCommand::Sync {
            command:
                SyncCommand::Now {
                    target:
                        AdminTarget {
                            nats,
                            nats_auth,
                            cluster,
                        },
                    operator,
                },
        } => {
            let client = admin_client(&nats, nats_auth).await?;
            let subject = Subjects::new(&cluster)?.admin_sync();
            let nobody = format!(
                "no answer on {subject} within {}: is the master of cluster {cluster} running? (its vendor_sync alert says how a slow sync ended)",
                lmbus_schemas::human::duration(SYNC_WAIT)
            );
            let request = lmbus_schemas::SyncNowRequest { operator };
            match ask_admin(&client, subject, &request, nobody, SYNC_WAIT).await? {
                lmbus_schemas::SyncNowReply::Synced { message } => {
                    println!("{message}");
                    Ok(())
                }
                lmbus_schemas::SyncNowReply::Error { message } => anyhow::bail!("{message}"),
            }
        }
        AdminCommand::Sync {
            command:
                SyncCommand::Export {
                    file,
                    target:
                        AdminTarget {
                            nats,
                            nats_auth,
                            cluster,
                        },
                    operator,
                },
        } => {
            let client = admin_client(&nats, nats_auth).await?;
            let subject = Subjects::new(&cluster)?.admin_sync_export();
            let nobody = no_master(&subject, &cluster);
            let request = lmbus_schemas::SyncExportRequest { operator };
            match ask_admin(&client, subject, &request, nobody, ADMIN_WAIT).await? {
                lmbus_schemas::SyncExportReply::Exported { request } => {
                    std::fs::write(&file, serde_json::to_string_pretty(&request)?)
                        .with_context(|| format!("cannot write {}", file.display()))?;
                    println!(
                        "sync request {} written to {}: take it to the vendor, then `admin sync import` its answer",
                        request.sync,
                        file.display()
                    );
                    Ok(())
                }
                lmbus_schemas::SyncExportReply::Error { message } => anyhow::bail!("{message}"),
            }
        }
        AdminCommand::Sync {
            command:
                SyncCommand::Import {
                    file,
                    target:
                        AdminTarget {
                            nats,
                            nats_auth,
                            cluster,
                        },
                    operator,
                },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the vendor's answer {}", file.display()))?;
            let answer: lmbus_schemas::SignedSyncAnswer = serde_json::from_str(&text)
                .with_context(|| {
                    format!(
                        "{} is not a vendor sync answer (the JSON `lmbus-vendor answer` writes)",
                        file.display()
                    )
                })?;
            let client = admin_client(&nats, nats_auth).await?;
            let subject = Subjects::new(&cluster)?.admin_sync_import();
            let nobody = no_master(&subject, &cluster);
            let request = lmbus_schemas::SyncImportRequest { answer, operator };
            match ask_admin(&client, subject, &request, nobody, ADMIN_WAIT).await? {
                lmbus_schemas::SyncNowReply::Synced { message } => {
                    println!("{message}");
                    Ok(())
                }
                lmbus_schemas::SyncNowReply::Error { message } => {
                    anyhow::bail!("{}: {message}", file.display())
                }
            }
        }
        AdminCommand::Drain {
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            replica,
            operator,
        } => {
            let client = admin_client(&nats, nats_auth).await?;
            let subject = Subjects::new(&cluster)?.admin_drain();
            let nobody = format!(
                "no broker replica {replica} answered on {subject}: check --replica (its --id) and --cluster {cluster}"
            );
            let request = lmbus_schemas::DrainRequest { replica, operator };
            let reply: lmbus_schemas::DrainReply =
                ask_admin(&client, subject, &request, nobody, ADMIN_WAIT).await?;
            println!("{}", reply.message);
            Ok(())
        }
        AdminCommand::Undrain {
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            replica,
            operator,
        } => {
            let client = admin_client(&nats, nats_auth).await?;
            let subject = Subjects::new(&cluster)?.admin_undrain();
            let nobody = format!(
                "no broker replica {replica} answered on {subject}: check --replica (its --id) and --cluster {cluster}"
            );
            let request = lmbus_schemas::DrainRequest { replica, operator };
            let reply: lmbus_schemas::DrainReply =
                ask_admin(&client, subject, &request, nobody, ADMIN_WAIT).await?;
            println!("{}", reply.message);
            Ok(())
        }
        AdminCommand::ForgetSlave {
            slave,
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            operator,
        } => {
            let client = admin_client(&nats, nats_auth).await?;
            let subject = Subjects::new(&cluster)?.admin_forget();
            let nobody = no_master(&subject, &cluster);
            let request = lmbus_schemas::ForgetRequest {
                slave_id: slave,
                operator,
            };
            match ask_admin(&client, subject, &request, nobody, ADMIN_WAIT).await? {
                lmbus_schemas::ForgetReply::Forgotten { message } => {
                    println!("{message}");
                    Ok(())
                }
                lmbus_schemas::ForgetReply::Error { message } => anyhow::bail!("{message}"),
            }
        }
        AdminCommand::RemoveState {
            target:
                AdminTarget {
                    nats,
                    nats_auth,
                    cluster,
                },
            yes,
        } => {
            if !yes {
                anyhow::bail!(
                    "remove-state destroys every seat record of cluster {cluster}: pass --yes to confirm"
                );
            }
            let subjects = Subjects::new(&cluster)?;
            let client = admin_client(&nats, nats_auth).await?;
            let js = async_nats::jetstream::new(client);
            for stream in [
                subjects.ledger_stream(),
                subjects.snapshot_stream(),
                subjects.election_stream(),
                subjects.alert_stream(),
            ] {
                match js.delete_stream(&stream).await {
                    Ok(_) => println!("deleted stream {stream}"),
                    Err(e) => println!("stream {stream} not deleted: {e}"),
                }
            }
            Ok(())
        }
    }
}

/// Every setting can come from a flag, an environment variable or the config file, in that
/// order of precedence.
#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    daemon: lmbus_nats::DaemonArgs,
    /// Cluster name shared by this master and its slaves (subject token: A-Z a-z 0-9 - _).
    #[arg(help_heading = "NATS", long, env = "LMBUS_CLUSTER")]
    cluster: Option<String>,
    /// The master license file (role = "master"), as signed by the vendor.
    #[arg(help_heading = "License", long, env = "LMBUS_LICENSE")]
    license: Option<PathBuf>,
    /// The vendor's public key file (from `lmbus-license keygen`).
    ///
    /// It verifies the master license and every slave license.
    #[arg(help_heading = "License", long, env = "LMBUS_VENDOR_KEY")]
    vendor_key: Option<PathBuf>,
    /// Accept slaves without a slave license.
    ///
    /// They may register any number of agents the master approves (see
    /// --max-agents-per-slave).
    #[arg(help_heading = "License", long, env = "LMBUS_ALLOW_UNLICENSED_SLAVES", num_args = 0..=1, default_missing_value = "true")]
    allow_unlicensed_slaves: Option<bool>,
    /// This replica's id in alerts and status [default: broker-<random>].
    #[arg(help_heading = "Operations", long, env = "LMBUS_BROKER_ID")]
    id: Option<String>,
    /// Heartbeat intervals a slave may miss before it is marked disconnected [default: 3].
    #[arg(help_heading = "Timing", long, env = "LMBUS_MISSED_HEARTBEATS")]
    missed_heartbeats: Option<u32>,
    /// How often housekeeping runs: silence checks, counts, expiry [default: 500ms].
    #[arg(help_heading = "Timing", long, env = "LMBUS_TICK_INTERVAL", value_parser = humantime::parse_duration)]
    tick_interval: Option<Duration>,
    /// How often a license_counts alert is published [default: 60s].
    #[arg(help_heading = "Timing", long, env = "LMBUS_COUNTS_INTERVAL", value_parser = humantime::parse_duration)]
    counts_interval: Option<Duration>,
    /// Warn this many days before the master license expires [default: 30].
    #[arg(help_heading = "License", long, env = "LMBUS_EXPIRY_WARNING_DAYS")]
    expiry_warning_days: Option<i64>,
    /// Sync with the vendor this often, counted from the last sync; 0s: only on `admin sync
    /// now` [default: 24h].
    ///
    /// Only for a master license with an offline limit (sync_within_days). After a failed
    /// sync the next try waits up to an hour.
    #[arg(help_heading = "License", long, env = "LMBUS_SYNC_EVERY", value_parser = humantime::parse_duration)]
    sync_every: Option<Duration>,
    /// The vendor's NATS for vendor sync, as a second connection; without it sync requests
    /// go out on --nats (a leaf node link to the vendor's NATS carries them).
    #[arg(help_heading = "License", long, env = "LMBUS_VENDOR_NATS")]
    vendor_nats: Option<String>,
    /// The credentials file for --vendor-nats (the vendor gives it).
    #[arg(
        help_heading = "License",
        long,
        env = "LMBUS_VENDOR_NATS_CREDS",
        value_name = "FILE"
    )]
    vendor_nats_creds: Option<std::path::PathBuf>,
    /// A backup master (a license of context backup): the production cluster it backs.
    /// It serves only while that cluster's leader is silent (no replica beat within one
    /// --lease); required with a backup master license that names no production cluster
    /// itself (one that does is watched, and this must match it), refused with any other.
    #[arg(
        help_heading = "License",
        long,
        env = "LMBUS_PRODUCTION_CLUSTER",
        value_name = "NAME"
    )]
    production_cluster: Option<String>,
    /// A backup master: once production has been available again this long, the backup
    /// releases every seat it still holds and its slaves log those agents out (a slave
    /// whose primary is production moves what production admits before that)
    /// [default: 2m].
    #[arg(help_heading = "License", long, env = "LMBUS_HANDBACK_WINDOW", value_parser = humantime::parse_duration)]
    handback_window: Option<Duration>,
    /// Most slaves the master tracks; further hellos are refused [default: 100000].
    #[arg(help_heading = "Limits", long, env = "LMBUS_MAX_SLAVES")]
    max_slaves: Option<usize>,
    /// Added to a silent slave's grace period before its seats are reclaimed [default: 40s].
    ///
    /// Only slaves that log out all agents when their grace ends are reclaimed.
    #[arg(help_heading = "Timing", long, env = "LMBUS_RECLAIM_MARGIN", value_parser = humantime::parse_duration)]
    reclaim_margin: Option<Duration>,
    /// Forget a slave silent this long with no seats; 0s: never [default: 1h].
    ///
    /// Its row leaves the status, recorded in the ledger. Counted from its last message or
    /// the current leader's election, whichever is later.
    #[arg(help_heading = "Timing", long, env = "LMBUS_FORGET_AFTER", value_parser = humantime::parse_duration)]
    forget_after: Option<Duration>,
    /// Election preference among this cluster's replicas; 1 is the most preferred [default: 1].
    ///
    /// When the lease is free, replica p waits (p-1) x 200ms before trying, so the most
    /// preferred replica that is up wins; a running leader is never preempted.
    #[arg(help_heading = "Operations", long, env = "LMBUS_PRIORITY")]
    priority: Option<u32>,
    /// Life of the leader lease without a renewal; the same on every replica [default: 1s].
    ///
    /// The leader renews every lease/5 and steps down by itself after 4/5 of it without
    /// one. A dead leader is replaced within about one lease.
    #[arg(help_heading = "Timing", long, env = "LMBUS_LEASE", value_parser = humantime::parse_duration)]
    lease: Option<Duration>,
    /// JetStream replicas of the ledger and election streams [default: 1].
    ///
    /// 3 on a 3-node NATS cluster, 1 on a single server (which refuses more: "this NATS is
    /// not clustered").
    #[arg(help_heading = "NATS", long, env = "LMBUS_STREAM_REPLICAS")]
    stream_replicas: Option<usize>,
    /// Registrations per second one slave may send; 0 turns the limit off [default: 1000].
    ///
    /// Bursts of twice that pass; more are rejected `rate_limited`, with at most one alert
    /// per slave every 10 s.
    #[arg(help_heading = "Limits", long, env = "LMBUS_SLAVE_RATE_LIMIT")]
    slave_rate_limit: Option<u32>,
    /// Most seats one slave may hold, licensed or not; 0: no cap [default: 0].
    ///
    /// So that one site (an unlicensed one above all, which has no local limit) cannot take
    /// the whole license; more are rejected `slave_limit`.
    #[arg(help_heading = "Limits", long, env = "LMBUS_MAX_AGENTS_PER_SLAVE")]
    max_agents_per_slave: Option<u32>,
    /// How registrations are decided: strict or allotment [default: strict].
    ///
    /// `strict`: every registration by the master, one NATS round trip and one ledger
    /// append each. `allotment`: the master allots each slave blocks of seats, recorded in
    /// the ledger, and slaves admit from them locally; the limit stays exact, per-agent
    /// records lag by one refresh.
    #[arg(help_heading = "Limits", long, env = "LMBUS_ADMISSION")]
    admission: Option<String>,
    /// Allotment mode: how long a slave admits from its blocks without renewal [default: 30s].
    ///
    /// Counted from when it sent the request that last renewed them, and capped by its
    /// grace period; at least 3 refresh intervals.
    #[arg(help_heading = "Timing", long, env = "LMBUS_ALLOT_LEASE", value_parser = humantime::parse_duration)]
    allot_lease: Option<Duration>,
    /// Allotment mode: how often a slave reports its journal and renews its blocks [default: 2s].
    #[arg(help_heading = "Timing", long, env = "LMBUS_ALLOT_REFRESH", value_parser = humantime::parse_duration)]
    allot_refresh: Option<Duration>,
    /// Serve Prometheus metrics on http://ADDR/metrics and health on /healthz [default: off].
    ///
    /// E.g. 127.0.0.1:9464. It has no authentication, so bind it where only your Prometheus
    /// can reach it.
    #[arg(help_heading = "Operations", long, env = "LMBUS_METRICS")]
    metrics: Option<std::net::SocketAddr>,
    /// How long the alert stream keeps alerts [default: 30d].
    ///
    /// Applies when this broker creates the stream (LMBUS_ALERTS_<cluster>).
    #[arg(help_heading = "Operations", long, env = "LMBUS_ALERT_MAX_AGE", value_parser = humantime::parse_duration)]
    alert_max_age: Option<Duration>,
    /// Bytes of alerts the alert stream keeps, oldest dropped first [default: 1073741824].
    #[arg(help_heading = "Operations", long, env = "LMBUS_ALERT_MAX_BYTES")]
    alert_max_bytes: Option<i64>,
    /// Ledger records between snapshots of the seat state; 0: none [default: 50000].
    ///
    /// A replica that starts reads the latest snapshot and only the records after it.
    #[arg(help_heading = "Operations", long, env = "LMBUS_SNAPSHOT_EVERY")]
    snapshot_every: Option<u64>,
    /// After each snapshot, delete the records older than the previous one [default: keep].
    ///
    /// Bounds the ledger's size, at the cost of that history in the audit trail.
    #[arg(help_heading = "Operations", long, env = "LMBUS_LEDGER_TRIM", num_args = 0..=1, default_missing_value = "true")]
    ledger_trim: Option<bool>,
    /// Time of day (UTC, HH:MM) of the daily usage report [default: 00:00].
    ///
    /// The leader writes the report of the 24 hours before; it is always published on
    /// lmbus.v1.<cluster>.report.usage.
    #[arg(help_heading = "Usage reports", long, env = "LMBUS_REPORT_AT")]
    report_at: Option<String>,
    /// Also write each usage report as JSON and CSV into this directory.
    #[arg(help_heading = "Usage reports", long, env = "LMBUS_REPORT_DIR")]
    report_dir: Option<PathBuf>,
    /// Mail each usage report through this SMTP server (needs --smtp-from and --report-to).
    #[arg(help_heading = "Usage reports", long, env = "LMBUS_SMTP_HOST")]
    smtp_host: Option<String>,
    /// SMTP port [default: 587 with starttls, 465 with tls, 25 with none].
    #[arg(help_heading = "Usage reports", long, env = "LMBUS_SMTP_PORT")]
    smtp_port: Option<u16>,
    /// SMTP connection security [default: starttls].
    #[arg(
        help_heading = "Usage reports",
        long,
        env = "LMBUS_SMTP_TLS",
        value_enum
    )]
    smtp_tls: Option<lmbus_broker::report::SmtpTls>,
    /// SMTP user (with LMBUS_SMTP_PASSWORD).
    #[arg(help_heading = "Usage reports", long, env = "LMBUS_SMTP_USER")]
    smtp_user: Option<String>,
    /// SMTP password; prefer the environment variable to the flag (visible in `ps`).
    #[arg(
        help_heading = "Usage reports",
        long,
        env = "LMBUS_SMTP_PASSWORD",
        hide_env_values = true
    )]
    smtp_password: Option<String>,
    /// Sender address of report mails, e.g. "lmbus <lmbus@example.com>".
    #[arg(help_heading = "Usage reports", long, env = "LMBUS_SMTP_FROM")]
    smtp_from: Option<String>,
    /// Recipients of report mails (repeat or comma-separate).
    #[arg(
        help_heading = "Usage reports",
        long,
        env = "LMBUS_REPORT_TO",
        value_delimiter = ','
    )]
    report_to: Vec<String>,
    /// Fault injection, for tests only: keep leading after the lease is lost, so that only
    /// the ledger's fencing stops this replica. Never use in production.
    #[arg(long, hide = true)]
    fault_ignore_lease: bool,
    /// Fault injection, for tests only: the wall clock the offline limit (sync_within_days)
    /// is decided by runs this many days ahead (never behind; a sync counts from the
    /// vendor's answer time when that is earlier). Never use in production.
    #[arg(long, hide = true)]
    fault_clock_skew_days: Option<u32>,
}

impl RunArgs {
    fn resolve(self) -> anyhow::Result<BrokerConfig> {
        if self.vendor_nats.is_none() && self.vendor_nats_creds.is_some() {
            anyhow::bail!(
                "--vendor-nats-creds is for the vendor's NATS: pass its URL with --vendor-nats too"
            );
        }
        let cluster = self.cluster.context(
            "no cluster name: pass --cluster, set LMBUS_CLUSTER or add cluster to the config file",
        )?;
        let license_path = self
            .license
            .context("no master license: pass --license FILE, set LMBUS_LICENSE or add license to the config file")?;
        let key_path = self
            .vendor_key
            .context("no vendor public key: pass --vendor-key FILE, set LMBUS_VENDOR_KEY or add vendor_key to the config file")?;
        let defaults = lmbus_broker::engine::AllotConfig::default();
        let allot = lmbus_broker::engine::AllotConfig {
            admission: match self.admission {
                Some(text) => config::parse_admission(&text)?,
                None => defaults.admission,
            },
            lease: self.allot_lease.unwrap_or(defaults.lease),
            refresh: self.allot_refresh.unwrap_or(defaults.refresh),
        };
        config::check_allot(&allot)?;
        let report = lmbus_broker::report::ReportConfig {
            dir: self.report_dir,
            at_minute: match self.report_at {
                Some(at) => lmbus_broker::report::parse_time_of_day(&at)
                    .map_err(|e| anyhow::anyhow!("--report-at: {e}"))?,
                None => 0,
            },
            smtp: match self.smtp_host {
                None => None,
                Some(host) => {
                    let tls = self
                        .smtp_tls
                        .unwrap_or(lmbus_broker::report::SmtpTls::Starttls);
                    let to = self.report_to;
                    let from = self.smtp_from.context(
                        "--smtp-host needs a sender: pass --smtp-from or set LMBUS_SMTP_FROM",
                    )?;
                    anyhow::ensure!(
                        !to.is_empty(),
                        "--smtp-host needs recipients: pass --report-to or set LMBUS_REPORT_TO"
                    );
                    Some(lmbus_broker::report::SmtpConfig {
                        host,
                        port: self.smtp_port.unwrap_or(tls.default_port()),
                        tls,
                        user: self.smtp_user,
                        password: self.smtp_password,
                        from,
                        to,
                    })
                }
            },
        };
        Ok(BrokerConfig {
            report,
            nats_url: self
                .daemon
                .nats
                .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned()),
            nats_auth: lmbus_nats::NatsAuth::from(self.daemon.nats_auth),
            cluster,
            license_path,
            vendor_key: config::load_vendor_key(&key_path)?,
            allow_unlicensed_slaves: self.allow_unlicensed_slaves.unwrap_or(false),
            broker_id: self.id.unwrap_or_else(|| {
                format!("broker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
            }),
            missed_heartbeats: self.missed_heartbeats.unwrap_or(DEFAULT_MISSED_HEARTBEATS),
            tick_interval: self.tick_interval.unwrap_or(DEFAULT_TICK_INTERVAL),
            counts_interval: self.counts_interval.unwrap_or(DEFAULT_COUNTS_INTERVAL),
            expiry_warning_days: self
                .expiry_warning_days
                .unwrap_or(DEFAULT_EXPIRY_WARNING_DAYS),
            max_slaves: self.max_slaves.unwrap_or(DEFAULT_MAX_SLAVES),
            reclaim_margin: self
                .reclaim_margin
                .unwrap_or(config::DEFAULT_RECLAIM_MARGIN),
            forget_after: self.forget_after.unwrap_or(config::DEFAULT_FORGET_AFTER),
            priority: self.priority.unwrap_or(config::DEFAULT_PRIORITY),
            lease: self.lease.unwrap_or(config::DEFAULT_LEASE),
            stream_replicas: self
                .stream_replicas
                .unwrap_or(config::DEFAULT_STREAM_REPLICAS),
            alert_max_age: self
                .alert_max_age
                .unwrap_or(lmbus_broker::alert_log::DEFAULT_MAX_AGE),
            alert_max_bytes: self
                .alert_max_bytes
                .unwrap_or(lmbus_broker::alert_log::DEFAULT_MAX_BYTES),
            slave_rate_limit: self
                .slave_rate_limit
                .unwrap_or(config::DEFAULT_SLAVE_RATE_LIMIT),
            max_agents_per_slave: self.max_agents_per_slave.unwrap_or(0),
            metrics: self.metrics,
            snapshot_every: self
                .snapshot_every
                .unwrap_or(config::DEFAULT_SNAPSHOT_EVERY),
            ledger_trim: self.ledger_trim.unwrap_or(false),
            fault_ignore_lease: self.fault_ignore_lease,
            sync_every: self.sync_every.unwrap_or(config::DEFAULT_SYNC_EVERY),
            vendor_nats: self.vendor_nats.map(|url| {
                (
                    url,
                    lmbus_nats::NatsAuth {
                        creds_file: self.vendor_nats_creds,
                        ..lmbus_nats::NatsAuth::default()
                    },
                )
            }),
            wall_clock: config::WallClock::ahead_by_days(self.fault_clock_skew_days.unwrap_or(0)),
            allot,
            production_cluster: self.production_cluster,
            handback_window: self
                .handback_window
                .unwrap_or(config::DEFAULT_HANDBACK_WINDOW),
        })
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli: Cli = lmbus_nats::config_file::parse();
    let default_log = match cli.command {
        Command::Run(_) => "info",
        Command::Admin(_) => "warn",
    };
    init_tracing(cli.log.as_deref().unwrap_or(default_log), cli.log_format);
    let result = match cli.command {
        Command::Run(args) => match args.resolve() {
            Ok(cfg) => lmbus_broker::run(cfg, shutdown_signal()).await,
            Err(e) => Err(e),
        },
        Command::Admin(command) => admin(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lmbus-broker: error: {e:#}");
            ExitCode::FAILURE
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

    /// Every long flag of `run` and of every `admin` command is a config file key that
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
            "nats_creds",
            "log",
            "cluster",
            "operator",
            "report_to",
        ] {
            assert!(keys.contains(key), "{key} is not a key: {keys:?}");
        }
        assert!(!keys.contains("fault_ignore_lease") && !keys.contains("config"));
        assert!(!keys.contains("fault_clock_skew_days"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "cluster = \"acme\"\nnats_usr = \"bob\"\n").unwrap();
        let e = lmbus_nats::config_file::try_parse_from::<Cli, _, _>([
            "lmbus-broker",
            "admin",
            "status",
            "--config",
            path.to_str().unwrap(),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(path.to_str().unwrap())
                && e.contains("unknown key nats_usr (did you mean nats_user?)"),
            "{e}"
        );
    }

    /// One file serves `run` and `admin`: each takes its own keys; flags and `LMBUS_*`
    /// variables win over it.
    #[test]
    fn one_file_serves_run_and_admin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "nats = \"nats://n1:4222\"\nnats_user = \"broker\"\nnats_password = \"pw\"\n\
             cluster = \"acme\"\nlicense = \"master.lic\"\nvendor_key = \"/etc/vendor.pub\"\n\
             tick_interval = \"250ms\"\nlog = \"debug\"\nledger_trim = true\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let cli: Cli =
            lmbus_nats::config_file::try_parse_from(["lmbus-broker", "--config", file, "run"])
                .unwrap();
        assert_eq!(cli.log.as_deref(), Some("debug"));
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.daemon.nats.as_deref(), Some("nats://n1:4222"));
        assert_eq!(run.daemon.nats_auth.nats_user.as_deref(), Some("broker"));
        assert_eq!(run.license, Some(dir.path().join("master.lic")));
        assert_eq!(run.vendor_key, Some(PathBuf::from("/etc/vendor.pub")));
        assert_eq!(run.tick_interval, Some(Duration::from_millis(250)));
        assert_eq!(run.ledger_trim, Some(true));
        let cli: Cli = lmbus_nats::config_file::try_parse_from([
            "lmbus-broker",
            "admin",
            "status",
            "--cluster",
            "other",
            "--config",
            file,
        ])
        .unwrap();
        let Command::Admin(AdminCommand::Status { target, .. }) = cli.command else {
            panic!("not status")
        };
        assert_eq!(target.cluster, "other");
        assert_eq!(target.nats, "nats://n1:4222");
    }
}
