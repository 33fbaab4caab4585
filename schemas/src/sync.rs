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
    /// The request signed with the installation's own key ([`sign_sync_request`]); `None`
    /// from an older broker.
    #[serde(default)]
    pub signed: Option<SignedSyncRequest>,
}

/// What the installation signs: the request's identity and its summary, encoded once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequestBody {
    pub sync: Uuid,
    pub license: Uuid,
    pub installation: Uuid,
    pub cluster: String,
    pub summary: Option<UsageSummary>,
}

/// A [`SyncRequestBody`] as encoded bytes (base64), the installation's public key (base64,
/// Ed25519) and its signature over those bytes (base64). The vendor binds the key to the
/// installation at its first signed sync (trust on first use) and checks it from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSyncRequest {
    pub key: String,
    pub body: String,
    pub signature: String,
}

/// Why a signed sync request is not the installation's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestSignatureError {
    #[error("the request's signature part is malformed: {0}")]
    Malformed(String),
    #[error("the request is not signed by the key it names, or it was modified")]
    BadSignature,
    #[error(
        "the signed part names another sync, license, installation or cluster than the request"
    )]
    Mismatch,
}

/// The installation's key from the 32-byte seed its ledger holds (base64).
pub fn installation_key(seed_b64: &str) -> Option<ed25519_dalek::SigningKey> {
    let seed: [u8; 32] = B64.decode(seed_b64).ok()?.try_into().ok()?;
    Some(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// A new installation key's seed, base64 (drawn from `random`, 32 bytes).
pub fn new_installation_seed(random: [u8; 32]) -> String {
    B64.encode(random)
}

/// The installation signs `request` (its identity and summary, as encoded bytes).
pub fn sign_sync_request(
    request: &mut SyncRequest,
    key: &ed25519_dalek::SigningKey,
) -> Result<(), crate::EncodeError> {
    let body = crate::encode(&SyncRequestBody {
        sync: request.sync,
        license: request.license,
        installation: request.installation,
        cluster: request.cluster.clone(),
        summary: request.summary.clone(),
    })?;
    request.signed = Some(SignedSyncRequest {
        key: B64.encode(key.verifying_key().to_bytes()),
        body: B64.encode(&body),
        signature: B64.encode(key.sign(&body).to_bytes()),
    });
    Ok(())
}

/// The vendor checks a signed request: the signature over the bytes received with the key
/// named, and that the signed part is this request's. Returns the key (base64) and the
/// signed body, whose summary is the one to keep; `None` for an unsigned request.
pub fn open_sync_request(
    request: &SyncRequest,
) -> Result<Option<(String, SyncRequestBody)>, RequestSignatureError> {
    let Some(signed) = &request.signed else {
        return Ok(None);
    };
    let malformed = |what: &str| RequestSignatureError::Malformed(what.to_owned());
    let key: [u8; 32] = B64
        .decode(&signed.key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| malformed("the key is not 32 bytes of base64"))?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| malformed("the key is not a key"))?;
    let body = B64
        .decode(&signed.body)
        .map_err(|_| malformed("the body is not base64"))?;
    let signature: [u8; 64] = B64
        .decode(&signed.signature)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| malformed("the signature is not 64 bytes of base64"))?;
    key.verify(&body, &Signature::from_bytes(&signature))
        .map_err(|_| RequestSignatureError::BadSignature)?;
    let body: SyncRequestBody =
        crate::decode(&body).map_err(|e| RequestSignatureError::Malformed(e.to_string()))?;
    if (body.sync, body.license, body.installation, &body.cluster)
        != (
            request.sync,
            request.license,
            request.installation,
            &request.cluster,
        )
    {
        return Err(RequestSignatureError::Mismatch);
    }
    Ok(Some((signed.key.clone(), body)))
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
            signed: None,
        };
        assert_eq!(
            decode::<SyncRequest>(&encode(&request).unwrap()).unwrap(),
            request
        );
        // Signed by the installation: it opens with its key and summary, also after a
        // round trip through JSON (the air-gapped file); any change breaks it.
        let key = installation_key(&new_installation_seed([7; 32])).unwrap();
        let mut signed_request = request.clone();
        sign_sync_request(&mut signed_request, &key).unwrap();
        let json: SyncRequest =
            serde_json::from_str(&serde_json::to_string(&signed_request).unwrap()).unwrap();
        let (opened_key, body) = open_sync_request(&json).unwrap().unwrap();
        assert_eq!(opened_key, B64.encode(key.verifying_key().to_bytes()));
        assert_eq!(body.summary, request.summary);
        assert_eq!(open_sync_request(&request).unwrap(), None);
        let mut other = signed_request.clone();
        other.installation = Uuid::new_v4();
        assert_eq!(
            open_sync_request(&other),
            Err(RequestSignatureError::Mismatch)
        );
        let mut forged = signed_request.clone();
        if let Some(s) = forged.signed.as_mut() {
            // Another key names itself but the signature is the installation's.
            s.key = B64.encode(
                installation_key(&new_installation_seed([8; 32]))
                    .unwrap()
                    .verifying_key()
                    .to_bytes(),
            );
        }
        assert_eq!(
            open_sync_request(&forged),
            Err(RequestSignatureError::BadSignature)
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
