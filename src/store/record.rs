//! Marking events: the outcomes of many deliveries written in one fenced
//! round trip (`sql/queries/record.sql`, which also queues a notification
//! for each final failure), and the circuit breakers of their endpoints
//! moved by what the group says of them (`circuits_record.sql`); why the
//! fence refused an outcome, when it did (`fence_reasons.sql`).

use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::config::CircuitConfig;
use crate::model::{AttemptKind, NextState, Outcome};
use crate::store::error::{self, ErrorKind};
use crate::store::pool as db;
use crate::store::txn;
use crate::telemetry;

const RECORD_SQL: &str = include_str!("../../sql/queries/record.sql");
const CIRCUITS_SQL: &str = include_str!("../../sql/queries/circuits_record.sql");
const PROBE_AGAIN_SQL: &str = include_str!("../../sql/queries/circuit_probe_again.sql");
const FENCE_REASONS_SQL: &str = include_str!("../../sql/queries/fence_reasons.sql");

/// No retry is put further out than this, whatever the policy computed: the
/// database's interval type and the people waiting both have limits.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
#[error("recording delivery outcomes: {message}")]
pub struct RecordError {
    pub message: String,
    /// What retrying can do about it ([`ErrorKind`]).
    pub kind: ErrorKind,
}

impl From<tokio_postgres::Error> for RecordError {
    fn from(e: tokio_postgres::Error) -> RecordError {
        RecordError {
            message: db::describe(&e),
            kind: error::kind(&e),
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

/// Why the fence refused an outcome, as `fence_reasons.sql` found the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceReason {
    /// The row is gone (deleted).
    Gone,
    /// The row has fewer attempts than this outcome's: the claim of this
    /// attempt is not in the database (lost with a primary that failed
    /// before it reached a standby, or in a crash).
    Unclaimed,
    /// The row was claimed again since: this attempt's lease had ended
    /// (run out, or handed back).
    ClaimedAgain,
    /// At this attempt, the row no longer carries this instance's lease
    /// (marked by another writer, or changed while this one wrote).
    NotLeased,
}

impl FenceReason {
    fn from_sql(code: &str) -> FenceReason {
        match code {
            "gone" => FenceReason::Gone,
            "unclaimed" => FenceReason::Unclaimed,
            "claimed_again" => FenceReason::ClaimedAgain,
            _ => FenceReason::NotLeased,
        }
    }
}

/// An outcome the fence refused, and what the row said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub id: Uuid,
    pub reason: FenceReason,
    /// The row's attempts and state (None: the row is gone).
    pub attempts: Option<i32>,
    pub state: Option<String>,
}

/// What one write did.
#[derive(Debug, Default)]
pub struct Written {
    /// The ids whose rows were marked; the others were left alone.
    pub marked: Vec<Uuid>,
    /// The outcomes the fence refused, with the reason.
    pub fenced: Vec<Fenced>,
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
    let mut held_due_at = Vec::with_capacity(n);
    for o in outcomes {
        ids.push(o.event_id);
        attempts.push(o.attempt);
        let (state, delay, held) = match o.next {
            NextState::Delivered => ("delivered", None, None),
            NextState::Failed => ("failed", None, None),
            // Set for later: `scheduled` until it comes due (migration 0013).
            NextState::Retry(d) => (
                "scheduled",
                Some(d.min(MAX_RETRY_DELAY).as_millis() as i64),
                None,
            ),
            NextState::Held(due_at) => ("pending", None, Some(due_at)),
        };
        held_due_at.push(held);
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
    // Committed in its own explicit transaction (store::txn): only a
    // known commit makes these ids marked; an error is retried with
    // `again`.
    let rows = txn::query_committed(
        client,
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
            &held_due_at,
        ],
    )
    .await?;
    let mut written = Written {
        marked: rows.iter().map(|r| r.get(0)).collect(),
        ..Written::default()
    };
    // What this statement marked itself: the circuits' news. An outcome an
    // earlier try of this group marked may have moved its circuit already
    // (a try that timed out after the circuits' statement); missing one
    // group's news is the lesser harm (the next failures still count),
    // counting it twice would open or back off a circuit too soon.
    let applied_now: Vec<Uuid> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1))
        .map(|r| r.get(0))
        .collect();
    // Best effort, and only when the fence refused some: why, for the log.
    if written.marked.len() < outcomes.len() {
        match fence_reasons(client, outcomes, &written.marked).await {
            Ok(fenced) => written.fenced = fenced,
            Err(e) => {
                telemetry::database_error("record");
                tracing::warn!(error = %db::describe(&e), "reading why the fence refused outcomes");
            }
        }
    }
    // Best effort: the outcomes are written, and a circuit that misses one
    // group's news still opens on the next failures.
    match write_circuits(client, outcomes, &applied_now, circuit, notify_window).await {
        Ok(changes) => written.circuits = changes,
        Err(e) => {
            telemetry::database_error("record");
            tracing::warn!(error = %db::describe(&e), "updating the circuit breakers of a group of outcomes");
        }
    }
    if let Err(e) = probe_again(client, outcomes, &written.marked).await {
        telemetry::database_error("record");
        tracing::warn!(error = %db::describe(&e), "reopening circuits whose probe was not sent");
    }
    Ok(written)
}

