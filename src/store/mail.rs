//! The statements of the notification emails: gathering notifications
//! into emails under an advisory lock (one instance at a time), claiming a
//! due email, loading what a digest lists, and marking an email after a
//! send.

use std::time::SystemTime;

use tokio_postgres::GenericClient;

use crate::model::{ClaimedEmail, Digest, FailedEvent};

const GATHER_SQL: &str = include_str!("../../sql/queries/gather_notifications.sql");
/// Taken for the gathering's transaction; false when another instance holds it.
const GATHER_LOCK_SQL: &str = "SELECT pg_try_advisory_xact_lock($1)";
const CLAIM_SQL: &str = include_str!("../../sql/queries/claim_emails.sql");
const CONTENT_SQL: &str = include_str!("../../sql/queries/email_content.sql");
const MARK_SQL: &str = include_str!("../../sql/queries/mark_email.sql");
const MARK_RECIPIENT_SQL: &str = include_str!("../../sql/queries/mark_email_recipient.sql");

/// Advisory lock key for gathering: "ob-notif" as a big-endian integer.
const GATHER_LOCK_KEY: i64 = 0x6f622d6e6f746966;

/// Gathers due notifications into emails (`sql/queries/gather_notifications.sql`)
/// in one transaction whose first statement takes the advisory lock, so
/// the gathering's snapshot comes after it; nothing when another instance
/// holds it. Returns each new email's id and how many notifications it
/// took.
pub async fn gather(
    client: &mut deadpool_postgres::Client,
    gather_ms: i64,
    window_ms: i64,
) -> Result<Vec<(i64, i64)>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let lock = tx.prepare_cached(GATHER_LOCK_SQL).await?;
    let locked: bool = tx.query_one(&lock, &[&GATHER_LOCK_KEY]).await?.get(0);
    if !locked {
        // Another instance is gathering now.
        return Ok(Vec::new());
    }
    let statement = tx.prepare_cached(GATHER_SQL).await?;
    let created = tx.query(&statement, &[&gather_ms, &window_ms]).await?;
    tx.commit().await?;
    Ok(created
        .iter()
        .map(|row| (row.get("id"), row.get("notifications")))
        .collect())
}

/// Leases one due email to `owner` for `lease_ms` (`claim_emails.sql`).
pub async fn claim(
    client: &deadpool_postgres::ClientWrapper,
    owner: &str,
    lease_ms: i64,
) -> Result<Option<ClaimedEmail>, tokio_postgres::Error> {
    let claim = client.prepare_cached(CLAIM_SQL).await?;
    let claimed = client.query_opt(&claim, &[&owner, &lease_ms]).await?;
    Ok(claimed.map(|row| ClaimedEmail {
        id: row.get("id"),
        company_id: row.get("company_id"),
        event_type: row.get("event_type"),
        recipients: row.get("recipients"),
        sent_to: row.get("sent_to"),
        refused: row.get("refused"),
        attempt: row.get("attempts"),
        kind: row.get("kind"),
        about: row.get("about"),
    }))
}

/// The email's first `listed` events and its count; None
/// when its events were all deleted.
pub async fn content(
    client: &impl GenericClient,
    email_id: i64,
    listed: i64,
) -> Result<Option<Digest>, tokio_postgres::Error> {
    let rows = client.query(CONTENT_SQL, &[&email_id, &listed]).await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let total: i64 = first.get("total");
    let since: Option<SystemTime> = first.get("since");
    let listed = rows
        .iter()
        .map(|r| FailedEvent {
            id: r.get("id"),
            event_type: r.get("event_type"),
            company_id: r.get("company_id"),
            payload: r.get("payload"),
            attempts: r.get("attempts"),
            response_message: r.get("response_message"),
            last_error: r.get("last_error"),
            endpoint_url: r.get("endpoint_url"),
            first_attempt: r.get::<_, Option<SystemTime>>("first_attempt"),
            last_attempt: r.get::<_, Option<SystemTime>>("last_attempt"),
        })
        .collect();
    Ok(Some(Digest {
        listed,
        total,
        since,
    }))
}

/// Marks an email after a send (`mark_email.sql`): who has it, who refused
/// it, when to try again and why; its new state, None when its lease was
/// lost.
pub async fn mark(
    client: &impl GenericClient,
    email: &ClaimedEmail,
    sent_to: &[String],
    refused: &[String],
    retry_ms: i64,
    error: Option<&str>,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            MARK_SQL,
            &[
                &email.id,
                &email.attempt,
                &sent_to,
                &refused,
                &retry_ms,
                &error,
            ],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// One recipient of `email` accepted it (`mark_email_recipient.sql`): in
/// sent_to at once, whatever happens to the rest of the exchange. False
/// when the lease was lost.
pub async fn accepted(
    client: &impl GenericClient,
    email: &ClaimedEmail,
    recipient: &str,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(MARK_RECIPIENT_SQL, &[&email.id, &email.attempt, &recipient])
        .await?;
    Ok(n == 1)
}
