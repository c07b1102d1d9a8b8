//! The statements of the periodic upkeep ([`crate::maintenance`]'s
//! services) and what they return: events whose lease ran out put back in
//! the queue, events held too long by an open circuit failed, the queue's
//! figures for the gauges and `outboxd status`, and retention.

use std::time::Duration;

use crate::config::RetentionConfig;
use crate::store::pool as db;

const QUEUE_SQL: &str = include_str!("../../sql/queries/queue_stats.sql");
const RETENTION_SQL: &str = include_str!("../../sql/queries/retention.sql");
const EXPIRE_HELD_SQL: &str = include_str!("../../sql/queries/expire_held.sql");
const RELEASE_EXPIRED_SQL: &str = include_str!("../../sql/queries/release_expired.sql");

/// Runs one of the upkeep statements on a connection of the upkeep's pool
/// ([`db::upkeep_pool`]; prepared once per connection) and returns its one
/// row; errors as text.
async fn one_row(
    pool: &deadpool_postgres::Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<tokio_postgres::Row, String> {
    let client = db::Checkout::get(pool, "upkeep")
        .await
        .map_err(|e| db::describe_pool(&e))?;
    let statement = client
        .prepare_cached(sql)
        .await
        .map_err(|e| db::describe(&e))?;
    let row = client
        .query_one(&statement, params)
        .await
        .map_err(|e| db::describe(&e))?;
    client.done();
    Ok(row)
}

/// Puts back in the queue up to `batch` events whose lease ran out
/// (`sql/queries/release_expired.sql`); how many it did.
pub async fn release_expired(pool: &deadpool_postgres::Pool, batch: i64) -> Result<i64, String> {
    let row = one_row(pool, RELEASE_EXPIRED_SQL, &[&batch]).await?;
    Ok(row.get("released"))
}

/// Fails up to `batch` events an open circuit has held for longer than
/// `max_hold` past their due time (`sql/queries/expire_held.sql`); how many
/// it did.
pub async fn expire_held(
    pool: &deadpool_postgres::Pool,
    max_hold: Duration,
    batch: i64,
) -> Result<i64, String> {
    let max_hold_ms = max_hold.as_millis() as i64;
    let readable = humantime::format_duration(max_hold).to_string();
    let row = one_row(pool, EXPIRE_HELD_SQL, &[&max_hold_ms, &batch, &readable]).await?;
    Ok(row.get("failed"))
}

/// The queue as one query saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueStats {
    pub pending: i64,
    pub leased: i64,
    /// Age since enqueue of the oldest event due now whose endpoint is not
    /// held (see `held`), 0 when none is: what no instance has got to.
    pub oldest_due_age: Duration,
    pub emails_queued: i64,
    /// Endpoints by circuit state: closed, open, half-open, paused.
    pub endpoints: [i64; 4],
    /// Pending events of endpoints whose circuit is not closed (open,
    /// half-open, paused by an operator) or that a Retry-After pauses;
    /// counted up to [`HELD_COUNT_LIMIT`], which means that many or more.
    pub held: i64,
    /// Age since enqueue of the oldest of those that is due now, 0 when
    /// none is.
    pub oldest_held_age: Duration,
    /// Held endpoints with an event due now.
    pub endpoints_held: i64,
    /// How long the longest-open circuit has been open (0: none is).
    pub longest_open: Duration,
}

/// Where `queue_stats.sql` stops counting held events (an index range read
/// that far and no further): [`QueueStats::held`] at this value means at
/// least this many.
pub const HELD_COUNT_LIMIT: i64 = 10_000;

/// The states of [`QueueStats::endpoints`], as the metric labels them.
pub const CIRCUIT_STATES: [&str; 4] = ["closed", "open", "half_open", "paused"];

