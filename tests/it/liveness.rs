//! Liveness under systemd: `outboxd run` with `NOTIFY_SOCKET` and
//! `WATCHDOG_USEC` set pings `WATCHDOG=1` from READY until it exits, whatever
//! the delivery loop is doing (a long backlog, every slot held by a slow
//! receiver, the database gone), and a database that is down at start or
//! for a minute mid-drain makes it wait, never exit.
//!
//! Every test runs with WATCHDOG_USEC=2000000 and allows no stretch longer
//! than three eighths of it (750 ms) without a ping: the daemon pings every
//! eighth (250 ms), so that leaves two pings' worth of slack for a loaded
//! 2-core machine running PostgreSQL, a receiver and a debug build at once,
//! and systemd would only restart the unit after the full 2 s. The code
//! before this suite had gaps of 2 s and more in every one of these cases.
//! The watchdog assertion comes last in each test, after the rest of the
//! behaviour has been checked, so a failure there is about pings alone.

use std::time::{Duration, Instant};

use crate::faults::{
    QUICK, assert_delivered_and_marked_once, assert_no_panic, backlog_on_private_pg, delivered,
    endpoint, enqueue_many, quick, recovered, slow_ok_receiver,
};
use crate::harness::{Daemon, TestDb, eventually, http_get};
use crate::private_pg::PrivatePg;
use crate::receiver::Receiver;
use crate::sd_notify::{NotifySocket, Silence};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// What every test passes as WATCHDOG_USEC, and the same as a Duration.
const WATCHDOG_USEC: &str = "2000000";
const WATCHDOG: Duration = Duration::from_secs(2);
/// The longest allowed stretch without a ping: 3/8 of WATCHDOG_USEC.
const MAX_SILENCE: Duration = Duration::from_millis(750);

/// Logged for each failed try to reach the database before the first.
const WAITING: &str = "waiting for the database";

/// `env` plus the notify socket's NOTIFY_SOCKET and WATCHDOG_USEC.
fn watched<'a>(notify: &'a NotifySocket, env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = env.to_vec();
    all.extend(notify.env(WATCHDOG_USEC));
    all
}

/// Asserts the daemon is still the process `pid` started as, with no panic
/// logged, stops it with SIGTERM (exit 0) and returns when the stop began.
async fn stop_the_same_process(mut daemon: Daemon, pid: i32) -> Instant {
    assert!(daemon.is_running());
    assert_eq!(daemon.pid(), pid);
    assert_no_panic(&daemon);
    let stop_at = Instant::now();
    let status = daemon.stop().await;
    assert!(status.success(), "{status:?}");
    stop_at
}

