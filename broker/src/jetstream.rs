//! The broker's JetStream plumbing, shared by the ledger, the snapshots, the election lease
//! and the alert log: one context with a short API timeout, and opening (or creating) a
//! stream with an error that names the stream and what the broker needs to use it.

use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, Context, stream};
use futures::StreamExt;
use tokio::sync::watch;

/// How long a JetStream API request may take. Short, so that while a stream elects a new
/// leader (a NATS node died) the broker retries instead of hanging on one request.
pub const JS_TIMEOUT: Duration = Duration::from_secs(2);

/// A JetStream context with [`JS_TIMEOUT`].
pub fn js_context(client: &Client) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(JS_TIMEOUT)
        .build(client.clone())
}

/// Where nats-server announces a stream's new leader.
pub fn leader_elected_subject(stream: &str) -> String {
    format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}")
}

/// News of JetStream electing a leader for one of `streams`, from the server's advisories
/// ([`leader_elected_subject`]): a count that grows with each. After a NATS node died, a
/// wait for a stream that has no leader yet ends on it rather than on a timeout or a
/// back-off, so what lmbus adds to NATS's own election is one round trip. Without
/// permission to subscribe (see `deploy/nats-server.conf`) the count never moves and the
/// timeouts alone apply.
pub async fn leader_news(client: &Client, streams: &[String]) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    let mut subscriptions = Vec::new();
    for stream in streams {
        match client.subscribe(leader_elected_subject(stream)).await {
            Ok(sub) => subscriptions.push(sub),
            Err(e) => {
                tracing::warn!(%stream, error = %e, "cannot follow JetStream's leader elections; relying on timeouts")
            }
        }
    }
    let mut all = futures::stream::select_all(subscriptions);
    tokio::spawn(async move {
        while let Some(msg) = all.next().await {
            tracing::debug!(subject = %msg.subject, "JetStream elected a stream leader");
            tx.send_modify(|n| *n += 1);
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// Waits for the next [`leader_news`] (pending forever once the news has stopped).
pub async fn next_news(news: &mut watch::Receiver<u64>) {
    if news.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A copy of `news` that waits for the news after now (a clone would see what its original
/// has not yet read).
pub fn fresh(news: &watch::Receiver<u64>) -> watch::Receiver<u64> {
    let mut copy = news.clone();
    copy.borrow_and_update();
    copy
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
