//! What the operator's subcommands share: one connection to a schema this
//! binary expects, `--json` output, and which endpoint a command is about
//! ([`EndpointKey`]).

use clap::Args;
use tokio_postgres::Client;

use super::exit::CliError;
use super::rules;
use crate::config::Config;
use crate::model::PAYMENT_CANCELLATION;
use crate::store::endpoints;
use crate::store::migrate::{self, MigrateError};
use crate::store::pool as db;

/// `--json` output: pretty-printed, one document.
pub(super) fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Failed(format!("writing JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// One connection for an operator subcommand, after checking that the
/// schema is exactly what this binary expects: reading or writing outbox
/// tables of another version could misread them.
pub(super) async fn connect_current(config: &Config) -> Result<Client, CliError> {
    let client = db::connect(&config.database)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    match migrate::status(&client).await {
        Ok(state) => match state.problem() {
            None => Ok(client),
            Some(problem) => Err(CliError::Schema(problem)),
        },
        Err(e @ MigrateError::Database { .. }) => Err(CliError::Failed(e.to_string())),
        Err(e) => Err(CliError::Schema(e.to_string())),
    }
}

/// Which endpoint: company and event type.
#[derive(Debug, Args)]
pub struct EndpointKey {
    /// The company's id
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
    pub company: i64,

    /// The event type
    #[arg(long, value_name = "TYPE", default_value = PAYMENT_CANCELLATION, value_parser = event_type_arg)]
    pub event: String,
}

fn event_type_arg(text: &str) -> Result<String, String> {
    rules::event_type(text).map(|()| text.to_string())
}

pub(super) async fn endpoint_exists(
    client: &tokio_postgres::Client,
    key: &EndpointKey,
) -> Result<(), CliError> {
    let found = endpoints::exists(client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("reading the endpoint", &e))?;
    if found { Ok(()) } else { Err(not_found(key)) }
}

pub(super) fn not_found(key: &EndpointKey) -> CliError {
    CliError::Failed(format!(
        "no endpoint for company {} and event type {}; create one with `outboxd endpoint set`",
        key.company, key.event
    ))
}
