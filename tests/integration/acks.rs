//! Ack-gated retirement (DESIGN §7), against a REAL Prometheus receiver, real git
//! (a bare remote) and real `ssh-keygen` / `age-keygen` keys: the old credential of a
//! secret with consumers is retired only when the grace has passed AND every consumer
//! host has pushed a commit signed with ITS key on `refs/rotd/acks/HOST` naming the
//! current rotation. A forged ack counts for nothing; `rotd retire --force` and
//! `rotd rotate --emergency` are the recorded overrides.

use std::path::PathBuf;
use std::process::Command;

use crate::util::*;

const NAME: &str = "prom-remote-write";

/// A consumer host's keys: its age identity (recipient) and its SSH signing key.
struct HostKeys {
    sign: PathBuf,
}

fn keygen_host(env: &TestEnv, host: &str) -> (HostKeys, String, String) {
    let recipient = age_keygen(&env.path(&format!("keys/{host}.agekey")));
    let sign = env.path(&format!("keys/{host}.sign"));
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(format!("rotd-agent@{host}"))
        .arg("-f")
        .arg(&sign)
        .output()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(o.status.success(), "{}", stderr(&o));
    let signer = std::fs::read_to_string(sign.with_extension("sign.pub"))
        .unwrap()
        .trim()
        .to_owned();
    (HostKeys { sign }, recipient, signer)
}

/// A Prometheus remote-write secret (writer-a imported, grace 0s) consumed by h1
/// and h2, declared in rotd.toml with age recipients and SSH signers.
fn setup(env: &TestEnv) -> (PromSetup, HostKeys, HostKeys) {
    let setup = PromSetup::start(env, "0s", false);
    let file = env.schedules.join(format!("{NAME}.toml"));
    // No agent runs: its reload is dropped (the receiver is what the gate protects).
    let text: String = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("reload = "))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace(
            "grace = \"0s\"\n",
            "grace = \"0s\"\nconsumers = [\"h1\", \"h2\"]\nack_timeout = \"1h\"\n",
        );
    std::fs::write(&file, text).unwrap();
    let (k1, r1, s1) = keygen_host(env, "h1");
    let (k2, r2, s2) = keygen_host(env, "h2");
    let cfg = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("{cfg}\n[hosts.h1]\nrecipient = \"{r1}\"\nsigner = \"{s1}\"\n\n[hosts.h2]\nrecipient = \"{r2}\"\nsigner = \"{s2}\"\n"),
    )
    .unwrap();
    (setup, k1, k2)
}

/// Pushes to the remote, as `host`, an ack commit naming `rotation` of NAME; signed
/// with `key` (None: unsigned).
fn push_ack(env: &TestEnv, host: &str, key: Option<&HostKeys>, rotation: &str) {
    let repo = env.path(&format!("agent-{host}"));
    if !repo.exists() {
        assert!(git(env.dir.path(), &["init", "-q", repo.to_str().unwrap()])
            .status
            .success());
    }
    let tree = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["hash-object", "-t", "tree", "-w", "--stdin"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let tree = stdout(&tree).trim().to_owned();
    let mut c = Command::new("git");
    c.arg("-C").arg(&repo).args([
        "-c",
        "user.name=agent",
        "-c",
        "user.email=agent@example.org",
    ]);
    if let Some(k) = key {
        c.args(["-c", "gpg.format=ssh", "-c"])
            .arg(format!("user.signingkey={}", k.sign.display()));
    }
    c.args(["commit-tree", &tree, "-m"])
        .arg(format!("ack {host}\n\nRotd-Ack: {NAME} {rotation}\n"));
    if key.is_some() {
        c.arg("-S");
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "commit-tree: {}", stderr(&o));
    let sha = stdout(&o).trim().to_owned();
    let o = git(
        &repo,
        &[
            "push",
            "-q",
            "-f",
            env.remote.to_str().unwrap(),
            &format!("{sha}:refs/rotd/acks/{host}"),
        ],
    );
    assert!(o.status.success(), "push: {}", stderr(&o));
}

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

fn state(env: &TestEnv) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&rotd_ok(env, &["status", "--json"])).unwrap();
    v["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == NAME)
        .unwrap()
        .clone()
}

