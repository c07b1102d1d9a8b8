//! The completer: the recorder task, which takes finished deliveries'
//! outcomes (decided by [`crate::policy`]) and writes them in groups through
//! [`crate::store::record`], retrying while the database is out of reach,
//! then tells whoever claims ([`Freed`]) that their endpoints' places under
//! the cap are free again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::config::CircuitConfig;
use crate::http::classify::{MAX_MESSAGE_CHARS, truncate_chars};
use crate::model::{NextState, Outcome};
use crate::service::Heartbeat;
use crate::store::pool as db;
use crate::store::record::{CircuitChange, RecordError, Written, write};
use crate::store::server;
use crate::telemetry;

/// Told when deliveries have ended and their outcomes were written (or
/// given up on): their endpoints' places under the cap are free again. The
/// producer's [`crate::pipeline::producer::Room`] is one; the completer and
/// the executor know only this, so the arrows point one way.
pub trait Freed: Send + Sync {
    /// One delivery ended per `(company_id, event_type)` in `endpoints`.
    fn finished(&self, endpoints: &[(i64, &str)]);
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

/// The recorder: what it writes with.
pub struct Recorder {
    pub pool: deadpool_postgres::Pool,
    pub owner: String,
    /// The group size worth waiting for: the delivery concurrency.
    pub gather: usize,
    /// One write's bound (`store::pool::round_trip_limit`).
    pub limit: Duration,
    pub circuit: CircuitConfig,
    /// `notify.window`: throttles the emails about circuits.
    pub notify_window: Duration,
    /// Told when an outcome has been written (or given up on): its
    /// endpoint's place under the cap is free again.
    pub room: Arc<dyn Freed>,
    /// What the database's encoding can store: texts are fitted to it.
    pub charset: server::Charset,
}

impl Recorder {
    /// The recorder task: takes finished deliveries from `outcomes` and
    /// writes them in groups (see [`RECORD_GATHER_WAIT`]) until the channel
    /// closes and is empty.
    ///
    /// A database error does not lose outcomes: the group is retried (1 s,
    /// doubling to 30 s) while the channel's bound holds deliveries back. If
    /// the outage outlasts the leases, other instances claim the events
    /// again and the fence discards these late outcomes. Every write is
    /// bounded by `limit`; one that overruns counts as failed and is
    /// retried. A group the database refuses for what it carries is written
    /// one by one ([`write_one_by_one`]). `heartbeat` promises each write's
    /// and each pause's bound, and nothing while there is nothing to write.
    pub async fn run(self, mut outcomes: mpsc::Receiver<Outcome>, heartbeat: Heartbeat) {
        let mut batch = Vec::with_capacity(MAX_RECORD_BATCH);
        let writer = Writer {
            recorder: &self,
            heartbeat: &heartbeat,
        };
        loop {
            heartbeat.idle();
            if !next_group(&mut outcomes, &mut batch, self.gather).await {
                break;
            }
            for outcome in &mut batch {
                fit_texts(outcome, self.charset);
            }
            if let Err(e) = writer.write_until_done(&batch).await {
                // One outcome poisons the group: write them one by one so
                // that the others land.
                tracing::error!(error = %e, "a group of outcomes was refused; recording them one by one");
                write_one_by_one(&writer, &batch).await;
            }
            let ended: Vec<(i64, &str)> = batch
                .iter()
                .map(|o| (o.company_id, o.event_type.as_str()))
                .collect();
            self.room.finished(&ended);
            batch.clear();
        }
        heartbeat.retire();
    }
}

/// Writes groups of outcomes, each within a deadline.
struct Writer<'a> {
    recorder: &'a Recorder,
    heartbeat: &'a Heartbeat,
}

impl Writer<'_> {
    /// Writes `batch`, trying again (1 s, doubling to 30 s) for as long as
    /// the database cannot be reached or does not answer in time; an error
    /// only when the database refused the batch for what it carries.
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
                    if e.bad_data {
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
                bad_data: false,
            }),
        }
    }

    async fn write_pooled(&self, batch: &[Outcome], again: bool) -> Result<Written, RecordError> {
        let r = self.recorder;
        let client = db::Checkout::get(&r.pool, "record")
            .await
            .map_err(|e| RecordError {
                message: format!("no database connection: {}", db::describe_pool(&e)),
                bad_data: false,
            })?;
        let written = write(&client, &r.owner, batch, again, &r.circuit, r.notify_window).await;
        client.done();
        written
    }

    /// After a write: metrics, and the circuits it moved.
    fn written(&self, batch: &[Outcome], written: &Written) {
        count_marked(batch, &written.marked);
        for c in &written.circuits {
            log_circuit(c);
        }
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
/// database is out of reach (a connection lost then is not the outcome's
/// fault). One the database still refuses for what it carries is written
/// again without its texts (what the external system said, the error), the
/// only free-form values in it: the event keeps its real outcome, delivered
/// or failed or retried, and its attempt row says why the texts are
/// missing. If even that is refused, the event is left to its lease.
async fn write_one_by_one(writer: &Writer<'_>, batch: &[Outcome]) {
    for outcome in batch {
        let single = std::slice::from_ref(outcome);
        let Err(e) = writer.write_until_done(single).await else {
            continue;
        };
        let bare = without_texts(outcome, &e);
        if let Err(e) = writer.write_until_done(std::slice::from_ref(&bare)).await {
            tracing::error!(
                event_id = %outcome.event_id,
                error = %e,
                "cannot record this outcome at all; the event is retried after its lease"
            );
        }
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
/// refused.
fn count_marked(batch: &[Outcome], marked: &[Uuid]) {
    let marked: std::collections::HashSet<&Uuid> = marked.iter().collect();
    for o in batch {
        if !marked.contains(&o.event_id) {
            ::metrics::counter!(crate::telemetry::OUTCOMES_FENCED).increment(1);
            tracing::warn!(
                event_id = %o.event_id,
                attempt = o.attempt,
                "outcome not recorded: the lease ran out and the event was claimed again"
            );
            continue;
        }
        match o.next {
            NextState::Delivered => {
                telemetry::completed(&o.event_type, "delivered");
                telemetry::lag(&o.event_type, o.age);
            }
            NextState::Failed => telemetry::completed(&o.event_type, "failed"),
            NextState::Retry(_) => telemetry::retried(&o.event_type),
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
