//! age encryption for the store: the daemon's identity, the recipients, ASCII armor.
//!
//! Every secret is encrypted to every recipient in the recipients file plus the
//! daemon's own X25519 identity, so the daemon can always read back what it wrote and
//! each listed person (age X25519 or ssh-ed25519/ssh-rsa key) can decrypt with stock
//! `age`. A secret that has consumers (`consumers` of its schedule, DESIGN §7) is
//! also encrypted to those hosts' recipients, and to no other host
//! ([`Keys::encrypt_to`]); [`stanzas`] reads back how many recipients a file was
//! encrypted to, for `rotd verify`. The identity file is refused if it is not a regular file (a link
//! included), if another user owns it, or if group or others can read it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use ring::digest;
use zeroize::Zeroizing;

use crate::fsutil;

/// Keys could not be loaded, or encryption failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] fsutil::Error),
    #[error("identity file {0} holds no AGE-SECRET-KEY line; run `rotd init` to create one, or point store.identity at an age-keygen identity")]
    NoIdentity(PathBuf),
    #[error("identity file {path}: line {line} is not a valid age identity")]
    BadIdentity { path: PathBuf, line: usize },
    #[error("recipients file {path}: line {line} is not an age1… or ssh-ed25519/ssh-rsa public key ({reason}); fix or remove that line")]
    BadRecipient {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("host {host}: its recipient is not an age1… or ssh-ed25519 public key; fix [hosts.{host}] in rotd.toml (`rotd check` shows the line)")]
    BadHostRecipient { host: String },
    #[error("cannot read the age header of {what}: {reason}")]
    Header { what: String, reason: String },
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    #[error("cannot decrypt {what}: {reason}")]
    Decrypt { what: String, reason: String },
}

/// One recipient line, kept with its text for `.age-recipients`.
pub struct Recipient {
    pub text: String,
    inner: Box<dyn age::Recipient + Send + Sync>,
}

/// The daemon's identity and the recipients every secret is encrypted to.
pub struct Keys {
    identity: age::x25519::Identity,
    recipients: Vec<Recipient>,
    fingerprint_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("identity", &self.identity.to_public().to_string())
            .field(
                "recipients",
                &self.recipients.iter().map(|r| &r.text).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keys {
    /// Loads the identity (refusing an open file) and the optional recipients file.
    pub fn load(identity: &Path, recipients: Option<&Path>) -> Result<Keys, Error> {
        // A regular file of this user's that only it can read: checked on the file
        // that is read, which is never reached through a link.
        let bytes = fsutil::read_private(identity, fsutil::MAX_KEY_FILE)?;
        let text = Zeroizing::new(
            String::from_utf8(bytes.to_vec())
                .map_err(|_| Error::NoIdentity(identity.to_owned()))?,
        );
        let mut found = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.starts_with("AGE-SECRET-KEY-") {
                found = Some(age::x25519::Identity::from_str(line).map_err(|_| {
                    Error::BadIdentity {
                        path: identity.to_owned(),
                        line: i + 1,
                    }
                })?);
                break;
            }
        }
        let identity_key = found.ok_or_else(|| Error::NoIdentity(identity.to_owned()))?;
        let secret_text = identity_key.to_string();
        let fingerprint_key = {
            let mut ctx = digest::Context::new(&digest::SHA256);
            ctx.update(b"rotd fingerprint key v1\0");
            ctx.update(secret_text.expose_secret().as_bytes());
            Zeroizing::new(ctx.finish().as_ref().to_vec())
        };
        let mut recips = vec![parse_recipient(
            &identity_key.to_public().to_string(),
            identity,
            0,
        )?];
        if let Some(path) = recipients {
            let text = String::from_utf8_lossy(&fsutil::read_capped(path, fsutil::MAX_LIST_FILE)?)
                .into_owned();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let r = parse_recipient(line, path, i + 1)?;
                if !recips.iter().any(|x| x.text == r.text) {
                    recips.push(r);
                }
            }
        }
        Ok(Keys {
            identity: identity_key,
            recipients: recips,
            fingerprint_key,
        })
    }

    /// A new X25519 identity in age-keygen's file format.
    pub fn generate_identity_file() -> (Zeroizing<String>, String) {
        let id = age::x25519::Identity::generate();
        let public = id.to_public().to_string();
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let text = Zeroizing::new(format!(
            "# created: {created}\n# public key: {public}\n{}\n",
            id.to_string().expose_secret()
        ));
        (text, public)
    }

    pub fn public_key(&self) -> String {
        self.identity.to_public().to_string()
    }

    /// The recipient lines, daemon first: the content of `.age-recipients`.
    pub fn recipients_file(&self) -> String {
        let mut s = String::new();
        for r in &self.recipients {
            s.push_str(&r.text);
            s.push('\n');
        }
        s
    }

    pub fn fingerprint_key(&self) -> &[u8] {
        &self.fingerprint_key
    }

