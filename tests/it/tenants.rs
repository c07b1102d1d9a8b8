//! Many tenants, one queue: what one company's endpoint can and cannot do to
//! the others. Real daemons, real receivers on 127.0.0.1, one endpoint per
//! receiver.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

use crate::harness::{Daemon, TestDb, count, eventually, eventually_count};
use crate::receiver::{Received, Receiver, Reply};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

pub(crate) async fn endpoint(client: &Client, company: i64, url: &str, max_in_flight: Option<i32>) {
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url, notify_emails, max_in_flight)
             VALUES ($1, $2, ARRAY['ops@example.com'], $3)",
            &[&company, &url, &max_in_flight],
        )
        .await
        .unwrap();
}

/// `n` events of `company`, in one transaction.
pub(crate) async fn enqueue(client: &Client, company: i64, n: i64) {
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation($1, g, 'P' || g) FROM generate_series(1, $2::bigint) g",
            &[&company, &n],
        )
        .await
        .unwrap();
}

pub(crate) fn ok() -> Reply {
    Reply::Json(200, json!({"status": "1", "message": "ok"}))
}

/// A receiver that answers its first `failing` requests 503, then success.
async fn down_for(failing: u32) -> Receiver {
    let seen = Arc::new(AtomicU32::new(0));
    Receiver::start(move |_, _| {
        if seen.fetch_add(1, Ordering::SeqCst) < failing {
            Reply::Json(503, json!({"status": "0", "message": "down"}))
        } else {
            ok()
        }
    })
    .await
}

