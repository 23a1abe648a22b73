//! The real effect runner: carries out each volume's effects with the executors (NBD or loop attach, fsck, mount, task) and reports completions.
//!
//! One [`VolumeRuntime`] per volume remembers what this node has in place for
//! it (the attached device, the running or adopted task, what start-up
//! recovery found) so that a later effect acts on the right thing: `Detach`
//! detaches the device attached under the current generation *and* any
//! leftover of ours recovery found; `SignalTask` reaches an adopted leftover
//! task too. Blocking calls (netlink, loop ioctls, mount(2)) run on tokio's
//! blocking pool; process waits (fsck, task exit) are async. Every outcome is
//! reported as the core's completion event; a panic in an executor becomes a
//! failed effect, never a crash of the daemon.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::config::{Backend, NbdServer, NodeConfig, VolumeConfig};
use crate::core::{Effect, Event, Generation, TaskSignal};
use crate::exec::{
    self, events, DirCheck, DirMounter, Fsck, FsckRequest, LoopAttachRequest, LoopDevices,
    MountRequest, Mounter, RecoveryReport, StartedTask, TaskRunner, UnmountRequest,
};
use crate::nbd::{AttachRequest, BackendId, BlockDevices, DetachOptions, NbdAddress};

use super::driver::{Completion, EffectRunner, Input};

/// A device this node has attached for a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// `/dev/nbdN`.
    Nbd {
        /// N.
        index: u32,
        /// The device node.
        path: PathBuf,
    },
    /// `/dev/loopN`.
    Loop {
        /// N.
        index: u32,
        /// The device node.
        path: PathBuf,
    },
}

impl Device {
    fn path(&self) -> &PathBuf {
        match self {
            Device::Nbd { path, .. } | Device::Loop { path, .. } => path,
        }
    }
}

/// What this node has in place for one volume.
pub struct VolumeRuntime {
    cfg: VolumeConfig,
    node: NodeConfig,
    /// Devices attached (normally one; leftovers add more).
    devices: Mutex<Vec<Device>>,
    task: Option<Arc<dyn TaskRunner>>,
    mounter: Arc<dyn Mounter>,
}

impl VolumeRuntime {
    /// The runtime of a configured volume; `mounter` is the block mounter (ignored for `dir`).
    pub fn new(
        cfg: VolumeConfig,
        node: NodeConfig,
        task: Option<Arc<dyn TaskRunner>>,
        mounter: Arc<dyn Mounter>,
    ) -> Self {
        let mounter: Arc<dyn Mounter> = match DirCheck::for_volume(&cfg) {
            Some(check) => Arc::new(DirMounter::new(check)),
            None => mounter,
        };
        VolumeRuntime {
            cfg,
            node,
            devices: Mutex::new(Vec::new()),
            task,
            mounter,
        }
    }

    /// The name in device labels: the volume, or `<volume>@<node>` on a shared kernel.
    pub fn label_name(&self) -> String {
        label_name(&self.cfg, &self.node)
    }

    fn devices(&self) -> std::sync::MutexGuard<'_, Vec<Device>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The name a volume's devices are labelled with: the volume, or
/// `<volume>@<node>` when several daemons share the kernel (`node.shared_kernel`).
pub fn label_name(cfg: &VolumeConfig, node: &NodeConfig) -> String {
    if node.shared_kernel {
        format!("{}@{}", cfg.name, node.id)
    } else {
        cfg.name.clone()
    }
}

/// The executors the runner uses; real ones in the daemon, fakes in tests.
#[derive(Clone)]
pub struct Executors {
    /// Kernel NBD.
    pub nbd: Arc<dyn BlockDevices>,
    /// Loop devices.
    pub loops: Arc<dyn LoopDevices>,
    /// Filesystem checks.
    pub fsck: Arc<dyn Fsck>,
}

/// The real [`EffectRunner`].
pub struct RealRunner {
    volumes: BTreeMap<String, Arc<VolumeRuntime>>,
    ex: Executors,
    tx: UnboundedSender<Input>,
}

impl RealRunner {
    /// A runner over these volumes; `tx` carries unsolicited events (task exits) to the driver.
    pub fn new(volumes: Vec<VolumeRuntime>, ex: Executors, tx: UnboundedSender<Input>) -> Self {
        let volumes = volumes
            .into_iter()
            .map(|v| (v.cfg.name.clone(), Arc::new(v)))
            .collect();
        RealRunner { volumes, ex, tx }
    }

