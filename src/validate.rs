//! The formats of values rotd takes from outside and then stores, renders into files
//! and paths, or commits: Elasticsearch API key ids and keys from a cluster's answer,
//! usernames and key ids from the config and the command line, secrets on stdin.
//!
//! Why: such a value ends up in a record line (`key-id: …`), a commit trailer, a
//! rendered deliver path (`{{key_id}}`, `{{username}}`) and an HTTP header. A peer
//! that answers an id of `../../x` or a key with a newline would otherwise choose a
//! file rotd writes or corrupt the record in git. Each check accepts the value's
//! real format only, and none of the messages quotes a value that may be a secret.

/// The longest Elasticsearch id or key accepted. Elasticsearch's are 20–22
/// characters (ids) and 22 or more (keys); the bound leaves room and no more.
pub const MAX_ES_TOKEN: usize = 128;

/// The longest username accepted.
pub const MAX_USERNAME: usize = 128;

/// The longest secret `rotd import` accepts.
pub const MAX_SECRET: usize = 4096;

/// An Elasticsearch API key id (`what` names it in the message, e.g. "the id in the
/// cluster's answer"): 1 to [`MAX_ES_TOKEN`] characters of the URL-safe base64
/// alphabet Elasticsearch makes them from (`A-Z a-z 0-9 - _`).
pub fn es_id(id: &str, what: &str) -> Result<(), String> {
    es_token(id).map_err(|why| format!("{what} is not an Elasticsearch API key id: {why}"))
}

/// An Elasticsearch API key's secret part (`api_key`): the same alphabet and bound
/// as [`es_id`]. The message never quotes the value.
pub fn es_api_key(key: &str, what: &str) -> Result<(), String> {
    es_token(key).map_err(|why| format!("{what} is not an Elasticsearch API key: {why}"))
}

fn es_token(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.len() > MAX_ES_TOKEN {
        return Err(format!("it is longer than {MAX_ES_TOKEN} characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(
            "it holds a character outside A-Z a-z 0-9 '-' '_' (the URL-safe base64 alphabet)"
                .into(),
        );
    }
    Ok(())
}

/// A username rotd puts into records, paths and headers: 1 to [`MAX_USERNAME`]
/// characters of `A-Z a-z 0-9 . _ @ -`, not starting with `.` or `-` (no hidden file,
/// no option, no `..`).
pub fn username(u: &str) -> Result<(), String> {
    if u.is_empty() {
        return Err("a username may not be empty".into());
    }
    if u.len() > MAX_USERNAME {
        return Err(format!(
            "a username may have at most {MAX_USERNAME} characters"
        ));
    }
    if !u
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
    {
        return Err(format!(
            "username {u:?} holds a character outside A-Z a-z 0-9 '.' '_' '@' '-'"
        ));
    }
    if u.starts_with(['.', '-']) {
        return Err(format!("username {u:?} may not start with '.' or '-'"));
    }
    Ok(())
}

/// A secret given on stdin: one line of 1 to [`MAX_SECRET`] bytes with no control
/// character (a newline, a NUL, an escape would break the record or the file it is
/// delivered into). The message never quotes the value.
pub fn secret_line(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("the secret on stdin is empty".into());
    }
    if s.len() > MAX_SECRET {
        return Err(format!(
            "the secret on stdin is longer than {MAX_SECRET} bytes"
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        let which = match c {
            '\n' | '\r' => "a line break (give exactly one line)".to_owned(),
            '\0' => "a NUL byte".to_owned(),
            c => format!("the control character U+{:04X}", c as u32),
        };
        return Err(format!("the secret on stdin holds {which}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn es_tokens() {
        for ok in ["VuaCfGcBCdbkQm-e5aOx", "ui2lp2axTNmsyakw9tvNnw", "-x_", "a"] {
            assert!(es_id(ok, "id").is_ok(), "{ok}");
            assert!(es_api_key(ok, "key").is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_ES_TOKEN + 1);
        for bad in [
            "",
            "../../../../x",
            "a/b",
            "a\nb",
            "a b",
            "a\0",
            "a=",
            &long,
        ] {
            assert!(es_id(bad, "the id").is_err(), "{bad:?}");
            let e = es_api_key(bad, "the api_key").unwrap_err();
            assert!(bad.len() < 2 || !e.contains(bad), "{e}");
        }
    }

    #[test]
    fn usernames() {
        for ok in [
            "writer-a",
            "filebeat_writer",
            "svc@example.org",
            "a.b",
            "A1",
        ] {
            assert!(username(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_USERNAME + 1);
        for bad in [
            "", "../../x", ".hidden", "-rf", "a b", "a/b", "a\nb", "a:b", &long,
        ] {
            assert!(username(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secret_lines() {
        assert!(secret_line("p@ss w0rd!").is_ok());
        for bad in ["", "a\nb", "a\0b", "a\x1bb", "a\rb"] {
            let e = secret_line(bad).unwrap_err();
            assert!(!e.contains('\0'), "{e}");
        }
        assert!(secret_line(&"x".repeat(MAX_SECRET + 1)).is_err());
    }
}
