#![allow(clippy::unwrap_used)]
//! Connecting to a NATS deployment that requires credentials and TLS: user and password,
//! token, nkey seed, TLS with client certificates. Refused credentials give an error that
//! says what to check, and no secret is ever printed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lmbus_nats::NatsAuth;
use lmbus_slave::{Outcome, SlaveAgent, SlaveError};
use lmbus_tests::*;

/// A Fixture-like setup on a nats-server started with `config`: a vendor, a cluster name
/// and a master license.
struct Secured {
    nats: NatsServer,
    vendor: Vendor,
    cluster: String,
    license: std::path::PathBuf,
}

impl Secured {
    fn start(config: &str) -> Self {
        init_tracing();
        let vendor = Vendor::new().unwrap();
        let license = vendor.master(10, &[]).unwrap();
        Self {
            nats: NatsServer::start_with_config(config).unwrap(),
            vendor,
            cluster: cluster_name(),
            license,
        }
    }

    fn url(&self, scheme: &str) -> String {
        self.nats.url().replace("nats://", scheme)
    }

    async fn broker(&self, url: String, auth: NatsAuth) -> Broker {
        let mut cfg = broker_config(
            &self.nats,
            &self.cluster,
            self.license.clone(),
            &self.vendor,
            true,
        );
        cfg.nats_url = url;
        cfg.nats_auth = auth;
        Broker::start(cfg).await.unwrap()
    }

    fn slave_config(&self, url: String, id: &str, auth: NatsAuth) -> lmbus_slave::SlaveConfig {
        let mut cfg = lmbus_slave::SlaveConfig::new(
            &url,
            &self.cluster,
            lmbus_schemas::SlaveId::new(id).unwrap(),
        );
        cfg.nats_auth = auth;
        cfg
    }
}

fn user(name: &str, password: &str) -> NatsAuth {
    NatsAuth {
        user: Some(name.into()),
        password: Some(password.into()),
        ..NatsAuth::default()
    }
}

/// Starts a slave that registers one agent (approved) and returns it still running, so the
/// master's status shows it (a slave that stops says goodbye and leaves no row).
async fn registers(cfg: lmbus_slave::SlaveConfig) -> SlaveAgent {
    let slave = tokio::time::timeout(Duration::from_secs(20), SlaveAgent::start(cfg))
        .await
        .unwrap()
        .unwrap();
    let outcome = slave.register("agent-1", "inbound").await.unwrap();
    assert!(matches!(outcome, Outcome::Approved { .. }), "{outcome:?}");
    slave
}

fn connect_error(result: Result<SlaveAgent, SlaveError>) -> String {
    match result {
        Err(e @ SlaveError::Connect { .. }) => e.to_string(),
        Err(other) => panic!("expected a connect error, got {other}"),
        Ok(_) => panic!("connected without the right credentials"),
    }
}

