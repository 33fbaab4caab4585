#![allow(clippy::unwrap_used)]
//! What every binary says about its build and offers for packaging (issue 23 item 6), run
//! on the real binaries: `--version` with the commit and build date, `completions SHELL`,
//! `manpage --out DIR`, and both listed in `--help`.

use std::process::Command;

const BINARIES: [(&str, &[&str]); 5] = [
    ("lmbus-broker", &["run", "admin"]),
    ("lmbus-slave", &["run", "register", "status"]),
    ("lmbus-monitor", &["tail", "audit", "licenses"]),
    ("lmbus-license", &["keygen", "sign", "verify", "inspect"]),
    (
        "lmbus-vendor",
        &["serve", "store", "answer", "usage", "unbind"],
    ),
];

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(lmbus_tests::bin(bin).unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Steps: for each of the five binaries: `--version` prints its name, the version, the git
/// commit and the build date the crate was stamped with; `--help` lists `completions` and
/// `manpage`; `completions bash`, `zsh` and `fish` print scripts that name the binary and
/// its subcommands, and an unknown shell is refused (exit 2); `manpage --out DIR` writes
/// `NAME.1` and one page per subcommand, each a roff page (`.TH`) naming its command.
#[test]
fn every_binary_tells_its_build_and_makes_completions_and_man_pages() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, subcommands) in BINARIES {
        let (code, version, _) = run(bin, &["--version"]);
        assert_eq!(code, 0);
        assert_eq!(
            version.trim(),
            format!(
                "{bin} {} (commit {}, built {})",
                lmbus_nats::release::VERSION,
                lmbus_nats::release::COMMIT,
                lmbus_nats::release::BUILD_DATE
            )
        );
        let (_, help, _) = run(bin, &["--help"]);
        assert!(
            help.contains("completions") && help.contains("manpage"),
            "{bin} --help: {help}"
        );
        for (shell, marker) in [
            ("bash", "complete"),
            ("zsh", "#compdef"),
            ("fish", "complete -c"),
        ] {
            let (code, script, err) = run(bin, &["completions", shell]);
            assert_eq!(code, 0, "{bin} completions {shell}: {err}");
            assert!(
                script.contains(marker) && script.contains(bin),
                "{bin} {shell}"
            );
            for sub in subcommands {
                assert!(script.contains(sub), "{bin} {shell}: no {sub}");
            }
        }
        let (code, _, err) = run(bin, &["completions", "tcsh"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("tcsh"), "{err}");

        let out = dir.path().join(bin);
        let (code, listed, err) = run(bin, &["manpage", "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        for page in
            std::iter::once(bin.to_owned()).chain(subcommands.iter().map(|s| format!("{bin}-{s}")))
        {
            let path = out.join(format!("{page}.1"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; written: {listed}", path.display()));
            assert!(text.contains(".TH") && text.contains(&page), "{page}");
        }
        assert!(
            !out.join(format!("{bin}-completions.1")).exists(),
            "a page for the completions command itself"
        );
    }
}
