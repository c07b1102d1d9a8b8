//! The data every part of the daemon passes around, and nothing else: an
//! event as claimed ([`ClaimedEvent`], with its [`Endpoint`]), what one
//! attempt came to ([`Outcome`], [`Refusal`]), the payload of the Payment
//! Cancellation webhook, and [`Secret`]. It imports nothing of the daemon,
//! so every other module may use it and none of them is reached through it.

mod event;
mod notification;
mod outcome;
mod payload;

pub use event::{Auth, ClaimedEvent, Endpoint, EndpointKey, Secret, shown_url};
pub use notification::{ClaimedEmail, Digest, FailedEvent};
pub use outcome::{AttemptKind, NextState, Outcome, Refusal};
pub use payload::{PAYMENT_CANCELLATION, PaymentCancellation};
