//! The dashboard's HTML, as pure functions of what the monitor knows (the master's status,
//! the seats, the recent alerts) and who is looking: no IO, so every page is tested as text.
//! Each page has a live part (`live_*`), which the server re-renders and pushes over
//! server-sent events when the data behind it changes; the page's script swaps it in.

use std::fmt::Write as _;

use lmbus_ops::{SeatList, held_for, silence_text, since_text, slave_cells, state_word};
use lmbus_schemas::{Alert, Severity, StatusReply};

use super::auth::Role;
use crate::format_time;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment or query value.
pub fn url_part(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Who is looking: their name, role and the CSRF token their forms carry.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub user: String,
    pub role: Role,
    pub csrf: String,
    /// A session of a login (it can log out), not the anonymous viewer of a dashboard
    /// without users.
    pub logged_in: bool,
}

const NAV: [(&str, &str); 7] = [
    ("/", "Overview"),
    ("/slaves", "Slaves"),
    ("/seats", "Seats"),
    ("/denials", "Denials"),
    ("/history", "History"),
    ("/licenses", "Licenses"),
    ("/alerts", "Alerts"),
];

/// A whole page: the navigation, the viewer, and `body`. `live` names the events URL of
/// the page's live part (none: a static page).
pub fn page(title: &str, viewer: Option<&Viewer>, live: Option<&str>, body: &str) -> String {
    let mut nav = String::new();
    for (href, name) in NAV {
        let _ = write!(nav, r#"<a href="{href}">{name}</a>"#);
    }
    let who = match viewer {
        Some(v) if !v.logged_in => format!(
            r#"<span class="who">{} ({})</span>"#,
            esc(&v.user),
            v.role.token()
        ),
        Some(v) => format!(
            r#"<span class="who">{} ({})</span><form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="{}"><button type="submit">Log out</button></form>"#,
            esc(&v.user),
            v.role.token(),
            esc(&v.csrf)
        ),
        None => String::new(),
    };
    let live_attr = live
        .map(|url| format!(r#" data-events="{}""#, esc(url)))
        .unwrap_or_default();
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · lmbus</title><link rel="stylesheet" href="/assets/style.css"><script src="/assets/live.js" defer></script></head>
<body{live_attr}><header><strong>lmbus</strong> <nav>{nav}</nav> {who}</header>
<main><h1>{title}</h1>{body}</main></body></html>
"#,
        title = esc(title)
    )
}

/// A page that says what went wrong and changes nothing.
pub fn error_page(viewer: Option<&Viewer>, message: &str) -> String {
    page(
        "Error",
        viewer,
        None,
        &format!(
            r#"<p class="error" id="error">{}</p><p><a href="javascript:history.back()">Back</a> · <a href="/">Overview</a></p>"#,
            esc(message)
        ),
    )
}

/// The result of an admin action.
pub fn done_page(viewer: &Viewer, message: &str, back: &str) -> String {
    page(
        "Done",
        Some(viewer),
        None,
        &format!(
            r#"<p class="ok" id="done">{}</p><p><a href="{}">Back</a></p>"#,
            esc(message),
            esc(back)
        ),
    )
}

pub fn login_page(error: Option<&str>, csrf: &str) -> String {
    let error = error
        .map(|e| format!(r#"<p class="error" id="error">{}</p>"#, esc(e)))
        .unwrap_or_default();
    page(
        "Log in",
        None,
        None,
        &format!(
            r#"{error}<form method="post" action="/login" class="login">
<input type="hidden" name="csrf" value="{}">
<label>User <input name="user" id="user" autocomplete="username" required></label>
<label>Password <input name="password" id="password" type="password" autocomplete="current-password" required></label>
<button type="submit" id="login">Log in</button></form>"#,
            esc(csrf)
        ),
    )
}

/// What the live parts are drawn from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The last status the master gave, and when (Unix ms).
    pub status: Option<StatusReply>,
    pub status_at_ms: i64,
    /// Why the last status request failed, if it did.
    pub error: Option<String>,
    /// The recent alerts, oldest first.
    pub alerts: Vec<Alert>,
    /// Today, for days left to the license expiry.
    pub today: Option<time::Date>,
    /// Seats in use over the last day before the newest sample, oldest first: the
    /// `license_counts` alerts held and the status polls (one sample per
    /// [`SAMPLE_EVERY_MS`]), at most [`MAX_SAMPLES`].
    pub history: Vec<Sample>,
    /// Older samples folded into one per hour (each series' peak in that hour), oldest
    /// first, at most [`MAX_HOURS`].
    pub hourly: Vec<Sample>,
}

/// Seats in use at one time (or, `hour` set, each series' peak in the hour from
/// `time_ms`): per agent type, and the total.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub time_ms: i64,
    pub total: u32,
    pub by_type: std::collections::BTreeMap<String, u32>,
    pub hour: bool,
}

/// Most recent samples kept at full resolution (a day at one per 30 s).
pub const MAX_SAMPLES: usize = 2880;
/// Samples older than this before the newest are kept as hourly peaks.
pub const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;
/// Most hourly peaks kept (92 days).
pub const MAX_HOURS: usize = 92 * 24;
/// A status poll becomes a sample at most this often.
pub const SAMPLE_EVERY_MS: i64 = 30_000;

impl Sample {
    /// The counts a `license_counts` alert carries (per type, and `total`), preceded, when
    /// they are higher, by its peaks since the master's previous one as a sample 1 ms
    /// before it (the peak happened within the counts interval before the alert).
    pub fn of_counts(alert: &Alert) -> Vec<Sample> {
        let of = |counts: &std::collections::BTreeMap<String, u32>, time_ms| {
            let mut by_type = counts.clone();
            let total = by_type.remove("total").unwrap_or(0);
            Sample {
                time_ms,
                total,
                by_type,
                hour: false,
            }
        };
        let now = of(&alert.counts, alert.time_ms);
        let higher = alert
            .peaks
            .iter()
            .any(|(k, n)| *n > alert.counts.get(k).copied().unwrap_or(0));
        if higher {
            vec![of(&alert.peaks, alert.time_ms - 1), now]
        } else {
            vec![now]
        }
    }
}

impl Snapshot {
    /// Adds a sample in time order; the same sample twice (a `license_counts` alert both
    /// recalled from the log and followed) is kept once.
    ///
    /// Samples more than [`DAY_MS`] older than the newest, and hourly peaks, are folded
    /// into [`Self::hourly`] (each series' peak per hour; folding the same sample twice
    /// changes nothing), and so are the oldest beyond [`MAX_SAMPLES`]: a peak is never lost
    /// to the resolution.
    pub fn add_sample(&mut self, sample: Sample) {
        let newest = self.history.last().map_or(i64::MIN, |s| s.time_ms);
        if sample.hour || sample.time_ms < newest.saturating_sub(DAY_MS) {
            self.fold_hourly(sample);
            return;
        }
        let at = self
            .history
            .partition_point(|s| s.time_ms <= sample.time_ms);
        if self.history[..at]
            .iter()
            .rev()
            .take_while(|s| s.time_ms == sample.time_ms)
            .any(|s| *s == sample)
        {
            return;
        }
        self.history.insert(at, sample);
        let newest = self.history.last().map_or(i64::MIN, |s| s.time_ms);
        let old = self
            .history
            .partition_point(|s| s.time_ms < newest.saturating_sub(DAY_MS))
            .max(self.history.len().saturating_sub(MAX_SAMPLES));
        let folded: Vec<Sample> = self.history.drain(..old).collect();
        for sample in folded {
            self.fold_hourly(sample);
        }
    }

    /// Adds `sample` to the peaks of its hour.
    fn fold_hourly(&mut self, sample: Sample) {
        let hour = sample.time_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let at = self.hourly.partition_point(|s| s.time_ms < hour);
        match self.hourly.get_mut(at) {
            Some(peak) if peak.time_ms == hour => {
                peak.total = peak.total.max(sample.total);
                for (t, n) in sample.by_type {
                    let kept = peak.by_type.entry(t).or_default();
                    *kept = (*kept).max(n);
                }
            }
            _ => {
                self.hourly.insert(
                    at,
                    Sample {
                        time_ms: hour,
                        hour: true,
                        ..sample
                    },
                );
                if self.hourly.len() > MAX_HOURS {
                    self.hourly.remove(0);
                }
            }
        }
    }

    /// The hourly peaks, then the recent samples, of the last `days` before the newest
    /// (all of them for `None`), oldest first.
    pub fn history_in(&self, days: Option<u32>) -> Vec<&Sample> {
        let newest = self
            .history
            .last()
            .or(self.hourly.last())
            .map_or(0, |s| s.time_ms);
        let from = days.map_or(i64::MIN, |d| newest - i64::from(d) * DAY_MS);
        self.hourly
            .iter()
            .chain(&self.history)
            // An hour that overlaps the start of the range is in it.
            .filter(|s| s.time_ms + if s.hour { HOUR_MS } else { 0 } > from)
            .collect()
    }
}

fn bar(used: u32, limit: u32) -> String {
    let percent = if limit == 0 {
        0
    } else {
        (u64::from(used) * 100 / u64::from(limit)).min(100)
    };
    let class = if limit > 0 && used >= limit {
        "bar full"
    } else {
        "bar"
    };
    format!(r#"<span class="{class}"><span style="width:{percent}%"></span></span>"#)
}

fn stale(s: &Snapshot) -> String {
    match &s.error {
        Some(e) => format!(
            r#"<p class="error">The master did not answer the last status request ({}); the data below is from {}.</p>"#,
            esc(e),
            esc(&format_time(s.status_at_ms))
        ),
        None => String::new(),
    }
}

/// Days from `today` to a license's `expires` date (`YYYY-MM-DD`).
pub fn days_left(expires: &str, today: Option<time::Date>) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(expires, &format).ok()?;
    Some((date - today?).whole_days())
}

/// The maintenance date with its days left, `ended` once past, or `not reported` by a
/// master from before it was in the status.
fn maintenance_text(last_day: &str, today: Option<time::Date>) -> String {
    if last_day.is_empty() {
        return "not reported by this master".to_owned();
    }
    match days_left(last_day, today) {
        Some(d) if d < 0 => format!("ended {last_day}"),
        Some(d) => format!("until {last_day} ({d} days left)"),
        None => format!("until {last_day}"),
    }
}

fn csrf_field(v: &Viewer) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        esc(&v.csrf)
    )
}

