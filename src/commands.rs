//! What each CLI command does. `main.rs` parses the arguments and calls [`run`];
//! everything here returns an exit code (DESIGN §2) or an [`Error`] that knows its own.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::audit;
use crate::cli::{Cli, Command};
use crate::config::{self, Config};
use crate::control::{self, Request};
use crate::history;
use crate::rotation::{self, Engine, Trigger};
use crate::secret::Secret;
use crate::store::record::key;
use crate::store::{self, rel_path, Message, Record, Slot, Store};

/// Exit codes (contract).
pub use crate::exit;

/// A command failed before or outside a rotation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Rotation(#[from] rotation::Error),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Control(#[from] control::ClientError),
    #[error("the daemon answered: {0}")]
    Daemon(String),
    #[error(transparent)]
    Run(#[from] crate::daemon::Error),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => exit::CONFIG,
            Error::Store(store::Error::NotInitialised(_))
            | Error::Store(store::Error::Crypto(_))
            | Error::Store(store::Error::Signing(_))
            | Error::Store(store::Error::UnknownHost { .. })
            | Error::Store(store::Error::File(
                crate::fsutil::Error::TooOpen { .. }
                | crate::fsutil::Error::NotOwner { .. }
                | crate::fsutil::Error::NotRegular { .. },
            )) => exit::CONFIG,
            Error::Run(crate::daemon::Error::Config(_)) => exit::CONFIG,
            Error::Rotation(rotation::Error::UnknownSecret(_)) | Error::Usage(_) => exit::USAGE,
            _ => exit::ROLLED_BACK,
        }
    }
}

/// How long `rotate` waits for the daemon's answer (rotations include probes).
const ROTATE_TIMEOUT: Duration = Duration::from_secs(3600);

/// `rotd run`: the daemon until SIGTERM/SIGINT; a second signal exits at once (the
/// journal covers whatever was in flight).
async fn run_daemon(path: PathBuf) -> Result<i32, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: finishing rotations in flight (signal again to exit now)");
        let _ = first_tx.send(());
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!(
            "second signal: exiting now; unfinished rotations are recovered at the next start"
        );
        std::process::exit(exit::ROLLED_BACK);
    });
    crate::daemon::run(path, async {
        let _ = first_rx.await;
    })
    .await?;
    Ok(exit::OK)
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

async fn open(cfg: &Config) -> Result<Arc<Store>, Error> {
    let c = cfg.store.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&c))
        .await
        .map_err(|e| Error::Usage(e.to_string()))??;
    Ok(Arc::new(store))
}

