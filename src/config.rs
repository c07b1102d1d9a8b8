//! Configuration: built-in defaults, then a TOML file, then `OUTBOXD_…`
//! environment variables (`OUTBOXD_DATABASE__URL` sets `database.url`).
//! Only variables of that shape are read; other `OUTBOXD_…` names (no `__`)
//! are left alone with a warning, and neither `DATABASE_URL` nor libpq's
//! `PG…` variables are read: what connects where is in one place.
//!
//! Loading has two stages. figment extracts [`RawConfig`], which holds what
//! the operator wrote (durations as strings, every key optional);
//! [`RawConfig::validate`] turns it into the typed [`Config`] or into a list
//! of problems, each naming its key. Only then is any file read (secrets
//! given as `…_file`), so a typo is reported before anything else happens.
//!
//! `config.toml` at the repository root is the reference: every key, its
//! default and why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Deserialize;

use crate::backoff::RetryPolicy;

/// Where `--config` falls back to when it is not given, in order.
pub const DEFAULT_CONFIG_PATHS: [&str; 2] = ["./config.toml", "/etc/outboxd/config.toml"];

/// Environment variables with this prefix override the file.
pub const ENV_PREFIX: &str = "OUTBOXD_";

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file that was read, if any.
    pub source: Option<PathBuf>,
    /// `OUTBOXD_…` variables that are not settings (no `__`), left alone:
    /// names only, for one warning once logging is up.
    pub ignored_env: Vec<String>,
    pub database: DatabaseConfig,
    pub delivery: DeliveryConfig,
    pub retry: RetryPolicy,
    pub circuit: CircuitConfig,
    pub notify: NotifyConfig,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub log: LogConfig,
}

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

/// The admin HTTP server: /metrics, /healthz, /readyz.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// None: no admin server.
    pub listen: Option<std::net::SocketAddr>,
    /// How often the queue gauges are refreshed from the database.
    pub refresh_interval: Duration,
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

/// The configuration as written, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub delivery: RawDelivery,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub circuit: RawCircuit,
    #[serde(default)]
    pub smtp: RawSmtp,
    #[serde(default)]
    pub notify: RawNotify,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub retention: RawRetention,
    #[serde(default)]
    pub log: RawLog,
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
pub struct RawMetrics {
    pub listen: Option<String>,
    pub refresh_interval: Option<String>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7464";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist (given with --config or OUTBOXD_CONFIG)")]
    Missing { path: PathBuf },
    /// The file or the environment could not be read into the raw shape:
    /// a syntax error, an unknown key, a value of the wrong type.
    #[error("{}", display_figment(.0))]
    Extract(Box<figment::Error>),
    #[error("{}", .0.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

fn display_figment(err: &figment::Error) -> String {
    // figment can gather several errors; show every one, not just the first.
    err.clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            if is_secret_key(&key) {
                // figment's message quotes the value it found: not for these.
                format!("{key}: invalid value (not shown, it may be a secret); expected a string")
            } else {
                e.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Keys whose values are secrets, or may contain one (a URL with a password).
fn is_secret_key(key: &str) -> bool {
    key.ends_with("password") || key == "database.url"
}

/// Secret keys read from the environment as raw strings. Through figment's
/// Env provider, `OUTBOXD_DATABASE__PASSWORD=12345678` would become a number,
/// fail to be a string, and be quoted in the error.
const SECRET_ENV_KEYS: [&str; 2] = ["database.password", "smtp.password"];

/// Picks the config file: the explicit path (which must exist), else the
/// first default path that exists, else none (defaults and environment only).
pub fn resolve_path(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    match explicit {
        Some(path) if path.exists() => Ok(Some(path.to_path_buf())),
        Some(path) => Err(ConfigError::Missing {
            path: path.to_path_buf(),
        }),
        None => Ok(DEFAULT_CONFIG_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())),
    }
}

/// Loads, validates and resolves the configuration.
pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
    let source = resolve_path(explicit)?;
    let raw = extract(source.as_deref())?;
    let mut config = raw.validate()?;
    config.source = source;
    config.ignored_env = ignored_env_vars();
    Ok(config)
}

