//! Prometheus metrics of one broker replica, served as text on `GET /metrics` when
//! `--metrics ADDR` is given.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `lmbus_registrations_total{outcome,reason}` | counter | registrations decided by this replica as leader (`reason` empty when approved) |
//! | `lmbus_unregistrations_total` | counter | unregistrations handled as leader |
//! | `lmbus_decision_seconds` | histogram | from a request's arrival to its reply (ledger append included), registrations and unregistrations |
//! | `lmbus_ledger_append_seconds` | histogram | from sending a ledger append to its acknowledgement (leader only; a batch of decisions is one append) |
//! | `lmbus_seats_in_use{agent_type}` / `lmbus_seats_in_use_total` | gauge | seats held, leader only, refreshed every tick |
//! | `lmbus_seat_limit{agent_type}` / `lmbus_seat_limit_total` | gauge | the master license's limits |
//! | `lmbus_slaves_connected` / `lmbus_slaves_known` | gauge | slaves with a live session / in the table, leader only |
//! | `lmbus_leader` | gauge | 1 while this replica leads |
//! | `lmbus_ledger_applied_sequence` | gauge | the last ledger record this replica applied |
//! | `lmbus_ledger_lag_records` | gauge | records in the ledger not applied yet (read from the stream at scrape time) |
//! | `lmbus_alerts_total{kind,severity}` | counter | alerts this replica published (`bad_message` counts hostile input, `registration_rejected` rate limits and replays) |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use lmbus_schemas::metrics::{Histogram, escape_label, histogram_header};

use crate::ledger::Ledger;

/// What the leader loop refreshes every tick.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub seats_by_type: BTreeMap<String, u32>,
    pub seats_total: u32,
    pub slaves_connected: u32,
    pub slaves_known: u32,
}

