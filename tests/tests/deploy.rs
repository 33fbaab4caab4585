#![allow(clippy::unwrap_used)]
//! The deployment kit in `deploy/` (issue 23 item 4) against the real binaries: the
//! compose file's commands, flags and environment, the systemd units' `ExecStart` and
//! their example config files, and `systemd-analyze verify` where systemd is there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use lmbus_tests::*;

const BINARIES: [&str; 4] = [
    "lmbus-broker",
    "lmbus-slave",
    "lmbus-monitor",
    "lmbus-license",
];

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// The `--help` text of `binary` with `subcommands`.
fn help(binary: &Path, subcommands: &[&str]) -> String {
    let out = Command::new(binary)
        .args(subcommands)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {} --help: {}",
        binary.display(),
        subcommands.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The words of a help text that look like flags (`--nats`, `-js`, `--store_dir`).
fn flags_in(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=')
        .filter(|w| w.starts_with('-'))
        .map(|w| {
            w.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric()))
                .to_owned()
        })
        .collect()
}

/// A command's words: the binary, its subcommands (the words before the first flag), and
/// the flags it passes.
fn split(command: &[String]) -> (&str, Vec<&str>, Vec<&str>) {
    let binary = command[0].as_str();
    let subcommands = command[1..]
        .iter()
        .take_while(|w| !w.starts_with('-'))
        .map(String::as_str)
        .collect();
    let flags = command[1..]
        .iter()
        .filter(|w| w.starts_with('-'))
        .map(|w| w.split('=').next().unwrap())
        .collect();
    (binary, subcommands, flags)
}

/// Steps: `deploy/compose.yaml` is read (anchors merged); it has three NATS nodes, three
/// brokers with distinct ids and priorities, two slaves and the monitor. Each lmbus
/// service's command names a real binary and subcommand, and every flag it passes is one
/// that command's `--help` lists; every `LMBUS_*` variable it sets is one that command
/// reads (its help shows `[env: …]`). Each NATS node's flags are ones `nats-server --help`
/// lists, and the NATS nodes get every password variable `deploy/nats-server.conf` uses.
#[test]
fn the_compose_file_uses_only_real_commands_flags_and_variables() {
    let text = std::fs::read_to_string(deploy("compose.yaml")).unwrap();
    let mut doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    doc.apply_merge().unwrap();
    let services = doc["services"].as_mapping().unwrap();
    let nats_server_help = {
        let out = Command::new(nats_server_bin())
            .arg("--help")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let server_conf = std::fs::read_to_string(deploy("nats-server.conf")).unwrap();
    let (mut nats_nodes, mut ids, mut binaries_used) = (0, BTreeSet::new(), Vec::new());
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let command: Vec<String> = service["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} has no command list"))
            .iter()
            .map(|w| w.as_str().unwrap().to_owned())
            .collect();
        let image = service["image"].as_str().unwrap_or_default();
        let environment: Vec<String> = service["environment"]
            .as_mapping()
            .map(|m| m.keys().map(|k| k.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        if image.contains("nats") {
            nats_nodes += 1;
            let known = flags_in(&nats_server_help);
            for flag in split(
                &[String::from("nats-server")]
                    .into_iter()
                    .chain(command.clone())
                    .collect::<Vec<_>>(),
            )
            .2
            {
                assert!(
                    known.contains(flag),
                    "{name}: nats-server has no flag {flag}"
                );
            }
            let settings: String = server_conf
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n");
            for var in settings
                .split('$')
                .skip(1)
                .filter_map(|w| {
                    w.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .next()
                })
                .filter(|v| v.starts_with("LMBUS_"))
            {
                assert!(
                    environment.iter().any(|e| e == var),
                    "{name} does not set {var}, which nats-server.conf uses"
                );
            }
            continue;
        }
        let (binary, subcommands, flags) = split(&command);
        assert!(
            BINARIES.contains(&binary),
            "{name}: unknown binary {binary}"
        );
        let help = help(&bin(binary).unwrap(), &subcommands);
        let known = flags_in(&help);
        for flag in flags {
            assert!(
                known.contains(flag),
                "{name}: `{binary} {}` has no flag {flag}",
                subcommands.join(" ")
            );
        }
        for var in environment.iter().filter(|v| v.starts_with("LMBUS_")) {
            assert!(
                // A secret's variable is shown without its value: `[env: NAME]`.
                help.contains(&format!("[env: {var}=")) || help.contains(&format!("[env: {var}]")),
                "{name}: `{binary} {}` does not read {var}",
                subcommands.join(" ")
            );
        }
        if let Some(at) = command.iter().position(|w| w == "--id") {
            assert!(ids.insert(command[at + 1].clone()), "{name}: id used twice");
        }
        binaries_used.push(binary.to_owned());
    }
    assert_eq!(nats_nodes, 3);
    let count = |b: &str| binaries_used.iter().filter(|u| *u == b).count();
    assert_eq!(count("lmbus-broker"), 3, "{binaries_used:?}");
    assert!(count("lmbus-slave") >= 2, "{binaries_used:?}");
    assert_eq!(count("lmbus-monitor"), 1, "{binaries_used:?}");
}

/// Steps: each unit in `deploy/systemd/` runs its binary with `run --config FILE`, a real
/// command; the example config next to it (`broker.toml`, `slave.toml`) is accepted by that
/// binary (it stops at the license or key files it names, which are not there, never at a
/// key: a key no flag takes exits 2 naming it); the units carry the hardening they promise;
/// and `systemd-analyze verify` accepts them (with `ExecStart` pointed at the built binary)
/// where systemd-analyze is installed.
#[test]
fn the_systemd_units_and_their_configs_are_real() {
    let dir = tempfile::tempdir().unwrap();
    for (unit, binary, config) in [
        ("lmbus-broker.service", "lmbus-broker", "broker.toml"),
        ("lmbus-slave.service", "lmbus-slave", "slave.toml"),
    ] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{unit}"))).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        let words: Vec<String> = exec.split_whitespace().map(str::to_owned).collect();
        assert_eq!(words[0], format!("/usr/local/bin/{binary}"));
        let built = bin(binary).unwrap();
        let (_, subcommands, flags) = split(&words);
        let known = flags_in(&help(&built, &subcommands));
        for flag in flags {
            assert!(known.contains(flag), "{unit}: no flag {flag}");
        }
        for setting in [
            "User=lmbus",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "CapabilityBoundingSet=",
        ] {
            assert!(text.lines().any(|l| l == setting), "{unit}: no {setting}");
        }

        // The example config, where no license or key file is: the binary reads every key
        // and stops at the first missing file.
        let copy = dir.path().join(config);
        std::fs::copy(deploy(&format!("systemd/{config}")), &copy).unwrap();
        let out = Command::new(&built)
            .args(["run", "--config"])
            .arg(&copy)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{config}: {said}");
        assert!(
            said.contains("cannot read") && !said.contains("config file"),
            "{config}: {said}"
        );

        let runnable = dir.path().join(unit);
        std::fs::write(
            &runnable,
            text.replace(&format!("/usr/local/bin/{binary}"), built.to_str().unwrap()),
        )
        .unwrap();
        if let Some(analyze) = on_path("systemd-analyze") {
            let out = Command::new(analyze)
                .args(["verify", "--man=no"])
                .arg(&runnable)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "systemd-analyze verify {unit}: {said}"
            );
            eprintln!("checked: systemd-analyze verify {unit}: {}", said.trim());
        } else {
            eprintln!("systemd-analyze is not installed: {unit} was not verified by systemd");
        }
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
