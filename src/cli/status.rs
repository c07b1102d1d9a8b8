//! `outboxd status`: the outbox at a glance, for a person on call or a
//! script (`--json`). Events per state, the age of the oldest event due now
//! of an endpoint that is not held (the same figure as the
//! `outboxd_oldest_due_event_age_seconds` gauge), the events held and the
//! age of the oldest of them (`outboxd_events_held`,
//! `outboxd_oldest_held_event_age_seconds`),
//! how many of the events finished in the last hour failed, the emails
//! waiting, the endpoints with the most failed events in the last day, and
//! every endpoint whose circuit is not closed (open, half-open, paused, or
//! held by a Retry-After) with what it has in flight and waiting. Reads only.

use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::exit::CliError;
use super::shared::{connect_current, print_json};
use super::table::Table;
use crate::config::Config;
use crate::store::events;

/// How many failing endpoints are listed.
const FAILING_ENDPOINTS: i64 = 5;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Status {
    events: Counts,
    /// Since it was enqueued, to the millisecond; 0 when nothing is due.
    /// Held endpoints' events are not counted here but in `held`.
    oldest_due_age_seconds: f64,
    held: Held,
    last_hour: LastHour,
    emails_queued: i64,
    failing_endpoints: Vec<FailingEndpoint>,
    /// Endpoints by circuit state: closed, open, half_open, paused.
    endpoints: std::collections::BTreeMap<&'static str, i64>,
    /// The endpoints whose circuit is not closed, longest open first.
    held_endpoints: Vec<HeldEndpoint>,
}

#[derive(Debug, Serialize)]
struct HeldEndpoint {
    company_id: i64,
    event_type: String,
    /// open, half_open, paused, or closed (held only by a Retry-After).
    circuit: String,
    #[serde(with = "humantime_serde_opt")]
    since: Option<std::time::SystemTime>,
    /// When the next probe may go (open), or the Retry-After ends.
    #[serde(with = "humantime_serde_opt")]
    next_try: Option<std::time::SystemTime>,
    in_flight: i64,
    waiting: i64,
    last_error: Option<String>,
}

