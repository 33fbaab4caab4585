//! Intake: what the leader does with a slave's message before the engine sees it. Pure:
//! it takes the time and returns verdicts and alerts, and the runtime does the IO.
//!
//! Three rules, so that one site with its own credentials can neither use the broker's
//! permissions nor drown the others:
//! - **Replies go home.** A request is answered only on a reply subject under the sending
//!   slave's own inbox prefix (`Subjects::is_slave_reply`); anything else is dropped
//!   undecided (an answer there would be written with the broker's permissions: the ledger
//!   subject, the JetStream API, the election bucket, another slave's inbox).
//! - **Every message class has a budget** per slave (a token bucket: hellos, heartbeats,
//!   reports, registrations and unregistrations, bad messages): over it, the message is
//!   dropped before it is decoded. Registrations also have the engine's own, lower
//!   `--slave-rate-limit`, which answers `rate_limited`; this one only stops floods.
//! - **Noise is counted, not echoed.** Drops and bad messages become at most one alert
//!   per slave every [`SUMMARY_EVERY`] ("412 bad messages from site2 in the last 10 s"),
//!   quoting at most one example of bounded length; nothing of unbounded size reaches an
//!   alert or a log line.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use lmbus_schemas::{
    Alert, AlertKind, BatchRequest, ErrorCode, Heartbeat, Hello, RegisterRequest, Severity,
    SlaveId, SlaveOp, SlaveReport, Subjects, UnregisterRequest, Validate, WireError,
    decode as decode_envelope, printable, truncated,
};

use crate::bucket::TokenBucket;
use crate::engine::Event;
use std::time::Instant;

/// How often, at most, one slave's dropped and bad messages are reported in an alert.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Longest example quoted in a summary alert, in bytes.
const EXAMPLE_LEN: usize = 160;

/// Most slaves (and pseudo-sources such as status requests) tracked at once; beyond it,
/// tallies idle for a minute are forgotten, and a source that still finds no room is
/// admitted unbudgeted rather than refused (a genuine slave must never be starved by the
/// table being full).
const MAX_TRACKED: usize = 16_384;

/// A class of message with its own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Hello,
    Heartbeat,
    Report,
    /// Registrations, unregistrations and batches of them.
    Request,
    /// A slave process's goodbye: one per process, so a tiny budget.
    Goodbye,
    /// Messages that could not be decoded or failed validation: their error replies.
    Bad,
}

impl Class {
    const ALL: [Class; 6] = [
        Class::Hello,
        Class::Heartbeat,
        Class::Report,
        Class::Request,
        Class::Goodbye,
        Class::Bad,
    ];

    fn of(op: SlaveOp) -> Self {
        match op {
            SlaveOp::Hello => Class::Hello,
            SlaveOp::Heartbeat => Class::Heartbeat,
            SlaveOp::Report => Class::Report,
            SlaveOp::Register | SlaveOp::Unregister | SlaveOp::Batch | SlaveOp::Allot => {
                Class::Request
            }
            SlaveOp::Goodbye => Class::Goodbye,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Hello => "hellos",
            Class::Heartbeat => "heartbeats",
            Class::Report => "reports",
            Class::Request => "registrations and unregistrations",
            Class::Goodbye => "goodbyes",
            Class::Bad => "error replies to bad messages",
        }
    }
}

/// Messages per second one slave may send of each class, with bursts of twice that.
/// A genuine slave sends one hello per reconnect, one heartbeat per second per master,
/// a report per local rejection.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub hello: u32,
    pub heartbeat: u32,
    pub report: u32,
    /// 0: no budget (the engine's `--slave-rate-limit` still applies to registrations).
    pub request: u32,
    /// A genuine slave sends one goodbye when its process stops (retried on a timeout).
    pub goodbye: u32,
    pub bad: u32,
}

