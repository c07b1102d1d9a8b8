//! Failover (issue 24): a primary and its synchronous streaming standby,
//! two private clusters, and the daemon given both hosts the way libpq
//! users write it (`host1,host2` with `target_session_attrs=read-write`).
//! The primary crashes mid-drain (`pg_ctl stop -m immediate`) and the
//! standby is promoted.

use std::time::{Duration, Instant};

use crate::faults::{assert_delivered_and_marked_once, delivered, endpoint, enqueue_many};
use crate::harness::{Daemon, TestDb, connect_url, eventually, url_with_dbname};
use crate::private_pg::PrivatePg;
use crate::receiver::{Receiver, Reply};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The promise: every event has gone out this soon after the promotion
/// (the last third of the backlog takes about 2 s at full speed here;
/// before issue 24 the last went out 73 s after it, with its lease).
const ALL_OUT_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_to_the_synchronous_standby_mid_drain_flows_again_within_seconds_without_duplicates()
 {
    const EVENTS: i64 = 3000;
    const COMPANIES: i64 = 10;
    const CONCURRENCY: usize = 64;
    let primary = PrivatePg::start_primary().await;
    let standby = PrivatePg::standby_of(&primary).await;
    let db = TestDb::new_on(&primary.admin_url()).await;
    let client = db.client().await;
    // 100 ms per answer: 64 slots hold 64 requests in flight at any moment,
    // and the drain lasts seconds, so the crash comes in the middle of it.
    let receiver = Receiver::start(|_, _| {
        Reply::Delayed(
            Duration::from_millis(100),
            Box::new(Reply::Json(
                200,
                serde_json::json!({"status": "1", "message": "ok"}),
            )),
        )
    })
    .await;
    for company in 1..=COMPANIES {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    enqueue_many(&client, EVENTS, COMPANIES, 500).await;
    drop(client);

    // Both hosts, as a libpq user writes them; the default lease (60 s),
    // so that events left to their leases would show.
    let both = url_with_dbname(
        &format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
            primary.port, standby.port
        ),
        &db.name,
    );
    let concurrency = CONCURRENCY.to_string();
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_DATABASE__URL", &both),
            ("OUTBOXD_DATABASE__CONNECT_TIMEOUT", "1s"),
            ("OUTBOXD_DELIVERY__CONCURRENCY", &concurrency),
        ],
    )
    .await;

    receiver.wait_for(2000, SECS(30)).await;
    let crashed_at = Instant::now();
    primary.crash().await;
    let before = receiver.received().len();
    standby.promote().await;
    let promoted_at = Instant::now();
    eprintln!(
        "failover: {before} requests before the crash, promoted {:?} after it",
        promoted_at - crashed_at
    );

    let client = connect_url(&url_with_dbname(&standby.admin_url(), &db.name)).await;
    // Generous: before issue 24 it took 74 s (leases left to run out), and
    // the test should say how long rather than only that it timed out.
    eventually(
        "every event delivered on the new primary",
        SECS(100),
        || async { delivered(&client).await == EVENTS },
    )
    .await;
    let done_at = Instant::now();
    assert!(
        (before as i64) < EVENTS,
        "the crash came mid-drain ({before} requests before it)"
    );

    // Flowing again: the first request that arrived after the promotion.
    let requests = receiver.received();
    let flows_again = requests
        .iter()
        .map(|r| r.at)
        .filter(|at| *at > promoted_at)
        .min()
        .expect("requests after the promotion")
        - promoted_at;
    let last = requests.iter().map(|r| r.at).max().unwrap() - promoted_at;

    let mut seen = std::collections::HashMap::<String, u32>::new();
    for request in &requests {
        let key = request.header("idempotency-key").unwrap_or_default();
        *seen.entry(key.to_string()).or_default() += 1;
    }
    let duplicated = seen.values().filter(|n| **n > 1).count();
    let log = daemon.log();
    let fenced = log
        .iter()
        .filter(|l| l.contains("outcome not recorded"))
        .count();
    let handed_back: Vec<&String> = log.iter().filter(|l| l.contains("unknown to it")).collect();
    eprintln!(
        "failover: flows again {flows_again:?} after the promotion, last request {last:?} after it, \
         all marked {:?} after it; duplicates at the receiver {duplicated} ({CONCURRENCY} slots); \
         fenced outcomes {fenced}; hand-backs of unknown leases: {handed_back:?}",
        done_at - promoted_at,
    );
    assert!(
        last < ALL_OUT_WITHIN,
        "the last event went out {last:?} after the promotion (first {flows_again:?})"
    );
    assert!(
        duplicated <= CONCURRENCY,
        "{duplicated} events reached the receiver twice, with {CONCURRENCY} slots"
    );
    // Each event marked once, by the delivery the receiver got; one that
    // arrived twice was claimed twice.
    assert_delivered_and_marked_once(&client, &receiver, EVENTS).await;
    // A fenced outcome says why, truthfully: no lease ran out here (60 s).
    for line in &log {
        assert!(
            !line.contains("lease ran out"),
            "a lease ran out in a run shorter than the lease: {line}"
        );
        assert!(!line.contains("panicked"), "outboxd panicked: {line}");
    }
}
