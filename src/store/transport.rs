//! How rotd reaches the store remote: the credentials it offers and, over SSH, the
//! check of the server's host key. Every fetch and push goes through [`Transport`]:
//! the rotator's branch, its read of the acknowledgements, an agent's clone and its
//! acknowledgement.
//!
//! **Host keys.** With `remote_known_hosts = PATH` (an OpenSSH `known_hosts` file),
//! the server's key must be listed there for the remote's host (and port): a missing
//! or different key refuses the connection before anything is sent or received, so a
//! machine in the middle gets neither the store's commits nor a push. Entries may be
//! plain (`git.internal`, `[git.internal]:2222`, comma-separated, `*`/`?` wildcards,
//! `!negation`) or hashed (`|1|salt|hash`, `ssh-keygen -H`); a `@revoked` entry whose
//! key the server presents refuses it; `@cert-authority` entries are not supported
//! and are skipped. Without the setting libgit2 applies its own rule: the user's
//! `~/.ssh/known_hosts`, and an unknown or different key is refused.
//!
//! The file is read at each connection (through [`crate::fsutil`]: no symlink, a
//! regular file, size-capped), so an edited file takes effect without a restart.

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::fsutil;

/// What a connection to the remote needs besides its URL.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    /// The remote's URL, as configured (its host and port are what the key is
    /// looked up for).
    pub url: String,
    /// Private key offered to an SSH remote.
    pub ssh_key: Option<PathBuf>,
    /// File holding a token, offered as the password of an HTTPS remote.
    pub token_file: Option<PathBuf>,
    /// OpenSSH `known_hosts` file the SSH server's key must be in.
    pub known_hosts: Option<PathBuf>,
}

impl Transport {
    /// The callbacks for one fetch or push.
    pub fn callbacks<'cb>(&self) -> git2::RemoteCallbacks<'cb> {
        let mut cb = git2::RemoteCallbacks::new();
        let ssh_key = self.ssh_key.clone();
        let token_file = self.token_file.clone();
        let mut tries = 0;
        cb.credentials(move |_url, username, allowed| {
            tries += 1;
            if tries > 3 {
                return Err(git2::Error::from_str(
                    "remote refused the configured credentials",
                ));
            }
            if allowed.contains(git2::CredentialType::SSH_KEY) {
                if let Some(k) = &ssh_key {
                    return git2::Cred::ssh_key(username.unwrap_or("git"), None, k, None);
                }
            }
            if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
                if let Some(t) = &token_file {
                    let token = fsutil::read_text(t, fsutil::MAX_KEY_FILE)
                        .map(zeroize::Zeroizing::new)
                        .map_err(|e| {
                            git2::Error::from_str(&format!(
                                "cannot read remote_token_file {}: {e}",
                                t.display()
                            ))
                        })?;
                    return git2::Cred::userpass_plaintext(
                        username.unwrap_or("rotd"),
                        token.trim(),
                    );
                }
            }
            git2::Cred::default()
        });
        if let Some(file) = self.known_hosts.clone() {
            let url = self.url.clone();
            cb.certificate_check(move |cert, hostname| {
                let Some(hk) = cert.as_hostkey() else {
                    // TLS: the system's certificate check stands.
                    return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
                };
                let (host, port) =
                    host_and_port(&url).unwrap_or_else(|| (hostname.to_owned(), 22));
                let key = hk.hostkey().unwrap_or_default();
                let kind = hk.hostkey_type().map(|t| t.name()).unwrap_or("unknown");
                match check(&file, &host, port, kind, key) {
                    Ok(()) => Ok(git2::CertificateCheckStatus::CertificateOk),
                    Err(message) => {
                        tracing::error!(host = %host, port, known_hosts = %file.display(), "{message}");
                        Err(git2::Error::new(
                            git2::ErrorCode::Certificate,
                            git2::ErrorClass::Ssh,
                            message,
                        ))
                    }
                }
            });
        }
        cb
    }
}

