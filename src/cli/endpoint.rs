//! `outboxd endpoint …`: a company's webhook settings in outbox.endpoints,
//! the product's "Step two": set, list, show, enable, disable, remove.
//! (`endpoint test` sends a request; it lives in [`super::probe`].)
//!
//! `set` saves what [`super::settings`] checked, in one upsert
//! (`sql/queries/endpoint_upsert.sql`). Passwords and tokens are written,
//! never read back: list and show select only whether each is set
//! (`sql/queries/endpoints.sql`).

use std::time::SystemTime;

use clap::Subcommand;
use tokio_postgres::Row;

use super::exit::CliError;
use super::probe;
use super::settings::{SetArgs, Settings};
use super::shared::{EndpointKey, connect_current, endpoint_exists, not_found};
use super::table::{self, Table};
use crate::config::Config;
use crate::model::shown_url;
use crate::store::endpoints::{self, NewEndpoint};

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Create or replace the endpoint of a company for one event type
    ///
    /// Replaces the whole endpoint: a flag left out takes its default (no
    /// auth, no notification emails, enabled), and secrets the chosen auth
    /// type does not use are removed. Every flag is checked first, and every
    /// problem reported (exit 2) before anything is written. Secrets are read
    /// from files, one trailing newline dropped, so they stay out of shell
    /// history and process lists; they are never printed.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint set --company 6316 --url https://erp.example.com/hooks/payment-cancelled --auth basic --username sales --password-file /run/secrets/erp-password --notify ops@example.com,finance@example.com
    Set(SetArgs),

    /// List endpoints, secrets shown only as set or not set
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint list --company 6316
    List {
        /// Only this company's endpoints
        #[arg(long, value_name = "ID", value_parser = clap::value_parser!(i64).range(1..))]
        company: Option<i64>,
    },

    /// Show one endpoint, secrets shown only as set or not set
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint show --company 6316
    Show(EndpointKey),

    /// Resume deliveries to an endpoint
    ///
    /// Events that failed while it was disabled stay failed; put them back
    /// with `outboxd events retry --company ID --state failed`.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint enable --company 6316
    Enable(EndpointKey),

    /// Stop deliveries to an endpoint, keeping its settings
    ///
    /// While it is disabled, its events are not sent: each fails at once
    /// (outcome no_endpoint, no email). Retry them after enabling it.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint disable --company 6316
    Disable(EndpointKey),

    /// Hold an endpoint's events: open its circuit by hand
    ///
    /// Nothing is sent to it, and no probe, until `outboxd endpoint reset`;
    /// its events stay pending with no attempt counted (those held longer
    /// than circuit.max_hold past their due time still fail, with an
    /// email). For an ERP down for planned maintenance. Every instance
    /// sees it at its next claim.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint pause --company 6316
    Pause(EndpointKey),

    /// Close an endpoint's circuit: deliver to it again now
    ///
    /// Ends a pause, an open circuit's cool-down, and a Retry-After wait;
    /// its waiting events go out at once, at its cap.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint reset --company 6316
    Reset(EndpointKey),

    /// Delete an endpoint and its settings
    ///
    /// Its events then fail at once (no_endpoint) until an endpoint is set
    /// again. Its signing secrets go too (a delete of the endpoint row alone,
    /// in SQL, keeps them). The events and their attempts are kept.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint remove --company 6316 --event invoice.created
    Remove(EndpointKey),

    /// Send one test request to an endpoint and judge the answer
    ///
    /// POSTs a sample body with the endpoint's auth and the header
    /// `Outboxd-Test: 1` (receivers can recognise it) under a fresh random
    /// event id, then prints the HTTP status, the verdict a real event would
    /// get and the receiver's message. Writes nothing to the outbox. Exits 0
    /// when the receiver answered success (status 1), 1 otherwise. A disabled
    /// endpoint is tested too.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint test --company 6316
    Test(EndpointKey),

    /// Signing secrets (Standard Webhooks): rotate, list
    Secret {
        #[command(subcommand)]
        command: super::secret::SecretCommand,
    },
}

pub async fn run(command: EndpointCommand, config: &Config) -> Result<(), CliError> {
    match command {
        EndpointCommand::Set(args) => set(args.validate()?, config).await,
        EndpointCommand::List { company } => list(company, config).await,
        EndpointCommand::Show(key) => show(&key, config).await,
        EndpointCommand::Enable(key) => set_enabled(&key, true, config).await,
        EndpointCommand::Disable(key) => set_enabled(&key, false, config).await,
        EndpointCommand::Pause(key) => pause(&key, config).await,
        EndpointCommand::Reset(key) => reset(&key, config).await,
        EndpointCommand::Remove(key) => remove(&key, config).await,
        EndpointCommand::Test(key) => probe::run(&key, config).await,
        EndpointCommand::Secret { command } => super::secret::run(command, config).await,
    }
}

