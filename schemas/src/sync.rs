//! Vendor sync: what the master's leader asks the vendor (`SyncRequest` on
//! [`crate::Subjects::vendor_sync`]) and the vendor's signed answer (`SignedSyncAnswer`).
//!
//! The answer's body is encoded once by the vendor and signed, as those bytes, with the
//! vendor key that signs licenses; the broker checks the signature over the bytes it
//! received, then decodes them ([`verify_sync_answer`]), so no re-encoding has to agree. The
//! body echoes the request's `sync` id: an answer recorded for one request is refused for
//! any other, so an old answer cannot be played again.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, Verifier};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::license::{VendorKey, VerifyingKey, key_id};

/// The leader asks the vendor for the current state of its master license, and tells it
/// what the installation used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// This exchange: the answer must name it.
    pub sync: Uuid,
    /// The master license the installation runs with.
    pub license: Uuid,
    /// The cluster name, for the vendor's records (no agent ids, no personal data).
    #[serde(default)]
    pub cluster: String,
    /// The installation (the ledger's `Installation` record): the vendor binds a license id
    /// to the first installation that syncs it and refuses others. Nil from an older broker.
    #[serde(default)]
    pub installation: Uuid,
    /// Seats used since the usage period began (`None`: the leader has counted none yet).
    #[serde(default)]
    pub summary: Option<UsageSummary>,
}

/// Seats in use over a period: the peak and the time-weighted average.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeatUsage {
    pub peak: u32,
    pub average: f64,
}

/// What an installation used, summed up for the vendor: per agent type and in total, and
/// how many slaves were connected. Deliberately nothing per agent or per slave: no agent
/// id, slave id or anything about a person.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSummary {
    /// The master license's context (production, backup, development).
    #[serde(default)]
    pub context: String,
    /// The usage period (Unix milliseconds), and when this replica began counting in it.
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    #[serde(default)]
    pub counted_from_ms: i64,
    pub total: SeatUsage,
    #[serde(default)]
    pub by_type: std::collections::BTreeMap<String, SeatUsage>,
    /// Slaves with a live session when the summary was made.
    #[serde(default)]
    pub slaves_connected: u32,
    /// Registrations refused in the period so far, by reason (from the alert stream).
    #[serde(default)]
    pub rejections: std::collections::BTreeMap<String, u64>,
    /// The period's events so far, counted: slave connects and disconnects, slaves that
    /// restricted usage after their grace period, seats reclaimed, leader elections, ...
    #[serde(default)]
    pub events: crate::Events,
    /// `rejections` and `events` were counted (the alert stream could be read; false from
    /// an older broker or an air-gapped export, which does not count them).
    #[serde(default)]
    pub events_counted: bool,
}

/// What the vendor says, signed as encoded bytes inside [`SignedSyncAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncAnswer {
    /// The request answered.
    pub sync: Uuid,
    /// The vendor's clock when it answered (Unix milliseconds): the sync's time.
    pub at_ms: u64,
    /// The installation's current master license, signed, verbatim (a purchase or a change
    /// of limits or dates is a new text); `None` with `refused`.
    #[serde(default)]
    pub license: Option<String>,
    /// The vendor refuses the sync, and why (an unknown or revoked license).
    #[serde(default)]
    pub refused: Option<String>,
}

/// The vendor's answer: the encoded [`SyncAnswer`] and its Ed25519 signature, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSyncAnswer {
    pub body: String,
    /// The signing key's id ([`key_id`]), to name it in errors.
    pub key: String,
    pub signature: String,
}

/// `lmbus.v1.<cluster>.admin.sync`: sync with the vendor now (`admin sync now`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncNowRequest {
    /// Who asked, for the alert.
    #[serde(default)]
    pub operator: String,
}

/// `lmbus.v1.<cluster>.admin.sync_export`: make a sync request for an air-gapped site
/// (`admin sync export FILE`): the leader records its id and answers with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncExportRequest {
    #[serde(default)]
    pub operator: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncExportReply {
    /// The request to carry to the vendor (the CLI writes it as JSON).
    Exported {
        request: Box<SyncRequest>,
    },
    Error {
        message: String,
    },
}

/// `lmbus.v1.<cluster>.admin.sync_import`: apply the vendor's answer to an exported request
/// (`admin sync import FILE`); answered with a [`SyncNowReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncImportRequest {
    pub answer: SignedSyncAnswer,
    #[serde(default)]
    pub operator: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncNowReply {
    /// The sync succeeded and is recorded; `message` says what changed.
    Synced {
        message: String,
    },
    Error {
        message: String,
    },
}

/// Why a vendor answer is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("the vendor's answer is not valid base64 or MessagePack: {0}")]
    Malformed(String),
    #[error(
        "the vendor's answer is not signed by the vendor key this installation trusts (signed with key {signed_with}, trusted {trusted}), or it was modified"
    )]
    BadSignature {
        signed_with: String,
        trusted: String,
    },
    #[error("the vendor's answer is for sync {found}, not for this one ({expected})")]
    OtherSync { expected: Uuid, found: Uuid },
}

/// The vendor signs `answer`.
pub fn sign_sync_answer(
    answer: &SyncAnswer,
    key: &VendorKey,
) -> Result<SignedSyncAnswer, crate::EncodeError> {
    let body = crate::encode(answer)?;
    Ok(SignedSyncAnswer {
        body: B64.encode(&body),
        key: key_id(&key.verifying_key()),
        signature: B64.encode(key.sign(&body).to_bytes()),
    })
}

