//! Vendor sync from the leader (`admin sync now`): a task beside the loop asks the vendor
//! on `lmbus.vendor.v1.sync` (over the same NATS connection: the customer's NATS reaches the
//! vendor's through a leaf node), retrying with back-off while nobody answers, and checks the
//! answer's signature with the vendor key and that it answers this request. The loop takes
//! the verified answer in (`Leader::on_sync_done`): the license through the engine's reload
//! (the path `admin reload-license` takes), then `Event::Synced`, both recorded in the ledger.
//! Nothing a slave can publish reaches this: the request goes out on the leader's own
//! connection, only a vendor-signed answer naming this request's id is taken.

use std::time::Duration;

use async_nats::Subject;
use lmbus_schemas::{
    Alert, AlertKind, Severity, SignedSyncAnswer, Subjects, SyncAnswer, SyncRequest, UsageSummary,
    VerifyingKey, decode, encode, verify_sync_answer,
};
use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;

use super::outbound::Io;

/// How long one request to the vendor waits for its answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts while nobody answers (timeout, no responders), with back-off between them.
const ATTEMPTS: u32 = 3;
const BACKOFF: Duration = Duration::from_secs(1);
/// How long the summary's event counts may take to read from the alert stream (with the
/// attempts above, within the 30 s that `admin sync now` waits).
const EVENTS_READ_LIMIT: Duration = Duration::from_secs(5);

/// A finished sync, for the leader loop.
#[derive(Debug)]
pub(super) struct SyncDone {
    /// Where `admin sync now` waits for its answer.
    pub(super) reply_to: Option<Subject>,
    pub(super) operator: String,
    pub(super) sync: Uuid,
    /// The verified answer, or why there is none.
    pub(super) result: Result<SyncAnswer, String>,
}

/// What a sync asks the vendor, and for whom.
pub(super) struct Ask {
    pub(super) vendor_key: VerifyingKey,
    pub(super) license: Uuid,
    pub(super) installation: Uuid,
    /// The installation's key seed (base64), which signs the request.
    pub(super) installation_key: Option<String>,
    /// What the installation used (no agent or slave ids).
    pub(super) summary: Option<UsageSummary>,
    /// Who asked: an operator, or the schedule.
    pub(super) operator: String,
    pub(super) reply_to: Option<Subject>,
}

/// Asks the vendor in a task; the outcome goes to `done` (bounded: the leader runs one
/// sync at a time, so it is never full).
pub(super) fn spawn_sync(io: &Io, ask_for: Ask, done: mpsc::Sender<SyncDone>) {
    let Ask {
        vendor_key,
        license,
        installation,
        installation_key,
        summary,
        operator,
        reply_to,
    } = ask_for;
    let client = io.vendor.clone();
    let (local, subjects) = (io.client.clone(), io.subjects.clone());
    let cluster = io.subjects.cluster().to_owned();
    io.tasks.clone().spawn(async move {
        let sync = Uuid::new_v4();
        info!(%sync, %license, "vendor sync");
        let mut summary = summary;
        if let Some(summary) = summary.as_mut() {
            count_events(&local, &subjects, summary).await;
        }
        let mut request = SyncRequest {
            sync,
            license,
            cluster,
            installation,
            summary,
            signed: None,
        };
        sign_request(&mut request, installation_key.as_deref());
        let result = ask(&client, &vendor_key, request).await;
        if let Err(e) = &result {
            warn!(%sync, "vendor sync failed: {e}");
        }
        let _ = done
            .send(SyncDone {
                reply_to,
                operator,
                sync,
                result,
            })
            .await;
    });
}

