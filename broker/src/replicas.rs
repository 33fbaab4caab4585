//! The leader's view of its fellow broker replicas, from the `ReplicaBeat`s every replica
//! publishes: who is up, and the alerts when one joins or is lost. Pure: time comes in.
//!
//! A new leader first listens for `settle` without alerting (it does not know who was up
//! before it), then reports the redundancy state once; from then on every join, loss,
//! drain and undrain is an alert followed by the new state. Only standbys that are not
//! drained count as able to take over.
//!
//! [`NoLeaderWatch`] runs on every replica: when the replicas up are all drained and none
//! leads, there is no leader to raise an alert, so one of them raises the critical one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lmbus_schemas::{Alert, AlertKind, ReplicaBeat, ReplicaStatus, Severity};

#[derive(Debug)]
struct Seen {
    beat: ReplicaBeat,
    at: Instant,
}

#[derive(Debug)]
pub struct Replicas {
    me: String,
    /// A replica not heard from for this long is lost.
    timeout: Duration,
    settled_at: Instant,
    settled: bool,
    seen: BTreeMap<String, Seen>,
}

impl Replicas {
    pub fn new(me: &str, now: Instant, timeout: Duration, settle: Duration) -> Self {
        Self {
            me: me.to_owned(),
            timeout,
            settled_at: now + settle,
            settled: false,
            seen: BTreeMap::new(),
        }
    }

    fn alert(&self, severity: Severity, kind: AlertKind, message: String) -> Alert {
        let mut alert = Alert::new(severity, kind, message);
        alert.source = self.me.clone();
        alert
    }

    /// The redundancy state as an alert: a warning when no standby that can lead is up.
    fn state(&self) -> Alert {
        let others = || self.seen.iter().filter(|(r, _)| **r != self.me);
        let standbys: Vec<&str> = others()
            .filter(|(_, s)| !s.beat.drained)
            .map(|(r, _)| r.as_str())
            .collect();
        let drained: Vec<&str> = others()
            .filter(|(_, s)| s.beat.drained)
            .map(|(r, _)| r.as_str())
            .collect();
        let up = standbys.len() + drained.len() + 1;
        let replicas = if up == 1 {
            "1 broker replica up".to_owned()
        } else {
            format!("{up} broker replicas up")
        };
        let drained = if drained.is_empty() {
            String::new()
        } else {
            format!(", drained {} (they will not lead)", drained.join(", "))
        };
        if standbys.is_empty() {
            self.alert(
                Severity::Warning,
                AlertKind::Redundancy,
                format!(
                    "{replicas}: {} leading, no standby that can lead{drained}. If it fails, no master answers: slaves keep their agents for their grace period, then restrict, until a replica that can lead starts (or one is undrained)",
                    self.me
                ),
            )
        } else {
            self.alert(
                Severity::Info,
                AlertKind::Redundancy,
                format!(
                    "{replicas}: {} leading, standby {}{drained}",
                    self.me,
                    standbys.join(", ")
                ),
            )
        }
    }

    /// A beat arrived.
    pub fn observe(&mut self, now: Instant, beat: ReplicaBeat) -> Vec<Alert> {
        let name = beat.replica.clone();
        let drained = beat.drained;
        let before = self
            .seen
            .insert(name.clone(), Seen { beat, at: now })
            .map(|s| s.beat.drained);
        if !self.settled || name == self.me {
            return Vec::new();
        }
        match before {
            None => {
                let priority = self.seen.get(&name).map_or(0, |s| s.beat.priority);
                let what = if drained {
                    "drained (it will not lead)"
                } else {
                    "a standby"
                };
                vec![
                    self.alert(
                        Severity::Info,
                        AlertKind::ReplicaJoined,
                        format!("broker replica {name} (priority {priority}) joined as {what}"),
                    ),
                    self.state(),
                ]
            }
            // Drained or undrained: the replica's own alert said so; this is the new state.
            Some(was) if was != drained => vec![self.state()],
            Some(_) => Vec::new(),
        }
    }

