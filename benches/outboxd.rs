//! The outboxd benchmark: real PostgreSQL, the reference receiver and
//! `outboxd run` as separate processes on this machine, all release builds.
//!
//! ```text
//! cargo bench --bench outboxd                     # 100k events, 100 companies
//! cargo bench --bench outboxd -- --large          # also a 1M backlog
//! cargo bench --bench outboxd -- --events 20000 --latency-seconds 10
//! ```
//!
//! Phases, each on a fresh database (`DATABASE_URL`, default the local
//! server), printed as one table at the end:
//! 1. drain: preload N events across M companies, start the daemon, time
//!    until every event is delivered (from the first attempt to the last
//!    delivery, by the database's clock); the daemon's peak RSS and CPU;
//! 2. the same drain at 10k (and 1M with `--large`) pending rows;
//! 3. SQL-only limit: the daemon's own claim and record statements at its
//!    batch size, pipelined on two connections as the daemon does, no HTTP;
//! 4. latency: single-row transactions at a steady rate (500/s for 30 s)
//!    while the daemon waits on LISTEN; receiver arrival minus the moment
//!    COMMIT was sent (an upper bound of "minus commit");
//! 5. idle: statements per second and CPU of a daemon with nothing to do.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio_postgres::{Client, NoTls};

use outboxd::claim;
use outboxd::record::{self, AttemptKind, NextState, Outcome};

#[derive(Parser, Debug)]
struct Opts {
    /// Events in the main drain.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Companies the events are spread over (one endpoint each).
    #[arg(long, default_value_t = 100)]
    companies: usize,
    /// Also drain a backlog of 1,000,000 events.
    #[arg(long)]
    large: bool,
    /// Offered load for the latency phase, events per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Length of the latency phase.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// The daemon's delivery.concurrency (also the SQL-only batch size).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Run only the latency and idle phase (for quick re-measurement).
    #[arg(long)]
    latency_only: bool,
    /// Run only the drains (10k, --events, and 1M with --large).
    #[arg(long, conflicts_with = "latency_only")]
    drain_only: bool,
    // cargo bench passes --bench; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

fn url_with_dbname(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let start = base.find("://").unwrap() + 3;
    let end = base[start..].find('/').map_or(base.len(), |i| start + i);
    match query {
        Some(q) => format!("{}/{db}?{q}", &base[..end]),
        None => format!("{}/{db}", &base[..end]),
    }
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// A fresh, migrated database; returns its URL.
async fn fresh_db(name: &str) -> String {
    let admin = connect(&admin_url()).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = url_with_dbname(&admin_url(), name);
    let mut client = connect(&url).await;
    outboxd::migrate::migrate(&mut client).await.unwrap();
    url
}

async fn drop_db(name: &str) {
    let admin = connect(&admin_url()).await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

struct Receiver {
    child: Child,
    url: String,
    arrivals: Option<tokio::sync::mpsc::UnboundedReceiver<(String, u128)>>,
}

async fn start_receiver(arrivals: bool) -> Receiver {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd-receiver"));
    cmd.args(["--listen", "127.0.0.1:0", "--quiet"])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if arrivals {
        cmd.arg("--arrivals");
    }
    let mut child = cmd.spawn().expect("starting outboxd-receiver");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().expect("a listening line");
    let url = first.trim_start_matches("listening on ").to_string();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut parts = line.split_whitespace();
            if parts.next() == Some("arrived") {
                if let (Some(key), Some(at)) = (parts.next(), parts.next()) {
                    let _ = tx.send((key.to_string(), at.parse().unwrap_or(0)));
                }
            }
        }
    });
    Receiver {
        child,
        url,
        arrivals: arrivals.then_some(rx),
    }
}

struct Daemon {
    child: Child,
}

