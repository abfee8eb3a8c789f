//! File writes that are all-or-nothing, and permission checks.
//!
//! Every file rotd writes (store files, consumer files, web configs) goes through
//! [`write_atomic`]: a temp file created in the same directory with its final mode
//! already set (so a secret is never readable by others, not even for a moment),
//! written, fsynced, renamed over the target, and the directory fsynced. A crash
//! leaves either the old file or the new one, plus at worst a stray `.rotd-tmp-*`
//! file that only the owner can read and that the next write to the directory removes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A file could not be written or inspected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:04o}): run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
}

const TMP_PREFIX: &str = ".rotd-tmp-";

/// Writes `data` to `path` atomically with permission bits `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    remove_stale_temps(dir, name.to_string_lossy().as_ref());
    let suffix = hex::encode(crate::secret::random_bytes(6).map_err(|e| err(io::Error::other(e)))?);
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{}.{}.{suffix}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Removes an existing file durably (the directory is fsynced). Absent is fine.
pub fn remove_durable(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Write {
                path: path.to_owned(),
                source,
            })
        }
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::Write {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

/// Temp files of earlier writes to the same target that a crash left behind: those
/// of processes that no longer exist. Another live process may be writing the same
/// file right now; its temp file is left alone.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!("{TMP_PREFIX}{name}.");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('.').next().and_then(|p| p.parse::<i32>().ok());
        let dead = match pid {
            Some(p) if p as u32 == std::process::id() => false,
            Some(p) => matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
                Err(nix::errno::Errno::ESRCH)
            ),
            None => true, // not a name this version writes
        };
        if dead {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a file that may be absent.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    match fs::read(path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Refuses a private-key file that group or others can read.
pub fn check_private(path: &Path) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o640).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
    }

    #[test]
    fn stale_temps_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        // A dead process's leftover goes; a live writer's temp file stays.
        fs::write(dir.path().join(".rotd-tmp-f.999999999.abc"), "leftover").unwrap();
        let live = format!(".rotd-tmp-f.{}.def", std::os::unix::process::parent_id());
        fs::write(dir.path().join(&live), "in progress").unwrap();
        write_atomic(&dir.path().join("f"), b"x", 0o600).unwrap();
        assert!(!dir.path().join(".rotd-tmp-f.999999999.abc").exists());
        assert!(dir.path().join(&live).exists());
    }

    #[test]
    fn open_private_key_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, "x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = check_private(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        check_private(&p).unwrap();
    }
}
