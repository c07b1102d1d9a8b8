//! Retention: old finished rows go, in batches, with their attempts; what is
//! recent or still in flight stays. The queue gauges. Run in-process against
//! a real database, the way the daemon's maintenance task calls it (on the
//! instance the election chose: tests/it/election.rs).

use outboxd::config::RawRetention;
use std::time::Duration;

use outboxd::maintenance::{Deleted, Maintenance, Retention};

use crate::harness::TestDb;
use crate::harness::count;

fn retention(db: &TestDb, batch_size: u32) -> Retention {
    let config = db.config_with(|raw| {
        raw.retention = RawRetention {
            batch_size: Some(batch_size),
            ..Default::default()
        }
    });
    Retention::new(
        outboxd::store::pool::pool(&config.database),
        config.retention,
        outboxd::store::pool::round_trip_limit(&config.database),
    )
}

#[tokio::test]
async fn old_finished_events_are_deleted_in_batches_with_their_attempts() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // Ages relative to the defaults: delivered kept 7 days, failed 30 days,
    // sent emails 30 days.
    client
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, state, attempts, delivered_at, created_at)
             SELECT 1, '{}', 'delivered', 1, now() - interval '8 days', now() - interval '8 days'
               FROM generate_series(1, 5);
             INSERT INTO outbox.events (company_id, payload, state, attempts, delivered_at, created_at)
             VALUES (2, '{}', 'delivered', 1, now() - interval '6 days', now() - interval '40 days');
             INSERT INTO outbox.events (company_id, payload, state, attempts, created_at)
             VALUES (3, '{}', 'failed', 3, now() - interval '31 days'),
                    (4, '{}', 'failed', 3, now() - interval '10 days'),
                    (5, '{}', 'pending', 0, now() - interval '90 days');
             INSERT INTO outbox.events (company_id, payload, state, attempts, created_at, replayed_at, attempts_at_replay)
             VALUES (6, '{}', 'failed', 4, now() - interval '60 days', now() - interval '1 day', 3);
             INSERT INTO outbox.attempts (event_id, attempt, started_at, duration_ms, outcome)
             SELECT id, 1, created_at, 5, 'success' FROM outbox.events;
             INSERT INTO outbox.emails (company_id, event_type, recipients, state, sent_at, created_at)
             VALUES (3, 'payment.cancellation', '{a@x.com}', 'sent', now() - interval '31 days', now() - interval '31 days'),
                    (4, 'payment.cancellation', '{a@x.com}', 'sent', now() - interval '2 days', now() - interval '2 days');",
        )
        .await
        .unwrap();

    let retention = retention(&db, 2);
    let mut rounds = Vec::new();
    loop {
        let deleted = retention.run_once().await.unwrap();
        rounds.push(deleted);
        if deleted.events < 2 && deleted.emails < 2 {
            break;
        }
    }
    let total = rounds.iter().fold(Deleted::default(), |a, d| Deleted {
        events: a.events + d.events,
        emails: a.emails + d.emails,
        secrets: a.secrets + d.secrets,
    });
    // 5 old delivered + 1 old failed; 1 old email.
    assert_eq!(
        total,
        Deleted {
            events: 6,
            emails: 1,
            secrets: 0
        }
    );
    assert!(
        rounds.iter().all(|d| d.events <= 4),
        "batches stay bounded: {rounds:?}"
    );

    let left: Vec<i64> = client
        .query(
            "SELECT company_id FROM outbox.events ORDER BY company_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        vec![2, 4, 5, 6],
        "recent, in-flight and replayed rows stay"
    );
    let orphans = count(
        &client,
        "SELECT count(*) FROM outbox.attempts a
              WHERE NOT EXISTS (SELECT 1 FROM outbox.events e WHERE e.id = a.event_id)",
    )
    .await;
    assert_eq!(orphans, 0);
    let attempts = count(&client, "SELECT count(*) FROM outbox.attempts").await;
    assert_eq!(attempts, 4, "attempt rows went with their events");
}

