//! What a site controls, from fuzzer bytes, through the leader's whole intake as the
//! runtime runs it: the subject's operation, the reply subject and the payload go through
//! `Intake::admit` (reply rule, budgets), `intake::decode` (envelope and `Validate`) and the
//! engine. Whatever the bytes: nothing panics, no limit is exceeded, nothing is answered
//! outside the slave's inbox, and no alert text carries a control character (ids, types and
//! report texts are validated before they reach one). Messages are separated by 0xC1 (never
//! used by MessagePack); in each, the first byte picks the slave, the operation and how much
//! time passes, then comes the reply subject up to a 0x00 byte, then the payload.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use lmbus_broker::engine::{Effect, Event};
use lmbus_broker::intake::{Budgets, Decoded, Intake, decode as decode_slave};
use lmbus_schemas::*;

#[path = "common.rs"]
mod common;
use common::engine;


fuzz_target!(|data: &[u8]| {
    let subjects = Subjects::new("fuzz").unwrap();
    let mut engine = engine();
    let mut intake = Intake::new(Budgets::for_rate_limit(50), "fuzz");
    let mut now = Instant::now();
    let today = time::macros::date!(2026 - 11 - 23);
    for part in data.split(|b| *b == 0xC1) {
        let Some((&first, rest)) = part.split_first() else {
            continue;
        };
        let Ok(slave) = SlaveId::new(format!("s{}", first % 4)) else {
            continue;
        };
        now += Duration::from_millis(u64::from(first % 8) * 100);
        let op = SlaveOp::ALL[usize::from(first / 8) % SlaveOp::ALL.len()];
        let (reply, payload) = match rest.iter().position(|b| *b == 0) {
            Some(i) => (Some(String::from_utf8_lossy(&rest[..i]).into_owned()), &rest[i + 1..]),
            None => (None, rest),
        };
        if intake.admit(now, &subjects, &slave, op, reply.as_deref()).is_err() {
            continue;
        }
        // Admitted: the reply subject (if any) is the slave's own inbox.
        if let Some(reply) = &reply {
            assert!(reply.starts_with(&format!("{}.", subjects.slave_inbox_prefix(&slave))));
        }
        let event = match decode_slave(payload, &slave, op, today) {
            Ok(Decoded::One(event)) => event,
            Ok(Decoded::Batch(request)) => Event::Batch {
                slave: slave.clone(),
                request,
            },
            Err(error) => {
                let _ = intake.bad(now, slave.as_str(), op.token(), &error.message);
                continue;
            }
        };
        let out = engine.handle(now, event);
        for effect in &out.effects {
            if let Effect::Alert(alert) = effect {
                assert!(!alert.message.contains('\u{1b}'), "{}", alert.message);
                assert!(!alert.message.contains('\n'), "{}", alert.message);
            }
        }
        let status = engine.status(now);
        assert!(status.total_in_use <= status.total_limit);
        let sum: u32 = status.slaves.iter().map(|s| s.in_use).sum();
        assert_eq!(sum, status.total_in_use);
        for alert in intake.summaries(now) {
            assert!(alert.message.len() < 1024, "{}", alert.message);
            assert!(!alert.message.contains('\u{1b}'), "{}", alert.message);
        }
    }
});
