//! The alert monitor: tails lmbus alerts and renders the License Monitor view.
//!
//! The binary (`main.rs`) only parses flags; the functions here take a NATS client and a
//! writer so tests can drive them.

mod audit;
pub mod live;

pub use audit::{Audit, AuditQuery, AuditRecord, Stored, audit, render_audit, stored};

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use lmbus_schemas::{
    Alert, AlertKind, Severity, SlaveStatus, StatusReply, StatusRequest, Subjects, decode, encode,
};
use time::OffsetDateTime;
use time::macros::format_description;

/// Which alerts to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Show alerts of this severity or worse.
    pub min_severity: Option<Severity>,
    /// Show only these kinds (all when empty).
    pub kinds: BTreeSet<AlertKind>,
    /// Show only alerts about these slaves (all when empty).
    pub slaves: BTreeSet<String>,
    /// Show only alerts about these agent types (all when empty).
    pub agent_types: BTreeSet<String>,
}

impl Filter {
    pub fn matches(&self, alert: &Alert) -> bool {
        self.min_severity.is_none_or(|min| alert.severity >= min)
            && (self.kinds.is_empty() || self.kinds.contains(&alert.kind))
            && (self.slaves.is_empty()
                || alert
                    .slave
                    .as_ref()
                    .is_some_and(|s| self.slaves.contains(s)))
            && (self.agent_types.is_empty()
                || alert
                    .agent_type
                    .as_ref()
                    .is_some_and(|t| self.agent_types.contains(t)))
    }
}

/// How `tail` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One readable line per alert.
    Text,
    /// One JSON document per line.
    Json,
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

/// One readable line: time, severity, kind, slave, details.
pub fn format_alert(alert: &Alert) -> String {
    let mut line = format!(
        "{} {:<8} {:<22}",
        format_time(alert.time_ms),
        alert.severity.token().to_uppercase(),
        alert.kind.token()
    );
    let _ = write!(line, " slave={}", alert.slave.as_deref().unwrap_or("-"));
    if let Some(agent) = &alert.agent_id {
        let _ = write!(line, " agent={agent}");
    }
    if let Some(t) = &alert.agent_type {
        let _ = write!(line, " type={t}");
    }
    if let Some(reason) = alert.reason {
        let _ = write!(line, " reason={reason}");
    }
    let _ = write!(line, " | {}", alert.message);
    // Everything in an alert came over the network: show control characters escaped, so
    // an alert can neither move the cursor, retitle the terminal nor forge a line.
    lmbus_schemas::printable(&line).into_owned()
}

/// `s` with every text that came from the network made printable
/// ([`lmbus_schemas::printable`]), for the table and the live view.
pub fn printable_status(s: &StatusReply) -> StatusReply {
    use lmbus_schemas::printable;
    let p = |t: &str| printable(t).into_owned();
    let mut s = s.clone();
    s.cluster = p(&s.cluster);
    s.broker_id = p(&s.broker_id);
    s.license.customer = p(&s.license.customer);
    for r in &mut s.replicas {
        r.replica = p(&r.replica);
    }
    s.type_limits = s.type_limits.into_iter().map(|(t, n)| (p(&t), n)).collect();
    s.in_use_by_type = s
        .in_use_by_type
        .into_iter()
        .map(|(t, n)| (p(&t), n))
        .collect();
    for slave in &mut s.slaves {
        slave.slave_id = p(&slave.slave_id);
        slave.in_use_by_type = std::mem::take(&mut slave.in_use_by_type)
            .into_iter()
            .map(|(t, n)| (p(&t), n))
            .collect();
    }
    s
}

/// One alert message as received: from the alert stream (with its stream sequence) or
/// from a live subscription.
#[derive(Debug)]
pub struct Incoming {
    pub subject: String,
    pub payload: bytes::Bytes,
    pub sequence: Option<u64>,
}

/// Where `tail` starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only alerts published from now on.
    Now,
    /// Alerts published since this long ago.
    Since(Duration),
    /// The last N alerts stored (before filtering).
    Last(u64),
}

