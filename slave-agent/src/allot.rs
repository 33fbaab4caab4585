//! Allotment mode, the slave's half (pure, like `policy.rs`: plain values and `now` in, no
//! IO, no locks): the free seats the master allotted this slave per agent type, the journal
//! of local decisions the master has not acknowledged, the lease, and how many seats to ask
//! for. See `lmbus_schemas::allot` for the protocol.
//!
//! The one rule everything here keeps: the free seats this slave uses, plus the agents it
//! admitted that the master has not yet moved out of its block, never exceed the block the
//! master counts for it. So:
//! - a request lowers `free` to what it asks for at the moment it is sent;
//! - an answer sets `free` to the master's block minus the agents admitted after that
//!   request was sent (the master has not seen them) and still held;
//! - an answer to a request sent before a hello began is ignored (the hello emptied the
//!   block on the master after, or before, that answer was made: the slave cannot tell);
//! - while a hello is in flight nothing is admitted locally, and the hello empties `free`;
//! - nothing is admitted after the lease (from the send time of the answered request).
//!
//! An agent admitted and released before any request carried its admission costs nothing on
//! the master: both entries are dropped and the seat is free again at once. Such agents are
//! counted (`churned`), not named, in the per-agent records.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use lmbus_schemas::{AllotOp, AllotOpKind, AllotRequest, Allotment, MAX_ALLOT_OPS};
use tokio::time::Instant;
use uuid::Uuid;

/// The smallest block asked for a type in demand, and the buffer added to the expected
/// use of one refresh interval.
pub const ALLOT_BUFFER: u32 = 2;

/// A request on its way: what it carried and when it left.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    /// The last journal entry it carried.
    upto: u64,
    /// The hello generation it was sent in.
    epoch: u64,
    seq: u64,
}

/// What a slave holds of one master's allotments.
#[derive(Debug, Clone, Default)]
pub struct AllotBook {
    /// The master said allotment in its last welcome.
    active: bool,
    refresh: Duration,
    free: BTreeMap<String, u32>,
    lease_until: Option<Instant>,
    /// Unacknowledged journal entries, in order.
    journal: VecDeque<AllotOp>,
    /// The last journal number given out, and the last one any request or hello carried.
    next_n: u64,
    sent_n: u64,
    /// The last allot request number used.
    seq: u64,
    sent: Option<Sent>,
    /// Incremented when a hello begins; answers from an older one are ignored.
    epoch: u64,
    hello_in_flight: bool,
    /// Give everything back until then (the master said the pool is nearly empty).
    returning_until: Option<Instant>,
    /// Keep no more than these free seats per type until then (the master asked for fair
    /// shares).
    caps: BTreeMap<String, u32>,
    caps_until: Option<Instant>,
    /// Admissions per type since the last request, and the rate estimate.
    demand: BTreeMap<String, u32>,
    rate: BTreeMap<String, f64>,
    window_start: Option<Instant>,
    /// Registrations decided here, and agents that came and went between two requests.
    pub local_decisions: u64,
    pub churned: u64,
}

/// A request to send, and whether more journal entries wait for the next one.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub request: AllotRequest,
    pub more: bool,
}

impl AllotBook {
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Free seats usable now, per type.
    pub fn free(&self) -> &BTreeMap<String, u32> {
        &self.free
    }

    pub fn journal_len(&self) -> usize {
        self.journal.len()
    }

    pub fn lease_left(&self, now: Instant) -> Option<Duration> {
        self.lease_until.map(|t| t.saturating_duration_since(now))
    }

    /// Whether an unacknowledged entry names `agent_id` (its admission or release): a
    /// strict request for the agent must wait for it, or it could reach the master first.
    pub fn journaled(&self, agent_id: &str) -> bool {
        self.journal.iter().any(|op| op.agent_id == agent_id)
    }

    /// Agents named in unacknowledged entries: the heartbeat's books leave them out.
    pub fn unsettled(&self) -> impl Iterator<Item = &str> {
        self.journal.iter().map(|op| op.agent_id.as_str())
    }

