//! Periodic upkeep outside the delivery path: the queue gauges, refreshed by
//! one cheap query every `metrics.refresh_interval` (not per delivery)
//! ([`Maintenance`]), the retention cleanup ([`Retention`]), the limit
//! on how long an open circuit holds an event ([`HoldLimit`]), the
//! return to the queue of events whose lease ran out ([`LeaseExpiry`]),
//! and the endpoints that stopped signing ([`SigningWatch`]).
//!
//! All are [`Service`]s: `run_once()` does one round and returns what it
//! found (what tests call); the service's tick calls it and logs a failure.
//! In the daemon each is [`elected`](LeaseExpiry::elected): its tick does
//! its round only on the instance that the maintenance election
//! ([`crate::election`]) chose, and on the others waits to be chosen, so
//! that N instances cost the database what one does.

use std::time::Duration;

use metrics::gauge;

use crate::config::{CircuitConfig, DeliveryConfig, RetentionConfig};
use crate::election::Role;
use crate::service::{Next, Service};
use crate::store::pool as db;
use crate::store::upkeep;
pub use crate::store::upkeep::{CIRCUIT_STATES, Deleted, QueueStats, SigningStopped};
use crate::telemetry::{
    CIRCUIT_OPEN_LONGEST, ENDPOINTS, ENDPOINTS_HELD, ENDPOINTS_UNSIGNED, EVENTS_HELD,
    EVENTS_LEASED, EVENTS_PENDING, NOTIFICATIONS_QUEUED, OLDEST_DUE_AGE, OLDEST_HELD_AGE,
    SIGNING_STOPPED,
};
use metrics::counter;

/// How often a job that does not lead looks again whether it does (a look
/// at a flag, not at the database): a new leader's jobs start within this.
const STANDBY_LOOK: Duration = Duration::from_secs(1);

/// Events put back in the queue per statement by [`LeaseExpiry`].
const RELEASE_BATCH: i64 = 1000;

/// Puts back in the queue the events whose lease ran out (their daemon died
/// mid-delivery), every quarter of `delivery.lease` (at least every
/// `delivery.poll_interval`), batch after batch while there are more, and
/// wakes the claim loop when it did (`sql/queries/release_expired.sql`).
/// The claims read pending rows only; this is how such an event gets back
/// to them, at most a quarter of a lease after the lease ran out: 15 s with
/// the default 60 s lease, so that an idle daemon does not ask the database
/// something every second for what only happens when an instance dies.
/// The elected instance runs it (SKIP LOCKED would keep several apart).
pub struct LeaseExpiry {
    pool: deadpool_postgres::Pool,
    role: Role,
    interval: Duration,
    limit: Duration,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl Service for LeaseExpiry {
    const NAME: &'static str = "lease expiry";

    fn tick_limit(&self) -> Duration {
        self.limit
    }

    fn after_overrun(&self) -> Duration {
        self.interval
    }

    async fn tick(&mut self) -> Next {
        if !self.role.leading() {
            return Next::After(STANDBY_LOOK);
        }
        match self.run_once().await {
            Ok(0) => {}
            Ok(released) => {
                tracing::warn!(
                    released,
                    "events whose lease ran out (an instance stopped mid-delivery?) are due again"
                );
                if released >= RELEASE_BATCH {
                    return Next::Now;
                }
            }
            Err(e) => {
                crate::telemetry::database_error("maintenance");
                tracing::warn!(error = %e, "putting back events whose lease ran out");
            }
        }
        Next::After(self.interval)
    }
}

impl LeaseExpiry {
    /// Runs its rounds only while `role` leads.
    pub fn elected(mut self, role: Role) -> LeaseExpiry {
        self.role = role;
        self
    }

    pub fn new(
        pool: deadpool_postgres::Pool,
        config: &DeliveryConfig,
        limit: Duration,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> LeaseExpiry {
        LeaseExpiry {
            pool,
            role: Role::always(),
            interval: (config.lease / 4).max(config.poll_interval),
            limit,
            wake,
        }
    }

    /// One batch; returns how many events it put back, and wakes the claim
    /// loop if any.
    pub async fn run_once(&self) -> Result<i64, String> {
        let released = upkeep::release_expired(&self.pool, RELEASE_BATCH).await?;
        if released > 0 {
            self.wake.notify_one();
        }
        Ok(released)
    }
}

/// Events failed per statement by [`HoldLimit`].
const HOLD_BATCH: i64 = 1000;

/// Fails the events an open circuit has held for longer than
/// `circuit.max_hold` past their due time (`sql/queries/expire_held.sql`),
/// once a minute, batch after batch while there are more. The elected
/// instance runs it (SKIP LOCKED would keep several apart).
pub struct HoldLimit {
    pool: deadpool_postgres::Pool,
    role: Role,
    max_hold: Duration,
    interval: Duration,
    limit: Duration,
}

impl Service for HoldLimit {
    const NAME: &'static str = "hold limit";

