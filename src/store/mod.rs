//! The store: a plain git repository of age-encrypted secrets (DESIGN §4).
//!
//! Layout (contract): `.age-recipients` (one recipient a line), `secrets/NAME.age`
//! (the current credential), `secrets/NAME.pending.age` (only while a rotation of NAME
//! is in flight). Commit messages end in `Rotd-*` trailers. `.age-recipients` is the
//! global list; each secret file is encrypted to it, the daemon, and that secret's
//! consumers only ([`Store::encrypt_for`]), so a host reads only what it uses.
//!
//! The repository is the journal and the lock:
//! * every change is a commit made under an exclusive `flock` on `.git/rotd.lock`
//!   (CLI processes and the daemon share it; the kernel drops it when a process dies);
//!   fetches and pushes take it too, since they move the remote-tracking ref that the
//!   compare-and-swap below reads;
//! * a rotation holds `.git/rotd-locks/NAME.lock` from plan to the end, so rotations
//!   of one secret are serialized on this host;
//! * between hosts, pushing the `pending` commit is a compare-and-swap on the remote
//!   branch: a rejected push means another instance got there first. The pending
//!   commit, its push, and dropping it on a rejection are one step under the store
//!   lock ([`Store::commit_and_push`]), so no commit of another secret on this host
//!   can land on top of a commit that is about to be dropped.
//!
//! What this clone adopts from the remote (the trust boundary, SECURITY.md): with
//! `signing_key` or `allowed_signers` configured, [`Store::sync_from_remote`] moves
//! the branch only by fast-forward, and only when every new commit is signed by a key
//! of [`Store::trusted_signers`]. Anything else is refused: the local branch stays
//! where it was, the refusal is logged and recorded in `.git/rotd-remote-refused.json`
//! (read by `status` and `/metrics`), and the command that synced fails without
//! changing anything. Without signing the remote is trusted blindly (`init` and
//! `check` say so).
//!
//! libgit2's fsync of the git directory is switched on, so a commit that returned is
//! on disk. Secrets are read from the commit at HEAD, never from the work tree; the
//! work tree is kept equal to HEAD for the stock tools (`age -d secrets/NAME.age`).

pub mod acks;
pub mod config;
pub mod crypto;
pub mod record;
pub mod transport;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use git2::{Oid, Repository, Signature};
use nix::fcntl::{Flock, FlockArg};

use crate::fsutil;
use crate::secret::Secret;
use crate::signing::{self, AllowedSigners, Signer};
pub use config::{Config, Host};
pub use crypto::Keys;
pub use record::Record;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the store at {0} is not initialised: run `rotd init`")]
    NotInitialised(PathBuf),
    #[error("git operation on the store failed: {0}{hint}", hint = os_hint(.0))]
    Git(#[from] git2::Error),
    #[error("{0}{hint}", hint = file_hint(.0))]
    File(#[from] fsutil::Error),
    #[error(transparent)]
    Crypto(#[from] crypto::Error),
    #[error("{path} in the store is damaged: {source}")]
    Record {
        path: String,
        #[source]
        source: record::Error,
    },
    #[error("cannot take the lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a rotation of {0} is already running (another rotd holds its lock)")]
    Busy(String),
    #[error("the local store and the remote have diverged; resolve it by hand (`git -C {0} pull --rebase`) before rotating")]
    Diverged(PathBuf),
    #[error(transparent)]
    Signing(#[from] crate::signing::Error),
    #[error(transparent)]
    RemoteRefused(Box<Refused>),
    #[error("cannot tell which hosts consume {name}, so it is not written: {reason}")]
    Consumers { name: String, reason: String },
    #[error("the schedule of {name} lists consumer {host:?}, which is not a [hosts.{host}] table of rotd.toml, so {name} is not written; declare the host or fix the schedule (`rotd check` shows the line)")]
    UnknownHost { name: String, host: String },
}

/// The remote's state was refused ([`Store::sync_from_remote`]); boxed in [`Error`] to
/// keep every store result small.
#[derive(Debug, thiserror::Error)]
#[error("refused to adopt commit {commit} from the store remote {remote}: {reason}. The local store stays at its last good state and rotd changes nothing until the remote is repaired: inspect it (`git -C {path} log -p HEAD..origin/{branch}`), then reset the remote branch to a commit this store trusts, or sign the commits with a key listed in store.allowed_signers", path = .path.display())]
pub struct Refused {
    pub commit: String,
    pub remote: String,
    pub reason: String,
    pub path: PathBuf,
    pub branch: String,
}

/// What to do when the store's disk refuses a write: rotd changed nothing it could not
/// finish, and the journal recovers an unfinished rotation at the next command.
const DISK_HINT: &str = " (check the store's disk: free space, a writable file system, permissions; then run the command again: an unfinished rotation is recovered)";

/// [`DISK_HINT`] for a git error that came from the operating system.
fn os_hint(e: &git2::Error) -> &'static str {
    if e.class() == git2::ErrorClass::Os {
        DISK_HINT
    } else {
        ""
    }
}

/// [`DISK_HINT`] for a store file that could not be written because of the disk
/// (full, read-only, immutable, not permitted).
fn file_hint(e: &fsutil::Error) -> &'static str {
    use std::io::ErrorKind::{PermissionDenied, QuotaExceeded, ReadOnlyFilesystem, StorageFull};
    match e {
        fsutil::Error::Write { source, .. }
            if matches!(
                source.kind(),
                StorageFull | ReadOnlyFilesystem | PermissionDenied | QuotaExceeded
            ) =>
        {
            DISK_HINT
        }
        _ => "",
    }
}

/// Which file of a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Current,
    Pending,
}

