//! `rotd run`: the long-running host service.
//!
//! ```text
//!  cron tasks ─┐                     ┌─► rotation tasks (Engine::rotate; joined per secret)
//!  socket ─────┼─► Command channel ──┼─► reload (schedules re-read; bad files keep their old version)
//!  SIGHUP ─────┤      (one loop)     └─► retire (timers at each retire-after; retried with backoff)
//!  watcher ────┘
//!  /metrics, /healthz ◄── Metrics + status report     sd_notify: READY, WATCHDOG, STOPPING
//! ```
//!
//! Everything that starts work sends a [`Command`] to one channel; the loop owns the
//! schedule tasks and spawns rotations. Nothing polls: cron tasks sleep until their
//! next fire time, retire timers until the grace ends, the watcher waits on inotify.
//!
//! Concurrency: two requests to rotate the same secret JOIN — the second gets the
//! outcome of the rotation already running instead of starting another (different
//! secrets rotate in parallel). Between processes, the per-secret `flock` and the
//! store's push CAS still apply.
//!
//! Local clients are not trusted to be polite: the socket refuses a uid before reading
//! from it, and both listeners bound connections, request size and idle time, and
//! pause on `EMFILE` ([`limits`]). Every rotation ends with a log line here, so that
//! an engine error is never seen only by a client that has gone.
//!
//! Shutdown: the `shutdown` future (SIGTERM/SIGINT in `main`) stops new rotations and
//! waits for in-flight ones, bounded by `[daemon] shutdown_grace`; a rotation never
//! stops half-way on its own, and a hard kill is covered by the journal (recovery at
//! the next start).

pub mod http;
pub mod limits;
pub mod scheduler;
pub mod systemd;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use crate::config::{self, Config, Problem, Schedule};
use crate::control::{Request, Response, RotateResult};
use crate::metrics::{Gauges, Metrics, SecretGauges};
use crate::rotation::{Engine, Outcome, Trigger};
use crate::store::record::key;
use crate::store::{Slot, Store};

/// The daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error(transparent)]
    Rotation(#[from] crate::rotation::Error),
    #[error("cannot listen on {what} {addr}: {source}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch {path}: {reason}")]
    Watch { path: PathBuf, reason: String },
}

type RotationResult = Result<Outcome, String>;

/// Work for the daemon's loop.
pub enum Command {
    Rotate {
        names: Vec<String>,
        trigger: Trigger,
        reply: oneshot::Sender<Vec<(String, RotationResult)>>,
    },
    Reload {
        reply: Option<oneshot::Sender<String>>,
    },
    Retire,
    /// The recipients file changed: re-encrypt every secret to the new set.
    Rekey,
}

struct Shared {
    config_path: PathBuf,
    config: RwLock<Arc<Config>>,
    /// Replaced when the recipients file changes (the keys are part of the store).
    store: RwLock<Arc<Store>>,
    metrics: Metrics,
    next_runs: Mutex<BTreeMap<String, DateTime<Utc>>>,
    schedule_errors: Mutex<Vec<Problem>>,
    /// History at a HEAD commit (see [`Shared::history`]).
    history_cache: Mutex<Option<(git2::Oid, Arc<Vec<crate::history::Entry>>)>>,
    inflight: Mutex<HashMap<String, watch::Receiver<Option<RotationResult>>>>,
    active: AtomicUsize,
    idle: Notify,
    stopping: AtomicBool,
    tx: mpsc::Sender<Command>,
}

impl Shared {
    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn store(&self) -> Arc<Store> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn engine(&self) -> Engine {
        Engine::new(self.config(), self.store())
    }

