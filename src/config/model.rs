//! The validated config: plain values with every default filled in, and each volume's core policy.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::core::policy::{FenceBudget, FsckPolicy, RestartMode, RestartPolicy, VolumePolicy};

/// A whole, validated config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The file name it was read from (as given to [`super::load`] / [`super::parse`]).
    pub file: String,
    /// `[node]`: this node's identity and local directories.
    pub node: NodeConfig,
    /// `[zookeeper]`: the ensemble holding the leases.
    pub zookeeper: ZooKeeperConfig,
    /// `[watchdog]`: the backstop that reboots a stuck holder.
    pub watchdog: WatchdogConfig,
    /// `[fencing]`: fencing defaults for all volumes (each volume may override them).
    pub fencing: FencingConfig,
    /// `[control]`: the local control socket.
    pub control: ControlConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[mesos]`: dvdcli and the Mesos hooks.
    pub mesos: MesosConfig,
    /// `[volumes.NAME]`, sorted by name.
    pub volumes: Vec<VolumeConfig>,
}

impl Config {
    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// `[node]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeConfig {
    /// This node's id in the lease (ZooKeeper lock nodes, status).
    pub id: String,
    /// Whether `id` was taken from the host name because the file did not set it.
    pub id_from_hostname: bool,
    /// Persistent local state (clean-release records, …).
    pub state_dir: PathBuf,
    /// Run-time files (pid files, sockets).
    pub run_dir: PathBuf,
    /// Several daemons share this kernel (test labs: nodes in namespaces or one VM).
    /// Device labels then carry the node (`<volume>@<node>`) and start-up recovery
    /// claims only this node's devices. Off in production: there every device
    /// labelled with the volume is this node's to fence, whatever node id made it.
    pub shared_kernel: bool,
}

/// `[control]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ControlConfig {
    /// The daemon's unix socket (mode 0600, root only); default `<run_dir>/control.sock`.
    pub socket: PathBuf,
}

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MetricsConfig {
    /// Loopback address serving `/metrics` and `/healthz`; `None` when `listen = "off"`.
    pub listen: Option<std::net::SocketAddr>,
    /// Whether the file set `listen` (a failure to bind an explicit address stops
    /// the daemon; the default address is given up with an error in the log).
    pub explicit: bool,
}

/// `[mesos]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MesosConfig {
    /// How long `dvdcli mount` and the prepare hook wait for the lease (below Mesos' 120 s kill).
    #[serde(with = "dur")]
    pub acquire_wait: std::time::Duration,
    /// Task label listing the volumes a container needs (comma-separated).
    pub label_key: String,
    /// `dvdcli_references = "per-mount"` (true: every `dvdcli mount` adds a
    /// reference, every unmount drops one) or `"per-volume"` (false: mount is
    /// idempotent, unmount releases; Mesos' docker/volume isolator calls mount
    /// for every container but unmount only after the last one).
    pub dvdcli_counted: bool,
}

/// When a volume contends for its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    /// From daemon start (the volume's own `[task]` runs on the holder).
    Always,
    /// Only while something holds a reference: `dvdcli mount` or a Mesos
    /// container (prepare hook). References are recorded durably in
    /// `state_dir` before acting.
    OnDemand,
}

