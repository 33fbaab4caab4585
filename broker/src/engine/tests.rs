//! Engine rules, tested without NATS: events in, replies and effects out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lmbus_schemas::{
    AgentClaim, AlertKind, Context, Decision, ErrorCode, Heartbeat, Hello, License, Limits,
    RegisterRequest, RejectReason, Reply, Role, Severity, SlaveEvent, SlaveId, SlaveReport,
    UnregisterRequest, VendorKey, WireError, sign_license,
};
use time::macros::date;
use uuid::Uuid;

use super::*;

const TODAY: Date = date!(2026 - 11 - 23);

fn vendor() -> VendorKey {
    VendorKey::from_bytes(&[42; 32])
}

fn license(role: Role, limits: Limits) -> License {
    License {
        id: Uuid::new_v4(),
        customer: "Acme".into(),
        issued: date!(2026 - 01 - 01),
        expires: date!(2027 - 12 - 31),
        maintenance_expires: date!(2027 - 12 - 31),
        role,
        context: Context::Production,
        limits,
    }
}

fn master_limits() -> Limits {
    Limits {
        total: Some(5),
        local: None,
        agent_types: BTreeMap::from([("inbound".into(), 3), ("outbound".into(), 3)]),
    }
}

fn config(allow_unlicensed: bool) -> EngineConfig {
    EngineConfig {
        broker_id: "b1".into(),
        cluster: "c".into(),
        license: license(Role::Master, master_limits()),
        vendor_key: vendor().verifying_key(),
        allow_unlicensed_slaves: allow_unlicensed,
        missed_heartbeats: 3,
        counts_interval: Duration::from_secs(60),
        expiry_warning_days: 30,
        max_slaves: 100,
        reclaim_margin: Duration::from_secs(10),
        slave_rate_limit: 0,
        max_agents_per_slave: 0,
    }
}

fn slave_license(local: Option<u32>) -> String {
    sign_license(
        &license(
            Role::Slave,
            Limits {
                local,
                ..Limits::default()
            },
        ),
        &vendor(),
    )
    .unwrap()
}

fn id(s: &str) -> SlaveId {
    SlaveId::new(s).unwrap()
}

struct Harness {
    engine: Engine,
    now: Instant,
    instances: BTreeMap<String, Uuid>,
    seq: u64,
}

/// An operator's release, split as the tests read it.
struct Released {
    reply: lmbus_schemas::ReleaseReply,
    effects: Vec<Effect>,
    changes: Vec<SeatChange>,
}

/// The reply to a slave in an output (`None` when there is none); an operator's answer
/// is not expected here.
fn reply_of(out: &Output) -> Option<Reply> {
    match &out.reply {
        Some(Answer::Slave(reply)) => Some(reply.clone()),
        None => None,
        Some(other) => panic!("expected a slave's reply, got {other:?}"),
    }
}

impl Output {
    /// The reply to a slave, by value (see [`reply_of`]).
    fn into_slave_reply(self) -> Option<Reply> {
        reply_of(&self)
    }
}

impl Harness {
    fn new(allow_unlicensed: bool) -> Self {
        Self {
            engine: Engine::new(config(allow_unlicensed)),
            now: Instant::now(),
            instances: BTreeMap::new(),
            seq: 0,
        }
    }

    /// An operator's release request, handled as the runtime hands it to the engine.
    fn admin_release(&mut self, request: &lmbus_schemas::ReleaseRequest) -> Released {
        let out = self.engine.handle(
            self.now,
            Event::Release {
                request: request.clone(),
            },
        );
        let Some(Answer::Release(reply)) = out.reply else {
            panic!("no release reply: {:?}", out.reply)
        };
        Released {
            reply,
            effects: out.effects,
            changes: out.changes,
        }
    }

    /// An operator's license reload, handled as the runtime hands it to the engine: the
    /// reply, and the rest of the output.
    fn reload_license(
        &mut self,
        request: &lmbus_schemas::ReloadRequest,
        today: Date,
    ) -> (lmbus_schemas::ReloadReply, Output) {
        let mut out = self.engine.handle(
            self.now,
            Event::Reload {
                request: request.clone(),
                today,
            },
        );
        let Some(Answer::Reload(reply)) = out.reply.take() else {
            panic!("no reload reply: {:?}", out.reply)
        };
        (reply, out)
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn hello_with(
        &mut self,
        slave: &str,
        license: Option<String>,
        agents: Vec<AgentClaim>,
    ) -> Output {
        let instance = *self
            .instances
            .entry(slave.into())
            .or_insert_with(Uuid::new_v4);
        let seq = self.next_seq();
        self.engine.handle(
            self.now,
            Event::Hello {
                slave: id(slave),
                hello: Hello {
                    instance,
                    license,
                    heartbeat_interval_ms: 1000,
                    agents,
                    software: "test".into(),
                    seq,
                    grace_ms: 60_000,
                    logout_after_grace: true,
                    request_timeout_ms: 2000,
                    ..Default::default()
                },
                today: TODAY,
            },
        )
    }

    fn hello(&mut self, slave: &str, license: Option<String>) -> Reply {
        self.hello_with(slave, license, vec![])
            .into_slave_reply()
            .unwrap()
    }

    fn register(&mut self, slave: &str, agent: &str, agent_type: &str) -> Output {
        let seq = self.next_seq();
        self.register_numbered(slave, agent, agent_type, seq)
    }

    fn register_numbered(
        &mut self,
        slave: &str,
        agent: &str,
        agent_type: &str,
        seq: u64,
    ) -> Output {
        self.engine.handle(
            self.now,
            Event::Register {
                slave: id(slave),
                request: RegisterRequest {
                    request_id: Uuid::new_v4(),
                    seq,
                    agent_id: agent.into(),
                    agent_type: agent_type.into(),
                },
            },
        )
    }

    fn decision(&mut self, slave: &str, agent: &str, agent_type: &str) -> Decision {
        match self.register(slave, agent, agent_type).into_slave_reply() {
            Some(Reply::Decision(d)) => d,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    fn unregister(&mut self, slave: &str, agent: &str) -> Reply {
        self.unregister_out(slave, agent)
            .into_slave_reply()
            .unwrap()
    }

    fn unregister_out(&mut self, slave: &str, agent: &str) -> Output {
        let seq = self.next_seq();
        self.unregister_numbered(slave, agent, seq)
    }

    fn unregister_numbered(&mut self, slave: &str, agent: &str, seq: u64) -> Output {
        self.engine.handle(
            self.now,
            Event::Unregister {
                slave: id(slave),
                request: UnregisterRequest {
                    request_id: Uuid::new_v4(),
                    seq,
                    agent_id: agent.into(),
                },
            },
        )
    }

    fn heartbeat(&mut self, slave: &str) -> Reply {
        let instance = self.instances[slave];
        self.engine
            .handle(
                self.now,
                Event::Heartbeat {
                    slave: id(slave),
                    heartbeat: Heartbeat {
                        instance,
                        seq: 1,
                        agents: 0,
                        master: None,
                        ..Default::default()
                    },
                },
            )
            .into_slave_reply()
            .unwrap()
    }

    fn tick(&mut self) -> Vec<Alert> {
        alerts(&self.engine.handle(self.now, Event::Tick { today: TODAY }))
    }
}

fn alerts(out: &Output) -> Vec<Alert> {
    out.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Alert(a) => Some(a.clone()),
            Effect::Control { .. } => None,
        })
        .collect()
}

fn approved(d: &Decision) -> bool {
    matches!(d, Decision::Approved { .. })
}

fn rejected_for(d: &Decision) -> Option<RejectReason> {
    match d {
        Decision::Rejected { reason, .. } => Some(*reason),
        Decision::Approved { .. } => None,
    }
}

#[test]
fn approves_under_the_limit_and_rejects_at_the_aggregate_limit() {
    let mut h = Harness::new(true);
    assert!(matches!(h.hello("s1", None), Reply::Welcome(_)));
    assert!(matches!(h.hello("s2", None), Reply::Welcome(_)));
    for (slave, agent, t) in [
        ("s1", "a1", "inbound"),
        ("s1", "a2", "inbound"),
        ("s2", "a3", "outbound"),
        ("s2", "a4", "outbound"),
        ("s2", "a5", "inbound"),
    ] {
        assert!(approved(&h.decision(slave, agent, t)), "{agent}");
    }
    let out = h.register("s1", "a6", "outbound");
    let Some(Reply::Decision(d)) = &reply_of(&out) else {
        panic!()
    };
    assert_eq!(rejected_for(d), Some(RejectReason::AggregateLimit));
    let a = alerts(&out);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].kind, AlertKind::RegistrationRejected);
    assert_eq!(a[0].reason, Some(RejectReason::AggregateLimit));
    assert_eq!(a[0].slave.as_deref(), Some("s1"));
    assert_eq!(a[0].agent_type.as_deref(), Some("outbound"));
    assert_eq!(h.engine.total_in_use(), 5);
}

