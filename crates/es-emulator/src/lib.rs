//! In-process Elasticsearch 8.x emulator for rotd's integration tests.
//!
//! [`EsEmulator::start`] binds plain HTTP on `127.0.0.1:<free port>` and serves
//! requests from a dedicated thread that owns its own tokio runtime, so it works
//! from a plain `#[test]` as well as from a `#[tokio::test]`. Dropping the
//! emulator stops the server and joins the thread.
//!
//! Response shapes, status codes and error texts follow Elastic's published REST
//! API documentation for 8.x and the message formats used by Elasticsearch's
//! security layer (checked against the reference docs and the server source).
//!
//! # Reproduced behaviours
//!
//! * **Authentication**: `Authorization: Basic base64(user:pass)` for native
//!   realm users (realm `default_native`) and `Authorization: ApiKey
//!   base64(id:api_key)`. Every 401 is a `security_exception` in ES error shape
//!   whose `root_cause[0].header` and top-level `header` carry the three
//!   `WWW-Authenticate` challenges (`Basic realm="security", charset="UTF-8"`,
//!   `Bearer realm="security"`, `ApiKey`), which are also sent as HTTP headers.
//!   Texts: `missing authentication credentials for REST request [<uri>]`,
//!   `unable to authenticate user [<name>] for REST request [<uri>]`,
//!   `invalid basic authentication header value`, and for API keys
//!   `unable to authenticate with provided credentials and anonymous access is
//!   not allowed for this request` with `additional_unsuccessful_credentials`
//!   set to `API key: unable to find apikey with id <id>`,
//!   `API key: api key has been invalidated`, `API key: api key is expired` or
//!   `API key: invalid credentials for API key [<id>]`.
//! * **Authorization**: 403 `security_exception` with ES's denial text
//!   `action [<action>] is unauthorized for user [<u>] with effective roles [<r>]`
//!   / `for API key id [<id>] of user [<u>]`, `on indices [<i>]` for index
//!   actions, and `this action is granted by the cluster|index privileges [...]`.
//!   Privilege implication: cluster `all` ⊇ everything, `manage_security` ⊇
//!   `manage_api_key` ⊇ `manage_own_api_key`, `manage_security` ⊇
//!   `read_security`, `manage` ⊇ `monitor`; index `all` ⊇ everything, `write` ⊇
//!   `index` ⊇ `create` ⊇ `create_doc`, `write` ⊇ `delete`, `manage` ⊇
//!   `auto_configure`, `create_index`, `view_index_metadata`, `monitor`, ….
//!   Index name patterns with `*` wildcards; a pattern held in a role covers a
//!   requested pattern when it matches it textually (`logs-*` covers
//!   `logs-nginx-*`). Privileges on a data stream name grant the same access to
//!   its backing indices. Unknown privilege names are rejected with 400.
//! * **API keys** (`POST|PUT /_security/api_key`, `GET /_security/api_key`,
//!   `DELETE /_security/api_key`, `PUT /_security/api_key/<id>`): request
//!   validation (`action_request_validation_exception`, e.g. `api key name is
//!   required`), expiration strings (`d`, `h`, `m`, `s`, `ms`, `micros`,
//!   `nanos`), metadata, role descriptors. A key's effective privileges are its
//!   role descriptors intersected with the owner's privileges snapshot taken at
//!   creation/update time ("limited-by"); without role descriptors the key gets
//!   the snapshot. A key created by an API key must carry an explicit role
//!   descriptor that grants nothing, otherwise 400 `creating derived api keys
//!   requires an explicit role descriptor that is empty (has no privileges)` –
//!   this is what Elasticsearch does, so a derived key can never exceed (in fact
//!   never holds) privileges of its creator. `GET` by unknown `id` answers 404
//!   with `{"api_keys":[]}` (as `RestGetApiKeyAction` does); by unknown `name`
//!   200 with an empty list. `manage_own_api_key` restricts get/invalidate to
//!   the caller's own keys, an API key may always get its own info. Invalidate
//!   answers `invalidated_api_keys`, `previously_invalidated_api_keys`,
//!   `error_count` (+ `error_details` on errors). Update refuses API-key
//!   authentication, foreign/unknown keys (404 `resource_not_found_exception`),
//!   invalidated/expired keys (400 `illegal_argument_exception`), refreshes the
//!   owner snapshot and answers `{"updated": bool}` (false for a no-op).
//! * **`_has_privileges`** (`GET|POST /_security/user/_has_privileges`): cluster
//!   and index checks with the implication rules above; for an API key the
//!   answer reflects key ∩ owner. `application` is echoed as `{}`.
//! * **`_authenticate`**: `username`, `roles`, `authentication_realm`,
//!   `lookup_realm`, `authentication_type` (`realm` | `api_key`), `api_key`.
//! * **Change password** (`PUT|POST /_security/user/<name>/_password` and
//!   `/_security/user/_password`): allowed to `manage_security` or a native user
//!   changing their own password (not via an API key); min. 6 characters.
//! * **Documents**: `POST /<t>/_doc`, `PUT|POST /<t>/_doc/<id>` (`op_type`
//!   `index` or `create`), `PUT|POST /<t>/_create/<id>`; `refresh` accepted
//!   (`true` adds `forced_refresh`). Index API response shape with `_shards`,
//!   `_seq_no`, `_primary_term`; 409 `version_conflict_engine_exception` for a
//!   create on an existing id; `op_type=index` on an existing id updates it.
//!   Data streams: names matching the built-in templates `logs-*-*`,
//!   `metrics-*-*`, `traces-*-*`, `synthetics-*-*` (or created with
//!   [`EsEmulator::create_data_stream`]) are data streams with backing index
//!   `.ds-<name>-YYYY.MM.DD-000001`; only `op_type=create` is allowed (400
//!   `only write ops with an op_type of create are allowed in data streams`), a
//!   document without `@timestamp` is rejected with 400
//!   `document_parsing_exception` (`data stream timestamp field [@timestamp] is
//!   missing`). Auto-creating a missing index/data stream needs
//!   `auto_configure`, `create_index`, `manage` or `all` (`indices:admin/auto_create`),
//!   writing needs `create_doc`/`create`/`index`/`write`/`all`
//!   (`indices:data/write/bulk[s]`), `index` op_type needs `index`/`write`/`all`.
//! * **Reads**: `GET /<index>/_doc/<id>` (`found:true` shape; 404 `found:false`;
//!   404 `index_not_found_exception`; 400 when the target is a data stream name,
//!   as a concrete index is required) and `GET|POST /<t>/_search` with
//!   `match_all`, `ids`, and `term`/`match` on a field (exact equality), `size`
//!   and `from`; data stream names and `*` patterns expand to their indices.
//!   Both need `read`.
//! * **`GET /`** cluster info (`version.number` "8.15.0", configurable), needs
//!   `monitor`. `X-elastic-product: Elasticsearch` on every response.
//! * **Errors**: every error is `application/json` in ES shape. Unknown
//!   endpoints → 400 `no handler found for uri [..] and method [..]`; known path
//!   with the wrong method → 405 with `Allow`; bad JSON → 400
//!   `x_content_parse_exception` (document bodies: `document_parsing_exception`);
//!   unsupported `Content-Type` → 406. Hostile input never panics.
//! * **Fault injection** via [`Faults`] (settable at run time): create-key and
//!   index failures (persistent or first-`n`-calls) with ES-shaped 429/500/503
//!   bodies, failing invalidation (500 or 200 with `error_count`), a delay added
//!   to every response, a cluster that grants API keys more than requested
//!   (index `all` on `*`, role descriptors ignored), and failing any request.
//!
//! # Not reproduced
//!
//! TLS, HTTP/2, `_bulk`, `_update`, document `DELETE`, `HEAD` on documents,
//! index/data stream management APIs (`PUT /<index>`, `/_data_stream`,
//! templates, rollover), mappings/field types and `@timestamp` format checks,
//! the query DSL beyond `match_all`/`ids`/`term`/`match`, scoring, sorting,
//! aggregations, real refresh semantics (everything is visible at once),
//! replicas/routing, `run_as`, `_security/role` and `_security/user` CRUD,
//! application privileges, document/field level security, restricted system
//! indices, `grant`/`_query`/`_bulk_update`/cross-cluster API keys, service
//! accounts and tokens, anonymous access, deprecation warnings headers, the
//! `limited_by` privilege *subset* check ES does for `_has_privileges` with
//! wildcard index patterns (approximated textually), request-size limits and
//! circuit breakers. Simplifications to keep in mind: every user lives in the
//! `default_native` realm (real `elastic` is in `reserved`); "own keys" for
//! `manage_own_api_key` means "same username"; `_password` for an unknown user
//! answers 404 `resource_not_found_exception`; IDs are random base64url
//! strings of ES's length, not ES's time-based IDs. Time can be moved forward
//! with [`EsEmulator::advance_clock`] instead of sleeping.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use serde_json::{json, Map, Value};

const NATIVE_REALM: &str = "default_native";
const API_KEY_REALM: &str = "_es_api_key";
const WWW_AUTHENTICATE: [&str; 3] = [
    "Basic realm=\"security\", charset=\"UTF-8\"",
    "Bearer realm=\"security\"",
    "ApiKey",
];
const DATA_STREAM_TEMPLATES: [&str; 4] =
    ["logs-*-*", "metrics-*-*", "traces-*-*", "synthetics-*-*"];
const MAX_BODY: usize = 16 * 1024 * 1024;

const INDEX_PRIVILEGES: [&str; 23] = [
    "all",
    "auto_configure",
    "create",
    "create_doc",
    "create_index",
    "cross_cluster_replication",
    "cross_cluster_replication_internal",
    "delete",
    "delete_index",
    "index",
    "maintenance",
    "manage",
    "manage_data_stream_lifecycle",
    "manage_failure_store",
    "manage_follow_index",
    "manage_ilm",
    "manage_leader_index",
    "monitor",
    "none",
    "read",
    "read_cross_cluster",
    "view_index_metadata",
    "write",
];

