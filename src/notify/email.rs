//! What an error-notification email says: subject, plain text and HTML, for
//! one failed event or a digest of several. Pure: the mailer loads the rows
//! ([`FailedEvent`]) and sends what this renders.
//!
//! Nothing secret is in reach here: the rows carry the endpoint URL (which
//! the schema keeps free of credentials, and whose query values are shown
//! as `***`), never its password or token.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::http::classify::truncate_chars;
use crate::model::{Digest, FailedEvent, PAYMENT_CANCELLATION, PaymentCancellation, shown_url};

/// A rendered email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// The product's name for an event type ("Payment Cancellation").
fn webhook_name(event_type: &str) -> String {
    if event_type == PAYMENT_CANCELLATION {
        "Payment Cancellation".to_string()
    } else {
        format!("\"{event_type}\"")
    }
}

/// How a payment is named in the email: "payment 2271".
struct Subject {
    headline: String,
    /// (label, value) lines describing the event.
    details: Vec<(&'static str, String)>,
}

fn describe(event: &FailedEvent) -> Subject {
    if event.event_type == PAYMENT_CANCELLATION {
        if let Ok(p) = PaymentCancellation::parse(&event.payload, event.company_id) {
            let orders = p
                .order_ids
                .as_deref()
                .map(|ids| ids.replace(',', ", "))
                .unwrap_or_else(|| "none".to_string());
            return Subject {
                headline: format!("payment {}", p.payment_number),
                details: vec![
                    ("Payment number", p.payment_number.clone()),
                    ("Payment id", p.payment_id.to_string()),
                    ("Order ids", orders),
                ],
            };
        }
    }
    Subject {
        headline: format!("event {}", event.id),
        details: vec![("Payload", event.payload.clone())],
    }
}

fn outcome_line(event: &FailedEvent) -> String {
    match (&event.response_message, &event.last_error) {
        (Some(message), Some(error)) => format!("{error}; the external system said: {message}"),
        (Some(message), None) => format!("the external system said: {message}"),
        (None, Some(error)) => error.clone(),
        (None, None) => "no answer recorded".to_string(),
    }
}

fn time(t: Option<SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".to_string())
}

const NEXT_STEPS: &str = "What to do next: fix the cause first. If the external system rejected \
the event, its message above says why. If the request failed, check that the endpoint is up, \
reachable from outboxd, and that its credentials are right. Then have the event sent again \
(replayed) with the event id above; it keeps its Idempotency-Key, so the external system can \
recognise a repeat.";

/// Events a digest lists in full; the others it counts and says how to see.
/// Fifty is more than anyone reads in one email and keeps the message small
/// whatever the backlog: about 1 KB per event in each of the two parts for
/// a payment cancellation (about 100 KB in all), and with every value at
/// its cut ([`MAX_VALUE_CHARS`]; the URL at the schema's 2,048) well under
/// 2 MB, a fifth of the 10 MB that common relays accept (Postfix's default
/// `message_size_limit`, Amazon SES).
pub const DIGEST_LISTED: usize = 50;

/// A value longer than this (an order list, another type's payload, the
/// external system's message) is cut in the email, with "…"; the full text
/// is in the database.
pub const MAX_VALUE_CHARS: usize = 500;

/// Renders the email for `events` (all of one company and event type),
/// every one listed; `events` must not be empty.
pub fn render(events: &[FailedEvent]) -> Rendered {
    render_digest(&Digest {
        listed: events.to_vec(),
        total: events.len() as i64,
        since: None,
    })
}

/// Renders a digest: the listed events in full, then, when there are more,
/// their count and how to see them.
pub fn render_digest(digest: &Digest) -> Rendered {
    let events = &digest.listed[..];
    let first = &events[0];
    let total = digest.total.max(events.len() as i64);
    let unlisted = total - events.len() as i64;
    let name = webhook_name(&first.event_type);
    let subject = if total == 1 {
        format!(
            "{name} webhook failed: {} (company {})",
            describe(first).headline,
            first.company_id
        )
    } else {
        format!(
            "{name} webhook failed for {total} events (company {})",
            first.company_id
        )
    };
    let for_how_many = if total == 1 {
        String::new()
    } else if unlisted > 0 {
        format!(
            " for {total} events; the first {} are listed here",
            events.len()
        )
    } else {
        format!(" for {total} events")
    };

    let mut text = String::new();
    let _ = writeln!(
        text,
        "The {name} webhook of company {} could not be delivered{for_how_many}.\n",
        first.company_id,
    );
    let mut html = String::new();
    let _ = write!(
        html,
        "<html><body style=\"font-family: sans-serif\">\n<p>The {} webhook of company {} could not be delivered{}.</p>\n",
        escape(&name),
        first.company_id,
        escape(&for_how_many),
    );

    for (i, event) in events.iter().enumerate() {
        let what = describe(event);
        let mut rows: Vec<(&str, String)> = vec![("Company id", event.company_id.to_string())];
        rows.extend(what.details);
        rows.extend([
            ("Event id", event.id.to_string()),
            ("Endpoint", shown_url(&event.endpoint_url)),
            ("Result", outcome_line(event)),
            ("Attempts", event.attempts.to_string()),
            ("First attempt", time(event.first_attempt)),
            ("Last attempt", time(event.last_attempt)),
        ]);
        // Each value cut, so that no one row makes the email large; the
        // endpoint is whole (the schema keeps it to 2,048 characters).
        let rows: Vec<(&str, String)> = rows
            .into_iter()
            .map(|(label, value)| match label {
                "Endpoint" => (label, value),
                _ => (label, truncate_chars(&value, MAX_VALUE_CHARS)),
            })
            .collect();
        let title = if total == 1 {
            capitalise(&what.headline)
        } else {
            format!("{}. {}", i + 1, capitalise(&what.headline))
        };
        let _ = writeln!(text, "{title}");
        for (label, value) in &rows {
            let _ = writeln!(text, "  {:<15} {value}", format!("{label}:"));
        }
        let _ = writeln!(text);

        let _ = writeln!(
            html,
            "<h3>{}</h3>\n<table cellpadding=\"3\">",
            escape(&title)
        );
        for (label, value) in &rows {
            let _ = writeln!(
                html,
                "<tr><th align=\"left\">{}</th><td>{}</td></tr>",
                escape(label),
                escape(value)
            );
        }
        let _ = writeln!(html, "</table>");
    }
    if unlisted > 0 {
        let rest = the_rest(first.company_id, unlisted, digest.since);
        let _ = writeln!(text, "{}\n", wrap(&rest.said, 72));
        for command in &rest.commands {
            let _ = writeln!(text, "  {command}");
        }
        let _ = writeln!(text);
        let _ = writeln!(html, "<p>{}</p>", escape(&rest.said));
        for command in &rest.commands {
            let _ = writeln!(html, "<pre>{}</pre>", escape(command));
        }
    }
    let _ = writeln!(text, "{}", wrap(NEXT_STEPS, 72));
    let _ = writeln!(
        text,
        "\n-- \nSent by outboxd, at most once per endpoint per throttling window."
    );
    let _ = write!(
        html,
        "<p>{}</p>\n<p style=\"color: #666\">Sent by outboxd, at most once per endpoint per throttling window.</p>\n</body></html>\n",
        escape(NEXT_STEPS)
    );
    Rendered {
        subject,
        text,
        html,
    }
}

/// What a digest says of the events it does not list.
struct TheRest {
    said: String,
    commands: Vec<String>,
}

fn the_rest(company_id: i64, unlisted: i64, since: Option<SystemTime>) -> TheRest {
    let since = since
        .map(|t| format!(" --since {}", humantime::format_rfc3339_seconds(t)))
        .unwrap_or_default();
    let more = if unlisted == 1 {
        "1 more event".to_string()
    } else {
        format!("{unlisted} more events")
    };
    TheRest {
        said: format!(
            "{more} failed in the same window and {} not listed, to keep this email small. \
             The sales application shows each payment's message. Your outboxd operator can \
             list them (up to 10000 at a time), and retry them all at once once the cause is \
             fixed:",
            if unlisted == 1 { "is" } else { "are" }
        ),
        commands: vec![
            format!(
                "outboxd events list --company {company_id} --state failed{since} --limit 10000"
            ),
            format!("outboxd events retry --company {company_id} --state failed{since}"),
        ],
    }
}

/// An endpoint's circuit that opened or closed, as `outbox.emails.about`
/// recorded it then.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct CircuitNews {
    /// The endpoint URL at that moment (never credentials).
    pub url: String,
    /// RFC 3339 timestamps in UTC, to the second.
    pub opened_at: Option<String>,
    pub closed_at: Option<String>,
    /// When the next probe may go (open), as written.
    pub retry_at: Option<String>,
    pub last_error: Option<String>,
    /// Events waiting for the endpoint, counted up to 100,001.
    pub waiting: i64,
}

