//! The vendor's side of vendor sync: `run` answers masters' `SyncRequest`s on
//! `lmbus.vendor.v1.sync` (a queue group, so several vendor nodes share them) with the
//! current signed license of the id asked about, from the store, signed as a whole with the
//! vendor key (`sign_sync_answer`).
//!
//! The store is a directory: `licenses/<license id>.lic` holds each customer's current
//! master license (put there by `store_license`, which verifies it first; a new purchase or
//! a change of limits or dates is a new file in its place, a removed license a deleted
//! one), and `syncs.jsonl` gets one line per answered sync (time, sync id, license, cluster,
//! outcome and the installation's usage summary). `installations/<license id>` holds the
//! installation the license is bound to: the first that synced it (trust on first use);
//! another installation's sync is refused and flagged in the log, until `unbind`. Answering is idempotent: the same request gets the same license.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures::StreamExt as _;
use lmbus_schemas::{
    License, Subjects, SyncAnswer, SyncRequest, VendorKey, decode, encode, printable,
    sign_sync_answer, verify_license,
};
use tracing::{info, warn};
use uuid::Uuid;

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct VendorConfig {
    pub nats_url: String,
    pub nats_auth: lmbus_nats::NatsAuth,
    /// The vendor's signing key: the one that signs licenses.
    pub key: VendorKey,
    /// The store directory.
    pub store: PathBuf,
}

/// The queue group every vendor node answers in.
const QUEUE: &str = "lmbus-vendor";

/// Most agent types a usage summary may name (a license names a handful), and most
/// rejection reasons: a summary beyond them is flagged and not stored (the sync is still
/// answered).
pub const MAX_SUMMARY_TYPES: usize = 256;
pub const MAX_SUMMARY_REASONS: usize = 64;
/// Longest agent type, reason or context name a summary may carry (characters).
pub const MAX_SUMMARY_NAME: usize = 128;

/// Why a usage summary is not one a broker writes: too many types or reasons, or a name
/// too long to be one.
pub fn check_summary(summary: &lmbus_schemas::UsageSummary) -> Result<(), String> {
    if summary.by_type.len() > MAX_SUMMARY_TYPES {
        return Err(format!(
            "the usage summary names {} agent types; at most {MAX_SUMMARY_TYPES} are taken",
            summary.by_type.len()
        ));
    }
    if summary.rejections.len() > MAX_SUMMARY_REASONS {
        return Err(format!(
            "the usage summary names {} rejection reasons; at most {MAX_SUMMARY_REASONS} are taken",
            summary.rejections.len()
        ));
    }
    let names = summary
        .by_type
        .keys()
        .chain(summary.rejections.keys())
        .chain(std::iter::once(&summary.context));
    for name in names {
        if name.chars().count() > MAX_SUMMARY_NAME {
            return Err(format!(
                "the usage summary carries a name of {} characters; at most {MAX_SUMMARY_NAME} are taken",
                name.chars().count()
            ));
        }
    }
    Ok(())
}

/// Where the store keeps license `id`.
fn license_path(store: &Path, id: Uuid) -> PathBuf {
    store.join("licenses").join(format!("{id}.lic"))
}

/// Where the store keeps the installation license `id` is bound to.
fn binding_path(store: &Path, id: Uuid) -> PathBuf {
    store.join("installations").join(format!("{id}"))
}

/// One license, one installation: the first installation that syncs license `license` is
/// bound to it (trust on first use); `Err` names the bound one when another asks. (A nil
/// installation is refused before.)
fn check_installation(store: &Path, license: Uuid, installation: Uuid) -> Result<(), String> {
    let path = binding_path(store, license);
    match std::fs::read_to_string(&path) {
        Ok(bound) if bound.trim() == installation.to_string() => Ok(()),
        Ok(bound) => Err(bound.trim().to_owned()),
        Err(_) => {
            let dir = store.join("installations");
            // A store that cannot keep the binding still answers; the next sync binds.
            if let Err(e) = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&path, installation.to_string()))
            {
                warn!("cannot bind license {license} to installation {installation}: {e}");
            }
            Ok(())
        }
    }
}