/// The path of a secret's file inside the store.
pub fn rel_path(name: &str, slot: Slot) -> String {
    match slot {
        Slot::Current => format!("secrets/{name}.age"),
        Slot::Pending => format!("secrets/{name}.pending.age"),
    }
}

/// One change in a commit.
pub enum Change {
    Put { path: String, bytes: Vec<u8> },
    Remove { path: String },
}

/// A commit message: a subject and `Rotd-*` trailers.
#[derive(Debug, Clone, Default)]
pub struct Message {
    pub subject: String,
    pub body: Option<String>,
    pub trailers: Vec<(String, String)>,
}

impl Message {
    pub fn new(subject: impl Into<String>) -> Message {
        Message {
            subject: subject.into(),
            ..Default::default()
        }
    }

    pub fn trailer(mut self, key: &str, value: impl Into<String>) -> Message {
        // One line, no control character (a NUL hides every trailer from git's parser,
        // a CR or LF could forge one), never blank (git would read the next trailer
        // line as its continuation): values may quote a peer.
        let value: String = value
            .into()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let value = match value.trim() {
            "" => "-".to_owned(),
            v => v.to_owned(),
        };
        self.trailers.push((key.to_owned(), value));
        self
    }

    pub fn render(&self) -> String {
        let mut s = format!("{}\n\n", self.subject);
        if let Some(b) = &self.body {
            s.push_str(b.trim_end());
            s.push_str("\n\n");
        }
        for (k, v) in &self.trailers {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s
    }
}

/// The result of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// No remote configured.
    NoRemote,
    Pushed,
    /// The remote branch moved: another instance committed first.
    Rejected(String),
    /// The remote could not be reached; commits stay local and are pushed later.
    Unreachable(String),
}

/// A state of the remote that this clone refused to adopt (persisted until a sync
/// finds the remote trustworthy again).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// The commit refused: the first new commit without an allowed signature, or the
    /// remote's tip when it is not a fast-forward.
    pub commit: String,
    /// The remote branch's tip when it was refused.
    pub remote_tip: String,
    pub reason: String,
    /// When (RFC 3339, UTC).
    pub time: String,
}

/// Where the last refusal is kept, inside the git directory (never pushed).
const REFUSAL_FILE: &str = "rotd-remote-refused.json";

/// The refusal recorded in the clone at `store_path`, while it stands (readable
/// without opening the store: no identity needed).
pub fn refusal_in(store_path: &Path) -> Option<Refusal> {
    let path = store_path.join(".git").join(REFUSAL_FILE);
    let bytes = fsutil::read_optional(&path).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// A held `flock`; released on drop (and by the kernel if the process dies).
pub struct Lock {
    _file: Flock<File>,
}

/// The git store with its keys.
pub struct Store {
    cfg: Config,
    keys: Arc<Keys>,
    /// Signs every commit when `store.signing_key` is set.
    signer: Option<Arc<Signer>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.cfg.path)
            .finish()
    }
}

static FSYNC: Once = Once::new();

fn enable_fsync() {
    FSYNC.call_once(|| {
        // SAFETY: libgit2 option call with a documented int argument; git2 has
        // initialised libgit2 before any Repository is opened, and Once serializes it.
        unsafe {
            git2::opts::strict_hash_verification(true);
            libgit2_sys::init();
            libgit2_sys::git_libgit2_opts(
                libgit2_sys::GIT_OPT_ENABLE_FSYNC_GITDIR as std::ffi::c_int,
                1,
            );
        }
    });
}

impl Store {
    /// Opens an initialised store, loading the keys.
    pub fn open(cfg: &Config) -> Result<Store, Error> {
        enable_fsync();
        if !cfg.path.join(".git").is_dir() {
            return Err(Error::NotInitialised(cfg.path.clone()));
        }
        let keys = Keys::load(&cfg.identity, cfg.recipients.as_deref())?;
        follow_remote_url(cfg)?;
        Ok(Store {
            cfg: cfg.clone(),
            keys: Arc::new(keys),
            signer: load_signer(cfg)?,
        })
    }

