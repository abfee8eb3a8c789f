//! The metrics endpoint: `GET /metrics` (Prometheus text format) and `GET /healthz`.
//!
//! A deliberately small HTTP/1.1 responder on a tokio `TcpListener`: one request per
//! connection, headers bounded to 8 KiB and read within 5 s, `Connection: close`.
//! That is all a Prometheus scrape needs, without a web framework in the daemon.
//!
//! At most [`limits::MAX_CONNECTIONS`] requests are served at once: a connection
//! beyond that gets `503` and is closed, so a flood of idle connections holds a
//! bounded number of descriptors for at most the read timeout, and `/healthz` answers
//! again as soon as it has passed. A failed accept (`EMFILE`) pauses the loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::limits::{self, AcceptBackoff, Throttle};

/// The whole exchange (read, render, write) of one connection.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves until the listener fails; `render` produces the metrics page.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(limits::MAX_CONNECTIONS));
    let mut backoff = AcceptBackoff::new("metrics");
    let mut full = Throttle::new(Duration::from_secs(10));
    loop {
        let (mut sock, peer) = match listener.accept().await {
            Ok(x) => {
                backoff.succeeded();
                x
            }
            Err(e) => {
                backoff.failed(&e).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if let Some(held_back) = full.allow() {
                tracing::warn!(%peer, limit = limits::MAX_CONNECTIONS, turned_away_not_logged = held_back,
                    "metrics port: every connection slot is taken; turning new connections away");
            }
            // Best effort, never waits: the socket buffer of a new connection is empty.
            let _ = sock.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(EXCHANGE_TIMEOUT, handle(&mut sock, peer, render.as_ref()))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics request failed"),
                Err(_) => tracing::debug!(%peer, "metrics client too slow; closed"),
            }
        });
    }
}

async fn handle<F, Fut>(
    sock: &mut tokio::net::TcpStream,
    _peer: SocketAddr,
    render: &F,
) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let line =
        String::from_utf8_lossy(buf.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render().await,
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "method not allowed\n".to_owned(),
        ),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}
