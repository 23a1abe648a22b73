//! The NBD client handshake: fixed newstyle, `NBD_OPT_GO` with block sizes, `NBD_OPT_EXPORT_NAME` fallback.
//!
//! [`handshake`] runs over any [`HandshakeStream`] (TCP, unix socket, or a test
//! double) and is bounded by one deadline: every read and write gets the time
//! left, so a server that stalls yields [`HandshakeError::Timeout`], never a
//! hang. Every length the server sends is checked before anything is
//! allocated, so garbage yields a typed error, never a panic. [`connect`]
//! opens the socket(s) for an [`NbdAddress`] and hands back the negotiated
//! [`Export`] with the raw transmission flags the kernel needs.
//!
//! Structured replies are never negotiated: the kernel's NBD client speaks
//! simple replies only.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::proto::*;

/// Longest option reply payload accepted (the protocol caps strings at 4096 bytes).
pub const MAX_REPLY_LEN: u32 = 64 * 1024;
/// Most option replies accepted for one `NBD_OPT_GO` before giving up.
const MAX_REPLIES: usize = 64;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// `host:port` (resolved at connect time).
    Tcp(String),
    /// A unix stream socket.
    Unix(PathBuf),
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Tcp(a) => write!(f, "tcp:{a}"),
            NbdAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How to choose the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// `NBD_OPT_GO`, falling back to `NBD_OPT_EXPORT_NAME` if the server does not know GO.
    #[default]
    Auto,
    /// `NBD_OPT_GO` only.
    Go,
    /// `NBD_OPT_EXPORT_NAME` only (what pre-GO servers speak).
    ExportName,
}

/// What the handshake needs to know.
#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    /// The export name ("" is the server's default export).
    pub export: String,
    /// Bound on the whole handshake (connect included, in [`connect`]).
    pub timeout: Duration,
    /// How to choose the export.
    pub method: Method,
}

impl HandshakeOptions {
    /// Options for `export` with the default method and a 10 s timeout.
    pub fn new(export: impl Into<String>) -> Self {
        HandshakeOptions {
            export: export.into(),
            timeout: Duration::from_secs(10),
            method: Method::Auto,
        }
    }
}

/// The server's block-size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest request the server accepts.
    pub minimum: u32,
    /// Size the server prefers.
    pub preferred: u32,
    /// Largest request the server accepts.
    pub maximum: u32,
}

/// What the handshake negotiated: everything the kernel needs besides the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Export size in bytes.
    pub size: u64,
    /// Raw transmission flags (`NBD_FLAG_*`), passed to the kernel untouched.
    pub transmission_flags: u16,
    /// Block sizes, if the server sent them.
    pub block_sizes: Option<BlockSizes>,
    /// The server's handshake flags.
    pub handshake_flags: u16,
    /// Which option chose the export: [`Method::Go`] or [`Method::ExportName`].
    pub method: Method,
}

