//! The audit trail: every seat decision the master recorded (the ledger) and every alert it
//! raised (the alert stream: rejections with their reason, refused hellos, bad messages,
//! operator actions), merged in time order and filtered by slave, agent and time.

use anyhow::Context as _;
use lmbus_ops::stored;
use lmbus_schemas::{Alert, LedgerEntry, SeatChange, Subjects, decode};
use serde::Serialize;
use time::OffsetDateTime;

/// What to show: records about this slave and this agent, from this time on, and of
/// those only the last `last` (each filter is off when `None`).
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub slave: Option<String>,
    pub agent: Option<String>,
    pub since: Option<OffsetDateTime>,
    /// Keep only the last N records that pass the other filters.
    pub last: Option<usize>,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// When the master stored it (the stream's timestamp), Unix milliseconds.
    pub time_ms: i64,
    /// `ledger` (a seat decision) or `alert`.
    pub source: &'static str,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// Who asked (the slave, from the subject it published on) or whom it is about.
    pub slave: Option<String>,
    pub agent: Option<String>,
    pub agent_type: Option<String>,
    /// What was decided: granted, released, rejected, ... (for alerts, the alert kind).
    pub event: String,
    /// Why, and the rest: the reason of a rejection, the operator of a release, ...
    pub detail: String,
}

/// What the audit read: the matching records, and what the ledger no longer holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Audit {
    pub records: Vec<AuditRecord>,
    /// The first ledger record still stored, when earlier ones were trimmed
    /// (`--ledger-trim`): decisions before it are only in the snapshot, not in the trail.
    pub ledger_trimmed_before: Option<u64>,
}

impl AuditQuery {
    fn wants(&self, slave: Option<&str>, agents: &[&str]) -> bool {
        let slave_ok = self.slave.as_deref().is_none_or(|s| slave == Some(s));
        let agent_ok = self.agent.as_deref().is_none_or(|a| agents.contains(&a));
        slave_ok && agent_ok
    }
}

/// Reads the ledger and the alert stream of `subjects`' cluster up to their last record
/// now and returns the records `query` selects, oldest first.
pub async fn audit(
    client: &async_nats::Client,
    subjects: &Subjects,
    query: &AuditQuery,
) -> anyhow::Result<Audit> {
    let js = async_nats::jetstream::new(client.clone());
    let mut out = Audit::default();
    let ledger = stored(&js, &subjects.ledger_stream(), query.since)
        .await
        .context("cannot read the ledger: does the monitor's NATS user have read access to it (deploy/nats-server.conf, MONITOR)?")?;
    if ledger.first_sequence > 1 {
        out.ledger_trimmed_before = Some(ledger.first_sequence);
    }
    for (sequence, time_ms, payload) in ledger.messages {
        let entry: LedgerEntry = match decode(&payload) {
            Ok(entry) => entry,
            Err(e) => {
                out.records.push(AuditRecord {
                    time_ms,
                    source: "ledger",
                    sequence,
                    slave: None,
                    agent: None,
                    agent_type: None,
                    event: "unreadable".into(),
                    detail: format!("this build cannot read the record: {e}"),
                });
                continue;
            }
        };
        for change in entry.changes {
            out.records
                .extend(from_change(change, &entry.writer, query, sequence, time_ms));
        }
    }
    let alerts = stored(&js, &subjects.alert_stream(), query.since)
        .await
        .context("cannot read the alert stream")?;
    for (sequence, time_ms, payload) in alerts.messages {
        let Ok(alert) = decode::<Alert>(&payload) else {
            continue;
        };
        let agents: Vec<&str> = alert.agent_id.as_deref().into_iter().collect();
        if !query.wants(alert.slave.as_deref(), &agents) {
            continue;
        }
        let mut detail = String::new();
        if let Some(reason) = alert.reason {
            detail.push_str(&format!("reason={reason}; "));
        }
        detail.push_str(&alert.message);
        out.records.push(AuditRecord {
            time_ms,
            source: "alert",
            sequence,
            slave: alert.slave,
            agent: alert.agent_id,
            agent_type: alert.agent_type,
            event: alert.kind.token().to_string(),
            detail,
        });
    }
    // A decision before the alerts it caused when both carry the same millisecond.
    out.records
        .sort_by_key(|r| (r.time_ms, r.source == "alert", r.sequence));
    if let Some(last) = query.last {
        let skip = out.records.len().saturating_sub(last);
        out.records.drain(..skip);
    }
    Ok(out)
}

