//! Claiming due events: one statement (`sql/queries/claim.sql`) that leases
//! a batch to this instance and returns each event with its endpoint.

use std::time::Duration;

use uuid::Uuid;

use crate::config::Secret;
use crate::db;

const CLAIM_SQL: &str = include_str!("../sql/queries/claim.sql");

/// An event leased to this instance, ready to deliver.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    pub id: Uuid,
    pub event_type: String,
    pub company_id: i64,
    /// The stored payload as JSON text.
    pub payload: String,
    /// This delivery's attempt number (1 for the first). Fences the record.
    pub attempt: i32,
    /// Attempts counted against the retry budget: since the last replay.
    pub budget_attempt: i32,
    /// Time since the event was enqueued (or last replayed), by the
    /// database's clock.
    pub age: Duration,
    /// The event was leased before and its lease ran out: a daemon died or
    /// stalled while delivering it, so the receiver may have it already.
    pub lease_expired: bool,
    /// The company's endpoint for this event type, if one is configured.
    pub endpoint: Option<Endpoint>,
}

/// Where and how to deliver, from `outbox.endpoints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub auth: Auth,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic { username: String, password: Secret },
    Bearer { token: Secret },
}

#[derive(Debug, thiserror::Error)]
#[error("claiming due events: {0}")]
pub struct ClaimError(String);

/// Leases up to `limit` due events to `owner` for `lease`. The statement is
/// prepared once per pooled connection: one round trip per claim, not two.
pub async fn claim(
    client: &deadpool_postgres::Client,
    limit: usize,
    owner: &str,
    lease: Duration,
) -> Result<Vec<ClaimedEvent>, ClaimError> {
    let limit = limit as i64;
    let lease_ms = lease.as_millis() as i64;
    let describe = |e: tokio_postgres::Error| ClaimError(db::describe(&e));
    let statement = client.prepare_cached(CLAIM_SQL).await.map_err(describe)?;
    let rows = client
        .query(&statement, &[&limit, &owner, &lease_ms])
        .await
        .map_err(describe)?;
    Ok(rows.iter().map(from_row).collect())
}

fn from_row(row: &tokio_postgres::Row) -> ClaimedEvent {
    let url: Option<String> = row.get("url");
    let endpoint = url.map(|url| Endpoint {
        url,
        auth: auth_from(
            row.get("auth_type"),
            row.get("username"),
            row.get("password"),
            row.get("token"),
        ),
        enabled: row.get("enabled"),
    });
    let age_ms: i64 = row.get("age_ms");
    ClaimedEvent {
        id: row.get("id"),
        event_type: row.get("event_type"),
        company_id: row.get("company_id"),
        payload: row.get("payload"),
        attempt: row.get("attempts"),
        budget_attempt: row.get("attempts_since_replay"),
        age: Duration::from_millis(age_ms.max(0) as u64),
        lease_expired: row.get("lease_expired"),
        endpoint,
    }
}

/// The schema guarantees basic has both secrets and bearer a token (checked
/// on write), so missing pieces only appear if someone bypassed it; they then
/// become empty credentials that the receiver refuses, recorded as such.
pub(crate) fn auth_from(
    auth_type: String,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
) -> Auth {
    match auth_type.as_str() {
        "basic" => Auth::Basic {
            username: username.unwrap_or_default(),
            password: Secret::new(password.unwrap_or_default()),
        },
        "bearer" => Auth::Bearer {
            token: Secret::new(token.unwrap_or_default()),
        },
        _ => Auth::None,
    }
}
