//! The maintenance election with real daemons: of several instances on one
//! database exactly one does the maintenance (its metric, the advisory lock
//! in pg_locks, the queue gauges on its /metrics only, the expired lease it
//! puts back); when it dies (SIGKILL) another takes over within seconds and
//! does the work; when it stops (SIGTERM) it hands over at once.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use outboxd::election::{LOCK_KEY, SILENCE};

use crate::harness::{Daemon, TestDb, eventually, eventually_count, http_get};
use crate::receiver::Receiver;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Short cadences so the test sees several rounds: the gauges every 200 ms,
/// lease expiry every 3 s (a quarter of the shortest lease allowed with a
/// 1 s request timeout).
const ENV: &[(&str, &str)] = &[
    ("OUTBOXD_METRICS__REFRESH_INTERVAL", "200ms"),
    ("OUTBOXD_DELIVERY__POLL_INTERVAL", "100ms"),
    ("OUTBOXD_DELIVERY__CONNECT_TIMEOUT", "1s"),
    ("OUTBOXD_DELIVERY__REQUEST_TIMEOUT", "1s"),
    ("OUTBOXD_DELIVERY__LEASE", "12s"),
];

/// The log line of an instance that found the role taken.
const STANDING_BY: &str = "this one stands by";

/// The log line of a lease expiry round that put events back.
const RELEASED: &str = "events whose lease ran out";

/// The value of the unlabelled sample `name` on a daemon's /metrics, None
/// if the family is not shown.
async fn sample(daemon: &Daemon, name: &str) -> Option<f64> {
    let (status, body) = http_get(&format!("{}/metrics", daemon.admin)).await;
    assert_eq!(status, 200);
    body.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .next()
}

/// The indexes of the daemons whose /metrics say they lead.
async fn leaders(daemons: &mut [Daemon]) -> Vec<usize> {
    let mut found = Vec::new();
    for (i, d) in daemons.iter_mut().enumerate() {
        if d.is_running() && sample(d, "outboxd_maintenance_leader").await == Some(1.0) {
            found.push(i);
        }
    }
    found
}

