//! The lmbus slave agent.
//!
//! [`SlaveAgent`] is the library a Rust host application embeds (`link.rs` is one master
//! connection, primary or secondary); [`api`] serves the same
//! operations as HTTP/JSON on 127.0.0.1 for host applications in any language; `main.rs`
//! is the `lmbus-slave` daemon and the CLI that calls the local API.

pub mod agent;
pub mod api;
mod config;
mod error;
mod events;
mod link;
mod master;
mod metrics;
mod policy;
mod status;

pub use agent::{
    AgentEvent, GracePolicy, LicenseFile, LoggedOut, MasterEndpoint, MasterView, Outcome,
    Restriction, ReturnPolicy, SlaveAgent, SlaveConfig, SlaveError, SlaveMode, SlaveStatusView,
};
