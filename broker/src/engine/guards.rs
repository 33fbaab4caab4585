//! What keeps a rogue or confused slave from costing others: the registration rate limit
//! (`Bucket`), replay protection by request number (`ReplayWindow`), the bookkeeping of quiet
//! repeated refusals (`Quiet`), and the agent id and type check. Plain types and functions:
//! the rules that use them are the engine's methods in the other files.

use std::time::{Duration, Instant};

use crate::bucket::TokenBucket;

/// Longest agent id accepted, in bytes.
pub use lmbus_schemas::validate::MAX_AGENT_ID_LEN;

/// How often, at most, a slave's rate limiting is reported in an alert.
pub const RATE_LIMIT_ALERT_EVERY: Duration = Duration::from_secs(10);

/// A slave's registration rate: its token bucket, and the rejections not reported in an
/// alert yet with when the last alert went out.
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: TokenBucket,
    pub(super) unreported: u64,
    pub(super) reported_at: Option<Instant>,
}

impl Bucket {
    pub(super) fn new(now: Instant, rate: u32) -> Self {
        Self {
            tokens: TokenBucket::new(now, rate),
            unreported: 0,
            reported_at: None,
        }
    }

    pub(super) fn take(&mut self, now: Instant, rate: u32) -> bool {
        self.tokens.take(now, rate)
    }
}

/// How many request numbers below the highest one seen a slave may still send (requests
/// sent concurrently arrive out of order).
pub const REPLAY_WINDOW: u64 = 1024;

/// How far past the highest request number seen a new one may jump. A genuine slave counts
/// up by one; a number near `u64::MAX` would leave no room for any later request and lock
/// the instance out.
pub const MAX_SEQ_JUMP: u64 = 1 << 32;

/// The request numbers (`seq`) of one slave instance the master has processed: every
/// number up to `floor`, and those marked in a ring of the last [`REPLAY_WINDOW`] numbers
/// up to `highest`. 128 bytes per slave.
#[derive(Debug, Clone, Default)]
pub(super) struct ReplayWindow {
    pub(super) highest: u64,
    floor: u64,
    ring: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    fn bit(seq: u64) -> (usize, u64) {
        let slot = seq % REPLAY_WINDOW;
        ((slot / 64) as usize, 1 << (slot % 64))
    }

    /// Whether `seq` is new; if so, it is marked as processed.
    pub(super) fn accept(&mut self, seq: u64) -> bool {
        if seq == 0
            || seq <= self.floor
            || seq.saturating_sub(self.highest.max(self.floor)) > MAX_SEQ_JUMP
        {
            return false;
        }
        if seq > self.highest {
            if seq - self.highest >= REPLAY_WINDOW {
                self.ring = Default::default();
            } else {
                for gone in self.highest + 1..seq {
                    let (word, mask) = Self::bit(gone);
                    self.ring[word] &= !mask;
                }
            }
            self.highest = seq;
            let (word, mask) = Self::bit(seq);
            self.ring[word] |= mask;
            return true;
        }
        if self.highest - seq >= REPLAY_WINDOW {
            return false;
        }
        let (word, mask) = Self::bit(seq);
        let fresh = self.ring[word] & mask == 0;
        self.ring[word] |= mask;
        fresh
    }

    /// From the ledger: every number up to `seq` counts as processed (a new leader does
    /// not know which of them its predecessor saw, so it assumes all).
    pub(super) fn restore(&mut self, seq: u64) {
        self.floor = self.floor.max(seq);
        self.highest = self.highest.max(seq);
    }
}

/// Checks an agent id (and type) from the network, by the protocol's one rule
/// (`lmbus_schemas::validate`); `Some(problem)` when unusable. The intake checks every
/// message the same way first: this keeps the engine safe on its own (the fuzz targets
/// feed it directly).
pub(super) fn validate_agent(agent_id: &str, agent_type: Option<&str>) -> Option<String> {
    use lmbus_schemas::validate::{check_agent_id, check_agent_type};
    check_agent_id(agent_id)
        .and_then(|()| agent_type.map_or(Ok(()), check_agent_type))
        .err()
        .map(|e| e.to_string())
}

/// One slave's repeated refusals of one reason since its last alert.
#[derive(Debug, Clone)]
pub(super) struct Quiet {
    pub(super) unreported: u64,
    pub(super) reported_at: Option<Instant>,
    /// The last refusal counted and not alerted: the tick alerts the count with it once
    /// the quiet time is over, so the count reaches the alert stream even when the storm
    /// stops.
    pub(super) last: Option<lmbus_schemas::Alert>,
}
