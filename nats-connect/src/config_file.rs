//! The config file every lmbus binary reads with `--config FILE` (`LMBUS_CONFIG`), and its
//! one rule: **every long flag of the binary's commands, with `_` for `-`, is a key**
//! (`nats_user = "broker"`, `grace_period = "90s"`, `log = "debug"`, `ledger_trim =
//! true`, `report_to = ["a@x", "b@x"]`). A command takes the keys of its own flags and
//! ignores those only its binary's other commands take, so one file serves `run` and the
//! `admin` or client commands alike; a key that no command of the binary has is refused,
//! naming the key, the file and the closest valid key. Values are written as on the command
//! line (TOML strings, numbers or booleans; a list for a flag that may be repeated); paths
//! are relative to the file's own folder. Flags and `LMBUS_*` environment variables win
//! over the file.
//!
//! The file is applied through clap itself ([`parse`]): its keys become flags appended to
//! the command line for every setting the command line and the environment left unset, so
//! each value is checked by the flag's own parser and no key can be missing for a flag.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, ValueHint};

use crate::NatsAuthArgs;

/// `--config`, global on every lmbus binary: flatten into its top-level command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArg {
    /// TOML config file; every long flag, with _ for -, is a key.
    ///
    /// One rule for every lmbus binary and command: each long flag, written with `_` for
    /// `-`, is a top-level key (nats = "nats://a:4222", nats_user = "broker", cluster =
    /// "acme", grace_period = "90s", log = "debug", ledger_trim = true). A command ignores
    /// keys that only its binary's other commands take; a key no command takes is an error.
    /// Relative paths are relative to the file. Flags and LMBUS_* environment variables win
    /// over the file.
    #[arg(
        long,
        global = true,
        env = "LMBUS_CONFIG",
        value_name = "FILE",
        help_heading = "Config file"
    )]
    pub config: Option<PathBuf>,
}

/// The flags every lmbus daemon takes first, the same in each: how it reaches NATS. Each
/// daemon flattens it into its `run` flags.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// NATS server URL(s), comma-separated [default: nats://127.0.0.1:4222].
    #[arg(long, env = "LMBUS_NATS_URL", help_heading = "NATS")]
    pub nats: Option<String>,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
}

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("config file {path} is not valid TOML: {detail}")]
    Invalid { path: String, detail: String },
    #[error(
        "config file {path}: unknown key {key}{hint}; every key is a long flag of {binary} with _ for - (see --help)"
    )]
    UnknownKey {
        path: String,
        key: String,
        binary: String,
        /// ` (did you mean …?)`, or empty.
        hint: String,
    },
    #[error("config file {path}: key {key}: {detail}")]
    BadValue {
        path: String,
        key: String,
        detail: String,
    },
}

/// Why [`try_parse_from`] failed: the command line itself, or the config file.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error(transparent)]
    File(#[from] ConfigFileError),
}

/// Parses the process's command line into `P`, applying its `--config` file; on an error
/// prints it and exits with status 2, as clap does.
pub fn parse<P: clap::Parser>() -> P {
    let args: Vec<OsString> = std::env::args_os().collect();
    if let Some(code) = crate::release::run(&P::command(), &args) {
        std::process::exit(code)
    }
    match try_parse_from::<P, _, _>(args) {
        Ok(parsed) => parsed,
        Err(ParseError::Clap(e)) => e.exit(),
        Err(ParseError::File(e)) => {
            eprintln!("{}: error: {e}", P::command().get_name());
            std::process::exit(2)
        }
    }
}

/// Parses `args` into `P`, applying the `--config` file the command names (see the module
/// doc for the rule).
pub fn try_parse_from<P, I, T>(args: I) -> Result<P, ParseError>
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let extra = file_args(&P::command(), &args)?;
    let mut all = args;
    all.extend(extra);
    // With the release subcommands, so that `--help` lists them and `--version` tells the
    // build (`parse` runs them before this).
    let matches = crate::release::command(P::command()).try_get_matches_from(all)?;
    Ok(P::from_arg_matches(&matches)?)
}

