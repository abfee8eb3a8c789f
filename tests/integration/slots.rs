//! The slot rule, against a REAL Prometheus receiver and the real rotd (CLI and
//! daemon): a rotation never gives a new password to the alternating user that still
//! holds the previous credential in its grace period. A manual rotation is refused,
//! a scheduled one waits (and says so in the log and in `rotd status`); `rotd retire
//! --force NAME` retires the user now, recorded, and the next rotation proceeds.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::util::*;

const NAME: &str = "prom-remote-write";

/// The hash `user` has in the receiver's web config (None: no entry).
fn web_hash(setup: &PromSetup, user: &str) -> Option<String> {
    let text = std::fs::read_to_string(&setup.web_config).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{user}:")))
        .map(|h| h.trim().trim_matches(['"', '\'']).to_owned())
}

fn succeeded(env: &TestEnv) -> usize {
    env.history_json(Some(NAME))
        .iter()
        .filter(|e| e["step"] == "succeeded")
        .count()
}

fn state(env: &TestEnv) -> serde_json::Value {
    let o = env.rotd(&["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == NAME)
        .unwrap()
        .clone()
}

/// Imports writer-a (PromSetup), rotates once with `grace`: writer-b is current and
/// writer-a is in its grace period.
/// No agent runs (the receiver is what the rule protects), so its reload is dropped.
fn rotated_once(env: &TestEnv, grace: &str) -> PromSetup {
    let setup = PromSetup::start(env, grace, false);
    let file = env.schedules.join(format!("{NAME}.toml"));
    let text: String = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("reload = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&file, text).unwrap();
    let o = env.rotd(&["rotate", NAME]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(web_hash(&setup, "writer-b").is_some(), "writer-b installed");
    setup
}

/// Makes the schedule fire every second.
fn every_second(env: &TestEnv) {
    let file = env.schedules.join(format!("{NAME}.toml"));
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("schedule = \"0 0 3 * * Sun\"", "schedule = \"* * * * * *\"");
    std::fs::write(&file, text).unwrap();
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(env: &TestEnv) -> Daemon {
    let log = std::fs::File::create(env.path("daemon.log")).unwrap();
    let child = env
        .cmd(&["run"])
        .env("ROTD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let socket = env.path("rotd.sock");
    wait_until("the control socket", Duration::from_secs(20), || {
        UnixStream::connect(&socket).is_ok()
    });
    Daemon(child)
}

fn daemon_log(env: &TestEnv) -> String {
    let mut s = String::new();
    std::fs::File::open(env.path("daemon.log"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    env.record_text(&s);
    s
}

#[test]
fn a_manual_rotation_while_the_idle_user_is_in_grace_is_refused_and_changes_nothing() {
    let env = TestEnv::new();
    let setup = rotated_once(&env, "1h");
    let a_hash = web_hash(&setup, "writer-a").unwrap();
    let web_before = std::fs::read(&setup.web_config).unwrap();
    let o = env.rotd(&["rotate", NAME]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", stderr(&o));
    assert!(out.contains("writer-a"), "names the user in grace: {out}");
    assert!(
        out.contains(&format!("rotd retire --force {NAME}")),
        "names the override: {out}"
    );
    assert!(out.contains("rotd retire"), "{out}");
    assert_eq!(web_hash(&setup, "writer-a").unwrap(), a_hash);
    assert_eq!(std::fs::read(&setup.web_config).unwrap(), web_before);
    assert_eq!(succeeded(&env), 1, "still exactly one rotation");
    // Nothing pending, no commit of the refusal.
    assert!(!env.head_files().iter().any(|f| f.contains("pending")));
    // `rotd retire NAME` before the grace ends retires nothing, and says so.
    let o = env.rotd(&["retire", NAME]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("nothing due"), "{}", stdout(&o));
    assert_eq!(web_hash(&setup, "writer-a").unwrap(), a_hash);
}

#[test]
fn a_scheduled_rotation_while_the_idle_user_is_in_grace_waits_and_status_says_so() {
    let env = TestEnv::new();
    let setup = rotated_once(&env, "1h");
    let a_hash = web_hash(&setup, "writer-a").unwrap();
    every_second(&env);
    let _d = start_daemon(&env);
    wait_until("a waiting line in the log", Duration::from_secs(20), || {
        daemon_log(&env).contains("rotation waits")
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(succeeded(&env), 1, "no scheduled rotation ran");
    assert_eq!(web_hash(&setup, "writer-a").unwrap(), a_hash);
    let s = state(&env);
    assert_eq!(s["state"], "waiting-retire", "{s}");
    assert!(s["retire_after"].as_str().is_some(), "{s}");
    let o = env.rotd(&["status"]);
    let text = stdout(&o);
    assert!(
        text.contains("waiting-retire") && text.contains(s["retire_after"].as_str().unwrap()),
        "{text}"
    );
    // A manual rotation through the daemon is refused the same way.
    let o = env.rotd(&["rotate", NAME]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains(&format!("rotd retire --force {NAME}")),
        "{}",
        stdout(&o)
    );
    assert_eq!(succeeded(&env), 1);
    assert_eq!(web_hash(&setup, "writer-a").unwrap(), a_hash);
    let log = daemon_log(&env);
    let line = log
        .lines()
        .find(|l| l.contains("rotation waits"))
        .unwrap()
        .to_owned();
    assert!(
        line.contains("INFO")
            && line.contains(NAME)
            && line.contains(s["retire_after"].as_str().unwrap()),
        "{line}"
    );
}

#[test]
fn after_retire_force_the_next_rotation_gives_the_retired_user_a_new_password() {
    let env = TestEnv::new();
    let setup = rotated_once(&env, "1h");
    let b_pw = env.show(NAME);
    let o = env.rotd(&["retire", "--force", NAME]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(
        web_hash(&setup, "writer-a").is_none(),
        "writer-a retired now"
    );
    assert_eq!(setup.write_status("writer-a", INITIAL_PW), 401);
    // Recorded, with who ran it.
    let h = env.history_json(Some(NAME));
    let retired = h
        .iter()
        .find(|e| e["step"] == "retired")
        .expect("a retired commit");
    assert!(
        retired["trigger"]
            .as_str()
            .unwrap()
            .starts_with("manual uid="),
        "{retired}"
    );
    assert_eq!(state(&env)["state"], "ok");
    let o = env.rotd(&["rotate", NAME]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let a_pw = env.show(NAME);
    assert_ne!(a_pw, b_pw);
    assert_eq!(setup.write_status("writer-a", &a_pw), 200);
    assert_eq!(
        setup.write_status("writer-b", &b_pw),
        200,
        "writer-b in grace"
    );
    assert_eq!(succeeded(&env), 2);
}

#[test]
fn with_grace_zero_the_next_rotation_proceeds() {
    let env = TestEnv::new();
    let setup = rotated_once(&env, "0s");
    assert!(web_hash(&setup, "writer-a").is_none(), "retired at once");
    let o = env.rotd(&["rotate", NAME]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let a_pw = env.show(NAME);
    assert_eq!(setup.write_status("writer-a", &a_pw), 200);
    assert_eq!(succeeded(&env), 2);
}

#[test]
fn a_due_retirement_runs_before_the_rotation_that_reuses_its_slot() {
    let env = TestEnv::new();
    let setup = rotated_once(&env, "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let o = env.rotd(&["rotate", NAME]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let a_pw = env.show(NAME);
    assert_eq!(setup.write_status("writer-a", &a_pw), 200);
    // Newest first: the succeeded rotation, then the retirement of writer-a.
    let steps: Vec<String> = env
        .history_json(Some(NAME))
        .iter()
        .filter_map(|e| e["step"].as_str().map(str::to_owned))
        .filter(|s| s == "succeeded" || s == "retired")
        .collect();
    assert_eq!(
        steps[..3],
        ["succeeded", "retired", "succeeded"],
        "{steps:?}"
    );
}

#[test]
fn check_warns_when_the_grace_is_longer_than_the_cron_interval() {
    let env = TestEnv::new();
    let _setup = PromSetup::start(&env, "1h", false);
    let file = env.schedules.join(format!("{NAME}.toml"));
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "schedule = \"0 0 3 * * Sun\"",
        "schedule = \"0 */30 * * * *\"",
    );
    std::fs::write(&file, &text).unwrap();
    let o = env.rotd(&["check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let warning = out
        .lines()
        .find(|l| l.starts_with("warning:") && l.contains("grace"))
        .unwrap_or_else(|| panic!("no grace warning: {out}"));
    assert!(warning.contains("30m"), "{warning}");
    // A grace shorter than the interval: no warning.
    let short = text.replace("grace = \"1h\"", "grace = \"10m\"");
    std::fs::write(&file, &short).unwrap();
    let o = env.rotd(&["check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stdout(&o).contains("grace"), "{}", stdout(&o));

    // With consumers, the previous user is held until they acknowledge: grace +
    // ack_timeout is what must fit. A consumer host without a signer can never
    // acknowledge: warned too.
    let recipient = age_keygen(&env.path("keys/h1.agekey"));
    let cfg = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        format!("{cfg}\n[hosts.h1]\nrecipient = \"{recipient}\"\n"),
    )
    .unwrap();
    std::fs::write(
        &file,
        short.replace(
            "grace = \"10m\"",
            "grace = \"10m\"\nconsumers = [\"h1\"]\nack_timeout = \"25m\"",
        ),
    )
    .unwrap();
    let o = env.rotd(&["check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("warning:")).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("grace + ack_timeout (10m + 25m") && w.contains("30m")),
        "{out}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("host \"h1\" has no `signer`") && w.contains("hosts.h1.signer")),
        "{out}"
    );
}

#[test]
fn when_the_grace_ends_the_daemon_retires_first_then_the_scheduled_rotation_proceeds() {
    let env = TestEnv::new();
    let setup = rotated_once(&env, "3s");
    let a_hash = web_hash(&setup, "writer-a").unwrap();
    every_second(&env);
    let _d = start_daemon(&env);
    wait_until("a scheduled rotation", Duration::from_secs(30), || {
        env.history_json(Some(NAME))
            .iter()
            .any(|e| e["step"] == "succeeded" && e["trigger"] == "schedule")
    });
    // Oldest first: the manual rotation, writer-a retired, then the scheduled one.
    let mut h = env.history_json(Some(NAME));
    h.reverse();
    let steps: Vec<(String, String)> = h
        .iter()
        .filter(|e| e["step"] == "succeeded" || e["step"] == "retired")
        .map(|e| {
            (
                e["step"].as_str().unwrap().to_owned(),
                e["trigger"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(steps[0].0, "succeeded");
    assert!(steps[0].1.starts_with("manual"), "{steps:?}");
    assert_eq!(steps[1].0, "retired", "{steps:?}");
    assert_eq!(
        (steps[2].0.as_str(), steps[2].1.as_str()),
        ("succeeded", "schedule"),
        "{steps:?}"
    );
    assert_ne!(web_hash(&setup, "writer-a"), Some(a_hash));
    daemon_log(&env);
}

#[test]
fn a_waiting_rotation_does_not_fire_the_rotation_failing_alert() {
    let env = TestEnv::new();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/rotd-alerts.yml");
    let test = env.path("alerts-test.yml");
    std::fs::write(
        &test,
        format!(
            "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n      - series: 'rotd_rotations_total{{secret=\"w\",outcome=\"waiting-retire\"}}'\n        values: '0+1x60'\n      - series: 'rotd_rotations_total{{secret=\"r\",outcome=\"rolled-back\"}}'\n        values: '0+1x60'\n    alert_rule_test:\n      - eval_time: 30m\n        alertname: RotdRotationFailing\n        exp_alerts:\n          - exp_labels:\n              severity: warning\n              secret: r\n            exp_annotations:\n              summary: 'rotd cannot rotate r'\n              description: 'Rotations of r failed in the last hour; the old credential is still in use. See `rotd status` and `rotd history r`.'\n",
            rules.display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test)
        .output()
        .expect("promtool (apt-get install prometheus)");
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
}