impl Budgets {
    /// The defaults, with request messages at four times the registration rate limit and
    /// at least 5,000 a second (none when that limit is 0). A slave's link sends one
    /// message at a time (a batch of up to 128 items), so a genuine slave stays far below.
    pub fn for_rate_limit(slave_rate_limit: u32) -> Self {
        Self {
            hello: 10,
            heartbeat: 20,
            report: 50,
            request: if slave_rate_limit == 0 {
                0
            } else {
                slave_rate_limit.saturating_mul(4).max(5_000)
            },
            goodbye: 2,
            bad: 5,
        }
    }

    fn rate(&self, class: Class) -> u32 {
        match class {
            Class::Hello => self.hello,
            Class::Heartbeat => self.heartbeat,
            Class::Report => self.report,
            Class::Request => self.request,
            Class::Goodbye => self.goodbye,
            Class::Bad => self.bad,
        }
    }
}

/// Why a message was not passed on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dropped {
    /// Its reply subject is not under the sender's inbox prefix.
    ForeignReply,
    /// A request that wants an answer came without a reply subject.
    NoReply,
    /// Over the class's budget.
    OverBudget(Class),
}

/// One source's budgets and the noise not reported yet.
#[derive(Debug)]
struct Tally {
    buckets: Vec<TokenBucket>,
    dropped: BTreeMap<Dropped, u64>,
    bad: u64,
    /// One example of what was dropped or bad (bounded, printable).
    example: Option<String>,
    /// The worst thing not reported yet.
    severity: Severity,
    reported_at: Option<Instant>,
    last_active: Instant,
}

impl Tally {
    fn new(now: Instant, budgets: &Budgets) -> Self {
        Self {
            buckets: Class::ALL
                .iter()
                .map(|c| TokenBucket::new(now, budgets.rate(*c)))
                .collect(),
            dropped: BTreeMap::new(),
            bad: 0,
            example: None,
            severity: Severity::Info,
            reported_at: None,
            last_active: now,
        }
    }

    fn unreported(&self) -> u64 {
        self.bad + self.dropped.values().sum::<u64>()
    }

    fn note(&mut self, severity: Severity, example: String) {
        if severity > self.severity || self.example.is_none() {
            self.example = Some(example);
        }
        self.severity = self.severity.max(severity);
    }
}

/// The intake's state: one [`Tally`] per source.
#[derive(Debug)]
pub struct Intake {
    budgets: Budgets,
    sources: HashMap<String, Tally>,
    source: String,
}

/// What the runtime should do with a message that failed decoding or validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadVerdict {
    /// Answer with the error (within the bad-message budget).
    Answer,
    /// Counted; no answer.
    Quiet,
}

impl Intake {
    pub fn new(budgets: Budgets, broker_id: &str) -> Self {
        Self {
            budgets,
            sources: HashMap::new(),
            source: broker_id.to_owned(),
        }
    }

    fn tally(&mut self, now: Instant, source: &str) -> Option<&mut Tally> {
        if !self.sources.contains_key(source) {
            if self.sources.len() >= MAX_TRACKED {
                self.sources.retain(|_, t| {
                    t.unreported() > 0
                        || now.saturating_duration_since(t.last_active) < Duration::from_secs(60)
                });
            }
            if self.sources.len() >= MAX_TRACKED {
                return None;
            }
            self.sources
                .insert(source.to_owned(), Tally::new(now, &self.budgets));
        }
        let tally = self.sources.get_mut(source)?;
        tally.last_active = now;
        Some(tally)
    }

