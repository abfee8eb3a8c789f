//! Configuration: `rotd.toml` and the `schedules/*.toml` files (DESIGN §3).
//!
//! Parse, then validate. The files are first read into `Raw*` structs with
//! `deny_unknown_fields`, keeping the position of every value that can be wrong
//! (`toml::Spanned`); then [`load`] turns them into a checked [`Config`]: cron parsed,
//! durations parsed, templates read and their placeholders checked, references to
//! other secrets resolved. Every problem found is reported — not just the first — as an
//! [`Problem`] naming the file, the line, what is wrong and what to do.
//!
//! `[hosts.NAME]` (DESIGN §7) names the hosts a schedule may list in `consumers`; a
//! consumer must be a declared host. The store reads a secret's consumers again when
//! it encrypts it ([`consumers_of`]), so what a host can decrypt follows the schedule.
//!
//! Relative paths in a file are taken relative to the directory of that file, so a
//! config tree can be moved as a whole.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::deliver;
use crate::secret::Charset;
use crate::targets;

pub use crate::store::config::{consumers_of, Config as Store, Host};
pub(crate) use crate::syntax::{bounded, bounded_count, toml_problem, Reporter};
pub use crate::syntax::{bounds, parse_duration, valid_name, Error, Problem};
pub use crate::targets::{HttpProbe, Probe};

/// Where `rotd` looks for its config when neither `--config` nor `$ROTD_CONFIG` is set.
pub const DEFAULT_PATH: &str = "/etc/rotd/rotd.toml";

/// The whole checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub store: Store,
    pub daemon: Daemon,
    pub schedules: Vec<Schedule>,
}

impl Config {
    pub fn schedule(&self, name: &str) -> Option<&Schedule> {
        self.schedules.iter().find(|s| s.name == name)
    }
}

/// `[daemon]`.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub schedules: PathBuf,
    pub socket: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// Group that owns the control socket (mode 0660); default `rotd` when that group
    /// exists, else the daemon's own group.
    pub socket_group: Option<String>,
    /// Uids allowed on the control socket besides root and the daemon's own uid.
    pub allowed_uids: Vec<u32>,
    /// How long SIGTERM waits for in-flight rotations.
    pub shutdown_grace: Duration,
}

/// One `schedules/NAME.toml`.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub file: PathBuf,
    pub name: String,
    pub cron: Option<String>,
    pub jitter: Duration,
    pub grace: Duration,
    /// Scheduled rotations start only inside this daily UTC window.
    pub window: Option<Window>,
    /// At start-up, rotate at once when the current credential is older than this.
    pub max_age: Option<Duration>,
    /// Scheduled attempts after a failure, with exponential backoff from `retry_backoff`.
    pub retries: u32,
    pub retry_backoff: Duration,
    pub length: usize,
    pub charset: Charset,
    pub target: targets::Config,
    pub deliver: Vec<deliver::Spec>,
    pub probe: Probe,
    /// The hosts (names in `[hosts]`) whose programs use this secret: it is encrypted to
    /// them besides the daemon and the global recipients (DESIGN §7).
    pub consumers: Vec<String>,
    /// Line of each entry of `consumers` (for "unknown host" problems).
    pub consumer_lines: Vec<usize>,
    /// How long consumers have to acknowledge a rotation before they are reported.
    pub ack_timeout: Duration,
    /// What `rotd check` and the daemon warn about but accept (file:line each).
    pub warnings: Vec<Problem>,
}

// ---------------------------------------------------------------- raw forms

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    store: RawStore,
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    hosts: BTreeMap<String, Spanned<RawHost>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Spanned<PathBuf>,
    remote: Option<Spanned<String>>,
    branch: Option<String>,
    identity: Spanned<PathBuf>,
    recipients: Option<Spanned<PathBuf>>,
    signing_key: Option<Spanned<PathBuf>>,
    allowed_signers: Option<Spanned<PathBuf>>,
    remote_ssh_key: Option<Spanned<PathBuf>>,
    remote_token_file: Option<Spanned<PathBuf>>,
    remote_known_hosts: Option<Spanned<PathBuf>>,
    author_name: Option<String>,
    author_email: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    schedules: Option<Spanned<PathBuf>>,
    socket: Option<PathBuf>,
    metrics: Option<Spanned<String>>,
    socket_group: Option<String>,
    #[serde(default)]
    allowed_uids: Vec<u32>,
    shutdown_grace: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    name: Spanned<String>,
    schedule: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    window: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
    retries: Option<Spanned<u32>>,
    retry_backoff: Option<Spanned<String>>,
    #[serde(default)]
    generate: RawGenerate,
    target: Spanned<targets::RawHead>,
    #[serde(default)]
    deliver: Vec<Spanned<RawDeliver>>,
    probe: Option<Spanned<RawProbe>>,
    consumers: Option<Vec<Spanned<String>>>,
    ack_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGenerate {
    length: Option<Spanned<i64>>,
    charset: Option<Charset>,
}

