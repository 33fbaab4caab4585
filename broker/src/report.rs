//! Usage reports: one per day at a configured time (UTC), and on `admin report`.
//!
//! Seat usage (peak and time-weighted average per agent type) comes from [`Usage`], which
//! every replica feeds from the seat counts after each ledger record it applies or writes,
//! so a replica that takes over mid-day has the day too. Events (rejections by reason,
//! connects, disconnects, restrictions after grace, reclaims) are counted from the alert
//! stream over the period, which survives any failover. Agent ids never enter a report.
//! A report is written as JSON and CSV into a directory, published on
//! `lmbus.v1.<cluster>.report.usage` and mailed over SMTP, each optional but the subject.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use lmbus_schemas::report::{
    BackupUse, Events, MAX_IN_USE_SPANS, SlaveActivity, Span, TypeUsage, UsageReport, overlap_ms,
};
use lmbus_schemas::{Alert, AlertKind, Subjects, decode, encode};
use serde::Deserialize;
use time::OffsetDateTime;

const DAY_MS: i64 = 86_400_000;

/// Where reports go and when the daily one is written.
#[derive(Debug, Clone, Default)]
pub struct ReportConfig {
    /// Directory for the JSON and CSV files; `None`: no files.
    pub dir: Option<PathBuf>,
    /// Minutes after midnight UTC at which each day's report is written (it covers the 24
    /// hours before).
    pub at_minute: u32,
    pub smtp: Option<SmtpConfig>,
}

/// How the report is mailed.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub user: Option<String>,
    pub password: Option<String>,
    pub from: String,
    pub to: Vec<String>,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("to", &self.to)
            .finish()
    }
}

/// The SMTP connection's security.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text (a local relay only).
    None,
    /// STARTTLS on the submission port (587), required.
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

impl SmtpTls {
    /// The usual port for this security: 25, 587 or 465.
    pub fn default_port(self) -> u16 {
        match self {
            SmtpTls::None => 25,
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
        }
    }
}

/// Parses `HH:MM` (UTC) into minutes after midnight.
pub fn parse_time_of_day(s: &str) -> Result<u32, String> {
    let bad = || format!("invalid time of day {s:?}: use HH:MM (UTC), e.g. 00:00 or 06:30");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// Seat usage over one period: peak and time-weighted average per agent type and in total.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageWindow {
    pub start_ms: i64,
    pub end_ms: i64,
    /// When this replica started counting (later than `start_ms` when it started mid-period).
    pub covered_from_ms: i64,
    /// Peak and average per agent type.
    pub types: BTreeMap<String, (u32, f64)>,
    pub total: (u32, f64),
    /// Milliseconds during which this master held seats while the other side was in use:
    /// a backup's leader, while it heard production's leader; a production leader, while a
    /// backup's leader said it held seats (`None`: never told, a development master).
    pub overlap_ms: Option<u64>,
    /// When at least one seat was held (oldest first, disjoint, bounded: see
    /// `UsageReport::in_use`).
    pub in_use: Vec<Span>,
}

/// One count's accumulator over a window: now, the peak, and seat-milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    now: u32,
    peak: u32,
    area: u128,
}

impl Acc {
    fn set(&mut self, n: u32) {
        self.now = n;
        self.peak = self.peak.max(n);
    }

    /// The same count starting a new window.
    fn carried(self) -> Self {
        Self {
            now: self.now,
            peak: self.now,
            area: 0,
        }
    }

    /// Peak and time-weighted average over `span` milliseconds.
    fn summary(self, span: i64) -> (u32, f64) {
        let average = if span > 0 {
            self.area as f64 / span as f64
        } else {
            f64::from(self.now)
        };
        (self.peak, average)
    }
}

#[derive(Debug, Clone)]
struct Period {
    start_ms: i64,
    end_ms: i64,
    covered_from_ms: i64,
    last_ms: i64,
    /// Per agent type; a type stays (at 0) once seen in the window.
    types: BTreeMap<String, Acc>,
    total: Acc,
    /// Whether the other side is in use now (`None`: never told, a development master).
    heard: Option<bool>,
    /// Milliseconds with seats held while the other side was in use.
    overlap: u128,
    /// The spans with seats held that ended, and since when seats are held now.
    busy: Vec<Span>,
    busy_since: Option<i64>,
}

impl Period {
    fn new(start_ms: i64, end_ms: i64, from_ms: i64) -> Self {
        Self {
            start_ms,
            end_ms,
            covered_from_ms: from_ms,
            last_ms: from_ms,
            types: BTreeMap::new(),
            total: Acc::default(),
            heard: None,
            overlap: 0,
            busy: Vec::new(),
            busy_since: None,
        }
    }

    /// Seats held from `t` on (`total` of them): opens or closes a span of use.
    fn track_busy(&mut self, t: i64, total: u32) {
        match (self.busy_since, total > 0) {
            (None, true) => self.busy_since = Some(t),
            (Some(from), false) => {
                push_span(
                    &mut self.busy,
                    Span {
                        from_ms: from,
                        to_ms: t,
                    },
                );
                self.busy_since = None;
            }
            _ => {}
        }
    }

    /// The spans with seats held up to `end_ms`, the one still open included.
    fn in_use(&self, end_ms: i64) -> Vec<Span> {
        let mut spans = self.busy.clone();
        if let Some(from) = self.busy_since {
            push_span(
                &mut spans,
                Span {
                    from_ms: from,
                    to_ms: end_ms.max(from),
                },
            );
        }
        spans
    }

    /// Counts the seats held from the last observation until `t`.
    fn advance(&mut self, t: i64) {
        let dt = u128::try_from(t - self.last_ms).unwrap_or(0);
        for acc in self
            .types
            .values_mut()
            .chain(std::iter::once(&mut self.total))
        {
            acc.area += u128::from(acc.now) * dt;
        }
        if self.heard == Some(true) && self.total.now > 0 {
            self.overlap += dt;
        }
        self.last_ms = self.last_ms.max(t);
    }

