//! One operation per agent at a time: a registration or unregistration of an agent waits
//! for the one before it to be answered. Answers then reach the host in the order it asked,
//! so the last call wins: an approval that comes back after the host asked to release the
//! same agent can no longer outlive that release, at the master or in the host's books.
//!
//! An agent's entry is its queue of waiting operations, first come first served. An
//! operation that finds no entry decides under the map's lock ([`Turns::free`]): one that
//! awaits nothing (a local decision, the usual case) takes no turn at all, and one that must
//! await takes the turn from the lock, with no allocation but the entry's name. Every
//! hand-over happens under the map's lock, so a waiter that gives up either is still queued
//! (its channel is closed, and the hand-over skips it) or already holds the turn (and passes
//! it on). The model in `interleavings.rs` takes every turn first; deciding under the free
//! turn's lock is the same order (nothing can start on the agent while it is held).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The agents with an operation running or waiting: an entry lives only while some
/// operation holds or waits for the agent's turn, so the map is bounded by the operations
/// in progress. The entry holds the waiting operations, in order.
#[derive(Debug, Default)]
pub(super) struct Turns {
    /// Plain mutex: never held across an await.
    agents: Mutex<HashMap<String, VecDeque<oneshot::Sender<()>>>>,
}

/// An agent's turn, held until the operation is answered (or its caller gives up: dropping
/// a waiting or running turn passes it on).
pub(super) struct Turn<'a> {
    turns: &'a Turns,
    agent: &'a str,
    /// `Some` while waiting for the turn: the hand-over arrives on it.
    waiting: Option<oneshot::Receiver<()>>,
}

/// The turns' lock, held while an agent's turn is free (see [`Turns::free`]).
pub(super) struct Free<'a> {
    map: MutexGuard<'a, HashMap<String, VecDeque<oneshot::Sender<()>>>>,
    turns: &'a Turns,
    agent: &'a str,
}

impl<'a> Free<'a> {
    /// Takes the free turn, and lets go of the lock.
    pub(super) fn take(mut self) -> Turn<'a> {
        self.map.insert(self.agent.to_owned(), VecDeque::new());
        Turn {
            turns: self.turns,
            agent: self.agent,
            waiting: None,
        }
    }
}

impl Turns {
    pub(super) async fn take<'a>(&'a self, agent: &'a str) -> Turn<'a> {
        let waiting = {
            let mut map = self.map();
            match map.get_mut(agent) {
                Some(queue) => {
                    // Waiters that gave up go now: the queue holds only live ones.
                    queue.retain(|tx| !tx.is_closed());
                    let (tx, rx) = oneshot::channel();
                    queue.push_back(tx);
                    Some(rx)
                }
                None => {
                    map.insert(agent.to_owned(), VecDeque::new());
                    None
                }
            }
        };
        // Built before waiting, so a caller dropped while it waits still cleans up.
        let mut turn = Turn {
            turns: self,
            agent,
            waiting,
        };
        if let Some(rx) = turn.waiting.as_mut() {
            // The sender is only dropped unsent by a hand-over under the lock, which then
            // removes it from the queue: an error cannot happen while the turn is queued,
            // and either way the turn is ours now.
            let _ = rx.await;
            turn.waiting = None;
        }
        turn
    }

