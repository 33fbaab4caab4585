//! Usage reports made in a task beside the leader (the daily one and `admin report`):
//! reading the alert stream and mailing take seconds the leader must not wait for.

use lmbus_schemas::{Alert, AlertKind, ReportReply, Severity};

use crate::report::{LicenseFacts, ReportConfig};

use super::outbound::Io;

/// Makes a usage report of `period` in a task beside the leader (reading the alert stream
/// and mailing take seconds), raises a `usage_report` alert saying where it went, and
/// answers `reply_to` (an `admin report` request) with it.
pub(super) fn spawn_report(
    io: &Io,
    cfg: &ReportConfig,
    license: LicenseFacts,
    period: Option<crate::report::UsageWindow>,
    daily: bool,
    reply_to: Option<async_nats::Subject>,
) {
    let io = io.clone();
    let cfg = cfg.clone();
    io.tasks.clone().spawn(async move {
        let reply = match period {
            None => ReportReply::Error {
                message: "this replica has not counted any usage yet".into(),
            },
            Some(period) => {
                let (report, delivered) = crate::report::make_and_deliver(
                    &cfg,
                    &io.client,
                    &io.subjects,
                    &io.broker_id,
                    &license,
                    &period,
                    daily,
                )
                .await;
                let (severity, problems) = if delivered.problems.is_empty() {
                    (Severity::Info, String::new())
                } else {
                    (
                        Severity::Warning,
                        format!("; problems: {}", delivered.problems.join("; ")),
                    )
                };
                let what = if daily {
                    "daily usage report"
                } else {
                    "usage report"
                };
                let period_text = report.as_ref().map_or_else(String::new, |r| {
                    format!(" for {} to {}", r.period_start, r.period_end)
                });
                io.alert(Alert::new(
                    severity,
                    AlertKind::UsageReport,
                    format!(
                        "{what}{period_text} published on {}; files: {}; mailed to: {}{problems}",
                        io.subjects.usage_report(),
                        if delivered.files.is_empty() {
                            "none".to_string()
                        } else {
                            delivered.files.join(", ")
                        },
                        if delivered.emailed_to.is_empty() {
                            "nobody".to_string()
                        } else {
                            delivered.emailed_to.join(", ")
                        },
                    ),
                ))
                .await;
                match report {
                    Some(report) => ReportReply::Written {
                        report: Box::new(report),
                        files: delivered.files,
                        emailed_to: delivered.emailed_to,
                        problems: delivered.problems,
                    },
                    None => ReportReply::Error {
                        message: delivered.problems.join("; "),
                    },
                }
            }
        };
        if let Some(reply_to) = reply_to {
            io.send(reply_to, &reply, "report reply").await;
        }
    });
}
