//! The `image` backend: an image file attached through a loop device with the kernel's loop ioctls, labelled with volume and generation.
//!
//! **Attach.** `LOOP_CTL_GET_FREE` on `/dev/loop-control` names a free
//! device; `LOOP_CONFIGURE` (Linux ≥ 5.8; else `LOOP_SET_FD` +
//! `LOOP_SET_STATUS64`) binds the image to it with `LO_FLAGS_AUTOCLEAR` and
//! the label `nbd-failover:<volume>:<generation>` in `lo_file_name`. Another
//! process may take the same free device between the two calls; the bind then
//! fails with `EBUSY` and the attach asks for a free device again (race-safe
//! retry, bounded by the request's timeout). The label is read back with
//! `LOOP_GET_STATUS64` and the backing file checked in sysfs.
//!
//! **Tied to the process.** [`KernelLoop`] keeps the device open from attach
//! to detach. With autoclear, the kernel detaches a loop device when its last
//! opener closes it: if the daemon dies, an attached but unmounted image is
//! released at once, and a mounted one as soon as recovery (or anyone)
//! unmounts it. A kernel attachment cannot outlive both the daemon and the
//! mount silently.
//!
//! **Detach.** The label is checked (only our volume's devices are touched),
//! then `LOOP_CLR_FD` and our descriptor closed; the kernel clears the device
//! when the last opener is gone, so the call waits until sysfs shows it
//! unbound. A device still held (a lazily unmounted filesystem) times out with
//! the mounts and holders named.
//!
//! `lo_file_name` holds 63 bytes. A volume name longer than 29 bytes (so the
//! label fits any 64-bit generation) is shortened to its first 20 bytes, `~`
//! and 8 hex digits of its FNV-1a hash; `~` cannot occur in a volume name, so
//! [`label_generation`] still matches exactly.
//!
//! All calls block: use `spawn_blocking`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::core::Generation;

use super::mountinfo;

/// Prefix of every loop label this project writes.
pub const LABEL_PREFIX: &str = "nbd-failover";

// Kernel UAPI, include/uapi/linux/loop.h.
const LOOP_SET_FD: u64 = 0x4C00;
const LOOP_CLR_FD: u64 = 0x4C01;
const LOOP_SET_STATUS64: u64 = 0x4C04;
const LOOP_GET_STATUS64: u64 = 0x4C05;
const LOOP_SET_DIRECT_IO: u64 = 0x4C08;
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
/// `LO_FLAGS_READ_ONLY`.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR`.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// The loop block-device major number.
pub const LOOP_MAJOR: u32 = 7;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }

    fn file_name(&self) -> String {
        let end = self
            .lo_file_name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(LO_NAME_SIZE);
        String::from_utf8_lossy(&self.lo_file_name[..end]).into_owned()
    }
}

/// `ioctl(fd, request, arg)` with an integer argument.
fn ioctl_int(file: &File, request: u64, arg: u64) -> Result<i32, Errno> {
    // SAFETY: `file` is an open descriptor for the duration of the call; the
    // loop requests used with this helper (LOOP_CTL_GET_FREE, LOOP_SET_FD,
    // LOOP_CLR_FD, LOOP_SET_DIRECT_IO) take an integer argument, not a pointer,
    // so the kernel reads no memory of ours.
    let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), request as _, arg as nix::libc::c_ulong) };
    Errno::result(rc)
}

/// `ioctl(fd, request, &mut value)` for a request that reads or writes a `T`.
///
/// Callers pass the struct type the request is defined with (`LoopConfig` for
/// LOOP_CONFIGURE, `LoopInfo64` for LOOP_{GET,SET}_STATUS64).
fn ioctl_struct<T>(file: &File, request: u64, value: &mut T) -> Result<i32, Errno> {
    // SAFETY: `value` is an exclusive reference to a live, properly aligned
    // `#[repr(C)]` struct whose layout matches the kernel's for `request`
    // (sizes asserted at compile time above); the kernel reads or writes at
    // most `size_of::<T>()` bytes through it during the call and keeps no
    // reference afterwards. `file` stays open for the duration of the call.
    let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), request as _, value as *mut T) };
    Errno::result(rc)
}

fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Longest volume part that keeps a label within `lo_file_name` for any 64-bit generation.
const VOLUME_PART_MAX: usize = LO_NAME_SIZE - 1 - LABEL_PREFIX.len() - 2 - 20;

