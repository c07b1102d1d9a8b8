//! Upgrading under load: `outboxd migrate` takes the previous release's
//! schema to this one's while the application enqueues and a daemon of the
//! previous release goes on delivering, as in a rolling upgrade (the
//! migration first, the daemons replaced after).
//!
//! The previous release is the commit named in `tests/previous-release`,
//! built from this clone's history by `scripts/test` (`PREVIOUS_OUTBOXD`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Daemon, TempDir, TestDb, count, eventually_count, run};
use crate::receiver::Receiver;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The previous release's `outboxd` on `db`, with its built-in defaults
/// (this repository's config.toml may hold keys it does not know) in an
/// empty config file under `dir`.
fn previous(db: &TestDb, dir: &TempDir) -> tokio::process::Command {
    let bin = std::env::var_os("PREVIOUS_OUTBOXD").unwrap_or_else(|| {
        panic!("PREVIOUS_OUTBOXD is not set: run the tests with scripts/test, which builds it")
    });
    let config = dir.join("config.toml");
    std::fs::write(&config, "").unwrap();
    let mut cmd = tokio::process::Command::new(bin);
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOXD_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.arg("--config")
        .arg(config)
        .env("OUTBOXD_DATABASE__URL", &db.url)
        .env("OUTBOXD_DELIVERY__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#)
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn the_light_enqueue_migration_keeps_enqueues_flowing_and_the_previous_daemon_delivering() {
    let db = TestDb::empty().await;
    let dir = TempDir::new("previous-release");
    let migrated = run(previous(&db, &dir).arg("migrate")).await;
    assert_eq!(migrated.code, Some(0), "{migrated:?}");
    assert!(migrated.stdout.contains("to 8"), "{migrated:?}");
    let client = db.client().await;
    // A history for the online index build to read.
    client
        .batch_execute(
            r#"INSERT INTO outbox.events (company_id, payload, state, attempts, delivered_at)
               SELECT 1000 + g % 500, jsonb_build_object('companyId', 1000 + g % 500, 'paymentId', g, 'paymentNumber', 'H'),
                      'delivered', 1, now()
                 FROM generate_series(1, 200000) g"#,
        )
        .await
        .unwrap();
    let receiver = Receiver::ok().await;
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (7, $1)",
            &[&receiver.url("/")],
        )
        .await
        .unwrap();
    let old = Daemon::spawn(previous(&db, &dir)).await;

    // The application: two sessions enqueueing one event per transaction,
    // each enqueue timed.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2i64)
        .map(|w| {
            let url = db.url.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = crate::harness::connect_url(&url).await;
                let (mut n, mut worst) = (0i64, Duration::ZERO);
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let started = Instant::now();
                    client
                        .execute(
                            "SELECT outbox.enqueue_payment_cancellation(7, $1, 'U')",
                            &[&(w * 1_000_000 + n)],
                        )
                        .await
                        .unwrap();
                    worst = worst.max(started.elapsed());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (n, worst)
            })
        })
        .collect();
    // And one of its transactions that enqueues, then stays open for 3 s
    // holding outbox.events: the migration must not queue every other
    // enqueue behind it.
    let mut long = db.client().await;
    let long_tx = tokio::spawn(async move {
        let tx = long.transaction().await.unwrap();
        tx.execute(
            "SELECT outbox.enqueue_payment_cancellation(7, 999999, 'LONG')",
            &[],
        )
        .await
        .unwrap();
        tokio::time::sleep(SECS(3)).await;
        tx.commit().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let migrated = run(db.outboxd().arg("migrate")).await;
    let took = started.elapsed();
    long_tx.await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let (mut enqueued, mut worst) = (1, Duration::ZERO);
    for writer in writers {
        let (n, w) = writer.await.unwrap();
        enqueued += n;
        worst = worst.max(w);
    }
    assert_eq!(migrated.code, Some(0), "{migrated:?}");
    // 0009 and what came after it.
    let latest = outboxd::store::migrate::latest_version();
    assert!(
        migrated
            .stdout
            .contains(&format!("to {latest} (applied 9, 10")),
        "{migrated:?}"
    );
    assert!(
        migrated
            .stdout
            .contains("built indexes online: events_company_settled"),
        "{migrated:?}"
    );
    assert!(
        migrated
            .stdout
            .contains("dropped replaced indexes online: events_company_created"),
        "{migrated:?}"
    );
    assert!(
        migrated.stderr.contains("held by another transaction"),
        "the open transaction made the migration wait and try again: {migrated:?}"
    );
    assert!(
        took >= SECS(2),
        "migrated in {took:?} past a 3 s transaction"
    );
    assert!(
        worst < SECS(1),
        "an enqueue waited {worst:?} during a {took:?} migration"
    );

    // The previous release's daemon delivers everything, once each.
    eventually_count(
        &client,
        "every new event delivered",
        SECS(60),
        "SELECT count(*) FROM outbox.events WHERE state <> 'delivered'",
        0,
    )
    .await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE company_id = 7"
        )
        .await,
        enqueued
    );
    let mut keys: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    let requests = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len() as i64, enqueued, "{requests} requests");
    assert!(old.stop().await.success());
}
