//! The config file every lmbus binary reads with `--config` (`LMBUS_CONFIG`): TOML whose
//! keys are the long flag names with `_` for `-`, durations written like the flags
//! (`"500ms"`, `"2s"`), and paths relative to the file's own folder. Flags and environment
//! variables come first; the file fills in what they leave unset.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::NatsAuthArgs;

/// The flags every lmbus daemon takes first, the same in each: its config file and how it
/// reaches NATS. Each daemon flattens it into its `run` flags.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// TOML config file; its keys are the long flag names with `_` for `-`.
    #[arg(long, env = "LMBUS_CONFIG")]
    pub config: Option<PathBuf>,
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
    #[error("config file {path} is not valid: {detail}")]
    Invalid { path: String, detail: String },
}

/// Reads config file `path` into `T`; returns it with the folder its relative paths are
/// relative to.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<(T, PathBuf), ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError::Read {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let file = toml::from_str(&text).map_err(|e| ConfigFileError::Invalid {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok((file, base))
}

/// `#[serde(default, with = "lmbus_nats::config_file::duration")]`: an optional duration
/// written like the flags (`"500ms"`, `"2s"`, `"1m"`).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct File {
        cluster: Option<String>,
        #[serde(default, with = "duration")]
        grace_period: Option<Duration>,
    }

    #[test]
    fn reads_keys_durations_and_the_base_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lmbus.toml");
        std::fs::write(&path, "cluster = \"acme\"\ngrace_period = \"90s\"\n").unwrap();
        let (file, base) = load::<File>(&path).unwrap();
        assert_eq!(file.cluster.as_deref(), Some("acme"));
        assert_eq!(file.grace_period, Some(Duration::from_secs(90)));
        assert_eq!(base, dir.path());
    }

    #[test]
    fn a_bad_file_or_duration_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "grace_period = \"soon\"\n").unwrap();
        let e = load::<File>(&path).unwrap_err().to_string();
        assert!(
            e.contains("bad.toml is not valid") && e.contains("\"soon\""),
            "{e}"
        );
        let e = load::<File>(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read config file"), "{e}");
    }
}
