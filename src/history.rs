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
    /// When signing is configured: "good", "unsigned", "bad" or "unknown-key".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<&'static str>,
}

/// Which entries `history` shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub secret: Option<String>,
    /// Only commits at or after this time (seconds since the epoch).
    pub since: Option<i64>,
    /// Only commits with this `Rotd-Step`.
    pub outcome: Option<String>,
}

/// Parses `--since`: an RFC 3339 time, or a duration back from `now`.
pub fn parse_since(s: &str, now: i64) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(t.timestamp());
    }
    match humantime::parse_duration(s.trim()) {
        Ok(d) => Ok(now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        Err(_) => Err(format!(
            "--since {s:?} is neither a duration (\"7d\", \"12h\") nor an RFC 3339 time (\"2026-01-31T00:00:00Z\")"
        )),
    }
}

/// Reads the filtered history (newest first), with each entry's signature status
/// checked against `allowed` when given.
pub fn read_filtered(
    store: &Store,
    filter: &Filter,
    allowed: Option<&crate::signing::AllowedSigners>,
) -> Result<Vec<Entry>, store::Error> {
    let mut entries = read(store, filter.secret.as_deref())?;
    entries.retain(|e| {
        filter.since.map_or(true, |t| e.timestamp >= t)
            && filter
                .outcome
                .as_deref()
                .map_or(true, |o| e.step.as_deref() == Some(o))
    });
    if let Some(allowed) = allowed {
        let repo = store.repo()?;
        for e in &mut entries {
            let oid = git2::Oid::from_str(&e.commit)?;
            e.signature = Some(crate::audit::signature_status(&repo, oid, allowed));
        }
    }
    Ok(entries)
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
        // The same parser as `verify`'s, which the trailers fuzz target exercises.
        let trailers = crate::audit::trailers(commit.message().unwrap_or(""));
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
            signature: None,
        });
    }
    Ok(out)
}
