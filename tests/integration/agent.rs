//! `rotd agent` (DESIGN §7): a consumer host pulls its secrets from the store remote,
//! delivers them and acknowledges on `refs/rotd/acks/HOST`. Real git (a bare remote),
//! the real rotd binary as rotator and as agent, stock `age-keygen` / `ssh-keygen`,
//! and `git verify-commit` to check the acknowledgements; the agent is also killed
//! (SIGKILL) at its two crash points and the next pass must complete the work.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const HOST: &str = "web-1";
const ACKS: &str = "refs/rotd/acks/web-1";

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

/// An OpenSSH ed25519 key made by the stock `ssh-keygen`; returns its public line.
fn ssh_key(path: &Path) -> String {
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read_to_string(format!("{}.pub", path.display()))
        .unwrap()
        .trim()
        .to_owned()
}

/// A signing rotator with host web-1 consuming `s1` (a `files` secret), rotated once,
/// and web-1's agent config (`agent/agent.toml`, delivering to `agent/out/s1.txt`).
struct Fleet {
    env: TestEnv,
    agent_config: PathBuf,
    delivered: PathBuf,
    /// `ssh-ed25519 …` of web-1's signing key.
    host_signer: String,
    host_recipient: String,
}

fn fleet() -> Fleet {
    let env = TestEnv::uninitialised();
    let rotator = ssh_key(&env.path("keys/signing"));
    std::fs::write(
        env.path("keys/allowed_signers"),
        format!("rotd@localhost {rotator}\n"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(&env.config).unwrap().replacen(
        "\n\n[daemon]",
        "\nsigning_key = \"keys/signing\"\nallowed_signers = \"keys/allowed_signers\"\n\n[daemon]",
        1,
    );
    std::fs::create_dir_all(env.path("agent/keys")).unwrap();
    let host_recipient = age_keygen(&env.path("agent/keys/web-1.agekey"));
    let host_signer = ssh_key(&env.path("agent/keys/web-1.sign"));
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
            "name = \"s1\"\nschedule = \"0 0 4 * * *\"\ngrace = \"0s\"\nconsumers = [\"{HOST}\"]\nack_timeout = \"2h\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/s1.txt\"\ncontent = \"{{{{secret}}}}\\n\"\n",
            env.path("out").display()
        ),
    );
    rotd_ok(&env, &["check"]);
    rotd_ok(&env, &["rotate", "s1"]);
    let delivered = env.path("agent/out/s1.txt");
    env.allow_holder(&delivered);
    let agent_config = env.path("agent/agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "host = \"{HOST}\"\n[store]\nremote = \"{}\"\npath = \"store\"\nidentity = \"keys/web-1.agekey\"\nsigning_key = \"keys/web-1.sign\"\nallowed_signers = \"{}\"\npoll = \"30s\"\n[[secret]]\nname = \"s1\"\n[[secret.deliver]]\npath = \"{}\"\ncontent = \"{{{{secret}}}}\\n\"\nmode = \"0640\"\n",
            env.remote.display(),
            env.path("keys/allowed_signers").display(),
            delivered.display()
        ),
    )
    .unwrap();
    Fleet {
        env,
        agent_config,
        delivered,
        host_signer,
        host_recipient,
    }
}

impl Fleet {
    /// `rotd agent --once` with web-1's config; its output is leak-checked.
    fn agent_once(&self) -> Output {
        let mut c = Command::new(rotd_bin());
        c.arg("--config")
            .arg(&self.agent_config)
            .args(["agent", "--once"])
            .env("ROTD_LOG", "trace");
        self.env.run(&mut c)
    }

    /// `rotd agent --once` with the crash hook set to `step`.
    fn agent_once_killed_after(&self, step: &str) -> Output {
        let mut c = Command::new(rotd_bin());
        c.arg("--config")
            .arg(&self.agent_config)
            .args(["agent", "--once"])
            .env("ROTD_LOG", "trace")
            .env("ROTD_FAULT_KILL_AFTER", step);
        self.env.run(&mut c)
    }

    fn agent_ok(&self) -> String {
        let o = self.agent_once();
        assert!(
            o.status.success(),
            "rotd agent --once failed ({:?}):\n{}",
            o.status.code(),
            stderr(&o)
        );
        stderr(&o)
    }

    fn delivered(&self) -> String {
        std::fs::read_to_string(&self.delivered).unwrap()
    }