#[test]
fn per_type_limit_and_unknown_type() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    for a in ["a1", "a2", "a3"] {
        assert!(approved(&h.decision("s1", a, "inbound")));
    }
    assert_eq!(
        rejected_for(&h.decision("s1", "a4", "inbound")),
        Some(RejectReason::TypeLimit)
    );
    assert!(approved(&h.decision("s1", "a4", "outbound")));
    assert_eq!(
        rejected_for(&h.decision("s1", "a5", "supervisor")),
        Some(RejectReason::UnknownAgentType)
    );
}

#[test]
fn re_registration_is_idempotent() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    assert_eq!(
        h.decision("s1", "a1", "inbound"),
        Decision::Approved {
            already_held: false
        }
    );
    assert_eq!(
        h.decision("s1", "a1", "inbound"),
        Decision::Approved { already_held: true }
    );
    assert_eq!(h.engine.total_in_use(), 1);
    assert_eq!(
        rejected_for(&h.decision("s1", "a1", "outbound")),
        Some(RejectReason::AgentTypeMismatch)
    );
    assert_eq!(h.engine.total_in_use(), 1);
}

#[test]
fn unregister_frees_the_seat() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    for a in ["a1", "a2", "a3"] {
        assert!(approved(&h.decision("s1", a, "inbound")));
    }
    assert!(!approved(&h.decision("s1", "a4", "inbound")));
    assert_eq!(h.unregister("s1", "a1"), Reply::Ack);
    assert_eq!(
        h.unregister("s1", "a1"),
        Reply::Ack,
        "second release is a no-op"
    );
    assert!(approved(&h.decision("s1", "a4", "inbound")));
    assert_eq!(h.engine.total_in_use(), 3);
}

#[test]
fn slave_license_local_limit_is_enforced_by_the_master_too() {
    let mut h = Harness::new(false);
    assert!(matches!(
        h.hello("s1", Some(slave_license(Some(1)))),
        Reply::Welcome(_)
    ));
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert_eq!(
        rejected_for(&h.decision("s1", "a2", "inbound")),
        Some(RejectReason::LocalLimit)
    );
}

#[test]
fn unlicensed_slaves_need_permission() {
    let mut h = Harness::new(false);
    let out = h.hello_with("u1", None, vec![]);
    assert!(matches!(
        reply_of(&out),
        Some(Reply::Refused {
            reason: RejectReason::UnlicensedNotAllowed,
            ..
        })
    ));
    assert_eq!(alerts(&out)[0].kind, AlertKind::SlaveRefused);
    assert_eq!(
        rejected_for(&h.decision("u1", "a1", "inbound")),
        Some(RejectReason::SlaveNotConnected)
    );
    // A standalone (role none) license is still an unlicensed slave.
    let standalone = sign_license(&license(Role::None, Limits::default()), &vendor()).unwrap();
    assert!(matches!(
        h.hello("u2", Some(standalone.clone())),
        Reply::Refused {
            reason: RejectReason::UnlicensedNotAllowed,
            ..
        }
    ));

    let mut h = Harness::new(true);
    assert!(matches!(h.hello("u1", None), Reply::Welcome(_)));
    assert!(matches!(h.hello("u2", Some(standalone)), Reply::Welcome(_)));
    assert!(approved(&h.decision("u1", "a1", "inbound")));
}

#[test]
fn bad_slave_licenses_are_refused_with_their_reason() {
    let mut h = Harness::new(true);
    let master_as_slave = sign_license(&license(Role::Master, master_limits()), &vendor()).unwrap();
    assert!(matches!(
        h.hello("s1", Some(master_as_slave)),
        Reply::Refused {
            reason: RejectReason::LicenseRole,
            ..
        }
    ));
    let tampered = slave_license(Some(2)).replace("local = 2", "local = 200");
    match h.hello("s2", Some(tampered)) {
        Reply::Refused {
            reason: RejectReason::LicenseInvalid,
            detail,
            ..
        } => assert!(detail.contains("modified"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let mut dev = license(Role::Slave, Limits::default());
    dev.context = Context::Development;
    assert!(matches!(
        h.hello("s3", Some(sign_license(&dev, &vendor()).unwrap())),
        Reply::Refused {
            reason: RejectReason::ContextMismatch,
            ..
        }
    ));
    let mut expired = license(Role::Slave, Limits::default());
    expired.issued = date!(2020 - 01 - 01);
    expired.expires = date!(2021 - 01 - 01);
    assert!(matches!(
        h.hello("s4", Some(sign_license(&expired, &vendor()).unwrap())),
        Reply::Refused {
            reason: RejectReason::LicenseInvalid,
            ..
        }
    ));
}

#[test]
fn silent_slave_is_marked_disconnected_and_keeps_its_seats() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    h.advance(Duration::from_millis(2500));
    assert_eq!(h.heartbeat("s1"), Reply::Ack);
    h.advance(Duration::from_millis(2900));
    assert!(
        !h.tick()
            .iter()
            .any(|a| a.kind == AlertKind::SlaveDisconnected)
    );
    h.advance(Duration::from_millis(200));
    let lost: Vec<_> = h
        .tick()
        .into_iter()
        .filter(|a| a.kind == AlertKind::SlaveDisconnected)
        .collect();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].severity, Severity::Warning);
    assert!(lost[0].message.contains("1 seats are kept"));
    assert_eq!(h.engine.total_in_use(), 1);
    // Only alerted once.
    h.advance(Duration::from_secs(10));
    assert!(
        !h.tick()
            .iter()
            .any(|a| a.kind == AlertKind::SlaveDisconnected)
    );
    // It must say hello again; its seat is still its own.
    assert!(matches!(
        h.heartbeat("s1"),
        Reply::Refused {
            reason: RejectReason::SlaveNotConnected,
            ..
        }
    ));
    assert_eq!(
        rejected_for(&h.decision("s1", "a2", "inbound")),
        Some(RejectReason::SlaveNotConnected)
    );
    let claim = AgentClaim {
        agent_id: "a1".into(),
        agent_type: "inbound".into(),
    };
    let out = h.hello_with("s1", None, vec![claim]);
    assert!(matches!(reply_of(&out), Some(Reply::Welcome(ref w)) if w.rejected_agents.is_empty()));
    assert_eq!(h.engine.total_in_use(), 1);
}

#[test]
fn hello_reconciles_without_double_counting() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    h.hello("s2", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "inbound")));
    // s2 fills the rest.
    for a in ["b1", "b2", "b3"] {
        assert!(approved(&h.decision("s2", a, "outbound")));
    }
    // s1 restarts: it now claims a1 (held), and c1/c2 (new). a2 is gone. Only one of c1,c2
    // fits once a2 is released.
    h.instances.insert("s1".into(), Uuid::new_v4());
    let claims = ["a1", "c1", "c2"]
        .map(|a| AgentClaim {
            agent_id: a.into(),
            agent_type: "inbound".into(),
        })
        .to_vec();
    let out = h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(w)) = reply_of(&out) else {
        panic!()
    };
    assert_eq!(w.rejected_agents.len(), 1);
    assert_eq!(w.rejected_agents[0].agent_id, "c2");
    assert_eq!(w.rejected_agents[0].reason, RejectReason::AggregateLimit);
    assert_eq!(h.engine.total_in_use(), 5);
    let status = h.engine.status(h.now);
    let s1 = status.slaves.iter().find(|s| s.slave_id == "s1").unwrap();
    assert_eq!(s1.in_use, 2);
}

#[test]
fn counts_and_expiry_alerts() {
    let mut h = Harness::new(true);
    let first = h.tick();
    assert!(first.iter().any(|a| a.kind == AlertKind::LicenseCounts));
    h.advance(Duration::from_secs(30));
    assert!(!h.tick().iter().any(|a| a.kind == AlertKind::LicenseCounts));
    h.advance(Duration::from_secs(31));
    assert!(h.tick().iter().any(|a| a.kind == AlertKind::LicenseCounts));

    let mut cfg = config(true);
    cfg.license.expires = date!(2026 - 12 - 10);
    let mut e = Engine::new(cfg);
    let now = Instant::now();
    let out = alerts(&e.handle(now, Event::Tick { today: TODAY }));
    let warn: Vec<_> = out
        .iter()
        .filter(|a| a.kind == AlertKind::LicenseExpiringSoon)
        .collect();
    assert_eq!(warn.len(), 1);
    assert!(
        warn[0].message.contains("17 days left"),
        "{}",
        warn[0].message
    );
    // Once per day.
    let again = alerts(&e.handle(now, Event::Tick { today: TODAY }));
    assert!(
        !again
            .iter()
            .any(|a| a.kind == AlertKind::LicenseExpiringSoon)
    );
}

