//! `cargo xtask dist`: one archive with everything a release ships. It builds the release
//! binaries, asks each for its man pages (`manpage --out`) and its completion scripts
//! (`completions bash|zsh|fish`), adds the docs and `deploy/`, writes `SHA256SUMS` for every
//! file inside, then packs `target/dist/lmbus-<version>-<commit>-<arch>-linux.tar.gz` with a
//! `.sha256` beside it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

const BINARIES: [&str; 4] = [
    "lmbus-broker",
    "lmbus-slave",
    "lmbus-monitor",
    "lmbus-license",
];
const PACKAGES: [&str; 4] = [
    "lmbus-broker",
    "lmbus-slave",
    "lmbus-monitor",
    "lmbus-license-tool",
];
const DOCS: [&str; 4] = [
    "README.md",
    "ARCHITECTURE.md",
    "SECURITY.md",
    "BENCHMARKS.md",
];

/// Builds (release, unless `debug`) and packs; returns the archive's path.
pub fn run(root: &Path, debug: bool) -> anyhow::Result<PathBuf> {
    let mut build = super::cargo();
    build.current_dir(root).arg("build");
    if !debug {
        build.arg("--release");
    }
    for p in PACKAGES {
        build.args(["-p", p]);
    }
    super::step("cargo build (the four binaries)", &mut build)?;
    let bins = root
        .join("target")
        .join(if debug { "debug" } else { "release" });
    let version = output(Command::new(bins.join("lmbus-broker")).arg("--version"))?;
    // "lmbus-broker 0.1.0 (commit 0123456789ab, built 2026-11-27)"
    let words: Vec<&str> = version.split_whitespace().collect();
    let (number, commit) = match words.as_slice() {
        [_, number, "(commit", commit, ..] => (*number, commit.trim_end_matches(',')),
        _ => bail!("unexpected --version output: {version}"),
    };
    let name = format!(
        "lmbus-{number}-{commit}-{}-linux{}",
        std::env::consts::ARCH,
        if debug { "-debug" } else { "" }
    );
    let dist = root.join("target").join("dist");
    let stage = dist.join(&name);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("cannot clear {}", stage.display()))?;
    }
    for dir in [
        "bin",
        "man/man1",
        "completions/bash",
        "completions/zsh",
        "completions/fish",
        "doc",
    ] {
        std::fs::create_dir_all(stage.join(dir))?;
    }
    for bin in BINARIES {
        let from = bins.join(bin);
        std::fs::copy(&from, stage.join("bin").join(bin))
            .with_context(|| format!("cannot copy {}", from.display()))?;
        output(
            Command::new(&from)
                .arg("manpage")
                .arg("--out")
                .arg(stage.join("man/man1")),
        )?;
        for (shell, file) in [
            ("bash", format!("bash/{bin}")),
            ("zsh", format!("zsh/_{bin}")),
            ("fish", format!("fish/{bin}.fish")),
        ] {
            let script = output(Command::new(&from).args(["completions", shell]))?;
            std::fs::write(stage.join("completions").join(file), script)?;
        }
    }
    for doc in DOCS {
        std::fs::copy(root.join(doc), stage.join("doc").join(doc))?;
    }
    copy_tree(&root.join("deploy"), &stage.join("deploy"))?;

    // Checksums of every file inside, then the archive and its own checksum.
    let mut files = Vec::new();
    list(&stage, &mut files)?;
    files.sort();
    let relative: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(&stage).unwrap_or(f).display().to_string())
        .collect();
    let sums = output(
        Command::new("sha256sum")
            .current_dir(&stage)
            .args(&relative),
    )?;
    std::fs::write(stage.join("SHA256SUMS"), sums)?;
    let archive = dist.join(format!("{name}.tar.gz"));
    super::step(
        "tar",
        Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .arg("-C")
            .arg(&dist)
            .arg(&name),
    )?;
    let sum = output(
        Command::new("sha256sum")
            .current_dir(&dist)
            .arg(format!("{name}.tar.gz")),
    )?;
    std::fs::write(dist.join(format!("{name}.tar.gz.sha256")), sum)?;
    eprintln!(
        "xtask: {} ({} files, checksums in SHA256SUMS inside and {name}.tar.gz.sha256 beside it)",
        archive.display(),
        files.len() + 1
    );
    Ok(archive)
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn list(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            list(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let target = to.join(path.file_name().unwrap_or_default());
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            std::fs::copy(&path, &target)?;
        }
    }
    Ok(())
}
