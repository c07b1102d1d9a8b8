//! The completer: the recorder task, which takes finished deliveries'
//! outcomes (decided by [`crate::policy`]) and writes them in groups through
//! [`crate::store::record`], retrying while the database is out of reach,
//! then tells whoever claims ([`Freed`]) that their endpoints' places under
//! the cap are free again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::CircuitConfig;
use crate::http::classify::{MAX_MESSAGE_CHARS, truncate_chars};
use crate::model::{NextState, Outcome};
use crate::pipeline::schema_watch::SchemaWatch;
use crate::progress::Progress;
use crate::service::Heartbeat;
use crate::store::error::ErrorKind;
use crate::store::pool as db;
use crate::store::record::{CircuitChange, FenceReason, Fenced, RecordError, Written, write};
use crate::store::server;
use crate::telemetry;

/// Told when deliveries have ended and their outcomes were written (or
/// given up on): their endpoints' places under the cap are free again. The
/// producer's [`crate::pipeline::producer::Room`] is one; the completer and
/// the executor know only this, so the arrows point one way.
pub trait Freed: Send + Sync {
    /// One delivery ended per `(company_id, event_type)` in `endpoints`.
    fn finished(&self, endpoints: &[(i64, &str)]);

    /// The outcomes of these (event id, attempt) were written, marked or
    /// refused by the fence: their leases are no longer this instance's to
    /// keep (the claim loop hands back the leases it does not know of).
    fn recorded(&self, outcomes: &[(Uuid, i32)]);

    /// The request of event `id` to `destination` (an endpoint's host and
    /// port) ended after `took`; `sent`: it went out (else it was refused
    /// before sending, or the task ended without an outcome). Its place
    /// there is free at once.
    fn request_ended(&self, destination: &str, id: Uuid, took: Duration, sent: bool);
}

/// Outcomes written per round trip at most. Under load the recorder takes
/// whatever has queued up to this; 500 rows of arrays stay well below any
/// statement-size concern and keep one round trip under a few milliseconds.
pub const MAX_RECORD_BATCH: usize = 500;

/// Under load (several outcomes queued at once), how long the recorder waits
/// for more before writing, up to `gather` of them. A statement's fixed cost
/// dominates small groups: the SQL-only benchmark used 90-95 µs of
/// PostgreSQL CPU per event in groups of 16 and 49-51 µs in groups of 64.
/// Claiming and writing as soon as anything was there gave about 17 events
/// per transaction (claims and record groups) in the 100,000-event drain;
/// with this and the claim's gathering (`pipeline::producer::CLAIM_GATHER_WAIT`), about
/// 30, and PostgreSQL's CPU per event went from 70-73 to 54-58 µs. Delivery
/// is not delayed: a slot is freed once its outcome is queued, and the mark
/// follows at most this much later. A lone outcome is written at once.
pub const RECORD_GATHER_WAIT: Duration = Duration::from_millis(2);

/// Waits for outcomes and moves what has queued into `group`; when that was
/// more than one (deliveries finishing together), waits up to
/// [`RECORD_GATHER_WAIT`] for `gather` in all. False once the channel is
/// closed and empty.
async fn next_group<T>(
    outcomes: &mut mpsc::Receiver<T>,
    group: &mut Vec<T>,
    gather: usize,
) -> bool {
    let gather = gather.clamp(1, MAX_RECORD_BATCH);
    match outcomes.recv_many(group, MAX_RECORD_BATCH).await {
        0 => return false,
        1 => return true,
        _ => {}
    }
    let deadline = tokio::time::Instant::now() + RECORD_GATHER_WAIT;
    while group.len() < gather {
        let room = MAX_RECORD_BATCH - group.len();
        match tokio::time::timeout_at(deadline, outcomes.recv_many(group, room)).await {
            Ok(0) | Err(_) => break, // closed, or waited long enough
            Ok(_) => {}
        }
    }
    true
}

