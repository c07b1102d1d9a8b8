//! Schema migrations: the numbered files in `sql/migrations/`, compiled into
//! the binary and applied in order by `outboxd migrate`.
//!
//! Several instances may start at once, so the whole run holds an advisory
//! lock (see [`migrate`] for how it is taken) and the migrations themselves
//! run in one transaction: the second instance waits, then finds nothing
//! left to do. Each applied migration is recorded in
//! `outbox.schema_migrations` with an md5 of its text, computed by the server,
//! so an edited migration is caught instead of silently diverging.
//!
//! An index on a table the sales application writes cannot be built (or
//! dropped) inside that transaction without blocking its writes until the
//! end. Such indexes go in the migration's `.online.sql` file: after the
//! transaction commits, each is built with `CREATE INDEX CONCURRENTLY`,
//! still under the lock, and an invalid leftover of an interrupted build is
//! dropped and built again; then the indexes a later migration replaced
//! are dropped with `DROP INDEX CONCURRENTLY`. Until every index still
//! wanted is valid, [`status`] reports the schema as
//! [`SchemaState::Incomplete`] and the daemon waits, as for a migration not
//! yet run. (An old index not dropped yet costs only speed, not correctness,
//! and does not hold the daemon back.)
//!
//! Writing a migration: it runs while the sales application enqueues, so
//! nothing in its transaction may read or rewrite `outbox.events` (or
//! another large table) under a lock that blocks writes. Add a check with
//! `NOT VALID` (new and updated rows are checked, existing ones not read;
//! they were written by code that already kept the rule), an index in the
//! `.online.sql` part, a column only without a volatile default (no
//! rewrite). Two migrations predate this (README, "Under systemd"), and
//! block enqueues when an old schema is upgraded: 0003's checks scan the
//! table once under its lock (from version 2 or older), and 0004 builds
//! `events_delivered_at` and `events_failed_since` with a plain `CREATE
//! INDEX` in the transaction (from version 3 or older): each build reads
//! the whole table, and its lock blocks the table's writes until the
//! transaction, all later migrations of the run included, commits.
//!
//! A change of the catalogue (a dropped constraint or trigger) still needs
//! a brief exclusive lock on the table. Queued behind an application
//! transaction that holds the table for minutes, it would hold up every
//! enqueue behind it for as long. So the migration transaction waits for a
//! lock at most [`LOCK_WAIT`] and, refused, rolls back and tries again a
//! little later ([`migrate_locked`]): the enqueues wait at most that long
//! per try.

use tokio_postgres::{Client, GenericClient};

pub use crate::store::migrations::latest_version;
use crate::store::migrations::{MIGRATIONS, OnlineIndex, all_online_drops, all_online_indexes};
use crate::store::pool as db;

/// Key of the advisory lock taken while migrating: the bytes of "outboxd\0"
/// read as a big-endian integer, unlikely to meet an application's own keys.
const MIGRATION_LOCK_KEY: i64 = 0x6f7574626f786400;

const BOOTSTRAP: &str = "
    CREATE SCHEMA IF NOT EXISTS outbox;
    CREATE TABLE IF NOT EXISTS outbox.schema_migrations (
        version    integer     PRIMARY KEY,
        name       text        NOT NULL,
        checksum   text        NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    );";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{step}: {reason}")]
    Database { step: String, reason: String },
    #[error(
        "the database schema is at version {database}, newer than this outboxd knows ({binary}); \
         upgrade outboxd instead of migrating with an older binary"
    )]
    NewerThanBinary { database: i32, binary: i32 },
    #[error(
        "migration {version} ({name}) was changed after it was applied: its text no longer \
         matches the checksum stored in outbox.schema_migrations"
    )]
    Modified { version: i32, name: String },
}

