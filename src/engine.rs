//! `outboxd run`: start the services, run the claim loop (the producer),
//! drain, stop the services in order.
//!
//! ```text
//! LISTEN/poll ─► claim (batch ≤ free slots, lease) ─► deliver (one task per event,
//!                                                        │   src/attempt.rs)
//!                        record (batched, fenced) ◄──────┘ bounded channel
//! ```
//!
//! Phases:
//! 0. **Start**: the admin server (so /healthz and /readyz answer), READY=1
//!    to systemd with STATUS= "waiting for the database", then the database
//!    is awaited with capped backoff (1 s doubling to 5 s), each failure
//!    logged, for as long as it takes: an outage, or a host that boots
//!    before its database, never needs an operator. A schema that is not
//!    current ends the process (exit 3) instead; so does a bad configuration
//!    (exit 2) before any of this. READY comes first because waiting before
//!    it would run into the unit's `TimeoutStartSec`, and the restarts after
//!    that into its start limit, after which systemd gives up.
//! 1. **Serve**: the claim loop claims only as many events as it has free
//!    delivery slots, so a claimed event starts at once and never waits out
//!    its lease in a queue. The mailer, the queue gauges, retention, the
//!    metrics upkeep and the listener run beside it as [`service`]s. The
//!    claim loop and the recorder feed heartbeats; systemd's watchdog is
//!    pinged while they keep their promises ([`crate::service`] says why).
//! 2. **Stop** (SIGTERM), every step with a deadline, so that the process
//!    exits 0 within the unit's `TimeoutStopSec` (40 s) whatever is down:
//!    - claiming stops at once; the listener, the mailer and retention are
//!      told to stop at the same moment and finish beside the drain, within
//!      their grace (mailer 5 s, others 1 s);
//!    - in-flight deliveries get `delivery.drain_timeout` (default 20 s);
//!      what still runs then is abandoned, its lease expires and an
//!      instance delivers it again, with the same idempotency key;
//!    - the last outcomes get [`FINAL_RECORD_TIMEOUT`] (5 s) to be written;
//!    - the gauges, the metrics upkeep and the admin server stop (each
//!      within 1 s, together);
//!    - `main` gives the runtime's blocking threads (DNS lookups) 1 s.
//!
//!    Worst case with the defaults: 20 + 5 + 1 + 1 = 27 s. systemd/outboxd.service
//!    says the same next to its `TimeoutStopSec`; raise both together.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::RetryPolicy;
use crate::claim::{self, ClaimedEvent};
use crate::config::Config;
use crate::deliver::Deliverer;
use crate::listen::Listener;
use crate::mailer::Mailer;
use crate::maintenance::{Maintenance, Retention};
use crate::migrate::{self, MigrateError, SchemaState};
use crate::record::{self, Outcome};
use crate::service::{self, Heartbeat, Liveness};
use crate::telemetry::Upkeep;
use crate::{admin, attempt, db, systemd, telemetry};

/// Largest claim, whatever the concurrency: one statement locking thousands
/// of rows would hold its locks (and other instances' SKIP LOCKED scans) for
/// longer than several smaller claims.
const MAX_CLAIM_BATCH: usize = 500;

/// With a backlog (the last claim filled every free slot), the next claim
/// waits, once a first slot is free, up to [`CLAIM_GATHER_WAIT`] for three
/// quarters of the slots to be free, instead of claiming the first one or
/// two. A statement's fixed cost dominates small claims (see
/// `record::RECORD_GATHER_WAIT` for the figures). A slot so waits at most
/// 2 ms per delivery; without a backlog a claim goes out at once, so latency
/// is unchanged.
const CLAIM_GATHER_WAIT: Duration = Duration::from_millis(2);

/// Wait after a failed claim before the next, so a database outage does not
/// turn into a tight error loop.
const CLAIM_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Waits between tries to reach the database at start: doubling from the
/// first to the last. 5 s at most, so deliveries start within 5 s of the
/// database coming up, at the cost of one connection attempt per 5 s.
const FIRST_START_RETRY: Duration = Duration::from_secs(1);
const MAX_START_RETRY: Duration = Duration::from_secs(5);

