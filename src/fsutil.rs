//! How rotd touches files: reads that never follow a link nor block on a special
//! file, all-or-nothing writes that keep the owner of what they replace, and
//! permission checks.
//!
//! Several of the files rotd reads and rewrites sit in directories that other users
//! own (a consumer's config directory, `/etc/prometheus`). Whoever can write there can
//! put a symlink, a FIFO or a device at a path rotd uses. Followed, a link would make
//! rotd copy a file it can read (a private key) into a place the consumer can read, or
//! overwrite a file of its choosing; a FIFO would hang a rotation while it holds the
//! lock; `/dev/zero` would be read until memory runs out. So:
//!
//! * every read goes through [`open_regular`]: `lstat` first (a special file is
//!   refused before it is even opened: opening some devices has effects), then
//!   `open(O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)` and `fstat` of the opened fd (the
//!   path may have been swapped in between), and only a regular file is read, up to a
//!   size cap per kind of file ([`MAX_FILE`] by default);
//! * every write goes through [`write_atomic`]: a temp file created in the same
//!   directory (`O_EXCL | O_NOFOLLOW`) readable only by its owner, written, given the
//!   owner and group of the file it replaces and then its final mode, fsynced, renamed
//!   over the target, and the directory fsynced. A destination that exists and is not
//!   a regular file (a link included) is refused, never replaced nor followed. A crash
//!   leaves either the old file or the new one, plus at worst a stray `.rotd-tmp-*`
//!   file that only its owner can read and that the next write to the directory
//!   removes;
//! * what a file held before rotd rewrites it is kept with [`snapshot`] (bytes, mode,
//!   owner, group), so that a rollback can put back exactly that.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use zeroize::Zeroizing;

/// Default bound of a file rotd reads (consumer files, store files).
pub const MAX_FILE: u64 = 16 << 20;
/// An age identity or an SSH private key is well under a kilobyte.
pub const MAX_KEY_FILE: u64 = 64 << 10;
/// Recipients and allowed-signers lists, templates.
pub const MAX_LIST_FILE: u64 = 1 << 20;
/// A Prometheus web config: a few users and TLS settings.
pub const MAX_WEB_CONFIG: u64 = 1 << 20;
/// A pidfile holds one number.
pub const MAX_PIDFILE: u64 = 4096;

/// What was found at a path where a regular file was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Symlink,
    Directory,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Other,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Symlink => "symbolic link",
            Kind::Directory => "directory",
            Kind::Fifo => "FIFO (named pipe)",
            Kind::Socket => "socket",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
            Kind::Other => "special file",
        })
    }
}

impl Kind {
    /// None for a regular file.
    fn of(meta: &Metadata) -> Option<Kind> {
        let t = meta.file_type();
        let kind = if t.is_file() {
            return None;
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_dir() {
            Kind::Directory
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_socket() {
            Kind::Socket
        } else if t.is_char_device() {
            Kind::CharDevice
        } else if t.is_block_device() {
            Kind::BlockDevice
        } else {
            Kind::Other
        };
        Some(kind)
    }
}

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
    #[error("{path} is a {kind}, not a regular file; rotd does not follow links nor read or replace special files, so that whoever can write in that directory cannot point rotd at another file: replace it with a regular file (or remove it) and try again")]
    NotRegular { path: PathBuf, kind: Kind },
    #[error("{path} is larger than {max} bytes, more than such a file ever needs; check that the path names the right file")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path} is owned by {owner}, not by {me} that rotd runs as, and whoever owns a key file can replace it: run rotd as {owner} (e.g. `runuser -u {owner} -- rotd …`), or `chown {me} {path}`")]
    NotOwner {
        path: PathBuf,
        owner: String,
        me: String,
    },
    #[error("cannot give the new {path} the owner and group of the file it replaces ({owner}): {source}; run rotd as root or as that owner, or `chown` the file to the user rotd runs as")]
    KeepOwner {
        path: PathBuf,
        owner: String,
        #[source]
        source: io::Error,
    },
}

const TMP_PREFIX: &str = ".rotd-tmp-";

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        _ => format!("uid {uid}"),
    }
}

fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
        Ok(Some(g)) => g.name,
        _ => format!("gid {gid}"),
    }
}

fn owner_text(uid: u32, gid: u32) -> String {
    format!("{}:{}", user_name(uid), group_name(gid))
}

/// `lstat`: None when nothing is at `path`, an error when something other than a
/// regular file is.
pub fn check_regular(path: &Path) -> Result<Option<Metadata>, Error> {
    match fs::symlink_metadata(path) {
        Ok(m) => match Kind::of(&m) {
            None => Ok(Some(m)),
            Some(kind) => Err(Error::NotRegular {
                path: path.to_owned(),
                kind,
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Opens a regular file for reading without following a link at `path` and without
/// blocking on a FIFO; anything else is refused, naming what was found.
pub fn open_regular(path: &Path) -> Result<(File, Metadata), Error> {
    let read_err = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    // Refused before open: opening a device or a FIFO can itself have effects.
    if check_regular(path)?.is_none() {
        return Err(read_err(io::Error::from(io::ErrorKind::NotFound)));
    }
    let flags = OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .map_err(|e| {
            // The path was swapped for a link after the lstat.
            if e.raw_os_error() == Some(nix::libc::ELOOP) {
                Error::NotRegular {
                    path: path.to_owned(),
                    kind: Kind::Symlink,
                }
            } else {
                read_err(e)
            }
        })?;
    let meta = file.metadata().map_err(read_err)?;
    if let Some(kind) = Kind::of(&meta) {
        return Err(Error::NotRegular {
            path: path.to_owned(),
            kind,
        });
    }
    Ok((file, meta))
}

/// Reads an opened regular file, refusing more than `max` bytes.
fn read_open(path: &Path, file: File, meta: &Metadata, max: u64) -> Result<Vec<u8>, Error> {
    let too_large = || Error::TooLarge {
        path: path.to_owned(),
        max,
    };
    if meta.len() > max {
        return Err(too_large());
    }
    // Sized up front: a secret is not copied around by a growing buffer.
    let mut buf = Vec::with_capacity(meta.len() as usize + 1);
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
    if buf.len() as u64 > max {
        buf.fill(0);
        return Err(too_large());
    }
    Ok(buf)
}

/// Reads a regular file of at most `max` bytes, naming it in the error.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let (file, meta) = open_regular(path)?;
    read_open(path, file, &meta, max)
}

/// Reads a regular file of at most [`MAX_FILE`] bytes, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, Error> {
    read_capped(path, MAX_FILE)
}

/// Reads a regular UTF-8 text file of at most `max` bytes.
pub fn read_text(path: &Path, max: u64) -> Result<String, Error> {
    String::from_utf8(read_capped(path, max)?).map_err(|_| Error::Read {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

/// Reads a regular file that may be absent.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    match read(path) {
        Ok(v) => Ok(Some(v)),
        Err(Error::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a private key file: a regular file, owned by the user rotd runs as, that
/// group and others cannot read. The checks are made on the opened file itself.
pub fn read_private(path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>, Error> {
    let (file, meta) = open_regular(path)?;
    check_private_meta(path, &meta)?;
    Ok(Zeroizing::new(read_open(path, file, &meta, max)?))
}

fn check_private_meta(path: &Path, meta: &Metadata) -> Result<(), Error> {
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(Error::NotOwner {
            path: path.to_owned(),
            owner: user_name(meta.uid()),
            me: user_name(me),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Refuses a private-key file that is not a regular file, is owned by another user,
/// or that group or others can read.
pub fn check_private(path: &Path) -> Result<(), Error> {
    let (_, meta) = open_regular(path)?;
    check_private_meta(path, &meta)
}

/// What a file held before rotd rewrote it.
pub struct Existing {
    pub bytes: Zeroizing<Vec<u8>>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The bytes, mode and owner of the regular file at `path` (None: nothing there);
/// anything but a regular file is refused.
pub fn snapshot(path: &Path, max: u64) -> Result<Option<Existing>, Error> {
    let (file, meta) = match open_regular(path) {
        Ok(x) => x,
        Err(Error::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let bytes = Zeroizing::new(read_open(path, file, &meta, max)?);
    Ok(Some(Existing {
        bytes,
        mode: meta.permissions().mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

/// The permission bits of the regular file at `path`, or `default` when there is none.
pub fn mode_or(path: &Path, default: u32) -> Result<u32, Error> {
    Ok(check_regular(path)?
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(default))
}

/// Writes `data` to `path` atomically with permission bits `mode`, keeping the owner
/// and group of the regular file it replaces (a new file is rotd's own). Refuses to
/// replace anything but a regular file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    write_atomic_owned(path, data, mode, None)
}

/// [`write_atomic`] with an explicit owner and group (a rollback putting back a
/// [`snapshot`]); None keeps those of the file replaced.
pub fn write_atomic_owned(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), Error> {
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
    let existing = check_regular(path)?;
    let owner = owner.or(existing.as_ref().map(|m| (m.uid(), m.gid())));
    remove_stale_temps(dir, name.to_string_lossy().as_ref());
    let suffix = hex::encode(crate::secret::random_bytes(6).map_err(|e| err(io::Error::other(e)))?);
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{}.{}.{suffix}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        // Owner-only until it has its final owner: the group of a new file is rotd's,
        // not the one that `mode` is meant for.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o700)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(&tmp)
            .map_err(err)?;
        if let Some((uid, gid)) = owner {
            let now = f.metadata().map_err(err)?;
            if (now.uid(), now.gid()) != (uid, gid) {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(|source| {
                    Error::KeepOwner {
                        path: path.to_owned(),
                        owner: owner_text(uid, gid),
                        source,
                    }
                })?;
            }
        }
        // After the chown, which clears set-id bits; and the umask may have narrowed
        // the mode at create: set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err)?;
        f.write_all(data).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, path).map_err(err)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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

    #[test]
    fn special_files_are_refused_naming_path_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        fs::write(&private, "TOP-SECRET").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for (p, kind) in [
            (&link, "symbolic link"),
            (&fifo, "FIFO"),
            (&zero, "symbolic link"),
            (&dir.path().to_path_buf(), "directory"),
            (&PathBuf::from("/dev/zero"), "character device"),
        ] {
            for e in [
                read(p).unwrap_err(),
                read_optional(p).unwrap_err(),
                snapshot(p, MAX_FILE).err().unwrap(),
                write_atomic(p, b"x", 0o600).unwrap_err(),
            ] {
                let e = e.to_string();
                assert!(
                    e.contains(&p.display().to_string()) && e.contains(kind),
                    "{e}"
                );
            }
        }
        assert_eq!(fs::read(&private).unwrap(), b"TOP-SECRET");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(read_optional(&dir.path().join("absent")).unwrap().is_none());
        assert!(snapshot(&dir.path().join("absent"), 1).unwrap().is_none());
    }

    #[test]
    fn reads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        fs::write(&p, vec![b'x'; 100]).unwrap();
        assert_eq!(read_capped(&p, 100).unwrap().len(), 100);
        let e = read_capped(&p, 99).unwrap_err().to_string();
        assert!(e.contains("larger than 99 bytes"), "{e}");
    }

    #[test]
    fn replacing_keeps_owner_and_group_and_restore_sets_them() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to give a file away");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("web.yml");
        fs::write(&p, "old").unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        let before = snapshot(&p, MAX_FILE).unwrap().unwrap();
        write_atomic(&p, b"new", 0o640).unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65534, 65534, 0o640));
        std::os::unix::fs::chown(&p, Some(0), Some(0)).unwrap();
        write_atomic_owned(
            &p,
            &before.bytes,
            before.mode,
            Some((before.uid, before.gid)),
        )
        .unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn key_owned_by_another_user_is_refused_with_the_fix() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to give a file away");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, "x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = read_private(&p, MAX_KEY_FILE).unwrap_err().to_string();
        assert!(
            e.contains("chown root") && e.contains("owned by nobody"),
            "{e}"
        );
        assert!(check_private(&p).is_err());
    }
}
