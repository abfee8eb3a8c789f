//! The rotation engine (DESIGN §5). The git store is the journal.
//!
//! One rotation of secret NAME, and what a crash or a failure at each step leaves:
//!
//! | step | what happens | a failure here | a crash (SIGKILL) after it |
//! |---|---|---|---|
//! | 1 plan | take NAME's lock; roll back any unfinished rotation of NAME; fetch and fast-forward the store; read the current record and the target (nothing is written, except a due retirement: a previous credential whose grace has passed is retired first, in its own `retired` commit); a rotation that would give the new password to a user still in grace stops here (the slot rule, `waiting-retire`) | exit 1, nothing changed | nothing changed |
//! | 2 pending | generate the secret (ring), encrypt, commit `secrets/NAME.pending.age` (`Rotd-Step: pending`), push: the push is the compare-and-swap between instances | nothing reached a target; a rejected push drops the local commit (commit, push and drop are one step under the store lock, so no other commit of this host lands on top of it); exit 1; a full disk: exit 1, nothing written | the pending record is in git; no target knows it yet; recovery removes it |
//! | 3 apply | install on the target so that old AND new are valid (the idle user; a second ES API key). When the TARGET makes the credential (an Elasticsearch API key: id and `api_key` come from the server), `apply` returns it in `Undo::record`; it replaces the pending record and is committed at once as `secrets/NAME.pending.age` again (`Rotd-Step: pending`, `Rotd-Key-Id`), before deliver; the first pending commit holds a generated placeholder and no `key-id` | rollback (the key is invalidated by id); a failed re-commit is a failure here | recovery rolls back: the idle user's previous hash (recorded in the pending record) is restored; the API key is invalidated by the pending record's `key-id`, or, when the crash came between the create and the re-commit, found by its name `rotd-NAME-ROTATION` |
//! | 4 deliver | consumer files written atomically, reloads run | rollback: files restored byte for byte from memory, reloaded | recovery renders the consumer files again from the current (old) record, removes files only the new one had, reloads |
//! | 5 probe | prove data flows with the NEW credential | rollback | as 4 |
//! | 6 commit | `secrets/NAME.age` := new record (with what to retire and when), pending removed, `Rotd-Step: succeeded`, push | exit 2 if the commit itself fails, e.g. a full disk (the new credential is live and recorded as pending; the next run rolls it back; tests/integration/faults.rs) | the commit is atomic: either still pending (recovery rolls back) or succeeded |
//! | 7 retire | after `grace` AND, for a secret with `consumers`, once every consumer host has acknowledged the current rotation (a signed `Rotd-Ack` on `refs/rotd/acks/HOST`, see `store::acks`): old credential removed from the target, `Rotd-Step: retired` | left for `rotd retire`/the daemon; status shows it (`waiting-acks` while hosts lag) | retire runs again (idempotent) |
//!
//! A target whose apply REPLACES the old credential (an Elasticsearch native user's
//! single password) rolls back from the CURRENT record (`rollback` receives it, in
//! recovery too); its consumers hold the old credential from apply until deliver.
//!
//! The slot rule: a target that reuses a slot (the alternating users of
//! `prometheus-remote-write`) never gets a new password for the user still valid in
//! its grace period — consumers that have not switched would be cut off. A scheduled
//! run waits for the retirement ([`Outcome::Waiting`], not retried); a manual one is
//! refused the same way, pointing at `rotd retire --force NAME` ([`Engine::retire_now`]).
//!
//! The ack gate: while consumer hosts lag, the old credential is still in use, so it is
//! not retired and the next rotation of the secret waits ([`Outcome::Waiting`] with
//! `lagging`, label `waiting-acks`). The overrides are the operator's, recorded:
//! `rotd retire --force NAME` ([`Engine::retire_now`]) and `rotd rotate --emergency
//! NAME` ([`Engine::rotate_emergency`]: `Rotd-Emergency: yes`, retired at once); both
//! name the hosts they cut off (`Rotd-Lagging`).
//!
//! A manual run may instead update the live credential in place when only settings
//! changed (an API key's privileges, see `targets::Config::update_in_place`):
//! `Rotd-Step: updated` with the current record's new metadata and the same secret.
//!
//! Rollback = target rollback, consumers restored and reloaded, pending removed in a
//! `rolled-back` commit. If the target rollback itself fails, the pending record is
//! KEPT (it describes a credential that may still be valid), a `failed` commit says
//! what is left, and the exit code is 2; the next rotation or start-up retries it.
//!
//! Invariant: every credential valid on a target is recorded, encrypted, in git (as
//! current, pending, or — during grace — in the current record's history) before
//! anything depends on it.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Host, Schedule};
use crate::deliver::{self, Vars};
use crate::redact;
use crate::secret::{self, Secret};
use crate::store::acks::Acks;
use crate::store::record::key;
use crate::store::{self, rel_path, Change, Message, Push, Record, Slot, Store};
use crate::targets;

/// A rotation could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no schedule named {0:?}; list them with `rotd status`")]
    UnknownSecret(String),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Random(#[from] secret::RandomError),
    #[error("cannot retire the previous credential of {name}: {reason}; it stays recorded for retirement; fix the cause and run `rotd retire --force {name}` again")]
    Retire { name: String, reason: String },
    #[error("internal task failed: {0}")]
    Join(String),
}

/// Who started a rotation (`Rotd-Trigger`).
#[derive(Debug, Clone)]
pub enum Trigger {
    Schedule,
    Manual {
        uid: u32,
        user: Option<String>,
    },
    /// The daemon re-read a schedule whose target settings changed (e.g. an API key's
    /// permissions): the target is brought in line, in place where it can be.
    Reload,
    Recovery,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Schedule => f.write_str("schedule"),
            Trigger::Manual { uid, user: Some(u) } => write!(f, "manual uid={uid} user={u}"),
            Trigger::Manual { uid, user: None } => write!(f, "manual uid={uid}"),
            Trigger::Reload => f.write_str("reload"),
            Trigger::Recovery => f.write_str("recovery"),
        }
    }
}

impl Trigger {
    /// A manual trigger for the calling process's user.
    pub fn manual_here() -> Trigger {
        let uid = nix::unistd::getuid();
        let user = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name);
        Trigger::Manual {
            uid: uid.as_raw(),
            user,
        }
    }
}

