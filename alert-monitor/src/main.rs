//! `lmbus-monitor`: `tail` prints alerts as they arrive; `licenses` shows the License
//! Monitor view (each slave, agents per type, totals against the master's limits).

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use lmbus_monitor::{Filter, Format, Start, alert_source, tail};
use lmbus_ops::{fetch_status, render_status};
use lmbus_schemas::{AlertKind, Severity, Subjects};

#[derive(Debug, Parser)]
#[command(
    name = "lmbus-monitor",
    version,
    about = "Tail lmbus alerts and show the License Monitor view"
)]
struct Cli {
    #[command(flatten)]
    config: lmbus_nats::config_file::ConfigArg,
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        global = true,
        env = "LMBUS_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        help_heading = "NATS"
    )]
    nats: String,
    #[command(flatten)]
    nats_auth: lmbus_nats::NatsAuthArgs,
    /// Cluster name of the master to watch.
    #[arg(long, global = true, env = "LMBUS_CLUSTER")]
    cluster: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print alerts, one line each: stored ones (--since, --last) or live ones.
    ///
    /// Each line: time, severity, kind, slave, details. Stored alerts are printed up to
    /// the last one stored now, then the command stops, or goes on with --follow.
    Tail {
        /// Start with the alerts since a time: a DURATION back from now (e.g. 1h) or an RFC
        /// 3339 time (e.g. 2026-11-27T10:00:00Z), from the alert stream.
        #[arg(long, value_parser = lmbus_monitor::parse_since, conflicts_with = "last")]
        since: Option<Duration>,
        /// Start with the last N stored alerts that pass the filters (--severity, --kind,
        /// --slave, --agent-type).
        #[arg(long)]
        last: Option<u64>,
        /// After the stored alerts, keep printing new ones (the default without --since
        /// or --last).
        #[arg(long)]
        follow: bool,
        /// One JSON document per line instead of text.
        #[arg(long)]
        json: bool,
        /// Only alerts of this severity or worse: info, warning, critical.
        #[arg(help_heading = "Filters", long, value_parser = parse_severity)]
        severity: Option<Severity>,
        /// Only these kinds (repeat or comma-separate), e.g. registration_rejected.
        #[arg(help_heading = "Filters", long, value_delimiter = ',', value_parser = parse_kind)]
        kind: Vec<AlertKind>,
        /// Only alerts about these slaves (repeat or comma-separate).
        #[arg(help_heading = "Filters", long, value_delimiter = ',')]
        slave: Vec<String>,
        /// Only alerts about these agent types (repeat or comma-separate), e.g. inbound.
        #[arg(help_heading = "Filters", long, value_delimiter = ',')]
        agent_type: Vec<String>,
        /// Exit after printing this many alerts.
        #[arg(long)]
        count: Option<usize>,
        /// Exit after this long, e.g. 30s.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// The audit trail: every seat decision and every alert, oldest first.
    ///
    /// The decisions come from the ledger (granted, confirmed, released, reclaimed, revoked, hellos),
    /// the alerts from the alert stream (rejections with their reason, refused hellos, bad
    /// messages, operator actions).
    Audit {
        /// Only records about this slave (who asked).
        #[arg(help_heading = "Filters", long)]
        slave: Option<String>,
        /// Only records about this agent.
        #[arg(help_heading = "Filters", long)]
        agent: Option<String>,
        /// Only records since a time: a DURATION back from now (e.g. 24h) or an RFC 3339
        /// time [default: everything stored].
        #[arg(help_heading = "Filters", long, value_parser = lmbus_monitor::parse_since)]
        since: Option<Duration>,
        /// Only the last N records that pass the other filters.
        #[arg(help_heading = "Filters", long)]
        last: Option<usize>,
        /// One JSON document per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The License Monitor: a live terminal view until q; --once prints a plain table.
    ///
    /// It shows the leader and replicas, agents per type against the limits, each slave and
    /// the recent alerts.
    Licenses {
        /// Print the table once and exit (for scripts; also what happens when stdout is
        /// not a terminal).
        #[arg(long)]
        once: bool,
        /// Print the master's status document as JSON once and exit.
        #[arg(long, conflicts_with = "once")]
        json: bool,
        /// How often the live view asks the master for its status.
        #[arg(long, alias = "watch", default_value = "2s", value_parser = humantime::parse_duration)]
        every: Duration,
        /// How long to wait for the master.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// The web dashboard: overview, slaves, seats (with release), alerts, live in a browser.
    ///
    /// A client of the same NATS subjects as `licenses`; admin actions go through the admin
    /// subjects as `web:<user>`. Without --users everyone is a read-only viewer. A
    /// non-loopback --listen needs both --tls-cert/--tls-key and --users; behind a reverse
    /// proxy that terminates TLS, listen on loopback and pass --secure-cookies.
    Web {
        /// Address and port to serve on.
        #[arg(long, default_value = "127.0.0.1:8470", help_heading = "Web")]
        listen: std::net::SocketAddr,
        /// The users file: [[user]] tables with name, role (viewer or admin) and password
        /// (an argon2 hash from `lmbus-monitor hash-password`).
        #[arg(long, value_name = "FILE", help_heading = "Web")]
        users: Option<std::path::PathBuf>,
        /// PEM certificate chain: serve HTTPS (with --tls-key).
        #[arg(long, value_name = "FILE", help_heading = "Web")]
        tls_cert: Option<std::path::PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, value_name = "FILE", help_heading = "Web")]
        tls_key: Option<std::path::PathBuf>,
        /// Mark cookies Secure though this serves plain HTTP (a TLS proxy is in front).
        #[arg(long, help_heading = "Web")]
        secure_cookies: bool,
        /// A login session ends after this long without a request.
        #[arg(long, default_value = "8h", value_parser = humantime::parse_duration, help_heading = "Web")]
        session_idle: Duration,
        /// How often the master's status (and the seats, while a seats page is open) is
        /// asked.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        every: Duration,
        /// How long to wait for the master.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// How many days of seat counts the history page reads back from the alert log at
        /// start (1 to 92; the broker keeps alerts 30 days unless --alert-max-age says
        /// otherwise). The last day is kept as it came, older days as hourly peaks.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=92), help_heading = "Web")]
        history_days: u32,
    },
    /// Read a password from standard input and print its argon2 hash for the users file.
    HashPassword,
}

