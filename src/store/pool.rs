//! Database connections: one-off ones (`migrate`, `check`, the operator's
//! commands), the pools of the daemon (the main one, the plain claim's, the
//! upkeep's) with [`Checkout`], and the plain-text form of PostgreSQL
//! errors. What the server itself is (version, encoding, autovacuum) is
//! [`crate::store::server`].

use std::time::Duration;

use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::{Client, NoTls};

use crate::config::{DatabaseConfig, DatabaseTls, TlsMode};

#[derive(Debug, thiserror::Error)]
#[error("connecting to PostgreSQL at {target}: {reason}")]
pub struct ConnectError {
    /// Host(s), port and database: never the password.
    pub target: String,
    pub reason: String,
}

/// Opens one connection and drives it on a background task. The task ends
/// when the returned client is dropped.
pub async fn connect(config: &DatabaseConfig) -> Result<Client, ConnectError> {
    // connect_timeout in the config bounds each TCP connect; this bounds the
    // whole start-up exchange too, which a stalled server could otherwise hold
    // open forever.
    // One-off sessions (migrate, check, the operator CLI): no lock is waited
    // on for more than 30 s and no statement runs for more than 10 minutes
    // (room for a migration building an index on a large table), so a
    // command never hangs on a busy database without saying so.
    let mut pg = config.pg.clone();
    let options = match pg.get_options() {
        Some(own) if !own.trim().is_empty() => format!("{ONE_OFF_SESSION_OPTIONS} {own}"),
        _ => ONE_OFF_SESSION_OPTIONS.to_string(),
    };
    pg.options(options);
    let connect = async {
        match tls_connector(&config.tls) {
            None => pg.connect(NoTls).await.map(drive),
            Some(tls) => pg.connect(tls).await.map(drive),
        }
    };
    let attempt = tokio::time::timeout(config.connect_timeout * 2, connect);
    match attempt.await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(ConnectError {
            target: target(&config.pg),
            reason: describe(&e),
        }),
        Err(_) => Err(ConnectError {
            target: target(&config.pg),
            reason: format!("no answer within {:?}", config.connect_timeout * 2),
        }),
    }
}

/// Drives a new connection on a task of its own; the task ends when the
/// client is dropped.
fn drive<S, T>((client, connection): (Client, tokio_postgres::Connection<S, T>)) -> Client
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "database connection closed");
        }
    });
    client
}

/// The TLS side of every database connection, as `database.tls` says.
///
/// libpq's meanings: `require` encrypts without checking the certificate;
/// `verify-ca` checks that a trusted CA signed it; `verify-full` also that
/// it names the host connected to (or its IP address). With
/// `database.tls_ca_file` only those CAs are trusted, as with libpq's
/// sslrootcert; without it, the system's.
///
/// None with `disable`: no TLS context is built at all (OpenSSL's, with the
/// system's CAs loaded, costs a few MiB and tens of milliseconds each).
pub fn tls_connector(tls: &DatabaseTls) -> Option<MakeTlsConnector> {
    (tls.mode != TlsMode::Disable).then(|| {
        MakeTlsConnector::new(
            crate::config::native_connector(tls)
                .expect("the TLS settings were checked with the configuration"),
        )
    })
}

/// What `outboxd check` says of TLS: the mode, and with TLS the subject of
/// the certificate the server presented (read from a handshake of its own
/// on the first host, made as the connections make theirs, so a refused
/// certificate is refused here too).
pub async fn describe_tls(config: &DatabaseConfig) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_postgres::config::Host;
    let mode = config.tls.mode.as_str();
    if config.tls.mode == TlsMode::Disable {
        return Ok(format!("TLS {mode}"));
    }
    let host = match config.pg.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(_)) => return Ok(format!("TLS {mode} (a Unix socket: not encrypted)")),
        None => "localhost".to_string(),
    };
    let port = config.pg.get_ports().first().copied().unwrap_or(5432);
    let connector =
        tokio_native_tls::TlsConnector::from(crate::config::native_connector(&config.tls)?);
    let handshake = async {
        let mut tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("{host}:{port}: {e}"))?;
        // SSLRequest: length 8, code 80877103; the server answers S or N.
        tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer[0] != b'S' {
            return Err("the server does not offer TLS".to_string());
        }
        let tls = connector
            .connect(&host, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let certificate = tls
            .get_ref()
            .peer_certificate()
            .map_err(|e| e.to_string())?
            .ok_or("the server presented no certificate")?;
        let der = certificate.to_der().map_err(|e| e.to_string())?;
        let x509 = openssl::x509::X509::from_der(&der).map_err(|e| e.to_string())?;
        let subject: Vec<String> = x509
            .subject_name()
            .entries()
            .map(|entry| {
                let name = entry.object().nid().short_name().unwrap_or("?");
                let value = entry.data().to_string().unwrap_or_default();
                format!("{name}={value}")
            })
            .collect();
        Ok::<_, String>(subject.join(", "))
    };
    let subject = tokio::time::timeout(config.connect_timeout * 2, handshake)
        .await
        .map_err(|_| format!("no TLS answer within {:?}", config.connect_timeout * 2))??;
    Ok(format!("TLS {mode}, server certificate {subject}"))
}