/// A `host:port` pair (IPv6 hosts are written in brackets).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port, 1..=65535.
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `[zookeeper]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ZooKeeperConfig {
    /// The ensemble's client addresses.
    pub hosts: Vec<HostPort>,
    /// Absolute ZooKeeper path all of nbd-failover's nodes live under.
    pub chroot: String,
    /// Requested session timeout `T` (the server may negotiate it down).
    #[serde(with = "dur")]
    pub session_timeout: Duration,
    /// How long to wait for a connection to the ensemble.
    #[serde(with = "dur")]
    pub connect_timeout: Duration,
    /// `[zookeeper.auth]`, if any.
    pub auth: Option<ZooKeeperAuth>,
    /// `[zookeeper.tls]` when `enabled = true`; `None` for plain TCP.
    pub tls: Option<ZooKeeperTls>,
}

impl ZooKeeperConfig {
    /// The ZooKeeper connect string: `h1:2181,h2:2181/chroot`.
    pub fn connect_string(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
        let chroot = if self.chroot == "/" {
            ""
        } else {
            self.chroot.as_str()
        };
        format!("{}{}", hosts.join(","), chroot)
    }
}

/// `[zookeeper.auth]`: digest authentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ZooKeeperAuth {
    /// The auth scheme; only `digest`.
    pub scheme: String,
    /// File holding `user:password` for normal operation.
    pub credentials_file: PathBuf,
    /// File holding `user:password` for forced operations (forced detach, lease break).
    pub admin_credentials_file: Option<PathBuf>,
}

/// `[zookeeper.tls]` with `enabled = true`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ZooKeeperTls {
    /// CA certificate(s) to verify the servers with.
    pub ca_file: PathBuf,
    /// This client's certificate.
    pub cert_file: PathBuf,
    /// This client's private key.
    pub key_file: PathBuf,
}

/// `[watchdog]`: what reboots a holder that is too stuck to fence itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum WatchdogConfig {
    /// No watchdog.
    Off,
    /// systemd's watchdog: `sd_notify(WATCHDOG=1)`, `WatchdogSec=` in the unit.
    Systemd {
        /// Must equal the unit's `WatchdogSec=`.
        #[serde(with = "dur")]
        timeout: Duration,
    },
    /// A watchdog device such as `/dev/watchdog` (`softdog`).
    Device {
        /// The device path.
        device: PathBuf,
        /// The timeout set on the device (whole seconds).
        #[serde(with = "dur")]
        timeout: Duration,
    },
}

impl WatchdogConfig {
    /// The timeout, `None` when off.
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            WatchdogConfig::Off => None,
            WatchdogConfig::Systemd { timeout } | WatchdogConfig::Device { timeout, .. } => {
                Some(*timeout)
            }
        }
    }

    /// `off`, `systemd` or `device`.
    pub fn mode(&self) -> &'static str {
        match self {
            WatchdogConfig::Off => "off",
            WatchdogConfig::Systemd { .. } => "systemd",
            WatchdogConfig::Device { .. } => "device",
        }
    }
}

/// The fencing timings (`[fencing]`, or one volume's effective values).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FencingConfig {
    /// How long a disconnected holder waits for ZooKeeper to come back before fencing.
    #[serde(with = "dur")]
    pub suspend_grace: Duration,
    /// SIGTERM → SIGKILL of the task's process group.
    #[serde(with = "dur")]
    pub stop_grace: Duration,
    /// Time budgeted for the unmount.
    #[serde(with = "dur")]
    pub unmount_budget: Duration,
    /// Time budgeted for detaching the device.
    #[serde(with = "dur")]
    pub detach_budget: Duration,
    /// Kept between the fence deadline and the session timeout.
    #[serde(with = "dur")]
    pub margin: Duration,
    /// Wait before attaching after an unclean end of the previous holder.
    #[serde(with = "dur")]
    pub lock_delay: Duration,
    /// First back-off after an attach, fsck or mount failure (doubles per failure).
    #[serde(with = "dur")]
    pub backoff_initial: Duration,
    /// Upper bound of that back-off.
    #[serde(with = "dur")]
    pub backoff_max: Duration,
    /// How long a node stays out of contention after handing over a crash-looping task.
    #[serde(with = "dur")]
    pub handover_backoff: Duration,
}

/// The fencing keys, in the order the report prints them.
pub const FENCING_KEYS: [&str; 9] = [
    "suspend_grace",
    "stop_grace",
    "unmount_budget",
    "detach_budget",
    "margin",
    "lock_delay",
    "backoff_initial",
    "backoff_max",
    "handover_backoff",
];

impl FencingConfig {
    /// The value of one of [`FENCING_KEYS`].
    pub fn get(&self, key: &str) -> Option<Duration> {
        Some(match key {
            "suspend_grace" => self.suspend_grace,
            "stop_grace" => self.stop_grace,
            "unmount_budget" => self.unmount_budget,
            "detach_budget" => self.detach_budget,
            "margin" => self.margin,
            "lock_delay" => self.lock_delay,
            "backoff_initial" => self.backoff_initial,
            "backoff_max" => self.backoff_max,
            "handover_backoff" => self.handover_backoff,
            _ => return None,
        })
    }

    pub(crate) fn set(&mut self, key: &str, d: Duration) {
        let slot = match key {
            "suspend_grace" => &mut self.suspend_grace,
            "stop_grace" => &mut self.stop_grace,
            "unmount_budget" => &mut self.unmount_budget,
            "detach_budget" => &mut self.detach_budget,
            "margin" => &mut self.margin,
            "lock_delay" => &mut self.lock_delay,
            "backoff_initial" => &mut self.backoff_initial,
            "backoff_max" => &mut self.backoff_max,
            "handover_backoff" => &mut self.handover_backoff,
            _ => return,
        };
        *slot = d;
    }
}

impl Default for FencingConfig {
    /// The defaults are the core's [`crate::core::policy::Timings::default`].
    fn default() -> Self {
        let t = crate::core::policy::Timings::default();
        FencingConfig {
            suspend_grace: t.suspend_grace,
            stop_grace: t.stop_grace,
            unmount_budget: t.unmount_budget,
            detach_budget: t.detach_budget,
            margin: t.margin,
            lock_delay: t.lock_delay,
            backoff_initial: t.backoff_initial,
            backoff_max: t.backoff_max,
            handover_backoff: t.handover_backoff,
        }
    }
}

/// `[volumes.NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeConfig {
    /// The volume's name (the table key).
    pub name: String,
    /// Where the data comes from.
    pub backend: Backend,
    /// Where it is mounted (the same path on every node); normalized.
    pub mount_path: PathBuf,
    /// The filesystem on the device; `None` for `dir` volumes.
    pub filesystem: Option<Filesystem>,
    /// Extra mount options.
    pub mount_options: Vec<String>,
    /// fsck before mounting.
    #[serde(serialize_with = "ser_fsck")]
    pub fsck: FsckPolicy,
    /// Effective fencing timings (`[fencing]` with this volume's overrides applied).
    pub fencing: FencingConfig,
    /// The fencing keys this volume sets itself.
    pub fencing_overrides: Vec<String>,
    /// The task run on the holder; `None` when the mount is handed to a scheduler.
    pub task: Option<TaskConfig>,
    /// Task restart policy.
    #[serde(serialize_with = "ser_restart")]
    pub restart: RestartPolicy,
    /// `always` (contend from start) or `on-demand` (while referenced).
    pub activation: Activation,
    /// What the core decides with (timings from `[zookeeper]`, `[watchdog]` and fencing).
    #[serde(skip)]
    pub policy: VolumePolicy,
}

impl VolumeConfig {
    /// The core policy for this volume's state machine.
    pub fn policy(&self) -> &VolumePolicy {
        &self.policy
    }

    /// The fencing budget (see [`crate::core::policy::Timings::fence_budget`]).
    pub fn budget(&self) -> FenceBudget {
        self.policy.timings.fence_budget()
    }
}

/// Where a volume's data comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum Backend {
    /// An NBD export attached to `/dev/nbdN`.
    Nbd(NbdConfig),
    /// An image file on a shared filesystem, attached through a loop device.
    Image {
        /// The image file.
        path: PathBuf,
    },
    /// A directory on a shared filesystem (NFS, GlusterFS): nothing to attach.
    Dir {
        /// The directory.
        path: PathBuf,
    },
}

