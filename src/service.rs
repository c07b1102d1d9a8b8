//! The one shape of the daemon's background services, and the heartbeats
//! that tell systemd's watchdog whether the loops that matter still turn.
//!
//! A [`Service`] is a name, a tick, a limit on how long one tick may take and
//! a grace for stopping. [`spawn`] runs it: tick, wait for what the tick asked
//! for, tick again, until its stop signal; it beats the service's
//! [`Heartbeat`] before every wait and every tick. The mailer, the queue
//! gauges, retention, the metrics upkeep and the LISTEN connection are
//! services; the claim loop and the recorder are not (they are driven by
//! deliveries, not by a clock) but carry a heartbeat of their own.
//!
//! # Why heartbeats carry a promise
//!
//! A loop can legitimately be inside one await for a long time: a claim on a
//! slow database may take up to the statement timeout (30 s), a recorder
//! retrying through an outage sleeps up to 30 s, a mailer talks to a slow SMTP
//! server. A heartbeat that only says "I ran at time T" would need a
//! staleness limit longer than the slowest of those, which would then also be
//! how long a real hang goes unnoticed. Instead, before each wait a loop says
//! how long the wait may take at most ([`Heartbeat::within`]), and every such
//! wait is bounded in code by that same duration. The watchdog ticker
//! (`systemd::watchdog`) pings while every heartbeat's promise holds, so pings
//! keep coming through a backlog, slow receivers or a slow claim, and stop
//! when a loop overstays its own bound (a bug: an await without a deadline, a
//! deadlock, a blocked runtime thread) or has died (its heartbeat dropped
//! without being retired, e.g. a panic). A loop waiting for work that only
//! others can bring (the recorder with no outcomes) promises nothing
//! ([`Heartbeat::idle`]).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Added to every promise: how late a loop may be before it counts as stuck.
/// Covers scheduling delays on a loaded machine; a real hang is noticed this
/// much later, and systemd acts a `WatchdogSec` after that.
pub const PROMISE_SLACK: Duration = Duration::from_secs(5);

/// A service's [`Service::stop_grace`] unless it says otherwise.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(1);

/// `due` values with a meaning of their own (others are milliseconds since
/// the [`Liveness`] was made).
const IDLE: u64 = u64::MAX;
const DEAD: u64 = 0;

/// Every heartbeat of one daemon.
#[derive(Clone)]
pub struct Liveness {
    origin: Instant,
    beats: Arc<Mutex<Vec<Arc<Beat>>>>,
}

struct Beat {
    name: &'static str,
    /// By when the loop promised to beat again, in ms since `origin`.
    due: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness::new()
    }
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness {
            origin: Instant::now(),
            beats: Arc::default(),
        }
    }

    /// A heartbeat for the loop `name`, promising nothing yet.
    pub fn register(&self, name: &'static str) -> Heartbeat {
        let beat = Arc::new(Beat {
            name,
            due: AtomicU64::new(IDLE),
        });
        self.beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(beat.clone());
        Heartbeat {
            beat,
            origin: self.origin,
            retired: false,
        }
    }

    /// The first loop whose promise is broken at `now`, if any.
    pub fn stalled(&self, now: Instant) -> Option<Stall> {
        let now = self.ms(now);
        let beats = self.beats.lock().unwrap_or_else(PoisonError::into_inner);
        beats
            .iter()
            .find_map(|b| match b.due.load(Ordering::Relaxed) {
                DEAD => Some(Stall {
                    name: b.name,
                    dead: true,
                }),
                due if due < now => Some(Stall {
                    name: b.name,
                    dead: false,
                }),
                _ => None,
            })
    }

    fn ms(&self, at: Instant) -> u64 {
        // +1 so that no live promise is ever DEAD.
        at.saturating_duration_since(self.origin).as_millis() as u64 + 1
    }
}

/// A loop that broke its promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    pub name: &'static str,
    /// It ended without being retired (a panic, an early return), rather
    /// than overstaying a wait.
    pub dead: bool,
}