    /// Admits an agent from the free block if it may: returns its journal number. The
    /// journal entry takes `agent_id` and `agent_type` (owned ones are moved in: a caller
    /// under a lock makes them before it).
    pub fn try_admit(
        &mut self,
        now: Instant,
        agent_id: impl Into<String>,
        agent_type: impl AsRef<str> + Into<String>,
    ) -> Option<u64> {
        if !self.active {
            return None;
        }
        bump(&mut self.demand, agent_type.as_ref());
        self.admit(now, agent_id, agent_type)
    }

    /// [`AllotBook::try_admit`] for a registration already counted in the demand: one
    /// asked again while seats of other blocks are given back.
    pub fn try_admit_again(
        &mut self,
        now: Instant,
        agent_id: impl Into<String>,
        agent_type: impl AsRef<str> + Into<String>,
    ) -> Option<u64> {
        if !self.active {
            return None;
        }
        self.admit(now, agent_id, agent_type)
    }

    fn admit(
        &mut self,
        now: Instant,
        agent_id: impl Into<String>,
        agent_type: impl AsRef<str> + Into<String>,
    ) -> Option<u64> {
        if self.hello_in_flight || self.lease_until.is_none_or(|t| now >= t) {
            return None;
        }
        let free = self.free.get_mut(agent_type.as_ref())?;
        if *free == 0 {
            return None;
        }
        *free -= 1;
        self.next_n += 1;
        self.journal.push_back(AllotOp {
            n: self.next_n,
            kind: AllotOpKind::Admit,
            agent_id: agent_id.into(),
            agent_type: agent_type.into(),
        });
        self.local_decisions += 1;
        Some(self.next_n)
    }

    /// Counts demand for a type the block could not serve (so the next request asks).
    #[cfg(test)]
    pub fn missed(&mut self, agent_type: &str) {
        if self.active {
            bump(&mut self.demand, agent_type);
        }
    }

    /// After a registration the block could not serve: whether to ask now rather than at
    /// the next refresh (at most every quarter refresh, and not while giving back).
    pub fn ask_early(&self, now: Instant) -> bool {
        self.active
            && self.returning_until.is_none_or(|t| now >= t)
            && self
                .window_start
                .is_none_or(|t| now.saturating_duration_since(t) >= self.refresh / 4)
    }

    /// How long a registration refused for capacity waits, in all, while the master says
    /// seats of other blocks are being given back (`retry_after_ms`): the master stops
    /// saying so 2 refresh intervals after it told a holder, and half of one more covers
    /// the last ask's round trip.
    pub fn return_wait(&self) -> Duration {
        self.refresh.saturating_mul(2) + self.refresh / 2
    }

    /// Whether a type's free seats ran low: time to ask before they run out.
    pub fn low(&self, agent_type: &str) -> bool {
        let free = self.free.get(agent_type).copied().unwrap_or(0);
        let want = self.expected(agent_type);
        self.active && free.saturating_mul(2) < want
    }

    /// Whether the book takes releases ([`AllotBook::release`]): the master is in
    /// allotment mode.
    pub fn takes_releases(&self) -> bool {
        self.active
    }

    /// Releases an agent this slave admitted from a block (`admitted`: its journal number).
    /// `None`: the book no longer takes releases (the master is strict now); the caller
    /// unregisters with the master. Otherwise what the book no longer needs comes back
    /// ([`Leftover`]), for a caller under a lock to drop after it.
    pub fn release(
        &mut self,
        agent_id: impl Into<String>,
        agent_type: impl AsRef<str> + Into<String>,
        admitted: u64,
    ) -> Option<Leftover> {
        if !self.active {
            return None;
        }
        if admitted > self.sent_n {
            // The master never heard of it: both entries go, and the seat is free again.
            // Journal numbers only grow along the journal.
            if let Ok(i) = self.journal.binary_search_by_key(&admitted, |op| op.n) {
                let admission = self.journal.remove(i);
                bump(&mut self.free, agent_type.as_ref());
                self.churned += 1;
                return Some(Leftover {
                    _admission: admission,
                    _names: Some((agent_id.into(), agent_type.into())),
                });
            }
        }
        self.next_n += 1;
        bump(&mut self.free, agent_type.as_ref());
        self.journal.push_back(AllotOp {
            n: self.next_n,
            kind: AllotOpKind::Release,
            agent_id: agent_id.into(),
            agent_type: agent_type.into(),
        });
        // The master counts its seat until it applies the release (in the block if it has
        // not applied the admission yet, as a held seat if it has), and then puts it in
        // the block: it is this slave's to use again at once.
        Some(Leftover {
            _admission: None,
            _names: None,
        })
    }