    /// Rotates one secret, or joins the rotation of it already running.
    ///
    /// The rotation runs in a task of its own: when the caller goes away (a schedule
    /// task aborted at shutdown, a control client that hung up), the rotation still
    /// runs to its end, and shutdown waits for it.
    async fn rotate(self: &Arc<Self>, name: &str, trigger: Trigger) -> RotationResult {
        if self.stopping.load(Ordering::SeqCst) {
            return Err("the daemon is shutting down; rotation not started".into());
        }
        let mut rx = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(name) {
                Some(rx) => {
                    tracing::info!(
                        secret = name,
                        "a rotation of this secret is running; joining it"
                    );
                    rx.clone()
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(name.to_owned(), rx.clone());
                    self.active.fetch_add(1, Ordering::SeqCst);
                    let sh = self.clone();
                    let name = name.to_owned();
                    tokio::spawn(async move { sh.run_rotation(name, trigger, tx).await });
                    rx
                }
            }
        };
        let result = match rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v
                .clone()
                .unwrap_or_else(|| Err("the rotation vanished".into())),
            Err(_) => Err("the rotation ended without a result".into()),
        };
        result
    }

    /// The body of [`Shared::rotate`]'s task: rotate, count, publish, deregister.
    async fn run_rotation(
        self: Arc<Self>,
        name: String,
        trigger: Trigger,
        tx: watch::Sender<Option<RotationResult>>,
    ) {
        let started = Instant::now();
        let result = self
            .engine()
            .rotate(&name, trigger.clone())
            .await
            .map_err(|e| e.to_string());
        let label = match &result {
            Ok(o) => o.label(),
            Err(_) => "error",
        };
        // Every outcome leaves a line in the daemon's log, whoever asked for the
        // rotation: an engine error otherwise reached only a client that may be gone.
        match &result {
            Ok(
                o @ (Outcome::Succeeded { .. } | Outcome::Updated { .. } | Outcome::Waiting { .. }),
            ) => {
                tracing::info!(secret = %name, %trigger, outcome = o.label(), message = %o.message(), "rotation ended")
            }
            Ok(o @ (Outcome::RolledBack { .. } | Outcome::Aborted { .. })) => {
                tracing::warn!(secret = %name, %trigger, outcome = o.label(), message = %o.message(), "rotation ended")
            }
            Ok(o @ Outcome::Failed { .. }) => {
                tracing::error!(secret = %name, %trigger, outcome = o.label(), message = %o.message(), "rotation ended")
            }
            Err(e) => {
                tracing::error!(secret = %name, %trigger, error = %e, "rotation could not run")
            }
        }
        self.metrics
            .rotation(&name, label, started.elapsed().as_secs_f64());
        if matches!(result, Ok(Outcome::Succeeded { retired: false, .. })) {
            self.schedule_retire_from_store(&name);
        }
        let _ = tx.send(Some(result));
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name);
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Sets a timer for the secret's pending retirement, read from its record.
    fn schedule_retire_from_store(self: &Arc<Self>, name: &str) {
        let store = self.store();
        let name = name.to_owned();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let after = tokio::task::spawn_blocking(move || {
                store
                    .read(&name, Slot::Current)
                    .ok()
                    .flatten()
                    .and_then(|r| {
                        r.get(key::RETIRE_AFTER)
                            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                            .map(|t| t.with_timezone(&Utc))
                    })
            })
            .await
            .ok()
            .flatten();
            if let Some(at) = after {
                let wait = (at - Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
                let _ = tx.send(Command::Retire).await;
            }
        });
    }

    /// The audit trail, read again only when HEAD moved: status and every metrics
    /// scrape use it, and a long history takes a while to walk.
    fn history(
        &self,
        store: &Store,
    ) -> Result<Arc<Vec<crate::history::Entry>>, crate::store::Error> {
        let head = store.repo()?.head().ok().and_then(|h| h.target());
        let mut cache = self.history_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((oid, entries)) = cache.as_ref() {
            if Some(*oid) == head {
                return Ok(entries.clone());
            }
        }
        let entries = Arc::new(crate::history::read(store, None)?);
        *cache = head.map(|h| (h, entries.clone()));
        Ok(entries)
    }

    fn status(&self) -> Result<crate::status::Report, crate::store::Error> {
        let cfg = self.config();
        let next = self
            .next_runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let store = self.store();
        let history = self.history(&store)?;
        let mut r =
            crate::status::report_from(&cfg, &store, &history, |s| next.get(&s.name).copied())?;
        r.schedule_errors = self
            .schedule_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| p.to_string())
            .collect();
        r.daemon = true;
        Ok(r)
    }

    async fn render_metrics(self: Arc<Self>) -> String {
        let me = self.clone();
        let report = tokio::task::spawn_blocking(move || me.status()).await;
        let mut g = Gauges::default();
        if let Ok(Ok(r)) = report {
            for s in &r.secrets {
                let unix = |t: &Option<String>| {
                    t.as_deref()
                        .and_then(|x| DateTime::parse_from_rfc3339(x).ok())
                        .map(|t| t.timestamp())
                };
                g.secrets.insert(
                    s.name.clone(),
                    SecretGauges {
                        last_success: unix(&s.last_success),
                        age: s.age_seconds,
                        next_rotation: unix(&s.next_run),
                        consumers_lagging: self
                            .engine()
                            .config
                            .schedule(&s.name)
                            .filter(|c| !c.consumers.is_empty())
                            .map(|_| s.lagging.len()),
                    },
                );
                if s.retire_after.is_some() {
                    g.pending_retirements += 1;
                }
            }
            g.schedule_errors = r.schedule_errors.len();
            g.remote_refused = r.remote_refused.is_some();
        }
        self.metrics.render(&g)
    }
}

