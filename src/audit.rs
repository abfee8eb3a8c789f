//! `rotd verify`: an audit of the whole store history (DESIGN §6).
//!
//! One pass over the branch (oldest commit first) collects every commit's trailers,
//! its signature status and the blobs it introduces; each distinct blob is read once
//! and each `secrets/*.age` blob is decrypted once (cached by blob id). The checks:
//!
//! * every commit is signed by an allowed key (when signing is configured);
//! * the remote-tracking branch holds nothing the sync would refuse (unsigned or
//!   foreign commits, a rewritten history);
//! * every `secrets/*.age` at HEAD decrypts with the identity;
//! * no blob anywhere in history holds a current or past secret in plaintext;
//! * every `pending` step has a terminal step, or is the rotation in flight;
//! * every commit touching `secrets/` carries `Rotd-Secret` and `Rotd-Step`;
//! * after a recipient is removed from `.age-recipients`, every secret is
//!   re-encrypted and rotated;
//! * every `secrets/*.age` at HEAD is encrypted to exactly the expected recipients:
//!   the daemon, `.age-recipients` and the secret's consumers ([`recipient_findings`]).
//!
//! A finding names the commit and the file; no finding ever contains a secret.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use git2::{Oid, Repository};
use serde::Serialize;

use crate::signing::{self, AllowedSigners, VerifyError};
use crate::store::{self, Store};

/// One problem found by the audit.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// Which check: `signature`, `remote`, `decrypt`, `plaintext`, `pending`, `trailers`, `recipients`.
    pub check: &'static str,
    pub commit: String,
    pub file: Option<String>,
    pub message: String,
}

/// The result of an audit.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub commits: usize,
    pub blobs: usize,
    /// Distinct secret values (current and past) searched for in plaintext.
    pub secrets_searched: usize,
    pub signing_checked: bool,
    pub findings: Vec<Finding>,
}

/// Options of `rotd verify`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// An allowed-signers file (git's format); overrides `store.allowed_signers`.
    pub allowed_signers: Option<std::path::PathBuf>,
    /// Commits reachable from this one (itself included) need no signature.
    pub accept_unsigned_before: Option<String>,
}

/// The signature status of a commit, as `history` shows it.
pub fn signature_status(repo: &Repository, oid: Oid, allowed: &AllowedSigners) -> &'static str {
    match signing::verify_commit(repo, oid, allowed) {
        Ok(Some(_)) => "good",
        Ok(None) => "unsigned",
        Err(VerifyError::NotAllowed { .. }) => "unknown-key",
        Err(_) => "bad",
    }
}

/// The keys whose signatures are accepted: `path` alone when given (`--allowed-signers`),
/// else the keys the store adopts remote commits from ([`Store::trusted_signers`]:
/// `store.allowed_signers` plus the signer's own key), else none (signatures are not
/// checked).
pub fn allowed_signers(
    store: &Store,
    path: Option<&Path>,
) -> Result<Option<AllowedSigners>, store::Error> {
    if let Some(p) = path {
        return Ok(Some(AllowedSigners::from_file(p)?));
    }
    store.trusted_signers()
}

