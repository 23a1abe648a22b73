//! The control socket's client side: connect, send one request, read one response, with errors an operator can act on.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::proto::{Envelope, Request, Response, PROTOCOL};

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the daemon is not running (or not yet).
    #[error("no daemon answers on {0}: is nbd-failover.service running? (`systemctl status nbd-failover`)")]
    NotRunning(PathBuf),
    /// The socket refused us.
    #[error("permission denied on {0}: the control socket is root only (run with sudo)")]
    PermissionDenied(PathBuf),
    /// The daemon took longer than the deadline.
    #[error("the daemon did not answer within {0:?} on {1}: it may be wedged (see `journalctl -u nbd-failover`); `force-detach` works without it")]
    Timeout(Duration, PathBuf),
    /// Another IO failure.
    #[error("talking to the daemon on {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The answer was not a response.
    #[error("the daemon on {path} answered something that is not a response ({detail}): is it the same version as this CLI?")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// Sends `request` to the daemon on `socket` and waits at most `timeout` for the answer.
pub fn call(socket: &Path, request: Request, timeout: Duration) -> Result<Response, ClientError> {
    let p = socket.to_path_buf();
    let io = |source: std::io::Error| ClientError::Io {
        path: p.clone(),
        source,
    };
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(p)
                }
                std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(p),
                _ => io(e),
            })
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(&Envelope {
        protocol: PROTOCOL,
        request,
    })
    .map_err(|e| ClientError::Protocol {
        path: p.clone(),
        detail: e.to_string(),
    })?;
    line.push(b'\n');
    if let Err(e) = stream.write_all(&line) {
        return Err(match e.kind() {
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                ClientError::Protocol {
                    path: p,
                    detail: "it closed the connection without answering (peer not allowed: the socket is root only)".to_string(),
                }
            }
            _ => io(e),
        });
    }
    let mut answer = String::new();
    match BufReader::new(&stream).read_line(&mut answer) {
        Ok(0) => {
            return Err(ClientError::Protocol {
                path: p,
                detail: "it closed the connection without answering (peer not allowed: the socket is root only; or the daemon stopped)"
                    .to_string(),
            })
        }
        Ok(_) => {}
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            return Err(ClientError::Timeout(timeout, p))
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Err(ClientError::Protocol {
                path: p,
                detail: "it closed the connection without answering (peer not allowed: the socket is root only; or the daemon stopped)".to_string(),
            })
        }
        Err(e) => return Err(io(e)),
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
        path: p,
        detail: e.to_string(),
    })
}
