//! The License Monitor's screen, without IO: [`LiveView`] (what the monitor knows),
//! [`UiState`] (what the operator chose: scroll, selection, help, agent list),
//! [`draw`], a pure function of the two and the terminal size, and [`UiState::on_key`], a
//! pure state machine. `live.rs` feeds them from NATS and the keyboard.
//!
//! On a small terminal nothing important is silently lost: rows at or over their limit
//! are pinned above the scrolling body, the body scrolls with a count of rows above and
//! below, a column that does not fit is named as hidden, and a cell that does not fit ends
//! with `…`. Stale data says so, with its age, and is greyed.

use std::collections::{BTreeSet, VecDeque};

use lmbus_schemas::{AgentClaim, Alert, Severity, SlaveStatus, StatusReply};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph};

use crate::format_time;

/// How many recent alerts the view keeps.
pub const RECENT_ALERTS: usize = 50;

/// What the live view knows: the last good status, when it came, why a refresh failed
/// since, recent alerts, and the agent list asked for.
#[derive(Debug, Default)]
pub struct LiveView {
    pub status: Option<StatusReply>,
    /// Why the last refresh failed (the last good status stays on screen, marked stale).
    pub error: Option<String>,
    /// When the last good status arrived (Unix ms).
    pub refreshed_ms: Option<i64>,
    /// The time the screen is drawn for (Unix ms).
    pub now_ms: i64,
    /// Newest last.
    pub alerts: VecDeque<Alert>,
    /// The agents of one slave, as the master last listed them (`Err`: why not).
    pub agents: Option<(String, Result<Vec<AgentClaim>, String>)>,
}

impl LiveView {
    pub fn push_alert(&mut self, alert: Alert) {
        if self.alerts.len() == RECENT_ALERTS {
            self.alerts.pop_front();
        }
        self.alerts.push_back(alert);
    }

    /// Whether what is shown is older than the last refresh attempt.
    pub fn stale(&self) -> bool {
        self.status.is_some() && self.error.is_some()
    }
}

/// What the operator chose.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UiState {
    /// The first body row shown.
    pub scroll: usize,
    /// The selected slave (index into the status's slaves).
    pub selected: usize,
    /// The help overlay is open.
    pub help: bool,
    /// The agent list of this slave is open.
    pub agents_of: Option<String>,
}

/// A key the view reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    Enter,
    Esc,
    Char(char),
}

/// What the IO loop must do after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    Refresh,
    /// Ask the master for this slave's agents.
    FetchAgents(String),
}

/// Where things are on the screen, for the key handling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Geometry {
    /// Body rows visible at once.
    pub page: usize,
    /// Body rows in all.
    pub rows: usize,
    /// The body row of each listed slave, and its id.
    pub slaves: Vec<(usize, String)>,
}

impl UiState {
    /// The state machine: keys move the selection and the window, open and close the
    /// overlays; `q` (or Esc with nothing open) quits.
    pub fn on_key(&mut self, key: Key, g: &Geometry) -> Action {
        let last_scroll = g.rows.saturating_sub(g.page);
        if self.help || self.agents_of.is_some() {
            match key {
                Key::Esc | Key::Enter | Key::Char('?') => {
                    self.help = false;
                    self.agents_of = None;
                    return Action::None;
                }
                Key::Char('q') => return Action::Quit,
                _ => return Action::None,
            }
        }
        match key {
            Key::Char('q') | Key::Esc => return Action::Quit,
            Key::Char('r') => return Action::Refresh,
            Key::Char('?') => self.help = true,
            Key::Up | Key::Char('k') => self.select(self.selected.saturating_sub(1), g),
            Key::Down | Key::Char('j') => self.select(self.selected + 1, g),
            Key::PageUp => self.scroll = self.scroll.saturating_sub(g.page.max(1)),
            Key::PageDown => self.scroll = (self.scroll + g.page.max(1)).min(last_scroll),
            Key::Home => self.scroll = 0,
            Key::End => self.scroll = last_scroll,
            Key::Enter => {
                if let Some((_, id)) = g.slaves.get(self.selected) {
                    self.agents_of = Some(id.clone());
                    return Action::FetchAgents(id.clone());
                }
            }
            Key::Char(_) => {}
        }
        Action::None
    }

    /// Selects slave `i` (clamped) and scrolls so that its row is visible.
    fn select(&mut self, i: usize, g: &Geometry) {
        if g.slaves.is_empty() {
            return;
        }
        self.selected = i.min(g.slaves.len() - 1);
        let row = g.slaves[self.selected].0;
        if row < self.scroll {
            self.scroll = row;
        } else if row >= self.scroll + g.page.max(1) {
            self.scroll = row + 1 - g.page.max(1);
        }
    }
}

/// `text` cut to `width` characters, ending with `…` when cut.
pub fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut cut: String = text.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

/// `text` fitted and padded to exactly `width` characters, plus a space.
fn cell(text: &str, width: usize) -> String {
    format!("{:<width$} ", fit(text, width))
}