impl Daemon {
    async fn start(db_url: &str, concurrency: usize) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outboxd"))
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
            .arg("run")
            .env("OUTBOXD_DATABASE__URL", db_url)
            .env("OUTBOXD_DELIVERY__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#)
            .env("OUTBOXD_DELIVERY__CONCURRENCY", concurrency.to_string())
            .env("OUTBOXD_METRICS__LISTEN", "off")
            .env(
                "OUTBOXD_LOG__LEVEL",
                std::env::var("BENCH_DAEMON_LOG_LEVEL").unwrap_or("info".into()),
            )
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting outboxd run");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("outboxd did not start within 30 s")
                .unwrap()
                .expect("outboxd exited during start-up");
            if line.contains("outboxd is delivering") {
                break;
            }
        }
        // Keep draining stderr so the daemon never blocks on a full pipe;
        // BENCH_DAEMON_LOG=FILE keeps it for a look afterwards.
        let mut keep = std::env::var_os("BENCH_DAEMON_LOG")
            .map(|path| std::fs::File::create(path).expect("BENCH_DAEMON_LOG"));
        tokio::spawn(async move {
            use std::io::Write;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(file) = keep.as_mut() {
                    let _ = writeln!(file, "{line}");
                }
            }
        });
        Daemon { child }
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// Peak resident set (VmHWM), MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name, which is in parentheses.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0 // USER_HZ is 100 on Linux
    }

    async fn stop(mut self) {
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// One endpoint per company, all pointing at the receiver; then `n`
/// payment cancellations spread over the companies, in 50k-row statements.
async fn preload(client: &Client, n: usize, companies: usize, receiver_url: &str) {
    client
        .execute(
            "INSERT INTO outbox.endpoints (company_id, url)
             SELECT c, $1 FROM generate_series(1, $2::int) c",
            &[
                &format!("{receiver_url}/hooks/payment-cancelled"),
                &(companies as i32),
            ],
        )
        .await
        .unwrap();
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(50_000);
        client
            .execute(
                "SELECT count(outbox.enqueue_payment_cancellation(1 + g % $3::int, g, 'P-' || g,
                        CASE WHEN g % 2 = 0 THEN ARRAY[g, g + 1] END))
                   FROM generate_series($1::bigint, $2::bigint) g",
                &[
                    &(done as i64 + 1),
                    &((done + chunk) as i64),
                    &(companies as i32),
                ],
            )
            .await
            .unwrap();
        done += chunk;
    }
    client
        .batch_execute("VACUUM ANALYZE outbox.events")
        .await
        .unwrap();
}

