//! The `dir` backend: nothing to attach; "mount" verifies the directory is on the expected, already-mounted shared filesystem.
//!
//! A `dir` volume lives on a shared filesystem (NFS, GlusterFS, CephFS) that
//! the node mounts by its own means. If that mount is missing, the directory
//! would silently be an empty directory on the local root filesystem and the
//! task would start writing there — the check exists to refuse that. It
//! passes only when the (canonical) path is itself a mount point in
//! `/proc/self/mountinfo` (unless [`DirCheck::require_mount_point`] is off,
//! then it only must not be on the root filesystem), of one of the expected
//! filesystem types if any are given.
//!
//! [`DirMounter`] is the [`Mounter`] for `dir` volumes: `mount` is the check;
//! `unmount` does nothing (the shared mount is not ours; the task, which is,
//! is stopped by the fence before).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::mount::{MountError, MountRequest, Mounted, Mounter, UnmountReport, UnmountRequest};
use super::mountinfo::{self, MountEntry};

/// What a `dir` volume's directory must be on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirCheck {
    /// The directory.
    pub path: PathBuf,
    /// The directory must itself be a mount point (default). When off, it may
    /// be anywhere below a mount point other than `/`.
    pub require_mount_point: bool,
    /// Accepted filesystem types (`nfs`, `nfs4`, `fuse.glusterfs`, …); empty accepts any.
    pub fstypes: Vec<String>,
}

impl DirCheck {
    /// The check of a configured `dir` volume (strict: its directory must be a
    /// mount point, of any type); `None` for other backends.
    pub fn for_volume(volume: &crate::config::VolumeConfig) -> Option<Self> {
        match &volume.backend {
            crate::config::Backend::Dir { path } => Some(DirCheck::new(path)),
            crate::config::Backend::Nbd(_) | crate::config::Backend::Image { .. } => None,
        }
    }

    /// The strict default: `path` must be a mount point, of any type.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DirCheck {
            path: path.into(),
            require_mount_point: true,
            fstypes: Vec::new(),
        }
    }
}

/// A directory found on an acceptable mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirVerified {
    /// The canonical directory.
    pub path: PathBuf,
    /// The mount it lies on.
    pub entry: MountEntry,
}

/// Checks `check` against the current mount table.
pub fn verify_dir(check: &DirCheck) -> Result<DirVerified, MountError> {
    let entries = mountinfo::read_mountinfo().map_err(MountError::Proc)?;
    verify_dir_in(check, &entries)
}

/// Checks `check` against a given mount table (the path itself must exist on this host).
pub fn verify_dir_in(check: &DirCheck, entries: &[MountEntry]) -> Result<DirVerified, MountError> {
    let path = std::fs::canonicalize(&check.path).map_err(|e| {
        MountError::Refused(format!(
            "dir volume path {} cannot be used: {e} (is the shared filesystem mounted?)",
            check.path.display()
        ))
    })?;
    if !path.is_dir() {
        return Err(MountError::Refused(format!(
            "dir volume path {} is not a directory",
            path.display()
        )));
    }
    let Some(entry) = mountinfo::containing_mount(entries, &path) else {
        return Err(MountError::Refused(format!(
            "no mount contains {}",
            path.display()
        )));
    };
    if check.require_mount_point && entry.mount_point != path {
        return Err(MountError::Refused(format!(
            "dir volume path {} is not a mount point: it lies on {} ({} from {}); \
             the shared filesystem is not mounted there, refusing to start the task on a local directory",
            path.display(),
            entry.mount_point.display(),
            entry.fstype,
            entry.source
        )));
    }
    if !check.require_mount_point && entry.mount_point == Path::new("/") {
        return Err(MountError::Refused(format!(
            "dir volume path {} lies on the root filesystem, not on a shared filesystem",
            path.display()
        )));
    }
    if !check.fstypes.is_empty() && !check.fstypes.contains(&entry.fstype) {
        return Err(MountError::Refused(format!(
            "dir volume path {} is on a {} filesystem ({} at {}), expected {}",
            path.display(),
            entry.fstype,
            entry.source,
            entry.mount_point.display(),
            check.fstypes.join(" or ")
        )));
    }
    Ok(DirVerified {
        path,
        entry: entry.clone(),
    })
}

/// The [`Mounter`] of a `dir` volume (see the module doc).
#[derive(Clone, Debug)]
pub struct DirMounter {
    check: DirCheck,
}

impl DirMounter {
    /// A mounter that verifies `check`.
    pub fn new(check: DirCheck) -> Self {
        DirMounter { check }
    }
}

impl Mounter for DirMounter {
    /// Verifies the directory; the request's device, type and options are not used.
    fn mount(&self, _request: &MountRequest) -> Result<Mounted, MountError> {
        let v = verify_dir(&self.check)?;
        tracing::info!(
            path = %v.path.display(),
            fstype = %v.entry.fstype,
            source = %v.entry.source,
            "dir volume is on its shared filesystem"
        );
        Ok(Mounted {
            mount_point: v.path,
            entry: v.entry,
            already_mounted: true,
            created_mount_point: false,
        })
    }

    /// Nothing to do: the shared mount is not ours.
    fn unmount(&self, request: &UnmountRequest) -> Result<UnmountReport, MountError> {
        let started = Instant::now();
        Ok(UnmountReport {
            mount_point: request.mount_point.clone(),
            elapsed: started.elapsed(),
            ..UnmountReport::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<MountEntry> {
        mountinfo::parse_mountinfo(
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
             2 1 0:3 / /proc rw - proc proc rw\n",
        )
    }

    #[test]
    fn a_plain_directory_on_root_is_refused() {
        let tmp = std::env::temp_dir();
        let err = verify_dir_in(&DirCheck::new(&tmp), &table()).unwrap_err();
        assert!(err.to_string().contains("not a mount point"), "{err}");
        let loose = DirCheck {
            require_mount_point: false,
            ..DirCheck::new(&tmp)
        };
        let err = verify_dir_in(&loose, &table()).unwrap_err();
        assert!(err.to_string().contains("root filesystem"), "{err}");
    }

    #[test]
    fn a_mount_point_of_the_right_type_passes_and_the_wrong_type_is_refused() {
        let ok = verify_dir_in(&DirCheck::new("/proc"), &table()).unwrap();
        assert_eq!(ok.entry.fstype, "proc");
        let typed = DirCheck {
            fstypes: vec!["nfs4".to_string()],
            ..DirCheck::new("/proc")
        };
        let err = verify_dir_in(&typed, &table()).unwrap_err();
        assert!(err.to_string().contains("expected nfs4"), "{err}");
    }

    #[test]
    fn a_missing_path_is_refused() {
        let err = verify_dir_in(&DirCheck::new("/nonexistent/nbd-failover"), &table()).unwrap_err();
        assert!(err.to_string().contains("cannot be used"), "{err}");
    }
}
