//! Configuration: built-in defaults, then a TOML file, then `OUTBOXD_…`
//! environment variables (`OUTBOXD_DATABASE__URL` sets `database.url`).
//!
//! Loading has two stages. figment extracts [`RawConfig`], which holds what
//! the operator wrote (durations as strings, every key optional);
//! [`RawConfig::validate`] turns it into the typed [`Config`] or into a list
//! of problems, each naming its key. Only then is any file read (secrets
//! given as `…_file`), so a typo is reported before anything else happens.
//!
//! `config.toml` at the repository root is the reference: every key, its
//! default and why.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Deserialize;

use crate::backoff::RetryPolicy;

/// Where `--config` falls back to when it is not given, in order.
pub const DEFAULT_CONFIG_PATHS: [&str; 2] = ["./config.toml", "/etc/outboxd/config.toml"];

/// Environment variables with this prefix override the file.
pub const ENV_PREFIX: &str = "OUTBOXD_";

/// A password or token. Its `Debug` prints a placeholder and it has no
/// `Display`, so it cannot end up in a log line or an error by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file that was read, if any.
    pub source: Option<PathBuf>,
    pub database: DatabaseConfig,
    pub delivery: DeliveryConfig,
    pub retry: RetryPolicy,
    pub notify: NotifyConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

/// The admin HTTP server: /metrics, /healthz, /readyz.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// None: no admin server.
    pub listen: Option<std::net::SocketAddr>,
    /// How often the queue gauges are refreshed from the database.
    pub refresh_interval: Duration,
}

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

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Connection settings, password included (its `Debug` redacts it).
    pub pg: tokio_postgres::Config,
    pub connect_timeout: Duration,
    /// Pooled connections for claiming and recording (LISTEN has its own).
    pub pool_size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Deliveries in flight at once, per instance.
    pub concurrency: usize,
    /// Longest wait between two looks for due events when no NOTIFY comes.
    pub poll_interval: Duration,
    /// TCP connect to the receiver.
    pub connect_timeout: Duration,
    /// One whole attempt: connect, TLS, request, response head and body.
    pub request_timeout: Duration,
    /// How long a claimed event stays reserved for this instance.
    pub lease: Duration,
    /// Response bodies are read up to this many bytes; the rest is dropped.
    pub max_response_bytes: usize,
    /// On SIGTERM, how long in-flight deliveries may take to finish.
    pub drain_timeout: Duration,
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
    pub smtp: RawSmtp,
    #[serde(default)]
    pub notify: RawNotify,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub connect_timeout: Option<String>,
    pub pool_size: Option<u32>,
}

// Hand-written so that neither the URL (which may carry a password) nor the
// password shows up when the raw config is debug-printed.
impl fmt::Debug for RawDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawDatabase")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    pub concurrency: Option<u32>,
    pub poll_interval: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub lease: Option<String>,
    pub max_response_bytes: Option<u64>,
    pub drain_timeout: Option<String>,
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
pub struct RawMetrics {
    pub listen: Option<String>,
    pub refresh_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub window: Option<String>,
    pub gather: Option<String>,
    pub poll_interval: Option<String>,
    pub retry_delay: Option<String>,
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
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_POOL_SIZE: u32 = 4;
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9187";
const DEFAULT_CONCURRENCY: u32 = 64;

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
    Ok(config)
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
    figment = figment.merge(Env::prefixed(ENV_PREFIX).ignore(&ignored).split("__"));
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
        let smtp = self.smtp.validate(&mut problems);
        let notify = self.notify.validate(&mut problems);
        let metrics = self.metrics.validate(&mut problems);
        let log = self.log.validate(&mut problems);
        match (database, delivery, retry, smtp, notify, metrics, log) {
            (
                Some(database),
                Some(delivery),
                Some(retry),
                Some(smtp),
                Some(notify),
                Some(metrics),
                Some(log),
            ) if problems.is_empty() => Ok(Config {
                source: None,
                database,
                delivery,
                retry,
                notify: NotifyConfig { smtp, ..notify },
                metrics,
                log,
            }),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }
}

