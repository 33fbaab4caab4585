//! The strict path's seat books under arbitrary interleavings (issue 16), with the real
//! slave state on one side and the real master engine on the other: the seat table, the
//! registrations and unregistrations in flight with their [`InFlight`] guards, the lists a
//! hello carries, the books a heartbeat carries and the logouts a welcome or a control
//! message makes are this crate's own `State` methods, the ones the agent's IO calls. The
//! IO's ordering is kept as the agent keeps it: one operation per agent at a time (its
//! `Turns`: a host's second call on an agent waits for the first's answer), a registration
//! is marked in flight before it takes its request number, and a hello or heartbeat reads
//! the request number before the books. Between the two sides run two FIFO queues (NATS keeps one publisher's order)
//! whose heads may swap (a retry that reaches a new leader first), and every answer comes
//! whenever the interleaving says.
//!
//! The hosts keep their own books: an approval they were told adds the agent, a rejection
//! or a logout they were told removes it, and a release they asked for removes it when they
//! ask. After every step, every agent in the hosts' books has a seat of that type at the
//! master (the hosts can never hold more than the master counts, so never more than the
//! license). Once everything is delivered and one heartbeat round has run (with the hello it
//! may ask for), the master holds exactly the hosts' books, which are the slave's seat
//! table, and nothing is left in flight.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lmbus_broker::engine::{AllotConfig, Answer, Effect, Engine, EngineConfig, Event, Output};
use lmbus_schemas::{
    Admission, Context, ControlMessage, Decision, Heartbeat, Hello, License, Limits,
    RegisterRequest, RejectReason, Reply, Role, SlaveId, UnregisterRequest, VendorKey,
};
use proptest::prelude::*;
use time::macros::date;
use uuid::Uuid;

use super::state::{InFlight, Refusal, Release, State, lock};
use crate::events::Outcome;
use crate::master::Master;

const AGENTS: [&str; 6] = ["a0", "a1", "a2", "a3", "a4", "a5"];
const TYPES: [&str; 2] = ["inbound", "outbound"];
const LINK: Master = Master::Primary;

fn engine() -> Engine {
    let license = License {
        id: Uuid::new_v4(),
        customer: "Acme".into(),
        issued: date!(2026 - 01 - 01),
        expires: date!(2027 - 12 - 31),
        maintenance_expires: date!(2027 - 12 - 31),
        role: Role::Master,
        context: Context::Production,
        sync_within_days: None,
        revision: None,
        backs: None,
        production_cluster: None,
        limits: Limits {
            // Small enough that rejections at the limit happen too.
            total: Some(4),
            local: None,
            agent_types: TYPES.iter().map(|t| ((*t).to_owned(), 3)).collect(),
        },
    };
    Engine::new(EngineConfig {
        broker_id: "b1".into(),
        cluster: "c".into(),
        license,
        vendor_key: VendorKey::from_bytes(&[42; 32]).verifying_key(),
        allow_unlicensed_slaves: true,
        missed_heartbeats: 3,
        counts_interval: Duration::from_secs(60),
        expiry_warning_days: 30,
        max_slaves: 10,
        reclaim_margin: Duration::from_secs(10),
        slave_rate_limit: 0,
        max_agents_per_slave: 0,
        forget_after: Duration::ZERO,
        allot: AllotConfig {
            admission: Admission::Strict,
            ..AllotConfig::default()
        },
    })
}

/// What a message to the master was, so its answer is taken in as the agent takes it.
#[derive(Debug)]
enum Sent {
    Register {
        guard: u64,
        agent: &'static str,
        agent_type: &'static str,
        renumbered: bool,
    },
    Unregister {
        guard: u64,
        agent: &'static str,
    },
    Hello,
    Heartbeat,
}

#[derive(Debug, Clone)]
enum Step {
    Register {
        agent: usize,
        kind: usize,
    },
    Unregister {
        agent: usize,
    },
    /// A reconnect (or a second caller that found the session lost) says hello.
    Hello,
    Heartbeat,
    DeliverToMaster,
    DeliverToSlave,
    /// The second message to the master overtakes the first.
    Overtake,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..AGENTS.len(), 0..TYPES.len()).prop_map(|(agent, kind)| Step::Register { agent, kind }),
        2 => (0..AGENTS.len()).prop_map(|agent| Step::Unregister { agent }),
        1 => Just(Step::Hello),
        1 => Just(Step::Heartbeat),
        5 => Just(Step::DeliverToMaster),
        5 => Just(Step::DeliverToSlave),
        1 => Just(Step::Overtake),
    ]
}