/// Probes that said nothing of their endpoint (refused before they were
/// sent, or answered with a 4xx about the event itself, such as 400) leave
/// their circuit half-open with no probe out: it goes back to open, due
/// for another probe at once (`circuit_probe_again.sql`). No statement
/// unless the group has such a probe.
async fn probe_again(
    client: &deadpool_postgres::Client,
    outcomes: &[Outcome],
    marked: &[Uuid],
) -> Result<(), tokio_postgres::Error> {
    let unsent: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| {
            o.probe
                && !matches!(
                    o.kind,
                    AttemptKind::Retryable | AttemptKind::Success | AttemptKind::Rejected
                )
        })
        .filter(|o| marked.contains(&o.event_id))
        .collect();
    if unsent.is_empty() {
        return Ok(());
    }
    let companies: Vec<i64> = unsent.iter().map(|o| o.company_id).collect();
    let event_types: Vec<&str> = unsent.iter().map(|o| o.event_type.as_str()).collect();
    let statement = client.prepare_cached(PROBE_AGAIN_SQL).await?;
    client
        .execute(&statement, &[&companies, &event_types])
        .await?;
    Ok(())
}

/// Why the fence refused those of `outcomes` not in `marked`
/// (`sql/queries/fence_reasons.sql`), as their rows are now.
async fn fence_reasons(
    client: &deadpool_postgres::Client,
    outcomes: &[Outcome],
    marked: &[Uuid],
) -> Result<Vec<Fenced>, tokio_postgres::Error> {
    let marked: std::collections::HashSet<&Uuid> = marked.iter().collect();
    let (ids, attempts): (Vec<Uuid>, Vec<i32>) = outcomes
        .iter()
        .filter(|o| !marked.contains(&o.event_id))
        .map(|o| (o.event_id, o.attempt))
        .unzip();
    let statement = client.prepare_cached(FENCE_REASONS_SQL).await?;
    let rows = client.query(&statement, &[&ids, &attempts]).await?;
    Ok(rows
        .iter()
        .map(|row| Fenced {
            id: row.get("id"),
            reason: FenceReason::from_sql(row.get("fenced")),
            attempts: row.get("attempts_now"),
            state: row.get("state_now"),
        })
        .collect())
}

