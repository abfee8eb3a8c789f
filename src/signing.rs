//! SSH signatures for the git store, produced and checked inside rotd.
//!
//! Every commit rotd writes to its secrets repository can carry an SSH
//! signature in the `gpgsig` header, in exactly the format stock git writes
//! with `gpg.format=ssh` (the OpenSSH "sshsig" armor, namespace `git`,
//! SHA-512). Signing and verifying happen in-process with the RustCrypto
//! `ssh-key` crate, so rotd never shells out to `ssh-keygen` and never hands
//! key material to another program; yet `git verify-commit` and
//! `git log --show-signature` accept what rotd signs, and rotd accepts what
//! `git commit -S` signs.
//!
//! * [`Signer`] loads an unencrypted OpenSSH ed25519 private key (refusing a
//!   file other users can read) and signs data.
//! * [`AllowedSigners`] reads git's `gpg.ssh.allowedSignersFile` format and
//!   verifies signatures against it.
//! * [`commit`] and [`verify_commit`] do the same for git2 commits, moving a
//!   reference only by compare-and-swap so two writers cannot silently
//!   overwrite each other.

use std::fmt;
use std::path::{Path, PathBuf};

use ssh_key::{Fingerprint, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

/// The sshsig namespace git uses for commit and tag signatures.
pub const GIT_NAMESPACE: &str = "git";

/// Errors from loading keys, reading allowed-signers files and writing commits.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key or allowed-signers file could not be read.
    #[error(
        "Could not read {path}: {source}. Check that the file exists and that rotd may read it."
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a regular file, is too large, or (a key) is another user's.
    #[error(transparent)]
    File(crate::fsutil::Error),
    /// The private key file is readable by group or other users.
    #[error(
        "The signing key {path} is readable by other users (mode {mode:03o}). Restrict it with `chmod 600 {path}` and start rotd again."
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    /// The private key file is not an OpenSSH private key.
    #[error(
        "The signing key {path} is not a valid OpenSSH private key ({reason}). Provide a file that starts with \"-----BEGIN OPENSSH PRIVATE KEY-----\", or create a new key with `ssh-keygen -t ed25519 -N '' -f NEW_KEY_FILE` and point rotd at it."
    )]
    KeyParse { path: PathBuf, reason: String },
    /// The private key is protected by a passphrase.
    #[error(
        "The signing key {path} is encrypted with a passphrase, which rotd cannot prompt for. Use an unencrypted key kept with mode 600, e.g. remove the passphrase with `ssh-keygen -p -N '' -f {path}`."
    )]
    KeyEncrypted { path: PathBuf },
    /// The private key is not an ed25519 key.
    #[error(
        "The signing key {path} is a {algorithm} key, but rotd signs only with ed25519 keys. Create one with `ssh-keygen -t ed25519 -N '' -f NEW_KEY_FILE` and point rotd at it."
    )]
    KeyNotEd25519 { path: PathBuf, algorithm: String },
    /// Producing a signature failed.
    #[error("Signing with the key {fingerprint} failed: {reason}. Check the signing key file.")]
    Sign { fingerprint: String, reason: String },
    /// A line of an allowed-signers file is invalid.
    #[error("{source_name} line {line}: {reason}. Fix or remove this line (format: \"principal[,principal...] [options] ssh-ed25519 AAAA... [comment]\").")]
    AllowedSignersLine {
        source_name: String,
        line: usize,
        reason: String,
    },
    /// A git operation failed.
    #[error("Git could not {action}: {source}. Check the repository's state.")]
    Git {
        action: &'static str,
        #[source]
        source: git2::Error,
    },
    /// The reference moved between reading the parent and writing the commit.
    #[error(
        "The reference {refname} was expected to point at {expected} but points at {actual}; another writer changed it. The new commit {commit} was written but not published: re-read the reference and retry."
    )]
    RefChanged {
        refname: String,
        expected: String,
        actual: String,
        commit: git2::Oid,
    },
}

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The armored text is not a well-formed SSH signature.
    #[error("The signature is malformed ({0}); it is not an armored \"-----BEGIN SSH SIGNATURE-----\" block.")]
    Malformed(String),
    /// The signature was made for another namespace than `git`.
    #[error("The signature was made for namespace \"{found}\", not \"{expected}\"; it was not meant for git and is refused.")]
    WrongNamespace { expected: String, found: String },
    /// The key that signed is not in the allowed signers.
    #[error("The signature was made by the key {fingerprint}, which is not in the allowed signers. Add its public key to the allowed signers file if it should be trusted.")]
    NotAllowed { fingerprint: String },
    /// The key is listed, but its options (namespaces, validity) exclude this signature.
    #[error("The key {fingerprint} of {principal} is in the allowed signers but {reason}.")]
    KeyRestricted {
        fingerprint: String,
        principal: String,
        reason: String,
    },
    /// The key is allowed but the signature does not match the data.
    #[error("The signature by {principal} (key {fingerprint}) does not match the data: the data was changed after signing or the signature is corrupt.")]
    BadSignature {
        fingerprint: String,
        principal: String,
    },
    /// The signature uses an algorithm rotd cannot check.
    #[error("The signature by key {fingerprint} cannot be checked: {reason}. rotd verifies ed25519 signatures.")]
    Unsupported { fingerprint: String, reason: String },
    /// Reading the commit or its signature failed.
    #[error("Git could not read the signature of commit {oid}: {source}.")]
    Git {
        oid: git2::Oid,
        #[source]
        source: git2::Error,
    },
}

