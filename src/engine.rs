//! `outboxd run`: start the services, run the claim loop (the producer),
//! drain, stop the services in order.
//!
//! ```text
//! LISTEN/poll ─► producer: claim (batch ≤ free slots, lease)
//!                 │  one task per event
//!                 ▼
//!              executor: prepare, send, judge, decide (pipeline/executor.rs)
//!                 │  bounded channel
//!                 ▼
//!              completer: record (batched, fenced) ─► Freed: room under the caps
//! ```
//!
//! Phases:
//! 0. **Start**: the admin server (so /healthz and /readyz answer), READY=1
//!    to systemd with STATUS= "waiting for the database", then the database
//!    is awaited with capped backoff (1 s doubling to 5 s), each failure
//!    logged, for as long as it takes: an outage, or a host that boots
//!    before its database, never needs an operator. A schema older than the
//!    binary is waited for too, up to `database.schema_wait` (2 min: the
//!    migration unit may be retrying beside us), then ends the process
//!    (exit 3), as a newer or modified one does at once (and, while
//!    running, a newer one that a statement refused for structural reasons
//!    led [`SchemaWatch`] to find: a stop as below, then exit 3); so does a bad
//!    configuration (exit 2) before any of this. READY comes first because waiting before
//!    it would run into the unit's `TimeoutStartSec`, and the restarts after
//!    that into its start limit, after which systemd gives up.
//! 1. **Serve**: the claim loop ([`ClaimLoop`]) starts one delivery task
//!    per claimed event ([`executor::deliver`]), whose outcome goes to the
//!    recorder ([`completer::Recorder::run`]). The mailer, the queue gauges,
//!    retention, the metrics upkeep and the listener run beside it as [`service`]s. The
//!    claim loop and the recorder feed heartbeats; systemd's watchdog is
//!    pinged while they keep their promises ([`crate::service`] says why).
//! 2. **Stop** (SIGTERM), every step with a deadline, so that the process
//!    exits 0 within the unit's `TimeoutStopSec` (40 s) whatever is down:
//!    - claiming stops at once; a claim in flight gets
//!      [`producer::CLAIM_STOP_GRACE`] (1 s) to say what it leased, and its
//!      events join the drain; the listener, the mailer and retention are
//!      told to stop at the same moment and finish beside the drain, within
//!      their grace (mailer 5 s, others 1 s);
//!    - in-flight deliveries get `delivery.drain_timeout` (default 20 s);
//!      what still runs then is abandoned;
//!    - the last outcomes get [`FINAL_RECORD_TIMEOUT`] (5 s) to be written;
//!    - what is still leased to this instance (the abandoned deliveries, a
//!      claim dropped unanswered) is handed back to the queue, due at once,
//!      within [`HAND_BACK_TIMEOUT`] (1 s): a restarted daemon or another
//!      instance delivers it again at once, with the same idempotency key,
//!      instead of after its lease;
//!    - the gauges, the metrics upkeep and the admin server stop (each
//!      within 1 s, together);
//!    - `main` gives the runtime's blocking threads (DNS lookups) 1 s.
//!
//!    Worst case with the defaults: 1 + 20 + 5 + 1 + 1 + 1 = 29 s.
//!    systemd/outboxd.service says the same next to its `TimeoutStopSec`;
//!    raise both together.

mod error;
mod startup;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::election::{Election, Role};
use crate::http::client::Deliverer;
use crate::listen::Listener;
use crate::maintenance::{HoldLimit, LeaseExpiry, Maintenance, Retention, SigningWatch};
use crate::notify::mailer::Mailer;
use crate::pipeline::producer::{self, ClaimLoop};
use crate::pipeline::schema_watch::SchemaWatch;
use crate::pipeline::{completer, executor};
use crate::progress::Progress;
use crate::service::{self, Liveness, Running};
use crate::store::claim;
use crate::store::pool as db;
use crate::telemetry::Upkeep;
use crate::{admin, systemd, telemetry};
pub use error::EngineError;

/// Time allowed for the last outcomes to be written after the drain.
pub const FINAL_RECORD_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed, after the last outcomes, to hand back the leases this
/// instance still holds (one statement).
pub const HAND_BACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Time allowed for the admin server to stop.
const ADMIN_STOP: Duration = Duration::from_secs(1);