    /// The rotation id of s1's current record at the rotator's HEAD.
    fn rotation(&self) -> String {
        let bytes = std::fs::read(self.env.store.join("secrets/s1.age")).unwrap();
        let plain = self.env.age_plaintext(&bytes);
        plain
            .lines()
            .find_map(|l| l.strip_prefix("rotation: "))
            .expect("a rotated record names its rotation")
            .trim()
            .to_owned()
    }

    /// (number of ack commits, message of the tip) on the remote; None without acks.
    fn acks(&self) -> Option<(usize, String)> {
        let count = git(&self.env.remote, &["rev-list", "--count", ACKS]);
        if !count.status.success() {
            return None;
        }
        let n = stdout(&count).trim().parse().unwrap();
        let msg = stdout(&git(&self.env.remote, &["log", "-1", "--format=%B", ACKS]));
        Some((n, msg))
    }

    /// `git verify-commit` of the remote's ack tip, with only web-1's key allowed.
    fn verify_ack_tip(&self) -> Output {
        let allowed = self.env.path("agent/acks_allowed_signers");
        std::fs::write(
            &allowed,
            format!("rotd-agent@{HOST} {}\n", self.host_signer),
        )
        .unwrap();
        Command::new("git")
            .arg("-C")
            .arg(&self.env.remote)
            .args(["-c", "gpg.format=ssh", "-c"])
            .arg(format!("gpg.ssh.allowedSignersFile={}", allowed.display()))
            .args(["verify-commit", ACKS])
            .output()
            .unwrap()
    }
}

#[test]
fn agent_once_delivers_the_current_secret_and_pushes_a_signed_ack_of_its_rotation() {
    let f = fleet();
    let log = f.agent_ok();
    let secret = f.env.show("s1");
    assert_eq!(f.delivered(), format!("{secret}\n"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&f.delivered)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "the deliver mode is applied");
    let rotation = f.rotation();
    assert!(
        log.contains(&format!("delivered s1 rotation {rotation}")),
        "{log}"
    );
    assert!(log.contains("acknowledged"), "{log}");
    let (n, msg) = f.acks().expect("refs/rotd/acks/web-1 exists on the remote");
    assert_eq!(n, 1);
    let trailers: Vec<&str> = msg.lines().filter(|l| l.starts_with("Rotd-Ack:")).collect();
    assert_eq!(
        trailers,
        [format!("Rotd-Ack: s1 {rotation}").as_str()],
        "{msg}"
    );
    let v = f.verify_ack_tip();
    assert!(v.status.success(), "git verify-commit: {}", stderr(&v));
    assert!(
        stderr(&v).contains("Good \"git\" signature"),
        "{}",
        stderr(&v)
    );
}

#[test]
fn a_pass_with_nothing_new_makes_no_new_ack_and_a_new_rotation_is_acked_on_top() {
    let f = fleet();
    f.agent_ok();
    let first = stdout(&git(&f.env.remote, &["rev-parse", ACKS]));
    f.agent_ok();
    assert_eq!(stdout(&git(&f.env.remote, &["rev-parse", ACKS])), first);
    assert_eq!(f.acks().unwrap().0, 1, "no new ack commit");

    rotd_ok(&f.env, &["rotate", "s1"]);
    let log = f.agent_ok();
    let rotation = f.rotation();
    assert!(
        log.contains(&format!("delivered s1 rotation {rotation}")),
        "{log}"
    );
    assert_eq!(f.delivered(), format!("{}\n", f.env.show("s1")));
    let (n, msg) = f.acks().unwrap();
    assert_eq!(n, 2, "the new ack's parent is the previous one");
    let parent = stdout(&git(&f.env.remote, &["rev-parse", &format!("{ACKS}^")]));
    assert_eq!(parent, first);
    assert!(msg.contains(&format!("Rotd-Ack: s1 {rotation}\n")), "{msg}");
    assert!(f.verify_ack_tip().status.success());
}