    fn tick_limit(&self) -> Duration {
        self.limit
    }

    fn after_overrun(&self) -> Duration {
        self.interval
    }

    async fn tick(&mut self) -> Next {
        if !self.role.leading() {
            return Next::After(STANDBY_LOOK);
        }
        match self.run_once().await {
            Ok(failed) if failed >= HOLD_BATCH => return Next::Now,
            Ok(0) => {}
            Ok(failed) => tracing::warn!(
                failed,
                max_hold = %humantime::format_duration(self.max_hold),
                "failed events held too long by an open circuit; their companies are notified"
            ),
            Err(e) => {
                crate::telemetry::database_error("maintenance");
                tracing::warn!(error = %e, "failing events held too long");
            }
        }
        Next::After(self.interval)
    }
}

impl HoldLimit {
    /// Runs its rounds only while `role` leads.
    pub fn elected(mut self, role: Role) -> HoldLimit {
        self.role = role;
        self
    }

    pub fn new(
        pool: deadpool_postgres::Pool,
        config: &CircuitConfig,
        limit: Duration,
    ) -> HoldLimit {
        HoldLimit {
            pool,
            role: Role::always(),
            max_hold: config.max_hold,
            interval: Duration::from_secs(60).min(config.max_hold),
            limit,
        }
    }

    /// One batch; returns how many events it failed.
    pub async fn run_once(&self) -> Result<i64, String> {
        upkeep::expire_held(&self.pool, self.max_hold, HOLD_BATCH).await
    }
}

pub struct Maintenance {
    pool: deadpool_postgres::Pool,
    role: Role,
    interval: Duration,
    /// One round trip's bound (`store::pool::round_trip_limit`).
    limit: Duration,
}

impl Service for Maintenance {
    const NAME: &'static str = "queue gauges";

    fn tick_limit(&self) -> Duration {
        self.limit
    }

    fn after_overrun(&self) -> Duration {
        self.interval
    }

    async fn tick(&mut self) -> Next {
        if !self.role.leading() {
            return Next::After(STANDBY_LOOK);
        }
        if let Err(e) = self.run_once().await {
            crate::telemetry::database_error("maintenance");
            tracing::warn!(error = %e, "refreshing queue metrics");
        }
        Next::After(self.interval)
    }
}

impl Maintenance {
    /// Runs its rounds only while `role` leads.
    pub fn elected(mut self, role: Role) -> Maintenance {
        self.role = role;
        self
    }

    pub fn new(pool: deadpool_postgres::Pool, interval: Duration, limit: Duration) -> Maintenance {
        Maintenance {
            pool,
            role: Role::always(),
            interval,
            limit,
        }
    }

    /// Reads the queue and sets the gauges.
    pub async fn run_once(&self) -> Result<QueueStats, String> {
        let client = db::Checkout::get(&self.pool, "upkeep")
            .await
            .map_err(|e| db::describe_pool(&e))?;
        let stats = upkeep::queue_stats(&client)
            .await
            .map_err(|e| db::describe(&e))?;
        client.done();
        gauge!(EVENTS_PENDING).set(stats.pending as f64);
        gauge!(EVENTS_LEASED).set(stats.leased as f64);
        gauge!(OLDEST_DUE_AGE).set(stats.oldest_due_age.as_secs_f64());
        gauge!(NOTIFICATIONS_QUEUED).set(stats.emails_queued as f64);
        for (state, n) in CIRCUIT_STATES.iter().zip(stats.endpoints) {
            gauge!(ENDPOINTS, "circuit" => *state).set(n as f64);
        }
        gauge!(EVENTS_HELD).set(stats.held as f64);
        gauge!(OLDEST_HELD_AGE).set(stats.oldest_held_age.as_secs_f64());
        gauge!(ENDPOINTS_HELD).set(stats.endpoints_held as f64);
        gauge!(CIRCUIT_OPEN_LONGEST).set(stats.longest_open.as_secs_f64());
        crate::telemetry::queue_gauges_refreshed();
        self.role.gauges_refreshed();
        Ok(stats)
    }
}

/// Deletes finished rows past their retention, and signing secrets
/// expired for longer than `retention.delivered`, in batches.
pub struct Retention {
    pool: deadpool_postgres::Pool,
    role: Role,
    config: RetentionConfig,
    /// One round trip's bound (`store::pool::round_trip_limit`).
    limit: Duration,
    /// Deleted so far in this round, logged when the round ends.
    round: Deleted,
}

/// Every `retention.interval` a round: batch after batch (a tick each) until
/// a batch comes back short, so a backlog is cleared in one round without
/// one huge transaction.
impl Service for Retention {
    const NAME: &'static str = "retention";

