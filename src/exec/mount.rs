//! Mounting a volume (mount(2), verified in mountinfo) and unmounting it after stopping every process that holds it.
//!
//! **Mount.** The mount point is created if missing; fstab-style options are
//! split into mount(2) flags and the filesystem's data string
//! ([`MountOptions::parse`]); after the call, `/proc/self/mountinfo` must show
//! the device (by device number) at the mount point. Mounting what is already
//! mounted there is a success (idempotent); something else mounted there is
//! an error, never a mount on top.
//!
//! **Unmount** — like Pacemaker's Filesystem agent with `force_unmount=safe`:
//! try `umount`; while it is busy, walk `/proc` for processes holding the
//! filesystem (cwd, root, executable, open files, memory mappings — see
//! [`super::procfs`]), send them SIGTERM, give them `term_grace`, SIGKILL the
//! ones still holding it, and try again, up to `attempts` times. Mounts below
//! the mount point go first. Only when the request is `force` does a mount
//! that stays busy get a lazy unmount (`MNT_DETACH`) — logged as the last
//! resort it is: the filesystem lives on until its last user lets go, so the
//! device below cannot be detached cleanly. The report names every process
//! signalled. The daemon's own pid is never signalled.
//!
//! Both calls block (syscalls, grace periods): run them with `spawn_blocking`.

use std::collections::BTreeSet;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::Signal;

use super::mountinfo::{self, MountEntry};
use super::procfs::{self, Holder};

/// mount(2) flags and the filesystem-specific data string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    /// Generic flags (`MS_RDONLY`, `MS_NOATIME`, …).
    pub flags: MsFlags,
    /// Options the filesystem interprets (`errors=remount-ro`, `discard`, `nouuid`, …).
    pub data: Vec<String>,
    /// Options only mount(8) and fstab tools interpret (`defaults`, `nofail`, `x-*`, …): ignored.
    pub ignored: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            data: Vec::new(),
            ignored: Vec::new(),
        }
    }
}

