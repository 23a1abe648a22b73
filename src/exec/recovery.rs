//! Start-up recovery: find what earlier runs of the daemon left for a volume (devices, mounts, task groups) and report it as the core's `Leftovers`.
//!
//! Run before the volume contends. It looks for:
//! - **devices** carrying our label for the volume, through [`DeviceScanner`]s:
//!   [`LoopScanner`] for `image` volumes (the `lo_file_name` label, with the
//!   generation), and a hook for the NBD module's discovery by backend
//!   identifier ([`FnScanner`]). A loop device backed by the volume's image
//!   but labelled by someone else is reported as a warning, never touched;
//! - **mounts** at (or below) the volume's mount path, and mounts of a found
//!   device anywhere else (e.g. an XFS log-replay scratch mount interrupted by
//!   a crash) — `dir` volumes own no mount and skip this;
//! - the **task**, through [`TaskRunner::find_leftover`]: the pid file, with
//!   the leader's start time compared against `/proc/<pid>/stat` so a reused
//!   pid is not mistaken for the task, and leaderless members of its process
//!   group still counted; or an active systemd unit.
//!
//! The report converts to [`Leftovers`] for `Event::Start`; the core then
//! fences them (TERM the task, unmount, detach). To act on them the executors
//! must know what was found: adopt the task with [`TaskRunner::adopt`], detach
//! every device in [`RecoveryReport::devices`] that is ours, and unmount
//! [`RecoveryReport::stray_mounts`] as well as the volume path.
//!
//! Blocking (reads `/proc`, `/sys`, may run `systemctl`): use `spawn_blocking`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Backend, VolumeConfig};
use crate::core::{Generation, Leftovers};

use super::loopdev::{label_generation, LoopDevices};
use super::mountinfo::{self, MountEntry};
use super::procfs;
use super::task::{TaskError, TaskLeftover, TaskRunner};

/// What to look for, for one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoverySpec {
    /// The volume.
    pub volume: String,
    /// Its mount path.
    pub mount_point: PathBuf,
    /// The mount at `mount_point` is ours to fence (false for `dir` volumes).
    pub owns_mount: bool,
    /// The image file of an `image` volume.
    pub image: Option<PathBuf>,
}

impl RecoverySpec {
    /// The spec of a configured volume.
    pub fn for_volume(v: &VolumeConfig) -> Self {
        RecoverySpec {
            volume: v.name.clone(),
            mount_point: v.mount_path.clone(),
            owns_mount: !matches!(v.backend, Backend::Dir { .. }),
            image: match &v.backend {
                Backend::Image { path } => Some(path.clone()),
                Backend::Nbd(_) | Backend::Dir { .. } => None,
            },
        }
    }
}

/// A device found attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundDevice {
    /// `loop` or `nbd`.
    pub kind: &'static str,
    /// Its index.
    pub index: u32,
    /// Its node.
    pub device: PathBuf,
    /// Ours for this volume (our label); else only a warning.
    pub ours: bool,
    /// The generation from our label.
    pub generation: Option<Generation>,
    /// The raw label and backing file, for logs.
    pub detail: String,
}

/// Finds attached devices of a volume.
pub trait DeviceScanner: Send + Sync {
    /// Devices attached for `spec` (ours, and foreign ones on our storage).
    fn scan(&self, spec: &RecoverySpec) -> Result<Vec<FoundDevice>, RecoveryError>;
}

/// Loop devices labelled for the volume, or backed by its image.
pub struct LoopScanner {
    loops: Arc<dyn LoopDevices>,
}

impl LoopScanner {
    /// Scans through `loops`.
    pub fn new(loops: Arc<dyn LoopDevices>) -> Self {
        LoopScanner { loops }
    }
}

impl DeviceScanner for LoopScanner {
    fn scan(&self, spec: &RecoverySpec) -> Result<Vec<FoundDevice>, RecoveryError> {
        let image = spec
            .image
            .as_ref()
            .and_then(|p| std::fs::canonicalize(p).ok());
        let mut out = Vec::new();
        let list = self
            .loops
            .list()
            .map_err(|e| RecoveryError::Devices(format!("listing loop devices: {e}")))?;
        for s in list {
            let generation = label_generation(&s.label, &spec.volume);
            let backed_by_image = match (&image, &s.backing_file) {
                (Some(i), Some(b)) => b == i,
                _ => false,
            };
            if generation.is_none() && !backed_by_image {
                continue;
            }
            out.push(FoundDevice {
                kind: "loop",
                index: s.index,
                device: s.device.clone(),
                ours: generation.is_some(),
                generation,
                detail: format!(
                    "label {:?}, backing file {}",
                    s.label,
                    s.backing_file
                        .as_ref()
                        .map_or("?".to_string(), |b| b.display().to_string())
                ),
            });
        }
        Ok(out)
    }
}