/// Where the store keeps the key installation `id` signs its syncs with.
fn installation_key_path(store: &Path, id: Uuid) -> PathBuf {
    store.join("installation-keys").join(format!("{id}"))
}

/// The installation's own key: the first signed sync of an installation binds its key
/// (trust on first use, [`bind_installation_key`], once every other check passed); from
/// then on its syncs must be signed by that key, and an unsigned one is refused. An
/// installation that never signed (an older broker) is not checked. `Err` says why a
/// request is refused.
fn check_installation_key(
    store: &Path,
    installation: Uuid,
    key: Option<&str>,
) -> Result<(), String> {
    let bound = std::fs::read_to_string(installation_key_path(store, installation)).ok();
    match (bound.as_deref().map(str::trim), key) {
        (Some(bound), Some(key)) if bound != key => Err(format!(
            "the request is signed with another key than the one installation {installation} signed its first sync with"
        )),
        (Some(_), None) => Err(format!(
            "installation {installation} signs its syncs: an unsigned request in its name is refused"
        )),
        _ => Ok(()),
    }
}

/// Binds `key` to `installation` if it has none yet: called only for a request that
/// passed every check (its license is bound to this installation and answered), so a
/// request in another's name, or for a license it does not hold, binds nothing.
fn bind_installation_key(store: &Path, installation: Uuid, key: &str) {
    let path = installation_key_path(store, installation);
    if path.exists() {
        return;
    }
    let dir = store.join("installation-keys");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, key)) {
        warn!("cannot bind installation {installation} to its key: {e}");
    }
}

