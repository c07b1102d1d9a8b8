//! `outboxd-receiver`: a reference webhook receiver, the integrator's side of
//! outboxd. It accepts Payment Cancellation webhooks (`POST`, JSON body),
//! checks the `Authorization` header, validates the payload and answers in
//! the product's format: `{"status":"1","message":…}` on success,
//! `{"status":"0","error":…}` on rejection.
//!
//! Used by the README quick start and the benchmarks, and meant to be read
//! as an example: everything a receiver needs is in this one file, built on
//! hyper 1.x alone (no web framework), and fast enough for 10k+ req/s. It
//! stays one file past the usual ~500 lines on purpose: it is one role (a
//! receiver), and an integrator reads or copies it whole.
//!
//! ```text
//! outboxd-receiver --listen 127.0.0.1:8808 --auth bearer --token s3cret
//! ```

use std::convert::Infallible;
use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use clap::error::ErrorKind;
use clap::{CommandFactory as _, Parser, ValueEnum};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

/// Webhook payloads are a few hundred bytes; anything far larger is refused
/// before it is buffered.
const MAX_BODY: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "outboxd-receiver",
    version,
    about = "Reference receiver for outboxd webhooks (Payment Cancellation)"
)]
struct Args {
    /// Address to listen on (an IP and port; port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8808")]
    listen: SocketAddr,

    /// Which Authorization header to require.
    #[arg(long, value_enum, default_value_t = AuthKind::None)]
    auth: AuthKind,

    /// User name for --auth basic.
    #[arg(long, value_name = "U")]
    username: Option<String>,

    /// Password for --auth basic.
    #[arg(
        long,
        value_name = "P",
        env = "RECEIVER_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,

    /// Token for --auth bearer.
    #[arg(long, value_name = "T", env = "RECEIVER_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Do not log each request (for benchmarks).
    #[arg(long)]
    quiet: bool,

    /// File holding the endpoint's Standard Webhooks signing secret
    /// (whsec_…): every request must then carry a webhook-signature made
    /// with it and a webhook-timestamp within 5 minutes of now, or it is
    /// answered {"status": "0", "message": why}
    #[arg(long, value_name = "FILE")]
    signing_secret_file: Option<std::path::PathBuf>,

    /// Print this program's man page (roff) and exit; the package installs
    /// it as outboxd-receiver(1).
    #[arg(long, hide = true)]
    man: bool,

    /// Print `arrived <idempotency-key> <unix-time-ns>` for each request as
    /// its head arrives (the benchmark's latency measurement reads these).
    #[arg(long)]
    arrivals: bool,

    /// Wait this long before answering each request, e.g. "8s": a slow
    /// system, for benchmarks.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    delay: Option<Duration>,

    /// Read each request and never answer it: a system that is down behind
    /// something that still accepts connections, for benchmarks.
    #[arg(long)]
    never_answer: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AuthKind {
    None,
    Basic,
    Bearer,
}

/// The Authorization header a request must carry.
enum Auth {
    None,
    /// Expected credentials: base64 of `user:password`. RFC 7617 clients all
    /// send standard padded base64, whose encoding of a given text is unique,
    /// so comparing the encoded form needs no decoding per request.
    Basic(Vec<u8>),
    /// Expected bearer token.
    Bearer(Vec<u8>),
}

impl Auth {
    fn from_args(args: &Args) -> Result<Auth, (ErrorKind, &'static str)> {
        match args.auth {
            AuthKind::None => Ok(Auth::None),
            AuthKind::Basic => match (&args.username, &args.password) {
                (Some(user), Some(password)) => {
                    // A ':' in the user name would make `user:password`
                    // ambiguous; RFC 7617 forbids it.
                    if user.contains(':') {
                        return Err((
                            ErrorKind::ValueValidation,
                            "--username must not contain ':'",
                        ));
                    }
                    Ok(Auth::Basic(
                        BASE64.encode(format!("{user}:{password}")).into_bytes(),
                    ))
                }
                _ => Err((
                    ErrorKind::MissingRequiredArgument,
                    "--auth basic needs --username and --password (or RECEIVER_PASSWORD)",
                )),
            },
            AuthKind::Bearer => match &args.token {
                Some(token) if !token.is_empty() => Ok(Auth::Bearer(token.clone().into_bytes())),
                _ => Err((
                    ErrorKind::MissingRequiredArgument,
                    "--auth bearer needs a non-empty --token (or RECEIVER_TOKEN)",
                )),
            },
        }
    }