/// The most requests that were in flight at once, for a receiver that
/// answers each after exactly `hold`: a request is still in flight when
/// another arrives less than `hold` after it. The answer to one and the
/// next request are never closer than a record and a claim, so a small
/// margin keeps back-to-back requests apart.
pub(crate) fn max_in_flight(requests: &[Received], hold: Duration) -> usize {
    let window = hold - MS(50);
    requests
        .iter()
        .map(|r| {
            requests
                .iter()
                .filter(|o| o.at <= r.at && r.at.duration_since(o.at) < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Waits until `n` events are delivered.
async fn all_delivered(client: &Client, n: i64, timeout: Duration) {
    eventually_count(
        client,
        "all delivered",
        timeout,
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        n,
    )
    .await
}

async fn circuit(client: &Client, company: i64) -> Option<(String, i32)> {
    client
        .query_opt(
            "SELECT state, failures FROM outbox.endpoint_circuits WHERE company_id = $1",
            &[&company],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

#[tokio::test]
async fn a_slow_endpoint_holds_only_its_cap_and_the_other_companies_flow() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let slow = Receiver::start(|_, _| Reply::Delayed(SECS(3), Box::new(ok()))).await;
    let fast = Receiver::ok().await;
    endpoint(&client, 1, &slow.url("/slow"), None).await;
    for company in 2..=6 {
        endpoint(&client, company, &fast.url("/fast"), None).await;
    }
    enqueue(&client, 1, 40).await;
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_DELIVERY__CONCURRENCY", "16"),
            ("OUTBOXD_DELIVERY__ENDPOINT_CONCURRENCY", "4"),
        ],
    )
    .await;
    // Company 1 fills its cap of the 16 slots, and stays there.
    slow.wait_for(4, SECS(10)).await;
    let enqueued = Instant::now();
    for company in 2..=6 {
        enqueue(&client, company, 5).await;
    }
    let arrived = fast.wait_for(25, SECS(10)).await;
    let last = arrived.iter().map(|r| r.at).max().unwrap();
    assert!(
        last.duration_since(enqueued) < SECS(2),
        "the other companies waited {:?} behind a slow one",
        last.duration_since(enqueued)
    );
    // Meanwhile the slow endpoint never had more than its cap in flight,
    // and its events are still waiting their turn, not failed.
    tokio::time::sleep(SECS(4)).await;
    let slow_requests = slow.received();
    assert_eq!(max_in_flight(&slow_requests, SECS(3)), 4);
    assert!(
        slow_requests.len() <= 12,
        "{} requests",
        slow_requests.len()
    );
    let waiting = count(
        &client,
        "SELECT count(*) FROM outbox.events WHERE company_id = 1 AND state = 'pending' AND attempts = 0",
    )
    .await;
    assert!(
        waiting >= 28,
        "{waiting} of company 1's events still untried"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn an_endpoint_may_set_its_own_cap() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let slow = Receiver::start(|_, _| Reply::Delayed(SECS(2), Box::new(ok()))).await;
    endpoint(&client, 1, &slow.url("/slow"), Some(2)).await;
    enqueue(&client, 1, 6).await;
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__ENDPOINT_CONCURRENCY", "8")]).await;
    let all = slow.wait_for(6, SECS(15)).await;
    assert_eq!(max_in_flight(&all, SECS(2)), 2);
    all_delivered(&client, 6, SECS(10)).await;
    daemon.stop().await;
}

#[tokio::test]
async fn each_instance_keeps_the_cap_so_two_put_at_most_twice_it_in_flight() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let hold = Duration::from_millis(1500);
    let slow = Receiver::start(move |_, _| Reply::Delayed(hold, Box::new(ok()))).await;
    endpoint(&client, 1, &slow.url("/slow"), None).await;
    enqueue(&client, 1, 24).await;
    let settings = [
        ("OUTBOXD_DELIVERY__ENDPOINT_CONCURRENCY", "3"),
        ("OUTBOXD_DELIVERY__POLL_INTERVAL", "200ms"),
    ];
    let a = Daemon::start(&db, &settings).await;
    let b = Daemon::start(&db, &settings).await;
    let all = slow.wait_for(24, SECS(30)).await;
    // Documented: the cap is per instance, so two instances have at most
    // twice it in flight to one endpoint; and both do deliver to it.
    let peak = max_in_flight(&all, hold);
    assert!((4..=6).contains(&peak), "peak {peak}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_burst_of_one_company_does_not_queue_another_company_behind_it() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 1, &receiver.url("/burst"), None).await;
    endpoint(&client, 2, &receiver.url("/single"), None).await;
    // Payments 1-300 one transaction each, so each has its own enqueue
    // time; then 2,700 more in one.
    for payment in 1..=300_i64 {
        client
            .execute(
                "SELECT outbox.enqueue_payment_cancellation(1, $1, 'P')",
                &[&payment],
            )
            .await
            .unwrap();
    }
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(1, g, 'P') FROM generate_series(301, 3000) g",
            &[],
        )
        .await
        .unwrap();
    enqueue(&client, 2, 1).await;
    let daemon = Daemon::start(&db, &[]).await;
    // The first 400 requests tell: the other company's event and the 300
    // that were enqueued one by one are among them. (All 3,000 at the cap
    // of 8 would take the suite's whole time budget under load.)
    let all = receiver.wait_for(400, SECS(60)).await;
    let position = all.iter().position(|r| r.path == "/single").unwrap();
    // Oldest first it would come last, after all 3,000; taking companies
    // in turn, it goes out with the first batch.
    assert!(position < 64, "company 2's event was request {position}");
    // Within company 1, oldest first still holds: the payments enqueued one
    // by one arrive in that order, apart from the 8 in flight together.
    let numbers: Vec<i64> = all
        .iter()
        .filter(|r| r.path == "/burst")
        .map(|r| r.json()["paymentId"].as_i64().unwrap())
        .filter(|&p| p <= 300)
        .collect();
    assert_eq!(numbers.len(), 300);
    let out_of_order = numbers.windows(2).filter(|w| w[1] + 8 < w[0]).count();
    assert_eq!(
        out_of_order, 0,
        "company 1's events out of order: {numbers:?}"
    );
    daemon.stop().await;
}

/// Fast settings for circuit tests: retries after 100 ms, a circuit that
/// opens after 3 failures and probes after `cooldown`.
fn circuit_settings(cooldown: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("OUTBOXD_RETRY__BASE_DELAY", "100ms"),
        ("OUTBOXD_RETRY__JITTER", "0"),
        ("OUTBOXD_DELIVERY__POLL_INTERVAL", "100ms"),
        ("OUTBOXD_DELIVERY__ENDPOINT_CONCURRENCY", "1"),
        ("OUTBOXD_CIRCUIT__OPEN_AFTER", "3"),
        ("OUTBOXD_CIRCUIT__COOLDOWN", cooldown),
        ("OUTBOXD_CIRCUIT__MAX_COOLDOWN", "1h"),
    ]
}

#[tokio::test]
async fn the_circuit_opens_after_failures_in_a_row_probes_and_closes() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Requests 1-4 fail with 503 (the 4th is the first probe), then all
    // succeed.
    let receiver = down_for(4).await;
    endpoint(&client, 1, &receiver.url("/erp"), None).await;
    enqueue(&client, 1, 10).await;
    let daemon = Daemon::start(&db, &circuit_settings("1s")).await;

    let first = receiver.wait_for(3, SECS(10)).await;
    eventually("the circuit to open", SECS(5), || async {
        circuit(&client, 1).await.is_some_and(|(s, _)| s == "open")
    })
    .await;
    let all = receiver.wait_for(14, SECS(20)).await;
    all_delivered(&client, 10, SECS(10)).await;
    // Open: nothing for the cool-down (1 s), then one probe, which fails;
    // open again for twice as long, then the probe that closes it.
    let gap = |i: usize| all[i].at.duration_since(all[i - 1].at);
    assert!(gap(3) >= MS(950), "first probe after {:?}", gap(3));
    assert!(gap(4) >= MS(1950), "second probe after {:?}", gap(4));
    assert!(first.len() >= 3);
    assert_eq!(circuit(&client, 1).await, Some(("closed".into(), 0)));
    // 4 failed attempts and 10 deliveries: the events held while the
    // circuit was open were not attempted.
    let attempts = count(&client, "SELECT sum(attempts) FROM outbox.events").await;
    assert_eq!(attempts, 14);
    let failed = count(
        &client,
        "SELECT count(*) FROM outbox.attempts WHERE outcome = 'retryable'",
    )
    .await;
    assert_eq!(failed, 4);
    let log = daemon.log().join("\n");
    assert!(log.contains("circuit open"), "{log}");
    assert!(log.contains("circuit closed"), "{log}");
    daemon.stop().await;
}

/// An answer that is not a success (here a 400 to the probe) says the
/// endpoint is up but not that it works: its circuit does not close as if
/// the endpoint had recovered. It says nothing of the endpoint either, so
/// the next event is the next probe at once, instead of the circuit
/// waiting half-open for the probe's lease. (Before, any HTTP answer
/// closed it, and the held events poured out.)
#[tokio::test]
async fn a_400_to_the_probe_does_not_close_the_circuit() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let seen = Arc::new(AtomicU32::new(0));
    let receiver = Receiver::start(move |_, _| {
        if seen.fetch_add(1, Ordering::SeqCst) < 3 {
            Reply::Json(503, json!({"status": "0", "message": "down"}))
        } else {
            Reply::Json(400, json!({"message": "unknown field"}))
        }
    })
    .await;
    endpoint(&client, 1, &receiver.url("/erp"), None).await;
    enqueue(&client, 1, 5).await;
    let daemon = Daemon::start(&db, &circuit_settings("200ms")).await;
    // Three 503s open it; then probes, each answered 400, one after the
    // other (the default lease is 60 s: no waiting for it).
    receiver.wait_for(5, SECS(10)).await;
    eventually_count(
        &client,
        "two probes answered 400 and their events failed",
        SECS(10),
        "SELECT least(count(*), 2) FROM outbox.events WHERE state = 'failed'",
        2,
    )
    .await;
    let (state, _) = circuit(&client, 1).await.expect("a circuit row");
    assert_ne!(state, "closed", "a 400 closed the circuit");
    let log = daemon.log().join("\n");
    assert!(!log.contains("circuit closed"), "{log}");
    daemon.stop().await;
}

