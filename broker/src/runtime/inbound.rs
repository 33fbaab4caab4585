//! What the leader makes of a message before anything is sent (pure, no IO): a slave's
//! message through the intake, decoding and validation into the engine, an operator's admin
//! request decoded and decided, and the reply-subject check for status and admin requests.

use async_nats::Message;
use lmbus_schemas::{
    DecodeError, ForgetReply, ForgetRequest, ReleaseReply, ReleaseRequest, ReloadReply,
    ReloadRequest, Reply, SlaveOp, Subjects, WireError, decode,
};
use tracing::{debug, info};

use crate::engine::{Answer, Engine, Event, Output};
use crate::intake::{BadVerdict, Intake};

use super::clock::{now, today_utc};

/// Whether a status or admin request may be answered where it asks: an `_INBOX.` subject.
/// A request without a reply subject is served (admin actions are then simply unanswered).
pub(super) fn client_reply_ok(intake: &mut Intake, source: &str, msg: &Message) -> bool {
    match &msg.reply {
        Some(reply) if !lmbus_schemas::is_client_reply(reply) => {
            intake.foreign_client_reply(now(), source, reply);
            false
        }
        _ => true,
    }
}

/// A slave's message after intake and decoding: what to answer where, or nothing at all.
pub(super) struct Intook {
    /// Where the answer goes: the checked reply subject (`None`: no answer).
    pub(super) reply_to: Option<async_nats::Subject>,
    pub(super) out: Output,
    pub(super) op: Option<SlaveOp>,
}

/// Takes one slave message through the intake (reply subject, budgets), decoding and
/// validation, then the engine. `None`: dropped undecided (counted by the intake).
pub(super) fn handle_slave_message(
    engine: &mut Engine,
    intake: &mut Intake,
    subjects: &Subjects,
    msg: &Message,
) -> Option<Intook> {
    let at = now();
    let reply = msg.reply.as_ref().map(|r| r.as_str());
    let (slave, op) = match subjects.parse_slave_op(msg.subject.as_str()) {
        Ok(parsed) => parsed,
        Err(e) => {
            // The subscription (`slave.>`) gives `slave.<token>…`: the first token is the
            // sender (NATS permissions bind it) even when the rest is unknown.
            let sender = subjects.slave_of(msg.subject.as_str());
            let source = sender.as_ref().map_or("unknown slave", |s| s.as_str());
            let answer = intake.bad(at, source, "subject", &e.to_string());
            // An unknown operation (a newer slave's, say) is told so, in its own inbox.
            let home = sender
                .as_ref()
                .zip(reply)
                .is_some_and(|(s, r)| subjects.is_slave_reply(s, r));
            if answer != BadVerdict::Answer || !home {
                return None;
            }
            return Some(Intook {
                reply_to: msg.reply.clone(),
                out: Output {
                    reply: Some(Answer::Slave(Reply::Error(WireError {
                        code: lmbus_schemas::ErrorCode::Invalid,
                        message: e.to_string(),
                    }))),
                    ..Output::default()
                },
                op: None,
            });
        }
    };
    if intake.admit(at, subjects, &slave, op, reply).is_err() {
        return None;
    }
    let reply_to = msg.reply.clone();
    let out = match crate::intake::decode(msg.payload.as_ref(), &slave, op, today_utc()) {
        Ok(crate::intake::Decoded::One(event)) => {
            debug!(%slave, op = op.token(), "request");
            engine.handle(at, event)
        }
        Ok(crate::intake::Decoded::Batch(request)) => {
            if !intake.charge_batch(at, &slave, request.items.len()) {
                return None;
            }
            debug!(%slave, items = request.items.len(), "batch");
            engine.handle(at, Event::Batch { slave, request })
        }
        Err(problem) => {
            let answer = intake.bad(at, slave.as_str(), op.token(), &problem.message);
            let reply =
                (answer == BadVerdict::Answer).then_some(Answer::Slave(Reply::Error(problem)));
            return Some(Intook {
                reply_to: reply.as_ref().and(reply_to),
                out: Output {
                    reply,
                    ..Output::default()
                },
                op: None,
            });
        }
    };
    Some(Intook {
        reply_to,
        out,
        op: Some(op),
    })
}

/// An operator's request on an admin subject, decoded into the engine's event by `event`.
/// Undecodable input gets `refuse`'s answer and a `bad_message` alert.
fn admin_request<Req>(
    engine: &mut Engine,
    msg: &Message,
    event: impl FnOnce(Req) -> Event,
    refuse: impl FnOnce(String) -> Answer,
) -> Output
where
    Req: serde::de::DeserializeOwned,
{
    match decode::<Req>(&msg.payload) {
        Ok(request) => engine.handle(now(), event(request)),
        Err(e) => {
            let mut out = bad_message(engine, msg, &e);
            out.reply = Some(refuse(e.to_string()));
            out
        }
    }
}

/// An operator's release request: the reply, and the effects (the slave is told, an
/// alert) with the seat changes to record first.
pub(super) fn admin_release(engine: &mut Engine, msg: &Message) -> Output {
    admin_request(
        engine,
        msg,
        |request: ReleaseRequest| {
            info!(slave = %request.slave_id, agent = request.agent_id.as_deref().map(tracing::field::display), operator = %request.operator, "admin release");
            Event::Release { request }
        },
        |message| Answer::Release(ReleaseReply::Error { message }),
    )
}

/// An operator's `admin forget-slave`: the reply, and the alert with the `Forget` record to
/// write first.
pub(super) fn admin_forget(engine: &mut Engine, msg: &Message) -> Output {
    admin_request(
        engine,
        msg,
        |request: ForgetRequest| {
            info!(slave = %request.slave_id, operator = %request.operator, "admin forget-slave");
            Event::Forget { request }
        },
        |message| Answer::Forget(ForgetReply::Error { message }),
    )
}

/// An operator's license reload: the reply, and the alert with the ledger record to write
/// first.
pub(super) fn admin_reload(engine: &mut Engine, msg: &Message) -> Output {
    admin_request(
        engine,
        msg,
        |request: ReloadRequest| {
            info!(operator = %request.operator, "admin reload-license");
            Event::Reload {
                request,
                today: today_utc(),
            }
        },
        |message| Answer::Reload(ReloadReply::Error { message }),
    )
}

/// A message on a broker subject (not a slave's) that did not decode: the engine's
/// `bad_message` alert. Its reply, if any, is the caller's to give.
pub(super) fn bad_message(engine: &mut Engine, msg: &Message, error: &DecodeError) -> Output {
    let mut out = engine.handle(
        now(),
        Event::BadMessage {
            subject: msg.subject.to_string(),
            slave: None,
            error: WireError::from(error),
        },
    );
    out.reply = None;
    out
}
