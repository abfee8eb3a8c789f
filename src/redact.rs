//! Redaction of credentials from text that came from a peer (an error page, a reload
//! endpoint's answer, a program's stderr, an Elasticsearch `reason`) before it
//! reaches an error, a log line, a commit trailer or `status`.
//!
//! Two rules, kept in this one place:
//!
//! * **Every encoding.** A peer echoes a credential in the form it received it or in
//!   the form its framework prints: raw, JSON-escaped, URL-encoded (`%XX` and
//!   form `+`), base64 of the raw value, and, for a credential with a principal (a
//!   username, an API key id), `principal:secret` and its base64 (an HTTP Basic
//!   header, an Elasticsearch `ApiKey` header / `{{encoded}}`), padded or not,
//!   standard or URL-safe alphabet. [`Needles`] holds all of them.
//! * **Scrub, then cut.** Peer text is shortened (it is quoted in one-line errors and
//!   trailers) only AFTER it is scrubbed: a cut first could split a secret and leave
//!   a prefix that no scrub recognises. [`Needles::cut`] also drops a tail that is
//!   the beginning of a credential, so a cut can never leave a leaking prefix.
//!
//! Why a process-wide register ([`register`]): peer text is produced deep inside the
//! HTTP clients and reloads, which do not know which credentials are in flight; the
//! engine (the records of a rotation) and the Elasticsearch client (every
//! `Authorization` it builds) register them for as long as they are in use, and
//! [`peer_text`] scrubs against all of them. The engine scrubs its messages again
//! with the records it holds ([`Needles::scrub`]), so a credential is redacted even
//! when nothing registered it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// What stands in for a credential.
pub const REDACTED: &str = "**REDACTED**";

/// Needles shorter than this are not scrubbed: they would redact ordinary words.
/// Every credential rotd makes or accepts is much longer.
const MIN_NEEDLE: usize = 4;

/// The encodings of some credentials, longest first.
#[derive(Default, Clone)]
pub struct Needles(Vec<Zeroizing<String>>);

impl std::fmt::Debug for Needles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Needles({} forms)", self.0.len())
    }
}

impl Needles {
    pub fn new() -> Needles {
        Needles::default()
    }

    /// Adds every encoding of `secret`, and of `principal:secret` when the credential
    /// has a principal (a username or an API key id).
    pub fn add(&mut self, secret: &Secret, principal: Option<&str>) {
        let raw = secret.expose();
        if raw.len() < MIN_NEEDLE {
            return;
        }
        let mut forms = text_forms(raw);
        if let Some(p) = principal {
            let pair = Zeroizing::new(format!("{p}:{raw}"));
            forms.extend(text_forms(&pair));
        }
        for f in forms {
            if f.len() >= MIN_NEEDLE && !self.0.contains(&f) {
                self.0.push(f);
            }
        }
        // Longest first: a longer form is replaced whole before a shorter one that
        // it contains could leave pieces of it.
        self.0.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    /// Adds every form of `other`.
    pub fn extend(&mut self, other: &Needles) {
        for f in &other.0 {
            if !self.0.contains(f) {
                self.0.push(f.clone());
            }
        }
        self.0.sort_by_key(|n| std::cmp::Reverse(n.len()));
    }

    /// `text` with every form replaced by [`REDACTED`].
    pub fn scrub(&self, text: &str) -> String {
        let mut s = text.to_owned();
        for n in &self.0 {
            if s.contains(n.as_str()) {
                s = s.replace(n.as_str(), REDACTED);
            }
        }
        s
    }

    /// Scrubs `text`, then shortens it to at most `max` bytes (and "…"). When the
    /// cut leaves a tail that is the beginning of a form (a peer that echoed only
    /// part of it, cut again), the tail goes too.
    pub fn cut(&self, text: &str, max: usize) -> String {
        let s = self.scrub(text);
        let s = s.trim();
        if s.len() <= max {
            return s.to_owned();
        }
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut kept = &s[..end];
        for n in &self.0 {
            // The longest tail of `kept` that begins `n`.
            let longest = (MIN_NEEDLE..n.len().min(kept.len() + 1)).rev().find(|&l| {
                kept.is_char_boundary(kept.len() - l) && n.starts_with(&kept[kept.len() - l..])
            });
            if let Some(l) = longest {
                kept = &kept[..kept.len() - l];
            }
        }
        format!("{kept}…")
    }
}

/// `s` as it is, JSON-escaped, percent-encoded (both ways) and in base64 (both
/// alphabets; the unpadded form is inside the padded one).
fn text_forms(s: &str) -> Vec<Zeroizing<String>> {
    let json = Zeroizing::new(serde_json::Value::String(s.to_owned()).to_string());
    vec![
        Zeroizing::new(s.to_owned()),
        Zeroizing::new(json[1..json.len() - 1].to_owned()),
        percent_encoded(s, false),
        percent_encoded(s, true),
        Zeroizing::new(STANDARD_NO_PAD.encode(s)),
        Zeroizing::new(URL_SAFE_NO_PAD.encode(s)),
    ]
}

/// `s` percent-encoded (every byte but the unreserved ones); `form`: a space as `+`.
fn percent_encoded(s: &str, form: bool) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(s.len() * 3));
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else if form && b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The credentials in use in this process, by registration.
static LIVE: Mutex<Vec<(u64, Arc<Needles>)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A credential registered for redaction; dropping it unregisters the credential.
#[derive(Debug)]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|(id, _)| *id != self.0);
    }
}