    /// Takes over what start-up recovery found for `volume`: its devices (so
    /// `Detach` detaches them) and its task (so `SignalTask` reaches it and its
    /// end is reported). Call before the driver runs.
    pub fn adopt_leftovers(&self, volume: &str, report: &RecoveryReport) {
        // `report.volume` may be the label name (`<volume>@<node>`); `volume` is the config name.
        let Some(v) = self.volumes.get(volume) else {
            return;
        };
        {
            let mut devs = v.devices();
            for d in report.devices.iter().filter(|d| d.ours) {
                let dev = match d.kind {
                    "nbd" => Device::Nbd {
                        index: d.index,
                        path: d.device.clone(),
                    },
                    _ => Device::Loop {
                        index: d.index,
                        path: d.device.clone(),
                    },
                };
                if !devs.contains(&dev) {
                    devs.push(dev);
                }
            }
        }
        if let (Some(left), Some(task)) = (&report.task, &v.task) {
            match task.adopt(left) {
                Ok(started) => self.watch_exit(volume, started),
                Err(e) => {
                    tracing::error!(volume, error = %exec::error_chain(&e), "could not adopt the leftover task")
                }
            }
        }
    }

    fn watch_exit(&self, volume: &str, started: StartedTask) {
        let tx = self.tx.clone();
        let volume: Arc<str> = Arc::from(volume);
        tokio::spawn(async move {
            let status = started.exit.await;
            let _ = tx.send(Input::Done {
                volume,
                event: events::task_exited(status),
            });
        });
    }
}

/// Runs a blocking executor call on the blocking pool; a panic becomes an error message.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| events::join_failure(what, &e))
}

impl EffectRunner for RealRunner {
    fn run(&self, volume: &str, effect: Effect, done: Completion) {
        let Some(v) = self.volumes.get(volume).cloned() else {
            let event = failure_event(&effect, format!("unknown volume {volume}"));
            done.complete(event);
            return;
        };
        let ex = self.ex.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let event = match effect {
                Effect::Attach { generation } => attach(&v, &ex, generation).await,
                Effect::Fsck {
                    generation: _,
                    force,
                } => fsck(&v, &ex, force).await,
                Effect::Mount { generation: _ } => mount(&v).await,
                Effect::StartTask { generation } => start(&v, generation, &tx, done.volume()).await,
                Effect::SignalTask(sig) => signal(&v, sig).await,
                Effect::Unmount { force } => unmount(&v, force).await,
                Effect::Detach => detach(&v, &ex).await,
                Effect::Contend | Effect::Withdraw | Effect::Release { .. } => {
                    Event::TaskSignalled(Err("lease effects are not the runner's".into()))
                }
            };
            done.complete(event);
        });
    }
}

/// The failure completion of an effect that could not even be started.
fn failure_event(effect: &Effect, msg: String) -> Event {
    match effect {
        Effect::Attach { .. } => Event::Attached(Err(msg)),
        Effect::Fsck { .. } => Event::FsckDone(crate::core::FsckOutcome::Refused(msg)),
        Effect::Mount { .. } => Event::Mounted(Err(msg)),
        Effect::StartTask { .. } => Event::TaskStarted(Err(msg)),
        Effect::SignalTask(_) | Effect::Contend | Effect::Withdraw | Effect::Release { .. } => {
            Event::TaskSignalled(Err(msg))
        }
        Effect::Unmount { .. } => Event::Unmounted(Err(msg)),
        Effect::Detach => Event::Detached(Err(msg)),
    }
}

async fn attach(v: &Arc<VolumeRuntime>, ex: &Executors, generation: Generation) -> Event {
    match &v.cfg.backend {
        Backend::Nbd(n) => {
            let backend = match BackendId::new(v.label_name(), generation) {
                Ok(b) => b,
                Err(e) => return Event::Attached(Err(e.to_string())),
            };
            let address = match &n.server {
                NbdServer::Tcp(hp) => NbdAddress::Tcp(hp.to_string()),
                NbdServer::Unix(p) => NbdAddress::Unix(p.clone()),
            };
            let mut req = AttachRequest::new(address, n.export.clone(), backend);
            req.connections = n.connections;
            req.request_timeout = n.timeout;
            req.dead_conn_timeout = n.dead_conn_timeout;
            let nbd = ex.nbd.clone();
            let r = blocking("attach", move || nbd.attach(&req)).await;
            match r {
                Ok(Ok(a)) => {
                    tracing::info!(volume = %v.cfg.name, device = %a.device.display(), generation = generation.0, "attached NBD export");
                    v.devices().push(Device::Nbd {
                        index: a.index,
                        path: a.device,
                    });
                    Event::Attached(Ok(()))
                }
                Ok(Err(e)) => Event::Attached(Err(exec::error_chain(&e))),
                Err(msg) => Event::Attached(Err(msg)),
            }
        }
        Backend::Image { .. } => {
            let Some(mut req) = LoopAttachRequest::for_volume(&v.cfg, generation) else {
                return Event::Attached(Err("not an image volume".into()));
            };
            req.volume = v.label_name();
            let loops = ex.loops.clone();
            match blocking("attach", move || loops.attach(&req)).await {
                Ok(Ok(a)) => {
                    tracing::info!(volume = %v.cfg.name, device = %a.device.display(), generation = generation.0, "attached image");
                    v.devices().push(Device::Loop {
                        index: a.index,
                        path: a.device,
                    });
                    Event::Attached(Ok(()))
                }
                Ok(Err(e)) => Event::Attached(Err(exec::error_chain(&e))),
                Err(msg) => Event::Attached(Err(msg)),
            }
        }
        Backend::Dir { .. } => Event::Attached(Err("a dir volume has nothing to attach".into())),
    }
}

