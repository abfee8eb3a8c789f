//! The audit trail, read from git: every commit that carries `Rotd-*` trailers.
//!
//! One [`Entry`] per commit, newest first. Parsing uses libgit2's trailer parser, the
//! same rules as `git interpret-trailers --parse`.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{self, Store};

/// One commit of the audit trail.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub commit: String,
    /// Commit time, RFC 3339 UTC.
    pub time: String,
    #[serde(skip)]
    pub timestamp: i64,
    pub secret: Option<String>,
    pub rotation: Option<String>,
    pub step: Option<String>,
    pub trigger: Option<String>,
    pub target: Option<String>,
    pub fingerprint: Option<String>,
    pub probe: Option<String>,
    pub error: Option<String>,
    pub left: Option<String>,
    pub retire_after: Option<String>,
    pub subject: String,
    /// Every `Rotd-*` trailer, as parsed.
    pub trailers: BTreeMap<String, String>,
}

/// Reads the whole history (newest first), optionally for one secret.
pub fn read(store: &Store, secret: Option<&str>) -> Result<Vec<Entry>, store::Error> {
    let repo = store.repo()?;
    let mut walk = repo.revwalk()?;
    if walk.push_head().is_err() {
        return Ok(Vec::new());
    }
    walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::TIME)?;
    let mut out = Vec::new();
    for oid in walk {
        let oid = oid?;
        let commit = repo.find_commit(oid)?;
        let msg = commit.message().unwrap_or("");
        let mut trailers = BTreeMap::new();
        if let Ok(t) = git2::message_trailers_strs(msg) {
            for (k, v) in t.iter() {
                if k.starts_with("Rotd-") {
                    trailers.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        if trailers.is_empty() {
            continue;
        }
        let get = |k: &str| trailers.get(k).cloned();
        let entry_secret = get("Rotd-Secret");
        if let Some(want) = secret {
            if entry_secret.as_deref() != Some(want) {
                continue;
            }
        }
        let ts = commit.time().seconds();
        out.push(Entry {
            commit: oid.to_string(),
            time: chrono::DateTime::from_timestamp(ts, 0)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            timestamp: ts,
            secret: entry_secret,
            rotation: get("Rotd-Rotation"),
            step: get("Rotd-Step"),
            trigger: get("Rotd-Trigger"),
            target: get("Rotd-Target"),
            fingerprint: get("Rotd-Fingerprint"),
            probe: get("Rotd-Probe"),
            error: get("Rotd-Error"),
            left: get("Rotd-Left"),
            retire_after: get("Rotd-Retire-After"),
            subject: commit.summary().unwrap_or("").to_owned(),
            trailers,
        });
    }
    Ok(out)
}