/// The flags the config file adds to `args`: none without `--config`. Required flags may
/// come from the file, so this first look at the command line forgives every error (the
/// real parse that follows reports them).
fn file_args(cmd: &Command, args: &[OsString]) -> Result<Vec<OsString>, ConfigFileError> {
    let mut lenient = cmd.clone().ignore_errors(true);
    lenient.build();
    let Ok(matches) = lenient
        .clone()
        .try_get_matches_from_mut(args.iter().cloned())
    else {
        return Ok(Vec::new());
    };
    let (leaf, leaf_matches) = leaf(&lenient, &matches);
    let Some(path) = leaf_matches
        .try_get_one::<PathBuf>("config")
        .ok()
        .flatten()
        .cloned()
    else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigFileError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigFileError::Invalid {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let known = keys(&lenient);
    let mut extra = Vec::new();
    for (key, value) in &table {
        if !known.contains(key) {
            return Err(unknown_key(&path, key, value, &known, lenient.get_name()));
        }
        let long = key.replace('_', "-");
        // A key only another command of this binary takes.
        let Some(arg) = leaf.get_arguments().find(|a| a.get_long() == Some(&long)) else {
            continue;
        };
        let given = |a: &clap::Arg| match leaf_matches.value_source(a.get_id().as_str()) {
            Some(ValueSource::CommandLine) => true,
            // An environment variable counts when it is one of ours: `$USER` is only the
            // default of `--operator`.
            Some(ValueSource::EnvVariable) => a
                .get_env()
                .is_some_and(|e| e.to_string_lossy().starts_with("LMBUS_")),
            _ => false,
        };
        if given(arg) || leaf.get_arg_conflicts_with(arg).into_iter().any(given) {
            continue;
        }
        let bad = |detail: String| ConfigFileError::BadValue {
            path: path.display().to_string(),
            key: key.clone(),
            detail,
        };
        if !arg.get_action().takes_values() {
            match (value.as_bool(), arg.get_action()) {
                (Some(true), ArgAction::SetTrue) | (Some(false), ArgAction::SetFalse) => {
                    extra.push(OsString::from(format!("--{long}")))
                }
                (Some(_), _) => {}
                (None, _) => return Err(bad("must be true or false".into())),
            }
            continue;
        }
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
                items.iter().collect()
            }
            toml::Value::Array(_) => {
                return Err(bad(format!("--{long} takes one value, not a list")));
            }
            one => vec![one],
        };
        for value in values {
            let mut text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(_)
                | toml::Value::Float(_)
                | toml::Value::Boolean(_)
                | toml::Value::Datetime(_) => value.to_string(),
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    return Err(bad(
                        "must be a string, number or boolean, as on the command line".into(),
                    ));
                }
            };
            let is_path = matches!(
                arg.get_value_hint(),
                ValueHint::AnyPath | ValueHint::FilePath | ValueHint::DirPath
            );
            if is_path && Path::new(&text).is_relative() {
                text = base.join(&text).display().to_string();
            }
            check_value(arg, &text).map_err(bad)?;
            extra.push(OsString::from(format!("--{long}={text}")));
        }
    }
    Ok(extra)
}

/// Parses one value as flag `arg` would, so that a bad value is reported with its key.
fn check_value(arg: &clap::Arg, text: &str) -> Result<(), String> {
    let mut probe = clap::Arg::new("value")
        .value_name("VALUE")
        .action(ArgAction::Set)
        .allow_hyphen_values(true)
        .value_parser(arg.get_value_parser().clone());
    if let Some(delimiter) = arg.get_value_delimiter() {
        probe = probe.value_delimiter(delimiter);
    }
    Command::new("config")
        .no_binary_name(true)
        .arg(probe)
        .try_get_matches_from([text])
        .map(|_| ())
        .map_err(|e| clap_detail(&e).replace(" for '<VALUE>'", ""))
}