impl Export {
    /// The export is read-only.
    pub fn read_only(&self) -> bool {
        self.transmission_flags & TFLAG_READ_ONLY != 0
    }
    /// The server supports flush.
    pub fn can_flush(&self) -> bool {
        self.transmission_flags & TFLAG_SEND_FLUSH != 0
    }
    /// Several connections may share the export.
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & TFLAG_CAN_MULTI_CONN != 0
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket could not be opened.
    #[error("connecting to NBD server {address}: {source}")]
    Connect {
        /// The address tried.
        address: String,
        /// The OS error.
        source: io::Error,
    },
    /// The server did not finish the handshake in time (it stalled).
    #[error(
        "NBD server stalled: handshake not finished within {timeout:?} (waiting for {during})"
    )]
    Timeout {
        /// The configured bound.
        timeout: Duration,
        /// What the client was waiting for.
        during: &'static str,
    },
    /// The server closed the connection in the middle of a message.
    #[error("NBD server closed the connection during the handshake: short read of {what} ({got} of {wanted} bytes)")]
    ShortRead {
        /// The message being read.
        what: &'static str,
        /// Bytes expected.
        wanted: usize,
        /// Bytes received before end of stream.
        got: usize,
    },
    /// The peer is not an NBD server at all.
    #[error("not an NBD server: it sent {got:#018x} where NBDMAGIC (0x4e42444d41474943) belongs")]
    NotNbd {
        /// The first 8 bytes, as a big-endian number.
        got: u64,
    },
    /// The server speaks the oldstyle protocol (no export names, no options).
    #[error("NBD server speaks the oldstyle protocol, which has no export names: configure it for newstyle")]
    Oldstyle,
    /// A magic number is wrong.
    #[error("bad magic in {what}: expected {expected:#x}, got {got:#x}")]
    BadMagic {
        /// Where.
        what: &'static str,
        /// The right value.
        expected: u64,
        /// What came.
        got: u64,
    },
    /// The export does not exist on the server.
    #[error("unknown NBD export {export:?}: {message}")]
    UnknownExport {
        /// The name asked for.
        export: String,
        /// The server's message, or what happened.
        message: String,
    },
    /// The server requires TLS, which this client does not speak.
    #[error("NBD server requires TLS for export {export:?}: {message}")]
    TlsRequired {
        /// The name asked for.
        export: String,
        /// The server's message.
        message: String,
    },
    /// The server refused an option for another reason.
    #[error("NBD server refused {option} for export {export:?} with {reply}: {message}")]
    Refused {
        /// The option (`NBD_OPT_GO`, …).
        option: &'static str,
        /// The export name.
        export: String,
        /// The error reply's name.
        reply: &'static str,
        /// The server's message.
        message: String,
    },
    /// The server broke the protocol.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The export name cannot be sent.
    #[error("invalid export name {0:?}: at most 4096 bytes, no NUL")]
    InvalidExportName(String),
    /// Another I/O error on the socket.
    #[error("NBD handshake I/O error while {during}: {source}")]
    Io {
        /// What the client was doing.
        during: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// A stream the handshake can bound in time.
pub trait HandshakeStream: Read + Write {
    /// Sets the read and write timeout (`None`: block).
    fn set_io_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl HandshakeStream for TcpStream {
    fn set_io_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

impl HandshakeStream for UnixStream {
    fn set_io_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)?;
        self.set_write_timeout(timeout)
    }
}

/// A connected socket to an NBD server.
#[derive(Debug)]
pub enum NbdSocket {
    /// TCP.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
}

impl NbdSocket {
    /// The socket as an owned file descriptor (to hand to the kernel).
    pub fn into_fd(self) -> OwnedFd {
        match self {
            NbdSocket::Tcp(s) => s.into(),
            NbdSocket::Unix(s) => s.into(),
        }
    }
}

impl AsFd for NbdSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            NbdSocket::Tcp(s) => s.as_fd(),
            NbdSocket::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for NbdSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NbdSocket::Tcp(s) => s.read(buf),
            NbdSocket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for NbdSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NbdSocket::Tcp(s) => s.write(buf),
            NbdSocket::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            NbdSocket::Tcp(s) => s.flush(),
            NbdSocket::Unix(s) => s.flush(),
        }
    }
}

impl HandshakeStream for NbdSocket {
    fn set_io_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            NbdSocket::Tcp(s) => s.set_io_timeout(timeout),
            NbdSocket::Unix(s) => s.set_io_timeout(timeout),
        }
    }
}

