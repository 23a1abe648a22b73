//! Generic netlink for the kernel NBD driver: family lookup, CONNECT, DISCONNECT, STATUS.
//!
//! Messages are built and parsed here by hand (netlink header, generic
//! netlink header, attributes), following the kernel's
//! `include/uapi/linux/netlink.h`, `genetlink.h` and `nbd-netlink.h`. The
//! socket is opened through `nix`, so no `unsafe` is needed. Every request
//! asks for an acknowledgement, so a kernel error comes back as an errno.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

// include/uapi/linux/netlink.h
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);
// include/uapi/linux/genetlink.h
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// The kernel NBD driver's generic netlink numbers (`include/uapi/linux/nbd-netlink.h`).
pub mod nbd {
    /// Family name.
    pub const FAMILY: &str = "nbd";
    /// Family version.
    pub const VERSION: u8 = 1;
    /// Command: connect sockets to a device.
    pub const CMD_CONNECT: u8 = 1;
    /// Command: disconnect a device.
    pub const CMD_DISCONNECT: u8 = 2;
    /// Command: list devices and whether they have a configuration.
    pub const CMD_STATUS: u8 = 5;
    /// Attribute: device index (u32).
    pub const ATTR_INDEX: u16 = 1;
    /// Attribute: size in bytes (u64).
    pub const ATTR_SIZE_BYTES: u16 = 2;
    /// Attribute: block size in bytes (u64).
    pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
    /// Attribute: request timeout in seconds (u64).
    pub const ATTR_TIMEOUT: u16 = 4;
    /// Attribute: the server's transmission flags (u64).
    pub const ATTR_SERVER_FLAGS: u16 = 5;
    /// Attribute: client flags (u64, `NBD_CFLAG_*`).
    pub const ATTR_CLIENT_FLAGS: u16 = 6;
    /// Attribute: nested list of sockets.
    pub const ATTR_SOCKETS: u16 = 7;
    /// Attribute: how long to wait for a reconnect of a dead connection, seconds (u64).
    pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
    /// Attribute: nested device list (STATUS reply).
    pub const ATTR_DEVICE_LIST: u16 = 9;
    /// Attribute: backend identifier (string), shown in `/sys/block/nbdN/backend`.
    pub const ATTR_BACKEND_IDENTIFIER: u16 = 10;
    /// Nested item in a socket list.
    pub const SOCK_ITEM: u16 = 1;
    /// Socket file descriptor (u32) inside a socket item.
    pub const SOCK_FD: u16 = 1;
    /// Nested item in a device list.
    pub const DEVICE_ITEM: u16 = 1;
    /// Device index (u32) inside a device item.
    pub const DEVICE_INDEX: u16 = 1;
    /// "Has a configuration" (u8) inside a device item.
    pub const DEVICE_CONNECTED: u16 = 2;
}

/// Attribute writer (netlink TLVs, 4-byte aligned).
#[derive(Default)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
    }
    /// A u32 attribute.
    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_ne_bytes());
        self
    }
    /// A u64 attribute.
    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.put(kind, &v.to_ne_bytes());
        self
    }
    /// A NUL-terminated string attribute.
    pub fn string(&mut self, kind: u16, v: &str) -> &mut Self {
        let mut b = v.as_bytes().to_vec();
        b.push(0);
        self.put(kind, &b);
        self
    }
    /// A nested attribute built by `f`.
    pub fn nested(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        f(&mut inner);
        self.put(kind | NLA_F_NESTED, &inner.0);
        self
    }
}

/// Iterates over `(type, payload)` of the attributes in `buf`; stops at malformed data.
pub fn parse_attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((kind, &rest[4..len]));
        let next = (len + 3) & !3;
        rest = rest.get(next..).unwrap_or(&[]);
    }
    out
}

/// Reads a native-endian u32 attribute payload.
pub fn attr_u32(p: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(p.get(..4)?.try_into().ok()?))
}