impl MountOptions {
    /// Parses fstab-style options; each item may itself be comma-separated.
    ///
    /// Options that would change what kind of mount this is (`bind`, `move`,
    /// `remount`, `loop`, propagation flags) are refused.
    pub fn parse<S: AsRef<str>>(options: &[S]) -> Result<MountOptions, MountError> {
        let mut o = MountOptions::default();
        for item in options {
            for opt in item
                .as_ref()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                o.apply(opt)?;
            }
        }
        Ok(o)
    }

    fn apply(&mut self, opt: &str) -> Result<(), MountError> {
        let set = |o: &mut Self, f: MsFlags| o.flags.insert(f);
        let clear = |o: &mut Self, f: MsFlags| o.flags.remove(f);
        match opt {
            "ro" => set(self, MsFlags::MS_RDONLY),
            "rw" => clear(self, MsFlags::MS_RDONLY),
            "nosuid" => set(self, MsFlags::MS_NOSUID),
            "suid" => clear(self, MsFlags::MS_NOSUID),
            "nodev" => set(self, MsFlags::MS_NODEV),
            "dev" => clear(self, MsFlags::MS_NODEV),
            "noexec" => set(self, MsFlags::MS_NOEXEC),
            "exec" => clear(self, MsFlags::MS_NOEXEC),
            "sync" => set(self, MsFlags::MS_SYNCHRONOUS),
            "async" => clear(self, MsFlags::MS_SYNCHRONOUS),
            "dirsync" => set(self, MsFlags::MS_DIRSYNC),
            "noatime" => set(self, MsFlags::MS_NOATIME),
            "atime" => clear(self, MsFlags::MS_NOATIME),
            "nodiratime" => set(self, MsFlags::MS_NODIRATIME),
            "diratime" => clear(self, MsFlags::MS_NODIRATIME),
            "relatime" => {
                clear(self, MsFlags::MS_NOATIME | MsFlags::MS_STRICTATIME);
                set(self, MsFlags::MS_RELATIME);
            }
            "norelatime" => clear(self, MsFlags::MS_RELATIME),
            "strictatime" => {
                clear(self, MsFlags::MS_NOATIME | MsFlags::MS_RELATIME);
                set(self, MsFlags::MS_STRICTATIME);
            }
            "nostrictatime" => clear(self, MsFlags::MS_STRICTATIME),
            "lazytime" => set(self, MsFlags::MS_LAZYTIME),
            "nolazytime" => clear(self, MsFlags::MS_LAZYTIME),
            "silent" => set(self, MsFlags::MS_SILENT),
            "loud" => clear(self, MsFlags::MS_SILENT),
            "mand" => set(self, MsFlags::MS_MANDLOCK),
            "nomand" => clear(self, MsFlags::MS_MANDLOCK),
            "iversion" => set(self, MsFlags::MS_I_VERSION),
            "noiversion" => clear(self, MsFlags::MS_I_VERSION),
            "defaults" => {
                clear(
                    self,
                    MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC
                        | MsFlags::MS_SYNCHRONOUS,
                );
                self.ignored.push(opt.to_string());
            }
            "auto" | "noauto" | "user" | "nouser" | "users" | "owner" | "group" | "nofail"
            | "_netdev" => self.ignored.push(opt.to_string()),
            o if o.starts_with("x-") || o.starts_with("comment=") => {
                self.ignored.push(o.to_string())
            }
            "bind" | "rbind" | "move" | "remount" | "loop" | "shared" | "rshared" | "slave"
            | "rslave" | "private" | "rprivate" | "unbindable" | "runbindable" => {
                return Err(MountError::Options(format!(
                    "mount option {opt:?} changes what kind of mount this is; it is not allowed here"
                )))
            }
            o if o.starts_with("loop=") || o.starts_with("make-") || o.starts_with("X-mount.") => {
                return Err(MountError::Options(format!(
                    "mount option {o:?} is interpreted by mount(8) and not supported here"
                )))
            }
            o => self.data.push(o.to_string()),
        }
        Ok(())
    }

    /// The data string for mount(2): the filesystem options joined with commas.
    pub fn data_string(&self) -> String {
        self.data.join(",")
    }
}

/// One mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRequest {
    /// The block device.
    pub device: PathBuf,
    /// Where to mount it (created if missing).
    pub mount_point: PathBuf,
    /// `ext4`, `xfs`, …
    pub fstype: String,
    /// Flags and data.
    pub options: MountOptions,
}

impl MountRequest {
    /// Mounting a configured volume's device at its `mount_path` with its
    /// `mount_options`. A `dir` volume has no filesystem to mount: use
    /// [`super::DirMounter`] for it (this returns an options error).
    pub fn for_volume(
        volume: &crate::config::VolumeConfig,
        device: impl Into<PathBuf>,
    ) -> Result<Self, MountError> {
        let fs = volume.filesystem.ok_or_else(|| {
            MountError::Options(format!(
                "volume {} has no filesystem to mount (a dir volume)",
                volume.name
            ))
        })?;
        MountRequest::new(
            device,
            &volume.mount_path,
            fs.as_str(),
            &volume.mount_options,
        )
    }

    /// A request with options parsed from the config's `mount_options`.
    pub fn new<S: AsRef<str>>(
        device: impl Into<PathBuf>,
        mount_point: impl Into<PathBuf>,
        fstype: impl Into<String>,
        options: &[S],
    ) -> Result<Self, MountError> {
        Ok(MountRequest {
            device: device.into(),
            mount_point: mount_point.into(),
            fstype: fstype.into(),
            options: MountOptions::parse(options)?,
        })
    }
}

