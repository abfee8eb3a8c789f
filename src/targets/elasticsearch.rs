//! `elasticsearch-api-key` target: an Elasticsearch 8.x API key with least privilege,
//! rotated by creating a SECOND key and invalidating the old one after the grace.
//!
//! The lifecycle, mapped onto the engine's steps:
//!
//! * `plan` — nothing on Elasticsearch; the current record's `key-id` becomes the key
//!   to retire (`retire-key-id`).
//! * `apply` — `POST /_security/api_key` as the admin credential, with the name
//!   `rotd-<secret>-<rotation id>` (so a key whose id never reached git can still be
//!   found), one role descriptor `rotd-<secret>` built from `[[target.permissions]]`,
//!   an `expiration` (always sent), and metadata `{"managed_by": "rotd", "secret": …,
//!   "rotation": …}`. The id and `api_key` from the answer become the new record
//!   (returned in [`Undo::record`]); the engine commits that record as pending before
//!   anything depends on it.
//! * `probe` — with the NEW key: index one document into the `[probe] index` data
//!   stream (`POST /<ds>/_doc?refresh=wait_for`, create semantics), read it back with
//!   the admin credential, then ask `_has_privileges` AS THE NEW KEY: every declared
//!   privilege must be held, and no index privilege in [`EXCESS_INDEX`] nor cluster
//!   privilege in [`EXCESS_CLUSTER`] that the declared ones do not imply.
//! * `rollback` — invalidate the new key (its id from memory or the pending record)
//!   and every key named `rotd-<secret>-<rotation id>` (a crash between the create and
//!   the commit leaves only the name), then confirm with `GET` that each is invalidated.
//! * `retire` — invalidate `retire-key-id` and confirm it.
//!
//! Changed permissions (`update_in_place`, manual runs only): the record keeps
//! `permissions`, a sha256 of the canonical JSON of the role descriptors the key was
//! made or last updated with. When the declared ones hash differently and the cluster
//! is 8.4+ (`GET /`), `PUT /_security/api_key/<id>` sets the new descriptors on the
//! live key, `_has_privileges` as the key verifies them (declared held, excess and
//! formerly held-but-no-longer-implied index privileges absent), and the engine
//! commits `Rotd-Step: updated` with the same secret. A failed verification puts the
//! previous descriptors back. Anything else (older cluster, no hash, an API key as
//! admin credential, a failed update call) falls back to a normal rotation.
//!
//! TLS: `ca` adds a root certificate; `client_cert` + `client_key` (PEM) give a client
//! identity ([`Connection`], shared with `elasticsearch-user-password`).
//!
//! Calls are retried on 429 and 5xx answers and connection errors (3 tries, 200 ms,
//! 400 ms back-off); the time limit of one call is `[probe] timeout`. The create is
//! the exception: an answer that may come after the key was made (429, 5xx, a
//! timeout, a reset) is followed by a lookup of the key's name, and every key found
//! is invalidated before the next try, so a lost answer never leaves a second live
//! key that retire would not know of. A redirect is never followed ([`crate::http`]).
//! Error messages carry the method, path, status and Elasticsearch's
//! `error.type`/`error.reason` (scrubbed of credentials in use, then cut:
//! [`crate::redact`]), never a key, a password or an `Authorization` header.
//!
//! What the cluster answers is checked before it is used: the new key's `id` and
//! `api_key` must be in the URL-safe base64 alphabet Elasticsearch makes them from
//! ([`crate::validate`]); anything else fails the rotation, and the rollback finds the
//! key by its name (never by the id a hostile answer gave) and invalidates it.
//!
//! What rotd decides from an answer (is the key created, invalidated, found by name,
//! are the privileges exact, what went wrong) is a pure function of the body
//! ([`parse_body`], [`created_key`], [`PrivilegeCheck`], [`is_invalidated`], …), so
//! unit tests pin it against real Elasticsearch 8.x answers and the `es_response`
//! fuzz target (`fuzz/`) feeds it malformed and hostile bodies.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde_json::{json, Value};
use toml::Spanned;

use super::Probe;
use super::{http_error, Error, Plan, ProbeContext, ProbeReport, StepContext, Undo};
use crate::secret::Secret;
use crate::store::record::key;
use crate::store::Record;
use crate::syntax::{self, Reporter};

pub const KIND: &str = "elasticsearch-api-key";

/// Index privileges the probe checks the new key does NOT hold (unless declared or
/// implied by a declared one).
pub const EXCESS_INDEX: &[&str] = &[
    "read",
    "write",
    "index",
    "delete",
    "manage",
    "delete_index",
    "all",
    "create_index",
    "monitor",
    "view_index_metadata",
];

/// Cluster privileges the probe checks the new key does NOT hold unless declared.
pub const EXCESS_CLUSTER: &[&str] = &[
    "manage_security",
    "manage_api_key",
    "manage_own_api_key",
    "all",
    "manage",
];

/// One `[[target.permissions]]` block's index part.
#[derive(Debug, Clone)]
pub struct IndexPermission {
    pub names: Vec<String>,
    pub privileges: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The cluster and the admin credential.
    pub conn: Connection,
    /// Lifetime of a new key; None = 2 × grace + 30 days (set by [`Config::set_grace`]).
    pub expiration: Option<Duration>,
    /// Union of every block's `cluster` privileges.
    pub cluster: Vec<String>,
    pub indices: Vec<IndexPermission>,
    /// Data stream the probe writes to.
    pub probe_index: String,
}

/// The cluster, how rotd reaches it, and the admin credential: shared by both
/// Elasticsearch target kinds.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Base URL, e.g. `https://es.internal:9200`.
    pub url: String,
    /// PEM file of the CA that signed the cluster's HTTP certificate.
    pub ca: Option<PathBuf>,
    /// TLS client certificate (PEM, the leaf first) and its private key (PEM), for a
    /// cluster that requires client authentication (`xpack.security.http.ssl.client_authentication`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Secret in the store: `username` + password (Basic) or `key-id` + api_key.
    pub admin_credential: String,
    /// Time limit of one HTTP call (`[probe] timeout`).
    pub timeout: Duration,
}

