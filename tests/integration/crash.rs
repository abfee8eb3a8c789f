//! Crash recovery: rotd is SIGKILLed right after each step of a rotation
//! (`ROTD_FAULT_KILL_AFTER`), then run again. At every instant, every credential the
//! receiver accepts must decrypt from the store, and recovery must finish or roll
//! back with the agent never refused.
//!
//! The crash matrix, per target kind (each case prints a line; run with
//! `--nocapture` to see them):
//! - `prometheus-remote-write` (here, with a live agent): 5 steps;
//! - `files` (here): 5 steps;
//! - `elasticsearch-api-key` (tests/integration/elasticsearch.rs): 6 steps, `created`
//!   being the instant between the cluster making the key and the commit of its id;
//! - `elasticsearch-user-password` (tests/integration/elasticsearch_user.rs): 5 steps.
//!
//! 21 cases in all.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use crate::util::*;

/// The writer users in the web config and their hashes.
fn writer_hashes(setup: &PromSetup) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(&setup.web_config).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    doc["basic_auth_users"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(u, h)| {
            (
                u.as_str().unwrap().to_owned(),
                h.as_str().unwrap().to_owned(),
            )
        })
        .filter(|(u, _)| u.starts_with("writer-"))
        .collect()
}

/// Every writer credential the receiver accepts is recorded, encrypted, in git.
fn assert_live_credentials_recorded(env: &TestEnv, setup: &PromSetup, when: &str) {
    let recorded = env.recorded_secrets("prom-remote-write");
    for (user, hash) in writer_hashes(setup) {
        assert!(
            recorded
                .iter()
                .any(|pw| bcrypt::verify(pw, &hash).unwrap_or(false)),
            "{when}: the receiver accepts a password for {user} that the store does not hold"
        );
    }
}

#[test]
fn sigkill_after_every_step_recovers_and_keeps_every_live_credential_recorded() {
    let steps = ["pending", "apply", "deliver", "probe", "commit"];
    for step in steps {
        let env = TestEnv::new();
        // Grace 0 s: "after recovery + grace" is right after recovery.
        let setup = PromSetup::start(&env, "0s", true);
        let agent = setup.agent.as_ref().unwrap();
        let o = env.run(
            env.cmd(&["rotate", "prom-remote-write"])
                .env("ROTD_FAULT_KILL_AFTER", step),
        );
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{step}: rotd was not killed: {}",
            stderr(&o)
        );
        assert_live_credentials_recorded(&env, &setup, &format!("after a kill at {step}"));
        let pending_left = env.head_files().iter().any(|f| f.ends_with(".pending.age"));
        assert_eq!(
            pending_left,
            step != "commit",
            "{step}: pending file at HEAD"
        );

        // Recovery runs at the start of any command that takes the lock.
        let o = env.rotd(&["retire"]);
        assert!(o.status.success(), "{step}: recovery: {}", stderr(&o));
        assert!(
            !env.head_files().iter().any(|f| f.ends_with(".pending.age")),
            "{step}: pending left after recovery"
        );
        assert_live_credentials_recorded(&env, &setup, &format!("after recovery from {step}"));
        let h = env.history_json(Some("prom-remote-write"));
        let current = env.show("prom-remote-write");
        // After recovery and the grace, one rotd-made writer credential is left.
        assert_eq!(
            writer_hashes(&setup).len(),
            1,
            "{step}: one writer user left"
        );
        if step == "commit" {
            // The rotation stands; the grace is over, so `retire` removed the old user.
            assert_eq!(h[0]["step"], "retired", "{step}: {:?}", h[0]);
            assert_eq!(h[1]["step"], "succeeded", "{step}: {:?}", h[1]);
            assert_ne!(current, INITIAL_PW);
            assert_eq!(setup.write_status("writer-a", INITIAL_PW), 401, "{step}");
        } else {
            assert_eq!(h[0]["step"], "rolled-back", "{step}: {:?}", h[0]);
            assert_eq!(h[0]["trigger"], "recovery");
            assert_eq!(current, INITIAL_PW);
            assert!(std::fs::read_to_string(&setup.agent_config)
                .unwrap()
                .contains("username: writer-a"));
            assert!(
                !setup.agent_dir.join("writer-b.password").exists(),
                "{step}"
            );
        }
        // The live credential works and the agent was never refused.
        let user = if step == "commit" {
            "writer-b"
        } else {
            "writer-a"
        };
        assert_eq!(setup.write_status(user, &current), 200, "{step}");
        let before = agent.own_metric("prometheus_remote_storage_samples_total");
        wait_until(
            "agent sending after recovery",
            Duration::from_secs(15),
            || agent.own_metric("prometheus_remote_storage_samples_total") > before,
        );
        assert_eq!(
            agent.own_metric("prometheus_remote_storage_samples_failed_total"),
            0.0,
            "{step}"
        );
        assert_eq!(
            agent.refusals_logged(),
            0,
            "{step}: refused writes in the agent's log"
        );
        // And a rotation after recovery succeeds.
        let o = env.rotd(&["rotate", "prom-remote-write"]);
        assert!(
            o.status.success(),
            "{step}: rotate after recovery: {}",
            stderr(&o)
        );
        eprintln!("crash matrix: kill after {step}: ok");
    }
    eprintln!(
        "crash matrix: {} steps x prometheus-remote-write",
        steps.len()
    );
}

/// The `files` target has no state of its own: the invariant is that the consumer file
/// holds a secret recorded in git at every kill point, and recovery leaves it holding
/// the current record's secret (the old one, unless the kill came after the commit).
#[test]
fn files_target_sigkill_after_every_step_leaves_consumers_on_a_recorded_secret() {
    let steps = ["pending", "apply", "deliver", "probe", "commit"];
    for step in steps {
        let env = TestEnv::new();
        let consumer = env.path("apm/token");
        env.write_schedule(
            "apm-token",
            &format!(
                "name = \"apm-token\"\ngrace = \"0s\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}\"\ncontent = \"{{{{secret}}}}\"\nmode = \"0600\"\n",
                consumer.display()
            ),
        );
        let o = env.rotd(&["rotate", "apm-token"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let old = env.show("apm-token");
        let o = env.run(
            env.cmd(&["rotate", "apm-token"])
                .env("ROTD_FAULT_KILL_AFTER", step),
        );
        assert_eq!(o.status.signal(), Some(9), "{step}: {}", stderr(&o));
        let held = std::fs::read_to_string(&consumer).unwrap();
        assert!(
            env.recorded_secrets("apm-token").contains(&held),
            "{step}: the consumer holds a secret git does not"
        );
        assert_eq!(held == old, step == "pending" || step == "apply", "{step}");
        let o = env.rotd(&["retire"]);
        assert!(o.status.success(), "{step}: recovery: {}", stderr(&o));
        let current = env.show("apm-token");
        assert_eq!(current == old, step != "commit", "{step}");
        assert_eq!(
            std::fs::read_to_string(&consumer).unwrap(),
            current,
            "{step}"
        );
        assert!(
            !env.head_files().iter().any(|f| f.ends_with(".pending.age")),
            "{step}: pending left after recovery"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&consumer).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{step}: consumer mode after recovery");
        let o = env.rotd(&["rotate", "apm-token"]);
        assert!(
            o.status.success(),
            "{step}: rotate after recovery: {}",
            stderr(&o)
        );
        eprintln!("crash matrix: files: kill after {step}: ok");
    }
    eprintln!("crash matrix: {} steps x files", steps.len());
}
