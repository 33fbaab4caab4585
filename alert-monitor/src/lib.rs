//! The alert monitor: tails lmbus alerts and renders the License Monitor view.
//!
//! The binary (`main.rs`) only parses flags; the functions here take a NATS client and a
//! writer so tests can drive them.

mod audit;
pub mod live;
mod live_view;
mod time_text;
pub mod web;

pub use audit::{Audit, AuditQuery, AuditRecord, audit, render_audit};
pub use time_text::{format_time, parse_since};

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use lmbus_schemas::{Alert, AlertKind, Severity, Subjects, decode};

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
    /// Whether it lets every alert through.
    pub fn is_empty(&self) -> bool {
        self.min_severity.is_none()
            && self.kinds.is_empty()
            && self.slaves.is_empty()
            && self.agent_types.is_empty()
    }

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
    // A development master's alerts say so on every line, and so do a backup master's: the
    // tail shows which slaves a backup serves (production's are in the JSON's `context`).
    if alert.not_for_production {
        let _ = write!(line, " [{}]", lmbus_schemas::NOT_FOR_PRODUCTION);
    } else if alert.context == lmbus_schemas::Context::Backup.token() {
        let _ = write!(line, " [backup master]");
    }
    let _ = write!(line, " | {}", alert.message);
    // Everything in an alert came over the network: show control characters escaped, so
    // an alert can neither move the cursor, retitle the terminal nor forge a line.
    lmbus_schemas::printable(&line).into_owned()
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
    /// The last N alerts stored (before filtering: `tail`'s `hold_last` counts after).
    Last(u64),
    /// Every alert stored.
    All,
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
        Start::All => DeliverPolicy::All,
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

/// How long stored history may pause before a reader calls it a stall.
pub const HISTORY_STALL: Duration = Duration::from_secs(10);

/// `--last N` counted after the filters: of the alerts up to stream sequence `end` (the
/// history's end when the tail started), only the last `n` that pass the filter are
/// printed, once `end` was read; alerts after it are printed as they come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLast {
    pub n: usize,
    pub end: u64,
}

/// Prints alerts from `incoming` that pass `filter` until `shutdown`, until `max` alerts
/// were printed, until the alert with stream sequence `until` was read, or until the
/// source ends; with `hold_last`, only the last N matching alerts of the history (see
/// [`HoldLast`]). Undecodable messages are reported on stderr and skipped; a lost
/// connection is reported there too, and reading resumes after the last alert read.
/// Returns how many alerts were printed.
#[allow(clippy::too_many_arguments)]
pub async fn tail(
    mut incoming: impl futures::Stream<Item = Result<Incoming, String>> + Unpin,
    filter: &Filter,
    format: Format,
    max: Option<usize>,
    until: Option<u64>,
    hold_last: Option<HoldLast>,
    out: &mut (impl Write + Send),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<usize> {
    tokio::pin!(shutdown);
    let mut printed = 0;
    let mut print = |alert: &Alert, printed: &mut usize| -> anyhow::Result<()> {
        if max.is_some_and(|m| *printed >= m) {
            return Ok(());
        }
        match format {
            Format::Text => writeln!(out, "{}", format_alert(alert))?,
            Format::Json => writeln!(out, "{}", serde_json::to_string(alert)?)?,
        }
        out.flush()?;
        *printed += 1;
        Ok(())
    };
    // The matching alerts of the history held back for `hold_last`, at most N.
    let mut held = std::collections::VecDeque::new();
    let mut holding = hold_last.filter(|h| h.end > 0);
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
                "the alert stream stopped delivering stored alerts after #{} of #{}: {}",
                last_read.unwrap_or(0),
                until.unwrap_or(0),
                lmbus_ops::FLOW_CONTROL_HINT
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
        let alert: Option<Alert> = match decode(&msg.payload) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!(
                    "lmbus-monitor: skipping undecodable alert on {}: {e}",
                    msg.subject
                );
                None
            }
        };
        let alert = alert.filter(|a| filter.matches(a));
        match holding {
            Some(hold) if msg.sequence.is_some_and(|s| s <= hold.end) => {
                held.extend(alert);
                if held.len() > hold.n {
                    held.pop_front();
                }
                if msg.sequence.is_some_and(|s| s >= hold.end) {
                    holding = None;
                    for alert in held.drain(..) {
                        print(&alert, &mut printed)?;
                    }
                }
            }
            _ => {
                if let Some(alert) = alert {
                    print(&alert, &mut printed)?;
                }
            }
        }
    }
    // The history ended early (the source, a shutdown): what was held is still the last.
    for alert in held.drain(..) {
        print(&alert, &mut printed)?;
    }
    Ok(printed)
}

#[cfg(test)]
mod tests {
    use lmbus_schemas::{Alert, AlertKind, Context, Severity};

    use super::format_alert;

    /// A tailed line says which context raised it when that is not production: a backup
    /// master's lines are marked, so the tail shows which slaves a backup serves, and a
    /// development master's say they are not for production use.
    #[test]
    fn a_line_names_a_backup_or_development_master() {
        let line = |context| {
            format_alert(
                &Alert::new(Severity::Info, AlertKind::SlaveConnected, "hello")
                    .in_context(context)
                    .slave("site1"),
            )
        };
        let backup = line(Context::Backup);
        assert!(
            backup.contains("slave=site1 [backup master] | hello"),
            "{backup}"
        );
        let development = line(Context::Development);
        assert!(
            development.contains("[development: not for production use]")
                && !development.contains("backup"),
            "{development}"
        );
        let production = line(Context::Production);
        assert!(production.contains("slave=site1 | hello"), "{production}");
    }
}
