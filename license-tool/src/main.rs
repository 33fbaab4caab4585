//! `lmbus-license`: the vendor's tool. `keygen` makes the vendor key pair, `sign` issues a
//! license file, `verify` checks one as a broker or slave would, `inspect` shows one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lmbus_schemas::{
    Context, License, Limits, Role, key_id, parse_public_key, parse_secret_key, public_key_text,
    secret_key_text, sign_license_as, verify_license,
};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "lmbus-license",
    version,
    about = "Make vendor keys and sign, verify and inspect lmbus license files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: lmbus_nats::config_file::ConfigArg,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a vendor key pair: DIR/vendor.key (secret, mode 0600) and DIR/vendor.pub.
    Keygen {
        /// Directory to write the two files into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Overwrite existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a signed license file.
    Sign(SignArgs),
    /// Check a license file's signature and dates (and role, with --role).
    Verify {
        /// The license file to check.
        file: PathBuf,
        /// The vendor's public key file.
        #[arg(long, env = "LMBUS_VENDOR_KEY")]
        vendor_key: PathBuf,
        /// Require this role.
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        /// Check the dates as of this day (YYYY-MM-DD) instead of today.
        #[arg(long, value_parser = parse_date)]
        date: Option<Date>,
    },
    /// Show a license file's content; the signature is checked only with --vendor-key.
    Inspect {
        /// The license file to show.
        file: PathBuf,
        /// The vendor's public key file, to check the signature too.
        #[arg(long, env = "LMBUS_VENDOR_KEY")]
        vendor_key: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct SignArgs {
    /// The vendor's secret key file (from keygen).
    #[arg(long)]
    key: PathBuf,
    /// Where to write the signed license.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite --out if it exists.
    #[arg(long)]
    force: bool,
    /// Customer name.
    #[arg(long)]
    customer: String,
    /// Who uses the license: master (a broker; needs --total), slave (a slave agent; may
    /// have --local) or none.
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Where it may be used: production, backup (a backup master) or development.
    #[arg(long, value_enum, default_value_t = ContextArg::Production)]
    context: ContextArg,
    /// License id (GUID) [default: a new random one].
    #[arg(long)]
    id: Option<Uuid>,
    /// First valid day, YYYY-MM-DD [default: today].
    #[arg(help_heading = "Dates", long, value_parser = parse_date)]
    issued: Option<Date>,
    /// Last valid day, YYYY-MM-DD.
    #[arg(help_heading = "Dates", long, value_parser = parse_date)]
    expires: Date,
    /// Last day of maintenance, YYYY-MM-DD [default: --expires].
    #[arg(help_heading = "Dates", long, value_parser = parse_date)]
    maintenance_expires: Option<Date>,
    /// Offline limit: the master grants no new seat once this many days pass without a
    /// vendor sync (counted from the issue day until the first). At least 60; omit for no
    /// offline limit.
    #[arg(help_heading = "Dates", long)]
    sync_within_days: Option<u32>,
    /// Orders two issues of the same license id on the same --issued day: the second gets
    /// a higher revision (a master refuses to reload an older issue of its license).
    #[arg(help_heading = "Dates", long)]
    revision: Option<u32>,
    /// A backup master license (--role master --context backup): the id of the production
    /// license it backs (required there, refused on any other license).
    #[arg(long, value_name = "LICENSE_ID")]
    backs: Option<Uuid>,
    /// With --backs: the production cluster's name, signed into the license, so that the
    /// backup master watches that cluster and no other (its --production-cluster flag may
    /// then be omitted, and must match if given).
    #[arg(long, value_name = "CLUSTER")]
    production_cluster: Option<String>,
    /// Aggregate agent limit (required for a master license, refused on others).
    #[arg(help_heading = "Limits", long)]
    total: Option<u32>,
    /// The slave's own agent limit (slave license, optional).
    #[arg(help_heading = "Limits", long)]
    local: Option<u32>,
    /// A per agent type limit, NAME=LIMIT (repeat), at most --total, e.g. inbound=300.
    #[arg(help_heading = "Limits", long = "agent-type", value_parser = parse_type_limit)]
    agent_types: Vec<(String, u32)>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Master,
    Slave,
    None,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Master => Role::Master,
            RoleArg::Slave => Role::Slave,
            RoleArg::None => Role::None,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ContextArg {
    Production,
    Backup,
    Development,
}

impl From<ContextArg> for Context {
    fn from(c: ContextArg) -> Self {
        match c {
            ContextArg::Production => Context::Production,
            ContextArg::Backup => Context::Backup,
            ContextArg::Development => Context::Development,
        }
    }
}

fn parse_date(s: &str) -> Result<Date, String> {
    Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|e| format!("invalid date {s:?} (expected YYYY-MM-DD): {e}"))
}

fn parse_type_limit(s: &str) -> Result<(String, u32), String> {
    let (name, limit) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=LIMIT, got {s:?}"))?;
    let limit = limit
        .parse()
        .map_err(|e| format!("limit in {s:?} is not a number: {e}"))?;
    Ok((name.to_owned(), limit))
}

/// Refuses limits that a license of `role` would not use or that contradict each other:
/// `--total` on anything but a master license (a slave's own limit is `--local`), and an
/// agent type's limit above the total (it could never be reached).
fn check_limits(
    role: RoleArg,
    total: Option<u32>,
    agent_types: &[(String, u32)],
) -> anyhow::Result<()> {
    match (role, total) {
        (RoleArg::Master, None) => {
            bail!("a master license needs --total (its aggregate agent limit)")
        }
        (RoleArg::Slave, Some(_)) => bail!(
            "--total is the aggregate limit of a master license; a slave license has none: use --local for the slave's own limit"
        ),
        (RoleArg::None, Some(_)) => {
            bail!(
                "--total is the aggregate limit of a master license; a license with role none has none"
            )
        }
        _ => {}
    }
    if let Some(total) = total {
        for (name, limit) in agent_types {
            if *limit > total {
                bail!(
                    "--agent-type {name}={limit} is above --total {total}: a type's limit can be at most the total"
                );
            }
        }
    }
    Ok(())
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn describe(l: &License) -> String {
    let types = if l.limits.agent_types.is_empty() {
        "any".to_owned()
    } else {
        l.limits
            .agent_types
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "license {}\n  customer            {}\n  role                {}\n  context             {}\n  issued              {}{}\n  expires             {}\n  maintenance expires {}\n  sync within         {}\n  total limit         {}\n  local limit         {}\n  agent types         {}",
        l.id,
        l.customer,
        l.role,
        l.context,
        l.issued,
        l.revision
            .map_or(String::new(), |r| format!(" (revision {r})")),
        l.expires,
        l.maintenance_expires,
        l.sync_within_days
            .map_or("- (no offline limit)".into(), |n| format!("{n} days")),
        l.limits.total.map_or("-".into(), |n| n.to_string()),
        l.limits.local.map_or("-".into(), |n| n.to_string()),
        types
    )
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let today = OffsetDateTime::now_utc().date();
    match cli.command {
        Command::Keygen { out, force } => {
            let secret_path = out.join("vendor.key");
            let public_path = out.join("vendor.pub");
            if !force && (secret_path.exists() || public_path.exists()) {
                bail!(
                    "{} or {} already exists: pass --force to replace the vendor key (licenses signed with the old key will no longer verify)",
                    secret_path.display(),
                    public_path.display()
                );
            }
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).context("no randomness available for the key")?;
            let key = lmbus_schemas::VendorKey::from_bytes(&seed);
            write_secret(&secret_path, &secret_key_text(&key))?;
            std::fs::write(&public_path, public_key_text(&key.verifying_key()))
                .with_context(|| format!("cannot write {}", public_path.display()))?;
            println!(
                "vendor key {} written: {} (keep secret), {} (give to brokers and slaves)",
                key_id(&key.verifying_key()),
                secret_path.display(),
                public_path.display()
            );
        }
        Command::Sign(args) => {
            if !args.force && args.out.exists() {
                bail!(
                    "{} already exists: pass --force to replace it (a customer holding the old file keeps using it until they get the new one)",
                    args.out.display()
                );
            }
            check_limits(args.role, args.total, &args.agent_types)?;
            let key = parse_secret_key(&read(&args.key, "vendor secret key")?)
                .with_context(|| format!("vendor key file {}", args.key.display()))?;
            let license = License {
                id: args.id.unwrap_or_else(Uuid::new_v4),
                customer: args.customer,
                issued: args.issued.unwrap_or(today),
                expires: args.expires,
                maintenance_expires: args.maintenance_expires.unwrap_or(args.expires),
                role: args.role.into(),
                context: args.context.into(),
                sync_within_days: args.sync_within_days,
                revision: args.revision,
                backs: args.backs,
                production_cluster: args.production_cluster,
                limits: Limits {
                    total: args.total,
                    local: args.local,
                    agent_types: args.agent_types.into_iter().collect::<BTreeMap<_, _>>(),
                },
            };
            let text = sign_license_as(&license, &key, &args.out.display().to_string())?;
            std::fs::write(&args.out, text)
                .with_context(|| format!("cannot write {}", args.out.display()))?;
            println!("signed {} -> {}", license.id, args.out.display());
        }
        Command::Verify {
            file,
            vendor_key,
            role,
            date,
        } => {
            let key = parse_public_key(&read(&vendor_key, "vendor public key")?)
                .with_context(|| format!("vendor key file {}", vendor_key.display()))?;
            let name = file.display().to_string();
            let license = verify_license(&read(&file, "license file")?, &name, &key)?;
            license.check_dates(date.unwrap_or(today), &name)?;
            if let Some(role) = role {
                license.require_role(role.into(), &name)?;
            }
            println!(
                "{name}: valid, signed by vendor key {}, {} days left\n{}",
                key_id(&key),
                license.days_left(date.unwrap_or(today)),
                describe(&license)
            );
        }
        Command::Inspect { file, vendor_key } => {
            let text = read(&file, "license file")?;
            let name = file.display().to_string();
            match vendor_key {
                Some(path) => {
                    let key = parse_public_key(&read(&path, "vendor public key")?)
                        .with_context(|| format!("vendor key file {}", path.display()))?;
                    let license = verify_license(&text, &name, &key)?;
                    println!(
                        "{}\nsignature: valid (vendor key {})",
                        describe(&license),
                        key_id(&key)
                    );
                }
                None => {
                    print!("{text}");
                    println!("(signature not checked: pass --vendor-key to check it)");
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(lmbus_nats::config_file::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lmbus-license: error: {e:#}");
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

    /// Every long flag of every command is a config file key that takes effect (a signing
    /// profile: `key`, `customer`, `vendor_key`), and a key no command takes is refused.
    #[test]
    fn every_flag_is_a_config_key_and_unknown_keys_are_refused() {
        let failed = lmbus_nats::config_file::keys_not_applied::<Cli>(&[
            "2026-01-01",
            "inbound=1",
            "00000000-0000-0000-0000-000000000001",
        ]);
        assert!(
            failed.is_empty(),
            "flags the config file cannot set: {failed:#?}"
        );
        let dir = std::env::temp_dir().join(format!("lmbus-license-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vendor.toml");
        std::fs::write(&path, "vendor_key = \"vendor.pub\"\ncustomr = \"ACME\"\n").unwrap();
        let e = lmbus_nats::config_file::try_parse_from::<Cli, _, _>([
            "lmbus-license",
            "--config",
            path.to_str().unwrap(),
            "inspect",
            "x.lic",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(path.to_str().unwrap())
                && e.contains("unknown key customr (did you mean customer?)"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