/// A mount in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounted {
    /// The mount point (canonical).
    pub mount_point: PathBuf,
    /// The mountinfo entry that proves it.
    pub entry: MountEntry,
    /// It was already mounted like this (nothing was done).
    pub already_mounted: bool,
    /// The mount point directory was created.
    pub created_mount_point: bool,
}

/// When the unmount may signal processes holding the filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillHolders {
    /// Never: a busy unmount fails (or, forced, goes lazy).
    Never,
    /// Only on a forced unmount.
    WhenForced,
    /// On every unmount (Pacemaker's `force_unmount=safe`): the default, since
    /// an unmount is part of a fence and anything left holding the volume
    /// would keep the device from being detached.
    Always,
}

/// One unmount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmountRequest {
    /// The mount point.
    pub mount_point: PathBuf,
    /// Allow a lazy unmount (`MNT_DETACH`) as the last resort.
    pub force: bool,
    /// When holders are signalled.
    pub kill_holders: KillHolders,
    /// SIGTERM → SIGKILL of holders.
    pub term_grace: Duration,
    /// How long to wait for SIGKILLed holders to let go.
    pub kill_wait: Duration,
    /// umount attempts before giving up (or going lazy).
    pub attempts: u32,
    /// Pause between attempts when no holder was found to signal.
    pub retry_interval: Duration,
}

impl UnmountRequest {
    /// Defaults: kill holders always, 1 s TERM grace, 0.5 s after KILL, 3 attempts 100 ms apart.
    pub fn new(mount_point: impl Into<PathBuf>, force: bool) -> Self {
        UnmountRequest {
            mount_point: mount_point.into(),
            force,
            kill_holders: KillHolders::Always,
            term_grace: Duration::from_secs(1),
            kill_wait: Duration::from_millis(500),
            attempts: 3,
            retry_interval: Duration::from_millis(100),
        }
    }

    /// Timings scaled to fit a fencing `unmount_budget`: two attempts with one
    /// round of holder killing between them (TERM grace 40 %, KILL wait 20 %);
    /// the core retries a failed unmount itself.
    pub fn within_budget(mount_point: impl Into<PathBuf>, force: bool, budget: Duration) -> Self {
        UnmountRequest {
            term_grace: budget * 2 / 5,
            kill_wait: budget / 5,
            attempts: 2,
            retry_interval: (budget / 20).max(Duration::from_millis(10)),
            ..UnmountRequest::new(mount_point, force)
        }
    }
}

/// A process the unmount signalled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalledHolder {
    /// Pid.
    pub pid: i32,
    /// Command name.
    pub comm: String,
    /// `SIGTERM` or `SIGKILL`.
    pub signal: &'static str,
    /// What it held (`cwd`, `fd 3`, `mmap`, …).
    pub holds: Vec<String>,
}

/// What an unmount did.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UnmountReport {
    /// The mount point.
    pub mount_point: PathBuf,
    /// Something was mounted there.
    pub was_mounted: bool,
    /// Mount points unmounted (submounts first).
    pub unmounted: Vec<PathBuf>,
    /// Every signal sent to a holder, in order.
    pub signalled: Vec<SignalledHolder>,
    /// umount attempts made.
    pub attempts: u32,
    /// The last resort was used: a lazy unmount; the filesystem may still be alive.
    pub lazy: bool,
    /// Holders still there when the lazy unmount was done.
    pub left_holding: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
}

impl UnmountReport {
    /// Pids signalled (each once, in order).
    pub fn signalled_pids(&self) -> Vec<i32> {
        let mut seen = Vec::new();
        for s in &self.signalled {
            if !seen.contains(&s.pid) {
                seen.push(s.pid);
            }
        }
        seen
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        if !self.was_mounted {
            return format!("{} was not mounted", self.mount_point.display());
        }
        let mut s = format!(
            "unmounted {} after {} attempt(s) in {:?}",
            self.mount_point.display(),
            self.attempts,
            self.elapsed
        );
        if !self.signalled.is_empty() {
            let sig: Vec<String> = self
                .signalled
                .iter()
                .map(|h| format!("{} {} ({})", h.signal, h.pid, h.comm))
                .collect();
            s.push_str(&format!("; signalled holders: {}", sig.join(", ")));
        }
        if self.lazy {
            s.push_str(&format!(
                "; LAZY unmount (last resort): still held by {}",
                if self.left_holding.is_empty() {
                    "something not visible in /proc".to_string()
                } else {
                    self.left_holding.join(", ")
                }
            ));
        }
        s
    }
}

