//! The fenced record statement, driven directly: the guarantees the daemon
//! relies on, without HTTP in the way.

use std::time::{Duration, SystemTime};

use outboxd::backoff::RetryPolicy;
use outboxd::claim;
use outboxd::classify::Verdict;
use outboxd::config::CircuitConfig;
use outboxd::record::{self, AttemptKind, NextState, Outcome};

use crate::harness::TestDb;
use crate::harness::count;

/// The plain claim, as a daemon with nothing in flight makes it.
async fn claim_plain(
    client: &deadpool_postgres::Client,
    limit: usize,
    owner: &str,
    lease: Duration,
) -> Vec<claim::ClaimedEvent> {
    claim::claim(
        client,
        claim::Mode::Plain,
        limit,
        owner,
        lease,
        8,
        &claim::InFlight::default(),
    )
    .await
    .unwrap()
    .events
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

/// What the daemon makes of a 200 with status "1" for `e`.
fn delivered(e: &claim::ClaimedEvent) -> Outcome {
    record::decide(
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
    // Instance A claims with a lease that is already over; B claims again.
    let a = claim_plain(&client, 10, "a", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await; // let A's 1 ms lease lapse
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
    let late = write(&client, "a", &[delivered(&a[0])], false).await;
    assert!(late.is_empty(), "fenced out");

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