impl RawDatabase {
    fn validate(self, problems: &mut Vec<Problem>) -> Option<DatabaseConfig> {
        let url = self.url.as_deref().unwrap_or(DEFAULT_DATABASE_URL);
        let mut pg = match tokio_postgres::Config::from_str(url) {
            Ok(pg) => Some(pg),
            Err(e) => {
                // The parser's message names the bad option; the URL itself is
                // not repeated because it may carry a password.
                problem(
                    problems,
                    "database.url",
                    format!("not a valid PostgreSQL connection URL ({e})"),
                );
                None
            }
        };
        if let Some(pg) = &pg {
            if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                problem(
                    problems,
                    "database.url",
                    "sslmode=require is not supported yet: outboxd connects without TLS; \
                     use a Unix socket or a loopback address, or leave sslmode unset",
                );
            }
            if pg.get_dbname().is_none() {
                problem(
                    problems,
                    "database.url",
                    "names no database (add /DBNAME to the URL)",
                );
            }
        }

        let connect_timeout = duration(
            problems,
            "database.connect_timeout",
            self.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let pool_size = in_range(
            problems,
            "database.pool_size",
            self.pool_size.unwrap_or(DEFAULT_POOL_SIZE),
            2,
            1000,
        );

        let password = match (self.password, self.password_file) {
            (Some(_), Some(_)) => {
                problem(
                    problems,
                    "database.password",
                    "give either password or password_file, not both",
                );
                None
            }
            (Some(p), None) => Some(Secret::new(p)),
            (None, Some(path)) => {
                secret_file(problems, "database.password_file", &path).map(Secret::new)
            }
            (None, None) => None,
        };

        let mut pg = pg.take()?;
        if let Some(password) = password {
            pg.password(password.expose());
        }
        if pg.get_application_name().is_none() {
            // Shows up in pg_stat_activity, so a DBA can tell the daemon's
            // sessions from the application's.
            pg.application_name("outboxd");
        }
        let connect_timeout = connect_timeout?;
        pg.connect_timeout(connect_timeout);
        Some(DatabaseConfig {
            pg,
            connect_timeout,
            pool_size: pool_size? as usize,
        })
    }
}

impl RawDelivery {
    fn validate(self, problems: &mut Vec<Problem>) -> Option<DeliveryConfig> {
        let concurrency = in_range(
            problems,
            "delivery.concurrency",
            self.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
            1,
            10_000,
        );
        let poll_interval = duration(
            problems,
            "delivery.poll_interval",
            self.poll_interval.as_deref(),
            "1s",
        );
        let connect_timeout = duration(
            problems,
            "delivery.connect_timeout",
            self.connect_timeout.as_deref(),
            "5s",
        );
        let request_timeout = duration(
            problems,
            "delivery.request_timeout",
            self.request_timeout.as_deref(),
            "10s",
        );
        let lease = duration(problems, "delivery.lease", self.lease.as_deref(), "60s");
        let max_response_bytes = in_range(
            problems,
            "delivery.max_response_bytes",
            self.max_response_bytes.unwrap_or(64 * 1024),
            1024,
            16 * 1024 * 1024,
        );
        let drain_timeout = duration(
            problems,
            "delivery.drain_timeout",
            self.drain_timeout.as_deref(),
            "20s",
        );
        if let (Some(lease), Some(request_timeout)) = (lease, request_timeout) {
            let least = min_lease(request_timeout);
            if lease < least {
                problem(
                    problems,
                    "delivery.lease",
                    format!(
                        "must be at least 2 x delivery.request_timeout + 10s ({}), so that a slow \
                         delivery is recorded before its lease runs out and another instance \
                         sends the event again",
                        humantime::format_duration(least)
                    ),
                );
            }
        }
        if let (Some(connect), Some(request)) = (connect_timeout, request_timeout) {
            if connect > request {
                problem(
                    problems,
                    "delivery.connect_timeout",
                    "must not be longer than delivery.request_timeout, which includes it",
                );
            }
        }
        Some(DeliveryConfig {
            concurrency: concurrency? as usize,
            poll_interval: poll_interval?,
            connect_timeout: connect_timeout?,
            request_timeout: request_timeout?,
            lease: lease?,
            max_response_bytes: max_response_bytes? as usize,
            drain_timeout: drain_timeout?,
        })
    }
}

