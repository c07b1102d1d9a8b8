//! Claiming due events: the claim loop ([`ClaimLoop`], the engine's
//! producer), and the one statement (`sql/queries/claim.sql`) that leases a
//! batch to this instance and returns each event with its endpoint.
//!
//! The loop claims only as many events as it has free delivery slots, so a
//! claimed event starts at once and never waits out its lease in a queue.
//! Woken by NOTIFY, it keeps looking every few milliseconds while events
//! keep coming ([`FollowUp`]): the enqueue notifies at most once per quarter
//! second (migration 0009), and this is how the events in between are
//! found without waiting for the poll.
//! The claim is fair between endpoints and keeps each under its cap; an
//! endpoint left at its cap is remembered in [`Room`], and the recorder
//! wakes the loop when one of that endpoint's deliveries has been marked.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::{ClaimedEvent, EndpointKey};
use crate::pipeline::completer::Freed;
use crate::pipeline::executor;
use crate::pipeline::schema_watch::SchemaWatch;
use crate::progress::Progress;
use crate::service::Heartbeat;
use crate::store::claim::{Claim, ClaimError, InFlight, Mode, claim};
use crate::store::error::ErrorKind;
use crate::store::pool as db;
use crate::{systemd, telemetry};

/// This instance's requests in flight per endpoint, which the claim keeps
/// under each endpoint's cap; the endpoints the last claim left at their cap
/// with more due; and the wake-up for the claim loop when the outcome of a
/// delivery to one of those has been written (its room is back: without it
/// the loop would wait for the next poll, and a capped endpoint would get
/// `cap` events a second). A delivery holds its place until its outcome is
/// written, so that the next claim sees the circuit it opened or the
/// Retry-After it brought.
///
/// Counted here, per instance, rather than from the leases in the
/// database: exact for this instance at no cost per claim, where counting
/// every instance's live leases cost each claim an index probe per endpoint
/// and every claimed row an entry in one more index (docs/BENCHMARKS.md).
/// With N instances an endpoint has at most N x cap requests in flight.
#[derive(Debug, Default)]
pub struct Room {
    state: Mutex<RoomState>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct RoomState {
    in_flight: HashMap<EndpointKey, u32>,
    capped: HashSet<EndpointKey>,
}

impl Room {
    fn state(&self) -> std::sync::MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the last claim found at its cap, and what it started. `before`
    /// is what was in flight when the claim was made: a delivery to a capped
    /// endpoint that ended while the claim ran found it not yet marked
    /// capped and woke nobody, so that wake-up is made here.
    fn claimed(&self, capped: HashSet<EndpointKey>, events: &[ClaimedEvent], before: &InFlight) {
        let mut state = self.state();
        let ended_meanwhile = capped
            .iter()
            .any(|key| state.in_flight.get(key).copied().unwrap_or(0) < before.count(key));
        state.capped = capped;
        if ended_meanwhile {
            self.freed.notify_one();
        }
        for e in events {
            *state
                .in_flight
                .entry((e.company_id, e.event_type.clone()))
                .or_insert(0) += 1;
        }
    }

    fn in_flight(&self) -> InFlight {
        let state = self.state();
        let mut out = InFlight::default();
        for ((company, event_type), n) in &state.in_flight {
            out.company_ids.push(*company);
            out.event_types.push(event_type.clone());
            out.counts.push(*n as i32);
        }
        out
    }

    async fn freed(&self) {
        self.freed.notified().await
    }
}

impl Freed for Room {
    /// Deliveries to these endpoints ended (a group of outcomes was
    /// written): all counted down under one lock, then one wake-up, so the
    /// next claim sees the whole group's room, not the first outcome's.
    fn finished(&self, endpoints: &[(i64, &str)]) {
        let mut state = self.state();
        let mut freed = false;
        for &(company_id, event_type) in endpoints {
            let key = (company_id, event_type.to_owned());
            if let Some(n) = state.in_flight.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    state.in_flight.remove(&key);
                }
            }
            freed |= state.capped.remove(&key);
        }
        drop(state);
        if freed {
            self.freed.notify_one();
        }
    }
}

