//! Failover (issue 24): a primary and its synchronous streaming standby,
//! two private clusters, and the daemon given both hosts the way libpq
//! users write it (`host1,host2` with `target_session_attrs=read-write`).
//! The primary crashes mid-drain (`pg_ctl stop -m immediate`) and the
//! standby is promoted. And the part of it that a crash may or may not
//! hit: a claim that commits while its reply is lost.

use std::time::{Duration, Instant};

use crate::faults::{assert_delivered_and_marked_once, delivered, endpoint, enqueue_many};
use crate::harness::{Daemon, TestDb, connect_url, count, eventually, url_with_dbname};
use crate::private_pg::PrivatePg;
use crate::proxy::Proxy;
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
    // The LISTEN connection came back, on the new primary.
    daemon
        .wait_for_logs("listening for NOTIFY", 2, SECS(15))
        .await;
    // A fenced outcome says why, truthfully: no lease ran out here (60 s).
    for line in &log {
        assert!(
            !line.contains("lease ran out"),
            "a lease ran out in a run shorter than the lease: {line}"
        );
        assert!(!line.contains("panicked"), "outboxd panicked: {line}");
    }
}

/// A claim that commits while its reply is lost (what a failover does to a
/// claim that reached the synchronous standby, as the failover test above
/// may or may not catch) leaves a lease this instance does not know of. It
/// is handed back before the next claim, and the event goes out at once,
/// once, instead of after its lease (60 s, and the lease expiry's 15 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_whose_reply_is_lost_is_handed_back_at_once_and_sent_once() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    endpoint(&client, 1, "payment.cancellation", &receiver.url("/")).await;
    // The claim sleeps 0.6 s per row it leases: time to lose its reply.
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
    let (proxy, via_proxy) = Proxy::in_front_of(&db).await;
    // The default lease, 60 s.
    let daemon = Daemon::start(
        &db,
        &[
            ("OUTBOXD_DATABASE__URL", via_proxy.as_str()),
            ("OUTBOXD_DATABASE__CONNECT_TIMEOUT", "1s"),
        ],
    )
    .await;
    client
        .batch_execute("SELECT outbox.enqueue_payment_cancellation(1, 222125, '2271')")
        .await
        .unwrap();
    eventually("the claim is sleeping in the trigger", SECS(10), || async {
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
    let lost_at = Instant::now();
    proxy.lose_replies();
    // The claim commits without anyone hearing it: leased, attempt 1.
    eventually("the claim to commit unheard", SECS(10), || async {
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE state = 'leased' AND attempts = 1",
        )
        .await
            == 1
            || count(
                &client,
                "SELECT count(*) FROM outbox.events WHERE attempts = 2",
            )
            .await
                == 1
    })
    .await;
    receiver.wait_for(1, SECS(10)).await;
    let took = lost_at.elapsed();
    eventually("the event marked delivered", SECS(10), || async {
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        )
        .await
            == 1
    })
    .await;
    eprintln!("lost claim reply: the event went out {took:?} after the reply was lost");
    assert!(took < SECS(10), "sent {took:?} after the lost reply");
    // The lost claim counts as an attempt (it may have been anything), and
    // nothing of it was sent: one request, by the second claim.
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox.events WHERE state = 'delivered' AND attempts = 2"
        )
        .await,
        1
    );
    assert_eq!(receiver.received().len(), 1);
    daemon.wait_for_log("unknown to it", SECS(1)).await;
    // Counted as handed back, and its second claim not as an expired lease.
    let (_, metrics) = crate::harness::http_get(&format!("{}/metrics", daemon.admin)).await;
    let metrics = crate::ops::samples(&metrics);
    assert_eq!(
        metrics.get("outboxd_leases_handed_back_total{why=\"unknown\"}"),
        Some(&1.0)
    );
    assert_eq!(metrics.get("outboxd_leases_expired_total"), Some(&0.0));
    for line in daemon.log() {
        assert!(!line.contains("panicked"), "outboxd panicked: {line}");
    }
}
