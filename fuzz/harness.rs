//! What each fuzz target does with one input, shared by the cargo-fuzz targets in
//! `fuzz_targets/` (`#[path = "../harness.rs"] mod harness;`) and by the stable-Rust
//! stand-in `tests/integration/fuzz_smoke.rs`, so both check the same parsers and the
//! same properties. A property that does not hold panics, which both report as a
//! failure.
//!
//! Each fuzz binary uses one of these functions; the rest are dead code there.
#![allow(dead_code)]

use std::io::Write;
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

/// The control socket, both sides. The daemon reads request lines (as tokio's
/// `lines()` splits them: on `\n`, a trailing `\r` dropped, invalid UTF-8 ends the
/// connection); a request that parses must serialise and parse back to the same
/// request. The client reads one answer line and does with it what `rotd rotate`,
/// `rotd status` and `rotd reload` do: print it, pick the exit code.
pub fn control(data: &[u8]) {
    use rotd::control::{Request, Response};

    for line in data.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Ok(line) = std::str::from_utf8(line) else {
            break;
        };
        match serde_json::from_str::<Request>(line) {
            Ok(req) => {
                let text = serde_json::to_string(&req).expect("a parsed request serialises");
                let again: Request =
                    serde_json::from_str(&text).expect("a serialised request parses");
                assert_eq!(
                    serde_json::to_string(&again).expect("a parsed request serialises"),
                    text,
                    "a request changed on its way through the socket: {line:?}"
                );
                assert_eq!(format!("{again:?}"), format!("{req:?}"));
            }
            Err(e) => {
                // What the daemon answers: one line, so the client can read it.
                let answer = Response::error(format!("bad request: {e}"));
                let text = serde_json::to_string(&answer).expect("an error answer serialises");
                assert!(!text.contains('\n'), "{text:?}");
            }
        }
    }

    // The client: everything up to the first newline, as `read_line` returns it.
    let end = data
        .iter()
        .position(|b| *b == b'\n')
        .map_or(data.len(), |i| i + 1);
    let Ok(answer) = std::str::from_utf8(&data[..end]) else {
        return;
    };
    let Ok(r) = serde_json::from_str::<Response>(answer) else {
        return;
    };
    // The daemon writes what the client reads: what parses must survive a round trip.
    let text = serde_json::to_string(&r).expect("a parsed answer serialises");
    let again: Response = serde_json::from_str(&text).expect("a serialised answer parses");
    assert_eq!(
        serde_json::to_string(&again).expect("a parsed answer serialises"),
        text
    );
    assert!(
        !text.contains('\n'),
        "an answer must stay one line: {text:?}"
    );

    let mut out = Vec::new();
    // `rotd reload`
    if r.ok {
        let _ = writeln!(out, "{}", r.message.clone().unwrap_or_default());
    }
    // `rotd rotate`: one line per result, the worst exit code.
    if let Some(results) = r.results.clone().filter(|_| r.ok) {
        let mut code = 0;
        for res in results {
            let _ = writeln!(out, "{}: {}", res.name, res.message);
            code = code.max(res.exit_code);
        }
        let _ = code;
    }
    // `rotd status` and `rotd status --json`
    if let Some(report) = r.status.as_ref().filter(|_| r.ok) {
        rotd::status::print(report, false, &mut out).expect("printing to memory cannot fail");
        rotd::status::print(report, true, &mut out).expect("printing to memory cannot fail");
    }
}

/// Splits an `allowed_signers` input: the allowed-signers text, then an armored SSH
/// signature (from its BEGIN line to its END line), then the data it signs.
fn split_signed(text: &str) -> (&str, &str, &str) {
    const BEGIN: &str = "-----BEGIN SSH SIGNATURE-----";
    const END: &str = "-----END SSH SIGNATURE-----";
    let Some(b) = text.find(BEGIN) else {
        return (text, "", "");
    };
    let after = &text[b..];
    let Some(e) = after.find(END) else {
        return (&text[..b], after, "");
    };
    let e = e + END.len();
    let data = after[e..].strip_prefix('\n').unwrap_or(&after[e..]);
    (&text[..b], &after[..e], data)
}