/// Time allowed for the last outcomes to be written after the drain.
pub const FINAL_RECORD_TIMEOUT: Duration = Duration::from_secs(5);

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
    let drain = config.delivery.drain_timeout + FINAL_RECORD_TIMEOUT;
    let beside = crate::mailer::STOP_GRACE.max(service::DEFAULT_STOP_GRACE);
    drain.max(beside) + service::DEFAULT_STOP_GRACE.max(ADMIN_STOP) + RUNTIME_STOP
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("starting the delivery engine: {0}")]
    Startup(String),
    #[error(
        "the outbox schema is at version {database}, this binary needs {binary}; run `outboxd migrate`"
    )]
    Schema { database: i32, binary: i32 },
    #[error("{0}")]
    SchemaCheck(#[from] migrate::MigrateError),
    #[error("the task that records delivery outcomes stopped unexpectedly")]
    Recorder,
    #[error("metrics.listen: cannot serve on {addr}: {reason}")]
    Admin {
        addr: std::net::SocketAddr,
        reason: String,
    },
}

/// What shutdown left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Deliveries still running at the drain deadline, abandoned to their
    /// leases.
    pub abandoned: usize,
}

/// Shared by the loop and every delivery task.
struct Shared {
    deliverer: Deliverer,
    retry: RetryPolicy,
    outcomes: mpsc::Sender<Outcome>,
}

/// Runs until `shutdown` is cancelled, then drains; systemd's watchdog is
/// fed from READY to the end while the loops that matter turn.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Summary, EngineError> {
    serve(config, shutdown, &Liveness::new()).await
}

async fn serve(
    config: Config,
    shutdown: CancellationToken,
    liveness: &Liveness,
) -> Result<Summary, EngineError> {
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
    let db_limit = db::round_trip_limit(&config.database);
    let listening = Arc::new(AtomicBool::new(false));

    // Phase zero. The admin server answers from here to the very end, so
    // /readyz says why the daemon is not ready while it waits, and /metrics
    // answers during the drain.
    let admin_stop = CancellationToken::new();
    let mut admin_task = None;
    if let (Some(addr), Some(handle)) = (config.metrics.listen, metrics_handle.clone()) {
        let state = admin::State {
            metrics: handle,
            pool: pool.clone(),
            listening: listening.clone(),
        };
        let (bound, task) = admin::start(addr, state, admin_stop.clone())
            .await
            .map_err(|e| EngineError::Admin {
                addr,
                reason: e.to_string(),
            })?;
        tracing::info!(url = %format!("http://{bound}"), "admin HTTP listening (/metrics, /healthz, /readyz)");
        admin_task = Some(task);
    }
    let stop_admin = || async {
        admin_stop.cancel();
        if let Some(task) = admin_task {
            let _ = tokio::time::timeout(ADMIN_STOP, task).await;
        }
    };
    systemd::ready("waiting for the database");
    // Pings from here on; it stops when this function returns, however.
    let watchdog_stop = CancellationToken::new();
    tokio::spawn(systemd::watchdog(liveness.clone(), watchdog_stop.clone()));
    let _watchdog = watchdog_stop.clone().drop_guard();
    let reached =
        wait_for_database(&pool, db_limit, &shutdown, liveness.register("start-up")).await;
    match reached {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!("stopped before the database could be reached");
            stop_admin().await;
            return Ok(Summary { abandoned: 0 });
        }
        Err(e) => {
            stop_admin().await;
            return Err(e);
        }
    }

    // Phase one.
    let upkeep = metrics_handle.map(|handle| service::spawn(Upkeep(handle), liveness));
    let gauges = service::spawn(
        Maintenance::new(pool.clone(), config.metrics.refresh_interval, db_limit),
        liveness,
    );
    let retention = service::spawn(
        Retention::new(pool.clone(), config.retention.clone(), db_limit),
        liveness,
    );
    let wake = Arc::new(Notify::new());
    let listener = service::spawn(
        Listener::new(config.database.pg.clone(), wake.clone(), listening.clone()),
        liveness,
    );
    let mailer = service::spawn(
        Mailer::new(pool.clone(), owner.clone(), config.notify.clone(), db_limit),
        liveness,
    );
    // Twice the slots: deliveries finishing together queue briefly while the
    // recorder writes the previous group, and beyond that they wait, which
    // holds back new claims while the database is slow.
    let (outcomes_tx, outcomes_rx) = mpsc::channel(config.delivery.concurrency * 2);
    let mut recorder = tokio::spawn(record::run(
        pool.clone(),
        owner.clone(),
        outcomes_rx,
        config.delivery.concurrency,
        db_limit,
        liveness.register("recorder"),
    ));
    let shared = Arc::new(Shared {
        deliverer,
        retry: config.retry.clone(),
        outcomes: outcomes_tx,
    });
    let mut tasks = JoinSet::new();
    tracing::info!(
        owner,
        concurrency = config.delivery.concurrency,
        poll_interval = ?config.delivery.poll_interval,
        "outboxd is delivering"
    );
    systemd::status("delivering");
    let producer = Producer {
        pool: &pool,
        owner: &owner,
        config: &config,
        claim_limit: db_limit,
        slots: Arc::new(Semaphore::new(config.delivery.concurrency)),
        shared: &shared,
        wake: &wake,
    };
    let recorder_died = producer
        .run(
            &mut tasks,
            &shutdown,
            &recorder,
            liveness.register("claim loop"),
        )
        .await;

    // Phase two: no more claims; what runs winds down beside the drain.
    systemd::stopping();
    tracing::info!(
        within = %humantime::format_duration(stop_budget(&config)),
        "stopping"
    );
    listener.stop();
    mailer.stop();
    retention.stop();
    let drain_started = Instant::now();
    let abandoned = drain(&mut tasks, config.delivery.drain_timeout).await;
    // The channel closes when the last task's sender is gone; the recorder
    // then writes what is queued and stops.
    drop(shared);
    if tokio::time::timeout(FINAL_RECORD_TIMEOUT, &mut recorder)
        .await
        .is_err()
    {
        // Aborted on purpose: its heartbeat must not read as a stall.
        watchdog_stop.cancel();
        recorder.abort();
        tracing::warn!("could not record the last outcomes in time; their leases will expire");
    }
    listener.join().await;
    mailer.join().await;
    retention.join().await;
    gauges.stop();
    if let Some(upkeep) = &upkeep {
        upkeep.stop();
    }
    gauges.join().await;
    if let Some(upkeep) = upkeep {
        upkeep.join().await;
    }
    stop_admin().await;
    tracing::info!(
        drained_in = ?drain_started.elapsed(),
        abandoned,
        "outboxd stopped"
    );
    if recorder_died {
        return Err(EngineError::Recorder);
    }
    Ok(Summary { abandoned })
}

