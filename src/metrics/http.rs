//! The metrics HTTP endpoint: a minimal HTTP/1.x server for `GET /metrics` and `GET /healthz`, one request per connection.

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::text::CONTENT_TYPE;
use super::Metrics;
use crate::daemon::StatusBoard;

/// Longest accepted request head (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once (a scraper needs one).
const MAX_CONNECTIONS: usize = 32;

type LastContact = Arc<dyn Fn() -> Option<f64> + Send + Sync>;
type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct Ctx {
    metrics: Arc<Metrics>,
    board: StatusBoard,
    last_contact: LastContact,
    health: Health,
    read_timeout: Duration,
}

/// Serves `GET /metrics` (`text/plain; version=0.0.4`) and `GET /healthz`
/// (200 `ok\n` when `health()` is `Ok`, 503 with the reason otherwise) on
/// `listener`. Any other path is 404, another method on those paths 405,
/// `HEAD` gets the headers of the `GET`, and a request that is not HTTP/1.x is
/// 400; a client that does not send its request within a few seconds gets 408.
/// One request per connection (`Connection: close`). Runs until the task
/// running it is dropped or aborted, which also ends the connections in flight.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    board: StatusBoard,
    last_contact: Arc<dyn Fn() -> Option<f64> + Send + Sync>,
    health: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
) {
    let ctx = Ctx {
        metrics,
        board,
        last_contact,
        health,
        read_timeout: READ_TIMEOUT,
    };
    serve_ctx(listener, ctx).await;
}

async fn serve_ctx(listener: TcpListener, ctx: Ctx) {
    // Owned here, so aborting `serve` aborts every connection task with it.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        tracing::debug!(%peer, "metrics endpoint busy; connection closed");
                        drop(stream);
                        continue;
                    }
                    conns.spawn(handle(stream, ctx.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A response to write.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    content_type: &'static str,
    extra_headers: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_headers: "",
            body: body.into(),
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// What the request head said, as far as we care.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
}

/// Why a request head could not be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The connection closed before a single byte: nothing to answer.
    Closed,
    /// Malformed, truncated or too long.
    Bad(&'static str),
}

/// Reads until the blank line that ends the head; the body (if any) is ignored.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Bad("read error"))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Bad("connection closed inside the request head")
            });
        }
        // Look for the end of the head from a little before the new bytes.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[from..]) {
            buf.truncate(from + end);
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::Bad("request head too long"));
        }
    }
}

/// Offset just past `\r\n\r\n` (or a bare `\n\n`, which clients may send).
fn head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// Parses the request line of a head; the headers are not needed.
fn parse_head(head: &[u8]) -> Result<Request, &'static str> {
    if head.len() > MAX_HEAD {
        return Err("request head too long");
    }
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no request line")?;
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).map_err(|_| "request line is not UTF-8")?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("request line is not METHOD TARGET VERSION");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("bad method");
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err("bad request target");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err("not HTTP/1.x");
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
    })
}

/// Decides the response to a parsed request (rendering the metrics if asked).
fn respond(req: &Request, ctx: &Ctx) -> Response {
    let known = matches!(req.path.as_str(), "/metrics" | "/healthz");
    if !known {
        return Response::text(404, "not found\n");
    }
    if req.method != "GET" && req.method != "HEAD" {
        return Response {
            extra_headers: "Allow: GET, HEAD\r\n",
            ..Response::text(405, "method not allowed\n")
        };
    }
    match req.path.as_str() {
        "/metrics" => {
            let board = ctx
                .board
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let age = (ctx.last_contact)();
            Response {
                status: 200,
                content_type: CONTENT_TYPE,
                extra_headers: "",
                body: ctx.metrics.render(&board, age),
            }
        }
        _ => match (ctx.health)() {
            Ok(()) => Response::text(200, "ok\n"),
            Err(reason) => {
                let mut body = reason.replace(['\r', '\n'], " ");
                body.push('\n');
                Response::text(503, body)
            }
        },
    }
}

fn encode(resp: &Response, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{}\r\n",
        resp.status,
        reason_phrase(resp.status),
        resp.content_type,
        resp.body.len(),
        resp.extra_headers,
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(resp.body.as_bytes());
    }
    out
}

async fn handle(mut stream: TcpStream, ctx: Ctx) {
    let (resp, head_only) =
        match tokio::time::timeout(ctx.read_timeout, read_head(&mut stream)).await {
            Err(_) => (Response::text(408, "request timeout\n"), false),
            Ok(Err(HeadError::Closed)) => return,
            Ok(Err(HeadError::Bad(why))) => {
                (Response::text(400, format!("bad request: {why}\n")), false)
            }
            Ok(Ok(head)) => match parse_head(&head) {
                Ok(req) => (respond(&req, &ctx), req.method == "HEAD"),
                Err(why) => (Response::text(400, format!("bad request: {why}\n")), false),
            },
        };
    let bytes = encode(&resp, head_only);
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    // A client that went away or does not read is not our problem.
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

#[cfg(test)]
pub(super) async fn serve_for_test(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    board: StatusBoard,
    last_contact: LastContact,
    health: Health,
    read_timeout: Duration,
) {
    let ctx = Ctx {
        metrics,
        board,
        last_contact,
        health,
        read_timeout,
    };
    serve_ctx(listener, ctx).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_or_are_refused() {
        let ok = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(ok.method, "GET");
        assert_eq!(ok.path, "/metrics");
        assert_eq!(
            parse_head(b"HEAD /healthz HTTP/1.0\n\n").unwrap().method,
            "HEAD"
        );
        for bad in [
            &b""[..],
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /met\x01rics HTTP/1.1\r\n\r\n",
            b"\xff\xfe\x00 / HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn head_end_finds_crlf_and_bare_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