/// The shortest lease accepted for a request timeout: two full attempts'
/// worth plus 10 s for recording the outcome, so a lease only runs out when
/// its daemon is really gone.
pub fn min_lease(request_timeout: Duration) -> Duration {
    request_timeout * 2 + Duration::from_secs(10)
}

impl RawSmtp {
    /// `Some(None)`: valid, and no SMTP configured.
    fn validate(self, problems: &mut Vec<Problem>) -> Option<Option<SmtpConfig>> {
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
        let password = match (self.password, self.password_file) {
            (Some(_), Some(_)) => {
                problem(
                    problems,
                    "smtp.password",
                    "give either password or password_file, not both",
                );
                None
            }
            (Some(p), None) => Some(Secret::new(p)),
            (None, Some(path)) => {
                secret_file(problems, "smtp.password_file", &path).map(Secret::new)
            }
            (None, None) => None,
        };
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

impl RawMetrics {
    fn validate(self, problems: &mut Vec<Problem>) -> Option<MetricsConfig> {
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
                            "{text:?} is not an address like \"127.0.0.1:9187\" (or \"off\" for no admin server)"
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

impl RawNotify {
    /// Returns the timings; `smtp` is filled in by the caller.
    fn validate(self, problems: &mut Vec<Problem>) -> Option<NotifyConfig> {
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

impl RawRetry {
    fn validate(self, problems: &mut Vec<Problem>) -> Option<RetryPolicy> {
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
    fn validate(self, problems: &mut Vec<Problem>) -> Option<LogConfig> {
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
            Some(other) => {
                problem(
                    problems,
                    "log.format",
                    format!("must be \"text\" or \"json\", got {other:?}"),
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

fn problem(problems: &mut Vec<Problem>, key: &str, message: impl Into<String>) {
    problems.push(Problem {
        key: key.to_string(),
        message: message.into(),
    });
}

/// No duration setting has a use beyond this, and bounding them keeps every
/// computed retry time representable.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A number within bounds, inclusive.
fn in_range<T>(problems: &mut Vec<Problem>, key: &str, value: T, min: T, max: T) -> Option<T>
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
fn duration_or(
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

/// Parses a humantime duration ("500ms", "5s", "1m 30s"), which must be
/// greater than zero.
fn duration(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_from_toml(text: &str) -> Result<RawConfig, Box<figment::Error>> {
        Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(Box::new)
    }

    fn problems_of(text: &str) -> Vec<String> {
        match raw_from_toml(text).map(RawConfig::validate) {
            Err(e) => vec![format!("extract: {e}")],
            Ok(Ok(_)) => vec![],
            Ok(Err(ConfigError::Invalid(problems))) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            Ok(Err(e)) => vec![format!("other: {e}")],
        }
    }

    #[test]
    fn empty_config_uses_the_defaults() {
        let config = RawConfig::default().validate().unwrap();
        assert_eq!(config.database.pg.get_dbname(), Some("postgres"));
        assert_eq!(config.database.pg.get_user(), Some("postgres"));
        assert_eq!(config.database.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.database.pg.get_application_name(), Some("outboxd"));
        assert_eq!(config.log.level, "info");
        assert_eq!(config.log.format, LogFormat::Text);
    }

    #[test]
    fn the_reference_config_is_valid_and_states_the_defaults() {
        let reference = raw_from_toml(include_str!("../config.toml"))
            .unwrap()
            .validate()
            .unwrap();
        let defaults = RawConfig::default().validate().unwrap();
        assert_eq!(format!("{reference:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn each_bad_value_is_reported_under_its_key() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("[database]\nconnect_timeout = \"2s\"", &[]),
            (
                "[database]\nconnect_timeout = \"soon\"",
                &["database.connect_timeout"],
            ),
            (
                "[database]\nconnect_timeout = \"0s\"",
                &["database.connect_timeout"],
            ),
            (
                "[database]\nurl = \"postgres://h/db?sslmode=bogus\"",
                &["database.url"],
            ),
            (
                "[database]\nurl = \"postgres://h/db?sslmode=require\"",
                &["database.url"],
            ),
            (
                "[database]\nurl = \"postgres://h:notaport/db\"",
                &["database.url"],
            ),
            ("[database]\nurl = \"postgres://h\"", &["database.url"]),
            (
                "[database]\npassword = \"a\"\npassword_file = \"/x\"",
                &["database.password"],
            ),
            (
                "[database]\npassword_file = \"/nonexistent/outboxd-secret\"",
                &["database.password_file"],
            ),
            ("[log]\nformat = \"xml\"", &["log.format"]),
            ("[delivery]\nconcurrency = 0", &["delivery.concurrency"]),
            ("[delivery]\nrequest_timeout = \"30s\"", &["delivery.lease"]),
            (
                "[delivery]\nrequest_timeout = \"30s\"\nlease = \"70s\"",
                &[],
            ),
            (
                "[delivery]\nconnect_timeout = \"20s\"",
                &["delivery.connect_timeout"],
            ),
            (
                "[delivery]\nmax_response_bytes = 10",
                &["delivery.max_response_bytes"],
            ),
            ("[retry]\nmax_attempts = 0", &["retry.max_attempts"]),
            ("[retry]\njitter = 1.5", &["retry.jitter"]),
            ("[retry]\nbase_delay = \"2h\"", &["retry.base_delay"]),
            ("[retry]\nmax_age = \"400days\"", &["retry.max_age"]),
            ("[smtp]\nhost = \"mail.example.com\"", &["smtp.from"]),
            (
                "[smtp]\nhost = \"h\"\nfrom = \"Ops <ops@x.com>\"",
                &["smtp.from"],
            ),
            (
                "[smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\ntls = \"ssl\"",
                &["smtp.tls"],
            ),
            (
                "[smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\nusername = \"u\"",
                &["smtp.username"],
            ),
            (
                "[smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\nusername = \"u\"\npassword = \"p\"",
                &[],
            ),
            ("[smtp]\nfrom = \"not checked without a host\"", &[]),
            ("[notify]\nwindow = \"soon\"", &["notify.window"]),
            ("[metrics]\nlisten = \"localhost\"", &["metrics.listen"]),
            ("[metrics]\nlisten = \"off\"", &[]),
            ("[metrics]\nlisten = \"[::1]:9187\"", &[]),
            ("[log]\nlevel = \"outboxd=loud\"", &["log.level"]),
            ("[log]\nlevel = \"debug\"\nformat = \"json\"", &[]),
            (
                "[database]\nconnect_timeout = \"x\"\n[log]\nformat = \"xml\"",
                &["database.connect_timeout", "log.format"],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(problems_of(text), *want, "config:\n{text}");
        }
    }

    #[test]
    fn smtp_port_follows_the_tls_mode() {
        for (tls, port) in [("starttls", 587), ("implicit", 465), ("none", 25)] {
            let text = format!("[smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\ntls = \"{tls}\"");
            let config = raw_from_toml(&text).unwrap().validate().unwrap();
            assert_eq!(config.notify.smtp.unwrap().port, port, "{tls}");
        }
        let config = RawConfig::default().validate().unwrap();
        assert_eq!(config.notify.smtp, None);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let err = raw_from_toml("[database]\npasword = \"x\"").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("pasword"), "{text}");

        let err = raw_from_toml("[database]\nconnect_timeout = 5").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("database.connect_timeout"), "{text}");
    }

    #[test]
    fn password_file_is_read_and_trimmed_of_one_newline() {
        let dir = std::env::temp_dir().join(format!("outboxd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let text = format!(
            "[database]\npassword_file = {:?}",
            path.display().to_string()
        );
        let config = raw_from_toml(&text).unwrap().validate().unwrap();
        assert_eq!(config.database.pg.get_password(), Some(&b"s3cret"[..]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let text = "[database]\nurl = \"postgres://u:urlpw@h/db\"\npassword = \"filepw\"\n\
                    [smtp]\nhost = \"h\"\nfrom = \"o@x.com\"\nusername = \"u\"\npassword = \"smtppw\"";
        let raw = raw_from_toml(text).unwrap();
        let raw_debug = format!("{raw:?}");
        let config = raw.validate().unwrap();
        let debug = format!("{config:?}");
        for shown in [raw_debug, debug, format!("{:?}", Secret::new("tok"))] {
            assert!(!shown.contains("urlpw"), "{shown}");
            assert!(!shown.contains("filepw"), "{shown}");
            assert!(!shown.contains("smtppw"), "{shown}");
            assert!(!shown.contains("tok\""), "{shown}");
        }
    }
}