/// Reads `client_cert` and `client_key` into one reqwest identity.
fn load_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<reqwest::Identity, String> {
    let c = crate::fsutil::read_capped(cert, crate::fsutil::MAX_KEY_FILE)
        .map_err(|e| format!("target.client_cert {} cannot be read: {e}", cert.display()))?;
    let k = crate::fsutil::read_capped(key, crate::fsutil::MAX_KEY_FILE)
        .map_err(|e| format!("target.client_key {} cannot be read: {e}", key.display()))?;
    if !String::from_utf8_lossy(&c).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "target.client_cert {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            cert.display()
        ));
    }
    if !String::from_utf8_lossy(&k).contains("PRIVATE KEY-----") {
        return Err(format!(
            "target.client_key {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        ));
    }
    let mut pem = c;
    pem.push(b'\n');
    pem.extend_from_slice(&k);
    reqwest::Identity::from_pem(&pem).map_err(|e| {
        format!(
            "target.client_cert {} / client_key {}: not a usable PEM certificate and key: {}",
            cert.display(),
            key.display(),
            http_error_text(&e)
        )
    })
}

fn http_error_text(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `[target]` of kind `elasticsearch-api-key`, as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Raw {
    #[allow(dead_code)] // read by `targets::RawHead`
    kind: String,
    url: Option<Spanned<String>>,
    ca: Option<Spanned<std::path::PathBuf>>,
    client_cert: Option<Spanned<std::path::PathBuf>>,
    client_key: Option<Spanned<std::path::PathBuf>>,
    admin_credential: Option<Spanned<String>>,
    expiration: Option<Spanned<String>>,
    permissions: Option<Vec<Spanned<RawPermission>>>,
}
raw_connection!(Raw);

/// One `[[target.permissions]]` block of an `elasticsearch-api-key` target.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPermission {
    pub(crate) names: Option<Spanned<Vec<String>>>,
    pub(crate) privileges: Option<Spanned<Vec<String>>>,
    pub(crate) cluster: Option<Spanned<Vec<String>>>,
}

/// The connection settings of both Elasticsearch kinds (each kind's `Raw` has them;
/// [`Connection::from_raw`] checks them).
pub(crate) trait RawConnection {
    fn url(&self) -> Option<&Spanned<String>>;
    fn ca(&self) -> Option<&Spanned<std::path::PathBuf>>;
    fn client_cert(&self) -> Option<&Spanned<std::path::PathBuf>>;
    fn client_key(&self) -> Option<&Spanned<std::path::PathBuf>>;
    fn admin_credential(&self) -> Option<&Spanned<String>>;
}

/// Implements [`RawConnection`] for a raw form with those five fields.
macro_rules! raw_connection {
    ($t:ty) => {
        impl $crate::targets::elasticsearch::RawConnection for $t {
            fn url(&self) -> Option<&toml::Spanned<String>> {
                self.url.as_ref()
            }
            fn ca(&self) -> Option<&toml::Spanned<std::path::PathBuf>> {
                self.ca.as_ref()
            }
            fn client_cert(&self) -> Option<&toml::Spanned<std::path::PathBuf>> {
                self.client_cert.as_ref()
            }
            fn client_key(&self) -> Option<&toml::Spanned<std::path::PathBuf>> {
                self.client_key.as_ref()
            }
            fn admin_credential(&self) -> Option<&toml::Spanned<String>> {
                self.admin_credential.as_ref()
            }
        }
    };
}
pub(crate) use raw_connection;

impl Connection {
    /// Checks `url`, `ca`, `client_cert`, `client_key` and `admin_credential`.
    /// `admin_does` completes "the credential that …" in messages.
    pub(crate) fn from_raw<R: RawConnection>(
        raw: &Spanned<R>,
        probe: &Probe,
        kind: &str,
        admin_does: &str,
        rep: &mut Reporter<'_>,
    ) -> Option<Connection> {
        let t = raw.get_ref();
        let before = rep.count();
        let url = match t.url() {
            Some(u)
                if u.get_ref().starts_with("http://") || u.get_ref().starts_with("https://") =>
            {
                Some(u.get_ref().trim_end_matches('/').to_owned())
            }
            Some(u) => {
                rep.at(
                    u,
                    format!(
                        "target.url = {:?} must start with http:// or https://",
                        u.get_ref()
                    ),
                );
                None
            }
            None => {
                rep.at(raw, format!("target.url is required for {kind}: the cluster's base URL, e.g. \"https://es.internal:9200\""));
                None
            }
        };
        let plain_http = url.as_deref().is_some_and(|u| u.starts_with("http://"));
        let ca = t.ca().map(|c| {
            let p = rep.resolve(c.get_ref());
            match crate::fsutil::read_capped(&p, crate::fsutil::MAX_LIST_FILE) {
                Ok(pem) => {
                    if reqwest::Certificate::from_pem(&pem).is_err() {
                        rep.at(c, format!("target.ca {} is not a PEM certificate; give the CA that signed the cluster's HTTP certificate (e.g. config/certs/http_ca.crt)", p.display()));
                    }
                }
                Err(e) => rep.at(
                    c,
                    format!(
                        "target.ca {} cannot be read: {e}; fix the path or remove the setting",
                        p.display()
                    ),
                ),
            }
            if plain_http {
                rep.at(
                    c,
                    "target.ca is only used with an https:// url; remove it or use https",
                );
            }
            p
        });
        let client_cert = match (t.client_cert(), t.client_key()) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                let (cp, kp) = (rep.resolve(c.get_ref()), rep.resolve(k.get_ref()));
                if let Err(m) = load_identity(&cp, &kp) {
                    rep.at(c, m);
                }
                if plain_http {
                    rep.at(c, "target.client_cert is only used with an https:// url; remove it or use https");
                }
                Some((cp, kp))
            }
            (Some(c), None) => {
                rep.at(c, "target.client_cert needs target.client_key: the PEM private key of the client certificate");
                None
            }
            (None, Some(k)) => {
                rep.at(
                    k,
                    "target.client_key needs target.client_cert: the PEM client certificate",
                );
                None
            }
        };
        let admin_credential = match t.admin_credential() {
            Some(a) if syntax::valid_name(a.get_ref()) => Some(a.get_ref().clone()),
            Some(a) => {
                rep.at(
                    a,
                    format!(
                        "target.admin_credential = {:?} is not a valid secret name",
                        a.get_ref()
                    ),
                );
                None
            }
            None => {
                rep.at(raw, format!("target.admin_credential is required: the secret in the store holding the credential that {admin_does} (import it with `rotd import NAME --username USER` or `--key-id=ID`)"));
                None
            }
        };
        if rep.count() > before {
            return None;
        }
        Some(Connection {
            url: url?,
            ca,
            client_cert,
            admin_credential: admin_credential?,
            timeout: probe.timeout,
        })
    }

    /// The client for this cluster: no redirect followed, https only for an
    /// `https://` url ([`crate::http`]).
    pub(crate) fn client(&self) -> Result<reqwest::Client, Error> {
        let mut b = crate::http::builder(self.timeout);
        if let Some(ca) = &self.ca {
            let pem = crate::fsutil::read_capped(ca, crate::fsutil::MAX_LIST_FILE)
                .map_err(|e| Error::Es(format!("cannot read the CA file {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| Error::Es(format!("CA file {}: {e}", ca.display())))?;
            b = b.add_root_certificate(cert);
        }
        if let Some((cert, key)) = &self.client_cert {
            b = b.identity(load_identity(cert, key).map_err(Error::Es)?);
        }
        crate::http::build(b, &self.url).map_err(Error::Es)
    }

    pub(crate) fn admin_auth(&self, lookup: super::Lookup<'_>) -> Result<Auth, Error> {
        let rec = lookup(&self.admin_credential)?.ok_or_else(|| {
            Error::Es(format!(
                "admin credential {} is not in the store; run `rotd import {} --username USER` (password on stdin) or `--key-id=ID` (api_key on stdin)",
                self.admin_credential, self.admin_credential
            ))
        })?;
        if let Some(u) = rec.username() {
            return Ok(Auth::basic(u, &rec.secret));
        }
        if let Some(id) = rec.key_id() {
            return Ok(Auth::api_key(id, &rec.secret));
        }
        Err(Error::Es(format!(
            "admin credential {} has neither a username nor a key-id; import it again with --username or --key-id",
            self.admin_credential
        )))
    }

    /// One request, not retried. A redirect is refused here (an error), so no
    /// caller can mistake it for an answer.
    async fn attempt(
        &self,
        client: &reqwest::Client,
        method: &reqwest::Method,
        path: &str,
        auth: &Auth,
        body: Option<&Value>,
    ) -> Result<Attempt, Error> {
        let url = format!("{}{path}", self.url);
        // The path without its query string, for messages.
        let shown = path.split('?').next().unwrap_or(path);
        let mut req = client
            .request(method.clone(), &url)
            .header(AUTHORIZATION, auth.header()?);
        if let Some(b) = body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(r) => {
                if let Some(refused) = crate::http::redirect_refused(&r) {
                    return Err(Error::Es(format!("{method} {shown} {refused}")));
                }
                let status = r.status().as_u16();
                let v = match super::read_body(r).await {
                    Ok(b) => parse_body(&b),
                    Err(e) => {
                        tracing::debug!(error = %e, "elasticsearch answer not read");
                        Value::Null
                    }
                };
                Ok(Attempt::Answer(status, v))
            }
            Err(e) => Ok(Attempt::Failed {
                error: format!("{method} {shown}: {}", http_error(&e)),
                // A connection that was never made carried no request.
                sent: !e.is_connect(),
            }),
        }
    }

    /// One call with bounded retries on 429, 5xx and connection errors. Not for a
    /// request that creates something: see [`Config::create_key`].
    pub(crate) async fn call(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        auth: &Auth,
        body: Option<&Value>,
    ) -> Result<(u16, Value), Error> {
        let shown = path.split('?').next().unwrap_or(path);
        let mut last = String::new();
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << (attempt - 1))).await;
            }
            match self.attempt(client, &method, path, auth, body).await? {
                Attempt::Answer(status, v) if retryable(status) => {
                    last = describe_error(&method, shown, status, &v);
                    tracing::debug!(attempt, reason = %last, "elasticsearch call failed; retrying");
                }
                Attempt::Answer(status, v) => return Ok((status, v)),
                Attempt::Failed { error, sent } => {
                    last = error;
                    if sent {
                        break;
                    }
                }
            }
        }
        Err(Error::Es(last))
    }

    /// A call whose answer must be 2xx.
    pub(crate) async fn call_ok(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        auth: &Auth,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let (status, v) = self.call(client, method.clone(), path, auth, body).await?;
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            Err(Error::Es(describe_error(
                &method,
                path.split('?').next().unwrap_or(path),
                status,
                &v,
            )))
        }
    }
}