    /// The counts from now on. Called after every ledger record: no allocation but for a
    /// type seen for the first time.
    fn set(&mut self, by_type: &BTreeMap<String, u32>, total: u32) {
        for acc in self.types.values_mut() {
            acc.now = 0;
        }
        for (agent_type, n) in by_type {
            match self.types.get_mut(agent_type) {
                Some(acc) => acc.set(*n),
                None => {
                    let mut acc = Acc::default();
                    acc.set(*n);
                    self.types.insert(agent_type.clone(), acc);
                }
            }
        }
        self.total.set(total);
    }

    /// The next window, starting at this one's end with the counts held then.
    fn next(&self) -> Self {
        let mut next = Period::new(self.end_ms, self.end_ms + DAY_MS, self.end_ms);
        next.types = self
            .types
            .iter()
            .map(|(t, acc)| (t.clone(), acc.carried()))
            .collect();
        next.total = self.total.carried();
        next.heard = self.heard;
        next.busy_since = self.busy_since.map(|_| self.end_ms);
        next
    }

    /// The window up to `end` (already advanced there).
    fn summary(&self, end_ms: i64) -> UsageWindow {
        let span = (end_ms - self.covered_from_ms).max(0);
        UsageWindow {
            start_ms: self.start_ms,
            end_ms,
            covered_from_ms: self.covered_from_ms,
            types: self
                .types
                .iter()
                .map(|(t, acc)| (t.clone(), acc.summary(span)))
                .collect(),
            total: self.total.summary(span),
            overlap_ms: self
                .heard
                .map(|_| u64::try_from(self.overlap).unwrap_or(u64::MAX)),
            in_use: self.in_use(end_ms),
        }
    }
}

/// The usage of the current period, fed with the seat counts after every change, and the
/// last period that ended (until the leader takes it to report).
#[derive(Debug, Clone)]
pub struct Usage {
    /// Offset of the period boundary within a UTC day.
    at_ms: i64,
    window: Option<Period>,
    closed: Option<UsageWindow>,
}

impl Usage {
    pub fn new(at_minute: u32) -> Self {
        Self {
            at_ms: i64::from(at_minute) * 60_000,
            window: None,
            closed: None,
        }
    }

    /// The period boundary at or before `t`.
    fn boundary_before(&self, t: i64) -> i64 {
        let b = t.div_euclid(DAY_MS) * DAY_MS + self.at_ms;
        if b > t { b - DAY_MS } else { b }
    }

    /// The seat counts at `now_ms` (Unix ms): `by_type` and `total`. Closes the period
    /// when `now_ms` passed its end.
    pub fn observe(&mut self, now_ms: i64, by_type: &BTreeMap<String, u32>, total: u32) {
        loop {
            match &mut self.window {
                None => {
                    let start = self.boundary_before(now_ms);
                    let mut w = Period::new(start, start + DAY_MS, now_ms);
                    w.track_busy(now_ms, total);
                    w.set(by_type, total);
                    self.window = Some(w);
                    return;
                }
                Some(w) if now_ms >= w.end_ms => {
                    let end = w.end_ms;
                    w.advance(end);
                    self.closed = Some(w.summary(end));
                    *w = w.next();
                }
                Some(w) => {
                    w.advance(now_ms);
                    w.track_busy(now_ms, total);
                    w.set(by_type, total);
                    return;
                }
            }
        }
    }

    /// The leader says, before every event, whether the other side is in use now (a
    /// backup's: it hears production's leader; production's: a backup's leader says it
    /// holds seats): time with seats held while it is counts as the period's overlap.
    pub fn set_overlapping(&mut self, now_ms: i64, heard: bool) {
        if let Some(w) = &mut self.window
            && w.heard != Some(heard)
        {
            // Up to the period's end at most: a later observation closes the period first.
            w.advance(now_ms.min(w.end_ms));
            w.heard = Some(heard);
        }
    }

    /// The period that ended last, once.
    pub fn take_closed(&mut self) -> Option<UsageWindow> {
        self.closed.take()
    }

    /// The current period up to `now_ms` (for `admin report`).
    pub fn so_far(&self, now_ms: i64) -> Option<UsageWindow> {
        let mut w = self.window.clone()?;
        w.advance(now_ms);
        Some(w.summary(now_ms.max(w.covered_from_ms)))
    }
}

/// Appends `span` to `spans` (oldest first): joined to the last one when they touch, and
/// past [`MAX_IN_USE_SPANS`] merged into it, so the spans may cover more, never less.
fn push_span(spans: &mut Vec<Span>, span: Span) {
    match spans.last_mut() {
        Some(last) if span.from_ms <= last.to_ms => {
            last.to_ms = last.to_ms.max(span.to_ms);
            return;
        }
        _ => spans.push(span),
    }
    if spans.len() > MAX_IN_USE_SPANS {
        // Past the bound: the two neighbours with the shortest gap become one span (the
        // least time counted as in use that was not).
        let i = (0..spans.len() - 1)
            .min_by_key(|&i| spans[i + 1].from_ms - spans[i].to_ms)
            .unwrap_or(0);
        spans[i].to_ms = spans[i + 1].to_ms;
        spans.remove(i + 1);
    }
}

/// `spans` as [`overlap_ms`] needs them: empty ones dropped, sorted, overlaps joined (a
/// report read from a file may be anything).
fn normalized(spans: &[Span]) -> Vec<Span> {
    let mut sorted: Vec<Span> = spans
        .iter()
        .copied()
        .filter(|s| s.to_ms > s.from_ms)
        .collect();
    sorted.sort_by_key(|s| s.from_ms);
    let mut out: Vec<Span> = Vec::with_capacity(sorted.len());
    for s in sorted {
        match out.last_mut() {
            Some(last) if s.from_ms <= last.to_ms => last.to_ms = last.to_ms.max(s.to_ms),
            _ => out.push(s),
        }
    }
    out
}

fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{ms}ms"))
}

/// What the report needs from the master license.
#[derive(Debug, Clone)]
pub struct LicenseFacts {
    pub id: String,
    pub customer: String,
    pub context: lmbus_schemas::Context,
    pub total: Option<u32>,
    pub types: BTreeMap<String, u32>,
}