/// A successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The principals field of the matching allowed-signers line, as written.
    pub principal: String,
    /// The signing key's fingerprint, "SHA256:…".
    pub fingerprint: String,
}

/// An ed25519 signing key loaded from an OpenSSH private key file.
pub struct Signer {
    key: PrivateKey,
    public: PublicKey,
    fingerprint: String,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("fingerprint", &self.fingerprint)
            .field("comment", &self.public.comment())
            .finish_non_exhaustive()
    }
}

/// A file that cannot be read at all keeps its `Read` error; the other refusals
/// (a link, a special file, too large, another user's key) say so themselves.
fn file_error(e: crate::fsutil::Error) -> Error {
    match e {
        crate::fsutil::Error::Read { path, source } => Error::Read { path, source },
        e => Error::File(e),
    }
}

fn sha256_fingerprint(key: &ssh_key::public::KeyData) -> String {
    Fingerprint::new(HashAlg::Sha256, key).to_string()
}

impl Signer {
    /// Loads an unencrypted OpenSSH ed25519 private key
    /// ("-----BEGIN OPENSSH PRIVATE KEY-----").
    ///
    /// Refuses a file readable by group or other users, encrypted keys and
    /// keys of other algorithms.
    pub fn from_file(path: &Path) -> Result<Signer, Error> {
        let read_err = |source| Error::Read {
            path: path.to_path_buf(),
            source,
        };
        // Check the mode and owner of the very file that is read (a regular file,
        // never reached through a link), not of the path.
        let bytes = match crate::fsutil::read_private(path, crate::fsutil::MAX_KEY_FILE) {
            Ok(b) => b,
            Err(crate::fsutil::Error::TooOpen { mode, .. }) => {
                return Err(Error::KeyPermissions {
                    path: path.to_path_buf(),
                    mode,
                })
            }
            Err(e) => return Err(file_error(e)),
        };
        let text = zeroize::Zeroizing::new(
            String::from_utf8(bytes.to_vec())
                .map_err(|_| read_err(std::io::Error::from(std::io::ErrorKind::InvalidData)))?,
        );
        let key = PrivateKey::from_openssh(text.trim()).map_err(|e| Error::KeyParse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if key.is_encrypted() {
            return Err(Error::KeyEncrypted {
                path: path.to_path_buf(),
            });
        }
        if key.algorithm() != ssh_key::Algorithm::Ed25519 {
            return Err(Error::KeyNotEd25519 {
                path: path.to_path_buf(),
                algorithm: key.algorithm().to_string(),
            });
        }
        let public = key.public_key().clone();
        let fingerprint = sha256_fingerprint(public.key_data());
        Ok(Signer {
            key,
            public,
            fingerprint,
        })
    }

    /// The armored "-----BEGIN SSH SIGNATURE-----" signature over `data` with
    /// namespace "git" and sha512 — what `git commit -S` with
    /// `gpg.format=ssh` stores in the `gpgsig` header.
    pub fn sign(&self, data: &[u8]) -> Result<String, Error> {
        let sign_err = |e: ssh_key::Error| Error::Sign {
            fingerprint: self.fingerprint.clone(),
            reason: e.to_string(),
        };
        let sig = self
            .key
            .sign(GIT_NAMESPACE, HashAlg::Sha512, data)
            .map_err(sign_err)?;
        sig.to_pem(LineEnding::LF).map_err(sign_err)
    }

    /// The public key in OpenSSH format, "ssh-ed25519 AAAA… comment".
    pub fn public_key_openssh(&self) -> String {
        // Encoding an in-memory ed25519 key cannot fail; fall back to an
        // empty string rather than panic.
        self.public.to_openssh().unwrap_or_default()
    }

    /// The SHA-256 fingerprint of the public key, "SHA256:…".
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// A new ed25519 key from the system CSPRNG, as the text of an unencrypted
    /// OpenSSH private key file (what `ssh-keygen -t ed25519 -N ''` writes) and the
    /// public key line "ssh-ed25519 AAAA… comment". `rotd init` writes them when
    /// `store.signing_key` names a file that does not exist yet.
    pub fn generate(comment: &str) -> Result<(zeroize::Zeroizing<String>, String), Error> {
        let err = |reason: String| Error::Sign {
            fingerprint: "(a new key)".into(),
            reason,
        };
        // Filled in place, so the seed never sits in a buffer that is not zeroized.
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed[..])
            .map_err(|_| err("the system random number generator failed".into()))?;
        let pair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
        let key = PrivateKey::new(ssh_key::private::KeypairData::Ed25519(pair), comment)
            .map_err(|e| err(e.to_string()))?;
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| err(e.to_string()))?;
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|e| err(e.to_string()))?;
        Ok((text, public))
    }
}

