//! `outboxd events retry`: replaying failed events, given by id or as a
//! company's failed events, through [`events::replay`] (one transaction
//! that also wakes a running daemon), and saying why any did not move.

use std::collections::HashSet;

use uuid::Uuid;

use super::events::RetryArgs;
use super::{CliError, connect_current};
use crate::config::Config;
use crate::store::events::{self, Replay, Replayed};

pub async fn run(args: RetryArgs, config: &Config) -> Result<(), CliError> {
    let mut client = connect_current(config).await?;
    // clap lets through either ids or --company, never both.
    let which = match args.company {
        Some(company) => Replay::Company {
            company,
            since: args.since,
        },
        None => Replay::Ids(dedup(args.ids)),
    };
    let Replayed {
        asked,
        replayed,
        states,
    } = events::replay(&mut client, which)
        .await
        .map_err(|e| CliError::database("retrying events", &e))?;
    let (done, left): (Vec<Uuid>, Vec<Uuid>) = asked.iter().partition(|id| replayed.contains(id));

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
