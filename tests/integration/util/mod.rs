//! Test harness: a temp rotd setup (config, keys, store, bare remote) and real
//! Prometheus processes (a remote-write receiver and an agent-mode sender) on free
//! loopback ports. Processes are killed when their handle drops.

mod leaks;
pub use leaks::walk;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The rotd binary under test: this build's, or `$ROTD_BIN` (e.g. a release build, to
/// time it: `ROTD_BIN=target/release/rotd cargo test --test integration audit:: --
/// --nocapture`).
pub fn rotd_bin() -> std::path::PathBuf {
    std::env::var_os("ROTD_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_rotd").into())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// bcrypt hash at the lowest cost, for fixtures.
pub fn bcrypt_hash(pw: &str) -> String {
    bcrypt::hash(pw, 4).unwrap()
}

pub struct TestEnv {
    /// What every rotd run of this env printed, searched for secrets on drop.
    outputs: std::sync::Mutex<Vec<Vec<u8>>>,
    /// Files outside the deliver paths that may hold a secret (fixtures of a test).
    allowed: std::sync::Mutex<Vec<PathBuf>>,
    /// Set by tests whose store is not rotd's own making (e.g. fast-imported history).
    pub skip_leak_check: std::sync::atomic::AtomicBool,
    /// Set by a test that commits a plaintext secret by hand (to see `verify` flag it):
    /// git objects are then not searched, everything else still is.
    pub planted_leak_in_git: std::sync::atomic::AtomicBool,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub store: PathBuf,
    pub remote: PathBuf,
    pub identity: PathBuf,
    /// An extra recipient's identity (made with the stock age-keygen).
    pub person_identity: PathBuf,
    pub schedules: PathBuf,
}

