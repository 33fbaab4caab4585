//! The web dashboard in a real browser: headless Chromium (Debian's `chromium`) driven over
//! WebDriver (Debian's `chromium-driver`, through fantoccini), against a real broker,
//! nats-server and slave daemon. `cargo xtask test` installs both packages when root and
//! then requires this test (`LMBUS_REQUIRE_BROWSER=1`, also set in CI); elsewhere, without
//! them, it says so and passes without running.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use lmbus_tests::daemon::SlaveDaemon;
use lmbus_tests::dashboard::Dashboard;
use lmbus_tests::*;

/// `name` on PATH (or in `LMBUS_<VAR>`).
fn find(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// The browser and its driver, or `None` (after saying why) when this run may skip.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let found = find("LMBUS_CHROMIUM", "chromium").zip(find("LMBUS_CHROMEDRIVER", "chromedriver"));
    if found.is_none() {
        let required = std::env::var_os("LMBUS_REQUIRE_BROWSER").is_some_and(|v| !v.is_empty())
            || std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !required,
            "chromium and chromedriver are required here (LMBUS_REQUIRE_BROWSER or CI) but not installed: install Debian's chromium and chromium-driver packages (cargo xtask test does, as root)"
        );
        eprintln!(
            "SKIPPED: the browser test needs Debian's chromium and chromium-driver packages (cargo xtask test installs them when run as root)"
        );
    }
    found
}

/// A chromedriver process on a free port, killed on drop.
struct Driver {
    url: String,
    _proc: Proc,
}

async fn start_driver(chromedriver: &Path) -> Driver {
    let port = free_port();
    let proc = Proc::spawn(
        Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    eventually("chromedriver listens", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await
    .unwrap();
    Driver { url, _proc: proc }
}

/// A headless Chromium session with a profile of its own.
async fn session(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&driver.url),
    )
    .await
    .expect("chromium starts within a minute")
    .expect("a WebDriver session")
}