/// Builds the report of `usage` from the alerts stored during its period (`(store time
/// ms, alert)`; others are ignored).
pub fn build(
    cluster: &str,
    written_by: &str,
    license: &LicenseFacts,
    usage: &UsageWindow,
    daily: bool,
    alerts: impl IntoIterator<Item = (i64, Alert)>,
) -> UsageReport {
    let mut agent_types: Vec<TypeUsage> = Vec::new();
    let mut names: Vec<&String> = usage.types.keys().collect();
    names.extend(
        license
            .types
            .keys()
            .filter(|t| !usage.types.contains_key(*t)),
    );
    names.sort();
    let hours = (usage.end_ms - usage.covered_from_ms).max(0) as f64 / 3_600_000.0;
    for name in names {
        let (peak, average) = usage.types.get(name).copied().unwrap_or((0, 0.0));
        agent_types.push(TypeUsage {
            agent_type: name.clone(),
            limit: license.types.get(name).copied(),
            peak,
            average,
            seat_hours: average * hours,
        });
    }
    agent_types.push(TypeUsage {
        agent_type: "total".into(),
        limit: license.total,
        peak: usage.total.0,
        average: usage.total.1,
        seat_hours: usage.total.1 * hours,
    });
    let overlap_minutes = usage.overlap_ms.unwrap_or(0) as f64 / 60_000.0;
    let backup = match license.context {
        lmbus_schemas::Context::Backup => Some(BackupUse { overlap_minutes }),
        lmbus_schemas::Context::Production if overlap_minutes > 0.0 => {
            Some(BackupUse { overlap_minutes })
        }
        _ => None,
    };
    let (rejections, events, slaves) = count_events(usage.start_ms, usage.end_ms, alerts);
    UsageReport {
        cluster: cluster.to_string(),
        written_by: written_by.to_string(),
        license_id: license.id.clone(),
        customer: license.customer.clone(),
        context: license.context.to_string(),
        not_for_production: license.context.not_for_production(),
        period_start: rfc3339(usage.start_ms),
        period_end: rfc3339(usage.end_ms),
        usage_counted_from: rfc3339(usage.covered_from_ms),
        daily,
        agent_types,
        rejections,
        events,
        slaves,
        backup,
        in_use: Some(usage.in_use.clone()),
    }
}

/// What the alerts stored at `[start_ms, end_ms)` count: rejections by reason, the events,
/// and each slave's activity (the usage report's, and without the slaves, a vendor sync
/// summary's).
pub fn count_events(
    start_ms: i64,
    end_ms: i64,
    alerts: impl IntoIterator<Item = (i64, Alert)>,
) -> (BTreeMap<String, u64>, Events, Vec<SlaveActivity>) {
    let mut rejections: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = Events::default();
    let mut slaves: BTreeMap<String, SlaveActivity> = BTreeMap::new();
    for (at, alert) in alerts {
        if at < start_ms || at >= end_ms {
            continue;
        }
        let slave = alert.slave.clone().map(|s| {
            slaves.entry(s.clone()).or_insert_with(|| SlaveActivity {
                slave: s,
                ..SlaveActivity::default()
            })
        });
        match alert.kind {
            AlertKind::RegistrationRejected => {
                let reason = alert
                    .reason
                    .map_or_else(|| "unknown".to_string(), |r| r.token().to_string());
                *rejections.entry(reason).or_default() += 1;
                if let Some(s) = slave {
                    s.rejections += 1;
                }
            }
            AlertKind::SlaveConnected => {
                events.slave_connects += 1;
                if let Some(s) = slave {
                    s.connects += 1;
                }
            }
            AlertKind::SlaveDisconnected => {
                events.slave_disconnects += 1;
                if let Some(s) = slave {
                    s.disconnects += 1;
                }
            }
            AlertKind::SlaveRestricted => {
                events.restricted_after_grace += 1;
                if let Some(s) = slave {
                    s.restricted_after_grace += 1;
                }
            }
            AlertKind::SlaveRefused => events.slaves_refused += 1,
            AlertKind::SeatsReclaimed => events.seats_reclaimed += 1,
            AlertKind::SeatsReleased => events.seats_released_by_operator += 1,
            AlertKind::BadMessage => events.bad_messages += 1,
            AlertKind::LeaderElected => events.leader_elections += 1,
            _ => {}
        }
    }
    (rejections, events, slaves.into_values().collect())
}