/// Largest claim, whatever the concurrency: one statement locking thousands
/// of rows would hold its locks (and other instances' SKIP LOCKED scans) for
/// longer than several smaller claims.
const MAX_CLAIM_BATCH: usize = 500;

/// With a backlog (the last claim filled every free slot), the next claim
/// waits, once a first slot is free, up to [`CLAIM_GATHER_WAIT`] for three
/// quarters of the slots to be free, instead of claiming the first one or
/// two. A statement's fixed cost dominates small claims (see
/// `pipeline::completer::RECORD_GATHER_WAIT` for the figures). A slot so waits at most
/// 2 ms per delivery; without a backlog a claim goes out at once, so latency
/// is unchanged.
const CLAIM_GATHER_WAIT: Duration = Duration::from_millis(2);

/// How long the loop keeps looking after a wake-up by NOTIFY or a claim
/// that found events. The enqueue functions notify at most once per 250 ms
/// (migration 0009): an enqueue that did not notify because another had,
/// and that commits within 250 ms of its call, is found by a follow-up
/// look, not the poll. (Test: `follow_up_outlasts_the_enqueues_quiet_window`.)
const FOLLOW_UP_HOLD: Duration = Duration::from_millis(500);

/// Follow-up looks start this soon after a claim that found events, and
/// each one that finds nothing waits twice as long as the one before, up
/// to [`FOLLOW_UP_MAX_GAP`]. At a steady stream of events the loop so
/// claims every few milliseconds (measured at 500 events/s: an event
/// reaches its attempt 2 ms after its commit at the median, 6 ms at the
/// 99th percentile, against 0.5 and 2 ms when every enqueue notified; a
/// first gap of 1 ms was no better, its looks competing for the same two
/// cores). After a lone event it looks about 30 times in the half second
/// that follows (each an index probe that finds nothing), then goes back
/// to waiting for NOTIFY and the poll. An event enqueued meanwhile waits
/// at most 20 ms.
const FOLLOW_UP_FIRST_GAP: Duration = Duration::from_millis(2);
const FOLLOW_UP_MAX_GAP: Duration = Duration::from_millis(20);

/// A follow-up look waits at least this many times as long as the last
/// claim took, so that follow-ups take at most half the claiming
/// connection's time however slow the claim is (a fair claim walking many
/// endpoints: 20-60 ms at 10,000-20,000 of them, issue 26). Four times
/// was measured too: it doubled the tenant scenarios' worst latency (15 to
/// 30 ms), their fair claims taking about 5 ms.
const FOLLOW_UP_COST_FACTOR: u32 = 1;

/// The follow-up looks after a wake-up: see [`FOLLOW_UP_HOLD`].
#[derive(Debug, Clone, Copy, Default)]
struct FollowUp {
    /// Look again until then (None: wait for NOTIFY or the poll).
    until: Option<Instant>,
    /// The wait before the next look.
    gap: Duration,
    /// How long the last claim took.
    claim_cost: Duration,
}

impl FollowUp {
    /// Events arrived (a NOTIFY, or a claim that found some): look again
    /// soon, for a while.
    fn arrived(&mut self, now: Instant) {
        self.until = Some(now + FOLLOW_UP_HOLD);
        self.gap = FOLLOW_UP_FIRST_GAP;
    }

    /// A claim took this long.
    fn claimed(&mut self, took: Duration) {
        self.claim_cost = took;
    }

    /// How long to wait before the next look, if a follow-up is due before
    /// `poll`; each such wait is twice the one before (bounded), and at
    /// least [`FOLLOW_UP_COST_FACTOR`] times the last claim.
    fn next_wait(&mut self, now: Instant, poll: Duration) -> Option<Duration> {
        let until = self.until?;
        if now >= until {
            self.until = None;
            return None;
        }
        let wait = self
            .gap
            .max(self.claim_cost * FOLLOW_UP_COST_FACTOR)
            .min(until - now);
        self.gap = (self.gap * 2).min(FOLLOW_UP_MAX_GAP);
        (wait < poll).then_some(wait)
    }
}

