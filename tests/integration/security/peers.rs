//! Attacks on rotd through HTTP peers: targets, probes, reload endpoints, Elasticsearch answers
//! (see the module list in `tests/integration/security/mod.rs`).
//!
//! A hostile peer is a [`Peer`]: a small HTTP/1.1 server on 127.0.0.1 in the test that
//! records every request it gets and answers what the test tells it to. Elasticsearch
//! attacks use the emulator (crates/es-emulator) with its hostile hooks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use es_emulator::EsEmulator;
use serde_json::{json, Value};

#[allow(unused_imports)]
use crate::util::*;

/// One request a [`Peer`] received.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// What a [`Peer`] answers.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn ok() -> Answer {
        Answer {
            status: 200,
            headers: Vec::new(),
            body: "{}".into(),
        }
    }

    fn redirect(to: &str) -> Answer {
        Answer {
            status: 307,
            headers: vec![("Location".into(), to.into())],
            body: String::new(),
        }
    }

    fn error(body: String) -> Answer {
        Answer {
            status: 500,
            headers: Vec::new(),
            body,
        }
    }
}

type Handler = dyn Fn(&Req, usize) -> Answer + Send + Sync;

/// A hostile HTTP peer on 127.0.0.1: answers each request with `handler(request,
/// how many came before it)` and keeps every request.
struct Peer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Peer {
    fn start(handler: impl Fn(&Req, usize) -> Answer + Send + Sync + 'static) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Req>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (reqs, st) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let _ = serve(stream, &reqs, &*handler);
            }
        });
        Peer {
            addr,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request from `stream`, records it, writes the handler's answer, closes.
fn serve(stream: TcpStream, reqs: &Mutex<Vec<Req>>, handler: &Handler) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = match (parts.next(), parts.next()) {
        (Some(m), Some(p)) => (m.to_owned(), p.to_owned()),
        _ => return Ok(()), // the wake-up connection of Drop
    };
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    let req = Req { method, path, body };
    let n = {
        let mut all = reqs.lock().unwrap();
        all.push(req.clone());
        all.len() - 1
    };
    let a = handler(&req, n);
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n",
        a.status,
        a.body.len()
    );
    for (k, v) in &a.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&a.body);
    let mut w = stream;
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// A `files` schedule `apm-token` delivering `{{secret}}` into `consumer/token`, with
/// `extra` appended to its `[[deliver]]` block and `probe` as its `[probe]` table.
fn files_schedule(env: &TestEnv, deliver_extra: &str, probe: &str) -> PathBuf {
    let out = env.path("consumer");
    env.write_schedule(
        "apm-token",
        &format!(
            "name = \"apm-token\"\nschedule = \"0 0 4 * * *\"\ngrace = \"0s\"\n[generate]\nlength = 40\ncharset = \"alnum\"\n[target]\nkind = \"files\"\n[[deliver]]\npath = \"{}/token\"\ncontent = \"{{{{secret}}}}\"\nmode = \"0600\"\n{deliver_extra}\n[probe]\nattempts = 1\ntimeout = \"5s\"\n{probe}",
            out.display()
        ),
    );
    let o = env.rotd(&["check"]);
    assert!(o.status.success(), "check: {}{}", stdout(&o), stderr(&o));
    out.join("token")
}

// ---- Redirects -------------------------------------------------------------------

#[test]
fn probe_redirected_to_another_host_is_not_followed_and_rolls_back() {
    let env = TestEnv::new();
    let elsewhere = Peer::start(|_, _| Answer::ok());
    let to = format!("{}/health", elsewhere.url());
    let hostile = Peer::start(move |_, _| Answer::redirect(&to));
    files_schedule(
        &env,
        "",
        &format!(
            "http = {{ url = \"{}/health\", header = \"Authorization: Bearer {{{{secret}}}}\", expect = 200 }}\n",
            hostile.url()
        ),
    );
    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(hostile.requests().len(), 1, "asked once, not retried");
    assert!(
        elsewhere.requests().is_empty(),
        "the redirect's host was contacted: {:?}",
        elsewhere.requests()
    );
    let h = env.history_json(Some("apm-token"));
    assert_eq!(h[0]["step"], "rolled-back");
    let err = h[0]["error"].as_str().unwrap();
    assert!(
        err.contains("307") && err.contains(&elsewhere.url()) && err.contains("redirect"),
        "the error names the status and the Location: {err}"
    );
}