    /// Periodic check: lost replicas, and the first state report once settled.
    pub fn sweep(&mut self, now: Instant) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let timeout = self.timeout;
        let me = self.me.clone();
        let lost: Vec<(String, Duration)> = self
            .seen
            .iter()
            .filter(|(name, s)| **name != me && now.saturating_duration_since(s.at) > timeout)
            .map(|(name, s)| (name.clone(), now.saturating_duration_since(s.at)))
            .collect();
        for (name, silent) in &lost {
            self.seen.remove(name);
            if self.settled {
                alerts.push(self.alert(
                    Severity::Warning,
                    AlertKind::ReplicaLost,
                    format!(
                        "broker replica {name} lost: not heard from for {}",
                        lmbus_schemas::human::duration(*silent)
                    ),
                ));
            }
        }
        if !self.settled && now >= self.settled_at {
            self.settled = true;
            alerts.push(self.state());
        } else if self.settled && !lost.is_empty() {
            alerts.push(self.state());
        }
        alerts
    }

    pub fn status(&self, now: Instant) -> Vec<ReplicaStatus> {
        self.seen
            .values()
            .map(|s| ReplicaStatus {
                replica: s.beat.replica.clone(),
                priority: s.beat.priority,
                leader: s.beat.replica == self.me,
                applied: s.beat.applied,
                drained: s.beat.drained,
                last_seen_ms_ago: now.saturating_duration_since(s.at).as_millis() as u64,
            })
            .collect()
    }
}

/// Every replica's watch for a cluster where replicas are up but none can lead (all
/// drained, none leading): pure, time comes in.
#[derive(Debug)]
pub struct NoLeaderWatch {
    me: String,
    cluster: String,
    /// A replica not heard from for this long is not up.
    timeout: Duration,
    /// How long the cluster must stay so before the alert (an election in progress is
    /// not news).
    grace: Duration,
    seen: BTreeMap<String, Seen>,
    /// Since when every replica up is drained and none leads.
    since: Option<Instant>,
    alerted: bool,
}

impl NoLeaderWatch {
    pub fn new(me: &str, cluster: &str, timeout: Duration, grace: Duration) -> Self {
        Self {
            me: me.to_owned(),
            cluster: cluster.to_owned(),
            timeout,
            grace,
            seen: BTreeMap::new(),
            since: None,
            alerted: false,
        }
    }

    pub fn observe(&mut self, now: Instant, beat: ReplicaBeat) {
        self.seen
            .insert(beat.replica.clone(), Seen { beat, at: now });
    }