/// What one request to the cluster gave.
enum Attempt {
    /// The cluster (or a proxy in front of it) answered.
    Answer(u16, Value),
    /// No answer; `sent`: the request may have reached the cluster.
    Failed { error: String, sent: bool },
}

/// An answer worth trying again: the cluster (or a proxy) is overloaded or failed.
fn retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

fn valid_privilege(p: &str) -> bool {
    !p.is_empty()
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_:*/".contains(&b))
}

impl Config {
    pub(crate) fn from_raw(
        raw: &Spanned<Raw>,
        probe: &Probe,
        probe_span: Option<std::ops::Range<usize>>,
        rep: &mut Reporter<'_>,
    ) -> Option<Config> {
        let t = raw.get_ref();
        let before = rep.count();
        let conn = Connection::from_raw(raw, probe, KIND, "creates and invalidates API keys", rep);
        let expiration = t.expiration.as_ref().and_then(|e| match syntax::parse_duration(e.get_ref()) {
            Ok(d) if d >= Duration::from_secs(60) => Some(d),
            Ok(_) => {
                rep.at(e, "target.expiration must be at least 1m; it should exceed the rotation interval plus the grace");
                None
            }
            Err(m) => {
                rep.at(e, format!("target.expiration: {m}"));
                None
            }
        });
        let mut cluster = Vec::new();
        let mut indices = Vec::new();
        match t.permissions.as_deref() {
            None | Some([]) => rep.at(raw, "at least one [[target.permissions]] block is required: names = [\"logs-app-default\"], privileges = [\"create_doc\", \"auto_configure\"]"),
            Some(blocks) => {
                for b in blocks {
                    let p = b.get_ref();
                    let mut ok = true;
                    for list in [&p.names, &p.privileges, &p.cluster].into_iter().flatten() {
                        if list.get_ref().is_empty() {
                            rep.at(list, "an empty list; remove the key or name at least one entry");
                            ok = false;
                        }
                    }
                    for list in [&p.privileges, &p.cluster].into_iter().flatten() {
                        if let Some(bad) = list.get_ref().iter().find(|x| !valid_privilege(x)) {
                            rep.at(list, format!("{bad:?} is not an Elasticsearch privilege name (e.g. \"create_doc\", \"auto_configure\", \"read\", \"monitor\")"));
                            ok = false;
                        }
                    }
                    if let Some(n) = &p.names {
                        if n.get_ref().iter().any(|x| x.trim().is_empty()) {
                            rep.at(n, "index names must not be empty");
                            ok = false;
                        }
                    }
                    match (&p.names, &p.privileges) {
                        (Some(n), Some(pr)) => {
                            if ok {
                                indices.push(IndexPermission {
                                    names: n.get_ref().clone(),
                                    privileges: pr.get_ref().clone(),
                                });
                            }
                        }
                        (None, None) if p.cluster.is_some() => {}
                        (Some(_), None) => rep.at(b, "this [[target.permissions]] block has `names` but no `privileges`; add e.g. privileges = [\"create_doc\", \"auto_configure\"]"),
                        (None, Some(_)) => rep.at(b, "this [[target.permissions]] block has `privileges` but no `names`; add the index or data stream names, e.g. names = [\"logs-app-default\"]"),
                        (None, None) => rep.at(b, "an empty [[target.permissions]] block; give names and privileges (and optionally cluster)"),
                    }
                    if let Some(c) = &p.cluster {
                        for x in c.get_ref() {
                            if !cluster.contains(x) {
                                cluster.push(x.clone());
                            }
                        }
                    }
                }
            }
        }
        let probe_index = match &probe.index {
            Some(i) if !i.trim().is_empty() => Some(i.clone()),
            _ => {
                let msg = "probe.index is required for elasticsearch-api-key: a data stream the new key may write to, e.g. [probe] index = \"logs-app-default\"";
                match probe_span {
                    Some(span) => rep.at(&Spanned::new(span, ()), msg),
                    None => rep.at(raw, msg),
                }
                None
            }
        };
        if rep.count() > before {
            return None;
        }
        Some(Config {
            conn: conn?,
            expiration,
            cluster,
            indices,
            probe_index: probe_index?,
        })
    }

    /// Sets the default expiration (2 × grace + 30 days) when none is configured.
    pub fn set_grace(&mut self, grace: Duration) {
        if self.expiration.is_none() {
            self.expiration = Some(grace * 2 + Duration::from_secs(30 * 24 * 3600));
        }
    }

    fn expiration(&self) -> Duration {
        self.expiration
            .unwrap_or(Duration::from_secs(30 * 24 * 3600))
    }

    /// Nothing on Elasticsearch: the current key is the one to retire.
    pub fn plan(&self, current: Option<&Record>) -> Plan {
        Plan {
            retire_key_id: current.and_then(|r| r.key_id()).map(str::to_owned),
            ..Plan::default()
        }
    }

    fn role_descriptors(&self, name: &str) -> Value {
        let indices: Vec<Value> = self
            .indices
            .iter()
            .map(|p| json!({"names": p.names, "privileges": p.privileges}))
            .collect();
        json!({ format!("rotd-{name}"): {"cluster": self.cluster, "indices": indices} })
    }

    /// Creates the new key; its id and api_key come back in `Undo::record`.
    pub async fn apply(&self, new: &Record, ctx: &StepContext<'_>) -> Result<Undo, Error> {
        let admin = self.conn.admin_auth(ctx.lookup)?;
        let client = self.conn.client()?;
        let rotation = new.get(key::ROTATION).unwrap_or("unknown");
        let name = key_name(ctx.name, rotation);
        let body = json!({
            "name": name,
            "expiration": format!("{}s", self.expiration().as_secs()),
            "role_descriptors": self.role_descriptors(ctx.name),
            "metadata": {"managed_by": "rotd", "secret": ctx.name, "rotation": rotation},
        });
        let v = self.create_key(&client, &admin, &body, &name).await?;
        let Some(created) = created_key(&v) else {
            return Err(Error::Es(
                "POST /_security/api_key: the answer has no id or api_key".into(),
            ));
        };
        // The values become a record line, a trailer and maybe a deliver path: only
        // their real format is taken. The key the cluster made is not addressed by
        // the id it answered: the rollback finds it by its name, which is rotd's own.
        let secret = Secret::new(created.api_key.to_owned());
        let _registered = crate::redact::register(&secret, None);
        crate::validate::es_id(created.id, "the id in the answer of POST /_security/api_key")
            .and_then(|()| {
                crate::validate::es_api_key(
                    created.api_key,
                    "the api_key in the answer of POST /_security/api_key",
                )
            })
            .map_err(|m| {
                Error::Es(format!(
                    "{m}; the cluster (or a proxy in front of it) answered something no Elasticsearch makes: check target.url; the key named {name} is invalidated by the rollback"
                ))
            })?;
        let id = created.id;
        let mut rec = Record {
            secret,
            meta: new.meta.clone(),
        };
        rec.set(key::KEY_ID, id);
        rec.set(key::PERMISSIONS, self.permissions_hash(ctx.name));
        if let Some(expires) = created.expires {
            rec.set(key::EXPIRES, expires);
        }
        tracing::info!(key_id = id, key_name = %name, "new API key created");
        Ok(Undo {
            record: Some(rec),
            ..Undo::default()
        })
    }

