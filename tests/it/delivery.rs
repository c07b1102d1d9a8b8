//! `outboxd run` against a real PostgreSQL and a real HTTP receiver on
//! 127.0.0.1: what arrives, how answers are judged, what the rows say.

use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use crate::harness::count;
use crate::harness::{Daemon, TestDb, eventually, eventually_count};
use crate::receiver::{Receiver, Reply};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Settings that keep retries fast in tests.
const FAST_RETRY: &[(&str, &str)] = &[
    ("OUTBOXD_RETRY__BASE_DELAY", "100ms"),
    ("OUTBOXD_RETRY__JITTER", "0"),
];

async fn set_endpoint(client: &Client, company: i64, url: &str, auth: &str) {
    let (auth_type, username, password, token) = match auth {
        "basic" => ("basic", Some("sales-app"), Some("basic-SECRET-pw"), None),
        "bearer" => ("bearer", None, None, Some("bearer-SECRET-token")),
        _ => ("none", None, None, None),
    };
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url, auth_type, username, password, token, notify_emails)
             VALUES ($1, $2, $3, $4, $5, $6, ARRAY['ops@example.com'])",
            &[&company, &url, &auth_type, &username, &password, &token],
        )
        .await
        .unwrap();
}

async fn enqueue(
    client: &Client,
    company: i64,
    payment: i64,
    number: &str,
    orders: Option<Vec<i64>>,
) -> uuid::Uuid {
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation($1, $2, $3, $4)",
            &[&company, &payment, &number, &orders],
        )
        .await
        .unwrap()
        .get(0)
}