/// Why the database cannot be used at start.
enum Unusable {
    /// Not reachable now (down, refusing, timing out): wait and try again.
    Unreachable(String),
    /// Reached, but this binary must not run on it: stop.
    Refused(EngineError),
}

/// Phase zero: until the database answers and its schema is current (true),
/// or `shutdown` (false). Each failure is logged and shown in systemd's
/// STATUS=; `heartbeat` promises each try's and each wait's bound.
async fn wait_for_database(
    pool: &deadpool_postgres::Pool,
    limit: Duration,
    shutdown: &CancellationToken,
    heartbeat: Heartbeat,
) -> Result<bool, EngineError> {
    let mut delay = FIRST_START_RETRY;
    let result = loop {
        heartbeat.within(limit);
        let checked = tokio::select! {
            _ = shutdown.cancelled() => break Ok(false),
            checked = tokio::time::timeout(limit, check_database(pool)) => checked
                .unwrap_or_else(|_| Err(Unusable::Unreachable(format!("no answer within {limit:?}")))),
        };
        let reason = match checked {
            Ok(()) => break Ok(true),
            Err(Unusable::Refused(e)) => break Err(e),
            Err(Unusable::Unreachable(reason)) => reason,
        };
        tracing::warn!(
            error = %reason,
            retry_in = %humantime::format_duration(delay),
            "waiting for the database"
        );
        systemd::status(&format!("waiting for the database: {reason}"));
        heartbeat.within(delay);
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(false),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_START_RETRY);
    };
    heartbeat.retire();
    result
}

/// Refuses a schema that is not this binary's; warns when the server does
/// not vacuum.
async fn check_database(pool: &deadpool_postgres::Pool) -> Result<(), Unusable> {
    let client = pool
        .get()
        .await
        .map_err(|e| Unusable::Unreachable(db::describe_pool(&e)))?;
    match migrate::status(&client).await {
        Ok(SchemaState::Current { .. }) => {}
        Ok(SchemaState::Behind { database, binary }) => {
            return Err(Unusable::Refused(EngineError::Schema { database, binary }));
        }
        // A statement failed: the connection broke, or the server is
        // shutting down or in recovery. Try again.
        Err(MigrateError::Database { step, reason }) => {
            return Err(Unusable::Unreachable(format!("{step}: {reason}")));
        }
        Err(e) => return Err(Unusable::Refused(e.into())),
    }
    // Delivers all the same, but the operator should know: see
    // docs/BENCHMARKS.md for what a 1M backlog cost without autovacuum.
    if let Ok(false) = db::autovacuum_runs(&client).await {
        tracing::warn!(
            "PostgreSQL's autovacuum is off: the dead row versions every delivery leaves in \
             outbox.events are not reclaimed, so the table and its indexes grow and claims slow \
             down; turn autovacuum on, or VACUUM the outbox tables regularly"
        );
    }
    Ok(())
}

