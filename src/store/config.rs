//! What the store needs to know: where it lives, its remote and keys (`[store]` of
//! `rotd.toml`, or an agent's clone), and the hosts a secret may be encrypted to.
//! `config::load` builds and checks it; the store reads nothing of the configuration
//! module (the layers in `lib.rs`).
//!
//! A secret's consumers are read from `schedules/NAME.toml` at each encryption
//! ([`consumers_of`]), so what a host can decrypt follows the schedule without a
//! reload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::syntax::{toml_problem, valid_name};

/// `[store]` of `rotd.toml` (built and checked by `config::load`), or an agent's
/// clone (`agent::config`).
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub remote: Option<String>,
    pub branch: String,
    pub identity: PathBuf,
    pub recipients: Option<PathBuf>,
    pub signing_key: Option<PathBuf>,
    /// git's allowed-signers file: the keys whose commits are adopted from the remote
    /// and accepted by `rotd verify` and `history`. This instance's own signing key is
    /// always trusted too.
    pub allowed_signers: Option<PathBuf>,
    /// Private key for an `ssh://` remote.
    pub remote_ssh_key: Option<PathBuf>,
    /// File holding a token for an `https://` remote (sent as the password).
    pub remote_token_file: Option<PathBuf>,
    /// OpenSSH known_hosts file the SSH remote's host key must be listed in
    /// (`store::transport`); None: libgit2's own check (`~/.ssh/known_hosts`).
    pub remote_known_hosts: Option<PathBuf>,
    pub author_name: String,
    pub author_email: String,
    /// `[hosts.NAME]` of `rotd.toml`: the hosts a secret can name as consumers.
    pub hosts: BTreeMap<String, Host>,
    /// The schedules directory, where a secret's consumers are read from when it is
    /// encrypted (see [`consumers_of`]).
    pub schedules: PathBuf,
}

/// `[hosts.NAME]` of `rotd.toml`: a host whose programs use some secrets (DESIGN §7).
/// A secret is encrypted to the hosts its schedule lists in `consumers`, and to no
/// other host, so a host can decrypt only what it uses.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// An `age1…` X25519 recipient or an `ssh-ed25519` public key line (checked at load).
    pub recipient: String,
    /// Verifies the host's acknowledgements (OpenSSH public key line).
    pub signer: Option<ssh_key::PublicKey>,
}

/// Only `consumers` of a schedule file; the rest is checked by `config::load_schedule`.
#[derive(Deserialize)]
struct RawConsumersOnly {
    #[serde(default)]
    consumers: Vec<String>,
}

/// The consumers of secret `name`, read from `schedules/NAME.toml` now: the hosts it is
/// encrypted to besides the global recipients. A secret without a schedule file (only
/// imported) has none. Reading the file at each encryption (not the daemon's loaded
/// copy) means a change of consumers takes effect at the next write of the secret
/// (a rotation or `rotd rekey`) without a reload.
pub fn consumers_of(schedules_dir: &Path, name: &str) -> Result<Vec<String>, String> {
    if !valid_name(name) {
        return Err(format!("{name:?} is not a valid secret name"));
    }
    let file = schedules_dir.join(format!("{name}.toml"));
    let bytes = match crate::fsutil::read_optional(&file) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("schedule {} is not UTF-8 text", file.display()))?;
    let raw: RawConsumersOnly = toml::from_str(&text).map_err(|e| {
        format!(
            "{}; fix it and run `rotd check`",
            toml_problem(&file, &text, &e)
        )
    })?;
    Ok(raw.consumers)
}