#[test]
fn bad_input_gets_an_error_reply_and_an_alert() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let out = h.engine.handle(
        h.now,
        Event::BadMessage {
            subject: "lmbus.v1.c.slave.s1.register".into(),
            slave: Some(id("s1")),
            error: WireError {
                code: ErrorCode::Malformed,
                message: "garbage".into(),
            },
        },
    );
    assert!(matches!(reply_of(&out), Some(Reply::Error(_))));
    assert_eq!(alerts(&out)[0].kind, AlertKind::BadMessage);

    for (agent, t) in [("", "inbound"), ("a", "in bound"), ("a\u{0}", "inbound")] {
        let out = h.register("s1", agent, t);
        assert!(
            matches!(
                reply_of(&out),
                Some(Reply::Error(WireError {
                    code: ErrorCode::Invalid,
                    ..
                }))
            ),
            "{agent:?} {t:?}"
        );
        assert_eq!(alerts(&out)[0].kind, AlertKind::BadMessage);
    }
    assert_eq!(h.engine.total_in_use(), 0);
}

#[test]
fn local_rejection_reports_become_alerts() {
    let mut h = Harness::new(true);
    let out = h.engine.handle(
        h.now,
        Event::Report {
            slave: id("s9"),
            report: SlaveReport {
                event: SlaveEvent::LocalRejection {
                    agent_id: "a".into(),
                    agent_type: "inbound".into(),
                    reason: RejectReason::LocalLimit,
                },
                message: "local limit 2 reached".into(),
            },
        },
    );
    let a = alerts(&out);
    assert_eq!(a[0].kind, AlertKind::RegistrationRejected);
    assert_eq!(a[0].reason, Some(RejectReason::LocalLimit));
    assert_eq!(a[0].source, "slave:s9");
}

/// Steps: drive the engine with a long pseudo-random mix of hellos, registrations,
/// unregistrations, heartbeats and ticks over 4 slaves; after every event, check that the
/// counters equal the per-slave sums and stay within every limit.
#[test]
fn random_events_never_break_the_limits() {
    let mut h = Harness::new(true);
    let slaves = ["s1", "s2", "s3", "s4"];
    let types = ["inbound", "outbound", "supervisor"];
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    h.hello("s4", Some(slave_license(Some(2))));
    for _ in 0..5000 {
        let slave = slaves[next(4) as usize];
        let agent = format!("a{}", next(12));
        match next(10) {
            0 => {
                let claims = (0..next(4))
                    .map(|i| AgentClaim {
                        agent_id: format!("a{i}"),
                        agent_type: types[next(3) as usize].into(),
                    })
                    .collect();
                if next(2) == 0 {
                    h.instances.insert(slave.into(), Uuid::new_v4());
                }
                h.hello_with(slave, None, claims);
            }
            1..=5 => {
                h.register(slave, &agent, types[next(3) as usize]);
            }
            6 | 7 => {
                h.unregister(slave, &agent);
            }
            8 => {
                if h.instances.contains_key(slave) {
                    h.heartbeat(slave);
                }
            }
            _ => {
                h.advance(Duration::from_millis(next(2000)));
                h.tick();
            }
        }
        let status = h.engine.status(h.now);
        let sum: u32 = status.slaves.iter().map(|s| s.in_use).sum();
        assert_eq!(sum, status.total_in_use);
        assert!(status.total_in_use <= status.total_limit);
        for (t, limit) in &status.type_limits {
            let used: u32 = status
                .slaves
                .iter()
                .map(|s| s.in_use_by_type.get(t).copied().unwrap_or(0))
                .sum();
            assert_eq!(used, status.in_use_by_type.get(t).copied().unwrap_or(0));
            assert!(used <= *limit);
        }
        for s in &status.slaves {
            if let Some(local) = s.local_limit {
                assert!(s.in_use <= local);
            }
        }
    }
}

/// Steps: with a limit of 10 registrations per second per slave, s1 sends 20 at once
/// (the burst) and the 21st is rejected `rate_limited` with one alert; more rejections
/// within 10 s raise no alert; s2 is not affected; 100 ms later s1 may register one
/// more; after 10 s the next rejection's alert counts those not reported yet.
#[test]
fn a_flooding_slave_is_rate_limited_with_few_alerts() {
    let mut h = Harness::new(true);
    h.engine.cfg.slave_rate_limit = 10;
    h.hello("s1", None);
    h.hello("s2", None);
    for _ in 0..20 {
        assert!(approved(&h.decision("s1", "a1", "inbound")));
    }
    let out = h.register("s1", "a1", "inbound");
    assert!(matches!(
        reply_of(&out),
        Some(Reply::Decision(Decision::Rejected {
            reason: RejectReason::RateLimited,
            ..
        }))
    ));
    assert_eq!(alerts(&out).len(), 1);
    assert!(out.changes.is_empty());
    for _ in 0..5 {
        let out = h.register("s1", "a1", "inbound");
        assert_eq!(
            rejected_for(&decision_of(&out)),
            Some(RejectReason::RateLimited)
        );
        assert!(alerts(&out).is_empty());
    }
    assert!(approved(&h.decision("s2", "b1", "inbound")));
    h.advance(Duration::from_millis(100));
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert_eq!(
        rejected_for(&h.decision("s1", "a1", "inbound")),
        Some(RejectReason::RateLimited)
    );
    // 6 rejections since the alert; 10 s later the bucket is full again (20), and the
    // next rejection's alert reports those 6 and itself.
    h.advance(RATE_LIMIT_ALERT_EVERY);
    for _ in 0..20 {
        assert!(approved(&h.decision("s1", "a1", "inbound")));
    }
    let out = h.register("s1", "a1", "inbound");
    let a = alerts(&out);
    assert_eq!(a.len(), 1);
    assert!(
        a[0].message.contains("7 registrations rejected"),
        "{}",
        a[0].message
    );
}

fn decision_of(out: &Output) -> Decision {
    match &reply_of(out) {
        Some(Reply::Decision(d)) => d.clone(),
        other => panic!("expected a decision, got {other:?}"),
    }
}

/// Steps: s1 connects with a slave license; s2 presents the same license while s1 is
/// connected: refused `license_in_use` with an alert naming s1; s1 saying hello again
/// with it is fine; once s1 has gone silent (marked disconnected), s2 may use it, and then
/// s1 is the one refused.
#[test]
fn a_slave_license_serves_one_live_slave() {
    let mut h = Harness::new(false);
    let shared = slave_license(Some(5));
    assert!(matches!(
        h.hello("s1", Some(shared.clone())),
        Reply::Welcome(_)
    ));
    let out = h.hello_with("s2", Some(shared.clone()), vec![]);
    match reply_of(&out) {
        Some(Reply::Refused {
            reason: RejectReason::LicenseInUse,
            ref detail,
            ..
        }) => assert!(detail.contains("s1"), "{detail}"),
        ref other => panic!("{other:?}"),
    }
    let a = alerts(&out);
    assert!(
        a.iter().any(|a| a.kind == AlertKind::SlaveRefused
            && a.reason == Some(RejectReason::LicenseInUse)
            && a.slave.as_deref() == Some("s2")),
        "{a:?}"
    );
    assert!(matches!(
        h.hello("s1", Some(shared.clone())),
        Reply::Welcome(_)
    ));
    h.advance(Duration::from_secs(30));
    h.tick();
    assert!(!h.engine.status(h.now).slaves[0].connected);
    assert!(matches!(
        h.hello("s2", Some(shared.clone())),
        Reply::Welcome(_)
    ));
    assert!(matches!(
        h.hello("s1", Some(shared)),
        Reply::Refused {
            reason: RejectReason::LicenseInUse,
            ..
        }
    ));
}

/// Steps: a slave that logs out at the end of its 60 s grace holds two seats and goes
/// silent; at grace + margin the master still counts them, just after it reclaims them
/// (alert, counts drop); when the slave says hello again claiming them, they are granted
/// again if there is room, and refused with `reclaimed` when another slave took the room.
#[test]
fn silent_slave_seats_are_reclaimed_after_grace_plus_margin() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    h.hello("s2", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "inbound")));
    h.advance(Duration::from_secs(70)); // grace 60 s + margin 10 s
    assert!(!h.tick().iter().any(|a| a.kind == AlertKind::SeatsReclaimed));
    assert_eq!(h.engine.total_in_use(), 2);
    h.advance(Duration::from_millis(1));
    let reclaimed: Vec<_> = h
        .tick()
        .into_iter()
        .filter(|a| a.kind == AlertKind::SeatsReclaimed)
        .collect();
    assert_eq!(reclaimed.len(), 1);
    assert!(
        reclaimed[0]
            .message
            .contains("reclaimed 2 seats of slave s1")
    );
    assert_eq!(h.engine.total_in_use(), 0);
    // s2 takes all 3 inbound seats meanwhile (its own hello keeps it alive).
    h.hello("s2", None);
    for a in ["b1", "b2"] {
        assert!(approved(&h.decision("s2", a, "inbound")));
    }
    let claims = ["a1", "a2"]
        .map(|a| AgentClaim {
            agent_id: a.into(),
            agent_type: "inbound".into(),
        })
        .to_vec();
    let out = h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(w)) = reply_of(&out) else {
        panic!()
    };
    assert_eq!(w.rejected_agents.len(), 1);
    assert_eq!(w.rejected_agents[0].reason, RejectReason::Reclaimed);
    assert_eq!(h.engine.total_in_use(), 3);
}

