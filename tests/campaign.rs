//! The seeded fault campaign: three real daemons, one volume, the record writer as the task, and a random (seeded, replayable) schedule of partitions, kills, pauses and server restarts; writes a JSON-lines history and a verdict.
//!
//! Run it with `scripts/campaign.sh` (which builds this target and passes the
//! settings through the environment); by hand:
//!
//! ```text
//! CAMPAIGN_SEED=7 CAMPAIGN_FAULTS=50 CAMPAIGN_SECONDS=150 CAMPAIGN_OUT=/tmp/c \
//!   cargo test --release --test campaign -- --ignored --nocapture
//! ```
//!
//! Topology. A hub network namespace holds ZooKeeper (and, with
//! `E2E_BACKEND=nbd`, `qemu-nbd` exporting the image). Each node has its own
//! veth link to the hub for ZooKeeper (10.231.i.0/24) and, for `nbd`, a second
//! one for storage (10.232.i.0/24), so a fault on one path of one node touches
//! nothing else. With the `image` backend (host mode) every daemon runs in its
//! own network namespace (`nsenter --net`, so mounts stay in the host's mount
//! namespace, as on a real machine). With `nbd` (VM mode) the daemons run in
//! the initial network namespace, because the kernel registers the nbd
//! generic-netlink family only there; each still reaches the servers only over
//! its own links, by address.
//!
//! Faults. Both-way partitions (link down), one-way drops (a blackhole route on
//! the sending side: node→server or server→node), kill -9 of a daemon
//! (restarted after a short down time, as systemd's `Restart=` would), SIGSTOP
//! of a daemon for up to 2 T (past the watchdog's 2 s the watchdog acts, see
//! below), ZooKeeper restarts (kill -9, same data dir) and freezes (SIGSTOP),
//! and with `nbd` the storage path faults and `qemu-nbd` restarts. With the
//! `image` backend there is no storage network (the loop device reads a local
//! file), so there are no storage faults.
//!
//! Watchdog (`CAMPAIGN_WATCHDOG`, default `device` with `nbd`, `systemd` with
//! `image`). `systemd`: this harness plays systemd and kills a daemon that
//! stops sending `WATCHDOG=1` for `WatchdogSec`, then restarts it. `device`:
//! each daemon pets a watchdog "device", a FIFO in its node directory; this
//! harness plays the kernel's watchdog core ([`DevWd`]) and, when one expires,
//! resets that node ([`node_reset`]: everything of the node killed, its NBD
//! devices disconnected, its mount lazily detached, its loop devices cleared,
//! then a short "reboot"), since nodes sharing one kernel cannot really be
//! reset.
//!
//! Observation, every 20 ms: the devices bound to the image, from the kernel's
//! side (loop `backing_file`, nbd `pid`/`backend` in sysfs) — two at once is an
//! overlap; every acknowledged record (tailing the writers' ack logs: who wrote
//! under which generation, when); every phase change and warning in the
//! daemons' logs. At the end: all faults healed, the cluster must serve again,
//! every daemon is stopped with SIGTERM, the records checker runs over the
//! volume's log and the ack logs, and `e2fsck -fn` over the image.
//!
//! Marked `#[ignore]` so `cargo test --all-targets` does not run it twice;
//! `scripts/campaign.sh` runs it with `--ignored`.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_failover::core::rng::Rng;
use nbd_failover::exec::loopdev::{self, KernelLoop, LoopDevices};
use nbd_failover::nbd::{BackendId, BlockDevices, DetachMode, DetachOptions, KernelNbd};
use nbd_failover::testkit::records::{self, Record};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use support::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_nbd-failover");
/// The daemons' ZooKeeper session timeout, seconds (`T`).
const T: f64 = 4.0;
/// systemd's `WatchdogSec` as this harness plays it, and the device watchdog's timeout.
const WATCHDOG: f64 = 2.0;
/// How long a node the device watchdog reset stays down ("reboot"), at least.
const REBOOT: f64 = 1.0;
/// The volume's name in the daemons' configs.
const VOLUME: &str = "data";
/// systemd's `RestartSec` after a daemon exits or the watchdog kills it.
const RESTART_SEC: f64 = 0.3;
/// Observation period.
const TICK: Duration = Duration::from_millis(20);
/// Two acknowledgements further apart than this are an outage (the writer acks every ~10 ms).
const SERVED_GAP: f64 = 0.5;
const NODES: usize = 3;

/// Settings from the environment.
#[derive(Clone, Debug)]
struct Settings {
    seed: u64,
    faults: usize,
    seconds: f64,
    out: PathBuf,
    nbd: bool,
    /// Which watchdog the daemons run with (`CAMPAIGN_WATCHDOG`).
    watchdog: WdMode,
}

/// The daemons' watchdog: systemd's (this harness plays systemd), or a watchdog
/// device (a FIFO per node; this harness plays the kernel's watchdog core and
/// resets the node when it expires).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WdMode {
    Systemd,
    Device,
}

impl WdMode {
    fn name(self) -> &'static str {
        match self {
            WdMode::Systemd => "systemd",
            WdMode::Device => "device",
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        _ => default,
    }
}

impl Settings {
    /// The command that replays this run.
    fn replay(&self) -> String {
        format!(
            "scripts/campaign.sh --seed {} --faults {} --duration {} --mode {} --watchdog {}",
            self.seed,
            self.faults,
            self.seconds,
            if self.nbd { "vm" } else { "host" },
            self.watchdog.name()
        )
    }

    fn from_env() -> Settings {
        let seed = env_or("CAMPAIGN_SEED", {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock");
            t.as_secs() ^ u64::from(t.subsec_nanos())
        });
        let nbd = match std::env::var("E2E_BACKEND").as_deref() {
            Ok("nbd") => true,
            Ok("image") | Ok("") | Err(_) => false,
            Ok(other) => panic!("E2E_BACKEND={other:?}: use image or nbd"),
        };
        // Default: the device watchdog with kernel NBD (VM mode), systemd's on
        // the host, so both of the daemon's watchdog paths stay covered.
        let watchdog = match std::env::var("CAMPAIGN_WATCHDOG").as_deref() {
            Ok("device") => WdMode::Device,
            Ok("systemd") => WdMode::Systemd,
            Ok("") | Err(_) if nbd => WdMode::Device,
            Ok("") | Err(_) => WdMode::Systemd,
            Ok(other) => panic!("CAMPAIGN_WATCHDOG={other:?}: use device or systemd"),
        };
        Settings {
            seed,
            faults: env_or("CAMPAIGN_FAULTS", 50),
            seconds: env_or("CAMPAIGN_SECONDS", 150.0),
            out: PathBuf::from(env_or("CAMPAIGN_OUT", format!("/tmp/nbd-campaign-{seed}"))),
            nbd,
            watchdog,
        }
    }
}

// ---------------------------------------------------------------- the schedule

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Node's ZooKeeper link down (both ways).
    ZkCut,
    /// Node → ZooKeeper packets dropped.
    ZkDropOut,
    /// ZooKeeper → node packets dropped.
    ZkDropIn,
    /// Node's storage link down (nbd only).
    NbdCut,
    /// Node → NBD server dropped.
    NbdDropOut,
    /// NBD server → node dropped.
    NbdDropIn,
    /// kill -9 of the daemon; restarted after the fault's duration.
    Kill9,
    /// SIGSTOP of the daemon; SIGCONT after the duration (if the watchdog has not killed it).
    Pause,
    /// kill -9 of ZooKeeper; restarted after the duration.
    ZkRestart,
    /// SIGSTOP of ZooKeeper for the duration.
    ZkFreeze,
    /// kill -9 of qemu-nbd; restarted after the duration (nbd only).
    NbdRestart,
}

/// Faults of one class on one target do not overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    ZkPath,
    NbdPath,
    Process,
    ZkServer,
    NbdServer,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::ZkCut => "zk-cut",
            Kind::ZkDropOut => "zk-drop-out",
            Kind::ZkDropIn => "zk-drop-in",
            Kind::NbdCut => "nbd-cut",
            Kind::NbdDropOut => "nbd-drop-out",
            Kind::NbdDropIn => "nbd-drop-in",
            Kind::Kill9 => "kill-9",
            Kind::Pause => "pause",
            Kind::ZkRestart => "zk-restart",
            Kind::ZkFreeze => "zk-freeze",
            Kind::NbdRestart => "nbd-restart",
        }
    }

    fn class(self) -> Class {
        match self {
            Kind::ZkCut | Kind::ZkDropOut | Kind::ZkDropIn => Class::ZkPath,
            Kind::NbdCut | Kind::NbdDropOut | Kind::NbdDropIn => Class::NbdPath,
            Kind::Kill9 | Kind::Pause => Class::Process,
            Kind::ZkRestart | Kind::ZkFreeze => Class::ZkServer,
            Kind::NbdRestart => Class::NbdServer,
        }
    }

    fn per_node(self) -> bool {
        !matches!(self.class(), Class::ZkServer | Class::NbdServer)
    }

    /// (weight, shortest, longest duration in seconds).
    fn shape(self) -> (u64, f64, f64) {
        match self {
            Kind::ZkCut => (3, 0.5, 2.5 * T),
            Kind::ZkDropOut | Kind::ZkDropIn => (2, 0.5, 2.5 * T),
            Kind::NbdCut => (2, 0.5, 2.5 * T),
            Kind::NbdDropOut | Kind::NbdDropIn => (1, 0.5, 2.5 * T),
            // Down time before systemd restarts it: bounded, the design relies on a prompt restart.
            Kind::Kill9 => (3, 0.1, 1.5),
            // Up to 2 T: past WatchdogSec the watchdog kills it.
            Kind::Pause => (2, 0.2, 2.0 * T),
            Kind::ZkRestart => (1, 0.0, 3.0),
            Kind::ZkFreeze => (1, 0.5, 1.5 * T),
            Kind::NbdRestart => (1, 0.0, 3.0),
        }
    }
}

