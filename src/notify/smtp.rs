//! Sending one email over SMTP with mail-send: one connection, one SMTP
//! transaction per recipient, so a recipient the server refuses does not
//! hold back the others. Each step of a transaction is judged apart
//! ([`judge`]): only a refused RCPT TO is about the recipient.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use mail_send::smtp::message::Parameters;
use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{SmtpConfig, SmtpTls};

/// What happened to each recipient of one send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Accepted by the server.
    pub accepted: Vec<String>,
    /// Refused for good (a 5xx reply to RCPT TO): not tried again.
    pub refused: Vec<(String, String)>,
    /// Not sent this time, with the reason; tried again later: a 4xx reply
    /// to RCPT TO, any refusal of our sender (MAIL FROM) or of the message
    /// (DATA), or a connection that failed before their turn.
    pub deferred: Vec<(String, String)>,
}

/// Told of each recipient the server accepted, awaited before the next
/// recipient's transaction (see [`send`]).
pub type OnAccepted<'a> =
    dyn FnMut(String) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> + Send + 'a;

/// Sends `message` (a complete RFC 5322 message) to each of `recipients`.
/// Never fails as a whole: a connection problem defers every recipient.
/// What each recipient's transaction came to is kept as it happens, so a
/// cut-off of the whole exchange ([`send_limit`]) defers only the
/// recipients not reached yet: one who accepted is never mailed again.
/// `on_accepted` is awaited with each recipient the server accepted before
/// the next one's transaction starts (the mailer writes it down there, so
/// that the progress outlives this future: a stop that abandons it, a
/// crash); it takes at most `per_accepted`, which the whole bound counts.
pub async fn send(
    config: &SmtpConfig,
    message: &[u8],
    recipients: &[String],
    on_accepted: &mut OnAccepted<'_>,
    per_accepted: Duration,
) -> SendReport {
    let builder = match builder(config) {
        Ok(builder) => builder,
        Err(reason) => return all_deferred(recipients, &reason),
    };
    let whole = send_limit(config, recipients.len()) + per_accepted * recipients.len() as u32;
    let mut report = SendReport::default();
    let attempt = async {
        match config.tls {
            SmtpTls::None => match builder.connect_plain().await {
                Ok(client) => {
                    send_each(
                        client,
                        config,
                        message,
                        recipients,
                        &mut report,
                        on_accepted,
                    )
                    .await
                }
                Err(e) => defer_rest(&mut report, recipients, &describe(&e)),
            },
            SmtpTls::StartTls | SmtpTls::Implicit => match builder.connect().await {
                Ok(client) => {
                    send_each(
                        client,
                        config,
                        message,
                        recipients,
                        &mut report,
                        on_accepted,
                    )
                    .await
                }
                Err(e) => defer_rest(&mut report, recipients, &describe(&e)),
            },
        }
    };
    if tokio::time::timeout(whole, attempt).await.is_err() {
        let reached: std::collections::HashSet<&String> = report
            .accepted
            .iter()
            .chain(report.refused.iter().map(|(r, _)| r))
            .chain(report.deferred.iter().map(|(r, _)| r))
            .collect();
        let rest: Vec<String> = recipients
            .iter()
            .filter(|r| !reached.contains(r))
            .cloned()
            .collect();
        let reason = format!("no answer within {}", humantime::format_duration(whole));
        defer_rest(&mut report, &rest, &reason);
    }
    report
}

/// SMTP commands one recipient's transaction takes, each of which
/// mail-send gives `smtp.timeout`: MAIL FROM, RCPT TO, DATA, the message's
/// end, RSET.
const COMMANDS_PER_RECIPIENT: u32 = 5;

/// Timeouts the session takes besides the transactions: the connection with
/// its greeting, EHLO, and AUTH's two steps.
const SESSION_COMMANDS: u32 = 4;

/// The goodbye's own bound (QUIT).
const QUIT_WAIT: Duration = Duration::from_secs(5);