/// Steps: a slave that does not log out after its grace keeps its seats however long it
/// is silent: reclaiming them could hand out a seat it still uses.
#[test]
fn seats_of_a_slave_that_keeps_its_agents_are_never_reclaimed() {
    let mut h = Harness::new(true);
    let instance = Uuid::new_v4();
    h.engine.handle(
        h.now,
        Event::Hello {
            slave: id("s1"),
            hello: Hello {
                instance,
                license: None,
                heartbeat_interval_ms: 1000,
                agents: vec![],
                software: String::new(),
                seq: 1,
                grace_ms: 1000,
                logout_after_grace: false,
                request_timeout_ms: 2000,
                ..Default::default()
            },
            today: TODAY,
        },
    );
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    h.advance(Duration::from_secs(3600));
    assert!(!h.tick().iter().any(|a| a.kind == AlertKind::SeatsReclaimed));
    assert_eq!(h.engine.total_in_use(), 1);
}

/// Steps: a hello whose timings break the rule (margin not above request timeout + 1% of
/// grace) is refused with `timing_rule`; a stale hello (lower seq, same instance) and a
/// replayed one (the same seq) are refused with `replayed`; the next number is welcome.
#[test]
fn timing_rule_and_stale_hellos() {
    let mut h = Harness::new(true);
    let hello = |seq, grace_ms, timeout_ms| Hello {
        instance: Uuid::from_u128(7),
        license: None,
        heartbeat_interval_ms: 1000,
        agents: vec![],
        software: String::new(),
        seq,
        grace_ms,
        logout_after_grace: true,
        request_timeout_ms: timeout_ms,
        ..Default::default()
    };
    let send = |h: &mut Harness, hello: Hello| {
        h.engine
            .handle(
                h.now,
                Event::Hello {
                    slave: id("s1"),
                    hello,
                    today: TODAY,
                },
            )
            .into_slave_reply()
            .unwrap()
    };
    // margin 10 s; timeout 9 s + 1% of 120 s = 10.2 s: broken.
    assert!(matches!(
        send(&mut h, hello(1, 120_000, 9_000)),
        Reply::Refused {
            reason: RejectReason::TimingRule,
            ..
        }
    ));
    assert!(matches!(
        send(&mut h, hello(5, 120_000, 2_000)),
        Reply::Welcome(_)
    ));
    // An older hello, and the same hello again (a verbatim replay), are both refused.
    for seq in [4, 5] {
        assert!(matches!(
            send(&mut h, hello(seq, 120_000, 2_000)),
            Reply::Refused {
                reason: RejectReason::Replayed,
                ..
            }
        ));
    }
    assert!(matches!(
        send(&mut h, hello(6, 120_000, 2_000)),
        Reply::Welcome(_)
    ));
}

/// Steps: an operator releases one agent, then all of a slave's seats; the seats are free
/// at once, the slave is sent a logout naming the agents, an alert goes out, and a slave
/// that missed the logout cannot take the agents back at its next hello.
#[test]
fn admin_release_logs_out_and_revokes() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    for a in ["a1", "a2", "a3"] {
        assert!(approved(&h.decision("s1", a, "inbound")));
    }
    let Released { reply, effects, .. } = h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "s1".into(),
        agent_id: Some("a1".into()),
        operator: "alice".into(),
    });
    assert_eq!(
        reply,
        lmbus_schemas::ReleaseReply::Released {
            agents: vec!["a1".into()]
        }
    );
    assert!(effects.iter().any(|e| matches!(e,
        Effect::Control { message: ControlMessage::LogOut { agents }, .. }
            if agents.len() == 1 && agents[0].reason == RejectReason::ReleasedByAdmin)));
    assert!(effects.iter().any(|e| matches!(e,
        Effect::Alert(a) if a.kind == AlertKind::SeatsReleased && a.message.contains("alice"))));
    assert_eq!(h.engine.total_in_use(), 2);

    let Released { reply, .. } = h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "s1".into(),
        agent_id: None,
        operator: String::new(),
    });
    assert!(
        matches!(reply, lmbus_schemas::ReleaseReply::Released { ref agents } if agents.len() == 2)
    );
    assert_eq!(h.engine.total_in_use(), 0);

    // The slave missed the logouts and claims all three again.
    let claims = ["a1", "a2", "a3"]
        .map(|a| AgentClaim {
            agent_id: a.into(),
            agent_type: "inbound".into(),
        })
        .to_vec();
    let out = h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(w)) = reply_of(&out) else {
        panic!()
    };
    assert_eq!(w.rejected_agents.len(), 3);
    assert!(
        w.rejected_agents
            .iter()
            .all(|r| r.reason == RejectReason::ReleasedByAdmin)
    );
    assert_eq!(h.engine.total_in_use(), 0);
    // Registering anew is a visible, normal registration.
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    // a4 is released, then registered anew before the slave's next hello: that seat is
    // rightly held, and the hello keeps it.
    assert!(approved(&h.decision("s1", "a4", "outbound")));
    h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "s1".into(),
        agent_id: Some("a4".into()),
        operator: "alice".into(),
    });
    assert!(approved(&h.decision("s1", "a4", "outbound")));
    let claims = [("a1", "inbound"), ("a4", "outbound")]
        .map(|(a, t)| AgentClaim {
            agent_id: a.into(),
            agent_type: t.into(),
        })
        .to_vec();
    let out = h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(w)) = reply_of(&out) else {
        panic!()
    };
    assert!(w.rejected_agents.is_empty(), "{:?}", w.rejected_agents);
    assert_eq!(h.engine.total_in_use(), 2);

    let Released { reply, effects, .. } = h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "nobody".into(),
        agent_id: None,
        operator: String::new(),
    });
    assert!(matches!(reply, lmbus_schemas::ReleaseReply::Error { .. }));
    assert!(effects.is_empty());
}

/// A standby that applies the leader's ledger records in order holds the same seats as
/// the leader, at every step of a random run that includes reclaims and admin releases.
#[test]
fn replaying_the_records_or_a_snapshot_reproduces_the_seat_state() {
    let mut h = Harness::new(true);
    let mut standby = Engine::new(config(true));
    let mut restored = Engine::new(config(true));
    // Snapshotted (reclaimed slaves, revoked agents): both must occur for the test to mean
    // anything.
    let mut kinds = (0, 0);
    let slaves = ["s1", "s2", "s3", "s4"];
    let types = ["inbound", "outbound", "supervisor"];
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut records = 0;
    for step in 0..4000 {
        let slave = slaves[next(4) as usize];
        let agent = format!("a{}", next(10));
        let out = match next(12) {
            0 => {
                let claims = (0..next(5))
                    .map(|i| AgentClaim {
                        agent_id: format!("a{i}"),
                        agent_type: types[next(3) as usize].into(),
                    })
                    .collect();
                if next(3) == 0 {
                    h.instances.insert(slave.into(), Uuid::new_v4());
                }
                let license = (slave == "s4").then(|| slave_license(Some(2)));
                h.hello_with(slave, license, claims)
            }
            1..=5 => h.register(slave, &agent, types[next(3) as usize]),
            6 | 7 => h.unregister_out(slave, &agent),
            8 => {
                let request = lmbus_schemas::ReleaseRequest {
                    slave_id: slave.into(),
                    agent_id: (next(2) == 0).then(|| agent.clone()),
                    operator: "op".into(),
                };
                let released = h.admin_release(&request);
                Output {
                    changes: released.changes,
                    ..Output::default()
                }
            }
            _ => {
                h.advance(Duration::from_millis(next(40_000)));
                h.engine.handle(h.now, Event::Tick { today: TODAY })
            }
        };
        for change in &out.changes {
            standby.apply(h.now, change).unwrap();
            restored.apply(h.now, change).unwrap();
            records += 1;
        }
        if step % 50 == 0 {
            assert_eq!(standby.seats(), h.engine.seats(), "diverged at step {step}");
        }
        // A replica that starts from a snapshot (split into small `Seats` changes) and
        // applies the records after it.
        if step % 300 == 0 {
            restored = Engine::new(config(true));
            for change in standby.snapshot(2) {
                match &change {
                    SeatChange::Reclaim { .. } => kinds.0 += 1,
                    SeatChange::Revoke { .. } => kinds.1 += 1,
                    SeatChange::Seats { agent_ids, .. } => assert!(agent_ids.len() <= 2),
                    _ => {}
                }
                restored.apply(h.now, &change).unwrap();
            }
            assert_eq!(
                durable(&restored),
                durable(&standby),
                "snapshot at step {step}"
            );
        }
    }
    assert!(records > 1000, "the run made only {records} records");
    assert!(
        kinds.0 > 0 && kinds.1 > 0,
        "snapshots held (reclaims, revokes) {kinds:?}"
    );
    assert_eq!(standby.seats(), h.engine.seats());
    assert_eq!(standby.total_in_use(), h.engine.total_in_use());
    assert_eq!(durable(&restored), durable(&standby));
    assert_eq!(restored.total_in_use(), standby.total_in_use());
    assert_eq!(restored.in_use_by_type, standby.in_use_by_type);
}

