//! The web dashboard (`lmbus-monitor web`) over HTTP against a real broker and nats-server:
//! each page, the login, the roles, CSRF, bad input and the exposure rule. The browser test
//! is `browser.rs`.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use lmbus_schemas::AlertKind;
use lmbus_slave::SlaveAgent;
use lmbus_tests::dashboard::{Dashboard, WebClient, csrf_of};
use lmbus_tests::*;

const ACCOUNTS: &[(&str, &str, &str)] = &[("ann", "admin", "pw-ann"), ("vic", "viewer", "pw-vic")];

/// Steps: a broker with 2 seats, slave s1 holding a1 (inbound) and a2 (outbound), the
/// dashboard with an admin (ann) and a viewer (vic).
/// - Not logged in: every page redirects to /login; a wrong password is 401, a login form
///   without its cookie (forged) is 403; both leave no session.
/// - vic logs in: the overview shows the leader, the limit and 2 in use; slaves lists s1,
///   s1's page its agents, seats finds a1 by search, alerts shows the slave's connection,
///   denials counts s1's two refusals (a3: the license is full, capacity; a1 as outbound:
///   a client error), history charts the samples with the peak of 2 and exports them as CSV
///   (not without a login);
///   an unknown page is 404, a bad slave id and a bad alert filter are 400 pages.
/// - vic's release (with a good CSRF token) is refused (403) and changes nothing.
/// - ann's release with a wrong or missing CSRF token is refused (403), a forged form
///   without fields is 400, an oversized body 413, a whole-slave release without the
///   confirmation box 400: a1 still holds its seat after all of them.
/// - ann's release of a1 works: the page says so, the seat is gone from `admin seats`, and
///   the `seats_released` alert names `web:ann`.
/// - Licenses: vic sees the license (total 2) without the reload form, and their reload is
///   refused (403); ann's reload of a text that is no license is refused by the master
///   (409, the page says nothing changed), an empty one is 400; a license of 3 seats is in
///   force at once and its `license_reloaded` alert names `web:ann`.
/// - Upload: the page shows the maintenance end; vic's upload and ann's upload without
///   its CSRF token are 403, a file that is not UTF-8 text is 400, a url-encoded form or a
///   field the form does not have is 400, a license with one character changed is refused
///   by the master (409) and limit 3 stays; a 4-seat license file is in force at once and its
///   alert names `web:ann`.
/// - After logout the session no longer opens pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_roles_csrf_and_bad_input_over_http() {
    let f = Fixture::new().await.unwrap();
    let broker = f.broker(2, &[], true).await.unwrap();
    let s1 = SlaveAgent::start(f.slave_config("s1").unwrap())
        .await
        .unwrap();
    assert!(s1.register("a1", "inbound").await.unwrap().is_approved());
    assert!(s1.register("a2", "outbound").await.unwrap().is_approved());
    // Two refusals for the denials page: the license is full, and a1 is already inbound.
    assert!(!s1.register("a3", "inbound").await.unwrap().is_approved());
    assert!(!s1.register("a1", "outbound").await.unwrap().is_approved());
    let mut alerts = AlertTap::new(&f.client, &f.cluster).await.unwrap();
    let dash = Dashboard::start(&f, ACCOUNTS, Duration::from_millis(300)).await;

    let mut anon = WebClient::new(&dash.url);
    for path in ["/", "/slaves", "/slaves/s1", "/seats", "/alerts"] {
        let answer = anon.get(path).await;
        assert_eq!(answer.status, 303, "{path}");
        assert_eq!(answer.location.as_deref(), Some("/login"), "{path}");
    }
    assert_eq!(anon.get("/events?page=overview").await.status, 401);
    let wrong = anon.log_in("vic", "nope").await;
    assert_eq!(wrong.status, 401);
    assert!(
        wrong.body.contains("wrong user or password"),
        "{}",
        wrong.body
    );
    let page = anon.get("/login").await;
    let token = csrf_of(&page.body).unwrap();
    anon.cookies.clear();
    let forged = anon
        .post(
            "/login",
            &[("csrf", &token), ("user", "vic"), ("password", "pw-vic")],
        )
        .await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(anon.get("/").await.status == 303);

    let mut vic = WebClient::new(&dash.url);
    let login = vic.log_in("vic", "pw-vic").await;
    assert_eq!(login.status, 303, "{}", login.body);
    assert!(vic.cookies.contains_key("lmbus_session"));
    // The first status poll may not have come back yet.
    let mut overview = vic.get("/").await;
    for _ in 0..50 {
        if overview.body.contains("id=\"total-in-use\">2<") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        overview = vic.get("/").await;
    }
    assert_eq!(overview.status, 200);
    for expected in [
        "<strong id=\"leader\">test-broker</strong>",
        "id=\"total-in-use\">2<",
        "data-type=\"inbound\"",
        "vic (viewer)",
        "days left",
    ] {
        assert!(
            overview.body.contains(expected),
            "{expected}: {}",
            overview.body
        );
    }
    let slaves = vic.get("/slaves").await;
    assert!(slaves.body.contains("data-slave=\"s1\""), "{}", slaves.body);
    let one = vic.get("/slaves/s1").await;
    assert!(
        one.body.contains("data-agent=\"a1\"") && one.body.contains("data-agent=\"a2\""),
        "{}",
        one.body
    );
    assert!(
        !one.body.contains("release-all"),
        "a viewer gets no release-all form"
    );
    let found = vic.get("/seats?q=a1").await;
    assert!(found.body.contains("data-agent=\"a1\""), "{}", found.body);
    assert!(!found.body.contains("data-agent=\"a2\""), "{}", found.body);
    assert!(found.body.contains("test-broker"), "{}", found.body);
    let mut tail = vic.get("/alerts?severity=info").await;
    for _ in 0..50 {
        if tail.body.contains("slave_connected") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        tail = vic.get("/alerts?severity=info").await;
    }
    assert!(tail.body.contains("slave_connected"), "{}", tail.body);
    let mut denials = vic.get("/denials").await;
    for _ in 0..50 {
        if denials.body.contains("data-reason=\"agent_type_mismatch\"") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        denials = vic.get("/denials").await;
    }
    for expected in [
        "<tr data-reason=\"aggregate_limit\"><td>aggregate_limit</td><td>capacity (license full)</td><td>1</td>",
        "<tr data-reason=\"agent_type_mismatch\"><td>agent_type_mismatch</td><td>client or configuration</td><td>1</td>",
    ] {
        assert!(
            denials.body.contains(expected),
            "{expected}: {}",
            denials.body
        );
    }
    let history = vic.get("/history").await;
    assert!(
        history.body.contains("id=\"history-chart\"")
            && history
                .body
                .contains("<tr data-series=\"total\"><td><span style=\"color:#20303f\">■</span> total</td><td class=\"peak\">2</td>"),
        "{}",
        history.body
    );
    let csv = vic.get("/history.csv").await;
    assert_eq!(csv.status, 200);
    let mut lines = csv.body.lines();
    assert_eq!(
        lines.next(),
        Some("time,total,\"inbound\",\"outbound\""),
        "{}",
        csv.body
    );
    assert!(
        lines.last().is_some_and(|row| row.ends_with("Z,2,1,1")),
        "{}",
        csv.body
    );
    assert_eq!(anon.get("/history.csv").await.status, 303);
    assert_eq!(vic.get("/nowhere").await.status, 404);
    let bad = vic.get("/slaves/not%20an%20id").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("is not a slave id"), "{}", bad.body);
    let bad = vic.get("/alerts?severity=loud").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("unknown severity"), "{}", bad.body);

    let csrf = csrf_of(&vic.get("/seats").await.body).unwrap();
    let refused = vic
        .post(
            "/release",
            &[("csrf", &csrf), ("slave", "s1"), ("agent", "a1")],
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused
            .body
            .contains("user vic is a viewer and may not release seats"),
        "{}",
        refused.body
    );

    let mut ann = WebClient::new(&dash.url);
    assert_eq!(ann.log_in("ann", "pw-ann").await.status, 303);
    let csrf = csrf_of(&ann.get("/seats").await.body).unwrap();
    let wrong = ann
        .post(
            "/release",
            &[("csrf", &csrf[1..]), ("slave", "s1"), ("agent", "a1")],
        )
        .await;
    assert_eq!(wrong.status, 403);
    assert!(wrong.body.contains("CSRF check failed"), "{}", wrong.body);
    let missing = ann
        .post("/release", &[("slave", "s1"), ("agent", "a1")])
        .await;
    assert_eq!(missing.status, 403);
    let forged = ann.post_raw("/release", "%%%".into()).await;
    assert!(forged.status == 403 || forged.status == 400, "{forged:?}");
    let huge = ann
        .post_raw(
            "/release",
            format!("csrf={csrf}&slave=s1&agent={}", "a".repeat(64 * 1024)),
        )
        .await;
    assert_eq!(huge.status, 413, "{huge:?}");
    let unconfirmed = ann
        .post("/release", &[("csrf", &csrf), ("slave", "s1")])
        .await;
    assert_eq!(unconfirmed.status, 400);
    assert!(
        unconfirmed.body.contains("confirmation box"),
        "{}",
        unconfirmed.body
    );
    let held = lmbus_ops::fetch_seats(
        &f.client,
        &lmbus_schemas::Subjects::new(&f.cluster).unwrap(),
        &lmbus_ops::SeatFilter::default(),
        WAIT,
    )
    .await
    .unwrap();
    assert_eq!(held.seats.len(), 2, "nothing was released: {held:?}");

    let done = ann
        .post(
            "/release",
            &[("csrf", &csrf), ("slave", "s1"), ("agent", "a1")],
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(
        done.body.contains("released 1 seat of slave s1: a1"),
        "{}",
        done.body
    );
    let alert = alerts
        .wait_for("seats_released", |a| a.kind == AlertKind::SeatsReleased)
        .await
        .unwrap();
    assert!(
        alert.message.contains("web:ann released 1 seat"),
        "{alert:?}"
    );
    let seats = ann.get("/seats").await;
    assert!(!seats.body.contains("data-agent=\"a1\""), "{}", seats.body);

    // Licenses: the facts for everyone, the reload form for admins; a viewer's reload and
    // a wrong file are refused and change nothing; a good file is in force at once.
    let page = vic.get("/licenses").await;
    assert!(
        page.body.contains("<dt>Total limit</dt><dd>2</dd>") && !page.body.contains("license-text"),
        "{}",
        page.body
    );
    let vic_csrf = csrf_of(&page.body).unwrap();
    let refused = vic
        .post("/licenses/reload", &[("csrf", &vic_csrf), ("license", "x")])
        .await;
    assert_eq!(refused.status, 403);
    let page = ann.get("/licenses").await;
    assert!(page.body.contains("license-text"), "{}", page.body);
    let wrong = ann
        .post(
            "/licenses/reload",
            &[("csrf", &csrf), ("license", "not a license\n")],
        )
        .await;
    assert_eq!(wrong.status, 409, "{}", wrong.body);
    assert!(
        wrong
            .body
            .contains("the master refused the license, nothing was changed"),
        "{}",
        wrong.body
    );
    let empty = ann
        .post("/licenses/reload", &[("csrf", &csrf), ("license", " ")])
        .await;
    assert_eq!(empty.status, 400);
    let bigger = std::fs::read_to_string(f.vendor.master(3, &[]).unwrap()).unwrap();
    let reloaded = ann
        .post("/licenses/reload", &[("csrf", &csrf), ("license", &bigger)])
        .await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    let alert = alerts
        .wait_for("license_reloaded", |a| a.kind == AlertKind::LicenseReloaded)
        .await
        .unwrap();
    assert!(alert.message.contains("web:ann"), "{alert:?}");
    let mut page = ann.get("/licenses").await;
    for _ in 0..50 {
        if page.body.contains("<dt>Total limit</dt><dd>3</dd>") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        page = ann.get("/licenses").await;
    }
    assert!(
        page.body.contains("<dt>Total limit</dt><dd>3</dd>"),
        "{}",
        page.body
    );

    // Upload: the same reload from a file.
    assert!(
        page.body
            .contains("<dt>Maintenance</dt><dd id=\"license-maintenance\">until 2099-12-31 (")
            && page.body.contains("id=\"license-file\""),
        "{}",
        page.body
    );
    let four_path = f.vendor.master(4, &[]).unwrap();
    let four = std::fs::read(&four_path).unwrap();
    let upload = |csrf: &str| vec![("csrf", csrf.to_owned())];
    let send = |client: &mut WebClient,
                fields: Vec<(&'static str, String)>,
                file: Option<(&'static str, Vec<u8>)>| {
        let mut client = client.clone();
        async move {
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let file = file
                .as_ref()
                .map(|(name, bytes)| ("license", *name, &bytes[..]));
            client.post_upload("/licenses/upload", &pairs, file).await
        }
    };
    let refused = send(
        &mut vic,
        upload(&vic_csrf),
        Some(("master.lic", four.clone())),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let refused = send(&mut ann, vec![], Some(("master.lic", four.clone()))).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.body.contains("CSRF check failed"),
        "{}",
        refused.body
    );
    let binary = send(
        &mut ann,
        upload(&csrf),
        Some(("photo.jpg", vec![0xff, 0xd8, 0xff, 0x00])),
    )
    .await;
    assert_eq!(binary.status, 400, "{}", binary.body);
    assert!(
        binary.body.contains("photo.jpg is not a license file"),
        "{}",
        binary.body
    );
    let stray = send(
        &mut ann,
        vec![("csrf", csrf.clone()), ("role", "master".to_owned())],
        Some(("master.lic", four.clone())),
    )
    .await;
    assert_eq!(stray.status, 400, "{}", stray.body);
    let not_multipart = ann
        .post("/licenses/upload", &[("csrf", &csrf), ("license", "x")])
        .await;
    assert_eq!(not_multipart.status, 400, "{}", not_multipart.body);
    let tampered =
        String::from_utf8(four.clone())
            .unwrap()
            .replacen("Test Customer", "Test Custumer", 1);
    assert_ne!(
        tampered.as_bytes(),
        &four[..],
        "the license names its customer"
    );
    let refused = send(
        &mut ann,
        upload(&csrf),
        Some(("master.lic", tampered.into_bytes())),
    )
    .await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        ann.get("/licenses")
            .await
            .body
            .contains("<dt>Total limit</dt><dd>3</dd>"),
        "a refused upload changed the license"
    );
    let uploaded = send(
        &mut ann,
        upload(&csrf),
        Some(("master-4.lic", four.clone())),
    )
    .await;
    assert_eq!(uploaded.status, 200, "{}", uploaded.body);
    let alert = alerts
        .wait_for("license_reloaded by upload", |a| {
            a.kind == AlertKind::LicenseReloaded && a.message.contains("total limit 3 -> 4")
        })
        .await
        .unwrap();
    assert!(alert.message.contains("web:ann"), "{alert:?}");
    eventually("the uploaded license is in force", || {
        let mut ann = ann.clone();
        async move {
            ann.get("/licenses")
                .await
                .body
                .contains("<dt>Total limit</dt><dd>4</dd>")
        }
    })
    .await
    .unwrap();

    let logout = ann.post("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(logout.status, 303);
    assert_eq!(ann.get("/").await.status, 303);

    dash.stop().await;
    s1.shutdown().await;
    broker.stop().await.unwrap();
}

/// Steps: `lmbus-monitor web --listen 0.0.0.0:0` without TLS or users exits at once with
/// an error naming both and the loopback alternative; with --tls-cert alone it says the
/// two go together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_on_a_public_address_needs_tls_and_a_login() {
    let f = Fixture::new().await.unwrap();
    let web = |extra: &[&str]| {
        let out = Command::new(bin("lmbus-monitor").unwrap())
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster, "web"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let error = web(&["--listen", "0.0.0.0:0"]);
    assert!(
        error.contains("refusing to serve the dashboard on the non-loopback address")
            && error.contains("TLS (--tls-cert and --tls-key)")
            && error.contains("a login (--users FILE)")
            && error.contains("127.0.0.1:"),
        "{error}"
    );
    let error = web(&["--tls-cert", "cert.pem"]);
    assert!(
        error.contains("--tls-cert and --tls-key go together"),
        "{error}"
    );
}

/// Steps: a test CA and a server certificate for 127.0.0.1 (rcgen); `lmbus-monitor web
/// --listen 0.0.0.0:PORT --tls-cert --tls-key --users` (a public address is served with
/// both). A client that trusts the CA gets the login page over TLS, and its cookie is marked
/// Secure; a client that does not trust it fails the handshake; plain HTTP on the port gets
/// no page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_over_tls_serves_https_with_secure_cookies() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls;

    let f = Fixture::new().await.unwrap();
    let _broker = f.broker(2, &[], true).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lmbus dashboard test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path, users) = (
        dir.path().join("web.pem"),
        dir.path().join("web-key.pem"),
        dir.path().join("users.toml"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(
        &users,
        format!(
            "[[user]]\nname = \"ann\"\nrole = \"admin\"\npassword = \"{}\"\n",
            lmbus_monitor::web::hash_password("pw-ann").unwrap()
        ),
    )
    .unwrap();
    let port = free_port();
    let _web = Proc::spawn(
        Command::new(bin("lmbus-monitor").unwrap())
            .args(["--nats", &f.nats.url(), "--cluster", &f.cluster, "web"])
            .args(["--listen", &format!("0.0.0.0:{port}")])
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .arg("--users")
            .arg(&users)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();

    let client = |trusted: bool| {
        let mut roots = rustls::RootCertStore::empty();
        if trusted {
            roots.add(ca.der().clone()).unwrap();
        } else {
            // Another CA: the server's certificate does not chain to it.
            let other_key = KeyPair::generate().unwrap();
            let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
            other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            roots
                .add(other.self_signed(&other_key).unwrap().der().clone())
                .unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    };
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let request = b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";

    // The server may still be starting: retry the connection (bounded).
    let deadline = tokio::time::Instant::now() + WAIT;
    let answer = loop {
        let tried = async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let mut tls = client(true).connect(name.clone(), tcp).await?;
            tls.write_all(request).await?;
            let mut bytes = Vec::new();
            // A close without close_notify is an error after the whole answer: keep it.
            let _ = tls.read_to_end(&mut bytes).await;
            std::io::Result::Ok(String::from_utf8_lossy(&bytes).into_owned())
        };
        match tried.await {
            Ok(answer) if !answer.is_empty() => break answer,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the dashboard did not answer over TLS within {WAIT:?}: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let cookie = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("the login page sets its cookie: {answer}"));
    assert!(cookie.contains("; Secure"), "{cookie}");
    assert!(answer.contains("name=\"password\""), "{answer}");

    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let untrusted = client(false).connect(name.clone(), tcp).await;
    assert!(
        untrusted.is_err(),
        "a client that does not trust the certificate finished the handshake"
    );

    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    plain.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut bytes)).await;
    assert!(
        !String::from_utf8_lossy(&bytes).contains("HTTP/1.1 200"),
        "plain HTTP got a page from the TLS port"
    );
}

/// Steps: a broker whose `license_counts` alert goes out every 200 ms; two seats are held
/// until a count of 2 is logged, then released until a count of 0 is; then 2,100 other
/// alerts fill the alert stream (more than the 2,000 the dashboard's pages keep). A
/// dashboard started afterwards charts the peak of 2, read back from the alert log, and
/// exports it in the CSV. Catches: a history that knows only the alerts the pages keep or
/// what the dashboard saw itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_reaches_back_into_the_alert_log() {
    let f = Fixture::new().await.unwrap();
    let mut settings = f.broker_settings(2, &[], true).unwrap();
    settings.tick_interval = Duration::from_millis(100);
    settings.counts_interval = Duration::from_millis(200);
    let broker = Broker::start(settings).await.unwrap();
    let mut alerts = f.alerts().await.unwrap();
    let s1 = SlaveAgent::start(f.slave_config("s1").unwrap())
        .await
        .unwrap();
    let total = |n: u32| {
        move |a: &lmbus_schemas::Alert| {
            a.kind == AlertKind::LicenseCounts && a.counts.get("total") == Some(&n)
        }
    };
    assert!(s1.register("a1", "inbound").await.unwrap().is_approved());
    assert!(s1.register("a2", "outbound").await.unwrap().is_approved());
    alerts.wait_for("a count of 2", total(2)).await.unwrap();
    s1.unregister("a1").await.unwrap();
    s1.unregister("a2").await.unwrap();
    let zero = alerts.wait_for("a count of 0", total(0)).await.unwrap();
    // It carries the peak since the previous counts alert (which counted at least 1).
    assert!(zero.peaks.get("total").is_some_and(|n| *n >= 1), "{zero:?}");
    let js = async_nats::jetstream::new(f.client.clone());
    let subject = lmbus_schemas::Subjects::new(&f.cluster)
        .unwrap()
        .alert(lmbus_schemas::Severity::Info, AlertKind::SlaveConnected);
    let mut acks = Vec::new();
    for i in 0..2100 {
        let mut filler = lmbus_schemas::Alert::new(
            lmbus_schemas::Severity::Info,
            AlertKind::SlaveConnected,
            format!("filler {i}"),
        );
        filler.time_ms = zero.time_ms + 1;
        let payload = lmbus_schemas::encode(&filler).unwrap();
        acks.push(js.publish(subject.clone(), payload.into()).await.unwrap());
    }
    // A count the master stamped ten days earlier (2 inbound): kept as its hour's peak.
    let mut old = lmbus_schemas::Alert::new(
        lmbus_schemas::Severity::Info,
        AlertKind::LicenseCounts,
        "license counts: 2/2 seats in use".to_owned(),
    )
    .counts(
        [("total", 2), ("inbound", 2), ("outbound", 0)]
            .map(|(t, n)| (t.to_owned(), n))
            .into(),
    );
    old.time_ms = zero.time_ms - 10 * 86_400_000;
    let counts_subject = lmbus_schemas::Subjects::new(&f.cluster)
        .unwrap()
        .alert(lmbus_schemas::Severity::Info, AlertKind::LicenseCounts);
    acks.push(
        js.publish(counts_subject, lmbus_schemas::encode(&old).unwrap().into())
            .await
            .unwrap(),
    );
    for ack in acks {
        ack.await.unwrap();
    }
    let dash = Dashboard::start(&f, &[], Duration::from_millis(300)).await;
    let mut web = WebClient::new(&dash.url);
    // The history is read from the log in a task of its own: wait (bounded) for it.
    let csv = page_until(&mut web, "/history.csv", "a count of 2", |csv| {
        csv.lines().skip(1).any(|row| row.ends_with("Z,2,1,1"))
    })
    .await;
    assert!(
        csv.lines().skip(1).any(|row| row.ends_with("Z/PT1H,2,2,0")),
        "no hourly peak of ten days ago: {csv}"
    );
    let history = web.get("/history").await;
    assert!(
        history.body.contains("<td class=\"peak\">2</td>")
            && history.body.contains("<td>in the hour from ")
            && history.body.contains("<span id=\"hourly\">1</span>"),
        "{}",
        history.body
    );
    // The last day leaves the old hour out; a range it cannot show is a 400 page.
    let day = web.get("/history.csv?days=1").await.body;
    assert!(
        !day.contains("/PT1H") && day.lines().skip(1).any(|row| row.ends_with("Z,2,1,1")),
        "{day}"
    );
    assert!(
        web.get("/history?days=7")
            .await
            .body
            .contains("<b>7 days</b>")
    );
    for bad in ["0", "93", "x", "-1"] {
        let answer = web.get(&format!("/history?days={bad}")).await;
        assert_eq!(answer.status, 400, "days={bad}: {}", answer.body);
        assert_eq!(
            web.get(&format!("/history.csv?days={bad}")).await.status,
            400
        );
        assert_eq!(
            web.get(&format!("/events?page=history&days={bad}"))
                .await
                .status,
            400
        );
    }
    dash.stop().await;
    drop(s1);
    broker.stop().await.unwrap();
}

