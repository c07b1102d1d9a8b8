//! When to try a failed delivery again: exponential backoff with jitter,
//! bounded by an attempt count and by the event's age, never earlier than the
//! receiver's Retry-After (within a bound).
//!
//! Pure arithmetic: the caller passes the attempt number, the event's age and
//! a random number, so every schedule can be tested exactly.

use std::time::Duration;

/// Retry schedule.
///
/// After failed attempt `n` the next one waits `base_delay * 2^(n-1)`, capped
/// at `max_delay`, then scaled by a random factor in `1 ± jitter`. With the
/// defaults (5s base, 1h cap, 12 attempts) the un-jittered schedule is:
///
/// | retry | delay      | cumulative |
/// |------:|-----------:|-----------:|
/// |     1 |         5s |         5s |
/// |     2 |        10s |        15s |
/// |     3 |        20s |        35s |
/// |     4 |        40s |     1m 15s |
/// |     5 |     1m 20s |     2m 35s |
/// |     6 |     2m 40s |     5m 15s |
/// |     7 |     5m 20s |    10m 35s |
/// |     8 |    10m 40s |    21m 15s |
/// |     9 |    21m 20s |    42m 35s |
/// |    10 |    42m 40s | 1h 25m 15s |
/// |    11 |         1h | 2h 25m 15s |
///
/// Retry `n` is attempt `n + 1`, scheduled when attempt `n` fails; retry 11
/// would have been 1h 25m 20s but hits the 1h cap. When attempt 12 fails the
/// event is given up ([`GiveUpReason::MaxAttempts`]). "Cumulative" counts
/// the waits only, not the time the requests themselves took. With ±20%
/// jitter the whole schedule spans 1h 56m 12s to 2h 54m 18s, far inside the
/// 24h `max_age`, which therefore only bites when events queued up while the
/// daemon or the receiver was down for most of a day.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the first retry (default 5s).
    pub base_delay: Duration,
    /// Cap on one backoff delay (default 1h).
    ///
    /// It caps the un-jittered delay; jitter is applied after the cap, so one
    /// delay can reach `max_delay * (1 + jitter)` (72 min by default). Capping
    /// after the jitter would make every event at the cap retry at the same
    /// instant again, which is what the jitter is there to prevent.
    pub max_delay: Duration,
    /// Attempts in all, the first included (default 12).
    pub max_attempts: u32,
    /// Give up on an event this long after it was created (default 24h).
    pub max_age: Duration,
    /// Largest Retry-After honoured (default 1h); longer hints are cut to this.
    pub max_retry_after: Duration,
    /// Jitter as a fraction of the delay, 0.0..=1.0 (default 0.2 = ±20%).
    ///
    /// Values outside the range are clamped and NaN counts as 0.0, so a bad
    /// setting cannot make [`RetryPolicy::next`] panic.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            // A receiver that dropped one request (a restart, a deploy, a
            // full connection pool) is usually back within seconds.
            base_delay: Duration::from_secs(5),
            // Doubling from 5s passes 1h at the 11th retry (5s * 2^10 =
            // 5120s); waiting longer than an hour between tries would leave
            // a recovered receiver idle for most of that hour.
            max_delay: Duration::from_secs(60 * 60),
            // 12 attempts span about 2h 25m of waits (see the table), which
            // covers a typical outage or maintenance window.
            max_attempts: 12,
            // A webhook older than a day is stale news for the external
            // system; an operator can still requeue it by hand.
            max_age: Duration::from_secs(24 * 60 * 60),
            // Same bound as max_delay: a receiver asking for more than an
            // hour is as good as down, and the attempt budget decides.
            max_retry_after: Duration::from_secs(60 * 60),
            // ±20% spreads events that failed together (one outage, a whole
            // batch) over a window 40% as long as the delay, instead of all
            // coming back in the same second.
            jitter: 0.2,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again after this delay.
    RetryIn(Duration),
    /// Give up: the attempts or the age budget are spent.
    GiveUp(GiveUpReason),
}

