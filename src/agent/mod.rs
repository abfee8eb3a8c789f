//! `rotd agent`: a consumer host pulls its secrets from the store remote, renders
//! them into its programs' files, and acknowledges (DESIGN §7).
//!
//! The rotator encrypts each secret to the hosts its schedule lists in `consumers`;
//! on such a host the agent keeps its own clone of the store and, once per pass:
//!
//! 1. **sync** — clones (first pass) or fetches the remote and adopts only a
//!    fast-forward whose every new commit is signed by a key of `allowed_signers`
//!    (`Store::sync_from_remote`: the store's own trust rule, refusal record and
//!    log). A refused or unreachable remote fails the pass before anything is
//!    delivered: the files keep what they hold.
//! 2. **deliver** — for each `[[secret]]`, looks at `secrets/NAME.age` at HEAD (never
//!    a `.pending.age`: only a succeeded rotation is acted on). The blob this host
//!    delivered last ([`state`]) is neither read nor decrypted: an idle pass costs a
//!    fetch that brings no pack and a comparison of ids. Another blob is decrypted
//!    with the host's identity, and when its rotation is not the one this host
//!    delivered, its files are written with `deliver::deliver` (atomic, modes,
//!    owners kept), the reloads run, then the optional `[secret.probe]`. A failed
//!    write, reload or probe puts the previous files back (`deliver::restore`) and the
//!    secret's new rotation is not acknowledged.
//! 3. **acknowledge** — a commit signed with the host's key on `refs/rotd/acks/HOST`
//!    with one `Rotd-Ack: NAME ROTATION` trailer per secret the host holds, pushed
//!    without force; skipped when the remote's tip already says exactly that
//!    ([`ack`]).
//!
//! Every step is safe to repeat: a pass that stops anywhere is completed by the next.
//! Two kill points prove it (the test hook `ROTD_FAULT_KILL_AFTER=<step>` of
//! [`crate::fault`], tests/integration/agent.rs):
//!
//! * `agent-rendered` — after a secret's files are written and reloaded, before the
//!   delivery record and the acknowledgement. A kill there leaves the files holding
//!   the new rotation (each written atomically: never a mix, no temp file) while the
//!   record still names the previous one and the remote acknowledges the previous
//!   one. The next pass sees the record differ, delivers the same value again
//!   (idempotent), records it and acknowledges it.
//! * `agent-ack-committed` — after the signed ack commit is made in the clone, before
//!   its push. A kill there leaves an unpushed commit on the clone's local ack ref;
//!   the remote still holds the previous acknowledgement. The next pass reads the
//!   remote's tip (never the local ref), commits a fresh acknowledgement on top of it
//!   and pushes it as a fast-forward: exactly one new ack commit on the remote, the
//!   orphaned local one is dropped with the ref's move.
//!
//! `--once` runs one pass; otherwise a pass runs every `poll` (±10 % jitter), at once
//! on SIGHUP (which also re-reads the configuration, keeping the old one if the new
//! is invalid), and SIGTERM or SIGINT ends the loop between passes, never inside one.
//! git, age and fsync run in `spawn_blocking`; reloads are async.

pub mod ack;
pub mod config;
pub mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::deliver;
use crate::fsutil;
use crate::signing::{AllowedSigners, Signer};
use crate::store::{self, record::key, Record, Slot, Store};
use state::State;