/// The innermost subcommand the command line chose, with its matches.
fn leaf<'a>(cmd: &'a Command, matches: &'a ArgMatches) -> (&'a Command, &'a ArgMatches) {
    let (mut cmd, mut matches) = (cmd, matches);
    while let Some((name, sub_matches)) = matches.subcommand() {
        match cmd.find_subcommand(name) {
            Some(sub) => (cmd, matches) = (sub, sub_matches),
            None => break,
        }
    }
    (cmd, matches)
}

/// Every config key of `cmd`: the long flags of it and all its subcommands, with `_` for
/// `-`; not `--config` itself, `--help`, `--version` or hidden (test-only) flags.
pub fn keys(cmd: &Command) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut cmd = cmd.clone();
    cmd.build();
    collect_keys(&cmd, &mut keys);
    keys
}

fn collect_keys(cmd: &Command, keys: &mut BTreeSet<String>) {
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long()
            && !arg.is_hide_set()
            && !["config", "help", "version"].contains(&arg.get_id().as_str())
        {
            keys.insert(long.replace('-', "_"));
        }
    }
    for sub in cmd.get_subcommands() {
        collect_keys(sub, keys);
    }
}

fn unknown_key(
    path: &Path,
    key: &str,
    value: &toml::Value,
    known: &BTreeSet<String>,
    binary: &str,
) -> ConfigFileError {
    let hint = match value {
        // `[nats_auth] user = …`: the old nested form; name the flat keys it means.
        toml::Value::Table(inner) => {
            let prefix = key.strip_suffix("_auth").unwrap_or(key);
            let meant: Vec<String> = inner
                .keys()
                .filter_map(|k| closest(&format!("{prefix}_{k}"), known))
                .collect();
            if meant.is_empty() {
                " (a table; keys are flat, at the top level)".to_owned()
            } else {
                format!(
                    " (a table; keys are flat, at the top level: write {} instead)",
                    meant.join(", ")
                )
            }
        }
        _ => closest(key, known)
            .map(|k| format!(" (did you mean {k}?)"))
            .unwrap_or_default(),
    };
    ConfigFileError::UnknownKey {
        path: path.display().to_string(),
        key: key.to_owned(),
        binary: binary.to_owned(),
        hint,
    }
}

