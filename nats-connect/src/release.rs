//! What every lmbus binary says about its build and offers for packaging: `--version`
//! with the git commit and build date (stamped by `build.rs`), `completions SHELL` (a shell
//! completion script, clap_complete) and `manpage --out DIR` (man pages for the command and
//! each subcommand, clap_mangen), which `cargo xtask dist` puts in the release archive.
//! [`crate::config_file::parse`] adds both subcommands to every binary's command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, Command, value_parser};
use clap_complete::Shell;

/// The package version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit it was built from (12 hex digits), or "unknown".
pub const COMMIT: &str = env!("LMBUS_GIT_COMMIT");
/// The build date, UTC (`YYYY-MM-DD`).
pub const BUILD_DATE: &str = env!("LMBUS_BUILD_DATE");
/// What `--version` prints after the binary's name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LMBUS_GIT_COMMIT"),
    ", built ",
    env!("LMBUS_BUILD_DATE"),
    ")"
);

/// `cmd` with the build's version and the `completions` and `manpage` subcommands.
pub fn command(cmd: Command) -> Command {
    cmd.version(LONG_VERSION)
        .subcommand(
            Command::new("completions")
                .about("Print a shell completion script for this binary")
                .long_about(
                    "Print a shell completion script for this binary, e.g. `lmbus-broker completions bash > /etc/bash_completion.d/lmbus-broker`.",
                )
                .arg(
                    Arg::new("shell")
                        .help("The shell: bash, elvish, fish, powershell or zsh")
                        .required(true)
                        .value_parser(value_parser!(Shell)),
                ),
        )
        .subcommand(
            Command::new("manpage")
                .about("Write this binary's man pages (one per command) into a directory")
                .arg(
                    Arg::new("out")
                        .long("out")
                        .help("The directory to write the pages into (created if missing)")
                        .required(true)
                        .value_parser(value_parser!(PathBuf)),
                ),
        )
}

/// Runs `completions` or `manpage` when `args` ask for one: `Some(exit code)`; `None` for
/// any other command line.
pub fn run(cmd: &Command, args: &[OsString]) -> Option<i32> {
    // Only these two: anything else (a run, --help, an error) is the caller's to parse.
    let first = args.get(1)?.to_str()?;
    if first != "completions" && first != "manpage" {
        return None;
    }
    let mut cmd = command(cmd.clone());
    let matches = match cmd.clone().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => e.exit(),
    };
    let name = cmd.get_name().to_owned();
    match matches.subcommand() {
        Some(("completions", m)) => {
            let shell = *m.get_one::<Shell>("shell")?;
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
            Some(0)
        }
        Some(("manpage", m)) => {
            let out = m.get_one::<PathBuf>("out")?;
            match write_manpages(&cmd, out) {
                Ok(written) => {
                    for page in written {
                        println!("{}", page.display());
                    }
                    Some(0)
                }
                Err(e) => {
                    eprintln!(
                        "{name}: error: cannot write man pages into {}: {e}",
                        out.display()
                    );
                    Some(1)
                }
            }
        }
        _ => None,
    }
}

/// Writes `NAME.1` for `cmd` and `NAME-SUB.1` for each subcommand, recursively (the
/// `help`, `completions` and `manpage` subcommands left out); returns the files written.
pub fn write_manpages(cmd: &Command, out: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let mut cmd = cmd.clone();
    cmd.build();
    let mut written = Vec::new();
    page(&cmd, cmd.get_name().to_owned(), out, &mut written)?;
    Ok(written)
}

fn page(
    cmd: &Command,
    name: String,
    out: &Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let path = out.join(format!("{name}.1"));
    let mut text = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(name.clone())).render(&mut text)?;
    std::fs::write(&path, text)?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if matches!(sub.get_name(), "help" | "completions" | "manpage") {
            continue;
        }
        page(sub, format!("{name}-{}", sub.get_name()), out, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Command {
        Command::new("lmbus-demo").about("a demo").subcommand(
            Command::new("run")
                .about("run it")
                .arg(Arg::new("fast").long("fast").help("go fast")),
        )
    }

    #[test]
    fn the_version_names_the_commit_and_the_date() {
        assert!(LONG_VERSION.starts_with(VERSION));
        assert!(
            COMMIT == "unknown"
                || (COMMIT.len() == 12 && COMMIT.chars().all(|c| c.is_ascii_hexdigit())),
            "{COMMIT}"
        );
        assert_eq!(BUILD_DATE.len(), 10, "{BUILD_DATE}");
        assert!(command(demo()).render_version().contains(LONG_VERSION));
    }

    #[test]
    fn man_pages_for_the_command_and_each_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_manpages(&command(demo()), dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["lmbus-demo.1", "lmbus-demo-run.1"]);
        let run = std::fs::read_to_string(&written[1]).unwrap();
        assert!(run.contains(".TH") && run.contains("fast"), "{run}");
    }

    #[test]
    fn other_command_lines_are_left_alone() {
        let args: Vec<OsString> = ["lmbus-demo", "run", "--fast"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(run(&demo(), &args), None);
        assert_eq!(run(&demo(), &[OsString::from("lmbus-demo")]), None);
    }
}
