//! Building the webhook request for a claimed event: the exact body of the
//! integrators' documentation and the headers that go with it.
//!
//! Everything here is pure. [`prepare`] is the one place that decides,
//! before anything is sent, that an event cannot be sent at all (a
//! [`Refusal`]: its retries spent through expired leases, no endpoint, a
//! disabled one, or a payload that cannot be turned into a valid webhook,
//! such as a row written around the enqueue functions); [`crate::policy::refused`]
//! then marks it failed with the reason instead of sending something the
//! receiver would misread.

use base64::Engine as _;
use bytes::Bytes;
use hyper::Uri;
use hyper::header::HeaderValue;
use uuid::Uuid;

use crate::http::sign::{SecretError, SigningKey};
use crate::model::{
    Auth, ClaimedEvent, Endpoint, PAYMENT_CANCELLATION, PaymentCancellation, Refusal,
};

/// `User-Agent` of every request.
pub const USER_AGENT: &str = concat!("outboxd/", env!("CARGO_PKG_VERSION"));

/// The header that marks a test request (`outboxd endpoint test`), with the
/// value `1`. Documented for receivers, so they can answer it without acting
/// on the sample body. Real events never carry it.
pub const TEST_HEADER: &str = "outboxd-test";

/// The payment number of the sample body in a test request.
pub const TEST_PAYMENT_NUMBER: &str = "OUTBOXD-TEST";

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub uri: Uri,
    pub body: Bytes,
    /// Marked sensitive, so hyper and `Debug` keep it out of logs.
    pub authorization: Option<HeaderValue>,
    /// The stable event id: `Idempotency-Key` and `webhook-id`.
    pub event_id: Uuid,
    /// A test request, not an event: sent with [`TEST_HEADER`].
    pub test: bool,
    /// Keys to sign with ([`crate::http::sign`]), newest first; empty: unsigned.
    /// The signature is made when the request is sent, with that moment as
    /// `webhook-timestamp`.
    pub signing_keys: Vec<SigningKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("invalid payload: {0}")]
    Payload(String),
    #[error("invalid endpoint url: {0}")]
    Url(String),
    #[error("invalid endpoint credentials: {0}")]
    Credentials(&'static str),
    #[error("invalid signing secret: {0}")]
    SigningSecret(SecretError),
}

/// Everything decided before a request goes out: whether `event` may be
/// sent at all (its attempts since the last replay within `max_attempts`,
/// an enabled endpoint, a valid payload), and if so the request.
pub fn prepare(event: &ClaimedEvent, max_attempts: u32) -> Result<Webhook, Refusal> {
    if event.budget_attempt.max(0) as u32 > max_attempts {
        return Err(Refusal::BudgetSpent {
            attempts: event.budget_attempt - 1,
        });
    }
    let Some(endpoint) = &event.endpoint else {
        return Err(Refusal::NoEndpoint {
            company_id: event.company_id,
            event_type: event.event_type.clone(),
        });
    };
    if !endpoint.enabled {
        return Err(Refusal::Disabled {
            company_id: event.company_id,
            event_type: event.event_type.clone(),
        });
    }
    build(event, endpoint).map_err(|e| Refusal::Invalid(e.to_string()))
}

/// Builds the request for `event` to `endpoint`.
pub fn build(event: &ClaimedEvent, endpoint: &Endpoint) -> Result<Webhook, BuildError> {
    let body = body(event)?;
    let uri = parse_url(&endpoint.url)?;
    let authorization = authorization(&endpoint.auth)?;
    Ok(Webhook {
        uri,
        body,
        authorization,
        event_id: event.id,
        test: false,
        signing_keys: signing_keys(endpoint)?,
    })
}

/// The endpoint's secrets as keys. The schema checks their form, so a bad
/// one is a row written around it: the event is refused rather than sent
/// unsigned to a receiver that expects signatures.
fn signing_keys(endpoint: &Endpoint) -> Result<Vec<SigningKey>, BuildError> {
    endpoint
        .signing_secrets
        .iter()
        .map(|s| SigningKey::parse(s.expose()).map_err(BuildError::SigningSecret))
        .collect()
}

