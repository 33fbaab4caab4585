//! Prometheus metrics of one slave agent, served by the daemon's local API on
//! `GET /metrics` (and by [`crate::SlaveAgent::metrics_text`] for library hosts, without
//! the `process_*` metrics, which are the host's to export). README.md's "Metrics" section
//! lists every metric; the names follow the broker's conventions (`_total` only on
//! counters, units as suffixes, a `reason` label only on rejections).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lmbus_schemas::metrics::{
    Counter, DECISION_BUCKETS, Histogram, ProcessSample, build_info, escape_label, histogram_header,
};

use crate::master::{Master, PerMaster};
use crate::status::{SlaveMode, SlaveStatusView};

#[derive(Debug, Default)]
pub(crate) struct SlaveMetrics {
    /// Registrations approved (sharded atomics: the local decision's path takes no lock
    /// here, and threads do not share a line),
    /// and rejected by reason.
    approved: Counter,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    unregistrations: Counter,
    /// Agents moved from a backup master back to production (the handback).
    moved_back: AtomicU64,
    latency: Histogram,
    /// Per master (primary, secondary, backup): from sending a request to the master's
    /// answer.
    master: PerMaster<Histogram>,
    /// Allotment mode: registrations that waited for seats of other slaves' blocks being
    /// given back, from the first request told to ask again to the answer (the time
    /// capacity took to move to this slave's registration).
    allot_wait: Histogram,
    /// Allotment mode: registrations admitted from an allotted block, from the library call
    /// (or from its turn at the agent, when it had to wait for it) to the answer, with
    /// microsecond buckets.
    local_decision: Decisions,
}

/// A histogram with [`DECISION_BUCKETS`].
#[derive(Debug)]
struct Decisions(Histogram);

impl Default for Decisions {
    fn default() -> Self {
        Self(Histogram::with_bounds(&DECISION_BUCKETS))
    }
}

impl SlaveMetrics {
    pub(crate) fn registration(&self, reason: Option<&'static str>, took: Duration) {
        match reason {
            None => {
                self.approved.add(1);
            }
            Some(r) => {
                *self
                    .rejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(r)
                    .or_insert(0) += 1;
            }
        }
        self.latency.observe(took);
    }

    /// A master answered a request (one of those a coalesced message carried counts as
    /// its own request) `took` after it was sent.
    pub(crate) fn master_answer(&self, master: Master, took: Duration) {
        self.master.get(master).observe(took);
    }

    /// A registration waited `took` for seats of other blocks being given back.
    pub(crate) fn allot_wait(&self, took: Duration) {
        self.allot_wait.observe(took);
    }

    /// A registration was admitted from an allotted block `took` after it was asked.
    pub(crate) fn local_decision(&self, took: Duration) {
        self.local_decision.0.observe(took);
    }

    pub(crate) fn unregistration(&self) {
        self.unregistrations.add(1);
    }

