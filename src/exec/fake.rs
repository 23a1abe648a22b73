//! Recording fakes of every executor, with injected failures, for the daemon's tests.
//!
//! Each fake records its calls (`calls()`), and `fail_next(op, message)`
//! makes the next call of that operation fail with an `Injected` error (which
//! [`super::events`] turns into a failed completion event like any other).
//! Beyond that:
//! - [`FakeFsck`]: outcomes queued with `push_outcome` (default `Clean`), an
//!   optional delay (a slow check);
//! - [`FakeMounter`]: remembers what is mounted; `set_busy(n)` makes the next
//!   `n` unforced unmounts fail busy (a forced one then goes lazy);
//! - [`FakeTasks`]: the test ends the running task with `exit(status)`;
//!   SIGTERM ends it with signal 15 unless `set_ignore_term(true)`, SIGKILL
//!   always ends it with signal 9; `set_leftover` plants a task for recovery;
//! - [`FakeLoopDevices`]: hands out the lowest free index, honours labels on detach;
//! - [`FakeRecovery`]: returns the report planted with `set_report`.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::core::{ExitStatus, FsckOutcome, Generation, TaskSignal};

use super::fsck::{Fsck, FsckError, FsckReport, FsckRequest};
use super::loopdev::{
    label_generation, loop_label, LoopAttachRequest, LoopAttachment, LoopDetached, LoopDevices,
    LoopError, LoopStatus,
};
use super::mount::{MountError, MountRequest, Mounted, Mounter, UnmountReport, UnmountRequest};
use super::mountinfo::MountEntry;
use super::recovery::{LeftoverScan, RecoveryError, RecoveryReport, RecoverySpec};
use super::task::{StartedTask, TaskError, TaskInfo, TaskLeftover, TaskRunner};
use super::BoxFuture;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the first queued failure for `op`, if any.
fn take_failure<O: PartialEq>(q: &mut VecDeque<(O, String)>, op: &O) -> Option<String> {
    let i = q.iter().position(|(o, _)| o == op)?;
    q.remove(i).map(|(_, m)| m)
}

// ---------------------------------------------------------------- fsck

#[derive(Default)]
struct FsckState {
    calls: Vec<FsckRequest>,
    outcomes: VecDeque<FsckOutcome>,
    failures: VecDeque<((), String)>,
    delay: Duration,
}

/// A fake filesystem checker.
#[derive(Default)]
pub struct FakeFsck {
    state: Mutex<FsckState>,
}

impl FakeFsck {
    /// Every check `Clean`, at once.
    pub fn new() -> Self {
        FakeFsck::default()
    }

    /// The next check returns `outcome` (queued in order; `Clean` when empty).
    pub fn push_outcome(&self, outcome: FsckOutcome) {
        lock(&self.state).outcomes.push_back(outcome);
    }

    /// The next check fails to run at all.
    pub fn fail_next(&self, message: impl Into<String>) {
        lock(&self.state).failures.push_back(((), message.into()));
    }

    /// Each check takes this long (tokio time).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// The requests seen.
    pub fn calls(&self) -> Vec<FsckRequest> {
        lock(&self.state).calls.clone()
    }
}

impl Fsck for FakeFsck {
    fn check<'a>(
        &'a self,
        request: &'a FsckRequest,
    ) -> BoxFuture<'a, Result<FsckReport, FsckError>> {
        Box::pin(async move {
            let (failure, outcome, delay) = {
                let mut s = lock(&self.state);
                s.calls.push(request.clone());
                let failure = take_failure(&mut s.failures, &());
                let outcome = if failure.is_some() {
                    FsckOutcome::Clean
                } else {
                    s.outcomes.pop_front().unwrap_or(FsckOutcome::Clean)
                };
                (failure, outcome, s.delay)
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(m) = failure {
                return Err(FsckError::Injected(m));
            }
            Ok(FsckReport {
                device: request.device.clone(),
                outcome,
                runs: Vec::new(),
                notes: vec!["fake check".to_string()],
                skipped: false,
                elapsed: delay,
            })
        })
    }
}

// ---------------------------------------------------------------- mount

/// A recorded mounter call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeMountCall {
    /// `mount` of a device at a mount point.
    Mount {
        /// Device.
        device: PathBuf,
        /// Mount point.
        mount_point: PathBuf,
    },
    /// `unmount`.
    Unmount {
        /// Mount point.
        mount_point: PathBuf,
        /// Forced.
        force: bool,
    },
}