/// The claim loop and what it needs.
struct Producer<'a> {
    pool: &'a deadpool_postgres::Pool,
    owner: &'a str,
    config: &'a Config,
    /// Bound on one claim, connection included (`db::round_trip_limit`).
    claim_limit: Duration,
    /// One per delivery in flight.
    slots: Arc<Semaphore>,
    shared: &'a Arc<Shared>,
    wake: &'a Notify,
}

impl Producer<'_> {
    /// Claims and starts deliveries until `shutdown` (false) or the recorder
    /// is gone (true). Every wait is bounded and promised to `heartbeat`
    /// first: a free slot or the poll interval, a claim within its limit,
    /// the pause after a failed one, a wake-up or the poll.
    async fn run(
        &self,
        tasks: &mut JoinSet<()>,
        shutdown: &CancellationToken,
        recorder: &tokio::task::JoinHandle<()>,
        heartbeat: Heartbeat,
    ) -> bool {
        let poll_interval = self.config.delivery.poll_interval;
        let gather_when_busy = (self.config.delivery.concurrency * 3 / 4).clamp(1, MAX_CLAIM_BATCH);
        // Slots the next claim waits for: 1 unless the last claim came back full.
        let mut gather = 1;
        let recorder_died = 'serve: loop {
            // Claim until a claim comes back short (nothing more is due) or
            // shutdown; with every slot busy, wait for one to free up.
            loop {
                if recorder.is_finished() {
                    // Without a recorder every outcome would be lost and
                    // every event re-sent after its lease, forever: stop
                    // instead, and let the service manager restart the daemon.
                    tracing::error!("the recorder stopped; shutting down");
                    break 'serve true;
                }
                reap(tasks);
                heartbeat.within(poll_interval);
                let permits = tokio::select! {
                    _ = shutdown.cancelled() => break 'serve false,
                    permits = free_slots(&self.slots, gather) => permits,
                    // Every slot busy (slow receivers): look again.
                    _ = tokio::time::sleep(poll_interval) => continue,
                };
                let wanted = permits.num_permits();
                heartbeat.within(self.claim_limit);
                // Cancelled by shutdown or its limit: a claim dropped
                // half-way may still commit, and then its lease brings the
                // rows back.
                let claimed = tokio::select! {
                    _ = shutdown.cancelled() => break 'serve false,
                    claimed = tokio::time::timeout(self.claim_limit, self.claim(wanted)) => claimed
                        .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.claim_limit))),
                };
                let events = match claimed {
                    Ok(events) => events,
                    Err(e) => {
                        telemetry::database_error("claim");
                        tracing::warn!(error = %e, "claim failed");
                        heartbeat.within(CLAIM_ERROR_BACKOFF);
                        pause(shutdown, CLAIM_ERROR_BACKOFF).await;
                        gather = 1;
                        break;
                    }
                };
                let got = events.len();
                if got > 0 {
                    tracing::debug!(claimed = got, wanted, "claimed due events");
                }
                telemetry::claimed(got, events.iter().filter(|e| e.lease_expired).count());
                let mut permits = permits;
                for event in events {
                    let permit = permits.split(1).expect("one permit per claimed event");
                    tasks.spawn(deliver_one(event, self.shared.clone(), permit));
                }
                drop(permits);
                if got < wanted {
                    gather = 1;
                    break;
                }
                gather = gather_when_busy;
            }

            let poll = jittered(poll_interval);
            heartbeat.within(poll);
            tokio::select! {
                _ = shutdown.cancelled() => break 'serve false,
                _ = self.wake.notified() => telemetry::wakeup("notify"),
                _ = tokio::time::sleep(poll) => telemetry::wakeup("poll"),
            }
        };
        heartbeat.retire();
        recorder_died
    }

    async fn claim(&self, wanted: usize) -> Result<Vec<ClaimedEvent>, String> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| format!("no database connection: {}", db::describe_pool(&e)))?;
        claim::claim(&client, wanted, self.owner, self.config.delivery.lease)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Phase two's first step: lets in-flight deliveries finish within
