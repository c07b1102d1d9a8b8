//! Stage two for each section: from what was written ([`super::RawConfig`]
//! and its parts) to the typed settings, every problem named by its key.

use std::time::Duration;

use super::tls::read_pem;
use super::values::{Problem, duration, duration_or, in_range, password_setting, problem};
use super::*;
use crate::backoff::RetryPolicy;

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
