//! What the operator's `events`, `status` and `enqueue` commands read and
//! change: events listed and shown with their attempts and emails, failed
//! events replayed, the outbox's figures, and an event enqueued through the
//! same function as the application's. Rows are returned as they come; the
//! commands lay them out.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use tokio_postgres::{Client, GenericClient, Row};
use uuid::Uuid;

const LIST_SQL: &str = include_str!("../../sql/queries/events_list.sql");
const EVENT_SQL: &str = include_str!("../../sql/queries/event.sql");
const ATTEMPTS_SQL: &str = include_str!("../../sql/queries/event_attempts.sql");
const EMAILS_SQL: &str = include_str!("../../sql/queries/event_emails.sql");
const REPLAY_SQL: &str = include_str!("../../sql/queries/replay.sql");
const FAILED_SQL: &str = include_str!("../../sql/queries/failed_events.sql");
const COUNTS_SQL: &str = include_str!("../../sql/queries/event_counts.sql");
const RATIO_SQL: &str = include_str!("../../sql/queries/failure_ratio.sql");
const FAILING_SQL: &str = include_str!("../../sql/queries/failing_endpoints.sql");
const CIRCUITS_SQL: &str = include_str!("../../sql/queries/circuits.sql");
const STATES_SQL: &str = "SELECT id, state FROM outbox.events WHERE id = ANY($1)";
const WAKE_SQL: &str = "SELECT pg_notify('outbox_events', '')";
const ENQUEUE_SQL: &str = "SELECT outbox.enqueue_payment_cancellation($1, $2, $3, $4)";

/// Events newest first (`events_list.sql`): a company's or all, in one
/// state or any, created since a time or ever, at most `limit`.
pub async fn list(
    client: &impl GenericClient,
    company: Option<i64>,
    state: Option<&str>,
    since: Option<SystemTime>,
    limit: i64,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    client
        .query(LIST_SQL, &[&company, &state, &since, &limit])
        .await
}

/// One event with its attempts and its notification emails.
pub struct Detail {
    pub event: Row,
    pub attempts: Vec<Row>,
    pub emails: Vec<Row>,
}

/// The event `id` in full (`event.sql`, `event_attempts.sql`,
/// `event_emails.sql`); None when there is no such event.
pub async fn detail(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<Detail>, tokio_postgres::Error> {
    let Some(event) = client.query_opt(EVENT_SQL, &[&id]).await? else {
        return Ok(None);
    };
    Ok(Some(Detail {
        event,
        attempts: client.query(ATTEMPTS_SQL, &[&id]).await?,
        emails: client.query(EMAILS_SQL, &[&id]).await?,
    }))
}

/// Which failed events to replay.
#[derive(Debug, Clone)]
pub enum Replay {
    /// These, in this order.
    Ids(Vec<Uuid>),
    /// A company's failed events, created since a time or ever
    /// (`failed_events.sql`).
    Company {
        company: i64,
        since: Option<SystemTime>,
    },
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Every event asked for, in order.
    pub asked: Vec<Uuid>,
    /// Those moved back to pending.
    pub replayed: HashSet<Uuid>,
    /// The state of the others, read in the same transaction; absent: no
    /// such event.
    pub states: HashMap<Uuid, String>,
}

/// Moves failed events back to pending (`replay.sql`, the one statement
/// that does it) in one transaction that also notifies `outbox_events`, so
/// a running daemon claims them at once rather than at its next poll.
pub async fn replay(client: &mut Client, which: Replay) -> Result<Replayed, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let asked: Vec<Uuid> = match which {
        Replay::Company { company, since } => tx
            .query(FAILED_SQL, &[&company, &since])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect(),
        Replay::Ids(ids) => ids,
    };
    let replayed: HashSet<Uuid> = tx
        .query(REPLAY_SQL, &[&asked])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !replayed.is_empty() {
        tx.execute(WAKE_SQL, &[]).await?;
    }
    // Why the others did not move, read before the commit so that the
    // answer belongs to the same moment as the replay.
    let left: Vec<Uuid> = asked
        .iter()
        .filter(|id| !replayed.contains(id))
        .copied()
        .collect();
    let states = tx
        .query(STATES_SQL, &[&left])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    tx.commit().await?;
    Ok(Replayed {
        asked,
        replayed,
        states,
    })
}

/// Events per state (`event_counts.sql`).
pub async fn counts(client: &impl GenericClient) -> Result<Vec<Row>, tokio_postgres::Error> {
    client.query(COUNTS_SQL, &[]).await
}

/// Of the last hour's attempts that finished their event, how many and
/// how many of those failed (`failure_ratio.sql`).
pub async fn failure_ratio(client: &impl GenericClient) -> Result<Row, tokio_postgres::Error> {
    client.query_one(RATIO_SQL, &[]).await
}

/// The endpoints with the most failed events, at most `limit`
/// (`failing_endpoints.sql`).
pub async fn failing_endpoints(
    client: &impl GenericClient,
    limit: i64,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    client.query(FAILING_SQL, &[&limit]).await
}

/// The endpoints whose circuit is not closed (`circuits.sql`).
pub async fn held_endpoints(
    client: &impl GenericClient,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    client.query(CIRCUITS_SQL, &[]).await
}

/// Enqueues a Payment Cancellation through the application's own function;
/// the new event's id.
pub async fn enqueue_payment_cancellation(
    client: &impl GenericClient,
    company: i64,
    payment: i64,
    number: &str,
    orders: Option<&[i64]>,
) -> Result<Uuid, tokio_postgres::Error> {
    let row = client
        .query_one(ENQUEUE_SQL, &[&company, &payment, &number, &orders])
        .await?;
    Ok(row.get(0))
}