/// Which budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    /// `max_attempts` attempts were made.
    MaxAttempts,
    /// The next attempt would come more than `max_age` after the event was
    /// created.
    MaxAge,
}

impl RetryPolicy {
    /// `attempt`: the number of the attempt that just failed (1-based).
    /// `age`: time since the event was created.
    /// `hint`: the receiver's Retry-After, if any.
    /// `unit`: a random number in [0, 1) for jitter (pass `fastrand::f64()` in production; tests pass fixed values).
    ///
    /// The delay is the jittered backoff, raised to the hint (itself cut to
    /// `max_retry_after`) when the hint is longer: the receiver said when it
    /// can take the event, and coming earlier would only earn another 429 or
    /// 503. The event is given up when `attempt >= max_attempts`, or when
    /// `age + delay` is past `max_age`. An `attempt` of 0 is treated as 1 and
    /// `unit` is clamped to [0, 1] (NaN counts as 0.5, no jitter). Never
    /// panics: sums that would overflow saturate at [`Duration::MAX`].
    #[must_use]
    pub fn next(&self, attempt: u32, age: Duration, hint: Option<Duration>, unit: f64) -> Next {
        if attempt >= self.max_attempts {
            return Next::GiveUp(GiveUpReason::MaxAttempts);
        }
        let mut delay = jittered(self.base_delay_after(attempt), self.jitter, unit);
        if let Some(hint) = hint {
            delay = delay.max(hint.min(self.max_retry_after));
        }
        let retry_at_age = age.saturating_add(delay);
        if retry_at_age > self.max_age {
            Next::GiveUp(GiveUpReason::MaxAge)
        } else {
            Next::RetryIn(delay)
        }
    }

    /// The un-jittered delay after failed attempt n: base * 2^(n-1), capped at `max_delay` (no overflow for huge n).
    ///
    /// An `attempt` of 0 is treated as 1 (the base delay).
    #[must_use]
    pub fn base_delay_after(&self, attempt: u32) -> Duration {
        if self.base_delay.is_zero() {
            return Duration::ZERO;
        }
        let doublings = attempt.saturating_sub(1);
        // 2^32 does not fit u32, and any product that overflows Duration is
        // past any cap anyway: both fall back to max_delay.
        2u32.checked_pow(doublings)
            .and_then(|factor| self.base_delay.checked_mul(factor))
            .map_or(self.max_delay, |delay| delay.min(self.max_delay))
    }
}