/// Backends of this database holding (or waiting for) the maintenance
/// lock: (pid, granted).
async fn lock_holders(client: &tokio_postgres::Client) -> Vec<(i32, bool)> {
    let classid = LOCK_KEY >> 32;
    let objid = LOCK_KEY & 0xffff_ffff;
    client
        .query(
            "SELECT l.pid, l.granted FROM pg_locks AS l
               JOIN pg_database AS d ON d.oid = l.database
              WHERE l.locktype = 'advisory' AND d.datname = current_database()
                AND l.classid::bigint = $1 AND l.objid::bigint = $2 AND l.objsubid = 1",
            &[&classid, &objid],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The application names (one per daemon here) of the sessions whose last
/// statement was one of the maintenance's: who did maintenance lately.
async fn maintainers(client: &tokio_postgres::Client) -> BTreeSet<String> {
    client
        .query(
            "SELECT DISTINCT application_name FROM pg_stat_activity
              WHERE datname = current_database()
                AND query ~ '^-- (queue_stats|release_expired|expire_held|retention|signing_watch):'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The application name of the session holding the maintenance lock.
async fn holder_name(client: &tokio_postgres::Client) -> String {
    let pid = lock_holders(client).await[0].0;
    client
        .query_one(
            "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0)
}

/// Daemon `i`, its sessions named `outboxd-i`.
async fn start(db: &TestDb, i: usize) -> Daemon {
    let url = format!("{}?application_name=outboxd-{i}", db.url);
    let mut env = ENV.to_vec();
    env.push(("OUTBOXD_DATABASE__URL", &url));
    Daemon::start(db, &env).await
}

fn name(i: usize) -> String {
    format!("outboxd-{i}")
}

/// An event leased to an instance that is gone, its lease run out a second
/// ago: only the lease expiry puts it back in the queue.
async fn orphaned_lease(client: &tokio_postgres::Client, payment: i64) {
    client
        .execute(
            "INSERT INTO outbox.events (company_id, payload, state, attempts, lease_owner, next_attempt_at)
             VALUES (1, jsonb_build_object('companyId', 1, 'paymentId', $1::bigint, 'paymentNumber', 'X'),
                     'leased', 1, 'ghost:1:0000', now() - interval '1 second')",
            &[&payment],
        )
        .await
        .unwrap();
}

async fn exactly_one_leader(daemons: &mut [Daemon], within: Duration) -> usize {
    let started = Instant::now();
    loop {
        let found = leaders(daemons).await;
        if found.len() == 1 {
            return found[0];
        }
        assert!(
            started.elapsed() < within,
            "not exactly one leader within {within:?}: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_of_three_instances_does_the_maintenance_and_another_takes_over_when_it_is_killed() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::ok().await;
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) VALUES (1, $1)",
            &[&receiver.url("/hook")],
        )
        .await
        .unwrap();
    let mut daemons = vec![
        start(&db, 0).await,
        start(&db, 1).await,
        start(&db, 2).await,
    ];

    // (a) One leader, by its metric and by the lock; the queue gauges on
    // its /metrics only.
    let leader = exactly_one_leader(&mut daemons, SECS(10)).await;
    for (i, d) in daemons.iter().enumerate() {
        if i != leader {
            d.wait_for_log(STANDING_BY, SECS(10)).await;
        }
        let want = if i == leader { 1.0 } else { 0.0 };
        assert_eq!(sample(d, "outboxd_maintenance_leader").await, Some(want));
    }
    eventually("the leader to show the queue gauges", SECS(10), || async {
        sample(&daemons[leader], "outboxd_events_pending")
            .await
            .is_some()
    })
    .await;
    for (i, d) in daemons.iter().enumerate() {
        if i != leader {
            for name in [
                "outboxd_events_pending",
                "outboxd_oldest_due_event_age_seconds",
                "outboxd_queue_gauges_refreshed_timestamp_seconds",
            ] {
                assert_eq!(sample(d, name).await, None, "{name} on standby {i}");
            }
        }
    }
    let holders = lock_holders(&client).await;
    assert_eq!(holders.len(), 1, "one holder, nobody waiting: {holders:?}");
    assert!(holders[0].1);
    let first_holder = holders[0].0;
    assert_eq!(holder_name(&client).await, name(leader));

    // (b) It stays so across several heartbeats and silences (no flapping),
    // and no other instance runs a maintenance statement: checked for twice
    // the silence after which a standby would ask.
    let until = Instant::now() + SILENCE * 2;
    while Instant::now() < until {
        assert_eq!(leaders(&mut daemons).await, vec![leader]);
        let seen = maintainers(&client).await;
        assert!(
            seen.iter().all(|n| *n == name(leader)),
            "maintenance statements from {seen:?}; leader {}",
            name(leader)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(maintainers(&client).await, BTreeSet::from([name(leader)]));

    // (c) An expired lease is put back by the leader, and only by it.
    orphaned_lease(&client, 1).await;
    receiver.wait_for(1, SECS(10)).await;
    daemons[leader].wait_for_log(RELEASED, SECS(5)).await;
    for (i, d) in daemons.iter().enumerate() {
        if i != leader {
            assert!(
                !d.log().iter().any(|l| l.contains(RELEASED)),
                "standby {i} released leases"
            );
        }
    }

    // (d) SIGKILL: the lock goes with the dead session, another instance
    // asks for it once the heartbeats stop, within seconds.
    daemons[leader].signal(libc::SIGKILL);
    let killed = Instant::now();
    daemons[leader].wait(SECS(5)).await;
    let next = exactly_one_leader(&mut daemons, SECS(15)).await;
    let took = killed.elapsed();
    assert_ne!(next, leader);
    eprintln!("took over {took:?} after the SIGKILL");
    assert!(
        took < SECS(10),
        "took over {took:?} after the SIGKILL (silence {SILENCE:?})"
    );
    let holders = lock_holders(&client).await;
    assert_eq!(holders.len(), 1, "{holders:?}");
    assert_ne!(holders[0].0, first_holder, "a new session holds the lock");
    assert_eq!(holder_name(&client).await, name(next));
    daemons[next]
        .wait_for_log("this instance does the maintenance now", SECS(1))
        .await;

    // (e) The new leader does the work: another expired lease is put back
    // (lease expiry every 3 s here) and delivered.
    orphaned_lease(&client, 2).await;
    receiver.wait_for(2, SECS(10)).await;
    daemons[next].wait_for_log(RELEASED, SECS(5)).await;
    eventually(
        "the new leader to show the queue gauges",
        SECS(5),
        || async {
            sample(&daemons[next], "outboxd_events_pending")
                .await
                .is_some()
        },
    )
    .await;
    eventually_count(
        &client,
        "both events marked delivered",
        SECS(10),
        "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
        2,
    )
    .await;
    for d in daemons
        .into_iter()
        .filter_map(|mut d| d.is_running().then_some(d))
    {
        d.stop().await;
    }
}

/// A leader that stops (SIGTERM) says so: the other instance takes over at
/// once, not after a silence.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_leader_hands_the_maintenance_over_at_once() {
    let db = TestDb::new().await;
    let mut daemons = vec![Daemon::start(&db, ENV).await, Daemon::start(&db, ENV).await];
    let leader = exactly_one_leader(&mut daemons, SECS(10)).await;
    let other = 1 - leader;
    daemons[other].wait_for_log(STANDING_BY, SECS(10)).await;
    daemons[leader].signal(libc::SIGTERM);
    let stopped = Instant::now();
    daemons[other]
        .wait_for_log("this instance does the maintenance now", SECS(10))
        .await;
    let took = stopped.elapsed();
    eprintln!("took over {took:?} after the SIGTERM");
    assert!(
        took < SILENCE / 2,
        "took {took:?}: waited for the silence rather than the goodbye"
    );
    daemons[other]
        .wait_for_log("is stopping; asking for it", SECS(1))
        .await;
    daemons[leader].wait(SECS(30)).await;
}