    /// Encrypts to every recipient, ASCII-armored.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        self.encrypt_to(plaintext, &[])
    }

    /// The recipients a file is encrypted to: the daemon and the global recipients,
    /// then each of `extra` (a secret's consumers) not already among them.
    pub fn recipient_set<'a>(&'a self, extra: &'a [Recipient]) -> Vec<&'a Recipient> {
        let mut set: Vec<&Recipient> = self.recipients.iter().collect();
        for r in extra {
            if !set.iter().any(|x| x.text == r.text) {
                set.push(r);
            }
        }
        set
    }

    /// Encrypts to every recipient and to `extra` (a secret's consumers), ASCII-armored.
    pub fn encrypt_to(&self, plaintext: &[u8], extra: &[Recipient]) -> Result<Vec<u8>, Error> {
        let enc = age::Encryptor::with_recipients(
            self.recipient_set(extra)
                .into_iter()
                .map(|r| r.inner.as_ref() as &dyn age::Recipient),
        )
        .map_err(|e| Error::Encrypt(e.to_string()))?;
        let mut out = Vec::with_capacity(plaintext.len() + 512);
        let armored =
            age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
                .map_err(|e| Error::Encrypt(e.to_string()))?;
        let mut w = enc
            .wrap_output(armored)
            .map_err(|e| Error::Encrypt(e.to_string()))?;
        w.write_all(plaintext)
            .map_err(|e| Error::Encrypt(e.to_string()))?;
        w.finish()
            .and_then(|a| a.finish())
            .map_err(|e| Error::Encrypt(e.to_string()))?;
        Ok(out)
    }

    /// Decrypts an (armored or binary) age file with the daemon's identity.
    pub fn decrypt(&self, ciphertext: &[u8], what: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
        let fail = |reason: String| Error::Decrypt {
            what: what.to_owned(),
            reason,
        };
        let dec = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(ciphertext))
            .map_err(|e| fail(e.to_string()))?;
        let mut r = dec
            .decrypt(std::iter::once(&self.identity as &dyn age::Identity))
            .map_err(|e| fail(e.to_string()))?;
        let mut out = Zeroizing::new(Vec::new());
        r.read_to_end(&mut out).map_err(|e| fail(e.to_string()))?;
        Ok(out)
    }
}

/// The SSH public key of a recipient line, checked before age sees it: age's parser
/// panics on some malformed RSA keys (an empty modulus, found by the `recipients` fuzz
/// target), and a key shorter than 2048 bits protects nothing.
fn check_ssh_recipient(line: &str) -> Result<(), String> {
    let key = ssh_key::PublicKey::from_openssh(line)
        .map_err(|e| format!("not an OpenSSH public key line: {e}"))?;
    match key.key_data() {
        ssh_key::public::KeyData::Ed25519(_) => Ok(()),
        ssh_key::public::KeyData::Rsa(rsa) => {
            let bits = rsa.n.as_positive_bytes().map_or(0, |n| n.len() * 8);
            if rsa.e.as_positive_bytes().is_none() || bits < 2048 {
                return Err(format!(
                    "an ssh-rsa key needs a modulus of at least 2048 bits (this one has {bits}); use ssh-ed25519"
                ));
            }
            Ok(())
        }
        other => Err(format!(
            "age encrypts to ssh-ed25519 and ssh-rsa keys only, not {}",
            other.algorithm()
        )),
    }
}

impl Recipient {
    /// A host's recipient (`[hosts.NAME] recipient`, checked when the config loaded).
    pub fn for_host(host: &str, line: &str) -> Result<Recipient, Error> {
        parse_recipient(line.trim(), Path::new("rotd.toml"), 0).map_err(|_| {
            Error::BadHostRecipient {
                host: host.to_owned(),
            }
        })
    }

    /// The tag an `ssh-ed25519`/`ssh-rsa` stanza carries for this recipient (age's
    /// spec: the first 4 bytes of SHA-256 of the SSH public key, base64); None for an
    /// X25519 recipient, whose stanza does not name it.
    pub fn ssh_tag(&self) -> Option<String> {
        use base64::Engine as _;
        let mut fields = self.text.split_whitespace();
        let kind = fields.next()?;
        if !kind.starts_with("ssh-") {
            return None;
        }
        let wire = base64::engine::general_purpose::STANDARD
            .decode(fields.next()?)
            .ok()?;
        let hash = digest::digest(&digest::SHA256, &wire);
        Some(base64::engine::general_purpose::STANDARD_NO_PAD.encode(&hash.as_ref()[..4]))
    }
}

impl Recipient {
    /// The stanza age writes for this recipient (what [`stanzas`] reads back).
    pub fn stanza(&self) -> Stanza {
        let kind = if self.text.starts_with("age1") {
            "X25519"
        } else {
            self.text.split_whitespace().next().unwrap_or_default()
        };
        Stanza {
            kind: kind.to_owned(),
            tag: self.ssh_tag(),
        }
    }
}

