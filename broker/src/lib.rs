//! The lmbus master broker.
//!
//! [`engine`] holds every admission decision as a pure state machine; [`runtime`] is the
//! thin NATS task around it; [`config`] is the [`BrokerConfig`] and its checks. `main.rs`
//! parses the command line, resolves flags, environment and config file into a
//! `BrokerConfig`, and calls [`run`].

pub mod alert_log;
pub mod bucket;
pub mod config;
pub mod election;
pub mod engine;
pub mod intake;
pub mod jetstream;
pub mod ledger;
pub mod metrics;
pub mod pipeline;
pub mod replicas;
pub mod report;
pub mod runtime;
pub mod snapshot;

pub use config::{BrokerConfig, load_master_license, load_vendor_key};
pub use runtime::run;