    /// Whether the request's Authorization header is the expected one.
    fn allows(&self, header: Option<&HeaderValue>) -> bool {
        let (scheme, expected) = match self {
            Auth::None => return true,
            Auth::Basic(expected) => ("Basic", expected),
            Auth::Bearer(expected) => ("Bearer", expected),
        };
        let Some(header) = header else { return false };
        // `<scheme> <credentials>`; the scheme is case-insensitive (RFC 9110).
        let header = header.as_bytes();
        let Some(space) = header.iter().position(|&b| b == b' ') else {
            return false;
        };
        let (given_scheme, rest) = header.split_at(space);
        given_scheme.eq_ignore_ascii_case(scheme.as_bytes())
            && constant_time_eq(rest.trim_ascii(), expected)
    }

    /// The challenge sent with a 401, naming the scheme the client should use.
    fn challenge(&self) -> &'static str {
        match self {
            Auth::Basic(_) => r#"Basic realm="outboxd-receiver", charset="UTF-8""#,
            Auth::Bearer(_) | Auth::None => "Bearer",
        }
    }
}

/// Compares secrets without stopping at the first differing byte, so the
/// answer time does not tell an attacker how much of a guess was right. (The
/// length can still leak; it says little about the secret itself.)
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    let diff = given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    // Keeps the optimiser from turning the fold back into an early exit.
    std::hint::black_box(diff) == 0
}

