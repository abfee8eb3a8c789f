//! Targets: where a credential is installed and proven (DESIGN §3, §5).
//!
//! A closed set, so an enum: each kind lives in its own file with its probe beside it.
//! The rotation engine drives every kind through the same steps:
//!
//! * `plan` — read the target's state (before anything is written) and decide what the
//!   new credential is called (the idle user); recorded in the pending commit;
//! * `apply` — make the new credential valid while the old one stays valid;
//! * `probe` — prove with the new credential that data flows;
//! * `rollback` — make the new credential invalid again, leaving the old one;
//! * `retire` — after the grace period, make the old credential invalid.
//!
//! Every step is idempotent, so recovery after a crash can run it again.

pub mod elasticsearch;
pub mod elasticsearch_user;
pub mod files;
pub mod http_probe;
pub mod prometheus;

use std::time::Duration;

use toml::Spanned;

use crate::deliver;
use crate::fsutil;
use crate::store::{self, Record};
use crate::syntax::Reporter;

/// `[probe]` settings shared by every target.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Time limit of one probe request.
    pub timeout: Duration,
    /// How many times the whole probe is tried before the rotation is rolled back.
    pub attempts: u32,
    /// Pause between attempts (and between query polls).
    pub interval: Duration,
    /// Generic HTTP probe (`files` target).
    pub http: Option<HttpProbe>,
    /// Data stream the Elasticsearch probe writes to.
    pub index: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpProbe {
    pub url: String,
    /// `Name: value` template; placeholders as in `[[deliver]]`.
    pub header: Option<String>,
    pub expect: u16,
}

/// `[target]` of a schedule as the configuration reads it: only `kind`. The kind's
/// module reads the table again as its own `Raw` ([`read_kind`]), so each kind owns
/// its settings and the configuration knows none of them.
#[derive(serde::Deserialize)]
pub(crate) struct RawHead {
    pub(crate) kind: Spanned<String>,
}

/// The schedule file read again for one kind: only `[target]`, as that kind's `Raw`.
#[derive(serde::Deserialize)]
struct Doc<T> {
    target: Spanned<T>,
}

/// `[target]` of `text` as the raw form `T` of one kind; a TOML problem (an unknown
/// key, a wrong type) is reported at its line.
fn read_kind<T: serde::de::DeserializeOwned>(
    text: &str,
    rep: &mut Reporter<'_>,
) -> Option<Spanned<T>> {
    match toml::from_str::<Doc<T>>(text) {
        Ok(d) => Some(d.target),
        Err(e) => {
            rep.toml_error(&e);
            None
        }
    }
}

/// A target step failed. Messages never quote a secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] fsutil::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("web config {path}: {reason}")]
    WebConfig { path: String, reason: String },
    #[error("probe failed: {0}")]
    Probe(String),
    #[error("{0}")]
    Plan(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error(transparent)]
    Deliver(#[from] deliver::Error),
    /// An Elasticsearch call failed (never quotes a key or an Authorization header).
    #[error("elasticsearch: {0}")]
    Es(String),
}

/// A target's checked configuration.
#[derive(Debug, Clone)]
pub enum Config {
    Prometheus(prometheus::Config),
    Files(files::Config),
    Elasticsearch(elasticsearch::Config),
    EsUser(elasticsearch_user::Config),
}

impl Config {
    /// Whether going from `old` to `self` changes what a live credential may do, so
    /// that the daemon must bring the live credential in line at once.
    pub fn permissions_changed(&self, old: &Config, name: &str) -> bool {
        match (self, old) {
            (Config::Elasticsearch(new), Config::Elasticsearch(old)) => {
                new.permissions_hash(name) != old.permissions_hash(name)
            }
            _ => false,
        }
    }