    /// Seats a type is expected to need over two refresh intervals, plus the buffer.
    fn expected(&self, agent_type: &str) -> u32 {
        let rate = self.rate.get(agent_type).copied().unwrap_or(0.0);
        if rate <= 0.0 {
            return 0;
        }
        let need = (rate * self.refresh.as_secs_f64() * 2.0).ceil();
        (need.min(f64::from(u32::MAX / 2)) as u32).saturating_add(ALLOT_BUFFER)
    }

    /// The next request, if one may go now (active, no hello and no request in flight).
    /// `room`: how many more seats the local limit allows (held and free together).
    /// Lowers `free` to what it asks for.
    pub fn prepare(&mut self, now: Instant, instance: Uuid, room: u32) -> Option<Prepared> {
        if !self.active || self.hello_in_flight || self.sent.is_some() {
            return None;
        }
        // Demand: a moving average of admissions (and misses) per second.
        let elapsed = self
            .window_start
            .map_or(self.refresh, |t| now.saturating_duration_since(t))
            .max(Duration::from_millis(50));
        let mut types: Vec<String> = self.rate.keys().cloned().collect();
        types.extend(self.demand.keys().cloned());
        types.sort();
        types.dedup();
        for t in &types {
            let seen = f64::from(self.demand.get(t).copied().unwrap_or(0));
            let now_rate = seen / elapsed.as_secs_f64();
            let old = self.rate.get(t).copied().unwrap_or(now_rate);
            let rate = 0.5 * old + 0.5 * now_rate;
            if rate < 0.01 {
                self.rate.remove(t);
            } else {
                self.rate.insert(t.clone(), rate);
            }
        }
        self.demand.clear();
        self.window_start = Some(now);
        let returning = self.returning_until.is_some_and(|t| now < t);
        let capped = self.caps_until.is_some_and(|t| now < t);
        let mut want = BTreeMap::new();
        let mut room = room;
        if !returning {
            for t in self.rate.keys() {
                let cap = if capped {
                    self.caps.get(t).copied().unwrap_or(u32::MAX)
                } else {
                    u32::MAX
                };
                let w = self.expected(t).min(room).min(cap);
                room -= w;
                if w > 0 {
                    want.insert(t.clone(), w);
                }
            }
        }
        // From now on use no more than asked for.
        for (t, free) in self.free.iter_mut() {
            *free = (*free).min(want.get(t).copied().unwrap_or(0));
        }
        self.free.retain(|_, n| *n > 0);
        let ops: Vec<AllotOp> = self.journal.iter().take(MAX_ALLOT_OPS).cloned().collect();
        let upto = ops.last().map_or(self.sent_n, |op| op.n.max(self.sent_n));
        self.sent_n = self.sent_n.max(upto);
        self.seq += 1;
        self.sent = Some(Sent {
            at: now,
            upto,
            epoch: self.epoch,
            seq: self.seq,
        });
        Some(Prepared {
            more: self.journal.len() > ops.len(),
            request: AllotRequest {
                instance,
                seq: self.seq,
                ops,
                want,
            },
        })
    }