fn describe(o: &RotationResult) -> (String, i32, String) {
    match o {
        Ok(o) => (o.label().into(), o.exit_code(), o.message()),
        Err(e) => ("error".into(), 1, e.clone()),
    }
}

/// Loads every schedule file; an invalid file keeps its previous valid version.
fn load_schedules(dir: &Path, previous: &[Schedule]) -> (Vec<Schedule>, Vec<Problem>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for f in files {
        let mut p = Vec::new();
        match config::load_schedule(&f, &mut p) {
            Some(s) if p.is_empty() => {
                for w in &s.warnings {
                    tracing::warn!(warning = %w, "schedule file loaded with a warning");
                }
                out.push(s)
            }
            _ => {
                for x in &p {
                    tracing::error!(problem = %x, "invalid schedule file; its previous version keeps running");
                }
                problems.extend(p);
                if let Some(old) = previous.iter().find(|s| s.file == f) {
                    out.push(old.clone());
                }
            }
        }
    }
    (out, problems)
}

/// Runs the daemon until `shutdown` resolves, then drains in-flight rotations.
pub async fn run(config_path: PathBuf, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let base = config::load_store_only(&config_path)?;
    let (schedules, problems) = load_schedules(&base.daemon.schedules, &[]);
    let cfg = Arc::new(Config { schedules, ..base });
    let store = {
        let c = cfg.store.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || Store::open(&c))
                .await
                .map_err(|e| crate::rotation::Error::Join(e.to_string()))??,
        )
    };
    let (tx, mut rx) = mpsc::channel::<Command>(256);
    let shared = Arc::new(Shared {
        config_path: config_path.clone(),
        config: RwLock::new(cfg.clone()),
        store: RwLock::new(store.clone()),
        metrics: Metrics::default(),
        next_runs: Mutex::new(BTreeMap::new()),
        schedule_errors: Mutex::new(problems),
        history_cache: Mutex::new(None),
        inflight: Mutex::new(HashMap::new()),
        active: AtomicUsize::new(0),
        idle: Notify::new(),
        stopping: AtomicBool::new(false),
        tx: tx.clone(),
    });

    // Recovery before anything is scheduled.
    for (name, outcome) in shared.engine().recover_all().await? {
        tracing::warn!(secret = %name, outcome = ?outcome, "recovered an unfinished rotation");
    }

    let control = bind_control(&cfg)?;
    let metrics_listener = match cfg.daemon.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Listen {
                    what: "metrics",
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let _watcher = watch_dir(&cfg.daemon.schedules, None, tx.clone(), || {
        Command::Reload { reply: None }
    })?;
    let _recipients_watcher = match &cfg.store.recipients {
        Some(file) => Some(watch_dir(
            file.parent().unwrap_or(Path::new(".")),
            file.file_name().map(|n| n.to_owned()),
            tx.clone(),
            || Command::Rekey,
        )?),
        None => None,
    };
    let mut tasks = plan(&shared);
    startup_rotations(&shared);
    for s in &cfg.schedules {
        shared.schedule_retire_from_store(&s.name);
    }

    let mut background = Vec::new();
    background.push(tokio::spawn(serve_control(control, shared.clone())));
    if let Some(l) = metrics_listener {
        let sh = shared.clone();
        background.push(tokio::spawn(http::serve(l, move || {
            sh.clone().render_metrics()
        })));
    }
    if let Some(every) = systemd::watchdog_interval() {
        background.push(tokio::spawn(async move {
            loop {
                systemd::notify("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        }));
    }
    background.push(tokio::spawn(sighup(tx.clone())));
    systemd::notify("READY=1");
    tracing::info!(config = %config_path.display(), schedules = cfg.schedules.len(), "rotd daemon ready");

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Command::Rotate { names, trigger, reply }) => {
                    let sh = shared.clone();
                    // Different secrets rotate in parallel; results in request order.
                    let handles: Vec<_> = names
                        .into_iter()
                        .map(|n| {
                            let sh = sh.clone();
                            let t = trigger.clone();
                            tokio::spawn(async move {
                                let r = sh.rotate(&n, t).await;
                                (n, r)
                            })
                        })
                        .collect();
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        for h in handles {
                            match h.await {
                                Ok(r) => out.push(r),
                                Err(e) => out.push((String::new(), Err(e.to_string()))),
                            }
                        }
                        let _ = reply.send(out);
                    });
                }
                Some(Command::Reload { reply }) => {
                    let msg = reload(&shared, &mut tasks);
                    if let Some(r) = reply {
                        let _ = r.send(msg);
                    }
                }
                Some(Command::Retire) => {
                    let sh = shared.clone();
                    tokio::spawn(async move { retire(sh).await });
                }
                Some(Command::Rekey) => {
                    let sh = shared.clone();
                    tokio::spawn(async move { rekey(sh).await });
                }
            }
        }
    }

    tracing::info!("shutting down: waiting for rotations in flight");
    systemd::notify("STOPPING=1");
    shared.stopping.store(true, Ordering::SeqCst);
    for t in tasks.values() {
        t.abort();
    }
    let grace = shared.config().daemon.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        loop {
            let idle = shared.idle.notified();
            if shared.active.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(?grace, "rotations still in flight after the shutdown grace; the journal will recover them at the next start");
    }
    for b in background {
        b.abort();
    }
    let _ = std::fs::remove_file(&shared.config().daemon.socket);
    tracing::info!("rotd daemon stopped");
    Ok(())
}