    /// The `[target]` of a schedule whose text is `text`: `head` says the kind, and
    /// that kind's module reads the table as its own raw form (unknown keys refused,
    /// each problem at its line).
    pub(crate) fn from_schedule(
        head: &Spanned<RawHead>,
        text: &str,
        probe: &Probe,
        probe_span: Option<std::ops::Range<usize>>,
        rep: &mut Reporter<'_>,
    ) -> Option<Config> {
        let kind = head.get_ref().kind.get_ref().as_str();
        match kind {
            prometheus::KIND => {
                prometheus::Config::from_raw(&read_kind(text, rep)?, rep).map(Config::Prometheus)
            }
            files::KIND => files::Config::from_raw(&read_kind(text, rep)?, probe, probe_span, rep)
                .map(Config::Files),
            elasticsearch::KIND => {
                elasticsearch::Config::from_raw(&read_kind(text, rep)?, probe, probe_span, rep)
                    .map(Config::Elasticsearch)
            }
            elasticsearch_user::KIND => {
                elasticsearch_user::Config::from_raw(&read_kind(text, rep)?, probe, rep)
                    .map(Config::EsUser)
            }
            other => {
                rep.at(&head.get_ref().kind, format!("unknown target kind {other:?}; the kinds are \"prometheus-remote-write\", \"elasticsearch-api-key\", \"elasticsearch-user-password\" and \"files\""));
                None
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Config::Prometheus(_) => prometheus::KIND,
            Config::Files(_) => files::KIND,
            Config::Elasticsearch(_) => elasticsearch::KIND,
            Config::EsUser(_) => elasticsearch_user::KIND,
        }
    }

    /// Other secrets this target uses: (field, name).
    pub fn references(&self) -> Vec<(&'static str, &str)> {
        match self {
            Config::Prometheus(c) => c
                .query_credential
                .as_deref()
                .map(|q| vec![("query_credential", q)])
                .unwrap_or_default(),
            Config::Files(_) => Vec::new(),
            Config::Elasticsearch(c) => {
                vec![("admin_credential", c.conn.admin_credential.as_str())]
            }
            Config::EsUser(c) => vec![("admin_credential", c.conn.admin_credential.as_str())],
        }
    }

    /// The `Rotd-Target` trailer value for a credential.
    pub fn describe(&self, record: Option<&Record>) -> String {
        let user = record.and_then(|r| r.username());
        match self {
            Config::Prometheus(c) => format!(
                "{} {}{}",
                prometheus::KIND,
                c.url,
                user.map(|u| format!(" user={u}")).unwrap_or_default()
            ),
            Config::Files(_) => files::KIND.to_owned(),
            Config::Elasticsearch(c) => format!(
                "{} {}{}",
                elasticsearch::KIND,
                c.conn.url,
                record
                    .and_then(|r| r.key_id())
                    .map(|k| format!(" key={k}"))
                    .unwrap_or_default()
            ),
            Config::EsUser(c) => format!(
                "{} {} user={}",
                elasticsearch_user::KIND,
                c.conn.url,
                c.username
            ),
        }
    }
}

/// What `plan` decided, written into the pending record.
#[derive(Debug, Default)]
pub struct Plan {
    pub username: Option<String>,
    /// The credential that becomes the old one and is retired after the grace.
    pub retire_username: Option<String>,
    /// The API key that becomes the old one and is invalidated after the grace.
    pub retire_key_id: Option<String>,
    /// Extra metadata for the pending record (e.g. the hash to restore).
    pub meta: Vec<(String, String)>,
}

/// In-memory undo data from `apply`, for an exact in-process rollback.
#[derive(Debug, Default)]
pub struct Undo {
    pub before: Option<Vec<u8>>,
    pub after: Option<Vec<u8>>,
    /// The credential as the target made it (an Elasticsearch API key: its id and
    /// secret come from the server). When set, it REPLACES the pending record and the
    /// engine commits it as pending again before anything depends on it.
    pub record: Option<Record>,
}

/// Looks up another secret in the store (e.g. an admin or query credential).
pub type Lookup<'a> = &'a (dyn Fn(&str) -> Result<Option<Record>, store::Error> + Sync);

/// What apply, rollback and retire need besides the records.
pub struct StepContext<'a> {
    /// The rotated secret's name.
    pub name: &'a str,
    pub lookup: Lookup<'a>,
}

/// What an in-place update of a live credential did (no new secret).
#[derive(Debug)]
pub enum InPlace {
    /// Updated and verified: `record` replaces the current record.
    Updated { record: Record, detail: String },
    /// Verification failed and the previous state is restored (the reason).
    Reverted(String),
}

/// A successful probe.
#[derive(Debug)]
pub struct ProbeReport {
    pub elapsed: Duration,
    pub detail: String,
}

