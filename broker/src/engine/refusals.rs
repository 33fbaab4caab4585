//! How refusals are told: an invalid request's error reply and alert, and repeated refusals
//! that say nothing new, alerted at most once per slave and reason every
//! [`RATE_LIMIT_ALERT_EVERY`].

use std::time::Instant;

use lmbus_schemas::{Alert, AlertKind, ErrorCode, Reply, Severity, SlaveId, WireError};

use super::guards::{Quiet, RATE_LIMIT_ALERT_EVERY};
use super::{Engine, Output};

impl Engine {
    /// `alert` now if no alert of this slave and reason went out within
    /// [`RATE_LIMIT_ALERT_EVERY`] (saying how many more were refused meanwhile), else
    /// `None` and the refusal is counted: however many a site sends, a few alerts.
    pub(super) fn quietly(
        &mut self,
        now: Instant,
        id: &SlaveId,
        what: &'static str,
        mut alert: Alert,
    ) -> Option<Alert> {
        if !self.quiet.contains_key(&(id.clone(), what))
            && self.quiet.len() >= self.cfg.max_slaves.max(1)
        {
            let oldest = self
                .quiet
                .iter()
                .min_by_key(|(_, q)| q.reported_at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.quiet.remove(&oldest);
            }
        }
        let q = self.quiet.entry((id.clone(), what)).or_insert(Quiet {
            unreported: 0,
            reported_at: None,
            last: None,
        });
        let due = q
            .reported_at
            .is_none_or(|at| now.saturating_duration_since(at) >= RATE_LIMIT_ALERT_EVERY);
        if !due {
            q.unreported += 1;
            q.last = Some(alert);
            return None;
        }
        q.last = None;
        if q.unreported > 0 {
            alert.message.push_str(&format!(
                " ({} more such refusals of slave {id} since the last alert)",
                q.unreported
            ));
        }
        q.unreported = 0;
        q.reported_at = Some(now);
        Some(alert)
    }

    /// At the tick: the refusals counted quietly whose quiet time is over, as one alert per
    /// slave and reason ("N more such refusals ..., the last: ..."), so every count is
    /// told even when no further refusal comes.
    pub(super) fn quiet_summaries(&mut self, now: Instant) -> Vec<Alert> {
        let mut out = Vec::new();
        for ((id, _), q) in self.quiet.iter_mut() {
            let due = q
                .reported_at
                .is_none_or(|at| now.saturating_duration_since(at) >= RATE_LIMIT_ALERT_EVERY);
            if !due || q.unreported == 0 {
                continue;
            }
            if let Some(mut alert) = q.last.take() {
                alert.message = format!(
                    "{} refusals of slave {id} like this one in the last {} s, the last: {}",
                    q.unreported,
                    RATE_LIMIT_ALERT_EVERY.as_secs(),
                    alert.message
                );
                out.push(alert);
            }
            q.unreported = 0;
            q.reported_at = Some(now);
        }
        out
    }

    pub(super) fn invalid_request(
        &self,
        slave: &SlaveId,
        subject_op: &str,
        message: String,
    ) -> Output {
        let error = WireError {
            code: ErrorCode::Invalid,
            message,
        };
        let mut out = Output::reply(Reply::Error(error.clone()));
        out.alert(
            self.alert(
                Severity::Warning,
                AlertKind::BadMessage,
                format!("invalid {subject_op} from slave {slave}: {}", error.message),
            )
            .slave(slave.as_str()),
        );
        out
    }
}
