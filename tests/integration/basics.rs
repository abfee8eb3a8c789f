//! End-to-end behaviour of the `rotd` binary against real git repositories, the
//! stock `age` CLI and real Prometheus processes. Each test is one behaviour.

use crate::util::*;

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

#[test]
fn init_creates_a_private_identity_and_a_store_pushed_to_the_remote() {
    let env = TestEnv::new();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&env.identity)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let recipients = std::fs::read_to_string(env.store.join(".age-recipients")).unwrap();
    assert_eq!(
        recipients.lines().count(),
        2,
        "daemon + one person: {recipients}"
    );
    let remote_log = stdout(&git(&env.remote, &["log", "--format=%s", "main"]));
    assert!(remote_log.contains("init store"), "{remote_log}");
    // Idempotent.
    rotd_ok(&env, &["init"]);
    assert_eq!(
        stdout(&git(&env.store, &["rev-list", "--count", "HEAD"])).trim(),
        "1"
    );
}

#[test]
fn identity_readable_by_group_is_refused_with_the_chmod_to_run() {
    let env = TestEnv::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env.identity, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = env.rotd(&["status"]);
    assert_eq!(o.status.code(), Some(78));
    let err = stderr(&o);
    assert!(
        err.contains("chmod 600") && err.contains("rotd.agekey"),
        "{err}"
    );
    // Put it back, as the error says (the drop-time check wants the identity private).
    std::fs::set_permissions(&env.identity, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(env.rotd(&["status"]).status.success());
}

#[test]
fn imported_secret_decrypts_with_stock_age_for_every_recipient() {
    let env = TestEnv::new();
    let o = env.rotd_stdin(
        &["import", "app-db", "--username", "app"],
        "s3cret-value-for-import\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for identity in [&env.identity, &env.person_identity] {
        let out = std::process::Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(identity)
            .arg(env.store.join("secrets/app-db.age"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert_eq!(text.lines().next(), Some("s3cret-value-for-import"));
        assert!(text.contains("username: app"));
    }
    let armored = std::fs::read_to_string(env.store.join("secrets/app-db.age")).unwrap();
    assert!(armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
    assert_eq!(env.show("app-db"), "s3cret-value-for-import");
}

fn files_schedule(env: &TestEnv, extra: &str) -> std::path::PathBuf {
    let out = env.path("consumer");
    env.write_schedule(
        "apm-token",
        &format!(
            "name = \"apm-token\"\nschedule = \"0 0 4 * * *\"\ngrace = \"0s\"\n[generate]\nlength = 40\ncharset = \"alnum\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/apm.yml\"\ncontent = \"secret_token: {{{{secret}}}}\\nrotation: {{{{rotation_id}}}}\\n\"\nmode = \"0600\"\n{extra}",
            out.display()
        ),
    );
    out.join("apm.yml")
}

#[test]
fn files_target_rotates_and_trailers_parse_with_stock_git() {
    let env = TestEnv::new();
    let consumer = files_schedule(&env, "");
    rotd_ok(&env, &["check"]);
    let out = rotd_ok(&env, &["rotate", "apm-token"]);
    assert!(out.contains("rotated"), "{out}");
    let secret = env.show("apm-token");
    assert_eq!(secret.len(), 40);
    assert!(secret.chars().all(|c| c.is_ascii_alphanumeric()));
    let body = std::fs::read_to_string(&consumer).unwrap();
    assert!(body.starts_with(&format!("secret_token: {secret}\n")));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&consumer).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(env.head_files(), vec!["secrets/apm-token.age"]);
    // Stock git parses the trailers.
    let msg = stdout(&git(&env.store, &["log", "-1", "--format=%B"]));
    let mut child = std::process::Command::new("git")
        .args(["interpret-trailers", "--parse"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(msg.as_bytes())
        .unwrap();
    let parsed = stdout(&child.wait_with_output().unwrap());
    for t in [
        "Rotd-Secret: apm-token",
        "Rotd-Step: succeeded",
        "Rotd-Trigger: manual uid=",
        "Rotd-Probe: ok",
        "Rotd-Fingerprint: ",
    ] {
        assert!(parsed.contains(t), "{t} missing from:\n{parsed}");
    }
    // One rotation id for the pending and succeeded commits; pushed to the remote.
    let h = env.history_json(Some("apm-token"));
    assert_eq!(h[0]["step"], "succeeded");
    assert_eq!(h[1]["step"], "pending");
    assert_eq!(h[0]["rotation"], h[1]["rotation"]);
    assert_eq!(
        stdout(&git(&env.remote, &["rev-parse", "main"])),
        stdout(&git(&env.store, &["rev-parse", "HEAD"]))
    );
}

#[test]
fn dry_run_prints_the_plan_and_touches_nothing() {
    let env = TestEnv::new();
    let consumer = files_schedule(&env, "");
    let before = stdout(&git(&env.store, &["rev-parse", "HEAD"]));
    let out = rotd_ok(&env, &["rotate", "--dry-run", "apm-token"]);
    assert!(
        out.contains("would rotate") && out.contains("apm.yml"),
        "{out}"
    );
    assert_eq!(before, stdout(&git(&env.store, &["rev-parse", "HEAD"])));
    assert!(!consumer.exists());
}

#[test]
fn failing_http_probe_rolls_back_consumer_files_exactly() {
    let env = TestEnv::new();
    let port = free_port(); // nothing listens there
    let consumer = files_schedule(&env, &format!("[probe]\nattempts = 2\ninterval = \"10ms\"\ntimeout = \"1s\"\nhttp = {{ url = \"http://127.0.0.1:{port}/\", header = \"Authorization: Bearer {{{{secret}}}}\", expect = 200 }}\n"));
    std::fs::create_dir_all(consumer.parent().unwrap()).unwrap();
    std::fs::write(&consumer, "secret_token: the-old-one\n").unwrap();
    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stdout(&o).contains("rolled back"), "{}", stdout(&o));
    assert_eq!(
        std::fs::read_to_string(&consumer).unwrap(),
        "secret_token: the-old-one\n"
    );
    let h = env.history_json(Some("apm-token"));
    assert_eq!(h[0]["step"], "rolled-back");
    assert!(h[0]["error"].as_str().unwrap().contains("probe"));
    assert!(
        env.head_files().is_empty(),
        "no pending left: {:?}",
        env.head_files()
    );
    let leftovers: Vec<_> = std::fs::read_dir(consumer.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn bad_input_names_the_file_line_and_fix_and_writes_nothing() {
    let env = TestEnv::new();
    let head = stdout(&git(&env.store, &["rev-parse", "HEAD"]));
    let cases: &[(&str, &str, &str)] = &[
        ("malformed", "name = \"malformed\"\nschedule = \n", "malformed.toml:2"),
        ("unknown", "name = \"unknown\"\n[target]\nkind = \"files\"\ncolour = \"red\"\n", "unknown field `colour`"),
        ("badcron", "name = \"badcron\"\nschedule = \"0 3 * * *\"\n[target]\nkind = \"files\"\n", "badcron.toml:2: schedule"),
        ("missingtpl", "name = \"missingtpl\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"/tmp/x\"\ntemplate = \"/nonexistent/tpl\"\n", "cannot be read"),
        ("badkind", "name = \"badkind\"\n[target]\nkind = \"mysql\"\n", "unknown target kind"),
        ("placeholder", "name = \"placeholder\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"/tmp/{{secret}}\"\ncontent = \"x\"\n", "may not appear in a path"),
        ("ref", "name = \"ref\"\n[target]\nkind = \"prometheus-remote-write\"\nurl = \"http://127.0.0.1:1\"\nweb_config = \"/nonexistent/web.yml\"\nusernames = [\"a\", \"b\"]\nquery_credential = \"nope\"\n", "does not exist"),
    ];
    for (name, text, expect) in cases {
        for f in std::fs::read_dir(&env.schedules).unwrap().flatten() {
            std::fs::remove_file(f.path()).unwrap();
        }
        env.write_schedule(name, text);
        let o = env.rotd(&["check"]);
        assert_eq!(o.status.code(), Some(78), "{name}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains(&format!("{name}.toml")),
            "{name}: no file name in {err}"
        );
        assert!(err.contains(expect), "{name}: expected {expect:?} in {err}");
        let o = env.rotd(&["rotate", name]);
        assert_eq!(o.status.code(), Some(78));
    }
    // A web config with keys Prometheus does not know.
    let web = env.path("web.yml");
    std::fs::write(
        &web,
        "basic_auth_users:\n  a: $2y$04$abc\nbasic_auth_user: typo\n",
    )
    .unwrap();
    env.write_schedule("ref", &format!("name = \"ref\"\n[target]\nkind = \"prometheus-remote-write\"\nurl = \"http://127.0.0.1:1\"\nweb_config = \"{}\"\nusernames = [\"a\", \"b\"]\n", web.display()));
    let o = env.rotd(&["check"]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("basic_auth_user`"), "{}", stderr(&o));
    assert!(stderr(&o).contains("ref.toml:5"), "{}", stderr(&o));
    // Usage errors are 64.
    assert_eq!(env.rotd(&["rotate"]).status.code(), Some(64));
    assert_eq!(env.rotd(&["frobnicate"]).status.code(), Some(64));
    assert_eq!(
        head,
        stdout(&git(&env.store, &["rev-parse", "HEAD"])),
        "nothing committed"
    );
}

#[test]
fn every_store_commit_is_ssh_signed_and_stock_git_verifies_it() {
    let env = TestEnv::uninitialised();
    let key = env.path("keys/signing");
    let o = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "rotd@host", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    cfg = cfg.replace("[daemon]", "signing_key = \"keys/signing\"\n\n[daemon]");
    std::fs::write(&env.config, cfg).unwrap();
    rotd_ok(&env, &["init"]);
    files_schedule(&env, "");
    rotd_ok(&env, &["rotate", "apm-token"]);
    let public = std::fs::read_to_string(env.path("keys/signing.pub")).unwrap();
    let allowed = env.path("allowed_signers");
    std::fs::write(
        &allowed,
        format!(
            "rotd@host {}",
            public.split(' ').take(2).collect::<Vec<_>>().join(" ")
        ),
    )
    .unwrap();
    let revs = stdout(&git(&env.store, &["rev-list", "HEAD"]));
    assert_eq!(revs.lines().count(), 3, "init, pending, succeeded");
    for rev in revs.lines() {
        let o = git(
            &env.store,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &format!("gpg.ssh.allowedSignersFile={}", allowed.display()),
                "verify-commit",
                rev,
            ],
        );
        assert!(o.status.success(), "{rev}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("Good \"git\" signature for rotd@host"),
            "{}",
            stderr(&o)
        );
    }
    // A group-readable signing key is refused with the fix.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = env.rotd(&["status"]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
}

#[test]
fn concurrent_rotations_of_one_secret_are_serialized_and_lose_no_commit() {
    let env = TestEnv::new();
    files_schedule(&env, "");
    let children: Vec<_> = (0..6)
        .map(|_| {
            env.cmd(&["rotate", "apm-token"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        env.record(&o);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // Oldest first: each pending is followed by its own succeeded, never interleaved.
    let mut h = env.history_json(Some("apm-token"));
    h.reverse();
    let steps: Vec<(String, String)> = h
        .iter()
        .filter(|e| e["step"] == "pending" || e["step"] == "succeeded")
        .map(|e| {
            (
                e["step"].as_str().unwrap().to_owned(),
                e["rotation"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(steps.len(), 12, "{steps:?}");
    for pair in steps.chunks(2) {
        assert_eq!(pair[0].0, "pending");
        assert_eq!(pair[1].0, "succeeded");
        assert_eq!(pair[0].1, pair[1].1, "rotations interleaved: {steps:?}");
    }
    assert_eq!(
        stdout(&git(&env.remote, &["rev-parse", "main"])),
        stdout(&git(&env.store, &["rev-parse", "HEAD"]))
    );
}

#[test]
fn a_second_instance_joins_the_shared_remote_and_sees_the_first_ones_rotations() {
    let a = TestEnv::new();
    files_schedule(&a, "");
    rotd_ok(&a, &["rotate", "apm-token"]);
    // Instance B: its own clone of the same remote, the same identity.
    let b_cfg = a.path("rotd-b.toml");
    let text = std::fs::read_to_string(&a.config)
        .unwrap()
        .replace("path = \"store\"", "path = \"store-b\"");
    std::fs::write(&b_cfg, text).unwrap();
    let run_b = |args: &[&str]| {
        std::process::Command::new(rotd_bin())
            .arg("--config")
            .arg(&b_cfg)
            .args(args)
            .output()
            .unwrap()
    };
    let o = run_b(&["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_b(&["show", "apm-token"]);
    assert_eq!(stdout(&o).trim(), a.show("apm-token"));
    // B rotates; A's next rotation starts from B's commits (fast-forward, no divergence).
    let o = run_b(&["rotate", "apm-token"]);
    assert!(o.status.success(), "{}", stderr(&o));
    rotd_ok(&a, &["rotate", "apm-token"]);
    let succeeded = a
        .history_json(Some("apm-token"))
        .iter()
        .filter(|e| e["step"] == "succeeded")
        .count();
    assert_eq!(succeeded, 3);
    assert_eq!(
        stdout(&git(&a.remote, &["rev-parse", "main"])),
        stdout(&git(&a.store, &["rev-parse", "HEAD"]))
    );
}

#[test]
fn changes_left_staged_by_an_interrupted_commit_never_ride_along() {
    let env = TestEnv::new();
    files_schedule(&env, "");
    // As if a commit had been interrupted after staging: a file in the index only.
    std::fs::create_dir_all(env.store.join("secrets")).unwrap();
    std::fs::write(env.store.join("secrets/stray.age"), "not from rotd").unwrap();
    assert!(git(&env.store, &["add", "secrets/stray.age"])
        .status
        .success());
    rotd_ok(&env, &["rotate", "apm-token"]);
    let files = env.head_files();
    assert_eq!(files, vec!["secrets/apm-token.age"], "{files:?}");
}
