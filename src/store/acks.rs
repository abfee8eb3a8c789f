//! Consumer hosts' acknowledgements (DESIGN §7): what the rotator reads before it
//! retires an old credential that other hosts may still use.
//!
//! A consumer host (`rotd agent`) acknowledges by pushing, to the store remote, a
//! commit on its own ref `refs/rotd/acks/HOST` whose message carries one trailer
//! `Rotd-Ack: NAME ROTATION` per secret it holds. The rotator fetches every host's
//! ref in one fetch ([`Store::fetch_acks`], under the store lock like every fetch) and
//! reads the tips ([`Store::read_acks`]).
//!
//! The trust rule: a tip counts only when its SSH signature verifies against THAT
//! host's `signer` in `rotd.toml` (an allowed-signers list holding that one key).
//! An unsigned tip, one signed by another host's key or by a stranger's, or a host
//! without a `signer`, counts for nothing: the host lags, and the reason is logged at
//! WARN once per read. Anyone who can push to the remote can write these refs, so the
//! signature is the only thing that makes an ack the host's word. The commit message
//! is a peer's text: it is never logged, only its trailers are compared with names
//! and rotation ids the rotator already knows.

use std::collections::{BTreeMap, BTreeSet};

use super::config::Host;
use super::{Error, Store};
use crate::signing::{self, AllowedSigners};

/// Where a host's acknowledgements live, on the remote and in this clone.
pub const REF_PREFIX: &str = "refs/rotd/acks/";
/// Every host's ack ref, fetched in one go (forced: a host may rewrite its own ref).
pub const REFSPEC: &str = "+refs/rotd/acks/*:refs/rotd/acks/*";
/// The trailer of an acknowledgement: `Rotd-Ack: NAME ROTATION`.
pub const TRAILER: &str = "Rotd-Ack";

/// The acknowledgements accepted from each host: (secret, rotation) pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acks {
    accepted: BTreeMap<String, BTreeSet<(String, String)>>,
}

impl Acks {
    /// Whether `host` acknowledged rotation `rotation` of `secret`.
    pub fn acked(&self, host: &str, secret: &str, rotation: &str) -> bool {
        self.accepted
            .get(host)
            .is_some_and(|s| s.contains(&(secret.to_owned(), rotation.to_owned())))
    }

    /// The consumers that have not acknowledged `rotation` of `secret`, in order.
    pub fn lagging(&self, consumers: &[String], secret: &str, rotation: &str) -> Vec<String> {
        consumers
            .iter()
            .filter(|h| !self.acked(h, secret, rotation))
            .cloned()
            .collect()
    }

    /// Records what a host acknowledged (after its signature verified).
    pub fn accept(&mut self, host: &str, pairs: BTreeSet<(String, String)>) {
        self.accepted.insert(host.to_owned(), pairs);
    }
}

/// The `Rotd-Ack: NAME ROTATION` pairs of a commit message (libgit2's trailer parser,
/// the rules of `git interpret-trailers`). A value that is not two words is ignored.
pub fn parse(message: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    if let Ok(t) = git2::message_trailers_strs(message) {
        for (k, v) in t.iter() {
            if !k.eq_ignore_ascii_case(TRAILER) {
                continue;
            }
            let mut words = v.split_whitespace();
            if let (Some(name), Some(rotation), None) = (words.next(), words.next(), words.next()) {
                out.insert((name.to_owned(), rotation.to_owned()));
            }
        }
    }
    out
}

impl Store {
    /// Fetches every host's ack ref from the store remote in one fetch. Returns
    /// Ok(false) when there is no remote or it cannot be reached (the acks already
    /// fetched are read then; a lagging host stays lagging, nothing is retired early).
    pub fn fetch_acks(&self) -> Result<bool, Error> {
        if self.cfg.remote.is_none() {
            return Ok(false);
        }
        let _lock = self.lock_store()?;
        let repo = self.repo()?;
        super::clear_stale_ref_locks(&repo, "refs/rotd/acks");
        let mut remote = repo.find_remote("origin")?;
        let mut fo = git2::FetchOptions::new();
        fo.remote_callbacks(self.callbacks());
        if let Err(e) = remote.fetch(&[REFSPEC], Some(&mut fo), None) {
            tracing::warn!(error = %e.message(), "cannot fetch the consumers' acknowledgements from the store remote; using those fetched before");
            return Ok(false);
        }
        Ok(true)
    }