    /// Creates the store repository (and the identity if missing). Idempotent.
    pub fn init(cfg: &Config) -> Result<InitReport, Error> {
        enable_fsync();
        let mut report = InitReport::default();
        if !cfg.identity.exists() {
            if let Some(dir) = cfg.identity.parent() {
                create_private_dir(dir)?;
            }
            let (text, public) = Keys::generate_identity_file();
            fsutil::write_atomic(&cfg.identity, text.as_bytes(), 0o600)?;
            report.identity_created = Some(public);
        }
        if let Some(key) = cfg.signing_key.as_deref().filter(|k| !k.exists()) {
            if let Some(dir) = key.parent() {
                create_private_dir(dir)?;
            }
            let (text, public) = Signer::generate(&cfg.author_email)?;
            fsutil::write_atomic(key, text.as_bytes(), 0o600)?;
            let mut pub_path = key.as_os_str().to_owned();
            pub_path.push(".pub");
            fsutil::write_atomic(
                Path::new(&pub_path),
                format!("{public}\n").as_bytes(),
                0o644,
            )?;
            report.signing_key_created = Some(public);
        }
        // A new allowed-signers file starts with this instance's own key: other
        // instances (and `git verify-commit`) can be pointed at the same file.
        if let (Some(allowed), Some(key)) = (&cfg.allowed_signers, &cfg.signing_key) {
            if !allowed.exists() {
                let signer = Signer::from_file(key)?;
                let line = format!(
                    "# Keys whose commits rotd adopts from the store remote (git's allowed_signers format).\n{} {}\n",
                    cfg.author_email,
                    signer.public_key_openssh()
                );
                fsutil::write_atomic(allowed, line.as_bytes(), 0o644)?;
                report.allowed_signers_created = true;
            }
        }
        let keys = Keys::load(&cfg.identity, cfg.recipients.as_deref())?;
        create_private_dir(&cfg.path)?;
        let repo = match Repository::open(&cfg.path) {
            Ok(r) => r,
            Err(_) => {
                let mut opts = git2::RepositoryInitOptions::new();
                opts.initial_head(&cfg.branch).mkdir(true);
                report.repo_created = true;
                Repository::init_opts(&cfg.path, &opts)?
            }
        };
        if let Some(url) = &cfg.remote {
            match repo.find_remote("origin") {
                Ok(r) if r.url() == Some(url.as_str()) => {}
                Ok(_) => repo.remote_set_url("origin", url)?,
                Err(_) => {
                    repo.remote("origin", url)?;
                }
            }
        }
        let store = Store {
            cfg: cfg.clone(),
            keys: Arc::new(keys),
            signer: load_signer(cfg)?,
        };
        // A second instance joining a shared remote starts from its history.
        if repo.head().is_err() && cfg.remote.is_some() {
            store.sync_from_remote()?;
        }
        let recipients = store.keys.recipients_file();
        let head_recipients = store.read_head_file(&repo, ".age-recipients")?;
        if head_recipients.as_deref() != Some(recipients.as_bytes()) {
            let _lock = store.lock_store()?;
            store.commit_locked(
                &repo,
                vec![Change::Put {
                    path: ".age-recipients".into(),
                    bytes: recipients.into_bytes(),
                }],
                &Message::new("init store: recipients").trailer("Rotd-Step", "init"),
            )?;
            report.committed = true;
        }
        drop(repo);
        if cfg.remote.is_some() {
            report.push = Some(store.push()?);
        }
        Ok(report)
    }

    /// This instance's name in pending records: `host:store path`.
    pub fn instance_id(&self) -> String {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        format!("{host}:{}", self.cfg.path.display())
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The commit signer, when `store.signing_key` is set.
    pub fn signer(&self) -> Option<&Signer> {
        self.signer.as_deref()
    }

    pub fn repo(&self) -> Result<Repository, Error> {
        Ok(Repository::open(&self.cfg.path)?)
    }

    /// The `Rotd-Fingerprint` of the value `name` holds (keyed per name).
    pub fn fingerprint(&self, name: &str, secret: &Secret) -> String {
        crate::secret::fingerprint(self.keys.fingerprint_key(), name, secret)
    }

    /// Takes the store-wide lock that every commit is made under.
    pub fn lock_store(&self) -> Result<Lock, Error> {
        self.flock(&self.cfg.path.join(".git").join("rotd.lock"), true, "")
    }

    /// Takes the lock of one secret's rotation; `wait` blocks until it is free.
    pub fn lock_secret(&self, name: &str, wait: bool) -> Result<Lock, Error> {
        let dir = self.cfg.path.join(".git").join("rotd-locks");
        std::fs::create_dir_all(&dir).map_err(|source| Error::Lock {
            path: dir.clone(),
            source,
        })?;
        self.flock(&dir.join(format!("{name}.lock")), wait, name)
    }

    fn flock(&self, path: &Path, wait: bool, name: &str) -> Result<Lock, Error> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| Error::Lock {
                path: path.to_owned(),
                source,
            })?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        match Flock::lock(file, arg) {
            Ok(f) => Ok(Lock { _file: f }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(Error::Busy(name.to_owned())),
            Err((_, e)) => Err(Error::Lock {
                path: path.to_owned(),
                source: e.into(),
            }),
        }
    }