    /// The map's lock, while no operation holds or waits for `agent`'s turn (`None`: one
    /// does). Nothing can take the turn while it is held: an operation decided under it is
    /// ordered as if it had taken the turn, and one that must await takes it with
    /// [`Free::take`] before letting go.
    pub(super) fn free<'a>(&'a self, agent: &'a str) -> Option<Free<'a>> {
        let map = self.map();
        (!map.contains_key(agent)).then_some(Free {
            map,
            turns: self,
            agent,
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, VecDeque<oneshot::Sender<()>>>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // Held to the end: a waiter's receiver below must be dropped under it too, or a
        // hand-over could land in it after `try_recv` looked, and the turn would be lost.
        let mut map = self.turns.map();
        if let Some(mut rx) = self.waiting.take() {
            // Gave up while waiting. Handed the turn already (under the lock, so this is
            // exact)? Then it is ours to pass on. Otherwise it stays queued with its
            // channel closed, and the hand-over skips it.
            match rx.try_recv() {
                Ok(()) => {}
                Err(_) => return,
            }
        }
        // Pass the turn to the first waiter still waiting; none: the entry goes.
        let Some(queue) = map.get_mut(self.agent) else {
            return;
        };
        while let Some(next) = queue.pop_front() {
            if next.send(()).is_ok() {
                return;
            }
        }
        map.remove(self.agent);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Steps: a first turn for a1 is held; a second for a1 waits while one for a2 goes at
    /// once; releasing the first lets the second in; when all are dropped (one of them
    /// while still waiting) the map is empty.
    #[tokio::test]
    async fn one_turn_per_agent_in_order_and_nothing_left_behind() {
        let turns = Turns::default();
        let first = turns.take("a1").await;
        let other = tokio::time::timeout(Duration::from_secs(1), turns.take("a2"))
            .await
            .expect("another agent does not wait");
        let mut second = Box::pin(turns.take("a1"));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "the second operation on a1 waits for the first"
        );
        {
            // A caller that gives up while waiting leaves nothing behind.
            let mut gave_up = Box::pin(turns.take("a1"));
            assert!(
                tokio::time::timeout(Duration::from_millis(10), &mut gave_up)
                    .await
                    .is_err()
            );
        }
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("the second goes once the first is done");
        assert_eq!(turns.len(), 2);
        drop(second);
        drop(other);
        assert_eq!(turns.len(), 0);
    }

    /// `free` holds the lock only while nobody holds or waits for the agent's turn: an
    /// operation cannot start on the agent meanwhile, and one taken from it is a turn like
    /// any other (the next operation waits for it).
    #[tokio::test]
    async fn a_free_turn_is_held_under_the_lock_and_taken_from_it() {
        let turns = Turns::default();
        {
            let free = turns.free("a1").expect("nobody holds a1");
            assert!(
                turns.agents.try_lock().is_err(),
                "the lock is held while deciding"
            );
            drop(free);
        }
        assert_eq!(
            turns.len(),
            0,
            "deciding under the lock leaves nothing behind"
        );
        let taken = turns.free("a1").expect("still free").take();
        assert!(turns.free("a1").is_none(), "held now");
        assert!(turns.free("a2").is_some(), "another agent's turn is free");
        let mut next = Box::pin(turns.take("a1"));
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut next)
                .await
                .is_err(),
            "waits for the turn taken from free"
        );
        assert!(turns.free("a1").is_none(), "held and waited for");
        drop(taken);
        let next = tokio::time::timeout(Duration::from_secs(1), next)
            .await
            .expect("handed over");
        drop(next);
        assert_eq!(turns.len(), 0);
        assert!(turns.free("a1").is_some());
    }

    /// A waiter handed the turn that gives up before it looks passes the turn on: the
    /// next waiter gets it, and nothing is left behind.
    #[tokio::test]
    async fn a_turn_handed_to_a_waiter_that_gave_up_is_passed_on() {
        let turns = Turns::default();
        let first = turns.take("a1").await;
        let mut second = Box::pin(turns.take("a1"));
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut second)
                .await
                .is_err(),
            "queued behind the first"
        );
        let mut third = Box::pin(turns.take("a1"));
        assert!(
            tokio::time::timeout(Duration::from_millis(10), &mut third)
                .await
                .is_err(),
            "queued behind the second"
        );
        // The first hands the turn to the second, which gives up without looking.
        drop(first);
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("the turn reached the third");
        assert_eq!(turns.len(), 1);
        drop(third);
        assert_eq!(turns.len(), 0);
    }
}