/// How often outcomes set aside are tried again.
pub const SET_ASIDE_RETRY: Duration = Duration::from_secs(5);

/// Outcomes set aside at most; beyond, the oldest is given up (its event is
/// delivered again after its lease). A revoked privilege sets aside every
/// outcome, and memory must stay bounded.
const MAX_SET_ASIDE: usize = 10_000;

/// The recorder: what it writes with.
pub struct Recorder {
    pub pool: deadpool_postgres::Pool,
    pub owner: String,
    /// The group size worth waiting for: the delivery concurrency.
    pub gather: usize,
    /// One write's bound (`store::pool::round_trip_limit`).
    pub limit: Duration,
    /// `delivery.lease`: how long an outcome set aside is worth keeping.
    pub lease: Duration,
    pub circuit: CircuitConfig,
    /// `notify.window`: throttles the emails about circuits.
    pub notify_window: Duration,
    /// Told when an outcome has been written (or given up on): its
    /// endpoint's place under the cap is free again.
    pub room: Arc<dyn Freed>,
    /// What the database's encoding can store: texts are fitted to it.
    pub charset: server::Charset,
    /// Where the oldest unwritten outcome and the outcomes set aside are
    /// told.
    pub progress: Arc<Progress>,
    /// Asked to look at the schema when a write is refused for what the
    /// database has become.
    pub schema: Arc<SchemaWatch>,
}

impl Recorder {
    /// The recorder task: takes finished deliveries from `outcomes` and
    /// writes them in groups (see [`RECORD_GATHER_WAIT`]) until the channel
    /// closes and is empty.
    ///
    /// What a refused write leads to depends on why ([`ErrorKind`]):
    /// - transient (the database out of reach, restarting, failing over, a
    ///   lock, a timeout): the group is retried (1 s, doubling to 30 s)
    ///   while the channel's bound holds deliveries back; outcomes are not
    ///   lost. If the outage outlasts the leases, other instances claim the
    ///   events again and the fence discards these late outcomes;
    /// - bad data (one outcome's values): the group is written one by one
    ///   ([`write_one_by_one`]), so that the others land;
    /// - structural (a privilege, a trigger, a changed table): the schema
    ///   is looked at again ([`SchemaWatch`]; a newer one stops the
    ///   instance), then the group is written one by one, and each outcome
    ///   that is still refused is set aside with its reason ([`SetAside`]):
    ///   counted, logged, tried again every [`SET_ASIDE_RETRY`] for as long
    ///   as its lease lasts, and the queue moves on. While nothing at all
    ///   can be written, the claim loop pauses ([`Progress`]).
    ///
    /// Every write is bounded by `limit`; one that overruns counts as
    /// transient. `heartbeat` promises each write's and each pause's bound,
    /// and nothing while there is nothing to write.
    pub async fn run(self, mut outcomes: mpsc::Receiver<Outcome>, heartbeat: Heartbeat) {
        let mut batch = Vec::with_capacity(MAX_RECORD_BATCH);
        let mut aside = SetAside::default();
        let writer = Writer {
            recorder: &self,
            heartbeat: &heartbeat,
        };
        loop {
            let open = match aside.next_retry() {
                None => {
                    heartbeat.idle();
                    next_group(&mut outcomes, &mut batch, self.gather).await
                }
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    heartbeat.within(wait);
                    let next = next_group(&mut outcomes, &mut batch, self.gather);
                    // Time to try those set aside again; what was received
                    // meanwhile is in `batch`.
                    tokio::time::timeout(wait, next).await.unwrap_or(true)
                }
            };
            if !batch.is_empty() {
                self.record(&writer, &mut batch, &mut aside).await;
                batch.clear();
            }
            if aside.next_retry().is_some_and(|at| at <= Instant::now()) {
                writer.retry_set_aside(&mut aside).await;
                self.told(&mut aside);
            }
            if !open {
                break;
            }
        }
        if !aside.entries.is_empty() {
            tracing::warn!(
                set_aside = aside.entries.len(),
                "stopping with outcomes that could not be recorded; their events are delivered \
                 again after their leases, with the same idempotency key"
            );
        }
        heartbeat.retire();
    }

    /// Writes one group (see [`Recorder::run`]), then frees its endpoints'
    /// places under the cap, set aside or not.
    async fn record(&self, writer: &Writer<'_>, batch: &mut [Outcome], aside: &mut SetAside) {
        let received = Instant::now();
        self.progress
            .unrecorded_since(Some(aside.oldest().map_or(received, |o| o.min(received))));
        for outcome in batch.iter_mut() {
            fit_texts(outcome, self.charset);
        }
        let batch = &*batch;
        match writer.write_until_done(batch).await {
            Ok(()) => aside.wrote(),
            Err(e) => {
                if e.kind == ErrorKind::Structural {
                    // One more bounded round trip.
                    writer.heartbeat.within(self.limit);
                    self.schema.recheck("record", &e.message).await;
                }
                // One outcome may poison the group: write them one by one
                // so that the others land.
                tracing::error!(error = %e, "a group of outcomes was refused; recording them one by one");
                write_one_by_one(writer, batch, aside, received).await;
            }
        }
        let ended: Vec<(i64, &str)> = batch
            .iter()
            .map(|o| (o.company_id, o.event_type.as_str()))
            .collect();
        self.room.finished(&ended);
        self.told(aside);
    }

    /// Tells [`Progress`] what is set aside and since when.
    fn told(&self, aside: &mut SetAside) {
        self.progress.unrecorded_since(aside.oldest());
        // Nothing set aside, and nothing when last told: the common case,
        // every group; no lock, no gauge to update.
        let quiet = aside.entries.is_empty();
        if std::mem::replace(&mut aside.told_quiet, quiet) && quiet {
            return;
        }
        self.progress.set_aside(
            aside.entries.len(),
            aside.entries.last().map(|e| e.reason.as_str()),
            aside.blocked,
        );
        ::metrics::gauge!(crate::telemetry::OUTCOMES_SET_ASIDE).set(aside.entries.len() as f64);
    }
}