fn parse_severity(s: &str) -> Result<Severity, String> {
    Severity::parse(s)
        .ok_or_else(|| format!("unknown severity {s:?}: use info, warning or critical"))
}

fn parse_kind(s: &str) -> Result<AlertKind, String> {
    AlertKind::parse(s).ok_or_else(|| {
        let known: Vec<&str> = AlertKind::ALL.iter().map(|k| k.token()).collect();
        format!("unknown alert kind {s:?}: use one of {}", known.join(", "))
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::HashPassword = cli.command {
        let mut password = String::new();
        std::io::stdin().read_line(&mut password)?;
        let password = password.trim_end_matches(['\r', '\n']);
        anyhow::ensure!(!password.is_empty(), "no password on standard input");
        println!("{}", lmbus_monitor::web::hash_password(password)?);
        return Ok(());
    }
    let cluster = cli
        .cluster
        .ok_or_else(|| anyhow!("no cluster name: pass --cluster or set LMBUS_CLUSTER"))?;
    let subjects = Subjects::new(&cluster)?;
    // The first connect is not news; a reconnect is, and says that nothing is lost.
    let was_connected = std::sync::atomic::AtomicBool::new(false);
    let client = lmbus_nats::connect_with(
        &cli.nats,
        async_nats::ConnectOptions::new().name("lmbus-monitor"),
        &cli.nats_auth.into(),
        move |event| match event {
            async_nats::Event::Disconnected => {
                eprintln!("lmbus-monitor: lost the connection to NATS; reconnecting")
            }
            async_nats::Event::Connected
                if was_connected.swap(true, std::sync::atomic::Ordering::Relaxed) =>
            {
                eprintln!(
                    "lmbus-monitor: reconnected to NATS; tailing resumes after the last alert read, without gap or duplicate"
                )
            }
            _ => {}
        },
    )
    .await?;
    match cli.command {
        Command::Tail {
            since,
            last,
            follow,
            json,
            severity,
            kind,
            slave,
            agent_type,
            count,
            duration,
        } => {
            let filter = Filter {
                min_severity: severity,
                kinds: kind.into_iter().collect(),
                slaves: slave.into_iter().collect::<BTreeSet<_>>(),
                agent_types: agent_type.into_iter().collect(),
            };
            let filtered = !filter.is_empty();
            let start = match (since, last) {
                (Some(ago), _) => Start::Since(ago),
                // Without filters the last N stored are the last N shown; with them, the
                // whole history is read and the last N that pass are held back.
                (None, Some(n)) if !filtered => Start::Last(n),
                (None, Some(_)) => Start::All,
                (None, None) => Start::Now,
            };
            let (incoming, stored_until) = alert_source(&client, &subjects, start).await?;
            let hold_last = match (start, last) {
                (Start::All, Some(n)) => Some(lmbus_monitor::HoldLast {
                    n: usize::try_from(n).unwrap_or(usize::MAX),
                    end: stored_until.unwrap_or(0),
                }),
                _ => None,
            };
            // History only, unless asked to follow: stop at the last alert stored now.
            let until = match start {
                Start::Now => None,
                _ if follow => None,
                // An empty stream: nothing stored, nothing to wait for.
                _ => Some(stored_until.unwrap_or(0)),
            };
            if until == Some(0) {
                return Ok(());
            }
            eprintln!("lmbus-monitor: tailing alerts on {}", subjects.all_alerts());
            let stop = async move {
                match duration {
                    Some(d) => {
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {},
                            _ = tokio::signal::ctrl_c() => {},
                        }
                    }
                    None => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            let format = if json { Format::Json } else { Format::Text };
            let mut stdout = std::io::stdout();
            tail(
                incoming,
                &filter,
                format,
                count,
                until,
                hold_last,
                &mut stdout,
                stop,
            )
            .await?;
        }
        Command::Audit {
            slave,
            agent,
            since,
            last,
            json,
        } => {
            let query = lmbus_monitor::AuditQuery {
                slave,
                agent,
                since: since.map(|ago| time::OffsetDateTime::now_utc() - ago),
                last,
            };
            let audit = lmbus_monitor::audit(&client, &subjects, &query).await?;
            if json {
                for record in &audit.records {
                    println!("{}", serde_json::to_string(record)?);
                }
            } else {
                print!("{}", lmbus_monitor::render_audit(&audit));
            }
        }
        Command::Licenses {
            once,
            json,
            every,
            timeout,
        } => {
            use std::io::IsTerminal as _;
            let live = !once && !json && std::io::stdout().is_terminal();
            if live {
                lmbus_monitor::live::run(&client, &subjects, every, timeout).await?;
            } else {
                let status = fetch_status(&client, &subjects, timeout).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    print!("{}", render_status(&status));
                }
            }
        }
        Command::Web {
            listen,
            users,
            tls_cert,
            tls_key,
            secure_cookies,
            session_idle,
            every,
            timeout,
            history_days,
        } => {
            let users = users
                .map(|path| lmbus_monitor::web::Users::load(&path))
                .transpose()?;
            let cfg = lmbus_monitor::web::WebConfig {
                listen,
                users,
                tls: match (tls_cert, tls_key) {
                    (Some(cert), Some(key)) => Some((cert, key)),
                    (None, None) => None,
                    _ => {
                        anyhow::bail!("--tls-cert and --tls-key go together: pass both or neither")
                    }
                },
                secure_cookies,
                every,
                timeout,
                session_idle,
                history_days,
            };
            lmbus_monitor::web::run(client, subjects, cfg, shutdown_signal()).await?;
        }
        Command::HashPassword => {}
    }
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = lmbus_nats::config_file::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lmbus-monitor: error: {e:#}");
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

    /// Every long flag of `tail`, `audit` and `licenses` is a config file key that takes
    /// effect, and a key no command takes is refused, naming the key and the file.
    #[test]
    fn every_flag_is_a_config_key_and_unknown_keys_are_refused() {
        let failed = lmbus_nats::config_file::keys_not_applied::<Cli>(&["info", "slave_connected"]);
        assert!(
            failed.is_empty(),
            "flags the config file cannot set: {failed:#?}"
        );
        let keys = lmbus_nats::config_file::keys(&<Cli as clap::CommandFactory>::command());
        for key in ["nats", "nats_user", "cluster", "every", "severity", "for"] {
            assert!(keys.contains(key), "{key} is not a key: {keys:?}");
        }
        let dir = std::env::temp_dir().join(format!("lmbus-monitor-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("monitor.toml");
        std::fs::write(&path, "cluster = \"acme\"\nevry = \"5s\"\n").unwrap();
        let e = lmbus_nats::config_file::try_parse_from::<Cli, _, _>([
            "lmbus-monitor",
            "--config",
            path.to_str().unwrap(),
            "licenses",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(path.to_str().unwrap())
                && e.contains("unknown key evry (did you mean every?)"),
            "{e}"
        );
        std::fs::write(
            &path,
            "cluster = \"acme\"\nevery = \"5s\"\nseverity = \"warning\"\n",
        )
        .unwrap();
        let cli: Cli = lmbus_nats::config_file::try_parse_from([
            "lmbus-monitor",
            "licenses",
            "--config",
            path.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(cli.cluster.as_deref(), Some("acme"));
        let Command::Licenses { every, .. } = cli.command else {
            panic!("not licenses")
        };
        assert_eq!(every, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