/// A host's call that waits for its agent's turn.
#[derive(Debug)]
enum Call {
    Register(&'static str),
    Unregister,
}

/// The slave's side: its real state, the guards of what it has in flight, the two counters
/// the agent keeps outside the state, the agents' turns, and the hosts' books.
struct Slave<'a> {
    id: SlaveId,
    instance: Uuid,
    state: &'a Mutex<State>,
    in_flight: BTreeMap<u64, InFlight<'a>>,
    next_guard: u64,
    request_seq: u64,
    hello_seq: u64,
    to_master: VecDeque<(Sent, Event)>,
    to_slave: VecDeque<(Sent, Output)>,
    /// Agents whose turn is taken, and the calls waiting for it, in order.
    busy: BTreeSet<&'static str>,
    waiting: BTreeMap<&'static str, VecDeque<Call>>,
    /// What the hosts were told they hold: agent → type.
    hosts: BTreeMap<&'static str, String>,
}

impl<'a> Slave<'a> {
    fn new(state: &'a Mutex<State>) -> Self {
        Slave {
            id: SlaveId::new("s1").unwrap(),
            instance: Uuid::new_v4(),
            state,
            in_flight: BTreeMap::new(),
            next_guard: 0,
            request_seq: 0,
            hello_seq: 0,
            to_master: VecDeque::new(),
            to_slave: VecDeque::new(),
            busy: BTreeSet::new(),
            waiting: BTreeMap::new(),
            hosts: BTreeMap::new(),
        }
    }

    /// A host calls: now if the agent's turn is free, else when it comes.
    fn call(&mut self, agent: &'static str, call: Call) {
        if self.busy.contains(agent) {
            self.waiting.entry(agent).or_default().push_back(call);
            return;
        }
        self.busy.insert(agent);
        let done = match call {
            Call::Register(agent_type) => {
                self.register(agent, agent_type);
                false
            }
            Call::Unregister => self.unregister(agent),
        };
        if done {
            self.turn_done(agent);
        }
    }

    /// The agent's operation was answered: the next call waiting for it goes.
    fn turn_done(&mut self, agent: &'static str) {
        self.busy.remove(agent);
        let next = self.waiting.get_mut(agent).and_then(VecDeque::pop_front);
        if let Some(call) = next {
            self.call(agent, call);
        }
    }

    fn logged_out(&mut self, outs: Vec<crate::events::LoggedOut>) {
        for out in outs {
            self.hosts.remove(out.agent_id.as_str());
        }
    }
    fn next_request_seq(&mut self) -> u64 {
        self.request_seq += 1;
        self.request_seq
    }

    fn guard(&mut self, agent: &'static str, registering: bool) -> u64 {
        self.next_guard += 1;
        let guard = InFlight {
            state: self.state,
            agent,
            registering,
            settled: false,
        };
        self.in_flight.insert(self.next_guard, guard);
        self.next_guard
    }

    fn register(&mut self, agent: &'static str, agent_type: &'static str) {
        lock(self.state).begin_registration(agent);
        let guard = self.guard(agent, true);
        let seq = self.next_request_seq();
        self.send_register(guard, agent, agent_type, seq, false);
    }

    fn send_register(
        &mut self,
        guard: u64,
        agent: &'static str,
        agent_type: &'static str,
        seq: u64,
        renumbered: bool,
    ) {
        let request = RegisterRequest {
            request_id: Uuid::new_v4(),
            seq,
            agent_id: agent.to_owned(),
            agent_type: agent_type.to_owned(),
        };
        self.to_master.push_back((
            Sent::Register {
                guard,
                agent,
                agent_type,
                renumbered,
            },
            Event::Register {
                slave: self.id.clone(),
                request,
            },
        ));
    }