const CLUSTER_PRIVILEGES: [&str; 42] = [
    "all",
    "cancel_task",
    "create_snapshot",
    "cross_cluster_replication",
    "cross_cluster_search",
    "delegate_pki",
    "grant_api_key",
    "manage",
    "manage_api_key",
    "manage_autoscaling",
    "manage_ccr",
    "manage_enrich",
    "manage_ilm",
    "manage_index_templates",
    "manage_inference",
    "manage_ingest_pipelines",
    "manage_logstash_pipelines",
    "manage_ml",
    "manage_oidc",
    "manage_own_api_key",
    "manage_pipeline",
    "manage_rollup",
    "manage_saml",
    "manage_security",
    "manage_service_account",
    "manage_slm",
    "manage_token",
    "manage_transform",
    "manage_user_profile",
    "manage_watcher",
    "monitor",
    "monitor_enrich",
    "monitor_ml",
    "monitor_snapshot",
    "monitor_transform",
    "monitor_watcher",
    "none",
    "read_ccr",
    "read_ilm",
    "read_pipeline",
    "read_security",
    "read_slm",
];

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// A running emulator. Dropping it shuts the server down.
pub struct EsEmulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Inspection view of a stored API key.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    /// The secret part (`api_key` in the create response).
    pub api_key: String,
    pub invalidated: bool,
    /// Creation time, ms since the epoch (emulator clock).
    pub creation: u64,
    /// Expiration, ms since the epoch, when set.
    pub expiration: Option<u64>,
    pub metadata: Value,
    /// Role descriptors as given at creation / last update (`{}` when none).
    pub role_descriptors: Value,
    /// Username of the owner (the creator, or the owner of the creating key).
    pub creator: String,
    /// Id of the API key that created this key, for derived keys.
    pub created_by_api_key: Option<String>,
}

/// How an injected invalidation failure looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidateFault {
    /// The invalidate call answers 500.
    ServerError,
    /// The call answers 200 with `invalidated_api_keys: []`, `error_count` =
    /// number of matched keys and `error_details`; nothing is invalidated.
    ReportErrors,
}

/// One fault knob: a status code and how many more calls it applies to.
#[derive(Default)]
struct FaultKnob {
    status: AtomicU16,
    /// `u32::MAX` means "every call".
    remaining: AtomicU32,
}

impl FaultKnob {
    fn set(&self, status: Option<u16>, count: u32) {
        self.remaining.store(count, Ordering::SeqCst);
        self.status.store(status.unwrap_or(0), Ordering::SeqCst);
    }

    fn take(&self) -> Option<u16> {
        let status = self.status.load(Ordering::SeqCst);
        if status == 0 {
            return None;
        }
        let taken = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u32::MAX => Some(u32::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        taken.then_some(status)
    }
}

/// Fault-injection knobs; all setters take `&self` and apply immediately.
#[derive(Default)]
pub struct Faults {
    create_key: FaultKnob,
    index: FaultKnob,
    any: FaultKnob,
    invalidate: AtomicU8,
    delay_ms: AtomicU64,
    grant_extra: AtomicBool,
    lose_create_answer: FaultKnob,
    create_answer_patch: Mutex<Option<Value>>,
}

impl Faults {
    /// Every create-API-key call fails with `status` (ES-shaped body), or stops failing with `None`.
    pub fn fail_create_key_with(&self, status: Option<u16>) {
        self.create_key.set(status, u32::MAX);
    }

    /// The next `n` create-API-key calls fail with `status`, later ones succeed.
    pub fn fail_create_key_next(&self, n: u32, status: u16) {
        self.create_key.set(Some(status), n);
    }

    /// Every document write fails with `status` (e.g. 503), or stops failing with `None`.
    pub fn fail_index_with(&self, status: Option<u16>) {
        self.index.set(status, u32::MAX);
    }

    /// The next `n` document writes fail with `status`.
    pub fn fail_index_next(&self, n: u32, status: u16) {
        self.index.set(Some(status), n);
    }

    /// Make the invalidate call fail, or behave again with `None`.
    pub fn fail_invalidate(&self, mode: Option<InvalidateFault>) {
        let v = match mode {
            None => 0,
            Some(InvalidateFault::ServerError) => 1,
            Some(InvalidateFault::ReportErrors) => 2,
        };
        self.invalidate.store(v, Ordering::SeqCst);
    }

    /// Add `delay` before every response (zero disables).
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Keys created while this is on get index `all` on `*` on top of what was
    /// requested and ignore the owner limitation: a cluster that ignores role descriptors.
    pub fn grant_extra_privileges(&self, on: bool) {
        self.grant_extra.store(on, Ordering::SeqCst);
    }

    /// The next `n` requests of any kind fail with `status` before authentication.
    pub fn fail_any_next(&self, n: u32, status: u16) {
        self.any.set(Some(status), n);
    }

    /// Every request fails with `status`, or stops failing with `None`.
    pub fn fail_any_with(&self, status: Option<u16>) {
        self.any.set(status, u32::MAX);
    }

    /// Switch every fault off.
    pub fn reset(&self) {
        self.fail_create_key_with(None);
        self.fail_index_with(None);
        self.fail_any_with(None);
        self.fail_invalidate(None);
        self.set_delay(Duration::ZERO);
        self.grant_extra_privileges(false);
        self.lose_create_answer_next(0, 502);
        self.patch_create_answer(None);
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }

    fn invalidate_mode(&self) -> Option<InvalidateFault> {
        match self.invalidate.load(Ordering::SeqCst) {
            1 => Some(InvalidateFault::ServerError),
            2 => Some(InvalidateFault::ReportErrors),
            _ => None,
        }
    }
}

impl EsEmulator {
    /// Start the emulator on `127.0.0.1:<free port>`.
    pub fn start() -> EsEmulator {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("es-emulator: bind");
        listener
            .set_nonblocking(true)
            .expect("es-emulator: set_nonblocking");
        let addr = listener.local_addr().expect("es-emulator: local_addr");
        let shared = Arc::new(Shared::default());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("es-emulator".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("es-emulator: runtime");
                rt.block_on(serve(listener, server_shared, rx));
            })
            .expect("es-emulator: spawn");
        EsEmulator {
            shared,
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Add (or replace) a native realm user. A superuser holds cluster `all`
    /// and index `all` on `*` (role `superuser`); otherwise the user has no privileges.
    pub fn add_user(&self, name: &str, password: &str, superuser: bool) {
        let (roles, perms) = if superuser {
            (vec!["superuser".to_string()], vec![Role::superuser()])
        } else {
            (Vec::new(), Vec::new())
        };
        self.state().users.insert(
            name.to_string(),
            User {
                password: password.to_string(),
                roles,
                perms,
            },
        );
    }

    /// Add (or replace) a native realm user holding one role named
    /// `<name>_role` with the given cluster and index privileges
    /// (`indices` = `[(names, privileges)]`).
    pub fn add_role_user(
        &self,
        name: &str,
        password: &str,
        cluster: &[&str],
        indices: &[(&[&str], &[&str])],
    ) {
        let role = Role {
            cluster: cluster.iter().map(|s| s.to_string()).collect(),
            indices: indices
                .iter()
                .map(|(names, privs)| IndexGrant {
                    names: names.iter().map(|s| s.to_string()).collect(),
                    privileges: privs.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        };
        self.state().users.insert(
            name.to_string(),
            User {
                password: password.to_string(),
                roles: vec![format!("{name}_role")],
                perms: vec![role],
            },
        );
    }

    /// Current password of a native user (to verify password rotation).
    pub fn user_password(&self, name: &str) -> Option<String> {
        self.state().users.get(name).map(|u| u.password.clone())
    }

    /// Create a data stream (and its first backing index) unless it exists.
    pub fn create_data_stream(&self, name: &str) {
        let mut st = self.state();
        let now = st.now_ms();
        st.ensure_data_stream(name, now);
    }

    /// Names of all data streams.
    pub fn data_streams(&self) -> Vec<String> {
        self.state().data_streams.keys().cloned().collect()
    }

    /// All stored API keys, in creation order.
    pub fn api_keys(&self) -> Vec<ApiKeyInfo> {
        self.state().keys.iter().map(ApiKeyRec::info).collect()
    }

    /// Invalidate a key out of band (as if another admin had done it).
    pub fn invalidate_api_key(&self, id: &str) -> bool {
        let mut st = self.state();
        let now = st.now_ms();
        match st.keys.iter_mut().find(|k| k.id == id) {
            Some(k) => {
                if !k.invalidated {
                    k.invalidated = true;
                    k.invalidation = Some(now);
                }
                true
            }
            None => false,
        }
    }

    /// `_source` of every document in an index, or in a data stream's backing indices.
    pub fn documents(&self, index_or_ds: &str) -> Vec<Value> {
        let st = self.state();
        st.concrete_indices(index_or_ds)
            .iter()
            .filter_map(|i| st.indices.get(i))
            .flat_map(|i| i.docs.iter().map(|d| d.source.clone()))
            .collect()
    }

    /// Fault-injection knobs.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Version reported by `GET /` (default "8.15.0").
    pub fn set_version(&self, version: &str) {
        self.state().version = version.to_string();
    }

    /// Move the emulator clock forward (expires API keys without sleeping).
    pub fn advance_clock(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let mut st = self.state();
        st.clock_offset_ms = st.clock_offset_ms.saturating_add(ms);
    }

    /// Every request seen so far as `"METHOD /path?query"`.
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }
}

impl Drop for EsEmulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Server plumbing
// ---------------------------------------------------------------------------

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("es-emulator: listener");
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(_) => Err(()),
    };
    let delay = shared.faults.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let reply = match body {
        Ok(body) => shared.dispatch(&parts.method, &parts.uri, &parts.headers, &body),
        Err(()) => EsError::new(
            413,
            "content_too_long_exception",
            "request body is too large",
        )
        .reply(),
    };
    reply.into_response(parts.method == Method::HEAD)
}

struct Reply {
    status: u16,
    body: Value,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply::with(200, body)
    }