/// What the ledger decides about each slave (not its connection or silence clock).
fn durable(engine: &Engine) -> Vec<String> {
    engine
        .slaves
        .iter()
        .map(|(id, s)| {
            let mut agents: Vec<_> = s.agents.iter().collect();
            agents.sort();
            let mut revoked: Vec<_> = s.revoked.iter().collect();
            revoked.sort();
            format!(
                "{id} {} {:?} {:?} {:?} {} {} {} {agents:?} {revoked:?}",
                s.instance,
                s.license.as_ref().map(|l| (l.id, l.local_limit)),
                s.heartbeat_interval,
                s.grace,
                s.logout_after_grace,
                s.hello_seq,
                s.reclaimed
            )
        })
        .collect()
}

/// Property tests: any sequence of slave events keeps every limit, and a standby that
/// applies the resulting ledger changes holds the same seats.
mod properties {
    use super::*;
    use proptest::prelude::*;

    const TYPES: [&str; 4] = ["inbound", "outbound", "supervisor", "not-in-license"];

    #[derive(Debug, Clone)]
    enum Op {
        /// A hello claiming (agent, type) pairs, from a new process or the same one.
        Hello {
            slave: usize,
            claims: Vec<(usize, usize)>,
            restarted: bool,
        },
        Register {
            slave: usize,
            agent: usize,
            kind: usize,
        },
        Unregister {
            slave: usize,
            agent: usize,
        },
        Heartbeat {
            slave: usize,
        },
        /// Time passes (up to 70 s: past the 60 s grace plus margin) and the master ticks.
        Wait {
            ms: u64,
        },
        Release {
            slave: usize,
            agent: Option<usize>,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (0..4usize, prop::collection::vec((0..8usize, 0..4usize), 0..5), any::<bool>())
                .prop_map(|(slave, claims, restarted)| Op::Hello { slave, claims, restarted }),
            6 => (0..4usize, 0..8usize, 0..4usize)
                .prop_map(|(slave, agent, kind)| Op::Register { slave, agent, kind }),
            3 => (0..4usize, 0..8usize).prop_map(|(slave, agent)| Op::Unregister { slave, agent }),
            1 => (0..4usize).prop_map(|slave| Op::Heartbeat { slave }),
            2 => (0..70_000u64).prop_map(|ms| Op::Wait { ms }),
            1 => (0..4usize, prop::option::of(0..8usize))
                .prop_map(|(slave, agent)| Op::Release { slave, agent }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Slave s3 holds a slave license with a local limit of 2; the others are
        /// unlicensed. The master allows 5 seats, 3 inbound and 3 outbound.
        #[test]
        fn no_sequence_of_events_breaks_a_limit_or_the_replay(
            ops in prop::collection::vec(op(), 1..150)
        ) {
            let mut h = Harness::new(true);
            let mut standby = Engine::new(config(true));
            let licensed = slave_license(Some(2));
            for op in ops {
                let out = match op {
                    Op::Hello { slave, claims, restarted } => {
                        let name = format!("s{slave}");
                        if restarted {
                            h.instances.insert(name.clone(), Uuid::new_v4());
                        }
                        let claims = claims
                            .into_iter()
                            .map(|(a, t)| AgentClaim {
                                agent_id: format!("a{a}"),
                                agent_type: TYPES[t].into(),
                            })
                            .collect();
                        let license = (slave == 3).then(|| licensed.clone());
                        h.hello_with(&name, license, claims)
                    }
                    Op::Register { slave, agent, kind } => {
                        h.register(&format!("s{slave}"), &format!("a{agent}"), TYPES[kind])
                    }
                    Op::Unregister { slave, agent } => {
                        h.unregister_out(&format!("s{slave}"), &format!("a{agent}"))
                    }
                    Op::Heartbeat { slave } => {
                        let name = format!("s{slave}");
                        if h.instances.contains_key(&name) {
                            h.heartbeat(&name);
                        }
                        Output::default()
                    }
                    Op::Wait { ms } => {
                        h.advance(Duration::from_millis(ms));
                        h.engine.handle(h.now, Event::Tick { today: TODAY })
                    }
                    Op::Release { slave, agent } => {
                        let released = h.admin_release(&lmbus_schemas::ReleaseRequest {
                            slave_id: format!("s{slave}"),
                            agent_id: agent.map(|a| format!("a{a}")),
                            operator: "op".into(),
                        });
                        Output {
                            changes: released.changes,
                            ..Output::default()
                        }
                    }
                };
                for change in &out.changes {
                    prop_assert!(standby.apply(h.now, change).is_ok());
                }
                let status = h.engine.status(h.now);
                let sum: u32 = status.slaves.iter().map(|s| s.in_use).sum();
                prop_assert_eq!(sum, status.total_in_use);
                prop_assert!(status.total_in_use <= status.total_limit);
                for (t, limit) in &status.type_limits {
                    let used: u32 = status
                        .slaves
                        .iter()
                        .map(|s| s.in_use_by_type.get(t).copied().unwrap_or(0))
                        .sum();
                    prop_assert_eq!(used, status.in_use_by_type.get(t).copied().unwrap_or(0));
                    prop_assert!(used <= *limit);
                }
                prop_assert!(!status.in_use_by_type.contains_key("not-in-license"));
                for s in &status.slaves {
                    if let Some(local) = s.local_limit {
                        prop_assert!(s.in_use <= local);
                    }
                }
                prop_assert_eq!(standby.seats(), h.engine.seats());
            }
        }
    }
}

/// A captured registration replayed after its agent was released takes no seat (refused
/// `replayed`, with an alert), while a retry of a granted request gets the same answer;
/// a replayed unregister does not release a seat taken again since.
#[test]
fn a_replayed_request_cannot_retake_or_release_a_seat() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let out = h.register_numbered("s1", "a1", "inbound", 100);
    assert!(approved(&decision_of(&out)));
    // The same request again (a retry after a lost reply): same seat, nothing new.
    let again = h.register_numbered("s1", "a1", "inbound", 100);
    assert_eq!(
        decision_of(&again),
        Decision::Approved { already_held: true }
    );
    assert!(again.changes.is_empty());
    h.unregister_numbered("s1", "a1", 101);
    assert_eq!(h.engine.total_in_use(), 0);
    let replay = h.register_numbered("s1", "a1", "inbound", 100);
    assert_eq!(
        rejected_for(&decision_of(&replay)),
        Some(RejectReason::Replayed)
    );
    assert_eq!(alerts(&replay).len(), 1);
    assert!(replay.changes.is_empty());
    assert_eq!(h.engine.total_in_use(), 0);
    // Taken again under a new number; the old unregister replayed keeps it.
    assert!(approved(&decision_of(
        &h.register_numbered("s1", "a1", "inbound", 102)
    )));
    let replay = h.unregister_numbered("s1", "a1", 101);
    assert_eq!(reply_of(&replay), Some(Reply::Ack));
    // Within 10 s of the last replay alert for this slave: counted, not alerted again.
    assert_eq!(alerts(&replay).len(), 0);
    assert!(replay.changes.is_empty());
    assert_eq!(h.engine.total_in_use(), 1);
    // A number of 0 (a request without one) is never accepted.
    assert_eq!(
        rejected_for(&decision_of(&h.register_numbered("s1", "a2", "inbound", 0))),
        Some(RejectReason::Replayed)
    );
}

/// Concurrent requests arrive out of order: any unused number within the window is
/// accepted once; a number older than the window is refused.
#[test]
fn request_numbers_may_arrive_out_of_order_within_the_window() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    // Accepted = decided on its merits (the type limit of 3 may refuse it), not refused
    // as a replay.
    let accepted = |h: &mut Harness, agent: &str, seq: u64| {
        let out = h.register_numbered("s1", agent, "outbound", seq);
        rejected_for(&decision_of(&out)) != Some(RejectReason::Replayed)
    };
    let base = 5000;
    for (n, seq) in [base + 3, base + 1, base + 2].into_iter().enumerate() {
        assert!(accepted(&mut h, &format!("a{n}"), seq), "{seq}");
    }
    assert!(!accepted(&mut h, "b", base + 2));
    let far = base + 3 + super::REPLAY_WINDOW;
    assert!(accepted(&mut h, "c", far));
    // base + 3 is now exactly one window behind: too old to tell, refused.
    assert!(!accepted(&mut h, "d", base + 3));
    assert!(accepted(&mut h, "d", far - 1));
    assert!(!accepted(&mut h, "d", far - 1));
    // A new instance of the slave numbers from 1 again.
    h.instances.insert("s1".into(), Uuid::new_v4());
    h.hello("s1", None);
    assert!(accepted(&mut h, "e", 1));
}

