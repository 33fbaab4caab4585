//! Allotment mode, the IO around the pure book (`crate::allot`): one allot request to a
//! master (the journal, the blocks wanted) and its answer taken in, under the same rules as
//! every request (the grace clock, failover riding).

use lmbus_schemas::{RejectReason, Reply, SlaveOp};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::inner::Inner;
use super::state::{State, lock};
use crate::link::Ask;
use crate::master::Master;

impl Inner {
    /// When the next allot request is due to any master (`None`: none is).
    pub(super) fn next_allot(&self) -> Option<(Instant, Master)> {
        let state = lock(&self.state);
        let now = Instant::now();
        Master::ALL
            .into_iter()
            .filter(|&link| state.links.get(link).connected)
            .filter_map(|link| {
                state
                    .allot
                    .get(link)
                    .next_request_at(now)
                    .map(|at| (at, link))
            })
            .min()
    }

    /// Sends `link`'s master the journal and the blocks wanted, and takes in the answer.
    /// `true` when more journal entries wait for another request.
    pub(super) async fn allot_round(&self, link: Master) -> bool {
        let prepared = {
            let mut state = lock(&self.state);
            let room = state.room(self.local_limit, link);
            state
                .allot
                .get_mut(link)
                .prepare(Instant::now(), self.instance, room)
        };
        let Some(prepared) = prepared else {
            return false;
        };
        let seq = prepared.request.seq;
        let answer = self.ask(link, SlaveOp::Allot, &prepared.request).await;
        match answer {
            Ok(Ask::Reply {
                reply: Reply::Allotment(allotment),
                ..
            }) => {
                let mut state = lock(&self.state);
                let State { agents, allot, .. } = &mut *state;
                let refused = allot.get_mut(link).settle(seq, &allotment, |upto, t| {
                    agents
                        .values()
                        .filter(|s| {
                            s.link == link && s.agent_type == t && s.allot.is_some_and(|n| n > upto)
                        })
                        .count() as u32
                });
                if !refused.is_empty() {
                    warn!(
                        master = link.name(),
                        refused = refused.len(),
                        "the master did not accept agents admitted from its block; logging them out"
                    );
                    let detail = format!(
                        "the {} master does not count a seat of this slave's block for it",
                        link.name()
                    );
                    self.log_out_rejected(&mut state, link, refused, &detail);
                }
                debug!(master = link.name(), blocks = ?allotment.blocks, "allotment renewed");
                return prepared.more;
            }
            Ok(Ask::Reply {
                reply:
                    Reply::Refused {
                        reason: RejectReason::SlaveNotConnected,
                        ..
                    },
                ..
            }) => {
                let mut state = lock(&self.state);
                state.allot.get_mut(link).unanswered(seq);
                state.links.get_mut(link).connected = false;
            }
            Ok(Ask::Reply { reply, .. }) => {
                // A replayed number (a retry the master had processed) goes again under a
                // new one next round; anything else is logged.
                lock(&self.state).allot.get_mut(link).unanswered(seq);
                if !matches!(
                    reply,
                    Reply::Refused {
                        reason: RejectReason::Replayed,
                        ..
                    }
                ) {
                    warn!(
                        master = link.name(),
                        ?reply,
                        "unexpected answer to an allot request"
                    );
                }
            }
            Ok(Ask::Unavailable(detail)) => {
                lock(&self.state).allot.get_mut(link).unanswered(seq);
                self.set_disconnected(link, detail);
            }
            Err(e) => {
                lock(&self.state).allot.get_mut(link).unanswered(seq);
                warn!(master = link.name(), error = %e, "allot request failed");
            }
        }
        false
    }
}
