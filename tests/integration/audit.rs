//! `rotd verify`, `rotd rekey` and the `history` filters, against real git
//! repositories, the stock `git`, `age` and `ssh-keygen`.

use crate::util::*;
use std::process::{Command, Stdio};

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

/// `rotd verify` exits 1 and its output names `commit`.
fn verify_flags(env: &TestEnv, commit: &str, what: &str) -> String {
    let o = env.rotd(&["verify"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{what}: {out}\n{}", stderr(&o));
    assert!(
        out.contains(commit),
        "{what}: {commit} not named in:\n{out}"
    );
    out
}

fn files_schedule(env: &TestEnv) {
    let out = env.path("consumer");
    env.write_schedule(
        "apm-token",
        &format!(
            "name = \"apm-token\"\nschedule = \"0 0 4 * * *\"\ngrace = \"0s\"\n[generate]\nlength = 40\ncharset = \"alnum\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/apm.yml\"\ncontent = \"secret_token: {{{{secret}}}}\\n\"\nmode = \"0600\"\n",
            out.display()
        ),
    );
}

fn ssh_key(env: &TestEnv, name: &str) -> std::path::PathBuf {
    let key = env.path(&format!("keys/{name}"));
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(o.status.success(), "{}", stderr(&o));
    key
}

/// A store whose commits rotd signs, with one rotated secret.
fn signed_env() -> TestEnv {
    let env = TestEnv::uninitialised();
    ssh_key(&env, "signing");
    let cfg = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("[daemon]", "signing_key = \"keys/signing\"\n\n[daemon]");
    std::fs::write(&env.config, cfg).unwrap();
    rotd_ok(&env, &["init"]);
    files_schedule(&env);
    rotd_ok(&env, &["rotate", "apm-token"]);
    env
}

/// Stock git in the store, as a person would run it.
fn sgit(env: &TestEnv, args: &[&str]) -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(&env.store)
        .args(["-c", "user.name=Mallory", "-c", "user.email=m@example.com"])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {}", stderr(&o));
    stdout(&o)
}

fn head(env: &TestEnv) -> String {
    sgit(env, &["rev-parse", "HEAD"]).trim().to_owned()
}

fn age_keygen(path: &std::path::Path) -> String {
    let o = Command::new("age-keygen")
        .arg("-o")
        .arg(path)
        .output()
        .expect("age-keygen");
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stderr)
        .trim()
        .trim_start_matches("Public key: ")
        .to_owned()
}

