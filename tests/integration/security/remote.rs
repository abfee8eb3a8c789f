//! Attacks on rotd through the store remote: forged and unsigned commits
//! (see the module list in `tests/integration/security/mod.rs`).
//!
//! The attacker can push to the store remote and knows only what the remote holds:
//! the public recipients in `.age-recipients`. They encrypt a credential of their
//! choosing with the stock `age` CLI and commit it as a `pending` + current record.
//! With `[store] signing_key` configured, rotd must refuse every commit that is not
//! signed by an allowed signer, and every history that is not a fast-forward; keep its
//! last good state; and say so in the log, `status`, `/metrics` and `verify`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[allow(unused_imports)]
use crate::util::*;

/// The credential the attacker wants consumers to use.
const FORGED: &str = "FORGED-attacker-chosen-credential-0123456789";

/// An OpenSSH ed25519 key made by the stock `ssh-keygen`; returns (private, public line).
fn ssh_key(path: &Path) -> (PathBuf, String) {
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(o.status.success(), "{}", stderr(&o));
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (path.to_owned(), public.trim().to_owned())
}

/// Adds `lines` to the `[store]` table of a config file.
fn add_store_lines(config: &Path, lines: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let text = text.replacen("\n\n[daemon]", &format!("\n{lines}\n\n[daemon]"), 1);
    std::fs::write(config, text).unwrap();
}

/// A store whose commits are signed with `keys/signing`; `keys/allowed_signers` lists
/// that key and `extra` lines. `init` has run and `apm-token` was rotated once.
fn signed_env(extra: &str) -> TestEnv {
    let env = TestEnv::uninitialised();
    let (_, public) = ssh_key(&env.path("keys/signing"));
    std::fs::write(
        env.path("keys/allowed_signers"),
        format!("rotd@localhost {public}\n{extra}"),
    )
    .unwrap();
    add_store_lines(
        &env.config,
        "signing_key = \"keys/signing\"\nallowed_signers = \"keys/allowed_signers\"",
    );
    let o = env.rotd(&["init"]);
    assert!(o.status.success(), "init: {}", stderr(&o));
    files_schedule(&env);
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "first rotation: {}", stderr(&o));
    env
}

fn files_schedule(env: &TestEnv) {
    env.write_schedule(
        "apm-token",
        &format!(
            "name = \"apm-token\"\ngrace = \"0s\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/token\"\ncontent = \"{{{{secret}}}}\"\n",
            env.path("consumer").display()
        ),
    );
}

fn head(repo: &Path) -> String {
    stdout(&git(repo, &["rev-parse", "HEAD"])).trim().to_owned()
}

fn consumer(env: &TestEnv) -> String {
    std::fs::read_to_string(env.path("consumer/token")).unwrap()
}

/// How the attacker's commit is made.
enum Forge<'a> {
    Unsigned,
    /// `git commit -S` with this OpenSSH key.
    SignedBy(&'a Path),
}