/// One line of an allowed-signers file.
#[derive(Debug, Clone)]
struct Entry {
    principals: String,
    key: PublicKey,
    namespaces: Option<Vec<String>>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
}

/// The keys trusted to sign, in git's allowed signers format
/// (`gpg.ssh.allowedSignersFile`):
/// `principal[,principal…] [options] keytype base64key [comment]`, with
/// `#` comments and blank lines.
///
/// Options understood: `namespaces="git,…"` (the line only applies when one
/// pattern matches "git"), `valid-after=` and `valid-before=` (timestamps
/// `YYYYMMDD[HHMM[SS]][Z]`, read as UTC, checked against the signing time).
/// `cert-authority` is refused: rotd does not verify certificates.
#[derive(Debug, Clone, Default)]
pub struct AllowedSigners {
    entries: Vec<Entry>,
}

impl AllowedSigners {
    /// Reads and parses an allowed-signers file.
    pub fn from_file(path: &Path) -> Result<AllowedSigners, Error> {
        let text =
            crate::fsutil::read_text(path, crate::fsutil::MAX_LIST_FILE).map_err(file_error)?;
        Self::parse_named(&text, &path.display().to_string())
    }

    /// Parses allowed-signers text; errors name the line number.
    pub fn parse(text: &str) -> Result<AllowedSigners, Error> {
        Self::parse_named(text, "The allowed signers text")
    }

    fn parse_named(text: &str, source_name: &str) -> Result<AllowedSigners, Error> {
        let mut entries = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let entry = parse_line(line).map_err(|reason| Error::AllowedSignersLine {
                source_name: source_name.to_string(),
                line: idx + 1,
                reason,
            })?;
            entries.push(entry);
        }
        Ok(AllowedSigners { entries })
    }

    /// Adds the keys of `other` (e.g. this instance's own signing key, which is
    /// trusted whether or not the file lists it).
    pub fn extend(&mut self, other: AllowedSigners) {
        self.entries.extend(other.entries);
    }

    /// Number of keys listed.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is listed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Verifies an armored sshsig over `data` (namespace "git"), checking
    /// `valid-after`/`valid-before` against the current time.
    pub fn verify(&self, data: &[u8], armored_sig: &str) -> Result<Verified, VerifyError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.verify_at(data, armored_sig, now)
    }

    /// Like [`AllowedSigners::verify`], but checks `valid-after`/`valid-before`
    /// against `time` (seconds since the Unix epoch), as git does with the
    /// committer time.
    pub fn verify_at(
        &self,
        data: &[u8],
        armored_sig: &str,
        time: i64,
    ) -> Result<Verified, VerifyError> {
        let sig = SshSig::from_pem(armored_sig.trim().as_bytes())
            .map_err(|e| VerifyError::Malformed(e.to_string()))?;
        if sig.namespace() != GIT_NAMESPACE {
            return Err(VerifyError::WrongNamespace {
                expected: GIT_NAMESPACE.to_string(),
                found: sig.namespace().to_string(),
            });
        }
        let fingerprint = sha256_fingerprint(sig.public_key());
        let listed: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.key.key_data() == sig.public_key())
            .collect();
        let Some(first) = listed.first() else {
            return Err(VerifyError::NotAllowed { fingerprint });
        };
        let mut restriction = String::new();
        let entry = listed.iter().find(|e| {
            if let Some(ns) = &e.namespaces {
                if !ns.iter().any(|p| glob_match(p, GIT_NAMESPACE)) {
                    restriction = format!(
                        "only for the namespaces \"{}\", not \"{GIT_NAMESPACE}\"",
                        ns.join(",")
                    );
                    return false;
                }
            }
            if let Some(after) = e.valid_after {
                if time < after {
                    restriction = format!("is valid only after {}", fmt_time(after));
                    return false;
                }
            }
            if let Some(before) = e.valid_before {
                if time > before {
                    restriction = format!("was valid only before {}", fmt_time(before));
                    return false;
                }
            }
            true
        });
        let Some(entry) = entry else {
            return Err(VerifyError::KeyRestricted {
                fingerprint,
                principal: first.principals.clone(),
                reason: restriction,
            });
        };
        match entry.key.verify(GIT_NAMESPACE, data, &sig) {
            Ok(()) => Ok(Verified {
                principal: entry.principals.clone(),
                fingerprint,
            }),
            Err(ssh_key::Error::Crypto) => Err(VerifyError::BadSignature {
                fingerprint,
                principal: entry.principals.clone(),
            }),
            Err(e) => Err(VerifyError::Unsupported {
                fingerprint,
                reason: e.to_string(),
            }),
        }
    }
}