/// One `[[deliver]]` table as written (a schedule's, or a `[[secret.deliver]]` of
/// `rotd agent`'s config, which shares the syntax).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeliver {
    path: Spanned<String>,
    content: Option<Spanned<String>>,
    template: Option<Spanned<PathBuf>>,
    mode: Option<Spanned<ModeValue>>,
    reload: Option<Spanned<RawReload>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ModeValue {
    Int(i64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    http_post: Option<String>,
    signal: Option<String>,
    pidfile: Option<PathBuf>,
    exec: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProbe {
    timeout: Option<Spanned<String>>,
    attempts: Option<Spanned<u32>>,
    interval: Option<Spanned<String>>,
    http: Option<RawHttpProbe>,
    index: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpProbe {
    url: String,
    header: Option<String>,
    expect: Option<u16>,
}

/// `[probe]` of a schedule (and `[secret.probe]` of `agent.toml`): bounds checked,
/// defaults filled in; the span of the table, for the target's own checks.
pub(crate) fn parse_probe(
    raw: Option<&Spanned<RawProbe>>,
    rep: &mut Reporter<'_>,
) -> (Probe, Option<std::ops::Range<usize>>) {
    match raw {
        None => (
            Probe {
                timeout: Duration::from_secs(10),
                attempts: 10,
                interval: Duration::from_millis(500),
                http: None,
                index: None,
            },
            None,
        ),
        Some(p) => {
            let span = p.span();
            let p = p.get_ref();
            let mut d = |v: &Option<Spanned<String>>, what: &str, default: Duration, bound| match v
            {
                None => default,
                Some(s) => bounded(s, what, bound, rep).unwrap_or(default),
            };
            let timeout = d(
                &p.timeout,
                "probe.timeout",
                Duration::from_secs(10),
                bounds::PROBE_TIMEOUT,
            );
            let interval = d(
                &p.interval,
                "probe.interval",
                Duration::from_millis(500),
                bounds::PROBE_INTERVAL,
            );
            let attempts = p
                .attempts
                .as_ref()
                .and_then(|a| bounded_count(a, "probe.attempts", bounds::PROBE_ATTEMPTS, rep))
                .unwrap_or(10);
            (
                Probe {
                    timeout,
                    interval,
                    attempts: attempts.max(1),
                    http: p.http.as_ref().map(|h| HttpProbe {
                        url: h.url.clone(),
                        header: h.header.clone(),
                        expect: h.expect.unwrap_or(200),
                    }),
                    index: p.index.clone(),
                },
                Some(span),
            )
        }
    }
}

// ---------------------------------------------------------------- loading

/// Loads and checks `rotd.toml` and every schedule it points to.
pub fn load(path: &Path) -> Result<Config, Error> {
    load_with(path, true, false)
}

/// Loads and checks `rotd.toml` only (`init`, `import`, `show` need no schedules).
pub fn load_store_only(path: &Path) -> Result<Config, Error> {
    load_with(path, false, false)
}

/// Like [`load_store_only`], for `rotd init`, which creates `store.signing_key` and
/// `store.allowed_signers` when they are missing (as it creates the identity).
pub fn load_for_init(path: &Path) -> Result<Config, Error> {
    load_with(path, false, true)
}

fn load_with(path: &Path, with_schedules: bool, for_init: bool) -> Result<Config, Error> {
    let mut problems = Vec::new();
    let text = match crate::fsutil::read_text(path, crate::fsutil::MAX_LIST_FILE) {
        Ok(t) => t,
        Err(e) => {
            return Err(Error(vec![Problem {
                file: path.to_owned(),
                line: None,
                message: format!(
                    "cannot read the configuration: {e}; pass --config PATH or set ROTD_CONFIG"
                ),
            }]))
        }
    };
    let raw: RawConfig = match toml::from_str(&text) {
        Ok(r) => r,
        Err(e) => return Err(Error(vec![toml_problem(path, &text, &e)])),
    };
    let mut rep = Reporter::new(path, &text, &mut problems);
    let store = Store {
        path: rep.resolve(raw.store.path.get_ref()),
        remote: raw.store.remote.map(|r| r.into_inner()),
        branch: raw.store.branch.unwrap_or_else(|| "main".into()),
        identity: rep.resolve(raw.store.identity.get_ref()),
        recipients: raw
            .store
            .recipients
            .as_ref()
            .map(|p| rep.resolve(p.get_ref())),
        signing_key: raw
            .store
            .signing_key
            .as_ref()
            .map(|p| rep.resolve(p.get_ref())),
        allowed_signers: raw
            .store
            .allowed_signers
            .as_ref()
            .map(|p| rep.resolve(p.get_ref())),
        remote_ssh_key: raw
            .store
            .remote_ssh_key
            .as_ref()
            .map(|p| rep.resolve(p.get_ref())),
        remote_token_file: raw
            .store
            .remote_token_file
            .as_ref()
            .map(|p| rep.resolve(p.get_ref())),
        remote_known_hosts: raw
            .store
            .remote_known_hosts
            .as_ref()
            .map(|p| rep.resolve(p.get_ref())),
        author_name: raw.store.author_name.unwrap_or_else(|| "rotd".into()),
        author_email: raw
            .store
            .author_email
            .unwrap_or_else(|| "rotd@localhost".into()),
        hosts: validate_hosts(&raw.hosts, &mut rep),
        schedules: PathBuf::new(),
    };
    for (what, p) in [
        ("recipients", &raw.store.recipients),
        ("signing_key", &raw.store.signing_key),
        ("allowed_signers", &raw.store.allowed_signers),
        ("remote_ssh_key", &raw.store.remote_ssh_key),
        ("remote_token_file", &raw.store.remote_token_file),
        ("remote_known_hosts", &raw.store.remote_known_hosts),
    ] {
        if let Some(p) = p {
            let full = rep.resolve(p.get_ref());
            let init_creates = for_init && matches!(what, "signing_key" | "allowed_signers");
            if !full.exists() && !init_creates {
                rep.at(
                    p,
                    format!(
                        "store.{what} = {:?} does not exist; create it or remove the setting",
                        full
                    ),
                );
            }
        }
    }
    let schedules_dir = raw
        .daemon
        .schedules
        .as_ref()
        .map(|p| rep.resolve(p.get_ref()))
        .unwrap_or_else(|| rep.base().join("schedules"));
    let store = Store {
        schedules: schedules_dir.clone(),
        ..store
    };
    if let Some(s) = raw.daemon.schedules.as_ref().filter(|_| with_schedules) {
        if !schedules_dir.is_dir() {
            rep.at(
                s,
                format!(
                    "daemon.schedules = {:?} is not a directory; create it (`mkdir -p`) or fix the path",
                    schedules_dir
                ),
            );
        }
    }
    let metrics = match &raw.daemon.metrics {
        None => None,
        Some(m) => {
            match m.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    rep.at(m, format!("daemon.metrics = {:?} is not an address:port such as \"127.0.0.1:9817\"", m.get_ref()));
                    None
                }
            }
        }
    };
    let daemon = Daemon {
        schedules: schedules_dir.clone(),
        socket: raw
            .daemon
            .socket
            .map(|p| rep.resolve(&p))
            .unwrap_or_else(|| PathBuf::from("/run/rotd/rotd.sock")),
        metrics,
        socket_group: raw
            .daemon
            .socket_group
            .clone()
            .or_else(|| Some("rotd".into())),
        allowed_uids: raw.daemon.allowed_uids.clone(),
        shutdown_grace: match &raw.daemon.shutdown_grace {
            None => Duration::from_secs(60),
            Some(g) => bounded(g, "daemon.shutdown_grace", bounds::SHUTDOWN_GRACE, &mut rep)
                .unwrap_or(Duration::from_secs(60)),
        },
    };
    let mut schedules = Vec::new();
    if with_schedules && schedules_dir.is_dir() {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&schedules_dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect(),
            Err(e) => {
                problems.push(Problem {
                    file: schedules_dir.clone(),
                    line: None,
                    message: format!("cannot list the schedules directory: {e}"),
                });
                Vec::new()
            }
        };
        files.sort();
        for f in files {
            if let Some(s) = load_schedule(&f, &mut problems) {
                schedules.push(s);
            }
        }
    }
    check_references(&schedules, &store.path, &mut problems);
    check_consumers(&mut schedules, &store.hosts, &mut problems);
    if problems.is_empty() {
        Ok(Config {
            path: path.to_owned(),
            store,
            daemon,
            schedules,
        })
    } else {
        Err(Error(problems))
    }
}

