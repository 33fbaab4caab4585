//! Signed license files and vendor keys.
//!
//! A license is a TOML document a person can read, followed by one signature line:
//!
//! ```text
//! # lmbus license. Do not edit: changing any byte breaks the signature.
//! [license]
//! id = "5b0e…"
//! …
//! # lmbus-signature: ed25519 key=1f2e3d4c5b6a7988 sig=<base64>
//! ```
//!
//! The Ed25519 signature covers every byte before the signature line, comments and
//! whitespace included, so any edit breaks it. The verifying (public) key is configuration
//! of the broker and slave, never compiled in. Checking dates needs today's date, which the
//! caller passes in: this module reads no clock and no file.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use serde::{Deserialize, Serialize};
use time::Date;
use uuid::Uuid;

pub use ed25519_dalek::VerifyingKey;

/// The vendor's signing key. Keep it secret: whoever holds it can issue licenses.
pub type VendorKey = SigningKey;

const SIGNATURE_PREFIX: &str = "# lmbus-signature:";
const HEADER: &str = "# lmbus license. Do not edit: changing any byte breaks the signature.\n";
const SECRET_KEY_TAG: &str = "lmbus-vendor-secret-key ed25519";
const PUBLIC_KEY_TAG: &str = "lmbus-vendor-public-key ed25519";

time::serde::format_description!(iso_date, Date, "[year]-[month]-[day]");

/// Which side of master/slave licensing a license is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Holds the aggregate limit; only a broker runs with it.
    Master,
    /// A slave with its own (optional) local limit.
    Slave,
    /// Neither flag: a standalone installation. As a slave it can only run unlicensed.
    None,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Master => "master",
            Role::Slave => "slave",
            Role::None => "none",
        })
    }
}

/// Where a license may be used (as in LumenVox flexible licensing). A slave's context must
/// match its master's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Context {
    Production,
    Backup,
    Development,
}

impl Context {
    pub const ALL: [Context; 3] = [Context::Production, Context::Backup, Context::Development];

    pub fn token(self) -> &'static str {
        match self {
            Context::Production => "production",
            Context::Backup => "backup",
            Context::Development => "development",
        }
    }

    /// Whether what a master of this context serves may not be used in production: only a
    /// development license (granted not for resale or commercial use).
    pub fn not_for_production(self) -> bool {
        self == Context::Development
    }

    /// The context as every report, status and alert of a master shows it: the name, and
    /// for development [`NOT_FOR_PRODUCTION`].
    pub fn describe(self) -> String {
        if self.not_for_production() {
            NOT_FOR_PRODUCTION.to_owned()
        } else {
            self.token().to_owned()
        }
    }
}

/// How a development master marks what it reports.
pub const NOT_FOR_PRODUCTION: &str = "development: not for production use";

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.token())
    }
}

impl std::str::FromStr for Context {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.token().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown license context {s:?}: use production, backup or development")
            })
    }
}

/// Seat limits. Agent types are names chosen by the vendor when issuing the license.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The aggregate limit across all slaves (required on a master license).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u32>,
    /// The slave's own limit (optional on a slave license; none means only the master's
    /// limits apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<u32>,
    /// Per agent type limits. On a master license these are also the agent types it knows:
    /// a type not listed is refused, unless the table is empty (then any type is accepted
    /// and only `total` applies).
    #[serde(default)]
    pub agent_types: BTreeMap<String, u32>,
}

/// The content of a license file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct License {
    pub id: Uuid,
    pub customer: String,
    #[serde(with = "iso_date")]
    pub issued: Date,
    /// Last day the license is valid (inclusive).
    #[serde(with = "iso_date")]
    pub expires: Date,
    /// Last day of software maintenance (informational; shown in status and reports).
    #[serde(with = "iso_date")]
    pub maintenance_expires: Date,
    pub role: Role,
    pub context: Context,
    /// The offline limit (vendor sync): the master grants no new seat once this many days
    /// have passed since its last successful sync with the vendor, or, before any, since
    /// the day the license was issued. At least [`MIN_SYNC_WITHIN_DAYS`]. `None` (every
    /// license signed before vendor sync existed): no offline limit. Serialized only when
    /// set, before `limits` (TOML writes values before tables), so a license without it
    /// signs to the same bytes as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_within_days: Option<u32>,
    /// Orders licenses of the same id issued on the same day (a vendor's second issue that
    /// day carries a higher one); none counts as 0. Serialized only when set, like
    /// `sync_within_days`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    /// A backup master license: the id of the production license it backs (required on a
    /// backup master license, refused on any other). Serialized only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backs: Option<Uuid>,
    /// A backup master license may also name the production cluster it backs (the cluster
    /// name whose leader it listens to): then no `--production-cluster` flag can point it
    /// at another, silent cluster. Only with `backs`; serialized only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_cluster: Option<String>,
    #[serde(default)]
    pub limits: Limits,
}