/// Wait after a failed claim before the next, so a database outage does not
/// turn into a tight error loop.
const CLAIM_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// How long a claim in flight when the stop comes may still take: its
/// answer says which rows it leased, so they are delivered within the drain
/// rather than left leased to nobody who knows. A claim takes milliseconds;
/// one that takes longer is dropped, and the hand-back at the end of the
/// stop (`engine`) returns its rows if it committed by then.
pub const CLAIM_STOP_GRACE: Duration = Duration::from_secs(1);

/// The claim loop and what it needs.
pub struct ClaimLoop<'a> {
    /// For the fair claim.
    pub pool: &'a deadpool_postgres::Pool,
    /// For the plain claim, whose plan is made once (`store::pool::claim_pool`).
    pub plain_pool: &'a deadpool_postgres::Pool,
    pub owner: &'a str,
    pub config: &'a Config,
    /// Bound on one claim, connection included (`store::pool::round_trip_limit`).
    pub claim_limit: Duration,
    /// One per delivery in flight.
    pub slots: Arc<Semaphore>,
    pub context: &'a Arc<executor::Context>,
    pub wake: &'a Notify,
    pub room: &'a Room,
    /// Told of each claim's success or failure; says when the recorder can
    /// write nothing at all, and then no more is claimed.
    pub progress: &'a Progress,
    /// Asked to look at the schema when a claim is refused for what the
    /// database has become.
    pub schema: &'a SchemaWatch,
}