/// (state, attempts, response_message, last_error) of an event.
async fn event_row(
    client: &Client,
    id: uuid::Uuid,
) -> (String, i32, Option<String>, Option<String>) {
    let row = client
        .query_one(
            "SELECT state, attempts, response_message, last_error FROM outbox.events WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

async fn wait_state(client: &Client, id: uuid::Uuid, state: &str, timeout: Duration) {
    eventually(&format!("event {id} to be {state}"), timeout, || async {
        event_row(client, id).await.0 == state
    })
    .await;
}

/// (attempt, http_status, outcome, message) per attempt row, in order.
async fn attempt_rows(
    client: &Client,
    id: uuid::Uuid,
) -> Vec<(i32, Option<i16>, String, Option<String>)> {
    client
        .query(
            "SELECT attempt, http_status, outcome, message FROM outbox.attempts WHERE event_id = $1 ORDER BY attempt",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn assert_no_secret(daemon: &Daemon) {
    for line in daemon.log() {
        assert!(!line.contains("SECRET"), "a secret reached the log: {line}");
        // base64 of "sales-app:basic-SECRET-pw" would give the password away too.
        assert!(
            !line.contains("c2FsZXMtYXBw"),
            "credentials reached the log: {line}"
        );
    }
}

async fn delivers_both_examples_with(auth: &str, want_authorization: &str) {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    set_endpoint(
        &client,
        6316,
        &receiver.url("/hooks/payment-cancelled"),
        auth,
    )
    .await;
    let daemon = Daemon::start(&db, &[]).await;

    let with_orders = enqueue(&client, 6316, 222125, "2271", Some(vec![17899, 17900])).await;
    let without = enqueue(&client, 6316, 222126, "2272", None).await;
    let got = receiver.wait_for(2, SECS(10)).await;

    let mut bodies: Vec<(String, String)> = got
        .iter()
        .map(|r| {
            assert_eq!(r.method, "POST");
            assert_eq!(r.path, "/hooks/payment-cancelled");
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert_eq!(
                r.header("authorization"),
                Some(want_authorization).filter(|a| !a.is_empty())
            );
            assert!(r.header("user-agent").unwrap().starts_with("outboxd/"));
            let key = r.header("idempotency-key").unwrap().to_string();
            assert_eq!(r.header("webhook-id"), Some(key.as_str()));
            (key, String::from_utf8(r.body.clone()).unwrap())
        })
        .collect();
    bodies.sort();
    let mut want = vec![
        (
            with_orders.to_string(),
            r#"{"companyId": 6316, "paymentId": 222125, "paymentNumber": "2271", "orderIds": "17899,17900"}"#.to_string(),
        ),
        (
            without.to_string(),
            r#"{"companyId": 6316, "paymentId": 222126, "paymentNumber": "2272"}"#.to_string(),
        ),
    ];
    want.sort();
    assert_eq!(bodies, want);

    for id in [with_orders, without] {
        wait_state(&client, id, "delivered", SECS(10)).await;
        let (_, attempts, message, error) = event_row(&client, id).await;
        assert_eq!(attempts, 1);
        assert_eq!(message.as_deref(), Some("received"));
        assert_eq!(error, None);
        let log = attempt_rows(&client, id).await;
        assert_eq!(
            log,
            vec![(
                1,
                Some(200),
                "success".to_string(),
                Some("received".to_string())
            )]
        );
    }
    assert_no_secret(&daemon);
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn both_examples_arrive_exactly_as_documented_with_basic_auth() {
    // base64("sales-app:basic-SECRET-pw")
    delivers_both_examples_with("basic", "Basic c2FsZXMtYXBwOmJhc2ljLVNFQ1JFVC1wdw==").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn both_examples_arrive_exactly_as_documented_with_bearer_auth() {
    delivers_both_examples_with("bearer", "Bearer bearer-SECRET-token").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_0_is_a_final_failure_with_the_message_stored() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|_, _| {
        Reply::Json(
            200,
            json!({"status": "0", "error": "Payment 2271 is already settled"}),
        )
    })
    .await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    let daemon = Daemon::start(&db, FAST_RETRY).await;
    let id = enqueue(&client, 6316, 222125, "2271", None).await;
    wait_state(&client, id, "failed", SECS(10)).await;
    let (_, attempts, message, error) = event_row(&client, id).await;
    assert_eq!(attempts, 1);
    assert_eq!(message.as_deref(), Some("Payment 2271 is already settled"));
    assert!(error.unwrap().contains("rejected"));
    let log = attempt_rows(&client, id).await;
    assert_eq!(log.len(), 1, "not retried: {log:?}");
    assert_eq!(log[0].2, "rejected");
    assert_eq!(log[0].3.as_deref(), Some("Payment 2271 is already settled"));
    daemon.stop().await;
}

/// A credentials rollover (401) and a route missing during the receiver's
/// deploy (404) are tried again, a few times: one event that meets them
/// twice is delivered on its third attempt; one that meets 404 every time
/// fails after three, saying what to check. (Before, every 4xx was final
/// at the first attempt.)
#[tokio::test(flavor = "multi_thread")]
async fn a_401_or_404_is_tried_a_few_times_before_failing() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|r, nth| {
        let payment = r.json()["paymentId"].as_i64().unwrap();
        match (payment, nth) {
            (1, 1) => Reply::Json(401, json!({"message": "token expired"})),
            (1, 2) => Reply::Json(404, json!({})),
            (1, _) => Reply::Json(200, json!({"status": "1", "message": "ok"})),
            _ => Reply::Json(404, json!({"message": "no such route"})),
        }
    })
    .await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    // retry.max_delay short: the minute between such tries shrinks to it.
    let mut env = FAST_RETRY.to_vec();
    env.push(("OUTBOXD_RETRY__MAX_DELAY", "200ms"));
    let daemon = Daemon::start(&db, &env).await;
    let recovers = enqueue(&client, 6316, 1, "1", None).await;
    let stays = enqueue(&client, 6316, 2, "2", None).await;
    wait_state(&client, recovers, "delivered", SECS(15)).await;
    wait_state(&client, stays, "failed", SECS(15)).await;
    let statuses = |log: Vec<(i32, Option<i16>, String, Option<String>)>| {
        log.iter().map(|l| (l.1, l.2.clone())).collect::<Vec<_>>()
    };
    assert_eq!(
        statuses(attempt_rows(&client, recovers).await),
        [
            (Some(401), "retryable".to_string()),
            (Some(404), "retryable".to_string()),
            (Some(200), "success".to_string())
        ]
    );
    let log = attempt_rows(&client, stays).await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[2].2, "permanent");
    let (_, _, message, error) = event_row(&client, stays).await;
    assert_eq!(message.as_deref(), Some("no such route"));
    assert_eq!(
        error.as_deref(),
        Some(
            "gave up after 3 attempts answered HTTP 404: check the endpoint's credentials and URL"
        )
    );
    daemon.stop().await;
}

/// What the README says of the delivery log line: one per attempt, at a
/// level that follows the next state, so that at the default level a
/// success leaves no line.
#[tokio::test(flavor = "multi_thread")]
async fn at_info_a_delivery_attempt_is_logged_unless_it_succeeded() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let flaky = Receiver::start(|_, nth| {
        if nth == 1 {
            Reply::Json(503, json!({"status": "0", "error": "busy"}))
        } else {
            Reply::Json(200, json!({"status": "1", "message": "ok"}))
        }
    })
    .await;
    let rejecting = Receiver::start(|_, _| {
        Reply::Json(200, json!({"status": "0", "error": "no such payment"}))
    })
    .await;
    set_endpoint(&client, 1, &flaky.url("/"), "none").await;
    set_endpoint(&client, 2, &rejecting.url("/"), "none").await;
    let mut env = FAST_RETRY.to_vec();
    env.push(("RUST_LOG", "info"));
    let daemon = Daemon::start(&db, &env).await;
    let retried = enqueue(&client, 1, 1, "1", None).await;
    let rejected = enqueue(&client, 2, 2, "2", None).await;
    wait_state(&client, retried, "delivered", SECS(10)).await;
    wait_state(&client, rejected, "failed", SECS(10)).await;
    let log = daemon.log();
    daemon.stop().await;
    let lines = |id: uuid::Uuid| -> Vec<String> {
        log.iter()
            .filter(|l| l.contains(" delivery ") && l.contains(&id.to_string()))
            .cloned()
            .collect()
    };
    let retried = lines(retried);
    assert_eq!(
        retried.len(),
        1,
        "the retry only, not the success: {retried:#?}"
    );
    assert!(
        retried[0].contains("INFO") && retried[0].contains("retry"),
        "{}",
        retried[0]
    );
    let rejected = lines(rejected);
    assert_eq!(rejected.len(), 1, "{rejected:#?}");
    assert!(
        rejected[0].contains("WARN") && rejected[0].contains("failed"),
        "{}",
        rejected[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_500_then_200_is_delivered_on_attempt_2() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|_, nth| {
        if nth == 1 {
            Reply::Json(500, json!({"status": "0", "error": "database is down"}))
        } else {
            Reply::Json(200, json!({"status": 1, "message": "ok now"}))
        }
    })
    .await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    let daemon = Daemon::start(&db, FAST_RETRY).await;
    let id = enqueue(&client, 6316, 222125, "2271", None).await;
    wait_state(&client, id, "delivered", SECS(10)).await;
    let (_, attempts, message, error) = event_row(&client, id).await;
    assert_eq!(
        (attempts, message.as_deref(), error),
        (2, Some("ok now"), None)
    );
    let log = attempt_rows(&client, id).await;
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0].0, log[0].1, log[0].2.as_str()),
        (1, Some(500), "retryable")
    );
    assert_eq!(log[0].3.as_deref(), Some("database is down"));
    assert_eq!(
        (log[1].0, log[1].1, log[1].2.as_str()),
        (2, Some(200), "success")
    );
    let got = receiver.received();
    assert_eq!(
        got[0].header("idempotency-key"),
        got[1].header("idempotency-key")
    );
    daemon.stop().await;
}

