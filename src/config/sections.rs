//! Stage two for each section: from what was written ([`super::RawConfig`]
//! and its parts) to the typed settings, every problem named by its key.

use std::str::FromStr;
use std::time::Duration;

use super::values::{
    Problem, Secret, duration, duration_or, duration_or_zero, in_range, password_setting, problem,
};
use super::*;
use crate::backoff::RetryPolicy;

impl RawDatabase {
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<DatabaseConfig> {
        let url = self.url.as_deref().unwrap_or(DEFAULT_DATABASE_URL);
        // libpq's TLS parameters are read here, not by tokio-postgres (which
        // knows three sslmode values and no file parameter).
        let (url, url_tls) = take_url_tls(url);
        let mut pg = match tokio_postgres::Config::from_str(&url) {
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

        let schema_wait = duration_or_zero(
            problems,
            "database.schema_wait",
            self.schema_wait.as_deref(),
            DEFAULT_SCHEMA_WAIT,
        );
        let password = password_setting(problems, "database", self.password, self.password_file);
        let tls = database_tls(
            problems,
            url_tls,
            self.tls,
            self.tls_ca_file,
            self.tls_cert_file,
            self.tls_key_file,
        );

        let mut pg = pg.take()?;
        let tls = tls?;
        pg.ssl_mode(match tls.mode {
            TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
            _ => tokio_postgres::config::SslMode::Require,
        });
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
            schema_wait: schema_wait?,
            tls,
        })
    }
}

/// libpq's TLS parameters found in a database URL (`postgres://…?sslmode=…`
/// or the `key=value` form), taken out of it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct UrlTls {
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl UrlTls {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "sslmode" => Some(&mut self.sslmode),
            "sslrootcert" => Some(&mut self.sslrootcert),
            "sslcert" => Some(&mut self.sslcert),
            "sslkey" => Some(&mut self.sslkey),
            _ => None,
        }
    }
}

/// The URL without its TLS parameters, and those parameters.
pub(super) fn take_url_tls(url: &str) -> (String, UrlTls) {
    let mut found = UrlTls::default();
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), found);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                match found.slot(key) {
                    Some(slot) => {
                        *slot = Some(
                            percent_encoding::percent_decode_str(value)
                                .decode_utf8_lossy()
                                .into_owned(),
                        );
                        false
                    }
                    None => true,
                }
            })
            .collect();
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (url, found);
    }
    // key=value words, split at whitespace outside single quotes; a TLS
    // word is cut out with the whitespace before it, the rest kept as
    // written.
    let mut kept = String::with_capacity(url.len());
    let mut word_start = None;
    let mut quoted = false;
    let mut escaped = false;
    let mut last_end = 0;
    let chars: Vec<(usize, char)> = url.char_indices().collect();
    for (n, &(i, c)) in chars.iter().enumerate() {
        let boundary = c.is_whitespace() && !quoted;
        if !boundary && word_start.is_none() {
            word_start = Some(i);
        }
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '\'' {
            quoted = !quoted;
        }
        let ends = boundary || n + 1 == chars.len();
        if let (true, Some(from)) = (ends, word_start) {
            let to = if boundary { i } else { url.len() };
            let word = &url[from..to];
            let taken = word.split_once('=').is_some_and(|(key, value)| {
                !value.starts_with('\'')
                    && found
                        .slot(key)
                        .map(|slot| *slot = Some(value.to_string()))
                        .is_some()
            });
            if taken {
                kept.push_str(url[last_end..from].trim_end());
                last_end = to;
            }
            word_start = None;
        }
    }
    kept.push_str(&url[last_end..]);
    (kept, found)
}

