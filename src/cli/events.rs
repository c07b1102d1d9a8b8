//! `outboxd events …`: what happened to events. `list` and `show` read
//! outbox.events, outbox.attempts and the notification tables, as a table
//! for people or `--json` for scripts; `retry` (in [`super::replay`]) sends
//! failed events again.

use std::time::SystemTime;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

use super::exit::CliError;
use super::replay::{self, RetryArgs};
use super::rules;
use super::shared::{connect_current, print_json};
use super::table::{self, Table, or_dash};
use crate::config::Config;
use crate::http::classify::truncate_chars;
use crate::store::events;

/// Longest receiver message shown in the list's table (`show` has it whole).
const MESSAGE_COLUMN_CHARS: usize = 40;

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// List events, newest first
    ///
    /// Shows each event's id, when it was created, company, type, state,
    /// attempts, payment number and the receiver's message (cut short; see
    /// `events show`). --json prints one JSON array with every column.
    ///
    /// Example:
    ///
    ///   $ outboxd events list --company 6316 --state failed --since 3days
    List(ListArgs),

    /// Show one event: payload, state, every attempt with its answer, emails
    ///
    /// Attempts from before a replay are listed too. --json prints one JSON
    /// object.
    ///
    /// Example:
    ///
    ///   $ outboxd events show 01a21df3-926e-7d08-a910-945c0efd0520
    Show {
        /// The event id (the Idempotency-Key the receiver saw)
        #[arg(value_name = "ID", value_parser = rules::event_id)]
        id: Uuid,

        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },

    /// Send failed events again: back to pending, same event id
    ///
    /// Give event ids, or a company with --state failed (and optionally
    /// --since) to retry all of its failed events. Only failed events can be
    /// retried. Each keeps its id, so the receiver gets the same
    /// Idempotency-Key; its earlier attempts are kept, and it gets a fresh
    /// retry budget. A running daemon picks them up at once. Exits 1 when
    /// any id given was not retried (not found, or not failed); the others
    /// are retried all the same.
    ///
    /// Example:
    ///
    ///   $ outboxd events retry --company 6316 --state failed --since 2h
    Retry(RetryArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this company's events
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
    company: Option<i64>,

    /// Only events in this state
    #[arg(long, value_enum)]
    state: Option<State>,

    /// Only events created since then: a duration back from now ("2h",
    /// "3days") or a time ("2026-11-27T17:00:00Z", "2026-11-27")
    #[arg(long, value_name = "WHEN", value_parser = rules::since_arg)]
    since: Option<SystemTime>,

    /// At most this many events (1 to 10000)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    limit: i64,

    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

/// An event's state, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum State {
    Pending,
    Scheduled,
    Leased,
    Delivered,
    Failed,
}

pub async fn run(command: EventsCommand, config: &Config) -> Result<(), CliError> {
    match command {
        EventsCommand::List(args) => list(args, config).await,
        EventsCommand::Show { id, json } => show(id, json, config).await,
        EventsCommand::Retry(args) => replay::run(args, config).await,
    }
}

async fn list(args: ListArgs, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let state = args.state.map(|s| {
        s.to_possible_value()
            .expect("no skipped variants")
            .get_name()
            .to_string()
    });
    let rows = events::list(
        &client,
        args.company,
        state.as_deref(),
        args.since,
        args.limit,
    )
    .await
    .map_err(|e| CliError::database("listing events", &e))?;
    let events: Vec<EventJson> = rows.iter().map(EventJson::from_row).collect();
    if args.json {
        return print_json(&events);
    }
    if events.is_empty() {
        println!("no events match");
        return Ok(());
    }
    let mut out = Table::new(&[
        "id",
        "created",
        "company",
        "event type",
        "state",
        "attempts",
        "payment",
        "message",
    ]);
    for (event, row) in events.iter().zip(&rows) {
        let payment = event.payload.get("paymentNumber").and_then(Value::as_str);
        let message = event
            .response_message
            .as_deref()
            .map(|m| truncate_chars(&table::one_line(m), MESSAGE_COLUMN_CHARS));
        out.row(vec![
            event.id.to_string(),
            table::time(row.get("created_at")),
            event.company_id.to_string(),
            event.event_type.clone(),
            event.state.clone(),
            event.attempts.to_string(),
            or_dash(payment),
            or_dash(message),
        ]);
    }
    print!("{out}");
    if events.len() as i64 == args.limit {
        println!("(the newest {}; see --limit)", args.limit);
    }
    Ok(())
}

async fn show(id: Uuid, json: bool, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let step = |e| CliError::database("reading the event", &e);
    let detail = events::detail(&client, id)
        .await
        .map_err(step)?
        .ok_or_else(|| CliError::Failed(format!("no event {id}")))?;
    let row = detail.event;
    let attempts: Vec<AttemptJson> = detail.attempts.iter().map(AttemptJson::from_row).collect();
    let notifications: Vec<NotificationJson> = detail
        .emails
        .iter()
        .map(NotificationJson::from_row)
        .collect();
    let detail = DetailJson {
        event: EventJson::from_row(&row),
        attempts,
        notifications,
    };
    if json {
        print_json(&detail)
    } else {
        print!("{}", detail.text());
        Ok(())
    }
}

/// One event, every column; times RFC 3339 UTC with microseconds.
#[derive(Debug, Serialize)]
struct EventJson {
    id: Uuid,
    event_type: String,
    company_id: i64,
    payload: Value,
    state: String,
    attempts: i32,
    next_attempt_at: String,
    lease_owner: Option<String>,
    created_at: String,
    delivered_at: Option<String>,
    response_message: Option<String>,
    last_error: Option<String>,
    replayed_at: Option<String>,
    attempts_at_replay: i32,
}

