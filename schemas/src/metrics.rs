//! The Prometheus text both the broker and the slave serve: one latency histogram with one
//! bucket layout, its series and `# HELP`/`# TYPE` lines, label escaping, `lmbus_build_info`
//! and the standard `process_*` metrics read from Linux's `/proc`. Metric names are a
//! contract with dashboards and alert rules, like the wire format, so they are built here
//! once, following Prometheus' naming rules: `_total` only on counters, units as suffixes
//! in base units (`_seconds`, `_bytes`), plural nouns for what is counted. Pure: atomics
//! and strings, no IO (the caller reads `/proc` and hands the text in).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of every lmbus latency histogram, in seconds: from half a millisecond (a
/// decision on a quiet machine) to five seconds (a request that rode through a failover).
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds of the histograms of decisions taken in memory (a slave's admissions from
/// its allotted block), in seconds: from a microsecond to a tenth of a second, with 20 µs
/// (the target for a local decision's 99th percentile) a bound of its own.
pub const DECISION_BUCKETS: [f64; 12] = [
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_02,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.01,
    0.1,
];

/// How many shards a [`Histogram`] or [`Counter`] spreads its observations over, each on
/// cache lines of its own, chosen by the observing thread: threads that observe at once (a
/// host calling one slave's library from several) do not pass one cache line between their
/// cores at every observation. Readers sum the shards.
const SHARDS: usize = 8;

/// The most bounds a [`Histogram`] takes.
const MAX_BOUNDS: usize = 16;

/// The shard of the calling thread: threads take the shards in turn, once each.
fn shard_index() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// One shard of a histogram: its buckets (not cumulative), count and sum, on lines of its
/// own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct HistogramShard {
    buckets: [AtomicU64; MAX_BOUNDS],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A latency histogram that threads observe without a lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    shards: Box<[HistogramShard]>,
}

impl Default for Histogram {
    /// With [`LATENCY_BUCKETS`].
    fn default() -> Self {
        Self::with_bounds(&LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// With these upper bounds (seconds, ascending), such as [`DECISION_BUCKETS`]; at most
    /// 16 of them (more is a programming error: the bounds are constants).
    pub fn with_bounds(bounds: &'static [f64]) -> Self {
        assert!(
            bounds.len() <= MAX_BOUNDS,
            "a histogram takes at most {MAX_BOUNDS} bounds"
        );
        Self {
            bounds,
            shards: (0..SHARDS).map(|_| HistogramShard::default()).collect(),
        }
    }

    pub fn observe(&self, took: Duration) {
        let shard = &self.shards[shard_index()];
        let secs = took.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            shard.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        shard.count.fetch_add(1, Ordering::Relaxed);
        shard.sum_nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Observations within bound `i` and above the one before, over all shards.
    fn bucket(&self, i: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s.buckets[i].load(Ordering::Relaxed))
            .sum()
    }

    /// The smallest bound that at least `q` (0 to 1) of the observations are within: the
    /// `q` quantile, rounded up to a bound (`None`: no observations, or more than `1 - q`
    /// of them beyond the largest bound).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.bucket(i);
            if cumulative as f64 >= q * count as f64 {
                return Some(*bound);
            }
        }
        None
    }

    /// How many observations it holds.
    pub fn count(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.count.load(Ordering::Relaxed))
            .sum()
    }

    /// The sum of the observations, in nanoseconds.
    fn sum_nanos(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.sum_nanos.load(Ordering::Relaxed))
            .fold(0, u64::saturating_add)
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
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.bucket(i);
            let _ = writeln!(
                text,
                "{name}_bucket{{{before_le}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let _ = writeln!(
            text,
            "{name}_bucket{{{before_le}le=\"+Inf\"}} {count}\n{name}_sum{braces} {}\n{name}_count{braces} {count}",
            self.sum_nanos() as f64 / 1e9
        );
    }
}