/// Is it opened (down) or closed (back)?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitEmail {
    Opened,
    Closed,
}

/// "12", or "over 100,000".
fn waiting_events(n: i64) -> String {
    match n {
        1 => "1 event".to_string(),
        n if n > 100_000 => "over 100,000 events".to_string(),
        n => format!("{n} events"),
    }
}

/// A time from the JSON snapshot ("2026-12-01T14:03:07Z") as the email
/// shows it: "2026-12-01 14:03:07 UTC".
fn snapshot_time(t: Option<&str>) -> String {
    match t {
        Some(t) if humantime::parse_rfc3339(t).is_ok() => {
            format!("{} UTC", t.replace('T', " ").trim_end_matches('Z'))
        }
        Some(t) => t.to_string(),
        None => "-".to_string(),
    }
}

/// What the endpoint-down email says of `[circuit]`: how often a probe
/// goes out at most, and when waiting events fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitLimits {
    pub max_cooldown: Duration,
    pub max_hold: Duration,
}

/// A duration as people say it: "10 minutes", "a day", "36 hours";
/// humantime's spelling for what is not a whole number of one unit.
fn in_words(d: Duration) -> String {
    let secs = d.as_secs();
    let unit = |n: u64, one: &str| {
        if n == 1 {
            format!("a{} {one}", if one == "hour" { "n" } else { "" })
        } else {
            format!("{n} {one}s")
        }
    };
    match secs {
        0 => humantime::format_duration(d).to_string(),
        s if d.subsec_nanos() == 0 && s % 86_400 == 0 => unit(s / 86_400, "day"),
        s if d.subsec_nanos() == 0 && s % 3_600 == 0 => unit(s / 3_600, "hour"),
        s if d.subsec_nanos() == 0 && s % 60 == 0 => unit(s / 60, "minute"),
        _ => humantime::format_duration(d).to_string(),
    }
}

