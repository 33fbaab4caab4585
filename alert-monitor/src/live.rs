//! The live License Monitor (ratatui): the IO around the pure view in `live_view.rs`. It
//! owns the terminal, the refresh timer, the alert stream and the keys; each turn it
//! updates the [`LiveView`] or the [`UiState`] and draws.

use std::time::Duration;

use futures::StreamExt;
use lmbus_schemas::{Alert, Subjects, decode};

pub use crate::live_view::{
    Action, Geometry, Key, LiveView, RECENT_ALERTS, UiState, days_to_expiry, draw, fit, geometry,
    usage_text,
};
use crate::{Start, alert_source};
use lmbus_ops::{fetch_agents, fetch_status};

/// Runs the live view on the terminal until `q`, Esc or Ctrl-C: the status every `every`,
/// alerts as they come (starting with the last few stored), a slave's agents on Enter.
pub async fn run(
    client: &async_nats::Client,
    subjects: &Subjects,
    every: Duration,
    timeout: Duration,
) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

    let mut view = LiveView::default();
    let mut ui = UiState::default();
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
                        view.refreshed_ms = Some(unix_ms());
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
            Some(key) = key_rx.recv() => {
                if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
                    break Ok(());
                }
                let key = match key.code {
                    KeyCode::Up => Key::Up,
                    KeyCode::Down => Key::Down,
                    KeyCode::PageUp => Key::PageUp,
                    KeyCode::PageDown => Key::PageDown,
                    KeyCode::Home => Key::Home,
                    KeyCode::End => Key::End,
                    KeyCode::Enter => Key::Enter,
                    KeyCode::Esc => Key::Esc,
                    KeyCode::Char(c) => Key::Char(c),
                    _ => continue,
                };
                let Ok(size) = terminal.size() else { continue };
                let g = geometry(&view, &ui, size.width, size.height);
                match ui.on_key(key, &g) {
                    Action::None => {}
                    Action::Quit => break Ok(()),
                    Action::Refresh => refresh.reset_immediately(),
                    Action::FetchAgents(slave) => {
                        view.agents = None;
                        view.now_ms = unix_ms();
                        let _ = terminal.draw(|frame| draw(frame, &view, &ui));
                        let agents = fetch_agents(client, subjects, &slave, timeout)
                            .await
                            .map_err(|e| format!("{e:#}"));
                        view.agents = Some((slave, agents));
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
        view.now_ms = unix_ms();
        if let Err(e) = terminal.draw(|frame| draw(frame, &view, &ui)) {
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
