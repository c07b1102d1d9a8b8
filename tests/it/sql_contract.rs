//! The SQL contract with the sales application: enqueue functions, the
//! events table they write, and the endpoint settings' validation.

use serde_json::{Value, json};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::harness::TestDb;
use crate::harness::{count, notifications_before_marker};

async fn event_count(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox.events", &[])
        .await
        .unwrap()
        .get(0)
}

/// The error a statement raised, as (SQLSTATE, message, detail).
async fn error_of(client: &Client, sql: &str) -> (SqlState, String, String) {
    let err = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("expected an error from: {sql}"));
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a database error: {err}"));
    (
        db.code().clone(),
        db.message().to_string(),
        db.detail().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn a_rolled_back_enqueue_leaves_no_row_and_wakes_nothing() {
    let db = TestDb::new().await;
    let (_listener, mut notifications) = db.listen_with_marker().await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    tx.query_one(
        "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271', ARRAY[17899,17900])",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        event_count(tx.client()).await,
        1,
        "visible inside the transaction"
    );
    let other = db.client().await;
    assert_eq!(event_count(&other).await, 0, "not visible outside it");
    tx.rollback().await.unwrap();
    assert_eq!(event_count(&client).await, 0);
    assert_eq!(
        notifications_before_marker(&db, &mut notifications).await,
        0,
        "a rolled-back enqueue must not wake the daemon"
    );
    // The same enqueue committed does (it is the first in a quiet spell
    // whose quarter second, set by the rolled-back one, has passed).
    let quiet = std::time::Duration::from_millis(260);
    tokio::time::sleep(quiet).await;
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        notifications_before_marker(&db, &mut notifications).await,
        1
    );
}

#[tokio::test]
async fn committed_enqueue_leaves_one_pending_row_with_the_documented_payload() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let id: uuid::Uuid = tx
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271', ARRAY[17899,17900])",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();

    let rows = client
        .query(
            "SELECT id, event_type, company_id, payload, state, attempts, \
                    next_attempt_at <= now(), delivered_at IS NULL, lease_owner IS NULL \
               FROM outbox.events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.get::<_, uuid::Uuid>(0), id);
    assert_eq!(id.get_version_num(), 7, "time-ordered event ids");
    assert_eq!(row.get::<_, String>(1), "payment.cancellation");
    assert_eq!(row.get::<_, i64>(2), 6316);
    assert_eq!(
        row.get::<_, Value>(3),
        json!({"companyId": 6316, "paymentId": 222125, "paymentNumber": "2271", "orderIds": "17899,17900"})
    );
    assert_eq!(row.get::<_, String>(4), "pending");
    assert_eq!(row.get::<_, i32>(5), 0);
    assert!(row.get::<_, bool>(6), "due at once");
    assert!(row.get::<_, bool>(7));
    assert!(row.get::<_, bool>(8));
}

#[tokio::test]
async fn payload_has_no_order_ids_key_without_orders() {
    let db = TestDb::new().await;
    let client = db.client().await;
    for call in [
        "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271')",
        "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271', NULL)",
        "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271', '{}')",
    ] {
        let id: uuid::Uuid = client.query_one(call, &[]).await.unwrap().get(0);
        let payload: Value = client
            .query_one("SELECT payload FROM outbox.events WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            payload,
            json!({"companyId": 6316, "paymentId": 222125, "paymentNumber": "2271"}),
            "{call}"
        );
        assert!(payload.get("orderIds").is_none(), "{call}");
    }
}

#[tokio::test]
async fn order_ids_keep_the_given_order_and_named_arguments_work() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let id: uuid::Uuid = client
        .query_one(
            "SELECT outbox.enqueue_payment_cancellation(company_id => $1, payment_id => $2, \
                    payment_number => $3, order_ids => $4)",
            &[&7_i64, &9_i64, &"A-9", &vec![30_i64, 10, 20]],
        )
        .await
        .unwrap()
        .get(0);
    let order_ids: String = client
        .query_one(
            "SELECT payload->>'orderIds' FROM outbox.events WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(order_ids, "30,10,20");
}

