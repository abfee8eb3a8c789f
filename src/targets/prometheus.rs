//! `prometheus-remote-write` target: a Prometheus remote-write receiver guarded by an
//! exporter-toolkit web config (`basic_auth_users`, bcrypt), rotated with ALTERNATING
//! users.
//!
//! Why alternating users: the receiver re-reads its web config on every request, and
//! the sending Prometheus re-reads a `password_file` on every request but its
//! `username` only at a config reload — and it DROPS a batch answered 401. So the new
//! password goes to the idle user (`plan`/`apply`), the consumers' per-user password
//! file and config are delivered and the agent reloaded onto that user, the probe
//! proves it, and only after the grace is the old user removed (`retire`).
//!
//! The web config is edited in place, line by line, so the operator's comments and
//! layout survive; the edit is checked by parsing the result, and falls back to a
//! full re-serialization for layouts the line edit does not handle. An empty
//! `basic_auth_users` would switch authentication OFF in Prometheus: no code path here
//! writes one (see [`WebConfig::render`]).
//!
//! The probe pushes one remote-write 1.0 sample (protobuf, snappy block format) with a
//! unique `rotation_id` label using the NEW credential, then finds it with an instant
//! query (`/api/v1/query`) using the query credential. The answer is read by the pure
//! [`query_found`], which the `prom_query` fuzz target (`fuzz/`) feeds arbitrary bytes.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use serde_yaml::{Mapping, Value};
use toml::Spanned;

use super::{client, http_error, Error, Plan, ProbeContext, ProbeReport, Undo};
use crate::fsutil;
use crate::store::record::key;
use crate::store::Record;
use crate::syntax::Reporter;

pub const KIND: &str = "prometheus-remote-write";

#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL of the receiver, e.g. `http://127.0.0.1:9090`.
    pub url: String,
    pub web_config: PathBuf,
    /// The two users that take turns.
    pub usernames: [String; 2],
    /// Secret in the store used to query the receiver; None = the new credential.
    pub query_credential: Option<String>,
    pub bcrypt_cost: u32,
}

/// `[target]` of kind `prometheus-remote-write`, as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Raw {
    #[allow(dead_code)] // read by `targets::RawHead`
    kind: String,
    url: Option<Spanned<String>>,
    web_config: Option<Spanned<std::path::PathBuf>>,
    usernames: Option<Spanned<Vec<String>>>,
    query_credential: Option<Spanned<String>>,
    bcrypt_cost: Option<Spanned<u32>>,
}

impl Config {
    pub(crate) fn from_raw(raw: &Spanned<Raw>, rep: &mut Reporter<'_>) -> Option<Config> {
        let t = raw.get_ref();
        let url = match t.url.as_ref() {
            Some(u)
                if u.get_ref().starts_with("http://") || u.get_ref().starts_with("https://") =>
            {
                u.get_ref().trim_end_matches('/').to_owned()
            }
            Some(u) => {
                rep.at(
                    u,
                    format!(
                        "target.url = {:?} must start with http:// or https://",
                        u.get_ref()
                    ),
                );
                return None;
            }
            None => {
                rep.at(raw, "target.url is required for prometheus-remote-write: the receiver's base URL, e.g. \"http://127.0.0.1:9090\"");
                return None;
            }
        };
        let web_config = match t.web_config.as_ref() {
            Some(w) => {
                let p = rep.resolve(w.get_ref());
                if !p.exists() {
                    rep.at(w, format!("target.web_config {} does not exist; create the receiver's web config with at least one basic_auth_users entry", p.display()));
                } else if let Err(e) = WebConfig::load(&p) {
                    rep.at(w, e.to_string());
                }
                p
            }
            None => {
                rep.at(
                    raw,
                    "target.web_config is required: the path of the receiver's --web.config.file",
                );
                return None;
            }
        };
        let usernames = match t.usernames.as_ref() {
            Some(u)
                if u.get_ref().len() == 2
                    && u.get_ref()[0] != u.get_ref()[1]
                    && u.get_ref().iter().all(|n| valid_user(n)) =>
            {
                [u.get_ref()[0].clone(), u.get_ref()[1].clone()]
            }
            Some(u) => {
                rep.at(u, "target.usernames must be two different user names (letters, digits, '-', '_', '.'), e.g. [\"writer-a\", \"writer-b\"]");
                return None;
            }
            None => {
                rep.at(raw, "target.usernames is required: two users that take turns, e.g. [\"writer-a\", \"writer-b\"]");
                return None;
            }
        };
        let bcrypt_cost = match t.bcrypt_cost.as_ref() {
            None => bcrypt::DEFAULT_COST,
            Some(c) if (4..=16).contains(c.get_ref()) => *c.get_ref(),
            Some(c) => {
                rep.at(c, "target.bcrypt_cost must be 4 to 16 (default 12)");
                return None;
            }
        };
        Some(Config {
            url,
            web_config,
            usernames,
            query_credential: t.query_credential.as_ref().map(|q| q.get_ref().clone()),
            bcrypt_cost,
        })
    }

