//! The fenced record statement, driven directly: the guarantees the daemon
//! relies on, without HTTP in the way.

use std::time::{Duration, SystemTime};

use outboxd::backoff::RetryPolicy;
use outboxd::config::CircuitConfig;
use outboxd::http::classify::Verdict;
use outboxd::model::{AttemptKind, ClaimedEvent, NextState, Outcome, Refusal};
use outboxd::policy;
use outboxd::store::claim;
use outboxd::store::record;

use crate::harness::TestDb;
use crate::harness::count;

/// The plain claim, as a daemon with nothing in flight makes it.
async fn claim_plain(
    client: &deadpool_postgres::Client,
    limit: usize,
    owner: &str,
    lease: Duration,
) -> Vec<ClaimedEvent> {
    claim::claim(
        client,
        claim::Mode::Plain(&claim::Skip::default()),
        limit,
        owner,
        lease,
        claim::Caps::SHIPPED,
        &claim::InFlight::default(),
    )
    .await
    .unwrap()
    .events
}

/// The fair claim from the first endpoint on, as a daemon with nothing in
/// flight makes it; committed.
async fn claim_fair(client: &deadpool_postgres::Client, limit: usize) -> claim::Claim {
    crate::harness::claim_with(
        client,
        claim::Mode::Fair(&claim::Cursor::default()),
        limit,
        &claim::InFlight::default(),
    )
    .await
}

/// Writes `outcomes` as `owner` with the default circuit settings; returns
/// the ids marked.
async fn write(
    client: &deadpool_postgres::Client,
    owner: &str,
    outcomes: &[Outcome],
    again: bool,
) -> Vec<uuid::Uuid> {
    record::write(
        client,
        owner,
        outcomes,
        again,
        &CircuitConfig::default(),
        Duration::from_secs(900),
    )
    .await
    .unwrap()
    .marked
}

/// One round of the daemon's lease expiry service: puts back in the queue
/// the events whose lease ran out; returns how many, and whether it woke
/// the claim loop.
async fn release_expired(pool: &deadpool_postgres::Pool) -> (i64, bool) {
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let config = outboxd::config::RawConfig::default().validate().unwrap();
    let released = outboxd::maintenance::LeaseExpiry::new(
        pool.clone(),
        &config.delivery,
        Duration::from_secs(10),
        wake.clone(),
    )
    .run_once()
    .await
    .unwrap();
    let woken = tokio::time::timeout(Duration::from_millis(1), wake.notified())
        .await
        .is_ok();
    (released, woken)
}

/// What the daemon makes of a 200 with status "1" for `e`.
fn delivered(e: &ClaimedEvent) -> Outcome {
    policy::decide(
        e,
        Verdict::Delivered {
            message: Some("ok".into()),
        },
        SystemTime::now(),
        Duration::from_millis(3),
        Some(200),
        &RetryPolicy::default(),
        0.0,
    )
}

#[tokio::test]
async fn a_late_outcome_from_an_expired_lease_never_overwrites_the_newer_claim() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let client = pool.get().await.unwrap();
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(1, 1, '1')")
        .await
        .unwrap();
    // Instance A claims with a lease that is already over; the lease expiry
    // puts it back; B claims again.
    let a = claim_plain(&client, 10, "a", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await; // let A's 1 ms lease lapse
    assert!(
        claim_plain(&client, 10, "b", Duration::from_secs(60))
            .await
            .is_empty()
    );
    assert_eq!(release_expired(&pool).await.0, 1);
    let b = claim_plain(&client, 10, "b", Duration::from_secs(60)).await;
    assert_eq!(
        (a[0].attempt, b[0].attempt, b[0].lease_expired),
        (1, 2, true)
    );

    // B fails it for good; then A's late success arrives.
    let mut failed = delivered(&b[0]);
    failed.next = NextState::Failed;
    failed.kind = AttemptKind::Rejected;
    failed.error = Some("rejected".into());
    assert_eq!(write(&client, "b", &[failed], false).await.len(), 1);
    let late = record::write(
        &client,
        "a",
        &[delivered(&a[0])],
        false,
        &CircuitConfig::default(),
        Duration::from_secs(900),
    )
    .await
    .unwrap();
    assert!(late.marked.is_empty(), "fenced out");
    // And it says why, as the row was: claimed again, at attempt 2, failed.
    assert_eq!(
        late.fenced,
        [record::Fenced {
            id: a[0].id,
            reason: record::FenceReason::ClaimedAgain,
            attempts: Some(2),
            state: Some("failed".into()),
        }]
    );

    let row = client
        .query_one(
            "SELECT state, attempts, delivered_at IS NULL FROM outbox.events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, bool>(2)
        ),
        ("failed".to_string(), 2, true)
    );
    let logged = count(&client, "SELECT count(*) FROM outbox.attempts").await;
    assert_eq!(logged, 2, "both attempts were made, both are logged");
}

