//! `[metrics]`, `[retention]` and `[log]`: what the running daemon shows,
//! how long it keeps finished rows, and what it logs.

use std::time::Duration;

use serde::Deserialize;

use super::values::{Problem, duration, in_range, problem};

const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7464";

/// The admin HTTP server: /metrics, /healthz, /readyz.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// None: no admin server.
    pub listen: Option<std::net::SocketAddr>,
    /// How often the queue gauges are refreshed from the database.
    pub refresh_interval: Duration,
}

/// How long finished rows are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Delivered events (with their attempts), counted from delivery.
    pub delivered: Duration,
    /// Failed events, counted from creation or the last replay.
    pub failed: Duration,
    /// Sent notification emails.
    pub emails: Duration,
    /// How often the cleanup runs.
    pub interval: Duration,
    /// Rows deleted per statement.
    pub batch_size: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `outboxd=debug,info`.
    /// `RUST_LOG`, when set, wins over it.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
    /// Text with each line's syslog priority in front (`<4>` for a
    /// warning), which systemd's journal reads from stderr
    /// (`SyslogLevelPrefix=`, on by default) so `journalctl -p` filters
    /// work; no timestamp, the journal keeps its own. Chosen by itself when
    /// stderr is the journal (`JOURNAL_STREAM`) and the format is text.
    Journald,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
    pub refresh_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    pub delivered: Option<String>,
    pub failed: Option<String>,
    pub emails: Option<String>,
    pub interval: Option<String>,
    pub batch_size: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
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