    fn with(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body,
            headers: Vec::new(),
        }
    }

    fn into_response(self, head: bool) -> Response<Full<Bytes>> {
        let bytes = if head {
            Bytes::new()
        } else {
            Bytes::from(serde_json::to_vec(&self.body).unwrap_or_default())
        };
        let mut builder = Response::builder()
            .status(StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-type", "application/json")
            .header("x-elastic-product", "Elasticsearch");
        for (name, value) in self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Full::new(bytes))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

/// An Elasticsearch error response.
struct EsError {
    status: u16,
    etype: &'static str,
    reason: String,
    /// Extra fields added to both the root cause and the top-level error.
    extra: Map<String, Value>,
    caused_by: Option<Box<Value>>,
    headers: Vec<(&'static str, String)>,
    /// ES answers some REST-layer errors (405) with `{"error": "<text>", "status": N}`.
    plain: bool,
}

impl EsError {
    fn new(status: u16, etype: &'static str, reason: impl Into<String>) -> EsError {
        EsError {
            status,
            etype,
            reason: reason.into(),
            extra: Map::new(),
            caused_by: None,
            headers: Vec::new(),
            plain: false,
        }
    }

    fn field(mut self, key: &str, value: Value) -> EsError {
        self.extra.insert(key.to_string(), value);
        self
    }

    fn bad_request(etype: &'static str, reason: impl Into<String>) -> EsError {
        EsError::new(400, etype, reason)
    }

    fn validation(problems: &[String]) -> EsError {
        let mut reason = String::from("Validation Failed: ");
        for (i, p) in problems.iter().enumerate() {
            reason.push_str(&format!("{}: {};", i + 1, p));
        }
        EsError::bad_request("action_request_validation_exception", reason)
    }

    fn unauthenticated(reason: impl Into<String>) -> EsError {
        let mut e = EsError::new(401, "security_exception", reason)
            .field("header", json!({ "WWW-Authenticate": WWW_AUTHENTICATE }));
        for challenge in WWW_AUTHENTICATE {
            e.headers.push(("www-authenticate", challenge.to_string()));
        }
        e
    }

    fn index_not_found(index: &str) -> EsError {
        EsError::new(
            404,
            "index_not_found_exception",
            format!("no such index [{index}]"),
        )
        .field("resource.type", json!("index_or_alias"))
        .field("resource.id", json!(index))
        .field("index_uuid", json!("_na_"))
        .field("index", json!(index))
    }

    fn reply(self) -> Reply {
        if self.plain {
            return Reply {
                status: self.status,
                body: json!({ "error": self.reason, "status": self.status }),
                headers: self.headers,
            };
        }
        let mut cause = Map::new();
        cause.insert("type".into(), json!(self.etype));
        cause.insert("reason".into(), json!(self.reason));
        for (k, v) in &self.extra {
            cause.insert(k.clone(), v.clone());
        }
        let mut top = cause.clone();
        if let Some(caused_by) = self.caused_by {
            top.insert("caused_by".into(), *caused_by);
        }
        top.insert("root_cause".into(), json!([Value::Object(cause)]));
        Reply {
            status: self.status,
            body: json!({ "error": Value::Object(top), "status": self.status }),
            headers: self.headers,
        }
    }
}

/// The ES-shaped body of an injected failure.
fn fault_error(status: u16, what: &str) -> EsError {
    match status {
        429 => EsError::new(
            429,
            "es_rejected_execution_exception",
            format!("rejected execution of {what} operation [queue capacity reached] (injected fault)"),
        ),
        503 if what == "index" => EsError::new(
            503,
            "unavailable_shards_exception",
            "[0] primary shard is not active Timeout: [1m] (injected fault)",
        ),
        503 => EsError::new(
            503,
            "cluster_block_exception",
            "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered / initialized]; (injected fault)",
        ),
        500 => EsError::new(500, "exception", format!("{what} failed (injected fault)")),
        s => EsError::new(s, "status_exception", format!("{what} failed (injected fault)")),
    }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    faults: Faults,
    log: Mutex<Vec<String>>,
}

struct State {
    users: BTreeMap<String, User>,
    keys: Vec<ApiKeyRec>,
    indices: BTreeMap<String, Index>,
    data_streams: BTreeMap<String, Vec<String>>,
    version: String,
    clock_offset_ms: u64,
}

impl Default for State {
    fn default() -> State {
        State {
            users: BTreeMap::new(),
            keys: Vec::new(),
            indices: BTreeMap::new(),
            data_streams: BTreeMap::new(),
            version: "8.15.0".to_string(),
            clock_offset_ms: 0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Role {
    cluster: Vec<String>,
    indices: Vec<IndexGrant>,
}

#[derive(Clone, Debug, PartialEq)]
struct IndexGrant {
    names: Vec<String>,
    privileges: Vec<String>,
}

impl Role {
    fn superuser() -> Role {
        Role {
            cluster: vec!["all".into()],
            indices: vec![IndexGrant {
                names: vec!["*".into()],
                privileges: vec!["all".into()],
            }],
        }
    }

    fn grants_cluster(&self, wanted: &str) -> bool {
        self.cluster.iter().any(|h| cluster_implies(h, wanted))
    }

    fn grants_index(&self, index: &str, wanted: &str) -> bool {
        self.indices.iter().any(|g| {
            g.names.iter().any(|n| glob_match(n, index))
                && g.privileges.iter().any(|h| index_implies(h, wanted))
        })
    }
}

struct User {
    password: String,
    roles: Vec<String>,
    perms: Vec<Role>,
}

struct ApiKeyRec {
    id: String,
    secret: String,
    name: String,
    creation: u64,
    expiration: Option<u64>,
    invalidated: bool,
    invalidation: Option<u64>,
    metadata: Value,
    role_descriptors: Value,
    /// Parsed role descriptors; `None` when none were given (key = owner snapshot).
    assigned: Option<Vec<Role>>,
    /// Owner's privileges snapshot (one or more layers, intersected).
    limited_by: Vec<Vec<Role>>,
    owner: String,
    realm: String,
    created_by_key: Option<String>,
    /// Created under the `grant_extra_privileges` fault.
    extra: bool,
}

impl ApiKeyRec {
    fn info(&self) -> ApiKeyInfo {
        ApiKeyInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            api_key: self.secret.clone(),
            invalidated: self.invalidated,
            creation: self.creation,
            expiration: self.expiration,
            metadata: self.metadata.clone(),
            role_descriptors: self.role_descriptors.clone(),
            creator: self.owner.clone(),
            created_by_api_key: self.created_by_key.clone(),
        }
    }

    fn layers(&self) -> Vec<Vec<Role>> {
        if self.extra {
            let mut roles = self.assigned.clone().unwrap_or_default();
            roles.push(Role {
                cluster: Vec::new(),
                indices: vec![IndexGrant {
                    names: vec!["*".into()],
                    privileges: vec!["all".into()],
                }],
            });
            return vec![roles];
        }
        let mut layers = self.limited_by.clone();
        if let Some(assigned) = &self.assigned {
            layers.push(assigned.clone());
        }
        layers
    }

    fn expired(&self, now: u64) -> bool {
        self.expiration.is_some_and(|e| e <= now)
    }

    fn json(&self, with_limited_by: bool) -> Value {
        let mut o = Map::new();
        o.insert("id".into(), json!(self.id));
        o.insert("name".into(), json!(self.name));
        o.insert("type".into(), json!("rest"));
        o.insert("creation".into(), json!(self.creation));
        if let Some(e) = self.expiration {
            o.insert("expiration".into(), json!(e));
        }
        o.insert("invalidated".into(), json!(self.invalidated));
        if let Some(i) = self.invalidation {
            o.insert("invalidation".into(), json!(i));
        }
        o.insert("username".into(), json!(self.owner));
        o.insert("realm".into(), json!(self.realm));
        o.insert(
            "realm_type".into(),
            json!(if self.realm == API_KEY_REALM {
                API_KEY_REALM
            } else {
                "native"
            }),
        );
        o.insert("metadata".into(), self.metadata.clone());
        o.insert("role_descriptors".into(), self.role_descriptors.clone());
        if with_limited_by {
            let layers: Vec<Value> = self
                .limited_by
                .iter()
                .map(|layer| {
                    let mut m = Map::new();
                    for (i, role) in layer.iter().enumerate() {
                        m.insert(format!("role_{i}"), role_json(role));
                    }
                    Value::Object(m)
                })
                .collect();
            o.insert("limited_by".into(), Value::Array(layers));
        }
        Value::Object(o)
    }
}

fn role_json(role: &Role) -> Value {
    json!({
        "cluster": role.cluster,
        "indices": role.indices.iter().map(|g| json!({
            "names": g.names,
            "privileges": g.privileges,
            "allow_restricted_indices": false,
        })).collect::<Vec<_>>(),
        "applications": [],
        "run_as": [],
        "metadata": {},
        "transient_metadata": {"enabled": true},
    })
}

struct Index {
    docs: Vec<Doc>,
    next_seq: u64,
    data_stream: Option<String>,
}

struct Doc {
    id: String,
    source: Value,
    version: u64,
    seq_no: u64,
}

/// The authenticated caller.
struct Principal {
    username: String,
    roles: Vec<String>,
    /// `(id, name)` when authenticated by API key.
    api_key: Option<(String, String)>,
    layers: Vec<Vec<Role>>,
}

impl Principal {
    fn describe(&self) -> String {
        match &self.api_key {
            Some((id, _)) => format!("API key id [{id}] of user [{}]", self.username),
            None => format!(
                "user [{}] with effective roles [{}]",
                self.username,
                self.roles.join(",")
            ),
        }
    }

    fn cluster(&self, wanted: &str) -> bool {
        !self.layers.is_empty()
            && self
                .layers
                .iter()
                .all(|layer| layer.iter().any(|r| r.grants_cluster(wanted)))
    }

    fn index(&self, index: &str, wanted: &str) -> bool {
        !self.layers.is_empty()
            && self
                .layers
                .iter()
                .all(|layer| layer.iter().any(|r| r.grants_index(index, wanted)))
    }

    fn deny_cluster(&self, action: &str, granted_by: &str) -> EsError {
        EsError::new(
            403,
            "security_exception",
            format!(
                "action [{action}] is unauthorized for {}, this action is granted by the cluster privileges [{granted_by}]",
                self.describe()
            ),
        )
    }

    fn deny_index(&self, action: &str, index: &str, granted_by: &str) -> EsError {
        EsError::new(
            403,
            "security_exception",
            format!(
                "action [{action}] is unauthorized for {} on indices [{index}], this action is granted by the index privileges [{granted_by}]",
                self.describe()
            ),
        )
    }

    fn require_cluster(&self, action: &str, any_of: &[&str]) -> Result<(), EsError> {
        if any_of.iter().any(|p| self.cluster(p)) {
            Ok(())
        } else {
            Err(self.deny_cluster(action, &any_of.join(",")))
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dispatch(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Reply {
        let raw_uri = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| uri.path().to_string());
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{method} {raw_uri}"));
        match self.dispatch_inner(method, uri, &raw_uri, headers, body) {
            Ok(reply) => reply,
            Err(e) => e.reply(),
        }
    }

    fn dispatch_inner(
        &self,
        method: &Method,
        uri: &Uri,
        raw_uri: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Reply, EsError> {
        if let Some(status) = self.faults.any.take() {
            return Err(fault_error(status, "request"));
        }
        let segs: Vec<String> = uri
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect();
        let params = parse_query(uri.query());
        let route = route(method, &segs, uri.path())?;

        if !body.is_empty() {
            if let Some(ct) = headers.get("content-type") {
                let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
                let mime = ct.split(';').next().unwrap_or("").trim().to_string();
                let ok = matches!(
                    mime.as_str(),
                    "application/json"
                        | "application/x-ndjson"
                        | "application/vnd.elasticsearch+json"
                        | "application/vnd.elasticsearch+x-ndjson"
                );
                if !ok {
                    return Ok(Reply::with(
                        406,
                        json!({
                            "error": format!("Content-Type header [{ct}] is not supported"),
                            "status": 406
                        }),
                    ));
                }
            }
        }

        let mut st = self.state();
        let now = st.now_ms();
        let auth = headers
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("\u{0}").to_string());
        let who = st.authenticate(auth.as_deref(), raw_uri, now)?;

        match route {
            Route::Root => st.root(&who),
            Route::Authenticate => Ok(authenticate_json(&who)),
            Route::CreateKey => {
                who.require_cluster(
                    "cluster:admin/xpack/security/api_key/create",
                    &[
                        "manage_own_api_key",
                        "manage_api_key",
                        "manage_security",
                        "all",
                    ],
                )?;
                if let Some(status) = self.faults.create_key.take() {
                    return Err(fault_error(status, "create api key"));
                }
                let extra = self.faults.grant_extra.load(Ordering::SeqCst);
                let reply = st.create_key(&who, body, now, extra)?;
                self.faults.after_create(reply)
            }
            Route::GetKeys => st.get_keys(&who, &params, now),
            Route::InvalidateKeys => {
                st.invalidate_keys(&who, body, now, self.faults.invalidate_mode())
            }
            Route::UpdateKey(id) => st.update_key(&who, &id, body, now),
            Route::HasPrivileges => st.has_privileges(&who, body),
            Route::ChangePassword(user) => st.change_password(&who, user.as_deref(), body),
            Route::IndexDoc { target, id, create } => {
                st.index_doc(&who, &target, id, create, &params, body, now, &self.faults)
            }
            Route::GetDoc { target, id } => st.get_doc(&who, &target, &id),
            Route::Search { target } => st.search(&who, target.as_deref(), &params, body),
        }
    }
}

enum Route {
    Root,
    Authenticate,
    CreateKey,
    GetKeys,
    InvalidateKeys,
    UpdateKey(String),
    HasPrivileges,
    ChangePassword(Option<String>),
    IndexDoc {
        target: String,
        id: Option<String>,
        create: bool,
    },
    GetDoc {
        target: String,
        id: String,
    },
    Search {
        target: Option<String>,
    },
}

fn route(method: &Method, segs: &[String], path: &str) -> Result<Route, EsError> {
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = method.as_str();
    let allowed = |ok: &[&str]| -> Result<(), EsError> {
        if ok.contains(&m) {
            Ok(())
        } else {
            Err(method_not_allowed(path, m, ok))
        }
    };
    let route = match s.as_slice() {
        [] => {
            allowed(&["GET", "HEAD"])?;
            Route::Root
        }
        ["_security", "_authenticate"] => {
            allowed(&["GET"])?;
            Route::Authenticate
        }
        ["_security", "api_key"] => {
            allowed(&["GET", "POST", "PUT", "DELETE"])?;
            match m {
                "GET" => Route::GetKeys,
                "DELETE" => Route::InvalidateKeys,
                _ => Route::CreateKey,
            }
        }
        ["_security", "api_key", id]
            if !matches!(*id, "grant" | "_bulk_update" | "_query" | "cross_cluster") =>
        {
            allowed(&["PUT"])?;
            Route::UpdateKey(id.to_string())
        }
        ["_security", "user", "_has_privileges"] => {
            allowed(&["GET", "POST"])?;
            Route::HasPrivileges
        }
        ["_security", "user", "_password"] => {
            allowed(&["PUT", "POST"])?;
            Route::ChangePassword(None)
        }
        ["_security", "user", name, "_password"] => {
            allowed(&["PUT", "POST"])?;
            Route::ChangePassword(Some(name.to_string()))
        }
        ["_search"] => {
            allowed(&["GET", "POST"])?;
            Route::Search { target: None }
        }
        [t, "_search"] if !t.starts_with('_') => {
            allowed(&["GET", "POST"])?;
            Route::Search {
                target: Some(t.to_string()),
            }
        }
        [t, "_doc"] if !t.starts_with('_') => {
            allowed(&["POST"])?;
            Route::IndexDoc {
                target: t.to_string(),
                id: None,
                create: false,
            }
        }
        [t, "_doc", id] if !t.starts_with('_') && (m == "GET" || m == "HEAD") => Route::GetDoc {
            target: t.to_string(),
            id: id.to_string(),
        },
        [t, "_doc", id] if !t.starts_with('_') && (m == "PUT" || m == "POST") => Route::IndexDoc {
            target: t.to_string(),
            id: Some(id.to_string()),
            create: false,
        },
        [t, "_create", id] if !t.starts_with('_') => {
            allowed(&["PUT", "POST"])?;
            Route::IndexDoc {
                target: t.to_string(),
                id: Some(id.to_string()),
                create: true,
            }
        }
        _ => {
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                format!("no handler found for uri [{path}] and method [{m}]"),
            ))
        }
    };
    Ok(route)
}

fn method_not_allowed(path: &str, method: &str, ok: &[&str]) -> EsError {
    let mut e = EsError::new(
        405,
        "method_not_allowed",
        format!(
            "Incorrect HTTP method for uri [{path}] and method [{method}], allowed: [{}]",
            ok.join(", ")
        ),
    );
    e.headers.push(("allow", ok.join(",")));
    e.plain = true;
    e
}

fn authenticate_json(who: &Principal) -> Reply {
    let mut o = json!({
        "username": who.username,
        "roles": who.roles,
        "full_name": null,
        "email": null,
        "metadata": {},
        "enabled": true,
    });
    match &who.api_key {
        Some((id, name)) => {
            o["authentication_realm"] = json!({"name": API_KEY_REALM, "type": API_KEY_REALM});
            o["lookup_realm"] = json!({"name": API_KEY_REALM, "type": API_KEY_REALM});
            o["authentication_type"] = json!("api_key");
            o["api_key"] = json!({"id": id, "name": name});
        }
        None => {
            o["authentication_realm"] = json!({"name": NATIVE_REALM, "type": "native"});
            o["lookup_realm"] = json!({"name": NATIVE_REALM, "type": "native"});
            o["authentication_type"] = json!("realm");
        }
    }
    Reply::ok(o)
}

impl State {
    fn now_ms(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        real.saturating_add(self.clock_offset_ms)
    }

    fn authenticate(
        &self,
        header: Option<&str>,
        uri: &str,
        now: u64,
    ) -> Result<Principal, EsError> {
        let Some(header) = header else {
            return Err(EsError::unauthenticated(format!(
                "missing authentication credentials for REST request [{uri}]"
            )));
        };
        let header = header.trim();
        let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = STANDARD
                .decode(value)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    EsError::unauthenticated("invalid basic authentication header encoding")
                })?;
            let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                EsError::unauthenticated("invalid basic authentication header value")
            })?;
            match self.users.get(user) {
                Some(u) if u.password == pass => Ok(Principal {
                    username: user.to_string(),
                    roles: u.roles.clone(),
                    api_key: None,
                    layers: vec![u.perms.clone()],
                }),
                _ => Err(EsError::unauthenticated(format!(
                    "unable to authenticate user [{user}] for REST request [{uri}]"
                ))),
            }
        } else if scheme.eq_ignore_ascii_case("apikey") {
            let anon = "unable to authenticate with provided credentials and anonymous access is not allowed for this request";
            let decoded = STANDARD
                .decode(value)
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            let Some((id, secret)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
                return Err(EsError::unauthenticated(anon).field(
                    "additional_unsuccessful_credentials",
                    json!("API key: invalid ApiKey value"),
                ));
            };
            let fail = |why: String| {
                EsError::unauthenticated(anon).field(
                    "additional_unsuccessful_credentials",
                    json!(format!("API key: {why}")),
                )
            };
            let Some(key) = self.keys.iter().find(|k| k.id == id) else {
                return Err(fail(format!("unable to find apikey with id {id}")));
            };
            if key.invalidated {
                return Err(fail("api key has been invalidated".into()));
            }
            if key.secret != secret {
                return Err(fail(format!("invalid credentials for API key [{id}]")));
            }
            if key.expired(now) {
                return Err(fail("api key is expired".into()));
            }
            Ok(Principal {
                username: key.owner.clone(),
                roles: Vec::new(),
                api_key: Some((key.id.clone(), key.name.clone())),
                layers: key.layers(),
            })
        } else {
            Err(EsError::unauthenticated(
                "unable to authenticate with provided credentials and anonymous access is not allowed for this request",
            ))
        }
    }

    fn root(&self, who: &Principal) -> Result<Reply, EsError> {
        who.require_cluster("cluster:monitor/main", &["monitor", "manage", "all"])?;
        Ok(Reply::ok(json!({
            "name": "es-emulator",
            "cluster_name": "rotd-emulator",
            "cluster_uuid": "rotdEmulatorClusterU",
            "version": {
                "number": self.version,
                "build_flavor": "default",
                "build_type": "docker",
                "build_hash": "0000000000000000000000000000000000000000",
                "build_date": "2024-08-05T10:05:34.233336849Z",
                "build_snapshot": false,
                "lucene_version": "9.11.1",
                "minimum_wire_compatibility_version": "7.17.0",
                "minimum_index_compatibility_version": "7.0.0"
            },
            "tagline": "You Know, for Search"
        })))
    }

    // ---------------------------------------------------------------- API keys

    fn create_key(
        &mut self,
        who: &Principal,
        body: &[u8],
        now: u64,
        extra: bool,
    ) -> Result<Reply, EsError> {
        let body = parse_json_body(body)?;
        let obj = match &body {
            Value::Null => Map::new(),
            Value::Object(o) => o.clone(),
            _ => return Err(parse_error("request body must be an object")),
        };
        check_fields(
            &obj,
            &["name", "expiration", "role_descriptors", "metadata", "type"],
            "api_key_request",
        )?;
        let name = match obj.get("name") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(parse_error(
                    "[api_key_request] failed to parse field [name]",
                ))
            }
        };
        let mut problems = Vec::new();
        match &name {
            None => problems.push("api key name is required".to_string()),
            Some(n) if n.is_empty() => problems.push("api key name is required".to_string()),
            Some(n) => {
                if n.chars().count() > 1024 {
                    problems
                        .push("api key name may not be more than [1024] characters long".into());
                }
                if n.trim() != n {
                    problems.push("api key name may not begin or end with whitespace".into());
                }
                if n.starts_with('_') {
                    problems.push("api key name may not begin with an underscore".into());
                }
            }
        }
        let metadata = match obj.get("metadata") {
            None | Some(Value::Null) => json!({}),
            Some(Value::Object(m)) => {
                if m.keys().any(|k| k.starts_with('_')) {
                    problems.push("API key metadata keys may not start with [_]".into());
                }
                Value::Object(m.clone())
            }
            Some(_) => {
                return Err(parse_error(
                    "[api_key_request] failed to parse field [metadata]",
                ))
            }
        };
        if !problems.is_empty() {
            return Err(EsError::validation(&problems));
        }
        let expiration = match obj.get("expiration") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(now.saturating_add(parse_time_value(s, "expiration")?)),
            Some(_) => {
                return Err(parse_error(
                    "[api_key_request] failed to parse field [expiration]",
                ))
            }
        };
        let (role_descriptors, assigned) = parse_role_descriptors(obj.get("role_descriptors"))?;

        let (limited_by, realm, created_by_key) = match &who.api_key {
            Some((key_id, _)) => {
                // ES: a key created with an API key must carry an explicit,
                // privilege-free role descriptor.
                let grants_any = match &assigned {
                    None => true,
                    Some(roles) => roles.iter().any(|r| *r != Role::default()),
                };
                if grants_any {
                    return Err(EsError::bad_request(
                        "illegal_argument_exception",
                        "creating derived api keys requires an explicit role descriptor that is empty (has no privileges)",
                    ));
                }
                (
                    who.layers.clone(),
                    API_KEY_REALM.to_string(),
                    Some(key_id.clone()),
                )
            }
            None => (who.layers.clone(), NATIVE_REALM.to_string(), None),
        };
        let rec = ApiKeyRec {
            id: random_token(15),
            secret: random_token(16),
            name: name.unwrap_or_default(),
            creation: now,
            expiration,
            invalidated: false,
            invalidation: None,
            metadata,
            role_descriptors,
            assigned,
            limited_by,
            owner: who.username.clone(),
            realm,
            created_by_key,
            extra,
        };
        let mut out = Map::new();
        out.insert("id".into(), json!(rec.id));
        out.insert("name".into(), json!(rec.name));
        if let Some(e) = rec.expiration {
            out.insert("expiration".into(), json!(e));
        }
        out.insert("api_key".into(), json!(rec.secret));
        out.insert(
            "encoded".into(),
            json!(STANDARD.encode(format!("{}:{}", rec.id, rec.secret))),
        );
        self.keys.push(rec);
        Ok(Reply::ok(Value::Object(out)))
    }

    /// Whether `who` may see/manage `key` given its cluster privileges.
    fn owns(who: &Principal, key: &ApiKeyRec) -> bool {
        key.owner == who.username
    }

    fn get_keys(
        &self,
        who: &Principal,
        params: &BTreeMap<String, String>,
        now: u64,
    ) -> Result<Reply, EsError> {
        let id = params.get("id").filter(|s| !s.is_empty()).cloned();
        let name = params.get("name").filter(|s| !s.is_empty()).cloned();
        let username = params.get("username").filter(|s| !s.is_empty()).cloned();
        let realm = params.get("realm_name").filter(|s| !s.is_empty()).cloned();
        let owner = flag(params, "owner")?;
        let with_limited_by = flag(params, "with_limited_by")?;
        let active_only = flag(params, "active_only")?;
        if owner && (username.is_some() || realm.is_some()) {
            return Err(EsError::validation(&[
                "username or realm name must not be specified when retrieving owned API keys"
                    .into(),
            ]));
        }
        let action = "cluster:admin/xpack/security/api_key/get";
        let all_keys = who.cluster("manage_api_key") || who.cluster("read_security");
        let own_self = who
            .api_key
            .as_ref()
            .is_some_and(|(kid, _)| id.as_deref() == Some(kid.as_str()));
        let only_own = if all_keys {
            owner
        } else if who.cluster("manage_own_api_key") {
            let asks_own = owner
                || (username.as_deref() == Some(who.username.as_str())
                    && realm.as_deref().map_or(true, |r| r == NATIVE_REALM));
            if !asks_own && !own_self {
                return Err(who.deny_cluster(
                    action,
                    "read_security,manage_own_api_key,manage_api_key,manage_security,all",
                ));
            }
            true
        } else if own_self {
            true
        } else {
            return Err(who.deny_cluster(
                action,
                "read_security,manage_own_api_key,manage_api_key,manage_security,all",
            ));
        };
        let keys: Vec<Value> = self
            .keys
            .iter()
            .filter(|k| !only_own || Self::owns(who, k))
            .filter(|k| id.as_deref().map_or(true, |i| k.id == i))
            .filter(|k| name.as_deref().map_or(true, |n| glob_match(n, &k.name)))
            .filter(|k| username.as_deref().map_or(true, |u| k.owner == u))
            .filter(|k| realm.as_deref().map_or(true, |r| k.realm == r))
            .filter(|k| !active_only || (!k.invalidated && !k.expired(now)))
            .map(|k| k.json(with_limited_by))
            .collect();
        let status = if id.is_some() && keys.is_empty() {
            404
        } else {
            200
        };
        Ok(Reply::with(status, json!({ "api_keys": keys })))
    }

    fn invalidate_keys(
        &mut self,
        who: &Principal,
        body: &[u8],
        now: u64,
        fault: Option<InvalidateFault>,
    ) -> Result<Reply, EsError> {
        let body = parse_json_body(body)?;
        let obj = match &body {
            Value::Null => Map::new(),
            Value::Object(o) => o.clone(),
            _ => return Err(parse_error("request body must be an object")),
        };
        check_fields(
            &obj,
            &["id", "ids", "name", "owner", "username", "realm_name"],
            "invalidate_api_key",
        )?;
        let get_str = |k: &str| -> Result<Option<String>, EsError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(parse_error(&format!(
                    "[invalidate_api_key] failed to parse field [{k}]"
                ))),
            }
        };
        let single_id = get_str("id")?;
        let ids =
            match obj.get("ids") {
                None | Some(Value::Null) => None,
                Some(v) => Some(str_list(v).ok_or_else(|| {
                    parse_error("[invalidate_api_key] failed to parse field [ids]")
                })?),
            };
        let name = get_str("name")?;
        let username = get_str("username")?;
        let realm = get_str("realm_name")?;
        let owner = match obj.get("owner") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(parse_error(
                    "[invalidate_api_key] failed to parse field [owner]",
                ))
            }
        };
        let mut problems = Vec::new();
        if single_id.is_some() && ids.is_some() {
            problems.push("Must use either [id] or [ids], not both at the same time".to_string());
        }
        if ids
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.iter().any(String::is_empty))
        {
            problems.push("Field [ids] must not be empty or contain empty elements".into());
        }
        let ids: Option<Vec<String>> = ids.or(single_id.map(|i| vec![i]));
        if !owner && ids.is_none() && name.is_none() && username.is_none() && realm.is_none() {
            problems.push(
                "One of [api key id(s), api key name, username, realm name] must be specified if [owner] flag is false"
                    .into(),
            );
        }
        if owner && (username.is_some() || realm.is_some()) {
            problems.push(
                "username or realm name must not be specified when the current user owns the API key(s)"
                    .into(),
            );
        }
        if !problems.is_empty() {
            return Err(EsError::validation(&problems));
        }
        let granted = "manage_own_api_key,manage_api_key,manage_security,all";
        let action = "cluster:admin/xpack/security/api_key/invalidate";
        let only_own = if who.cluster("manage_api_key") {
            owner
        } else if who.cluster("manage_own_api_key") {
            let asks_own = owner
                || username.as_deref() == Some(who.username.as_str())
                || (username.is_none() && realm.is_none());
            if !asks_own {
                return Err(who.deny_cluster(action, granted));
            }
            true
        } else {
            return Err(who.deny_cluster(action, granted));
        };
        if fault == Some(InvalidateFault::ServerError) {
            return Err(fault_error(500, "invalidate api key"));
        }
        let matched: Vec<usize> = self
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| !only_own || Self::owns(who, k))
            .filter(|(_, k)| ids.as_ref().map_or(true, |ids| ids.contains(&k.id)))
            .filter(|(_, k)| name.as_deref().map_or(true, |n| glob_match(n, &k.name)))
            .filter(|(_, k)| username.as_deref().map_or(true, |u| k.owner == u))
            .filter(|(_, k)| realm.as_deref().map_or(true, |r| k.realm == r))
            .map(|(i, _)| i)
            .collect();
        let mut invalidated = Vec::new();
        let mut previously = Vec::new();
        let mut errors = Vec::new();
        for i in matched {
            let key = &mut self.keys[i];
            if fault == Some(InvalidateFault::ReportErrors) {
                errors.push(json!({
                    "type": "exception",
                    "reason": format!("error occurred while invalidating api keys [{}] (injected fault)", key.id),
                }));
            } else if key.invalidated {
                previously.push(json!(key.id));
            } else {
                key.invalidated = true;
                key.invalidation = Some(now);
                invalidated.push(json!(key.id));
            }
        }
        let mut out = json!({
            "invalidated_api_keys": invalidated,
            "previously_invalidated_api_keys": previously,
            "error_count": errors.len(),
        });
        if !errors.is_empty() {
            out["error_details"] = Value::Array(errors);
        }
        Ok(Reply::ok(out))
    }

    fn update_key(
        &mut self,
        who: &Principal,
        id: &str,
        body: &[u8],
        now: u64,
    ) -> Result<Reply, EsError> {
        who.require_cluster(
            "cluster:admin/xpack/security/api_key/update",
            &[
                "manage_own_api_key",
                "manage_api_key",
                "manage_security",
                "all",
            ],
        )?;
        if who.api_key.is_some() {
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                "authentication via API key not supported: only the owner user can update an API key",
            ));
        }
        let body = parse_json_body(body)?;
        let obj = match &body {
            Value::Null => Map::new(),
            Value::Object(o) => o.clone(),
            _ => return Err(parse_error("request body must be an object")),
        };
        check_fields(
            &obj,
            &["role_descriptors", "metadata", "expiration"],
            "update_api_key_request",
        )?;
        let metadata = match obj.get("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                if m.keys().any(|k| k.starts_with('_')) {
                    return Err(EsError::validation(&[
                        "API key metadata keys may not start with [_]".into(),
                    ]));
                }
                Some(Value::Object(m.clone()))
            }
            Some(_) => {
                return Err(parse_error(
                    "[update_api_key_request] failed to parse field [metadata]",
                ))
            }
        };
        let expiration = match obj.get("expiration") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(now.saturating_add(parse_time_value(s, "expiration")?)),
            Some(_) => {
                return Err(parse_error(
                    "[update_api_key_request] failed to parse field [expiration]",
                ))
            }
        };
        let descriptors = match obj.get("role_descriptors") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_role_descriptors(Some(v))?),
        };
        let Some(key) = self
            .keys
            .iter_mut()
            .find(|k| k.id == id && k.owner == who.username && k.realm == NATIVE_REALM)
        else {
            return Err(EsError::new(
                404,
                "resource_not_found_exception",
                format!("no API key owned by requesting user found for ID [{id}]"),
            ));
        };
        if key.invalidated {
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                format!("cannot update invalidated API key [{id}]"),
            ));
        }
        if key.expired(now) {
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                format!("cannot update expired API key [{id}]"),
            ));
        }
        let mut updated = false;
        if let Some((raw, assigned)) = descriptors {
            if raw != key.role_descriptors || assigned != key.assigned {
                key.role_descriptors = raw;
                key.assigned = assigned;
                updated = true;
            }
        }
        if let Some(m) = metadata {
            if m != key.metadata {
                key.metadata = m;
                updated = true;
            }
        }
        if let Some(e) = expiration {
            key.expiration = Some(e);
            updated = true;
        }
        if key.limited_by != who.layers {
            key.limited_by = who.layers.clone();
            updated = true;
        }
        Ok(Reply::ok(json!({ "updated": updated })))
    }

    // ------------------------------------------------------------ privileges

    fn has_privileges(&self, who: &Principal, body: &[u8]) -> Result<Reply, EsError> {
        let body = parse_json_body(body)?;
        let obj = match &body {
            Value::Null => Map::new(),
            Value::Object(o) => o.clone(),
            _ => return Err(parse_error("request body must be an object")),
        };
        check_fields(&obj, &["cluster", "index", "application"], "has_privileges")?;
        let cluster = match obj.get("cluster") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => str_list(v)
                .ok_or_else(|| parse_error("[has_privileges] failed to parse field [cluster]"))?,
        };
        let mut index_checks: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        if let Some(v) = obj.get("index").filter(|v| !v.is_null()) {
            let Value::Array(entries) = v else {
                return Err(parse_error(
                    "[has_privileges] failed to parse field [index]",
                ));
            };
            for entry in entries {
                let Value::Object(e) = entry else {
                    return Err(parse_error(
                        "[has_privileges] failed to parse field [index]",
                    ));
                };
                check_fields(
                    e,
                    &["names", "privileges", "allow_restricted_indices"],
                    "index privileges",
                )?;
                let names = e.get("names").and_then(str_list).unwrap_or_default();
                let privs = e.get("privileges").and_then(str_list).unwrap_or_default();
                index_checks.push((names, privs));
            }
        }
        let app_empty = match obj.get("application") {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(_) => {
                return Err(parse_error(
                    "[has_privileges] failed to parse field [application]",
                ))
            }
        };
        let mut problems = Vec::new();
        if cluster.is_empty() && index_checks.is_empty() && app_empty {
            problems.push("must specify at least one privilege".to_string());
        }
        for (names, privs) in &index_checks {
            if names.is_empty() {
                problems.push("indices privileges must refer to at least one index name".into());
            }
            if privs.is_empty() {
                problems.push("indices privileges must define at least one privilege".into());
            }
        }
        if !problems.is_empty() {
            return Err(EsError::validation(&problems));
        }
        for p in &cluster {
            validate_cluster_privilege(p)?;
        }
        for (_, privs) in &index_checks {
            for p in privs {
                validate_index_privilege(p)?;
            }
        }
        let mut all = true;
        let mut cluster_out = Map::new();
        for p in &cluster {
            let ok = who.cluster(p);
            all &= ok;
            cluster_out.insert(p.clone(), json!(ok));
        }
        let mut index_out = Map::new();
        for (names, privs) in &index_checks {
            for name in names {
                let entry = index_out
                    .entry(name.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                for p in privs {
                    let ok = self.index_allowed(who, name, p);
                    all &= ok;
                    if let Value::Object(m) = entry {
                        m.insert(p.clone(), json!(ok));
                    }
                }
            }
        }
        Ok(Reply::ok(json!({
            "username": who.username,
            "has_all_requested": all,
            "cluster": cluster_out,
            "index": index_out,
            "application": {},
        })))
    }

    /// Index privilege check that also honours data-stream → backing-index inheritance.
    fn index_allowed(&self, who: &Principal, index: &str, privilege: &str) -> bool {
        if who.index(index, privilege) {
            return true;
        }
        self.indices
            .get(index)
            .and_then(|i| i.data_stream.as_deref())
            .is_some_and(|ds| who.index(ds, privilege))
    }

    fn change_password(
        &mut self,
        who: &Principal,
        user: Option<&str>,
        body: &[u8],
    ) -> Result<Reply, EsError> {
        let target = user.unwrap_or(&who.username).to_string();
        let own = target == who.username && who.api_key.is_none();
        if !own && !who.cluster("manage_security") {
            return Err(who.deny_cluster(
                "cluster:admin/xpack/security/user/change_password",
                "manage_security,all",
            ));
        }
        let body = parse_json_body(body)?;
        let obj = match &body {
            Value::Object(o) => o.clone(),
            Value::Null => Map::new(),
            _ => return Err(parse_error("request body must be an object")),
        };
        check_fields(&obj, &["password", "password_hash"], "change_password")?;
        let password = match obj.get("password") {
            Some(Value::String(s)) => Some(s.clone()),
            None | Some(Value::Null) => None,
            Some(_) => {
                return Err(parse_error(
                    "[change_password] failed to parse field [password]",
                ))
            }
        };
        if obj.get("password_hash").is_some_and(|v| !v.is_null()) {
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                "es-emulator: [password_hash] is not supported",
            ));
        }
        let Some(password) = password else {
            return Err(EsError::validation(&["password is missing".into()]));
        };
        if password.chars().count() < 6 {
            return Err(EsError::validation(&[
                "passwords must be at least [6] characters long".into(),
            ]));
        }
        let Some(u) = self.users.get_mut(&target) else {
            return Err(EsError::new(
                404,
                "resource_not_found_exception",
                format!("user [{target}] does not exist"),
            ));
        };
        u.password = password;
        Ok(Reply::ok(json!({})))
    }

    // ------------------------------------------------------------- documents

    fn ensure_data_stream(&mut self, name: &str, now: u64) -> String {
        if let Some(backing) = self.data_streams.get(name).and_then(|b| b.last()) {
            return backing.clone();
        }
        let backing = format!(".ds-{name}-{}-000001", date_ymd(now));
        self.data_streams
            .insert(name.to_string(), vec![backing.clone()]);
        self.indices.insert(
            backing.clone(),
            Index {
                docs: Vec::new(),
                next_seq: 0,
                data_stream: Some(name.to_string()),
            },
        );
        backing
    }

    /// Concrete indices behind a name: the data stream's backing indices, the index itself.
    fn concrete_indices(&self, name: &str) -> Vec<String> {
        if let Some(backing) = self.data_streams.get(name) {
            backing.clone()
        } else if self.indices.contains_key(name) {
            vec![name.to_string()]
        } else {
            Vec::new()
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn index_doc(
        &mut self,
        who: &Principal,
        target: &str,
        id: Option<String>,
        create_endpoint: bool,
        params: &BTreeMap<String, String>,
        body: &[u8],
        now: u64,
        faults: &Faults,
    ) -> Result<Reply, EsError> {
        validate_index_name(target)?;
        if let Some(id) = &id {
            if id.is_empty() || id.len() > 512 {
                return Err(EsError::validation(&[format!(
                    "id [{id}] is too long, must be no longer than 512 bytes but was: {}",
                    id.len()
                )]));
            }
        }
        let op_create = if create_endpoint || id.is_none() {
            if let Some(op) = params.get("op_type") {
                if op != "create" {
                    return Err(EsError::bad_request(
                        "illegal_argument_exception",
                        format!("opType must be 'create', found: [{op}]"),
                    ));
                }
            }
            true
        } else {
            match params.get("op_type").map(String::as_str) {
                None | Some("index") => false,
                Some("create") => true,
                Some(other) => {
                    return Err(EsError::bad_request(
                        "illegal_argument_exception",
                        format!("opType must be 'create' or 'index', found: [{other}]"),
                    ))
                }
            }
        };
        let refresh = params.get("refresh").map(String::as_str);
        if !matches!(
            refresh,
            None | Some("") | Some("true") | Some("false") | Some("wait_for")
        ) {
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                format!(
                    "Unknown value for refresh: [{}].",
                    refresh.unwrap_or_default()
                ),
            ));
        }
        if body.is_empty() {
            return Err(EsError::validation(&["source is missing".into()]));
        }

        let exists = self.data_streams.contains_key(target) || self.indices.contains_key(target);
        let becomes_ds = !exists && DATA_STREAM_TEMPLATES.iter().any(|t| glob_match(t, target));
        if !exists
            && !["auto_configure", "create_index", "manage", "all"]
                .iter()
                .any(|p| who.index(target, p))
        {
            return Err(who.deny_index(
                "indices:admin/auto_create",
                target,
                "auto_configure,create_index,manage,all",
            ));
        }
        let write_ok = if op_create {
            ["create_doc", "create", "index", "write", "all"]
                .iter()
                .any(|p| self.index_allowed(who, target, p))
        } else {
            ["index", "write", "all"]
                .iter()
                .any(|p| self.index_allowed(who, target, p))
        };
        if !write_ok {
            return Err(who.deny_index(
                "indices:data/write/bulk[s]",
                target,
                "create_doc,create,index,write,all",
            ));
        }
        if let Some(status) = faults.index.take() {
            return Err(fault_error(status, "index"));
        }
        let source: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return Err(doc_parse_error(
                    body,
                    "failed to parse, document is empty",
                    "illegal_argument_exception",
                    "document must be a JSON object",
                ))
            }
            Err(e) => {
                return Err(doc_parse_error(
                    body,
                    "failed to parse",
                    "json_parse_exception",
                    &e.to_string(),
                ))
            }
        };
        let is_ds = becomes_ds || self.data_streams.contains_key(target);
        let target_is_backing = self
            .indices
            .get(target)
            .is_some_and(|i| i.data_stream.is_some());
        if is_ds && !op_create {
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                "only write ops with an op_type of create are allowed in data streams",
            ));
        }
        if target_is_backing && op_create {
            let ds = self.indices[target].data_stream.clone().unwrap_or_default();
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                format!(
                    "index request with op_type=create targeting backing indices is disallowed, target corresponding data stream [{ds}] instead"
                ),
            ));
        }
        if is_ds || target_is_backing {
            let ts_ok = matches!(
                source.get("@timestamp"),
                Some(Value::String(_)) | Some(Value::Number(_))
            );
            if !ts_ok {
                let mut e = doc_parse_error(
                    body,
                    "failed to parse: data stream timestamp field [@timestamp] is missing",
                    "illegal_argument_exception",
                    "data stream timestamp field [@timestamp] is missing",
                );
                if source.get("@timestamp").is_some() {
                    e.reason = e.reason.replace("is missing", "has an invalid value");
                }
                return Err(e);
            }
        }
        let concrete = if is_ds {
            self.ensure_data_stream(target, now)
        } else {
            self.indices
                .entry(target.to_string())
                .or_insert_with(|| Index {
                    docs: Vec::new(),
                    next_seq: 0,
                    data_stream: None,
                });
            target.to_string()
        };
        let index = self
            .indices
            .get_mut(&concrete)
            .expect("concrete index exists");
        let id = id.unwrap_or_else(|| random_token(15));
        let seq_no = index.next_seq;
        let existing = index.docs.iter().position(|d| d.id == id);
        let (version, result, status) = match existing {
            Some(pos) if op_create => {
                let current = index.docs[pos].version;
                return Err(EsError::new(
                    409,
                    "version_conflict_engine_exception",
                    format!("[{id}]: version conflict, document already exists (current version [{current}])"),
                )
                .field("index_uuid", json!("rotdEmulatorIndexUuid"))
                .field("shard", json!("0"))
                .field("index", json!(concrete)));
            }
            Some(pos) => {
                let doc = &mut index.docs[pos];
                doc.version += 1;
                doc.source = source;
                doc.seq_no = seq_no;
                (doc.version, "updated", 200)
            }
            None => {
                index.docs.push(Doc {
                    id: id.clone(),
                    source,
                    version: 1,
                    seq_no,
                });
                (1, "created", 201)
            }
        };
        index.next_seq += 1;
        let mut out = json!({
            "_index": concrete,
            "_id": id,
            "_version": version,
            "result": result,
            "_shards": {"total": 2, "successful": 1, "failed": 0},
            "_seq_no": seq_no,
            "_primary_term": 1,
        });
        if matches!(refresh, Some("") | Some("true")) {
            out["forced_refresh"] = json!(true);
        }
        Ok(Reply::with(status, out))
    }

    fn get_doc(&self, who: &Principal, target: &str, id: &str) -> Result<Reply, EsError> {
        if self.data_streams.contains_key(target) {
            return Err(EsError::bad_request(
                "illegal_argument_exception",
                format!(
                    "The provided expression [{target}] matches a data stream, specify the corresponding concrete indices instead."
                ),
            ));
        }
        if !self.index_allowed(who, target, "read") {
            return Err(who.deny_index("indices:data/read/get", target, "read,all"));
        }
        let Some(index) = self.indices.get(target) else {
            return Err(EsError::index_not_found(target));
        };
        match index.docs.iter().find(|d| d.id == id) {
            Some(d) => Ok(Reply::ok(json!({
                "_index": target,
                "_id": d.id,
                "_version": d.version,
                "_seq_no": d.seq_no,
                "_primary_term": 1,
                "found": true,
                "_source": d.source,
            }))),
            None => Ok(Reply::with(
                404,
                json!({"_index": target, "_id": id, "found": false}),
            )),
        }
    }

    fn search(
        &self,
        who: &Principal,
        target: Option<&str>,
        params: &BTreeMap<String, String>,
        body: &[u8],
    ) -> Result<Reply, EsError> {
        let body = parse_json_body(body)?;
        let empty = Map::new();
        let obj = match &body {
            Value::Null => &empty,
            Value::Object(o) => o,
            _ => return Err(parse_error("request body must be an object")),
        };
        let num =
            |v: Option<&Value>, p: Option<&String>, default: usize| -> Result<usize, EsError> {
                if let Some(v) = v {
                    return v
                        .as_u64()
                        .map(|n| n as usize)
                        .ok_or_else(|| parse_error("[size]/[from] must be a non-negative number"));
                }
                match p {
                    Some(s) => s.parse().map_err(|_| {
                        EsError::bad_request(
                            "illegal_argument_exception",
                            format!("Failed to parse int parameter with value [{s}]"),
                        )
                    }),
                    None => Ok(default),
                }
            };
        let size = num(obj.get("size"), params.get("size"), 10)?;
        let from = num(obj.get("from"), params.get("from"), 0)?;
        let query = obj
            .get("query")
            .cloned()
            .unwrap_or(json!({"match_all": {}}));
        let matcher = Query::parse(&query)?;
        let target = target.unwrap_or("_all");
        let mut concrete: Vec<String> = Vec::new();
        for expr in target.split(',').filter(|s| !s.is_empty()) {
            let wildcard = expr.contains('*') || expr == "_all";
            let pattern = if expr == "_all" { "*" } else { expr };
            if wildcard {
                // Wildcards expand only to what the caller may read (ES behaviour).
                for name in self.data_streams.keys() {
                    if glob_match(pattern, name) && who.index(name, "read") {
                        concrete.extend(self.data_streams[name].iter().cloned());
                    }
                }
                for (name, idx) in &self.indices {
                    let visible = if name.starts_with('.') {
                        pattern.starts_with('.')
                    } else {
                        true
                    };
                    if idx.data_stream.is_none()
                        && visible
                        && glob_match(pattern, name)
                        && who.index(name, "read")
                    {
                        concrete.push(name.clone());
                    }
                }
            } else {
                if !self.index_allowed(who, expr, "read") {
                    return Err(who.deny_index("indices:data/read/search", expr, "read,all"));
                }
                let found = self.concrete_indices(expr);
                if found.is_empty() {
                    return Err(EsError::index_not_found(expr));
                }
                concrete.extend(found);
            }
        }
        concrete.sort();
        concrete.dedup();
        let mut hits: Vec<Value> = Vec::new();
        for name in &concrete {
            if let Some(idx) = self.indices.get(name) {
                for d in idx.docs.iter().filter(|d| matcher.matches(d)) {
                    hits.push(json!({
                        "_index": name,
                        "_id": d.id,
                        "_score": 1.0,
                        "_source": d.source,
                    }));
                }
            }
        }
        let total = hits.len();
        let page: Vec<Value> = hits.into_iter().skip(from).take(size).collect();
        let max_score = if total == 0 { Value::Null } else { json!(1.0) };
        Ok(Reply::ok(json!({
            "took": 1,
            "timed_out": false,
            "_shards": {"total": concrete.len(), "successful": concrete.len(), "skipped": 0, "failed": 0},
            "hits": {
                "total": {"value": total, "relation": "eq"},
                "max_score": max_score,
                "hits": page,
            }
        })))
    }
}