/// One task per schedule with a cron expression.
fn plan(shared: &Arc<Shared>) -> HashMap<String, JoinHandle<()>> {
    let cfg = shared.config();
    let mut tasks = HashMap::new();
    let mut next = shared.next_runs.lock().unwrap_or_else(|p| p.into_inner());
    next.clear();
    for s in cfg.schedules.iter().filter(|s| s.cron.is_some()) {
        let Some(first) = scheduler::next_run(s, Utc::now()) else {
            tracing::error!(secret = %s.name, cron = ?s.cron, "the schedule has no next run (no fire time, or one out of the calendar's range); it will not rotate until its file is fixed");
            continue;
        };
        next.insert(s.name.clone(), first);
        tasks.insert(
            s.name.clone(),
            tokio::spawn(schedule_task(shared.clone(), s.clone(), first)),
        );
    }
    tasks
}

async fn schedule_task(shared: Arc<Shared>, sched: Schedule, mut at: DateTime<Utc>) {
    loop {
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        if sched.window.is_some_and(|w| !w.contains(Utc::now())) {
            tracing::info!(secret = %sched.name, "scheduled rotation skipped: outside its window");
        } else {
            let name = sched.name.clone();
            scheduler::retry(
                sched.retries,
                sched.retry_backoff,
                sched.window,
                Utc::now,
                || {
                    let sh = shared.clone();
                    let n = name.clone();
                    // A run that waits for a retirement is not retried: the
                    // retire timer and the next fire time take it from there.
                    async move {
                        matches!(
                            sh.rotate(&n, Trigger::Schedule).await,
                            Ok(Outcome::Succeeded { .. } | Outcome::Waiting { .. })
                        )
                    }
                },
            )
            .await;
        }
        let Some(next) = scheduler::next_run(&sched, Utc::now()) else {
            tracing::error!(secret = %sched.name, cron = ?sched.cron, "the schedule has no next run (no fire time, or one out of the calendar's range); it will not rotate until its file is fixed");
            shared
                .next_runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sched.name);
            return;
        };
        at = next;
        shared
            .next_runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sched.name.clone(), at);
    }
}

