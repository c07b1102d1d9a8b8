//! `outboxd events list/show/retry` and `outboxd status` as real processes:
//! what they print (tables and JSON), and that a retried event is delivered
//! again by a running daemon under the same Idempotency-Key.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::Client;
use uuid::Uuid;

use super::outboxd;
use crate::harness::{Daemon, TestDb, count, eventually};
use crate::receiver::{Receiver, Reply};

const SECS: fn(u64) -> Duration = Duration::from_secs;

async fn enqueue(client: &Client, company: i64, payment: i64) -> Uuid {
    client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation($1, $2, 'P' || $2::bigint)",
            &[&company, &payment],
        )
        .await
        .unwrap()
        .get(0)
}

/// Records one attempt of `id` that started `ago` (an interval) ago with
/// `outcome`, leaving the event in `state` (pending means retry in 1 h).
async fn attempt(client: &Client, id: Uuid, state: &str, outcome: &str, ago: &str) {
    client
        .execute(
            "WITH e AS (
                UPDATE outbox.events
                   SET state = $2, attempts = attempts + 1,
                       delivered_at = CASE WHEN $2 = 'delivered' THEN now() END,
                       next_attempt_at = CASE WHEN $2 = 'pending' THEN now() + interval '1 hour'
                                              ELSE next_attempt_at END,
                       last_error = CASE WHEN $2 = 'failed' THEN 'test: ' || $3 END
                 WHERE id = $1
             RETURNING id, attempts)
             INSERT INTO outbox.attempts (event_id, attempt, started_at, duration_ms, http_status,
                                          outcome, message)
             SELECT id, attempts, now() - $4::text::interval, 12,
                    CASE WHEN $3 IN ('success', 'rejected') THEN 200 END, $3, 'test attempt'
               FROM e",
            &[&id, &state, &outcome, &ago],
        )
        .await
        .unwrap();
}