/// Of `indexes`, in order, those whose state in the database `keep` (given
/// whether the index exists and whether it is valid) selects.
async fn indexes_where(
    client: &impl GenericClient,
    indexes: Vec<OnlineIndex>,
    keep: fn(bool, bool) -> bool,
) -> Result<Vec<OnlineIndex>, MigrateError> {
    let names: Vec<&str> = indexes.iter().map(|i| i.name.as_str()).collect();
    let rows = client
        .query(
            "SELECT x.indexrelid IS NOT NULL, coalesce(x.indisvalid, false)
               FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i)
               LEFT JOIN pg_index AS x
                      ON x.indexrelid = to_regclass('outbox.' || quote_ident(u.n))
              ORDER BY u.i",
            &[&names],
        )
        .await
        .map_err(step("looking for the online indexes"))?;
    Ok(indexes
        .into_iter()
        .zip(rows)
        .filter(|(_, row)| keep(row.get(0), row.get(1)))
        .map(|(index, _)| index)
        .collect())
}

/// The online indexes not (yet) built and valid.
async fn missing_indexes(client: &impl GenericClient) -> Result<Vec<OnlineIndex>, MigrateError> {
    indexes_where(client, all_online_indexes(), |_, valid| !valid).await
}

/// The indexes a migration replaced that are still there (a `migrate`
/// interrupted after its builds): they cost the writes of `outbox.events`
/// some speed, nothing else, and the next `migrate` drops them.
async fn leftover(client: &impl GenericClient) -> Result<Vec<OnlineIndex>, MigrateError> {
    indexes_where(client, all_online_drops(), |exists, _| exists).await
}

/// The names of the replaced indexes still there (see [`leftover`]), for
/// `outboxd check`.
pub async fn leftover_indexes(client: &impl GenericClient) -> Result<Vec<String>, MigrateError> {
    Ok(leftover(client)
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect())
}

/// Builds the online indexes that are missing or invalid, then drops the
/// ones they replace, one statement at a time outside any transaction,
/// under the migration lock. No statement timeout applies meanwhile: a
/// build reads the whole table twice, and a drop waits for the
/// transactions that use the index. Returns what it built and dropped.
async fn build_online(client: &Client) -> Result<(Vec<String>, Vec<String>), MigrateError> {
    let missing = missing_indexes(client).await?;
    let leftover = leftover(client).await?;
    if missing.is_empty() && leftover.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    client
        .batch_execute("SET statement_timeout = 0; SET client_min_messages = warning")
        .await
        .map_err(step("preparing the online index builds"))?;
    let done = async {
        let built = build_missing(client, missing).await?;
        let dropped = drop_leftover(client, leftover).await?;
        Ok((built, dropped))
    }
    .await;
    let _ = client
        .batch_execute("RESET statement_timeout; RESET client_min_messages")
        .await;
    done
}

async fn drop_leftover(
    client: &Client,
    leftover: Vec<OnlineIndex>,
) -> Result<Vec<String>, MigrateError> {
    let mut dropped = Vec::new();
    for index in leftover {
        let what = format!("dropping the replaced index outbox.{} online", index.name);
        client.batch_execute(&index.sql).await.map_err(step(what))?;
        dropped.push(index.name);
    }
    Ok(dropped)
}

async fn build_missing(
    client: &Client,
    missing: Vec<OnlineIndex>,
) -> Result<Vec<String>, MigrateError> {
    let mut built = Vec::new();
    for index in missing {
        let what = format!("building index outbox.{} online", index.name);
        // An interrupted build leaves an invalid index, which IF NOT
        // EXISTS would take for done.
        client
            .batch_execute(&format!(
                "DROP INDEX CONCURRENTLY IF EXISTS outbox.\"{}\"",
                index.name
            ))
            .await
            .map_err(step(what.clone()))?;
        client.batch_execute(&index.sql).await.map_err(step(what))?;
        built.push(index.name);
    }
    Ok(built)
}

fn step(step: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> MigrateError {
    let step = step.into();
    move |e| MigrateError::Database {
        step,
        reason: db::describe(&e),
    }
}

/// What a `migrate` run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The version before the run (0 for an empty database).
    pub from: i32,
    pub to: i32,
    /// Versions applied by this run, in order.
    pub applied: Vec<i32>,
    /// Online indexes this run built (`outbox.` names).
    pub built: Vec<String>,
    /// Replaced indexes this run dropped that were there before it (not
    /// those its own migrations created and replaced, on a new schema).
    pub dropped: Vec<String>,
}

