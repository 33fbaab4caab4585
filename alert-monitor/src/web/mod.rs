//! `lmbus-monitor web`: the License Monitor in a browser. A client of the same NATS subjects
//! as the terminal view (the master's status request, the alert stream) and of the admin
//! subjects for the actions; it changes nothing in the brokers.
//!
//! One task polls the master's status every `every`, one follows the alert stream; both
//! publish a [`Snapshot`] on a watch channel. Pages are rendered from it (`render.rs`, pure)
//! and each page's live part is pushed again over server-sent events when it changes.
//! Sessions and CSRF are in `auth.rs`; TLS in `tls.rs`.

mod auth;
mod render;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, Form, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use lmbus_ops::{SeatFilter, SeatList};
use lmbus_schemas::{Alert, Subjects};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use auth::{Role, Users, hash_password};
use render::{Snapshot, Viewer};

/// How the dashboard is served.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub listen: SocketAddr,
    /// The accounts; `None`: no login, everyone is a viewer (loopback only).
    pub users: Option<Users>,
    /// PEM certificate chain and private key: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Mark the cookies Secure although the dashboard serves plain HTTP (a reverse proxy
    /// terminates TLS in front of it).
    pub secure_cookies: bool,
    /// How often the master's status (and, while a seats page is open, the seats) is asked.
    pub every: Duration,
    /// How long to wait for the master.
    pub timeout: Duration,
    /// A session ends after this long without a request.
    pub session_idle: Duration,
    /// How many days of `license_counts` alerts the history reads back from the alert
    /// log at start (at most [`MAX_HISTORY_DAYS`]).
    pub history_days: u32,
}

/// The most days of history read back (and kept, as hourly peaks).
pub const MAX_HISTORY_DAYS: u32 = (render::MAX_HOURS / 24) as u32;

/// Refuses to expose the dashboard beyond this machine without both TLS and a login.
pub fn check_exposure(cfg: &WebConfig) -> anyhow::Result<()> {
    if cfg.listen.ip().is_loopback() {
        return Ok(());
    }
    let mut missing = Vec::new();
    if cfg.tls.is_none() {
        missing.push("TLS (--tls-cert and --tls-key)");
    }
    if cfg.users.is_none() {
        missing.push("a login (--users FILE)");
    }
    anyhow::ensure!(
        missing.is_empty(),
        "refusing to serve the dashboard on the non-loopback address {} without {}: configure them, or listen on a loopback address (e.g. 127.0.0.1:{}) behind a reverse proxy that terminates TLS (then pass --secure-cookies)",
        cfg.listen,
        missing.join(" and "),
        cfg.listen.port()
    );
    Ok(())
}

/// How long the sync button waits for the leader's answer (as `admin sync now`).
const SYNC_WAIT: Duration = Duration::from_secs(30);

/// The most alerts kept for the pages (oldest dropped first).
const MAX_ALERTS: usize = 2000;
/// The largest request body taken (forms are a few hundred bytes).
const MAX_BODY: usize = 16 * 1024;
const SESSION_COOKIE: &str = "lmbus_session";
/// Most password checks at once.
const LOGIN_CHECKS: usize = 2;
const LOGIN_COOKIE: &str = "lmbus_login";

struct Inner {
    client: async_nats::Client,
    subjects: Subjects,
    cfg: WebConfig,
    /// The latest status and recent alerts; written by the poller and the alert follower.
    snapshot: watch::Sender<Snapshot>,
    /// The seat list and when it was fetched, shared by every seats page (fetched again
    /// when older than `every`).
    seats: tokio::sync::Mutex<Option<(Instant, SeatList)>>,
    /// Logged-in browsers, bounded (`auth::MAX_SESSIONS`).
    sessions: Mutex<auth::Sessions>,
    /// The CSRF token of the anonymous viewer (no users file).
    anonymous_csrf: String,
    /// Ends the event streams at shutdown, so the server's graceful stop does not wait.
    stop: CancellationToken,
    /// Password checks running at once (argon2 takes ~19 MiB and tens of milliseconds
    /// each): a flood of logins waits here instead of exhausting memory and the blocking
    /// pool.
    login_checks: tokio::sync::Semaphore,
}

#[derive(Clone)]
struct App(Arc<Inner>);

/// Serves the dashboard on `cfg.listen` until `shutdown` completes.
pub async fn run(
    client: async_nats::Client,
    subjects: Subjects,
    cfg: WebConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    check_exposure(&cfg)?;
    let tcp = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    serve(client, subjects, cfg, tcp, shutdown).await
}

