//! Handing a credential to the programs that use it: `[[deliver]]` (DESIGN §3).
//!
//! Each spec renders a file from a template (placeholders `{{secret}}`, `{{username}}`,
//! `{{key_id}}`, `{{encoded}}`, `{{name}}`, `{{rotation_id}}`; in `path` only the
//! non-secret ones), writes it atomically with its mode, in order; then each distinct
//! reload runs once, in the order first named. Before writing, the previous contents
//! of every path are kept in memory ([`Snapshot`]: bytes, mode, owner and group,
//! zeroized on drop) so that a failed rotation can put back exactly what was there. A
//! crash loses the snapshot; recovery then renders the files again from the credential
//! recorded in the store (the templates are deterministic), see `rotation`.
//!
//! Deliver paths usually sit in directories the consumer owns, and some placeholder
//! values come from outside (a username, an Elasticsearch key id), so a path is
//! trusted only after [`render_path`] has checked it: every value put into a path is
//! one plain file-name part (no `/`, no `..`, no control character), and the result
//! is a normalised absolute path inside the directory the template names. What is at
//! the path must be a regular file or nothing: [`preflight`] checks every path before
//! the rotation touches the target, and `deliver` checks them all again before it
//! writes the first file (see `fsutil` for why links and special files are refused).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use zeroize::Zeroizing;

use crate::fsutil;
use crate::secret::Secret;

/// One `[[deliver]]` block, checked.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Path template (no secret placeholders).
    pub path: String,
    /// Body template (never a secret itself: it holds `{{secret}}`, not the value).
    pub body: String,
    pub mode: u32,
    pub reload: Option<Reload>,
}

/// How a consumer is told to re-read its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// POST to a URL (Prometheus `/-/reload`); any 2xx is success.
    HttpPost(String),
    /// Send a signal to the pid in a pidfile.
    Signal { signal: Signal, pidfile: PathBuf },
    /// Run a program; exit status 0 is success.
    Exec(Vec<String>),
}

impl std::fmt::Display for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reload::HttpPost(u) => write!(f, "POST {u}"),
            Reload::Signal { signal, pidfile } => {
                write!(f, "{signal} to pid in {}", pidfile.display())
            }
            Reload::Exec(argv) => write!(f, "exec {}", argv.join(" ")),
        }
    }
}

/// Delivery or reload failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    File(#[from] fsutil::Error),
    #[error("cannot create directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template uses {{{{{0}}}}} but this target has no {0}")]
    MissingValue(&'static str),
    #[error("deliver path {path:?} (from the template {template:?}) is refused: {reason}; rotd writes only inside the directory the template names. Fix the value where it came from (a username or key id recorded in the store, a peer's answer) or the template")]
    BadPath {
        template: String,
        path: String,
        reason: String,
    },
    #[error("reload `{reload}` failed: {reason}")]
    Reload { reload: String, reason: String },
}

const PLACEHOLDERS: &[&str] = &[
    "secret",
    "username",
    "key_id",
    "encoded",
    "name",
    "rotation_id",
];
const SECRET_PLACEHOLDERS: &[&str] = &["secret", "encoded"];

/// Checks that every `{{…}}` in a template is a known placeholder.
pub fn check_placeholders(template: &str) -> Result<(), String> {
    for name in placeholders(template) {
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{{{name}}}}}; the placeholders are {}",
                PLACEHOLDERS
                    .iter()
                    .map(|p| format!("{{{{{p}}}}}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    Ok(())
}

/// Checks a path template: known placeholders, and none that would put the secret in a
/// file name.
pub fn check_path_placeholders(template: &str) -> Result<(), String> {
    check_placeholders(template)?;
    if let Some(p) = placeholders(template).find(|p| SECRET_PLACEHOLDERS.contains(p)) {
        return Err(format!(
            "{{{{{p}}}}} may not appear in a path: file names are not secret"
        ));
    }
    Ok(())
}

fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(n, _)| n.trim())
}

/// Parses `HUP`, `SIGHUP`, `USR1`, … .
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let upper = s.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<Signal>()
        .map_err(|_| format!("signal = {s:?} is not a signal name; use e.g. \"HUP\" or \"USR1\""))
}

/// The values a template may use.
pub struct Vars<'a> {
    pub secret: &'a Secret,
    pub username: Option<&'a str>,
    pub key_id: Option<&'a str>,
    /// base64(key_id:secret), for Elasticsearch API keys.
    pub encoded: Option<&'a Secret>,
    pub name: &'a str,
    pub rotation_id: &'a str,
}