/// The overview's live part: license, leader and replicas, ledger position, limits per
/// type with bars, silent slaves, active alerts.
pub fn live_overview(s: &Snapshot, v: &Viewer) -> String {
    let Some(st) = &s.status else {
        return format!(
            r#"<p class="error">No status from the master yet{}.</p>"#,
            s.error
                .as_ref()
                .map(|e| format!(": {}", esc(e)))
                .unwrap_or_default()
        );
    };
    let mut out = stale(s);
    let days = days_left(&st.license.expires, s.today)
        .map(|d| format!(" ({d} days left)"))
        .unwrap_or_default();
    let maintenance = maintenance_text(&st.license.maintenance_expires, s.today);
    let _ = write!(
        out,
        r#"<section><h2>License</h2><p>License <code>{}</code> for {}, context {}, expires {}<span id="expiry-days">{}</span>; maintenance <span id="maintenance">{}</span>. Unlicensed slaves {}. Admission: {}.</p>"#,
        st.license.id,
        esc(&st.license.customer),
        esc(lmbus_ops::context_shown(&st.license)),
        esc(&st.license.expires),
        esc(&days),
        esc(&maintenance),
        if st.allow_unlicensed_slaves {
            "allowed"
        } else {
            "refused"
        },
        format!("{:?}", st.admission).to_lowercase()
    );
    if let Some(sync) = lmbus_ops::sync_summary(st) {
        // The offline limit (sync_within_days): shown as an error once new seats stop.
        let overdue = st.license.sync.as_ref().is_some_and(|s| s.overdue);
        // An admin may sync now (the vendor's answer can take a few seconds).
        let button = if v.role == Role::Admin {
            format!(
                r#"<form method="post" action="/sync" class="inline">{}<button type="submit">Sync with the vendor now</button></form>"#,
                csrf_field(v)
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            r#"<p id="sync"{}>{} {button}</p>"#,
            if overdue { r#" class="error""# } else { "" },
            esc(&sync)
        );
    }
    out.push_str("</section>");
    let _ = write!(
        out,
        r#"<section><h2>Seats</h2><table id="types"><tr><th>Agent type</th><th>Limit</th><th>In use</th><th>Allotted</th><th>Free</th><th></th></tr>"#
    );
    let mut types: std::collections::BTreeSet<&String> = st.type_limits.keys().collect();
    types.extend(st.in_use_by_type.keys());
    for t in types {
        let limit = st.type_limits.get(t).copied();
        let used = st.in_use_by_type.get(t).copied().unwrap_or(0);
        let allotted = st.allotted_by_type.get(t).copied().unwrap_or(0);
        let free = limit.map(|l| l.saturating_sub(used + allotted));
        let _ = write!(
            out,
            r#"<tr data-type="{t}"><td>{t}</td><td>{}</td><td class="in-use">{used}</td><td>{allotted}</td><td class="free">{}</td><td>{}</td></tr>"#,
            limit.map_or("-".to_owned(), |l| l.to_string()),
            free.map_or("-".to_owned(), |f| f.to_string()),
            bar(used + allotted, limit.unwrap_or(0)),
            t = esc(t)
        );
    }
    let total_free = st
        .total_limit
        .saturating_sub(st.total_in_use + st.allotted_total);
    let _ = write!(
        out,
        r#"<tr class="total" data-type="total"><td>total</td><td>{}</td><td class="in-use" id="total-in-use">{}</td><td>{}</td><td class="free">{total_free}</td><td>{}</td></tr></table></section>"#,
        st.total_limit,
        st.total_in_use,
        st.allotted_total,
        bar(st.total_in_use + st.allotted_total, st.total_limit)
    );
    let _ = write!(
        out,
        r#"<section><h2>Master</h2><p>Leader <strong id="leader">{}</strong>, term {}, ledger position <span id="ledger">{}</span>.</p><table id="replicas"><tr><th>Replica</th><th>Role</th><th>Applied</th><th>Last heard</th><th></th></tr>"#,
        esc(&st.broker_id),
        st.leader_term,
        st.ledger_sequence
    );
    for r in &st.replicas {
        let role = if r.leader {
            "leader"
        } else if r.drained {
            "drained"
        } else {
            "standby"
        };
        let action = if v.role == Role::Admin {
            let (path, label) = if r.drained {
                ("/replicas/undrain", "Undrain")
            } else {
                ("/replicas/drain", "Drain")
            };
            format!(
                r#"<form method="post" action="{path}" class="inline">{}<input type="hidden" name="replica" value="{}"><button type="submit">{label}</button></form>"#,
                csrf_field(v),
                esc(&r.replica)
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            r#"<tr><td>{}</td><td>{role}</td><td>{}</td><td>{} ms ago</td><td>{action}</td></tr>"#,
            esc(&r.replica),
            r.applied,
            r.last_seen_ms_ago
        );
    }
    out.push_str("</table></section>");
    let silent: Vec<_> = st.slaves.iter().filter(|s| !s.connected).collect();
    let _ = write!(
        out,
        r#"<section><h2>Slaves</h2><p><span id="slaves-connected">{}</span> of {} connected.</p>"#,
        st.slaves_connected, st.slaves_total
    );
    if !silent.is_empty() {
        let count = |word: &str| silent.iter().filter(|s| state_word(s) == word).count();
        let _ = write!(
            out,
            r#"<p id="slaves-silent">Silent: <span id="slaves-in-grace">{}</span> in their grace period, <span id="slaves-restricted">{}</span> restricted, {} reclaimed, {} unknown (estimated from the last word each sent and the grace period its hello announced; the master cannot hear them).</p><ul>"#,
            count("IN GRACE"),
            count("RESTRICTED"),
            count("RECLAIMED"),
            count("DISCONNECTED"),
        );
        for s in silent {
            let _ = write!(
                out,
                r#"<li data-slave="{}"><a href="/slaves/{}">{}</a> <b>{}</b>: {}, {}</li>"#,
                esc(&s.slave_id),
                url_part(&s.slave_id),
                esc(&s.slave_id),
                state_word(s),
                lmbus_schemas::human::plural(u64::from(s.in_use), "seat", "seats"),
                esc(&silence_text(s).unwrap_or_default())
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("</section>");
    let now = s.status_at_ms;
    let active: Vec<&Alert> = s
        .alerts
        .iter()
        .rev()
        .filter(|a| a.severity >= Severity::Warning && now - a.time_ms < 3_600_000)
        .take(20)
        .collect();
    out.push_str(
        "<section><h2>Active alerts</h2><p class=\"hint\">Warnings and worse of the last hour.</p>",
    );
    out.push_str(&alert_table(&active));
    out.push_str("</section>");
    out
}

fn alert_table(alerts: &[&Alert]) -> String {
    if alerts.is_empty() {
        return "<p>None.</p>".to_owned();
    }
    let mut out = String::from(
        r#"<table class="alerts"><tr><th>Time</th><th>Severity</th><th>Kind</th><th>Slave</th><th>Message</th></tr>"#,
    );
    for a in alerts {
        let _ = write!(
            out,
            r#"<tr class="{sev}"><td>{}</td><td>{sev}</td><td>{}</td><td>{}</td><td>{}{}</td></tr>"#,
            esc(&format_time(a.time_ms)),
            esc(a.kind.token()),
            esc(a.slave.as_deref().unwrap_or("")),
            // A development master's alerts say so on every row, as in the terminal.
            if a.not_for_production {
                format!(
                    r#"<span class="dev">[{}]</span> "#,
                    esc(lmbus_schemas::NOT_FOR_PRODUCTION)
                )
            } else {
                String::new()
            },
            esc(&a.message),
            sev = a.severity.token()
        );
    }
    out.push_str("</table>");
    out
}

/// The slaves page's live part: one row per slave the status lists.
pub fn live_slaves(s: &Snapshot) -> String {
    let Some(st) = &s.status else {
        return r#"<p class="error">No status from the master yet.</p>"#.to_owned();
    };
    let mut out = stale(s);
    let _ = write!(
        out,
        r#"<p>{} slaves, {} connected{}.</p><table id="slaves"><tr><th>Slave</th><th>State</th><th>Master</th><th>License</th><th>Local limit</th><th>Agents</th><th>By type</th><th>Last heard</th></tr>"#,
        st.slaves_total,
        st.slaves_connected,
        if (st.slaves.len() as u32) < st.slaves_total {
            format!(" (the first {} listed)", st.slaves.len())
        } else {
            String::new()
        }
    );
    for slave in &st.slaves {
        let cells = slave_cells(slave);
        let _ = write!(
            out,
            r#"<tr data-slave="{id}"><td><a href="/slaves/{href}">{id}</a></td>"#,
            id = esc(&slave.slave_id),
            href = url_part(&slave.slave_id)
        );
        for cell in cells.iter().skip(1) {
            let _ = write!(out, "<td>{}</td>", esc(cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

fn seat_table(list: &SeatList, v: &Viewer, now_ms: u64, with_slave: bool) -> String {
    let mut out = String::from(r#"<table id="seats"><tr>"#);
    if with_slave {
        out.push_str("<th>Slave</th>");
    }
    out.push_str("<th>Agent</th><th>Type</th><th>Since</th><th>Held for</th><th>Granted by</th><th>Master</th><th></th></tr>");
    for seat in &list.seats {
        let _ = write!(
            out,
            r#"<tr data-agent="{}" data-slave="{}">"#,
            esc(&seat.agent_id),
            esc(&seat.slave)
        );
        if with_slave {
            let _ = write!(
                out,
                r#"<td><a href="/slaves/{}">{}</a></td>"#,
                url_part(&seat.slave),
                esc(&seat.slave)
            );
        }
        let title = if v.role == Role::Admin {
            "Release this seat: the slave logs the agent out"
        } else {
            "Only an admin may release a seat"
        };
        let _ = write!(
            out,
            r#"<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><form method="post" action="/release" class="inline">{}<input type="hidden" name="slave" value="{}"><input type="hidden" name="agent" value="{}"><button type="submit" class="release" title="{title}">Release</button></form></td></tr>"#,
            esc(&seat.agent_id),
            esc(&seat.agent_type),
            esc(&since_text(seat.since_ms)),
            esc(&held_for(seat.since_ms, now_ms)),
            esc(if seat.granted_by.is_empty() {
                "unknown"
            } else {
                &seat.granted_by
            }),
            esc(seat.master.as_deref().unwrap_or("-")),
            csrf_field(v),
            esc(&seat.slave),
            esc(&seat.agent_id),
        );
    }
    out.push_str("</table>");
    for slave in &list.truncated {
        let _ = write!(
            out,
            r#"<p class="hint">Slave {} holds more seats than one status reply lists: its rows are incomplete.</p>"#,
            esc(slave)
        );
    }
    out
}

/// The seats page's live part: every seat whose slave, agent or type contains `query`.
pub fn live_seats(list: &SeatList, query: &str, v: &Viewer, now_ms: u64) -> String {
    let q = query.to_lowercase();
    let mut shown = list.clone();
    shown.seats.retain(|s| {
        q.is_empty()
            || s.slave.to_lowercase().contains(&q)
            || s.agent_id.to_lowercase().contains(&q)
            || s.agent_type.to_lowercase().contains(&q)
    });
    let mut out = format!(
        r#"<p><span id="seat-count">{}</span> of {} seats{}.</p>"#,
        shown.seats.len(),
        list.seats.len(),
        if q.is_empty() {
            String::new()
        } else {
            format!(" matching “{}”", esc(query))
        }
    );
    out.push_str(&seat_table(&shown, v, now_ms, true));
    out
}

/// One slave's live part: its row and its seats.
pub fn live_slave(s: &Snapshot, slave: &str, list: &SeatList, v: &Viewer, now_ms: u64) -> String {
    let mut out = stale(s);
    let row = s
        .status
        .as_ref()
        .and_then(|st| st.slaves.iter().find(|x| x.slave_id == slave));
    match row {
        Some(row) => {
            let cells = slave_cells(row);
            let names = [
                "Slave",
                "State",
                "Master",
                "License",
                "Local limit",
                "Agents",
                "By type",
                "Last heard",
            ];
            out.push_str(r#"<dl class="facts">"#);
            for (name, cell) in names.iter().zip(cells.iter()) {
                let _ = write!(out, "<dt>{name}</dt><dd>{}</dd>", esc(cell));
            }
            if let Some(silence) = silence_text(row) {
                let _ = write!(
                    out,
                    r#"<dt>Silence</dt><dd id="silence">{}</dd>"#,
                    esc(&silence)
                );
            }
            out.push_str("</dl>");
        }
        None => out.push_str(
            r#"<p class="hint">The master's status does not list this slave (unknown, forgotten, or beyond the listed ones).</p>"#,
        ),
    }
    out.push_str("<h2>Seats</h2>");
    out.push_str(&seat_table(list, v, now_ms, false));
    out
}

/// Whether a refusal says the license was full (capacity) rather than that the request or
/// the slave was wrong (a client or configuration error).
pub fn is_capacity(reason: lmbus_schemas::RejectReason) -> bool {
    use lmbus_schemas::RejectReason as R;
    matches!(
        reason,
        R::AggregateLimit
            | R::TypeLimit
            | R::LocalLimit
            | R::SlaveLimit
            | R::NoAllotment
            | R::Reclaimed
    )
}

/// The denials page's live part, from the `registration_rejected` alerts the dashboard
/// holds: by reason (capacity or not), by slave and type, and per hour.
pub fn live_denials(s: &Snapshot) -> String {
    use std::collections::BTreeMap;
    let denials: Vec<&Alert> = s
        .alerts
        .iter()
        .filter(|a| a.kind == lmbus_schemas::AlertKind::RegistrationRejected)
        .collect();
    let mut out = format!(
        r#"<p><span id="denial-count">{}</span> registrations refused among the last {} alerts the dashboard holds{}.</p>"#,
        denials.len(),
        s.alerts.len(),
        s.alerts
            .first()
            .map(|a| format!(" (since {})", esc(&format_time(a.time_ms))))
            .unwrap_or_default()
    );
    let mut by_reason: BTreeMap<(bool, &str), u32> = BTreeMap::new();
    let mut by_place: BTreeMap<(&str, &str), (u32, u32)> = BTreeMap::new();
    let mut by_hour: BTreeMap<i64, (u32, u32)> = BTreeMap::new();
    for a in &denials {
        let capacity = a.reason.is_some_and(is_capacity);
        let reason = a.reason.map_or("unknown", |r| r.token());
        *by_reason.entry((!capacity, reason)).or_default() += 1;
        let place = by_place
            .entry((
                a.slave.as_deref().unwrap_or("-"),
                a.agent_type.as_deref().unwrap_or("-"),
            ))
            .or_default();
        let hour = by_hour.entry(a.time_ms.div_euclid(3_600_000)).or_default();
        if capacity {
            place.0 += 1;
            hour.0 += 1;
        } else {
            place.1 += 1;
            hour.1 += 1;
        }
    }
    out.push_str(r#"<h2>By reason</h2><table id="by-reason"><tr><th>Reason</th><th>Kind</th><th>Refused</th></tr>"#);
    for ((other, reason), n) in &by_reason {
        let _ = write!(
            out,
            r#"<tr data-reason="{r}"><td>{r}</td><td>{}</td><td>{n}</td></tr>"#,
            if *other {
                "client or configuration"
            } else {
                "capacity (license full)"
            },
            r = esc(reason)
        );
    }
    out.push_str(r#"</table><h2>By slave and agent type</h2><table id="by-place"><tr><th>Slave</th><th>Type</th><th>Capacity</th><th>Other</th></tr>"#);
    for ((slave, agent_type), (capacity, other)) in &by_place {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{capacity}</td><td>{other}</td></tr>",
            esc(slave),
            esc(agent_type)
        );
    }
    out.push_str(r#"</table><h2>Per hour (UTC)</h2><table id="by-hour"><tr><th>Hour</th><th>Capacity</th><th>Other</th><th></th></tr>"#);
    let most = by_hour.values().map(|(c, o)| c + o).max().unwrap_or(0);
    for (hour, (capacity, other)) in by_hour.iter().rev().take(48) {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{capacity}</td><td>{other}</td><td>{}</td></tr>",
            esc(&format_time(hour * 3_600_000)),
            bar(capacity + other, most)
        );
    }
    out.push_str("</table>");
    out
}

/// The history of the last `days` (all for `None`) as CSV: `time,total,<type>...`, one
/// row per sample, oldest first; an hourly peak's time is its hour's start followed by
/// `/PT1H` (an ISO 8601 duration: the hour from then).
pub fn history_csv(s: &Snapshot, days: Option<u32>) -> String {
    let h = s.history_in(days);
    let types: std::collections::BTreeSet<&String> =
        h.iter().flat_map(|x| x.by_type.keys()).collect();
    let mut out = String::from("time,total");
    for t in &types {
        // A type is a license name: quote it so a comma in it stays one field.
        let _ = write!(out, ",\"{}\"", t.replace('"', "\"\""));
    }
    out.push('\n');
    for x in h {
        let _ = write!(
            out,
            "{}{},{}",
            format_time(x.time_ms),
            if x.hour { "/PT1H" } else { "" },
            x.total
        );
        for t in &types {
            let _ = write!(out, ",{}", x.by_type.get(*t).copied().unwrap_or(0));
        }
        out.push('\n');
    }
    out
}

/// The ranges the history page offers, in days (`None`: everything held).
pub const HISTORY_RANGES: [(Option<u32>, &str); 4] = [
    (Some(1), "Last day"),
    (Some(7), "7 days"),
    (Some(30), "30 days"),
    (None, "All"),
];

/// The history page's live part for the last `days` (all for `None`): seats in use per
/// type and in total over time as an inline SVG chart (no script, no library), each
/// series' peak marked, and a table of the peaks.
pub fn live_history(s: &Snapshot, days: Option<u32>) -> String {
    const W: f64 = 900.0;
    const H: f64 = 260.0;
    const PAD: f64 = 40.0;
    let range_arg = |d: Option<u32>| d.map_or(String::new(), |d| format!("?days={d}"));
    let ranges: Vec<String> = HISTORY_RANGES
        .iter()
        .map(|(d, label)| {
            if *d == days {
                format!("<b>{label}</b>")
            } else {
                format!(r#"<a href="/history{}">{label}</a>"#, range_arg(*d))
            }
        })
        .collect();
    let ranges = format!(r#"<p id="ranges">{}</p>"#, ranges.join(" · "));
    let h = s.history_in(days);
    let (Some(first), Some(last)) = (h.first(), h.last()) else {
        return format!(
            r#"{ranges}<p id="history-empty">No samples yet: they come from the license_counts alerts and the status polls.</p>"#
        );
    };
    let span = (last.time_ms - first.time_ms).max(1) as f64;
    let limit = s.status.as_ref().map_or(0, |st| st.total_limit);
    let top = h
        .iter()
        .map(|x| x.total)
        .max()
        .unwrap_or(0)
        .max(limit)
        .max(1) as f64;
    let x_of = |t: i64| PAD + (t - first.time_ms) as f64 / span * (W - 2.0 * PAD);
    let y_of = |v: u32| H - PAD - f64::from(v) / top * (H - 2.0 * PAD);
    let mut series: Vec<(String, Vec<(i64, u32)>)> = vec![(
        "total".to_owned(),
        h.iter().map(|x| (x.time_ms, x.total)).collect(),
    )];
    let hour_of: std::collections::BTreeSet<i64> =
        h.iter().filter(|x| x.hour).map(|x| x.time_ms).collect();
    let types: std::collections::BTreeSet<&String> =
        h.iter().flat_map(|x| x.by_type.keys()).collect();
    for t in types {
        series.push((
            t.clone(),
            h.iter()
                .map(|x| (x.time_ms, x.by_type.get(t).copied().unwrap_or(0)))
                .collect(),
        ));
    }
    const COLOURS: [&str; 6] = [
        "#20303f", "#3c8dde", "#d9822b", "#5aa55a", "#9b59b6", "#c0392b",
    ];
    let mut svg = format!(
        r##"<svg id="history-chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="seats in use over time"><rect x="0" y="0" width="{W}" height="{H}" fill="#fff"/><line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="#999"/><text x="4" y="{t}" font-size="11">{top}</text><text x="4" y="{b}" font-size="11">0</text><text x="{PAD}" y="{tb}" font-size="11">{}</text><text x="{r}" y="{tb}" font-size="11" text-anchor="end">{}</text>"##,
        esc(&format_time(first.time_ms)),
        esc(&format_time(last.time_ms)),
        b = H - PAD,
        r = W - PAD,
        t = PAD + 4.0,
        tb = H - PAD + 16.0,
    );
    if limit > 0 {
        let _ = write!(
            svg,
            r##"<line x1="{PAD}" y1="{y}" x2="{r}" y2="{y}" stroke="#d9534f" stroke-dasharray="4 3"/><text x="{r}" y="{ty}" font-size="11" text-anchor="end" fill="#d9534f">limit {limit}</text>"##,
            y = y_of(limit),
            ty = y_of(limit) - 3.0,
            r = W - PAD
        );
    }
    let mut peaks =
        String::from(r#"<table id="peaks"><tr><th>Series</th><th>Peak</th><th>At</th></tr>"#);
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x_of(*t), y_of(*v)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="{}" points="{}"><title>{}</title></polyline>"#,
            if i == 0 { 2.5 } else { 1.5 },
            path.join(" "),
            esc(name)
        );
        if let Some((t, v)) = points.iter().max_by_key(|(t, v)| (*v, -*t)) {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"><title>peak {} {v}</title></circle>"#,
                x_of(*t),
                y_of(*v),
                esc(name)
            );
            let at = if hour_of.contains(t) {
                format!("in the hour from {}", format_time(*t))
            } else {
                format_time(*t)
            };
            let _ = write!(
                peaks,
                r#"<tr data-series="{n}"><td><span style="color:{colour}">■</span> {n}</td><td class="peak">{v}</td><td>{}</td></tr>"#,
                esc(&at),
                n = esc(name)
            );
        }
    }
    svg.push_str("</svg>");
    peaks.push_str("</table>");
    let hours = hour_of.len();
    format!(
        r#"{ranges}<p>{} samples from {} to {}{}. <a href="/history.csv{}" id="csv">Download CSV</a></p>{svg}{peaks}"#,
        h.len(),
        esc(&format_time(first.time_ms)),
        esc(&format_time(last.time_ms)),
        if hours > 0 {
            format!(
                " (<span id=\"hourly\">{hours}</span> of them hourly peaks: the samples of more than a day before the newest, each series' highest in its hour)"
            )
        } else {
            String::new()
        },
        range_arg(days)
    )
}

/// The licenses page's live part: the master license in force as the master reports it.
pub fn live_licenses(s: &Snapshot) -> String {
    let Some(st) = &s.status else {
        return r#"<p class="error">No status from the master yet.</p>"#.to_owned();
    };
    let days = days_left(&st.license.expires, s.today).map_or("-".to_owned(), |d| d.to_string());
    let mut limits: Vec<String> = st
        .type_limits
        .iter()
        .map(|(t, n)| format!("{}={n}", esc(t)))
        .collect();
    if limits.is_empty() {
        limits.push("none per type".to_owned());
    }
    format!(
        r#"<dl class="facts" id="license"><dt>License id</dt><dd>{}</dd><dt>Customer</dt><dd>{}</dd><dt>Context</dt><dd>{}</dd><dt>Expires</dt><dd>{}</dd><dt>Days left</dt><dd id="license-days">{days}</dd><dt>Maintenance</dt><dd id="license-maintenance">{}</dd><dt>Total limit</dt><dd>{}</dd><dt>Limits per type</dt><dd>{}</dd><dt>Signature</dt><dd>verified by the master with the vendor key (it serves no license that does not verify)</dd><dt>Unlicensed slaves</dt><dd>{}</dd></dl>"#,
        st.license.id,
        esc(&st.license.customer),
        esc(lmbus_ops::context_shown(&st.license)),
        esc(&st.license.expires),
        esc(&maintenance_text(&st.license.maintenance_expires, s.today)),
        st.total_limit,
        limits.join(", "),
        if st.allow_unlicensed_slaves {
            "allowed"
        } else {
            "refused"
        }
    )
}

/// The alerts page's live part: the recent alerts that pass `filter`, newest first.
pub fn live_alerts(s: &Snapshot, filter: &crate::Filter) -> String {
    let shown: Vec<&Alert> = s
        .alerts
        .iter()
        .rev()
        .filter(|a| filter.matches(a))
        .take(200)
        .collect();
    let mut out = format!(
        r#"<p><span id="alert-count">{}</span> recent alerts shown (newest first, at most 200).</p>"#,
        shown.len()
    );
    out.push_str(&alert_table(&shown));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_network_is_escaped() {
        assert_eq!(
            esc(r#"<script>"x"&'y'"#),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;"
        );
        assert_eq!(esc("a\u{1b}b"), "a\\u{1b}b");
        assert_eq!(url_part("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn a_development_masters_alerts_say_so_on_every_row() {
        let mut dev = Alert::new(
            Severity::Info,
            lmbus_schemas::AlertKind::LicenseCounts,
            "2/5",
        );
        dev.not_for_production = true;
        let prod = Alert::new(
            Severity::Info,
            lmbus_schemas::AlertKind::LicenseCounts,
            "3/5",
        );
        let table = alert_table(&[&dev, &prod]);
        let marked = format!(
            r#"<span class="dev">[{}]</span> 2/5"#,
            lmbus_schemas::NOT_FOR_PRODUCTION
        );
        assert!(table.contains(&marked), "{table}");
        assert!(table.contains("<td>3/5</td>"), "{table}");
        assert_eq!(table.matches("class=\"dev\"").count(), 1, "{table}");
    }

    #[test]
    fn days_left_counts_from_today() {
        let today = time::macros::date!(2026 - 11 - 28);
        assert_eq!(days_left("2026-12-08", Some(today)), Some(10));
        assert_eq!(days_left("2026-11-20", Some(today)), Some(-8));
        assert_eq!(days_left("never", Some(today)), None);
    }

    #[test]
    fn maintenance_shows_days_left_or_that_it_ended() {
        let today = Some(time::macros::date!(2026 - 11 - 28));
        assert_eq!(
            maintenance_text("2026-12-08", today),
            "until 2026-12-08 (10 days left)"
        );
        assert_eq!(maintenance_text("2026-11-27", today), "ended 2026-11-27");
        assert_eq!(maintenance_text("2026-11-27", None), "until 2026-11-27");
        assert_eq!(maintenance_text("", today), "not reported by this master");
    }
}
