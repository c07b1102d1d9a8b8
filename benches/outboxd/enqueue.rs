//! `--only enqueue`: what an enqueue costs the sales application's own
//! transactions (issue 22).
//!
//! N writers, each on its own connection, run the application's
//! transaction as fast as they can, in two ways an application talks to
//! PostgreSQL: with named prepared statements (each parsed and planned
//! once per connection, the lightest for the server), and with the simple
//! query protocol (each statement text parsed and planned every time, as
//! pgbench and psql send it, and as the issue measured "today"):
//!
//! ```sql
//! BEGIN;
//! UPDATE payments SET status = 'cancelled', updated_at = now() WHERE id = $1;
//! SELECT outbox.enqueue_payment_cancellation($2, $1, $3, $4);   -- or the bare insert
//! COMMIT;
//! ```
//!
//! against the very same transactions with a bare outbox insert instead: a
//! table with a uuid primary key, a jsonb payload and a timestamptz, one
//! index, no trigger, the same body built in the same statement.
//!
//! A third kind measures what the enqueue's function costs by itself: the
//! installed `outbox.enqueue_payment_cancellation`, copied from the
//! catalogue with its INSERT pointed at the bare outbox (the same argument
//! checks, the same wake-up, the same `SECURITY DEFINER` call with its
//! fixed `search_path`, none of `outbox.events`' columns and indexes). Its
//! ratio is the most any table behind that function could reach: what
//! issue 22's points 2 and 3 leave of its 0.8 target.
//!
//! The three alternate in one run, at 8, 32 and 64 writers,
//! `--enqueue-rounds` times each for `--enqueue-seconds` (the tables
//! emptied and a checkpoint taken before every run), with fsync as the
//! server has it; a session LISTENs
//! on `outbox_events` and reads what arrives, as the daemon's does, so a
//! NOTIFY costs what it costs in production. No daemon delivers: this is
//! the enqueue alone.
//!
//! The schema is made by the daemon binary under test (`--daemon`), so an
//! older build's `migrate` measures its own enqueue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{Opts, admin_url, connect, db_name, drop_db, url_with_dbname};

/// The application's payments: the rows its own UPDATE touches.
const PAYMENTS: i64 = 100_000;

/// Concurrent writers, as the issue measured them.
pub const WRITERS: [usize; 3] = [8, 32, 64];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Outboxd,
    Bare,
    /// outboxd's enqueue function writing into the bare outbox.
    FunctionOnly,
}

/// The copy of the enqueue function that writes into the bare outbox, in
/// the schema `public`.
const FUNCTION_ONLY: &str = "enqueue_into_bare_outbox";

/// How the writers send their statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Named prepared statements, parsed once per connection.
    Prepared,
    /// The simple query protocol: each statement parsed every time.
    Simple,
}

/// One writer count's result.
pub struct EnqueueCost {
    pub protocol: Protocol,
    pub writers: usize,
    /// Transactions per second over all rounds: with outboxd's enqueue,
    /// with the bare insert.
    pub outboxd_tps: f64,
    pub bare_tps: f64,
    /// The same with outboxd's function writing into the bare outbox
    /// (None: the schema under test has no function this bench can copy).
    pub function_only_tps: Option<f64>,
    /// The worst round's ratio (outboxd / bare of the same round).
    pub worst_round_ratio: f64,
    /// Notifications the listening session received per second during the
    /// outboxd runs: how often the instance-wide notify lock was taken.
    pub notifies_per_second: f64,
}