/// What a push of one refspec did.
pub struct Pushed {
    /// The remote's refusal of the ref (its reason, then what its hooks printed).
    pub rejected: Option<String>,
    pub result: Result<(), git2::Error>,
}

impl Transport {
    /// Pushes `spec` to `remote`. A refusal carries what the server printed (an
    /// update hook's reason, e.g. "web-1 may not update refs/heads/main"), made one
    /// line of printable text, every credential in use redacted, cut at 500 bytes.
    pub fn push(&self, remote: &mut git2::Remote<'_>, spec: &str) -> Pushed {
        let rejected = std::cell::RefCell::new(None::<String>);
        let said = std::cell::RefCell::new(String::new());
        let result = {
            let mut cb = self.callbacks();
            cb.push_update_reference(|_refname, status| {
                if let Some(s) = status {
                    *rejected.borrow_mut() = Some(s.to_owned());
                }
                Ok(())
            });
            cb.sideband_progress(|data| {
                heard(&mut said.borrow_mut(), data);
                true
            });
            let mut opts = git2::PushOptions::new();
            opts.remote_callbacks(cb);
            remote.push(&[spec], Some(&mut opts))
        };
        let said = self.quotable(&said.into_inner());
        let rejected = rejected.into_inner().map(|r| {
            if said.is_empty() {
                r
            } else {
                format!("{r}; the remote said: {said}")
            }
        });
        Pushed { rejected, result }
    }
}

impl Transport {
    /// What the server printed, fit to quote in an error: every credential in use
    /// redacted (the process's registered ones, and the remote token, which a hostile
    /// server could echo back), then cut to [`QUOTED`] bytes.
    fn quotable(&self, said: &str) -> String {
        let mut needles = crate::redact::live();
        if let Some(t) = &self.token_file {
            if let Ok(token) = fsutil::read_text(t, fsutil::MAX_KEY_FILE) {
                let token = crate::secret::Secret::new(token.trim().to_owned());
                needles.add(&token, None);
            }
        }
        needles.cut(said, QUOTED)
    }
}

/// How much of what a server printed is quoted in an error.
const QUOTED: usize = 500;

/// Appends what the server printed to `said`: printable text, lines joined by
/// "; ", at most 2,000 characters (redacted and cut to [`QUOTED`] afterwards).
fn heard(said: &mut String, data: &[u8]) {
    const MAX: usize = 2_000;
    for line in String::from_utf8_lossy(data).split(['\n', '\r']) {
        let line: String = line
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let line = line.trim();
        if line.is_empty() || said.chars().count() >= MAX {
            continue;
        }
        if !said.is_empty() {
            said.push_str("; ");
        }
        let room = MAX.saturating_sub(said.chars().count());
        said.extend(line.chars().take(room));
    }
}

/// Host and port of an `ssh://[user@]host[:port]/path` or scp-like
/// `[user@]host:path` URL (None for anything else).
pub fn host_and_port(url: &str) -> Option<(String, u16)> {
    let (rest, scp) = match url.split_once("://") {
        Some(("ssh" | "ssh+git" | "git+ssh", rest)) => (rest, false),
        Some(_) => return None,
        None => (url, true),
    };
    let authority = if scp {
        rest.split_once(':')?.0
    } else {
        rest.split('/').next()?
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if scp {
        return Some((authority.to_owned(), 22));
    }
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => 22,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), 22)),
    }
}

