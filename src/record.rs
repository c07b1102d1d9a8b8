//! Marking events: what a finished delivery means for its row
//! ([`decide`]), and writing the outcomes of many deliveries in one fenced
//! round trip (`sql/queries/record.sql`).

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::backoff::{GiveUpReason, Next, RetryPolicy};
use crate::claim::{ClaimedEvent, Room};
use crate::classify::{MAX_MESSAGE_CHARS, Verdict, truncate_chars};
use crate::config::CircuitConfig;
use crate::service::Heartbeat;
use crate::webhook::Refusal;
use crate::{db, telemetry};

const RECORD_SQL: &str = include_str!("../sql/queries/record.sql");
const CIRCUITS_SQL: &str = include_str!("../sql/queries/circuits_record.sql");

/// Outcomes written per round trip at most. Under load the recorder takes
/// whatever has queued up to this; 500 rows of arrays stay well below any
/// statement-size concern and keep one round trip under a few milliseconds.
pub const MAX_RECORD_BATCH: usize = 500;

/// No retry is put further out than this, whatever the policy computed: the
/// database's interval type and the people waiting both have limits.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The event's next state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextState {
    Delivered,
    Failed,
    /// Back to pending, due after this delay.
    Retry(Duration),
}

/// How one attempt went, as logged in `outbox.attempts.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    Success,
    Rejected,
    Retryable,
    Permanent,
    NoEndpoint,
}

impl AttemptKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptKind::Success => "success",
            AttemptKind::Rejected => "rejected",
            AttemptKind::Retryable => "retryable",
            AttemptKind::Permanent => "permanent",
            AttemptKind::NoEndpoint => "no_endpoint",
        }
    }
}

/// Everything to write for one finished delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub event_id: Uuid,
    /// The endpoint: company and event type (metrics label, circuit).
    pub company_id: i64,
    pub event_type: String,
    /// Time since the event was enqueued, at the end of this attempt.
    pub age: Duration,
    /// The claimed attempt number: the fence.
    pub attempt: i32,
    pub next: NextState,
    pub kind: AttemptKind,
    /// What the external system said, if it said anything.
    pub response_message: Option<String>,
    /// Why it did not succeed (None on success).
    pub error: Option<String>,
    pub started_at: SystemTime,
    pub duration: Duration,
    pub http_status: Option<u16>,
    /// Email the endpoint's notify_emails: the event failed for good after
    /// a real attempt (not for a missing endpoint or a broken payload, which
    /// the company cannot fix).
    pub notify: bool,
    /// A 429 or 503 with Retry-After: the whole endpoint waits this long.
    pub pause: Option<Duration>,
    /// The endpoint's circuit was not closed and clean at the claim: this
    /// outcome is news for it even if it is a success.
    pub circuit_dirty: bool,
}

/// What an event refused before sending means (see [`crate::webhook::prepare`]):
/// failed for good with the reason, so it is not retried in a loop. No
/// email for a missing or disabled endpoint or a broken payload, which the
/// company cannot fix; but one when the attempts ran out through leases
/// that ran out: real requests were made (maybe received), and the event
/// was not delivered. A missing or disabled endpoint is `no_endpoint`, the
/// rest `permanent`.
pub fn refused(event: &ClaimedEvent, refusal: &Refusal) -> Outcome {
    let kind = match refusal {
        Refusal::NoEndpoint { .. } | Refusal::Disabled { .. } => AttemptKind::NoEndpoint,
        Refusal::BudgetSpent { .. } | Refusal::Invalid(_) => AttemptKind::Permanent,
    };
    Outcome {
        event_id: event.id,
        company_id: event.company_id,
        event_type: event.event_type.clone(),
        age: event.age,
        attempt: event.attempt,
        next: NextState::Failed,
        kind,
        response_message: None,
        error: Some(truncate_chars(&refusal.to_string(), MAX_MESSAGE_CHARS)),
        started_at: SystemTime::now(),
        duration: Duration::ZERO,
        http_status: None,
        notify: matches!(refusal, Refusal::BudgetSpent { .. }),
        pause: None,
        circuit_dirty: event.circuit_dirty,
    }
}