#[test]
fn an_unsigned_commit_on_the_remote_is_refused_and_nothing_new_is_delivered() {
    let f = fleet();
    f.agent_ok();
    let good = f.delivered();
    let ack_before = stdout(&git(&f.env.remote, &["rev-parse", ACKS]));

    // An attacker with push access replaces s1 with a value encrypted to web-1.
    let work = tempfile::tempdir().unwrap();
    let clone = work.path().join("attacker");
    let o = Command::new("git")
        .args(["clone", "-q"])
        .arg(&f.env.remote)
        .arg(&clone)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(
        clone.join("secrets/s1.age"),
        age_encrypt(
            &["-r".as_ref(), f.host_recipient.as_ref()],
            "FORGED-attacker-value-0123456789\nrotation: 01FORGED0000000000000000\n",
        ),
    )
    .unwrap();
    let o = git(
        &clone,
        &[
            "-c",
            "user.name=rotd",
            "-c",
            "user.email=rotd@localhost",
            "commit",
            "-q",
            "--no-gpg-sign",
            "-am",
            "rotate s1: succeeded",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let forged = stdout(&git(&clone, &["rev-parse", "HEAD"]))
        .trim()
        .to_owned();
    assert!(git(&clone, &["push", "-q", "origin", "HEAD:main"])
        .status
        .success());

    let o = f.agent_once();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("refused") && log.contains(&forged[..12]),
        "{log}"
    );
    assert_eq!(f.delivered(), good, "nothing new delivered");
    assert!(!f.delivered().contains("FORGED"));
    assert_eq!(
        stdout(&git(&f.env.remote, &["rev-parse", ACKS])),
        ack_before,
        "no ack of the forgery"
    );
    let clone_head = stdout(&git(&f.env.path("agent/store"), &["rev-parse", "HEAD"]));
    assert_ne!(clone_head.trim(), forged, "the agent's clone stays");
}

#[test]
fn a_pending_rotation_at_head_is_not_delivered() {
    let f = fleet();
    f.agent_ok();
    let before = f.delivered();
    let (acks_before, _) = f.acks().unwrap();
    // The rotator dies right after pushing the pending commit of the next rotation.
    let o = f.env.run(
        f.env
            .cmd(&["rotate", "s1"])
            .env("ROTD_FAULT_KILL_AFTER", "pending"),
    );
    assert!(!o.status.success(), "the rotator was to be killed");
    let tree = stdout(&git(
        &f.env.remote,
        &["ls-tree", "--name-only", "main", "secrets/"],
    ));
    assert!(tree.contains("secrets/s1.pending.age"), "{tree}");

    let log = f.agent_ok();
    assert_eq!(f.delivered(), before, "a pending record is never delivered");
    assert!(!log.contains("delivered s1"), "{log}");
    assert_eq!(f.acks().unwrap().0, acks_before, "nothing new acknowledged");
}

#[test]
fn a_failed_reload_puts_the_previous_file_back_and_the_new_rotation_is_not_acked() {
    let f = fleet();
    f.agent_ok();
    let before = f.delivered();
    let old_rotation = f.rotation();
    // From now on the consumer's reload fails.
    let cfg = std::fs::read_to_string(&f.agent_config).unwrap();
    std::fs::write(
        &f.agent_config,
        format!("{cfg}reload = {{ exec = [\"false\"] }}\n"),
    )
    .unwrap();
    rotd_ok(&f.env, &["rotate", "s1"]);
    let o = f.agent_once();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(log.contains("reload"), "{log}");
    assert_eq!(f.delivered(), before, "the previous file is back");
    let (n, msg) = f.acks().unwrap();
    assert_eq!(n, 1, "no acknowledgement of the new rotation: {msg}");
    assert!(
        msg.contains(&format!("Rotd-Ack: s1 {old_rotation}\n")),
        "{msg}"
    );
}

#[test]
fn an_agent_identity_readable_by_others_is_a_configuration_error() {
    use std::os::unix::fs::PermissionsExt;
    let f = fleet();
    let identity = f.env.path("agent/keys/web-1.agekey");
    std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = f.agent_once();
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(!f.delivered.exists(), "nothing delivered");
    assert!(f.acks().is_none(), "nothing acknowledged");
}

#[test]
fn the_agent_loop_runs_a_pass_on_sighup_and_stops_on_sigterm() {
    let f = fleet();
    let cfg = std::fs::read_to_string(&f.agent_config)
        .unwrap()
        .replace("poll = \"30s\"", "poll = \"1h\"");
    std::fs::write(&f.agent_config, cfg).unwrap();
    let log_path = f.env.path("agent/agent.log");
    let mut child = Command::new(rotd_bin())
        .arg("--config")
        .arg(&f.agent_config)
        .arg("agent")
        .env("ROTD_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let kill = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success());
    };
    wait_until(
        "the first pass delivers",
        std::time::Duration::from_secs(30),
        || f.delivered.exists() && f.acks().is_some(),
    );
    rotd_ok(&f.env, &["rotate", "s1"]);
    let new = format!("{}\n", f.env.show("s1"));
    assert_ne!(f.delivered(), new);
    kill("-HUP");
    wait_until(
        "SIGHUP runs a pass",
        std::time::Duration::from_secs(30),
        || f.delivered() == new && f.acks().map(|a| a.0) == Some(2),
    );
    kill("-TERM");
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    f.env.record_text(&log);
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("rotd agent stopping"), "{log}");
}

