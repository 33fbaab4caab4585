//! The integration-test harness, one concept per module, all re-exported here so a test
//! says `use lmbus_tests::*`: `nats` (real `nats-server` processes and clusters on free
//! ports with temp store dirs, killed on drop), `vendor` (a key pair and the licenses it
//! signs), `broker` (an in-process broker), `process` (the built binaries as child
//! processes that tests signal), `observe` (alerts, status, the seat-invariant poller),
//! `fixture` (what most tests start from); `daemon`, `ha` and `catch_up` for the tests and
//! benches that need them. This file keeps the bound on every wait.
//!
//! Nothing here mocks NATS. Every wait is bounded.

pub mod catch_up;
pub mod daemon;
pub mod ha;
pub mod jwt;

mod broker;
mod fixture;
mod nats;
mod observe;
mod process;
mod vendor;

pub use broker::*;
pub use fixture::*;
pub use nats::*;
pub use observe::*;
pub use process::*;
pub use vendor::*;

use std::time::{Duration, Instant};

use anyhow::bail;

/// Bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

/// Sets up `tracing` output for a test run once (`RUST_LOG` controls it; default warn).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Waits (bounded) until `check` returns true.
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        if Instant::now() > deadline {
            bail!("{what}: not true within {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