/// A warning when the connections would carry the tenants' credentials in
/// clear over a network: TLS disabled towards a host that is neither a Unix
/// socket nor a loopback address.
pub fn plaintext_warning(config: &DatabaseConfig) -> Option<String> {
    use tokio_postgres::config::Host;
    if config.tls.mode != TlsMode::Disable {
        return None;
    }
    let remote: Vec<String> = config
        .pg
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            Host::Tcp(name) => {
                let local = name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                (!local).then(|| name.clone())
            }
            Host::Unix(_) => None,
        })
        .collect();
    (!remote.is_empty()).then(|| {
        format!(
            "database.tls is \"disable\" towards {}: the connections carry the endpoints' \
             passwords and tokens in clear; set database.tls = \"verify-full\" (or \"require\")",
            remote.join(", ")
        )
    })
}

/// `host:port/dbname` for messages, without user or password.
pub fn target(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .zip(pg.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            Host::Tcp(name) => format!("{name}:{port}"),
            Host::Unix(path) => format!("{}:{port}", path.display()),
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_string()
    } else {
        hosts.join(",")
    };
    format!("{hosts}/{}", pg.get_dbname().unwrap_or("?"))
}

/// A PostgreSQL error as one readable line: the server's message with its
/// detail and hint, or the client-side cause (refused, reset, timed out).
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = db.message().to_string();
        if let Some(detail) = db.detail() {
            text.push_str(" (");
            text.push_str(detail);
            text.push(')');
        }
        if let Some(hint) = db.hint() {
            text.push_str("; hint: ");
            text.push_str(hint);
        }
        return text;
    }
    // The source carries the useful part ("Connection refused (os error
    // 111)"); the outer text alone is often just "error connecting to server".
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// A pooled connection for one bounded round trip. If the round trip is
/// abandoned half-way (its deadline passed, or shutdown cancelled it), the
/// connection still has a request in flight, and on a dead network path it
/// would stay broken until the kernel gives up: handed back to the pool it
/// would cost the next caller its whole deadline too. So unless
/// [`Checkout::done`] is called, dropping it closes the connection instead.
pub struct Checkout(Option<deadpool_postgres::Client>);

impl Checkout {
    /// A connection from `pool` for `user` (the metric's label: claim,
    /// record, mailer, upkeep, stop). A checkout that finds every
    /// connection of a full pool in use waits for one: that wait is counted
    /// ([`crate::telemetry::pool_wait`]), since it is how one job of the
    /// daemon slows another down.
    pub async fn get(
        pool: &deadpool_postgres::Pool,
        user: &'static str,
    ) -> Result<Checkout, deadpool_postgres::PoolError> {
        let status = pool.status();
        let must_wait = status.available == 0 && status.size >= status.max_size;
        let asked = std::time::Instant::now();
        let client = pool.get().await;
        if must_wait {
            crate::telemetry::pool_wait(user, asked.elapsed());
        }
        Ok(Checkout(Some(client?)))
    }

    /// The round trip finished: back to the pool.
    pub fn done(mut self) {
        drop(self.0.take());
    }
}

impl std::ops::Deref for Checkout {
    type Target = deadpool_postgres::Client;

