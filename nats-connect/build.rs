//! Stamps the build: the git commit (`LMBUS_GIT_COMMIT`, "unknown" outside a git checkout)
//! and the build date (`LMBUS_BUILD_DATE`, UTC; `SOURCE_DATE_EPOCH` wins, for reproducible
//! builds), which `release.rs` puts in every binary's `--version` and `lmbus_build_info`.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let seconds = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    let date = time::OffsetDateTime::from_unix_timestamp(seconds)
        .map(|t| t.date().to_string())
        .unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=LMBUS_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=LMBUS_BUILD_DATE={date}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // Stamp again when HEAD moves (a commit, a checkout). Only paths that exist: cargo takes
    // a missing one as always changed and would rerun this (and rebuild every crate that
    // uses this one) on every build.
    let watch = |path: std::path::PathBuf| {
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = std::path::PathBuf::from(dir);
        watch(dir.join("HEAD"));
        // Branch refs live in the common dir (the same, except in a worktree), loose or packed.
        // Printed relative to the working directory unless absolute.
        let common = git(&["rev-parse", "--git-common-dir"])
            .and_then(|c| Some(std::env::current_dir().ok()?.join(c)))
            .unwrap_or_else(|| dir.clone());
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch(common.join(head));
        }
        watch(common.join("packed-refs"));
    }
}
