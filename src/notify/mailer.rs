//! The mailer: turns queued notifications into throttled emails and sends
//! them, safe with several instances.
//!
//! A [`Service`]; each tick ([`Mailer::run_once`]):
//! 1. gather (unless the tick continues a run of sends): under an advisory
//!    lock (one instance at a time, the gathering in a statement after the
//!    one that took it), endpoints whose oldest waiting
//!    notification has waited `notify.gather` and which had no email within
//!    `notify.window` get one new email listing all of them
//!    (`sql/queries/gather_notifications.sql`);
//! 2. send one: a due email is leased (`claim_emails.sql`) for as long as
//!    sending it can take (`Mailer::lease`), rendered ([`crate::notify::email`]),
//!    sent one SMTP transaction per recipient ([`crate::notify::smtp`]), and marked
//!    with a fenced update (`mark_email.sql`). When one was sent, the next
//!    tick comes at once. One at a time, because an email leased beside
//!    others waits for them: ten leased together for one email's time let
//!    the later ones outlive their lease and a second instance send them too.
//!    Recipients not reached are retried after `notify.retry_delay`, doubling
//!    up to 30 minutes, for as long as it takes: a notification is never
//!    dropped because the SMTP server was down.
//!
//! Without `[smtp] host` the mailer only gathers; emails wait in the
//! database until SMTP is configured.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use mail_send::mail_builder::MessageBuilder;
use tokio_postgres::GenericClient;

use crate::config::{CircuitConfig, NotifyConfig, SmtpConfig};
use crate::model::ClaimedEmail;
use crate::notify::email;
use crate::notify::smtp;
use crate::service::{Next, Service};
use crate::store::mail;
use crate::store::pool as db;

/// Recipients of one email at most: the schema allows 5 notify_emails per
/// endpoint (`endpoints_at_most_5_notify_emails`).
const MAX_RECIPIENTS: usize = 5;

/// How long a tick that is sending may go on after the stop signal: enough
/// for a reply or two from a working server; a silent one is abandoned, and
/// its email is sent again once its lease has run out.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

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
    /// Emails leased for sending (at most one per tick).
    pub claimed: u64,
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
    /// `[circuit]`'s limits, as the endpoint-down email states them.
    limits: email::CircuitLimits,
    /// One database round trip's bound (`store::pool::round_trip_limit`).
    db_limit: Duration,
    /// The last tick sent an email: this one goes on sending, and gathers
    /// only when the run ends.
    continuing: bool,
}

impl Service for Mailer {
    const NAME: &'static str = "mailer";

    fn tick_limit(&self) -> Duration {
        let send = self
            .config
            .smtp
            .as_ref()
            .map_or(Duration::ZERO, |s| self.lease(s));
        self.db_limit + send
    }

    fn stop_grace(&self) -> Duration {
        STOP_GRACE
    }

    /// A failure is logged and the next tick, a poll interval later, tries
    /// again.
    async fn tick(&mut self) -> Next {
        let report = self.run_once().await;
        match report {
            Ok(report) => {
                if report != Report::default() {
                    tracing::info!(
                        gathered = report.gathered,
                        sent = report.sent,
                        deferred = report.deferred,
                        refused = report.refused,
                        "notification emails"
                    );
                }
                self.continuing = report.claimed > 0;
            }
            Err(e) => {
                crate::telemetry::database_error("mailer");
                tracing::warn!(error = %e, "notification mailer");
                self.continuing = false;
            }
        }
        if self.continuing {
            Next::Now
        } else {
            Next::After(self.config.poll_interval)
        }
    }
}

impl Mailer {
    /// `circuit`: what the endpoint-down email tells of the probes and the
    /// hold limit.
    pub fn new(
        pool: deadpool_postgres::Pool,
        owner: String,
        config: NotifyConfig,
        circuit: &CircuitConfig,
        db_limit: Duration,
    ) -> Mailer {
        if config.smtp.is_none() {
            tracing::warn!(
                "smtp.host is not set: error notifications are queued in outbox.emails but not sent"
            );
        }
        Mailer {
            pool,
            owner,
            config,
            limits: email::CircuitLimits {
                max_cooldown: circuit.max_cooldown,
                max_hold: circuit.max_hold,
            },
            db_limit,
            continuing: false,
        }
    }

