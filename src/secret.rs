//! Secret values: a redacting newtype, generation from the system CSPRNG, and the
//! keyed fingerprint that stands for a secret in commits and output.
//!
//! Why a newtype: every credential rotd handles passes through [`Secret`], whose
//! `Debug` and `Display` print `**REDACTED**`, and whose buffer is zeroized on drop.
//! The only way to the bytes is [`Secret::expose`], and it is called in a handful of
//! places that must (encryption, bcrypt, templates, HTTP auth) — grep for it.
//!
//! Generation uses `ring::rand::SystemRandom` and nothing else, with rejection
//! sampling so that every character of the alphabet is equally likely.

use std::fmt;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

/// A credential. Redacted in `Debug`/`Display`, zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value that is already a secret (read from stdin, decrypted, …).
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    /// The plaintext. Call sites are the few places that must see it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(**REDACTED**)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

/// The alphabet a generated secret is drawn from (`[generate] charset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Charset {
    /// `A-Z a-z 0-9 - _`: safe in URLs, YAML, shell and HTTP headers.
    #[default]
    Base64url,
    /// `0-9 a-f`.
    Hex,
    /// `A-Z a-z 0-9`.
    Alnum,
    /// Printable ASCII without space (`!` to `~`).
    Ascii,
}

impl Charset {
    fn alphabet(self) -> Vec<u8> {
        match self {
            Charset::Base64url => {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".to_vec()
            }
            Charset::Hex => b"0123456789abcdef".to_vec(),
            Charset::Alnum => {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789".to_vec()
            }
            Charset::Ascii => (b'!'..=b'~').collect(),
        }
    }
}

/// The system CSPRNG failed; nothing was generated.
#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed; no secret was generated")]
pub struct RandomError;

/// Generates `length` characters drawn uniformly from `charset` with `SystemRandom`.
pub fn generate(length: usize, charset: Charset) -> Result<Secret, RandomError> {
    let alphabet = charset.alphabet();
    let n = alphabet.len();
    // Largest multiple of n that fits in a byte: bytes at or above it are rejected so
    // that no character is favoured.
    let limit = 256 - (256 % n);
    let rng = SystemRandom::new();
    let mut out = Zeroizing::new(String::with_capacity(length));
    let mut buf = Zeroizing::new([0u8; 64]);
    while out.len() < length {
        rng.fill(&mut buf[..]).map_err(|_| RandomError)?;
        for &b in buf.iter() {
            if (b as usize) < limit && out.len() < length {
                out.push(alphabet[b as usize % n] as char);
            }
        }
    }
    buf.zeroize();
    Ok(Secret(out))
}

/// Random bytes for keys and ids that are not credentials (fingerprint keys, labels).
pub fn random_bytes(len: usize) -> Result<Vec<u8>, RandomError> {
    let mut v = vec![0u8; len];
    SystemRandom::new().fill(&mut v).map_err(|_| RandomError)?;
    Ok(v)
}

/// Keyed fingerprint of the secret `name` holds: HMAC-SHA256 under a key only the
/// identity holder can derive, over a domain separator, the name and the value,
/// truncated to 16 bytes, hex. It lets an auditor tell rotations apart and match a
/// value they hold, without publishing a hash that could be brute-forced; keyed per
/// name, so that equal values under two names do not show as equal in the history.
/// (Fingerprints written before the name was included stay as they were: nothing
/// recomputes them.)
pub fn fingerprint(key: &[u8], name: &str, secret: &Secret) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    // Secret names never hold NUL (`config::valid_name`), so the framing is unambiguous.
    ctx.update(b"rotd fingerprint v2\0");
    ctx.update(name.as_bytes());
    ctx.update(b"\0");
    ctx.update(secret.expose().as_bytes());
    let tag = ctx.sign();
    hex::encode(&tag.as_ref()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2-very-secret".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
    }

    #[test]
    fn generated_secrets_use_the_charset_and_length() {
        for cs in [
            Charset::Base64url,
            Charset::Hex,
            Charset::Alnum,
            Charset::Ascii,
        ] {
            let alphabet = cs.alphabet();
            let s = generate(40, cs).unwrap();
            assert_eq!(s.len(), 40);
            assert!(s.expose().bytes().all(|b| alphabet.contains(&b)), "{cs:?}");
        }
        assert_ne!(
            generate(32, Charset::Hex).unwrap(),
            generate(32, Charset::Hex).unwrap()
        );
    }

    #[test]
    fn every_character_is_reachable() {
        // 94-character alphabet, 20k draws: each character expected ~213 times.
        let s = generate(20_000, Charset::Ascii).unwrap();
        for c in Charset::Ascii.alphabet() {
            assert!(
                s.expose().as_bytes().contains(&c),
                "{} never drawn",
                c as char
            );
        }
    }

    #[test]
    fn fingerprint_is_keyed() {
        let s = Secret::new("x".into());
        assert_ne!(fingerprint(b"k1", "a", &s), fingerprint(b"k2", "a", &s));
        assert_eq!(fingerprint(b"k1", "a", &s), fingerprint(b"k1", "a", &s));
        assert_eq!(fingerprint(b"k1", "a", &s).len(), 32);
    }

    #[test]
    fn fingerprint_is_keyed_per_name() {
        let s = Secret::new("the same value".into());
        assert_ne!(
            fingerprint(b"k", "first", &s),
            fingerprint(b"k", "second", &s)
        );
        // The separator keeps name and value apart: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            fingerprint(b"k", "ab", &Secret::new("c".into())),
            fingerprint(b"k", "a", &Secret::new("bc".into()))
        );
    }
}
