//! Acknowledgements: how a consumer host tells the rotator what it holds (DESIGN §7).
//!
//! An acknowledgement is a commit on `refs/rotd/acks/HOST` of the store remote, signed
//! with the host's key (the sshsig format of the store's own commits, so
//! `git verify-commit` with `gpg.format=ssh` accepts it and the rotator checks it
//! with `[hosts.HOST] signer`). Its tree is empty; its message carries one
//! `Rotd-Ack: NAME ROTATION` trailer per secret the host holds. Its parent is the
//! previous acknowledgement, so the ref only ever moves forward and is pushed without
//! force: a host never rewrites what it acknowledged before.
//!
//! The remote's tip is read before each acknowledgement. When it is this host's own
//! signed commit and already states exactly what the host holds, nothing is
//! committed: a pass with nothing new leaves the ref alone.

use std::collections::BTreeSet;

use git2::{Oid, Repository};

use crate::signing::{self, AllowedSigners, Signer};
use crate::store::Message;

/// The trailer of one acknowledged secret.
pub const TRAILER: &str = "Rotd-Ack";

/// What a host holds: (secret name, rotation id) pairs.
pub type Held = BTreeSet<(String, String)>;

/// An acknowledgement could not be made or pushed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} for the acknowledgement of host {host}: {source}")]
    Git {
        action: &'static str,
        host: String,
        #[source]
        source: git2::Error,
    },
    #[error("cannot sign the acknowledgement of host {host}: {source}; check store.signing_key of the agent configuration")]
    Sign {
        host: String,
        #[source]
        source: signing::Error,
    },
    #[error("the store remote refused the acknowledgement {refname} ({reason}); the delivered files stay, and the next pass acknowledges again")]
    Rejected { refname: String, reason: String },
}

/// The ref a host's acknowledgements live on.
pub fn refname(host: &str) -> String {
    format!("refs/rotd/acks/{host}")
}

/// Where this clone keeps the remote's last acknowledgement of `host`.
fn tracking(host: &str) -> String {
    format!("refs/rotd/remote-acks/{host}")
}

/// How to reach the remote.
pub struct Remote<'a> {
    pub host: &'a str,
    /// The clone's own transport (credentials, SSH host-key check).
    pub transport: crate::store::transport::Transport,
}

impl Remote<'_> {
    fn git(&self, action: &'static str) -> impl Fn(git2::Error) -> Error + '_ {
        move |source| Error::Git {
            action,
            host: self.host.to_owned(),
            source,
        }
    }

    fn callbacks<'cb>(&self) -> git2::RemoteCallbacks<'cb> {
        self.transport.callbacks()
    }

    /// The remote's acknowledgement tip of this host (None: there is none yet). The
    /// caller holds the store's lock (`Store::lock_store`).
    pub fn fetch_tip(&self, repo: &Repository) -> Result<Option<Oid>, Error> {
        let tracking = tracking(self.host);
        // A pass killed mid-fetch leaves the ref's `.lock` file (see the helper).
        crate::store::clear_stale_ref_locks(repo, "refs/rotd/remote-acks");
        // A tip the remote no longer has must not become the next parent.
        if let Ok(mut r) = repo.find_reference(&tracking) {
            r.delete()
                .map_err(self.git("drop the stale remote ack ref"))?;
        }
        let mut remote = repo
            .find_remote("origin")
            .map_err(self.git("find the store remote"))?;
        let mut fo = git2::FetchOptions::new();
        fo.remote_callbacks(self.callbacks());
        // This host's ref only (not every host's: an idle pass brings nothing another
        // host acknowledged). A ref the remote does not have yet matches nothing.
        let spec = format!("+{}:{tracking}", refname(self.host));
        remote
            .fetch(&[spec.as_str()], Some(&mut fo), None)
            .map_err(self.git("fetch the acknowledgements"))?;
        Ok(repo.refname_to_id(&tracking).ok())
    }

    /// Pushes this host's ack ref, without force (created when missing).
    pub fn push(&self, repo: &Repository) -> Result<(), Error> {
        let name = refname(self.host);
        let mut remote = repo
            .find_remote("origin")
            .map_err(self.git("find the store remote"))?;
        let spec = format!("{name}:{name}");
        let crate::store::transport::Pushed { rejected, result } =
            self.transport.push(&mut remote, &spec);
        if let Some(reason) = rejected {
            return Err(Error::Rejected {
                refname: name,
                reason,
            });
        }
        result.map_err(|e| Error::Rejected {
            refname: name.clone(),
            reason: e.message().to_owned(),
        })
    }
}

/// What the acknowledgement `tip` states, when it is a commit signed by `own` (this
/// host's key); None otherwise (then it says nothing this host vouches for).
pub fn acknowledged(repo: &Repository, tip: Oid, own: &AllowedSigners) -> Option<Held> {
    signing::verify_commit(repo, tip, own).ok()??;
    let commit = repo.find_commit(tip).ok()?;
    Some(parse(commit.message().unwrap_or("")))
}

/// The `Rotd-Ack` trailers of a commit message.
pub fn parse(message: &str) -> Held {
    let prefix = format!("{TRAILER}:");
    message
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|v| {
            let mut parts = v.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(n), Some(r), None) => Some((n.to_owned(), r.to_owned())),
                _ => None,
            }
        })
        .collect()
}

/// Commits an acknowledgement of `held` on top of `parent`, signed by `signer`, and
/// moves this clone's ack ref to it.
pub fn commit(
    repo: &Repository,
    remote: &Remote<'_>,
    parent: Option<Oid>,
    held: &Held,
    signer: &Signer,
) -> Result<Oid, Error> {
    let host = remote.host;
    let git = |action| remote.git(action);
    let mut msg = Message::new(format!("ack {host}"));
    for (name, rotation) in held {
        msg = msg.trailer(TRAILER, format!("{name} {rotation}"));
    }
    let tree_id = repo
        .treebuilder(None)
        .and_then(|b| b.write())
        .map_err(git("write the empty tree"))?;
    let tree = repo
        .find_tree(tree_id)
        .map_err(git("read the empty tree"))?;
    let sig = git2::Signature::now(host, &format!("rotd-agent@{host}"))
        .map_err(git("make the author"))?;
    let parent = match parent {
        Some(p) => Some(
            repo.find_commit(p)
                .map_err(git("read the previous acknowledgement"))?,
        ),
        None => None,
    };
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let oid = signing::commit(
        repo,
        None,
        &sig,
        &sig,
        &msg.render(),
        &tree,
        &parents,
        Some(signer),
    )
    .map_err(|source| Error::Sign {
        host: host.to_owned(),
        source,
    })?;
    // The local ref is only the source of the push; the remote's tip is the truth.
    repo.reference(&refname(host), oid, true, "rotd agent: acknowledge")
        .map_err(git("move the local ack ref"))?;
    Ok(oid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_trailers_are_read_back_and_malformed_ones_ignored() {
        let held = parse("ack web-1\n\nRotd-Ack: a 01J\nRotd-Ack: b 01K\nRotd-Ack: c\nRotd-Ack: d 1 2\nOther: x\n");
        let want: Held = [("a", "01J"), ("b", "01K")]
            .iter()
            .map(|(n, r)| (n.to_string(), r.to_string()))
            .collect();
        assert_eq!(held, want);
    }
}