/// The one email about an endpoint going down, or coming back; `limits`
/// are this instance's `[circuit]` settings, which the email states.
pub fn render_circuit(
    kind: CircuitEmail,
    company_id: i64,
    event_type: &str,
    news: &CircuitNews,
    limits: &CircuitLimits,
) -> Rendered {
    let name = webhook_name(event_type);
    let since = snapshot_time(news.opened_at.as_deref());
    let waiting = waiting_events(news.waiting);
    let (subject, lead, rows, next): (String, String, Vec<(&str, String)>, String) = match kind {
        CircuitEmail::Opened => (
            format!("{name} webhook: your endpoint is not reachable (company {company_id})"),
            format!(
                "outboxd cannot reach the {name} webhook endpoint of company {company_id}: \
                 its requests failed several times in a row, so deliveries to it are paused."
            ),
            vec![
                ("Endpoint", shown_url(&news.url)),
                ("Not reachable since", since),
                (
                    "Last error",
                    news.last_error.clone().unwrap_or_else(|| "-".to_string()),
                ),
                ("Waiting", waiting),
                ("Next try", snapshot_time(news.retry_at.as_deref())),
            ],
            format!(
                "What happens next: the waiting events are kept, not failed one by one, and no \
                 retries are used up while the endpoint is down. outboxd sends one of them now \
                 and then to see whether the endpoint is back, less and less often (at most \
                 {} apart); as soon as it answers, the waiting events are delivered and you get \
                 one more email. Events still waiting after {} fail and are reported. What to \
                 do: check that the endpoint is up and reachable from outboxd.",
                in_words(limits.max_cooldown),
                in_words(limits.max_hold)
            ),
        ),
        CircuitEmail::Closed => (
            format!("{name} webhook: deliveries resumed (company {company_id})"),
            format!(
                "The {name} webhook endpoint of company {company_id} answers again, and \
                 outboxd is delivering to it."
            ),
            vec![
                ("Endpoint", shown_url(&news.url)),
                ("Not reachable from", since),
                ("Answered again", snapshot_time(news.closed_at.as_deref())),
                ("Being delivered", waiting),
            ],
            "Nothing to do: the events that waited are delivered now, each with its usual \
             Idempotency-Key."
                .to_string(),
        ),
    };
    table_email(
        subject,
        &lead,
        &rows,
        &next,
        "Sent by outboxd, once when an endpoint goes down and once when it is back.",
    )
}