/// `[store] allowed_signers` (the format of git's `gpg.ssh.allowedSignersFile`), then
/// the verification of an arbitrary armored signature over arbitrary data.
pub fn allowed_signers(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (signers, sig, signed) = split_signed(text);
    let Ok(allowed) = rotd::signing::AllowedSigners::parse(signers) else {
        return;
    };
    let listed = signers
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(allowed.len(), listed, "one entry per key line");
    assert_eq!(allowed.is_empty(), listed == 0);

    for time in [0, 1_767_225_600, i64::MIN, i64::MAX] {
        match allowed.verify_at(signed.as_bytes(), sig, time) {
            Ok(v) => {
                assert!(v.fingerprint.starts_with("SHA256:"), "{}", v.fingerprint);
                assert!(!v.principal.is_empty());
                // A signature binds its data: one byte more and it is refused.
                let mut other = signed.as_bytes().to_vec();
                other.push(b'x');
                assert!(
                    allowed.verify_at(&other, sig, time).is_err(),
                    "a signature verified for data it does not sign"
                );
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    let _ = allowed.verify(signed.as_bytes(), sig);
}

/// A scratch directory for the inputs that rotd only reads from files (the identity,
/// the recipients file): one per process, reused by every input.
fn scratch() -> &'static Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("rotd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("the temp directory is writable");
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("the scratch directory is ours");
        d
    })
}

/// Removes the scratch directory (the stable stand-in calls it when done).
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch());
}

fn write_private(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let p = scratch().join(name);
    let _ = std::fs::remove_file(&p);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .expect("the scratch directory is writable");
    f.write_all(bytes)
        .expect("the scratch directory is writable");
    p
}

static IDENTITY_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
const PLACEHOLDER: &[u8] = b"AGE-SECRET-KEY-PLACEHOLDER";

/// An identity file made for this process (age-keygen's format).
fn identity_text() -> &'static [u8] {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        rotd::store::crypto::Keys::generate_identity_file()
            .0
            .to_string()
    })
    .as_bytes()
}

/// Its `AGE-SECRET-KEY-1…` line.
fn secret_line() -> &'static [u8] {
    let text = identity_text();
    let at = text
        .windows(15)
        .position(|w| w == b"AGE-SECRET-KEY-")
        .expect("an identity file holds its key");
    let end = text[at..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(text.len(), |e| at + e);
    &text[at..end]
}

fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// Recipient lines (`store.recipients`, written back as `.age-recipients`) and
/// identity lines (`store.identity`).
pub fn recipients(data: &[u8]) {
    // As the recipients file, next to a valid identity.
    let identity = IDENTITY_FILE.get_or_init(|| write_private("identity.txt", identity_text()));
    let recips = write_private("recipients.txt", data);
    if let Ok(keys) = rotd::store::crypto::Keys::load(identity, Some(&recips)) {
        let file = keys.recipients_file();
        assert!(
            file.starts_with(&format!("{}\n", keys.public_key())),
            "the daemon's own key comes first: {file:?}"
        );
        // `.age-recipients` is read back as a recipients file: it must load to itself.
        let again = write_private("age-recipients.txt", file.as_bytes());
        let keys2 = rotd::store::crypto::Keys::load(identity, Some(&again))
            .expect("the .age-recipients rotd wrote loads again");
        assert_eq!(keys2.recipients_file(), file);
        // What the daemon encrypts, it can read back.
        let sealed = keys
            .encrypt(b"fuzz")
            .expect("encrypting to loaded recipients");
        let opened = keys
            .decrypt(&sealed, "fuzz")
            .expect("the daemon reads its own");
        assert_eq!(&opened[..], b"fuzz");
    }

    // As the identity file. The seeds hold no key (a key in the repository would be
    // a secret in the repository): `AGE-SECRET-KEY-PLACEHOLDER` stands for one made
    // at start.
    let data = replace(data, PLACEHOLDER, secret_line());
    let identity = write_private("identity-fuzz.txt", &data);
    match rotd::store::crypto::Keys::load(&identity, None) {
        Ok(keys) => {
            assert!(keys.public_key().starts_with("age1"));
            let debug = format!("{keys:?}");
            assert!(
                !debug.contains("AGE-SECRET-KEY-"),
                "Debug shows the identity"
            );
        }
        Err(e) => {
            let m = e.to_string();
            assert!(
                !m.contains("AGE-SECRET-KEY-"),
                "an error quotes the identity: {m}"
            );
        }
    }
}

