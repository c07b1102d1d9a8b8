//! Schema migrations: the numbered files in `sql/migrations/`, compiled into
//! the binary and applied in order by `outboxd migrate`.
//!
//! Several instances may start at once, so the whole run happens in one
//! transaction holding a transaction-scoped advisory lock: the second instance
//! waits, then finds nothing left to do. Each applied migration is recorded in
//! `outbox.schema_migrations` with an md5 of its text, computed by the server,
//! so an edited migration is caught instead of silently diverging.

use tokio_postgres::{Client, GenericClient};

use crate::db;

/// One migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration this binary knows, oldest first. Append only: a released
/// migration is never edited (the checksum check refuses that).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "outbox_schema",
        sql: include_str!("../sql/migrations/0001_outbox_schema.sql"),
    },
    Migration {
        version: 2,
        name: "notifications",
        sql: include_str!("../sql/migrations/0002_notifications.sql"),
    },
    Migration {
        version: 3,
        name: "replay",
        sql: include_str!("../sql/migrations/0003_replay.sql"),
    },
    Migration {
        version: 4,
        name: "retention",
        sql: include_str!("../sql/migrations/0004_retention.sql"),
    },
];

/// The schema version this binary expects.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

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
}

/// Brings the schema up to [`latest_version`]. Idempotent.
pub async fn migrate(client: &mut Client) -> Result<Report, MigrateError> {
    let tx = client
        .transaction()
        .await
        .map_err(step("starting the migration transaction"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(step("taking the migration lock"))?;
    // "schema already exists, skipping" and the like are expected here.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(step("starting the migration transaction"))?;
    tx.batch_execute(BOOTSTRAP)
        .await
        .map_err(step("creating outbox.schema_migrations"))?;

    let applied = verify_applied(&tx).await?;
    let from = applied.last().copied().unwrap_or(0);
    let mut report = Report {
        from,
        to: from,
        applied: Vec::new(),
    };
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let what = format!(
            "applying migration {} ({})",
            migration.version, migration.name
        );
        tx.batch_execute(migration.sql)
            .await
            .map_err(step(what.clone()))?;
        tx.execute(
            "INSERT INTO outbox.schema_migrations (version, name, checksum) VALUES ($1, $2, md5($3))",
            &[&migration.version, &migration.name, &migration.sql],
        )
        .await
        .map_err(step(what))?;
        report.applied.push(migration.version);
        report.to = migration.version;
    }
    tx.commit()
        .await
        .map_err(step("committing the migration"))?;
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
                    .query_one("SELECT md5($1)", &[&known.sql])
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
        Ok(SchemaState::Current { version: database })
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
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
            assert!(!m.sql.trim().is_empty(), "{}", m.name);
        }
    }

    #[test]
    fn lock_key_spells_outboxd() {
        assert_eq!(&MIGRATION_LOCK_KEY.to_be_bytes(), b"outboxd\0");
    }
}
