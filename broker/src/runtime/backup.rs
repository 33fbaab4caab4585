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
//! - One backup license serves at one backup master at a time: every replica says on
//!   production's `backups` subject which backup license it runs and how long its watch has
//!   run (`BackupBeat`, four times per lease). A backup that hears, within one lease,
//!   another backup cluster with the same license up longer (equal: the smaller cluster
//!   name) refuses `license_in_use`, with a critical alert, until that one is silent. A
//!   newly started backup hears the older one during its first lease, when it refuses
//!   anyway, so it never serves beside it.
//!
//! The leader hands what it knows to the engine before every event
//! (`Leader::set_wall_clock`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lmbus_schemas::human::duration;
use lmbus_schemas::{
    Alert, AlertKind, BackupBeat, RejectReason, ReplicaBeat, Severity, Subjects, decode, printable,
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
    /// Other backup clusters heard running this backup's own license, by cluster name.
    rivals: BTreeMap<String, Rival>,
}

/// Another backup cluster that runs the same backup license, as last heard.
#[derive(Debug, Clone)]
struct Rival {
    at: Instant,
    /// How long its watch had run when it beat.
    up: Duration,
    replica: String,
}

/// Most rival backup clusters remembered (names come from the network).
const MAX_RIVALS: usize = 16;

/// Shared between the watch task and the leader loop.
#[derive(Debug, Clone)]
pub(super) struct ProductionWatch {
    pub(super) cluster: String,
    pub(super) backs: Uuid,
    /// This backup master's own cluster and license.
    own_cluster: String,
    license: Uuid,
    /// Since when the backup listens: until it has listened for a lease it does not know
    /// whether production is alive, so it does not serve.
    since: Instant,
    heard: Arc<Mutex<Heard>>,
}

