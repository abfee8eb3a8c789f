//! The generic HTTP probe: one request with a header rendered from the new credential,
//! expecting a given status. Retried with the schedule's `[probe]` attempts and interval.
//!
//! A redirect is a failure at once, never followed and never retried: the probe must
//! prove the configured address, and the header it sends holds the credential.

use std::time::Instant;

use super::HttpProbe;
use super::{http_error, Error, ProbeContext, ProbeReport};
use crate::deliver::{self, Vars};
use crate::store::Record;

pub async fn run(
    cfg: &HttpProbe,
    new: &Record,
    ctx: &ProbeContext<'_>,
) -> Result<ProbeReport, Error> {
    let started = Instant::now();
    let client = crate::http::client(&cfg.url, ctx.probe.timeout).map_err(Error::Probe)?;
    let vars = Vars {
        secret: &new.secret,
        username: new.username(),
        key_id: new.key_id(),
        encoded: None,
        name: ctx.name,
        rotation_id: ctx.rotation_id,
    };
    let header = match &cfg.header {
        Some(h) => Some(deliver::render(h, &vars)?),
        None => None,
    };
    let mut last = String::new();
    for attempt in 1..=ctx.probe.attempts {
        let mut req = client.get(&cfg.url);
        if let Some(h) = &header {
            if let Some((k, v)) = h.split_once(':') {
                let mut value = reqwest::header::HeaderValue::from_str(v.trim()).map_err(|_| {
                    Error::Probe("probe.http.header renders to an invalid header value".into())
                })?;
                value.set_sensitive(true);
                req = req.header(k.trim(), value);
            }
        }
        match req.send().await {
            Ok(resp) if resp.status().as_u16() == cfg.expect => {
                return Ok(ProbeReport {
                    elapsed: started.elapsed(),
                    detail: format!("HTTP {}", cfg.expect),
                })
            }
            Ok(resp) if resp.status().is_redirection() => {
                let refused = crate::http::redirect_refused(&resp).unwrap_or_default();
                return Err(Error::Probe(format!("{} {refused}", cfg.url)));
            }
            Ok(resp) => {
                last = format!(
                    "{} answered HTTP {} (expected {})",
                    cfg.url,
                    resp.status().as_u16(),
                    cfg.expect
                )
            }
            Err(e) => last = format!("{}: {}", cfg.url, http_error(&e)),
        }
        tracing::debug!(attempt, reason = %last, "HTTP probe attempt failed");
        if attempt < ctx.probe.attempts {
            tokio::time::sleep(ctx.probe.interval).await;
        }
    }
    Err(Error::Probe(format!(
        "after {} attempts: {last}",
        ctx.probe.attempts
    )))
}