/// A netlink error: the kernel's errno for a request, or a local socket error.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket failed (open, send, receive, timeout).
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    /// The kernel refused the request with this errno.
    #[error("kernel refused the request: {0}")]
    Kernel(io::Error),
    /// The generic netlink family does not exist (module not loaded).
    #[error("generic netlink family {0:?} not found (is the module loaded?)")]
    NoFamily(&'static str),
    /// The kernel's answer did not parse.
    #[error("malformed netlink answer: {0}")]
    Malformed(String),
}

impl NetlinkError {
    /// The kernel errno, if this is a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

fn nix_err(e: nix::Error) -> NetlinkError {
    NetlinkError::Socket(io::Error::from_raw_os_error(e as i32))
}

/// One generic netlink message received: command and attribute bytes.
pub struct GenlMessage {
    /// The generic netlink command.
    pub cmd: u8,
    /// The attributes (parse with [`parse_attrs`]).
    pub attrs: Vec<u8>,
}

/// A generic netlink socket bound to the kernel.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    /// Opens and binds a `NETLINK_GENERIC` socket; receives time out after `timeout`.
    pub fn open(timeout: Duration) -> Result<Self, NetlinkError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .map_err(nix_err)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(nix_err)?;
        let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros().max(1) as _);
        setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(nix_err)?;
        Ok(GenlSocket { fd, seq: 1 })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Looks up a family's id by name.
    pub fn family_id(&mut self, name: &'static str) -> Result<u16, NetlinkError> {
        let mut a = Attrs::default();
        a.string(CTRL_ATTR_FAMILY_NAME, name);
        let replies = match self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &a) {
            Err(NetlinkError::Kernel(e)) if e.raw_os_error() == Some(libc_enoent()) => {
                return Err(NetlinkError::NoFamily(name))
            }
            r => r?,
        };
        for m in &replies {
            for (kind, p) in parse_attrs(&m.attrs) {
                if kind == CTRL_ATTR_FAMILY_ID && p.len() >= 2 {
                    return Ok(u16::from_ne_bytes([p[0], p[1]]));
                }
            }
        }
        Err(NetlinkError::Malformed(format!(
            "family {name:?}: reply without CTRL_ATTR_FAMILY_ID"
        )))
    }

    /// Sends one request (with `NLM_F_ACK`) and collects the replies up to the acknowledgement.
    pub fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &Attrs,
    ) -> Result<Vec<GenlMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let len = 16 + 4 + attrs.0.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        msg.extend_from_slice(&[cmd, version, 0, 0]);
        msg.extend_from_slice(&attrs.0);
        send(self.raw(), &msg, MsgFlags::empty()).map_err(nix_err)?;

        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match recv(self.raw(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(nix_err(e)),
            };
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let mlen = u32::from_ne_bytes(rest[..4].try_into().unwrap_or([0; 4])) as usize;
                let mtype = u16::from_ne_bytes([rest[4], rest[5]]);
                let mseq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or([0; 4]));
                if mlen < 16 || mlen > rest.len() {
                    return Err(NetlinkError::Malformed(format!(
                        "message length {mlen} in a datagram of {}",
                        rest.len()
                    )));
                }
                let body = &rest[16..mlen];
                rest = rest.get((mlen + 3) & !3..).unwrap_or(&[]);
                if mseq != seq {
                    continue; // a stale answer to an earlier request
                }
                match mtype {
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(i32::from_ne_bytes)
                            .ok_or_else(|| NetlinkError::Malformed("short NLMSG_ERROR".into()))?;
                        if code == 0 {
                            return Ok(replies);
                        }
                        return Err(NetlinkError::Kernel(io::Error::from_raw_os_error(-code)));
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => {
                        if body.len() < 4 {
                            return Err(NetlinkError::Malformed(
                                "short generic netlink header".into(),
                            ));
                        }
                        replies.push(GenlMessage {
                            cmd: body[0],
                            attrs: body[4..].to_vec(),
                        });
                    }
                }
            }
        }
    }
}

fn libc_enoent() -> i32 {
    nix::Error::ENOENT as i32
}