/// What the server shares with every connection.
struct State {
    /// Requests must be signed with this key (--signing-secret-file).
    signing: Option<outboxd::http::sign::SigningKey>,
    auth: Auth,
    quiet: bool,
    arrivals: bool,
    delay: Option<Duration>,
    never_answer: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.man {
        let mut page = Vec::new();
        return match clap_mangen::Man::new(Args::command()).render(&mut page) {
            Ok(()) if std::io::Write::write_all(&mut std::io::stdout(), &page).is_ok() => {
                ExitCode::SUCCESS
            }
            _ => ExitCode::FAILURE,
        };
    }
    let auth = match Auth::from_args(&args) {
        Ok(auth) => auth,
        Err((kind, message)) => Args::command().error(kind, message).exit(),
    };
    let signing = match &args.signing_secret_file {
        None => None,
        Some(path) => {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("outboxd-receiver: cannot read {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            };
            match outboxd::http::sign::SigningKey::parse(&text) {
                Ok(key) => Some(key),
                Err(e) => Args::command()
                    .error(
                        ErrorKind::ValueValidation,
                        format!("--signing-secret-file: {e}"),
                    )
                    .exit(),
            }
        }
    };
    let state = Arc::new(State {
        signing,
        auth,
        quiet: args.quiet,
        arrivals: args.arrivals,
        delay: args.delay,
        never_answer: args.never_answer,
    });
    // One worker thread per core: benchmarks push many concurrent
    // keep-alive connections through this.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outboxd-receiver: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(args.listen, state))
}

async fn serve(listen: SocketAddr, state: Arc<State>) -> ExitCode {
    // Signal handlers go in before "listening on" is printed: a script that
    // sends SIGTERM as soon as it sees that line must get a clean exit, not
    // the default action (death by signal).
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("outboxd-receiver: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("outboxd-receiver: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(listen);
    // The real port when --listen asked for port 0. Printed even with
    // --quiet: scripts wait for this line.
    println!("listening on http://{local}");

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_connection(stream, Arc::clone(&state)));
                }
                Err(e) => {
                    // Usually out of file descriptors: pause instead of
                    // spinning until connections close.
                    eprintln!("outboxd-receiver: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // In-flight requests are cut off when the runtime stops; outboxd treats
    // that like any network failure and retries later.
    if !state.quiet {
        let _ = writeln!(std::io::stdout(), "stopping");
    }
    ExitCode::SUCCESS
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    // Answers are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let quiet = state.quiet;
    let service = service_fn(move |request| handle(Arc::clone(&state), request));
    // No timer, so no header read timeout: hyper would also count the idle
    // time between keep-alive requests against it and close pooled
    // connections under outboxd's feet. A receiver exposed to untrusted
    // clients would set `.timer(TokioTimer::new())` and a timeout.
    let result = http1::Builder::new()
        .keep_alive(true)
        // Answers pipelined requests with one write instead of one each.
        .pipeline_flush(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        // Clients hanging up mid-request are routine; say so only when
        // someone is watching.
        if !quiet {
            eprintln!("outboxd-receiver: connection error: {e}");
        }
    }
}

/// The fields of a webhook payload, as far as they could be read; logged
/// even when the payload is rejected.
#[derive(Default)]
struct Payment {
    company_id: Option<Value>,
    payment_id: Option<Value>,
    order_ids: Option<Value>,
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if state.arrivals {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let key = request
            .headers()
            .get("idempotency-key")
            .and_then(|k| k.to_str().ok())
            .unwrap_or("-");
        let _ = writeln!(std::io::stdout().lock(), "arrived {key} {at}");
    }
    if state.never_answer {
        // Until outboxd gives up and closes the connection.
        std::future::pending::<()>().await;
    }
    if let Some(delay) = state.delay {
        tokio::time::sleep(delay).await;
    }
    // Kept for the log line only; a HeaderValue clone is a reference count.
    let key = (!state.quiet)
        .then(|| request.headers().get("idempotency-key").cloned())
        .flatten();
    let mut payment = Payment::default();
    let (status, outcome, body) = answer(&state, request, &mut payment).await;
    if !state.quiet {
        log_request(key.as_ref(), &payment, &outcome);
    }

    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            headers.insert(ALLOW, HeaderValue::from_static("POST"));
        }
        StatusCode::UNAUTHORIZED => {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(state.auth.challenge()),
            );
        }
        _ => {}
    }
    Ok(response)
}

/// What happened to a request, for the log.
enum Outcome {
    Accepted,
    Rejected(String),
    /// Refused before the payload was looked at.
    Refused(&'static str),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Accepted => f.write_str("accepted"),
            Outcome::Rejected(problem) => write!(f, "rejected: {problem}"),
            Outcome::Refused(why) => f.write_str(why),
        }
    }
}