    /// The critical alert, once per stretch without a possible leader, from the replica
    /// with the smallest id among those up.
    pub fn sweep(&mut self, now: Instant) -> Option<Alert> {
        let timeout = self.timeout;
        self.seen
            .retain(|_, s| now.saturating_duration_since(s.at) <= timeout);
        let stuck =
            !self.seen.is_empty() && self.seen.values().all(|s| s.beat.drained && !s.beat.leader);
        if !stuck {
            self.since = None;
            self.alerted = false;
            return None;
        }
        let since = *self.since.get_or_insert(now);
        let first = self.seen.keys().next().is_some_and(|r| *r == self.me);
        if self.alerted || !first || now.saturating_duration_since(since) < self.grace {
            return None;
        }
        self.alerted = true;
        let up: Vec<&str> = self.seen.keys().map(String::as_str).collect();
        let mut alert = Alert::new(
            Severity::Critical,
            AlertKind::Redundancy,
            format!(
                "no broker replica can lead cluster {}: the replicas up ({}) are all drained, so no master answers; slaves keep their agents for their grace period, then restrict. Run `lmbus-broker admin undrain --replica {}`, or start a replica",
                self.cluster,
                up.join(", "),
                self.me
            ),
        );
        alert.source = self.me.clone();
        Some(alert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(name: &str, priority: u32) -> ReplicaBeat {
        ReplicaBeat {
            replica: name.into(),
            priority,
            leader: name == "b1",
            applied: 0,
            drained: false,
            context: None,
            license: None,
        }
    }

    /// A drained standby is shown drained and does not count: the redundancy state warns
    /// that no standby can lead; undrained, it counts again.
    #[test]
    fn a_drained_standby_does_not_count() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = Replicas::new("b1", t0, ms(750), ms(100));
        r.observe(t0, beat("b1", 1));
        r.observe(t0, beat("b2", 2));
        assert_eq!(r.sweep(t0 + ms(100))[0].severity, Severity::Info);
        let drained = ReplicaBeat {
            drained: true,
            ..beat("b2", 2)
        };
        let state = r.observe(t0 + ms(200), drained.clone());
        assert_eq!(state.len(), 1, "{state:?}");
        assert_eq!(state[0].severity, Severity::Warning);
        assert!(
            state[0]
                .message
                .contains("no standby that can lead, drained b2"),
            "{}",
            state[0].message
        );
        assert!(r.observe(t0 + ms(300), drained).is_empty(), "said once");
        let b2 = r.status(t0 + ms(300));
        assert!(b2.iter().any(|s| s.replica == "b2" && s.drained));
        let back = r.observe(t0 + ms(400), beat("b2", 2));
        assert_eq!(back[0].severity, Severity::Info);
        assert!(
            back[0].message.contains("standby b2"),
            "{}",
            back[0].message
        );
    }

    /// When every replica up is drained and none leads, the one with the smallest id raises
    /// one critical alert after the grace; a leader (or an undrained replica) ends it.
    #[test]
    fn no_replica_can_lead_is_critical_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let drained = |name: &str| ReplicaBeat {
            replica: name.into(),
            priority: 1,
            leader: false,
            applied: 0,
            drained: true,
            context: None,
            license: None,
        };
        let mut b1 = NoLeaderWatch::new("b1", "acme", ms(750), ms(1000));
        let mut b2 = NoLeaderWatch::new("b2", "acme", ms(750), ms(1000));
        for w in [&mut b1, &mut b2] {
            w.observe(t0, drained("b1"));
            w.observe(t0, drained("b2"));
            assert!(w.sweep(t0).is_none(), "not before the grace");
        }
        for at in [ms(500), ms(1000)] {
            b1.observe(t0 + at, drained("b1"));
            b1.observe(t0 + at, drained("b2"));
            b2.observe(t0 + at, drained("b1"));
            b2.observe(t0 + at, drained("b2"));
        }
        let alert = b1.sweep(t0 + ms(1000)).expect("b1 alerts");
        assert_eq!(alert.severity, Severity::Critical);
        assert!(
            alert.message.contains("(b1, b2) are all drained"),
            "{}",
            alert.message
        );
        assert!(
            b2.sweep(t0 + ms(1000)).is_none(),
            "only the first replica alerts"
        );
        assert!(b1.sweep(t0 + ms(1100)).is_none(), "once");
        b1.observe(t0 + ms(1200), beat("b1", 1));
        assert!(b1.sweep(t0 + ms(1200)).is_none());
        assert!(b1.since.is_none() && !b1.alerted);
    }

    #[test]
    fn settles_then_alerts_on_join_and_loss() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = Replicas::new("b1", t0, ms(750), ms(1000));
        assert!(r.observe(t0, beat("b1", 1)).is_empty());
        assert!(r.observe(t0 + ms(100), beat("b2", 2)).is_empty());
        assert!(r.sweep(t0 + ms(500)).is_empty());
        // Settled: one state report, b1 leading with standby b2.
        r.observe(t0 + ms(900), beat("b2", 2));
        r.observe(t0 + ms(900), beat("b1", 1));
        let first = r.sweep(t0 + ms(1000));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].kind, AlertKind::Redundancy);
        assert!(
            first[0].message.contains("2 broker replicas up"),
            "{}",
            first[0].message
        );
        // b3 joins.
        let joined = r.observe(t0 + ms(1100), beat("b3", 3));
        assert_eq!(joined[0].kind, AlertKind::ReplicaJoined);
        assert!(joined[1].message.contains("3 broker replicas up"));
        assert_eq!(r.status(t0 + ms(1100)).len(), 3);
        // b2 and b3 go silent: both lost, then a warning that no standby is left.
        r.observe(t0 + ms(2000), beat("b1", 1));
        let lost = r.sweep(t0 + ms(2000));
        let kinds: Vec<AlertKind> = lost.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [
                AlertKind::ReplicaLost,
                AlertKind::ReplicaLost,
                AlertKind::Redundancy
            ]
        );
        assert_eq!(lost[2].severity, Severity::Warning);
        // The leader itself is never lost.
        assert!(r.sweep(t0 + ms(2100)).is_empty());
    }
}