async fn wait_drained(client: &Client, limit: Duration) {
    let started = Instant::now();
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox.events WHERE state IN ('pending', 'leased')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        assert!(started.elapsed() < limit, "not drained within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Drain {
    events: usize,
    per_second: f64,
    peak_rss_mib: f64,
    cpu_per_1000: f64,
}

async fn drain(opts: &Opts, events: usize) -> Drain {
    let db = "outboxd_bench_drain";
    let url = fresh_db(db).await;
    let client = connect(&url).await;
    let receiver = start_receiver(false).await;
    eprintln!("drain: preloading {events} events");
    preload(&client, events, opts.companies, &receiver.url).await;
    eprintln!("drain: delivering");
    let daemon = Daemon::start(&url, opts.concurrency).await;
    wait_drained(&client, Duration::from_secs(3600)).await;
    let seconds: f64 = client
        .query_one(
            "SELECT extract(epoch FROM (SELECT max(delivered_at) FROM outbox.events)
                                     - (SELECT min(started_at) FROM outbox.attempts))::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let delivered: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.events WHERE state = 'delivered'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(delivered as usize, events, "every event delivered");
    let result = Drain {
        events,
        per_second: events as f64 / seconds,
        peak_rss_mib: daemon.peak_rss_mib(),
        cpu_per_1000: daemon.cpu_seconds() / events as f64 * 1000.0,
    };
    daemon.stop().await;
    drop(receiver);
    drop(client);
    drop_db(db).await;
    result
}

/// The claim and record statements alone: a claimer leases batches of the
/// daemon's size and hands them to a recorder that marks them delivered, on
/// two connections, as the daemon's loop and recorder do.
async fn sql_only(opts: &Opts) -> f64 {
    let db = "outboxd_bench_sql";
    let url = fresh_db(db).await;
    let client = connect(&url).await;
    preload(&client, opts.events, opts.companies, "http://127.0.0.1:9").await;
    // The daemon's own pool settings (synchronous_commit off included).
    let raw = outboxd::config::RawConfig {
        database: outboxd::config::RawDatabase {
            url: Some(url.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    let pool = outboxd::db::pool(&raw.validate().unwrap().database);
    let claimer = pool.get().await.unwrap();
    let recorder = pool.get().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<claim::ClaimedEvent>>(4);
    let started = Instant::now();
    let batch = opts.concurrency;
    let claiming = tokio::spawn(async move {
        loop {
            let events = claim::claim(&claimer, batch, "bench", Duration::from_secs(60))
                .await
                .unwrap();
            if events.is_empty() {
                return;
            }
            tx.send(events).await.unwrap();
        }
    });
    let mut n = 0;
    while let Some(events) = rx.recv().await {
        let outcomes: Vec<Outcome> = events
            .iter()
            .map(|e| Outcome {
                event_id: e.id,
                event_type: e.event_type.clone(),
                age: e.age,
                attempt: e.attempt,
                next: NextState::Delivered,
                kind: AttemptKind::Success,
                response_message: Some("ok".into()),
                error: None,
                started_at: SystemTime::now(),
                duration: Duration::from_millis(1),
                http_status: Some(200),
                notify: false,
            })
            .collect();
        record::write(&recorder, "bench", &outcomes, false)
            .await
            .unwrap();
        n += outcomes.len();
    }
    claiming.await.unwrap();
    let per_second = n as f64 / started.elapsed().as_secs_f64();
    drop(client);
    drop_db(db).await;
    per_second
}

struct Latency {
    sent: usize,
    /// Percentiles 50, 95, 99 and the maximum, ms.
    from_commit: [f64; 4],
    /// The same, counted from the moment COMMIT was sent: includes the
    /// writer's own commit (its WAL flush).
    from_commit_sent: [f64; 4],
}

async fn latency(opts: &Opts) -> (Latency, f64, f64) {
    let db = "outboxd_bench_latency";
    let url = fresh_db(db).await;
    let client = connect(&url).await;
    let mut receiver = start_receiver(true).await;
    preload(&client, 0, opts.companies, &receiver.url).await;
    let daemon = Daemon::start(&url, opts.concurrency).await;

    // Idle first: statements per second and CPU with nothing to do, once
    // start-up (each pooled connection preparing its statements) is over.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stats_client = connect(&admin_url()).await;
    stats_client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    let before = commits(&stats_client, db).await;
    let cpu_before = daemon.cpu_seconds();
    let idle_for = Duration::from_secs(20);
    tokio::time::sleep(idle_for).await;
    // pg_stat_database is updated by backends at most every 500 ms or so.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stats_client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    let after = commits(&stats_client, db).await;
    let idle_qps = (after - before) as f64 / (idle_for.as_secs_f64() + 1.0);
    let idle_cpu = (daemon.cpu_seconds() - cpu_before) / (idle_for.as_secs_f64() + 1.0);

    // Steady load: one event per transaction at `rate` per second.
    let total = (opts.rate * opts.latency_seconds) as usize;
    eprintln!(
        "latency: {total} single-event transactions at {}/s",
        opts.rate
    );
    let mut committed: HashMap<String, (u128, u128)> = HashMap::with_capacity(total);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writer = connect(&url).await;
    for i in 0..total {
        ticker.tick().await;
        let tx = writer.transaction().await.unwrap();
        let id: uuid::Uuid = tx
            .query_one(
                "SELECT outbox.enqueue_payment_cancellation($1, $2, $3)",
                &[
                    &(1 + (i % opts.companies) as i64),
                    &(i as i64 + 1),
                    &format!("L-{i}"),
                ],
            )
            .await
            .unwrap()
            .get(0);
        let sent = now_ns();
        tx.commit().await.unwrap();
        committed.insert(id.to_string(), (sent, now_ns()));
    }
    let arrivals = receiver.arrivals.as_mut().unwrap();
    let mut latencies = Vec::with_capacity(total);
    let mut latencies_sent = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(60);
    while latencies.len() < total && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), arrivals.recv()).await {
            Ok(Some((key, at))) => {
                if let Some((sent, done)) = committed.get(&key) {
                    // The receiver can see the event a few microseconds
                    // before the writer sees its COMMIT return: count 0.
                    latencies.push(at.saturating_sub(*done) as f64 / 1e6);
                    latencies_sent.push(at.saturating_sub(*sent) as f64 / 1e6);
                }
            }
            _ => break,
        }
    }
    let summary = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        [pct(0.50), pct(0.95), pct(0.99), *v.last().unwrap()]
    };
    let result = Latency {
        sent: latencies.len(),
        from_commit: summary(latencies),
        from_commit_sent: summary(latencies_sent),
    };
    daemon.stop().await;
    drop(receiver.child);
    drop(client);
    drop_db(db).await;
    (result, idle_qps, idle_cpu)
}