/// Steps: a nats-server with users `broker` and `monitor` (passwords) and one nkey user for
/// the slave; an in-process broker connects as `broker`; a slave with its nkey seed file
/// registers an agent (approved); a slave without credentials and one with another nkey
/// are refused at connect, with an error that says the credentials were refused; the
/// broker binary with a wrong password (from the environment) exits non-zero saying the
/// same, and neither the password nor the seed appears in its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_passwords_and_nkeys() {
    let slave_key = nkeys::KeyPair::new_user();
    let config = format!(
        "authorization {{\n  users = [\n    {{ user: broker, password: \"broker-pass\" }}\n    {{ user: monitor, password: \"monitor-pass\" }}\n    {{ nkey: {} }}\n  ]\n}}\n",
        slave_key.public_key()
    );
    let s = Secured::start(&config);
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("site1.nk");
    std::fs::write(&seed_file, format!("{}\n", slave_key.seed().unwrap())).unwrap();

    let broker = s.broker(s.nats.url(), user("broker", "broker-pass")).await;
    let nkey = NatsAuth {
        nkey_file: Some(seed_file.clone()),
        ..NatsAuth::default()
    };
    let _site1 = registers(s.slave_config(s.nats.url(), "site1", nkey)).await;
    let status = lmbus_nats::connect(
        &s.nats.url(),
        async_nats::ConnectOptions::new(),
        &user("monitor", "monitor-pass"),
    )
    .await
    .unwrap();
    let subjects = lmbus_schemas::Subjects::new(&s.cluster).unwrap();
    let reply = lmbus_ops::fetch_status(&status, &subjects, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply.slaves.len(), 1);

    let anonymous = connect_error(
        SlaveAgent::start(s.slave_config(s.nats.url(), "site1", NatsAuth::default())).await,
    );
    eprintln!("seen: no credentials: {anonymous}");
    assert!(anonymous.contains("refused the credentials"), "{anonymous}");
    let other_seed = dir.path().join("other.nk");
    std::fs::write(&other_seed, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let other = NatsAuth {
        nkey_file: Some(other_seed),
        ..NatsAuth::default()
    };
    let wrong =
        connect_error(SlaveAgent::start(s.slave_config(s.nats.url(), "site1", other)).await);
    assert!(wrong.contains("refused the credentials"), "{wrong}");
    assert!(!wrong.contains(&slave_key.seed().unwrap()), "{wrong}");

    let output = broker_binary(&s, &["--nats-user", "broker"], "wrong-secret-7f3a").await;
    assert!(!output.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("seen: broker binary, wrong password: {}", text.trim());
    assert!(
        text.contains("refused the credentials (user broker)"),
        "{text}"
    );
    assert!(
        !text.contains("wrong-secret-7f3a"),
        "the password was printed: {text}"
    );
    broker.stop().await.unwrap();
}

/// Runs `lmbus-broker run` against `s` with extra flags and `LMBUS_NATS_PASSWORD`, and
/// returns its output (bounded: it must exit by itself).
async fn broker_binary(s: &Secured, flags: &[&str], password: &str) -> std::process::Output {
    let mut cmd = Command::new(bin("lmbus-broker").unwrap());
    cmd.args(["run", "--nats", &s.nats.url(), "--cluster", &s.cluster])
        .arg("--license")
        .arg(&s.license)
        .arg("--vendor-key")
        .arg(s.vendor.public_key_path())
        .args(flags)
        .env("LMBUS_NATS_PASSWORD", password)
        .env("LMBUS_LOG", "debug");
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .expect("the broker did not exit on refused credentials")
    .unwrap()
}

/// Steps: a nats-server that takes a token; a broker and a slave with the token (a slave
/// registers an agent: approved); a slave with another token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token() {
    let s = Secured::start("authorization { token: \"s3cret-token\" }\n");
    let token = |t: &str| NatsAuth {
        token: Some(t.into()),
        ..NatsAuth::default()
    };
    let broker = s.broker(s.nats.url(), token("s3cret-token")).await;
    let _site1 = registers(s.slave_config(s.nats.url(), "site1", token("s3cret-token"))).await;
    let wrong = connect_error(
        SlaveAgent::start(s.slave_config(s.nats.url(), "site1", token("nope"))).await,
    );
    assert!(wrong.contains("refused the credentials (token)"), "{wrong}");
    broker.stop().await.unwrap();
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in
/// `dir`: (ca, server cert, server key, client cert, client key).
fn certificates(dir: &Path) -> [std::path::PathBuf; 5] {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lmbus test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = leaf(vec!["site1".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let files = [
        ("ca.pem", ca.pem()),
        ("server.pem", server),
        ("server-key.pem", server_key),
        ("client.pem", client),
        ("client-key.pem", client_key),
    ];
    files.map(|(name, text)| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    })
}

/// Steps: a nats-server that requires TLS and verifies client certificates against a test
/// CA; a broker and a slave with the CA and a client certificate, on a `tls://` URL: the
/// slave registers an agent (approved); a slave with the CA but no client certificate is
/// refused, with an error that points at the TLS settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, server, server_key, client, client_key] = certificates(dir.path());
    let config = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n",
        server.display(),
        server_key.display(),
        ca.display()
    );
    let s = Secured::start(&config);
    let url = s.url("tls://");
    let tls = NatsAuth {
        tls_ca: Some(ca.clone()),
        tls_cert: Some(client),
        tls_key: Some(client_key),
        ..NatsAuth::default()
    };
    let broker = s.broker(url.clone(), tls.clone()).await;
    let _site1 = registers(s.slave_config(url.clone(), "site1", tls)).await;
    let no_cert = NatsAuth {
        tls_ca: Some(ca),
        ..NatsAuth::default()
    };
    let refused = connect_error(SlaveAgent::start(s.slave_config(url, "site2", no_cert)).await);
    eprintln!("seen: no client certificate: {refused}");
    assert!(refused.contains("TLS failed"), "{refused}");
    assert!(refused.contains("--nats-tls-cert"), "{refused}");
    broker.stop().await.unwrap();
}

