//! Prometheus metrics of one broker replica, served as text on `GET /metrics` when
//! `--metrics ADDR` is given, with `GET /healthz` beside them. README.md's "Metrics" section
//! lists every metric; the names follow Prometheus' rules (`_total` only on counters, units
//! as suffixes in base units).
//!
//! Every replica exports the counters, the license's limits and expiry, `lmbus_leader`, the
//! ledger position, `lmbus_build_info` and the `process_*` metrics. The seat and slave
//! gauges (`lmbus_seats_in_use`, `lmbus_agent_type_seats_in_use`, `lmbus_slaves_*`, the
//! per-slave `lmbus_allot_slave_seats`) are
//! exported only while `lmbus_leader` is 1: a standby's copy of the seats lags the ledger,
//! so it withdraws them rather than serve a second, older answer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use lmbus_schemas::License;
use lmbus_schemas::metrics::{
    Histogram, ProcessSample, build_info, escape_label, histogram_header,
};

use crate::engine::{AllotCounts, TopSlaveSeats};
use crate::ledger::Ledger;

/// Allotment mode's counters: name, help and where the engine counts it.
type AllotCounter = (&'static str, &'static str, fn(&AllotCounts) -> u64);
const ALLOT_COUNTERS: [AllotCounter; 10] = [
    (
        "lmbus_allot_grants_total",
        "Allot answers that grew a slave's block (allotment mode).",
        |c| c.grants,
    ),
    (
        "lmbus_allot_granted_seats_total",
        "Seats added to slaves' blocks.",
        |c| c.seats_granted,
    ),
    (
        "lmbus_allot_partial_grants_total",
        "Allot answers that gave less than the slave asked for (the pool short or nearly exhausted, or its local limit).",
        |c| c.partial_grants,
    ),
    (
        "lmbus_allot_returns_total",
        "Allot requests in which a slave gave free seats of its block back.",
        |c| c.returns,
    ),
    (
        "lmbus_allot_returned_seats_total",
        "Free seats slaves gave back.",
        |c| c.seats_returned,
    ),
    (
        "lmbus_allot_reclaims_total",
        "Silent slaves whose blocks were reclaimed under the timing rule.",
        |c| c.reclaims,
    ),
    (
        "lmbus_allot_reclaimed_seats_total",
        "Free seats of blocks reclaimed from silent slaves.",
        |c| c.seats_reclaimed,
    ),
    (
        "lmbus_allot_waits_total",
        "Registrations told to ask again (no free seat) while seats of slaves' blocks were being given back.",
        |c| c.waits,
    ),
    (
        "lmbus_allot_stranded_refusals_total",
        "Capacity refusals made while free seats sat in the blocks of slaves that did not give them back within 2 refresh intervals (stranded until the reclaim rule).",
        |c| c.stranded_refusals,
    ),
    (
        "lmbus_allot_capacity_moves_untimed_total",
        "Clocks of lmbus_allot_capacity_move_seconds dropped without an observation: no seat came within the horizon (4 refresh intervals), the slave's session ended, or too many clocks ran.",
        |c| c.moves_untimed,
    ),
];

/// Most (slave, agent type) pairs in `lmbus_allot_slave_seats`: the ones with the most
/// seats, so at most twice this many series (used and free) whatever the cluster's size.
pub const SLAVE_SEATS_PAIRS: usize = 100;

/// Allotment counters as exported: the engine's counts since it was built, summed across
/// rebuilds (a replica rebuilds its engine from the ledger, which counts nothing).
#[derive(Debug, Default)]
struct AllotTotals {
    last: AllotCounts,
    totals: [u64; ALLOT_COUNTERS.len()],
}

/// What the leader loop refreshes every tick.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub seats_by_type: BTreeMap<String, u32>,
    pub seats_total: u32,
    pub slaves_connected: u32,
    pub slaves_known: u32,
    /// Free seats allotted to slaves (allotment mode), in total and per agent type.
    pub allotted_by_type: BTreeMap<String, u32>,
    pub allotted_total: u32,
    /// Allotment mode: the (slave, agent type) pairs with the most seats, at most
    /// [`SLAVE_SEATS_PAIRS`]; `None` in strict mode.
    pub slave_seats: Option<TopSlaveSeats>,
    /// Past the master license's offline limit (no new seats until a vendor sync); `None`
    /// when the license has none.
    pub sync_overdue: Option<bool>,
}

