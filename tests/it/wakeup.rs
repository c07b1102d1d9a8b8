//! The wake-up (migration 0009, `claim::FollowUp`): the enqueue notifies at
//! most once per quarter second, and the daemon, once woken, keeps looking
//! while events keep arriving. What that promises: events are not late,
//! a stopped listener cannot fill PostgreSQL's notify queue, and polling
//! still finds what no notification announced.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Daemon, TestDb, count, eventually_count, notifications_before_marker};
use crate::receiver::Receiver;

const SECS: fn(u64) -> Duration = Duration::from_secs;

async fn endpoint(db: &TestDb, company: i64, url: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES ($1, $2)",
            &[&company, &url],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_committed_right_after_a_wake_up_arrives_without_waiting_for_the_poll() {
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    endpoint(&db, 6316, &receiver.url("/")).await;
    // A poll a minute apart: anything late waited for it.
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__POLL_INTERVAL", "60s")]).await;
    daemon.wait_for_log("outboxd is delivering", SECS(5)).await;
    let (_listener, mut notifications) = db.listen_with_marker().await;

    // As right after an enqueue that notified: the next minute is quiet
    // (no enqueue in it notifies), and the daemon has been woken.
    let admin = db.client().await;
    admin
        .batch_execute(
            "SELECT setval('outbox.wakeup', (extract(epoch FROM now() + interval '60 seconds') * 1000)::bigint);
             NOTIFY outbox_events;",
        )
        .await
        .unwrap();
    assert_eq!(
        notifications_before_marker(&db, &mut notifications).await,
        1
    );

    // The burst: 40 single-event transactions from four sessions.
    let started = Instant::now();
    let writers: Vec<_> = (0..4i64)
        .map(|w| {
            let url = db.url.clone();
            tokio::spawn(async move {
                let client = crate::harness::connect_url(&url).await;
                for n in 0..10 {
                    client
                        .execute(
                            "SELECT outbox.enqueue_payment_cancellation(6316, $1, 'B')",
                            &[&(w * 100 + n + 1)],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let committed = started.elapsed();
    assert_eq!(
        notifications_before_marker(&db, &mut notifications).await,
        0,
        "the burst itself notified nothing"
    );
    receiver.wait_for(40, SECS(10)).await;
    let took = started.elapsed();
    assert!(
        took < SECS(10),
        "{took:?} (burst committed in {committed:?}): waited for the poll"
    );
    assert!(daemon.stop().await.success());
}

/// The fraction of PostgreSQL's notify queue in use (by pages).
async fn queue_usage(client: &tokio_postgres::Client) -> f64 {
    client
        .query_one("SELECT pg_notification_queue_usage()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_daemon_cannot_fill_the_notify_queue_and_enqueues_keep_committing() {
    // A LISTEN session that stops reading (here the daemon, stopped with
    // SIGSTOP) keeps PostgreSQL from truncating its notify queue; when the
    // queue is full, every COMMIT that notifies fails. Writers enqueue
    // flat out meanwhile: the notifications must come at most four a
    // second, however many enqueue, and every commit must succeed.
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    endpoint(&db, 7, &receiver.url("/")).await;
    let mut daemon = Daemon::start(&db, &[]).await;
    let (_listener, mut notifications) = db.listen_with_marker().await;
    let admin = db.client().await;
    let before = queue_usage(&admin).await;
    daemon.signal(libc::SIGSTOP);

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..8i64)
        .map(|w| {
            let url = db.url.clone();
            let stop = stop.clone();
            let committed = committed.clone();
            tokio::spawn(async move {
                let mut client = crate::harness::connect_url(&url).await;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let tx = client.transaction().await.unwrap();
                    tx.execute(
                        "SELECT outbox.enqueue_payment_cancellation(7, $1, 'S')",
                        &[&(w * 10_000_000 + n)],
                    )
                    .await
                    .unwrap();
                    // Every commit succeeds: unwrap fails the test if not.
                    tx.commit().await.unwrap();
                    committed.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(SECS(8)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let took = started.elapsed();
    let after = queue_usage(&admin).await;
    let commits = committed.load(Ordering::Relaxed);
    let sent = notifications_before_marker(&db, &mut notifications).await;
    eprintln!(
        "{commits} enqueuing commits in {took:?} beside a stopped listener: {sent} notifications \
         ({:.1}/s); pg_notification_queue_usage {before} -> {after}",
        sent as f64 / took.as_secs_f64()
    );
    // The queue grows by what is sent (its usage moves only once the
    // stopped session's socket buffers, a few hundred KB, are full, which
    // at four small notifications a second takes days): so the rate is
    // what is checked. One notification per commit would fill the 8 GB
    // queue in hours at this machine's rate (docs/RELIABILITY.md).
    let most = (took.as_millis() / 250 + 1) as usize;
    assert!(
        sent <= most,
        "{sent} notifications in {took:?}: at most {most}"
    );
    assert!(commits > 500, "only {commits} commits in {took:?}");

    // Woken again, the daemon delivers every one.
    daemon.signal(libc::SIGCONT);
    let client = db.client().await;
    // Tens of thousands of events of one endpoint, at its cap of 8 in
    // flight: about 700 a second with a debug build on the development VM
    // (the previous release's code too), so a minute was too close.
    eventually_count(
        &client,
        "every event delivered",
        SECS(180),
        "SELECT count(*) FROM outbox.events WHERE state <> 'delivered'",
        0,
    )
    .await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.events").await,
        commits as i64
    );
    assert!(daemon.is_running());
    assert!(daemon.stop().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_no_notification_announced_still_arrives_by_polling() {
    // NOTIFY is a hint: a row written around the enqueue functions (by the
    // schema's owner) announces nothing, and the poll finds it.
    let db = TestDb::new().await;
    let receiver = Receiver::ok().await;
    endpoint(&db, 6316, &receiver.url("/")).await;
    let daemon = Daemon::start(&db, &[("OUTBOXD_DELIVERY__POLL_INTERVAL", "300ms")]).await;
    let (_listener, mut notifications) = db.listen_with_marker().await;
    db.client()
        .await
        .batch_execute(
            r#"INSERT INTO outbox.events (company_id, payload)
               VALUES (6316, '{"companyId": 6316, "paymentId": 1, "paymentNumber": "1"}')"#,
        )
        .await
        .unwrap();
    assert_eq!(
        notifications_before_marker(&db, &mut notifications).await,
        0
    );
    receiver.wait_for(1, SECS(10)).await;
    assert!(daemon.stop().await.success());
}