    /// One tick: gather (unless continuing a run of sends), then send one
    /// due email. A pooled connection is held for the statements only:
    /// given back before the SMTP exchange (which may take minutes with a
    /// slow or silent server) and taken again to mark the email, so the
    /// mailer never keeps one from the recorder or the claim.
    pub async fn run_once(&self) -> Result<Report, NotifyError> {
        let mut report = Report::default();
        let mut client = self.connection().await?;
        if !self.continuing {
            report.gathered = self.gather(&mut client).await?;
        }
        let Some(smtp) = &self.config.smtp else {
            client.done();
            return Ok(report);
        };
        let lease_ms = self.lease(smtp).as_millis() as i64;
        let claimed = mail::claim(&client, &self.owner, lease_ms)
            .await
            .map_err(step("claiming a due email"))?;
        let Some(email) = claimed else {
            client.done();
            return Ok(report);
        };
        report.claimed = 1;
        let pg: &tokio_postgres::Client = &client;
        let content = self.content(pg, &email).await?;
        client.done();
        self.send_one(smtp, email, content, &mut report).await?;
        Ok(report)
    }

    async fn connection(&self) -> Result<db::Checkout, NotifyError> {
        db::Checkout::get(&self.pool, "mailer")
            .await
            .map_err(|e| NotifyError {
                step: "connecting",
                reason: db::describe_pool(&e),
            })
    }

    /// What the email says: a circuit's news from its snapshot, or the
    /// digest of its events; None when its events were deleted meanwhile.
    async fn content(
        &self,
        client: &impl GenericClient,
        email: &ClaimedEmail,
    ) -> Result<Option<email::Rendered>, NotifyError> {
        if let Some(news) = email.circuit(&self.limits).or_else(|| email.signing()) {
            return Ok(Some(news));
        }
        let digest = self
            .bounded("loading an email's events", async {
                mail::content(client, email.id, email::DIGEST_LISTED as i64)
                    .await
                    .map_err(step("loading an email's events"))
            })
            .await?;
        Ok(digest.map(|digest| email::render_digest(&digest)))
    }

    /// Gathers under the advisory lock (one instance at a time): one
    /// transaction, the lock taken by its first statement, the gathering
    /// done by the next, whose snapshot comes after the lock (see
    /// gather_notifications.sql). An idle mailer costs one transaction per
    /// tick.
    async fn gather(&self, client: &mut deadpool_postgres::Client) -> Result<u64, NotifyError> {
        let gather_ms = self.config.gather.as_millis() as i64;
        let window_ms = self.config.window.as_millis() as i64;
        let created = mail::gather(client, gather_ms, window_ms)
            .await
            .map_err(step("gathering notifications"))?;
        for (id, n) in &created {
            tracing::debug!(email_id = id, notifications = n, "email gathered");
        }
        Ok(created.len() as u64)
    }

    /// How long one email is leased: loading its content, sending it to
    /// the most recipients an email can have with every SMTP command at its
    /// timeout ([`smtp::send_limit`]) and each acceptance written down, and
    /// marking it, each at its bound, plus 10 s. With the defaults (30 s
    /// SMTP timeout, 5 s connect timeout) 14 min 35 s + 7 × 55 s + 10 s =
    /// 21 min 10 s, which is also how long
    /// an email whose sender died waits before another instance takes it:
    /// shorter, and a slow relay that answers each command in time would see
    /// its recipients mailed twice.
    fn lease(&self, smtp: &SmtpConfig) -> Duration {
        smtp::send_limit(smtp, MAX_RECIPIENTS)
            + self.db_limit * (2 + MAX_RECIPIENTS as u32)
            + Duration::from_secs(10)
    }

    /// Sends `content` to the recipients still to have it, with no
    /// connection held, then marks the email on a connection taken for it.
    /// Each database step within its bound, so that loading, sending and
    /// marking together stay inside the lease (see `lease`).
    async fn send_one(
        &self,
        smtp: &SmtpConfig,
        email: ClaimedEmail,
        content: Option<email::Rendered>,
        report: &mut Report,
    ) -> Result<(), NotifyError> {
        let todo: Vec<String> = email
            .recipients
            .iter()
            .filter(|r| !email.sent_to.contains(r) && !email.refused.contains(r))
            .cloned()
            .collect();
        let (mut sent_to, mut refused) = (email.sent_to.clone(), email.refused.clone());
        let mut error = None;
        if let Some(rendered) = content {
            let message = build_message(smtp, &email.recipients, rendered);
            // Each acceptance is written down before the next recipient's
            // turn: an exchange cut off later (the stop's grace, a crash)
            // does not mail them again.
            let email = &email;
            let mut on_accepted = |rcpt: String| -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
                Box::pin(self.write_down(email, rcpt))
            };
            let outcome = smtp::send(smtp, &message, &todo, &mut on_accepted, self.db_limit).await;
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
        } else {
            // Its events were deleted (retention) before it went out.
            refused.extend(todo.iter().cloned());
            error = Some("nothing left to report: the events were deleted".to_string());
        }
        let retry_ms = self.retry_delay(email.attempt).as_millis() as i64;
        let mark = async {
            let client = self.connection().await?;
            let pg: &tokio_postgres::Client = &client;
            let state = mail::mark(pg, &email, &sent_to, &refused, retry_ms, error.as_deref())
                .await
                .map_err(step("marking an email"))?;
            client.done();
            Ok(state)
        };
        let state: Option<String> = self.bounded("marking an email", mark).await?;
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