/// Outcomes the database refused for what it has become (see
/// [`Recorder::run`]), kept to be tried again while their leases last.
#[derive(Default)]
struct SetAside {
    entries: Vec<Aside>,
    /// Progress was last told that nothing is set aside.
    told_quiet: bool,
    /// No write has succeeded since the oldest entry was set aside.
    blocked: bool,
    /// When to try again (None: nothing set aside).
    retry_at: Option<Instant>,
}

struct Aside {
    outcome: Outcome,
    /// When the recorder first received it.
    since: Instant,
    reason: String,
}

impl SetAside {
    fn put(&mut self, outcome: &Outcome, since: Instant, refused: &RecordError) {
        if self.entries.is_empty() {
            self.blocked = true;
            self.retry_at = Some(Instant::now() + SET_ASIDE_RETRY);
        }
        ::metrics::counter!(crate::telemetry::OUTCOMES_SET_ASIDE_TOTAL).increment(1);
        tracing::error!(
            event_id = %outcome.event_id,
            company_id = outcome.company_id,
            attempt = outcome.attempt,
            error = %refused.message,
            retry_in = ?SET_ASIDE_RETRY,
            "an outcome cannot be recorded; set aside and tried again while its lease lasts"
        );
        self.entries.push(Aside {
            outcome: outcome.clone(),
            since,
            reason: refused.message.clone(),
        });
        if self.entries.len() > MAX_SET_ASIDE {
            let given_up = self.entries.remove(0);
            give_up(&given_up, "more outcomes are set aside than can be kept");
        }
    }

    /// A write succeeded.
    fn wrote(&mut self) {
        self.blocked = false;
    }

    fn oldest(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.since).min()
    }

    fn next_retry(&self) -> Option<Instant> {
        if self.entries.is_empty() {
            None
        } else {
            self.retry_at
        }
    }
}