/// One recipient stanza of an age file's header: its type and, for SSH stanzas, the
/// key tag.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stanza {
    pub kind: String,
    pub tag: Option<String>,
}

/// The recipient stanzas of an (armored or binary) age file, in order. Only the
/// kinds rotd encrypts to are returned (`X25519`, `ssh-ed25519`, `ssh-rsa`): age
/// implementations may add "grease" stanzas of random kinds, which name nobody.
pub fn stanzas(ciphertext: &[u8], what: &str) -> Result<Vec<Stanza>, Error> {
    /// A header is a few hundred bytes a recipient; this bounds a hostile file.
    const MAX_HEADER: usize = 1 << 20;
    let fail = |reason: &str| Error::Header {
        what: what.to_owned(),
        reason: reason.to_owned(),
    };
    let mut r = age::armor::ArmoredReader::new(ciphertext);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = r.read(&mut buf).map_err(|e| fail(&e.to_string()))?;
        if n == 0 {
            return Err(fail("the header has no `---` line"));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(5).position(|w| w == b"\n--- ") {
            break i;
        }
        if head.len() > MAX_HEADER {
            return Err(fail("the header is longer than 1 MiB"));
        }
    };
    let text = std::str::from_utf8(&head[..end]).map_err(|_| fail("the header is not text"))?;
    let mut lines = text.lines();
    if lines.next() != Some("age-encryption.org/v1") {
        return Err(fail("not an age v1 file"));
    }
    Ok(lines
        .filter_map(|l| l.strip_prefix("-> "))
        .filter_map(|l| {
            let mut args = l.split(' ');
            let kind = args.next()?;
            match kind {
                "X25519" => Some(Stanza {
                    kind: kind.to_owned(),
                    tag: None,
                }),
                "ssh-ed25519" | "ssh-rsa" => Some(Stanza {
                    kind: kind.to_owned(),
                    tag: args.next().map(str::to_owned),
                }),
                _ => None,
            }
        })
        .collect())
}

fn parse_recipient(line: &str, path: &Path, lineno: usize) -> Result<Recipient, Error> {
    let bad = |reason: String| Error::BadRecipient {
        path: path.to_owned(),
        line: lineno,
        reason,
    };
    let inner: Box<dyn age::Recipient + Send + Sync> = if line.starts_with("age1") {
        Box::new(age::x25519::Recipient::from_str(line).map_err(|e| bad(e.to_string()))?)
    } else if line.starts_with("ssh-") {
        check_ssh_recipient(line).map_err(bad)?;
        Box::new(age::ssh::Recipient::from_str(line).map_err(|e| bad(format!("{e:?}")))?)
    } else {
        return Err(bad("unknown key type".into()));
    };
    Ok(Recipient {
        text: line.to_owned(),
        inner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x25519() -> Recipient {
        let id = age::x25519::Identity::generate();
        Recipient::for_host("h", &id.to_public().to_string()).expect("a valid recipient")
    }

    #[test]
    fn the_stanzas_read_back_are_those_of_the_recipients_encrypted_to() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (text, _) = Keys::generate_identity_file();
        let id = dir.path().join("id");
        crate::fsutil::write_atomic(&id, text.as_bytes(), 0o600).expect("identity written");
        let keys = Keys::load(&id, None).expect("keys");
        let (_, ssh_pub) = crate::signing::Signer::generate("host@x").expect("an ssh key");
        let ssh = Recipient::for_host("h", &ssh_pub).expect("an ssh recipient");
        let extra = [x25519(), ssh];
        let file = keys.encrypt_to(b"value\n", &extra).expect("encrypted");
        let mut found = stanzas(&file, "f").expect("a header");
        let mut want: Vec<Stanza> = keys
            .recipient_set(&extra)
            .iter()
            .map(|r| r.stanza())
            .collect();
        found.sort();
        want.sort();
        assert_eq!(found, want);
        assert_eq!(found.len(), 3);
        assert!(found
            .iter()
            .any(|s| s.kind == "ssh-ed25519" && s.tag.is_some()));
        // The daemon still decrypts; a consumer given twice is one stanza.
        assert_eq!(
            keys.decrypt(&file, "f").expect("decrypts").as_slice(),
            b"value\n"
        );
        let twice = [extra[0].clone_for_test(), extra[0].clone_for_test()];
        let file = keys.encrypt_to(b"v", &twice).expect("encrypted");
        assert_eq!(stanzas(&file, "f").expect("a header").len(), 2);
    }

    #[test]
    fn a_file_that_is_not_age_has_no_stanzas() {
        assert!(stanzas(b"not age at all\n", "f").is_err());
        assert!(stanzas(b"age-encryption.org/v1\n-> X25519 abc\n", "f").is_err());
    }

    impl Recipient {
        fn clone_for_test(&self) -> Recipient {
            Recipient::for_host("h", &self.text).expect("valid")
        }
    }
}
