//! `lmbus-vendor`: `serve` answers masters' vendor syncs from the store; `store` puts a
//! signed master license in it as the customer's current one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lmbus-vendor",
    version,
    about = "The vendor's side of vendor sync: answer masters' syncs with their current signed license"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: lmbus_nats::config_file::ConfigArg,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer sync requests on lmbus.vendor.v1.sync with the store's licenses.
    ///
    /// Run it on the vendor's NATS; customers' NATS servers reach it through a leaf node
    /// that exports only that subject.
    Serve {
        #[command(flatten)]
        daemon: lmbus_nats::config_file::DaemonArgs,
        /// The vendor's secret key file (from `lmbus-license keygen`): answers are signed
        /// with it.
        #[arg(long, help_heading = "Vendor")]
        key: PathBuf,
        /// The store directory (licenses/<id>.lic, syncs.jsonl).
        #[arg(long, help_heading = "Vendor")]
        store: PathBuf,
    },
    /// Air-gapped sites: answer a sync request file (from `lmbus-broker admin sync export`).
    ///
    /// The answer (the store's current license, signed) goes to --out, for `lmbus-broker
    /// admin sync import`; it applies once, to that request.
    Answer {
        /// The customer's request file.
        #[arg(value_name = "REQUEST")]
        request: PathBuf,
        /// Where to write the signed answer.
        #[arg(long)]
        out: PathBuf,
        /// The vendor's secret key file.
        #[arg(long)]
        key: PathBuf,
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
    /// The usage summaries received (one row per sync and agent type), as CSV or JSON.
    Usage {
        /// Only this customer's (the name in its licenses).
        #[arg(long)]
        customer: Option<String>,
        /// Only those received within this long, e.g. 30d [default: all].
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Print JSON (one object per sync) instead of CSV.
        #[arg(long)]
        json: bool,
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
    /// Let license ID move to another installation: the next one that syncs it is bound.
    ///
    /// A license serves the first installation that synced it; others are refused (and
    /// flagged in the log) until then.
    Unbind {
        /// The license id.
        #[arg(long)]
        license: uuid::Uuid,
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
    /// Make a signed master license the customer's current one: the next sync sends it.
    ///
    /// It is verified with the vendor key first.
    Store {
        /// The signed license file (from `lmbus-license sign`).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The vendor's secret key file.
        #[arg(long)]
        key: PathBuf,
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
}

fn read_key(path: &std::path::Path) -> anyhow::Result<lmbus_schemas::VendorKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read vendor key file {}", path.display()))?;
    lmbus_schemas::parse_secret_key(&text)
        .with_context(|| format!("vendor key file {}", path.display()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { daemon, key, store } => {
            let cfg = lmbus_vendor::VendorConfig {
                nats_url: daemon
                    .nats
                    .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned()),
                nats_auth: daemon.nats_auth.into(),
                key: read_key(&key)?,
                store,
            };
            lmbus_vendor::run(cfg, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
        }
        Command::Answer {
            request,
            out,
            key,
            store,
        } => {
            let text = std::fs::read_to_string(&request)
                .with_context(|| format!("cannot read the request {}", request.display()))?;
            let asked: lmbus_schemas::SyncRequest = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a sync request (the JSON `lmbus-broker admin sync export` writes)",
                    request.display()
                )
            })?;
            let key = read_key(&key)?;
            let answer = lmbus_vendor::answer_and_record(&store, &key, &asked)?;
            std::fs::write(&out, serde_json::to_string_pretty(&answer.1)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            match answer.0.refused {
                Some(why) => println!("refused, written to {}: {why}", out.display()),
                None => println!(
                    "answer to sync request {} written to {}",
                    asked.sync,
                    out.display()
                ),
            }
            Ok(())
        }
        Command::Usage {
            customer,
            since,
            json,
            store,
        } => {
            let now =
                u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
                    .unwrap_or(0);
            let since_ms = since.map_or(0, |d| {
                now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            });
            let lines = lmbus_vendor::usage(&store, customer.as_deref(), since_ms)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                print!("{}", lmbus_vendor::usage_csv(&lines));
            }
            Ok(())
        }
        Command::Unbind { license, store } => {
            if lmbus_vendor::unbind(&store, license)? {
                println!("license {license} is free: the next installation that syncs it is bound");
            } else {
                println!("license {license} was bound to no installation");
            }
            Ok(())
        }
        Command::Store { file, key, store } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read license file {}", file.display()))?;
            let license = lmbus_vendor::store_license(&store, &text, &read_key(&key)?)
                .with_context(|| format!("license file {}", file.display()))?;
            println!(
                "license {} for {} is the current one in {}",
                license.id,
                license.customer,
                store.display()
            );
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run(lmbus_nats::config_file::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lmbus-vendor: error: {e:#}");
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

    /// Every long flag is a config file key that takes effect.
    #[test]
    fn every_flag_is_a_config_key() {
        let failed = lmbus_nats::config_file::keys_not_applied::<Cli>(&[
            "00000000-0000-0000-0000-000000000001",
        ]);
        assert!(
            failed.is_empty(),
            "flags the config file cannot set: {failed:#?}"
        );
    }
}