/// How a rotation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded {
        rotation: String,
        retired: bool,
    },
    /// The live credential was updated in place (new privileges, same secret).
    Updated {
        rotation: String,
        detail: String,
    },
    /// Failed and fully rolled back: the old credential is valid (exit 1).
    RolledBack {
        rotation: String,
        reason: String,
    },
    /// Another instance holds the rotation (push rejected / lock busy) (exit 1).
    Aborted {
        reason: String,
    },
    /// Not started because the user that would get the new password still holds the
    /// previous credential in its grace period (exit 1): giving it a new password
    /// now would cut off the consumers that have not switched yet. A scheduled run
    /// waits; a manual one is refused (see [`Engine::rotate`]).
    Waiting {
        /// The user still in grace.
        user: String,
        /// When its grace ends (`retire-after`).
        retire_after: String,
        /// How to go on now (`rotd retire --force NAME`).
        hint: String,
        /// The consumer hosts that have not acknowledged the current rotation
        /// (`waiting-acks`); empty when only the grace holds the slot.
        lagging: Vec<String>,
    },
    /// Failed and NOT fully rolled back (exit 2): `left` says what a human must do.
    Failed {
        rotation: String,
        reason: String,
        left: String,
    },
}

impl Outcome {
    /// The `outcome` label in metrics and the control protocol.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Updated { .. } => "updated",
            Outcome::RolledBack { .. } => "rolled-back",
            Outcome::Aborted { .. } => "aborted",
            Outcome::Waiting { lagging, .. } if !lagging.is_empty() => "waiting-acks",
            Outcome::Waiting { .. } => "waiting-retire",
            Outcome::Failed { .. } => "failed",
        }
    }

    /// One line for the operator.
    pub fn message(&self) -> String {
        match self {
            Outcome::Succeeded { rotation, retired } => format!(
                "rotated (rotation {rotation}){}",
                if *retired { "; old credential retired" } else { "" }
            ),
            Outcome::RolledBack { rotation, reason } => format!(
                "FAILED and rolled back (rotation {rotation}): {reason}; the old credential is still in use"
            ),
            Outcome::Updated { rotation, detail } => format!(
                "updated in place, not rotated (rotation {rotation}): {detail}; the secret is unchanged"
            ),
            Outcome::Aborted { reason } => format!("not rotated: {reason}"),
            Outcome::Waiting { user, retire_after, hint, lagging } if !lagging.is_empty() => format!(
                "not rotated: the previous credential ({user}) is still in use until every consumer acknowledges the current rotation, and host(s) {} have not (its grace ended at {retire_after}); {hint}",
                lagging.join(", ")
            ),
            Outcome::Waiting { user, retire_after, hint, .. } => format!(
                "not rotated: user {user} still holds the previous credential until {retire_after} (its grace period), and this rotation would give it the new password, cutting off every consumer that has not switched yet; {hint}"
            ),
            Outcome::Failed { rotation, reason, left } => format!(
                "FAILED and NOT fully rolled back (rotation {rotation}): {reason}. Left to do: {left}"
            ),
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Succeeded { .. } | Outcome::Updated { .. } => 0,
            Outcome::RolledBack { .. } | Outcome::Aborted { .. } | Outcome::Waiting { .. } => 1,
            Outcome::Failed { .. } => 2,
        }
    }
}

/// After this long, a pending rotation of another instance is taken to be abandoned
/// (no rotation takes an hour) and any instance may roll it back.
const FOREIGN_PENDING_STALE: chrono::Duration = chrono::Duration::hours(1);

/// The steps after which the test hook `ROTD_FAULT_KILL_AFTER=<step>` kills rotd.
/// (`created` also exists: after a target made a credential, before its commit.)
pub const STEPS: &[&str] = &["pending", "apply", "deliver", "probe", "commit"];

/// Test hook: SIGKILL this process right after `step` when the environment asks
/// ([`crate::fault`]). It exists to prove the journal's guarantees with real kills
/// (tests/integration/crash.rs).
fn fault_point(step: &str) {
    crate::fault::point(step);
}

/// Times a rotation's steps (logged with its outcome at `info`: where a
/// rotation's time went; bench/e2e-prometheus.sh reads it) and hosts the test hook at
/// each step's end.
struct Steps {
    last: std::time::Instant,
    times: Vec<(&'static str, Duration)>,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            last: std::time::Instant::now(),
            times: Vec::new(),
        }
    }

    /// The time since the previous mark goes to `step`.
    fn mark(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        self.times.push((step, now - self.last));
        self.last = now;
    }

    /// [`Steps::mark`], then the crash test hook.
    fn done(&mut self, step: &'static str) {
        self.mark(step);
        fault_point(step);
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, d)) in self.times.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {:.1} ms", d.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

/// Runs blocking store work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, store::Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Join(e.to_string()))?
        .map_err(Error::from)
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Replaces every encoding of the records' secrets (raw, `{{encoded}}`, Basic,
/// JSON-escaped, URL-encoded: see [`redact`]) and of every credential registered for
/// redaction in text bound for a log, an answer or a commit. Peers' text inside it
/// was already scrubbed before it was cut, where it was quoted.
fn scrub(text: &str, record: &Record, other: Option<&Record>) -> String {
    let mut n = redact::live();
    for rec in std::iter::once(record).chain(other) {
        n.add(&rec.secret, rec.username());
        n.add(&rec.secret, rec.key_id());
    }
    n.scrub(text)
}

/// Registers the records' secrets for redaction while a rotation uses them, so that a
/// peer's text that echoes one is scrubbed where it is quoted, before it is cut.
fn register(records: &[Option<&Record>]) -> Vec<redact::Registration> {
    records
        .iter()
        .flatten()
        .map(|r| redact::register(&r.secret, r.key_id().or(r.username())))
        .collect()
}

/// Whether `rec` names a previous credential whose grace has ended. A `retire-after`
/// that cannot be read counts as ended: the credential is retired rather than kept
/// valid forever.
fn retire_is_due(rec: &Record, now: chrono::DateTime<chrono::Utc>) -> bool {
    rec.get(key::RETIRE_AFTER).is_some_and(|after| {
        chrono::DateTime::parse_from_rfc3339(after)
            .map(|t| t <= now)
            .unwrap_or(true)
    })
}