/// `deadline`; returns how many were abandoned to their leases.
async fn drain(tasks: &mut JoinSet<()>, deadline: Duration) -> usize {
    reap(tasks);
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

/// Collects finished delivery tasks. A panic there is a bug; the event's
/// lease brings it back, so the daemon logs it and goes on.
fn reap(tasks: &mut JoinSet<()>) {
    while let Some(result) = tasks.try_join_next() {
        if let Err(e) = result {
            if e.is_panic() {
                tracing::error!(error = %e, "a delivery task panicked; its event is retried after its lease");
            }
        }
    }
}

/// Waits for a free slot; then, if `gather` is more than one, up to
/// [`CLAIM_GATHER_WAIT`] for `gather` of them in all; then takes every free
/// one (up to [`MAX_CLAIM_BATCH`]). Only the loop acquires, so what it saw
/// free stays free until it takes it.
async fn free_slots(slots: &Arc<Semaphore>, gather: usize) -> OwnedSemaphorePermit {
    const OPEN: &str = "the semaphore is never closed";
    let mut taken = slots.clone().acquire_owned().await.expect(OPEN);
    let gather = gather.min(MAX_CLAIM_BATCH);
    if gather > 1 && slots.available_permits() + 1 < gather {
        // Held only to learn that enough are free; given back at once.
        let rest = (gather - 1) as u32;
        let _ =
            tokio::time::timeout(CLAIM_GATHER_WAIT, slots.clone().acquire_many_owned(rest)).await;
    }
    let more = slots.available_permits().min(MAX_CLAIM_BATCH - 1);
    if more > 0 {
        taken.merge(
            slots
                .clone()
                .try_acquire_many_owned(more as u32)
                .expect(OPEN),
        );
    }
    taken
}

async fn pause(shutdown: &CancellationToken, how_long: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(how_long) => {}
    }
}

/// The poll interval ±10%, so instances started together do not poll in
/// lockstep.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}

/// One event: the attempt (`src/attempt.rs`), then the outcome to the
/// recorder. The slot is released only once the recorder has accepted the
/// outcome.
async fn deliver_one(event: ClaimedEvent, shared: Arc<Shared>, slot: OwnedSemaphorePermit) {
    let outcome = attempt::attempt(&event, &shared.deliverer, &shared.retry).await;
    // Fails only if the recorder is gone, i.e. at the very end of a
    // shutdown; the lease then brings the event back.
    let _ = shared.outcomes.send(outcome).await;
    drop(slot);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{Instant, sleep};

    // Paused clock: a wait shows as time advanced, none as zero; sleeps
    // end in order without real time passing.

    /// Frees one held slot at each of the given moments.
    fn finish_at(slots: &Arc<Semaphore>, moments: &[u64]) {
        for &ms in moments {
            let held = slots
                .clone()
                .try_acquire_owned()
                .expect("a free slot to hold");
            tokio::spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                drop(held);
            });
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_full_claim_it_waits_briefly_from_the_first_free_slot_for_more() {
        let slots = Arc::new(Semaphore::new(4));
        // Every slot busy: two deliveries end at 50 ms, one at 51, one at 60.
        finish_at(&slots, &[50, 50, 51, 60]);
        let started = Instant::now();
        let taken = free_slots(&slots, 3).await;
        assert_eq!(taken.num_permits(), 3);
        assert_eq!(started.elapsed(), Duration::from_millis(51));
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_more_slots_is_bounded() {
        let slots = Arc::new(Semaphore::new(4));
        finish_at(&slots, &[50, 100, 100, 100]);
        let started = Instant::now();
        let taken = free_slots(&slots, 3).await;
        assert_eq!(taken.num_permits(), 1);
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(50) + CLAIM_GATHER_WAIT
        );
    }

    #[tokio::test(start_paused = true)]
    async fn enough_free_slots_are_taken_at_once() {
        let slots = Arc::new(Semaphore::new(4));
        finish_at(&slots, &[100]);
        let started = Instant::now();
        assert_eq!(free_slots(&slots, 3).await.num_permits(), 3);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_backlog_a_claim_takes_what_is_free_at_once() {
        let slots = Arc::new(Semaphore::new(4));
        finish_at(&slots, &[100, 100, 100]);
        let started = Instant::now();
        assert_eq!(free_slots(&slots, 1).await.num_permits(), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
