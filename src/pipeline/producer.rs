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
//! The claim takes the oldest due rows and steps over the endpoints it
//! learnt are held or at their cap ([`Steps`]); while there are too many of
//! those to step over, the fair claim takes endpoints in turn from where
//! the last one stopped (the loop keeps that cursor). Each endpoint is kept
//! under its cap; an endpoint left at its cap is remembered in [`Room`],
//! and the recorder wakes the loop when one of that endpoint's deliveries
//! has been marked.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::model::{ClaimedEvent, EndpointKey};
use crate::pipeline::completer::Freed;
use crate::pipeline::executor;
use crate::pipeline::schema_watch::SchemaWatch;
use crate::progress::Progress;
use crate::service::Heartbeat;
use crate::store::claim::{
    Caps, Claim, ClaimError, Cursor, InFlight, Mode, STEP_FULL_ROWS, STEP_HELD_ROWS, Skip, Step,
    claim, count_steps, hand_back_unknown,
};
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
///
/// It also knows which leases this instance holds knowingly: every event
/// claimed, by id and attempt, until its outcome is written. After a claim
/// whose result is unknown, the leases of this instance that are not among
/// them are handed back ([`ClaimLoop`]).
#[derive(Debug, Default)]
pub struct Room {
    state: Mutex<RoomState>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct RoomState {
    in_flight: HashMap<EndpointKey, u32>,
    capped: HashSet<EndpointKey>,
    /// Requests in flight per destination, and how quickly it answers.
    destinations: HashMap<String, Destination>,
    /// Destinations the last claims left at their cap with more due.
    capped_destinations: HashSet<String>,
    /// Claimed events whose outcome is not written yet: id → (attempt,
    /// when claimed).
    known: HashMap<Uuid, (i32, Instant)>,
    /// When `known` was last cleared of entries older than the lease.
    pruned_at: Option<Instant>,
}

impl Room {
    fn state(&self) -> std::sync::MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the last claim found at its cap, and what it started. `before`
    /// is what was in flight when the claim was made: an endpoint one of
    /// whose deliveries ended while the claim ran has room again, so it is
    /// not marked capped and the loop is woken to claim for it (the
    /// delivery found it not marked and woke nobody); nor is one with
    /// nothing in flight, whose room no delivery would ever bring back.
    /// The plain claim adds to the endpoints known capped (it stepped over
    /// those, and says nothing of them); the fair claim, which reads every
    /// endpoint it passes, replaces them (`replace`).
    /// Destinations likewise, their room coming back when a request to them
    /// ends.
    fn claimed(
        &self,
        capped: HashSet<EndpointKey>,
        capped_destinations: HashSet<String>,
        replace: bool,
        events: &[ClaimedEvent],
        before: &InFlight,
    ) {
        let mut state = self.state();
        let now = Instant::now();
        for e in events {
            *state
                .in_flight
                .entry((e.company_id, e.event_type.clone()))
                .or_insert(0) += 1;
            state.known.insert(e.id, (e.attempt, now));
            if let Some(destination) = &e.destination {
                state
                    .destinations
                    .entry(destination.clone())
                    .or_insert_with(|| Destination::new(now))
                    .started(e.id, now);
            }
        }
        // (Destinations are not replaced: a fair claim's walk may stop
        // before a capped destination's endpoints and say nothing of it.
        // One is marked only with requests in flight, and the end of any
        // of them unmarks it.)
        if replace {
            state.capped.clear();
        }
        let mut room_back = false;
        for destination in capped_destinations {
            let started = events
                .iter()
                .filter(|e| e.destination.as_deref() == Some(destination.as_str()))
                .count() as u32;
            let now_in_flight = state
                .destinations
                .get(&destination)
                .map_or(0, Destination::count);
            if now_in_flight == 0
                || now_in_flight < before.destination_count(&destination) + started
            {
                room_back = true;
            } else {
                state.capped_destinations.insert(destination);
            }
        }
        for key in capped {
            let started = events
                .iter()
                .filter(|e| e.company_id == key.0 && e.event_type == key.1)
                .count() as u32;
            let now_in_flight = state.in_flight.get(&key).copied().unwrap_or(0);
            if now_in_flight == 0 || now_in_flight < before.count(&key) + started {
                room_back = true;
            } else {
                state.capped.insert(key);
            }
        }
        if room_back {
            self.freed.notify_one();
        }
    }

    /// The leases this instance knows it holds: (event id, attempt).
    fn known(&self) -> Vec<(Uuid, i32)> {
        let state = self.state();
        state
            .known
            .iter()
            .map(|(id, (attempt, _))| (*id, *attempt))
            .collect()
    }

