//! `elasticsearch-user-password` target: the password of one Elasticsearch native
//! realm user (`username`), changed with the admin credential.
//!
//! A native user has ONE password, so unlike an API key there is no overlap: the
//! moment `apply` changes it, the old password stops working. The lifecycle:
//!
//! * `plan` — nothing on Elasticsearch; the pending record carries `username`. The
//!   current record must exist (import the live password first with
//!   `rotd import NAME --username USER`): it is what a rollback restores.
//! * `apply` — `POST /_security/user/<username>/_password` with the new password as
//!   the admin credential. The pending record (committed before, as for every target)
//!   holds the new password; nothing about the old one is written beside it, because
//!   the old password IS the current record's secret.
//! * `deliver` — after apply. **Gap**: between apply and the end of deliver + reload,
//!   consumers still send the old password and are refused (HTTP 401). This is
//!   inherent to a single-password user; use `elasticsearch-api-key` where the client
//!   supports API keys, which rotates with both keys valid during the grace.
//! * `probe` — `GET /_security/_authenticate` as the user with the new password (the
//!   answered `username` must match); with `[probe] index`, one document is indexed
//!   into it as the user and read back as the admin.
//! * `rollback` — set the password back to the current record's secret (the engine
//!   passes the current record, also in recovery after a crash), then confirm with
//!   `_authenticate` that the old password works again.
//! * `retire` — nothing: the old password is already gone.
//!
//! HTTP calls (retries, time limit, TLS `ca`/`client_cert`/`client_key`, error texts)
//! are those of the API key target ([`super::elasticsearch::Connection`]).

use std::time::Instant;

use serde_json::json;
use toml::Spanned;

use super::elasticsearch::{enc, probe_document, Auth, Connection};
use super::Probe;
use super::{Error, Plan, ProbeContext, ProbeReport, StepContext, Undo};
use crate::store::Record;
use crate::syntax::Reporter;

pub const KIND: &str = "elasticsearch-user-password";

#[derive(Debug, Clone)]
pub struct Config {
    pub conn: Connection,
    /// The native user whose password rotates.
    pub username: String,
    /// Index or data stream the probe writes to as the user (optional).
    pub probe_index: Option<String>,
}

/// `[target]` of kind `elasticsearch-user-password`, as written.
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
    username: Option<Spanned<String>>,
}
crate::targets::elasticsearch::raw_connection!(Raw);

impl Config {
    pub(crate) fn from_raw(
        raw: &Spanned<Raw>,
        probe: &Probe,
        rep: &mut Reporter<'_>,
    ) -> Option<Config> {
        let t = raw.get_ref();
        let before = rep.count();
        let conn = Connection::from_raw(raw, probe, KIND, "changes the user's password", rep);
        // The username goes into records, the `{{username}}` of deliver paths and a
        // URL path: the conservative charset of `crate::validate::username`.
        let username = match t.username.as_ref() {
            Some(u) => match crate::validate::username(u.get_ref()) {
                Ok(()) => Some(u.get_ref().clone()),
                Err(m) => {
                    rep.at(u, format!("target.username: {m}"));
                    None
                }
            },
            None => {
                rep.at(raw, "target.username is required for elasticsearch-user-password: the native user whose password rotates");
                None
            }
        };
        let probe_index = probe.index.clone().filter(|i| !i.trim().is_empty());
        if rep.count() > before {
            return None;
        }
        Some(Config {
            conn: conn?,
            username: username?,
            probe_index,
        })
    }

    /// The pending record names the user; the current record must exist (rollback
    /// restores its password).
    pub fn plan(&self, current: Option<&Record>) -> Result<Plan, Error> {
        if current.is_none() {
            return Err(Error::Plan(format!(
                "no current password is recorded, so a failed rotation could not restore it; import the live password first with `rotd import NAME --username {}` (password on stdin)",
                self.username
            )));
        }
        Ok(Plan {
            username: Some(self.username.clone()),
            ..Plan::default()
        })
    }

