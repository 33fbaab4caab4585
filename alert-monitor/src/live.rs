//! The live License Monitor (ratatui): the leader and replicas, agents per type against the
//! limits with usage bars, each slave, and the latest alerts, refreshed until `q`.
//!
//! `draw` is a pure function of a [`LiveView`], so tests render it into a buffer; `run`
//! owns the terminal, the refresh timer, the alert stream and the keys.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use lmbus_schemas::{Alert, Severity, StatusReply, Subjects, decode};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};

use crate::{Start, alert_source, format_time};
use lmbus_ops::{fetch_status, license_summary, slave_cells};

/// How many recent alerts the view keeps.
const RECENT_ALERTS: usize = 50;

/// What the live view shows: the last status (or why there is none) and recent alerts.
#[derive(Debug, Default)]
pub struct LiveView {
    pub status: Option<StatusReply>,
    /// Why the last refresh failed (the last good status stays on screen).
    pub error: Option<String>,
    /// When the status was fetched, as text.
    pub refreshed: String,
    /// Newest last.
    pub alerts: VecDeque<Alert>,
}

impl LiveView {
    pub fn push_alert(&mut self, alert: Alert) {
        if self.alerts.len() == RECENT_ALERTS {
            self.alerts.pop_front();
        }
        self.alerts.push_back(alert);
    }
}

fn ratio(used: u32, limit: u32) -> f64 {
    if limit == 0 {
        1.0
    } else {
        (f64::from(used) / f64::from(limit)).min(1.0)
    }
}

fn usage_color(used: u32, limit: u32) -> Color {
    match ratio(used, limit) {
        r if r >= 1.0 => Color::Red,
        r if r >= 0.8 => Color::Yellow,
        _ => Color::Green,
    }
}

/// Renders `view` into `frame`.
pub fn draw(frame: &mut Frame, view: &LiveView) {
    let area = frame.area();
    let Some(s) = &view.status else {
        let text = view
            .error
            .clone()
            .unwrap_or_else(|| "asking the master for its status...".into());
        frame.render_widget(
            Paragraph::new(text).block(Block::bordered().title(" lmbus License Monitor ")),
            area,
        );
        return;
    };
    let mut types: BTreeSet<&String> = s.type_limits.keys().collect();
    types.extend(s.in_use_by_type.keys());
    let replicas = s.replicas.len().max(1) as u16;
    let [
        header,
        replica_area,
        usage_area,
        slave_area,
        alert_area,
        footer,
    ] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(replicas + 3),
        Constraint::Length(types.len() as u16 + 3),
        Constraint::Min(5),
        Constraint::Length(9),
        Constraint::Length(1),
    ])
    .areas(area);

    let mut head = vec![
        Line::from(vec![
            Span::styled("cluster ", Style::new().fg(Color::DarkGray)),
            Span::styled(s.cluster.clone(), Style::new().add_modifier(Modifier::BOLD)),
            Span::styled("  leader ", Style::new().fg(Color::DarkGray)),
            Span::raw(format!(
                "{} (term {}, ledger at {})",
                s.broker_id, s.leader_term, s.ledger_sequence
            )),
        ]),
        Line::from(license_summary(s)),
    ];
    let slaves = format!(
        "slaves {} connected of {}  ",
        s.slaves_connected, s.slaves_total
    );
    head.push(match &view.error {
        Some(e) => Line::from(vec![
            Span::raw(slaves),
            Span::styled(
                format!("refresh failed: {e} (showing {})", view.refreshed),
                Style::new().fg(Color::Red),
            ),
        ]),
        None => Line::from(vec![
            Span::raw(slaves),
            Span::styled(
                format!("as of {}", view.refreshed),
                Style::new().fg(Color::DarkGray),
            ),
        ]),
    });
    frame.render_widget(
        Paragraph::new(head).block(Block::new().borders(Borders::BOTTOM)),
        header,
    );

    let rows = s.replicas.iter().map(|r| {
        Row::new(vec![
            Cell::from(r.replica.clone()),
            Cell::from(r.role()),
            Cell::from(r.priority.to_string()),
            Cell::from(r.applied.to_string()),
            Cell::from(format!("{:.1}s ago", r.last_seen_ms_ago as f64 / 1000.0)),
        ])
    });
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(24),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Length(12),
                Constraint::Length(12),
            ],
        )
        .header(
            Row::new(["REPLICA", "ROLE", "PRIORITY", "LEDGER AT", "LAST BEAT"])
                .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title(" replicas ")),
        replica_area,
    );

    let block = Block::bordered().title(" agents in use / limit ");
    let inner = block.inner(usage_area);
    frame.render_widget(block, usage_area);
    let lines = Layout::vertical(vec![Constraint::Length(1); types.len() + 1]).split(inner);
    let mut gauge = |rect: Rect, name: &str, used: u32, limit: Option<u32>| {
        let label = match limit {
            Some(l) => format!("{name:<16} {used:>7} / {l:<7}"),
            None => format!("{name:<16} {used:>7} / -      "),
        };
        let (ratio, color) = match limit {
            Some(l) => (ratio(used, l), usage_color(used, l)),
            None => (0.0, Color::DarkGray),
        };
        // Filled and empty cells differ in shape too, so the bar reads without colour
        // (a captured pane, a monochrome terminal).
        let width = usize::from(rect.width).saturating_sub(label.chars().count() + 1);
        let filled = ((ratio * width as f64).round() as usize).min(width);
        let bar = Line::from(vec![
            Span::raw(label),
            Span::raw(" "),
            Span::styled("█".repeat(filled), Style::new().fg(color)),
            Span::styled("░".repeat(width - filled), Style::new().fg(Color::DarkGray)),
        ]);
        frame.render_widget(Paragraph::new(bar), rect);
    };
    for (i, t) in types.iter().enumerate() {
        let used = s.in_use_by_type.get(*t).copied().unwrap_or(0);
        gauge(lines[i], t, used, s.type_limits.get(*t).copied());
    }
    gauge(
        lines[types.len()],
        "TOTAL",
        s.total_in_use,
        Some(s.total_limit),
    );

    let rows = s.slaves.iter().map(|slave| {
        let connected = slave.connected;
        Row::new(
            slave_cells(slave)
                .into_iter()
                .enumerate()
                .map(move |(i, text)| {
                    let cell = Cell::from(text);
                    if i == 1 && !connected {
                        cell.style(Style::new().fg(Color::Red))
                    } else {
                        cell
                    }
                }),
        )
    });
    let unlisted = (s.slaves_total as usize).saturating_sub(s.slaves.len());
    let title = if unlisted > 0 {
        format!(
            " slaves ({} listed, {unlisted} more not listed) ",
            s.slaves.len()
        )
    } else {
        format!(" slaves ({}) ", s.slaves.len())
    };
    frame.render_widget(
        Table::new(
            rows,
            [
                Constraint::Length(20),
                Constraint::Length(13),
                Constraint::Length(18),
                Constraint::Length(11),
                Constraint::Length(6),
                Constraint::Length(7),
                Constraint::Min(20),
                Constraint::Length(12),
            ],
        )
        .header(
            Row::new([
                "SLAVE",
                "STATE",
                "THIS MASTER IS",
                "LICENSE",
                "LOCAL",
                "AGENTS",
                "BY TYPE",
                "LAST BEAT",
            ])
            .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title(title)),
        slave_area,
    );

    let shown = alert_area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = view
        .alerts
        .iter()
        .rev()
        .take(shown)
        .map(|a| {
            let color = match a.severity {
                Severity::Critical => Color::Red,
                Severity::Warning => Color::Yellow,
                Severity::Info => Color::Reset,
            };
            Line::styled(
                format!(
                    "{} {:<22} {}",
                    // The time of day; an alert's time comes from the network.
                    format_time(a.time_ms).get(11..19).unwrap_or("--:--:--"),
                    a.kind.token(),
                    lmbus_schemas::printable(&a.message)
                ),
                Style::new().fg(color),
            )
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" recent alerts (newest first) ")),
        alert_area,
    );
    frame.render_widget(
        Paragraph::new("q quit   r refresh now").style(Style::new().fg(Color::DarkGray)),
        footer,
    );
}