    fn read_head_file(&self, repo: &Repository, path: &str) -> Result<Option<Vec<u8>>, Error> {
        let head = match repo.head() {
            Ok(h) => h.peel_to_tree()?,
            Err(_) => return Ok(None),
        };
        match head.get_path(Path::new(path)) {
            Ok(entry) => Ok(Some(repo.find_blob(entry.id())?.content().to_vec())),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads and decrypts one secret from HEAD.
    pub fn read(&self, name: &str, slot: Slot) -> Result<Option<Record>, Error> {
        let repo = self.repo()?;
        let path = rel_path(name, slot);
        match self.read_head_file(&repo, &path)? {
            None => Ok(None),
            Some(bytes) => self.decrypt_record(&bytes, &path).map(Some),
        }
    }

    pub fn decrypt_record(&self, bytes: &[u8], what: &str) -> Result<Record, Error> {
        let plain = self.keys.decrypt(bytes, what)?;
        Record::parse(&plain).map_err(|source| Error::Record {
            path: what.to_owned(),
            source,
        })
    }

    /// The change that writes `record` as NAME's `slot`, encrypted to the daemon, the
    /// global recipients and NAME's consumers ([`Store::encrypt_for`]).
    pub fn put_record(&self, name: &str, slot: Slot, record: &Record) -> Result<Change, Error> {
        Ok(Change::Put {
            path: rel_path(name, slot),
            bytes: self.encrypt_for(name, &record.to_plaintext())?,
        })
    }

    /// The recipients of the hosts that consume secret `name` (`consumers` in
    /// `schedules/NAME.toml`, read now; see [`config::consumers_of`]). A consumer that
    /// is not a declared host is an error: the secret is then not written at all,
    /// rather than written to a set nobody chose.
    pub fn consumer_recipients(&self, name: &str) -> Result<Vec<crypto::Recipient>, Error> {
        let consumers =
            config::consumers_of(&self.cfg.schedules, name).map_err(|reason| Error::Consumers {
                name: name.to_owned(),
                reason,
            })?;
        consumers
            .iter()
            .map(|host| match self.cfg.hosts.get(host) {
                Some(h) => Ok(crypto::Recipient::for_host(host, &h.recipient)?),
                None => Err(Error::UnknownHost {
                    name: name.to_owned(),
                    host: host.clone(),
                }),
            })
            .collect()
    }

    /// Encrypts `plaintext` of secret `name` to the daemon, the global recipients and
    /// NAME's consumers, and to no other host.
    pub fn encrypt_for(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let extra = self.consumer_recipients(name)?;
        Ok(self.keys.encrypt_to(plaintext, &extra)?)
    }

    /// The id of the blob of a file at HEAD (None: no such file): what changed can be
    /// told without reading or decrypting it.
    pub fn head_blob_id(&self, path: &str) -> Result<Option<git2::Oid>, Error> {
        let repo = self.repo()?;
        let tree = match repo.head() {
            Ok(h) => h.peel_to_tree()?,
            Err(_) => return Ok(None),
        };
        match tree.get_path(Path::new(path)) {
            Ok(entry) => Ok(Some(entry.id())),
            Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The commit HEAD names (None: an empty store).
    pub fn head_id(&self) -> Result<Option<String>, Error> {
        let repo = self.repo()?;
        let head = repo.head().ok().and_then(|h| h.target());
        Ok(head.map(|o| o.to_string()))
    }

    /// The raw (encrypted) bytes of a file at HEAD.
    pub fn head_bytes(&self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        let repo = self.repo()?;
        self.read_head_file(&repo, path)
    }

    /// Names of secrets at HEAD: (current, pending).
    pub fn names(&self) -> Result<(Vec<String>, Vec<String>), Error> {
        let repo = self.repo()?;
        let mut current = Vec::new();
        let mut pending = Vec::new();
        let tree = match repo.head() {
            Ok(h) => h.peel_to_tree()?,
            Err(_) => return Ok((current, pending)),
        };
        let Ok(entry) = tree.get_path(Path::new("secrets")) else {
            return Ok((current, pending));
        };
        let sub = repo.find_tree(entry.id())?;
        for e in sub.iter() {
            let Some(n) = e.name() else { continue };
            if let Some(stem) = n.strip_suffix(".pending.age") {
                pending.push(stem.to_owned());
            } else if let Some(stem) = n.strip_suffix(".age") {
                current.push(stem.to_owned());
            }
        }
        Ok((current, pending))
    }

    /// Commits `changes` under the store lock and returns the commit id.
    pub fn commit(&self, changes: Vec<Change>, msg: &Message) -> Result<Oid, Error> {
        let _lock = self.lock_store()?;
        let repo = self.repo()?;
        self.commit_locked(&repo, changes, msg)
    }

    fn commit_locked(
        &self,
        repo: &Repository,
        changes: Vec<Change>,
        msg: &Message,
    ) -> Result<Oid, Error> {
        let workdir = repo
            .workdir()
            .ok_or_else(|| Error::NotInitialised(self.cfg.path.clone()))?
            .to_owned();
        // Start from HEAD's tree, so that nothing an interrupted commit left staged
        // rides along with this one.
        let mut index = repo.index()?;
        if let Ok(head) = repo.head() {
            index.read_tree(&head.peel_to_tree()?)?;
        }
        for c in &changes {
            match c {
                Change::Put { path, bytes } => {
                    let full = workdir.join(path);
                    if let Some(d) = full.parent() {
                        create_private_dir(d)?;
                    }
                    fsutil::write_atomic(&full, bytes, 0o600)?;
                    index.add_path(Path::new(path))?;
                }
                Change::Remove { path } => {
                    fsutil::remove_durable(&workdir.join(path))?;
                    if index.get_path(Path::new(path), 0).is_some() {
                        index.remove_path(Path::new(path))?;
                    }
                }
            }
        }
        index.write()?;
        let tree_id = index.write_tree()?;
        let tree = repo.find_tree(tree_id)?;
        let sig = Signature::now(&self.cfg.author_name, &self.cfg.author_email)?;
        let parent = match repo.head() {
            Ok(h) => Some(h.peel_to_commit()?),
            Err(_) => None,
        };
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let oid = signing::commit(
            repo,
            Some("HEAD"),
            &sig,
            &sig,
            &msg.render(),
            &tree,
            &parents,
            self.signer.as_deref(),
        )?;
        tracing::debug!(commit = %oid, subject = %msg.subject, "committed");
        Ok(oid)
    }

    /// Makes the work tree's `secrets/` and `.age-recipients` equal to HEAD again
    /// (after a crash between writing a file and committing it).
    pub fn reset_worktree(&self) -> Result<(), Error> {
        let _lock = self.lock_store()?;
        let repo = self.repo()?;
        if repo.head().is_err() {
            return Ok(());
        }
        let mut co = git2::build::CheckoutBuilder::new();
        co.force()
            .remove_untracked(true)
            .path("secrets")
            .path(".age-recipients");
        repo.checkout_head(Some(&mut co))?;
        // The index may hold staged changes of an interrupted commit.
        let head_tree = repo.head()?.peel_to_tree()?;
        let mut index = repo.index()?;
        index.read_tree(&head_tree)?;
        index.write()?;
        Ok(())
    }

    /// Makes the work-tree files of one secret equal to HEAD (cheap: two paths), for
    /// the rotation of that secret; [`Store::reset_worktree`] is the full version used
    /// at start-up.
    pub fn reset_secret(&self, name: &str) -> Result<(), Error> {
        let _lock = self.lock_store()?;
        let repo = self.repo()?;
        let Some(workdir) = repo.workdir().map(Path::to_owned) else {
            return Ok(());
        };
        for slot in [Slot::Current, Slot::Pending] {
            let path = rel_path(name, slot);
            let full = workdir.join(&path);
            match self.read_head_file(&repo, &path)? {
                Some(bytes) => {
                    if fsutil::read_optional(&full)?.as_deref() != Some(bytes.as_slice()) {
                        fsutil::write_atomic(&full, &bytes, 0o600)?;
                    }
                }
                None => fsutil::remove_durable(&full)?,
            }
        }
        Ok(())
    }

    /// Commits `changes` and pushes, as one step under the store lock: the push is the
    /// compare-and-swap between instances. When the remote rejects it, the commit is
    /// dropped again (HEAD back to its parent) before the lock is released, so no
    /// other commit of this clone can have landed on top of it.
    pub fn commit_and_push(&self, changes: Vec<Change>, msg: &Message) -> Result<Push, Error> {
        let _lock = self.lock_store()?;
        let repo = self.repo()?;
        let oid = self.commit_locked(&repo, changes, msg)?;
        let push = self.push_locked()?;
        if let Push::Rejected(_) = push {
            let parent = repo.find_commit(oid)?.parent(0)?;
            repo.reset(parent.as_object(), git2::ResetType::Hard, None)?;
        }
        Ok(push)
    }

    /// How this store reaches its remote (credentials, SSH host-key check).
    pub fn transport(&self) -> transport::Transport {
        transport::Transport {
            url: self.cfg.remote.clone().unwrap_or_default(),
            ssh_key: self.cfg.remote_ssh_key.clone(),
            token_file: self.cfg.remote_token_file.clone(),
            known_hosts: self.cfg.remote_known_hosts.clone(),
        }
    }

    fn callbacks(&self) -> git2::RemoteCallbacks<'_> {
        self.transport().callbacks()
    }

    /// Pushes the branch to the remote (when one is configured), under the store lock:
    /// commits, fetches and pushes of one clone never overlap (they share the
    /// remote-tracking ref, and a push's compare-and-swap reads it).
    pub fn push(&self) -> Result<Push, Error> {
        let _lock = self.lock_store()?;
        self.push_locked()
    }

    fn push_locked(&self) -> Result<Push, Error> {
        let Some(url) = self.cfg.remote.clone() else {
            return Ok(Push::NoRemote);
        };
        if let Some(path) = local_remote_path(&url) {
            return self.push_local(&path);
        }
        let repo = self.repo()?;
        let mut remote = repo.find_remote("origin")?;
        let spec = format!("refs/heads/{b}:refs/heads/{b}", b = self.cfg.branch);
        let transport::Pushed { rejected, result } = self.transport().push(&mut remote, &spec);
        if let Some(reason) = rejected {
            return Ok(Push::Rejected(reason));
        }
        match result {
            Ok(()) => {
                // Keep the remote-tracking ref in step, so `status` can count unpushed commits.
                if let Ok(head) = repo.head().and_then(|h| h.peel_to_commit()) {
                    let _ = repo.reference(
                        &format!("refs/remotes/origin/{}", self.cfg.branch),
                        head.id(),
                        true,
                        "rotd push",
                    );
                }
                Ok(Push::Pushed)
            }
            Err(e)
                if e.code() == git2::ErrorCode::NotFastForward
                    || e.message().contains("non-fast-forward")
                    || e.message().contains("not present locally") =>
            {
                Ok(Push::Rejected(e.message().to_owned()))
            }
            Err(e) => {
                // Not every transport reports a lost compare-and-swap as a rejection
                // (a local remote may fail to lock or update the ref). If the remote
                // can be read and has moved past us, it was a rejection.
                drop(remote);
                match self.remote_has_moved(&repo) {
                    Some(true) => Ok(Push::Rejected(e.message().to_owned())),
                    _ => Ok(Push::Unreachable(e.message().to_owned())),
                }
            }
        }
    }

    /// Push to a repository on a local path, as a true compare-and-swap.
    ///
    /// libgit2's local transport force-writes the remote ref after a fast-forward check
    /// made earlier, so two pushers can both "win". Network remotes (git-receive-pack)
    /// compare-and-swap the ref themselves; here rotd does it: the objects go to a
    /// private ref first, then the branch moves only if it still is where this clone
    /// last saw it (`refs/remotes/origin/BRANCH`), under the remote's ref lock.
    fn push_local(&self, remote_path: &Path) -> Result<Push, Error> {
        let repo = self.repo()?;
        let Ok(head) = repo.head().and_then(|h| h.peel_to_commit()) else {
            return Ok(Push::Pushed);
        };
        let b = &self.cfg.branch;
        let branch = format!("refs/heads/{b}");
        let tracking = format!("refs/remotes/origin/{b}");
        let expected = repo.refname_to_id(&tracking).ok();
        let remote_repo = match Repository::open_bare(remote_path) {
            Ok(r) => r,
            Err(e) => return Ok(Push::Unreachable(e.message().to_owned())),
        };
        let current = remote_repo.refname_to_id(&branch).ok();
        if current == Some(head.id()) {
            return Ok(Push::Pushed);
        }
        if current != expected {
            return Ok(Push::Rejected(format!(
                "the remote {branch} moved since this clone last fetched it"
            )));
        }
        // Never a forced push: a remote holding commits this clone refused to adopt
        // keeps them (as git-receive-pack refuses a non-fast-forward), for the
        // operator to inspect.
        if let Some(old) = expected {
            if !repo.graph_descendant_of(head.id(), old)? {
                return Ok(Push::Rejected(format!(
                    "the remote {branch} holds commits this clone has not adopted (not a fast-forward)"
                )));
            }
        }
        let incoming = format!("refs/rotd/incoming/{}-{}", std::process::id(), head.id());
        let mut remote = repo.find_remote("origin")?;
        let spec = format!("+{}:{incoming}", head.id());
        if let Err(e) = remote.push(&[spec.as_str()], None) {
            return Ok(Push::Unreachable(e.message().to_owned()));
        }
        let moved = match expected {
            Some(old) => remote_repo.reference_matching(&branch, head.id(), true, old, "rotd push"),
            None => remote_repo.reference(&branch, head.id(), false, "rotd push"),
        };
        if let Ok(mut r) = remote_repo.find_reference(&incoming) {
            let _ = r.delete();
        }
        match moved {
            Ok(_) => {
                repo.reference(&tracking, head.id(), true, "rotd push")?;
                Ok(Push::Pushed)
            }
            Err(e)
                if matches!(
                    e.code(),
                    git2::ErrorCode::Modified | git2::ErrorCode::Exists | git2::ErrorCode::Locked
                ) =>
            {
                Ok(Push::Rejected(e.message().to_owned()))
            }
            Err(e) => Ok(Push::Unreachable(e.message().to_owned())),
        }
    }

    /// Fetches the remote branch: Some(true) when it holds commits that HEAD does not
    /// contain, None when the remote cannot be read.
    fn remote_has_moved(&self, repo: &Repository) -> Option<bool> {
        clear_stale_ref_locks(repo, "refs/remotes/origin");
        let mut remote = repo.find_remote("origin").ok()?;
        let mut fo = git2::FetchOptions::new();
        fo.remote_callbacks(self.callbacks());
        let b = &self.cfg.branch;
        let refspec = format!("+refs/heads/{b}:refs/remotes/origin/{b}");
        remote
            .fetch(&[refspec.as_str()], Some(&mut fo), None)
            .ok()?;
        let theirs = repo
            .refname_to_id(&format!("refs/remotes/origin/{b}"))
            .ok()?;
        let ours = repo.head().ok()?.peel_to_commit().ok()?.id();
        Some(theirs != ours && !repo.graph_descendant_of(ours, theirs).unwrap_or(false))
    }

    /// Fetches the remote branch and fast-forwards to it when this clone is behind.
    /// Returns Ok(false) when the remote could not be reached.
    ///
    /// With signing configured, a remote whose new commits are not all signed by a
    /// trusted key, or that is not a fast-forward of HEAD, is refused
    /// ([`Error::RemoteRefused`]): HEAD stays, and the refusal is logged and recorded
    /// for `status` until the remote is trustworthy again.
    pub fn sync_from_remote(&self) -> Result<bool, Error> {
        if self.cfg.remote.is_none() {
            return Ok(true);
        }
        let _lock = self.lock_store()?;
        let repo = self.repo()?;
        clear_stale_ref_locks(&repo, "refs/remotes/origin");
        let mut remote = repo.find_remote("origin")?;
        let mut fo = git2::FetchOptions::new();
        fo.remote_callbacks(self.callbacks());
        let b = &self.cfg.branch;
        // The remote-tracking ref records what the remote holds, trusted or not
        // (`verify` reports what is refused there); only the branch is guarded.
        let refspec = format!("+refs/heads/{b}:refs/remotes/origin/{b}");
        if let Err(e) = remote.fetch(&[refspec.as_str()], Some(&mut fo), None) {
            tracing::warn!(error = %e.message(), "cannot fetch from the store remote; going on with the local store");
            return Ok(false);
        }
        let Ok(theirs) = repo.refname_to_id(&format!("refs/remotes/origin/{b}")) else {
            return Ok(true); // remote branch does not exist yet
        };
        let ours = match repo.head() {
            Ok(h) => Some(h.peel_to_commit()?.id()),
            Err(_) => None,
        };
        if let Some(ours) = ours {
            if ours == theirs || repo.graph_descendant_of(ours, theirs)? {
                self.clear_refusal()?;
                return Ok(true);
            }
        }
        match self.trusted_signers()? {
            Some(allowed) => {
                if let Some((commit, reason)) = refuse_incoming(&repo, ours, theirs, &allowed)? {
                    return Err(self.refuse(commit, theirs, reason));
                }
            }
            None => {
                if let Some(ours) = ours {
                    if !repo.graph_descendant_of(theirs, ours)? {
                        return Err(Error::Diverged(self.cfg.path.clone()));
                    }
                }
            }
        }
        match ours {
            None => {
                // A second instance joining a shared remote starts from its history.
                repo.reference(
                    &format!("refs/heads/{b}"),
                    theirs,
                    true,
                    "rotd: adopt remote",
                )?;
                repo.set_head(&format!("refs/heads/{b}"))?;
                repo.checkout_head(Some(git2::build::CheckoutBuilder::new().force()))?;
                tracing::info!(commit = %theirs, "adopted the store remote's history");
            }
            Some(_) => {
                let target = repo.find_commit(theirs)?;
                repo.reset(target.as_object(), git2::ResetType::Hard, None)?;
                tracing::info!(commit = %theirs, "fast-forwarded the store to the remote");
            }
        }
        self.clear_refusal()?;
        Ok(true)
    }

    /// The keys whose commits this clone adopts from the remote: `store.allowed_signers`
    /// plus this instance's own signing key (trusted whether or not the file lists it:
    /// the rotator vouches for its own commits). None when neither is configured:
    /// the remote is then trusted blindly. The file is read at every call, so an edit
    /// takes effect at the next sync.
    pub fn trusted_signers(&self) -> Result<Option<AllowedSigners>, Error> {
        let mut allowed = match &self.cfg.allowed_signers {
            Some(p) => Some(AllowedSigners::from_file(p)?),
            None => None,
        };
        if let Some(s) = &self.signer {
            let own = AllowedSigners::parse(&format!(
                "{} {}\n",
                self.cfg.author_email,
                s.public_key_openssh()
            ))?;
            match &mut allowed {
                Some(a) => a.extend(own),
                None => allowed = Some(own),
            }
        }
        Ok(allowed)
    }

    /// Logs and records a refusal; returns the error the sync fails with.
    fn refuse(&self, commit: Oid, theirs: Oid, reason: String) -> Error {
        let remote = self.cfg.remote.clone().unwrap_or_default();
        tracing::error!(
            commit = %commit,
            remote = %remote,
            reason = %reason,
            "refused to adopt a commit from the store remote; keeping the local store"
        );
        let refusal = Refusal {
            commit: commit.to_string(),
            remote_tip: theirs.to_string(),
            reason: reason.clone(),
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let path = self.refusal_path();
        match serde_json::to_vec_pretty(&refusal) {
            Ok(bytes) => {
                if let Err(e) = fsutil::write_atomic(&path, &bytes, 0o600) {
                    tracing::warn!(error = %e, "cannot record the refusal for `rotd status`");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot record the refusal for `rotd status`"),
        }
        Error::RemoteRefused(Box::new(Refused {
            commit: commit.to_string(),
            remote,
            reason,
            path: self.cfg.path.clone(),
            branch: self.cfg.branch.clone(),
        }))
    }

    fn refusal_path(&self) -> PathBuf {
        self.cfg.path.join(".git").join(REFUSAL_FILE)
    }

    fn clear_refusal(&self) -> Result<(), Error> {
        let path = self.refusal_path();
        if path.exists() {
            fsutil::remove_durable(&path)?;
            tracing::info!("the store remote is trusted again: the earlier refusal is cleared");
        }
        Ok(())
    }

    /// The last refusal of the remote's state, while it stands (for `status`).
    pub fn remote_refused(&self) -> Option<Refusal> {
        refusal_in(&self.cfg.path)
    }

    /// Commits on the branch that the remote-tracking branch does not have.
    pub fn unpushed(&self) -> Result<Option<usize>, Error> {
        if self.cfg.remote.is_none() {
            return Ok(None);
        }
        let repo = self.repo()?;
        let Ok(head) = repo.head().and_then(|h| h.peel_to_commit()) else {
            return Ok(Some(0));
        };
        match repo.refname_to_id(&format!("refs/remotes/origin/{}", self.cfg.branch)) {
            Ok(theirs) => Ok(Some(repo.graph_ahead_behind(head.id(), theirs)?.0)),
            Err(_) => {
                let mut walk = repo.revwalk()?;
                walk.push(head.id())?;
                Ok(Some(walk.count()))
            }
        }
    }
}

/// Why the remote's tip `theirs` may not be adopted over `ours` (None: unborn HEAD),
/// as (the commit to name, the reason); None when it may. It must be a fast-forward,
/// and every commit it adds must carry a good signature of an `allowed` key.
fn refuse_incoming(
    repo: &Repository,
    ours: Option<Oid>,
    theirs: Oid,
    allowed: &AllowedSigners,
) -> Result<Option<(Oid, String)>, Error> {
    if let Some(ours) = ours {
        if !repo.graph_descendant_of(theirs, ours)? {
            return Ok(Some((
                theirs,
                format!("it is not a fast-forward of the local HEAD {ours}: the remote branch was rewritten (a forced push)"),
            )));
        }
    }
    let mut walk = repo.revwalk()?;
    walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::REVERSE)?;
    walk.push(theirs)?;
    if let Some(ours) = ours {
        walk.hide(ours)?;
    }
    for oid in walk {
        let oid = oid?;
        let reason = match signing::verify_commit(repo, oid, allowed) {
            Ok(Some(_)) => continue,
            Ok(None) => "it is not signed".to_owned(),
            Err(e) => format!("its signature is not accepted: {e}"),
        };
        return Ok(Some((oid, reason)));
    }
    Ok(None)
}

/// Removes the `*.lock` files a killed rotd process left in one ref directory of the
/// git directory (`refs/remotes/origin`, `refs/rotd/acks`, …): git2 refuses to update
/// a ref whose lock file exists, so one kill mid-fetch would wedge every later fetch.
/// Call it only while holding the store lock ([`Store::lock_store`]): every rotd
/// process updates these refs under that `flock`, which the kernel releases when a
/// process dies, so a lock file found then belongs to no live rotd process.
pub(crate) fn clear_stale_ref_locks(repo: &Repository, ref_dir: &str) {
    let dir = repo.path().join(ref_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_lock = path.extension().is_some_and(|x| x == "lock");
        if !is_lock || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), "removed a ref lock file a killed rotd process left")
            }
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove a stale ref lock file; the git operation below will say why it fails")
            }
        }
    }
}