/// Decides the answer: HTTP status, outcome for the log, JSON body.
async fn answer(
    state: &State,
    request: Request<Incoming>,
    payment: &mut Payment,
) -> (StatusCode, Outcome, Bytes) {
    if request.method() != Method::POST {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    // Only the verdict is ever logged or answered, never a secret.
    if !state.auth.allows(request.headers().get(AUTHORIZATION)) {
        return refuse(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let headers = request.headers().clone();
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        Err(_) => return refuse(StatusCode::BAD_REQUEST, "cannot read body"),
    };

    // A signature that does not verify: answered like a rejected payload,
    // with the reason (never the secret or the expected signature).
    if let Some(key) = &state.signing {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let checked = key.verify(
            header("webhook-id"),
            header("webhook-timestamp"),
            header("webhook-signature"),
            &body,
            now,
        );
        if let Err(e) = checked {
            let problem = format!("signature not verified: {e}");
            let body = product_json("0", "message", &problem);
            return (StatusCode::OK, Outcome::Rejected(problem), body);
        }
    }

    // Payload problems are answered with HTTP 200 and status "0": that is how
    // the product tells outboxd "delivered, but rejected".
    let verdict = match serde_json::from_slice::<Value>(&body) {
        Ok(mut json) => {
            let verdict = check_cancellation(&json);
            if let Some(fields) = json.as_object_mut() {
                payment.company_id = fields.remove("companyId");
                payment.payment_id = fields.remove("paymentId");
                payment.order_ids = fields.remove("orderIds");
            }
            verdict
        }
        Err(e) => Err(format!("body is not valid JSON: {e}")),
    };
    match verdict {
        Ok(message) => {
            let body = product_json("1", "message", &message);
            (StatusCode::OK, Outcome::Accepted, body)
        }
        Err(problem) => {
            let body = product_json("0", "error", &problem);
            (StatusCode::OK, Outcome::Rejected(problem), body)
        }
    }
}

fn refuse(status: StatusCode, error: &'static str) -> (StatusCode, Outcome, Bytes) {
    (
        status,
        Outcome::Refused(error),
        product_json("0", "error", error),
    )
}

/// Checks that `json` is a Payment Cancellation and returns the success
/// message, or says what is wrong with it.
fn check_cancellation(json: &Value) -> Result<String, String> {
    let Some(fields) = json.as_object() else {
        return Err("body must be a JSON object".into());
    };
    for name in ["companyId", "paymentId"] {
        match fields.get(name) {
            // Integers only: 6316.0 or "6316" is a sender bug worth seeing.
            Some(value) if value.is_i64() || value.is_u64() => {}
            Some(_) => return Err(format!("{name} must be an integer")),
            None => return Err(format!("{name} is missing")),
        }
    }
    match fields.get("paymentNumber") {
        Some(Value::String(number)) => Ok(format!("Payment {number} cancellation received")),
        Some(_) => Err("paymentNumber must be a string".into()),
        None => Err("paymentNumber is missing".into()),
    }
}

/// `{"status":"<status>","<field>":"<text>"}`, written directly rather than
/// through a `serde_json::Map` (one buffer, no tree).
fn product_json(status: &str, field: &str, text: &str) -> Bytes {
    let mut out = Vec::with_capacity(32 + field.len() + text.len());
    out.extend_from_slice(br#"{"status":""#);
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(br#"",""#);
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(br#"":"#);
    // Escapes quotes and control characters in `text`.
    serde_json::to_writer(&mut out, text).expect("writing to a Vec cannot fail");
    out.push(b'}');
    Bytes::from(out)
}

/// One line per request on stdout.
fn log_request(key: Option<&HeaderValue>, payment: &Payment, outcome: &Outcome) {
    let key = key.map(|k| String::from_utf8_lossy(k.as_bytes()));
    let key = key.as_deref().unwrap_or("-");
    // Values from the request are printed as JSON (strings quoted and
    // escaped) and the key with escapes, so a crafted request cannot forge
    // log lines.
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the receiver down.
    let _ = writeln!(
        out,
        "{} key={} company={} payment={} orderIds={} {}",
        Rfc3339(SystemTime::now()),
        key.escape_debug(),
        Field(payment.company_id.as_ref()),
        Field(payment.payment_id.as_ref()),
        Field(payment.order_ids.as_ref()),
        outcome,
    );
}

/// A payload field for the log: compact JSON, or `-` when absent.
struct Field<'a>(Option<&'a Value>);

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(value) => write!(f, "{value}"),
            None => f.write_str("-"),
        }
    }
}

/// A UTC timestamp like `2026-05-01T12:34:56.789Z`. Written out by hand to
/// keep this example's dependencies to the HTTP stack.
struct Rfc3339(SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since_epoch = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let seconds = since_epoch.as_secs();
        let (year, month, day) = civil_date(seconds / 86_400);
        let time = seconds % 86_400;
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            time / 3600,
            time / 60 % 60,
            time % 60,
            since_epoch.subsec_millis()
        )
    }
}