/// A standby that replayed the ledger (or loaded a snapshot) refuses every number up to
/// the last granted one, so a request captured before a failover cannot be replayed to
/// the new leader; numbers after it are accepted.
#[test]
fn a_new_leader_refuses_numbers_its_ledger_shows_were_used() {
    let mut h = Harness::new(true);
    let mut standby = Engine::new(config(true));
    let instance = Uuid::new_v4();
    h.instances.insert("s1".into(), instance);
    let mut outs = vec![h.hello_with("s1", None, vec![])];
    outs.push(h.register_numbered("s1", "a1", "inbound", 7));
    outs.push(h.register_numbered("s1", "a2", "inbound", 9));
    outs.push(h.unregister_numbered("s1", "a2", 10));
    for out in &outs {
        for change in &out.changes {
            standby.apply(h.now, change).unwrap();
        }
    }
    let mut from_snapshot = Engine::new(config(true));
    for change in standby.snapshot(100) {
        from_snapshot.apply(h.now, &change).unwrap();
    }
    for engine in [&mut standby, &mut from_snapshot] {
        let mut register = |agent: &str, seq: u64| {
            let out = engine.handle(
                h.now,
                Event::Register {
                    slave: id("s1"),
                    request: RegisterRequest {
                        request_id: Uuid::new_v4(),
                        seq,
                        agent_id: agent.into(),
                        agent_type: "inbound".into(),
                    },
                },
            );
            decision_of(&out)
        };
        // The captured grant of a2 (9), replayed after its release: refused.
        assert_eq!(
            rejected_for(&register("a2", 9)),
            Some(RejectReason::Replayed)
        );
        // A number never granted but below the last grant: refused too (a genuine
        // slave renumbers and asks again).
        assert_eq!(
            rejected_for(&register("a3", 8)),
            Some(RejectReason::Replayed)
        );
        assert!(approved(&register("a3", 11)));
    }
}

/// With `max_agents_per_slave`, one slave (here an unlicensed one, which has no local
/// limit) stops at the cap with `slave_limit` while another slave still gets seats.
#[test]
fn one_slave_stops_at_the_per_slave_cap() {
    let mut h = Harness::new(true);
    h.engine.cfg.max_agents_per_slave = 2;
    h.hello("s1", None);
    h.hello("s2", None);
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "outbound")));
    let out = h.register("s1", "a3", "outbound");
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::SlaveLimit)
    );
    assert_eq!(alerts(&out).len(), 1);
    // Re-registering a held agent is not a new seat.
    assert_eq!(
        h.decision("s1", "a1", "inbound"),
        Decision::Approved { already_held: true }
    );
    assert!(approved(&h.decision("s2", "b1", "inbound")));
    h.unregister("s1", "a2");
    assert!(approved(&h.decision("s1", "a3", "outbound")));
}

/// The status reply lists at most `STATUS_MAX_SLAVES` slaves, disconnected ones first, and
/// counts them all, so it stays within the message size limit at any number of slaves.
#[test]
fn status_lists_a_bounded_number_of_slaves_and_counts_all() {
    let mut h = Harness::new(true);
    h.engine.cfg.max_slaves = 5000;
    let n = lmbus_schemas::STATUS_MAX_SLAVES + 5;
    for i in 0..n {
        h.hello(&format!("s{i:05}"), None);
    }
    // s01000 goes silent and is marked disconnected.
    h.advance(Duration::from_secs(2));
    for i in (0..n).filter(|i| *i != 1000) {
        h.heartbeat(&format!("s{i:05}"));
    }
    h.advance(Duration::from_secs(2));
    h.engine.handle(h.now, Event::Tick { today: TODAY });
    let status = h.engine.status(h.now);
    assert_eq!(status.slaves.len(), lmbus_schemas::STATUS_MAX_SLAVES);
    assert_eq!(status.slaves_total as usize, n);
    assert_eq!(status.slaves_connected as usize, n - 1);
    assert_eq!(status.slaves[0].slave_id, "s01000");
    assert!(!status.slaves[0].connected);
    assert!(lmbus_schemas::encode(&status).unwrap().len() < lmbus_schemas::MAX_MESSAGE_BYTES);
}

/// Reloading a master license with a lower limit logs nobody out but rejects new
/// registrations until usage is below it; the change is one ledger record that a standby
/// and a snapshot carry; a tampered or non-master file changes nothing.
#[test]
fn a_reloaded_license_lowers_the_limit_without_logging_anyone_out() {
    let mut h = Harness::new(true);
    let mut standby = Engine::new(config(true));
    let mut changes = Vec::new();
    changes.extend(h.hello_with("s1", None, vec![]).changes);
    for a in ["a1", "a2", "a3"] {
        let out = h.register("s1", a, "inbound");
        assert!(approved(&decision_of(&out)));
        changes.extend(out.changes);
    }
    let lower = sign_license(
        &license(
            Role::Master,
            Limits {
                total: Some(2),
                local: None,
                agent_types: BTreeMap::new(),
            },
        ),
        &vendor(),
    )
    .unwrap();
    let reload = |text: &str| lmbus_schemas::ReloadRequest {
        license: text.to_owned(),
        operator: "ops".into(),
    };
    // Refused: tampered, or a slave license. Nothing changes.
    let tampered = lower.replace("total = 2", "total = 200");
    for bad in [tampered.as_str(), slave_license(None).as_str()] {
        let (reply, out) = h.reload_license(&reload(bad), TODAY);
        assert!(
            matches!(reply, lmbus_schemas::ReloadReply::Error { .. }),
            "{reply:?}"
        );
        assert!(out.changes.is_empty());
    }
    assert_eq!(h.engine.status(h.now).total_limit, 5);

    let (reply, out) = h.reload_license(&reload(&lower), TODAY);
    let lmbus_schemas::ReloadReply::Reloaded { message } = reply else {
        panic!("{reply:?}");
    };
    assert!(message.contains("nobody is logged out"), "{message}");
    assert_eq!(alerts(&out)[0].kind, AlertKind::LicenseReloaded);
    changes.extend(out.changes);
    assert_eq!(h.engine.total_in_use(), 3);
    assert_eq!(
        rejected_for(&h.decision("s1", "a4", "inbound")),
        Some(RejectReason::AggregateLimit)
    );
    let out = h.unregister_out("s1", "a1");
    changes.extend(out.changes);
    let out = h.unregister_out("s1", "a2");
    changes.extend(out.changes);
    let out = h.register("s1", "a4", "inbound");
    assert!(approved(&decision_of(&out)));
    changes.extend(out.changes);
    assert_eq!(
        rejected_for(&h.decision("s1", "a5", "inbound")),
        Some(RejectReason::AggregateLimit)
    );
    // A standby that applied the records, and an engine restored from its snapshot, use
    // the new limit too.
    for change in &changes {
        standby.apply(h.now, change).unwrap();
    }
    let mut restored = Engine::new(config(true));
    for change in standby.snapshot(100) {
        restored.apply(h.now, &change).unwrap();
    }
    for engine in [&standby, &restored] {
        assert_eq!(engine.status(h.now).total_limit, 2);
        assert_eq!(engine.total_in_use(), 2);
    }
}

/// The hello race of issue 16 and the replayed hello of issue 15, one rule at a time.
mod seat_truth {
    use super::*;

    fn claim(agent: &str, agent_type: &str) -> AgentClaim {
        AgentClaim {
            agent_id: agent.into(),
            agent_type: agent_type.into(),
        }
    }

    /// A hello from `slave`'s current instance with explicit `seq`, claims, pending
    /// registrations and the last request number it accounts for.
    fn hello_at(
        h: &mut Harness,
        slave: &str,
        seq: u64,
        agents: Vec<AgentClaim>,
        pending: Vec<&str>,
        request_seq: u64,
    ) -> Output {
        let request_seq = Some(request_seq);
        let instance = *h.instances.entry(slave.into()).or_insert_with(Uuid::new_v4);
        h.engine.handle(
            h.now,
            Event::Hello {
                slave: id(slave),
                hello: Hello {
                    instance,
                    heartbeat_interval_ms: 1000,
                    seq,
                    grace_ms: 60_000,
                    logout_after_grace: true,
                    request_timeout_ms: 2000,
                    agents,
                    pending: pending.into_iter().map(String::from).collect(),
                    request_seq,
                    ..Default::default()
                },
                today: TODAY,
            },
        )
    }