/// Only its probe moves a circuit that is not closed: a delivery claimed
/// before the circuit opened, timing out late while the probe is out, does
/// not reopen it as a failed probe would (twice the cool-down, the probe's
/// own answer then ignored). (Before, it did.)
#[tokio::test]
async fn a_late_outcome_from_before_the_circuit_opened_does_not_move_it() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 1, &receiver.url("/erp"), None).await;
    enqueue(&client, 1, 2).await;
    // The first event was claimed (attempt 1) while the circuit was closed
    // and clean; the circuit has since opened and is half-open, its probe
    // out (the second event). The first event's late timeout comes in.
    client
        .batch_execute(
            "UPDATE outbox.events SET state = 'leased', attempts = 1, lease_owner = 'late',
                    next_attempt_at = now() + interval '1 minute';
             INSERT INTO outbox.endpoint_circuits
                    (company_id, event_type, state, failures, opened_at, retry_at, cooldown_ms)
             VALUES (1, 'payment.cancellation', 'half_open', 5, now(), now() + interval '1 minute', 30000);",
        )
        .await
        .unwrap();
    let ids: Vec<uuid::Uuid> = client
        .query("SELECT id FROM outbox.events ORDER BY created_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pool = db.pool();
    let pooled = pool.get().await.unwrap();
    let late = outboxd::model::Outcome {
        event_id: ids[0],
        company_id: 1,
        event_type: "payment.cancellation".into(),
        age: SECS(1),
        attempt: 1,
        next: outboxd::model::NextState::Retry(SECS(5)),
        kind: outboxd::model::AttemptKind::Retryable,
        response_message: None,
        error: Some("timed out after 10s".into()),
        started_at: std::time::SystemTime::now(),
        duration: SECS(10),
        http_status: None,
        notify: false,
        pause: None,
        circuit_dirty: false,
        probe: false,
    };
    let written = outboxd::store::record::write(
        &pooled,
        "late",
        &[late],
        false,
        &outboxd::config::CircuitConfig::default(),
        SECS(900),
    )
    .await
    .unwrap();
    assert_eq!(written.marked, [ids[0]]);
    assert_eq!(circuit(&client, 1).await.unwrap().0, "half_open");
}