    /// The idle user gets the new password; the current one is retired after grace.
    pub fn plan(&self, current: Option<&Record>) -> Result<Plan, Error> {
        let cur_user = current.and_then(|r| r.username());
        let new_user = match cur_user {
            Some(u) if u == self.usernames[0] => &self.usernames[1],
            _ => &self.usernames[0],
        };
        let wc = WebConfig::load(&self.web_config)?;
        if let Some(q) = &self.query_credential {
            if q == new_user {
                return Err(Error::Plan(format!(
                    "query credential user {q} is one of the rotated users"
                )));
            }
        }
        let restore = wc
            .users
            .get(new_user.as_str())
            .and_then(|v| v.as_str())
            .unwrap_or("none")
            .to_owned();
        Ok(Plan {
            username: Some(new_user.clone()),
            retire_username: cur_user.map(str::to_owned),
            retire_key_id: None,
            meta: vec![(key::RESTORE_HASH.to_owned(), restore)],
        })
    }

    /// Sets the idle user's hash; the current user's entry is untouched.
    pub fn apply(&self, new: &Record) -> Result<Undo, Error> {
        let user = new
            .username()
            .ok_or_else(|| Error::Plan("the new credential has no username".into()))?;
        let hash = bcrypt::hash(new.secret.expose(), self.bcrypt_cost)
            .map_err(|e| Error::Hash(e.to_string()))?;
        let before = read_web(&self.web_config)?;
        let mut wc = WebConfig::parse(&before, &self.web_config)?;
        wc.set(user, Some(&hash));
        let after = wc.render(&self.web_config)?;
        write_like(&self.web_config, &after)?;
        tracing::info!(user, path = %self.web_config.display(), "new credential installed in the web config");
        Ok(Undo {
            before: Some(before),
            after: Some(after),
            record: None,
        })
    }

    pub fn rollback(&self, pending: &Record, undo: Option<&Undo>) -> Result<(), Error> {
        let now = read_web(&self.web_config)?;
        if let Some(Undo {
            before: Some(before),
            after: Some(after),
            ..
        }) = undo
        {
            if &now == after {
                return write_like(&self.web_config, before);
            }
        }
        let Some(user) = pending.username() else {
            return Ok(());
        };
        let mut wc = WebConfig::parse(&now, &self.web_config)?;
        let restore = pending.get(key::RESTORE_HASH).filter(|h| *h != "none");
        let current = wc
            .users
            .get(user)
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        if current.as_deref() == restore {
            return Ok(()); // apply never happened, or was already undone
        }
        wc.set(user, restore);
        let out = wc.render(&self.web_config)?;
        write_like(&self.web_config, &out)
    }

    /// Removes the retired user's entry (never the current user's).
    pub fn retire(&self, current: &Record) -> Result<Option<String>, Error> {
        let Some(old) = current.get(key::RETIRE_USERNAME) else {
            return Ok(None);
        };
        if Some(old) == current.username() {
            return Ok(None);
        }
        let now = read_web(&self.web_config)?;
        let mut wc = WebConfig::parse(&now, &self.web_config)?;
        if !wc.users.contains_key(old) {
            return Ok(Some(format!("user={old} (already absent)")));
        }
        wc.set(old, None);
        let out = wc.render(&self.web_config)?;
        write_like(&self.web_config, &out)?;
        tracing::info!(user = old, "old credential removed from the web config");
        Ok(Some(format!("user={old}")))
    }