/// Runs one command; returns its exit code.
pub async fn run(cli: Cli) -> Result<i32, Error> {
    let path = config_path(&cli);
    let out = &mut std::io::stdout().lock();
    match cli.command {
        Command::Init => init(&path, out),
        Command::Check => check(&path, out),
        Command::Run => {
            let code = run_daemon(path).await?;
            Ok(code)
        }
        Command::Reload => {
            let base = config::load_store_only(&path)?;
            match control::request(
                &base.daemon.socket,
                &Request::Reload,
                Duration::from_secs(60),
            )? {
                Some(r) if r.ok => {
                    writeln!(out, "{}", r.message.unwrap_or_default())?;
                    Ok(exit::OK)
                }
                Some(r) => Err(Error::Daemon(r.error.unwrap_or_default())),
                None => Err(Error::Daemon(format!(
                    "no daemon listens on {}; start `rotd run`",
                    base.daemon.socket.display()
                ))),
            }
        }
        Command::Rotate {
            names,
            all,
            dry_run,
            emergency,
        } => {
            if emergency {
                let cfg = Arc::new(config::load(&path)?);
                let [n] = names.as_slice() else {
                    return Err(Error::Usage(
                        "--emergency rotates one secret at a time: name exactly one (`rotd rotate --emergency NAME`)".into(),
                    ));
                };
                let n = n.clone();
                if cfg.schedule(&n).is_none() {
                    return Err(rotation::Error::UnknownSecret(n).into());
                }
                let engine = Engine::new(cfg.clone(), open(&cfg).await?);
                let outcome = engine.rotate_emergency(&n, Trigger::manual_here()).await?;
                writeln!(out, "{n}: {} (emergency)", outcome.message())?;
                return Ok(outcome.exit_code());
            }
            if !dry_run {
                let base = config::load_store_only(&path)?;
                let req = Request::Rotate {
                    names: names.clone(),
                    all,
                };
                if let Some(r) = control::request(&base.daemon.socket, &req, ROTATE_TIMEOUT)? {
                    let Some(results) = r.results.filter(|_| r.ok) else {
                        let msg = r.error.unwrap_or_default();
                        return Err(match r.exit_code {
                            Some(exit::USAGE) => Error::Usage(msg),
                            _ => Error::Daemon(msg),
                        });
                    };
                    let mut code = exit::OK;
                    for res in results {
                        writeln!(out, "{}: {}", res.name, res.message)?;
                        code = code.max(res.exit_code);
                    }
                    return Ok(code);
                }
            }
            let cfg = Arc::new(config::load(&path)?);
            let names = if all {
                cfg.schedules.iter().map(|s| s.name.clone()).collect()
            } else {
                names
            };
            for n in &names {
                if cfg.schedule(n).is_none() {
                    return Err(rotation::Error::UnknownSecret(n.clone()).into());
                }
            }
            if dry_run {
                return dry_run_plan(&cfg, &names, out);
            }
            let store = open(&cfg).await?;
            let engine = Engine::new(cfg, store);
            let mut code = exit::OK;
            for n in &names {
                let outcome = engine.rotate(n, Trigger::manual_here()).await?;
                writeln!(out, "{n}: {}", outcome.message())?;
                code = code.max(outcome.exit_code());
            }
            Ok(code)
        }
        Command::Status { json } => {
            let base = config::load_store_only(&path)?;
            if let Some(r) = control::request(
                &base.daemon.socket,
                &Request::Status,
                Duration::from_secs(60),
            )? {
                let report = r
                    .status
                    .filter(|_| r.ok)
                    .ok_or_else(|| Error::Daemon(r.error.unwrap_or_default()))?;
                crate::status::print(&report, json, out)?;
                return Ok(exit::OK);
            }
            let cfg = config::load(&path)?;
            let store = open(&cfg).await?;
            if cfg.schedules.iter().any(|s| !s.consumers.is_empty()) {
                // What the consumers acknowledged lives on the remote (one fetch).
                store.fetch_acks()?;
            }
            status(&cfg, &store, json, out)
        }
        Command::History {
            name,
            json,
            since,
            outcome,
        } => {
            let cfg = config::load_store_only(&path)?;
            let store = open(&cfg).await?;
            let since = since
                .map(|s| history::parse_since(&s, chrono::Utc::now().timestamp()))
                .transpose()
                .map_err(Error::Usage)?;
            let filter = history::Filter {
                secret: name,
                since,
                outcome,
            };
            history_cmd(&store, &filter, json, out)
        }
        Command::Verify {
            json,
            allowed_signers,
            accept_unsigned_before,
        } => {
            let cfg = config::load_store_only(&path)?;
            let store = open(&cfg).await?;
            let opts = audit::Options {
                allowed_signers,
                accept_unsigned_before,
            };
            verify(&store, &opts, json, out)
        }
        // `rotd agent`: its own config file and default path, and its own exit codes
        // (agent::Error::exit_code); the error is printed as main prints the others'.
        Command::Agent { once, action } => {
            let path = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::agent::config::DEFAULT_PATH));
            let result = match action {
                Some(crate::cli::AgentCommand::Status { json }) => {
                    crate::agent::status(&path, json, out).map(|_| ())
                }
                None => crate::agent::run(&path, once).await,
            };
            match result {
                Ok(()) => Ok(exit::OK),
                Err(e) => {
                    eprintln!("rotd: {e}");
                    Ok(e.exit_code())
                }
            }
        }
        Command::Rekey { rotate_removed } => {
            let cfg = Arc::new(if rotate_removed {
                config::load(&path)?
            } else {
                config::load_store_only(&path)?
            });
            let store = open(&cfg).await?;
            let s = store.clone();
            let r = tokio::task::spawn_blocking(move || crate::rekey::rekey(&s))
                .await
                .map_err(|e| Error::Usage(e.to_string()))??;
            writeln!(
                out,
                "rekeyed {} secret file(s) in commit {}",
                r.files,
                r.commit.map(|c| c.to_string()).unwrap_or_default()
            )?;
            for a in &r.added {
                writeln!(out, "  recipient added: {a}")?;
            }
            for a in &r.removed {
                writeln!(out, "  recipient removed: {a}")?;
            }
            if let Some(store::Push::Unreachable(e) | store::Push::Rejected(e)) = &r.push {
                writeln!(out, "warning: cannot push the store: {e}")?;
            }
            if r.removed.is_empty() {
                return Ok(exit::OK);
            }
            if !rotate_removed {
                writeln!(out, "a recipient was removed: it may still know every secret it could read; rotate them (`rotd rotate --all`, or `rotd rekey --rotate-removed`)")?;
                return Ok(exit::OK);
            }
            let engine = Engine::new(cfg.clone(), store);
            let mut code = exit::OK;
            for s in &cfg.schedules {
                let outcome = engine.rotate(&s.name, Trigger::manual_here()).await?;
                writeln!(out, "{}: {}", s.name, outcome.message())?;
                code = code.max(outcome.exit_code());
            }
            Ok(code)
        }
        Command::Import {
            name,
            username,
            key_id,
        } => {
            let cfg = config::load_store_only(&path)?;
            let store = open(&cfg).await?;
            import(&store, &name, username, key_id, out)
        }
        Command::Retire { name, force } => {
            let cfg = Arc::new(config::load(&path)?);
            if let Some(n) = name.as_deref().filter(|n| cfg.schedule(n).is_none()) {
                return Err(rotation::Error::UnknownSecret(n.to_owned()).into());
            }
            let store = open(&cfg).await?;
            let engine = Engine::new(cfg, store);
            if let (true, Some(n)) = (force, name.as_deref()) {
                return match engine.retire_now(n, Trigger::manual_here()).await? {
                    Some(what) => {
                        writeln!(out, "{n}: retired {what} (forced, before its grace ended)")?;
                        Ok(exit::OK)
                    }
                    None => {
                        writeln!(out, "{n}: nothing to retire")?;
                        Ok(exit::OK)
                    }
                };
            }
            engine.recover_all().await?;
            let mut code = exit::OK;
            let due = engine.retire_due(name.as_deref()).await?;
            for (n, lagging) in &due.waiting {
                writeln!(out, "{n}: not retired: waiting for the acknowledgements of host(s) {} (`rotd status` shows them; `rotd retire --force {n}` retires it now, cutting them off)", lagging.join(", "))?;
            }
            if let (Some(n), true) = (&name, due.done.is_empty() && due.waiting.is_empty()) {
                writeln!(out, "{n}: nothing due for retirement (`rotd status` shows a grace in progress; `rotd retire --force {n}` retires it now)")?;
            }
            for (name, r) in due.done {
                match r {
                    Ok(what) => writeln!(out, "{name}: retired {what}")?,
                    Err(e) => {
                        writeln!(out, "{name}: retire failed: {e}")?;
                        code = exit::ROLLED_BACK;
                    }
                }
            }
            Ok(code)
        }
        Command::Show { name } => {
            let cfg = config::load_store_only(&path)?;
            let store = open(&cfg).await?;
            match store.read(&name, Slot::Current)? {
                Some(r) => {
                    writeln!(out, "{}", r.secret.expose())?;
                    Ok(exit::OK)
                }
                None => Err(Error::Usage(format!(
                    "no secret named {name:?} in the store"
                ))),
            }
        }
    }
}