    /// Reads the acknowledgements of `hosts` from this clone's ack refs, accepting a
    /// host's tip only when it is signed by that host's `signer`. With `warn`, each
    /// refused tip is logged at WARN (once per call: a retirement pass reads every
    /// host in one call); `status` and `/metrics` read quietly.
    pub fn read_acks<'a>(
        &self,
        hosts: impl IntoIterator<Item = &'a Host>,
        warn: bool,
    ) -> Result<Acks, Error> {
        let repo = self.repo()?;
        let mut acks = Acks::default();
        for host in hosts {
            match accepted(&repo, host) {
                Ok(Some(pairs)) => acks.accept(&host.name, pairs),
                Ok(None) => {}
                Err(reason) if !warn => {
                    tracing::debug!(host = %host.name, reason = %reason, "acknowledgement ignored")
                }
                Err(reason) => tracing::warn!(
                    host = %host.name,
                    reason = %reason,
                    "acknowledgement of host {} ignored: {reason}; the host counts as not having acknowledged anything",
                    host.name
                ),
            }
        }
        Ok(acks)
    }
}

/// The pairs a host's ack tip acknowledges; Ok(None) when the host has no ack ref;
/// Err(reason) when the tip is not signed by that host's key.
fn accepted(
    repo: &git2::Repository,
    host: &Host,
) -> Result<Option<BTreeSet<(String, String)>>, String> {
    let refname = format!("{REF_PREFIX}{}", host.name);
    let oid = match repo.refname_to_id(&refname) {
        Ok(oid) => oid,
        Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {refname}: {}", e.message())),
    };
    let Some(key) = &host.signer else {
        return Err(format!(
            "[hosts.{}] has no `signer` in rotd.toml, so its acknowledgements cannot be verified; add the host's signing public key there",
            host.name
        ));
    };
    let key = key
        .to_openssh()
        .map_err(|e| format!("cannot encode hosts.{}.signer: {e}", host.name))?;
    let allowed = AllowedSigners::parse(&format!("{} {key}\n", host.name))
        .map_err(|e| format!("cannot use hosts.{}.signer: {e}", host.name))?;
    match signing::verify_commit(repo, oid, &allowed) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(format!(
                "the tip of {refname} ({oid}) is not signed; an agent signs its acknowledgements with its signing key"
            ))
        }
        Err(e) => {
            // The error may quote the signature's namespace: a peer's text.
            let why: String = crate::redact::peer_text(&e.to_string(), 300)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            return Err(format!(
                "the tip of {refname} ({oid}) is not signed by hosts.{}.signer: {why}",
                host.name
            ));
        }
    }
    let commit = repo
        .find_commit(oid)
        .map_err(|e| format!("cannot read {oid}: {}", e.message()))?;
    Ok(Some(parse(&String::from_utf8_lossy(
        commit.message_bytes(),
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_pair_per_ack_trailer_and_ignores_the_rest() {
        let msg =
            "ack web-1\n\nRotd-Ack: prom 01ABC\nRotd-Ack: es 01DEF\nRotd-Ack: bad\nOther: x y\n";
        let p = parse(msg);
        assert_eq!(p.len(), 2);
        assert!(p.contains(&("prom".into(), "01ABC".into())));
        assert!(p.contains(&("es".into(), "01DEF".into())));
    }

    #[test]
    fn lagging_names_the_hosts_without_an_ack_of_this_rotation() {
        let mut a = Acks::default();
        a.accept("h1", parse("a\n\nRotd-Ack: s R2\n"));
        a.accept("h2", parse("a\n\nRotd-Ack: s R1\n"));
        let c = vec!["h1".to_owned(), "h2".to_owned(), "h3".to_owned()];
        assert_eq!(a.lagging(&c, "s", "R2"), vec!["h2", "h3"]);
        assert!(a.lagging(&c[..1], "s", "R2").is_empty());
    }
}