/// `max_age`: rotate at start-up the secrets whose credential is too old.
fn startup_rotations(shared: &Arc<Shared>) {
    let sh = shared.clone();
    tokio::spawn(async move {
        let me = sh.clone();
        let Ok(Ok(report)) = tokio::task::spawn_blocking(move || me.status()).await else {
            return;
        };
        let cfg = sh.config();
        for s in cfg.schedules.iter().filter(|s| s.max_age.is_some()) {
            let age = report
                .secrets
                .iter()
                .find(|r| r.name == s.name)
                .and_then(|r| r.age_seconds);
            if scheduler::too_old(s.max_age, age) {
                tracing::info!(secret = %s.name, ?age, "credential older than max_age; rotating now");
                let _ = sh.rotate(&s.name, Trigger::Schedule).await;
            }
        }
    });
}

fn reload(shared: &Arc<Shared>, tasks: &mut HashMap<String, JoinHandle<()>>) -> String {
    let old = shared.config();
    let (schedules, problems) = load_schedules(&old.daemon.schedules, &old.schedules);
    let n = schedules.len();
    let errors = problems.len();
    *shared.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Config {
        schedules,
        ..(*old).clone()
    });
    *shared
        .schedule_errors
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = problems;
    shared
        .metrics
        .reload(if errors == 0 { "ok" } else { "errors" });
    for t in tasks.values() {
        t.abort();
    }
    *tasks = plan(shared);
    tracing::info!(schedules = n, errors, config = %shared.config_path.display(), "schedules reloaded");
    // A permission change applies now (in place where the target allows), not at the
    // next scheduled rotation.
    let new = shared.config();
    for s in &new.schedules {
        let changed = old
            .schedule(&s.name)
            .is_some_and(|o| s.target.permissions_changed(&o.target, &s.name));
        if changed {
            tracing::info!(secret = %s.name, "permissions changed; updating the live credential");
            let sh = shared.clone();
            let name = s.name.clone();
            tokio::spawn(async move {
                let r = sh.rotate(&name, Trigger::Reload).await;
                tracing::info!(secret = %name, outcome = ?r.as_ref().map(|o| o.label()), "permission change applied");
            });
        }
    }
    format!("{n} schedule(s) loaded, {errors} error(s)")
}

/// How often a retirement that waits for consumers' acknowledgements looks again.
const ACK_POLL: Duration = Duration::from_secs(30);

/// Set while one task polls for acknowledgements (retirement passes start it).
static ACK_POLLING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs a retirement pass every [`ACK_POLL`] while some secret is `waiting-acks`: an
/// agent's ack arrives on the remote, and nothing else tells the daemon.
async fn poll_acks(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(ACK_POLL).await;
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        match shared.engine().retire_due(None).await {
            Ok(r) if r.waiting.is_empty() => break,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retirement pass failed; trying again"),
        }
    }
    ACK_POLLING.store(false, Ordering::SeqCst);
}