/// A test request to `endpoint`, as `outboxd endpoint test` sends it: a
/// sample body (for payment.cancellation the payment `OUTBOXD-TEST` with id
/// 1, for other event types `{"test": true}`), the endpoint's auth, a fresh
/// random event id that no event has, and [`TEST_HEADER`].
pub fn build_test(
    event_type: &str,
    company_id: i64,
    endpoint: &Endpoint,
) -> Result<Webhook, BuildError> {
    let body = if event_type == PAYMENT_CANCELLATION {
        PaymentCancellation {
            company_id,
            payment_id: 1,
            payment_number: TEST_PAYMENT_NUMBER.into(),
            order_ids: None,
        }
        .render()
    } else {
        r#"{"test": true}"#.to_string()
    };
    Ok(Webhook {
        uri: parse_url(&endpoint.url)?,
        body: Bytes::from(body),
        authorization: authorization(&endpoint.auth)?,
        event_id: uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid(),
        test: true,
        signing_keys: signing_keys(endpoint)?,
    })
}

/// The request body. Payment cancellations are re-rendered field by field in
/// the documented order and spacing (`{"companyId": 6316, "paymentId": …}`),
/// since jsonb stores keys in its own order; other event types are sent as
/// stored.
pub fn body(event: &ClaimedEvent) -> Result<Bytes, BuildError> {
    if event.event_type == PAYMENT_CANCELLATION {
        let payload = PaymentCancellation::parse(&event.payload, event.company_id)
            .map_err(BuildError::Payload)?;
        Ok(Bytes::from(payload.render()))
    } else if event.payload.trim_start().starts_with('{') {
        Ok(Bytes::from(event.payload.clone()))
    } else {
        Err(BuildError::Payload(
            "the payload is not a JSON object".into(),
        ))
    }
}

