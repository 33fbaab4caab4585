//! The leader's view of its fellow broker replicas, from the `ReplicaBeat`s every replica
//! publishes: who is up, and the alerts when one joins or is lost. Pure: time comes in.
//!
//! A new leader first listens for `settle` without alerting (it does not know who was up
//! before it), then reports the redundancy state once; from then on every join and loss
//! is an alert followed by the new state.

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

    /// The redundancy state as an alert: a warning when no standby is up.
    fn state(&self) -> Alert {
        let standbys: Vec<&str> = self
            .seen
            .keys()
            .filter(|r| **r != self.me)
            .map(String::as_str)
            .collect();
        let up = standbys.len() + 1;
        if standbys.is_empty() {
            self.alert(
                Severity::Warning,
                AlertKind::Redundancy,
                format!(
                    "1 broker replica up ({} leading, no standby): if it fails, slaves ride on their grace period until one starts",
                    self.me
                ),
            )
        } else {
            self.alert(
                Severity::Info,
                AlertKind::Redundancy,
                format!(
                    "{up} broker replicas up: {} leading, standby {}",
                    self.me,
                    standbys.join(", ")
                ),
            )
        }
    }

    /// A beat arrived.
    pub fn observe(&mut self, now: Instant, beat: ReplicaBeat) -> Vec<Alert> {
        let name = beat.replica.clone();
        let new = self
            .seen
            .insert(name.clone(), Seen { beat, at: now })
            .is_none();
        if !new || !self.settled || name == self.me {
            return Vec::new();
        }
        let priority = self.seen.get(&name).map_or(0, |s| s.beat.priority);
        vec![
            self.alert(
                Severity::Info,
                AlertKind::ReplicaJoined,
                format!("broker replica {name} (priority {priority}) joined as a standby"),
            ),
            self.state(),
        ]
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
                last_seen_ms_ago: now.saturating_duration_since(s.at).as_millis() as u64,
            })
            .collect()
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
        }
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