    /// Whether a message from `slave` on operation `op` with reply subject `reply` goes on
    /// to decoding. A drop is counted for the next summary.
    pub fn admit(
        &mut self,
        now: Instant,
        subjects: &Subjects,
        slave: &SlaveId,
        op: SlaveOp,
        reply: Option<&str>,
    ) -> Result<(), Dropped> {
        let verdict = match reply {
            Some(reply) if !subjects.is_slave_reply(slave, reply) => Err(Dropped::ForeignReply),
            None if op != SlaveOp::Report => Err(Dropped::NoReply),
            _ => Ok(()),
        };
        let class = Class::of(op);
        let rate = self.budgets.rate(class);
        let Some(tally) = self.tally(now, slave.as_str()) else {
            return verdict;
        };
        let verdict = verdict.and_then(|()| {
            if tally.buckets[class as usize].take(now, rate) {
                Ok(())
            } else {
                Err(Dropped::OverBudget(class))
            }
        });
        if let Err(dropped) = &verdict {
            *tally.dropped.entry(dropped.clone()).or_insert(0) += 1;
            let (severity, example) = match (dropped, reply) {
                (Dropped::ForeignReply, Some(reply)) => (
                    Severity::Critical,
                    format!(
                        "a {} naming reply subject {} (outside its inbox prefix {}.)",
                        op.token(),
                        printable(&truncated(reply, EXAMPLE_LEN)),
                        subjects.slave_inbox_prefix(slave)
                    ),
                ),
                (Dropped::NoReply, _) => (
                    Severity::Warning,
                    format!("a {} without a reply subject", op.token()),
                ),
                _ => (
                    Severity::Warning,
                    format!("{} over its budget", class.name()),
                ),
            };
            tally.note(severity, example);
        }
        verdict
    }

    /// Charges a batch's other items to `slave`'s request budget (the message itself paid
    /// for one at `admit`): a batch of 128 costs what 128 registrations cost. `false`: over
    /// budget, the batch is dropped undecided (and counted).
    pub fn charge_batch(&mut self, now: Instant, slave: &SlaveId, items: usize) -> bool {
        let rate = self.budgets.request;
        let Some(tally) = self.tally(now, slave.as_str()) else {
            return true;
        };
        let bucket = &mut tally.buckets[Class::Request as usize];
        for _ in 1..items {
            if !bucket.take(now, rate) {
                *tally
                    .dropped
                    .entry(Dropped::OverBudget(Class::Request))
                    .or_insert(0) += 1;
                tally.note(
                    Severity::Warning,
                    format!("a batch of {items} requests over its budget"),
                );
                return false;
            }
        }
        true
    }

    /// Counts a message from `source` (a slave id, or a pseudo-source such as `status`)
    /// whose reply subject is not an inbox; the caller drops it.
    pub fn foreign_client_reply(&mut self, now: Instant, source: &str, reply: &str) {
        if let Some(tally) = self.tally(now, source) {
            *tally.dropped.entry(Dropped::ForeignReply).or_insert(0) += 1;
            tally.note(
                Severity::Critical,
                format!(
                    "a request naming reply subject {} (not an _INBOX. subject)",
                    printable(&truncated(reply, EXAMPLE_LEN))
                ),
            );
        }
    }

    /// Counts a message from `slave` that could not be decoded or failed validation.
    pub fn bad(&mut self, now: Instant, source: &str, op: &str, error: &str) -> BadVerdict {
        let rate = self.budgets.bad;
        let Some(tally) = self.tally(now, source) else {
            return BadVerdict::Quiet;
        };
        tally.bad += 1;
        tally.note(
            Severity::Warning,
            format!("a bad {op}: {}", printable(&truncated(error, EXAMPLE_LEN))),
        );
        if tally.buckets[Class::Bad as usize].take(now, rate) {
            BadVerdict::Answer
        } else {
            BadVerdict::Quiet
        }
    }