/// Runs the live view on the terminal until `q`, Esc or Ctrl-C: the status every `every`,
/// alerts as they come (starting with the last few stored).
pub async fn run(
    client: &async_nats::Client,
    subjects: &Subjects,
    every: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

    let mut view = LiveView::default();
    // Alerts: the last 20 stored, then live; without a readable alert stream, live only.
    // Bounded: when the screen cannot keep up with a flood, the newest are dropped (the
    // view shows only the latest few anyway; `tail` is the complete record).
    let (alert_tx, mut alert_rx) = tokio::sync::mpsc::channel::<Alert>(1024);
    let source = match alert_source(client, subjects, Start::Last(20)).await {
        Ok((incoming, _)) => Some(incoming),
        Err(_) => alert_source(client, subjects, Start::Now)
            .await
            .ok()
            .map(|(incoming, _)| incoming),
    };
    let alerts = tokio::spawn(async move {
        let Some(mut incoming) = source else { return };
        while let Some(item) = incoming.next().await {
            if let Ok(msg) = item
                && let Ok(alert) = decode::<Alert>(&msg.payload)
                && let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                    alert_tx.try_send(alert)
            {
                return;
            }
        }
    });
    // Keys come from a blocking reader thread; keys pressed faster than the screen is
    // drawn beyond 64 are dropped.
    let (key_tx, mut key_rx) = tokio::sync::mpsc::channel(64);
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let keys = std::thread::spawn(move || {
        while stop_rx.try_recv().is_err() {
            if event::poll(Duration::from_millis(100)).unwrap_or(false)
                && let Ok(Event::Key(key)) = event::read()
                && key.kind == KeyEventKind::Press
                && let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) = key_tx.try_send(key)
            {
                return;
            }
        }
    });

    let mut terminal = ratatui::try_init()?;
    let mut refresh = tokio::time::interval(every);
    let result = loop {
        tokio::select! {
            _ = refresh.tick() => {
                match fetch_status(client, subjects, timeout).await {
                    Ok(status) => {
                        view.status = Some(lmbus_ops::printable_status(&status));
                        view.error = None;
                        view.refreshed = format_time(unix_ms());
                    }
                    Err(e) => view.error = Some(format!("{e:#}")),
                }
            }
            Some(alert) = alert_rx.recv() => {
                view.push_alert(alert);
                // Take whatever else arrived with it before drawing.
                while let Ok(more) = alert_rx.try_recv() {
                    view.push_alert(more);
                }
            }
            Some(key) = key_rx.recv() => match key.code {
                KeyCode::Char('q') | KeyCode::Esc => break Ok(()),
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => break Ok(()),
                KeyCode::Char('r') => refresh.reset_immediately(),
                _ => {}
            },
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
        if let Err(e) = terminal.draw(|frame| draw(frame, &view)) {
            break Err(e.into());
        }
    };
    ratatui::restore();
    let _ = stop_tx.send(());
    let _ = keys.join();
    alerts.abort();
    result
}