impl Backend {
    /// `nbd`, `image` or `dir`.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Nbd(_) => "nbd",
            Backend::Image { .. } => "image",
            Backend::Dir { .. } => "dir",
        }
    }
}

/// `[volumes.NAME.nbd]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NbdConfig {
    /// The NBD server.
    pub server: NbdServer,
    /// The export name.
    pub export: String,
    /// Kernel request timeout (`NBD_ATTR_TIMEOUT`).
    #[serde(with = "dur")]
    pub timeout: Duration,
    /// How long the kernel waits for a reconnect (`NBD_ATTR_DEAD_CONN_TIMEOUT`).
    #[serde(with = "dur")]
    pub dead_conn_timeout: Duration,
    /// Number of connections, 1..=16.
    pub connections: u32,
}

/// An NBD server address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NbdServer {
    /// TCP `host:port`.
    Tcp(HostPort),
    /// A Unix socket (`unix:/path`).
    Unix(PathBuf),
}

impl fmt::Display for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdServer::Tcp(hp) => write!(f, "{hp}"),
            NbdServer::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for NbdServer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Filesystems a block-device volume may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    /// ext2.
    Ext2,
    /// ext3.
    Ext3,
    /// ext4.
    Ext4,
    /// XFS.
    Xfs,
}

impl Filesystem {
    /// The name `mount -t` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext2 => "ext2",
            Filesystem::Ext3 => "ext3",
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }
}

/// `[volumes.NAME.task]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskConfig {
    /// What to run.
    pub run: TaskRun,
    /// User to run an `exec` task as.
    pub user: Option<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
}

/// A task: a command or a systemd unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskRun {
    /// A command line; `[0]` is an absolute path.
    Exec(Vec<String>),
    /// A systemd unit started and stopped with the lease.
    SystemdUnit(String),
}

pub(crate) fn fsck_name(p: FsckPolicy) -> &'static str {
    match p {
        FsckPolicy::Auto => "auto",
        FsckPolicy::Force => "force",
        FsckPolicy::Never => "never",
    }
}

pub(crate) fn restart_name(m: RestartMode) -> &'static str {
    match m {
        RestartMode::Always => "always",
        RestartMode::OnFailure => "on-failure",
        RestartMode::Never => "never",
    }
}

fn ser_fsck<S: serde::Serializer>(p: &FsckPolicy, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(fsck_name(*p))
}

fn ser_restart<S: serde::Serializer>(r: &RestartPolicy, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("RestartPolicy", 3)?;
    st.serialize_field("policy", restart_name(r.mode))?;
    st.serialize_field("max_restarts", &r.max_restarts)?;
    st.serialize_field("backoff", &fmt_config_duration(r.backoff))?;
    st.end()
}

/// A duration as the config file would write it, and humantime parses back: `3s`, `1s 500ms`.
pub fn fmt_config_duration(d: Duration) -> String {
    if d.is_zero() {
        "0s".to_string()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Serializes a `Duration` as a humantime string.
mod dur {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::fmt_config_duration(*d))
    }
}