enum Query {
    All,
    Ids(Vec<String>),
    Equals(String, Value),
}

impl Query {
    fn parse(q: &Value) -> Result<Query, EsError> {
        let Value::Object(o) = q else {
            return Err(EsError::bad_request(
                "parsing_exception",
                "query malformed, must start with start_object",
            ));
        };
        if o.len() != 1 {
            return Err(EsError::bad_request(
                "parsing_exception",
                "[query] must contain exactly one query",
            ));
        }
        let (kind, inner) = o.iter().next().expect("one entry");
        match kind.as_str() {
            "match_all" => Ok(Query::All),
            "ids" => {
                let values = inner.get("values").and_then(str_list).ok_or_else(|| {
                    EsError::bad_request("parsing_exception", "[ids] requires [values]")
                })?;
                Ok(Query::Ids(values))
            }
            "term" | "match" => {
                let Value::Object(f) = inner else {
                    return Err(EsError::bad_request(
                        "parsing_exception",
                        format!("[{kind}] malformed query"),
                    ));
                };
                let Some((field, v)) = f.iter().next() else {
                    return Err(EsError::bad_request(
                        "parsing_exception",
                        format!("[{kind}] malformed query"),
                    ));
                };
                let value = match v {
                    Value::Object(p) => p
                        .get("value")
                        .or_else(|| p.get("query"))
                        .cloned()
                        .unwrap_or(Value::Null),
                    other => other.clone(),
                };
                Ok(Query::Equals(field.clone(), value))
            }
            other => Err(EsError::bad_request(
                "parsing_exception",
                format!("es-emulator: query [{other}] is not supported"),
            )),
        }
    }