/// Connects to `address` and runs the handshake, all within `options.timeout`.
///
/// The returned socket is in the transmission phase with blocking I/O and no
/// timeouts (the kernel applies its own); TCP sockets have `TCP_NODELAY`.
pub fn connect(
    address: &NbdAddress,
    options: &HandshakeOptions,
) -> Result<(NbdSocket, Export), HandshakeError> {
    let deadline = Instant::now() + options.timeout;
    let mut socket = match address {
        NbdAddress::Tcp(hostport) => {
            let connect_err = |source| HandshakeError::Connect {
                address: address.to_string(),
                source,
            };
            let addrs: Vec<_> = hostport.to_socket_addrs().map_err(connect_err)?.collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address resolved");
            let mut found = None;
            for a in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    last = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    break;
                }
                match TcpStream::connect_timeout(&a, left) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or_else(|| connect_err(last))?;
            s.set_nodelay(true).map_err(connect_err)?;
            NbdSocket::Tcp(s)
        }
        NbdAddress::Unix(path) => NbdSocket::Unix(UnixStream::connect(path).map_err(|source| {
            HandshakeError::Connect {
                address: address.to_string(),
                source,
            }
        })?),
    };
    let export = handshake_until(&mut socket, options, deadline)?;
    socket
        .set_io_timeout(None)
        .map_err(|source| HandshakeError::Io {
            during: "clearing the socket timeouts",
            source,
        })?;
    Ok((socket, export))
}

/// Runs the client side of the handshake on `stream`, bounded by `options.timeout`.
pub fn handshake<S: HandshakeStream>(
    stream: &mut S,
    options: &HandshakeOptions,
) -> Result<Export, HandshakeError> {
    handshake_until(stream, options, Instant::now() + options.timeout)
}

fn handshake_until<S: HandshakeStream>(
    stream: &mut S,
    options: &HandshakeOptions,
    deadline: Instant,
) -> Result<Export, HandshakeError> {
    let name = &options.export;
    if name.len() > 4096 || name.contains('\0') {
        return Err(HandshakeError::InvalidExportName(name.clone()));
    }
    let mut io = Bounded {
        stream,
        deadline,
        timeout: options.timeout,
    };

    let magic = io.read_u64("the server greeting (NBDMAGIC)")?;
    if magic != NBDMAGIC {
        return Err(HandshakeError::NotNbd { got: magic });
    }
    let style = io.read_u64("the server greeting (IHAVEOPT)")?;
    if style == CLISERV_MAGIC {
        return Err(HandshakeError::Oldstyle);
    }
    if style != IHAVEOPT {
        return Err(HandshakeError::BadMagic {
            what: "the server greeting",
            expected: IHAVEOPT,
            got: style,
        });
    }
    let hflags = io.read_u16("the handshake flags")?;
    let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    io.write_all(&cflags.to_be_bytes(), "sending the client flags")?;

    let use_go = match options.method {
        Method::ExportName => false,
        Method::Go if !fixed => {
            return Err(HandshakeError::Protocol(
                "server is not fixed-newstyle, so it cannot do NBD_OPT_GO".into(),
            ))
        }
        Method::Go | Method::Auto => fixed,
    };
    if use_go {
        match go(&mut io, name, hflags)? {
            Some(export) => return Ok(export),
            None if options.method == Method::Auto => {} // NBD_REP_ERR_UNSUP: fall back
            None => {
                return Err(HandshakeError::Refused {
                    option: "NBD_OPT_GO",
                    export: name.clone(),
                    reply: "NBD_REP_ERR_UNSUP",
                    message: "server does not support NBD_OPT_GO".into(),
                })
            }
        }
    }
    export_name(&mut io, name, hflags, no_zeroes)
}

