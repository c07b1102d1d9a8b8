//! Sending one email over SMTP with mail-send: one connection, one SMTP
//! transaction per recipient, so a recipient the server refuses does not
//! hold back the others.

use std::time::Duration;

use mail_send::smtp::message::Message;
use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{SmtpConfig, SmtpTls};

/// What happened to each recipient of one send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Accepted by the server.
    pub accepted: Vec<String>,
    /// Refused for good (a 5xx reply): not tried again.
    pub refused: Vec<(String, String)>,
    /// Not sent this time (a 4xx reply, or the connection failed before
    /// their turn), with the reason; tried again later.
    pub deferred: Vec<(String, String)>,
}

/// Sends `message` (a complete RFC 5322 message) to each of `recipients`.
/// Never fails as a whole: a connection problem defers every recipient.
pub async fn send(config: &SmtpConfig, message: &[u8], recipients: &[String]) -> SendReport {
    let builder = match builder(config) {
        Ok(builder) => builder,
        Err(reason) => return all_deferred(recipients, &reason),
    };
    let whole = send_limit(config, recipients.len());
    let attempt = async {
        match config.tls {
            SmtpTls::None => match builder.connect_plain().await {
                Ok(client) => send_each(client, config, message, recipients).await,
                Err(e) => all_deferred(recipients, &describe(&e)),
            },
            SmtpTls::StartTls | SmtpTls::Implicit => match builder.connect().await {
                Ok(client) => send_each(client, config, message, recipients).await,
                Err(e) => all_deferred(recipients, &describe(&e)),
            },
        }
    };
    match tokio::time::timeout(whole, attempt).await {
        Ok(report) => report,
        Err(_) => all_deferred(
            recipients,
            &format!("no answer within {}", humantime::format_duration(whole)),
        ),
    }
}

/// The longest [`send`] takes for `recipients` recipients: mail-send applies
/// `smtp.timeout` to connecting and to each reply, and this outer bound
/// (one timeout for the connection and greeting, one per recipient's
/// transaction, one for the goodbye) also covers a server that drips a reply
/// line byte by byte.
pub fn send_limit(config: &SmtpConfig, recipients: usize) -> Duration {
    config.timeout * (recipients as u32 + 2)
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

async fn send_each<T: AsyncRead + AsyncWrite + Unpin>(
    mut client: SmtpClient<T>,
    config: &SmtpConfig,
    message: &[u8],
    recipients: &[String],
) -> SendReport {
    let mut report = SendReport::default();
    for (i, rcpt) in recipients.iter().enumerate() {
        let envelope = Message::new(config.from.as_str(), [rcpt.as_str()], message);
        match client.send(envelope).await {
            Ok(_) => report.accepted.push(rcpt.clone()),
            Err(mail_send::Error::UnexpectedReply(reply)) => {
                let reason = format!("{} {}", reply.code, reply.message.trim());
                if (500..600).contains(&reply.code) {
                    report.refused.push((rcpt.clone(), reason));
                } else {
                    report.deferred.push((rcpt.clone(), reason));
                }
                // Back to a clean state for the next recipient's MAIL FROM.
                if let Err(e) = client.rset().await {
                    let reason = format!("resetting the SMTP session: {}", describe(&e));
                    defer_rest(&mut report, &recipients[i + 1..], &reason);
                    return report;
                }
            }
            Err(e) => {
                let reason = describe(&e);
                defer_rest(&mut report, &recipients[i..], &reason);
                return report;
            }
        }
    }
    // A polite goodbye; the report stands whatever the server says to it.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.quit()).await;
    report
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