#[tokio::test]
async fn a_group_written_again_after_a_lost_reply_reads_as_marked_not_fenced() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, g, 'P' || g) FROM generate_series(1, 3) g",
        )
        .await
        .unwrap();
    let events = claim_plain(&client, 10, "a", Duration::from_secs(60)).await;
    let outcomes: Vec<Outcome> = events.iter().map(delivered).collect();
    assert_eq!(write(&client, "a", &outcomes, false).await.len(), 3);
    // The same group once more, as the recorder does after an error whose
    // commit may have gone through.
    assert_eq!(write(&client, "a", &outcomes, true).await.len(), 3);
    assert!(write(&client, "a", &outcomes, false).await.is_empty());
    let attempts = count(&client, "SELECT count(*) FROM outbox.attempts").await;
    assert_eq!(attempts, 3, "no attempt logged twice");
}

#[tokio::test]
async fn a_lease_that_ran_out_goes_back_to_the_queue_and_its_late_outcome_counts_until_claimed_again()
 {
    let db = TestDb::new().await;
    let pool = db.pool();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, 1, '1');
             SELECT outbox.enqueue_payment_cancellation(1, 2, '2');",
        )
        .await
        .unwrap();
    let a = claim_plain(&client, 10, "a", Duration::from_millis(1)).await;
    assert_eq!(a.len(), 2);
    // A live lease is left alone.
    let live = claim_plain(&client, 10, "a", Duration::from_secs(60)).await;
    assert!(live.is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await; // let the 1 ms leases lapse
    assert_eq!(release_expired(&pool).await, (2, true));
    assert_eq!(release_expired(&pool).await, (0, false), "once each");
    let back = "SELECT count(*) FROM outbox.events
                 WHERE state = 'pending' AND lease_owner = 'a'
                   AND attempts = 1 AND next_attempt_at <= now()";
    assert_eq!(
        count(&client, back).await,
        2,
        "pending, due, attempt and owner kept"
    );

    // A's outcome for the first arrives before anyone claims it again: it
    // is the outcome of a real attempt, and it is recorded.
    let marked = write(&client, "a", &[delivered(&a[0])], false).await;
    assert_eq!(marked, [a[0].id]);
    // The second is claimed again (as a lease taken over), and A's late
    // outcome for it is then fenced out.
    let b = claim_plain(&client, 10, "b", Duration::from_secs(60)).await;
    assert_eq!(
        b.iter()
            .map(|e| (e.id, e.attempt, e.lease_expired))
            .collect::<Vec<_>>(),
        [(a[1].id, 2, true)]
    );
    assert!(
        write(&client, "a", &[delivered(&a[1])], false)
            .await
            .is_empty()
    );
    let rows = client
        .query(
            "SELECT state, attempts, lease_owner FROM outbox.events ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, i32, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            ("delivered".to_string(), 1, None),
            ("leased".to_string(), 2, Some("b".to_string()))
        ]
    );
}

#[tokio::test]
async fn an_event_whose_attempts_ran_out_with_its_leases_fails_and_its_company_is_told() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let client = pool.get().await.unwrap();
    // Four claims whose leases ran out (their daemon died each time): the
    // fifth claim is over a budget of 4 attempts.
    client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url, notify_emails)
             VALUES (1, 'https://erp.example.com/hooks', '{ops@example.com}');
             SELECT outbox.enqueue_payment_cancellation(1, 1, '1');
             UPDATE outbox.events SET attempts = 4, lease_owner = 'dead';",
        )
        .await
        .unwrap();
    let claimed = claim_plain(&client, 10, "a", Duration::from_secs(60)).await;
    let refusal = outboxd::http::request::prepare(&claimed[0], 4).unwrap_err();
    assert!(
        matches!(refusal, Refusal::BudgetSpent { attempts: 4 }),
        "{refusal:?}"
    );
    let marked = write(
        &client,
        "a",
        &[policy::refused(&claimed[0], &refusal)],
        false,
    )
    .await;
    assert_eq!(marked, [claimed[0].id]);
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE state = 'failed'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.notifications WHERE email_id IS NULL"
        )
        .await,
        1,
        "a notification waits for the mailer"
    );
}