/// Commit messages as `history` and `verify` read them back (`audit::trailers`), and
/// the messages rotd writes (`store::Message`): what rotd writes it reads back the same.
pub fn trailers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Read: any message.
    for (k, v) in rotd::audit::trailers(&text) {
        assert!(k.starts_with("Rotd-"), "{k}");
        let _ = v;
    }

    // A NUL makes libgit2 read no trailer at all (the message is a C string); git
    // itself cannot store it in a commit message either. Not something to round-trip.
    if text.contains('\0') {
        return;
    }

    // Write then read: the first line is the subject, then `key: value` lines
    // become trailers (keys put into the Rotd- namespace), a line `--TEXT` is the
    // body; `\n` in a value or the body stands for a newline.
    let mut lines = text.lines();
    let subject = lines.next().unwrap_or("").to_owned();
    let mut msg = rotd::store::Message::new(subject);
    let mut expected = std::collections::BTreeMap::new();
    let mut body = None::<String>;
    for l in lines {
        if let Some(b) = l.strip_prefix("--") {
            body = Some(b.replace("\\n", "\n"));
            continue;
        }
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        // A trailer key: a token of letters, digits and '-' (git's rule), like
        // every key rotd writes.
        let k = k.trim();
        let key = if k.starts_with("Rotd-") {
            k.to_owned()
        } else {
            format!("Rotd-{k}")
        };
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            continue;
        }
        let value = v.replace("\\n", "\n");
        // rotd never writes a blank value, and git's parser would not read one back:
        // `Key:` with nothing after it takes the next line as its value.
        if value.trim().is_empty() {
            continue;
        }
        msg = msg.trailer(&key, value.as_str());
        // `Message::trailer` writes one line: control characters become spaces.
        let one_line: String = value
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let one_line = match one_line.trim() {
            "" => "-".to_owned(),
            v => v.to_owned(),
        };
        expected.insert(key, one_line);
    }
    // A line starting with `---` ends the message for git (a patch follows), so
    // no trailer after it is read. rotd's subjects start with a verb ("rotate",
    // "import", "retire", "rekey", "init") and it writes no body.
    let patch = |t: &str| t.lines().any(|l| l.starts_with("---"));
    if patch(&msg.subject) || body.as_deref().is_some_and(patch) {
        return;
    }
    // Without trailers the body is the last paragraph, which git reads as the
    // trailers when it looks like them.
    if expected.is_empty() {
        body = None;
    }
    msg.body = body;
    let rendered = msg.render();
    // Whitespace around a value is not kept by git's trailer format.
    let read: std::collections::BTreeMap<String, String> = rotd::audit::trailers(&rendered)
        .into_iter()
        .map(|(k, v)| (k, v.trim().to_owned()))
        .collect();
    assert_eq!(
        read, expected,
        "message read back differently: {rendered:?}"
    );
}

/// Two bcrypt-shaped hashes (the parser only checks the `$2` prefix).
const HASH_A: &str = "$2y$10$4Hv7V0f4sPwW4q0I7i1r3u0PjT5qJ1Q9wPpRkR8cCkY6QY7Nw1p2a";
const HASH_B: &str = "$2b$12$Qz3fXJ9m6o2wA0Q5h8vV4eN7s1bT0yU3cK5dL8gH2jR6pW9xZ4aCe";
const NEW_USER: &str = "rotd-fuzz-new";