/// The valid key nearest to `key`, if one is near enough to be a likely typo.
fn closest(key: &str, known: &BTreeSet<String>) -> Option<String> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= (k.len().max(key.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone())
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// A clap value error in one line, without its `error: ` prefix.
fn clap_detail(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// For each binary's unit test: every command of `P` that takes `--config` accepts every
/// one of its long flags as a key and applies it. For each flag, a file holding it (plus a
/// sample value for each other required flag) is parsed; the flag must then be set.
/// Returns what failed, as `command: --flag: why`. `samples` are values to try for flags
/// whose parser refuses the built-in ones (dates, ids).
pub fn keys_not_applied<P: clap::Parser>(samples: &[&str]) -> Vec<String> {
    let mut cmd = P::command();
    cmd.build();
    let dir = std::env::temp_dir().join(format!(
        "lmbus-config-keys-{}-{}",
        cmd.get_name(),
        std::process::id()
    ));
    let _ = std::fs::create_dir_all(&dir);
    let mut failed = Vec::new();
    walk_commands(&cmd, &[], &mut |path, leaf| {
        if !leaf.get_arguments().any(|a| a.get_id() == "config") {
            return;
        }
        let name = path.join(" ");
        let sample = |arg: &clap::Arg| -> Option<String> {
            let possible = arg.get_possible_values();
            let mut candidates: Vec<String> =
                possible.iter().map(|p| p.get_name().to_owned()).collect();
            candidates.extend(
                ["1", "true", "1s", "00:00", "127.0.0.1:9464", "strict", "x"]
                    .iter()
                    .chain(samples)
                    .map(|s| s.to_string()),
            );
            candidates.into_iter().find(|c| check_value(arg, c).is_ok())
        };
        for arg in leaf.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let id = arg.get_id().as_str();
            if arg.is_hide_set() || ["config", "help", "version"].contains(&id) {
                continue;
            }
            let key = long.replace('-', "_");
            let mut file = toml::Table::new();
            let mut line: Vec<String> = vec![cmd.get_name().to_owned()];
            line.extend(path.iter().skip(1).cloned());
            let value_of = |a: &clap::Arg| -> Option<toml::Value> {
                if !a.get_action().takes_values() {
                    return Some(toml::Value::Boolean(true));
                }
                sample(a).map(toml::Value::String)
            };
            let Some(value) = value_of(arg) else {
                failed.push(format!("{name}: --{long}: no sample value parses"));
                continue;
            };
            file.insert(key.clone(), value);
            for other in leaf.get_arguments().filter(|a| a.is_required_set()) {
                if other.get_id() == arg.get_id() {
                    continue;
                }
                match (other.get_long(), value_of(other)) {
                    (Some(l), Some(v)) => {
                        file.insert(l.replace('-', "_"), v);
                    }
                    (None, Some(toml::Value::String(v))) => line.push(v),
                    _ => {}
                }
            }
            let file_path = dir.join(format!("{}-{key}.toml", path.join("-")));
            if let Err(e) = std::fs::write(&file_path, file.to_string()) {
                failed.push(format!("{name}: --{long}: cannot write a test file: {e}"));
                continue;
            }
            line.push("--config".into());
            line.push(file_path.display().to_string());
            let mut strict = P::command();
            let result = file_args(
                &strict,
                &line.iter().map(OsString::from).collect::<Vec<_>>(),
            )
            .map_err(ParseError::from)
            .and_then(|extra| {
                let mut all: Vec<OsString> = line.iter().map(OsString::from).collect();
                all.extend(extra);
                Ok(strict.try_get_matches_from_mut(all)?)
            });
            match result {
                Err(e) => failed.push(format!("{name}: --{long}: {}", first_line(&e))),
                Ok(matches) => {
                    if leaf_matches(&matches).value_source(id) != Some(ValueSource::CommandLine) {
                        failed.push(format!(
                            "{name}: --{long}: the file's {key} was not applied"
                        ));
                    }
                }
            }
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    failed
}

fn first_line(e: &ParseError) -> String {
    match e {
        ParseError::Clap(e) => clap_detail(e),
        ParseError::File(e) => e.to_string(),
    }
}

fn leaf_matches(matches: &ArgMatches) -> &ArgMatches {
    let mut matches = matches;
    while let Some((_, sub)) = matches.subcommand() {
        matches = sub;
    }
    matches
}

fn walk_commands(cmd: &Command, path: &[String], f: &mut dyn FnMut(&[String], &Command)) {
    let mut here = path.to_vec();
    here.push(cmd.get_name().to_owned());
    if cmd.get_subcommands().next().is_none() || !cmd.is_subcommand_required_set() {
        f(&here, cmd);
    }
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" {
            walk_commands(sub, &here, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small binary with the shapes the real ones have: a global flag, a daemon command
    /// with durations, paths, a switch and a list, and a client command with a required
    /// flag the file may supply.
    #[derive(Debug, clap::Parser)]
    #[command(name = "tool")]
    struct Cli {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, global = true, env = "LMBUS_TEST_LOG", default_value = "info")]
        log: String,
        #[command(subcommand)]
        command: Sub,
    }

    // Parsed once per test: the size of the flag set does not matter.
    #[allow(clippy::large_enum_variant)]
    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        Run {
            #[command(flatten)]
            daemon: DaemonArgs,
            #[arg(long, value_parser = humantime::parse_duration)]
            grace_period: Option<std::time::Duration>,
            #[arg(long)]
            license: Option<PathBuf>,
            #[arg(long, num_args = 0..=1, default_missing_value = "true")]
            trim: Option<bool>,
            #[arg(long, value_delimiter = ',')]
            report_to: Vec<String>,
            #[arg(long)]
            json: bool,
        },
        Status {
            #[arg(long)]
            cluster: String,
            #[arg(long, env = "USER", default_value = "operator")]
            operator: String,
        },
    }

    fn file(dir: &tempfile::TempDir, text: &str) -> String {
        let path = dir.path().join("lmbus.toml");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    #[test]
    fn flat_keys_durations_paths_lists_and_switches_apply() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(
            &dir,
            "nats = \"nats://a:1\"\nnats_user = \"bob\"\nnats_password = \"pw\"\n\
             grace_period = \"90s\"\nlicense = \"master.lic\"\ntrim = true\n\
             report_to = [\"a@x\", \"b@x\"]\njson = true\nlog = \"debug\"\ncluster = \"acme\"\n",
        );
        let cli: Cli = try_parse_from(["tool", "run", "--config", &f]).unwrap();
        assert_eq!(cli.log, "debug");
        let Sub::Run {
            daemon,
            grace_period,
            license,
            trim,
            report_to,
            json,
        } = cli.command
        else {
            panic!("not run")
        };
        assert_eq!(daemon.nats.as_deref(), Some("nats://a:1"));
        assert_eq!(daemon.nats_auth.nats_user.as_deref(), Some("bob"));
        assert_eq!(daemon.nats_auth.nats_password.as_deref(), Some("pw"));
        assert_eq!(grace_period, Some(std::time::Duration::from_secs(90)));
        assert_eq!(license, Some(dir.path().join("master.lic")));
        assert_eq!(trim, Some(true));
        assert_eq!(report_to, ["a@x", "b@x"]);
        assert!(json);
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_may_give_a_required_flag() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(
            &dir,
            "cluster = \"acme\"\noperator = \"alice\"\ngrace_period = \"90s\"\n",
        );
        let cli: Cli = try_parse_from(["tool", "--config", &f, "status"]).unwrap();
        let Sub::Status { cluster, operator } = cli.command else {
            panic!("not status")
        };
        // `grace_period` belongs to `run`: ignored here; `$USER` does not beat the file.
        assert_eq!((cluster.as_str(), operator.as_str()), ("acme", "alice"));
        let cli: Cli =
            try_parse_from(["tool", "status", "--cluster", "other", "--config", &f]).unwrap();
        let Sub::Status { cluster, .. } = cli.command else {
            panic!("not status")
        };
        assert_eq!(cluster, "other");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, "nats_usr = \"bob\"\n");
        let e = try_parse_from::<Cli, _, _>(["tool", "run", "--config", &f])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&f) && e.contains("unknown key nats_usr (did you mean nats_user?)"),
            "{e}"
        );
        let f = file(&dir, "[nats_auth]\nuser = \"bob\"\npassword = \"pw\"\n");
        let e = try_parse_from::<Cli, _, _>(["tool", "run", "--config", &f])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key nats_auth")
                && e.contains("write nats_password, nats_user instead"),
            "{e}"
        );
        let f = file(&dir, "grace_period = \"soon\"\n");
        let e = try_parse_from::<Cli, _, _>(["tool", "run", "--config", &f])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&f) && e.contains("key grace_period") && e.contains("soon"),
            "{e}"
        );
        let e = try_parse_from::<Cli, _, _>(["tool", "run", "--config", "/nonexistent/x.toml"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read config file /nonexistent/x.toml"),
            "{e}"
        );
    }

    #[test]
    fn every_flag_of_the_sample_tool_is_a_key() {
        let failed = keys_not_applied::<Cli>(&[]);
        assert!(failed.is_empty(), "{failed:#?}");
        assert!(keys(&<Cli as clap::CommandFactory>::command()).contains("nats_tls_ca"));
    }

    #[test]
    fn typos_find_the_nearest_key() {
        let known: BTreeSet<String> = ["cluster", "nats_user", "grace_period"]
            .map(String::from)
            .into();
        assert_eq!(closest("clustre", &known).as_deref(), Some("cluster"));
        assert_eq!(closest("something_else", &known), None);
    }
}