pub fn git(dir: &Path, args: &[&str]) -> Output {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

impl TestEnv {
    /// A config with a store, a bare remote, a recipients file, and `rotd init` run.
    pub fn new() -> TestEnv {
        let env = TestEnv::uninitialised();
        let o = env.rotd(&["init"]);
        assert!(o.status.success(), "init failed: {}", stderr(&o));
        env
    }

    pub fn uninitialised() -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let keys = root.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let person_identity = keys.join("person.agekey");
        let o = Command::new("age-keygen")
            .arg("-o")
            .arg(&person_identity)
            .output()
            .expect("age-keygen (apt-get install age)");
        assert!(o.status.success());
        let public = String::from_utf8_lossy(&o.stderr)
            .trim()
            .trim_start_matches("Public key: ")
            .to_owned();
        std::fs::write(
            keys.join("recipients"),
            format!("# ops on-call\n{public}\n"),
        )
        .unwrap();
        let remote = root.join("remote.git");
        assert!(Command::new("git")
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(&remote)
            .status()
            .unwrap()
            .success());
        let schedules = root.join("schedules");
        std::fs::create_dir_all(&schedules).unwrap();
        let config = root.join("rotd.toml");
        std::fs::write(
            &config,
            format!(
                "[store]\npath = \"store\"\nremote = \"{}\"\nidentity = \"keys/rotd.agekey\"\nrecipients = \"keys/recipients\"\n\n[daemon]\nschedules = \"schedules\"\nsocket = \"rotd.sock\"\n",
                remote.display()
            ),
        )
        .unwrap();
        TestEnv {
            outputs: Default::default(),
            allowed: Default::default(),
            skip_leak_check: Default::default(),
            planted_leak_in_git: Default::default(),
            store: root.join("store"),
            identity: keys.join("rotd.agekey"),
            config,
            remote,
            person_identity,
            schedules,
            dir,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A rotd command for this env, logging at TRACE (every crate): whatever it prints
    /// is checked for secrets when the env drops, if it is run with [`TestEnv::run`]
    /// or its output is passed to [`TestEnv::record`].
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(rotd_bin());
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .env("ROTD_LOG", "trace")
            .env_remove("ROTD_FAULT_KILL_AFTER");
        c
    }

    /// Runs `c` (made by [`TestEnv::cmd`]) to completion and records its output.
    pub fn run(&self, c: &mut Command) -> Output {
        let o = c.stdin(Stdio::null()).output().unwrap();
        self.record(&o);
        o
    }

    /// Adds a finished rotd run's output to what the drop check searches.
    pub fn record(&self, o: &Output) {
        let mut all = self.outputs.lock().unwrap();
        all.push(o.stdout.clone());
        all.push(o.stderr.clone());
    }

    /// Adds other text rotd served (a metrics page, a socket answer) to the search.
    pub fn record_text(&self, text: &str) {
        self.outputs.lock().unwrap().push(text.as_bytes().to_vec());
    }

    /// A file the test itself wrote a secret into (outside the deliver paths).
    pub fn allow_holder(&self, path: &Path) {
        self.allowed.lock().unwrap().push(path.to_owned());
    }

    pub fn rotd(&self, args: &[&str]) -> Output {
        self.run(&mut self.cmd(args))
    }

    pub fn rotd_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        self.record(&o);
        o
    }

    pub fn write_schedule(&self, name: &str, text: &str) {
        std::fs::write(self.schedules.join(format!("{name}.toml")), text).unwrap();
    }

    /// `rotd show NAME`: prints the secret by design, so not recorded for the check.
    pub fn show(&self, name: &str) -> String {
        let o = self.cmd(&["show", name]).output().unwrap();
        assert!(o.status.success(), "show {name}: {}", stderr(&o));
        stdout(&o).trim_end().to_owned()
    }

    pub fn history_json(&self, name: Option<&str>) -> Vec<serde_json::Value> {
        let mut args = vec!["history", "--json"];
        if let Some(n) = name {
            args.push(n);
        }
        let o = self.rotd(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["entries"].as_array().unwrap().clone()
    }

    /// The plaintext of an age file, decrypted with the daemon's identity by the stock
    /// `age` CLI (reading the ciphertext on stdin: no temp file).
    pub fn age_plaintext(&self, ciphertext: &[u8]) -> String {
        use std::io::Write;
        let mut child = Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(&self.identity)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("age (apt-get install age)");
        child.stdin.take().unwrap().write_all(ciphertext).unwrap();
        let d = child.wait_with_output().unwrap();
        assert!(d.status.success(), "{}", stderr(&d));
        stdout(&d)
    }

    /// The first line (the secret) of an age file's plaintext.
    pub fn age_secret(&self, ciphertext: &[u8]) -> String {
        self.age_plaintext(ciphertext)
            .lines()
            .next()
            .unwrap()
            .to_owned()
    }

    /// The plaintext of every version of the secret's current and pending files in
    /// the store's history, decrypted with the stock age CLI.
    pub fn recorded_plaintexts(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for path in [
            format!("secrets/{name}.age"),
            format!("secrets/{name}.pending.age"),
        ] {
            let revs = stdout(&git(&self.store, &["log", "--format=%H", "--", &path]));
            for rev in revs.lines() {
                let blob = git(&self.store, &["show", &format!("{rev}:{path}")]);
                if !blob.status.success() {
                    continue; // the commit removed it
                }
                out.push(self.age_plaintext(&blob.stdout));
            }
        }
        out
    }

    /// The secrets (first lines) of [`TestEnv::recorded_plaintexts`].
    pub fn recorded_secrets(&self, name: &str) -> Vec<String> {
        self.recorded_plaintexts(name)
            .iter()
            .map(|p| p.lines().next().unwrap_or("").to_owned())
            .collect()
    }

    /// Files in the store's `secrets/` at HEAD.
    pub fn head_files(&self) -> Vec<String> {
        let o = git(&self.store, &["ls-tree", "--name-only", "HEAD", "secrets/"]);
        stdout(&o).lines().map(str::to_owned).collect()
    }
}

/// A running Prometheus process.
pub struct Prom {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Drop for Prom {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prom {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(dir: &Path, args: &[String], port: u16) -> Prom {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus (apt-get install prometheus)");
        Prom {
            child,
            port,
            dir: dir.to_owned(),
            log,
        }
    }

    /// A plain Prometheus server (no auth) with the given config text.
    pub fn server(dir: &Path, config: &str) -> Prom {
        let port = free_port();
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        Prom::spawn(
            dir,
            &[
                format!("--config.file={}", cfg.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ],
            port,
        )
    }

    /// A remote-write receiver guarded by `web_config`.
    pub fn receiver(dir: &Path, web_config: &Path) -> Prom {
        let port = free_port();
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, "global:\n  scrape_interval: 1m\n").unwrap();
        Prom::spawn(
            dir,
            &[
                format!("--config.file={}", cfg.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                format!("--web.config.file={}", web_config.display()),
                "--web.enable-remote-write-receiver".into(),
                "--web.enable-lifecycle".into(),
            ],
            port,
        )
    }

    /// An agent-mode sender whose config is `config` (written by the test / rotd).
    pub fn agent(dir: &Path, config: &Path, port: u16) -> Prom {
        Prom::spawn(
            dir,
            &[
                "--enable-feature=agent".into(),
                format!("--config.file={}", config.display()),
                format!("--storage.agent.path={}", dir.join("wal").display()),
                // A reload waits for the old remote-write queue to flush: keep it short.
                "--storage.remote.flush-deadline=10s".into(),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--web.enable-lifecycle".into(),
            ],
            port,
        )
    }

    /// Polls `/-/ready` until 200 (30 s at most).
    pub fn wait_ready(&self, auth: Option<(&str, &str)>) {
        let client = reqwest::blocking::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut req = client.get(format!("{}/-/ready", self.url()));
            if let Some((u, p)) = auth {
                req = req.basic_auth(u, Some(p));
            }
            if let Ok(r) = req.send() {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus on {} not ready: {}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Remote writes this sender logged as refused since it started (a 401, or any
    /// "non-recoverable error": the batch is dropped). Its own
    /// `prometheus_remote_storage_samples_failed_total` starts again at 0 whenever a
    /// reload recreates the write queue (a new username does), so a refusal before
    /// the last reload shows here only.
    pub fn refusals_logged(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("non-recoverable error") || l.contains("401 Unauthorized"))
            .count()
    }

    /// A metric's value from this server's own /metrics (summed over series).
    pub fn own_metric(&self, name: &str) -> f64 {
        let body = reqwest::blocking::get(format!("{}/metrics", self.url()))
            .unwrap()
            .text()
            .unwrap();
        body.lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l.as_bytes().get(name.len()) == Some(&b' ')
                        || l.as_bytes().get(name.len()) == Some(&b'{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Status of an authenticated GET.
pub fn get_status(url: &str, user: &str, pw: &str) -> u16 {
    reqwest::blocking::Client::new()
        .get(url)
        .basic_auth(user, Some(pw))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Runs an instant query with basic auth; returns the JSON `data.result`.
pub fn query(url: &str, user: &str, pw: &str, q: &str) -> Vec<serde_json::Value> {
    let r = reqwest::blocking::Client::new()
        .get(format!("{url}/api/v1/query"))
        .basic_auth(user, Some(pw))
        .query(&[("query", q)])
        .send()
        .unwrap();
    assert!(r.status().is_success(), "query {q}: {}", r.status());
    let v: serde_json::Value = r.json().unwrap();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Polls `f` until it returns true (bounded).
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub const READER_PW: &str = "reader-password-0123456789";
pub const INITIAL_PW: &str = "initial-writer-password-0123";

/// A receiver + agent pair wired the way the README describes, with rotd's schedule
/// `prom-remote-write` managing the agent's write credential.
pub struct PromSetup {
    pub receiver: Prom,
    pub agent: Option<Prom>,
    pub agent_port: u16,
    pub web_config: PathBuf,
    pub agent_dir: PathBuf,
    pub agent_config: PathBuf,
}

impl PromSetup {
    /// `grace` is the schedule's grace; `with_agent` starts the sender too.
    pub fn start(env: &TestEnv, grace: &str, with_agent: bool) -> PromSetup {
        let root = env.dir.path();
        let web_config = root.join("receiver-web.yml");
        std::fs::write(
            &web_config,
            format!(
                "# receiver authentication (managed in part by rotd)\nbasic_auth_users:\n  prom-reader: {}\n  writer-a: {}\n",
                bcrypt_hash(READER_PW),
                bcrypt_hash(INITIAL_PW)
            ),
        )
        .unwrap();
        let receiver = Prom::receiver(&root.join("receiver"), &web_config);
        receiver.wait_ready(Some(("prom-reader", READER_PW)));
        let agent_dir = root.join("agent");
        std::fs::create_dir_all(&agent_dir).unwrap();
        std::fs::write(agent_dir.join("writer-a.password"), INITIAL_PW).unwrap();
        let agent_port = free_port();
        let template = root.join("agent.yml.tmpl");
        std::fs::write(
            &template,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: agent\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\nremote_write:\n  - url: {}/api/v1/write\n    basic_auth:\n      username: {{{{username}}}}\n      password_file: {}/{{{{username}}}}.password\n    queue_config:\n      batch_send_deadline: 1s\n",
                receiver.url(),
                agent_dir.display()
            ),
        )
        .unwrap();
        let agent_config = agent_dir.join("prometheus.yml");
        let initial = std::fs::read_to_string(&template)
            .unwrap()
            .replace("{{username}}", "writer-a");
        std::fs::write(&agent_config, initial).unwrap();
        let agent = with_agent.then(|| {
            let a = Prom::agent(&root.join("agent-data"), &agent_config, agent_port);
            a.wait_ready(None);
            a
        });
        let o = env.rotd_stdin(
            &["import", "prom-reader", "--username", "prom-reader"],
            &format!("{READER_PW}\n"),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let o = env.rotd_stdin(
            &["import", "prom-remote-write", "--username", "writer-a"],
            &format!("{INITIAL_PW}\n"),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        env.write_schedule(
            "prom-remote-write",
            &format!(
                r#"name = "prom-remote-write"
schedule = "0 0 3 * * Sun"
grace = "{grace}"

[target]
kind = "prometheus-remote-write"
url = "{url}"
web_config = "{web}"
usernames = ["writer-a", "writer-b"]
query_credential = "prom-reader"
bcrypt_cost = 4

[[deliver]]
path = "{agent}/{{{{username}}}}.password"
content = "{{{{secret}}}}"
mode = "0640"

[[deliver]]
template = "{template}"
path = "{agent}/prometheus.yml"
mode = "0640"
reload = {{ http_post = "http://127.0.0.1:{agent_port}/-/reload" }}

[probe]
timeout = "5s"
attempts = 20
interval = "250ms"
"#,
                url = receiver.url(),
                web = web_config.display(),
                agent = agent_dir.display(),
                template = template.display(),
            ),
        );
        PromSetup {
            receiver,
            agent,
            agent_port,
            web_config,
            agent_dir,
            agent_config,
        }
    }

    pub fn write_status(&self, user: &str, pw: &str) -> u16 {
        // Any authenticated endpoint tells whether the credential is accepted.
        get_status(
            &format!("{}/api/v1/status/buildinfo", self.receiver.url()),
            user,
            pw,
        )
    }
}

/// utime + stime of a process, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit(')').next().unwrap();
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// A new age identity at `path`, made by the stock `age-keygen`; returns its public key.
pub fn age_keygen(path: &Path) -> String {
    let o = Command::new("age-keygen")
        .arg("-o")
        .arg(path)
        .output()
        .expect("age-keygen (apt-get install age)");
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stderr)
        .trim()
        .trim_start_matches("Public key: ")
        .to_owned()
}

/// `plaintext` encrypted (armored) by the stock `age` CLI; `recipients` are its
/// arguments (`-r AGE1…` or `-R FILE`).
pub fn age_encrypt(recipients: &[&std::ffi::OsStr], plaintext: &str) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("age")
        .arg("-a")
        .args(recipients)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("age (apt-get install age)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(plaintext.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    o.stdout
}

/// An OpenSSH ed25519 key (no passphrase) made by the stock `ssh-keygen`; returns its
/// public line.
pub fn ssh_keygen(path: &Path, comment: &str) -> String {
    let o = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read_to_string(format!("{}.pub", path.display()))
        .unwrap()
        .trim()
        .to_owned()
}

/// A `rotd agent` running in its loop mode (a separate process), its stderr in a log
/// file. Killed when dropped; [`RotdAgent::stop`] hands the log back for the leak check.
pub struct RotdAgent {
    pub child: Child,
    pub log: PathBuf,
}

impl RotdAgent {
    /// `rotd agent --config CONFIG` (no `--once`), logging at DEBUG into `log`.
    pub fn start(config: &Path, log: &Path) -> RotdAgent {
        let child = Command::new(rotd_bin())
            .arg("--config")
            .arg(config)
            .arg("agent")
            .env("ROTD_LOG", "debug")
            .env_remove("ROTD_FAULT_KILL_AFTER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        RotdAgent {
            child,
            log: log.to_owned(),
        }
    }

    /// Kills the agent (as a crash or a powered-off host would stop it) and records
    /// what it logged in `env`'s leak check.
    pub fn stop(mut self, env: &TestEnv) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        env.record_text(&std::fs::read_to_string(&self.log).unwrap_or_default());
    }
}

impl Drop for RotdAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
