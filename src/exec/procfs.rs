//! `/proc` walks: process identity (`/proc/<pid>/stat` start time), process-group members, and the processes holding a filesystem.
//!
//! Holders are found the way `fuser -m` does it, by device number: a process
//! holds the filesystem when its cwd, root, executable, an open file or a
//! memory mapping is on it. Links are examined with `statx(AT_STATX_DONT_SYNC)`
//! so a hung network filesystem elsewhere on the node cannot stall the walk,
//! and matching by device (not by path or mount id) also finds processes in
//! other mount namespaces (containers) that reach the filesystem through a
//! bind mount.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What `/proc/<pid>/stat` says about a process (the fields we use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: i32,
    /// Command name (at most 15 bytes, as the kernel keeps it).
    pub comm: String,
    /// State letter (`R`, `S`, `D`, `Z`, …).
    pub state: char,
    /// Parent pid.
    pub ppid: i32,
    /// Process group id.
    pub pgrp: i32,
    /// Session id.
    pub session: i32,
    /// Start time in clock ticks since boot: with the pid, it identifies a process (pids are reused).
    pub start_time: u64,
}

impl ProcStat {
    /// An exited process not yet reaped.
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Reads `/proc/<pid>/stat`.
pub fn read_stat(pid: i32) -> io::Result<ProcStat> {
    let text = std::fs::read(format!("/proc/{pid}/stat"))?;
    parse_stat(&String::from_utf8_lossy(&text)).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unparsable /proc/{pid}/stat"),
        )
    })
}

/// Parses the text of `/proc/<pid>/stat`. The command name may contain spaces
/// and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    Some(ProcStat {
        pid,
        comm,
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        pgrp: rest.get(2)?.parse().ok()?,
        session: rest.get(3)?.parse().ok()?,
        start_time: rest.get(19)?.parse().ok()?,
    })
}

/// Every pid listed in `/proc` (thread-group leaders).
pub fn list_pids() -> io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Whether `pid` is alive (exists and is not a zombie), and — when `start_time`
/// is given — is still the same process (not a reused pid).
pub fn process_alive(pid: i32, start_time: Option<u64>) -> bool {
    match read_stat(pid) {
        Ok(st) => !st.is_zombie() && start_time.map_or(true, |t| t == st.start_time),
        Err(_) => false,
    }
}

/// Live (non-zombie) members of process group `pgid`.
pub fn group_members(pgid: i32) -> io::Result<Vec<ProcStat>> {
    let mut out = Vec::new();
    for pid in list_pids()? {
        if let Ok(st) = read_stat(pid) {
            if st.pgrp == pgid && !st.is_zombie() {
                out.push(st);
            }
        }
    }
    Ok(out)
}

/// Live members of the process group led (or once led) by `pgid`, whose
/// leader started at `leader_start_time`. Empty when the group is gone.
///
/// A group id stays reserved while any member lives, so leaderless
/// stragglers are still found by their `pgrp`. If a *different* process now
/// has the pid `pgid` (start time differs), the number was reused, which the
/// kernel only does once the old group is completely gone.
pub fn group_alive(pgid: i32, leader_start_time: u64) -> io::Result<Vec<i32>> {
    if let Ok(st) = read_stat(pgid) {
        if st.start_time != leader_start_time {
            return Ok(Vec::new());
        }
    }
    Ok(group_members(pgid)?.into_iter().map(|s| s.pid).collect())
}

/// How a process holds a filesystem.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hold {
    /// Its working directory is on it.
    Cwd,
    /// Its root directory is on it (chroot).
    Root,
    /// Its executable is on it.
    Exe,
    /// This file descriptor is open on it.
    Fd(u32),
    /// A file on it is mapped into its memory.
    Mmap,
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Cwd => write!(f, "cwd"),
            Hold::Root => write!(f, "root"),
            Hold::Exe => write!(f, "exe"),
            Hold::Fd(n) => write!(f, "fd {n}"),
            Hold::Mmap => write!(f, "mmap"),
        }
    }
}

/// A process holding a filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Pid.
    pub pid: i32,
    /// Command name.
    pub comm: String,
    /// Start time (identity, see [`ProcStat::start_time`]).
    pub start_time: u64,
    /// What it holds (at most a few entries are listed).
    pub holds: Vec<Hold>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let holds: Vec<String> = self.holds.iter().map(ToString::to_string).collect();
        write!(f, "{} ({}: {})", self.pid, self.comm, holds.join(", "))
    }
}

/// Processes (other than the caller) holding any filesystem whose device is in `devs`.
pub fn holders(devs: &BTreeSet<(u32, u32)>) -> io::Result<Vec<Holder>> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for pid in list_pids()? {
        if pid == me {
            continue;
        }
        if let Some(h) = holder_of(pid, devs) {
            out.push(h);
        }
    }
    Ok(out)
}

/// Whether the calling process itself holds one of `devs` (it cannot signal itself out of the way).
pub fn self_holds(devs: &BTreeSet<(u32, u32)>) -> Option<Holder> {
    holder_of(std::process::id() as i32, devs)
}

