//! Hostile and broken peers: a receiver that cuts its answer short mid-body, one that
//! resets the connection (TCP RST) mid-response, a name that does not resolve. Each
//! must end in a clean rollback (exit 1), the web config byte-identical, nothing
//! pending. And a store whose disk fills up (before the rotation, and in the middle
//! of it, between the pending and the succeeded commit) or turns read-only mid-way.

use std::io::{Read, Write};
use std::net::TcpListener;

use crate::util::*;

/// How the fake receiver misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Answers queries with a body cut short (then a clean close).
    Truncate,
    /// Resets the connection (RST) halfway through the answer to a write.
    ResetWrite,
    /// Resets the connection (RST) halfway through the answer to a query.
    ResetQuery,
    /// Answers queries with a chunked body that never ends, as fast as it can.
    Endless,
}

/// Closes `c` with an RST instead of a FIN (SO_LINGER with a zero timeout).
fn reset(c: std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(c);
}

/// A fake remote-write receiver: accepts writes (204) and answers queries with a
/// response cut off in the middle of its body.
fn truncating_receiver() -> String {
    faulty_receiver(Fault::Truncate)
}

fn faulty_receiver(fault: Fault) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming().take(64) {
            let Ok(mut c) = conn else { continue };
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&got);
            if head.starts_with("POST /api/v1/write") {
                // Drain the body (Content-Length), then accept it.
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                let body_start = got
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| p + 4)
                    .unwrap_or(got.len());
                let mut have = got.len() - body_start;
                while have < len {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => have += n,
                    }
                }
                if fault == Fault::ResetWrite {
                    let _ = c.write_all(b"HTTP/1.1 204 No Con");
                    reset(c);
                    continue;
                }
                let _ = c.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            } else if fault == Fault::Endless {
                std::thread::spawn(move || {
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
                    let mut chunk = format!("{:x}\r\n", 65536).into_bytes();
                    chunk.resize(chunk.len() + 65536, b' ');
                    chunk.extend_from_slice(b"\r\n");
                    while c.write_all(&chunk).is_ok() {}
                });
                continue;
            } else {
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\nConnection: close\r\n\r\n{\"status\":\"success\",\"data\":{\"resultType\":\"vec");
                if fault == Fault::ResetQuery {
                    let _ = c.flush();
                    reset(c);
                    continue;
                }
            }
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    });
    url
}

fn schedule(env: &TestEnv, url: &str) -> std::path::PathBuf {
    let web = env.path("web.yml");
    std::fs::write(
        &web,
        format!(
            "# receiver\nbasic_auth_users:\n  prom-reader: {}\n  writer-a: {}\n",
            bcrypt_hash("r"),
            bcrypt_hash(INITIAL_PW)
        ),
    )
    .unwrap();
    let o = env.rotd_stdin(
        &["import", "prom-remote-write", "--username", "writer-a"],
        &format!("{INITIAL_PW}\n"),
    );
    assert!(o.status.success());
    env.write_schedule(
        "prom-remote-write",
        &format!(
            "name = \"prom-remote-write\"\ngrace = \"0s\"\n[target]\nkind = \"prometheus-remote-write\"\nurl = \"{url}\"\nweb_config = \"{}\"\nusernames = [\"writer-a\", \"writer-b\"]\nbcrypt_cost = 4\n[probe]\nattempts = 3\ninterval = \"10ms\"\ntimeout = \"2s\"\n",
            web.display()
        ),
    );
    web
}

fn assert_clean_rollback(
    env: &TestEnv,
    web: &std::path::Path,
    before: &[u8],
    o: &std::process::Output,
    expect: &str,
) {
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(o), stderr(o));
    assert!(
        stdout(o).contains(expect),
        "expected {expect:?} in {}",
        stdout(o)
    );
    assert_eq!(
        std::fs::read(web).unwrap(),
        before,
        "web config restored byte for byte"
    );
    assert!(!env.head_files().iter().any(|f| f.ends_with(".pending.age")));
    assert_eq!(
        env.history_json(Some("prom-remote-write"))[0]["step"],
        "rolled-back"
    );
}

#[test]
fn a_query_answer_cut_off_mid_body_rolls_back() {
    let env = TestEnv::new();
    let web = schedule(&env, &truncating_receiver());
    let before = std::fs::read(&web).unwrap();
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert_clean_rollback(&env, &web, &before, &o, "not Prometheus JSON");
}

#[test]
fn a_receiver_name_that_does_not_resolve_rolls_back() {
    let env = TestEnv::new();
    let web = schedule(&env, "http://rotd-probe-target.invalid:9090");
    let before = std::fs::read(&web).unwrap();
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert_clean_rollback(
        &env,
        &web,
        &before,
        &o,
        "remote write to http://rotd-probe-target.invalid",
    );
}

