//! The executors: what carries out the core's effects on a real node (fsck, mount, task, loop and dir backends, start-up recovery).
//!
//! Each component sits behind a small trait with a real implementation and a
//! recording fake ([`fake`]) that injects failures, for the daemon's tests:
//!
//! | effect | trait | real | fake |
//! |---|---|---|---|
//! | `Fsck` | [`Fsck`] | [`FsckRunner`] (`e2fsck -p`, `xfs_repair -n`) | [`fake::FakeFsck`] |
//! | `Mount` / `Unmount` | [`Mounter`] | [`SysMounter`] (mount(2), holder walk) and [`DirMounter`] (`dir` volumes) | [`fake::FakeMounter`] |
//! | `StartTask` / `SignalTask` | [`TaskRunner`] | [`ExecTask`] (process group) and [`SystemdTask`] (`systemctl`) | [`fake::FakeTasks`] |
//! | `Attach` / `Detach` (`image`) | [`LoopDevices`] | [`KernelLoop`] (loop ioctls) | [`fake::FakeLoopDevices`] |
//! | `Start { leftovers }` | [`LeftoverScan`] | [`HostRecovery`] with [`LoopScanner`], [`NbdScanner`] | [`fake::FakeRecovery`] |
//!
//! **Sync or async.** Components that *wait for a process* are async on tokio
//! ([`Fsck::check`], [`TaskRunner`]; they return a [`BoxFuture`] so they can be
//! used as trait objects). Components that make *blocking syscalls*
//! ([`Mounter`], [`LoopDevices`], [`LeftoverScan`]) are plain synchronous
//! methods, like [`crate::nbd::BlockDevices`]: the daemon calls them through
//! `tokio::task::spawn_blocking`. A mount or unmount on a device whose server
//! is gone can block in the kernel, and the unmount's TERM → grace → KILL of
//! holders sleeps; neither may stall the runtime.
//!
//! **Failures are events.** Every executor returns a `Result` with a
//! `thiserror` error; [`events`] maps each result to the core's completion
//! event (`Event::Mounted(Err(msg))`, `Event::FsckDone(Refused(msg))`, …), so
//! no executor failure becomes a panic.
//!
//! # Layout
//! - [`fsck`]: the filesystem checker and its exit-code mapping.
//! - [`mount`]: mount options, mount(2) with verification, the holder-killing unmount.
//! - [`task`]: `exec` tasks in their own process group, `systemd_unit` tasks, pid files.
//! - [`loopdev`]: loop devices for `image` volumes, labelled `nbd-failover:<volume>:<generation>`.
//! - [`dir`]: the `dir` backend's mount check.
//! - [`recovery`]: the start-up scan for what an earlier run left behind.
//! - [`events`]: executor results → core events.
//! - [`fake`]: recording fakes with injected failures.
//! - [`mountinfo`], [`procfs`]: parsing `/proc/self/mountinfo` and walking `/proc`.
//! - [`spawn`]: supervised children (own session, parent-death signal, user switch).
//!
//! `unsafe` appears only where the kernel is called directly (loop ioctls,
//! `statx`, the fork-to-exec hook), each block with a `// SAFETY:` comment.

pub mod dir;
pub mod events;
pub mod fake;
pub mod fsck;
pub mod loopdev;
pub mod mount;
pub mod mountinfo;
pub mod procfs;
pub mod recovery;
pub mod spawn;
pub mod task;

use std::future::Future;
use std::pin::Pin;

pub use dir::{DirCheck, DirMounter, DirVerified};
pub use fsck::{Fsck, FsckError, FsckMode, FsckReport, FsckRequest, FsckRunner, XfsOptions};
pub use loopdev::{
    KernelLoop, LoopAttachRequest, LoopAttachment, LoopDetached, LoopDevices, LoopError, LoopStatus,
};
pub use mount::{
    KillHolders, MountError, MountOptions, MountRequest, Mounted, Mounter, SignalledHolder,
    SysMounter, UnmountReport, UnmountRequest,
};
pub use recovery::{
    DeviceScanner, FnScanner, FoundDevice, HostRecovery, LeftoverScan, LoopScanner, NbdScanner,
    RecoveryError, RecoveryReport, RecoverySpec,
};
pub use task::{
    ExecTask, OutputLine, OutputSink, StartedTask, Stream, SystemdTask, TaskError, TaskExit,
    TaskInfo, TaskLeftover, TaskRunner, TaskSpec,
};

/// A boxed, sendable future: what the async executor traits return, so they
/// stay usable as `dyn` trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An error and its chain of causes on one line: `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.ends_with(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}