#[tokio::test]
async fn bad_enqueue_calls_fail_the_callers_own_transaction() {
    let cases = [
        (
            "NULL, 222125, '2271'",
            "company_id must be a positive integer, got NULL",
        ),
        (
            "0, 222125, '2271'",
            "company_id must be a positive integer, got 0",
        ),
        (
            "6316, -5, '2271'",
            "payment_id must be a positive integer, got -5",
        ),
        (
            "6316, NULL, '2271'",
            "payment_id must be a positive integer, got NULL",
        ),
        ("6316, 222125, ''", "payment_number must not be blank"),
        ("6316, 222125, '   '", "payment_number must not be blank"),
        (
            "6316, 222125, NULL",
            "payment_number must be a non-blank string, got NULL",
        ),
        (
            "6316, 222125, repeat('9', 256)",
            "payment_number is longer than 255 characters",
        ),
        (
            "6316, 222125, '2271', ARRAY[17899,17900,17899]",
            "order id 17899 is repeated",
        ),
        (
            "6316, 222125, '2271', ARRAY[17899,NULL]",
            "order_ids must not contain NULL",
        ),
        (
            "6316, 222125, '2271', ARRAY[0]",
            "order id 0 is not a positive integer",
        ),
        (
            "6316, 222125, '2271', ARRAY[5,NULL,-3]",
            "order_ids must not contain NULL (position 2)",
        ),
        (
            "6316, 222125, '2271', ARRAY[[1,2],[3,4]]",
            "order_ids must be a one-dimensional array",
        ),
        // Subscripts that do not start at 1.
        (
            "6316, 222125, '2271', '[0:2]={5,6,5}'::bigint[]",
            "order id 5 is repeated",
        ),
        // Over 32 orders, repeats are found by a query instead.
        (
            "6316, 222125, '2271', ARRAY(SELECT g FROM generate_series(1, 40) g) || 17::bigint",
            "order id 17 is repeated",
        ),
    ];
    let db = TestDb::new().await;
    let mut client = db.client().await;
    for (args, want) in cases {
        let tx = client.transaction().await.unwrap();
        // The application's own work in the same transaction.
        tx.batch_execute("CREATE TEMP TABLE cancellation_marker (x int); INSERT INTO cancellation_marker VALUES (1)")
            .await
            .unwrap();
        let (code, message, _) = error_of(
            tx.client(),
            &format!("SELECT outbox.enqueue_payment_cancellation({args})"),
        )
        .await;
        assert_eq!(code, SqlState::INVALID_PARAMETER_VALUE, "{args}");
        assert!(
            message.contains(want),
            "{args}: got {message:?}, want {want:?}"
        );
        // The transaction is aborted: nothing more can happen in it.
        let after = tx.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(after.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
        drop(tx);
        let marker = client
            .query_opt(
                "SELECT to_regclass('pg_temp.cancellation_marker')::text",
                &[],
            )
            .await
            .unwrap()
            .and_then(|r| r.get::<_, Option<String>>(0));
        assert_eq!(marker, None, "the caller's own work rolled back too");
    }
    assert_eq!(event_count(&client).await, 0);
}

#[tokio::test]
async fn generic_enqueue_takes_other_event_types_and_checks_known_ones() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let id: uuid::Uuid = client
        .query_one(
            "SELECT outbox.enqueue('invoice.created', 42, '{\"invoiceId\": 7}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "SELECT event_type, company_id, payload, state FROM outbox.events WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "invoice.created");
    assert_eq!(row.get::<_, i64>(1), 42);
    assert_eq!(row.get::<_, Value>(2), json!({"invoiceId": 7}));
    assert_eq!(row.get::<_, String>(3), "pending");

    let cases = [
        ("'Invoice Created', 42, '{}'", "event_type must look like"),
        ("NULL, 42, '{}'", "event_type must look like"),
        (
            "'invoice.created', NULL, '{}'",
            "company_id must be a positive integer",
        ),
        (
            "'invoice.created', 42, '[1,2]'",
            "payload must be a JSON object, got array",
        ),
        (
            "'invoice.created', 42, NULL",
            "payload must be a JSON object, got NULL",
        ),
        (
            "'payment.cancellation', 42, '{\"companyId\": 42, \"paymentId\": 1}'",
            "paymentNumber must be a non-blank string",
        ),
        (
            "'payment.cancellation', 42, '{\"companyId\": 42, \"paymentId\": 1, \"paymentNumber\": \"1\", \"orderIds\": [1]}'",
            "orderIds must be a string",
        ),
        (
            "'payment.cancellation', 42, '{\"companyId\": 43, \"paymentId\": 1, \"paymentNumber\": \"1\"}'",
            "does not match company_id",
        ),
    ];
    for (args, want) in cases {
        let (code, message, _) = error_of(&client, &format!("SELECT outbox.enqueue({args})")).await;
        assert_eq!(code, SqlState::INVALID_PARAMETER_VALUE, "{args}");
        assert!(
            message.contains(want),
            "{args}: got {message:?}, want {want:?}"
        );
    }
    assert_eq!(event_count(&client).await, 1);
}