    fn tick_limit(&self) -> Duration {
        self.limit
    }

    /// A batch that hung (a partitioned database) waits for the next round,
    /// as a failed one does.
    fn after_overrun(&self) -> Duration {
        self.config.interval
    }

    async fn tick(&mut self) -> Next {
        if !self.role.leading() {
            return Next::After(STANDBY_LOOK);
        }
        match self.run_once().await {
            Ok(deleted) => {
                self.round.events += deleted.events;
                self.round.emails += deleted.emails;
                self.round.secrets += deleted.secrets;
                if deleted.events >= self.config.batch_size
                    || deleted.emails >= self.config.batch_size
                    || deleted.secrets >= self.config.batch_size
                {
                    return Next::Now;
                }
            }
            Err(e) => {
                crate::telemetry::database_error("maintenance");
                tracing::warn!(error = %e, "retention cleanup");
            }
        }
        let round = std::mem::take(&mut self.round);
        if round != Deleted::default() {
            tracing::info!(
                events = round.events,
                emails = round.emails,
                signing_secrets = round.secrets,
                "retention: deleted old rows"
            );
        }
        Next::After(self.config.interval)
    }
}

impl Retention {
    /// Runs its rounds only while `role` leads.
    pub fn elected(mut self, role: Role) -> Retention {
        self.role = role;
        self
    }

    pub fn new(
        pool: deadpool_postgres::Pool,
        config: RetentionConfig,
        limit: Duration,
    ) -> Retention {
        Retention {
            pool,
            role: Role::always(),
            config,
            limit,
            round: Deleted::default(),
        }
    }

    /// One batch.
    pub async fn run_once(&self) -> Result<Deleted, String> {
        upkeep::retention(&self.pool, &self.config).await
    }
}

/// Finds the endpoints that have had a signing secret and have none
/// active any more (`sql/queries/signing_watch.sql`), every
/// `metrics.refresh_interval`: each such endpoint is logged (with its
/// company), counted, and its notify_emails are emailed once; its
/// requests go out unsigned meanwhile. The elected instance runs it (the
/// statement's row lock would make exactly one of several report each
/// change).
///
/// Why unsigned rather than held or failed: an application that removes an
/// endpoint's secrets on purpose (its "stop signing") must not see its
/// events stop; a receiver that verifies signatures refuses the unsigned
/// requests itself, and those failures reach the company the usual way,
/// on top of this one email saying why.
pub struct SigningWatch {
    pool: deadpool_postgres::Pool,
    role: Role,
    interval: Duration,
    /// notify.window: no second email about one endpoint within it.
    window: Duration,
    limit: Duration,
}

impl Service for SigningWatch {
    const NAME: &'static str = "signing watch";

    fn tick_limit(&self) -> Duration {
        self.limit
    }

    fn after_overrun(&self) -> Duration {
        self.interval
    }

    async fn tick(&mut self) -> Next {
        if !self.role.leading() {
            return Next::After(STANDBY_LOOK);
        }
        if let Err(e) = self.run_once().await {
            crate::telemetry::database_error("maintenance");
            tracing::warn!(error = %e, "looking for endpoints that stopped signing");
        }
        Next::After(self.interval)
    }
}

impl SigningWatch {
    /// Runs its rounds only while `role` leads.
    pub fn elected(mut self, role: Role) -> SigningWatch {
        self.role = role;
        self
    }

    pub fn new(
        pool: deadpool_postgres::Pool,
        interval: Duration,
        window: Duration,
        limit: Duration,
    ) -> SigningWatch {
        SigningWatch {
            pool,
            role: Role::always(),
            interval,
            window,
            limit,
        }
    }

    /// One look: logs and counts what changed, sets the gauge.
    pub async fn run_once(&self) -> Result<upkeep::SigningWatch, String> {
        let found = upkeep::signing_watch(&self.pool, self.window).await?;
        for stopped in &found.stopped {
            counter!(SIGNING_STOPPED).increment(1);
            tracing::warn!(
                company_id = stopped.company_id,
                event_type = %stopped.event_type,
                secrets = %stopped.why,
                emailed = stopped.emailed,
                "an endpoint that signed its requests has no active signing secret: they go out \
                 unsigned, and a receiver that verifies signatures will refuse them; give it a \
                 secret (outboxd endpoint secret rotate), or clear it to stop signing on purpose \
                 (outboxd endpoint secret clear)"
            );
        }
        for (company_id, event_type) in &found.resumed {
            tracing::info!(
                company_id,
                event_type = %event_type,
                "an endpoint has an active signing secret again: its requests are signed"
            );
        }
        gauge!(ENDPOINTS_UNSIGNED).set(found.unsigned as f64);
        Ok(found)
    }
}
