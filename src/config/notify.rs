//! `[smtp]` and `[notify]`: the server error-notification emails are sent
//! through, and their timings.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::values::{Problem, duration, password_setting, problem};
use crate::model::Secret;

/// Error-notification emails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// None: no `[smtp] host`, notifications stay queued in the database.
    pub smtp: Option<SmtpConfig>,
    /// At most one email per endpoint per window.
    pub window: Duration,
    /// How long the first failure waits for others to join its email.
    pub gather: Duration,
    /// How often the mailer looks for work.
    pub poll_interval: Duration,
    /// First wait after a failed send; doubles up to 30 min.
    pub retry_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Envelope sender and From address.
    pub from: String,
    /// Display name in From.
    pub from_name: String,
    /// Each SMTP exchange (connect, command, data).
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
    /// No TLS: only for a relay on the same host or a trusted network.
    None,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub tls: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub from: Option<String>,
    pub from_name: Option<String>,
    pub timeout: Option<String>,
}

impl fmt::Debug for RawSmtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSmtp")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("from", &self.from)
            .field("from_name", &self.from_name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub window: Option<String>,
    pub gather: Option<String>,
    pub poll_interval: Option<String>,
    pub retry_delay: Option<String>,
}

impl RawSmtp {
    /// `Some(None)`: valid, and no SMTP configured.
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<Option<SmtpConfig>> {
        let Some(host) = self.host.filter(|h| !h.trim().is_empty()) else {
            return Some(None);
        };
        let tls = match self.tls.as_deref().unwrap_or("starttls") {
            "starttls" => Some(SmtpTls::StartTls),
            "implicit" => Some(SmtpTls::Implicit),
            "none" => Some(SmtpTls::None),
            other => {
                problem(
                    problems,
                    "smtp.tls",
                    format!("must be \"starttls\", \"implicit\" or \"none\", got {other:?}"),
                );
                None
            }
        };
        let port = match (self.port, tls) {
            (Some(0), _) => {
                problem(problems, "smtp.port", "must be between 1 and 65535");
                None
            }
            (Some(port), _) => Some(port),
            (None, Some(SmtpTls::StartTls)) => Some(587),
            (None, Some(SmtpTls::Implicit)) => Some(465),
            (None, _) => Some(25),
        };
        let from = match self.from {
            Some(from) if is_plain_address(&from) => Some(from),
            Some(from) => {
                problem(
                    problems,
                    "smtp.from",
                    format!("{from:?} is not an email address like outboxd@example.com"),
                );
                None
            }
            None => {
                problem(
                    problems,
                    "smtp.from",
                    "is required when smtp.host is set (the sender address)",
                );
                None
            }
        };
        let password = password_setting(problems, "smtp", self.password, self.password_file);
        if self.username.is_some() != password.is_some() {
            problem(
                problems,
                "smtp.username",
                "username and password (or password_file) go together",
            );
        }
        let timeout = duration(problems, "smtp.timeout", self.timeout.as_deref(), "30s");
        Some(Some(SmtpConfig {
            host,
            port: port?,
            tls: tls?,
            username: self.username,
            password,
            from: from?,
            from_name: self.from_name.unwrap_or_else(|| "outboxd".to_string()),
            timeout: timeout?,
        }))
    }
}

/// `local@domain.tld` without a display name, spaces or angle brackets.
fn is_plain_address(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !text.contains(|c: char| c.is_whitespace() || "<>(),;:\"[]".contains(c))
        && !domain.contains('@')
}

impl RawNotify {
    /// Returns the timings; `smtp` is filled in by the caller.
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<NotifyConfig> {
        let window = duration(problems, "notify.window", self.window.as_deref(), "15m");
        let gather = duration(problems, "notify.gather", self.gather.as_deref(), "1m");
        let poll_interval = duration(
            problems,
            "notify.poll_interval",
            self.poll_interval.as_deref(),
            "5s",
        );
        let retry_delay = duration(
            problems,
            "notify.retry_delay",
            self.retry_delay.as_deref(),
            "30s",
        );
        Some(NotifyConfig {
            smtp: None,
            window: window?,
            gather: gather?,
            poll_interval: poll_interval?,
            retry_delay: retry_delay?,
        })
    }
}