impl Vars<'_> {
    fn value(&self, placeholder: &str) -> Result<&str, Error> {
        Ok(match placeholder {
            "secret" => self.secret.expose(),
            "username" => self.username.ok_or(Error::MissingValue("username"))?,
            "key_id" => self.key_id.ok_or(Error::MissingValue("key_id"))?,
            "encoded" => self.encoded.ok_or(Error::MissingValue("encoded"))?.expose(),
            "name" => self.name,
            "rotation_id" => self.rotation_id,
            _ => "",
        })
    }
}

/// Replaces placeholders; the result may hold the secret, so it is zeroized on drop.
pub fn render(template: &str, vars: &Vars<'_>) -> Result<Zeroizing<String>, Error> {
    let mut out = Zeroizing::new(String::with_capacity(template.len() + 64));
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                out.push_str(vars.value(after[..end].trim())?);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Renders a path template and checks the result: each value put in is one plain
/// file-name part, and the path is absolute, normalised (no `.`, `..` or empty part)
/// and inside the directory the template names before its first placeholder.
pub fn render_path(template: &str, vars: &Vars<'_>) -> Result<PathBuf, Error> {
    let bad = |path: &str, reason: String| Error::BadPath {
        template: template.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = after[..end].trim();
        if SECRET_PLACEHOLDERS.contains(&name) {
            return Err(bad(
                template,
                format!("{{{{{name}}}}} may not appear in a path"),
            ));
        }
        let value = vars.value(name)?;
        if let Err(reason) = check_path_value(value) {
            return Err(bad(
                &format!("{out}{value}"),
                format!("the value of {{{{{name}}}}} {reason}"),
            ));
        }
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    check_rendered(template, &out).map_err(|reason| bad(&out, reason))?;
    Ok(PathBuf::from(out))
}

/// A value that goes into a path names one file (or part of a file name).
fn check_path_value(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        Err("is empty")
    } else if value == "." || value == ".." {
        Err("is `.` or `..`")
    } else if value.contains('/') {
        Err("holds a `/`")
    } else if value.chars().any(char::is_control) {
        Err("holds a control character (NUL, newline, …)")
    } else {
        Ok(())
    }
}

/// The checks on a whole rendered path (see [`render_path`]).
fn check_rendered(template: &str, path: &str) -> Result<(), String> {
    if path.chars().any(char::is_control) {
        return Err("it holds a control character (NUL, newline, …)".into());
    }
    let Some(rel) = path.strip_prefix('/') else {
        return Err("it is not absolute".into());
    };
    if let Some(part) = rel
        .split('/')
        .find(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err(format!(
            "it is not normalised (it has a {} part)",
            if part.is_empty() {
                "`//` or trailing `/`".to_owned()
            } else {
                format!("`{part}`")
            }
        ));
    }
    let fixed = &template[..template.find("{{").unwrap_or(template.len())];
    let base = &fixed[..fixed.rfind('/').map_or(0, |i| i + 1)];
    if !path.starts_with(base) || path.len() == base.len() {
        return Err(format!("it is not a file inside {base}"));
    }
    Ok(())
}

/// The paths a set of specs renders to for these values.
pub fn paths(specs: &[Spec], vars: &Vars<'_>) -> Result<Vec<PathBuf>, Error> {
    specs.iter().map(|s| render_path(&s.path, vars)).collect()
}

/// Checks every deliver path before anything is changed: each renders to a checked
/// path (see [`render_path`]) where there is a regular file or nothing. A path that
/// needs a value not known yet (`{{key_id}}` before the target made the key) is left
/// to [`deliver`], which checks every path again before it writes the first one.
pub fn preflight(specs: &[Spec], vars: &Vars<'_>) -> Result<(), Error> {
    for spec in specs {
        let path = match render_path(&spec.path, vars) {
            Ok(p) => p,
            Err(Error::MissingValue(_)) => continue,
            Err(e) => return Err(e),
        };
        fsutil::check_regular(&path)?;
    }
    Ok(())
}

/// What a path held before (None: nothing).
type Previous = Option<fsutil::Existing>;

/// What the delivered paths held before, to put it back on rollback.
#[derive(Default)]
pub struct Snapshot {
    files: Vec<(PathBuf, Previous)>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field(
                "paths",
                &self.files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Writes every file (snapshotting what was there), then runs the reloads.
/// On a write error the files already written are restored before returning.
pub async fn deliver(specs: &[Spec], vars: &Vars<'_>) -> Result<Snapshot, (Error, Snapshot)> {
    let mut snap = Snapshot::default();
    // Every path is checked before the first is written.
    if let Err(e) = preflight_all(specs, vars) {
        return Err((e, snap));
    }
    for spec in specs {
        if let Err(e) = write_one(spec, vars, &mut snap) {
            return Err((e, snap));
        }
    }
    if let Err(e) = run_reloads(specs).await {
        return Err((e, snap));
    }
    Ok(snap)
}

/// [`preflight`] with every value known: a missing one is an error here.
fn preflight_all(specs: &[Spec], vars: &Vars<'_>) -> Result<(), Error> {
    for spec in specs {
        render(&spec.body, vars)?;
        fsutil::check_regular(&render_path(&spec.path, vars)?)?;
    }
    Ok(())
}

fn write_one(spec: &Spec, vars: &Vars<'_>, snap: &mut Snapshot) -> Result<(), Error> {
    let path = render_path(&spec.path, vars)?;
    let body = render(&spec.body, vars)?;
    if !snap.files.iter().any(|(p, _)| p == &path) {
        let before = fsutil::snapshot(&path, fsutil::MAX_FILE)?;
        snap.files.push((path.clone(), before));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    fsutil::write_atomic(&path, body.as_bytes(), spec.mode)?;
    Ok(())
}

/// Puts every snapshotted path back as it was (removing files that did not exist),
/// then runs the reloads so consumers re-read them.
pub async fn restore(specs: &[Spec], snap: Snapshot) -> Result<(), Error> {
    for (path, before) in &snap.files {
        match before {
            Some(e) => fsutil::write_atomic_owned(path, &e.bytes, e.mode, Some((e.uid, e.gid)))?,
            None => fsutil::remove_durable(path)?,
        }
    }
    run_reloads(specs).await
}

/// Runs each distinct reload once, in the order first named.
pub async fn run_reloads(specs: &[Spec]) -> Result<(), Error> {
    let mut done = BTreeSet::new();
    for r in specs.iter().filter_map(|s| s.reload.as_ref()) {
        let key = r.to_string();
        if done.insert(key) {
            reload(r).await?;
        }
    }
    Ok(())
}

/// Bound of one reload. A Prometheus reload that changes `remote_write` waits for the
/// old queue to flush, up to its `--storage.remote.flush-deadline` (1 min by default),
/// so this must be longer than that.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(150);

async fn reload(r: &Reload) -> Result<(), Error> {
    let fail = |reason: String| Error::Reload {
        reload: r.to_string(),
        reason,
    };
    tracing::debug!(reload = %r, "reloading consumer");
    match r {
        Reload::HttpPost(url) => {
            let client = crate::http::client(url, RELOAD_TIMEOUT).map_err(fail)?;
            let resp = client
                .post(url)
                .send()
                .await
                .map_err(|e| fail(crate::http::describe(&e)))?;
            if let Some(refused) = crate::http::redirect_refused(&resp) {
                return Err(fail(refused));
            }
            let status = resp.status();
            if !status.is_success() {
                let body = crate::http::read_body(resp).await.unwrap_or_default();
                let body = String::from_utf8_lossy(&body);
                // The answer may echo the credential just delivered: scrubbed, then cut.
                return Err(fail(format!(
                    "HTTP {status}: {}",
                    crate::redact::peer_text(&body, PEER_TEXT_MAX)
                )));
            }
            Ok(())
        }
        Reload::Signal { signal, pidfile } => {
            let text = fsutil::read_text(pidfile, fsutil::MAX_PIDFILE)
                .map_err(|e| fail(format!("cannot read the pidfile: {e}")))?;
            let pid: i32 = text
                .trim()
                .parse()
                .map_err(|_| fail(format!("pidfile {} holds no pid", pidfile.display())))?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), *signal)
                .map_err(|e| fail(format!("kill({pid}): {e}")))
        }
        Reload::Exec(argv) => {
            let mut cmd = tokio::process::Command::new(&argv[0]);
            cmd.args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let out = tokio::time::timeout(RELOAD_TIMEOUT, cmd.output())
                .await
                .map_err(|_| fail(format!("did not finish within {RELOAD_TIMEOUT:?}")))?
                .map_err(|e| fail(e.to_string()))?;
            if !out.status.success() {
                return Err(fail(format!(
                    "{}: {}",
                    out.status,
                    crate::redact::peer_text(&String::from_utf8_lossy(&out.stderr), PEER_TEXT_MAX)
                )));
            }
            Ok(())
        }
    }
}

/// The most of a consumer's answer (or a reload program's stderr) quoted in an error,
/// after it is scrubbed of credentials ([`crate::redact::peer_text`]).
const PEER_TEXT_MAX: usize = 300;

/// Expands a path template with non-secret values only (for plans and status).
pub fn display_path(template: &str, username: Option<&str>, name: &str) -> String {
    template
        .replace("{{username}}", username.unwrap_or("{{username}}"))
        .replace("{{name}}", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(s: &Secret) -> Vars<'_> {
        Vars {
            secret: s,
            username: Some("writer-b"),
            key_id: None,
            encoded: None,
            name: "n",
            rotation_id: "r1",
        }
    }

    #[test]
    fn renders_placeholders() {
        let s = Secret::new("pw".into());
        let out = render(
            "u={{username}} p={{ secret }} id={{rotation_id}}",
            &vars(&s),
        )
        .unwrap();
        assert_eq!(out.as_str(), "u=writer-b p=pw id=r1");
        assert!(matches!(
            render("{{key_id}}", &vars(&s)),
            Err(Error::MissingValue("key_id"))
        ));
    }

    #[test]
    fn placeholder_checks() {
        check_placeholders("{{secret}} {{username}}").unwrap();
        assert!(check_placeholders("{{pasword}}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(check_path_placeholders("/x/{{secret}}").is_err());
        check_path_placeholders("/x/{{username}}.password").unwrap();
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("HUP").unwrap(), Signal::SIGHUP);
        assert_eq!(parse_signal("sigusr1").unwrap(), Signal::SIGUSR1);
        assert!(parse_signal("NOPE").is_err());
    }

    #[tokio::test]
    async fn restore_puts_back_bytes_and_removes_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "old").unwrap();
        let specs = vec![
            Spec {
                path: a.display().to_string(),
                body: "new {{secret}}".into(),
                mode: 0o600,
                reload: None,
            },
            Spec {
                path: dir.path().join("{{username}}.pw").display().to_string(),
                body: "{{secret}}".into(),
                mode: 0o600,
                reload: None,
            },
        ];
        let s = Secret::new("pw".into());
        let snap = deliver(&specs, &vars(&s)).await.unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "new pw");
        assert!(dir.path().join("writer-b.pw").exists());
        restore(&specs, snap).await.unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old");
        assert!(!dir.path().join("writer-b.pw").exists());
    }

    #[test]
    fn dotdot_value_rendered_into_a_path_is_refused() {
        let s = Secret::new("pw".into());
        let mut v = vars(&s);
        let ok = render_path("/etc/agent/{{username}}.password", &v).unwrap();
        assert_eq!(ok, PathBuf::from("/etc/agent/writer-b.password"));
        for (value, why) in [
            ("../../x", "holds a `/`"),
            ("..", "is `.` or `..`"),
            ("a\nb", "control character"),
            ("a\0b", "control character"),
            ("", "is empty"),
        ] {
            v.username = Some(value);
            let e = render_path("/etc/agent/{{username}}.password", &v)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(why) && e.contains("/etc/agent/"),
                "{value:?}: {e}"
            );
        }
        // A key id from a peer, the same way.
        v.key_id = Some("../../../../x");
        assert!(render_path("/etc/app/{{key_id}}.key", &v).is_err());
        // The template itself must be normalised and stay in its directory.
        v.username = Some("writer-b");
        for t in [
            "/etc/agent/../x/{{username}}",
            "/etc//agent/{{username}}",
            "/etc/agent/./{{username}}",
            "etc/agent/{{username}}",
            "/etc/agent/{{username}}/",
        ] {
            assert!(render_path(t, &v).is_err(), "{t}");
        }
        assert_eq!(
            render_path("/etc/{{name}}/{{username}}.pw", &v).unwrap(),
            PathBuf::from("/etc/n/writer-b.pw")
        );
    }

    #[tokio::test]
    async fn nothing_is_written_when_a_later_path_is_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "old").unwrap();
        let private = dir.path().join("private");
        std::fs::write(&private, "TOP-SECRET").unwrap();
        let link = dir.path().join("b");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        let specs: Vec<Spec> = [&a, &link]
            .iter()
            .map(|p| Spec {
                path: p.display().to_string(),
                body: "{{secret}}".into(),
                mode: 0o600,
                reload: None,
            })
            .collect();
        let s = Secret::new("pw".into());
        let e = preflight(&specs, &vars(&s)).unwrap_err().to_string();
        assert!(
            e.contains("symbolic link") && e.contains(&link.display().to_string()),
            "{e}"
        );
        let Err((e, snap)) = deliver(&specs, &vars(&s)).await else {
            panic!("delivered through a link");
        };
        assert!(e.to_string().contains("symbolic link"));
        restore(&specs, snap).await.unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "old");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&private).unwrap(), "TOP-SECRET");
    }
}
