//! `outboxd endpoint test`: one marked test request to a company's endpoint,
//! sent and judged exactly as the daemon sends and judges events
//! ([`crate::http::request::build_test`], [`Deliverer`], `Sent::verdict`), so an
//! admin sees what a real event would get. It reads the endpoint and writes
//! nothing: no event, no attempt, no notification.

use std::time::SystemTime;

use super::exit::CliError;
use super::shared::{EndpointKey, connect_current, not_found};
use crate::config::Config;
use crate::http::classify::Verdict;
use crate::http::client::Deliverer;
use crate::http::request as webhook;
use crate::model::{Endpoint, shown_url};
use crate::store::claim::{auth_from, secrets_from};
use crate::store::endpoints;

pub async fn run(key: &EndpointKey, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let row = endpoints::for_test(&client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("reading the endpoint", &e))?
        .ok_or_else(|| not_found(key))?;
    drop(client);
    let auth_type: String = row.get("auth_type");
    let endpoint = Endpoint {
        url: row.get("url"),
        auth: auth_from(
            auth_type.clone(),
            row.get("username"),
            row.get("password"),
            row.get("token"),
        ),
        enabled: row.get("enabled"),
        signing_secrets: secrets_from(row.get("signing_secrets")),
    };
    let request = webhook::build_test(&key.event, key.company, &endpoint)
        .map_err(|e| CliError::Failed(format!("cannot build the test request: {e}")))?;

    println!(
        "test request: POST {} (company {}, {}, auth {auth_type})",
        shown_url(&endpoint.url),
        key.company,
        key.event
    );
    println!(
        "  event id: {} (random, not in the outbox; sent with the header Outboxd-Test: 1)",
        request.event_id
    );
    println!("  body:     {}", String::from_utf8_lossy(&request.body));
    if !endpoint.enabled {
        println!("  note:     this endpoint is disabled: events are not sent to it");
    }

    let deliverer = Deliverer::new(&config.delivery).map_err(CliError::Failed)?;
    let sent = deliverer.send(&request).await;
    let took = sent.duration.as_millis();
    match sent.http_status() {
        Some(status) => println!("answer:  HTTP {status} after {took} ms"),
        None => println!("answer:  none after {took} ms"),
    }
    let verdict = sent.verdict(SystemTime::now());
    let delivered = matches!(verdict, Verdict::Delivered { .. });
    let (outcome, meaning, reason, message) = match verdict {
        Verdict::Delivered { message } => (
            "success",
            "a real event would be marked delivered",
            None,
            message,
        ),
        Verdict::Rejected { message } => (
            "rejected",
            "the external system answered status 0; a real event would fail and its \
             company be notified",
            None,
            message,
        ),
        Verdict::Retry {
            reason, message, ..
        } => (
            "retryable",
            "a real event would be tried again later",
            Some(reason),
            message,
        ),
        Verdict::Misconfigured { reason, message } => (
            "misconfigured",
            "a real event would be tried a few more times (credentials or route), then fail",
            Some(reason),
            message,
        ),
        Verdict::Permanent { reason, message } => (
            "permanent",
            "a real event would fail for good and its company be notified",
            Some(reason),
            message,
        ),
    };
    println!("verdict: {outcome} ({meaning})");
    if let Some(reason) = reason {
        println!("reason:  {reason}");
    }
    if let Some(message) = message {
        println!("message: {message}");
    }
    if delivered {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "the endpoint did not accept the test request ({outcome})"
        )))
    }
}