impl ProductionWatch {
    pub(super) fn new(cluster: String, backs: Uuid, own_cluster: String, license: Uuid) -> Self {
        Self {
            cluster,
            backs,
            own_cluster,
            license,
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
        if let Some((cluster, rival)) = self.older_rival(&heard, within) {
            return Some((
                RejectReason::LicenseInUse,
                format!(
                    "backup cluster {cluster} (replica {}) runs the same backup license {} and has been up longer ({}, this one {}): one backup license serves at one backup master at a time",
                    rival.replica,
                    self.license,
                    duration(rival.up),
                    duration(self.up())
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

    /// Whether production's leader beat within `within` (the backup's overlap counts while
    /// it holds seats then).
    pub(super) fn production_heard(&self, within: Duration) -> bool {
        self.heard.lock().is_ok_and(|h| {
            h.leader
                .as_ref()
                .is_some_and(|(at, _)| now().saturating_duration_since(*at) <= within)
        })
    }

    /// How long this watch has run.
    fn up(&self) -> Duration {
        now().saturating_duration_since(self.since)
    }

    /// A backup cluster with this backup's license, heard within `within`, that serves
    /// before this one: up longer, or as long with a smaller name.
    fn older_rival<'h>(&self, heard: &'h Heard, within: Duration) -> Option<(&'h str, &'h Rival)> {
        let at = now();
        let up = self.up();
        heard
            .rivals
            .iter()
            .filter(|(_, r)| at.saturating_duration_since(r.at) <= within)
            .find(|(cluster, r)| {
                let theirs = r.up + at.saturating_duration_since(r.at);
                serves_first((theirs, cluster), (up, &self.own_cluster))
            })
            .map(|(cluster, r)| (cluster.as_str(), r))
    }

    /// Notes another backup cluster's beat; `Some(older)`: a cluster not heard within
    /// `within` before, and whether it serves before this one.
    fn observe_backup(&self, beat: &BackupBeat, within: Duration) -> Option<bool> {
        if beat.cluster == self.own_cluster || beat.license != self.license {
            return None;
        }
        let Ok(mut heard) = self.heard.lock() else {
            return None;
        };
        let at = now();
        heard
            .rivals
            .retain(|_, r| at.saturating_duration_since(r.at) <= within);
        let cluster: String = printable(&beat.cluster).chars().take(64).collect();
        let new = !heard.rivals.contains_key(&cluster);
        if new && heard.rivals.len() >= MAX_RIVALS {
            return None;
        }
        heard.rivals.insert(
            cluster.clone(),
            Rival {
                at,
                up: Duration::from_millis(beat.up_ms),
                replica: printable(&beat.replica).chars().take(64).collect(),
            },
        );
        new.then(|| {
            self.older_rival(&heard, within)
                .is_some_and(|(c, _)| c == cluster)
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

/// Of two backup clusters with one backup license, whether `a` (up, cluster name) serves
/// before `b`: up longer, or as long with the smaller name.
fn serves_first(a: (Duration, &str), b: (Duration, &str)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
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
    let (subject, backups) = match Subjects::new(&watch.cluster) {
        Ok(s) => (s.replica(), s.backups()),
        Err(e) => return deaf(e.to_string()).await,
    };
    let mut beats = match io.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => return deaf(format!("cannot subscribe to {subject}: {e}")).await,
    };
    let mut rivals = match io.client.subscribe(backups.clone()).await {
        Ok(s) => s,
        Err(e) => return deaf(format!("cannot subscribe to {backups}: {e}")).await,
    };
    let mut every = tokio::time::interval(lease / 4);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {
                let beat = BackupBeat {
                    cluster: watch.own_cluster.clone(),
                    replica: io.broker_id.clone(),
                    license: watch.license,
                    up_ms: u64::try_from(watch.up().as_millis()).unwrap_or(u64::MAX),
                };
                io.send(backups.clone(), &beat, "backup beat").await;
                continue;
            }
            msg = rivals.next() => match msg {
                Some(msg) => {
                    if let Ok(beat) = decode::<BackupBeat>(&msg.payload) {
                        if let Some(older) = watch.observe_backup(&beat, lease) {
                            rival_alert(&io, &watch, &beat, older).await;
                        }
                    }
                    continue;
                }
                None => return deaf(format!("the subscription to {backups} ended")).await,
            },
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

/// Another backup cluster runs this backup's license: critical on the one that yields
/// (it refuses every slave while the other beats), a warning on the one that goes on.
async fn rival_alert(io: &Io, watch: &ProductionWatch, beat: &BackupBeat, older: bool) {
    let other = printable(&beat.cluster);
    let (severity, what) = if older {
        (
            Severity::Critical,
            format!(
                "it refuses every slave (license_in_use) while {other} beats: stop one of the two, or give one a backup license of its own"
            ),
        )
    } else {
        (
            Severity::Warning,
            format!(
                "this one has been up longer and goes on serving; {other} refuses every slave while this one beats"
            ),
        )
    };
    io.alert(Alert::new(
        severity,
        AlertKind::LicenseRefused,
        format!(
            "backup master {} (cluster {}) and backup cluster {other} (replica {}) both run backup license {}, which backs production license {}: {what}",
            io.broker_id,
            watch.own_cluster,
            printable(&beat.replica),
            watch.license,
            watch.backs
        ),
    ))
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(cluster: &str, license: Uuid, up_ms: u64) -> BackupBeat {
        BackupBeat {
            cluster: cluster.into(),
            replica: "r1".into(),
            license,
            up_ms,
        }
    }

    #[test]
    fn the_backup_up_longer_serves_and_the_other_refuses_license_in_use() {
        let lease = Duration::from_secs(1);
        let (backs, license) = (Uuid::new_v4(), Uuid::new_v4());
        let watch = ProductionWatch::new("prod".into(), backs, "dr-b".into(), license);
        let reason = |w: &ProductionWatch| w.refusal(lease).map(|(r, why, _)| (r, why));
        // Its own cluster's beats and other licenses' are not rivals.
        assert_eq!(
            watch.observe_backup(&beat("dr-b", license, 10_000), lease),
            None
        );
        assert_eq!(
            watch.observe_backup(&beat("dr-x", Uuid::new_v4(), 10_000), lease),
            None
        );
        // A younger rival: this one goes on (no refusal for that reason).
        assert_eq!(
            watch.observe_backup(&beat("dr-c", license, 0), lease),
            Some(false)
        );
        assert!(
            !reason(&watch).is_some_and(|(r, _)| r == RejectReason::LicenseInUse),
            "{:?}",
            reason(&watch)
        );
        // An older one: refused, naming it; heard again, it is not new.
        assert_eq!(
            watch.observe_backup(&beat("dr-a", license, 60_000), lease),
            Some(true)
        );
        assert_eq!(
            watch.observe_backup(&beat("dr-a", license, 60_250), lease),
            None
        );
        let (r, why) = reason(&watch).unwrap();
        assert_eq!(r, RejectReason::LicenseInUse);
        assert!(why.contains("backup cluster dr-a "), "{why}");
        // Names from the network are bounded in number.
        for i in 0..2 * MAX_RIVALS {
            watch.observe_backup(&beat(&format!("dr-{i}"), license, 0), lease);
        }
        assert!(watch.heard.lock().unwrap().rivals.len() <= MAX_RIVALS);
    }

    #[test]
    fn equal_uptimes_are_decided_by_the_smaller_cluster_name() {
        let up = Duration::from_secs(5);
        assert!(serves_first((up, "dr-a"), (up, "dr-b")));
        assert!(!serves_first((up, "dr-b"), (up, "dr-a")));
        assert!(serves_first(
            (up, "dr-z"),
            (up - Duration::from_millis(1), "dr-a")
        ));
        assert!(!serves_first((up, "dr-a"), (up, "dr-a")), "never both");
    }
}