    /// `POST /_security/api_key`, never retried blindly. An answer that may come
    /// after the key was made (429, 5xx from a proxy, a timeout, a reset connection)
    /// does not say whether it was: before the next try, the keys of this name are
    /// looked up and invalidated. None is adopted: Elasticsearch never shows a key's
    /// secret again, so a found key could not be delivered, only left live. So at most
    /// one live key of the name remains: the one whose answer arrived.
    async fn create_key(
        &self,
        client: &reqwest::Client,
        admin: &Auth,
        body: &Value,
        name: &str,
    ) -> Result<Value, Error> {
        let method = reqwest::Method::POST;
        let path = "/_security/api_key";
        let mut last = String::new();
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << (attempt - 1))).await;
            }
            match self
                .conn
                .attempt(client, &method, path, admin, Some(body))
                .await?
            {
                Attempt::Answer(status, v) if (200..300).contains(&status) => {
                    if attempt > 0 {
                        // A create that was still under way during the lookup may
                        // have finished since: keep only the key answered here.
                        let keep = created_key(&v).map(|c| c.id.to_owned());
                        self.invalidate_named(client, admin, name, keep.as_deref())
                            .await?;
                    }
                    return Ok(v);
                }
                Attempt::Answer(status, v) if retryable(status) => {
                    last = describe_error(&method, path, status, &v);
                }
                Attempt::Answer(status, v) => {
                    return Err(Error::Es(describe_error(&method, path, status, &v)))
                }
                // Nothing reached the cluster: nothing to look up.
                Attempt::Failed { error, sent: false } => {
                    last = error;
                    continue;
                }
                Attempt::Failed { error, sent: true } => last = error,
            }
            tracing::debug!(attempt, reason = %last, key_name = name, "creating the API key failed after it may have been made; invalidating any key of its name before trying again");
            let found = self.invalidate_named(client, admin, name, None).await.map_err(|e| {
                Error::Es(format!(
                    "{last}; the key may have been made, and looking it up by its name {name} failed: {e}"
                ))
            })?;
            if !found.is_empty() {
                tracing::warn!(key_ids = ?found, key_name = name, "the cluster made the API key but its answer was lost; invalidated it before trying again");
            }
        }
        Err(Error::Es(last))
    }

    /// Invalidates every live key named `name` (found with `GET ?name=`) but
    /// `except`; their ids.
    async fn invalidate_named(
        &self,
        client: &reqwest::Client,
        admin: &Auth,
        name: &str,
        except: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        let v = self
            .conn
            .call_ok(
                client,
                reqwest::Method::GET,
                &format!("/_security/api_key?name={}", enc(name)),
                admin,
                None,
            )
            .await?;
        let ids: Vec<String> = live_keys_named(&v, name)
            .into_iter()
            .filter(|id| Some(*id) != except)
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            self.invalidate(client, admin, &ids).await?;
        }
        Ok(ids)
    }

    pub async fn probe(&self, new: &Record, ctx: &ProbeContext<'_>) -> Result<ProbeReport, Error> {
        let started = Instant::now();
        let id = new
            .key_id()
            .ok_or_else(|| Error::Probe("the new credential has no key id".into()))?;
        let auth = Auth::api_key(id, &new.secret);
        let admin = self.conn.admin_auth(ctx.lookup)?;
        let client = self.conn.client()?;
        let ds = &self.probe_index;
        probe_document(&self.conn, &client, &auth, &admin, ds, ctx, "the new key").await?;
        self.check_privileges(&client, &auth, &[]).await?;
        Ok(ProbeReport {
            elapsed: started.elapsed(),
            detail: format!("document indexed into {ds}, read back; no excess privilege"),
        })
    }

    /// `_has_privileges` as the new key: the declared ones held, nothing more.
    ///
    /// `absent` lists (index, privilege) pairs that must NOT be held either (those a
    /// key held before an in-place update and the declared ones do not imply).
    async fn check_privileges(
        &self,
        client: &reqwest::Client,
        auth: &Auth,
        absent: &[(String, String)],
    ) -> Result<(), Error> {
        let check = PrivilegeCheck::new(&self.cluster, &self.indices, absent);
        let v = self
            .conn
            .call_ok(
                client,
                reqwest::Method::POST,
                "/_security/user/_has_privileges",
                auth,
                Some(&check.body),
            )
            .await
            .map_err(|e| Error::Probe(format!("_has_privileges with the new key: {e}")))?;
        let problems = check.problems(&v);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Probe(format!(
                "the new key's privileges differ from the declared ones: {}",
                problems.join(", ")
            )))
        }
    }

    /// sha256 (hex) of the canonical JSON of the declared role descriptors.
    pub fn permissions_hash(&self, name: &str) -> String {
        let mut text = String::new();
        canonical_json(&self.role_descriptors(name), &mut text);
        hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
    }

    /// When the declared permissions differ from those recorded for the live key
    /// (`permissions` metadata) and the cluster is 8.4 or later, updates the live key
    /// in place (`PUT /_security/api_key/<id>`) and verifies it with
    /// `_has_privileges`, instead of a rotation. None: rotate as usual (nothing
    /// recorded, nothing changed, an older cluster, an API key as admin credential,
    /// or the update could not be made — a rotation applies the permissions too).
    pub async fn update_in_place(
        &self,
        current: &Record,
        ctx: &StepContext<'_>,
    ) -> Result<Option<super::InPlace>, Error> {
        let declared = self.permissions_hash(ctx.name);
        let (Some(recorded), Some(id)) = (current.get(key::PERMISSIONS), current.key_id()) else {
            return Ok(None);
        };
        if recorded == declared {
            return Ok(None);
        }
        let admin_rec = (ctx.lookup)(&self.conn.admin_credential)?;
        if admin_rec.as_ref().is_some_and(|r| r.username().is_none()) {
            tracing::info!("permissions changed; the admin credential is an API key, which Elasticsearch does not let update keys: rotating");
            return Ok(None);
        }
        let admin = self.conn.admin_auth(ctx.lookup)?;
        let client = self.conn.client()?;
        let info = match self
            .conn
            .call_ok(&client, reqwest::Method::GET, "/", &admin, None)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster version; rotating to apply the new permissions");
                return Ok(None);
            }
        };
        let version = cluster_version(&info);
        if !supports_update(version) {
            tracing::info!(
                version,
                "permissions changed; Elasticsearch before 8.4 cannot update an API key: rotating"
            );
            return Ok(None);
        }
        let before = match self
            .conn
            .call_ok(
                &client,
                reqwest::Method::GET,
                &format!("/_security/api_key?id={}", enc(id)),
                &admin,
                None,
            )
            .await
        {
            Ok(v) => role_descriptors_of(&v, id),
            Err(e) => {
                tracing::warn!(error = %e, key_id = id, "cannot read the live key; rotating to apply the new permissions");
                return Ok(None);
            }
        };
        if !before.is_object() {
            tracing::warn!(
                key_id = id,
                "the live key is not found or has no role descriptors; rotating"
            );
            return Ok(None);
        }
        let path = format!("/_security/api_key/{}", enc(id));
        let body = json!({ "role_descriptors": self.role_descriptors(ctx.name) });
        if let Err(e) = self
            .conn
            .call_ok(&client, reqwest::Method::PUT, &path, &admin, Some(&body))
            .await
        {
            tracing::warn!(error = %e, key_id = id, "cannot update the live key; rotating to apply the new permissions");
            return Ok(None);
        }
        tracing::info!(key_id = id, "API key privileges updated in place");
        let absent = held_index_privileges(&before);
        let auth = Auth::api_key(id, &current.secret);
        if let Err(e) = self.check_privileges(&client, &auth, &absent).await {
            // Put the previous privileges back.
            let restore = json!({ "role_descriptors": restorable(&before) });
            return match self
                .conn
                .call_ok(&client, reqwest::Method::PUT, &path, &admin, Some(&restore))
                .await
            {
                Ok(_) => Ok(Some(super::InPlace::Reverted(format!(
                    "updating key {id} in place: {e}; its previous privileges are restored"
                )))),
                Err(r) => Err(Error::Es(format!(
                    "updating key {id} in place: {e}; restoring its previous privileges failed: {r}"
                ))),
            };
        }
        let mut record = current.clone();
        record.set(key::PERMISSIONS, declared);
        Ok(Some(super::InPlace::Updated {
            record,
            detail: format!("key={id} privileges updated in place; _has_privileges ok"),
        }))
    }

    /// Invalidates the new key: by id (memory or pending record) and by name.
    pub async fn rollback(
        &self,
        pending: &Record,
        undo: Option<&Undo>,
        ctx: &StepContext<'_>,
    ) -> Result<(), Error> {
        let admin = self.conn.admin_auth(ctx.lookup)?;
        let client = self.conn.client()?;
        let mut ids: Vec<String> = Vec::new();
        let known = undo
            .and_then(|u| u.record.as_ref())
            .and_then(|r| r.key_id())
            .into_iter()
            .chain(pending.key_id());
        for id in known {
            // A record from git may be damaged or forged: an id that is not one is
            // not sent; the name lookup below still finds the key.
            if crate::validate::es_id(id, "the key id in the pending record").is_err() {
                tracing::warn!("the pending record's key id is not an Elasticsearch id; finding the key by its name only");
                continue;
            }
            if !ids.iter().any(|x| x == id) {
                ids.push(id.to_owned());
            }
        }
        let rotation = pending.get(key::ROTATION).unwrap_or("unknown");
        let name = key_name(ctx.name, rotation);
        let v = self
            .conn
            .call_ok(
                &client,
                reqwest::Method::GET,
                &format!("/_security/api_key?name={}", enc(&name)),
                &admin,
                None,
            )
            .await?;
        for id in live_keys_named(&v, &name) {
            if !ids.iter().any(|x| x == id) {
                ids.push(id.to_owned());
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        self.invalidate(&client, &admin, &ids).await?;
        tracing::info!(key_ids = ?ids, "new API key invalidated");
        Ok(())
    }

    /// Invalidates the key named in `retire-key-id`.
    pub async fn retire(
        &self,
        current: &Record,
        ctx: &StepContext<'_>,
    ) -> Result<Option<String>, Error> {
        let Some(old) = current.get(key::RETIRE_KEY_ID) else {
            return Ok(None);
        };
        if Some(old) == current.key_id() {
            return Ok(None);
        }
        let admin = self.conn.admin_auth(ctx.lookup)?;
        let client = self.conn.client()?;
        self.invalidate(&client, &admin, &[old.to_owned()]).await?;
        tracing::info!(key_id = old, "old API key invalidated");
        Ok(Some(format!("key={old}")))
    }

    /// `DELETE /_security/api_key`, then `GET` each id to confirm `invalidated`.
    async fn invalidate(
        &self,
        client: &reqwest::Client,
        admin: &Auth,
        ids: &[String],
    ) -> Result<(), Error> {
        let v = self
            .conn
            .call_ok(
                client,
                reqwest::Method::DELETE,
                "/_security/api_key",
                admin,
                Some(&json!({"ids": ids})),
            )
            .await?;
        if let Some(e) = invalidate_errors(&v) {
            return Err(Error::Es(e));
        }
        for id in ids {
            let (status, v) = self
                .conn
                .call(
                    client,
                    reqwest::Method::GET,
                    &format!("/_security/api_key?id={}", enc(id)),
                    admin,
                    None,
                )
                .await?;
            if status == 404 {
                continue; // no such key: nothing can authenticate with it
            }
            if !(200..300).contains(&status) {
                return Err(Error::Es(describe_error(
                    &reqwest::Method::GET,
                    "/_security/api_key",
                    status,
                    &v,
                )));
            }
            if !is_invalidated(&v, id) {
                return Err(Error::Es(format!(
                    "API key {id} is still valid after the invalidate call"
                )));
            }
        }
        Ok(())
    }
}

/// Indexes one document into `ds` as `auth` (create semantics, `refresh=wait_for`)
/// and reads it back as the admin. `who` names `auth` in messages.
pub(crate) async fn probe_document(
    conn: &Connection,
    client: &reqwest::Client,
    auth: &Auth,
    admin: &Auth,
    ds: &str,
    ctx: &ProbeContext<'_>,
    who: &str,
) -> Result<(), Error> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let doc = json!({"@timestamp": now, "rotd": {"rotation": ctx.rotation_id, "secret": ctx.name}});
    let v = conn
        .call_ok(
            client,
            reqwest::Method::POST,
            &format!("/{}/_doc?refresh=wait_for", enc(ds)),
            auth,
            Some(&doc),
        )
        .await
        .map_err(|e| Error::Probe(format!("indexing into {ds} with {who}: {e}")))?;
    let Some((index, doc_id)) = indexed_doc(&v) else {
        return Err(Error::Probe(format!(
            "indexing into {ds}: the answer has no _index or _id"
        )));
    };
    let got = conn
        .call_ok(
            client,
            reqwest::Method::GET,
            &format!("/{}/_doc/{}", enc(index), enc(doc_id)),
            admin,
            None,
        )
        .await
        .map_err(|e| Error::Probe(format!("reading the probe document back: {e}")))?;
    if !probe_doc_found(&got, ctx.rotation_id) {
        // The index and id are the cluster's text.
        return Err(Error::Probe(format!(
            "the probe document {} is not found in {}",
            crate::redact::peer_text(doc_id, 200),
            crate::redact::peer_text(index, 200)
        )));
    }
    Ok(())
}

