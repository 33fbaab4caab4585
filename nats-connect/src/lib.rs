//! How every lmbus process connects to NATS: the server URLs and how it proves who it is.
//!
//! One [`NatsAuth`] per connection: at most one of user and password, token, nkey seed
//! file or credentials (JWT) file, plus optional TLS (a CA to trust, a client certificate
//! and key, or just "require TLS"; a `tls://` URL requires it too). Binaries take it from
//! `--nats-*` flags ([`NatsAuthArgs`]), `LMBUS_NATS_*` variables and the same keys in their
//! config file (`nats_user`, …), flags first. The credential flags conflict with each
//! other, so a credential given as a flag replaces the file's as a whole. Secrets never appear in `Debug` output, logs or
//! `--help`.
//!
//! [`config_file`] reads the `--config` file every binary takes.

pub mod cli_help;
pub mod config_file;
pub mod release;

pub use config_file::DaemonArgs;

use std::fmt;
use std::path::PathBuf;

use async_nats::{ConnectErrorKind, ConnectOptions};

/// Why a [`NatsAuth`] cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "more than one NATS credential given ({0}): pass only one of user/password, token, nkey seed file or credentials file"
    )]
    Conflicting(String),
    #[error("a NATS password was given without a user: pass --nats-user too")]
    PasswordWithoutUser,
    #[error("a NATS user was given without a password: pass --nats-password too")]
    UserWithoutPassword,
    #[error(
        "a TLS client certificate needs its key and the key its certificate: pass both --nats-tls-cert and --nats-tls-key"
    )]
    HalfClientCertificate,
    #[error("cannot read the {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the nkey seed file {0} holds no seed (a line starting with S)")]
    NoSeed(PathBuf),
}

/// How one process authenticates to one NATS deployment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A file holding an nkey seed (`SU…`); the public key is derived from it.
    pub nkey_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and nkey seed), for accounts in operator mode.
    pub creds_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for the server's certificate.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Require TLS even with a `nats://` URL.
    pub tls_required: Option<bool>,
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("nkey_file", &self.nkey_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

impl NatsAuth {
    /// The settings make sense together (files are read by [`Self::apply`]).
    pub fn check(&self) -> Result<(), AuthError> {
        let given: Vec<&str> = [
            (
                self.user.is_some() || self.password.is_some(),
                "user/password",
            ),
            (self.token.is_some(), "token"),
            (self.nkey_file.is_some(), "nkey seed file"),
            (self.creds_file.is_some(), "credentials file"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        if given.len() > 1 {
            return Err(AuthError::Conflicting(given.join(", ")));
        }
        match (&self.user, &self.password) {
            (None, Some(_)) => return Err(AuthError::PasswordWithoutUser),
            (Some(_), None) => return Err(AuthError::UserWithoutPassword),
            _ => {}
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(AuthError::HalfClientCertificate);
        }
        Ok(())
    }

    /// A short description for logs, without any secret: "user broker, TLS".
    pub fn describe(&self) -> String {
        let method = if let Some(user) = &self.user {
            format!("user {user}")
        } else if self.token.is_some() {
            "token".to_owned()
        } else if let Some(path) = &self.nkey_file {
            format!("nkey from {}", path.display())
        } else if let Some(path) = &self.creds_file {
            format!("credentials from {}", path.display())
        } else {
            "no credentials".to_owned()
        };
        let tls =
            self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_required == Some(true);
        if tls {
            format!("{method}, TLS")
        } else {
            method
        }
    }

    /// Adds these credentials and TLS settings to `options`, reading the files they name.
    pub async fn apply(&self, options: ConnectOptions) -> Result<ConnectOptions, AuthError> {
        self.check()?;
        let mut options = options;
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &self.nkey_file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthError::File {
                what: "nkey seed file",
                path: path.clone(),
                source,
            })?;
            let seed = text
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with('S'))
                .ok_or_else(|| AuthError::NoSeed(path.clone()))?;
            options = options.nkey(seed.to_owned());
        }
        if let Some(path) = &self.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|source| AuthError::File {
                    what: "NATS credentials file",
                    path: path.clone(),
                    source,
                })?;
        }
        for (what, path) in [
            ("TLS CA file", &self.tls_ca),
            ("TLS client certificate", &self.tls_cert),
            ("TLS client key", &self.tls_key),
        ] {
            if let Some(path) = path {
                std::fs::metadata(path).map_err(|source| AuthError::File {
                    what,
                    path: path.clone(),
                    source,
                })?;
            }
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        if self.tls_required == Some(true) {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// Splits a `--nats` value, one or more server URLs separated by commas, into the list the
/// NATS client takes (it tries them in turn and reconnects to any of them).
pub fn nats_urls(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot connect to NATS at {url}: {detail}")]
    Connect { url: String, detail: String },
}

/// Connects to the comma-separated `urls` with `options` plus `auth`; a refused
/// credential or a TLS failure says which settings to check. Errors the server reports
/// later (a permissions violation: this user may not publish or subscribe there) and
/// connection changes are logged.
pub async fn connect(
    urls: &str,
    options: ConnectOptions,
    auth: &NatsAuth,
) -> Result<async_nats::Client, ConnectFailure> {
    connect_with(urls, options, auth, |_| {}).await
}

/// [`connect`], also calling `on_event` for every connection event (a command-line tool
/// telling its user that it lost and regained the connection, say).
pub async fn connect_with(
    urls: &str,
    options: ConnectOptions,
    auth: &NatsAuth,
    on_event: impl Fn(&async_nats::Event) + Send + Sync + 'static,
) -> Result<async_nats::Client, ConnectFailure> {
    let on_event = std::sync::Arc::new(on_event);
    let slow = std::sync::Arc::new(SlowConsumerLog::default());
    let options = auth.apply(options).await?.event_callback(move |event| {
        on_event(&event);
        let slow = slow.clone();
        async move {
            match event {
                async_nats::Event::ServerError(e) => {
                    tracing::warn!(error = %e, "the NATS server reported an error")
                }
                async_nats::Event::ClientError(e) => {
                    tracing::info!(error = %e, "NATS client error")
                }
                async_nats::Event::SlowConsumer(sid) => {
                    // One event per dropped message: a flood of them must not become a
                    // flood of log lines that slows the process further.
                    if let Some(dropped) = slow.record() {
                        tracing::warn!(
                            sid,
                            dropped,
                            "NATS slow consumer: this process did not keep up and the client dropped messages (counted since the last such warning; at most one warning every 10 s)"
                        )
                    }
                }
                other => tracing::info!(event = %other, "NATS connection"),
            }
        }
    });
    options
        .connect(nats_urls(urls))
        .await
        .map_err(|e| ConnectFailure::Connect {
            url: urls.to_owned(),
            detail: explain_connect_error(&e, auth),
        })
}

/// Counts slow-consumer events and lets one warning through every 10 s with the count.
#[derive(Debug, Default)]
struct SlowConsumerLog {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl SlowConsumerLog {
    /// `Some(events since the last warning)` when a warning is due.
    fn record(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, count) = &mut *state;
        *count += 1;
        let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10));
        if due {
            *last = Some(std::time::Instant::now());
            Some(std::mem::take(count))
        } else {
            None
        }
    }
}