// Kills (the crash hook `ROTD_FAULT_KILL_AFTER`): after rendering a new rotation
// (before the delivery record and the ack), and after the ack commit (before its
// push); the next pass completes the work.

/// Rotates s1, kills the agent at `step`, checks what the kill left, then runs a
/// clean pass and checks that it completed the work.
fn kill_then_recover(step: &str) {
    let f = fleet();
    f.agent_ok();
    let previous = format!("{}\n", f.env.show("s1"));
    assert_eq!(f.delivered(), previous);
    let (acks_before, _) = f.acks().unwrap();
    let ack_before = stdout(&git(&f.env.remote, &["rev-parse", ACKS]));

    rotd_ok(&f.env, &["rotate", "s1"]);
    let current = format!("{}\n", f.env.show("s1"));
    assert_ne!(current, previous);
    let rotation = f.rotation();
    // Both values are versions the store's history holds (decrypted with age -d).
    let history = f.env.recorded_secrets("s1");
    for v in [&previous, &current] {
        assert!(
            history.contains(&v.trim_end().to_owned()),
            "{v:?} not in the history"
        );
    }

    let o = f.agent_once_killed_after(step);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        o.status.signal(),
        Some(9),
        "the agent dies with SIGKILL after {step} ({:?}):\n{}",
        o.status,
        stderr(&o)
    );
    let held = f.delivered();
    assert!(
        held == previous || held == current,
        "after a kill at {step} the file holds the previous or the current secret, nothing else"
    );
    if step == "agent-rendered" {
        assert_eq!(held, current, "the kill came after the render");
    }
    assert_eq!(
        stdout(&git(&f.env.remote, &["rev-parse", ACKS])),
        ack_before,
        "nothing new acknowledged on the remote before the kill's push"
    );

    let log = f.agent_ok();
    assert_eq!(
        f.delivered(),
        current,
        "the next pass delivers the current secret"
    );
    let (n, msg) = f.acks().unwrap();
    assert_eq!(n, acks_before + 1, "exactly one new ack commit: {msg}");
    let parent = stdout(&git(&f.env.remote, &["rev-parse", &format!("{ACKS}^")]));
    assert_eq!(parent, ack_before, "the new ack sits on the previous one");
    let trailers: Vec<&str> = msg.lines().filter(|l| l.starts_with("Rotd-Ack:")).collect();
    assert_eq!(
        trailers,
        [format!("Rotd-Ack: s1 {rotation}").as_str()],
        "{msg}"
    );
    let v = f.verify_ack_tip();
    assert!(v.status.success(), "git verify-commit: {}", stderr(&v));
    assert!(log.contains("acknowledged"), "{log}");
    let out = f.delivered.parent().unwrap();
    let temps: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".rotd-tmp-"))
        .collect();
    assert!(
        temps.is_empty(),
        "temp files left in the deliver dir: {temps:?}"
    );

    // And a further pass has nothing to add.
    f.agent_ok();
    assert_eq!(f.acks().unwrap().0, acks_before + 1, "no duplicate ack");
}

#[test]
fn a_kill_after_rendering_leaves_previous_or_current_and_the_next_pass_acks_the_current_once() {
    kill_then_recover("agent-rendered");
}

#[test]
fn a_kill_after_the_ack_commit_before_its_push_is_completed_by_one_new_ack() {
    kill_then_recover("agent-ack-committed");
}

/// Objects in the clone (loose and packed) and its packs: what a fetch would add.
fn clone_objects(f: &Fleet) -> (String, usize) {
    let clone = f.env.path("agent/store");
    let counts = stdout(&git(&clone, &["count-objects", "-v"]));
    let packs = std::fs::read_dir(clone.join(".git/objects/pack"))
        .map(|d| d.count())
        .unwrap_or(0);
    (counts, packs)
}