// Decisions on response bodies. Each one is pure (bytes or a `Value` in, a decision
// out), so unit tests pin it against real Elasticsearch 8.x answers and
// `fuzz/fuzz_targets/es_response.rs` feeds it arbitrary bytes: a malformed or hostile
// answer must give a refusal, never a panic. None of them puts a response body into
// a message beyond what `describe_error` and `invalidate_errors` summarise.

/// A response body as `Connection::call` sees it: its JSON, or `Null` when the body
/// is not JSON (an HTML error page from a proxy, a cut-off answer).
pub fn parse_body(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

/// What `POST /_security/api_key` answered for a new key.
#[derive(Debug, PartialEq, Eq)]
pub struct CreatedKey<'a> {
    pub id: &'a str,
    /// The key's secret: never put it into a message.
    pub api_key: &'a str,
    /// `expiration` (epoch milliseconds) as RFC 3339, when the answer has one.
    pub expires: Option<String>,
}

/// The id, `api_key` and expiry of a `POST /_security/api_key` answer; None when the
/// id or the `api_key` is missing.
pub fn created_key(v: &Value) -> Option<CreatedKey<'_>> {
    let (Some(id), Some(api_key)) = (v["id"].as_str(), v["api_key"].as_str()) else {
        return None;
    };
    let expires = v["expiration"]
        .as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    Some(CreatedKey {
        id,
        api_key,
        expires,
    })
}

/// The `version.number` of a `GET /` answer ("" when absent).
pub fn cluster_version(info: &Value) -> &str {
    info["version"]["number"].as_str().unwrap_or("")
}

/// The `role_descriptors` of key `id` in a `GET /_security/api_key` answer (`Null`
/// when the key is not in it).
pub fn role_descriptors_of(v: &Value, id: &str) -> Value {
    v["api_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["id"].as_str() == Some(id))
        .map(|k| k["role_descriptors"].clone())
        .unwrap_or(Value::Null)
}

/// The ids of the keys named exactly `name` and not invalidated, in a
/// `GET /_security/api_key?name=…` answer.
pub fn live_keys_named<'a>(v: &'a Value, name: &str) -> Vec<&'a str> {
    v["api_keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["name"].as_str() == Some(name) && k["invalidated"] != json!(true))
        .filter_map(|k| k["id"].as_str())
        // An id not in Elasticsearch's format is no key rotd could address.
        .filter(|id| crate::validate::es_id(id, "id").is_ok())
        .collect()
}

