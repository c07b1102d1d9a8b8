//! A scripted webhook receiver for the integration tests: a real hyper 1.x
//! HTTP/1.1 server on 127.0.0.1 that records every request and answers each
//! one as the test's script says (JSON, raw bytes, never, or a huge body).
//!
//! Tests start one per test, point outboxd at `url(..)`, then look at what
//! arrived with `received()` / `wait_for(..)`. Dropping the `Receiver` stops
//! the server and closes every connection, including hanging ones.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query, as sent on the request line.
    pub path: String,
    /// Lowercase names. Ordered as hyper's `HeaderMap` yields them: by first
    /// appearance, with repeated names grouped together.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the request head arrived (before its body was read).
    pub at: Instant,
}

impl Received {
    /// The first value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON. Panics with the body text, so a failing test shows
    /// what outboxd actually sent.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// What to do with one request. The script is called with the request and
/// the 1-based count of requests seen so far for that Idempotency-Key (so
/// "500 then 200" is easy). Requests without the header share one count.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Status and JSON body, with `Content-Type: application/json`.
    Json(u16, serde_json::Value),
    /// Exactly these headers and body; hyper adds Content-Length and Date.
    Raw {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Read the request, never answer (until the receiver drops).
    Hang,
    /// A body of `bytes` bytes of JSON-looking garbage (an unterminated
    /// `{"status":"1","message":"xxx…`), streamed in 64 KiB chunks with an
    /// exact Content-Length, never held in memory whole.
    Huge { status: u16, bytes: usize },
    /// Wait this long after reading the request, then do the inner reply
    /// (a slow receiver, so deliveries are in flight when a test acts).
    Delayed(Duration, Box<Reply>),
}

type Script = dyn Fn(&Received, u32) -> Reply + Send + Sync;

/// A running receiver; it shuts down when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

/// State the connection tasks and the test's `Receiver` handle both reach.
struct Shared {
    script: Box<Script>,
    log: Mutex<Log>,
    /// How many requests are in the log. Waiters subscribe to this instead of
    /// polling the log, so `wait_for` wakes exactly when a request lands.
    arrived: watch::Sender<usize>,
}

#[derive(Default)]
struct Log {
    requests: Vec<Received>,
    per_key: HashMap<String, u32>,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Log> {
        // No code panics while holding this lock, but a poisoned log would
        // only hide the real failure behind a second one; keep going.
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs `request`, signals waiters, and returns its per-key count.
    fn record(&self, request: &Received) -> u32 {
        let key = request.header("idempotency-key").unwrap_or_default();
        let mut log = self.log();
        let count = log.per_key.entry(key.to_owned()).or_insert(0);
        *count += 1;
        let count = *count;
        log.requests.push(request.clone());
        // Sent under the log lock so concurrent recorders cannot publish
        // their counts out of order (a smaller count overwriting a larger).
        self.arrived.send_replace(log.requests.len());
        count
    }
}

impl Receiver {
    /// Starts on 127.0.0.1 with an OS-chosen port.
    pub async fn start(
        script: impl Fn(&Received, u32) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("cannot bind the test receiver on 127.0.0.1");
        let addr = listener.local_addr().expect("bound socket has an address");
        let shared = Arc::new(Shared {
            script: Box::new(script),
            log: Mutex::new(Log::default()),
            arrived: watch::Sender::new(0),
        });
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Receiver {
            addr,
            shared,
            server,
        }
    }

    /// Answers every request {"status":"1","message":"received"}.
    pub async fn ok() -> Receiver {
        Receiver::start(|_, _| {
            Reply::Json(
                200,
                serde_json::json!({"status": "1", "message": "received"}),
            )
        })
        .await
    }

    /// "http://127.0.0.1:PORT{path}"; `path` should start with '/'.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// All requests received so far, in arrival order (a copy of the log).
    pub fn received(&self) -> Vec<Received> {
        self.shared.log().requests.clone()
    }