/// Whether an `OUTBOXD_` variable (named without the prefix) is a setting:
/// `<SECTION>__<KEY>`.
fn is_setting(name: &str) -> bool {
    name.contains("__")
}

/// `OUTBOXD_…` variables without `__`: not settings (a setting is always
/// `OUTBOXD_<SECTION>__<KEY>`), so not read. Kubernetes sets such variables
/// in every pod of a namespace with a Service named `outboxd`
/// (`OUTBOXD_PORT=tcp://10.0.0.1:80`, `OUTBOXD_SERVICE_HOST`, …).
/// `OUTBOXD_CONFIG` is the `--config` flag.
fn ignored_env_vars() -> Vec<String> {
    let mut names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| {
            name.strip_prefix(ENV_PREFIX)
                .is_some_and(|rest| !is_setting(rest) && rest != "CONFIG")
        })
        .collect();
    names.sort();
    names
}

/// Stage one: file and environment into [`RawConfig`].
pub fn extract(file: Option<&Path>) -> Result<RawConfig, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        // file_exact: plain `file` would quietly search parent directories.
        figment = figment.merge(Toml::file_exact(path));
    }
    let raw_keys: Vec<String> = SECRET_ENV_KEYS
        .iter()
        .map(|k| k.replace('.', "__"))
        .collect();
    let mut ignored: Vec<&str> = raw_keys.iter().map(String::as_str).collect();
    ignored.push("config"); // OUTBOXD_CONFIG is the --config flag
    // Only OUTBOXD_<SECTION>__<KEY> is a setting; an unknown section or key
    // in that shape is still an error (a typo must not pass).
    figment = figment.merge(
        Env::prefixed(ENV_PREFIX)
            .ignore(&ignored)
            .filter(|key| is_setting(key.as_str()))
            .split("__"),
    );
    for (key, raw) in SECRET_ENV_KEYS.iter().zip(&raw_keys) {
        let name = format!("{ENV_PREFIX}{}", raw.to_uppercase());
        if let Ok(value) = std::env::var(&name) {
            figment = figment.merge(Serialized::default(key, value));
        }
    }
    figment
        .extract()
        .map_err(|e| ConfigError::Extract(Box::new(e)))
}

impl RawConfig {
    /// Stage two: checks every key and collects all problems at once, so an
    /// operator fixes the file in one go rather than one error per restart.
    /// Secret files are read here too, after the shape is known to be right.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let database = self.database.validate(&mut problems);
        let delivery = self.delivery.validate(&mut problems);
        let retry = self.retry.validate(&mut problems);
        let circuit = self.circuit.validate(&mut problems);
        let smtp = self.smtp.validate(&mut problems);
        let notify = self.notify.validate(&mut problems);
        let metrics = self.metrics.validate(&mut problems);
        let retention = self.retention.validate(&mut problems);
        let log = self.log.validate(&mut problems);
        match (
            database, delivery, retry, circuit, smtp, notify, metrics, retention, log,
        ) {
            (
                Some(database),
                Some(delivery),
                Some(retry),
                Some(circuit),
                Some(smtp),
                Some(notify),
                Some(metrics),
                Some(retention),
                Some(log),
            ) if problems.is_empty() => Ok(Config {
                source: None,
                ignored_env: Vec::new(),
                database,
                delivery,
                retry,
                circuit,
                notify: NotifyConfig { smtp, ..notify },
                metrics,
                retention,
                log,
            }),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }
}

mod database;
mod delivery;
mod notify;
mod sections;
#[cfg(test)]
mod tests;
mod tls;
mod values;

pub use database::{DEFAULT_DATABASE_URL, DatabaseConfig, RawDatabase};
pub use delivery::{DeliveryConfig, RawDelivery, min_lease};
pub use notify::{NotifyConfig, RawNotify, RawSmtp, SmtpConfig, SmtpTls};
pub use tls::{DatabaseTls, TlsMode};
pub(crate) use values::secret_file;
pub use values::{Problem, Secret};