/// `used / limit`, with `FULL` at the limit and `OVER` above it, in text (not only colour).
pub fn usage_text(used: u32, limit: Option<u32>) -> String {
    match limit {
        Some(l) if used > l => format!("{used} / {l} OVER"),
        Some(l) if used == l => format!("{used} / {l} FULL"),
        Some(l) => format!("{used} / {l}"),
        None => format!("{used} / -"),
    }
}

fn at_limit(used: u32, limit: Option<u32>) -> bool {
    limit.is_some_and(|l| used >= l)
}

fn usage_color(used: u32, limit: Option<u32>) -> Color {
    match limit {
        Some(l) if used >= l => Color::Red,
        Some(l) if f64::from(used) >= 0.8 * f64::from(l) => Color::Yellow,
        Some(_) => Color::Green,
        None => Color::Reset,
    }
}

/// Days from the day of `now_ms` to `expires` (YYYY-MM-DD, the last valid day).
pub fn days_to_expiry(expires: &str, now_ms: i64) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let last = time::Date::parse(expires, &format).ok()?;
    let now = time::OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1000)).ok()?;
    Some((last - now.date()).whole_days())
}

fn expiry_text(expires: &str, now_ms: i64) -> (String, Color) {
    match days_to_expiry(expires, now_ms) {
        Some(d) if d < 0 => (
            format!(
                "EXPIRED {} ago",
                lmbus_schemas::human::plural((-d) as u64, "day", "days")
            ),
            Color::Red,
        ),
        Some(0) => ("expires TODAY".to_owned(), Color::Red),
        Some(d) => (
            format!(
                "expires in {}",
                lmbus_schemas::human::plural(d as u64, "day", "days")
            ),
            if d <= 30 { Color::Yellow } else { Color::Reset },
        ),
        None => (format!("expires {expires}"), Color::Reset),
    }
}

/// One row of the body.
struct Row {
    line: Line<'static>,
    /// The listed slave this row shows.
    slave: Option<usize>,
}

fn text_row(text: String, style: Style) -> Row {
    Row {
        line: Line::styled(text, style),
        slave: None,
    }
}

fn title_row(text: &str, width: usize) -> Row {
    text_row(
        fit(text, width),
        Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED),
    )
}

/// A usage line: name, `used / limit [FULL|OVER]`, then a bar in the room left.
fn usage_row(name: &str, used: u32, limit: Option<u32>, width: usize) -> Row {
    let label = format!("{} {:<16}", cell(name, 16), usage_text(used, limit));
    let label = fit(&label, width);
    let room = width.saturating_sub(label.chars().count() + 1);
    let ratio = match limit {
        Some(0) => 1.0,
        Some(l) => (f64::from(used) / f64::from(l)).min(1.0),
        None => 0.0,
    };
    let filled = ((ratio * room as f64).round() as usize).min(room);
    let color = usage_color(used, limit);
    let mut label_style = Style::new();
    if at_limit(used, limit) {
        label_style = label_style.fg(Color::Red).add_modifier(Modifier::BOLD);
    }
    Row {
        line: Line::from(vec![
            Span::styled(label, label_style),
            Span::raw(" "),
            // Filled and empty cells differ in shape too, so the bar reads without colour.
            Span::styled("█".repeat(filled), Style::new().fg(color)),
            Span::styled("░".repeat(room - filled), Style::new().fg(Color::DarkGray)),
        ]),
        slave: None,
    }
}