#[test]
fn verify_passes_on_a_clean_signed_store_and_flags_every_tampering() {
    let env = signed_env();
    let out = rotd_ok(&env, &["verify"]);
    assert!(out.contains("ok: 3 commit(s)"), "{out}");
    assert!(out.contains("signatures checked"), "{out}");
    let o = env.rotd(&["verify", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["secrets_searched"], 1);
    let clean = head(&env);
    let secret = env.show("apm-token");

    // 1. A new unsigned commit on top.
    sgit(&env, &["commit", "-q", "--allow-empty", "-m", "innocent"]);
    let c = head(&env);
    let out = verify_flags(&env, &c, "unsigned commit");
    assert!(out.contains("not signed"), "{out}");
    // ...exempt when accepted as history from before signing.
    rotd_ok(&env, &["verify", "--accept-unsigned-before", &c]);
    sgit(&env, &["reset", "-q", "--hard", &clean]);

    // 2. The last rotd commit amended without a signature.
    sgit(
        &env,
        &[
            "commit",
            "-q",
            "--amend",
            "-m",
            "rotate apm-token: succeeded",
        ],
    );
    let c = head(&env);
    assert_ne!(c, clean);
    verify_flags(&env, &c, "amended commit");
    sgit(&env, &["reset", "-q", "--hard", &clean]);

    // 3. A commit signed by a key that is not allowed.
    let other = ssh_key(&env, "other");
    sgit(
        &env,
        &[
            "-c",
            "gpg.format=ssh",
            "-c",
            &format!("user.signingkey={}", other.display()),
            "commit",
            "-q",
            "-S",
            "--allow-empty",
            "-m",
            "signed by someone else\n\nRotd-Step: note",
        ],
    );
    let c = head(&env);
    let out = verify_flags(&env, &c, "foreign signature");
    assert!(out.contains("not in the allowed signers"), "{out}");
    let h = env.history_json(None);
    assert_eq!(h[0]["commit"], c.as_str());
    assert_eq!(h[0]["signature"], "unknown-key");
    assert_eq!(h[1]["signature"], "good");
    sgit(&env, &["reset", "-q", "--hard", &clean]);

    // 4. A .age file replaced by one encrypted to an attacker's key.
    let attacker = age_keygen(&env.path("keys/attacker.agekey"));
    let file = env.store.join("secrets/apm-token.age");
    let o = Command::new("age")
        .args(["-a", "-r", &attacker, "-o"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    sgit(&env, &["commit", "-q", "-am", "replace"]);
    let c = head(&env);
    let out = verify_flags(&env, &c, "replaced .age");
    assert!(
        out.contains(&format!("decrypt commit {c} secrets/apm-token.age")),
        "{out}"
    );
    sgit(&env, &["reset", "-q", "--hard", &clean]);

    // 5. A plaintext secret committed by hand, then removed again.
    env.planted_leak_in_git
        .store(true, std::sync::atomic::Ordering::Relaxed);
    std::fs::write(env.store.join("notes.txt"), format!("token is {secret}\n")).unwrap();
    sgit(&env, &["add", "notes.txt"]);
    sgit(&env, &["commit", "-q", "-m", "notes"]);
    let c = head(&env);
    sgit(&env, &["rm", "-q", "notes.txt"]);
    sgit(&env, &["commit", "-q", "-m", "oops"]);
    let out = verify_flags(&env, &c, "plaintext in history");
    assert!(
        out.contains(&format!("plaintext commit {c} notes.txt")),
        "{out}"
    );
    assert!(!out.contains(&secret), "verify printed the secret");
    sgit(&env, &["reset", "-q", "--hard", &clean]);
    rotd_ok(&env, &["verify"]);
}

#[test]
fn verify_flags_a_pending_step_without_terminal_step_and_bad_trailers() {
    let env = TestEnv::new();
    files_schedule(&env);
    rotd_ok(&env, &["rotate", "apm-token"]);
    let out = rotd_ok(&env, &["verify"]);
    assert!(out.contains("signatures not checked"), "{out}");
    // A commit touching secrets/ without trailers.
    std::fs::write(env.store.join("secrets/x.age"), "junk\n").unwrap();
    sgit(&env, &["add", "secrets/x.age"]);
    sgit(&env, &["commit", "-q", "-m", "hand-made"]);
    let c = head(&env);
    let out = verify_flags(&env, &c, "missing trailers");
    assert!(out.contains(&format!("trailers commit {c}")), "{out}");
    sgit(&env, &["rm", "-q", "secrets/x.age"]);
    // A pending step whose rotation never ended and is not in flight.
    sgit(
        &env,
        &[
            "commit",
            "-q",
            "-m",
            "rotate apm-token: pending\n\nRotd-Secret: apm-token\nRotd-Rotation: 01FAKE\nRotd-Step: pending",
        ],
    );
    let c = head(&env);
    let out = verify_flags(&env, &c, "dangling pending");
    assert!(out.contains("01FAKE"), "{out}");
}

#[test]
fn rekey_adds_and_removes_recipients_and_verify_wants_a_rotation_after_a_removal() {
    let env = TestEnv::new();
    files_schedule(&env);
    rotd_ok(&env, &["rotate", "apm-token"]);
    let secret = env.show("apm-token");
    // Add a recipient: after rekey, the stock age CLI decrypts with its identity.
    let new_id = env.path("keys/new.agekey");
    let new_pub = age_keygen(&new_id);
    let recipients = env.path("keys/recipients");
    let before = std::fs::read_to_string(&recipients).unwrap();
    std::fs::write(&recipients, format!("{before}{new_pub}\n")).unwrap();
    let out = rotd_ok(&env, &["rekey"]);
    assert!(out.contains("rekeyed 1 secret file(s)"), "{out}");
    assert!(
        out.contains(&format!("recipient added: {new_pub}")),
        "{out}"
    );
    let o = Command::new("age")
        .args(["-d", "-i"])
        .arg(&new_id)
        .arg(env.store.join("secrets/apm-token.age"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().next(), Some(secret.as_str()));
    assert!(std::fs::read_to_string(env.store.join(".age-recipients"))
        .unwrap()
        .contains(&new_pub));
    let msg = sgit(&env, &["log", "-1", "--format=%B"]);
    assert!(msg.contains("Rotd-Step: rekeyed"), "{msg}");
    assert!(
        msg.contains(&format!("Rotd-Recipient-Added: {new_pub}")),
        "{msg}"
    );
    assert!(!msg.contains(&secret));
    rotd_ok(&env, &["verify"]);
    // Remove the person: verify names every secret not rotated since.
    std::fs::write(&recipients, format!("{new_pub}\n")).unwrap();
    let out = rotd_ok(&env, &["rekey"]);
    assert!(out.contains("recipient removed"), "{out}");
    let c = head(&env);
    let out = verify_flags(&env, &c, "removed recipient");
    assert!(
        out.contains(&format!("recipients commit {c} secrets/apm-token.age")),
        "{out}"
    );
    let o = Command::new("age")
        .args(["-d", "-i"])
        .arg(&env.person_identity)
        .arg(env.store.join("secrets/apm-token.age"))
        .output()
        .unwrap();
    assert!(!o.status.success(), "a removed recipient still decrypts");
    rotd_ok(&env, &["rotate", "apm-token"]);
    rotd_ok(&env, &["verify"]);
    // --rotate-removed rotates every scheduled secret right after the rekey.
    std::fs::write(&recipients, "").unwrap();
    let old = env.show("apm-token");
    let out = rotd_ok(&env, &["rekey", "--rotate-removed"]);
    assert!(out.contains("apm-token: rotated"), "{out}");
    assert_ne!(env.show("apm-token"), old);
    rotd_ok(&env, &["verify"]);
}

#[test]
fn history_filters_and_lists_10000_rotations_in_under_a_second() {
    let env = TestEnv::new();
    let parent = head(&env);
    let mut stream = String::new();
    for i in 0..10_000u32 {
        let step = if i % 2 == 0 { "pending" } else { "succeeded" };
        let msg = format!(
            "rotate s{n}: {step}\n\nRotd-Secret: s{n}\nRotd-Rotation: r{r}\nRotd-Step: {step}\nRotd-Trigger: schedule\n",
            n = (i / 2) % 50,
            r = i / 2
        );
        stream.push_str(&format!(
            "commit refs/heads/main\ncommitter rotd <rotd@localhost> {} +0000\ndata {}\n{msg}\n",
            1_600_000_000 + u64::from(i),
            msg.len()
        ));
        if i == 0 {
            stream.push_str(&format!("from {parent}\n"));
        }
        stream.push('\n');
    }
    use std::io::Write;
    let mut child = Command::new("git")
        .arg("-C")
        .arg(&env.store)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stream.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let t = std::time::Instant::now();
    let o = env.rotd(&["history", "--json"]);
    let took = t.elapsed();
    println!("rotd history --json over 10,001 commits took {took:?}");
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 10_001);
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    let count = |args: &[&str]| {
        let o = env.rotd(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["entries"].as_array().unwrap().len()
    };
    assert_eq!(count(&["history", "--json", "--outcome", "pending"]), 5_000);
    assert_eq!(
        count(&["history", "s7", "--json", "--outcome", "succeeded"]),
        100
    );
    assert_eq!(
        count(&["history", "--json", "--since", "2020-09-13T12:26:40Z"]),
        10_001
    );
    assert_eq!(
        count(&["history", "--json", "--since", "2020-09-13T12:30:00Z"]),
        10_001 - 200
    );
    assert_eq!(count(&["history", "--json", "--since", "1d"]), 1);
    let o = env.rotd(&["history", "--since", "yesterday-ish"]);
    assert_eq!(o.status.code(), Some(64));
    // Unsigned store: no signature field.
    assert!(v["entries"][0].get("signature").is_none());
}