#[tokio::test]
async fn two_instances_clean_up_side_by_side_without_errors_or_double_counting() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, state, attempts, delivered_at, created_at)
             SELECT 1, '{}', 'delivered', 1, now() - interval '8 days', now() - interval '8 days'
               FROM generate_series(1, 3000);",
        )
        .await
        .unwrap();
    let a = retention(&db, 100);
    let b = retention(&db, 100);
    let drain = |r: Retention| async move {
        let mut n = 0;
        loop {
            let d = r.run_once().await.unwrap();
            n += d.events;
            if d.events == 0 {
                return n;
            }
        }
    };
    let (na, nb) = tokio::join!(drain(a), drain(b));
    assert_eq!(na + nb, 3000);
    let left = count(&client, "SELECT count(*) FROM outbox.events").await;
    assert_eq!(left, 0);
}

#[tokio::test]
async fn queue_gauges_survive_infinite_timestamps() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let gauges = Maintenance::new(db.pool(), Duration::from_secs(60), Duration::from_secs(60));
    // Only a row from the future is due: nothing old is waiting.
    client
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, created_at) VALUES (1, '{}', 'infinity')",
        )
        .await
        .unwrap();
    let stats = gauges.run_once().await.unwrap();
    assert_eq!((stats.pending, stats.oldest_due_age), (1, Duration::ZERO));
    // A row from '-infinity' is as old as can be. (Each heads an endpoint
    // of its own: the age is read from the event due the longest on each.)
    client
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, created_at)
             VALUES (2, '{}', '-infinity'), (3, '{}', now() - interval '1 hour')",
        )
        .await
        .unwrap();
    let stats = gauges.run_once().await.unwrap();
    assert_eq!(stats.pending, 3);
    assert!(
        stats.oldest_due_age > Duration::from_secs(1000 * 365 * 24 * 3600),
        "{stats:?}"
    );
    // Finite ages as before.
    client
        .batch_execute("DELETE FROM outbox.events WHERE NOT isfinite(created_at)")
        .await
        .unwrap();
    let age = gauges.run_once().await.unwrap().oldest_due_age;
    assert!(
        age >= Duration::from_secs(3600) && age < Duration::from_secs(3700),
        "{age:?}"
    );
}

#[tokio::test]
async fn deleting_an_old_email_does_not_email_its_failures_again() {
    let db = TestDb::new().await;
    let client = db.client().await;
    // A failed event replayed yesterday (so retention keeps it), whose
    // failure was emailed 31 days ago; retention keeps sent emails 30 days.
    client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url, notify_emails)
             VALUES (3, 'https://erp.example.com/hooks', '{ops@example.com}');
             INSERT INTO outbox.events (company_id, payload, state, attempts, created_at, replayed_at, attempts_at_replay)
             VALUES (3, '{}', 'failed', 4, now() - interval '40 days', now() - interval '1 day', 3);
             INSERT INTO outbox.emails (company_id, event_type, recipients, state, sent_at, created_at)
             VALUES (3, 'payment.cancellation', '{ops@example.com}', 'sent',
                     now() - interval '31 days', now() - interval '31 days');
             INSERT INTO outbox.notifications (event_id, company_id, event_type, endpoint_url, email_id, created_at)
             SELECT e.id, 3, 'payment.cancellation', 'https://erp.example.com/hooks', m.id,
                    now() - interval '31 days'
               FROM outbox.events AS e, outbox.emails AS m;",
        )
        .await
        .unwrap();

    let deleted = retention(&db, 100).run_once().await.unwrap();
    assert_eq!(
        deleted,
        Deleted {
            events: 0,
            emails: 1,
            secrets: 0
        }
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.notifications").await,
        0,
        "the email's notifications went with it"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.events").await,
        1
    );

    // The mailer, gathering at once, finds nothing to tell.
    let config = db.config_with(|raw| {
        raw.notify.gather = Some("1ms".into());
        raw.notify.window = Some("1ms".into());
    });
    let mailer = outboxd::notify::mailer::Mailer::new(
        db.pool(),
        "test".into(),
        config.notify,
        &config.circuit,
        outboxd::store::pool::round_trip_limit(&config.database),
    );
    let report = mailer.run_once().await.unwrap();
    assert_eq!(report.gathered, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.emails").await,
        0
    );
}

