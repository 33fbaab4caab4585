//! The engine every fuzz target drives: a 6-seat master license (4 inbound), unlicensed
//! slaves allowed, at most 16 slaves, a rate limit of 50/s and a cap of 3 seats per slave.

use std::time::Duration;

use lmbus_broker::engine::{Engine, EngineConfig};
use lmbus_schemas::*;

pub fn engine() -> Engine {
    let key = VendorKey::from_bytes(&[7; 32]);
    let license = License {
        id: uuid::Uuid::nil(),
        customer: "fuzz".into(),
        issued: time::macros::date!(2026 - 01 - 01),
        expires: time::macros::date!(2027 - 12 - 31),
        maintenance_expires: time::macros::date!(2027 - 12 - 31),
        role: Role::Master,
        context: Context::Production,
        sync_within_days: None,
        limits: Limits {
            total: Some(6),
            local: None,
            agent_types: [("inbound".to_owned(), 4)].into_iter().collect(),
        },
    };
    Engine::new(EngineConfig {
        broker_id: "fuzz".into(),
        cluster: "fuzz".into(),
        license,
        vendor_key: key.verifying_key(),
        allow_unlicensed_slaves: true,
        missed_heartbeats: 3,
        counts_interval: Duration::from_secs(60),
        expiry_warning_days: 30,
        max_slaves: 16,
        reclaim_margin: Duration::from_secs(40),
        slave_rate_limit: 50,
        max_agents_per_slave: 3,
        allot: Default::default(),
        forget_after: Duration::from_secs(600),
    })
}