/// The longest [`send`] takes for `recipients` recipients: mail-send applies
/// `smtp.timeout` to each command it sends, so a server that answers each
/// one just within it is slow, not broken, and the exchange may take one
/// timeout per command. This outer bound (every command at its timeout,
/// plus the goodbye) only catches a server that drips a reply byte by byte
/// or never sends its greeting (mail-send reads a plain connection's
/// greeting without a timeout). With the defaults (30 s, 5 recipients):
/// 14 min 35 s.
pub fn send_limit(config: &SmtpConfig, recipients: usize) -> Duration {
    config.timeout * (COMMANDS_PER_RECIPIENT * recipients as u32 + SESSION_COMMANDS) + QUIT_WAIT
}

fn builder(config: &SmtpConfig) -> Result<SmtpClientBuilder<String>, String> {
    let mut builder = SmtpClientBuilder::new(config.host.clone(), config.port)
        .map_err(|e| format!("setting up TLS: {e}"))?
        .implicit_tls(config.tls == SmtpTls::Implicit)
        .timeout(config.timeout);
    if let (Some(username), Some(password)) = (&config.username, &config.password) {
        builder = builder.credentials(Credentials::Plain {
            username: username.clone(),
            secret: password.expose().to_string(),
        });
    }
    Ok(builder)
}

/// One transaction per recipient, each one's result put in `report` as
/// soon as it is known, and each acceptance told to `on_accepted`.
async fn send_each<T: AsyncRead + AsyncWrite + Unpin>(
    mut client: SmtpClient<T>,
    config: &SmtpConfig,
    message: &[u8],
    recipients: &[String],
    report: &mut SendReport,
    on_accepted: &mut OnAccepted<'_>,
) {
    for (i, rcpt) in recipients.iter().enumerate() {
        let refusal = match transaction(&mut client, config, message, rcpt).await {
            Ok(()) => {
                report.accepted.push(rcpt.clone());
                on_accepted(rcpt.clone()).await;
                continue;
            }
            Err(Failed::Refused(stage, reply)) => (stage, reply),
            Err(Failed::Broken(e)) => {
                defer_rest(report, &recipients[i..], &describe(&e));
                return;
            }
        };
        let (stage, reply) = refusal;
        let reason = stage.explain(config, &reply);
        match judge(stage, reply.code) {
            Verdict::RecipientRefused => report.refused.push((rcpt.clone(), reason)),
            Verdict::RecipientDeferred => report.deferred.push((rcpt.clone(), reason)),
            Verdict::EveryoneDeferred => {
                // About our sender or our message, so the same for every
                // recipient: all wait for the next try, and the session ends.
                defer_rest(report, &recipients[i..], &reason);
                let _ = tokio::time::timeout(QUIT_WAIT, client.quit()).await;
                return;
            }
        }
        // Back to a clean state for the next recipient's MAIL FROM.
        if let Err(e) = client.rset().await {
            let reason = format!("resetting the SMTP session: {}", describe(&e));
            defer_rest(report, &recipients[i + 1..], &reason);
            return;
        }
    }
    // A polite goodbye; the report stands whatever the server says to it.
    let _ = tokio::time::timeout(QUIT_WAIT, client.quit()).await;
}

/// The step of an SMTP transaction that the server refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// MAIL FROM: our sender address (or our session: no AUTH, a relay
    /// that does not know us).
    Sender,
    /// RCPT TO: this one recipient.
    Recipient,
    /// DATA, or the reply to the message itself: its size or content.
    Message,
}

impl Stage {
    fn explain(self, config: &SmtpConfig, reply: &Reply) -> String {
        let said = format!("{} {}", reply.code, reply.message.trim());
        match self {
            Stage::Sender => format!(
                "the SMTP server refused the sender {} (smtp.from): {said}",
                config.from
            ),
            Stage::Recipient => said,
            Stage::Message => format!("the SMTP server refused the message: {said}"),
        }
    }
}

/// What a refused step means for the email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// This recipient will never take it (a 5xx to RCPT TO): not tried again.
    RecipientRefused,
    /// This recipient not now (a 4xx to RCPT TO): tried again later.
    RecipientDeferred,
    /// The server will not take this email from us now, for anyone: every
    /// recipient not yet reached is tried again later. A 5xx here is about
    /// our configuration or our message, which the operator can fix (and the
    /// failing sends are alerted on); it is never a reason to drop the email.
    EveryoneDeferred,
}

