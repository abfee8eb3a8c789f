//! When scheduled rotations run: cron (with seconds), jitter, the daily window,
//! bounded retries with exponential backoff, and `max_age` at start-up.
//!
//! One task per schedule sleeps until its next fire time (no polling), then sends a
//! rotation request to the daemon's command channel and waits for the outcome. The
//! time arithmetic is in small pure functions so it can be tested without a clock;
//! the retry loop is tested with tokio's paused time.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{Schedule, Window};

/// The first time after `after` that the cron expression fires.
pub fn next_fire(cron: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let six: Vec<&str> = cron.split_whitespace().take(6).collect();
    let c = croner::Cron::new(&six.join(" "))
        .with_seconds_required()
        .with_dom_and_dow()
        .parse()
        .ok()?;
    c.find_next_occurrence(&after, false).ok()
}

/// A delay drawn uniformly from `[0, max]` (millisecond resolution).
pub fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    let mut b = [0u8; 8];
    if SystemRandom::new().fill(&mut b).is_err() {
        return Duration::ZERO;
    }
    Duration::from_millis(u64::from_le_bytes(b) % (ms + 1))
}

/// Backoff before retry `attempt` (0-based): `base × 2^attempt`, at most one hour.
pub fn backoff(attempt: u32, base: Duration) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(3600))
}

/// Whether a credential of this age must be rotated at start-up.
pub fn too_old(max_age: Option<Duration>, age_seconds: Option<i64>) -> bool {
    match (max_age, age_seconds) {
        (Some(max), Some(age)) => age >= 0 && age as u64 >= max.as_secs(),
        (Some(_), None) => true, // never rotated nor imported
        _ => false,
    }
}

/// The next time a scheduled rotation starts, jitter included.
pub fn next_run(sched: &Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let fire = next_fire(sched.cron.as_deref()?, now)?;
    Some(fire + chrono::Duration::from_std(jitter(sched.jitter)).unwrap_or_default())
}

/// Runs `attempt` until it reports success, at most `1 + retries` times, sleeping
/// `backoff` between tries, and stopping early when the window has closed. Returns
/// the number of attempts made. A new secret is generated on every attempt, so a
/// retry never repeats the failing value.
pub async fn retry<F, Fut>(
    retries: u32,
    base: Duration,
    window: Option<Window>,
    now: impl Fn() -> DateTime<Utc>,
    mut attempt: F,
) -> u32
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut n = 0;
    loop {
        n += 1;
        if attempt().await {
            return n;
        }
        if n > retries {
            return n;
        }
        tokio::time::sleep(backoff(n - 1, base)).await;
        if window.is_some_and(|w| !w.contains(now())) {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cron_with_seconds_and_weekday() {
        let n = next_fire("0 0 3 * * Sun", t("2026-11-23T10:00:00Z")).unwrap();
        assert_eq!(n, t("2026-11-29T03:00:00Z"));
        let n = next_fire("*/10 * * * * *", t("2026-11-23T10:00:01Z")).unwrap();
        assert_eq!(n, t("2026-11-23T10:00:10Z"));
    }

    #[test]
    fn jitter_stays_in_bounds_and_varies() {
        let max = Duration::from_secs(600);
        let draws: Vec<Duration> = (0..200).map(|_| jitter(max)).collect();
        assert!(draws.iter().all(|d| *d <= max));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(300)));
        assert!(draws.iter().any(|d| *d < Duration::from_secs(300)));
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Duration::from_secs(60);
        assert_eq!(backoff(0, b), Duration::from_secs(60));
        assert_eq!(backoff(2, b), Duration::from_secs(240));
        assert_eq!(backoff(30, b), Duration::from_secs(3600));
    }

    #[test]
    fn window_wraps_midnight() {
        let w = Window::parse("22:00-04:00").unwrap();
        assert!(w.contains(t("2026-11-23T23:30:00Z")));
        assert!(w.contains(t("2026-11-23T03:59:00Z")));
        assert!(!w.contains(t("2026-11-23T04:00:00Z")));
        let w = Window::parse("02:00-05:00").unwrap();
        assert!(w.contains(t("2026-11-23T02:00:00Z")) && !w.contains(t("2026-11-23T05:00:00Z")));
        assert!(Window::parse("2-5").is_err());
    }

    #[test]
    fn max_age() {
        let d = Some(Duration::from_secs(100));
        assert!(too_old(d, Some(100)));
        assert!(!too_old(d, Some(99)));
        assert!(too_old(d, None));
        assert!(!too_old(None, Some(1_000_000)));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_and_are_bounded() {
        let start = tokio::time::Instant::now();
        let calls = Cell::new(0);
        let n = retry(3, Duration::from_secs(60), None, Utc::now, || {
            calls.set(calls.get() + 1);
            async { false }
        })
        .await;
        assert_eq!(n, 4);
        assert_eq!(calls.get(), 4);
        // 60 + 120 + 240 s of backoff, no sleep after the last attempt.
        assert_eq!(start.elapsed(), Duration::from_secs(420));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_stops_retrying() {
        let calls = Cell::new(0);
        let n = retry(5, Duration::from_secs(1), None, Utc::now, || {
            calls.set(calls.get() + 1);
            let ok = calls.get() == 2;
            async move { ok }
        })
        .await;
        assert_eq!(n, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_when_the_window_closes() {
        let w = Window::parse("02:00-05:00").unwrap();
        let n = retry(
            5,
            Duration::from_secs(1),
            Some(w),
            || t("2026-11-23T06:00:00Z"),
            || async { false },
        )
        .await;
        assert_eq!(n, 1);
    }
}