/// Mounter operations a failure can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeMountOp {
    /// `mount`.
    Mount,
    /// `unmount`.
    Unmount,
}

#[derive(Default)]
struct MountState {
    mounted: BTreeMap<PathBuf, PathBuf>,
    calls: Vec<FakeMountCall>,
    failures: VecDeque<(FakeMountOp, String)>,
    busy: u32,
}

/// A fake mounter.
#[derive(Default)]
pub struct FakeMounter {
    state: Mutex<MountState>,
}

impl FakeMounter {
    /// Nothing mounted.
    pub fn new() -> Self {
        FakeMounter::default()
    }

    /// The next call of `op` fails.
    pub fn fail_next(&self, op: FakeMountOp, message: impl Into<String>) {
        lock(&self.state).failures.push_back((op, message.into()));
    }

    /// The next `n` unforced unmounts fail busy.
    pub fn set_busy(&self, n: u32) {
        lock(&self.state).busy = n;
    }

    /// Plants a mount (a leftover).
    pub fn set_mounted(&self, mount_point: impl Into<PathBuf>, device: impl Into<PathBuf>) {
        lock(&self.state)
            .mounted
            .insert(mount_point.into(), device.into());
    }

    /// Whether something is mounted at `mount_point`.
    pub fn is_mounted(&self, mount_point: &std::path::Path) -> bool {
        lock(&self.state).mounted.contains_key(mount_point)
    }

    /// The calls seen.
    pub fn calls(&self) -> Vec<FakeMountCall> {
        lock(&self.state).calls.clone()
    }
}

fn fake_entry(device: &std::path::Path, mount_point: &std::path::Path, fstype: &str) -> MountEntry {
    MountEntry {
        mount_id: 1000,
        parent_id: 1,
        dev: (7, 0),
        root: PathBuf::from("/"),
        mount_point: mount_point.to_path_buf(),
        mount_options: "rw".to_string(),
        fstype: fstype.to_string(),
        source: device.display().to_string(),
        super_options: "rw".to_string(),
    }
}

impl Mounter for FakeMounter {
    fn mount(&self, request: &MountRequest) -> Result<Mounted, MountError> {
        let mut s = lock(&self.state);
        s.calls.push(FakeMountCall::Mount {
            device: request.device.clone(),
            mount_point: request.mount_point.clone(),
        });
        if let Some(m) = take_failure(&mut s.failures, &FakeMountOp::Mount) {
            return Err(MountError::Injected(m));
        }
        let already = match s.mounted.get(&request.mount_point) {
            Some(d) if *d == request.device => true,
            Some(d) => {
                return Err(MountError::Occupied {
                    path: request.mount_point.clone(),
                    what: d.display().to_string(),
                })
            }
            None => false,
        };
        s.mounted
            .insert(request.mount_point.clone(), request.device.clone());
        Ok(Mounted {
            mount_point: request.mount_point.clone(),
            entry: fake_entry(&request.device, &request.mount_point, &request.fstype),
            already_mounted: already,
            created_mount_point: false,
        })
    }

    fn unmount(&self, request: &UnmountRequest) -> Result<UnmountReport, MountError> {
        let mut s = lock(&self.state);
        s.calls.push(FakeMountCall::Unmount {
            mount_point: request.mount_point.clone(),
            force: request.force,
        });
        if let Some(m) = take_failure(&mut s.failures, &FakeMountOp::Unmount) {
            return Err(MountError::Injected(m));
        }
        let was_mounted = s.mounted.contains_key(&request.mount_point);
        let mut report = UnmountReport {
            mount_point: request.mount_point.clone(),
            was_mounted,
            attempts: 1,
            ..UnmountReport::default()
        };
        if !was_mounted {
            return Ok(report);
        }
        if s.busy > 0 {
            s.busy -= 1;
            if !request.force {
                return Err(MountError::Busy {
                    path: request.mount_point.clone(),
                    attempts: 1,
                    holders: vec!["4242 (fake: cwd)".to_string()],
                    signalled: Vec::new(),
                });
            }
            report.lazy = true;
        }
        s.mounted.remove(&request.mount_point);
        report.unmounted.push(request.mount_point.clone());
        Ok(report)
    }
}

// ---------------------------------------------------------------- task