/// Loads one schedule file; problems go to `problems`.
pub fn load_schedule(file: &Path, problems: &mut Vec<Problem>) -> Option<Schedule> {
    let text = match crate::fsutil::read_text(file, crate::fsutil::MAX_LIST_FILE) {
        Ok(t) => t,
        Err(e) => {
            problems.push(Problem {
                file: file.to_owned(),
                line: None,
                message: format!("cannot read the schedule: {e}"),
            });
            return None;
        }
    };
    parse_schedule_str(&text, file, problems)
}

/// Parses the text of schedule file `file` (its name must be `NAME.toml`; relative
/// paths in it are taken from its directory); problems go to `problems`. This is
/// [`load_schedule`] without the read, for tests and the fuzz targets.
pub fn parse_schedule_str(
    text: &str,
    file: &Path,
    problems: &mut Vec<Problem>,
) -> Option<Schedule> {
    let raw: RawSchedule = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            problems.push(toml_problem(file, text, &e));
            return None;
        }
    };
    let before = problems.len();
    let mut rep = Reporter::new(file, text, problems);
    let name = raw.name.get_ref().clone();
    if !valid_name(&name) {
        rep.at(&raw.name, format!("name = {name:?} is not a valid secret name; use lower-case letters, digits, '-', '_' and '.', starting with a letter or digit"));
    } else if file.file_stem().and_then(|s| s.to_str()) != Some(name.as_str()) {
        rep.at(&raw.name, format!("name = {name:?} does not match the file name; rename the file to {name}.toml or change the name"));
    }
    let cron = raw
        .schedule
        .as_ref()
        .and_then(|c| match validate_cron(c.get_ref()) {
            Ok(()) => Some(c.get_ref().clone()),
            Err(m) => {
                rep.at(c, m);
                None
            }
        });
    let mut dur = |v: &Option<Spanned<String>>, what: &str, default: Duration, bound| match v {
        None => default,
        Some(s) => bounded(s, what, bound, &mut rep).unwrap_or(default),
    };
    let jitter = dur(&raw.jitter, "jitter", Duration::ZERO, bounds::JITTER);
    let grace = dur(
        &raw.grace,
        "grace",
        Duration::from_secs(15 * 60),
        bounds::GRACE,
    );
    let retry_backoff = dur(
        &raw.retry_backoff,
        "retry_backoff",
        Duration::from_secs(60),
        bounds::RETRY_BACKOFF,
    );
    let max_age = raw
        .max_age
        .as_ref()
        .map(|_| dur(&raw.max_age, "max_age", Duration::ZERO, bounds::ANY));
    let retries = raw
        .retries
        .as_ref()
        .and_then(|r| bounded_count(r, "retries", bounds::RETRIES, &mut rep))
        .unwrap_or(3);
    let window = raw
        .window
        .as_ref()
        .and_then(|w| match Window::parse(w.get_ref()) {
            Ok(win) => Some(win),
            Err(m) => {
                rep.at(w, m);
                None
            }
        });
    let mut warnings = Vec::new();
    if let (Some(c), Some(w), Some(span)) = (&cron, &window, &raw.window) {
        if !fires_in_window(c, w, chrono::Utc::now()) {
            warnings.push(Problem {
                file: file.to_owned(),
                line: Some(rep.line_of(span.span().start)),
                message: format!(
                    "window = {:?} (UTC) never contains a time at which schedule = {c:?} fires, so every scheduled rotation would be skipped; move the window or the schedule",
                    span.get_ref()
                ),
            });
        }
    }
    let length = match &raw.generate.length {
        None => 32,
        Some(l) if (16..=4096).contains(l.get_ref()) => *l.get_ref() as usize,
        Some(l) => {
            rep.at(
                l,
                format!(
                    "generate.length = {} is out of range; use 16 to 4096 characters",
                    l.get_ref()
                ),
            );
            32
        }
    };
    let charset = raw.generate.charset.unwrap_or_default();
    let (probe, probe_span) = parse_probe(raw.probe.as_ref(), &mut rep);
    let mut target =
        targets::Config::from_schedule(&raw.target, text, &probe, probe_span, &mut rep);
    if let Some(targets::Config::Elasticsearch(es)) = target.as_mut() {
        es.set_grace(grace);
    }
    let (consumers, consumer_lines) = validate_consumers(raw.consumers.as_deref(), &mut rep);
    let ack_timeout = match &raw.ack_timeout {
        None => DEFAULT_ACK_TIMEOUT,
        Some(a) => {
            bounded(a, "ack_timeout", bounds::ACK_TIMEOUT, &mut rep).unwrap_or(DEFAULT_ACK_TIMEOUT)
        }
    };
    // The slot rule (rotation::slot_in_grace): with alternating users, a run while
    // the previous user is still in grace waits, so a grace longer than the gap
    // between two runs makes every other run wait.
    // With consumers the previous user is held until every host acknowledged too,
    // which may take up to `ack_timeout` before the laggards are even reported.
    if let (Some(c), Some(true)) = (&cron, target.as_ref().map(|t| t.reuses_slots())) {
        let gap = shortest_gap(c, chrono::Utc::now(), GAP_RUNS);
        let (held, what) = if consumers.is_empty() {
            (
                grace,
                format!(
                    "grace = {:?}",
                    humantime::format_duration(grace).to_string()
                ),
            )
        } else {
            (
                grace.saturating_add(ack_timeout),
                format!(
                    "grace + ack_timeout ({} + {}, the consumers' time to acknowledge)",
                    humantime::format_duration(grace),
                    humantime::format_duration(ack_timeout)
                ),
            )
        };
        if let Some(gap) = gap.filter(|g| held > *g) {
            warnings.push(Problem {
                file: file.to_owned(),
                line: raw.grace.as_ref().map(|g| rep.line_of(g.span().start)),
                message: format!(
                    "{what} is longer than the shortest gap between two runs of schedule = {c:?} ({}): a run while the previous user is still in its grace period (or not yet acknowledged by every consumer) waits, so every other scheduled rotation would be skipped; shorten the grace or ack_timeout, or space the runs",
                    humantime::format_duration(gap)
                ),
            });
        }
    }
    let mut deliver = Vec::new();
    for d in &raw.deliver {
        if let Some(spec) = validate_deliver(d, &mut rep) {
            deliver.push(spec);
        }
    }
    if problems.len() > before {
        return None;
    }
    Some(Schedule {
        file: file.to_owned(),
        name,
        cron,
        jitter,
        grace,
        window,
        max_age,
        retries,
        retry_backoff,
        length,
        charset,
        target: target?,
        deliver,
        probe,
        consumers,
        consumer_lines,
        ack_timeout,
        warnings,
    })
}

