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
//!
//! This file loads; each section is checked in a file of its own under
//! `src/config/` (its raw and typed settings, and the check between them),
//! all re-exported here:
//!
//! - `database.rs`: `[database]`, with `tls.rs` for its TLS (the modes,
//!   libpq's parameters in the URL, the PEM files, the OpenSSL connector);
//! - `delivery.rs`: `[delivery]`;
//! - `notify.rs`: `[smtp]` and `[notify]`;
//! - `retry.rs`: `[retry]` and `[circuit]`;
//! - `operations.rs`: `[metrics]`, `[retention]` and `[log]`;
//! - `values.rs`: what they all check alike (a [`Problem`] under its key,
//!   numbers within bounds, durations, [`Secret`]s and their files).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Deserialize;

use crate::backoff::RetryPolicy;
pub use crate::model::Secret;

mod database;
mod delivery;
mod notify;
mod operations;
mod retry;
#[cfg(test)]
mod tests;
mod tls;
mod values;

pub use database::{DEFAULT_DATABASE_URL, DatabaseConfig, RawDatabase};
pub use delivery::{DeliveryConfig, RawDelivery, min_lease};
pub use notify::{NotifyConfig, RawNotify, RawSmtp, SmtpConfig, SmtpTls};
pub use operations::{
    LogConfig, LogFormat, MetricsConfig, RawLog, RawMetrics, RawRetention, RetentionConfig,
};
pub use retry::{CircuitConfig, RawCircuit, RawRetry};
pub use tls::{DatabaseTls, TlsMode, native_connector};
pub use values::Problem;
pub(crate) use values::secret_file;

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
