//! What an agent knows of its own work, kept between passes and processes, and the two
//! views of it: `rotd agent status` and the agent's `/metrics`.
//!
//! Per secret: the rotation it delivered, the id of the encrypted blob that rotation
//! came from (a pass that finds the same blob at HEAD decrypts nothing: an idle pass
//! is a fetch that brings no pack and a comparison of ids), when, and why its last
//! delivery failed; per pass: when, whether it succeeded, the commit it ran at, and
//! what the remote's acknowledgement of this host says afterwards.
//!
//! Kept in the clone's git directory (`.git/rotd-agent-state.json`, 0600, written
//! atomically, rewritten only when it changes): never pushed, never in the work tree.
//! It holds no secret: rotation ids, blob ids of encrypted files, times, and error
//! messages, which name paths and peers but never a value.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::DateTime;
use serde::{Deserialize, Serialize};

use super::config;
use crate::fsutil;
use crate::metrics;
use crate::store::{self, Refusal};

/// The file, in the clone's git directory.
const STATE_FILE: &str = "rotd-agent-state.json";

/// Now, as the state records times (RFC 3339, UTC, to the millisecond).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The agent's memory (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretState>,
    #[serde(default)]
    pub last_pass: Option<Pass>,
    #[serde(default)]
    pub last_success: Option<String>,
    /// What the remote's acknowledgement of this host names after the last pass that
    /// reached the acknowledgement step: secret → rotation.
    #[serde(default)]
    pub acked: BTreeMap<String, String>,
}

/// One secret of this host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecretState {
    /// The rotation delivered (`fingerprint:…` for a record without a rotation id).
    pub delivered: Option<String>,
    /// The encrypted blob (git object id) the delivered value was read from.
    pub blob: Option<String>,
    pub delivered_at: Option<String>,
    /// The rotation the clone's HEAD holds, as of the last pass (None: not in the
    /// store, or not read).
    pub store: Option<String>,
    /// Why the last delivery of `store` failed; None once it succeeded.
    pub error: Option<String>,
}

/// The last pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pass {
    /// RFC 3339, UTC (as every time rotd records).
    pub at: String,
    pub ok: bool,
    pub error: Option<String>,
    /// The store commit the pass ran at.
    pub head: Option<String>,
}

impl State {
    /// Where the state of the agent configured by `cfg` is kept.
    pub fn path(cfg: &config::Config) -> PathBuf {
        cfg.store.path.join(".git").join(STATE_FILE)
    }

    /// Reads the state; a missing, unreadable or damaged file is an empty state (the
    /// next pass then delivers every secret again: idempotent).
    pub fn load(path: &Path) -> State {
        match fsutil::read_optional(path) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "the agent's state file is damaged; delivering every secret again");
                State::default()
            }),
            Ok(None) => State::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the agent's state file; delivering every secret again");
                State::default()
            }
        }
    }

    /// Writes the state atomically (0600).
    pub fn save(&self, path: &Path) -> Result<(), fsutil::Error> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        fsutil::write_atomic(path, &bytes, 0o600)
    }

    /// The rotation delivered of `name` when it came from `blob` and nothing failed
    /// since: that secret needs no decryption this pass.
    pub fn unchanged(&self, name: &str, blob: &str) -> bool {
        self.secrets.get(name).is_some_and(|s| {
            s.delivered.is_some() && s.error.is_none() && s.blob.as_deref() == Some(blob)
        })
    }
}

/// `rotd agent status`: one line per secret of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub host: String,
    pub remote: String,
    pub last_pass: Option<Pass>,
    pub last_success: Option<String>,
    pub secrets: Vec<SecretReport>,
    /// The store remote's state this clone refused to adopt, while it stands.
    pub remote_refused: Option<Refusal>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretReport {
    pub name: String,
    /// `ok` (delivered and acknowledged), `unacknowledged` (delivered, the remote's
    /// acknowledgement does not name it yet), `failing` (the last delivery of the
    /// store's rotation failed; the previous files are in place), `not-in-store`,
    /// `never-delivered`.
    pub state: String,
    pub delivered: Option<String>,
    pub delivered_at: Option<String>,
    pub store: Option<String>,
    pub acked: Option<String>,
    pub error: Option<String>,
}

impl SecretReport {
    fn new(name: &str, s: Option<&SecretState>, acked: Option<&String>) -> SecretReport {
        let s = s.cloned().unwrap_or_default();
        let state = if s.error.is_some() {
            "failing"
        } else if s.delivered.is_none() {
            if s.store.is_none() {
                "not-in-store"
            } else {
                "never-delivered"
            }
        } else if s
            .delivered
            .as_deref()
            .is_some_and(|d| d.starts_with("fingerprint:"))
            || s.delivered.as_ref() == acked
        {
            // A record without a rotation id is never acknowledged (nothing to name).
            "ok"
        } else {
            "unacknowledged"
        };
        SecretReport {
            name: name.to_owned(),
            state: state.to_owned(),
            delivered: s.delivered,
            delivered_at: s.delivered_at,
            store: s.store,
            acked: acked.cloned(),
            error: s.error,
        }
    }
}