async fn state_of(client: &Client, id: Uuid) -> String {
    client
        .query_one("SELECT state FROM outbox.events WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

fn json_of(ran: &crate::harness::Ran) -> Value {
    assert_eq!(ran.code, Some(0), "{ran:?}");
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {ran:?}"))
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn events_list_and_show_print_tables_and_json() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let first = enqueue(&client, 6316, 1).await;
    let second = enqueue(&client, 6316, 2).await;
    let third = enqueue(&client, 6316, 3).await;
    let other = enqueue(&client, 7, 4).await;
    attempt(&client, second, "failed", "rejected", "1 minute").await;
    client
        .execute(
            "UPDATE outbox.events SET response_message = 'Payment P2 is already settled' WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap();
    let email_id = count(&client, "INSERT INTO outbox.emails (company_id, event_type, recipients, sent_to, state, sent_at)
             VALUES (6316, 'payment.cancellation', ARRAY['ops@example.com'], ARRAY['ops@example.com'],
                     'sent', now()) RETURNING id").await;
    client
        .execute(
            "INSERT INTO outbox.notifications (event_id, company_id, event_type, endpoint_url, email_id)
             VALUES ($1, 6316, 'payment.cancellation', 'https://erp.example.com/', $2)",
            &[&second, &email_id],
        )
        .await
        .unwrap();

    let all = json_of(&outboxd(&db, "events list --json").await);
    let newest_first: Vec<String> = [other, third, second, first]
        .iter()
        .map(Uuid::to_string)
        .collect();
    assert_eq!(ids_of(&all), newest_first);
    let keys: Vec<&str> = all[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "id",
        "event_type",
        "company_id",
        "payload",
        "state",
        "attempts",
        "next_attempt_at",
        "lease_owner",
        "created_at",
        "delivered_at",
        "response_message",
        "last_error",
        "replayed_at",
        "attempts_at_replay",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    assert_eq!(
        all[3]["payload"],
        json!({"companyId": 6316, "paymentId": 1, "paymentNumber": "P1"})
    );

    let failed = json_of(&outboxd(&db, "events list --company 6316 --state failed --json").await);
    assert_eq!(ids_of(&failed), [second.to_string()]);
    assert_eq!(
        failed[0]["response_message"],
        "Payment P2 is already settled"
    );
    assert_eq!(failed[0]["attempts"], 1);

    for (since, want) in [
        ("1h", 4),
        ("2000-01-01T00:00:00+01:00", 4),
        ("2999-01-01", 0),
    ] {
        let got = json_of(&outboxd(&db, &format!("events list --since {since} --json")).await);
        assert_eq!(got.as_array().unwrap().len(), want, "--since {since}");
    }

    let table = outboxd(&db, "events list --limit 3").await;
    assert_eq!(table.code, Some(0), "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(
        lines[0].starts_with("id  ") && lines[0].ends_with("payment  message"),
        "{table:?}"
    );
    assert_eq!(lines.len(), 5, "header, 3 rows, the limit note: {table:?}");
    assert!(lines[3].contains(&second.to_string()) && lines[3].contains(" failed "));
    assert!(lines[3].contains(" P2 ") && lines[3].ends_with("Payment P2 is already settled"));
    assert_eq!(lines[4], "(the newest 3; see --limit)");

    let shown = json_of(&outboxd(&db, &format!("events show {second} --json")).await);
    assert_eq!(shown["event"]["id"], second.to_string());
    assert_eq!(shown["event"]["state"], "failed");
    assert_eq!(shown["event"]["payload"]["paymentNumber"], "P2");
    assert_eq!(shown["attempts"][0]["outcome"], "rejected");
    assert_eq!(shown["attempts"][0]["http_status"], 200);
    assert_eq!(shown["notifications"][0]["email_state"], "sent");
    assert_eq!(
        shown["notifications"][0]["recipients"],
        json!(["ops@example.com"])
    );

    let text = outboxd(&db, &format!("events show {second}")).await;
    assert_eq!(text.code, Some(0), "{text:?}");
    for want in [
        "  state:      failed",
        "  message:    Payment P2 is already settled",
        "payload:",
        "    \"paymentNumber\": \"P2\"",
        "attempts:",
        "rejected",
        &format!("email {email_id} to ops@example.com: sent"),
    ] {
        assert!(text.stdout.contains(want), "{want:?} missing: {text:?}");
    }

    let unknown = Uuid::nil().to_string();
    let missing = outboxd(&db, &format!("events show {unknown}")).await;
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(
        missing.stderr.contains(&format!("no event {unknown}")),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_event_retried_is_delivered_again_with_the_same_key_and_keeps_its_attempts() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(|_, nth| {
        if nth == 1 {
            Reply::Json(
                200,
                json!({"status": "0", "error": "Payment 2271 is already settled"}),
            )
        } else {
            Reply::Json(200, json!({"status": "1", "message": "accepted"}))
        }
    })
    .await;
    let url = receiver.url("/");
    let set = outboxd(&db, &format!("endpoint set --company 6316 --url {url}")).await;
    assert_eq!(set.code, Some(0), "{set:?}");
    // Polling once a minute: the retry must wake the daemon by NOTIFY.
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__POLL_INTERVAL", "60s")]).await;
    daemon.wait_for_log("outboxd is delivering", SECS(5)).await;
    let enqueued = outboxd(
        &db,
        "enqueue payment-cancellation --company 6316 --payment 222125 --number 2271",
    )
    .await;
    assert_eq!(enqueued.code, Some(0), "{enqueued:?}");
    let id: Uuid = enqueued.stdout.trim().parse().unwrap();
    eventually("the event to fail", SECS(10), || async {
        state_of(&client, id).await == "failed"
    })
    .await;

    let retried = outboxd(&db, &format!("events retry {id}")).await;
    assert_eq!(retried.code, Some(0), "{retried:?}");
    assert!(retried.stdout.contains("retried 1 event"), "{retried:?}");
    assert!(retried.stdout.contains(&id.to_string()), "{retried:?}");
    eventually("the retried event to be delivered", SECS(10), || async {
        state_of(&client, id).await == "delivered"
    })
    .await;
    let keys: Vec<String> = receiver
        .wait_for(2, SECS(1))
        .await
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    assert_eq!(
        keys,
        [id.to_string(), id.to_string()],
        "the same Idempotency-Key"
    );

    let shown = json_of(&outboxd(&db, &format!("events show {id} --json")).await);
    assert_eq!(shown["event"]["state"], "delivered");
    assert_eq!(shown["event"]["attempts"], 2);
    assert_eq!(shown["event"]["attempts_at_replay"], 1);
    assert!(shown["event"]["replayed_at"].is_string());
    assert_eq!(shown["event"]["response_message"], "accepted");
    let outcomes: Vec<&str> = shown["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["rejected", "success"],
        "the earlier attempt is kept"
    );
    let text = outboxd(&db, &format!("events show {id}")).await;
    assert!(text.stdout.contains("(after attempt 1)"), "{text:?}");
    assert!(
        text.stdout.contains("Payment 2271 is already settled"),
        "{text:?}"
    );

    let again = outboxd(&db, &format!("events retry {id}")).await;
    assert_eq!(again.code, Some(1), "{again:?}");
    assert!(
        again.stderr.contains(&format!(
            "event {id} was not retried: it is delivered (only failed events can be retried)"
        )),
        "{again:?}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn retry_by_company_takes_its_failed_events_and_reports_ids_it_could_not_retry() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let (_listener, mut notifications) = db.listen("outbox_events").await;
    let recent = enqueue(&client, 6316, 1).await;
    let old = enqueue(&client, 6316, 2).await;
    let pending = enqueue(&client, 6316, 3).await;
    let elsewhere = enqueue(&client, 7, 4).await;
    for id in [recent, old, elsewhere] {
        attempt(&client, id, "failed", "permanent", "1 minute").await;
    }
    client
        .execute(
            "UPDATE outbox.events SET created_at = now() - interval '3 days',
                    response_message = 'kept' WHERE id = $1",
            &[&old],
        )
        .await
        .unwrap();
    while notifications.try_recv().is_ok() {} // the enqueues'

    let since = outboxd(
        &db,
        "events retry --company 6316 --state failed --since 1day",
    )
    .await;
    assert_eq!(since.code, Some(0), "{since:?}");
    assert_eq!(
        since.stdout,
        format!("retried 1 event: back to pending with the same id\n  {recent}\n")
    );
    tokio::time::timeout(SECS(5), notifications.recv())
        .await
        .expect("the retry notifies outbox_events")
        .unwrap();
    assert_eq!(state_of(&client, old).await, "failed");

    let rest = outboxd(&db, "events retry --company 6316 --state failed").await;
    assert_eq!(rest.code, Some(0), "{rest:?}");
    assert!(rest.stdout.contains(&old.to_string()), "{rest:?}");
    let row = client
        .query_one(
            "SELECT state, attempts_at_replay, attempts, replayed_at IS NOT NULL, last_error,
                    response_message, next_attempt_at <= now()
               FROM outbox.events WHERE id = $1",
            &[&old],
        )
        .await
        .unwrap();
    let got: (String, i32, i32, bool, Option<String>, Option<String>, bool) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
    );
    assert_eq!(
        got,
        (
            "pending".into(),
            1,
            1,
            true,
            None,
            Some("kept".into()),
            true
        )
    );
    let attempts: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.attempts WHERE event_id = $1",
            &[&old],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1, "earlier attempts kept");
    assert_eq!(
        state_of(&client, elsewhere).await,
        "failed",
        "other companies untouched"
    );

    let none = outboxd(&db, "events retry --company 6316 --state failed").await;
    assert_eq!(none.code, Some(0), "{none:?}");
    assert_eq!(none.stdout, "no failed events of company 6316 to retry\n");

    let unknown = Uuid::nil();
    let mixed = outboxd(
        &db,
        &format!("events retry {elsewhere} {pending} {unknown}"),
    )
    .await;
    assert_eq!(mixed.code, Some(1), "{mixed:?}");
    assert!(mixed.stdout.contains(&elsewhere.to_string()), "{mixed:?}");
    assert_eq!(
        mixed.stderr,
        format!(
            "outboxd: event {pending} was not retried: it is pending (only failed events can be retried)\n\
             outboxd: event {unknown} was not retried: there is no such event\n"
        )
    );
    assert_eq!(state_of(&client, elsewhere).await, "pending");
    assert_eq!(state_of(&client, pending).await, "pending");
}

#[tokio::test]
async fn status_counts_states_and_names_the_failing_endpoints() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (1, 'https://one.example.com/')",
            &[],
        )
        .await
        .unwrap();
    let delivered = enqueue(&client, 1, 1).await;
    let rejected = enqueue(&client, 1, 2).await;
    let exhausted = enqueue(&client, 1, 3).await;
    let retrying = enqueue(&client, 1, 4).await;
    let due = enqueue(&client, 1, 5).await;
    let long_ago = enqueue(&client, 1, 6).await;
    let no_endpoint = enqueue(&client, 2, 7).await;
    attempt(&client, delivered, "delivered", "success", "10 minutes").await;
    attempt(&client, rejected, "failed", "rejected", "10 minutes").await;
    attempt(&client, exhausted, "failed", "retryable", "10 minutes").await;
    attempt(&client, retrying, "pending", "retryable", "10 minutes").await;
    attempt(&client, long_ago, "failed", "permanent", "2 days").await;
    attempt(&client, no_endpoint, "failed", "no_endpoint", "10 minutes").await;
    client
        .execute(
            "UPDATE outbox.events SET created_at = now() - interval '5 minutes' WHERE id = $1",
            &[&due],
        )
        .await
        .unwrap();

    let status = json_of(&outboxd(&db, "status --json").await);
    assert_eq!(
        status["events"],
        json!({"pending": 2, "scheduled": 0, "leased": 0, "delivered": 1, "failed": 4})
    );
    let age = status["oldest_due_age_seconds"].as_f64().unwrap();
    assert!((300.0..400.0).contains(&age), "{age}");
    assert_eq!(
        status["last_hour"],
        json!({"finished": 4, "failed": 3, "failure_ratio": 0.75}),
        "the retry still to come counts neither way"
    );
    assert_eq!(
        status["failing_endpoints"],
        json!([
            {"company_id": 1, "event_type": "payment.cancellation",
             "url": "https://one.example.com/", "failed_events": 2},
            {"company_id": 2, "event_type": "payment.cancellation", "url": null, "failed_events": 1},
        ])
    );
    assert_eq!(status["emails_queued"], 0);

    let text = outboxd(&db, "status").await;
    assert_eq!(text.code, Some(0), "{text:?}");
    for want in [
        "events:      2 pending, 0 scheduled, 0 leased, 1 delivered, 4 failed",
        "oldest due:  5m",
        "last hour:   3 of 4 finished events failed (75.0%)",
        "failing endpoints (last 24 h):",
        "https://one.example.com/",
        "(no endpoint)",
    ] {
        assert!(text.stdout.contains(want), "{want:?} missing: {text:?}");
    }
}