const TLS_HINT: &str =
    "check --nats-tls-ca and, if the server verifies clients, --nats-tls-cert/--nats-tls-key";

/// What to tell the user about a failed connect: the cause, and for refused credentials
/// which settings to check.
pub fn explain_connect_error(error: &async_nats::ConnectError, auth: &NatsAuth) -> String {
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation => format!(
            "the NATS server refused the credentials ({}): check --nats-user/--nats-password, --nats-token, --nats-nkey or --nats-creds",
            auth.describe()
        ),
        ConnectErrorKind::Tls => format!("TLS failed ({error}): {TLS_HINT}"),
        // A server that refuses the client's certificate (or its absence) ends the TLS
        // handshake with an alert, which the client sees as an IO error.
        ConnectErrorKind::Io
            if {
                let text = error.to_string().to_lowercase();
                text.contains("certificate") || text.contains("alert") || text.contains("tls")
            } =>
        {
            format!("TLS failed ({error}): {TLS_HINT}")
        }
        _ => error.to_string(),
    }
}

/// The `--nats-*` flags (and `LMBUS_NATS_*` variables) of a binary that has one NATS
/// connection; flatten into its clap arguments.
#[derive(Clone, Default, clap::Args)]
#[command(next_help_heading = "NATS")]
pub struct NatsAuthArgs {
    /// NATS user name (with --nats-password).
    #[arg(global = true, long = "nats-user", conflicts_with_all = ["nats_token", "nats_nkey", "nats_creds"], env = "LMBUS_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password; prefer the environment variable, which `ps` does not show.
    #[arg(
        global = true,
        long = "nats-password", conflicts_with_all = ["nats_token", "nats_nkey", "nats_creds"],
        env = "LMBUS_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,
    /// NATS authentication token.
    #[arg(
        global = true,
        long = "nats-token", conflicts_with_all = ["nats_user", "nats_password", "nats_nkey", "nats_creds"],
        env = "LMBUS_NATS_TOKEN",
        hide_env_values = true
    )]
    pub nats_token: Option<String>,
    /// File holding an nkey seed (SU...).
    #[arg(
        global = true,
        long = "nats-nkey", conflicts_with_all = ["nats_user", "nats_password", "nats_token", "nats_creds"],
        env = "LMBUS_NATS_NKEY",
        value_name = "FILE"
    )]
    pub nats_nkey: Option<PathBuf>,
    /// NATS credentials file (.creds: user JWT and seed), for operator mode.
    #[arg(
        global = true,
        long = "nats-creds", conflicts_with_all = ["nats_user", "nats_password", "nats_token", "nats_nkey"],
        env = "LMBUS_NATS_CREDS",
        value_name = "FILE"
    )]
    pub nats_creds: Option<PathBuf>,
    /// PEM CA certificate to trust for the server's TLS certificate.
    #[arg(
        global = true,
        long = "nats-tls-ca",
        env = "LMBUS_NATS_TLS_CA",
        value_name = "FILE"
    )]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with --nats-tls-key).
    #[arg(
        global = true,
        long = "nats-tls-cert",
        env = "LMBUS_NATS_TLS_CERT",
        value_name = "FILE"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(
        global = true,
        long = "nats-tls-key",
        env = "LMBUS_NATS_TLS_KEY",
        value_name = "FILE"
    )]
    pub nats_tls_key: Option<PathBuf>,
    /// Require TLS even with nats:// URLs (tls:// URLs always require it).
    #[arg(global = true, long = "nats-tls", env = "LMBUS_NATS_TLS", num_args = 0..=1, default_missing_value = "true")]
    pub nats_tls: Option<bool>,
}