    /// One alert per source with unreported noise whose last summary is at least
    /// [`SUMMARY_EVERY`] old (or that never had one). Call it on every tick.
    pub fn summaries(&mut self, now: Instant) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let mut sources: Vec<(&String, &mut Tally)> = self.sources.iter_mut().collect();
        sources.sort_by(|a, b| a.0.cmp(b.0));
        for (source, tally) in sources {
            let total = tally.unreported();
            if total == 0 {
                continue;
            }
            let window = match tally.reported_at {
                Some(at) if now.saturating_duration_since(at) < SUMMARY_EVERY => continue,
                Some(at) => now.saturating_duration_since(at),
                None => SUMMARY_EVERY,
            };
            let mut parts = Vec::new();
            if tally.bad > 0 {
                parts.push(lmbus_schemas::human::plural(
                    tally.bad,
                    "bad message",
                    "bad messages",
                ));
            }
            for (dropped, n) in &tally.dropped {
                parts.push(match dropped {
                    Dropped::ForeignReply => {
                        format!("{n} requests naming a reply subject outside its inbox, dropped")
                    }
                    Dropped::NoReply => format!("{n} requests without a reply subject, dropped"),
                    Dropped::OverBudget(class) => {
                        format!("{n} {} over budget, dropped", class.name())
                    }
                });
            }
            let who = if SlaveId::new(source.as_str()).is_ok() {
                format!("slave {source}")
            } else {
                source.clone()
            };
            let mut message = format!(
                "{who}: {} in the last {} s",
                parts.join(", "),
                window.as_secs().max(1)
            );
            if let Some(example) = &tally.example {
                message.push_str(&format!(" (e.g. {example})"));
            }
            let severity = tally.severity.max(Severity::Warning);
            let mut alert = Alert::new(severity, AlertKind::BadMessage, message);
            alert.source = self.source.clone();
            if SlaveId::new(source.as_str()).is_ok() {
                alert = alert.slave(source.as_str());
            }
            alerts.push(alert);
            tally.dropped.clear();
            tally.bad = 0;
            tally.example = None;
            tally.severity = Severity::Info;
            tally.reported_at = Some(now);
        }
        alerts
    }
}

/// A slave's message, decoded and validated.
#[derive(Debug)]
pub enum Decoded {
    /// One event for the engine.
    One(Event),
    /// A batch: the runtime decides its items in order.
    Batch(BatchRequest),
}