/// An agent pass, or its set-up, failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("cannot load the host's signing key: {0}; check store.signing_key of the agent configuration (an unencrypted OpenSSH ed25519 key, mode 0600)")]
    SigningKey(#[source] crate::signing::Error),
    #[error("cannot prepare the agent's clone of the store at {path}: {source}; check that the directory is writable by this user")]
    Clone {
        path: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the store remote {0} cannot be reached; nothing was delivered, the next pass tries again"
    )]
    Unreachable(String),
    #[error("{failed} of the secrets could not be delivered (see the log above); their files are as before, and their new rotation is not acknowledged")]
    Delivery { failed: usize },
    #[error("{0} of the secrets could not be delivered and their previous files could not be put back (see the log above); fix those files by hand, the next pass delivers again")]
    NotRestored(usize),
    #[error(transparent)]
    Ack(#[from] ack::Error),
    #[error("cannot record what was delivered in {path}: {source}; the next pass delivers again")]
    State {
        path: PathBuf,
        #[source]
        source: fsutil::Error,
    },
    #[error("cannot set up signal handling: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot listen for metrics on {addr}: {source}; choose a free address:port in `metrics` of the agent configuration")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the status: {0}")]
    Output(#[source] std::io::Error),
    #[error("a blocking task of the agent failed: {0}")]
    Task(String),
}

impl Error {
    /// Exit code (DESIGN §2): 78 when the configuration or a key file is wrong, 1 when
    /// a pass failed safely, 2 when a consumer's previous files could not be put back.
    pub fn exit_code(&self) -> i32 {
        use crate::exit;
        match self {
            Error::Config(_) | Error::SigningKey(_) | Error::Listen { .. } => exit::CONFIG,
            Error::Store(store::Error::Crypto(_) | store::Error::Signing(_))
            | Error::Store(store::Error::File(
                fsutil::Error::TooOpen { .. }
                | fsutil::Error::NotOwner { .. }
                | fsutil::Error::NotRegular { .. },
            )) => exit::CONFIG,
            Error::NotRestored(_) => exit::NOT_ROLLED_BACK,
            _ => exit::ROLLED_BACK,
        }
    }

    /// A problem the next pass cannot fix by itself (the loop stops on it).
    fn is_config(&self) -> bool {
        self.exit_code() == crate::exit::CONFIG
    }
}

/// What the loop shares with the metrics endpoint.
struct Shared {
    cfg: config::Config,
    state: State,
    counters: state::Counters,
}

/// Runs the agent with the config at `path`: one pass with `once`, else until SIGTERM.
pub async fn run(path: &Path, once: bool) -> Result<(), Error> {
    use crate::daemon::{http, systemd};
    let mut cfg = config::load(path)?;
    if once {
        return pass(&cfg).await;
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(Error::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let shared = Arc::new(std::sync::Mutex::new(Shared {
        state: State::load(&State::path(&cfg)),
        cfg: cfg.clone(),
        counters: state::Counters::default(),
    }));
    let mut background = Vec::new();
    if let Some(addr) = cfg.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let sh = Arc::clone(&shared);
        background.push(tokio::spawn(http::serve(listener, move || {
            let page = match sh.lock() {
                Ok(s) => state::render_metrics(&s.cfg, &s.state, &s.counters),
                Err(_) => String::new(),
            };
            async move { page }
        })));
        tracing::info!(%addr, "agent metrics on http://{addr}/metrics");
    }
    if let Some(every) = systemd::watchdog_interval() {
        background.push(tokio::spawn(async move {
            loop {
                systemd::notify("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        }));
    }
    tracing::info!(host = %cfg.host, poll = ?cfg.store.poll, "rotd agent started");
    // Ready once the loop runs, before the first pass: a remote slow to answer must
    // not trip systemd's start timeout. STATUS= then says how each pass went.
    systemd::notify("READY=1");
    let result = loop {
        // Signals that arrive during a pass wait here: a pass is never cut short.
        let mut counters = shared
            .lock()
            .map(|s| s.counters.clone())
            .unwrap_or_default();
        let outcome = pass_counted(&cfg, &mut counters).await;
        let st = State::load(&State::path(&cfg));
        if let Ok(mut s) = shared.lock() {
            s.state = st.clone();
            s.counters = counters;
            s.cfg = cfg.clone();
        }
        let summary = match &outcome {
            Ok(()) => format!(
                "STATUS=last pass ok at {}",
                chrono::Utc::now().format("%H:%M:%S")
            ),
            Err(e) => format!("STATUS=last pass failed: {e}"),
        };
        systemd::notify(&summary);
        match outcome {
            Ok(()) => {}
            Err(e) if e.is_config() => break Err(e),
            Err(e) => tracing::error!(error = %e, "agent pass failed; retrying at the next poll"),
        }
        let wait = jittered(cfg.store.poll);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = hup.recv() => {
                tracing::info!("SIGHUP: re-reading the configuration and running a pass now");
                systemd::notify("RELOADING=1");
                match config::load(path) {
                    Ok(c) => cfg = c,
                    Err(e) => tracing::error!(error = %e, "the new agent configuration is invalid; keeping the running one"),
                }
                systemd::notify("READY=1");
            }
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
        }
    };
    systemd::notify("STOPPING=1");
    for b in background {
        b.abort();
    }
    tracing::info!("rotd agent stopping");
    result
}

/// `rotd agent status`: what the last passes did, from the clone's state (nothing
/// fetched, nothing decrypted). Ok(false) when something needs attention.
pub fn status(path: &Path, json: bool, out: impl std::io::Write) -> Result<bool, Error> {
    let cfg = config::load(path)?;
    state::print_status(&cfg, json, out).map_err(Error::Output)
}

/// `poll` ±10 %.
fn jittered(poll: Duration) -> Duration {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 2];
    let r = match SystemRandom::new().fill(&mut b) {
        Ok(()) => f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    };
    poll.mul_f64(0.9 + 0.2 * r)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// The `config::Store` of the agent's clone: it trusts `allowed_signers` only (no
/// signing key of its own: the host's key signs acknowledgements, never store
/// commits) and never encrypts, so it needs no recipients or hosts.
fn store_config(cfg: &config::Config) -> crate::config::Store {
    let s = &cfg.store;
    crate::config::Store {
        path: s.path.clone(),
        remote: Some(s.remote.clone()),
        branch: s.branch.clone(),
        identity: s.identity.clone(),
        recipients: None,
        signing_key: None,
        allowed_signers: Some(s.allowed_signers.clone()),
        remote_ssh_key: s.remote_ssh_key.clone(),
        remote_token_file: None,
        remote_known_hosts: s.remote_known_hosts.clone(),
        author_name: cfg.host.clone(),
        author_email: format!("rotd-agent@{}", cfg.host),
        hosts: BTreeMap::new(),
        schedules: s.path.join(".git").join("rotd-agent-no-schedules"),
    }
}

/// Makes the clone's repository (empty, with `origin`) when it does not exist yet;
/// the first sync then adopts the remote's history under the trust rule.
fn prepare_clone(cfg: &crate::config::Store) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    let clone_err = |source| Error::Clone {
        path: cfg.path.clone(),
        source,
    };
    let url = cfg.remote.as_deref().unwrap_or_default();
    if !cfg.path.join(".git").is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.path)
            .map_err(|source| Error::Dir {
                path: cfg.path.clone(),
                source,
            })?;
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head(&cfg.branch);
        let repo = git2::Repository::init_opts(&cfg.path, &opts).map_err(clone_err)?;
        repo.remote("origin", url).map_err(clone_err)?;
        tracing::info!(path = %cfg.path.display(), "created the agent's clone of the store");
        return Ok(());
    }
    let repo = git2::Repository::open(&cfg.path).map_err(clone_err)?;
    match repo.find_remote("origin") {
        Ok(r) if r.url() == Some(url) => {}
        Ok(_) => repo.remote_set_url("origin", url).map_err(clone_err)?,
        Err(_) => {
            repo.remote("origin", url).map_err(clone_err)?;
        }
    }
    Ok(())
}

/// What identifies the value a record holds: its rotation id, or (a record made
/// without one, e.g. imported) a keyed fingerprint that is never acknowledged.
fn version_of(store: &Store, name: &str, rec: &Record) -> String {
    match rec.get(key::ROTATION) {
        Some(r) if !r.is_empty() => r.to_owned(),
        _ => format!("fingerprint:{}", store.fingerprint(name, &rec.secret)),
    }
}

/// What step 1 found for one secret at the adopted HEAD.
enum Found {
    /// No `secrets/NAME.age`: no succeeded rotation yet.
    Absent,
    /// The blob this host delivered last: nothing read, nothing decrypted.
    Unchanged,
    /// Another blob, decrypted.
    New { blob: String, record: Record },
}

/// One pass: sync, deliver, acknowledge. The outcome is recorded in the state file
/// (and so in `rotd agent status` and `/metrics`) whatever it is.
pub async fn pass(cfg: &config::Config) -> Result<(), Error> {
    pass_counted(cfg, &mut state::Counters::default()).await
}

async fn pass_counted(cfg: &config::Config, counters: &mut state::Counters) -> Result<(), Error> {
    let path = State::path(cfg);
    let before = State::load(&path);
    let mut st = before.clone();
    let result = pass_inner(cfg, &mut st, counters).await;
    let now = state::now();
    st.last_pass = Some(state::Pass {
        at: now.clone(),
        ok: result.is_ok(),
        error: result.as_ref().err().map(|e| e.to_string()),
        head: st.last_pass.as_ref().and_then(|p| p.head.clone()),
    });
    if result.is_ok() {
        st.last_success = Some(now);
        counters.passes_ok += 1;
    } else {
        counters.passes_failed += 1;
    }
    if st != before {
        if let Err(source) = st.save(&path) {
            // The first failure is the one to report; a lost state only means that
            // the next pass delivers again.
            return result.and(Err(Error::State { path, source }));
        }
    }
    result
}

async fn pass_inner(
    cfg: &config::Config,
    st: &mut State,
    counters: &mut state::Counters,
) -> Result<(), Error> {
    let scfg = store_config(cfg);
    // 1. sync, then find what changed at the adopted HEAD: only a blob this host has
    //    not delivered is read and decrypted.
    let names: Vec<String> = cfg.secrets.iter().map(|s| s.name.clone()).collect();
    let snapshot = st.clone();
    let (store, head, found) = blocking(move || {
        prepare_clone(&scfg)?;
        let store = Store::open(&scfg)?;
        if !store.sync_from_remote()? {
            return Err(Error::Unreachable(scfg.remote.clone().unwrap_or_default()));
        }
        let head = store.head_id()?;
        let found: Vec<(String, Result<Found, store::Error>)> = names
            .into_iter()
            .map(|n| {
                let f = (|| {
                    let path = store::rel_path(&n, Slot::Current);
                    let Some(blob) = store.head_blob_id(&path)? else {
                        return Ok(Found::Absent);
                    };
                    let blob = blob.to_string();
                    if snapshot.unchanged(&n, &blob) {
                        return Ok(Found::Unchanged);
                    }
                    match store.read(&n, Slot::Current)? {
                        Some(record) => Ok(Found::New { blob, record }),
                        None => Ok(Found::Absent),
                    }
                })();
                (n, f)
            })
            .collect();
        Ok((Arc::new(store), head, found))
    })
    .await?;
    if let Some(p) = st.last_pass.as_mut() {
        p.head = head.clone();
    } else {
        st.last_pass = Some(state::Pass {
            at: state::now(),
            ok: false,
            error: None,
            head: head.clone(),
        });
    }

    // 2. deliver.
    let mut failed = 0;
    let mut unrestored = 0;
    for (secret, (name, f)) in cfg.secrets.iter().zip(found) {
        let entry = st.secrets.entry(name.clone()).or_default();
        let (blob, rec) = match f {
            Ok(Found::Unchanged) => {
                tracing::debug!(secret = %name, "already delivered");
                continue;
            }
            Ok(Found::Absent) => {
                tracing::warn!(secret = %name, "{name} is not in the store yet (no succeeded rotation): nothing to deliver");
                entry.store = None;
                continue;
            }
            Ok(Found::New { blob, record }) => (blob, record),
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "cannot read {name} from the store");
                entry.error = Some(format!("cannot read it from the store: {e}"));
                failed += 1;
                continue;
            }
        };
        let version = version_of(&store, &name, &rec);
        entry.store = Some(version.clone());
        if entry.delivered.as_ref() == Some(&version) && entry.error.is_none() {
            // Another blob, the same rotation (re-encrypted by `rekey`): the files hold
            // it already.
            entry.blob = Some(blob);
            continue;
        }
        match deliver_one(secret, &name, &rec).await {
            Ok(()) => {
                crate::fault::point("agent-rendered");
                tracing::info!(secret = %name, rotation = %version, "delivered {name} rotation {version}");
                counters.deliveries_ok += 1;
                *entry = state::SecretState {
                    delivered: Some(version.clone()),
                    blob: Some(blob),
                    delivered_at: Some(state::now()),
                    store: Some(version),
                    error: None,
                };
                // Recorded before the acknowledgement: a kill after this point never
                // delivers the same rotation twice.
                st.save(&State::path(cfg)).map_err(|source| Error::State {
                    path: State::path(cfg),
                    source,
                })?;
            }
            Err(Failure::Restored(e)) => {
                counters.deliveries_failed += 1;
                failed += 1;
                entry.error = Some(e);
            }
            Err(Failure::NotRestored(e)) => {
                counters.deliveries_failed += 1;
                unrestored += 1;
                // What the files hold is not known any more: claim nothing.
                entry.delivered = None;
                entry.blob = None;
                entry.error = Some(e);
            }
        }
    }

    // 3. acknowledge what this host holds.
    let held: ack::Held = cfg
        .secrets
        .iter()
        .filter_map(|s| {
            let d = st.secrets.get(&s.name)?.delivered.clone()?;
            Some((s.name.clone(), d))
        })
        .filter(|(_, v)| !v.starts_with("fingerprint:"))
        .collect();
    let host = cfg.host.clone();
    let key = cfg.store.signing_key.clone();
    let st_store = Arc::clone(&store);
    let ack_held = held.clone();
    blocking(move || acknowledge(&st_store, &host, &key, &ack_held)).await?;
    st.acked = held.into_iter().collect();
    if unrestored > 0 {
        return Err(Error::NotRestored(unrestored));
    }
    if failed > 0 {
        return Err(Error::Delivery { failed });
    }
    Ok(())
}

/// Why a delivery failed, and whether the previous files are back.
enum Failure {
    Restored(String),
    NotRestored(String),
}

/// Writes the files of one secret, reloads, probes; on any failure puts the previous
/// files back (and reloads again).
async fn deliver_one(secret: &config::Secret, name: &str, rec: &Record) -> Result<(), Failure> {
    // A reload endpoint or probe may echo the value just delivered (a program reads its
    // files): what a peer answers is quoted only with this credential scrubbed.
    let _registered = crate::redact::register(&rec.secret, rec.key_id().or(rec.username()));
    let encoded = rec
        .key_id()
        .map(|id| crate::targets::elasticsearch::encoded(id, &rec.secret));
    let rotation = rec.get(key::ROTATION).unwrap_or("");
    let vars = deliver::Vars {
        secret: &rec.secret,
        username: rec.username(),
        key_id: rec.key_id(),
        encoded: encoded.as_ref(),
        name,
        rotation_id: rotation,
    };
    let (why, snap) = match deliver::deliver(&secret.deliver, &vars).await {
        Ok(snap) => match probe(secret, name, rotation, rec).await {
            Ok(()) => return Ok(()),
            Err(e) => (e, snap),
        },
        Err((e, snap)) => (e.to_string(), snap),
    };
    tracing::error!(secret = %name, error = %why, "delivering {name} failed; putting the previous files back");
    match deliver::restore(&secret.deliver, snap).await {
        Ok(()) => Err(Failure::Restored(why)),
        // The files are back; only telling the program failed again (as the reload
        // before it did): the host still holds what it held.
        Err(re @ deliver::Error::Reload { .. }) => {
            tracing::warn!(secret = %name, error = %re, "the previous files of {name} are back, but reloading after the restore failed too");
            Err(Failure::Restored(why))
        }
        Err(re) => {
            tracing::error!(secret = %name, error = %re, "restoring the previous files of {name} failed too; fix them by hand (the next pass delivers again)");
            Err(Failure::NotRestored(format!(
                "{why}; restoring the previous files failed too: {re}"
            )))
        }
    }
}

/// `[secret.probe]`: the HTTP probe of the `files` target, with the new value.
async fn probe(
    secret: &config::Secret,
    name: &str,
    rotation: &str,
    rec: &Record,
) -> Result<(), String> {
    let Some(p) = &secret.probe else {
        return Ok(());
    };
    let files = crate::targets::files::Config {
        http: p.http.clone(),
    };
    let no_lookup = |_: &str| Ok(None);
    let ctx = crate::targets::ProbeContext {
        name,
        rotation_id: rotation,
        probe: p,
        lookup: &no_lookup,
    };
    match files.probe(rec, &ctx).await {
        Ok(r) => {
            tracing::info!(secret = %name, elapsed = ?r.elapsed, detail = %r.detail, "probe of {name} succeeded");
            Ok(())
        }
        Err(e) => Err(format!("the probe failed: {e}")),
    }
}

/// Step 3: commits and pushes an acknowledgement of `held` unless the remote's tip of
/// this host already states it.
fn acknowledge(store: &Store, host: &str, key: &Path, held: &ack::Held) -> Result<(), Error> {
    let signer = Signer::from_file(key).map_err(Error::SigningKey)?;
    let own = AllowedSigners::parse(&format!(
        "rotd-agent@{host} {}\n",
        signer.public_key_openssh()
    ))
    .map_err(Error::SigningKey)?;
    // One rotd process at a time updates the clone's ack refs (see `fetch_tip`).
    let _lock = store.lock_store()?;
    let repo = store.repo()?;
    // A pass killed while it moved the local ack ref leaves the ref's `.lock` file;
    // under the store lock no live rotd process holds it.
    crate::store::clear_stale_ref_locks(&repo, "refs/rotd/acks");
    let remote = ack::Remote {
        host,
        transport: store.transport(),
    };
    let tip = remote.fetch_tip(&repo)?;
    if let Some(t) = tip {
        if ack::acknowledged(&repo, t, &own).as_ref() == Some(held) {
            tracing::debug!(host, "the remote already holds this acknowledgement");
            return Ok(());
        }
    }
    if held.is_empty() && tip.is_none() {
        return Ok(()); // nothing held, nothing acknowledged before: nothing to say
    }
    let oid = ack::commit(&repo, &remote, tip, held, &signer)?;
    crate::fault::point("agent-ack-committed");
    remote.push(&repo)?;
    let list: Vec<String> = held.iter().map(|(n, r)| format!("{n} {r}")).collect();
    tracing::info!(host, commit = %oid, acks = ?list, "acknowledged");
    Ok(())
}