/// A clone of the remote (outside the env's root) in which the attacker commits a
/// forged current + pending record of `apm-token`, and pushes it (`--force` when
/// `reset_to` rewinds the branch first).
fn forge_and_push(env: &TestEnv, how: Forge, reset_to: Option<&str>) -> String {
    let work = tempfile::tempdir().unwrap();
    let clone = work.path().join("attacker");
    let o = Command::new("git")
        .arg("clone")
        .arg("-q")
        .arg(&env.remote)
        .arg(&clone)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    if let Some(rev) = reset_to {
        assert!(git(&clone, &["reset", "-q", "--hard", rev])
            .status
            .success());
    }
    let recipients = clone.join(".age-recipients");
    let now = "2026-01-01T00:00:00Z";
    let current = format!("{FORGED}\ncreated: {now}\nrotation: 01FORGEDROTATION00000000\n");
    let pending = format!("{FORGED}-next\ncreated: {now}\nrotation: 01FORGEDROTATION00000001\n");
    std::fs::create_dir_all(clone.join("secrets")).unwrap();
    std::fs::write(
        clone.join("secrets/apm-token.age"),
        age_encrypt(&["-R".as_ref(), recipients.as_os_str()], &current),
    )
    .unwrap();
    std::fs::write(
        clone.join("secrets/apm-token.pending.age"),
        age_encrypt(&["-R".as_ref(), recipients.as_os_str()], &pending),
    )
    .unwrap();
    assert!(git(&clone, &["add", "secrets"]).status.success());
    let mut args: Vec<String> = [
        "-c",
        "user.name=rotd",
        "-c",
        "user.email=rotd@localhost",
        "-c",
        "gpg.format=ssh",
    ]
    .map(String::from)
    .to_vec();
    if let Forge::SignedBy(key) = how {
        args.extend(["-c".into(), format!("user.signingkey={}", key.display())]);
    }
    args.extend(["commit", "-q"].map(String::from));
    match how {
        Forge::Unsigned => args.push("--no-gpg-sign".into()),
        Forge::SignedBy(_) => args.push("-S".into()),
    }
    args.extend(
        [
            "-m",
            "rotate apm-token: pending",
            "-m",
            "Rotd-Secret: apm-token\nRotd-Rotation: 01FORGEDROTATION00000001\nRotd-Step: pending\nRotd-Trigger: schedule",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = git(&clone, &args);
    assert!(o.status.success(), "forged commit: {}", stderr(&o));
    let forged = head(&clone);
    let mut push = vec!["push", "-q"];
    if reset_to.is_some() {
        push.push("--force");
    }
    push.extend(["origin", "HEAD:main"]);
    let o = git(&clone, &push);
    assert!(o.status.success(), "push: {}", stderr(&o));
    forged
}

fn status_json(env: &TestEnv) -> serde_json::Value {
    let o = env.rotd(&["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Every sign of a refusal: the local state is what it was, nothing of the forgery
/// reached the consumer, and the log, `status` (text and JSON) and `verify` name it.
fn assert_refused(env: &TestEnv, forged: &str, good_head: &str, good_consumer: &str, log: &str) {
    assert_eq!(head(&env.store), good_head, "the local HEAD stays");
    assert!(!env.head_files().iter().any(|f| f.ends_with(".pending.age")));
    assert_eq!(consumer(env), good_consumer, "nothing delivered");
    assert!(!consumer(env).contains("FORGED"));
    assert!(
        log.contains(&forged[..12]) && log.contains("refus"),
        "the log names the refused commit: {log}"
    );
    let s = status_json(env);
    let refused = &s["remote_refused"];
    assert!(
        refused["commit"].as_str().unwrap_or("").starts_with(forged),
        "status --json shows the refusal: {s}"
    );
    assert!(!refused["reason"].as_str().unwrap_or("").is_empty(), "{s}");
    let o = env.rotd(&["status"]);
    assert!(
        stdout(&o).contains("refused") && stdout(&o).contains(&forged[..12]),
        "status shows the refusal: {}",
        stdout(&o)
    );
    let o = env.rotd(&["verify", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(1), "verify fails: {v}");
    assert!(
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["check"] == "remote" && f["commit"] == forged),
        "verify reports the refused commit on the remote-tracking branch: {v}"
    );
}

#[test]
fn an_unsigned_forged_pending_commit_on_the_remote_is_refused_by_rotate_and_retire() {
    let env = signed_env("");
    let good_head = head(&env.store);
    let good_consumer = consumer(&env);
    let forged = forge_and_push(&env, Forge::Unsigned, None);

    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let mut log = stdout(&o) + &stderr(&o);
    let o = env.rotd(&["retire"]);
    log += &(stdout(&o) + &stderr(&o));
    assert_refused(&env, &forged, &good_head, &good_consumer, &log);
    assert!(log.contains("not signed"), "the reason is given: {log}");
}

#[test]
fn a_forged_commit_signed_by_a_stranger_is_refused() {
    let env = signed_env("");
    let (stranger, _) = ssh_key(&env.path("stranger"));
    let good_head = head(&env.store);
    let good_consumer = consumer(&env);
    let forged = forge_and_push(&env, Forge::SignedBy(&stranger), None);

    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let log = stdout(&o) + &stderr(&o);
    assert_refused(&env, &forged, &good_head, &good_consumer, &log);
    assert!(log.contains("not in the allowed signers"), "{log}");
}

#[test]
fn a_forced_non_fast_forward_push_is_refused_even_when_signed_by_an_allowed_key() {
    // The attacker holds a key the store allows (a second host's), rewinds the branch
    // past the genuine rotation and force-pushes a signed fork.
    let dir = tempfile::tempdir().unwrap();
    let (other, other_pub) = ssh_key(&dir.path().join("other"));
    let env = signed_env(&format!("other@host {other_pub}\n"));
    let good_head = head(&env.store);
    let good_consumer = consumer(&env);
    let forged = forge_and_push(&env, Forge::SignedBy(&other), Some("HEAD~2"));

    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let log = stdout(&o) + &stderr(&o);
    assert_refused(&env, &forged, &good_head, &good_consumer, &log);
    assert!(log.contains("fast-forward"), "{log}");
}

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

fn start_daemon(env: &TestEnv) -> Daemon {
    let port = free_port();
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!("metrics = \"127.0.0.1:{port}\"\n"));
    std::fs::write(&env.config, &cfg).unwrap();
    let log = std::fs::File::create(env.path("daemon.log")).unwrap();
    let child = env
        .cmd(&["run"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let socket = env.path("rotd.sock");
    wait_until("the control socket", Duration::from_secs(20), || {
        UnixStream::connect(&socket).is_ok()
    });
    Daemon {
        child,
        metrics: format!("http://127.0.0.1:{port}/metrics"),
    }
}

#[test]
fn the_daemon_refuses_an_unsigned_forged_commit_and_counts_it_in_metrics() {
    let env = signed_env("");
    let good_head = head(&env.store);
    let good_consumer = consumer(&env);
    let d = start_daemon(&env);
    let forged = forge_and_push(&env, Forge::Unsigned, None);

    let o = env.rotd(&["rotate", "apm-token"]);
    assert_ne!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let metrics = reqwest::blocking::get(&d.metrics).unwrap().text().unwrap();
    env.record_text(&metrics);
    assert!(
        metrics.contains("rotd_remote_refused 1"),
        "the refusal is a metric: {metrics}"
    );
    drop(d);
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap();
    env.record_text(&log);
    assert_refused(&env, &forged, &good_head, &good_consumer, &log);
}

#[test]
fn a_new_instance_refuses_to_adopt_an_unsigned_forged_remote_at_init() {
    let env = signed_env("");
    let forged = forge_and_push(&env, Forge::Unsigned, None);
    let cfg = env.path("rotd-c.toml");
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("path = \"store\"", "path = \"store-c\"");
    std::fs::write(&cfg, text).unwrap();
    let mut c = Command::new(rotd_bin());
    c.arg("--config")
        .arg(&cfg)
        .arg("init")
        .env("ROTD_LOG", "debug");
    let o = env.run(&mut c);
    assert_ne!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let log = stdout(&o) + &stderr(&o);
    assert!(
        log.contains(&forged[..12]) && log.contains("refus"),
        "{log}"
    );
    let store_c = env.path("store-c");
    assert!(
        !git(&store_c, &["rev-parse", "--verify", "-q", "HEAD"])
            .status
            .success(),
        "nothing adopted"
    );
}

#[test]
fn a_genuine_commit_of_a_second_instance_signed_by_an_allowed_key_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let (b_key, b_pub) = ssh_key(&dir.path().join("signing-b"));
    let env = signed_env(&format!("rotd-b@localhost {b_pub}\n"));
    let b_cfg = env.path("rotd-b.toml");
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("path = \"store\"", "path = \"store-b\"")
        .replace(
            "signing_key = \"keys/signing\"",
            &format!("signing_key = \"{}\"", b_key.display()),
        );
    std::fs::write(&b_cfg, text).unwrap();
    let b = |args: &[&str]| {
        let mut c = Command::new(rotd_bin());
        c.arg("--config").arg(&b_cfg).args(args);
        env.run(&mut c)
    };
    let o = b(&["init"]);
    assert!(o.status.success(), "B joins: {}", stderr(&o));
    let o = b(&["rotate", "apm-token"]);
    assert!(o.status.success(), "B rotates: {}", stderr(&o));
    let b_head = head(&env.path("store-b"));

    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "A adopts B's commits: {}", stderr(&o));
    let o = git(
        &env.store,
        &["merge-base", "--is-ancestor", &b_head, "HEAD"],
    );
    assert!(o.status.success(), "B's commits are in A's history");
    let s = status_json(&env);
    assert!(s["remote_refused"].is_null(), "{s}");
    let o = env.rotd(&["verify"]);
    assert!(o.status.success(), "{}", stdout(&o));
}

#[test]
fn init_and_check_without_a_signing_key_warn_that_the_remote_is_trusted_blindly() {
    let env = TestEnv::uninitialised();
    let o = env.rotd(&["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("WARNING") && err.contains("trusted blindly") && err.contains("signing_key"),
        "init warns: {err}"
    );
    let o = env.rotd(&["check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("WARNING") && err.contains("trusted blindly") && err.contains("signing_key"),
        "check warns: {err}"
    );
}

#[test]
fn init_creates_a_missing_signing_key_so_the_first_commit_is_signed() {
    let env = TestEnv::uninitialised();
    add_store_lines(
        &env.config,
        "signing_key = \"keys/signing\"\nallowed_signers = \"keys/allowed_signers\"",
    );
    let o = env.rotd(&["init"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(!stderr(&o).contains("trusted blindly"), "{}", stderr(&o));
    let key = env.path("keys/signing");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let allowed = env.path("keys/allowed_signers");
    assert!(std::fs::read_to_string(&allowed)
        .unwrap()
        .contains("ssh-ed25519 "));
    let o = git(
        &env.store,
        &[
            "-c",
            &format!("gpg.ssh.allowedSignersFile={}", allowed.display()),
            "verify-commit",
            "HEAD",
        ],
    );
    assert!(
        o.status.success(),
        "the first commit is signed: {}",
        stderr(&o)
    );
    let o = env.rotd(&["check"]);
    assert!(!stderr(&o).contains("trusted blindly"), "{}", stderr(&o));
}

#[test]
fn equal_secrets_under_two_names_have_different_fingerprints() {
    let env = TestEnv::new();
    let value = "the-same-credential-under-two-names";
    for name in ["first", "second"] {
        let o = env.rotd_stdin(&["import", name], &format!("{value}\n"));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let fp = |name: &str| {
        env.history_json(Some(name))[0]["fingerprint"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_ne!(fp("first"), fp("second"));
}