/// Turns a judged attempt into the row's next state, applying the retry
/// policy. `unit` is a random number in [0, 1) for jitter.
pub fn decide(
    event: &ClaimedEvent,
    verdict: Verdict,
    started_at: SystemTime,
    duration: Duration,
    http_status: Option<u16>,
    policy: &RetryPolicy,
    unit: f64,
) -> Outcome {
    // Retry-After on "too many requests" or "unavailable" speaks for the
    // whole endpoint, not this one event.
    let pause = match (&verdict, http_status) {
        (
            Verdict::Retry {
                retry_after: Some(after),
                ..
            },
            Some(429 | 503),
        ) => Some((*after).min(policy.max_retry_after)),
        _ => None,
    };
    let (next, kind, response_message, error) = match verdict {
        Verdict::Delivered { message } => {
            (NextState::Delivered, AttemptKind::Success, message, None)
        }
        Verdict::Rejected { message } => (
            NextState::Failed,
            AttemptKind::Rejected,
            message,
            Some("rejected by the external system (status 0)".to_string()),
        ),
        Verdict::Permanent { reason, message } => (
            NextState::Failed,
            AttemptKind::Permanent,
            message,
            Some(reason),
        ),
        Verdict::Retry {
            reason,
            message,
            retry_after,
        } => {
            let attempts = event.budget_attempt.max(1) as u32;
            match policy.next(attempts, event.age, retry_after, unit) {
                Next::RetryIn(delay) => (
                    NextState::Retry(delay),
                    AttemptKind::Retryable,
                    message,
                    Some(reason),
                ),
                Next::GiveUp(GiveUpReason::MaxAttempts) => (
                    NextState::Failed,
                    AttemptKind::Retryable,
                    message,
                    Some(format!("gave up after {attempts} attempts; last: {reason}")),
                ),
                Next::GiveUp(GiveUpReason::MaxAge) => (
                    NextState::Failed,
                    AttemptKind::Retryable,
                    message,
                    Some(format!(
                        "gave up: the next retry would come more than {} after the event was created; last: {reason}",
                        humantime::format_duration(policy.max_age)
                    )),
                ),
            }
        }
    };
    Outcome {
        event_id: event.id,
        company_id: event.company_id,
        event_type: event.event_type.clone(),
        age: event.age + duration,
        attempt: event.attempt,
        next,
        kind,
        response_message,
        error: error.map(|e| truncate_chars(&e, MAX_MESSAGE_CHARS)),
        started_at,
        duration,
        http_status,
        notify: next == NextState::Failed,
        pause,
        circuit_dirty: event.circuit_dirty,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("recording delivery outcomes: {message}")]
pub struct RecordError {
    pub message: String,
    /// The statement was refused for what it carried (SQLSTATE class 22,
    /// data exception, or 23, integrity violation): retrying the same batch
    /// would fail the same way.
    pub bad_data: bool,
}

impl From<tokio_postgres::Error> for RecordError {
    fn from(e: tokio_postgres::Error) -> RecordError {
        let bad_data = e
            .code()
            .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"));
        RecordError {
            message: db::describe(&e),
            bad_data,
        }
    }
}

/// A circuit breaker that one group of outcomes moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitChange {
    pub company_id: i64,
    pub event_type: String,
    /// opened, reopened (a probe failed) or closed.
    pub change: String,
}

/// What one write did.
#[derive(Debug, Default)]
pub struct Written {
    /// The ids whose rows were marked; the others had lost their lease and
    /// were left alone.
    pub marked: Vec<Uuid>,
    pub circuits: Vec<CircuitChange>,
}