fn load_signer(cfg: &Config) -> Result<Option<Arc<Signer>>, Error> {
    match &cfg.signing_key {
        Some(p) => Ok(Some(Arc::new(Signer::from_file(p)?))),
        None => Ok(None),
    }
}

/// The path of a remote that is a repository on this machine (`/path`, `file://…`).
fn local_remote_path(url: &str) -> Option<PathBuf> {
    if let Some(p) = url.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    if url.contains("://") || (url.contains(':') && !url.starts_with('/') && !url.starts_with('.'))
    {
        return None; // scp-like `host:path` or a network URL
    }
    Some(PathBuf::from(url))
}

/// Points the clone's `origin` at `store.remote` when the configuration names another
/// URL than the clone has (an edited `remote`): the next fetch and push go where the
/// configuration says, and what comes from there is adopted under the same trust rule.
fn follow_remote_url(cfg: &Config) -> Result<(), Error> {
    let Some(url) = &cfg.remote else {
        return Ok(());
    };
    let repo = Repository::open(&cfg.path)?;
    match repo.find_remote("origin") {
        Ok(r) if r.url() == Some(url.as_str()) => {}
        Ok(_) => {
            // No URL in the log: one may carry a token.
            repo.remote_set_url("origin", url)?;
            tracing::info!(
                "store.remote changed in the configuration: the store's origin follows it"
            );
        }
        Err(_) => {
            repo.remote("origin", url)?;
        }
    }
    Ok(())
}