/// Issue 26: a retry set for later waits as `scheduled`, outside the
/// claim's index of pending rows (so the claim's skip scan does not walk
/// it, however many endpoints have one), and the claim moves it back to
/// `pending` when it comes due, and sends it.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_waits_as_scheduled_and_is_sent_when_it_comes_due() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|_, nth| {
        if nth == 1 {
            Reply::Json(503, json!({"status": "0", "error": "busy"}))
        } else {
            Reply::Json(200, json!({"status": 1, "message": "ok now"}))
        }
    })
    .await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_RETRY__BASE_DELAY", "3s"),
            ("OUTBOXD_RETRY__JITTER", "0"),
            ("OUTBOXD_DELIVERY__POLL_INTERVAL", "500ms"),
        ],
    )
    .await;
    let id = enqueue(&client, 6316, 222125, "2271", None).await;
    wait_state(&client, id, "scheduled", SECS(10)).await;
    let waits: f64 = client
        .query_one(
            "SELECT extract(epoch FROM next_attempt_at - now())::float8
               FROM outbox.events WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(waits > 1.0, "set for later: {waits} s");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE state = 'pending'"
        )
        .await,
        0,
        "nothing pending while the retry waits"
    );
    assert_eq!(receiver.received().len(), 1);
    wait_state(&client, id, "delivered", SECS(15)).await;
    let (_, attempts, message, _) = event_row(&client, id).await;
    assert_eq!((attempts, message.as_deref()), (2, Some("ok now")));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_with_retry_after_is_not_retried_sooner() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|_, nth| {
        if nth == 1 {
            Reply::Raw {
                status: 429,
                headers: vec![("retry-after".into(), "2".into())],
                body: b"slow down".to_vec(),
            }
        } else {
            Reply::Json(200, json!({"status": "1", "message": "ok"}))
        }
    })
    .await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    let daemon = Daemon::start(&db, FAST_RETRY).await;
    let id = enqueue(&client, 6316, 222125, "2271", None).await;
    let got = receiver.wait_for(2, SECS(15)).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= SECS(2),
        "retried after {gap:?}, before Retry-After's 2 s"
    );
    wait_state(&client, id, "delivered", SECS(10)).await;
    let log = attempt_rows(&client, id).await;
    assert_eq!(log[0].1, Some(429));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_never_answers_times_out_and_is_retried() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|_, nth| {
        if nth == 1 {
            Reply::Hang
        } else {
            Reply::Json(200, json!({"status": "1", "message": "ok"}))
        }
    })
    .await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    let mut env = FAST_RETRY.to_vec();
    env.extend([
        ("OUTBOXD_DELIVERY__REQUEST_TIMEOUT", "1s"),
        ("OUTBOXD_DELIVERY__CONNECT_TIMEOUT", "1s"),
        ("OUTBOXD_DELIVERY__LEASE", "12s"),
    ]);
    let daemon = Daemon::start(&db, &env).await;
    let id = enqueue(&client, 6316, 222125, "2271", None).await;
    wait_state(&client, id, "delivered", SECS(15)).await;
    let log = attempt_rows(&client, id).await;
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].1, log[0].2.as_str()), (None, "retryable"));
    assert!(
        log[0].3.as_deref().unwrap().contains("timed out after 1s"),
        "{log:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_html_and_oversized_answers_fail_for_good() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Company 1: 301. Company 2: 200 with HTML. Company 3: 200 with 10 MiB.
    let receiver = Receiver::start(|req, _| match req.path.as_str() {
        "/moved" => Reply::Raw {
            status: 301,
            headers: vec![("location".into(), "http://127.0.0.1:1/elsewhere".into())],
            body: Vec::new(),
        },
        "/html" => Reply::Raw {
            status: 200,
            headers: vec![("content-type".into(), "text/html".into())],
            body: b"<html><body>Thanks!</body></html>".to_vec(),
        },
        _ => Reply::Huge {
            status: 200,
            bytes: 10 * 1024 * 1024,
        },
    })
    .await;
    set_endpoint(&client, 1, &receiver.url("/moved"), "none").await;
    set_endpoint(&client, 2, &receiver.url("/html"), "none").await;
    set_endpoint(&client, 3, &receiver.url("/huge"), "none").await;
    let daemon = Daemon::start(&db, FAST_RETRY).await;
    let moved = enqueue(&client, 1, 1, "1", None).await;
    let html = enqueue(&client, 2, 2, "2", None).await;
    let huge = enqueue(&client, 3, 3, "3", None).await;
    for (id, status, want) in [
        (moved, 301, "redirects are not followed"),
        (html, 200, "not JSON"),
        (huge, 200, "size cap"),
    ] {
        wait_state(&client, id, "failed", SECS(15)).await;
        let (_, attempts, _, error) = event_row(&client, id).await;
        assert_eq!(attempts, 1, "{want}: permanent, not retried");
        let error = error.unwrap();
        assert!(error.contains(want), "{want}: {error}");
        let log = attempt_rows(&client, id).await;
        assert_eq!(
            (log[0].1, log[0].2.as_str()),
            (Some(status), "permanent"),
            "{want}"
        );
    }
    // What was seen is recorded: an excerpt of the HTML.
    assert!(
        event_row(&client, html)
            .await
            .3
            .unwrap()
            .contains("Thanks!")
    );
    // The 10 MiB answer did not hurt the daemon: it goes on delivering.
    let ok = Receiver::ok().await;
    set_endpoint(&client, 4, &ok.url("/"), "none").await;
    let after = enqueue(&client, 4, 4, "4", None).await;
    wait_state(&client, after, "delivered", SECS(10)).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_endpoint_disabled_endpoint_and_poison_rows_are_failed_with_the_reason() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    set_endpoint(&client, 2, &receiver.url("/"), "none").await;
    set_endpoint(&client, 3, &receiver.url("/"), "none").await;
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, event_type, url) VALUES (2, 'invoice.created', $1)",
            &[&receiver.url("/")],
        )
        .await
        .unwrap();
    client
        .batch_execute("UPDATE outbox.endpoints SET enabled = false WHERE company_id = 3")
        .await
        .unwrap();
    let daemon = Daemon::start(&db, FAST_RETRY).await;
    let no_endpoint = enqueue(&client, 1, 1, "1", None).await;
    let disabled = enqueue(&client, 3, 3, "3", None).await;
    // Written around the enqueue function, as a buggy writer might.
    let poison: uuid::Uuid = client
        .query_one(
            "INSERT INTO outbox.events (company_id, payload) VALUES (2, '{\"companyId\": 2}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let not_object: uuid::Uuid = client
        .query_one(
            "INSERT INTO outbox.events (company_id, event_type, payload) VALUES (2, 'invoice.created', '[1]') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let good = enqueue(&client, 2, 5, "5", None).await;
    for (id, outcome, want) in [
        (
            no_endpoint,
            "no_endpoint",
            "no endpoint configured for company 1",
        ),
        (disabled, "no_endpoint", "is disabled"),
        (poison, "permanent", "invalid payload"),
        (not_object, "permanent", "not a JSON object"),
    ] {
        wait_state(&client, id, "failed", SECS(10)).await;
        let error = event_row(&client, id).await.3.unwrap();
        assert!(error.contains(want), "{want}: {error}");
        let log = attempt_rows(&client, id).await;
        assert_eq!(log.len(), 1);
        assert_eq!((log[0].1, log[0].2.as_str()), (None, outcome));
    }
    wait_state(&client, good, "delivered", SECS(10)).await;
    assert_eq!(receiver.received().len(), 1, "only the good event was sent");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_deliver_2000_events_each_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    for company in 1..=10 {
        set_endpoint(&client, company, &receiver.url("/"), "bearer").await;
    }
    let a = Daemon::start(&db, &[("OUTBOXD_DELIVERY__CONCURRENCY", "16")]).await;
    let b = Daemon::start(&db, &[("OUTBOXD_DELIVERY__CONCURRENCY", "16")]).await;
    // 2,000 events in 40 transactions of 50, while both run.
    for batch in 0..40_i64 {
        client
            .batch_execute(&format!(
                "SELECT outbox.enqueue_payment_cancellation(1 + g % 10, {batch} * 50 + g, 'P' || g) \
                   FROM generate_series(1, 50) g"
            ))
            .await
            .unwrap();
    }
    let got = receiver.wait_for(2000, SECS(60)).await;
    eventually_count(
        &client,
        "all 2000 delivered",
        SECS(30),
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        2000,
    )
    .await;
    let a_exit = a.stop().await;
    let b_exit = b.stop().await;
    assert!(a_exit.success() && b_exit.success());

    let mut keys: Vec<&str> = got
        .iter()
        .map(|r| r.header("idempotency-key").unwrap())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(
        receiver.received().len(),
        2000,
        "no event reached the receiver twice"
    );
    assert_eq!(keys.len(), 2000);
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE attempts = 1), count(DISTINCT lease_owner),
                    (SELECT count(*) FROM outbox.attempts),
                    (SELECT count(DISTINCT lease_owner) FROM outbox.attempts)
               FROM outbox.events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        2000,
        "each marked once, on its first attempt"
    );
    assert_eq!(row.get::<_, i64>(1), 0, "no lease left behind");
    assert_eq!(row.get::<_, i64>(2), 2000, "one attempt row each");
    assert_eq!(row.get::<_, i64>(3), 2, "both daemons took part");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_batch_drains_in_flight_deliveries_and_exits_0() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Each answer takes 300 ms, so a batch is in flight when SIGTERM comes.
    let receiver = Receiver::start(|_, _| {
        Reply::Delayed(
            Duration::from_millis(300),
            Box::new(Reply::Json(
                200,
                json!({"status": "1", "message": "slow ok"}),
            )),
        )
    })
    .await;
    set_endpoint(&client, 1, &receiver.url("/"), "none").await;
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(1, g, 'P' || g) FROM generate_series(1, 200) g")
        .await
        .unwrap();
    let mut daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__CONCURRENCY", "8")]).await;
    receiver.wait_for(8, SECS(10)).await;
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(SECS(20)).await;
    assert!(status.success(), "exit {status:?}");
    daemon.wait_for_log("outboxd stopped", SECS(1)).await;

    // Everything that reached the receiver was recorded; nothing is left
    // leased; the rest is still pending.
    let arrived = receiver.received().len() as i64;
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'delivered'),
                    count(*) FILTER (WHERE state = 'leased'),
                    count(*) FILTER (WHERE state = 'pending')
               FROM outbox.events",
            &[],
        )
        .await
        .unwrap();
    let (delivered, leased, pending): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        delivered, arrived,
        "every in-flight delivery was finished and recorded"
    );
    assert_eq!(leased, 0);
    assert_eq!(delivered + pending, 200, "nothing lost");
    assert!(pending > 0, "the test stopped the daemon mid-drain");

    // A new daemon delivers the rest.
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__CONCURRENCY", "64")]).await;
    eventually_count(
        &client,
        "the rest delivered",
        SECS(30),
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        200,
    )
    .await;
    daemon.stop().await;
}