/// Serves the dashboard on a bound listener (tests bind port 0) until `shutdown` completes.
pub async fn serve(
    client: async_nats::Client,
    subjects: Subjects,
    mut cfg: WebConfig,
    tcp: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let local = tcp.local_addr()?;
    cfg.listen = local;
    check_exposure(&cfg)?;
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None => None,
    };
    let stop = CancellationToken::new();
    let app = App(Arc::new(Inner {
        client,
        subjects,
        sessions: Mutex::new(auth::Sessions::new(cfg.session_idle)),
        cfg,
        snapshot: watch::channel(Snapshot::default()).0,
        seats: tokio::sync::Mutex::new(None),
        anonymous_csrf: auth::random_token(),
        stop: stop.clone(),
        login_checks: tokio::sync::Semaphore::new(LOGIN_CHECKS),
    }));
    let poller = tokio::spawn(poll_status(app.clone()));
    let follower = tokio::spawn(follow_alerts(app.clone()));
    let recalled = tokio::spawn(recall_history(app.clone()));
    let router = router(app);
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("lmbus-monitor: dashboard on {scheme}://{local}/");
    let stopping = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    };
    let served = match tls {
        Some(acceptor) => {
            axum::serve(tls::TlsListener::new(tcp, acceptor), router)
                .with_graceful_shutdown(stopping)
                .await
        }
        None => {
            axum::serve(tcp, router)
                .with_graceful_shutdown(stopping)
                .await
        }
    };
    poller.abort();
    follower.abort();
    recalled.abort();
    served.context("the dashboard's server stopped")
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/slaves", get(slaves))
        .route("/slaves/{id}", get(slave))
        .route("/seats", get(seats))
        .route("/alerts", get(alerts))
        .route("/denials", get(denials))
        .route("/history", get(history))
        .route("/history.csv", get(history_csv))
        .route("/licenses", get(licenses))
        .route("/licenses/reload", post(reload))
        .route("/licenses/upload", post(upload))
        .route("/events", get(events))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/release", post(release))
        .route("/replicas/drain", post(drain))
        .route("/replicas/undrain", post(undrain))
        .route("/sync", post(sync_now))
        .route("/assets/style.css", get(style))
        .route("/assets/live.js", get(script))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}

/// Headers on every answer: no framing, no sniffing, nothing loaded from elsewhere.
async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Asks the master for its status every `every`, forever (aborted at shutdown).
async fn poll_status(app: App) {
    loop {
        let fetched =
            lmbus_ops::fetch_status(&app.0.client, &app.0.subjects, app.0.cfg.timeout).await;
        let now_ms = unix_ms();
        app.0.snapshot.send_modify(|s| {
            s.today = Some(time::OffsetDateTime::now_utc().date());
            match fetched {
                Ok(status) => {
                    if s.history
                        .last()
                        .is_none_or(|last| now_ms - last.time_ms >= render::SAMPLE_EVERY_MS)
                    {
                        s.add_sample(render::Sample {
                            time_ms: now_ms,
                            total: status.total_in_use,
                            by_type: status.in_use_by_type.clone(),
                            hour: false,
                        });
                    }
                    s.status = Some(status);
                    s.status_at_ms = now_ms;
                    s.error = None;
                }
                Err(e) => s.error = Some(e.to_string()),
            }
        });
        tokio::time::sleep(app.0.cfg.every).await;
    }
}

/// The history from before the dashboard started: the master's `license_counts` alerts of
/// the last `history_days` in the alert stream (read apart from the other alerts, so a
/// busy day's rejections do not push them out of the [`MAX_ALERTS`] the pages keep;
/// folded as they are read, so a month of them takes the memory of the samples kept).
/// Without a stream, or permission to read it, the history starts now (said on stderr).
async fn recall_history(app: App) {
    let (client, subjects) = (&app.0.client, &app.0.subjects);
    let js = async_nats::jetstream::new(client.clone());
    let days = app.0.cfg.history_days.min(MAX_HISTORY_DAYS);
    let since = time::OffsetDateTime::now_utc() - Duration::from_secs(u64::from(days) * 86_400);
    let filter = subjects.alert(
        lmbus_schemas::Severity::Info,
        lmbus_schemas::AlertKind::LicenseCounts,
    );
    let mut recalled = render::Snapshot::default();
    let read = lmbus_ops::stored_each(
        &js,
        &subjects.alert_stream(),
        Some(since),
        Some(&filter),
        |(_, _, payload)| {
            if let Ok(alert) = lmbus_schemas::decode::<Alert>(&payload)
                && alert.kind == lmbus_schemas::AlertKind::LicenseCounts
                && not_ahead(&alert)
            {
                for sample in render::Sample::of_counts(&alert) {
                    recalled.add_sample(sample);
                }
            }
        },
    )
    .await;
    if let Err(e) = read {
        eprintln!(
            "lmbus-monitor: the history starts now: cannot read earlier seat counts from the alert stream: {e}"
        );
        return;
    }
    app.0.snapshot.send_modify(|s| {
        for sample in recalled.hourly.into_iter().chain(recalled.history) {
            s.add_sample(sample);
        }
    });
}

/// How far ahead of this dashboard's clock a master's counts may be stamped and still be
/// charted.
const SKEW_ALLOWED_MS: i64 = 3_600_000;

/// A counts alert not stamped in the future by a master whose clock runs ahead: the
/// history's last day counts back from its newest sample, which one such sample would pin
/// far ahead (every real sample folded into hourly peaks, the ranges counted from then).
fn not_ahead(alert: &Alert) -> bool {
    alert.time_ms <= unix_ms() + SKEW_ALLOWED_MS
}

