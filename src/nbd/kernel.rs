//! [`KernelNbd`]: the real [`BlockDevices`], attaching through the kernel NBD driver's generic netlink.
//!
//! Attach: handshake on each connection, then one CONNECT carrying the
//! sockets, size, block size, the server's raw transmission flags, the request
//! and dead-connection timeouts and the backend identifier. Without an index
//! the kernel picks an unused device under its own lock (or creates one), so
//! two attachers never race for a device; with an index, EBUSY (another
//! attacher, or udev holding the device open right after the module loads) is
//! retried until the attach timeout. The attach is reported only once
//! `/sys/block/nbdN/pid` shows the connection and `/dev/nbdN` exists.
//!
//! Detach: DISCONNECT, then wait until the pid file is gone and the size is 0
//! (the kernel drains and tears down asynchronously) before reporting free.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use super::handshake::{self, Export, HandshakeOptions};
use super::netlink::{attr_u32, nbd, parse_attrs, Attrs, GenlSocket, NetlinkError};
use super::sysfs::Roots;
use super::{
    AttachRequest, Attachment, BlockDevices, DetachMode, DetachOptions, Detached, DeviceChoice,
    DeviceStatus, NbdError,
};

const EBUSY: i32 = nix::Error::EBUSY as i32;
const EINVAL: i32 = nix::Error::EINVAL as i32;
const EPERM: i32 = nix::Error::EPERM as i32;
const NETLINK_TIMEOUT: Duration = Duration::from_secs(30);

/// The kernel NBD driver, through generic netlink and sysfs.
#[derive(Debug, Clone, Default)]
pub struct KernelNbd {
    roots: Roots,
}

impl KernelNbd {
    /// The real kernel (`/sys`, `/dev`, `/proc/self/mountinfo`).
    pub fn new() -> Self {
        KernelNbd::default()
    }

    /// Uses other roots for sysfs, `/dev` and mountinfo.
    pub fn with_roots(roots: Roots) -> Self {
        KernelNbd { roots }
    }

    fn socket(&self, op: &'static str, index: Option<u32>) -> Result<(GenlSocket, u16), NbdError> {
        let mut s = GenlSocket::open(NETLINK_TIMEOUT).map_err(|source| NbdError::Netlink {
            op,
            index,
            source,
        })?;
        let family = s.family_id(nbd::FAMILY).map_err(|e| match e {
            NetlinkError::NoFamily(_) => NbdError::ModuleNotLoaded(e),
            source => NbdError::Netlink { op, index, source },
        })?;
        Ok((s, family))
    }

