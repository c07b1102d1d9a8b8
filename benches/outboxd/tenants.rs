//! `--only tenants`: what one company's endpoint does to the others (issue
//! 13), each scenario on a fresh database with the daemon and its receivers
//! as separate processes, the repository's configuration unchanged.
//!
//! 1. slow: company 1's endpoint answers in 8 s and has 600 events queued;
//!    3 s after the daemon starts, ten other companies enqueue 50 events
//!    between them (one transaction each). Their worst enqueue-to-delivered.
//! 2. dead: company 1's endpoint accepts connections and never answers,
//!    10,000 queued; the same ten companies after 3 s. Their worst, and the
//!    requests the dead endpoint got after its circuit opened.
//! 3. burst: company 1 has 100,000 events queued to a healthy endpoint; 1 s
//!    after the daemon starts, company 2 enqueues one. Its latency, and the
//!    burst's own rate over its first 30 s at the default cap of 8.
//! 4. claim: the claim statement's time (median of 300, each rolled back)
//!    with 300 endpoints of 30 due events each, with and without 1,000,000
//!    more events of one endpoint whose circuit is open.
//! 5. shared: fifty companies whose endpoints (one path each) are on one
//!    host that answers in 8 s, 1,000 events queued between them; the ten
//!    other companies, on another port (another destination), as in 1.
//!    Their worst enqueue-to-delivered (issue 25, point 3).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{
    Daemon, Opts, Receiver, connect, daemon_database, drop_db, fresh_db, now_ns,
    start_receiver_with,
};

pub struct Tenants {
    /// Worst enqueue-to-delivered of the ten fast companies, ms.
    pub slow_worst_ms: f64,
    pub dead_worst_ms: f64,
    /// Requests to the dead endpoint after its circuit opened, and over how long.
    pub dead_requests_open: usize,
    pub dead_open_for: Duration,
    pub burst_single_ms: f64,
    pub burst_rate: f64,
    /// Median claim, ms: without and with the held backlog.
    pub claim_ms: [f64; 2],
    /// Worst enqueue-to-delivered of the ten companies beside fifty on one
    /// slow destination, ms.
    pub shared_worst_ms: f64,
}

pub async fn run(opts: &Opts) -> Tenants {
    eprintln!("tenants: slow endpoint");
    let slow_worst_ms = beside(opts, "outboxd_bench_slow", &["--delay", "8s"], 1, 600, None)
        .await
        .0;
    eprintln!("tenants: fifty companies on one slow destination");
    let shared_worst_ms = beside(
        opts,
        "outboxd_bench_shared",
        &["--delay", "8s"],
        50,
        1000,
        None,
    )
    .await
    .0;
    eprintln!("tenants: dead endpoint (about 80 s)");
    let (dead_worst_ms, dead) = beside(
        opts,
        "outboxd_bench_dead",
        &["--never-answer"],
        1,
        10_000,
        Some(Duration::from_secs(75)),
    )
    .await;
    let (dead_requests_open, dead_open_for) = dead.unwrap_or_default();
    eprintln!("tenants: burst");
    let (burst_single_ms, burst_rate) = burst(opts).await;
    eprintln!("tenants: claim time with a held backlog of 1,000,000");
    let claim_ms = claim_time().await;
    Tenants {
        slow_worst_ms,
        dead_worst_ms,
        dead_requests_open,
        dead_open_for,
        burst_single_ms,
        burst_rate,
        claim_ms,
        shared_worst_ms,
    }
}