/// The web-config rewrite the Prometheus target does (`WebConfig::set` + `render`),
/// from every config that parses, towards several intended user sets: the result
/// parses, holds exactly the intended users, and keeps every line that is not an
/// entry of a user whose hash changed (byte for byte, in order) — when the original
/// is a block mapping (or has no users) with one entry per line; otherwise (flow
/// style, a hash folded over lines) the other keys keep their value.
pub fn web_config_rewrite(data: &[u8]) {
    use std::collections::BTreeMap;
    let path = Path::new("web.yml");
    let Ok(wc) = prometheus::WebConfig::parse(data, path) else {
        return;
    };
    let text = std::str::from_utf8(data).expect("a parsed config is UTF-8");
    let before: BTreeMap<String, String> = wc
        .users
        .iter()
        .map(|(u, h)| {
            let u = u.as_str().expect("parse checked the names");
            let h = h.as_str().expect("parse checked the hashes");
            (u.to_owned(), h.to_owned())
        })
        .collect();
    // A Basic-auth user name cannot hold ':' (RFC 7617), and the line edit finds a
    // user's line by the text before the first ':'.
    if before.keys().any(|u| u.contains(':')) {
        return;
    }
    // Each entry on its own line: every hash appears as written (not folded over lines,
    // not escaped, not an alias) in bcrypt's alphabet, and every name is plain (the line edit finds an
    // entry by the text before its first ':', quotes trimmed).
    let one_line = before.values().all(|h| {
        text.contains(h.as_str())
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"$./".contains(&b))
    }) && before.keys().all(|u| {
        u.trim() == u && !u.contains(['"', '\'', '#', '\\']) && !u.contains(char::is_control)
    });
    let first = before.keys().next().cloned();

    let mut intents: Vec<BTreeMap<String, String>> = Vec::new();
    // The idle user gets a new password (apply), or is added.
    let mut add = before.clone();
    add.insert(NEW_USER.into(), HASH_A.into());
    intents.push(add);
    if let Some(u) = &first {
        // A user's hash changes (apply on an existing user, rollback to the old hash).
        let mut change = before.clone();
        change.insert(u.clone(), HASH_B.into());
        intents.push(change);
        // The retired user goes (retire).
        let mut remove = before.clone();
        remove.remove(u);
        intents.push(remove);
    }
    // Every user replaced.
    intents.push(BTreeMap::from([(NEW_USER.to_owned(), HASH_A.to_owned())]));

    for intended in intents {
        let mut wc = prometheus::WebConfig::parse(data, path).expect("it parsed once");
        for u in before.keys() {
            if !intended.contains_key(u) {
                wc.set(u, None);
            }
        }
        for (u, h) in &intended {
            if before.get(u) != Some(h) {
                wc.set(u, Some(h));
            }
        }
        let out = match wc.render(path) {
            Ok(out) => out,
            Err(e) => {
                assert!(intended.is_empty(), "render refused {intended:?}: {e}");
                continue;
            }
        };
        assert!(!intended.is_empty(), "rendered a config without users");
        let re = prometheus::WebConfig::parse(&out, path).unwrap_or_else(|e| {
            panic!(
                "the rewritten config does not parse: {e}\n{}",
                String::from_utf8_lossy(&out)
            )
        });
        let after: BTreeMap<String, String> = re
            .users
            .iter()
            .filter_map(|(u, h)| Some((u.as_str()?.to_owned(), h.as_str()?.to_owned())))
            .collect();
        assert_eq!(after.len(), re.users.len(), "users are strings");
        assert_eq!(after, intended, "the rewritten config holds other users");

        let changed: Vec<&str> = before
            .keys()
            .chain(intended.keys())
            .filter(|u| before.get(*u) != intended.get(*u))
            .map(String::as_str)
            .collect();
        let out = std::str::from_utf8(&out).expect("render writes UTF-8");
        match foreign_lines(text, &changed).filter(|_| one_line) {
            Some(foreign) => {
                let mut rest = out.lines();
                for l in &foreign {
                    assert!(
                        rest.any(|o| o == *l),
                        "the rewrite lost or changed the line {l:?}\n--- before\n{text}--- after\n{out}"
                    );
                }
            }
            None => {
                // Not line-editable: what is not basic_auth_users keeps its value.
                let others = |t: &str| {
                    let v: serde_yaml::Value = serde_yaml::from_str(t).unwrap_or_default();
                    let mut m = v.as_mapping().cloned().unwrap_or_default();
                    m.remove("basic_auth_users");
                    m
                };
                assert_eq!(others(out), others(text), "a foreign key changed");
            }
        }
    }
}