#[test]
fn a_connection_reset_mid_response_rolls_back() {
    for (fault, expect) in [
        (Fault::ResetWrite, "remote write to"),
        (Fault::ResetQuery, "query answer"),
    ] {
        let env = TestEnv::new();
        let web = schedule(&env, &faulty_receiver(fault));
        let before = std::fs::read(&web).unwrap();
        let o = env.rotd(&["rotate", "prom-remote-write"]);
        assert_clean_rollback(&env, &web, &before, &o, expect);
        assert!(stdout(&o).contains("reset by peer"), "{}", stdout(&o));
    }
}

/// A small tmpfs mounted on the store's directory, unmounted on drop. Mounting needs
/// root (CI runs as root); elsewhere the disk-full tests say so and do nothing.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &std::path::Path) -> Option<SmallDisk> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a tmpfs for the store needs root (CI runs as root)");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount tmpfs: {}", stderr(&o));
        Some(SmallDisk {
            dir: dir.to_owned(),
        })
    }

    /// Writes a filler file until the disk is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.dir.join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
        // Whatever the page cache still held is on the disk now, or failed.
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }

    /// Makes the store's `secrets/` and git objects immutable (`chattr -R +i`: even
    /// root cannot write there; a remount read-only is refused while rotd holds its
    /// lock files open), through a handle that does not unmount on drop.
    fn read_only_and_forget(self) {
        self.chattr("+i");
        std::mem::forget(self);
    }

    fn writable(&self) {
        self.chattr("-i");
    }

    fn chattr(&self, how: &str) {
        let o = std::process::Command::new("chattr")
            .args(["-R", how])
            .arg(self.dir.join("secrets"))
            .arg(self.dir.join(".git/objects"))
            .output()
            .unwrap();
        assert!(o.status.success(), "chattr {how}: {}", stderr(&o));
    }

    /// [`SmallDisk::fill`] through a handle that does not unmount on drop.
    fn fill_and_forget(self) {
        self.fill();
        std::mem::forget(self);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// A store on a small disk with a `files` secret whose probe calls `probe_url`.
fn store_on_small_disk(probe_url: &str) -> Option<(TestEnv, SmallDisk, std::path::PathBuf)> {
    let env = TestEnv::uninitialised();
    let disk = SmallDisk::mount(&env.store)?;
    let o = env.rotd(&["init"]);
    assert!(o.status.success(), "init: {}", stderr(&o));
    let consumer = env.path("apm/token");
    env.write_schedule(
        "apm-token",
        &format!(
            "name = \"apm-token\"\ngrace = \"0s\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}\"\ncontent = \"{{{{secret}}}}\"\nmode = \"0600\"\n[probe]\nattempts = 1\ntimeout = \"5s\"\nhttp = {{ url = \"{probe_url}\" }}\n",
            consumer.display()
        ),
    );
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "first rotation: {}", stderr(&o));
    Some((env, disk, consumer))
}

/// An HTTP probe target that answers 200, and first runs `on_request`.
fn probe_server(on_request: impl Fn() + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            on_request();
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    url
}

fn git_fsck_clean(env: &TestEnv) {
    let o = git(&env.store, &["fsck", "--no-dangling"]);
    assert!(o.status.success(), "git fsck: {}{}", stdout(&o), stderr(&o));
}

#[test]
fn a_full_store_disk_before_the_rotation_changes_nothing() {
    let Some((env, disk, consumer)) = store_on_small_disk(&probe_server(|| {})) else {
        return;
    };
    let head = stdout(&git(&env.store, &["rev-parse", "HEAD"]));
    let old = std::fs::read_to_string(&consumer).unwrap();
    disk.fill();
    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let text = format!("{}{}", stdout(&o), stderr(&o));
    let line = stderr(&o)
        .lines()
        .find(|l| l.starts_with("rotd: "))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("cannot write") && line.contains("apm-token.pending.age"),
        "{text}"
    );
    assert_eq!(line.matches("No space left on device").count(), 1, "{line}");
    assert_eq!(
        stdout(&git(&env.store, &["rev-parse", "HEAD"])),
        head,
        "no commit"
    );
    assert_eq!(
        std::fs::read_to_string(&consumer).unwrap(),
        old,
        "consumer untouched"
    );
    git_fsck_clean(&env);
    disk.free();
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "after freeing space: {}", stderr(&o));
    assert_ne!(std::fs::read_to_string(&consumer).unwrap(), old);
    git_fsck_clean(&env);
    env.assert_no_secret_leaked();
}

