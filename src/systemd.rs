//! Talking to systemd (`Type=notify`): READY=1 once the daemon can deliver,
//! STOPPING=1 when the drain starts, and WATCHDOG=1 pings from the delivery
//! loop itself, so that a loop that stops turning gets the unit restarted.
//!
//! Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Pings the watchdog at most every quarter of `WatchdogSec`, however often
/// [`Watchdog::ping`] is called; systemd restarts the unit when a whole
/// interval passes without one.
pub struct Watchdog {
    every: Option<Duration>,
    last: Option<Instant>,
}

impl Watchdog {
    /// From `WATCHDOG_USEC` (and `WATCHDOG_PID`), as systemd sets them.
    pub fn from_env() -> Watchdog {
        let every = sd_notify::watchdog_enabled().map(|interval| interval / 4);
        if let Some(every) = every {
            tracing::info!(ping_every = ?every, "systemd watchdog enabled");
        }
        Watchdog { every, last: None }
    }

    /// The longest the caller may go between two calls to [`Self::ping`].
    pub fn period(&self) -> Option<Duration> {
        self.every
    }

    pub fn ping(&mut self) {
        let Some(every) = self.every else { return };
        if self.last.is_none_or(|last| last.elapsed() >= every) {
            send(&[NotifyState::Watchdog]);
            self.last = Some(Instant::now());
        }
    }
}