/// The lines of a web config that a rewrite changing `changed` must keep: every line
/// but the entries of those users in the `basic_auth_users:` block. None when the
/// config or its users are not a block mapping (`basic_auth_users: {…}`, `{}`).
fn foreign_lines<'a>(text: &'a str, changed: &[&str]) -> Option<Vec<&'a str>> {
    let key = |l: &str| l.split('#').next().unwrap_or("").trim_end() == "basic_auth_users:";
    // A block mapping at the top: each line at column 0 starts a known key.
    let block = text.lines().all(|l| {
        l.trim().is_empty()
            || l.starts_with([' ', '#'])
            || [
                "tls_server_config:",
                "http_server_config:",
                "basic_auth_users:",
            ]
            .iter()
            .any(|k| l.starts_with(k))
    });
    // Whitespace only: rotd reads it as an empty config without asking the YAML
    // parser, which would refuse a tab; nothing to keep.
    // Line breaks YAML knows and `str::lines` does not (a lone CR, NEL, LS, PS).
    let odd_breaks = text
        .replace("\r\n", "\n")
        .contains(['\r', '\u{85}', '\u{2028}', '\u{2029}']);
    // The first entry at column 0: a document indented as a whole is YAML too, but
    // rotd rewrites it whole rather than line by line.
    let indented = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .is_some_and(|l| l.starts_with([' ', '\t']));
    // A document that is not a mapping (`~`, `null`, indented or not) reads as an
    // empty config: the rewrite replaces it, no line of it is kept.
    let content = text
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let mapping = matches!(
        serde_yaml::from_str::<serde_yaml::Value>(text),
        Ok(serde_yaml::Value::Mapping(_))
    );
    if !block || indented || odd_breaks || text.trim().is_empty() || (content && !mapping) {
        return None;
    }
    let headers = text.lines().filter(|l| key(l)).count();
    let mentions = text
        .lines()
        .filter(|l| l.trim_start().starts_with("basic_auth_users"))
        .count();
    if headers != 1 || mentions != 1 {
        return if mentions == 0 {
            Some(text.lines().collect())
        } else {
            None
        };
    }
    let mut out = Vec::new();
    let mut in_block = false;
    for l in text.lines() {
        if key(l) {
            in_block = true;
            out.push(l);
            continue;
        }
        if in_block && !l.trim().is_empty() && !l.trim_start().starts_with('#') {
            if !l.starts_with(' ') {
                in_block = false;
            } else {
                let user = l
                    .trim()
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches(|c| c == '"' || c == '\'');
                if changed.contains(&user) {
                    continue;
                }
            }
        }
        out.push(l);
    }
    Some(out)
}

/// `next_run` for every schedule `rotd check` accepts with no problem: the times the
/// daemon's scheduler computes from it (the first run, the runs after it, the retry
/// backoffs, the window and `max_age` checks) must not panic.
pub fn next_run(data: &[u8]) {
    use rotd::daemon::scheduler;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut problems = Vec::new();
    let path = Path::new("/nonexistent/rotd-fuzz/schedules/fuzz.toml");
    let Some(s) = rotd::config::parse_schedule_str(text, path, &mut problems) else {
        return;
    };
    if !problems.is_empty() {
        return;
    }
    let now = chrono::Utc::now();
    let mut at = now;
    for _ in 0..3 {
        let Some(next) = scheduler::next_run(&s, at) else {
            break;
        };
        assert!(next > at, "the next run {next} is not after {at}");
        let _ = (next - now).to_std();
        if let Some(w) = s.window {
            let _ = w.contains(next);
        }
        at = next;
    }
    for attempt in 0..=s.retries.min(64) {
        let _ = scheduler::backoff(attempt, s.retry_backoff);
    }
    for age in [None, Some(-1), Some(0), Some(i64::MAX)] {
        let _ = scheduler::too_old(s.max_age, age);
    }
}