    fn held(h: &Harness, slave: &str) -> Vec<String> {
        h.engine
            .seats()
            .get(slave)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Steps: s1 says hello (1) and registers a1 (request 1, granted). Hello 2 was built
    /// while a2's registration (request 2) was in flight and before the answer for a1
    /// arrived... no: it claims a1 and lists a2 as pending; the master granted a2 before
    /// the hello arrived. a2 keeps its seat. Then a3 is granted by request 4, and hello 3,
    /// built after request 3 only, arrives late: a3 keeps its seat too. A hello that
    /// accounts for every request and claims neither releases them (the slave gave them up).
    #[test]
    fn a_hello_never_releases_a_seat_granted_after_it_was_built() {
        let mut h = Harness::new(true);
        hello_at(&mut h, "s1", 1, vec![], vec![], 0);
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a1", "inbound", 1)
        )));
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a2", "inbound", 2)
        )));
        let out = hello_at(&mut h, "s1", 2, vec![claim("a1", "inbound")], vec!["a2"], 2);
        assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))));
        assert_eq!(held(&h, "s1"), ["a1", "a2"]);
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a3", "outbound", 4)
        )));
        let out = hello_at(
            &mut h,
            "s1",
            3,
            vec![claim("a1", "inbound"), claim("a2", "inbound")],
            vec![],
            3,
        );
        assert!(
            out.changes
                .iter()
                .all(|c| !matches!(c, SeatChange::Release { .. })),
            "{:?}",
            out.changes
        );
        assert_eq!(held(&h, "s1"), ["a1", "a2", "a3"]);
        // Nothing changed for a live session: no alert.
        assert!(alerts(&out).is_empty(), "{:?}", alerts(&out));
        let out = hello_at(&mut h, "s1", 4, vec![claim("a1", "inbound")], vec![], 4);
        assert_eq!(held(&h, "s1"), ["a1"]);
        assert!(
            alerts(&out)
                .iter()
                .any(|a| a.message.contains("2 seats it no longer claims released"))
        );
    }

    /// Steps: s1 holds two seats; its hello is replayed verbatim (same instance, same
    /// number) and an older one too: both refused `replayed` with an alert, no change, and
    /// s2 cannot take the seats; a hello under a new number from the genuine slave works.
    #[test]
    fn a_replayed_hello_takes_no_seat_back() {
        let mut h = Harness::new(true);
        hello_at(&mut h, "s1", 1, vec![], vec![], 0);
        h.hello("s2", None);
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a1", "inbound", 1)
        )));
        assert!(approved(&decision_of(
            &h.register_numbered("s1", "a2", "inbound", 2)
        )));
        for (seq, alerted) in [(1, 1), (1, 0), (0, 0)] {
            let out = hello_at(&mut h, "s1", seq, vec![], vec![], 0);
            assert!(
                matches!(
                    reply_of(&out),
                    Some(Reply::Refused {
                        reason: RejectReason::Replayed,
                        ..
                    })
                ),
                "{:?}",
                reply_of(&out)
            );
            assert!(out.changes.is_empty());
            // One alert, then quiet for RATE_LIMIT_ALERT_EVERY.
            assert_eq!(alerts(&out).len(), alerted);
        }
        h.advance(RATE_LIMIT_ALERT_EVERY);
        let again = alerts(&hello_at(&mut h, "s1", 1, vec![], vec![], 0));
        assert_eq!(again.len(), 1);
        assert!(
            again[0].message.contains("2 more such refusals"),
            "{}",
            again[0].message
        );
        assert_eq!(held(&h, "s1"), ["a1", "a2"]);
        assert_eq!(h.engine.total_in_use(), 2);
    }

    fn heartbeat_with(h: &mut Harness, slave: &str, books: Option<lmbus_schemas::Books>) -> Output {
        let instance = h.instances[slave];
        h.engine.handle(
            h.now,
            Event::Heartbeat {
                slave: id(slave),
                heartbeat: Heartbeat {
                    instance,
                    seq: 1,
                    books,
                    ..Default::default()
                },
            },
        )
    }

    fn rehello(out: &Output) -> bool {
        out.effects.iter().any(|e| {
            matches!(
                e,
                Effect::Control {
                    message: ControlMessage::Rehello,
                    ..
                }
            )
        })
    }

    /// Steps: s1 holds a1 and a2. A heartbeat whose books match (or match once the agent in
    /// flight is left out on both sides) is acknowledged; books that differ (a seat the
    /// slave does not know, or a wrong type) get a `Rehello`; a heartbeat without books
    /// (an older slave) gets none.
    #[test]
    fn heartbeats_whose_books_differ_ask_for_a_hello() {
        let mut h = Harness::new(true);
        h.hello("s1", None);
        assert!(approved(&h.decision("s1", "a1", "inbound")));
        assert!(approved(&h.decision("s1", "a2", "outbound")));
        let books = |agents: &[(&str, &str)], unsettled: &[&str]| {
            Some(lmbus_schemas::Books {
                count: agents.len() as u32,
                digest: lmbus_schemas::agent_digest(agents.iter().copied()),
                unsettled: unsettled.iter().map(|a| a.to_string()).collect(),
                request_seq: None,
            })
        };
        let out = heartbeat_with(
            &mut h,
            "s1",
            books(&[("a1", "inbound"), ("a2", "outbound")], &[]),
        );
        assert_eq!(reply_of(&out), Some(Reply::Ack));
        assert!(!rehello(&out));
        assert!(!rehello(&heartbeat_with(
            &mut h,
            "s1",
            books(&[("a1", "inbound")], &["a2", "a9"])
        )));
        assert!(rehello(&heartbeat_with(
            &mut h,
            "s1",
            books(&[("a1", "inbound")], &[])
        )));
        assert!(rehello(&heartbeat_with(
            &mut h,
            "s1",
            books(&[("a1", "inbound"), ("a2", "inbound")], &[])
        )));
        assert!(!rehello(&heartbeat_with(&mut h, "s1", None)));
    }

    /// The slave as the hosts see it, and the two FIFO queues between it and the master
    /// (NATS keeps one publisher's order).
    #[derive(Default)]
    struct Model {
        /// What the hosts were told they hold.
        books: BTreeMap<String, String>,
        /// Registrations sent and not answered: agent → request number.
        registering: BTreeMap<String, u64>,
        unregistering: BTreeMap<String, u64>,
        request_seq: u64,
        hello_seq: u64,
        to_master: std::collections::VecDeque<Event>,
        to_slave: std::collections::VecDeque<(Sent, Option<Reply>, Vec<Effect>)>,
    }

    enum Sent {
        Register(String, String),
        Unregister(String),
        Hello,
        Heartbeat,
    }

    #[derive(Debug, Clone)]
    enum Step {
        Register(usize, usize),
        Unregister(usize),
        Hello,
        Heartbeat,
        DeliverToMaster,
        DeliverToSlave,
        /// The second message to the master overtakes the first (a retry at a new leader).
        Overtake,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..6usize, 0..2usize).prop_map(|(a, t)| Step::Register(a, t)),
            2 => (0..6usize).prop_map(Step::Unregister),
            1 => Just(Step::Hello),
            1 => Just(Step::Heartbeat),
            5 => Just(Step::DeliverToMaster),
            5 => Just(Step::DeliverToSlave),
            1 => Just(Step::Overtake),
        ]
    }

    const KINDS: [&str; 2] = ["inbound", "outbound"];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

        /// Any interleaving of registrations, unregistrations, hellos (built from the
        /// slave's books as they are when sent, with what is in flight) and heartbeats,
        /// with answers arriving whenever: every agent the hosts were told they hold has
        /// a seat at the master at every moment, and once everything is delivered and one
        /// heartbeat round has run, the master holds exactly the hosts' books.
        #[test]
        fn the_hosts_books_never_exceed_the_masters(steps in proptest::collection::vec(step(), 1..120)) {
            let mut h = Harness::new(true);
            let instance = Uuid::new_v4();
            h.instances.insert("s1".into(), instance);
            let mut m = Model::default();
            let hello = |m: &mut Model| {
                m.hello_seq += 1;
                Event::Hello {
                    slave: id("s1"),
                    hello: Hello {
                        instance,
                        heartbeat_interval_ms: 1000,
                        seq: m.hello_seq,
                        grace_ms: 60_000,
                        logout_after_grace: true,
                        request_timeout_ms: 2000,
                        agents: m.books.iter().map(|(a, t)| claim(a, t)).collect(),
                        pending: m.registering.keys().cloned().collect(),
                        request_seq: Some(m.request_seq),
                        ..Default::default()
                    },
                    today: TODAY,
                }
            };
            let first = hello(&mut m);
            h.engine.handle(h.now, first);
            let mut sent = std::collections::VecDeque::new();
            let heartbeat = |m: &Model| {
                let unsettled: Vec<String> = m.registering.keys().chain(m.unregistering.keys()).cloned().collect();
                let settled: Vec<(&str, &str)> = m.books.iter()
                    .filter(|(a, _)| !unsettled.contains(a))
                    .map(|(a, t)| (a.as_str(), t.as_str())).collect();
                Event::Heartbeat {
                    slave: id("s1"),
                    heartbeat: Heartbeat {
                        instance,
                        seq: 1,
                        books: Some(lmbus_schemas::Books {
                            count: settled.len() as u32,
                            digest: lmbus_schemas::agent_digest(settled.iter().copied()),
                            unsettled,
                            request_seq: Some(m.request_seq),
                        }),
                        ..Default::default()
                    },
                }
            };
            let run = |h: &mut Harness, m: &mut Model, sent: &mut std::collections::VecDeque<Sent>, s: Step| {
                match s {
                    Step::Register(a, t) => {
                        let agent = format!("a{a}");
                        if m.registering.contains_key(&agent) || m.unregistering.contains_key(&agent) {
                            return;
                        }
                        m.request_seq += 1;
                        m.registering.insert(agent.clone(), m.request_seq);
                        m.to_master.push_back(Event::Register {
                            slave: id("s1"),
                            request: RegisterRequest {
                                request_id: Uuid::new_v4(),
                                seq: m.request_seq,
                                agent_id: agent.clone(),
                                agent_type: KINDS[t].into(),
                            },
                        });
                        sent.push_back(Sent::Register(agent, KINDS[t].into()));
                    }
                    Step::Unregister(a) => {
                        let agent = format!("a{a}");
                        if m.registering.contains_key(&agent) || m.unregistering.contains_key(&agent) {
                            return;
                        }
                        if m.books.remove(&agent).is_none() {
                            return;
                        }
                        m.request_seq += 1;
                        m.unregistering.insert(agent.clone(), m.request_seq);
                        m.to_master.push_back(Event::Unregister {
                            slave: id("s1"),
                            request: UnregisterRequest {
                                request_id: Uuid::new_v4(),
                                seq: m.request_seq,
                                agent_id: agent.clone(),
                            },
                        });
                        sent.push_back(Sent::Unregister(agent));
                    }
                    Step::Hello => {
                        let e = hello(m);
                        m.to_master.push_back(e);
                        sent.push_back(Sent::Hello);
                    }
                    Step::Heartbeat => {
                        let e = heartbeat(m);
                        m.to_master.push_back(e);
                        sent.push_back(Sent::Heartbeat);
                    }
                    Step::DeliverToMaster => {
                        if let (Some(e), Some(what)) = (m.to_master.pop_front(), sent.pop_front()) {
                            let out = h.engine.handle(h.now, e);
                            m.to_slave.push_back((what, reply_of(&out), out.effects));
                        }
                    }
                    Step::Overtake => {
                        if m.to_master.len() >= 2 {
                            m.to_master.swap(0, 1);
                            sent.swap(0, 1);
                        }
                    }
                    Step::DeliverToSlave => {
                        let Some((what, reply, effects)) = m.to_slave.pop_front() else { return };
                        match (what, reply) {
                            (Sent::Register(agent, t), Some(Reply::Decision(Decision::Approved { .. }))) => {
                                m.registering.remove(&agent);
                                m.books.insert(agent, t);
                            }
                            (Sent::Register(agent, _), _) => {
                                m.registering.remove(&agent);
                            }
                            (Sent::Unregister(agent), _) => {
                                m.unregistering.remove(&agent);
                            }
                            (Sent::Hello, Some(Reply::Welcome(w))) => {
                                for r in w.rejected_agents {
                                    m.books.remove(&r.agent_id);
                                }
                            }
                            _ => {}
                        }
                        let asked = effects.iter().any(|e| matches!(e, Effect::Control { message: ControlMessage::Rehello, .. }));
                        if asked {
                            let e = hello(m);
                            m.to_master.push_back(e);
                            sent.push_back(Sent::Hello);
                        }
                    }
                }
            };
            for s in steps {
                run(&mut h, &mut m, &mut sent, s);
                let master = h.engine.seats().remove("s1").unwrap_or_default();
                for (agent, t) in &m.books {
                    proptest::prop_assert_eq!(master.get(agent), Some(t), "the hosts hold {} but the master does not: {:?}", agent, master);
                }
            }
            // Deliver everything, then one heartbeat round (and the hello it may ask for).
            for _ in 0..3 {
                while !m.to_master.is_empty() || !m.to_slave.is_empty() {
                    run(&mut h, &mut m, &mut sent, Step::DeliverToMaster);
                    run(&mut h, &mut m, &mut sent, Step::DeliverToSlave);
                }
                run(&mut h, &mut m, &mut sent, Step::Heartbeat);
            }
            while !m.to_master.is_empty() || !m.to_slave.is_empty() {
                run(&mut h, &mut m, &mut sent, Step::DeliverToMaster);
                run(&mut h, &mut m, &mut sent, Step::DeliverToSlave);
            }
            let master = h.engine.seats().remove("s1").unwrap_or_default();
            let books: BTreeMap<String, String> = m.books.clone();
            proptest::prop_assert_eq!(master.into_iter().collect::<BTreeMap<_, _>>(), books);
        }
    }
}