    /// Waits until at least `n` requests have arrived and returns them all;
    /// panics after `timeout` saying how many came.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut arrived = self.shared.arrived.subscribe();
        // `wait_for` hands back a guard on the watch value; turn it into a
        // bool right away, since the server publishes counts while holding
        // the log lock that `received()` below takes.
        let reached = tokio::time::timeout(timeout, arrived.wait_for(|&count| count >= n))
            .await
            .map(|guard| guard.is_ok());
        let requests = self.received();
        match reached {
            Ok(true) => requests,
            // The sender lives in `shared`, which `self` keeps alive.
            Ok(false) => unreachable!("receiver state dropped while borrowed"),
            Err(_) => {
                let seen: Vec<String> = requests
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect();
                panic!(
                    "expected {n} request(s) at {} within {timeout:?}, got {}: {seen:?}",
                    self.addr,
                    requests.len()
                )
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Aborting the accept loop drops its listener and its JoinSet, and
        // dropping a JoinSet aborts every connection task in it: nothing is
        // left serving, not even a `Reply::Hang` parked forever.
        self.server.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Small requests and answers: do not let Nagle delay them
                    // (tests measure retry timing from `Received::at`).
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                Err(e) => {
                    // Typically out of file descriptors: a short pause keeps
                    // the loop from spinning until some are freed.
                    eprintln!("test receiver: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so the set stays small in long tests.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, shared: Arc<Shared>) {
    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
    // A connection error is the client's doing (reset, half-sent request,
    // timeout); the test that provoked it judges it from the client side.
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

type ReplyBody = BoxBody<Bytes, Infallible>;

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<ReplyBody>, hyper::Error> {
    // hyper calls the service once the head is parsed: this is "arrival".
    let at = Instant::now();
    let (head, body) = request.into_parts();
    // A body that fails half way is not a request outboxd made; the error
    // closes the connection and nothing is recorded.
    let body = body.collect().await?.to_bytes().to_vec();
    let received = Received {
        method: head.method.as_str().to_owned(),
        path: head
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        headers: head
            .headers
            .iter()
            .map(|(name, value)| {
                // `HeaderName`s are lowercase already.
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect(),
        body,
        at,
    };
    let count = shared.record(&received);
    let mut reply = (shared.script)(&received, count);
    while let Reply::Delayed(delay, then) = reply {
        tokio::time::sleep(delay).await;
        reply = *then;
    }
    Ok(match reply {
        Reply::Json(status, value) => {
            let body = serde_json::to_vec(&value).expect("a Value always serializes");
            response(status)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)).boxed())
        }
        Reply::Raw {
            status,
            headers,
            body,
        } => headers
            .iter()
            .fold(response(status), |builder, (name, value)| {
                builder.header(name.as_str(), value.as_str())
            })
            .body(Full::new(Bytes::from(body)).boxed()),
        Reply::Hang => std::future::pending().await,
        Reply::Huge { status, bytes } => response(status)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(HugeBody::new(bytes).boxed()),
        Reply::Delayed(..) => unreachable!("unwrapped above"),
    }
    .expect("the script's reply is not a valid HTTP response (bad header?)"))
}

fn response(status: u16) -> hyper::http::response::Builder {
    let status = StatusCode::from_u16(status)
        .unwrap_or_else(|_| panic!("script replied with invalid HTTP status {status}"));
    Response::builder().status(status)
}

const HUGE_CHUNK: usize = 64 * 1024;
const HUGE_PREFIX: &[u8] = br#"{"status":"1","message":""#;

/// The `Reply::Huge` body: one 64 KiB chunk starting with `HUGE_PREFIX`, then
/// the same all-'x' 64 KiB buffer again and again (`Bytes` clones share it),
/// so memory stays at two chunks whatever the size.
struct HugeBody {
    left: usize,
    first: Option<Bytes>,
    rest: Bytes,
}

impl HugeBody {
    fn new(bytes: usize) -> HugeBody {
        let mut first = vec![b'x'; HUGE_CHUNK];
        first[..HUGE_PREFIX.len()].copy_from_slice(HUGE_PREFIX);
        HugeBody {
            left: bytes,
            first: Some(Bytes::from(first)),
            rest: Bytes::from(vec![b'x'; HUGE_CHUNK]),
        }
    }
}

impl Body for HugeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let chunk = self.first.take().unwrap_or_else(|| self.rest.clone());
        let n = self.left.min(chunk.len());
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        // Exact, so hyper sends Content-Length rather than chunked encoding.
        SizeHint::with_exact(self.left as u64)
    }
}

// Self-tests: they run with the rest of the suite and keep every part of the
// API above in use (this module is only ever compiled into the test crate).

fn test_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn webhook(url: &str, key: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("Content-Type", "application/json")
        .header("Authorization", "Bearer test-token")
        .header("Idempotency-Key", key)
        .header("webhook-id", key)
        .header("User-Agent", "outboxd/test")
        .body(Full::new(Bytes::from_static(
            br#"{"companyId": 6316, "paymentId": 222125, "paymentNumber": "2271", "orderIds": "17899,17900"}"#,
        )))
        .expect("valid test request")
}

async fn body_json(response: Response<Incoming>) -> serde_json::Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn receiver_ok_answers_and_records_requests() {
    let receiver = Receiver::ok().await;
    assert_eq!(
        receiver.url("/hooks"),
        format!("http://127.0.0.1:{}/hooks", receiver.addr().port())
    );
    let key = "0b6e7a52-44d5-4c1b-9d0e-2f7f6d3c9a10";
    let response = test_client()
        .request(webhook(&receiver.url("/hooks?x=1"), key))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        body_json(response).await,
        serde_json::json!({"status": "1", "message": "received"})
    );

    let got = receiver.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    let request = &got[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/hooks?x=1");
    assert_eq!(request.header("IDEMPOTENCY-KEY"), Some(key));
    assert_eq!(request.header("Webhook-Id"), Some(key));
    assert_eq!(request.header("authorization"), Some("Bearer test-token"));
    assert_eq!(request.header("x-missing"), None);
    assert!(
        request
            .headers
            .iter()
            .all(|(name, _)| *name == name.to_ascii_lowercase())
    );
    // Order of first appearance is kept.
    let names: Vec<&str> = request.headers.iter().map(|(n, _)| n.as_str()).collect();
    let position = |name: &str| names.iter().position(|n| *n == name).unwrap();
    assert!(position("content-type") < position("idempotency-key"));
    assert!(position("idempotency-key") < position("user-agent"));
    assert_eq!(request.json()["paymentNumber"], "2271");
    assert_eq!(request.json()["companyId"], 6316);
    assert!(request.at <= Instant::now());
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn receiver_counts_per_idempotency_key() {
    let receiver = Receiver::start(|_, count| {
        if count == 1 {
            Reply::Raw {
                status: 500,
                headers: vec![("content-type".into(), "text/plain".into())],
                body: b"try again".to_vec(),
            }
        } else if count == 2 {
            Reply::Delayed(
                Duration::from_millis(200),
                Box::new(Reply::Json(
                    200,
                    serde_json::json!({"status": "1", "message": "late"}),
                )),
            )
        } else {
            Reply::Json(
                200,
                serde_json::json!({"status": "1", "message": format!("attempt {count}")}),
            )
        }
    })
    .await;
    let client = test_client();
    let url = receiver.url("/");
    let mut answers = Vec::new();
    for key in ["a", "a", "b", "a"] {
        let sent = Instant::now();
        let response = client.request(webhook(&url, key)).await.unwrap();
        let waited = sent.elapsed();
        let status = response.status().as_u16();
        let content_type = response.headers()["content-type"].clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        answers.push((status, content_type, body, waited));
    }
    assert_eq!(answers[0].0, 500);
    assert_eq!(answers[0].1, "text/plain");
    assert_eq!(answers[0].2, "try again");
    assert_eq!(answers[1].0, 200);
    assert!(
        answers[1].3 >= Duration::from_millis(200),
        "Delayed answered early"
    );
    let late: serde_json::Value = serde_json::from_slice(&answers[1].2).unwrap();
    assert_eq!(late["message"], "late");
    assert_eq!(answers[2].0, 500, "a new key starts its own count");
    assert_eq!(answers[3].0, 200);
    let last: serde_json::Value = serde_json::from_slice(&answers[3].2).unwrap();
    assert_eq!(last["message"], "attempt 3");
    assert_eq!(receiver.received().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn receiver_hang_is_recorded_and_released_on_drop() {
    let receiver = Receiver::start(|_, _| Reply::Hang).await;
    let client = test_client();
    let outcome = tokio::time::timeout(
        Duration::from_millis(300),
        client.request(webhook(&receiver.url("/slow"), "k1")),
    )
    .await;
    assert!(outcome.is_err(), "a hanging receiver must not answer");
    // Recorded although never answered.
    let got = receiver.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].path, "/slow");

    // A request still waiting when the receiver drops sees its connection
    // closed instead of waiting forever.
    let pending = tokio::spawn(client.request(webhook(&receiver.url("/slow"), "k2")));
    receiver.wait_for(2, Duration::from_secs(5)).await;
    drop(receiver);
    let outcome = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("dropping the receiver must close hanging connections")
        .unwrap();
    assert!(outcome.is_err(), "got an answer from a hanging receiver");
}

#[tokio::test(flavor = "multi_thread")]
async fn receiver_streams_huge_bodies() {
    const SIZE: usize = 10 * 1024 * 1024;
    let receiver = Receiver::start(|_, _| Reply::Huge {
        status: 200,
        bytes: SIZE,
    })
    .await;
    let response = test_client()
        .request(webhook(&receiver.url("/"), "big"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], SIZE.to_string());
    let mut body = response.into_body();
    // Read frame by frame, as a capped client would, checking every byte:
    // the prefix, then nothing but 'x'.
    let mut total = 0;
    let mut wrong = 0;
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().expect("only data frames");
        wrong += data
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b != HUGE_PREFIX.get(total + i).copied().unwrap_or(b'x'))
            .count();
        total += data.len();
    }
    assert_eq!(total, SIZE);
    assert_eq!(wrong, 0);
}