/// Moves license `license` to another installation: the next one that syncs it is bound
/// (and the key of the installation it was bound to is forgotten: its next signed sync
/// binds a key again).
pub fn unbind(store: &Path, license: Uuid) -> anyhow::Result<bool> {
    let path = binding_path(store, license);
    if let Some(installation) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|id| id.trim().parse::<Uuid>().ok())
    {
        let key = installation_key_path(store, installation);
        if let Err(e) = std::fs::remove_file(&key)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(e).with_context(|| format!("cannot remove {}", key.display()));
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// Verifies `text` with the vendor's own key and puts it in the store as the current
/// license of its id; the license.
pub fn store_license(store: &Path, text: &str, key: &VendorKey) -> anyhow::Result<License> {
    let license = verify_license(text, "the license to store", &key.verifying_key())?;
    let path = license_path(store, license.id);
    let dir = store.join("licenses");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(license)
}

/// The answer to `request` at `now_ms`, from the store: the license's current text, or a
/// refusal saying why there is none.
pub fn answer(store: &Path, key: &VendorKey, request: &SyncRequest, now_ms: u64) -> SyncAnswer {
    let refused = |why: String| SyncAnswer {
        sync: request.sync,
        at_ms: now_ms,
        license: None,
        refused: Some(why),
    };
    let path = license_path(store, request.license);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return refused(format!(
                "license {} is not in the vendor's store (removed, transferred, or never issued)",
                request.license
            ));
        }
        Err(e) => {
            warn!("cannot read {}: {e}", path.display());
            return refused("the vendor cannot read its store now: try again later".into());
        }
    };
    // An oversized summary is flagged and not kept (`record`), but the sync is answered:
    // a site's slaves can name agent types, and refusing would let one of them stop the
    // installation's syncs (and so, past the offline limit, its seats).
    if let Some(Err(why)) = request.summary.as_ref().map(check_summary) {
        warn!(license = %request.license, "FLAGGED: {why}; the summary is not kept");
    }
    // Every leader records its installation's id before it can sync: a request without
    // one would escape the binding below.
    if request.installation.is_nil() {
        warn!(license = %request.license, "refused a sync that names no installation");
        return refused(
            "the request names no installation: a license is bound to the installation that syncs it".into(),
        );
    }
    // Signed by the installation's key (bound at its first signed sync that is answered:
    // a request in another installation's name, or refused, binds nothing).
    let signed_by = match lmbus_schemas::open_sync_request(request) {
        Ok(Some((key, body))) => {
            if let Some(Err(why)) = body.summary.as_ref().map(check_summary) {
                warn!(license = %request.license, "FLAGGED: {why}; the summary is not kept");
            }
            Some(key)
        }
        Ok(None) => None,
        Err(e) => {
            warn!(
                license = %request.license,
                installation = %request.installation,
                "FLAGGED: a sync request whose installation signature does not verify; refused: {e}"
            );
            return refused(format!("the request's installation signature: {e}"));
        }
    };
    if let Err(why) = check_installation_key(store, request.installation, signed_by.as_deref()) {
        warn!(
            license = %request.license,
            installation = %request.installation,
            "FLAGGED: {why}; refused"
        );
        return refused(why);
    }
    if let Err(bound) = check_installation(store, request.license, request.installation) {
        warn!(
            license = %request.license,
            installation = %request.installation,
            bound = %bound,
            "FLAGGED: a license synced from a second installation; refused"
        );
        return refused(format!(
            "license {} is in use by another installation ({bound}); this one is {}: a license serves one installation (the vendor moves it with lmbus-vendor unbind)",
            request.license, request.installation
        ));
    }
    // Never send what the master would refuse: the store's file must verify and be the id.
    match verify_license(&text, &path.display().to_string(), &key.verifying_key()) {
        Ok(license) if license.id == request.license => {
            if let Some(signed_by) = &signed_by {
                bind_installation_key(store, request.installation, signed_by);
            }
            SyncAnswer {
                sync: request.sync,
                at_ms: now_ms,
                license: Some(text),
                refused: None,
            }
        }
        Ok(license) => {
            warn!(
                "{} holds license {}, not {}",
                path.display(),
                license.id,
                request.license
            );
            refused("the vendor's store is inconsistent for this license".into())
        }
        Err(e) => {
            warn!("{e}");
            refused("the vendor's stored license does not verify".into())
        }
    }
}

