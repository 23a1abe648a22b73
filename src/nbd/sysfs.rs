//! What sysfs and `/proc/self/mountinfo` say about an NBD device: pid, backend, size, mounts.
//!
//! `/sys/block/nbdN/pid` exists exactly while the device has a live
//! configuration (created when the kernel starts the device, removed when the
//! configuration is torn down), so it, not netlink STATUS's "connected" (which
//! is also true while anyone merely holds the device open), says "attached".
//! `backend` carries the backend identifier given at CONNECT.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where to look (tests point these at a fake tree).
#[derive(Debug, Clone)]
pub struct Roots {
    /// Usually `/sys`.
    pub sys: PathBuf,
    /// Usually `/dev`.
    pub dev: PathBuf,
    /// Usually `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sys: "/sys".into(),
            dev: "/dev".into(),
            mountinfo: "/proc/self/mountinfo".into(),
        }
    }
}

/// A device's state as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SysState {
    /// `/sys/block/nbdN` exists.
    pub exists: bool,
    /// Content of `pid`, if the file exists.
    pub pid: Option<u32>,
    /// Content of `backend`, if the file exists.
    pub backend: Option<String>,
    /// `size` × 512.
    pub size_bytes: u64,
    /// `ro` is 1.
    pub read_only: bool,
    /// Names under `holders/` (device-mapper and the like).
    pub holders: Vec<String>,
}

impl Roots {
    /// `/sys/block/nbdN`.
    pub fn block_dir(&self, index: u32) -> PathBuf {
        self.sys.join("block").join(format!("nbd{index}"))
    }

    /// `/dev/nbdN`.
    pub fn dev_path(&self, index: u32) -> PathBuf {
        self.dev.join(format!("nbd{index}"))
    }

    /// Reads the state of `nbdN` (missing files read as absent).
    pub fn state(&self, index: u32) -> io::Result<SysState> {
        let dir = self.block_dir(index);
        if !dir.exists() {
            return Ok(SysState::default());
        }
        let read = |name: &str| -> io::Result<Option<String>> {
            match fs::read_to_string(dir.join(name)) {
                Ok(s) => Ok(Some(s.trim_end_matches('\n').to_string())),
                Err(e) if vanished(&e) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let pid = read("pid")?.and_then(|s| s.trim().parse().ok());
        let backend = read("backend")?.filter(|s| !s.is_empty());
        let sectors: u64 = read("size")?
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let read_only = read("ro")?.is_some_and(|s| s.trim() == "1");
        let mut holders = Vec::new();
        if let Ok(rd) = fs::read_dir(dir.join("holders")) {
            for e in rd.flatten() {
                holders.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        holders.sort();
        Ok(SysState {
            exists: true,
            pid,
            backend,
            size_bytes: sectors.saturating_mul(512),
            read_only,
            holders,
        })
    }

    /// Indices of all `nbdN` under `/sys/block`, sorted.
    pub fn indices(&self) -> io::Result<Vec<u32>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(self.sys.join("block")) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in rd {
            let name = e?.file_name();
            if let Some(n) = name.to_str().and_then(|n| n.strip_prefix("nbd")) {
                if let Ok(i) = n.parse() {
                    out.push(i);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// `major:minor` of the device and its partitions.
    fn dev_numbers(&self, index: u32) -> Vec<String> {
        let dir = self.block_dir(index);
        let mut out = Vec::new();
        if let Ok(s) = fs::read_to_string(dir.join("dev")) {
            out.push(s.trim().to_string());
        }
        let prefix = format!("nbd{index}p");
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    if let Ok(s) = fs::read_to_string(e.path().join("dev")) {
                        out.push(s.trim().to_string());
                    }
                }
            }
        }
        out
    }

    /// Mount points of the device or its partitions (from mountinfo).
    pub fn mounts(&self, index: u32) -> io::Result<Vec<PathBuf>> {
        let numbers = self.dev_numbers(index);
        if numbers.is_empty() {
            return Ok(Vec::new());
        }
        let info = fs::read_to_string(&self.mountinfo)?;
        Ok(mounts_of(&info, &numbers))
    }
}

/// Mount points in `mountinfo` text whose `major:minor` is one of `numbers`.
pub fn mounts_of(mountinfo: &str, numbers: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let mut f = line.split(' ');
        let (Some(_id), Some(_parent), Some(devno), Some(_root), Some(point)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if numbers.iter().any(|n| n == devno) {
            out.push(PathBuf::from(unescape_octal(point)));
        }
    }
    out
}

/// Undoes mountinfo's `\040`-style escapes.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file is gone, or going: sysfs answers ENODEV when an attribute is
/// read while the kernel removes it (the `pid` file during teardown).
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::Error::ENODEV as i32)
}

/// Whether a process with this pid exists (a hint: pids are reused).
pub fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_matches_device_numbers_and_unescapes() {
        let info = "36 25 43:0 / /mnt/my\\040vol rw,relatime shared:1 - ext4 /dev/nbd0 rw\n\
                    37 25 43:32 / /srv rw - ext4 /dev/nbd1 rw\n\
                    38 25 8:1 / / rw - ext4 /dev/sda1 rw\n";
        assert_eq!(
            mounts_of(info, &["43:0".into()]),
            vec![PathBuf::from("/mnt/my vol")]
        );
        assert!(mounts_of(info, &["43:64".into()]).is_empty());
    }

    #[test]
    fn state_of_a_fake_tree() {
        let dir = std::env::temp_dir().join(format!("nbd-sysfs-{}", std::process::id()));
        let b = dir.join("block/nbd3");
        fs::create_dir_all(b.join("holders")).unwrap();
        fs::write(b.join("pid"), "1234\n").unwrap();
        fs::write(b.join("backend"), "nbd-failover:db:7\n").unwrap();
        fs::write(b.join("size"), "2048\n").unwrap();
        fs::write(b.join("ro"), "0\n").unwrap();
        let roots = Roots {
            sys: dir.clone(),
            ..Roots::default()
        };
        let s = roots.state(3).unwrap();
        assert_eq!(s.pid, Some(1234));
        assert_eq!(s.backend.as_deref(), Some("nbd-failover:db:7"));
        assert_eq!(s.size_bytes, 1024 * 1024);
        assert_eq!(roots.indices().unwrap(), vec![3]);
        assert!(!roots.state(4).unwrap().exists);
        fs::remove_dir_all(dir).unwrap();
    }
}