/// One loop's promise to turn again soon. Dropping it without
/// [`Heartbeat::retire`] (a panic, an early return) marks the loop dead.
pub struct Heartbeat {
    beat: Arc<Beat>,
    origin: Instant,
    retired: bool,
}

impl Heartbeat {
    /// The loop will beat again within `bound` (plus [`PROMISE_SLACK`]).
    pub fn within(&self, bound: Duration) {
        let due = Instant::now() + bound.min(Duration::from_secs(24 * 3600)) + PROMISE_SLACK;
        let ms = due.saturating_duration_since(self.origin).as_millis() as u64 + 1;
        self.beat.due.store(ms, Ordering::Relaxed);
    }

    /// The loop waits for work that only others can bring: no promise.
    pub fn idle(&self) {
        self.beat.due.store(IDLE, Ordering::Relaxed);
    }

    /// The loop ended as it should (shutdown): it no longer counts.
    pub fn retire(mut self) {
        self.retired = true;
        self.idle();
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if !self.retired {
            self.beat.due.store(DEAD, Ordering::Relaxed);
        }
    }
}

/// When a service wants its next tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// More work is waiting: tick again at once.
    Now,
    /// Tick again after this long.
    After(Duration),
}

/// A background service: a name, a bounded tick, a grace for stopping.
/// Each tick handles (logs, counts) its own failures and says when it wants
/// the next one.
pub trait Service: Send + 'static {
    /// For logs and the heartbeat.
    const NAME: &'static str;

    /// Longest one tick may take; past it the tick is abandoned (it is
    /// cancelled at its next await) and the next one starts after
    /// [`Self::after_overrun`].
    fn tick_limit(&self) -> Duration;

    /// How long a tick that is running when the stop signal comes may go on
    /// before it is abandoned; zero for a tick that only waits.
    fn stop_grace(&self) -> Duration {
        DEFAULT_STOP_GRACE
    }

    /// Wait before the tick that follows an abandoned one.
    fn after_overrun(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn tick(&mut self) -> impl Future<Output = Next> + Send;
}

/// A service running on its own task.
pub struct Running {
    name: &'static str,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Asks the service to stop: a wait ends at once, a tick gets its grace.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stops the service and waits until it has (at most its grace, plus the
    /// time to reach the tick's next await).
    pub async fn join(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            if e.is_panic() {
                tracing::error!(service = self.name, error = %e, "service panicked");
            }
        }
    }
}