/// Why a mount or unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The device cannot be used.
    #[error("device {path}: {why}", path = path.display())]
    Device {
        /// The device path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The mount point could not be created or resolved.
    #[error("mount point {path}: {source}", path = path.display())]
    MountPoint {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The options cannot be used.
    #[error("{0}")]
    Options(String),
    /// Something else is mounted at the mount point.
    #[error("{path} already has {what} mounted on it; refusing to mount over it", path = path.display())]
    Occupied {
        /// The mount point.
        path: PathBuf,
        /// What is mounted there.
        what: String,
    },
    /// A syscall failed.
    #[error("{op} {path}: {source}", path = path.display(), source = source.desc())]
    Syscall {
        /// `mount`, `umount`, …
        op: &'static str,
        /// The path it was about.
        path: PathBuf,
        /// errno.
        source: Errno,
    },
    /// mount(2) succeeded but mountinfo does not show the device there.
    #[error("mounted {path} but /proc/self/mountinfo does not confirm it: {detail}", path = path.display())]
    NotVerified {
        /// The mount point.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// The unmount stayed busy.
    #[error(
        "{path} stayed busy after {attempts} unmount attempt(s){}{}",
        if holders.is_empty() { String::new() } else { format!("; still held by {}", holders.join(", ")) },
        if signalled.is_empty() { String::new() } else { format!("; signalled {}", signalled.iter().map(|h| format!("{} {}", h.signal, h.pid)).collect::<Vec<_>>().join(", ")) },
        path = path.display()
    )]
    Busy {
        /// The mount point.
        path: PathBuf,
        /// Attempts made.
        attempts: u32,
        /// Holders left (`pid (comm: what)`).
        holders: Vec<String>,
        /// Signals sent.
        signalled: Vec<SignalledHolder>,
    },
    /// Reading `/proc` failed.
    #[error("reading /proc: {0}")]
    Proc(std::io::Error),
    /// The `dir` backend refuses the path.
    #[error("{0}")]
    Refused(String),
    /// A failure injected by a fake.
    #[error("injected failure: {0}")]
    Injected(String),
}

/// Mounts and unmounts volumes. Blocking: call from `spawn_blocking`.
pub trait Mounter: Send + Sync {
    /// Mounts (idempotent) and verifies.
    fn mount(&self, request: &MountRequest) -> Result<Mounted, MountError>;
    /// Unmounts, stopping holders as the request allows.
    fn unmount(&self, request: &UnmountRequest) -> Result<UnmountReport, MountError>;
}

/// The real mounter: mount(2) / umount2(2) and the `/proc` holder walk.
#[derive(Clone, Debug, Default)]
pub struct SysMounter;

impl SysMounter {
    /// The real mounter.
    pub fn new() -> Self {
        SysMounter
    }
}

/// (major, minor) of a block device node.
pub fn block_device_number(device: &Path) -> Result<(u32, u32), MountError> {
    let md = std::fs::metadata(device).map_err(|e| MountError::Device {
        path: device.to_path_buf(),
        why: e.to_string(),
    })?;
    if !md.file_type().is_block_device() {
        return Err(MountError::Device {
            path: device.to_path_buf(),
            why: "not a block device".to_string(),
        });
    }
    Ok(procfs::dev_split(md.rdev()))
}

fn read_mounts() -> Result<Vec<MountEntry>, MountError> {
    mountinfo::read_mountinfo().map_err(MountError::Proc)
}

