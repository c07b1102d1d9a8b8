//! What one delivery attempt came to: the event's next state and what to
//! write for it, or why it was not sent at all.

use std::time::{Duration, SystemTime};

use uuid::Uuid;

/// The event's next state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextState {
    Delivered,
    Failed,
    /// Back to pending, due after this delay.
    Retry(Duration),
    /// A probe that failed: back to pending as it was before (due at this
    /// moment, held with its endpoint), the attempt not counted against
    /// its retry budget. A held event fails at `circuit.max_hold`, not by
    /// probes.
    Held(SystemTime),
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
    /// The event was its endpoint's probe (see `ClaimedEvent::probe`).
    pub probe: bool,
}

impl Outcome {
    /// The request went out: there is a status, or it failed in transport
    /// (retryable without one). Otherwise it was refused before sending.
    pub fn went_out(&self) -> bool {
        self.http_status.is_some() || self.kind == AttemptKind::Retryable
    }
}

/// Why an event is not sent at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Claims count attempts, so an event whose deliveries keep dying with
    /// their daemon (leases running out) stops here instead of looping.
    #[error("gave up after {attempts} attempts without a recorded outcome (leases ran out)")]
    BudgetSpent { attempts: i32 },
    #[error("no endpoint configured for company {company_id} and event type {event_type}")]
    NoEndpoint { company_id: i64, event_type: String },
    #[error("the endpoint of company {company_id} for {event_type} is disabled")]
    Disabled { company_id: i64, event_type: String },
    /// The request could not be built (a payload or endpoint row written
    /// around the schema's checks): what was wrong with it.
    #[error("{0}")]
    Invalid(String),
}
