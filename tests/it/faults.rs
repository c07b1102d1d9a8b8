//! Fault injection (issue 7): the daemon as a real process, killed, cut off
//! from its database, fed misbehaving receivers and poison rows, on loopback
//! only, with every wait bounded.
//!
//! SMTP faults (an outage, refused recipients) are covered by
//! `notify::notifications_made_while_smtp_is_down_are_all_sent_once_it_is_up`
//! and `notify::a_refused_recipient_does_not_block_the_others`.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use crate::bad_receiver::{BadReceiver, Fault, http_200, refused_port};
use crate::harness::count;
use crate::harness::{Daemon, TempDir, TestDb, eventually, eventually_count, http_get};
use crate::private_pg::PrivatePg;
use crate::receiver::{Receiver, Reply};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Short deadlines, the shortest lease they allow (2 x 1 s + 10 s), fast
/// retries: a stranded lease comes back in 12 s instead of 60.
pub(crate) const QUICK: &[(&str, &str)] = &[
    ("OUTBOXD_DELIVERY__REQUEST_TIMEOUT", "1s"),
    ("OUTBOXD_DELIVERY__CONNECT_TIMEOUT", "1s"),
    ("OUTBOXD_DELIVERY__LEASE", "12s"),
    ("OUTBOXD_DATABASE__CONNECT_TIMEOUT", "1s"),
    ("OUTBOXD_RETRY__BASE_DELAY", "100ms"),
    ("OUTBOXD_RETRY__JITTER", "0"),
];

pub(crate) fn quick(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut env = QUICK.to_vec();
    env.extend_from_slice(extra);
    env
}

pub(crate) async fn endpoint(client: &Client, company: i64, event_type: &str, url: &str) {
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, event_type, url, notify_emails)
             VALUES ($1, $2, $3, ARRAY['ops@example.com'])",
            &[&company, &event_type, &url],
        )
        .await
        .unwrap();
}

pub(crate) async fn delivered(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
    )
    .await
}

/// Enqueues `n` payment cancellations spread over companies 1..=companies,
/// in transactions of `per_tx`, payment ids 1..=n.
pub(crate) async fn enqueue_many(client: &Client, n: i64, companies: i64, per_tx: i64) {
    for start in (0..n).step_by(per_tx as usize) {
        let end = (start + per_tx).min(n);
        client
            .batch_execute(&format!(
                "SELECT outbox.enqueue_payment_cancellation(1 + g % {companies}, g, 'P' || g)
                   FROM generate_series({}, {end}) g",
                start + 1
            ))
            .await
            .unwrap();
    }
}

/// The daemon logged no panic (neither the process nor a delivery task).
pub(crate) fn assert_no_panic(daemon: &Daemon) {
    for line in daemon.log() {
        assert!(!line.contains("panicked"), "outboxd panicked: {line}");
    }
}

/// Peak resident memory (VmHWM) of a running process, in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// What the receiver and the database say about a drain, checked for what
/// every fault must leave intact:
///
/// - every event is `delivered`, with no lease left;
/// - it was marked once: its only attempt row is the success that marked
///   it, at the attempt number it ended with (a claim that died with its
///   daemon recorded nothing, so `attempts` may be higher than 1);
/// - every event reached the receiver, under its own id as Idempotency-Key
///   (the key always goes with the same body), and never more often than it
///   was claimed;
/// - only events claimed more than once reached the receiver more than once.
///
/// Returns (events claimed more than once, keys the receiver saw more than once).
pub(crate) async fn assert_delivered_and_marked_once(
    client: &Client,
    receiver: &Receiver,
    n: i64,
) -> (usize, usize) {
    let rows = client
        .query(
            "SELECT e.id::text, e.attempts, e.state, e.lease_owner IS NULL, e.payload::text,
                    count(a.attempt),
                    count(a.attempt) FILTER (WHERE a.outcome = 'success' AND a.attempt = e.attempts)
               FROM outbox.events AS e
               LEFT JOIN outbox.attempts AS a ON a.event_id = e.id
              GROUP BY e.id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, n);
    let mut events: HashMap<String, (i32, serde_json::Value)> = HashMap::new();
    let mut claimed_again = 0;
    for row in &rows {
        let id: String = row.get(0);
        let attempts: i32 = row.get(1);
        let state: String = row.get(2);
        let (rows, marking): (i64, i64) = (row.get(5), row.get(6));
        assert_eq!(state, "delivered", "event {id}");
        assert!(row.get::<_, bool>(3), "event {id} still has a lease owner");
        assert_eq!(
            (rows, marking),
            (1, 1),
            "event {id} (attempts {attempts}): one attempt row, the success that marked it"
        );
        if attempts > 1 {
            claimed_again += 1;
        }
        let payload: serde_json::Value = serde_json::from_str(&row.get::<_, String>(4)).unwrap();
        events.insert(id, (attempts, payload));
    }

    let mut seen: HashMap<String, i32> = HashMap::new();
    for request in receiver.received() {
        let key = request
            .header("idempotency-key")
            .expect("an Idempotency-Key")
            .to_string();
        let (_, payload) = events
            .get(&key)
            .unwrap_or_else(|| panic!("a request with unknown key {key}"));
        assert_eq!(
            &request.json(),
            payload,
            "key {key} came with another event's body"
        );
        assert_eq!(request.header("webhook-id"), Some(key.as_str()));
        *seen.entry(key).or_default() += 1;
    }
    let mut duplicated = 0;
    for (id, (attempts, _)) in &events {
        let times = seen.get(id).copied().unwrap_or(0);
        assert!(times >= 1, "event {id} never reached the receiver");
        assert!(
            times <= *attempts,
            "event {id} arrived {times} times but was claimed {attempts} times"
        );
        if times > 1 {
            duplicated += 1;
        }
    }
    (claimed_again, duplicated)
}

