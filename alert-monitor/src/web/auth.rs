//! Who may use the dashboard: the users file (names, roles, argon2 password hashes), the
//! sessions of those logged in (random tokens in a cookie, each with its own CSRF token),
//! and the cookie texts. No IO beyond reading the users file at start.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use serde::Deserialize;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees every page.
    Viewer,
    /// Also releases seats and drains or undrains replicas.
    Admin,
}

impl Role {
    pub fn token(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// One account of the users file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    role: Role,
    /// A PHC string (`$argon2id$v=19$...`), as `lmbus-monitor hash-password` prints.
    password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<UserEntry>,
}

/// The accounts, by name. Their hashes are checked when the file is read, so a bad line
/// stops the dashboard at start rather than refusing a login later.
#[derive(Clone, Default)]
pub struct Users {
    by_name: BTreeMap<String, (Role, String)>,
    /// A hash no password matches, checked for unknown names so that a login takes as long
    /// whether the name exists or not.
    decoy: String,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hashes stay out of logs.
        f.debug_struct("Users")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Users {
    /// Reads a users file: `[[user]]` tables with `name`, `role` (viewer or admin) and
    /// `password` (an argon2 PHC hash).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the users file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("users file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: UsersFile = toml::from_str(text)?;
        let mut by_name = BTreeMap::new();
        for entry in file.user {
            anyhow::ensure!(
                !entry.name.is_empty() && entry.name.len() <= 64,
                "a user name must have 1 to 64 characters"
            );
            PasswordHash::new(&entry.password).map_err(|e| {
                anyhow::anyhow!(
                    "user {}: the password is not an argon2 hash ({e}): make one with `lmbus-monitor hash-password`",
                    entry.name
                )
            })?;
            anyhow::ensure!(
                by_name
                    .insert(entry.name.clone(), (entry.role, entry.password))
                    .is_none(),
                "user {} is listed twice",
                entry.name
            );
        }
        anyhow::ensure!(!by_name.is_empty(), "no [[user]] in it");
        let decoy = hash_password(&random_token())?;
        Ok(Self { by_name, decoy })
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The user's role if `password` is theirs. Slow on purpose (argon2): call it off the
    /// async threads.
    pub fn check(&self, name: &str, password: &str) -> Option<Role> {
        let (role, hash) = match self.by_name.get(name) {
            Some((role, hash)) => (Some(*role), hash.as_str()),
            None => (None, self.decoy.as_str()),
        };
        let parsed = PasswordHash::new(hash).ok()?;
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .ok()
            .and(role)
    }
}

/// An argon2id PHC hash of `password` with a random salt, for the users file.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| anyhow::anyhow!("no random salt: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))
}

/// A random token, hex: session ids and CSRF tokens.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // The OS's generator does not fail on Linux once booted; a zero token would only be
    // refused below (`Sessions::get` never matches an empty or all-zero id).
    let _ = getrandom::getrandom(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: String,
    pub role: Role,
    /// Every form of this session carries it; a POST without it is refused.
    pub csrf: String,
    last_used: Instant,
}

/// The sessions, bounded: at most [`MAX_SESSIONS`], the least recently used dropped first;
/// each expires after `idle` without a request.
#[derive(Debug)]
pub struct Sessions {
    by_id: BTreeMap<String, Session>,
    idle: Duration,
}

/// Most sessions kept at once (a login beyond it logs out the least recently used).
pub const MAX_SESSIONS: usize = 256;

impl Sessions {
    pub fn new(idle: Duration) -> Self {
        Self {
            by_id: BTreeMap::new(),
            idle,
        }
    }

    /// A new session for `user`; returns its id (the cookie's value).
    pub fn create(&mut self, user: &str, role: Role, now: Instant) -> String {
        self.by_id
            .retain(|_, s| now.saturating_duration_since(s.last_used) < self.idle);
        while self.by_id.len() >= MAX_SESSIONS {
            let oldest = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => self.by_id.remove(&id),
                None => break,
            };
        }
        let id = random_token();
        self.by_id.insert(
            id.clone(),
            Session {
                user: user.to_owned(),
                role,
                csrf: random_token(),
                last_used: now,
            },
        );
        id
    }

