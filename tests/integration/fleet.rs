//! The fleet end to end (DESIGN §7), with real processes only: a REAL Prometheus
//! remote-write receiver, three REAL agent-mode senders, each fed by its own
//! `rotd agent` running in its loop mode (own age identity, own SSH signing key, own
//! clone, own config), and the real rotd binary as the rotator, all over a real bare
//! git remote. The rotator's old writer credential must die only once every consumer
//! host has switched and acknowledged, and no sender may lose a sample on the way.

use std::path::PathBuf;
use std::time::Duration;

use crate::util::*;

const NAME: &str = "prom-remote-write";
const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
/// Every wait on the fleet is bounded by this (a pass is 1 s apart, a reload ≤ 10 s).
const FLEET_WAIT: Duration = Duration::from_secs(60);

/// One consumer host: its sender, its agent config, its agent process.
struct Host {
    name: &'static str,
    /// The sender's own directory: `{{username}}.password` files and `prometheus.yml`.
    prom_dir: PathBuf,
    agent_config: PathBuf,
    agent_log: PathBuf,
    sender: Prom,
    agent: Option<RotdAgent>,
}

impl Host {
    fn start_agent(&mut self) {
        self.agent = Some(RotdAgent::start(&self.agent_config, &self.agent_log));
    }

    fn stop_agent(&mut self, env: &TestEnv) {
        if let Some(a) = self.agent.take() {
            a.stop(env);
        }
    }

    fn password(&self, user: &str) -> String {
        std::fs::read_to_string(self.prom_dir.join(format!("{user}.password"))).unwrap()
    }
}

struct Fleet {
    env: TestEnv,
    receiver: Prom,
    hosts: Vec<Host>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Whatever the agents logged is searched for secrets too.
        for h in &mut self.hosts {
            if let Some(a) = h.agent.take() {
                a.stop(&self.env);
            }
        }
    }
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