    /// Forgets, at most every quarter of `lease`, the events claimed more
    /// than `lease` ago that have no outcome written: one the database
    /// refused even without its texts, or a delivery task that panicked.
    /// Their leases run out by then, and the lease expiry puts them back.
    fn forget_stale(&self, lease: Duration) {
        let mut state = self.state();
        let now = Instant::now();
        if state.pruned_at.is_some_and(|at| now - at < lease / 4) {
            return;
        }
        state.pruned_at = Some(now);
        state.known.retain(|_, (_, at)| now - *at < lease);
        // Destinations nothing went to for a while: a new request to one
        // starts it anew, held to the cap until it has answered quickly.
        state
            .destinations
            .retain(|_, d| !d.in_flight.is_empty() || now - d.progress < DESTINATION_FORGOTTEN);
    }

    /// The endpoints at their cap on this instance with more due.
    fn capped(&self) -> HashSet<EndpointKey> {
        self.state().capped.clone()
    }

    /// The destinations at their cap on this instance with more due.
    fn capped_destinations(&self) -> HashSet<String> {
        self.state().capped_destinations.clone()
    }

    /// What is in flight, for the claim: per endpoint, and each known
    /// destination's room, `cap` less what is in flight to it, or no limit
    /// while it answers quickly ([`Destination::quick`]).
    fn in_flight_at(&self, cap: u32, now: Instant) -> InFlight {
        let state = self.state();
        let mut out = InFlight::default();
        for ((company, event_type), n) in &state.in_flight {
            out.company_ids.push(*company);
            out.event_types.push(event_type.clone());
            out.counts.push(*n as i32);
        }
        for (destination, d) in &state.destinations {
            out.destinations.push(destination.clone());
            out.destination_rooms.push(if d.quick(now) {
                i32::MAX
            } else {
                cap.saturating_sub(d.count()) as i32
            });
            out.destination_counts.push(d.count());
        }
        out
    }

    #[cfg(test)]
    fn in_flight(&self) -> InFlight {
        self.in_flight_at(u32::MAX, Instant::now())
    }

    async fn freed(&self) {
        self.freed.notified().await
    }
}

impl Freed for Room {
    /// The request of event `id` to `destination` ended after `took`: its
    /// place there is free at once (a destination has no circuit nor
    /// Retry-After of its own for the next claim to see first).
    fn request_ended(&self, destination: &str, id: Uuid, took: Duration, sent: bool) {
        let mut state = self.state();
        let now = Instant::now();
        if let Some(d) = state.destinations.get_mut(destination) {
            d.ended(id, took, sent, now);
        }
        let freed = state.capped_destinations.remove(destination);
        drop(state);
        if freed {
            self.freed.notify_one();
        }
    }

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

    /// These outcomes were written (marked, or refused by the fence): their
    /// leases are no longer this instance's to keep.
    fn recorded(&self, outcomes: &[(Uuid, i32)]) {
        let mut state = self.state();
        for (id, attempt) in outcomes {
            if state.known.get(id).is_some_and(|(a, _)| a == attempt) {
                state.known.remove(id);
            }
        }
    }
}

/// A request that ends within this long is a quick answer: a destination
/// whose requests all end so, holding a delivery slot for no longer than
/// this each, is not held to `delivery.destination_concurrency`
/// ([`Destination::quick`]).
const DESTINATION_QUICK: Duration = Duration::from_millis(250);

/// How many quick answers in a row, the last ones, make a destination
/// quick: a new destination, or one that answered slowly, is held to the
/// cap until then.
const DESTINATION_QUICK_STREAK: u32 = 4;

/// A destination with nothing in flight and no request ended for this
/// long is forgotten (`Room::forget_stale`).
const DESTINATION_FORGOTTEN: Duration = Duration::from_secs(600);

/// One destination, as this instance sees it: its requests in flight, and
/// how quickly it has answered.
///
/// Why the cap spares a quick destination: the cap exists so that a slow
/// or hung destination that many companies share cannot hold every slot
/// of the instance for seconds at a time. A destination that answers
/// within [`DESTINATION_QUICK`] gives each slot back that quickly, so the
/// others wait no longer than the queue's order makes them; held to half
/// the slots, a backlog for it drained at 0.6 of the rate (the claims,
/// made for fewer slots at a time, lease smaller batches: docs/design/
/// destination-cap). A quick destination that stops answering is held to
/// the cap as soon as a request to it has gone [`DESTINATION_QUICK`]
/// without one ending.
#[derive(Debug, Clone)]
struct Destination {
    /// Its requests in flight: event id, and when claimed.
    in_flight: Vec<(Uuid, Instant)>,
    /// Quick answers in a row, the last ones (requests not sent do not
    /// count, either way).
    quick_streak: u32,
    /// When a request to it last started or ended.
    progress: Instant,
}

impl Destination {
    fn new(now: Instant) -> Destination {
        Destination {
            in_flight: Vec::new(),
            quick_streak: 0,
            progress: now,
        }
    }

