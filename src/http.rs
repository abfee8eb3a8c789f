//! The one HTTP client rotd talks to its peers with (targets, probes, Elasticsearch,
//! `http_post` reloads), the cap on what it reads of an answer, and the wording of
//! transport errors.
//!
//! Why one builder: every request rotd sends carries a credential (an
//! `Authorization` header, a password in a body) or acts on a consumer. A client that
//! followed redirects would hand them to whatever host a peer names in `Location`,
//! and would call a probe "proven" on an address nobody configured. So no client
//! follows a redirect ([`reqwest::redirect::Policy::none`]): a 3xx answer comes back
//! to the caller, which refuses it with [`redirect_refused`]. A client built for an
//! `https://` URL is also `https_only`, so nothing it sends can go out in clear text.
//!
//! A leaf module: it depends on nothing else in rotd but [`redact`](crate::redact),
//! so every client module can use it.

use std::time::Duration;

use crate::redact;

/// The most rotd reads of a peer's answer. Its answers are small (a query result, an
/// Elasticsearch response, an error page); a larger one, or one that never ends, is
/// refused once this much has arrived rather than held in memory until the timeout.
pub const MAX_BODY: usize = 16 << 20;

/// The longest `Location` quoted in an error (it is the peer's text).
const MAX_LOCATION: usize = 200;

/// A client builder with rotd's fixed policy: no redirect followed, `timeout` for the
/// whole request and for the connection, rotd's user agent. Callers add TLS settings
/// (a CA, a client identity) and build with [`build`].
pub fn builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("rotd/", env!("CARGO_PKG_VERSION")))
}

/// Builds a client for requests to `url`: when it is an `https://` URL, the client
/// refuses to send anything over plain http.
pub fn build(b: reqwest::ClientBuilder, url: &str) -> Result<reqwest::Client, String> {
    let https = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    b.https_only(https)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {}", describe(&e)))
}

/// A client for `url` with the fixed policy of [`builder`].
pub fn client(url: &str, timeout: Duration) -> Result<reqwest::Client, String> {
    build(builder(timeout), url)
}

/// When `resp` is a redirect (3xx), the refusal to follow it: the status and the
/// `Location` the peer named (scrubbed of credentials in use, shortened).
pub fn redirect_refused(resp: &reqwest::Response) -> Option<String> {
    let status = resp.status();
    if !status.is_redirection() {
        return None;
    }
    let location = match resp.headers().get(reqwest::header::LOCATION) {
        Some(l) => redact::peer_text(&String::from_utf8_lossy(l.as_bytes()), MAX_LOCATION),
        None => "(no Location header)".to_owned(),
    };
    Some(format!(
        "answered HTTP {} with a redirect to {location}; rotd does not follow redirects (they could carry the credential to another host): set the URL to the address that answers",
        status.as_u16()
    ))
}

/// Reads a response body, refusing it past [`MAX_BODY`].
pub async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let too_big = || {
        format!(
            "the answer is larger than the {} MiB rotd reads",
            MAX_BODY >> 20
        )
    };
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(too_big());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Describes a reqwest error without its URL (the URL is config, but keep errors
/// short and free of anything a future caller may put in a query string).
pub fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_decode() {
        "response could not be decoded"
    } else if e.is_redirect() {
        "redirect refused"
    } else {
        "request failed"
    };
    let mut s = kind.to_owned();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_https_client_refuses_plain_http() {
        let c = client("https://127.0.0.1:9", Duration::from_secs(1)).expect("builds");
        let e = c
            .get("http://127.0.0.1:9/")
            .send()
            .await
            .expect_err("plain http refused");
        assert!(e.is_builder(), "{e}");
    }
}
