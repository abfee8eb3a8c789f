//! What every input file of rotd shares: a [`Problem`] (file, line, what is wrong,
//! what to do), the [`Reporter`] that turns TOML spans into lines, and the checks of
//! the values that appear in more than one file — secret and host names
//! ([`valid_name`]) and durations with their upper bounds ([`parse_duration`],
//! [`bounds`]).
//!
//! A leaf module: it depends on nothing else in rotd, so the configuration, the store
//! (a schedule's `consumers`, read when a secret is encrypted), the agent and the
//! targets all report problems the same way without importing each other.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line, when the problem is at a place in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file.display(), l, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// The configuration is invalid; every problem found is listed.
#[derive(Debug, thiserror::Error)]
pub struct Error(pub Vec<Problem>);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Collects problems for one file, turning byte spans into line numbers.
pub(crate) struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Reporter<'a> {
    /// A reporter for problems of `file`, whose text is `text`.
    pub(crate) fn new(file: &'a Path, text: &'a str, problems: &'a mut Vec<Problem>) -> Self {
        Reporter {
            file,
            text,
            problems,
        }
    }

    pub(crate) fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(crate) fn at<T>(&mut self, spanned: &Spanned<T>, message: impl Into<String>) {
        let line = self.line_of(spanned.span().start);
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: Some(line),
            message: message.into(),
        });
    }

    /// A TOML error of this file (its line, its message).
    pub(crate) fn toml_error(&mut self, e: &toml::de::Error) {
        self.problems.push(toml_problem(self.file, self.text, e));
    }

    /// How many problems have been reported so far (to tell whether a part is clean).
    pub(crate) fn count(&self) -> usize {
        self.problems.len()
    }

    pub(crate) fn base(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }

    pub(crate) fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base().join(p)
        }
    }
}

pub(crate) fn toml_problem(file: &Path, text: &str, e: &toml::de::Error) -> Problem {
    let line = e.span().map(|s| {
        text.as_bytes()[..s.start.min(text.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    });
    Problem {
        file: file.to_owned(),
        line,
        message: format!("{}; fix the TOML and run `rotd check`", e.message()),
    }
}

/// Is `name` usable as a secret name (a file name in `secrets/`)?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !name.ends_with(".pending")
}

/// Parses a duration such as `15m`, `1h 30m`, `0s`; at most [`bounds::ANY`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write it like \"90s\", \"15m\" or \"1h 30m\"")
    })?;
    if d > bounds::ANY.0 {
        return Err(format!(
            "{s:?} is longer than {}, the longest duration rotd accepts",
            bounds::ANY.1
        ));
    }
    Ok(d)
}

/// Upper bounds of the durations in the configuration (value, and how it is written
/// in errors and the README). Every time rotd computes from a configured duration
/// (the next run, a retire-after, an expiry) then stays far inside the calendar's
/// range, so the scheduler cannot overflow; and each bound is well past any sensible
/// setting, so it only catches mistakes and hostile files.
pub mod bounds {
    use std::time::Duration;

    const DAY: u64 = 86_400;

    /// Any duration (e.g. an Elasticsearch key's `expiration`, `max_age`): ten years
    /// of 365.25 days, so `"10y"` is accepted.
    pub const ANY: (Duration, &str) = (Duration::from_secs(3_652 * DAY + 12 * 3_600), "10y");
    /// A random delay spreads rotations over minutes or hours, not days.
    pub const JITTER: (Duration, &str) = (Duration::from_secs(DAY), "24h");
    /// How long the previous credential stays valid.
    pub const GRACE: (Duration, &str) = (Duration::from_secs(365 * DAY), "365d");
    /// The first pause between retries (later ones double, capped at 1 h).
    pub const RETRY_BACKOFF: (Duration, &str) = (Duration::from_secs(DAY), "24h");
    /// One probe request.
    pub const PROBE_TIMEOUT: (Duration, &str) = (Duration::from_secs(600), "10m");
    /// The pause between probe attempts.
    pub const PROBE_INTERVAL: (Duration, &str) = (Duration::from_secs(3_600), "1h");
    /// How long SIGTERM waits for rotations in flight.
    pub const SHUTDOWN_GRACE: (Duration, &str) = (Duration::from_secs(3_600), "1h");
    /// Scheduled attempts after a failure.
    pub const RETRIES: u32 = 100;
    /// Probe attempts (each up to `timeout` + `interval`, the secret's lock held).
    pub const PROBE_ATTEMPTS: u32 = 1_000;
    /// How long consumers have to acknowledge a rotation.
    pub const ACK_TIMEOUT: (Duration, &str) = (Duration::from_secs(30 * DAY), "30d");
}

/// Parses the duration at `v` and checks it against `bound`; a problem (file:line)
/// otherwise.
pub(crate) fn bounded(
    v: &Spanned<String>,
    what: &str,
    bound: (Duration, &str),
    rep: &mut Reporter<'_>,
) -> Option<Duration> {
    match parse_duration(v.get_ref()) {
        Ok(d) if d <= bound.0 => Some(d),
        Ok(_) => {
            rep.at(
                v,
                format!(
                    "{what} = {:?} is longer than its limit of {}; use at most {}",
                    v.get_ref(),
                    bound.1,
                    bound.1
                ),
            );
            None
        }
        Err(m) => {
            rep.at(v, format!("{what}: {m}"));
            None
        }
    }
}

/// A count at `v` checked against its upper bound.
pub(crate) fn bounded_count(
    v: &Spanned<u32>,
    what: &str,
    max: u32,
    rep: &mut Reporter<'_>,
) -> Option<u32> {
    if *v.get_ref() <= max {
        Some(*v.get_ref())
    } else {
        rep.at(
            v,
            format!("{what} = {} is more than its limit of {max}", v.get_ref()),
        );
        None
    }
}
