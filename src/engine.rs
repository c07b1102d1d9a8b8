//! `outboxd run`: the delivery loop that ties the pieces together.
//!
//! ```text
//! LISTEN/poll ─► claim (batch ≤ free slots, lease) ─► deliver (one task per event)
//!                                                        │ judge, decide
//!                        record (batched, fenced) ◄──────┘ bounded channel
//! ```
//!
//! The loop claims only as many events as it has free delivery slots, so a
//! claimed event starts at once and never waits out its lease in a queue.
//! Shutdown has two phases: stop claiming, then let in-flight deliveries
//! finish and be recorded within `delivery.drain_timeout`. What is still
//! running then is abandoned; its lease expires and an instance delivers it
//! again, with the same idempotency key.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::RetryPolicy;
use crate::claim::{self, ClaimedEvent};
use crate::config::Config;
use crate::deliver::Deliverer;
use crate::mailer::Mailer;
use crate::maintenance::{Maintenance, Retention};
use crate::migrate::{self, SchemaState};
use crate::record::{self, AttemptKind, Outcome};
use crate::systemd::{self, Watchdog};
use crate::{admin, db, listen, telemetry, webhook};

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

/// Time allowed for the last outcomes to be written after the drain.
const FINAL_RECORD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("checking the database schema at start-up: {0}")]
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