impl fmt::Debug for NatsAuthArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&NatsAuth::from(self.clone()), f)
    }
}

impl From<NatsAuthArgs> for NatsAuth {
    fn from(a: NatsAuthArgs) -> Self {
        NatsAuth {
            user: a.nats_user,
            password: a.nats_password,
            token: a.nats_token,
            nkey_file: a.nats_nkey,
            creds_file: a.nats_creds,
            tls_ca: a.nats_tls_ca,
            tls_cert: a.nats_tls_cert,
            tls_key: a.nats_tls_key,
            tls_required: a.nats_tls,
        }
    }
}

/// The same flags for another master of a slave, with a prefix (`--secondary-nats-*`,
/// `LMBUS_SECONDARY_NATS_*`): each such master usually is another site with its own
/// credentials.
macro_rules! peer_auth_args {
    ($(#[$doc:meta])* $name:ident, $flag:literal, $env:literal, $heading:literal, $who:literal) => {
        $(#[$doc])*
        #[derive(Clone, Default, clap::Args)]
        #[command(next_help_heading = $heading)]
        pub struct $name {
            #[arg(
                id = concat!($flag, "_nats_user"),
                long = concat!($flag, "-nats-user"),
                env = concat!("LMBUS_", $env, "_NATS_USER"),
                help = concat!("NATS user name at the ", $who, "."),
            )]
            pub user: Option<String>,
            #[arg(
                id = concat!($flag, "_nats_password"),
                long = concat!($flag, "-nats-password"),
                env = concat!("LMBUS_", $env, "_NATS_PASSWORD"),
                help = concat!("NATS password at the ", $who, "."),
                hide_env_values = true,
            )]
            pub password: Option<String>,
            #[arg(
                id = concat!($flag, "_nats_token"),
                long = concat!($flag, "-nats-token"),
                env = concat!("LMBUS_", $env, "_NATS_TOKEN"),
                help = concat!("NATS token at the ", $who, "."),
                hide_env_values = true,
            )]
            pub token: Option<String>,
            #[arg(
                id = concat!($flag, "_nats_nkey"),
                long = concat!($flag, "-nats-nkey"),
                env = concat!("LMBUS_", $env, "_NATS_NKEY"),
                help = concat!("nkey seed file for the ", $who, "."),
                value_name = "FILE",
            )]
            pub nkey: Option<PathBuf>,
            #[arg(
                id = concat!($flag, "_nats_creds"),
                long = concat!($flag, "-nats-creds"),
                env = concat!("LMBUS_", $env, "_NATS_CREDS"),
                help = concat!("Credentials file for the ", $who, "."),
                value_name = "FILE",
            )]
            pub creds: Option<PathBuf>,
            #[arg(
                id = concat!($flag, "_nats_tls_ca"),
                long = concat!($flag, "-nats-tls-ca"),
                env = concat!("LMBUS_", $env, "_NATS_TLS_CA"),
                help = concat!("CA certificate for the ", $who, "'s TLS."),
                value_name = "FILE",
            )]
            pub tls_ca: Option<PathBuf>,
            #[arg(
                id = concat!($flag, "_nats_tls_cert"),
                long = concat!($flag, "-nats-tls-cert"),
                env = concat!("LMBUS_", $env, "_NATS_TLS_CERT"),
                help = concat!("Client certificate for the ", $who, "."),
                value_name = "FILE",
            )]
            pub tls_cert: Option<PathBuf>,
            #[arg(
                id = concat!($flag, "_nats_tls_key"),
                long = concat!($flag, "-nats-tls-key"),
                env = concat!("LMBUS_", $env, "_NATS_TLS_KEY"),
                help = concat!("Client key for the ", $who, "."),
                value_name = "FILE",
            )]
            pub tls_key: Option<PathBuf>,
            #[arg(
                id = concat!($flag, "_nats_tls"),
                long = concat!($flag, "-nats-tls"),
                env = concat!("LMBUS_", $env, "_NATS_TLS"),
                help = concat!("Require TLS with the ", $who, "."),
                num_args = 0..=1,
                default_missing_value = "true",
            )]
            pub tls: Option<bool>,
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&NatsAuth::from(self.clone()), f)
            }
        }

        impl From<$name> for NatsAuth {
            fn from(a: $name) -> Self {
                NatsAuth {
                    user: a.user,
                    password: a.password,
                    token: a.token,
                    nkey_file: a.nkey,
                    creds_file: a.creds,
                    tls_ca: a.tls_ca,
                    tls_cert: a.tls_cert,
                    tls_key: a.tls_key,
                    tls_required: a.tls,
                }
            }
        }
    };
}