/// The canonical form of a mount point that may not exist yet.
fn canonical_mount_point(path: &Path) -> Result<PathBuf, MountError> {
    std::fs::canonicalize(path).map_err(|source| MountError::MountPoint {
        path: path.to_path_buf(),
        source,
    })
}

impl Mounter for SysMounter {
    fn mount(&self, request: &MountRequest) -> Result<Mounted, MountError> {
        let dev = block_device_number(&request.device)?;
        let mut created = false;
        if !request.mount_point.exists() {
            std::fs::create_dir_all(&request.mount_point).map_err(|source| {
                MountError::MountPoint {
                    path: request.mount_point.clone(),
                    source,
                }
            })?;
            created = true;
        }
        let mp = canonical_mount_point(&request.mount_point)?;
        if !mp.is_dir() {
            return Err(MountError::MountPoint {
                path: mp,
                source: std::io::Error::other("not a directory"),
            });
        }
        let entries = read_mounts()?;
        if let Some(e) = mountinfo::mount_at(&entries, &mp) {
            if e.dev == dev {
                tracing::info!(
                    device = %request.device.display(),
                    mount_point = %mp.display(),
                    "already mounted"
                );
                return Ok(Mounted {
                    mount_point: mp,
                    entry: e.clone(),
                    already_mounted: true,
                    created_mount_point: created,
                });
            }
            return Err(MountError::Occupied {
                path: mp,
                what: format!("{} ({}, device {})", e.source, e.fstype, e.dev_string()),
            });
        }
        let data = request.options.data_string();
        nix::mount::mount(
            Some(&request.device),
            &mp,
            Some(request.fstype.as_str()),
            request.options.flags,
            if data.is_empty() {
                None
            } else {
                Some(data.as_str())
            },
        )
        .map_err(|source| MountError::Syscall {
            op: "mount",
            path: mp.clone(),
            source,
        })?;
        let entries = read_mounts()?;
        match mountinfo::mount_at(&entries, &mp) {
            Some(e) if e.dev == dev => {
                tracing::info!(
                    device = %request.device.display(),
                    mount_point = %mp.display(),
                    fstype = %e.fstype,
                    options = %e.mount_options,
                    "mounted"
                );
                Ok(Mounted {
                    mount_point: mp,
                    entry: e.clone(),
                    already_mounted: false,
                    created_mount_point: created,
                })
            }
            Some(e) => Err(MountError::NotVerified {
                path: mp,
                detail: format!(
                    "the top mount there is {} (device {}), not {} (device {}:{})",
                    e.source,
                    e.dev_string(),
                    request.device.display(),
                    dev.0,
                    dev.1
                ),
            }),
            None => Err(MountError::NotVerified {
                path: mp,
                detail: "no mount at that path".to_string(),
            }),
        }
    }

