//! The one place that says which agent ids, agent types and free texts a peer may send,
//! and how text from the network is shown to a person.
//!
//! Every path that carries an agent id or type (a registration, an unregistration, a
//! batch, a hello's agent list and pending list, a report) is checked with the same rules
//! before anything is decided or recorded, so nothing unbounded or unprintable reaches the
//! ledger, an alert or a log line. Human output escapes control characters anyway
//! ([`printable`]): records written by an older build, or a license's customer name, are
//! shown without letting them move the cursor, retitle the terminal or forge a line.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::messages::{
    BatchItem, BatchRequest, Heartbeat, Hello, RegisterRequest, SlaveEvent, SlaveReport,
    UnregisterRequest,
};

/// Longest agent id, in bytes.
pub const MAX_AGENT_ID_LEN: usize = 256;
/// Longest agent type, in bytes.
pub const MAX_AGENT_TYPE_LEN: usize = 64;
/// Longest free text a slave may send (a report's message, a hello's software name).
pub const MAX_TEXT_LEN: usize = 512;
/// Most agents a hello may list (claimed plus pending), and most unsettled agents in a
/// heartbeat.
pub const MAX_HELLO_AGENTS: usize = 100_000;
/// Longest license text a hello may carry, in bytes.
pub const MAX_LICENSE_LEN: usize = 16 * 1024;

/// A field a peer sent that lmbus does not accept; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    pub field: &'static str,
    pub problem: String,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> Invalid {
    Invalid {
        field,
        problem: problem.into(),
    }
}

/// Characters that change how a terminal shows what follows: C0 and C1 controls (ESC
/// starts every ANSI sequence; CR and LF forge lines) and the Unicode bidirectional
/// overrides.
fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// An agent id: 1 to [`MAX_AGENT_ID_LEN`] bytes, no control or bidi characters.
pub fn check_agent_id(agent_id: &str) -> Result<(), Invalid> {
    if agent_id.is_empty() || agent_id.len() > MAX_AGENT_ID_LEN {
        return Err(invalid(
            "agent_id",
            format!(
                "must be 1 to {MAX_AGENT_ID_LEN} bytes, got {}",
                agent_id.len()
            ),
        ));
    }
    if agent_id.chars().any(is_unsafe_char) {
        return Err(invalid(
            "agent_id",
            format!("contains control characters: {}", printable(agent_id)),
        ));
    }
    Ok(())
}

/// An agent type: 1 to [`MAX_AGENT_TYPE_LEN`] characters from A-Z, a-z, 0-9, '-' and '_'.
pub fn check_agent_type(agent_type: &str) -> Result<(), Invalid> {
    let ok = !agent_type.is_empty()
        && agent_type.len() <= MAX_AGENT_TYPE_LEN
        && agent_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "agent_type",
            format!(
                "{} must be 1 to {MAX_AGENT_TYPE_LEN} characters from A-Z, a-z, 0-9, '-' and '_'",
                printable(&truncated(agent_type, 80))
            ),
        ))
    }
}