/// What one endpoint's outcomes in a group say about it.
#[derive(Debug, Default, PartialEq)]
struct EndpointNews<'a> {
    /// Retryable failures after its last answer in the group (all of them
    /// without one): "timeouts, then a success" is an endpoint that works.
    failed: i32,
    answered: bool,
    /// What its probe came to, if the group has it: failed, answered,
    /// other (only the probe moves a circuit that is not closed).
    probe: Option<&'static str>,
    /// When it last answered, and when each retryable failure started.
    answered_at: Option<SystemTime>,
    failures_at: Vec<SystemTime>,
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
        let answer = matches!(o.kind, AttemptKind::Success | AttemptKind::Rejected);
        if o.kind == AttemptKind::Retryable {
            n.failures_at.push(o.started_at);
            if n.last_failure_at.is_none_or(|at| o.started_at >= at) {
                n.last_failure_at = Some(o.started_at);
                n.error = o.error.as_deref();
            }
        } else if answer {
            // Only an answer to the webhook itself says the endpoint works:
            // a 4xx that retrying cannot fix (400, 422) does not close an
            // open circuit, nor clear the count of failures.
            n.answered = true;
            n.answered_at = n.answered_at.max(Some(o.started_at));
        }
        if o.probe {
            n.probe = Some(match o.kind {
                AttemptKind::Retryable => "failed",
                _ if answer => "answered",
                _ => "other",
            });
        }
        n.pause = n.pause.max(o.pause);
        n.dirty |= o.circuit_dirty;
    }
    for n in news.values_mut() {
        let after = n.answered_at;
        n.failed = n
            .failures_at
            .iter()
            .filter(|at| after.is_none_or(|answered| **at > answered))
            .count() as i32;
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
    let mut probes = Vec::with_capacity(news.len());
    for ((company, event_type), n) in &news {
        probes.push(n.probe);
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
                &probes,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_endpoints_with_news_for_their_circuit_are_written() {
        let s = Duration::from_secs;
        let at = |secs| SystemTime::UNIX_EPOCH + s(secs);
        let outcome = |id: u128, company: i64, kind, status, pause, dirty, secs| Outcome {
            probe: false,
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
            // 2: two timeouts, a 400 answer (not news) and a rejection (an
            // answer); the later timeout's error.
            outcome(3, 2, Retryable, None, None, false, 5),
            outcome(4, 2, Retryable, None, None, false, 9),
            outcome(5, 2, Permanent, Some(400), None, false, 1),
            outcome(10, 2, Rejected, Some(200), None, false, 1),
            // 3: a 429 with Retry-After.
            outcome(6, 3, Retryable, Some(429), Some(s(30)), false, 0),
            // 4: a success to an endpoint whose circuit was not clean.
            outcome(7, 4, Success, Some(200), None, true, 0),
            // 5: a timeout whose outcome the fence refused: not news.
            outcome(8, 5, Retryable, None, None, false, 0),
            // 6: refused before sending (no answer, no failure).
            outcome(9, 6, NoEndpoint, None, None, false, 0),
            // 7: a 400 to a probe (circuit not clean): no answer that
            // closes it.
            Outcome {
                probe: true,
                ..outcome(11, 7, Permanent, Some(400), None, true, 0)
            },
            // 8: a timeout, then an answer: the endpoint works; no failure
            // counts. And a late answer to an endpoint whose probe failed:
            // the probe's news is what moves its circuit.
            outcome(12, 8, Retryable, None, None, false, 1),
            outcome(13, 8, Success, Some(200), None, false, 5),
            Outcome {
                probe: true,
                ..outcome(14, 9, Retryable, None, None, true, 3)
            },
            outcome(15, 9, Success, Some(200), None, true, 1),
        ];
        let marked: Vec<Uuid> = (1..=15).filter(|&i| i != 8).map(Uuid::from_u128).collect();
        let news = circuit_news(&outcomes, &marked);
        type Row<'a> = (
            i64,
            i32,
            bool,
            Option<Duration>,
            Option<&'a str>,
            Option<&'a str>,
        );
        let got: Vec<Row> = news
            .iter()
            .map(|((company, _), n)| (*company, n.failed, n.answered, n.pause, n.error, n.probe))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, 2, true, None, Some("error of 4"), None),
                (3, 1, false, Some(s(30)), Some("error of 6"), None),
                (4, 0, true, None, None, None),
                (7, 0, false, None, None, Some("other")),
                // 8: nothing to learn (its failure came before an answer).
                (9, 1, true, None, Some("error of 14"), Some("failed")),
            ]
        );
    }
}