/// Follows the alert stream (the last [`MAX_ALERTS`] stored, then live), keeping the last
/// [`MAX_ALERTS`]; without a stream, live alerts only.
async fn follow_alerts(app: App) {
    let (client, subjects) = (&app.0.client, &app.0.subjects);
    let source =
        match crate::alert_source(client, subjects, crate::Start::Last(MAX_ALERTS as u64)).await {
            Ok((source, _)) => Ok(source),
            Err(_) => crate::alert_source(client, subjects, crate::Start::Now)
                .await
                .map(|(source, _)| source),
        };
    let Ok(mut source) = source else {
        return;
    };
    while let Some(item) = source.next().await {
        let Ok(incoming) = item else { continue };
        let Ok(alert) = lmbus_schemas::decode::<Alert>(&incoming.payload) else {
            continue;
        };
        app.0.snapshot.send_modify(|s| {
            if alert.kind == lmbus_schemas::AlertKind::LicenseCounts && not_ahead(&alert) {
                for sample in render::Sample::of_counts(&alert) {
                    s.add_sample(sample);
                }
            }
            if s.alerts.len() >= MAX_ALERTS {
                s.alerts.remove(0);
            }
            s.alerts.push(alert);
        });
    }
}

fn unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl App {
    /// Who sent this request: their session, or the anonymous viewer when no users file is
    /// configured; `None`: log in first.
    fn viewer(&self, headers: &HeaderMap) -> Option<Viewer> {
        if self.0.cfg.users.is_none() {
            return Some(Viewer {
                user: "anonymous".into(),
                role: Role::Viewer,
                csrf: self.0.anonymous_csrf.clone(),
                logged_in: false,
            });
        }
        let id = cookie(headers, SESSION_COOKIE)?;
        let mut sessions = self.0.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get(id, Instant::now())?;
        Some(Viewer {
            user: session.user,
            role: session.role,
            csrf: session.csrf,
            logged_in: true,
        })
    }

    fn secure(&self) -> bool {
        self.0.cfg.tls.is_some() || self.0.cfg.secure_cookies
    }

    /// The seat list, fetched again when older than `every`.
    async fn seat_list(&self) -> Result<SeatList, String> {
        let mut cached = self.0.seats.lock().await;
        if let Some((at, list)) = cached.as_ref()
            && at.elapsed() < self.0.cfg.every
        {
            return Ok(list.clone());
        }
        let list = lmbus_ops::fetch_seats(
            &self.0.client,
            &self.0.subjects,
            &SeatFilter::default(),
            self.0.cfg.timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        *cached = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    async fn forget_seats(&self) {
        *self.0.seats.lock().await = None;
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|h| auth::cookie(h, name))
}

fn error(status: StatusCode, viewer: Option<&Viewer>, message: &str) -> Response {
    (status, Html(render::error_page(viewer, message))).into_response()
}

fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

/// A page whose live part is `live`, refreshed from `events`.
fn live_page(title: &str, v: &Viewer, events: &str, live: &str, before: &str) -> Response {
    Html(render::page(
        title,
        Some(v),
        Some(events),
        &format!(r#"{before}<div id="live">{live}</div>"#),
    ))
    .into_response()
}

async fn overview(State(app): State<App>, headers: HeaderMap) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    let live = render::live_overview(&app.0.snapshot.borrow(), &v);
    live_page("Overview", &v, "/events?page=overview", &live, "")
}

async fn slaves(State(app): State<App>, headers: HeaderMap) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    let live = render::live_slaves(&app.0.snapshot.borrow());
    live_page("Slaves", &v, "/events?page=slaves", &live, "")
}

async fn slave(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    if lmbus_schemas::SlaveId::new(id.clone()).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            Some(&v),
            &format!("{} is not a slave id", lmbus_schemas::printable(&id)),
        );
    }
    let list = match app.seat_list().await {
        Ok(list) => only_slave(list, &id),
        Err(e) => return error(StatusCode::BAD_GATEWAY, Some(&v), &e),
    };
    let live = render::live_slave(&app.0.snapshot.borrow(), &id, &list, &v, unix_ms() as u64);
    let release_all = if v.role == Role::Admin {
        format!(
            r#"<form method="post" action="/release" class="danger"><input type="hidden" name="csrf" value="{}"><input type="hidden" name="slave" value="{}"><label><input type="checkbox" name="confirm" value="yes" required> I want every agent of this slave logged out</label> <button type="submit" id="release-all">Release every seat of this slave</button></form>"#,
            render::esc(&v.csrf),
            render::esc(&id)
        )
    } else {
        String::new()
    };
    let events = format!("/events?page=slave&slave={}", render::url_part(&id));
    Html(render::page(
        &format!("Slave {id}"),
        Some(&v),
        Some(&events),
        &format!(r#"<div id="live">{live}</div>{release_all}"#),
    ))
    .into_response()
}

fn only_slave(mut list: SeatList, slave: &str) -> SeatList {
    list.seats.retain(|s| s.slave == slave);
    list.truncated.retain(|s| s == slave);
    list
}