pub async fn run(opts: &Opts) -> Vec<EnqueueCost> {
    let db = "outboxd_bench_enqueue";
    let url = prepare(opts, db).await;
    let function_only = copy_enqueue_into_bare(&url).await;
    let mut variants = vec![Variant::Outboxd, Variant::Bare];
    if function_only {
        variants.push(Variant::FunctionOnly);
    }
    let listener = Listener::start(&url).await;
    let admin = connect(&url).await;
    let mut out = Vec::new();
    for (protocol, writers) in [Protocol::Prepared, Protocol::Simple]
        .into_iter()
        .flat_map(|p| WRITERS.map(|w| (p, w)))
    {
        let mut tx = [0u64; 3];
        let mut seconds = [0f64; 3];
        let mut worst_round_ratio = f64::INFINITY;
        let mut notified = 0u64;
        for round in 0..opts.enqueue_rounds {
            // Rotate which goes first, so none always meets another's
            // checkpoint or autovacuum.
            let mut order = variants.clone();
            order.rotate_left(round % variants.len());
            let mut tps = [0f64; 3];
            for variant in order {
                reset(&admin).await;
                let before = listener.count();
                let (done, took) =
                    run_writers(&url, variant, protocol, writers, opts.enqueue_seconds).await;
                let slot = variant as usize;
                if variant == Variant::Outboxd {
                    notified += listener.count() - before;
                }
                tx[slot] += done;
                seconds[slot] += took.as_secs_f64();
                tps[slot] = done as f64 / took.as_secs_f64();
                eprintln!(
                    "enqueue: {protocol:?}, {writers} writers, round {}, {variant:?}: {:.0} tps",
                    round + 1,
                    tps[slot]
                );
            }
            worst_round_ratio = worst_round_ratio.min(tps[0] / tps[1]);
        }
        out.push(EnqueueCost {
            protocol,
            writers,
            outboxd_tps: tx[0] as f64 / seconds[0],
            bare_tps: tx[1] as f64 / seconds[1],
            function_only_tps: function_only.then(|| tx[2] as f64 / seconds[2]),
            worst_round_ratio,
            notifies_per_second: notified as f64 / seconds[0],
        });
    }
    drop(admin);
    drop(listener);
    drop_db(db).await;
    out
}

/// A fresh database with the schema of the daemon under test, the
/// application's payments and the bare outbox.
async fn prepare(opts: &Opts, db: &str) -> String {
    drop_db(db).await;
    let db = &db_name(db);
    connect(&admin_url())
        .await
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = url_with_dbname(&admin_url(), db);
    let migrated = std::process::Command::new(opts.daemon())
        .arg("--config")
        .arg(opts.config())
        .arg("migrate")
        .env("OUTBOXD_DATABASE__URL", &url)
        .output()
        .expect("running outboxd migrate");
    assert!(
        migrated.status.success(),
        "outboxd migrate: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let client = connect(&url).await;
    client
        .batch_execute(&format!(
            "CREATE TABLE payments (id bigint PRIMARY KEY, company_id bigint NOT NULL,
                                    status text NOT NULL, updated_at timestamptz);
             INSERT INTO payments SELECT g, 1 + g % 1000, 'open', now()
               FROM generate_series(1, {PAYMENTS}) g;
             CREATE TABLE bare_outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                                       payload jsonb NOT NULL,
                                       created_at timestamptz NOT NULL DEFAULT now());"
        ))
        .await
        .unwrap();
    client.batch_execute("VACUUM ANALYZE").await.unwrap();
    url
}

