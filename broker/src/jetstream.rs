//! The broker's JetStream plumbing, shared by the ledger, the snapshots, the election lease
//! and the alert log: one context with a short API timeout, and opening (or creating) a
//! stream with an error that names the stream and what the broker needs to use it.

use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, Context, stream};

/// How long a JetStream API request may take. Short, so that while a stream elects a new
/// leader (a NATS node died) the broker retries instead of hanging on one request.
pub const JS_TIMEOUT: Duration = Duration::from_secs(2);

/// A JetStream context with [`JS_TIMEOUT`].
pub fn js_context(client: &Client) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(JS_TIMEOUT)
        .build(client.clone())
}

/// A stream the broker could neither open nor create.
#[derive(Debug, thiserror::Error)]
#[error("cannot open or create the {what} stream {name} ({replicas} replicas): {detail}; {hint}")]
pub struct OpenError {
    /// What the stream is for: `ledger`, `snapshot`, `election`, `alert`.
    pub what: &'static str,
    pub name: String,
    pub replicas: usize,
    /// The server's answer.
    pub detail: String,
    /// What to check.
    pub hint: String,
}

/// What to do when a single NATS server refuses a replicated stream: the permission hints
/// would be a red herring then.
pub const NOT_CLUSTERED_HINT: &str = "this NATS is not clustered: use --stream-replicas 1 (replicas above 1 need a NATS cluster with JetStream on at least that many servers)";

/// Opens stream `config.name`, creating it with `config` if it does not exist yet. `hint`
/// says what to check, unless the server refused the replicas because it is not clustered.
pub async fn open_stream(
    js: &Context,
    config: stream::Config,
    what: &'static str,
    hint: impl FnOnce(&str) -> String,
) -> Result<stream::Stream, OpenError> {
    let (name, replicas) = (config.name.clone(), config.num_replicas);
    js.get_or_create_stream(config).await.map_err(|e| {
        let not_clustered = matches!(
            e.kind(),
            jetstream::context::CreateStreamErrorKind::JetStream(ref js)
                if js.error_code() == jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
        );
        OpenError {
            what,
            hint: if not_clustered {
                NOT_CLUSTERED_HINT.to_owned()
            } else {
                hint(&name)
            },
            name,
            replicas,
            detail: e.to_string(),
        }
    })
}