/// Whom a per-node fault hits: the node serving at that moment, or a fixed one.
#[derive(Clone, Copy, Debug)]
enum Target {
    Holder,
    Node(usize),
    Cluster,
}

#[derive(Clone, Debug)]
struct Planned {
    /// Seconds after the first acknowledged record.
    at: f64,
    kind: Kind,
    target: Target,
    /// Seconds the fault lasts.
    dur: f64,
}

fn uniform(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    let ms = rng.range((lo * 1000.0) as u64, (hi * 1000.0).max(lo * 1000.0) as u64);
    ms as f64 / 1000.0
}

/// The schedule: fully determined by the seed, the bounds and the backend.
fn plan(s: &Settings) -> Vec<Planned> {
    let mut rng = Rng::new(s.seed);
    let mut kinds = vec![
        Kind::ZkCut,
        Kind::ZkDropOut,
        Kind::ZkDropIn,
        Kind::Kill9,
        Kind::Pause,
        Kind::ZkRestart,
        Kind::ZkFreeze,
    ];
    if s.nbd {
        kinds.extend([
            Kind::NbdCut,
            Kind::NbdDropOut,
            Kind::NbdDropIn,
            Kind::NbdRestart,
        ]);
    }
    let total: u64 = kinds.iter().map(|k| k.shape().0).sum();
    let mean_gap = (s.seconds / s.faults.max(1) as f64).max(0.2);
    let mut out = Vec::new();
    let mut t = 1.0;
    while out.len() < s.faults {
        t += uniform(&mut rng, 0.1, 2.0 * mean_gap - 0.1);
        if t > s.seconds {
            break;
        }
        let mut pick = rng.below(total);
        let mut kind = kinds[0];
        for k in &kinds {
            let w = k.shape().0;
            if pick < w {
                kind = *k;
                break;
            }
            pick -= w;
        }
        let target = if !kind.per_node() {
            Target::Cluster
        } else if rng.chance(0.6) {
            Target::Holder
        } else {
            Target::Node(rng.below(NODES as u64) as usize)
        };
        let (_, lo, hi) = kind.shape();
        out.push(Planned {
            at: t,
            kind,
            target,
            dur: uniform(&mut rng, lo, hi),
        });
    }
    out
}

// ---------------------------------------------------------------- processes and network

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip` that may fail (healing something already healed).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Names of the namespaces and links.
struct Net {
    prefix: String,
    nbd: bool,
}

impl Net {
    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }
    /// The node's namespace (image mode only).
    fn node_ns(&self, i: usize) -> Option<String> {
        (!self.nbd).then(|| format!("{}-n{}", self.prefix, i + 1))
    }
    /// `-n NS` for the node's side, or nothing (initial namespace).
    fn node_args(&self, i: usize) -> Vec<String> {
        match self.node_ns(i) {
            Some(ns) => vec!["-n".into(), ns],
            None => vec![],
        }
    }
    fn node_link(&self, i: usize, path: char) -> String {
        format!("{}{path}{}n", self.prefix, i + 1)
    }
    fn hub_link(&self, i: usize, path: char) -> String {
        format!("{}{path}{}h", self.prefix, i + 1)
    }
    /// (server side, node side) addresses of node `i`'s link for `path` ('z' or 's').
    fn addrs(&self, i: usize, path: char) -> (String, String) {
        let net = if path == 'z' { 231 } else { 232 };
        (
            format!("10.{net}.{}.1", i + 1),
            format!("10.{net}.{}.2", i + 1),
        )
    }

    fn create(&self) {
        ip(&["netns", "add", &self.hub()]);
        ip(&["-n", &self.hub(), "link", "set", "lo", "up"]);
        for i in 0..NODES {
            if let Some(ns) = self.node_ns(i) {
                ip(&["netns", "add", &ns]);
                ip(&["-n", &ns, "link", "set", "lo", "up"]);
            }
            let paths: &[char] = if self.nbd { &['z', 's'] } else { &['z'] };
            for &p in paths {
                let (srv, node) = self.addrs(i, p);
                let (nl, hl) = (self.node_link(i, p), self.hub_link(i, p));
                let mut add = vec!["link", "add", &nl];
                let ns = self.node_ns(i);
                if let Some(ns) = &ns {
                    add.extend(["netns", ns.as_str()]);
                }
                add.extend(["type", "veth", "peer", "name", &hl]);
                let hub = self.hub();
                add.extend(["netns", hub.as_str()]);
                ip(&add);
                let na = self.node_args(i);
                let na: Vec<&str> = na.iter().map(String::as_str).collect();
                let node_cidr = format!("{node}/24");
                ip(&[&na[..], &["addr", "add", &node_cidr, "dev", &nl]].concat());
                ip(&[&na[..], &["link", "set", &nl, "up"]].concat());
                let srv_cidr = format!("{srv}/24");
                ip(&["-n", &hub, "addr", "add", &srv_cidr, "dev", &hl]);
                ip(&["-n", &hub, "link", "set", &hl, "up"]);
            }
        }
    }

    fn delete(&self) {
        if self.nbd {
            for i in 0..NODES {
                for p in ['z', 's'] {
                    ip_quiet(&["link", "del", &self.node_link(i, p)]);
                }
            }
        }
        ip_quiet(&["netns", "del", &self.hub()]);
        for i in 0..NODES {
            if let Some(ns) = self.node_ns(i) {
                ip_quiet(&["netns", "del", &ns]);
            }
        }
    }

    /// Link of node `i` for `path` down (`up = false`) or up.
    fn link(&self, i: usize, path: char, up: bool) {
        let na = self.node_args(i);
        let na: Vec<&str> = na.iter().map(String::as_str).collect();
        let l = self.node_link(i, path);
        ip_quiet(
            &[
                &na[..],
                &["link", "set", &l, if up { "up" } else { "down" }],
            ]
            .concat(),
        );
    }

    /// Drops node → server (`out`) or server → node packets on `path`, or stops dropping.
    fn drop(&self, i: usize, path: char, out: bool, on: bool) {
        let (srv, node) = self.addrs(i, path);
        let verb = if on { "add" } else { "del" };
        if out {
            let na = self.node_args(i);
            let na: Vec<&str> = na.iter().map(String::as_str).collect();
            let dst = format!("{srv}/32");
            ip_quiet(&[&na[..], &["route", verb, "blackhole", &dst]].concat());
        } else {
            let dst = format!("{node}/32");
            ip_quiet(&["-n", &self.hub(), "route", verb, "blackhole", &dst]);
        }
    }
}

fn zk_classpath() -> String {
    let mut cp = format!("{}:{}", support::zk::ZK_CONF, support::zk::ZK_JAR);
    if Path::new(support::zk::SLF4J_SIMPLE).exists() {
        cp.push(':');
        cp.push_str(support::zk::SLF4J_SIMPLE);
    }
    cp
}

/// A command in the hub's network namespace. `nsenter --net`, not `ip netns
/// exec`: the latter also gives the process a new mount namespace, a copy of
/// the host's mounts at that moment, and a server restarted while a node has
/// the volume mounted would pin that filesystem (with private propagation the
/// node's unmount does not reach the copy, so the loop device cannot be freed).
fn in_hub(net: &Net, prog: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", net.hub()))
        .arg("--")
        .arg(prog);
    c
}

/// Appending log file for a child.
fn log_file(p: &Path) -> (Stdio, Stdio) {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .expect("log file");
    (Stdio::from(f.try_clone().expect("log fd")), Stdio::from(f))
}

#[allow(clippy::zombie_processes)] // the World reaps every child it holds
fn spawn_zk(net: &Net, dir: &Path) -> Child {
    let cfg = dir.join("zoo.cfg");
    if !cfg.exists() {
        let data = dir.join("zk-data");
        fs::create_dir_all(&data).expect("zk data");
        fs::write(
            &cfg,
            format!(
                "tickTime=500\ndataDir={}\nclientPort=2181\nclientPortAddress=0.0.0.0\n\
                 admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr\n\
                 minSessionTimeout=1000\nmaxSessionTimeout=60000\nmaxClientCnxns=0\n",
                data.display()
            ),
        )
        .expect("zoo.cfg");
    }
    let (o, e) = log_file(&dir.join("zk.log"));
    in_hub(net, "java")
        .args([
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Xmx256m",
            "-Dzookeeper.admin.enableServer=false",
            "-cp",
            &zk_classpath(),
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
        ])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(o)
        .stderr(e)
        .spawn()
        .expect("start ZooKeeper in the hub namespace")
}

#[allow(clippy::zombie_processes)] // the World reaps every child it holds
fn spawn_qemu_nbd(net: &Net, image: &Path, dir: &Path) -> Child {
    let (o, e) = log_file(&dir.join("qemu-nbd.log"));
    in_hub(net, "qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "data",
            "-b",
            "0.0.0.0",
            "-p",
            "10809",
            "-t",
            "--shared=8",
        ])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(o)
        .stderr(e)
        .spawn()
        .expect("start qemu-nbd (package qemu-utils)")
}