/// The vendor's time, which a customer's leader records a sync at (when it is not later
/// than its own clock). `LMBUS_VENDOR_FAULT_CLOCK_AHEAD_DAYS` moves it forward, for tests
/// only (they jump the brokers' clocks by weeks): it only ever cheats the vendor itself.
fn now_ms() -> u64 {
    let system = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(0);
    let ahead_days: u64 = std::env::var("LMBUS_VENDOR_FAULT_CLOCK_AHEAD_DAYS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    system.saturating_add(ahead_days.min(3650).saturating_mul(86_400_000))
}

/// Appends one line to `syncs.jsonl`, once per sync id: a request sent again (the broker
/// retries while no answer reaches it) is answered again but stored once. Each recorded id
/// leaves an empty marker `seen/<sync id>`, created atomically (`create_new`).
fn record(store: &Path, request: &SyncRequest, answer: &SyncAnswer) -> anyhow::Result<()> {
    let seen = store.join("seen");
    std::fs::create_dir_all(&seen).with_context(|| format!("cannot create {}", seen.display()))?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(seen.join(request.sync.to_string()))
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot write in {}", seen.display())),
    }
    let path = store.join("syncs.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // A signed request's summary is the one its signature covers.
    let opened = lmbus_schemas::open_sync_request(request).ok().flatten();
    let (signed_by, summary, cluster) = match opened {
        Some((key, body)) => (Some(key), body.summary, body.cluster),
        None => (None, request.summary.clone(), request.cluster.clone()),
    };
    // A summary refused for its size is not kept either.
    let summary = summary.filter(|s| check_summary(s).is_ok());
    let line = serde_json::json!({
        "time_ms": answer.at_ms,
        "sync": request.sync,
        "license": request.license,
        "cluster": printable(&cluster).chars().take(64).collect::<String>(),
        "installation": request.installation,
        "signed_by": signed_by,
        "outcome": answer.refused.as_deref().unwrap_or("answered"),
        "summary": summary,
    });
    writeln!(file, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

/// Answers `request` now from the store, records it in `syncs.jsonl` and signs the answer
/// (for a request that came as a file).
pub fn answer_and_record(
    store: &Path,
    key: &VendorKey,
    request: &SyncRequest,
) -> anyhow::Result<(SyncAnswer, lmbus_schemas::SignedSyncAnswer)> {
    let answer = answer(store, key, request, now_ms());
    record(store, request, &answer)?;
    let signed = sign_sync_answer(&answer, key)?;
    Ok((answer, signed))
}

/// One answered sync as `syncs.jsonl` keeps it, with the customer of its license (from the
/// store; empty when the store no longer has it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SyncLogLine {
    pub time_ms: u64,
    pub sync: Uuid,
    pub license: Uuid,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub installation: Uuid,
    pub outcome: String,
    /// The installation key that signed the request (base64), `None` for an unsigned one.
    #[serde(default)]
    pub signed_by: Option<String>,
    #[serde(default)]
    pub summary: Option<lmbus_schemas::UsageSummary>,
    #[serde(default)]
    pub customer: String,
}

/// The usage summaries the store received since `since_ms` (Unix milliseconds), of
/// `customer` when given (the name in the license, exactly), oldest first. Lines that do not
/// parse are skipped with a warning.
pub fn usage(
    store: &Path,
    customer: Option<&str>,
    since_ms: u64,
) -> anyhow::Result<Vec<SyncLogLine>> {
    let path = store.join("syncs.jsonl");
    // Read a line at a time: the log grows by a line per sync, for years.
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut customers = std::collections::BTreeMap::new();
    let mut lines = Vec::new();
    for (n, line) in std::io::BufRead::lines(std::io::BufReader::new(file)).enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        let mut entry: SyncLogLine = match serde_json::from_str(&line) {
            Ok(entry) => entry,
            Err(e) => {
                warn!("{} line {}: {e}", path.display(), n + 1);
                continue;
            }
        };
        if entry.time_ms < since_ms {
            continue;
        }
        entry.customer = customers
            .entry(entry.license)
            .or_insert_with(|| {
                std::fs::read_to_string(license_path(store, entry.license))
                    .ok()
                    .and_then(|t| lmbus_schemas::read_license_unverified(&t))
                    .map(|l| l.customer)
                    .unwrap_or_default()
            })
            .clone();
        if customer.is_none_or(|c| c == entry.customer) {
            lines.push(entry);
        }
    }
    Ok(lines)
}

/// `usage` as CSV: one row per sync with a summary, then one per agent type of it
/// (`agent_type` empty on the total's row).
pub fn usage_csv(lines: &[SyncLogLine]) -> String {
    let mut out = String::from(
        "time_ms,customer,license,cluster,installation,period_start_ms,period_end_ms,agent_type,peak,average\n",
    );
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for l in lines {
        let Some(summary) = &l.summary else {
            continue;
        };
        let rows = std::iter::once((String::new(), &summary.total))
            .chain(summary.by_type.iter().map(|(t, u)| (t.clone(), u)));
        for (agent_type, u) in rows {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{:.3}\n",
                l.time_ms,
                quote(&l.customer),
                l.license,
                quote(&l.cluster),
                l.installation,
                summary.period_start_ms,
                summary.period_end_ms,
                quote(&agent_type),
                u.peak,
                u.average
            ));
        }
    }
    out
}

