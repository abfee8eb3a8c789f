//! The `elasticsearch-user-password` target against the in-process Elasticsearch
//! emulator (crates/es-emulator), with rotd run as a child process.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use crate::util::*;
use es_emulator::EsEmulator;

const NAME: &str = "logstash-es-password";
const USER: &str = "logstash_writer";
const OLD_PW: &str = "old-password-0123456789";
const ADMIN: &str = "es-admin";
const ADMIN_USER: &str = "rotd-admin";
const ADMIN_PW: &str = "admin-password-0123456789";
const DS: &str = "logs-logstash.out-default";

struct Setup {
    env: TestEnv,
    emu: EsEmulator,
    out: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let emu = EsEmulator::start();
        emu.add_user(ADMIN_USER, ADMIN_PW, true);
        emu.add_role_user(
            USER,
            OLD_PW,
            &[],
            &[(&[DS], &["create_doc", "auto_configure"])],
        );
        let env = TestEnv::new();
        let o = env.rotd_stdin(
            &["import", ADMIN, "--username", ADMIN_USER],
            &format!("{ADMIN_PW}\n"),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let o = env.rotd_stdin(
            &["import", NAME, "--username", USER],
            &format!("{OLD_PW}\n"),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let out = env.path("logstash");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(
            out.join("es.env"),
            format!("ES_USER={USER}\nES_PASSWORD={OLD_PW}\n"),
        )
        .unwrap();
        env.write_schedule(
            NAME,
            &format!(
                r#"name = "{NAME}"
schedule = "0 30 2 * * *"
grace = "0s"

[target]
kind = "elasticsearch-user-password"
url = "{url}"
admin_credential = "{ADMIN}"
username = "{USER}"

[[deliver]]
path = "{out}/es.env"
content = "ES_USER={{{{username}}}}\nES_PASSWORD={{{{secret}}}}\n"
mode = "0600"

[probe]
index = "{DS}"
timeout = "5s"
"#,
                url = emu.url(),
                out = out.display(),
            ),
        );
        let o = env.rotd(&["check"]);
        assert!(o.status.success(), "check: {}{}", stdout(&o), stderr(&o));
        Setup { env, emu, out }
    }

    fn consumer(&self) -> String {
        std::fs::read_to_string(self.out.join("es.env")).unwrap()
    }

    /// Does `_authenticate` as USER with `pw` succeed?
    fn authenticates(&self, pw: &str) -> bool {
        reqwest::blocking::Client::new()
            .get(format!("{}/_security/_authenticate", self.emu.url()))
            .basic_auth(USER, Some(pw))
            .send()
            .unwrap()
            .status()
            .is_success()
    }

    /// After a failure: the old password alone works, consumers and store on it.
    fn assert_old_password_back(&self, new: &str) {
        assert!(self.authenticates(OLD_PW), "old password works again");
        assert!(!self.authenticates(new), "new password refused");
        assert_eq!(self.emu.user_password(USER).as_deref(), Some(OLD_PW));
        assert_eq!(
            self.consumer(),
            format!("ES_USER={USER}\nES_PASSWORD={OLD_PW}\n")
        );
        assert_eq!(self.env.show(NAME), OLD_PW);
        assert!(!self
            .env
            .head_files()
            .contains(&format!("secrets/{NAME}.pending.age")));
        assert_eq!(self.env.history_json(Some(NAME))[0]["step"], "rolled-back");
    }

    /// The new password of the pending rotation, read from the emulator.
    fn live_password(&self) -> String {
        self.emu.user_password(USER).unwrap()
    }
}

#[test]
fn two_rotations_change_the_password_and_deliver_it() {
    let s = Setup::new();
    let mut seen = vec![OLD_PW.to_owned()];
    for i in 0..2 {
        let o = s.env.rotd(&["rotate", NAME]);
        assert!(
            o.status.success(),
            "rotation {i}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        let pw = s.env.show(NAME);
        assert!(!seen.contains(&pw));
        assert_eq!(s.live_password(), pw);
        assert!(s.authenticates(&pw));
        assert!(
            !s.authenticates(seen.last().unwrap()),
            "the old password is gone"
        );
        assert_eq!(s.consumer(), format!("ES_USER={USER}\nES_PASSWORD={pw}\n"));
        let said = format!("{}{}", stdout(&o), stderr(&o));
        assert!(!said.contains(&pw) && !said.contains(seen.last().unwrap()));
        let h = s.env.history_json(Some(NAME));
        let succeeded = h.iter().find(|e| e["step"] == "succeeded").unwrap();
        let rotation = succeeded["rotation"].as_str().unwrap();
        assert!(succeeded["target"]
            .as_str()
            .unwrap()
            .contains(&format!("user={USER}")));
        assert!(
            s.emu
                .documents(DS)
                .iter()
                .any(|d| d["rotd"]["rotation"] == rotation),
            "probe document of {rotation}"
        );
        seen.push(pw);
    }
    let log = stdout(&git(&s.env.store, &["log", "--format=%B"]));
    for pw in &seen {
        assert!(!log.contains(pw.as_str()));
    }
}

#[test]
fn probe_failure_restores_the_old_password_and_consumers() {
    let s = Setup::new();
    s.emu.faults().fail_index_with(Some(503));
    let o = s.env.rotd(&["rotate", NAME]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    // The new password, from the pending commit (HEAD~1; HEAD rolled it back).
    let blob = git(
        &s.env.store,
        &["show", &format!("HEAD~1:secrets/{NAME}.pending.age")],
    );
    let new = s.env.age_secret(&blob.stdout);
    assert_ne!(new, OLD_PW);
    s.assert_old_password_back(&new);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!text.contains(OLD_PW), "no password in the output");
}

/// SIGKILL after each step. At the kill, the password the cluster accepts is recorded
/// in git; after recovery the old password is back (or, after the commit, the new one
/// stays), consumers and store agree with the cluster, and a rotation succeeds.
#[test]
fn sigkill_after_every_step_keeps_the_live_password_recorded_and_recovers() {
    let steps = ["pending", "apply", "deliver", "probe", "commit"];
    for step in steps {
        let s = Setup::new();
        let o = s.env.run(
            s.env
                .cmd(&["rotate", NAME])
                .env("ROTD_FAULT_KILL_AFTER", step),
        );
        assert_eq!(o.status.signal(), Some(9), "{step}: {}", stderr(&o));
        let live = s.live_password();
        assert!(
            s.env.recorded_secrets(NAME).contains(&live),
            "{step}: the cluster accepts a password git does not hold"
        );
        assert_eq!(live == OLD_PW, step == "pending", "{step}: apply sets it");
        let new = if step == "commit" {
            s.env.show(NAME)
        } else {
            let blob = git(
                &s.env.store,
                &["show", &format!("HEAD:secrets/{NAME}.pending.age")],
            );
            s.env.age_secret(&blob.stdout)
        };
        let o = s.env.rotd(&["retire"]);
        assert!(o.status.success(), "{step}: {}{}", stdout(&o), stderr(&o));
        if step == "commit" {
            assert_eq!(s.live_password(), new, "{step}");
            assert!(s.authenticates(&new) && !s.authenticates(OLD_PW), "{step}");
            assert_eq!(s.consumer(), format!("ES_USER={USER}\nES_PASSWORD={new}\n"));
        } else {
            s.assert_old_password_back(&new);
        }
        let o = s.env.rotd(&["rotate", NAME]);
        assert!(
            o.status.success(),
            "{step}: rotate after recovery: {}",
            stderr(&o)
        );
        assert!(s.authenticates(&s.env.show(NAME)), "{step}");
        eprintln!("crash matrix: elasticsearch-user-password: kill after {step}: ok");
    }
    eprintln!(
        "crash matrix: {} steps x elasticsearch-user-password",
        steps.len()
    );
}

#[test]
fn dry_run_names_the_gap_and_touches_nothing() {
    let s = Setup::new();
    let o = s.env.rotd(&["rotate", "--dry-run", NAME]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("set the password of user {USER}")),
        "{}",
        stdout(&o)
    );
    assert_eq!(s.live_password(), OLD_PW);
}

#[test]
fn check_requires_username() {
    let s = Setup::new();
    let text = std::fs::read_to_string(s.env.schedules.join(format!("{NAME}.toml"))).unwrap();
    s.env
        .write_schedule(NAME, &text.replace(&format!("username = \"{USER}\"\n"), ""));
    let o = s.env.rotd(&["check"]);
    assert!(!o.status.success());
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(out.contains("target.username is required"), "{out}");
}
