//! One delivery attempt, in the order it happens:
//!
//! 1. prepare: decide whether the event may be sent at all and build the
//!    request ([`webhook::prepare`], the one place for refusals);
//! 2. send it ([`Deliverer::send`]: one deadline, a capped body);
//! 3. judge the answer (`Sent::verdict`, which [`crate::http::classify`] decides);
//! 4. decide the event's next state ([`policy::decide`], or
//!    [`policy::refused`] when step 1 refused).
//!
//! [`deliver`] runs one on its own task and hands the outcome to the
//! recorder, which writes it ([`crate::pipeline::completer::Recorder::run`]).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::backoff::RetryPolicy;
use crate::http::client::Deliverer;
use crate::http::request as webhook;
use crate::model::{ClaimedEvent, NextState, Outcome};
use crate::pipeline::completer::Freed;
use crate::{policy, telemetry};

/// What every delivery task shares.
pub struct Context {
    pub deliverer: Deliverer,
    pub retry: RetryPolicy,
    /// To the recorder.
    pub outcomes: mpsc::Sender<Outcome>,
    /// Requests in flight per endpoint, for the cap.
    pub room: Arc<dyn Freed>,
}

/// One event on its own task: the attempt, then the outcome to the
/// recorder. The delivery slot is released only once the recorder has
/// accepted the outcome. The attempt is bounded by the one deadline
/// [`Deliverer::send`] puts around the whole request
/// (`delivery.request_timeout`); the rest of it is computation. A second
/// timer around it would only repeat that one, at a cost on every event.
pub async fn deliver(event: ClaimedEvent, context: Arc<Context>, slot: OwnedSemaphorePermit) {
    // The recorder gives the endpoint's place under the cap back once the
    // outcome is written (so that a circuit it opens, or a Retry-After, is
    // seen by the next claim). Without an outcome for it (the task
    // panicked, or the recorder is gone) this does.
    struct Unrecorded<'a>(&'a Context, &'a ClaimedEvent, bool);
    impl Drop for Unrecorded<'_> {
        fn drop(&mut self) {
            if self.2 {
                self.0
                    .room
                    .finished(&[(self.1.company_id, &self.1.event_type)]);
            }
        }
    }
    // The destination's place is free as soon as the request is over (or
    // the task panicked): a destination has nothing of its own that the
    // next claim must see written first.
    struct Requested<'a> {
        context: &'a Context,
        event: &'a ClaimedEvent,
        started: Instant,
        went_out: bool,
    }
    impl Drop for Requested<'_> {
        fn drop(&mut self) {
            if let Some(destination) = &self.event.destination {
                self.context.room.request_ended(
                    destination,
                    self.event.id,
                    self.started.elapsed(),
                    self.went_out,
                );
            }
        }
    }
    let mut unrecorded = Unrecorded(&context, &event, true);
    let mut requested = Requested {
        context: &context,
        event: &event,
        started: Instant::now(),
        went_out: false,
    };
    let outcome = attempt(&event, &context.deliverer, &context.retry).await;
    requested.went_out = outcome.went_out();
    drop(requested);
    // Fails only if the recorder is gone, i.e. at the very end of a
    // shutdown; the lease then brings the event back.
    unrecorded.2 = context.outcomes.send(outcome).await.is_err();
    drop(unrecorded);
    drop(slot);
}

/// Runs one attempt of `event` and returns what to record; logs and counts
/// it on the way.
pub async fn attempt(event: &ClaimedEvent, deliverer: &Deliverer, retry: &RetryPolicy) -> Outcome {
    let outcome = match webhook::prepare(event, retry.max_attempts) {
        Err(refusal) => policy::refused(event, &refusal),
        Ok(request) => {
            let sent = deliverer.send(&request).await;
            let verdict = sent.verdict(SystemTime::now());
            policy::decide(
                event,
                verdict,
                sent.started_at,
                sent.duration,
                sent.http_status(),
                retry,
                fastrand::f64(),
            )
        }
    };
    log_outcome(event, &outcome);
    telemetry::attempt(
        &event.event_type,
        outcome.kind.as_str(),
        outcome.went_out().then_some(outcome.duration),
    );
    outcome
}

/// One line per delivery attempt. Successes at debug: at 10,000 a second an
/// info line each would cost more than the delivery itself and flood the
/// journal, and the metrics count them anyway. Retries at info, final
/// failures at warn.
fn log_outcome(event: &ClaimedEvent, outcome: &Outcome) {
    let retry_in = match outcome.next {
        NextState::Retry(d) => Some(humantime::format_duration(d).to_string()),
        NextState::Held(_) => {
            Some("when its endpoint's circuit lets the next probe go".to_string())
        }
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
        NextState::Delivered => line!(debug, "delivered"),
        NextState::Retry(_) => line!(info, "retry"),
        NextState::Held(_) => line!(info, "held"),
        NextState::Failed => line!(warn, "failed"),
    }
}
