//! The bound on every wait in a test, and waiting for a condition within it.

use std::time::{Duration, Instant};

use anyhow::bail;

/// Bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

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
