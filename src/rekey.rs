//! `rotd rekey`: re-encrypt every secret file to the current recipients (the
//! recipients file plus the daemon, plus the secret's consumers) and update
//! `.age-recipients`, in one commit.
//!
//! A secret's consumers are read from its schedule at this moment, so a host removed
//! from `consumers` cannot decrypt the version written here nor any later one. The
//! blobs already in the history stay readable to it: rotate the secret too.
//!
//! Every secret's rotation lock is held while the files are rewritten, so no rotation
//! commits in between. The commit (`Rotd-Step: rekeyed`) lists the recipients added
//! and removed; it names no secret value. Re-encrypting does not take anything away
//! from a removed recipient who already read a secret: rotate afterwards
//! (`--rotate-removed`, and `rotd verify` reports the secrets still to rotate).

use crate::rotation::Trigger;
use crate::store::{self, rel_path, Change, Message, Slot, Store};

/// What a rekey did.
#[derive(Debug, Clone, Default)]
pub struct Rekeyed {
    pub commit: Option<git2::Oid>,
    /// Secret files re-encrypted (current and pending).
    pub files: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub push: Option<store::Push>,
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Re-encrypts every `secrets/*.age` and `*.pending.age` at HEAD to the current
/// recipients and commits them with the new `.age-recipients`.
pub fn rekey(store: &Store) -> Result<Rekeyed, store::Error> {
    let (current, pending) = store.names()?;
    let mut names: Vec<String> = current.iter().chain(&pending).cloned().collect();
    names.sort();
    names.dedup();
    let _locks = names
        .iter()
        .map(|n| store.lock_secret(n, true))
        .collect::<Result<Vec<_>, _>>()?;
    // Read again under the locks: a rotation may have finished meanwhile.
    let (current, pending) = store.names()?;
    let old = store
        .head_bytes(".age-recipients")?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let new = store.keys().recipients_file();
    let (old_l, new_l) = (lines(&old), lines(&new));
    let mut out = Rekeyed {
        added: new_l
            .iter()
            .filter(|l| !old_l.contains(l))
            .cloned()
            .collect(),
        removed: old_l
            .iter()
            .filter(|l| !new_l.contains(l))
            .cloned()
            .collect(),
        ..Default::default()
    };
    let mut changes = Vec::new();
    for (list, slot) in [(&current, Slot::Current), (&pending, Slot::Pending)] {
        for n in list {
            let path = rel_path(n, slot);
            let Some(bytes) = store.head_bytes(&path)? else {
                continue;
            };
            let plain = store.keys().decrypt(&bytes, &path)?;
            changes.push(Change::Put {
                path,
                bytes: store.encrypt_for(n, &plain)?,
            });
            out.files += 1;
        }
    }
    changes.push(Change::Put {
        path: ".age-recipients".into(),
        bytes: new.into_bytes(),
    });
    let mut msg = Message::new(format!(
        "rekey {} secret file(s) to {} recipient(s)",
        out.files,
        new_l.len()
    ))
    .trailer("Rotd-Step", "rekeyed")
    .trailer("Rotd-Trigger", Trigger::manual_here().to_string());
    for a in &out.added {
        msg = msg.trailer("Rotd-Recipient-Added", a.clone());
    }
    for r in &out.removed {
        msg = msg.trailer("Rotd-Recipient-Removed", r.clone());
    }
    out.commit = Some(store.commit(changes, &msg)?);
    out.push = Some(store.push()?);
    Ok(out)
}