/// Serves sync requests until `shutdown` resolves, then drains the connection.
pub async fn run(
    cfg: VendorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = lmbus_nats::connect(
        &cfg.nats_url,
        async_nats::ConnectOptions::new(),
        &cfg.nats_auth,
    )
    .await?;
    let mut requests = client
        .queue_subscribe(Subjects::vendor_sync(), QUEUE.into())
        .await
        .with_context(|| format!("cannot subscribe to {}", Subjects::vendor_sync()))?;
    client.flush().await?;
    info!(subject = Subjects::vendor_sync(), store = %cfg.store.display(), "serving vendor sync");
    tokio::pin!(shutdown);
    loop {
        let msg = tokio::select! {
            _ = &mut shutdown => break,
            msg = requests.next() => match msg {
                Some(msg) => msg,
                None => anyhow::bail!("the subscription to {} ended", Subjects::vendor_sync()),
            },
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let request: SyncRequest = match decode(&msg.payload) {
            Ok(request) => request,
            Err(e) => {
                warn!("a sync request that does not decode: {e}");
                continue;
            }
        };
        let answer = answer(&cfg.store, &cfg.key, &request, now_ms());
        if let Err(e) = record(&cfg.store, &request, &answer) {
            warn!("{e:#}");
        }
        info!(sync = %request.sync, license = %request.license, refused = answer.refused.as_deref(), "sync answered");
        let signed = sign_sync_answer(&answer, &cfg.key)?;
        if let Err(e) = client.publish(reply_to, encode(&signed)?.into()).await {
            warn!("cannot answer sync {}: {e}", request.sync);
        }
    }
    client.drain().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmbus_schemas::{Context, Limits, Role, sign_license};

    fn license(total: u32) -> License {
        License {
            id: Uuid::new_v4(),
            customer: "Acme".into(),
            issued: time::macros::date!(2026 - 01 - 01),
            expires: time::macros::date!(2099 - 12 - 31),
            maintenance_expires: time::macros::date!(2099 - 12 - 31),
            role: Role::Master,
            context: Context::Production,
            sync_within_days: Some(60),
            revision: None,
            backs: None,
            production_cluster: None,
            limits: Limits {
                total: Some(total),
                ..Limits::default()
            },
        }
    }

    /// A store holding one 8-seat master license, with the vendor key that signed it.
    fn store_with_license() -> (tempfile::TempDir, VendorKey, License) {
        let store = tempfile::tempdir().unwrap();
        let key = VendorKey::from_bytes(&[3; 32]);
        let l = license(8);
        store_license(store.path(), &sign_license(&l, &key).unwrap(), &key).unwrap();
        (store, key, l)
    }

    /// A stored license is answered verbatim for its id; an unknown id, a file that does not
    /// verify, one holding another id, or a request naming no installation is refused with
    /// a reason; `store_license` refuses a license signed by another key.
    #[test]
    fn the_store_answers_its_licenses_and_refuses_the_rest() {
        let store = tempfile::tempdir().unwrap();
        let key = VendorKey::from_bytes(&[3; 32]);
        let l = license(8);
        let text = sign_license(&l, &key).unwrap();
        store_license(store.path(), &text, &key).unwrap();
        let installation = Uuid::new_v4();
        let ask = |id| SyncRequest {
            sync: Uuid::new_v4(),
            license: id,
            cluster: "acme".into(),
            installation,
            summary: None,
            signed: None,
        };
        // A request that names no installation would escape the binding: refused.
        let nameless = SyncRequest {
            installation: Uuid::nil(),
            ..ask(l.id)
        };
        let refused = answer(store.path(), &key, &nameless, 5);
        assert!(refused.license.is_none());
        assert!(
            refused
                .refused
                .as_deref()
                .is_some_and(|r| r.contains("names no installation")),
            "{refused:?}"
        );
        let request = ask(l.id);
        let a = answer(store.path(), &key, &request, 5);
        assert_eq!((a.sync, a.at_ms), (request.sync, 5));
        assert_eq!(a.license.as_deref(), Some(text.as_str()));
        assert!(a.refused.is_none());

        let unknown = answer(store.path(), &key, &ask(Uuid::new_v4()), 5);
        assert!(unknown.license.is_none());
        assert!(
            unknown
                .refused
                .unwrap()
                .contains("not in the vendor's store")
        );

        std::fs::write(
            license_path(store.path(), l.id),
            text.replace("total = 8", "total = 80"),
        )
        .unwrap();
        let tampered = answer(store.path(), &key, &ask(l.id), 5);
        assert!(tampered.refused.unwrap().contains("does not verify"));

        let other = license(2);
        std::fs::write(
            license_path(store.path(), l.id),
            sign_license(&other, &key).unwrap(),
        )
        .unwrap();
        assert!(answer(store.path(), &key, &ask(l.id), 5).refused.is_some());

        let foreign = sign_license(&l, &VendorKey::from_bytes(&[4; 32])).unwrap();
        assert!(store_license(store.path(), &foreign, &key).is_err());
    }

    /// The first installation that syncs a license is bound to it; another is refused,
    /// naming both, until `unbind`; the first keeps syncing.
    #[test]
    fn a_license_serves_one_installation() {
        let (store, key, l) = store_with_license();
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        let ask = |installation| SyncRequest {
            sync: Uuid::new_v4(),
            license: l.id,
            cluster: "acme".into(),
            installation,
            summary: None,
            signed: None,
        };
        assert!(answer(store.path(), &key, &ask(first), 1).license.is_some());
        let refused = answer(store.path(), &key, &ask(second), 2).refused.unwrap();
        assert!(
            refused.contains("in use by another installation")
                && refused.contains(&first.to_string())
                && refused.contains(&second.to_string()),
            "{refused}"
        );
        assert!(answer(store.path(), &key, &ask(first), 3).license.is_some());
        assert!(unbind(store.path(), l.id).unwrap());
        assert!(
            answer(store.path(), &key, &ask(second), 4)
                .license
                .is_some()
        );
        assert!(answer(store.path(), &key, &ask(first), 5).refused.is_some());
    }

    /// An installation's first signed sync that is answered binds its key (one in its name
    /// for a license it does not hold binds nothing): later syncs in its name signed by
    /// another key, unsigned, or with a signature that does not verify are refused and
    /// bind nothing; its own keep syncing, and the log names the key and keeps the signed
    /// summary; `unbind` forgets the key with the license's installation.
    #[test]
    fn an_installation_signs_with_the_key_of_its_first_signed_sync() {
        let (store, key, l) = store_with_license();
        let installation = Uuid::new_v4();
        let own = lmbus_schemas::installation_key(&lmbus_schemas::new_installation_seed([5; 32]))
            .unwrap();
        let thief = lmbus_schemas::installation_key(&lmbus_schemas::new_installation_seed([6; 32]))
            .unwrap();
        let ask = |signer: Option<&ed25519_dalek::SigningKey>| {
            let mut request = SyncRequest {
                sync: Uuid::new_v4(),
                license: l.id,
                cluster: "acme".into(),
                installation,
                summary: None,
                signed: None,
            };
            if let Some(signer) = signer {
                lmbus_schemas::sign_sync_request(&mut request, signer).unwrap();
            }
            request
        };
        // A thief's request in the installation's name for a license not in the store:
        // refused, and it binds no key.
        let mut elsewhere = ask(None);
        elsewhere.license = Uuid::new_v4();
        lmbus_schemas::sign_sync_request(&mut elsewhere, &thief).unwrap();
        assert!(answer(store.path(), &key, &elsewhere, 1).refused.is_some());
        let first = ask(Some(&own));
        let (a, _) = answer_and_record(store.path(), &key, &first).unwrap();
        assert!(a.license.is_some(), "{a:?}");
        for (what, request) in [("another key", ask(Some(&thief))), ("unsigned", ask(None))] {
            let refused = answer(store.path(), &key, &request, 2).refused;
            assert!(
                refused
                    .as_deref()
                    .is_some_and(|r| r.contains(&installation.to_string())),
                "{what}: {refused:?}"
            );
        }
        let mut tampered = ask(Some(&own));
        tampered.installation = Uuid::new_v4();
        assert!(
            answer(store.path(), &key, &tampered, 3)
                .refused
                .is_some_and(|r| r.contains("installation signature"))
        );
        assert!(
            answer(store.path(), &key, &ask(Some(&own)), 4)
                .license
                .is_some()
        );
        let lines = usage(store.path(), None, 0).unwrap();
        assert!(lines[0].signed_by.is_some(), "{lines:?}");
        // Moved with unbind: the key goes too, and the next signed sync binds its own.
        assert!(unbind(store.path(), l.id).unwrap());
        assert!(
            answer(store.path(), &key, &ask(Some(&thief)), 5)
                .license
                .is_some()
        );
        assert!(
            answer(store.path(), &key, &ask(Some(&own)), 6)
                .refused
                .is_some()
        );
    }

    /// A request sent again (same sync id) is answered again and stored once.
    #[test]
    fn a_sync_sent_twice_is_stored_once() {
        let (store, key, l) = store_with_license();
        let request = SyncRequest {
            sync: Uuid::new_v4(),
            license: l.id,
            cluster: "acme".into(),
            installation: Uuid::new_v4(),
            summary: None,
            signed: None,
        };
        let other = SyncRequest {
            sync: Uuid::new_v4(),
            ..request.clone()
        };
        for r in [&request, &request, &other] {
            let (a, _) = answer_and_record(store.path(), &key, r).unwrap();
            assert!(a.license.is_some());
        }
        let log = std::fs::read_to_string(store.path().join("syncs.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 2, "{log}");
        assert_eq!(log.matches(&request.sync.to_string()).count(), 1, "{log}");
        assert_eq!(usage(store.path(), None, 0).unwrap().len(), 2);
    }

    /// A summary naming more agent types than any license, or a name longer than any, is
    /// not kept, but the sync is answered (a site's slave naming types must not stop the
    /// installation's syncs); one within the bounds is answered and kept.
    #[test]
    fn an_oversized_summary_is_answered_but_not_kept() {
        let (store, key, l) = store_with_license();
        let usage_of = |types: usize, name_len: usize| lmbus_schemas::UsageSummary {
            context: "production".into(),
            by_type: (0..types)
                .map(|n| (format!("{n:0>name_len$}"), Default::default()))
                .collect(),
            ..Default::default()
        };
        let installation = Uuid::new_v4();
        let request = |summary| SyncRequest {
            sync: Uuid::new_v4(),
            license: l.id,
            cluster: "acme".into(),
            installation,
            summary: Some(summary),
            signed: None,
        };
        for (summary, what) in [
            (usage_of(MAX_SUMMARY_TYPES + 1, 4), "agent types"),
            (usage_of(1, MAX_SUMMARY_NAME + 1), "characters"),
        ] {
            let why = check_summary(&summary).unwrap_err();
            assert!(why.contains(what), "{why}");
            let (a, _) = answer_and_record(store.path(), &key, &request(summary)).unwrap();
            assert!(a.refused.is_none() && a.license.is_some(), "{a:?}");
        }
        let kept = usage(store.path(), None, 0).unwrap();
        assert!(kept.iter().all(|line| line.summary.is_none()), "{kept:?}");
        let within = request(usage_of(MAX_SUMMARY_TYPES, MAX_SUMMARY_NAME));
        let (a, _) = answer_and_record(store.path(), &key, &within).unwrap();
        assert!(a.refused.is_none(), "{a:?}");
        let kept = usage(store.path(), None, 0).unwrap();
        assert_eq!(
            kept.last()
                .and_then(|l| l.summary.as_ref())
                .map(|s| s.by_type.len()),
            Some(MAX_SUMMARY_TYPES)
        );
    }
}
