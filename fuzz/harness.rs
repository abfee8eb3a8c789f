//! What each fuzz target does with one input, shared by the cargo-fuzz targets in
//! `fuzz_targets/` (`#[path = "../harness.rs"] mod harness;`) and by the stable-Rust
//! stand-in `tests/fuzz_smoke.rs`, so both check the same parsers and the same
//! properties. A property that does not hold panics, which both report as a failure.
//!
//! Each fuzz binary uses one of these functions; the rest are dead code there.
#![allow(dead_code)]

use std::path::Path;

use rotd::targets::{elasticsearch as es, elasticsearch_user, prometheus};

/// `schedules/NAME.toml`: TOML, then every check of `rotd check`.
pub fn schedule(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut problems = Vec::new();
        let path = Path::new("/nonexistent/rotd-fuzz/schedules/fuzz.toml");
        let _ = rotd::config::parse_schedule_str(text, path, &mut problems);
        for p in &problems {
            let _ = p.to_string();
        }
    }
}

/// The exporter-toolkit web config (YAML) rotd edits for prometheus-remote-write.
pub fn web_config(data: &[u8]) {
    let _ = prometheus::WebConfig::parse(data, Path::new("web.yml"));
}

/// The decrypted plaintext of `secrets/NAME.age`; what parses must parse again once
/// written back.
pub fn record(data: &[u8]) {
    if let Ok(r) = rotd::store::Record::parse(data) {
        rotd::store::Record::parse(&r.to_plaintext()).expect("a parsed record parses again");
    }
}

/// The names the Elasticsearch seeds use, so that lookups can match.
const KEY_ID: &str = "VuaCfGcBCdbkQm-e5aOx";
const KEY_NAME: &str = "rotd-filebeat-output-01J9ZQ4V7X8T2M3N5P6R7S8T9V";
const ROTATION: &str = "01J9ZQ4V7X8T2M3N5P6R7S8T9V";
const INDEX: &str = "logs-nginx.access-default";

/// An Elasticsearch response body: parsed as the client parses it (JSON, or `Null`),
/// then read by every decision rotd takes on an answer.
pub fn es_response(data: &[u8]) {
    let v = es::parse_body(data);

    for status in [400, 401, 403, 404, 409, 429, 503] {
        let m = es::describe_error("GET", "/_security/api_key", status, &v);
        assert!(
            m.starts_with(&format!("GET /_security/api_key answered HTTP {status}")),
            "{m}"
        );
    }

    if let Some(k) = es::created_key(&v) {
        assert_eq!(Some(k.id), v["id"].as_str());
        assert_eq!(Some(k.api_key), v["api_key"].as_str());
        if let Some(e) = &k.expires {
            assert!(v["expiration"].is_i64() && e.ends_with('Z'), "{e}");
        }
    }

    let _ = es::supports_update(es::cluster_version(&v));

    // The live key's role descriptors, what an in-place update must find absent
    // afterwards, and what it puts back on failure: the same index privileges.
    for rd in [es::role_descriptors_of(&v, KEY_ID), v.clone()] {
        let held = es::held_index_privileges(&rd);
        assert_eq!(es::held_index_privileges(&es::restorable(&rd)), held);
    }

    // A rollback invalidates these: only live keys of that name.
    for id in es::live_keys_named(&v, KEY_NAME) {
        let keys = v["api_keys"].as_array().expect("ids come from api_keys");
        assert!(keys
            .iter()
            .any(|k| k["id"] == id && k["name"] == KEY_NAME && k["invalidated"] != true));
    }

    if let Some(m) = es::invalidate_errors(&v) {
        assert!(m.starts_with("DELETE /_security/api_key "), "{m}");
    }
    if es::is_invalidated(&v, KEY_ID) {
        // Only a real api_keys list confirms an invalidation.
        assert!(v["api_keys"].is_array());
    }

    if let Some((index, id)) = es::indexed_doc(&v) {
        assert_eq!(
            (Some(index), Some(id)),
            (v["_index"].as_str(), v["_id"].as_str())
        );
    }
    let _ = es::probe_doc_found(&v, ROTATION);

    let check = es::PrivilegeCheck::new(
        &["monitor".to_owned()],
        &[es::IndexPermission {
            names: vec![INDEX.to_owned()],
            privileges: vec!["create_doc".to_owned(), "auto_configure".to_owned()],
        }],
        &[(INDEX.to_owned(), "create".to_owned())],
    );
    // Null answers nothing, so every privilege asked for is a problem; no answer
    // has more problems than that.
    let most = check.problems(&serde_json::Value::Null).len();
    assert!(check.problems(&v).len() <= most);

    let _ = elasticsearch_user::authenticated_as(&v, "filebeat_writer");
}

/// The answer of the Prometheus probe's instant query (`/api/v1/query`).
pub fn prom_query(data: &[u8]) {
    match prometheus::query_found(data) {
        Ok(true) => {
            // Found means: status success, at least one series. serde_json does not
            // check the strings it skips (fields rotd ignores: their UTF-8, their
            // escapes), so a found answer need not be strict JSON; when it is, it
            // must say the same.
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
                assert_eq!(v["status"], "success");
                assert!(v["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty()));
            }
        }
        Ok(false) => {}
        Err(m) => assert!(m.starts_with("response could not be decoded: "), "{m}"),
    }
}