/// How often a `migrate` that finds another one running looks again.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Brings the schema up to [`latest_version`]. Idempotent.
///
/// The migration lock is a session advisory lock, taken by trying once a
/// second rather than by waiting in a statement: `CREATE INDEX
/// CONCURRENTLY` waits for every transaction and statement of the database
/// that started before it, so a second host blocked inside a lock-waiting
/// statement would deadlock with the first host's build. Between tries
/// nothing runs, and another host's migration may take as long as it needs.
pub async fn migrate(client: &mut Client) -> Result<Report, MigrateError> {
    let mut told = false;
    loop {
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(step("taking the migration lock"))?
            .get(0);
        if locked {
            break;
        }
        if !std::mem::replace(&mut told, true) {
            tracing::info!("another `outboxd migrate` is running; waiting for it to finish");
        }
        tokio::time::sleep(LOCK_RETRY).await;
    }
    let migrated = migrate_locked(client).await;
    // Ending the session releases the lock too; this is for a client that
    // goes on.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    migrated
}

/// Longest wait for one lock in the migration transaction; see the module
/// documentation. A transaction of the sales application's is over in
/// milliseconds, so a longer wait means one that is not, and waiting on
/// behind it would only hold up the enqueues queued behind the migration.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Pause before the next try after [`LOCK_WAIT`] ran out, doubling up to
/// [`LOCK_RETRY_MAX`]: enqueues flow freely between tries.
const LOCK_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
const LOCK_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Applies the pending migrations in one transaction, trying again while a
/// lock it needs is held by another transaction for longer than
/// [`LOCK_WAIT`]; then builds the online indexes.
async fn migrate_locked(client: &mut Client) -> Result<Report, MigrateError> {
    // The replaced indexes there before this run: on an empty database the
    // first migrations create indexes that later ones replace, and dropping
    // those replaces nothing the operator had.
    let before = leftover_indexes(client).await?;
    let mut pause = LOCK_RETRY_FIRST;
    let report = loop {
        match migrate_transaction(client).await {
            Err(Attempt::LockBusy(reason)) => {
                tracing::warn!(
                    error = %reason,
                    retry_in = ?pause,
                    "a lock the migration needs is held by another transaction; trying again \
                     (enqueues are not held up meanwhile)"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LOCK_RETRY_MAX);
            }
            Err(Attempt::Failed(e)) => return Err(e),
            Ok(report) => break report,
        }
    };
    let mut report = report;
    (report.built, report.dropped) = build_online(client).await?;
    report.dropped.retain(|name| before.contains(name));
    Ok(report)
}

/// How one try of the migration transaction ended, if not applied.
enum Attempt {
    /// A lock was not granted within [`LOCK_WAIT`]; nothing was applied.
    LockBusy(String),
    Failed(MigrateError),
}

impl From<MigrateError> for Attempt {
    fn from(e: MigrateError) -> Attempt {
        Attempt::Failed(e)
    }
}

/// A step of the migration transaction, telling a lock timeout apart.
fn tx_step(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Attempt {
    let what = what.into();
    move |e| {
        if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
            Attempt::LockBusy(format!("{what}: {}", db::describe(&e)))
        } else {
            Attempt::Failed(step(what)(e))
        }
    }
}