fn history_cmd(
    store: &Store,
    filter: &history::Filter,
    json: bool,
    out: &mut impl Write,
) -> Result<i32, Error> {
    let allowed = if store.signer().is_some() || store.config().allowed_signers.is_some() {
        audit::allowed_signers(store, None)?
    } else {
        None
    };
    let entries = history::read_filtered(store, filter, allowed.as_ref())?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &serde_json::json!({ "entries": entries }))
            .map_err(std::io::Error::from)?;
        writeln!(out)?;
        return Ok(exit::OK);
    }
    let sig = allowed.is_some();
    writeln!(
        out,
        "{:<20}  {:<24} {:<12} {:<26} {:<18} {}DETAIL",
        "TIME",
        "SECRET",
        "STEP",
        "ROTATION",
        "TRIGGER",
        if sig { "SIGNATURE    " } else { "" }
    )?;
    for e in &entries {
        let detail = e
            .error
            .clone()
            .or_else(|| e.probe.as_ref().map(|p| format!("probe {p}")))
            .or_else(|| e.target.clone())
            .unwrap_or_default();
        writeln!(
            out,
            "{:<20}  {:<24} {:<12} {:<26} {:<18} {}{}",
            e.time,
            e.secret.as_deref().unwrap_or("-"),
            e.step.as_deref().unwrap_or("-"),
            e.rotation.as_deref().unwrap_or("-"),
            e.trigger.as_deref().unwrap_or("-"),
            e.signature.map(|s| format!("{s:<12} ")).unwrap_or_default(),
            detail
        )?;
    }
    Ok(exit::OK)
}