/// Registers a credential (and its `principal:secret` forms) so that [`peer_text`]
/// and [`scrub`] redact it until the returned guard drops.
pub fn register(secret: &Secret, principal: Option<&str>) -> Registration {
    let mut n = Needles::new();
    n.add(secret, principal);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((id, Arc::new(n)));
    Registration(id)
}

/// Every registered credential's forms.
pub fn live() -> Needles {
    let live: Vec<Arc<Needles>> = LIVE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(_, n)| n.clone())
        .collect();
    let mut all = Needles::new();
    for n in live {
        all.extend(&n);
    }
    all
}

/// `text` with every registered credential redacted.
pub fn scrub(text: &str) -> String {
    live().scrub(text)
}

/// Text a peer sent, made fit to quote: every registered credential redacted, THEN
/// shortened to `max` bytes.
pub fn peer_text(text: &str, max: usize) -> String {
    live().cut(text, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-Value_0123456789abcdefXYZ";

    fn needles() -> Needles {
        let mut n = Needles::new();
        n.add(&Secret::new(SECRET.into()), Some("writer a"));
        n
    }

    #[test]
    fn every_encoding_is_scrubbed() {
        let n = needles();
        let pair = format!("writer a:{SECRET}");
        let texts = [
            SECRET.to_owned(),
            STANDARD_NO_PAD.encode(&pair),
            base64::engine::general_purpose::STANDARD.encode(&pair),
            URL_SAFE_NO_PAD.encode(&pair),
            pair.clone(),
            "writer%20a%3As3cr3t-Value_0123456789abcdefXYZ".into(),
            "writer+a%3As3cr3t-Value_0123456789abcdefXYZ".into(),
            STANDARD_NO_PAD.encode(SECRET),
        ];
        for t in texts {
            let out = n.scrub(&format!("error: got {t} here"));
            assert!(!out.contains(&SECRET[..8]), "{out}");
            assert!(out.contains(REDACTED), "{out}");
        }
        let mut m = Needles::new();
        m.add(&Secret::new("quote\"back\\slash\nline".into()), None);
        let out = m.scrub(r#"{"password":"quote\"back\\slash\nline"}"#);
        assert_eq!(out, format!(r#"{{"password":"{REDACTED}"}}"#));
    }

    #[test]
    fn a_cut_never_leaves_a_prefix_of_a_secret() {
        let n = needles();
        for offset in 0..60 {
            let text = format!("{}{SECRET} and more", "x".repeat(offset));
            let out = n.cut(&text, 40);
            assert!(out.len() <= 40 + "…".len(), "{out}");
            for l in 4..=SECRET.len() {
                assert!(!out.contains(&SECRET[..l]), "offset {offset}: {out}");
            }
        }
        // A peer that echoed only the start of the secret, cut again.
        let out = n.cut(&format!("{}{}", "y".repeat(30), &SECRET[..20]), 40);
        assert!(!out.contains(&SECRET[..4]), "{out}");
    }

    #[test]
    fn registered_credentials_are_scrubbed_until_dropped() {
        let s = Secret::new("registered-credential-4242".into());
        let reg = register(&s, Some("user1"));
        assert_eq!(
            peer_text("x registered-credential-4242 y", 100),
            format!("x {REDACTED} y")
        );
        drop(reg);
        assert_eq!(
            peer_text("x registered-credential-4242 y", 100),
            "x registered-credential-4242 y"
        );
    }
}
