//! The store remote over a REAL SSH server (DESIGN §7, "real transports"): the
//! distribution's `sshd` on 127.0.0.1 with its own config, a dedicated `rotd-git`
//! user whose shell is `git-shell`, one key per party in `authorized_keys`, and the
//! shipped update hook (`packaging/git-server/update`) that lets the rotator update
//! the branches and each host only its own acknowledgement ref. The rotator and the
//! agent reach it through libgit2's SSH transport with their deploy keys, and check
//! the server's host key against `remote_known_hosts`.
//!
//! Needs root (CI runs as root): the test creates the `rotd-git` user when missing and
//! starts `sshd`, which must run as root to change to that user.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::util::*;

const HOST: &str = "web-1";
const GIT_USER: &str = "rotd-git";

fn rotd_ok(env: &TestEnv, args: &[&str]) -> String {
    let o = env.rotd(args);
    assert!(
        o.status.success(),
        "rotd {args:?} failed ({:?}):\n{}\n{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn run_ok(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}{}", stdout(&o), stderr(&o));
    o
}

/// The dedicated git user (shell git-shell, no password, not locked: with
/// `UsePAM no` sshd refuses a locked account).
fn git_user() {
    let exists = Command::new("getent")
        .args(["passwd", GIT_USER])
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let o = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
            .args(["--shell", "/usr/bin/git-shell", GIT_USER])
            .output()
            .unwrap();
        // Another test may have created it meanwhile.
        assert!(
            o.status.success() || stderr(&o).contains("already exists"),
            "useradd (needs root): {}",
            stderr(&o)
        );
    }
    run_ok(Command::new("usermod").args(["-p", "*", GIT_USER]));
}

/// A running sshd serving the env's bare remote as `rotd-git`.
struct Sshd {
    child: Child,
    port: u16,
    /// `ssh-ed25519 AAAA…` of the server's host key.
    host_key: String,
    dir: PathBuf,
    remote: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The remote goes back to root before the env's leak check opens it.
        let _ = Command::new("chown")
            .args(["-R", "root:root"])
            .arg(&self.remote)
            .status();
    }
}