fn verify(
    store: &Store,
    opts: &audit::Options,
    json: bool,
    out: &mut impl Write,
) -> Result<i32, Error> {
    let report = match audit::verify(store, opts) {
        Ok(r) => r,
        Err(audit::Error::Store(e)) => return Err(e.into()),
        Err(e @ audit::Error::UnknownCommit(_)) => return Err(Error::Usage(e.to_string())),
    };
    if json {
        serde_json::to_writer_pretty(&mut *out, &report).map_err(std::io::Error::from)?;
        writeln!(out)?;
    } else {
        for f in &report.findings {
            writeln!(
                out,
                "{} commit {} {}: {}",
                f.check,
                f.commit,
                f.file.as_deref().unwrap_or("-"),
                f.message
            )?;
        }
        writeln!(
            out,
            "{}: {} commit(s), {} blob(s), {} secret value(s) searched{}; {} finding(s)",
            if report.ok { "ok" } else { "FAILED" },
            report.commits,
            report.blobs,
            report.secrets_searched,
            if report.signing_checked {
                ", signatures checked"
            } else {
                ", signatures not checked (no signing key or allowed signers configured)"
            },
            report.findings.len()
        )?;
    }
    Ok(if report.ok {
        exit::OK
    } else {
        exit::ROLLED_BACK
    })
}

/// The loud line `init` and `check` print on stderr when the store remote is trusted
/// blindly: without signing, whoever can push to the remote decides what rotd
/// delivers.
fn warn_unsigned_remote(config: &Path, store: &config::Store) {
    if store.signing_key.is_some() || store.allowed_signers.is_some() {
        return;
    }
    if let Some(remote) = &store.remote {
        eprintln!(
            "WARNING: the store remote {remote} is trusted blindly: store.signing_key is not set, so rotd adopts whatever is pushed there, and anyone who can push to it can make rotd deliver a credential of their choosing. Set store.signing_key (and store.allowed_signers with the keys of the other rotd hosts) in {}; `rotd init` creates the key. See SECURITY.md.",
            config.display()
        );
    }
}