/// Creates a directory (and parents) with mode 0700 for the ones it creates.
fn create_private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| {
            Error::File(fsutil::Error::Write {
                path: dir.to_owned(),
                source,
            })
        })
}

/// What `rotd init` did.
#[derive(Debug, Default)]
pub struct InitReport {
    pub identity_created: Option<String>,
    /// The public key of a signing key `init` created.
    pub signing_key_created: Option<String>,
    pub allowed_signers_created: bool,
    pub repo_created: bool,
    pub committed: bool,
    pub push: Option<Push>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ref_lock_left_by_a_killed_process_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let refs = repo.path().join("refs/remotes/origin");
        std::fs::create_dir_all(&refs).unwrap();
        std::fs::write(refs.join("main.lock"), "0000").unwrap();
        std::fs::write(refs.join("main"), "0000").unwrap();
        clear_stale_ref_locks(&repo, "refs/remotes/origin");
        assert!(!refs.join("main.lock").exists());
        assert!(refs.join("main").exists());
        clear_stale_ref_locks(&repo, "refs/rotd/acks"); // absent: nothing to do
    }

    #[test]
    fn a_trailer_value_quoting_a_peer_cannot_forge_or_hide_trailers() {
        let msg = Message::new("rotate x: failed")
            .trailer("Rotd-Secret", "x")
            .trailer("Rotd-Reason", "boom\r\nRotd-Step: succeeded\0")
            .trailer("Rotd-Probe", "  ")
            .trailer("Rotd-Step", "failed");
        let text = msg.render();
        let steps = text.lines().filter(|l| l.starts_with("Rotd-Step:")).count();
        assert_eq!(steps, 1, "{text}");
        let t = crate::audit::trailers(&text);
        assert_eq!(t["Rotd-Step"], "failed", "{text}");
        assert_eq!(t["Rotd-Probe"], "-", "{text}");
        assert_eq!(t["Rotd-Secret"], "x", "{text}");
        assert!(!text.contains('\0') && !text.contains('\r'), "{text:?}");
    }

    fn key(dir: &Path, name: &str) -> Signer {
        let (text, _) = Signer::generate(name).unwrap();
        let path = dir.join(name);
        fsutil::write_atomic(&path, text.as_bytes(), 0o600).unwrap();
        Signer::from_file(&path).unwrap()
    }

    fn commit(repo: &Repository, parent: Option<Oid>, signer: Option<&Signer>) -> Oid {
        let sig = Signature::now("rotd", "rotd@localhost").unwrap();
        let tree = repo
            .find_tree(repo.treebuilder(None).unwrap().write().unwrap())
            .unwrap();
        let parent = parent.map(|p| repo.find_commit(p).unwrap());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        signing::commit(repo, None, &sig, &sig, "c", &tree, &parents, signer).unwrap()
    }

    #[test]
    fn only_signed_fast_forwards_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path().join("r")).unwrap();
        let ours_key = key(dir.path(), "ours");
        let stranger = key(dir.path(), "stranger");
        let allowed = AllowedSigners::parse(&format!(
            "rotd@localhost {}\n",
            ours_key.public_key_openssh()
        ))
        .unwrap();
        let root = commit(&repo, None, Some(&ours_key));
        let good = commit(&repo, Some(root), Some(&ours_key));
        assert!(refuse_incoming(&repo, Some(root), good, &allowed)
            .unwrap()
            .is_none());
        assert!(refuse_incoming(&repo, None, good, &allowed)
            .unwrap()
            .is_none());

        // The first bad commit is named, even under a good one.
        let unsigned = commit(&repo, Some(good), None);
        let on_top = commit(&repo, Some(unsigned), Some(&ours_key));
        let (c, why) = refuse_incoming(&repo, Some(good), on_top, &allowed)
            .unwrap()
            .unwrap();
        assert_eq!((c, why.as_str()), (unsigned, "it is not signed"));

        let foreign = commit(&repo, Some(good), Some(&stranger));
        let (c, why) = refuse_incoming(&repo, Some(good), foreign, &allowed)
            .unwrap()
            .unwrap();
        assert_eq!(c, foreign);
        assert!(why.contains("not in the allowed signers"), "{why}");

        // A signed fork that does not contain HEAD is a rewritten history.
        let fork = commit(&repo, Some(root), Some(&ours_key));
        let (c, why) = refuse_incoming(&repo, Some(good), fork, &allowed)
            .unwrap()
            .unwrap();
        assert_eq!(c, fork);
        assert!(why.contains("not a fast-forward"), "{why}");
    }

    #[test]
    fn local_remotes_are_told_from_network_ones() {
        assert_eq!(
            local_remote_path("/srv/secrets.git"),
            Some(PathBuf::from("/srv/secrets.git"))
        );
        assert_eq!(
            local_remote_path("file:///srv/s.git"),
            Some(PathBuf::from("/srv/s.git"))
        );
        assert_eq!(
            local_remote_path("./remote.git"),
            Some(PathBuf::from("./remote.git"))
        );
        assert_eq!(local_remote_path("ssh://git@host/ops/s.git"), None);
        assert_eq!(local_remote_path("git@host:ops/s.git"), None);
        assert_eq!(local_remote_path("https://host/ops/s.git"), None);
    }
}
