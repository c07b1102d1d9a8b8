//! `[retry]` and `[circuit]`: what a failed delivery leads to, when it is
//! tried again and when its endpoint's events are held.

use std::time::Duration;

use serde::Deserialize;

use super::values::{Problem, duration_or, in_range, problem};
use crate::backoff::RetryPolicy;

/// `[circuit]`: when an endpoint counts as down, and for how long its
/// events are held (see `outbox.endpoint_circuits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitConfig {
    /// Retryable failures in a row (no answer between them) that open it.
    pub open_after: u32,
    /// The first cool-down before a probe; doubles after each failed probe.
    pub cooldown: Duration,
    /// The longest cool-down.
    pub max_cooldown: Duration,
    /// An event held this long past its due time fails, and its company is
    /// told: nothing waits unseen for ever.
    pub max_hold: Duration,
}

impl Default for CircuitConfig {
    /// Five failures in a row: one timeout or 503 is noise, five with no
    /// answer between them is an endpoint that is down (with the default
    /// cap of 8, a dead endpoint opens on its first batch). 30 s before the
    /// first probe, then 1, 2, 4, 8 and every 10 minutes: a short outage
    /// (a restart, a deploy) costs well under a minute of delay, a long one
    /// costs the receiver 6 requests an hour. Held for at most 24 h, the
    /// same day that `retry.max_age` gives a retried event.
    fn default() -> CircuitConfig {
        CircuitConfig {
            open_after: 5,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(600),
            max_hold: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub base_delay: Option<String>,
    pub max_delay: Option<String>,
    pub max_attempts: Option<u32>,
    pub max_age: Option<String>,
    pub max_retry_after: Option<String>,
    pub jitter: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuit {
    pub open_after: Option<u32>,
    pub cooldown: Option<String>,
    pub max_cooldown: Option<String>,
    pub max_hold: Option<String>,
}

impl RawRetry {
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<RetryPolicy> {
        let defaults = RetryPolicy::default();
        let base_delay = duration_or(
            problems,
            "retry.base_delay",
            self.base_delay.as_deref(),
            defaults.base_delay,
        );
        let max_delay = duration_or(
            problems,
            "retry.max_delay",
            self.max_delay.as_deref(),
            defaults.max_delay,
        );
        let max_attempts = in_range(
            problems,
            "retry.max_attempts",
            self.max_attempts.unwrap_or(defaults.max_attempts),
            1,
            1000,
        );
        let max_age = duration_or(
            problems,
            "retry.max_age",
            self.max_age.as_deref(),
            defaults.max_age,
        );
        let max_retry_after = duration_or(
            problems,
            "retry.max_retry_after",
            self.max_retry_after.as_deref(),
            defaults.max_retry_after,
        );
        let jitter = match self.jitter.unwrap_or(defaults.jitter) {
            j if (0.0..=1.0).contains(&j) => Some(j),
            j => {
                problem(
                    problems,
                    "retry.jitter",
                    format!("must be between 0.0 and 1.0 (a fraction of the delay), got {j}"),
                );
                None
            }
        };
        if let (Some(base), Some(max)) = (base_delay, max_delay) {
            if base > max {
                problem(
                    problems,
                    "retry.base_delay",
                    "must not be longer than retry.max_delay",
                );
            }
        }
        Some(RetryPolicy {
            base_delay: base_delay?,
            max_delay: max_delay?,
            max_attempts: max_attempts?,
            max_age: max_age?,
            max_retry_after: max_retry_after?,
            jitter: jitter?,
        })
    }
}

impl RawCircuit {
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<CircuitConfig> {
        let defaults = CircuitConfig::default();
        let open_after = in_range(
            problems,
            "circuit.open_after",
            self.open_after.unwrap_or(defaults.open_after),
            1,
            1000,
        );
        let cooldown = duration_or(
            problems,
            "circuit.cooldown",
            self.cooldown.as_deref(),
            defaults.cooldown,
        );
        let max_cooldown = duration_or(
            problems,
            "circuit.max_cooldown",
            self.max_cooldown.as_deref(),
            defaults.max_cooldown,
        );
        let max_hold = duration_or(
            problems,
            "circuit.max_hold",
            self.max_hold.as_deref(),
            defaults.max_hold,
        );
        if let (Some(c), Some(m)) = (cooldown, max_cooldown) {
            if m < c {
                problem(
                    problems,
                    "circuit.max_cooldown",
                    format!(
                        "must be at least circuit.cooldown ({})",
                        humantime::format_duration(c)
                    ),
                );
                return None;
            }
        }
        Some(CircuitConfig {
            open_after: open_after?,
            cooldown: cooldown?,
            max_cooldown: max_cooldown?,
            max_hold: max_hold?,
        })
    }
}