/// A daily UTC time window `"HH:MM-HH:MM"`; it may wrap midnight (`"22:00-04:00"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: chrono::NaiveTime,
    pub end: chrono::NaiveTime,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        let bad = || format!("window = {s:?} is not \"HH:MM-HH:MM\" (UTC), e.g. \"02:00-05:00\"");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let t = |x: &str| chrono::NaiveTime::parse_from_str(x.trim(), "%H:%M").map_err(|_| bad());
        let w = Window {
            start: t(a)?,
            end: t(b)?,
        };
        if w.start == w.end {
            return Err(bad());
        }
        Ok(w)
    }

    pub fn contains(&self, t: chrono::DateTime<chrono::Utc>) -> bool {
        let now = t.time();
        if self.start < self.end {
            self.start <= now && now < self.end
        } else {
            now >= self.start || now < self.end
        }
    }
}

/// Checks a cron expression with seconds, as the daemon's scheduler reads it.
pub fn validate_cron(expr: &str) -> Result<(), String> {
    let fields = expr.split_whitespace().count();
    if !(6..=7).contains(&fields) {
        return Err(format!(
            "schedule = {expr:?} has {fields} fields; rotd's cron has seconds first: \"sec min hour day month weekday\", e.g. \"0 0 3 * * Sun\""
        ));
    }
    // Seconds, minutes and hours take numbers, `*`, ranges, steps and lists only.
    // croner also parses `L`/`W`/`#` there, and then searches minute by minute up to the
    // year 5000 for a time that never comes (seconds of CPU; found by the next_run
    // fuzz target).
    for (field, what) in expr.split_whitespace().zip(["seconds", "minutes", "hours"]) {
        if let Some(c) = field
            .chars()
            .find(|c| !(c.is_ascii_digit() || "*/-,?".contains(*c)))
        {
            return Err(format!(
                "schedule = {expr:?}: the {what} field {field:?} holds {c:?}; it takes numbers, `*`, ranges (`1-5`), steps (`*/15`) and lists (`0,30`) only"
            ));
        }
    }
    let cron = parse_cron(expr).map_err(|e| {
        format!("schedule = {expr:?} is not a valid cron expression ({e}); e.g. \"0 0 3 * * Sun\"")
    })?;
    // A day that no month in the expression has (31 February), or a day and weekday
    // that never meet: croner searches up to the year 5000 and gives up.
    if cron
        .find_next_occurrence(&chrono::Utc::now(), false)
        .is_err()
    {
        return Err(format!(
            "schedule = {expr:?} never fires: no date has that day of the month in those months (on that weekday); fix the day, month or weekday field"
        ));
    }
    Ok(())
}

