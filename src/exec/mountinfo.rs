//! `/proc/self/mountinfo`: parsing, and finding the mount at, under or containing a path.
//!
//! The kernel escapes space, tab, newline and backslash in paths as octal
//! (`\040`); [`parse_mountinfo`] undoes that, so paths compare byte for byte
//! with the ones in the config.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique id of the mount.
    pub mount_id: u32,
    /// Id of the parent mount.
    pub parent_id: u32,
    /// `st_dev` of files on this filesystem: (major, minor).
    pub dev: (u32, u32),
    /// The directory of the filesystem that forms the root of this mount.
    pub root: PathBuf,
    /// Where it is mounted (relative to the reading process's root).
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,relatime`).
    pub mount_options: String,
    /// Filesystem type (`ext4`, `nfs4`, …).
    pub fstype: String,
    /// The mount source (`/dev/loop3`, `server:/export`).
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

impl MountEntry {
    /// `major:minor` as the kernel writes it.
    pub fn dev_string(&self) -> String {
        format!("{}:{}", self.dev.0, self.dev.1)
    }

    /// Whether the mount is read-only (per-mount option `ro`).
    pub fn read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }
}

/// Reads and parses `/proc/self/mountinfo`.
pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    read_mountinfo_of(Path::new("/proc/self/mountinfo"))
}

/// Reads and parses a mountinfo file (`/proc/<pid>/mountinfo`).
pub fn read_mountinfo_of(file: &Path) -> io::Result<Vec<MountEntry>> {
    let text = std::fs::read(file)?;
    Ok(parse_mountinfo(&String::from_utf8_lossy(&text)))
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let parent_id = fields.next()?.parse().ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let mount_options = fields.next()?.to_string();
    // Optional fields up to the "-" separator.
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fstype = fields.next()?.to_string();
    let source = String::from_utf8_lossy(unescape(fields.next()?).as_os_str().as_encoded_bytes())
        .into_owned();
    let super_options = fields.next().unwrap_or("").to_string();
    Some(MountEntry {
        mount_id,
        parent_id,
        dev,
        root,
        mount_point,
        mount_options,
        fstype,
        source,
        super_options,
    })
}

/// Undoes the kernel's octal escapes (`\040` → space).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The topmost mount whose mount point is exactly `path` (the last one listed).
pub fn mount_at<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

/// Every mount at `path` or below it, in mountinfo order (parents before children).
pub fn mounts_under<'a>(entries: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    entries
        .iter()
        .filter(|e| e.mount_point.starts_with(path))
        .collect()
}

/// The mount a path lies on: the topmost one with the longest mount point that is a prefix of `path`.
///
/// `path` should be canonical (no symlinks, no `..`), as [`std::fs::canonicalize`] returns.
pub fn containing_mount<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<&MountEntry> = None;
    for e in entries {
        if path.starts_with(&e.mount_point) {
            let longer = best.map_or(true, |b| {
                e.mount_point.as_os_str().len() >= b.mount_point.as_os_str().len()
            });
            if longer {
                best = Some(e);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
40 27 7:3 / /mnt/my\\040vol rw,noatime master:2 - ext4 /dev/loop3 rw
41 40 0:50 / /mnt/my\\040vol/sub rw - tmpfs tmpfs rw
42 27 0:51 /exports/pg /srv/nfs rw - nfs4 server:/exports rw,vers=4.2
garbage line
";

    #[test]
    fn parses_fields_and_unescapes_paths() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 5);
        let e = &m[2];
        assert_eq!(e.mount_id, 40);
        assert_eq!(e.parent_id, 27);
        assert_eq!(e.dev, (7, 3));
        assert_eq!(e.dev_string(), "7:3");
        assert_eq!(e.mount_point, Path::new("/mnt/my vol"));
        assert_eq!(e.fstype, "ext4");
        assert_eq!(e.source, "/dev/loop3");
        assert_eq!(e.mount_options, "rw,noatime");
        assert_eq!(m[4].root, Path::new("/exports/pg"));
        assert_eq!(m[4].source, "server:/exports");
    }

    #[test]
    fn finds_mounts_at_under_and_containing() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(mount_at(&m, Path::new("/mnt/my vol")).unwrap().mount_id, 40);
        assert!(mount_at(&m, Path::new("/mnt")).is_none());
        let under: Vec<u32> = mounts_under(&m, Path::new("/mnt/my vol"))
            .iter()
            .map(|e| e.mount_id)
            .collect();
        assert_eq!(under, vec![40, 41]);
        // "/mnt/my volx" is not under "/mnt/my vol": component-wise prefix.
        assert!(mounts_under(&m, Path::new("/mnt/my vo")).is_empty());
        assert_eq!(
            containing_mount(&m, Path::new("/srv/nfs/pg/data"))
                .unwrap()
                .mount_id,
            42
        );
        assert_eq!(
            containing_mount(&m, Path::new("/srv")).unwrap().mount_id,
            27
        );
    }

    #[test]
    fn unescape_handles_backslashes_and_bad_escapes() {
        assert_eq!(unescape("a\\134b"), PathBuf::from("a\\b"));
        assert_eq!(unescape("a\\011b\\012"), PathBuf::from("a\tb\n"));
        assert_eq!(unescape("a\\9"), PathBuf::from("a\\9"));
        assert_eq!(unescape("end\\04"), PathBuf::from("end\\04"));
    }
}