/// The volume as it appears in a loop label (shortened when long, see the module doc).
pub fn label_volume_part(volume: &str) -> String {
    if volume.len() <= VOLUME_PART_MAX {
        return volume.to_string();
    }
    let mut cut = 20;
    while !volume.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{:08x}", &volume[..cut], fnv1a32(volume))
}

/// `nbd-failover:<volume>:<generation>` (volume shortened if needed).
pub fn loop_label(volume: &str, generation: Generation) -> String {
    format!(
        "{LABEL_PREFIX}:{}:{}",
        label_volume_part(volume),
        generation.0
    )
}

/// The volume part and generation of one of our labels; `None` for anyone else's.
pub fn parse_loop_label(label: &str) -> Option<(String, Generation)> {
    let rest = label.strip_prefix(LABEL_PREFIX)?.strip_prefix(':')?;
    let (volume, generation) = rest.rsplit_once(':')?;
    if volume.is_empty() {
        return None;
    }
    Some((volume.to_string(), Generation(generation.parse().ok()?)))
}

/// The generation in `label` if it is one of ours for `volume`.
pub fn label_generation(label: &str, volume: &str) -> Option<Generation> {
    let (part, generation) = parse_loop_label(label)?;
    (part == label_volume_part(volume)).then_some(generation)
}

/// One attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopAttachRequest {
    /// The image file.
    pub image: PathBuf,
    /// The volume (goes into the label).
    pub volume: String,
    /// The lease generation (goes into the label).
    pub generation: Generation,
    /// Attach read-only.
    pub read_only: bool,
    /// Ask for direct I/O on the backing file (no double page cache); a
    /// kernel or filesystem that refuses it leaves buffered I/O, with a warning.
    pub direct_io: bool,
    /// Bound on finding and binding a free device.
    pub timeout: Duration,
}

impl LoopAttachRequest {
    /// The attach of a configured `image` volume under `generation`; `None` for other backends.
    pub fn for_volume(
        volume: &crate::config::VolumeConfig,
        generation: Generation,
    ) -> Option<Self> {
        match &volume.backend {
            crate::config::Backend::Image { path } => {
                Some(LoopAttachRequest::new(path, &volume.name, generation))
            }
            crate::config::Backend::Nbd(_) | crate::config::Backend::Dir { .. } => None,
        }
    }