fn give_up(aside: &Aside, why: &str) {
    tracing::warn!(
        event_id = %aside.outcome.event_id,
        attempt = aside.outcome.attempt,
        reason = %aside.reason,
        why,
        "giving up on recording an outcome; its event is delivered again after its lease, \
         with the same idempotency key"
    );
}

/// Writes groups of outcomes, each within a deadline.
struct Writer<'a> {
    recorder: &'a Recorder,
    heartbeat: &'a Heartbeat,
}

impl Writer<'_> {
    /// Writes `batch`, trying again (1 s, doubling to 30 s) for as long as
    /// the failure is transient (see [`ErrorKind`]); an error when the
    /// database refused the batch for what it carries or for what it has
    /// become.
    async fn write_until_done(&self, batch: &[Outcome]) -> Result<(), RecordError> {
        let mut delay = Duration::from_secs(1);
        let mut again = false;
        loop {
            match self.write(batch, again).await {
                Ok(written) => {
                    self.written(batch, &written);
                    return Ok(());
                }
                Err(e) => {
                    telemetry::database_error("record");
                    if e.kind != ErrorKind::Transient {
                        return Err(e);
                    }
                    // The write may have committed before its reply was
                    // lost: the next try says so (see record.sql's end).
                    again = true;
                    tracing::warn!(error = %e, pending = batch.len(), retry_in = ?delay, "recording failed; will retry");
                    self.heartbeat.within(delay);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn write(&self, batch: &[Outcome], again: bool) -> Result<Written, RecordError> {
        let limit = self.recorder.limit;
        self.heartbeat.within(limit);
        match tokio::time::timeout(limit, self.write_pooled(batch, again)).await {
            Ok(written) => written,
            Err(_) => Err(RecordError {
                message: format!("no answer within {limit:?}"),
                kind: ErrorKind::Transient,
            }),
        }
    }

    async fn write_pooled(&self, batch: &[Outcome], again: bool) -> Result<Written, RecordError> {
        let r = self.recorder;
        let client = db::Checkout::get(&r.pool, "record")
            .await
            .map_err(|e| RecordError {
                message: format!("no database connection: {}", db::describe_pool(&e)),
                kind: ErrorKind::Transient,
            })?;
        let written = write(&client, &r.owner, batch, again, &r.circuit, r.notify_window).await;
        client.done();
        written
    }

    /// After a write: metrics, and the circuits it moved.
    fn written(&self, batch: &[Outcome], written: &Written) {
        let ids: Vec<(Uuid, i32)> = batch.iter().map(|o| (o.event_id, o.attempt)).collect();
        self.recorder.room.recorded(&ids);
        count_marked(batch, written);
        for c in &written.circuits {
            log_circuit(c);
        }
    }

    /// Tries each outcome set aside once more (a transient failure ends
    /// the round: the next one comes [`SET_ASIDE_RETRY`] later); gives up
    /// those whose lease is over.
    async fn retry_set_aside(&self, aside: &mut SetAside) {
        let lease = self.recorder.lease;
        let now = SystemTime::now();
        aside.entries.retain(|a| {
            let over = a.outcome.started_at + lease <= now;
            if over {
                give_up(a, "its lease is over");
            }
            !over
        });
        let mut kept = Vec::with_capacity(aside.entries.len());
        let mut entries = std::mem::take(&mut aside.entries).into_iter();
        for mut a in entries.by_ref() {
            // `again`: an earlier try may have committed unanswered.
            match self.write(std::slice::from_ref(&a.outcome), true).await {
                Ok(written) => {
                    self.written(std::slice::from_ref(&a.outcome), &written);
                    aside.wrote();
                    tracing::info!(
                        event_id = %a.outcome.event_id,
                        waited = ?a.since.elapsed(),
                        "an outcome set aside is recorded after all"
                    );
                }
                Err(e) => {
                    telemetry::database_error("record");
                    let transient = e.kind == ErrorKind::Transient;
                    a.reason = e.message;
                    kept.push(a);
                    if transient {
                        break;
                    }
                }
            }
        }
        kept.extend(entries);
        aside.entries = kept;
        if aside.entries.is_empty() {
            aside.blocked = false;
        }
        aside.retry_at = Some(Instant::now() + SET_ASIDE_RETRY);
    }
}

/// One line per circuit that opened or closed: an operator's first clue
/// that a tenant's system is down, or back.
fn log_circuit(c: &CircuitChange) {
    telemetry::circuit_change(&c.change);
    match c.change.as_str() {
        "closed" => tracing::info!(
            company_id = c.company_id,
            event_type = %c.event_type,
            "endpoint answers again: circuit closed, its events flow again"
        ),
        change => tracing::warn!(
            company_id = c.company_id,
            event_type = %c.event_type,
            change,
            "endpoint not reachable: circuit open, its events are held"
        ),
    }
}

/// Writes each outcome on its own, each retried like a group while the
/// failure is transient (a connection lost then is not the outcome's
/// fault). One the database still refuses for what it carries is written
/// again without its texts (what the external system said, the error), the
/// only free-form values in it: the event keeps its real outcome, delivered
/// or failed or retried, and its attempt row says why the texts are
/// missing. One refused for what the database has become, or refused even
/// without its texts, is set aside (`received`: when the recorder took it).
async fn write_one_by_one(
    writer: &Writer<'_>,
    batch: &[Outcome],
    aside: &mut SetAside,
    received: Instant,
) {
    for outcome in batch {
        let single = std::slice::from_ref(outcome);
        let refused = match writer.write_until_done(single).await {
            Ok(()) => {
                aside.wrote();
                continue;
            }
            Err(e) if e.kind == ErrorKind::BadData => {
                let bare = without_texts(outcome, &e);
                match writer.write_until_done(std::slice::from_ref(&bare)).await {
                    Ok(()) => {
                        aside.wrote();
                        continue;
                    }
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        aside.put(outcome, received, &refused);
    }
}

/// `outcome` with its free-form texts replaced by why they are missing.
fn without_texts(outcome: &Outcome, refused: &RecordError) -> Outcome {
    let why = truncate_chars(
        &format!(
            "(not stored: the database refused the text: {})",
            refused.message
        ),
        MAX_MESSAGE_CHARS,
    );
    tracing::warn!(
        event_id = %outcome.event_id,
        error = %refused.message,
        "an outcome's texts were refused by the database; its state is recorded without them"
    );
    // On a delivered event too: last_error is where the row says what went
    // wrong with it, and the attempt row takes it as its message.
    Outcome {
        response_message: None,
        error: Some(why),
        ..outcome.clone()
    }
}

/// Fits the outcome's texts to what the database can store (see
/// [`server::Charset`]), cut again to [`MAX_MESSAGE_CHARS`] when escaping made
/// them longer.
fn fit_texts(outcome: &mut Outcome, charset: server::Charset) {
    for text in [&mut outcome.response_message, &mut outcome.error]
        .into_iter()
        .flatten()
    {
        if let std::borrow::Cow::Owned(fitted) = charset.storable(text) {
            *text = truncate_chars(&fitted, MAX_MESSAGE_CHARS);
        }
    }
}

/// Metrics for what was written; a warning for each outcome the fence
/// refused, saying why as `fence_reasons.sql` found the row.
fn count_marked(batch: &[Outcome], written: &Written) {
    let marked: std::collections::HashSet<&Uuid> = written.marked.iter().collect();
    let fenced: std::collections::HashMap<&Uuid, &Fenced> =
        written.fenced.iter().map(|f| (&f.id, f)).collect();
    for o in batch {
        if !marked.contains(&o.event_id) {
            ::metrics::counter!(crate::telemetry::OUTCOMES_FENCED).increment(1);
            let why = fenced.get(&o.event_id);
            let (now_attempt, now_state) = why
                .map(|f| (f.attempts, f.state.as_deref()))
                .unwrap_or_default();
            let message = match why.map(|f| f.reason) {
                Some(FenceReason::Gone) => "outcome not recorded: the event no longer exists",
                Some(FenceReason::Unclaimed) => {
                    "outcome not recorded: the database does not have this attempt's claim \
                     (lost with a primary that failed, or in a crash); the event is sent again"
                }
                Some(FenceReason::ClaimedAgain) => {
                    "outcome not recorded: the event was claimed again since \
                     (this attempt's lease had expired or been handed back)"
                }
                Some(FenceReason::NotLeased) | None => {
                    "outcome not recorded: the event no longer carries this attempt's lease"
                }
            };
            tracing::warn!(
                event_id = %o.event_id,
                attempt = o.attempt,
                now_attempt,
                now_state,
                "{message}"
            );
            continue;
        }
        match o.next {
            NextState::Delivered => {
                telemetry::completed(&o.event_type, "delivered");
                telemetry::lag(&o.event_type, o.age);
            }
            NextState::Failed => telemetry::completed(&o.event_type, "failed"),
            NextState::Retry(_) | NextState::Held(_) => telemetry::retried(&o.event_type),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod gathering {
        use super::*;
        use tokio::time::{Instant, sleep};

        // Paused clock: a wait shows as time advanced, none as zero.

        /// Sends each value at its moment (ms from now).
        fn send_at(tx: &mpsc::Sender<u32>, at: &[(u64, u32)]) {
            for &(ms, value) in at {
                let tx = tx.clone();
                tokio::spawn(async move {
                    sleep(Duration::from_millis(ms)).await;
                    tx.send(value).await.unwrap();
                });
            }
        }

        #[tokio::test(start_paused = true)]
        async fn a_lone_outcome_is_written_at_once() {
            let (tx, mut rx) = mpsc::channel(16);
            tx.send(1).await.unwrap();
            send_at(&tx, &[(1, 2)]);
            let mut group = Vec::new();
            let started = Instant::now();
            assert!(next_group(&mut rx, &mut group, 8).await);
            assert_eq!((group, started.elapsed()), (vec![1], Duration::ZERO));
        }

        #[tokio::test(start_paused = true)]
        async fn under_load_it_waits_briefly_for_a_larger_group() {
            let (tx, mut rx) = mpsc::channel(16);
            tx.send(1).await.unwrap();
            tx.send(2).await.unwrap();
            send_at(&tx, &[(1, 3), (1, 4), (5, 5)]);
            let mut group = Vec::new();
            let started = Instant::now();
            assert!(next_group(&mut rx, &mut group, 8).await);
            // 5 comes after the wait and goes into the next group.
            assert_eq!(group, vec![1, 2, 3, 4]);
            assert_eq!(started.elapsed(), RECORD_GATHER_WAIT);
        }

        #[tokio::test(start_paused = true)]
        async fn a_full_group_goes_without_waiting_out_the_time() {
            let (tx, mut rx) = mpsc::channel(16);
            tx.send(1).await.unwrap();
            tx.send(2).await.unwrap();
            send_at(&tx, &[(1, 3)]);
            let mut group = Vec::new();
            let started = Instant::now();
            assert!(next_group(&mut rx, &mut group, 3).await);
            assert_eq!(
                (group, started.elapsed()),
                (vec![1, 2, 3], Duration::from_millis(1))
            );
        }

        #[tokio::test(start_paused = true)]
        async fn a_closed_channel_ends_the_wait_and_then_the_recorder() {
            let (tx, mut rx) = mpsc::channel(16);
            tx.send(1).await.unwrap();
            tx.send(2).await.unwrap();
            drop(tx);
            let mut group = Vec::new();
            let started = Instant::now();
            assert!(next_group(&mut rx, &mut group, 8).await);
            assert_eq!(
                (group.clone(), started.elapsed()),
                (vec![1, 2], Duration::ZERO)
            );
            group.clear();
            assert!(!next_group(&mut rx, &mut group, 8).await);
        }
    }
}