/// Checks the key `kind` + `key` (the raw SSH public-key blob) the server at
/// `host:port` presented against the known-hosts `file`; the error says what is
/// wrong and what to do.
pub fn check(file: &Path, host: &str, port: u16, kind: &str, key: &[u8]) -> Result<(), String> {
    let text = fsutil::read_text(file, fsutil::MAX_LIST_FILE)
        .map_err(|e| format!("cannot read remote_known_hosts {}: {e}", file.display()))?;
    let name = if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    };
    let mut listed = false;
    for line in text.lines() {
        let Some(entry) = Entry::parse(line) else {
            continue;
        };
        if !entry.matches(&name) {
            continue;
        }
        let same = entry.kind == kind && entry.key == key;
        match entry.marker {
            Marker::Revoked if same => {
                return Err(format!(
                    "the SSH host key of {name} is marked @revoked in {}; nothing was fetched or pushed",
                    file.display()
                ))
            }
            Marker::Revoked | Marker::CertAuthority => {}
            Marker::None if same => return Ok(()),
            Marker::None => listed = true,
        }
    }
    if listed {
        Err(format!(
            "the SSH host key of {name} ({kind}) is not the one {} lists for it: someone may be in the middle; nothing was fetched or pushed. If the server's key really changed, check it out of band and replace the line",
            file.display()
        ))
    } else {
        Err(format!(
            "{name} is not in {}; nothing was fetched or pushed. Add its key after checking it out of band, e.g. `ssh-keyscan -p {port} {host} >> {}`",
            file.display(),
            file.display()
        ))
    }
}

#[derive(Debug, PartialEq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// One line of a known-hosts file.
struct Entry<'a> {
    marker: Marker,
    hosts: &'a str,
    kind: &'a str,
    key: Vec<u8>,
}

impl<'a> Entry<'a> {
    fn parse(line: &'a str) -> Option<Entry<'a>> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut fields = line.split_ascii_whitespace();
        let mut first = fields.next()?;
        let marker = match first {
            "@revoked" => Marker::Revoked,
            "@cert-authority" => Marker::CertAuthority,
            m if m.starts_with('@') => return None,
            _ => Marker::None,
        };
        if marker != Marker::None {
            first = fields.next()?;
        }
        let kind = fields.next()?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(fields.next()?)
            .ok()?;
        Some(Entry {
            marker,
            hosts: first,
            kind,
            key,
        })
    }

    /// Whether the entry's host patterns name `name` (`host` or `[host]:port`): a
    /// hashed entry, or any pattern matching with none of the negated ones.
    fn matches(&self, name: &str) -> bool {
        if let Some(hashed) = self.hosts.strip_prefix("|1|") {
            return hashed_matches(hashed, name);
        }
        let mut any = false;
        for p in self.hosts.split(',') {
            if let Some(neg) = p.strip_prefix('!') {
                if glob(neg, name) {
                    return false;
                }
            } else if glob(p, name) {
                any = true;
            }
        }
        any
    }
}

/// `|1|SALT|HASH`: HASH = HMAC-SHA1(SALT, name), both base64.
fn hashed_matches(hashed: &str, name: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    ring::hmac::verify(&key, name.as_bytes(), &hash).is_ok()
}

