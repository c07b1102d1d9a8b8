//! The claim beside many tenants with a retry set for later (issue 26):
//! what a widespread outage leaves behind, every tenant with one.
//!
//! 1. The claim alone: 300 due events on 10 endpoints, beside 100 and then
//!    20,000 other endpoints that each have one retry set an hour ahead;
//!    the median of 300 fair claims of 64, each rolled back, on the
//!    daemon's own pool (`store::pool::pool`, plans made per run). The
//!    retries are written as `scheduled`, as outboxd writes them since
//!    migration 0013, and again as `pending` with a later next_attempt_at,
//!    as it wrote them before (and as a daemon older than 0013 still
//!    does): the claim's skip scan walks those, the cost the migration
//!    removed.
//! 2. The drain beside them: 3,000 due events over 30 endpoints delivered
//!    by a real daemon, beside 100 endpoints with a retry set and nothing
//!    held, then beside 20,000 with a retry set and one endpoint paused by
//!    its company (its 100 due events held); events/s of the 3,000, from
//!    the first attempt to the last delivery. Alternated, twice each.

use std::time::{Duration, Instant};

use super::{Daemon, Opts, connect, daemon_database, drop_db, fresh_db, start_receiver};

pub struct Scale {
    /// Median claim, ms: [scheduled at 100, scheduled at 20,000, pending
    /// at 100, pending at 20,000].
    pub claim_ms: [f64; 4],
    /// Drain events/s: beside 100 with nothing held, beside 20,000 with
    /// one paused; each run in the order they ran.
    pub quiet: Vec<f64>,
    pub crowded: Vec<f64>,
}

const FEW: i32 = 100;
const MANY: i32 = 20_000;

pub async fn run(opts: &Opts) -> Scale {
    let mut claim_ms = [0.0; 4];
    for (i, (state, n)) in [
        ("scheduled", FEW),
        ("scheduled", MANY),
        ("pending", FEW),
        ("pending", MANY),
    ]
    .into_iter()
    .enumerate()
    {
        eprintln!("scale: claim beside {n} endpoints with a retry set ({state})");
        claim_ms[i] = claim_time(state, n).await;
    }
    let (mut quiet, mut crowded) = (Vec::new(), Vec::new());
    for round in 0..2 {
        eprintln!("scale: drain beside {FEW} endpoints with a retry set (round {round})");
        quiet.push(drain_beside(opts, FEW, false).await);
        eprintln!("scale: drain beside {MANY} with a retry set and one paused (round {round})");
        crowded.push(drain_beside(opts, MANY, true).await);
    }
    Scale {
        claim_ms,
        quiet,
        crowded,
    }
}

/// `n` endpoints (companies from 100,001) with one retry each, an hour
/// ahead, in `state`.
fn retries_sql(state: &str, n: i32) -> String {
    format!(
        "INSERT INTO outbox.events (company_id, payload, state, attempts, next_attempt_at)
         SELECT 100000 + c, jsonb_build_object('companyId', 100000 + c, 'paymentId', c,
                                               'paymentNumber', c::text),
                '{state}', 1, now() + interval '1 hour'
           FROM generate_series(1, {n}) c;"
    )
}

async fn claim_time(state: &str, n: i32) -> f64 {
    let db = "outboxd_bench_scale_claim";
    let url = fresh_db(db).await;
    let setup = connect(&url).await;
    setup
        .batch_execute(&format!(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, 'http://127.0.0.1:9/hooks' FROM generate_series(1, 10) c;
             INSERT INTO outbox.events (company_id, payload, next_attempt_at)
             SELECT 1 + g % 10, jsonb_build_object('companyId', 1 + g % 10, 'paymentId', g,
                                                   'paymentNumber', g::text),
                    now() - interval '1 minute'
               FROM generate_series(1, 300) g;
             {}",
            retries_sql(state, n)
        ))
        .await
        .unwrap();
    setup
        .batch_execute("VACUUM ANALYZE outbox.events")
        .await
        .unwrap();
    // The daemon's pool, where it runs the fair claim.
    let pool = outboxd::store::pool::pool(&daemon_database(&url));
    let client = pool.get().await.unwrap();
    let mut times = Vec::with_capacity(300);
    for _ in 0..300 {
        let (took, claimed) = claim_rolled_back(&client, 64).await;
        times.push(took);
        assert_eq!(claimed.len(), 64);
    }
    times.sort_by(f64::total_cmp);
    drop((client, pool, setup));
    drop_db(db).await;
    times[times.len() / 2]
}

