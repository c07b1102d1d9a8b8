//! The mailer: turns queued notifications into throttled emails and sends
//! them, safe with several instances.
//!
//! Each tick ([`Mailer::run_once`]):
//! 1. gather: under an advisory lock (one instance at a time), endpoints whose
//!    oldest waiting notification has waited `notify.gather` and which had no
//!    email within `notify.window` get one new email listing all of them
//!    (`sql/queries/gather_notifications.sql`);
//! 2. send: due emails are leased (`claim_emails.sql`), rendered
//!    ([`crate::email`]), sent one SMTP transaction per recipient
//!    ([`crate::smtp`]), and marked with a fenced update (`mark_email.sql`).
//!    Recipients not reached are retried after `notify.retry_delay`, doubling
//!    up to 30 minutes, for as long as it takes: a notification is never
//!    dropped because the SMTP server was down.
//!
//! Without `[smtp] host` the mailer only gathers; emails wait in the
//! database until SMTP is configured.

use std::time::{Duration, SystemTime};

use mail_send::mail_builder::MessageBuilder;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::config::{NotifyConfig, SmtpConfig};
use crate::email::{self, FailedEvent};
use crate::{db, smtp};

const GATHER_SQL: &str = include_str!("../sql/queries/gather_notifications.sql");
const CLAIM_SQL: &str = include_str!("../sql/queries/claim_emails.sql");
const CONTENT_SQL: &str = include_str!("../sql/queries/email_content.sql");
const MARK_SQL: &str = include_str!("../sql/queries/mark_email.sql");

/// Advisory lock key for gathering: "ob-notif" as a big-endian integer.
const GATHER_LOCK_KEY: i64 = 0x6f622d6e6f746966;

/// Emails sent per tick by one instance; the next tick takes more. Small, so
/// a shutdown never waits on a long queue of SMTP exchanges.
const EMAILS_PER_TICK: i64 = 10;

/// Longest wait between two tries of one email.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 60);

/// What one tick did; counts for logs and, later, metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Emails created from waiting notifications.
    pub gathered: u64,
    /// Emails finished (every recipient accepted or refused).
    pub sent: u64,
    /// Emails that left recipients for a later try.
    pub deferred: u64,
    /// Recipients refused for good by the SMTP server.
    pub refused: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct NotifyError {
    step: &'static str,
    reason: String,
}

fn step(step: &'static str) -> impl FnOnce(tokio_postgres::Error) -> NotifyError {
    move |e| NotifyError {
        step,
        reason: db::describe(&e),
    }
}

pub struct Mailer {
    pool: deadpool_postgres::Pool,
    owner: String,
    config: NotifyConfig,
}

impl Mailer {
    pub fn new(pool: deadpool_postgres::Pool, owner: String, config: NotifyConfig) -> Mailer {
        Mailer {
            pool,
            owner,
            config,
        }
    }