/// The alerts stored since `start_ms` (with their store times), or why they cannot be read.
pub async fn stored_alerts(
    client: &async_nats::Client,
    subjects: &Subjects,
    start_ms: i64,
) -> Result<Vec<(i64, Alert)>, String> {
    let js = async_nats::jetstream::new(client.clone());
    let since = OffsetDateTime::from_unix_timestamp_nanos(i128::from(start_ms) * 1_000_000).ok();
    match lmbus_ops::stored(&js, &subjects.alert_stream(), since).await {
        Ok(stored) => Ok(stored
            .messages
            .into_iter()
            .filter_map(|(_, at, payload)| decode::<Alert>(&payload).ok().map(|a| (at, a)))
            .collect()),
        Err(e) => Err(format!(
            "cannot read the alert stream {}: {e:#}",
            subjects.alert_stream()
        )),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The report as CSV in long form: `section,name,metric,value`, one value per row.
pub fn to_csv(r: &UsageReport) -> String {
    let mut o = String::from("section,name,metric,value\n");
    let mut row = |section: &str, name: &str, metric: &str, value: String| {
        let _ = writeln!(
            o,
            "{},{},{},{}",
            section,
            csv_field(name),
            metric,
            csv_field(&value)
        );
    };
    row("report", &r.cluster, "period_start", r.period_start.clone());
    row("report", &r.cluster, "period_end", r.period_end.clone());
    row(
        "report",
        &r.cluster,
        "usage_counted_from",
        r.usage_counted_from.clone(),
    );
    row("report", &r.cluster, "license_id", r.license_id.clone());
    row("report", &r.cluster, "context", r.context.clone());
    row(
        "report",
        &r.cluster,
        "not_for_production",
        r.not_for_production.to_string(),
    );
    for t in &r.agent_types {
        if let Some(limit) = t.limit {
            row("agent_type", &t.agent_type, "limit", limit.to_string());
        }
        row("agent_type", &t.agent_type, "peak", t.peak.to_string());
        row(
            "agent_type",
            &t.agent_type,
            "average",
            format!("{:.2}", t.average),
        );
        row(
            "agent_type",
            &t.agent_type,
            "seat_hours",
            format!("{:.3}", t.seat_hours),
        );
    }
    if let Some(b) = &r.backup {
        row(
            "backup",
            &r.cluster,
            "overlap_minutes",
            format!("{:.2}", b.overlap_minutes),
        );
    }
    for span in r.in_use.iter().flatten() {
        row(
            "in_use",
            &rfc3339(span.from_ms),
            "until",
            rfc3339(span.to_ms),
        );
    }
    for (reason, n) in &r.rejections {
        row("rejections", reason, "count", n.to_string());
    }
    let e = &r.events;
    for (name, n) in [
        ("slave_connects", e.slave_connects),
        ("slave_disconnects", e.slave_disconnects),
        ("slaves_refused", e.slaves_refused),
        ("restricted_after_grace", e.restricted_after_grace),
        ("seats_reclaimed", e.seats_reclaimed),
        ("seats_released_by_operator", e.seats_released_by_operator),
        ("bad_messages", e.bad_messages),
        ("leader_elections", e.leader_elections),
    ] {
        row("events", name, "count", n.to_string());
    }
    for s in &r.slaves {
        row("slave", &s.slave, "connects", s.connects.to_string());
        row("slave", &s.slave, "disconnects", s.disconnects.to_string());
        row("slave", &s.slave, "rejections", s.rejections.to_string());
        row(
            "slave",
            &s.slave,
            "restricted_after_grace",
            s.restricted_after_grace.to_string(),
        );
    }
    o
}

/// The report's context as a person reads it: a development master's says its usage is
/// not for production use.
fn context_shown(r: &UsageReport) -> String {
    if r.not_for_production {
        lmbus_schemas::NOT_FOR_PRODUCTION.to_owned()
    } else {
        r.context.clone()
    }
}

/// The report as readable text (the email's body).
pub fn to_text(r: &UsageReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "lmbus usage report for cluster {} ({}, license {}, {})",
        r.cluster,
        r.customer,
        r.license_id,
        context_shown(r)
    );
    let _ = writeln!(o, "period {} to {}", r.period_start, r.period_end);
    if r.usage_counted_from != r.period_start {
        let _ = writeln!(
            o,
            "seat usage counted from {} (the writing replica started then)",
            r.usage_counted_from
        );
    }
    let _ = writeln!(
        o,
        "\n{:<18} {:>6} {:>6} {:>8}",
        "AGENT TYPE", "LIMIT", "PEAK", "AVERAGE"
    );
    for t in &r.agent_types {
        let limit = t.limit.map_or("-".to_string(), |l| l.to_string());
        let _ = writeln!(
            o,
            "{:<18} {:>6} {:>6} {:>8.2}",
            t.agent_type, limit, t.peak, t.average
        );
    }
    if let Some(total) = r.agent_types.iter().find(|t| t.agent_type == "total") {
        let _ = writeln!(o, "seat-hours (total): {:.3}", total.seat_hours);
    }
    if let Some(b) = &r.backup {
        let while_ = if r.context == lmbus_schemas::Context::Backup.token() {
            "while production was heard"
        } else {
            "while a backup master held seats"
        };
        let _ = writeln!(
            o,
            "in use {while_} (overlap): {:.2} minutes",
            b.overlap_minutes
        );
    }
    let _ = writeln!(o, "\nrejections:");
    if r.rejections.is_empty() {
        let _ = writeln!(o, "  none");
    }
    for (reason, n) in &r.rejections {
        let _ = writeln!(o, "  {reason}: {n}");
    }
    let e = &r.events;
    let _ = writeln!(
        o,
        "\nslave connects {}, disconnects {}, refused {}, restricted after grace {}; seats reclaimed {} times, released by an operator {} times; bad messages {}; leader elections {}",
        e.slave_connects,
        e.slave_disconnects,
        e.slaves_refused,
        e.restricted_after_grace,
        e.seats_reclaimed,
        e.seats_released_by_operator,
        e.bad_messages,
        e.leader_elections
    );
    if !r.slaves.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<20} {:>8} {:>11} {:>10} {:>10}",
            "SLAVE", "CONNECTS", "DISCONNECTS", "REJECTIONS", "RESTRICTED"
        );
        for s in &r.slaves {
            let _ = writeln!(
                o,
                "{:<20} {:>8} {:>11} {:>10} {:>10}",
                s.slave, s.connects, s.disconnects, s.rejections, s.restricted_after_grace
            );
        }
    }
    o
}