// ---------------------------------------------------------------------------
// kill -9
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_five_times_during_a_5000_event_drain_loses_nothing_and_marks_each_once() {
    const EVENTS: i64 = 5000;
    let db = TestDb::new().await;
    let client = db.client().await;
    // 20-60 ms per answer: with 64 deliveries in flight every kill lands on
    // some, and five short lives cannot drain all 5,000.
    let receiver = Receiver::start(|_, _| {
        Reply::Delayed(
            Duration::from_millis(fastrand::u64(20..=60)),
            Box::new(Reply::Json(
                200,
                json!({"status": "1", "message": "received"}),
            )),
        )
    })
    .await;
    for company in 1..=50 {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    enqueue_many(&client, EVENTS, 50, 500).await;

    // Each life: start, deliver for a random 50-400 ms, kill -9. What it had
    // claimed and not recorded stays leased under its name until the lease
    // runs out.
    let mut stranded = Vec::new();
    for _ in 0..5 {
        let before = receiver.received().len();
        let mut daemon = Daemon::start(&db, QUICK).await;
        let pid = daemon.pid();
        // Once this life is delivering, a moment chosen at random (the
        // fault's timing, not a wait for anything).
        receiver.wait_for(before + 1, SECS(20)).await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(50..=400))).await;
        daemon.signal(libc::SIGKILL);
        let status = daemon.wait(SECS(10)).await;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert_no_panic(&daemon);
        // A statement the dead daemon sent just before dying may still run
        // in its backend (or not have started yet): count its leases once
        // all its sessions have ended.
        eventually_count(
            &client,
            "the dead daemon's sessions to end",
            SECS(10),
            "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
            0,
        )
        .await;
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox.events WHERE state = 'leased' AND lease_owner LIKE $1",
                &[&format!("%:{pid}:%")],
            )
            .await
            .unwrap()
            .get(0);
        stranded.push(left);
    }
    let before_last = delivered(&client).await;
    assert!(
        stranded.iter().all(|&n| n > 0),
        "every kill should land with deliveries in flight: {stranded:?}"
    );
    assert!(before_last < EVENTS, "the kills came mid-drain");

    // The last life delivers the rest, including every stranded event once
    // its lease has run out.
    let daemon = Daemon::start(&db, QUICK).await;
    eventually("all 5000 delivered", SECS(60), || async {
        delivered(&client).await == EVENTS
    })
    .await;
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());

    let (claimed_again, duplicated) =
        assert_delivered_and_marked_once(&client, &receiver, EVENTS).await;
    // Only the claims stranded by a kill were repeated, each once.
    let total_attempts = count(&client, "SELECT sum(attempts)::bigint FROM outbox.events").await;
    let stranded_total: i64 = stranded.iter().sum();
    assert_eq!(
        total_attempts,
        EVENTS + stranded_total,
        "claims beyond one per event = leases stranded by the kills ({stranded:?})"
    );
    eprintln!(
        "sigkill x5: stranded per kill {stranded:?}, delivered before the last life {before_last}, \
         claimed twice {claimed_again}, duplicates at the receiver {duplicated}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_frozen_past_its_lease_cannot_overwrite_the_outcome_of_the_one_that_took_over() {
    const EVENTS: usize = 8;
    let db = TestDb::new().await;
    let client = db.client().await;
    // The first request for each event is answered late (the frozen daemon
    // never reads it in time); the second at once.
    let receiver = Receiver::start(|_, nth| {
        let answer = Reply::Json(
            200,
            json!({"status": "1", "message": format!("answer {nth}")}),
        );
        if nth == 1 {
            Reply::Delayed(Duration::from_millis(500), Box::new(answer))
        } else {
            answer
        }
    })
    .await;
    endpoint(&client, 1, "payment.cancellation", &receiver.url("/")).await;
    enqueue_many(&client, EVENTS as i64, 1, EVENTS as i64).await;
    let env = quick(&[("OUTBOXD_DELIVERY__CONCURRENCY", "8")]);
    let frozen = Daemon::start(&db, &env).await;
    receiver.wait_for(EVENTS, SECS(10)).await;
    frozen.signal(libc::SIGSTOP);

    // Another instance takes over once the 12 s leases run out.
    let other = Daemon::start(&db, &env).await;
    eventually_count(
        &client,
        "the other instance to deliver all",
        SECS(30),
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered' AND attempts = 2",
        EVENTS as i64,
    )
    .await;
    let thawed_at: std::time::SystemTime =
        client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    frozen.signal(libc::SIGCONT);
    // One warning per late outcome.
    eventually(
        "every late outcome refused by the fence",
        SECS(20),
        || async {
            frozen
                .log()
                .iter()
                .filter(|l| l.contains("outcome not recorded: the event was claimed again since"))
                .count()
                == EVENTS
        },
    )
    .await;

    // The rows say what the instance that took over recorded, untouched.
    let rows = client
        .query(
            "SELECT e.state, e.attempts, e.response_message, e.delivered_at < $1,
                    (SELECT count(*) FROM outbox.attempts a WHERE a.event_id = e.id)
               FROM outbox.events e",
            &[&thawed_at],
        )
        .await
        .unwrap();
    for row in &rows {
        let got: (String, i32, Option<String>, bool, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(
            got,
            ("delivered".into(), 2, Some("answer 2".into()), true, 2),
            "(state, attempts, message, marked before the thaw, attempt rows)"
        );
    }
    let mut keys: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), EVENTS, "two requests per event, one key each");
    assert_eq!(receiver.received().len(), 2 * EVENTS);
    for daemon in [frozen, other] {
        assert_no_panic(&daemon);
        assert!(daemon.stop().await.success());
    }
}

// ---------------------------------------------------------------------------
// Database faults
// ---------------------------------------------------------------------------

