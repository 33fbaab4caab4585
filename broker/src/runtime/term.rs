//! The start of a term as leader: catching up with the ledger (retrying while the lease
//! holds), fencing it with this term's `Leader` record, taking over (silence clocks, the
//! quarantined records' alert), subscribing and telling every slave `new_leader`; then the
//! [`Leader`] loop serves.

use lmbus_schemas::human::HumanDuration;
use std::future::Future;
use std::time::Duration;

use lmbus_schemas::{Alert, AlertKind, LedgerEntry, SeatChange, Severity};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ledger::{AppendError, Sent};

use super::clock::now;
use super::leader::{Leader, Led, Subscriptions, Term, lapsed, not_recorded, ready_again};
use super::replica::ApplyError;
use super::standby::{CatchUpError, catch_up};

/// Most attempts at a new leader's `Leader` record while the ledger stream is not writable
/// yet (each `CATCH_UP_RETRY` apart): only failed appends are retried, never fenced ones.
const MARKER_TRIES: u32 = 100;

/// Pause between a new leader's attempts to read a ledger that is not reachable yet.
const CATCH_UP_RETRY: Duration = Duration::from_millis(100);

/// Why a new leader did not catch up with the ledger.
enum NotCaughtUp {
    /// The term ended first (shutdown, the lease lost, a gap to rebuild from).
    Ended(Led),
    /// A record this replica cannot apply (another context's ledger, say): it stops.
    Refused(ApplyError),
}

impl From<Led> for NotCaughtUp {
    fn from(led: Led) -> Self {
        NotCaughtUp::Ended(led)
    }
}

