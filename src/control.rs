//! The control socket: how `rotd rotate`, `rotd status` and `rotd reload` talk to a
//! running daemon.
//!
//! Protocol: JSON lines over a Unix stream socket. The client writes one [`Request`]
//! per line; the daemon answers each with one [`Response`] line, in order.
//!
//! ```text
//! → {"cmd":"rotate","names":["prom-remote-write"]}
//! ← {"ok":true,"results":[{"name":"prom-remote-write","outcome":"succeeded","exit_code":0,"message":"rotated (rotation 01J…)"}]}
//! → {"cmd":"status"}
//! ← {"ok":true,"status":{"secrets":[…],"unpushed_commits":0,"schedule_errors":[],"daemon":true}}
//! → {"cmd":"reload"}
//! ← {"ok":true,"message":"3 schedule(s) loaded, 0 error(s)"}
//! ← {"ok":false,"error":"uid 1000 is not allowed on the control socket"}
//! ```
//!
//! The socket is created with mode 0660 (group from `[daemon] socket_group`). Every
//! connection's peer credentials (SO_PEERCRED) are logged and go into the commit
//! trailer `Rotd-Trigger: manual uid=… user=…`; uids other than root, the daemon's
//! own and `[daemon] allowed_uids` are refused as they connect, before a byte of
//! theirs is read. A request line is at most 64 KiB and must arrive within 10 s; at
//! most 64 clients are served at once (the bounds are in `daemon::limits`). The client
//! here reads at most [`MAX_ANSWER`] bytes of an answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::status;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Rotate {
        names: Vec<String>,
        #[serde(default)]
        all: bool,
    },
    Status,
    Reload,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a refused request: the exit code the client should end with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<RotateResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<status::Report>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateResult {
    pub name: String,
    /// `succeeded`, `rolled-back`, `aborted`, `failed`, `error`.
    pub outcome: String,
    pub exit_code: i32,
    pub message: String,
}

impl Response {
    pub fn error(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

/// The daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon's answer on {0} is not valid: {1}")]
    Protocol(String, String),
}

/// The longest answer the client reads (a `status` of a thousand secrets is well
/// under 1 MiB); whatever listens on the socket path cannot make it read without end.
pub const MAX_ANSWER: u64 = 16 * 1024 * 1024;

/// Sends one request. `Ok(None)` when no daemon listens there (no socket, or a stale
/// one), so the caller runs in-process.
pub fn request(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Option<Response>, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.display().to_string(),
        source,
    };
    let stream = match StdUnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut w = stream.try_clone().map_err(io)?;
    let line = serde_json::to_string(req)
        .map_err(|e| ClientError::Protocol(socket.display().to_string(), e.to_string()))?;
    w.write_all(line.as_bytes())
        .and_then(|_| w.write_all(b"\n"))
        .map_err(io)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_ANSWER))
        .read_line(&mut answer)
        .map_err(io)?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| ClientError::Protocol(socket.display().to_string(), e.to_string()))
}
