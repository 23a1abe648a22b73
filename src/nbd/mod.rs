//! The NBD block-device backend: handshake, kernel attach/detach over netlink, status and discovery.
//!
//! - [`handshake`]: the client handshake with an NBD server (fixed newstyle,
//!   `NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME` fallback), bounded by a timeout.
//! - [`transmission`]: a minimal read/disconnect client for checks and tests.
//! - [`netlink`]: generic netlink messages to the kernel NBD driver.
//! - [`sysfs`]: device state from `/sys/block/nbdN` and mount points.
//! - [`kernel`]: [`KernelNbd`], the real [`BlockDevices`] implementation.
//! - [`fake`]: [`FakeBlockDevices`], a recording fake with injected failures.
//!
//! Every attachment carries the backend identifier
//! `nbd-failover:<volume>:<generation>` ([`BackendId`]), which the kernel
//! shows in `/sys/block/nbdN/backend`; [`BlockDevices::discover`] finds our
//! attachments by it after a restart. An attachment belongs to the kernel,
//! not to the process that made it: see `docs/nbd.md` for what happens when
//! the daemon dies.

pub mod fake;
pub mod handshake;
pub mod kernel;
pub mod netlink;
pub mod proto;
pub mod sysfs;
pub mod transmission;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::core::Generation;
pub use fake::{FakeBlockDevices, FakeCall};
pub use handshake::{Export, HandshakeError, HandshakeOptions, Method, NbdAddress};
pub use kernel::KernelNbd;

/// The prefix of every backend identifier this project writes.
pub const BACKEND_PREFIX: &str = "nbd-failover";

/// Who an attachment belongs to: `nbd-failover:<volume>:<generation>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendId {
    /// The volume name.
    pub volume: String,
    /// The lease generation the attachment was made under.
    pub generation: Generation,
}

impl BackendId {
    /// A backend identifier; the volume name must be 1–200 bytes of printable
    /// ASCII without spaces (it ends up in sysfs, logs and a netlink string).
    pub fn new(volume: impl Into<String>, generation: Generation) -> Result<Self, NbdError> {
        let volume = volume.into();
        let ok = !volume.is_empty()
            && volume.len() <= 200
            && volume.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(NbdError::Invalid(format!(
                "volume name {volume:?} cannot go into a backend identifier: \
                 use 1-200 printable ASCII characters without spaces"
            )));
        }
        Ok(BackendId { volume, generation })
    }

    /// Parses `nbd-failover:<volume>:<generation>`; `None` for anyone else's identifier.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s
            .trim_end()
            .strip_prefix(BACKEND_PREFIX)?
            .strip_prefix(':')?;
        let (volume, generation) = rest.rsplit_once(':')?;
        let generation = generation.parse().ok()?;
        BackendId::new(volume, Generation(generation)).ok()
    }
}

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{BACKEND_PREFIX}:{}:{}", self.volume, self.generation.0)
    }
}

/// Which device to attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// Let the kernel pick an unused device under its own lock (race-free), or create one.
    #[default]
    Any,
    /// This index; retried while the kernel answers EBUSY (udev probing it), until the attach timeout.
    Index(u32),
}

/// Everything an attach needs.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// The NBD server.
    pub address: NbdAddress,
    /// The export name.
    pub export: String,
    /// The backend identifier written into the kernel.
    pub backend: BackendId,
    /// Number of connections (more than 1 needs `NBD_FLAG_CAN_MULTI_CONN`).
    pub connections: u32,
    /// Kernel request timeout (`NBD_ATTR_TIMEOUT`, whole seconds, at least 1).
    pub request_timeout: Duration,
    /// How long the kernel waits for a dead connection to be replaced before failing I/O.
    pub dead_conn_timeout: Duration,
    /// Bound on connecting and the handshake, per connection.
    pub handshake_timeout: Duration,
    /// Bound on the kernel part: EBUSY retries and waiting for the device to show up.
    pub attach_timeout: Duration,
    /// Device selection.
    pub device: DeviceChoice,
    /// Logical block size for the kernel (default: the server's minimum, at least 512).
    pub block_size: Option<u32>,
    /// Handshake method.
    pub method: Method,
}