/// Steps: a request numbered u64::MAX (or any jump past `MAX_SEQ_JUMP`) is refused as
/// replayed and does not move the window, so the slave's next ordinary numbers still work.
#[test]
fn a_huge_request_number_cannot_lock_a_slave_out() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let out = h.register_numbered("s1", "a1", "inbound", u64::MAX);
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::Replayed)
    );
    let out = h.register_numbered("s1", "a1", "inbound", 100 + MAX_SEQ_JUMP + 1);
    assert_eq!(
        rejected_for(&decision_of(&out)),
        Some(RejectReason::Replayed)
    );
    let seq = h.next_seq();
    assert!(approved(&decision_of(
        &h.register_numbered("s1", "a1", "inbound", seq)
    )));
    let seq = h.next_seq();
    assert!(approved(&decision_of(
        &h.register_numbered("s1", "a2", "inbound", seq)
    )));
}

/// Steps: a slave is granted agents out of id order, an operator releases them all, and
/// the engine is snapshotted; the release reply, the logout and the snapshot's `Revoke`s
/// name the agents in id order, whatever order they were granted in (no hash order).
#[test]
fn released_and_snapshotted_agents_come_in_id_order() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    for (a, agent_type) in [
        ("c", "inbound"),
        ("a", "outbound"),
        ("d", "inbound"),
        ("b", "outbound"),
    ] {
        assert!(approved(&h.decision("s1", a, agent_type)));
    }
    let out = h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "s1".into(),
        agent_id: None,
        operator: "alice".into(),
    });
    let sorted: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
    assert_eq!(
        out.reply,
        lmbus_schemas::ReleaseReply::Released {
            agents: sorted.clone()
        }
    );
    let logged_out: Vec<String> = out
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::Control {
                message: ControlMessage::LogOut { agents },
                ..
            } => Some(agents.iter().map(|a| a.agent_id.clone()).collect()),
            _ => None,
        })
        .unwrap();
    assert_eq!(logged_out, sorted);
    let revoked: Vec<String> = h
        .engine
        .snapshot(3)
        .into_iter()
        .filter_map(|c| match c {
            SeatChange::Revoke { agents, .. } => Some(agents),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(revoked, sorted);
}

/// Steps: a slave sends one batch (register a1, register a2, unregister a1, register a1
/// again with a used number); the reply holds one answer per item in order (approved,
/// approved, ack, replayed) and the changes are the items' own, in order.
#[test]
fn a_batch_is_its_items_decided_in_order() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    let register = |seq: u64, agent: &str| {
        lmbus_schemas::BatchItem::Register(RegisterRequest {
            request_id: Uuid::new_v4(),
            seq,
            agent_id: agent.into(),
            agent_type: "inbound".into(),
        })
    };
    let first = h.next_seq();
    let items = vec![
        register(first, "a1"),
        register(first + 1, "a2"),
        lmbus_schemas::BatchItem::Unregister(UnregisterRequest {
            request_id: Uuid::new_v4(),
            seq: first + 2,
            agent_id: "a1".into(),
        }),
        register(first + 1, "a1"),
    ];
    let out = h.engine.handle(
        h.now,
        Event::Batch {
            slave: id("s1"),
            request: lmbus_schemas::BatchRequest { items },
        },
    );
    let Some(Reply::Batch(replies)) = reply_of(&out) else {
        panic!("{:?}", out.reply)
    };
    assert_eq!(replies.len(), 4);
    assert!(matches!(&replies[0], Reply::Decision(d) if approved(d)));
    assert!(matches!(&replies[1], Reply::Decision(d) if approved(d)));
    assert_eq!(replies[2], Reply::Ack);
    assert!(
        matches!(&replies[3], Reply::Decision(Decision::Rejected { reason, .. }) if *reason == RejectReason::Replayed),
        "{:?}",
        replies[3]
    );
    let grants: Vec<&SeatChange> = out.changes.iter().collect();
    assert!(
        matches!(grants.as_slice(), [
            SeatChange::Grant { agent_id: a, .. },
            SeatChange::Grant { agent_id: b, .. },
            SeatChange::Release { agent_id: c, .. },
        ] if a == "a1" && b == "a2" && c == "a1"),
        "{:?}",
        out.changes
    );
    assert_eq!(h.engine.total_in_use(), 1);
}