#[derive(Debug, Default, Deserialize)]
struct SeatQuery {
    #[serde(default)]
    q: String,
}

async fn seats(
    State(app): State<App>,
    headers: HeaderMap,
    query: Result<Query<SeatQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    let Ok(Query(query)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            Some(&v),
            "the search is not readable",
        );
    };
    let list = match app.seat_list().await {
        Ok(list) => list,
        Err(e) => return error(StatusCode::BAD_GATEWAY, Some(&v), &e),
    };
    let live = render::live_seats(&list, &query.q, &v, unix_ms() as u64);
    let search = format!(
        r#"<form method="get" action="/seats" class="search"><input name="q" id="q" value="{}" placeholder="slave, agent or type"><button type="submit">Search</button></form>"#,
        render::esc(&query.q)
    );
    let events = format!("/events?page=seats&q={}", render::url_part(&query.q));
    live_page("Seats", &v, &events, &live, &search)
}

#[derive(Debug, Default, Deserialize)]
struct AlertQuery {
    #[serde(default)]
    severity: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    slave: String,
}

impl AlertQuery {
    fn filter(&self) -> Result<crate::Filter, String> {
        let mut filter = crate::Filter::default();
        if !self.severity.is_empty() {
            filter.min_severity = Some(
                lmbus_schemas::Severity::parse(&self.severity)
                    .ok_or("unknown severity: use info, warning or critical")?,
            );
        }
        for kind in self.kind.split(',').filter(|k| !k.is_empty()) {
            filter.kinds.insert(
                lmbus_schemas::AlertKind::parse(kind.trim()).ok_or_else(|| {
                    format!("unknown alert kind {}", lmbus_schemas::printable(kind))
                })?,
            );
        }
        for slave in self.slave.split(',').filter(|s| !s.is_empty()) {
            filter.slaves.insert(slave.trim().to_owned());
        }
        Ok(filter)
    }

    fn query_string(&self) -> String {
        format!(
            "severity={}&kind={}&slave={}",
            render::url_part(&self.severity),
            render::url_part(&self.kind),
            render::url_part(&self.slave)
        )
    }
}

async fn alerts(
    State(app): State<App>,
    headers: HeaderMap,
    query: Result<Query<AlertQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    let Ok(Query(query)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            Some(&v),
            "the filter is not readable",
        );
    };
    let filter = match query.filter() {
        Ok(filter) => filter,
        Err(e) => return error(StatusCode::BAD_REQUEST, Some(&v), &e),
    };
    let live = render::live_alerts(&app.0.snapshot.borrow(), &filter);
    let form = format!(
        r#"<form method="get" action="/alerts" class="search"><label>Severity <input name="severity" value="{}" placeholder="info, warning, critical"></label> <label>Kinds <input name="kind" value="{}" placeholder="registration_rejected,..."></label> <label>Slaves <input name="slave" value="{}"></label> <button type="submit">Filter</button></form>"#,
        render::esc(&query.severity),
        render::esc(&query.kind),
        render::esc(&query.slave)
    );
    let events = format!("/events?page=alerts&{}", query.query_string());
    live_page("Alerts", &v, &events, &live, &form)
}

#[derive(Debug, Default, Deserialize)]
struct EventsQuery {
    #[serde(default)]
    page: String,
    #[serde(default)]
    slave: String,
    #[serde(default)]
    q: String,
    /// The history page's range in days (everything held when absent).
    #[serde(default)]
    days: Option<u32>,
    #[serde(flatten)]
    alerts: AlertQuery,
}

/// The history page's and its CSV's range.
#[derive(Debug, Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    days: Option<u32>,
}

