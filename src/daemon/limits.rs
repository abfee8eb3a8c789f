//! What a client of the control socket or the metrics port can make the daemon hold:
//! how many connections, how many bytes of a request, how long it may take to send
//! it; and what an accept loop does when the process is out of file descriptors.
//!
//! Why: both listeners are reachable by local users (the metrics port by whoever
//! reaches its address). Without these bounds a flood of idle connections used up the
//! daemon's descriptors, so that a scheduled rotation failed for want of one; the
//! accept loop then spun on `EMFILE` at ~90 % CPU; and a 300 MB line without a newline
//! was read into memory before the peer's uid was even looked at.
//!
//! The numbers are constants, not settings: they are far above what `rotd status`,
//! `rotd rotate` or a Prometheus scrape need, and far below what would hurt the host.

use std::time::{Duration, Instant};

/// Connections served at once on each listener; a connection beyond that is answered
/// with a short error and closed at once (accepting it keeps the kernel's backlog from
/// filling with connections that would wait their turn).
pub const MAX_CONNECTIONS: usize = 64;

/// The longest control request line (a `rotate` of every secret is a few KiB).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// How long a control client has to send a request line, and a metrics client its
/// request head.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to read its answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refused or turned-away connections kept open (unread) for a moment so the peer can
/// read its answer before the close; beyond this many they are closed at once.
pub const MAX_LINGERING: usize = 16;

/// How long a refused connection is kept open for its peer to read the answer.
pub const LINGER: Duration = Duration::from_secs(1);

/// Allows one log line per period and counts the ones held back, so that a flood of
/// refused connections does not become a flood of log lines.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)` when a line may be logged now (`n` lines were held back since the
    /// last one), `None` when this one is held back.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.held_back = self.held_back.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// The pause after a failed `accept`: 100 ms, doubling to 1 s while failures last,
/// with a rate-limited warning. A failed accept leaves the connection in the backlog
/// and the listener readable, so retrying at once is a busy loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    delay: Duration,
    warn: Throttle,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            delay: BACKOFF_MIN,
            warn: Throttle::new(Duration::from_secs(10)),
        }
    }

    /// An accept succeeded: the next failure starts from the shortest pause again.
    pub fn succeeded(&mut self) {
        self.delay = BACKOFF_MIN;
    }

    /// An accept failed: log (at most every 10 s) and sleep.
    pub async fn failed(&mut self, e: &std::io::Error) {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(code) if code == nix::errno::Errno::EMFILE as i32
                || code == nix::errno::Errno::ENFILE as i32
        );
        if let Some(held_back) = self.warn.allow() {
            if exhausted {
                tracing::warn!(listener = self.what, error = %e, pause = ?self.delay, failures_not_logged = held_back,
                    "accept failed: out of file descriptors; pausing new connections (raise LimitNOFILE= if this is not a flood)");
            } else {
                tracing::warn!(listener = self.what, error = %e, pause = ?self.delay, failures_not_logged = held_back,
                    "accept failed; pausing new connections");
            }
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let mut t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(t.allow(), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::new("test");
        let e = std::io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32);
        let mut pauses = Vec::new();
        for _ in 0..6 {
            let t = tokio::time::Instant::now();
            b.failed(&e).await;
            pauses.push(t.elapsed().as_millis());
        }
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        b.succeeded();
        let t = tokio::time::Instant::now();
        b.failed(&e).await;
        assert_eq!(t.elapsed().as_millis(), 100);
    }
}