impl EventJson {
    fn from_row(row: &Row) -> EventJson {
        EventJson {
            id: row.get("id"),
            event_type: row.get("event_type"),
            company_id: row.get("company_id"),
            payload: row.get("payload"),
            state: row.get("state"),
            attempts: row.get("attempts"),
            next_attempt_at: table::precise_time(row.get("next_attempt_at")),
            lease_owner: row.get("lease_owner"),
            created_at: table::precise_time(row.get("created_at")),
            delivered_at: optional_time(row, "delivered_at"),
            response_message: row.get("response_message"),
            last_error: row.get("last_error"),
            replayed_at: optional_time(row, "replayed_at"),
            attempts_at_replay: row.get("attempts_at_replay"),
        }
    }
}

#[derive(Debug, Serialize)]
struct AttemptJson {
    attempt: i32,
    started_at: String,
    duration_ms: i32,
    http_status: Option<i16>,
    outcome: String,
    message: Option<String>,
    lease_owner: Option<String>,
}

impl AttemptJson {
    fn from_row(row: &Row) -> AttemptJson {
        AttemptJson {
            attempt: row.get("attempt"),
            started_at: table::precise_time(row.get("started_at")),
            duration_ms: row.get("duration_ms"),
            http_status: row.get("http_status"),
            outcome: row.get("outcome"),
            message: row.get("message"),
            lease_owner: row.get("lease_owner"),
        }
    }
}

/// The event reported as failed; the email is absent until gathered.
#[derive(Debug, Serialize)]
struct NotificationJson {
    reported_at: String,
    email_id: Option<i64>,
    email_state: Option<String>,
    recipients: Option<Vec<String>>,
    sent_to: Option<Vec<String>>,
    refused: Option<Vec<String>>,
    sent_at: Option<String>,
    last_error: Option<String>,
}

impl NotificationJson {
    fn from_row(row: &Row) -> NotificationJson {
        NotificationJson {
            reported_at: table::precise_time(row.get("reported_at")),
            email_id: row.get("email_id"),
            email_state: row.get("email_state"),
            recipients: row.get("recipients"),
            sent_to: row.get("sent_to"),
            refused: row.get("refused"),
            sent_at: optional_time(row, "sent_at"),
            last_error: row.get("last_error"),
        }
    }

    fn text(&self) -> String {
        let Some(id) = self.email_id else {
            return "reported, waiting to be gathered into an email".to_string();
        };
        let list = |v: &Option<Vec<String>>| v.as_deref().unwrap_or_default().join(", ");
        let mut text = format!(
            "email {id} to {}: {}",
            list(&self.recipients),
            self.email_state.as_deref().unwrap_or("-")
        );
        if let Some(at) = &self.sent_at {
            text.push_str(&format!(" {at}"));
        }
        if self.refused.as_ref().is_some_and(|r| !r.is_empty()) {
            text.push_str(&format!(" (refused: {})", list(&self.refused)));
        }
        if let Some(error) = &self.last_error {
            text.push_str(&format!(" (last error: {error})"));
        }
        text
    }
}

/// `events show --json`: the event as `events list --json` gives it, with
/// its attempts and notifications beside it.
#[derive(Debug, Serialize)]
struct DetailJson {
    event: EventJson,
    attempts: Vec<AttemptJson>,
    notifications: Vec<NotificationJson>,
}

impl DetailJson {
    /// `events show` for people.
    fn text(&self) -> String {
        let e = &self.event;
        let mut lines = vec![
            format!("event {}", e.id),
            format!("  type:       {}", e.event_type),
            format!("  company:    {}", e.company_id),
            format!("  state:      {}", e.state),
            format!("  attempts:   {}", e.attempts),
            format!("  created:    {}", e.created_at),
        ];
        match e.state.as_str() {
            "pending" => lines.push(format!("  next try:   {}", e.next_attempt_at)),
            "leased" => lines.push(format!(
                "  leased by:  {} (until {})",
                e.lease_owner.as_deref().unwrap_or("-"),
                e.next_attempt_at
            )),
            _ => {}
        }
        if let Some(at) = &e.delivered_at {
            lines.push(format!("  delivered:  {at}"));
        }
        if let Some(at) = &e.replayed_at {
            lines.push(format!(
                "  replayed:   {at} (after attempt {})",
                e.attempts_at_replay
            ));
        }
        lines.push(format!(
            "  message:    {}",
            or_dash(e.response_message.as_deref())
        ));
        lines.push(format!(
            "  last error: {}",
            or_dash(e.last_error.as_deref())
        ));
        lines.push("payload:".into());
        let payload = serde_json::to_string_pretty(&e.payload).unwrap_or_default();
        lines.extend(payload.lines().map(|l| format!("  {l}")));
        let mut text = lines.join("\n");
        text.push('\n');

        if self.attempts.is_empty() {
            text.push_str("attempts: none yet\n");
        } else {
            let mut out = Table::new(&["attempt", "started", "ms", "http", "outcome", "message"]);
            for a in &self.attempts {
                out.row(vec![
                    a.attempt.to_string(),
                    a.started_at.clone(),
                    a.duration_ms.to_string(),
                    or_dash(a.http_status),
                    a.outcome.clone(),
                    or_dash(a.message.as_deref()),
                ]);
            }
            text.push_str("attempts:\n");
            for line in out.to_string().lines() {
                text.push_str(&format!("  {line}\n"));
            }
        }
        if !self.notifications.is_empty() {
            text.push_str("notification emails:\n");
            for n in &self.notifications {
                text.push_str(&format!("  {}\n", table::one_line(&n.text())));
            }
        }
        text
    }
}

fn optional_time(row: &Row, column: &str) -> Option<String> {
    row.get::<_, Option<SystemTime>>(column)
        .map(table::precise_time)
}
