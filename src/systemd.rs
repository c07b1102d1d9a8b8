//! Talking to systemd (`Type=notify`): READY=1 as soon as the daemon is up
//! (with STATUS= saying whether it is delivering or waiting for the
//! database), STOPPING=1 when the drain starts, and WATCHDOG=1 from a ticker
//! that pings only while every loop that matters keeps its heartbeat's
//! promise (see [`crate::service`] for why promises rather than timestamps).
//!
//! Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::service::Liveness;

/// Pings per `WatchdogSec`. Eight, so that a ping delayed by a busy machine
/// still comes well inside a quarter of the interval; a ping costs one
/// datagram.
const PINGS_PER_INTERVAL: u32 = 8;

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// With `WATCHDOG_USEC` set (systemd's `WatchdogSec=`), pings every eighth of
/// it while no heartbeat in `liveness` is stalled, until `stop`. A stalled
/// loop is logged once (and again if it recovers and stalls anew); systemd
/// then restarts the unit after `WatchdogSec` without a ping.
pub async fn watchdog(liveness: Liveness, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = interval / PINGS_PER_INTERVAL;
    tracing::info!(
        watchdog = %humantime::format_duration(interval),
        ping_every = %humantime::format_duration(every),
        "systemd watchdog enabled"
    );
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            now = tick.tick() => {
                match liveness.stalled(now) {
                    None => {
                        if let Some(name) = stalled.take() {
                            tracing::warn!(r#loop = name, "the loop is turning again; feeding the watchdog again");
                        }
                        send(&[NotifyState::Watchdog]);
                    }
                    Some(name) => {
                        if stalled.replace(name) != Some(name) {
                            tracing::error!(
                                r#loop = name,
                                "a loop has overstayed its own deadline; no longer feeding systemd's \
                                 watchdog, which restarts the daemon unless it recovers"
                            );
                        }
                    }
                }
            }
        }
    }
}