fn parse_url(url: &str) -> Result<Uri, BuildError> {
    let uri: Uri = url.parse().map_err(|e| BuildError::Url(format!("{e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(BuildError::Url("the scheme must be http or https".into())),
    }
    if uri.authority().is_none() {
        return Err(BuildError::Url("no host".into()));
    }
    Ok(uri)
}

fn authorization(auth: &Auth) -> Result<Option<HeaderValue>, BuildError> {
    let value = match auth {
        Auth::None => return Ok(None),
        Auth::Basic { username, password } => {
            let pair = format!("{username}:{}", password.expose());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        }
        Auth::Bearer { token } => format!("Bearer {}", token.expose()),
    };
    let mut header = HeaderValue::from_str(&value).map_err(|_| {
        // Never say what the bad value was: it is a secret.
        BuildError::Credentials("they contain characters not allowed in an HTTP header")
    })?;
    header.set_sensitive(true);
    Ok(Some(header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use std::time::Duration;

    fn event(event_type: &str, company_id: i64, payload: &str) -> ClaimedEvent {
        ClaimedEvent {
            id: Uuid::nil(),
            event_type: event_type.into(),
            company_id,
            payload: payload.into(),
            attempt: 1,
            budget_attempt: 1,
            age: Duration::ZERO,
            lease_expired: false,
            probe: false,
            due_at: None,
            circuit_dirty: false,
            destination: None,
            endpoint: None,
        }
    }

    #[test]
    fn payment_cancellation_bodies_are_rendered_as_documented() {
        // jsonb's text form puts orderIds first; the body must not.
        let cases = [
            (
                r#"{"orderIds": "17899,17900", "companyId": 6316, "paymentId": 222125, "paymentNumber": "2271"}"#,
                Ok(
                    r#"{"companyId": 6316, "paymentId": 222125, "paymentNumber": "2271", "orderIds": "17899,17900"}"#,
                ),
            ),
            (
                r#"{"companyId": 6316, "paymentId": 222125, "paymentNumber": "2271"}"#,
                Ok(r#"{"companyId": 6316, "paymentId": 222125, "paymentNumber": "2271"}"#),
            ),
            (
                r#"{"companyId": 6316, "paymentId": 1, "paymentNumber": "A \"quoted\" \\ no"}"#,
                Ok(r#"{"companyId": 6316, "paymentId": 1, "paymentNumber": "A \"quoted\" \\ no"}"#),
            ),
            (r#"[1, 2]"#, Err("not a JSON object")),
            (r#"[6316, 1, "1"]"#, Err("not a JSON object")),
            (r#"[6316, 1, "1", "2,3"]"#, Err("not a JSON object")),
            ("null", Err("not a JSON object")),
            (r#"{"companyId": 6316}"#, Err("missing field `paymentId`")),
            (
                r#"{"companyId": 6316, "paymentId": 1, "paymentNumber": "1", "extra": 1}"#,
                Err("unknown field `extra`"),
            ),
            (
                r#"{"companyId": 7, "paymentId": 1, "paymentNumber": "1"}"#,
                Err("companyId 7 does not match the event's company_id 6316"),
            ),
            (
                r#"{"companyId": 6316, "paymentId": -1, "paymentNumber": "1"}"#,
                Err("paymentId must be positive"),
            ),
            (
                r#"{"companyId": 6316, "paymentId": 1, "paymentNumber": " "}"#,
                Err("paymentNumber is blank"),
            ),
            (
                r#"{"companyId": 6316, "paymentId": 1, "paymentNumber": 5}"#,
                Err("not a payment cancellation"),
            ),
            (
                r#"{"companyId": 6316, "paymentId": 1, "paymentNumber": "1", "orderIds": "1,,2"}"#,
                Err("orderIds must be"),
            ),
            (
                r#"{"companyId": 6316, "paymentId": 1, "paymentNumber": "1", "orderIds": "1\",\"x"}"#,
                Err("orderIds must be"),
            ),
        ];
        for (payload, want) in cases {
            let got = body(&event(PAYMENT_CANCELLATION, 6316, payload));
            match (got, want) {
                (Ok(body), Ok(want)) => assert_eq!(body, want.as_bytes(), "{payload}"),
                (Err(e), Err(want)) => {
                    assert!(e.to_string().contains(want), "{payload}: {e}")
                }
                (got, want) => panic!("{payload}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn other_event_types_are_sent_as_stored_if_they_are_objects() {
        let e = event("invoice.created", 1, r#"{"b": 1, "a": [2]}"#);
        assert_eq!(body(&e).unwrap(), r#"{"b": 1, "a": [2]}"#.as_bytes());
        let e = event("invoice.created", 1, "[1]");
        assert!(body(&e).is_err());
        let e = event("invoice.created", 1, "\"text\"");
        assert!(body(&e).is_err());
    }

    #[test]
    fn authorization_headers_per_auth_type() {
        let cases = [
            (Auth::None, None),
            (
                Auth::Basic {
                    username: "sales".into(),
                    password: Secret::new("s3cret"),
                },
                // base64("sales:s3cret")
                Some("Basic c2FsZXM6czNjcmV0"),
            ),
            (
                Auth::Bearer {
                    token: Secret::new("tok-123"),
                },
                Some("Bearer tok-123"),
            ),
        ];
        for (auth, want) in cases {
            let got = authorization(&auth).unwrap();
            assert_eq!(got.as_ref().map(|h| h.to_str().unwrap()), want);
            if let Some(h) = got {
                assert!(h.is_sensitive());
            }
        }
        let err = authorization(&Auth::Bearer {
            token: Secret::new("line\nbreak-SECRET"),
        })
        .unwrap_err();
        assert!(!err.to_string().contains("SECRET"));
    }

    #[test]
    fn urls_must_be_http_or_https_with_a_host() {
        assert!(parse_url("https://erp.example.com/hook?x=1").is_ok());
        assert!(parse_url("http://127.0.0.1:8808/").is_ok());
        for bad in ["ftp://x/", "/relative", "https://", "not a url"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_requests_carry_a_sample_body_a_fresh_id_and_the_mark() {
        let endpoint = Endpoint {
            url: "http://127.0.0.1:8808/hook".into(),
            auth: Auth::Bearer {
                token: Secret::new("tok-123"),
            },
            enabled: true,
            signing_secrets: Vec::new(),
        };
        let first = build_test(PAYMENT_CANCELLATION, 6316, &endpoint).unwrap();
        assert!(first.test);
        assert_eq!(
            first.body,
            r#"{"companyId": 6316, "paymentId": 1, "paymentNumber": "OUTBOXD-TEST"}"#.as_bytes()
        );
        assert_eq!(
            first.authorization.as_ref().unwrap().to_str().unwrap(),
            "Bearer tok-123"
        );
        let second = build_test("invoice.created", 6316, &endpoint).unwrap();
        assert_eq!(second.body, r#"{"test": true}"#.as_bytes());
        assert_ne!(first.event_id, second.event_id);
        assert_eq!(first.event_id.get_version_num(), 4);
    }
}
