//! Against a REAL Prometheus remote-write receiver and a REAL agent-mode sender.

use std::time::{Duration, Instant};

use crate::util::*;

/// Raw sample timestamps (seconds) of the agent's `up` series on the receiver.
fn up_timestamps(setup: &PromSetup, range: &str) -> Vec<f64> {
    let r = query(
        &setup.receiver.url(),
        "prom-reader",
        READER_PW,
        &format!("up{{job=\"agent\"}}[{range}]"),
    );
    assert_eq!(r.len(), 1, "{r:?}");
    r[0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[0].as_f64().unwrap())
        .collect()
}

#[test]
fn three_rotations_while_the_agent_writes_lose_no_sample() {
    let env = TestEnv::new();
    let setup = PromSetup::start(&env, "2s", true);
    let agent = setup.agent.as_ref().unwrap();
    wait_until(
        "first samples on the receiver",
        Duration::from_secs(30),
        || {
            !query(
                &setup.receiver.url(),
                "prom-reader",
                READER_PW,
                "up{job=\"agent\"}",
            )
            .is_empty()
        },
    );
    let started = Instant::now();
    let mut passwords = vec![INITIAL_PW.to_owned()];
    let mut users = vec!["writer-a".to_owned()];
    for i in 0..3 {
        let o = env.rotd(&["rotate", "prom-remote-write"]);
        assert!(
            o.status.success(),
            "rotation {i}: {}\n{}",
            stdout(&o),
            stderr(&o)
        );
        passwords.push(env.show("prom-remote-write"));
        let user = if users.last().unwrap() == "writer-a" {
            "writer-b"
        } else {
            "writer-a"
        };
        users.push(user.to_owned());
        // The new credential works on the receiver.
        assert_eq!(setup.write_status(user, passwords.last().unwrap()), 200);
        // Let the agent send with the new user for a few intervals, then retire.
        std::thread::sleep(Duration::from_secs(3));
        let o = env.rotd(&["retire"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // The previous credential was retired after grace; the live one works.
    let n = passwords.len();
    assert_eq!(setup.write_status(&users[n - 1], &passwords[n - 1]), 200);
    assert_eq!(
        setup.write_status(&users[n - 2], &passwords[n - 2]),
        401,
        "previous credential retired"
    );
    assert_eq!(
        setup.write_status(&users[n - 3], &passwords[n - 3]),
        401,
        "previous-previous credential rejected"
    );
    // The agent never had a sample refused.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent.own_metric("prometheus_remote_storage_samples_failed_total"),
        0.0
    );
    assert_eq!(
        agent.own_metric("prometheus_remote_storage_samples_dropped_total"),
        0.0
    );
    assert_eq!(
        agent.refusals_logged(),
        0,
        "refused writes in the agent's log"
    );
    assert!(agent.own_metric("prometheus_remote_storage_samples_total") > 0.0);
    // The receiver holds a sample from every scrape interval of the test.
    let secs = started.elapsed().as_secs() + 2;
    let ts = up_timestamps(&setup, &format!("{secs}s"));
    assert!(
        ts.len() as u64 >= secs - 4,
        "{} samples over {secs}s",
        ts.len()
    );
    // A 401 drops a whole batch; `samples_failed_total` above catches that. Here: no
    // run of missing intervals. One late scrape on a loaded machine (a 2 s gap) is
    // tolerated; two missing intervals in a row are not.
    let max_gap = ts.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    let late = ts.windows(2).filter(|w| w[1] - w[0] > 1.5).count();
    eprintln!(
        "{} samples, max gap {max_gap}s, {late} late interval(s)",
        ts.len()
    );
    assert!(
        max_gap < 2.5,
        "scrape intervals are missing on the receiver: max gap {max_gap}s"
    );
    // The agent's config names the live user, and its password file holds the live secret.
    let cfg = std::fs::read_to_string(&setup.agent_config).unwrap();
    assert!(cfg.contains(&format!("username: {}", users[n - 1])));
    let pw = std::fs::read_to_string(setup.agent_dir.join(format!("{}.password", users[n - 1])))
        .unwrap();
    assert_eq!(pw, passwords[n - 1]);
    // Every rotation is in the history: pending, succeeded, retired.
    let h = env.history_json(Some("prom-remote-write"));
    let steps: Vec<&str> = h.iter().map(|e| e["step"].as_str().unwrap()).collect();
    assert_eq!(
        steps.iter().filter(|s| **s == "succeeded").count(),
        3,
        "{steps:?}"
    );
    assert_eq!(
        steps.iter().filter(|s| **s == "retired").count(),
        3,
        "{steps:?}"
    );
}

#[test]
fn probe_failure_rolls_back_web_config_and_consumers_byte_for_byte() {
    let env = TestEnv::new();
    let setup = PromSetup::start(&env, "15m", true);
    let agent = setup.agent.as_ref().unwrap();
    // Break the query credential in the store: the probe's query is refused.
    let o = env.rotd_stdin(
        &["import", "prom-reader", "--username", "prom-reader"],
        "wrong-reader-password\n",
    );
    assert!(o.status.success());
    let web_before = std::fs::read(&setup.web_config).unwrap();
    let agent_before = std::fs::read(&setup.agent_config).unwrap();
    let pw_before = std::fs::read(setup.agent_dir.join("writer-a.password")).unwrap();
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    assert_eq!(
        std::fs::read(&setup.web_config).unwrap(),
        web_before,
        "web config restored exactly"
    );
    assert_eq!(
        std::fs::read(&setup.agent_config).unwrap(),
        agent_before,
        "agent config restored exactly"
    );
    assert_eq!(
        std::fs::read(setup.agent_dir.join("writer-a.password")).unwrap(),
        pw_before
    );
    assert!(
        !setup.agent_dir.join("writer-b.password").exists(),
        "the new user's password file is removed"
    );
    assert_eq!(
        setup.write_status("writer-a", INITIAL_PW),
        200,
        "old credential still valid"
    );
    let h = env.history_json(Some("prom-remote-write"));
    assert_eq!(h[0]["step"], "rolled-back");
    assert!(
        !env.head_files().iter().any(|f| f.contains("pending")),
        "{:?}",
        env.head_files()
    );
    // The agent goes on sending with the old credential.
    let before = agent.own_metric("prometheus_remote_storage_samples_total");
    wait_until("agent still sending", Duration::from_secs(15), || {
        agent.own_metric("prometheus_remote_storage_samples_total") > before
    });
    assert_eq!(
        agent.own_metric("prometheus_remote_storage_samples_failed_total"),
        0.0
    );
}

#[test]
fn receiver_down_rolls_back_with_exit_1() {
    let env = TestEnv::new();
    let mut setup = PromSetup::start(&env, "15m", false);
    let web_before = std::fs::read(&setup.web_config).unwrap();
    let agent_before = std::fs::read(&setup.agent_config).unwrap();
    setup.receiver.child.kill().unwrap();
    setup.receiver.child.wait().unwrap();
    // Shorten the probe so the test is quick.
    let sched = env.schedules.join("prom-remote-write.toml");
    let text = std::fs::read_to_string(&sched)
        .unwrap()
        .replace("attempts = 20", "attempts = 2");
    // The agent is not running: deliver without the reload.
    let text = text.replace(
        &format!(
            "reload = {{ http_post = \"http://127.0.0.1:{}/-/reload\" }}\n",
            setup.agent_port
        ),
        "",
    );
    std::fs::write(&sched, text).unwrap();
    let o = env.rotd(&["rotate", "prom-remote-write"]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("remote write"), "{}", stdout(&o));
    assert_eq!(std::fs::read(&setup.web_config).unwrap(), web_before);
    assert_eq!(std::fs::read(&setup.agent_config).unwrap(), agent_before);
    assert_eq!(
        env.history_json(Some("prom-remote-write"))[0]["step"],
        "rolled-back"
    );
}