/// The history page's or CSV's range from its query string, or why it is refused.
fn history_query(
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Option<u32>, String> {
    query
        .map_err(|e| e.body_text())
        .and_then(|q| history_range(q.0.days))
}

/// A range of 1 to [`MAX_HISTORY_DAYS`] days, or none (everything held).
fn history_range(days: Option<u32>) -> Result<Option<u32>, String> {
    match days {
        Some(d) if d == 0 || d > MAX_HISTORY_DAYS => Err(format!(
            "days must be from 1 to {MAX_HISTORY_DAYS} (or left out for everything held), not {d}"
        )),
        d => Ok(d),
    }
}

/// The live part of one page as server-sent events: sent again whenever it changes (each
/// event's data is the HTML as a JSON string), until the browser leaves or the dashboard
/// stops.
async fn events(
    State(app): State<App>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let Ok(Query(query)) = query else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if !matches!(
        query.page.as_str(),
        "overview" | "slaves" | "slave" | "seats" | "alerts" | "denials" | "history" | "licenses"
    ) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let Ok(filter) = query.alerts.filter() else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if history_range(query.days).is_err() {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let rx = app.0.snapshot.subscribe();
    let state = (app, v, query, filter, rx, String::new());
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            let (app, v, query, filter, rx, last) = &mut st;
            let html = live_html(app, v, query, filter).await;
            if *html != **last {
                *last = html.clone();
                let data = serde_json::to_string(&html).unwrap_or_default();
                let event = Event::default().event("live").data(data);
                return Some((Ok::<_, std::convert::Infallible>(event), st));
            }
            let every = app.0.cfg.every;
            let stop = app.0.stop.clone();
            tokio::select! {
                _ = stop.cancelled() => return None,
                changed = rx.changed() => if changed.is_err() { return None },
                // Seats are fetched, not pushed: look again at the poll period.
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn live_html(app: &App, v: &Viewer, query: &EventsQuery, filter: &crate::Filter) -> String {
    let now_ms = unix_ms() as u64;
    match query.page.as_str() {
        "overview" => render::live_overview(&app.0.snapshot.borrow(), v),
        "slaves" => render::live_slaves(&app.0.snapshot.borrow()),
        "alerts" => render::live_alerts(&app.0.snapshot.borrow(), filter),
        "denials" => render::live_denials(&app.0.snapshot.borrow()),
        "history" => render::live_history(&app.0.snapshot.borrow(), query.days),
        "licenses" => render::live_licenses(&app.0.snapshot.borrow()),
        "seats" => match app.seat_list().await {
            Ok(list) => render::live_seats(&list, &query.q, v, now_ms),
            Err(e) => format!(r#"<p class="error">{}</p>"#, render::esc(&e)),
        },
        _ => match app.seat_list().await {
            Ok(list) => {
                let list = only_slave(list, &query.slave);
                let snapshot = app.0.snapshot.borrow().clone();
                render::live_slave(&snapshot, &query.slave, &list, v, now_ms)
            }
            Err(e) => format!(r#"<p class="error">{}</p>"#, render::esc(&e)),
        },
    }
}

async fn denials(State(app): State<App>, headers: HeaderMap) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    let live = render::live_denials(&app.0.snapshot.borrow());
    let note = r#"<p class="hint">Refused registrations from the alert stream: capacity denials (the license or a slave's share was full) apart from client or configuration errors (unknown type, unlicensed slave, rate limit, ...).</p>"#;
    live_page("Denials", &v, "/events?page=denials", &live, note)
}

async fn history(
    State(app): State<App>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    let days = match history_query(query) {
        Ok(days) => days,
        Err(e) => return error(StatusCode::BAD_REQUEST, Some(&v), &e),
    };
    let live = render::live_history(&app.0.snapshot.borrow(), days);
    let note = format!(
        r#"<p class="hint">Seats in use per agent type and in total: the master's license_counts alerts of the last {} days from the alert log (as far as it keeps them), then those live and a sample of the status every 30 s while the dashboard runs. A license_counts alert also carries the most seats in use since the previous one: that peak is charted 1 ms before the alert. The last day before the newest sample is kept as it came; older samples as each series' peak per hour. The dashed line is the total limit; a dot marks each series' peak.</p>"#,
        app.0.cfg.history_days.min(MAX_HISTORY_DAYS)
    );
    let events = match days {
        Some(d) => format!("/events?page=history&days={d}"),
        None => "/events?page=history".to_owned(),
    };
    live_page("History", &v, &events, &live, &note)
}

async fn licenses(State(app): State<App>, headers: HeaderMap) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    let live = render::live_licenses(&app.0.snapshot.borrow());
    let reload = if v.role == Role::Admin {
        format!(
            r#"<h2>Reload the master license</h2><p class="hint">Paste the new signed license file. The master verifies it (signature, dates, role) before anything changes, as <code>lmbus-broker admin reload-license</code>; a limit below current use logs nobody out. Replace the file given to <code>run --license</code> too.</p><form method="post" action="/licenses/reload" class="danger"><input type="hidden" name="csrf" value="{}"><textarea name="license" id="license-text" rows="12" cols="80" required></textarea><br><button type="submit" id="reload">Reload</button></form><p class="hint">Or upload the file (at most {} KiB):</p><form method="post" action="/licenses/upload" enctype="multipart/form-data" class="danger"><input type="hidden" name="csrf" value="{}"><input type="file" name="license" id="license-file" accept=".lic,.txt,text/plain" required> <button type="submit" id="upload">Upload and reload</button></form>"#,
            render::esc(&v.csrf),
            MAX_BODY / 1024,
            render::esc(&v.csrf)
        )
    } else {
        String::new()
    };
    Html(render::page(
        "Licenses",
        Some(&v),
        Some("/events?page=licenses"),
        &format!(r#"<div id="live">{live}</div>{reload}"#),
    ))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct ReloadForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    license: String,
}

impl WithCsrf for ReloadForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// An admin's license reload through the admin subject, as `web:<user>`: the master
/// verifies the text and answers what changed, or why it refused it (nothing changed).
async fn reload(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Form<ReloadForm>, FormRejection>,
) -> Response {
    let (v, form) = match checked(&app, &headers, form) {
        Ok(checked) => checked,
        Err(refused) => return *refused,
    };
    if let Err(refused) = admin_only(&v, "reload the license") {
        return *refused;
    }
    if form.license.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            Some(&v),
            "no license text: paste the signed license file; nothing was changed",
        );
    }
    reload_license(
        &app,
        &v,
        form.license,
        "the dashboard's reload form".to_owned(),
    )
    .await
}

/// An admin's license reload from an uploaded file (`multipart/form-data` with the fields
/// `csrf` and `license`): the same checks as the pasted form, then the same reload.
async fn upload(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return session_ended();
    };
    let form = match form {
        Ok(form) => form,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                Some(&v),
                &format!(
                    "this is not an upload the dashboard sends ({}); nothing was changed",
                    rejection.body_text()
                ),
            );
        }
    };
    let upload = match read_upload(form).await {
        Ok(upload) => upload,
        Err((status, message)) => return error(status, Some(&v), &message),
    };
    if !auth::same_token(&v.csrf, &upload.csrf) {
        return csrf_failed(&v);
    }
    if let Err(refused) = admin_only(&v, "reload the license") {
        return *refused;
    }
    let Some((name, bytes)) = upload.license else {
        return error(
            StatusCode::BAD_REQUEST,
            Some(&v),
            "no license file in the upload: choose the signed license file; nothing was changed",
        );
    };
    let Ok(text) = String::from_utf8(bytes) else {
        return error(
            StatusCode::BAD_REQUEST,
            Some(&v),
            &format!("{name} is not a license file (a license is UTF-8 text); nothing was changed"),
        );
    };
    if text.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            Some(&v),
            &format!("{name} is empty; nothing was changed"),
        );
    }
    reload_license(
        &app,
        &v,
        text,
        format!("{name} (uploaded to the dashboard)"),
    )
    .await
}