/// Free text from a peer: at most [`MAX_TEXT_LEN`] bytes, no control characters.
pub fn check_text(field: &'static str, text: &str) -> Result<(), Invalid> {
    if text.len() > MAX_TEXT_LEN {
        return Err(invalid(
            field,
            format!("must be at most {MAX_TEXT_LEN} bytes, got {}", text.len()),
        ));
    }
    if text.chars().any(is_unsafe_char) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

/// A message a slave sends, checked field by field before the master decides anything.
pub trait Validate {
    fn validate(&self) -> Result<(), Invalid>;
}

impl Validate for RegisterRequest {
    fn validate(&self) -> Result<(), Invalid> {
        check_agent_id(&self.agent_id)?;
        check_agent_type(&self.agent_type)
    }
}

impl Validate for UnregisterRequest {
    fn validate(&self) -> Result<(), Invalid> {
        check_agent_id(&self.agent_id)
    }
}

impl Validate for BatchRequest {
    fn validate(&self) -> Result<(), Invalid> {
        if self.items.len() > crate::messages::MAX_BATCH_ITEMS {
            return Err(invalid(
                "items",
                format!(
                    "a batch of {} requests; at most {} are allowed",
                    self.items.len(),
                    crate::messages::MAX_BATCH_ITEMS
                ),
            ));
        }
        self.items.iter().try_for_each(|item| match item {
            BatchItem::Register(r) => r.validate(),
            BatchItem::Unregister(u) => u.validate(),
        })
    }
}

impl Validate for Hello {
    fn validate(&self) -> Result<(), Invalid> {
        if self.agents.len() + self.pending.len() > MAX_HELLO_AGENTS {
            return Err(invalid(
                "agents",
                format!(
                    "{} agents; at most {MAX_HELLO_AGENTS} are allowed",
                    self.agents.len() + self.pending.len()
                ),
            ));
        }
        for claim in &self.agents {
            check_agent_id(&claim.agent_id)?;
            check_agent_type(&claim.agent_type)?;
        }
        for agent in &self.pending {
            check_agent_id(agent)?;
        }
        check_text("software", &self.software)?;
        if let Some(license) = &self.license
            && license.len() > MAX_LICENSE_LEN
        {
            return Err(invalid(
                "license",
                format!(
                    "must be at most {MAX_LICENSE_LEN} bytes, got {}",
                    license.len()
                ),
            ));
        }
        Ok(())
    }
}

impl Validate for Heartbeat {
    fn validate(&self) -> Result<(), Invalid> {
        if let Some(books) = &self.books {
            if books.unsettled.len() > MAX_HELLO_AGENTS {
                return Err(invalid(
                    "books.unsettled",
                    format!("at most {MAX_HELLO_AGENTS} agents"),
                ));
            }
            books.unsettled.iter().try_for_each(|a| check_agent_id(a))?;
        }
        Ok(())
    }
}

impl Validate for crate::allot::AllotRequest {
    fn validate(&self) -> Result<(), Invalid> {
        use crate::allot::{MAX_ALLOT_OPS, MAX_ALLOT_TYPES};
        if self.ops.len() > MAX_ALLOT_OPS {
            return Err(invalid(
                "ops",
                format!(
                    "{} journal entries; at most {MAX_ALLOT_OPS} per request are allowed",
                    self.ops.len()
                ),
            ));
        }
        if self.want.len() > MAX_ALLOT_TYPES {
            return Err(invalid(
                "want",
                format!(
                    "{} agent types; at most {MAX_ALLOT_TYPES} are allowed",
                    self.want.len()
                ),
            ));
        }
        if self.seq == 0 {
            return Err(invalid("seq", "must be 1 or more"));
        }
        let mut last = 0;
        for op in &self.ops {
            if op.n <= last {
                return Err(invalid(
                    "ops",
                    format!("journal entry numbers must increase: {} after {last}", op.n),
                ));
            }
            last = op.n;
            if op.kind == crate::allot::AllotOpKind::Other {
                return Err(invalid("ops", "an unknown kind of journal entry"));
            }
            check_agent_id(&op.agent_id)?;
            check_agent_type(&op.agent_type)?;
        }
        self.want.keys().try_for_each(|t| check_agent_type(t))
    }
}

impl Validate for crate::messages::Goodbye {
    fn validate(&self) -> Result<(), Invalid> {
        check_text("reason", &self.reason)
    }
}

impl Validate for SlaveReport {
    fn validate(&self) -> Result<(), Invalid> {
        check_text("message", &self.message)?;
        match &self.event {
            SlaveEvent::LocalRejection {
                agent_id,
                agent_type,
                ..
            } => {
                check_agent_id(agent_id)?;
                check_agent_type(agent_type)
            }
            SlaveEvent::Restricted { .. } | SlaveEvent::Other => Ok(()),
        }
    }
}

/// `text` as it may be shown to a person: control and bidi characters escaped (`\x1b`,
/// `\n`, `\u{202e}`), everything else as is. Borrowed when there is nothing to escape.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe_char(c) && (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// At most `max` bytes of `text` (cut at a character boundary), with `…` and the original
/// length when cut: for log lines and alerts that quote what a peer sent.
pub fn truncated(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::AgentClaim;

    #[test]
    fn hostile_ids_types_and_texts_are_refused_everywhere() {
        let long = "x".repeat(1000);
        let types = "t".repeat(3000);
        for id in [
            "",
            long.as_str(),
            "a\u{1b}]0;pwned\u{7}",
            "a\nb",
            "a\u{202e}b",
        ] {
            assert!(check_agent_id(id).is_err(), "{id:?}");
            let register = RegisterRequest {
                request_id: Default::default(),
                seq: 1,
                agent_id: id.into(),
                agent_type: "t".into(),
            };
            assert!(register.validate().is_err());
            let hello = Hello {
                agents: vec![AgentClaim {
                    agent_id: id.into(),
                    agent_type: "t".into(),
                }],
                ..Hello::default()
            };
            assert!(hello.validate().is_err());
            let pending = Hello {
                pending: vec![id.into()],
                ..Hello::default()
            };
            assert!(pending.validate().is_err());
            let report = SlaveReport {
                event: SlaveEvent::LocalRejection {
                    agent_id: id.into(),
                    agent_type: "t".into(),
                    reason: crate::RejectReason::LocalLimit,
                },
                message: String::new(),
            };
            assert!(report.validate().is_err());
        }
        assert!(check_agent_type(&types).is_err());
        assert!(check_agent_type("in\u{1b}[2J").is_err());
        let report = SlaveReport {
            event: SlaveEvent::Other,
            message: "x".repeat(250_000),
        };
        assert!(report.validate().is_err());
        let forged = SlaveReport {
            event: SlaveEvent::Other,
            message: "ok\n2026-01-01 ERROR forged".into(),
        };
        assert!(forged.validate().is_err());
        assert!(check_agent_id("agent-17@host.example").is_ok());
        assert!(check_agent_id("agënt-ü").is_ok());
    }

    #[test]
    fn printable_escapes_what_moves_a_terminal() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2Jb\nc"), "a\\x1b[2Jb\\nc");
        assert_eq!(printable("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(truncated("héllo", 2), "h… (6 bytes)");
        assert_eq!(truncated("short", 10), "short");
    }
}