    fn matches(&self, d: &Doc) -> bool {
        match self {
            Query::All => true,
            Query::Ids(ids) => ids.contains(&d.id),
            Query::Equals(field, value) if field == "_id" => value.as_str() == Some(d.id.as_str()),
            Query::Equals(field, value) => {
                let direct = d.source.get(field.as_str());
                let nested = field.split('.').try_fold(&d.source, |v, part| v.get(part));
                direct.or(nested) == Some(value)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn parse_error(reason: &str) -> EsError {
    EsError::bad_request("x_content_parse_exception", reason)
}

fn parse_json_body(body: &[u8]) -> Result<Value, EsError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| {
        EsError::bad_request(
            "x_content_parse_exception",
            format!("[{}:{}] {}", e.line(), e.column(), e),
        )
    })
}

fn doc_parse_error(body: &[u8], reason: &str, cause_type: &str, cause: &str) -> EsError {
    let col = body.len();
    let mut e = EsError::bad_request("document_parsing_exception", format!("[1:{col}] {reason}"));
    e.caused_by = Some(Box::new(json!({"type": cause_type, "reason": cause})));
    e
}

fn check_fields(obj: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), EsError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(parse_error(&format!("[1:2] [{what}] unknown field [{k}]"))),
        None => Ok(()),
    }
}

