//! The lmbus master broker.
//!
//! [`engine`] holds every admission decision as a pure state machine; [`runtime`] is the
//! thin NATS task around it; [`config`] is the [`BrokerConfig`] and its checks. `main.rs`
//! parses the command line, resolves flags, environment and config file into a
//! `BrokerConfig`, and calls [`run`].

pub mod alert_log;
mod bucket;
pub mod config;
mod election;
pub mod engine;
pub mod intake;
mod jetstream;
pub mod ledger;
mod metrics;
mod pipeline;
mod replicas;
pub mod report;
mod runtime;
pub mod snapshot;

pub use config::{BrokerConfig, load_master_license, load_vendor_key};
pub use runtime::run;