/// An endpoint that had signed its requests and has no active signing
/// secret, as `outbox.emails.about` recorded it then. Never a secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SigningNews {
    /// The endpoint URL at that moment (never credentials).
    pub url: String,
    /// Since when, RFC 3339 in UTC, to the second.
    pub since: Option<String>,
    /// "expired" (its last secret expired) or "removed" (none is left).
    pub why: Option<String>,
}

/// The one email about an endpoint whose requests are no longer signed.
pub fn render_signing_stopped(company_id: i64, event_type: &str, news: &SigningNews) -> Rendered {
    let name = webhook_name(event_type);
    let subject = format!("{name} webhook: requests are no longer signed (company {company_id})");
    let lead = format!(
        "The {name} webhook endpoint of company {company_id} signed its requests \
         (Standard Webhooks: webhook-signature), and it has no active signing secret any \
         more. outboxd keeps delivering to it, without a signature."
    );
    let what = match news.why.as_deref() {
        Some("expired") => "its last secret expired",
        Some("removed") => "its secrets were deleted",
        _ => "no secret is active",
    };
    let rows: Vec<(&str, String)> = vec![
        ("Endpoint", shown_url(&news.url)),
        ("Unsigned since", snapshot_time(news.since.as_deref())),
        ("Why", what.to_string()),
    ];
    let next = "What to do: if your receiver verifies signatures, it refuses these requests, \
                and you will be told of each event that fails; have your outboxd operator give \
                the endpoint a new secret (outboxd endpoint secret rotate) and install it in the \
                receiver, then have the failed events sent again. If signing was stopped on \
                purpose, nothing to do: the operator can clear the record of it (outboxd \
                endpoint secret clear)."
        .to_string();
    table_email(
        subject,
        &lead,
        &rows,
        &next,
        "Sent by outboxd, once when an endpoint stops signing its requests.",
    )
}

/// An email about an endpoint: a lead paragraph, a table of labelled
/// values, what happens next, and a footer saying when such an email is
/// sent; as plain text (wrapped at 72) and as HTML.
fn table_email(
    subject: String,
    lead: &str,
    rows: &[(&str, String)],
    next: &str,
    footer: &str,
) -> Rendered {
    let mut text = format!("{}\n\n", wrap(lead, 72));
    let mut html = format!(
        "<html><body style=\"font-family: sans-serif\">\n<p>{}</p>\n<table cellpadding=\"3\">\n",
        escape(lead)
    );
    for (label, value) in rows {
        let _ = writeln!(text, "  {:<20} {value}", format!("{label}:"));
        let _ = writeln!(
            html,
            "<tr><th align=\"left\">{}</th><td>{}</td></tr>",
            escape(label),
            escape(value)
        );
    }
    let _ = writeln!(text, "\n{}", wrap(next, 72));
    let _ = writeln!(text, "\n-- \n{footer}");
    let _ = write!(
        html,
        "</table>\n<p>{}</p>\n<p style=\"color: #666\">{}</p>\n</body></html>\n",
        escape(next),
        escape(footer)
    );
    Rendered {
        subject,
        text,
        html,
    }
}