#[tokio::test]
async fn retry_after_pauses_the_whole_endpoint_and_not_the_others() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let seen = Arc::new(AtomicU32::new(0));
    let counter = seen.clone();
    let limited = Receiver::start(move |_, _| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::Raw {
                status: 429,
                headers: vec![("Retry-After".into(), "2".into())],
                body: b"slow down".to_vec(),
            }
        } else {
            ok()
        }
    })
    .await;
    let other = Receiver::ok().await;
    endpoint(&client, 1, &limited.url("/limited"), Some(1)).await;
    endpoint(&client, 2, &other.url("/other"), None).await;
    enqueue(&client, 1, 5).await;
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__POLL_INTERVAL", "100ms")]).await;
    limited.wait_for(1, SECS(10)).await;
    let paused_at = Instant::now();
    enqueue(&client, 2, 3).await;
    let others = other.wait_for(3, SECS(5)).await;
    assert!(
        others
            .iter()
            .all(|r| r.at.duration_since(paused_at) < SECS(1)),
        "another company waited for a pause that was not its own"
    );
    let all = limited.wait_for(6, SECS(15)).await;
    // The 429 named 2 s: no other event of that endpoint went out before.
    let gap = all[1].at.duration_since(all[0].at);
    assert!(gap >= MS(1950), "next request after {gap:?}");
    all_delivered(&client, 8, SECS(10)).await;
    daemon.stop().await;
}

