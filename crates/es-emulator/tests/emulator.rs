//! Self-tests of the Elasticsearch emulator: what it answers, checked against the
//! shapes, codes and texts of Elasticsearch 8.x that its crate doc lists.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use es_emulator::{EsEmulator, InvalidateFault};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

const DS: &str = "logs-nginx.access-default";

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")))
}

fn api_key(created: &Value) -> String {
    format!("ApiKey {}", created["encoded"].as_str().expect("encoded"))
}

struct Client {
    http: reqwest::Client,
    base: String,
}

struct Resp {
    status: u16,
    body: Value,
    headers: HeaderMap,
}

impl Client {
    fn new(es: &EsEmulator) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: es.url(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON body {text:?}: {e}"))
        };
        Resp {
            status,
            body,
            headers,
        }
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        content_type: &str,
        body: &'static str,
    ) -> Resp {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header("content-type", content_type)
            .body(body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = serde_json::from_str(&resp.text().await.expect("body")).expect("JSON body");
        Resp {
            status,
            body,
            headers,
        }
    }
}

fn assert_es_error(r: &Resp, status: u16, etype: &str, reason_contains: &str) {
    assert_eq!(r.status, status, "body: {}", r.body);
    assert_eq!(r.body["status"], json!(status), "body: {}", r.body);
    assert_eq!(r.body["error"]["type"], json!(etype), "body: {}", r.body);
    assert_eq!(
        r.body["error"]["root_cause"][0]["type"],
        json!(etype),
        "body: {}",
        r.body
    );
    let reason = r.body["error"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(reason_contains),
        "reason {reason:?} lacks {reason_contains:?}"
    );
    assert_eq!(r.headers["content-type"], "application/json");
}

async fn create_key(c: &Client, auth: &str, body: Value) -> Value {
    let r = c
        .call(Method::POST, "/_security/api_key", Some(auth), Some(body))
        .await;
    assert_eq!(r.status, 200, "create key: {}", r.body);
    r.body
}

fn writer_descriptor() -> Value {
    json!({
        "rotd-writer": {
            "cluster": [],
            "indices": [{"names": [DS], "privileges": ["create_doc", "auto_configure"]}]
        }
    })
}

#[test]
fn works_from_a_plain_test_and_reports_version() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::new(&es);
        let r = c
            .call(Method::GET, "/", Some(&basic("elastic", "changeme")), None)
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["version"]["number"], "8.15.0");
        assert_eq!(r.headers["x-elastic-product"], "Elasticsearch");
        es.set_version("8.17.2");
        let r = c
            .call(Method::GET, "/", Some(&basic("elastic", "changeme")), None)
            .await;
        assert_eq!(r.body["version"]["number"], "8.17.2");
    });
}

#[tokio::test]
async fn authentication_failures() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    let c = Client::new(&es);

    let r = c
        .call(Method::GET, "/_security/_authenticate?pretty", None, None)
        .await;
    assert_es_error(
        &r,
        401,
        "security_exception",
        "missing authentication credentials for REST request [/_security/_authenticate?pretty]",
    );
    let challenges: Vec<_> = r.headers.get_all("www-authenticate").iter().collect();
    assert_eq!(challenges.len(), 3);
    assert_eq!(challenges[0], "Basic realm=\"security\", charset=\"UTF-8\"");
    assert_eq!(challenges[2], "ApiKey");
    assert_eq!(
        r.body["error"]["root_cause"][0]["header"]["WWW-Authenticate"][1],
        "Bearer realm=\"security\""
    );

    let r = c
        .call(
            Method::GET,
            "/_security/_authenticate",
            Some(&basic("elastic", "nope")),
            None,
        )
        .await;
    assert_es_error(
        &r,
        401,
        "security_exception",
        "unable to authenticate user [elastic] for REST request [/_security/_authenticate]",
    );
    let r = c
        .call(Method::GET, "/", Some(&basic("ghost", "x")), None)
        .await;
    assert_es_error(
        &r,
        401,
        "security_exception",
        "unable to authenticate user [ghost]",
    );
    let r = c
        .call(Method::GET, "/", Some("Basic %%%not-base64"), None)
        .await;
    assert_es_error(
        &r,
        401,
        "security_exception",
        "invalid basic authentication header",
    );
    let r = c
        .call(
            Method::GET,
            "/",
            Some(&format!("Basic {}", STANDARD.encode("nocolon"))),
            None,
        )
        .await;
    assert_es_error(
        &r,
        401,
        "security_exception",
        "invalid basic authentication header value",
    );

    let bogus = format!("ApiKey {}", STANDARD.encode("nosuchid:secret"));
    let r = c
        .call(Method::GET, "/_security/_authenticate", Some(&bogus), None)
        .await;
    assert_es_error(
        &r,
        401,
        "security_exception",
        "anonymous access is not allowed",
    );
    assert_eq!(
        r.body["error"]["additional_unsuccessful_credentials"],
        "API key: unable to find apikey with id nosuchid"
    );

    // Wrong secret for an existing key.
    let key = create_key(&c, &basic("elastic", "changeme"), json!({"name": "k"})).await;
    let wrong = format!(
        "ApiKey {}",
        STANDARD.encode(format!("{}:wrong", key["id"].as_str().unwrap()))
    );
    let r = c
        .call(Method::GET, "/_security/_authenticate", Some(&wrong), None)
        .await;
    assert_es_error(&r, 401, "security_exception", "anonymous access");
    assert!(r.body["error"]["additional_unsuccessful_credentials"]
        .as_str()
        .unwrap()
        .contains("invalid credentials for API key"));

    let r = c
        .call(
            Method::GET,
            "/_security/_authenticate",
            Some("Bearer abc"),
            None,
        )
        .await;
    assert_es_error(&r, 401, "security_exception", "unable to authenticate");

    let r = c
        .call(
            Method::GET,
            "/_security/_authenticate",
            Some(&basic("elastic", "changeme")),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["username"], "elastic");
    assert_eq!(r.body["authentication_type"], "realm");
    assert_eq!(r.body["authentication_realm"]["type"], "native");
}