impl AttachRequest {
    /// A request with defaults: 1 connection, 10 s request timeout, 5 s dead-connection
    /// timeout, 10 s handshake and attach timeouts, kernel-chosen device.
    pub fn new(address: NbdAddress, export: impl Into<String>, backend: BackendId) -> Self {
        AttachRequest {
            address,
            export: export.into(),
            backend,
            connections: 1,
            request_timeout: Duration::from_secs(10),
            dead_conn_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            attach_timeout: Duration::from_secs(10),
            device: DeviceChoice::Any,
            block_size: None,
            method: Method::Auto,
        }
    }
}

/// A device attached by us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The device index (`N` in `/dev/nbdN`).
    pub index: u32,
    /// `/dev/nbdN`.
    pub device: PathBuf,
    /// What the handshake negotiated (first connection).
    pub export: Export,
    /// The block size given to the kernel.
    pub block_size: u32,
    /// Connections handed to the kernel.
    pub connections: u32,
    /// The backend identifier written into the kernel.
    pub backend: BackendId,
}

/// How forcefully to detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachMode {
    /// Refuse while the device (or a partition) is mounted or has holders.
    Safe,
    /// Disconnect even then: the kernel shuts the sockets at once (no further
    /// I/O reaches the server, the mount gets I/O errors); the device is freed
    /// when its last opener closes it.
    Force,
}

/// Detach parameters.
#[derive(Debug, Clone, Copy)]
pub struct DetachOptions {
    /// Safe or forced.
    pub mode: DetachMode,
    /// How long to wait for the device to become free after DISCONNECT.
    pub timeout: Duration,
}

impl DetachOptions {
    /// Safe detach with a 10 s wait.
    pub fn safe() -> Self {
        DetachOptions {
            mode: DetachMode::Safe,
            timeout: Duration::from_secs(10),
        }
    }
    /// Forced detach with a 10 s wait.
    pub fn force() -> Self {
        DetachOptions {
            mode: DetachMode::Force,
            ..DetachOptions::safe()
        }
    }
}

/// How a detach ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detached {
    /// Disconnected and free: no pid, size 0.
    Free,
    /// There was nothing attached.
    AlreadyFree,
    /// Forced while mounted: the sockets are shut down (no I/O reaches the
    /// server); the device stays allocated until these mounts are gone.
    ShutDownHeldOpen {
        /// Where it is still mounted.
        mounts: Vec<PathBuf>,
    },
}

/// One device as the kernel and sysfs show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Index.
    pub index: u32,
    /// `/dev/nbdN`.
    pub device: PathBuf,
    /// Has a live connection configuration (`/sys/block/nbdN/pid` exists).
    pub attached: bool,
    /// The pid of the process that attached it.
    pub pid: Option<u32>,
    /// The raw backend identifier, if any.
    pub backend: Option<String>,
    /// Size in bytes (0 when free).
    pub size_bytes: u64,
    /// Read-only.
    pub read_only: bool,
    /// Mount points of the device or its partitions.
    pub mounts: Vec<PathBuf>,
    /// Holders (device-mapper and the like).
    pub holders: Vec<String>,
}

impl DeviceStatus {
    /// Our backend identifier, if the device is attached and carries one.
    pub fn ours(&self) -> Option<BackendId> {
        if !self.attached {
            return None;
        }
        BackendId::parse(self.backend.as_deref()?)
    }
}

/// One of our attachments found on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Index.
    pub index: u32,
    /// `/dev/nbdN`.
    pub device: PathBuf,
    /// Volume and generation.
    pub backend: BackendId,
    /// The attaching process's pid (kernel's record).
    pub pid: Option<u32>,
    /// Whether that pid still exists (a hint: pids are reused).
    pub attacher_alive: bool,
    /// Mount points.
    pub mounts: Vec<PathBuf>,
}