    /// Writes down that `rcpt` accepted `email`, within one round trip's
    /// bound; a failure is logged (the mark at the end carries it too).
    async fn write_down(&self, email: &ClaimedEmail, rcpt: String) {
        let step_name = "writing down an accepted recipient";
        let write = async {
            let client = self.connection().await?;
            let pg: &tokio_postgres::Client = &client;
            let kept = mail::accepted(pg, email, &rcpt)
                .await
                .map_err(step(step_name))?;
            client.done();
            Ok(kept)
        };
        match self.bounded(step_name, write).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                email_id = email.id,
                "an accepted recipient was not written down: the email's lease ran out"
            ),
            Err(e) => tracing::warn!(
                email_id = email.id,
                error = %e,
                "an accepted recipient could not be written down yet; the email's mark at the \
                 end of the exchange carries it"
            ),
        }
    }

    /// `step` within one database round trip's bound.
    async fn bounded<T>(
        &self,
        step: &'static str,
        work: impl std::future::Future<Output = Result<T, NotifyError>>,
    ) -> Result<T, NotifyError> {
        match tokio::time::timeout(self.db_limit, work).await {
            Ok(done) => done,
            Err(_) => Err(NotifyError {
                step,
                reason: format!("no answer within {:?}", self.db_limit),
            }),
        }
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

/// What a claimed email says when it is about its endpoint, not failures:
/// a circuit, or signing that stopped.
trait EndpointNews {
    fn circuit(&self, limits: &email::CircuitLimits) -> Option<email::Rendered>;
    fn signing(&self) -> Option<email::Rendered>;
}

impl EndpointNews for ClaimedEmail {
    /// The email about an endpoint that stopped signing; None for another
    /// kind. A snapshot that does not parse still tells the news.
    fn signing(&self) -> Option<email::Rendered> {
        if self.kind != "signing_stopped" {
            return None;
        }
        let news = self
            .about
            .as_deref()
            .and_then(|about| serde_json::from_str(about).ok())
            .unwrap_or_else(|| email::SigningNews {
                url: "(not recorded)".to_string(),
                since: None,
                why: None,
            });
        Some(email::render_signing_stopped(
            self.company_id,
            &self.event_type,
            &news,
        ))
    }

    /// A circuit email, rendered from its snapshot; None for a digest. A
    /// snapshot that does not parse (written by hand) still tells the news,
    /// with what is known.
    fn circuit(&self, limits: &email::CircuitLimits) -> Option<email::Rendered> {
        let kind = match self.kind.as_str() {
            "circuit_opened" => email::CircuitEmail::Opened,
            "circuit_closed" => email::CircuitEmail::Closed,
            _ => return None,
        };
        let news = self
            .about
            .as_deref()
            .and_then(|about| serde_json::from_str(about).ok())
            .unwrap_or_else(|| email::CircuitNews {
                url: "(not recorded)".to_string(),
                opened_at: None,
                closed_at: None,
                retry_at: None,
                last_error: None,
                waiting: 0,
            });
        Some(email::render_circuit(
            kind,
            self.company_id,
            &self.event_type,
            &news,
            limits,
        ))
    }
}

/// The MIME message: multipart/alternative with the text and HTML parts, To
/// listing every recipient so each sees who else was told.
fn build_message(smtp: &SmtpConfig, recipients: &[String], rendered: email::Rendered) -> Vec<u8> {
    MessageBuilder::new()
        .from((smtp.from_name.as_str(), smtp.from.as_str()))
        .to(recipients.iter().map(|r| r.as_str()).collect::<Vec<&str>>())
        .subject(rendered.subject)
        .text_body(rendered.text)
        .html_body(rendered.html)
        .write_to_vec()
        .expect("writing to a Vec cannot fail")
}
