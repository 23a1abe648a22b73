//! A minimal transmission-phase client: one `NBD_CMD_READ` at a time and `NBD_CMD_DISC`.
//!
//! Not a data path (the kernel is): it proves a negotiated connection works
//! (tests compare what it reads with what the server exports) and can back an
//! I/O health check of the server from user space, bounded by a timeout.

use std::io;
use std::time::Duration;

use super::handshake::HandshakeStream;
use super::proto::{CMD_DISC, CMD_READ, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC};

/// Why a transmission-phase command failed.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// Socket error or timeout.
    #[error("NBD transmission I/O error: {0}")]
    Io(#[from] io::Error),
    /// The server answered with an error number.
    #[error("NBD server answered the read with error {0}")]
    Server(u32),
    /// The server broke the protocol.
    #[error("NBD protocol violation in a reply: {0}")]
    Protocol(String),
}

fn request(kind: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut m = [0u8; 28];
    m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // bytes 4..6: command flags (none)
    m[6..8].copy_from_slice(&kind.to_be_bytes());
    m[8..16].copy_from_slice(&handle.to_be_bytes());
    m[16..24].copy_from_slice(&offset.to_be_bytes());
    m[24..28].copy_from_slice(&len.to_be_bytes());
    m
}

/// Reads `len` bytes at `offset` with one `NBD_CMD_READ` (simple reply), within `timeout`.
pub fn read_at<S: HandshakeStream>(
    stream: &mut S,
    offset: u64,
    len: u32,
    timeout: Duration,
) -> Result<Vec<u8>, TransmissionError> {
    const HANDLE: u64 = 0x6e62_642d_6661_696c; // "nbd-fail"
    stream.set_io_timeout(Some(timeout))?;
    stream.write_all(&request(CMD_READ, HANDLE, offset, len))?;
    let mut head = [0u8; 16];
    stream.read_exact(&mut head)?;
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(TransmissionError::Protocol(format!(
            "reply magic {magic:#x}, expected {SIMPLE_REPLY_MAGIC:#x}"
        )));
    }
    let error = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let handle = u64::from_be_bytes(head[8..16].try_into().unwrap_or([0; 8]));
    if handle != HANDLE {
        return Err(TransmissionError::Protocol(format!(
            "reply for handle {handle:#x}, expected {HANDLE:#x}"
        )));
    }
    if error != 0 {
        return Err(TransmissionError::Server(error));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    Ok(data)
}

/// Sends `NBD_CMD_DISC`: the server closes the connection after pending requests.
pub fn disconnect<S: HandshakeStream>(stream: &mut S) -> Result<(), TransmissionError> {
    stream.set_io_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&request(CMD_DISC, 0, 0, 0))?;
    stream.flush()?;
    Ok(())
}