    /// Ticks every `notify.poll_interval` until `shutdown`. An error is
    /// logged and the next tick tries again.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.config.smtp.is_none() {
            tracing::warn!(
                "smtp.host is not set: error notifications are queued in outbox.emails but not sent"
            );
        }
        loop {
            match self.run_once().await {
                Ok(report) if report != Report::default() => {
                    tracing::info!(
                        gathered = report.gathered,
                        sent = report.sent,
                        deferred = report.deferred,
                        refused = report.refused,
                        "notification emails"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    crate::telemetry::database_error("mailer");
                    tracing::warn!(error = %e, "notification mailer");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    /// One tick: gather, then send what is due.
    pub async fn run_once(&self) -> Result<Report, NotifyError> {
        let mut report = Report::default();
        let client = self.pool.get().await.map_err(|e| NotifyError {
            step: "connecting",
            reason: e.to_string(),
        })?;
        report.gathered = self.gather(&client).await?;
        let Some(smtp) = &self.config.smtp else {
            return Ok(report);
        };
        let lease_ms = self.lease(smtp).as_millis() as i64;
        let claim = client
            .prepare_cached(CLAIM_SQL)
            .await
            .map_err(step("claiming due emails"))?;
        let claimed = client
            .query(&claim, &[&EMAILS_PER_TICK, &self.owner, &lease_ms])
            .await
            .map_err(step("claiming due emails"))?;
        for row in claimed {
            let email = ClaimedEmail {
                id: row.get("id"),
                recipients: row.get("recipients"),
                sent_to: row.get("sent_to"),
                refused: row.get("refused"),
                attempt: row.get("attempts"),
            };
            self.send_one(&**client, smtp, email, &mut report).await?;
        }
        Ok(report)
    }

    async fn gather(&self, client: &deadpool_postgres::Client) -> Result<u64, NotifyError> {
        let gather_ms = self.config.gather.as_millis() as i64;
        let window_ms = self.config.window.as_millis() as i64;
        // Prepared once per connection: an idle mailer costs one statement
        // per tick.
        let statement = client
            .prepare_cached(GATHER_SQL)
            .await
            .map_err(step("gathering notifications"))?;
        let created = client
            .query(&statement, &[&gather_ms, &window_ms, &GATHER_LOCK_KEY])
            .await
            .map_err(step("gathering notifications"))?;
        for row in &created {
            let id: i64 = row.get("id");
            let n: i64 = row.get("notifications");
            tracing::debug!(email_id = id, notifications = n, "email gathered");
        }
        Ok(created.len() as u64)
    }

    /// Long enough for every recipient's exchange at the SMTP timeout.
    fn lease(&self, smtp: &SmtpConfig) -> Duration {
        smtp.timeout * 12
    }

    async fn send_one(
        &self,
        client: &impl GenericClient,
        smtp: &SmtpConfig,
        email: ClaimedEmail,
        report: &mut Report,
    ) -> Result<(), NotifyError> {
        let events = load_content(client, email.id).await?;
        let todo: Vec<String> = email
            .recipients
            .iter()
            .filter(|r| !email.sent_to.contains(r) && !email.refused.contains(r))
            .cloned()
            .collect();
        let (mut sent_to, mut refused) = (email.sent_to.clone(), email.refused.clone());
        let mut error = None;
        if events.is_empty() {
            // Its events were deleted (retention) before it went out.
            refused.extend(todo.iter().cloned());
            error = Some("nothing left to report: the events were deleted".to_string());
        } else {
            let message = build_message(smtp, &email.recipients, &events);
            let outcome = smtp::send(smtp, &message, &todo).await;
            for (rcpt, reason) in &outcome.refused {
                tracing::warn!(email_id = email.id, recipient = %rcpt, reason = %reason, "recipient refused by the SMTP server");
            }
            sent_to.extend(outcome.accepted.iter().cloned());
            refused.extend(outcome.refused.iter().map(|(r, _)| r.clone()));
            report.refused += outcome.refused.len() as u64;
            ::metrics::counter!(crate::telemetry::NOTIFICATION_RECIPIENTS_REFUSED)
                .increment(outcome.refused.len() as u64);
            if let Some((_, reason)) = outcome.deferred.first() {
                error = Some(reason.clone());
            } else if let Some((_, reason)) = outcome.refused.first() {
                error = Some(format!("refused: {reason}"));
            }
        }
        let retry_ms = self.retry_delay(email.attempt).as_millis() as i64;
        let state: Option<String> = client
            .query_opt(
                MARK_SQL,
                &[
                    &email.id,
                    &email.attempt,
                    &sent_to,
                    &refused,
                    &retry_ms,
                    &error,
                ],
            )
            .await
            .map_err(step("marking an email"))?
            .map(|r| r.get(0));
        match state.as_deref() {
            Some("sent") => {
                report.sent += 1;
                ::metrics::counter!(crate::telemetry::NOTIFICATIONS_SENT).increment(1);
            }
            Some(_) => {
                report.deferred += 1;
                ::metrics::counter!(crate::telemetry::NOTIFICATIONS_FAILED).increment(1);
                tracing::warn!(
                    email_id = email.id,
                    attempt = email.attempt,
                    error = error.as_deref().unwrap_or(""),
                    retry_in = %humantime::format_duration(Duration::from_millis(retry_ms as u64)),
                    "notification email not sent yet; will retry"
                );
            }
            None => tracing::warn!(
                email_id = email.id,
                "email outcome not recorded: its lease ran out and another instance took it"
            ),
        }
        Ok(())
    }

    /// `retry_delay`, doubling per attempt, at most 30 minutes.
    fn retry_delay(&self, attempt: i32) -> Duration {
        let doublings = attempt.clamp(1, 20) as u32 - 1;
        self.config
            .retry_delay
            .saturating_mul(1 << doublings)
            .min(MAX_RETRY_DELAY)
    }
}

struct ClaimedEmail {
    id: i64,
    recipients: Vec<String>,
    sent_to: Vec<String>,
    refused: Vec<String>,
    attempt: i32,
}

async fn load_content(
    client: &impl GenericClient,
    email_id: i64,
) -> Result<Vec<FailedEvent>, NotifyError> {
    let rows = client
        .query(CONTENT_SQL, &[&email_id])
        .await
        .map_err(step("loading an email's events"))?;
    Ok(rows
        .iter()
        .map(|r| FailedEvent {
            id: r.get("id"),
            event_type: r.get("event_type"),
            company_id: r.get("company_id"),
            payload: r.get("payload"),
            attempts: r.get("attempts"),
            response_message: r.get("response_message"),
            last_error: r.get("last_error"),
            endpoint_url: r.get("endpoint_url"),
            first_attempt: r.get::<_, Option<SystemTime>>("first_attempt"),
            last_attempt: r.get::<_, Option<SystemTime>>("last_attempt"),
        })
        .collect())
}

/// The MIME message: multipart/alternative with the text and HTML parts, To
/// listing every recipient so each sees who else was told.
fn build_message(smtp: &SmtpConfig, recipients: &[String], events: &[FailedEvent]) -> Vec<u8> {
    let rendered = email::render(events);
    MessageBuilder::new()
        .from((smtp.from_name.as_str(), smtp.from.as_str()))
        .to(recipients.iter().map(|r| r.as_str()).collect::<Vec<&str>>())
        .subject(rendered.subject)
        .text_body(rendered.text)
        .html_body(rendered.html)
        .write_to_vec()
        .expect("writing to a Vec cannot fail")
}