/// What `main` gives the runtime's blocking threads at exit.
pub const RUNTIME_STOP: Duration = Duration::from_secs(1);

/// The longest a stop can take with `config`, SIGTERM to exit (the module
/// comment lists the steps): the drain and the last outcomes, or the
/// services winding down beside them if that takes longer, then the
/// remaining services and the admin server together, then the runtime.
/// systemd's `TimeoutStopSec` must stay above it.
pub fn stop_budget(config: &Config) -> Duration {
    let drain = producer::CLAIM_STOP_GRACE
        + config.delivery.drain_timeout
        + FINAL_RECORD_TIMEOUT
        + HAND_BACK_TIMEOUT;
    let beside = crate::notify::mailer::STOP_GRACE.max(service::DEFAULT_STOP_GRACE);
    drain.max(beside) + service::DEFAULT_STOP_GRACE.max(ADMIN_STOP) + RUNTIME_STOP
}

/// What shutdown left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Deliveries still running at the drain deadline, abandoned to their
    /// leases.
    pub abandoned: usize,
}

/// Runs until `shutdown` is cancelled, then drains; systemd's watchdog is
/// fed from READY to the end while the loops that matter turn.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Summary, EngineError> {
    let liveness = Liveness::new();
    let owner = instance_name();
    let metrics_handle = match telemetry::install() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "metrics are not recorded");
            None
        }
    };
    let deliverer = Deliverer::new(&config.delivery).map_err(EngineError::Startup)?;
    let pool = db::pool(&config.database);
    let claim_pool = db::claim_pool(&config.database);
    let upkeep_pool = db::upkeep_pool(&config.database);
    let db_limit = db::round_trip_limit(&config.database);
    let listening = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::new());
    // Whether this instance does the maintenance (crate::election).
    let role = Role::standby();
    let hand_over = CancellationToken::new();

    // Phase zero. The admin server answers from here to the very end, so
    // /readyz says why the daemon is not ready while it waits, and /metrics
    // answers during the drain.
    let admin = Admin::start(
        &config,
        metrics_handle.clone(),
        &pool,
        &listening,
        &progress,
        &role,
    )
    .await?;
    systemd::ready("waiting for the database");
    // Pings from here on; they stop when this function returns, however.
    let watchdog_stop = CancellationToken::new();
    tokio::spawn(systemd::watchdog(liveness.clone(), watchdog_stop.clone()));
    let _watchdog = watchdog_stop.clone().drop_guard();
    let startup = liveness.register("start-up");
    if let Some(warning) = db::plaintext_warning(&config.database) {
        tracing::warn!("{warning}");
    }
    let charset =
        match startup::wait_for_database(&pool, &config.database, db_limit, &shutdown, startup)
            .await
        {
            Ok(Some(charset)) => charset,
            Ok(None) => {
                tracing::info!("stopped before the database could be reached");
                admin.stop().await;
                return Ok(Summary { abandoned: 0 });
            }
            Err(e) => {
                admin.stop().await;
                return Err(e);
            }
        };

    // Phase one: the services, the recorder, the claim loop.
    let wake = Arc::new(Notify::new());
    let services = Services {
        upkeep: metrics_handle.map(|handle| service::spawn(Upkeep(handle), &liveness)),
        election: service::spawn(
            Election::new(&config.database, role.clone(), hand_over.clone()),
            &liveness,
        ),
        hand_over,
        gauges: service::spawn(
            Maintenance::new(
                upkeep_pool.clone(),
                config.metrics.refresh_interval,
                db_limit,
            )
            .elected(role.clone()),
            &liveness,
        ),
        retention: service::spawn(
            Retention::new(upkeep_pool.clone(), config.retention.clone(), db_limit)
                .elected(role.clone()),
            &liveness,
        ),
        hold_limit: service::spawn(
            HoldLimit::new(upkeep_pool.clone(), &config.circuit, db_limit).elected(role.clone()),
            &liveness,
        ),
        signing_watch: service::spawn(
            SigningWatch::new(
                upkeep_pool.clone(),
                config.metrics.refresh_interval,
                config.notify.window,
                db_limit,
            )
            .elected(role.clone()),
            &liveness,
        ),
        lease_expiry: service::spawn(
            LeaseExpiry::new(
                upkeep_pool.clone(),
                &config.delivery,
                db_limit,
                wake.clone(),
            )
            .elected(role.clone()),
            &liveness,
        ),
        listener: service::spawn(
            Listener::new(&config.database, wake.clone(), listening.clone()),
            &liveness,
        ),
        mailer: service::spawn(
            Mailer::new(
                pool.clone(),
                owner.clone(),
                config.notify.clone(),
                &config.circuit,
                db_limit,
            ),
            &liveness,
        ),
    };
    // Twice the slots: deliveries finishing together queue briefly while the
    // recorder writes the previous group, and beyond that they wait, which
    // holds back new claims while the database is slow.
    let (outcomes_tx, outcomes_rx) = mpsc::channel(config.delivery.concurrency * 2);
    let room = Arc::new(producer::Room::default());
    // Claiming also stops when a newer binary's migration is found under
    // this one (exit 3, after the stop's usual steps).
    let stop = shutdown.child_token();
    let schema = Arc::new(SchemaWatch::new(pool.clone(), db_limit, stop.clone()));
    let recorder = completer::Recorder {
        pool: pool.clone(),
        owner: owner.clone(),
        gather: config.delivery.concurrency,
        limit: db_limit,
        lease: config.delivery.lease,
        circuit: config.circuit.clone(),
        notify_window: config.notify.window,
        room: room.clone(),
        charset,
        progress: progress.clone(),
        schema: schema.clone(),
    };
    let mut recorder = tokio::spawn(recorder.run(outcomes_rx, liveness.register("recorder")));
    let context = Arc::new(executor::Context {
        deliverer,
        retry: config.retry.clone(),
        outcomes: outcomes_tx,
        room: room.clone(),
    });
    tracing::info!(
        owner,
        concurrency = config.delivery.concurrency,
        poll_interval = ?config.delivery.poll_interval,
        "outboxd is delivering"
    );
    systemd::status("delivering");
    let mut tasks = JoinSet::new();
    let recorder_died = ClaimLoop {
        pool: &pool,
        plain_pool: &claim_pool,
        owner: &owner,
        config: &config,
        claim_limit: db_limit,
        slots: Arc::new(Semaphore::new(config.delivery.concurrency)),
        context: &context,
        wake: &wake,
        room: &room,
        progress: &progress,
        schema: &schema,
    }
    .run(
        &mut tasks,
        &stop,
        &recorder,
        liveness.register("claim loop"),
    )
    .await;

    // Phase two: no more claims; what must not outlive them winds down
    // beside the drain.
    systemd::stopping();
    tracing::info!(
        within = %humantime::format_duration(stop_budget(&config)),
        "stopping"
    );
    services.wind_down();
    let drain_started = Instant::now();
    let abandoned = drain(&mut tasks, config.delivery.drain_timeout).await;
    // The channel closes when the last task's sender is gone; the recorder
    // then writes what is queued and stops.
    drop(context);
    if tokio::time::timeout(FINAL_RECORD_TIMEOUT, &mut recorder)
        .await
        .is_err()
    {
        // Aborted on purpose: its heartbeat must not read as a stall.
        watchdog_stop.cancel();
        recorder.abort();
        tracing::warn!(
            "could not record the last outcomes in time; those events will be sent again, with the same idempotency key"
        );
    }
    // Nothing of this instance delivers any more: what it still holds goes
    // back to the queue now, not when its lease runs out.
    hand_back(&pool, &owner).await;
    tokio::join!(services.stop(), admin.stop());
    tracing::info!(
        drained_in = ?drain_started.elapsed(),
        abandoned,
        "outboxd stopped"
    );
    if let Some(problem) = schema.newer() {
        return Err(EngineError::Schema(problem));
    }
    if recorder_died {
        return Err(EngineError::Recorder);
    }
    Ok(Summary { abandoned })
}