#[tokio::test]
async fn an_endpoint_that_never_answers_gets_one_probe_per_cooldown_and_its_events_fail_after_max_hold()
 {
    let db = TestDb::new().await;
    let client = db.client().await;
    let dead = Receiver::start(|_, _| Reply::Hang).await;
    endpoint(&client, 1, &dead.url("/dead"), None).await;
    enqueue(&client, 1, 20).await;
    let mut settings = circuit_settings("2s");
    settings.extend([
        ("OUTBOXD_DELIVERY__CONNECT_TIMEOUT", "300ms"),
        ("OUTBOXD_DELIVERY__REQUEST_TIMEOUT", "300ms"),
        ("OUTBOXD_DELIVERY__LEASE", "20s"),
        ("OUTBOXD_CIRCUIT__MAX_HOLD", "5s"),
    ]);
    let daemon = Daemon::start(&db, &settings).await;
    eventually("the circuit to open", SECS(10), || async {
        circuit(&client, 1).await.is_some_and(|(s, _)| s == "open")
    })
    .await;
    let at_open = dead.received().len();
    assert_eq!(
        at_open, 3,
        "three timeouts in a row open it, and nothing more went out"
    );
    // Open for 4.5 s: a probe after 2 s, the next 4 s after that.
    tokio::time::sleep(MS(4500)).await;
    let probes = dead.received().len() - at_open;
    assert_eq!(probes, 1, "probes in the first 4.5 s open");
    // Nothing waits for ever: every event, held or retried, is failed once
    // held 5 s past its due time, with the reason and a notification.
    eventually_count(
        &client,
        "every event failed",
        SECS(20),
        "SELECT count(*) FROM outbox.events WHERE state = 'failed' AND last_error LIKE 'held for more than 5s%'",
        20,
    )
    .await;
    let untried = count(
        &client,
        "SELECT count(*) FROM outbox.events WHERE state = 'failed' AND attempts = 0",
    )
    .await;
    assert!(untried >= 15, "{untried}");
    let notified = count(&client, "SELECT count(*) FROM outbox.notifications").await;
    assert!(notified >= untried, "{notified} notifications");
    daemon.stop().await;
}

/// A long outage with few held events, the usual case for cancellations:
/// each probe is one of them, and a failed probe does not spend its
/// event's retry budget. With `retry.max_attempts = 2` and a probe every
/// 100-200 ms for 4 s, the events are probed far more than twice, and still
/// fail only at `circuit.max_hold`, held, with that reason. (Before, each
/// probe counted as an attempt: they failed "after 2 attempts" within a
/// second, long before max_hold.)
#[tokio::test(flavor = "multi_thread")]
async fn failed_probes_spend_no_retries_and_held_events_fail_only_at_max_hold() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // A port nobody listens on: every request is refused at once.
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    endpoint(&client, 1, &format!("http://{refused}/erp"), None).await;
    enqueue(&client, 1, 2).await;
    let settings = [
        ("OUTBOXD_RETRY__BASE_DELAY", "100ms"),
        ("OUTBOXD_RETRY__JITTER", "0"),
        ("OUTBOXD_RETRY__MAX_ATTEMPTS", "2"),
        ("OUTBOXD_DELIVERY__POLL_INTERVAL", "100ms"),
        // One failure opens it: with two, the two first attempts' outcomes,
        // written in two groups on a loaded machine, left one event's retry
        // free to go out (and fail for good) before the second opened it.
        ("OUTBOXD_CIRCUIT__OPEN_AFTER", "1"),
        ("OUTBOXD_CIRCUIT__COOLDOWN", "100ms"),
        ("OUTBOXD_CIRCUIT__MAX_COOLDOWN", "200ms"),
        ("OUTBOXD_CIRCUIT__MAX_HOLD", "4s"),
    ];
    let started = Instant::now();
    let daemon = Daemon::start(&db, &settings).await;
    eventually_count(
        &client,
        "both failed",
        SECS(30),
        "SELECT count(*) FROM outbox.events WHERE state = 'failed'",
        2,
    )
    .await;
    assert!(started.elapsed() >= SECS(4), "failed before max_hold");
    let reasons: Vec<String> = client
        .query("SELECT last_error FROM outbox.events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for reason in &reasons {
        assert!(reason.starts_with("held for more than 4s"), "{reasons:?}");
    }
    let probes = count(
        &client,
        "SELECT count(*) FROM outbox.attempts WHERE message LIKE '%a probe of an endpoint found down%'",
    )
    .await;
    assert!(probes >= 4, "{probes} probes in 4 s");
    daemon.stop().await;
}