    /// Indices and "has a configuration" flags from netlink STATUS.
    pub fn kernel_status(&self, index: Option<u32>) -> Result<Vec<(u32, bool)>, NbdError> {
        let (mut s, family) = self.socket("STATUS", index)?;
        let mut a = Attrs::default();
        if let Some(i) = index {
            a.u32(nbd::ATTR_INDEX, i);
        }
        let replies = s
            .request(family, nbd::CMD_STATUS, nbd::VERSION, &a)
            .map_err(|source| NbdError::Netlink {
                op: "STATUS",
                index,
                source,
            })?;
        let mut out = Vec::new();
        for m in &replies {
            for (kind, list) in parse_attrs(&m.attrs) {
                if kind != nbd::ATTR_DEVICE_LIST {
                    continue;
                }
                for (item_kind, item) in parse_attrs(list) {
                    if item_kind != nbd::DEVICE_ITEM {
                        continue;
                    }
                    let mut idx = None;
                    let mut connected = false;
                    for (k, p) in parse_attrs(item) {
                        match k {
                            nbd::DEVICE_INDEX => idx = attr_u32(p),
                            nbd::DEVICE_CONNECTED => connected = p.first().is_some_and(|b| *b != 0),
                            _ => {}
                        }
                    }
                    if let Some(i) = idx {
                        out.push((i, connected));
                    }
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn device_status(&self, index: u32) -> Result<DeviceStatus, NbdError> {
        let sys_err = |source| NbdError::Sysfs {
            path: self.roots.block_dir(index),
            source,
        };
        let st = self.roots.state(index).map_err(sys_err)?;
        if !st.exists {
            return Err(NbdError::NoSuchDevice { index });
        }
        let mounts = self.roots.mounts(index).map_err(|source| NbdError::Sysfs {
            path: self.roots.mountinfo.clone(),
            source,
        })?;
        Ok(DeviceStatus {
            index,
            device: self.roots.dev_path(index),
            attached: st.pid.is_some(),
            pid: st.pid,
            backend: st.backend,
            size_bytes: st.size_bytes,
            read_only: st.read_only,
            mounts,
            holders: st.holders,
        })
    }

    fn connect_once(
        &self,
        request: &AttachRequest,
        export: &Export,
        block_size: u32,
        fds: &[OwnedFd],
    ) -> Result<u32, NetlinkError> {
        let (mut s, family) = match self.socket("CONNECT", None) {
            Ok(x) => x,
            Err(NbdError::ModuleNotLoaded(e)) => return Err(e),
            Err(NbdError::Netlink { source, .. }) => return Err(source),
            Err(e) => return Err(NetlinkError::Malformed(e.to_string())),
        };
        let mut a = Attrs::default();
        if let DeviceChoice::Index(i) = request.device {
            a.u32(nbd::ATTR_INDEX, i);
        }
        a.u64(nbd::ATTR_SIZE_BYTES, export.size)
            .u64(nbd::ATTR_BLOCK_SIZE_BYTES, u64::from(block_size))
            .u64(nbd::ATTR_SERVER_FLAGS, u64::from(export.transmission_flags))
            .u64(nbd::ATTR_CLIENT_FLAGS, 0)
            .u64(
                nbd::ATTR_TIMEOUT,
                whole_seconds(request.request_timeout).max(1),
            )
            .u64(
                nbd::ATTR_DEAD_CONN_TIMEOUT,
                whole_seconds(request.dead_conn_timeout),
            )
            .string(nbd::ATTR_BACKEND_IDENTIFIER, &request.backend.to_string())
            .nested(nbd::ATTR_SOCKETS, |socks| {
                for fd in fds {
                    socks.nested(nbd::SOCK_ITEM, |item| {
                        item.u32(nbd::SOCK_FD, fd.as_raw_fd() as u32);
                    });
                }
            });
        let replies = s.request(family, nbd::CMD_CONNECT, nbd::VERSION, &a)?;
        for m in &replies {
            for (kind, p) in parse_attrs(&m.attrs) {
                if kind == nbd::ATTR_INDEX {
                    if let Some(i) = attr_u32(p) {
                        return Ok(i);
                    }
                }
            }
        }
        match request.device {
            DeviceChoice::Index(i) => Ok(i),
            DeviceChoice::Any => Err(NetlinkError::Malformed(
                "CONNECT reply without NBD_ATTR_INDEX".into(),
            )),
        }
    }

    /// Waits until `index` shows a connection with our backend id and its node exists.
    fn confirm(
        &self,
        index: u32,
        request: &AttachRequest,
        deadline: Instant,
    ) -> Result<(), NbdError> {
        let want = request.backend.to_string();
        loop {
            let st = self.roots.state(index).map_err(|source| NbdError::Sysfs {
                path: self.roots.block_dir(index),
                source,
            })?;
            let node = self.roots.dev_path(index).exists();
            let backend_ok = st.backend.as_deref() == Some(want.as_str());
            if st.pid.is_some() && backend_ok && node {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NbdError::NotConfirmed {
                    index,
                    detail: format!(
                        "pid {:?}, backend {:?} (want {want:?}), {} {}",
                        st.pid,
                        st.backend,
                        self.roots.dev_path(index).display(),
                        if node { "exists" } else { "missing" }
                    ),
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The kernel's logical block size: the server's minimum, at least 512, a power of two, at most 4096.
fn choose_block_size(request: &AttachRequest, export: &Export) -> Result<u32, NbdError> {
    let min = export.block_sizes.map(|b| b.minimum).unwrap_or(1);
    let bs = request.block_size.unwrap_or(min.max(512));
    if !bs.is_power_of_two() || !(512..=4096).contains(&bs) || bs < min {
        return Err(NbdError::Invalid(format!(
            "block size {bs} is unusable: the kernel takes a power of two in 512..=4096, \
             and the server's minimum is {min}"
        )));
    }
    Ok(bs)
}

impl BlockDevices for KernelNbd {
    fn attach(&self, request: &AttachRequest) -> Result<Attachment, NbdError> {
        if request.connections == 0 {
            return Err(NbdError::Invalid("at least one connection".into()));
        }
        if request.request_timeout.is_zero() {
            return Err(NbdError::Invalid(
                "request timeout 0 would let I/O hang forever on a dead server".into(),
            ));
        }
        let mut hopts = HandshakeOptions::new(request.export.clone());
        hopts.timeout = request.handshake_timeout;
        hopts.method = request.method;
        let (first, export) = handshake::connect(&request.address, &hopts)?;
        if request.connections > 1 && !export.can_multi_conn() {
            return Err(NbdError::Invalid(format!(
                "{} connections asked, but the server does not advertise NBD_FLAG_CAN_MULTI_CONN",
                request.connections
            )));
        }
        let block_size = choose_block_size(request, &export)?;
        let mut fds = vec![first.into_fd()];
        for _ in 1..request.connections {
            let (s, e) = handshake::connect(&request.address, &hopts)?;
            if e.size != export.size || e.transmission_flags != export.transmission_flags {
                return Err(NbdError::Invalid(format!(
                    "connections disagree: size {} flags {:#x} vs size {} flags {:#x}",
                    export.size, export.transmission_flags, e.size, e.transmission_flags
                )));
            }
            fds.push(s.into_fd());
        }

        let start = Instant::now();
        let deadline = start + request.attach_timeout;
        let mut backoff = Duration::from_millis(10);
        let index = loop {
            match self.connect_once(request, &export, block_size, &fds) {
                Ok(i) => break i,
                Err(e) if e.errno() == Some(EBUSY) && Instant::now() < deadline => {
                    thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                Err(e) if e.errno() == Some(EBUSY) => {
                    return Err(NbdError::DeviceBusy {
                        index: match request.device {
                            DeviceChoice::Index(i) => Some(i),
                            DeviceChoice::Any => None,
                        },
                        waited: start.elapsed(),
                    })
                }
                Err(e @ NetlinkError::NoFamily(_)) => return Err(NbdError::ModuleNotLoaded(e)),
                Err(source) => {
                    return Err(NbdError::Netlink {
                        op: "CONNECT",
                        index: match request.device {
                            DeviceChoice::Index(i) => Some(i),
                            DeviceChoice::Any => None,
                        },
                        source,
                    })
                }
            }
        };
        // The kernel holds its own references to the sockets now.
        drop(fds);
        self.confirm(
            index,
            request,
            deadline.max(Instant::now() + Duration::from_secs(2)),
        )?;
        Ok(Attachment {
            index,
            device: self.roots.dev_path(index),
            export,
            block_size,
            connections: request.connections,
            backend: request.backend.clone(),
        })
    }

    fn detach(&self, index: u32, options: &DetachOptions) -> Result<Detached, NbdError> {
        let st = self.device_status(index)?;
        if !st.attached {
            return Ok(Detached::AlreadyFree);
        }
        let busy = !st.mounts.is_empty() || !st.holders.is_empty();
        if busy && options.mode == DetachMode::Safe {
            return Err(NbdError::InUse {
                index,
                mounts: st.mounts,
                holders: st.holders,
            });
        }
        let (mut s, family) = self.socket("DISCONNECT", Some(index))?;
        let mut a = Attrs::default();
        a.u32(nbd::ATTR_INDEX, index);
        match s.request(family, nbd::CMD_DISCONNECT, nbd::VERSION, &a) {
            Ok(_) => {}
            // Torn down between our look and the request: fine if it is free now.
            Err(e) if e.errno() == Some(EINVAL) => {}
            Err(source) => {
                return Err(NbdError::Netlink {
                    op: "DISCONNECT",
                    index: Some(index),
                    source,
                })
            }
        }
        if busy {
            // Forced: DISCONNECT returned after the kernel shut the sockets down;
            // the configuration lives until the mount lets go of the device.
            return Ok(Detached::ShutDownHeldOpen { mounts: st.mounts });
        }
        let start = Instant::now();
        let deadline = start + options.timeout;
        loop {
            let now = self.roots.state(index).map_err(|source| NbdError::Sysfs {
                path: self.roots.block_dir(index),
                source,
            })?;
            if now.pid.is_none() && now.size_bytes == 0 {
                return Ok(Detached::Free);
            }
            if Instant::now() >= deadline {
                return Err(NbdError::DetachTimeout {
                    index,
                    waited: start.elapsed(),
                    pid: now.pid,
                    size_bytes: now.size_bytes,
                });
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn status(&self, index: u32) -> Result<DeviceStatus, NbdError> {
        self.device_status(index)
    }

    fn list(&self) -> Result<Vec<DeviceStatus>, NbdError> {
        let indices = match self.kernel_status(None) {
            Ok(devices) => devices.into_iter().map(|(i, _)| i).collect(),
            // STATUS needs CAP_NET_ADMIN; sysfs is world-readable (an operator's status).
            Err(NbdError::Netlink { source, .. }) if source.errno() == Some(EPERM) => {
                self.roots.indices().map_err(|source| NbdError::Sysfs {
                    path: self.roots.sys.join("block"),
                    source,
                })?
            }
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for index in indices {
            match self.device_status(index) {
                Ok(d) => out.push(d),
                Err(NbdError::NoSuchDevice { .. }) => {} // removed meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// `/dev/nbdN` for an index on the real system.
pub fn device_path(index: u32) -> PathBuf {
    Roots::default().dev_path(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::{BackendId, Generation, NbdAddress};

    fn export(min: Option<u32>) -> Export {
        Export {
            size: 1 << 20,
            transmission_flags: 1,
            block_sizes: min.map(|m| handshake::BlockSizes {
                minimum: m,
                preferred: 4096,
                maximum: 1 << 25,
            }),
            handshake_flags: 3,
            method: handshake::Method::Go,
        }
    }

    #[test]
    fn block_size_choice() {
        let mut r = AttachRequest::new(
            NbdAddress::Tcp("127.0.0.1:1".into()),
            "x",
            BackendId::new("v", Generation(1)).unwrap(),
        );
        assert_eq!(choose_block_size(&r, &export(None)).unwrap(), 512);
        assert_eq!(choose_block_size(&r, &export(Some(1))).unwrap(), 512);
        assert_eq!(choose_block_size(&r, &export(Some(4096))).unwrap(), 4096);
        assert!(choose_block_size(&r, &export(Some(8192))).is_err());
        r.block_size = Some(1000);
        assert!(choose_block_size(&r, &export(None)).is_err());
        r.block_size = Some(4096);
        assert_eq!(choose_block_size(&r, &export(Some(512))).unwrap(), 4096);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
    }
}
