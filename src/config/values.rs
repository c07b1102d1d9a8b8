//! What every section checks alike: a problem named by its key, numbers
//! within bounds, durations, and secrets (given inline or as a file).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::Secret;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `database.connect_timeout`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

pub(super) fn problem(problems: &mut Vec<Problem>, key: &str, message: impl Into<String>) {
    problems.push(Problem {
        key: key.to_string(),
        message: message.into(),
    });
}

/// No duration setting has a use beyond this, and bounding them keeps every
/// computed retry time representable.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A number within bounds, inclusive.
pub(super) fn in_range<T>(
    problems: &mut Vec<Problem>,
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Option<T>
where
    T: PartialOrd + fmt::Display + Copy,
{
    if value < min || value > max {
        problem(
            problems,
            key,
            format!("must be between {min} and {max}, got {value}"),
        );
        None
    } else {
        Some(value)
    }
}

/// Like [`duration`], with a `Duration` default.
pub(super) fn duration_or(
    problems: &mut Vec<Problem>,
    key: &str,
    value: Option<&str>,
    default: Duration,
) -> Option<Duration> {
    match value {
        Some(_) => duration(problems, key, value, ""),
        None => Some(default),
    }
}

/// Like [`duration_or`], but zero is allowed (it turns a wait off).
pub(super) fn duration_or_zero(
    problems: &mut Vec<Problem>,
    key: &str,
    value: Option<&str>,
    default: Duration,
) -> Option<Duration> {
    match value.map(str::trim) {
        None => Some(default),
        Some("0") => Some(Duration::ZERO),
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => Some(d),
            _ => duration(problems, key, Some(text), ""),
        },
    }
}

/// Parses a humantime duration ("500ms", "5s", "1m 30s"), which must be
/// greater than zero.
pub(super) fn duration(
    problems: &mut Vec<Problem>,
    key: &str,
    value: Option<&str>,
    default: &str,
) -> Option<Duration> {
    let text = value.unwrap_or(default);
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => {
            problem(problems, key, "must be greater than zero");
            None
        }
        Ok(d) if d > MAX_DURATION => {
            problem(problems, key, "must be at most 30 days");
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            problem(
                problems,
                key,
                format!("{text:?} is not a duration ({e}); write it like \"5s\" or \"1m 30s\""),
            );
            None
        }
    }
}

/// A section's `password` or `password_file` (never both).
pub(super) fn password_setting(
    problems: &mut Vec<Problem>,
    section: &str,
    password: Option<String>,
    password_file: Option<PathBuf>,
) -> Option<Secret> {
    match (password, password_file) {
        (Some(_), Some(_)) => {
            problem(
                problems,
                &format!("{section}.password"),
                "give either password or password_file, not both",
            );
            None
        }
        (Some(p), None) => Some(Secret::new(p)),
        (None, Some(path)) => {
            secret_file(problems, &format!("{section}.password_file"), &path).map(Secret::new)
        }
        (None, None) => None,
    }
}

/// Reads a secret from a file, as systemd's `LoadCredential=` provides it.
/// One trailing newline is dropped (what `echo secret > file` leaves).
pub(crate) fn secret_file(problems: &mut Vec<Problem>, key: &str, path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let text = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string();
            if text.is_empty() {
                problem(problems, key, format!("{} is empty", path.display()));
                None
            } else {
                Some(text)
            }
        }
        Err(e) => {
            problem(
                problems,
                key,
                format!("cannot read {}: {e}", path.display()),
            );
            None
        }
    }
}
