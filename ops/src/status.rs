//! The License Monitor view as the master answers it on its status subject: the request,
//! and the plain table every operator tool prints (`lmbus-broker admin status`, the
//! monitor's `status`; the live view shares its cells).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use lmbus_schemas::human::duration;
use lmbus_schemas::{
    ReplicaBeat, Silence, SlaveStatus, StatusReply, StatusRequest, Subjects, decode, encode,
};

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
    s.allotted_by_type = s
        .allotted_by_type
        .into_iter()
        .map(|(t, n)| (p(&t), n))
        .collect();
    for slave in &mut s.slaves {
        slave.slave_id = p(&slave.slave_id);
        slave.in_use_by_type = std::mem::take(&mut slave.in_use_by_type)
            .into_iter()
            .map(|(t, n)| (p(&t), n))
            .collect();
        slave.allotted = std::mem::take(&mut slave.allotted)
            .into_iter()
            .map(|(t, n)| (p(&t), n))
            .collect();
    }
    s
}
/// Asks the master for its License Monitor view.
pub async fn fetch_status(
    client: &async_nats::Client,
    subjects: &Subjects,
    timeout: Duration,
) -> Result<StatusReply, StatusError> {
    ask_status(client, subjects, timeout, StatusRequest::default()).await
}

/// Asks the master for the agents holding a seat on `slave` (at most
/// `STATUS_MAX_AGENTS`, by agent id), through the status request.
pub async fn fetch_agents(
    client: &async_nats::Client,
    subjects: &Subjects,
    slave: &str,
    timeout: Duration,
) -> Result<Vec<lmbus_schemas::AgentClaim>, StatusError> {
    let request = StatusRequest {
        agents_of: Some(slave.to_owned()),
        seat_details: false,
    };
    Ok(ask_status(client, subjects, timeout, request).await?.agents)
}

pub(crate) async fn ask_status(
    client: &async_nats::Client,
    subjects: &Subjects,
    timeout: Duration,
    request: StatusRequest,
) -> Result<StatusReply, StatusError> {
    let subject = subjects.status();
    let no_answer = |detail: String| StatusError::NoAnswer {
        subject: subject.clone(),
        cluster: subjects.cluster().to_owned(),
        detail,
    };
    let payload = encode(&request).map_err(|e| StatusError::Encode(e.to_string()))?;
    let request = client.request(subject.clone(), payload.into());
    let msg = match tokio::time::timeout(timeout, request).await {
        Err(_) => return Err(no_answer(format!("within {timeout:?}"))),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err(no_answer(
                "(no responders: no broker replica leads)".to_owned(),
            ));
        }
        Ok(Err(e)) => return Err(no_answer(format!("({e})"))),
        Ok(Ok(msg)) => msg,
    };
    decode(&msg.payload).map_err(|e| StatusError::Unreadable {
        subject: subject.clone(),
        detail: e.to_string(),
    })
}

/// The broker replicas heard on the replica subject within `listen` (each says whether it
/// leads and whether it is drained), sorted by id: who is up when no master answers.
pub async fn replicas_up(
    client: &async_nats::Client,
    subjects: &Subjects,
    listen: Duration,
) -> Vec<ReplicaBeat> {
    use futures::StreamExt as _;
    let mut seen = std::collections::BTreeMap::new();
    let Ok(mut beats) = client.subscribe(subjects.replica()).await else {
        return Vec::new();
    };
    let until = tokio::time::Instant::now() + listen;
    while let Ok(Some(msg)) = tokio::time::timeout_at(until, beats.next()).await {
        if let Ok(beat) = decode::<ReplicaBeat>(&msg.payload) {
            seen.insert(beat.replica.clone(), beat);
        }
    }
    seen.into_values().collect()
}