peer_auth_args!(
    /// The NATS flags for a slave's secondary master (`--secondary-nats-*`,
    /// `LMBUS_SECONDARY_NATS_*`).
    SecondaryNatsAuthArgs,
    "secondary",
    "SECONDARY",
    "Secondary master",
    "secondary master"
);

peer_auth_args!(
    /// The NATS flags for a slave's backup master (`--backup-nats-*`,
    /// `LMBUS_BACKUP_NATS_*`).
    BackupNatsAuthArgs,
    "backup",
    "BACKUP",
    "Backup master",
    "backup master"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_consumer_warnings_are_rate_limited_and_counted() {
        let log = SlowConsumerLog::default();
        assert_eq!(log.record(), Some(1));
        for _ in 0..1000 {
            assert_eq!(log.record(), None);
        }
        // Ten seconds later the next warning carries every event since the last one.
        log.state.lock().unwrap().0 =
            Some(std::time::Instant::now() - std::time::Duration::from_secs(11));
        assert_eq!(log.record(), Some(1001));
    }

    fn user(u: &str, p: &str) -> NatsAuth {
        NatsAuth {
            user: Some(u.into()),
            password: Some(p.into()),
            ..NatsAuth::default()
        }
    }

    #[test]
    fn comma_separated_urls() {
        assert_eq!(
            nats_urls("nats://a:1, nats://b:2,,nats://c:3"),
            ["nats://a:1", "nats://b:2", "nats://c:3"]
        );
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let auth = NatsAuth {
            token: None,
            ..user("broker", "hunter2")
        };
        let text = format!("{auth:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("broker"));
        let args = NatsAuthArgs {
            nats_token: Some("s3cret".into()),
            ..NatsAuthArgs::default()
        };
        assert!(!format!("{args:?}").contains("s3cret"));
        assert_eq!(user("broker", "hunter2").describe(), "user broker");
    }

    #[test]
    fn conflicting_or_half_settings_are_refused() {
        let both = NatsAuth {
            token: Some("t".into()),
            ..user("u", "p")
        };
        assert!(matches!(both.check(), Err(AuthError::Conflicting(_))));
        let no_password = NatsAuth {
            user: Some("u".into()),
            ..NatsAuth::default()
        };
        assert!(matches!(
            no_password.check(),
            Err(AuthError::UserWithoutPassword)
        ));
        let half_cert = NatsAuth {
            tls_cert: Some("c.pem".into()),
            ..NatsAuth::default()
        };
        assert!(matches!(
            half_cert.check(),
            Err(AuthError::HalfClientCertificate)
        ));
        assert!(NatsAuth::default().check().is_ok());
    }

    #[tokio::test]
    async fn missing_files_are_named() {
        let auth = NatsAuth {
            nkey_file: Some("/nonexistent/seed.nk".into()),
            ..NatsAuth::default()
        };
        let e = auth.apply(ConnectOptions::new()).await.unwrap_err();
        assert!(e.to_string().contains("/nonexistent/seed.nk"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.nk");
        std::fs::write(&empty, "not a seed\n").unwrap();
        let auth = NatsAuth {
            nkey_file: Some(empty.clone()),
            ..NatsAuth::default()
        };
        assert!(matches!(
            auth.apply(ConnectOptions::new()).await,
            Err(AuthError::NoSeed(p)) if p == empty
        ));
    }
}
