//! A sequence of slave messages, each decoded from fuzzer bytes, fed to the admission
//! engine as the broker does: whatever the bytes, the engine never panics and never goes
//! over a limit. Messages are separated by 0xC1, a byte MessagePack never uses; the first
//! byte of each picks the slave, the operation and how much time passes.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use lmbus_broker::engine::{Engine, Event};
use lmbus_schemas::*;

#[path = "common.rs"]
mod common;
use common::engine;


fuzz_target!(|data: &[u8]| {
    let mut engine = engine();
    let mut now = Instant::now();
    let today = time::macros::date!(2026 - 11 - 23);
    for part in data.split(|b| *b == 0xC1) {
        let Some((&first, body)) = part.split_first() else {
            continue;
        };
        let Ok(slave) = SlaveId::new(format!("s{}", first % 4)) else {
            continue;
        };
        now += Duration::from_millis(u64::from(first) * 50);
        let bad = |e: DecodeError| Event::BadMessage {
            subject: "fuzz".into(),
            slave: Some(slave.clone()),
            error: WireError::from(&e),
        };
        let event = match (first / 4) % 7 {
            0 => match decode::<Hello>(body) {
                Ok(hello) => Event::Hello {
                    slave: slave.clone(),
                    hello,
                    today,
                },
                Err(e) => bad(e),
            },
            1 => match decode::<RegisterRequest>(body) {
                Ok(request) => Event::Register {
                    slave: slave.clone(),
                    request,
                },
                Err(e) => bad(e),
            },
            2 => match decode::<UnregisterRequest>(body) {
                Ok(request) => Event::Unregister {
                    slave: slave.clone(),
                    request,
                },
                Err(e) => bad(e),
            },
            3 => match decode::<Heartbeat>(body) {
                Ok(heartbeat) => Event::Heartbeat {
                    slave: slave.clone(),
                    heartbeat,
                },
                Err(e) => bad(e),
            },
            4 => match decode::<SlaveReport>(body) {
                Ok(report) => Event::Report {
                    slave: slave.clone(),
                    report,
                },
                Err(e) => bad(e),
            },
            5 => match decode::<Goodbye>(body) {
                Ok(goodbye) => Event::Goodbye {
                    slave: slave.clone(),
                    goodbye,
                },
                Err(e) => bad(e),
            },
            _ => Event::Tick { today },
        };
        // A standby rebuilt from a snapshot taken before the event, applying the event's
        // ledger changes, holds the same seats as the engine after it.
        let mut standby = rebuilt(&engine);
        let out = engine.handle(now, event);
        for change in &out.changes {
            assert!(standby.apply(now, change).is_ok(), "{change:?}");
        }
        assert_eq!(standby.seats(), engine.seats());
        let status = engine.status(now);
        assert!(status.total_in_use <= status.total_limit);
        let sum: u32 = status.slaves.iter().map(|s| s.in_use).sum();
        assert_eq!(sum, status.total_in_use);
    }
});

/// An engine rebuilt from `source`'s snapshot: applying a snapshot never fails.
fn rebuilt(source: &Engine) -> Engine {
    let mut copy = engine();
    let now = Instant::now();
    for change in source.snapshot(3) {
        assert!(copy.apply(now, &change).is_ok(), "{change:?}");
    }
    assert_eq!(copy.seats(), source.seats());
    copy
}