impl Sshd {
    /// Starts sshd for `env` with one `authorized_keys` line per (pusher, public key).
    fn start(env: &TestEnv, keys: &[(&str, &str)]) -> Sshd {
        git_user();
        let root = env.dir.path();
        // rotd-git must reach the remote and read authorized_keys; nothing else.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).unwrap();
        let dir = env.path("sshd");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let host_key = ssh_keygen(&dir.join("host_ed25519"), "sshd");
        let host_key = host_key
            .rsplit_once(' ')
            .map_or(host_key.clone(), |(k, _)| k.to_owned());
        let mut auth = String::new();
        for (who, key) in keys {
            auth.push_str(&format!(
                "environment=\"ROTD_PUSHER={who}\",no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding {key}\n"
            ));
        }
        std::fs::write(dir.join("authorized_keys"), auth).unwrap();
        std::fs::set_permissions(
            dir.join("authorized_keys"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let hook = env.remote.join("hooks/update");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/git-server/update"),
            &hook,
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        run_ok(
            Command::new("chown")
                .args(["-R", &format!("{GIT_USER}:")])
                .arg(&env.remote),
        );
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPubkeyAuthentication yes\nPermitUserEnvironment ROTD_PUSHER\nAllowUsers {GIT_USER}\nPermitRootLogin no\nX11Forwarding no\nAllowTcpForwarding no\nLogLevel VERBOSE\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .expect("sshd (apt-get install openssh-server)");
        wait_until("sshd answers", Duration::from_secs(20), || {
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut banner = [0u8; 8];
            s.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0-"
        });
        Sshd {
            child,
            port,
            host_key,
            dir,
            remote: env.remote.clone(),
        }
    }

    fn url(&self) -> String {
        format!(
            "ssh://{GIT_USER}@127.0.0.1:{}{}",
            self.port,
            self.remote.display()
        )
    }

    /// A known_hosts file at `path` listing `key` for this server.
    fn known_hosts(&self, path: &Path, key: &str) {
        std::fs::write(path, format!("[127.0.0.1]:{} {key}\n", self.port)).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

/// `git` on the remote (owned by the git user: `safe.directory` lets root read it).
fn remote_git(sshd: &Sshd, args: &[&str]) -> Output {
    Command::new("git")
        .args(["-c", "safe.directory=*", "-C"])
        .arg(&sshd.remote)
        .args(args)
        .output()
        .unwrap()
}

/// The rotator (signing, host web-1 consuming `s1`) and web-1's agent, both over SSH
/// with their own deploy keys; s1 rotated once.
struct Fleet {
    sshd: Sshd,
    env: TestEnv,
    agent_config: PathBuf,
    delivered: PathBuf,
}

fn fleet() -> Fleet {
    let env = TestEnv::uninitialised();
    std::fs::create_dir_all(env.path("agent/keys")).unwrap();
    let rotator_deploy = ssh_keygen(&env.path("keys/deploy"), "rotator");
    let host_deploy = ssh_keygen(&env.path("agent/keys/web-1.deploy"), HOST);
    let sshd = Sshd::start(&env, &[("rotator", &rotator_deploy), (HOST, &host_deploy)]);
    sshd.known_hosts(&env.path("keys/known_hosts"), &sshd.host_key);

    let rotator = ssh_keygen(&env.path("keys/signing"), "rotd");
    std::fs::write(
        env.path("keys/allowed_signers"),
        format!("rotd@localhost {rotator}\n"),
    )
    .unwrap();
    let host_recipient = age_keygen(&env.path("agent/keys/web-1.agekey"));
    let host_signer = ssh_keygen(&env.path("agent/keys/web-1.sign"), HOST);
    let cfg = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(
            &format!("remote = \"{}\"", env.remote.display()),
            &format!(
                "remote = \"{}\"\nremote_ssh_key = \"keys/deploy\"\nremote_known_hosts = \"keys/known_hosts\"",
                sshd.url()
            ),
        )
        .replacen(
            "\n\n[daemon]",
            "\nsigning_key = \"keys/signing\"\nallowed_signers = \"keys/allowed_signers\"\n\n[daemon]",
            1,
        );
    std::fs::write(
        &env.config,
        format!(
            "{cfg}\n[hosts.{HOST}]\nrecipient = \"{host_recipient}\"\nsigner = \"{host_signer}\"\n"
        ),
    )
    .unwrap();
    rotd_ok(&env, &["init"]);
    std::fs::create_dir_all(env.path("out")).unwrap();
    env.write_schedule(
        "s1",
        &format!(
            "name = \"s1\"\nschedule = \"0 0 4 * * *\"\ngrace = \"0s\"\nconsumers = [\"{HOST}\"]\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/s1.txt\"\ncontent = \"{{{{secret}}}}\\n\"\n",
            env.path("out").display()
        ),
    );
    rotd_ok(&env, &["rotate", "s1"]);
    let delivered = env.path("agent/out/s1.txt");
    env.allow_holder(&delivered);
    std::fs::copy(
        env.path("keys/known_hosts"),
        env.path("agent/keys/known_hosts"),
    )
    .unwrap();
    let agent_config = env.path("agent/agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "host = \"{HOST}\"\n[store]\nremote = \"{}\"\nremote_ssh_key = \"keys/web-1.deploy\"\nremote_known_hosts = \"keys/known_hosts\"\npath = \"store\"\nidentity = \"keys/web-1.agekey\"\nsigning_key = \"keys/web-1.sign\"\nallowed_signers = \"{}\"\n[[secret]]\nname = \"s1\"\n[[secret.deliver]]\npath = \"{}\"\ncontent = \"{{{{secret}}}}\\n\"\n",
            sshd.url(),
            env.path("keys/allowed_signers").display(),
            delivered.display()
        ),
    )
    .unwrap();
    Fleet {
        sshd,
        env,
        agent_config,
        delivered,
    }
}

impl Fleet {
    fn agent_once(&self) -> Output {
        let mut c = Command::new(rotd_bin());
        c.arg("--config")
            .arg(&self.agent_config)
            .args(["agent", "--once"])
            .env("ROTD_LOG", "debug");
        self.env.run(&mut c)
    }

    fn main_tip(&self) -> String {
        stdout(&remote_git(&self.sshd, &["rev-parse", "refs/heads/main"]))
            .trim()
            .to_owned()
    }
}

#[test]
fn rotator_and_agent_rotate_deliver_acknowledge_and_retire_over_ssh() {
    let f = fleet();
    // The rotator's signed commits are on the remote's branch.
    let log = stdout(&remote_git(&f.sshd, &["log", "--format=%G? %s", "main"]));
    assert!(log.lines().count() >= 3, "{log}");
    assert!(log.contains("succeeded"), "{log}");

    // The agent clones over SSH, delivers and acknowledges.
    let o = f.agent_once();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&f.delivered).unwrap(),
        format!("{}\n", f.env.show("s1"))
    );
    let ack = stdout(&remote_git(
        &f.sshd,
        &["log", "-1", "--format=%B", "refs/rotd/acks/web-1"],
    ));
    assert!(ack.contains("Rotd-Ack: s1 "), "{ack}");

    // A second rotation, delivered and acknowledged; the rotator fetches the
    // acknowledgements over SSH (one fetch of refs/rotd/acks/*) when it retires.
    rotd_ok(&f.env, &["rotate", "s1"]);
    let o = f.agent_once();
    assert!(o.status.success(), "{}", stderr(&o));
    rotd_ok(&f.env, &["retire", "s1"]);
    let remote_ack = stdout(&remote_git(&f.sshd, &["rev-parse", "refs/rotd/acks/web-1"]));
    let local_ack = stdout(&git(&f.env.store, &["rev-parse", "refs/rotd/acks/web-1"]));
    assert_eq!(
        local_ack, remote_ack,
        "the rotator holds web-1's latest ack"
    );
    let ack = stdout(&git(
        &f.env.store,
        &["log", "-1", "--format=%B", "refs/rotd/acks/web-1"],
    ));
    let rotation = f
        .env
        .age_plaintext(&std::fs::read(f.env.store.join("secrets/s1.age")).unwrap());
    let rotation = rotation
        .lines()
        .find_map(|l| l.strip_prefix("rotation: "))
        .unwrap()
        .trim()
        .to_owned();
    assert!(ack.contains(&format!("Rotd-Ack: s1 {rotation}")), "{ack}");
    // Every connection authenticated with a key and was served by git-shell.
    let sshd = f.sshd.log();
    assert!(sshd.contains("Accepted publickey for rotd-git"), "{sshd}");
}

#[test]
fn the_git_server_lets_a_host_push_only_its_own_ack_ref() {
    let f = fleet();
    let main = f.main_tip();
    // web-1's deploy key, used with the stock git client, on the branch: refused.
    let ssh = format!(
        "ssh -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
        f.env.path("agent/keys/web-1.deploy").display(),
        f.env.path("agent/keys/known_hosts").display()
    );
    let work = f.env.path("hostile");
    run_ok(
        Command::new("git")
            .args(["clone", "-q", &f.sshd.url()])
            .arg(&work)
            .env("GIT_SSH_COMMAND", &ssh),
    );
    run_ok(Command::new("git").arg("-C").arg(&work).args([
        "-c",
        "user.name=x",
        "-c",
        "user.email=x@x",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "forged",
    ]));
    let o = Command::new("git")
        .arg("-C")
        .arg(&work)
        .args(["push", "origin", "HEAD:refs/heads/main"])
        .env("GIT_SSH_COMMAND", &ssh)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("web-1 may not update refs/heads/main"),
        "{}",
        stderr(&o)
    );
    assert_eq!(f.main_tip(), main, "the branch is untouched");