/// `delay * (1 + jitter * (2 * unit - 1))`: with `unit` uniform in [0, 1) the
/// factor is uniform in `1 ± jitter`, and `unit = 0.5` leaves `delay` exact.
fn jittered(delay: Duration, jitter: f64, unit: f64) -> Duration {
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let unit = if unit.is_nan() {
        0.5
    } else {
        unit.clamp(0.0, 1.0)
    };
    let factor = 1.0 + jitter * (2.0 * unit - 1.0);
    // Skip the float round trip when nothing changes: an f64 holds only 53
    // bits, so a Duration with nanoseconds could come back a few ns off.
    if jitter == 0.0 || unit == 0.5 {
        return delay;
    }
    // factor is within [0, 2], so the product is finite and not negative;
    // the only failure left is exceeding Duration::MAX.
    Duration::try_from_secs_f64(delay.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);
    const MINUTE: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Float jitter can land a little off an exact product.
    fn assert_close(got: Duration, want: Duration, tolerance: Duration, what: &str) {
        let diff = got.abs_diff(want);
        assert!(diff <= tolerance, "{what}: got {got:?}, want {want:?}");
    }

    #[test]
    fn default_schedule_without_jitter() {
        let policy = RetryPolicy::default();
        let cases: &[(u32, Next)] = &[
            (1, Next::RetryIn(secs(5))),
            (2, Next::RetryIn(secs(10))),
            (3, Next::RetryIn(secs(20))),
            (4, Next::RetryIn(secs(40))),
            (5, Next::RetryIn(secs(80))),
            (6, Next::RetryIn(secs(160))),
            (7, Next::RetryIn(secs(320))),
            (8, Next::RetryIn(secs(640))),
            (9, Next::RetryIn(secs(1280))),
            (10, Next::RetryIn(secs(2560))),
            // 5s * 2^10 = 5120s, over the 1h cap.
            (11, Next::RetryIn(secs(3600))),
            (12, Next::GiveUp(GiveUpReason::MaxAttempts)),
        ];
        for &(attempt, want) in cases {
            let got = policy.next(attempt, Duration::ZERO, None, 0.5);
            assert_eq!(got, want, "after attempt {attempt}");
        }
    }

    /// Renders the default schedule the way the doc comment of
    /// [`RetryPolicy`] writes it.
    fn default_schedule_table() -> String {
        fn human(total: u64) -> String {
            let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
            let parts: Vec<String> = [(h, "h"), (m, "m"), (s, "s")]
                .iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, unit)| format!("{n}{unit}"))
                .collect();
            if parts.is_empty() {
                "0s".to_owned()
            } else {
                parts.join(" ")
            }
        }

        let policy = RetryPolicy::default();
        let mut lines = vec![
            "/// | retry | delay      | cumulative |".to_owned(),
            "/// |------:|-----------:|-----------:|".to_owned(),
        ];
        let mut cumulative = Duration::ZERO;
        let mut attempt = 1;
        while let Next::RetryIn(delay) = policy.next(attempt, cumulative, None, 0.5) {
            cumulative += delay;
            lines.push(format!(
                "/// | {attempt:>5} | {:>10} | {:>10} |",
                human(delay.as_secs()),
                human(cumulative.as_secs())
            ));
            attempt += 1;
        }
        lines.join("\n")
    }

    #[test]
    fn doc_comment_states_the_computed_default_schedule() {
        let table = default_schedule_table();
        println!("{table}");
        let source = include_str!("backoff.rs");
        assert!(
            source.contains(&table),
            "the RetryPolicy doc comment must contain the computed schedule:\n{table}"
        );
        // The prose numbers next to the table.
        let policy = RetryPolicy::default();
        let total: Duration = (1..policy.max_attempts)
            .map(|n| policy.base_delay_after(n))
            .sum();
        assert_eq!(total, 2 * HOUR + 25 * MINUTE + 15 * SECOND);
        assert_eq!(total.mul_f64(0.8), HOUR + 56 * MINUTE + 12 * SECOND);
        assert_eq!(total.mul_f64(1.2), 2 * HOUR + 54 * MINUTE + 18 * SECOND);
        assert_eq!(policy.base_delay * 2u32.pow(10), secs(5120));
    }

    #[test]
    fn jitter_bounds() {
        let policy = RetryPolicy::default();
        for attempt in 1..policy.max_attempts {
            let base = policy.base_delay_after(attempt);
            let at = |unit: f64| match policy.next(attempt, Duration::ZERO, None, unit) {
                Next::RetryIn(delay) => delay,
                other => panic!("attempt {attempt}, unit {unit}: {other:?}"),
            };
            // unit 0 gives the low end (-20%), unit near 1 the high end.
            assert_close(
                at(0.0),
                base.mul_f64(0.8),
                Duration::from_nanos(1),
                "unit 0.0",
            );
            // 1e-9 short of 1 puts the factor 4e-10 short of 1.2: 1.44µs on 1h.
            let high = at(0.999_999_999);
            assert!(high < base.mul_f64(1.2), "unit ~1.0 reached +20%");
            assert_close(
                high,
                base.mul_f64(1.2),
                Duration::from_micros(2),
                "unit ~1.0",
            );
            assert_eq!(at(0.5), base, "unit 0.5");
            for step in 0..100 {
                let unit = f64::from(step) / 100.0;
                let delay = at(unit);
                assert!(
                    delay >= base.mul_f64(0.8) && delay <= base.mul_f64(1.2),
                    "attempt {attempt}, unit {unit}: {delay:?} outside ±20% of {base:?}"
                );
            }
        }
    }

    #[test]
    fn next_table() {
        // (name, policy, attempt, age, hint, unit, want)
        type Row = (
            &'static str,
            RetryPolicy,
            u32,
            Duration,
            Option<Duration>,
            f64,
            Next,
        );
        let default = RetryPolicy::default;
        let no_jitter = || RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let day = 24 * HOUR;
        // One row per case; rustfmt would spread each over ten lines.
        #[rustfmt::skip]
        let cases: Vec<Row> = vec![
            // Retry-After against the backoff (attempt 3: 20s).
            ("hint below backoff", default(), 3, Duration::ZERO, Some(secs(7)), 0.5, Next::RetryIn(secs(20))),
            ("hint above backoff", default(), 3, Duration::ZERO, Some(secs(90)), 0.5, Next::RetryIn(secs(90))),
            ("hint equal to backoff", default(), 3, Duration::ZERO, Some(secs(20)), 0.5, Next::RetryIn(secs(20))),
            ("hint zero", default(), 3, Duration::ZERO, Some(Duration::ZERO), 0.5, Next::RetryIn(secs(20))),
            ("hint over max_retry_after is cut", default(), 1, Duration::ZERO, Some(5 * HOUR), 0.5, Next::RetryIn(HOUR)),
            ("hint beats the low jitter end", default(), 1, Duration::ZERO, Some(secs(5)), 0.0, Next::RetryIn(secs(5))),
            ("cut hint still below a longer backoff", RetryPolicy { max_retry_after: MINUTE, ..default() }, 10, Duration::ZERO, Some(HOUR), 0.5, Next::RetryIn(secs(2560))),
            // max_age: the retry may land exactly on it, not past it.
            ("retry lands on max_age", default(), 1, day - secs(5), None, 0.5, Next::RetryIn(secs(5))),
            ("retry would pass max_age", default(), 1, day - secs(4), None, 0.5, Next::GiveUp(GiveUpReason::MaxAge)),
            ("already older than max_age", default(), 1, day + SECOND, None, 0.5, Next::GiveUp(GiveUpReason::MaxAge)),
            ("hint pushes past max_age", default(), 1, day - MINUTE, Some(2 * MINUTE), 0.5, Next::GiveUp(GiveUpReason::MaxAge)),
            ("jitter pushes past max_age", default(), 1, day - secs(5), None, 0.9, Next::GiveUp(GiveUpReason::MaxAge)),
            ("max_age zero", RetryPolicy { max_age: Duration::ZERO, ..default() }, 1, Duration::ZERO, None, 0.5, Next::GiveUp(GiveUpReason::MaxAge)),
            // max_attempts wins over max_age.
            ("attempt 11 of 12", default(), 11, Duration::ZERO, None, 0.5, Next::RetryIn(HOUR)),
            ("attempt 12 of 12", default(), 12, Duration::ZERO, None, 0.5, Next::GiveUp(GiveUpReason::MaxAttempts)),
            ("attempt past max", default(), 13, 2 * day, None, 0.5, Next::GiveUp(GiveUpReason::MaxAttempts)),
            ("single attempt", RetryPolicy { max_attempts: 1, ..default() }, 1, Duration::ZERO, None, 0.5, Next::GiveUp(GiveUpReason::MaxAttempts)),
            ("zero attempts", RetryPolicy { max_attempts: 0, ..default() }, 0, Duration::ZERO, None, 0.5, Next::GiveUp(GiveUpReason::MaxAttempts)),
            ("attempt 0 acts as 1", default(), 0, Duration::ZERO, None, 0.5, Next::RetryIn(secs(5))),
            // Extreme inputs.
            ("attempt u32::MAX", default(), u32::MAX, Duration::ZERO, None, 0.5, Next::GiveUp(GiveUpReason::MaxAttempts)),
            ("huge attempt under a huge budget", RetryPolicy { max_attempts: u32::MAX, ..default() }, u32::MAX - 1, Duration::ZERO, None, 0.5, Next::RetryIn(HOUR)),
            ("no jitter ignores unit", no_jitter(), 4, Duration::ZERO, None, 0.0, Next::RetryIn(secs(40))),
            ("full jitter at unit 0", RetryPolicy { jitter: 1.0, ..default() }, 4, Duration::ZERO, None, 0.0, Next::RetryIn(Duration::ZERO)),
            ("jitter above 1 is clamped", RetryPolicy { jitter: 7.0, ..default() }, 4, Duration::ZERO, None, 0.0, Next::RetryIn(Duration::ZERO)),
            ("negative jitter is clamped", RetryPolicy { jitter: -1.0, ..default() }, 4, Duration::ZERO, None, 0.0, Next::RetryIn(secs(40))),
            ("NaN jitter means none", RetryPolicy { jitter: f64::NAN, ..default() }, 4, Duration::ZERO, None, 0.0, Next::RetryIn(secs(40))),
            ("NaN unit means none", default(), 4, Duration::ZERO, None, f64::NAN, Next::RetryIn(secs(40))),
            ("unit above 1 is clamped", RetryPolicy { jitter: 1.0, ..default() }, 4, Duration::ZERO, None, 9.0, Next::RetryIn(secs(80))),
            ("zero base", RetryPolicy { base_delay: Duration::ZERO, max_attempts: 100, ..default() }, 40, Duration::ZERO, None, 0.9, Next::RetryIn(Duration::ZERO)),
            ("zero max_delay", RetryPolicy { max_delay: Duration::ZERO, ..default() }, 5, Duration::ZERO, None, 0.9, Next::RetryIn(Duration::ZERO)),
            ("all zero", RetryPolicy { base_delay: Duration::ZERO, max_delay: Duration::ZERO, max_age: Duration::ZERO, max_retry_after: Duration::ZERO, ..default() }, 1, Duration::ZERO, Some(HOUR), 0.9, Next::RetryIn(Duration::ZERO)),
            ("Duration::MAX everywhere", RetryPolicy { base_delay: Duration::MAX, max_delay: Duration::MAX, max_attempts: u32::MAX, max_age: Duration::MAX, max_retry_after: Duration::MAX, jitter: 1.0 }, 7, Duration::ZERO, Some(Duration::MAX), 0.999_999, Next::RetryIn(Duration::MAX)),
            ("age overflow saturates", RetryPolicy { base_delay: Duration::MAX, max_delay: Duration::MAX, jitter: 1.0, ..default() }, 2, Duration::MAX, None, 0.999_999, Next::GiveUp(GiveUpReason::MaxAge)),
        ];
        let mut failures = Vec::new();
        for (name, policy, attempt, age, hint, unit, want) in &cases {
            let got = policy.next(*attempt, *age, *hint, *unit);
            if got != *want {
                failures.push(format!("{name}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn base_delay_after_never_overflows() {
        let policy = RetryPolicy::default();
        let cases: &[(u32, Duration)] = &[
            (0, secs(5)),
            (1, secs(5)),
            (10, secs(2560)),
            (11, HOUR),
            (32, HOUR),
            (33, HOUR),
            (64, HOUR),
            (u32::MAX, HOUR),
        ];
        for &(attempt, want) in cases {
            assert_eq!(policy.base_delay_after(attempt), want, "attempt {attempt}");
        }
        let unbounded = RetryPolicy {
            base_delay: Duration::from_nanos(1),
            max_delay: Duration::MAX,
            max_attempts: u32::MAX,
            ..RetryPolicy::default()
        };
        // 1ns * 2^31 still fits u32 arithmetic; 2^32 falls back to the cap.
        assert_eq!(
            unbounded.base_delay_after(32),
            Duration::from_nanos(1 << 31)
        );
        assert_eq!(unbounded.base_delay_after(33), Duration::MAX);
        for attempt in [u32::MAX - 1, u32::MAX] {
            let _ = unbounded.next(attempt, Duration::MAX, Some(Duration::MAX), 0.999_999);
        }
    }
}
