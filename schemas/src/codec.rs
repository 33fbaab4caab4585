//! The versioned MessagePack envelope every message travels in.
//!
//! On the wire a message is a map `{ "v": <version>, "body": <message> }` written with
//! `rmp_serde::to_vec_named`, so fields are named and a peer tolerates fields it does not
//! know. Decoding first reads only the version, so that a message from a newer protocol is
//! reported as such instead of as garbage.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The envelope version this build writes and the only one it reads.
pub const PROTOCOL_VERSION: u16 = 1;

/// Upper bound on an encoded message. NATS' own default payload limit is 1 MiB; lmbus
/// messages are small, so anything larger is refused before it is parsed.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Why a message could not be encoded. Only a bug can cause this (a map with non-string
/// keys, say), never input from a peer.
#[derive(Debug, thiserror::Error)]
#[error("could not encode message: {0}")]
pub struct EncodeError(String);

/// Why bytes from the network are not a message this build understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload: expected a MessagePack lmbus envelope")]
    Empty,
    #[error("payload of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("payload is not an lmbus envelope: {0}")]
    NotAnEnvelope(String),
    #[error("envelope version {found} is not supported (this build speaks version {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("envelope version {PROTOCOL_VERSION} with an undecodable body: {0}")]
    Malformed(String),
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u16,
    body: &'a T,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u16,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    body: T,
}

/// Encodes `body` in an envelope of the current version.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, EncodeError> {
    rmp_serde::to_vec_named(&EnvelopeOut {
        v: PROTOCOL_VERSION,
        body,
    })
    .map_err(|e| EncodeError(e.to_string()))
}

/// Decodes an envelope and its body. Never panics, whatever the bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let probe: VersionProbe =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::NotAnEnvelope(e.to_string()))?;
    if probe.v != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found: probe.v,
            supported: PROTOCOL_VERSION,
        });
    }
    let envelope: EnvelopeIn<T> =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(envelope.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        n: u32,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct SampleV2 {
        name: String,
        n: u32,
        extra: Vec<u8>,
    }

    #[test]
    fn round_trip() {
        let s = Sample {
            name: "a".into(),
            n: 7,
        };
        assert_eq!(decode::<Sample>(&encode(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let bytes = encode(&SampleV2 {
            name: "a".into(),
            n: 1,
            extra: vec![1, 2],
        })
        .unwrap();
        assert_eq!(
            decode::<Sample>(&bytes).unwrap(),
            Sample {
                name: "a".into(),
                n: 1
            }
        );
    }

    #[test]
    fn unknown_version_is_typed() {
        let bytes = rmp_serde::to_vec_named(&EnvelopeOut { v: 9, body: &1u8 }).unwrap();
        assert_eq!(
            decode::<u8>(&bytes),
            Err(DecodeError::UnsupportedVersion {
                found: 9,
                supported: PROTOCOL_VERSION
            })
        );
    }

    #[test]
    fn garbage_is_typed_not_a_panic() {
        assert_eq!(decode::<Sample>(&[]), Err(DecodeError::Empty));
        assert!(matches!(
            decode::<Sample>(b"hello world"),
            Err(DecodeError::NotAnEnvelope(_))
        ));
        let wrong_body = encode(&42u32).unwrap();
        assert!(matches!(
            decode::<Sample>(&wrong_body),
            Err(DecodeError::Malformed(_))
        ));
        let full = encode(&Sample {
            name: "abc".into(),
            n: 3,
        })
        .unwrap();
        for cut in 1..full.len() {
            assert!(decode::<Sample>(&full[..cut]).is_err(), "cut at {cut}");
        }
        let huge = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode::<Sample>(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