#[tokio::test]
async fn enqueues_notify_at_most_once_per_quarter_second_whoever_enqueues() {
    let db = TestDb::new().await;
    let (_listener, mut notifications) = db.listen_with_marker().await;

    // One transaction of many events: one notification.
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(
        "SELECT outbox.enqueue_payment_cancellation(6316, g, 'P-' || g) FROM generate_series(1, 50) g;
         SELECT outbox.enqueue('invoice.created', 6316, '{}');",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        notifications_before_marker(&db, &mut notifications).await,
        1
    );

    // Four sessions committing single-event transactions as fast as they
    // can for a second and a half: thousands of enqueues, a handful of
    // notifications, every one of the events there.
    let started = std::time::Instant::now();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let client = crate::harness::connect_url(&url).await;
                let mut n = 0i64;
                while started.elapsed() < std::time::Duration::from_millis(1500) {
                    n += 1;
                    client
                        .execute(
                            "SELECT outbox.enqueue_payment_cancellation(7, $1, 'W')",
                            &[&(w * 1_000_000 + n)],
                        )
                        .await
                        .unwrap();
                }
                n
            })
        })
        .collect();
    let mut enqueued = 0;
    for writer in writers {
        enqueued += writer.await.unwrap();
    }
    let took = started.elapsed();
    let wakeups = notifications_before_marker(&db, &mut notifications).await;
    let most = (took.as_millis() / 250 + 1) as usize;
    assert!(
        (1..=most).contains(&wakeups),
        "{wakeups} notifications for {enqueued} enqueues in {took:?}: at most {most}"
    );
    assert!(enqueued > 100, "only {enqueued} enqueues in {took:?}");
    assert_eq!(event_count(&client).await, 51 + enqueued);
}

/// What an enqueue leaves locked in the application's transaction until
/// its commit: the table and the wake-up's sequence, both in
/// `RowExclusiveLock`, a mode weak enough for one of the session's
/// fast-path slots. The table's indexes are locked only while the INSERT
/// runs; a trigger, a foreign key or a lookup in another table added to
/// the enqueue would show here.
///
/// The test asserts the mode, not `pg_locks.fastpath`: whether a weak lock
/// actually goes to a fast-path slot also depends on other sessions. While
/// any session holds a strong lock on a relation that hashes to the same
/// one of PostgreSQL's 1,024 fast-path partitions (another test's
/// migration creating its tables, say), the lock goes to the shared table
/// instead.
#[tokio::test]
async fn an_enqueue_holds_two_weak_relation_locks_until_its_commit() {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(
        "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271', ARRAY[17899, 17900]);
         SELECT outbox.enqueue('invoice.created', 6316, '{}');",
    )
    .await
    .unwrap();
    let held: Vec<(String, String)> = tx
        .query(
            "SELECT relation::regclass::text, mode FROM pg_locks
              WHERE pid = pg_backend_pid() AND locktype = 'relation'
                AND relation <> 'pg_locks'::regclass
              ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let row_exclusive = |relation: &str| (relation.to_string(), "RowExclusiveLock".to_string());
    assert_eq!(
        held,
        [
            row_exclusive("outbox.events"),
            row_exclusive("outbox.wakeup")
        ]
    );
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_valid_endpoint_is_stored() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url, auth_type, username, password, notify_emails)
             VALUES (6316, 'https://erp.example.com/hooks/payment-cancelled?x=1', 'basic', 'sales', 'pw',
                     ARRAY['ops@example.com', 'finance.team+alerts@example.co.uk']);
             INSERT INTO outbox.endpoints (company_id, url, auth_type, token)
             VALUES (6317, 'http://127.0.0.1:8080/hook', 'bearer', 'tok');
             INSERT INTO outbox.endpoints (company_id, url) VALUES (6318, 'http://[::1]:8080/');",
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT event_type, enabled, cardinality(notify_emails) FROM outbox.endpoints WHERE company_id = 6316",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "payment.cancellation");
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i32>(2), 2);
}

