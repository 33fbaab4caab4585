//! NATS decentralized auth (operator mode) for tests, without `nsc`: an operator, accounts
//! and users as signed JWTs (the nats-io/jwt v2 claim format, Ed25519 nkey signatures) and
//! `.creds` files. Only what a test needs: no signing keys, no imports or exports, no
//! revocations.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use nkeys::KeyPair;
use serde_json::{Value, json};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Signs `claims` (issuer `iss`, subject `sub`, `nats` section) as a JWT with `issuer`'s key.
fn sign(issuer: &KeyPair, name: &str, sub: &str, nats: Value) -> anyhow::Result<String> {
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": sub,
        "nats": nats,
    });
    let signing_input = format!(
        "{}.{}",
        B64.encode(serde_json::to_vec(&header)?),
        B64.encode(serde_json::to_vec(&claims)?)
    );
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing a JWT: {e}"))?;
    Ok(format!("{signing_input}.{}", B64.encode(signature)))
}

/// A subject permission list as the user JWT carries it.
#[derive(Debug, Clone, Default)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// An operator with a system account and one application account (JetStream enabled), all
/// signed, ready to preload into a nats-server with `resolver: MEMORY`.
pub struct Operator {
    key: KeyPair,
    pub jwt: String,
    system: KeyPair,
    pub system_jwt: String,
    account: KeyPair,
    pub account_jwt: String,
}

impl std::fmt::Debug for Operator {
    /// Public keys only: the seeds are secrets even in a test.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator")
            .field("operator", &self.key.public_key())
            .field("system_account", &self.system.public_key())
            .field("account", &self.account.public_key())
            .finish()
    }
}

impl Operator {
    pub fn new(account_name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::new_operator();
        let jwt = sign(
            &key,
            "lmbus-test-operator",
            &key.public_key(),
            json!({"type": "operator", "version": 2}),
        )?;
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        let system = KeyPair::new_account();
        let system_jwt = sign(
            &key,
            "SYS",
            &system.public_key(),
            json!({"limits": unlimited, "type": "account", "version": 2}),
        )?;
        let mut limits = unlimited;
        // JetStream is enabled for an account by giving it storage limits (-1: unlimited).
        for field in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[field] = json!(-1);
        }
        let account = KeyPair::new_account();
        let account_jwt = sign(
            &key,
            account_name,
            &account.public_key(),
            json!({"limits": limits, "type": "account", "version": 2}),
        )?;
        Ok(Self {
            key,
            jwt,
            system,
            system_jwt,
            account,
            account_jwt,
        })
    }

    pub fn public_key(&self) -> String {
        self.key.public_key()
    }

    pub fn system_account(&self) -> String {
        self.system.public_key()
    }

    pub fn account(&self) -> String {
        self.account.public_key()
    }

    /// A user of the application account with `permissions`, written as `<dir>/<name>.creds`.
    pub fn user_creds(
        &self,
        dir: &Path,
        name: &str,
        permissions: &Permissions,
    ) -> anyhow::Result<PathBuf> {
        write_creds(&self.account, dir, name, permissions)
    }
}

/// A user JWT issued by `account` (any account key, known to the server or not) and its
/// seed, as a `.creds` file in `dir`.
pub fn write_creds(
    account: &KeyPair,
    dir: &Path,
    name: &str,
    permissions: &Permissions,
) -> anyhow::Result<PathBuf> {
    let user = KeyPair::new_user();
    let jwt = sign(
        account,
        name,
        &user.public_key(),
        json!({
            "pub": {"allow": permissions.publish},
            "sub": {"allow": permissions.subscribe},
            "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    )?;
    let seed = user.seed().map_err(|e| anyhow::anyhow!("user seed: {e}"))?;
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    );
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The `NAME = { publish = [...] subscribe = [...] }` permission blocks of a nats-server
/// authorization configuration (the reference `deploy/nats-server.conf`), by block name.
/// Enough of the config syntax for that file: quoted subjects, one list per key.
pub fn permission_blocks(config: &str) -> anyhow::Result<Vec<(String, Permissions)>> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, Permissions)> = None;
    let mut list: Option<&'static str> = None;
    for line in config.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_suffix("= {") {
            current = Some((name.trim().to_string(), Permissions::default()));
            continue;
        }
        let Some((_, perms)) = current.as_mut() else {
            continue;
        };
        for key in ["publish", "subscribe"] {
            if let Some(rest) = line.strip_prefix(key) {
                let rest = rest.trim_start().trim_start_matches('=').trim();
                list = Some(key);
                quoted(rest, perms, key);
                if rest.contains(']') {
                    list = None;
                }
            }
        }
        if line.starts_with("publish") || line.starts_with("subscribe") {
            continue;
        }
        if let Some(key) = list {
            quoted(line, perms, key);
            if line.contains(']') {
                list = None;
            }
        } else if line == "}" {
            if let Some(done) = current.take() {
                blocks.push(done);
            }
        }
    }
    anyhow::ensure!(!blocks.is_empty(), "no permission blocks found");
    Ok(blocks)
}

fn quoted(text: &str, perms: &mut Permissions, key: &str) {
    let target = if key == "publish" {
        &mut perms.publish
    } else {
        &mut perms.subscribe
    };
    target.extend(text.split('"').skip(1).step_by(2).map(str::to_string));
}
