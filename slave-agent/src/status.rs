//! The status snapshot the host, the local API and the metrics read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::LoggedOut;

/// A snapshot for status displays and the local API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaveStatusView {
    pub slave_id: String,
    /// The cluster of the master new registrations go to.
    pub cluster: String,
    /// Whether that master answers.
    pub connected: bool,
    pub broker_id: Option<String>,
    /// `primary` or `secondary`: where new registrations go.
    pub active_master: String,
    /// Every configured master.
    pub masters: Vec<MasterView>,
    pub licensed: bool,
    pub license_id: Option<Uuid>,
    pub local_limit: Option<u32>,
    pub agents: u32,
    pub agents_by_type: BTreeMap<String, u32>,
    pub pending: u32,
    /// Most recent logouts, oldest first.
    pub logged_out: Vec<LoggedOut>,
    pub last_error: Option<String>,
    /// `connected`, `grace` (no master, within the grace period) or `restricted`.
    pub mode: String,
    /// Milliseconds left in the grace period while in `grace`.
    pub grace_left_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterView {
    pub name: String,
    pub cluster: String,
    pub connected: bool,
    pub broker_id: Option<String>,
    /// Seats this master granted.
    pub agents: u32,
}
