//! What the agent tells its host: the [`Outcome`] of a registration and the
//! [`AgentEvent`]s it broadcasts (logouts, connection changes, switches, restriction).

use lmbus_schemas::RejectReason;
use serde::{Deserialize, Serialize};

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Approved {
        already_held: bool,
    },
    Rejected {
        reason: RejectReason,
        detail: String,
    },
}

impl Outcome {
    pub fn is_approved(&self) -> bool {
        matches!(self, Outcome::Approved { .. })
    }
}

/// Things the host application should know about without asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The agent does not (or no longer) hold a seat: log it out of the application.
    LoggedOut(LoggedOut),
    /// A master accepted this slave (`master` is `primary`, `secondary` or `backup`).
    Connected { master: String, broker_id: String },
    /// A master stopped answering.
    Disconnected { master: String, detail: String },
    /// New registrations now go to this master (`primary`, `secondary` or `backup`).
    Switched { master: String, reason: String },
    /// No master answered for the whole grace period: usage is restricted (and with the
    /// `logout-all` policy, `logged_out` agents were logged out).
    Restricted { logged_out: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedOut {
    pub agent_id: String,
    pub agent_type: String,
    pub reason: RejectReason,
    pub detail: String,
}
