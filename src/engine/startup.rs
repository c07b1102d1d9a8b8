//! Phase zero of `outboxd run`: waiting, as long as it takes, for a
//! database that answers and carries this binary's schema (up to
//! `database.schema_wait` for a migration still running), and learning what
//! its encoding can store.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::error::EngineError;
use crate::config::DatabaseConfig;
use crate::service::Heartbeat;
use crate::store::migrate::{self, MigrateError};
use crate::store::pool as db;
use crate::store::server;
use crate::systemd;

/// Waits between tries to reach the database at start: doubling from the
/// first to the last. 5 s at most, so deliveries start within 5 s of the
/// database coming up, at the cost of one connection attempt per 5 s.
const FIRST_START_RETRY: Duration = Duration::from_secs(1);
const MAX_START_RETRY: Duration = Duration::from_secs(5);

/// Why the database cannot be used at start.
enum Unusable {
    /// Not reachable now (down, refusing, timing out): wait and try again.
    Unreachable(String),
    /// The schema is older than this binary: the migration may not have run
    /// yet (a first install or an upgrade while the database was down, with
    /// `outboxd-migrate.service` retrying beside us). Wait up to
    /// `database.schema_wait`.
    Behind(String),
    /// Reached, but this binary must not run on it: stop.
    Refused(EngineError),
}

/// Phase zero: until the database answers and its schema is current (what
/// its encoding can store), or `shutdown` (None). Each failure is logged and
/// shown in systemd's STATUS=; `heartbeat` promises each try's and each
/// wait's bound.
pub(super) async fn wait_for_database(
    pool: &deadpool_postgres::Pool,
    config: &DatabaseConfig,
    limit: Duration,
    shutdown: &CancellationToken,
    heartbeat: Heartbeat,
) -> Result<Option<server::Charset>, EngineError> {
    let mut delay = FIRST_START_RETRY;
    let mut behind_since: Option<Instant> = None;
    let result = loop {
        heartbeat.within(limit);
        let checked = tokio::select! {
            _ = shutdown.cancelled() => break Ok(None),
            checked = tokio::time::timeout(limit, check_database(pool)) => checked
                .unwrap_or_else(|_| Err(Unusable::Unreachable(format!("no answer within {limit:?}")))),
        };
        let status = match checked {
            Ok(charset) => break Ok(Some(charset)),
            Err(Unusable::Refused(e)) => break Err(e),
            Err(Unusable::Behind(problem)) => {
                let since = *behind_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= config.schema_wait {
                    break Err(EngineError::Schema(problem));
                }
                tracing::warn!(
                    problem = %problem,
                    gives_up_in = %humantime::format_duration(Duration::from_secs(
                        config.schema_wait.saturating_sub(since.elapsed()).as_secs().max(1)
                    )),
                    retry_in = %humantime::format_duration(delay),
                    "waiting for `outboxd migrate`: the schema is not what this binary needs"
                );
                format!("waiting for the schema migration: {problem}")
            }
            Err(Unusable::Unreachable(reason)) => {
                tracing::warn!(
                    error = %reason,
                    retry_in = %humantime::format_duration(delay),
                    "waiting for the database"
                );
                format!("waiting for the database: {reason}")
            }
        };
        systemd::status(&status);
        heartbeat.within(delay);
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_START_RETRY);
    };
    heartbeat.retire();
    result
}

/// Refuses a schema that is not this binary's; warns when the server does
/// not vacuum or cannot store every character; returns what it can store.
async fn check_database(pool: &deadpool_postgres::Pool) -> Result<server::Charset, Unusable> {
    let client = pool
        .get()
        .await
        .map_err(|e| Unusable::Unreachable(db::describe_pool(&e)))?;
    match migrate::status(&client).await {
        Ok(state) => {
            if let Some(problem) = state.problem() {
                return Err(Unusable::Behind(problem));
            }
        }
        // A statement failed: the connection broke, or the server is
        // shutting down or in recovery. Try again.
        Err(MigrateError::Database { step, reason }) => {
            return Err(Unusable::Unreachable(format!("{step}: {reason}")));
        }
        Err(e) => return Err(Unusable::Refused(e.into())),
    }
    // Delivers all the same, but the operator should know: see
    // docs/BENCHMARKS.md for what a 1M backlog cost without autovacuum.
    if let Ok(false) = server::autovacuum_runs(&client).await {
        tracing::warn!(
            "PostgreSQL's autovacuum is off: the dead row versions every delivery leaves in \
             outbox.events are not reclaimed, so the table and its indexes grow and claims slow \
             down; turn autovacuum on, or VACUUM the outbox tables regularly"
        );
    }
    let (encoding, charset) = server::server_encoding(&client).await.map_err(|e| {
        Unusable::Unreachable(format!("reading server_encoding: {}", db::describe(&e)))
    })?;
    if charset != server::Charset::Unicode {
        tracing::warn!(
            encoding,
            "the database's encoding cannot store every character: characters of receivers' \
             messages outside it are stored escaped (\\u{{…}}); a UTF8 database stores them as sent"
        );
    }
    Ok(charset)
}