/// The slave table's columns that fit `width`: each is (title, width); `BY TYPE` takes
/// what is left. Returns the columns and the names of those left out.
fn slave_columns(width: usize) -> (Vec<(&'static str, usize)>, Vec<&'static str>) {
    let mut columns = vec![("SLAVE", 14), ("STATE", 12), ("AGENTS", 12)];
    let mut hidden = Vec::new();
    const BY_TYPE_MIN: usize = 14;
    for optional in [("LAST BEAT", 9), ("THIS MASTER IS", 16), ("LICENSE", 10)] {
        let used: usize = columns.iter().map(|(_, w)| w + 1).sum();
        if used + optional.1 + 1 + BY_TYPE_MIN <= width {
            columns.push(optional);
        } else {
            hidden.push(optional.0);
        }
    }
    let used: usize = columns.iter().map(|(_, w)| w + 1).sum();
    columns.push(("BY TYPE", width.saturating_sub(used).max(1)));
    (columns, hidden)
}

fn slave_text(slave: &SlaveStatus, column: &str) -> String {
    let [id, state, master, license, _local, _in_use, by_type, beat] =
        lmbus_ops::slave_cells(slave);
    match column {
        "SLAVE" => id,
        "STATE" => state,
        "AGENTS" => usage_text(slave.in_use, slave.local_limit),
        "LAST BEAT" => beat,
        "THIS MASTER IS" => master,
        "LICENSE" => license,
        _ => by_type,
    }
}

/// Everything below the header: the rows pinned at the top (at or over their limit), and
/// the scrolling rows.
fn body(view: &LiveView, s: &StatusReply, ui: &UiState, width: usize) -> (Vec<Row>, Vec<Row>) {
    // Heartbeat ages count to now, not to the last good refresh: stale data shows how
    // long ago a replica or slave was really heard from.
    let late = view
        .refreshed_ms
        .map_or(0, |at| view.now_ms.saturating_sub(at).max(0) as u64);
    let mut pinned = Vec::new();
    let mut rows = Vec::new();
    let mut types: BTreeSet<&String> = s.type_limits.keys().collect();
    types.extend(s.in_use_by_type.keys());
    let type_usage: Vec<(&String, u32, Option<u32>)> = types
        .iter()
        .map(|t| {
            (
                *t,
                s.in_use_by_type.get(*t).copied().unwrap_or(0),
                s.type_limits.get(*t).copied(),
            )
        })
        .collect();

    // Pinned: what an operator must never miss.
    let full: Vec<&(&String, u32, Option<u32>)> = type_usage
        .iter()
        .filter(|(_, used, limit)| at_limit(*used, *limit))
        .collect();
    let total_full = at_limit(s.total_in_use, Some(s.total_limit));
    let full_slaves: Vec<(usize, &SlaveStatus)> = s
        .slaves
        .iter()
        .enumerate()
        .filter(|(_, sl)| at_limit(sl.in_use, sl.local_limit))
        .collect();
    if !full.is_empty() || total_full || !full_slaves.is_empty() {
        pinned.push(title_row("AT OR OVER THE LIMIT", width));
        if total_full {
            pinned.push(usage_row(
                "TOTAL",
                s.total_in_use,
                Some(s.total_limit),
                width,
            ));
        }
        for (t, used, limit) in &full {
            pinned.push(usage_row(t, *used, *limit, width));
        }
        for (_, sl) in &full_slaves {
            pinned.push(usage_row(
                &format!("slave {}", sl.slave_id),
                sl.in_use,
                sl.local_limit,
                width,
            ));
        }
    }

    rows.push(title_row("AGENTS IN USE / LIMIT", width));
    for (t, used, limit) in &type_usage {
        rows.push(usage_row(t, *used, *limit, width));
    }
    rows.push(usage_row(
        "TOTAL",
        s.total_in_use,
        Some(s.total_limit),
        width,
    ));
    if s.allotted_total > 0 {
        rows.push(text_row(
            fit(
                &format!("free seats allotted to slaves: {}", s.allotted_total),
                width,
            ),
            Style::new(),
        ));
    }

    let (columns, hidden) = slave_columns(width);
    let unlisted = (s.slaves_total as usize).saturating_sub(s.slaves.len());
    let mut title = format!("SLAVES ({} listed", s.slaves.len());
    if unlisted > 0 {
        title.push_str(&format!(", {unlisted} more not listed"));
    }
    title.push(')');
    if !hidden.is_empty() {
        title.push_str(&format!("  hidden columns: {}", hidden.join(", ")));
    }
    rows.push(title_row(&title, width));
    rows.push(text_row(
        columns.iter().map(|(t, w)| cell(t, *w)).collect::<String>(),
        Style::new().add_modifier(Modifier::BOLD),
    ));
    for (i, slave) in s.slaves.iter().enumerate() {
        let slave = &SlaveStatus {
            last_seen_ms_ago: slave.last_seen_ms_ago.saturating_add(late),
            ..slave.clone()
        };
        let spans: Vec<Span> = columns
            .iter()
            .map(|(t, w)| {
                let text = cell(&slave_text(slave, t), *w);
                match *t {
                    "STATE" if !slave.connected => Span::styled(text, Style::new().fg(Color::Red)),
                    "AGENTS" if at_limit(slave.in_use, slave.local_limit) => {
                        Span::styled(text, Style::new().fg(Color::Red))
                    }
                    _ => Span::raw(text),
                }
            })
            .collect();
        let mut line = Line::from(spans);
        if i == ui.selected {
            line = line.style(Style::new().add_modifier(Modifier::REVERSED));
        }
        rows.push(Row {
            line,
            slave: Some(i),
        });
    }

    rows.push(title_row("REPLICAS", width));
    for r in &s.replicas {
        rows.push(text_row(
            fit(
                &format!(
                    "{}{}{}ledger at {:<8} beat {:.1}s ago",
                    cell(&r.replica, 16),
                    cell(r.role(), 8),
                    cell(&format!("priority {}", r.priority), 11),
                    r.applied,
                    r.last_seen_ms_ago.saturating_add(late) as f64 / 1000.0
                ),
                width,
            ),
            Style::new(),
        ));
    }

    rows.push(title_row("RECENT ALERTS (newest first)", width));
    for a in view.alerts.iter().rev() {
        let color = match a.severity {
            Severity::Critical => Color::Red,
            Severity::Warning => Color::Yellow,
            Severity::Info => Color::Reset,
        };
        rows.push(text_row(
            fit(
                &format!(
                    "{} {:<22} {}",
                    // The time of day; an alert's time comes from the network.
                    format_time(a.time_ms).get(11..19).unwrap_or("--:--:--"),
                    a.kind.token(),
                    lmbus_schemas::printable(&a.message)
                ),
                width,
            ),
            Style::new().fg(color),
        ));
    }
    (pinned, rows)
}

/// The header's lines: cluster and leader, the license with days to expiry, the counts
/// and how fresh they are.
fn header(view: &LiveView, s: &StatusReply, width: usize) -> Vec<Line<'static>> {
    let grey = Style::new().fg(Color::DarkGray);
    let (expiry, expiry_color) = expiry_text(&s.license.expires, view.now_ms);
    let freshness = match (view.stale(), view.refreshed_ms) {
        (true, Some(at)) => Span::styled(
            fit(
                &format!(
                    "STALE: last good refresh {} ago",
                    lmbus_schemas::human::duration(std::time::Duration::from_millis(
                        view.now_ms.saturating_sub(at).max(0) as u64
                    ))
                ),
                width,
            ),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        (_, Some(at)) => Span::styled(
            format!("as of {}", format_time(at).get(11..19).unwrap_or("?")),
            grey,
        ),
        (_, None) => Span::raw(""),
    };
    vec![
        Line::from(fit(
            &format!(
                "cluster {}  leader {} (term {}, ledger at {})",
                s.cluster, s.broker_id, s.leader_term, s.ledger_sequence
            ),
            width,
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        Line::from(vec![
            Span::styled(expiry.clone(), Style::new().fg(expiry_color)),
            Span::raw(fit(
                &format!(
                    " ({})  license {} {}",
                    s.license.expires,
                    s.license.customer,
                    lmbus_ops::context_shown(&s.license)
                ),
                width.saturating_sub(expiry.chars().count()),
            )),
        ]),
        Line::from(vec![
            Span::raw(format!(
                "slaves {} connected of {}  total {}  ",
                s.slaves_connected,
                s.slaves_total,
                usage_text(s.total_in_use, Some(s.total_limit))
            )),
            freshness,
        ]),
    ]
}

/// The screen's parts for a size: header height, pinned rows shown, body window height.
fn split(area: Rect, header: usize, pinned: usize, stale: bool) -> [Rect; 5] {
    let stale_lines = if stale { 2 } else { 0 };
    let fixed = header + stale_lines + 1;
    let room = usize::from(area.height).saturating_sub(fixed);
    // The pinned rows come first; the scrolling body gets what is left (at least a row).
    let pinned = pinned.min(if room >= 2 { room - 1 } else { room });
    Layout::vertical([
        Constraint::Length(header as u16),
        Constraint::Length(stale_lines as u16),
        Constraint::Length(pinned as u16),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area)
}

/// Where the body rows are at this size, for [`UiState::on_key`].
pub fn geometry(view: &LiveView, ui: &UiState, width: u16, height: u16) -> Geometry {
    let Some(s) = &view.status else {
        return Geometry::default();
    };
    let area = Rect::new(0, 0, width, height);
    let (pinned, rows) = body(view, s, ui, usize::from(width));
    let [_, _, _, window, _] = split(area, 3, pinned.len(), view.stale());
    Geometry {
        page: usize::from(window.height),
        rows: rows.len(),
        slaves: rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.slave.map(|n| (i, s.slaves[n].slave_id.clone())))
            .collect(),
    }
}

/// Renders `view` as `ui` asks into `frame`.
pub fn draw(frame: &mut Frame, view: &LiveView, ui: &UiState) {
    let area = frame.area();
    let width = usize::from(area.width);
    let Some(s) = &view.status else {
        let text = view
            .error
            .clone()
            .unwrap_or_else(|| "asking the master for its status...".into());
        frame.render_widget(
            Paragraph::new(text)
                .wrap(ratatui::widgets::Wrap { trim: true })
                .block(Block::bordered().title(" lmbus License Monitor ")),
            area,
        );
        return;
    };
    let head = header(view, s, width);
    let (pinned, rows) = body(view, s, ui, width);
    let stale = view.stale();
    let [head_area, stale_area, pinned_area, window, footer] =
        split(area, head.len(), pinned.len(), stale);
    frame.render_widget(Paragraph::new(head), head_area);
    if stale {
        let age = view
            .refreshed_ms
            .map(|at| {
                lmbus_schemas::human::duration(std::time::Duration::from_millis(
                    view.now_ms.saturating_sub(at).max(0) as u64,
                ))
            })
            .unwrap_or_else(|| "?".into());
        let red = Style::new().fg(Color::Red).add_modifier(Modifier::BOLD);
        frame.render_widget(
            Paragraph::new(vec![
                Line::styled(
                    fit(
                        &format!("STALE DATA, {age} old: the rows below are the last good refresh"),
                        width,
                    ),
                    red,
                ),
                Line::styled(
                    fit(
                        &format!("refresh failed: {}", view.error.as_deref().unwrap_or("")),
                        width,
                    ),
                    Style::new().fg(Color::Red),
                ),
            ]),
            stale_area,
        );
    }
    // Stale rows lose their colours (a red OVER included): the banner above is what is
    // current.
    let grey = |mut line: Line<'static>| {
        if stale {
            for span in &mut line.spans {
                span.style = span.style.fg(Color::DarkGray);
            }
            line.style = line.style.fg(Color::DarkGray);
        }
        line
    };
    let shown_pinned = usize::from(pinned_area.height);
    let mut pinned_lines: Vec<Line> = pinned.into_iter().map(|r| grey(r.line)).collect();
    if pinned_lines.len() > shown_pinned && shown_pinned > 0 {
        let more = pinned_lines.len() - shown_pinned + 1;
        pinned_lines.truncate(shown_pinned - 1);
        pinned_lines.push(Line::styled(
            format!("… {more} more rows at or over the limit (widen or enlarge the terminal)"),
            Style::new().fg(Color::Red),
        ));
    }
    frame.render_widget(Paragraph::new(pinned_lines), pinned_area);

    let page = usize::from(window.height);
    let scroll = ui.scroll.min(rows.len().saturating_sub(page));
    let below = rows.len().saturating_sub(scroll + page);
    let lines: Vec<Line> = rows
        .into_iter()
        .skip(scroll)
        .take(page)
        .map(|r| grey(r.line))
        .collect();
    frame.render_widget(Paragraph::new(lines), window);

    let mut position = String::new();
    if scroll > 0 {
        position.push_str(&format!("▲{scroll} more "));
    }
    if below > 0 {
        position.push_str(&format!("▼{below} more "));
    }
    let keys = "↑↓ slave  PgUp/PgDn  Enter agents  ? help  q quit";
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(position.clone(), Style::new().add_modifier(Modifier::BOLD)),
            Span::styled(
                fit(keys, width.saturating_sub(position.chars().count())),
                Style::new().fg(Color::DarkGray),
            ),
        ])),
        footer,
    );

    if ui.help {
        overlay(frame, area, " help (Esc closes) ", help_lines());
    } else if let Some(slave) = &ui.agents_of {
        let (title, lines) = agent_lines(view, slave);
        overlay(frame, area, &title, lines);
    }
}