/// What to tell an operator whom no master answered, from the replicas heard
/// ([`replicas_up`]); `None` when none was heard.
pub fn explain_no_master(beats: &[ReplicaBeat]) -> Option<String> {
    let first = beats.first()?;
    let list: Vec<String> = beats
        .iter()
        .map(|b| {
            let role = if b.leader {
                "leader"
            } else if b.drained {
                "drained"
            } else {
                "standby"
            };
            format!("{} ({role})", lmbus_schemas::printable(&b.replica))
        })
        .collect();
    let drained: Vec<&ReplicaBeat> = beats.iter().filter(|b| b.drained && !b.leader).collect();
    let advice = if drained.len() == beats.len() {
        format!(
            "every replica up is drained, and a drained replica does not lead: run `lmbus-broker admin undrain --replica {}` (or start another replica)",
            lmbus_schemas::printable(&first.replica)
        )
    } else {
        "a replica that can lead is up: it may be electing a leader or catching up with the ledger; retry in a few seconds, and check its log if this lasts".to_owned()
    };
    Some(format!(
        "broker replicas are up but none answered: {}; {advice}",
        list.join(", ")
    ))
}

/// Why [`fetch_status`] has no status to show.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No replica answered (none runs, none leads, or this user may not ask).
    #[error(
        "no master answered on {subject} {detail}: is lmbus-broker running for cluster {cluster}?"
    )]
    NoAnswer {
        subject: String,
        cluster: String,
        detail: String,
    },
    /// The answer did not decode: a broker of another version, or not a broker.
    #[error("the master's status reply on {subject} is not readable: {detail}")]
    Unreadable { subject: String, detail: String },
    #[error("cannot encode the status request: {0}")]
    Encode(String),
}