/// Fetches `path` until its body satisfies `ok` (bounded by [`WAIT`]); the last body on
/// failure.
async fn page_until(
    web: &mut WebClient,
    path: &str,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let body = web.get(path).await.body;
        if ok(&body) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not on {path} within {WAIT:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Steps: a slave daemon with an 8 s grace period (logging its agents out after it) holds
/// one seat at a master with a 5 s reclaim margin; it is paused (SIGSTOP). The overview and its page say it is in its grace
/// period with the time left, then past it (restricted), then reclaimed once the master
/// reclaimed its seat; resumed (SIGCONT), it is connected again and its host holds no
/// agent, as the master's books say. Catches: a dashboard that shows only "disconnected"
/// for a slave admitting agents on its own, or calls a reclaimed slave's seats taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_slave_is_shown_in_its_grace_period_then_restricted() {
    use nix::sys::signal::Signal;
    let f = Fixture::new().await.unwrap();
    let mut settings = f.broker_settings(2, &[], true).unwrap();
    // More than the daemon's longest request (1 s timeout, 1 s election wait).
    settings.reclaim_margin = Duration::from_secs(5);
    let broker = Broker::start(settings).await.unwrap();
    let far = lmbus_tests::daemon::SlaveDaemon::start_with_grace(
        &f.nats.url(),
        &f.cluster,
        "far",
        Duration::from_secs(8),
        &[],
    )
    .await;
    assert_eq!(far.register("x1").await, Some(true));
    let dash = Dashboard::start(&f, &[], Duration::from_millis(300)).await;
    let mut web = WebClient::new(&dash.url);
    page_until(&mut web, "/slaves", "far connected", |b| {
        b.contains("<td>connected</td>")
    })
    .await;
    far.proc.signal(Signal::SIGSTOP).unwrap();
    let overview = page_until(&mut web, "/", "far in grace", |b| {
        b.contains(r#"<a href="/slaves/far">far</a> <b>IN GRACE</b>: 1 seat, silent for"#)
    })
    .await;
    assert!(
        overview.contains(r#"<span id="slaves-in-grace">1</span> in their grace period"#)
            && overview.contains("it admits agents on its own for another"),
        "{overview}"
    );
    let page = web.get("/slaves/far").await.body;
    assert!(
        page.contains(r#"<dd id="silence">silent for"#) && page.contains("<dd>IN GRACE</dd>"),
        "{page}"
    );
    // Past the grace period (8 s after its last word): restricted on its side, then its
    // seat is reclaimed after the master's margin.
    let overview = page_until(&mut web, "/", "far past its grace period", |b| {
        b.contains("<b>RESTRICTED</b>") || b.contains("<b>RECLAIMED</b>")
    })
    .await;
    assert!(overview.contains("past its 8 s grace period"), "{overview}");
    page_until(&mut web, "/", "far reclaimed", |b| {
        b.contains("<b>RECLAIMED</b>: 0 seats") && b.contains("the master reclaimed its seats")
    })
    .await;
    far.proc.signal(Signal::SIGCONT).unwrap();
    page_until(&mut web, "/slaves", "far connected again", |b| {
        b.contains("<td>connected</td>")
    })
    .await;
    // The host's books: the slave logged x1 out, as the master reclaimed it.
    eventually("far's host holds no agent", || async {
        far.agents().await.is_some_and(|a| a.is_empty())
    })
    .await
    .unwrap();
    let status = lmbus_ops::fetch_status(
        &f.client,
        &lmbus_schemas::Subjects::new(&f.cluster).unwrap(),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(status.total_in_use, 0);
    dash.stop().await;
    broker.stop().await.unwrap();
}
