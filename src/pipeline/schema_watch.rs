//! The schema looked at again while running: when a claim or a write is
//! refused for structural reasons (an undefined column or function, a
//! privilege, a trigger's error), the cause may be a newer binary's
//! migration applied under this one during a rolling upgrade. Then this
//! instance can only do harm (its statements are the old schema's), so it
//! stops, with the exit code that systemd does not restart (3, as at
//! start).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::migrate::{self, MigrateError};
use crate::store::pool as db;

/// Looks at most this often, however many statements fail: a revoked
/// privilege fails every claim and every write.
pub const RECHECK_EVERY: Duration = Duration::from_secs(5);

/// Looks at the schema again when asked, and stops the instance on a newer
/// one.
pub struct SchemaWatch {
    pool: deadpool_postgres::Pool,
    /// Bound on one look.
    limit: Duration,
    /// Cancelled to stop the instance.
    stop: CancellationToken,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last: Option<Instant>,
    newer: Option<String>,
}

impl SchemaWatch {
    pub fn new(pool: deadpool_postgres::Pool, limit: Duration, stop: CancellationToken) -> Self {
        SchemaWatch {
            pool,
            limit,
            stop,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A statement of `operation` was refused for structural reasons
    /// (`why`): reads the schema's version again (at most once per
    /// [`RECHECK_EVERY`], within the round-trip limit) and, when it is
    /// newer than this binary, stops the instance. True when it did.
    pub async fn recheck(&self, operation: &str, why: &str) -> bool {
        {
            let mut state = self.state();
            if state.newer.is_some() {
                return true;
            }
            let now = Instant::now();
            if state.last.is_some_and(|last| now < last + RECHECK_EVERY) {
                return false;
            }
            state.last = Some(now);
        }
        let looked = tokio::time::timeout(self.limit, async {
            let client = db::Checkout::get(&self.pool, "schema")
                .await
                .map_err(|e| db::describe_pool(&e))?;
            let status = migrate::status(&client).await;
            client.done();
            Ok::<_, String>(status)
        })
        .await;
        match looked {
            Ok(Ok(Err(e @ MigrateError::NewerThanBinary { .. }))) => {
                let problem = format!(
                    "{e}: a newer outboxd migrated the schema under this one (its {operation} \
                     failed: {why}); stopping, and systemd does not restart this version"
                );
                tracing::error!("{problem}");
                self.state().newer = Some(problem);
                self.stop.cancel();
                true
            }
            Ok(Ok(Ok(state))) => {
                tracing::warn!(
                    operation,
                    error = why,
                    schema = ?state,
                    "a statement was refused for what the database is (a privilege, a trigger, \
                     a changed table?), and the schema's version is this binary's; check grants \
                     and triggers on the outbox schema"
                );
                false
            }
            Ok(Ok(Err(e))) => {
                tracing::warn!(operation, error = why, schema_check = %e, "a statement was refused and the schema check failed too");
                false
            }
            Ok(Err(e)) => {
                tracing::warn!(operation, error = why, schema_check = %e, "a statement was refused; the schema could not be checked");
                false
            }
            Err(_) => false,
        }
    }

    /// Why the instance stopped, when a newer schema stopped it.
    pub fn newer(&self) -> Option<String> {
        self.state().newer.clone()
    }
}