/// The slot rule: a rotation that would give the new password to the user still
/// holding the previous credential in its grace period does not run (its consumers
/// that have not switched yet would be cut off). Only targets that reuse a slot are
/// concerned — the alternating users of `prometheus-remote-write`; a target that
/// makes a new credential each time (an API key, `files`) has no username to reuse.
fn slot_in_grace(
    name: &str,
    current: Option<&Record>,
    plan: &targets::Plan,
    trigger: &Trigger,
) -> Option<Outcome> {
    let cur = current?;
    let user = plan.username.as_deref()?;
    if cur.get(key::RETIRE_USERNAME) != Some(user) || cur.username() == Some(user) {
        return None;
    }
    let retire_after = cur.get(key::RETIRE_AFTER)?;
    if retire_is_due(cur, chrono::Utc::now()) {
        return None;
    }
    let hint = match trigger {
        Trigger::Schedule => format!(
            "the scheduled rotation waits: the daemon retires {user} at {retire_after}, and the first scheduled run after that rotates"
        ),
        _ => format!(
            "wait until then and run `rotd retire` (the daemon also retires it by itself) and rotate again, or, once every consumer uses the current credential, retire {user} now with `rotd retire --force {name}` and rotate again"
        ),
    };
    Some(Outcome::Waiting {
        user: user.to_owned(),
        retire_after: retire_after.to_owned(),
        hint,
        lagging: Vec::new(),
    })
}

/// Why an old credential is retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retire {
    /// Its grace has passed and every consumer acknowledged the current rotation.
    Due,
    /// `rotd retire --force NAME`: now, whatever the grace and the acks.
    Forced,
    /// `rotd rotate --emergency NAME`: at once, laggards cut off.
    Emergency,
}

/// What a retirement pass did ([`Engine::retire_due`]).
#[derive(Debug, Default)]
pub struct Retirements {
    /// Retirements carried out (or failed), by secret.
    pub done: Vec<(String, Result<String, String>)>,
    /// Secrets due by their grace whose consumers have not all acknowledged the
    /// current rotation, with the lagging hosts (`waiting-acks`).
    pub waiting: Vec<(String, Vec<String>)>,
}

/// The rotation a record belongs to (what a consumer's `Rotd-Ack` names).
fn rotation_of(rec: &Record) -> &str {
    rec.get(key::ROTATION).unwrap_or("unknown")
}