/// The master license in force, as its gauges show it.
#[derive(Debug, Default)]
struct LicenseGauges {
    /// The license id and context, for `lmbus_license_info` (empty before any license).
    id: String,
    context: &'static str,
    not_for_production: bool,
    total_limit: u32,
    type_limits: BTreeMap<String, u32>,
    /// When the license stops being valid: 00:00 UTC after its last valid day.
    expiry_timestamp_seconds: i64,
    /// When software maintenance ends: 00:00 UTC after its last day.
    maintenance_expiry_timestamp_seconds: i64,
}

impl LicenseGauges {
    fn of(license: &License) -> Self {
        // `expires` (and `maintenance_expires`) is the last valid day, inclusive.
        let end = |last: time::Date| {
            last.next_day()
                .unwrap_or(last)
                .midnight()
                .assume_utc()
                .unix_timestamp()
        };
        Self {
            id: license.id.to_string(),
            context: license.context.token(),
            not_for_production: license.context.not_for_production(),
            total_limit: license.limits.total.unwrap_or(0),
            type_limits: license.limits.agent_types.clone(),
            expiry_timestamp_seconds: end(license.expires),
            maintenance_expiry_timestamp_seconds: end(license.maintenance_expires),
        }
    }
}

/// Shared by the runtime (which counts) and the HTTP handler (which renders).
#[derive(Debug, Default)]
pub struct Metrics {
    registrations: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    unregistrations: AtomicU64,
    latency: Histogram,
    appends: Histogram,
    /// Allotment mode: from telling holders to give seats back to the grant to the slave
    /// that needed them (the engine's `moves`).
    capacity_moves: Histogram,
    alerts: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    gauges: Mutex<Option<Gauges>>,
    allot: Mutex<AllotTotals>,
    /// Drained by an operator (`admin drain`): up, but it will not lead.
    drained: std::sync::atomic::AtomicBool,
    /// The master license in force; compared (not cloned) on every ledger record.
    license: Mutex<Option<License>>,
    /// When the master license's offline limit ends, Unix milliseconds (0: it has none);
    /// set from the ledger after every record, like the license.
    sync_deadline_ms: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    pub fn new(license: &License) -> Arc<Self> {
        let m = Self::default();
        m.set_license(license);
        Arc::new(m)
    }