/// `NBD_OPT_GO`; `Ok(None)` if the server answered `NBD_REP_ERR_UNSUP`.
fn go<S: HandshakeStream>(
    io: &mut Bounded<'_, S>,
    name: &str,
    hflags: u16,
) -> Result<Option<Export>, HandshakeError> {
    let mut data = Vec::with_capacity(8 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(io, OPT_GO, &data)?;

    let mut size_flags = None;
    let mut block_sizes = None;
    for _ in 0..MAX_REPLIES {
        let (reply, payload) = read_reply(io, OPT_GO)?;
        match reply {
            REP_ACK => {
                let Some((size, flags)) = size_flags else {
                    return Err(HandshakeError::Protocol(
                        "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
                    ));
                };
                return Ok(Some(Export {
                    size,
                    transmission_flags: flags,
                    block_sizes,
                    handshake_flags: hflags,
                    method: Method::Go,
                }));
            }
            REP_INFO => {
                if payload.len() < 2 {
                    return Err(HandshakeError::Protocol(format!(
                        "NBD_REP_INFO of {} bytes has no info type",
                        payload.len()
                    )));
                }
                let kind = u16::from_be_bytes([payload[0], payload[1]]);
                match kind {
                    INFO_EXPORT => {
                        let [_, _, s0, s1, s2, s3, s4, s5, s6, s7, f0, f1] = payload[..] else {
                            return Err(HandshakeError::Protocol(format!(
                                "NBD_INFO_EXPORT is {} bytes, not 12",
                                payload.len()
                            )));
                        };
                        let size = u64::from_be_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
                        let flags = u16::from_be_bytes([f0, f1]);
                        check_size_flags(size, flags)?;
                        size_flags = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE => {
                        if payload.len() != 14 {
                            return Err(HandshakeError::Protocol(format!(
                                "NBD_INFO_BLOCK_SIZE is {} bytes, not 14",
                                payload.len()
                            )));
                        }
                        let word = |i: usize| {
                            u32::from_be_bytes(payload[i..i + 4].try_into().unwrap_or([0; 4]))
                        };
                        let b = BlockSizes {
                            minimum: word(2),
                            preferred: word(6),
                            maximum: word(10),
                        };
                        check_block_sizes(&b)?;
                        block_sizes = Some(b);
                    }
                    _ => {} // other info items (name, description): not needed
                }
            }
            REP_ERR_UNSUP => return Ok(None),
            r if r & REP_FLAG_ERROR != 0 => return Err(refusal(OPT_GO, name, r, &payload)),
            other => {
                return Err(HandshakeError::Protocol(format!(
                    "unexpected reply type {other:#x} to NBD_OPT_GO"
                )))
            }
        }
    }
    Err(HandshakeError::Protocol(format!(
        "more than {MAX_REPLIES} replies to NBD_OPT_GO"
    )))
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags, or closes the connection.
fn export_name<S: HandshakeStream>(
    io: &mut Bounded<'_, S>,
    name: &str,
    hflags: u16,
    no_zeroes: bool,
) -> Result<Export, HandshakeError> {
    send_option(io, OPT_EXPORT_NAME, name.as_bytes())?;
    let mut head = [0u8; 10];
    match io.read_exact(&mut head, "the NBD_OPT_EXPORT_NAME reply") {
        Err(HandshakeError::ShortRead { got: 0, .. }) => {
            return Err(HandshakeError::UnknownExport {
                export: name.to_string(),
                message: "the server closed the connection after NBD_OPT_EXPORT_NAME \
                          (how a server refuses an export it does not have or allow)"
                    .into(),
            })
        }
        r => r?,
    }
    let size = u64::from_be_bytes(head[..8].try_into().unwrap_or([0; 8]));
    let flags = u16::from_be_bytes([head[8], head[9]]);
    check_size_flags(size, flags)?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        io.read_exact(&mut zeroes, "the 124 zero bytes after NBD_OPT_EXPORT_NAME")?;
    }
    Ok(Export {
        size,
        transmission_flags: flags,
        block_sizes: None,
        handshake_flags: hflags,
        method: Method::ExportName,
    })
}

fn check_size_flags(size: u64, flags: u16) -> Result<(), HandshakeError> {
    if flags & TFLAG_HAS_FLAGS == 0 {
        return Err(HandshakeError::Protocol(format!(
            "transmission flags {flags:#06x} lack NBD_FLAG_HAS_FLAGS"
        )));
    }
    if size > i64::MAX as u64 {
        return Err(HandshakeError::Protocol(format!(
            "export size {size} is beyond 2^63-1"
        )));
    }
    Ok(())
}

fn check_block_sizes(b: &BlockSizes) -> Result<(), HandshakeError> {
    let ok = b.minimum.is_power_of_two()
        && b.minimum <= 65536
        && b.preferred.is_power_of_two()
        && b.preferred >= b.minimum
        && b.maximum >= b.minimum;
    if ok {
        Ok(())
    } else {
        Err(HandshakeError::Protocol(format!(
            "inconsistent block sizes: minimum {}, preferred {}, maximum {}",
            b.minimum, b.preferred, b.maximum
        )))
    }
}

fn refusal(option: u32, name: &str, reply: u32, payload: &[u8]) -> HandshakeError {
    let message = String::from_utf8_lossy(payload).into_owned();
    let export = name.to_string();
    match reply {
        REP_ERR_UNKNOWN => HandshakeError::UnknownExport { export, message },
        REP_ERR_TLS_REQD => HandshakeError::TlsRequired { export, message },
        _ => HandshakeError::Refused {
            option: option_name(option),
            export,
            reply: reply_error_name(reply),
            message,
        },
    }
}

fn send_option<S: HandshakeStream>(
    io: &mut Bounded<'_, S>,
    option: u32,
    data: &[u8],
) -> Result<(), HandshakeError> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    io.write_all(&msg, "sending an option")
}

/// Reads one option reply header and its payload; checks magic, option and length.
fn read_reply<S: HandshakeStream>(
    io: &mut Bounded<'_, S>,
    option: u32,
) -> Result<(u32, Vec<u8>), HandshakeError> {
    let mut head = [0u8; 20];
    io.read_exact(&mut head, "an option reply header")?;
    let magic = u64::from_be_bytes(head[..8].try_into().unwrap_or([0; 8]));
    if magic != REPLY_MAGIC {
        return Err(HandshakeError::BadMagic {
            what: "an option reply",
            expected: REPLY_MAGIC,
            got: magic,
        });
    }
    let replied_to = u32::from_be_bytes(head[8..12].try_into().unwrap_or([0; 4]));
    let reply = u32::from_be_bytes(head[12..16].try_into().unwrap_or([0; 4]));
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap_or([0; 4]));
    if replied_to != option {
        return Err(HandshakeError::Protocol(format!(
            "reply to option {replied_to} while {} was asked",
            option_name(option)
        )));
    }
    if len > MAX_REPLY_LEN {
        return Err(HandshakeError::Protocol(format!(
            "option reply of {len} bytes (at most {MAX_REPLY_LEN} accepted)"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    io.read_exact(&mut payload, "an option reply payload")?;
    Ok((reply, payload))
}

/// A stream with a deadline: each call gets the time left.
struct Bounded<'a, S> {
    stream: &'a mut S,
    deadline: Instant,
    timeout: Duration,
}

impl<S: HandshakeStream> Bounded<'_, S> {
    fn arm(&mut self, during: &'static str) -> Result<(), HandshakeError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout {
                timeout: self.timeout,
                during,
            });
        }
        self.stream
            .set_io_timeout(Some(left))
            .map_err(|source| HandshakeError::Io { during, source })
    }

    fn fail(&self, during: &'static str, e: io::Error) -> HandshakeError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Timeout {
                timeout: self.timeout,
                during,
            },
            _ => HandshakeError::Io { during, source: e },
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), HandshakeError> {
        let mut got = 0;
        while got < buf.len() {
            self.arm(what)?;
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(HandshakeError::ShortRead {
                        what,
                        wanted: buf.len(),
                        got,
                    })
                }
                Ok(n) => got += n.min(buf.len() - got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(what, e)),
            }
        }
        Ok(())
    }

    fn read_u64(&mut self, what: &'static str) -> Result<u64, HandshakeError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    fn read_u16(&mut self, what: &'static str) -> Result<u16, HandshakeError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    fn write_all(&mut self, mut buf: &[u8], during: &'static str) -> Result<(), HandshakeError> {
        while !buf.is_empty() {
            self.arm(during)?;
            match self.stream.write(buf) {
                Ok(0) => {
                    return Err(HandshakeError::Io {
                        during,
                        source: io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(n) => buf = &buf[n.min(buf.len())..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(during, e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: reads come from `input`, then end of stream; writes are kept.
    struct Script {
        input: Vec<u8>,
        pos: usize,
        written: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.input.len() - self.pos);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl HandshakeStream for Script {
        fn set_io_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn run(input: Vec<u8>, method: Method) -> (Result<Export, HandshakeError>, Vec<u8>) {
        let mut s = Script {
            input,
            pos: 0,
            written: Vec::new(),
        };
        let mut o = HandshakeOptions::new("vol");
        o.method = method;
        let r = handshake(&mut s, &o);
        (r, s.written)
    }

    #[test]
    fn go_reads_size_flags_and_block_sizes() {
        let mut input = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
        input.extend(reply(OPT_GO, REP_INFO, &info));
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, 1 << 25] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        input.extend(reply(OPT_GO, REP_INFO, &bs));
        input.extend(reply(OPT_GO, REP_ACK, &[]));
        let (r, written) = run(input, Method::Auto);
        let e = r.unwrap();
        assert_eq!(e.size, 1 << 30);
        assert!(e.can_flush());
        assert_eq!(e.method, Method::Go);
        assert_eq!(e.block_sizes.unwrap().preferred, 4096);
        // client flags: fixed newstyle + no zeroes; then the GO option.
        assert_eq!(&written[..4], &3u32.to_be_bytes());
        assert_eq!(&written[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&written[12..16], &OPT_GO.to_be_bytes());
    }

    #[test]
    fn go_unsupported_falls_back_to_export_name() {
        let mut input = greeting(FLAG_FIXED_NEWSTYLE);
        input.extend(reply(OPT_GO, REP_ERR_UNSUP, b"no"));
        input.extend((4096u64).to_be_bytes());
        input.extend(TFLAG_HAS_FLAGS.to_be_bytes());
        input.extend([0u8; 124]);
        let (r, _) = run(input, Method::Auto);
        let e = r.unwrap();
        assert_eq!((e.size, e.method), (4096, Method::ExportName));
    }

    #[test]
    fn typed_errors() {
        let (r, _) = run(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), Method::Auto);
        assert!(matches!(r, Err(HandshakeError::NotNbd { .. })), "{r:?}");
        let mut old = NBDMAGIC.to_be_bytes().to_vec();
        old.extend(CLISERV_MAGIC.to_be_bytes());
        let (r, _) = run(old, Method::Auto);
        assert!(matches!(r, Err(HandshakeError::Oldstyle)), "{r:?}");
        let (r, _) = run(greeting(1)[..12].to_vec(), Method::Auto);
        assert!(
            matches!(
                r,
                Err(HandshakeError::ShortRead {
                    got: 4,
                    wanted: 8,
                    ..
                })
            ),
            "{r:?}"
        );
        let mut input = greeting(FLAG_FIXED_NEWSTYLE);
        input.extend(reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export"));
        let (r, _) = run(input, Method::Auto);
        assert!(
            matches!(r, Err(HandshakeError::UnknownExport { .. })),
            "{r:?}"
        );
        let mut input = greeting(FLAG_FIXED_NEWSTYLE);
        let mut bad = reply(OPT_GO, REP_ACK, &[]);
        bad[0] ^= 0xff;
        input.extend(bad);
        let (r, _) = run(input, Method::Auto);
        assert!(matches!(r, Err(HandshakeError::BadMagic { .. })), "{r:?}");
        let mut input = greeting(FLAG_FIXED_NEWSTYLE);
        let mut huge = reply(OPT_GO, REP_INFO, &[]);
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        input.extend(huge);
        let (r, _) = run(input, Method::Auto);
        assert!(matches!(r, Err(HandshakeError::Protocol(_))), "{r:?}");
        let (r, _) = run(greeting(FLAG_FIXED_NEWSTYLE), Method::ExportName);
        assert!(
            matches!(r, Err(HandshakeError::UnknownExport { .. })),
            "{r:?}"
        );
    }
}
