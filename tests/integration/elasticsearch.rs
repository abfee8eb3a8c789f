//! The `elasticsearch-api-key` target against the in-process Elasticsearch emulator
//! (crates/es-emulator), with rotd run as a child process; and, when
//! ROTD_TEST_ES_URL/USER/PASSWORD are set, the same acceptance flow against a real
//! cluster.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use crate::util::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use es_emulator::{EsEmulator, InvalidateFault};
use serde_json::{json, Value};

const DS: &str = "logs-nginx.access-default";
const NAME: &str = "filebeat-output";
const ADMIN: &str = "es-admin";
const ADMIN_USER: &str = "rotd-admin";
const ADMIN_PW: &str = "admin-password-0123456789";

/// A key as the tests see it, from the emulator or a real cluster.
#[derive(Debug, Clone)]
struct KeyView {
    id: String,
    name: String,
    invalidated: bool,
    role_descriptors: Value,
    metadata: Value,
}

/// A cluster for the acceptance flow.
struct Cluster {
    url: String,
    ca: Option<PathBuf>,
    user: String,
    password: String,
    /// The emulator, when the cluster is one.
    emu: Option<EsEmulator>,
}

impl Cluster {
    fn emulated() -> Cluster {
        let emu = EsEmulator::start();
        emu.add_user(ADMIN_USER, ADMIN_PW, true);
        Cluster {
            url: emu.url(),
            ca: None,
            user: ADMIN_USER.into(),
            password: ADMIN_PW.into(),
            emu: Some(emu),
        }
    }

    fn emu(&self) -> &EsEmulator {
        self.emu.as_ref().unwrap()
    }

    fn client(&self) -> reqwest::blocking::Client {
        let mut b = reqwest::blocking::Client::builder();
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).unwrap();
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    }

    fn admin_call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .client()
            .request(method, format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.password));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().unwrap();
        let status = r.status();
        let v: Value = r.json().unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// Every key made for NAME (metadata.secret == NAME).
    fn keys(&self) -> Vec<KeyView> {
        match &self.emu {
            Some(emu) => emu
                .api_keys()
                .into_iter()
                .map(|k| KeyView {
                    id: k.id,
                    name: k.name,
                    invalidated: k.invalidated,
                    role_descriptors: k.role_descriptors,
                    metadata: k.metadata,
                })
                .filter(|k| k.metadata["secret"] == json!(NAME))
                .collect(),
            None => {
                let v = self.admin_call(
                    reqwest::Method::GET,
                    &format!("/_security/api_key?name=rotd-{NAME}-*"),
                    None,
                );
                v["api_keys"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| KeyView {
                        id: k["id"].as_str().unwrap().into(),
                        name: k["name"].as_str().unwrap_or("").into(),
                        invalidated: k["invalidated"] == json!(true),
                        role_descriptors: k["role_descriptors"].clone(),
                        metadata: k["metadata"].clone(),
                    })
                    .filter(|k| k.metadata["secret"] == json!(NAME))
                    .collect()
            }
        }
    }

    fn key(&self, id: &str) -> KeyView {
        self.keys().into_iter().find(|k| k.id == id).unwrap()
    }

    fn probe_docs(&self) -> Vec<Value> {
        match &self.emu {
            Some(emu) => emu.documents(DS),
            None => {
                let v = self.admin_call(
                    reqwest::Method::POST,
                    &format!("/{DS}/_search"),
                    Some(json!({"size": 1000, "query": {"match_all": {}}})),
                );
                v["hits"]["hits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h["_source"].clone())
                    .collect()
            }
        }
    }

    /// Creates the key live before rotd takes over (named as rotd names its own).
    fn create_initial_key(&self) -> (String, String) {
        let v = self.admin_call(
            reqwest::Method::POST,
            "/_security/api_key",
            Some(json!({
                "name": format!("rotd-{NAME}-initial"),
                "expiration": "1d",
                "role_descriptors": declared(),
                "metadata": {"managed_by": "rotd", "secret": NAME, "rotation": "initial"},
            })),
        );
        (
            v["id"].as_str().unwrap().into(),
            v["api_key"].as_str().unwrap().into(),
        )
    }
}

fn declared() -> Value {
    json!({format!("rotd-{NAME}"): {"cluster": [], "indices": [{"names": [DS], "privileges": ["create_doc", "auto_configure"]}]}})
}