/// An air-gapped export (`admin sync export`), once its id is in the ledger: the summary's
/// event counts are read (as for a sync over NATS), the request is signed, the export is
/// alerted and the request goes back to the operator to carry to the vendor.
pub(super) fn spawn_export(
    io: &Io,
    mut request: SyncRequest,
    installation_key: Option<String>,
    operator: String,
    reply_to: Option<Subject>,
) {
    let io = io.clone();
    io.tasks.clone().spawn(async move {
        if let Some(summary) = request.summary.as_mut() {
            count_events(&io.client, &io.subjects, summary).await;
        }
        sign_request(&mut request, installation_key.as_deref());
        let sync = request.sync;
        io.alert(Alert::new(
            Severity::Info,
            AlertKind::VendorSync,
            format!(
                "{operator} exported vendor sync request {sync} for an air-gapped sync: its answer applies once, with admin sync import"
            ),
        ))
        .await;
        if let Some(to) = reply_to {
            let reply = lmbus_schemas::SyncExportReply::Exported {
                request: Box::new(request),
            };
            io.send(to, &reply, "admin reply").await;
        }
    });
}

/// Signs `request` with the installation's key (a request goes unsigned, with a warning,
/// only if the ledger holds no key yet: the vendor then accepts it only if it has bound
/// no key to this installation).
pub(super) fn sign_request(request: &mut SyncRequest, seed: Option<&str>) {
    match seed.and_then(lmbus_schemas::installation_key) {
        Some(key) => {
            if let Err(e) = lmbus_schemas::sign_sync_request(request, &key) {
                warn!(sync = %request.sync, "the sync request goes unsigned: {e}");
            }
        }
        None => warn!(
            sync = %request.sync,
            "the sync request goes unsigned: the ledger holds no installation key yet"
        ),
    }
}

/// Fills in the summary's rejections by reason and events of the period so far from the
/// alert stream (counts only: no slave or agent id leaves); unreadable, it says so in a
/// warning and the summary goes without them (`events_counted` false).
async fn count_events(
    client: &async_nats::Client,
    subjects: &Subjects,
    summary: &mut UsageSummary,
) {
    let read = tokio::time::timeout(
        EVENTS_READ_LIMIT,
        crate::report::stored_alerts(client, subjects, summary.period_start_ms),
    )
    .await;
    match read {
        Ok(Ok(alerts)) => {
            let (rejections, events, _) = crate::report::count_events(
                summary.period_start_ms,
                summary.period_end_ms.max(summary.period_start_ms),
                alerts,
            );
            summary.rejections = rejections;
            summary.events = events;
            summary.events_counted = true;
        }
        Ok(Err(e)) => warn!("vendor sync: the summary goes without event counts: {e}"),
        Err(_) => warn!(
            "vendor sync: the summary goes without event counts: the alert stream was not read within {EVENTS_READ_LIMIT:?}"
        ),
    }
}

async fn ask(
    client: &async_nats::Client,
    vendor_key: &VerifyingKey,
    request: SyncRequest,
) -> Result<SyncAnswer, String> {
    let payload = encode(&request).map_err(|e| e.to_string())?;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(BACKOFF * (attempt - 1)).await;
        }
        let asked = tokio::time::timeout(
            ASK_TIMEOUT,
            client.request(Subjects::vendor_sync(), payload.clone().into()),
        )
        .await;
        let msg = match asked {
            Ok(Ok(msg)) => msg,
            Ok(Err(e)) => {
                last = format!(
                    "no answer from the vendor on {}: {e}",
                    Subjects::vendor_sync()
                );
                continue;
            }
            Err(_) => {
                last = format!(
                    "no answer from the vendor on {} within {ASK_TIMEOUT:?}",
                    Subjects::vendor_sync()
                );
                continue;
            }
        };
        // A bad answer is final: asking again would get the same.
        let signed: SignedSyncAnswer = decode(&msg.payload)
            .map_err(|e| format!("the vendor's answer does not decode: {e}"))?;
        return verify_sync_answer(&signed, vendor_key, request.sync).map_err(|e| e.to_string());
    }
    Err(format!(
        "{last} (after {ATTEMPTS} attempts; check the leaf node link to the vendor's NATS)"
    ))
}