    pub async fn probe(&self, new: &Record, ctx: &ProbeContext<'_>) -> Result<ProbeReport, Error> {
        let started = Instant::now();
        let user = new
            .username()
            .ok_or_else(|| Error::Probe("the new credential has no username".into()))?;
        let client = client(ctx.probe.timeout)?;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let body = write_request(ctx.name, ctx.rotation_id, now_ms);
        let write_url = format!("{}/api/v1/write", self.url);
        let mut last = String::new();
        let mut pushed = false;
        for attempt in 1..=ctx.probe.attempts {
            let resp = client
                .post(&write_url)
                .basic_auth(user, Some(new.secret.expose()))
                .header("Content-Encoding", "snappy")
                .header("Content-Type", "application/x-protobuf")
                .header("User-Agent", concat!("rotd/", env!("CARGO_PKG_VERSION")))
                .header("X-Prometheus-Remote-Write-Version", "0.1.0")
                .body(body.clone())
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() => {
                    pushed = true;
                    break;
                }
                Ok(r) => {
                    last = match crate::http::redirect_refused(&r) {
                        Some(why) => format!("remote write to {write_url} {why}"),
                        None => format!(
                            "remote write to {write_url} answered HTTP {}",
                            r.status().as_u16()
                        ),
                    }
                }
                Err(e) => last = format!("remote write to {write_url}: {}", http_error(&e)),
            }
            tracing::debug!(attempt, reason = %last, "remote-write probe attempt failed");
            if attempt < ctx.probe.attempts {
                tokio::time::sleep(ctx.probe.interval).await;
            }
        }
        if !pushed {
            return Err(Error::Probe(format!(
                "after {} attempts: {last}",
                ctx.probe.attempts
            )));
        }
        let query_cred = match &self.query_credential {
            Some(q) => (ctx.lookup)(q)?.ok_or_else(|| {
                Error::Probe(format!("query credential {q} is not in the store; run `rotd import {q} --username USER`"))
            })?,
            None => new.clone(),
        };
        let query_user = query_cred.username().unwrap_or(user).to_owned();
        let query = format!("rotd_probe{{rotation_id=\"{}\"}}", ctx.rotation_id);
        let query_url = format!("{}/api/v1/query", self.url);
        for attempt in 1..=ctx.probe.attempts {
            let resp = client
                .get(&query_url)
                .basic_auth(&query_user, Some(query_cred.secret.expose()))
                .query(&[
                    ("query", query.as_str()),
                    ("time", &format!("{:.3}", now_ms as f64 / 1000.0)),
                ])
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() => {
                    match super::read_body(r).await.map(|b| query_found(&b)) {
                        Ok(Ok(true)) => {
                            return Ok(ProbeReport {
                                elapsed: started.elapsed(),
                                detail: "sample written and queried back".into(),
                            })
                        }
                        Ok(Ok(false)) => {
                            last = format!("the probe sample is not (yet) visible in {query_url}")
                        }
                        // The parser's words may quote the peer's body: scrubbed and cut.
                        Ok(Err(e)) | Err(e) => {
                            last = format!(
                                "query answer is not Prometheus JSON: {}",
                                crate::redact::peer_text(&e.to_string(), 300)
                            )
                        }
                    }
                }
                Ok(r) => {
                    last = match crate::http::redirect_refused(&r) {
                        Some(why) => format!("query {query_url} {why}"),
                        None => format!(
                        "query {query_url} answered HTTP {} (query credential user {query_user})",
                        r.status().as_u16()
                    ),
                    }
                }
                Err(e) => last = format!("query {query_url}: {}", http_error(&e)),
            }
            tracing::debug!(attempt, reason = %last, "query probe attempt failed");
            if attempt < ctx.probe.attempts {
                tokio::time::sleep(ctx.probe.interval).await;
            }
        }
        Err(Error::Probe(format!(
            "after {} attempts: {last}",
            ctx.probe.attempts
        )))
    }
}