/// Decodes and validates a slave's payload for `op` (the protocol crate's `Validate`: ids,
/// types, texts, list lengths), so the engine only ever sees well-formed requests.
pub fn decode(
    payload: &[u8],
    slave: &SlaveId,
    op: SlaveOp,
    today: time::Date,
) -> Result<Decoded, WireError> {
    fn checked<T: serde::de::DeserializeOwned + Validate>(payload: &[u8]) -> Result<T, WireError> {
        let value = decode_envelope::<T>(payload).map_err(|e| WireError::from(&e))?;
        value.validate().map_err(|e| WireError {
            code: ErrorCode::Invalid,
            message: e.to_string(),
        })?;
        Ok(value)
    }
    let slave = slave.clone();
    Ok(Decoded::One(match op {
        SlaveOp::Hello => Event::Hello {
            slave,
            hello: checked::<Hello>(payload)?,
            today,
        },
        SlaveOp::Register => Event::Register {
            slave,
            request: checked::<RegisterRequest>(payload)?,
        },
        SlaveOp::Unregister => Event::Unregister {
            slave,
            request: checked::<UnregisterRequest>(payload)?,
        },
        SlaveOp::Heartbeat => Event::Heartbeat {
            slave,
            heartbeat: checked::<Heartbeat>(payload)?,
        },
        SlaveOp::Report => Event::Report {
            slave,
            report: checked::<SlaveReport>(payload)?,
        },
        SlaveOp::Batch => return Ok(Decoded::Batch(checked::<BatchRequest>(payload)?)),
        SlaveOp::Allot => Event::Allot {
            slave,
            request: checked::<lmbus_schemas::AllotRequest>(payload)?,
        },
        SlaveOp::Goodbye => Event::Goodbye {
            slave,
            goodbye: checked::<lmbus_schemas::Goodbye>(payload)?,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Intake, Subjects, SlaveId, Instant) {
        let intake = Intake::new(Budgets::for_rate_limit(100), "b1");
        (
            intake,
            Subjects::new("acme").unwrap(),
            SlaveId::new("site1").unwrap(),
            Instant::now(),
        )
    }

    #[test]
    fn replies_outside_the_slaves_inbox_are_dropped_and_reported_once() {
        let (mut intake, subjects, site1, now) = setup();
        let home = "_INBOX.lmbus.acme.site1.x.1";
        assert_eq!(
            intake.admit(now, &subjects, &site1, SlaveOp::Register, Some(home)),
            Ok(())
        );
        for reply in [
            "lmbus.v1.acme.ledger",
            "$JS.API.STREAM.PURGE.LMBUS_LEDGER_acme",
            "$KV.lmbus_election_acme.leader",
            "_INBOX.lmbus.acme.site2.x",
        ] {
            for op in SlaveOp::ALL {
                assert_eq!(
                    intake.admit(now, &subjects, &site1, op, Some(reply)),
                    Err(Dropped::ForeignReply),
                    "{reply} {op:?}"
                );
            }
        }
        assert_eq!(
            intake.admit(now, &subjects, &site1, SlaveOp::Hello, None),
            Err(Dropped::NoReply)
        );
        let alerts = intake.summaries(now);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].severity, Severity::Critical);
        assert_eq!(alerts[0].slave.as_deref(), Some("site1"));
        assert!(
            alerts[0].message.contains(&format!(
                "{} requests naming a reply subject outside its inbox",
                4 * SlaveOp::ALL.len()
            )),
            "{}",
            alerts[0].message
        );
        // Nothing new: no alert; more noise within the window: held back.
        assert!(intake.summaries(now + Duration::from_secs(1)).is_empty());
        let _ = intake.admit(now, &subjects, &site1, SlaveOp::Hello, Some("x.y"));
        assert!(intake.summaries(now + Duration::from_secs(5)).is_empty());
        assert_eq!(intake.summaries(now + SUMMARY_EVERY).len(), 1);
    }

    #[test]
    fn floods_are_cut_per_class_and_per_slave() {
        let (mut intake, subjects, site1, now) = setup();
        let site2 = SlaveId::new("site2").unwrap();
        let reply = |s: &SlaveId| format!("{}.r", subjects.slave_inbox_prefix(s));
        let mut hellos = 0;
        for _ in 0..1000 {
            if intake
                .admit(now, &subjects, &site1, SlaveOp::Hello, Some(&reply(&site1)))
                .is_ok()
            {
                hellos += 1;
            }
        }
        assert_eq!(hellos, 20, "a burst of twice the hello budget");
        // site1's flood costs site2 nothing, and site1's heartbeats still pass.
        assert!(
            intake
                .admit(now, &subjects, &site2, SlaveOp::Hello, Some(&reply(&site2)))
                .is_ok()
        );
        assert!(
            intake
                .admit(
                    now,
                    &subjects,
                    &site1,
                    SlaveOp::Heartbeat,
                    Some(&reply(&site1))
                )
                .is_ok()
        );
        // The budget refills with time.
        let later = now + Duration::from_secs(1);
        assert!(
            intake
                .admit(
                    later,
                    &subjects,
                    &site1,
                    SlaveOp::Hello,
                    Some(&reply(&site1))
                )
                .is_ok()
        );
        let mut answered = 0;
        for _ in 0..3000 {
            if intake.bad(now, "site1", "report", &"\u{1b}[2J".repeat(10_000)) == BadVerdict::Answer
            {
                answered += 1;
            }
        }
        assert_eq!(answered, 10);
        let alerts = intake.summaries(later);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let message = &alerts[0].message;
        assert!(message.contains("3000 bad messages"), "{message}");
        assert!(message.contains("980 hellos over budget"), "{message}");
        assert!(message.len() < 600, "{message}");
        assert!(!message.contains('\u{1b}'), "{message}");
    }
}