/// Shared by the runtime (which counts) and the HTTP handler (which renders).
#[derive(Debug, Default)]
pub struct Metrics {
    registrations: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    unregistrations: AtomicU64,
    latency: Histogram,
    appends: Histogram,
    alerts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    gauges: Mutex<Option<Gauges>>,
    limits: Mutex<(u32, BTreeMap<String, u32>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    pub fn new(total_limit: u32, type_limits: BTreeMap<String, u32>) -> Arc<Self> {
        let m = Self::default();
        *lock(&m.limits) = (total_limit, type_limits);
        Arc::new(m)
    }

    /// A registration decided (`reason` is `None` when approved), with its latency.
    pub fn registration(&self, reason: Option<&'static str>, took: Duration) {
        let key = match reason {
            None => ("approved", ""),
            Some(r) => ("rejected", r),
        };
        *lock(&self.registrations).entry(key).or_insert(0) += 1;
        self.latency.observe(took);
    }

    pub fn unregistration(&self, took: Duration) {
        self.unregistrations.fetch_add(1, Ordering::Relaxed);
        self.latency.observe(took);
    }

    /// A ledger append acknowledged, sent `took` earlier.
    pub fn ledger_append(&self, took: Duration) {
        self.appends.observe(took);
    }

    pub fn alert(&self, kind: &'static str, severity: &'static str) {
        *lock(&self.alerts).entry((kind, severity)).or_insert(0) += 1;
    }

    /// Leading: the seat gauges are exported. Not leading: they are withdrawn (a
    /// standby's view of seats is the ledger's, exported by the leader).
    pub fn set_gauges(&self, gauges: Option<Gauges>) {
        *lock(&self.gauges) = gauges;
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, applied: u64, ledger_last: Option<u64>) -> String {
        let mut text = String::from(
            "# HELP lmbus_registrations_total Registrations decided by this replica as leader, by outcome and reject reason.\n\
             # TYPE lmbus_registrations_total counter\n",
        );
        let registrations = lock(&self.registrations).clone();
        if registrations.is_empty() {
            let _ = writeln!(
                text,
                "lmbus_registrations_total{{outcome=\"approved\",reason=\"\"}} 0"
            );
        }
        for ((outcome, reason), n) in registrations {
            let _ = writeln!(
                text,
                "lmbus_registrations_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            text,
            "# HELP lmbus_unregistrations_total Unregistrations handled by this replica as leader.\n\
             # TYPE lmbus_unregistrations_total counter\n\
             lmbus_unregistrations_total {}",
            self.unregistrations.load(Ordering::Relaxed)
        );
        for (histogram, name, help) in [
            (
                &self.latency,
                "lmbus_decision_seconds",
                "From a request's arrival to its reply, ledger append included.",
            ),
            (
                &self.appends,
                "lmbus_ledger_append_seconds",
                "From sending a ledger append to its acknowledgement, leader only.",
            ),
        ] {
            histogram_header(&mut text, name, help);
            histogram.render(&mut text, name, "");
        }
        let (total_limit, type_limits) = lock(&self.limits).clone();
        let _ = writeln!(
            text,
            "# HELP lmbus_seat_limit_total The master license's total agent limit.\n\
             # TYPE lmbus_seat_limit_total gauge\n\
             lmbus_seat_limit_total {total_limit}\n\
             # HELP lmbus_seat_limit The master license's limit per agent type.\n\
             # TYPE lmbus_seat_limit gauge"
        );
        for (t, n) in &type_limits {
            let _ = writeln!(
                text,
                "lmbus_seat_limit{{agent_type=\"{}\"}} {n}",
                escape_label(t)
            );
        }
        // The gauges are set exactly while leading.
        let gauges = lock(&self.gauges).clone();
        let _ = writeln!(
            text,
            "# HELP lmbus_leader 1 while this replica leads its cluster.\n\
             # TYPE lmbus_leader gauge\n\
             lmbus_leader {}",
            u8::from(gauges.is_some())
        );
        if let Some(g) = gauges {
            let _ = writeln!(
                text,
                "# HELP lmbus_seats_in_use_total Seats held across all slaves.\n\
                 # TYPE lmbus_seats_in_use_total gauge\n\
                 lmbus_seats_in_use_total {}\n\
                 # HELP lmbus_seats_in_use Seats held, by agent type.\n\
                 # TYPE lmbus_seats_in_use gauge",
                g.seats_total
            );
            let mut by_type = g.seats_by_type.clone();
            for t in type_limits.keys() {
                by_type.entry(t.clone()).or_insert(0);
            }
            for (t, n) in by_type {
                let _ = writeln!(
                    text,
                    "lmbus_seats_in_use{{agent_type=\"{}\"}} {n}",
                    escape_label(&t)
                );
            }
            let _ = writeln!(
                text,
                "# HELP lmbus_slaves_connected Slaves with a live session.\n\
                 # TYPE lmbus_slaves_connected gauge\n\
                 lmbus_slaves_connected {}\n\
                 # HELP lmbus_slaves_known Slaves in the master's table, connected or not.\n\
                 # TYPE lmbus_slaves_known gauge\n\
                 lmbus_slaves_known {}",
                g.slaves_connected, g.slaves_known
            );
        }
        let _ = writeln!(
            text,
            "# HELP lmbus_ledger_applied_sequence The last ledger record this replica applied or wrote.\n\
             # TYPE lmbus_ledger_applied_sequence gauge\n\
             lmbus_ledger_applied_sequence {applied}"
        );
        if let Some(last) = ledger_last {
            let _ = writeln!(
                text,
                "# HELP lmbus_ledger_lag_records Ledger records this replica has not applied yet.\n\
                 # TYPE lmbus_ledger_lag_records gauge\n\
                 lmbus_ledger_lag_records {}",
                last.saturating_sub(applied)
            );
        }
        let _ = writeln!(
            text,
            "# HELP lmbus_alerts_total Alerts this replica published, by kind and severity.\n\
             # TYPE lmbus_alerts_total counter"
        );
        for ((kind, severity), n) in lock(&self.alerts).iter() {
            let _ = writeln!(
                text,
                "lmbus_alerts_total{{kind=\"{kind}\",severity=\"{severity}\"}} {n}"
            );
        }
        text
    }
}

#[derive(Clone)]
struct Served {
    metrics: Arc<Metrics>,
    applied: Arc<AtomicU64>,
    ledger: Ledger,
}

async fn scrape(State(s): State<Served>) -> impl IntoResponse {
    // The stream's end, for the lag; a scrape never waits long on NATS.
    let last = tokio::time::timeout(Duration::from_secs(2), s.ledger.last_sequence())
        .await
        .ok()
        .and_then(Result::ok);
    let body = s.metrics.render(s.applied.load(Ordering::Relaxed), last);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Binds `addr` and serves `GET /metrics` until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    applied: Arc<AtomicU64>,
    ledger: Ledger,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Served {
            metrics,
            applied,
            ledger,
        });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::new(10, BTreeMap::from([("inbound".to_owned(), 4)]));
        m.registration(None, Duration::from_micros(300));
        m.registration(None, Duration::from_millis(3));
        m.registration(Some("aggregate_limit"), Duration::from_millis(30));
        m.unregistration(Duration::from_micros(100));
        m.ledger_append(Duration::from_micros(400));
        m.ledger_append(Duration::from_millis(2));
        m.alert("registration_rejected", "warning");
        m.set_gauges(Some(Gauges {
            seats_by_type: BTreeMap::from([("inbound".to_owned(), 2)]),
            seats_total: 2,
            slaves_connected: 1,
            slaves_known: 1,
        }));
        let text = m.render(7, Some(9));
        for line in [
            "lmbus_registrations_total{outcome=\"approved\",reason=\"\"} 2",
            "lmbus_registrations_total{outcome=\"rejected\",reason=\"aggregate_limit\"} 1",
            "lmbus_unregistrations_total 1",
            "lmbus_decision_seconds_bucket{le=\"0.0005\"} 2",
            "lmbus_decision_seconds_bucket{le=\"0.005\"} 3",
            "lmbus_decision_seconds_bucket{le=\"+Inf\"} 4",
            "lmbus_decision_seconds_count 4",
            "lmbus_ledger_append_seconds_bucket{le=\"0.0005\"} 1",
            "lmbus_ledger_append_seconds_bucket{le=\"0.0025\"} 2",
            "lmbus_ledger_append_seconds_sum 0.0024",
            "lmbus_ledger_append_seconds_count 2",
            "lmbus_seats_in_use{agent_type=\"inbound\"} 2",
            "lmbus_seat_limit{agent_type=\"inbound\"} 4",
            "lmbus_leader 1",
            "lmbus_ledger_lag_records 2",
            "lmbus_alerts_total{kind=\"registration_rejected\",severity=\"warning\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
        m.set_gauges(None);
        let text = m.render(9, None);
        assert!(text.contains("lmbus_leader 0"));
        assert!(!text.contains("lmbus_seats_in_use"));
    }
}