/// A signing rotator holding `prom-remote-write` (writer-a, imported) consumed by
/// h1, h2, h3 (grace 0s), a receiver, and per host a running sender writing with
/// writer-a's password file from its own directory and a running `rotd agent`.
fn fleet() -> Fleet {
    let env = TestEnv::uninitialised();
    let root = env.dir.path().to_owned();
    let rotator = ssh_keygen(&env.path("keys/signing"), "rotd@localhost");
    let allowed_signers = env.path("keys/allowed_signers");
    std::fs::write(&allowed_signers, format!("rotd@localhost {rotator}\n")).unwrap();
    let mut cfg = std::fs::read_to_string(&env.config).unwrap().replacen(
        "\n\n[daemon]",
        "\nsigning_key = \"keys/signing\"\nallowed_signers = \"keys/allowed_signers\"\n\n[daemon]",
        1,
    );
    for h in HOSTS {
        std::fs::create_dir_all(root.join(h).join("keys")).unwrap();
        let recipient = age_keygen(&root.join(format!("{h}/keys/{h}.agekey")));
        let signer = ssh_keygen(
            &root.join(format!("{h}/keys/{h}.sign")),
            &format!("rotd-agent@{h}"),
        );
        cfg.push_str(&format!(
            "\n[hosts.{h}]\nrecipient = \"{recipient}\"\nsigner = \"{signer}\"\n"
        ));
    }
    std::fs::write(&env.config, cfg).unwrap();
    rotd_ok(&env, &["init"]);

    let web_config = root.join("receiver-web.yml");
    std::fs::write(
        &web_config,
        format!(
            "basic_auth_users:\n  prom-reader: {}\n  writer-a: {}\n",
            bcrypt_hash(READER_PW),
            bcrypt_hash(INITIAL_PW)
        ),
    )
    .unwrap();
    let receiver = Prom::receiver(&root.join("receiver"), &web_config);
    receiver.wait_ready(Some(("prom-reader", READER_PW)));
    let o = env.rotd_stdin(
        &["import", "prom-reader", "--username", "prom-reader"],
        &format!("{READER_PW}\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.rotd_stdin(
        &["import", NAME, "--username", "writer-a"],
        &format!("{INITIAL_PW}\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // The rotator writes no consumer file itself: the agents deliver.
    env.write_schedule(
        NAME,
        &format!(
            r#"name = "{NAME}"
schedule = "0 0 3 * * Sun"
grace = "0s"
consumers = ["h1", "h2", "h3"]
ack_timeout = "1h"

[target]
kind = "prometheus-remote-write"
url = "{url}"
web_config = "{web}"
usernames = ["writer-a", "writer-b"]
query_credential = "prom-reader"
bcrypt_cost = 4

[probe]
timeout = "5s"
attempts = 20
interval = "250ms"
"#,
            url = receiver.url(),
            web = web_config.display(),
        ),
    );
    rotd_ok(&env, &["check"]);

    let mut hosts = Vec::new();
    for h in HOSTS {
        let dir = root.join(h);
        let prom_dir = dir.join("prom");
        std::fs::create_dir_all(&prom_dir).unwrap();
        for user in ["writer-a", "writer-b"] {
            env.allow_holder(&prom_dir.join(format!("{user}.password")));
        }
        std::fs::write(prom_dir.join("writer-a.password"), INITIAL_PW).unwrap();
        let port = free_port();
        let template = dir.join("sender.yml.tmpl");
        std::fs::write(
            &template,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: {h}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\nremote_write:\n  - url: {}/api/v1/write\n    basic_auth:\n      username: {{{{username}}}}\n      password_file: {}/{{{{username}}}}.password\n    queue_config:\n      batch_send_deadline: 1s\n",
                receiver.url(),
                prom_dir.display()
            ),
        )
        .unwrap();
        let sender_config = prom_dir.join("prometheus.yml");
        std::fs::write(
            &sender_config,
            std::fs::read_to_string(&template)
                .unwrap()
                .replace("{{username}}", "writer-a"),
        )
        .unwrap();
        let sender = Prom::agent(&dir.join("prom-data"), &sender_config, port);
        let agent_config = dir.join("agent.toml");
        std::fs::write(
            &agent_config,
            format!(
                r#"host = "{h}"
[store]
remote = "{remote}"
path = "store"
identity = "keys/{h}.agekey"
signing_key = "keys/{h}.sign"
allowed_signers = "{signers}"
poll = "1s"

[[secret]]
name = "{NAME}"
[[secret.deliver]]
path = "{prom}/{{{{username}}}}.password"
content = "{{{{secret}}}}"
mode = "0640"
[[secret.deliver]]
template = "{template}"
path = "{prom}/prometheus.yml"
mode = "0640"
reload = {{ http_post = "http://127.0.0.1:{port}/-/reload" }}
"#,
                remote = env.remote.display(),
                signers = allowed_signers.display(),
                prom = prom_dir.display(),
                template = template.display(),
            ),
        )
        .unwrap();
        hosts.push(Host {
            name: h,
            prom_dir,
            agent_config,
            agent_log: dir.join("agent.log"),
            sender,
            agent: None,
        });
    }
    for h in &mut hosts {
        h.sender.wait_ready(None);
        h.start_agent();
    }
    let f = Fleet {
        env,
        receiver,
        hosts,
    };
    for h in &f.hosts {
        wait_until(
            &format!("{}'s first samples on the receiver", h.name),
            FLEET_WAIT,
            || {
                !query(
                    &f.receiver.url(),
                    "prom-reader",
                    READER_PW,
                    &format!("up{{job=\"{}\"}}", h.name),
                )
                .is_empty()
            },
        );
    }
    f
}

impl Fleet {
    /// Status of an authenticated request to the receiver with this credential.
    fn auth(&self, user: &str, pw: &str) -> u16 {
        get_status(
            &format!("{}/api/v1/status/buildinfo", self.receiver.url()),
            user,
            pw,
        )
    }

    /// The secret's entry in `rotd status --json`.
    fn state(&self) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&rotd_ok(&self.env, &["status", "--json"])).unwrap();
        v["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == NAME)
            .unwrap()
            .clone()
    }

    fn wait_all_acked(&self) {
        self.wait("every consumer host's ack", || {
            self.state()["state"] != "waiting-acks"
        });
    }

    /// Polls `f` until true (bounded by [`FLEET_WAIT`]); on a timeout, fails with the
    /// secret's status and the end of every agent's log.
    fn wait(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + FLEET_WAIT;
        while !f() {
            if std::time::Instant::now() > deadline {
                let mut logs = String::new();
                for h in &self.hosts {
                    let log = std::fs::read_to_string(&h.agent_log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    logs.push_str(&format!("--- {} agent:\n", h.name));
                    for l in tail.iter().rev() {
                        logs.push_str(l);
                        logs.push('\n');
                    }
                }
                panic!("timed out waiting for {what}: {}\n{logs}", self.state());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn retired(&self) -> usize {
        self.env
            .history_json(Some(NAME))
            .iter()
            .filter(|e| e["step"] == "retired")
            .count()
    }
}

fn other(user: &str) -> &'static str {
    if user == "writer-a" {
        "writer-b"
    } else {
        "writer-a"
    }
}

#[test]
fn three_agents_switch_with_no_sample_lost_and_the_old_password_dies_only_after_all_acked() {
    let f = fleet();
    let mut old = ("writer-a".to_owned(), INITIAL_PW.to_owned());
    for i in 0..3 {
        rotd_ok(&f.env, &["rotate", NAME]);
        let new_user = other(&old.0);
        let new_pw = f.env.show(NAME);
        assert!(new_pw != old.1, "rotation {i}: the password did not change");
        // Right after the rotation, before the acks are in: both credentials work.
        assert_eq!(f.auth(&old.0, &old.1), 200, "rotation {i}: old cut early");
        assert_eq!(f.auth(new_user, &new_pw), 200, "rotation {i}: new refused");
        f.wait_all_acked();
        let s = f.state();
        assert_eq!(s["lagging"], serde_json::json!([]), "rotation {i}: {s}");
        // Every sender switched before its host acknowledged.
        for h in &f.hosts {
            assert!(
                h.password(new_user) == new_pw,
                "rotation {i}: {} holds another password (values not printed)",
                h.name
            );
            let cfg = std::fs::read_to_string(h.prom_dir.join("prometheus.yml")).unwrap();
            assert!(cfg.contains(&format!("username: {new_user}")), "{cfg}");
        }
        assert_eq!(f.auth(&old.0, &old.1), 200, "acked but not retired yet");
        rotd_ok(&f.env, &["retire"]);
        assert_eq!(f.retired(), i + 1, "rotation {i}: the old one is retired");
        assert_eq!(f.auth(&old.0, &old.1), 401, "rotation {i}: old still valid");
        assert_eq!(f.auth(new_user, &new_pw), 200);
        old = (new_user.to_owned(), new_pw);
    }
    // Every sender keeps sending with the newest credential, and never had a sample
    // refused or dropped.
    for h in &f.hosts {
        let before = h
            .sender
            .own_metric("prometheus_remote_storage_samples_total");
        wait_until(
            &format!("{} sending after the last retirement", h.name),
            FLEET_WAIT,
            || {
                h.sender
                    .own_metric("prometheus_remote_storage_samples_total")
                    > before
            },
        );
    }
    for h in &f.hosts {
        assert_eq!(
            h.sender
                .own_metric("prometheus_remote_storage_samples_failed_total"),
            0.0,
            "{} had samples refused",
            h.name
        );
        assert_eq!(
            h.sender
                .own_metric("prometheus_remote_storage_samples_dropped_total"),
            0.0,
            "{} dropped samples",
            h.name
        );
        assert_eq!(
            h.sender.refusals_logged(),
            0,
            "{} logged refused writes (before a reload reset its counter)",
            h.name
        );
        assert!(
            h.password(&old.0) == f.env.show(NAME),
            "{} does not hold the newest credential (values not printed)",
            h.name
        );
    }
}

#[test]
fn a_lagging_host_holds_the_old_credential_until_it_catches_up() {
    let mut f = fleet();
    // Every host has delivered the imported credential (no rotation to ack yet): stop h2.
    f.hosts[1].stop_agent(&f.env);
    let old = ("writer-a".to_owned(), INITIAL_PW.to_owned());
    rotd_ok(&f.env, &["rotate", NAME]);
    let new_pw = f.env.show(NAME);
    // h1 and h3 switch and acknowledge; h2 does not.
    f.wait("h1 and h3 acked", || {
        f.state()["lagging"] == serde_json::json!(["h2"])
    });
    let out = rotd_ok(&f.env, &["retire"]);
    assert_eq!(f.retired(), 0, "retired behind h2's back: {out}");
    let s = f.state();
    assert_eq!(s["state"], "waiting-acks", "{s}");
    assert_eq!(s["lagging"], serde_json::json!(["h2"]), "{s}");
    assert!(
        rotd_ok(&f.env, &["status"]).contains("waiting-acks: host(s) h2"),
        "status names the lagging host"
    );
    assert_eq!(f.auth(&old.0, &old.1), 200, "h2's credential still works");
    assert!(
        f.hosts[1].password("writer-a") == INITIAL_PW,
        "the stopped host's file changed"
    );

    // h2 comes back: it delivers, acknowledges, and the old credential can go.
    f.hosts[1].start_agent();
    f.wait_all_acked();
    assert!(
        f.hosts[1].password("writer-b") == new_pw,
        "h2 did not deliver the new credential"
    );
    rotd_ok(&f.env, &["retire"]);
    assert_eq!(f.retired(), 1);
    assert_eq!(f.auth(&old.0, &old.1), 401, "the old credential is refused");
    assert_eq!(f.auth("writer-b", &new_pw), 200);

    // A leak with h3 down: the emergency rotation cuts the leaked credential at once.
    f.hosts[2].stop_agent(&f.env);
    let o = f.env.rotd(&["rotate", "--emergency", NAME]);
    assert!(
        o.status.success(),
        "rotate --emergency ({:?}):\n{}\n{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(
        f.auth("writer-b", &new_pw),
        401,
        "the leaked one is refused"
    );
    let newest = f.env.show(NAME);
    assert_eq!(f.auth("writer-a", &newest), 200);
    let log = stdout(&git(&f.env.store, &["log", "--format=%B", "-n", "5"]));
    assert!(log.contains("Rotd-Emergency: yes"), "{log}");
    assert!(
        // Cut at once, before any host could acknowledge the new rotation: every
        // consumer is named, h3 (down) among them.
        log.lines()
            .any(|l| l.starts_with("Rotd-Lagging:") && l.contains("h3")),
        "the cut-off hosts are named: {log}"
    );
    assert_eq!(f.retired(), 2);
}

/// A host killed anywhere in a pass, again and again (a crash, a reboot), acknowledges
/// once its agent runs again: a lock file left on the clone's ack ref by a killed
/// fetch used to fail every later pass.
#[test]
fn an_agent_killed_mid_pass_again_and_again_acknowledges_once_it_runs_again() {
    let mut f = fleet();
    f.hosts[1].stop_agent(&f.env);
    for round in 0..2 {
        rotd_ok(&f.env, &["rotate", NAME]);
        for i in 0..15u64 {
            f.hosts[1].start_agent();
            std::thread::sleep(Duration::from_millis(50 + (i * 137 + round * 71) % 1200));
            f.hosts[1].stop_agent(&f.env);
        }
        f.hosts[1].start_agent();
        f.wait_all_acked();
        rotd_ok(&f.env, &["retire"]);
        f.hosts[1].stop_agent(&f.env);
    }
}