fn str_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => a.iter().map(|x| x.as_str().map(str::to_string)).collect(),
        _ => None,
    }
}

fn flag(params: &BTreeMap<String, String>, name: &str) -> Result<bool, EsError> {
    match params.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("") | Some("true") => Ok(true),
        Some(other) => Err(EsError::bad_request(
            "illegal_argument_exception",
            format!("Failed to parse value [{other}] as only [true] or [false] are allowed."),
        )),
    }
}

/// Parse `role_descriptors` into (raw JSON as stored, parsed roles or None when empty).
fn parse_role_descriptors(v: Option<&Value>) -> Result<(Value, Option<Vec<Role>>), EsError> {
    let map = match v {
        None | Some(Value::Null) => return Ok((json!({}), None)),
        Some(Value::Object(m)) => m,
        Some(Value::Array(a)) if a.is_empty() => return Ok((json!({}), None)),
        Some(_) => return Err(parse_error("failed to parse field [role_descriptors]")),
    };
    if map.is_empty() {
        return Ok((json!({}), None));
    }
    let mut roles = Vec::new();
    for (name, desc) in map {
        let Value::Object(d) = desc else {
            return Err(EsError::bad_request(
                "parse_exception",
                format!(
                    "failed to parse role [{name}]. expected an object but found [{desc}] instead"
                ),
            ));
        };
        let allowed = [
            "cluster",
            "indices",
            "index",
            "applications",
            "run_as",
            "metadata",
            "transient_metadata",
            "global",
            "remote_indices",
            "remote_cluster",
            "restriction",
            "description",
        ];
        if let Some(k) = d.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(EsError::bad_request(
                "parse_exception",
                format!("failed to parse role [{name}]. unexpected field [{k}]"),
            ));
        }
        let cluster = match d.get("cluster") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => str_list(v).ok_or_else(|| {
                EsError::bad_request(
                    "parse_exception",
                    format!("failed to parse role [{name}]. [cluster] must be an array of strings"),
                )
            })?,
        };
        for p in &cluster {
            validate_cluster_privilege(p)?;
        }
        let mut grants = Vec::new();
        let entries = d.get("indices").or_else(|| d.get("index"));
        if let Some(entries) = entries.filter(|v| !v.is_null()) {
            let Value::Array(entries) = entries else {
                return Err(EsError::bad_request(
                    "parse_exception",
                    format!("failed to parse indices privileges for role [{name}]. expected field [indices] value to be an array"),
                ));
            };
            for e in entries {
                let Value::Object(e) = e else {
                    return Err(EsError::bad_request(
                        "parse_exception",
                        format!("failed to parse indices privileges for role [{name}]. expected an object"),
                    ));
                };
                let ok = [
                    "names",
                    "privileges",
                    "field_security",
                    "query",
                    "allow_restricted_indices",
                ];
                if let Some(k) = e.keys().find(|k| !ok.contains(&k.as_str())) {
                    return Err(EsError::bad_request(
                        "parse_exception",
                        format!("failed to parse indices privileges for role [{name}]. unexpected field [{k}]"),
                    ));
                }
                let names = e.get("names").and_then(str_list).unwrap_or_default();
                if names.is_empty() {
                    return Err(EsError::bad_request(
                        "parse_exception",
                        format!("failed to parse indices privileges for role [{name}]. missing required [names] field"),
                    ));
                }
                let privileges = e.get("privileges").and_then(str_list).unwrap_or_default();
                if privileges.is_empty() {
                    return Err(EsError::bad_request(
                        "parse_exception",
                        format!("failed to parse indices privileges for role [{name}]. missing required [privileges] field"),
                    ));
                }
                for p in &privileges {
                    validate_index_privilege(p)?;
                }
                grants.push(IndexGrant { names, privileges });
            }
        }
        roles.push(Role {
            cluster,
            indices: grants,
        });
    }
    Ok((Value::Object(map.clone()), Some(roles)))
}