async fn set(settings: Settings, config: &Config) -> Result<(), CliError> {
    let mut client = connect_current(config).await?;
    let endpoint = NewEndpoint {
        company: settings.company,
        event: &settings.event,
        url: &settings.url,
        auth: &settings.auth,
        notify: &settings.notify,
        enabled: settings.enabled,
        max_in_flight: settings.max_in_flight,
        signing_secret: settings.signing_secret.as_ref(),
    };
    let inserted = endpoints::save(&mut client, &endpoint)
        .await
        .map_err(|e| CliError::database("saving the endpoint", &e))?;
    let row = endpoints::one(&client, settings.company, &settings.event)
        .await
        .map_err(|e| CliError::database("reading the endpoint back", &e))?
        .ok_or_else(|| CliError::Failed("the endpoint was removed meanwhile".into()))?;
    let view = View::from_row(&row);
    println!(
        "{} the endpoint of company {} for {}",
        if inserted { "created" } else { "replaced" },
        view.company_id,
        view.event_type
    );
    print!("{}", view.details(false));
    Ok(())
}

async fn list(company: Option<i64>, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let rows = endpoints::list(&client, company, None)
        .await
        .map_err(|e| CliError::database("reading endpoints", &e))?;
    if rows.is_empty() {
        match company {
            Some(company) => println!("no endpoints for company {company}"),
            None => println!("no endpoints"),
        }
        return Ok(());
    }
    let mut out = Table::new(&[
        "company",
        "event type",
        "url",
        "auth",
        "notify",
        "enabled",
        "circuit",
        "updated",
    ]);
    for view in rows.iter().map(View::from_row) {
        out.row(vec![
            view.company_id.to_string(),
            view.event_type.clone(),
            view.url.clone(),
            view.auth(),
            view.notify_emails.join(", "),
            yes_no(view.enabled).into(),
            view.circuit.short(),
            table::time(view.updated_at),
        ]);
    }
    print!("{out}");
    Ok(())
}

async fn show(key: &EndpointKey, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let row = endpoints::one(&client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("reading the endpoint", &e))?
        .ok_or_else(|| not_found(key))?;
    let view = View::from_row(&row);
    let load = endpoints::load(&client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("reading the endpoint's events", &e))?;
    println!(
        "endpoint of company {} for {}",
        view.company_id, view.event_type
    );
    print!("{}", view.details(true));
    let ceiling = config.delivery.max_in_flight_ceiling;
    let cap = match view.max_in_flight {
        Some(cap) if cap as i64 > ceiling as i64 => {
            format!("{ceiling} (its own {cap}, cut to delivery.max_in_flight_ceiling)")
        }
        Some(cap) => format!("{cap} (its own)"),
        None => format!(
            "{} (delivery.endpoint_concurrency)",
            config.delivery.endpoint_concurrency
        ),
    };
    println!(
        "  circuit: {}\n  cap:     {cap}\n  events:  {} in flight, {} waiting, {} scheduled for a retry",
        view.circuit.long(),
        load.get::<_, i64>("in_flight"),
        load.get::<_, i64>("waiting"),
        load.get::<_, i64>("scheduled"),
    );
    Ok(())
}

async fn set_enabled(key: &EndpointKey, enabled: bool, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let changed = endpoints::set_enabled(&client, key.company, &key.event, enabled)
        .await
        .map_err(|e| CliError::database("updating the endpoint", &e))?;
    if !changed {
        return Err(not_found(key));
    }
    println!(
        "{} the endpoint of company {} for {}",
        if enabled { "enabled" } else { "disabled" },
        key.company,
        key.event
    );
    Ok(())
}

async fn pause(key: &EndpointKey, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    endpoint_exists(&client, key).await?;
    endpoints::pause(&client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("pausing the endpoint", &e))?;
    println!(
        "paused the endpoint of company {} for {}: its events are held until `outboxd endpoint reset`",
        key.company, key.event
    );
    Ok(())
}

async fn reset(key: &EndpointKey, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    endpoint_exists(&client, key).await?;
    let before = endpoints::reset(&client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("resetting the endpoint", &e))?;
    let was = match before {
        Some(row) if row.get::<_, bool>("manual") => "paused",
        Some(row) => match row.get::<_, String>("state").as_str() {
            "open" => "open",
            "half_open" => "half-open",
            _ => "closed",
        },
        None => "closed",
    };
    println!(
        "the circuit of company {}'s endpoint for {} is closed (it was {was}); its events flow",
        key.company, key.event
    );
    Ok(())
}