/// Reads the queue in one statement (`sql/queries/queue_stats.sql`); also
/// what `outboxd status` shows.
pub async fn queue_stats(
    client: &tokio_postgres::Client,
) -> Result<QueueStats, tokio_postgres::Error> {
    let row = client.query_one(QUEUE_SQL, &[]).await?;
    let age_ms: i64 = row.get("oldest_due_age_ms");
    let held_ms: i64 = row.get("oldest_held_age_ms");
    let open_ms: i64 = row.get("longest_open_ms");
    Ok(QueueStats {
        pending: row.get("pending"),
        leased: row.get("leased"),
        oldest_due_age: Duration::from_millis(age_ms.max(0) as u64),
        emails_queued: row.get("emails_queued"),
        endpoints: [
            row.get("closed"),
            row.get("open"),
            row.get("half_open"),
            row.get("paused"),
        ],
        held: row.get("held"),
        oldest_held_age: Duration::from_millis(held_ms.max(0) as u64),
        endpoints_held: row.get("endpoints_held"),
        longest_open: Duration::from_millis(open_ms.max(0) as u64),
    })
}

/// Rows one retention round deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub events: i64,
    pub emails: i64,
    /// Signing secrets expired for longer than `retention.delivered`.
    pub secrets: i64,
}

/// One retention batch (`sql/queries/retention.sql`): finished events,
/// sent emails and long-expired signing secrets past their retention, at
/// most `config.batch_size` of each.
pub async fn retention(
    pool: &deadpool_postgres::Pool,
    config: &RetentionConfig,
) -> Result<Deleted, String> {
    let ms = |d: Duration| d.as_millis() as i64;
    let row = one_row(
        pool,
        RETENTION_SQL,
        &[
            &ms(config.delivered),
            &ms(config.failed),
            &ms(config.emails),
            &config.batch_size,
        ],
    )
    .await?;
    Ok(Deleted {
        events: row.get("events"),
        emails: row.get("emails"),
        secrets: row.get("secrets"),
    })
}

const SIGNING_WATCH_SQL: &str = include_str!("../../sql/queries/signing_watch.sql");

/// An endpoint that has had a signing secret and now has no active one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningStopped {
    pub company_id: i64,
    pub event_type: String,
    /// "expired" (its last secret expired) or "removed" (none left).
    pub why: String,
    /// An email to its notify_emails was queued.
    pub emailed: bool,
}

/// What one look at the signing endpoints found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SigningWatch {
    /// Endpoints found without an active secret this time (each is found
    /// once, by one instance).
    pub stopped: Vec<SigningStopped>,
    /// Endpoints that sign again: (company, event type).
    pub resumed: Vec<(i64, String)>,
    /// Endpoints without an active secret now, all told.
    pub unsigned: i64,
}

/// Notes the endpoints that stopped or resumed signing, queueing one email
/// for each that stopped unless one went out within `window`
/// (`sql/queries/signing_watch.sql`).
pub async fn signing_watch(
    pool: &deadpool_postgres::Pool,
    window: Duration,
) -> Result<SigningWatch, String> {
    let client = db::Checkout::get(pool, "upkeep")
        .await
        .map_err(|e| db::describe_pool(&e))?;
    let statement = client
        .prepare_cached(SIGNING_WATCH_SQL)
        .await
        .map_err(|e| db::describe(&e))?;
    let window_ms = window.as_millis() as i64;
    let rows = client
        .query(&statement, &[&window_ms])
        .await
        .map_err(|e| db::describe(&e))?;
    client.done();
    let mut found = SigningWatch::default();
    for row in &rows {
        match row.get::<_, &str>("change") {
            "stopped" => found.stopped.push(SigningStopped {
                company_id: row.get("company_id"),
                event_type: row.get("event_type"),
                why: row.get("why"),
                emailed: row.get("emailed"),
            }),
            "resumed" => found
                .resumed
                .push((row.get("company_id"), row.get("event_type"))),
            _ => found.unsigned = row.get("unsigned"),
        }
    }
    Ok(found)
}