    fn unmount(&self, request: &UnmountRequest) -> Result<UnmountReport, MountError> {
        let started = Instant::now();
        let mut report = UnmountReport {
            mount_point: request.mount_point.clone(),
            ..UnmountReport::default()
        };
        let mp = match std::fs::canonicalize(&request.mount_point) {
            Ok(p) => p,
            Err(_) => {
                // A missing mount point cannot have anything mounted on it.
                report.elapsed = started.elapsed();
                return Ok(report);
            }
        };
        let entries = read_mounts()?;
        let Some(top) = mountinfo::mount_at(&entries, &mp) else {
            report.elapsed = started.elapsed();
            return Ok(report);
        };
        report.was_mounted = true;
        let targets = subtree(&entries, top);
        let devs: BTreeSet<(u32, u32)> = targets.iter().map(|e| e.dev).collect();
        let kill = match request.kill_holders {
            KillHolders::Always => true,
            KillHolders::WhenForced => request.force,
            KillHolders::Never => false,
        };
        let attempts = request.attempts.max(1);
        for attempt in 1..=attempts {
            report.attempts = attempt;
            let busy = try_unmount(&targets, &mut report)?;
            if busy.is_empty() {
                report.elapsed = started.elapsed();
                tracing::info!("{}", report.summary());
                return Ok(report);
            }
            if attempt == attempts {
                break;
            }
            let mut signalled_any = false;
            if kill {
                signalled_any = stop_holders(&devs, request, &mut report)?;
            }
            if !signalled_any {
                std::thread::sleep(request.retry_interval);
            }
        }
        let left: Vec<String> = procfs::holders(&devs)
            .map_err(MountError::Proc)?
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut left = left;
        if let Some(me) = procfs::self_holds(&devs) {
            left.push(format!("{me} [this daemon itself]"));
        }
        if request.force {
            nix::mount::umount2(&mp, MntFlags::MNT_DETACH).map_err(|source| {
                MountError::Syscall {
                    op: "umount -l",
                    path: mp.clone(),
                    source,
                }
            })?;
            report.lazy = true;
            report.left_holding = left;
            report.unmounted.push(mp.clone());
            report.elapsed = started.elapsed();
            tracing::warn!(
                "last resort for a busy filesystem: {}; the device stays in use until its users let go",
                report.summary()
            );
            return Ok(report);
        }
        report.elapsed = started.elapsed();
        Err(MountError::Busy {
            path: mp,
            attempts: report.attempts,
            holders: left,
            signalled: report.signalled,
        })
    }
}