/// NBD devices carrying our backend identifier for the volume, through the
/// NBD module's discovery ([`crate::nbd::BlockDevices::discover`]). A kernel
/// without the NBD driver has no NBD devices: that is an empty result, not an error.
pub struct NbdScanner {
    nbd: Arc<dyn crate::nbd::BlockDevices>,
}

impl NbdScanner {
    /// Scans through `nbd`.
    pub fn new(nbd: Arc<dyn crate::nbd::BlockDevices>) -> Self {
        NbdScanner { nbd }
    }
}

impl DeviceScanner for NbdScanner {
    fn scan(&self, spec: &RecoverySpec) -> Result<Vec<FoundDevice>, RecoveryError> {
        let found = match self.nbd.discover() {
            Ok(f) => f,
            Err(crate::nbd::NbdError::ModuleNotLoaded(_)) => return Ok(Vec::new()),
            Err(e) => {
                return Err(RecoveryError::Devices(format!(
                    "discovering NBD devices: {e}"
                )))
            }
        };
        Ok(found
            .into_iter()
            .filter(|d| d.backend.volume == spec.volume)
            .map(|d| FoundDevice {
                kind: "nbd",
                index: d.index,
                device: d.device,
                ours: true,
                generation: Some(d.backend.generation),
                detail: format!(
                    "backend {}, attached by pid {}",
                    d.backend,
                    d.pid.map_or("?".to_string(), |p| format!(
                        "{p}{}",
                        if d.attacher_alive {
                            " (alive)"
                        } else {
                            " (gone)"
                        }
                    ))
                ),
            })
            .collect())
    }
}

/// A [`DeviceScanner`] from a closure: a hook for any other discovery.
pub struct FnScanner<F>(pub F);

impl<F> DeviceScanner for FnScanner<F>
where
    F: Fn(&RecoverySpec) -> Result<Vec<FoundDevice>, RecoveryError> + Send + Sync,
{
    fn scan(&self, spec: &RecoverySpec) -> Result<Vec<FoundDevice>, RecoveryError> {
        (self.0)(spec)
    }
}

/// What an earlier run left for one volume.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    /// The volume.
    pub volume: String,
    /// Devices found (ours, and foreign ones on our storage).
    pub devices: Vec<FoundDevice>,
    /// Mounts at or below the volume's mount path (topmost last).
    pub mounts: Vec<MountEntry>,
    /// Mounts of our devices elsewhere.
    pub stray_mounts: Vec<MountEntry>,
    /// The task left running.
    pub task: Option<TaskLeftover>,
    /// Things worth an operator's attention that we do not touch.
    pub warnings: Vec<String>,
}

impl RecoveryReport {
    /// The core's view: the newest generation of our devices, mounted, task running.
    pub fn leftovers(&self) -> Leftovers {
        let ours: Vec<Option<Generation>> = self
            .devices
            .iter()
            .filter(|d| d.ours)
            .map(|d| d.generation)
            .collect();
        Leftovers {
            attached: if ours.is_empty() {
                None
            } else {
                Some(ours.into_iter().flatten().max())
            },
            mounted: !self.mounts.is_empty() || !self.stray_mounts.is_empty(),
            task_running: self.task.is_some(),
        }
    }

    /// Nothing of ours was found.
    pub fn is_empty(&self) -> bool {
        self.leftovers().is_empty()
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        if self.is_empty() && self.warnings.is_empty() {
            return format!("volume {}: nothing left by an earlier run", self.volume);
        }
        let mut parts = Vec::new();
        for d in self.devices.iter().filter(|d| d.ours) {
            parts.push(format!(
                "{} attached ({}{})",
                d.device.display(),
                d.detail,
                d.generation
                    .map_or(String::new(), |g| format!(", generation {g}"))
            ));
        }
        for m in self.mounts.iter().chain(&self.stray_mounts) {
            parts.push(format!(
                "{} mounted at {}",
                m.source,
                m.mount_point.display()
            ));
        }
        match &self.task {
            Some(TaskLeftover::Group {
                pgid,
                leader_alive,
                members,
                generation,
                ..
            }) => parts.push(format!(
                "task group {pgid} alive ({} member(s), leader {}{})",
                members.len(),
                if *leader_alive { "alive" } else { "gone" },
                generation.map_or(String::new(), |g| format!(", generation {g}"))
            )),
            Some(TaskLeftover::Unit { unit, state }) => parts.push(format!("unit {unit} {state}")),
            None => {}
        }
        for w in &self.warnings {
            parts.push(format!("WARNING: {w}"));
        }
        format!(
            "volume {}: left by an earlier run: {}",
            self.volume,
            parts.join("; ")
        )
    }
}

