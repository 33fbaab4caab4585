//! How numbers and durations are written for people in alerts, logs and errors: "1 seat"
//! and "3 seats", "450 ms", "2.5 s", "2 min 40 s". Log fields that may be absent (a slave
//! id) are left out rather than printed as `None`: see the callers' `Option` fields.

use std::fmt;
use std::time::Duration;

/// `n` and the noun in the form that goes with it: `plural(1, "seat", "seats")` is
/// "1 seat", `plural(3, …)` "3 seats".
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A duration as a person reads it, at the precision that matters at its size: below a
/// second in milliseconds ("450 ms"), below ten seconds to a tenth ("2.5 s"), below two
/// minutes in seconds ("42 s"), below two hours in minutes and seconds ("2 min 40 s"), then
/// in hours and minutes ("3 h 5 min"). Rounded, never truncated to zero ("0 ms" is zero).
pub fn duration(d: Duration) -> String {
    HumanDuration(d).to_string()
}

/// [`duration`] as a `Display` value, for log fields (`took = %HumanDuration(d)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = (self.0.as_micros() + 500) / 1000;
        if ms < 1000 {
            return write!(f, "{ms} ms");
        }
        if ms < 10_000 {
            let tenths = (ms + 50) / 100;
            return match tenths % 10 {
                0 => write!(f, "{} s", tenths / 10),
                t => write!(f, "{}.{t} s", tenths / 10),
            };
        }
        let secs = (ms + 500) / 1000;
        if secs < 120 {
            return write!(f, "{secs} s");
        }
        if secs < 2 * 3600 {
            return match secs % 60 {
                0 => write!(f, "{} min", secs / 60),
                s => write!(f, "{} min {s} s", secs / 60),
            };
        }
        let mins = (secs + 30) / 60;
        match mins % 60 {
            0 => write!(f, "{} h", mins / 60),
            m => write!(f, "{} h {m} min", mins / 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_agree_with_the_count() {
        assert_eq!(plural(0, "seat", "seats"), "0 seats");
        assert_eq!(plural(1, "seat", "seats"), "1 seat");
        assert_eq!(plural(2, "seat", "seats"), "2 seats");
        assert_eq!(plural(1, "agent", "agents"), "1 agent");
    }

    #[test]
    fn durations_read_at_the_precision_of_their_size() {
        let ms = Duration::from_millis;
        for (d, text) in [
            (Duration::ZERO, "0 ms"),
            (Duration::from_micros(400), "0 ms"),
            (Duration::from_micros(600), "1 ms"),
            (ms(450), "450 ms"),
            (ms(999), "999 ms"),
            (ms(1000), "1 s"),
            (ms(2_500), "2.5 s"),
            (ms(3_000), "3 s"),
            (ms(9_960), "10 s"),
            (ms(42_300), "42 s"),
            (ms(119_400), "119 s"),
            (ms(160_198), "2 min 40 s"),
            (ms(180_000), "3 min"),
            (ms(7_199_000), "119 min 59 s"),
            (ms(7_200_000), "2 h"),
            (ms(11_100_000), "3 h 5 min"),
        ] {
            assert_eq!(duration(d), text, "{d:?}");
        }
    }
}