    /// The answer to the request in flight. `held_after(t)`: how many agents of type `t`
    /// this slave holds that it admitted after journal number `upto` (the caller's seat
    /// table knows). Returns the agents the master refused, to log out.
    pub fn settle(
        &mut self,
        seq: u64,
        answer: &Allotment,
        held_after: impl Fn(u64, &str) -> u32,
    ) -> Vec<lmbus_schemas::RejectedAgent> {
        let Some(sent) = self.sent.filter(|s| s.seq == seq) else {
            return Vec::new();
        };
        self.sent = None;
        if sent.epoch != self.epoch || self.hello_in_flight {
            return Vec::new();
        }
        while self
            .journal
            .front()
            .is_some_and(|op| op.n <= answer.journal)
        {
            self.journal.pop_front();
        }
        // Releases the master has not applied yet: their seats are still counted (and go
        // to the block with the next request), so they stay usable.
        let refused: std::collections::BTreeSet<&str> =
            answer.refused.iter().map(|r| r.agent_id.as_str()).collect();
        let mut released: BTreeMap<String, u32> = BTreeMap::new();
        for op in &self.journal {
            if op.kind == AllotOpKind::Release && !refused.contains(op.agent_id.as_str()) {
                *released.entry(op.agent_type.clone()).or_insert(0) += 1;
            }
        }
        let mut types: Vec<&String> = answer.blocks.keys().chain(released.keys()).collect();
        types.sort();
        types.dedup();
        self.free = types
            .into_iter()
            .map(|t| {
                let block = answer.blocks.get(t).copied().unwrap_or(0);
                let back = released.get(t).copied().unwrap_or(0);
                let unseen = held_after(sent.upto, t);
                (t.clone(), block.saturating_add(back).saturating_sub(unseen))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        self.lease_until = Some(sent.at + Duration::from_millis(answer.lease_ms));
        if answer.exhausted {
            self.returning_until = Some(sent.at + self.refresh);
        }
        answer.refused.clone()
    }

    /// The request in flight got no usable answer: it may have been applied or not, so
    /// `free` stays as low as it was sent; its entries go again in the next request.
    pub fn unanswered(&mut self, seq: u64) {
        if self.sent.is_some_and(|s| s.seq == seq) {
            self.sent = None;
        }
    }

    /// The master says the pool is nearly empty: give everything back with the next request.
    pub fn return_all(&mut self, now: Instant) {
        self.returning_until = Some(now + self.refresh.max(Duration::from_millis(100)));
        self.free.clear();
    }

    /// The master asks for fair shares: keep no more than `caps` free per type for one
    /// refresh interval, from now.
    pub fn shrink_to(&mut self, now: Instant, caps: &BTreeMap<String, u32>) {
        for (t, cap) in caps {
            if let Some(free) = self.free.get_mut(t) {
                *free = (*free).min(*cap);
            }
        }
        self.free.retain(|_, n| *n > 0);
        self.caps = caps.clone();
        self.caps_until = Some(now + self.refresh.max(Duration::from_millis(100)));
    }

    /// A hello is about to be built: nothing is admitted until it is answered, the free
    /// seats are gone (the master empties the block), and every journal entry so far is
    /// reflected in the hello's agent list. Returns the journal number the hello carries.
    pub fn begin_hello(&mut self) -> u64 {
        self.hello_in_flight = true;
        self.epoch += 1;
        self.free.clear();
        self.lease_until = None;
        self.sent = None;
        self.sent_n = self.next_n;
        self.next_n
    }

    /// The hello (carrying `journal`) was answered: entries up to it are settled; the
    /// master's mode decides whether blocks are used from now on.
    pub fn welcomed(&mut self, journal: u64, allotment: bool, refresh: Duration) {
        self.hello_in_flight = false;
        while self.journal.front().is_some_and(|op| op.n <= journal) {
            self.journal.pop_front();
        }
        self.active = allotment;
        self.refresh = refresh.max(Duration::from_millis(100));
        if !allotment {
            self.journal.clear();
        }
    }

    /// The hello failed: still nothing to admit from (the block may be gone).
    pub fn hello_failed(&mut self) {
        self.hello_in_flight = false;
    }

    /// When the next request should go: every refresh interval, at once when a type ran
    /// low or the master asked for the blocks back.
    pub fn next_request_at(&self, now: Instant) -> Option<Instant> {
        if !self.active || self.sent.is_some() || self.hello_in_flight {
            return None;
        }
        if self.returning_until.is_some_and(|t| now < t) && !self.free.is_empty() {
            return Some(now);
        }
        Some(self.window_start.map_or(now, |t| t + self.refresh))
    }
}

/// What a release leaves of its entries (an admission the master never heard of and the
/// release's names, both dropped): nothing to read, only to be dropped by a caller after its
/// lock rather than under it.
#[derive(Debug)]
pub struct Leftover {
    _admission: Option<AllotOp>,
    _names: Option<(String, String)>,
}

/// One more for `key`, allocating its name only the first time (the local decision's path).
fn bump(map: &mut BTreeMap<String, u32>, key: &str) {
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(blocks: &[(&str, u32)], journal: u64) -> Allotment {
        Allotment {
            blocks: blocks.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect(),
            lease_ms: 10_000,
            journal,
            refused: vec![],
            exhausted: false,
        }
    }

    fn active() -> AllotBook {
        let mut b = AllotBook::default();
        b.begin_hello();
        b.welcomed(0, true, Duration::from_secs(2));
        b
    }

    /// The first request asks for what demand says; its answer gives the block.
    fn with_block(now: Instant, n: u32) -> AllotBook {
        let mut b = active();
        for _ in 0..20 {
            b.missed("in");
        }
        let p = b.prepare(now, Uuid::nil(), 1000).unwrap();
        assert!(p.request.want["in"] >= n, "{:?}", p.request.want);
        b.settle(p.request.seq, &answer(&[("in", n)], 0), |_, _| 0);
        b
    }

    #[tokio::test(start_paused = true)]
    async fn admits_from_the_block_until_it_is_empty_or_the_lease_ends() {
        let now = Instant::now();
        let mut b = with_block(now, 2);
        assert_eq!(b.try_admit(now, "a1", "in"), Some(1));
        assert_eq!(b.try_admit(now, "a2", "in"), Some(2));
        assert_eq!(b.try_admit(now, "a3", "in"), None);
        assert_eq!(b.try_admit(now, "a3", "out"), None);
        assert_eq!(b.local_decisions, 2);
        let mut b = with_block(now, 2);
        assert_eq!(
            b.try_admit(now + Duration::from_secs(10), "a1", "in"),
            None,
            "the lease ran out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn free_is_never_more_than_the_block_minus_what_the_master_has_not_seen() {
        let now = Instant::now();
        let mut b = with_block(now, 3);
        b.try_admit(now, "a1", "in").unwrap();
        // The request carries a1 and asks for less than free: free drops at once.
        let p = b.prepare(now, Uuid::nil(), 1).unwrap();
        assert_eq!(p.request.ops.len(), 1);
        assert!(b.free().get("in").copied().unwrap_or(0) <= 1);
        // a2 is admitted after the request left.
        let a2 = b.try_admit(now, "a2", "in");
        // The master moved a1 out and sized the block to 1; a2 (unseen) takes it.
        let held_after = |upto: u64, t: &str| u32::from(a2.is_some_and(|n| n > upto) && t == "in");
        b.settle(p.request.seq, &answer(&[("in", 1)], 1), held_after);
        assert_eq!(b.free().get("in"), None);
        assert_eq!(b.journal_len(), usize::from(a2.is_some()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_from_before_a_hello_is_ignored_and_a_hello_empties_the_block() {
        let now = Instant::now();
        let mut b = with_block(now, 3);
        let p = b.prepare(now, Uuid::nil(), 100).unwrap();
        let journal = b.begin_hello();
        assert_eq!(
            b.try_admit(now, "a1", "in"),
            None,
            "no admission during a hello"
        );
        b.welcomed(journal, true, Duration::from_secs(2));
        b.settle(p.request.seq, &answer(&[("in", 3)], 0), |_, _| 0);
        assert!(b.free().is_empty(), "{:?}", b.free());
        assert_eq!(b.try_admit(now, "a1", "in"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_that_comes_and_goes_between_requests_costs_the_master_nothing() {
        let now = Instant::now();
        let mut b = with_block(now, 1);
        let n = b.try_admit(now, "a1", "in").unwrap();
        assert!(b.release("a1", "in", n).is_some());
        assert_eq!(b.journal_len(), 0);
        assert_eq!(b.free()["in"], 1);
        assert_eq!(b.churned, 1);
        // Once a request carried the admission, the release is journalled and the seat
        // comes back only with the master's answer.
        let n = b.try_admit(now, "a2", "in").unwrap();
        let p = b.prepare(now, Uuid::nil(), 100).unwrap();
        assert!(b.release("a2", "in", n).is_some());
        assert_eq!(b.journal_len(), 2);
        // The master still counts a2's seat until it applies the release: usable again.
        assert_eq!(b.free().get("in").copied().unwrap_or(0), 1);
        b.settle(p.request.seq, &answer(&[("in", 0)], n), |_, _| 0);
        assert_eq!(b.journal_len(), 1, "the release waits for the next request");
        assert_eq!(
            b.free()["in"],
            1,
            "a2's seat, held by the master until then"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_answer_keeps_free_as_low_as_sent_and_the_journal_for_the_next() {
        let now = Instant::now();
        let mut b = with_block(now, 4);
        b.try_admit(now, "a1", "in").unwrap();
        let p = b.prepare(now, Uuid::nil(), 2).unwrap();
        b.unanswered(p.request.seq);
        assert!(b.free().get("in").copied().unwrap_or(0) <= 2);
        let p2 = b.prepare(now, Uuid::nil(), 2).unwrap();
        assert_eq!(p2.request.ops.len(), 1, "sent again");
        assert!(p2.request.seq > p.request.seq);
    }

    #[tokio::test(start_paused = true)]
    async fn told_to_return_the_slave_asks_for_nothing() {
        let now = Instant::now();
        let mut b = with_block(now, 4);
        b.return_all(now);
        assert!(b.free().is_empty());
        let p = b.prepare(now, Uuid::nil(), 100).unwrap();
        assert!(p.request.want.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_strict_master_takes_no_journal() {
        let mut b = AllotBook::default();
        let j = b.begin_hello();
        b.welcomed(j, false, Duration::from_secs(2));
        assert!(!b.is_active());
        assert_eq!(b.try_admit(Instant::now(), "a", "in"), None);
        assert!(b.release("a", "in", 1).is_none());
        assert!(b.prepare(Instant::now(), Uuid::nil(), 10).is_none());
    }

    /// A registration asked again while seats of other blocks are given back is admitted
    /// from the block like any, but its demand is not counted twice; it waits at most 2.5
    /// refresh intervals in all.
    #[tokio::test(start_paused = true)]
    async fn a_registration_asked_again_counts_its_demand_once() {
        let now = Instant::now();
        let mut b = with_block(now, 2);
        assert_eq!(b.return_wait(), Duration::from_secs(5));
        assert_eq!(b.try_admit_again(now, "a1", "in"), Some(1));
        assert_eq!(b.local_decisions, 1);
        assert_eq!(b.demand.get("in"), None);
        assert_eq!(b.try_admit(now, "a2", "in"), Some(2));
        assert_eq!(b.demand.get("in"), Some(&1));
        assert_eq!(AllotBook::default().try_admit_again(now, "a3", "in"), None);
    }

    /// An admission or release the master has not acknowledged is pending until an answer
    /// covers it (a strict registration of the same agent waits for that).
    #[tokio::test(start_paused = true)]
    async fn a_journal_entry_is_pending_until_an_answer_covers_it() {
        let now = Instant::now();
        let mut b = with_block(now, 2);
        let n = b.try_admit(now, "a1", "in").unwrap();
        assert!(b.journaled("a1"), "admitted, not yet sent");
        let p = b.prepare(now, Uuid::nil(), 100).unwrap();
        b.settle(p.request.seq, &answer(&[("in", 1)], n), |_, _| 0);
        assert!(!b.journaled("a1"));
        assert!(b.release("a1", "in", n).is_some());
        assert!(b.journaled("a1"));
        assert!(!b.journaled("a2"));
        let p = b.prepare(now, Uuid::nil(), 100).unwrap();
        assert!(b.journaled("a1"), "sent, not yet answered");
        b.settle(p.request.seq, &answer(&[("in", 2)], n + 1), |_, _| 0);
        assert!(!b.journaled("a1"));
    }
}
