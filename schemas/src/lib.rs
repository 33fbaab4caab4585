//! The lmbus protocol crate: every message that crosses NATS, every subject name, the
//! envelope codec and the signed license file.
//!
//! This crate does no IO and knows nothing about tokio or NATS: it turns values into bytes
//! and subject strings and back, and checks signatures. Everything else in lmbus builds on
//! it, so a change here is a protocol change: new fields get `#[serde(default)]` and the
//! envelope version only moves when an old peer could misread a new message.

pub mod alert;
pub mod allot;
pub mod codec;
pub mod human;
pub mod ledger;
pub mod license;
pub mod messages;
pub mod metrics;
pub mod report;
pub mod subjects;
pub mod sync;
pub mod validate;

pub use alert::{Alert, AlertKind, Severity};
pub use allot::{
    Admission, AllotOp, AllotOpKind, AllotRequest, Allotment, MAX_ALLOT_OPS, MAX_ALLOT_TYPES,
};
pub use codec::{DecodeError, EncodeError, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, decode, encode};
pub use ledger::{LedgerEntry, OfflineLimit, SeatChange, SnapshotChunk, SnapshotManifest};
pub use license::{
    Context, KeyError, License, LicenseError, Limits, MIN_SYNC_WITHIN_DAYS, NOT_FOR_PRODUCTION,
    Role, VendorKey, VerifyingKey, key_id, license_text, parse_public_key, parse_secret_key,
    public_key_text, read_license_unverified, secret_key_text, sign_license, sign_license_as,
    verify_license,
};
pub use messages::*;
pub use report::{Events, UsageReport};
pub use subjects::{
    CLIENT_INBOX_PREFIX, MAX_REPLY_LEN, SlaveId, SlaveOp, SubjectError, Subjects, is_client_reply,
};
pub use sync::{
    RequestSignatureError, SeatUsage, SignedSyncAnswer, SignedSyncRequest, SyncAnswer, SyncError,
    SyncExportReply, SyncExportRequest, SyncImportRequest, SyncNowReply, SyncNowRequest,
    SyncRequest, SyncRequestBody, UsageSummary, installation_key, new_installation_seed,
    open_sync_answer, open_sync_request, sign_sync_answer, sign_sync_request, verify_sync_answer,
};
pub use validate::{Invalid, Validate, printable, truncated};