/// Issue 25, point 5: a fair claim with room for fewer events than there
/// are circuits ready to probe makes half-open only as many as it probes.
/// (Before, it flipped all three to half-open and probed one; the other
/// two waited a whole lease with no probe out.) Since issue 26 the walk
/// also stops at the first endpoint able to send when one is wanted, so
/// the other two circuits are not even looked at by this claim.
#[tokio::test]
async fn a_claim_makes_half_open_only_the_circuits_it_probes() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'https://erp' || c || '.example.com/' FROM generate_series(1, 3) AS c;
             SELECT outbox.enqueue_payment_cancellation(c, c, 'P' || c) FROM generate_series(1, 3) AS c;
             INSERT INTO outbox.endpoint_circuits (company_id, event_type, state, failures, opened_at, retry_at, cooldown_ms)
             SELECT c, 'payment.cancellation', 'open', 5, now() - interval '1 minute',
                    now() - c * interval '1 second', 30000
               FROM generate_series(1, 3) AS c;",
        )
        .await
        .unwrap();
    let pool = db.pool();
    let pooled = pool.get().await.unwrap();
    let claimed = claim_fair(&pooled, 1).await;
    assert_eq!(claimed.events.len(), 1);
    let probe = &claimed.events[0];
    assert!(probe.probe);
    // The first endpoint in the walk's order (from the start: company 1).
    assert_eq!(probe.company_id, 1);
    let half_open = count(
        &client,
        "SELECT count(*) FROM outbox.endpoint_circuits WHERE state = 'half_open'",
    )
    .await;
    assert_eq!(half_open, 1, "only the probed circuit is half-open");
    let open = count(
        &client,
        "SELECT count(*) FROM outbox.endpoint_circuits WHERE state = 'open' AND retry_at <= now()",
    )
    .await;
    assert_eq!(open, 2, "the others stay open, ready for the next claim");
}

/// A circuit whose probe's row another claim holds at that moment (a plain
/// claim locks the rows it reads, held ones too) stays open for the next
/// claim; before, the fair claim made it half-open, found the row locked,
/// and the circuit waited a whole lease with no probe out.
#[tokio::test]
async fn a_circuit_whose_probe_row_is_locked_elsewhere_stays_open() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (1, 'https://erp1.example.com/');
             SELECT outbox.enqueue_payment_cancellation(1, 1, 'P1');
             INSERT INTO outbox.endpoint_circuits
                    (company_id, event_type, state, failures, opened_at, retry_at, cooldown_ms)
             VALUES (1, 'payment.cancellation', 'open', 5, now() - interval '1 minute',
                     now() - interval '1 second', 30000);",
        )
        .await
        .unwrap();
    // Another claim holds the row.
    let mut other = db.client().await;
    let holding = other.transaction().await.unwrap();
    holding
        .execute(
            "SELECT id FROM outbox.events WHERE company_id = 1 FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let pool = db.pool();
    let pooled = pool.get().await.unwrap();
    let claimed = claim_fair(&pooled, 4).await;
    assert!(claimed.events.is_empty());
    let state: String = client
        .query_one("SELECT state FROM outbox.endpoint_circuits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        state, "open",
        "no probe could be taken: the circuit stays open"
    );

    // Once the row is free, the next claim probes.
    holding.rollback().await.unwrap();
    let claimed = claim_fair(&pooled, 4).await;
    assert_eq!(claimed.events.len(), 1);
    assert!(claimed.events[0].probe);
}

/// Issue 25, point 5: a group written again (an earlier try that timed out
/// after its statements, or whose reply was lost) does not move the
/// circuits a second time: two timeouts counted twice would read as four
/// failures in a row. Only what the statement marked itself is news.
#[tokio::test]
async fn a_group_written_again_does_not_count_its_failures_twice() {
    let db = TestDb::new().await;
    let pool = db.pool();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "SELECT outbox.enqueue_payment_cancellation(1, g, 'P' || g) FROM generate_series(1, 2) g",
        )
        .await
        .unwrap();
    let events = claim_plain(&client, 10, "a", Duration::from_secs(60)).await;
    let timeouts: Vec<Outcome> = events
        .iter()
        .map(|e| {
            policy::decide(
                e,
                Verdict::Retry {
                    reason: "timed out after 10s".into(),
                    message: None,
                    retry_after: None,
                },
                SystemTime::now(),
                Duration::from_secs(10),
                None,
                &RetryPolicy::default(),
                0.0,
            )
        })
        .collect();
    let failures = || async {
        count(
            &client,
            "SELECT coalesce(sum(failures), 0)::bigint FROM outbox.endpoint_circuits",
        )
        .await
    };
    assert_eq!(write(&client, "a", &timeouts, false).await.len(), 2);
    assert_eq!(failures().await, 2);
    assert_eq!(write(&client, "a", &timeouts, true).await.len(), 2);
    assert_eq!(failures().await, 2, "the same two timeouts counted again");
}
