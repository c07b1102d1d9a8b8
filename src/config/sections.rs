//! Stage two for each section: from what was written ([`super::RawConfig`]
//! and its parts) to the typed settings, every problem named by its key.

use std::time::Duration;

use super::values::{Problem, duration, duration_or, in_range, problem};
use super::*;
use crate::backoff::RetryPolicy;

impl RawRetention {
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<RetentionConfig> {
        // Keeping rows for years is a legitimate choice here, unlike the
        // timeouts the 30-day cap is meant for.
        const TEN_YEARS: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
        let mut long = |key: &str, value: Option<&str>, default: &str| {
            let text = value.unwrap_or(default);
            match humantime::parse_duration(text) {
                Ok(d) if d.is_zero() || d > TEN_YEARS => {
                    problem(problems, key, "must be between 1s and 10 years");
                    None
                }
                Ok(d) => Some(d),
                Err(e) => {
                    problem(
                        problems,
                        key,
                        format!("{text:?} is not a duration ({e}); write it like \"7days\""),
                    );
                    None
                }
            }
        };
        let delivered = long("retention.delivered", self.delivered.as_deref(), "7days");
        let failed = long("retention.failed", self.failed.as_deref(), "30days");
        let emails = long("retention.emails", self.emails.as_deref(), "30days");
        let interval = duration(
            problems,
            "retention.interval",
            self.interval.as_deref(),
            "1m",
        );
        let batch_size = in_range(
            problems,
            "retention.batch_size",
            self.batch_size.unwrap_or(1000),
            1,
            100_000,
        );
        Some(RetentionConfig {
            delivered: delivered?,
            failed: failed?,
            emails: emails?,
            interval: interval?,
            batch_size: batch_size? as i64,
        })
    }
}

impl RawMetrics {
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<MetricsConfig> {
        let listen = match self.listen.as_deref().map(str::trim) {
            None => Some(Some(
                DEFAULT_METRICS_LISTEN.parse().expect("a valid address"),
            )),
            Some("" | "off") => Some(None),
            Some(text) => match text.parse() {
                Ok(addr) => Some(Some(addr)),
                Err(_) => {
                    problem(
                        problems,
                        "metrics.listen",
                        format!(
                            "{text:?} is not an address like \"127.0.0.1:7464\" (or \"off\" for no admin server)"
                        ),
                    );
                    None
                }
            },
        };
        let refresh_interval = duration(
            problems,
            "metrics.refresh_interval",
            self.refresh_interval.as_deref(),
            "15s",
        );
        Some(MetricsConfig {
            listen: listen?,
            refresh_interval: refresh_interval?,
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

impl RawLog {
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<LogConfig> {
        let level = self.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
        let level_ok = match tracing_subscriber::EnvFilter::builder().parse(&level) {
            Ok(_) => true,
            Err(e) => {
                problem(
                    problems,
                    "log.level",
                    format!(
                        "{e}; use a level (error, warn, info, debug, trace) or directives like \"outboxd=debug,info\""
                    ),
                );
                false
            }
        };
        let format = match self.format.as_deref() {
            None | Some("text") => Some(LogFormat::Text),
            Some("json") => Some(LogFormat::Json),
            Some("journald") => Some(LogFormat::Journald),
            Some(other) => {
                problem(
                    problems,
                    "log.format",
                    format!("must be \"text\", \"json\" or \"journald\", got {other:?}"),
                );
                None
            }
        };
        if !level_ok {
            return None;
        }
        Some(LogConfig {
            level,
            format: format?,
        })
    }
}
