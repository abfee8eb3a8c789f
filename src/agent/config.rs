//! `agent.toml`: the configuration of `rotd agent` (DESIGN §7).
//!
//! Parse, then validate, as `rotd.toml` is: a `Raw` struct with `deny_unknown_fields`,
//! then a checked [`Config`] with every problem reported at its file:line. A
//! `[[secret.deliver]]` has exactly the syntax and checks of a schedule's `[[deliver]]`
//! (`config::validate_deliver`), so a consumer's files are written with the same
//! guarantees wherever they are rendered. Relative paths are taken from the
//! directory of the file.
//!
//! The agent adopts store commits only when they are signed by a key of
//! `allowed_signers`, and signs its acknowledgements with `signing_key`: both are
//! required, there is no "trust the remote blindly" mode for a consumer host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{self as rotd_config, Problem, RawDeliver, RawProbe, Reporter};
use crate::deliver;

/// Where `rotd agent` looks for its config when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/rotd/agent.toml";

/// `poll` when the file does not set it.
pub const DEFAULT_POLL: Duration = Duration::from_secs(30);
/// Bounds of `poll`: a remote is not polled in a tight loop, and a consumer does not
/// wait for days to pick a rotation up.
const POLL_MIN: (Duration, &str) = (Duration::from_secs(1), "1s");
const POLL_MAX: (Duration, &str) = (Duration::from_secs(86_400), "24h");

/// The checked agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// This host's name in the rotator's `[hosts]`.
    pub host: String,
    pub store: Store,
    pub secrets: Vec<Secret>,
    /// `metrics = "ADDR:PORT"`: where `/metrics` and `/healthz` are served (none when
    /// unset).
    pub metrics: Option<std::net::SocketAddr>,
}

/// `[store]` of the agent: its own clone of the store remote.
#[derive(Debug, Clone)]
pub struct Store {
    pub remote: String,
    pub branch: String,
    pub path: PathBuf,
    /// The host's age identity (decrypts only what is encrypted to this host).
    pub identity: PathBuf,
    /// The host's OpenSSH ed25519 key: signs its acknowledgements.
    pub signing_key: PathBuf,
    /// git's allowed-signers file: the keys whose store commits are adopted.
    pub allowed_signers: PathBuf,
    /// Private key for an `ssh://` remote.
    pub remote_ssh_key: Option<PathBuf>,
    /// OpenSSH known_hosts file the SSH remote's host key must be listed in.
    pub remote_known_hosts: Option<PathBuf>,
    pub poll: Duration,
}

/// One `[[secret]]`: a secret this host uses and the files it is rendered into.
#[derive(Debug, Clone)]
pub struct Secret {
    pub name: String,
    pub deliver: Vec<deliver::Spec>,
    /// `[secret.probe]`: an HTTP request with the new value, after the reloads; a
    /// failure puts the previous files back and the rotation is not acknowledged.
    pub probe: Option<rotd_config::Probe>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    host: Spanned<String>,
    metrics: Option<Spanned<String>>,
    store: Spanned<RawStore>,
    #[serde(default)]
    secret: Vec<Spanned<RawSecret>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    remote: Spanned<String>,
    branch: Option<Spanned<String>>,
    path: Spanned<PathBuf>,
    identity: Spanned<PathBuf>,
    signing_key: Option<Spanned<PathBuf>>,
    allowed_signers: Option<Spanned<PathBuf>>,
    remote_ssh_key: Option<Spanned<PathBuf>>,
    remote_known_hosts: Option<Spanned<PathBuf>>,
    poll: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: Spanned<String>,
    #[serde(default)]
    deliver: Vec<Spanned<RawDeliver>>,
    probe: Option<Spanned<RawProbe>>,
}

/// Loads and checks the agent's config file; every problem found is listed.
pub fn load(path: &Path) -> Result<Config, rotd_config::Error> {
    let text = crate::fsutil::read_text(path, crate::fsutil::MAX_LIST_FILE).map_err(|e| {
        rotd_config::Error(vec![Problem {
            file: path.to_owned(),
            line: None,
            message: format!("cannot read the agent configuration: {e}; create it (see README, \"rotd agent\") or pass --config PATH"),
        }])
    })?;
    parse_str(&text, path)
}