/// Transactions the database has counted: each statement the daemon sends
/// outside a transaction block is one.
async fn commits(client: &Client, db: &str) -> i64 {
    client
        .query_one(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn main() {
    let opts = Opts::parse();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        if opts.latency_only {
            let (lat, idle_qps, idle_cpu) = latency(&opts).await;
            print_latency(&opts, &lat, idle_qps, idle_cpu);
            return;
        }
        let small = drain(&opts, 10_000).await;
        let main = drain(&opts, opts.events).await;
        let large = if opts.large {
            Some(drain(&opts, 1_000_000).await)
        } else {
            None
        };
        let (sql, latency) = if opts.drain_only {
            (None, None)
        } else {
            eprintln!("sql-only: claiming and recording {} events", opts.events);
            (Some(sql_only(&opts).await), Some(latency(&opts).await))
        };

        println!();
        println!("outboxd benchmark ({} cores; concurrency {}; {} companies)", num_cpus(), opts.concurrency, opts.companies);
        println!("| measure | value |");
        println!("|---|---|");
        for d in std::iter::once(&small)
            .chain(std::iter::once(&main))
            .chain(large.iter())
        {
            println!(
                "| drain {:>9} events | {:>8.0} events/s, peak RSS {:.1} MiB, {:.3} CPU s per 1,000 events |",
                d.events, d.per_second, d.peak_rss_mib, d.cpu_per_1000
            );
        }
        if let Some(sql) = sql {
            println!(
                "| SQL-only limit ({} events, batch {}) | {:.0} events/s; the {}-event drain reached {:.0}% of it |",
                opts.events,
                opts.concurrency,
                sql,
                main.events,
                main.per_second / sql * 100.0
            );
        }
        println!(
            "| backlog scaling | {}: {:.0}% of the 10k drain's throughput, RSS {:+.0}% |",
            large.as_ref().map_or(main.events, |l| l.events),
            large.as_ref().map_or(main.per_second, |l| l.per_second) / small.per_second * 100.0,
            (large.as_ref().map_or(main.peak_rss_mib, |l| l.peak_rss_mib) / small.peak_rss_mib
                - 1.0)
                * 100.0
        );
        if let Some((lat, idle_qps, idle_cpu)) = latency {
            print_latency(&opts, &lat, idle_qps, idle_cpu);
        }
    });
}

fn print_latency(opts: &Opts, lat: &Latency, idle_qps: f64, idle_cpu: f64) {
    let [p50, p95, p99, max] = lat.from_commit;
    println!(
        "| latency at {}/s for {} s ({} events), from COMMIT returning | p50 {p50:.1} ms, p95 {p95:.1} ms, p99 {p99:.1} ms, max {max:.1} ms |",
        opts.rate, opts.latency_seconds, lat.sent
    );
    let [p50, p95, p99, max] = lat.from_commit_sent;
    println!(
        "| the same from COMMIT sent (adds the writer's WAL flush) | p50 {p50:.1} ms, p95 {p95:.1} ms, p99 {p99:.1} ms, max {max:.1} ms |"
    );
    println!(
        "| idle | {:.1} statements/s, {:.2}% of a core |",
        idle_qps,
        idle_cpu * 100.0
    );
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