/// The audit lines of one ledger change, if `query` wants them.
fn from_change(
    change: SeatChange,
    writer: &str,
    query: &AuditQuery,
    sequence: u64,
    time_ms: i64,
) -> Vec<AuditRecord> {
    let record = |slave: Option<String>, agent: Option<String>, agent_type, event: &str, detail| {
        AuditRecord {
            time_ms,
            source: "ledger",
            sequence,
            slave,
            agent,
            agent_type,
            event: event.to_string(),
            detail,
        }
    };
    // One line per agent of a change about many, for the agents the query wants.
    let per_agent = |slave: &str,
                     agents: Vec<String>,
                     agent_type: Option<String>,
                     event: &str,
                     detail: &str| {
        agents
            .into_iter()
            .filter(|a| query.wants(Some(slave), &[a]))
            .map(|a| {
                record(
                    Some(slave.to_owned()),
                    Some(a),
                    agent_type.clone(),
                    event,
                    detail.to_owned(),
                )
            })
            .collect()
    };
    match change {
        SeatChange::Session {
            slave,
            license,
            local_limit,
            ..
        } if query.wants(Some(&slave), &[]) && query.agent.is_none() => vec![record(
            Some(slave),
            None,
            None,
            "session",
            format!(
                "hello accepted ({}, local limit {})",
                license.map_or("unlicensed".to_string(), |l| format!("license {l}")),
                local_limit.map_or("none".to_string(), |l| l.to_string())
            ),
        )],
        SeatChange::Grant {
            slave,
            agent_id,
            agent_type,
            request_seq,
            ..
        } if query.wants(Some(&slave), &[&agent_id]) => vec![record(
            Some(slave),
            Some(agent_id),
            Some(agent_type),
            "granted",
            if request_seq == 0 {
                "held at the slave's hello".to_string()
            } else {
                format!("registration request {request_seq}")
            },
        )],
        SeatChange::Seats {
            slave,
            agent_type,
            agent_ids,
            ..
        } => per_agent(
            &slave,
            agent_ids,
            Some(agent_type),
            "granted",
            "held at the slave's hello",
        ),
        SeatChange::Release { slave, agent_id } if query.wants(Some(&slave), &[&agent_id]) => {
            vec![record(
                Some(slave),
                Some(agent_id),
                None,
                "released",
                "unregistered by the slave".to_string(),
            )]
        }
        SeatChange::Confirm {
            slave,
            agent_id,
            request_seq,
        } if query.wants(Some(&slave), &[&agent_id]) => vec![record(
            Some(slave),
            Some(agent_id),
            None,
            "confirmed",
            format!("registration request {request_seq} found the seat already held"),
        )],
        SeatChange::FromBlock {
            slave,
            agent_id,
            agent_type,
            ..
        } if query.wants(Some(&slave), &[&agent_id]) => vec![record(
            Some(slave),
            Some(agent_id),
            Some(agent_type),
            "granted",
            "admitted by the slave from its allotted block (reported at its next refresh)"
                .to_string(),
        )],
        SeatChange::ToBlock { slave, agent_id } if query.wants(Some(&slave), &[&agent_id]) => {
            vec![record(
                Some(slave),
                Some(agent_id),
                None,
                "released",
                "released by the slave; the seat went back to its allotted block".to_string(),
            )]
        }
        SeatChange::Allotment { slave, blocks, .. }
            if query.wants(Some(&slave), &[]) && query.agent.is_none() =>
        {
            let blocks: Vec<String> = blocks.iter().map(|(t, n)| format!("{t}={n}")).collect();
            vec![record(
                Some(slave),
                None,
                None,
                "allotment",
                if blocks.is_empty() {
                    "no free seats allotted".to_string()
                } else {
                    format!("free seats allotted: {}", blocks.join(" "))
                },
            )]
        }
        SeatChange::Reclaim { slave } if query.wants(Some(&slave), &[]) => vec![record(
            Some(slave),
            None,
            None,
            "reclaimed",
            "every seat of the slave, silent beyond its grace period".to_string(),
        )],
        SeatChange::Revoke { slave, agents } => per_agent(
            &slave,
            agents,
            None,
            "revoked",
            "released by an operator (admin release)",
        ),
        SeatChange::License { .. } if query.slave.is_none() && query.agent.is_none() => {
            vec![record(
                None,
                None,
                None,
                "license",
                format!("master license reloaded by {writer}"),
            )]
        }
        SeatChange::Synced { at_ms, .. } if query.slave.is_none() && query.agent.is_none() => {
            vec![record(
                None,
                None,
                None,
                "sync",
                format!(
                    "vendor sync recorded by {writer} (at {}): the offline limit counts from here",
                    crate::time_text::format_time(i64::try_from(at_ms).unwrap_or(i64::MAX))
                ),
            )]
        }
        SeatChange::Leader { replica, term, .. }
            if query.slave.is_none() && query.agent.is_none() =>
        {
            vec![record(
                None,
                None,
                None,
                "leader",
                format!("replica {replica} leads (term {term})"),
            )]
        }
        _ => Vec::new(),
    }
}

/// The audit as text: one line per record, and a first line when the ledger was trimmed.
pub fn render_audit(audit: &Audit) -> String {
    let mut o = String::new();
    if let Some(first) = audit.ledger_trimmed_before {
        o.push_str(&format!(
            "(the ledger was trimmed: decisions before ledger record {first} are not in this trail)\n"
        ));
    }
    for r in &audit.records {
        // Ids, types and details come from the ledger and the alerts (and so from the
        // network): escaped, one record is always one line.
        let line = format!(
            "{} {:<6} #{:<7} {:<21} slave={} agent={} type={} | {}",
            crate::time_text::format_time(r.time_ms),
            r.source,
            r.sequence,
            r.event,
            r.slave.as_deref().unwrap_or("-"),
            r.agent.as_deref().unwrap_or("-"),
            r.agent_type.as_deref().unwrap_or("-"),
            r.detail
        );
        o.push_str(&lmbus_schemas::printable(&line));
        o.push('\n');
    }
    o
}