fn unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmbus_schemas::{AlertKind, LicenseSummary, ReplicaStatus, SlaveStatus};
    use ratatui::{Terminal, backend::TestBackend};
    use std::collections::BTreeMap;

    fn status() -> StatusReply {
        StatusReply {
            broker_id: "b1".into(),
            cluster: "acme".into(),
            license: LicenseSummary {
                id: uuid::Uuid::nil(),
                customer: "ACME".into(),
                context: "production".into(),
                expires: "2099-12-31".into(),
            },
            allow_unlicensed_slaves: true,
            total_limit: 10,
            type_limits: BTreeMap::from([("inbound".into(), 4)]),
            total_in_use: 5,
            in_use_by_type: BTreeMap::from([("inbound".into(), 4), ("outbound".into(), 1)]),
            slaves: vec![
                SlaveStatus {
                    slave_id: "site1".into(),
                    connected: true,
                    license: None,
                    local_limit: None,
                    in_use: 5,
                    in_use_by_type: BTreeMap::from([("inbound".into(), 4), ("outbound".into(), 1)]),
                    last_seen_ms_ago: 300,
                    master: Some(lmbus_schemas::MasterUse {
                        role: lmbus_schemas::MasterRole::Primary,
                        in_use: true,
                    }),
                    allotted: BTreeMap::new(),
                },
                SlaveStatus {
                    slave_id: "site2".into(),
                    connected: false,
                    license: None,
                    local_limit: Some(3),
                    in_use: 0,
                    in_use_by_type: BTreeMap::new(),
                    last_seen_ms_ago: 45_000,
                    master: None,
                    allotted: BTreeMap::new(),
                },
            ],
            leader_term: 3,
            ledger_sequence: 42,
            admission: lmbus_schemas::Admission::Strict,
            allotted_by_type: BTreeMap::new(),
            allotted_total: 0,
            replicas: vec![
                ReplicaStatus {
                    replica: "b1".into(),
                    priority: 1,
                    leader: true,
                    applied: 42,
                    drained: false,
                    last_seen_ms_ago: 100,
                },
                ReplicaStatus {
                    replica: "b2".into(),
                    priority: 2,
                    leader: false,
                    applied: 42,
                    drained: false,
                    last_seen_ms_ago: 200,
                },
            ],
            slaves_total: 2,
            slaves_connected: 1,
        }
    }

    fn screen(view: &LiveView) -> String {
        let mut terminal = Terminal::new(TestBackend::new(120, 40)).unwrap();
        terminal.draw(|f| draw(f, view)).unwrap();
        let buffer = terminal.backend().buffer().clone();
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

    /// Every part of the view is on the screen: leader and term, both replicas, the usage
    /// lines with their counts and limits, both slaves with their state, the newest alert.
    #[test]
    fn the_live_view_shows_leader_replicas_usage_slaves_and_alerts() {
        let mut view = LiveView {
            status: Some(status()),
            refreshed: "2026-11-24 10:00:00.000Z".into(),
            ..LiveView::default()
        };
        let mut alert = Alert::new(
            Severity::Warning,
            AlertKind::SlaveDisconnected,
            "site2 lost",
        );
        alert.time_ms = 1_795_478_400_000;
        view.push_alert(alert);
        let text = screen(&view);
        for expected in [
            "cluster acme",
            "b1 (term 3, ledger at 42)",
            "slaves 1 connected of 2",
            "leader",
            "standby",
            "inbound                4 / 4",
            "outbound               1 / -",
            "TOTAL                  5 / 10      ██████████",
            "site1",
            "DISCONNECTED",
            "inbound=4 outbound=1",
            "primary, in use",
            "slave_disconnected",
            "site2 lost",
            "q quit",
        ] {
            assert!(
                text.contains(expected),
                "{expected:?} not on screen:\n{text}"
            );
        }
    }

    #[test]
    fn without_a_status_the_view_says_why() {
        let view = LiveView {
            error: Some("no master answered".into()),
            ..LiveView::default()
        };
        assert!(screen(&view).contains("no master answered"));
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
}