/// The alerts of `subjects`' cluster from `from` on: from the alert stream through an
/// ordered consumer (which picks up where it left off after a reconnect: no gap, no
/// duplicate), or, when the cluster has no alert stream, from a live subscription (only
/// `Start::Now` then). Also returns the stream's last sequence at the start, where a
/// history-only tail stops.
pub async fn alert_source(
    client: &async_nats::Client,
    subjects: &Subjects,
    from: Start,
) -> anyhow::Result<(
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Incoming, String>> + Send>>,
    Option<u64>,
)> {
    use async_nats::jetstream::consumer::{DeliverPolicy, push};
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = match js.get_stream(subjects.alert_stream()).await {
        Ok(stream) => stream,
        Err(e) => {
            if from != Start::Now {
                anyhow::bail!(
                    "cannot read the alert stream {} ({e}): --since and --last need a broker that keeps alerts, and NATS permission to read the stream",
                    subjects.alert_stream()
                );
            }
            eprintln!(
                "lmbus-monitor: no alert stream {} ({e}); showing live alerts only",
                subjects.alert_stream()
            );
            let sub = client
                .subscribe(subjects.all_alerts())
                .await
                .context("cannot subscribe to alerts")?;
            let live = sub.map(|m| {
                Ok(Incoming {
                    subject: m.subject.to_string(),
                    payload: m.payload,
                    sequence: None,
                })
            });
            return Ok((Box::pin(live), None));
        }
    };
    let state = stream
        .info()
        .await
        .context("cannot read the alert stream's state")?
        .state
        .clone();
    let deliver_policy = match from {
        Start::Now => DeliverPolicy::New,
        Start::Since(ago) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::now_utc() - ago,
        },
        Start::Last(n) => DeliverPolicy::ByStartSequence {
            start_sequence: state
                .last_sequence
                .saturating_sub(n.saturating_sub(1))
                .max(state.first_sequence)
                .max(1),
        },
    };
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: subjects.all_alerts(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .context("cannot read the alert stream")?;
    let messages = consumer
        .messages()
        .await
        .context("cannot read the alert stream")?;
    let incoming = messages.map(|item| match item {
        Ok(m) => Ok(Incoming {
            subject: m.subject.to_string(),
            sequence: m.info().ok().map(|i| i.stream_sequence),
            payload: m.payload.clone(),
        }),
        Err(e) => Err(e.to_string()),
    });
    let last = (state.messages > 0).then_some(state.last_sequence);
    Ok((Box::pin(incoming), last))
}

/// Prints alerts from `incoming` that pass `filter` until `shutdown`, until `max` alerts
/// were printed, until the alert with stream sequence `until` was read, or until the
/// source ends. Undecodable messages are reported on stderr and skipped; a lost
/// connection is reported there too, and reading resumes after the last alert read.
/// Returns how many alerts were printed.
/// How long stored history may pause before a reader calls it a stall.
pub const HISTORY_STALL: Duration = Duration::from_secs(10);

/// What to check when a JetStream reader stalls part way.
pub const FLOW_CONTROL_HINT: &str = "check that this NATS user may publish on $JS.FC.> (JetStream flow control; see deploy/nats-server.conf) and that the NATS server is reachable";

pub async fn tail(
    mut incoming: impl futures::Stream<Item = Result<Incoming, String>> + Unpin,
    filter: &Filter,
    format: Format,
    max: Option<usize>,
    until: Option<u64>,
    out: &mut (impl Write + Send),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<usize> {
    tokio::pin!(shutdown);
    let mut printed = 0;
    let mut last_read: Option<u64> = None;
    let done = |last: Option<u64>| matches!((until, last), (Some(u), Some(l)) if l >= u);
    // Stored history arrives at once; no progress before its end is a stall, most often a
    // NATS user without the flow-control permission (the consumer is then recreated again
    // and again, each time with an interruption, so only progress counts).
    let mut progress_at = tokio::time::Instant::now();
    while max.is_none_or(|m| printed < m) && !done(last_read) {
        let stall = async {
            match until {
                Some(_) => tokio::time::sleep_until(progress_at + HISTORY_STALL).await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            _ = &mut shutdown => break,
            _ = stall => anyhow::bail!(
                "the alert stream stopped delivering stored alerts after #{} of #{}: {FLOW_CONTROL_HINT}",
                last_read.unwrap_or(0),
                until.unwrap_or(0)
            ),
            msg = incoming.next() => match msg {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    eprintln!(
                        "lmbus-monitor: the alert stream was interrupted ({e}); resuming after alert #{}",
                        last_read.unwrap_or(0)
                    );
                    continue;
                }
                None => break,
            },
        };
        if msg
            .sequence
            .is_some_and(|s| last_read.is_none_or(|l| s > l))
        {
            progress_at = tokio::time::Instant::now();
        }
        last_read = msg.sequence.or(last_read);
        let alert: Alert = match decode(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                eprintln!(
                    "lmbus-monitor: skipping undecodable alert on {}: {e}",
                    msg.subject
                );
                continue;
            }
        };
        if !filter.matches(&alert) {
            continue;
        }
        match format {
            Format::Text => writeln!(out, "{}", format_alert(&alert))?,
            Format::Json => writeln!(out, "{}", serde_json::to_string(&alert)?)?,
        }
        out.flush()?;
        printed += 1;
    }
    Ok(printed)
}

