//! The example schedules in `schedules/`, `keys/recipients.example` and the agent's
//! `packaging/agent.toml.example` stay valid:
//! they are checked by `rotd check` with their `/etc` paths moved into a temp root.

use crate::util::*;

#[test]
fn example_schedules_pass_rotd_check() {
    let env = TestEnv::uninitialised();
    let root = env.dir.path().join("root");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // The files the examples point to.
    std::fs::create_dir_all(root.join("etc/prometheus")).unwrap();
    std::fs::write(
        root.join("etc/prometheus/web.yml"),
        format!("basic_auth_users:\n  prom-reader: {}\n", bcrypt_hash("x")),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("etc/rotd/templates")).unwrap();
    for t in ["agent.yml", "apm-server.yml"] {
        std::fs::copy(
            repo.join("templates").join(t),
            root.join("etc/rotd/templates").join(t),
        )
        .unwrap();
    }
    let mut count = 0;
    for e in std::fs::read_dir(repo.join("schedules")).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path())
            .unwrap()
            .replace("\"/etc/", &format!("\"{}/etc/", root.display()));
        std::fs::write(env.schedules.join(e.file_name()), text).unwrap();
        count += 1;
    }
    assert!(count >= 2);
    // The example recipients (public keys only) are usable.
    std::fs::copy(
        repo.join("keys/recipients.example"),
        env.path("keys/recipients"),
    )
    .unwrap();
    let o = env.rotd(&["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.rotd_stdin(
        &["import", "prom-reader", "--username", "prom-reader"],
        "x\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.rotd_stdin(
        &["import", "es-rotd-admin", "--username", "rotd-admin"],
        "x-admin-password\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.rotd(&["check"]);
    assert!(o.status.success(), "examples invalid:\n{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("{count} schedule(s)")));
    // No private key in the repository.
    for e in std::fs::read_dir(repo.join("keys")).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(
            !text.contains("AGE-SECRET-KEY") && !text.contains("PRIVATE KEY"),
            "{}",
            e.path().display()
        );
    }
}

#[test]
fn the_example_agent_config_is_valid() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // The template the example names is the package's copy of templates/agent.yml.
    let env = TestEnv::uninitialised();
    let example = env.path("agent.toml");
    let text = std::fs::read_to_string(repo.join("packaging/agent.toml.example"))
        .unwrap()
        .replace(
            "\"/usr/share/doc/rotd/templates/",
            &format!("\"{}/templates/", repo.display()),
        );
    std::fs::write(&example, text).unwrap();
    // `rotd agent status` loads and checks the configuration, and reads only the
    // clone's state (none here): it fetches nothing.
    let o = std::process::Command::new(rotd_bin())
        .arg("--config")
        .arg(&example)
        .args(["agent", "status", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let st: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(st["host"], "web-1");
    assert_eq!(st["secrets"][0]["name"], "prom-remote-write");
    assert_eq!(st["secrets"][0]["state"], "not-in-store");
    assert!(st["last_pass"].is_null());
}