/// A receiver whose requests hang until the returned flag is cleared (the
/// first daemon's life), and are answered with success after.
async fn hanging_during_the_first_life() -> (Receiver, std::sync::Arc<std::sync::atomic::AtomicBool>)
{
    let first_life = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = first_life.clone();
    let receiver = Receiver::start(move |_, _| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::Hang
        } else {
            Reply::Json(200, json!({"status": "1", "message": "ok"}))
        }
    })
    .await;
    (receiver, first_life)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_leased_rows_are_delivered_after_the_lease_with_the_same_key() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // While the first daemon lives, requests hang (in flight at the kill).
    let (receiver, first_life) = hanging_during_the_first_life().await;
    set_endpoint(&client, 1, &receiver.url("/"), "none").await;
    let timing = [
        ("OUTBOXD_DELIVERY__REQUEST_TIMEOUT", "1s"),
        ("OUTBOXD_DELIVERY__CONNECT_TIMEOUT", "1s"),
        ("OUTBOXD_DELIVERY__LEASE", "12s"),
        ("OUTBOXD_DELIVERY__CONCURRENCY", "4"),
    ];
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(1, g, 'P' || g) FROM generate_series(1, 4) g")
        .await
        .unwrap();
    let mut daemon = Daemon::start(&db, &timing).await;
    let in_flight = receiver.wait_for(4, SECS(10)).await;
    daemon.signal(libc::SIGKILL);
    daemon.wait(SECS(10)).await;
    first_life.store(false, std::sync::atomic::Ordering::SeqCst);
    let leased = count(
        &client,
        "SELECT count(*) FROM outbox.events WHERE state = 'leased'",
    )
    .await;
    assert_eq!(leased, 4, "killed with all four leased");

    let killed_at = std::time::Instant::now();
    let daemon = Daemon::start(&db, &timing).await;
    let all = receiver.wait_for(8, SECS(30)).await;
    assert!(
        killed_at.elapsed() >= SECS(5),
        "re-delivered before the lease could have expired"
    );
    let mut first: Vec<&str> = in_flight
        .iter()
        .map(|r| r.header("idempotency-key").unwrap())
        .collect();
    let mut second: Vec<&str> = all[4..]
        .iter()
        .map(|r| r.header("idempotency-key").unwrap())
        .collect();
    first.sort();
    second.sort();
    assert_eq!(
        first, second,
        "re-delivered with the original idempotency keys"
    );
    eventually_count(
        &client,
        "all delivered",
        SECS(10),
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered' AND attempts = 2",
        4,
    )
    .await;
    daemon.stop().await;
}

