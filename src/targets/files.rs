//! `files` target: a credential that a service reads from its own config or a file
//! (an APM Server `secret_token`, an app's password file).
//!
//! Nothing is installed on a server: the secret is only delivered through
//! `[[deliver]]` templates and reloads, so there is no moment when two values are
//! valid, and nothing to retire. The optional generic HTTP probe (`[probe] http`)
//! proves that the service accepts the new value after its reload.

use toml::Spanned;

use super::{http_probe, Error, ProbeContext, ProbeReport};
use super::{HttpProbe, Probe};
use crate::store::Record;
use crate::syntax::Reporter;

pub const KIND: &str = "files";

#[derive(Debug, Clone)]
pub struct Config {
    pub http: Option<HttpProbe>,
}

/// Checks `probe.http` (its header template) at `at` (the `[probe]` table): the
/// schedule's `files` target and the agent's `[secret.probe]` share it.
pub(crate) fn check_http_probe(probe: &Probe, at: std::ops::Range<usize>, rep: &mut Reporter<'_>) {
    let Some(hdr) = probe.http.as_ref().and_then(|h| h.header.as_ref()) else {
        return;
    };
    if !hdr.contains(':') {
        rep.at(&Spanned::new(at.clone(), ()), "probe.http.header must look like \"Name: value\", e.g. \"Authorization: Bearer {{secret}}\"");
    }
    if let Err(m) = crate::deliver::check_placeholders(hdr) {
        rep.at(&Spanned::new(at, ()), format!("probe.http.header: {m}"));
    }
}

/// `[target]` of kind `files`: nothing but the kind.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Raw {
    #[allow(dead_code)] // read by `targets::RawHead`
    kind: String,
}

impl Config {
    pub(crate) fn from_raw(
        raw: &Spanned<Raw>,
        probe: &Probe,
        probe_span: Option<std::ops::Range<usize>>,
        rep: &mut Reporter<'_>,
    ) -> Option<Config> {
        if probe.index.is_some() {
            let at = Spanned::new(probe_span.clone().unwrap_or(raw.span()), ());
            rep.at(
                &at,
                "probe.index is an Elasticsearch setting; a `files` target probes with probe.http",
            );
        }
        check_http_probe(probe, probe_span.unwrap_or(raw.span()), rep);
        Some(Config {
            http: probe.http.clone(),
        })
    }

    pub async fn probe(&self, new: &Record, ctx: &ProbeContext<'_>) -> Result<ProbeReport, Error> {
        match &self.http {
            None => Ok(ProbeReport {
                elapsed: std::time::Duration::ZERO,
                detail: "none".into(),
            }),
            Some(h) => http_probe::run(h, new, ctx).await,
        }
    }
}
