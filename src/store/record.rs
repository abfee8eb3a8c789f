//! The plaintext inside a `secrets/NAME.age` file: the pass/passage convention.
//!
//! First line: the secret. Then `key: value` lines. `age -d` and passage show the
//! secret on the first line; the metadata tells rotd which user or key id the secret
//! belongs to, when it was made, which rotation made it, and what is still to be
//! retired. Values never contain newlines; the secret never contains one either
//! (generated secrets cannot, imported ones are checked).

use zeroize::Zeroizing;

use crate::secret::Secret;

/// A decrypted store entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub secret: Secret,
    /// Ordered `key: value` metadata.
    pub meta: Vec<(String, String)>,
}

/// Well-known metadata keys.
pub mod key {
    pub const USERNAME: &str = "username";
    pub const KEY_ID: &str = "key-id";
    pub const CREATED: &str = "created";
    pub const EXPIRES: &str = "expires";
    pub const ROTATION: &str = "rotation";
    /// A credential that stays valid until `retire-after`, then is removed.
    pub const RETIRE_USERNAME: &str = "retire-username";
    pub const RETIRE_KEY_ID: &str = "retire-key-id";
    pub const RETIRE_AFTER: &str = "retire-after";
    /// In a pending record: the idle user's web-config hash before the rotation
    /// (`none` when it had none), so that a recovery can restore it exactly.
    pub const RESTORE_HASH: &str = "restore-hash";
    /// In a pending record: the rotd instance (`host:store path`) running the rotation.
    /// Recovery leaves a fresh pending record of another instance alone.
    pub const INSTANCE: &str = "instance";
    /// An Elasticsearch API key: sha256 (hex) of the canonical JSON of the role
    /// descriptors it was created or last updated with.
    pub const PERMISSIONS: &str = "permissions";
}

/// The plaintext is not in the expected form.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the decrypted file is empty")]
    Empty,
    #[error("metadata line {0} is not `key: value`")]
    BadLine(usize),
    #[error("the decrypted file is not UTF-8")]
    NotUtf8,
}

impl Record {
    pub fn new(secret: Secret) -> Record {
        Record {
            secret,
            meta: Vec::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (or replaces) a metadata value.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value: String = value.into();
        debug_assert!(!value.contains('\n'));
        let value = value.replace('\n', " ");
        match self.meta.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.meta.push((key.to_owned(), value)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.meta.retain(|(k, _)| k != key);
    }

    pub fn with(mut self, key: &str, value: impl Into<String>) -> Record {
        self.set(key, value);
        self
    }

    pub fn username(&self) -> Option<&str> {
        self.get(key::USERNAME)
    }

    pub fn key_id(&self) -> Option<&str> {
        self.get(key::KEY_ID)
    }

    /// The plaintext form, zeroized on drop.
    pub fn to_plaintext(&self) -> Zeroizing<Vec<u8>> {
        let mut s = Zeroizing::new(String::new());
        s.push_str(self.secret.expose());
        s.push('\n');
        for (k, v) in &self.meta {
            s.push_str(k);
            s.push_str(": ");
            s.push_str(v);
            s.push('\n');
        }
        Zeroizing::new(s.as_bytes().to_vec())
    }

    pub fn parse(bytes: &[u8]) -> Result<Record, Error> {
        let text = std::str::from_utf8(bytes).map_err(|_| Error::NotUtf8)?;
        let mut lines = text.lines();
        let first = lines.next().ok_or(Error::Empty)?;
        let secret = Secret::new(first.to_owned());
        let mut meta = Vec::new();
        for (i, line) in lines.enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (k, v) = line.split_once(':').ok_or(Error::BadLine(i + 2))?;
            meta.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(Record { secret, meta })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let r = Record::new(Secret::new("s3cr3t: with colon".into()))
            .with(key::USERNAME, "writer-a")
            .with(key::CREATED, "2026-11-23T00:00:00Z");
        let text = r.to_plaintext();
        assert!(text.starts_with(b"s3cr3t: with colon\nusername: writer-a\n"));
        assert_eq!(Record::parse(&text).unwrap(), r);
    }
}