async fn retire(shared: Arc<Shared>) {
    let mut attempt = 0;
    loop {
        match shared.engine().retire_due(None).await {
            Ok(results) => {
                let failed = results.done.iter().filter(|(_, r)| r.is_err()).count();
                if !results.waiting.is_empty() && !ACK_POLLING.swap(true, Ordering::SeqCst) {
                    let sh = shared.clone();
                    tokio::spawn(async move { poll_acks(sh).await });
                }
                if failed == 0 {
                    return;
                }
                tracing::warn!(failed, "retirements failed; retrying with backoff");
            }
            Err(e) => tracing::warn!(error = %e, "retire failed; retrying with backoff"),
        }
        tokio::time::sleep(scheduler::backoff(attempt, Duration::from_secs(30))).await;
        attempt += 1;
        if attempt > 10 {
            tracing::error!("retirements still failing after 10 attempts; `rotd retire` or the next rotation will try again");
            return;
        }
    }
}

async fn sighup(tx: mpsc::Sender<Command>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading schedules");
        let _ = tx.send(Command::Reload { reply: None }).await;
    }
}

/// Watches a directory (only events on `file` when given); bursts of events (editors
/// write, rename, chmod) are debounced into one `make()` command.
fn watch_dir(
    dir: &Path,
    file: Option<std::ffi::OsString>,
    tx: mpsc::Sender<Command>,
    make: fn() -> Command,
) -> Result<notify::RecommendedWatcher, Error> {
    use notify::Watcher;
    let (etx, mut erx) = mpsc::unbounded_channel::<()>();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let relevant = match &file {
                None => true,
                Some(f) => ev
                    .paths
                    .iter()
                    .any(|p| p.file_name() == Some(f.as_os_str())),
            };
            if relevant && !ev.kind.is_access() {
                let _ = etx.send(());
            }
        }
    })
    .map_err(|e| Error::Watch {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    w.watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| Error::Watch {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
    tokio::spawn(async move {
        while erx.recv().await.is_some() {
            // Quiet for 300 ms: the edit is complete.
            while let Ok(Some(())) =
                tokio::time::timeout(Duration::from_millis(300), erx.recv()).await
            {}
            if tx.send(make()).await.is_err() {
                return;
            }
        }
    });
    Ok(w)
}

/// Reloads the keys (a new recipients file) and re-encrypts every secret in one commit.
async fn rekey(shared: Arc<Shared>) {
    let cfg = shared.config().store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let store = Arc::new(Store::open(&cfg)?);
        let recorded = store.head_bytes(".age-recipients")?;
        if recorded.as_deref() == Some(store.keys().recipients_file().as_bytes()) {
            return Ok((store, None)); // touched, not changed
        }
        let r = crate::rekey::rekey(&store)?;
        Ok::<_, crate::store::Error>((store, Some(r)))
    })
    .await;
    match result {
        Ok(Ok((_, None))) => {}
        Ok(Ok((store, Some(r)))) => {
            *shared.store.write().unwrap_or_else(|p| p.into_inner()) = store;
            tracing::info!(
                files = r.files,
                added = r.added.len(),
                removed = r.removed.len(),
                "recipients changed: secrets re-encrypted"
            );
            if !r.removed.is_empty() {
                tracing::warn!("a recipient was removed: rotate every secret (`rotd rotate --all`); `rotd verify` lists the ones still readable by the removed key");
            }
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "recipients changed but the rekey failed; the secrets stay encrypted to the previous recipients")
        }
        Err(e) => tracing::error!(error = %e, "rekey task failed"),
    }
}

fn bind_control(cfg: &Config) -> Result<tokio::net::UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    let path = &cfg.daemon.socket;
    let err = |source| Error::Listen {
        what: "control socket",
        addr: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another rotd daemon is listening there",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(g) = &cfg.daemon.socket_group {
        match nix::unistd::Group::from_name(g) {
            Ok(Some(group)) => match nix::unistd::chown(path, None, Some(group.gid)) {
                Ok(()) => {}
                // Not root and not a member of that group (e.g. a daemon run as its
                // own user on a host where the package made the `rotd` group): the
                // socket keeps the daemon's group, which only narrows who may use it.
                Err(nix::errno::Errno::EPERM) => tracing::warn!(
                    group = %g,
                    "cannot give the control socket the group of daemon.socket_group (the daemon is neither root nor a member); it keeps the daemon's group"
                ),
                Err(e) => return Err(err(e.into())),
            },
            _ => {
                tracing::warn!(group = %g, "daemon.socket_group does not exist; the socket keeps the daemon's group")
            }
        }
    }
    Ok(l)
}

