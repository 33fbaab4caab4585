//! The lmbus slave agent.
//!
//! [`SlaveAgent`] is the library a Rust host application embeds (`link.rs` is one master
//! connection, primary or secondary; `policy.rs` the pure decisions the agent's IO follows);
//! [`api`] serves the same operations as HTTP/JSON on 127.0.0.1 for host applications in
//! any language; `main.rs` is the `lmbus-slave` daemon and the CLI that calls the local API.

pub mod agent;
pub mod allot;
pub mod api;
mod config;
mod error;
mod events;
mod link;
mod master;
mod metrics;
mod policy;
mod status;

pub use agent::SlaveAgent;
pub use config::{
    GracePolicy, LicenseFile, MasterEndpoint, Restriction, ReturnPolicy, SlaveConfig,
};
pub use error::SlaveError;
pub use events::{AgentEvent, LoggedOut, Outcome};
pub use status::{AgentNotice, MasterView, SlaveMode, SlaveStatusView};