/// Findings for the remote-tracking branch (what the last fetch saw on the remote)
/// beyond HEAD: commits the sync refuses to adopt, because they are not signed by an
/// allowed key or do not fast-forward HEAD.
fn remote_findings(
    store: &Store,
    repo: &Repository,
    head: Oid,
    allowed: &AllowedSigners,
) -> Result<Vec<Finding>, git2::Error> {
    let branch = &store.config().branch;
    let tracking = format!("refs/remotes/origin/{branch}");
    let Ok(theirs) = repo.refname_to_id(&tracking) else {
        return Ok(Vec::new());
    };
    let mut findings = Vec::new();
    if theirs == head || repo.graph_descendant_of(head, theirs)? {
        return Ok(findings);
    }
    if !repo.graph_descendant_of(theirs, head)? {
        findings.push(Finding {
            check: "remote",
            commit: theirs.to_string(),
            file: None,
            message: format!("origin/{branch} is not a fast-forward of HEAD {head}: the remote branch was rewritten; rotd does not adopt it"),
        });
    }
    let mut walk = repo.revwalk()?;
    walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::REVERSE)?;
    walk.push(theirs)?;
    walk.hide(head)?;
    for oid in walk {
        let oid = oid?;
        let problem = match signing::verify_commit(repo, oid, allowed) {
            Ok(Some(_)) => continue,
            Ok(None) => "is not signed".to_owned(),
            Err(e) => format!("has a signature that is not accepted: {e}"),
        };
        findings.push(Finding {
            check: "remote",
            commit: oid.to_string(),
            file: None,
            message: format!("this commit on origin/{branch} {problem}; rotd does not adopt it"),
        });
    }
    Ok(findings)
}

/// An audit failed to run (not a finding).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("--accept-unsigned-before {0}: no such commit in the store")]
    UnknownCommit(String),
}

impl From<git2::Error> for Error {
    fn from(e: git2::Error) -> Error {
        Error::Store(e.into())
    }
}

impl From<signing::Error> for Error {
    fn from(e: signing::Error) -> Error {
        Error::Store(e.into())
    }
}