/// The message for a `DELETE /_security/api_key` answer that reports errors
/// (`error_count` > 0, with each `error_details` entry's type and reason); None when
/// it reports none.
pub fn invalidate_errors(v: &Value) -> Option<String> {
    let count = &v["error_count"];
    if count.is_null() || count.as_u64() == Some(0) {
        return None;
    }
    if count.as_u64().is_none() {
        return Some(
            "DELETE /_security/api_key answered an error_count that is not a count".into(),
        );
    }
    let details: Vec<String> = v["error_details"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            format!(
                "{}: {}",
                d["type"].as_str().unwrap_or("error"),
                d["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    Some(format!(
        "DELETE /_security/api_key reported {} error(s): {}",
        v["error_count"],
        crate::redact::peer_text(&details.join("; "), MAX_DETAIL)
    ))
}

/// Does a 2xx `GET /_security/api_key?id=…` answer confirm that key `id` is
/// invalidated? It must be such an answer (an `api_keys` list: a proxy's HTML page or
/// any other body confirms nothing), and every entry with that id must say
/// `invalidated: true`; a list without the id (ES 8 answers `[]` for an unknown id)
/// has nothing that could still authenticate.
pub fn is_invalidated(v: &Value, id: &str) -> bool {
    let Some(keys) = v["api_keys"].as_array() else {
        return false;
    };
    keys.iter()
        .filter(|k| k["id"].as_str() == Some(id))
        .all(|k| k["invalidated"] == json!(true))
}

/// The `_index` and `_id` of a `POST /<ds>/_doc` answer.
pub fn indexed_doc(v: &Value) -> Option<(&str, &str)> {
    Some((v["_index"].as_str()?, v["_id"].as_str()?))
}

/// Does a `GET /<index>/_doc/<id>` answer hold the probe document of `rotation_id`?
pub fn probe_doc_found(got: &Value, rotation_id: &str) -> bool {
    got["found"] == json!(true) && got["_source"]["rotd"]["rotation"].as_str() == Some(rotation_id)
}

/// The `_has_privileges` request that checks a key holds the declared privileges and
/// nothing more, and the reading of its answer.
#[derive(Debug)]
pub struct PrivilegeCheck {
    /// The request body: `{"cluster": […], "index": [{"names": […], "privileges": […]}]}`.
    pub body: Value,
    declared_cluster: Vec<String>,
    cluster_excess: Vec<&'static str>,
    /// (index, privilege, must be held).
    expected: Vec<(String, String, bool)>,
}

impl PrivilegeCheck {
    /// Asks for the declared `cluster` and `indices` privileges, the excess ones
    /// ([`EXCESS_CLUSTER`], [`EXCESS_INDEX`]) they do not imply, and the `absent`
    /// (index, privilege) pairs (held before an in-place update, no longer declared).
    pub fn new(
        cluster: &[String],
        indices: &[IndexPermission],
        absent: &[(String, String)],
    ) -> PrivilegeCheck {
        let cluster_excess: Vec<&'static str> = EXCESS_CLUSTER
            .iter()
            .copied()
            .filter(|p| !implied(cluster, p, cluster_implies))
            .collect();
        let mut asked: Vec<&str> = cluster.iter().map(String::as_str).collect();
        asked.extend(&cluster_excess);
        let mut index = Vec::new();
        let mut expected: Vec<(String, String, bool)> = Vec::new();
        for p in indices {
            for n in &p.names {
                let mut privs: Vec<&str> = p.privileges.iter().map(String::as_str).collect();
                for x in &privs {
                    expected.push((n.clone(), x.to_string(), true));
                }
                for x in EXCESS_INDEX {
                    if !implied(&p.privileges, x, index_implies) {
                        expected.push((n.clone(), x.to_string(), false));
                        privs.push(x);
                    }
                }
                index.push(json!({"names": [n], "privileges": privs}));
            }
        }
        for (n, p) in absent {
            let declared = indices
                .iter()
                .any(|d| d.names.contains(n) && implied(&d.privileges, p, index_implies));
            if !declared && !expected.iter().any(|(en, ep, _)| en == n && ep == p) {
                expected.push((n.clone(), p.clone(), false));
                index.push(json!({"names": [n], "privileges": [p]}));
            }
        }
        PrivilegeCheck {
            body: json!({"cluster": asked, "index": index}),
            declared_cluster: cluster.to_vec(),
            cluster_excess,
            expected,
        }
    }

    /// What the `_has_privileges` answer `v` shows wrong: each declared privilege must
    /// be answered `true` and each other one asked for `false`; anything else (missing,
    /// not a boolean) is a problem. Empty: the key holds exactly what is declared.
    pub fn problems(&self, v: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &self.declared_cluster {
            if v["cluster"][c] != json!(true) {
                problems.push(format!("missing cluster privilege {c}"));
            }
        }
        for c in &self.cluster_excess {
            if v["cluster"][c] != json!(false) {
                problems.push(format!("excess cluster privilege {c}"));
            }
        }
        for (n, p, want) in &self.expected {
            let held = v["index"][n][p].as_bool();
            match (want, held) {
                (true, Some(true)) | (false, Some(false)) => {}
                (true, _) => problems.push(format!("missing index privilege {p} on {n}")),
                (false, _) => problems.push(format!("excess index privilege {p} on {n}")),
            }
        }
        problems
    }
}

/// Does a cluster of `version` (e.g. "8.15.0") have `PUT /_security/api_key/<id>`
/// (8.4 and later)?
pub fn supports_update(version: &str) -> bool {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (8, 4),
        _ => false,
    }
}

/// JSON with object keys sorted, no whitespace: the input of the permissions hash.
fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// (index name, privilege) pairs held by role descriptors as `GET` answers them.
pub fn held_index_privileges(descriptors: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rd in descriptors.as_object().into_iter().flat_map(|m| m.values()) {
        for i in rd["indices"].as_array().into_iter().flatten() {
            for n in i["names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                for p in i["privileges"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    out.push((n.to_owned(), p.to_owned()));
                }
            }
        }
    }
    out
}

/// The part of `GET` role descriptors rotd sets (cluster, index names and
/// privileges), to put them back with `PUT`.
pub fn restorable(descriptors: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (name, rd) in descriptors.as_object().into_iter().flatten() {
        let indices: Vec<Value> = rd["indices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| json!({"names": i["names"], "privileges": i["privileges"]}))
            .collect();
        let cluster = if rd["cluster"].is_array() {
            rd["cluster"].clone()
        } else {
            json!([])
        };
        out.insert(
            name.clone(),
            json!({"cluster": cluster, "indices": indices}),
        );
    }
    Value::Object(out)
}

/// The name of the key a rotation creates.
pub fn key_name(secret: &str, rotation: &str) -> String {
    format!("rotd-{secret}-{rotation}")
}

/// `base64(id:api_key)`, the form clients send as `Authorization: ApiKey …`.
pub fn encoded(id: &str, api_key: &Secret) -> Secret {
    Secret::new(STANDARD.encode(format!("{id}:{}", api_key.expose())))
}

/// An `Authorization` header value; Debug never shows it. While it lives, its
/// credential is registered for redaction ([`crate::redact`]): a cluster that echoes
/// it in an error has it scrubbed from the message.
pub(crate) struct Auth(String, #[allow(dead_code)] crate::redact::Registration);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(**)")
    }
}

impl Auth {
    /// `Basic base64(user:password)`.
    pub(crate) fn basic(user: &str, password: &Secret) -> Auth {
        Auth(
            format!(
                "Basic {}",
                STANDARD.encode(format!("{user}:{}", password.expose()))
            ),
            crate::redact::register(password, Some(user)),
        )
    }

    pub(crate) fn api_key(id: &str, api_key: &Secret) -> Auth {
        Auth(
            format!("ApiKey {}", encoded(id, api_key).expose()),
            crate::redact::register(api_key, Some(id)),
        )
    }

    fn header(&self) -> Result<HeaderValue, Error> {
        let mut h = HeaderValue::from_str(&self.0)
            .map_err(|_| Error::Es("the credential cannot be sent in an HTTP header".into()))?;
        h.set_sensitive(true);
        Ok(h)
    }
}

/// Percent-encodes a path segment or query value.
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The most of the cluster's own text (`reason`s) quoted in one message.
const MAX_DETAIL: usize = 600;

