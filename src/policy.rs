//! What a finished attempt means for its event, pure: [`decide`] turns the
//! receiver's judged answer into the next state with the retry policy
//! ([`crate::backoff`]); [`refused`] does the same for an event that was
//! never sent ([`Refusal`]).

use std::time::{Duration, SystemTime};

use crate::backoff::{GiveUpReason, Next, RetryPolicy};
use crate::http::classify::{MAX_MESSAGE_CHARS, Verdict, truncate_chars};
use crate::model::{AttemptKind, ClaimedEvent, NextState, Outcome, Refusal};

/// Attempts an event gets while its endpoint answers 401, 403 or 404
/// ([`Verdict::Misconfigured`]): a credentials rollover or a route missing
/// during the receiver's deploy is over within minutes, a wrong setting is
/// not. With [`MISCONFIGURED_MIN_DELAY`] between them, about three minutes
/// of answers like that fail an event; an endpoint that answers so to every
/// event opens its circuit sooner (they count as failures there), and its
/// events are then held instead.
pub const MISCONFIGURED_ATTEMPTS: u32 = 3;

/// The least wait before another try after a 401, 403 or 404 (or
/// `retry.max_delay`, when that is shorter).
pub const MISCONFIGURED_MIN_DELAY: Duration = Duration::from_secs(60);

/// What an event refused before sending means (see [`crate::http::request::prepare`]):
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
        probe: event.probe,
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
    // A probe that failed as the endpoint fails (not answering, 5xx, 429,
    // 401/403/404): the circuit reopens, and the event goes back as it
    // was, held with its endpoint, its retry budget untouched. Held events
    // fail at `circuit.max_hold` (the hold limit), not one probe at a time
    // through the retry policy.
    if let (
        true,
        Some(due_at),
        Verdict::Retry {
            reason, message, ..
        },
    )
    | (true, Some(due_at), Verdict::Misconfigured { reason, message }) =
        (event.probe, event.due_at, &verdict)
    {
        return Outcome {
            event_id: event.id,
            company_id: event.company_id,
            event_type: event.event_type.clone(),
            age: event.age + duration,
            attempt: event.attempt,
            next: NextState::Held(due_at),
            kind: AttemptKind::Retryable,
            response_message: message.clone(),
            error: Some(truncate_chars(
                &format!("{reason} (a probe of an endpoint found down; the event stays held)"),
                MAX_MESSAGE_CHARS,
            )),
            started_at,
            duration,
            http_status,
            notify: false,
            pause,
            circuit_dirty: event.circuit_dirty,
            probe: event.probe,
        };
    }
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
        Verdict::Misconfigured { reason, message } => {
            let attempts = event.budget_attempt.max(1) as u32;
            let least = MISCONFIGURED_MIN_DELAY.min(policy.max_delay);
            let few = RetryPolicy {
                max_attempts: policy.max_attempts.min(MISCONFIGURED_ATTEMPTS),
                base_delay: policy.base_delay.max(least),
                max_delay: policy.max_delay.max(least),
                ..policy.clone()
            };
            match few.next(attempts, event.age, None, unit) {
                Next::RetryIn(delay) => (
                    NextState::Retry(delay),
                    AttemptKind::Retryable,
                    message,
                    Some(format!(
                        "{reason} (credentials or route; tried up to {} times)",
                        few.max_attempts
                    )),
                ),
                Next::GiveUp(_) => (
                    NextState::Failed,
                    AttemptKind::Permanent,
                    message,
                    Some(format!(
                        "gave up after {attempts} attempts answered {reason}: check the \
                         endpoint's credentials and URL"
                    )),
                ),
            }
        }
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
        probe: event.probe,
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

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
            due_at: None,
            circuit_dirty: false,
            destination: None,
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
    fn a_failed_probe_puts_its_event_back_held_without_spending_its_budget() {
        let policy = RetryPolicy::default();
        let due = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        // At the last attempt of its budget: a normal failure would fail it.
        let probe = ClaimedEvent {
            probe: true,
            due_at: Some(due),
            ..event(policy.max_attempts as i32, Duration::from_secs(60))
        };
        let at = SystemTime::UNIX_EPOCH;
        let s = Duration::from_secs;
        for verdict in [
            retry("timed out", None),
            Verdict::Misconfigured {
                reason: "HTTP 401".into(),
                message: None,
            },
        ] {
            let o = decide(&probe, verdict, at, s(1), None, &policy, 0.5);
            assert_eq!(o.next, NextState::Held(due));
            assert_eq!(o.kind, AttemptKind::Retryable, "the circuit reopens");
            assert!(!o.notify);
            assert!(o.error.unwrap().contains("stays held"));
        }
        // What is not a failure of the endpoint goes as for any event.
        let ok = Verdict::Delivered { message: None };
        assert_eq!(
            decide(&probe, ok, at, s(1), Some(200), &policy, 0.5).next,
            NextState::Delivered
        );
        let bad = Verdict::Permanent {
            reason: "HTTP 400".into(),
            message: None,
        };
        assert_eq!(
            decide(&probe, bad, at, s(1), Some(400), &policy, 0.5).next,
            NextState::Failed
        );
        // The same failure of an event that is not a probe fails it.
        let plain = event(policy.max_attempts as i32, s(60));
        let o = decide(
            &plain,
            retry("timed out", None),
            at,
            s(1),
            None,
            &policy,
            0.5,
        );
        assert_eq!(o.next, NextState::Failed);
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
            (1, s(0), Verdict::Permanent { reason: "HTTP 400".into(), message: None }, NextState::Failed, AttemptKind::Permanent, Some("HTTP 400")),
            // 401, 403, 404: three tries, a minute apart at least.
            (1, s(0), Verdict::Misconfigured { reason: "HTTP 401".into(), message: None }, NextState::Retry(s(60)), AttemptKind::Retryable, Some("HTTP 401 (credentials or route; tried up to 3 times)")),
            (2, s(60), Verdict::Misconfigured { reason: "HTTP 404".into(), message: None }, NextState::Retry(s(120)), AttemptKind::Retryable, Some("HTTP 404 (credentials")),
            (3, s(180), Verdict::Misconfigured { reason: "HTTP 403".into(), message: None }, NextState::Failed, AttemptKind::Permanent, Some("gave up after 3 attempts answered HTTP 403: check the endpoint's credentials and URL")),
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