    /// Read-write, buffered, 5 s timeout.
    pub fn new(
        image: impl Into<PathBuf>,
        volume: impl Into<String>,
        generation: Generation,
    ) -> Self {
        LoopAttachRequest {
            image: image.into(),
            volume: volume.into(),
            generation,
            read_only: false,
            direct_io: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A device attached by us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopAttachment {
    /// `N` in `/dev/loopN`.
    pub index: u32,
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The label written into the kernel.
    pub label: String,
    /// The image (canonical path).
    pub backing_file: PathBuf,
    /// Size of the image in bytes.
    pub size_bytes: u64,
}

/// One bound loop device, as the kernel shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopStatus {
    /// Index.
    pub index: u32,
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// Backing file from sysfs (may end in ` (deleted)`).
    pub backing_file: Option<PathBuf>,
    /// `lo_file_name` (our label, or whatever the attacher wrote).
    pub label: String,
    /// Autoclear is set.
    pub autoclear: bool,
    /// Read-only.
    pub read_only: bool,
}

impl LoopStatus {
    /// Volume part and generation, if the label is ours.
    pub fn ours(&self) -> Option<(String, Generation)> {
        parse_loop_label(&self.label)
    }
}

/// How a detach ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoopDetached {
    /// Detached and free.
    Free,
    /// Nothing was attached there.
    AlreadyFree,
}

/// Why a loop operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The image cannot be used.
    #[error("image {path}: {why}", path = path.display())]
    Image {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `/dev/loop-control` or a device node could not be opened.
    #[error("cannot open {path}: {source}", path = path.display())]
    Open {
        /// The node.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An ioctl failed.
    #[error("{op} on {path}: {}", source.desc(), path = path.display())]
    Ioctl {
        /// The request.
        op: &'static str,
        /// The device.
        path: PathBuf,
        /// errno.
        source: Errno,
    },
    /// No free device could be bound within the timeout (others kept taking them).
    #[error("no free loop device could be bound within {waited:?} ({tries} tries)")]
    NoFreeDevice {
        /// How long it tried.
        waited: Duration,
        /// How many devices it tried.
        tries: u32,
    },
    /// The label cannot be built.
    #[error("invalid loop label: {0}")]
    Label(String),
    /// The kernel does not show what we asked for.
    #[error("loop{index} not confirmed after attach: {detail}")]
    NotConfirmed {
        /// The device.
        index: u32,
        /// What was wrong.
        detail: String,
    },
    /// The device belongs to someone else: not detached.
    #[error("loop{index} carries label {label:?}, not one of volume {volume:?}: not touching it")]
    NotOurs {
        /// The device.
        index: u32,
        /// Its label.
        label: String,
        /// The volume we expected.
        volume: String,
    },
    /// The device was still bound after the wait.
    #[error(
        "loop{index} still attached {waited:?} after LOOP_CLR_FD (it clears when its last user closes it){}{}",
        if mounts.is_empty() { String::new() } else { format!("; mounted at {mounts:?}") },
        if holders.is_empty() { String::new() } else { format!("; holders {holders:?}") }
    )]
    DetachTimeout {
        /// The device.
        index: u32,
        /// How long it waited.
        waited: Duration,
        /// Where it is still mounted (in this mount namespace).
        mounts: Vec<PathBuf>,
        /// Block-layer holders (`/sys/block/loopN/holders`).
        holders: Vec<String>,
    },
    /// sysfs could not be read.
    #[error("reading {path}: {source}", path = path.display())]
    Sysfs {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A failure injected by a fake.
    #[error("injected failure: {0}")]
    Injected(String),
}

/// Loop devices for `image` volumes. Blocking: call from `spawn_blocking`.
pub trait LoopDevices: Send + Sync {
    /// Binds the image to a free device, labelled with volume and generation.
    fn attach(&self, request: &LoopAttachRequest) -> Result<LoopAttachment, LoopError>;
    /// Detaches device `index` if it carries a label of `volume`, and waits until it is free.
    fn detach(
        &self,
        index: u32,
        volume: &str,
        timeout: Duration,
    ) -> Result<LoopDetached, LoopError>;
    /// Every bound loop device.
    fn list(&self) -> Result<Vec<LoopStatus>, LoopError>;
}

/// The real loop devices (see the module doc). Dropping it closes the
/// descriptors it holds: devices not mounted then clear themselves (autoclear).
#[derive(Debug)]
pub struct KernelLoop {
    held: Mutex<BTreeMap<u32, File>>,
}

impl Default for KernelLoop {
    fn default() -> Self {
        KernelLoop::new()
    }
}

fn dev_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{index}"))
}

fn sys_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{index}"))
}

/// Whether `/sys/block/loopN` shows a bound device.
fn bound(index: u32) -> bool {
    sys_path(index).join("loop/backing_file").exists()
}

fn open_device(path: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(path)
}