/// Accepts control connections. The peer's uid is checked first, before a byte is
/// read: a refused peer gets its answer and the close. Allowed peers get one of
/// [`limits::MAX_CONNECTIONS`] slots; beyond that they are turned away with an error.
async fn serve_control(listener: tokio::net::UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits::MAX_CONNECTIONS));
    let lingering = Arc::new(tokio::sync::Semaphore::new(limits::MAX_LINGERING));
    let mut backoff = limits::AcceptBackoff::new("control socket");
    let mut refused_log = limits::Throttle::new(Duration::from_secs(10));
    let mut full_log = limits::Throttle::new(Duration::from_secs(10));
    let me = nix::unistd::getuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                backoff.succeeded();
                s
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        let cred = stream.peer_cred().ok();
        let uid = cred.as_ref().map(|c| c.uid()).unwrap_or(u32::MAX);
        let pid = cred.as_ref().and_then(|c| c.pid());
        let allowed = uid == 0 || uid == me || shared.config().daemon.allowed_uids.contains(&uid);
        let linger = || lingering.clone().try_acquire_owned().ok();
        if !allowed {
            if let Some(held_back) = refused_log.allow() {
                tracing::warn!(
                    uid,
                    ?pid,
                    refusals_not_logged = held_back,
                    "control connection refused: uid not allowed"
                );
            }
            let msg = format!(
                "uid {uid} is not allowed on the control socket; add it to [daemon] allowed_uids"
            );
            tokio::spawn(turn_away(stream, msg, linger()));
            continue;
        }
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let sh = shared.clone();
                tokio::spawn(async move {
                    handle_client(stream, uid, pid, sh).await;
                    drop(slot);
                });
            }
            Err(_) => {
                if let Some(held_back) = full_log.allow() {
                    tracing::warn!(uid, ?pid, limit = limits::MAX_CONNECTIONS, turned_away_not_logged = held_back,
                        "control socket: every connection slot is taken; turning new connections away");
                }
                let msg = format!(
                    "the daemon is serving {} control connections, its limit; try again in a few seconds",
                    limits::MAX_CONNECTIONS
                );
                tokio::spawn(turn_away(stream, msg, linger()));
            }
        }
    }
}

/// Answers a connection that will not be served, without reading from it: the
/// answer, then (when `linger` holds a permit) [`limits::LINGER`] for the peer to send
/// its request, so that its write does not fail before it has read the answer; then
/// the close. Unread data is discarded by the kernel.
async fn turn_away(
    mut stream: tokio::net::UnixStream,
    msg: String,
    linger: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    use tokio::io::AsyncWriteExt;
    let mut text =
        serde_json::to_string(&Response::error(msg)).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    // A new connection's send buffer is empty: the answer fits at once (the timeout
    // is only a guard; `try_write` would fail before the reactor has seen the socket).
    let sent = tokio::time::timeout(
        Duration::from_millis(100),
        stream.write_all(text.as_bytes()),
    )
    .await;
    if let (Some(_permit), Ok(Ok(()))) = (linger, sent) {
        // A plain pause: waiting for readiness instead let the close overtake the
        // request of a client that writes right after `connect`.
        tokio::time::sleep(limits::LINGER).await;
    }
}