/// A recorded task-runner call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeTaskCall {
    /// `start` under a generation.
    Start(Generation),
    /// `signal`.
    Signal(TaskSignal),
    /// `find_leftover`.
    FindLeftover,
    /// `adopt`.
    Adopt,
}

/// Task operations a failure can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeTaskOp {
    /// `start`.
    Start,
    /// `signal`.
    Signal,
    /// `find_leftover`.
    FindLeftover,
}

#[derive(Default)]
struct TaskState {
    calls: Vec<FakeTaskCall>,
    running: Option<tokio::sync::oneshot::Sender<ExitStatus>>,
    ignore_term: bool,
    failures: VecDeque<(FakeTaskOp, String)>,
    leftover: Option<TaskLeftover>,
    next_pgid: i32,
}

/// A fake task runner (one volume's task).
#[derive(Default, Clone)]
pub struct FakeTasks {
    state: Arc<Mutex<TaskState>>,
}

impl FakeTasks {
    /// No task running.
    pub fn new() -> Self {
        FakeTasks::default()
    }

    /// Ends the running task with `status`; false if none was running.
    pub fn exit(&self, status: ExitStatus) -> bool {
        match lock(&self.state).running.take() {
            Some(tx) => tx.send(status).is_ok(),
            None => false,
        }
    }

    /// Whether a task is running.
    pub fn is_running(&self) -> bool {
        lock(&self.state).running.is_some()
    }

    /// SIGTERM is ignored (only SIGKILL ends the task).
    pub fn set_ignore_term(&self, ignore: bool) {
        lock(&self.state).ignore_term = ignore;
    }

    /// The next call of `op` fails.
    pub fn fail_next(&self, op: FakeTaskOp, message: impl Into<String>) {
        lock(&self.state).failures.push_back((op, message.into()));
    }

    /// `find_leftover` reports this.
    pub fn set_leftover(&self, leftover: Option<TaskLeftover>) {
        lock(&self.state).leftover = leftover;
    }

    /// The calls seen.
    pub fn calls(&self) -> Vec<FakeTaskCall> {
        lock(&self.state).calls.clone()
    }

    fn begin(&self) -> super::task::TaskExit {
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.state).running = Some(tx);
        Box::pin(async move { rx.await.unwrap_or(ExitStatus::Code(-1)) })
    }
}

impl TaskRunner for FakeTasks {
    fn start(&self, generation: Generation) -> BoxFuture<'_, Result<StartedTask, TaskError>> {
        Box::pin(async move {
            let pgid = {
                let mut s = lock(&self.state);
                s.calls.push(FakeTaskCall::Start(generation));
                if let Some(m) = take_failure(&mut s.failures, &FakeTaskOp::Start) {
                    return Err(TaskError::Injected(m));
                }
                if s.running.is_some() {
                    return Err(TaskError::AlreadyRunning {
                        volume: "fake".to_string(),
                        pgid: s.next_pgid,
                    });
                }
                s.next_pgid += 1;
                10_000 + s.next_pgid
            };
            Ok(StartedTask {
                info: TaskInfo::Group {
                    pgid,
                    start_time: 0,
                    generation: Some(generation),
                },
                adopted: false,
                exit: self.begin(),
            })
        })
    }

    fn signal(&self, signal: TaskSignal) -> BoxFuture<'_, Result<(), TaskError>> {
        Box::pin(async move {
            let tx = {
                let mut s = lock(&self.state);
                s.calls.push(FakeTaskCall::Signal(signal));
                if let Some(m) = take_failure(&mut s.failures, &FakeTaskOp::Signal) {
                    return Err(TaskError::Injected(m));
                }
                match signal {
                    TaskSignal::Term if s.ignore_term => None,
                    TaskSignal::Term | TaskSignal::Kill => s.running.take(),
                }
            };
            if let Some(tx) = tx {
                let sig = match signal {
                    TaskSignal::Term => 15,
                    TaskSignal::Kill => 9,
                };
                let _ = tx.send(ExitStatus::Signal(sig));
            }
            Ok(())
        })
    }

    fn find_leftover(&self) -> Result<Option<TaskLeftover>, TaskError> {
        let mut s = lock(&self.state);
        s.calls.push(FakeTaskCall::FindLeftover);
        if let Some(m) = take_failure(&mut s.failures, &FakeTaskOp::FindLeftover) {
            return Err(TaskError::Injected(m));
        }
        Ok(s.leftover.clone())
    }

    fn adopt(&self, leftover: &TaskLeftover) -> Result<StartedTask, TaskError> {
        lock(&self.state).calls.push(FakeTaskCall::Adopt);
        let info = match leftover {
            TaskLeftover::Group {
                pgid,
                start_time,
                generation,
                ..
            } => TaskInfo::Group {
                pgid: *pgid,
                start_time: *start_time,
                generation: *generation,
            },
            TaskLeftover::Unit { unit, .. } => TaskInfo::Unit { unit: unit.clone() },
        };
        Ok(StartedTask {
            info,
            adopted: true,
            exit: self.begin(),
        })
    }
}