/// Polls a TCP probe from the hub namespace until it succeeds.
fn wait_port(net: &Net, probe: &str, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let out = in_hub(net, "bash")
            .args(["-c", probe])
            .stderr(Stdio::null())
            .output()
            .expect("probe");
        if out.status.success() && (!probe.contains("ruok") || out.stdout.starts_with(b"imok")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not come up within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const ZK_PROBE: &str = "exec 3<>/dev/tcp/127.0.0.1/2181 && echo ruok >&3 && timeout 1 cat <&3";
const NBD_PROBE: &str = "exec 3<>/dev/tcp/127.0.0.1/10809";

fn signal(child: &Child, s: Signal) {
    let _ = kill(Pid::from_raw(child.id() as i32), s);
}

fn kill_reap(mut child: Child) -> String {
    signal(&child, Signal::SIGKILL);
    match child.wait() {
        Ok(st) => st.to_string(),
        Err(e) => format!("wait: {e}"),
    }
}

// ---------------------------------------------------------------- the nodes

struct NodeRt {
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    /// Not restarted before this (kill -9's down time); `None` = free to restart.
    hold: bool,
    restart_at: Option<Instant>,
    paused: bool,
    notify: UnixDatagram,
    last_pet: Option<Instant>,
    armed: bool,
    log_off: u64,
    log_rest: String,
    ack_off: u64,
    ack_rest: String,
    phase: (String, String),
    starts: u32,
    watchdog_kills: u32,
    /// The node's watchdog device (device mode).
    wd: Option<DevWd>,
    /// A reset in progress (device mode): the node is down until it is done.
    reset: Option<ResetJob>,
    watchdog_resets: u32,
}

impl NodeRt {
    fn cfg(&self) -> PathBuf {
        self.dir.join("node.toml")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }
    fn ack(&self) -> PathBuf {
        self.dir.join("ack")
    }
    fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }
    fn sock(&self) -> PathBuf {
        self.dir.join("notify.sock")
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// The watchdog device the daemon opens (a FIFO, device mode).
    fn wd_path(&self) -> PathBuf {
        self.dir.join("watchdog")
    }
    /// The name the node's devices are labelled with (`node.shared_kernel`).
    fn label(&self) -> String {
        format!("{VOLUME}@{}", self.name)
    }
}

// ---------------------------------------------------------------- the device watchdog

/// One node's watchdog device, as the kernel's watchdog core behaves: the
/// daemon opens a FIFO whose read end this harness holds (non-blocking, for
/// the whole run, so the daemon's `open(O_WRONLY)` never blocks) and writes a
/// byte per pet. Opening arms an inactive watchdog (a ping); reopening an
/// armed one does not ping; every byte is a ping; closing after a magic `V`
/// (the last byte) disarms it; closing without it (e.g. the daemon was killed)
/// pings once and leaves it armed. Armed and `WATCHDOG` seconds without a ping:
/// the node is reset.
struct DevWd {
    fifo: fs::File,
    /// Some process has the device open (the FIFO has a writer).
    open: bool,
    armed: bool,
    /// The last byte written was the magic close character.
    magic: bool,
    last_pet: Option<Instant>,
}

/// What a poll of the watchdog device saw (only the transitions worth a history line).
enum WdEvent {
    /// Opened; `armed` when this open armed it.
    Opened { armed: bool },
    /// Closed; `magic`: with the magic character (disarmed), else pinged once and still armed.
    Released { magic: bool },
}

impl WdEvent {
    fn json(&self, node: &str) -> Value {
        match self {
            WdEvent::Opened { armed } => {
                json!({"type": "node", "node": node, "event": "watchdog-open", "armed": armed})
            }
            WdEvent::Released { magic } => {
                json!({"type": "node", "node": node, "event": "watchdog-close",
                    "magic_close": magic, "still_armed": !magic})
            }
        }
    }
}

impl DevWd {
    fn create(path: &Path) -> DevWd {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = fs::remove_file(path);
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo for the emulated watchdog device");
        let fifo = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .expect("open the emulated watchdog device's read end");
        DevWd {
            fifo,
            open: false,
            armed: false,
            magic: false,
            last_pet: None,
        }
    }

    /// Reads what was written since the last poll; returns the transitions.
    fn poll(&mut self, now: Instant) -> Vec<WdEvent> {
        let mut events = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.fifo.read(&mut buf) {
                // No writer (any more).
                Ok(0) => {
                    if self.open {
                        self.open = false;
                        if self.armed {
                            if self.magic {
                                self.armed = false;
                            } else {
                                self.last_pet = Some(now);
                            }
                        }
                        events.push(WdEvent::Released { magic: self.magic });
                    }
                    return events;
                }
                Ok(k) => {
                    self.opened(now, &mut events);
                    self.last_pet = Some(now);
                    self.magic = buf[k - 1] == b'V';
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.opened(now, &mut events);
                    return events;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return events,
            }
        }
    }

    fn opened(&mut self, now: Instant, events: &mut Vec<WdEvent>) {
        if self.open {
            return;
        }
        self.open = true;
        self.magic = false;
        let arms = !self.armed;
        if arms {
            self.armed = true;
            self.last_pet = Some(now);
        }
        events.push(WdEvent::Opened { armed: arms });
    }

    /// Seconds since the last ping when the watchdog has expired.
    fn expired(&self, now: Instant) -> Option<f64> {
        let since = now.duration_since(self.last_pet?).as_secs_f64();
        (self.armed && since > WATCHDOG).then_some(since)
    }

    /// After the node's reset: the old daemon is gone, the device is inactive
    /// again (as after a reboot); whatever is left in the FIFO is dropped.
    fn rebooted(&mut self) {
        let mut buf = [0u8; 4096];
        while matches!(self.fifo.read(&mut buf), Ok(k) if k > 0) {}
        self.open = false;
        self.armed = false;
        self.magic = false;
        self.last_pet = None;
    }
}

// ---------------------------------------------------------------- the node reset

/// A node reset in progress: the slow kernel parts run on a thread.
struct ResetJob {
    /// `None` once it has finished and been joined.
    handle: Option<std::thread::JoinHandle<ResetReport>>,
    /// Index into `World::resets`.
    record: usize,
    issued: Instant,
    /// When the thread was seen finished.
    done: Option<Instant>,
}

/// What a node reset did, with campaign times (seconds since t0) of each step.
#[derive(Default)]
struct ResetReport {
    devices: Vec<String>,
    killed: Vec<String>,
    killed_at: f64,
    disconnected_at: Option<f64>,
    unmounted_at: Option<f64>,
    daemon_status: Option<String>,
    daemon_reaped_at: Option<f64>,
    detached_at: Option<f64>,
    devices_gone_at: Option<f64>,
    errors: Vec<String>,
}

/// One issued reset, for the verdict (and the overlap diagnostics).
struct ResetRec {
    node: String,
    issued_at: f64,
    since_last_pet: f64,
    was_paused: bool,
    report: Option<ResetReport>,
    back_at: Option<f64>,
}

/// What the reset thread needs.
struct ResetInput {
    name: String,
    label: String,
    daemon: Option<Child>,
    mnt: PathBuf,
    run_dir: PathBuf,
    image: PathBuf,
    nbd: bool,
    t0: Instant,
}

/// The node's attached devices: (name, index), from sysfs (and, for loop
/// devices, their label, read with `LOOP_GET_STATUS64`: this is the node's own
/// kernel acting, not the observer).
fn node_devices(nbd: bool, image: &Path, label: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/sys/block") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if nbd {
            let Some(index) = name.strip_prefix("nbd").and_then(|i| i.parse().ok()) else {
                continue;
            };
            if !p.join("pid").exists() {
                continue;
            }
            let backend = fs::read_to_string(p.join("backend")).unwrap_or_default();
            if BackendId::parse(&backend).is_some_and(|b| b.volume == label) {
                out.push((name, index));
            }
        } else {
            let Some(index) = name.strip_prefix("loop").and_then(|i| i.parse().ok()) else {
                continue;
            };
            let Ok(b) = fs::read_to_string(p.join("loop/backing_file")) else {
                continue;
            };
            if Path::new(b.trim()) != image {
                continue;
            }
            if let Ok(Some(st)) = KernelLoop::new().status(index) {
                if loopdev::label_generation(&st.label, label).is_some() {
                    out.push((name, index));
                }
            }
        }
    }
    out.sort();
    out
}

/// Whether device `name` is still bound (to anything of this node: the caller
/// checked the label when it found it).
fn still_bound(nbd: bool, image: &Path, name: &str) -> bool {
    let p = Path::new("/sys/block").join(name);
    if nbd {
        p.join("pid").exists()
    } else {
        fs::read_to_string(p.join("loop/backing_file")).is_ok_and(|b| Path::new(b.trim()) == image)
    }
}

/// Processes of the node's task (the record writer, in its own session) and
/// any process naming one of the node's devices (e2fsck): (pid, cmdline).
fn node_processes(name: &str, devices: &[(String, u32)]) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    let dev_paths: Vec<String> = devices.iter().map(|(d, _)| format!("/dev/{d}")).collect();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let writer = args.iter().any(|a| a == "testkit")
            && args.iter().any(|a| a == "writer")
            && args.windows(2).any(|w| w[0] == "--node" && w[1] == name);
        let device_user = args.iter().any(|a| {
            dev_paths
                .iter()
                .any(|d| a == d || a.starts_with(&format!("{d}p")))
        });
        if writer || device_user {
            out.push((pid, args.join(" ").trim().to_string()));
        }
    }
    out
}

/// The task's process group from its pid file (`<run_dir>/<volume>.task`), if
/// that process is still one of the node's writers.
fn task_group(run_dir: &Path, name: &str) -> Option<i32> {
    let text = fs::read_to_string(run_dir.join(format!("{VOLUME}.task"))).ok()?;
    let pid: i32 = text
        .lines()
        .find_map(|l| l.strip_prefix("pid="))?
        .trim()
        .parse()
        .ok()?;
    let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    (cmd.contains("writer") && cmd.contains(&format!("--node {name}"))).then_some(pid)
}