async fn migrate_transaction(client: &mut Client) -> Result<Report, Attempt> {
    let tx = client
        .transaction()
        .await
        .map_err(tx_step("starting the migration transaction"))?;
    // "schema already exists, skipping" and the like are expected here.
    tx.batch_execute(&format!(
        "SET LOCAL client_min_messages = warning; SET LOCAL lock_timeout = '{}ms'",
        LOCK_WAIT.as_millis()
    ))
    .await
    .map_err(tx_step("starting the migration transaction"))?;
    tx.batch_execute(BOOTSTRAP)
        .await
        .map_err(tx_step("creating outbox.schema_migrations"))?;

    let applied = verify_applied(&tx).await?;
    let from = applied.last().copied().unwrap_or(0);
    let mut report = Report {
        from,
        to: from,
        applied: Vec::new(),
        built: Vec::new(),
        dropped: Vec::new(),
    };
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let what = format!(
            "applying migration {} ({})",
            migration.version, migration.name
        );
        tx.batch_execute(migration.sql)
            .await
            .map_err(tx_step(what.clone()))?;
        tx.execute(
            "INSERT INTO outbox.schema_migrations (version, name, checksum) VALUES ($1, $2, md5($3))",
            &[&migration.version, &migration.name, &migration.text()],
        )
        .await
        .map_err(tx_step(what))?;
        report.applied.push(migration.version);
        report.to = migration.version;
    }
    tx.commit()
        .await
        .map_err(tx_step("committing the migration"))?;
    Ok(report)
}

/// Reads the applied versions and checks them against this binary: none may
/// be newer, and each known one must still have the text it was applied with.
async fn verify_applied(client: &impl GenericClient) -> Result<Vec<i32>, MigrateError> {
    let rows = client
        .query(
            "SELECT version, name, checksum FROM outbox.schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(step("reading outbox.schema_migrations"))?;
    let mut versions = Vec::with_capacity(rows.len());
    for row in rows {
        let version: i32 = row.get(0);
        let name: String = row.get(1);
        let checksum: String = row.get(2);
        match MIGRATIONS.iter().find(|m| m.version == version) {
            None if version > latest_version() => {
                return Err(MigrateError::NewerThanBinary {
                    database: version,
                    binary: latest_version(),
                });
            }
            None => return Err(MigrateError::Modified { version, name }),
            Some(known) => {
                let row = client
                    .query_one("SELECT md5($1)", &[&known.text()])
                    .await
                    .map_err(step("computing migration checksums"))?;
                let expected: String = row.get(0);
                if expected != checksum {
                    return Err(MigrateError::Modified { version, name });
                }
            }
        }
        versions.push(version);
    }
    Ok(versions)
}

/// How the database's schema compares with this binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    /// At [`latest_version`], checksums matching.
    Current { version: i32 },
    /// Older than this binary (0: never migrated): run `outboxd migrate`.
    Behind { database: i32, binary: i32 },
    /// At [`latest_version`], but an index built online is missing or
    /// invalid (a `migrate` interrupted during the build): run it again.
    Incomplete { version: i32, index: String },
}

impl SchemaState {
    /// What an operator is told when the daemon cannot run on this schema
    /// yet (None: it can).
    pub fn problem(&self) -> Option<String> {
        match self {
            SchemaState::Current { .. } => None,
            SchemaState::Behind { database: 0, .. } => {
                Some("the outbox schema is missing; run `outboxd migrate`".to_string())
            }
            SchemaState::Behind { database, binary } => Some(format!(
                "the outbox schema is at version {database}, this binary needs {binary}; \
                 run `outboxd migrate`"
            )),
            SchemaState::Incomplete { version, index } => Some(format!(
                "the outbox schema is at version {version}, but its index outbox.{index} is not \
                 built yet (or its build was interrupted); run `outboxd migrate`, which builds \
                 it without blocking writes"
            )),
        }
    }
}

/// Read-only check used by `outboxd check` and at daemon start-up: creates
/// nothing and takes no lock.
pub async fn status(client: &Client) -> Result<SchemaState, MigrateError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('outbox.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(step("looking for outbox.schema_migrations"))?
        .get(0);
    let applied = if exists {
        verify_applied(client).await?
    } else {
        Vec::new()
    };
    let database = applied.last().copied().unwrap_or(0);
    if database == latest_version() {
        match missing_indexes(client).await?.into_iter().next() {
            Some(index) => Ok(SchemaState::Incomplete {
                version: database,
                index: index.name,
            }),
            None => Ok(SchemaState::Current { version: database }),
        }
    } else {
        Ok(SchemaState::Behind {
            database,
            binary: latest_version(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_key_spells_outboxd() {
        assert_eq!(&MIGRATION_LOCK_KEY.to_be_bytes(), b"outboxd\0");
    }
}