// ---------------------------------------------------------------- loop devices

/// A recorded loop-device call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeLoopCall {
    /// `attach` with this label.
    Attach(String),
    /// `detach` of this index for this volume.
    Detach(u32, String),
    /// `list`.
    List,
}

/// Loop operations a failure can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeLoopOp {
    /// `attach`.
    Attach,
    /// `detach`.
    Detach,
    /// `list`.
    List,
}

#[derive(Default)]
struct LoopState {
    devices: BTreeMap<u32, (String, PathBuf)>,
    calls: Vec<FakeLoopCall>,
    failures: VecDeque<(FakeLoopOp, String)>,
}

/// A fake set of loop devices.
#[derive(Default)]
pub struct FakeLoopDevices {
    state: Mutex<LoopState>,
}

impl FakeLoopDevices {
    /// No devices bound.
    pub fn new() -> Self {
        FakeLoopDevices::default()
    }

    /// The next call of `op` fails.
    pub fn fail_next(&self, op: FakeLoopOp, message: impl Into<String>) {
        lock(&self.state).failures.push_back((op, message.into()));
    }

    /// Plants a bound device with any label (a leftover or someone else's).
    pub fn plant(&self, index: u32, label: impl Into<String>, image: impl Into<PathBuf>) {
        lock(&self.state)
            .devices
            .insert(index, (label.into(), image.into()));
    }

    /// The calls seen.
    pub fn calls(&self) -> Vec<FakeLoopCall> {
        lock(&self.state).calls.clone()
    }
}

impl LoopDevices for FakeLoopDevices {
    fn attach(&self, request: &LoopAttachRequest) -> Result<LoopAttachment, LoopError> {
        let mut s = lock(&self.state);
        let label = loop_label(&request.volume, request.generation);
        s.calls.push(FakeLoopCall::Attach(label.clone()));
        if let Some(m) = take_failure(&mut s.failures, &FakeLoopOp::Attach) {
            return Err(LoopError::Injected(m));
        }
        let index = (0..).find(|i| !s.devices.contains_key(i)).unwrap_or(0);
        s.devices
            .insert(index, (label.clone(), request.image.clone()));
        Ok(LoopAttachment {
            index,
            device: PathBuf::from(format!("/dev/loop{index}")),
            label,
            backing_file: request.image.clone(),
            size_bytes: 0,
        })
    }

    fn detach(
        &self,
        index: u32,
        volume: &str,
        _timeout: Duration,
    ) -> Result<LoopDetached, LoopError> {
        let mut s = lock(&self.state);
        s.calls
            .push(FakeLoopCall::Detach(index, volume.to_string()));
        if let Some(m) = take_failure(&mut s.failures, &FakeLoopOp::Detach) {
            return Err(LoopError::Injected(m));
        }
        let Some((label, _)) = s.devices.get(&index) else {
            return Ok(LoopDetached::AlreadyFree);
        };
        if label_generation(label, volume).is_none() {
            return Err(LoopError::NotOurs {
                index,
                label: label.clone(),
                volume: volume.to_string(),
            });
        }
        s.devices.remove(&index);
        Ok(LoopDetached::Free)
    }

    fn list(&self) -> Result<Vec<LoopStatus>, LoopError> {
        let mut s = lock(&self.state);
        s.calls.push(FakeLoopCall::List);
        if let Some(m) = take_failure(&mut s.failures, &FakeLoopOp::List) {
            return Err(LoopError::Injected(m));
        }
        Ok(s.devices
            .iter()
            .map(|(i, (label, image))| LoopStatus {
                index: *i,
                device: PathBuf::from(format!("/dev/loop{i}")),
                backing_file: Some(image.clone()),
                label: label.clone(),
                autoclear: true,
                read_only: false,
            })
            .collect())
    }
}