/// Minutes since `age`, rounded: the gauges' ages are read a moment after
/// the rows were written.
fn minutes(age: Duration) -> u64 {
    (age.as_secs() + 30) / 60
}

#[tokio::test]
async fn held_endpoints_are_counted_apart_and_left_out_of_the_oldest_due_age() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let gauges = Maintenance::new(db.pool(), Duration::from_secs(60), Duration::from_secs(60));
    // Held: 1 open (its receiver down), 2 half-open (a probe out), 3 paused
    // by an operator, 4 waiting out a Retry-After. Not held: 5, whose
    // Retry-After is over, and 6, which has no circuit row.
    client
        .batch_execute(
            "INSERT INTO outbox.endpoint_circuits
                    (company_id, event_type, state, opened_at, retry_at, manual, paused_until, failures)
             VALUES (1, 'payment.cancellation', 'open', now() - interval '1 hour', now() + interval '1 hour', false, NULL, 5),
                    (2, 'payment.cancellation', 'half_open', now() - interval '1 hour', now() + interval '1 minute', false, NULL, 5),
                    (3, 'payment.cancellation', 'open', now(), 'infinity', true, NULL, 0),
                    (4, 'payment.cancellation', 'closed', NULL, NULL, false, now() + interval '1 hour', 1),
                    (5, 'payment.cancellation', 'closed', NULL, NULL, false, now() - interval '1 second', 1);
             INSERT INTO outbox.events (company_id, payload, created_at, next_attempt_at)
             VALUES (1, '{}', now() - interval '180 minutes', now()),
                    (2, '{}', now() - interval '120 minutes', now()),
                    (3, '{}', now() - interval '120 minutes', now()),
                    (4, '{}', now() - interval '120 minutes', now()),
                    -- Held, and not due yet: counted, but not aged.
                    (4, '{}', now() - interval '300 minutes', now() + interval '1 hour'),
                    (5, '{}', now() - interval '90 minutes', now()),
                    (6, '{}', now() - interval '30 minutes', now());",
        )
        .await
        .unwrap();
    let stats = gauges.run_once().await.unwrap();
    assert_eq!(stats.pending, 7);
    assert_eq!(stats.held, 5, "{stats:?}");
    assert_eq!(stats.endpoints_held, 4, "{stats:?}");
    assert_eq!(minutes(stats.oldest_held_age), 180, "{stats:?}");
    assert_eq!(minutes(stats.oldest_due_age), 90, "{stats:?}");
    // closed, open, half-open, paused (4 is held by its Retry-After, but
    // its circuit is closed).
    assert_eq!(stats.endpoints, [0, 1, 1, 1], "{stats:?}");

    // A lease that ran out is due whatever its endpoint: it waits for an
    // instance to put it back, not for the receiver.
    client
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, created_at, next_attempt_at, state, lease_owner, attempts)
             VALUES (1, '{}', now() - interval '600 minutes', now() - interval '1 second', 'leased', 'gone', 1);",
        )
        .await
        .unwrap();
    let stats = gauges.run_once().await.unwrap();
    assert_eq!(minutes(stats.oldest_due_age), 600, "{stats:?}");

    // The circuits closed: nothing held, every due event in the age.
    client
        .batch_execute(
            "DELETE FROM outbox.endpoint_circuits;
             DELETE FROM outbox.events WHERE state = 'leased';",
        )
        .await
        .unwrap();
    let stats = gauges.run_once().await.unwrap();
    assert_eq!(
        (stats.held, stats.endpoints_held, stats.oldest_held_age),
        (0, 0, Duration::ZERO),
        "{stats:?}"
    );
    assert_eq!(minutes(stats.oldest_due_age), 180, "{stats:?}");
}