/// Why a scan failed: the volume's state is unknown, so it must not contend.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// A device scanner failed.
    #[error("{0}")]
    Devices(String),
    /// Reading `/proc/self/mountinfo` failed.
    #[error("reading /proc/self/mountinfo: {0}")]
    Mountinfo(std::io::Error),
    /// Looking for the task failed.
    #[error("looking for the task: {0}")]
    Task(#[from] TaskError),
    /// A failure injected by a fake.
    #[error("injected failure: {0}")]
    Injected(String),
}

/// The start-up scan.
pub trait LeftoverScan: Send + Sync {
    /// Scans for `spec`'s leftovers; `task` finds its task (none for a volume without one).
    fn scan(
        &self,
        spec: &RecoverySpec,
        task: Option<&dyn TaskRunner>,
    ) -> Result<RecoveryReport, RecoveryError>;
}

/// The real scan: device scanners, mountinfo, the task runner's pid file or unit.
#[derive(Default)]
pub struct HostRecovery {
    scanners: Vec<Box<dyn DeviceScanner>>,
}

impl HostRecovery {
    /// A scan with no device scanners yet.
    pub fn new() -> Self {
        HostRecovery::default()
    }

    /// Adds a device scanner (loop devices, the NBD module's hook).
    pub fn with_scanner(mut self, scanner: Box<dyn DeviceScanner>) -> Self {
        self.scanners.push(scanner);
        self
    }
}

impl LeftoverScan for HostRecovery {
    fn scan(
        &self,
        spec: &RecoverySpec,
        task: Option<&dyn TaskRunner>,
    ) -> Result<RecoveryReport, RecoveryError> {
        let mut report = RecoveryReport {
            volume: spec.volume.clone(),
            ..RecoveryReport::default()
        };
        for s in &self.scanners {
            for d in s.scan(spec)? {
                if !d.ours {
                    report.warnings.push(format!(
                        "{} is attached to this volume's storage but not labelled by us ({}); \
                         not touching it",
                        d.device.display(),
                        d.detail
                    ));
                }
                report.devices.push(d);
            }
        }
        let entries = mountinfo::read_mountinfo().map_err(RecoveryError::Mountinfo)?;
        if spec.owns_mount {
            let mp = std::fs::canonicalize(&spec.mount_point)
                .unwrap_or_else(|_| spec.mount_point.clone());
            report.mounts = mountinfo::mounts_under(&entries, &mp)
                .into_iter()
                .cloned()
                .collect();
        }
        for d in report.devices.iter().filter(|d| d.ours) {
            let Ok(md) = std::fs::metadata(&d.device) else {
                continue;
            };
            let dev = procfs::dev_split(md.rdev());
            for e in entries.iter().filter(|e| e.dev == dev) {
                if !report.mounts.iter().any(|m| m.mount_id == e.mount_id) {
                    report.stray_mounts.push(e.clone());
                }
            }
        }
        if let Some(t) = task {
            report.task = t.find_leftover()?;
        }
        if report.is_empty() && report.warnings.is_empty() {
            tracing::info!("{}", report.summary());
        } else {
            tracing::warn!("{}", report.summary());
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(ours: bool, generation: Option<u64>) -> FoundDevice {
        FoundDevice {
            kind: "loop",
            index: 3,
            device: PathBuf::from("/dev/loop3"),
            ours,
            generation: generation.map(Generation),
            detail: String::new(),
        }
    }

    #[test]
    fn nbd_discovery_is_filtered_by_volume() {
        use crate::nbd::{AttachRequest, BackendId, BlockDevices, FakeBlockDevices, NbdAddress};
        let fake = Arc::new(FakeBlockDevices::new());
        for (vol, generation) in [("pg", 8), ("other", 9)] {
            let id = BackendId::new(vol, Generation(generation)).unwrap();
            fake.attach(&AttachRequest::new(
                NbdAddress::Tcp("127.0.0.1:10809".to_string()),
                "export",
                id,
            ))
            .unwrap();
        }
        let spec = RecoverySpec {
            volume: "pg".to_string(),
            mount_point: PathBuf::from("/srv/pg"),
            owns_mount: true,
            image: None,
        };
        let found = NbdScanner::new(fake).scan(&spec).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, "nbd");
        assert_eq!(found[0].generation, Some(Generation(8)));
    }

    #[test]
    fn leftovers_take_the_newest_generation_of_our_devices_only() {
        let mut r = RecoveryReport {
            volume: "pg".to_string(),
            ..RecoveryReport::default()
        };
        assert!(r.is_empty());
        r.devices.push(dev(false, None));
        assert_eq!(r.leftovers().attached, None);
        r.devices.push(dev(true, Some(5)));
        r.devices.push(dev(true, Some(9)));
        assert_eq!(r.leftovers().attached, Some(Some(Generation(9))));
        assert!(!r.leftovers().mounted);
        assert!(r.summary().contains("generation 9"), "{}", r.summary());
    }
}
