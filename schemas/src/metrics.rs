//! The Prometheus text both the broker and the slave serve: one latency histogram with one
//! bucket layout, its series and `# HELP`/`# TYPE` lines, and label escaping. Metric names
//! are a contract with dashboards and alert rules, like the wire format, so they are built
//! here once. Pure: atomics and strings, no IO.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of every lmbus latency histogram, in seconds: from half a millisecond (a
/// decision on a quiet machine) to five seconds (a request that rode through a failover).
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A latency histogram that threads observe without a lock.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// How many observations it holds.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Its series (`labels` like `master="primary"`, or empty): cumulative buckets, sum and
    /// count, without the `# HELP`/`# TYPE` lines ([`histogram_header`]).
    pub fn render(&self, text: &mut String, name: &str, labels: &str) {
        let (braces, before_le) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{{{labels}}}"), format!("{labels},"))
        };
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                text,
                "{name}_bucket{{{before_le}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let _ = writeln!(
            text,
            "{name}_bucket{{{before_le}le=\"+Inf\"}} {count}\n{name}_sum{braces} {}\n{name}_count{braces} {count}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}

/// The `# HELP` and `# TYPE` lines of histogram `name`.
pub fn histogram_header(text: &mut String, name: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} histogram");
}

/// A label value as Prometheus text wants it: backslash, double quote and newline escaped.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_labels_go_before_le() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(9));
        let mut text = String::new();
        histogram_header(&mut text, "x_seconds", "Test.");
        h.render(&mut text, "x_seconds", "master=\"primary\"");
        assert!(text.starts_with("# HELP x_seconds Test.\n# TYPE x_seconds histogram\n"));
        assert!(text.contains("x_seconds_bucket{master=\"primary\",le=\"0.0005\"} 1\n"));
        assert!(text.contains("x_seconds_bucket{master=\"primary\",le=\"0.005\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{master=\"primary\",le=\"5\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{master=\"primary\",le=\"+Inf\"} 3\n"));
        assert!(text.contains("x_seconds_count{master=\"primary\"} 3\n"));
        assert!(text.contains("x_seconds_sum{master=\"primary\"} 9.0033\n"));
        let mut bare = String::new();
        h.render(&mut bare, "y", "");
        assert!(bare.contains("y_bucket{le=\"+Inf\"} 3\ny_sum 9.0033\ny_count 3\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
