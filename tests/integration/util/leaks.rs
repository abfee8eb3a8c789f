//! The secrets-hygiene check every test gets for free: when a [`TestEnv`] drops (and
//! the test has not already failed), every secret the store ever held — each version
//! of every `.age` blob in the store's and the remote's object databases, decrypted
//! with the daemon's identity — and its encoded forms (`base64(user:secret)` as in a
//! Basic header, `base64(id:key)` and `id:key` as in an ApiKey header) are searched
//! for in:
//! - everything rotd printed in this env (stdout and stderr at TRACE), plus any text
//!   the test recorded (metrics pages, socket answers), plus `rotd status --json`
//!   and `rotd history --json` run at the end;
//! - every other object in both git repositories (commit messages, trees, blobs that
//!   are not age files);
//! - every file under the env's root (daemon logs, Prometheus data, fixtures) except
//!   the store's `.git`, the bare remote, the store's own `.age` files, the deliver
//!   paths of the schedules in `schedules/`, and files the test declared with
//!   [`TestEnv::allow_holder`].
//!
//! It also fails on a rotd temp file (`.rotd-tmp-*`) left anywhere, and on an
//! identity file that group or others can access. A test that builds a store by
//! other means than rotd opts out with `skip_leak_check`; one that commits a
//! plaintext secret by hand sets `planted_leak_in_git`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use std::sync::atomic::Ordering::Relaxed;

use super::TestEnv;

/// Shorter strings are not searched: they could match by chance.
const MIN_LEN: usize = 10;
/// Larger files (none in these tests) are not read.
const MAX_FILE: u64 = 64 << 20;

impl TestEnv {
    /// Runs the check now (it also runs on drop).
    pub fn assert_no_secret_leaked(&self) {
        let Ok(keys) = rotd::store::Keys::load(&self.identity, None) else {
            return; // never initialised
        };
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&self.identity)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the identity file is group/world accessible: {mode:o}"
        );
        let mut secrets = BTreeSet::new();
        let mut haystacks: Vec<(String, Vec<u8>)> = Vec::new();
        for repo in [&self.store, &self.remote] {
            let Ok(r) = git2::Repository::open(repo) else {
                continue;
            };
            let odb = r.odb().unwrap();
            let mut ids = Vec::new();
            odb.foreach(|id| {
                ids.push(*id);
                true
            })
            .unwrap();
            for id in ids {
                let Ok(obj) = odb.read(id) else { continue };
                let data = obj.data();
                if data.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----") {
                    if let Ok(plain) = keys.decrypt(data, "leak check") {
                        if let Ok(rec) = rotd::store::Record::parse(&plain) {
                            let s = rec.secret.expose().to_owned();
                            if let Some(u) = rec.username() {
                                secrets.insert(STANDARD.encode(format!("{u}:{s}")));
                            }
                            if let Some(k) = rec.key_id() {
                                secrets.insert(STANDARD.encode(format!("{k}:{s}")));
                                secrets.insert(format!("{k}:{s}"));
                            }
                            secrets.insert(s);
                        }
                    }
                } else if !self.planted_leak_in_git.load(Relaxed) {
                    haystacks.push((
                        format!("git object {id} in {}", repo.display()),
                        data.to_vec(),
                    ));
                }
            }
        }
        let secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= MIN_LEN).collect();
        if secrets.is_empty() {
            return;
        }
        for (i, o) in self.outputs.lock().unwrap().iter().enumerate() {
            haystacks.push((format!("rotd output #{i}"), o.clone()));
        }
        // The read-only views, whatever state the test left.
        for args in [&["status", "--json"][..], &["history", "--json"][..]] {
            if let Ok(o) = self.cmd(args).stdin(std::process::Stdio::null()).output() {
                haystacks.push((format!("rotd {}", args.join(" ")), o.stdout));
                haystacks.push((format!("rotd {} (stderr)", args.join(" ")), o.stderr));
            }
        }
        let allowed = self.allowed_holders();
        let store_git = self.store.join(".git");
        for file in walk(self.dir.path()) {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            assert!(
                !name.starts_with(".rotd-tmp-"),
                "temp file left behind: {}",
                file.display()
            );
            if file.starts_with(&store_git)
                || file.starts_with(&self.remote)
                || (file.starts_with(&self.store) && name.ends_with(".age"))
                || allowed.iter().any(|a| a.matches(&file))
            {
                continue;
            }
            match std::fs::metadata(&file) {
                Ok(m) if m.is_file() && m.len() <= MAX_FILE => {}
                _ => continue,
            }
            if let Ok(bytes) = std::fs::read(&file) {
                haystacks.push((format!("file {}", file.display()), bytes));
            }
        }
        let ac = aho_corasick::AhoCorasick::new(&secrets).unwrap();
        for (what, bytes) in &haystacks {
            if let Some(m) = ac.find(bytes) {
                let at = m.start();
                let from = at.saturating_sub(80);
                let context = String::from_utf8_lossy(&bytes[from..at]);
                panic!(
                    "a secret (pattern #{} of {}) appears in {what} after: {context:?}",
                    m.pattern().as_usize(),
                    secrets.len()
                );
            }
        }
    }

    /// The deliver paths of the schedules (placeholders match one path component)
    /// and the files a test declared.
    fn allowed_holders(&self) -> Vec<Holder> {
        let mut out: Vec<Holder> = self
            .allowed
            .lock()
            .unwrap()
            .iter()
            .map(|p| Holder(p.to_string_lossy().into_owned()))
            .collect();
        for f in walk(&self.schedules) {
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            for line in text.lines() {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("path = \"") {
                    let p = rest.trim_end_matches('"');
                    let p = if Path::new(p).is_absolute() {
                        PathBuf::from(p)
                    } else {
                        self.schedules.join(p)
                    };
                    out.push(Holder(p.to_string_lossy().into_owned()));
                }
            }
        }
        out
    }
}

/// A path pattern: `{{...}}` matches any run of characters other than `/`.
struct Holder(String);

impl Holder {
    fn matches(&self, path: &Path) -> bool {
        glob(self.0.as_bytes(), path.to_string_lossy().as_bytes())
    }
}

fn glob(pat: &[u8], s: &[u8]) -> bool {
    if pat.starts_with(b"{{") {
        let Some(end) = pat.windows(2).position(|w| w == b"}}") else {
            return pat == s;
        };
        let rest = &pat[end + 2..];
        return (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| glob(rest, &s[i..]));
    }
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(a), Some(b)) if a == b => glob(&pat[1..], &s[1..]),
        _ => false,
    }
}

/// Every regular file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(walk(&p)),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
    out
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if !std::thread::panicking() && !self.skip_leak_check.load(Relaxed) {
            self.assert_no_secret_leaked();
        }
    }
}