impl Term<'_> {
    /// Catches up, fences the ledger with a `Leader` record, then serves slaves until the
    /// lease is lost, a ledger write fails or `shutdown` completes. `not_ready` is cleared
    /// once this replica serves.
    pub(super) async fn lead<S: Future<Output = ()> + Unpin>(
        mut self,
        shutdown: &mut S,
        not_ready: &watch::Sender<bool>,
    ) -> anyhow::Result<Led> {
        let started = Instant::now();
        let caught_up = match self.catch_up(shutdown).await {
            Ok(last) => last,
            Err(NotCaughtUp::Ended(end)) => return Ok(end),
            Err(NotCaughtUp::Refused(e)) => {
                super::refuse_ledger(self.io, self.cfg, e.is_context_mismatch(), e.to_string())
                    .await;
                return Err(e.into());
            }
        };
        if let Some(end) = self.write_marker(shutdown).await {
            return Ok(end);
        }
        self.take_over().await;
        let subscriptions = Subscriptions::open(self.io).await?;
        // Subscribed: tell every slave, so that a request still waiting on the previous
        // leader (frozen, say) is sent here now rather than after its timeout. Sent after
        // the subscriptions on the same connection, so the server has them first.
        self.io.carry_out(None, ready_again(self.replica)).await;
        let mut leader = Leader::new(self, subscriptions);
        not_ready.send_replace(false);
        leader.announce(caught_up, started).await;
        Ok(leader.serve(shutdown, not_ready).await)
    }

    /// Reads the ledger to its end. `Err`: the term ended first, or the ledger holds a
    /// record this replica cannot apply.
    async fn catch_up<S: Future<Output = ()> + Unpin>(
        &mut self,
        shutdown: &mut S,
    ) -> Result<u64, NotCaughtUp> {
        let started = Instant::now();
        // While the ledger's stream elects its own leader (a NATS node died), reads time
        // out: keep the lease and retry rather than resign and run a new election each
        // time, so the first read that succeeds ends the pause. What was applied stays
        // right: no rebuild.
        let mut failures = 0u32;
        // A read waiting on a stream without a leader is started again as soon as
        // JetStream announces one, instead of after its timeout.
        let mut news = crate::jetstream::fresh(&self.io.news);
        let caught_up = loop {
            let error = tokio::select! {
                _ = &mut *shutdown => return Err(Led::Shutdown.into()),
                _ = crate::jetstream::next_news(&mut news) => continue,
                read = catch_up(self.replica, self.ledger) => match read {
                    Ok(last) => break last,
                    Err(e @ CatchUpError::Apply(ApplyError::Gap(_))) => {
                        return Err(Led::SteppedDown {
                            reason: format!("cannot catch up with the ledger: {e}"),
                            rebuild: true,
                        }
                        .into());
                    }
                    // Retrying would hold the lease forever on a record that never applies.
                    Err(CatchUpError::Apply(e @ ApplyError::Unappliable { .. })) => {
                        return Err(NotCaughtUp::Refused(e));
                    }
                    Err(e) => e,
                },
            };
            failures += 1;
            if !self
                .election
                .role
                .borrow()
                .leads(self.lease, Instant::now())
            {
                return Err(Led::SteppedDown {
                    reason: format!(
                        "the lease was lost while catching up with the ledger: {error:#}"
                    ),
                    rebuild: false,
                }
                .into());
            }
            if failures == 1 {
                warn!(error = %format!("{error:#}"), lease = self.lease, "cannot catch up with the ledger yet; retrying while the lease holds");
            }
            tokio::select! {
                _ = &mut *shutdown => return Err(Led::Shutdown.into()),
                _ = tokio::time::sleep(CATCH_UP_RETRY) => {}
            }
        };
        if failures > 0 {
            info!(failures, waited = %HumanDuration(started.elapsed()), "caught up with the ledger after retrying");
        }
        Ok(caught_up)
    }

    /// Fences the ledger at its end and writes this term's `Leader` record. `Some`: the term
    /// ended first.
    async fn write_marker<S: Future<Output = ()> + Unpin>(
        &mut self,
        shutdown: &mut S,
    ) -> Option<Led> {
        let (cfg, io) = (self.cfg, self.io);
        let mut news = crate::jetstream::fresh(&io.news);
        self.ledger.set_fence(self.replica.applied);
        // Terms count leaderships: one more than the last `Leader` record's. Fencing makes
        // the record land only right after what was caught up, so no two leaders write the
        // same term.
        self.number = self.replica.term + 1;
        let mut marker = LedgerEntry {
            writer: cfg.broker_id.clone(),
            changes: vec![SeatChange::Leader {
                replica: cfg.broker_id.clone(),
                term: self.number,
                context: Some(self.replica.engine.config().license.context),
            }],
        };
        // The `--license` file against the license the ledger holds in force.
        let (record, said) = file_license(cfg, &self.replica.engine).await;
        marker.changes.extend(record);
        // The cluster's first leader draws the installation's identity and key (vendor
        // sync); a leader of a cluster whose first leader drew no key draws one for the
        // same id.
        let engine = &self.replica.engine;
        if engine.installation().is_none() || engine.installation_key().is_none() {
            let mut seed = [0u8; 32];
            let key = match getrandom::getrandom(&mut seed) {
                Ok(()) => Some(lmbus_schemas::new_installation_seed(seed)),
                Err(e) => {
                    warn!("no installation key: the system's random source failed: {e}");
                    None
                }
            };
            marker.changes.push(SeatChange::Installation {
                id: engine.installation().unwrap_or_else(uuid::Uuid::new_v4),
                key,
            });
        }
        // Right after the whole NATS cluster restarted, the ledger stream may be readable
        // but not yet writable ("no stream found" while its raft group settles): retry the
        // marker while the lease holds instead of resigning and running a new election. A
        // retry resends the same append (message id, fence): one that did land while its
        // acknowledgement was lost counts as recorded, on 2.9 (a duplicate) and on 2.10+
        // (a fence refusal, after which the record is read), instead of stepping down.
        let mut tries = 0u32;
        let mut sent: Option<Sent> = None;
        loop {
            if let Some(end) = lapsed(&self.election.role, cfg.fault_ignore_lease, Instant::now()) {
                return Some(end);
            }
            let started = Instant::now();
            let result = match sent.as_mut() {
                Some(s) => match s.resend().await {
                    Ok(()) => s.wait().await,
                    Err(e) => Err(e),
                },
                None => match self.ledger.send(&marker, false).await {
                    Ok(s) => sent.insert(s).wait().await,
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(sequence) => {
                    io.metrics.ledger_append(started.elapsed());
                    for change in &marker.changes[1..] {
                        // An `Installation`, which cannot fail to apply, or a `License`
                        // whose text verified just before.
                        if let Err(e) = self.replica.engine.apply(now(), change) {
                            warn!("the leader record's {change:?} did not apply: {e}");
                        }
                    }
                    if let Some(alert) = said.clone() {
                        io.alert(alert).await;
                    }
                    self.replica.set_applied(sequence);
                    self.replica.term = self.number;
                    break;
                }
                Err(AppendError::Failed(e) | AppendError::NoAck(e)) if tries < MARKER_TRIES => {
                    tries += 1;
                    if tries == 1 {
                        warn!(error = %e, term = self.number, "cannot write the leader record yet; retrying while the lease holds");
                    }
                }
                Err(e) => return Some(not_recorded(io, e).await),
            }
            tokio::select! {
                _ = &mut *shutdown => return Some(Led::Shutdown),
                _ = tokio::time::sleep(CATCH_UP_RETRY) => {}
                _ = crate::jetstream::next_news(&mut news) => {}
            }
        }
        if tries > 0 {
            info!(tries, "wrote the leader record after retrying");
        }
        None
    }

    /// The term is this replica's from here: silence clocks restart, and what the ledger
    /// held that no leader wrote is alerted.
    async fn take_over(&mut self) {
        let (replica, io) = (&mut *self.replica, self.io);
        replica.leader = Some(self.cfg.broker_id.clone());
        replica.engine.restart_silence_clocks(now());
        let quarantined = std::mem::take(&mut replica.quarantined);
        if !quarantined.is_empty() {
            let list: Vec<String> = quarantined
                .iter()
                .map(|(sequence, why)| format!("{sequence} ({why})"))
                .collect();
            io.alert(Alert::new(
                Severity::Critical,
                AlertKind::BadMessage,
                format!(
                    "the ledger {} held records no leader recorded where they are, quarantined and skipped: {}. Only the brokers' NATS user may publish on {}: check who else can (deploy/nats-server.conf), and rotate the broker credentials if they leaked (a record stored away from its fence, and nothing else, can also be a copy the NATS cluster made when it recovered from every node stopping)",
                    io.subjects.ledger_stream(),
                    list.join(", "),
                    io.subjects.ledger()
                ),
            ))
            .await;
        }
        if let Some(missed) = replica.usage.take_closed() {
            // It closed while another replica led, which reported it (or failed over while
            // doing so: `admin report` makes the current period's report on demand).
            info!(
                period_end = missed.end_ms,
                "a usage period ended before this replica led; not reporting it again"
            );
        }
    }
}

