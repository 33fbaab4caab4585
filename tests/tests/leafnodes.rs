#![allow(clippy::unwrap_used)]
//! Remote sites through leaf nodes (issue 23 item 3): a 3-node hub cluster configured with
//! `deploy/nats-server.conf` (its leafnodes block included), the broker on the hub, and per
//! site a leaf server configured with `deploy/leafnode-site.conf` whose slave talks to it
//! only. Each leaf link runs through a TCP relay the test can cut, as a WAN link fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmbus_nats::NatsAuth;
use lmbus_slave::{GracePolicy, SlaveAgent, SlaveConfig, SlaveMode};
use lmbus_tests::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const LIMIT: u32 = 12;

/// A TCP relay in front of a hub node's leaf port: the site's leaf server connects to it.
/// `cut` drops every relayed connection and refuses new ones until `restore`.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, conns) = (up.clone(), conns.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the link is down
                    }
                    let relayed = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    conns.lock().unwrap().push(relayed);
                }
            }
        });
        Relay {
            port,
            up,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

fn user(name: &str) -> NatsAuth {
    NatsAuth {
        user: Some(name.into()),
        password: Some(format!("pw-{name}")),
        ..NatsAuth::default()
    }
}

/// One site: its relay, its leaf server, its slave, and its hosts' books (the agents they
/// were told hold a seat, less those they released or were told are logged out).
struct Site {
    id: &'static str,
    relay: Relay,
    _leaf: NatsServer,
    slave: SlaveAgent,
    books: BTreeSet<String>,
}

impl Site {
    async fn start(
        id: &'static str,
        cluster: &str,
        hub_leaf_port: u16,
        during_grace: GracePolicy,
    ) -> Site {
        let relay = Relay::start(hub_leaf_port).await;
        let config = reference_leaf_config(cluster, id, &[format!("127.0.0.1:{}", relay.port)]);
        assert!(
            config.contains(&format!("{id}:pw-{id}@127.0.0.1:{}", relay.port)),
            "{config}"
        );
        let leaf = NatsServer::start_leaf(&config).unwrap();
        let mut cfg = SlaveConfig::new(
            &leaf.url(),
            cluster,
            lmbus_schemas::SlaveId::new(id).unwrap(),
        );
        cfg.nats_auth = user(id);
        cfg.heartbeat_interval = Duration::from_millis(250);
        cfg.request_timeout = Duration::from_secs(1);
        cfg.failover_wait = Duration::from_millis(500);
        cfg.grace_period = Duration::from_secs(60);
        cfg.during_grace = during_grace;
        // The leaf link comes up within a second or two of the leaf server.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let slave = loop {
            match tokio::time::timeout(Duration::from_secs(10), SlaveAgent::start(cfg.clone()))
                .await
            {
                Ok(Ok(slave)) => break slave,
                other => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "slave {id} could not reach a master through its leaf server: {:?}",
                        other.map(|r| r.err())
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        Site {
            id,
            relay,
            _leaf: leaf,
            slave,
            books: BTreeSet::new(),
        }
    }

    /// Registers `agent`; the books follow what the host was told.
    async fn register(&mut self, agent: &str) -> bool {
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            self.slave.register(agent, "inbound"),
        )
        .await
        .unwrap()
        .unwrap();
        if outcome.is_approved() {
            self.books.insert(agent.to_owned());
        } else {
            eprintln!("seen: {} {agent}: {outcome:?}", self.id);
        }
        outcome.is_approved()
    }

    /// Takes the logouts the slave reported into the books.
    fn learn_logouts(&mut self) {
        for out in self.slave.status().logged_out {
            self.books.remove(&out.agent_id);
        }
    }

    async fn wait_mode(&self, mode: SlaveMode, within: Duration) -> Duration {
        let started = tokio::time::Instant::now();
        loop {
            if self.slave.status().mode == mode {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "slave {} did not reach {mode:?} within {within:?}: {:?}",
                self.id,
                self.slave.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Steps: a 3-node hub with the reference config (plus a test admin user for the harness),
/// the broker on it as `broker`; sites site1 and site2, each a leaf server with the
/// reference leaf config and a slave logged in there as its site user. Each site registers
/// 4 agents through its leaf (approved). site1's link is cut: its slave goes into grace
/// while site2 keeps registering (4 more, approved, which fills the 12-seat license);
/// site1, whose grace policy admits locally, admits one more. The link is restored:
/// site1 is connected again, and one second later every site's hosts' books (less the
/// logouts the slaves reported) equal the master's seats for it (the ledger, replayed and
/// audited: no agent with two seats, never over the limit), the leader's counts and the
/// slave's own list; the seat site1 admitted alone was logged out, not granted.
/// Finally a rogue leaf server linked as site1, whose local users may do anything, can
/// neither publish on site2's subjects into the hub nor receive site2's control messages:
/// the hub side of the link applies site1's permissions whatever the site configures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_behind_leaf_nodes_register_ride_out_a_cut_link_and_reconcile() {
    init_tracing();
    let cluster = cluster_name();
    let mut leaf_ports = Vec::new();
    let configs: Vec<String> = (0..3)
        .map(|_| {
            // The test harness logs in as admin to see JetStream ready and read the ledger.
            let text = reference_config(&cluster).replacen(
                "  users = [\n",
                "  users = [\n    { user: admin, password: \"pw-admin\" }\n",
                1,
            );
            let at = text.find("listen: \"127.0.0.1:").unwrap() + "listen: \"127.0.0.1:".len();
            let port: u16 = text[at..].split('"').next().unwrap().parse().unwrap();
            leaf_ports.push(port);
            // The relay must be the only way in. A leaf server learns the leaf address of the
            // hub node it reached (even with `no_advertise`) and reconnects there directly
            // when the link drops, so each node advertises a closed port instead.
            let text = text.replacen(
                &format!("listen: \"127.0.0.1:{port}\""),
                &format!("listen: \"127.0.0.1:{port}\"\n  advertise: \"127.0.0.1:9\""),
                1,
            );
            assert!(text.contains("advertise: \"127.0.0.1:9\""), "{text}");
            text
        })
        .collect();
    let hub = tokio::task::spawn_blocking(move || {
        NatsCluster::start_configured(
            3,
            |i| Some(configs[i].clone()),
            Some(("admin".into(), "pw-admin".into())),
        )
    })
    .await
    .unwrap()
    .unwrap();
    let vendor = Vendor::new().unwrap();
    let license = vendor.master(LIMIT, &[]).unwrap();
    let mut cfg = broker_config_at(hub.url(), &cluster, license, &vendor, true);
    cfg.nats_auth = user("broker");
    cfg.stream_replicas = 3;
    let _broker = Broker::start(cfg).await.unwrap();
    let admin = lmbus_nats::connect(
        &hub.url(),
        async_nats::ConnectOptions::new(),
        &user("admin"),
    )
    .await
    .unwrap();
    let subjects = lmbus_schemas::Subjects::new(&cluster).unwrap();

    // site1 admits locally while no master answers, so its reconnect has something to
    // reconcile; site2 refuses (the default).
    let mut site1 = Site::start("site1", &cluster, leaf_ports[0], GracePolicy::Allow).await;
    let mut site2 = Site::start("site2", &cluster, leaf_ports[1], GracePolicy::Refuse).await;
    for n in 0..4 {
        assert!(site1.register(&format!("s1-a{n}")).await);
        assert!(site2.register(&format!("s2-a{n}")).await);
    }

    site1.relay.cut();
    let cut = tokio::time::Instant::now();
    let to_grace = site1
        .wait_mode(SlaveMode::Grace, Duration::from_secs(10))
        .await;
    eprintln!("measured: site1 in grace {to_grace:?} after its leaf link was cut");
    let mut approved_during_cut = 0;
    for n in 4..8 {
        if site2.register(&format!("s2-a{n}")).await {
            approved_during_cut += 1;
        }
    }
    assert_eq!(
        approved_during_cut, 4,
        "site2 kept registering while site1 was cut off"
    );
    // The license is full now; site1, cut off, admits one more locally.
    assert!(
        site1.register("s1-grace").await,
        "site1 admits locally during its grace period"
    );
    // Past the master's silence limit (3 heartbeats), well short of its reclaim.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(cut.elapsed())).await;
    let status = site1.slave.status();
    assert_eq!(status.mode, SlaveMode::Grace, "{status:?}");

    site1.relay.restore();
    let back = site1
        .wait_mode(SlaveMode::Connected, Duration::from_secs(20))
        .await;
    eprintln!("measured: site1 connected again {back:?} after its link was restored");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let records = lmbus_broker::ledger::Ledger::open(&admin, &subjects, 3)
        .await
        .unwrap()
        .read_all()
        .await
        .unwrap();
    let audit = lmbus_broker::ledger::audit(&records, LIMIT, &BTreeMap::new()).unwrap();
    let status = lmbus_ops::fetch_status(&admin, &subjects, Duration::from_secs(5))
        .await
        .unwrap();
    for site in [&mut site1, &mut site2] {
        site.learn_logouts();
        let ledger: BTreeSet<String> = audit
            .seats
            .get(site.id)
            .map(|held| held.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(
            site.books, ledger,
            "{}'s hosts' books against the ledger",
            site.id
        );
        let counted = status
            .slaves
            .iter()
            .find(|s| s.slave_id == site.id)
            .map_or(0, |s| s.in_use);
        assert_eq!(site.books.len() as u32, counted, "{}: {status:?}", site.id);
        let held: BTreeSet<String> = site
            .slave
            .agents()
            .into_iter()
            .map(|a| a.agent_id)
            .collect();
        assert_eq!(
            site.books, held,
            "{}'s hosts' books against the slave",
            site.id
        );
    }
    assert!(audit.max_in_use <= LIMIT);
    // The seat site1 admitted alone did not fit: logged out at the reconnect, not granted
    // a second time, and the hosts together are back within the license.
    assert!(!site1.books.contains("s1-grace"), "{:?}", site1.books);
    assert_eq!(site1.books.len() + site2.books.len(), LIMIT as usize);

    // A site that wants more seats controls its own leaf server: here one whose local users
    // may do anything, linked as site1. Publishing on site2's subject from it never reaches
    // the hub, and site2's control messages never reach it: the hub side of the link
    // applies site1's permissions.
    let rogue_config = {
        let text =
            reference_leaf_config(&cluster, "site1", &[format!("127.0.0.1:{}", leaf_ports[2])]);
        let at = text.find("authorization {").unwrap();
        text[..at].to_owned()
    };
    let rogue = NatsServer::start_leaf(&rogue_config).unwrap();
    let site2_id = lmbus_schemas::SlaveId::new("site2").unwrap();
    let forged = subjects.slave_op(&site2_id, lmbus_schemas::SlaveOp::Register);
    let mut heard = admin.subscribe(forged.clone()).await.unwrap();
    admin.flush().await.unwrap();
    let forger = async_nats::connect(rogue.url()).await.unwrap();
    let mut overheard = forger.subscribe(subjects.control(&site2_id)).await.unwrap();
    forger.flush().await.unwrap();
    // The link is up once site1's own subjects cross it.
    let mut own = admin
        .subscribe(subjects.slave_op(
            &lmbus_schemas::SlaveId::new("site1").unwrap(),
            lmbus_schemas::SlaveOp::Report,
        ))
        .await
        .unwrap();
    admin.flush().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        forger
            .publish(
                subjects.slave_op(
                    &lmbus_schemas::SlaveId::new("site1").unwrap(),
                    lmbus_schemas::SlaveOp::Report,
                ),
                "probe".into(),
            )
            .await
            .unwrap();
        forger.flush().await.unwrap();
        if tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut own),
        )
        .await
        .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rogue leaf never linked"
        );
    }
    forger.publish(forged, "x".into()).await.unwrap();
    forger.flush().await.unwrap();
    admin
        .publish(subjects.control(&site2_id), "to site2".into())
        .await
        .unwrap();
    admin.flush().await.unwrap();
    let leaked =
        tokio::time::timeout(Duration::from_secs(1), futures::StreamExt::next(&mut heard)).await;
    assert!(
        leaked.is_err(),
        "a site1 leaf published as site2: {leaked:?}"
    );
    let leaked = tokio::time::timeout(
        Duration::from_secs(1),
        futures::StreamExt::next(&mut overheard),
    )
    .await;
    assert!(
        leaked.is_err(),
        "a site1 leaf received site2's control message: {leaked:?}"
    );

    for site in [site1, site2] {
        site.slave.shutdown().await;
    }
}