/// The fields of a license upload.
#[derive(Debug, Default)]
struct Upload {
    csrf: String,
    /// The file's name as the browser sent it, and its bytes.
    license: Option<(String, Vec<u8>)>,
}

/// Reads a license upload (bounded by the router's body limit); an unknown field, a second
/// file or a malformed body is refused with the status and the page's message.
async fn read_upload(mut form: Multipart) -> Result<Upload, (StatusCode, String)> {
    let mut upload = Upload::default();
    let broken = |e: axum::extract::multipart::MultipartError| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the upload is larger than the {} KiB a dashboard form takes; nothing was changed",
                MAX_BODY / 1024
            )
        } else {
            format!(
                "this is not an upload the dashboard sends ({}); nothing was changed",
                e.body_text()
            )
        };
        (status, message)
    };
    while let Some(field) = form.next_field().await.map_err(broken)? {
        match field.name() {
            Some("csrf") => upload.csrf = field.text().await.map_err(broken)?,
            Some("license") if upload.license.is_none() => {
                // The name is only shown back (escaped) and logged: never a path.
                let name: String = field
                    .file_name()
                    .unwrap_or("the uploaded file")
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(128)
                    .collect();
                let bytes = field.bytes().await.map_err(broken)?;
                upload.license = Some((name, bytes.to_vec()));
            }
            other => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!(
                        "this is not an upload the dashboard sends (field {}); nothing was changed",
                        other.unwrap_or("without a name")
                    ),
                ));
            }
        }
    }
    Ok(upload)
}

/// Sends `license` (its text; `file` says where it came from) to the master's reload
/// subject as `web:<user>`: the master verifies it and answers what changed, or why it
/// refused it (nothing changed).
async fn reload_license(app: &App, v: &Viewer, license: String, file: String) -> Response {
    let request = lmbus_schemas::ReloadRequest {
        license,
        operator: format!("web:{}", v.user),
        file,
    };
    tracing::info!(user = %v.user, file = %request.file, "dashboard license reload");
    let subject = app.0.subjects.admin_reload();
    match ask::<_, lmbus_schemas::ReloadReply>(app, subject, &request).await {
        Ok(lmbus_schemas::ReloadReply::Reloaded { message }) => {
            Html(render::done_page(v, &message, "/licenses")).into_response()
        }
        Ok(lmbus_schemas::ReloadReply::Error { message }) => error(
            StatusCode::CONFLICT,
            Some(v),
            &format!("the master refused the license, nothing was changed: {message}"),
        ),
        Err(e) => error(StatusCode::BAD_GATEWAY, Some(v), &e),
    }
}

async fn history_csv(
    State(app): State<App>,
    headers: HeaderMap,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(v) = app.viewer(&headers) else {
        return to_login();
    };
    let days = match history_query(query) {
        Ok(days) => days,
        Err(e) => return error(StatusCode::BAD_REQUEST, Some(&v), &e),
    };
    let csv = render::history_csv(&app.0.snapshot.borrow(), days);
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"lmbus-seats-history.csv\"",
            ),
        ],
        csv,
    )
        .into_response()
}

async fn login_form(State(app): State<App>) -> Response {
    if app.0.cfg.users.is_none() {
        return Redirect::to("/").into_response();
    }
    login_answer(&app, StatusCode::OK, None)
}