fn validate_cluster_privilege(p: &str) -> Result<(), EsError> {
    if CLUSTER_PRIVILEGES.contains(&p) || p.starts_with("cluster:") {
        return Ok(());
    }
    Err(EsError::bad_request(
        "illegal_argument_exception",
        format!(
            "unknown cluster privilege [{p}]. a privilege must be either one of the predefined cluster privilege names [{}] or a pattern over one of the available cluster actions",
            CLUSTER_PRIVILEGES.join(",")
        ),
    ))
}

fn validate_index_privilege(p: &str) -> Result<(), EsError> {
    if INDEX_PRIVILEGES.contains(&p) || p.starts_with("indices:") {
        return Ok(());
    }
    Err(EsError::bad_request(
        "illegal_argument_exception",
        format!(
            "unknown index privilege [{p}]. a privilege must be either one of the predefined fixed indices privileges [{}] or a pattern over one of the available index actions",
            INDEX_PRIVILEGES.join(",")
        ),
    ))
}

fn cluster_implies(held: &str, wanted: &str) -> bool {
    if held == wanted || held == "all" {
        return held != "none" || wanted == "none";
    }
    match held {
        "manage_security" => matches!(
            wanted,
            "manage_api_key"
                | "manage_own_api_key"
                | "read_security"
                | "manage_service_account"
                | "manage_token"
                | "manage_user_profile"
                | "grant_api_key"
        ),
        "manage_api_key" => wanted == "manage_own_api_key",
        "manage" => {
            wanted.starts_with("monitor")
                || matches!(
                    wanted,
                    "manage_index_templates"
                        | "manage_ingest_pipelines"
                        | "manage_pipeline"
                        | "read_pipeline"
                        | "manage_ilm"
                        | "read_ilm"
                        | "manage_slm"
                        | "read_slm"
                        | "manage_enrich"
                        | "manage_transform"
                        | "manage_rollup"
                        | "manage_ccr"
                        | "read_ccr"
                        | "cancel_task"
                )
        }
        "monitor" => wanted.starts_with("monitor_"),
        _ => false,
    }
}