/// A cron expression as the scheduler reads it: croner takes 6 fields (with seconds);
/// a 7th (year) field is accepted and ignored.
fn parse_cron(expr: &str) -> Result<croner::Cron, croner::errors::CronError> {
    let six: Vec<&str> = expr.split_whitespace().take(6).collect();
    croner::Cron::new(&six.join(" "))
        .with_seconds_required()
        .with_dom_and_dow()
        .parse()
}

/// Whether the (valid) cron fires inside the daily window on one of the next 367
/// days. Each day, the first fire time at or after the window opens is looked up.
/// How many upcoming runs [`shortest_gap`] looks at for `rotd check`.
const GAP_RUNS: usize = 16;

/// The shortest gap between two consecutive fire times of `expr` among its next
/// `runs` fire times after `from`; None when it fires fewer than twice.
fn shortest_gap(expr: &str, from: chrono::DateTime<chrono::Utc>, runs: usize) -> Option<Duration> {
    let cron = parse_cron(expr).ok()?;
    let mut prev = cron.find_next_occurrence(&from, false).ok()?;
    let mut shortest: Option<Duration> = None;
    for _ in 1..runs {
        let Ok(next) = cron.find_next_occurrence(&prev, false) else {
            break;
        };
        let gap = (next - prev).to_std().ok()?;
        shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
        prev = next;
    }
    shortest
}

fn fires_in_window(expr: &str, w: &Window, from: chrono::DateTime<chrono::Utc>) -> bool {
    let Ok(cron) = parse_cron(expr) else {
        return true; // reported as invalid elsewhere
    };
    let day = chrono::TimeDelta::days(1);
    let open = if w.start < w.end {
        w.end - w.start
    } else {
        day - (w.start - w.end)
    };
    let mut date = from.date_naive();
    for _ in 0..367 {
        let start = date.and_time(w.start).and_utc();
        if let Ok(t) = cron.find_next_occurrence(&start, true) {
            if t < start + open {
                return true;
            }
        }
        match date.succ_opt() {
            Some(d) => date = d,
            None => return true,
        }
    }
    false
}

