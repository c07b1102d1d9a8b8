//! A claimed event and the endpoint it goes to, as the claim returns them.

use std::fmt;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

/// An event leased to this instance, ready to deliver.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    pub id: Uuid,
    pub event_type: String,
    pub company_id: i64,
    /// The stored payload as JSON text.
    pub payload: String,
    /// This delivery's attempt number (1 for the first). Fences the record.
    pub attempt: i32,
    /// Attempts counted against the retry budget: since the last replay.
    pub budget_attempt: i32,
    /// Time since the event was enqueued (or last replayed), by the
    /// database's clock.
    pub age: Duration,
    /// The event was leased before and its lease ran out: a daemon died or
    /// stalled while delivering it, so the receiver may have it already.
    pub lease_expired: bool,
    /// Sent to learn whether an endpoint whose circuit is open is back.
    pub probe: bool,
    /// When it was due before this claim (the fair claim says; None from
    /// the plain one, which takes no probe): a probe that fails is put
    /// back due then, so its hold counts from then.
    pub due_at: Option<SystemTime>,
    /// Its endpoint's circuit was not closed and clean at the claim.
    pub circuit_dirty: bool,
    /// Where its request goes: the endpoint's host and port
    /// (`outbox.endpoints.destination`); None without an endpoint.
    pub destination: Option<String>,
    /// The company's endpoint for this event type, if one is configured.
    pub endpoint: Option<Endpoint>,
}

/// Where and how to deliver, from `outbox.endpoints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub auth: Auth,
    pub enabled: bool,
    /// Its active signing secrets (`whsec_…`), newest first; empty: its
    /// requests are not signed.
    pub signing_secrets: Vec<Secret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic { username: String, password: Secret },
    Bearer { token: Secret },
}

/// An endpoint: company and event type.
pub type EndpointKey = (i64, String);

/// A password or token. Its `Debug` prints a placeholder and it has no
/// `Display`, so it cannot end up in a log line or an error by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// An endpoint URL as outboxd shows it (emails, logs, `status`, the
/// endpoint commands): every query value and the fragment replaced by
/// `***`. The schema refuses credentials before the host (`user:pass@`),
/// but a receiver may take its token in the query (`?token=…`), and outboxd
/// cannot tell such a value from a harmless one. Scheme, host, port and path
/// are kept: they say where the requests go.
pub fn shown_url(url: &str) -> String {
    let (rest, fragment) = match url.split_once('#') {
        Some((rest, _)) => (rest, "#***"),
        None => (url, ""),
    };
    let Some((base, query)) = rest.split_once('?') else {
        return format!("{rest}{fragment}");
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if !key.is_empty() => format!("{key}=***"),
            _ if pair.is_empty() => String::new(),
            _ => "***".to_string(),
        })
        .collect();
    format!("{base}?{}{fragment}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_keep_where_requests_go_and_hide_every_query_value() {
        let table = [
            (
                "https://erp.example.com/hooks",
                "https://erp.example.com/hooks",
            ),
            (
                "https://erp.example.com:8443/hooks/cancel?token=abc123",
                "https://erp.example.com:8443/hooks/cancel?token=***",
            ),
            (
                "https://erp.example.com/h?api_key=K&company=6316",
                "https://erp.example.com/h?api_key=***&company=***",
            ),
            (
                "https://erp.example.com/h?s3cr3t",
                "https://erp.example.com/h?***",
            ),
            (
                "https://erp.example.com/h?=v&&k=",
                "https://erp.example.com/h?***&&k=***",
            ),
            ("https://erp.example.com/h?", "https://erp.example.com/h?"),
            (
                "https://erp.example.com/h#sig=x",
                "https://erp.example.com/h#***",
            ),
            (
                "https://erp.example.com/h?t=a#b?c=d",
                "https://erp.example.com/h?t=***#***",
            ),
        ];
        for (url, shown) in table {
            assert_eq!(shown_url(url), shown, "{url}");
        }
    }
}