/// The reset itself, emulating a power cycle of one node on a shared kernel:
/// everything of the node is SIGKILLed (daemon, task, a running e2fsck), its
/// NBD devices disconnected (the sockets shut: no further I/O reaches the
/// server), its mount lazily detached, its loop devices cleared; returns when
/// the kernel shows none of its devices any more (or after 30 s).
fn node_reset(mut inp: ResetInput) -> ResetReport {
    let t = |inp: &ResetInput| inp.t0.elapsed().as_secs_f64();
    let mut r = ResetReport::default();
    // 1. Every process of the node stops at once (the daemon was SIGKILLed
    //    already, when the reset was issued).
    if let Some(c) = inp.daemon.as_mut() {
        let _ = c.kill();
        r.killed.push(format!("daemon {}", c.id()));
    }
    if let Some(g) = task_group(&inp.run_dir, &inp.name) {
        let _ = kill(Pid::from_raw(-g), Signal::SIGKILL);
    }
    let devices = node_devices(inp.nbd, &inp.image, &inp.label);
    r.devices = devices.iter().map(|(d, _)| d.clone()).collect();
    let kill_all = |r: &mut ResetReport| {
        if let Some(g) = task_group(&inp.run_dir, &inp.name) {
            let _ = kill(Pid::from_raw(-g), Signal::SIGKILL);
            r.killed.push(format!("group {g}"));
        }
        for (pid, cmd) in node_processes(&inp.name, &devices) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let cmd: String = cmd.chars().take(120).collect();
            r.killed.push(format!("{pid} {cmd}"));
        }
    };
    kill_all(&mut r);
    r.killed_at = t(&inp);
    // 2. No more I/O from this node reaches the NBD server.
    if inp.nbd {
        let nbd = KernelNbd::new();
        for (d, index) in &devices {
            let opts = DetachOptions {
                mode: DetachMode::Force,
                timeout: Duration::from_secs(2),
            };
            if let Err(e) = nbd.detach(*index, &opts) {
                r.errors.push(format!("disconnect {d}: {e}"));
            }
        }
        r.disconnected_at = Some(t(&inp));
    }
    // 3. The mount goes (lazily: the kernel lets go of it when its last user is gone).
    for _ in 0..5 {
        match nix::mount::umount2(&inp.mnt, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
            Err(e) => {
                r.errors
                    .push(format!("umount -l {}: {e}", inp.mnt.display()));
                break;
            }
        }
    }
    r.unmounted_at = Some(t(&inp));
    // 4. The daemon is gone (it may have been blocked on the device).
    if let Some(mut c) = inp.daemon.take() {
        r.daemon_status = Some(match c.wait() {
            Ok(st) => st.to_string(),
            Err(e) => format!("wait: {e}"),
        });
        r.daemon_reaped_at = Some(t(&inp));
    }
    // Anything the daemon started meanwhile.
    kill_all(&mut r);
    // 5. Loop devices: clear them (a mounted one clears itself once the lazy unmount is through).
    if !inp.nbd && !devices.is_empty() {
        let loops = KernelLoop::new();
        for (d, index) in &devices {
            if let Err(e) = loops.detach(*index, &inp.label, Duration::from_secs(10)) {
                r.errors.push(format!("detach {d}: {e}"));
            }
        }
        r.detached_at = Some(t(&inp));
    }
    // 6. Wait until the kernel shows none of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if devices
            .iter()
            .all(|(d, _)| !still_bound(inp.nbd, &inp.image, d))
        {
            r.devices_gone_at = Some(t(&inp));
            break;
        }
        if Instant::now() > deadline {
            r.errors.push(format!(
                "still bound 30s after the reset: {:?}",
                devices
                    .iter()
                    .filter(|(d, _)| still_bound(inp.nbd, &inp.image, d))
                    .map(|(d, _)| d)
                    .collect::<Vec<_>>()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    r
}

/// Reads what was appended to `path` since `off`; returns complete lines (keeps a partial one).
fn tail(path: &Path, off: &mut u64, rest: &mut String) -> Vec<String> {
    let Ok(mut f) = fs::File::open(path) else {
        return Vec::new();
    };
    if f.seek(SeekFrom::Start(*off)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    *off += buf.len() as u64;
    rest.push_str(&String::from_utf8_lossy(&buf));
    let mut lines = Vec::new();
    while let Some(k) = rest.find('\n') {
        lines.push(rest[..k].to_string());
        rest.drain(..=k);
    }
    lines
}

/// `key=value` from a tracing line (value up to the next space).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    let v = &line[at..];
    Some(v.split(' ').next().unwrap_or("").trim_matches('"'))
}

/// The decision text of a driver log line (between the target and the fields).
fn short(line: &str) -> String {
    let body = line.split_once(": ").map_or(line, |(_, b)| b);
    body.chars().take(240).collect()
}

// ---------------------------------------------------------------- the world

/// Two or more devices bound to the image at once.
struct Overlap {
    from: f64,
    to: f64,
    devices: Vec<String>,
    /// Device → (node, generation) of every device seen during the overlap.
    owners: BTreeMap<String, (String, u64)>,
}

#[derive(Clone, Debug)]
struct Segment {
    node: String,
    generation: u64,
    first: f64,
    last: f64,
    records: u64,
}

struct Active {
    id: usize,
    kind: Kind,
    node: Option<usize>,
    heal_at: Instant,
}

struct World {
    s: Settings,
    net: Net,
    dir: PathBuf,
    image: PathBuf,
    t0: Instant,
    hist: std::io::BufWriter<fs::File>,
    nodes: Vec<NodeRt>,
    zk: Option<Child>,
    nbd_server: Option<Child>,
    active: Vec<Active>,
    // storage side
    attached: Vec<String>,
    overlap_open: Option<Overlap>,
    overlaps: Vec<Overlap>,
    max_attached: usize,
    /// Loop device → (node, generation), from the daemons' "loop device attached" lines.
    loop_owner: BTreeMap<String, (String, u64)>,
    /// Node resets by the (emulated) device watchdog.
    resets: Vec<ResetRec>,
    // records side
    segments: Vec<Segment>,
    max_gen: u64,
    stale_acks: Vec<String>,
    interleaved: Vec<String>,
    last_ack: Option<f64>,
    served: f64,
    outages: Vec<(f64, f64)>,
    acks: u64,
    // accounting
    applied: BTreeMap<&'static str, u32>,
    skipped: u32,
    warnings: u64,
}

impl World {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn record(&mut self, mut v: Value) {
        let t = (self.now() * 1000.0).round() / 1000.0;
        v["t"] = json!(t);
        let line = serde_json::to_string(&v).expect("json");
        writeln!(self.hist, "{line}").expect("history");
    }

    fn start_daemon(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        assert!(n.child.is_none());
        let (o, e) = log_file(&n.log());
        let mut cmd = match self.net.node_ns(i) {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["daemon", "--config"])
            .arg(n.cfg())
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", n.sock())
            .env_remove("WATCHDOG_USEC");
        if self.s.watchdog == WdMode::Systemd {
            // `WatchdogSec=`; with the device watchdog the unit has none
            // (`Type=notify` stays: READY=1 and STATUS= are harmless).
            cmd.env("WATCHDOG_USEC", format!("{}", (WATCHDOG * 1e6) as u64));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e)
            .spawn()
            .expect("start the daemon");
        n.child = Some(child);
        n.armed = false;
        n.last_pet = None;
        n.paused = false;
        n.restart_at = None;
        n.starts += 1;
        let pid = n.child.as_ref().map(Child::id);
        let name = n.name.clone();
        self.record(json!({"type": "daemon", "node": name, "event": "started", "pid": pid}));
    }

    /// One observation step: supervise the daemons, play systemd's watchdog
    /// or the kernel's watchdog device (and reset nodes), sample the devices,
    /// tail acks and logs.
    fn tick(&mut self) {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            // systemd's notify socket.
            let mut buf = [0u8; 512];
            let systemd_wd = self.s.watchdog == WdMode::Systemd;
            loop {
                let n = &mut self.nodes[i];
                match n.notify.recv(&mut buf) {
                    Ok(k) => {
                        let msg = String::from_utf8_lossy(&buf[..k]).into_owned();
                        for l in msg.lines() {
                            if systemd_wd && (l == "WATCHDOG=1" || l == "READY=1") {
                                n.armed = true;
                                n.last_pet = Some(now);
                            }
                        }
                    }
                    Err(_) => break,
                }
            }
            // A node being reset is down until the reset is through and it has "rebooted".
            if self.nodes[i].reset.is_some() {
                self.poll_reset(i, now);
                continue;
            }
            // Reap.
            let exited = match self.nodes[i].child.as_mut() {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(st) = exited {
                let n = &mut self.nodes[i];
                n.child = None;
                n.restart_at = Some(now + Duration::from_secs_f64(RESTART_SEC));
                let name = n.name.clone();
                self.record(json!({"type": "daemon", "node": name, "event": "exited", "status": st.to_string()}));
            }
            // The watchdog: WatchdogSec without WATCHDOG=1 kills the unit (its task with it).
            let n = &self.nodes[i];
            if n.child.is_some()
                && n.armed
                && n.last_pet
                    .is_some_and(|p| now.duration_since(p).as_secs_f64() > WATCHDOG)
            {
                let n = &mut self.nodes[i];
                let since = now.duration_since(n.last_pet.expect("pet")).as_secs_f64();
                let st = kill_reap(n.child.take().expect("child"));
                n.watchdog_kills += 1;
                n.restart_at = Some(now + Duration::from_secs_f64(RESTART_SEC));
                let (name, paused) = (n.name.clone(), n.paused);
                self.record(
                    json!({"type": "daemon", "node": name, "event": "watchdog-kill",
                    "since_last_pet": since, "was_paused": paused, "status": st}),
                );
            }
            // The watchdog device: the node is reset when it expires.
            if self.s.watchdog == WdMode::Device {
                self.poll_device_watchdog(i, now);
                if self.nodes[i].reset.is_some() {
                    continue;
                }
            }
            // Restart=always.
            let n = &self.nodes[i];
            if n.child.is_none() && !n.hold && n.restart_at.is_some_and(|r| now >= r) {
                self.start_daemon(i);
            }
        }
        self.sample_devices();
        self.tail_acks();
        self.tail_logs();
    }

    /// While the daemons stop: the watchdog devices' transitions, and an
    /// expiry (which would reset the node) as a problem, once per node.
    fn watch_stop(&mut self, expired: &mut Vec<String>) {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].name.clone();
            let Some(wd) = self.nodes[i].wd.as_mut() else {
                continue;
            };
            let events = wd.poll(now);
            let since = wd.expired(now);
            for e in events {
                self.record(e.json(&name));
            }
            let tag = format!("{name}'s watchdog device expired");
            if let Some(since) = since {
                if !expired.iter().any(|e| e.starts_with(&tag)) {
                    self.record(json!({"type": "node", "node": name, "event": "watchdog-expired-while-stopping",
                        "since_last_pet": r3(since)}));
                    expired.push(format!(
                        "{tag} while the daemon stopped on SIGTERM ({since:.2}s without a ping): the node would reset"
                    ));
                }
            }
        }
    }

    /// Plays the kernel's watchdog core for node `i`'s device; resets the node when it expires.
    fn poll_device_watchdog(&mut self, i: usize, now: Instant) {
        let Some(wd) = self.nodes[i].wd.as_mut() else {
            return;
        };
        let events = wd.poll(now);
        let expired = wd.expired(now);
        let name = self.nodes[i].name.clone();
        for e in events {
            self.record(e.json(&name));
        }
        if let Some(since) = expired {
            self.reset_node(i, since);
        }
    }

    /// The watchdog expired: reset node `i` (see [`node_reset`]); the slow
    /// parts run on a thread, the node is down until it has finished.
    fn reset_node(&mut self, i: usize, since_last_pet: f64) {
        let issued_at = self.now();
        let devices: Vec<String> = self
            .attached
            .iter()
            .filter(|d| self.owner(d).is_some_and(|(n, _)| n == self.nodes[i].name))
            .cloned()
            .collect();
        let n = &mut self.nodes[i];
        let was_paused = n.paused;
        let daemon = n.child.take();
        // The daemon stops at once (a reset is instantaneous); the thread reaps it.
        if let Some(c) = &daemon {
            signal(c, Signal::SIGKILL);
        }
        let pid = daemon.as_ref().map(Child::id);
        n.paused = false;
        n.armed = false;
        n.watchdog_resets += 1;
        let inp = ResetInput {
            name: n.name.clone(),
            label: n.label(),
            daemon,
            mnt: n.mnt(),
            run_dir: n.run_dir(),
            image: self.image.clone(),
            nbd: self.s.nbd,
            t0: self.t0,
        };
        let name = n.name.clone();
        let handle = std::thread::Builder::new()
            .name(format!("reset-{name}"))
            .spawn(move || node_reset(inp))
            .expect("reset thread");
        n.reset = Some(ResetJob {
            handle: Some(handle),
            record: self.resets.len(),
            issued: Instant::now(),
            done: None,
        });
        self.resets.push(ResetRec {
            node: name.clone(),
            issued_at,
            since_last_pet,
            was_paused,
            report: None,
            back_at: None,
        });
        self.record(
            json!({"type": "node", "event": "watchdog-reset", "node": name,
            "since_last_pet": r3(since_last_pet), "was_paused": was_paused,
            "daemon_pid": pid, "devices": devices}),
        );
    }

    /// A reset in progress on node `i`: when its thread is done, record what it
    /// did; after the reboot time, the node is up again (its run_dir, a tmpfs
    /// on a real node, is emptied; the watchdog is inactive) and systemd starts
    /// the daemon.
    fn poll_reset(&mut self, i: usize, now: Instant) {
        let n = &mut self.nodes[i];
        let job = n.reset.as_mut().expect("reset");
        let rec = job.record;
        if let Some(h) = job.handle.take() {
            if !h.is_finished() {
                job.handle = Some(h);
                return;
            }
            job.done = Some(now);
            let report = h.join().unwrap_or_else(|_| ResetReport {
                errors: vec!["the reset thread panicked".into()],
                ..ResetReport::default()
            });
            let name = n.name.clone();
            let v = json!({"type": "node", "event": "reset-done", "node": name,
                "devices": report.devices, "killed": report.killed,
                "killed_at": r3(report.killed_at),
                "disconnected_at": report.disconnected_at.map(r3),
                "unmounted_at": report.unmounted_at.map(r3),
                "daemon_status": report.daemon_status,
                "daemon_reaped_at": report.daemon_reaped_at.map(r3),
                "detached_at": report.detached_at.map(r3),
                "devices_gone_at": report.devices_gone_at.map(r3),
                "errors": report.errors});
            self.resets[rec].report = Some(report);
            self.record(v);
            return;
        }
        if now < job.issued + Duration::from_secs_f64(REBOOT) {
            return;
        }
        n.reset = None;
        if let Ok(rd) = fs::read_dir(n.run_dir()) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path()).or_else(|_| fs::remove_dir_all(e.path()));
            }
        }
        if let Some(wd) = n.wd.as_mut() {
            wd.rebooted();
        }
        n.restart_at = Some(now);
        let name = n.name.clone();
        self.resets[rec].back_at = Some(self.now());
        self.record(json!({"type": "node", "event": "rebooted", "node": name}));
    }

    fn sample_devices(&mut self) {
        let mut devs = Vec::new();
        if let Ok(rd) = fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let p = e.path();
                if self.s.nbd {
                    if name.starts_with("nbd") && p.join("pid").exists() {
                        let backend = fs::read_to_string(p.join("backend"))
                            .unwrap_or_default()
                            .trim()
                            .to_string();
                        devs.push(format!("{name} {backend}"));
                    }
                } else if name.starts_with("loop") {
                    if let Ok(b) = fs::read_to_string(p.join("loop/backing_file")) {
                        if Path::new(b.trim()) == self.image {
                            devs.push(name);
                        }
                    }
                }
            }
        }
        devs.sort();
        if devs != self.attached {
            let t = self.now();
            self.max_attached = self.max_attached.max(devs.len());
            if devs.len() >= 2 {
                let owners: Vec<(String, (String, u64))> = devs
                    .iter()
                    .filter_map(|d| Some((d.clone(), self.owner(d)?)))
                    .collect();
                let o = self.overlap_open.get_or_insert_with(|| Overlap {
                    from: t,
                    to: t,
                    devices: Vec::new(),
                    owners: BTreeMap::new(),
                });
                o.owners.extend(owners);
            }
            if devs.len() < 2 {
                if let Some(mut o) = self.overlap_open.take() {
                    o.to = t;
                    o.devices = self.attached.clone();
                    self.overlaps.push(o);
                }
            }
            self.attached = devs.clone();
            self.record(json!({"type": "attached", "devices": devs, "overlap": devs.len() >= 2}));
        }
    }

    /// Whose device `dev` (as `sample_devices` names it) is: (node, generation).
    fn owner(&self, dev: &str) -> Option<(String, u64)> {
        if self.s.nbd {
            let b = BackendId::parse(dev.split_once(' ')?.1)?;
            let node = b.volume.split_once('@')?.1.to_string();
            Some((node, b.generation.0))
        } else {
            self.loop_owner.get(dev).cloned()
        }
    }

    fn tail_acks(&mut self) {
        let t = self.now();
        let mut got = false;
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let (path, name) = (n.ack(), n.name.clone());
            let lines = tail(&path, &mut n.ack_off, &mut n.ack_rest);
            for l in lines {
                let Some(r) = Record::parse(&l) else { continue };
                got = true;
                self.acks += 1;
                self.ack(t, &name, &r);
            }
        }
        if got {
            if let Some(prev) = self.last_ack {
                let gap = t - prev;
                if gap <= SERVED_GAP {
                    self.served += gap;
                } else {
                    self.outages.push((prev, t));
                }
            }
            self.last_ack = Some(t);
        }
    }

    fn ack(&mut self, t: f64, node: &str, r: &Record) {
        if r.generation < self.max_gen {
            let msg = format!(
                "{node} acknowledged {} under generation {} after generation {} had written",
                r.seq, r.generation, self.max_gen
            );
            if self.stale_acks.len() < 20 {
                self.record(json!({"type": "VIOLATION", "what": "stale-ack", "detail": msg}));
            }
            self.stale_acks.push(msg);
        }
        self.max_gen = self.max_gen.max(r.generation);
        let same = self
            .segments
            .last()
            .is_some_and(|s| s.node == node && s.generation == r.generation);
        if same {
            let s = self.segments.last_mut().expect("segment");
            s.last = t;
            s.records += 1;
            return;
        }
        if self
            .segments
            .iter()
            .any(|s| s.node == node && s.generation == r.generation)
        {
            // A writer that had stopped being the latest one writes again: two interleave.
            let msg = format!(
                "{node} generation {} acknowledged again at t+{t:.3}s after {:?} had written",
                r.generation,
                self.segments.last().map(|s| (&s.node, s.generation))
            );
            self.record(json!({"type": "VIOLATION", "what": "interleaved-writers", "detail": msg}));
            self.interleaved.push(msg);
        }
        self.record(
            json!({"type": "holder", "node": node, "generation": r.generation, "seq": r.seq}),
        );
        self.segments.push(Segment {
            node: node.to_string(),
            generation: r.generation,
            first: t,
            last: t,
            records: 1,
        });
    }

    fn tail_logs(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let (path, name) = (n.log(), n.name.clone());
            let lines = tail(&path, &mut n.log_off, &mut n.log_rest);
            for l in lines {
                if l.contains("loop device attached") {
                    let dev = field(&l, "device").and_then(|d| d.strip_prefix("/dev/"));
                    let gen = field(&l, "label")
                        .and_then(loopdev::parse_loop_label)
                        .map(|(_, g)| g.0);
                    if let (Some(dev), Some(gen)) = (dev, gen) {
                        self.loop_owner.insert(dev.to_string(), (name.clone(), gen));
                    }
                }
                if let Some(phase) = field(&l, "phase") {
                    let generation = field(&l, "generation").unwrap_or("-").to_string();
                    let key = (phase.to_string(), generation.clone());
                    if self.nodes[i].phase != key {
                        self.nodes[i].phase = key;
                        let p = phase.to_string();
                        self.record(json!({"type": "phase", "node": name, "phase": p,
                            "generation": generation, "reason": short(&l)}));
                    }
                } else if l.contains(" WARN ") || l.contains(" ERROR ") {
                    self.warnings += 1;
                    let level = if l.contains(" ERROR ") {
                        "error"
                    } else {
                        "warn"
                    };
                    self.record(
                        json!({"type": "log", "node": name, "level": level, "line": short(&l)}),
                    );
                }
            }
        }
    }

    /// The node a `Holder` fault hits: the latest writer, else the first node.
    fn holder(&self) -> usize {
        self.segments
            .last()
            .and_then(|s| self.nodes.iter().position(|n| n.name == s.node))
            .unwrap_or(0)
    }

    fn busy(&self, class: Class, node: Option<usize>) -> bool {
        self.active
            .iter()
            .any(|a| a.kind.class() == class && a.node == node)
    }

    fn apply(&mut self, id: usize, p: &Planned) {
        let class = p.kind.class();
        let node = match p.target {
            Target::Cluster => None,
            Target::Holder | Target::Node(_) => {
                let first = match p.target {
                    Target::Node(i) => i,
                    _ => self.holder(),
                };
                (0..NODES)
                    .map(|k| (first + k) % NODES)
                    .find(|&i| !self.busy(class, Some(i)))
                    .map(Some)
                    .unwrap_or(None)
            }
        };
        if (p.kind.per_node() && node.is_none()) || (!p.kind.per_node() && self.busy(class, None)) {
            self.skipped += 1;
            self.record(
                json!({"type": "fault", "id": id, "fault": p.kind.name(), "action": "skipped",
                "why": "its target already has a fault of this class"}),
            );
            return;
        }
        let node_name = node.map(|i| self.nodes[i].name.clone());
        let mut detail = String::new();
        match (p.kind, node) {
            (Kind::ZkCut, Some(i)) => self.net.link(i, 'z', false),
            (Kind::NbdCut, Some(i)) => self.net.link(i, 's', false),
            (Kind::ZkDropOut, Some(i)) => self.net.drop(i, 'z', true, true),
            (Kind::ZkDropIn, Some(i)) => self.net.drop(i, 'z', false, true),
            (Kind::NbdDropOut, Some(i)) => self.net.drop(i, 's', true, true),
            (Kind::NbdDropIn, Some(i)) => self.net.drop(i, 's', false, true),
            (Kind::Kill9, Some(i)) => {
                let n = &mut self.nodes[i];
                n.hold = true;
                match n.child.take() {
                    Some(c) => detail = kill_reap(c),
                    None => detail = "daemon was not running".into(),
                }
            }
            (Kind::Pause, Some(i)) => {
                let n = &mut self.nodes[i];
                match &n.child {
                    Some(c) => {
                        signal(c, Signal::SIGSTOP);
                        n.paused = true;
                    }
                    None => detail = "daemon was not running".into(),
                }
            }
            (Kind::ZkRestart, None) => {
                if let Some(c) = self.zk.take() {
                    detail = kill_reap(c);
                }
            }
            (Kind::ZkFreeze, None) => {
                if let Some(c) = &self.zk {
                    signal(c, Signal::SIGSTOP);
                }
            }
            (Kind::NbdRestart, None) => {
                if let Some(c) = self.nbd_server.take() {
                    detail = kill_reap(c);
                }
            }
            (k, n) => unreachable!("fault {k:?} on {n:?}"),
        }
        *self.applied.entry(p.kind.name()).or_default() += 1;
        self.record(json!({"type": "fault", "id": id, "fault": p.kind.name(), "action": "start",
            "node": node_name, "duration": p.dur, "target": format!("{:?}", p.target), "detail": detail}));
        self.active.push(Active {
            id,
            kind: p.kind,
            node,
            heal_at: Instant::now() + Duration::from_secs_f64(p.dur),
        });
    }

    fn heal(&mut self, a: Active) {
        match (a.kind, a.node) {
            (Kind::ZkCut, Some(i)) => self.net.link(i, 'z', true),
            (Kind::NbdCut, Some(i)) => self.net.link(i, 's', true),
            (Kind::ZkDropOut, Some(i)) => self.net.drop(i, 'z', true, false),
            (Kind::ZkDropIn, Some(i)) => self.net.drop(i, 'z', false, false),
            (Kind::NbdDropOut, Some(i)) => self.net.drop(i, 's', true, false),
            (Kind::NbdDropIn, Some(i)) => self.net.drop(i, 's', false, false),
            (Kind::Kill9, Some(i)) => {
                let n = &mut self.nodes[i];
                n.hold = false;
                n.restart_at = Some(Instant::now());
            }
            (Kind::Pause, Some(i)) => {
                let n = &mut self.nodes[i];
                if let (Some(c), true) = (&n.child, n.paused) {
                    signal(c, Signal::SIGCONT);
                }
                n.paused = false;
            }
            (Kind::ZkRestart, None) => {
                self.zk = Some(spawn_zk(&self.net, &self.dir));
            }
            (Kind::ZkFreeze, None) => {
                if let Some(c) = &self.zk {
                    signal(c, Signal::SIGCONT);
                }
            }
            (Kind::NbdRestart, None) => {
                self.nbd_server = Some(spawn_qemu_nbd(&self.net, &self.image, &self.dir));
            }
            (k, n) => unreachable!("heal {k:?} on {n:?}"),
        }
        let node = a.node.map(|i| self.nodes[i].name.clone());
        self.record(json!({"type": "fault", "id": a.id, "fault": a.kind.name(), "action": "heal", "node": node}));
    }

    /// Ticks until `until` (an instant), healing what is due.
    fn run_until(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            let mut due: Vec<usize> = self
                .active
                .iter()
                .enumerate()
                .filter(|(_, a)| a.heal_at <= now)
                .map(|(k, _)| k)
                .collect();
            due.reverse();
            for k in due {
                let a = self.active.remove(k);
                self.heal(a);
            }
            self.tick();
            if now >= until {
                return;
            }
            std::thread::sleep(TICK.min(until.saturating_duration_since(now)));
        }
    }

    fn logs_tail(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let t = fs::read_to_string(n.log()).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                format!(
                    "--- {} ---\n{}",
                    n.name,
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(c) = n.child.take() {
                signal(&c, Signal::SIGCONT);
                kill_reap(c);
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(n.mnt())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(c) = self.zk.take() {
            signal(&c, Signal::SIGCONT);
            kill_reap(c);
        }
        if let Some(c) = self.nbd_server.take() {
            kill_reap(c);
        }
        if let Ok(out) = Command::new("losetup").arg("-j").arg(&self.image).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(dev) = line.split(':').next() {
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            }
        }
        self.net.delete();
        let _ = self.hist.flush();
    }
}