/// Companies 1 to `troubled` on one troubled receiver (`trouble` flags),
/// each at its own path, with `queued` events between them; 3 s after the
/// start, ten fast companies on another receiver enqueue 50 events.
/// Returns their worst latency, ms, and with `watch`, the troubled
/// receiver's requests after company 1's circuit opened within that long
/// from the start.
async fn beside(
    opts: &Opts,
    db: &str,
    trouble: &[&str],
    troubled: i64,
    queued: i64,
    watch: Option<Duration>,
) -> (f64, Option<(usize, Duration)>) {
    let url = fresh_db(db).await;
    let client = connect(&url).await;
    let mut bad = start_receiver_with(true, trouble).await;
    let mut fast = start_receiver_with(true, &[]).await;
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, $2 || '/hooks/' || c FROM generate_series(1, $1::bigint) c",
            &[&troubled, &bad.url],
        )
        .await
        .unwrap();
    endpoints(&client, troubled + 1..=troubled + 10, &fast).await;
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(1 + g % $2::bigint, g, 'S' || g)
               FROM generate_series(1, $1::bigint) g",
            &[&queued, &troubled],
        )
        .await
        .unwrap();
    let started = Instant::now();
    let daemon = Daemon::start(opts.daemon(), opts.config(), &url, opts.concurrency).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let committed = enqueue_each(&url, 50, |i| troubled + 1 + (i % 10) as i64).await;
    let worst = worst_latency(&mut fast, &committed, Duration::from_secs(120)).await;

    let dead = match watch {
        None => None,
        Some(until) => {
            // The time the circuit opened, by the database's clock turned
            // into this process's: its age now.
            let opened = loop {
                let row = client
                    .query_opt(
                        "SELECT (extract(epoch FROM now() - opened_at) * 1e9)::bigint
                           FROM outbox.endpoint_circuits WHERE company_id = 1 AND opened_at IS NOT NULL",
                        &[],
                    )
                    .await
                    .unwrap();
                if let Some(row) = row {
                    break now_ns() - row.get::<_, i64>(0).max(0) as u128;
                }
                assert!(
                    started.elapsed() < until,
                    "the dead endpoint's circuit never opened"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            tokio::time::sleep(until.saturating_sub(started.elapsed())).await;
            let arrivals = bad.arrivals.as_mut().unwrap();
            let mut after = 0;
            while let Ok(Some((_, at))) =
                tokio::time::timeout(Duration::from_millis(100), arrivals.recv()).await
            {
                if at > opened {
                    after += 1;
                }
            }
            let open_for = Duration::from_nanos((now_ns() - opened) as u64);
            Some((after, open_for))
        }
    };
    daemon.stop().await;
    drop((bad.child, fast.child, client));
    drop_db(db).await;
    (worst, dead)
}

/// The companies `ids` get endpoints at `receiver`.
async fn endpoints(
    client: &tokio_postgres::Client,
    ids: std::ops::RangeInclusive<i64>,
    receiver: &Receiver,
) {
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url) SELECT c, $3 FROM generate_series($1::bigint, $2::bigint) c",
            &[ids.start(), ids.end(), &format!("{}/hooks", receiver.url)],
        )
        .await
        .unwrap();
}

/// `n` events, one transaction each, of the companies `company(i)`; the
/// moment each COMMIT returned, by event id.
async fn enqueue_each(
    url: &str,
    n: usize,
    company: impl Fn(usize) -> i64,
) -> HashMap<String, u128> {
    let mut writer = connect(url).await;
    let mut committed = HashMap::with_capacity(n);
    for i in 0..n {
        let tx = writer.transaction().await.unwrap();
        let id: uuid::Uuid = tx
            .query_one(
                "SELECT outbox.enqueue_payment_cancellation($1, $2, $3)",
                &[&company(i), &(i as i64 + 1), &format!("F-{i}")],
            )
            .await
            .unwrap()
            .get(0);
        tx.commit().await.unwrap();
        committed.insert(id.to_string(), now_ns());
    }
    committed
}

/// The worst arrival-minus-commit of `committed` at `receiver`, ms; waits
/// up to `limit` for all of them (a missing one counts as the whole wait).
async fn worst_latency(
    receiver: &mut Receiver,
    committed: &HashMap<String, u128>,
    limit: Duration,
) -> f64 {
    let arrivals = receiver.arrivals.as_mut().unwrap();
    let deadline = Instant::now() + limit;
    let mut seen = 0;
    let mut worst: f64 = 0.0;
    while seen < committed.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, arrivals.recv()).await {
            Ok(Some((key, at))) => {
                if let Some(done) = committed.get(&key) {
                    seen += 1;
                    worst = worst.max(at.saturating_sub(*done) as f64 / 1e6);
                }
            }
            _ => return limit.as_secs_f64() * 1e3,
        }
    }
    worst
}