/// Greedy word wrap for the plain-text part, which mail clients show as is.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line_len = 0;
    for word in text.split_whitespace() {
        if line_len > 0 && line_len + 1 + word.chars().count() > width {
            out.push('\n');
            line_len = 0;
        } else if line_len > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.chars().count();
    }
    out
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// HTML-escapes text for element content and attribute values. Five
/// replacements, written here rather than pulling in a crate for them.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The defaults of `[circuit]`.
    const LIMITS: CircuitLimits = CircuitLimits {
        max_cooldown: Duration::from_secs(600),
        max_hold: Duration::from_secs(86_400),
    };

    #[test]
    fn the_endpoint_down_email_states_this_instances_circuit_limits() {
        let news = CircuitNews {
            url: "https://erp.example.com/hook".into(),
            opened_at: None,
            closed_at: None,
            retry_at: None,
            last_error: None,
            waiting: 3,
        };
        let text = |limits: CircuitLimits| {
            let open = render_circuit(
                CircuitEmail::Opened,
                1,
                PAYMENT_CANCELLATION,
                &news,
                &limits,
            );
            open.text.split_whitespace().collect::<Vec<_>>().join(" ")
        };
        let s = Duration::from_secs;
        for (cooldown, hold, apart, after) in [
            (
                s(600),
                s(86_400),
                "at most 10 minutes apart",
                "after a day fail",
            ),
            (
                s(3_600),
                s(3 * 86_400),
                "at most an hour apart",
                "after 3 days fail",
            ),
            (
                s(90),
                s(36 * 3_600),
                "at most 1m 30s apart",
                "after 36 hours fail",
            ),
        ] {
            let got = text(CircuitLimits {
                max_cooldown: cooldown,
                max_hold: hold,
            });
            assert!(
                got.contains(apart) && got.contains(after),
                "{apart} / {after} in {got}"
            );
        }
    }

    #[test]
    fn circuit_emails_say_what_failed_since_when_how_many_wait_and_what_next() {
        let news = CircuitNews {
            url: "https://erp.example.com/hook".into(),
            opened_at: Some("2026-12-01T14:03:07Z".into()),
            closed_at: Some("2026-12-01T15:10:00Z".into()),
            retry_at: Some("2026-12-01T14:03:37Z".into()),
            last_error: Some("timed out after 10s".into()),
            waiting: 1234,
        };
        let open = render_circuit(
            CircuitEmail::Opened,
            6316,
            PAYMENT_CANCELLATION,
            &news,
            &LIMITS,
        );
        assert!(open.subject.contains("not reachable"), "{}", open.subject);
        assert!(open.subject.contains("6316"));
        for want in [
            "https://erp.example.com/hook",
            "2026-12-01 14:03:07 UTC",
            "timed out after 10s",
            "1234 events",
            "2026-12-01 14:03:37 UTC",
            "What happens next",
        ] {
            assert!(open.text.contains(want), "{want} in {}", open.text);
            assert!(open.html.contains(want), "{want} in {}", open.html);
        }
        let closed = render_circuit(
            CircuitEmail::Closed,
            6316,
            PAYMENT_CANCELLATION,
            &news,
            &LIMITS,
        );
        assert!(closed.subject.contains("resumed"), "{}", closed.subject);
        assert!(
            closed.text.contains("2026-12-01 15:10:00 UTC"),
            "{}",
            closed.text
        );
        assert!(closed.text.contains("1234 events"));
        assert_eq!(
            waiting_events(100_001),
            "over 100,000 events",
            "the count stops there"
        );
    }

    use super::*;
    use std::time::Duration;

    #[test]
    fn the_signing_email_says_which_endpoint_since_when_why_and_what_to_do() {
        let news = SigningNews {
            url: "https://erp.example.com/hook?token=abc".into(),
            since: Some("2026-12-01T14:03:07Z".into()),
            why: Some("expired".into()),
        };
        let r = render_signing_stopped(6316, PAYMENT_CANCELLATION, &news);
        assert_eq!(
            r.subject,
            "Payment Cancellation webhook: requests are no longer signed (company 6316)"
        );
        for part in [&r.text, &r.html] {
            // As read: the text part's line breaks are spaces.
            let part = &part.split_whitespace().collect::<Vec<_>>().join(" ");
            for want in [
                "https://erp.example.com/hook?token=***",
                "2026-12-01 14:03:07 UTC",
                "its last secret expired",
                "outboxd endpoint secret rotate",
                "without a signature",
            ] {
                assert!(part.contains(want), "{want:?} missing from:\n{part}");
            }
            assert!(!part.contains("abc"));
        }
        let next = r.text.split("What to do").nth(1).unwrap();
        assert!(next.lines().all(|l| l.chars().count() <= 72), "{next}");
    }

    fn failed(number: &str, message: Option<&str>, error: Option<&str>) -> FailedEvent {
        FailedEvent {
            id: uuid::Uuid::nil(),
            event_type: PAYMENT_CANCELLATION.into(),
            company_id: 6316,
            payload: format!(
                r#"{{"companyId": 6316, "paymentId": 222125, "paymentNumber": "{number}", "orderIds": "17899,17900"}}"#
            ),
            attempts: 3,
            response_message: message.map(str::to_string),
            last_error: error.map(str::to_string),
            endpoint_url: "https://erp.example.com/hooks/cancel".into(),
            first_attempt: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            last_attempt: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_600)),
        }
    }

    #[test]
    fn one_failure_names_the_payment_and_what_was_said() {
        let r = render(&[failed(
            "2271",
            Some("Payment 2271 is already settled"),
            Some("rejected by the external system (status 0)"),
        )]);
        assert_eq!(
            r.subject,
            "Payment Cancellation webhook failed: payment 2271 (company 6316)"
        );
        for part in [&r.text, &r.html] {
            for want in [
                "6316",
                "2271",
                "222125",
                "17899, 17900",
                "https://erp.example.com/hooks/cancel",
                "Payment 2271 is already settled",
                "2026-11-18T",
                "What to do next",
            ] {
                assert!(part.contains(want), "{want:?} missing from:\n{part}");
            }
        }
    }

    #[test]
    fn a_digest_lists_every_event() {
        let events: Vec<_> = (1..=50)
            .map(|i| failed(&format!("P-{i}"), None, Some("HTTP 503")))
            .collect();
        let r = render(&events);
        assert_eq!(
            r.subject,
            "Payment Cancellation webhook failed for 50 events (company 6316)"
        );
        for i in 1..=50 {
            assert!(r.text.contains(&format!("Payment P-{i}\n")), "P-{i}");
            assert!(r.html.contains(&format!("Payment P-{i}</h3>")), "P-{i}");
        }
    }

    #[test]
    fn a_long_digest_lists_the_first_events_and_says_how_many_more_and_how_to_see_them() {
        let listed: Vec<_> = (1..=DIGEST_LISTED)
            .map(|i| failed(&format!("P-{i}"), None, Some("HTTP 503")))
            .collect();
        let r = render_digest(&Digest {
            listed,
            total: 20_000,
            since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
        });
        assert_eq!(
            r.subject,
            "Payment Cancellation webhook failed for 20000 events (company 6316)"
        );
        for part in [&r.text, &r.html] {
            for want in [
                "for 20000 events; the first 50 are listed here",
                "19950 more events failed in the same window",
                "outboxd events list --company 6316 --state failed --since 2026-11-18T",
                "outboxd events retry --company 6316 --state failed --since 2026-11-18T",
                "Payment P-50",
            ] {
                assert!(part.contains(want), "{want:?} missing from:\n{part}");
            }
        }
    }

    #[test]
    fn no_value_makes_an_event_long() {
        let mut e = failed("1", Some(&"m".repeat(5_000)), Some("rejected"));
        e.payload = e
            .payload
            .replace("17899,17900", &vec!["17899"; 2_000].join(","));
        let r = render(&[e]);
        assert!(
            r.text.len() < 4 * MAX_VALUE_CHARS + 2_000,
            "{}",
            r.text.len()
        );
        assert!(r.text.contains(&format!("{}…", "m".repeat(100))));
    }

    #[test]
    fn plain_text_is_wrapped_at_72_columns() {
        let r = render(&[failed("1", None, Some("HTTP 503"))]);
        let next = r.text.split("What to do next").nth(1).unwrap();
        assert!(next.lines().all(|l| l.chars().count() <= 72), "{next}");
        assert_eq!(wrap("a bb ccc", 4), "a bb\nccc");
    }

    #[test]
    fn html_is_escaped() {
        let r = render(&[failed("<b>&", Some("<script>x</script>"), None)]);
        assert!(!r.html.contains("<script>"));
        assert!(r.html.contains("&lt;script&gt;"));
        assert!(r.html.contains("&lt;b&gt;&amp;"));
    }

    #[test]
    fn other_event_types_show_their_payload() {
        let mut e = failed("1", None, Some("HTTP 404"));
        e.event_type = "invoice.created".into();
        e.payload = r#"{"invoiceId": 7}"#.into();
        let r = render(&[e]);
        assert!(
            r.subject
                .starts_with("\"invoice.created\" webhook failed: event ")
        );
        assert!(r.text.contains(r#"{"invoiceId": 7}"#));
    }
}
