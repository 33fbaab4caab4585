//! Reading what a JetStream stream holds, up to its last message at the call: the alert
//! stream for the usage report and the audit, the ledger for the audit.

use std::time::Duration;

use futures::StreamExt;
use time::OffsetDateTime;

/// What to check when a JetStream reader stalls part way.
pub const FLOW_CONTROL_HINT: &str = "check that this NATS user may publish on $JS.FC.> (JetStream flow control; see deploy/nats-server.conf) and that the NATS server is reachable";
/// Why a stream could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    /// The stream, its consumer or a message failed at the NATS level.
    #[error("cannot read stream {stream}: {detail}")]
    Nats { stream: String, detail: String },
    /// Delivery stopped part way: a partial answer must not pass for the whole one.
    #[error(
        "stream {stream} stopped delivering after {read} of {pending} records: {FLOW_CONTROL_HINT}"
    )]
    Stalled {
        stream: String,
        read: u64,
        pending: u64,
    },
}

/// A stream's stored messages from `since` (or its first) up to its last message now.
#[derive(Debug, Default)]
pub struct Stored {
    /// The stream's first stored sequence (above 1 when older messages were removed).
    pub first_sequence: u64,
    /// Each message's stream sequence, store time (Unix ms) and payload, in order.
    pub messages: Vec<(u64, i64, bytes::Bytes)>,
}

/// Reads stream `name`'s messages stored since `since` (all when `None`) up to its last
/// message at the call, through an ordered consumer.
pub async fn stored(
    js: &async_nats::jetstream::Context,
    name: &str,
    since: Option<OffsetDateTime>,
) -> Result<Stored, StoredError> {
    stored_matching(js, name, since, None).await
}

/// [`stored`], of only the messages whose subject matches `filter` (a subject with
/// wildcards, within the stream's): it stops once the messages that matched when it
/// started are read.
pub async fn stored_matching(
    js: &async_nats::jetstream::Context,
    name: &str,
    since: Option<OffsetDateTime>,
    filter: Option<&str>,
) -> Result<Stored, StoredError> {
    let mut messages = Vec::new();
    let first_sequence = stored_each(js, name, since, filter, |message| {
        messages.push(message);
    })
    .await?;
    Ok(Stored {
        first_sequence,
        messages,
    })
}

/// [`stored_matching`], handing each message (sequence, publish time in Unix ms, payload)
/// to `each` as it is read instead of holding them all (the dashboard's history reads a
/// month of counts this way); returns the stream's first sequence.
pub async fn stored_each(
    js: &async_nats::jetstream::Context,
    name: &str,
    since: Option<OffsetDateTime>,
    filter: Option<&str>,
    mut each: impl FnMut((u64, i64, bytes::Bytes)),
) -> Result<u64, StoredError> {
    use async_nats::jetstream::consumer::{DeliverPolicy, push};
    let nats = |e: &dyn std::fmt::Display| StoredError::Nats {
        stream: name.to_owned(),
        detail: e.to_string(),
    };
    let mut stream = js.get_stream(name).await.map_err(|e| nats(&e))?;
    let state = stream.info().await.map_err(|e| nats(&e))?.state.clone();
    if state.messages == 0 {
        return Ok(state.first_sequence);
    }
    let deliver_policy = match since {
        Some(start_time) => DeliverPolicy::ByStartTime { start_time },
        None => DeliverPolicy::All,
    };
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: js_inbox(js),
            deliver_policy,
            filter_subject: filter.unwrap_or_default().to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|e| nats(&e))?;
    // What the consumer has to deliver from its start: nothing when no message is newer
    // than `since`.
    let pending = consumer.cached_info().num_pending;
    if pending == 0 {
        return Ok(state.first_sequence);
    }
    let mut read = 0u64;
    let mut messages = consumer.messages().await.map_err(|e| nats(&e))?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let message = match next {
            Ok(Some(message)) => message.map_err(|e| nats(&e))?,
            // A partial answer must not pass for the whole one.
            _ => {
                return Err(StoredError::Stalled {
                    stream: name.to_owned(),
                    read,
                    pending,
                });
            }
        };
        let info = message.info().map_err(|e| StoredError::Nats {
            stream: name.to_owned(),
            detail: format!("a message without metadata: {e}"),
        })?;
        let (sequence, published) = (info.stream_sequence, info.published);
        let time_ms = (published.unix_timestamp_nanos() / 1_000_000) as i64;
        let done = match filter {
            None => sequence >= state.last_sequence,
            // The last message may not match: count what matched at the start instead.
            Some(_) => info.pending == 0 || read + 1 >= pending,
        };
        each((sequence, time_ms, message.payload.clone()));
        read += 1;
        if done {
            break;
        }
    }
    Ok(state.first_sequence)
}

fn js_inbox(js: &async_nats::jetstream::Context) -> String {
    js.client().new_inbox()
}