    /// The live session with this id, marked used now.
    pub fn get(&mut self, id: &str, now: Instant) -> Option<Session> {
        let idle = self.idle;
        let session = self.by_id.get_mut(id)?;
        if now.saturating_duration_since(session.last_used) >= idle {
            self.by_id.remove(id);
            return None;
        }
        session.last_used = now;
        Some(session.clone())
    }

    pub fn remove(&mut self, id: &str) {
        self.by_id.remove(id);
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, Secure when the dashboard is reached
/// over TLS (its own, or a proxy's).
pub fn set_cookie(name: &str, value: &str, secure: bool, max_age: Option<u64>) -> String {
    let mut text = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if secure {
        text.push_str("; Secure");
    }
    if let Some(age) = max_age {
        text.push_str(&format!("; Max-Age={age}"));
    }
    text
}

/// Compares two tokens in constant time.
pub fn same_token(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    !a.is_empty() && a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_file_checks_passwords_and_refuses_bad_entries() {
        let hash = hash_password("s3cret").unwrap();
        let users = Users::parse(&format!(
            "[[user]]\nname = \"ann\"\nrole = \"admin\"\npassword = \"{hash}\"\n\n[[user]]\nname = \"vic\"\nrole = \"viewer\"\npassword = \"{hash}\"\n"
        ))
        .unwrap();
        assert_eq!(users.check("ann", "s3cret"), Some(Role::Admin));
        assert_eq!(users.check("vic", "s3cret"), Some(Role::Viewer));
        assert_eq!(users.check("ann", "wrong"), None);
        assert_eq!(users.check("nobody", "s3cret"), None);
        assert!(!format!("{users:?}").contains("argon2"));
        let plain = Users::parse("[[user]]\nname = \"a\"\nrole = \"admin\"\npassword = \"pw\"\n")
            .unwrap_err();
        assert!(format!("{plain:#}").contains("hash-password"), "{plain:#}");
        let role = Users::parse(&format!(
            "[[user]]\nname = \"a\"\nrole = \"root\"\npassword = \"{hash}\"\n"
        ))
        .unwrap_err();
        assert!(format!("{role:#}").contains("root"), "{role:#}");
        assert!(Users::parse("").is_err());
    }

    #[test]
    fn sessions_expire_when_idle_and_are_bounded() {
        let start = Instant::now();
        let mut sessions = Sessions::new(Duration::from_secs(60));
        let id = sessions.create("ann", Role::Admin, start);
        let s = sessions.get(&id, start + Duration::from_secs(30)).unwrap();
        assert_eq!((s.user.as_str(), s.role), ("ann", Role::Admin));
        assert_eq!(s.csrf.len(), 64);
        assert!(sessions.get(&id, start + Duration::from_secs(91)).is_none());
        assert!(sessions.get("", start).is_none());
        for i in 0..MAX_SESSIONS + 5 {
            sessions.create(&format!("u{i}"), Role::Viewer, start);
        }
        assert_eq!(sessions.by_id.len(), MAX_SESSIONS);
    }

    #[test]
    fn cookies_are_read_and_written() {
        assert_eq!(
            cookie("a=1; lmbus_session=xyz; b=2", "lmbus_session"),
            Some("xyz")
        );
        assert_eq!(cookie("a=1", "lmbus_session"), None);
        let text = set_cookie("lmbus_session", "v", true, None);
        assert!(
            text.contains("HttpOnly")
                && text.contains("SameSite=Strict")
                && text.contains("Secure")
        );
        assert!(!set_cookie("x", "v", false, Some(0)).contains("Secure"));
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd") && !same_token("", ""));
    }
}
