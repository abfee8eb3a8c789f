//! Secrets never leak: a rotation, a rollback and the read-only commands with TRACE
//! logging, then every output line, the whole git history (every object) and the
//! files around the store are searched for every secret involved.
//!
//! Every other test gets the same search when its `TestEnv` drops
//! (tests/integration/util/leaks.rs); the last test here proves that search finds each
//! kind of leak.

use std::process::{Command, Output};

use crate::util::*;

#[test]
fn no_secret_in_logs_outputs_commits_or_stray_files_at_trace_level() {
    let env = TestEnv::new();
    let setup = PromSetup::start(&env, "0s", true);
    let mut outputs: Vec<Output> = Vec::new();
    let mut run = |args: &[&str]| {
        let o = env.run(&mut env.cmd(args));
        outputs.push(o);
    };
    run(&["rotate", "prom-remote-write"]);
    run(&["rotate", "prom-remote-write"]);
    run(&["status"]);
    run(&["status", "--json"]);
    run(&["history"]);
    run(&["history", "--json"]);
    run(&["rotate", "--dry-run", "prom-remote-write"]);
    // A failed rotation too: break the query credential.
    let o = env.rotd_stdin(
        &["import", "prom-reader", "--username", "prom-reader"],
        "wrong-reader-password\n",
    );
    assert!(o.status.success());
    run(&["rotate", "prom-remote-write"]);
    assert!(
        outputs[0].status.success() && outputs[1].status.success(),
        "{}",
        stderr(&outputs[0])
    );
    assert_eq!(outputs.last().unwrap().status.code(), Some(1));
    let trace_lines: usize = outputs
        .iter()
        .map(|o| stderr(o).lines().filter(|l| l.contains("TRACE")).count())
        .sum();
    assert!(trace_lines > 0, "TRACE logging was not on");

    let mut secrets = vec![
        READER_PW.to_owned(),
        INITIAL_PW.to_owned(),
        "wrong-reader-password".to_owned(),
    ];
    // Every version ever written, including the rolled-back pending one.
    let mut objects = Command::new("git")
        .arg("-C")
        .arg(&env.store)
        .args(["rev-list", "--all", "--objects"])
        .output()
        .unwrap();
    assert!(objects.status.success());
    let ids: Vec<String> = stdout(&objects)
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    objects.stdout.clear();
    let mut all_objects = Vec::new();
    for id in &ids {
        let o = git(&env.store, &["cat-file", "-p", id]);
        all_objects.extend_from_slice(&o.stdout);
        let text = String::from_utf8_lossy(&o.stdout);
        if text.starts_with("-----BEGIN AGE ENCRYPTED FILE-----") {
            secrets.push(env.age_secret(&o.stdout));
        }
    }
    secrets.sort();
    secrets.dedup();
    assert!(
        secrets.len() >= 6,
        "rotated, rolled-back, imported secrets: {}",
        secrets.len()
    );
    let history = String::from_utf8_lossy(&all_objects).into_owned();
    let log = stdout(&git(&env.store, &["log", "--all", "--format=%B"]));
    for s in &secrets {
        for o in &outputs {
            assert!(
                !stdout(o).contains(s.as_str()),
                "secret in stdout: {}",
                stdout(o)
            );
            assert!(!stderr(o).contains(s.as_str()), "secret in a log line");
        }
        assert!(
            !history.contains(s.as_str()),
            "secret in plaintext in a git object"
        );
        assert!(!log.contains(s.as_str()), "secret in a commit message");
    }
    // No stray or temp files anywhere under the test root except the consumer files
    // and the fixtures the test itself wrote.
    let mut holders = Vec::new();
    for entry in walk(env.dir.path()) {
        if entry.starts_with(&setup.receiver.dir)
            || entry.to_string_lossy().contains("agent-data")
            || entry.starts_with(env.store.join(".git"))
        {
            continue;
        }
        let Ok(bytes) = std::fs::read(&entry) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !entry
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".rotd-tmp-"),
            "temp file left: {}",
            entry.display()
        );
        if secrets.iter().any(|s| text.contains(s.as_str())) {
            holders.push(
                entry
                    .strip_prefix(env.dir.path())
                    .unwrap()
                    .display()
                    .to_string(),
            );
        }
    }
    holders.sort();
    // Only the consumer's live password file (and the harness's own fixture files).
    assert_eq!(
        holders,
        vec![
            "agent/writer-a.password".to_owned(),
            "agent/writer-b.password".to_owned()
        ]
        .into_iter()
        .filter(|p| env.dir.path().join(p).exists())
        .collect::<Vec<_>>()
    );
    use std::os::unix::fs::PermissionsExt;
    for h in &holders {
        let mode = std::fs::metadata(env.dir.path().join(h))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert!(
            mode == 0o640 || h.ends_with("writer-a.password"),
            "{h} mode {mode:o}"
        );
    }
}

/// The drop-time check of every TestEnv (tests/integration/util/leaks.rs) finds a secret
/// in each place it searches: a file outside the deliver paths, rotd's output, a commit
/// message, and the Basic-auth encoding of a user's password.
#[test]
fn the_harness_leak_check_finds_planted_leaks() {
    use base64::Engine as _;
    let catches = |plant: &dyn Fn(&TestEnv, &str)| -> String {
        let env = TestEnv::new();
        let o = env.rotd_stdin(
            &["import", "planted", "--username", "writer"],
            "planted-secret-0123456789\n",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        env.assert_no_secret_leaked(); // clean so far
        plant(&env, "planted-secret-0123456789");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            env.assert_no_secret_leaked()
        }));
        env.skip_leak_check
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let msg = r.expect_err("the planted leak was not found");
        msg.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let m = catches(&|env, s| std::fs::write(env.path("stray.log"), format!("x {s} y")).unwrap());
    assert!(m.contains("stray.log"), "{m}");
    let m = catches(&|env, s| env.record_text(&format!("DEBUG password={s}")));
    assert!(m.contains("rotd output"), "{m}");
    let m = catches(&|env, s| {
        git(
            &env.store,
            &[
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                &format!("rotated to {s}"),
            ],
        );
    });
    assert!(m.contains("git object"), "{m}");
    let m = catches(&|env, s| {
        let header = base64::engine::general_purpose::STANDARD.encode(format!("writer:{s}"));
        env.record_text(&format!("authorization: Basic {header}"));
    });
    assert!(m.contains("rotd output"), "{m}");
}