/// Year, month, day of the `days`-th day after 1970-01-01 (proleptic
/// Gregorian). Counts in 400-year cycles of 146 097 days, within which the
/// calendar repeats; years are taken to start on 1 March so that the leap
/// day falls at the end of a year and month lengths follow a fixed pattern.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // 0000-03-01 is 719 468 days before 1970-01-01.
    let days = days + 719_468;
    let cycle = days / 146_097;
    let day_of_cycle = days % 146_097;
    // Leap years every 4 years, except every 100, except every 400.
    let year_of_cycle =
        (day_of_cycle - day_of_cycle / 1460 + day_of_cycle / 36_524 - day_of_cycle / 146_096) / 365;
    let day_of_year =
        day_of_cycle - (365 * year_of_cycle + year_of_cycle / 4 - year_of_cycle / 100);
    // Months from March: 31 30 31 30 31 31 30 31 30 31 31 (29|28), which
    // (153 * m + 2) / 5 gives the start day of.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = cycle * 400 + year_of_cycle + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_date_matches_known_days() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(59), (1970, 3, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(11_017), (2000, 3, 1));
        assert_eq!(civil_date(19_782), (2024, 2, 29));
        assert_eq!(civil_date(20_574), (2026, 5, 1));
        assert_eq!(civil_date(47_541), (2100, 3, 1), "2100 is not a leap year");
        let noon = UNIX_EPOCH + Duration::from_millis(1_777_636_496_789);
        assert_eq!(Rfc3339(noon).to_string(), "2026-05-01T11:54:56.789Z");
    }

    #[test]
    fn auth_checks_scheme_and_secret() {
        let basic = Auth::Basic(BASE64.encode("outboxd:pw").into_bytes());
        let good = format!("Basic {}", BASE64.encode("outboxd:pw"));
        assert!(basic.allows(Some(&HeaderValue::from_str(&good).unwrap())));
        let lower = format!("basic {}", BASE64.encode("outboxd:pw"));
        assert!(basic.allows(Some(&HeaderValue::from_str(&lower).unwrap())));
        let wrong = format!("Basic {}", BASE64.encode("outboxd:pX"));
        assert!(!basic.allows(Some(&HeaderValue::from_str(&wrong).unwrap())));
        assert!(!basic.allows(Some(&HeaderValue::from_static("Bearer pw"))));
        assert!(!basic.allows(None));

        let bearer = Auth::Bearer(b"t0ken".to_vec());
        assert!(bearer.allows(Some(&HeaderValue::from_static("Bearer t0ken"))));
        assert!(!bearer.allows(Some(&HeaderValue::from_static("Bearer t0ke"))));
        assert!(!bearer.allows(Some(&HeaderValue::from_static("Bearer"))));
        assert!(!bearer.allows(Some(&HeaderValue::from_static("Basic t0ken"))));
        assert!(Auth::None.allows(None));
    }

    #[test]
    fn cancellation_payloads_are_checked() {
        let ok = serde_json::json!({"companyId": 6316, "paymentId": 222125,
            "paymentNumber": "2271", "orderIds": "17899,17900"});
        assert_eq!(
            check_cancellation(&ok).unwrap(),
            "Payment 2271 cancellation received"
        );
        let float = serde_json::json!({"companyId": 6316.0, "paymentId": 1, "paymentNumber": "1"});
        assert_eq!(
            check_cancellation(&float).unwrap_err(),
            "companyId must be an integer"
        );
        let missing = serde_json::json!({"companyId": 1, "paymentNumber": "1"});
        assert_eq!(
            check_cancellation(&missing).unwrap_err(),
            "paymentId is missing"
        );
        let number = serde_json::json!({"companyId": 1, "paymentId": 2, "paymentNumber": 3});
        assert_eq!(
            check_cancellation(&number).unwrap_err(),
            "paymentNumber must be a string"
        );
        assert_eq!(
            check_cancellation(&serde_json::json!([1])).unwrap_err(),
            "body must be a JSON object"
        );
    }

    #[test]
    fn product_json_escapes_text() {
        let body = product_json("1", "message", "Payment \"7\"\n received");
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"status": "1", "message": "Payment \"7\"\n received"})
        );
    }
}