fn retired(env: &TestEnv) -> Vec<serde_json::Value> {
    env.history_json(Some(NAME))
        .into_iter()
        .filter(|e| e["step"] == "retired")
        .collect()
}

fn current_rotation(env: &TestEnv) -> String {
    env.history_json(Some(NAME))
        .iter()
        .find(|e| e["step"] == "succeeded")
        .and_then(|e| e["rotation"].as_str().map(str::to_owned))
        .expect("a succeeded rotation")
}

#[test]
fn old_credential_is_retired_only_after_every_consumer_acks_the_current_rotation() {
    let env = TestEnv::new();
    let (_setup, k1, k2) = setup(&env);
    rotd_ok(&env, &["rotate", NAME]);
    assert!(
        retired(&env).is_empty(),
        "retired behind the consumers' back"
    );
    let s = state(&env);
    assert_eq!(s["state"], "waiting-acks", "{s}");
    assert_eq!(s["lagging"], serde_json::json!(["h1", "h2"]), "{s}");
    assert!(s["retire_after"].is_string(), "{s}");
    let text = rotd_ok(&env, &["status"]);
    assert!(text.contains("waiting-acks: host(s) h1, h2"), "{text}");
    let rotation = current_rotation(&env);

    // h1 acknowledges: still waiting on h2.
    push_ack(&env, "h1", Some(&k1), &rotation);
    assert_eq!(state(&env)["lagging"], serde_json::json!(["h2"]));
    rotd_ok(&env, &["retire"]);
    assert!(retired(&env).is_empty(), "retired while h2 lags");

    // Forged acks for h2: unsigned, then signed by h1's key. Neither counts.
    push_ack(&env, "h2", None, &rotation);
    let o = env.rotd(&["retire", NAME]);
    assert!(
        stdout(&o).contains("waiting for the acknowledgements of host(s) h2"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("not signed"), "{}", stderr(&o));
    push_ack(&env, "h2", Some(&k1), &rotation);
    let o = env.rotd(&["retire"]);
    assert!(
        stderr(&o).contains("acknowledgement of host h2 ignored"),
        "{}",
        stderr(&o)
    );
    assert!(
        retired(&env).is_empty(),
        "a forged ack retired the old credential"
    );
    assert_eq!(state(&env)["lagging"], serde_json::json!(["h2"]));

    // The next rotation waits too: the old credential is still in use.
    let o = env.rotd(&["rotate", NAME]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("host(s) h2 have not"), "{}", stdout(&o));

    // h2 acknowledges with its own key: retired.
    push_ack(&env, "h2", Some(&k2), &rotation);
    let out = rotd_ok(&env, &["retire"]);
    assert!(out.contains("retired"), "{out}");
    let r = retired(&env);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["rotation"], rotation.as_str());
    assert_eq!(state(&env)["state"], "ok");
}

#[test]
fn an_ack_of_an_older_rotation_does_not_count() {
    let env = TestEnv::new();
    let (_setup, k1, k2) = setup(&env);
    rotd_ok(&env, &["rotate", NAME]);
    let first = current_rotation(&env);
    push_ack(&env, "h1", Some(&k1), &first);
    push_ack(&env, "h2", Some(&k2), &first);
    rotd_ok(&env, &["retire"]);
    assert_eq!(retired(&env).len(), 1);
    rotd_ok(&env, &["rotate", NAME]);
    assert_ne!(current_rotation(&env), first);
    let s = state(&env);
    assert_eq!(s["state"], "waiting-acks", "{s}");
    assert_eq!(s["lagging"], serde_json::json!(["h1", "h2"]), "{s}");
    assert_eq!(retired(&env).len(), 1);
}

#[test]
fn retire_force_bypasses_the_ack_gate_and_names_the_laggards() {
    let env = TestEnv::new();
    let (_setup, k1, _k2) = setup(&env);
    rotd_ok(&env, &["rotate", NAME]);
    push_ack(&env, "h1", Some(&k1), &current_rotation(&env));
    rotd_ok(&env, &["retire", "--force", NAME]);
    let r = retired(&env);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0]["trailers"]["Rotd-Forced"].is_string(), "{:?}", r[0]);
    assert_eq!(r[0]["trailers"]["Rotd-Lagging"], "h2", "{:?}", r[0]);
    assert!(r[0]["trigger"].as_str().unwrap().starts_with("manual"));
    assert_eq!(state(&env)["state"], "ok");
}

