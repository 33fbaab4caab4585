//! [`SlaveError`]: why the agent could not do what was asked. It sits below every other
//! module of the crate, so a link and the agent report failures in the same type.

use lmbus_schemas::RejectReason;

/// Why the slave agent could not do what was asked (as opposed to a rejection, which is an
/// [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum SlaveError {
    #[error(transparent)]
    License(#[from] lmbus_schemas::LicenseError),
    #[error("{0}")]
    Config(String),
    #[error("cannot connect to NATS at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("the master refused this slave: {reason}: {detail}")]
    Refused {
        reason: RejectReason,
        detail: String,
    },
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// NATS failed: no connection, a request timed out, a subscription closed.
    #[error("NATS error: {0}")]
    Nats(String),
    /// A master answered with something that does not fit the request or does not decode
    /// (a broker of another lmbus version?).
    #[error("unexpected answer from the master: {0}")]
    Protocol(String),
}