// ---------------------------------------------------------------- recovery

#[derive(Default)]
struct RecoveryState {
    reports: BTreeMap<String, RecoveryReport>,
    calls: Vec<String>,
    failures: VecDeque<((), String)>,
}

/// A fake start-up scan.
#[derive(Default)]
pub struct FakeRecovery {
    state: Mutex<RecoveryState>,
}

impl FakeRecovery {
    /// Finds nothing for any volume.
    pub fn new() -> Self {
        FakeRecovery::default()
    }

    /// The scan of `report.volume` returns `report`.
    pub fn set_report(&self, report: RecoveryReport) {
        lock(&self.state)
            .reports
            .insert(report.volume.clone(), report);
    }

    /// The next scan fails.
    pub fn fail_next(&self, message: impl Into<String>) {
        lock(&self.state).failures.push_back(((), message.into()));
    }

    /// The volumes scanned, in order.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }
}

impl LeftoverScan for FakeRecovery {
    fn scan(
        &self,
        spec: &RecoverySpec,
        _task: Option<&dyn TaskRunner>,
    ) -> Result<RecoveryReport, RecoveryError> {
        let mut s = lock(&self.state);
        s.calls.push(spec.volume.clone());
        if let Some(m) = take_failure(&mut s.failures, &()) {
            return Err(RecoveryError::Injected(m));
        }
        Ok(s.reports
            .get(&spec.volume)
            .cloned()
            .unwrap_or(RecoveryReport {
                volume: spec.volume.clone(),
                ..RecoveryReport::default()
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Filesystem;
    use crate::exec::fsck::FsckMode;

    #[tokio::test]
    async fn fake_fsck_queues_outcomes_and_failures() {
        let f = FakeFsck::new();
        f.push_outcome(FsckOutcome::Refused("bad".to_string()));
        f.fail_next("no checker");
        let req = FsckRequest::new("/dev/loop0", Filesystem::Ext4, FsckMode::Auto);
        assert!(matches!(f.check(&req).await, Err(FsckError::Injected(_))));
        // A failed call does not consume the queued outcome.
        let r = f.check(&req).await.unwrap();
        assert_eq!(r.outcome, FsckOutcome::Refused("bad".to_string()));
        assert_eq!(f.check(&req).await.unwrap().outcome, FsckOutcome::Clean);
        assert_eq!(f.calls().len(), 3);
    }

    #[tokio::test]
    async fn fake_tasks_end_on_term_unless_ignored() {
        let t = FakeTasks::new();
        let started = t.start(Generation(3)).await.unwrap();
        t.set_ignore_term(true);
        t.signal(TaskSignal::Term).await.unwrap();
        assert!(t.is_running());
        t.signal(TaskSignal::Kill).await.unwrap();
        assert_eq!(started.exit.await, ExitStatus::Signal(9));
        assert_eq!(
            t.calls(),
            vec![
                FakeTaskCall::Start(Generation(3)),
                FakeTaskCall::Signal(TaskSignal::Term),
                FakeTaskCall::Signal(TaskSignal::Kill)
            ]
        );
    }

    #[test]
    fn fake_mounter_goes_lazy_only_when_forced() {
        let m = FakeMounter::new();
        let req = MountRequest::new("/dev/loop0", "/srv/v", "ext4", &["noatime"]).unwrap();
        m.mount(&req).unwrap();
        m.set_busy(2);
        assert!(m.unmount(&UnmountRequest::new("/srv/v", false)).is_err());
        let r = m.unmount(&UnmountRequest::new("/srv/v", true)).unwrap();
        assert!(r.lazy);
        assert!(!m.is_mounted(std::path::Path::new("/srv/v")));
    }

    #[test]
    fn fake_loops_refuse_foreign_devices() {
        let l = FakeLoopDevices::new();
        l.plant(0, "/var/lib/other.img", "/var/lib/other.img");
        let a = l
            .attach(&LoopAttachRequest::new("/img", "pg", Generation(5)))
            .unwrap();
        assert_eq!(a.index, 1);
        assert!(l.detach(0, "pg", Duration::from_secs(1)).is_err());
        assert_eq!(
            l.detach(1, "pg", Duration::from_secs(1)).unwrap(),
            LoopDetached::Free
        );
    }
}
