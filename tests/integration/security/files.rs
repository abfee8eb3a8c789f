//! Attacks on rotd through the files it reads and writes
//! (see the module list in `tests/integration/security/mod.rs`).
//!
//! The attacker here can write in a directory rotd delivers to (a consumer's config
//! directory) or in one holding a file rotd rewrites (`/etc/prometheus`): it puts a
//! link, a FIFO or a device where rotd expects a regular file, or relies on rotd
//! giving a file it rewrites a new owner.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
use crate::util::*;

const OLD: &str = "old-app-token-0123456789abcdef";
const PRIVATE: &str = "TOP-SECRET-ssh-host-key-material";

/// A `files` schedule `app-token` delivering `consumer/app.yml` then `consumer/token`,
/// imported with [`OLD`] and both files holding it; `probe` is appended.
fn app_token(env: &TestEnv, probe: &str) -> PathBuf {
    let consumer = env.path("consumer");
    fs::create_dir_all(&consumer).unwrap();
    env.write_schedule(
        "app-token",
        &format!(
            "name = \"app-token\"\ngrace = \"0s\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{c}/app.yml\"\ncontent = \"token: {{{{secret}}}}\\n\"\nmode = \"0600\"\n[[deliver]]\npath = \"{c}/token\"\ncontent = \"{{{{secret}}}}\"\nmode = \"0640\"\n{probe}",
            c = consumer.display()
        ),
    );
    let o = env.rotd_stdin(&["import", "app-token"], &format!("{OLD}\n"));
    assert!(o.status.success(), "{}", stderr(&o));
    fs::write(consumer.join("app.yml"), format!("token: {OLD}\n")).unwrap();
    consumer
}

/// A probe that always fails (nothing listens there): the rotation must roll back.
fn failing_probe() -> String {
    format!(
        "[probe]\nattempts = 1\ntimeout = \"2s\"\nhttp = {{ url = \"http://127.0.0.1:{}/\" }}\n",
        free_port()
    )
}

/// `rotd rotate NAME` with a deadline (a FIFO must not hang it) and an address-space
/// limit (a link to `/dev/zero` must not eat the machine's memory); output recorded.
/// Also returns the process's peak resident memory in KiB.
fn rotate_bounded(env: &TestEnv, name: &str) -> (Output, i64) {
    use std::os::unix::process::ExitStatusExt;
    let out = env.path(&format!("rotate-{name}.out"));
    let err = env.path(&format!("rotate-{name}.err"));
    let mut c = env.cmd(&["rotate", name]);
    c.stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // Waited for with wait4 below, which also gives its peak memory.
    #[allow(clippy::zombie_processes)]
    let mut child = c.spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let started = Instant::now();
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; the child is ours and not waited for elsewhere.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "wait4: {}", std::io::Error::last_os_error());
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "rotd rotate {name} hung for 60 s: {}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: fs::read(&out).unwrap(),
        stderr: fs::read(&err).unwrap(),
    };
    env.record(&o);
    let _ = fs::remove_file(&out);
    let _ = fs::remove_file(&err);
    (o, usage.ru_maxrss)
}

/// What a rotd run printed, stdout then stderr.
fn said(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// After a refused rotation: the target and every consumer file are as before, the
/// planted entry is still what the attacker made, and the private file's content is
/// nowhere in the consumer directory.
fn assert_untouched(env: &TestEnv, consumer: &Path, o: &Output, planted: &Path) {
    for f in walk(consumer) {
        let bytes = fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(PRIVATE),
            "{} holds a copy of the private file",
            f.display()
        );
    }
    assert_eq!(o.status.code(), Some(1), "{}", said(o));
    let err = said(o);
    assert!(
        err.contains(&planted.display().to_string()),
        "the error names the path: {err}"
    );
    assert_eq!(
        env.show("app-token"),
        OLD,
        "the old credential is still current"
    );
    assert_eq!(
        env.head_files(),
        vec!["secrets/app-token.age"],
        "no pending left"
    );
    assert_eq!(
        fs::read_to_string(consumer.join("app.yml")).unwrap(),
        format!("token: {OLD}\n"),
        "no deliver file was written before the refusal"
    );
}

/// A private file (0600) and a link to it at the deliver path `consumer/token`.
fn plant_link(env: &TestEnv, consumer: &Path, to: Option<&Path>) -> (PathBuf, PathBuf) {
    let private = env.path("private.key");
    fs::write(&private, PRIVATE).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
    let link = consumer.join("token");
    std::os::unix::fs::symlink(to.unwrap_or(&private), &link).unwrap();
    (private, link)
}

