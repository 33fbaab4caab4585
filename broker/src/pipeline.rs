//! The leader's ledger appends in flight: several at once, acknowledged in order, each
//! carrying the answers that may be given once it (and everything before it) is recorded.
//!
//! What keeps this fenced is in [`crate::ledger::Ledger::send`]: each append names the
//! sequence and the message id of the one before it, so none lands unless every earlier one
//! did, right before it. What keeps it honest is here: answers leave only in order, after
//! their own append's acknowledgement, and the first failure ends the pipeline: nothing
//! behind it is answered. An append that went unacknowledged (the stream's leader died)
//! stays at the front: the leader may send everything in flight again, unchanged
//! ([`Pipeline::resend`]), and a record that did land comes back as itself.

use std::collections::VecDeque;
use std::time::Duration;

use crate::ledger::{AppendError, Sent};

/// How many appends the leader keeps in flight. Past a handful the server is busy anyway;
/// more would only hold more decisions that a failure throws away. When it is full the
/// leader reads no slave requests until the oldest append is acknowledged (they wait in the
/// subscription's buffer); a batch too large for one entry may pass it by its extra parts.
pub const DEPTH: usize = 8;

/// An append's acknowledgement (or failure), with the answers it releases.
#[derive(Debug)]
pub struct Acked<A> {
    pub result: Result<u64, AppendError>,
    pub answers: Vec<A>,
    /// From sending the append to its acknowledgement.
    pub took: Duration,
}

struct InFlight<A> {
    sent: Sent,
    answers: Vec<A>,
}

/// Appends sent and not yet acknowledged, oldest first.
pub struct Pipeline<A> {
    in_flight: VecDeque<InFlight<A>>,
}

impl<A> std::fmt::Debug for Pipeline<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl<A> Default for Pipeline<A> {
    fn default() -> Self {
        Self {
            in_flight: VecDeque::with_capacity(DEPTH),
        }
    }
}

impl<A> Pipeline<A> {
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Whether another append may be sent now.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < DEPTH
    }

    /// Adds an append just sent, with the answers its acknowledgement releases.
    pub fn push(&mut self, sent: Sent, answers: Vec<A>) {
        self.in_flight.push_back(InFlight { sent, answers });
    }

    /// Answers that record nothing but were decided on top of the appends in flight (a
    /// rejection may count a seat granted in one of them): they wait for the last one.
    /// Given back when nothing is in flight, to be answered now.
    pub fn hold(&mut self, answers: Vec<A>) -> Option<Vec<A>> {
        match self.in_flight.back_mut() {
            Some(last) => {
                last.answers.extend(answers);
                None
            }
            None => Some(answers),
        }
    }

    /// Waits for the oldest append's acknowledgement; returns it with its answers and how
    /// long it took from sending. Pending forever when nothing is in flight (for `select!`,
    /// guard with [`Self::is_empty`]). An [`AppendError::NoAck`] leaves the append in
    /// flight, with its answers (none are returned): [`Self::resend`], or give up.
    pub async fn next(&mut self) -> Acked<A> {
        let Some(front) = self.in_flight.front_mut() else {
            return std::future::pending().await;
        };
        let result = front.sent.wait().await;
        let took = front.sent.started.elapsed();
        if let Err(AppendError::NoAck(_)) = result {
            return Acked {
                result,
                answers: Vec::new(),
                took,
            };
        }
        let answers = self
            .in_flight
            .pop_front()
            .map(|f| f.answers)
            .unwrap_or_default();
        Acked {
            result,
            answers,
            took,
        }
    }

    /// Sends every append in flight again, oldest first, unchanged (see
    /// [`crate::ledger::Sent::resend`]).
    pub async fn resend(&mut self) -> Result<(), AppendError> {
        for in_flight in &mut self.in_flight {
            in_flight.sent.resend().await?;
        }
        Ok(())
    }

    /// How long ago the oldest append in flight was first sent.
    pub fn oldest_sent(&self) -> Option<Duration> {
        self.in_flight.front().map(|f| f.sent.started.elapsed())
    }
}
