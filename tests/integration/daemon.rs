//! `rotd run` as a real process: rotations through the control socket, /metrics
//! (scraped by a real Prometheus too), hot reload of schedules, bad schedule files,
//! refused uids, and SIGTERM during a rotation.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::util::*;

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

fn files_schedule(env: &TestEnv, name: &str, cron: &str, probe: &str) {
    env.write_schedule(
        name,
        &format!(
            "name = \"{name}\"\nschedule = \"{cron}\"\ngrace = \"0s\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/{name}.token\"\ncontent = \"{{{{secret}}}}\"\n{probe}",
            env.path("consumer").display()
        ),
    );
}

fn start(env: &TestEnv) -> Daemon {
    let port = free_port();
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    if !cfg.contains("metrics =") {
        cfg.push_str(&format!("metrics = \"127.0.0.1:{port}\"\n"));
        std::fs::write(&env.config, &cfg).unwrap();
    }
    let metrics = cfg
        .split("metrics = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
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
        metrics: format!("http://{metrics}"),
    }
}

fn status(env: &TestEnv) -> serde_json::Value {
    let o = env.rotd(&["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn secret_status<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap()
}

fn metrics(d: &Daemon) -> String {
    reqwest::blocking::get(format!("{}/metrics", d.metrics))
        .unwrap()
        .text()
        .unwrap()
}

#[test]
fn rotate_through_the_socket_moves_the_metrics_and_records_the_peer() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    let d = start(&env);
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("apm-token: rotated"), "{}", stdout(&o));
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap();
    assert!(
        log.contains("control request"),
        "the daemon did the rotation: {log}"
    );
    let h = env.history_json(Some("apm-token"));
    assert_eq!(h[0]["step"], "succeeded");
    assert!(
        h[0]["trigger"]
            .as_str()
            .unwrap()
            .starts_with("manual uid=0"),
        "{:?}",
        h[0]["trigger"]
    );
    let m = metrics(&d);
    env.record_text(&m);
    assert!(
        m.contains("rotd_rotations_total{secret=\"apm-token\",outcome=\"succeeded\"} 1"),
        "{m}"
    );
    assert!(m.contains("rotd_rotation_duration_seconds_count{secret=\"apm-token\"} 1"));
    assert!(m.contains("rotd_next_rotation_timestamp_seconds{secret=\"apm-token\"}"));
    assert!(m.contains("rotd_secret_age_seconds{secret=\"apm-token\"}"));
    let health = reqwest::blocking::get(format!("{}/healthz", d.metrics)).unwrap();
    assert_eq!(health.status(), 200);
    // Unknown secret: usage error from the daemon too.
    assert_eq!(env.rotd(&["rotate", "nope"]).status.code(), Some(64));
    // status comes from the daemon, with the scheduler's next run.
    let s = status(&env);
    assert_eq!(s["daemon"], true);
    assert!(secret_status(&s, "apm-token")["next_run"]
        .as_str()
        .unwrap()
        .ends_with("T04:00:00Z"));
}