/// The shortest offline limit a license may carry (LumenVox: about 60 days, never less).
pub const MIN_SYNC_WITHIN_DAYS: u32 = 60;

#[derive(Serialize, Deserialize)]
struct LicenseFile {
    license: License,
}

/// Why a license file cannot be used. Every message names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenseError {
    #[error(
        "license file {file} has no signature line ('{SIGNATURE_PREFIX} …'): sign it with `lmbus-license sign`"
    )]
    Unsigned { file: String },
    #[error("license file {file} has a malformed signature line: {detail}")]
    BadSignatureLine { file: String, detail: String },
    #[error(
        "license file {file} was modified after it was signed: its content no longer matches its signature; ask the vendor for a new file"
    )]
    Modified { file: String },
    #[error(
        "license file {file} was signed by another vendor key (key {signed_with}; this installation trusts key {trusted}), or its signature line was modified"
    )]
    WrongKey {
        file: String,
        signed_with: String,
        trusted: String,
    },
    #[error("license file {file} is signed but is not a valid license document: {detail}")]
    Parse { file: String, detail: String },
    #[error("license file {file} is invalid: {detail}")]
    Invalid { file: String, detail: String },
    #[error(
        "license {id} in {file} expired on {expires}: ask the vendor for a renewed license file and install it in its place (a broker takes it with `lmbus-broker admin reload-license`)"
    )]
    Expired {
        file: String,
        id: Uuid,
        expires: Date,
    },
    #[error(
        "license {id} in {file} is not valid before {issued}: check this machine's date, or keep using the current license until then"
    )]
    NotYetValid {
        file: String,
        id: Uuid,
        issued: Date,
    },
    #[error(
        "license file {file} is not UTF-8 text ({detail}): a license is the signed text file `lmbus-license sign` writes; copy it again without conversion, or ask the vendor for it"
    )]
    NotText { file: String, detail: String },
    #[error("license {id} in {file} has role '{found}', but this needs a '{needed}' license")]
    WrongRole {
        file: String,
        id: Uuid,
        found: Role,
        needed: Role,
    },
}

/// A license file's bytes as text: a license is UTF-8 (TOML), anything else is refused with
/// an error that names the file and says what to do.
pub fn license_text(bytes: Vec<u8>, file: &str) -> Result<String, LicenseError> {
    String::from_utf8(bytes).map_err(|e| LicenseError::NotText {
        file: file.to_owned(),
        detail: e.utf8_error().to_string(),
    })
}

/// A vendor key file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not an lmbus vendor {which} key: expected '{tag} <base64>' or the bare base64 key")]
    Format {
        which: &'static str,
        tag: &'static str,
    },
    #[error("vendor {which} key is not valid: {detail}")]
    Invalid { which: &'static str, detail: String },
}

/// A short, stable name for a public key: the first 8 bytes in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    key.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn secret_key_text(key: &VendorKey) -> String {
    format!("{SECRET_KEY_TAG} {}\n", B64.encode(key.to_bytes()))
}

pub fn public_key_text(key: &VerifyingKey) -> String {
    format!("{PUBLIC_KEY_TAG} {}\n", B64.encode(key.as_bytes()))
}

fn key_bytes(text: &str, tag: &'static str, which: &'static str) -> Result<[u8; 32], KeyError> {
    let text = text.trim();
    let encoded = text.strip_prefix(tag).unwrap_or(text).trim();
    let bytes = B64
        .decode(encoded)
        .map_err(|_| KeyError::Format { which, tag })?;
    bytes.try_into().map_err(|v: Vec<u8>| KeyError::Invalid {
        which,
        detail: format!("expected 32 bytes, found {}", v.len()),
    })
}

pub fn parse_secret_key(text: &str) -> Result<VendorKey, KeyError> {
    Ok(SigningKey::from_bytes(&key_bytes(
        text,
        SECRET_KEY_TAG,
        "secret",
    )?))
}

pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = key_bytes(text, PUBLIC_KEY_TAG, "public")?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::Invalid {
        which: "public",
        detail: e.to_string(),
    })
}

/// Writes `license` as a signed license file (errors call it "the license to sign"; see
/// [`sign_license_as`] to name the file it goes to).
pub fn sign_license(license: &License, key: &VendorKey) -> Result<String, LicenseError> {
    sign_license_as(license, key, "the license to sign")
}

/// Writes `license` as a signed license file; `file` (the file it will be written to)
/// names it in errors.
pub fn sign_license_as(
    license: &License,
    key: &VendorKey,
    file: &str,
) -> Result<String, LicenseError> {
    license.validate(file)?;
    let toml = toml::to_string(&LicenseFile {
        license: license.clone(),
    })
    .map_err(|e| LicenseError::Invalid {
        file: file.to_owned(),
        detail: e.to_string(),
    })?;
    let body = format!("{HEADER}{toml}");
    let signature = key.sign(body.as_bytes());
    Ok(format!(
        "{body}{SIGNATURE_PREFIX} ed25519 key={} sig={}\n",
        key_id(&key.verifying_key()),
        B64.encode(signature.to_bytes())
    ))
}

/// Checks the signature of a license file's text and parses it. `file` names the file in
/// errors. Dates and role are not checked here: see [`License::check_dates`] and
/// [`License::require_role`].
pub fn verify_license(text: &str, file: &str, key: &VerifyingKey) -> Result<License, LicenseError> {
    let err_file = || file.to_owned();
    let line_start = if text.starts_with(SIGNATURE_PREFIX) {
        0
    } else {
        text.rfind(&format!("\n{SIGNATURE_PREFIX}"))
            .map(|i| i + 1)
            .ok_or_else(|| LicenseError::Unsigned { file: err_file() })?
    };
    let (body, rest) = text.split_at(line_start);
    let (line, after) = rest.split_once('\n').unwrap_or((rest, ""));
    if !after.trim().is_empty() {
        return Err(LicenseError::Modified { file: err_file() });
    }
    let bad_line = |detail: &str| LicenseError::BadSignatureLine {
        file: err_file(),
        detail: detail.to_owned(),
    };
    let mut fields = line
        .strip_prefix(SIGNATURE_PREFIX)
        .unwrap_or_default()
        .split_whitespace();
    if fields.next() != Some("ed25519") {
        return Err(bad_line("expected algorithm 'ed25519'"));
    }
    let signed_with = fields
        .next()
        .and_then(|f| f.strip_prefix("key="))
        .ok_or_else(|| bad_line("expected 'key=<id>'"))?;
    let sig_b64 = fields
        .next()
        .and_then(|f| f.strip_prefix("sig="))
        .ok_or_else(|| bad_line("expected 'sig=<base64>'"))?;
    let sig_bytes: [u8; 64] = B64
        .decode(sig_b64)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad_line("the signature is not 64 bytes of base64"))?;
    let signature = Signature::from_bytes(&sig_bytes);
    let trusted = key_id(key);
    if key.verify(body.as_bytes(), &signature).is_err() {
        return Err(if signed_with == trusted {
            LicenseError::Modified { file: err_file() }
        } else {
            LicenseError::WrongKey {
                file: err_file(),
                signed_with: signed_with.to_owned(),
                trusted,
            }
        });
    }
    let parsed: LicenseFile = toml::from_str(body).map_err(|e| LicenseError::Parse {
        file: err_file(),
        detail: e.to_string(),
    })?;
    parsed.license.validate(file)?;
    Ok(parsed.license)
}

/// The license in `text` read without checking its signature: for tools that replay a
/// ledger whose writers verified it already (the audit). Never for admission decisions.
pub fn read_license_unverified(text: &str) -> Option<License> {
    let body = match text.rfind(&format!("\n{SIGNATURE_PREFIX}")) {
        Some(i) => &text[..i + 1],
        None => text,
    };
    toml::from_str::<LicenseFile>(body).ok().map(|f| f.license)
}

impl License {
    /// How issues of one license id are ordered: the issue day, then the revision.
    pub fn rank(&self) -> (Date, u32) {
        (self.issued, self.revision.unwrap_or(0))
    }

    /// The issue day (and revision, if any), as people read it.
    pub fn issue_text(&self) -> String {
        match self.revision {
            Some(r) => format!("issued {} revision {r}", self.issued),
            None => format!("issued {}", self.issued),
        }
    }