/// Waits (bounded) until `css` matches an element whose text satisfies `ok`; returns the
/// text.
async fn wait_text(
    c: &Client,
    css: &str,
    ok: impl Fn(&str) -> bool,
    what: &str,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Ok(el) = c.find(Locator::Css(css)).await {
            last = el.text().await.unwrap_or_default();
            if ok(&last) {
                return Ok(last);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: `{css}` never matched within {WAIT:?} (last text {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Clicks the element `css` selects, finding it again when the page's live part replaced
/// it between the find and the click (a stale element reference), within [`WAIT`].
async fn click(c: &Client, css: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let tried = async { c.find(Locator::Css(css)).await?.click().await };
        match tried.await {
            Ok(()) => return Ok(()),
            Err(e)
                if tokio::time::Instant::now() < deadline
                    && e.to_string().contains("stale element") =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot click `{css}`")),
        }
    }
}

async fn log_in(c: &Client, base: &str, user: &str, password: &str) -> anyhow::Result<()> {
    c.goto(&format!("{base}/login")).await?;
    c.find(Locator::Id("user")).await?.send_keys(user).await?;
    c.find(Locator::Id("password"))
        .await?
        .send_keys(password)
        .await?;
    c.find(Locator::Id("login")).await?.click().await?;
    wait_text(c, "header .who", |t| t.contains(user), "logged in").await?;
    Ok(())
}

/// The master's status as `lmbus-broker admin status --json` prints it.
fn admin_status(f: &Fixture) -> serde_json::Value {
    let text = stdout_of(Command::new(bin("lmbus-broker").unwrap()).args([
        "admin",
        "status",
        "--json",
        "--nats",
        &f.nats.url(),
        "--cluster",
        &f.cluster,
    ]))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Screenshots of every page, for a failed run.
async fn screenshots(c: &Client, base: &str, dir: &Path) {
    for (name, path) in [
        ("overview", "/"),
        ("slaves", "/slaves"),
        ("slave", "/slaves/site1"),
        ("seats", "/seats"),
        ("alerts", "/alerts"),
    ] {
        if c.goto(&format!("{base}{path}")).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(png) = c.screenshot().await {
                let _ = std::fs::write(dir.join(format!("{name}.png")), png);
            }
        }
    }
}

/// Steps, in headless Chromium:
/// 1. ann (admin) logs in; the overview's in-use counts (total and per type) equal
///    `lmbus-broker admin status --json`'s.
/// 2. On the seats page, slave daemon site1 registers h3: its row appears without a reload
///    (a marker set in the page survives).
/// 3. ann clicks h3's Release: the page confirms, and the slave daemon reports h3 logged
///    out (`released_by_admin`) and no longer holds it.
/// 4. ann logs out; vic (viewer) logs in and clicks h1's Release: refused with a page that
///    says so; site1 still holds h1.
///
/// On failure, a screenshot of each page goes to a kept temp dir named in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let f = Fixture::new().await.unwrap();
    let broker = f
        .broker(10, &[("inbound", 6), ("outbound", 4)], true)
        .await
        .unwrap();
    let site1 = SlaveDaemon::start(&f.nats.url(), &f.cluster, "site1", &[]).await;
    for agent in ["h1", "h2"] {
        assert_eq!(site1.register(agent).await, Some(true), "{agent}");
    }
    let dash = Dashboard::start(
        &f,
        &[("ann", "admin", "pw-ann"), ("vic", "viewer", "pw-vic")],
        Duration::from_millis(300),
    )
    .await;
    let driver = start_driver(&chromedriver).await;
    let dir = tempfile::tempdir().unwrap();
    let c = session(&driver, &chromium, &dir.path().join("profile")).await;
    let base = dash.url.clone();

    let steps = async {
        log_in(&c, &base, "ann", "pw-ann").await?;
        let status = admin_status(&f);
        let total = status["total_in_use"].as_u64().context("total_in_use")?;
        assert_eq!(total, 2, "{status}");
        wait_text(
            &c,
            "#total-in-use",
            |t| t == total.to_string(),
            "total in use",
        )
        .await?;
        let inbound = status["in_use_by_type"]["inbound"].as_u64().unwrap_or(0);
        wait_text(
            &c,
            "tr[data-type=\"inbound\"] .in-use",
            |t| t == inbound.to_string(),
            "inbound in use",
        )
        .await?;
        wait_text(
            &c,
            "tr[data-type=\"outbound\"] .in-use",
            |t| t == "0",
            "outbound in use",
        )
        .await?;
        eprintln!("seen: the overview's counts equal admin status --json ({total} in use)");

        c.goto(&format!("{base}/seats")).await?;
        wait_text(
            &c,
            "tr[data-agent=\"h1\"]",
            |t| t.contains("h1"),
            "h1's row",
        )
        .await?;
        c.execute("window.lmbusMarker = 42; return null;", vec![])
            .await?;
        assert_eq!(site1.register("h3").await, Some(true));
        wait_text(
            &c,
            "tr[data-agent=\"h3\"]",
            |t| t.contains("inbound"),
            "h3 appears live",
        )
        .await?;
        let marker = c
            .execute("return window.lmbusMarker || null;", vec![])
            .await?;
        assert_eq!(marker, serde_json::json!(42), "the page was reloaded");
        eprintln!("seen: h3's seat appeared on the seats page without a reload");

        click(&c, "tr[data-agent=\"h3\"] button.release").await?;
        wait_text(
            &c,
            "#done",
            |t| t.contains("released 1 seat of slave site1: h3"),
            "release confirmed",
        )
        .await?;
        eventually("site1 logs h3 out", || async {
            site1
                .status()
                .await
                .is_some_and(|s| s.logged_out.iter().any(|n| n.agent_id == "h3"))
                && site1
                    .agents()
                    .await
                    .is_some_and(|a| !a.contains(&"h3".to_owned()))
        })
        .await?;
        eprintln!("seen: the slave daemon logged h3 out after the release from the seats page");

        c.goto(&format!("{base}/")).await?;
        click(&c, "header form button").await?;
        wait_text(&c, "#login", |_| true, "back at the login page").await?;
        log_in(&c, &base, "vic", "pw-vic").await?;
        c.goto(&format!("{base}/seats")).await?;
        wait_text(
            &c,
            "tr[data-agent=\"h1\"]",
            |t| t.contains("h1"),
            "h1's row for vic",
        )
        .await?;
        click(&c, "tr[data-agent=\"h1\"] button.release").await?;
        wait_text(
            &c,
            "#error",
            |t| t.contains("user vic is a viewer and may not release seats"),
            "the viewer is refused",
        )
        .await?;
        assert_eq!(
            site1.agents().await,
            Some(vec!["h1".to_owned(), "h2".to_owned()]),
            "the viewer's release changed nothing"
        );
        eprintln!("seen: the viewer's release was refused and site1 still holds h1 and h2");
        anyhow::Ok(())
    };
    let result = tokio::time::timeout(Duration::from_secs(180), steps).await;
    let failure = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("the browser steps took over 3 minutes".to_owned()),
    };
    if let Some(failure) = failure {
        let kept = dir.keep();
        screenshots(&c, &base, &kept).await;
        let _ = c.close().await;
        panic!("{failure}\nscreenshots of each page: {}", kept.display());
    }
    c.close().await.unwrap();
    dash.stop().await;
    drop(site1);
    broker.stop().await.unwrap();
}