/// Why a block-device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Talking to the NBD server failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The kernel has no NBD driver loaded.
    #[error("the kernel NBD driver is not available: {0} (run: modprobe nbd)")]
    ModuleNotLoaded(netlink::NetlinkError),
    /// A netlink request failed.
    #[error("netlink {op}{}: {source}", index.map(|i| format!(" of nbd{i}")).unwrap_or_default())]
    Netlink {
        /// The command.
        op: &'static str,
        /// The device, if one was named.
        index: Option<u32>,
        /// The cause.
        source: netlink::NetlinkError,
    },
    /// The chosen device stayed busy (another attacher, or udev probing it).
    #[error("{} stayed busy for {waited:?} (in use by another attacher, or held open by udev)",
        index.map(|i| format!("nbd{i}")).unwrap_or_else(|| "every device".into()))]
    DeviceBusy {
        /// The device asked for (`None`: the kernel's choice).
        index: Option<u32>,
        /// How long attach retried.
        waited: Duration,
    },
    /// Safe detach refused: the device is in use.
    #[error("refusing to detach nbd{index}: mounted at {mounts:?}, holders {holders:?}; unmount first, or force")]
    InUse {
        /// The device.
        index: u32,
        /// Mount points.
        mounts: Vec<PathBuf>,
        /// Holders.
        holders: Vec<String>,
    },
    /// The device did not become free after DISCONNECT.
    #[error("nbd{index} not free {waited:?} after DISCONNECT (pid {pid:?}, size {size_bytes} bytes): is it still open?")]
    DetachTimeout {
        /// The device.
        index: u32,
        /// How long it waited.
        waited: Duration,
        /// The pid file's content, if it is still there.
        pid: Option<u32>,
        /// The size still reported.
        size_bytes: u64,
    },
    /// No such device.
    #[error("no device nbd{index}")]
    NoSuchDevice {
        /// The device.
        index: u32,
    },
    /// The kernel accepted CONNECT but the device did not come up as expected.
    #[error("attach of nbd{index} not confirmed: {detail}")]
    NotConfirmed {
        /// The device.
        index: u32,
        /// What was missing.
        detail: String,
    },
    /// The request cannot be carried out as given.
    #[error("invalid NBD request: {0}")]
    Invalid(String),
    /// Reading sysfs or mountinfo failed.
    #[error("reading {path}: {source}")]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An error injected by the fake.
    #[error("injected failure: {0}")]
    Injected(String),
}

/// The block-device operations the daemon needs: one real implementation
/// ([`KernelNbd`]) and a recording fake ([`FakeBlockDevices`]).
pub trait BlockDevices: Send + Sync {
    /// Connects to the server, negotiates, and attaches a kernel device labelled with the backend id.
    fn attach(&self, request: &AttachRequest) -> Result<Attachment, NbdError>;
    /// Disconnects a device and waits until it is free (or refuses, see [`DetachMode`]).
    fn detach(&self, index: u32, options: &DetachOptions) -> Result<Detached, NbdError>;
    /// One device's state.
    fn status(&self, index: u32) -> Result<DeviceStatus, NbdError>;
    /// Every NBD device the kernel has.
    fn list(&self) -> Result<Vec<DeviceStatus>, NbdError>;
    /// Attached devices carrying our backend identifier, for start-up recovery.
    fn discover(&self) -> Result<Vec<Discovered>, NbdError> {
        Ok(self
            .list()?
            .into_iter()
            .filter_map(|d| {
                let backend = d.ours()?;
                Some(Discovered {
                    index: d.index,
                    device: d.device,
                    backend,
                    pid: d.pid,
                    attacher_alive: d.pid.is_some_and(sysfs::pid_alive),
                    mounts: d.mounts,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_id_round_trips_and_rejects_others() {
        let id = BackendId::new("pg:main", Generation(4294967302)).unwrap();
        assert_eq!(id.to_string(), "nbd-failover:pg:main:4294967302");
        assert_eq!(BackendId::parse(&id.to_string()), Some(id.clone()));
        assert_eq!(
            BackendId::parse("nbd-failover:pg:main:4294967302\n"),
            Some(id)
        );
        for other in [
            "",
            "qemu-nbd",
            "nbd-failover:",
            "nbd-failover:vol",
            "nbd-failover::7",
            "nbd-failover:vol:x",
            "nbd-failoverx:vol:7",
        ] {
            assert_eq!(BackendId::parse(other), None, "{other:?}");
        }
        assert!(BackendId::new("has space", Generation(1)).is_err());
        assert!(BackendId::new("", Generation(1)).is_err());
    }
}