fn help_lines() -> Vec<String> {
    [
        "↑ ↓ / k j    select a slave",
        "PgUp PgDn    scroll a page",
        "Home End     top, bottom",
        "Enter        the selected slave's agents",
        "r            refresh now",
        "?            this help",
        "Esc          close; quit",
        "q            quit",
        "",
        "FULL: at the limit; OVER: above it (a lowered",
        "license). Such rows are pinned at the top.",
        "STALE: the master did not answer the last",
        "refresh; greyed rows are the last good one.",
    ]
    .map(String::from)
    .to_vec()
}

fn agent_lines(view: &LiveView, slave: &str) -> (String, Vec<String>) {
    match &view.agents {
        Some((of, Ok(agents))) if of == slave => (
            format!(" agents of {slave} ({}) Esc closes ", agents.len()),
            if agents.is_empty() {
                vec!["no agents hold a seat".to_owned()]
            } else {
                agents
                    .iter()
                    .map(|a| {
                        format!(
                            "{} {}",
                            cell(&lmbus_schemas::printable(&a.agent_id), 24),
                            lmbus_schemas::printable(&a.agent_type)
                        )
                    })
                    .collect()
            },
        ),
        Some((of, Err(e))) if of == slave => (
            format!(" agents of {slave} "),
            vec![format!("cannot list them: {e}")],
        ),
        _ => (
            format!(" agents of {slave} "),
            vec!["asking the master...".to_owned()],
        ),
    }
}