/// Terminates every other session on the current database: the daemon's
/// pooled connections and its LISTEN connection. Returns how many.
async fn terminate_others(client: &Client) -> i64 {
    count(
        client,
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
           FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .await
}

pub(crate) fn slow_ok_receiver(ms: u64) -> impl Fn(&crate::receiver::Received, u32) -> Reply {
    move |_, _| {
        Reply::Delayed(
            Duration::from_millis(ms),
            Box::new(Reply::Json(200, json!({"status": "1", "message": "ok"}))),
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn terminated_database_connections_mid_drain_are_recovered_without_loss() {
    const EVENTS: i64 = 1500;
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(slow_ok_receiver(20)).await;
    for company in 1..=10 {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    enqueue_many(&client, EVENTS, 10, 500).await;
    let daemon = Daemon::start(&db, &quick(&[("OUTBOXD_DELIVERY__CONCURRENCY", "16")])).await;
    let readyz = format!("{}/readyz", daemon.admin);
    let mut cut_at = Vec::new();
    for round in 1..=3 {
        // Ready again (LISTEN reconnected, the pool answers), so this round
        // cuts both, and some deliveries since the last cut.
        eventually("/readyz to be 200", SECS(30), || async {
            http_get(&readyz).await.0 == 200
        })
        .await;
        let seen = cut_at.last().copied().unwrap_or(0);
        receiver.wait_for(seen + 150, SECS(30)).await;
        let terminated = terminate_others(&client).await;
        assert!(
            terminated >= 2,
            "round {round}: the pool and LISTEN connections, got {terminated}"
        );
        cut_at.push(receiver.received().len());
    }
    assert!(
        cut_at.iter().all(|&n| (n as i64) < EVENTS),
        "every cut came mid-drain: {cut_at:?}"
    );
    daemon
        .wait_for_log("LISTEN connection lost", SECS(10))
        .await;
    eventually("all delivered", SECS(60), || async {
        delivered(&client).await == EVENTS
    })
    .await;
    eventually("/readyz back to 200", SECS(30), || async {
        http_get(&readyz).await.0 == 200
    })
    .await;
    let (_, metrics) = http_get(&format!("{}/metrics", daemon.admin)).await;
    let reconnects = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outboxd_listen_reconnects_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        reconnects >= 3.0,
        "LISTEN reconnected after each cut: {reconnects}"
    );
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
    let (claimed_again, duplicated) =
        assert_delivered_and_marked_once(&client, &receiver, EVENTS).await;
    eprintln!(
        "pg_terminate_backend x3 at {cut_at:?} requests: claimed twice {claimed_again}, duplicates {duplicated}, LISTEN reconnects {reconnects}"
    );
}

/// A private cluster (for a test to stop and start) with a migrated
/// database, a receiver answering OK after `reply_ms`, one endpoint per
/// company for `companies` companies, and `events` pending events spread
/// over them, `per_tx` per transaction. Bind the three in this order, so the
/// database is dropped before its cluster.
pub(crate) async fn backlog_on_private_pg(
    events: i64,
    companies: i64,
    per_tx: i64,
    reply_ms: u64,
) -> (PrivatePg, TestDb, Receiver) {
    let pg = PrivatePg::start().await;
    let db = TestDb::new_on(&pg.admin_url()).await;
    let client = db.client().await;
    let receiver = Receiver::start(slow_ok_receiver(reply_ms)).await;
    for company in 1..=companies {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    enqueue_many(&client, events, companies, per_tx).await;
    (pg, db, receiver)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_mid_drain_shows_in_readyz_and_loses_nothing() {
    const EVENTS: i64 = 1000;
    let (pg, db, receiver) = backlog_on_private_pg(EVENTS, 10, 500, 20).await;
    let mut daemon = Daemon::start(&db, &quick(&[("OUTBOXD_DELIVERY__CONCURRENCY", "16")])).await;
    let readyz = format!("{}/readyz", daemon.admin);
    assert_eq!(http_get(&readyz).await.0, 200);

    receiver.wait_for(200, SECS(30)).await;
    pg.stop().await;
    eventually("/readyz to report the outage", SECS(15), || async {
        http_get(&readyz).await.0 == 503
    })
    .await;
    // While the server is down, it stays reported, and the daemon stays up.
    for _ in 0..3 {
        let (status, body) = http_get(&readyz).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("not ready: database"), "{body}");
    }
    assert_eq!(http_get(&format!("{}/healthz", daemon.admin)).await.0, 200);
    assert!(
        daemon.is_running(),
        "outboxd exited while the database was down"
    );
    let during = receiver.received().len();

    pg.restart().await;
    let (ready_after, client) = recovered(&db, &readyz, EVENTS, during).await;
    assert!(
        daemon
            .log()
            .iter()
            .any(|l| l.contains("claim failed") || l.contains("recording failed")),
        "the outage was seen by the delivery loop"
    );
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
    let (claimed_again, duplicated) =
        assert_delivered_and_marked_once(&client, &receiver, EVENTS).await;
    eprintln!(
        "postgres restart: {during} requests before the server came back, /readyz 200 again {ready_after:?} after it did, \
         claimed twice {claimed_again}, duplicates {duplicated}"
    );
}

/// Just after the private cluster came back: waits for /readyz to say 200
/// and for every one of `events` to be delivered (through a new session:
/// the old one died with the server), and checks that the outage came
/// mid-drain (`during` requests before it). Returns how long /readyz took,
/// and the new session.
pub(crate) async fn recovered(
    db: &TestDb,
    readyz: &str,
    events: i64,
    during: usize,
) -> (Duration, Client) {
    let back = std::time::Instant::now();
    eventually("/readyz to recover", SECS(45), || async {
        http_get(readyz).await.0 == 200
    })
    .await;
    let ready_after = back.elapsed();
    let client = db.client().await;
    eventually("all delivered after the outage", SECS(60), || async {
        delivered(&client).await == events
    })
    .await;
    assert!(
        (during as i64) < events,
        "the outage came mid-drain ({during} requests before it)"
    );
    (ready_after, client)
}

// ---------------------------------------------------------------------------
// Receiver faults
// ---------------------------------------------------------------------------

/// How an event must end.
struct Want {
    state: &'static str,
    /// The attempt row's outcome and HTTP status.
    outcome: &'static str,
    http_status: Option<i16>,
    /// Each must appear in last_error (or, when delivered, response_message).
    says: &'static [&'static str],
}

const GAVE_UP: &str = "gave up after 1 attempts";

/// (state, attempts, "response_message | last_error", the attempt rows'
/// outcomes, their HTTP status or 0) of one event.
async fn outcome_of(client: &Client, id: uuid::Uuid) -> (String, i32, String, String, i16) {
    let row = client
        .query_one(
            "SELECT e.state, e.attempts,
                    coalesce(e.response_message, '') || ' | ' || coalesce(e.last_error, ''),
                    (SELECT string_agg(a.outcome, ',') FROM outbox.attempts a WHERE a.event_id = e.id),
                    (SELECT min(coalesce(a.http_status, 0::smallint)) FROM outbox.attempts a WHERE a.event_id = e.id)
               FROM outbox.events e WHERE e.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get::<_, Option<String>>(3).unwrap_or_default(),
        row.get::<_, Option<i16>>(4).unwrap_or(-1),
    )
}

async fn wait_final(client: &Client, id: uuid::Uuid, what: &str) {
    eventually(&format!("{what}: a final state"), SECS(20), || async {
        let state = outcome_of(client, id).await.0;
        state == "delivered" || state == "failed"
    })
    .await;
}

fn check(what: &str, got: &(String, i32, String, String, i16), want: &Want) {
    let (state, attempts, text, outcome, status) = got;
    eprintln!("{what}: {state}, attempt {outcome}, HTTP {status}: {text}");
    assert_eq!(state, want.state, "{what}: {got:?}");
    assert_eq!(*attempts, 1, "{what}: {got:?}");
    assert_eq!(outcome, want.outcome, "{what}: {got:?}");
    assert_eq!(
        *status,
        want.http_status.unwrap_or(0),
        "{what}: HTTP status {got:?}"
    );
    for needle in want.says {
        assert!(text.contains(needle), "{what}: {needle:?} not in {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn receiver_faults_are_classified_as_designed_without_panic_or_memory_growth() {
    const HUGE: usize = 50 * 1024 * 1024;
    const HUGE_EVENTS: i64 = 4;
    let invalid_utf8 = http_200(b"{\"status\":\"1\",\"message\":\"caf\xe9 \xff\xfe ok\"}");
    let broken_chunked = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{\"status\":\"1\",\"message\":\"ok\"}\r\n0\r\n\r\n".to_vec();
    let http10 =
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"status\":\"1\",\"message\":\"ok\"}"
            .to_vec();
    let receivers = [
        BadReceiver::start(Fault::ResetMidResponse).await,
        BadReceiver::start(Fault::SlowHeaders(Duration::from_millis(300))).await,
        BadReceiver::start(Fault::DripBody(Duration::from_millis(100))).await,
        BadReceiver::start(Fault::Silent).await,
        BadReceiver::start(Fault::Huge { bytes: HUGE }).await,
        BadReceiver::start(Fault::Bytes(invalid_utf8)).await,
        BadReceiver::start(Fault::Bytes(broken_chunked)).await,
        BadReceiver::start(Fault::Bytes(http10)).await,
    ];
    let cases: Vec<(&str, String, Want)> = vec![
        (
            "connection refused",
            format!("http://127.0.0.1:{}/", refused_port()),
            Want {
                state: "failed",
                outcome: "retryable",
                http_status: None,
                says: &[GAVE_UP, "Connection refused"],
            },
        ),
        (
            "reset mid-response",
            receivers[0].url("/"),
            Want {
                state: "failed",
                outcome: "retryable",
                http_status: None,
                says: &[GAVE_UP, "reset"],
            },
        ),
        ("slow headers", receivers[1].url("/"), timed_out()),
        ("a body that drips", receivers[2].url("/"), timed_out()),
        ("no answer at all", receivers[3].url("/"), timed_out()),
        (
            "a 50 MiB body",
            receivers[4].url("/"),
            Want {
                state: "failed",
                outcome: "permanent",
                http_status: Some(200),
                says: &["invalid response", "over the size cap (truncated)"],
            },
        ),
        (
            "invalid UTF-8",
            receivers[5].url("/"),
            Want {
                state: "failed",
                outcome: "permanent",
                http_status: Some(200),
                says: &["invalid response", "not JSON", "caf\u{FFFD}"],
            },
        ),
        (
            "broken chunked encoding",
            receivers[6].url("/"),
            Want {
                state: "failed",
                outcome: "retryable",
                http_status: None,
                says: &[GAVE_UP, "chunk"],
            },
        ),
        (
            "HTTP/1.0 close-delimited",
            receivers[7].url("/"),
            Want {
                state: "delivered",
                outcome: "success",
                http_status: Some(200),
                says: &["ok"],
            },
        ),
    ];

    let db = TestDb::new().await;
    let client = db.client().await;
    for (company, (_, url, _)) in cases.iter().enumerate() {
        endpoint(&client, company as i64 + 1, "payment.cancellation", url).await;
    }
    let mut daemon = Daemon::start(&db, &quick(&[("OUTBOXD_RETRY__MAX_ATTEMPTS", "1")])).await;
    let pid = daemon.pid();
    let start_rss = peak_rss_kib(pid);
    let mut ids: Vec<Vec<uuid::Uuid>> = Vec::new();
    for (company, (what, _, _)) in cases.iter().enumerate() {
        let company = company as i64 + 1;
        let n = if *what == "a 50 MiB body" {
            HUGE_EVENTS
        } else {
            1
        };
        let mut these = Vec::new();
        for payment in 1..=n {
            these.push(
                client
                    .query_one(
                        "SELECT outbox.enqueue_payment_cancellation($1, $2, 'P')",
                        &[&company, &(company * 100 + payment)],
                    )
                    .await
                    .unwrap()
                    .get(0),
            );
        }
        ids.push(these);
    }
    for ((what, _, want), ids) in cases.iter().zip(&ids) {
        for id in ids {
            wait_final(&client, *id, what).await;
            check(what, &outcome_of(&client, *id).await, want);
        }
    }
    // Everything but the refused connection reached its receiver, once per
    // event (not retried: max_attempts 1).
    for (receiver, (what, _, _)) in receivers.iter().zip(&cases[1..]) {
        let want = if *what == "a 50 MiB body" {
            HUGE_EVENTS as usize
        } else {
            1
        };
        assert_eq!(receiver.keys().len(), want, "{what}");
    }

    // Four 50 MiB answers at once did not become 200 MiB of memory.
    let peak = peak_rss_kib(pid);
    eprintln!("receiver faults: VmHWM {start_rss} KiB at start, {peak} KiB at the end");
    assert!(
        peak < 60 * 1024,
        "outboxd peaked at {peak} KiB (started at {start_rss} KiB)"
    );
    // And it goes on delivering.
    let ok = Receiver::ok().await;
    endpoint(&client, 99, "payment.cancellation", &ok.url("/")).await;
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(99, 1, '1')")
        .await
        .unwrap();
    ok.wait_for(1, SECS(10)).await;
    assert!(daemon.is_running());
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
}

fn timed_out() -> Want {
    Want {
        state: "failed",
        outcome: "retryable",
        http_status: None,
        says: &[GAVE_UP, "timed out after 1s"],
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// Runs the openssl command in `dir`; panics with its stderr on failure.
pub(crate) fn openssl(dir: &TempDir, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(&dir.0)
        .output()
        .expect("the openssl command (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In `dir`: `self.pem` (self-signed for IP 127.0.0.1), `ca.pem`, and two
/// certificates that CA signed: `expired.pem` (for 127.0.0.1, valid in
/// January 2020 only) and `misnamed.pem` (valid now, for 127.0.0.2); each
/// with its `.key`.
fn make_certificates(dir: &TempDir) {
    const EC: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let self_signed = [
        &["req", "-x509", "-nodes", "-days", "30"][..],
        EC,
        &[
            "-keyout",
            "self.key",
            "-out",
            "self.pem",
            "-subj",
            "/CN=127.0.0.1",
        ],
        &["-addext", "subjectAltName=IP:127.0.0.1"],
    ]
    .concat();
    openssl(dir, &self_signed);
    let ca = [
        &["req", "-x509", "-nodes", "-days", "30"][..],
        EC,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=outboxd test CA",
        ],
    ]
    .concat();
    openssl(dir, &ca);
    // `openssl ca` is the one tool of OpenSSL 3.0 that sets any validity
    // period, past ones included.
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "01\n").unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = test\n\
         [test]\ndir = .\ndatabase = index.txt\nserial = serial\nnew_certs_dir = .\n\
         default_md = sha256\npolicy = any\ncopy_extensions = none\nunique_subject = no\n\
         [any]\ncommonName = supplied\n\
         [for_127_0_0_1]\nbasicConstraints = CA:FALSE\nsubjectAltName = IP:127.0.0.1\n\
         [for_127_0_0_2]\nbasicConstraints = CA:FALSE\nsubjectAltName = IP:127.0.0.2\n",
    )
    .unwrap();
    for (name, cn, extensions, validity) in [
        (
            "expired",
            "/CN=127.0.0.1",
            "for_127_0_0_1",
            &[
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
            ][..],
        ),
        (
            "misnamed",
            "/CN=127.0.0.2",
            "for_127_0_0_2",
            &["-days", "30"][..],
        ),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let request = [
            &["req", "-new", "-nodes"][..],
            EC,
            &["-keyout", &key, "-out", &csr, "-subj", cn],
        ]
        .concat();
        openssl(dir, &request);
        let sign = [
            &["ca", "-batch", "-notext", "-config", "ca.cnf"][..],
            &[
                "-cert", "ca.pem", "-keyfile", "ca.key", "-in", &csr, "-out", &pem,
            ],
            &["-extensions", extensions],
            validity,
        ]
        .concat();
        openssl(dir, &sign);
    }
}

fn acceptor(dir: &TempDir, name: &str) -> tokio_native_tls::TlsAcceptor {
    let cert = std::fs::read(dir.join(&format!("{name}.pem"))).unwrap();
    let key = std::fs::read(dir.join(&format!("{name}.key"))).unwrap();
    let identity = native_tls::Identity::from_pkcs8(&cert, &key).unwrap();
    native_tls::TlsAcceptor::new(identity).unwrap().into()
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_self_signed_is_refused_unless_trusted_and_expired_or_misnamed_always() {
    let dir = TempDir::new("tls");
    make_certificates(&dir);
    let ok = Fault::Bytes(http_200(br#"{"status":"1","message":"ok over tls"}"#));
    let self_signed = BadReceiver::start_tls(ok.clone(), acceptor(&dir, "self")).await;
    let expired = BadReceiver::start_tls(ok.clone(), acceptor(&dir, "expired")).await;
    let misnamed = BadReceiver::start_tls(ok, acceptor(&dir, "misnamed")).await;
    let db = TestDb::new().await;
    let client = db.client().await;
    for (company, receiver) in [(1_i64, &self_signed), (2, &expired), (3, &misnamed)] {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    let enqueue = async |payment: i64| -> Vec<uuid::Uuid> {
        let mut ids = Vec::new();
        for company in 1..=3_i64 {
            ids.push(
                client
                    .query_one(
                        "SELECT outbox.enqueue_payment_cancellation($1, $2, 'P')",
                        &[&company, &payment],
                    )
                    .await
                    .unwrap()
                    .get(0),
            );
        }
        ids
    };
    let refused = |says: &'static [&'static str]| Want {
        state: "failed",
        outcome: "retryable",
        http_status: None,
        says,
    };

    // By default only the system's roots are trusted.
    let daemon = Daemon::start(&db, &quick(&[("OUTBOXD_RETRY__MAX_ATTEMPTS", "1")])).await;
    let ids = enqueue(1).await;
    for (id, (what, want)) in ids.iter().zip([
        (
            "self-signed, not trusted",
            refused(&[GAVE_UP, "certificate verify failed", "self-signed"]),
        ),
        (
            "expired, CA not trusted",
            refused(&[GAVE_UP, "certificate verify failed"]),
        ),
        (
            "misnamed, CA not trusted",
            refused(&[GAVE_UP, "certificate verify failed"]),
        ),
    ]) {
        wait_final(&client, *id, what).await;
        check(what, &outcome_of(&client, *id).await, &want);
    }
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());

    // Trusting the self-signed certificate and the CA (one PEM file with
    // both): the first is delivered, the CA's expired and misnamed
    // certificates are still refused.
    let trust = dir.join("trust.pem");
    let pems = [
        std::fs::read_to_string(dir.join("self.pem")).unwrap(),
        std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
    ];
    std::fs::write(&trust, pems.concat()).unwrap();
    let trust = trust.to_str().unwrap().to_string();
    let mut env = quick(&[("OUTBOXD_RETRY__MAX_ATTEMPTS", "1")]);
    env.push(("OUTBOXD_DELIVERY__TLS_CA_FILE", trust.as_str()));
    let daemon = Daemon::start(&db, &env).await;
    let ids = enqueue(2).await;
    for (id, (what, want)) in ids.iter().zip([
        (
            "self-signed, trusted",
            Want {
                state: "delivered",
                outcome: "success",
                http_status: Some(200),
                says: &["ok over tls"],
            },
        ),
        (
            "expired, CA trusted",
            refused(&[GAVE_UP, "certificate has expired"]),
        ),
        (
            "misnamed, CA trusted",
            refused(&[GAVE_UP, "IP address mismatch"]),
        ),
    ]) {
        wait_final(&client, *id, what).await;
        check(what, &outcome_of(&client, *id).await, &want);
    }
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
    // Nothing was sent over a connection whose certificate was refused.
    assert_eq!(self_signed.keys(), vec![ids[0].to_string()]);
    assert!(expired.keys().is_empty());
    assert!(misnamed.keys().is_empty());
}

// ---------------------------------------------------------------------------
// Poison rows
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn poison_rows_fail_with_the_reason_without_stalling_or_crash_looping() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let receiver = Receiver::ok().await;
    for company in 1..=3 {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    endpoint(&client, 1, "unknown.type", &receiver.url("/unknown")).await;
    let mut daemon = Daemon::start(&db, QUICK).await;
    let pid = daemon.pid();

    // Written with raw INSERTs, around the enqueue functions, each between
    // two good events in one transaction: (what, event type, company,
    // payload, attempt outcome, reason).
    let poison = [
        (
            "payload not an object",
            "payment.cancellation",
            1_i64,
            "[1, 2]",
            "permanent",
            "invalid payload: the payload is not a JSON object",
        ),
        (
            "payload an array of the fields in order",
            "payment.cancellation",
            1,
            r#"[1, 7, "7"]"#,
            "permanent",
            "invalid payload: the payload is not a JSON object",
        ),
        (
            "payload JSON null",
            "payment.cancellation",
            1,
            "null",
            "permanent",
            "invalid payload: the payload is not a JSON object",
        ),
        (
            "missing fields",
            "payment.cancellation",
            1,
            r#"{"companyId": 1}"#,
            "permanent",
            "missing field `paymentId`",
        ),
        (
            "a field of the wrong type",
            "payment.cancellation",
            2,
            r#"{"companyId": 2, "paymentId": "7", "paymentNumber": "7"}"#,
            "permanent",
            "invalid type: string \"7\", expected i64",
        ),
        (
            "another tenant's companyId",
            "payment.cancellation",
            2,
            r#"{"companyId": 3, "paymentId": 7, "paymentNumber": "7"}"#,
            "permanent",
            "companyId 3 does not match the event's company_id 2",
        ),
        (
            "malformed orderIds",
            "payment.cancellation",
            3,
            r#"{"companyId": 3, "paymentId": 7, "paymentNumber": "7", "orderIds": "1,,2"}"#,
            "permanent",
            "orderIds must be comma-separated order ids",
        ),
        (
            "unknown event type, payload not an object",
            "unknown.type",
            1,
            r#""just text""#,
            "permanent",
            "invalid payload: the payload is not a JSON object",
        ),
        (
            "unknown event type without an endpoint",
            "unknown.type",
            2,
            r#"{"a": 1}"#,
            "no_endpoint",
            "no endpoint configured for company 2 and event type unknown.type",
        ),
    ];
    let mut poison_ids = Vec::new();
    let mut good = 0_i64;
    for (i, (_, event_type, company, payload, _, _)) in poison.iter().enumerate() {
        let tx = client.transaction().await.unwrap();
        let good_one = "SELECT outbox.enqueue_payment_cancellation($1, $2, 'G')";
        tx.execute(good_one, &[company, &(1000 + 2 * i as i64)])
            .await
            .unwrap();
        let id: uuid::Uuid = tx
            .query_one(
                "INSERT INTO outbox.events (event_type, company_id, payload)
                 VALUES ($1, $2, $3::text::jsonb) RETURNING id",
                &[event_type, company, payload],
            )
            .await
            .unwrap()
            .get(0);
        tx.execute(good_one, &[company, &(1001 + 2 * i as i64)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        poison_ids.push(id);
        good += 2;
    }
    // An unknown event type with an endpoint and an object payload is not
    // poison: it is sent as stored.
    client
        .execute(
            "SELECT outbox.enqueue('unknown.type', 1, '{\"anything\": [1, 2]}')",
            &[],
        )
        .await
        .unwrap();
    good += 1;

    for (id, (what, _, _, _, outcome, reason)) in poison_ids.iter().zip(&poison) {
        wait_final(&client, *id, what).await;
        let (state, attempts, text, attempt_outcome, status) = outcome_of(&client, *id).await;
        eprintln!("{what}: {state}, attempt {attempt_outcome}: {text}");
        assert_eq!((state.as_str(), attempts), ("failed", 1), "{what}");
        assert_eq!(attempt_outcome, *outcome, "{what}");
        assert_eq!(status, 0, "{what}: never sent");
        assert!(text.contains(reason), "{what}: {reason:?} not in {text:?}");
    }
    eventually("every good event delivered", SECS(20), || async {
        delivered(&client).await == good
    })
    .await;
    assert_eq!(
        receiver.received().len() as i64,
        good,
        "only the good events were sent"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.notifications").await,
        0,
        "nobody is emailed about a row they cannot fix"
    );
    // One life: the daemon neither exited nor restarted.
    assert!(daemon.is_running());
    assert_eq!(daemon.pid(), pid);
    let starts = daemon
        .log()
        .iter()
        .filter(|l| l.contains("outboxd is delivering"))
        .count();
    assert_eq!(starts, 1);
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_with_an_infinite_created_at_do_not_stall_the_queue() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 1, "payment.cancellation", &receiver.url("/")).await;
    // timestamptz takes 'infinity' and '-infinity'; a raw INSERT (or a
    // restore) can put them where the enqueue functions never would.
    client
        .batch_execute(
            r#"INSERT INTO outbox.events (company_id, payload, created_at) VALUES
                 (1, '{"companyId": 1, "paymentId": 1, "paymentNumber": "1"}', '-infinity'),
                 (1, '{"companyId": 1, "paymentId": 2, "paymentNumber": "2"}', 'infinity');
               SELECT outbox.enqueue_payment_cancellation(1, g, 'P' || g) FROM generate_series(3, 5) g;"#,
        )
        .await
        .unwrap();
    let daemon = Daemon::start(&db, QUICK).await;
    eventually("all five delivered", SECS(15), || async {
        delivered(&client).await == 5
    })
    .await;
    assert_eq!(receiver.received().len(), 5);
    assert!(
        !daemon.log().iter().any(|l| l.contains("claim failed")),
        "every claim worked"
    );
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
}

/// Issue 14.4: a row at the schema's bound on attempts (1000000, only
/// written by hand) cannot be claimed once more; before, the claim's `+ 1`
/// failed the check and with it every claim while the row was due. It now
/// fails unsent with the reason, through the plain claim and the fair one
/// (taken while another endpoint's held rows at the head of the queue are
/// too many to step over), and the rest is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_at_the_attempts_limit_fails_alone_and_the_queue_flows() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    for company in 1..=3 {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    // At the front of the queue: due before everything else.
    let worn_out = |company: i64| {
        format!(
            r#"INSERT INTO outbox.events (company_id, payload, attempts, next_attempt_at)
               VALUES ({company}, '{{"companyId": {company}, "paymentId": 1, "paymentNumber": "W"}}',
                       1000000, now() - interval '1 hour')
               RETURNING id"#
        )
    };
    let plain: uuid::Uuid = client.query_one(&worn_out(1), &[]).await.unwrap().get(0);
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, g, 'P' || g) FROM generate_series(2, 4) g",
        )
        .await
        .unwrap();
    let daemon = Daemon::start(&db, QUICK).await;
    eventually("the three good events delivered", SECS(15), || async {
        delivered(&client).await == 3
    })
    .await;
    let (state, attempts, text, _, _) = outcome_of(&client, plain).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1_000_000));
    assert!(text.contains("attempts is at its limit"), "{text}");

    // The fair claim: company 3 is paused with 5,100 due events at the
    // head of the queue, more than the plain claim steps over (5,000), so the
    // instance takes the fair claim a second at a time; the plain claim in
    // between reads only company 3's rows, and the worn-out row of
    // company 2 behind them is met by the fair claims.
    let fair: uuid::Uuid = client
        .query_one(
            &format!(
                "WITH paused AS (
                     SELECT outbox.pause_endpoint(3)
                 ), held AS (
                     INSERT INTO outbox.events (company_id, payload, next_attempt_at)
                     SELECT 3, jsonb_build_object('companyId', 3, 'paymentId', g, 'paymentNumber', g::text),
                            now() - interval '2 hours'
                       FROM generate_series(1, 5100) g
                 ), good AS (
                     SELECT outbox.enqueue_payment_cancellation(2, 9, 'P9')
                 ), worn AS ({})
                 SELECT id FROM worn, good, paused",
                worn_out(2)
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eventually(
        "the fair claim's good event delivered",
        SECS(15),
        || async { delivered(&client).await == 4 },
    )
    .await;
    let (state, attempts, text, _, _) = outcome_of(&client, fair).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1_000_000));
    assert!(text.contains("attempts is at its limit"), "{text}");
    assert_eq!(
        receiver.received().len(),
        4,
        "neither worn-out row was sent"
    );
    let log = daemon.log();
    let fair_from = log
        .iter()
        .position(|l| l.contains("claim mode: fair for a while"))
        .expect("the fair claim was taken");
    assert!(
        log[fair_from..]
            .iter()
            .any(|l| l.contains("attempts are at the schema's limit")),
        "the second worn-out row was met by the fair claim"
    );
    assert!(
        !daemon.log().iter().any(|l| l.contains("claim failed")),
        "every claim worked"
    );
    assert_eq!(
        daemon
            .log()
            .iter()
            .filter(|l| l.contains("attempts are at the schema's limit"))
            .count(),
        2
    );
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn hand_written_counts_at_the_integer_limits_cannot_stop_the_claims() {
    // outbox.events has no CHECK constraints (migration 0009: each cost
    // every enqueue), so a row written by hand may carry any count. None
    // may make a claim statement overflow: that would stop every claim
    // for as long as the row is due.
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 1, "payment.cancellation", &receiver.url("/")).await;
    let row = |attempts: &str, at_replay: &str| {
        format!(
            r#"INSERT INTO outbox.events (company_id, payload, attempts, attempts_at_replay, next_attempt_at)
               VALUES (1, '{{"companyId": 1, "paymentId": 1, "paymentNumber": "H"}}',
                       {attempts}, {at_replay}, now() - interval '1 hour')
               RETURNING id"#
        )
    };
    let at_limit: uuid::Uuid = client
        .query_one(&row("2147483647", "0"), &[])
        .await
        .unwrap()
        .get(0);
    let replay_below: uuid::Uuid = client
        .query_one(&row("5", "-2147483648"), &[])
        .await
        .unwrap()
        .get(0);
    let negative: uuid::Uuid = client.query_one(&row("-7", "0"), &[]).await.unwrap().get(0);
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(1, 2, 'GOOD')",
            &[],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(&db, QUICK).await;
    for (id, what) in [
        (at_limit, "attempts at the integer limit"),
        (replay_below, "attempts_at_replay at its lowest"),
        (negative, "negative attempts"),
    ] {
        wait_final(&client, id, what).await;
    }
    crate::harness::eventually_count(
        &client,
        "the good event delivered",
        SECS(15),
        "SELECT count(*) FROM outbox.events WHERE payload->>'paymentNumber' = 'GOOD' AND state = 'delivered'",
        1,
    )
    .await;
    let (state, attempts, text, _, _) = outcome_of(&client, at_limit).await;
    assert_eq!((state.as_str(), attempts), ("failed", i32::MAX));
    assert!(text.contains("attempts is at its limit"), "{text}");
    // Its retry budget reads as spent, not as an overflow.
    let (state, _, text, _, _) = outcome_of(&client, replay_below).await;
    assert_eq!(state, "failed", "{text}");
    assert!(text.contains("gave up"), "{text}");
    assert_eq!(outcome_of(&client, negative).await.0, "delivered");
    assert!(
        !daemon.log().iter().any(|l| l.contains("claim failed")),
        "every claim worked"
    );
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
}

// ---------------------------------------------------------------------------
// Outcomes whose texts the database cannot store (issue 14, point 5)
// ---------------------------------------------------------------------------

/// Stages a text the database refuses whatever its encoding: a trigger on
/// outbox.attempts raises 22P05 for a message with POISON in it. With
/// `cut_once`, the second such write (the one-by-one one after its group was
/// refused) loses its connection first, as in a database restart: the
/// trigger terminates its own backend (a sequence counts, since it is not
/// rolled back with the statement).
pub(crate) async fn refuse_poison(client: &Client, cut_once: bool) {
    let cut = if cut_once {
        "IF nextval('public.poison_seen') = 2 THEN
             PERFORM pg_terminate_backend(pg_backend_pid());
             PERFORM pg_sleep(5);
         END IF;"
    } else {
        ""
    };
    client
        .batch_execute(&format!(
            "CREATE SEQUENCE public.poison_seen;
             CREATE FUNCTION public.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.message LIKE '%POISON%' THEN
                     {cut}
                     RAISE EXCEPTION 'staged: this text cannot be stored' USING ERRCODE = '22P05';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_poison BEFORE INSERT ON outbox.attempts
                 FOR EACH ROW EXECUTE FUNCTION public.refuse_poison();"
        ))
        .await
        .unwrap();
}

/// A receiver that answers each payment with the status and message the
/// test gives for its paymentNumber.
async fn answering(answers: &'static [(&'static str, &'static str, &'static str)]) -> Receiver {
    Receiver::start(move |req, _| {
        let number = req.json()["paymentNumber"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let (_, status, message) = answers
            .iter()
            .find(|(n, _, _)| *n == number)
            .copied()
            .unwrap_or(("", "1", "ok"));
        Reply::Json(200, json!({"status": status, "message": message}))
    })
    .await
}

async fn event_texts(
    client: &Client,
    number: &str,
) -> (String, Option<String>, Option<String>, Option<String>) {
    let row = client
        .query_one(
            "SELECT e.state, e.response_message, e.last_error,
                    (SELECT a.message FROM outbox.attempts a WHERE a.event_id = e.id)
               FROM outbox.events e WHERE e.payload->>'paymentNumber' = $1",
            &[&number],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// In a LATIN1 database, a receiver's message with characters LATIN1 lacks
/// is stored with them escaped, and the event keeps its real outcome. Before,
/// the server refused the text (22P05) and the fallback marked the
/// delivered event failed ("could not record the outcome").
#[tokio::test(flavor = "multi_thread")]
async fn in_a_latin1_database_a_message_it_cannot_hold_is_stored_escaped_and_the_outcome_kept() {
    let db = TestDb::new_in_encoding("LATIN1").await;
    let client = db.client().await;
    static ANSWERS: &[(&str, &str, &str)] = &[
        ("EURO", "1", "Zahlung über 50 € storniert ✓"),
        ("CAFE", "1", "café storniert"),
        ("TOKYO", "0", "東京: already settled"),
    ];
    let receiver = answering(ANSWERS).await;
    endpoint(&client, 1, "payment.cancellation", &receiver.url("/")).await;
    let daemon = Daemon::start(&db, QUICK).await;
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, 1, 'EURO');
             SELECT outbox.enqueue_payment_cancellation(1, 2, 'CAFE');
             SELECT outbox.enqueue_payment_cancellation(1, 3, 'TOKYO');",
        )
        .await
        .unwrap();
    eventually_count(
        &client,
        "all three in a final state",
        SECS(15),
        "SELECT count(*) FROM outbox.events WHERE state IN ('delivered', 'failed')",
        3,
    )
    .await;
    let euro = event_texts(&client, "EURO").await;
    assert_eq!(euro.0, "delivered");
    let stored = "Zahlung über 50 \\u{20ac} storniert \\u{2713}";
    assert_eq!(euro.1.as_deref(), Some(stored));
    assert_eq!(euro.3.as_deref(), Some(stored), "the attempt row");
    let cafe = event_texts(&client, "CAFE").await;
    assert_eq!(
        (cafe.0.as_str(), cafe.1.as_deref()),
        ("delivered", Some("café storniert"))
    );
    let tokyo = event_texts(&client, "TOKYO").await;
    assert_eq!(tokyo.0, "failed", "rejected, as the receiver said");
    assert_eq!(
        tokyo.1.as_deref(),
        Some("\\u{6771}\\u{4eac}: already settled")
    );
    assert!(
        !daemon.log().iter().any(|l| l.contains("refused")),
        "no write was refused"
    );
    assert!(
        daemon
            .log()
            .iter()
            .any(|l| l.contains("encoding cannot store every character") && l.contains("LATIN1")),
        "the encoding is checked at start"
    );
    assert_eq!(receiver.received().len(), 3, "each sent once");
    assert!(daemon.stop().await.success());

    let check = crate::harness::run(db.outboxd().arg("check")).await;
    assert!(check.stdout.contains("encoding LATIN1"), "{check:?}");
}

/// When the database refuses one outcome's text whatever its encoding
/// (staged: a trigger on outbox.attempts raises 22P05 for a message with
/// POISON in it), and the connection is lost while that outcome is written
/// on its own (the trigger terminates its own backend once), the outcome is
/// written again after the loss, and then without its texts: the delivered
/// event stays delivered. Before, the lost connection made the fallback
/// mark it failed.
#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_whose_text_is_refused_keeps_its_state_through_a_lost_connection() {
    let db = TestDb::new().await;
    let client = db.client().await;
    refuse_poison(&client, true).await;
    static ANSWERS: &[(&str, &str, &str)] = &[("P", "1", "POISON accepted")];
    let receiver = answering(ANSWERS).await;
    endpoint(&client, 1, "payment.cancellation", &receiver.url("/")).await;
    let daemon = Daemon::start(&db, QUICK).await;
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, g, 'G' || g) FROM generate_series(1, 3) g;
             SELECT outbox.enqueue_payment_cancellation(1, 9, 'P');",
        )
        .await
        .unwrap();
    eventually_count(
        &client,
        "all four in a final state",
        SECS(20),
        "SELECT count(*) FROM outbox.events WHERE state IN ('delivered', 'failed')",
        4,
    )
    .await;
    let poisoned = event_texts(&client, "P").await;
    assert_eq!(poisoned.0, "delivered", "{poisoned:?}");
    assert_eq!(poisoned.1, None, "the refused message is not stored");
    let note = poisoned.2.unwrap_or_default();
    assert!(
        note.starts_with("(not stored: the database refused the text:") && note.contains("staged"),
        "{note}"
    );
    assert_eq!(
        poisoned.3.as_deref(),
        Some(note.as_str()),
        "the attempt row"
    );
    for g in 1..=3 {
        assert_eq!(event_texts(&client, &format!("G{g}")).await.0, "delivered");
    }
    let seen = count(&client, "SELECT last_value FROM public.poison_seen").await;
    assert!(seen >= 3, "refused, lost, refused again: {seen}");
    assert!(
        daemon
            .log()
            .iter()
            .any(|l| l.contains("recording failed; will retry")),
        "the lost connection was retried"
    );
    assert_eq!(receiver.received().len(), 4, "each sent once");
    assert_no_panic(&daemon);
    assert!(daemon.stop().await.success());
}

/// Issue 14.7, staged for real: the daemon is killed (SIGKILL) mid-delivery
/// twice, each time while the receiver holds the request, so both attempts'
/// leases run out with no outcome; with `retry.max_attempts = 2` the next
/// claim fails the event, and since real requests were made its company is
/// told (a notification is queued). Before, no notification was written.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_whose_daemon_died_mid_delivery_every_time_fails_and_its_company_is_told() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|_, _| Reply::Hang).await;
    endpoint(&client, 1, "payment.cancellation", &receiver.url("/")).await;
    // A request timeout long enough that the kill comes first, and the
    // shortest lease it allows (2 x 3 s + 10 s).
    let env = quick(&[
        ("OUTBOXD_DELIVERY__REQUEST_TIMEOUT", "3s"),
        ("OUTBOXD_DELIVERY__LEASE", "16s"),
        ("OUTBOXD_RETRY__MAX_ATTEMPTS", "2"),
    ]);
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(1, 1, 'DIES')",
            &[],
        )
        .await
        .unwrap();
    for attempt in 1..=2 {
        let mut daemon = Daemon::start(&db, &env).await;
        receiver.wait_for(attempt, SECS(40)).await;
        daemon.signal(libc::SIGKILL);
        daemon.wait(SECS(5)).await;
    }
    let daemon = Daemon::start(&db, &env).await;
    eventually("the event failed", SECS(40), || async {
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE state = 'failed'",
        )
        .await
            == 1
    })
    .await;
    let row = client
        .query_one(
            "SELECT e.attempts, e.last_error,
                    (SELECT count(*) FROM outbox.notifications n WHERE n.event_id = e.id)
               FROM outbox.events e",
            &[],
        )
        .await
        .unwrap();
    let (attempts, error, notified): (i32, String, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        attempts, 3,
        "two claims that died, and the one that gave up"
    );
    assert!(
        error.contains("gave up after 2 attempts without a recorded outcome (leases ran out)"),
        "{error}"
    );
    assert_eq!(notified, 1, "the company is told");
    assert_eq!(receiver.received().len(), 2, "no third request");
    assert!(daemon.stop().await.success());
}