    /// `true` when it is answered at once (nothing to release).
    fn unregister(&mut self, agent: &'static str) -> bool {
        let release = lock(self.state).begin_unregistration(agent);
        // The host counts the seat as given back from when it asks.
        self.hosts.remove(agent);
        match release {
            Release::NotHeld => true,
            Release::Journaled { .. } => panic!("a journaled release in strict mode"),
            Release::Send(_) => {
                let guard = self.guard(agent, false);
                let request = UnregisterRequest {
                    request_id: Uuid::new_v4(),
                    seq: self.next_request_seq(),
                    agent_id: agent.to_owned(),
                };
                self.to_master.push_back((
                    Sent::Unregister { guard, agent },
                    Event::Unregister {
                        slave: self.id.clone(),
                        request,
                    },
                ));
                false
            }
        }
    }

    fn hello(&mut self) -> Event {
        let request_seq = self.request_seq;
        let (agents, pending) = lock(self.state).hello_lists(LINK);
        self.hello_seq += 1;
        Event::Hello {
            slave: self.id.clone(),
            hello: Hello {
                instance: self.instance,
                heartbeat_interval_ms: 1000,
                agents,
                seq: self.hello_seq,
                grace_ms: 60_000,
                logout_after_grace: true,
                request_timeout_ms: 2_000,
                request_seq: Some(request_seq),
                pending,
                ..Hello::default()
            },
            today: date!(2026 - 11 - 27),
        }
    }

    fn send_hello(&mut self) {
        let hello = self.hello();
        self.to_master.push_back((Sent::Hello, hello));
    }

    fn heartbeat(&mut self) {
        let request_seq = self.request_seq;
        let mut books = lock(self.state).books(LINK);
        books.request_seq = Some(request_seq);
        let heartbeat = Heartbeat {
            instance: self.instance,
            seq: 1,
            books: Some(books),
            ..Heartbeat::default()
        };
        self.to_master.push_back((
            Sent::Heartbeat,
            Event::Heartbeat {
                slave: self.id.clone(),
                heartbeat,
            },
        ));
    }

    /// Takes in the master's answer as the agent does: settles what was in flight and
    /// records the decision under one lock, logs out what a welcome did not re-grant, says
    /// hello again when asked.
    fn answer(&mut self, sent: Sent, out: Output) {
        let reply = match out.reply {
            Some(Answer::Slave(reply)) => Some(reply),
            _ => None,
        };
        match (sent, reply) {
            (
                Sent::Register {
                    guard,
                    agent,
                    agent_type,
                    renumbered: false,
                },
                Some(Reply::Decision(Decision::Rejected {
                    reason: RejectReason::Replayed,
                    ..
                })),
            ) => {
                // Refused as a number already used: asked again under a new one.
                let seq = self.next_request_seq();
                self.send_register(guard, agent, agent_type, seq, true);
            }
            (
                Sent::Register {
                    guard,
                    agent,
                    agent_type,
                    ..
                },
                Some(Reply::Decision(decision)),
            ) => {
                let outcome = match decision {
                    Decision::Approved { already_held } => Outcome::Approved { already_held },
                    Decision::Rejected { reason, detail, .. } => {
                        Outcome::Rejected { reason, detail }
                    }
                };
                let refusal = {
                    let mut state = lock(self.state);
                    if let Some(guard) = self.in_flight.remove(&guard) {
                        guard.settle(&mut state);
                    }
                    state.record_decision(agent, agent_type, &outcome, Some(LINK))
                };
                match refusal {
                    None => {
                        self.hosts.insert(agent, agent_type.to_owned());
                    }
                    // The host is told its agent is logged out: it no longer holds the seat.
                    Some(Refusal::LoggedOut(_)) => {
                        self.hosts.remove(agent);
                    }
                    // Refused a seat it did not hold, or a second seat of another type: the
                    // host keeps what it had.
                    Some(Refusal::Refused(_)) => {}
                }
                self.turn_done(agent);
            }
            (Sent::Register { guard, agent, .. }, _) => {
                if let Some(guard) = self.in_flight.remove(&guard) {
                    guard.settle(&mut lock(self.state));
                }
                self.turn_done(agent);
            }
            (Sent::Unregister { guard, agent }, _) => {
                if let Some(guard) = self.in_flight.remove(&guard) {
                    guard.settle(&mut lock(self.state));
                }
                self.turn_done(agent);
            }
            (Sent::Hello, Some(Reply::Welcome(welcome))) => {
                let outs =
                    lock(self.state).not_regranted(LINK, welcome.rejected_agents, "not re-granted");
                self.logged_out(outs);
            }
            (Sent::Hello | Sent::Heartbeat, _) => {}
        }
        for effect in out.effects {
            match effect {
                Effect::Control {
                    message: ControlMessage::Rehello,
                    ..
                } => self.send_hello(),
                Effect::Control {
                    message: ControlMessage::LogOut { agents },
                    ..
                } => {
                    let outs =
                        lock(self.state).not_regranted(LINK, agents, "logged out by the master");
                    self.logged_out(outs);
                }
                _ => {}
            }
        }
    }
}