#[tokio::test]
async fn bad_endpoint_rows_fail_with_a_message_naming_the_problem_and_no_secret() {
    let base = "company_id, url, auth_type, username, password, token, notify_emails";
    let cases = [
        (
            "1, 'https://x.example/h', 'bearer', NULL, NULL, 'tok-SECRET', ARRAY['a@x.com','b@x.com','c@x.com','d@x.com','e@x.com','f@x.com']",
            "at most 5 notify_emails",
            "endpoints_at_most_5_notify_emails",
        ),
        (
            "1, 'https://x.example/h', 'basic', 'user', NULL, NULL, '{}'",
            "basic needs both a username and a password",
            "endpoints_basic_needs_username_and_password",
        ),
        (
            "1, 'https://x.example/h', 'basic', NULL, 'pw-SECRET', NULL, '{}'",
            "basic needs both a username and a password",
            "endpoints_basic_needs_username_and_password",
        ),
        (
            "1, 'ftp://x.example/h', 'basic', 'user', 'pw-SECRET', NULL, '{}'",
            "url must be an http:// or https:// URL",
            "endpoints_url_http_or_https",
        ),
        (
            "1, 'https://user:pw-SECRET@x.example/h', 'none', NULL, NULL, NULL, '{}'",
            "no credentials in it",
            "endpoints_url_http_or_https",
        ),
        (
            "1, 'https://x.example/h', 'bearer', NULL, NULL, '', '{}'",
            "bearer needs a token",
            "endpoints_bearer_needs_token",
        ),
        (
            "1, 'https://x.example/h', 'digest', NULL, NULL, 'tok-SECRET', '{}'",
            "auth_type must be one of none, basic, bearer",
            "endpoints_auth_type_known",
        ),
        (
            "1, 'https://x.example/h', 'bearer', NULL, NULL, 'tok-SECRET', ARRAY['ops@example.com', 'not-an-address']",
            "malformed address: \"not-an-address\"",
            "endpoints_notify_emails_valid",
        ),
        (
            "1, 'https://x.example/h', 'bearer', NULL, NULL, 'tok-SECRET', ARRAY['ops@example.com', NULL]",
            "must not contain NULL",
            "endpoints_notify_emails_valid",
        ),
        (
            "-1, 'https://x.example/h', 'bearer', NULL, NULL, 'tok-SECRET', '{}'",
            "company_id must be a positive integer",
            "endpoints_company_id_positive",
        ),
    ];
    let db = TestDb::new().await;
    let client = db.client().await;
    for (values, want, constraint) in cases {
        let sql = format!("INSERT INTO outbox.endpoints ({base}) VALUES ({values})");
        let err = client.batch_execute(&sql).await.unwrap_err();
        let dberr = err.as_db_error().expect("a database error");
        assert_eq!(dberr.code(), &SqlState::CHECK_VIOLATION, "{values}");
        assert_eq!(dberr.constraint(), Some(constraint), "{values}");
        assert!(
            dberr.message().contains(want),
            "{values}: got {:?}",
            dberr.message()
        );
        let everything = format!("{dberr:?}");
        assert!(
            !everything.contains("SECRET"),
            "a secret leaked: {everything}"
        );
    }
    // NOT NULL columns are checked by the trigger too, before PostgreSQL's
    // own NOT NULL error could print the row with its secret.
    let err = client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url, auth_type, token, enabled, created_at)
             VALUES (9, 'https://x.example/h', 'bearer', 'tok-SECRET', NULL, NULL)",
        )
        .await
        .unwrap_err();
    let dberr = err.as_db_error().unwrap();
    assert_eq!(dberr.code(), &SqlState::NOT_NULL_VIOLATION);
    assert!(dberr.message().contains("enabled must be true or false"));
    assert!(!format!("{dberr:?}").contains("SECRET"), "{dberr:?}");
    client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url, auth_type, token, created_at)
             VALUES (9, 'https://x.example/h', 'bearer', 'tok-SECRET', NULL);
             DELETE FROM outbox.endpoints WHERE company_id = 9;",
        )
        .await
        .unwrap();
    // An update is checked the same way.
    client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (5, 'https://x.example/h')",
        )
        .await
        .unwrap();
    let (code, message, _) = error_of(
        &client,
        "UPDATE outbox.endpoints SET url = 'ftp://x.example/h' WHERE company_id = 5",
    )
    .await;
    assert_eq!(code, SqlState::CHECK_VIOLATION);
    assert!(message.contains("http:// or https://"), "{message}");
    let count = count(&client, "SELECT count(*) FROM outbox.endpoints").await;
    assert_eq!(count, 1);
}

