//! The bound on every wait in a test, and waiting for a condition within it.

use std::time::{Duration, Instant};

use anyhow::bail;

/// Bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

/// Waits (bounded by [`WAIT`]) until `check` returns true.
pub async fn eventually<F, Fut>(what: &str, check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, WAIT, check).await
}

/// Waits until `check` returns true, at most `bound`: for waits on nats-server's own time
/// (a restarted node catching up under load), which is not lmbus's to bound.
pub async fn eventually_within<F, Fut>(
    what: &str,
    bound: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    while !check().await {
        if Instant::now() > deadline {
            bail!("{what}: not true within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
