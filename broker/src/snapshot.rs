//! Snapshots of the seat state, so that a replica that starts (or rebuilds) reads the
//! latest snapshot and only the ledger records after it, not the whole ledger.
//!
//! A snapshot is the state after ledger record `S` written as [`SeatChange`]s (see
//! [`crate::engine::Engine::snapshot`]) in [`SnapshotChunk`]s of at most [`CHUNK_BYTES`]
//! on one stream, then a [`SnapshotManifest`] naming them. Readers take the last manifest:
//! a snapshot whose manifest was never written does not exist, and a reader that finds a
//! chunk missing (a newer snapshot replaced it meanwhile) starts over. After a manifest is
//! stored, everything before the snapshot's first chunk is purged, so the stream holds one
//! snapshot.
//!
//! Works on nats-server 2.9: plain stream config, last-by-subject get, ordered consumer.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use async_nats::Client;
use async_nats::jetstream::{
    Context,
    consumer::{DeliverPolicy, push},
    message::PublishMessage,
    stream::{self, LastRawMessageErrorKind},
};
use futures::StreamExt;
use lmbus_schemas::{SeatChange, SnapshotChunk, SnapshotManifest, Subjects, decode, encode};

use crate::jetstream::{js_context, open_stream};
pub use crate::ledger::AGENTS_PER_CHANGE;

/// Largest chunk payload: under the codec's 256 KiB limit on any message it decodes (and
/// nats-server's 1 MB default `max_payload`).
pub const CHUNK_BYTES: usize = 224 * 1024;
/// How long reading one chunk may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The snapshot stream of one cluster.
#[derive(Debug, Clone)]
pub struct Snapshots {
    client: Client,
    js: Context,
    stream: String,
    chunk_subject: String,
    manifest_subject: String,
}

/// A snapshot read back: its manifest and every change, in order.
#[derive(Debug)]
pub struct Loaded {
    pub manifest: SnapshotManifest,
    pub changes: Vec<SeatChange>,
}

impl Snapshots {
    /// Opens the cluster's snapshot stream, creating it (file storage, `replicas` copies)
    /// if it does not exist yet.
    pub async fn open(
        client: &Client,
        subjects: &Subjects,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let js = js_context(client);
        let name = subjects.snapshot_stream();
        open_stream(
            &js,
            stream::Config {
                name: name.clone(),
                description: Some(format!(
                    "lmbus seat state snapshots of cluster {}: the latest one, in chunks, then its manifest",
                    subjects.cluster()
                )),
                subjects: vec![subjects.snapshot_subjects()],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                retention: stream::RetentionPolicy::Limits,
                ..Default::default()
            },
            "snapshot",
            |name| format!("the broker needs permission to use $JS.API.STREAM.* for {name}"),
        )
        .await?;
        Ok(Self {
            client: client.clone(),
            js,
            stream: name,
            chunk_subject: subjects.snapshot_chunk(),
            manifest_subject: subjects.snapshot_manifest(),
        })
    }

    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The latest complete snapshot's manifest, if any.
    pub async fn latest(&self) -> anyhow::Result<Option<SnapshotManifest>> {
        Ok(self.latest_stored().await?.map(|(manifest, _)| manifest))
    }