    // rotd agent claiming to be another host: its ack push is refused, said clearly,
    // and the pass fails.
    let cfg = std::fs::read_to_string(&f.agent_config)
        .unwrap()
        .replace("host = \"web-1\"", "host = \"web-2\"");
    std::fs::write(&f.agent_config, cfg).unwrap();
    let o = f.agent_once();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("refused the acknowledgement refs/rotd/acks/web-2")
            && log
                .contains("the remote said: rotd store: web-1 may not update refs/rotd/acks/web-2"),
        "{log}"
    );
    let acks = remote_git(&f.sshd, &["for-each-ref", "refs/rotd/acks"]);
    assert_eq!(stdout(&acks).trim(), "", "no ack ref was written");
}

#[test]
fn a_server_whose_host_key_is_not_the_known_one_gets_nothing() {
    let f = fleet();
    let main = f.main_tip();
    // A machine in the middle: the known key is another one.
    let other = ssh_keygen(&f.env.path("keys/other_host"), "other");
    let other = other
        .rsplit_once(' ')
        .map_or(other.clone(), |(k, _)| k.to_owned());
    f.sshd.known_hosts(&f.env.path("keys/known_hosts"), &other);
    f.sshd
        .known_hosts(&f.env.path("agent/keys/known_hosts"), &other);

    // The rotator treats it as a remote it cannot reach: it rotates on its own store
    // and pushes later (DESIGN §5), sending nothing to the impostor.
    let o = f.env.rotd(&["rotate", "s1"]);
    let log = stderr(&o);
    assert!(
        log.contains("is not the one") && log.contains("known_hosts"),
        "{log}"
    );
    assert!(log.contains("pushed later"), "{log}");
    assert_eq!(f.main_tip(), main, "nothing was pushed");
    let o = f.agent_once();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(log.contains("is not the one"), "{log}");
    assert!(!f.delivered.exists(), "nothing was delivered");

    // Unlisted: refused with the way to add it.
    std::fs::write(f.env.path("keys/known_hosts"), "").unwrap();
    let o = f.env.rotd(&["rotate", "s1"]);
    assert!(stderr(&o).contains("ssh-keyscan"), "{}", stderr(&o));
    assert_eq!(f.main_tip(), main, "nothing was pushed");

    // The right key: everything works again, and what was rotated meanwhile is pushed.
    f.sshd
        .known_hosts(&f.env.path("keys/known_hosts"), &f.sshd.host_key);
    f.sshd
        .known_hosts(&f.env.path("agent/keys/known_hosts"), &f.sshd.host_key);
    rotd_ok(&f.env, &["rotate", "s1"]);
    let head = stdout(&git(&f.env.store, &["rev-parse", "HEAD"]));
    assert_eq!(f.main_tip(), head.trim());
    let o = f.agent_once();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn without_remote_known_hosts_the_users_known_hosts_decides() {
    let f = fleet();
    let main = f.main_tip();
    let cfg = std::fs::read_to_string(&f.env.config)
        .unwrap()
        .replace("remote_known_hosts = \"keys/known_hosts\"\n", "");
    std::fs::write(&f.env.config, cfg).unwrap();
    let home = f.env.path("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let rotate = || {
        let mut c = Command::new(rotd_bin());
        c.arg("--config")
            .arg(&f.env.config)
            .args(["rotate", "s1"])
            .env("ROTD_LOG", "debug")
            .env("HOME", &home);
        f.env.run(&mut c)
    };
    // Not in ~/.ssh/known_hosts: libgit2 refuses the server.
    let o = rotate();
    assert!(
        stderr(&o).contains("invalid or unknown remote ssh hostkey"),
        "{}",
        stderr(&o)
    );
    assert_eq!(f.main_tip(), main, "nothing was pushed");
    // Listed there: accepted.
    f.sshd
        .known_hosts(&home.join(".ssh/known_hosts"), &f.sshd.host_key);
    let o = rotate();
    assert!(o.status.success(), "{}", stderr(&o));
    let head = stdout(&git(&f.env.store, &["rev-parse", "HEAD"]));
    assert_eq!(f.main_tip(), head.trim());
}