/// Writes `outcomes` in one statement, and moves the circuit breakers of
/// their endpoints by `circuit` (queuing an email about one that opened or
/// closed, at most one per `notify_window`).
/// `again`: this same group was written before and the reply was lost, so
/// outcomes already applied are reported as marked rather than as fenced.
pub async fn write(
    client: &deadpool_postgres::Client,
    owner: &str,
    outcomes: &[Outcome],
    again: bool,
    circuit: &CircuitConfig,
    notify_window: Duration,
) -> Result<Written, RecordError> {
    let statement = client.prepare_cached(RECORD_SQL).await?;
    let n = outcomes.len();
    let mut ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut retry_ms = Vec::with_capacity(n);
    let mut messages = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut attempt_messages = Vec::with_capacity(n);
    let mut notify = Vec::with_capacity(n);
    for o in outcomes {
        ids.push(o.event_id);
        attempts.push(o.attempt);
        let (state, delay) = match o.next {
            NextState::Delivered => ("delivered", None),
            NextState::Failed => ("failed", None),
            NextState::Retry(d) => ("pending", Some(d.min(MAX_RETRY_DELAY).as_millis() as i64)),
        };
        states.push(state);
        retry_ms.push(delay);
        messages.push(o.response_message.as_deref());
        errors.push(o.error.as_deref());
        started.push(o.started_at);
        durations.push(o.duration.as_millis().min(i32::MAX as u128) as i32);
        statuses.push(o.http_status.map(|s| s as i16));
        kinds.push(o.kind.as_str());
        attempt_messages.push(o.response_message.as_deref().or(o.error.as_deref()));
        notify.push(o.notify);
    }
    let rows = client
        .query(
            &statement,
            &[
                &ids,
                &attempts,
                &states,
                &retry_ms,
                &messages,
                &errors,
                &started,
                &durations,
                &statuses,
                &kinds,
                &attempt_messages,
                &owner,
                &notify,
                &again,
            ],
        )
        .await?;
    let mut written = Written {
        marked: rows.iter().map(|r| r.get(0)).collect(),
        circuits: Vec::new(),
    };
    // Best effort: the outcomes are written, and a circuit that misses one
    // group's news still opens on the next failures.
    match write_circuits(client, outcomes, &written.marked, circuit, notify_window).await {
        Ok(changes) => written.circuits = changes,
        Err(e) => {
            telemetry::database_error("record");
            tracing::warn!(error = %db::describe(&e), "updating the circuit breakers of a group of outcomes");
        }
    }
    Ok(written)
}

/// What one endpoint's outcomes in a group say about it.
#[derive(Debug, Default, PartialEq)]
struct EndpointNews<'a> {
    failed: i32,
    answered: bool,
    pause: Option<Duration>,
    /// The last retryable failure's error.
    error: Option<&'a str>,
    last_failure_at: Option<SystemTime>,
    /// Its circuit was not closed and clean when the event was claimed.
    dirty: bool,
}