/// Panics unless `WATCHDOG=1` never stopped for more than [`MAX_SILENCE`]
/// over `[from, to]`; returns the measurement for the test's summary line.
#[track_caller]
fn assert_pinged_throughout(
    notify: &NotifySocket,
    from: Instant,
    to: Instant,
    what: &str,
) -> Silence {
    let silence = notify.longest_silence(from, to);
    assert!(
        silence.longest <= MAX_SILENCE,
        "{what}: WATCHDOG=1 must come at least every {MAX_SILENCE:?} (3/8 of WATCHDOG_USEC, \
         WATCHDOG_USEC={WATCHDOG_USEC}); {silence}"
    );
    silence
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_pings_keep_coming_through_a_long_backlog_drain() {
    // At most SLOTS answers per DELAY, so the drain lasts at least
    // EVENTS x DELAY / SLOTS = 6.25 s however fast the machine (a debug
    // build on two shared cores, with 64 slots and 3 ms, drained 30,000 in
    // 9 s: too close to the 6 s asserted below); it took ~17 s here.
    const EVENTS: i64 = 20_000;
    const COMPANIES: i64 = 10;
    const SLOTS: &str = "16";
    const DELAY_MS: u64 = 5;
    let db = TestDb::new().await;
    let client = db.client().await;
    // A few ms per answer: every claim comes back full, so the claim loop
    // never falls back to its idle wait for the whole drain.
    let receiver = Receiver::start(slow_ok_receiver(DELAY_MS)).await;
    for company in 1..=COMPANIES {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    enqueue_many(&client, EVENTS, COMPANIES, 2000).await;

    let notify = NotifySocket::bind();
    // Info level: a debug line per delivery would only slow both sides.
    let env = [
        ("OUTBOXD_DELIVERY__CONCURRENCY", SLOTS),
        ("RUST_LOG", "info"),
    ];
    let daemon = Daemon::start(&db, &watched(&notify, &env)).await;
    let pid = daemon.pid();
    let ready = notify.wait_for_line("READY=1", SECS(10)).await.at;
    let requests = receiver.wait_for(EVENTS as usize, SECS(80)).await;
    eventually("every event marked delivered", SECS(30), || async {
        delivered(&client).await == EVENTS
    })
    .await;
    let first = requests.iter().map(|r| r.at).min().unwrap();
    let last = requests.iter().map(|r| r.at).max().unwrap();
    let drain = last - first;
    assert!(
        drain >= 3 * WATCHDOG,
        "the drain took {drain:?}, under 3 watchdog periods ({:?}): the test proves nothing; \
         enqueue more events or slow the receiver",
        3 * WATCHDOG
    );
    assert_eq!(
        requests.len() as i64,
        EVENTS,
        "each event sent once, no fault here"
    );
    let stop_at = stop_the_same_process(daemon, pid).await;

    let silence = assert_pinged_throughout(
        &notify,
        ready,
        stop_at,
        &format!("from READY to SIGTERM, through a {drain:?} drain of {EVENTS} events"),
    );
    eprintln!("backlog drain: {EVENTS} events in {drain:?}; {silence}");
}

#[tokio::test(flavor = "multi_thread")]
async fn watchdog_pings_keep_coming_while_every_slot_is_held_by_a_slow_receiver() {
    const SLOTS: usize = 4;
    // Four rounds of SLOTS: every slot stays held for three answers' time
    // (9 s) before the last round is sent.
    const EVENTS: i64 = 16;
    const DELAY: Duration = Duration::from_secs(3);
    let db = TestDb::new().await;
    let client = db.client().await;
    let receiver = Receiver::start(slow_ok_receiver(DELAY.as_millis() as u64)).await;
    for company in 1..=4 {
        endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
    }
    enqueue_many(&client, EVENTS, 4, EVENTS).await;

    let notify = NotifySocket::bind();
    // The default poll interval (1 s): what a loop that pings only when its
    // wait for a slot times out would show as its gap.
    let env = watched(
        &notify,
        &[
            ("OUTBOXD_DELIVERY__CONCURRENCY", "4"),
            ("OUTBOXD_DELIVERY__REQUEST_TIMEOUT", "10s"),
        ],
    );
    let daemon = Daemon::start(&db, &env).await;
    let pid = daemon.pid();
    let ready = notify.wait_for_line("READY=1", SECS(10)).await.at;
    let requests = receiver.wait_for(EVENTS as usize, SECS(40)).await;
    eventually("every event marked delivered", SECS(15), || async {
        delivered(&client).await == EVENTS
    })
    .await;

    // Every slot was held: never more than SLOTS requests unanswered (a
    // request waits for the answer SLOTS requests before it), and a freed
    // slot taken again at once.
    let mut at: Vec<Instant> = requests.iter().map(|r| r.at).collect();
    at.sort();
    assert_eq!(at.len() as i64, EVENTS, "each event sent once");
    for k in 0..at.len() - SLOTS {
        let refill = at[k + SLOTS] - at[k];
        assert!(
            refill >= DELAY - Duration::from_millis(50) && refill <= DELAY + SECS(1),
            "request {} came {refill:?} after request {k}: the {SLOTS} slots were not all held",
            k + SLOTS
        );
    }
    let held = at[at.len() - 1] - at[SLOTS - 1];
    assert!(
        held >= 3 * WATCHDOG,
        "every slot was held for {held:?} only, under 3 watchdog periods"
    );
    let stop_at = stop_the_same_process(daemon, pid).await;

    let silence = assert_pinged_throughout(
        &notify,
        ready,
        stop_at,
        &format!("from READY to SIGTERM, every one of {SLOTS} slots held for {held:?}"),
    );
    eprintln!("slow receiver: every slot held for {held:?}; {silence}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_started_while_the_database_is_down_waits_and_delivers_when_it_comes_up() {
    const EVENTS: i64 = 200;
    /// How long the database stays down after the daemon started.
    const DOWN_FOR: Duration = Duration::from_secs(20);
    /// The longest the contract allows between two tries (~5 s), plus the
    /// 1 s connect timeout of QUICK and scheduling slack.
    const MAX_RETRY_GAP: Duration = Duration::from_millis(6500);
    let pg = PrivatePg::start().await;
    let db = TestDb::new_on(&pg.admin_url()).await;
    let receiver = Receiver::ok().await;
    {
        let client = db.client().await;
        for company in 1..=4 {
            endpoint(&client, company, "payment.cancellation", &receiver.url("/")).await;
        }
        enqueue_many(&client, EVENTS, 4, EVENTS).await;
    }
    pg.stop().await;

    let notify = NotifySocket::bind();
    let started = Instant::now();
    let mut daemon =
        Daemon::start_until(&db, &watched(&notify, QUICK), "admin HTTP listening").await;
    let pid = daemon.pid();
    assert!(
        daemon.admin.starts_with("http://127.0.0.1:"),
        "admin URL {:?}",
        daemon.admin
    );
    let readyz = format!("{}/readyz", daemon.admin);
    let healthz = format!("{}/healthz", daemon.admin);
    let ready = notify.wait_for_line("READY=1", SECS(10)).await.at;
    daemon.wait_for_logs(WAITING, 3, SECS(15)).await;

    // Waiting: up, answering, not ready, saying why, not delivering.
    let (status, body) = http_get(&readyz).await;
    assert_eq!(status, 503, "/readyz while the database is down: {body}");
    assert!(body.starts_with("not ready"), "/readyz body: {body:?}");
    assert_eq!(http_get(&healthz).await.0, 200, "/healthz while waiting");
    assert!(
        daemon.is_running(),
        "outboxd exited while waiting for the database"
    );
    let statuses = notify.statuses();
    assert!(
        statuses
            .iter()
            .any(|s| s.to_lowercase().contains("database")),
        "a STATUS= saying it waits for the database; got {statuses:?}"
    );
    assert!(
        !daemon
            .log()
            .iter()
            .any(|l| l.contains("outboxd is delivering")),
        "delivering without a database?"
    );

    // The outage's length, not a wait for anything.
    tokio::time::sleep_until((started + DOWN_FOR).into()).await;
    assert!(
        daemon.is_running(),
        "outboxd exited before the database came back"
    );
    assert_eq!(daemon.pid(), pid);
    let (status, _) = http_get(&readyz).await;
    assert_eq!(status, 503, "/readyz still 503 after {DOWN_FOR:?}");
    let tries = daemon.log_instants(WAITING);
    let mut marks = tries.clone();
    marks.push(Instant::now());
    let longest = marks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest <= MAX_RETRY_GAP,
        "{} {WAITING:?} lines in {DOWN_FOR:?}, up to {longest:?} apart (or since the last): \
         the retry backoff is capped at ~5 s",
        tries.len()
    );
    assert_eq!(receiver.received().len(), 0);
    pg.restart().await;
    let up = Instant::now();

    daemon.wait_for_log("outboxd is delivering", SECS(15)).await;
    daemon.wait_for_log("listening for NOTIFY", SECS(15)).await;
    receiver.wait_for(EVENTS as usize, SECS(30)).await;
    let client = db.client().await;
    eventually("every event marked delivered", SECS(30), || async {
        delivered(&client).await == EVENTS
    })
    .await;
    eventually("/readyz to be 200", SECS(15), || async {
        http_get(&readyz).await.0 == 200
    })
    .await;
    let delivered_in = up.elapsed();
    // One life: never exited, never restarted.
    assert!(daemon.is_running());
    assert_eq!(daemon.pid(), pid);
    let lives = daemon
        .log()
        .iter()
        .filter(|l| l.contains("outboxd is delivering"))
        .count();
    assert_eq!(lives, 1, "one start of the delivery loop");
    assert_no_panic(&daemon);
    let stop_at = Instant::now();
    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_delivered_and_marked_once(&client, &receiver, EVENTS).await;

    let silence = assert_pinged_throughout(
        &notify,
        ready,
        stop_at,
        &format!("from READY to SIGTERM, the database down for the first {DOWN_FOR:?}"),
    );
    eprintln!(
        "database down at start: {} tries while it was down, all {EVENTS} delivered {delivered_in:?} \
         after it came up; {silence}",
        tries.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_60_second_database_outage_mid_drain_loses_nothing_and_the_process_never_exits() {
    const EVENTS: i64 = 1000;
    const OUTAGE: Duration = Duration::from_secs(60);
    /// The process is looked at this often while the database is down.
    const CHECK_EVERY: Duration = Duration::from_secs(10);
    let (pg, db, receiver) = backlog_on_private_pg(EVENTS, 10, 500, 20).await;
    let notify = NotifySocket::bind();
    let env = quick(&[("OUTBOXD_DELIVERY__CONCURRENCY", "16")]);
    let mut daemon = Daemon::start(&db, &watched(&notify, &env)).await;
    let pid = daemon.pid();
    let readyz = format!("{}/readyz", daemon.admin);
    let healthz = format!("{}/healthz", daemon.admin);
    notify.wait_for_line("READY=1", SECS(10)).await;
    assert_eq!(http_get(&readyz).await.0, 200);

    receiver.wait_for(200, SECS(30)).await;
    let down = Instant::now();
    pg.stop().await;
    eventually("/readyz to report the outage", SECS(15), || async {
        http_get(&readyz).await.0 == 503
    })
    .await;
    let during = receiver.received().len();
    let checks = (OUTAGE.as_secs() / CHECK_EVERY.as_secs()) as u32;
    for check in 1..=checks {
        // The outage's schedule, not a wait for anything.
        tokio::time::sleep_until((down + CHECK_EVERY * check).into()).await;
        let into = CHECK_EVERY * check;
        assert!(
            daemon.is_running(),
            "outboxd exited {into:?} into the outage; log:\n{}",
            daemon.log().join("\n")
        );
        assert_eq!(daemon.pid(), pid);
        assert_eq!(http_get(&healthz).await.0, 200, "/healthz {into:?} in");
        let (status, body) = http_get(&readyz).await;
        assert_eq!(status, 503, "/readyz {into:?} in: {body}");
        assert!(body.starts_with("not ready"), "{body:?}");
    }
    pg.restart().await;
    let up = Instant::now();
    let (ready_after, client) = recovered(&db, &readyz, EVENTS, during).await;
    assert!(daemon.is_running());
    assert_eq!(daemon.pid(), pid);
    let lives = daemon
        .log()
        .iter()
        .filter(|l| l.contains("outboxd is delivering"))
        .count();
    assert_eq!(lives, 1, "one start of the delivery loop");
    assert_no_panic(&daemon);
    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    let (claimed_again, duplicated) =
        assert_delivered_and_marked_once(&client, &receiver, EVENTS).await;

    let statuses = notify.statuses();
    let outage_status = statuses
        .iter()
        .rposition(|s| s.contains("claims fail"))
        .unwrap_or_else(|| panic!("no STATUS= told of the outage: {statuses:?}"));
    assert!(
        statuses[outage_status..].iter().any(|s| s == "delivering"),
        "STATUS= back to delivering after the outage: {statuses:?}"
    );
    let silence = assert_pinged_throughout(
        &notify,
        down,
        up,
        &format!("during a {:?} database outage", up - down),
    );
    eprintln!(
        "60 s outage: {during} requests before it, /readyz 200 again {ready_after:?} after it, \
         claimed twice {claimed_again}, duplicates {duplicated}; {silence}"
    );
}

/// The stop budget holds with the database gone: deliveries in flight
/// finish, their outcomes cannot be written, and the daemon still exits 0
/// within the unit's TimeoutStopSec (the outcomes are then retried after
/// their leases, with the same key).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_the_database_gone_exits_0_within_the_stop_timeout() {
    const EVENTS: i64 = 200;
    // Replies slow enough that deliveries are in flight when the database
    // goes.
    let (pg, db, receiver) = backlog_on_private_pg(EVENTS, 4, 100, 1500).await;
    let env = quick(&[("OUTBOXD_DELIVERY__CONCURRENCY", "8")]);
    let mut daemon = Daemon::start(&db, &env).await;
    receiver.wait_for(8, SECS(30)).await;
    pg.stop().await;
    // The recorder has seen the outage: the last outcomes cannot be written.
    daemon.wait_for_log("recording failed", SECS(30)).await;
    let timeout = crate::harness::unit_stop_timeout();
    let asked = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_up_to(timeout).await;
    let took = asked.elapsed();
    let Some(status) = status else {
        panic!(
            "outboxd still running {took:?} after SIGTERM, past TimeoutStopSec={timeout:?}; log:\n{}",
            daemon.log().join("\n")
        );
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    let budget = outboxd::engine::stop_budget(
        &outboxd::config::load(Some(&crate::harness::repo_root().join("config.toml"))).unwrap(),
    );
    assert!(
        took <= budget + SECS(3),
        "the stop took {took:?}, over the daemon's own budget of {budget:?}"
    );
    assert!(
        daemon
            .log()
            .iter()
            .any(|l| l.contains("could not record the last outcomes in time")),
        "the stop gave up on the last outcomes instead of waiting for the database"
    );
    eprintln!("stop with the database gone took {took:?} (TimeoutStopSec={timeout:?})");
}