/// Starts `service` on a task of its own, ticking until stopped.
pub fn spawn<S: Service>(mut service: S, liveness: &Liveness) -> Running {
    let stop = CancellationToken::new();
    let heartbeat = liveness.register(S::NAME);
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.is_cancelled() {
                let limit = service.tick_limit();
                let grace = service.stop_grace();
                let after_overrun = service.after_overrun();
                heartbeat.within(limit);
                let next = {
                    // A panic in one tick is a bug, but it must not take the
                    // service (and with its heartbeat, the daemon) down:
                    // logged, and treated like an overrun.
                    let tick = tokio::time::timeout(
                        limit,
                        AssertUnwindSafe(service.tick()).catch_unwind(),
                    );
                    tokio::pin!(tick);
                    tokio::select! {
                        next = &mut tick => next,
                        _ = stop.cancelled() => {
                            heartbeat.within(grace);
                            match tokio::time::timeout(grace, &mut tick).await {
                                Ok(_) => {}
                                // No grace: dropping the tick is by design.
                                Err(_) if grace.is_zero() => {}
                                Err(_) => tracing::warn!(
                                    service = S::NAME,
                                    grace = %humantime::format_duration(grace),
                                    "stopping: abandoned a tick still running after its grace"
                                ),
                            }
                            break;
                        }
                    }
                };
                let wait = match next {
                    Ok(Ok(Next::Now)) => continue,
                    Ok(Ok(Next::After(wait))) => wait,
                    Ok(Err(panic)) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(service = S::NAME, panic = %what, "a tick panicked; the service goes on");
                        after_overrun
                    }
                    Err(_) => {
                        tracing::warn!(
                            service = S::NAME,
                            limit = %humantime::format_duration(limit),
                            "a tick took longer than its limit and was abandoned"
                        );
                        after_overrun
                    }
                };
                heartbeat.within(wait);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            heartbeat.retire();
        }
    });
    Running {
        name: S::NAME,
        stop,
        task,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    // Paused clock: time moves only as the test (or a sleep) moves it.

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[tokio::test(start_paused = true)]
    async fn a_promise_holds_until_its_bound_and_slack_pass() {
        let liveness = Liveness::new();
        let beat = liveness.register("claim");
        beat.within(S(30));
        tokio::time::advance(S(30) + PROMISE_SLACK - Duration::from_millis(10)).await;
        assert_eq!(liveness.stalled(Instant::now()), None);
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(
            liveness.stalled(Instant::now()),
            Some(Stall {
                name: "claim",
                dead: false
            })
        );
        // Beating again heals it.
        beat.within(S(1));
        assert_eq!(liveness.stalled(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_retired_loops_promise_nothing_and_a_dropped_one_is_dead() {
        let liveness = Liveness::new();
        let idle = liveness.register("recorder");
        let retired = liveness.register("listener");
        let dropped = liveness.register("mailer");
        idle.within(S(1));
        idle.idle();
        retired.within(S(1));
        retired.retire();
        dropped.within(S(3600));
        tokio::time::advance(S(3600)).await;
        assert_eq!(liveness.stalled(Instant::now()), None);
        drop(dropped);
        assert_eq!(
            liveness.stalled(Instant::now()),
            Some(Stall {
                name: "mailer",
                dead: true
            })
        );
    }

    /// Ticks: the first overruns its limit, the second panics, the others
    /// return `After(10s)`.
    struct Ticker {
        ticks: Arc<AtomicU32>,
    }

    impl Service for Ticker {
        const NAME: &'static str = "ticker";
        fn tick_limit(&self) -> Duration {
            S(2)
        }
        async fn tick(&mut self) -> Next {
            match self.ticks.fetch_add(1, Ordering::Relaxed) {
                0 => tokio::time::sleep(S(3600)).await,
                1 => panic!("a bug in one tick"),
                _ => {}
            }
            Next::After(S(10))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_past_its_limit_or_panicking_is_abandoned_and_the_service_goes_on() {
        let liveness = Liveness::new();
        let ticks = Arc::new(AtomicU32::new(0));
        let running = spawn(
            Ticker {
                ticks: ticks.clone(),
            },
            &liveness,
        );
        // Ticks at 0 s (abandoned at its 2 s limit), 3 s (1 s after the
        // overrun; panics), 4 s (1 s after that), 14 s and 24 s.
        tokio::time::sleep(S(24) + Duration::from_millis(1)).await;
        assert_eq!(ticks.load(Ordering::Relaxed), 5);
        assert_eq!(liveness.stalled(Instant::now()), None);
        let stopped = Instant::now();
        running.join().await;
        assert_eq!(
            stopped.elapsed(),
            Duration::ZERO,
            "a waiting service stops at once"
        );
    }

    /// A tick that never ends by itself.
    struct Stuck;

    impl Service for Stuck {
        const NAME: &'static str = "stuck";
        fn tick_limit(&self) -> Duration {
            S(3600)
        }
        fn stop_grace(&self) -> Duration {
            S(5)
        }
        async fn tick(&mut self) -> Next {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_mid_tick_waits_out_the_grace_at_most() {
        let liveness = Liveness::new();
        let running = spawn(Stuck, &liveness);
        tokio::time::sleep(S(1)).await;
        let stopped = Instant::now();
        running.join().await;
        assert_eq!(stopped.elapsed(), S(5));
        assert_eq!(
            liveness.stalled(Instant::now() + S(86_400)),
            None,
            "retired"
        );
    }
}