    /// Checks what the signature cannot: that the document makes sense.
    fn validate(&self, file: &str) -> Result<(), LicenseError> {
        let invalid = |detail: String| LicenseError::Invalid {
            file: file.to_owned(),
            detail,
        };
        if self.customer.trim().is_empty() {
            return Err(invalid("customer is empty".into()));
        }
        if self.expires < self.issued {
            return Err(invalid(format!(
                "expires ({}) is before issued ({})",
                self.expires, self.issued
            )));
        }
        if let Some(days) = self.sync_within_days
            && days < MIN_SYNC_WITHIN_DAYS
        {
            return Err(invalid(format!(
                "sync_within_days is {days}: the offline limit is at least {MIN_SYNC_WITHIN_DAYS} days"
            )));
        }
        match (self.role, self.context, self.backs) {
            (Role::Master, Context::Backup, None) => {
                return Err(invalid(
                    "a backup master license needs `backs`, the id of the production license it backs".into(),
                ));
            }
            (Role::Master, Context::Backup, Some(_)) | (_, _, None) => {}
            (_, _, Some(_)) => {
                return Err(invalid(
                    "`backs` is only for a backup master license (role master, context backup)"
                        .into(),
                ));
            }
        }
        if let Some(cluster) = &self.production_cluster {
            if self.backs.is_none() {
                return Err(invalid(
                    "`production_cluster` is only for a backup master license (with `backs`)"
                        .into(),
                ));
            }
            crate::Subjects::new(cluster).map_err(|e| {
                invalid(format!(
                    "production_cluster {:?} is not a cluster name: {e}",
                    crate::printable(cluster)
                ))
            })?;
        }
        if self.role == Role::Master && self.limits.total.is_none() {
            return Err(invalid("a master license needs limits.total".into()));
        }
        for name in self.limits.agent_types.keys() {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(invalid(format!(
                    "agent type {name:?} must be 1 to 64 characters from A-Z, a-z, 0-9, '-' and '_'"
                )));
            }
        }
        Ok(())
    }

    /// Refuses a license that has expired or is not valid yet on `today`.
    pub fn check_dates(&self, today: Date, file: &str) -> Result<(), LicenseError> {
        if today > self.expires {
            return Err(LicenseError::Expired {
                file: file.to_owned(),
                id: self.id,
                expires: self.expires,
            });
        }
        if today < self.issued {
            return Err(LicenseError::NotYetValid {
                file: file.to_owned(),
                id: self.id,
                issued: self.issued,
            });
        }
        Ok(())
    }

    /// The start of the day the license was issued (00:00 UTC), Unix milliseconds: where
    /// the offline limit counts from before any vendor sync.
    pub fn issued_unix_ms(&self) -> u64 {
        let seconds = self.issued.midnight().assume_utc().unix_timestamp();
        u64::try_from(seconds).unwrap_or(0).saturating_mul(1000)
    }

    /// Days from `today` to the last valid day (0 on the last day, negative once expired).
    pub fn days_left(&self, today: Date) -> i64 {
        (self.expires - today).whole_days()
    }

    pub fn require_role(&self, needed: Role, file: &str) -> Result<(), LicenseError> {
        if self.role == needed {
            Ok(())
        } else {
            Err(LicenseError::WrongRole {
                file: file.to_owned(),
                id: self.id,
                found: self.role,
                needed,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn contexts_parse_and_only_development_is_not_for_production() {
        for c in Context::ALL {
            assert_eq!(c.token().parse::<Context>(), Ok(c));
        }
        assert_eq!("Development".parse::<Context>(), Ok(Context::Development));
        let err = "staging".parse::<Context>().unwrap_err();
        assert!(err.contains("production, backup or development"), "{err}");
        assert_eq!(Context::Development.describe(), NOT_FOR_PRODUCTION);
        assert_eq!(Context::Backup.describe(), "backup");
        assert!(!Context::Production.not_for_production());
    }

    fn key(seed: u8) -> VendorKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn master() -> License {
        License {
            id: Uuid::new_v4(),
            customer: "Acme Contact Centres".into(),
            issued: date!(2026 - 01 - 01),
            expires: date!(2027 - 12 - 31),
            maintenance_expires: date!(2027 - 06 - 30),
            role: Role::Master,
            context: Context::Production,
            sync_within_days: None,
            revision: None,
            backs: None,
            production_cluster: None,
            limits: Limits {
                total: Some(500),
                local: None,
                agent_types: BTreeMap::from([("inbound".into(), 300), ("outbound".into(), 200)]),
            },
        }
    }

    /// `backs` is required on a backup master license, signs and verifies there (and is
    /// part of what is signed), and is refused on any other license.
    #[test]
    fn backs_is_only_and_always_on_a_backup_master_license() {
        let k = key(1);
        let mut backup = master();
        backup.context = Context::Backup;
        let err = sign_license(&backup, &k).unwrap_err().to_string();
        assert!(err.contains("needs `backs`"), "{err}");
        let production = Uuid::new_v4();
        backup.backs = Some(production);
        let text = sign_license(&backup, &k).unwrap();
        assert!(
            text.contains(&format!("backs = \"{production}\"")),
            "{text}"
        );
        let read = verify_license(&text, "backup.lic", &k.verifying_key()).unwrap();
        assert_eq!(read.backs, Some(production));
        let edited = text.replace(&production.to_string(), &Uuid::new_v4().to_string());
        assert!(verify_license(&edited, "backup.lic", &k.verifying_key()).is_err());
        let mut other = master();
        other.backs = Some(production);
        let err = sign_license(&other, &k).unwrap_err().to_string();
        assert!(err.contains("only for a backup master license"), "{err}");
        assert!(!sign_license(&master(), &k).unwrap().contains("backs"));
    }

    /// `production_cluster` binds a backup master license to the cluster it watches: signed
    /// (an edited name breaks the signature), only with `backs`, a valid cluster name.
    #[test]
    fn production_cluster_is_signed_and_only_on_a_backup_master_license() {
        let k = key(1);
        let mut backup = master();
        backup.context = Context::Backup;
        backup.backs = Some(Uuid::new_v4());
        backup.production_cluster = Some("acme".into());
        let text = sign_license(&backup, &k).unwrap();
        assert!(text.contains("production_cluster = \"acme\""), "{text}");
        let read = verify_license(&text, "backup.lic", &k.verifying_key()).unwrap();
        assert_eq!(read.production_cluster.as_deref(), Some("acme"));
        let edited = text.replace("\"acme\"", "\"acmf\"");
        assert!(verify_license(&edited, "backup.lic", &k.verifying_key()).is_err());
        backup.production_cluster = Some("no spaces allowed".into());
        let err = sign_license(&backup, &k).unwrap_err().to_string();
        assert!(err.contains("not a cluster name"), "{err}");
        let mut production = master();
        production.production_cluster = Some("acme".into());
        let err = sign_license(&production, &k).unwrap_err().to_string();
        assert!(err.contains("only for a backup master license"), "{err}");
    }

    #[test]
    fn sign_then_verify() {
        let k = key(1);
        let text = sign_license(&master(), &k).unwrap();
        assert!(text.contains("[license]"));
        let l = verify_license(&text, "m.lic", &k.verifying_key()).unwrap();
        assert_eq!(l, {
            let mut m = master();
            m.id = l.id;
            m
        });
    }

    #[test]
    fn any_changed_byte_is_detected() {
        let k = key(1);
        let text = sign_license(&master(), &k).unwrap();
        let sig_line = text.rfind(SIGNATURE_PREFIX).unwrap();
        // Flip each byte of the signed body in turn (stepping to keep the test fast).
        for i in (0..sig_line).step_by(3) {
            let mut bytes = text.clone().into_bytes();
            bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
            let Ok(tampered) = String::from_utf8(bytes) else {
                continue;
            };
            let err = verify_license(&tampered, "m.lic", &k.verifying_key()).unwrap_err();
            assert!(
                matches!(
                    err,
                    LicenseError::Modified { .. }
                        | LicenseError::Unsigned { .. }
                        | LicenseError::BadSignatureLine { .. }
                ),
                "byte {i}: {err}"
            );
            assert!(err.to_string().contains("m.lic"));
        }
    }

    #[test]
    fn raised_limit_is_reported_as_modified() {
        let k = key(1);
        let text = sign_license(&master(), &k)
            .unwrap()
            .replace("total = 500", "total = 900");
        let err = verify_license(&text, "/etc/lmbus/m.lic", &k.verifying_key()).unwrap_err();
        assert_eq!(
            err,
            LicenseError::Modified {
                file: "/etc/lmbus/m.lic".into()
            }
        );
        assert!(err.to_string().contains("modified"));
    }

    #[test]
    fn another_key_is_named() {
        let text = sign_license(&master(), &key(1)).unwrap();
        let err = verify_license(&text, "m.lic", &key(2).verifying_key()).unwrap_err();
        assert!(matches!(err, LicenseError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("another vendor key"));
    }

    #[test]
    fn unsigned_and_trailing_text_are_refused() {
        let k = key(1);
        let text = sign_license(&master(), &k).unwrap();
        let body = &text[..text.rfind(SIGNATURE_PREFIX).unwrap()];
        assert!(matches!(
            verify_license(body, "f", &k.verifying_key()),
            Err(LicenseError::Unsigned { .. })
        ));
        let appended = format!("{text}[extra]\n");
        assert!(matches!(
            verify_license(&appended, "f", &k.verifying_key()),
            Err(LicenseError::Modified { .. })
        ));
    }

    #[test]
    fn dates_and_roles() {
        let l = master();
        assert!(l.check_dates(date!(2027 - 12 - 31), "f").is_ok());
        assert!(matches!(
            l.check_dates(date!(2028 - 01 - 01), "f"),
            Err(LicenseError::Expired { .. })
        ));
        assert!(matches!(
            l.check_dates(date!(2025 - 12 - 31), "f"),
            Err(LicenseError::NotYetValid { .. })
        ));
        assert_eq!(l.days_left(date!(2027 - 12 - 01)), 30);
        // 2026-01-01T00:00:00Z.
        assert_eq!(l.issued_unix_ms(), 1_767_225_600_000);
        assert!(l.require_role(Role::Master, "f").is_ok());
        let err = l.require_role(Role::Slave, "f").unwrap_err();
        assert!(err.to_string().contains("'master'"), "{err}");
    }

    #[test]
    fn master_without_total_is_invalid() {
        let mut l = master();
        l.limits.total = None;
        assert!(matches!(
            sign_license(&l, &key(1)),
            Err(LicenseError::Invalid { .. })
        ));
    }

    /// A license without `sync_within_days` is written as before the field existed (no
    /// such line, the limits table right after the context), so files signed then still
    /// verify, with no offline limit; one with it round-trips; below the minimum it is
    /// refused when signed and when verified.
    #[test]
    fn the_offline_limit_is_optional_and_at_least_the_minimum() {
        let k = key(1);
        let mut old = master();
        old.id = Uuid::nil();
        let text = sign_license(&old, &k).unwrap();
        assert!(!text.contains("sync_within_days"), "{text}");
        assert!(
            text.contains("context = \"production\"\n\n[license.limits]"),
            "{text}"
        );
        assert_eq!(
            verify_license(&text, "f", &k.verifying_key())
                .unwrap()
                .sync_within_days,
            None
        );

        let mut synced = master();
        synced.sync_within_days = Some(90);
        let text = sign_license(&synced, &k).unwrap();
        assert!(text.contains("sync_within_days = 90"), "{text}");
        assert_eq!(
            verify_license(&text, "f", &k.verifying_key()).unwrap(),
            synced
        );

        synced.sync_within_days = Some(MIN_SYNC_WITHIN_DAYS - 1);
        let err = sign_license(&synced, &k).unwrap_err();
        assert!(err.to_string().contains("at least 60 days"), "{err}");
        // Signed by a tool that does not check (the body edited, then signed by hand).
        let body = format!(
            "{HEADER}{}",
            toml::to_string(&LicenseFile { license: synced }).unwrap()
        );
        let forged = format!(
            "{body}{SIGNATURE_PREFIX} ed25519 key={} sig={}\n",
            key_id(&k.verifying_key()),
            B64.encode(k.sign(body.as_bytes()).to_bytes())
        );
        let err = verify_license(&forged, "f", &k.verifying_key()).unwrap_err();
        assert!(matches!(err, LicenseError::Invalid { .. }), "{err}");
    }

    #[test]
    fn key_text_round_trips() {
        let k = key(7);
        let parsed = parse_secret_key(&secret_key_text(&k)).unwrap();
        assert_eq!(parsed.to_bytes(), k.to_bytes());
        let public = parse_public_key(&public_key_text(&k.verifying_key())).unwrap();
        assert_eq!(public, k.verifying_key());
        assert!(parse_public_key("nonsense!").is_err());
        assert!(parse_public_key("AAAA").is_err());
    }
}
