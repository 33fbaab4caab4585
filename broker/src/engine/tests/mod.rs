//! Engine rules, tested without NATS: events in, replies and effects out. One file per rule
//! family, like the engine's; this file is the harness they share.

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

mod admin;
mod allot;
mod contexts;
mod farewell;
mod guards;
mod hello;
mod liveness;
mod offline;
mod replay;
mod reports;
mod seats;
mod status;

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
        sync_within_days: None,
        revision: None,
        backs: None,
        production_cluster: None,
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
        allot: Default::default(),
        forget_after: Duration::from_secs(3600),
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
    pub(super) fn new(allow_unlicensed: bool) -> Self {
        let mut engine = Engine::new(config(allow_unlicensed));
        engine.set_wall_clock(1_700_000_000_000);
        Self {
            engine,
            now: Instant::now(),
            instances: BTreeMap::new(),
            seq: 0,
        }
    }

    /// An operator's release request, handled as the runtime hands it to the engine.
    pub(super) fn admin_release(&mut self, request: &lmbus_schemas::ReleaseRequest) -> Released {
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
    pub(super) fn reload_license(
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

    /// The slave's process died and a new one starts: a new instance, and the master has
    /// taken the old one for dead (silent past its limit), without moving the clock.
    fn restart(&mut self, slave: &str) {
        self.instances.insert(slave.into(), Uuid::new_v4());
        if let Some(s) = self.engine.slaves.get_mut(&id(slave)) {
            s.connected = false;
        }
    }

    /// Moves both clocks: the monotonic one the engine decides by and the wall clock its
    /// grants record.
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.engine.wall_ms += d.as_millis() as u64;
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

    pub(super) fn hello(&mut self, slave: &str, license: Option<String>) -> Reply {
        self.hello_with(slave, license, vec![])
            .into_slave_reply()
            .unwrap()
    }

    pub(super) fn register(&mut self, slave: &str, agent: &str, agent_type: &str) -> Output {
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

    pub(super) fn unregister(&mut self, slave: &str, agent: &str) -> Reply {
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

    pub(super) fn heartbeat(&mut self, slave: &str) -> Reply {
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

    pub(super) fn tick(&mut self) -> Vec<Alert> {
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

fn decision_of(out: &Output) -> Decision {
    match &reply_of(out) {
        Some(Reply::Decision(d)) => d.clone(),
        other => panic!("expected a decision, got {other:?}"),
    }
}