#[tokio::test]
async fn api_key_lifecycle() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    let c = Client::new(&es);
    let admin = basic("elastic", "changeme");

    let r = c
        .call(
            Method::POST,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"expiration": "1d"})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "action_request_validation_exception",
        "api key name is required",
    );
    let r = c
        .call(
            Method::PUT,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"name": "x", "expiration": "30"})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "parse_exception",
        "unit is missing or unrecognized",
    );
    let r = c
        .call(
            Method::PUT,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"name": "x", "bogus": 1})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "x_content_parse_exception",
        "unknown field [bogus]",
    );

    let created = create_key(
        &c,
        &admin,
        json!({"name": "rotd-1", "expiration": "30d", "metadata": {"managed_by": "rotd"}, "role_descriptors": writer_descriptor()}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["api_key"].as_str().unwrap();
    assert_eq!(created["name"], "rotd-1");
    assert!(created["expiration"].as_u64().is_some());
    assert_eq!(
        STANDARD
            .decode(created["encoded"].as_str().unwrap())
            .unwrap(),
        format!("{id}:{secret}").into_bytes()
    );
    let no_exp = create_key(&c, &admin, json!({"name": "forever"})).await;
    assert!(no_exp.get("expiration").is_none());

    let r = c
        .call(
            Method::GET,
            &format!("/_security/api_key?id={id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let info = &r.body["api_keys"][0];
    assert_eq!(info["id"], json!(id));
    assert_eq!(info["name"], "rotd-1");
    assert_eq!(info["invalidated"], false);
    assert_eq!(info["username"], "elastic");
    assert_eq!(info["realm"], "default_native");
    assert_eq!(info["metadata"]["managed_by"], "rotd");
    assert_eq!(info["role_descriptors"], writer_descriptor());
    assert!(info["creation"].as_u64().unwrap() < info["expiration"].as_u64().unwrap());

    let r = c
        .call(
            Method::GET,
            "/_security/api_key?id=doesnotexist",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body, json!({"api_keys": []}));
    let r = c
        .call(
            Method::GET,
            "/_security/api_key?name=nothing-here",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, json!({"api_keys": []}));
    let r = c
        .call(
            Method::GET,
            "/_security/api_key?name=rotd-*&owner=true",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["api_keys"].as_array().unwrap().len(), 1);

    let key_auth = api_key(&created);
    let r = c
        .call(
            Method::GET,
            "/_security/_authenticate",
            Some(&key_auth),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["authentication_type"], "api_key");
    assert_eq!(r.body["api_key"], json!({"id": id, "name": "rotd-1"}));
    assert_eq!(r.body["username"], "elastic");
    // A key may read its own info without API-key privileges.
    let r = c
        .call(
            Method::GET,
            &format!("/_security/api_key?id={id}"),
            Some(&key_auth),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&admin),
            Some(json!({})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "action_request_validation_exception",
        "One of [api key id(s), api key name, username, realm name] must be specified",
    );
    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"id": id, "ids": [id]})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "action_request_validation_exception",
        "Must use either [id] or [ids]",
    );

    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"ids": [id]})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        json!({"invalidated_api_keys": [id], "previously_invalidated_api_keys": [], "error_count": 0})
    );
    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"id": id})),
        )
        .await;
    assert_eq!(
        r.body,
        json!({"invalidated_api_keys": [], "previously_invalidated_api_keys": [id], "error_count": 0})
    );
    let r = c
        .call(
            Method::GET,
            "/_security/_authenticate",
            Some(&key_auth),
            None,
        )
        .await;
    assert_es_error(
        &r,
        401,
        "security_exception",
        "anonymous access is not allowed",
    );
    assert_eq!(
        r.body["error"]["additional_unsuccessful_credentials"],
        "API key: api key has been invalidated"
    );

    let r = c
        .call(
            Method::GET,
            &format!("/_security/api_key?id={id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["api_keys"][0]["invalidated"], true);
    assert!(r.body["api_keys"][0]["invalidation"].as_u64().is_some());
    let r = c
        .call(
            Method::GET,
            "/_security/api_key?active_only=true",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.body["api_keys"].as_array().unwrap().len(), 1);

    let keys = es.api_keys();
    assert_eq!(keys.len(), 2);
    assert!(
        keys[0].invalidated
            && keys[0].creator == "elastic"
            && keys[0].metadata["managed_by"] == "rotd"
    );
    assert!(!keys[1].invalidated && keys[1].expiration.is_none());
}

#[tokio::test]
async fn key_privileges_via_has_privileges() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    let c = Client::new(&es);
    let admin = basic("elastic", "changeme");

    let created = create_key(
        &c,
        &admin,
        json!({"name": "writer", "role_descriptors": writer_descriptor()}),
    )
    .await;
    let key = api_key(&created);
    let body = json!({
        "cluster": ["manage_security", "manage_own_api_key"],
        "index": [{"names": [DS], "privileges": ["create_doc", "auto_configure", "read", "write", "create", "index"]}]
    });
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&key),
            Some(body.clone()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["username"], "elastic");
    assert_eq!(r.body["has_all_requested"], false);
    assert_eq!(
        r.body["cluster"],
        json!({"manage_security": false, "manage_own_api_key": false})
    );
    assert_eq!(
        r.body["index"][DS],
        json!({"create_doc": true, "auto_configure": true, "read": false, "write": false, "create": false, "index": false})
    );
    assert_eq!(r.body["application"], json!({}));

    // The superuser holds everything; GET works too.
    let r = c
        .call(
            Method::GET,
            "/_security/user/_has_privileges",
            Some(&admin),
            Some(body),
        )
        .await;
    assert_eq!(r.body["has_all_requested"], true);

    // Implication rules.
    es.add_role_user(
        "ops",
        "opspass",
        &["manage_api_key"],
        &[(&["logs-*"], &["write"]), (&["metrics-*"], &["manage"])],
    );
    let ops = basic("ops", "opspass");
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&ops),
            Some(json!({
                "cluster": ["manage_own_api_key", "manage_api_key", "manage_security", "monitor"],
                "index": [
                    {"names": ["logs-a-b", "logs-x-*"], "privileges": ["index", "create", "create_doc", "delete", "read"]},
                    {"names": ["metrics-*", "*"], "privileges": ["auto_configure", "create_index"]}
                ]
            })),
        )
        .await;
    assert_eq!(
        r.body["cluster"],
        json!({"manage_own_api_key": true, "manage_api_key": true, "manage_security": false, "monitor": false})
    );
    assert_eq!(
        r.body["index"]["logs-a-b"],
        json!({"index": true, "create": true, "create_doc": true, "delete": true, "read": false})
    );
    assert_eq!(r.body["index"]["logs-x-*"]["create_doc"], true);
    assert_eq!(
        r.body["index"]["metrics-*"],
        json!({"auto_configure": true, "create_index": true})
    );
    assert_eq!(
        r.body["index"]["*"],
        json!({"auto_configure": false, "create_index": false})
    );

    // A key cannot exceed its owner: asking for `read` on logs-* yields nothing the owner lacks.
    let limited = create_key(
        &c,
        &ops,
        json!({"name": "greedy", "role_descriptors": {"r": {"indices": [{"names": ["logs-*"], "privileges": ["all"]}]}}}),
    )
    .await;
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&api_key(&limited)),
            Some(json!({"index": [{"names": ["logs-a-b"], "privileges": ["write", "read", "manage"]}]})),
        )
        .await;
    assert_eq!(
        r.body["index"]["logs-a-b"],
        json!({"write": true, "read": false, "manage": false})
    );

    // Without role descriptors a key gets the owner's snapshot.
    let snapshot = create_key(&c, &ops, json!({"name": "snap"})).await;
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&api_key(&snapshot)),
            Some(json!({"cluster": ["manage_api_key"], "index": [{"names": ["logs-q-r"], "privileges": ["write"]}]})),
        )
        .await;
    assert_eq!(r.body["has_all_requested"], true);

    // Derived keys: ES requires an explicit empty role descriptor.
    let r = c
        .call(
            Method::POST,
            "/_security/api_key",
            Some(&api_key(&snapshot)),
            Some(json!({"name": "child"})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        "creating derived api keys requires an explicit role descriptor that is empty (has no privileges)",
    );
    let r = c
        .call(
            Method::POST,
            "/_security/api_key",
            Some(&api_key(&snapshot)),
            Some(json!({"name": "child", "role_descriptors": {"r": {"indices": [{"names": ["logs-*"], "privileges": ["read"]}]}}})),
        )
        .await;
    assert_eq!(r.status, 400);
    let child = create_key(
        &c,
        &api_key(&snapshot),
        json!({"name": "child", "role_descriptors": {"noop": {}}}),
    )
    .await;
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&api_key(&child)),
            Some(json!({"cluster": ["manage_own_api_key"], "index": [{"names": ["logs-q-r"], "privileges": ["create_doc"]}]})),
        )
        .await;
    assert_eq!(r.body["has_all_requested"], false);
    assert_eq!(r.body["index"]["logs-q-r"]["create_doc"], false);
    let info = es
        .api_keys()
        .into_iter()
        .find(|k| k.name == "child")
        .unwrap();
    assert_eq!(info.creator, "ops");
    assert_eq!(info.created_by_api_key.as_deref(), snapshot["id"].as_str());

    // Validation.
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&admin),
            Some(json!({})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "action_request_validation_exception",
        "must specify at least one privilege",
    );
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&admin),
            Some(json!({"cluster": ["fly"]})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        "unknown cluster privilege [fly]",
    );
    let r = c
        .call(
            Method::POST,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"name": "bad", "role_descriptors": {"r": {"indices": [{"names": ["x"], "privileges": ["writ"]}]}}})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        "unknown index privilege [writ]",
    );

    // No API-key privilege → 403 in ES's wording.
    es.add_role_user("reader", "readerpw", &[], &[(&["logs-*"], &["read"])]);
    let r = c
        .call(
            Method::POST,
            "/_security/api_key",
            Some(&basic("reader", "readerpw")),
            Some(json!({"name": "n"})),
        )
        .await;
    assert_es_error(
        &r,
        403,
        "security_exception",
        "action [cluster:admin/xpack/security/api_key/create] is unauthorized for user [reader] with effective roles [reader_role], this action is granted by the cluster privileges [manage_own_api_key,manage_api_key,manage_security,all]",
    );
}