fn check(master: &Engine, slave: &Slave<'_>) -> Result<(), TestCaseError> {
    let seats = master.seats().remove("s1").unwrap_or_default();
    for (agent, agent_type) in &slave.hosts {
        prop_assert_eq!(
            seats.get(*agent),
            Some(agent_type),
            "the hosts hold {} ({}) but the master's seats of this slave are {:?}",
            agent,
            agent_type,
            seats
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_hosts_books_never_exceed_the_masters(steps in prop::collection::vec(step(), 1..150)) {
        let mut master = engine();
        let now = Instant::now();
        let state = Mutex::new(State::new());
        let mut slave = Slave::new(&state);
        let first = slave.hello();
        let welcome = master.handle(now, first);
        prop_assert!(matches!(welcome.reply, Some(Answer::Slave(Reply::Welcome(_)))), "{:?}", welcome);

        for step in steps {
            match step {
                Step::Register { agent, kind } => slave.call(AGENTS[agent], Call::Register(TYPES[kind])),
                Step::Unregister { agent } => slave.call(AGENTS[agent], Call::Unregister),
                Step::Hello => slave.send_hello(),
                Step::Heartbeat => slave.heartbeat(),
                Step::DeliverToMaster => {
                    if let Some((sent, event)) = slave.to_master.pop_front() {
                        let out = master.handle(now, event);
                        slave.to_slave.push_back((sent, out));
                    }
                }
                Step::DeliverToSlave => {
                    if let Some((sent, out)) = slave.to_slave.pop_front() {
                        slave.answer(sent, out);
                    }
                }
                Step::Overtake => {
                    if slave.to_master.len() >= 2 {
                        slave.to_master.swap(0, 1);
                    }
                }
            }
            check(&master, &slave)?;
        }

        // Everything delivered, then one heartbeat round and the hello it may ask for.
        let deliver_all = |slave: &mut Slave<'_>, master: &mut Engine| -> Result<(), TestCaseError> {
            while !slave.to_master.is_empty() || !slave.to_slave.is_empty() {
                if let Some((sent, event)) = slave.to_master.pop_front() {
                    let out = master.handle(now, event);
                    slave.to_slave.push_back((sent, out));
                }
                if let Some((sent, out)) = slave.to_slave.pop_front() {
                    slave.answer(sent, out);
                }
                check(master, slave)?;
            }
            Ok(())
        };
        deliver_all(&mut slave, &mut master)?;
        slave.heartbeat();
        deliver_all(&mut slave, &mut master)?;

        prop_assert!(slave.in_flight.is_empty() && slave.busy.is_empty());
        let seats = master.seats().remove("s1").unwrap_or_default();
        let state = lock(&state);
        prop_assert_eq!(state.pending, 0);
        prop_assert!(state.registering.is_empty() && state.unregistering.is_empty());
        let table: BTreeMap<String, String> = state
            .agents
            .iter()
            .map(|(agent, seat)| (agent.clone(), seat.agent_type.clone()))
            .collect();
        let hosts: BTreeMap<String, String> = slave
            .hosts
            .iter()
            .map(|(agent, agent_type)| ((*agent).to_owned(), agent_type.clone()))
            .collect();
        prop_assert_eq!(&hosts, &table, "the hosts' books and the slave's seat table differ");
        prop_assert_eq!(hosts, seats, "after a heartbeat round the master holds exactly the hosts' books");
    }
}