#[test]
fn reload_redirected_to_another_host_is_not_followed() {
    let env = TestEnv::new();
    let elsewhere = Peer::start(|_, _| Answer::ok());
    let to = format!("{}/-/reload", elsewhere.url());
    // The first reload (after the new secret is delivered) is redirected; the one
    // of the rollback is answered.
    let hostile = Peer::start(move |_, n| {
        if n == 0 {
            Answer::redirect(&to)
        } else {
            Answer::ok()
        }
    });
    let consumer = files_schedule(
        &env,
        &format!(
            "reload = {{ http_post = \"{}/-/reload\" }}\n",
            hostile.url()
        ),
        "",
    );
    std::fs::create_dir_all(consumer.parent().unwrap()).unwrap();
    std::fs::write(&consumer, "the-old-token").unwrap();
    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        elsewhere.requests().is_empty(),
        "the redirect's host was contacted: {:?}",
        elsewhere.requests()
    );
    assert_eq!(std::fs::read_to_string(&consumer).unwrap(), "the-old-token");
    let err = stderr(&o);
    assert!(err.contains("307") && err.contains("redirect"), "{err}");
}

#[test]
fn es_password_change_redirected_to_another_host_sends_it_no_password() {
    let env = TestEnv::new();
    let elsewhere = Peer::start(|_, _| Answer::ok());
    let to = elsewhere.url();
    // A "cluster" that redirects every request (the same path on another host).
    let hostile = Peer::start(move |r, _| Answer::redirect(&format!("{to}{}", r.path)));
    let o = env.rotd_stdin(
        &["import", "es-admin", "--username", "rotd-admin"],
        "admin-password-0123456789\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.rotd_stdin(
        &["import", "ls-writer", "--username", "logstash_writer"],
        "old-password-0123456789\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    env.write_schedule(
        "ls-writer",
        &format!(
            "name = \"ls-writer\"\nschedule = \"0 30 2 * * *\"\ngrace = \"0s\"\n[target]\nkind = \"elasticsearch-user-password\"\nurl = \"{}\"\nadmin_credential = \"es-admin\"\nusername = \"logstash_writer\"\n[[deliver]]\npath = \"{}/es.env\"\ncontent = \"ES_PASSWORD={{{{secret}}}}\\n\"\nmode = \"0600\"\n[probe]\ntimeout = \"5s\"\n",
            hostile.url(),
            env.path("logstash").display()
        ),
    );
    let o = env.rotd(&["rotate", "ls-writer"]);
    assert_ne!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        hostile
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path.contains("_password")),
        "the password change was asked: {:?}",
        hostile.requests()
    );
    assert!(
        elsewhere.requests().is_empty(),
        "the redirect's host received {:?}",
        elsewhere
            .requests()
            .iter()
            .map(|r| format!("{} {} ({} bytes)", r.method, r.path, r.body.len()))
            .collect::<Vec<_>>()
    );
    assert!(stderr(&o).contains("redirect"), "{}", stderr(&o));
}

// ---- Redaction before truncation -----------------------------------------------