/// 100,000 events of company 1, then one of company 2 during the burst.
async fn burst(opts: &Opts) -> (f64, f64) {
    let db = "outboxd_bench_burst";
    let url = fresh_db(db).await;
    let client = connect(&url).await;
    let mut receiver = start_receiver_with(true, &[]).await;
    endpoints(&client, 1..=2, &receiver).await;
    client
        .execute(
            "SELECT outbox.enqueue_payment_cancellation(1, g, 'B' || g) FROM generate_series(1, 100000) g",
            &[],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(opts.daemon(), opts.config(), &url, opts.concurrency).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let committed = enqueue_each(&url, 1, |_| 2).await;
    let single = worst_latency(&mut receiver, &committed, Duration::from_secs(120)).await;
    // The burst's own rate over its first 30 s (all of it would take
    // minutes at the cap).
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(started.elapsed())).await;
    let row = client
        .query_one(
            "SELECT count(*)::float8 / greatest(extract(epoch FROM max(delivered_at) - min(delivered_at)), 0.001)::float8
               FROM outbox.events WHERE company_id = 1 AND state = 'delivered'",
            &[],
        )
        .await
        .unwrap();
    let rate: f64 = row.get(0);
    daemon.stop().await;
    drop((receiver.child, client));
    drop_db(db).await;
    (single, rate)
}

/// The claim's median time over 300 runs, each in a transaction that is
/// rolled back, so every run sees the same rows: first with 300 endpoints
/// of 30 due events and 2 live leases each, then with 1,000,000 older
/// events of one more endpoint whose circuit is open. Each endpoint on a
/// destination of its own (a port each), so that none is at its cap.
async fn claim_time() -> [f64; 2] {
    let db = "outboxd_bench_claim";
    let url = fresh_db(db).await;
    let setup = connect(&url).await;
    setup
        .batch_execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'http://127.0.0.1:' || (10000 + c) || '/hooks' FROM generate_series(1, 301) c;
             INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT c, jsonb_build_object('companyId', c, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '1 hour' + g * interval '1 second'
               FROM generate_series(1, 300) c, generate_series(1, 30) g;
             INSERT INTO outbox.events (company_id, payload, state, lease_owner, attempts, next_attempt_at)
             SELECT c, jsonb_build_object('companyId', c, 'paymentId', g, 'paymentNumber', g::text),
                    'leased', 'other', 1, now() + interval '1 hour'
               FROM generate_series(1, 300) c, generate_series(31, 32) g;",
        )
        .await
        .unwrap();
    setup
        .batch_execute("VACUUM ANALYZE outbox.events")
        .await
        .unwrap();
    // The daemon's pool, where it runs the fair claim.
    let pool = outboxd::store::pool::pool(&daemon_database(&url));
    let client = pool.get().await.unwrap();
    let without = median_claim(&client).await;
    setup
        .batch_execute(
            "INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT 301, jsonb_build_object('companyId', 301, 'paymentId', g, 'paymentNumber', g::text),
                    now() - interval '2 days' + g * interval '1 millisecond'
               FROM generate_series(1, 1000000) g;
             INSERT INTO outbox.endpoint_circuits (company_id, event_type, state, failures, opened_at, retry_at)
             VALUES (301, 'payment.cancellation', 'open', 5, now(), now() + interval '1 day');",
        )
        .await
        .unwrap();
    setup
        .batch_execute("VACUUM ANALYZE outbox.events")
        .await
        .unwrap();
    let with = median_claim(&client).await;
    drop((client, pool, setup));
    drop_db(db).await;
    [without, with]
}

async fn median_claim(client: &deadpool_postgres::Client) -> f64 {
    let mut times = Vec::with_capacity(300);
    for _ in 0..300 {
        let (took, companies) = super::scale::claim_rolled_back(client, 64).await;
        times.push(took);
        assert_eq!(companies.len(), 64, "a full batch of the other endpoints");
        assert!(
            companies.iter().all(|c| *c != 301),
            "the held endpoint stays held"
        );
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}