/// A counter that threads add to without a lock, sharded like [`Histogram`].
#[derive(Debug)]
pub struct Counter {
    shards: Box<[CounterShard]>,
}

/// One shard of a [`Counter`], on lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct CounterShard(AtomicU64);

impl Default for Counter {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| CounterShard::default()).collect(),
        }
    }
}

impl Counter {
    pub fn add(&self, n: u64) {
        self.shards[shard_index()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The total over all shards.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::saturating_add)
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

/// `lmbus_build_info{version,commit,build_date}`, always 1: which lmbus build a process
/// runs (join it to other series with `* on(instance) group_left(version)`).
pub fn build_info(text: &mut String, version: &str, commit: &str, build_date: &str) {
    let _ = writeln!(
        text,
        "# HELP lmbus_build_info The lmbus build this process runs (version, git commit, build date); always 1.\n\
         # TYPE lmbus_build_info gauge\n\
         lmbus_build_info{{version=\"{}\",commit=\"{}\",build_date=\"{}\"}} 1",
        escape_label(version),
        escape_label(commit),
        escape_label(build_date)
    );
}

/// Clock ticks per second of the CPU times in `/proc/<pid>/stat`: the kernel's `USER_HZ`,
/// which is 100 on every Linux architecture's user ABI (Prometheus' own procfs reader
/// assumes the same rather than asking `sysconf`).
const USER_HZ: f64 = 100.0;

/// The standard `process_*` metrics of one process, as Prometheus' client libraries name
/// them, parsed from the text of Linux's `/proc` files. A field that cannot be read is
/// `None` and its metric is left out, so a non-Linux system serves none of them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessSample {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessSample {
    /// Parses `/proc/self/stat` (`stat`), `/proc/self/status` (`status`), `/proc/stat`
    /// (`system_stat`, for the boot time) and `/proc/self/limits` (`limits`); `open_fds` is
    /// the number of entries in `/proc/self/fd`. Any of them may be empty (unreadable).
    pub fn parse(
        stat: &str,
        status: &str,
        system_stat: &str,
        limits: &str,
        open_fds: Option<u64>,
    ) -> Self {
        // The command name (field 2) is in parentheses and may hold spaces or ')': the
        // fields after it are counted from the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // `fields[0]` is field 3 (state): field n is `fields[n - 3]`.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let cpu_seconds = match (field(14), field(15)) {
            (Some(user), Some(system)) => Some((user + system) as f64 / USER_HZ),
            _ => None,
        };
        let boot_time = system_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|t| t.trim().parse::<u64>().ok());
        let start_time_seconds = match (boot_time, field(22)) {
            (Some(boot), Some(ticks)) => Some(boot as f64 + ticks as f64 / USER_HZ),
            _ => None,
        };
        let kib = |key: &str| {
            status.lines().find_map(|l| {
                let value = l.strip_prefix(key)?.trim().strip_suffix("kB")?;
                value.trim().parse::<u64>().ok().map(|k| k * 1024)
            })
        };
        let max_fds = limits.lines().find_map(|l| {
            let soft = l
                .strip_prefix("Max open files")?
                .split_whitespace()
                .next()?;
            soft.parse::<u64>().ok()
        });
        Self {
            cpu_seconds,
            resident_memory_bytes: kib("VmRSS:"),
            virtual_memory_bytes: kib("VmSize:"),
            open_fds,
            max_fds,
            start_time_seconds,
        }
    }

    /// The `process_*` families, each with its `# HELP` and `# TYPE` lines.
    pub fn render(&self, text: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, value: Option<String>| {
            if let Some(value) = value {
                let _ = writeln!(
                    text,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
                );
            }
        };
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.map(|v| v.to_string()),
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_memory_bytes.map(|v| v.to_string()),
        );
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_memory_bytes.map(|v| v.to_string()),
        );
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.map(|v| v.to_string()),
        );
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            self.max_fds.map(|v| v.to_string()),
        );
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds.map(|v| v.to_string()),
        );
    }
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
    fn a_decision_histogram_has_microsecond_buckets_and_a_quantile_bound() {
        let h = Histogram::with_bounds(&DECISION_BUCKETS);
        assert_eq!(h.quantile_bound(0.99), None, "no observations");
        for _ in 0..98 {
            h.observe(Duration::from_nanos(1_500));
        }
        h.observe(Duration::from_micros(15));
        h.observe(Duration::from_millis(2));
        assert_eq!(h.quantile_bound(0.5), Some(0.000_002_5));
        assert_eq!(h.quantile_bound(0.99), Some(0.000_02));
        assert_eq!(h.quantile_bound(1.0), Some(0.01));
        let mut text = String::new();
        h.render(&mut text, "d_seconds", "");
        assert!(
            text.contains("d_seconds_bucket{le=\"0.00002\"} 99\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{le=\"0.000001\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("d_seconds_sum 0.002162\n"), "{text}");
    }

    /// Threads observe into shards of their own; readers see every observation, in its
    /// bucket, with the sum.
    #[test]
    fn observations_from_many_threads_are_all_counted() {
        let h = Histogram::with_bounds(&DECISION_BUCKETS);
        let c = Counter::default();
        // More threads than shards: some share one.
        std::thread::scope(|scope| {
            for t in 0..(2 * SHARDS as u64 + 1) {
                let (h, c) = (&h, &c);
                scope.spawn(move || {
                    for _ in 0..100 {
                        h.observe(Duration::from_micros(3));
                        c.add(t + 1);
                    }
                });
            }
        });
        let threads = 2 * SHARDS as u64 + 1;
        assert_eq!(threads, 17, "the sum below is for 17 threads");
        assert_eq!(h.count(), 100 * threads);
        assert_eq!(c.get(), 100 * threads * (threads + 1) / 2);
        assert_eq!(h.quantile_bound(1.0), Some(0.000_005));
        let mut text = String::new();
        h.render(&mut text, "x", "");
        assert!(
            text.contains(&format!("x_bucket{{le=\"0.000005\"}} {}", 100 * threads)),
            "{text}"
        );
        assert!(text.contains("x_sum 0.0051\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn process_metrics_come_from_proc_text() {
        // A command name with a space and a parenthesis, as the kernel writes it.
        let stat = "4242 (lmbus (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 50 0 0 20 0 3 0 12345 999999 2000 18446744073709551615";
        let status = "Name:\tlmbus\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\n";
        let system_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        let p = ProcessSample::parse(stat, status, system_stat, limits, Some(7));
        assert_eq!(
            p,
            ProcessSample {
                cpu_seconds: Some(3.0),
                resident_memory_bytes: Some(2048 * 1024),
                virtual_memory_bytes: Some(123_456 * 1024),
                open_fds: Some(7),
                max_fds: Some(1024),
                start_time_seconds: Some(1_700_000_123.45),
            }
        );
        let mut text = String::new();
        p.render(&mut text);
        assert!(
            text.contains(
                "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\n"
            )
        );
        assert!(text.contains("\nprocess_resident_memory_bytes 2097152\n"));
        assert!(text.contains("\nprocess_start_time_seconds 1700000123.45\n"));
    }

    #[test]
    fn unreadable_proc_files_leave_the_metrics_out() {
        let p = ProcessSample::parse("", "", "", "", None);
        assert_eq!(p, ProcessSample::default());
        let mut text = String::new();
        p.render(&mut text);
        assert!(text.is_empty(), "{text}");
    }

    #[test]
    fn build_info_names_the_version() {
        let mut text = String::new();
        build_info(&mut text, "1.2.3", "0123456789ab", "2026-11-27");
        assert!(
            text.ends_with(
                "\nlmbus_build_info{version=\"1.2.3\",commit=\"0123456789ab\",build_date=\"2026-11-27\"} 1\n"
            ),
            "{text}"
        );
    }
}