/// Runs until `shutdown` is cancelled, then drains.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Summary, EngineError> {
    let owner = instance_name();
    let metrics_handle = match crate::telemetry::install() {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "metrics are not recorded");
            None
        }
    };
    let pool = db::pool(&config.database);
    check_database(&pool).await?;

    let wake = Arc::new(Notify::new());
    let listening = Arc::new(AtomicBool::new(false));
    // Admin server and maintenance run until the very end, so /readyz and
    // /metrics answer during the drain too.
    let background_stop = CancellationToken::new();
    let mut background = Vec::new();
    if let (Some(addr), Some(handle)) = (config.metrics.listen, metrics_handle.clone()) {
        let state = admin::State {
            metrics: handle,
            pool: pool.clone(),
            listening: listening.clone(),
        };
        let (bound, task) = admin::start(addr, state, background_stop.clone())
            .await
            .map_err(|e| EngineError::Admin {
                addr,
                reason: e.to_string(),
            })?;
        tracing::info!(url = %format!("http://{bound}"), "admin HTTP listening (/metrics, /healthz, /readyz)");
        background.push(task);
    }
    if let Some(handle) = metrics_handle {
        background.push(tokio::spawn(telemetry::upkeep(
            handle,
            background_stop.clone(),
        )));
    }
    background.push(tokio::spawn(
        Maintenance::new(pool.clone(), config.metrics.refresh_interval)
            .run(background_stop.clone()),
    ));
    background.push(tokio::spawn(
        Retention::new(pool.clone(), config.retention.clone()).run(background_stop.clone()),
    ));
    let listener_stop = CancellationToken::new();
    let listener = tokio::spawn(listen::run(
        config.database.pg.clone(),
        wake.clone(),
        listening.clone(),
        listener_stop.clone(),
    ));

    // Twice the slots: deliveries finishing together queue briefly while the
    // recorder writes the previous group, and beyond that they wait, which
    // holds back new claims while the database is slow.
    let (outcomes_tx, outcomes_rx) = mpsc::channel(config.delivery.concurrency * 2);
    let recorder = tokio::spawn(record::run(
        pool.clone(),
        owner.clone(),
        outcomes_rx,
        config.delivery.concurrency,
    ));
    let mailer_stop = CancellationToken::new();
    let mailer = tokio::spawn(
        Mailer::new(pool.clone(), owner.clone(), config.notify.clone()).run(mailer_stop.clone()),
    );
    let deliverer = Deliverer::new(&config.delivery).map_err(EngineError::Startup)?;
    let shared = Arc::new(Shared {
        deliverer,
        retry: config.retry.clone(),
        outcomes: outcomes_tx,
    });
    let slots = Arc::new(Semaphore::new(config.delivery.concurrency));
    let mut tasks = JoinSet::new();
    tracing::info!(
        owner,
        concurrency = config.delivery.concurrency,
        poll_interval = ?config.delivery.poll_interval,
        "outboxd is delivering"
    );

    // The schema is checked and the database answers: tell systemd.
    systemd::ready();
    let mut watchdog = Watchdog::from_env();
    let mut recorder_died = false;
    let gather_when_busy = (config.delivery.concurrency * 3 / 4).clamp(1, MAX_CLAIM_BATCH);
    // Slots the next claim waits for: 1 unless the last claim came back full.
    let mut gather = 1;
    'serve: loop {
        watchdog.ping();
        if recorder.is_finished() {
            // Without a recorder every outcome would be lost and every event
            // re-sent after its lease, forever: stop instead, and let the
            // service manager restart the daemon.
            tracing::error!("the recorder stopped; shutting down");
            recorder_died = true;
            break 'serve;
        }
        // Claim until a claim comes back short (nothing more is due) or
        // shutdown; with every slot busy, wait for one to free up.
        loop {
            reap(&mut tasks);
            let permits = tokio::select! {
                _ = shutdown.cancelled() => break 'serve,
                permits = free_slots(&slots, gather) => permits,
                // Every slot busy (slow receivers): still alive, say so.
                _ = tokio::time::sleep(config.delivery.poll_interval) => {
                    watchdog.ping();
                    continue;
                }
            };
            let wanted = permits.num_permits();
            // Cancelled by shutdown: a claim dropped half-way may still
            // commit, and then its lease brings the rows back.
            let claimed = tokio::select! {
                _ = shutdown.cancelled() => break 'serve,
                claimed = claim_batch(&pool, wanted, &owner, config.delivery.lease) => claimed,
            };
            let events = match claimed {
                Ok(events) => events,
                Err(e) => {
                    telemetry::database_error("claim");
                    tracing::warn!(error = %e, "claim failed");
                    pause(&shutdown, CLAIM_ERROR_BACKOFF).await;
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
                tasks.spawn(deliver_one(event, shared.clone(), permit));
            }
            drop(permits);
            if got < wanted {
                gather = 1;
                break;
            }
            gather = gather_when_busy;
        }

        let poll = jittered(config.delivery.poll_interval);
        tokio::select! {
            _ = shutdown.cancelled() => break 'serve,
            _ = wake.notified() => telemetry::wakeup("notify"),
            _ = tokio::time::sleep(poll) => telemetry::wakeup("poll"),
        }
    }

    // Phase two: no more claims; let what runs finish.
    systemd::stopping();
    listener_stop.cancel();
    reap(&mut tasks);
    let in_flight = tasks.len();
    tracing::info!(in_flight, deadline = ?config.delivery.drain_timeout, "shutting down: finishing in-flight deliveries");
    let drain_started = Instant::now();
    let drained = tokio::time::timeout(config.delivery.drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let abandoned = if drained.is_err() {
        let left = tasks.len();
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        tracing::warn!(
            abandoned = left,
            "drain deadline passed; abandoned deliveries are retried when their leases expire"
        );
        left
    } else {
        0
    };
    // The channel closes when the last task's sender is gone; the recorder
    // then writes what is queued and stops.
    drop(shared);
    if tokio::time::timeout(FINAL_RECORD_TIMEOUT, recorder)
        .await
        .is_err()
    {
        tracing::warn!("could not record the last outcomes in time; their leases will expire");
    }
    // The listener stops at its next await point; bounded all the same.
    let _ = tokio::time::timeout(Duration::from_secs(2), listener).await;
    // The mailer finishes the email it is sending (bounded by the SMTP
    // timeouts); queued ones wait in the database for the next start.
    mailer_stop.cancel();
    let _ = mailer.await;
    background_stop.cancel();
    for task in background {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
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

async fn claim_batch(
    pool: &deadpool_postgres::Pool,
    wanted: usize,
    owner: &str,
    lease: Duration,
) -> Result<Vec<ClaimedEvent>, String> {
    let client = pool
        .get()
        .await
        .map_err(|e| format!("no database connection: {e}"))?;
    claim::claim(&client, wanted, owner, lease)
        .await
        .map_err(|e| e.to_string())
}

/// Refuses to start on a schema older than this binary's; warns when the
/// server does not vacuum.
async fn check_database(pool: &deadpool_postgres::Pool) -> Result<(), EngineError> {
    let client = pool
        .get()
        .await
        .map_err(|e| EngineError::Startup(e.to_string()))?;
    match migrate::status(&client).await? {
        SchemaState::Current { .. } => {}
        SchemaState::Behind { database, binary } => {
            return Err(EngineError::Schema { database, binary });
        }
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

/// One event: send it (or find why it cannot be sent), judge the answer,
/// hand the outcome to the recorder. The slot is released only once the
/// recorder has accepted the outcome.
async fn deliver_one(event: ClaimedEvent, shared: Arc<Shared>, slot: OwnedSemaphorePermit) {
    let outcome = attempt(&event, &shared).await;
    log_outcome(&event, &outcome);
    // A request went out when there is a status, or when it failed in
    // transport (retryable without one); otherwise it was never sent.
    let sent = outcome.http_status.is_some() || outcome.kind == AttemptKind::Retryable;
    telemetry::attempt(
        &event.event_type,
        outcome.kind.as_str(),
        sent.then_some(outcome.duration),
    );
    // Fails only if the recorder is gone, i.e. at the very end of a
    // shutdown; the lease then brings the event back.
    let _ = shared.outcomes.send(outcome).await;
    drop(slot);
}

async fn attempt(event: &ClaimedEvent, shared: &Shared) -> Outcome {
    // Claims count attempts, so an event whose deliveries keep dying with
    // their daemon (leases running out) stops here instead of looping.
    if event.budget_attempt.max(0) as u32 > shared.retry.max_attempts {
        return record::not_sent(
            event,
            AttemptKind::Permanent,
            format!(
                "gave up after {} attempts without a recorded outcome (leases ran out)",
                event.budget_attempt - 1
            ),
        );
    }
    let Some(endpoint) = &event.endpoint else {
        return record::not_sent(
            event,
            AttemptKind::NoEndpoint,
            format!(
                "no endpoint configured for company {} and event type {}",
                event.company_id, event.event_type
            ),
        );
    };
    if !endpoint.enabled {
        return record::not_sent(
            event,
            AttemptKind::NoEndpoint,
            format!(
                "the endpoint of company {} for {} is disabled",
                event.company_id, event.event_type
            ),
        );
    }
    let request = match webhook::build(event, endpoint) {
        Ok(request) => request,
        Err(e) => return record::not_sent(event, AttemptKind::Permanent, e.to_string()),
    };
    let sent = shared.deliverer.send(&request).await;
    record::decide(
        event,
        sent.verdict(SystemTime::now()),
        sent.started_at,
        sent.duration,
        sent.http_status(),
        &shared.retry,
        fastrand::f64(),
    )
}

/// One line per delivery attempt. Successes at debug: at 10,000 a second an
/// info line each would cost more than the delivery itself and flood the
/// journal, and the metrics count them anyway. Retries at info, final
/// failures at warn.
fn log_outcome(event: &ClaimedEvent, outcome: &Outcome) {
    let retry_in = match outcome.next {
        record::NextState::Retry(d) => Some(humantime::format_duration(d).to_string()),
        _ => None,
    };
    macro_rules! line {
        ($level:ident, $next:literal) => {
            tracing::$level!(
                event_id = %event.id,
                company_id = event.company_id,
                event_type = %event.event_type,
                attempt = event.attempt,
                outcome = outcome.kind.as_str(),
                next = $next,
                retry_in,
                http_status = outcome.http_status,
                duration_ms = outcome.duration.as_millis() as u64,
                error = outcome.error.as_deref(),
                "delivery"
            )
        };
    }
    match outcome.next {
        record::NextState::Delivered => line!(debug, "delivered"),
        record::NextState::Retry(_) => line!(info, "retry"),
        record::NextState::Failed => line!(warn, "failed"),
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