    pub(crate) fn moved_back(&self, agents: u32) {
        self.moved_back
            .fetch_add(u64::from(agents), Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub(crate) fn render(&self, status: &SlaveStatusView) -> String {
        let mut t = String::from(
            "# HELP lmbus_slave_registrations_total Registrations answered to the host, by outcome and reject reason.\n\
             # TYPE lmbus_slave_registrations_total counter\n",
        );
        // A reason only on a rejection: an approval has none, rather than an empty one.
        let _ = writeln!(
            t,
            "lmbus_slave_registrations_total{{outcome=\"approved\"}} {}",
            self.approved.get()
        );
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (reason, n) in rejected {
            let _ = writeln!(
                t,
                "lmbus_slave_registrations_total{{outcome=\"rejected\",reason=\"{reason}\"}} {n}"
            );
        }
        histogram_header(
            &mut t,
            "lmbus_slave_registration_seconds",
            "From the host's call to its answer.",
        );
        self.latency
            .render(&mut t, "lmbus_slave_registration_seconds", "");
        histogram_header(
            &mut t,
            "lmbus_slave_allot_wait_seconds",
            "Allotment mode: registrations that found no free seat while seats of slaves' blocks were given back, from the first request told to ask again to the answer.",
        );
        self.allot_wait
            .render(&mut t, "lmbus_slave_allot_wait_seconds", "");
        histogram_header(
            &mut t,
            "lmbus_slave_local_decision_seconds",
            "Allotment mode: registrations admitted here from an allotted block, from the call (or from the agent's turn, when it waited for it) to the answer; buckets from 1 µs.",
        );
        self.local_decision
            .0
            .render(&mut t, "lmbus_slave_local_decision_seconds", "");
        histogram_header(
            &mut t,
            "lmbus_slave_master_seconds",
            "From sending a request to a master to its answer, per request (coalesced ones each count).",
        );
        for m in &status.masters {
            let Some(master) = Master::ALL.into_iter().find(|x| x.name() == m.name) else {
                continue;
            };
            self.master.get(master).render(
                &mut t,
                "lmbus_slave_master_seconds",
                &format!("master=\"{}\"", m.name),
            );
        }
        let _ = writeln!(
            t,
            "# HELP lmbus_slave_unregistrations_total Agents released by the host.\n\
             # TYPE lmbus_slave_unregistrations_total counter\n\
             lmbus_slave_unregistrations_total {}\n\
             # HELP lmbus_slave_seats_in_use Seats held by this slave's agents.\n\
             # TYPE lmbus_slave_seats_in_use gauge\n\
             lmbus_slave_seats_in_use {}\n\
             # HELP lmbus_slave_agent_type_seats_in_use Seats held by this slave's agents, by agent type.\n\
             # TYPE lmbus_slave_agent_type_seats_in_use gauge",
            self.unregistrations.get(),
            status.agents
        );
        for (agent_type, n) in &status.agents_by_type {
            let label = escape_label(agent_type);
            let _ = writeln!(
                t,
                "lmbus_slave_agent_type_seats_in_use{{agent_type=\"{label}\"}} {n}"
            );
        }
        t.push_str(
            "# HELP lmbus_slave_master_connected 1 while that master answers.\n\
             # TYPE lmbus_slave_master_connected gauge\n",
        );
        for m in &status.masters {
            let _ = writeln!(
                t,
                "lmbus_slave_master_connected{{master=\"{}\"}} {}",
                m.name,
                u8::from(m.connected)
            );
        }
        t.push_str(
            "# HELP lmbus_slave_master_seats Seats each master holds for this slave, with its license context (production or backup: where the slave is served).\n\
             # TYPE lmbus_slave_master_seats gauge\n",
        );
        for m in &status.masters {
            let context = m.context.map_or("unknown", |c| c.token());
            let _ = writeln!(
                t,
                "lmbus_slave_master_seats{{master=\"{}\",context=\"{context}\"}} {}",
                m.name, m.agents
            );
        }
        let _ = writeln!(
            t,
            "# HELP lmbus_slave_moved_back_total Agents moved from a backup master back to the primary (the handback).\n\
             # TYPE lmbus_slave_moved_back_total counter\n\
             lmbus_slave_moved_back_total {}",
            self.moved_back.load(Ordering::Relaxed)
        );
        t.push_str(
            "# HELP lmbus_slave_mode 1 for the current mode: connected, grace or restricted.\n\
             # TYPE lmbus_slave_mode gauge\n",
        );
        for mode in SlaveMode::ALL {
            let _ = writeln!(
                t,
                "lmbus_slave_mode{{mode=\"{mode}\"}} {}",
                u8::from(status.mode == mode)
            );
        }
        let _ = writeln!(
            t,
            "# HELP lmbus_slave_local_decisions_total Registrations admitted here from an allotted block, with no message (allotment mode).\n\
             # TYPE lmbus_slave_local_decisions_total counter\n\
             lmbus_slave_local_decisions_total {}\n\
             # HELP lmbus_slave_allot_journal_entries Local decisions the master has not acknowledged yet (allotment mode).\n\
             # TYPE lmbus_slave_allot_journal_entries gauge\n\
             lmbus_slave_allot_journal_entries {}\n\
             # HELP lmbus_slave_agent_type_seats_allotted_free Free seats of the active master's blocks this slave may admit from now, by agent type (allotment mode).\n\
             # TYPE lmbus_slave_agent_type_seats_allotted_free gauge",
            status.local_decisions, status.journal_unacked
        );
        for (agent_type, n) in &status.allotted {
            let label = escape_label(agent_type);
            let _ = writeln!(
                t,
                "lmbus_slave_agent_type_seats_allotted_free{{agent_type=\"{label}\"}} {n}"
            );
        }
        build_info(
            &mut t,
            lmbus_nats::release::VERSION,
            lmbus_nats::release::COMMIT,
            lmbus_nats::release::BUILD_DATE,
        );
        t
    }
}

/// This process's `process_*` metrics, read from Linux's `/proc` (empty elsewhere), for
/// the daemon's `/metrics`.
pub(crate) fn process_text() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count() as u64);
    let mut text = String::new();
    ProcessSample::parse(
        &read("/proc/self/stat"),
        &read("/proc/self/status"),
        &read("/proc/stat"),
        &read("/proc/self/limits"),
        open_fds,
    )
    .render(&mut text);
    text
}
