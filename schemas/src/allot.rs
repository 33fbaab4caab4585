//! Allotment mode: the master hands a slave blocks of seats per agent type and the slave
//! admits registrations from them locally, with no message on the decision's path.
//!
//! The protocol in one paragraph. A master in allotment mode says so in its `Welcome`. The
//! slave then sends an [`AllotRequest`] on `…slave.<id>.allot` every refresh interval (and
//! at once when it runs low or is told [`crate::ControlMessage::ReturnAllotment`]): its
//! journal of local decisions the master has not acknowledged yet (each numbered, so a
//! retry applies nothing twice) and the free block it wants per type. The master applies
//! the journal (an admitted agent's seat moves from the block to the seat table, a released
//! one goes back to the block), sizes the blocks, records it all in the ledger, then
//! answers [`Allotment`]: the free blocks it now counts for the slave, and the lease.
//!
//! What keeps the limit exact: the master counts every block as in use, so seats held
//! strictly plus every block never exceed the license; only the slave shrinks its own
//! block (it stops using what it asks to give back when it sends the request); the master
//! grows a block only from free seats; a hello or a reclaim empties it (the slave stops
//! admitting locally while its hello is in flight). A slave admits from its block only
//! until `lease_ms` after it *sent* the request the last answer was for.
//!
//! No seat stays stranded in a block while a registration is refused: a registration the
//! master decides strictly that finds no free seat while seats counted against the same
//! limit sit free in connected slaves' blocks is answered `Decision::Rejected` with
//! `retry_after_ms`; the holders are told to give back (`ShrinkAllotment` to half, or
//! `ReturnAllotment` near exhaustion), and the slave asks again until a seat is free or the
//! hint stops (2 refresh intervals after a holder was told, if it never answers).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::messages::RejectedAgent;

/// How a master decides registrations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Every registration is a request to the master, decided and recorded one by one.
    #[default]
    Strict,
    /// Slaves admit from blocks of seats the master allots them (see the module doc).
    Allotment,
    /// A mode this build does not know: served as strict.
    #[serde(other)]
    Other,
}

impl Admission {
    pub fn token(self) -> &'static str {
        match self {
            Admission::Strict => "strict",
            Admission::Allotment => "allotment",
            Admission::Other => "other",
        }
    }
}

impl std::fmt::Display for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.token())
    }
}

/// Most journal entries in one [`AllotRequest`]; a slave with more sends them over several
/// requests.
pub const MAX_ALLOT_OPS: usize = 512;
/// Most agent types one [`AllotRequest`] may ask blocks of.
pub const MAX_ALLOT_TYPES: usize = 64;

/// One local decision of the slave, numbered in its instance's journal (from 1, one more
/// per entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllotOp {
    pub n: u64,
    pub kind: AllotOpKind,
    pub agent_id: String,
    pub agent_type: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllotOpKind {
    /// The slave admitted the agent from its block.
    Admit,
    /// The slave released the agent's seat (admitted from a block or granted strictly).
    Release,
    #[serde(other)]
    Other,
}

/// `lmbus.v1.<cluster>.slave.<id>.allot`: the slave's unacknowledged journal and the free
/// block it wants per agent type. Answered with `Reply::Allotment`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllotRequest {
    /// The slave instance (as in its hello): a request from another instance is refused.
    pub instance: Uuid,
    /// Per instance, from 1, one more per allot request (retries included: a retry is a
    /// new request with the journal sent again). The master refuses a number at or below
    /// the last it processed, so a replayed or delayed request cannot roll a block back.
    pub seq: u64,
    /// Journal entries in order; those the master has already applied are skipped.
    #[serde(default)]
    pub ops: Vec<AllotOp>,
    /// The free block the slave wants per agent type after the journal is applied. A type
    /// it does not name is wanted at 0. The slave uses no more than this from the moment
    /// it sends the request.
    #[serde(default)]
    pub want: BTreeMap<String, u32>,
}

/// The master's answer to an [`AllotRequest`], sent only after it is in the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allotment {
    /// The free seats the master now counts as the slave's, per agent type, with every
    /// journal entry up to `journal` applied.
    pub blocks: BTreeMap<String, u32>,
    /// The slave may admit from `blocks` until this long after it sent the request.
    pub lease_ms: u64,
    /// The last journal entry the master has applied.
    pub journal: u64,
    /// Admissions the master did not accept (no block of that type, an unknown type): the
    /// slave logs these agents out.
    #[serde(default)]
    pub refused: Vec<RejectedAgent>,
    /// The free pool is nearly empty: blocks do not grow, and the slave should ask for
    /// seats one by one (strictly) until this clears.
    #[serde(default)]
    pub exhausted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn an_unknown_mode_reads_as_other_and_the_default_is_strict() {
        #[derive(Serialize, Deserialize)]
        struct W {
            #[serde(default)]
            a: Admission,
        }
        #[derive(Serialize)]
        struct New {
            a: &'static str,
        }
        let w: W = decode(&encode(&New { a: "quantum" }).unwrap()).unwrap();
        assert_eq!(w.a, Admission::Other);
        #[derive(Serialize)]
        struct Old {}
        let w: W = decode(&encode(&Old {}).unwrap()).unwrap();
        assert_eq!(w.a, Admission::Strict);
    }

    #[test]
    fn requests_and_answers_round_trip() {
        let request = AllotRequest {
            instance: Uuid::new_v4(),
            seq: 3,
            ops: vec![AllotOp {
                n: 7,
                kind: AllotOpKind::Admit,
                agent_id: "a1".into(),
                agent_type: "inbound".into(),
            }],
            want: [("inbound".to_owned(), 4)].into(),
        };
        assert_eq!(
            decode::<AllotRequest>(&encode(&request).unwrap()).unwrap(),
            request
        );
        let answer = Allotment {
            blocks: [("inbound".to_owned(), 4)].into(),
            lease_ms: 10_000,
            journal: 7,
            refused: vec![],
            exhausted: false,
        };
        assert_eq!(
            decode::<Allotment>(&encode(&answer).unwrap()).unwrap(),
            answer
        );
    }
}