    fn deref(&self) -> &deadpool_postgres::Client {
        self.0.as_ref().expect("used before done()")
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut deadpool_postgres::Client {
        self.0.as_mut().expect("used before done()")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            // Out of the pool and dropped: the connection closes.
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Why no pooled connection could be had, as one readable line: the
/// connection error's cause (refused, reset, authentication) rather than
/// deadpool's "error occurred while creating a new object" alone.
pub fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => describe(e),
        PoolError::Timeout(_) => format!("no connection within the pool's timeout ({e})"),
        other => other.to_string(),
    }
}

const ONE_OFF_SESSION_OPTIONS: &str = "-c lock_timeout=30s -c statement_timeout=10min";

/// Settings for pooled sessions (claims, records, the mailer, maintenance):
/// - no statement runs over 30 s and no lock is waited on for over 10 s, so
///   a DBA's `LOCK TABLE` or a dead server shows up as an error the caller
///   retries, not as a task (and a shutdown) that hangs;
/// - `synchronous_commit=off`: a commit returns before its WAL is flushed.
///   If the database crashes, the last fraction of a second of claims and
///   marks may be lost; a lost claim leaves the event claimable, a lost mark
///   leaves it leased until the lease expires and it is delivered again with
///   the same Idempotency-Key. At-least-once delivery holds; what it buys is
///   throughput: 6,500 to 10,000 events/s in the drain benchmark on the
///   2-core development machine (docs/BENCHMARKS.md). The sales
///   application's enqueue transactions are not affected. Claims and marks
///   still wait for a synchronous standby when the server names one
///   (`sql/queries/begin_durable.sql`), so that a failover keeps them.
/// - `plan_cache_mode=force_custom_plan`, `enable_seqscan=off`,
///   `enable_bitmapscan=off`: every pooled statement is built around an
///   index walked in order (the claim reads `events_pending_due` oldest
///   first and stops after its LIMIT; marks probe the primary key). Statements are
///   prepared once per connection, and after five runs PostgreSQL may settle
///   on a generic plan made from the statistics of that moment, which on a
///   young table describe almost no rows: a plan that reads every entry,
///   the dead ones each delivery leaves until vacuum included. Measured in
///   the latency benchmark (500 single-event transactions a second for 30 s
///   from a fresh database): with cached plans claims slowed from about
///   1 ms to 10-50 ms and p99 commit-to-receiver latency reached 70 ms; with
///   a plan made per execution p99 is 1 ms. Planning costs about 0.1 ms per
///   statement, a few microseconds per event at the daemon's batch sizes.
///   Sequential and bitmap scans (which also read every entry) are used
///   only where no index path exists. (Those cached plans were made with
///   sequential and bitmap scans allowed, of statements not written for
///   it. The plain claim now keeps its plan: [`claim_pool`].)
/// - `jit=off`: every statement is short and planned per execution, so
///   compiling it with LLVM can only cost. With the server's default
///   (`jit_above_cost` 100,000), a table holding a million queued rows of
///   one endpoint pushed a per-endpoint claim's estimate over the threshold
///   and it was compiled on every run: 39-43 ms instead of 3.3-3.7 ms
///   (docs/design/fair-claims/).
const POOLED_SESSION_OPTIONS: &str = "-c statement_timeout=30s -c lock_timeout=10s \
     -c synchronous_commit=off -c plan_cache_mode=force_custom_plan \
     -c enable_seqscan=off -c enable_bitmapscan=off -c jit=off";

/// TCP keepalive idle time of pooled connections (see `build_pool`).
const POOLED_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);

/// `statement_timeout` of pooled sessions (in `POOLED_SESSION_OPTIONS`).
pub const POOLED_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest one pooled round trip may take, connection included: waiting
/// for a pooled connection and opening one (each bounded by twice
/// `database.connect_timeout`), the statement (its timeout, which the server
/// enforces; `tcp_user_timeout` covers a dead network path), and 5 s for
/// the reply to travel. Callers wrap their round trips in it, so that no
/// loop waits on the database without a deadline, whatever the server does.
pub fn round_trip_limit(config: &DatabaseConfig) -> Duration {
    config.connect_timeout * 4 + POOLED_STATEMENT_TIMEOUT + Duration::from_secs(5)
}

/// Added for the plain claim's own session ([`claim_pool`]): its plan is
/// made once per connection, not at every claim.
///
/// The plain claim (`sql/queries/claim.sql`) runs for every claim while no
/// endpoint is held, one event per claim when the queue is quiet, and
/// planning it took about as long as running it (0.36-0.45 ms,
/// docs/BENCHMARKS.md). It is the one pooled statement written so that a
/// plan made without its parameters, from whatever the statistics say when
/// it is first run, cannot read more of the queue than the rows it claims;
/// claim.sql says how.
const PLAIN_CLAIM_SESSION_OPTIONS: &str = "-c plan_cache_mode=force_generic_plan";

/// The connection pool for recording, the fair claim and the mailer (which
/// holds a connection only for its statements, never during SMTP). Connections are opened lazily, so building it never fails on an
/// unreachable database; the first `get()` does, after at most twice the
/// connect timeout.
pub fn pool(config: &DatabaseConfig) -> deadpool_postgres::Pool {
    build_pool(config, POOLED_SESSION_OPTIONS, config.pool_size)
}