fn current_device(v: &VolumeRuntime) -> Option<PathBuf> {
    v.devices().last().map(|d| d.path().clone())
}

async fn fsck(v: &Arc<VolumeRuntime>, ex: &Executors, force: bool) -> Event {
    let Some(device) = current_device(v) else {
        return Event::FsckDone(crate::core::FsckOutcome::Refused(
            "no device attached to check".into(),
        ));
    };
    let Some(req) = FsckRequest::for_volume(&v.cfg, &v.node, device, force) else {
        return Event::FsckDone(crate::core::FsckOutcome::Clean);
    };
    let r = ex.fsck.check(&req).await;
    if let Ok(report) = &r {
        tracing::info!(volume = %v.cfg.name, "fsck: {}", report.summary());
    }
    events::fsck_done(&r)
}

async fn mount(v: &Arc<VolumeRuntime>) -> Event {
    let req = match &v.cfg.backend {
        Backend::Dir { path } => MountRequest {
            device: path.clone(),
            mount_point: v.cfg.mount_path.clone(),
            fstype: String::new(),
            options: Default::default(),
        },
        Backend::Nbd(_) | Backend::Image { .. } => {
            let Some(device) = current_device(v) else {
                return Event::Mounted(Err("no device attached to mount".into()));
            };
            match MountRequest::for_volume(&v.cfg, device) {
                Ok(r) => r,
                Err(e) => return Event::Mounted(Err(exec::error_chain(&e))),
            }
        }
    };
    let m = v.mounter.clone();
    match blocking("mount", move || m.mount(&req)).await {
        Ok(r) => events::mounted(&r),
        Err(msg) => Event::Mounted(Err(msg)),
    }
}

async fn start(
    v: &Arc<VolumeRuntime>,
    generation: Generation,
    tx: &UnboundedSender<Input>,
    volume: &str,
) -> Event {
    let Some(task) = v.task.clone() else {
        return Event::TaskStarted(Err("no task configured".into()));
    };
    match task.start(generation).await {
        Ok(started) => {
            tracing::info!(volume, info = ?started.info, generation = generation.0, "task started");
            let tx = tx.clone();
            let name: Arc<str> = Arc::from(volume);
            tokio::spawn(async move {
                let status = started.exit.await;
                let _ = tx.send(Input::Done {
                    volume: name,
                    event: events::task_exited(status),
                });
            });
            Event::TaskStarted(Ok(()))
        }
        Err(e) => Event::TaskStarted(Err(exec::error_chain(&e))),
    }
}

async fn signal(v: &Arc<VolumeRuntime>, sig: TaskSignal) -> Event {
    match v.task.clone() {
        None => Event::TaskSignalled(Err("no task configured".into())),
        Some(task) => events::task_signalled(&task.signal(sig).await),
    }
}

async fn unmount(v: &Arc<VolumeRuntime>, force: bool) -> Event {
    let budget = v
        .cfg
        .policy
        .timings
        .unmount_budget
        .max(Duration::from_millis(500));
    let req = UnmountRequest::within_budget(v.cfg.mount_path.clone(), force, budget);
    let m = v.mounter.clone();
    match blocking("unmount", move || m.unmount(&req)).await {
        Ok(Ok(report)) => {
            tracing::info!(volume = %v.cfg.name, "unmount: {}", report.summary());
            Event::Unmounted(Ok(()))
        }
        Ok(Err(e)) => Event::Unmounted(Err(exec::error_chain(&e))),
        Err(msg) => Event::Unmounted(Err(msg)),
    }
}

/// Detaches every device of the volume (the current one and any leftovers), newest first.
async fn detach(v: &Arc<VolumeRuntime>, ex: &Executors) -> Event {
    let devices: Vec<Device> = v.devices().clone();
    let timeout = v
        .cfg
        .policy
        .timings
        .detach_budget
        .max(Duration::from_secs(1));
    for d in devices.into_iter().rev() {
        let name = v.label_name();
        let r = match d.clone() {
            Device::Nbd { index, .. } => {
                let nbd = ex.nbd.clone();
                let opts = DetachOptions {
                    timeout,
                    ..DetachOptions::safe()
                };
                blocking("detach", move || {
                    nbd.detach(index, &opts)
                        .map(|_| ())
                        .map_err(|e| exec::error_chain(&e))
                })
                .await
            }
            Device::Loop { index, .. } => {
                let loops = ex.loops.clone();
                blocking("detach", move || {
                    loops
                        .detach(index, &name, timeout)
                        .map(|_| ())
                        .map_err(|e| exec::error_chain(&e))
                })
                .await
            }
        };
        match r {
            Ok(Ok(())) => v.devices().retain(|x| x != &d),
            Ok(Err(msg)) | Err(msg) => {
                return Event::Detached(Err(format!("{}: {msg}", d.path().display())))
            }
        }
    }
    Event::Detached(Ok(()))
}
