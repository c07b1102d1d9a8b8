//! `outboxd endpoint secret …`: an endpoint's Standard Webhooks signing
//! secrets (`outbox.endpoint_signing_secrets`, see [`crate::http::sign`]). A new
//! secret is printed once, on stdout alone, so that a script can hand it on;
//! afterwards only its fingerprint is ever shown.

use std::time::{Duration, SystemTime};

use clap::Subcommand;

use super::exit::CliError;
use super::shared::connect_current;
use super::shared::{EndpointKey, endpoint_exists};
use super::table::{self, Table};
use crate::config::Config;
use crate::http::sign::SigningKey;
use crate::store::endpoints;

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Give an endpoint a new signing secret, printed once
    ///
    /// Generates a secret (32 random bytes, `whsec_…`), prints it on stdout
    /// (the explanation goes to stderr), and signs every request with it from
    /// the next one on. The secrets it had stay valid for --keep-old (24h by
    /// default; 0s ends them now, for a secret that leaked): meanwhile each
    /// request carries both signatures, so the receiver can switch without
    /// losing a request. The first `rotate` of an endpoint starts signing.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint secret rotate --company 6316 --keep-old 24h > /run/secrets/new-whsec
    Rotate {
        #[command(flatten)]
        key: EndpointKey,

        /// How long the secrets in use now stay valid ("24h", "30m", "0s")
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = keep_old_arg)]
        keep_old: Duration,
    },

    /// List an endpoint's signing secrets: fingerprints and expiry only
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint secret list --company 6316
    List(EndpointKey),

    /// Stop signing an endpoint's requests, on purpose
    ///
    /// Deletes its signing secrets and the record that it signed, so that
    /// outboxd does not report it as an endpoint left without a secret
    /// (which it does, once, when the secrets of an endpoint that signed
    /// all expire or are deleted). Its requests go out unsigned from the
    /// next one on. Works for an endpoint that is gone too.
    ///
    /// Example:
    ///
    ///   $ outboxd endpoint secret clear --company 6316
    Clear(EndpointKey),
}

fn keep_old_arg(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (like \"24h\" or \"0s\")"))
}

pub async fn run(command: SecretCommand, config: &Config) -> Result<(), CliError> {
    match command {
        SecretCommand::Rotate { key, keep_old } => rotate(&key, keep_old, config).await,
        SecretCommand::List(key) => list(&key, config).await,
        SecretCommand::Clear(key) => clear(&key, config).await,
    }
}

async fn clear(key: &EndpointKey, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    let (secrets, signed) = endpoints::clear_secrets(&client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("deleting the signing secrets", &e))?;
    if secrets == 0 && !signed {
        println!(
            "company {} ({}) does not sign its requests: nothing to clear",
            key.company, key.event
        );
    } else {
        println!(
            "company {} ({}) no longer signs its requests: {secrets} signing secret(s) deleted",
            key.company, key.event
        );
    }
    Ok(())
}

async fn rotate(key: &EndpointKey, keep_old: Duration, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    endpoint_exists(&client, key).await?;
    let (new, text) = SigningKey::generate().map_err(CliError::Failed)?;
    let keep_ms = keep_old.as_millis().min(i64::MAX as u128) as i64;
    let row = endpoints::rotate_secret(&client, key.company, &key.event, &text, keep_ms)
        .await
        .map_err(|e| CliError::database("saving the new signing secret", &e))?
        .ok_or_else(|| CliError::Failed("the endpoint was removed meanwhile".into()))?;
    let old_until: Option<SystemTime> = row.get("old_until");
    println!("{text}");
    eprintln!(
        "new signing secret for company {} ({}), fingerprint {}: shown this once, on stdout",
        key.company,
        key.event,
        new.fingerprint()
    );
    match old_until {
        Some(until) if until > SystemTime::now() => eprintln!(
            "the previous secrets stay valid until {}; requests carry both signatures until then",
            table::time(until)
        ),
        Some(_) => eprintln!("the previous secrets ended now"),
        None => eprintln!("the endpoint signs its requests from now on"),
    }
    Ok(())
}

async fn list(key: &EndpointKey, config: &Config) -> Result<(), CliError> {
    let client = connect_current(config).await?;
    endpoint_exists(&client, key).await?;
    let rows = endpoints::secrets(&client, key.company, &key.event)
        .await
        .map_err(|e| CliError::database("reading the signing secrets", &e))?;
    if rows.is_empty() {
        println!(
            "company {} ({}) has no signing secret: its requests are not signed",
            key.company, key.event
        );
        return Ok(());
    }
    let mut out = Table::new(&["fingerprint", "created", "expires", "state"]);
    for row in &rows {
        let secret: String = row.get("secret");
        let fingerprint = SigningKey::parse(&secret)
            .map(|k| k.fingerprint())
            .unwrap_or_else(|_| "(not a valid secret)".into());
        let expires: Option<SystemTime> = row.get("expires_at");
        out.row(vec![
            fingerprint,
            table::time(row.get("created_at")),
            expires.map_or("never".into(), table::time),
            if row.get::<_, bool>("active") {
                "active"
            } else {
                "expired"
            }
            .into(),
        ]);
    }
    print!("{out}");
    Ok(())
}