/// "METHOD /path answered HTTP 401: security_exception: reason (…); what to do".
/// ES error bodies (`{"error":{"root_cause":[…],"type":…,"reason":…},"status":…}`)
/// are summarised: the type and reason (for a 403 these name the action and the
/// privileges that would grant it), `additional_unsuccessful_credentials` of a 401,
/// and a hint per status. The body never holds the credential itself.
pub fn describe_error(
    method: impl std::fmt::Display,
    path: &str,
    status: u16,
    v: &Value,
) -> String {
    let err = &v["error"];
    let mut detail = match (err["type"].as_str(), err["reason"].as_str()) {
        (Some(t), Some(r)) => format!(": {t}: {r}"),
        (Some(t), None) => format!(": {t}"),
        _ => match err.as_str() {
            Some(s) => format!(": {s}"),
            None => String::new(),
        },
    };
    if let Some(extra) = err["additional_unsuccessful_credentials"].as_str() {
        detail.push_str(&format!(" ({extra})"));
    }
    if let Some(cause) = err["caused_by"]["reason"].as_str() {
        detail.push_str(&format!(" (caused by: {cause})"));
    }
    let hint = match status {
        401 => "; the credential was refused: check that the admin credential in the store is current and the key is neither invalidated nor expired",
        403 => "; the credential lacks a privilege: grant the one named above to the admin, or narrow [[target.permissions]]",
        404 => "; not found",
        409 => "; conflict with an existing document or key",
        429 => "; the cluster is rejecting requests (overloaded)",
        s if s >= 500 => "; the cluster failed",
        _ => "",
    };
    // The detail is the cluster's text: scrubbed of credentials in use, then cut.
    let detail = crate::redact::peer_text(&detail, MAX_DETAIL);
    format!("{method} {path} answered HTTP {status}{detail}{hint}")
}

#[cfg(test)]
mod error_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_shapes_are_described_with_their_fix() {
        let m = reqwest::Method::POST;
        let e = describe_error(
            &m,
            "/_security/api_key",
            401,
            &json!({"error":{"root_cause":[],"type":"security_exception","reason":"unable to authenticate with provided credentials and anonymous access is not allowed for this request","additional_unsuccessful_credentials":"API key: api key [x] has been invalidated"},"status":401}),
        );
        assert!(
            e.contains("security_exception")
                && e.contains("has been invalidated")
                && e.contains("check that the admin credential"),
            "{e}"
        );
        let e = describe_error(
            &m,
            "/logs/_doc",
            403,
            &json!({"error":{"type":"security_exception","reason":"action [indices:data/write/bulk[s]] is unauthorized for API key id [k] of user [u] on indices [logs], this action is granted by the index privileges [create_doc,create,index,write,all]"},"status":403}),
        );
        assert!(
            e.contains("indices:data/write/bulk[s]")
                && e.contains("create_doc,create")
                && e.contains("grant the one named above"),
            "{e}"
        );
        let e = describe_error(
            &m,
            "/_security/api_key",
            400,
            &json!({"error":{"type":"action_request_validation_exception","reason":"Validation Failed: 1: api key name is required;"},"status":400}),
        );
        assert!(
            e.contains("HTTP 400: action_request_validation_exception: Validation Failed"),
            "{e}"
        );
        let e = describe_error(
            &m,
            "/x",
            409,
            &json!({"error":{"type":"version_conflict_engine_exception","reason":"document already exists"}}),
        );
        assert!(e.contains("conflict"), "{e}");
        let e = describe_error(&m, "/x", 503, &json!("not json at all"));
        assert!(e.contains("HTTP 503; the cluster failed"), "{e}");
    }
}

fn implied(declared: &[String], p: &str, implies: fn(&str, &str) -> bool) -> bool {
    declared.iter().any(|d| d == p || implies(d, p))
}

/// Does index privilege `held` imply `p` (ES 8.x privilege definitions)?
fn index_implies(held: &str, p: &str) -> bool {
    match held {
        "all" => true,
        "write" => matches!(p, "index" | "delete" | "create" | "create_doc"),
        "index" => matches!(p, "create" | "create_doc"),
        "create" => p == "create_doc",
        "manage" => matches!(
            p,
            "create_index"
                | "delete_index"
                | "monitor"
                | "view_index_metadata"
                | "auto_configure"
                | "manage_ilm"
                | "manage_data_stream_lifecycle"
                | "manage_follow_index"
                | "manage_leader_index"
                | "maintenance"
        ),
        _ => false,
    }
}