#[test]
fn an_idle_pass_brings_no_pack_decrypts_nothing_and_acknowledges_nothing_new() {
    let f = fleet();
    f.agent_ok();
    let acks = f.acks().unwrap();
    let objects = clone_objects(&f);
    // Swap the host's identity for another one: an idle pass must not need it (it
    // decrypts nothing), while a pass with a new rotation must.
    let identity = f.env.path("agent/keys/web-1.agekey");
    let real = std::fs::read(&identity).unwrap();
    std::fs::remove_file(&identity).unwrap();
    age_keygen(&identity);
    // Another host acknowledges meanwhile: this host fetches its own ack ref only.
    let main = stdout(&git(&f.env.remote, &["rev-parse", "main"]));
    git(
        &f.env.remote,
        &["update-ref", "refs/rotd/acks/web-2", main.trim()],
    );
    let log = f.agent_ok();
    assert!(log.contains("already delivered"), "{log}");
    let refs = stdout(&git(
        &f.env.path("agent/store"),
        &["for-each-ref", "refs/rotd"],
    ));
    assert!(
        !refs.contains("web-2"),
        "another host's ack was fetched: {refs}"
    );
    assert_eq!(
        clone_objects(&f),
        objects,
        "an idle pass adds no object or pack"
    );
    assert_eq!(
        f.acks().unwrap(),
        acks,
        "an idle pass acknowledges nothing new"
    );

    rotd_ok(&f.env, &["rotate", "s1"]);
    let before = f.delivered();
    let o = f.agent_once();
    assert_eq!(
        o.status.code(),
        Some(1),
        "a new blob is decrypted: {}",
        stderr(&o)
    );
    assert_eq!(
        f.delivered(),
        before,
        "nothing delivered without the identity"
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&identity, real).unwrap();
    std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o600)).unwrap();
    f.agent_ok();
    assert_eq!(f.delivered(), format!("{}\n", f.env.show("s1")));
}