/// `deploy/nats-server.conf` for this test's cluster name, with passwords filled in.
/// A raw client as slave `user` (with that slave's inbox prefix, as `lmbus-slave` uses)
/// that records what the server reports (permission violations).
async fn watched_client(
    url: &str,
    user: &str,
    subjects: &lmbus_schemas::Subjects,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let options =
        async_nats::ConnectOptions::new().user_and_password(user.into(), format!("pw-{user}"));
    watched(options, url, user, subjects).await
}

/// `watched_client` with the credentials already in `options`.
async fn watched(
    options: async_nats::ConnectOptions,
    url: &str,
    user: &str,
    subjects: &lmbus_schemas::Subjects,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let options = options
        .custom_inbox_prefix(
            subjects.slave_inbox_prefix(&lmbus_schemas::SlaveId::new(user).unwrap()),
        )
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        });
    (options.connect(url).await.unwrap(), rx)
}

/// The next error the server reported: a permissions violation naming `subject`.
async fn violation(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    what: &str,
    subject: &str,
) -> String {
    let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("NATS reported no permissions violation for {what}"))
        .unwrap();
    assert!(
        seen.contains("Permissions Violation") && seen.contains(subject),
        "{what}: {seen}"
    );
    seen
}

/// Steps: a nats-server with the reference configuration `deploy/nats-server.conf` (its
/// cluster renamed, passwords filled in); a broker as user `broker` (ledger, snapshots,
/// election all work under its JetStream permissions); slave site1 as user `site1`
/// registers an agent (approved); the `monitor` user reads the status. Then, as `site1`:
/// a registration on site2's subject is denied by NATS (reported to the client) and the
/// master never hears of site2; subscribing to site2's replies, to alerts or to another
/// slave's control subject is denied; a JetStream API request on the ledger is denied;
/// publishing an alert is denied; and a slave that connects as `site1` but calls itself
/// site2 cannot get an answer (its hello is denied).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_permissions_confine_each_slave() {
    init_tracing();
    let cluster = cluster_name();
    let nats = NatsServer::start_with_config(&reference_config(&cluster)).unwrap();
    let vendor = Vendor::new().unwrap();
    let s = Secured {
        nats,
        license: vendor.master(10, &[]).unwrap(),
        vendor,
        cluster: cluster.clone(),
    };
    let broker = s.broker(s.nats.url(), user("broker", "pw-broker")).await;
    let _site1 = registers(s.slave_config(s.nats.url(), "site1", user("site1", "pw-site1"))).await;
    let monitor = lmbus_nats::connect(
        &s.nats.url(),
        async_nats::ConnectOptions::new(),
        &user("monitor", "pw-monitor"),
    )
    .await
    .unwrap();
    let subjects = lmbus_schemas::Subjects::new(&cluster).unwrap();
    let status = lmbus_ops::fetch_status(&monitor, &subjects, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status.slaves.len(), 1);
    // The monitor's user may read the alert log the broker's user created.
    let (mut stored, until) = lmbus_monitor::alert_source(
        &monitor,
        &subjects,
        lmbus_monitor::Start::Since(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    assert!(until.is_some());
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        futures::StreamExt::next(&mut stored),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(first.is_ok(), "{first:?}");
    // And the ledger, for `lmbus-monitor audit`.
    let trail = lmbus_monitor::audit(&monitor, &subjects, &Default::default())
        .await
        .unwrap();
    assert!(
        trail
            .records
            .iter()
            .any(|r| r.event == "granted" && r.slave.as_deref() == Some("site1")),
        "{trail:?}"
    );

    let (site1, mut events) = watched_client(&s.nats.url(), "site1", &subjects).await;
    let site2 = lmbus_schemas::SlaveId::new("site2").unwrap();
    let forged = subjects.slave_op(&site2, lmbus_schemas::SlaveOp::Register);
    site1.publish(forged.clone(), "x".into()).await.unwrap();
    site1.flush().await.unwrap();
    eprintln!(
        "seen: site1 publishing as site2: {}",
        violation(&mut events, "publishing on site2's subject", &forged).await
    );
    for (what, subject) in [
        (
            "site2's replies",
            subjects.slave_inbox_prefix(&site2) + ".>",
        ),
        ("alerts", subjects.all_alerts()),
        ("site2's control messages", subjects.control(&site2)),
        ("the ledger", subjects.ledger()),
    ] {
        let _sub = site1.subscribe(subject.clone()).await.unwrap();
        site1.flush().await.unwrap();
        violation(&mut events, what, &subject).await;
    }
    let alert = subjects.alert(
        lmbus_schemas::Severity::Critical,
        lmbus_schemas::AlertKind::BadMessage,
    );
    site1.publish(alert.clone(), "fake".into()).await.unwrap();
    site1.flush().await.unwrap();
    violation(&mut events, "publishing an alert", &alert).await;
    let info = format!("$JS.API.STREAM.INFO.{}", subjects.ledger_stream());
    site1.publish(info.clone(), "".into()).await.unwrap();
    site1.flush().await.unwrap();
    violation(&mut events, "the JetStream API", &info).await;

    let status = lmbus_ops::fetch_status(&monitor, &subjects, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        status
            .slaves
            .iter()
            .map(|s| s.slave_id.as_str())
            .collect::<Vec<_>>(),
        ["site1"],
        "the master heard of a slave that site1 impersonated"
    );
    let mut impostor = s.slave_config(s.nats.url(), "site2", user("site1", "pw-site1"));
    impostor.request_timeout = Duration::from_millis(500);
    impostor.failover_wait = Duration::ZERO;
    let started = tokio::time::timeout(Duration::from_secs(20), SlaveAgent::start(impostor))
        .await
        .unwrap();
    match started {
        Ok(slave) => {
            let outcome = slave.register("agent-9", "inbound").await;
            assert!(
                !matches!(outcome, Ok(Outcome::Approved { .. })),
                "an impostor got a seat: {outcome:?}"
            );
            slave.shutdown().await;
        }
        Err(e) => eprintln!("seen: impostor refused at start: {e}"),
    }
    broker.stop().await.unwrap();
}

/// `deploy/nats-operator.conf` for `operator`'s JWTs (placeholders filled in), and one
/// `.creds` file per block of `deploy/nats-server.conf` (broker, monitor, operator, site1,
/// site2) whose JWT carries that block's permissions, for this test's cluster name.
fn operator_setup(
    cluster: &str,
    operator: &lmbus_tests::jwt::Operator,
    dir: &Path,
) -> (
    String,
    std::collections::BTreeMap<String, std::path::PathBuf>,
) {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let config = std::fs::read_to_string(deploy.join("nats-operator.conf"))
        .unwrap()
        .replace("  store_dir: \"/var/lib/nats/jetstream\"\n", "")
        .replace("LMBUS_OPERATOR_JWT", &operator.jwt)
        .replace("LMBUS_SYSTEM_ACCOUNT_JWT", &operator.system_jwt)
        .replace("LMBUS_SYSTEM_ACCOUNT", &operator.system_account())
        .replace("LMBUS_ACCOUNT_JWT", &operator.account_jwt)
        .replace("LMBUS_ACCOUNT", &operator.account());
    let reference = std::fs::read_to_string(deploy.join("nats-server.conf"))
        .unwrap()
        .replace("acme", cluster);
    let blocks = lmbus_tests::jwt::permission_blocks(&reference).unwrap();
    let names: Vec<&str> = blocks.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["BROKER", "MONITOR", "OPERATOR", "SITE1", "SITE2"]);
    let creds = blocks
        .iter()
        .map(|(name, permissions)| {
            let user = name.to_lowercase();
            let path = operator.user_creds(dir, &user, permissions).unwrap();
            (user, path)
        })
        .collect();
    (config, creds)
}