#[test]
fn schedule_edits_are_picked_up_and_a_bad_file_keeps_the_old_version() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    let _d = start(&env);
    let before = secret_status(&status(&env), "apm-token")["next_run"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(before.ends_with("T04:00:00Z"), "{before}");
    // Edit: a different hour (editors often replace the file: write + rename).
    let tmp = env.path("schedules/.apm-token.toml.swp");
    std::fs::write(
        &tmp,
        std::fs::read_to_string(env.schedules.join("apm-token.toml"))
            .unwrap()
            .replace("0 0 4 * * *", "0 30 5 * * *"),
    )
    .unwrap();
    std::fs::rename(&tmp, env.schedules.join("apm-token.toml")).unwrap();
    wait_until("the new next run in status", Duration::from_secs(5), || {
        secret_status(&status(&env), "apm-token")["next_run"]
            .as_str()
            .unwrap()
            .ends_with("T05:30:00Z")
    });
    // A broken edit: reported, and the previous version keeps running.
    std::fs::write(
        env.schedules.join("apm-token.toml"),
        "name = \"apm-token\"\nschedule = \"every day\"\n[target]\nkind = \"files\"\n",
    )
    .unwrap();
    wait_until(
        "the schedule error in status",
        Duration::from_secs(5),
        || {
            !status(&env)["schedule_errors"]
                .as_array()
                .unwrap()
                .is_empty()
        },
    );
    let s = status(&env);
    let err = s["schedule_errors"][0].as_str().unwrap();
    assert!(err.contains("apm-token.toml:2"), "{err}");
    assert!(secret_status(&s, "apm-token")["next_run"]
        .as_str()
        .unwrap()
        .ends_with("T05:30:00Z"));
    assert!(metrics(&_d).contains("rotd_schedule_errors 1"));
    // A new file is scheduled; a removed one keeps its secret in the store.
    files_schedule(&env, "app-pw", "0 15 1 * * *", "");
    wait_until("the new schedule", Duration::from_secs(5), || {
        status(&env)["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "app-pw" && x["scheduled"] == true)
    });
    let o = env.rotd(&["rotate", "app-pw"]);
    assert!(o.status.success());
    // Its consumer file stays (rotd never deletes a consumer's file).
    env.allow_holder(&env.path("consumer/app-pw.token"));
    std::fs::remove_file(env.schedules.join("app-pw.toml")).unwrap();
    wait_until("the schedule gone", Duration::from_secs(5), || {
        status(&env)["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "app-pw" && x["scheduled"] == false)
    });
    assert!(env.head_files().contains(&"secrets/app-pw.age".to_owned()));
    // SIGHUP reloads too.
    files_schedule(&env, "apm-token", "0 45 6 * * *", "");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(_d.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until("SIGHUP reload", Duration::from_secs(5), || {
        secret_status(&status(&env), "apm-token")["next_run"]
            .as_str()
            .unwrap()
            .ends_with("T06:45:00Z")
    });
}

#[test]
fn sigterm_during_a_rotation_lets_it_finish_and_exits_0() {
    sigterm_during_a_rotation(false);
}

/// The same with the rotation started by the schedule: aborting the schedule's task
/// at shutdown must not cut its rotation short.
#[test]
fn sigterm_during_a_scheduled_rotation_lets_it_finish_and_exits_0() {
    sigterm_during_a_rotation(true);
}

fn sigterm_during_a_rotation(by_cron: bool) {
    let env = TestEnv::new();
    let port = free_port(); // nothing listens: the probe keeps failing for ~2 s
    files_schedule(
        &env,
        "apm-token",
        if by_cron { "* * * * * *" } else { "0 0 4 * * *" },
        &format!("[probe]\nattempts = 20\ninterval = \"100ms\"\ntimeout = \"1s\"\nhttp = {{ url = \"http://127.0.0.1:{port}/\" }}\n"),
    );
    let mut d = start(&env);
    let rotate = (!by_cron).then(|| {
        env.cmd(&["rotate", "apm-token"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    });
    wait_until("the pending commit", Duration::from_secs(10), || {
        env.head_files().iter().any(|f| f.ends_with(".pending.age"))
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = d.child.wait().unwrap();
    let log = std::fs::read_to_string(env.path("daemon.log")).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        !log.contains("still in flight after the shutdown grace"),
        "the rotation finished within the grace"
    );
    assert!(
        !env.head_files().iter().any(|f| f.ends_with(".pending.age")),
        "no pending left"
    );
    let h = env.history_json(Some("apm-token"));
    assert_eq!(h[0]["step"], "rolled-back");
    assert_eq!(
        h[0]["trigger"],
        if by_cron {
            "schedule"
        } else {
            h[0]["trigger"].as_str().unwrap()
        }
    );
    if let Some(rotate) = rotate {
        let o = rotate.wait_with_output().unwrap();
        env.record(&o);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    }
    assert!(!env.path("rotd.sock").exists(), "socket removed at exit");
}

#[test]
fn the_control_socket_refuses_a_uid_that_is_not_allowed() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    let _d = start(&env);
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // Let uid 65534 reach the socket file; the daemon's own check must refuse it.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(
        env.path("rotd.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.sendall(b'{{\"cmd\":\"rotate\",\"names\":[\"apm-token\"]}}\\n')\nsys.stdout.write(s.makefile().readline())",
        env.path("rotd.sock").display().to_string()
    );
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let answer: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("uid 65534 is not allowed"),
        "{answer}"
    );
    assert!(
        env.history_json(Some("apm-token")).is_empty(),
        "nothing rotated"
    );
    // Root (the test) is allowed on the same socket.
    let mut s = UnixStream::connect(env.path("rotd.sock")).unwrap();
    s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
}

#[test]
fn a_real_prometheus_scrapes_the_daemon_metrics() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    let d = start(&env);
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success());
    let target = d.metrics.trim_start_matches("http://");
    let prom = Prom::server(
        &env.path("prom"),
        &format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rotd\n    static_configs:\n      - targets: ['{target}']\n"),
    );
    prom.wait_ready(None);
    let q = |expr: &str| -> Vec<serde_json::Value> {
        let r: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("{}/api/v1/query", prom.url()))
            .query(&[("query", expr)])
            .send()
            .unwrap()
            .json()
            .unwrap();
        r["data"]["result"].as_array().cloned().unwrap_or_default()
    };
    wait_until("up{job=rotd} == 1", Duration::from_secs(20), || {
        q("up{job=\"rotd\"}")
            .first()
            .map(|v| v["value"][1] == "1")
            .unwrap_or(false)
    });
    let r = q("rotd_rotations_total{secret=\"apm-token\",outcome=\"succeeded\"}");
    assert_eq!(r[0]["value"][1], "1", "{r:?}");
}

#[test]
fn cron_max_age_and_grace_run_by_themselves() {
    let env = TestEnv::new();
    // Every 2 s, with a 1 s grace: the daemon rotates and then retires on its own.
    files_schedule(&env, "apm-token", "*/2 * * * * *", "");
    let text = std::fs::read_to_string(env.schedules.join("apm-token.toml"))
        .unwrap()
        .replace("grace = \"0s\"", "grace = \"1s\"");
    std::fs::write(env.schedules.join("apm-token.toml"), text).unwrap();
    // An imported credential older than max_age is rotated at start-up.
    let o = env.rotd_stdin(&["import", "old-token"], "an-old-token-value\n");
    assert!(o.status.success());
    env.write_schedule("old-token", "name = \"old-token\"\nschedule = \"0 0 4 1 1 *\"\nmax_age = \"1s\"\n[target]\nkind = \"files\"\n");
    std::thread::sleep(Duration::from_millis(1100));
    let _d = start(&env);
    wait_until("a scheduled rotation", Duration::from_secs(15), || {
        let h = env.history_json(Some("apm-token"));
        h.iter()
            .any(|e| e["step"] == "succeeded" && e["trigger"] == "schedule")
    });
    wait_until(
        "the start-up rotation of the old credential",
        Duration::from_secs(10),
        || {
            env.history_json(Some("old-token"))
                .iter()
                .any(|e| e["step"] == "succeeded" && e["trigger"] == "schedule")
        },
    );
    assert_ne!(env.show("old-token"), "an-old-token-value");
}

#[test]
fn shipped_alerting_rules_pass_promtool() {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/rotd-alerts.yml");
    let o = std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .expect("promtool (apt-get install prometheus)");
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("SUCCESS: 6 rules found"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_thousand_schedules_idle_without_polling() {
    let env = TestEnv::new();
    for i in 0..1000 {
        // Yearly schedules: nothing fires during the test.
        files_schedule(
            &env,
            &format!("secret-{i:04}"),
            &format!("0 {} {} 1 1 *", i % 60, i % 24),
            "",
        );
    }
    let d = start(&env);
    let pid = d.child.id();
    wait_until("all schedules planned", Duration::from_secs(30), || {
        status(&env)["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["next_run"].is_string())
            .count()
            == 1000
    });
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kib(pid);
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    let ticks = cpu_ticks(pid) - t0;
    let rss_after = rss_kib(pid);
    eprintln!("1000 schedules: RSS {rss_after} KiB, CPU over 5 idle seconds: {ticks} ticks");
    assert!(
        ticks <= 5,
        "the idle daemon used {ticks} CPU ticks in 5 s: something polls"
    );
    assert!(rss_after < 150 * 1024, "RSS {rss_after} KiB");
    assert!(
        rss_after <= rss_before + 1024,
        "RSS grew while idle: {rss_before} -> {rss_after} KiB"
    );
}

#[test]
fn a_recipient_added_while_the_daemon_runs_can_decrypt_after_the_automatic_rekey() {
    let env = TestEnv::new();
    files_schedule(&env, "apm-token", "0 0 4 * * *", "");
    let _d = start(&env);
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success());
    let newcomer = env.path("keys/newcomer.agekey");
    let o = std::process::Command::new("age-keygen")
        .arg("-o")
        .arg(&newcomer)
        .output()
        .unwrap();
    let public = String::from_utf8_lossy(&o.stderr)
        .trim()
        .trim_start_matches("Public key: ")
        .to_owned();
    let recipients = env.path("keys/recipients");
    let mut text = std::fs::read_to_string(&recipients).unwrap();
    text.push_str(&format!("{public}\n"));
    std::fs::write(&recipients, text).unwrap();
    wait_until("the rekey commit", Duration::from_secs(10), || {
        stdout(&git(&env.store, &["log", "-1", "--format=%B"])).contains("Rotd-Step: rekeyed")
    });
    let d = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&newcomer)
        .arg(env.store.join("secrets/apm-token.age"))
        .output()
        .unwrap();
    assert!(d.status.success(), "{}", stderr(&d));
    assert_eq!(stdout(&d).lines().next().unwrap(), env.show("apm-token"));
    // The daemon goes on with the new keys: a rotation is readable by the newcomer too.
    let o = env.rotd(&["rotate", "apm-token"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = std::process::Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&newcomer)
        .arg(env.store.join("secrets/apm-token.age"))
        .output()
        .unwrap();
    assert!(d.status.success());
}

/// 50 concurrent `rotd rotate` (10 per secret, 5 secrets) while the daemon runs and
/// rotates one of them on a cron every second: half the CLI processes go through the
/// daemon's socket, half run in-process (a second config naming a socket nobody
/// listens on, same store). Rotations of one secret never overlap in git, every
/// rotation a process reported is committed as succeeded, and every commit reaches
/// the remote.
#[test]
fn fifty_concurrent_rotations_cli_and_daemon_mixed_are_serialized_per_secret() {
    let env = TestEnv::new();
    let names: Vec<String> = (0..5).map(|i| format!("svc-{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        let cron = if i == 0 { "* * * * * *" } else { "0 0 4 * * *" };
        files_schedule(&env, n, cron, "");
    }
    let direct = env.path("rotd-direct.toml");
    std::fs::write(
        &direct,
        std::fs::read_to_string(&env.config)
            .unwrap()
            .replace("rotd.sock", "nobody-listens.sock"),
    )
    .unwrap();
    let mut d = start(&env);
    let children: Vec<_> = (0..50)
        .map(|i| {
            let name = &names[i % names.len()];
            let mut c = env.cmd(&["rotate", name]);
            if i % 2 == 1 {
                // In-process: the same store, but no daemon behind this socket path.
                c = std::process::Command::new(rotd_bin());
                c.arg("--config")
                    .arg(&direct)
                    .args(["rotate", name])
                    .env("ROTD_LOG", "trace");
            }
            c.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut reported: Vec<(String, String)> = Vec::new();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        env.record(&o);
        assert_eq!(
            o.status.code(),
            Some(0),
            "#{i}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        let text = stdout(&o);
        let rotation = text
            .split("(rotation ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap_or_else(|| panic!("#{i}: {text}"));
        reported.push((names[i % names.len()].clone(), rotation.to_owned()));
    }
    eprintln!("50 rotations done in {:?}", t0.elapsed());
    // Let the daemon finish what it has in flight, and stop.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(d.child.wait().unwrap().code(), Some(0));
    eprintln!("daemon stopped at {:?}", t0.elapsed());

    let mut history = env.history_json(None);
    history.reverse(); // oldest first
    let mut scheduled = 0;
    for n in &names {
        let mut open: Option<String> = None;
        let mut succeeded = Vec::new();
        for e in history.iter().filter(|e| e["secret"] == n.as_str()) {
            let r = e["rotation"].as_str().unwrap_or_default().to_owned();
            match e["step"].as_str().unwrap() {
                "pending" => {
                    if let Some(o) = &open {
                        // A re-commit of the same pending (a target-made id) is fine.
                        assert_eq!(o, &r, "{n}: rotation {r} started inside {o}");
                    }
                    open = Some(r);
                }
                "succeeded" | "rolled-back" | "failed" | "aborted" => {
                    assert_eq!(open.as_deref(), Some(r.as_str()), "{n}: {e}");
                    if e["step"] == "succeeded" {
                        succeeded.push(r.clone());
                        if e["trigger"] == "schedule" {
                            scheduled += 1;
                        }
                    }
                    open = None;
                }
                _ => {}
            }
        }
        assert!(open.is_none(), "{n}: a rotation was left open");
        for (secret, r) in reported.iter().filter(|(s, _)| s == n) {
            assert!(
                succeeded.contains(r),
                "{secret}: reported rotation {r} is not in git"
            );
        }
        let consumer = std::fs::read_to_string(env.path(&format!("consumer/{n}.token"))).unwrap();
        assert_eq!(
            consumer,
            env.show(n),
            "{n}: consumer holds the current secret"
        );
    }
    let in_process: std::collections::BTreeSet<_> =
        reported.iter().skip(1).step_by(2).map(|(_, r)| r).collect();
    assert_eq!(
        in_process.len(),
        25,
        "every in-process run is its own rotation"
    );
    let distinct: std::collections::BTreeSet<_> = reported.iter().map(|(_, r)| r).collect();
    let local = stdout(&git(&env.store, &["rev-parse", "HEAD"]));
    let remote = stdout(&git(&env.remote, &["rev-parse", "main"]));
    assert_eq!(
        local,
        remote,
        "every commit reached the remote: {}\n{}",
        stdout(&git(
            &env.store,
            &[
                "log",
                "--format=%s %(trailers:key=Rotd-Trigger,valueonly,separator=)",
                &format!("{}..HEAD", remote.trim())
            ]
        )),
        std::fs::read_to_string(env.path("daemon.log"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("push") && !l.contains("TRACE") && !l.contains("DEBUG"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "50 concurrent rotate requests: {} distinct rotations reported (socket requests for a secret already rotating join it), {scheduled} scheduled by the daemon meanwhile; {} commits",
        distinct.len(),
        history.len()
    );
}