    async fn set_password(
        &self,
        password: &crate::secret::Secret,
        ctx: &StepContext<'_>,
    ) -> Result<(), Error> {
        let admin = self.conn.admin_auth(ctx.lookup)?;
        let client = self.conn.client()?;
        self.conn
            .call_ok(
                &client,
                reqwest::Method::POST,
                &format!("/_security/user/{}/_password", enc(&self.username)),
                &admin,
                Some(&json!({ "password": password.expose() })),
            )
            .await?;
        Ok(())
    }

    /// Sets the user's password to the new one (the old one stops working).
    pub async fn apply(&self, new: &Record, ctx: &StepContext<'_>) -> Result<Undo, Error> {
        self.set_password(&new.secret, ctx).await?;
        tracing::info!(user = %self.username, "password changed");
        Ok(Undo::default())
    }

    /// `_authenticate` as the user with `password`: the answered username must match.
    async fn authenticate(&self, client: &reqwest::Client, auth: &Auth) -> Result<(), Error> {
        let v = self
            .conn
            .call_ok(
                client,
                reqwest::Method::GET,
                "/_security/_authenticate",
                auth,
                None,
            )
            .await?;
        authenticated_as(&v, &self.username).map_err(Error::Es)
    }

    pub async fn probe(&self, new: &Record, ctx: &ProbeContext<'_>) -> Result<ProbeReport, Error> {
        let started = Instant::now();
        let client = self.conn.client()?;
        let auth = Auth::basic(&self.username, &new.secret);
        self.authenticate(&client, &auth)
            .await
            .map_err(|e| Error::Probe(format!("authenticating with the new password: {e}")))?;
        let detail = match &self.probe_index {
            Some(ds) => {
                let admin = self.conn.admin_auth(ctx.lookup)?;
                probe_document(
                    &self.conn,
                    &client,
                    &auth,
                    &admin,
                    ds,
                    ctx,
                    "the new password",
                )
                .await?;
                format!(
                    "authenticated as {}; document indexed into {ds}, read back",
                    self.username
                )
            }
            None => format!("authenticated as {}", self.username),
        };
        Ok(ProbeReport {
            elapsed: started.elapsed(),
            detail,
        })
    }

    /// Sets the password back to the current record's secret and confirms it.
    pub async fn rollback(
        &self,
        current: Option<&Record>,
        ctx: &StepContext<'_>,
    ) -> Result<(), Error> {
        let Some(current) = current else {
            return Err(Error::Es(format!(
                "no current password is recorded for {}; the password of user {} cannot be restored (set it by hand and `rotd import` it)",
                ctx.name, self.username
            )));
        };
        self.set_password(&current.secret, ctx).await?;
        let client = self.conn.client()?;
        self.authenticate(&client, &Auth::basic(&self.username, &current.secret))
            .await
            .map_err(|e| Error::Es(format!("the restored password does not authenticate: {e}")))?;
        tracing::info!(user = %self.username, "previous password restored");
        Ok(())
    }
}

/// Does a `GET /_security/_authenticate` answer name `username`? The message says
/// which user it named instead (a user name, never a password). Pure, for the unit
/// tests and `fuzz/fuzz_targets/es_response.rs`.
pub fn authenticated_as(v: &serde_json::Value, username: &str) -> Result<(), String> {
    match v["username"].as_str() {
        Some(u) if u == username => Ok(()),
        // The answered name is the cluster's text: it could echo a credential.
        other => Err(format!(
            "GET /_security/_authenticate answered username {:?}, expected {username:?}",
            other.map(|o| crate::redact::peer_text(o, 200))
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authenticate_answers() {
        let v = json!({"username": "filebeat_writer", "roles": ["filebeat_writer"],
            "full_name": null, "email": null, "metadata": {}, "enabled": true,
            "authentication_realm": {"name": "default_native", "type": "native"},
            "lookup_realm": {"name": "default_native", "type": "native"},
            "authentication_type": "realm"});
        assert_eq!(authenticated_as(&v, "filebeat_writer"), Ok(()));
        let e = authenticated_as(&v, "other").unwrap_err();
        assert_eq!(
            e,
            r#"GET /_security/_authenticate answered username Some("filebeat_writer"), expected "other""#
        );
        let e = authenticated_as(&serde_json::Value::Null, "u").unwrap_err();
        assert!(e.contains("answered username None"), "{e}");
    }
}