/// The disk fills while the probe runs: the pending record is in git, the succeeded
/// commit cannot be written. rotd says what is left (exit 2), the live secret is the
/// recorded pending one, and once there is space again recovery rolls it back.
#[test]
fn a_store_disk_that_fills_mid_rotation_keeps_the_live_secret_recorded() {
    store_fault_mid_rotation(StoreFault::Full);
}

/// The same with the store made read-only (immutable) while the probe runs.
#[test]
fn a_store_turned_read_only_mid_rotation_keeps_the_live_secret_recorded() {
    store_fault_mid_rotation(StoreFault::ReadOnly);
}

#[derive(Clone, Copy)]
enum StoreFault {
    Full,
    ReadOnly,
}

/// How a [`StoreFault`] shows, is made, and is mended.
type FaultOps = (&'static str, fn(SmallDisk), fn(&SmallDisk));

fn store_fault_mid_rotation(fault: StoreFault) {
    let (errno_text, break_disk, mend_disk): FaultOps = match fault {
        StoreFault::Full => (
            "No space left on device",
            SmallDisk::fill_and_forget,
            SmallDisk::free,
        ),
        StoreFault::ReadOnly => (
            "Operation not permitted",
            SmallDisk::read_only_and_forget,
            SmallDisk::writable,
        ),
    };
    let store_dir = std::sync::Arc::new(std::sync::Mutex::new(None::<std::path::PathBuf>));
    let armed = store_dir.clone();
    let url = probe_server(move || {
        if let Some(dir) = armed.lock().unwrap().as_ref() {
            break_disk(SmallDisk { dir: dir.clone() });
        }
    });
    let Some((env, disk, consumer)) = store_on_small_disk(&url) else {
        return;
    };
    let old = std::fs::read_to_string(&consumer).unwrap();
    *store_dir.lock().unwrap() = Some(env.store.clone());
    let o = env.rotd(&["rotate", "apm-token"]);
    *store_dir.lock().unwrap() = None;
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(2), "{text}");
    assert!(text.contains(errno_text), "{text}");
    assert!(
        text.contains("apm-token.pending.age"),
        "says what is left: {text}"
    );
    let live = std::fs::read_to_string(&consumer).unwrap();
    assert_ne!(live, old);
    let blob = git(&env.store, &["show", "HEAD:secrets/apm-token.pending.age"]);
    assert_eq!(
        env.age_secret(&blob.stdout),
        live,
        "the live secret is recorded"
    );
    git_fsck_clean(&env);
    // Still broken: recovery cannot finish, and says what to do. Whatever it got to
    // (a full disk stops it before the consumers, an immutable store at its commit),
    // the consumer holds a recorded secret and the pending record stays in git.
    let o = env.rotd(&["retire"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("check the store's disk"),
        "{}",
        stderr(&o)
    );
    let held = std::fs::read_to_string(&consumer).unwrap();
    assert!(held == live || held == old);
    assert!(env
        .head_files()
        .contains(&"secrets/apm-token.pending.age".to_owned()));
    mend_disk(&disk);
    let o = env.rotd(&["retire"]);
    assert!(o.status.success(), "recovery: {}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&consumer).unwrap(),
        old,
        "rolled back"
    );
    assert_eq!(
        env.history_json(Some("apm-token"))[0]["step"],
        "rolled-back"
    );
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "{}", stderr(&o));
    git_fsck_clean(&env);
    env.assert_no_secret_leaked();
}

/// A query answer that never ends: rotd stops reading at its cap (16 MiB), rolls back
/// within the probe's bounds, and its memory stays small.
#[test]
fn an_endless_query_answer_is_cut_at_the_cap_and_rolls_back() {
    let env = TestEnv::new();
    let web = schedule(&env, &faulty_receiver(Fault::Endless));
    let before = std::fs::read(&web).unwrap();
    // Run and reap rotd here, to read its own peak RSS (wait4).
    #[allow(clippy::zombie_processes)] // reaped by wait4 below
    let mut child = env
        .cmd(&["rotate", "prom-remote-write"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).unwrap();
        v
    });
    let mut stdout_bytes = Vec::new();
    out.read_to_end(&mut stdout_bytes).unwrap();
    let mut status = 0;
    // SAFETY: wait4 on our own child, with valid pointers to a status and a rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32);
    use std::os::unix::process::ExitStatusExt;
    let o = std::process::Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: stdout_bytes,
        stderr: reader.join().unwrap(),
    };
    env.record(&o);
    assert_clean_rollback(&env, &web, &before, &o, "larger than the 16 MiB rotd reads");
    let peak_mib = ru.ru_maxrss / 1024;
    eprintln!("peak RSS of rotd: {peak_mib} MiB");
    assert!(peak_mib < 150, "rotd held {peak_mib} MiB");
}