fn assert_link_kept(link: &Path, to: &Path, private: &Path) {
    let m = fs::symlink_metadata(link).unwrap();
    assert!(
        m.file_type().is_symlink(),
        "the link was replaced by a file"
    );
    assert_eq!(fs::read_link(link).unwrap(), to);
    assert_eq!(fs::read_to_string(private).unwrap(), PRIVATE);
    assert_eq!(
        fs::metadata(private).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn symlink_at_deliver_path_is_not_followed_nor_replaced_by_a_rotation() {
    let env = TestEnv::new();
    let consumer = app_token(&env, "");
    let (private, link) = plant_link(&env, &consumer, None);
    let (o, _) = rotate_bounded(&env, "app-token");
    assert!(said(&o).contains("symbolic link"), "{}", said(&o));
    assert_untouched(&env, &consumer, &o, &link);
    assert_link_kept(&link, &private, &private);
}

#[test]
fn symlink_at_deliver_path_is_not_copied_by_a_rollback() {
    let env = TestEnv::new();
    let consumer = app_token(&env, &failing_probe());
    let (private, link) = plant_link(&env, &consumer, None);
    let (o, _) = rotate_bounded(&env, "app-token");
    assert_link_kept(&link, &private, &private);
    assert_untouched(&env, &consumer, &o, &link);
}

#[test]
fn fifo_at_deliver_path_does_not_hang_the_rotation() {
    let env = TestEnv::new();
    let consumer = app_token(&env, &failing_probe());
    let fifo = consumer.join("token");
    let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(ok.success());
    let (o, _) = rotate_bounded(&env, "app-token");
    assert!(said(&o).contains("FIFO"), "{}", said(&o));
    assert_untouched(&env, &consumer, &o, &fifo);
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn link_to_dev_zero_at_deliver_path_does_not_eat_memory() {
    let env = TestEnv::new();
    let consumer = app_token(&env, &failing_probe());
    let zero = Path::new("/dev/zero");
    let (private, link) = plant_link(&env, &consumer, Some(zero));
    let (o, peak_kib) = rotate_bounded(&env, "app-token");
    assert!(
        peak_kib < 256 << 10,
        "rotd grew to {peak_kib} KiB reading /dev/zero"
    );
    assert!(said(&o).contains("symbolic link"), "{}", said(&o));
    assert_untouched(&env, &consumer, &o, &link);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), zero);
    assert!(fs::metadata(zero).unwrap().file_type().is_char_device());
    let _ = private;
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

const READER_LINE_COMMENT: &str = "  # the reader, for queries";

/// A Prometheus receiver laid out as on a host, under the env's root:
/// `etc/prometheus/web.yml` (a comment on the reader's line) and the agent's
/// `etc/prometheus-agent/`; the schedule `prom-remote-write` rotates the writer and
/// delivers `etc/prometheus-agent/{{username}}.password`.
struct Receiver {
    _prom: Prom,
    url: String,
    web: PathBuf,
    agent_dir: PathBuf,
    /// Why the writer's import was refused, if it was.
    imported: Option<String>,
}

fn receiver(env: &TestEnv) -> Receiver {
    let r = receiver_as(env, "writer-a");
    assert!(r.imported.is_none(), "{:?}", r.imported);
    r
}

/// [`receiver`], with the writer's credential imported under `writer` (whose import
/// may be refused: then `imported` holds what rotd said).
fn receiver_as(env: &TestEnv, writer: &str) -> Receiver {
    let root = env.dir.path();
    let etc = root.join("etc/prometheus");
    let agent_dir = root.join("etc/prometheus-agent");
    fs::create_dir_all(&etc).unwrap();
    fs::create_dir_all(&agent_dir).unwrap();
    let web = etc.join("web.yml");
    fs::write(
        &web,
        format!(
            "# receiver authentication (managed in part by rotd)\nbasic_auth_users:\n  prom-reader: {}{READER_LINE_COMMENT}\n  writer-a: {}\n",
            bcrypt_hash(READER_PW),
            bcrypt_hash(INITIAL_PW)
        ),
    )
    .unwrap();
    let prom = Prom::receiver(&root.join("receiver"), &web);
    prom.wait_ready(Some(("prom-reader", READER_PW)));
    let o = env.rotd_stdin(
        &["import", "prom-reader", "--username", "prom-reader"],
        &format!("{READER_PW}\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.rotd_stdin(
        &["import", "prom-remote-write", "--username", writer],
        &format!("{INITIAL_PW}\n"),
    );
    let r = Receiver {
        url: prom.url(),
        _prom: prom,
        web,
        agent_dir,
        imported: (!o.status.success()).then(|| said(&o)),
    };
    prom_schedule(env, &r, &r.url, 20);
    r
}

/// The schedule, probing the receiver at `url` (`attempts` times).
fn prom_schedule(env: &TestEnv, r: &Receiver, url: &str, attempts: u32) {
    env.write_schedule(
        "prom-remote-write",
        &format!(
            "name = \"prom-remote-write\"\ngrace = \"0s\"\n[target]\nkind = \"prometheus-remote-write\"\nurl = \"{url}\"\nweb_config = \"{web}\"\nusernames = [\"writer-a\", \"writer-b\"]\nquery_credential = \"prom-reader\"\nbcrypt_cost = 4\n[[deliver]]\npath = \"{agent}/{{{{username}}}}.password\"\ncontent = \"{{{{secret}}}}\"\nmode = \"0640\"\n[probe]\ntimeout = \"5s\"\nattempts = {attempts}\ninterval = \"250ms\"\n",
            web = r.web.display(),
            agent = r.agent_dir.display(),
        ),
    );
}

fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = fs::metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

#[test]
fn web_config_rewrite_keeps_owner_group_mode_and_comments_through_rotation_and_rollback() {
    if !is_root() {
        eprintln!("SKIPPED: giving web.yml to nobody:nogroup needs root");
        return;
    }
    let env = TestEnv::new();
    let r = receiver(&env);
    // Prometheus runs as nobody here and reads its web config through its group.
    std::os::unix::fs::chown(&r.web, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&r.web, fs::Permissions::from_mode(0o640)).unwrap();
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        owner_mode(&r.web),
        (65534, 65534, 0o640),
        "after a rotation"
    );
    let text = fs::read_to_string(&r.web).unwrap();
    assert!(
        text.contains(READER_LINE_COMMENT),
        "comment dropped: {text}"
    );
    assert!(
        text.contains("writer-b:") && !text.contains("writer-a:"),
        "{text}"
    );

    // A rotation that fails after apply and deliver (its probe finds nothing
    // listening) puts the files back: bytes, owner, group and mode.
    let password_file = r.agent_dir.join("writer-a.password");
    fs::write(&password_file, "stale").unwrap();
    std::os::unix::fs::chown(&password_file, Some(65534), Some(65534)).unwrap();
    fs::set_permissions(&password_file, fs::Permissions::from_mode(0o640)).unwrap();
    prom_schedule(&env, &r, &format!("http://127.0.0.1:{}", free_port()), 1);
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert_eq!(o.status.code(), Some(1), "{}", said(&o));
    assert!(said(&o).contains("rolled back"), "{}", said(&o));
    assert_eq!(
        fs::read_to_string(&r.web).unwrap(),
        text,
        "web.yml restored"
    );
    assert_eq!(
        owner_mode(&r.web),
        (65534, 65534, 0o640),
        "after a rollback"
    );
    assert_eq!(fs::read_to_string(&password_file).unwrap(), "stale");
    assert_eq!(
        owner_mode(&password_file),
        (65534, 65534, 0o640),
        "a restored deliver file keeps its owner too"
    );
}

#[test]
fn dotdot_username_is_not_rendered_into_a_deliver_path_by_recovery() {
    let env = TestEnv::new();
    // The deliver path is `etc/prometheus-agent/{{username}}.password`.
    let r = receiver_as(&env, "../../x");
    let escaped = env.path("x.password");
    if let Some(refused) = &r.imported {
        // Refused at the door: nothing can render it.
        assert!(refused.contains("username"), "{refused}");
        return;
    }
    // A crash after deliver; the next run's recovery renders the files of the
    // current record, whose username is `../../x`.
    let o = env.run(
        env.cmd(&["rotate", "prom-remote-write"])
            .env("ROTD_FAULT_KILL_AFTER", "deliver"),
    );
    assert!(!o.status.success(), "{}", said(&o));
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert!(
        !escaped.exists(),
        "rotd wrote {} outside the deliver directory: {}",
        escaped.display(),
        said(&o)
    );
    // The recovery is reported as incomplete (the consumers could not be put back on
    // that record); the rotation that follows may then succeed on writer-a.
    assert!(
        said(&o).contains("the value of {{username}} holds a `/`"),
        "{}",
        said(&o)
    );
    assert!(r.agent_dir.exists());
}

#[test]
fn identity_owned_by_another_user_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: giving the identity to nobody needs root");
        return;
    }
    let env = TestEnv::new();
    std::os::unix::fs::chown(&env.identity, Some(65534), Some(65534)).unwrap();
    let check = env.rotd(&["check"]);
    let import = env.rotd_stdin(&["import", "app-token"], "some-value-0123456789\n");
    std::os::unix::fs::chown(&env.identity, Some(0), Some(0)).unwrap();
    for o in [&check, &import] {
        assert!(!o.status.success(), "accepted a foreign identity");
        let err = stderr(o);
        assert!(
            err.contains(&format!("chown root {}", env.identity.display())),
            "the error gives the fix: {err}"
        );
    }
    // Through a link (to a file of rotd's own, even): refused, never followed.
    let real = env.path("keys/real.agekey");
    fs::rename(&env.identity, &real).unwrap();
    std::os::unix::fs::symlink(&real, &env.identity).unwrap();
    let o = env.rotd_stdin(&["import", "app-token"], "some-value-0123456789\n");
    fs::remove_file(&env.identity).unwrap();
    fs::rename(&real, &env.identity).unwrap();
    assert!(!o.status.success(), "followed a link to the identity");
    assert!(said(&o).contains("symbolic link"), "{}", said(&o));
}