/// Serves one allowed client: request lines of at most [`limits::MAX_REQUEST_LINE`]
/// bytes, each to arrive within [`limits::IDLE_TIMEOUT`]; an answer that the client
/// does not read within [`limits::WRITE_TIMEOUT`] ends the connection.
async fn handle_client(
    stream: tokio::net::UnixStream,
    uid: u32,
    pid: Option<i32>,
    shared: Arc<Shared>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = limits::MAX_REQUEST_LINE as u64 + 1;
        let read = tokio::time::timeout(
            limits::IDLE_TIMEOUT,
            (&mut reader).take(limit).read_until(b'\n', &mut line),
        )
        .await;
        let (resp, last) = match read {
            Err(_) => {
                tracing::debug!(uid, ?pid, "control client sent no request in time; closed");
                (
                    Response::error(format!(
                        "no request within {}; closing",
                        humantime::format_duration(limits::IDLE_TIMEOUT)
                    )),
                    true,
                )
            }
            Ok(Err(e)) => {
                tracing::debug!(uid, ?pid, error = %e, "control client read failed");
                return;
            }
            Ok(Ok(0)) => return,
            Ok(Ok(_)) if line.len() > limits::MAX_REQUEST_LINE => {
                tracing::warn!(uid, ?pid, "control request line too long; closed");
                (
                    Response::error(format!(
                        "request line longer than {} bytes; closing",
                        limits::MAX_REQUEST_LINE
                    )),
                    true,
                )
            }
            Ok(Ok(_)) => {
                tracing::info!(uid, user = ?user, ?pid, allowed = true, "control request");
                let resp = match serde_json::from_slice::<Request>(&line) {
                    Err(e) => Response::error(format!("bad request: {e}")),
                    Ok(req) => answer(req, uid, user.clone(), &shared).await,
                };
                (resp, false)
            }
        };
        let mut text = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        match tokio::time::timeout(limits::WRITE_TIMEOUT, w.write_all(text.as_bytes())).await {
            Ok(Ok(())) if !last => {}
            _ => return,
        }
    }
}

async fn answer(req: Request, uid: u32, user: Option<String>, shared: &Arc<Shared>) -> Response {
    match req {
        Request::Status => {
            let sh = shared.clone();
            match tokio::task::spawn_blocking(move || sh.status()).await {
                Ok(Ok(r)) => Response {
                    ok: true,
                    status: Some(r),
                    ..Default::default()
                },
                Ok(Err(e)) => Response::error(e.to_string()),
                Err(e) => Response::error(e.to_string()),
            }
        }
        Request::Reload => {
            let (tx, rx) = oneshot::channel();
            if shared
                .tx
                .send(Command::Reload { reply: Some(tx) })
                .await
                .is_err()
            {
                return Response::error("the daemon is stopping");
            }
            match rx.await {
                Ok(m) => Response {
                    ok: true,
                    message: Some(m),
                    ..Default::default()
                },
                Err(_) => Response::error("the daemon is stopping"),
            }
        }
        Request::Rotate { names, all } => {
            let cfg = shared.config();
            let names = if all {
                cfg.schedules.iter().map(|s| s.name.clone()).collect()
            } else {
                names
            };
            if let Some(unknown) = names.iter().find(|n| cfg.schedule(n).is_none()) {
                return Response {
                    exit_code: Some(crate::exit::USAGE),
                    ..Response::error(format!(
                        "no schedule named {unknown:?}; list them with `rotd status`"
                    ))
                };
            }
            let (tx, rx) = oneshot::channel();
            let cmd = Command::Rotate {
                names,
                trigger: Trigger::Manual { uid, user },
                reply: tx,
            };
            if shared.tx.send(cmd).await.is_err() {
                return Response::error("the daemon is stopping");
            }
            match rx.await {
                Ok(results) => Response {
                    ok: true,
                    results: Some(
                        results
                            .iter()
                            .map(|(name, r)| {
                                let (outcome, exit_code, message) = describe(r);
                                RotateResult {
                                    name: name.clone(),
                                    outcome,
                                    exit_code,
                                    message,
                                }
                            })
                            .collect(),
                    ),
                    ..Default::default()
                },
                Err(_) => Response::error("the daemon stopped before the rotation finished"),
            }
        }
    }
}