pub(crate) fn validate_deliver(
    d: &Spanned<RawDeliver>,
    rep: &mut Reporter<'_>,
) -> Option<deliver::Spec> {
    let raw = d.get_ref();
    let before = rep.count();
    let body = match (&raw.content, &raw.template) {
        (Some(c), None) => {
            if let Err(m) = deliver::check_placeholders(c.get_ref()) {
                rep.at(c, format!("deliver.content: {m}"));
            }
            c.get_ref().clone()
        }
        (None, Some(t)) => {
            let full = rep.resolve(t.get_ref());
            match crate::fsutil::read_text(&full, crate::fsutil::MAX_LIST_FILE) {
                Ok(body) => {
                    if let Err(m) = deliver::check_placeholders(&body) {
                        rep.at(t, format!("template {}: {m}", full.display()));
                    }
                    body
                }
                Err(e) => {
                    rep.at(
                        t,
                        format!(
                            "template {} cannot be read: {e}; create it or fix the path",
                            full.display()
                        ),
                    );
                    String::new()
                }
            }
        }
        _ => {
            rep.at(
                d,
                "a [[deliver]] needs exactly one of `content` or `template`",
            );
            String::new()
        }
    };
    if let Err(m) = deliver::check_path_placeholders(raw.path.get_ref()) {
        rep.at(&raw.path, format!("deliver.path: {m}"));
    }
    let path_template = raw.path.get_ref().clone();
    if !Path::new(&path_template).is_absolute() {
        rep.at(
            &raw.path,
            format!("deliver.path = {path_template:?} must be absolute"),
        );
    }
    let mode = match &raw.mode {
        None => 0o600,
        Some(m) => {
            let parsed = match m.get_ref() {
                ModeValue::Int(i) => u32::try_from(*i).ok(),
                ModeValue::Str(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
            };
            match parsed {
                Some(v) if v <= 0o777 => v,
                _ => {
                    rep.at(
                        m,
                        "deliver.mode must be an octal permission string such as \"0640\"",
                    );
                    0o600
                }
            }
        }
    };
    if mode & 0o007 != 0 {
        if let Some(m) = &raw.mode {
            rep.at(m, format!("deliver.mode {mode:04o} lets every user read the secret; use \"0640\" with a group, or \"0600\""));
        }
    }
    let reload = raw.reload.as_ref().and_then(|r| {
        let v = r.get_ref();
        let set = [v.http_post.is_some(), v.signal.is_some(), v.exec.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            rep.at(
                r,
                "reload needs exactly one of http_post, signal (with pidfile) or exec",
            );
            return None;
        }
        if let Some(u) = &v.http_post {
            return Some(deliver::Reload::HttpPost(u.clone()));
        }
        if let Some(sig) = &v.signal {
            let Some(pidfile) = &v.pidfile else {
                rep.at(r, "reload with `signal` also needs `pidfile`");
                return None;
            };
            return match deliver::parse_signal(sig) {
                Ok(s) => Some(deliver::Reload::Signal {
                    signal: s,
                    pidfile: rep.resolve(pidfile),
                }),
                Err(m) => {
                    rep.at(r, m);
                    None
                }
            };
        }
        match &v.exec {
            Some(argv) if !argv.is_empty() => Some(deliver::Reload::Exec(argv.clone())),
            _ => {
                rep.at(
                    r,
                    "reload.exec must name a program: exec = [\"systemctl\", \"reload\", \"svc\"]",
                );
                None
            }
        }
    });
    if rep.count() > before {
        return None;
    }
    Some(deliver::Spec {
        path: path_template,
        body,
        mode,
        reload,
    })
}

/// Secret references (`query_credential`, `admin_credential`) must name a schedule or
/// a secret already in the store.
fn check_references(schedules: &[Schedule], store: &Path, problems: &mut Vec<Problem>) {
    let names: BTreeSet<&str> = schedules.iter().map(|s| s.name.as_str()).collect();
    let mut seen = BTreeMap::new();
    for s in schedules {
        if let Some(prev) = seen.insert(s.name.as_str(), &s.file) {
            problems.push(Problem {
                file: s.file.clone(),
                line: None,
                message: format!(
                    "secret {:?} is also defined in {}; keep one",
                    s.name,
                    prev.display()
                ),
            });
        }
        for (field, r) in s.target.references() {
            let in_store = store.join("secrets").join(format!("{r}.age")).exists();
            if !names.contains(r) && !in_store {
                problems.push(Problem {
                    file: s.file.clone(),
                    line: None,
                    message: format!("target.{field} = {r:?} names no schedule and no secret in the store; run `rotd import {r}` with the credential on stdin, or fix the name"),
                });
            }
            if r == s.name {
                problems.push(Problem {
                    file: s.file.clone(),
                    line: None,
                    message: format!(
                        "target.{field} names the secret itself; it must be another credential"
                    ),
                });
            }
        }
    }
}

// ---------------------------------------------------------------- hosts and consumers

/// `ack_timeout` when a schedule does not set it.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(3_600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    recipient: Spanned<String>,
    signer: Option<Spanned<String>>,
}

/// Checks an age recipient as a host's `recipient`: an X25519 `age1…` recipient or an
/// `ssh-ed25519` line. The value is never repeated in the message (a private key
/// pasted by mistake must not reach a log).
pub fn check_host_recipient(line: &str) -> Result<(), String> {
    use std::str::FromStr;
    let line = line.trim();
    if line.starts_with("age1") {
        age::x25519::Recipient::from_str(line)
            .map(|_| ())
            .map_err(|_| "is not a valid age X25519 recipient (an `age1…` line as printed by `age-keygen -y`)".into())
    } else if line.starts_with("ssh-ed25519 ") {
        age::ssh::Recipient::from_str(line)
            .map(|_| ())
            .map_err(|_| {
                "is not a valid ssh-ed25519 public key line (as in the host's `.pub` file)".into()
            })
    } else {
        Err("is neither an age X25519 recipient (`age1…`) nor an `ssh-ed25519 AAAA…` public key line; put the host's public key there (`age-keygen -y KEYFILE`)".into())
    }
}