    /// Where the offline limit ends (Unix milliseconds), after a ledger record; `None`: the
    /// license has no offline limit.
    pub fn set_sync_deadline(&self, deadline_ms: Option<u64>) {
        self.sync_deadline_ms
            .store(deadline_ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// The id of the master license in force on this replica (what its beats say).
    pub fn license_id(&self) -> Option<uuid::Uuid> {
        lock(&self.license).as_ref().map(|l| l.id)
    }

    /// The master license in force changed (start, a snapshot, a reload in the ledger).
    pub fn set_license(&self, license: &License) {
        let mut current = lock(&self.license);
        if current.as_ref() != Some(license) {
            *current = Some(license.clone());
        }
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

    /// The engine's allotment counts, read at every tick while leading. When any count is
    /// lower than the last read, they come from a rebuilt engine and are added whole (what
    /// the old engine counted after the last tick is lost: at most one tick's worth).
    pub fn count_allot(&self, now: AllotCounts) {
        let mut a = lock(&self.allot);
        let AllotTotals { last, totals } = &mut *a;
        let rebuilt = ALLOT_COUNTERS
            .iter()
            .any(|(_, _, get)| get(&now) < get(last));
        for (total, (_, _, get)) in totals.iter_mut().zip(ALLOT_COUNTERS) {
            *total += if rebuilt {
                get(&now)
            } else {
                get(&now) - get(last)
            };
        }
        *last = now;
    }

    /// Capacity moves the engine timed since the last tick (allotment mode, leading).
    pub fn capacity_moves(&self, took: &[Duration]) {
        for t in took {
            self.capacity_moves.observe(*t);
        }
    }

    pub fn alert(&self, kind: &'static str, severity: &'static str) {
        *lock(&self.alerts).entry((kind, severity)).or_insert(0) += 1;
    }

    /// Leading: the seat gauges are exported. Not leading: they are withdrawn (a
    /// standby's view of seats is the ledger's, exported by the leader).
    pub fn set_gauges(&self, gauges: Option<Gauges>) {
        *lock(&self.gauges) = gauges;
    }

    /// This replica was drained (`true`) or undrained.
    pub fn set_drained(&self, drained: bool) {
        self.drained.store(drained, Ordering::Relaxed);
    }

    /// Whether this replica leads (its seat gauges are set).
    fn leading(&self) -> bool {
        lock(&self.gauges).is_some()
    }

    /// The Prometheus text exposition (format 0.0.4), `process` appended.
    pub fn render(
        &self,
        applied: u64,
        ledger_last: Option<u64>,
        process: &ProcessSample,
    ) -> String {
        let mut text = String::from(
            "# HELP lmbus_registrations_total Registrations decided by this replica as leader, by outcome and (when rejected) reason.\n\
             # TYPE lmbus_registrations_total counter\n",
        );
        let registrations = lock(&self.registrations).clone();
        if registrations.is_empty() {
            text.push_str("lmbus_registrations_total{outcome=\"approved\"} 0\n");
        }
        for ((outcome, reason), n) in registrations {
            let _ = writeln!(
                text,
                "lmbus_registrations_total{{{}}} {n}",
                outcome_labels(outcome, reason)
            );
        }
        let _ = writeln!(
            text,
            "# HELP lmbus_unregistrations_total Unregistrations handled by this replica as leader.\n\
             # TYPE lmbus_unregistrations_total counter\n\
             lmbus_unregistrations_total {}",
            self.unregistrations.load(Ordering::Relaxed)
        );
        let totals = lock(&self.allot).totals;
        for ((name, help, _), n) in ALLOT_COUNTERS.iter().zip(totals) {
            let _ = writeln!(
                text,
                "# HELP {name} {help} Decided by this replica as leader.\n# TYPE {name} counter\n{name} {n}"
            );
        }
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
            (
                &self.capacity_moves,
                "lmbus_allot_capacity_move_seconds",
                "Allotment mode, leader only: from the leader telling slaves to give free seats of their blocks back (ReturnAllotment, ShrinkAllotment) because a slave needed seats of a type, to the next grant of a seat of that type to that slave (its block grows, or a registration of it is approved); one observation per clock, clocks past 4 refresh intervals or of ended sessions are dropped (lmbus_allot_capacity_moves_untimed_total), and a new leader times only the tells it sends.",
            ),
        ] {
            histogram_header(&mut text, name, help);
            histogram.render(&mut text, name, "");
        }
        let license = lock(&self.license)
            .as_ref()
            .map(LicenseGauges::of)
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "# HELP lmbus_seats_limit The master license's aggregate seat limit.\n\
             # TYPE lmbus_seats_limit gauge\n\
             lmbus_seats_limit {}\n\
             # HELP lmbus_agent_type_seats_limit The master license's seat limit per agent type.\n\
             # TYPE lmbus_agent_type_seats_limit gauge",
            license.total_limit
        );
        for (t, n) in &license.type_limits {
            let _ = writeln!(
                text,
                "lmbus_agent_type_seats_limit{{agent_type=\"{}\"}} {n}",
                escape_label(t)
            );
        }
        let _ = writeln!(
            text,
            "# HELP lmbus_license_expiry_timestamp_seconds When the master license stops being valid (00:00 UTC after its last valid day), as a Unix time.\n\
             # TYPE lmbus_license_expiry_timestamp_seconds gauge\n\
             lmbus_license_expiry_timestamp_seconds {}\n\
             # HELP lmbus_license_maintenance_expiry_timestamp_seconds When the master license's software maintenance ends (00:00 UTC after its last day), as a Unix time.\n\
             # TYPE lmbus_license_maintenance_expiry_timestamp_seconds gauge\n\
             lmbus_license_maintenance_expiry_timestamp_seconds {}",
            license.expiry_timestamp_seconds, license.maintenance_expiry_timestamp_seconds
        );
        let sync_deadline_ms = self.sync_deadline_ms.load(Ordering::Relaxed);
        if sync_deadline_ms > 0 {
            let _ = writeln!(
                text,
                "# HELP lmbus_license_sync_deadline_timestamp_seconds When the master license's offline limit ends without a vendor sync (its last sync, or its issue day, plus sync_within_days), as a Unix time; absent when the license has no offline limit.\n\
                 # TYPE lmbus_license_sync_deadline_timestamp_seconds gauge\n\
                 lmbus_license_sync_deadline_timestamp_seconds {}",
                sync_deadline_ms / 1000
            );
        }
        if !license.id.is_empty() {
            let _ = writeln!(
                text,
                "# HELP lmbus_license_info The master license in force: its id and context, and whether what this master serves is not for production use (a development license). Always 1.\n\
                 # TYPE lmbus_license_info gauge\n\
                 lmbus_license_info{{license_id=\"{}\",context=\"{}\",not_for_production=\"{}\"}} 1",
                escape_label(&license.id),
                license.context,
                license.not_for_production
            );
        }
        // The gauges are set exactly while leading.
        let gauges = lock(&self.gauges).clone();
        let _ = writeln!(
            text,
            "# HELP lmbus_leader 1 while this replica leads its cluster; the seat and slave gauges are exported only while it is 1.\n\
             # TYPE lmbus_leader gauge\n\
             lmbus_leader {}\n\
             # HELP lmbus_replica_drained 1 while an operator has drained this replica (admin drain): it is up but will not lead.\n\
             # TYPE lmbus_replica_drained gauge\n\
             lmbus_replica_drained {}",
            u8::from(gauges.is_some()),
            u8::from(self.drained.load(Ordering::Relaxed))
        );
        if let Some(g) = gauges {
            let _ = writeln!(
                text,
                "# HELP lmbus_seats_in_use Seats held across all slaves (leader only).\n\
                 # TYPE lmbus_seats_in_use gauge\n\
                 lmbus_seats_in_use {}\n\
                 # HELP lmbus_agent_type_seats_in_use Seats held, by agent type (leader only).\n\
                 # TYPE lmbus_agent_type_seats_in_use gauge",
                g.seats_total
            );
            let mut by_type = g.seats_by_type.clone();
            for t in license.type_limits.keys() {
                by_type.entry(t.clone()).or_insert(0);
            }
            for (t, n) in by_type {
                let _ = writeln!(
                    text,
                    "lmbus_agent_type_seats_in_use{{agent_type=\"{}\"}} {n}",
                    escape_label(&t)
                );
            }
            let _ = writeln!(
                text,
                "# HELP lmbus_seats_allotted Free seats allotted to slaves, counted against the limits like held seats (allotment mode; leader only).\n\
                 # TYPE lmbus_seats_allotted gauge\n\
                 lmbus_seats_allotted {}\n\
                 # HELP lmbus_agent_type_seats_allotted Free seats allotted to slaves, by agent type (leader only).\n\
                 # TYPE lmbus_agent_type_seats_allotted gauge",
                g.allotted_total
            );
            let mut allotted = g.allotted_by_type.clone();
            for t in license.type_limits.keys() {
                allotted.entry(t.clone()).or_insert(0);
            }
            for (t, n) in allotted {
                let _ = writeln!(
                    text,
                    "lmbus_agent_type_seats_allotted{{agent_type=\"{}\"}} {n}",
                    escape_label(&t)
                );
            }
            if let Some(top) = &g.slave_seats {
                render_slave_seats(&mut text, top);
            }
            let _ = writeln!(
                text,
                "# HELP lmbus_slaves_connected Slaves with a live session (leader only).\n\
                 # TYPE lmbus_slaves_connected gauge\n\
                 lmbus_slaves_connected {}\n\
                 # HELP lmbus_slaves_known Slaves in the master's table, connected or not (leader only).\n\
                 # TYPE lmbus_slaves_known gauge\n\
                 lmbus_slaves_known {}",
                g.slaves_connected, g.slaves_known
            );
            if let Some(overdue) = g.sync_overdue {
                let _ = writeln!(
                    text,
                    "# HELP lmbus_license_sync_overdue 1 while the master license is past its offline limit: registrations are refused sync_overdue until a vendor sync (leader only).\n\
                     # TYPE lmbus_license_sync_overdue gauge\n\
                     lmbus_license_sync_overdue {}",
                    u8::from(overdue)
                );
            }
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
        build_info(
            &mut text,
            lmbus_nats::release::VERSION,
            lmbus_nats::release::COMMIT,
            lmbus_nats::release::BUILD_DATE,
        );
        process.render(&mut text);
        text
    }
}

/// `lmbus_allot_slave_seats` and `lmbus_allot_slave_seats_omitted`. The slave ids and agent
/// types come from the network: escaped (ids and types are checked at the hello and the
/// request, but the text format must not depend on that).
fn render_slave_seats(text: &mut String, top: &TopSlaveSeats) {
    let _ = writeln!(
        text,
        "# HELP lmbus_allot_slave_seats Seats of one slave and agent type in allotment mode: held by its agents (state=\"used\") and free in its block (state=\"free\"); only the {SLAVE_SEATS_PAIRS} (slave, agent type) pairs with the most seats (used plus free; ties by slave id), the rest counted in lmbus_allot_slave_seats_omitted (leader only).\n\
         # TYPE lmbus_allot_slave_seats gauge"
    );
    for p in &top.pairs {
        let (slave, agent_type) = (escape_label(&p.slave), escape_label(&p.agent_type));
        for (state, n) in [("used", p.used), ("free", p.free)] {
            let _ = writeln!(
                text,
                "lmbus_allot_slave_seats{{slave=\"{slave}\",agent_type=\"{agent_type}\",state=\"{state}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        text,
        "# HELP lmbus_allot_slave_seats_omitted (Slave, agent type) pairs holding seats (used or free) left out of lmbus_allot_slave_seats by its bound (allotment mode; leader only).\n\
         # TYPE lmbus_allot_slave_seats_omitted gauge\n\
         lmbus_allot_slave_seats_omitted {}",
        top.omitted
    );
}

/// The labels of a registration counter: a reason only on a rejection (an approval has
/// none, rather than an empty one).
pub(crate) fn outcome_labels(outcome: &str, reason: &str) -> String {
    if reason.is_empty() {
        format!("outcome=\"{outcome}\"")
    } else {
        format!("outcome=\"{outcome}\",reason=\"{}\"", escape_label(reason))
    }
}

/// This process's `process_*` metrics, read from Linux's `/proc` (empty elsewhere).
fn process_sample() -> ProcessSample {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count() as u64);
    ProcessSample::parse(
        &read("/proc/self/stat"),
        &read("/proc/self/status"),
        &read("/proc/stat"),
        &read("/proc/self/limits"),
        open_fds,
    )
}

#[derive(Clone)]
struct Served {
    metrics: Arc<Metrics>,
    /// For `/healthz`: whether this replica is connected to NATS.
    client: async_nats::Client,
    applied: Arc<AtomicU64>,
    ledger: Ledger,
}

async fn scrape(State(s): State<Served>) -> impl IntoResponse {
    // The stream's end, for the lag; a scrape never waits long on NATS.
    let last = tokio::time::timeout(Duration::from_secs(2), s.ledger.last_sequence())
        .await
        .ok()
        .and_then(Result::ok);
    let process = tokio::task::spawn_blocking(process_sample)
        .await
        .unwrap_or_default();
    let body = s
        .metrics
        .render(s.applied.load(Ordering::Relaxed), last, &process);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// `GET /healthz`: 200 while this replica is connected to NATS (it follows the ledger or
/// leads), 503 while it is not. The body says which, and the role.
async fn healthz(State(s): State<Served>) -> impl IntoResponse {
    let role = if s.metrics.leading() {
        "leader"
    } else {
        "standby"
    };
    match s.client.connection_state() {
        async_nats::connection::State::Connected => {
            (StatusCode::OK, format!("ok: {role}, connected to NATS\n"))
        }
        state => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "unhealthy: {role}, NATS connection {}: this replica can neither lead nor follow the ledger until it reconnects\n",
                match state {
                    async_nats::connection::State::Pending => "pending",
                    _ => "lost",
                }
            ),
        ),
    }
}

/// Binds `addr` and serves `GET /metrics` and `GET /healthz` until the returned task is
/// aborted.
pub async fn serve(
    addr: SocketAddr,
    client: async_nats::Client,
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
        .route("/healthz", get(healthz))
        .with_state(Served {
            metrics,
            client,
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

    fn license(total: u32, types: &[(&str, u32)], expires: time::Date) -> License {
        License {
            id: uuid::Uuid::nil(),
            customer: "acme".into(),
            issued: time::macros::date!(2025 - 01 - 01),
            expires,
            maintenance_expires: expires.previous_day().unwrap_or(expires),
            role: lmbus_schemas::Role::Master,
            context: lmbus_schemas::Context::Production,
            sync_within_days: None,
            revision: None,
            backs: None,
            production_cluster: None,
            limits: lmbus_schemas::Limits {
                total: Some(total),
                local: None,
                agent_types: types.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect(),
            },
        }
    }

    /// The allotment counters are the engine's counts summed across engine rebuilds
    /// (counts that go down come from a new engine and are added whole).
    #[test]
    fn allotment_counters_survive_an_engine_rebuilt_from_the_ledger() {
        let m = Metrics::new(&license(10, &[], time::macros::date!(2030 - 06 - 30)));
        let counts = |grants, waits| AllotCounts {
            grants,
            waits,
            ..AllotCounts::default()
        };
        m.count_allot(counts(3, 1));
        m.count_allot(counts(5, 1));
        // Rebuilt: it starts again from nothing.
        m.count_allot(counts(2, 4));
        let text = m.render(0, None, &ProcessSample::default());
        assert!(text.contains("lmbus_allot_grants_total 7\n"), "{text}");
        assert!(text.contains("lmbus_allot_waits_total 5\n"), "{text}");
        assert!(text.contains("# TYPE lmbus_allot_stranded_refusals_total counter\nlmbus_allot_stranded_refusals_total 0\n"), "{text}");
    }

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::new(&license(
            10,
            &[("inbound", 4)],
            time::macros::date!(2030 - 06 - 30),
        ));
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
            allotted_by_type: BTreeMap::from([("inbound".to_owned(), 1)]),
            allotted_total: 1,
            slave_seats: None,
            sync_overdue: Some(true),
        }));
        m.set_sync_deadline(Some(1_909_094_400_123));
        let text = m.render(7, Some(9), &ProcessSample::default());
        for line in [
            "lmbus_registrations_total{outcome=\"approved\"} 2",
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
            "lmbus_seats_in_use 2",
            "lmbus_agent_type_seats_in_use{agent_type=\"inbound\"} 2",
            "lmbus_seats_allotted 1",
            "lmbus_agent_type_seats_allotted{agent_type=\"inbound\"} 1",
            "lmbus_seats_limit 10",
            "lmbus_agent_type_seats_limit{agent_type=\"inbound\"} 4",
            // 2030-07-01T00:00:00Z: the end of the last valid day.
            "lmbus_license_expiry_timestamp_seconds 1909094400",
            // Maintenance to 2030-06-29: ends 2030-06-30T00:00:00Z.
            "lmbus_license_maintenance_expiry_timestamp_seconds 1909008000",
            "lmbus_license_sync_deadline_timestamp_seconds 1909094400",
            "lmbus_license_sync_overdue 1",
            "lmbus_leader 1",
            "lmbus_replica_drained 0",
            "lmbus_ledger_lag_records 2",
            "lmbus_alerts_total{kind=\"registration_rejected\",severity=\"warning\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
        let build = format!(
            "lmbus_build_info{{version=\"{}\",commit=\"{}\",build_date=\"{}\"}} 1",
            lmbus_nats::release::VERSION,
            lmbus_nats::release::COMMIT,
            lmbus_nats::release::BUILD_DATE
        );
        assert!(
            text.lines().any(|l| l == build),
            "no line {build} in\n{text}"
        );
        assert!(
            !text.contains("reason=\"\""),
            "an empty reason label in\n{text}"
        );
        m.set_gauges(None);
        m.set_drained(true);
        let text = m.render(9, None, &ProcessSample::default());
        assert!(text.contains("lmbus_leader 0"));
        assert!(
            text.lines().any(|l| l == "lmbus_replica_drained 1"),
            "{text}"
        );
        assert!(!text.contains("seats_in_use"));
        assert!(!text.contains("lmbus_slaves_"));
        assert!(text.contains("lmbus_seats_limit 10"));
    }

    /// Allotment mode's per-slave gauges come with the other seat gauges (leader only),
    /// label values escaped, with the count of pairs left out; the capacity-move histogram
    /// holds what the engine timed.
    #[test]
    fn renders_the_per_slave_gauges_escaped_and_the_capacity_moves() {
        use crate::engine::SlaveSeats;
        let m = Metrics::new(&license(10, &[], time::macros::date!(2030 - 06 - 30)));
        m.set_gauges(Some(Gauges {
            slave_seats: Some(TopSlaveSeats {
                pairs: vec![SlaveSeats {
                    slave: "site\\1".into(),
                    agent_type: "in\"bound\n".into(),
                    used: 2,
                    free: 3,
                }],
                omitted: 7,
            }),
            ..Gauges::default()
        }));
        m.capacity_moves(&[Duration::from_millis(80), Duration::from_secs(3)]);
        let text = m.render(0, None, &ProcessSample::default());
        for line in [
            "lmbus_allot_slave_seats{slave=\"site\\\\1\",agent_type=\"in\\\"bound\\n\",state=\"used\"} 2",
            "lmbus_allot_slave_seats{slave=\"site\\\\1\",agent_type=\"in\\\"bound\\n\",state=\"free\"} 3",
            "lmbus_allot_slave_seats_omitted 7",
            "lmbus_allot_capacity_move_seconds_bucket{le=\"0.1\"} 1",
            "lmbus_allot_capacity_move_seconds_bucket{le=\"2.5\"} 1",
            "lmbus_allot_capacity_move_seconds_bucket{le=\"5\"} 2",
            "lmbus_allot_capacity_move_seconds_count 2",
            "lmbus_allot_capacity_moves_untimed_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
        // Strict mode: no per-slave series at all; a standby: none either.
        m.set_gauges(Some(Gauges::default()));
        let text = m.render(0, None, &ProcessSample::default());
        assert!(!text.contains("lmbus_allot_slave_seats"), "{text}");
        m.set_gauges(None);
        let text = m.render(0, None, &ProcessSample::default());
        assert!(!text.contains("lmbus_allot_slave_seats"), "{text}");
    }

    #[test]
    fn a_reloaded_license_changes_the_limits_and_the_expiry() {
        let m = Metrics::new(&license(
            10,
            &[("inbound", 4)],
            time::macros::date!(2030 - 06 - 30),
        ));
        m.set_license(&license(
            5,
            &[("outbound", 2)],
            time::macros::date!(2031 - 01 - 01),
        ));
        let text = m.render(0, None, &ProcessSample::default());
        assert!(text.contains("\nlmbus_seats_limit 5\n"), "{text}");
        assert!(text.contains("\nlmbus_agent_type_seats_limit{agent_type=\"outbound\"} 2\n"));
        assert!(!text.contains("agent_type=\"inbound\""), "{text}");
        // 2031-01-02T00:00:00Z.
        assert!(text.contains("\nlmbus_license_expiry_timestamp_seconds 1925078400\n"));
        assert!(
            text.contains(&format!(
                "\nlmbus_license_info{{license_id=\"{}\",context=\"production\",not_for_production=\"false\"}} 1\n",
                lock(&m.license).as_ref().unwrap().id
            )),
            "{text}"
        );
        let mut dev = lock(&m.license).clone().unwrap();
        dev.context = lmbus_schemas::Context::Development;
        m.set_license(&dev);
        let text = m.render(0, None, &ProcessSample::default());
        assert!(
            text.contains("context=\"development\",not_for_production=\"true\"} 1\n"),
            "{text}"
        );
    }
}