/// The status of the agent configured by `cfg`, from its state file and its clone's
/// refusal record: nothing is fetched and nothing is decrypted.
pub fn report(cfg: &config::Config) -> Report {
    let state = State::load(&State::path(cfg));
    report_of(cfg, &state)
}

fn report_of(cfg: &config::Config, state: &State) -> Report {
    Report {
        host: cfg.host.clone(),
        remote: cfg.store.remote.clone(),
        last_pass: state.last_pass.clone(),
        last_success: state.last_success.clone(),
        secrets: cfg
            .secrets
            .iter()
            .map(|s| {
                SecretReport::new(
                    &s.name,
                    state.secrets.get(&s.name),
                    state.acked.get(&s.name),
                )
            })
            .collect(),
        remote_refused: store::refusal_in(&cfg.store.path),
    }
}

impl Report {
    /// Whether everything is delivered and acknowledged, and the last pass succeeded.
    pub fn healthy(&self) -> bool {
        self.remote_refused.is_none()
            && self.last_pass.as_ref().is_some_and(|p| p.ok)
            && self.secrets.iter().all(|s| s.state == "ok")
    }

    /// The human-readable table of `rotd agent status`.
    pub fn print(&self, mut out: impl std::io::Write) -> std::io::Result<()> {
        writeln!(out, "host {} — store remote {}", self.host, self.remote)?;
        match &self.last_pass {
            None => writeln!(out, "no pass has run yet")?,
            Some(p) => {
                let result = if p.ok { "ok" } else { "FAILED" };
                write!(out, "last pass {} {result}", p.at)?;
                if let Some(h) = &p.head {
                    write!(out, " at store commit {}", &h[..h.len().min(12)])?;
                }
                writeln!(out)?;
                if let Some(e) = &p.error {
                    writeln!(out, "  error: {e}")?;
                }
            }
        }
        if let Some(r) = &self.remote_refused {
            writeln!(
                out,
                "REMOTE REFUSED since {}: commit {} — {} (nothing from it is delivered)",
                r.time, r.commit, r.reason
            )?;
        }
        writeln!(
            out,
            "{:<28} {:<16} {:<38} {:<38}",
            "SECRET", "STATE", "DELIVERED", "ACKNOWLEDGED"
        )?;
        for s in &self.secrets {
            let dash = || "-".to_owned();
            writeln!(
                out,
                "{:<28} {:<16} {:<38} {:<38}",
                s.name,
                s.state,
                s.delivered.clone().unwrap_or_else(dash),
                s.acked.clone().unwrap_or_else(dash)
            )?;
            if let Some(e) = &s.error {
                writeln!(out, "  error: {e}")?;
            }
        }
        Ok(())
    }
}

/// Counters of this process (they start at 0 with it, as Prometheus expects).
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub passes_ok: u64,
    pub passes_failed: u64,
    pub deliveries_ok: u64,
    pub deliveries_failed: u64,
}

