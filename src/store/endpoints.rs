//! What the operator's `endpoint` commands read and change: the endpoints
//! (`outbox.endpoints`), their circuits and their signing secrets. Rows are
//! returned as they come; the commands lay them out.

use tokio_postgres::{Client, GenericClient, Row};

use crate::model::{Auth, Secret};

const ENDPOINTS_SQL: &str = include_str!("../../sql/queries/endpoints.sql");
const UPSERT_SQL: &str = include_str!("../../sql/queries/endpoint_upsert.sql");
const LOAD_SQL: &str = include_str!("../../sql/queries/endpoint_load.sql");
const FOR_TEST_SQL: &str = include_str!("../../sql/queries/endpoint_for_test.sql");
const PAUSE_SQL: &str = include_str!("../../sql/queries/circuit_pause.sql");
const RESET_SQL: &str = include_str!("../../sql/queries/circuit_reset.sql");
const ROTATE_SQL: &str = include_str!("../../sql/queries/secret_rotate.sql");
const REPLACE_SQL: &str = include_str!("../../sql/queries/secret_replace.sql");
const SECRETS_SQL: &str = include_str!("../../sql/queries/secret_list.sql");
const CLEAR_SQL: &str = include_str!("../../sql/queries/secret_clear.sql");
const EXISTS_SQL: &str = "SELECT 1 FROM outbox.endpoints WHERE company_id = $1 AND event_type = $2";
const ENABLE_SQL: &str =
    "UPDATE outbox.endpoints SET enabled = $3 WHERE company_id = $1 AND event_type = $2";
const REMOVE_SQL: &str = include_str!("../../sql/queries/endpoint_remove.sql");

/// An endpoint as `endpoint set` writes it, whole.
#[derive(Debug)]
pub struct NewEndpoint<'a> {
    pub company: i64,
    pub event: &'a str,
    pub url: &'a str,
    pub auth: &'a Auth,
    pub notify: &'a [String],
    pub enabled: bool,
    pub max_in_flight: Option<i32>,
    /// Given: the endpoint signs with this secret only, from now on.
    pub signing_secret: Option<&'a Secret>,
}

/// Creates or replaces an endpoint (`endpoint_upsert.sql`) and, with a
/// signing secret, makes it the only one (`secret_replace.sql`), in one
/// transaction: a refused secret leaves the endpoint as it was. True when
/// the endpoint is new.
pub async fn save(
    client: &mut Client,
    endpoint: &NewEndpoint<'_>,
) -> Result<bool, tokio_postgres::Error> {
    let (auth_type, username, password, token) = match endpoint.auth {
        Auth::None => ("none", None, None, None),
        Auth::Basic { username, password } => (
            "basic",
            Some(username.as_str()),
            Some(password.expose()),
            None,
        ),
        Auth::Bearer { token } => ("bearer", None, None, Some(token.expose())),
    };
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            UPSERT_SQL,
            &[
                &endpoint.company,
                &endpoint.event,
                &endpoint.url,
                &auth_type,
                &username,
                &password,
                &token,
                &endpoint.notify,
                &endpoint.enabled,
                &endpoint.max_in_flight,
            ],
        )
        .await?;
    if let Some(secret) = endpoint.signing_secret {
        tx.execute(
            REPLACE_SQL,
            &[&endpoint.company, &endpoint.event, &secret.expose()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(row.get("inserted"))
}

/// Endpoints as listed and shown (`endpoints.sql`), secrets only as set or
/// not: every one, a company's, or one endpoint.
pub async fn list(
    client: &impl GenericClient,
    company: Option<i64>,
    event: Option<&str>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    client.query(ENDPOINTS_SQL, &[&company, &event]).await
}

/// One endpoint as shown, None when there is none.
pub async fn one(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<Option<Row>, tokio_postgres::Error> {
    client
        .query_opt(ENDPOINTS_SQL, &[&Some(company), &Some(event)])
        .await
}

/// The endpoint's events in flight, waiting and scheduled (`endpoint_load.sql`).
pub async fn load(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<Row, tokio_postgres::Error> {
    client.query_one(LOAD_SQL, &[&company, &event]).await
}

/// The endpoint as a test request goes to it, secrets included
/// (`endpoint_for_test.sql`); None when there is none.
pub async fn for_test(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<Option<Row>, tokio_postgres::Error> {
    client.query_opt(FOR_TEST_SQL, &[&company, &event]).await
}

pub async fn exists(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(EXISTS_SQL, &[&company, &event])
        .await?
        .is_some())
}

/// Enables or disables an endpoint; false when there is none.
pub async fn set_enabled(
    client: &impl GenericClient,
    company: i64,
    event: &str,
    enabled: bool,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .execute(ENABLE_SQL, &[&company, &event, &enabled])
        .await?
        > 0)
}

/// Removes an endpoint with its signing secrets (`endpoint_remove.sql`);
/// false when there was none.
pub async fn remove(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client.execute(REMOVE_SQL, &[&company, &event]).await? > 0)
}

/// Pauses the endpoint's circuit until it is reset (`circuit_pause.sql`).
pub async fn pause(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<(), tokio_postgres::Error> {
    client.execute(PAUSE_SQL, &[&company, &event]).await?;
    Ok(())
}

/// Closes the endpoint's circuit (`circuit_reset.sql`); the circuit as it
/// was, None when it had none.
pub async fn reset(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<Option<Row>, tokio_postgres::Error> {
    client.query_opt(RESET_SQL, &[&company, &event]).await
}

/// Adds a new signing secret, the previous ones kept `keep_ms` longer
/// (`secret_rotate.sql`); None when the endpoint is gone.
pub async fn rotate_secret(
    client: &impl GenericClient,
    company: i64,
    event: &str,
    secret: &str,
    keep_ms: i64,
) -> Result<Option<Row>, tokio_postgres::Error> {
    client
        .query_opt(ROTATE_SQL, &[&company, &event, &secret, &keep_ms])
        .await
}

/// The endpoint's signing secrets, active and expired (`secret_list.sql`).
pub async fn secrets(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    client.query(SECRETS_SQL, &[&company, &event]).await
}

/// Stops the endpoint signing (`secret_clear.sql`): its secrets and the
/// record that it signed are deleted. How many secrets went, and whether
/// it was recorded as signing.
pub async fn clear_secrets(
    client: &impl GenericClient,
    company: i64,
    event: &str,
) -> Result<(i64, bool), tokio_postgres::Error> {
    let row = client.query_one(CLEAR_SQL, &[&company, &event]).await?;
    Ok((row.get("secrets"), row.get("signed")))
}