    /// The latest manifest and its stream sequence (which [`Self::write`] is fenced on).
    pub async fn latest_stored(&self) -> anyhow::Result<Option<(SnapshotManifest, u64)>> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .with_context(|| format!("cannot look up the snapshot stream {}", self.stream))?;
        match stream
            .get_last_raw_message_by_subject(&self.manifest_subject)
            .await
        {
            Ok(message) => decode::<SnapshotManifest>(&message.payload)
                .map(|manifest| Some((manifest, message.sequence)))
                .map_err(|e| anyhow!("the snapshot manifest cannot be decoded: {e}")),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(anyhow!(
                "cannot read the snapshot manifest from {}: {e}",
                self.stream
            )),
        }
    }

    /// Reads the latest snapshot (retrying once if a newer one replaced it while reading).
    pub async fn load_latest(&self) -> anyhow::Result<Option<Loaded>> {
        let mut tries = 0;
        loop {
            let Some(manifest) = self.latest().await? else {
                return Ok(None);
            };
            match self.read(&manifest).await {
                Ok(changes) => return Ok(Some(Loaded { manifest, changes })),
                Err(e) if tries < 2 => {
                    tries += 1;
                    tracing::debug!(error = %format!("{e:#}"), "reading a snapshot failed; reading the latest again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the chunks `manifest` names, checking that each one is there, in order.
    pub async fn read(&self, manifest: &SnapshotManifest) -> anyhow::Result<Vec<SeatChange>> {
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .with_context(|| format!("cannot look up the snapshot stream {}", self.stream))?;
        let consumer = stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: self.chunk_subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: manifest.first_chunk.max(1),
                },
                ..Default::default()
            })
            .await
            .with_context(|| format!("cannot read the snapshot stream {}", self.stream))?;
        let mut messages = consumer
            .messages()
            .await
            .with_context(|| format!("cannot read the snapshot stream {}", self.stream))?;
        let mut changes = Vec::new();
        for index in 0..manifest.chunks {
            let message = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => bail!("reading snapshot chunk {index}: {e}"),
                Ok(None) => bail!("the snapshot consumer ended at chunk {index}"),
                Err(_) => bail!("snapshot chunk {index} did not arrive within {READ_TIMEOUT:?}"),
            };
            let chunk = decode::<SnapshotChunk>(&message.payload)
                .map_err(|e| anyhow!("snapshot chunk {index} cannot be decoded: {e}"))?;
            if chunk.ledger_sequence != manifest.ledger_sequence || chunk.index != index {
                bail!(
                    "snapshot chunk {index} of the snapshot at ledger sequence {} is missing (found chunk {} of the snapshot at {})",
                    manifest.ledger_sequence,
                    chunk.index,
                    chunk.ledger_sequence
                );
            }
            changes.extend(chunk.changes);
        }
        Ok(changes)
    }

    /// Stores `changes` (the state after ledger record `ledger_sequence`) as the latest
    /// snapshot, then purges the older ones. The manifest is fenced on `after`, the stream
    /// sequence of the manifest the writer last saw (0: none), so of two replicas writing
    /// at once (a deposed leader's late snapshot) only one snapshot becomes the latest.
    pub async fn write(
        &self,
        ledger_sequence: u64,
        writer: &str,
        term: u64,
        changes: Vec<SeatChange>,
        after: u64,
    ) -> anyhow::Result<SnapshotManifest> {
        let mut slaves = 0u64;
        let mut seats = 0u64;
        for change in &changes {
            match change {
                SeatChange::Session { .. } => slaves += 1,
                SeatChange::Seats { agent_ids, .. } => seats += agent_ids.len() as u64,
                SeatChange::Grant { .. } => seats += 1,
                _ => {}
            }
        }
        let mut acks = Vec::new();
        let mut index = 0u32;
        let mut part: Vec<SeatChange> = Vec::new();
        let mut part_bytes = 0usize;
        let mut changes = changes.into_iter().peekable();
        while let Some(change) = changes.next() {
            part_bytes += change.size_bound();
            part.push(change);
            let full = changes
                .peek()
                .is_none_or(|next| part_bytes + next.size_bound() > CHUNK_BYTES);
            if full {
                let chunk = SnapshotChunk {
                    ledger_sequence,
                    index,
                    changes: std::mem::take(&mut part),
                };
                let payload =
                    encode(&chunk).map_err(|e| anyhow!("encoding a snapshot chunk: {e}"))?;
                let ack = self
                    .js
                    .publish(self.chunk_subject.clone(), payload.into())
                    .await
                    .with_context(|| format!("cannot write a snapshot chunk to {}", self.stream))?;
                acks.push(ack);
                index += 1;
                part_bytes = 0;
            }
        }
        let mut first_chunk = None;
        for ack in acks {
            let ack = ack
                .await
                .with_context(|| format!("a snapshot chunk was not stored in {}", self.stream))?;
            first_chunk.get_or_insert(ack.sequence);
        }
        let manifest = SnapshotManifest {
            ledger_sequence,
            chunks: index,
            first_chunk: first_chunk.unwrap_or(0),
            slaves,
            seats,
            writer: writer.to_owned(),
            term,
        };
        let payload =
            encode(&manifest).map_err(|e| anyhow!("encoding a snapshot manifest: {e}"))?;
        let message = PublishMessage::build()
            .payload(payload.into())
            .expected_last_subject_sequence(after);
        self.js
            .send_publish(self.manifest_subject.clone(), message)
            .await
            .with_context(|| format!("cannot write a snapshot manifest to {}", self.stream))?
            .await
            .with_context(|| format!("the snapshot manifest was not stored in {}", self.stream))?;
        // Older snapshots: a reader still on one finds a chunk missing and starts over.
        // (Purging "up to sequence 1" would purge everything: the server reads 0 and 1 as
        // "no bound".)
        if let Some(first) = first_chunk.filter(|first| *first > 1) {
            let stream =
                self.js.get_stream(&self.stream).await.with_context(|| {
                    format!("cannot look up the snapshot stream {}", self.stream)
                })?;
            stream
                .purge()
                .sequence(first)
                .await
                .with_context(|| format!("cannot purge older snapshots from {}", self.stream))?;
        }
        Ok(manifest)
    }
}