/// Values the probes need besides the new credential.
pub struct ProbeContext<'a> {
    pub name: &'a str,
    pub rotation_id: &'a str,
    pub probe: &'a Probe,
    /// Looks up another secret in the store (e.g. the query credential).
    pub lookup: Lookup<'a>,
}

impl Config {
    /// Whether a rotation gives the new password to a user that an earlier rotation
    /// used (the alternating users of `prometheus-remote-write`): such a rotation must
    /// wait while that user is still in its grace period (`rotation::slot_in_grace`).
    pub fn reuses_slots(&self) -> bool {
        matches!(self, Config::Prometheus(_))
    }

    pub fn plan(&self, current: Option<&Record>) -> Result<Plan, Error> {
        match self {
            Config::Prometheus(c) => c.plan(current),
            Config::Files(_) => Ok(Plan::default()),
            Config::Elasticsearch(c) => Ok(c.plan(current)),
            Config::EsUser(c) => c.plan(current),
        }
    }

    pub async fn apply(&self, new: &Record, ctx: &StepContext<'_>) -> Result<Undo, Error> {
        match self {
            Config::Prometheus(c) => {
                // bcrypt (about 240 ms at cost 12) and the web config's fsync run off
                // the async runtime, as every blocking step does.
                let (c, new) = (c.clone(), new.clone());
                tokio::task::spawn_blocking(move || c.apply(&new))
                    .await
                    .map_err(|e| Error::Plan(format!("the apply task failed: {e}")))?
            }
            Config::Files(_) => Ok(Undo::default()),
            Config::Elasticsearch(c) => c.apply(new, ctx).await,
            Config::EsUser(c) => c.apply(new, ctx).await,
        }
    }

    pub async fn probe(&self, new: &Record, ctx: &ProbeContext<'_>) -> Result<ProbeReport, Error> {
        match self {
            Config::Prometheus(c) => c.probe(new, ctx).await,
            Config::Files(c) => c.probe(new, ctx).await,
            Config::Elasticsearch(c) => c.probe(new, ctx).await,
            Config::EsUser(c) => c.probe(new, ctx).await,
        }
    }

    /// Undoes `apply`. `undo` is the in-memory data when the same process applied;
    /// None after a crash (recovery), when the pending record's metadata is used.
    /// `current` is the current record (the credential in use before the rotation):
    /// a target whose apply REPLACES the old credential (a single-password user)
    /// restores it from there.
    pub async fn rollback(
        &self,
        pending: &Record,
        current: Option<&Record>,
        undo: Option<&Undo>,
        ctx: &StepContext<'_>,
    ) -> Result<(), Error> {
        match self {
            Config::Prometheus(c) => c.rollback(pending, undo),
            Config::Files(_) => Ok(()),
            Config::Elasticsearch(c) => c.rollback(pending, undo, ctx).await,
            Config::EsUser(c) => c.rollback(current, ctx).await,
        }
    }

    /// Brings the live credential in line with changed settings without a new
    /// secret, when the target can (an Elasticsearch API key's privileges on 8.4+).
    /// None: nothing to do this way; rotate as usual. Err: the update was made, failed
    /// verification and could not be undone.
    pub async fn update_in_place(
        &self,
        current: &Record,
        ctx: &StepContext<'_>,
    ) -> Result<Option<InPlace>, Error> {
        match self {
            Config::Elasticsearch(c) => c.update_in_place(current, ctx).await,
            _ => Ok(None),
        }
    }

    /// Makes the old credential named in `current`'s retire metadata invalid.
    pub async fn retire(
        &self,
        current: &Record,
        ctx: &StepContext<'_>,
    ) -> Result<Option<String>, Error> {
        match self {
            Config::Prometheus(c) => c.retire(current),
            Config::Files(_) => Ok(None),
            Config::Elasticsearch(c) => c.retire(current, ctx).await,
            Config::EsUser(_) => Ok(None),
        }
    }
}

/// An HTTP client with the probe's time limit (see [`crate::http`]: no redirect is
/// followed, so an `https://` URL is never answered over http either).
pub(crate) fn client(timeout: Duration) -> Result<reqwest::Client, Error> {
    crate::http::build(crate::http::builder(timeout), "").map_err(Error::Probe)
}

pub use crate::http::MAX_BODY;
pub(crate) use crate::http::{describe as http_error, read_body};
