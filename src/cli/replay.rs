//! `outboxd events retry`: replaying failed events, given by id or as a
//! company's failed events, through [`events::replay`] (one transaction
//! that also wakes a running daemon), and saying why any did not move.

use std::collections::HashSet;
use std::time::SystemTime;

use clap::{ArgGroup, Args};

use uuid::Uuid;

use super::exit::CliError;
use super::rules;
use super::shared::connect_current;
use crate::config::Config;
use crate::store::events::{self, Replay, Replayed};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["ids", "company"])))]
pub struct RetryArgs {
    /// Event ids to retry
    #[arg(value_name = "ID", value_parser = rules::event_id, conflicts_with_all = ["company", "state", "since"])]
    pub ids: Vec<Uuid>,

    /// Retry this company's events (with --state failed)
    #[arg(long, value_name = "ID", requires = "state", value_parser = clap::value_parser!(i64).range(1..))]
    pub company: Option<i64>,

    /// Which of the company's events: only failed ones can be retried
    #[arg(long, requires = "company", value_parser = ["failed"])]
    pub state: Option<String>,

    /// Only the company's events created since then (as for `events list`)
    #[arg(long, value_name = "WHEN", requires = "company", value_parser = rules::since_arg)]
    pub since: Option<SystemTime>,
}

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