/// A stop that cuts deliveries off at the drain deadline hands their leases
/// back: the events are pending again, due at once, their attempt kept and
/// no owner, and a daemon started right after delivers them within
/// seconds, with the same idempotency keys, instead of after the 60 s lease;
/// it does not count them as leases that ran out (a rolling deploy must not
/// look like instances dying to OutboxdLeasesExpiring).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_back_the_leases_of_cut_off_deliveries_and_a_restart_sends_them_at_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // While the first daemon lives, requests hang: in flight at the stop.
    let (receiver, first_life) = hanging_during_the_first_life().await;
    set_endpoint(&client, 1, &receiver.url("/"), "none").await;
    let timing = [
        ("OUTBOXD_DELIVERY__LEASE", "60s"),
        ("OUTBOXD_DELIVERY__DRAIN_TIMEOUT", "1s"),
        ("OUTBOXD_DELIVERY__CONCURRENCY", "4"),
    ];
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(1, g, 'P' || g) FROM generate_series(1, 4) g")
        .await
        .unwrap();
    let mut daemon = Daemon::start(&db, &timing).await;
    let in_flight = receiver.wait_for(4, SECS(10)).await;
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(SECS(10)).await;
    assert!(status.success(), "exit {status:?}");
    daemon
        .wait_for_log("are back in the queue, due at once", SECS(1))
        .await;
    let handed_back = count(
        &client,
        "SELECT count(*) FROM outbox.events
          WHERE state = 'pending' AND next_attempt_at <= now()
            AND lease_owner IS NULL AND attempts = 1",
    )
    .await;
    assert_eq!(
        handed_back, 4,
        "all four pending and due, attempt kept, no owner"
    );

    first_life.store(false, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let daemon = Daemon::start(&db, &timing).await;
    let all = receiver.wait_for(8, SECS(30)).await;
    let took = started.elapsed();
    assert!(took < SECS(5), "re-delivered {took:?} after the restart");
    let keys = |requests: &[crate::receiver::Received]| {
        let mut keys: Vec<String> = requests
            .iter()
            .map(|r| r.header("idempotency-key").unwrap().to_string())
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(
        keys(&in_flight),
        keys(&all[4..]),
        "the same idempotency keys"
    );
    eventually_count(
        &client,
        "all delivered on their second attempt",
        SECS(10),
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered' AND attempts = 2",
        4,
    )
    .await;
    let (_, metrics) = crate::harness::http_get(&format!("{}/metrics", daemon.admin)).await;
    let metrics = crate::ops::samples(&metrics);
    assert_eq!(metrics.get("outboxd_leases_expired_total"), Some(&0.0));
    daemon.stop().await;
}

/// A claim in flight when SIGTERM comes is not dropped: within its grace it
/// says what it leased, and those events are delivered and recorded before
/// the exit. (Dropped, its rows would commit leased to a daemon that is
/// gone and wait out the lease.) The claim is slowed for real: a trigger
/// sleeps 0.6 s in it, and SIGTERM is sent while the server shows it
/// sleeping.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_in_flight_at_sigterm_is_finished_and_its_event_delivered_before_the_exit() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    set_endpoint(&client, 1, &receiver.url("/"), "none").await;
    client
        .batch_execute(
            "CREATE FUNCTION public.slow_claim() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.6); RETURN NEW; END $$;
             CREATE TRIGGER slow_claim BEFORE UPDATE ON outbox.events FOR EACH ROW
               WHEN (OLD.state = 'pending' AND NEW.state = 'leased')
               EXECUTE FUNCTION public.slow_claim();",
        )
        .await
        .unwrap();
    let mut daemon = Daemon::start(&db, &[]).await;
    daemon.wait_for_log("outboxd is delivering", SECS(5)).await;
    enqueue(&client, 1, 222125, "2271", None).await;
    eventually("the claim is sleeping in the trigger", SECS(5), || async {
        count(
            &client,
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database()
                AND wait_event = 'PgSleep' AND query LIKE '-- claim:%'",
        )
        .await
            == 1
    })
    .await;
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait(SECS(10)).await;
    assert!(status.success(), "exit {status:?}");
    assert_eq!(receiver.received().len(), 1, "delivered before the exit");
    let delivered = count(
        &client,
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
    )
    .await;
    assert_eq!(delivered, 1, "and recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_committed_while_idle_arrives_long_before_the_poll_interval() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__POLL_INTERVAL", "60s")]).await;
    // The first poll after connecting has happened; from now on only NOTIFY
    // can wake the daemon within the next minute.
    daemon.wait_for_log("outboxd is delivering", SECS(5)).await;
    let started = std::time::Instant::now();
    enqueue(&client, 6316, 222125, "2271", None).await;
    receiver.wait_for(1, SECS(10)).await;
    let took = started.elapsed();
    assert!(took < SECS(5), "took {took:?}: not woken by NOTIFY");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn run_refuses_a_lease_not_comfortably_longer_than_the_request_timeout() {
    let db = TestDb::new().await;
    let ran = crate::harness::run(
        db.outboxd()
            .env("OUTBOXD_DELIVERY__REQUEST_TIMEOUT", "30s")
            .env("OUTBOXD_DELIVERY__LEASE", "60s")
            .arg("run"),
    )
    .await;
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(
        ran.stderr.contains("delivery.lease: must be at least"),
        "{ran:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn run_on_an_unmigrated_database_waits_schema_wait_then_exits_3() {
    let db = TestDb::empty().await;
    let started = std::time::Instant::now();
    let ran = crate::harness::run(
        db.outboxd()
            .env("OUTBOXD_DATABASE__SCHEMA_WAIT", "2s")
            .arg("run"),
    )
    .await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("run `outboxd migrate`"), "{ran:?}");
    assert!(
        ran.stderr.contains("waiting for `outboxd migrate`"),
        "{ran:?}"
    );
    assert!(started.elapsed() >= SECS(2), "gave up before schema_wait");
    // With the wait turned off, at once.
    let ran = crate::harness::run(
        db.outboxd()
            .env("OUTBOXD_DATABASE__SCHEMA_WAIT", "0s")
            .arg("run"),
    )
    .await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(
        !ran.stderr.contains("waiting for `outboxd migrate`"),
        "{ran:?}"
    );
}