/// Whether process `pid` holds a filesystem whose device is in `devs`, and how.
pub fn holder_of(pid: i32, devs: &BTreeSet<(u32, u32)>) -> Option<Holder> {
    let st = read_stat(pid).ok()?;
    if st.is_zombie() {
        return None;
    }
    let base = format!("/proc/{pid}");
    let mut holds = Vec::new();
    for (name, hold) in [("cwd", Hold::Cwd), ("root", Hold::Root), ("exe", Hold::Exe)] {
        if link_dev(Path::new(&format!("{base}/{name}"))).is_some_and(|d| devs.contains(&d)) {
            holds.push(hold);
        }
    }
    if let Ok(dir) = std::fs::read_dir(format!("{base}/fd")) {
        for entry in dir.flatten() {
            let Some(n) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            // Sockets, pipes and anonymous inodes are never on a block filesystem.
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let t = target.as_os_str().as_bytes();
                if !t.starts_with(b"/") {
                    continue;
                }
            }
            if link_dev(&entry.path()).is_some_and(|d| devs.contains(&d)) {
                holds.push(Hold::Fd(n));
            }
        }
    }
    if let Ok(maps) = std::fs::read(format!("{base}/maps")) {
        if maps_on(&String::from_utf8_lossy(&maps), devs) {
            holds.push(Hold::Mmap);
        }
    }
    if holds.is_empty() {
        return None;
    }
    Some(Holder {
        pid,
        comm: st.comm,
        start_time: st.start_time,
        holds,
    })
}

/// Whether any mapping in a `/proc/<pid>/maps` text is backed by a file on one of `devs`.
pub fn maps_on(maps: &str, devs: &BTreeSet<(u32, u32)>) -> bool {
    maps.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (Some(_range), Some(_perms), Some(_offset), Some(dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return false;
        };
        if inode == "0" {
            return false;
        }
        let Some((maj, min)) = dev.split_once(':') else {
            return false;
        };
        match (u32::from_str_radix(maj, 16), u32::from_str_radix(min, 16)) {
            (Ok(a), Ok(b)) => devs.contains(&(a, b)),
            _ => false,
        }
    })
}

/// The device (major, minor) of the file a `/proc` magic link points to, without
/// syncing attributes with a (possibly hung) network server.
pub fn link_dev(path: &Path) -> Option<(u32, u32)> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = std::mem::MaybeUninit::<nix::libc::statx>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `buf` is a
    // writable, properly aligned statx buffer the kernel fills on success; the
    // flags and mask are plain integers. No memory is retained by the kernel.
    let rc = unsafe {
        nix::libc::statx(
            nix::libc::AT_FDCWD,
            c.as_ptr(),
            nix::libc::AT_STATX_DONT_SYNC,
            nix::libc::STATX_BASIC_STATS,
            buf.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx returned 0, so the kernel initialised the buffer (and it
    // was zeroed before, so every field is a valid integer either way).
    let st = unsafe { buf.assume_init() };
    Some((st.stx_dev_major, st.stx_dev_minor))
}

/// (major, minor) of an encoded `dev_t` (glibc's encoding, which the kernel ABI uses).
pub fn dev_split(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    (major as u32, minor as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_names_with_spaces_and_parens() {
        let text = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        let st = parse_stat(text).unwrap();
        assert_eq!(st.pid, 4242);
        assert_eq!(st.comm, "my (odd) name");
        assert_eq!(st.state, 'S');
        assert_eq!(st.ppid, 1);
        assert_eq!(st.pgrp, 4242);
        assert_eq!(st.session, 4242);
        assert_eq!(st.start_time, 987654);
        assert!(parse_stat("1 (x) S 0").is_none());
    }

    #[test]
    fn own_stat_is_readable_and_alive() {
        let me = std::process::id() as i32;
        let st = read_stat(me).unwrap();
        assert_eq!(st.pid, me);
        assert!(process_alive(me, Some(st.start_time)));
        assert!(!process_alive(me, Some(st.start_time + 1)));
    }

    #[test]
    fn maps_match_by_hex_device() {
        let devs: BTreeSet<(u32, u32)> = [(7, 12)].into_iter().collect();
        let maps = "\
55d0c000-55d0d000 r--p 00000000 fe:00 1234 /usr/bin/cat
7f00-7f01 rw-p 00000000 00:00 0 [heap]
7f02-7f03 r--p 00000000 07:0c 77 /mnt/vol/data.db
";
        assert!(maps_on(maps, &devs));
        assert!(!maps_on(&maps.replace("07:0c", "07:0d"), &devs));
    }

    #[test]
    fn dev_split_matches_the_kernel_encoding() {
        // makedev(7, 3) and makedev(259, 65536 + 5).
        assert_eq!(dev_split(0x703), (7, 3));
        let (major, minor): (u64, u64) = (259, 65541);
        let dev = ((major & 0xfff) << 8)
            | ((major & !0xfff) << 32)
            | (minor & 0xff)
            | ((minor & !0xff) << 12);
        assert_eq!(dev_split(dev), (259, 65541));
    }
}