/// Creates [`FUNCTION_ONLY`]: the installed Payment Cancellation enqueue,
/// read back from the catalogue, with its INSERT into `outbox.events`
/// turned into one into the bare outbox and nothing else changed. Returns
/// false, and the phase goes without it, when the function is not written
/// the way this expects (an older or newer schema).
async fn copy_enqueue_into_bare(url: &str) -> bool {
    let client = connect(url).await;
    let definition: String = client
        .query_one(
            "SELECT pg_get_functiondef(
                 'outbox.enqueue_payment_cancellation(bigint, bigint, text, bigint[])'::regprocedure)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let insert = "INSERT INTO outbox.events (event_type, company_id, payload)
    VALUES ('payment.cancellation', enqueue_payment_cancellation.company_id,\n";
    if definition.matches(insert).count() != 1 {
        eprintln!(
            "enqueue: the enqueue function's INSERT is not the one this bench copies; \
             measuring without the function-only kind"
        );
        return false;
    }
    let copy = definition
        .replace(
            insert,
            "INSERT INTO public.bare_outbox (payload)\n    VALUES (\n",
        )
        .replacen(
            "FUNCTION outbox.enqueue_payment_cancellation(",
            &format!("FUNCTION public.{FUNCTION_ONLY}("),
            1,
        )
        .replace(
            "enqueue_payment_cancellation.",
            &format!("{FUNCTION_ONLY}."),
        );
    client.batch_execute(&copy).await.unwrap();
    true
}

/// Both outboxes empty, the payments vacuumed, dirty pages written: every
/// run starts from the same state.
async fn reset(client: &Client) {
    for statement in [
        "TRUNCATE outbox.events, bare_outbox CASCADE",
        "VACUUM ANALYZE payments, outbox.events, bare_outbox",
        "CHECKPOINT",
    ] {
        client.batch_execute(statement).await.unwrap();
    }
}

/// Runs `writers` connections for `seconds`; returns the transactions
/// committed and the time they took.
async fn run_writers(
    url: &str,
    variant: Variant,
    protocol: Protocol,
    writers: usize,
    seconds: u64,
) -> (u64, Duration) {
    let mut clients = Vec::with_capacity(writers);
    for _ in 0..writers {
        clients.push(connect(url).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = std::time::Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, client)| {
            let stop = stop.clone();
            let done = done.clone();
            tokio::spawn(async move {
                match protocol {
                    Protocol::Prepared => writer(client, variant, n as u64, &stop, &done).await,
                    Protocol::Simple => {
                        simple_writer(client, variant, n as u64, &stop, &done).await
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let took = started.elapsed();
    for task in tasks {
        task.await.unwrap();
    }
    (done.load(Ordering::Relaxed), took)
}

async fn writer(
    mut client: Client,
    variant: Variant,
    seed: u64,
    stop: &AtomicBool,
    done: &AtomicU64,
) {
    let update = client
        .prepare("UPDATE payments SET status = 'cancelled', updated_at = now() WHERE id = $1")
        .await
        .unwrap();
    let enqueue = client
        .prepare(&match variant {
            Variant::Outboxd => {
                "SELECT outbox.enqueue_payment_cancellation($2, $1, $3, $4)".to_string()
            }
            Variant::FunctionOnly => format!("SELECT public.{FUNCTION_ONLY}($2, $1, $3, $4)"),
            Variant::Bare => "INSERT INTO bare_outbox (payload)
                 VALUES (jsonb_build_object('companyId', $2::bigint, 'paymentId', $1::bigint,
                                            'paymentNumber', $3::text,
                                            'orderIds', array_to_string($4::bigint[], ',')))"
                .to_string(),
        })
        .await
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Ordering::Relaxed) {
        let payment = rng.i64(1..=PAYMENTS);
        let company = 1 + payment % 1000;
        let number = format!("P-{payment}");
        let orders = vec![payment * 2, payment * 2 + 1];
        let tx = client.transaction().await.unwrap();
        tx.execute(&update, &[&payment]).await.unwrap();
        tx.execute(&enqueue, &[&payment, &company, &number, &orders])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// The same transaction over the simple query protocol, one statement at a
/// time (four round trips, as pgbench sends it), the values written into
/// the text.
async fn simple_writer(
    client: Client,
    variant: Variant,
    seed: u64,
    stop: &AtomicBool,
    done: &AtomicU64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Ordering::Relaxed) {
        let payment = rng.i64(1..=PAYMENTS);
        let company = 1 + payment % 1000;
        let (first, second) = (payment * 2, payment * 2 + 1);
        let enqueue = match variant {
            Variant::Outboxd => format!(
                "SELECT outbox.enqueue_payment_cancellation({company}, {payment}, 'P-{payment}', ARRAY[{first}, {second}])"
            ),
            Variant::FunctionOnly => format!(
                "SELECT public.{FUNCTION_ONLY}({company}, {payment}, 'P-{payment}', ARRAY[{first}, {second}])"
            ),
            Variant::Bare => format!(
                "INSERT INTO bare_outbox (payload)
                 VALUES (jsonb_build_object('companyId', {company}, 'paymentId', {payment},
                                            'paymentNumber', 'P-{payment}',
                                            'orderIds', array_to_string(ARRAY[{first}, {second}], ',')))"
            ),
        };
        for statement in [
            "BEGIN".to_string(),
            format!(
                "UPDATE payments SET status = 'cancelled', updated_at = now() WHERE id = {payment}"
            ),
            enqueue,
            "COMMIT".to_string(),
        ] {
            client.simple_query(&statement).await.unwrap();
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// A session LISTENing on the daemon's channel and reading every
/// notification, as the daemon's does.
struct Listener {
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    _client: Client,
}

impl Listener {
    async fn start(url: &str) -> Listener {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let task = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(_) = message {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        client.batch_execute("LISTEN outbox_events").await.unwrap();
        Listener {
            count,
            task,
            _client: client,
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