/// A first install or an upgrade while the database was down: the daemon
/// reaches the database before the migration unit does. It waits for the
/// migration instead of exiting, then delivers, in the same process.
#[tokio::test(flavor = "multi_thread")]
async fn run_started_before_the_migration_waits_for_it_and_then_delivers() {
    let db = TestDb::empty().await;
    let mut daemon = Daemon::start_until(&db, &[], "waiting for `outboxd migrate`").await;
    let pid = daemon.pid();
    let migrated = crate::harness::run(db.outboxd().arg("migrate")).await;
    assert_eq!(migrated.code, Some(0), "{migrated:?}");
    daemon.wait_for_log("listening for NOTIFY", SECS(20)).await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    let id = enqueue(&client, 6316, 222125, "2271", None).await;
    wait_state(&client, id, "delivered", SECS(15)).await;
    assert!(daemon.is_running());
    assert_eq!(daemon.pid(), pid, "the same process");
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_event_gets_a_fresh_retry_budget_and_keeps_its_key_and_history() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|_, nth| {
        if nth <= 2 {
            Reply::Json(503, json!({"status": "0", "error": "down"}))
        } else {
            Reply::Json(200, json!({"status": "1", "message": "finally"}))
        }
    })
    .await;
    set_endpoint(&client, 6316, &receiver.url("/"), "none").await;
    let mut env = FAST_RETRY.to_vec();
    env.push(("OUTBOXD_RETRY__MAX_ATTEMPTS", "2"));
    let daemon = Daemon::start(&db, &env).await;
    let id = enqueue(&client, 6316, 222125, "2271", None).await;
    wait_state(&client, id, "failed", SECS(10)).await;
    assert!(
        event_row(&client, id)
            .await
            .3
            .unwrap()
            .contains("gave up after 2 attempts")
    );

    // What a replay does (the operator CLI's `events retry`).
    client
        .execute(
            "UPDATE outbox.events SET state = 'pending', next_attempt_at = now(), replayed_at = now(),
                    attempts_at_replay = attempts, last_error = NULL
              WHERE id = $1 AND state = 'failed'",
            &[&id],
        )
        .await
        .unwrap();
    wait_state(&client, id, "delivered", SECS(10)).await;
    let (_, attempts, message, _) = event_row(&client, id).await;
    assert_eq!((attempts, message.as_deref()), (3, Some("finally")));
    assert_eq!(
        attempt_rows(&client, id).await.len(),
        3,
        "earlier attempts kept"
    );
    let keys: Vec<_> = receiver
        .received()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    assert_eq!(keys, vec![id.to_string(); 3]);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn private_and_loopback_destinations_are_refused_unless_allow_listed() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    // 167772161 is 10.0.0.1 written as one number: not an IP literal to
    // the URL parser, so it goes through name resolution, which turns it
    // into 10.0.0.1 (the classic way around a literal-only check).
    for (company, url) in [
        (1_i64, receiver.url("/hook")),
        (2, "http://169.254.169.254/latest/meta-data/".to_string()),
        (3, "http://167772161/hook".to_string()),
        (4, "http://[::ffff:127.0.0.1]/hook".to_string()),
    ] {
        set_endpoint(&client, company, &url, "none").await;
    }
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__ALLOWED_NETWORKS", "[]")]).await;
    let mut ids = Vec::new();
    for company in 1..=4 {
        ids.push((company, enqueue(&client, company, company, "1", None).await));
    }
    for (company, id) in &ids {
        wait_state(&client, *id, "failed", SECS(10)).await;
        let (_, attempts, _, error) = event_row(&client, *id).await;
        let error = error.unwrap();
        assert_eq!(attempts, 1, "company {company}: not retried");
        assert!(
            error.contains("destination not allowed"),
            "company {company}: {error}"
        );
        assert!(
            error.contains("delivery.allowed_networks"),
            "company {company}: {error}"
        );
        assert_eq!(attempt_rows(&client, *id).await[0].2, "permanent");
    }
    // What was refused and why is for the operator, in the log (see
    // a_refusal_names_no_resolved_address_to_the_tenant for what the
    // tenant reads).
    let log = daemon.log();
    for (company, host, want) in [
        (1, "127.0.0.1", "loopback"),
        (2, "169.254.169.254", "link-local"),
        (3, "167772161", "10.0.0.1"),
        (4, "::ffff:127.0.0.1", "loopback"),
    ] {
        assert!(
            log.iter()
                .any(|l| l.contains("destination refused") && l.contains(host) && l.contains(want)),
            "company {company}: no refusal naming {host} and {want} in the log:\n{}",
            log.join("\n")
        );
    }
    assert!(
        receiver.received().is_empty(),
        "nothing reached the receiver"
    );
    daemon.stop().await;
}