fn validate_hosts(
    raw: &BTreeMap<String, Spanned<RawHost>>,
    rep: &mut Reporter<'_>,
) -> BTreeMap<String, Host> {
    let mut hosts = BTreeMap::new();
    for (name, h) in raw {
        let before = rep.count();
        if !valid_name(name) {
            rep.at(h, format!("[hosts.{name}]: {name:?} is not a valid host name; use lower-case letters, digits, '-', '_' and '.', starting with a letter or digit"));
        }
        let raw_host = h.get_ref();
        if let Err(m) = check_host_recipient(raw_host.recipient.get_ref()) {
            rep.at(&raw_host.recipient, format!("hosts.{name}.recipient {m}"));
        }
        let signer = raw_host.signer.as_ref().and_then(|s| {
            match ssh_key::PublicKey::from_openssh(s.get_ref().trim()) {
                Ok(k) => Some(k),
                Err(_) => {
                    rep.at(s, format!("hosts.{name}.signer is not an OpenSSH public key line (`ssh-ed25519 AAAA… comment`, as in the host's signing key `.pub` file)"));
                    None
                }
            }
        });
        if rep.count() == before {
            hosts.insert(
                name.clone(),
                Host {
                    name: name.clone(),
                    recipient: raw_host.recipient.get_ref().trim().to_owned(),
                    signer,
                },
            );
        }
    }
    hosts
}

/// A schedule's `consumers`: host names, each once; with the line of each.
fn validate_consumers(
    raw: Option<&[Spanned<String>]>,
    rep: &mut Reporter<'_>,
) -> (Vec<String>, Vec<usize>) {
    let (mut names, mut lines) = (Vec::new(), Vec::new());
    for c in raw.unwrap_or_default() {
        let name = c.get_ref();
        if !valid_name(name) {
            rep.at(c, format!("consumers: {name:?} is not a valid host name; use the name of a [hosts.NAME] table of rotd.toml"));
        } else if names.contains(name) {
            rep.at(c, format!("consumers: {name:?} is listed twice; keep one"));
        } else {
            names.push(name.clone());
            lines.push(rep.line_of(c.span().start));
        }
    }
    (names, lines)
}

/// Every consumer must be a host declared in `rotd.toml`.
fn check_consumers(
    schedules: &mut [Schedule],
    hosts: &BTreeMap<String, Host>,
    problems: &mut Vec<Problem>,
) {
    for s in schedules {
        for (c, line) in s.consumers.iter().zip(&s.consumer_lines) {
            if let Some(h) = hosts.get(c) {
                if h.signer.is_none() {
                    // Its acknowledgements cannot be verified, so none counts: the
                    // old credential would be kept until `retire --force`.
                    s.warnings.push(Problem {
                        file: s.file.clone(),
                        line: Some(*line),
                        message: format!("consumers: host {c:?} has no `signer` in [hosts.{c}] of rotd.toml, so its acknowledgements cannot be verified and the old credential of {} is never retired by itself; add the public line of the host's signing key as hosts.{c}.signer", s.name),
                    });
                }
                continue;
            }
            let hint = did_you_mean(c, hosts.keys().map(String::as_str))
                .map(|h| format!(" (did you mean {h:?}?)"))
                .unwrap_or_default();
            problems.push(Problem {
                file: s.file.clone(),
                line: Some(*line),
                message: format!("consumers: {c:?} is not a host declared in rotd.toml{hint}; add a [hosts.{c}] table with its recipient, or fix the name"),
            });
        }
    }
}