/// RFC 3339 text in JSON, null for none.
mod humantime_serde_opt {
    pub fn serialize<S: serde::Serializer>(
        t: &Option<std::time::SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// The events of held endpoints: waiting for their receiver or an
/// operator, not for outboxd.
#[derive(Debug, Serialize)]
struct Held {
    events: i64,
    /// Held endpoints with an event due now.
    endpoints: i64,
    /// The oldest held event due now, since it was enqueued; 0: none.
    oldest_age_seconds: f64,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    pending: i64,
    scheduled: i64,
    leased: i64,
    delivered: i64,
    failed: i64,
}

#[derive(Debug, Serialize)]
struct LastHour {
    /// Events whose final attempt started in the last hour.
    finished: i64,
    /// Of those, the ones that failed.
    failed: i64,
    /// failed / finished; None when nothing finished.
    failure_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct FailingEndpoint {
    company_id: i64,
    event_type: String,
    /// None: no endpoint is configured (its events fail as no_endpoint).
    url: Option<String>,
    failed_events: i64,
}

pub async fn run(args: StatusArgs, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let step = |e| CliError::database("reading the outbox status", &e);
    let mut events = Counts::default();
    for row in events::counts(&client).await.map_err(step)? {
        let n: i64 = row.get("events");
        match row.get::<_, &str>("state") {
            "pending" => events.pending = n,
            "scheduled" => events.scheduled = n,
            "leased" => events.leased = n,
            "delivered" => events.delivered = n,
            "failed" => events.failed = n,
            _ => {} // the schema allows no other state
        }
    }
    let queue = crate::store::upkeep::queue_stats(&client)
        .await
        .map_err(step)?;
    let ratio = events::failure_ratio(&client).await.map_err(step)?;
    let (finished, failed): (i64, i64) = (ratio.get("finished"), ratio.get("failed"));
    let failing_endpoints = events::failing_endpoints(&client, FAILING_ENDPOINTS)
        .await
        .map_err(step)?
        .iter()
        .map(|row| FailingEndpoint {
            company_id: row.get("company_id"),
            event_type: row.get("event_type"),
            url: row
                .get::<_, Option<&str>>("url")
                .map(crate::model::shown_url),
            failed_events: row.get("failed"),
        })
        .collect();
    let held_endpoints = events::held_endpoints(&client)
        .await
        .map_err(step)?
        .iter()
        .map(|row| {
            let manual: bool = row.get("manual");
            let state: String = row.get("state");
            let paused_until: Option<std::time::SystemTime> = row.get("paused_until");
            HeldEndpoint {
                company_id: row.get("company_id"),
                event_type: row.get("event_type"),
                circuit: if manual { "paused".into() } else { state },
                since: row.get("opened_at"),
                next_try: paused_until.or(row.get("retry_at")),
                in_flight: row.get("in_flight"),
                waiting: row.get("waiting"),
                last_error: row.get("last_error"),
            }
        })
        .collect();
    let status = Status {
        endpoints: crate::store::upkeep::CIRCUIT_STATES
            .iter()
            .copied()
            .zip(queue.endpoints)
            .collect(),
        held_endpoints,
        events,
        oldest_due_age_seconds: queue.oldest_due_age.as_millis() as f64 / 1000.0,
        held: Held {
            events: queue.held,
            endpoints: queue.endpoints_held,
            oldest_age_seconds: queue.oldest_held_age.as_millis() as f64 / 1000.0,
        },
        last_hour: LastHour {
            finished,
            failed,
            failure_ratio: (finished > 0).then(|| failed as f64 / finished as f64),
        },
        emails_queued: queue.emails_queued,
        failing_endpoints,
    };
    if args.json {
        print_json(&status)
    } else {
        print!("{}", status.text());
        Ok(())
    }
}

/// An age for people: whole seconds past a minute; "350ms" is worth
/// showing below it.
fn readable(seconds: f64) -> String {
    let age = Duration::from_secs_f64(seconds);
    let age = if age >= Duration::from_secs(60) {
        Duration::from_secs(age.as_secs())
    } else {
        Duration::from_millis(age.as_millis() as u64)
    };
    humantime::format_duration(age).to_string()
}

impl Status {
    fn text(&self) -> String {
        let e = &self.events;
        let oldest = if self.oldest_due_age_seconds > 0.0 {
            format!(
                "{} since it was enqueued",
                readable(self.oldest_due_age_seconds)
            )
        } else {
            "none (no event is due now)".to_string()
        };
        let held = &self.held;
        // The count stops at a limit (queue_stats.sql): there it means "or more".
        let held_events = if held.events >= crate::store::upkeep::HELD_COUNT_LIMIT {
            format!("{} or more", held.events)
        } else {
            held.events.to_string()
        };
        let held = if held.events == 0 {
            "none".to_string()
        } else if held.oldest_age_seconds > 0.0 {
            format!(
                "{} events, the oldest due enqueued {} ago ({} {} with events due)",
                held_events,
                readable(held.oldest_age_seconds),
                held.endpoints,
                if held.endpoints == 1 {
                    "endpoint"
                } else {
                    "endpoints"
                }
            )
        } else {
            format!("{held_events} events, none due now")
        };
        let hour = match self.last_hour.failure_ratio {
            None => "no events finished".to_string(),
            Some(ratio) => format!(
                "{} of {} finished events failed ({:.1}%)",
                self.last_hour.failed,
                self.last_hour.finished,
                ratio * 100.0
            ),
        };
        let mut text = format!(
            "events:      {} pending, {} scheduled, {} leased, {} delivered, {} failed\n\
             oldest due:  {oldest}\n\
             held:        {held}\n\
             last hour:   {hour}\n\
             emails:      {} queued\n",
            e.pending, e.scheduled, e.leased, e.delivered, e.failed, self.emails_queued
        );
        if self.failing_endpoints.is_empty() {
            text.push_str("failing endpoints (last 24 h): none\n");
        } else {
            text.push_str("failing endpoints (last 24 h):\n");
            let mut out = Table::new(&["company", "event type", "url", "failed events"]);
            for f in &self.failing_endpoints {
                out.row(vec![
                    f.company_id.to_string(),
                    f.event_type.clone(),
                    f.url.clone().unwrap_or_else(|| "(no endpoint)".into()),
                    f.failed_events.to_string(),
                ]);
            }
            for line in out.to_string().lines() {
                text.push_str(&format!("  {line}\n"));
            }
        }
        let [closed, open, half_open, paused] = crate::store::upkeep::CIRCUIT_STATES
            .map(|state| self.endpoints.get(state).copied().unwrap_or(0));
        text.push_str(&format!(
            "endpoints:   {closed} closed, {open} open, {half_open} half-open, {paused} paused\n"
        ));
        if !self.held_endpoints.is_empty() {
            let when = |t: Option<std::time::SystemTime>| {
                t.map(super::table::time).unwrap_or_else(|| "-".into())
            };
            let mut out = Table::new(&[
                "company",
                "event type",
                "circuit",
                "since",
                "next try",
                "in flight",
                "waiting",
                "last error",
            ]);
            for h in &self.held_endpoints {
                out.row(vec![
                    h.company_id.to_string(),
                    h.event_type.clone(),
                    h.circuit.replace('_', "-"),
                    when(h.since),
                    when(h.next_try),
                    h.in_flight.to_string(),
                    h.waiting.to_string(),
                    h.last_error.clone().unwrap_or_default(),
                ]);
            }
            for line in out.to_string().lines() {
                text.push_str(&format!("  {line}\n"));
            }
        }
        text
    }
}
