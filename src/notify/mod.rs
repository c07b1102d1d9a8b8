//! Emails about failed events and circuits: the [`mailer`] service gathers
//! notifications into throttled emails and sends them, with [`email`] (what
//! an email says, pure) and [`smtp`] (mail-send, one SMTP transaction per
//! recipient).

pub mod email;
pub mod mailer;
pub mod smtp;