/// A probe refused before it is sent (here an event whose payload, written
/// around the enqueue functions, is not a webhook) says nothing of the
/// endpoint: its circuit is made ready for another probe at once, and the
/// next event goes out as the probe, closing the circuit. (Before, the
/// circuit stayed half-open with no probe out until the probe's lease ran
/// out: 60 s here.)
#[tokio::test]
async fn a_probe_refused_before_sending_makes_way_for_another_at_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 1, &receiver.url("/erp"), None).await;
    client
        .batch_execute(
            "INSERT INTO outbox.events (event_type, company_id, payload, next_attempt_at)
             VALUES ('payment.cancellation', 1, '[1, 2, 3]'::jsonb, now() - interval '1 minute');
             SELECT outbox.enqueue_payment_cancellation(1, 2, 'P2');
             INSERT INTO outbox.endpoint_circuits
                    (company_id, event_type, state, failures, opened_at, retry_at, cooldown_ms)
             VALUES (1, 'payment.cancellation', 'open', 5, now() - interval '1 minute',
                     now() - interval '1 second', 30000);",
        )
        .await
        .unwrap();
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__POLL_INTERVAL", "100ms")]).await;
    receiver.wait_for(1, SECS(10)).await;
    all_delivered(&client, 1, SECS(10)).await;
    let failed = count(
        &client,
        "SELECT count(*) FROM outbox.events WHERE state = 'failed' AND last_error LIKE 'invalid payload%'",
    )
    .await;
    assert_eq!(failed, 1, "the unsendable probe failed alone");
    eventually("the circuit to close", SECS(5), || async {
        circuit(&client, 1)
            .await
            .is_some_and(|(s, _)| s == "closed")
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_going_down_and_coming_back_sends_one_email_each_way() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Down for the first 5 requests (3 open the circuit, then two probes
    // fail), then back.
    let receiver = down_for(5).await;
    endpoint(&client, 6316, &receiver.url("/erp"), None).await;
    enqueue(&client, 6316, 12).await;
    let port = crate::smtp::free_port();
    let smtp = crate::smtp::SmtpServer::start(port, &[]).await;
    let mut env = crate::notify::smtp_env(port, &[]);
    env.extend(
        circuit_settings("200ms")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let daemon = crate::notify::start(&db, &env).await;
    all_delivered(&client, 12, SECS(30)).await;
    let mails = smtp.wait_for(2, SECS(20)).await;
    // The circuit opened, re-opened twice (failed probes: no email) and
    // closed: two emails, no digest (no event failed for good).
    tokio::time::sleep(SECS(1)).await;
    let mails_now = smtp.mails();
    assert_eq!(
        mails_now.len(),
        2,
        "{:?}",
        mails_now.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    let down = &mails[0];
    assert!(down.subject.contains("not reachable"), "{}", down.subject);
    let text = down.part("text/plain");
    assert!(text.contains(&receiver.url("/erp")), "{text}");
    assert!(text.contains("HTTP 503"), "{text}");
    assert!(text.contains("12 events"), "{text}");
    assert!(text.contains("What happens next"), "{text}");
    assert_eq!(down.rcpt_tos, ["ops@example.com"]);
    let back = &mails[1];
    assert!(back.subject.contains("resumed"), "{}", back.subject);
    let emails = count(
        &client,
        "SELECT count(*) FROM outbox.emails WHERE state = 'sent'",
    )
    .await;
    assert_eq!(emails, 2);
    daemon.stop().await;
}

#[tokio::test]
async fn an_operator_pauses_an_endpoint_sees_it_held_and_resets_it() {
    use crate::ops_cli::{expect, outboxd};
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 6316, &receiver.url("/erp"), None).await;
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__POLL_INTERVAL", "100ms")]).await;

    let paused = outboxd(&db, "endpoint pause --company 6316").await;
    expect(&paused, 0, &["paused the endpoint of company 6316"]);
    enqueue(&client, 6316, 3).await;
    // Held: the daemon polls ten times a second and sends nothing.
    tokio::time::sleep(SECS(1)).await;
    assert!(
        receiver.received().is_empty(),
        "a paused endpoint got requests"
    );
    let show = outboxd(&db, "endpoint show --company 6316").await;
    expect(
        &show,
        0,
        &["circuit: paused by an operator", "0 in flight, 3 waiting"],
    );
    // Held apart: its events are not what the paging age reads.
    client
        .batch_execute("UPDATE outbox.events SET created_at = now() - interval '1 hour'")
        .await
        .unwrap();
    let status = outboxd(&db, "status").await;
    expect(
        &status,
        0,
        &[
            "1 paused",
            "6316",
            "oldest due:  none (no event is due now)",
            "held:        3 events, the oldest due enqueued 1h",
        ],
    );
    let listed = outboxd(&db, "endpoint list").await;
    expect(&listed, 0, &["paused"]);
    let untried = count(
        &client,
        "SELECT count(*) FROM outbox.events WHERE attempts = 0",
    )
    .await;
    assert_eq!(untried, 3);

    let reset = outboxd(&db, "endpoint reset --company 6316").await;
    expect(&reset, 0, &["is closed (it was paused)"]);
    receiver.wait_for(3, SECS(5)).await;
    let status = outboxd(&db, "status").await;
    expect(&status, 0, &["0 paused"]);
    // An unknown endpoint is named, and nothing is paused.
    let unknown = outboxd(&db, "endpoint pause --company 7").await;
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(
        unknown.stderr.contains("no endpoint for company 7"),
        "{unknown:?}"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.endpoint_circuits WHERE manual"
        )
        .await,
        0
    );
    daemon.stop().await;
}

/// Claim rounds the daemon has made so far (every wake-up is followed by
/// a claim): to wait for a few of them rather than for a while.
async fn wakeups(daemon: &Daemon) -> f64 {
    let (_, body) = crate::harness::http_get(&format!("{}/metrics", daemon.admin)).await;
    crate::ops::samples(&body)
        .iter()
        .filter(|(k, _)| k.starts_with("outboxd_wakeups_total"))
        .map(|(_, v)| v)
        .sum()
}

/// Claims made by `daemon` with `statement` (plain or fair).
async fn claims(daemon: &Daemon, statement: &str) -> f64 {
    let (_, body) = crate::harness::http_get(&format!("{}/metrics", daemon.admin)).await;
    let key = format!("outboxd_claims_total{{statement=\"{statement}\"}}");
    *crate::ops::samples(&body)
        .get(&key)
        .unwrap_or_else(|| panic!("no {key} in the metrics"))
}

/// Issue 26: a paused company's 200 events at the head of the queue, more
/// than three claims of the daemon's 64 can take in, no longer send its
/// claim loop to the fair claim: the plain claim learns the company is
/// held and steps over its rows, and the 600 events of 60 other companies
/// behind them go out by the plain claim alone. (Before, more than a
/// quarter of a claim left behind meant the fair claim, at about twice the
/// plain claim's cost per event: docs/BENCHMARKS.md.)
#[tokio::test]
async fn a_paused_company_at_the_head_of_the_queue_is_stepped_over_by_the_plain_claim() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    for company in 1..=61 {
        endpoint(&client, company, &receiver.url("/erp"), None).await;
    }
    client
        .batch_execute("SELECT outbox.pause_endpoint(61)")
        .await
        .unwrap();
    enqueue(&client, 61, 200).await;
    for company in 1..=60 {
        enqueue(&client, company, 10).await;
    }

    let daemon = Daemon::start(&db, &[]).await;
    all_delivered(&client, 600, SECS(30)).await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE company_id = 61 AND state = 'pending' AND attempts = 0"
        )
        .await,
        200
    );
    assert!(claims(&daemon, "plain").await >= 1.0);
    assert_eq!(
        claims(&daemon, "fair").await,
        0.0,
        "one paused company sent the claim loop to the fair claim"
    );
}