/// OpenSSH's pattern match: `*` any run, `?` one character; case-insensitive.
fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let n: Vec<char> = name.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const KEY_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIB5SbGZa8k1o5Xa8MqlxJ0Q8Jf7nQh2a3b4c5d6e7f8g";

    fn raw(k: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(k).unwrap()
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_hosts");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn what_the_server_prints_is_kept_as_one_bounded_line() {
        let mut said = String::new();
        heard(
            &mut said,
            b"rotd store: web-1 may not update refs/heads/main\n",
        );
        heard(&mut said, b"\x1b[31mred\x07\r\n");
        assert_eq!(
            said,
            "rotd store: web-1 may not update refs/heads/main; [31mred"
        );
        heard(&mut said, &[b'x'; 3000]);
        assert_eq!(said.chars().count(), 2_000);
    }

    #[test]
    fn a_token_the_server_echoes_is_not_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "glpat-s3cr3tT0kenValue0123\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = Transport {
            token_file: Some(token_file),
            ..Transport::default()
        };
        let mut said = String::new();
        heard(&mut said, b"denied for token glpat-s3cr3tT0kenValue0123\n");
        let q = t.quotable(&said);
        assert!(!q.contains("s3cr3t"), "{q}");
        assert!(q.starts_with("denied for token"), "{q}");
        assert!(t.quotable(&"y".repeat(2_000)).len() <= QUOTED + "…".len());
    }

    #[test]
    fn urls_give_the_host_and_port_the_key_is_looked_up_for() {
        let hp = |u: &str| host_and_port(u);
        assert_eq!(
            hp("ssh://git@git.internal/ops/s.git"),
            Some(("git.internal".into(), 22))
        );
        assert_eq!(
            hp("ssh://git@127.0.0.1:2222/s.git"),
            Some(("127.0.0.1".into(), 2222))
        );
        assert_eq!(hp("ssh://[::1]:2222/s.git"), Some(("::1".into(), 2222)));
        assert_eq!(
            hp("git@github.com:ops/s.git"),
            Some(("github.com".into(), 22))
        );
        assert_eq!(hp("https://git.internal/s.git"), None);
    }

    #[test]
    fn a_listed_key_passes_and_a_different_unknown_or_revoked_one_is_refused() {
        let ed = "ssh-ed25519";
        let (_d, p) = file(&format!(
            "# comment\n[127.0.0.1]:2222,other ssh-ed25519 {KEY_A}\n@cert-authority *.internal ssh-ed25519 {KEY_B}\ngit.internal ssh-ed25519 {KEY_B}\n"
        ));
        assert_eq!(check(&p, "127.0.0.1", 2222, ed, &raw(KEY_A)), Ok(()));
        let mitm = check(&p, "127.0.0.1", 2222, ed, &raw(KEY_B)).unwrap_err();
        assert!(
            mitm.contains("is not the one") && mitm.contains("[127.0.0.1]:2222"),
            "{mitm}"
        );
        // The port is part of the name: the same host on port 22 is unknown.
        let unknown = check(&p, "127.0.0.1", 22, ed, &raw(KEY_A)).unwrap_err();
        assert!(
            unknown.contains("is not in") && unknown.contains("ssh-keyscan"),
            "{unknown}"
        );
        // A @cert-authority line is not a host key.
        assert!(check(&p, "x.internal", 22, ed, &raw(KEY_B)).is_err());
        assert_eq!(check(&p, "git.internal", 22, ed, &raw(KEY_B)), Ok(()));
        assert!(
            check(&p, "git.internal", 22, "ssh-rsa", &raw(KEY_B)).is_err(),
            "the type counts"
        );

        let (_d, p) = file(&format!(
            "*.internal,!bad.internal ssh-ed25519 {KEY_A}\n@revoked * ssh-ed25519 {KEY_B}\n"
        ));
        assert_eq!(check(&p, "git.internal", 22, ed, &raw(KEY_A)), Ok(()));
        assert!(
            check(&p, "bad.internal", 22, ed, &raw(KEY_A)).is_err(),
            "negated"
        );
        let revoked = check(&p, "git.internal", 22, ed, &raw(KEY_B)).unwrap_err();
        assert!(revoked.contains("@revoked"), "{revoked}");
    }

    #[test]
    fn hashed_entries_match_their_host_only() {
        // `ssh-keygen -H` form: |1|base64(salt)|base64(HMAC-SHA1(salt, name)).
        let salt = b"0123456789abcdefghij";
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
        let tag = ring::hmac::sign(&key, b"[127.0.0.1]:2222");
        let b64 = base64::engine::general_purpose::STANDARD;
        let (_d, p) = file(&format!(
            "|1|{}|{} ssh-ed25519 {KEY_A}\n",
            b64.encode(salt),
            b64.encode(tag.as_ref())
        ));
        assert_eq!(
            check(&p, "127.0.0.1", 2222, "ssh-ed25519", &raw(KEY_A)),
            Ok(())
        );
        assert!(check(&p, "127.0.0.2", 2222, "ssh-ed25519", &raw(KEY_A)).is_err());
    }

    #[test]
    fn a_symlinked_known_hosts_file_is_refused() {
        let (d, p) = file(&format!("git.internal ssh-ed25519 {KEY_A}\n"));
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = check(&link, "git.internal", 22, "ssh-ed25519", &raw(KEY_A)).unwrap_err();
        assert!(e.contains("cannot read remote_known_hosts"), "{e}");
    }
}