fn encoded(id: &str, key: &str) -> String {
    STANDARD.encode(format!("{id}:{key}"))
}

struct Setup {
    env: TestEnv,
    cluster: Cluster,
    out: PathBuf,
    initial: (String, String),
}

impl Setup {
    fn new(cluster: Cluster, grace: &str) -> Setup {
        let env = TestEnv::new();
        let o = env.rotd_stdin(
            &["import", ADMIN, "--username", &cluster.user],
            &format!("{}\n", cluster.password),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let initial = cluster.create_initial_key();
        let o = env.rotd_stdin(
            // `=`: an API key id may start with '-'.
            &["import", NAME, &format!("--key-id={}", initial.0)],
            &format!("{}\n", initial.1),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let out = env.path("filebeat");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(
            out.join("filebeat.env"),
            format!("ES_API_KEY={}\n", encoded(&initial.0, &initial.1)),
        )
        .unwrap();
        std::fs::write(out.join("key_id"), &initial.0).unwrap();
        let ca = cluster
            .ca
            .as_ref()
            .map(|c| format!("ca = \"{}\"\n", c.display()))
            .unwrap_or_default();
        env.write_schedule(
            NAME,
            &format!(
                r#"name = "{NAME}"
schedule = "0 30 2 * * *"
grace = "{grace}"

[target]
kind = "elasticsearch-api-key"
url = "{url}"
{ca}admin_credential = "{ADMIN}"
expiration = "30d"
[[target.permissions]]
names = ["{DS}"]
privileges = ["create_doc", "auto_configure"]

[[deliver]]
path = "{out}/filebeat.env"
content = "ES_API_KEY={{{{encoded}}}}\n"
mode = "0600"

[[deliver]]
path = "{out}/key_id"
content = "{{{{key_id}}}}"
mode = "0600"

[probe]
index = "{DS}"
timeout = "5s"
"#,
                url = cluster.url,
                out = out.display(),
            ),
        );
        let o = env.rotd(&["check"]);
        assert!(o.status.success(), "check: {}{}", stdout(&o), stderr(&o));
        Setup {
            env,
            cluster,
            out,
            initial,
        }
    }

    /// `rotd rotate NAME` at TRACE level (every crate), so that the output checks
    /// below cover the HTTP stack's logging too.
    fn rotate(&self) -> std::process::Output {
        self.env.rotd(&["rotate", NAME])
    }

    fn consumer(&self) -> String {
        std::fs::read_to_string(self.out.join("filebeat.env")).unwrap()
    }

    fn valid_keys(&self) -> Vec<KeyView> {
        self.cluster
            .keys()
            .into_iter()
            .filter(|k| !k.invalidated)
            .collect()
    }

    /// After a failed rotation: the old key alone is valid, consumers untouched.
    fn assert_rolled_back(&self, o: &std::process::Output) {
        assert_eq!(o.status.code(), Some(1), "{}{}", stdout(o), stderr(o));
        let valid = self.valid_keys();
        assert_eq!(valid.len(), 1, "{valid:?}");
        assert_eq!(valid[0].id, self.initial.0);
        assert_eq!(
            self.consumer(),
            format!("ES_API_KEY={}\n", encoded(&self.initial.0, &self.initial.1))
        );
        let h = self.env.history_json(Some(NAME));
        assert_eq!(h[0]["step"], "rolled-back", "{:?}", h[0]);
        assert!(!self
            .env
            .head_files()
            .contains(&format!("secrets/{NAME}.pending.age")));
        assert_eq!(self.env.show(NAME), self.initial.1);
    }
}

/// Three rotations; after each, one valid key (the recorded one) with exactly the
/// declared privileges, delivered, and its probe document in the data stream.
fn acceptance(cluster: Cluster) {
    let s = Setup::new(cluster, "0s");
    let mut live_ids = vec![s.initial.0.clone()];
    for i in 0..3 {
        let o = s.rotate();
        assert!(
            o.status.success(),
            "rotation {i}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        let secret = s.env.show(NAME);
        let id = std::fs::read_to_string(s.out.join("key_id")).unwrap();
        let said = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            !said.contains(&secret) && !said.contains(&encoded(&id, &secret)),
            "rotd's trace output shows the new key"
        );
        let log = stdout(&git(&s.env.store, &["log", "--format=%B"]));
        assert!(!log.contains(&secret) && !log.contains(&encoded(&id, &secret)));
        let valid = s.valid_keys();
        assert_eq!(valid.len(), 1, "rotation {i}: {valid:?}");
        assert_eq!(valid[0].id, id);
        assert!(valid[0].name.starts_with(&format!("rotd-{NAME}-")));
        assert_eq!(
            s.consumer(),
            format!("ES_API_KEY={}\n", encoded(&id, &secret))
        );
        let h = s.env.history_json(Some(NAME));
        let succeeded = h.iter().find(|e| e["step"] == "succeeded").unwrap();
        assert!(
            succeeded["target"]
                .as_str()
                .unwrap()
                .contains(&format!("key={id}")),
            "{succeeded}"
        );
        let rotation = succeeded["rotation"].as_str().unwrap();
        assert_eq!(h[0]["step"], "retired", "grace 0s retires at once");
        assert!(h.iter().any(|e| e["rotation"] == rotation
            && e["step"] == "pending"
            && e["trailers"]["Rotd-Key-Id"] == json!(id)));
        assert!(
            s.cluster
                .probe_docs()
                .iter()
                .any(|d| d["rotd"]["rotation"] == json!(rotation)),
            "probe document of {rotation}"
        );
        live_ids.push(id);
    }
    let live = live_ids.last().unwrap();
    let keys = s.cluster.keys();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for k in &keys {
        assert!(
            &k.id == live || k.invalidated,
            "{} is neither live nor invalidated",
            k.id
        );
        assert!(live_ids.contains(&k.id), "{} was never recorded", k.id);
        assert_eq!(k.role_descriptors, declared(), "{}", k.id);
    }
    // The key rotd made works for its consumer.
    let v = s.cluster.key(live);
    assert!(!v.invalidated);
    assert_eq!(v.metadata["managed_by"], "rotd");
}

#[test]
fn acceptance_three_rotations_keep_one_live_least_privilege_key() {
    acceptance(Cluster::emulated());
}

#[test]
fn acceptance_against_a_real_cluster_when_configured() {
    let (Ok(url), Ok(user), Ok(password)) = (
        std::env::var("ROTD_TEST_ES_URL"),
        std::env::var("ROTD_TEST_ES_USER"),
        std::env::var("ROTD_TEST_ES_PASSWORD"),
    ) else {
        println!("skipped: set ROTD_TEST_ES_URL, ROTD_TEST_ES_USER, ROTD_TEST_ES_PASSWORD");
        return;
    };
    let cluster = Cluster {
        url: url.trim_end_matches('/').to_owned(),
        ca: std::env::var("ROTD_TEST_ES_CA").ok().map(PathBuf::from),
        user,
        password,
        emu: None,
    };
    // Keys of earlier runs: invalidate them so the counts below hold.
    let old: Vec<String> = cluster
        .keys()
        .into_iter()
        .filter(|k| !k.invalidated)
        .map(|k| k.id)
        .collect();
    if !old.is_empty() {
        cluster.admin_call(
            reqwest::Method::DELETE,
            "/_security/api_key",
            Some(json!({ "ids": old })),
        );
    }
    let before = cluster.keys().len();
    assert_eq!(
        before,
        cluster.keys().iter().filter(|k| k.invalidated).count()
    );
    real_acceptance(cluster, before);
}

/// The acceptance flow on a cluster that may hold invalidated keys of earlier runs.
fn real_acceptance(cluster: Cluster, _earlier: usize) {
    let s = Setup::new(cluster, "0s");
    for i in 0..3 {
        let o = s.rotate();
        assert!(
            o.status.success(),
            "rotation {i}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        let id = std::fs::read_to_string(s.out.join("key_id")).unwrap();
        let valid = s.valid_keys();
        assert_eq!(valid.len(), 1, "rotation {i}: {valid:?}");
        assert_eq!(valid[0].id, id);
        assert_eq!(
            s.consumer(),
            format!("ES_API_KEY={}\n", encoded(&id, &s.env.show(NAME)))
        );
        let rd = &valid[0].role_descriptors[format!("rotd-{NAME}")];
        assert_eq!(rd["indices"][0]["names"], json!([DS]), "{rd}");
        assert_eq!(
            rd["indices"][0]["privileges"],
            json!(["create_doc", "auto_configure"]),
            "{rd}"
        );
        let h = s.env.history_json(Some(NAME));
        let succeeded = h.iter().find(|e| e["step"] == "succeeded").unwrap();
        let rotation = succeeded["rotation"].as_str().unwrap();
        assert!(s
            .cluster
            .probe_docs()
            .iter()
            .any(|d| d["rotd"]["rotation"] == json!(rotation)));
    }
    assert!(s.cluster.key(&s.initial.0).invalidated);
}

#[test]
fn create_key_failure_rolls_back() {
    let s = Setup::new(Cluster::emulated(), "0s");
    s.cluster.emu().faults().fail_create_key_with(Some(500));
    let o = s.rotate();
    s.assert_rolled_back(&o);
    assert!(stderr(&o).contains("500") || stdout(&o).contains("500"));
    assert_eq!(s.cluster.keys().len(), 1, "no key was made");
}

#[test]
fn index_failure_invalidates_the_new_key_and_restores_consumers() {
    let s = Setup::new(Cluster::emulated(), "0s");
    s.cluster.emu().faults().fail_index_with(Some(503));
    let o = s.rotate();
    s.assert_rolled_back(&o);
    let keys = s.cluster.keys();
    assert_eq!(keys.len(), 2);
    assert!(keys[1].invalidated);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!text.contains(&s.initial.1), "no key in the output");
}

#[test]
fn excess_privileges_fail_the_probe() {
    let s = Setup::new(Cluster::emulated(), "0s");
    s.cluster.emu().faults().grant_extra_privileges(true);
    let o = s.rotate();
    s.assert_rolled_back(&o);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(text.contains("excess"), "{text}");
    let keys = s.cluster.keys();
    assert_eq!(keys.len(), 2);
    assert!(keys[1].invalidated);
}

#[test]
fn failed_retire_stays_pending_until_rotd_retire() {
    let s = Setup::new(Cluster::emulated(), "0s");
    s.cluster
        .emu()
        .faults()
        .fail_invalidate(Some(InvalidateFault::ServerError));
    let o = s.rotate();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(s.valid_keys().len(), 2, "old key still valid");
    assert!(!s.cluster.key(&s.initial.0).invalidated);
    let o = s.env.rotd(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let row = v["secrets"]
        .as_array()
        .or_else(|| v.as_array())
        .unwrap()
        .iter()
        .find(|r| r["name"] == NAME)
        .unwrap()
        .clone();
    assert_eq!(row["state"], "grace", "{row}");
    assert!(row["retire_after"].is_string(), "{row}");
    // Still failing: `rotd retire` says so.
    let o = s.env.rotd(&["retire"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    s.cluster.emu().faults().fail_invalidate(None);
    let o = s.env.rotd(&["retire"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains(&s.initial.0), "{}", stdout(&o));
    assert!(s.cluster.key(&s.initial.0).invalidated);
    let valid = s.valid_keys();
    assert_eq!(valid.len(), 1);
    assert_eq!(
        valid[0].id,
        std::fs::read_to_string(s.out.join("key_id")).unwrap()
    );
}

/// `rotd check` output for a schedule text.
fn check(env: &TestEnv, text: &str) -> String {
    env.write_schedule(NAME, text);
    let o = env.rotd(&["check"]);
    assert!(!o.status.success());
    format!("{}{}", stdout(&o), stderr(&o))
}

#[test]
fn check_reports_missing_and_bad_settings_with_lines() {
    let env = TestEnv::new();
    let o = env.rotd_stdin(
        &["import", ADMIN, "--username", ADMIN_USER],
        &format!("{ADMIN_PW}\n"),
    );
    assert!(o.status.success());
    let head = format!(
        "name = \"{NAME}\"\n[target]\nkind = \"elasticsearch-api-key\"\nurl = \"http://127.0.0.1:9\"\n"
    );
    let perms = "[[target.permissions]]\nnames = [\"logs-a-b\"]\nprivileges = [\"create_doc\"]\n";
    let file = format!("{NAME}.toml");
    // No [probe] index.
    let out = check(
        &env,
        &format!("{head}admin_credential = \"{ADMIN}\"\n{perms}"),
    );
    assert!(out.contains("probe.index is required"), "{out}");
    assert!(out.contains(&format!("{file}:")), "{out}");
    // No admin_credential.
    let out = check(
        &env,
        &format!("{head}{perms}[probe]\nindex = \"logs-a-b\"\n"),
    );
    assert!(out.contains("target.admin_credential is required"), "{out}");
    // An admin_credential that is in neither the store nor the schedules.
    let out = check(
        &env,
        &format!("{head}admin_credential = \"nope\"\n{perms}[probe]\nindex = \"logs-a-b\"\n"),
    );
    assert!(out.contains("target.admin_credential = \"nope\""), "{out}");
    // A permissions block without privileges, named by line.
    let out = check(
        &env,
        &format!("{head}admin_credential = \"{ADMIN}\"\n[[target.permissions]]\nnames = [\"logs-a-b\"]\n[probe]\nindex = \"logs-a-b\"\n"),
    );
    assert!(out.contains("no `privileges`"), "{out}");
    assert!(out.contains(&format!("{file}:6:")), "{out}");
    // An unknown key in a permissions block.
    let out = check(
        &env,
        &format!("{head}admin_credential = \"{ADMIN}\"\n{perms}fields = [\"x\"]\n[probe]\nindex = \"logs-a-b\"\n"),
    );
    assert!(out.contains("fields"), "{out}");
    assert!(out.contains(&format!("{file}:")), "{out}");
}

/// Every key for NAME the cluster accepts is accounted for in git: its id is in some
/// recorded version of the secret (current or pending), or its name is made from a
/// pending rotation's id (the window between the key's creation and the commit of
/// its id; recovery finds such a key by name).
fn assert_valid_keys_in_git(s: &Setup, when: &str) {
    let plaintexts = s.env.recorded_plaintexts(NAME);
    let ids: Vec<&str> = plaintexts
        .iter()
        .flat_map(|p| p.lines())
        .filter_map(|l| l.strip_prefix("key-id: "))
        .collect();
    let rotations: Vec<String> = s
        .env
        .history_json(Some(NAME))
        .iter()
        .filter(|e| e["step"] == "pending")
        .filter_map(|e| e["rotation"].as_str().map(str::to_owned))
        .collect();
    for k in s.valid_keys() {
        assert!(
            ids.contains(&k.id.as_str())
                || rotations
                    .iter()
                    .any(|r| k.name == format!("rotd-{NAME}-{r}")),
            "{when}: key {} ({}) is valid but git does not know it",
            k.id,
            k.name
        );
    }
}

/// SIGKILL after each step (`created`: after the cluster made the key, before its id
/// is committed). At the kill, every valid key is accounted for in git; after
/// recovery (grace 0s) exactly one rotd key is valid, the recorded current one, and
/// the consumers hold it; a rotation afterwards succeeds.
#[test]
fn sigkill_after_every_step_recovers_to_one_valid_recorded_key() {
    let steps = ["pending", "created", "apply", "deliver", "probe", "commit"];
    for step in steps {
        let s = Setup::new(Cluster::emulated(), "0s");
        let o = s.env.run(
            s.env
                .cmd(&["rotate", NAME])
                .env("ROTD_FAULT_KILL_AFTER", step),
        );
        assert_eq!(o.status.signal(), Some(9), "{step}: {}", stderr(&o));
        assert_valid_keys_in_git(&s, &format!("after a kill at {step}"));
        let valid = s.valid_keys();
        assert_eq!(
            valid.len(),
            if step == "pending" { 1 } else { 2 },
            "{step}: {valid:?}"
        );
        let pending = format!("secrets/{NAME}.pending.age");
        if step == "created" || step == "apply" {
            let blob = git(&s.env.store, &["show", &format!("HEAD:{pending}")]);
            let plain = s.env.age_plaintext(&blob.stdout);
            let new = valid.iter().find(|k| k.id != s.initial.0).unwrap();
            assert_eq!(
                plain.contains(&format!("key-id: {}", new.id)),
                step == "apply",
                "{step}: the key id is committed right after the key is made"
            );
        }

        // Recovery runs at the start of any command that takes the lock.
        let o = s.env.rotd(&["retire"]);
        assert!(o.status.success(), "{step}: {}{}", stdout(&o), stderr(&o));
        assert_valid_keys_in_git(&s, &format!("after recovery from {step}"));
        assert!(!s.env.head_files().contains(&pending), "{step}");
        let valid = s.valid_keys();
        assert_eq!(valid.len(), 1, "{step}: one key left: {valid:?}");
        let key_id = std::fs::read_to_string(s.out.join("key_id")).unwrap();
        assert_eq!(valid[0].id, key_id, "{step}: consumers hold the valid key");
        let current = s.env.show(NAME);
        assert_eq!(
            s.consumer(),
            format!("ES_API_KEY={}\n", encoded(&key_id, &current))
        );
        if step == "commit" {
            assert_ne!(key_id, s.initial.0, "{step}: the new key stays");
            assert!(
                s.cluster.key(&s.initial.0).invalidated,
                "{step}: old retired"
            );
        } else {
            assert_eq!(key_id, s.initial.0, "{step}: the old key is back");
            assert_eq!(current, s.initial.1, "{step}");
            let h = s.env.history_json(Some(NAME));
            assert_eq!(h[0]["step"], "rolled-back", "{step}: {:?}", h[0]);
        }
        let o = s.rotate();
        assert!(
            o.status.success(),
            "{step}: rotate after recovery: {}",
            stderr(&o)
        );
        assert_eq!(s.valid_keys().len(), 1, "{step}");
        eprintln!("crash matrix: elasticsearch-api-key: kill after {step}: ok");
    }
    eprintln!(
        "crash matrix: {} steps x elasticsearch-api-key",
        steps.len()
    );
}

#[test]
fn transient_429_and_503_are_retried() {
    let s = Setup::new(Cluster::emulated(), "0s");
    s.cluster.emu().faults().fail_create_key_next(2, 429);
    s.cluster.emu().faults().fail_index_next(1, 503);
    let o = s.rotate();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(s.valid_keys().len(), 1);
    assert!(s.cluster.key(&s.initial.0).invalidated);
}

#[test]
fn dry_run_describes_the_key_and_touches_nothing() {
    let s = Setup::new(Cluster::emulated(), "0s");
    let o = s.env.rotd(&["rotate", "--dry-run", NAME]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&format!("create API key rotd-{NAME}-<rotation>")),
        "{text}"
    );
    assert_eq!(s.cluster.keys().len(), 1);
}

const OTHER_DS: &str = "logs-other.app-default";

/// The schedule with changed permissions: `auto_configure` on DS dropped, OTHER_DS added.
fn change_permissions(s: &Setup) {
    let path = s.env.schedules.join(format!("{NAME}.toml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let old = format!(
        "[[target.permissions]]\nnames = [\"{DS}\"]\nprivileges = [\"create_doc\", \"auto_configure\"]\n"
    );
    assert!(text.contains(&old));
    let new = format!(
        "[[target.permissions]]\nnames = [\"{DS}\"]\nprivileges = [\"create_doc\"]\n[[target.permissions]]\nnames = [\"{OTHER_DS}\"]\nprivileges = [\"create_doc\", \"auto_configure\"]\n"
    );
    s.env.write_schedule(NAME, &text.replace(&old, &new));
}

/// `_has_privileges` as the live key (from the store and the consumer file).
fn live_key_privileges(s: &Setup) -> Value {
    let id = std::fs::read_to_string(s.out.join("key_id")).unwrap();
    let r = s
        .cluster
        .client()
        .post(format!("{}/_security/user/_has_privileges", s.cluster.url))
        .header(
            "Authorization",
            format!("ApiKey {}", encoded(&id, &s.env.show(NAME))),
        )
        .json(&json!({"index": [
            {"names": [DS], "privileges": ["create_doc", "auto_configure"]},
            {"names": [OTHER_DS], "privileges": ["create_doc", "auto_configure"]},
        ]}))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    r.json().unwrap()
}

#[test]
fn changed_permissions_update_the_live_key_in_place() {
    let s = Setup::new(Cluster::emulated(), "0s");
    // A first rotation records the permissions of the key rotd made.
    let o = s.rotate();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let id = std::fs::read_to_string(s.out.join("key_id")).unwrap();
    let secret = s.env.show(NAME);
    change_permissions(&s);
    let o = s.rotate();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("updated in place"), "{}", stdout(&o));
    // Same key, same secret; one valid key.
    assert_eq!(std::fs::read_to_string(s.out.join("key_id")).unwrap(), id);
    assert_eq!(s.env.show(NAME), secret);
    let valid = s.valid_keys();
    assert_eq!(valid.len(), 1, "{valid:?}");
    assert_eq!(valid[0].id, id);
    let p = live_key_privileges(&s);
    assert_eq!(p["index"][OTHER_DS]["create_doc"], json!(true), "{p}");
    assert_eq!(p["index"][OTHER_DS]["auto_configure"], json!(true), "{p}");
    assert_eq!(p["index"][DS]["create_doc"], json!(true), "{p}");
    assert_eq!(p["index"][DS]["auto_configure"], json!(false), "{p}");
    let h = s.env.history_json(Some(NAME));
    assert_eq!(h[0]["step"], "updated", "{:?}", h[0]);
    assert!(h[0]["target"]
        .as_str()
        .unwrap()
        .contains(&format!("key={id}")));
    // Nothing changed since: the next manual run rotates.
    let o = s.rotate();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_ne!(std::fs::read_to_string(s.out.join("key_id")).unwrap(), id);
    assert_eq!(s.env.history_json(Some(NAME))[0]["step"], "retired");
}

#[test]
fn changed_permissions_before_8_4_rotate_instead() {
    let s = Setup::new(Cluster::emulated(), "0s");
    let o = s.rotate();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let id = std::fs::read_to_string(s.out.join("key_id")).unwrap();
    s.cluster.emu().set_version("8.3.0");
    change_permissions(&s);
    let o = s.rotate();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("rotated"), "{}", stdout(&o));
    let new = std::fs::read_to_string(s.out.join("key_id")).unwrap();
    assert_ne!(new, id, "a new key was created");
    assert!(s.cluster.key(&id).invalidated);
    let p = live_key_privileges(&s);
    assert_eq!(p["index"][OTHER_DS]["create_doc"], json!(true), "{p}");
    assert_eq!(p["index"][DS]["auto_configure"], json!(false), "{p}");
    let h = s.env.history_json(Some(NAME));
    assert!(h.iter().all(|e| e["step"] != "updated"));
}

#[test]
fn a_slow_cluster_times_out_and_recovery_finishes_the_rollback() {
    let s = Setup::new(Cluster::emulated(), "0s");
    let sched = s.env.schedules.join(format!("{NAME}.toml"));
    let text = std::fs::read_to_string(&sched)
        .unwrap()
        .replace("timeout = \"5s\"", "timeout = \"1s\"");
    std::fs::write(&sched, text).unwrap();
    // Every answer comes after the client gave up. rotd cannot even confirm that no key
    // was made (the look-up by the name `rotd-NAME-ROTATION` times out too), so it keeps
    // the pending record and says so (exit 2), or rolls back (exit 1).
    s.cluster
        .emu()
        .faults()
        .set_delay(std::time::Duration::from_millis(1500));
    let o = s.rotate();
    let code = o.status.code();
    assert!(
        code == Some(1) || code == Some(2),
        "{code:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(
        format!("{}{}", stdout(&o), stderr(&o)).contains("timed out"),
        "{}",
        stdout(&o)
    );
    eprintln!(
        "slow cluster: exit {code:?}, {} rotd key(s) on the cluster",
        s.cluster.keys().len()
    );
    s.cluster
        .emu()
        .faults()
        .set_delay(std::time::Duration::ZERO);
    // The next command that takes the lock finishes the rollback.
    let o = s.env.rotd(&["retire"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(!s
        .env
        .head_files()
        .iter()
        .any(|f| f.ends_with(".pending.age")));
    let valid = s.valid_keys();
    assert_eq!(
        valid.len(),
        1,
        "only the original key stays valid: {:?}",
        valid.iter().map(|k| &k.id).collect::<Vec<_>>()
    );
    assert_eq!(valid[0].id, s.initial.0);
}

#[test]
fn the_daemon_applies_a_permission_change_on_reload_in_place() {
    let s = Setup::new(Cluster::emulated(), "0s");
    let o = s.rotate();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let id = std::fs::read_to_string(s.out.join("key_id")).unwrap();
    let log = std::fs::File::create(s.env.path("daemon.log")).unwrap();
    let mut daemon = s
        .env
        .cmd(&["run"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let socket = s.env.path("rotd.sock");
    wait_until(
        "the control socket",
        std::time::Duration::from_secs(20),
        || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
    );
    change_permissions(&s);
    wait_until(
        "the in-place update",
        std::time::Duration::from_secs(10),
        || {
            s.env
                .history_json(Some(NAME))
                .first()
                .is_some_and(|e| e["step"] == "updated")
        },
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    let h = s.env.history_json(Some(NAME));
    assert_eq!(h[0]["trigger"], "reload");
    assert_eq!(
        std::fs::read_to_string(s.out.join("key_id")).unwrap(),
        id,
        "same key"
    );
    let p = live_key_privileges(&s);
    assert_eq!(p["index"][OTHER_DS]["create_doc"], json!(true), "{p}");
}
