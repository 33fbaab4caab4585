//! The durable alert log: a JetStream stream that captures every alert the master
//! publishes (`lmbus.v1.<cluster>.alert.>`), kept by age and size, so that
//! `lmbus-monitor tail --since/--last` can read what happened while nobody watched.
//!
//! Alerts are still published with plain NATS publish: the stream captures them on the
//! server, and a broker never waits on it.

use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::stream;
use lmbus_schemas::Subjects;

use crate::jetstream::{js_context, open_stream};

/// How long alerts are kept by default.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 86_400);
/// How many bytes of alerts are kept by default (the oldest go first).
pub const DEFAULT_MAX_BYTES: i64 = 1 << 30;

/// Creates the cluster's alert stream if it does not exist (an existing one keeps its
/// settings).
pub async fn open(
    client: &Client,
    subjects: &Subjects,
    replicas: usize,
    max_age: Duration,
    max_bytes: i64,
) -> anyhow::Result<String> {
    let name = subjects.alert_stream();
    open_stream(
        &js_context(client),
        stream::Config {
            name: name.clone(),
            description: Some(format!(
                "lmbus alerts of cluster {}, kept {} days or {} MiB",
                subjects.cluster(),
                max_age.as_secs() / 86_400,
                max_bytes >> 20
            )),
            subjects: vec![subjects.all_alerts()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age,
            max_bytes,
            ..Default::default()
        },
        "alert",
        |name| format!("the broker needs permission to use $JS.API.STREAM.CREATE/INFO for {name}"),
    )
    .await?;
    Ok(name)
}
