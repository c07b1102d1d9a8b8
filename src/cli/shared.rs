//! What the operator's subcommands share: one connection to a schema this
//! binary expects, and `--json` output.

use tokio_postgres::Client;

use super::exit::CliError;
use crate::config::Config;
use crate::db;
use crate::migrate::{self, MigrateError};

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
