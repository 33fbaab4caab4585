//! How every monitor view writes a time (UTC to the millisecond, the same in the alert
//! tail, the audit trail and the live view), and how `--since` reads one.

use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// `--since`: a duration back from now (`1h`, `30m`) or an RFC 3339 time
/// (`2026-11-27T10:00:00Z`), as how long ago that is.
pub fn parse_since(text: &str) -> Result<Duration, String> {
    parse_since_at(text, OffsetDateTime::now_utc())
}

fn parse_since_at(text: &str, now: OffsetDateTime) -> Result<Duration, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return Ok(ago);
    }
    let at = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
        format!(
            "{text:?} is neither a duration (1h, 30m, 2d) nor an RFC 3339 time (2026-11-27T10:00:00Z)"
        )
    })?;
    Duration::try_from(now - at).map_err(|_| format!("{text} is in the future"))
}

/// Formats an alert's Unix-millisecond time as UTC.
pub fn format_time(ms: i64) -> String {
    let fmt =
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| format!("@{ms}ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_or_an_rfc3339_time() {
        let now = OffsetDateTime::parse("2026-11-27T12:00:00Z", &Rfc3339).unwrap();
        assert_eq!(parse_since_at("1h", now), Ok(Duration::from_secs(3600)));
        assert_eq!(
            parse_since_at("2026-11-27T10:00:00Z", now),
            Ok(Duration::from_secs(7200))
        );
        assert_eq!(
            parse_since_at("2026-11-27T11:30:00+01:00", now),
            Ok(Duration::from_secs(5400))
        );
        let future = parse_since_at("2026-11-28T00:00:00Z", now).unwrap_err();
        assert!(future.contains("in the future"), "{future}");
        let bad = parse_since_at("yesterday", now).unwrap_err();
        assert!(bad.contains("RFC 3339"), "{bad}");
    }
}