/// Opens a device node that may take a moment to appear after the kernel created the device.
fn open_device_wait(path: &Path, write: bool, deadline: Instant) -> Result<File, LoopError> {
    loop {
        match open_device(path, write) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(LoopError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

fn get_status(file: &File, path: &Path) -> Result<LoopInfo64, LoopError> {
    let mut info = LoopInfo64::zeroed();
    ioctl_struct(file, LOOP_GET_STATUS64, &mut info).map_err(|source| LoopError::Ioctl {
        op: "LOOP_GET_STATUS64",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(info)
}

impl KernelLoop {
    /// A handle on the kernel's loop devices.
    pub fn new() -> Self {
        KernelLoop {
            held: Mutex::new(BTreeMap::new()),
        }
    }

    /// One device's state; `None` when it is not bound.
    pub fn status(&self, index: u32) -> Result<Option<LoopStatus>, LoopError> {
        if !bound(index) {
            return Ok(None);
        }
        let path = dev_path(index);
        let info = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            match held.get(&index) {
                Some(f) => get_status(f, &path),
                None => match open_device(&path, false) {
                    Ok(f) => get_status(&f, &path),
                    Err(source) => Err(LoopError::Open {
                        path: path.clone(),
                        source,
                    }),
                },
            }
        };
        let info = match info {
            Ok(i) => i,
            // Unbound between the sysfs check and the ioctl.
            Err(LoopError::Ioctl {
                source: Errno::ENXIO,
                ..
            }) => return Ok(None),
            Err(LoopError::Open { source, .. })
                if source.raw_os_error() == Some(nix::libc::ENXIO) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let sys = sys_path(index);
        let backing_file = std::fs::read_to_string(sys.join("loop/backing_file"))
            .ok()
            .map(|s| PathBuf::from(s.trim_end_matches('\n')));
        Ok(Some(LoopStatus {
            index,
            device: path,
            backing_file,
            label: info.file_name(),
            autoclear: info.lo_flags & LO_FLAGS_AUTOCLEAR != 0,
            read_only: info.lo_flags & LO_FLAGS_READ_ONLY != 0,
        }))
    }

    fn bind(&self, dev: &File, path: &Path, image: &File, info: &LoopInfo64) -> Result<(), Errno> {
        let mut cfg = LoopConfig {
            fd: image.as_raw_fd() as u32,
            block_size: 0,
            info: *info,
            reserved: [0; 8],
        };
        match ioctl_struct(dev, LOOP_CONFIGURE, &mut cfg) {
            Ok(_) => Ok(()),
            Err(Errno::EINVAL | Errno::ENOTTY) => {
                // Kernels before 5.8: bind, then set label and flags.
                ioctl_int(dev, LOOP_SET_FD, image.as_raw_fd() as u64)?;
                let mut i = *info;
                if let Err(e) = ioctl_struct(dev, LOOP_SET_STATUS64, &mut i) {
                    let _ = ioctl_int(dev, LOOP_CLR_FD, 0);
                    tracing::warn!(device = %path.display(), "LOOP_SET_STATUS64 failed: {e}");
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl LoopDevices for KernelLoop {
    fn attach(&self, request: &LoopAttachRequest) -> Result<LoopAttachment, LoopError> {
        let started = Instant::now();
        let deadline = started + request.timeout;
        if request.volume.is_empty() || !request.volume.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(LoopError::Label(format!(
                "volume name {:?} must be printable ASCII without spaces",
                request.volume
            )));
        }
        let label = loop_label(&request.volume, request.generation);
        if label.len() >= LO_NAME_SIZE {
            return Err(LoopError::Label(format!(
                "{label:?} is longer than 63 bytes"
            )));
        }
        let image_err = |why: String| LoopError::Image {
            path: request.image.clone(),
            why,
        };
        let image = OpenOptions::new()
            .read(true)
            .write(!request.read_only)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&request.image)
            .map_err(|e| image_err(e.to_string()))?;
        let md = image.metadata().map_err(|e| image_err(e.to_string()))?;
        if !md.is_file() {
            return Err(image_err("not a regular file".to_string()));
        }
        if md.len() == 0 {
            return Err(image_err("empty file".to_string()));
        }
        let backing_file =
            std::fs::canonicalize(&request.image).map_err(|e| image_err(e.to_string()))?;

        let mut info = LoopInfo64::zeroed();
        info.lo_flags = LO_FLAGS_AUTOCLEAR;
        if request.read_only {
            info.lo_flags |= LO_FLAGS_READ_ONLY;
        }
        info.lo_file_name[..label.len()].copy_from_slice(label.as_bytes());

        let ctl_path = Path::new("/dev/loop-control");
        let ctl = open_device(ctl_path, true).map_err(|source| LoopError::Open {
            path: ctl_path.to_path_buf(),
            source,
        })?;
        let mut tries = 0;
        let (index, path, dev) = loop {
            if tries > 0 && Instant::now() >= deadline {
                return Err(LoopError::NoFreeDevice {
                    waited: started.elapsed(),
                    tries,
                });
            }
            tries += 1;
            let index =
                ioctl_int(&ctl, LOOP_CTL_GET_FREE, 0).map_err(|source| LoopError::Ioctl {
                    op: "LOOP_CTL_GET_FREE",
                    path: ctl_path.to_path_buf(),
                    source,
                })? as u32;
            let path = dev_path(index);
            let dev = match open_device_wait(&path, !request.read_only, deadline) {
                Ok(d) => d,
                // Taken and torn down by someone else in between: ask again.
                Err(LoopError::Open { source, .. })
                    if source.raw_os_error() == Some(nix::libc::ENXIO) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            match self.bind(&dev, &path, &image, &info) {
                Ok(()) => break (index, path, dev),
                Err(Errno::EBUSY) => {
                    tracing::debug!(device = %path.display(), "loop device taken by someone else; retrying");
                    continue;
                }
                Err(source) => {
                    return Err(LoopError::Ioctl {
                        op: "LOOP_CONFIGURE",
                        path,
                        source,
                    })
                }
            }
        };
        if request.direct_io {
            if let Err(e) = ioctl_int(&dev, LOOP_SET_DIRECT_IO, 1) {
                tracing::warn!(device = %path.display(), "direct I/O refused ({e}); using buffered I/O");
            }
        }
        // Read back what the kernel has.
        let got = get_status(&dev, &path)?;
        let confirm_err = |detail: String| LoopError::NotConfirmed { index, detail };
        let problem = if got.file_name() != label {
            Some(format!(
                "label is {:?}, expected {label:?}",
                got.file_name()
            ))
        } else if got.lo_flags & LO_FLAGS_AUTOCLEAR == 0 {
            Some("autoclear is not set".to_string())
        } else {
            match std::fs::read_to_string(sys_path(index).join("loop/backing_file")) {
                Ok(s) if Path::new(s.trim_end_matches('\n')) == backing_file => None,
                Ok(s) => Some(format!(
                    "backing file is {:?}, expected {}",
                    s.trim_end(),
                    backing_file.display()
                )),
                Err(e) => Some(format!("cannot read its backing file from sysfs: {e}")),
            }
        };
        if let Some(detail) = problem {
            let _ = ioctl_int(&dev, LOOP_CLR_FD, 0);
            return Err(confirm_err(detail));
        }
        tracing::info!(
            device = %path.display(),
            image = %backing_file.display(),
            label = %label,
            tries,
            "loop device attached"
        );
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(index, dev);
        Ok(LoopAttachment {
            index,
            device: path,
            label,
            backing_file,
            size_bytes: md.len(),
        })
    }

    fn detach(
        &self,
        index: u32,
        volume: &str,
        timeout: Duration,
    ) -> Result<LoopDetached, LoopError> {
        let started = Instant::now();
        let path = dev_path(index);
        let Some(status) = self.status(index)? else {
            self.held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&index);
            return Ok(LoopDetached::AlreadyFree);
        };
        if label_generation(&status.label, volume).is_none() {
            return Err(LoopError::NotOurs {
                index,
                label: status.label,
                volume: volume.to_string(),
            });
        }
        let held = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&index);
        let file = match held {
            Some(f) => f,
            None => match open_device(&path, false) {
                Ok(f) => f,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
                    return Ok(LoopDetached::AlreadyFree)
                }
                Err(source) => return Err(LoopError::Open { path, source }),
            },
        };
        match ioctl_int(&file, LOOP_CLR_FD, 0) {
            Ok(_) | Err(Errno::ENXIO) => {}
            Err(source) => {
                return Err(LoopError::Ioctl {
                    op: "LOOP_CLR_FD",
                    path,
                    source,
                })
            }
        }
        drop(file);
        let deadline = started + timeout;
        while bound(index) {
            if Instant::now() >= deadline {
                let mounts = mountinfo::read_mountinfo()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| e.dev == (LOOP_MAJOR, index))
                    .map(|e| e.mount_point)
                    .collect();
                let holders = std::fs::read_dir(sys_path(index).join("holders"))
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(LoopError::DetachTimeout {
                    index,
                    waited: started.elapsed(),
                    mounts,
                    holders,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::info!(device = %path.display(), label = %status.label, elapsed = ?started.elapsed(), "loop device detached");
        Ok(LoopDetached::Free)
    }

    fn list(&self) -> Result<Vec<LoopStatus>, LoopError> {
        let dir = Path::new("/sys/block");
        let entries = std::fs::read_dir(dir).map_err(|source| LoopError::Sysfs {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut indices: Vec<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("loop")?.parse().ok())
            .collect();
        indices.sort_unstable();
        let mut out = Vec::new();
        for i in indices {
            if let Some(s) = self.status(i)? {
                out.push(s);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_fit() {
        let l = loop_label("pg-main", Generation(4294967302));
        assert_eq!(l, "nbd-failover:pg-main:4294967302");
        assert_eq!(
            label_generation(&l, "pg-main"),
            Some(Generation(4294967302))
        );
        assert_eq!(label_generation(&l, "pg"), None);
        assert_eq!(label_generation("/var/lib/img.raw", "pg"), None);
        assert_eq!(label_generation("nbd-failover::7", ""), None);
        // The longest volume name the config allows, with the largest generation.
        let long = "a".repeat(63);
        let l = loop_label(&long, Generation(u64::MAX));
        assert!(l.len() < LO_NAME_SIZE, "{} bytes: {l}", l.len());
        assert_eq!(label_generation(&l, &long), Some(Generation(u64::MAX)));
        let other = format!("{}b", "a".repeat(62));
        assert_eq!(label_generation(&l, &other), None);
        // A name of exactly the limit is kept whole.
        let edge = "v".repeat(VOLUME_PART_MAX);
        assert_eq!(label_volume_part(&edge), edge);
        assert!(loop_label(&edge, Generation(u64::MAX)).len() < LO_NAME_SIZE);
    }
}