/// The `ReadWritePaths=` of the systemd drop-in the README documents (step 4).
fn documented_read_write_paths() -> Vec<String> {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("**systemd**: allow rotd")
        .nth(1)
        .expect("the README's systemd step");
    let line = section
        .lines()
        .find_map(|l| l.split("ReadWritePaths=").nth(1))
        .expect("a ReadWritePaths= line in the README's systemd step");
    line.split_whitespace().map(str::to_owned).collect()
}

/// Runs `rotd rotate NAME` the way `ProtectSystem=strict` + `ReadWritePaths=` confine
/// it: in a private mount namespace the env's root is read-only, and each documented
/// path (mapped under the env's root; `/var/lib/rotd` is the store and its remote) is
/// bind-mounted writable on top, as systemd does.
fn rotate_confined(env: &TestEnv, name: &str, documented: &[String]) -> Output {
    let root = env.dir.path();
    let mut rw: Vec<PathBuf> = Vec::new();
    for p in documented {
        match p.as_str() {
            "/var/lib/rotd" => rw.extend([env.store.clone(), env.remote.clone()]),
            p => rw.push(root.join(p.trim_start_matches('/'))),
        }
    }
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "--", "sh", "-ec"])
        .arg(
            "root=$1; shift\n\
             mount --bind \"$root\" \"$root\"\n\
             mount -o remount,bind,ro \"$root\"\n\
             while [ \"$1\" != -- ]; do\n\
               mount --bind \"$1\" \"$1\"; mount -o remount,bind,rw \"$1\"; shift\n\
             done\n\
             shift\n\
             exec \"$@\"",
        )
        .arg("sh")
        .arg(root)
        .args(&rw)
        .arg("--");
    let rotd = env.cmd(&["rotate", name]);
    c.arg(rotd.get_program()).args(rotd.get_args());
    for (k, v) in rotd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    env.run(&mut c)
}

