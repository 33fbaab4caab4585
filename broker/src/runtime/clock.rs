//! The clocks the runtime reads on the engine's behalf (the engine reads none: it is given
//! `now` and `today`) and for the times it publishes. Lease and timing checks read
//! `tokio::time::Instant` directly.

use time::{Date, OffsetDateTime};
use tokio::time::Instant;

/// The calendar date, for license expiry.
pub(super) fn today_utc() -> Date {
    OffsetDateTime::now_utc().date()
}

/// Wall-clock milliseconds, for alert times and the usage report.
pub(super) fn unix_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// The monotonic `now` the engine decides with (tokio's, so paused time reaches it).
pub(super) fn now() -> std::time::Instant {
    Instant::now().into_std()
}