/// Several masters' reports (production and backup, say) in one table: per agent type
/// each one's limit, peak and average, then each one's rejections and events.
pub fn side_by_side(reports: &[UsageReport]) -> String {
    const COL: usize = 26;
    let mut o = String::new();
    let _ = writeln!(o, "lmbus usage reports side by side");
    for r in reports {
        let _ = writeln!(
            o,
            "  {} ({}): {} to {}, license {}",
            r.cluster,
            context_shown(r),
            r.period_start,
            r.period_end,
            r.license_id
        );
    }
    let head = |o: &mut String, first: &str, cells: &mut dyn Iterator<Item = String>| {
        let _ = write!(o, "{first:<18}");
        for c in cells {
            let _ = write!(o, " {c:<COL$}");
        }
        let _ = writeln!(o);
    };
    let _ = writeln!(o);
    head(
        &mut o,
        "",
        &mut reports
            .iter()
            .map(|r| format!("{} ({})", r.cluster, r.context)),
    );
    head(
        &mut o,
        "AGENT TYPE",
        &mut reports
            .iter()
            .map(|_| format!("{:>6} {:>6} {:>8}", "LIMIT", "PEAK", "AVERAGE")),
    );
    // Every type any report has, `total` last.
    let mut types: Vec<&str> = reports
        .iter()
        .flat_map(|r| r.agent_types.iter().map(|t| t.agent_type.as_str()))
        .filter(|t| *t != "total")
        .collect();
    types.sort_unstable();
    types.dedup();
    types.push("total");
    for t in types {
        head(
            &mut o,
            t,
            &mut reports
                .iter()
                .map(|r| match r.agent_types.iter().find(|u| u.agent_type == t) {
                    Some(u) => format!(
                        "{:>6} {:>6} {:>8.2}",
                        u.limit.map_or("-".to_string(), |l| l.to_string()),
                        u.peak,
                        u.average
                    ),
                    None => format!("{:>6} {:>6} {:>8}", "-", "-", "-"),
                }),
        );
    }
    let mut reasons: Vec<&String> = reports.iter().flat_map(|r| r.rejections.keys()).collect();
    reasons.sort_unstable();
    reasons.dedup();
    let _ = writeln!(o);
    for reason in reasons {
        head(
            &mut o,
            &format!("rejected {reason}"),
            &mut reports
                .iter()
                .map(|r| r.rejections.get(reason).copied().unwrap_or(0).to_string()),
        );
    }
    for (name, get) in [
        (
            "slave connects",
            (|e: &Events| e.slave_connects) as fn(&Events) -> u64,
        ),
        ("slave disconnects", |e| e.slave_disconnects),
        ("restricted (grace)", |e| e.restricted_after_grace),
        ("seats reclaimed", |e| e.seats_reclaimed),
        ("leader elections", |e| e.leader_elections),
    ] {
        head(
            &mut o,
            name,
            &mut reports.iter().map(|r| get(&r.events).to_string()),
        );
    }
    head(
        &mut o,
        "seat-hours",
        &mut reports.iter().map(|r| {
            r.agent_types
                .iter()
                .find(|t| t.agent_type == "total")
                .map_or("-".into(), |t| format!("{:.3}", t.seat_hours))
        }),
    );
    head(
        &mut o,
        "overlap minutes",
        &mut reports.iter().map(|r| {
            r.backup
                .as_ref()
                .map_or("-".into(), |b| format!("{:.2}", b.overlap_minutes))
        }),
    );
    head(
        &mut o,
        "both in use (min)",
        &mut reports.iter().map(|r| {
            both_in_use(r, reports).map_or("-".into(), |ms| format!("{:.2}", ms as f64 / 60_000.0))
        }),
    );
    o
}

/// From the reports' own spans of use: the milliseconds during which `r`'s master and a
/// master of the other context (production beside backup) among `reports` both held seats,
/// summed over those masters; whether or not either heard the other (a split). `None` when
/// `r` or every such other report has no spans (an older master), or there is none.
fn both_in_use(r: &UsageReport, reports: &[UsageReport]) -> Option<u64> {
    let pair = |a: &str, b: &str| {
        let (p, bk) = (
            lmbus_schemas::Context::Production.token(),
            lmbus_schemas::Context::Backup.token(),
        );
        (a == p && b == bk) || (a == bk && b == p)
    };
    let mine = normalized(r.in_use.as_ref()?);
    let theirs: Vec<Vec<Span>> = reports
        .iter()
        .filter(|o| pair(&r.context, &o.context))
        .filter_map(|o| o.in_use.as_deref().map(normalized))
        .collect();
    (!theirs.is_empty()).then(|| theirs.iter().map(|t| overlap_ms(&mine, t)).sum())
}

/// Where a report went.
#[derive(Debug, Clone, Default)]
pub struct Delivered {
    pub files: Vec<String>,
    pub emailed_to: Vec<String>,
    /// Each output that failed, with the reason.
    pub problems: Vec<String>,
}

/// Reads the period's alerts, builds the report, and writes, publishes and mails it.
pub async fn make_and_deliver(
    cfg: &ReportConfig,
    client: &async_nats::Client,
    subjects: &Subjects,
    written_by: &str,
    license: &LicenseFacts,
    usage: &UsageWindow,
    daily: bool,
) -> (Option<UsageReport>, Delivered) {
    let mut delivered = Delivered::default();
    let alerts = match stored_alerts(client, subjects, usage.start_ms).await {
        Ok(alerts) => alerts,
        Err(e) => {
            delivered
                .problems
                .push(format!("{e}: events are not counted"));
            Vec::new()
        }
    };
    let report = build(
        subjects.cluster(),
        written_by,
        license,
        usage,
        daily,
        alerts,
    );
    let json = match serde_json::to_string_pretty(&report) {
        Ok(json) => json,
        Err(e) => {
            delivered
                .problems
                .push(format!("cannot encode the report: {e}"));
            return (None, delivered);
        }
    };
    if let Some(dir) = cfg.dir.clone() {
        let stamp = report
            .period_end
            .replace([':', '-'], "")
            .trim_end_matches('Z')
            .to_string();
        let base = format!("lmbus-usage-{}-{stamp}", report.cluster);
        let texts = [("json", json.clone()), ("csv", to_csv(&report))];
        // File IO blocks: on the blocking pool, not the broker's one runtime thread.
        let written = tokio::task::spawn_blocking(move || write_files(&dir, &base, &texts)).await;
        match written {
            Ok((files, problems)) => {
                delivered.files.extend(files);
                delivered.problems.extend(problems);
            }
            Err(e) => delivered
                .problems
                .push(format!("writing the report files failed: {e}")),
        }
    }
    match encode(&report) {
        Ok(payload) => {
            if let Err(e) = client
                .publish(subjects.usage_report(), payload.into())
                .await
            {
                delivered.problems.push(format!(
                    "cannot publish on {}: {e}",
                    subjects.usage_report()
                ));
            }
        }
        Err(e) => delivered
            .problems
            .push(format!("cannot encode the report: {e}")),
    }
    if let Some(smtp) = &cfg.smtp {
        match mail(smtp, &report, &json).await {
            Ok(()) => delivered.emailed_to = smtp.to.clone(),
            Err(e) => delivered.problems.push(format!(
                "cannot mail the report through {}:{}: {e:#}",
                smtp.host, smtp.port
            )),
        }
    }
    (Some(report), delivered)
}