#[test]
fn reload_answer_echoing_the_secret_across_the_cut_leaks_no_prefix() {
    let env = TestEnv::new();
    let echoed: Arc<Mutex<Option<String>>> = Arc::default();
    let token = env.path("consumer/token");
    let seen = echoed.clone();
    // The consumer's reload endpoint reads the file it was told to reload and quotes
    // it back in its error page: base64 first, then raw, placed so that the raw
    // secret straddles the 300th character of the answer.
    let hostile = Peer::start(move |_, n| {
        if n > 0 {
            return Answer::ok();
        }
        let secret = std::fs::read_to_string(&token).unwrap_or_default();
        *seen.lock().unwrap() = Some(secret.clone());
        let b64 = STANDARD.encode(&secret);
        let mut body = format!("{{\"error\":\"{}", "x".repeat(100));
        body.push_str(&b64);
        body.push_str("\", \"seen\": \"");
        body.push_str(&"y".repeat(290 - body.len()));
        body.push_str(&secret);
        body.push_str("\"}");
        Answer::error(body)
    });
    files_schedule(
        &env,
        &format!(
            "reload = {{ http_post = \"{}/-/reload\" }}\n",
            hostile.url()
        ),
        "",
    );
    let o = env.rotd(&["rotate", "apm-token"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let secret = echoed
        .lock()
        .unwrap()
        .clone()
        .expect("the reload was called");
    assert_eq!(secret.len(), 40);
    let log = stdout(&git(&env.store, &["log", "--format=%B"]));
    let status = env.rotd(&["status", "--json"]);
    let history = env.rotd(&["history", "--json"]);
    for (what, text) in [
        ("stderr", stderr(&o)),
        ("stdout", stdout(&o)),
        ("the commit messages", log),
        ("status --json", stdout(&status)),
        ("history --json", stdout(&history)),
    ] {
        for (form, value) in [
            ("raw", secret.clone()),
            ("base64", STANDARD.encode(&secret)),
        ] {
            assert!(
                !text.contains(&value[..8]),
                "an 8-character prefix of the {form} secret is in {what}:\n{text}"
            );
        }
    }
    assert!(stderr(&o).contains("REDACTED"), "{}", stderr(&o));
}

#[test]
fn es_error_echoing_the_admin_credential_across_the_cut_leaks_no_prefix() {
    let env = TestEnv::new();
    const ADMIN_PW: &str = "admin-password-0123456789-abcdefghij";
    let basic = STANDARD.encode(format!("rotd-admin:{ADMIN_PW}"));
    // A "cluster" whose errors quote the credential it was sent, Basic header first,
    // then raw, the raw one straddling the 600th character of the reason.
    let echo = basic.clone();
    let hostile = Peer::start(move |_, _| {
        let mut reason = format!("{} {echo} ", "x".repeat(200));
        reason.push_str(&"y".repeat(590 - reason.len()));
        reason.push_str(ADMIN_PW);
        Answer {
            status: 400,
            headers: Vec::new(),
            body: json!({"error": {"type": "illegal_argument_exception", "reason": reason}, "status": 400}).to_string(),
        }
    });
    let o = env.rotd_stdin(
        &["import", "es-admin", "--username", "rotd-admin"],
        &format!("{ADMIN_PW}\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = env.rotd_stdin(
        &["import", "ls-writer", "--username", "logstash_writer"],
        "old-password-0123456789\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    env.write_schedule(
        "ls-writer",
        &format!(
            "name = \"ls-writer\"\nschedule = \"0 30 2 * * *\"\ngrace = \"0s\"\n[target]\nkind = \"elasticsearch-user-password\"\nurl = \"{}\"\nadmin_credential = \"es-admin\"\nusername = \"logstash_writer\"\n[probe]\ntimeout = \"5s\"\n",
            hostile.url(),
        ),
    );
    let o = env.rotd(&["rotate", "ls-writer"]);
    assert_ne!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let log = stdout(&git(&env.store, &["log", "--format=%B"]));
    let status = env.rotd(&["status", "--json"]);
    for (what, text) in [
        ("stderr", stderr(&o)),
        ("the commit messages", log),
        ("status --json", stdout(&status)),
    ] {
        for (form, value) in [("raw", ADMIN_PW), ("Basic", basic.as_str())] {
            assert!(
                !text.contains(&value[..8]),
                "an 8-character prefix of the {form} admin credential is in {what}:\n{text}"
            );
        }
    }
    assert!(stderr(&o).contains("REDACTED"), "{}", stderr(&o));
}

// ---- Values from peers and stdin -------------------------------------------------

#[test]
fn import_refuses_a_username_or_key_id_that_is_a_path() {
    let env = TestEnv::new();
    let head = stdout(&git(&env.store, &["rev-parse", "HEAD"]));
    for args in [
        &["import", "x", "--username", "../../x"][..],
        &["import", "x", "--username", ".hidden"][..],
        &["import", "x", "--username", "a/b"][..],
        &["import", "x", "--key-id=../../../x"][..],
        &["import", "x", "--key-id=ab:cd"][..],
    ] {
        let o = env.rotd_stdin(args, "a-secret-value-0123456789\n");
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("--username") || err.contains("--key-id"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(head, stdout(&git(&env.store, &["rev-parse", "HEAD"])));
}

#[test]
fn import_refuses_a_secret_with_control_characters() {
    let env = TestEnv::new();
    let head = stdout(&git(&env.store, &["rev-parse", "HEAD"]));
    for input in [
        "abc\0def-0123456789\n",
        "abc\u{1b}[31mdef-0123456789\n",
        "first-line\nusername: evil\n",
        "tab\tinside-0123456789\n",
    ] {
        let o = env.rotd_stdin(&["import", "x", "--username", "u"], input);
        assert_eq!(o.status.code(), Some(64), "{input:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("stdin"), "{}", stderr(&o));
    }
    assert_eq!(head, stdout(&git(&env.store, &["rev-parse", "HEAD"])));
}

const ES_NAME: &str = "filebeat-output";
const ES_DS: &str = "logs-nginx.access-default";

/// An `elasticsearch-api-key` secret against the emulator: the admin and the live key
/// imported, and a deliver path that uses `{{key_id}}` four directories down.
struct EsSetup {
    env: TestEnv,
    emu: EsEmulator,
    out: PathBuf,
    initial_id: String,
}

impl EsSetup {
    fn new() -> EsSetup {
        let emu = EsEmulator::start();
        emu.add_user("rotd-admin", "admin-password-0123456789", true);
        let env = TestEnv::new();
        let o = env.rotd_stdin(
            &["import", "es-admin", "--username", "rotd-admin"],
            "admin-password-0123456789\n",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let created: Value = reqwest::blocking::Client::new()
            .post(format!("{}/_security/api_key", emu.url()))
            .basic_auth("rotd-admin", Some("admin-password-0123456789"))
            .json(&json!({"name": format!("rotd-{ES_NAME}-initial"), "expiration": "1d",
                "metadata": {"managed_by": "rotd", "secret": ES_NAME, "rotation": "initial"},
                "role_descriptors": {format!("rotd-{ES_NAME}"): {"cluster": [], "indices": [{"names": [ES_DS], "privileges": ["create_doc", "auto_configure"]}]}}}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let o = env.rotd_stdin(
            &["import", ES_NAME, &format!("--key-id={id}")],
            &format!("{}\n", created["api_key"].as_str().unwrap()),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let out = env.path("a/b/c");
        std::fs::create_dir_all(out.join("keys")).unwrap();
        env.write_schedule(
            ES_NAME,
            &format!(
                r#"name = "{ES_NAME}"
schedule = "0 30 2 * * *"
grace = "0s"

[target]
kind = "elasticsearch-api-key"
url = "{url}"
admin_credential = "es-admin"
expiration = "30d"
[[target.permissions]]
names = ["{ES_DS}"]
privileges = ["create_doc", "auto_configure"]

[[deliver]]
path = "{out}/filebeat.env"
content = "ES_API_KEY={{{{encoded}}}}\n"
mode = "0600"

[[deliver]]
path = "{out}/keys/{{{{key_id}}}}.key"
content = "{{{{secret}}}}"
mode = "0600"

[probe]
index = "{ES_DS}"
timeout = "5s"
"#,
                url = emu.url(),
                out = out.display(),
            ),
        );
        let o = env.rotd(&["check"]);
        assert!(o.status.success(), "check: {}{}", stdout(&o), stderr(&o));
        EsSetup {
            env,
            emu,
            out,
            initial_id: id,
        }
    }

    /// Ids of the keys made for the secret that still authenticate.
    fn live_keys(&self) -> Vec<String> {
        self.emu
            .api_keys()
            .into_iter()
            .filter(|k| k.metadata["secret"] == json!(ES_NAME) && !k.invalidated)
            .map(|k| k.id)
            .collect()
    }

    /// The `key-id` of the current record.
    fn recorded_key_id(&self) -> String {
        let blob = git(
            &self.env.store,
            &["show", &format!("HEAD:secrets/{ES_NAME}.age")],
        );
        assert!(blob.status.success(), "{}", stderr(&blob));
        let plain = self.env.age_plaintext(&blob.stdout);
        plain
            .lines()
            .find_map(|l| l.strip_prefix("key-id: "))
            .expect("a key-id line")
            .to_owned()
    }

    /// After a refused answer: only the old key lives, git holds it as the current
    /// record and nothing else, and a rotation with an honest cluster works.
    fn assert_rolled_back_cleanly(&self, o: &std::process::Output) {
        assert_eq!(o.status.code(), Some(1), "{}{}", stdout(o), stderr(o));
        assert_eq!(self.live_keys(), vec![self.initial_id.clone()]);
        let files = self.env.head_files();
        assert!(
            files.contains(&format!("secrets/{ES_NAME}.age"))
                && !files.contains(&format!("secrets/{ES_NAME}.pending.age")),
            "{files:?}"
        );
        assert_eq!(self.recorded_key_id(), self.initial_id);
        let keys: Vec<_> = std::fs::read_dir(self.out.join("keys"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(keys.is_empty(), "{keys:?}");
        self.emu.faults().reset();
        let o = self.env.rotd(&["rotate", ES_NAME]);
        assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
        assert_eq!(self.live_keys(), vec![self.recorded_key_id()]);
    }
}

/// Every file under `dir` named `name`.
fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                todo.push(p);
            } else if e.file_name() == name {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn es_answer_with_a_key_id_that_is_a_path_writes_nothing_outside_and_rolls_back() {
    let s = EsSetup::new();
    s.emu
        .faults()
        .patch_create_answer(Some(json!({"id": "../../../../pwned"})));
    let o = s.env.rotd(&["rotate", ES_NAME]);
    let written = files_named(s.env.dir.path(), "pwned.key");
    assert!(written.is_empty(), "rotd wrote {written:?}");
    let err = stderr(&o);
    assert!(err.contains("is not an Elasticsearch API key id"), "{err}");
    s.assert_rolled_back_cleanly(&o);
}

#[test]
fn es_answer_with_a_newline_in_the_api_key_never_reaches_the_record() {
    let s = EsSetup::new();
    s.emu.faults().patch_create_answer(Some(
        json!({"api_key": "c2VjcmV0\nretire-key-id: forged\nusername: evil"}),
    ));
    let o = s.env.rotd(&["rotate", ES_NAME]);
    for p in s.env.recorded_plaintexts(ES_NAME) {
        assert!(!p.contains("forged") && !p.contains("evil"), "{p}");
    }
    s.assert_rolled_back_cleanly(&o);
    let err = stderr(&o);
    assert!(err.contains("is not an Elasticsearch API key"), "{err}");
}

#[test]
fn es_create_answered_502_after_the_key_was_made_leaves_no_second_live_key() {
    let s = EsSetup::new();
    s.emu.faults().lose_create_answer_next(1, 502);
    let o = s.env.rotd(&["rotate", ES_NAME]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let recorded = s.recorded_key_id();
    assert_ne!(recorded, s.initial_id);
    // Two keys were made under the rotation's name; the one whose answer was lost is
    // invalidated, the recorded one is the only live key (grace 0: the old one is
    // retired).
    let made: Vec<_> = s
        .emu
        .api_keys()
        .into_iter()
        .filter(|k| k.metadata["secret"] == json!(ES_NAME) && k.id != s.initial_id)
        .collect();
    assert_eq!(made.len(), 2, "{made:?}");
    assert_eq!(s.live_keys(), vec![recorded]);
}

#[test]
fn es_create_answer_lost_every_time_rolls_back_with_no_key_left() {
    let s = EsSetup::new();
    s.emu.faults().lose_create_answer_next(3, 502);
    let o = s.env.rotd(&["rotate", ES_NAME]);
    s.assert_rolled_back_cleanly(&o);
}