fn fmt_time(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

/// Splits off the next whitespace-separated field, keeping double-quoted
/// runs (which may hold spaces) together.
fn next_field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let mut in_quotes = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => return Some((&s[..i], &s[i..])),
            _ => {}
        }
    }
    Some((s, ""))
}

/// Splits on commas outside double quotes.
fn split_options(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut in_quotes = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn unquote(s: &str) -> Result<&str, String> {
    if let Some(inner) = s.strip_prefix('"') {
        inner
            .strip_suffix('"')
            .ok_or_else(|| format!("the quoted value {s} has no closing quote"))
    } else if s.contains('"') {
        Err(format!("misplaced quote in {s}"))
    } else {
        Ok(s)
    }
}

fn is_key_type(s: &str) -> bool {
    s.starts_with("ssh-")
        || s.starts_with("ecdsa-sha2-")
        || s.starts_with("sk-ssh-")
        || s.starts_with("sk-ecdsa-")
        || s.starts_with("rsa-sha2-")
}

fn parse_line(line: &str) -> Result<Entry, String> {
    let (principals, rest) = next_field(line).ok_or("the line is empty")?;
    if principals.matches('"').count() % 2 != 0 {
        return Err("the principals field has an unterminated quote".into());
    }
    let principals = unquote(principals)?.to_string();
    if principals.is_empty() {
        return Err("the principals field is empty".into());
    }
    let (second, mut rest) =
        next_field(rest).ok_or("a key type and public key must follow the principals")?;
    if second.matches('"').count() % 2 != 0 {
        return Err("the options field has an unterminated quote".into());
    }
    let mut namespaces = None;
    let mut valid_after = None;
    let mut valid_before = None;
    let key_type = if is_key_type(second) {
        second
    } else {
        for opt in split_options(second) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(unquote(v)?)),
                None => (opt, None),
            };
            match (name.to_ascii_lowercase().as_str(), value) {
                ("cert-authority", _) => {
                    return Err(
                        "the cert-authority option is not supported: rotd verifies plain keys only, list the signer's own public key instead"
                            .into(),
                    )
                }
                ("namespaces", Some(v)) => {
                    namespaces = Some(
                        v.split(',')
                            .map(|p| p.trim().to_string())
                            .filter(|p| !p.is_empty())
                            .collect(),
                    )
                }
                ("valid-after", Some(v)) => valid_after = Some(parse_timestamp(v)?),
                ("valid-before", Some(v)) => valid_before = Some(parse_timestamp(v)?),
                ("namespaces" | "valid-after" | "valid-before", None) => {
                    return Err(format!("the option {name} needs a value, like {name}=\"...\""))
                }
                _ => return Err(format!("unknown option \"{opt}\"")),
            }
        }
        let (kt, r) =
            next_field(rest).ok_or("a key type and public key must follow the options")?;
        rest = r;
        kt
    };
    let (b64, _comment) = next_field(rest)
        .ok_or_else(|| format!("the base64 public key after {key_type} is missing"))?;
    let key = PublicKey::from_openssh(&format!("{key_type} {b64}"))
        .map_err(|e| format!("the {key_type} public key cannot be decoded ({e})"))?;
    Ok(Entry {
        principals,
        key,
        namespaces,
        valid_after,
        valid_before,
    })
}