/// Connections of the periodic upkeep (lease expiry, the hold limit, the
/// queue gauges, retention, the signing watch): a pool of its own, so that a long retention
/// batch or a slow gauge query never takes a connection the claim or the
/// recorder is waiting for. Two: the services take turns on them (each
/// tick is one short statement, bounded by the round-trip limit).
pub fn upkeep_pool(config: &DatabaseConfig) -> deadpool_postgres::Pool {
    build_pool(config, POOLED_SESSION_OPTIONS, UPKEEP_POOL_SIZE)
}

/// The size of [`upkeep_pool`].
pub const UPKEEP_POOL_SIZE: usize = 2;

/// The plain claim's connection, one per daemon (the claim loop makes one
/// claim at a time), with [`PLAIN_CLAIM_SESSION_OPTIONS`] on top of the
/// pooled sessions' settings. Nothing else runs on it.
pub fn claim_pool(config: &DatabaseConfig) -> deadpool_postgres::Pool {
    build_pool(
        config,
        &format!("{POOLED_SESSION_OPTIONS} {PLAIN_CLAIM_SESSION_OPTIONS}"),
        1,
    )
}

fn build_pool(config: &DatabaseConfig, session: &str, size: usize) -> deadpool_postgres::Pool {
    use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
    let mut pg = config.pg.clone();
    // Every pooled statement (claim, record, mailer, gauges) is short. These
    // bounds turn a blocked lock or a dead server into an error the caller
    // retries, instead of a task that hangs (and a shutdown that waits on it).
    // The operator's own options come last and win.
    let options = match pg.get_options() {
        Some(own) if !own.trim().is_empty() => format!("{session} {own}"),
        _ => session.to_string(),
    };
    pg.options(options);
    pg.tcp_user_timeout(Duration::from_secs(30));
    // An idle pooled connection to a server that vanished without closing
    // it (a failed primary's host, a cut network path) is found dead within
    // about 16 s (10 s idle, then 3 probes 2 s apart), and closed, instead
    // of after the kernel's two hours: after a failover nothing hands out
    // connections to the old primary. (One the server's end reset, as on
    // a crash of PostgreSQL alone, is closed at once.)
    pg.keepalives(true)
        .keepalives_idle(POOLED_KEEPALIVE_IDLE)
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3);
    let manager_config = ManagerConfig {
        // Fast: a broken connection shows up as an error on use and is
        // then dropped, and one whose connection task has ended (closed by
        // the server, or by the keepalives) is dropped at the checkout; a
        // new one goes through the hosts of the URL in order, honouring
        // target_session_attrs=read-write. A test query before every
        // checkout would add a round trip to every claim.
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls_connector(&config.tls) {
        None => Manager::from_config(pg, NoTls, manager_config),
        Some(tls) => Manager::from_config(pg, tls, manager_config),
    };
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(config.connect_timeout * 2),
            create: Some(config.connect_timeout * 2),
            recycle: Some(config.connect_timeout),
        })
        .build()
        .expect("a pool with a runtime and timeouts builds")
}

#[cfg(test)]
mod plaintext_tests {
    use crate::config::{RawConfig, RawDatabase};

    fn warning(url: &str, tls: Option<&str>) -> Option<String> {
        let config = RawConfig {
            database: RawDatabase {
                url: Some(url.to_string()),
                tls: tls.map(str::to_string),
                ..Default::default()
            },
            ..Default::default()
        }
        .validate()
        .expect("a valid configuration");
        super::plaintext_warning(&config.database)
    }

    #[test]
    fn plaintext_towards_another_host_is_warned_about() {
        let table = [
            // (url, database.tls, warned)
            ("postgres://u@127.0.0.1:5432/db", None, false),
            ("postgres://u@localhost/db", None, false),
            ("postgres://u@[::1]:5432/db", None, false),
            ("host=/var/run/postgresql dbname=db", None, false),
            ("postgres://u@db.internal.example.com/db", None, true),
            ("postgres://u@10.0.0.5/db", Some("disable"), true),
            (
                "postgres://u@db.internal.example.com/db",
                Some("require"),
                false,
            ),
            (
                "postgres://u@db.internal.example.com/db?sslmode=verify-full",
                None,
                false,
            ),
        ];
        for (url, tls, warned) in table {
            let got = warning(url, tls);
            assert_eq!(got.is_some(), warned, "{url} {tls:?}: {got:?}");
            if let Some(text) = got {
                assert!(text.contains("database.tls"), "{text}");
                assert!(!text.contains("u@"), "no user in it: {text}");
            }
        }
    }
}