// ---------------------------------------------------------------- the verdict

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn node_config(w: &World, i: usize, chroot: &str) -> String {
    let n = &w.nodes[i];
    let zk = format!("{}:2181", w.net.addrs(i, 'z').0);
    let backend = if w.s.nbd {
        format!(
            "backend = \"nbd\"\n\n[volumes.data.nbd]\nserver = \"{}:10809\"\nexport = \"data\"\ntimeout = \"3s\"\ndead_conn_timeout = \"2s\"\n",
            w.net.addrs(i, 's').0
        )
    } else {
        format!(
            "backend = \"image\"\n\n[volumes.data.image]\npath = \"{}\"\n",
            w.image.display()
        )
    };
    let watchdog = match w.s.watchdog {
        WdMode::Systemd => "[watchdog]\nmode = \"systemd\"\ntimeout = \"2s\"\n".to_string(),
        WdMode::Device => format!(
            "[watchdog]\nmode = \"device\"\ndevice = \"{}\"\ntimeout = \"2s\"\n",
            n.wd_path().display()
        ),
    };
    format!(
        r#"[node]
id = "{name}"
state_dir = "{d}/state"
shared_kernel = true
run_dir = "{d}/run"

[zookeeper]
hosts = ["{zk}"]
chroot = "{chroot}"
session_timeout = "4s"

[fencing]
suspend_grace = "1s"
stop_grace = "1s"
unmount_budget = "500ms"
detach_budget = "500ms"
margin = "500ms"
lock_delay = "2s"

{watchdog}
[volumes.data]
mount_path = "{mnt}"
filesystem = "ext4"
{backend}
[volumes.data.task]
exec = ["{BIN}", "testkit", "writer", "--ack", "{ack}", "--node", "{name}", "--interval-ms", "10"]
"#,
        name = n.name,
        d = n.dir.display(),
        mnt = n.mnt().display(),
        ack = n.ack().display(),
    )
}