/// A bordered box in the middle of `area` with `lines`; the last line says how many more
/// did not fit.
fn overlay(frame: &mut Frame, area: Rect, title: &str, lines: Vec<String>) {
    let width = area.width.saturating_sub(4).min(60);
    let height = area
        .height
        .saturating_sub(2)
        .min(lines.len() as u16 + 2)
        .max(3.min(area.height));
    let rect = Rect::new(
        area.x + (area.width - width) / 2,
        area.y + (area.height - height) / 2,
        width,
        height,
    );
    let inner_width = usize::from(width.saturating_sub(2));
    let room = usize::from(height.saturating_sub(2));
    let mut shown: Vec<Line> = lines
        .iter()
        .take(room)
        .map(|l| Line::from(fit(l, inner_width)))
        .collect();
    if lines.len() > room && room > 0 {
        shown.truncate(room - 1);
        shown.push(Line::styled(
            format!("… {} more", lines.len() - room + 1),
            Style::new().add_modifier(Modifier::BOLD),
        ));
    }
    frame.render_widget(Clear, rect);
    frame.render_widget(
        Paragraph::new(shown).block(Block::bordered().title(fit(title, inner_width))),
        rect,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmbus_schemas::{AlertKind, LicenseSummary, ReplicaStatus};
    use ratatui::{Terminal, backend::TestBackend};
    use std::collections::BTreeMap;

    /// 2026-11-27 10:00:00 UTC.
    const NOW_MS: i64 = 1_795_773_600_000;

    fn slave(id: &str, connected: bool, local: Option<u32>, in_use: u32) -> SlaveStatus {
        SlaveStatus {
            slave_id: id.into(),
            connected,
            license: None,
            local_limit: local,
            in_use,
            in_use_by_type: BTreeMap::from([("inbound".into(), in_use)]),
            last_seen_ms_ago: 300,
            master: Some(lmbus_schemas::MasterUse {
                role: lmbus_schemas::MasterRole::Primary,
                in_use: true,
                other: None,
            }),
            allotted: BTreeMap::new(),
            // As from a master that does not say the grace period: `DISCONNECTED`.
            grace_ms: None,
            logout_after_grace: false,
            reclaimed: false,
        }
    }

    /// Many types and slaves: `inbound` over its limit (2 / 1, a lowered license),
    /// `outbound` at it (3 / 3), 28 quiet types; 40 slaves, `site07` at its local limit,
    /// `site00` disconnected with a long id.
    fn crowded() -> StatusReply {
        let mut type_limits = BTreeMap::from([("inbound".into(), 1), ("outbound".into(), 3)]);
        let mut in_use_by_type = BTreeMap::from([("inbound".into(), 2), ("outbound".into(), 3)]);
        for i in 0..28 {
            type_limits.insert(format!("type{i:02}"), 10);
            in_use_by_type.insert(format!("type{i:02}"), 1);
        }
        let mut slaves = vec![slave("site00-with-a-very-long-name", false, None, 0)];
        for i in 1..40 {
            let (local, in_use) = if i == 7 { (Some(4), 4) } else { (None, 1) };
            slaves.push(slave(&format!("site{i:02}"), true, local, in_use));
        }
        StatusReply {
            broker_id: "broker2".into(),
            cluster: "acme".into(),
            license: LicenseSummary {
                id: uuid::Uuid::nil(),
                customer: "ACME".into(),
                context: "production".into(),
                expires: "2026-12-25".into(),
                maintenance_expires: "2026-12-01".into(),
                not_for_production: false,
                sync: None,
            },
            allow_unlicensed_slaves: true,
            total_limit: 100,
            type_limits,
            total_in_use: 33,
            in_use_by_type,
            slaves_total: 40,
            slaves_connected: 39,
            slaves,
            leader_term: 3,
            ledger_sequence: 42,
            admission: lmbus_schemas::Admission::Strict,
            allotted_by_type: BTreeMap::new(),
            allotted_total: 0,
            agents: Vec::new(),
            seats: Vec::new(),
            replicas: vec![
                ReplicaStatus {
                    replica: "broker2".into(),
                    priority: 1,
                    leader: true,
                    applied: 42,
                    drained: false,
                    last_seen_ms_ago: 200,
                },
                ReplicaStatus {
                    replica: "broker1".into(),
                    priority: 2,
                    leader: false,
                    applied: 42,
                    drained: false,
                    last_seen_ms_ago: 200,
                },
            ],
        }
    }

    fn view() -> LiveView {
        let mut view = LiveView {
            status: Some(crowded()),
            refreshed_ms: Some(NOW_MS - 1000),
            now_ms: NOW_MS,
            ..LiveView::default()
        };
        let mut alert = Alert::new(
            Severity::Warning,
            AlertKind::SlaveDisconnected,
            "site00 lost",
        );
        alert.time_ms = NOW_MS - 5000;
        view.push_alert(alert);
        view
    }

    fn render(view: &LiveView, ui: &UiState, w: u16, h: u16) -> ratatui::buffer::Buffer {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| draw(f, view, ui)).unwrap();
        terminal.backend().buffer().clone()
    }

    fn screen(view: &LiveView, ui: &UiState, w: u16, h: u16) -> String {
        let buffer = render(view, ui, w, h);
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn line_with<'a>(text: &'a str, needle: &str) -> Option<&'a str> {
        text.lines().find(|l| l.contains(needle))
    }

    /// At 80×24 and at 60×15, with 30 types and 40 slaves: the type over its limit
    /// (`2 / 1 OVER`), the type at its limit (`3 / 3 FULL`) and the slave at its local
    /// limit are on screen, in text; a "more" marker says rows are below; the header has
    /// the days to expiry.
    #[test]
    fn limit_rows_stay_on_a_small_terminal_and_say_over_in_text() {
        for (w, h) in [(80, 24), (60, 15)] {
            let text = screen(&view(), &UiState::default(), w, h);
            let over = line_with(&text, "inbound").unwrap_or_else(|| panic!("{w}x{h}:\n{text}"));
            assert!(over.contains("2 / 1 OVER"), "{w}x{h}:\n{text}");
            let full = line_with(&text, "outbound").unwrap_or_else(|| panic!("{w}x{h}:\n{text}"));
            assert!(full.contains("3 / 3 FULL"), "{w}x{h}:\n{text}");
            let site =
                line_with(&text, "slave site07").unwrap_or_else(|| panic!("{w}x{h}:\n{text}"));
            assert!(site.contains("4 / 4 FULL"), "{w}x{h}:\n{text}");
            assert!(text.contains("▼"), "no more-marker at {w}x{h}:\n{text}");
            assert!(text.contains("expires in 28 days"), "{w}x{h}:\n{text}");
        }
    }

    /// At 80 columns the slave table keeps whole column titles and words: columns that do
    /// not fit are named as hidden, `DISCONNECTED` is whole, a long id ends with `…`.
    #[test]
    fn columns_are_dropped_whole_or_cut_with_an_ellipsis() {
        let ui = UiState::default();
        let g = geometry(&view(), &ui, 80, 24);
        let mut ui = ui;
        // Scroll to the slave table.
        ui.scroll = g.slaves[0].0.saturating_sub(2);
        let text = screen(&view(), &ui, 80, 24);
        let title = line_with(&text, "SLAVES (40 listed)").expect(&text);
        // The lowest-priority column that fits (LICENSE) stays; the wider one is named.
        assert!(title.contains("hidden columns: THIS MASTER IS"), "{text}");
        let head = line_with(&text, "SLAVE ").expect(&text);
        for column in [
            "SLAVE",
            "STATE",
            "AGENTS",
            "LAST BEAT",
            "LICENSE",
            "BY TYPE",
        ] {
            assert!(head.contains(column), "{column} cut in {head:?}");
        }
        let row = line_with(&text, "site00").expect(&text);
        assert!(
            row.contains("DISCONNECTED") && row.contains("site00-with-a…"),
            "{row:?}"
        );
        // At 140 columns every column is there.
        let text = screen(&view(), &ui, 140, 24);
        assert!(!text.contains("hidden columns"), "{text}");
        assert!(
            text.contains("THIS MASTER IS") && text.contains("primary, in use"),
            "{text}"
        );
    }

    /// When the last refresh failed, the body says STALE with the age of the last good
    /// refresh and the error, and its rows are greyed.
    #[test]
    fn stale_data_is_marked_with_its_age_and_greyed() {
        let mut view = view();
        view.refreshed_ms = Some(NOW_MS - 42_000);
        view.error = Some("no master answered on lmbus.v1.acme.broker.status".into());
        let buffer = render(&view, &UiState::default(), 80, 24);
        let text = screen(&view, &UiState::default(), 80, 24);
        assert!(text.contains("STALE: last good refresh 42 s ago"), "{text}");
        assert!(text.contains("STALE DATA, 42 s old"), "{text}");
        assert!(
            text.contains("refresh failed: no master answered"),
            "{text}"
        );
        // Heard from 200 ms before a refresh 42 s ago: 42.2 s ago now.
        let mut ui = UiState::default();
        ui.on_key(Key::End, &geometry(&view, &ui, 80, 24));
        let end = screen(&view, &ui, 80, 24);
        let leader = end.lines().find(|l| l.starts_with("broker2")).expect(&end);
        assert!(leader.contains("beat 42.2s ago"), "{end}");
        let y = text
            .lines()
            .position(|l| l.contains("outbound"))
            .expect(&text) as u16;
        assert_eq!(buffer[(0, y)].fg, Color::DarkGray, "{text}");
        // Fresh data is not greyed.
        let fresh = render(&self::view(), &UiState::default(), 80, 24);
        let text = screen(&self::view(), &UiState::default(), 80, 24);
        let y = text.lines().position(|l| l.contains("outbound")).unwrap() as u16;
        assert_ne!(fresh[(0, y)].fg, Color::DarkGray);
        assert!(!text.contains("STALE"));
    }

    #[test]
    fn days_to_expiry_count_calendar_days() {
        assert_eq!(days_to_expiry("2026-12-25", NOW_MS), Some(28));
        assert_eq!(days_to_expiry("2026-11-27", NOW_MS), Some(0));
        assert_eq!(days_to_expiry("2026-11-20", NOW_MS), Some(-7));
        assert_eq!(days_to_expiry("soon", NOW_MS), None);
        let mut view = view();
        if let Some(s) = view.status.as_mut() {
            s.license.expires = "2026-11-20".into();
        }
        assert!(screen(&view, &UiState::default(), 80, 24).contains("EXPIRED 7 days ago"));
    }

    /// PgDn moves the window (rows above get a ▲ marker), End reaches the alerts, Home
    /// goes back; ↓ moves the selection and the window follows it.
    #[test]
    fn scrolling_moves_the_window() {
        let view = view();
        let mut ui = UiState::default();
        let g = geometry(&view, &ui, 80, 24);
        assert!(g.rows > g.page, "{g:?}");
        let top = screen(&view, &ui, 80, 24);
        assert!(!top.contains("▲"));
        assert_eq!(ui.on_key(Key::PageDown, &g), Action::None);
        assert_eq!(ui.scroll, g.page);
        let paged = screen(&view, &ui, 80, 24);
        assert_ne!(top, paged);
        assert!(paged.contains(&format!("▲{} more", g.page)), "{paged}");
        ui.on_key(Key::End, &g);
        assert!(screen(&view, &ui, 80, 24).contains("site00 lost"));
        ui.on_key(Key::Home, &g);
        assert_eq!(ui.scroll, 0);
        for _ in 0..39 {
            ui.on_key(Key::Down, &g);
        }
        assert_eq!(ui.selected, 39);
        let row = g.slaves[39].0;
        assert!(ui.scroll <= row && row < ui.scroll + g.page, "{ui:?} {g:?}");
        assert!(screen(&view, &ui, 80, 24).contains("site39"));
        ui.on_key(Key::Down, &g);
        assert_eq!(ui.selected, 39, "the selection stops at the last slave");
    }

    /// `?` opens the help, Esc closes it, q quits, r refreshes.
    #[test]
    fn question_mark_shows_help() {
        let view = view();
        let mut ui = UiState::default();
        let g = geometry(&view, &ui, 60, 15);
        assert_eq!(ui.on_key(Key::Char('?'), &g), Action::None);
        assert!(ui.help);
        let text = screen(&view, &ui, 60, 15);
        assert!(
            text.contains("help (Esc closes)") && text.contains("select a slave"),
            "{text}"
        );
        assert_eq!(ui.on_key(Key::Esc, &g), Action::None);
        assert!(!ui.help);
        assert_eq!(ui.on_key(Key::Char('r'), &g), Action::Refresh);
        assert_eq!(ui.on_key(Key::Char('q'), &g), Action::Quit);
    }

    /// Enter on the selected slave asks for its agents and shows them; Esc closes the list.
    #[test]
    fn enter_shows_the_selected_slaves_agents() {
        let mut view = view();
        let mut ui = UiState::default();
        let g = geometry(&view, &ui, 80, 24);
        ui.on_key(Key::Down, &g);
        assert_eq!(
            ui.on_key(Key::Enter, &g),
            Action::FetchAgents("site01".into())
        );
        assert!(screen(&view, &ui, 80, 24).contains("asking the master"));
        view.agents = Some((
            "site01".into(),
            Ok(vec![AgentClaim {
                agent_id: "agent-17".into(),
                agent_type: "inbound".into(),
            }]),
        ));
        let text = screen(&view, &ui, 80, 24);
        assert!(text.contains("agents of site01 (1)"), "{text}");
        assert!(
            line_with(&text, "agent-17").is_some_and(|l| l.contains("inbound")),
            "{text}"
        );
        ui.on_key(Key::Esc, &g);
        assert_eq!(ui.agents_of, None);
        assert!(!screen(&view, &ui, 80, 24).contains("agent-17"));
    }

    #[test]
    fn without_a_status_the_view_says_why() {
        let view = LiveView {
            error: Some("no master answered".into()),
            ..LiveView::default()
        };
        assert!(screen(&view, &UiState::default(), 60, 15).contains("no master answered"));
    }

    #[test]
    fn recent_alerts_are_bounded() {
        let mut view = LiveView::default();
        for i in 0..(RECENT_ALERTS + 10) {
            view.push_alert(Alert::new(
                Severity::Info,
                AlertKind::LicenseCounts,
                i.to_string(),
            ));
        }
        assert_eq!(view.alerts.len(), RECENT_ALERTS);
        assert_eq!(
            view.alerts.back().unwrap().message,
            (RECENT_ALERTS + 9).to_string()
        );
    }

    /// Any size down to a single cell draws without a panic, with or without an overlay,
    /// and a terminal too short for every pinned row says how many more there are.
    #[test]
    fn tiny_terminals_draw_and_count_what_is_left_out() {
        let view = view();
        for (w, h) in [(1, 1), (10, 3), (20, 5), (30, 8)] {
            for ui in [
                UiState::default(),
                UiState {
                    help: true,
                    ..UiState::default()
                },
                UiState {
                    agents_of: Some("site01".into()),
                    ..UiState::default()
                },
            ] {
                render(&view, &ui, w, h);
            }
        }
        let text = screen(&view, &UiState::default(), 80, 8);
        assert!(text.contains("more rows at or over the limit"), "{text}");
    }

    #[test]
    fn fit_marks_what_it_cuts() {
        assert_eq!(fit("DISCONNECTED", 12), "DISCONNECTED");
        assert_eq!(fit("DISCONNECTED", 6), "DISCO…");
        assert_eq!(usage_text(2, Some(1)), "2 / 1 OVER");
        assert_eq!(usage_text(3, Some(3)), "3 / 3 FULL");
        assert_eq!(usage_text(1, None), "1 / -");
    }
}
