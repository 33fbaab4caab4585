//! One operation per agent at a time: a registration or unregistration of an agent waits
//! for the one before it to be answered. Answers then reach the host in the order it asked,
//! so the last call wins: an approval that comes back after the host asked to release the
//! same agent can no longer outlive that release, at the master or in the host's books.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// The agents with an operation running or waiting, each with the lock its operations take
/// in turn. An entry lives only while some operation holds or waits for it, so the map is
/// bounded by the operations in progress.
#[derive(Debug, Default)]
pub(super) struct Turns {
    /// Plain mutex: never held across an await.
    agents: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// An agent's turn, held until the operation is answered (or its caller gives up: dropping
/// a waiting or running turn passes it on).
pub(super) struct Turn<'a> {
    turns: &'a Turns,
    agent: &'a str,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Turns {
    pub(super) async fn take<'a>(&'a self, agent: &'a str) -> Turn<'a> {
        let lock = {
            let mut map = self.map();
            match map.get(agent) {
                Some(lock) => lock.clone(),
                None => map.entry(agent.to_owned()).or_default().clone(),
            }
        };
        // Built before waiting, so a caller dropped while it waits still cleans up.
        let mut turn = Turn {
            turns: self,
            agent,
            lock: Some(lock.clone()),
            guard: None,
        };
        turn.guard = Some(lock.lock_owned().await);
        turn
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        self.lock.take();
        let mut map = self.turns.map();
        // Only the map holds it: nobody runs or waits for this agent any more.
        if map
            .get(self.agent)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            map.remove(self.agent);
        }
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
}