/// The known name closest to `name`, when it is close enough to be a typo.
fn did_you_mean<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shortest_gap_between_runs_is_found_among_uneven_fire_times() {
        let from = chrono::DateTime::parse_from_rfc3339("2026-12-02T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let gap = |c| shortest_gap(c, from, GAP_RUNS);
        assert_eq!(gap("0 */30 * * * *"), Some(Duration::from_secs(1800)));
        // 03:00 and 03:10 every day: 10 minutes, not a day.
        assert_eq!(gap("0 0,10 3 * * *"), Some(Duration::from_secs(600)));
        assert_eq!(gap("0 0 3 * * Sun"), Some(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn cron_needs_seconds() {
        validate_cron("0 0 3 * * Sun").unwrap();
        validate_cron("*/5 * * * * *").unwrap();
        assert!(validate_cron("0 3 * * *")
            .unwrap_err()
            .contains("seconds first"));
        assert!(validate_cron("0 0 25 * * *").is_err());
    }

    #[test]
    fn a_cron_that_never_fires_is_refused() {
        for never in ["0 0 0 31 2 *", "0 0 0 30 2 *", "0 0 0 31 4,6,9,11 *"] {
            let e = validate_cron(never).unwrap_err();
            assert!(e.contains("never fires"), "{never}: {e}");
        }
        // Rare is not never: 29 February, and 29 February on a Monday.
        validate_cron("0 0 0 29 2 *").unwrap();
        // Found by the next_run fuzz target: `L` in the seconds field made croner
        // search for minutes.
        let e = validate_cron("l 0 3 * * Sun").unwrap_err();
        assert!(e.contains("seconds field"), "{e}");
        assert!(validate_cron("0 0 L * * *").is_err());
        validate_cron("0,30 */5 1-5 L * *").unwrap();
        validate_cron("0 0 0 29 2 Mon").unwrap();
    }

    #[test]
    fn a_window_is_checked_against_the_cron_fire_times() {
        let now = chrono::Utc::now();
        let w = Window::parse("02:00-05:00").unwrap();
        assert!(fires_in_window("0 0 3 * * *", &w, now));
        assert!(fires_in_window("0 59 4 * * *", &w, now));
        assert!(!fires_in_window("0 0 5 * * *", &w, now));
        assert!(!fires_in_window("0 0 12 * * *", &w, now));
        // Wrapping midnight; and a weekly cron.
        let w = Window::parse("22:00-01:00").unwrap();
        assert!(fires_in_window("0 30 0 * * *", &w, now));
        assert!(fires_in_window("0 0 23 * * Sun", &w, now));
        assert!(!fires_in_window("0 0 1 * * *", &w, now));
    }

    #[test]
    fn every_duration_has_an_upper_bound_reported_at_its_line() {
        let file = Path::new("/nonexistent/s.toml");
        for (line, field, value) in [
            ("jitter = \"100000000y\"", "jitter", "100000000y"),
            ("jitter = \"25h\"", "jitter", "25h"),
            ("grace = \"366d\"", "grace", "366d"),
            ("max_age = \"11y\"", "max_age", "11y"),
            ("retry_backoff = \"25h\"", "retry_backoff", "25h"),
            ("retries = 101", "retries", "101"),
            ("[probe]\ntimeout = \"11m\"", "probe.timeout", "11m"),
            ("[probe]\ninterval = \"2h\"", "probe.interval", "2h"),
            ("[probe]\nattempts = 1001", "probe.attempts", "1001"),
        ] {
            let (head, probe) = match line.strip_prefix("[probe]\n") {
                Some(p) => ("", format!("[probe]\n{p}\n")),
                None => (line, String::new()),
            };
            let text = format!(
                "name = \"s\"\nschedule = \"0 0 4 * * *\"\n{head}\n[target]\nkind = \"files\"\n{probe}"
            );
            let mut problems = Vec::new();
            assert!(
                parse_schedule_str(&text, file, &mut problems).is_none(),
                "{line}"
            );
            let p = problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n");
            let want = if probe.is_empty() { 3 } else { 7 };
            assert!(
                p.contains(&format!("s.toml:{want}: {field}")) && p.contains(value),
                "{line}: {p}"
            );
        }
        // At the limits: accepted.
        let text = "name = \"s\"\nschedule = \"0 0 4 * * *\"\njitter = \"24h\"\ngrace = \"365d\"\nmax_age = \"10y\"\nretries = 100\n[target]\nkind = \"files\"\n[probe]\ntimeout = \"10m\"\ninterval = \"1h\"\nattempts = 1000\n";
        let mut problems = Vec::new();
        assert!(
            parse_schedule_str(text, file, &mut problems).is_some(),
            "{problems:?}"
        );
    }

    #[test]
    fn ack_timeout_is_bounded_and_consumers_are_checked_at_their_line() {
        let file = Path::new("/nonexistent/s.toml");
        let parse = |extra: &str| {
            let text = format!(
                "name = \"s\"\nschedule = \"0 0 4 * * *\"\n{extra}\n[target]\nkind = \"files\"\n"
            );
            let mut problems = Vec::new();
            let s = parse_schedule_str(&text, file, &mut problems);
            (
                s,
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        };
        let (s, p) = parse("ack_timeout = \"31d\"");
        assert!(
            s.is_none() && p.contains("s.toml:3: ack_timeout") && p.contains("30d"),
            "{p}"
        );
        let (s, p) = parse("consumers = [\"web-1\", \"web-1\"]\nack_timeout = \"30d\"");
        assert!(
            s.is_none() && p.contains("s.toml:3: consumers: \"web-1\" is listed twice"),
            "{p}"
        );
        let (s, p) = parse("consumers = [\"web-1\",\n  \"web-2\"]\nack_timeout = \"30d\"");
        let s = s.unwrap_or_else(|| panic!("{p}"));
        assert_eq!(s.consumers, ["web-1", "web-2"]);
        assert_eq!(s.consumer_lines, [3, 4]);
        assert_eq!(s.ack_timeout, Duration::from_secs(30 * 86_400));
        let (s, _) = parse("");
        assert_eq!(s.map(|s| s.ack_timeout), Some(DEFAULT_ACK_TIMEOUT));
    }

    #[test]
    fn a_typo_in_a_host_name_gets_a_suggestion() {
        let hosts = ["web-1", "web-2", "db-main"];
        assert_eq!(did_you_mean("web1", hosts.into_iter()), Some("web-1"));
        assert_eq!(did_you_mean("db-mian", hosts.into_iter()), Some("db-main"));
        assert_eq!(did_you_mean("cache", hosts.into_iter()), None);
    }

    #[test]
    fn host_recipients_are_age_or_ssh_ed25519_lines() {
        let id = age::x25519::Identity::generate();
        check_host_recipient(&id.to_public().to_string()).unwrap();
        let (_, ssh) = crate::signing::Signer::generate("h@x").unwrap();
        check_host_recipient(&ssh).unwrap();
        for bad in [
            "age1nope",
            "ssh-rsa AAAA",
            "ssh-ed25519 AAAAnotbase64!",
            "web-1",
            "",
        ] {
            assert!(check_host_recipient(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("prom-remote-write"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("x.pending"));
        assert!(!valid_name("Upper"));
    }
}