#[tokio::test]
async fn check_constraints_hold_even_with_the_validation_trigger_disabled() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("ALTER TABLE outbox.endpoints DISABLE TRIGGER endpoints_validate")
        .await
        .unwrap();
    let cases = [
        (
            "'ftp://x.example/h', 'none', NULL, NULL",
            "endpoints_url_http_or_https",
        ),
        (
            "'https://x.example/h', 'basic', 'u', NULL",
            "endpoints_basic_needs_username_and_password",
        ),
        (
            "'https://x.example/h', 'bearer', NULL, NULL",
            "endpoints_bearer_needs_token",
        ),
    ];
    for (values, constraint) in cases {
        let sql = format!(
            "INSERT INTO outbox.endpoints (company_id, url, auth_type, username, token) VALUES (1, {values})"
        );
        let err = client.batch_execute(&sql).await.unwrap_err();
        assert_eq!(
            err.as_db_error().unwrap().constraint(),
            Some(constraint),
            "{values}"
        );
    }
    let err = client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url, notify_emails)
             VALUES (1, 'https://x.example/h', ARRAY['a@x.com','b@x.com','c@x.com','d@x.com','e@x.com','f@x.com'])",
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().unwrap().constraint(),
        Some("endpoints_at_most_5_notify_emails")
    );
}

/// Runs `check` as a role with the README's grants for the application,
/// made for this test and dropped after it.
async fn as_the_application<F, Fut>(db: &TestDb, check: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    let role = format!("{}_app", db.name);
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role};
             GRANT USAGE ON SCHEMA outbox TO {role};
             GRANT EXECUTE ON FUNCTION outbox.enqueue_payment_cancellation(bigint, bigint, text, bigint[]),
                                       outbox.enqueue(text, bigint, jsonb) TO {role};
             GRANT SELECT ON outbox.events, outbox.attempts TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.endpoints TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.endpoint_signing_secrets TO {role};
             GRANT SELECT, DELETE ON outbox.signed_endpoints TO {role};"
        ))
        .await
        .unwrap();
    let result = async {
        let client = db.client().await;
        client.batch_execute(&format!("SET ROLE {role}")).await?;
        check(client).await
    }
    .await;
    admin
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
    result.unwrap();
}

