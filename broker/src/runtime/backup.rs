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
//!   run (`BackupBeat`, four times per lease). A cluster's age is the longest of its
//!   replicas' heard within a lease (its own included), so every replica of both clusters
//!   compares the same two ages. A backup that hears another backup cluster with the same
//!   license older by more than a lease (within a lease of each other: the smaller cluster
//!   name wins) refuses `license_in_use`, with a critical alert, until that one is silent. A
//!   newly started backup hears the older one during its first lease, when it refuses
//!   anyway, so it never serves beside it.
//!
//! - The beats of the backup's leader carry the seats it holds. A production master listens
//!   on its own `backups` subject ([`BackupsWatch`]): the time it holds seats while a backup
//!   heard within a lease holds some is production's overlap, in its usage report (the
//!   backup counts its own: seats held while it hears production's leader).
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
    /// Backup replicas heard running this backup's own license (this cluster's too), by
    /// (cluster, replica): when, and how long its watch had run then.
    backups: BTreeMap<(String, String), (Instant, Duration)>,
}

/// Most backup replicas remembered (names come from the network).
const MAX_BACKUPS: usize = 64;

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
    /// The seats this replica's engine holds, and when the leader said so (only a leader
    /// does, before every event): its beats carry them while that is within a lease.
    held: Arc<Mutex<Option<(Instant, u32)>>>,
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
            held: Arc::new(Mutex::new(None)),
        }
    }

    /// The leader: the seats this backup master holds now (its beats tell production).
    pub(super) fn set_held(&self, seats: u32) {
        if let Ok(mut held) = self.held.lock() {
            *held = Some((now(), seats));
        }
    }

    /// The seats a leader said within `within` (`None`: this replica does not lead).
    fn held(&self, within: Duration) -> Option<u32> {
        self.held.lock().ok().and_then(|held| {
            held.filter(|(at, _)| now().saturating_duration_since(*at) <= within)
                .map(|(_, seats)| seats)
        })
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
        if let Some((cluster, theirs, ours)) = self.older_rival(&heard, within) {
            return Some((
                RejectReason::LicenseInUse,
                format!(
                    "backup cluster {cluster} runs the same backup license {} and serves first (up {}, this cluster {}): one backup license serves at one backup master at a time",
                    self.license,
                    duration(theirs),
                    duration(ours)
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

    /// Each backup cluster heard within `within` (this one included) with its age now: the
    /// longest up of its replicas.
    fn ages(&self, heard: &Heard, within: Duration) -> BTreeMap<String, Duration> {
        let at = now();
        let mut ages = BTreeMap::from([(self.own_cluster.clone(), self.up())]);
        for ((cluster, _), (then, up)) in &heard.backups {
            let since = at.saturating_duration_since(*then);
            if since <= within {
                let age = ages.entry(cluster.clone()).or_default();
                *age = (*age).max(*up + since);
            }
        }
        ages
    }

    /// Another backup cluster with this backup's license, heard within `within`, that
    /// serves before this one; with its age and this cluster's.
    fn older_rival(&self, heard: &Heard, within: Duration) -> Option<(String, Duration, Duration)> {
        let mut ages = self.ages(heard, within);
        let ours = ages.remove(&self.own_cluster).unwrap_or_default();
        ages.into_iter()
            .find(|(cluster, theirs)| {
                serves_first((*theirs, cluster), (ours, &self.own_cluster), within)
            })
            .map(|(cluster, theirs)| (cluster, theirs, ours))
    }

    /// Notes a backup replica's beat; `Some(older)`: another cluster not heard within
    /// `within` before, and whether it serves before this one.
    /// `license`: the backup license in force here now (a reload may have changed its id).
    fn observe_backup(&self, beat: &BackupBeat, license: Uuid, within: Duration) -> Option<bool> {
        if beat.license != license {
            return None;
        }
        let Ok(mut heard) = self.heard.lock() else {
            return None;
        };
        let at = now();
        heard
            .backups
            .retain(|_, (then, _)| at.saturating_duration_since(*then) <= within);
        let cluster: String = printable(&beat.cluster).chars().take(64).collect();
        let replica: String = printable(&beat.replica).chars().take(64).collect();
        let new = cluster != self.own_cluster && !heard.backups.keys().any(|(c, _)| *c == cluster);
        let key = (cluster.clone(), replica);
        if !heard.backups.contains_key(&key) && heard.backups.len() >= MAX_BACKUPS {
            return None;
        }
        heard
            .backups
            .insert(key, (at, Duration::from_millis(beat.up_ms)));
        new.then(|| {
            self.older_rival(&heard, within)
                .is_some_and(|(c, _, _)| c == cluster)
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

/// Of two backup clusters with one backup license, whether `a` (age, cluster name) serves
/// before `b`: older by more than `margin`, or within it of each other with the smaller name
/// (the margin absorbs how late each heard the other's beats, so both sides agree).
fn serves_first(a: (Duration, &str), b: (Duration, &str), margin: Duration) -> bool {
    if a.0 > b.0 + margin {
        true
    } else if b.0 > a.0 + margin {
        false
    } else {
        a.1 < b.1
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
                    license: io.metrics.license_id().unwrap_or(watch.license),
                    up_ms: u64::try_from(watch.up().as_millis()).unwrap_or(u64::MAX),
                    seats: watch.held(lease),
                    backs: Some(watch.backs),
                };
                io.send(backups.clone(), &beat, "backup beat").await;
                continue;
            }
            msg = rivals.next() => match msg {
                Some(msg) => {
                    if let Ok(beat) = decode::<BackupBeat>(&msg.payload) {
                        let license = io.metrics.license_id().unwrap_or(watch.license);
                        if let Some(older) = watch.observe_backup(&beat, license, lease) {
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

/// Each backup leader heard, by (cluster, replica): when, and the seats it said it holds.
type LeadersHeard = BTreeMap<(String, String), (Instant, u32)>;

/// A production master's view of its backup masters: the seats each backup leader said it
/// holds, heard on the production cluster's `backups` subject.
#[derive(Debug, Clone, Default)]
pub(super) struct BackupsWatch {
    heard: Arc<Mutex<LeadersHeard>>,
}

impl BackupsWatch {
    /// Notes a backup leader's beat, if it backs `license` (production's license in
    /// force); a standby's says no seats and changes nothing.
    fn observe(&self, beat: &BackupBeat, license: Uuid, within: Duration) {
        if beat.backs != Some(license) {
            return;
        }
        let (Some(seats), Ok(mut heard)) = (beat.seats, self.heard.lock()) else {
            return;
        };
        let at = now();
        heard.retain(|_, (then, _)| at.saturating_duration_since(*then) <= within);
        let key = (
            printable(&beat.cluster).chars().take(64).collect(),
            printable(&beat.replica).chars().take(64).collect(),
        );
        if heard.contains_key(&key) || heard.len() < MAX_BACKUPS {
            heard.insert(key, (at, seats));
        }
    }

    /// Whether a backup master heard within `within` holds seats.
    pub(super) fn in_use(&self, within: Duration) -> bool {
        self.heard.lock().is_ok_and(|heard| {
            heard
                .values()
                .any(|(at, seats)| *seats > 0 && now().saturating_duration_since(*at) <= within)
        })
    }
}

/// A production master listens to its backups' beats until `stop` (for its overlap). If it
/// cannot subscribe it counts no overlap, and a warning says so.
pub(super) async fn watch_backups(
    io: Io,
    watch: BackupsWatch,
    lease: Duration,
    stop: CancellationToken,
) {
    let subject = io.subjects.backups();
    let mut beats = match io.client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            io.alert(Alert::new(
                Severity::Warning,
                AlertKind::LicenseRefused,
                format!(
                    "production master {} cannot subscribe to {subject} ({e}): its usage reports count no overlap with backup masters",
                    io.broker_id
                ),
            ))
            .await;
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = beats.next() => match msg {
                Some(msg) => {
                    if let (Ok(beat), Some(license)) =
                        (decode::<BackupBeat>(&msg.payload), io.metrics.license_id())
                    {
                        watch.observe(&beat, license, lease);
                    }
                }
                None => return,
            },
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
                "this cluster serves first and goes on serving; {other} refuses every slave while this one beats"
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

    fn beat(cluster: &str, replica: &str, license: Uuid, up_ms: u64) -> BackupBeat {
        BackupBeat {
            cluster: cluster.into(),
            replica: replica.into(),
            license,
            up_ms,
            seats: None,
            backs: None,
        }
    }

    /// Production's view of its backups: in use while a backup leader heard within a lease
    /// says it holds seats; a standby's beat (no seats) changes nothing; names are bounded.
    #[test]
    fn production_sees_a_backup_in_use_from_its_leaders_beats() {
        let lease = Duration::from_millis(200);
        let watch = BackupsWatch::default();
        let (license, production) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(!watch.in_use(lease));
        let mut leader = beat("dr", "d1", license, 1_000);
        leader.backs = Some(production);
        leader.seats = Some(0);
        watch.observe(&leader, production, lease);
        let mut standby = beat("dr", "d2", license, 1_000);
        standby.backs = Some(production);
        watch.observe(&standby, production, lease);
        assert!(!watch.in_use(lease), "the backup holds nothing");
        leader.seats = Some(2);
        watch.observe(&leader, Uuid::new_v4(), lease);
        assert!(
            !watch.in_use(lease),
            "a backup of another production license"
        );
        watch.observe(&leader, production, lease);
        assert!(watch.in_use(lease));
        std::thread::sleep(lease + Duration::from_millis(50));
        assert!(!watch.in_use(lease), "not heard within a lease");
        for i in 0..2 * MAX_BACKUPS {
            let mut b = beat(&format!("dr-{i}"), "r", license, 0);
            b.seats = Some(1);
            b.backs = Some(production);
            watch.observe(&b, production, Duration::from_secs(60));
        }
        assert!(watch.heard.lock().unwrap().len() <= MAX_BACKUPS);
    }

    /// A backup's beats carry its seats only while its leader said them within a lease.
    #[test]
    fn a_backup_beat_carries_the_seats_its_leader_said() {
        let lease = Duration::from_millis(200);
        let watch =
            ProductionWatch::new("prod".into(), Uuid::new_v4(), "dr".into(), Uuid::new_v4());
        assert_eq!(watch.held(lease), None, "a standby says none");
        watch.set_held(3);
        assert_eq!(watch.held(lease), Some(3));
        std::thread::sleep(lease + Duration::from_millis(50));
        assert_eq!(watch.held(lease), None, "no longer leading");
    }

    #[test]
    fn the_older_backup_cluster_serves_and_the_other_refuses_license_in_use() {
        let lease = Duration::from_secs(1);
        let (backs, license) = (Uuid::new_v4(), Uuid::new_v4());
        let watch = ProductionWatch::new("prod".into(), backs, "dr-b".into(), license);
        let in_use = |w: &ProductionWatch| {
            w.refusal(lease)
                .filter(|(r, _, _)| *r == RejectReason::LicenseInUse)
                .map(|(_, why, _)| why)
        };
        // Other licenses' beats are not rivals; a younger rival: this one goes on.
        assert_eq!(
            watch.observe_backup(&beat("dr-x", "x1", Uuid::new_v4(), 10_000), license, lease),
            None
        );
        assert_eq!(
            watch.observe_backup(&beat("dr-c", "c1", license, 0), license, lease),
            Some(false)
        );
        assert_eq!(in_use(&watch), None);
        // An older one (by more than a lease): refused, naming it; heard again, not new.
        assert_eq!(
            watch.observe_backup(&beat("dr-a", "a1", license, 60_000), license, lease),
            Some(true)
        );
        assert_eq!(
            watch.observe_backup(&beat("dr-a", "a2", license, 2_000), license, lease),
            None
        );
        let why = in_use(&watch).unwrap();
        assert!(why.contains("backup cluster dr-a "), "{why}");
        // A replica of this cluster up longer than dr-a's oldest makes this cluster the
        // older: every replica of both clusters compares the same two ages.
        watch.observe_backup(&beat("dr-b", "b2", license, 120_000), license, lease);
        assert_eq!(in_use(&watch), None);
        // Names from the network are bounded in number.
        for i in 0..2 * MAX_BACKUPS {
            watch.observe_backup(&beat(&format!("dr-{i}"), "r", license, 0), license, lease);
        }
        assert!(watch.heard.lock().unwrap().backups.len() <= MAX_BACKUPS);
    }

    #[test]
    fn ages_within_the_margin_are_decided_by_the_smaller_cluster_name() {
        let (up, margin) = (Duration::from_secs(5), Duration::from_secs(1));
        let a_bit = Duration::from_millis(300);
        assert!(serves_first((up, "dr-a"), (up + a_bit, "dr-b"), margin));
        assert!(!serves_first((up + a_bit, "dr-b"), (up, "dr-a"), margin));
        assert!(serves_first(
            (up + 2 * margin, "dr-z"),
            (up, "dr-a"),
            margin
        ));
        assert!(!serves_first(
            (up, "dr-a"),
            (up + 2 * margin, "dr-z"),
            margin
        ));
        assert!(
            !serves_first((up, "dr-a"), (up, "dr-a"), margin),
            "never both"
        );
    }
}
