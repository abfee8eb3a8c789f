//! `rotd status`: per secret, its state, last rotation, age, next run and last error —
//! derived from the git history (no decryption needed) plus the scheduler's plan.
//! The same report serves the CLI, the daemon's control socket and `/metrics`.

use std::io::Write;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Schedule};
use crate::history;
use crate::store::{self, Store};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub secrets: Vec<SecretStatus>,
    /// Commits not yet on the store remote (None: no remote).
    pub unpushed_commits: Option<usize>,
    /// Schedule files that are invalid now (the daemon keeps their last valid version).
    #[serde(default)]
    pub schedule_errors: Vec<String>,
    /// Whether a running daemon produced this report.
    #[serde(default)]
    pub daemon: bool,
    /// The store remote's state this clone refused to adopt (unsigned or foreign
    /// commits, a rewritten history), while the refusal stands.
    #[serde(default)]
    pub remote_refused: Option<store::Refusal>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretStatus {
    pub name: String,
    /// `ok`, `grace` (old credential still valid), `waiting-retire` (in grace, and the
    /// next scheduled rotation would give the new password to the user still in grace,
    /// so it waits until `retire_after`), `waiting-acks` (the old credential is kept,
    /// and the next rotation waits, until every host of `lagging` acknowledges the
    /// current rotation), `rotating`, `failed`, `never-rotated`.
    pub state: String,
    pub scheduled: bool,
    pub kind: Option<String>,
    pub last_rotation: Option<LastRotation>,
    /// When the current credential was made (last succeeded rotation or import).
    pub last_success: Option<String>,
    pub age_seconds: Option<i64>,
    pub next_run: Option<String>,
    pub last_error: Option<String>,
    pub retire_after: Option<String>,
    /// Consumer hosts that have not acknowledged the current rotation while its old
    /// credential waits for retirement (`waiting-acks`, since `retire_after`).
    #[serde(default)]
    pub lagging: Vec<String>,
    /// True once `ack_timeout` has passed since the current rotation with hosts still
    /// in `lagging`.
    #[serde(default)]
    pub ack_overdue: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRotation {
    pub time: String,
    pub outcome: String,
    pub rotation: Option<String>,
    pub commit: String,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Builds the report; `next_run` gives a schedule's next start.
pub fn report(
    cfg: &Config,
    store: &Store,
    next_run: impl Fn(&Schedule) -> Option<DateTime<Utc>>,
) -> Result<Report, store::Error> {
    report_from(cfg, store, &history::read(store, None)?, next_run)
}

/// Builds the report from history already read (the daemon caches it per HEAD).
pub fn report_from(
    cfg: &Config,
    store: &Store,
    entries: &[history::Entry],
    next_run: impl Fn(&Schedule) -> Option<DateTime<Utc>>,
) -> Result<Report, store::Error> {
    // One pass over the history, grouped by secret (newest first within each).
    let mut by_secret: std::collections::HashMap<&str, Vec<&history::Entry>> = Default::default();
    for e in entries {
        if let Some(n) = e.secret.as_deref() {
            by_secret.entry(n).or_default().push(e);
        }
    }
    let (current, pending) = store.names()?;
    let mut names: Vec<String> = cfg.schedules.iter().map(|s| s.name.clone()).collect();
    for n in current.iter().chain(&pending) {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let now = Utc::now();
    // Each consumer host's accepted acks, read once (quietly: the retirement pass is
    // what warns about a refused ack).
    let hosts: Vec<&crate::config::Host> = cfg
        .schedules
        .iter()
        .flat_map(|s| &s.consumers)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter_map(|h| cfg.store.hosts.get(h))
        .collect();
    let acks = if hosts.is_empty() {
        Default::default()
    } else {
        store.read_acks(hosts, false)?
    };
    let mut rows = Vec::new();
    for n in names {
        let mine: &[&history::Entry] = by_secret.get(n.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        let last = mine.iter().find(|e| {
            matches!(
                e.step.as_deref(),
                Some("succeeded" | "rolled-back" | "failed")
            )
        });
        let made = mine
            .iter()
            .find(|e| matches!(e.step.as_deref(), Some("succeeded" | "imported")));
        let last_error = mine
            .iter()
            .find(|e| e.error.is_some())
            .and_then(|e| e.error.clone());
        let retire_pending = mine
            .iter()
            .take_while(|e| e.step.as_deref() != Some("retired"))
            .find(|e| e.step.as_deref() == Some("succeeded"))
            .and_then(|e| e.retire_after.clone());
        let sched = cfg.schedule(&n);
        let rotation = made
            .and_then(|e| e.rotation.as_deref())
            .unwrap_or("unknown");
        let lagging = match (sched, &retire_pending) {
            (Some(s), Some(_)) if !pending.contains(&n) => {
                acks.lagging(&s.consumers, &s.name, rotation)
            }
            _ => Vec::new(),
        };
        let ack_overdue = !lagging.is_empty()
            && sched.zip(made).is_some_and(|(s, e)| {
                let timeout = i64::try_from(s.ack_timeout.as_secs()).unwrap_or(i64::MAX);
                now.timestamp().saturating_sub(e.timestamp) >= timeout
            });
        let state = if pending.contains(&n) {
            if last.and_then(|e| e.step.as_deref()) == Some("failed") {
                "failed"
            } else {
                "rotating"
            }
        } else if !current.contains(&n) {
            "never-rotated"
        } else if !lagging.is_empty() {
            "waiting-acks"
        } else if let Some(after) = &retire_pending {
            let until = DateTime::parse_from_rfc3339(after).ok();
            let waits = sched.is_some_and(|s| {
                s.target.reuses_slots()
                    && next_run(s)
                        .zip(until)
                        .is_some_and(|(next, until)| next < until)
            });
            if waits {
                "waiting-retire"
            } else {
                "grace"
            }
        } else {
            "ok"
        };
        rows.push(SecretStatus {
            name: n.clone(),
            state: state.into(),
            scheduled: sched.is_some(),
            kind: sched.map(|s| s.target.kind().to_owned()),
            last_rotation: last.map(|e| LastRotation {
                time: e.time.clone(),
                outcome: e.step.clone().unwrap_or_default(),
                rotation: e.rotation.clone(),
                commit: e.commit.clone(),
            }),
            last_success: made.map(|e| e.time.clone()),
            age_seconds: made.map(|e| now.timestamp() - e.timestamp),
            next_run: sched.and_then(&next_run).map(rfc3339),
            last_error,
            retire_after: retire_pending,
            lagging,
            ack_overdue,
        });
    }
    Ok(Report {
        secrets: rows,
        unpushed_commits: store.unpushed()?,
        schedule_errors: Vec::new(),
        daemon: false,
        remote_refused: store.remote_refused(),
    })
}

/// Prints the report as a table or as one JSON document.
pub fn print(r: &Report, json: bool, out: &mut impl Write) -> std::io::Result<()> {
    if json {
        serde_json::to_writer_pretty(&mut *out, r)?;
        return writeln!(out);
    }
    writeln!(
        out,
        "{:<24} {:<14} {:<22} {:>10}  {:<22} LAST ERROR",
        "SECRET", "STATE", "LAST ROTATION", "AGE", "NEXT RUN"
    )?;
    for s in &r.secrets {
        let age = s
            .age_seconds
            .map(|a| {
                let d = humantime::format_duration(std::time::Duration::from_secs(a.max(0) as u64))
                    .to_string();
                d.split(' ').take(2).collect::<Vec<_>>().join(" ")
            })
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<24} {:<14} {:<22} {:>10}  {:<22} {}",
            s.name,
            s.state,
            s.last_rotation
                .as_ref()
                .map(|l| format!("{} {}", l.time.get(..16).unwrap_or(&l.time), l.outcome))
                .unwrap_or_else(|| "-".into()),
            age,
            s.next_run.as_deref().unwrap_or("-"),
            s.last_error.as_deref().unwrap_or("")
        )?;
    }
    if let Some(n) = r.unpushed_commits.filter(|n| *n > 0) {
        writeln!(out, "{n} commit(s) not pushed to the store remote yet")?;
    }
    for s in r.secrets.iter().filter(|s| s.state == "waiting-retire") {
        writeln!(
            out,
            "{}: waiting-retire: the previous credential is in its grace period until {}; scheduled rotations wait until it is retired then (`rotd retire --force {}` retires it now)",
            s.name,
            s.retire_after.as_deref().unwrap_or("-"),
            s.name
        )?;
    }
    for s in r.secrets.iter().filter(|s| s.state == "waiting-acks") {
        writeln!(
            out,
            "{}: waiting-acks: host(s) {} have not acknowledged the current rotation{}; the old credential stays valid for them (its grace ends or ended at {}) and the next rotation waits; `rotd retire --force {}` or `rotd rotate --emergency {}` cuts them off",
            s.name,
            s.lagging.join(", "),
            if s.ack_overdue { " within ack_timeout (OVERDUE)" } else { "" },
            s.retire_after.as_deref().unwrap_or("-"),
            s.name,
            s.name
        )?;
    }
    for e in &r.schedule_errors {
        writeln!(out, "schedule error: {e}")?;
    }
    if let Some(x) = &r.remote_refused {
        writeln!(
            out,
            "store remote refused since {}: commit {} {}; the local store is kept at its last good state and no rotation runs until the remote is repaired (`rotd verify` lists the commits)",
            x.time, x.commit, x.reason
        )?;
    }
    Ok(())
}