/// Asks the master for its License Monitor view.
pub async fn fetch_status(
    client: &async_nats::Client,
    subjects: &Subjects,
    timeout: Duration,
) -> anyhow::Result<StatusReply> {
    let subject = subjects.status();
    let request = client.request(subject.clone(), encode(&StatusRequest {})?.into());
    let msg = match tokio::time::timeout(timeout, request).await {
        Err(_) => bail!(
            "no master answered on {subject} within {timeout:?}: is lmbus-broker running for cluster {}?",
            subjects.cluster()
        ),
        Ok(r) => r.with_context(|| {
            format!(
                "no master answered on {subject}: is lmbus-broker running for cluster {}?",
                subjects.cluster()
            )
        })?,
    };
    decode(&msg.payload)
        .with_context(|| format!("the master's status reply on {subject} is not readable"))
}

fn bar(used: u32, limit: u32, width: usize) -> String {
    let filled = if limit == 0 {
        width
    } else {
        ((used as usize * width).div_ceil(limit as usize)).min(width)
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// The master license and whether unlicensed slaves are allowed, for both views.
pub(crate) fn license_summary(s: &StatusReply) -> String {
    format!(
        "license {} ({}, {}, expires {})  unlicensed slaves: {}",
        s.license.id,
        s.license.customer,
        s.license.context,
        s.license.expires,
        if s.allow_unlicensed_slaves {
            "allowed"
        } else {
            "refused"
        }
    )
}

/// The texts of one slave's row, shared by the table and the live view: id, state, what this
/// master is to it, license, local limit, agents, agents by type, last seen.
pub(crate) fn slave_cells(slave: &SlaveStatus) -> [String; 8] {
    let by_type = slave
        .in_use_by_type
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    [
        slave.slave_id.clone(),
        if slave.connected {
            "connected"
        } else {
            "DISCONNECTED"
        }
        .to_owned(),
        slave.master.map_or("-".to_owned(), |m| m.to_string()),
        match slave.license {
            Some(id) => id.simple().to_string()[..8].to_owned(),
            None => "unlicensed".to_owned(),
        },
        slave.local_limit.map_or("-".to_owned(), |l| l.to_string()),
        slave.in_use.to_string(),
        if by_type.is_empty() {
            "-".to_owned()
        } else {
            by_type
        },
        format!("{:.1}s ago", slave.last_seen_ms_ago as f64 / 1000.0),
    ]
}

/// The License Monitor view as a plain table.
pub fn render_status(s: &StatusReply) -> String {
    let s = &printable_status(s);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cluster {}  leader {} (term {}, ledger at {})  {}",
        s.cluster,
        s.broker_id,
        s.leader_term,
        s.ledger_sequence,
        license_summary(s)
    );
    if !s.replicas.is_empty() {
        let replicas: Vec<String> = s
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{} ({}, priority {}, ledger at {}, seen {:.1}s ago)",
                    r.replica,
                    if r.leader { "leader" } else { "standby" },
                    r.priority,
                    r.applied,
                    r.last_seen_ms_ago as f64 / 1000.0
                )
            })
            .collect();
        let _ = writeln!(o, "replicas: {}", replicas.join("; "));
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<16} {:>7} {:>7}  USAGE",
        "AGENT TYPE", "IN USE", "LIMIT"
    );
    let mut types: BTreeSet<&String> = s.type_limits.keys().collect();
    types.extend(s.in_use_by_type.keys());
    for t in types {
        let used = s.in_use_by_type.get(t).copied().unwrap_or(0);
        let (limit, usage) = match s.type_limits.get(t) {
            Some(&l) => (l.to_string(), bar(used, l, 20)),
            None => ("-".into(), String::new()),
        };
        let _ = writeln!(o, "{t:<16} {used:>7} {limit:>7}  {usage}");
    }
    let _ = writeln!(
        o,
        "{:<16} {:>7} {:>7}  {}",
        "TOTAL",
        s.total_in_use,
        s.total_limit,
        bar(s.total_in_use, s.total_limit, 20)
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<20} {:<13} {:<18} {:<12} {:>6} {:>7}  {:<28} LAST SEEN",
        "SLAVE", "STATE", "THIS MASTER IS", "LICENSE", "LOCAL", "AGENTS", "BY TYPE"
    );
    if s.slaves.is_empty() {
        let _ = writeln!(o, "(no slaves)");
    }
    let unlisted = (s.slaves_total as usize).saturating_sub(s.slaves.len());
    for slave in &s.slaves {
        let [id, state, master, license, local, agents, by_type, seen] = slave_cells(slave);
        let _ = writeln!(
            o,
            "{id:<20} {state:<13} {master:<18} {license:<12} {local:>6} {agents:>7}  {by_type:<28} {seen}"
        );
    }
    if unlisted > 0 {
        let _ = writeln!(
            o,
            "... and {unlisted} more slaves not listed ({} of {} connected in all)",
            s.slaves_connected, s.slaves_total
        );
    }
    o
}