/// The news per endpoint of the marked outcomes, for the endpoints whose
/// circuit has something to learn: a retryable failure, a Retry-After, or
/// a circuit that was not closed and clean (an answer closes or clears it).
fn circuit_news<'a>(
    outcomes: &'a [Outcome],
    marked: &[Uuid],
) -> std::collections::BTreeMap<(i64, &'a str), EndpointNews<'a>> {
    let marked: std::collections::HashSet<&Uuid> = marked.iter().collect();
    let mut news: std::collections::BTreeMap<(i64, &str), EndpointNews> = Default::default();
    for o in outcomes.iter().filter(|o| marked.contains(&o.event_id)) {
        let n = news
            .entry((o.company_id, o.event_type.as_str()))
            .or_default();
        if o.kind == AttemptKind::Retryable {
            n.failed += 1;
            if n.last_failure_at.is_none_or(|at| o.started_at >= at) {
                n.last_failure_at = Some(o.started_at);
                n.error = o.error.as_deref();
            }
        } else if o.http_status.is_some() {
            n.answered = true;
        }
        n.pause = n.pause.max(o.pause);
        n.dirty |= o.circuit_dirty;
    }
    news.retain(|_, n| n.failed > 0 || n.pause.is_some() || n.dirty);
    news
}

/// Moves the circuit breakers of `outcomes`' endpoints
/// (`sql/queries/circuits_record.sql`), when any has something to learn;
/// a group of successes to healthy endpoints costs no statement.
async fn write_circuits(
    client: &deadpool_postgres::Client,
    outcomes: &[Outcome],
    marked: &[Uuid],
    circuit: &CircuitConfig,
    notify_window: Duration,
) -> Result<Vec<CircuitChange>, tokio_postgres::Error> {
    let news = circuit_news(outcomes, marked);
    if news.is_empty() {
        return Ok(Vec::new());
    }
    let statement = client.prepare_cached(CIRCUITS_SQL).await?;
    let mut companies = Vec::with_capacity(news.len());
    let mut event_types = Vec::with_capacity(news.len());
    let mut failed = Vec::with_capacity(news.len());
    let mut answered = Vec::with_capacity(news.len());
    let mut pauses = Vec::with_capacity(news.len());
    let mut errors = Vec::with_capacity(news.len());
    for ((company, event_type), n) in &news {
        companies.push(*company);
        event_types.push(*event_type);
        failed.push(n.failed);
        answered.push(n.answered);
        pauses.push(n.pause.map(millis));
        errors.push(n.error);
    }
    let rows = client
        .query(
            &statement,
            &[
                &companies,
                &event_types,
                &failed,
                &answered,
                &pauses,
                &errors,
                &(circuit.open_after as i32),
                &millis(circuit.cooldown),
                &millis(circuit.max_cooldown),
                &millis(notify_window),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| CircuitChange {
            company_id: row.get(0),
            event_type: row.get(1),
            change: row.get(2),
        })
        .collect())
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Under load (several outcomes queued at once), how long the recorder waits
/// for more before writing, up to `gather` of them. A statement's fixed cost
/// dominates small groups: the SQL-only benchmark used 90-95 µs of
/// PostgreSQL CPU per event in groups of 16 and 49-51 µs in groups of 64.
/// Claiming and writing as soon as anything was there gave about 17 events
/// per transaction (claims and record groups) in the 100,000-event drain;
/// with this and the claim's gathering (`engine::CLAIM_GATHER_WAIT`), about
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
    /// One write's bound (`db::round_trip_limit`).
    pub limit: Duration,
    pub circuit: CircuitConfig,
    /// `notify.window`: throttles the emails about circuits.
    pub notify_window: Duration,
    /// Told when an outcome has been written (or given up on): its
    /// endpoint's place under the cap is free again.
    pub room: std::sync::Arc<Room>,
    /// What the database's encoding can store: texts are fitted to it.
    pub charset: db::Charset,
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
            self.room
                .all_finished(batch.iter().map(|o| (o.company_id, o.event_type.as_str())));
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
        let client = db::Checkout::get(&r.pool).await.map_err(|e| RecordError {
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
/// [`db::Charset`]), cut again to [`MAX_MESSAGE_CHARS`] when escaping made
/// them longer.
fn fit_texts(outcome: &mut Outcome, charset: db::Charset) {
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

    fn event(attempt: i32, age: Duration) -> ClaimedEvent {
        ClaimedEvent {
            id: Uuid::nil(),
            event_type: "payment.cancellation".into(),
            company_id: 1,
            payload: "{}".into(),
            attempt,
            budget_attempt: attempt,
            age,
            lease_expired: false,
            probe: false,
            circuit_dirty: false,
            endpoint: None,
        }
    }

    fn retry(reason: &str, retry_after: Option<Duration>) -> Verdict {
        Verdict::Retry {
            reason: reason.into(),
            message: None,
            retry_after,
        }
    }

    #[test]
    fn each_verdict_maps_to_the_documented_next_state() {
        let policy = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let s = Duration::from_secs;
        let msg = |m: &str| Some(m.to_string());
        type Case = (
            i32,
            Duration,
            Verdict,
            NextState,
            AttemptKind,
            Option<&'static str>,
        );
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            (1, s(0), Verdict::Delivered { message: msg("ok") }, NextState::Delivered, AttemptKind::Success, None),
            (1, s(0), Verdict::Rejected { message: msg("no") }, NextState::Failed, AttemptKind::Rejected, Some("rejected by the external system")),
            (1, s(0), Verdict::Permanent { reason: "HTTP 404".into(), message: None }, NextState::Failed, AttemptKind::Permanent, Some("HTTP 404")),
            (1, s(0), retry("HTTP 503", None), NextState::Retry(s(5)), AttemptKind::Retryable, Some("HTTP 503")),
            (3, s(0), retry("HTTP 503", None), NextState::Retry(s(20)), AttemptKind::Retryable, Some("HTTP 503")),
            (1, s(0), retry("HTTP 429", Some(s(90))), NextState::Retry(s(90)), AttemptKind::Retryable, Some("HTTP 429")),
            (12, s(0), retry("HTTP 503", None), NextState::Failed, AttemptKind::Retryable, Some("gave up after 12 attempts; last: HTTP 503")),
            (2, s(86_398), retry("timed out", None), NextState::Failed, AttemptKind::Retryable, Some("gave up: the next retry would come more than 1day")),
        ];
        for (attempt, age, verdict, next, kind, error) in cases {
            let what = format!("{verdict:?} at attempt {attempt}");
            let o = decide(
                &event(attempt, age),
                verdict,
                SystemTime::UNIX_EPOCH,
                s(1),
                Some(200),
                &policy,
                0.5,
            );
            assert_eq!(o.next, next, "{what}");
            assert_eq!(o.kind, kind, "{what}");
            match error {
                None => assert_eq!(o.error, None, "{what}"),
                Some(want) => assert!(
                    o.error.as_deref().unwrap().contains(want),
                    "{what}: {:?}",
                    o.error
                ),
            }
            assert_eq!(o.attempt, attempt);
        }
    }

    #[test]
    fn only_endpoints_with_news_for_their_circuit_are_written() {
        let s = Duration::from_secs;
        let at = |secs| SystemTime::UNIX_EPOCH + s(secs);
        let outcome = |id: u128, company: i64, kind, status, pause, dirty, secs| Outcome {
            event_id: Uuid::from_u128(id),
            company_id: company,
            event_type: "payment.cancellation".into(),
            age: s(0),
            attempt: 1,
            next: NextState::Delivered,
            kind,
            response_message: None,
            error: Some(format!("error of {id}")),
            started_at: at(secs),
            duration: s(1),
            http_status: status,
            notify: false,
            pause,
            circuit_dirty: dirty,
        };
        use AttemptKind::*;
        let outcomes = vec![
            // 1: healthy, two successes: nothing to write.
            outcome(1, 1, Success, Some(200), None, false, 0),
            outcome(2, 1, Success, Some(200), None, false, 0),
            // 2: two timeouts and a 404 answer; the later timeout's error.
            outcome(3, 2, Retryable, None, None, false, 5),
            outcome(4, 2, Retryable, None, None, false, 9),
            outcome(5, 2, Permanent, Some(404), None, false, 1),
            // 3: a 429 with Retry-After.
            outcome(6, 3, Retryable, Some(429), Some(s(30)), false, 0),
            // 4: a success to an endpoint whose circuit was not clean.
            outcome(7, 4, Success, Some(200), None, true, 0),
            // 5: a timeout whose outcome the fence refused: not news.
            outcome(8, 5, Retryable, None, None, false, 0),
            // 6: refused before sending (no answer, no failure).
            outcome(9, 6, NoEndpoint, None, None, false, 0),
        ];
        let marked: Vec<Uuid> = (1..=9).filter(|&i| i != 8).map(Uuid::from_u128).collect();
        let news = circuit_news(&outcomes, &marked);
        type Row<'a> = (i64, i32, bool, Option<Duration>, Option<&'a str>);
        let got: Vec<Row> = news
            .iter()
            .map(|((company, _), n)| (*company, n.failed, n.answered, n.pause, n.error))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, 2, true, None, Some("error of 4")),
                (3, 1, false, Some(s(30)), Some("error of 6")),
                (4, 0, true, None, None),
            ]
        );
    }

    #[test]
    fn the_external_message_is_kept_on_every_outcome() {
        let policy = RetryPolicy::default();
        for verdict in [
            Verdict::Delivered {
                message: Some("m".into()),
            },
            Verdict::Rejected {
                message: Some("m".into()),
            },
            Verdict::Permanent {
                reason: "r".into(),
                message: Some("m".into()),
            },
            Verdict::Retry {
                reason: "r".into(),
                message: Some("m".into()),
                retry_after: None,
            },
        ] {
            let o = decide(
                &event(1, Duration::ZERO),
                verdict,
                SystemTime::now(),
                Duration::ZERO,
                None,
                &policy,
                0.5,
            );
            assert_eq!(o.response_message.as_deref(), Some("m"));
        }
    }
}