/// The company pauses its own endpoint for its ERP's maintenance night,
/// from the settings screen, as the application's role with nothing but
/// EXECUTE on the two functions: its events are held (not attempted, not
/// failed, retries untouched) and go out when it resumes. Its resume does
/// not undo an operator's pause; a pause of an endpoint that does not
/// exist fails in the caller's transaction. (Before, the only switch was
/// `enabled = false`, which fails every event at once, with no email.)
#[tokio::test]
async fn a_company_pauses_its_endpoint_and_its_events_wait_until_it_resumes() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 6316, &receiver.url("/erp"), None).await;
    let app = format!("app_{}", db.name);
    client
        .batch_execute(&format!(
            "CREATE ROLE {app};
             GRANT USAGE ON SCHEMA outbox TO {app};
             GRANT EXECUTE ON FUNCTION outbox.pause_endpoint(bigint, text),
                                       outbox.resume_endpoint(bigint, text) TO {app};"
        ))
        .await
        .unwrap();
    let as_app = |sql: &str| format!("SET ROLE {app}; {sql}; RESET ROLE");
    client
        .batch_execute(&as_app("SELECT outbox.pause_endpoint(6316)"))
        .await
        .unwrap();
    let unknown = client
        .batch_execute(&as_app("SELECT outbox.pause_endpoint(4242)"))
        .await
        .unwrap_err();
    let unknown = outboxd::store::pool::describe(&unknown);
    assert!(
        unknown.contains("company 4242 has no endpoint"),
        "{unknown}"
    );
    client.batch_execute("RESET ROLE").await.unwrap();

    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__POLL_INTERVAL", "100ms")]).await;
    enqueue(&client, 6316, 3).await;
    let before = wakeups(&daemon).await;
    eventually("a few claim rounds", SECS(10), || async {
        wakeups(&daemon).await >= before + 5.0
    })
    .await;
    assert!(
        receiver.received().is_empty(),
        "a paused endpoint got requests"
    );
    let untried = count(
        &client,
        "SELECT count(*) FROM outbox.events WHERE attempts = 0 AND state = 'pending'",
    )
    .await;
    assert_eq!(untried, 3);
    let show = crate::ops_cli::outboxd(&db, "endpoint show --company 6316").await;
    crate::ops_cli::expect(&show, 0, &["circuit: paused by the company"]);

    client
        .batch_execute(&format!("SET ROLE {app}"))
        .await
        .unwrap();
    let resumed: bool = client
        .query_one("SELECT outbox.resume_endpoint(6316)", &[])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("RESET ROLE").await.unwrap();
    assert!(resumed);
    receiver.wait_for(3, SECS(10)).await;
    all_delivered(&client, 3, SECS(10)).await;

    // An operator's pause is not the company's to undo.
    crate::ops_cli::outboxd(&db, "endpoint pause --company 6316").await;
    client
        .batch_execute(&as_app("SELECT outbox.pause_endpoint(6316)"))
        .await
        .unwrap();
    client
        .batch_execute(&format!("SET ROLE {app}"))
        .await
        .unwrap();
    let resumed: bool = client
        .query_one("SELECT outbox.resume_endpoint(6316)", &[])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("RESET ROLE").await.unwrap();
    assert!(!resumed);
    assert_eq!(circuit(&client, 6316).await.unwrap().0, "open");
    daemon.stop().await;
    client
        .batch_execute(&format!("DROP OWNED BY {app}; DROP ROLE {app}"))
        .await
        .unwrap();
}

/// A pause the company forgets is still bounded by `circuit.max_hold`:
/// its events then fail, saying why, and the company is notified.
#[tokio::test]
async fn a_company_pause_left_on_fails_its_events_after_max_hold_with_the_reason() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 6316, &receiver.url("/erp"), None).await;
    client
        .batch_execute("SELECT outbox.pause_endpoint(6316)")
        .await
        .unwrap();
    enqueue(&client, 6316, 2).await;
    let daemon = Daemon::start(&db, &[("OUTBOXD_CIRCUIT__MAX_HOLD", "2s")]).await;
    eventually_count(
        &client,
        "both failed after max_hold",
        SECS(30),
        "SELECT count(*) FROM outbox.events WHERE state = 'failed' \
         AND last_error LIKE 'held for more than 2s: the endpoint is paused by the company'",
        2,
    )
    .await;
    assert!(receiver.received().is_empty());
    let notified = count(&client, "SELECT count(*) FROM outbox.notifications").await;
    assert_eq!(notified, 2);
    daemon.stop().await;
}