fn init(path: &Path, out: &mut impl Write) -> Result<i32, Error> {
    let cfg = config::load_for_init(path)?;
    warn_unsigned_remote(path, &cfg.store);
    let report = Store::init(&cfg.store)?;
    if let Some(public) = &report.identity_created {
        writeln!(
            out,
            "created identity {} (public key {public})",
            cfg.store.identity.display()
        )?;
    }
    if let (Some(public), Some(key)) = (&report.signing_key_created, &cfg.store.signing_key) {
        writeln!(
            out,
            "created signing key {} (public key {public}): add it to the allowed_signers file of every other rotd host of this store",
            key.display()
        )?;
    }
    if let (true, Some(allowed)) = (report.allowed_signers_created, &cfg.store.allowed_signers) {
        writeln!(
            out,
            "created allowed signers {} with this host's signing key",
            allowed.display()
        )?;
    }
    writeln!(
        out,
        "{} store {}",
        if report.repo_created {
            "created"
        } else {
            "checked"
        },
        cfg.store.path.display()
    )?;
    match report.push {
        Some(store::Push::Unreachable(r)) => {
            writeln!(out, "warning: cannot push to the remote: {r}")?
        }
        Some(store::Push::Rejected(r)) => {
            writeln!(out, "warning: the remote refused the push: {r}")?
        }
        _ => {}
    }
    Ok(exit::OK)
}

fn check(path: &Path, out: &mut impl Write) -> Result<i32, Error> {
    let cfg = config::load(path)?;
    let mut problems = Vec::new();
    if let Err(e) = crate::fsutil::check_private(&cfg.store.identity) {
        if cfg.store.identity.exists() {
            problems.push(e.to_string());
        }
    }
    if let Some(k) = &cfg.store.signing_key {
        if let Err(e) = crate::fsutil::check_private(k) {
            problems.push(e.to_string());
        } else if let Err(e) = crate::signing::Signer::from_file(k) {
            problems.push(e.to_string());
        }
    }
    if let Some(a) = &cfg.store.allowed_signers {
        if let Err(e) = crate::signing::AllowedSigners::from_file(a) {
            problems.push(e.to_string());
        }
    }
    if !problems.is_empty() {
        return Err(config::Error(
            problems
                .into_iter()
                .map(|m| config::Problem {
                    file: path.to_owned(),
                    line: None,
                    message: m,
                })
                .collect(),
        )
        .into());
    }
    warn_unsigned_remote(path, &cfg.store);
    writeln!(
        out,
        "{}: ok, {} schedule(s)",
        path.display(),
        cfg.schedules.len()
    )?;
    for s in &cfg.schedules {
        writeln!(
            out,
            "  {} ({}) {}",
            s.name,
            s.target.kind(),
            s.cron.as_deref().unwrap_or("manual only")
        )?;
    }
    for w in cfg.schedules.iter().flat_map(|s| &s.warnings) {
        writeln!(out, "warning: {w}")?;
    }
    Ok(exit::OK)
}

fn dry_run_plan(cfg: &Config, names: &[String], out: &mut impl Write) -> Result<i32, Error> {
    for n in names {
        let s = cfg
            .schedule(n)
            .ok_or_else(|| rotation::Error::UnknownSecret(n.clone()))?;
        writeln!(out, "{n}: would rotate ({})", s.target.describe(None))?;
        if let crate::targets::Config::Elasticsearch(es) = &s.target {
            writeln!(
                out,
                "  commit {} (pending), create API key {} as {}, commit its id (pending) before anything uses it; the old key stays valid",
                rel_path(n, Slot::Pending),
                crate::targets::elasticsearch::key_name(n, "<rotation>"),
                es.conn.admin_credential
            )?;
        } else {
            writeln!(
                out,
                "  generate {} characters ({:?}) with the system CSPRNG",
                s.length, s.charset
            )?;
            if let crate::targets::Config::EsUser(u) = &s.target {
                writeln!(
                    out,
                    "  commit {} (pending), set the password of user {} as {}; the old password stops working until consumers reload (single-password user)",
                    rel_path(n, Slot::Pending),
                    u.username,
                    u.conn.admin_credential
                )?;
            } else {
                writeln!(
                    out,
                    "  commit {} (pending), install on the target keeping the old credential valid",
                    rel_path(n, Slot::Pending)
                )?;
            }
        }
        for d in &s.deliver {
            writeln!(
                out,
                "  deliver {} (mode {:04o})",
                crate::deliver::display_path(&d.path, None, n),
                d.mode
            )?;
        }
        let mut seen = Vec::new();
        for r in s.deliver.iter().filter_map(|d| d.reload.as_ref()) {
            if !seen.contains(&r) {
                writeln!(out, "  reload {r}")?;
                seen.push(r);
            }
        }
        writeln!(
            out,
            "  probe with the new credential, then commit succeeded; retire the old one after {}",
            humantime::format_duration(s.grace)
        )?;
    }
    writeln!(out, "dry run: nothing was changed")?;
    Ok(exit::OK)
}