/// Parses OpenSSH's `YYYYMMDD[HHMM[SS]][Z]` timestamp as UTC.
fn parse_timestamp(v: &str) -> Result<i64, String> {
    let bad = || format!("the timestamp \"{v}\" is not in the form YYYYMMDD[HHMM[SS]][Z]");
    let digits = v.strip_suffix(['Z', 'z']).unwrap_or(v);
    if !digits.bytes().all(|b| b.is_ascii_digit()) || ![8, 12, 14].contains(&digits.len()) {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| digits.get(r).and_then(|s| s.parse::<u32>().ok());
    let year = num(0..4).ok_or_else(bad)?;
    let month = num(4..6).ok_or_else(bad)?;
    let day = num(6..8).ok_or_else(bad)?;
    let hour = if digits.len() >= 12 {
        num(8..10).ok_or_else(bad)?
    } else {
        0
    };
    let minute = if digits.len() >= 12 {
        num(10..12).ok_or_else(bad)?
    } else {
        0
    };
    let second = if digits.len() == 14 {
        num(12..14).ok_or_else(bad)?
    } else {
        0
    };
    let date = chrono::NaiveDate::from_ymd_opt(i32::try_from(year).map_err(|_| bad())?, month, day)
        .ok_or_else(bad)?;
    let t = date.and_hms_opt(hour, minute, second).ok_or_else(bad)?;
    Ok(t.and_utc().timestamp())
}

/// OpenSSH-style pattern match with `*` and `?`.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Creates a commit like `Repository::commit`, signed when `signer` is Some.
///
/// The commit buffer is built with `commit_create_buffer`, signed, and
/// written with `commit_signed(…, Some("gpgsig"))`. Then `update_ref` (e.g.
/// "HEAD" or "refs/heads/main"), if given, is moved to it: "HEAD" (and any
/// other symbolic reference) is resolved to the branch it names, even when
/// that branch is unborn. The move is a compare-and-swap against the first
/// parent (or "must not exist yet" for a root commit); when another writer
/// moved the reference first, [`Error::RefChanged`] is returned and the new
/// commit is left unreferenced.
#[allow(clippy::too_many_arguments)]
pub fn commit(
    repo: &git2::Repository,
    update_ref: Option<&str>,
    author: &git2::Signature,
    committer: &git2::Signature,
    message: &str,
    tree: &git2::Tree,
    parents: &[&git2::Commit],
    signer: Option<&Signer>,
) -> Result<git2::Oid, Error> {
    let git = |action: &'static str| move |source| Error::Git { action, source };
    let oid = match signer {
        Some(signer) => {
            let buf = repo
                .commit_create_buffer(author, committer, message, tree, parents)
                .map_err(git("build the commit"))?;
            let content = buf.as_str().ok_or_else(|| Error::Git {
                action: "build the commit",
                source: git2::Error::from_str("the commit text is not valid UTF-8"),
            })?;
            let signature = signer.sign(content.as_bytes())?;
            // git stores the armor without its final newline; libgit2 adds
            // the header's own line end.
            repo.commit_signed(content, signature.trim_end(), Some("gpgsig"))
                .map_err(git("write the signed commit"))?
        }
        None => repo
            .commit(None, author, committer, message, tree, parents)
            .map_err(git("write the commit"))?,
    };
    if let Some(name) = update_ref {
        let summary = message.lines().next().unwrap_or("");
        let log = if parents.is_empty() {
            format!("commit (initial): {summary}")
        } else {
            format!("commit: {summary}")
        };
        move_ref(repo, name, oid, parents.first().map(|c| c.id()), &log)?;
    }
    Ok(oid)
}

/// Follows symbolic references from `name` to the direct reference they end
/// at, which may not exist yet (an unborn branch).
fn resolve_ref_name(repo: &git2::Repository, name: &str) -> Result<String, Error> {
    let mut current = name.to_string();
    for _ in 0..10 {
        match repo.find_reference(&current) {
            Ok(r) if r.kind() == Some(git2::ReferenceType::Symbolic) => match r.symbolic_target() {
                Some(t) => current = t.to_string(),
                None => {
                    return Err(Error::Git {
                        action: "resolve the reference",
                        source: git2::Error::from_str("symbolic target is not UTF-8"),
                    })
                }
            },
            Ok(_) => return Ok(current),
            Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(current),
            Err(source) => {
                return Err(Error::Git {
                    action: "resolve the reference",
                    source,
                })
            }
        }
    }
    Err(Error::Git {
        action: "resolve the reference",
        source: git2::Error::from_str("too many levels of symbolic references"),
    })
}

fn move_ref(
    repo: &git2::Repository,
    name: &str,
    new: git2::Oid,
    expected: Option<git2::Oid>,
    log: &str,
) -> Result<(), Error> {
    let target = resolve_ref_name(repo, name)?;
    let result = match expected {
        Some(old) => repo.reference_matching(&target, new, true, old, log),
        None => repo.reference(&target, new, false, log),
    };
    match result {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.code(),
                git2::ErrorCode::Modified | git2::ErrorCode::Exists | git2::ErrorCode::NotFound
            ) =>
        {
            let actual = match repo.refname_to_id(&target) {
                Ok(id) => id.to_string(),
                Err(_) => "nothing (it does not exist)".to_string(),
            };
            Err(Error::RefChanged {
                refname: target,
                expected: expected
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "nothing (a new branch)".to_string()),
                actual,
                commit: new,
            })
        }
        Err(source) => Err(Error::Git {
            action: "update the reference",
            source,
        }),
    }
}

