//! What the notification emails are made of: a failed event as an email
//! reports it, a digest of them, and an email claimed for sending.

use std::time::SystemTime;

/// One failed event, as the email reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEvent {
    pub id: uuid::Uuid,
    pub event_type: String,
    pub company_id: i64,
    pub payload: String,
    pub attempts: i32,
    /// What the external system said, if anything.
    pub response_message: Option<String>,
    /// outboxd's description of the failure.
    pub last_error: Option<String>,
    pub endpoint_url: String,
    pub first_attempt: Option<SystemTime>,
    pub last_attempt: Option<SystemTime>,
}

/// The failures an email reports: the first `notify::email::DIGEST_LISTED` in full, and
/// how many there are in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Oldest failure first; not empty.
    pub listed: Vec<FailedEvent>,
    /// All the email's events, listed or not.
    pub total: i64,
    /// When the oldest of all of them was created: where a listing of the
    /// rest starts.
    pub since: Option<SystemTime>,
}

/// A due email leased to this instance for sending.
#[derive(Debug, Clone)]
pub struct ClaimedEmail {
    pub id: i64,
    pub company_id: i64,
    pub event_type: String,
    pub recipients: Vec<String>,
    pub sent_to: Vec<String>,
    pub refused: Vec<String>,
    pub attempt: i32,
    /// failures (a digest of notifications), circuit_opened, circuit_closed,
    /// signing_stopped.
    pub kind: String,
    /// What a circuit or signing email reports, as JSON text.
    pub about: Option<String>,
}
