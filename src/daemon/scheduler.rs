//! When scheduled rotations run: cron (with seconds), jitter, the daily window,
//! bounded retries with exponential backoff, and `max_age` at start-up.
//!
//! One task per schedule sleeps until its next fire time (no polling), then sends a
//! rotation request to the daemon's command channel and waits for the outcome. The
//! time arithmetic is in small pure functions so it can be tested without a clock;
//! the retry loop is tested with tokio's paused time.
//!
//! Nothing here may panic, whatever the schedule: the config bounds every duration
//! (`config.rs`), and the arithmetic is checked anyway — a time out of the calendar's
//! range is "no next run" (the daemon logs it), never an overflow. A panic here once
//! killed a running daemon on the hot reload of a schedule with a huge `jitter`.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{Schedule, Window};

/// The first time after `after` that the cron expression fires.
pub fn next_fire(cron: &str, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // croner panics near the ends of chrono's range (`NaiveDate - TimeDelta` on
    // 1 January of year -262143) and gives up past the year 5000; rotd only asks
    // about real dates.
    if !(1970..5000).contains(&chrono::Datelike::year(&after)) {
        return None;
    }
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
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Duration::ZERO;
    }
    let mut b = [0u8; 8];
    if SystemRandom::new().fill(&mut b).is_err() {
        return Duration::ZERO;
    }
    let r = u64::from_le_bytes(b);
    Duration::from_millis(match ms.checked_add(1) {
        Some(n) => r % n,
        None => r,
    })
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

/// The next time a scheduled rotation starts, jitter included; `None` when the cron
/// never fires again or the time would leave the calendar's range.
pub fn next_run(sched: &Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    next_run_at(sched.cron.as_deref()?, sched.jitter, now)
}

/// [`next_run`] on the parts of a schedule it reads.
pub fn next_run_at(cron: &str, max_jitter: Duration, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let fire = next_fire(cron, now)?;
    let delay = chrono::TimeDelta::from_std(jitter(max_jitter)).ok()?;
    fire.checked_add_signed(delay)
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
    let mut n: u32 = 0;
    loop {
        n = n.saturating_add(1);
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

    /// The cron expressions the property test combines: every field's usual forms,
    /// and days that exist only in some months.
    fn crons() -> Vec<String> {
        let mut out = Vec::new();
        for sec in ["0", "*/7"] {
            for min in ["0", "*/15"] {
                for hour in ["0", "*/5", "23"] {
                    for dom in ["*", "1", "29", "30", "31", "L"] {
                        for month in ["*", "2", "4,6", "12"] {
                            for dow in ["*", "Sun", "Mon-Fri"] {
                                out.push(format!("{sec} {min} {hour} {dom} {month} {dow}"));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn next_run_never_panics_on_a_schedule_that_check_accepts() {
        let dir = std::path::Path::new("/nonexistent-rotd-test");
        let nows = [
            Utc::now(),
            t("2026-02-28T23:59:59Z"),
            t("2028-02-29T12:00:00Z"),
            t("4999-12-31T23:59:59Z"),
            DateTime::<Utc>::MAX_UTC,
            DateTime::<Utc>::MIN_UTC,
        ];
        let (mut accepted, mut refused) = (0, 0);
        for cron in crons() {
            let mut cron_refused = false;
            for jitter in ["0s", "10m", "24h"] {
                if cron_refused {
                    continue; // refused for its cron already (searching is slow in debug)
                }
                let text = format!(
                    "name = \"s\"\nschedule = \"{cron}\"\njitter = \"{jitter}\"\n[target]\nkind = \"files\"\n"
                );
                let mut problems = Vec::new();
                let Some(sched) =
                    crate::config::parse_schedule_str(&text, &dir.join("s.toml"), &mut problems)
                else {
                    refused += 1;
                    cron_refused = true;
                    continue;
                };
                accepted += 1;
                for now in nows {
                    let next = next_run(&sched, now);
                    if now == nows[0] || now == nows[1] || now == nows[2] {
                        // A checked schedule always has a next run from a real date.
                        let next = next.unwrap_or_else(|| panic!("{cron} + {jitter}"));
                        assert!(next > now && next <= now + chrono::TimeDelta::days(366 * 30));
                    }
                }
            }
        }
        assert!(accepted > 1500 && refused > 0, "{accepted} / {refused}");
        // Unchecked extremes: no panic, just no next run.
        for max in [
            Duration::MAX,
            Duration::from_secs(100_000_000 * 366 * 86400),
        ] {
            for now in nows {
                for _ in 0..200 {
                    let _ = next_run_at("0 0 4 * * *", max, now);
                }
            }
        }
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