#[tokio::test]
async fn manage_own_api_key_sees_only_own_keys() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    es.add_role_user("svc", "svcpass", &["manage_own_api_key"], &[]);
    let c = Client::new(&es);
    let svc = basic("svc", "svcpass");
    let admin_key = create_key(
        &c,
        &basic("elastic", "changeme"),
        json!({"name": "admin-key"}),
    )
    .await;
    let own = create_key(&c, &svc, json!({"name": "svc-key"})).await;

    let r = c
        .call(Method::GET, "/_security/api_key", Some(&svc), None)
        .await;
    assert_es_error(
        &r,
        403,
        "security_exception",
        "is unauthorized for user [svc]",
    );
    let r = c
        .call(
            Method::GET,
            "/_security/api_key?owner=true",
            Some(&svc),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let names: Vec<_> = r.body["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("svc-key")]);

    // Invalidating someone else's key by id matches nothing.
    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&svc),
            Some(json!({"ids": [admin_key["id"]]})),
        )
        .await;
    assert_eq!(r.body["invalidated_api_keys"], json!([]));
    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&svc),
            Some(json!({"name": "svc-key", "owner": true})),
        )
        .await;
    assert_eq!(r.body["invalidated_api_keys"], json!([own["id"]]));
}

#[tokio::test]
async fn data_stream_writes_and_reads() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    es.add_role_user("reader", "readerpw", &[], &[(&["logs-*"], &["read"])]);
    let c = Client::new(&es);
    let admin = basic("elastic", "changeme");
    let reader = basic("reader", "readerpw");
    let key = api_key(
        &create_key(
            &c,
            &admin,
            json!({"name": "writer", "role_descriptors": writer_descriptor()}),
        )
        .await,
    );

    // Missing @timestamp is rejected, and nothing is created.
    let r = c
        .call(
            Method::POST,
            &format!("/{DS}/_doc"),
            Some(&key),
            Some(json!({"message": "no ts"})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "document_parsing_exception",
        "data stream timestamp field [@timestamp] is missing",
    );
    assert_eq!(
        r.body["error"]["caused_by"]["type"],
        "illegal_argument_exception"
    );

    let doc = json!({"@timestamp": "2024-05-01T12:00:00Z", "message": "rotd probe"});
    let r = c
        .call(
            Method::POST,
            &format!("/{DS}/_doc?refresh=wait_for"),
            Some(&key),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let index = r.body["_index"].as_str().unwrap().to_string();
    let id = r.body["_id"].as_str().unwrap().to_string();
    assert!(
        index.starts_with(&format!(".ds-{DS}-")) && index.ends_with("-000001"),
        "{index}"
    );
    assert_eq!(index.len(), format!(".ds-{DS}-2024.05.01-000001").len());
    assert_eq!(r.body["result"], "created");
    assert_eq!(r.body["_version"], 1);
    assert_eq!(
        r.body["_shards"],
        json!({"total": 2, "successful": 1, "failed": 0})
    );
    assert_eq!(r.body["_seq_no"], 0);
    assert_eq!(r.body["_primary_term"], 1);
    assert_eq!(es.data_streams(), vec![DS.to_string()]);

    // _create and op_type=create with an explicit id.
    let r = c
        .call(
            Method::PUT,
            &format!("/{DS}/_create/probe-1"),
            Some(&key),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["_seq_no"], 1);
    let r = c
        .call(
            Method::PUT,
            &format!("/{DS}/_create/probe-1"),
            Some(&key),
            Some(doc.clone()),
        )
        .await;
    assert_es_error(
        &r,
        409,
        "version_conflict_engine_exception",
        "document already exists",
    );
    let r = c
        .call(
            Method::PUT,
            &format!("/{DS}/_doc/probe-2?op_type=create"),
            Some(&key),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(r.status, 201);
    // Data streams only take op_type=create (checked with a user allowed to `index`).
    let r = c
        .call(
            Method::PUT,
            &format!("/{DS}/_doc/probe-3"),
            Some(&admin),
            Some(doc.clone()),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        "only write ops with an op_type of create are allowed in data streams",
    );
    // The key holds create_doc only, so op_type=index is unauthorized.
    let r = c
        .call(
            Method::PUT,
            &format!("/{DS}/_doc/probe-3"),
            Some(&key),
            Some(doc.clone()),
        )
        .await;
    assert_es_error(
        &r,
        403,
        "security_exception",
        "action [indices:data/write/bulk[s]] is unauthorized for API key id [",
    );

    // Reads: the key cannot, the reader can through the backing index.
    let r = c
        .call(
            Method::GET,
            &format!("/{index}/_doc/{id}"),
            Some(&key),
            None,
        )
        .await;
    assert_es_error(
        &r,
        403,
        "security_exception",
        "action [indices:data/read/get] is unauthorized for API key id [",
    );
    assert!(r.body["error"]["reason"].as_str().unwrap().ends_with(&format!("of user [elastic] on indices [{index}], this action is granted by the index privileges [read,all]")));
    let r = c
        .call(
            Method::GET,
            &format!("/{index}/_doc/{id}"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["found"], true);
    assert_eq!(r.body["_source"], doc);
    assert_eq!(r.body["_index"], json!(index));
    assert_eq!(r.body["_version"], 1);
    let r = c
        .call(
            Method::GET,
            &format!("/{index}/_doc/missing"),
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.body,
        json!({"_index": index, "_id": "missing", "found": false})
    );
    let r = c
        .call(
            Method::GET,
            &format!("/{DS}/_doc/{id}"),
            Some(&reader),
            None,
        )
        .await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        "matches a data stream",
    );
    let r = c
        .call(Method::GET, "/logs-none-here/_doc/1", Some(&reader), None)
        .await;
    assert_es_error(
        &r,
        404,
        "index_not_found_exception",
        "no such index [logs-none-here]",
    );

    // Search by ids through the data stream name.
    let r = c
        .call(
            Method::POST,
            &format!("/{DS}/_search"),
            Some(&reader),
            Some(json!({"query": {"ids": {"values": [id, "probe-1", "nope"]}}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["hits"]["total"],
        json!({"value": 2, "relation": "eq"})
    );
    assert_eq!(r.body["hits"]["hits"][0]["_index"], json!(index));
    let r = c
        .call(Method::GET, "/logs-*/_search", Some(&reader), None)
        .await;
    assert_eq!(r.body["hits"]["total"]["value"], 3);
    let r = c
        .call(
            Method::POST,
            &format!("/{DS}/_search"),
            Some(&reader),
            Some(json!({"query": {"term": {"message": "rotd probe"}}, "size": 1})),
        )
        .await;
    assert_eq!(r.body["hits"]["total"]["value"], 3);
    assert_eq!(r.body["hits"]["hits"].as_array().unwrap().len(), 1);
    let r = c
        .call(
            Method::POST,
            &format!("/{DS}/_search"),
            Some(&key),
            Some(json!({})),
        )
        .await;
    assert_es_error(&r, 403, "security_exception", "indices:data/read/search");

    assert_eq!(es.documents(DS).len(), 3);
    assert_eq!(es.documents(&index)[0], doc);

    // Auto-create needs auto_configure (or create_index/manage/all).
    es.add_role_user(
        "nocreate",
        "nocreatepw",
        &[],
        &[(&["logs-*"], &["create_doc"])],
    );
    let r = c
        .call(
            Method::POST,
            "/logs-other-default/_doc",
            Some(&basic("nocreate", "nocreatepw")),
            Some(doc.clone()),
        )
        .await;
    assert_es_error(
        &r,
        403,
        "security_exception",
        "action [indices:admin/auto_create] is unauthorized for user [nocreate] with effective roles [nocreate_role] on indices [logs-other-default], this action is granted by the index privileges [auto_configure,create_index,manage,all]",
    );
    es.create_data_stream("logs-other-default");
    let r = c
        .call(
            Method::POST,
            "/logs-other-default/_doc",
            Some(&basic("nocreate", "nocreatepw")),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);

    // A plain index accepts op_type=index and updates.
    let r = c
        .call(
            Method::PUT,
            "/plain/_doc/1",
            Some(&admin),
            Some(json!({"a": 1})),
        )
        .await;
    assert_eq!((r.status, r.body["_index"].clone()), (201, json!("plain")));
    let r = c
        .call(
            Method::PUT,
            "/plain/_doc/1?refresh=true",
            Some(&admin),
            Some(json!({"a": 2})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["result"], "updated");
    assert_eq!(r.body["_version"], 2);
    assert_eq!(r.body["forced_refresh"], true);
    assert_eq!(es.documents("plain"), vec![json!({"a": 2})]);
    let r = c
        .call(
            Method::PUT,
            "/Plain/_doc/1",
            Some(&admin),
            Some(json!({"a": 2})),
        )
        .await;
    assert_es_error(&r, 400, "invalid_index_name_exception", "must be lowercase");
}

#[tokio::test]
async fn expired_key_is_rejected() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    let c = Client::new(&es);
    let admin = basic("elastic", "changeme");
    let created = create_key(&c, &admin, json!({"name": "short", "expiration": "1h"})).await;
    let key = api_key(&created);
    let r = c
        .call(Method::GET, "/_security/_authenticate", Some(&key), None)
        .await;
    assert_eq!(r.status, 200);

    es.advance_clock(Duration::from_secs(2 * 3600));
    let r = c
        .call(Method::GET, "/_security/_authenticate", Some(&key), None)
        .await;
    assert_es_error(
        &r,
        401,
        "security_exception",
        "anonymous access is not allowed",
    );
    assert_eq!(
        r.body["error"]["additional_unsuccessful_credentials"],
        "API key: api key is expired"
    );
    let id = created["id"].as_str().unwrap();
    let r = c
        .call(
            Method::PUT,
            &format!("/_security/api_key/{id}"),
            Some(&admin),
            Some(json!({"metadata": {"a": 1}})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        &format!("cannot update expired API key [{id}]"),
    );

    // Real-time expiry also works.
    let quick = create_key(&c, &admin, json!({"name": "quick", "expiration": "50ms"})).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let r = c
        .call(
            Method::GET,
            "/_security/_authenticate",
            Some(&api_key(&quick)),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn update_role_descriptors() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    es.add_user("other", "otherpass", true);
    let c = Client::new(&es);
    let admin = basic("elastic", "changeme");
    let created = create_key(
        &c,
        &admin,
        json!({"name": "rot", "role_descriptors": {"r": {"indices": [{"names": [DS], "privileges": ["read"]}]}}}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let key = api_key(&created);
    let check = json!({"index": [{"names": [DS], "privileges": ["read", "create_doc"]}]});
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&key),
            Some(check.clone()),
        )
        .await;
    assert_eq!(
        r.body["index"][DS],
        json!({"read": true, "create_doc": false})
    );

    let update = json!({"role_descriptors": writer_descriptor(), "metadata": {"rotated": true}});
    let r = c
        .call(
            Method::PUT,
            &format!("/_security/api_key/{id}"),
            Some(&admin),
            Some(update.clone()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, json!({"updated": true}));
    let r = c
        .call(
            Method::PUT,
            &format!("/_security/api_key/{id}"),
            Some(&admin),
            Some(update.clone()),
        )
        .await;
    assert_eq!(r.body, json!({"updated": false}));
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&key),
            Some(check),
        )
        .await;
    assert_eq!(
        r.body["index"][DS],
        json!({"read": false, "create_doc": true})
    );
    let info = es.api_keys().into_iter().find(|k| k.id == id).unwrap();
    assert_eq!(info.role_descriptors, writer_descriptor());
    assert_eq!(info.metadata, json!({"rotated": true}));

    // Authorization comes first: the writer key lacks manage_own_api_key.
    let r = c
        .call(
            Method::PUT,
            &format!("/_security/api_key/{id}"),
            Some(&key),
            Some(update.clone()),
        )
        .await;
    assert_es_error(
        &r,
        403,
        "security_exception",
        "cluster:admin/xpack/security/api_key/update",
    );
    // A key that holds the privilege is still refused: only the owner user may update.
    let snap = api_key(&create_key(&c, &admin, json!({"name": "snap"})).await);
    let r = c
        .call(
            Method::PUT,
            &format!("/_security/api_key/{id}"),
            Some(&snap),
            Some(update.clone()),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        "authentication via API key not supported: only the owner user can update an API key",
    );
    let r = c
        .call(
            Method::PUT,
            &format!("/_security/api_key/{id}"),
            Some(&basic("other", "otherpass")),
            Some(update.clone()),
        )
        .await;
    assert_es_error(
        &r,
        404,
        "resource_not_found_exception",
        &format!("no API key owned by requesting user found for ID [{id}]"),
    );
    let r = c
        .call(
            Method::PUT,
            "/_security/api_key/unknown",
            Some(&admin),
            Some(update.clone()),
        )
        .await;
    assert_eq!(r.status, 404);
    // Generated ids are base64url and may start with `_` or `-`; they still route to update.
    let r = c
        .call(
            Method::PUT,
            "/_security/api_key/_x-y",
            Some(&admin),
            Some(update.clone()),
        )
        .await;
    assert_es_error(&r, 404, "resource_not_found_exception", "ID [_x-y]");

    assert!(es.invalidate_api_key(id));
    let r = c
        .call(
            Method::PUT,
            &format!("/_security/api_key/{id}"),
            Some(&admin),
            Some(update),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        &format!("cannot update invalidated API key [{id}]"),
    );
}

#[tokio::test]
async fn change_password() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    es.add_role_user("logstash", "oldpassword", &[], &[]);
    es.add_role_user("beats", "beatspass", &[], &[]);
    let c = Client::new(&es);

    let r = c
        .call(
            Method::PUT,
            "/_security/user/logstash/_password",
            Some(&basic("beats", "beatspass")),
            Some(json!({"password": "hijacked"})),
        )
        .await;
    assert_es_error(
        &r,
        403,
        "security_exception",
        "cluster:admin/xpack/security/user/change_password",
    );
    let r = c
        .call(
            Method::POST,
            "/_security/user/logstash/_password",
            Some(&basic("logstash", "oldpassword")),
            Some(json!({"password": "short"})),
        )
        .await;
    assert_es_error(
        &r,
        400,
        "action_request_validation_exception",
        "passwords must be at least [6] characters long",
    );
    let r = c
        .call(
            Method::POST,
            "/_security/user/logstash/_password",
            Some(&basic("logstash", "oldpassword")),
            Some(json!({"password": "newpassword"})),
        )
        .await;
    assert_eq!((r.status, r.body.clone()), (200, json!({})));
    assert_eq!(es.user_password("logstash").as_deref(), Some("newpassword"));
    let r = c
        .call(
            Method::GET,
            "/_security/_authenticate",
            Some(&basic("logstash", "oldpassword")),
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let r = c
        .call(
            Method::PUT,
            "/_security/user/logstash/_password",
            Some(&basic("elastic", "changeme")),
            Some(json!({"password": "adminset"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = c
        .call(
            Method::PUT,
            "/_security/user/_password",
            Some(&basic("logstash", "adminset")),
            Some(json!({"password": "selfset"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(es.user_password("logstash").as_deref(), Some("selfset"));
}

#[tokio::test]
async fn hostile_input_and_routing() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    let c = Client::new(&es);
    let admin = basic("elastic", "changeme");

    let r = c
        .raw(
            Method::POST,
            "/_security/api_key",
            Some(&admin),
            "application/json",
            "{\"name\": ",
        )
        .await;
    assert_es_error(&r, 400, "x_content_parse_exception", "");
    let r = c
        .raw(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&admin),
            "application/json",
            "[1,2]",
        )
        .await;
    assert_eq!(r.status, 400);
    let r = c
        .raw(
            Method::POST,
            "/idx/_doc",
            Some(&admin),
            "application/json",
            "{not json",
        )
        .await;
    assert_es_error(&r, 400, "document_parsing_exception", "failed to parse");
    let r = c
        .raw(
            Method::POST,
            "/idx/_doc",
            Some(&admin),
            "application/json",
            "42",
        )
        .await;
    assert_eq!(r.status, 400);
    let r = c
        .raw(Method::POST, "/idx/_doc", Some(&admin), "text/plain", "{}")
        .await;
    assert_eq!(r.status, 406);
    assert_eq!(
        r.body["error"],
        "Content-Type header [text/plain] is not supported"
    );
    let r = c
        .raw(
            Method::POST,
            "/_security/api_key",
            Some(&admin),
            "application/json",
            "{\"name\": 5}",
        )
        .await;
    assert_eq!(r.status, 400);
    let r = c
        .raw(
            Method::POST,
            "/_security/api_key",
            Some(&admin),
            "application/json",
            "{\"name\": \"x\", \"role_descriptors\": {\"r\": 7}}",
        )
        .await;
    assert_es_error(&r, 400, "parse_exception", "failed to parse role [r]");

    let r = c.call(Method::GET, "/_nope/thing", None, None).await;
    assert_es_error(
        &r,
        400,
        "illegal_argument_exception",
        "no handler found for uri [/_nope/thing] and method [GET]",
    );
    let r = c.call(Method::GET, "/a/b/c/d", Some(&admin), None).await;
    assert_eq!(r.status, 400);
    let r = c
        .call(
            Method::DELETE,
            "/_security/_authenticate",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["allow"], "GET");
    assert_eq!(
        r.body["error"],
        "Incorrect HTTP method for uri [/_security/_authenticate] and method [DELETE], allowed: [GET]"
    );
    let r = c
        .call(Method::GET, "/%ff%fe/_doc/%zz", Some(&admin), None)
        .await;
    assert!(r.status >= 400);
    let r = c
        .call(
            Method::GET,
            "/_security/api_key?owner=maybe",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, 400);
    let r = c
        .call(
            Method::POST,
            "/idx/_search",
            Some(&admin),
            Some(json!({"query": {"bool": {}}})),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = c
        .call(
            Method::POST,
            "/idx/_search",
            Some(&admin),
            Some(json!({"query": {"ids": {"values": 3}}})),
        )
        .await;
    assert_eq!(r.status, 400);
    let r = c.call(Method::HEAD, "/", Some(&admin), None).await;
    assert_eq!(r.status, 200);
    // The server survived all of the above.
    let r = c.call(Method::GET, "/", Some(&admin), None).await;
    assert_eq!(r.status, 200);
    assert!(es.requests().iter().any(|l| l == "GET /_nope/thing"));
}

#[tokio::test]
async fn fault_knobs() {
    let es = EsEmulator::start();
    es.add_user("elastic", "changeme", true);
    let c = Client::new(&es);
    let admin = basic("elastic", "changeme");
    let f = es.faults();

    // Create key: persistent, then first-n.
    f.fail_create_key_with(Some(503));
    let r = c
        .call(
            Method::POST,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"name": "a"})),
        )
        .await;
    assert_es_error(&r, 503, "cluster_block_exception", "");
    f.fail_create_key_with(None);
    f.fail_create_key_next(2, 429);
    for _ in 0..2 {
        let r = c
            .call(
                Method::POST,
                "/_security/api_key",
                Some(&admin),
                Some(json!({"name": "a"})),
            )
            .await;
        assert_es_error(
            &r,
            429,
            "es_rejected_execution_exception",
            "rejected execution",
        );
    }
    let created = create_key(
        &c,
        &admin,
        json!({"name": "a", "role_descriptors": writer_descriptor()}),
    )
    .await;
    f.fail_create_key_next(1, 500);
    let r = c
        .call(
            Method::POST,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"name": "b"})),
        )
        .await;
    assert_es_error(&r, 500, "exception", "");
    assert_eq!(es.api_keys().len(), 1);

    // Index writes.
    let key = api_key(&created);
    let doc = json!({"@timestamp": "2024-05-01T00:00:00Z"});
    f.fail_index_with(Some(503));
    let r = c
        .call(
            Method::POST,
            &format!("/{DS}/_doc"),
            Some(&key),
            Some(doc.clone()),
        )
        .await;
    assert_es_error(
        &r,
        503,
        "unavailable_shards_exception",
        "primary shard is not active",
    );
    f.fail_index_with(None);
    f.fail_index_next(1, 503);
    let r = c
        .call(
            Method::POST,
            &format!("/{DS}/_doc"),
            Some(&key),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(r.status, 503);
    let r = c
        .call(
            Method::POST,
            &format!("/{DS}/_doc"),
            Some(&key),
            Some(doc.clone()),
        )
        .await;
    assert_eq!(r.status, 201);

    // Invalidate: 500, then 200 with errors and nothing invalidated.
    let id = created["id"].as_str().unwrap();
    f.fail_invalidate(Some(InvalidateFault::ServerError));
    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"ids": [id]})),
        )
        .await;
    assert_eq!(r.status, 500);
    f.fail_invalidate(Some(InvalidateFault::ReportErrors));
    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"ids": [id]})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["invalidated_api_keys"], json!([]));
    assert_eq!(r.body["error_count"], 1);
    assert_eq!(r.body["error_details"][0]["type"], "exception");
    let r = c
        .call(Method::GET, "/_security/_authenticate", Some(&key), None)
        .await;
    assert_eq!(r.status, 200);
    f.fail_invalidate(None);
    let r = c
        .call(
            Method::DELETE,
            "/_security/api_key",
            Some(&admin),
            Some(json!({"ids": [id]})),
        )
        .await;
    assert_eq!(r.body["invalidated_api_keys"], json!([id]));

    // Delay.
    f.set_delay(Duration::from_millis(250));
    let start = Instant::now();
    let r = c.call(Method::GET, "/", Some(&admin), None).await;
    assert_eq!(r.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(250));
    f.set_delay(Duration::ZERO);

    // A cluster that ignores role descriptors.
    f.grant_extra_privileges(true);
    let greedy = create_key(
        &c,
        &admin,
        json!({"name": "g", "role_descriptors": writer_descriptor()}),
    )
    .await;
    f.grant_extra_privileges(false);
    let r = c
        .call(
            Method::POST,
            "/_security/user/_has_privileges",
            Some(&api_key(&greedy)),
            Some(json!({"index": [{"names": [DS, "secrets"], "privileges": ["create_doc", "read", "write"]}]})),
        )
        .await;
    assert_eq!(
        r.body["index"][DS],
        json!({"create_doc": true, "read": true, "write": true})
    );
    assert_eq!(r.body["index"]["secrets"]["read"], true);
    let info = es.api_keys().into_iter().find(|k| k.name == "g").unwrap();
    assert_eq!(info.role_descriptors, writer_descriptor());

    // Any request.
    f.fail_any_next(1, 502);
    let r = c.call(Method::GET, "/", Some(&admin), None).await;
    assert_es_error(&r, 502, "status_exception", "");
    let r = c.call(Method::GET, "/", Some(&admin), None).await;
    assert_eq!(r.status, 200);
    f.fail_any_with(Some(503));
    f.reset();
    let r = c.call(Method::GET, "/", Some(&admin), None).await;
    assert_eq!(r.status, 200);
}