fn index_implies(held: &str, wanted: &str) -> bool {
    if held == wanted || held == "all" {
        return held != "none" || wanted == "none";
    }
    match held {
        "write" => matches!(wanted, "index" | "create" | "create_doc" | "delete"),
        "index" => matches!(wanted, "create" | "create_doc"),
        "create" => wanted == "create_doc",
        "manage" => matches!(
            wanted,
            "auto_configure"
                | "create_index"
                | "delete_index"
                | "view_index_metadata"
                | "monitor"
                | "maintenance"
                | "manage_data_stream_lifecycle"
                | "manage_ilm"
                | "manage_follow_index"
        ),
        _ => false,
    }
}

/// `*`-wildcard match (the only wildcard ES index patterns support).
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

fn validate_index_name(name: &str) -> Result<(), EsError> {
    let invalid = |why: &str| {
        Err(EsError::bad_request(
            "invalid_index_name_exception",
            format!("Invalid index name [{name}], {why}"),
        )
        .field("index_uuid", json!("_na_"))
        .field("index", json!(name)))
    };
    if name.chars().any(|c| c.is_uppercase()) {
        return invalid("must be lowercase");
    }
    if name.starts_with(['_', '-', '+']) {
        return invalid("must not start with '_', '-', or '+'");
    }
    if name.chars().any(|c| "\\/*?\"<>| ,#:".contains(c)) {
        return invalid(
            "must not contain the following characters [ , \", *, \\, <, |, ,, >, /, ?, :, #]",
        );
    }
    if name == "." || name == ".." {
        return invalid("must not be '.' or '..'");
    }
    if name.len() > 255 {
        return invalid("index name is too long");
    }
    Ok(())
}

/// Parse an ES time value (`30d`, `1h`, `60m`, `10s`, `500ms`, …) into milliseconds.
fn parse_time_value(s: &str, setting: &str) -> Result<u64, EsError> {
    let t = s.trim().to_ascii_lowercase();
    let units: [(&str, f64); 7] = [
        ("nanos", 1e-6),
        ("micros", 1e-3),
        ("ms", 1.0),
        ("s", 1_000.0),
        ("m", 60_000.0),
        ("h", 3_600_000.0),
        ("d", 86_400_000.0),
    ];
    for (suffix, factor) in units {
        if let Some(num) = t.strip_suffix(suffix) {
            if let Ok(n) = num.trim().parse::<u64>() {
                return Ok((n as f64 * factor) as u64);
            }
            if let Ok(n) = num.trim().parse::<f64>() {
                if n.is_finite() && n >= 0.0 {
                    return Err(EsError::bad_request(
                        "parse_exception",
                        format!(
                            "failed to parse setting [{setting}] with value [{s}] as a time value: fractional time values are not supported"
                        ),
                    ));
                }
            }
            break;
        }
    }
    Err(EsError::bad_request(
        "parse_exception",
        format!(
            "failed to parse setting [{setting}] with value [{s}] as a time value: unit is missing or unrecognized"
        ),
    ))
}

fn date_ymd(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(0);
    let t = chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default();
    t.format("%Y.%m.%d").to_string()
}

fn random_token(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    if ring::rand::SystemRandom::new().fill(&mut buf).is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((nanos >> ((i % 16) * 8)) as u8) ^ (i as u8);
        }
    }
    URL_SAFE_NO_PAD.encode(buf)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(
            percent_decode(&k.replace('+', " ")),
            percent_decode(&v.replace('+', " ")),
        );
    }
    out
}

/// Hostile answers to a create (a proxy that loses them, a cluster that lies).
impl Faults {
    /// The next `n` create-API-key calls are carried out (the key exists and is
    /// valid) but answered `status` (e.g. 502 from a proxy), as if the answer was lost.
    pub fn lose_create_answer_next(&self, n: u32, status: u16) {
        self.lose_create_answer.set(Some(status), n);
    }

    /// Fields of every create answer replaced by those of `patch` (an object), e.g.
    /// `{"id": "../../x"}`; the key is made as asked. `None` stops it.
    pub fn patch_create_answer(&self, patch: Option<Value>) {
        *self
            .create_answer_patch
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = patch;
    }

    fn after_create(&self, mut reply: Reply) -> Result<Reply, EsError> {
        if let Some(status) = self.lose_create_answer.take() {
            return Err(fault_error(
                status,
                "create api key (the key was made; answer lost)",
            ));
        }
        let patch = self
            .create_answer_patch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Some(Value::Object(p)), Value::Object(body)) = (patch, &mut reply.body) {
            for (k, v) in p {
                body.insert(k, v);
            }
        }
        Ok(reply)
    }
}