impl ClaimLoop<'_> {
    /// Claims and starts deliveries until `shutdown` (false) or the recorder
    /// is gone (true). Every wait is bounded and promised to `heartbeat`
    /// first: a free slot or the poll interval, a claim within its limit,
    /// the pause after a failed one, a wake-up or the poll.
    pub async fn run(
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
        // The last claim failed (and systemd's STATUS= says so).
        let mut failing = false;
        // Claiming is paused because no outcome can be recorded.
        let mut paused = false;
        // Plain until a claim leaves due events behind.
        let mut mode = Mode::Plain;
        let mut follow_up = FollowUp::default();
        let recorder_died = 'serve: loop {
            // Claim until a claim comes back short (nothing more is due) or
            // shutdown; with every slot busy, wait for one to free up.
            loop {
                if shutdown.is_cancelled() {
                    break 'serve false;
                }
                if recorder.is_finished() {
                    // Without a recorder every outcome would be lost and
                    // every event re-sent after its lease, forever: stop
                    // instead, and let the service manager restart the daemon.
                    tracing::error!("the recorder stopped; shutting down");
                    break 'serve true;
                }
                reap(tasks);
                heartbeat.within(poll_interval);
                if self.progress.recording_blocked() {
                    // Every outcome is refused (see completer::SetAside):
                    // what would be claimed now would be sent, its outcome
                    // lost, and sent again after its lease. Wait for a
                    // write to succeed (the recorder tries again every
                    // few seconds).
                    if !std::mem::replace(&mut paused, true) {
                        tracing::error!(
                            "no outcome can be recorded: claiming is paused until one is; \
                             /readyz and outboxd_oldest_unrecorded_outcome_age_seconds show it"
                        );
                        systemd::status("claiming paused: no delivery outcome can be recorded");
                    }
                    pause(shutdown, poll_interval).await;
                    continue;
                }
                if std::mem::take(&mut paused) {
                    tracing::info!("outcomes are recorded again: claiming resumes");
                    systemd::status("delivering");
                }
                let permits = tokio::select! {
                    _ = shutdown.cancelled() => break 'serve false,
                    permits = free_slots(&self.slots, gather) => permits,
                    // Every slot busy (slow receivers): look again. The
                    // loop is busy delivering, which is progress too.
                    _ = tokio::time::sleep(poll_interval) => {
                        self.progress.claimed();
                        continue;
                    }
                };
                let wanted = permits.num_permits();
                heartbeat.within(self.claim_limit);
                // Bounded by its limit; at a stop, by CLAIM_STOP_GRACE. A
                // claim dropped half-way may still commit: the hand-back at
                // the end of the stop, or else its lease, brings the rows
                // back.
                let claim_started = Instant::now();
                let claim = tokio::time::timeout(self.claim_limit, self.claim(mode, wanted));
                tokio::pin!(claim);
                let claimed = tokio::select! {
                    claimed = &mut claim => claimed,
                    _ = shutdown.cancelled() => {
                        match tokio::time::timeout(CLAIM_STOP_GRACE, &mut claim).await {
                            Ok(claimed) => claimed,
                            Err(_) => break 'serve false,
                        }
                    }
                }
                .unwrap_or_else(|_| {
                    Err(ClaimError {
                        message: format!("no answer within {:?}", self.claim_limit),
                        kind: ErrorKind::Transient,
                    })
                });
                follow_up.claimed(claim_started.elapsed());
                let (events, more) = match claimed {
                    Ok((
                        Claim {
                            events,
                            capped,
                            more,
                            held,
                        },
                        before,
                    )) => {
                        self.progress.claimed();
                        if std::mem::take(&mut failing) {
                            systemd::status("delivering");
                        }
                        self.room.claimed(capped, &events, &before);
                        // A plain claim that left events behind says nothing
                        // of the rest of the queue: look again, fairly, now.
                        let again = more || (held && mode == Mode::Plain);
                        let next = if held { Mode::Fair } else { Mode::Plain };
                        if next != mode {
                            tracing::debug!(mode = ?next, "claim mode changed");
                            mode = next;
                        }
                        (events, again)
                    }
                    Err(e) => {
                        telemetry::database_error("claim");
                        tracing::warn!(error = %e, "claim failed");
                        self.progress.claim_failed(&e.message);
                        if e.kind == ErrorKind::Structural {
                            heartbeat.within(self.claim_limit);
                            if self.schema.recheck("claim", &e.message).await {
                                break 'serve false;
                            }
                        }
                        // `systemctl status` shows the outage while it lasts.
                        failing = true;
                        systemd::status(&format!("delivering, but claims fail: {}", e.message));
                        heartbeat.within(CLAIM_ERROR_BACKOFF);
                        pause(shutdown, CLAIM_ERROR_BACKOFF).await;
                        gather = 1;
                        break;
                    }
                };
                let got = events.len();
                if got > 0 {
                    tracing::debug!(claimed = got, wanted, "claimed due events");
                    follow_up.arrived(Instant::now());
                }
                telemetry::claimed(got, events.iter().filter(|e| e.lease_expired).count());
                for probe in events.iter().filter(|e| e.probe) {
                    ::metrics::counter!(telemetry::CIRCUIT_PROBES).increment(1);
                    tracing::info!(
                        company_id = probe.company_id,
                        event_type = %probe.event_type,
                        event_id = %probe.id,
                        "probing an endpoint whose circuit is open"
                    );
                }
                let mut permits = permits;
                for event in events {
                    let permit = permits.split(1).expect("one permit per claimed event");
                    tasks.spawn(executor::deliver(event, self.context.clone(), permit));
                }
                drop(permits);
                if got < wanted && !more {
                    gather = 1;
                    break;
                }
                gather = gather_when_busy;
            }

            let poll = jittered(poll_interval);
            let (wait, source) = match follow_up.next_wait(Instant::now(), poll) {
                Some(soon) => (soon, "follow_up"),
                None => (poll, "poll"),
            };
            heartbeat.within(wait);
            tokio::select! {
                _ = shutdown.cancelled() => break 'serve false,
                _ = self.wake.notified() => {
                    telemetry::wakeup("notify");
                    follow_up.arrived(Instant::now());
                }
                _ = self.room.freed() => telemetry::wakeup("room"),
                _ = tokio::time::sleep(wait) => telemetry::wakeup(source),
            }
        };
        heartbeat.retire();
        recorder_died
    }

    async fn claim(&self, mode: Mode, wanted: usize) -> Result<(Claim, InFlight), ClaimError> {
        let pool = match mode {
            Mode::Plain => self.plain_pool,
            Mode::Fair => self.pool,
        };
        let client = db::Checkout::get(pool, "claim")
            .await
            .map_err(|e| ClaimError {
                message: format!("no database connection: {}", db::describe_pool(&e)),
                kind: ErrorKind::Transient,
            })?;
        let delivery = &self.config.delivery;
        let in_flight = self.room.in_flight();
        let claimed = claim(
            &client,
            mode,
            wanted,
            self.owner,
            delivery.lease,
            delivery.endpoint_concurrency,
            &in_flight,
        )
        .await
        .map(|claim| (claim, in_flight));
        client.done();
        claimed
    }
}