fn valid_user(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Writes a web config keeping the file's current mode, owner and group (Prometheus
/// often reads it as another user, through its group).
fn write_like(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mode = fsutil::mode_or(path, 0o640)?;
    fsutil::write_atomic(path, bytes, mode)?;
    Ok(())
}

/// Reads the web config: a regular file (never through a link), size-bounded.
fn read_web(path: &Path) -> Result<Vec<u8>, Error> {
    Ok(fsutil::read_capped(path, fsutil::MAX_WEB_CONFIG)?)
}

/// Deepest nesting (block indentation levels, `- ` sequences and `[`/`{` flow
/// collections together) a web config may have; a real one has four or five.
const MAX_NESTING: usize = 64;

/// Refuses text nested deeper than [`MAX_NESTING`] before the YAML parser sees it:
/// the parser's time grows much faster than the input with the nesting (a 64 KiB file
/// of `[` takes seconds). An over-estimate is harmless, as real configs are shallow.
fn check_nesting(text: &str) -> Result<(), String> {
    let too_deep = || {
        format!("is nested deeper than {MAX_NESTING} levels, which no Prometheus web config needs; refusing to parse it")
    };
    let mut flow = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    for line in text.lines() {
        let content = line.trim_start();
        let indent = line.len() - content.len();
        if flow == 0 && !(content.is_empty() || content.starts_with('#')) {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
            let mut rest = content;
            let mut dashes = 0;
            while let Some(r) = rest.strip_prefix('-') {
                if !(r.is_empty() || r.starts_with([' ', '\t'])) {
                    break;
                }
                dashes += 1;
                rest = r.trim_start();
            }
            if indents.len() + dashes > MAX_NESTING {
                return Err(too_deep());
            }
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        let mut escaped = false;
        for c in line.chars() {
            match quote {
                Some('"') if escaped => escaped = false,
                Some('"') if c == '\\' => escaped = true,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    // A quote opens a string only where a scalar starts.
                    '"' | '\'' if " \t[{,:".contains(prev) => quote = Some(c),
                    '#' if prev == ' ' || prev == '\t' => break,
                    '[' | '{' => {
                        flow += 1;
                        if flow + indents.len() > MAX_NESTING {
                            return Err(too_deep());
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            prev = c;
        }
    }
    Ok(())
}

/// Reads the answer of the probe's instant query (`/api/v1/query`, a 2xx body):
/// `Ok(true)` when it is a success holding at least one series (the probe sample is
/// visible), `Ok(false)` when it is Prometheus JSON without one (an error status, an
/// empty vector: not yet visible). `Err` when the body is not Prometheus JSON; the
/// message reads as `http_error` words a body that cannot be decoded.
///
/// Pure, so that `fuzz/fuzz_targets/prom_query.rs` can feed it arbitrary bytes.
pub fn query_found(body: &[u8]) -> Result<bool, String> {
    match serde_json::from_slice::<QueryResponse>(body) {
        Ok(q) => Ok(q.status == "success" && !q.data.result.is_empty()),
        Err(e) => Err(format!("response could not be decoded: {e}")),
    }
}

#[derive(serde::Deserialize)]
struct QueryResponse {
    status: String,
    data: QueryData,
}

#[derive(serde::Deserialize)]
struct QueryData {
    #[serde(default)]
    result: Vec<serde_json::Value>,
}

/// An exporter-toolkit web config: its text and its parsed `basic_auth_users`.
pub struct WebConfig {
    text: String,
    /// Keys that exporter-toolkit knows; anything else is refused.
    doc: Mapping,
    pub users: Mapping,
}

const WEB_CONFIG_KEYS: &[&str] = &[
    "tls_server_config",
    "http_server_config",
    "basic_auth_users",
];

impl WebConfig {
    pub fn load(path: &Path) -> Result<WebConfig, Error> {
        let bytes = read_web(path)?;
        WebConfig::parse(&bytes, path)
    }

    pub fn parse(bytes: &[u8], path: &Path) -> Result<WebConfig, Error> {
        let bad = |reason: String| Error::WebConfig {
            path: path.display().to_string(),
            reason,
        };
        if bytes.len() as u64 > fsutil::MAX_WEB_CONFIG {
            return Err(bad(format!(
                "is larger than {} bytes, which no Prometheus web config needs",
                fsutil::MAX_WEB_CONFIG
            )));
        }
        let text = String::from_utf8(bytes.to_vec()).map_err(|_| bad("is not UTF-8".into()))?;
        check_nesting(&text).map_err(bad)?;
        let doc: Value = if text.trim().is_empty() {
            Value::Mapping(Mapping::new())
        } else {
            serde_yaml::from_str(&text).map_err(|e| bad(format!("is not valid YAML: {e}")))?
        };
        let doc = match doc {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => return Err(bad("is not a YAML mapping".into())),
        };
        for k in doc.keys() {
            let name = k.as_str().unwrap_or("?");
            if !WEB_CONFIG_KEYS.contains(&name) {
                return Err(bad(format!(
                    "has key `{name}`, which the Prometheus web config does not know (Prometheus would refuse it); keep only {}",
                    WEB_CONFIG_KEYS.join(", ")
                )));
            }
        }
        let users = match doc.get("basic_auth_users") {
            None | Some(Value::Null) => Mapping::new(),
            Some(Value::Mapping(m)) => m.clone(),
            Some(_) => {
                return Err(bad(
                    "basic_auth_users is not a mapping of user: bcrypt-hash".into(),
                ))
            }
        };
        for (u, h) in &users {
            let (Some(u), Some(h)) = (u.as_str(), h.as_str()) else {
                return Err(bad(
                    "basic_auth_users must map user names to bcrypt hashes (strings)".into(),
                ));
            };
            if !h.starts_with("$2") {
                return Err(bad(format!("the hash of user {u} is not a bcrypt hash ($2a$/$2b$/$2y$); generate one with `htpasswd -nBC 10 {u}`")));
            }
        }
        Ok(WebConfig { text, doc, users })
    }

    /// Sets (Some) or removes (None) a user's hash.
    pub fn set(&mut self, user: &str, hash: Option<&str>) {
        match hash {
            Some(h) => {
                self.users.insert(Value::from(user), Value::from(h));
            }
            None => {
                self.users.remove(user);
            }
        }
    }

    /// The file's new text: a line edit of the original where possible, checked by
    /// parsing it back; otherwise a full re-serialization. Refuses to produce a config
    /// without users, which would turn authentication off.
    pub fn render(&self, path: &Path) -> Result<Vec<u8>, Error> {
        if self.users.is_empty() {
            return Err(Error::WebConfig {
                path: path.display().to_string(),
                reason: "the edit would leave basic_auth_users empty, which turns authentication OFF in Prometheus; refusing to write it".into(),
            });
        }
        if let Some(text) = self.line_edit() {
            if let Ok(check) = WebConfig::parse(text.as_bytes(), path) {
                if check.users == self.users {
                    return Ok(text.into_bytes());
                }
            }
        }
        let mut doc = self.doc.clone();
        doc.insert(
            Value::from("basic_auth_users"),
            Value::Mapping(self.users.clone()),
        );
        let text = serde_yaml::to_string(&doc).map_err(|e| Error::WebConfig {
            path: path.display().to_string(),
            reason: format!("cannot serialize: {e}"),
        })?;
        Ok(text.into_bytes())
    }

    /// Rewrites the `basic_auth_users:` block of the original text, keeping every
    /// other line. None when the block is not in plain block-mapping form.
    fn line_edit(&self) -> Option<String> {
        let lines: Vec<&str> = self.text.lines().collect();
        let header = lines.iter().position(|l| {
            let t = l.split('#').next().unwrap_or("").trim_end();
            t == "basic_auth_users:"
        });
        let mut out: Vec<String> = Vec::new();
        let entry = |indent: &str, u: &str, h: &str| format!("{indent}{u}: \"{h}\"");
        match header {
            None => {
                if self.doc.contains_key("basic_auth_users") {
                    return None; // e.g. `basic_auth_users: {}`
                }
                out.extend(lines.iter().map(|l| l.to_string()));
                out.push("basic_auth_users:".into());
                for (u, h) in &self.users {
                    out.push(entry("  ", u.as_str()?, h.as_str()?));
                }
            }
            Some(h) => {
                let mut end = h + 1;
                let mut indent = "  ".to_string();
                let mut block: Vec<(usize, String)> = Vec::new();
                while end < lines.len() {
                    let l = lines[end];
                    if l.trim().is_empty() || l.trim_start().starts_with('#') {
                        end += 1;
                        continue;
                    }
                    if !l.starts_with(' ') {
                        break;
                    }
                    indent = l[..l.len() - l.trim_start().len()].to_string();
                    let key = l
                        .trim()
                        .split(':')
                        .next()?
                        .trim()
                        .trim_matches(|c| c == '"' || c == '\'')
                        .to_string();
                    block.push((end, key));
                    end += 1;
                }
                let mut written = std::collections::BTreeSet::new();
                out.extend(lines[..=h].iter().map(|l| l.to_string()));
                for (i, l) in lines.iter().enumerate().take(end).skip(h + 1) {
                    match block.iter().find(|(n, _)| *n == i) {
                        None => out.push(l.to_string()),
                        Some((_, user)) => {
                            if let Some(hash) =
                                self.users.get(user.as_str()).and_then(|v| v.as_str())
                            {
                                if written.insert(user.clone()) {
                                    let value = l.split_once(':').map(|x| x.1).unwrap_or("");
                                    // A comment after the value stays with the line,
                                    // changed or not.
                                    let (value, comment) = match value.find(" #") {
                                        Some(i) => value.split_at(i),
                                        None => (value, ""),
                                    };
                                    let original_hash =
                                        value.trim().trim_matches(|c| c == '"' || c == '\'');
                                    // Unchanged (as YAML reads the original, or as
                                    // text): the line stays byte for byte.
                                    let was = self
                                        .doc
                                        .get("basic_auth_users")
                                        .and_then(|m| m.get(user.as_str()))
                                        .and_then(|v| v.as_str());
                                    if was == Some(hash) || original_hash == hash {
                                        out.push(l.to_string());
                                    } else {
                                        out.push(format!(
                                            "{}{comment}",
                                            entry(&indent, user, hash)
                                        ));
                                    }
                                }
                            }
                        }
                    }
                }
                // New users go right after the last existing entry of the block.
                let insert_at = block
                    .last()
                    .map(|(n, _)| out.len() - (end - 1 - n))
                    .unwrap_or(h + 1);
                let mut new_lines = Vec::new();
                for (u, hsh) in &self.users {
                    let u = u.as_str()?;
                    if !written.contains(u) {
                        new_lines.push(entry(&indent, u, hsh.as_str()?));
                    }
                }
                for (k, l) in new_lines.into_iter().enumerate() {
                    out.insert(insert_at + k, l);
                }
                out.extend(lines[end..].iter().map(|l| l.to_string()));
            }
        }
        let mut s = out.join("\n");
        s.push('\n');
        Some(s)
    }
}

/// Remote-write 1.0 protobuf messages (prometheus/prompb types.proto, remote.proto).
mod prompb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteRequest {
        #[prost(message, repeated, tag = "1")]
        pub timeseries: Vec<TimeSeries>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TimeSeries {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<Label>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<Sample>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(double, tag = "1")]
        pub value: f64,
        #[prost(int64, tag = "2")]
        pub timestamp: i64,
    }
}

/// One `rotd_probe{secret, rotation_id}` sample, protobuf + snappy block format.
pub fn write_request(secret_name: &str, rotation_id: &str, timestamp_ms: i64) -> Vec<u8> {
    let label = |n: &str, v: &str| prompb::Label {
        name: n.into(),
        value: v.into(),
    };
    // Labels sorted by name, as the protocol requires.
    let req = prompb::WriteRequest {
        timeseries: vec![prompb::TimeSeries {
            labels: vec![
                label("__name__", "rotd_probe"),
                label("rotation_id", rotation_id),
                label("secret", secret_name),
            ],
            samples: vec![prompb::Sample {
                value: 1.0,
                timestamp: timestamp_ms,
            }],
        }],
    };
    let raw = req.encode_to_vec();
    snap::raw::Encoder::new()
        .compress_vec(&raw)
        .expect("snappy block compression of a small in-memory buffer cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "# receiver auth\ntls_server_config: {}\nbasic_auth_users:\n  # reader for queries\n  prom-reader: \"$2y$10$abc\"\n  writer-a: $2y$10$def\n";

    fn p() -> PathBuf {
        PathBuf::from("/x/web.yml")
    }

    #[test]
    fn line_edit_keeps_comments_and_other_users() {
        let mut wc = WebConfig::parse(WEB.as_bytes(), &p()).unwrap();
        wc.set("writer-b", Some("$2b$04$new"));
        let out = String::from_utf8(wc.render(&p()).unwrap()).unwrap();
        assert!(out.starts_with("# receiver auth\ntls_server_config: {}\nbasic_auth_users:\n  # reader for queries\n  prom-reader: \"$2y$10$abc\"\n  writer-a: $2y$10$def\n"), "{out}");
        assert!(out.contains("  writer-b: \"$2b$04$new\"\n"));
        let mut wc = WebConfig::parse(out.as_bytes(), &p()).unwrap();
        wc.set("writer-a", None);
        let out = String::from_utf8(wc.render(&p()).unwrap()).unwrap();
        assert!(!out.contains("writer-a"));
        assert!(out.contains("prom-reader") && out.contains("writer-b"));
    }

    #[test]
    fn never_renders_empty_users() {
        let mut wc =
            WebConfig::parse(b"basic_auth_users:\n  writer-a: $2y$10$def\n", &p()).unwrap();
        wc.set("writer-a", None);
        let e = wc.render(&p()).unwrap_err().to_string();
        assert!(e.contains("turns authentication OFF"), "{e}");
    }

    #[test]
    fn foreign_keys_and_plain_passwords_are_refused() {
        let e = WebConfig::parse(b"basic_auth_users: {}\nfoo: 1\n", &p())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`foo`"), "{e}");
        let e = WebConfig::parse(b"basic_auth_users:\n  a: plaintext\n", &p())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a bcrypt hash"), "{e}");
    }

    #[test]
    fn flow_style_falls_back_to_serialization() {
        let mut wc = WebConfig::parse(b"basic_auth_users: {a: \"$2y$x\"}\n", &p()).unwrap();
        wc.set("b", Some("$2b$y"));
        let out = wc.render(&p()).unwrap();
        let back = WebConfig::parse(&out, &p()).unwrap();
        assert_eq!(back.users.len(), 2);
    }

    #[test]
    fn query_answers() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"rotd_probe","rotation_id":"r1"},"value":[1700000000.123,"1"]}]}}"#;
        assert_eq!(query_found(vector), Ok(true));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(query_found(empty), Ok(false));
        // An error answer has no `result`: valid, not found.
        let error = br#"{"status":"error","errorType":"bad_data","error":"parse error","data":{}}"#;
        assert_eq!(query_found(error), Ok(false));
        let e = query_found(br#"{"status":"success","data":{"resultType":"vec"#).unwrap_err();
        assert!(e.starts_with("response could not be decoded: EOF"), "{e}");
        let e = query_found(b"<html>502 Bad Gateway</html>").unwrap_err();
        assert!(e.starts_with("response could not be decoded: "), "{e}");
        // `data` is required, as before.
        assert!(query_found(br#"{"status":"success"}"#).is_err());
        // Found by fuzzing (prom_query): bytes that are not UTF-8, or a lone
        // surrogate escape, in a field rotd skips are not checked (serde_json skips
        // strings unvalidated); in a field it reads they are refused.
        let mut body = br#"{"status":"success","data":{"resultType":""#.to_vec();
        body.extend_from_slice(&[0xff; 4]);
        body.extend_from_slice(br#"","result":[1733106601.123,"1"]}}"#);
        assert_eq!(query_found(&body), Ok(true));
        let body = br#"{"status":"success","data":{"resultType":"\ud800","result":[1,"1"]}}"#;
        assert_eq!(query_found(body), Ok(true));
        let mut body = br#"{"status":"success","data":{"resultType":"vector","result":[""#.to_vec();
        body.extend_from_slice(&[0xff; 4]);
        body.extend_from_slice(br#""]}}"#);
        assert!(query_found(&body).is_err());
    }

    #[test]
    fn write_request_decodes() {
        let body = write_request("s", "r1", 1000);
        let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap();
        let req = prompb::WriteRequest::decode(raw.as_slice()).unwrap();
        assert_eq!(req.timeseries[0].labels[1].value, "r1");
        assert_eq!(req.timeseries[0].samples[0].timestamp, 1000);
    }

    #[test]
    fn an_unchanged_user_line_in_an_odd_spelling_is_kept_byte_for_byte() {
        // Found by the web_config_rewrite fuzz target: the text after the value is not
        // a comment (no space before `#`), so a textual compare saw a changed hash.
        let line = "  writer-a: \"$2y$10$abc\"#";
        let text = format!("basic_auth_users:\n{line}\n  prom-reader: $2y$10$def\n");
        let Ok(mut wc) = WebConfig::parse(text.as_bytes(), &p()) else {
            return; // a YAML parser that refuses the spelling has nothing to keep
        };
        wc.set("writer-b", Some("$2b$04$new"));
        let out = String::from_utf8(wc.render(&p()).unwrap()).unwrap();
        assert!(out.contains(&format!("{line}\n")), "{out}");
    }

    #[test]
    fn comment_on_an_unchanged_user_line_survives_the_rewrite() {
        let text = "basic_auth_users:\n  prom-reader: \"$2y$10$abc\"  # reader for queries\n  writer-a: $2y$10$def # the sender\n";
        let mut wc = WebConfig::parse(text.as_bytes(), &p()).unwrap();
        wc.set("writer-b", Some("$2b$04$new"));
        let out = String::from_utf8(wc.render(&p()).unwrap()).unwrap();
        assert!(
            out.contains("  prom-reader: \"$2y$10$abc\"  # reader for queries\n"),
            "{out}"
        );
        assert!(
            out.contains("  writer-a: $2y$10$def # the sender\n"),
            "{out}"
        );
        // A changed line keeps its comment too.
        let mut wc = WebConfig::parse(out.as_bytes(), &p()).unwrap();
        wc.set("writer-a", Some("$2b$04$newer"));
        let out = String::from_utf8(wc.render(&p()).unwrap()).unwrap();
        assert!(
            out.contains("  writer-a: \"$2b$04$newer\" # the sender\n"),
            "{out}"
        );
        assert!(out.contains("# reader for queries"), "{out}");
    }

    #[test]
    fn deeply_nested_web_config_is_refused_before_parsing() {
        for text in [
            "[".repeat(64 << 10),
            "{".repeat(64 << 10),
            format!("basic_auth_users:\n  a: {}\n", "[".repeat(100)),
            (0..100)
                .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
                .collect(),
            format!("{}x\n", "- ".repeat(100)),
        ] {
            let e = WebConfig::parse(text.as_bytes(), &p())
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("nested deeper than 64"), "{e}");
        }
        let e = WebConfig::parse(&vec![b'#'; (1 << 20) + 1], &p())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("larger than"), "{e}");
        // Brackets in strings and comments are not nesting.
        WebConfig::parse(
            format!(
                "# {}\nbasic_auth_users:\n  \"a\": \"$2y${}\"\n",
                "[".repeat(100),
                "{".repeat(100)
            )
            .as_bytes(),
            &p(),
        )
        .unwrap();
    }
}