/// The admin HTTP server (`metrics.listen`), when there is one.
struct Admin {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Admin {
    /// Binds now, so a port in use fails the start naming `metrics.listen`.
    async fn start(
        config: &Config,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
        pool: &deadpool_postgres::Pool,
        listening: &Arc<AtomicBool>,
        progress: &Arc<Progress>,
        role: &Role,
    ) -> Result<Admin, EngineError> {
        let stop = CancellationToken::new();
        let (Some(addr), Some(metrics)) = (config.metrics.listen, metrics) else {
            return Ok(Admin { stop, task: None });
        };
        let state = admin::State {
            metrics,
            pool: pool.clone(),
            listening: listening.clone(),
            progress: progress.clone(),
            role: role.clone(),
        };
        let (bound, task) =
            admin::start(addr, state, stop.clone())
                .await
                .map_err(|e| EngineError::Admin {
                    addr,
                    reason: e.to_string(),
                    in_use: e.kind() == std::io::ErrorKind::AddrInUse,
                })?;
        tracing::info!(url = %format!("http://{bound}"), "admin HTTP listening (/metrics, /healthz, /readyz)");
        Ok(Admin {
            stop,
            task: Some(task),
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = tokio::time::timeout(ADMIN_STOP, task).await;
        }
    }
}

/// The background services of phase one.
struct Services {
    upkeep: Option<Running>,
    /// The maintenance election; `hand_over` tells it the stop has begun.
    election: Running,
    hand_over: CancellationToken,
    gauges: Running,
    retention: Running,
    hold_limit: Running,
    signing_watch: Running,
    lease_expiry: Running,
    listener: Running,
    mailer: Running,
}

impl Services {
    /// At the start of the drain: the listener (nothing more is claimed),
    /// the mailer and retention (each a database client the stop should not
    /// wait on) are told to stop, and wind down beside the drain within
    /// their grace.
    fn wind_down(&self) {
        // The maintenance goes to another instance now, not when this
        // process ends: its jobs stop here too.
        self.hand_over.cancel();
        self.election.stop();
        self.listener.stop();
        self.mailer.stop();
        self.retention.stop();
        self.hold_limit.stop();
        self.signing_watch.stop();
        self.lease_expiry.stop();
    }