/// Writes each `(extension, text)` as `dir/base.extension`; returns the files written and
/// the problems met.
fn write_files(
    dir: &std::path::Path,
    base: &str,
    texts: &[(&str, String)],
) -> (Vec<String>, Vec<String>) {
    let (mut files, mut problems) = (Vec::new(), Vec::new());
    if let Err(e) = std::fs::create_dir_all(dir) {
        problems.push(format!(
            "cannot create the report directory {}: {e}",
            dir.display()
        ));
        return (files, problems);
    }
    for (ext, text) in texts {
        let path = dir.join(format!("{base}.{ext}"));
        match write_file(&path, text) {
            Ok(()) => files.push(path.display().to_string()),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    (files, problems)
}

/// Writes `text` to `path` through a temporary file and a rename (no half-written report).
fn write_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

async fn mail(smtp: &SmtpConfig, report: &UsageReport, json: &str) -> anyhow::Result<()> {
    use lettre::message::{Mailbox, MultiPart, SinglePart, header::ContentType};
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    let from: Mailbox = smtp
        .from
        .parse()
        .with_context(|| format!("invalid sender address {:?}", smtp.from))?;
    let mut builder = Message::builder().from(from).subject(format!(
        "lmbus usage report, cluster {}, {} to {}",
        report.cluster, report.period_start, report.period_end
    ));
    for to in &smtp.to {
        let mailbox: Mailbox = to
            .parse()
            .with_context(|| format!("invalid recipient address {to:?}"))?;
        builder = builder.to(mailbox);
    }
    let message = builder.multipart(
        MultiPart::mixed()
            .singlepart(SinglePart::plain(to_text(report)))
            .singlepart(
                SinglePart::builder()
                    .header(ContentType::parse("text/csv").context("content type")?)
                    .header(lettre::message::header::ContentDisposition::attachment(
                        "usage.csv",
                    ))
                    .body(to_csv(report)),
            )
            .singlepart(
                SinglePart::builder()
                    .header(ContentType::parse("application/json").context("content type")?)
                    .header(lettre::message::header::ContentDisposition::attachment(
                        "usage.json",
                    ))
                    .body(json.to_string()),
            ),
    )?;
    let mut transport = match smtp.tls {
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
        SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)?,
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host)?,
    }
    .port(smtp.port)
    .timeout(Some(std::time::Duration::from_secs(30)));
    if let (Some(user), Some(password)) = (&smtp.user, &smtp.password) {
        transport = transport.credentials(Credentials::new(user.clone(), password.clone()));
    }
    transport.build().send(message).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmbus_schemas::{RejectReason, Severity};

    const H: i64 = 3_600_000;
    /// 2026-11-24T00:00:00Z.
    const DAY: i64 = 1_795_478_400_000;

    fn counts(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    /// A scripted day with the boundary at 06:00: the replica starts at 06:00 with nothing
    /// in use; 2 inbound from 08:00 to 10:00, then 4 inbound and 1 outbound until 12:00,
    /// then 1 inbound until the next 06:00. Peaks 4/1/5; averages are seat-hours / 24.
    #[test]
    fn a_scripted_day_has_the_right_peaks_and_averages() {
        let mut u = Usage::new(parse_time_of_day("06:00").unwrap());
        let six = DAY + 6 * H;
        u.observe(six, &counts(&[]), 0);
        u.observe(six + 2 * H, &counts(&[("inbound", 2)]), 2);
        u.observe(six + 4 * H, &counts(&[("inbound", 4), ("outbound", 1)]), 5);
        u.observe(six + 6 * H, &counts(&[("inbound", 1)]), 1);
        assert!(u.take_closed().is_none());
        let so_far = u.so_far(six + 6 * H).unwrap();
        assert_eq!(so_far.total.0, 5);
        // The next observation after the boundary closes the day.
        u.observe(six + 25 * H, &counts(&[("inbound", 1)]), 1);
        let day = u.take_closed().unwrap();
        assert_eq!((day.start_ms, day.end_ms), (six, six + 24 * H));
        assert_eq!(day.covered_from_ms, six);
        let (peak, avg) = day.types["inbound"];
        assert_eq!(peak, 4);
        // inbound: 2 seats × 2 h + 4 × 2 h + 1 × 18 h = 30 seat-hours.
        assert!((avg - 30.0 / 24.0).abs() < 1e-9, "{avg}");
        let (peak, avg) = day.types["outbound"];
        assert_eq!(peak, 1);
        assert!((avg - 2.0 / 24.0).abs() < 1e-9, "{avg}");
        assert_eq!(day.total.0, 5);
        assert!((day.total.1 - 32.0 / 24.0).abs() < 1e-9);
        assert!(u.take_closed().is_none(), "a period is taken once");
        // The next period carries the seats still held: 1 inbound all along.
        let next = u.so_far(six + 48 * H).unwrap();
        assert_eq!(next.types["inbound"], (1, 1.0));
    }

    #[test]
    fn a_replica_started_mid_period_says_from_when_it_counted() {
        let mut u = Usage::new(0);
        u.observe(DAY + 12 * H, &counts(&[("inbound", 3)]), 3);
        u.observe(DAY + 24 * H, &counts(&[("inbound", 3)]), 3);
        let day = u.take_closed().unwrap();
        assert_eq!(day.start_ms, DAY);
        assert_eq!(day.covered_from_ms, DAY + 12 * H);
        assert_eq!(day.types["inbound"], (3, 3.0));
    }

    #[test]
    fn the_report_counts_events_of_the_period_and_names_no_agent() {
        let mut u = Usage::new(0);
        u.observe(DAY, &counts(&[("inbound", 2)]), 2);
        u.observe(DAY + 24 * H, &counts(&[]), 0);
        let day = u.take_closed().unwrap();
        let alert = |kind, slave: &str| {
            let mut a = Alert::new(Severity::Info, kind, "m");
            a.slave = Some(slave.into());
            a.agent_id = Some("agent-secret-7".into());
            a
        };
        let mut rejected = alert(AlertKind::RegistrationRejected, "site1");
        rejected.reason = Some(RejectReason::AggregateLimit);
        let alerts = vec![
            (DAY + H, alert(AlertKind::SlaveConnected, "site1")),
            (DAY + 2 * H, rejected.clone()),
            (DAY + 3 * H, rejected.clone()),
            (DAY + 4 * H, alert(AlertKind::SlaveDisconnected, "site2")),
            (DAY + 5 * H, alert(AlertKind::SlaveRestricted, "site2")),
            // Outside the period: not counted.
            (DAY - 1, alert(AlertKind::SlaveConnected, "site1")),
            (DAY + 24 * H, rejected),
        ];
        let license = LicenseFacts {
            id: "L1".into(),
            customer: "C".into(),
            context: lmbus_schemas::Context::Production,
            total: Some(10),
            types: counts(&[("inbound", 5), ("outbound", 3)]),
        };
        let r = build("acme", "b1", &license, &day, true, alerts);
        assert_eq!(
            r.rejections,
            BTreeMap::from([("aggregate_limit".into(), 2)])
        );
        assert_eq!(r.events.slave_connects, 1);
        assert_eq!(r.events.slave_disconnects, 1);
        assert_eq!(r.events.restricted_after_grace, 1);
        assert_eq!(r.slaves.len(), 2);
        assert_eq!(r.slaves[0].rejections, 2);
        let names: Vec<_> = r
            .agent_types
            .iter()
            .map(|t| t.agent_type.as_str())
            .collect();
        assert_eq!(names, ["inbound", "outbound", "total"]);
        assert_eq!(r.agent_types[0].limit, Some(5));
        assert_eq!(r.agent_types[1].peak, 0);
        let json = serde_json::to_string(&r).unwrap();
        let csv = to_csv(&r);
        let text = to_text(&r);
        for out in [&json, &csv, &text] {
            assert!(!out.contains("agent-secret-7"));
        }
        assert!(csv.contains("agent_type,total,peak,2\n"), "{csv}");
        assert!(
            csv.contains("rejections,aggregate_limit,count,2\n"),
            "{csv}"
        );
    }

    #[test]
    fn reports_side_by_side_line_up_by_type() {
        let license = |context: &str, types: &[(&str, u32)]| LicenseFacts {
            id: "L".into(),
            customer: "C".into(),
            context: context.parse().unwrap(),
            total: Some(10),
            types: counts(types),
        };
        let window = |pairs: &[(&str, u32)], total| {
            let mut u = Usage::new(0);
            u.observe(DAY, &counts(pairs), total);
            u.so_far(DAY + H).unwrap()
        };
        let prod = build(
            "prod",
            "b1",
            &license("production", &[("inbound", 5)]),
            &window(&[("inbound", 4)], 4),
            false,
            Vec::new(),
        );
        let backup = build(
            "dr",
            "b9",
            &license("backup", &[("outbound", 2)]),
            &window(&[("outbound", 1)], 1),
            false,
            Vec::new(),
        );
        let text = side_by_side(&[prod, backup]);
        let row = |name: &str| {
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("no {name} row:\n{text}"))
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
        };
        assert!(
            text.contains("prod (production)") && text.contains("dr (backup)"),
            "{text}"
        );
        assert_eq!(row("inbound"), ["5", "4", "4.00", "-", "-", "-"]);
        assert_eq!(row("outbound"), ["-", "-", "-", "2", "1", "1.00"]);
        assert_eq!(row("total"), ["10", "4", "4.00", "10", "1", "1.00"]);
    }

    /// A development master's report says, in every format, that its usage is not for
    /// production use; a production one does not.
    #[test]
    fn a_development_report_is_marked_not_for_production() {
        let mut u = Usage::new(0);
        u.observe(DAY, &counts(&[("inbound", 1)]), 1);
        let window = u.so_far(DAY + H).unwrap();
        let dev = report_in("lab", lmbus_schemas::Context::Development, &window);
        let prod = report_in("acme", lmbus_schemas::Context::Production, &window);
        assert!(dev.not_for_production && !prod.not_for_production);
        assert_eq!(dev.context, "development");
        assert!(
            to_text(&dev).contains("development: not for production use"),
            "{}",
            to_text(&dev)
        );
        assert!(!to_text(&prod).contains("not for production"));
        assert!(to_csv(&dev).contains("report,lab,not_for_production,true\n"));
        assert!(to_csv(&prod).contains("report,acme,not_for_production,false\n"));
        let json = serde_json::to_value(&dev).unwrap();
        assert_eq!(json["not_for_production"], true);
        assert!(side_by_side(&[prod, dev]).contains("lab (development: not for production use)"));
    }

    /// The report of `window` for a master of `context` (a 4-seat license, no alerts).
    fn report_in(
        cluster: &str,
        context: lmbus_schemas::Context,
        window: &UsageWindow,
    ) -> UsageReport {
        let facts = LicenseFacts {
            id: "L".into(),
            customer: "C".into(),
            context,
            total: Some(4),
            types: counts(&[]),
        };
        build(cluster, "r1", &facts, window, false, Vec::new())
    }

    /// A backup's leader told when it hears production: the overlap counts only the time
    /// with seats held while it did (2 h of the 4 h heard, 3 h with seats), and the
    /// seat-hours are the integral of the seats held. A production master counts the same
    /// way (told while a backup holds seats) and shows it only when it is not zero.
    #[test]
    fn a_backup_report_counts_its_overlap_with_production_and_its_seat_hours() {
        let mut u = Usage::new(0);
        u.observe(DAY, &counts(&[]), 0);
        u.set_overlapping(DAY, false);
        u.observe(DAY + H, &counts(&[("inbound", 2)]), 2);
        u.set_overlapping(DAY + 2 * H, true);
        u.set_overlapping(DAY + 2 * H + 1, true); // no change, nothing moves
        u.observe(DAY + 4 * H, &counts(&[]), 0);
        u.set_overlapping(DAY + 6 * H, false);
        let window = u.so_far(DAY + 8 * H).unwrap();
        assert_eq!(window.overlap_ms, Some(2 * H as u64));
        let backup = report_in("dr", lmbus_schemas::Context::Backup, &window);
        let used = backup.backup.clone().unwrap();
        assert!((used.overlap_minutes - 120.0).abs() < 1e-9, "{used:?}");
        let total = backup.agent_types.last().unwrap();
        assert!((total.seat_hours - 6.0).abs() < 1e-9, "{total:?}");
        assert!(to_csv(&backup).contains("backup,dr,overlap_minutes,120.00\n"));
        assert!(to_csv(&backup).contains("agent_type,total,seat_hours,6.000\n"));
        assert!(to_text(&backup).contains("(overlap): 120.00 minutes"));
        let production = report_in("acme", lmbus_schemas::Context::Production, &window);
        assert_eq!(production.backup, Some(used));
        assert!(
            to_text(&production).contains("while a backup master held seats (overlap): 120.00")
        );
        let both = side_by_side(&[production, backup]);
        assert!(
            both.lines()
                .any(|l| l.starts_with("overlap minutes") && l.matches("120.00").count() == 2),
            "{both}"
        );
        let mut quiet = Usage::new(0);
        quiet.observe(DAY, &counts(&[("inbound", 1)]), 1);
        quiet.set_overlapping(DAY, false);
        let quiet = quiet.so_far(DAY + H).unwrap();
        assert_eq!(quiet.overlap_ms, Some(0));
        let production = report_in("acme", lmbus_schemas::Context::Production, &quiet);
        assert!(production.backup.is_none(), "no overlap, not shown");
        // A window never told (a production master) has no overlap.
        let mut p = Usage::new(0);
        p.observe(DAY, &counts(&[("inbound", 1)]), 1);
        assert_eq!(p.so_far(DAY + H).unwrap().overlap_ms, None);
    }

    /// Each report lists when its master held seats; side by side, the minutes a production
    /// and a backup master both did are counted from those spans, whether or not either
    /// heard the other (their own overlaps, never told here, say nothing). A span open at
    /// the day's end is cut there and goes on in the next period; the list is bounded.
    #[test]
    fn spans_of_use_show_both_in_use_side_by_side_even_in_a_split() {
        let span = |from_ms, to_ms| Span { from_ms, to_ms };
        let mut p = Usage::new(0);
        p.observe(DAY, &counts(&[]), 0);
        p.observe(DAY + H, &counts(&[("inbound", 2)]), 2);
        p.observe(DAY + 2 * H, &counts(&[("inbound", 1)]), 1); // still in use
        p.observe(DAY + 3 * H, &counts(&[]), 0);
        p.observe(DAY + 5 * H, &counts(&[("inbound", 1)]), 1);
        let pw = p.so_far(DAY + 6 * H).unwrap();
        assert_eq!(
            pw.in_use,
            [span(DAY + H, DAY + 3 * H), span(DAY + 5 * H, DAY + 6 * H)]
        );
        let mut b = Usage::new(0);
        b.observe(DAY + 2 * H, &counts(&[("inbound", 1)]), 1);
        b.observe(DAY + 11 * H / 2, &counts(&[]), 0);
        let bw = b.so_far(DAY + 6 * H).unwrap();
        assert_eq!(bw.in_use, [span(DAY + 2 * H, DAY + 11 * H / 2)]);
        let production = report_in("acme", lmbus_schemas::Context::Production, &pw);
        let backup = report_in("acme-dr", lmbus_schemas::Context::Backup, &bw);
        // 2h..3h and 5h..5.5h: 90 minutes, in both columns.
        let both = side_by_side(&[production.clone(), backup.clone()]);
        assert!(
            both.lines()
                .any(|l| l.starts_with("both in use (min)") && l.matches("90.00").count() == 2),
            "{both}"
        );
        assert!(
            to_csv(&backup).contains("in_use,2026-11-24T02:00:00Z,until,2026-11-24T05:30:00Z\n")
        );
        // A report alone, or from an older master (no spans), has no figure.
        assert!(
            side_by_side(std::slice::from_ref(&production))
                .lines()
                .any(|l| l.starts_with("both in use (min)") && l.contains('-'))
        );
        let mut older = backup;
        older.in_use = None;
        assert_eq!(both_in_use(&production, &[production.clone(), older]), None);
        // The day's end cuts an open span; the next period starts in use.
        let mut d = Usage::new(0);
        d.observe(DAY + 23 * H, &counts(&[("inbound", 1)]), 1);
        d.observe(DAY + DAY_MS + H, &counts(&[("inbound", 1)]), 1);
        let closed = d.take_closed().unwrap();
        assert_eq!(closed.in_use, [span(DAY + 23 * H, DAY + DAY_MS)]);
        assert_eq!(
            d.so_far(DAY + DAY_MS + H).unwrap().in_use,
            [span(DAY + DAY_MS, DAY + DAY_MS + H)]
        );
        // Bounded: past the bound, the two spans with the shortest gap join (covering more,
        // never less, and as little more as can be).
        let mut many = Vec::new();
        for i in 0..MAX_IN_USE_SPANS as i64 {
            push_span(&mut many, span(100 * i, 100 * i + 50));
        }
        push_span(
            &mut many,
            span(
                100 * MAX_IN_USE_SPANS as i64 - 40,
                100 * MAX_IN_USE_SPANS as i64,
            ),
        );
        assert_eq!(many.len(), MAX_IN_USE_SPANS);
        let last = MAX_IN_USE_SPANS as i64 - 1;
        assert_eq!(many.last().unwrap(), &span(100 * last, 100 * (last + 1)));
        assert_eq!(many[0], span(0, 50));
        // Spans from a file are taken as they come: unsorted, overlapping, empty.
        assert_eq!(
            normalized(&[span(50, 60), span(0, 10), span(5, 20), span(30, 30)]),
            [span(0, 20), span(50, 60)]
        );
    }

    #[test]
    fn time_of_day_is_checked() {
        assert_eq!(parse_time_of_day("00:00"), Ok(0));
        assert_eq!(parse_time_of_day("23:59"), Ok(23 * 60 + 59));
        assert!(parse_time_of_day("24:00").is_err());
        assert!(parse_time_of_day("7").is_err());
    }
}