fn import(
    store: &Store,
    name: &str,
    username: Option<String>,
    key_id: Option<String>,
    out: &mut impl Write,
) -> Result<i32, Error> {
    if !config::valid_name(name) {
        return Err(Error::Usage(format!("{name:?} is not a valid secret name")));
    }
    // The username and key id become record lines, trailers and `{{username}}` /
    // `{{key_id}}` in deliver paths: only their real formats are taken.
    if let Some(u) = &username {
        crate::validate::username(u).map_err(|m| Error::Usage(format!("--username: {m}")))?;
    }
    if let Some(k) = &key_id {
        crate::validate::es_id(k, &format!("--key-id {k:?}")).map_err(|m| {
            Error::Usage(format!(
                "{m}; give the `id` Elasticsearch answered when it created the key"
            ))
        })?;
    }
    let mut buf = zeroize::Zeroizing::new(String::new());
    // One line is all import takes: a bounded read, so a runaway pipe is refused
    // instead of buffered.
    std::io::stdin()
        .take(crate::validate::MAX_SECRET as u64 + 2)
        .read_to_string(&mut buf)?;
    let value = buf.strip_suffix('\n').unwrap_or(&buf);
    let value = value.strip_suffix('\r').unwrap_or(value);
    crate::validate::secret_line(value).map_err(|m| {
        Error::Usage(format!(
            "{m}; import reads exactly one line (the secret) from stdin"
        ))
    })?;
    if key_id.is_some() {
        crate::validate::es_api_key(value, "the api_key on stdin").map_err(|m| {
            Error::Usage(format!(
                "{m}; give the `api_key` Elasticsearch answered when it created the key"
            ))
        })?;
    }
    let _lock = store.lock_secret(name, true)?;
    if store.read(name, Slot::Pending)?.is_some() {
        return Err(Error::Usage(format!("a rotation of {name} is unfinished; run `rotd retire` or `rotd rotate {name}` to recover it first")));
    }
    let mut rec = Record::new(Secret::new(value.to_owned())).with(
        key::CREATED,
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    );
    if let Some(u) = &username {
        rec.set(key::USERNAME, u);
    }
    if let Some(k) = &key_id {
        rec.set(key::KEY_ID, k);
    }
    let fp = store.fingerprint(name, &rec.secret);
    let put = store.put_record(name, Slot::Current, &rec)?;
    let mut msg = Message::new(format!("import {name}"))
        .trailer("Rotd-Secret", name)
        .trailer("Rotd-Step", "imported")
        .trailer("Rotd-Trigger", Trigger::manual_here().to_string())
        .trailer("Rotd-Fingerprint", fp);
    if let Some(u) = &username {
        msg = msg.trailer("Rotd-Target", format!("user={u}"));
    }
    store.commit(vec![put], &msg)?;
    if let store::Push::Unreachable(r) | store::Push::Rejected(r) = store.push()? {
        writeln!(out, "warning: cannot push the store: {r}")?;
    }
    writeln!(out, "{name}: imported")?;
    Ok(exit::OK)
}

fn status(cfg: &Config, store: &Store, json: bool, out: &mut impl Write) -> Result<i32, Error> {
    let report = crate::status::report(cfg, store, |s| {
        s.cron
            .as_deref()
            .and_then(|c| crate::daemon::scheduler::next_fire(c, chrono::Utc::now()))
    })?;
    crate::status::print(&report, json, out)?;
    Ok(exit::OK)
}