/// The login page with a fresh login CSRF token, in its form and in a cookie.
fn login_answer(app: &App, status: StatusCode, message: Option<&str>) -> Response {
    let token = auth::random_token();
    let cookie = auth::set_cookie(LOGIN_COOKIE, &token, app.secure(), None);
    (
        status,
        [(header::SET_COOKIE, cookie)],
        Html(render::login_page(message, &token)),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    csrf: String,
    user: String,
    password: String,
}

async fn login(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Some(users) = app.0.cfg.users.clone() else {
        return Redirect::to("/").into_response();
    };
    let Ok(Form(form)) = form else {
        return error(
            StatusCode::BAD_REQUEST,
            None,
            "this is not the dashboard's login form: reload the login page",
        );
    };
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if !auth::same_token(expected, &form.csrf) {
        return login_answer(
            &app,
            StatusCode::FORBIDDEN,
            Some("the login form expired or was not sent by this dashboard (CSRF): log in again"),
        );
    }
    let (name, password) = (form.user.clone(), form.password);
    let role = match app.0.login_checks.acquire().await {
        Ok(_permit) => tokio::task::spawn_blocking(move || users.check(&name, &password))
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    let Some(role) = role else {
        tracing::warn!(user = %lmbus_schemas::printable(&form.user), "dashboard login refused");
        return login_answer(
            &app,
            StatusCode::UNAUTHORIZED,
            Some("wrong user or password"),
        );
    };
    tracing::info!(user = %form.user, role = role.token(), "dashboard login");
    let id = app
        .0
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .create(&form.user, role, Instant::now());
    let session = auth::set_cookie(SESSION_COOKIE, &id, app.secure(), None);
    let clear = auth::set_cookie(LOGIN_COOKIE, "", app.secure(), Some(0));
    let mut response = Redirect::to("/").into_response();
    let h = response.headers_mut();
    if let (Ok(a), Ok(b)) = (
        HeaderValue::from_str(&session),
        HeaderValue::from_str(&clear),
    ) {
        h.append(header::SET_COOKIE, a);
        h.append(header::SET_COOKIE, b);
    }
    response
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

impl WithCsrf for CsrfForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// A form that carries its session's CSRF token.
trait WithCsrf {
    fn csrf(&self) -> &str;
}

/// The viewer of a POST and its form, when the form parses, fits and carries the viewer's
/// session's CSRF token; otherwise the error page (401, 413, 400 or 403) and nothing done.
fn checked<T: WithCsrf>(
    app: &App,
    headers: &HeaderMap,
    form: Result<Form<T>, FormRejection>,
) -> Result<(Viewer, T), Box<Response>> {
    let Some(v) = app.viewer(headers) else {
        return Err(Box::new(session_ended()));
    };
    let form = match form {
        Ok(Form(form)) => form,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                Some(&v),
                &format!(
                    "the request is larger than the {} KiB a dashboard form takes; nothing was changed",
                    MAX_BODY / 1024
                ),
            )));
        }
        Err(rejection) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                Some(&v),
                &format!(
                    "this is not a form the dashboard sends ({}); nothing was changed",
                    rejection.body_text()
                ),
            )));
        }
    };
    if !auth::same_token(&v.csrf, form.csrf()) {
        return Err(Box::new(csrf_failed(&v)));
    }
    Ok((v, form))
}

/// A POST without a live session.
fn session_ended() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        None,
        "your session ended: log in again",
    )
}

/// A form without its session's CSRF token.
fn csrf_failed(v: &Viewer) -> Response {
    error(
        StatusCode::FORBIDDEN,
        Some(v),
        "this form was not sent from your dashboard session (CSRF check failed): reload the page and try again; nothing was changed",
    )
}

fn admin_only(v: &Viewer, what: &str) -> Result<(), Box<Response>> {
    if v.role == Role::Admin {
        return Ok(());
    }
    Err(Box::new(error(
        StatusCode::FORBIDDEN,
        Some(v),
        &format!(
            "user {} is a {} and may not {what}: ask an admin; nothing was changed",
            v.user,
            v.role.token()
        ),
    )))
}

async fn logout(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if let Err(refused) = checked(&app, &headers, form) {
        return *refused;
    }
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        app.0
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
    let clear = auth::set_cookie(SESSION_COOKIE, "", app.secure(), Some(0));
    ([(header::SET_COOKIE, clear)], Redirect::to("/login")).into_response()
}

#[derive(Debug, Deserialize)]
struct ReleaseForm {
    #[serde(default)]
    csrf: String,
    slave: String,
    #[serde(default)]
    agent: String,
    #[serde(default)]
    confirm: String,
}

