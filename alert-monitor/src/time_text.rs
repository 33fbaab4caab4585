//! How every monitor view writes a time: UTC to the millisecond, the same in the alert
//! tail, the audit trail and the live view.

use time::OffsetDateTime;
use time::macros::format_description;

/// Formats an alert's Unix-millisecond time as UTC.
pub fn format_time(ms: i64) -> String {
    let fmt =
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| format!("@{ms}ms"))
}