fn bar(used: u32, limit: u32, width: usize) -> String {
    let filled = if limit == 0 {
        width
    } else {
        ((used as usize * width).div_ceil(limit as usize)).min(width)
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// The master license's context as every view shows it: a development master's says
/// what it serves is not for production use.
pub fn context_shown(license: &lmbus_schemas::LicenseSummary) -> &str {
    if license.not_for_production {
        lmbus_schemas::NOT_FOR_PRODUCTION
    } else {
        &license.context
    }
}

/// The master license and whether unlicensed slaves are allowed, for both views.
pub fn license_summary(s: &StatusReply) -> String {
    format!(
        "license {} ({}, {}, expires {}{})  unlicensed slaves: {}",
        s.license.id,
        s.license.customer,
        context_shown(&s.license),
        s.license.expires,
        if s.license.maintenance_expires.is_empty() {
            String::new()
        } else {
            format!(", maintenance until {}", s.license.maintenance_expires)
        },
        if s.allow_unlicensed_slaves {
            "allowed"
        } else {
            "refused"
        }
    )
}

/// The master license's offline limit in words (`None`: it has none): the deadline, the
/// last vendor sync, and whether new seats are refused now.
pub fn sync_summary(s: &StatusReply) -> Option<String> {
    let sync = s.license.sync.as_ref()?;
    let time = |ms: u64| {
        i64::try_from(ms / 1000)
            .ok()
            .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "-".to_owned())
    };
    let last = if sync.last_sync_ms == 0 {
        "never (counted from the issue day)".to_owned()
    } else {
        time(sync.last_sync_ms)
    };
    Some(format!(
        "vendor sync: within {} days, last {last}, deadline {}{}",
        sync.within_days,
        time(sync.deadline_ms),
        if sync.overdue {
            "  OVERDUE: no new seats until a vendor sync succeeds"
        } else {
            ""
        }
    ))
}

/// The texts of one slave's row, shared by the table and the live view: id, state, what this
/// master is to it, license, local limit, agents, agents by type, last seen.
pub fn slave_cells(slave: &SlaveStatus) -> [String; 8] {
    let mut by_type = slave
        .in_use_by_type
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    if !slave.allotted.is_empty() {
        let free: Vec<String> = slave
            .allotted
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        if !by_type.is_empty() {
            by_type.push_str("; ");
        }
        by_type.push_str(&format!("free allotted {}", free.join(" ")));
    }
    [
        slave.slave_id.clone(),
        state_word(slave).to_owned(),
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

/// A slave's state in one word: `connected`; silent, `IN GRACE` or past it, `RESTRICTED`
/// (or `RECLAIMED` once the master reclaimed its seats), as [`SlaveStatus::silence`]
/// estimates; `DISCONNECTED` from a master that does not say the grace period.
pub fn state_word(slave: &SlaveStatus) -> &'static str {
    match slave.silence() {
        _ if slave.connected => "connected",
        None => "DISCONNECTED",
        Some(Silence::InGrace { .. }) => "IN GRACE",
        Some(Silence::PastGrace { .. }) if slave.reclaimed => "RECLAIMED",
        Some(Silence::PastGrace { .. }) => "RESTRICTED",
    }
}

/// What a silent slave is doing on its side, in a sentence (`None` while connected): the
/// dashboard's and the live view's explanation of [`state_word`].
pub fn silence_text(slave: &SlaveStatus) -> Option<String> {
    if slave.connected {
        return None;
    }
    let heard = duration(Duration::from_millis(slave.last_seen_ms_ago));
    Some(match slave.silence() {
        None => format!("silent for {heard}"),
        Some(Silence::InGrace { left_ms }) => format!(
            "silent for {heard}: if it still runs and reaches no master, it admits agents on its own for another {} (its grace period is {})",
            duration(Duration::from_millis(left_ms)),
            duration(Duration::from_millis(slave.grace_ms.unwrap_or(0)))
        ),
        Some(Silence::PastGrace { for_ms }) => {
            let after = if slave.reclaimed {
                "it logged its agents out and the master reclaimed its seats"
            } else if slave.logout_after_grace {
                "it logs its agents out (logout-all), and the master reclaims its seats after its reclaim margin"
            } else {
                "its agents stay logged in and their seats stay taken until it says hello again or an operator releases them"
            };
            format!(
                "silent for {heard}, past its {} grace period for {}: restricted on its side (no new agents); {after}",
                duration(Duration::from_millis(slave.grace_ms.unwrap_or(0))),
                duration(Duration::from_millis(for_ms))
            )
        }
    })
}

/// `  FULL` at the limit, `  OVER` above it (a lowered license), in words beside the bar.
fn limit_mark(used: u32, limit: u32) -> &'static str {
    match used.cmp(&limit) {
        std::cmp::Ordering::Greater => "  OVER",
        std::cmp::Ordering::Equal => "  FULL",
        std::cmp::Ordering::Less => "",
    }
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
    if let Some(line) = sync_summary(s) {
        let _ = writeln!(o, "{line}");
    }
    if !s.replicas.is_empty() {
        let replicas: Vec<String> = s
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{} ({}, priority {}, ledger at {}, seen {:.1}s ago)",
                    r.replica,
                    r.role(),
                    r.priority,
                    r.applied,
                    r.last_seen_ms_ago as f64 / 1000.0
                )
            })
            .collect();
        let _ = writeln!(o, "replicas: {}", replicas.join("; "));
    }
    if s.admission == lmbus_schemas::Admission::Allotment {
        let by_type: Vec<String> = s
            .allotted_by_type
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        let _ = writeln!(
            o,
            "admission: allotment; {} free seats allotted to slaves{} (counted against the limits; IN USE lags by at most one refresh)",
            s.allotted_total,
            if by_type.is_empty() {
                String::new()
            } else {
                format!(" ({})", by_type.join(" "))
            }
        );
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
            Some(&l) => (
                l.to_string(),
                format!("{}{}", bar(used, l, 20), limit_mark(used, l)),
            ),
            None => ("-".into(), String::new()),
        };
        let _ = writeln!(o, "{t:<16} {used:>7} {limit:>7}  {usage}");
    }
    let _ = writeln!(
        o,
        "{:<16} {:>7} {:>7}  {}{}",
        "TOTAL",
        s.total_in_use,
        s.total_limit,
        bar(s.total_in_use, s.total_limit, 20),
        limit_mark(s.total_in_use, s.total_limit)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A silent slave's state word and sentence follow its grace period: in grace, then
    /// restricted (saying whether its seats stay taken), then reclaimed; a connected one
    /// has no sentence, and one whose grace the master did not say is only disconnected.
    #[test]
    fn a_silent_slave_is_shown_in_grace_then_restricted() {
        let mut slave = SlaveStatus {
            slave_id: "s".into(),
            connected: true,
            license: None,
            local_limit: None,
            in_use: 2,
            in_use_by_type: BTreeMap::new(),
            last_seen_ms_ago: 20_000,
            master: None,
            allotted: BTreeMap::new(),
            grace_ms: Some(120_000),
            logout_after_grace: false,
            reclaimed: false,
        };
        assert_eq!(
            (state_word(&slave), silence_text(&slave)),
            ("connected", None)
        );
        slave.connected = false;
        assert_eq!(state_word(&slave), "IN GRACE");
        let text = silence_text(&slave).unwrap();
        assert!(
            text.contains("silent for 20 s") && text.contains("for another 100 s"),
            "{text}"
        );
        slave.last_seen_ms_ago = 180_000;
        assert_eq!(state_word(&slave), "RESTRICTED");
        let text = silence_text(&slave).unwrap();
        assert!(
            text.contains("past its 2 min grace period for 60 s")
                && text.contains("seats stay taken"),
            "{text}"
        );
        slave.logout_after_grace = true;
        assert!(
            silence_text(&slave)
                .unwrap()
                .contains("reclaims its seats after")
        );
        slave.reclaimed = true;
        assert_eq!(state_word(&slave), "RECLAIMED");
        slave.grace_ms = None;
        assert_eq!(state_word(&slave), "DISCONNECTED");
        assert_eq!(silence_text(&slave).unwrap(), "silent for 3 min");
    }

    /// A type at its limit says FULL, one above it (a lowered license) OVER, in words; the
    /// total below its limit says nothing.
    #[test]
    fn the_table_says_full_and_over_in_words() {
        let status = StatusReply {
            broker_id: "b1".into(),
            cluster: "acme".into(),
            license: lmbus_schemas::LicenseSummary {
                id: Default::default(),
                customer: "ACME".into(),
                context: "production".into(),
                expires: "2099-12-31".into(),
                maintenance_expires: "2099-06-30".into(),
                not_for_production: false,
                sync: None,
            },
            allow_unlicensed_slaves: true,
            total_limit: 10,
            type_limits: BTreeMap::from([("inbound".into(), 1), ("outbound".into(), 3)]),
            total_in_use: 5,
            in_use_by_type: BTreeMap::from([("inbound".into(), 2), ("outbound".into(), 3)]),
            slaves: Vec::new(),
            leader_term: 1,
            ledger_sequence: 1,
            replicas: Vec::new(),
            slaves_total: 0,
            slaves_connected: 0,
            admission: Default::default(),
            allotted_by_type: BTreeMap::new(),
            allotted_total: 0,
            agents: Vec::new(),
            seats: Vec::new(),
        };
        let text = render_status(&status);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line("inbound").ends_with("OVER"), "{text}");
        assert!(line("outbound").ends_with("FULL"), "{text}");
        assert!(line("TOTAL").ends_with(']'), "{text}");
        assert!(!text.contains("not for production"), "{text}");
        // A development master's status says what it serves is not for production use.
        let mut dev = status;
        dev.license.context = "development".into();
        dev.license.not_for_production = true;
        let text = render_status(&dev);
        assert!(
            text.contains("(ACME, development: not for production use, expires"),
            "{text}"
        );
        assert!(!text.contains("vendor sync"), "{text}");
        // An offline limit is shown with its deadline, and OVERDUE once passed.
        let mut synced = dev;
        synced.license.sync = Some(lmbus_schemas::SyncStatus {
            within_days: 60,
            last_sync_ms: 0,
            // 2026-03-02T00:00:00Z.
            deadline_ms: 1_772_409_600_000,
            overdue: false,
        });
        let text = render_status(&synced);
        assert!(
            text.contains(
                "vendor sync: within 60 days, last never (counted from the issue day), deadline 2026-03-02T00:00:00Z\n"
            ),
            "{text}"
        );
        if let Some(sync) = synced.license.sync.as_mut() {
            sync.overdue = true;
            sync.last_sync_ms = 1_767_225_600_000;
        }
        let text = render_status(&synced);
        assert!(text.contains("last 2026-01-01T00:00:00Z"), "{text}");
        assert!(
            text.contains("OVERDUE: no new seats until a vendor sync succeeds"),
            "{text}"
        );
    }
}
