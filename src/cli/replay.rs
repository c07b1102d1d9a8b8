//! `outboxd events retry`: replaying failed events (`sql/queries/replay.sql`,
//! the one statement that does it). Given ids, or a company's failed events
//! (`sql/queries/failed_events.sql`), it moves them back to pending in one
//! transaction that also notifies `outbox_events`, so a running daemon
//! claims them at once instead of at its next poll.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::events::RetryArgs;
use super::{CliError, connect_current};
use crate::config::Config;

const REPLAY_SQL: &str = include_str!("../../sql/queries/replay.sql");
const FAILED_SQL: &str = include_str!("../../sql/queries/failed_events.sql");

pub async fn run(args: RetryArgs, config: &Config) -> Result<(), CliError> {
    let mut client = connect_current(config).await?;
    let step = |e| CliError::database("retrying events", &e);
    let tx = client.transaction().await.map_err(step)?;
    // clap lets through either ids or --company, never both.
    let ids: Vec<Uuid> = match args.company {
        Some(company) => tx
            .query(FAILED_SQL, &[&company, &args.since])
            .await
            .map_err(step)?
            .iter()
            .map(|row| row.get(0))
            .collect(),
        None => dedup(args.ids),
    };
    let replayed: HashSet<Uuid> = tx
        .query(REPLAY_SQL, &[&ids])
        .await
        .map_err(step)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !replayed.is_empty() {
        tx.execute("SELECT pg_notify('outbox_events', '')", &[])
            .await
            .map_err(step)?;
    }
    // Why the others did not move, read before the commit so that the
    // answer belongs to the same moment as the replay.
    let (done, left): (Vec<Uuid>, Vec<Uuid>) = ids.iter().partition(|id| replayed.contains(id));
    let states: HashMap<Uuid, String> = tx
        .query(
            "SELECT id, state FROM outbox.events WHERE id = ANY($1)",
            &[&left],
        )
        .await
        .map_err(step)?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    tx.commit().await.map_err(step)?;

    match (done.len(), args.company) {
        (0, Some(company)) => {
            println!("no failed events of company {company} to retry");
        }
        (0, _) => {}
        (n, _) => {
            println!(
                "retried {n} event{}: back to pending with the same id",
                if n == 1 { "" } else { "s" }
            );
            for id in &done {
                println!("  {id}");
            }
        }
    }
    if left.is_empty() {
        return Ok(());
    }
    let problems = left
        .iter()
        .map(|id| match states.get(id) {
            Some(state) => format!(
                "event {id} was not retried: it is {state} (only failed events can be retried)"
            ),
            None => format!("event {id} was not retried: there is no such event"),
        })
        .collect::<Vec<_>>();
    Err(CliError::Failed(problems.join("\n")))
}

/// The ids in the order given, each once.
fn dedup(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    let mut seen = HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}