    /// After the drain: waits for those, then stops the queue gauges and the
    /// metrics upkeep (which serve /metrics to the end) together.
    async fn stop(self) {
        self.wind_down();
        self.listener.join().await;
        self.mailer.join().await;
        self.retention.join().await;
        self.hold_limit.join().await;
        self.signing_watch.join().await;
        self.lease_expiry.join().await;
        self.election.join().await;
        self.gauges.stop();
        if let Some(upkeep) = &self.upkeep {
            upkeep.stop();
        }
        self.gauges.join().await;
        if let Some(upkeep) = self.upkeep {
            upkeep.join().await;
        }
    }
}

/// Phase two's first step: lets in-flight deliveries finish within
/// `deadline`; returns how many were abandoned to their leases.
async fn drain(tasks: &mut JoinSet<()>, deadline: Duration) -> usize {
    producer::reap(tasks);
    let in_flight = tasks.len();
    tracing::info!(in_flight, deadline = ?deadline, "shutting down: finishing in-flight deliveries");
    let drained = tokio::time::timeout(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_ok() {
        return 0;
    }
    let left = tasks.len();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tracing::warn!(
        abandoned = left,
        "drain deadline passed; abandoned deliveries are retried when their leases expire"
    );
    left
}

/// Puts back in the queue, due at once, every event still leased to `owner`
/// (deliveries abandoned at the drain deadline, a claim whose events were
/// never started), within [`HAND_BACK_TIMEOUT`]; on failure their leases
/// run out as before.
async fn hand_back(pool: &deadpool_postgres::Pool, owner: &str) {
    let handed = tokio::time::timeout(HAND_BACK_TIMEOUT, async {
        let client = db::Checkout::get(pool, "stop")
            .await
            .map_err(|e| db::describe_pool(&e))?;
        let handed = claim::hand_back(&client, owner)
            .await
            .map_err(|e| db::describe(&e));
        client.done();
        handed
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {HAND_BACK_TIMEOUT:?}")));
    match handed {
        Ok(0) => {}
        Ok(n) => {
            telemetry::handed_back("stop", n);
            tracing::info!(
                handed_back = n,
                "events still leased to this instance are back in the queue, due at once"
            )
        }
        Err(e) => tracing::warn!(
            error = %e,
            "could not hand back this instance's leases; those events wait for their leases to run out"
        ),
    }
}

/// `host:pid:xxxx`, stored as `lease_owner` so a DBA can tell which
/// instance holds a lease. The random suffix tells apart two lives of one pid
/// (containers all run as pid 1).
pub fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host}:{}:{:04x}", std::process::id(), fastrand::u16(..))
}
