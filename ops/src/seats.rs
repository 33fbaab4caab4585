//! Who holds what (`lmbus-broker admin seats`, the web dashboard's seats page): every seat
//! the master holds, with its slave, agent, type, since when and which replica granted it,
//! gathered through the status request (the slave list, then each slave's seats), and the
//! plain table the CLI prints.

use std::fmt::Write as _;
use std::time::Duration;

use lmbus_schemas::{HeldSeat, StatusReply, StatusRequest, Subjects, printable};
use serde::Serialize;

use crate::status::{StatusError, ask_status, fetch_status};

/// Which seats to list: each filter, when set, must match exactly.
#[derive(Debug, Clone, Default)]
pub struct SeatFilter {
    pub slave: Option<String>,
    pub agent_type: Option<String>,
    pub agent: Option<String>,
}

/// One seat, as the master's books have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeatRow {
    pub slave: String,
    pub agent_id: String,
    pub agent_type: String,
    /// When it was granted (the granting leader's clock, Unix milliseconds); 0: unknown.
    pub since_ms: u64,
    /// The broker replica that granted it (the leader then); empty: unknown.
    pub granted_by: String,
    /// What this master is to the slave now (only, primary or secondary, and whether the
    /// slave sends its registrations to it), from the slave's heartbeats.
    pub master: Option<String>,
}

/// The seats that matched, and the slaves whose list the master cut short.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeatList {
    pub cluster: String,
    pub seats: Vec<SeatRow>,
    /// Slaves that hold more seats than one status reply lists (see `STATUS_MAX_AGENTS`):
    /// their rows are incomplete.
    pub truncated: Vec<String>,
}

/// Every seat matching `filter`: the master's status, then the seats of each slave that
/// holds any (one request per slave). A slave named by the filter is asked even when the
/// status's bounded slave list leaves it out.
pub async fn fetch_seats(
    client: &async_nats::Client,
    subjects: &Subjects,
    filter: &SeatFilter,
    timeout: Duration,
) -> Result<SeatList, StatusError> {
    let status = fetch_status(client, subjects, timeout).await?;
    let mut wanted: Vec<(String, u32, Option<String>)> = status
        .slaves
        .iter()
        .filter(|s| filter.slave.as_ref().is_none_or(|want| *want == s.slave_id))
        .filter(|s| s.in_use > 0)
        .filter(|s| {
            filter
                .agent_type
                .as_ref()
                .is_none_or(|t| s.in_use_by_type.contains_key(t))
        })
        .map(|s| {
            (
                s.slave_id.clone(),
                s.in_use,
                s.master.map(|m| m.to_string()),
            )
        })
        .collect();
    if let Some(slave) = &filter.slave
        && wanted.is_empty()
        && !status.slaves.iter().any(|s| s.slave_id == *slave)
    {
        wanted.push((slave.clone(), u32::MAX, None));
    }
    let mut list = SeatList {
        cluster: status.cluster.clone(),
        ..SeatList::default()
    };
    for (slave, in_use, master) in wanted {
        let request = StatusRequest {
            agents_of: Some(slave.clone()),
            seat_details: true,
        };
        let reply = ask_status(client, subjects, timeout, request).await?;
        let seats = seats_of_reply(reply);
        if in_use != u32::MAX && (seats.len() as u64) < u64::from(in_use) {
            list.truncated.push(slave.clone());
        }
        list.seats.extend(
            seats
                .into_iter()
                .filter(|s| filter.agent.as_ref().is_none_or(|a| *a == s.agent_id))
                .filter(|s| {
                    filter
                        .agent_type
                        .as_ref()
                        .is_none_or(|t| *t == s.agent_type)
                })
                .map(|s| SeatRow {
                    slave: slave.clone(),
                    agent_id: s.agent_id,
                    agent_type: s.agent_type,
                    since_ms: s.since_ms,
                    granted_by: s.granted_by,
                    master: master.clone(),
                }),
        );
    }
    Ok(list)
}

/// The seats of a reply: its detailed list, or (a master of an older build, which ignores
/// `seat_details`) its plain agent list with the details unknown.
fn seats_of_reply(reply: StatusReply) -> Vec<HeldSeat> {
    if !reply.seats.is_empty() {
        return reply.seats;
    }
    reply
        .agents
        .into_iter()
        .map(|a| HeldSeat {
            agent_id: a.agent_id,
            agent_type: a.agent_type,
            since_ms: 0,
            granted_by: String::new(),
        })
        .collect()
}

/// A grant time as UTC to the second, or "unknown" (a seat an older leader recorded).
pub fn since_text(since_ms: u64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
    if since_ms == 0 {
        return "unknown".to_owned();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// How long a seat has been held at `now_ms`, for people ("3 h 2 min"), or "" when unknown.
pub fn held_for(since_ms: u64, now_ms: u64) -> String {
    if since_ms == 0 || now_ms < since_ms {
        return String::new();
    }
    lmbus_schemas::human::duration(Duration::from_millis(now_ms - since_ms))
}

/// The table `admin seats` prints: one row per seat, network text made printable.
pub fn render_seats(list: &SeatList, now_ms: u64) -> String {
    let mut rows = vec![[
        "SLAVE".to_owned(),
        "AGENT".to_owned(),
        "TYPE".to_owned(),
        "SINCE".to_owned(),
        "HELD FOR".to_owned(),
        "GRANTED BY".to_owned(),
        "MASTER".to_owned(),
    ]];
    for s in &list.seats {
        rows.push([
            printable(&s.slave).into_owned(),
            printable(&s.agent_id).into_owned(),
            printable(&s.agent_type).into_owned(),
            since_text(s.since_ms),
            held_for(s.since_ms, now_ms),
            if s.granted_by.is_empty() {
                "unknown".to_owned()
            } else {
                printable(&s.granted_by).into_owned()
            },
            s.master.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{} on cluster {}",
        lmbus_schemas::human::plural(list.seats.len() as u64, "seat", "seats"),
        printable(&list.cluster)
    );
    for slave in &list.truncated {
        let _ = writeln!(
            out,
            "slave {} holds more seats than one status reply lists: its rows are incomplete",
            printable(slave)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_every_seat_with_its_details() {
        let list = SeatList {
            cluster: "c1".into(),
            seats: vec![
                SeatRow {
                    slave: "site-a".into(),
                    agent_id: "a1".into(),
                    agent_type: "inbound".into(),
                    since_ms: 1_700_000_000_000,
                    granted_by: "b1".into(),
                    master: Some("primary, in use".into()),
                },
                SeatRow {
                    slave: "site-b".into(),
                    agent_id: "a\u{1b}2".into(),
                    agent_type: "outbound".into(),
                    since_ms: 0,
                    granted_by: String::new(),
                    master: None,
                },
            ],
            truncated: vec!["site-c".into()],
        };
        let text = render_seats(&list, 1_700_000_000_000 + 3 * 3_600_000);
        assert!(text.contains("2023-11-14 22:13:20Z"), "{text}");
        assert!(text.contains("3 h"), "{text}");
        assert!(text.contains("primary, in use"), "{text}");
        assert!(text.contains("unknown"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("2 seats on cluster c1"), "{text}");
        assert!(text.contains("slave site-c holds more seats"), "{text}");
    }
}