const CLAIM_SQL: &str = include_str!("../../sql/queries/claim_fair.sql");

/// One fair claim of up to `limit` as the daemon makes it (its statement, its
/// parameters with nothing in flight, on the connection given), in a
/// transaction rolled back so that every run sees the same rows: ms, and
/// the company of each event claimed. (`store::claim::claim` commits its
/// own transaction.)
pub async fn claim_rolled_back(client: &deadpool_postgres::Client, limit: i64) -> (f64, Vec<i64>) {
    let statement = client.prepare_cached(CLAIM_SQL).await.unwrap();
    let none: (Vec<i64>, Vec<String>, Vec<i32>) = Default::default();
    client.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    let rows = client
        .query(
            &statement,
            &[
                &limit,
                &"bench",
                &60_000i64,
                &8i32,
                &none.0,
                &none.1,
                &none.2,
                &0i64,
                &"",
                // Every endpoint here on one URL, answering quickly as far
                // as the daemon knows: the cap per destination is not what
                // this measures.
                &none.1,
                &none.2,
                &i32::MAX,
                &16i32,
            ],
        )
        .await
        .unwrap();
    let took = started.elapsed().as_secs_f64() * 1000.0;
    client.batch_execute("ROLLBACK").await.unwrap();
    let companies = rows
        .iter()
        .filter(|r| r.get::<_, Option<uuid::Uuid>>("id").is_some())
        .map(|r| r.get("company_id"))
        .collect();
    (took, companies)
}

/// Events/s of 3,000 due events over 30 endpoints, beside `n` endpoints
/// with a retry set and, if `paused`, one endpoint its company paused.
async fn drain_beside(opts: &Opts, n: i32, paused: bool) -> f64 {
    const EVENTS: i64 = 3_000;
    let db = "outboxd_bench_scale_drain";
    let url = fresh_db(db).await;
    let client = connect(&url).await;
    let receiver = start_receiver(false).await;
    client
        .batch_execute(&format!(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, '{url}/hooks/payment-cancelled' FROM generate_series(1, 31) c;
             SELECT count(outbox.enqueue_payment_cancellation(1 + g % 30, g, 'P-' || g))
               FROM generate_series(1, {EVENTS}) g;
             {retries}
             {pause}",
            url = receiver.url,
            retries = retries_sql("scheduled", n),
            pause = if paused {
                "SELECT outbox.pause_endpoint(31);
                 SELECT count(outbox.enqueue_payment_cancellation(31, g, 'H-' || g))
                   FROM generate_series(1, 100) g;"
            } else {
                ""
            },
        ))
        .await
        .unwrap();
    // Apart: VACUUM cannot share an implicit transaction.
    for statement in ["VACUUM ANALYZE outbox.events", "CHECKPOINT"] {
        client.batch_execute(statement).await.unwrap();
    }
    let daemon = Daemon::start(opts.daemon(), opts.config(), &url, opts.concurrency).await;
    let started = Instant::now();
    loop {
        let delivered: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if delivered >= EVENTS {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "not drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds: f64 = client
        .query_one(
            "SELECT extract(epoch FROM (SELECT max(delivered_at) FROM outbox.events)
                                     - (SELECT min(started_at) FROM outbox.attempts))::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    daemon.stop().await;
    drop(receiver);
    drop(client);
    drop_db(db).await;
    EVENTS as f64 / seconds
}