#[tokio::test]
async fn the_documented_grants_let_the_application_enqueue_only_through_the_functions() {
    let db = TestDb::new().await;
    as_the_application(&db, |client| async move {
        client
            .batch_execute(
                "INSERT INTO outbox.endpoints (company_id, url) VALUES (6316, 'https://x.example/h');
                 SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271', ARRAY[17899,17900]);
                 SELECT outbox.enqueue('invoice.created', 6316, '{}');
                 SELECT state, response_message FROM outbox.events;",
            )
            .await?;
        // What the application must not be able to do: write a row around
        // the functions' checks, or move one.
        for sql in [
            "INSERT INTO outbox.events (company_id, payload) VALUES (6316, '{}')",
            "INSERT INTO outbox.events (company_id, payload, state) VALUES (6316, '{}', 'delivered')",
            "UPDATE outbox.events SET state = 'delivered'",
            "DELETE FROM outbox.events",
            "SELECT setval('outbox.wakeup', 0)",
        ] {
            let denied = client.batch_execute(sql).await.unwrap_err();
            assert_eq!(
                denied.code(),
                Some(&SqlState::INSUFFICIENT_PRIVILEGE),
                "{sql}: {denied}"
            );
        }
        Ok(())
    })
    .await;
    let admin = db.client().await;
    assert_eq!(event_count(&admin).await, 2);
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM outbox.events WHERE state = 'pending' AND attempts = 0"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn the_callers_search_path_cannot_reach_into_the_enqueue() {
    // The enqueue runs with its owner's rights; a function of the caller's
    // own, found first on the caller's search_path, must not run in it.
    let db = TestDb::new().await;
    let admin = db.client().await;
    let schema = format!("{}_app", db.name);
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE FUNCTION {schema}.btrim(text) RETURNS text LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'the caller''s btrim ran as %', current_user; END $$;"
        ))
        .await
        .unwrap();
    let client = db.client().await;
    client
        .batch_execute(&format!("SET search_path = {schema}, pg_catalog"))
        .await
        .unwrap();
    // The caller's own function does run in the caller's own statements.
    let hijack = client.batch_execute("SELECT btrim('x')").await.unwrap_err();
    let hijack = outboxd::store::pool::describe(&hijack);
    assert!(hijack.contains("the caller's btrim ran"), "{hijack}");
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(6316, 222125, '2271', ARRAY[1, 2]);
             SELECT outbox.enqueue('payment.cancellation', 6316,
                                   '{\"companyId\": 6316, \"paymentId\": 3, \"paymentNumber\": \"9\"}')",
        )
        .await
        .unwrap();
    assert_eq!(event_count(&admin).await, 2);
    let fixed: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_proc
              WHERE pronamespace = 'outbox'::regnamespace
                AND proname IN ('enqueue', 'enqueue_payment_cancellation')
                AND prosecdef
                AND proconfig = ARRAY['search_path=pg_catalog, pg_temp']",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fixed, 2, "both run as their owner with a fixed search_path");
}

/// Issue 25, point 7: a settings screen with the README's grants manages
/// signing secrets: storing one records the endpoint as signing (a trigger
/// with its owner's rights; the role cannot write that table itself),
/// saving the endpoint by delete and re-insert keeps the secret, and
/// stopping on purpose is deleting both.
#[tokio::test]
async fn the_settings_screen_manages_signing_secrets_with_the_documented_grants() {
    let db = TestDb::new().await;
    let (_, secret) = outboxd::http::sign::SigningKey::generate().unwrap();
    as_the_application(&db, |client| async move {
        client
            .batch_execute(
                "INSERT INTO outbox.endpoints (company_id, url) VALUES (6316, 'https://x.example/h')",
            )
            .await?;
        client
            .execute(
                "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret)
                 VALUES (6316, 'payment.cancellation', $1)",
                &[&secret],
            )
            .await?;
        client
            .batch_execute(
                "BEGIN;
                 DELETE FROM outbox.endpoints WHERE company_id = 6316;
                 INSERT INTO outbox.endpoints (company_id, url) VALUES (6316, 'https://x.example/h');
                 COMMIT;",
            )
            .await?;
        let kept: i64 = client
            .query_one("SELECT count(*) FROM outbox.endpoint_signing_secrets", &[])
            .await?
            .get(0);
        assert_eq!(kept, 1);
        let signed: i64 = client
            .query_one("SELECT count(*) FROM outbox.signed_endpoints", &[])
            .await?
            .get(0);
        assert_eq!(signed, 1);
        let denied = client
            .batch_execute("INSERT INTO outbox.signed_endpoints (company_id, event_type) VALUES (1, 'x')")
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
        client
            .batch_execute(
                "DELETE FROM outbox.endpoint_signing_secrets WHERE company_id = 6316;
                 DELETE FROM outbox.signed_endpoints WHERE company_id = 6316;",
            )
            .await?;
        Ok(())
    })
    .await;
    let admin = db.client().await;
    assert_eq!(
        count(&admin, "SELECT count(*) FROM outbox.signed_endpoints").await,
        0
    );
}