/// The broker checks a vendor answer: the signature over the bytes received, then that it
/// answers `expected`.
pub fn verify_sync_answer(
    signed: &SignedSyncAnswer,
    key: &VerifyingKey,
    expected: Uuid,
) -> Result<SyncAnswer, SyncError> {
    let answer = open_sync_answer(signed, key)?;
    if answer.sync != expected {
        return Err(SyncError::OtherSync {
            expected,
            found: answer.sync,
        });
    }
    Ok(answer)
}

/// A vendor answer whose signature verifies, whatever request it answers: for an imported
/// file, whose request the caller then looks up among those it exported.
pub fn open_sync_answer(
    signed: &SignedSyncAnswer,
    key: &VerifyingKey,
) -> Result<SyncAnswer, SyncError> {
    let body = B64
        .decode(&signed.body)
        .map_err(|e| SyncError::Malformed(e.to_string()))?;
    let bad = || SyncError::BadSignature {
        signed_with: crate::printable(&signed.key).chars().take(16).collect(),
        trusted: key_id(key),
    };
    let signature: [u8; 64] = B64
        .decode(&signed.signature)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(bad)?;
    key.verify(&body, &Signature::from_bytes(&signature))
        .map_err(|_| bad())?;
    crate::decode(&body).map_err(|e| SyncError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    fn answer(sync: Uuid) -> SyncAnswer {
        SyncAnswer {
            sync,
            at_ms: 1_800_000_000_000,
            license: Some("# lmbus license …".into()),
            refused: None,
        }
    }

    #[test]
    fn messages_round_trip() {
        let request = SyncRequest {
            sync: Uuid::new_v4(),
            license: Uuid::new_v4(),
            cluster: "acme".into(),
            installation: Uuid::new_v4(),
            summary: Some(UsageSummary {
                context: "production".into(),
                period_start_ms: 1,
                period_end_ms: 3,
                counted_from_ms: 2,
                total: SeatUsage {
                    peak: 4,
                    average: 2.5,
                },
                by_type: [(
                    "inbound".to_owned(),
                    SeatUsage {
                        peak: 4,
                        average: 2.5,
                    },
                )]
                .into(),
                slaves_connected: 2,
                rejections: [("aggregate_limit".to_owned(), 3)].into(),
                events: crate::Events {
                    slave_connects: 2,
                    restricted_after_grace: 1,
                    ..Default::default()
                },
                events_counted: true,
            }),
        };
        assert_eq!(
            decode::<SyncRequest>(&encode(&request).unwrap()).unwrap(),
            request
        );
        let signed =
            sign_sync_answer(&answer(Uuid::nil()), &VendorKey::from_bytes(&[1; 32])).unwrap();
        assert_eq!(
            decode::<SignedSyncAnswer>(&encode(&signed).unwrap()).unwrap(),
            signed
        );
        for reply in [
            SyncNowReply::Synced {
                message: "m".into(),
            },
            SyncNowReply::Error {
                message: "e".into(),
            },
        ] {
            assert_eq!(
                decode::<SyncNowReply>(&encode(&reply).unwrap()).unwrap(),
                reply
            );
        }
        let import = SyncImportRequest {
            answer: signed.clone(),
            operator: "op".into(),
        };
        assert_eq!(
            decode::<SyncImportRequest>(&encode(&import).unwrap()).unwrap(),
            import
        );
        let export = SyncExportReply::Exported {
            request: Box::new(request.clone()),
        };
        assert_eq!(
            decode::<SyncExportReply>(&encode(&export).unwrap()).unwrap(),
            export
        );
        let now = SyncNowRequest {
            operator: "op".into(),
        };
        assert_eq!(
            decode::<SyncNowRequest>(&encode(&now).unwrap()).unwrap(),
            now
        );
    }

    /// A signed answer verifies for its own sync only; one changed byte of its body, or
    /// another key, is refused.
    #[test]
    fn only_the_vendors_answer_to_this_sync_is_taken() {
        let vendor = VendorKey::from_bytes(&[1; 32]);
        let sync = Uuid::new_v4();
        let signed = sign_sync_answer(&answer(sync), &vendor).unwrap();
        let trusted = vendor.verifying_key();
        assert_eq!(
            verify_sync_answer(&signed, &trusted, sync),
            Ok(answer(sync))
        );
        assert!(matches!(
            verify_sync_answer(&signed, &trusted, Uuid::new_v4()),
            Err(SyncError::OtherSync { .. })
        ));
        let mut body = B64.decode(&signed.body).unwrap();
        let last = body.len() - 1;
        body[last] ^= 1;
        let tampered = SignedSyncAnswer {
            body: B64.encode(&body),
            ..signed.clone()
        };
        assert!(matches!(
            verify_sync_answer(&tampered, &trusted, sync),
            Err(SyncError::BadSignature { .. })
        ));
        let other = sign_sync_answer(&answer(sync), &VendorKey::from_bytes(&[2; 32])).unwrap();
        let err = verify_sync_answer(&other, &trusted, sync).unwrap_err();
        assert!(
            err.to_string().contains("not signed by the vendor key"),
            "{err}"
        );
    }
}