/// Issue 25, point 7: retention deletes signing secrets once they have
/// been expired for longer than `retention.delivered` (7 days by default),
/// in batches; active ones, ones expired more recently and ones without an
/// end stay, and so does the record that their endpoints sign.
#[tokio::test]
async fn long_expired_signing_secrets_are_deleted_and_the_others_kept() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let (_, a) = outboxd::http::sign::SigningKey::generate().unwrap();
    let (_, b) = outboxd::http::sign::SigningKey::generate().unwrap();
    client
        .execute(
            "INSERT INTO outbox.endpoint_signing_secrets (company_id, event_type, secret, expires_at)
             SELECT c, 'payment.cancellation', CASE WHEN c % 2 = 0 THEN $1 ELSE $2 END, e
               FROM generate_series(1, 3) AS c,
                    unnest(ARRAY[now() - interval '8 days', now() - interval '30 days',
                                 now() - interval '6 days', now() + interval '1 day',
                                 NULL]::timestamptz[]) AS e",
            &[&a, &b],
        )
        .await
        .unwrap();
    let retention = retention(&db, 4);
    let mut rounds = Vec::new();
    loop {
        let deleted = retention.run_once().await.unwrap();
        rounds.push(deleted.secrets);
        if deleted.secrets < 4 {
            break;
        }
    }
    assert_eq!(rounds, [4, 2], "batches of 4 until the 6 are gone");
    let left = count(
        &client,
        "SELECT count(*) FROM outbox.endpoint_signing_secrets
          WHERE expires_at IS NULL OR expires_at > now() - interval '7 days'",
    )
    .await;
    assert_eq!(left, 9);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.endpoint_signing_secrets"
        )
        .await,
        9
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.signed_endpoints").await,
        3
    );
}

/// The gauges read no more than 10,000 pending rows: pending and held are
/// exact up to there; past it pending is PostgreSQL's estimate of the
/// pending index's entries and held stays at 10,000. The ages and the held
/// endpoints come from each endpoint's first due event, whatever the size.
#[tokio::test]
async fn queue_gauges_count_up_to_10000_and_estimate_past_it() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let gauges = Maintenance::new(db.pool(), Duration::from_secs(60), Duration::from_secs(60));
    // Company 1 is held (its circuit open) with 12,000 events, the oldest
    // due two hours ago; company 2 has 500, due for 10 minutes; company 3
    // has one retry scheduled for later.
    client
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, created_at, next_attempt_at)
             SELECT 1, '{}', now() - interval '2 hours' + g * interval '1 second',
                    now() - interval '2 hours' + g * interval '1 second'
               FROM generate_series(0, 11999) g;
             INSERT INTO outbox.events (company_id, payload, created_at, next_attempt_at)
             SELECT 2, '{}', now() - interval '10 minutes', now() - interval '10 minutes'
               FROM generate_series(1, 500);
             INSERT INTO outbox.events (company_id, payload, created_at, next_attempt_at, attempts)
             VALUES (3, '{}', now() - interval '5 hours', now() + interval '1 hour', 3);
             INSERT INTO outbox.endpoint_circuits (company_id, event_type, state, opened_at, retry_at, failures)
             VALUES (1, 'payment.cancellation', 'open', now(), now() + interval '1 hour', 5);",
        )
        .await
        .unwrap();
    client
        .batch_execute("VACUUM ANALYZE outbox.events")
        .await
        .unwrap();
    let stats = gauges.run_once().await.unwrap();
    assert_eq!(stats.held, 10_000, "held stops at 10,000: {stats:?}");
    assert!(
        (11_000..14_000).contains(&stats.pending),
        "pending is estimated near 12,501: {stats:?}"
    );
    let age = |d: Duration| d.as_secs();
    assert!(
        (7190..7300).contains(&age(stats.oldest_held_age)),
        "{stats:?}"
    );
    assert!((590..700).contains(&age(stats.oldest_due_age)), "{stats:?}");
    assert_eq!(stats.endpoints_held, 1);
    // `outboxd status` says what the limit means.
    let status = crate::harness::run(db.outboxd().arg("status")).await;
    assert!(
        status
            .stdout
            .contains("held:        10000 or more events, the oldest due enqueued 2h"),
        "{status:?}"
    );
    // Below the limit, exact again.
    client
        .batch_execute("DELETE FROM outbox.events WHERE company_id = 1 AND created_at > now() - interval '2 hours' + interval '2999 seconds'")
        .await
        .unwrap();
    let stats = gauges.run_once().await.unwrap();
    assert_eq!((stats.pending, stats.held), (3_501, 3_000), "{stats:?}");
}
