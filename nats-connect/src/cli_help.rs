//! A check every binary's tests share: each argument of each (sub)command has a help text,
//! so `--help` never shows a bare `<FILE>` or `--role`. Here because every lmbus binary
//! parses its command line with clap and this crate already carries the shared flags.

/// The arguments under `cmd`, its subcommands included, that have no help text, as
/// `path: --flag` (or `path: <VALUE>`). clap's own `--help` and `--version` are skipped.
pub fn undocumented_arguments(cmd: &clap::Command) -> Vec<String> {
    let mut missing = Vec::new();
    walk(cmd, cmd.get_name().to_owned(), &mut missing);
    missing
}

fn walk(cmd: &clap::Command, path: String, missing: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" || arg.is_hide_set() {
            continue;
        }
        if arg.get_help().is_none() && arg.get_long_help().is_none() {
            let name = match arg.get_long() {
                Some(long) => format!("--{long}"),
                None => format!("<{}>", id.to_uppercase()),
            };
            missing.push(format!("{path}: {name}"));
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        if sub.get_about().is_none() && sub.get_long_about().is_none() {
            missing.push(format!("{path} {}: no about", sub.get_name()));
        }
        walk(sub, format!("{path} {}", sub.get_name()), missing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_arguments_without_help_in_subcommands() {
        let cmd = clap::Command::new("tool")
            .arg(clap::Arg::new("loud").long("loud").help("Shout."))
            .subcommand(
                clap::Command::new("sub")
                    .about("A subcommand.")
                    .arg(clap::Arg::new("file"))
                    .arg(clap::Arg::new("role").long("role")),
            )
            .subcommand(clap::Command::new("bare"));
        assert_eq!(
            undocumented_arguments(&cmd),
            [
                "tool sub: <FILE>",
                "tool sub: --role",
                "tool bare: no about"
            ]
        );
    }
}