/// `rotd agent status --json` of web-1.
fn agent_status(f: &Fleet) -> serde_json::Value {
    let o = Command::new(rotd_bin())
        .arg("--config")
        .arg(&f.agent_config)
        .args(["agent", "status", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    f.env.record_text(&stdout(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

/// A one-route HTTP server for the agent's probe: 200 when the request carries
/// `Authorization: Bearer EXPECTED`, else 401. Serves until the test ends.
fn bearer_server(expected: std::sync::Arc<std::sync::Mutex<String>>) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut auth = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("authorization:") {
                    auth = line[line.len() - v.len()..].trim().to_owned();
                }
            }
            let ok = auth == format!("Bearer {}", expected.lock().unwrap());
            let status = if ok { "200 OK" } else { "401 Unauthorized" };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    port
}

#[test]
fn the_agent_probe_proves_the_new_value_and_a_failed_probe_puts_the_previous_files_back() {
    let f = fleet();
    let expected = std::sync::Arc::new(std::sync::Mutex::new(f.env.show("s1")));
    let port = bearer_server(expected.clone());
    let cfg = std::fs::read_to_string(&f.agent_config).unwrap();
    std::fs::write(
        &f.agent_config,
        format!("{cfg}[secret.probe]\nattempts = 2\ninterval = \"50ms\"\ntimeout = \"2s\"\nhttp = {{ url = \"http://127.0.0.1:{port}/\", header = \"Authorization: Bearer {{{{secret}}}}\", expect = 200 }}\n"),
    )
    .unwrap();
    let log = f.agent_ok();
    assert!(log.contains("probe of s1 succeeded"), "{log}");
    let first = f.rotation();
    let st = agent_status(&f);
    assert_eq!(st["secrets"][0]["state"], "ok", "{st}");
    assert_eq!(st["secrets"][0]["delivered"], first.as_str(), "{st}");
    assert_eq!(st["secrets"][0]["acked"], first.as_str(), "{st}");
    assert_eq!(st["last_pass"]["ok"], true, "{st}");

    // The service behind the probe still wants the old value: the new one is not
    // proven, the previous file is put back, nothing new is acknowledged.
    let before = f.delivered();
    rotd_ok(&f.env, &["rotate", "s1"]);
    let o = f.agent_once();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(log.contains("the probe failed"), "{log}");
    assert_eq!(f.delivered(), before, "the previous file is back");
    let (n, msg) = f.acks().unwrap();
    assert_eq!(n, 1, "{msg}");
    assert!(msg.contains(&format!("Rotd-Ack: s1 {first}\n")), "{msg}");
    let st = agent_status(&f);
    assert_eq!(st["secrets"][0]["state"], "failing", "{st}");
    assert_eq!(st["secrets"][0]["store"], f.rotation().as_str(), "{st}");
    assert!(
        st["secrets"][0]["error"]
            .as_str()
            .unwrap()
            .contains("probe"),
        "{st}"
    );
    assert_eq!(st["last_pass"]["ok"], false, "{st}");

    // The service takes the new value: the next pass delivers, proves and acks it.
    *expected.lock().unwrap() = f.env.show("s1");
    f.agent_ok();
    assert_eq!(f.delivered(), format!("{}\n", f.env.show("s1")));
    assert_eq!(agent_status(&f)["secrets"][0]["state"], "ok");
    assert!(f
        .acks()
        .unwrap()
        .1
        .contains(&format!("Rotd-Ack: s1 {}\n", f.rotation())));
}

#[test]
fn the_agent_loop_serves_metrics_and_tells_systemd_it_is_ready_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let f = fleet();
    let port = free_port();
    let cfg = std::fs::read_to_string(&f.agent_config)
        .unwrap()
        .replace("poll = \"30s\"", "poll = \"1h\"");
    std::fs::write(
        &f.agent_config,
        format!("metrics = \"127.0.0.1:{port}\"\n{cfg}"),
    )
    .unwrap();
    let notify_path = f.env.path("agent/notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let log_path = f.env.path("agent/agent.log");
    let mut child = Command::new(rotd_bin())
        .arg("--config")
        .arg(&f.agent_config)
        .arg("agent")
        .env("ROTD_LOG", "trace")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut received = Vec::new();
    let next = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // READY=1 as the loop starts, then the first pass's STATUS.
    while !received
        .iter()
        .any(|m: &String| m.starts_with("STATUS=last pass ok"))
    {
        received.push(next());
    }
    assert_eq!(
        received.first().map(String::as_str),
        Some("READY=1"),
        "{received:?}"
    );
    let metrics = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    f.env.record_text(&metrics);
    for want in [
        "rotd_agent_passes_total{result=\"ok\"} 1",
        "rotd_agent_unacknowledged{secret=\"s1\"} 0",
        "rotd_agent_delivery_failing{secret=\"s1\"} 0",
        "rotd_agent_remote_refused 0",
        "rotd_agent_delivered_timestamp_seconds{secret=\"s1\"} ",
    ] {
        assert!(metrics.contains(want), "{want} in:\n{metrics}");
    }
    let health = reqwest::blocking::get(format!("http://127.0.0.1:{port}/healthz")).unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    while !received.iter().any(|m| m == "STOPPING=1") {
        received.push(next());
    }
    let status = child.wait().unwrap();
    f.env
        .record_text(&std::fs::read_to_string(&log_path).unwrap());
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_ref_lock_a_killed_pass_left_on_the_local_ack_ref_does_not_wedge_the_agent() {
    let f = fleet();
    f.agent_ok();
    // What a SIGKILL while the ack ref is being moved leaves behind.
    let lock = f.env.path("agent/store/.git/refs/rotd/acks/web-1.lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::fs::write(&lock, "").unwrap();
    rotd_ok(&f.env, &["rotate", "s1"]);
    let log = f.agent_ok();
    assert!(log.contains("removed a ref lock file"), "{log}");
    let (n, msg) = f.acks().unwrap();
    assert_eq!(n, 2, "{msg}");
    assert!(
        msg.contains(&format!("Rotd-Ack: s1 {}\n", f.rotation())),
        "{msg}"
    );
}

#[test]
fn a_reload_endpoint_echoing_the_delivered_value_is_quoted_scrubbed() {
    use std::io::{BufRead, BufReader, Write};
    let f = fleet();
    // A consumer whose reload fails and answers with the file it just read.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let file = f.delivered.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let body = format!(
                "bad config: {}",
                std::fs::read_to_string(&file).unwrap_or_default()
            );
            let _ = write!(
                conn,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let cfg = std::fs::read_to_string(&f.agent_config).unwrap();
    std::fs::write(
        &f.agent_config,
        format!("{cfg}reload = {{ http_post = \"http://127.0.0.1:{port}/-/reload\" }}\n"),
    )
    .unwrap();
    let o = f.agent_once();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("HTTP 500") && log.contains("bad config"),
        "{log}"
    );
    // The leak check of the env (every line the agent printed, the state file in its
    // clone) fails the test if the value is quoted anywhere.
    let st = agent_status(&f);
    assert_eq!(st["secrets"][0]["state"], "failing", "{st}");
}