    fn count(&self) -> u32 {
        self.in_flight.len() as u32
    }

    fn started(&mut self, id: Uuid, now: Instant) {
        self.in_flight.push((id, now));
        self.progress = now;
    }

    /// The request of event `id` ended after `took`; `sent`: it went out
    /// (an answer, or a failure in transport), rather than being refused
    /// before sending (a disabled endpoint, the address guard, a broken
    /// payload), which says nothing of how the destination answers.
    fn ended(&mut self, id: Uuid, took: Duration, sent: bool, now: Instant) {
        if let Some(at) = self.in_flight.iter().position(|(i, _)| *i == id) {
            self.in_flight.swap_remove(at);
        }
        self.progress = now;
        if sent {
            self.quick_streak = if took <= DESTINATION_QUICK {
                self.quick_streak.saturating_add(1)
            } else {
                0
            };
        }
    }

    /// Its last [`DESTINATION_QUICK_STREAK`] answers were quick, and none
    /// of its requests in flight has gone [`DESTINATION_QUICK`] unanswered.
    fn quick(&self, now: Instant) -> bool {
        self.quick_streak >= DESTINATION_QUICK_STREAK
            && self
                .in_flight
                .iter()
                .all(|(_, at)| now - *at <= DESTINATION_QUICK)
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
/// connection's time however slow the claim is (a claim that walks up to
/// 1,000 held endpoints before it finds one able to send: a few ms; before
/// issue 26, 20-60 ms at 10,000-20,000 endpoints). Four times
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

/// How long the claim loop keeps to the fair claim once the plain claim
/// met more held rows than it steps over cheaply ([`Steps`]); then a plain
/// claim looks again. A plain claim a second costs little however the
/// queue stands. (A circuit ready for its probe costs one fair claim, its
/// walk starting at that endpoint: only the fair claim sends probes.)
const FAIR_SPELL: Duration = Duration::from_secs(1);

/// How long the plain claim steps over the held endpoints it learnt of
/// before it forgets them all and reads their rows once more: a circuit
/// that closed, an endpoint resumed, or a circuit whose cool-down ended is
/// seen within this long.
const STEP_SPELL: Duration = Duration::from_secs(1);

/// Most endpoints the plain claim steps over; more (a mass outage) are
/// left to the fair claim, whose walk passes a held endpoint in one step.
const STEP_ENDPOINTS_LIMIT: usize = 32;

/// The endpoints the plain claim steps over: each one whose rows a plain
/// claim locked and left (held, or at its cap on this instance), with its
/// due rows. Stepping over a row costs the claim's walk about 0.22 us,
/// where the fair claim costs about 0.8 ms more than the plain one per
/// claim of 48 and leases smaller batches (docs/BENCHMARKS.md, "Issue 26,
/// point 1 (end)"), so up to [`STEP_HELD_ROWS`] rows of held endpoints and
/// [`STEP_FULL_ROWS`] of endpoints at their cap, of up to
/// [`STEP_ENDPOINTS_LIMIT`] endpoints, are stepped over; past that the
/// fair claim is the cheaper one, and the loop takes it for [`FAIR_SPELL`].
///
/// Those at their cap are stepped over only while [`Room`] has them capped
/// (it forgets one as soon as a delivery to it ends), those at their
/// destination's cap while it has that destination capped. All are
/// forgotten [`STEP_SPELL`] after the first was learnt.
#[derive(Debug, Default)]
struct Steps {
    /// Due rows (as last counted) and why stepped over, per endpoint.
    due: HashMap<EndpointKey, Stepped>,
    until: Option<Instant>,
    /// When the last [`Steps::learn`] found too much to step over and all
    /// of it was at destinations' caps: those destinations.
    spell_destinations: Option<HashSet<String>>,
}

#[derive(Debug, Clone)]
struct Stepped {
    due: u32,
    held: bool,
    /// At its destination's cap, not its own.
    destination: Option<String>,
}

impl Stepped {
    /// Still to be stepped over: held, or what made it full still is.
    fn holds(
        &self,
        key: &EndpointKey,
        capped: &HashSet<EndpointKey>,
        capped_destinations: &HashSet<String>,
    ) -> bool {
        self.held
            || match &self.destination {
                None => capped.contains(key),
                Some(destination) => capped_destinations.contains(destination),
            }
    }
}

impl Steps {
    /// The endpoints to step over at `now`: the held ones, and those at
    /// their cap that are still `capped`. An endpoint capped but not
    /// learnt here (the fair claim found it, or its rows were too many to
    /// step over) is read, not stepped over: its rows are counted first.
    fn skip(
        &mut self,
        now: Instant,
        capped: &HashSet<EndpointKey>,
        capped_destinations: &HashSet<String>,
    ) -> Vec<EndpointKey> {
        if self.until.is_some_and(|until| now >= until) {
            self.forget();
        }
        self.due
            .iter()
            .filter(|(key, stepped)| stepped.holds(key, capped, capped_destinations))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Takes what a plain claim locked and left; `capped`: the endpoints
    /// at their cap now (those that are no longer are not stepped over).
    /// True: the next plain claims step over all of it; false: there is too
    /// much to step over, everything is forgotten, and the fair claim is
    /// the cheaper one.
    fn learn(
        &mut self,
        steps: &[Step],
        capped: &HashSet<EndpointKey>,
        capped_destinations: &HashSet<String>,
        now: Instant,
    ) -> bool {
        if self.due.is_empty() {
            self.until = Some(now + STEP_SPELL);
        }
        for step in steps {
            self.due.insert(
                step.key.clone(),
                Stepped {
                    due: step.due,
                    held: step.held,
                    destination: step.destination.clone(),
                },
            );
        }
        self.due
            .retain(|key, stepped| stepped.holds(key, capped, capped_destinations));
        let rows = |held: bool| -> u64 {
            self.due
                .values()
                .filter(|s| s.held == held)
                .map(|s| u64::from(s.due))
                .sum()
        };
        if self.due.len() > STEP_ENDPOINTS_LIMIT
            || rows(true) > STEP_HELD_ROWS as u64
            || rows(false) > STEP_FULL_ROWS as u64
        {
            self.spell_destinations = self
                .due
                .values()
                .map(|s| s.destination.clone().filter(|_| !s.held))
                .collect();
            self.forget();
            return false;
        }
        true
    }

    /// The destinations whose caps alone made the last [`Steps::learn`]
    /// give up (None: not only those).
    fn spell_destinations(&mut self) -> Option<HashSet<String>> {
        self.spell_destinations.take()
    }

    fn forget(&mut self) {
        self.due.clear();
        self.until = None;
    }
}

/// How many fair claims in a row may walk on at once after their walk
/// stopped at its bound of 1,000 endpoints without filling the batch, before
/// the loop waits for a wake-up or the poll: an endpoint able to send behind
/// thousands of held ones (a mass outage) is reached within one wake-up
/// for up to 20,000 of them, at most 20 claims of about 10 ms each, as
/// much as the fair claim walked in one statement before issue 26.
const FAR_WALKS_PER_WAKE: u32 = 20;

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
        // The fair claim until then, once the plain claim met more held
        // rows than it steps over cheaply; the plain claim otherwise,
        // stepping over the endpoints it learnt were held or full.
        let mut fair_until = Instant::now();
        // The spell's reason, when it was rows left at these destinations'
        // caps alone: it ends as soon as none of them is capped any more
        // (a request to it ended, or it answers quickly now). A new
        // destination is held to its cap until its first quick answers,
        // a few milliseconds into a drain: without this, that cost the
        // drain a second of fair claims.
        let mut spell_for: Option<HashSet<String>> = None;
        let mut steps = Steps::default();
        // The next claim is the fair one, once, for a probe, from this
        // cursor (the round robin's own is left as it is).
        let mut probe_at: Option<Cursor> = None;
        // Where the next fair claim goes on walking the endpoints, and how
        // many walks stopped at their bound since the loop last waited.
        let mut cursor = Cursor::default();
        let mut far_walks = 0;
        let mut follow_up = FollowUp::default();
        // A claim's result is not known (it may have committed): hand back
        // the leases this instance does not know of before the next claim.
        let mut unknown_leases = false;
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
                if unknown_leases {
                    heartbeat.within(self.claim_limit);
                    let handed = tokio::select! {
                        _ = shutdown.cancelled() => break 'serve false,
                        handed = tokio::time::timeout(self.claim_limit, self.hand_back_unknown()) => handed,
                    }
                    .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.claim_limit)));
                    match handed {
                        Ok(n) => {
                            unknown_leases = false;
                            telemetry::handed_back("unknown", n);
                            if n > 0 {
                                tracing::info!(
                                    handed_back = n,
                                    "events leased to this instance but unknown to it (a claim whose reply was lost) are back in the queue, due at once"
                                );
                            }
                        }
                        Err(e) => {
                            telemetry::database_error("claim");
                            tracing::warn!(error = %e, "could not hand back the leases of a claim whose reply was lost; trying again before the next claim");
                            heartbeat.within(CLAIM_ERROR_BACKOFF);
                            pause(shutdown, CLAIM_ERROR_BACKOFF).await;
                            continue;
                        }
                    }
                }
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
                let now = Instant::now();
                let after = cursor.clone();
                let skip;
                let probing = probe_at.take();
                if now < fair_until
                    && spell_for
                        .as_ref()
                        .is_some_and(|d| d.is_disjoint(&self.room.capped_destinations()))
                {
                    tracing::debug!("claim mode: plain again, its destinations have room");
                    fair_until = now;
                }
                let mode = if let Some(at) = &probing {
                    Mode::Fair(at)
                } else if now < fair_until {
                    Mode::Fair(&after)
                } else {
                    skip = Skip::of(&steps.skip(
                        now,
                        &self.room.capped(),
                        &self.room.capped_destinations(),
                    ));
                    Mode::Plain(&skip)
                };
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
                    Err(ClaimFailed {
                        error: ClaimError {
                            message: format!("no answer within {:?}", self.claim_limit),
                            kind: ErrorKind::Transient,
                        },
                        maybe_leased: true,
                    })
                });
                follow_up.claimed(claim_started.elapsed());
                let (events, more) = match claimed {
                    Ok((
                        Claim {
                            events,
                            capped,
                            capped_destinations,
                            steps: left,
                            more,
                            probe,
                            far,
                            cursor: next,
                        },
                        before,
                    )) => {
                        self.progress.claimed();
                        if std::mem::take(&mut failing) {
                            systemd::status("delivering");
                        }
                        self.room.claimed(
                            capped,
                            capped_destinations,
                            !mode.is_plain(),
                            &events,
                            &before,
                        );
                        telemetry::destinations_at_cap(self.room.capped_destinations().len());
                        self.room.forget_stale(self.config.delivery.lease);
                        // (A probe's claim leaves the round robin where it was.)
                        if let Some(next) = next.filter(|_| probing.is_none()) {
                            cursor = next;
                        }
                        // More held rows lie at the head of the queue
                        // than are cheap to step over: the fair claim for a
                        // while, from now. Fewer: the plain claim steps
                        // over them, at once. A circuit waits for its
                        // probe: the fair claim once, from that endpoint.
                        let spell = !left.is_empty()
                            && !steps.learn(
                                &left,
                                &self.room.capped(),
                                &self.room.capped_destinations(),
                                now,
                            );
                        // (Only the plain claim leaves steps or a probe.)
                        if let Some(at) = probe {
                            tracing::debug!(
                                after_company_id = at.company_id,
                                "claim mode: fair once, for a probe"
                            );
                            probe_at = Some(at);
                        }
                        let again = if spell {
                            tracing::debug!("claim mode: fair for a while");
                            spell_for = steps.spell_destinations();
                            steps.forget();
                            fair_until = Instant::now() + FAIR_SPELL;
                            true
                        } else if !left.is_empty() || probe_at.is_some() {
                            true
                        } else if far && far_walks < FAR_WALKS_PER_WAKE {
                            far_walks += 1;
                            true
                        } else {
                            more
                        };
                        (events, again)
                    }
                    Err(ClaimFailed {
                        error: ClaimError { message: e, kind },
                        maybe_leased,
                    }) => {
                        // Its rows, if it committed, are not delivered: they
                        // are handed back before the next claim.
                        unknown_leases |= maybe_leased;
                        telemetry::database_error("claim");
                        tracing::warn!(error = %e, "claim failed");
                        self.progress.claim_failed(&e);
                        if kind == ErrorKind::Structural {
                            heartbeat.within(self.claim_limit);
                            if self.schema.recheck("claim", &e).await {
                                break 'serve false;
                            }
                        }
                        // `systemctl status` shows the outage while it lasts.
                        failing = true;
                        systemd::status(&format!("delivering, but claims fail: {e}"));
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

            far_walks = 0;
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

    async fn claim(&self, mode: Mode<'_>, wanted: usize) -> Result<(Claim, InFlight), ClaimFailed> {
        let (pool, statement) = match mode {
            Mode::Plain(_) => (self.plain_pool, "plain"),
            Mode::Fair(_) => (self.pool, "fair"),
        };
        telemetry::claim_made(statement);
        let client = db::Checkout::get(pool, "claim")
            .await
            .map_err(|e| ClaimFailed {
                error: ClaimError {
                    message: format!("no database connection: {}", db::describe_pool(&e)),
                    kind: ErrorKind::Transient,
                },
                maybe_leased: false,
            })?;
        let delivery = &self.config.delivery;
        let caps = Caps::of(delivery);
        let in_flight = self.room.in_flight_at(caps.destination, Instant::now());
        let claimed = claim(
            &client,
            mode,
            wanted,
            self.owner,
            delivery.lease,
            caps,
            &in_flight,
        )
        .await
        .map(|claim| (claim, in_flight))
        .map_err(|error| ClaimFailed {
            error,
            maybe_leased: true,
        });
        client.done();
        let mut claimed = claimed?;
        if !claimed.0.steps.is_empty() {
            self.count_steps(&mut claimed.0.steps).await;
        }
        Ok(claimed)
    }

    /// Counts what the plain claim left (`store::claim::count_steps`). A
    /// count that fails (the claim's rows are leased all the same) counts
    /// each as too many to step over: the fair claim for a while.
    async fn count_steps(&self, steps: &mut [Step]) {
        let counted = match db::Checkout::get(self.pool, "claim").await {
            Ok(client) => {
                let counted = count_steps(&client, steps)
                    .await
                    .map_err(|e| db::describe(&e));
                client.done();
                counted
            }
            Err(e) => Err(db::describe_pool(&e).to_string()),
        };
        if let Err(e) = counted {
            tracing::debug!(error = %e, "could not count the rows the claim stepped over; the fair claim for a while");
            for step in steps {
                step.due = STEP_HELD_ROWS as u32 + 1;
            }
        }
    }

    /// Hands back the leases of this instance that it does not know of
    /// (`store::claim::hand_back_unknown`); how many.
    async fn hand_back_unknown(&self) -> Result<i64, String> {
        let client = db::Checkout::get(self.pool, "claim")
            .await
            .map_err(|e| format!("no database connection: {}", db::describe_pool(&e)))?;
        let known = self.room.known();
        let handed = hand_back_unknown(&client, self.owner, &known)
            .await
            .map_err(|e| db::describe(&e));
        client.done();
        handed
    }
}

/// A claim that did not come back with its rows.
struct ClaimFailed {
    error: ClaimError,
    /// The claim was sent and may have committed (an error, no answer in
    /// time, the connection lost): leases this instance does not know of
    /// may exist. False when no connection could be had.
    maybe_leased: bool,
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

    fn step(company: i64, held: bool, due: u32) -> Step {
        Step {
            key: (company, "payment.cancellation".into()),
            held,
            due,
            destination: None,
        }
    }

    /// What the plain claim steps over, claim after claim: each row is
    /// the steps one claim left, whether the loop steps over them all
    /// (else the fair claim), and the held companies stepped over next.
    #[test]
    fn steps_are_taken_while_cheap_and_forgotten_after_their_spell() {
        let full = |company| step(company, false, 8);
        // (what, the steps a claim left, the companies capped now, stepped
        // over, the held companies stepped over next)
        type Case<'a> = (&'a str, Vec<Step>, &'a [i64], bool, Vec<i64>);
        let cases: &[Case] = &[
            (
                "one paused company",
                vec![step(1, true, 100)],
                &[],
                true,
                vec![1],
            ),
            ("a full one besides", vec![full(2)], &[2], true, vec![1]),
            (
                "another paused one, counted again",
                vec![step(1, true, 150), step(3, true, 40)],
                &[2],
                true,
                vec![1, 3],
            ),
            (
                "a full one with many rows, while capped",
                vec![step(5, false, 700)],
                &[2, 5],
                true,
                vec![1, 3],
            ),
            (
                "its room back, it no longer counts",
                vec![step(6, true, 300), step(7, false, 400)],
                &[2, 7],
                true,
                vec![1, 3, 6],
            ),
            (
                "held rows past their bound",
                vec![step(4, true, 4600)],
                &[2, 7],
                false,
                vec![],
            ),
            (
                "after the fair spell, one again",
                vec![step(4, true, 4600)],
                &[],
                true,
                vec![4],
            ),
            (
                "rows of full ones past theirs",
                vec![step(8, false, 1001)],
                &[8],
                false,
                vec![],
            ),
        ];
        let capped_of = |companies: &[i64]| -> HashSet<EndpointKey> {
            companies
                .iter()
                .map(|c| (*c, "payment.cancellation".to_owned()))
                .collect()
        };
        let mut steps = Steps::default();
        let now = Instant::now();
        for (what, left, capped, stepped, held) in cases {
            assert_eq!(
                steps.learn(left, &capped_of(capped), &HashSet::new(), now),
                *stepped,
                "{what}"
            );
            let mut got: Vec<i64> = steps
                .skip(now, &HashSet::new(), &HashSet::new())
                .iter()
                .map(|k| k.0)
                .collect();
            got.sort();
            assert_eq!(got, *held, "{what}");
            // Those at their cap too, while capped.
            let mut all: Vec<i64> = steps
                .skip(now, &capped_of(capped), &HashSet::new())
                .iter()
                .map(|k| k.0)
                .collect();
            all.sort();
            let mut want: Vec<i64> = held
                .iter()
                .chain(capped.iter().filter(|c| {
                    steps
                        .due
                        .contains_key(&(**c, "payment.cancellation".to_owned()))
                }))
                .copied()
                .collect();
            want.sort();
            want.dedup();
            assert_eq!(all, want, "{what}");
        }

        // More endpoints than the bound: the fair claim.
        let many: Vec<Step> = (0..=STEP_ENDPOINTS_LIMIT as i64)
            .map(|c| step(100 + c, true, 1))
            .collect();
        let none = HashSet::new();
        let mut steps = Steps::default();
        assert!(steps.learn(&many[..STEP_ENDPOINTS_LIMIT], &none, &HashSet::new(), now));
        assert!(!steps.learn(&many[STEP_ENDPOINTS_LIMIT..], &none, &HashSet::new(), now));

        // Forgotten together, a spell after the first was learnt.
        let mut steps = Steps::default();
        assert!(steps.learn(&[step(1, true, 1)], &none, &HashSet::new(), now));
        assert!(steps.learn(
            &[step(2, true, 1)],
            &none,
            &HashSet::new(),
            now + STEP_SPELL / 2
        ));
        assert_eq!(
            steps
                .skip(now + STEP_SPELL - MS(1), &none, &HashSet::new())
                .len(),
            2
        );
        assert!(
            steps
                .skip(now + STEP_SPELL, &none, &HashSet::new())
                .is_empty()
        );
        assert!(steps.learn(
            &[step(3, true, 1)],
            &none,
            &HashSet::new(),
            now + STEP_SPELL
        ));
        assert_eq!(
            steps
                .skip(now + STEP_SPELL * 2 - MS(1), &none, &HashSet::new())
                .len(),
            1
        );

        // Capped, but not learnt here: not stepped over.
        let found_by_the_fair_claim: HashSet<EndpointKey> =
            [(9, "payment.cancellation".to_owned())].into();
        assert_eq!(
            Steps::default().skip(now, &found_by_the_fair_claim, &HashSet::new()),
            Vec::<EndpointKey>::new()
        );
    }

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

    fn claimed_event(id: u128, attempt: i32) -> ClaimedEvent {
        ClaimedEvent {
            id: Uuid::from_u128(id),
            event_type: "payment.cancellation".into(),
            company_id: 1,
            payload: "{}".into(),
            attempt,
            budget_attempt: attempt,
            age: Duration::ZERO,
            lease_expired: false,
            probe: false,
            due_at: None,
            circuit_dirty: false,
            destination: None,
            endpoint: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_room_knows_its_leases_until_their_outcomes_are_written() {
        let room = Room::default();
        let before = room.in_flight();
        let events = [claimed_event(1, 1), claimed_event(2, 3)];
        room.claimed(HashSet::new(), HashSet::new(), true, &events, &before);
        let mut known = room.known();
        known.sort();
        assert_eq!(known, [(Uuid::from_u128(1), 1), (Uuid::from_u128(2), 3)]);
        // An outcome of another attempt of the same event does not end this
        // lease; its own does.
        room.recorded(&[(Uuid::from_u128(2), 2), (Uuid::from_u128(1), 1)]);
        assert_eq!(room.known(), [(Uuid::from_u128(2), 3)]);
        // One never written is forgotten once its lease is over.
        let lease = Duration::from_secs(60);
        room.forget_stale(lease);
        assert_eq!(room.known().len(), 1);
        sleep(lease).await;
        room.forget_stale(lease);
        assert!(room.known().is_empty());
    }

    /// Which endpoints a claim's `capped` notes leave marked capped: one
    /// with its deliveries still going, yes; one of whose deliveries ended
    /// while the claim ran, or with nothing in flight, no (room is back,
    /// or no delivery would bring it back), and the loop is woken. The
    /// plain claim adds to what is marked; the fair claim replaces it.
    #[tokio::test(start_paused = true)]
    async fn a_claim_marks_capped_only_endpoints_whose_room_a_delivery_will_bring_back() {
        let key = |company: i64| (company, "payment.cancellation".to_owned());
        let event = |id: u128, company: i64| ClaimedEvent {
            company_id: company,
            ..claimed_event(id, 1)
        };
        let room = Room::default();
        // Company 1 gets two deliveries in flight and is at its cap.
        let before = room.in_flight();
        room.claimed(
            [key(1)].into(),
            HashSet::new(),
            false,
            &[event(1, 1), event(2, 1)],
            &before,
        );
        assert_eq!(room.capped(), [key(1)].into());

        // Company 2: one in flight; a claim made then finds it at its cap,
        // but that delivery ends while the claim runs.
        room.claimed(
            HashSet::new(),
            HashSet::new(),
            false,
            &[event(3, 2)],
            &room.in_flight(),
        );
        let before = room.in_flight();
        room.finished(&[(2, "payment.cancellation")]);
        room.claimed([key(2), key(3)].into(), HashSet::new(), false, &[], &before);
        // Not marked: company 2's room is back, company 3 has nothing in
        // flight; company 1, from the claim before, is still marked.
        assert_eq!(room.capped(), [key(1)].into());
        tokio::time::timeout(Duration::from_millis(1), room.freed())
            .await
            .expect("the loop is woken to claim for the room that came back");

        // The fair claim replaces what is marked.
        room.claimed(HashSet::new(), HashSet::new(), true, &[], &room.in_flight());
        assert!(room.capped().is_empty());
    }

    /// The room each destination gets in the claim: the cap less what is
    /// in flight while it is new or answers slowly; no limit once its last
    /// answers were quick, until a request to it goes the quick bound
    /// without an answer; requests never sent count neither way; and a
    /// capped destination wakes the loop when a request to it ends.
    #[tokio::test(start_paused = true)]
    async fn a_destination_is_held_to_its_cap_until_it_answers_quickly() {
        let room = Room::default();
        let vendor = "vendor.test:443";
        let to = |id: u128| ClaimedEvent {
            destination: Some(vendor.to_owned()),
            ..claimed_event(id, 1)
        };
        let id = Uuid::from_u128;
        let rooms = |room: &Room| -> Vec<(String, i32)> {
            let in_flight = room.in_flight_at(4, Instant::now());
            in_flight
                .destinations
                .into_iter()
                .zip(in_flight.destination_rooms)
                .collect()
        };
        let claim = |ids: std::ops::Range<u128>, capped: bool| {
            let events: Vec<ClaimedEvent> = ids.map(to).collect();
            let marked: HashSet<String> = if capped {
                [vendor.to_owned()].into()
            } else {
                HashSet::new()
            };
            room.claimed(HashSet::new(), marked, false, &events, &room.in_flight());
        };
        claim(0..4, true);
        assert_eq!(rooms(&room), [(vendor.to_owned(), 0)]);
        assert_eq!(room.capped_destinations(), [vendor.to_owned()].into());
        // A quick answer frees its place and wakes the loop.
        room.request_ended(vendor, id(0), MS(10), true);
        tokio::time::timeout(MS(1), room.freed())
            .await
            .expect("woken for the destination's room");
        assert!(room.capped_destinations().is_empty());
        assert_eq!(rooms(&room), [(vendor.to_owned(), 1)]);
        // Requests refused before sending count for nothing.
        claim(4..8, false);
        for i in 4..8 {
            room.request_ended(vendor, id(i), MS(0), false);
        }
        assert_eq!(rooms(&room), [(vendor.to_owned(), 1)]);
        // Three more quick answers: no limit.
        for i in 1..4 {
            room.request_ended(vendor, id(i), MS(10), true);
        }
        assert_eq!(rooms(&room), [(vendor.to_owned(), i32::MAX)]);
        // One request goes the quick bound unanswered while others are
        // answered quickly: held again.
        claim(10..16, false);
        sleep(DESTINATION_QUICK).await;
        for i in 11..14 {
            room.request_ended(vendor, id(i), MS(10), true);
        }
        assert_eq!(rooms(&room), [(vendor.to_owned(), i32::MAX)]);
        sleep(MS(1)).await;
        assert_eq!(rooms(&room), [(vendor.to_owned(), 4 - 3)]);
        // Slow answers: held until the next quick streak.
        for i in [10, 14, 15] {
            room.request_ended(vendor, id(i), DESTINATION_QUICK + MS(1), true);
        }
        assert_eq!(rooms(&room), [(vendor.to_owned(), 4)]);
        claim(20..24, false);
        for i in 20..23 {
            room.request_ended(vendor, id(i), MS(10), true);
        }
        assert_eq!(rooms(&room), [(vendor.to_owned(), 4 - 1)]);
        room.request_ended(vendor, id(23), MS(10), true);
        assert_eq!(rooms(&room), [(vendor.to_owned(), i32::MAX)]);
        // Forgotten once idle for long: new again.
        sleep(DESTINATION_FORGOTTEN).await;
        room.forget_stale(Duration::from_secs(60));
        assert!(rooms(&room).is_empty());
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
