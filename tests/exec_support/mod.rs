//! Shared helpers of the executor tests (`tests/exec_*.rs`): root check, temp dirs, images, drop guards, re-executed helper processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_failover::exec::loopdev::KernelLoop;
use nbd_failover::exec::mountinfo;
use nbd_failover::exec::{LoopDevices, Mounter, SysMounter, UnmountRequest};

/// Fails the test loudly unless it runs as root (never a silent skip).
pub fn require_root() {
    let uid = nix::unistd::geteuid();
    assert!(
        uid.is_root(),
        "this test needs root (loop devices, mount(2), other users); it runs as uid {uid}. \
         Run the suite as root: sudo scripts/test.sh"
    );
}

/// A unique temp dir, removed on drop.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("nbd-failover-exec-{tag}-"))
        .tempdir()
        .expect("temp dir")
}

/// A volume name unique to this process (fits a loop label whole).
pub fn volume(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

/// Runs `sh -c script`, asserts success, returns stdout.
pub fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{script}` failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sparse file of `mib` MiB.
pub fn sparse_file(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(mib << 20).expect("size image");
}

/// A sparse image with a fresh ext4 filesystem (1 KiB blocks: quick to check).
pub fn ext4_image(path: &Path, mib: u64) {
    sparse_file(path, mib);
    sh(&format!("mkfs.ext4 -q -F {}", path.display()));
}

/// A sparse image with a fresh XFS filesystem (xfsprogs needs 300 MiB at least).
pub fn xfs_image(path: &Path) {
    sparse_file(path, 320);
    sh(&format!("mkfs.xfs -q -f {}", path.display()));
}

/// Unmounts everything at `path` on drop (cleanup after a failure): processes
/// still holding it are killed (the executor's own unmount, forced), then
/// whatever is left is unmounted lazily. Loop devices under it clear
/// themselves (autoclear) once the filesystem is gone.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let mut req = UnmountRequest::new(&self.0, true);
        req.term_grace = Duration::from_millis(100);
        req.kill_wait = Duration::from_millis(200);
        let _ = SysMounter::new().unmount(&req);
        for _ in 0..8 {
            let mounted = mountinfo::read_mountinfo()
                .map(|m| mountinfo::mount_at(&m, &self.0).is_some())
                .unwrap_or(false);
            if !mounted {
                break;
            }
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Detaches loop device `index` on drop if it still carries a label of `volume`.
pub struct LoopGuard {
    pub index: u32,
    pub volume: String,
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = KernelLoop::new().detach(self.index, &self.volume, Duration::from_secs(2));
    }
}

/// SIGKILLs these pids (and their groups, when they lead one) on drop.
#[derive(Default)]
pub struct KillGuard(pub Vec<i32>);

impl Drop for KillGuard {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if pid > 1 {
                let p = nix::unistd::Pid::from_raw(pid);
                if nix::unistd::getpgid(Some(p)) == Ok(p) {
                    let _ = nix::sys::signal::killpg(p, nix::sys::signal::Signal::SIGKILL);
                }
                let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// Kills and reaps children on drop.
#[derive(Default)]
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether `pid` is gone (no such process, or a zombie).
pub fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit(')').next().unwrap_or("").split_whitespace().next();
            matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => true,
    }
}

/// Waits until `pid` is gone; false on timeout.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    gone(pid)
}

/// Re-runs this test binary with only the test `name`, with `env` set: the
/// way a test gets a separate process to crash (SIGKILL) on purpose. stdout is piped.
pub fn reexec(name: &str, env: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("re-exec the test binary")
}

/// Reads `child`'s stdout until a line containing `prefix`; returns the rest of that line.
pub fn read_marker(child: &mut Child, prefix: &str, timeout: Duration) -> String {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // libtest may have printed `test NAME ... ` on the same line first.
            if let Some(at) = line.find(&wanted) {
                let _ = tx.send(line[at + wanted.len()..].trim().to_string());
                return;
            }
        }
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("no {prefix:?} line from the helper process within {timeout:?}"))
}

/// Whether this process is the re-executed helper of test `name` (its env var is set).
pub fn helper_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}