/// What a new leader's `--license` file says against the master license the ledger holds
/// in force: the `License` record to write with the leader record, and what to tell.
/// - No license recorded yet: the file's, if it is what runs, is recorded, so that the
///   ledger remembers it and an older issue given at a later start is refused.
/// - A later issue of the license in force (same id, later issue day or revision): it is
///   recorded and in force (replacing the file is how a new issue reaches the next start).
/// - An older issue, another content at the same rank, or another license id: the
///   ledger's stays in force and a `license_refused` warning says why.
///
/// A file that cannot be read or does not verify now changes nothing (it did at start).
async fn file_license(
    cfg: &crate::config::BrokerConfig,
    engine: &crate::engine::Engine,
) -> (Option<SeatChange>, Option<Alert>) {
    let name = cfg.license_path.display().to_string();
    let text = match tokio::fs::read(&cfg.license_path).await {
        Ok(bytes) => match lmbus_schemas::license_text(bytes, &name) {
            Ok(text) => text,
            Err(e) => {
                warn!("the license file no longer reads as text: {e}");
                return (None, None);
            }
        },
        Err(e) => {
            warn!("cannot read the license file {name} again: {e}");
            return (None, None);
        }
    };
    let file = match lmbus_schemas::verify_license(&text, &name, &cfg.vendor_key).and_then(|l| {
        l.check_dates(super::clock::today_utc(), &name)?;
        l.require_role(lmbus_schemas::Role::Master, &name)?;
        Ok(l)
    }) {
        Ok(file) => file,
        Err(e) => {
            warn!("the license file no longer verifies: {e}");
            return (None, None);
        }
    };
    let current = &engine.config().license;
    let record = Some(SeatChange::License { text: text.clone() });
    let refused = |why: String| {
        Some(Alert::new(
            Severity::Warning,
            AlertKind::LicenseRefused,
            format!(
                "broker {} started with --license {name}: {why}; license {} ({}) stays in force",
                cfg.broker_id,
                current.id,
                current.issue_text()
            ),
        ))
    };
    match engine.license_text() {
        None if file == *current => (record, None),
        // The file changed on disk since this replica started: the next start reads it.
        None => (None, None),
        Some(recorded) if recorded == text => (None, None),
        Some(_) if file.context != current.context => (None, None),
        Some(_) if file.id == current.id && file.rank() > current.rank() => (
            record,
            Some(Alert::new(
                Severity::Info,
                AlertKind::LicenseReloaded,
                format!(
                    "broker {} started with --license {name}, a later issue ({}) of license {} than the ledger's ({}): it is in force",
                    cfg.broker_id,
                    file.issue_text(),
                    file.id,
                    current.issue_text()
                ),
            )),
        ),
        Some(_) if file.id == current.id && file.rank() < current.rank() => (
            None,
            refused(format!(
                "it is an older issue ({}) of the license in force",
                file.issue_text()
            )),
        ),
        Some(_) if file.id == current.id => (
            None,
            refused(
                "it is the same issue (day and revision) of the license in force with other content: the vendor gives a second issue of a day a higher --revision".to_owned(),
            ),
        ),
        Some(_) => (
            None,
            refused(format!(
                "it holds license {}, not the one the ledger holds in force (reloaded earlier); reload the file with admin reload-license to switch",
                file.id
            )),
        ),
    }
}