#[test]
fn documented_systemd_drop_in_lets_the_prometheus_rotation_write_the_web_config() {
    if !is_root() || !have("unshare") {
        eprintln!("SKIPPED: needs root and unshare(1) for a mount namespace");
        return;
    }
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status();
    if !probe.map(|s| s.success()).unwrap_or(false) {
        eprintln!("SKIPPED: cannot make a mount namespace here");
        return;
    }
    let env = TestEnv::new();
    let r = receiver(&env);
    let documented = documented_read_write_paths();
    let base = ["/var/lib/rotd".to_owned()];

    // The form documented before: a file. Renaming a temp file over it needs its
    // directory, so the rotation fails (and rolls back) — the reproduction is faithful.
    let file_form = [
        "/etc/prometheus/web.yml".to_owned(),
        "/etc/prometheus-agent".to_owned(),
    ];
    let o = rotate_confined(
        &env,
        "prom-remote-write",
        &[&base[..], &file_form[..]].concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", said(&o));
    let web_err = format!("cannot write {}: Read-only file system", r.web.display());
    assert!(said(&o).contains(&web_err), "{}", said(&o));

    // The drop-in as the README documents it now.
    let o = rotate_confined(
        &env,
        "prom-remote-write",
        &[&base[..], &documented[..]].concat(),
    );
    assert!(
        o.status.success(),
        "the documented drop-in {documented:?} does not let rotd rotate: {}",
        stderr(&o)
    );
    let text = fs::read_to_string(&r.web).unwrap();
    assert!(text.contains("writer-b:"), "{text}");
    assert!(r.agent_dir.join("writer-b.password").exists());
}