/// Only a refusal of RCPT TO is about the recipient; a refusal of MAIL FROM
/// or of the message is about us, whatever its code.
pub fn judge(stage: Stage, code: u16) -> Verdict {
    match stage {
        Stage::Recipient if (500..600).contains(&code) => Verdict::RecipientRefused,
        Stage::Recipient => Verdict::RecipientDeferred,
        Stage::Sender | Stage::Message => Verdict::EveryoneDeferred,
    }
}

/// A server's reply to a refused step.
struct Reply {
    code: u16,
    message: String,
}

enum Failed {
    /// The server answered the step with a refusal.
    Refused(Stage, Reply),
    /// The connection failed (I/O, timeout, an unreadable reply).
    Broken(mail_send::Error),
}

/// One SMTP transaction for one recipient, each step told apart so that a
/// refusal is judged by what was refused.
async fn transaction<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    config: &SmtpConfig,
    message: &[u8],
    rcpt: &str,
) -> Result<(), Failed> {
    let at = |stage| {
        move |e| match e {
            mail_send::Error::UnexpectedReply(reply) => Failed::Refused(
                stage,
                Reply {
                    code: reply.code,
                    message: reply.message,
                },
            ),
            other => Failed::Broken(other),
        }
    };
    let none = Parameters::default();
    client
        .mail_from(&config.from, &none)
        .await
        .map_err(at(Stage::Sender))?;
    client
        .rcpt_to(rcpt, &none)
        .await
        .map_err(at(Stage::Recipient))?;
    client.data(message).await.map_err(at(Stage::Message))?;
    Ok(())
}

fn defer_rest(report: &mut SendReport, rest: &[String], reason: &str) {
    report
        .deferred
        .extend(rest.iter().map(|r| (r.clone(), reason.to_string())));
}

fn all_deferred(recipients: &[String], reason: &str) -> SendReport {
    let mut report = SendReport::default();
    defer_rest(&mut report, recipients, reason);
    report
}

/// mail-send's error as one line. Its messages carry server replies and
/// I/O errors, never the credentials it was given.
fn describe(e: &mail_send::Error) -> String {
    match e {
        mail_send::Error::Io(io) => format!("SMTP connection: {io}"),
        other => format!("SMTP: {other}"),
    }
}

/// Connects, greets (and authenticates, when configured), and says goodbye:
/// what `outboxd check` uses to tell whether SMTP is usable.
pub async fn probe(config: &SmtpConfig) -> Result<(), String> {
    let builder = builder(config)?;
    let attempt = async {
        match config.tls {
            SmtpTls::None => {
                let client = builder.connect_plain().await?;
                client.quit().await
            }
            SmtpTls::StartTls | SmtpTls::Implicit => {
                let client = builder.connect().await?;
                client.quit().await
            }
        }
    };
    match tokio::time::timeout(config.timeout * 2, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(config.timeout * 2)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_recipient_is_dropped_and_only_that_recipient() {
        use Stage::*;
        use Verdict::*;
        let table = [
            // (stage, code, verdict)
            (Recipient, 550, RecipientRefused), // mailbox unavailable
            (Recipient, 553, RecipientRefused), // mailbox name not allowed
            (Recipient, 450, RecipientDeferred), // mailbox busy
            (Recipient, 452, RecipientDeferred), // too many recipients
            (Sender, 530, EveryoneDeferred),    // authentication required
            (Sender, 550, EveryoneDeferred),    // sender not permitted
            (Sender, 553, EveryoneDeferred),    // sender address rejected
            (Sender, 451, EveryoneDeferred),    // local error
            (Message, 552, EveryoneDeferred),   // message too large
            (Message, 554, EveryoneDeferred),   // transaction failed (content)
            (Message, 451, EveryoneDeferred),   // try again later
        ];
        for (stage, code, verdict) in table {
            assert_eq!(judge(stage, code), verdict, "{stage:?} {code}");
        }
    }
}
