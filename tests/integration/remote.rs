//! The store remote under fire: unreachable (rotate locally, push later, `status`
//! counts what is unpushed) and two instances racing for the same secret (the push of
//! the `pending` commit is the compare-and-swap: exactly one wins), and a rejected
//! pending push made deterministic.

use std::process::Stdio;

use crate::util::*;

fn files_schedule(env: &TestEnv) {
    env.write_schedule(
        "apm-token",
        &format!(
            "name = \"apm-token\"\ngrace = \"0s\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/token\"\ncontent = \"{{{{secret}}}}\"\n",
            env.path("consumer").display()
        ),
    );
}

fn unpushed(env: &TestEnv) -> u64 {
    let o = env.rotd(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["unpushed_commits"].as_u64().unwrap()
}

#[test]
fn an_unreachable_remote_delays_the_push_but_not_the_rotation() {
    let env = TestEnv::new();
    files_schedule(&env);
    let away = env.path("remote-away.git");
    std::fs::rename(&env.remote, &away).unwrap();
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("push"),
        "the push failure is logged: {}",
        stderr(&o)
    );
    assert_eq!(unpushed(&env), 2, "pending + succeeded wait for the remote");
    let o = env.rotd(&["status"]);
    assert!(
        stdout(&o).contains("2 commit(s) not pushed"),
        "{}",
        stdout(&o)
    );
    // The remote is back: the next rotation pushes everything.
    std::fs::rename(&away, &env.remote).unwrap();
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(unpushed(&env), 0);
    assert_eq!(
        stdout(&git(&env.remote, &["rev-parse", "main"])),
        stdout(&git(&env.store, &["rev-parse", "HEAD"]))
    );
}