/// The emulated watchdog device follows the kernel's watchdog core (runs in a
/// plain `cargo test`: a FIFO needs no privileges).
#[test]
fn the_emulated_watchdog_device_behaves_like_the_kernels() {
    let tmp = TempDir::new("campaign-wd");
    let path = tmp.path().join("watchdog");
    let mut wd = DevWd::create(&path);
    let t0 = Instant::now();
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    let open = || fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Nobody has it open: inactive.
    assert!(wd.poll(at(0.0)).is_empty());
    assert!(!wd.armed && wd.expired(at(10.0)).is_none());
    // Opening arms it.
    let mut f = open();
    assert!(matches!(
        wd.poll(at(0.0))[..],
        [WdEvent::Opened { armed: true }]
    ));
    assert!(wd.expired(at(1.9)).is_none());
    assert!(wd.expired(at(2.1)).is_some());
    // Every byte is a ping.
    f.write_all(b"\0").unwrap();
    assert!(wd.poll(at(1.5)).is_empty());
    assert!(wd.expired(at(3.4)).is_none());
    // Closed without the magic character (a killed daemon): one ping, still armed.
    drop(f);
    assert!(matches!(
        wd.poll(at(3.0))[..],
        [WdEvent::Released { magic: false }]
    ));
    assert!(wd.armed);
    assert!(wd.expired(at(4.9)).is_none());
    assert!(wd.expired(at(5.1)).is_some());
    // Reopening an armed watchdog does not ping.
    let mut f = open();
    assert!(matches!(
        wd.poll(at(4.0))[..],
        [WdEvent::Opened { armed: false }]
    ));
    assert!(wd.expired(at(5.1)).is_some());
    // A pet, then the magic close: disarmed.
    f.write_all(b"\0").unwrap();
    f.write_all(b"V").unwrap();
    drop(f);
    assert!(matches!(
        wd.poll(at(4.5))[..],
        [WdEvent::Released { magic: true }]
    ));
    assert!(!wd.armed && wd.expired(at(100.0)).is_none());
    // Opened again: armed again; a reset leaves it inactive.
    let f = open();
    assert!(matches!(
        wd.poll(at(5.0))[..],
        [WdEvent::Opened { armed: true }]
    ));
    drop(f);
    wd.rebooted();
    assert!(!wd.armed && wd.expired(at(100.0)).is_none());
    assert!(wd.poll(at(6.0)).is_empty());
}