/// `database.tls` and its files, each also accepted in the URL under
/// libpq's name (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`); given both
/// ways, they must agree.
fn database_tls(
    problems: &mut Vec<Problem>,
    url: UrlTls,
    mode: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> Option<DatabaseTls> {
    fn either(
        problems: &mut Vec<Problem>,
        key: &str,
        own: Option<String>,
        libpq: &str,
        in_url: Option<String>,
    ) -> Option<Option<(String, String)>> {
        match (own, in_url) {
            (Some(own), Some(in_url)) if own != in_url => {
                problem(
                    problems,
                    key,
                    format!("{own:?}, but database.url says {libpq}={in_url}: give one"),
                );
                None
            }
            (Some(own), _) => Some(Some((key.to_string(), own))),
            (None, Some(in_url)) => Some(Some(("database.url".to_string(), in_url))),
            (None, None) => Some(None),
        }
    }
    let path = |p: Option<PathBuf>| p.map(|p| p.display().to_string());
    let mode = either(problems, "database.tls", mode, "sslmode", url.sslmode);
    let ca = either(
        problems,
        "database.tls_ca_file",
        path(ca_file),
        "sslrootcert",
        url.sslrootcert,
    );
    let cert = either(
        problems,
        "database.tls_cert_file",
        path(cert_file),
        "sslcert",
        url.sslcert,
    );
    let key = either(
        problems,
        "database.tls_key_file",
        path(key_file),
        "sslkey",
        url.sslkey,
    );
    let (mode, ca, cert, key) = (mode?, ca?, cert?, key?);

    let mode = match mode {
        None => TlsMode::Disable,
        Some((key, text)) => match text.as_str() {
            "disable" => TlsMode::Disable,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            "prefer" | "allow" => {
                problem(
                    problems,
                    &key,
                    format!(
                        "{text:?} falls back to an unencrypted connection without saying so, which \
                         outboxd never does: use \"verify-full\" (with database.tls_ca_file for a \
                         private CA) or \"require\" to encrypt, or \"disable\""
                    ),
                );
                return None;
            }
            other => {
                problem(
                    problems,
                    &key,
                    format!(
                        "must be \"disable\", \"require\", \"verify-ca\" or \"verify-full\", got {other:?}"
                    ),
                );
                return None;
            }
        },
    };
    if mode == TlsMode::Disable {
        for (key, _) in [&ca, &cert, &key].into_iter().flatten() {
            problem(
                problems,
                key,
                "is set, but database.tls is \"disable\": set database.tls to use it",
            );
        }
        if ca.is_some() || cert.is_some() || key.is_some() {
            return None;
        }
    }
    // PostgreSQL 16's libpq takes sslrootcert=system for the system's CAs,
    // which is what no CA file means here.
    let ca_pem = match ca {
        Some((_, path)) if path == "system" => None,
        Some((key, path)) => {
            let pem = read_pem(problems, &key, &path, "CERTIFICATE")?;
            if native_tls::Certificate::stack_from_pem(&pem).is_err() {
                problem(
                    problems,
                    &key,
                    format!("{path}: the certificates do not parse"),
                );
                return None;
            }
            Some(pem)
        }
        None => None,
    };
    let client = match (cert, key) {
        (None, None) => None,
        (Some((key, _)), None) | (None, Some((key, _))) => {
            problem(
                problems,
                &key,
                "a client certificate needs both database.tls_cert_file and database.tls_key_file",
            );
            return None;
        }
        (Some((cert_key, cert_path)), Some((key_key, key_path))) => {
            let cert = read_pem(problems, &cert_key, &cert_path, "CERTIFICATE")?;
            let key_pem = match std::fs::read(&key_path) {
                Ok(pem) => pem,
                Err(e) => {
                    problem(problems, &key_key, format!("cannot read {key_path}: {e}"));
                    return None;
                }
            };
            let Ok(key_text) = String::from_utf8(key_pem) else {
                problem(problems, &key_key, format!("{key_path} is not a PEM file"));
                return None;
            };
            if !key_text.contains("-----BEGIN PRIVATE KEY-----") {
                problem(
                    problems,
                    &key_key,
                    format!(
                        "{key_path} holds no unencrypted PKCS#8 key (\"BEGIN PRIVATE KEY\"); \
                         convert it with `openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW`"
                    ),
                );
                return None;
            }
            if let Err(e) = native_tls::Identity::from_pkcs8(&cert, key_text.as_bytes()) {
                problem(
                    problems,
                    &key_key,
                    format!("{key_path} and {cert_path} do not make a client identity: {e}"),
                );
                return None;
            }
            Some((cert, Secret::new(key_text)))
        }
    };
    let tls = DatabaseTls {
        mode,
        ca_pem,
        client,
    };
    // What every connection will build: fail here, naming the setting.
    if tls.mode != TlsMode::Disable
        && let Err(e) = crate::db::native_connector(&tls)
    {
        problem(problems, "database.tls", e);
        return None;
    }
    Some(tls)
}

/// The file at `path`, which must hold a PEM block of `label`.
fn read_pem(problems: &mut Vec<Problem>, key: &str, path: &str, label: &str) -> Option<Vec<u8>> {
    let marker = format!("-----BEGIN {label}-----");
    match std::fs::read(path) {
        Ok(pem) if pem.windows(marker.len()).any(|w| w == marker.as_bytes()) => Some(pem),
        Ok(_) => {
            problem(
                problems,
                key,
                format!("{path} holds no PEM {}", label.to_lowercase()),
            );
            None
        }
        Err(e) => {
            problem(problems, key, format!("cannot read {path}: {e}"));
            None
        }
    }
}

impl RawDelivery {
    pub(super) fn validate(self, problems: &mut Vec<Problem>) -> Option<DeliveryConfig> {
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
        let mut allowed_networks = Vec::new();
        for (i, text) in self.allowed_networks.unwrap_or_default().iter().enumerate() {
            match text.trim().parse::<ipnet::IpNet>() {
                Ok(net) => allowed_networks.push(net),
                // A bare address means just that address.
                Err(_) => match text.trim().parse::<std::net::IpAddr>() {
                    Ok(ip) => allowed_networks.push(ipnet::IpNet::from(ip)),
                    Err(_) => problem(
                        problems,
                        &format!("delivery.allowed_networks[{i}]"),
                        format!("{text:?} is not a network like \"10.20.0.0/16\" or an address"),
                    ),
                },
            }
        }
        let tls_ca_pem = match &self.tls_ca_file {
            None => Some(None),
            Some(path) => read_pem(
                problems,
                "delivery.tls_ca_file",
                &path.display().to_string(),
                "CERTIFICATE",
            )
            .map(Some),
        };
        let endpoint_concurrency = in_range(
            problems,
            "delivery.endpoint_concurrency",
            self.endpoint_concurrency
                .unwrap_or(DEFAULT_ENDPOINT_CONCURRENCY),
            1,
            1000,
        );
        Some(DeliveryConfig {
            endpoint_concurrency: endpoint_concurrency?,
            allowed_networks,
            require_https: self.require_https.unwrap_or(false),
            tls_ca_pem: tls_ca_pem?,
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

/// `database.schema_wait`: long enough for `outboxd-migrate.service`, which
/// retries every 5 s, to run once the database is back after a boot or an
/// outage during an upgrade.
const DEFAULT_SCHEMA_WAIT: Duration = Duration::from_secs(120);