/// The agent's `/metrics` page (names and help in [`crate::metrics`]). Labels carry
/// secret names only.
pub fn render_metrics(cfg: &config::Config, state: &State, c: &Counters) -> String {
    use metrics::agent as m;
    let r = report_of(cfg, state);
    let mut out = String::new();
    let ts = |t: &str| {
        DateTime::parse_from_rfc3339(t)
            .map(|t| t.timestamp_millis() as f64 / 1000.0)
            .ok()
    };
    let _ = writeln!(out, "# HELP {} {}", m::PASSES_TOTAL, m::PASSES_TOTAL_HELP);
    let _ = writeln!(out, "# TYPE {} counter", m::PASSES_TOTAL);
    let _ = writeln!(out, "{}{{result=\"ok\"}} {}", m::PASSES_TOTAL, c.passes_ok);
    let _ = writeln!(
        out,
        "{}{{result=\"failed\"}} {}",
        m::PASSES_TOTAL,
        c.passes_failed
    );
    let _ = writeln!(
        out,
        "# HELP {} {}",
        m::DELIVERIES_TOTAL,
        m::DELIVERIES_TOTAL_HELP
    );
    let _ = writeln!(out, "# TYPE {} counter", m::DELIVERIES_TOTAL);
    let _ = writeln!(
        out,
        "{}{{result=\"ok\"}} {}",
        m::DELIVERIES_TOTAL,
        c.deliveries_ok
    );
    let _ = writeln!(
        out,
        "{}{{result=\"failed\"}} {}",
        m::DELIVERIES_TOTAL,
        c.deliveries_failed
    );
    for (name, help, t) in [
        (
            m::LAST_PASS,
            m::LAST_PASS_HELP,
            r.last_pass.as_ref().map(|p| p.at.as_str()),
        ),
        (
            m::LAST_SUCCESS,
            m::LAST_SUCCESS_HELP,
            r.last_success.as_deref(),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        if let Some(t) = t.and_then(ts) {
            let _ = writeln!(out, "{name} {t}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP {} {}",
        m::REMOTE_REFUSED,
        m::REMOTE_REFUSED_HELP
    );
    let _ = writeln!(out, "# TYPE {} gauge", m::REMOTE_REFUSED);
    let _ = writeln!(
        out,
        "{} {}",
        m::REMOTE_REFUSED,
        u8::from(r.remote_refused.is_some())
    );
    let _ = writeln!(out, "# HELP {} {}", m::DELIVERED, m::DELIVERED_HELP);
    let _ = writeln!(out, "# TYPE {} gauge", m::DELIVERED);
    for s in &r.secrets {
        if let Some(t) = s.delivered_at.as_deref().and_then(ts) {
            let _ = writeln!(out, "{}{{secret=\"{}\"}} {t}", m::DELIVERED, s.name);
        }
    }
    for (name, help, want) in [
        (m::FAILING, m::FAILING_HELP, "failing"),
        (m::UNACKNOWLEDGED, m::UNACKNOWLEDGED_HELP, "unacknowledged"),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for s in &r.secrets {
            let _ = writeln!(
                out,
                "{name}{{secret=\"{}\"}} {}",
                s.name,
                u8::from(s.state == want)
            );
        }
    }
    out
}

/// Prints `rotd agent status` (text or JSON); Ok(false) when something needs
/// attention ([`Report::healthy`]).
pub fn print_status(
    cfg: &config::Config,
    json: bool,
    mut out: impl std::io::Write,
) -> std::io::Result<bool> {
    let r = report(cfg);
    if json {
        serde_json::to_writer_pretty(&mut out, &r).map_err(std::io::Error::other)?;
        writeln!(out)?;
    } else {
        r.print(&mut out)?;
    }
    Ok(r.healthy())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> config::Config {
        let text = r#"host = "web-1"
[store]
remote = "/srv/secrets.git"
path = "/nonexistent/rotd-agent-test/store"
identity = "k"
signing_key = "s"
allowed_signers = "a"
[[secret]]
name = "a"
[[secret.deliver]]
path = "/tmp/a"
content = "{{secret}}"
[[secret]]
name = "b"
[[secret.deliver]]
path = "/tmp/b"
content = "{{secret}}"
[[secret]]
name = "c"
[[secret.deliver]]
path = "/tmp/c"
content = "{{secret}}"
"#;
        config::parse_str(text, Path::new("/etc/rotd/agent.toml")).unwrap()
    }

    #[test]
    fn states_and_metrics_follow_what_was_delivered_and_acknowledged() {
        let cfg = cfg();
        let now = now();
        let mut st = State::default();
        st.secrets.insert(
            "a".into(),
            SecretState {
                delivered: Some("r2".into()),
                blob: Some("b2".into()),
                delivered_at: Some(now.clone()),
                store: Some("r2".into()),
                error: None,
            },
        );
        st.secrets.insert(
            "b".into(),
            SecretState {
                delivered: Some("r1".into()),
                blob: Some("b1".into()),
                delivered_at: Some(now.clone()),
                store: Some("r3".into()),
                error: Some("reload failed".into()),
            },
        );
        st.acked.insert("a".into(), "r1".into());
        st.last_pass = Some(Pass {
            at: now.clone(),
            ok: false,
            error: Some("1 of the secrets could not be delivered".into()),
            head: Some("0123456789abcdef".into()),
        });
        let r = report_of(&cfg, &st);
        let states: Vec<_> = r.secrets.iter().map(|s| s.state.as_str()).collect();
        assert_eq!(states, ["unacknowledged", "failing", "not-in-store"]);
        assert!(!r.healthy());
        assert!(st.unchanged("a", "b2"));
        assert!(!st.unchanged("a", "b3"), "another blob is decrypted");
        assert!(!st.unchanged("b", "b1"), "a failing secret is tried again");

        st.acked.insert("a".into(), "r2".into());
        let page = render_metrics(&cfg, &st, &Counters::default());
        assert!(
            page.contains("rotd_agent_unacknowledged{secret=\"a\"} 0"),
            "{page}"
        );
        assert!(
            page.contains("rotd_agent_delivery_failing{secret=\"b\"} 1"),
            "{page}"
        );
        assert!(page.contains("rotd_agent_remote_refused 0"), "{page}");
        assert!(
            page.contains("rotd_agent_passes_total{result=\"failed\"} 0"),
            "{page}"
        );
        let mut text = Vec::new();
        r.print(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("last pass") && text.contains("FAILED"),
            "{text}"
        );
        assert!(text.contains("error: reload failed"), "{text}");
    }

    #[test]
    fn a_damaged_state_file_is_an_empty_state_and_a_saved_one_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        std::fs::write(&p, b"{not json").unwrap();
        assert_eq!(State::load(&p), State::default());
        let mut st = State::default();
        st.acked.insert("a".into(), "r1".into());
        st.save(&p).unwrap();
        assert_eq!(State::load(&p), st);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
