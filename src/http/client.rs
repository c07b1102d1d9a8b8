//! Sending one webhook over HTTP(S) and reading the answer, within bounds:
//! one deadline for the whole attempt, a cap on the response body, no
//! redirects followed.
//!
//! The client is hyper-util's pooled client, so consecutive deliveries to the
//! same receiver reuse kept-alive connections instead of paying a TCP (and
//! TLS) handshake each.

use std::error::Error as StdError;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::DeliveryConfig;
use crate::http::classify::{self, Answer, Verdict};
use crate::http::guard::{self, GuardedConnector, Policy};
use crate::http::request::{self as webhook, Webhook};

/// Idle keep-alive connections are closed after this long. Receivers behind
/// load balancers commonly drop idle connections after 60 s or more; closing
/// ours first avoids sending into a connection the other side is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// What one attempt produced.
#[derive(Debug, Clone)]
pub struct Sent {
    pub started_at: SystemTime,
    pub duration: Duration,
    pub result: Result<HttpAnswer, TransportError>,
}

impl Sent {
    /// The judgement on this attempt: the answer as [`classify::classify`]
    /// sees it (`now`: when it arrived), or, when no answer came at all, a
    /// retryable failure with the transport's reason.
    pub fn verdict(&self, now: SystemTime) -> Verdict {
        match &self.result {
            Ok(answer) => classify::classify(
                &Answer {
                    status: answer.status,
                    retry_after: answer.retry_after.as_deref(),
                    body: &answer.body,
                    body_truncated: answer.truncated,
                },
                now,
            ),
            // The destination guard's refusal: no retry can change it.
            Err(e) if e.permanent => Verdict::Permanent {
                reason: e.reason.clone(),
                message: None,
            },
            Err(e) => Verdict::Retry {
                reason: e.reason.clone(),
                message: None,
                retry_after: None,
            },
        }
    }

    /// The HTTP status, if an answer came.
    pub fn http_status(&self) -> Option<u16> {
        self.result.as_ref().ok().map(|answer| answer.status)
    }
}

/// An HTTP response, its body read up to the cap.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Bytes,
    pub truncated: bool,
}

/// No (complete) HTTP response: refused, reset, timed out, TLS failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    pub reason: String,
    /// Retrying cannot help: the destination is not allowed.
    pub permanent: bool,
}

impl TransportError {
    fn retryable(reason: String) -> TransportError {
        TransportError {
            reason,
            permanent: false,
        }
    }
}

/// The shared HTTP client.
#[derive(Clone)]
pub struct Deliverer {
    client: Client<HttpsConnector<GuardedConnector>, Full<Bytes>>,
    request_timeout: Duration,
    max_response_bytes: usize,
    require_https: bool,
}

impl Deliverer {
    /// Fails only on a CA file that is not usable certificates.
    pub fn new(config: &DeliveryConfig) -> Result<Deliverer, String> {
        let policy = Policy::new(config.allowed_networks.clone());
        let http = GuardedConnector::new(policy, |http| {
            http.set_connect_timeout(Some(config.connect_timeout));
            http.set_nodelay(true);
            // Let the TLS layer see https:// URIs (the plain connector
            // refuses them otherwise).
            http.enforce_http(false);
        });
        let https = HttpsConnector::from((http, tls_connector(config)?.into()));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(config.concurrency)
            .build(https);
        Ok(Deliverer {
            client,
            request_timeout: config.request_timeout,
            max_response_bytes: config.max_response_bytes,
            require_https: config.require_https,
        })
    }

