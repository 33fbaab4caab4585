//! The usage report of one period, as the master publishes it on `report.usage`, answers
//! `admin report` with, and writes to files: summary counts only, never an agent id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One agent type's line (or the total's, named `total`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeUsage {
    pub agent_type: String,
    /// The license's limit for this type (`None`: no limit of its own).
    pub limit: Option<u32>,
    pub peak: u32,
    /// Time-weighted average of concurrent agents over the covered period.
    pub average: f64,
    /// Seat-hours over the covered period (the average times its hours); on a backup
    /// master's report, the backup seat-hours.
    #[serde(default)]
    pub seat_hours: f64,
}

/// A master's own account of the time production and a backup were both in use (the
/// overlap, which the handback window bounds and a split network does not). A backup
/// master counts the time it was in use while it heard the production master it backs; a
/// production master the time it was in use while a backup master's leader said it held
/// seats.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupUse {
    /// Minutes during which this master held seats while the other side was heard in use
    /// within one lease (on a backup: production's leader beat; on production: a backup's
    /// leader beat with seats held); counted by the replica that led then (a failover
    /// mid-period counts from the new leader's start).
    pub overlap_minutes: f64,
}

/// What happened to one slave during the period.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaveActivity {
    pub slave: String,
    pub connects: u64,
    pub disconnects: u64,
    pub rejections: u64,
    /// Times it restricted usage after its grace period ran out without a master.
    pub restricted_after_grace: u64,
}

/// Counts of the period's events, from the alert stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Events {
    pub slave_connects: u64,
    pub slave_disconnects: u64,
    pub slaves_refused: u64,
    pub restricted_after_grace: u64,
    pub seats_reclaimed: u64,
    pub seats_released_by_operator: u64,
    pub bad_messages: u64,
    pub leader_elections: u64,
}

/// The usage report of one period. It never names an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    pub cluster: String,
    /// The replica that wrote it.
    pub written_by: String,
    pub license_id: String,
    pub customer: String,
    /// The master license's context (production, backup, development): a backup master's
    /// report says backup.
    pub context: String,
    /// A development master's report: its usage is not for production use.
    #[serde(default)]
    pub not_for_production: bool,
    pub period_start: String,
    pub period_end: String,
    /// From when seat usage was counted: later than `period_start` when the writing replica
    /// started during the period (events are counted over the whole period regardless).
    pub usage_counted_from: String,
    /// A daily report (true) or one asked for with `admin report` (false).
    pub daily: bool,
    /// One line per agent type, then `total`.
    pub agent_types: Vec<TypeUsage>,
    /// Rejected registrations by reason (the master's and those slaves refused locally).
    pub rejections: BTreeMap<String, u64>,
    pub events: Events,
    pub slaves: Vec<SlaveActivity>,
    /// The overlap: always on a backup master's report; on a production master's only when
    /// it is not zero (absent on a development master's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupUse>,
    /// When this master held at least one seat: wall-clock spans, oldest first, disjoint,
    /// at most [`MAX_IN_USE_SPANS`] (past that, later spans are merged into the last one, so
    /// they may cover more than the seats did, never less). Two reports side by side show
    /// from these the minutes both were in use, which catches a split neither master heard.
    /// `None` from an older master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<Vec<Span>>,
}

/// Most spans a report's `in_use` lists (one a minute for a whole day).
pub const MAX_IN_USE_SPANS: usize = 1440;

/// A span of wall-clock time in Unix milliseconds, `from_ms` up to `to_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub from_ms: i64,
    pub to_ms: i64,
}

/// Milliseconds covered by both span lists (each oldest first and disjoint, as a report's
/// `in_use`).
pub fn overlap_ms(a: &[Span], b: &[Span]) -> u64 {
    let (mut i, mut j, mut total) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        let from = a[i].from_ms.max(b[j].from_ms);
        let to = a[i].to_ms.min(b[j].to_ms);
        if to > from {
            total += (to - from) as u64;
        }
        if a[i].to_ms < b[j].to_ms {
            i += 1;
        } else {
            j += 1;
        }
    }
    total
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    /// A report with every field set, for round trips.
    pub(crate) fn sample() -> UsageReport {
        UsageReport {
            cluster: "acme".into(),
            written_by: "b1".into(),
            license_id: "6f0c".into(),
            customer: "Acme".into(),
            context: "development".into(),
            not_for_production: true,
            period_start: "2026-11-26T00:00:00Z".into(),
            period_end: "2026-11-27T00:00:00Z".into(),
            usage_counted_from: "2026-11-26T00:00:00Z".into(),
            daily: true,
            agent_types: vec![TypeUsage {
                agent_type: "total".into(),
                limit: Some(5),
                peak: 3,
                average: 1.5,
                seat_hours: 36.0,
            }],
            rejections: BTreeMap::from([("aggregate_limit".to_owned(), 2)]),
            events: Events {
                slave_connects: 1,
                ..Events::default()
            },
            slaves: vec![SlaveActivity {
                slave: "s1".into(),
                connects: 1,
                ..SlaveActivity::default()
            }],
            backup: Some(BackupUse {
                overlap_minutes: 2.5,
            }),
            in_use: Some(vec![Span {
                from_ms: 1_000,
                to_ms: 61_000,
            }]),
        }
    }

    #[test]
    fn the_overlap_of_two_span_lists_counts_what_both_cover() {
        let spans = |s: &[(i64, i64)]| -> Vec<Span> {
            s.iter()
                .map(|&(from_ms, to_ms)| Span { from_ms, to_ms })
                .collect()
        };
        let production = spans(&[(0, 100), (200, 300), (400, 1000)]);
        let backup = spans(&[(50, 250), (900, 2000)]);
        // 50..100, 200..250, 900..1000
        assert_eq!(overlap_ms(&production, &backup), 200);
        assert_eq!(overlap_ms(&backup, &production), 200);
        assert_eq!(overlap_ms(&production, &[]), 0);
        assert_eq!(overlap_ms(&spans(&[(0, 10)]), &spans(&[(10, 20)])), 0);
    }

    #[test]
    fn a_report_round_trips_in_the_envelope() {
        let report = sample();
        assert_eq!(
            decode::<UsageReport>(&encode(&report).unwrap()).unwrap(),
            report
        );
    }
}