/// Collects finished delivery tasks. A panic there is a bug; the event's
/// lease brings it back, so the daemon logs it and goes on.
pub fn reap(tasks: &mut JoinSet<()>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::sleep;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// The waits of the follow-up looks after one arrival, none finding
    /// anything, until they end.
    fn follow_up_waits(poll: Duration) -> Vec<Duration> {
        let start = Instant::now();
        let mut now = start;
        let mut follow_up = FollowUp::default();
        follow_up.arrived(now);
        let mut waits = Vec::new();
        while let Some(wait) = follow_up.next_wait(now, poll) {
            waits.push(wait);
            now += wait;
        }
        waits
    }

    #[test]
    fn follow_up_looks_start_soon_back_off_and_end() {
        let waits = follow_up_waits(MS(1000));
        assert_eq!(waits[..5], [MS(2), MS(4), MS(8), MS(16), MS(20)]);
        assert!(waits[5..].iter().all(|w| *w <= MS(20)), "{waits:?}");
        let total: Duration = waits.iter().sum();
        assert_eq!(total, FOLLOW_UP_HOLD);
        // About 30 statements after a lone event, not hundreds.
        assert!((20..=30).contains(&waits.len()), "{} looks", waits.len());
    }

    #[test]
    fn follow_up_outlasts_the_enqueues_quiet_window() {
        // Migration 0009 notifies at most once per this long; an event
        // committed within it must meet a follow-up look, with room for the
        // rest of its transaction.
        let sql = crate::store::migrations::MIGRATIONS
            .iter()
            .find(|m| m.version == 9)
            .expect("migration 0009")
            .sql;
        let quiet_ms: u64 = sql
            .split("now_ms + ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|n| n.trim().parse().ok())
            .expect("the quiet window in 0009");
        assert!(FOLLOW_UP_HOLD >= MS(quiet_ms) * 2, "{quiet_ms} ms");
    }

    #[test]
    fn no_follow_up_without_an_arrival_nor_one_later_than_the_poll() {
        let mut idle = FollowUp::default();
        assert_eq!(idle.next_wait(Instant::now(), MS(1000)), None);
        // A poll shorter than the first gap: the poll comes first.
        assert_eq!(follow_up_waits(MS(1)), []);
    }

    #[test]
    fn a_slow_claim_spaces_the_follow_up_looks() {
        let mut now = Instant::now();
        let mut follow_up = FollowUp::default();
        follow_up.arrived(now);
        follow_up.claimed(MS(60));
        let mut waits = Vec::new();
        while let Some(wait) = follow_up.next_wait(now, MS(1000)) {
            waits.push(wait);
            now += wait;
        }
        assert_eq!(waits[..8], [MS(60); 8]);
        assert_eq!(waits.len(), 9, "{waits:?}");
    }

    #[test]
    fn events_found_bring_the_follow_up_back_to_its_first_gap() {
        let mut now = Instant::now();
        let mut follow_up = FollowUp::default();
        follow_up.arrived(now);
        for _ in 0..4 {
            now += follow_up.next_wait(now, MS(1000)).unwrap();
        }
        follow_up.arrived(now);
        assert_eq!(follow_up.next_wait(now, MS(1000)), Some(MS(2)));
    }

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