impl WithCsrf for ReleaseForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// Releases one seat, or every seat of a slave (with the confirm box ticked), through the
/// admin subject, as `web:<user>`.
async fn release(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Form<ReleaseForm>, FormRejection>,
) -> Response {
    let (v, form) = match checked(&app, &headers, form) {
        Ok(checked) => checked,
        Err(refused) => return *refused,
    };
    if let Err(refused) = admin_only(&v, "release seats") {
        return *refused;
    }
    let agent = (!form.agent.is_empty()).then_some(form.agent);
    if agent.is_none() && form.confirm != "yes" {
        return error(
            StatusCode::BAD_REQUEST,
            Some(&v),
            "releasing every seat of a slave needs the confirmation box ticked; nothing was changed",
        );
    }
    let request = lmbus_schemas::ReleaseRequest {
        slave_id: form.slave.clone(),
        agent_id: agent,
        operator: format!("web:{}", v.user),
    };
    tracing::info!(user = %v.user, slave = %lmbus_schemas::printable(&form.slave), agent = ?request.agent_id, "dashboard release");
    let subject = app.0.subjects.admin_release();
    let reply: Result<lmbus_schemas::ReleaseReply, String> = ask(&app, subject, &request).await;
    app.forget_seats().await;
    match reply {
        Ok(lmbus_schemas::ReleaseReply::Released { agents }) => Html(render::done_page(
            &v,
            &format!(
                "released {} of slave {}: {}",
                lmbus_schemas::human::plural(agents.len() as u64, "seat", "seats"),
                form.slave,
                agents.join(", ")
            ),
            "/seats",
        ))
        .into_response(),
        Ok(lmbus_schemas::ReleaseReply::Error { message }) => {
            error(StatusCode::CONFLICT, Some(&v), &message)
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, Some(&v), &e),
    }
}

#[derive(Debug, Deserialize)]
struct ReplicaForm {
    #[serde(default)]
    csrf: String,
    replica: String,
}

impl WithCsrf for ReplicaForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

async fn drain(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Form<ReplicaForm>, FormRejection>,
) -> Response {
    replica_action(app, headers, form, true).await
}

async fn undrain(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Form<ReplicaForm>, FormRejection>,
) -> Response {
    replica_action(app, headers, form, false).await
}

async fn replica_action(
    app: App,
    headers: HeaderMap,
    form: Result<Form<ReplicaForm>, FormRejection>,
    drain: bool,
) -> Response {
    let (v, form) = match checked(&app, &headers, form) {
        Ok(checked) => checked,
        Err(refused) => return *refused,
    };
    if let Err(refused) = admin_only(&v, "drain or undrain replicas") {
        return *refused;
    }
    let request = lmbus_schemas::DrainRequest {
        replica: form.replica,
        operator: format!("web:{}", v.user),
    };
    let subject = if drain {
        app.0.subjects.admin_drain()
    } else {
        app.0.subjects.admin_undrain()
    };
    tracing::info!(user = %v.user, replica = %lmbus_schemas::printable(&request.replica), drain, "dashboard replica action");
    match ask::<_, lmbus_schemas::DrainReply>(&app, subject, &request).await {
        Ok(reply) => Html(render::done_page(&v, &reply.message, "/")).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, Some(&v), &e),
    }
}

/// The overview's "Sync with the vendor now" (an admin's): `admin sync now` as `web:<user>`.
async fn sync_now(
    State(app): State<App>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let (v, _) = match checked(&app, &headers, form) {
        Ok(checked) => checked,
        Err(refused) => return *refused,
    };
    if let Err(refused) = admin_only(&v, "sync with the vendor") {
        return *refused;
    }
    let request = lmbus_schemas::SyncNowRequest {
        operator: format!("web:{}", v.user),
    };
    tracing::info!(user = %v.user, "dashboard vendor sync");
    // A sync may take the broker's retries to the vendor (up to about 20 s), as long as the
    // CLI's `admin sync now` waits.
    match ask_within::<_, lmbus_schemas::SyncNowReply>(
        &app,
        app.0.subjects.admin_sync(),
        &request,
        SYNC_WAIT,
    )
    .await
    {
        Ok(lmbus_schemas::SyncNowReply::Synced { message }) => {
            Html(render::done_page(&v, &message, "/")).into_response()
        }
        Ok(lmbus_schemas::SyncNowReply::Error { message }) => {
            error(StatusCode::BAD_GATEWAY, Some(&v), &message)
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, Some(&v), &e),
    }
}

/// One admin request and its decoded answer.
async fn ask<Req: serde::Serialize, Rep: serde::de::DeserializeOwned>(
    app: &App,
    subject: String,
    request: &Req,
) -> Result<Rep, String> {
    ask_within(app, subject, request, app.0.cfg.timeout).await
}

/// [`ask`], waiting up to `wait` (past the NATS client's own request timeout).
async fn ask_within<Req: serde::Serialize, Rep: serde::de::DeserializeOwned>(
    app: &App,
    subject: String,
    request: &Req,
    wait: Duration,
) -> Result<Rep, String> {
    let payload = lmbus_schemas::encode(request).map_err(|e| e.to_string())?;
    let asked = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(wait));
    let answer = tokio::time::timeout(wait, app.0.client.send_request(subject.clone(), asked))
        .await
        .map_err(|_| format!("no master answered on {subject} in time"))?
        .map_err(|e| format!("no master answered on {subject}: {e}"))?;
    lmbus_schemas::decode(&answer.payload).map_err(|e| format!("unreadable answer: {e}"))
}

async fn not_found(State(app): State<App>, headers: HeaderMap) -> Response {
    let v = app.viewer(&headers);
    error(StatusCode::NOT_FOUND, v.as_ref(), "no such page")
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/style.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/live.js"),
    )
}

#[cfg(test)]
mod tests;
