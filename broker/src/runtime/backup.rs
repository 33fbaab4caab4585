//! A backup master's watch on the production cluster it backs (`--production-cluster`):
//! it listens to that cluster's replica beats on its own NATS.
//!
//! - While a beat from production's leader arrived within one lease (`--lease`; replicas
//!   beat four times per lease, so use the same lease on both), production is alive and
//!   the backup refuses `production_available`; so it does during its first lease, before
//!   it can know, and for good if its subscription fails or ends (a critical alert says so).
//! - A production leader running another license than the one the backup license backs is
//!   alerted (critical), and the backup refuses `context_mismatch` until a beat names the
//!   backed license again.
//! - How long production has been available again decides the handback: once that is the
//!   whole `--handback-window`, the engine releases every seat the backup holds.
//!
//! The leader hands what it knows to the engine before every event
//! (`Leader::set_wall_clock`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lmbus_schemas::human::duration;
use lmbus_schemas::{
    Alert, AlertKind, RejectReason, ReplicaBeat, Severity, Subjects, decode, printable,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::clock::now;
use super::outbound::Io;

/// What a backup master last heard from the production cluster's leader.
#[derive(Debug, Clone, Default)]
pub(super) struct Heard {
    /// When, and which replica led.
    leader: Option<(Instant, String)>,
    /// Since when production has been heard without a silence longer than a lease.
    alive_since: Option<Instant>,
    /// Why the backup cannot hear production at all (its subscription failed or ended):
    /// it then never serves.
    deaf: Option<String>,
    /// The license production's leader runs, when it is not the one backed.
    other_license: Option<Uuid>,
}

/// Shared between the watch task and the leader loop.
#[derive(Debug, Clone)]
pub(super) struct ProductionWatch {
    pub(super) cluster: String,
    pub(super) backs: Uuid,
    /// Since when the backup listens: until it has listened for a lease it does not know
    /// whether production is alive, so it does not serve.
    since: Instant,
    heard: Arc<Mutex<Heard>>,
}

impl ProductionWatch {
    pub(super) fn new(cluster: String, backs: Uuid) -> Self {
        Self {
            cluster,
            backs,
            since: now(),
            heard: Arc::new(Mutex::new(Heard::default())),
        }
    }

    /// Why the backup may not serve now (`None`: it may): production's leader beat within
    /// `within`, or production runs another license than the backed one, or the backup
    /// cannot hear production at all; with how long production has been available.
    pub(super) fn refusal(&self, within: Duration) -> Option<(RejectReason, String, Duration)> {
        let Ok(heard) = self.heard.lock().map(|h| h.clone()) else {
            return Some((
                RejectReason::ProductionAvailable,
                "its watch on production failed".into(),
                Duration::ZERO,
            ));
        };
        if let Some(why) = heard.deaf {
            return Some((
                RejectReason::ProductionAvailable,
                format!(
                    "it cannot hear production cluster {}'s replica beats ({why})",
                    self.cluster
                ),
                Duration::ZERO,
            ));
        }
        if let Some(other) = heard.other_license {
            return Some((
                RejectReason::ContextMismatch,
                format!(
                    "this backup master's license backs production license {}, but production cluster {} runs license {other}: it is not a backup for it",
                    self.backs, self.cluster
                ),
                Duration::ZERO,
            ));
        }
        let Some((at, replica)) = heard.leader else {
            let listened = now().saturating_duration_since(self.since);
            return (listened <= within).then(|| {
                (
                    RejectReason::ProductionAvailable,
                    format!(
                        "it has listened for production cluster {}'s leader for {} only, less than one lease ({}): production may be available",
                        self.cluster,
                        duration(listened),
                        duration(within)
                    ),
                    Duration::ZERO,
                )
            });
        };
        let ago = now().saturating_duration_since(at);
        let alive_for = heard
            .alive_since
            .map_or(Duration::ZERO, |s| now().saturating_duration_since(s));
        (ago <= within).then(|| {
            (
                RejectReason::ProductionAvailable,
                format!(
                    "production cluster {}'s leader {replica} beat {} ago (available for {})",
                    self.cluster,
                    duration(ago),
                    duration(alive_for)
                ),
                alive_for,
            )
        })
    }

    /// The watch cannot hear production: the backup never serves.
    fn deaf(&self, why: String) {
        if let Ok(mut heard) = self.heard.lock() {
            heard.deaf = Some(why);
        }
    }

    fn observe(&self, beat: &ReplicaBeat, within: Duration) -> Option<Uuid> {
        let Ok(mut heard) = self.heard.lock() else {
            return None;
        };
        if !beat.leader {
            return None;
        }
        let at = now();
        let was_silent = heard
            .leader
            .as_ref()
            .is_none_or(|(last, _)| at.saturating_duration_since(*last) > within);
        if was_silent {
            heard.alive_since = Some(at);
        }
        heard.leader = Some((at, printable(&beat.replica).chars().take(64).collect()));
        let other = beat.license.filter(|l| *l != self.backs);
        let new = other.is_some() && other != heard.other_license;
        heard.other_license = other;
        new.then_some(other).flatten()
    }
}

/// Listens to the production cluster's replica beats until `stop`. If it cannot (the
/// subscription fails or ends), the backup never serves, and a critical alert says so.
pub(super) async fn watch_production(
    io: Io,
    watch: ProductionWatch,
    lease: Duration,
    stop: CancellationToken,
) {
    let deaf = |why: String| {
        let (io, watch) = (io.clone(), watch.clone());
        async move {
            watch.deaf(why.clone());
            io.alert(Alert::new(
                Severity::Critical,
                AlertKind::LicenseRefused,
                format!(
                    "backup master {} cannot hear production cluster {}'s replica beats ({why}): it refuses every slave until restarted (check that its NATS user may subscribe to lmbus.v1.{}.replica)",
                    io.broker_id, watch.cluster, watch.cluster
                ),
            ))
            .await;
        }
    };
    let subject = match Subjects::new(&watch.cluster) {
        Ok(s) => s.replica(),
        Err(e) => return deaf(e.to_string()).await,
    };
    let mut beats = match io.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => return deaf(format!("cannot subscribe to {subject}: {e}")).await,
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            msg = beats.next() => match msg {
                Some(msg) => msg,
                None => return deaf(format!("the subscription to {subject} ended")).await,
            },
        };
        let Ok(beat) = decode::<ReplicaBeat>(&msg.payload) else {
            continue;
        };
        if let Some(other) = watch.observe(&beat, lease) {
            io.alert(Alert::new(
                Severity::Critical,
                AlertKind::LicenseRefused,
                format!(
                    "backup master {} has a license that backs production license {}, but production cluster {}'s leader {} runs license {other}: this backup refuses every slave (context_mismatch) until production runs the license it backs",
                    io.broker_id,
                    watch.backs,
                    watch.cluster,
                    printable(&beat.replica)
                ),
            ))
            .await;
        }
    }
}
