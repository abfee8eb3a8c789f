//! Attacks on rotd through its control socket, metrics port and scheduler
//! (see the module list in `tests/integration/security/mod.rs`).
//!
//! A hostile local client floods the control socket or the metrics port (huge lines,
//! thousands of idle connections, a uid that is not allowed, a full fd table); a
//! hostile or careless schedule file asks for a jitter that overflows the calendar or
//! a cron that never fires; a process of the daemon's own user tries to read its
//! memory. Each test runs the real `rotd` binary.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// A `rotd run` process, killed on drop.
struct Daemon {
    child: Child,
    metrics: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A `files` schedule; `extra` lines come third (line 3 of the file).
fn files_schedule(env: &TestEnv, name: &str, cron: &str, extra: &str) {
    let grace = if extra.contains("grace =") {
        ""
    } else {
        "grace = \"0s\"\n"
    };
    env.write_schedule(
        name,
        &format!(
            "name = \"{name}\"\nschedule = \"{cron}\"\n{extra}{grace}[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/{name}.token\"\ncontent = \"{{{{secret}}}}\"\n",
            env.path("consumer").display()
        ),
    );
}

/// Starts `rotd run` with a metrics port; `configure` may change the command (user).
fn start_with(env: &TestEnv, configure: impl FnOnce(&mut std::process::Command)) -> Daemon {
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    if !cfg.contains("metrics =") {
        cfg.push_str(&format!("metrics = \"127.0.0.1:{}\"\n", free_port()));
        std::fs::write(&env.config, &cfg).unwrap();
    }
    let metrics = cfg
        .split("metrics = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let log = std::fs::File::create(env.path("daemon.log")).unwrap();
    let mut cmd = env.cmd(&["run"]);
    cmd.stdout(Stdio::null()).stderr(log);
    configure(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let socket = env.path("rotd.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "rotd run exited ({status}) before its control socket appeared:\n{}",
                daemon_log(env)
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for the control socket:\n{}",
            daemon_log(env)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon {
        child,
        metrics: format!("http://{metrics}"),
    }
}

fn start(env: &TestEnv) -> Daemon {
    start_with(env, |_| {})
}

fn daemon_log(env: &TestEnv) -> String {
    let text = std::fs::read_to_string(env.path("daemon.log")).unwrap_or_default();
    env.record_text(&text);
    text
}

/// Runs a rotd command, killing it after `timeout` (then `None`): a daemon that does
/// not answer must fail the test, not hang it.
fn rotd_within(env: &TestEnv, args: &[&str], timeout: Duration) -> Option<Output> {
    let mut child = env
        .cmd(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    env.record(&o);
    Some(o)
}

fn status(env: &TestEnv) -> serde_json::Value {
    let o = rotd_within(env, &["status", "--json"], Duration::from_secs(20))
        .expect("`rotd status` answered within 20 s");
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn next_run(env: &TestEnv, name: &str) -> String {
    status(env)["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .and_then(|x| x["next_run"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn healthz(d: &Daemon) -> Option<u16> {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
        .get(format!("{}/healthz", d.metrics))
        .send()
        .ok()
        .map(|r| r.status().as_u16())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sets the open-files limit (soft; the hard one stays) of a running process.
fn set_nofile(pid: u32, n: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a valid pid and valid rlimit structs.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: n.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Raises this test process's own open-files limit to its hard limit.
fn raise_own_nofile() {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on valid rlimit structs.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur), 0);
        cur.rlim_cur = cur.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &cur), 0);
    }
}

/// A connection to a Unix socket that never blocks: when the listener's backlog is
/// full it fails (`None`) instead of waiting for the daemon to accept.
fn connect_nonblocking(path: &Path) -> Option<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a fresh socket fd, a zeroed sockaddr_un filled within its bounds; the fd
    // is closed on every failure and owned by the UnixStream otherwise.
    unsafe {
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return None;
        }
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        if bytes.len() >= addr.sun_path.len() {
            libc::close(fd);
            return None;
        }
        for (i, b) in bytes.iter().enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        let r = libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        if r != 0 {
            libc::close(fd);
            return None;
        }
        Some(UnixStream::from_raw_fd(fd))
    }
}

/// Lets uid 65534 reach the socket file, so that the daemon's own check decides.
fn open_socket_to_nobody(env: &TestEnv) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(
        env.path("rotd.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
}

/// Runs a Python script as uid/gid 65534 (nobody).
fn python_as_nobody(script: &str) -> Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

#[test]
fn a_300_mb_request_line_without_newline_does_not_grow_the_daemon() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    let d = start(&env);
    let pid = d.pid();
    let rss_before = rss_kib(pid);
    let mut s = UnixStream::connect(env.path("rotd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let reader = s.try_clone().unwrap();
    let answer = std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(reader).read_line(&mut line);
        line
    });
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    for _ in 0..300 {
        if s.write_all(&chunk).is_err() {
            break; // the daemon hung up: what it should do
        }
        sent += chunk.len();
    }
    let rss = rss_kib(pid);
    eprintln!(
        "sent {} MiB; daemon RSS {rss_before} -> {rss} KiB",
        sent >> 20
    );
    assert!(
        rss < 100 * 1024,
        "the daemon grew to {rss} KiB reading one request line"
    );
    assert!(sent < 300 << 20, "the daemon read all 300 MB");
    drop(s);
    let answer = answer.join().unwrap();
    env.record_text(&answer);
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
    assert_eq!(v["ok"], false, "{answer:?}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("longer than"),
        "the answer names the limit: {answer:?}"
    );
    // Other clients are still served.
    assert_eq!(status(&env)["daemon"], true);
}

#[test]
fn a_uid_that_is_not_allowed_is_refused_before_it_sends_anything() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    let d = start(&env);
    open_socket_to_nobody(&env);
    // Connects, sends nothing and waits for an answer; then (a second connection)
    // pushes 300 MB without a newline: the daemon must not read it.
    let script = format!(
        r#"
import json, socket
path = {path:?}
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(path)
try:
    answer = s.makefile().readline()
except Exception as e:
    answer = "no answer: %r" % e
s.close()
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(path)
sent = 0
chunk = b"x" * (1 << 20)
try:
    for _ in range(300):
        s.sendall(chunk)
        sent += len(chunk)
except Exception:
    pass
print(json.dumps({{"answer": answer, "sent": sent}}))
"#,
        path = env.path("rotd.sock").display().to_string()
    );
    let o = python_as_nobody(&script);
    assert!(o.status.success(), "{}", stderr(&o));
    env.record(&o);
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let answer = out["answer"].as_str().unwrap();
    assert!(
        answer.contains("uid 65534 is not allowed"),
        "refused at once, before any request: {answer:?}"
    );
    let rss = rss_kib(d.pid());
    assert!(
        rss < 100 * 1024,
        "the daemon read a refused client's data: RSS {rss} KiB"
    );
    assert!(
        out["sent"].as_u64().unwrap() < 300 << 20,
        "the daemon took 300 MB from a refused client: {out}"
    );
    assert!(
        env.history_json(Some("apm-token")).is_empty(),
        "nothing rotated"
    );
    assert_eq!(status(&env)["daemon"], true);
}

#[test]
fn two_thousand_idle_connections_on_the_socket_and_the_metrics_port_do_not_starve_the_daemon() {
    raise_own_nofile();
    let env = TestEnv::new();
    // A scheduled rotation every 3 s goes on during the flood.
    files_schedule(&env, "apm-token", "*/3 * * * * *", "");
    let d = start(&env);
    let pid = d.pid();
    // The open-files limit systemd gives a service by default.
    set_nofile(pid, 1024);
    let metrics: std::net::SocketAddr = d.metrics.trim_start_matches("http://").parse().unwrap();
    let socket = env.path("rotd.sock");
    let flood_started = Instant::now();
    let mut held = Vec::new();
    let mut tcp = Vec::new();
    for _ in 0..2000 {
        if let Some(s) = connect_nonblocking(&socket) {
            held.push(s);
        }
        if let Ok(s) = std::net::TcpStream::connect_timeout(&metrics, Duration::from_millis(200)) {
            tcp.push(s);
        }
    }
    eprintln!(
        "flood: {} socket and {} metrics connections open after {:?}",
        held.len(),
        tcp.len(),
        flood_started.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(pid);
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(pid) - t0;
    eprintln!("during the flood: {fds} open fds, {ticks} CPU ticks in 3 s");
    assert!(
        ticks <= 50,
        "the daemon burnt {ticks} CPU ticks in 3 s under an idle flood"
    );
    assert!(fds < 400, "the daemon holds {fds} fds for idle clients");
    // After the idle timeout the daemon answers again, the flood still connected.
    let wait = Duration::from_secs(12).saturating_sub(flood_started.elapsed());
    std::thread::sleep(wait);
    let mut healthy = None;
    for _ in 0..10 {
        healthy = healthz(&d);
        if healthy == Some(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(healthy, Some(200), "/healthz after the idle timeout");
    assert_eq!(status(&env)["daemon"], true);
    // The scheduled rotation during the flood succeeded, or said why not.
    wait_until(
        "a scheduled rotation that succeeded or logged its error",
        Duration::from_secs(20),
        || {
            env.history_json(Some("apm-token"))
                .iter()
                .any(|e| e["step"] == "succeeded" && e["trigger"] == "schedule")
                || daemon_log(&env)
                    .lines()
                    .any(|l| l.contains("ERROR") && l.contains("apm-token"))
        },
    );
    drop(held);
    drop(tcp);
}

#[test]
fn a_flood_that_exhausts_the_fd_table_is_met_with_backoff_not_a_busy_loop() {
    raise_own_nofile();
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "* * * * * *", "retry_backoff = \"1s\"\n");
    let mut d = start(&env);
    let pid = d.pid();
    std::thread::sleep(Duration::from_millis(500));
    // Room for a few clients only: the flood runs the daemon into EMFILE.
    let base = open_fds(pid) as u64;
    set_nofile(pid, base + 12);
    let socket = env.path("rotd.sock");
    let held: Vec<UnixStream> = (0..300)
        .filter_map(|_| connect_nonblocking(&socket))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(pid) - t0;
    eprintln!(
        "{} connections held; {ticks} CPU ticks in 3 s at EMFILE",
        held.len()
    );
    assert!(
        ticks <= 60,
        "the accept loop spins at EMFILE: {ticks} CPU ticks in 3 s"
    );
    let log = daemon_log(&env);
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("ccept"))
        .count();
    assert!(
        (1..=5).contains(&warnings),
        "one rate-limited warning about accept, got {warnings}: {log}"
    );
    // The rotations that failed for want of fds were logged.
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("apm-token")),
        "a failed scheduled rotation leaves a log line: {log}"
    );
    drop(held);
    set_nofile(pid, 1024);
    // The dead connections left in the backlog are accepted and dropped first; a
    // client that arrives meanwhile may be told to try again.
    wait_until(
        "the daemon's status after the flood",
        Duration::from_secs(10),
        || {
            rotd_within(&env, &["status", "--json"], Duration::from_secs(10))
                .is_some_and(|o| o.status.success() && stdout(&o).contains("\"daemon\": true"))
        },
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env
        .history_json(Some("apm-token"))
        .iter()
        .any(|e| e["step"] == "succeeded" && e["trigger"] == "schedule")
    {
        assert!(
            Instant::now() < deadline,
            "no scheduled rotation after the flood: {}",
            daemon_log(&env)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(d.alive());
}

#[test]
fn a_rotation_that_errors_before_it_starts_is_logged_by_the_daemon() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "* * * * * *", "");
    // The lock file cannot be opened: the engine returns an error, not an outcome.
    std::fs::create_dir_all(env.store.join(".git/rotd-locks/apm-token.lock")).unwrap();
    let _d = start(&env);
    wait_until(
        "the engine's error in the daemon's log",
        Duration::from_secs(10),
        || {
            daemon_log(&env)
                .lines()
                .any(|l| l.contains("ERROR") && l.contains("apm-token") && l.contains("rotd-locks"))
        },
    );
}

#[test]
fn a_jitter_of_a_hundred_million_years_is_refused_by_check_with_file_and_line() {
    let env = TestEnv::new();
    files_schedule(
        &env,
        "apm-token",
        "0 0 4 * * *",
        "jitter = \"100000000y\"\n",
    );
    let o = env.rotd(&["check"]);
    assert_eq!(o.status.code(), Some(78), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("apm-token.toml:3") && stderr(&o).contains("jitter"),
        "{}",
        stderr(&o)
    );
    // Every duration has its bound.
    for (field, value) in [
        ("grace", "400d"),
        ("max_age", "20y"),
        ("retry_backoff", "2d"),
    ] {
        files_schedule(
            &env,
            "apm-token",
            "0 0 4 * * *",
            &format!("{field} = \"{value}\"\n"),
        );
        let o = env.rotd(&["check"]);
        assert_eq!(o.status.code(), Some(78), "{field}: {}", stdout(&o));
        assert!(
            stderr(&o).contains("apm-token.toml:3") && stderr(&o).contains(field),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn hot_reloading_a_huge_jitter_keeps_the_daemon_and_its_old_schedule() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    let mut d = start(&env);
    assert!(next_run(&env, "apm-token").ends_with("T04:00:00Z"));
    files_schedule(
        &env,
        "apm-token",
        "0 30 5 * * *",
        "jitter = \"100000000y\"\n",
    );
    wait_until(
        "the schedule error in status",
        Duration::from_secs(10),
        || {
            status(&env)["schedule_errors"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
        },
    );
    assert!(d.alive(), "the daemon survived the reload");
    let s = status(&env);
    assert!(
        s["schedule_errors"][0]
            .as_str()
            .unwrap()
            .contains("apm-token.toml:3"),
        "{s}"
    );
    assert!(next_run(&env, "apm-token").ends_with("T04:00:00Z"));
    assert_eq!(healthz(&d), Some(200));
}

#[test]
fn a_cron_that_never_fires_is_refused_by_check() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 0 31 2 *", "");
    let o = env.rotd(&["check"]);
    assert_eq!(o.status.code(), Some(78), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("apm-token.toml:2") && stderr(&o).contains("never fires"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_window_the_cron_never_fires_in_is_warned_about_by_check() {
    let env = TestEnv::new();
    files_schedule(
        &env,
        "apm-token",
        "0 0 12 * * *",
        "window = \"02:00-05:00\"\n",
    );
    let o = env.rotd(&["check"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        text.contains("warning") && text.contains("apm-token.toml:3") && text.contains("window"),
        "{text}"
    );
    // A cron that fires inside its window: no warning.
    files_schedule(
        &env,
        "apm-token",
        "0 0 3 * * *",
        "window = \"02:00-05:00\"\n",
    );
    let o = env.rotd(&["check"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!format!("{}{}", stdout(&o), stderr(&o)).contains("warning"));
}

#[test]
fn a_process_of_the_daemons_own_user_cannot_read_its_memory_and_it_dumps_no_core() {
    use std::os::unix::process::CommandExt;
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    // The daemon runs as nobody, like the hostile process below.
    let o = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(env.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let home = env.dir.path().to_owned();
    let d = start_with(&env, |c| {
        c.uid(65534).gid(65534).env("HOME", &home);
    });
    let pid = d.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], &["0", "0"], "{core}");
    // Same uid, no privileges: a non-dumpable process's /proc files are root's.
    let script = format!(
        "import sys\ntry:\n    open('/proc/{pid}/environ','rb').read()\n    print('read')\nexcept PermissionError:\n    print('denied')\n"
    );
    let o = python_as_nobody(&script);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "denied", "the daemon is dumpable");
}
