//! Whether the delivery pipeline gets anything done: when a claim last
//! succeeded, how long the oldest outcome has waited to be written, and
//! which outcomes the recorder had to set aside. The claim loop and the
//! recorder write it; `/readyz`, the metrics and the claim loop itself read
//! it.
//!
//! The watchdog ([`crate::service`]) knows that the loops turn; this knows
//! that their turns achieve something. A recorder whose every write is
//! refused (a privilege revoked, a trigger that raises) keeps its promises
//! and feeds the watchdog, and without this the instance would look healthy
//! while its events wait for their leases to run out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long without a successful claim, or with an outcome waiting to be
/// written, before the instance reports itself not ready. Above any
/// legitimate gap: claims come every `delivery.poll_interval` (1 s) and
/// also while every slot is busy, an outcome is written within
/// milliseconds, and a brief database hiccup (a restart, a failover) is
/// over well within it. Below the lease (60 s), after which another
/// instance takes the events again.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);

/// `at` values with a meaning of their own (others are milliseconds since
/// the [`Progress`] was made, plus one).
const NEVER: u64 = 0;
const NONE: u64 = u64::MAX;

/// What the pipeline has got done lately (see the module).
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    /// When a claim last succeeded (or the loop found every slot busy).
    claimed_at: AtomicU64,
    /// Since when the oldest outcome not yet written has waited (NONE:
    /// nothing waits).
    unrecorded_since: AtomicU64,
    /// What is wrong, as the last failure said it.
    problems: Mutex<Problems>,
}

#[derive(Debug, Default)]
struct Problems {
    /// The last claim failed, and why.
    claim: Option<String>,
    /// Outcomes set aside by the recorder, and the last reason.
    set_aside: usize,
    set_aside_reason: String,
    /// Every write since the first outcome was set aside failed too.
    recording_blocked: bool,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress::new()
    }
}

impl Progress {
    pub fn new() -> Progress {
        let progress = Progress {
            origin: Instant::now(),
            claimed_at: AtomicU64::new(NEVER),
            unrecorded_since: AtomicU64::new(NONE),
            problems: Mutex::default(),
        };
        // Starting counts as a claim: the limit runs from here.
        progress
            .claimed_at
            .store(progress.ms(Instant::now()), Ordering::Relaxed);
        progress
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64 + 1
    }

    fn since(&self, at: u64, now: Instant) -> Duration {
        Duration::from_millis(self.ms(now).saturating_sub(at))
    }

    fn problems(&self) -> std::sync::MutexGuard<'_, Problems> {
        self.problems.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A claim succeeded, or every delivery slot was busy (the loop had
    /// nothing to claim with, which is progress too).
    pub fn claimed(&self) {
        self.claimed_at
            .store(self.ms(Instant::now()), Ordering::Relaxed);
        let mut problems = self.problems();
        if problems.claim.is_some() {
            problems.claim = None;
        }
    }

    /// A claim failed.
    pub fn claim_failed(&self, reason: &str) {
        self.problems().claim = Some(reason.to_string());
    }

    /// How long since a claim last succeeded.
    pub fn claim_age(&self, now: Instant) -> Duration {
        self.since(self.claimed_at.load(Ordering::Relaxed), now)
    }

    /// The recorder's oldest outcome not yet written has waited since
    /// `since` (None: every outcome handed over is written).
    pub fn unrecorded_since(&self, since: Option<Instant>) {
        let at = since.map_or(NONE, |at| self.ms(at));
        self.unrecorded_since.store(at, Ordering::Relaxed);
    }

    /// How long the oldest outcome not yet written has waited.
    pub fn unrecorded_age(&self, now: Instant) -> Option<Duration> {
        match self.unrecorded_since.load(Ordering::Relaxed) {
            NONE => None,
            at => Some(self.since(at, now)),
        }
    }

    /// The recorder holds `count` outcomes it could not write; `blocked`:
    /// no write has succeeded since the oldest of them was set aside.
    pub fn set_aside(&self, count: usize, reason: Option<&str>, blocked: bool) {
        let mut problems = self.problems();
        problems.set_aside = count;
        if let Some(reason) = reason {
            problems.set_aside_reason = reason.to_string();
        }
        problems.recording_blocked = blocked && count > 0;
    }

    pub fn set_aside_count(&self) -> usize {
        self.problems().set_aside
    }

    /// Nothing can be recorded at the moment: claiming more would only
    /// send events whose outcomes are lost, to be sent again after their
    /// leases.
    pub fn recording_blocked(&self) -> bool {
        self.problems().recording_blocked
    }

    /// Why the instance is not doing its work, if it is not: what `/readyz`
    /// answers.
    pub fn problem(&self, now: Instant) -> Option<String> {
        let problems = self.problems();
        if problems.set_aside > 0 {
            return Some(format!(
                "{} delivery outcome(s) could not be recorded and wait to be written again: {}",
                problems.set_aside, problems.set_aside_reason
            ));
        }
        if let Some(age) = self.unrecorded_age(now).filter(|a| *a > STALL_LIMIT) {
            return Some(format!(
                "a delivery outcome has waited {}s to be recorded",
                age.as_secs()
            ));
        }
        let age = self.claim_age(now);
        if age > STALL_LIMIT {
            return Some(match &problems.claim {
                Some(reason) => format!("no claim has succeeded for {}s: {reason}", age.as_secs()),
                None => format!("no claim for {}s", age.as_secs()),
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stall_shows_after_the_limit_and_set_aside_outcomes_at_once() {
        let progress = Progress::new();
        let start = Instant::now();
        assert_eq!(progress.problem(start), None);
        // Claims fail: not a problem until the limit has passed.
        progress.claim_failed("permission denied for table events");
        assert_eq!(progress.problem(start + STALL_LIMIT), None);
        let later = start + STALL_LIMIT + Duration::from_secs(1);
        assert_eq!(
            progress.problem(later).as_deref(),
            Some("no claim has succeeded for 31s: permission denied for table events")
        );
        tokio::time::advance(STALL_LIMIT + Duration::from_secs(1)).await;
        progress.claimed();
        assert_eq!(progress.problem(Instant::now()), None);

        // An outcome waiting: a problem after the limit.
        let now = Instant::now();
        progress.unrecorded_since(Some(now));
        assert_eq!(progress.problem(now + STALL_LIMIT), None);
        assert!(
            progress
                .problem(now + STALL_LIMIT * 2)
                .is_some_and(|p| p.contains("waited 60s to be recorded"))
        );
        progress.unrecorded_since(None);
        assert_eq!(progress.unrecorded_age(now), None);

        // Set aside: a problem at once, blocked only while nothing writes.
        progress.set_aside(2, Some("a trigger raised"), true);
        assert!(progress.recording_blocked());
        assert!(progress.problem(now).is_some_and(
            |p| p.starts_with("2 delivery outcome(s)") && p.ends_with("a trigger raised")
        ));
        progress.set_aside(1, None, false);
        assert!(!progress.recording_blocked());
        progress.set_aside(0, None, true);
        assert!(!progress.recording_blocked());
        assert_eq!(progress.problem(now), None);
    }
}
