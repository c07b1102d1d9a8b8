//! `[database]`: where to connect and how, what was written
//! ([`RawDatabase`]) and what it means ([`DatabaseConfig`]). The TLS keys
//! are checked in [`super::tls`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::tls::{DatabaseTls, TlsMode, database_tls, take_url_tls};
use super::values::{Problem, duration, duration_or_zero, in_range, password_setting, problem};

/// A role and a database of outboxd's own, not the superuser and the
/// maintenance database (the reference config.toml says how to create them).
pub const DEFAULT_DATABASE_URL: &str = "postgres://outboxd@127.0.0.1:5432/outboxd";
const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
const DEFAULT_POOL_SIZE: u32 = 4;

/// `database.schema_wait`: long enough for `outboxd-migrate.service`, which
/// retries every 5 s, to run once the database is back after a boot or an
/// outage during an upgrade.
const DEFAULT_SCHEMA_WAIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Connection settings, password included (its `Debug` redacts it).
    pub pg: tokio_postgres::Config,
    pub connect_timeout: Duration,
    /// Pooled connections for recording, claiming and upkeep (LISTEN and the
    /// plain claim have one each of their own: `store::pool::claim_pool`).
    pub pool_size: usize,
    /// How long `run` waits for `outboxd migrate` when it finds the schema
    /// older than itself; zero: exit 3 at once.
    pub schema_wait: Duration,
    /// TLS to the server, for every connection (pool, LISTEN, the CLI).
    pub tls: DatabaseTls,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub connect_timeout: Option<String>,
    pub pool_size: Option<u32>,
    pub schema_wait: Option<String>,
    pub tls: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
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
            .field("schema_wait", &self.schema_wait)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

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