/// The refusal text is stored in columns the sales application shows its
/// users and emailed to the company: it must not say what a host resolves
/// to, or a tenant could map the internal network by trying name after
/// name. The operator's log says it all.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_names_no_resolved_address_to_the_tenant() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Numbers, not IP literals to the URL parser: the resolver turns them
    // into 10.0.0.1 and 127.0.0.1, which the tenant never wrote.
    let hosts = [
        (5_i64, "167772161", "10.0.0.1"),
        (6, "2130706433", "127.0.0.1"),
    ];
    for (company, host, _) in hosts {
        set_endpoint(&client, company, &format!("http://{host}:9/hook"), "none").await;
    }
    let port = crate::smtp::free_port();
    let smtp = crate::smtp::SmtpServer::start(port, &[]).await;
    let mut env = crate::notify::smtp_env(port, &[]);
    env.push(("OUTBOXD_DELIVERY__ALLOWED_NETWORKS".into(), "[]".into()));
    let daemon = crate::notify::start(&db, &env).await;
    let mut ids = Vec::new();
    for (company, host, address) in hosts {
        ids.push((
            enqueue(&client, company, company, "1", None).await,
            host,
            address,
        ));
    }
    let mails = smtp.wait_for(2, SECS(20)).await;
    let log = daemon.log();
    daemon.stop().await;

    // Anything that reveals the address: itself, or the range it is in.
    let hidden = ["10.0.0.1", "10.0.0.0/8", "127.0.0.1", "127.0.0.0/8"];
    for (id, host, address) in &ids {
        let (state, _, response, error) = event_row(&client, *id).await;
        assert_eq!(state, "failed");
        let error = error.unwrap();
        assert!(
            error.contains("delivery.allowed_networks"),
            "{host}: {error}"
        );
        let attempt_message = attempt_rows(&client, *id).await[0].3.clone();
        for text in [Some(error), response, attempt_message]
            .into_iter()
            .flatten()
        {
            for h in hidden {
                assert!(
                    !text.contains(h),
                    "{host}: {h} in the tenant's text: {text}"
                );
            }
        }
        assert!(
            log.iter().any(|l| l.contains("destination refused")
                && l.contains(&id.to_string())
                && l.contains(host)
                && l.contains(address)),
            "{host}: no warning naming it and {address} in the log:\n{}",
            log.join("\n")
        );
    }
    for mail in &mails {
        let text = [
            mail.subject.clone(),
            mail.part("text/plain"),
            mail.part("text/html"),
        ]
        .join("\n");
        assert!(text.contains("delivery.allowed_networks"), "{text}");
        for h in hidden {
            assert!(!text.contains(h), "{h} in the email:\n{text}");
        }
    }
}