#[test]
fn emergency_rotation_retires_at_once_and_records_the_cut_off_hosts() {
    let env = TestEnv::new();
    let (setup, _k1, _k2) = setup(&env);
    let out = rotd_ok(&env, &["rotate", "--emergency", NAME]);
    assert!(out.contains("old credential retired"), "{out}");
    let r = retired(&env);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["trailers"]["Rotd-Emergency"], "yes", "{:?}", r[0]);
    assert_eq!(r[0]["trailers"]["Rotd-Lagging"], "h1, h2", "{:?}", r[0]);
    assert!(r[0]["trigger"].as_str().unwrap().starts_with("manual"));
    let ok = env
        .history_json(Some(NAME))
        .into_iter()
        .find(|e| e["step"] == "succeeded")
        .unwrap();
    assert_eq!(ok["trailers"]["Rotd-Emergency"], "yes");
    // writer-a (the leaked credential) is gone from the receiver.
    let web = std::fs::read_to_string(&setup.web_config).unwrap();
    assert!(!web.contains("writer-a:"), "{web}");
    assert_eq!(state(&env)["state"], "ok");
}

#[test]
fn lagging_consumers_fire_their_alert_after_an_hour_and_a_waiting_rotation_is_no_failure() {
    let env = TestEnv::new();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/rotd-alerts.yml");
    let test = env.path("alerts-test.yml");
    std::fs::write(
        &test,
        format!(
            r#"rule_files:
  - {}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'rotd_consumers_lagging{{secret="s"}}'
        values: '2x120'
      - series: 'rotd_consumers_lagging{{secret="acked"}}'
        values: '0x120'
      - series: 'rotd_rotations_total{{secret="s",outcome="waiting-acks"}}'
        values: '0+1x120'
    alert_rule_test:
      - eval_time: 30m
        alertname: RotdConsumersLagging
        exp_alerts: []
      - eval_time: 90m
        alertname: RotdConsumersLagging
        exp_alerts:
          - exp_labels:
              severity: warning
              secret: s
            exp_annotations:
              summary: '2 consumer host(s) of s have not acknowledged its current rotation'
              description: 'The old credential of s is kept until they do. `rotd status` names the hosts; check their `rotd agent`, or cut them off with `rotd retire --force s`.'
      - eval_time: 90m
        alertname: RotdRotationFailing
        exp_alerts: []
"#,
            rules.display()
        ),
    )
    .unwrap();
    let o = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test)
        .output()
        .expect("promtool (apt-get install prometheus)");
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
}

struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_daemon_exports_how_many_consumers_lag() {
    let env = TestEnv::new();
    let (_setup, k1, _k2) = setup(&env);
    rotd_ok(&env, &["rotate", NAME]);
    push_ack(&env, "h1", Some(&k1), &current_rotation(&env));
    rotd_ok(&env, &["retire"]); // fetches the acks into the store
    let port = free_port();
    let cfg = std::fs::read_to_string(&env.config).unwrap().replace(
        "[daemon]\n",
        &format!("[daemon]\nmetrics = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::write(&env.config, cfg).unwrap();
    let log = std::fs::File::create(env.path("daemon.log")).unwrap();
    let _d = Daemon(
        env.cmd(&["run"])
            .env("ROTD_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let want = format!("rotd_consumers_lagging{{secret=\"{NAME}\"}} 1");
    let mut text = String::new();
    wait_until(
        "the lagging gauge",
        std::time::Duration::from_secs(20),
        || {
            text = reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
                .and_then(|r| r.text())
                .unwrap_or_default();
            text.contains(&want)
        },
    );
    assert!(
        text.contains("# TYPE rotd_consumers_lagging gauge"),
        "{text}"
    );
    let s = state(&env);
    assert_eq!(s["state"], "waiting-acks", "{s}");
    assert_eq!(s["lagging"], serde_json::json!(["h2"]), "{s}");
    env.record_text(&std::fs::read_to_string(env.path("daemon.log")).unwrap());
}