fn creds(path: &Path) -> NatsAuth {
    NatsAuth {
        creds_file: Some(path.to_path_buf()),
        ..NatsAuth::default()
    }
}

/// Steps: a nats-server in operator mode from `deploy/nats-operator.conf` (an operator, a
/// system account and an LMBUS account with JetStream, as JWTs minted here); one user JWT per
/// role with the permissions of `deploy/nats-server.conf`, as `.creds` files. The broker
/// connects with broker.creds (ledger, snapshots, election and the alert stream work under
/// its JetStream permissions); slave site1 registers with site1.creds (approved); the
/// `lmbus-monitor` binary with `--nats-creds monitor.creds` prints the License Monitor
/// table; as site1, publishing on site2's subject and reading alerts are denied by NATS; a
/// user signed by an account the server does not know is refused at connect with an error
/// that names --nats-creds and does not print the seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mode_with_creds_files() {
    init_tracing();
    let cluster = cluster_name();
    let dir = tempfile::tempdir().unwrap();
    let operator = lmbus_tests::jwt::Operator::new("LMBUS").unwrap();
    let (config, files) = operator_setup(&cluster, &operator, dir.path());
    let nats = NatsServer::start_with_config(&config).unwrap();
    let vendor = Vendor::new().unwrap();
    let s = Secured {
        nats,
        license: vendor.master(10, &[]).unwrap(),
        vendor,
        cluster: cluster.clone(),
    };
    let broker = s.broker(s.nats.url(), creds(&files["broker"])).await;
    let _site1 = registers(s.slave_config(s.nats.url(), "site1", creds(&files["site1"]))).await;

    let table = stdout_of(
        Command::new(bin("lmbus-monitor").unwrap())
            .args(["licenses", "--nats", &s.nats.url(), "--cluster", &cluster])
            .arg("--nats-creds")
            .arg(&files["monitor"]),
    )
    .unwrap();
    eprintln!("seen: lmbus-monitor licenses --nats-creds monitor.creds:\n{table}");
    assert!(table.contains("site1"), "{table}");

    let subjects = lmbus_schemas::Subjects::new(&cluster).unwrap();
    let options = async_nats::ConnectOptions::with_credentials_file(&files["site1"])
        .await
        .unwrap();
    let (site1, mut events) = watched(options, &s.nats.url(), "site1", &subjects).await;
    let site2 = lmbus_schemas::SlaveId::new("site2").unwrap();
    let forged = subjects.slave_op(&site2, lmbus_schemas::SlaveOp::Register);
    site1.publish(forged.clone(), "x".into()).await.unwrap();
    site1.flush().await.unwrap();
    violation(&mut events, "publishing on site2's subject", &forged).await;
    let _alerts = site1.subscribe(subjects.all_alerts()).await.unwrap();
    site1.flush().await.unwrap();
    violation(&mut events, "alerts", &subjects.all_alerts()).await;

    let stranger = lmbus_tests::jwt::write_creds(
        &nkeys::KeyPair::new_account(),
        dir.path(),
        "stranger",
        &lmbus_tests::jwt::Permissions::default(),
    )
    .unwrap();
    let refused = connect_error(
        SlaveAgent::start(s.slave_config(s.nats.url(), "site1", creds(&stranger))).await,
    );
    eprintln!("seen: creds of an unknown account: {refused}");
    assert!(refused.contains("--nats-creds"), "{refused}");
    let seed = std::fs::read_to_string(&stranger).unwrap();
    let seed = seed.lines().find(|l| l.starts_with("SU")).unwrap();
    assert!(!refused.contains(seed), "the seed was printed: {refused}");
    broker.stop().await.unwrap();
}