/// Reads a commit's `gpgsig` signature and signed data and verifies it
/// against `allowed`, with validity options checked at the committer time
/// (as git does). Returns `Ok(None)` when the commit is unsigned.
pub fn verify_commit(
    repo: &git2::Repository,
    oid: git2::Oid,
    allowed: &AllowedSigners,
) -> Result<Option<Verified>, VerifyError> {
    let git = |source| VerifyError::Git { oid, source };
    let commit_time = repo
        .find_commit(oid)
        .map_err(git)?
        .committer()
        .when()
        .seconds();
    let (sig, data) = match repo.extract_signature(&oid, None) {
        Ok(pair) => pair,
        Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(None),
        Err(e) => return Err(git(e)),
    };
    let sig = std::str::from_utf8(&sig)
        .map_err(|_| VerifyError::Malformed("the signature is not valid UTF-8".into()))?;
    allowed.verify_at(&data, sig, commit_time).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::private::{Ed25519Keypair, KeypairData};
    use std::os::unix::fs::PermissionsExt;

    /// Writes a deterministic test key (seeded with `seed`) with `mode`.
    fn key_file(dir: &Path, seed: u8, mode: u32) -> PathBuf {
        let pair = Ed25519Keypair::from_seed(&[seed; 32]);
        let key = PrivateKey::new(KeypairData::Ed25519(pair), format!("test{seed}@rotd")).unwrap();
        let path = dir.join(format!("key{seed}"));
        std::fs::write(&path, key.to_openssh(LineEnding::LF).unwrap().as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn signer(dir: &Path, seed: u8) -> Signer {
        Signer::from_file(&key_file(dir, seed, 0o600)).unwrap()
    }

    fn allowed_for(s: &Signer, principal: &str) -> AllowedSigners {
        AllowedSigners::parse(&format!("{principal} {}\n", s.public_key_openssh())).unwrap()
    }

    #[test]
    fn generated_keys_load_sign_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let (text, public) = Signer::generate("rotd@host").unwrap();
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert!(public.starts_with("ssh-ed25519 ") && public.ends_with(" rotd@host"));
        let path = dir.path().join("k");
        std::fs::write(&path, text.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Signer::from_file(&path).unwrap();
        assert_eq!(s.public_key_openssh(), public);
        let sig = s.sign(b"data").unwrap();
        let allowed = AllowedSigners::parse(&format!("p {public}\n")).unwrap();
        assert!(allowed.verify(b"data", &sig).is_ok());
        assert_ne!(
            Signer::generate("x").unwrap().1,
            Signer::generate("x").unwrap().1
        );
    }

    #[test]
    fn extend_adds_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (signer(dir.path(), 1), signer(dir.path(), 2));
        let mut allowed = allowed_for(&a, "a");
        let sig = b.sign(b"d").unwrap();
        assert!(allowed.verify(b"d", &sig).is_err());
        allowed.extend(allowed_for(&b, "b"));
        assert_eq!(allowed.len(), 2);
        assert_eq!(allowed.verify(b"d", &sig).unwrap().principal, "b");
    }

    #[test]
    fn sign_verify_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), 1);
        assert!(s.fingerprint().starts_with("SHA256:"));
        assert!(s.public_key_openssh().starts_with("ssh-ed25519 AAAA"));
        let sig = s.sign(b"hello rotd").unwrap();
        assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----\n"));
        assert!(sig.trim_end().ends_with("-----END SSH SIGNATURE-----"));
        let v = allowed_for(&s, "rotd@example.com")
            .verify(b"hello rotd", &sig)
            .unwrap();
        assert_eq!(v.principal, "rotd@example.com");
        assert_eq!(v.fingerprint, s.fingerprint());
    }

    #[test]
    fn debug_hides_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), 1);
        let dbg = format!("{s:?}");
        assert!(dbg.contains(&s.fingerprint()));
        let pem = std::fs::read_to_string(dir.path().join("key1")).unwrap();
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!dbg.contains(line));
        }
        assert!(!dbg.to_lowercase().contains("private"));
    }

    #[test]
    fn tampered_data_fails() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), 1);
        let sig = s.sign(b"hello rotd").unwrap();
        let err = allowed_for(&s, "a")
            .verify(b"hello rotD", &sig)
            .unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
        assert!(err.to_string().contains("changed"));
    }

    #[test]
    fn other_key_not_allowed_names_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = signer(dir.path(), 1);
        let b = signer(dir.path(), 2);
        let sig = b.sign(b"data").unwrap();
        let err = allowed_for(&a, "a").verify(b"data", &sig).unwrap_err();
        match &err {
            VerifyError::NotAllowed { fingerprint } => assert_eq!(fingerprint, &b.fingerprint()),
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains(&b.fingerprint()));
        assert!(err.to_string().contains("not in the allowed signers"));
    }

    #[test]
    fn wrong_namespace_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), 1);
        let sig = s
            .key
            .sign("file", HashAlg::Sha512, b"data")
            .unwrap()
            .to_pem(LineEnding::LF)
            .unwrap();
        let err = allowed_for(&s, "a").verify(b"data", &sig).unwrap_err();
        match err {
            VerifyError::WrongNamespace { expected, found } => {
                assert_eq!(expected, "git");
                assert_eq!(found, "file");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_signature() {
        let allowed = AllowedSigners::default();
        for bad in [
            "",
            "not a signature",
            "-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n",
        ] {
            let err = allowed.verify(b"x", bad).unwrap_err();
            assert!(matches!(err, VerifyError::Malformed(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn namespaces_option_filters() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), 1);
        let sig = s.sign(b"data").unwrap();
        let pk = s.public_key_openssh();
        let ok = AllowedSigners::parse(&format!("a namespaces=\"file,g*\" {pk}")).unwrap();
        assert_eq!(ok.verify(b"data", &sig).unwrap().principal, "a");
        let no = AllowedSigners::parse(&format!("a namespaces=\"file\" {pk}")).unwrap();
        let err = no.verify(b"data", &sig).unwrap_err();
        assert!(matches!(err, VerifyError::KeyRestricted { .. }), "{err}");
        // A second line for the same key that allows git wins.
        let both = AllowedSigners::parse(&format!(
            "a namespaces=\"file\" {pk}\nb,c namespaces=\"git\" {pk}"
        ))
        .unwrap();
        assert_eq!(both.verify(b"data", &sig).unwrap().principal, "b,c");
    }

    #[test]
    fn validity_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), 1);
        let sig = s.sign(b"data").unwrap();
        let pk = s.public_key_openssh();
        let a = AllowedSigners::parse(&format!(
            "a valid-after=\"20200101\",valid-before=\"20300101000000Z\" {pk}"
        ))
        .unwrap();
        assert!(a.verify_at(b"data", &sig, 1_700_000_000).is_ok());
        assert!(matches!(
            a.verify_at(b"data", &sig, 1_500_000_000),
            Err(VerifyError::KeyRestricted { .. })
        ));
        assert!(matches!(
            a.verify_at(b"data", &sig, 2_000_000_000),
            Err(VerifyError::KeyRestricted { .. })
        ));
    }

    #[test]
    fn allowed_signers_parse_comments_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), 1);
        let pk = s.public_key_openssh();
        let ok = AllowedSigners::parse(&format!(
            "# team keys\n\n  alice@example.com {pk}\n\"bob b,carol\" {pk} trailing comment\n"
        ))
        .unwrap();
        assert_eq!(ok.len(), 2);

        let cases = [
            (format!("# c\n\nalice {pk}\nbob\n"), 4, "key type"),
            (
                format!("alice {pk}\nbob ssh-ed25519 !!!notbase64\n"),
                2,
                "cannot be decoded",
            ),
            (format!("alice cert-authority {pk}\n"), 1, "cert-authority"),
            (
                format!("\n\n\nalice frobnicate {pk}\n"),
                4,
                "unknown option",
            ),
            (format!("alice valid-after=\"2020\" {pk}\n"), 1, "timestamp"),
            ("alice ssh-ed25519\n".to_string(), 1, "missing"),
            (format!("alice namespaces=\"git {pk}\n"), 1, "quote"),
        ];
        for (text, line, needle) in cases {
            let err = AllowedSigners::parse(&text).unwrap_err();
            let msg = err.to_string();
            match &err {
                Error::AllowedSignersLine { line: l, .. } => assert_eq!(*l, line, "{msg}"),
                other => panic!("unexpected {other:?}"),
            }
            assert!(msg.contains(&format!("line {line}:")), "{msg}");
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
    }

    #[test]
    fn allowed_signers_from_file_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allowed_signers");
        std::fs::write(&path, "bogus\n").unwrap();
        let msg = AllowedSigners::from_file(&path).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
        let missing = dir.path().join("missing");
        let msg = AllowedSigners::from_file(&missing).unwrap_err().to_string();
        assert!(msg.contains("missing"), "{msg}");
    }

    #[test]
    fn key_file_mode_checked() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let path = key_file(dir.path(), 3, mode);
            let err = Signer::from_file(&path).unwrap_err();
            assert!(
                matches!(err, Error::KeyPermissions { .. }),
                "{mode:o}: {err}"
            );
            assert!(
                err.to_string()
                    .contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
        }
        for mode in [0o600, 0o400] {
            assert!(Signer::from_file(&key_file(dir.path(), 3, mode)).is_ok());
        }
    }

    #[test]
    fn key_file_not_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, "hello").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = Signer::from_file(&path).unwrap_err();
        assert!(matches!(err, Error::KeyParse { .. }), "{err}");
        let err = Signer::from_file(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(err, Error::Read { .. }), "{err}");
    }

    #[test]
    fn glob() {
        assert!(glob_match("git", "git"));
        assert!(glob_match("g*", "git"));
        assert!(glob_match("*", "git"));
        assert!(glob_match("g?t", "git"));
        assert!(!glob_match("file", "git"));
        assert!(!glob_match("gi", "git"));
    }

    fn init_repo(dir: &Path) -> git2::Repository {
        let repo = git2::Repository::init(dir).unwrap();
        repo.set_head("refs/heads/main").unwrap();
        repo
    }

    fn empty_tree(repo: &git2::Repository) -> git2::Tree<'_> {
        let oid = repo.treebuilder(None).unwrap().write().unwrap();
        repo.find_tree(oid).unwrap()
    }

    #[test]
    fn commit_sign_verify_and_cas() {
        let dir = tempfile::tempdir().unwrap();
        let s = signer(dir.path(), 1);
        let repo = init_repo(&dir.path().join("repo"));
        let tree = empty_tree(&repo);
        let who = git2::Signature::now("rotd", "rotd@example.com").unwrap();
        let allowed = allowed_for(&s, "rotd@example.com");

        let c1 = commit(
            &repo,
            Some("HEAD"),
            &who,
            &who,
            "first",
            &tree,
            &[],
            Some(&s),
        )
        .unwrap();
        assert_eq!(repo.refname_to_id("refs/heads/main").unwrap(), c1);
        let v = verify_commit(&repo, c1, &allowed).unwrap().unwrap();
        assert_eq!(v.principal, "rotd@example.com");

        let p1 = repo.find_commit(c1).unwrap();
        let c2 = commit(
            &repo,
            Some("HEAD"),
            &who,
            &who,
            "second",
            &tree,
            &[&p1],
            None,
        )
        .unwrap();
        assert_eq!(repo.head().unwrap().target(), Some(c2));
        assert!(verify_commit(&repo, c2, &allowed).unwrap().is_none());

        // A writer still based on c1 must not overwrite c2.
        let err = commit(
            &repo,
            Some("HEAD"),
            &who,
            &who,
            "stale",
            &tree,
            &[&p1],
            Some(&s),
        )
        .unwrap_err();
        assert!(matches!(err, Error::RefChanged { .. }), "{err}");
        assert_eq!(repo.refname_to_id("refs/heads/main").unwrap(), c2);
        // A second root commit onto an existing branch is refused too.
        let err = commit(
            &repo,
            Some("refs/heads/main"),
            &who,
            &who,
            "root",
            &tree,
            &[],
            Some(&s),
        )
        .unwrap_err();
        assert!(matches!(err, Error::RefChanged { .. }), "{err}");

        // No ref update: commit exists, refs unchanged.
        let p2 = repo.find_commit(c2).unwrap();
        let c3 = commit(&repo, None, &who, &who, "loose", &tree, &[&p2], Some(&s)).unwrap();
        assert_eq!(repo.refname_to_id("refs/heads/main").unwrap(), c2);
        let other = AllowedSigners::default();
        assert!(matches!(
            verify_commit(&repo, c3, &other),
            Err(VerifyError::NotAllowed { .. })
        ));
    }
}