async fn remove(key: &EndpointKey, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let removed = endpoints::remove(&client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("removing the endpoint", &e))?;
    if !removed {
        return Err(not_found(key));
    }
    println!(
        "removed the endpoint of company {} for {}",
        key.company, key.event
    );
    Ok(())
}

/// An endpoint as printed: secrets only as set / not set.
struct View {
    company_id: i64,
    event_type: String,
    url: String,
    auth_type: String,
    username: Option<String>,
    password_set: bool,
    token_set: bool,
    notify_emails: Vec<String>,
    enabled: bool,
    created_at: SystemTime,
    updated_at: SystemTime,
    max_in_flight: Option<i32>,
    circuit: Circuit,
}

/// An endpoint's circuit breaker, from `outbox.endpoint_circuits`.
struct Circuit {
    state: String,
    manual: bool,
    opened_at: Option<SystemTime>,
    retry_at: Option<SystemTime>,
    paused_until: Option<SystemTime>,
    failures: i32,
    last_error: Option<String>,
}

impl Circuit {
    /// For the list: closed, open, half-open, paused; "+ wait" while a
    /// Retry-After holds it.
    fn short(&self) -> String {
        let state = match (self.manual, self.state.as_str()) {
            (true, _) => "paused",
            (false, "half_open") => "half-open",
            (false, state) => state,
        };
        match self.paused_until {
            Some(_) => format!("{state} + Retry-After"),
            None => state.to_string(),
        }
    }

    /// For `show`: the state with since when, what next, and why.
    fn long(&self) -> String {
        let when = |t: Option<SystemTime>| t.map(table::time).unwrap_or_else(|| "-".into());
        let mut out = match (self.manual, self.state.as_str()) {
            (true, _) => format!(
                "{} since {} (until `outboxd endpoint reset`{})",
                self.last_error.as_deref().unwrap_or("paused"),
                when(self.opened_at),
                if self.last_error.as_deref() == Some("paused by the company") {
                    " or the company's outbox.resume_endpoint"
                } else {
                    ""
                }
            ),
            (false, "open") => format!(
                "open since {}, events held; next probe after {}",
                when(self.opened_at),
                when(self.retry_at)
            ),
            (false, "half_open") => format!(
                "half-open since {}: one probe event is out",
                when(self.opened_at)
            ),
            _ if self.failures > 0 => format!(
                "closed ({} retryable failures in a row so far)",
                self.failures
            ),
            _ => "closed".to_string(),
        };
        if let Some(until) = self.paused_until {
            out.push_str(&format!(
                "; Retry-After holds it until {}",
                table::time(until)
            ));
        }
        if self.state != "closed" && !self.manual {
            if let Some(error) = &self.last_error {
                out.push_str(&format!("\n           last error: {error}"));
            }
        }
        out
    }
}

impl View {
    fn from_row(row: &Row) -> View {
        View {
            company_id: row.get("company_id"),
            event_type: row.get("event_type"),
            // As shown: query values hidden (webhook::shown_url).
            url: shown_url(row.get("url")),
            auth_type: row.get("auth_type"),
            username: row.get("username"),
            password_set: row.get("password_set"),
            token_set: row.get("token_set"),
            notify_emails: row.get("notify_emails"),
            enabled: row.get("enabled"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            max_in_flight: row.get("max_in_flight"),
            circuit: Circuit {
                state: row.get("circuit"),
                manual: row.get::<_, Option<bool>>("manual").unwrap_or(false),
                opened_at: row.get("opened_at"),
                retry_at: row.get("retry_at"),
                paused_until: row.get("paused_until"),
                failures: row.get("failures"),
                last_error: row.get("last_error"),
            },
        }
    }

    /// `basic (user sales, password set)`, `bearer (token set)`, `none`.
    fn auth(&self) -> String {
        let set = |is: bool| if is { "set" } else { "not set" };
        match self.auth_type.as_str() {
            "basic" => format!(
                "basic (user {}, password {})",
                self.username.as_deref().unwrap_or("-"),
                set(self.password_set)
            ),
            "bearer" => format!("bearer (token {})", set(self.token_set)),
            other => other.to_string(),
        }
    }

    /// Indented `key: value` lines; with the timestamps when `times`.
    fn details(&self, times: bool) -> String {
        let notify = if self.notify_emails.is_empty() {
            "(none)".to_string()
        } else {
            self.notify_emails.join(", ")
        };
        let mut out = format!(
            "  url:     {}\n  auth:    {}\n  notify:  {notify}\n  enabled: {}\n",
            self.url,
            self.auth(),
            yes_no(self.enabled)
        );
        if times {
            out.push_str(&format!(
                "  created: {}\n  updated: {}\n",
                table::time(self.created_at),
                table::time(self.updated_at)
            ));
        }
        out
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}