/// When a record's credential was made.
fn created_at(rec: &Record) -> Option<chrono::DateTime<chrono::Utc>> {
    rec.get(key::CREATED)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Drives rotations of the secrets in one configuration.
pub struct Engine {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
}

impl Engine {
    pub fn new(config: Arc<Config>, store: Arc<Store>) -> Engine {
        Engine { config, store }
    }

    fn schedule(&self, name: &str) -> Result<&Schedule, Error> {
        self.config
            .schedule(name)
            .ok_or_else(|| Error::UnknownSecret(name.to_owned()))
    }

    fn vars<'a>(
        sched: &'a Schedule,
        rec: &'a Record,
        encoded: Option<&'a Secret>,
        rotation: &'a str,
    ) -> Vars<'a> {
        Vars {
            secret: &rec.secret,
            username: rec.username(),
            key_id: rec.key_id(),
            encoded,
            name: &sched.name,
            rotation_id: rotation,
        }
    }

    /// `{{encoded}}`: base64(key id:secret) when the record has a key id (ES API key).
    fn encoded(rec: &Record) -> Option<Secret> {
        rec.key_id()
            .map(|id| targets::elasticsearch::encoded(id, &rec.secret))
    }

    /// Reads another secret of the store, for the targets.
    fn lookup(&self) -> impl Fn(&str) -> Result<Option<Record>, store::Error> + Sync {
        let store = self.store.clone();
        move |n: &str| store.read(n, Slot::Current)
    }

    fn message(
        sched: &Schedule,
        step: &str,
        rotation: &str,
        trigger: &Trigger,
        rec: Option<&Record>,
    ) -> Message {
        Message::new(format!("rotate {}: {step}", sched.name))
            .trailer("Rotd-Secret", &sched.name)
            .trailer("Rotd-Rotation", rotation)
            .trailer("Rotd-Step", step)
            .trailer("Rotd-Trigger", trigger.to_string())
            .trailer("Rotd-Target", sched.target.describe(rec))
    }

    /// Rotates one secret now.
    pub async fn rotate(&self, name: &str, trigger: Trigger) -> Result<Outcome, Error> {
        self.rotate_with(name, trigger, false).await
    }

    /// `rotd rotate --emergency NAME` (a leak): rotates, and once the new credential
    /// is proven retires the old one at once, whatever its grace and the consumers'
    /// acknowledgements (laggards are cut off by design). A previous credential still
    /// waiting for retirement is retired first. Its `succeeded` and `retired` commits
    /// carry `Rotd-Emergency: yes`; a retirement names the laggards (`Rotd-Lagging`).
    /// When the old credential cannot be retired, the outcome is
    /// [`Outcome::Failed`] (exit 2): the leaked credential is still valid.
    pub async fn rotate_emergency(&self, name: &str, trigger: Trigger) -> Result<Outcome, Error> {
        self.rotate_with(name, trigger, true).await
    }

    async fn rotate_with(
        &self,
        name: &str,
        trigger: Trigger,
        emergency: bool,
    ) -> Result<Outcome, Error> {
        let sched = self.schedule(name)?.clone();
        let mut steps = Steps::new();
        let store = self.store.clone();
        let lock_name = name.to_owned();
        let _lock = blocking(move || store.lock_secret(&lock_name, true)).await?;
        steps.mark("lock");

        // 1 plan: catch up with the remote first, so that a rotation another instance
        // has in flight is seen (and not rotated over).
        let store = self.store.clone();
        let synced = blocking(move || store.sync_from_remote()).await?;
        if let Some(o @ Outcome::Aborted { .. }) = self.recover_locked(&sched).await? {
            return Ok(o);
        }
        if !synced {
            tracing::warn!(
                secret = name,
                "store remote unreachable; rotating on the local store, pushing later"
            );
        }
        let store = self.store.clone();
        let n = name.to_owned();
        let mut current = blocking(move || store.read(&n, Slot::Current)).await?;
        // A retirement whose grace has passed runs before the rotation, so that the
        // previous credential is removed (and recorded `retired`) before its slot is
        // given a new password, and the new record's retire metadata does not
        // overwrite one still to be carried out. With consumers, it also waits for
        // their acknowledgements: until every consumer has acknowledged the current
        // rotation the previous credential is still in use, so the rotation waits
        // (`waiting-acks`). An emergency retires whatever is pending, now.
        let pending_retire = current.as_ref().and_then(|c| {
            let due = retire_is_due(c, chrono::Utc::now());
            let pending = c.get(key::RETIRE_AFTER).is_some();
            (due || (emergency && pending)).then(|| c.clone())
        });
        if let Some(cur) = pending_retire {
            let how = if emergency {
                Retire::Emergency
            } else {
                let lagging = self.lagging_now(&sched, &cur).await?;
                if !lagging.is_empty() {
                    let retire_after = cur.get(key::RETIRE_AFTER).unwrap_or("-").to_owned();
                    let user = cur
                        .get(key::RETIRE_USERNAME)
                        .or(cur.get(key::RETIRE_KEY_ID))
                        .unwrap_or("-")
                        .to_owned();
                    tracing::info!(secret = name, %trigger, lagging = %lagging.join(", "), "rotation waits: consumer hosts have not acknowledged the current rotation, so the previous credential is still in use");
                    return Ok(Outcome::Waiting {
                        user,
                        retire_after,
                        hint: format!("the old credential is retired (and the next rotation runs) once they have; `rotd retire --force {name}` retires it now, or `rotd rotate --emergency {name}` rotates and cuts them off"),
                        lagging,
                    });
                }
                Retire::Due
            };
            if let Err(e) = self.retire_locked(&sched, &trigger, how).await {
                return Ok(Outcome::Aborted {
                    reason: format!(
                        "the previous credential of {name} is due to be retired before a new one is made, and retiring it failed: {e}; nothing was rotated; fix the target and run `rotd retire` (or rotate again)"
                    ),
                });
            }
            let store = self.store.clone();
            let n = name.to_owned();
            current = blocking(move || store.read(&n, Slot::Current)).await?;
        }
        let rotation = ulid::Ulid::new().to_string();

        // A manual run whose target can apply changed settings to the live
        // credential (an ES API key's privileges) does that instead of rotating;
        // a scheduled run always rotates (the new credential gets the settings too).
        // An emergency always makes a new credential: the current one has leaked.
        if !matches!(trigger, Trigger::Schedule) && !emergency {
            if let Some(cur) = &current {
                if let Some(o) = self
                    .update_in_place(&sched, cur, &rotation, &trigger)
                    .await?
                {
                    return Ok(o);
                }
            }
        }

        let plan = match sched.target.plan(current.as_ref()) {
            Ok(p) => p,
            Err(e) => {
                return Ok(Outcome::Aborted {
                    reason: format!("cannot plan the rotation: {e}"),
                })
            }
        };
        if let Some(o) =
            slot_in_grace(name, current.as_ref(), &plan, &trigger).filter(|_| !emergency)
        {
            if let Outcome::Waiting {
                user, retire_after, ..
            } = &o
            {
                tracing::info!(secret = name, %trigger, user = %user, retire_after = %retire_after, "rotation waits: the user it would give the new password to is still in its grace period until {retire_after}; it is retired then, and the next run rotates");
            }
            return Ok(o);
        }
        tracing::info!(secret = name, rotation = %rotation, trigger = %trigger, username = ?plan.username, "rotation started");

        // 2 pending
        steps.mark("plan");
        let new_secret = secret::generate(sched.length, sched.charset)?;
        let mut pending = Record::new(new_secret)
            .with(key::CREATED, now_rfc3339())
            .with(key::ROTATION, &rotation)
            .with(key::INSTANCE, self.store.instance_id());
        if let Some(u) = &plan.username {
            pending.set(key::USERNAME, u);
        }
        for (k, v) in &plan.meta {
            pending.set(k, v);
        }
        // Before anything changes: a deliver path that renders outside its directory
        // or holds a link, FIFO or device is refused here, not half-way through.
        let pre = Self::vars(&sched, &pending, None, &rotation);
        if let Err(e) = deliver::preflight(&sched.deliver, &pre) {
            return Ok(Outcome::Aborted {
                reason: format!("deliver: {e}"),
            });
        }
        let mut redacted = register(&[Some(&pending), current.as_ref()]);
        let mut fp = self.store.fingerprint(&sched.name, &pending.secret);
        let msg = Self::message(&sched, "pending", &rotation, &trigger, Some(&pending))
            .trailer("Rotd-Fingerprint", &fp);
        // Committed and pushed as one step: the push is the compare-and-swap between
        // instances, and a rejected pending commit is dropped before anything else
        // of this clone can commit on top of it.
        let store = self.store.clone();
        let n = name.to_owned();
        let rec = pending.clone();
        let pushed = blocking(move || {
            let put = store.put_record(&n, Slot::Pending, &rec)?;
            store.commit_and_push(vec![put], &msg)
        })
        .await?;
        match pushed {
            Push::Rejected(reason) => {
                return Ok(Outcome::Aborted {
                    reason: format!("the store remote moved ({reason}): another rotd instance is rotating; nothing was changed"),
                });
            }
            Push::Unreachable(reason) => {
                tracing::warn!(secret = name, %reason, "cannot push the pending commit; going on locally")
            }
            Push::Pushed | Push::NoRemote => {}
        }
        steps.done("pending");

        // 3 apply, 4 deliver, 5 probe
        let mut undo: Option<targets::Undo> = None;
        let mut snapshot = None;
        let lookup = self.lookup();
        let step_ctx = targets::StepContext {
            name: &sched.name,
            lookup: &lookup,
        };
        let result: Result<targets::ProbeReport, String> = async {
            let u = sched
                .target
                .apply(&pending, &step_ctx)
                .await
                .map_err(|e| format!("apply: {e}"))?;
            let made = u.record.clone();
            undo = Some(u);
            if let Some(rec) = made {
                // Test hook: a crash between the target making the credential and
                // the commit of its id (recovery then finds it by name).
                fault_point("created");
                // The target made the credential: record it before anything uses it.
                pending = rec;
                redacted.extend(register(&[Some(&pending)]));
                fp = self.store.fingerprint(&sched.name, &pending.secret);
                let mut msg = Self::message(&sched, "pending", &rotation, &trigger, Some(&pending))
                    .trailer("Rotd-Fingerprint", &fp);
                if let Some(k) = pending.key_id() {
                    msg = msg.trailer("Rotd-Key-Id", k);
                }
                self.commit_record(name, Slot::Pending, &pending, Vec::new(), msg)
                    .await
                    .map_err(|e| format!("recording the new credential: {e}"))?;
                self.push_logged().await;
            }
            steps.done("apply");
            let encoded = Self::encoded(&pending);
            let vars = Self::vars(&sched, &pending, encoded.as_ref(), &rotation);
            match deliver::deliver(&sched.deliver, &vars).await {
                Ok(s) => snapshot = Some(s),
                Err((e, s)) => {
                    snapshot = Some(s);
                    return Err(format!("deliver: {e}"));
                }
            }
            steps.done("deliver");
            let ctx = targets::ProbeContext {
                name: &sched.name,
                rotation_id: &rotation,
                probe: &sched.probe,
                lookup: &lookup,
            };
            let report = sched
                .target
                .probe(&pending, &ctx)
                .await
                .map_err(|e| format!("probe: {e}"))?;
            steps.done("probe");
            Ok(report)
        }
        .await;

        let report = match result {
            Ok(r) => r,
            Err(reason) => {
                let reason = scrub(&reason, &pending, current.as_ref());
                tracing::warn!(secret = name, rotation = %rotation, %reason, %steps, "rotation failed; rolling back");
                return self
                    .roll_back(
                        &sched,
                        &pending,
                        current.as_ref(),
                        undo.as_ref(),
                        snapshot,
                        &rotation,
                        &trigger,
                        &reason,
                    )
                    .await;
            }
        };

        // 6 commit
        let mut new_current = pending.clone();
        new_current.remove(key::RESTORE_HASH);
        let retire_after =
            chrono::Utc::now() + chrono::Duration::from_std(sched.grace).unwrap_or_default();
        let retire_after_s = retire_after.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        if let Some(old) = &plan.retire_username {
            new_current.set(key::RETIRE_USERNAME, old);
            new_current.set(key::RETIRE_AFTER, &retire_after_s);
        }
        if let Some(old) = &plan.retire_key_id {
            new_current.set(key::RETIRE_KEY_ID, old);
            new_current.set(key::RETIRE_AFTER, &retire_after_s);
        }
        let retires = plan.retire_username.is_some() || plan.retire_key_id.is_some();
        let probe_trailer = format!("ok {}ms", report.elapsed.as_millis());
        let mut msg = Self::message(&sched, "succeeded", &rotation, &trigger, Some(&new_current))
            .trailer("Rotd-Fingerprint", &fp)
            .trailer("Rotd-Probe", probe_trailer);
        if emergency {
            msg = msg.trailer("Rotd-Emergency", "yes");
        }
        if retires {
            msg = msg.trailer("Rotd-Retire-After", &retire_after_s);
        }
        let pending_gone = vec![Change::Remove {
            path: rel_path(name, Slot::Pending),
        }];
        let committed = self
            .commit_record(name, Slot::Current, &new_current, pending_gone, msg)
            .await;
        if let Err(e) = committed {
            return Ok(Outcome::Failed {
                rotation,
                reason: format!("the succeeded commit failed: {e}"),
                left: format!("the new credential is live and recorded in {}; run `rotd rotate {name}` again to roll it back", rel_path(name, Slot::Pending)),
            });
        }
        steps.done("commit");
        self.push_logged().await;
        steps.mark("push");

        // 7 retire (now, when the grace has already passed and no consumer can still
        // hold the old credential — none has acknowledged a rotation this young, unless
        // it has no consumers; or at once in an emergency)
        let mut retired = false;
        if emergency && retires {
            if let Err(e) = self
                .retire_locked(&sched, &trigger, Retire::Emergency)
                .await
            {
                return Ok(Outcome::Failed {
                    rotation,
                    reason: format!("the new credential is live, but the old (leaked) one could not be retired: {e}"),
                    left: format!("the old credential is still valid on the target; fix the cause and run `rotd retire --force {name}`"),
                });
            }
            retired = true;
            steps.mark("retire");
        } else if sched.grace == Duration::ZERO && retires {
            // The rotation has succeeded: an unreadable ack ref keeps the old
            // credential (retired later), it never fails the rotation.
            match self.lagging_now(&sched, &new_current).await {
                Ok(lagging) if lagging.is_empty() => {
                    retired = self
                        .retire_locked(&sched, &trigger, Retire::Due)
                        .await
                        .is_ok();
                }
                Ok(lagging) => {
                    tracing::info!(secret = name, rotation = %rotation, lagging = %lagging.join(", "), "the old credential is kept until every consumer acknowledges this rotation (waiting-acks)");
                }
                Err(e) => {
                    tracing::warn!(secret = name, rotation = %rotation, error = %e, "cannot read the consumers' acknowledgements; the old credential is kept and retired by a later pass");
                }
            }
            steps.mark("retire");
        }
        tracing::info!(secret = name, rotation = %rotation, probe_ms = report.elapsed.as_millis() as u64, %steps, "rotation succeeded");
        Ok(Outcome::Succeeded { rotation, retired })
    }

    /// Updates the live credential in place when the target can (see
    /// [`targets::Config::update_in_place`]); commits `updated` (the current record
    /// with its new metadata, same secret), `rolled-back` or `failed`.
    async fn update_in_place(
        &self,
        sched: &Schedule,
        current: &Record,
        rotation: &str,
        trigger: &Trigger,
    ) -> Result<Option<Outcome>, Error> {
        let lookup = self.lookup();
        let ctx = targets::StepContext {
            name: &sched.name,
            lookup: &lookup,
        };
        let started = std::time::Instant::now();
        let result = sched.target.update_in_place(current, &ctx).await;
        let fp = self.store.fingerprint(&sched.name, &current.secret);
        let (step, change, outcome) = match result {
            Ok(None) => return Ok(None),
            Ok(Some(targets::InPlace::Updated { record, detail })) => {
                tracing::info!(secret = %sched.name, rotation, %detail, "updated in place; the secret is unchanged");
                let msg = Self::message(sched, "updated", rotation, trigger, Some(&record))
                    .trailer("Rotd-Fingerprint", &fp)
                    .trailer(
                        "Rotd-Probe",
                        format!("ok {}ms", started.elapsed().as_millis()),
                    )
                    .trailer("Rotd-Updated", scrub(&detail, current, None));
                (
                    msg,
                    Some(record),
                    Outcome::Updated {
                        rotation: rotation.to_owned(),
                        detail,
                    },
                )
            }
            Ok(Some(targets::InPlace::Reverted(reason))) => {
                let reason = scrub(&reason, current, None);
                tracing::warn!(secret = %sched.name, rotation, %reason, "update in place failed and was undone");
                let msg = Self::message(sched, "rolled-back", rotation, trigger, Some(current))
                    .trailer("Rotd-Fingerprint", &fp)
                    .trailer("Rotd-Error", &reason);
                (
                    msg,
                    None,
                    Outcome::RolledBack {
                        rotation: rotation.to_owned(),
                        reason,
                    },
                )
            }
            Err(e) => {
                let reason = scrub(&e.to_string(), current, None);
                tracing::error!(secret = %sched.name, rotation, %reason, "update in place failed and was NOT undone");
                let left = "the live credential holds the updated settings that failed verification; fix the settings and run `rotd rotate` again".to_owned();
                let msg = Self::message(sched, "failed", rotation, trigger, Some(current))
                    .trailer("Rotd-Fingerprint", &fp)
                    .trailer("Rotd-Error", &reason)
                    .trailer("Rotd-Left", &left);
                (
                    msg,
                    None,
                    Outcome::Failed {
                        rotation: rotation.to_owned(),
                        reason,
                        left,
                    },
                )
            }
        };
        match change {
            Some(rec) => {
                self.commit_record(&sched.name, Slot::Current, &rec, Vec::new(), step)
                    .await?;
            }
            None => {
                let store = self.store.clone();
                blocking(move || store.commit(Vec::new(), &step)).await?;
            }
        }
        self.push_logged().await;
        Ok(Some(outcome))
    }

    /// Encrypts `rec` into NAME's `slot` file and commits it with `also`, off the
    /// async runtime.
    async fn commit_record(
        &self,
        name: &str,
        slot: Slot,
        rec: &Record,
        also: Vec<Change>,
        msg: Message,
    ) -> Result<git2::Oid, Error> {
        let store = self.store.clone();
        let name = name.to_owned();
        let rec = rec.clone();
        blocking(move || {
            let mut changes = vec![store.put_record(&name, slot, &rec)?];
            changes.extend(also);
            store.commit(changes, &msg)
        })
        .await
    }

    async fn push_logged(&self) {
        let store = self.store.clone();
        match blocking(move || store.push()).await {
            Ok(Push::Pushed) | Ok(Push::NoRemote) => {}
            Ok(Push::Rejected(r)) | Ok(Push::Unreachable(r)) => {
                tracing::warn!(reason = %r, "cannot push the store; the commit stays local and is pushed later")
            }
            Err(e) => tracing::warn!(error = %e, "cannot push the store"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn roll_back(
        &self,
        sched: &Schedule,
        pending: &Record,
        current: Option<&Record>,
        undo: Option<&targets::Undo>,
        snapshot: Option<deliver::Snapshot>,
        rotation: &str,
        trigger: &Trigger,
        reason: &str,
    ) -> Result<Outcome, Error> {
        // Consumers first: they go back to the old credential while the new one is
        // still valid, so no request is sent with a credential already revoked.
        let mut left = Vec::new();
        let consumers = match snapshot {
            Some(s) => deliver::restore(&sched.deliver, s).await,
            None => Ok(()),
        };
        if let Err(e) = consumers {
            left.push(format!("consumers: {e}"));
        }
        let lookup = self.lookup();
        let ctx = targets::StepContext {
            name: &sched.name,
            lookup: &lookup,
        };
        if let Err(e) = sched.target.rollback(pending, current, undo, &ctx).await {
            left.push(format!("target: {e}"));
        }
        self.finish_rollback(sched, pending, current, rotation, trigger, reason, left)
            .await
    }

    /// Commits the end of a rollback: `rolled-back` (pending removed) when nothing is
    /// left, else `failed` with the pending record kept.
    #[allow(clippy::too_many_arguments)]
    async fn finish_rollback(
        &self,
        sched: &Schedule,
        pending: &Record,
        current: Option<&Record>,
        rotation: &str,
        trigger: &Trigger,
        reason: &str,
        left: Vec<String>,
    ) -> Result<Outcome, Error> {
        // Peers' answers (reload bodies, target errors) may quote a credential.
        let reason = scrub(reason, pending, current);
        let left_s = scrub(&left.join("; "), pending, current);
        let fp = self.store.fingerprint(&sched.name, &pending.secret);
        let (step, changes) = if left.is_empty() {
            (
                "rolled-back",
                vec![Change::Remove {
                    path: rel_path(&sched.name, Slot::Pending),
                }],
            )
        } else {
            ("failed", Vec::new())
        };
        let mut msg = Self::message(sched, step, rotation, trigger, Some(pending))
            .trailer("Rotd-Fingerprint", fp)
            .trailer("Rotd-Error", &reason);
        if !left.is_empty() {
            msg = msg.trailer("Rotd-Left", &left_s);
        }
        let store = self.store.clone();
        blocking(move || store.commit(changes, &msg)).await?;
        self.push_logged().await;
        if left.is_empty() {
            tracing::info!(secret = %sched.name, rotation, "rolled back; the old credential is in use");
            Ok(Outcome::RolledBack {
                rotation: rotation.to_owned(),
                reason,
            })
        } else {
            tracing::error!(secret = %sched.name, rotation, left = %left_s, "rollback incomplete");
            Ok(Outcome::Failed {
                rotation: rotation.to_owned(),
                reason,
                left: format!("{left_s}; the new credential stays recorded in {} until a later run rolls it back", rel_path(&sched.name, Slot::Pending)),
            })
        }
    }

    /// Finishes every unfinished rotation found at HEAD (start-up recovery).
    pub async fn recover_all(&self) -> Result<Vec<(String, Outcome)>, Error> {
        let store = self.store.clone();
        blocking(move || store.reset_worktree()).await?;
        let store = self.store.clone();
        let (_, pending) = blocking(move || store.names()).await?;
        let mut out = Vec::new();
        for name in pending {
            let Some(sched) = self.config.schedule(&name).cloned() else {
                tracing::error!(secret = %name, "a rotation is unfinished but its schedule is gone; restore the schedule file so rotd can roll it back");
                continue;
            };
            let store = self.store.clone();
            let n = name.clone();
            let _lock = blocking(move || store.lock_secret(&n, true)).await?;
            match self.recover_locked(&sched).await? {
                Some(Outcome::Aborted { reason }) => {
                    tracing::info!(secret = %name, %reason, "left alone")
                }
                Some(o) => out.push((name, o)),
                None => {}
            }
        }
        Ok(out)
    }

    /// Rolls back an unfinished rotation of `sched` (caller holds its lock).
    async fn recover_locked(&self, sched: &Schedule) -> Result<Option<Outcome>, Error> {
        let store = self.store.clone();
        let n = sched.name.clone();
        let (pending, current) = blocking(move || {
            store.reset_secret(&n)?;
            Ok((
                store.read(&n, Slot::Pending)?,
                store.read(&n, Slot::Current)?,
            ))
        })
        .await?;
        let Some(pending) = pending else {
            return Ok(None);
        };
        let _redacted = register(&[Some(&pending), current.as_ref()]);
        let rotation = pending.get(key::ROTATION).unwrap_or("unknown").to_owned();
        // Another instance's rotation that may still be running is not ours to undo;
        // one that has been pending for longer than any rotation takes is abandoned.
        if let Some(owner) = pending
            .get(key::INSTANCE)
            .filter(|o| *o != self.store.instance_id())
        {
            let started = pending
                .get(key::CREATED)
                .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok());
            let fresh = started.is_some_and(|t| {
                chrono::Utc::now().signed_duration_since(t) < FOREIGN_PENDING_STALE
            });
            if fresh {
                return Ok(Some(Outcome::Aborted {
                    reason: format!(
                        "another rotd instance ({owner}) is rotating {} (rotation {rotation}); nothing was changed",
                        sched.name
                    ),
                }));
            }
            tracing::warn!(secret = %sched.name, %owner, "a rotation of another instance has been pending for over an hour; taking it over to roll it back");
        }
        tracing::warn!(secret = %sched.name, rotation = %rotation, "found an unfinished rotation; rolling it back");
        let mut left = Vec::new();
        if let Err(e) = self.redeliver(sched, &pending, current.as_ref()).await {
            left.push(format!("consumers: {e}"));
        }
        let lookup = self.lookup();
        let ctx = targets::StepContext {
            name: &sched.name,
            lookup: &lookup,
        };
        if let Err(e) = sched
            .target
            .rollback(&pending, current.as_ref(), None, &ctx)
            .await
        {
            left.push(format!("target: {e}"));
        }
        let outcome = self
            .finish_rollback(
                sched,
                &pending,
                current.as_ref(),
                &rotation,
                &Trigger::Recovery,
                "unfinished rotation found at start-up",
                left,
            )
            .await?;
        Ok(Some(outcome))
    }

    /// Puts the consumers back on the current credential after a crash: renders the
    /// files from the current record, removes files only the pending one produced,
    /// reloads.
    async fn redeliver(
        &self,
        sched: &Schedule,
        pending: &Record,
        current: Option<&Record>,
    ) -> Result<(), deliver::Error> {
        let pending_rotation = pending.get(key::ROTATION).unwrap_or("").to_owned();
        let pending_enc = Self::encoded(pending);
        let new_paths = deliver::paths(
            &sched.deliver,
            &Self::vars(sched, pending, pending_enc.as_ref(), &pending_rotation),
        )?;
        let cur_rotation = current
            .and_then(|c| c.get(key::ROTATION))
            .unwrap_or("")
            .to_owned();
        let cur_enc = current.and_then(Self::encoded);
        let cur_paths = match current {
            Some(c) => deliver::paths(
                &sched.deliver,
                &Self::vars(sched, c, cur_enc.as_ref(), &cur_rotation),
            )?,
            None => Vec::new(),
        };
        for p in new_paths.iter().filter(|p| !cur_paths.contains(p)) {
            crate::fsutil::remove_durable(p)?;
        }
        match current {
            Some(c) => {
                deliver::deliver(
                    &sched.deliver,
                    &Self::vars(sched, c, cur_enc.as_ref(), &cur_rotation),
                )
                .await
                .map_err(|(e, _)| e)?;
            }
            None => deliver::run_reloads(&sched.deliver).await?,
        }
        Ok(())
    }

    /// Carries out every retirement whose grace has passed (of `only`, when given)
    /// and whose consumers have all acknowledged the current rotation. The consumers'
    /// acks are fetched once and read once for the whole pass; a secret still waiting
    /// for some is left (listed in [`Retirements::waiting`]) and, after its
    /// `ack_timeout`, its laggards are reported at WARN.
    pub async fn retire_due(&self, only: Option<&str>) -> Result<Retirements, Error> {
        let mut out = Retirements::default();
        let scheds: Vec<Schedule> = self
            .config
            .schedules
            .iter()
            .filter(|s| only.map_or(true, |n| n == s.name))
            .cloned()
            .collect();
        let acks = self.acks_for(&scheds, true).await?;
        for sched in scheds {
            if only.is_some_and(|n| n != sched.name) {
                continue;
            }
            let store = self.store.clone();
            let n = sched.name.clone();
            let lock = match blocking(move || store.lock_secret(&n, false)).await {
                Ok(l) => l,
                Err(Error::Store(store::Error::Busy(_))) => continue,
                Err(e) => return Err(e),
            };
            let store = self.store.clone();
            let n = sched.name.clone();
            let Some(cur) = blocking(move || store.read(&n, Slot::Current)).await? else {
                continue;
            };
            if !retire_is_due(&cur, chrono::Utc::now()) {
                continue;
            }
            let lagging = acks.lagging(&sched.consumers, &sched.name, rotation_of(&cur));
            if !lagging.is_empty() {
                let overdue = created_at(&cur).is_some_and(|t| {
                    t + chrono::Duration::from_std(sched.ack_timeout).unwrap_or_default()
                        <= chrono::Utc::now()
                });
                if overdue {
                    tracing::warn!(secret = %sched.name, lagging = %lagging.join(", "), ack_timeout = %humantime::format_duration(sched.ack_timeout), "consumer hosts have not acknowledged the current rotation within ack_timeout; the old credential stays valid for them; fix their `rotd agent`, or cut them off with `rotd retire --force {}`", sched.name);
                } else {
                    tracing::info!(secret = %sched.name, lagging = %lagging.join(", "), "retirement waits for the consumers' acknowledgements");
                }
                out.waiting.push((sched.name.clone(), lagging));
                continue;
            }
            let r = self
                .retire_locked(&sched, &Trigger::Schedule, Retire::Due)
                .await;
            drop(lock);
            out.done.push((sched.name.clone(), r));
        }
        Ok(out)
    }

    /// Fetches (when `fetch`) and reads the acks of every consumer of `scheds`, each
    /// host once.
    async fn acks_for(&self, scheds: &[Schedule], fetch: bool) -> Result<Acks, Error> {
        let hosts: Vec<Host> = scheds
            .iter()
            .flat_map(|s| &s.consumers)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter_map(|h| self.config.store.hosts.get(h).cloned())
            .collect();
        if hosts.is_empty() {
            return Ok(Acks::default());
        }
        let store = self.store.clone();
        blocking(move || {
            if fetch {
                store.fetch_acks()?;
            }
            store.read_acks(&hosts, true)
        })
        .await
    }

    /// The consumers of `sched` that have not acknowledged `rec`'s rotation, read
    /// after one fetch of the acks. Empty for a secret without consumers.
    async fn lagging_now(&self, sched: &Schedule, rec: &Record) -> Result<Vec<String>, Error> {
        if sched.consumers.is_empty() {
            return Ok(Vec::new());
        }
        let acks = self.acks_for(std::slice::from_ref(sched), true).await?;
        Ok(acks.lagging(&sched.consumers, &sched.name, rotation_of(rec)))
    }

    /// `rotd retire --force NAME`: retires NAME's previous credential now, before its
    /// grace ends, so that the next rotation may give its slot a new password. The
    /// `retired` commit names who asked (`Rotd-Trigger`) and the grace it cut short
    /// (`Rotd-Forced`). `Ok(None)`: there was nothing to retire.
    pub async fn retire_now(&self, name: &str, trigger: Trigger) -> Result<Option<String>, Error> {
        let sched = self.schedule(name)?.clone();
        let store = self.store.clone();
        let n = name.to_owned();
        let _lock = blocking(move || store.lock_secret(&n, true)).await?;
        if let Some(Outcome::Aborted { reason }) = self.recover_locked(&sched).await? {
            return Err(Error::Retire {
                name: name.to_owned(),
                reason,
            });
        }
        let store = self.store.clone();
        let n = name.to_owned();
        let cur = blocking(move || store.read(&n, Slot::Current)).await?;
        if !cur
            .as_ref()
            .is_some_and(|c| c.get(key::RETIRE_AFTER).is_some())
        {
            return Ok(None);
        }
        self.retire_locked(&sched, &trigger, Retire::Forced)
            .await
            .map(Some)
            .map_err(|reason| Error::Retire {
                name: name.to_owned(),
                reason,
            })
    }

    /// Retires the old credential of `sched` now (caller holds its lock); see
    /// [`Retire`] for why. A forced or emergency retirement names the consumers it
    /// cut off (`Rotd-Lagging`).
    async fn retire_locked(
        &self,
        sched: &Schedule,
        trigger: &Trigger,
        how: Retire,
    ) -> Result<String, String> {
        let forced = how != Retire::Due;
        let store = self.store.clone();
        let n = sched.name.clone();
        let cur = blocking(move || store.read(&n, Slot::Current))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no current credential".to_owned())?;
        let lookup = self.lookup();
        let ctx = targets::StepContext {
            name: &sched.name,
            lookup: &lookup,
        };
        let what = sched.target.retire(&cur, &ctx).await.map_err(|e| {
            tracing::warn!(secret = %sched.name, error = %e, "retire failed; will retry");
            e.to_string()
        })?;
        let mut rec = cur.clone();
        rec.remove(key::RETIRE_USERNAME);
        rec.remove(key::RETIRE_KEY_ID);
        rec.remove(key::RETIRE_AFTER);
        let rotation = cur.get(key::ROTATION).unwrap_or("unknown").to_owned();
        let retired = what
            .clone()
            .unwrap_or_else(|| "nothing on the target".into());
        let lagging = if forced && !sched.consumers.is_empty() {
            Some(
                self.lagging_now(sched, &cur)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let subject = if how == Retire::Emergency {
            format!("retire {} (emergency, at once): {retired}", sched.name)
        } else if forced {
            format!(
                "retire {} (forced, before its grace ended): {retired}",
                sched.name
            )
        } else {
            format!("retire {}: {retired}", sched.name)
        };
        let mut msg = Message::new(subject)
            .trailer("Rotd-Secret", &sched.name)
            .trailer("Rotd-Rotation", &rotation)
            .trailer("Rotd-Step", "retired")
            .trailer("Rotd-Trigger", trigger.to_string())
            .trailer("Rotd-Target", sched.target.describe(Some(&cur)))
            .trailer("Rotd-Retired", &retired);
        if forced {
            let until = cur.get(key::RETIRE_AFTER).unwrap_or("unknown");
            msg = msg.trailer(
                "Rotd-Forced",
                format!("retired at {} instead of after {until}", now_rfc3339()),
            );
        }
        if how == Retire::Emergency {
            msg = msg.trailer("Rotd-Emergency", "yes");
        }
        if let Some(l) = &lagging {
            let named = if l.is_empty() {
                "none".to_owned()
            } else {
                l.join(", ")
            };
            msg = msg.trailer("Rotd-Lagging", named);
        }
        self.commit_record(&sched.name, Slot::Current, &rec, Vec::new(), msg)
            .await
            .map_err(|e| e.to_string())?;
        self.push_logged().await;
        tracing::info!(secret = %sched.name, retired = %retired, forced, %trigger, "old credential retired");
        Ok(retired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_grace(until: chrono::DateTime<chrono::Utc>) -> Record {
        Record::new(Secret::new("current-secret-value".into()))
            .with(key::USERNAME, "writer-b")
            .with(key::RETIRE_USERNAME, "writer-a")
            .with(
                key::RETIRE_AFTER,
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )
    }

    fn plan_for(user: Option<&str>) -> targets::Plan {
        targets::Plan {
            username: user.map(str::to_owned),
            ..targets::Plan::default()
        }
    }

    #[test]
    fn a_rotation_to_the_user_in_grace_waits_and_names_the_way_out() {
        let later = chrono::Utc::now() + chrono::Duration::hours(1);
        let cur = in_grace(later);
        let o = slot_in_grace(
            "s",
            Some(&cur),
            &plan_for(Some("writer-a")),
            &Trigger::Recovery,
        )
        .expect("waits");
        assert_eq!(o.exit_code(), 1);
        assert_eq!(o.label(), "waiting-retire");
        assert!(o.message().contains("writer-a"), "{}", o.message());
        assert!(
            o.message().contains("rotd retire --force s"),
            "{}",
            o.message()
        );
    }

    #[test]
    fn no_wait_without_a_slot_in_grace() {
        let now = chrono::Utc::now();
        let cur = in_grace(now + chrono::Duration::hours(1));
        // A target without usernames (files, API keys) reuses nothing.
        assert!(slot_in_grace("s", Some(&cur), &plan_for(None), &Trigger::Schedule).is_none());
        // The grace has ended: the retirement runs first, then the rotation.
        let ended = in_grace(now - chrono::Duration::seconds(1));
        assert!(retire_is_due(&ended, now));
        assert!(slot_in_grace(
            "s",
            Some(&ended),
            &plan_for(Some("writer-a")),
            &Trigger::Schedule
        )
        .is_none());
        assert!(
            slot_in_grace("s", None, &plan_for(Some("writer-a")), &Trigger::Schedule).is_none()
        );
    }
}
