//! Talking to systemd (`Type=notify`): READY=1 as soon as the daemon is up
//! (with STATUS= saying whether it is delivering or waiting for the
//! database), STOPPING=1 when the drain starts, and WATCHDOG=1 from a ticker
//! that pings only while every loop that matters keeps its heartbeat's
//! promise (see [`crate::service`] for why promises rather than timestamps).
//!
//! Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::service::{Liveness, Stall};

/// Pings per `WatchdogSec`. Eight, so that a ping delayed by a busy machine
/// still comes well inside a quarter of the interval; a ping costs one
/// datagram.
const PINGS_PER_INTERVAL: u32 = 8;

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=` text, which may carry a server's error message: one line
/// (systemd would read a newline as the start of another `KEY=VALUE`), at
/// most 200 characters.
pub fn status(status: &str) {
    let line: String = status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    send(&[NotifyState::Status(&line)]);
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
    let every = (interval / PINGS_PER_INTERVAL).max(Duration::from_millis(1));
    tracing::info!(
        watchdog = %humantime::format_duration(interval),
        ping_every = %humantime::format_duration(every),
        "systemd watchdog enabled"
    );
    feed(&liveness, every, &stop, || send(&[NotifyState::Watchdog])).await;
}

/// The ticker: every `every`, `ping()` unless a heartbeat is stalled.
async fn feed(
    liveness: &Liveness,
    every: Duration,
    stop: &CancellationToken,
    mut ping: impl FnMut(),
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The time of the check, not the tick's schedule: a late tick must
        // not judge promises by an earlier clock.
        match liveness.stalled(Instant::now()) {
            None => {
                if let Some(Stall { name, .. }) = stalled.take() {
                    tracing::warn!(
                        r#loop = name,
                        "the loop is turning again; feeding the watchdog again"
                    );
                }
                ping();
            }
            Some(stall) => {
                if stalled.replace(stall) != Some(stall) {
                    let what = if stall.dead {
                        "a loop that matters has died"
                    } else {
                        "a loop has overstayed its own deadline"
                    };
                    tracing::error!(
                        r#loop = stall.name,
                        "{what}; no longer feeding systemd's watchdog, which restarts the daemon \
                         unless it recovers"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    // Paused clock: the ticker's interval and the promises share it.

    #[tokio::test(start_paused = true)]
    async fn pings_stop_while_a_promise_is_broken_and_resume_after() {
        const EVERY: Duration = Duration::from_millis(250);
        let liveness = Liveness::new();
        let beat = liveness.register("claim loop");
        let pings = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        let ticker = tokio::spawn({
            let (liveness, pings, stop) = (liveness.clone(), pings.clone(), stop.clone());
            async move {
                feed(&liveness, EVERY, &stop, || {
                    pings.fetch_add(1, Ordering::Relaxed);
                })
                .await
            }
        });
        let count = || pings.load(Ordering::Relaxed);
        // Promise 1 s (+ slack): pings while it holds.
        beat.within(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let while_kept = count();
        assert!(while_kept >= 8, "{while_kept} pings in 2 s");
        // Past 1 s + slack without a beat: no more pings.
        tokio::time::sleep(crate::service::PROMISE_SLACK).await;
        let at_stall = count();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(count(), at_stall, "no ping while the promise is broken");
        // The loop beats again: pings resume.
        beat.within(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(count() > at_stall, "pings resume");
        // A loop that dies stops them too.
        drop(beat);
        tokio::time::sleep(EVERY * 2).await;
        let at_death = count();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(count(), at_death, "no ping once a loop has died");
        stop.cancel();
        ticker.await.unwrap();
    }
}