/// [`load`] without the read (for tests).
pub fn parse_str(text: &str, path: &Path) -> Result<Config, rotd_config::Error> {
    let mut problems = Vec::new();
    let raw: Raw = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            return Err(rotd_config::Error(vec![rotd_config::toml_problem(
                path, text, &e,
            )]))
        }
    };
    let mut rep = Reporter::new(path, text, &mut problems);
    let host = raw.host.get_ref().clone();
    if !rotd_config::valid_name(&host) {
        rep.at(&raw.host, format!("host = {host:?} is not a valid host name; use the name of this host's [hosts.NAME] table in the rotator's rotd.toml (lower-case letters, digits, '-', '_', '.')"));
    }
    let s = raw.store.get_ref();
    let remote = s.remote.get_ref().trim().to_owned();
    if remote.is_empty() {
        rep.at(
            &s.remote,
            "store.remote is empty; name the store's git remote (a path or an ssh:// URL)",
        );
    }
    let branch = match &s.branch {
        Some(b) if b.get_ref().trim().is_empty() => {
            rep.at(b, "store.branch is empty; remove it to use \"main\"");
            String::new()
        }
        Some(b) => b.get_ref().trim().to_owned(),
        None => "main".to_owned(),
    };
    let required =
        |v: &Option<Spanned<PathBuf>>, key: &str, why: &str, rep: &mut Reporter<'_>| match v {
            Some(p) => Some(rep.resolve(p.get_ref())),
            None => {
                rep.at(&raw.store, format!("[store] needs `{key}`: {why}"));
                None
            }
        };
    let signing_key = required(
        &s.signing_key,
        "signing_key",
        "this host signs its acknowledgements with it (an OpenSSH ed25519 key, `ssh-keygen -t ed25519`), and the rotator checks them with [hosts.HOST] signer",
        &mut rep,
    );
    let allowed_signers = required(
        &s.allowed_signers,
        "allowed_signers",
        "the agent adopts only store commits signed by a key listed there (git's allowed_signers format); list the rotator's signing key",
        &mut rep,
    );
    let poll = match &s.poll {
        None => DEFAULT_POLL,
        Some(p) => match rotd_config::parse_duration(p.get_ref()) {
            Ok(d) if d >= POLL_MIN.0 && d <= POLL_MAX.0 => d,
            Ok(_) => {
                rep.at(
                    p,
                    format!(
                        "store.poll = {:?} is out of range; use between {} and {}",
                        p.get_ref(),
                        POLL_MIN.1,
                        POLL_MAX.1
                    ),
                );
                DEFAULT_POLL
            }
            Err(m) => {
                rep.at(p, format!("store.poll: {m}"));
                DEFAULT_POLL
            }
        },
    };
    let store_path = rep.resolve(s.path.get_ref());
    let identity = rep.resolve(s.identity.get_ref());
    let remote_ssh_key = s.remote_ssh_key.as_ref().map(|k| rep.resolve(k.get_ref()));
    let remote_known_hosts = s
        .remote_known_hosts
        .as_ref()
        .map(|k| rep.resolve(k.get_ref()));
    let mut secrets: Vec<Secret> = Vec::new();
    for sec in &raw.secret {
        let r = sec.get_ref();
        let name = r.name.get_ref().clone();
        if !rotd_config::valid_name(&name) {
            rep.at(&r.name, format!("secret name = {name:?} is not a valid secret name; use the name of the rotator's schedule (lower-case letters, digits, '-', '_', '.')"));
        } else if secrets.iter().any(|x| x.name == name) {
            rep.at(
                &r.name,
                format!("secret {name:?} is listed twice; keep one [[secret]] per name"),
            );
        }
        if r.deliver.is_empty() {
            rep.at(sec, format!("secret {name:?} has no [[secret.deliver]]: add at least one file to render it into"));
        }
        let mut deliver = Vec::new();
        for d in &r.deliver {
            if let Some(spec) = rotd_config::validate_deliver(d, &mut rep) {
                deliver.push(spec);
            }
        }
        let probe = r.probe.as_ref().map(|p| {
            let (probe, _) = rotd_config::parse_probe(Some(p), &mut rep);
            if probe.http.is_none() {
                rep.at(p, format!("[secret.probe] of {name:?} has no `http`: add http = {{ url = \"…\", header = \"Authorization: Bearer {{{{secret}}}}\", expect = 200 }}, or remove the table"));
            }
            if probe.index.is_some() {
                rep.at(p, "probe.index is an Elasticsearch setting of the rotator; an agent probes with probe.http");
            }
            crate::targets::files::check_http_probe(&probe, p.span(), &mut rep);
            probe
        });
        secrets.push(Secret {
            name,
            deliver,
            probe,
        });
    }
    let metrics = raw
        .metrics
        .as_ref()
        .and_then(|m| match m.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                rep.at(
                    m,
                    format!(
                        "metrics = {:?} is not an address:port such as \"127.0.0.1:9818\"",
                        m.get_ref()
                    ),
                );
                None
            }
        });
    if !problems.is_empty() {
        return Err(rotd_config::Error(problems));
    }
    Ok(Config {
        metrics,
        path: path.to_owned(),
        host,
        store: Store {
            remote,
            branch,
            path: store_path,
            identity,
            signing_key: signing_key.expect("a missing signing_key is a problem reported above"),
            allowed_signers: allowed_signers
                .expect("a missing allowed_signers is a problem reported above"),
            remote_ssh_key,
            remote_known_hosts,
            poll,
        },
        secrets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"host = "web-1"
[store]
remote = "/srv/secrets.git"
path = "store"
identity = "keys/web-1.agekey"
signing_key = "keys/web-1.sign"
allowed_signers = "/etc/rotd/allowed_signers"
poll = "10s"
[[secret]]
name = "prom-remote-write"
[[secret.deliver]]
path = "/etc/prom/{{username}}.password"
content = "{{secret}}"
"#;

    #[test]
    fn a_complete_agent_config_is_checked_and_its_paths_resolved() {
        let cfg = parse_str(GOOD, Path::new("/etc/rotd/agent.toml")).unwrap();
        assert_eq!(cfg.host, "web-1");
        assert_eq!(cfg.store.path, PathBuf::from("/etc/rotd/store"));
        assert_eq!(cfg.store.branch, "main");
        assert_eq!(cfg.store.poll, Duration::from_secs(10));
        assert_eq!(cfg.secrets.len(), 1);
        assert_eq!(cfg.secrets[0].deliver[0].mode, 0o600);
    }

    #[test]
    fn every_problem_of_an_agent_config_is_reported_with_its_line() {
        let bad = GOOD
            .replace("signing_key = \"keys/web-1.sign\"\n", "")
            .replace("poll = \"10s\"", "poll = \"0s\"")
            .replace("content = \"{{secret}}\"", "content = \"{{secrit}}\"");
        let err = parse_str(&bad, Path::new("/etc/rotd/agent.toml")).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("needs `signing_key`"), "{text}");
        assert!(text.contains("store.poll"), "{text}");
        assert!(text.contains("agent.toml:12:"), "{text}");
    }
}