/// The `Rotd-*` trailers of a commit message.
pub fn trailers(msg: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(t) = git2::message_trailers_strs(msg) {
        for (k, v) in t.iter() {
            if k.starts_with("Rotd-") {
                out.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    out
}

struct CommitInfo {
    oid: Oid,
    trailers: BTreeMap<String, String>,
    /// `secrets/` changed against the first parent (or the commit is a root with it).
    touches_secrets: bool,
    /// `secrets/*.age` files whose blob changed, by name (current slot only).
    changed_current: Vec<String>,
    /// Recipient lines removed from `.age-recipients` in this commit.
    removed_recipients: Vec<String>,
}

fn recipient_lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn entry_id(tree: &git2::Tree, path: &str) -> Option<Oid> {
    tree.get_path(Path::new(path)).ok().map(|e| e.id())
}

/// `secrets/NAME.age` → Some(NAME) for the current slot.
fn current_name(path: &str) -> Option<&str> {
    let n = path.strip_prefix("secrets/")?.strip_suffix(".age")?;
    if n.ends_with(".pending") || n.contains('/') {
        None
    } else {
        Some(n)
    }
}

fn is_secret_file(path: &str) -> bool {
    path.starts_with("secrets/") && path.ends_with(".age")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() || hay.len() < needle.len() {
        return false;
    }
    let first = needle[0];
    let last = hay.len() - needle.len();
    let mut i = 0;
    while i <= last {
        match hay[i..=last].iter().position(|&b| b == first) {
            None => return false,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return true;
                }
                i += 1;
            }
        }
    }
    false
}

/// Runs every check over the branch at HEAD.
pub fn verify(store: &Store, opts: &Options) -> Result<Report, Error> {
    let repo = store.repo()?;
    let allowed = allowed_signers(store, opts.allowed_signers.as_deref())?;
    let mut findings = Vec::new();

    let mut walk = repo.revwalk()?;
    if walk.push_head().is_err() {
        return Ok(Report {
            ok: true,
            commits: 0,
            blobs: 0,
            secrets_searched: 0,
            signing_checked: allowed.is_some(),
            findings,
        });
    }
    walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::REVERSE)?;
    let oids: Vec<Oid> = walk.collect::<Result<_, _>>()?;

    let mut exempt = HashSet::new();
    if let Some(rev) = &opts.accept_unsigned_before {
        let c = repo
            .revparse_single(rev)
            .and_then(|o| o.peel_to_commit())
            .map_err(|_| Error::UnknownCommit(rev.clone()))?;
        let mut w = repo.revwalk()?;
        w.push(c.id())?;
        for o in w {
            exempt.insert(o?);
        }
    }

    // Blob id → (commit that introduced it, path there).
    let mut blobs: HashMap<Oid, (Oid, String)> = HashMap::new();
    let mut seen_trees: HashSet<Oid> = HashSet::new();
    let mut commits = Vec::with_capacity(oids.len());
    for &oid in &oids {
        let commit = repo.find_commit(oid)?;
        if let Some(allowed) = &allowed {
            if !exempt.contains(&oid) {
                let problem = match signing::verify_commit(&repo, oid, allowed) {
                    Ok(Some(_)) => None,
                    Ok(None) => Some("the commit is not signed".to_owned()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(message) = problem {
                    findings.push(Finding {
                        check: "signature",
                        commit: oid.to_string(),
                        file: None,
                        message,
                    });
                }
            }
        }
        let tree = commit.tree()?;
        collect_blobs(&repo, &tree, "", oid, &mut blobs, &mut seen_trees)?;
        let parent_tree = match commit.parent(0) {
            Ok(p) => Some(p.tree()?),
            Err(_) => None,
        };
        let secrets_now = entry_id(&tree, "secrets");
        let secrets_before = parent_tree.as_ref().and_then(|t| entry_id(t, "secrets"));
        let touches_secrets = secrets_now != secrets_before;
        let mut changed_current = Vec::new();
        if touches_secrets {
            if let Some(id) = secrets_now {
                for e in repo.find_tree(id)?.iter() {
                    let Some(n) = e.name() else { continue };
                    let path = format!("secrets/{n}");
                    if let Some(name) = current_name(&path) {
                        let before = parent_tree.as_ref().and_then(|t| entry_id(t, &path));
                        if before != Some(e.id()) {
                            changed_current.push(name.to_owned());
                        }
                    }
                }
            }
        }
        let rec_now = entry_id(&tree, ".age-recipients");
        let rec_before = parent_tree
            .as_ref()
            .and_then(|t| entry_id(t, ".age-recipients"));
        let mut removed_recipients = Vec::new();
        if rec_now != rec_before {
            if let Some(before) = rec_before {
                let old = recipient_lines(repo.find_blob(before)?.content());
                let new = match rec_now {
                    Some(id) => recipient_lines(repo.find_blob(id)?.content()),
                    None => Vec::new(),
                };
                removed_recipients = old.into_iter().filter(|l| !new.contains(l)).collect();
            }
        }
        commits.push(CommitInfo {
            oid,
            trailers: trailers(commit.message().unwrap_or("")),
            touches_secrets,
            changed_current,
            removed_recipients,
        });
    }
    let head = *oids.last().expect("a branch has a commit");
    let head_tree = repo.find_commit(head)?.tree()?;
    if let Some(allowed) = &allowed {
        findings.extend(remote_findings(store, &repo, head, allowed)?);
    }

    // Decrypt every version of every secret file once; collect the secret values.
    let mut secrets: Vec<zeroize::Zeroizing<Vec<u8>>> = Vec::new();
    let mut head_blobs: HashMap<Oid, String> = HashMap::new();
    if let Ok(e) = head_tree.get_path(Path::new("secrets")) {
        for f in repo.find_tree(e.id())?.iter() {
            if let Some(n) = f.name().filter(|n| n.ends_with(".age")) {
                head_blobs.insert(f.id(), format!("secrets/{n}"));
            }
        }
    }
    let mut secret_blobs: Vec<(&Oid, &(Oid, String))> = blobs
        .iter()
        .filter(|(_, (_, p))| is_secret_file(p))
        .collect();
    secret_blobs.sort_by(|a, b| a.1 .1.cmp(&b.1 .1).then(a.0.cmp(b.0)));
    for (id, (introduced, path)) in secret_blobs {
        let blob = repo.find_blob(*id)?;
        match store.decrypt_record(blob.content(), path) {
            Ok(rec) => {
                let s = rec.secret.expose().as_bytes();
                if s.len() >= 8 && !secrets.iter().any(|x| x.as_slice() == s) {
                    secrets.push(zeroize::Zeroizing::new(s.to_vec()));
                }
            }
            Err(e) => {
                if let Some(head_path) = head_blobs.get(id) {
                    findings.push(Finding {
                        check: "decrypt",
                        commit: introduced.to_string(),
                        file: Some(head_path.clone()),
                        message: format!(
                            "{head_path} at HEAD does not decrypt with the identity: {e}"
                        ),
                    });
                }
            }
        }
    }

    findings.extend(recipient_findings(store, &repo, head, &head_blobs)?);

    // Search every blob of every commit once for every known secret.
    let mut plain: Vec<(&Oid, &(Oid, String))> = blobs.iter().collect();
    plain.sort_by(|a, b| a.1 .1.cmp(&b.1 .1));
    for (id, (introduced, path)) in plain {
        let blob = repo.find_blob(*id)?;
        if secrets.iter().any(|s| contains(blob.content(), s)) {
            findings.push(Finding {
                check: "plaintext",
                commit: introduced.to_string(),
                file: Some(path.clone()),
                message: format!("{path} holds a current or past secret in plaintext"),
            });
        }
    }

    // Trailers, pending steps, recipient removals.
    let mut open: BTreeMap<String, (Oid, String)> = BTreeMap::new();
    for c in &commits {
        let secret = c.trailers.get("Rotd-Secret");
        let step = c.trailers.get("Rotd-Step").map(String::as_str);
        if c.touches_secrets && (step.is_none() || (secret.is_none() && step != Some("rekeyed"))) {
            findings.push(Finding {
                check: "trailers",
                commit: c.oid.to_string(),
                file: c
                    .changed_current
                    .first()
                    .map(|n| store::rel_path(n, store::Slot::Current))
                    .or(Some("secrets/".into())),
                message:
                    "the commit changes secrets/ but lacks the Rotd-Secret or Rotd-Step trailer"
                        .into(),
            });
        }
        if let Some(rot) = c.trailers.get("Rotd-Rotation") {
            match step {
                Some("pending") => {
                    open.entry(rot.clone())
                        .or_insert((c.oid, secret.cloned().unwrap_or_default()));
                }
                Some("succeeded" | "rolled-back" | "failed") => {
                    open.remove(rot);
                }
                _ => {}
            }
        }
    }
    for (rot, (oid, secret)) in open {
        let pending = store::rel_path(&secret, store::Slot::Pending);
        if head_tree.get_path(Path::new(&pending)).is_err() {
            findings.push(Finding {
                check: "pending",
                commit: oid.to_string(),
                file: Some(pending),
                message: format!("rotation {rot} of {secret} has a pending step but no succeeded, rolled-back or failed step, and is not in flight"),
            });
        }
    }
    let (current, _) = store.names()?;
    for (i, c) in commits.iter().enumerate() {
        if c.removed_recipients.is_empty() {
            continue;
        }
        for name in &current {
            let later = &commits[i..];
            let reencrypted = later.iter().any(|l| l.changed_current.contains(name));
            let rotated = later[1..].iter().any(|l| {
                l.trailers.get("Rotd-Secret") == Some(name)
                    && l.trailers.get("Rotd-Step").map(String::as_str) == Some("succeeded")
            });
            if !(reencrypted && rotated) {
                findings.push(Finding {
                    check: "recipients",
                    commit: c.oid.to_string(),
                    file: Some(store::rel_path(name, store::Slot::Current)),
                    message: format!(
                        "{} recipient(s) removed from .age-recipients here ({}), but {name} was not {} since: they may still hold its value",
                        c.removed_recipients.len(),
                        c.removed_recipients.join(", "),
                        if reencrypted { "rotated" } else { "re-encrypted and rotated" }
                    ),
                });
            }
        }
    }

    Ok(Report {
        ok: findings.is_empty(),
        commits: oids.len(),
        blobs: blobs.len(),
        secrets_searched: secrets.len(),
        signing_checked: allowed.is_some(),
        findings,
    })
}

/// Checks that each secret file at HEAD is encrypted to the expected set: the daemon,
/// the global recipients and the secret's consumers, and to nobody else.
///
/// An X25519 stanza does not say whom it is for, and rotd holds no host's identity, so
/// the check compares the header's stanzas with the expected ones: the number of
/// X25519 stanzas, and each SSH stanza by its key tag. A file encrypted to a host that
/// is not a consumer has one stanza too many (or a foreign SSH tag), and is reported.
fn recipient_findings(
    store: &Store,
    repo: &Repository,
    head: Oid,
    head_blobs: &HashMap<Oid, String>,
) -> Result<Vec<Finding>, Error> {
    let mut findings = Vec::new();
    let mut files: Vec<(&Oid, &String)> = head_blobs.iter().collect();
    files.sort_by(|a, b| a.1.cmp(b.1));
    for (id, path) in files {
        let Some(name) = path
            .strip_prefix("secrets/")
            .and_then(|p| p.strip_suffix(".age"))
            .map(|p| p.strip_suffix(".pending").unwrap_or(p))
        else {
            continue;
        };
        let mut finding = |message: String| {
            findings.push(Finding {
                check: "recipients",
                commit: head.to_string(),
                file: Some(path.clone()),
                message,
            })
        };
        let extra = match store.consumer_recipients(name) {
            Ok(e) => e,
            Err(e) => {
                finding(format!(
                    "cannot tell whom {path} should be encrypted to: {e}"
                ));
                continue;
            }
        };
        let mut expected: Vec<store::crypto::Stanza> = store
            .keys()
            .recipient_set(&extra)
            .iter()
            .map(|r| r.stanza())
            .collect();
        let blob = repo.find_blob(*id)?;
        let mut found = match store::crypto::stanzas(blob.content(), path) {
            Ok(s) => s,
            Err(e) => {
                finding(e.to_string());
                continue;
            }
        };
        expected.sort();
        found.sort();
        if expected != found {
            finding(format!(
                "{path} is encrypted to {} recipient(s), but the daemon, .age-recipients and its consumers make {}{}: a host that does not consume {name} may be able to read it, or a consumer cannot; run `rotd rekey`, then rotate {name}",
                found.len(),
                expected.len(),
                if found.len() == expected.len() { " (an SSH key differs)" } else { "" }
            ));
        }
    }
    Ok(findings)
}

fn collect_blobs(
    repo: &Repository,
    tree: &git2::Tree,
    prefix: &str,
    commit: Oid,
    blobs: &mut HashMap<Oid, (Oid, String)>,
    seen_trees: &mut HashSet<Oid>,
) -> Result<(), git2::Error> {
    if !seen_trees.insert(tree.id()) {
        return Ok(());
    }
    for e in tree.iter() {
        let name = String::from_utf8_lossy(e.name_bytes());
        let path = format!("{prefix}{name}");
        match e.kind() {
            Some(git2::ObjectType::Tree) => {
                let sub = repo.find_tree(e.id())?;
                collect_blobs(repo, &sub, &format!("{path}/"), commit, blobs, seen_trees)?;
            }
            Some(git2::ObjectType::Blob) => {
                blobs.entry(e.id()).or_insert((commit, path));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_finds_substrings() {
        assert!(contains(b"abc secretvalue xyz", b"secretvalue"));
        assert!(contains(b"secretvalue", b"secretvalue"));
        assert!(!contains(b"secretvalu", b"secretvalue"));
        assert!(!contains(b"ssssecretvaluX", b"secretvalue!"));
        assert!(contains(b"sssecretvalue", b"secretvalue"));
    }

    #[test]
    fn current_names() {
        assert_eq!(current_name("secrets/a.age"), Some("a"));
        assert_eq!(current_name("secrets/a.pending.age"), None);
        assert_eq!(current_name("other/a.age"), None);
    }
}