#[test]
#[ignore = "the fault campaign takes minutes: run scripts/campaign.sh (or this test with --ignored)"]
fn campaign() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the campaign needs root (namespaces, loop devices, mount)"
    );
    let s = Settings::from_env();
    let mode = if s.nbd { "vm" } else { "host" };
    println!(
        "campaign: seed {} ({} faults max, {}s of faults, backend {}, watchdog {}, out {})",
        s.seed,
        s.faults,
        s.seconds,
        if s.nbd { "nbd" } else { "image" },
        s.watchdog.name(),
        s.out.display()
    );
    println!("campaign: replay with: {}", s.replay());
    let schedule = plan(&s);
    fs::create_dir_all(&s.out).expect("output dir");
    let wall = Instant::now();

    let tmp = TempDir::new("campaign");
    let dir = tmp.path().to_path_buf();
    let image = dir.join("volume.img");
    let f = fs::File::create(&image).expect("image");
    f.set_len(64 << 20).expect("size image");
    drop(f);
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 failed");
    let image = fs::canonicalize(&image).expect("image path");
    let net = Net {
        prefix: format!("cf{}", std::process::id() % 10_000),
        nbd: s.nbd,
    };
    net.delete();
    let hist = std::io::BufWriter::new(
        fs::File::create(s.out.join("history.jsonl")).expect("history file"),
    );
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let name = format!("n{}", i + 1);
        let ndir = dir.join(&name);
        fs::create_dir_all(ndir.join("mnt")).expect("node dir");
        let sock = ndir.join("notify.sock");
        let notify = UnixDatagram::bind(&sock).expect("notify socket");
        notify.set_nonblocking(true).expect("nonblocking");
        let wd = (s.watchdog == WdMode::Device).then(|| DevWd::create(&ndir.join("watchdog")));
        nodes.push(NodeRt {
            name,
            dir: ndir,
            child: None,
            hold: false,
            restart_at: None,
            paused: false,
            notify,
            last_pet: None,
            armed: false,
            log_off: 0,
            log_rest: String::new(),
            ack_off: 0,
            ack_rest: String::new(),
            phase: (String::new(), String::new()),
            starts: 0,
            watchdog_kills: 0,
            wd,
            reset: None,
            watchdog_resets: 0,
        });
    }
    let mut w = World {
        s: s.clone(),
        net,
        dir: dir.clone(),
        image: image.clone(),
        t0: Instant::now(),
        hist,
        nodes,
        zk: None,
        nbd_server: None,
        active: Vec::new(),
        attached: Vec::new(),
        overlap_open: None,
        overlaps: Vec::new(),
        max_attached: 0,
        loop_owner: BTreeMap::new(),
        resets: Vec::new(),
        segments: Vec::new(),
        max_gen: 0,
        stale_acks: Vec::new(),
        interleaved: Vec::new(),
        last_ack: None,
        served: 0.0,
        outages: Vec::new(),
        acks: 0,
        applied: BTreeMap::new(),
        skipped: 0,
        warnings: 0,
    };
    w.record(
        json!({"type": "campaign", "seed": s.seed, "faults": s.faults, "seconds": s.seconds,
        "backend": if s.nbd { "nbd" } else { "image" }, "watchdog": s.watchdog.name(),
        "planned": schedule.len(), "replay": s.replay()}),
    );
    for (k, p) in schedule.iter().enumerate() {
        w.record(
            json!({"type": "plan", "id": k, "at": p.at, "fault": p.kind.name(),
            "target": format!("{:?}", p.target), "duration": p.dur}),
        );
    }
    w.net.create();
    w.zk = Some(spawn_zk(&w.net, &dir));
    wait_port(&w.net, ZK_PROBE, "ZooKeeper", Duration::from_secs(90));
    if s.nbd {
        w.nbd_server = Some(spawn_qemu_nbd(&w.net, &image, &dir));
        wait_port(&w.net, NBD_PROBE, "qemu-nbd", Duration::from_secs(30));
    }
    let chroot = format!("/campaign-{}-{}", s.seed, std::process::id());
    for i in 0..NODES {
        let cfg = node_config(&w, i, &chroot);
        fs::write(w.nodes[i].cfg(), cfg).expect("config");
        let check = Command::new(BIN)
            .arg("check-config")
            .arg(w.nodes[i].cfg())
            .output()
            .expect("check-config");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    for i in 0..NODES {
        w.start_daemon(i);
    }
    // Faults start once some node serves.
    let deadline = Instant::now() + Duration::from_secs(if s.nbd { 180 } else { 60 });
    while w.segments.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no node served within the start-up limit:\n{}",
            w.logs_tail()
        );
        w.run_until(Instant::now() + TICK);
    }
    let faults_t0 = Instant::now();
    let faults_start = w.now();
    w.record(json!({"type": "campaign", "event": "faults start"}));
    println!(
        "campaign: {} serving after {:.1}s; {} faults planned",
        w.segments[0].node,
        faults_start,
        schedule.len()
    );
    for (k, p) in schedule.iter().enumerate() {
        w.run_until(faults_t0 + Duration::from_secs_f64(p.at));
        w.apply(k, p);
    }
    // Let the last faults heal on their own schedule, then heal anything left.
    let last_heal = w.active.iter().map(|a| a.heal_at).max();
    if let Some(h) = last_heal {
        w.run_until(h);
    }
    for a in std::mem::take(&mut w.active) {
        w.heal(a);
    }
    for n in &mut w.nodes {
        n.hold = false;
        if n.child.is_none() && n.restart_at.is_none() {
            n.restart_at = Some(Instant::now());
        }
    }
    let healed = w.now();
    w.record(json!({"type": "campaign", "event": "all faults healed"}));
    // Liveness: some node serves again.
    let acks_at_heal = w.acks;
    let limit = Instant::now() + Duration::from_secs(if s.nbd { 120 } else { 60 });
    while w.acks < acks_at_heal + 50 && Instant::now() < limit {
        w.run_until(Instant::now() + TICK);
    }
    let recovered = (w.acks >= acks_at_heal + 50).then(|| w.now() - healed);
    w.run_until(Instant::now() + Duration::from_secs(2));
    let campaign_end = w.now();
    // A node still being reset comes back up before the daemons are stopped.
    let mut stop_problems = Vec::new();
    let limit = Instant::now() + Duration::from_secs(60);
    while w
        .nodes
        .iter()
        .any(|n| n.reset.is_some() || n.child.is_none())
    {
        if Instant::now() > limit {
            for n in &w.nodes {
                if n.reset.is_some() {
                    stop_problems.push(format!("{}'s reset did not finish", n.name));
                } else if n.child.is_none() {
                    stop_problems.push(format!("{}'s daemon is not running", n.name));
                }
            }
            break;
        }
        w.run_until(Instant::now() + TICK);
    }
    // Stop every daemon: they fence and release.
    w.record(json!({"type": "campaign", "event": "stopping"}));
    for n in &w.nodes {
        if let Some(c) = &n.child {
            signal(c, Signal::SIGCONT);
            signal(c, Signal::SIGTERM);
        }
    }
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    // The watchdog device stays emulated (no resets now): a clean stop must
    // disarm it, and must not leave it unpetted for longer than its timeout.
    let mut stop_expired: Vec<String> = Vec::new();
    for i in 0..NODES {
        w.nodes[i].hold = true;
    }
    loop {
        let mut running = 0;
        for i in 0..NODES {
            let exited = match w.nodes[i].child.as_mut() {
                Some(c) => c.try_wait().ok().flatten(),
                None => continue,
            };
            match exited {
                Some(st) => {
                    let name = w.nodes[i].name.clone();
                    if !st.success() {
                        stop_problems.push(format!("{name} exited with {st} on SIGTERM"));
                    }
                    w.nodes[i].child = None;
                    w.record(json!({"type": "daemon", "node": name, "event": "stopped", "status": st.to_string()}));
                }
                None => running += 1,
            }
        }
        w.sample_devices();
        w.tail_acks();
        w.tail_logs();
        w.watch_stop(&mut stop_expired);
        if running == 0 {
            break;
        }
        if Instant::now() > stop_deadline {
            stop_problems.push(format!(
                "{running} daemon(s) did not stop within 30s of SIGTERM"
            ));
            break;
        }
        std::thread::sleep(TICK);
    }
    std::thread::sleep(TICK);
    w.watch_stop(&mut stop_expired);
    stop_problems.extend(stop_expired);
    for n in &w.nodes {
        if n.wd.as_ref().is_some_and(|wd| wd.armed) {
            stop_problems.push(format!(
                "{}'s watchdog device is still armed after the daemon stopped (no magic close): the node would reset",
                n.name
            ));
        }
    }
    if let Some(mut o) = w.overlap_open.take() {
        o.to = w.now();
        o.devices = w.attached.clone();
        w.overlaps.push(o);
    }
    let left_attached = w.attached.clone();
    if let Some(c) = w.nbd_server.take() {
        kill_reap(c);
    }
    if let Some(c) = w.zk.take() {
        signal(&c, Signal::SIGCONT);
        kill_reap(c);
    }

    // The records checker over the volume's log and every ack log.
    let probe = dir.join("probe");
    fs::create_dir_all(&probe).expect("probe dir");
    let mounted = left_attached.is_empty()
        && Command::new("mount")
            .args(["-o", "ro,loop"])
            .arg(&image)
            .arg(&probe)
            .status()
            .is_ok_and(|s| s.success());
    let log = if mounted {
        let l = fs::read(probe.join("records.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let _ = Command::new("umount").arg(&probe).status();
        Some(l)
    } else {
        None
    };
    let ack_texts: Vec<String> = w
        .nodes
        .iter()
        .map(|n| fs::read_to_string(n.ack()).unwrap_or_default())
        .collect();
    let ack_refs: Vec<&str> = ack_texts.iter().map(String::as_str).collect();
    let checker = log.as_deref().map(|l| records::check(l, &ack_refs));
    let lost: Vec<&String> = checker
        .as_ref()
        .map(|v| {
            v.problems
                .iter()
                .filter(|p| p.starts_with("acknowledged record lost"))
                .collect()
        })
        .unwrap_or_default();
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .expect("e2fsck");
    let fsck_ok = fsck.status.success();

    // Failovers: consecutive writers of different generations.
    let mut failovers: Vec<f64> = w
        .segments
        .windows(2)
        .filter(|p| p[0].generation != p[1].generation)
        .map(|p| p[1].first - p[0].last)
        .collect();
    failovers.sort_by(f64::total_cmp);
    let window = campaign_end - faults_start;
    let availability = if window > 0.0 { w.served / window } else { 0.0 };
    let overlap_secs: f64 = w.overlaps.iter().map(|o| o.to - o.from).sum();
    // Diagnostics only (never an excuse): whose device was the stale one, and
    // whether that node's watchdog reset had been issued before the overlap began.
    let overlaps_json: Vec<Value> = w
        .overlaps
        .iter()
        .map(|o| {
            let stale = o.owners.iter().min_by_key(|(_, (_, g))| *g);
            let reset = stale.and_then(|(_, (node, _))| {
                w.resets
                    .iter()
                    .rfind(|r| &r.node == node && r.issued_at <= o.from)
            });
            json!({
                "from": r3(o.from), "to": r3(o.to), "seconds": r3(o.to - o.from), "devices": o.devices,
                "owners": o.owners.iter().map(|(d, (n, g))| json!({"device": d, "node": n, "generation": g})).collect::<Vec<_>>(),
                "stale_node": stale.map(|(_, (n, _))| n),
                "stale_device": stale.map(|(d, _)| d),
                "stale_generation": stale.map(|(_, (_, g))| g),
                "reset_issued_at": reset.map(|r| r3(r.issued_at)),
                "reset_devices_gone_at": reset.and_then(|r| r.report.as_ref()?.devices_gone_at.map(r3)),
            })
        })
        .collect();
    let resets_json: Vec<Value> = w
        .resets
        .iter()
        .map(|r| {
            let rep = r.report.as_ref();
            json!({
                "node": r.node, "issued_at": r3(r.issued_at), "since_last_pet": r3(r.since_last_pet),
                "was_paused": r.was_paused,
                "devices": rep.map(|p| p.devices.clone()),
                "killed_at": rep.map(|p| r3(p.killed_at)),
                "disconnected_at": rep.and_then(|p| p.disconnected_at.map(r3)),
                "daemon_reaped_at": rep.and_then(|p| p.daemon_reaped_at.map(r3)),
                "devices_gone_at": rep.and_then(|p| p.devices_gone_at.map(r3)),
                "errors": rep.map(|p| p.errors.clone()),
                "back_at": r.back_at.map(r3),
            })
        })
        .collect();
    let checker_problems: Vec<String> = checker
        .as_ref()
        .map(|v| v.problems.clone())
        .unwrap_or_else(|| vec!["the volume could not be mounted for the check".into()]);
    let mut failures = Vec::new();
    if !w.overlaps.is_empty() {
        failures.push(format!(
            "storage side: {} overlap(s) of attachments ({:.3}s in all)",
            w.overlaps.len(),
            overlap_secs
        ));
    }
    if !w.stale_acks.is_empty() || !w.interleaved.is_empty() {
        failures.push(format!(
            "acknowledgements: {} stale, {} interleaved writer(s)",
            w.stale_acks.len(),
            w.interleaved.len()
        ));
    }
    if !checker_problems.is_empty() {
        failures.push(format!(
            "records checker: {} problem(s)",
            checker_problems.len()
        ));
    }
    if !fsck_ok {
        failures.push("final e2fsck -fn found problems".into());
    }
    if !left_attached.is_empty() {
        failures.push(format!(
            "still attached after every daemon stopped: {left_attached:?}"
        ));
    }
    let mut liveness = stop_problems.clone();
    if recovered.is_none() {
        liveness.push("no node served again after every fault was healed".into());
    }
    let applied: u32 = w.applied.values().sum();
    let verdict = json!({
        "seed": s.seed,
        "mode": mode,
        "backend": if s.nbd { "nbd" } else { "image" },
        "watchdog": s.watchdog.name(),
        "replay": s.replay(),
        "faults": {"planned": schedule.len(), "applied": applied, "skipped": w.skipped, "by_kind": w.applied},
        "safety": {
            "ok": failures.is_empty(),
            "storage_overlaps": overlaps_json,
            "max_attached_at_once": w.max_attached,
            "stale_acks": w.stale_acks.len(),
            "interleaved_writers": w.interleaved,
            "checker": checker.as_ref().map(|v| v.to_string()),
            "checker_problems": checker_problems.iter().take(20).collect::<Vec<_>>(),
            "lost_acknowledged_records": lost.len(),
            "fsck_clean": fsck_ok,
            "left_attached": left_attached,
            "failures": failures,
        },
        "liveness": {
            "ok": liveness.is_empty(),
            "recovered_after_heal_s": recovered.map(r3),
            "problems": liveness,
        },
        "availability": r3(availability),
        "served_s": r3(w.served),
        "campaign_s": r3(window),
        "acknowledged_records": w.acks,
        "generations": w.segments.iter().map(|s| s.generation).collect::<std::collections::BTreeSet<_>>().len(),
        "failovers": {
            "count": failovers.len(),
            "p50_s": r3(percentile(&failovers, 50.0)),
            "p99_s": r3(percentile(&failovers, 99.0)),
            "max_s": r3(failovers.last().copied().unwrap_or(0.0)),
        },
        "outages": {
            "count": w.outages.len(),
            "longest_s": r3(w.outages.iter().map(|(a, b)| b - a).fold(0.0, f64::max)),
        },
        "daemons": w.nodes.iter().map(|n| json!({"node": n.name, "starts": n.starts,
            "watchdog_kills": n.watchdog_kills, "watchdog_resets": n.watchdog_resets})).collect::<Vec<_>>(),
        "watchdog_resets": resets_json,
        "daemon_warnings": w.warnings,
        "wall_s": r3(wall.elapsed().as_secs_f64()),
    });
    w.record(json!({"type": "verdict", "verdict": verdict.clone()}));
    let _ = w.hist.flush();
    let pretty = serde_json::to_string_pretty(&verdict).expect("json");
    fs::write(s.out.join("verdict.json"), &pretty).expect("verdict.json");
    for n in &w.nodes {
        let _ = fs::copy(n.log(), s.out.join(format!("{}-daemon.log", n.name)));
        let _ = fs::copy(n.cfg(), s.out.join(format!("{}.toml", n.name)));
    }
    let _ = fs::copy(dir.join("zk.log"), s.out.join("zk.log"));
    if !fsck_ok {
        let _ = fs::write(s.out.join("fsck.txt"), &fsck.stdout);
    }
    println!(
        "campaign verdict ({}):\n{pretty}",
        s.out.join("verdict.json").display()
    );
    println!(
        "campaign: seed {} {} (watchdog {}): {} faults, availability {:.1}%, {} failovers p50 {:.2}s p99 {:.2}s max {:.2}s, {} overlaps, {} lost acknowledged records, fsck {}, {} watchdog kills, {} node resets, wall {:.0}s",
        s.seed,
        if failures.is_empty() && liveness.is_empty() { "PASS" } else { "FAIL" },
        s.watchdog.name(),
        applied,
        availability * 100.0,
        failovers.len(),
        percentile(&failovers, 50.0),
        percentile(&failovers, 99.0),
        failovers.last().copied().unwrap_or(0.0),
        w.overlaps.len(),
        lost.len(),
        if fsck_ok { "clean" } else { "NOT CLEAN" },
        w.nodes.iter().map(|n| n.watchdog_kills).sum::<u32>(),
        w.resets.len(),
        wall.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "SAFETY FAILED (seed {}): {failures:?}; replay: {}",
        s.seed,
        s.replay()
    );
    assert!(
        liveness.is_empty(),
        "LIVENESS FAILED (seed {}): {liveness:?}; replay: {}",
        s.seed,
        s.replay()
    );
}