#[test]
fn two_instances_racing_for_one_secret_never_both_rotate() {
    let a = TestEnv::new();
    files_schedule(&a);
    let b_cfg = a.path("rotd-b.toml");
    let text = std::fs::read_to_string(&a.config)
        .unwrap()
        .replace("path = \"store\"", "path = \"store-b\"");
    std::fs::write(&b_cfg, text).unwrap();
    let b = |args: &[&str]| {
        let mut c = std::process::Command::new(rotd_bin());
        c.arg("--config")
            .arg(&b_cfg)
            .args(args)
            .env("ROTD_LOG", "debug");
        c
    };
    assert!(b(&["init"]).output().unwrap().status.success());
    // Race them, several rounds. Each round ends in one of two correct ways: both
    // rotations ran one after the other (the second fetched the first), or the second
    // pending push was rejected (the compare-and-swap) and that instance stood down
    // with exit 1 and nothing changed. Never two rotations of the secret at once.
    let mut stood_down = 0;
    for _ in 0..5 {
        let ca = a
            .cmd(&["rotate", "apm-token"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let cb = b(&["rotate", "apm-token"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (oa, ob) = (
            ca.wait_with_output().unwrap(),
            cb.wait_with_output().unwrap(),
        );
        a.record(&oa);
        a.record(&ob);
        for o in [&oa, &ob] {
            match o.status.code() {
                Some(0) => {}
                Some(1) => {
                    assert!(
                        stdout(o).contains("another rotd instance"),
                        "{}{}",
                        stdout(o),
                        stderr(o)
                    );
                    stood_down += 1;
                }
                c => panic!("unexpected exit {c:?}: {}{}", stdout(o), stderr(o)),
            }
        }
        assert!(
            oa.status.success() || ob.status.success(),
            "one of them rotates"
        );
    }
    eprintln!("5 races: {stood_down} instance(s) stood down on a rejected pending push");
    // On the remote, every pending is followed by its own succeeded: no interleaving.
    let log = stdout(&git(&a.remote, &["log", "--reverse", "--format=%(trailers:key=Rotd-Step,valueonly,separator=)|%(trailers:key=Rotd-Rotation,valueonly,separator=)", "main"]));
    let steps: Vec<(&str, &str)> = log
        .lines()
        .filter_map(|l| l.split_once('|'))
        .filter(|(s, _)| *s == "pending" || *s == "succeeded")
        .collect();
    assert_eq!(steps.len() % 2, 0, "{steps:?}");
    for pair in steps.chunks(2) {
        assert_eq!(
            (pair[0].0, pair[1].0),
            ("pending", "succeeded"),
            "{steps:?}"
        );
        assert_eq!(pair[0].1, pair[1].1, "interleaved rotations: {steps:?}");
    }
    assert_eq!(
        steps.len() / 2 + stood_down,
        10,
        "every attempt either rotated or stood down"
    );
    // Both converge: each instance rotates again from the shared history.
    assert!(a.rotd(&["rotate", "apm-token"]).status.success());
    let o = b(&["rotate", "apm-token"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = b(&["show", "apm-token"]).output().unwrap();
    // The consumer holds what B rotated last, and B's store agrees.
    assert_eq!(
        stdout(&o).trim(),
        std::fs::read_to_string(a.path("consumer/token")).unwrap()
    );
}

/// A rejected push of the pending commit, made deterministic: the remote's branch is
/// locked (`refs/heads/main.lock`, as while another pusher updates it), so the
/// compare-and-swap cannot succeed. The rotation stands down before touching
/// anything; the pending commit is dropped again, locally too.
#[test]
fn a_rejected_pending_push_stands_down_and_changes_nothing() {
    let env = TestEnv::new();
    files_schedule(&env);
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let consumer = env.path("consumer/token");
    let before = std::fs::read_to_string(&consumer).unwrap();
    let head = stdout(&git(&env.store, &["rev-parse", "HEAD"]));
    let lock = env.remote.join("refs/heads/main.lock");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::fs::write(&lock, &head).unwrap();
    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("another rotd instance"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        stdout(&git(&env.store, &["rev-parse", "HEAD"])),
        head,
        "dropped locally"
    );
    assert_eq!(stdout(&git(&env.remote, &["rev-parse", "main"])), head);
    assert!(!env.head_files().iter().any(|f| f.ends_with(".pending.age")));
    assert_eq!(std::fs::read_to_string(&consumer).unwrap(), before);
    let incoming = stdout(&git(&env.remote, &["for-each-ref", "refs/rotd/"]));
    assert!(
        incoming.is_empty(),
        "no private ref left on the remote: {incoming}"
    );
    std::fs::remove_file(&lock).unwrap();
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(std::fs::read_to_string(&consumer).unwrap(), before);
    assert_eq!(
        stdout(&git(&env.remote, &["rev-parse", "main"])),
        stdout(&git(&env.store, &["rev-parse", "HEAD"]))
    );
}

#[test]
fn an_edited_remote_in_the_configuration_is_where_the_next_push_goes() {
    let env = TestEnv::new();
    files_schedule(&env);
    let rotate = |env: &TestEnv| {
        let o = env.rotd(&["rotate", "apm-token"]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    rotate(&env);
    // The remote moves: a mirror of the old one, and rotd.toml names it.
    let moved = env.path("moved.git");
    let o = std::process::Command::new("git")
        .args(["clone", "-q", "--mirror"])
        .arg(&env.remote)
        .arg(&moved)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = std::fs::read_to_string(&env.config).unwrap().replace(
        &format!("remote = \"{}\"", env.remote.display()),
        &format!("remote = \"{}\"", moved.display()),
    );
    std::fs::write(&env.config, cfg).unwrap();
    let old_tip = stdout(&git(&env.remote, &["rev-parse", "main"]));
    rotate(&env);
    let head = stdout(&git(&env.store, &["rev-parse", "HEAD"]));
    assert_eq!(
        stdout(&git(&moved, &["rev-parse", "main"])),
        head,
        "pushed to the new remote"
    );
    assert_eq!(
        stdout(&git(&env.remote, &["rev-parse", "main"])),
        old_tip,
        "not to the old one"
    );
}