/// `top` and every mount below it (by parent id), deepest first.
fn subtree(entries: &[MountEntry], top: &MountEntry) -> Vec<MountEntry> {
    let mut out: Vec<(usize, MountEntry)> = vec![(0, top.clone())];
    let mut i = 0;
    while i < out.len() {
        let (depth, id) = (out[i].0, out[i].1.mount_id);
        for e in entries {
            if e.parent_id == id
                && e.mount_id != id
                && !out.iter().any(|(_, o)| o.mount_id == e.mount_id)
            {
                out.push((depth + 1, e.clone()));
            }
        }
        i += 1;
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out.into_iter().map(|(_, e)| e).collect()
}

/// Tries to unmount each target (deepest first); returns those still busy.
fn try_unmount(
    targets: &[MountEntry],
    report: &mut UnmountReport,
) -> Result<Vec<PathBuf>, MountError> {
    let mut busy = Vec::new();
    let current = read_mounts()?;
    for t in targets {
        if !current.iter().any(|e| e.mount_id == t.mount_id) {
            continue;
        }
        match nix::mount::umount2(&t.mount_point, MntFlags::empty()) {
            Ok(()) => report.unmounted.push(t.mount_point.clone()),
            Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(Errno::EBUSY) => busy.push(t.mount_point.clone()),
            Err(source) => {
                return Err(MountError::Syscall {
                    op: "umount",
                    path: t.mount_point.clone(),
                    source,
                })
            }
        }
    }
    Ok(busy)
}

/// SIGTERM every holder, wait `term_grace`, SIGKILL those still holding, wait
/// `kill_wait`. Returns whether any process was signalled.
fn stop_holders(
    devs: &BTreeSet<(u32, u32)>,
    request: &UnmountRequest,
    report: &mut UnmountReport,
) -> Result<bool, MountError> {
    let holders = procfs::holders(devs).map_err(MountError::Proc)?;
    let holders: Vec<Holder> = holders.into_iter().filter(|h| h.pid > 1).collect();
    if holders.is_empty() {
        return Ok(false);
    }
    signal_all(&holders, Signal::SIGTERM, "SIGTERM", report);
    let still = wait_released(&holders, devs, request.term_grace);
    if still.is_empty() {
        return Ok(true);
    }
    signal_all(&still, Signal::SIGKILL, "SIGKILL", report);
    let _ = wait_released(&still, devs, request.kill_wait);
    Ok(true)
}

fn signal_all(holders: &[Holder], sig: Signal, name: &'static str, report: &mut UnmountReport) {
    for h in holders {
        // The pid must still be the same process (start time) before it is signalled.
        if !procfs::process_alive(h.pid, Some(h.start_time)) {
            continue;
        }
        match super::spawn::signal_pid(h.pid, sig) {
            Ok(true) => {
                tracing::warn!(pid = h.pid, comm = %h.comm, holds = ?h.holds, "{name} to a process holding the filesystem");
                report.signalled.push(SignalledHolder {
                    pid: h.pid,
                    comm: h.comm.clone(),
                    signal: name,
                    holds: h.holds.iter().map(ToString::to_string).collect(),
                });
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(pid = h.pid, "cannot send {name}: {e}"),
        }
    }
}

/// Waits until none of `holders` holds `devs` any more (or is gone); returns those still holding.
fn wait_released(holders: &[Holder], devs: &BTreeSet<(u32, u32)>, wait: Duration) -> Vec<Holder> {
    let deadline = Instant::now() + wait;
    loop {
        let still: Vec<Holder> = holders
            .iter()
            .filter(|h| {
                procfs::process_alive(h.pid, Some(h.start_time))
                    && procfs::holder_of(h.pid, devs).is_some()
            })
            .cloned()
            .collect();
        if still.is_empty() || Instant::now() >= deadline {
            return still;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_data_and_ignored() {
        let o = MountOptions::parse(&[
            "noatime",
            "nodev,nosuid",
            "errors=remount-ro",
            "defaults",
            "x-systemd.requires=foo",
            "discard",
            "ro",
        ])
        .unwrap();
        assert!(o.flags.contains(MsFlags::MS_NOATIME));
        assert!(o.flags.contains(MsFlags::MS_RDONLY));
        // `defaults` came after nodev/nosuid and cleared them, as mount(8) does.
        assert!(!o.flags.contains(MsFlags::MS_NODEV));
        assert_eq!(o.data_string(), "errors=remount-ro,discard");
        assert_eq!(o.ignored, vec!["defaults", "x-systemd.requires=foo"]);
    }

    #[test]
    fn atime_options_exclude_each_other() {
        let o = MountOptions::parse(&["noatime", "relatime"]).unwrap();
        assert!(o.flags.contains(MsFlags::MS_RELATIME));
        assert!(!o.flags.contains(MsFlags::MS_NOATIME));
        let o = MountOptions::parse(&["rw"]).unwrap();
        assert!(o.flags.is_empty());
    }

    #[test]
    fn mount_kind_changing_options_are_refused() {
        for bad in [
            "bind",
            "remount",
            "loop",
            "loop=/dev/loop0",
            "private",
            "move",
        ] {
            assert!(MountOptions::parse(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn subtree_is_deepest_first() {
        let m = mountinfo::parse_mountinfo(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
             10 1 7:0 / /v rw - ext4 /dev/loop0 rw\n\
             11 10 0:40 / /v/a rw - tmpfs tmpfs rw\n\
             12 11 0:41 / /v/a/b rw - tmpfs tmpfs rw\n\
             13 1 0:42 / /other rw - tmpfs tmpfs rw\n",
        );
        let top = mountinfo::mount_at(&m, Path::new("/v")).unwrap();
        let ids: Vec<u32> = subtree(&m, top).iter().map(|e| e.mount_id).collect();
        assert_eq!(ids, vec![12, 11, 10]);
    }

    #[test]
    fn budget_scales_the_grace() {
        let r = UnmountRequest::within_budget("/v", false, Duration::from_secs(2));
        assert_eq!(r.term_grace, Duration::from_millis(800));
        assert_eq!(r.kill_wait, Duration::from_millis(400));
        assert_eq!(r.retry_interval, Duration::from_millis(100));
    }
}