/// Does cluster privilege `held` imply `p`?
fn cluster_implies(held: &str, p: &str) -> bool {
    match held {
        "all" => true,
        "manage_security" => matches!(p, "manage_api_key" | "manage_own_api_key"),
        "manage_api_key" => p == "manage_own_api_key",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implications() {
        let d = vec!["create_doc".to_owned(), "auto_configure".to_owned()];
        for p in EXCESS_INDEX {
            assert!(!implied(&d, p, index_implies), "{p}");
        }
        let w = vec!["write".to_owned()];
        assert!(implied(&w, "index", index_implies));
        assert!(!implied(&w, "read", index_implies));
        assert!(implied(
            &["manage_security".to_owned()],
            "manage_api_key",
            cluster_implies
        ));
    }

    #[test]
    fn client_certificate_errors_are_clear() {
        let dir = std::env::temp_dir().join(format!("rotd-es-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("client.crt");
        let key = dir.join("client.key");
        // Not PEM at all.
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = load_identity(&cert, &key).unwrap_err();
        assert!(
            e.contains("target.client_cert") && e.contains("no PEM certificate"),
            "{e}"
        );
        // A certificate but a key file without a key.
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            &key,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = load_identity(&cert, &key).unwrap_err();
        assert!(
            e.contains("target.client_key") && e.contains("no PEM private key"),
            "{e}"
        );
        // Broken base64 inside the armour.
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\n!!not base64!!\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = load_identity(&cert, &key).unwrap_err();
        assert!(e.contains("not a usable PEM certificate and key"), "{e}");
        // Unreadable.
        let e = load_identity(&dir.join("missing.crt"), &key).unwrap_err();
        assert!(e.contains("cannot be read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn versions_and_canonical_json() {
        assert!(supports_update("8.4.0"));
        assert!(supports_update("8.15.0"));
        assert!(supports_update("9.0.0-SNAPSHOT"));
        assert!(!supports_update("8.3.3"));
        assert!(!supports_update("7.17.0"));
        assert!(!supports_update(""));
        let mut a = String::new();
        canonical_json(&json!({"b": [1, {"d": 1, "c": "x"}], "a": null}), &mut a);
        assert_eq!(a, r#"{"a":null,"b":[1,{"c":"x","d":1}]}"#);
    }

    /// `GET /_security/api_key` as Elasticsearch 8.x answers it (abridged).
    fn get_api_keys() -> Value {
        json!({"api_keys": [
            {"id": "VuaCfGcBCdbkQm-e5aOx", "name": "rotd-s-01J0", "type": "rest",
             "creation": 1548550550158_i64, "expiration": 1548551550158_i64,
             "invalidated": false, "username": "admin", "realm": "native1",
             "realm_type": "native", "metadata": {"managed_by": "rotd"},
             "role_descriptors": {"rotd-s": {
                 "cluster": ["monitor"],
                 "indices": [{"names": ["logs-app-default"],
                              "privileges": ["create_doc", "auto_configure"],
                              "allow_restricted_indices": false}],
                 "applications": [], "run_as": [], "metadata": {},
                 "transient_metadata": {"enabled": true}}}},
            {"id": "H3_AhoIBA9hmeQJdg7ij", "name": "rotd-s-01J0", "invalidated": true,
             "invalidation": 1548551550158_i64, "role_descriptors": {}},
            {"id": "other", "name": "rotd-s-01J1", "invalidated": false}
        ]})
    }

    #[test]
    fn bodies_that_are_not_json_are_null() {
        assert_eq!(
            parse_body(br#"{"acknowledged":true}"#),
            json!({"acknowledged": true})
        );
        assert_eq!(parse_body(b""), Value::Null);
        assert_eq!(
            parse_body(b"<html><body>502 Bad Gateway</body></html>"),
            Value::Null
        );
        assert_eq!(parse_body(br#"{"api_keys":[{"id":"a""#), Value::Null);
        // Deeper than serde_json's recursion limit: refused, not a stack overflow.
        assert_eq!(parse_body(&[b'['; 100_000]), Value::Null);
    }

    #[test]
    fn created_key_answers() {
        let v = json!({"id": "VuaCfGcBCdbkQm-e5aOx", "name": "rotd-s-01J0",
            "expiration": 1544068612110_i64, "api_key": "ui2lp2axTNmsyakw9tvNnw",
            "encoded": "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="});
        assert_eq!(
            created_key(&v),
            Some(CreatedKey {
                id: "VuaCfGcBCdbkQm-e5aOx",
                api_key: "ui2lp2axTNmsyakw9tvNnw",
                expires: Some("2018-12-06T03:56:52Z".into()),
            })
        );
        assert_eq!(
            created_key(&json!({"id": "i", "api_key": "k"})).and_then(|c| c.expires),
            None
        );
        assert_eq!(created_key(&json!({"id": "i"})), None);
        assert_eq!(created_key(&json!({"id": 1, "api_key": "k"})), None);
        // Out-of-range or absurd expirations give no date, or one with a signed year.
        assert_eq!(
            created_key(&json!({"id": "i", "api_key": "k", "expiration": i64::MAX}))
                .and_then(|c| c.expires),
            None
        );
        let far = json!({"id": "i", "api_key": "k", "expiration": 253402300800000_i64});
        assert_eq!(
            created_key(&far).and_then(|c| c.expires).as_deref(),
            Some("+10000-01-01T00:00:00Z")
        );
    }

    #[test]
    fn cluster_versions() {
        let info = json!({"name": "es01", "cluster_name": "docker-cluster",
            "version": {"number": "8.15.0", "build_flavor": "default",
                        "lucene_version": "9.11.1",
                        "minimum_wire_compatibility_version": "7.17.0"},
            "tagline": "You Know, for Search"});
        assert_eq!(cluster_version(&info), "8.15.0");
        assert!(supports_update(cluster_version(&info)));
        assert_eq!(cluster_version(&json!({"version": {"number": 8}})), "");
        assert_eq!(cluster_version(&Value::Null), "");
        assert!(!supports_update("99999999999.1"));
    }

    #[test]
    fn api_key_lookups() {
        let v = get_api_keys();
        let rd = role_descriptors_of(&v, "VuaCfGcBCdbkQm-e5aOx");
        assert_eq!(
            held_index_privileges(&rd),
            vec![
                ("logs-app-default".to_owned(), "create_doc".to_owned()),
                ("logs-app-default".to_owned(), "auto_configure".to_owned())
            ]
        );
        assert_eq!(
            restorable(&rd),
            json!({"rotd-s": {"cluster": ["monitor"], "indices": [
                {"names": ["logs-app-default"], "privileges": ["create_doc", "auto_configure"]}]}})
        );
        assert_eq!(role_descriptors_of(&v, "missing"), Value::Null);
        assert_eq!(
            role_descriptors_of(&json!({"api_keys": "x"}), "x"),
            Value::Null
        );
        assert_eq!(
            live_keys_named(&v, "rotd-s-01J0"),
            vec!["VuaCfGcBCdbkQm-e5aOx"]
        );
        assert!(live_keys_named(&v, "rotd-s-").is_empty());
        assert!(live_keys_named(&json!({"api_keys": [1, null, {"name": "n"}]}), "n").is_empty());
    }

    #[test]
    fn invalidate_answers() {
        let ok = json!({"invalidated_api_keys": ["VuaCfGcBCdbkQm-e5aOx"],
            "previously_invalidated_api_keys": [], "error_count": 0});
        assert_eq!(invalidate_errors(&ok), None);
        let bad = json!({"invalidated_api_keys": [], "previously_invalidated_api_keys": [],
            "error_count": 1, "error_details": [{"type": "exception",
            "reason": "error occurred while invalidating api keys",
            "caused_by": {"type": "illegal_argument_exception", "reason": "invalid api key id"}}]});
        assert_eq!(
            invalidate_errors(&bad).as_deref(),
            Some("DELETE /_security/api_key reported 1 error(s): exception: error occurred while invalidating api keys")
        );
        assert_eq!(invalidate_errors(&Value::Null), None);
        let v = get_api_keys();
        assert!(is_invalidated(&v, "H3_AhoIBA9hmeQJdg7ij"));
        assert!(!is_invalidated(&v, "VuaCfGcBCdbkQm-e5aOx"));
        assert!(!is_invalidated(
            &json!({"api_keys": [{"id": "a", "invalidated": "true"}]}),
            "a"
        ));
        // Not in the answer: nothing with that id can authenticate.
        assert!(is_invalidated(&json!({"api_keys": []}), "a"));
        // Not such an answer at all (a proxy's page, another shape): not confirmed.
        assert!(!is_invalidated(&Value::Null, "a"));
        assert!(!is_invalidated(&json!({"keys": []}), "a"));
        assert!(invalidate_errors(&json!({"error_count": "1"})).is_some());
        assert_eq!(invalidate_errors(&json!({"error_count": 0})), None);
    }

    #[test]
    fn probe_document_answers() {
        let indexed = json!({"_index": ".ds-logs-app-default-2024.06.01-000001",
            "_id": "W0tpsmIBdwcYyG50zbta", "_version": 1, "result": "created",
            "_shards": {"total": 2, "successful": 1, "failed": 0},
            "_seq_no": 0, "_primary_term": 1});
        assert_eq!(
            indexed_doc(&indexed),
            Some((
                ".ds-logs-app-default-2024.06.01-000001",
                "W0tpsmIBdwcYyG50zbta"
            ))
        );
        assert_eq!(indexed_doc(&json!({"_index": "i"})), None);
        let got = json!({"_index": ".ds-logs-app-default-2024.06.01-000001",
            "_id": "W0tpsmIBdwcYyG50zbta", "_version": 1, "found": true,
            "_source": {"@timestamp": "2024-06-01T00:00:00.000Z",
                        "rotd": {"rotation": "01J0", "secret": "s"}}});
        assert!(probe_doc_found(&got, "01J0"));
        assert!(!probe_doc_found(&got, "01J1"));
        assert!(!probe_doc_found(
            &json!({"_index": "i", "_id": "d", "found": false}),
            "01J0"
        ));
    }

    #[test]
    fn privilege_answers() {
        let declared = [IndexPermission {
            names: vec!["logs-app-default".into()],
            privileges: vec!["create_doc".into(), "auto_configure".into()],
        }];
        let absent = [("logs-app-default".to_owned(), "create".to_owned())];
        let check = PrivilegeCheck::new(&["monitor".to_owned()], &declared, &absent);
        assert_eq!(check.body["cluster"][0], "monitor");
        assert_eq!(
            check.body["index"][1],
            json!({"names": ["logs-app-default"], "privileges": ["create"]})
        );
        let mut index = serde_json::Map::new();
        for p in ["create_doc", "auto_configure"] {
            index.insert(p.into(), json!(true));
        }
        for p in EXCESS_INDEX.iter().chain(&["create"]) {
            index.insert((*p).into(), json!(false));
        }
        let mut cluster = serde_json::Map::new();
        cluster.insert("monitor".into(), json!(true));
        for p in EXCESS_CLUSTER {
            cluster.insert((*p).into(), json!(false));
        }
        let mut answer = json!({"username": "admin", "has_all_requested": false,
            "cluster": cluster, "index": {"logs-app-default": index}, "application": {}});
        assert_eq!(check.problems(&answer), Vec::<String>::new());
        answer["index"]["logs-app-default"]["read"] = json!(true);
        answer["cluster"]["monitor"] = json!("true");
        assert_eq!(
            check.problems(&answer),
            vec![
                "missing cluster privilege monitor".to_owned(),
                "excess index privilege read on logs-app-default".to_owned()
            ]
        );
        // An answer that is not an object fails every privilege.
        let n = check.problems(&Value::Null).len();
        assert_eq!(n, 1 + EXCESS_CLUSTER.len() + 2 + EXCESS_INDEX.len() + 1);
    }

    #[test]
    fn encoding() {
        let e = encoded("id1", &Secret::new("key".into()));
        assert_eq!(e.expose(), STANDARD.encode("id1:key"));
        assert_eq!(enc("rotd-a_b.c-01J"), "rotd-a_b.c-01J");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
        assert!(!format!("{:?}", Auth::api_key("i", &Secret::new("k".into()))).contains('k'));
    }
}