    /// Sends `webhook` once. Never fails: every problem is in the result.
    pub async fn send(&self, webhook: &Webhook) -> Sent {
        let started_at = SystemTime::now();
        let clock = Instant::now();
        // One deadline around everything: the connector's timeout covers the
        // TCP connect only, not TLS, the response head or a dripping body.
        let result = if self.require_https && webhook.uri.scheme_str() == Some("http") {
            Err(TransportError {
                reason: "plain http:// is not allowed (delivery.require_https); use https://"
                    .to_string(),
                permanent: true,
            })
        } else {
            match tokio::time::timeout(self.request_timeout, self.exchange(webhook)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::retryable(format!(
                    "timed out after {}",
                    humantime::format_duration(self.request_timeout)
                ))),
            }
        };
        Sent {
            started_at,
            duration: clock.elapsed(),
            result,
        }
    }

    async fn exchange(&self, webhook: &Webhook) -> Result<HttpAnswer, TransportError> {
        let mut request = Request::post(webhook.uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static(webhook::USER_AGENT));
        let event_id = webhook.event_id.to_string();
        let id = HeaderValue::from_str(&event_id).expect("a UUID is a valid header value");
        request = request
            .header("idempotency-key", id.clone())
            .header("webhook-id", id);
        // Signed now, over the exact bytes sent, with this attempt's time.
        if !webhook.signing_keys.is_empty() {
            let timestamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            if let Some(signature) = crate::http::sign::signature_header(
                &webhook.signing_keys,
                &event_id,
                timestamp,
                &webhook.body,
            ) {
                let mut signature =
                    HeaderValue::from_str(&signature).expect("base64 is a valid header value");
                signature.set_sensitive(true);
                request = request
                    .header("webhook-timestamp", HeaderValue::from(timestamp))
                    .header("webhook-signature", signature);
            }
        }
        if let Some(auth) = &webhook.authorization {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if webhook.test {
            request = request.header(webhook::TEST_HEADER, HeaderValue::from_static("1"));
        }
        let request =
            request
                .body(Full::new(webhook.body.clone()))
                .map_err(|e| TransportError {
                    reason: format!("building the request: {e}"),
                    permanent: true,
                })?;

        let response =
            self.client
                .request(request)
                .await
                .map_err(|e| match guard::refusal_in(&e) {
                    Some(refused) => {
                        // The reason is stored and emailed, so it names no
                        // address; the operator gets the address here. The
                        // host, not the URL: a URL may carry a token.
                        tracing::warn!(
                            event_id = %webhook.event_id,
                            test = webhook.test,
                            host = webhook.uri.host().unwrap_or(""),
                            port = webhook.uri.port_u16(),
                            address = %refused.addr,
                            range = %refused.range,
                            network = refused.what,
                            "destination refused: the address is in a blocked range that delivery.allowed_networks does not open"
                        );
                        TransportError {
                            reason: refused.to_string(),
                            permanent: true,
                        }
                    }
                    None => TransportError::retryable(chain(&e)),
                })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (body, truncated) = read_capped(response.into_body(), self.max_response_bytes)
            .await
            .map_err(|e| {
                TransportError::retryable(format!("reading the response body: {}", chain(&e)))
            })?;
        Ok(HttpAnswer {
            status,
            retry_after,
            body,
            truncated,
        })
    }
}

/// The system's trusted roots, plus `delivery.tls_ca_file`'s certificates.
/// Certificates are always verified, hostname and expiry included: a
/// receiver with a self-signed certificate is trusted by adding it here,
/// never by turning verification off.
fn tls_connector(config: &DeliveryConfig) -> Result<native_tls::TlsConnector, String> {
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(pem) = &config.tls_ca_pem {
        let text = String::from_utf8_lossy(pem);
        const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
        for block in text.split(BEGIN).skip(1) {
            let cert = native_tls::Certificate::from_pem(format!("{BEGIN}{block}").as_bytes())
                .map_err(|e| format!("delivery.tls_ca_file: not a usable certificate: {e}"))?;
            builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| format!("setting up TLS for deliveries: {e}"))
}

/// Reads at most `cap` bytes of a body. When more comes, stops reading and
/// drops the rest (the connection is then not reused): a receiver cannot make
/// the daemon buffer an unbounded answer.
async fn read_capped<B>(mut body: B, cap: usize) -> Result<(Bytes, bool), B::Error>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        let room = cap - buf.len();
        if data.len() > room {
            buf.extend_from_slice(&data[..room]);
            return Ok((buf.freeze(), true));
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf.freeze(), false))
}

/// An error and its causes as one line ("client error (Connect): tcp
/// connect error: Connection refused (os error 111)").
fn chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A body of `frames` chunks of 64 KiB that counts how many were pulled.
    fn counted_body(
        frames: usize,
        pulled: Arc<AtomicUsize>,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin>
    {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        StreamBody::new(futures_util::stream::iter((0..frames).map(move |_| {
            pulled.fetch_add(1, Ordering::SeqCst);
            Ok(Frame::data(chunk.clone()))
        })))
    }

    #[tokio::test]
    async fn a_body_is_read_only_up_to_the_cap() {
        // 160 frames = 10 MiB offered; a 64 KiB cap must stop after the
        // frame that crosses it, not drain the rest.
        let pulled = Arc::new(AtomicUsize::new(0));
        let (body, truncated) = read_capped(counted_body(160, pulled.clone()), 64 * 1024 + 10)
            .await
            .unwrap();
        assert!(truncated);
        assert_eq!(body.len(), 64 * 1024 + 10);
        assert_eq!(pulled.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_under_the_cap_is_read_whole() {
        let pulled = Arc::new(AtomicUsize::new(0));
        let (body, truncated) = read_capped(counted_body(3, pulled.clone()), 1024 * 1024)
            .await
            .unwrap();
        assert!(!truncated);
        assert_eq!(body.len(), 3 * 64 * 1024);
        assert_eq!(pulled.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn error_chains_read_as_one_line_without_repeats() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = std::io::Error::other(inner);
        assert_eq!(chain(&outer), "refused");
    }
}
