//! End to end on the host: real ZooKeeper, real daemons (`nbd-failover daemon`) on an `image` volume (loop device, ext4, e2fsck, mount), a checksummed writer task, and the history checker.
//!
//! Each node is a real daemon process with its own ZooKeeper connection, its
//! own run directory and its own mount path (all nodes share one kernel here,
//! so they run with `node.shared_kernel = true` and cannot share one path as
//! separate machines do). Most scenarios reach ZooKeeper through a TCP proxy
//! per node (one node can be cut off without touching the server); one runs
//! each node in its own network namespace on a veth link to a bridge in a
//! namespace that holds ZooKeeper, and cuts a node by taking its link down.
//! The writer appends fsync'd records tagged with node and generation to the
//! volume and acknowledges each outside it; at the end the checker asserts the
//! records are ordered by generation, no acknowledged record is lost, and
//! `e2fsck -fn` finds the filesystem clean.
//!
//! Scenarios: clean SIGTERM hand-over, kill -9 of the holder's daemon (its
//! task dies with it; restarted, it fences its leftovers), holder cut from
//! ZooKeeper (proxy blackhole; link down in namespaces), a frozen (SIGSTOP)
//! holder killed by the systemd watchdog before another node can win, a
//! corrupted filesystem that no node mounts, a crash-looping task handed over.
//!
//! Needs root (loop devices, mount, namespaces). Fails loudly, never skips.

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::{Proxy, TempDir, ZkServer};

const BIN: &str = env!("CARGO_BIN_EXE_nbd-failover");

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the end-to-end tests need root (loop devices, mount): run them as root (CI does)"
    );
}

struct Node {
    name: String,
    dir: PathBuf,
    /// This node's connection to ZooKeeper, when not in a network namespace.
    proxy: Option<Proxy>,
    /// The node's network namespace, when in one.
    netns: Option<String>,
    child: Option<Child>,
    env: Vec<(String, String)>,
}

/// `prog` in network namespace `ns`, in the host's mount namespace. Not `ip
/// netns exec`: that also gives the process a copy of the host's mounts, and
/// where mount propagation is private a copy taken while another test's volume
/// is mounted keeps that filesystem (and its loop device) alive after the
/// holder unmounts it, so that holder's detach cannot finish (seen as a flaky
/// `a_holder_paused_…` run; docs/campaign.md, finding 2).
fn in_netns(ns: &str, prog: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(prog);
    c
}

impl Node {
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

    fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("daemon log");
        let mut cmd = match &self.netns {
            // Its own network namespace, like a separate machine; the host's
            // mount namespace (see `in_netns`).
            Some(ns) => in_netns(ns, BIN),
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["daemon", "--config"])
            .arg(self.cfg())
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
    }

    fn sigterm(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within {limit:?} after SIGTERM:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    fn acks(&self) -> usize {
        fs::read_to_string(self.ack())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// ZooKeeper's address on the hub bridge (inside our own namespaces only).
const HUB_IP: &str = "10.231.0.1";

/// Network namespaces: a hub holding ZooKeeper on a bridge, and one namespace
/// per node with a veth link to the bridge. Deleted on drop.
struct Hub {
    prefix: String,
    nodes: usize,
    zk: Option<Child>,
    log: PathBuf,
}

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

impl Hub {
    fn ns(&self, who: &str) -> String {
        format!("{}-{who}", self.prefix)
    }

    fn create(nodes: usize, dir: &std::path::Path) -> Hub {
        let prefix = format!("nf{}", std::process::id() % 100_000);
        let mut hub = Hub {
            prefix,
            nodes,
            zk: None,
            log: dir.join("zk.log"),
        };
        let zk = hub.ns("zk");
        ip(&["netns", "add", &zk]);
        for i in 1..=nodes {
            ip(&["netns", "add", &hub.ns(&format!("n{i}"))]);
        }
        ip(&["-n", &zk, "link", "set", "lo", "up"]);
        ip(&["-n", &zk, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &zk,
            "addr",
            "add",
            &format!("{HUB_IP}/24"),
            "dev",
            "br0",
        ]);
        ip(&["-n", &zk, "link", "set", "br0", "up"]);
        for i in 1..=nodes {
            let ns = hub.ns(&format!("n{i}"));
            let hub_end = format!("{}v{i}", hub.prefix);
            ip(&[
                "link", "add", &hub_end, "netns", &zk, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&["-n", &zk, "link", "set", &hub_end, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.231.0.{}/24", 10 + i),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let data = dir.join("zk-data");
        fs::create_dir_all(&data).expect("zk data");
        let cfg = dir.join("zoo.cfg");
        fs::write(
            &cfg,
            format!(
                "tickTime=500\ndataDir={}\nclientPort=2181\nclientPortAddress={HUB_IP}\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=ruok,srvr\nminSessionTimeout=1000\nmaxSessionTimeout=60000\n",
                data.display()
            ),
        )
        .expect("zoo.cfg");
        let log = fs::File::create(&hub.log).expect("zk log");
        let mut cp = format!("{}:{}", support::zk::ZK_CONF, support::zk::ZK_JAR);
        if std::path::Path::new(support::zk::SLF4J_SIMPLE).exists() {
            cp.push(':');
            cp.push_str(support::zk::SLF4J_SIMPLE);
        }
        let child = in_netns(&zk, "java")
            .args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xmx256m"])
            .arg("-Dzookeeper.admin.enableServer=false")
            .arg("-cp")
            .arg(cp)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start ZooKeeper in its namespace");
        hub.zk = Some(child);
        // Ready when it answers ruok from a node's namespace, across the bridge.
        let probe = format!("exec 3<>/dev/tcp/{HUB_IP}/2181 && echo ruok >&3 && timeout 1 cat <&3");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = in_netns(&hub.ns("n1"), "bash")
                .args(["-c", &probe])
                .output()
                .expect("probe");
            if String::from_utf8_lossy(&out.stdout).contains("imok") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ZooKeeper in the hub namespace never answered:\n{}",
                hub.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        hub
    }

    /// Takes node `i`'s (1-based) link down or up.
    fn link(&self, i: usize, up: bool) {
        ip(&[
            "-n",
            &self.ns(&format!("n{i}")),
            "link",
            "set",
            "eth0",
            if up { "up" } else { "down" },
        ]);
    }

    fn log_tail(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(mut c) = self.zk.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns("zk")])
            .status();
        for i in 1..=self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(&format!("n{i}"))])
                .status();
        }
    }
}

/// Per-node additions to the test config.
#[derive(Clone, Default)]
struct Extra {
    /// Replaces the writer task (`exec = [...]`).
    task: Option<String>,
    /// Lines added to `[volumes.data]`.
    volume: String,
    /// Tables appended at the end (e.g. `[watchdog]`, `[volumes.data.restart]`).
    top: String,
    /// Environment of the daemon.
    env: Vec<(String, String)>,
}

struct Cluster {
    zk: Option<ZkServer>,
    hub: Option<Hub>,
    dir: TempDir,
    image: PathBuf,
    /// `qemu-nbd` exporting the image, for the `nbd` backend.
    nbd: Option<Child>,
    nodes: Vec<Node>,
}

/// The volume backend under test: `image` (loop device) on the host, `nbd`
/// (qemu-nbd and the kernel NBD driver) in the VM lab, chosen by `E2E_BACKEND`.
fn nbd_backend() -> bool {
    match std::env::var("E2E_BACKEND").as_deref() {
        Ok("nbd") => true,
        Ok("image") | Err(_) => false,
        Ok(other) => panic!("E2E_BACKEND={other:?}: use image or nbd"),
    }
}

/// Starts `qemu-nbd` exporting `image` as `data` on `addr:port` (in namespace `ns` if given).
/// The child goes to the caller, which kills and reaps it (`Cluster`'s drop).
#[allow(clippy::zombie_processes)]
fn start_qemu_nbd(
    image: &std::path::Path,
    addr: &str,
    port: u16,
    ns: Option<&str>,
    log: &std::path::Path,
) -> Child {
    let mut cmd = match ns {
        Some(ns) => in_netns(ns, "qemu-nbd"),
        None => Command::new("qemu-nbd"),
    };
    let log = fs::File::create(log).expect("qemu-nbd log");
    let child = cmd
        .args([
            "-f",
            "raw",
            "-x",
            "data",
            "-b",
            addr,
            "-p",
            &port.to_string(),
            "-t",
            "--shared=8",
        ])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("start qemu-nbd (package qemu-utils)");
    // Ready when it accepts a connection (polled; nbdinfo is not needed).
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = format!("exec 3<>/dev/tcp/{addr}/{port}");
    loop {
        let mut c = match ns {
            Some(ns) => {
                let mut c = in_netns(ns, "bash");
                c.args(["-c", &probe]);
                c
            }
            None => {
                let mut c = Command::new("bash");
                c.args(["-c", &probe]);
                c
            }
        };
        if c.stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
            return child;
        }
        if Instant::now() >= deadline {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            panic!("qemu-nbd never listened on {addr}:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    fn new(tag: &str, n: usize) -> Cluster {
        Cluster::with(tag, n, |_| Extra::default())
    }

    /// A cluster whose node `i` (0-based) gets `extra(i)` on top of the defaults.
    fn with(tag: &str, n: usize, extra: impl Fn(usize) -> Extra) -> Cluster {
        Cluster::build(tag, n, extra, false)
    }

    /// Each node in its own network namespace, on a veth link to a bridge in a
    /// namespace that holds ZooKeeper (no proxy: partitions are link-down).
    fn in_namespaces(tag: &str, n: usize) -> Cluster {
        Cluster::build(tag, n, |_| Extra::default(), true)
    }

    fn build(tag: &str, n: usize, extra: impl Fn(usize) -> Extra, namespaces: bool) -> Cluster {
        require_root();
        let dir = TempDir::new(tag);
        let (zk, hub) = if namespaces {
            (None, Some(Hub::create(n, dir.path())))
        } else {
            (Some(ZkServer::start()), None)
        };
        let zk_addr = match (&zk, &hub) {
            (Some(z), _) => z.address(),
            (None, _) => format!("{HUB_IP}:2181"),
        };
        let image = dir.path().join("volume.img");
        let f = fs::File::create(&image).expect("image");
        f.set_len(64 << 20).expect("size image");
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .expect("mkfs.ext4");
        assert!(st.success(), "mkfs.ext4 failed");
        let chroot = format!("/e2e-{tag}-{}", std::process::id());
        let nbd = nbd_backend();
        let (nbd_server, nbd_child) = if !nbd {
            (String::new(), None)
        } else if let Some(h) = &hub {
            let port = 10809;
            let child = start_qemu_nbd(
                &image,
                HUB_IP,
                port,
                Some(&h.ns("zk")),
                &dir.path().join("qemu-nbd.log"),
            );
            (format!("{HUB_IP}:{port}"), Some(child))
        } else {
            let port = support::zk::free_ports(1)[0];
            let child = start_qemu_nbd(
                &image,
                "127.0.0.1",
                port,
                None,
                &dir.path().join("qemu-nbd.log"),
            );
            (format!("127.0.0.1:{port}"), Some(child))
        };
        let backend_toml = if nbd {
            format!(
                "[volumes.data.nbd]\nserver = \"{nbd_server}\"\nexport = \"data\"\ntimeout = \"3s\"\ndead_conn_timeout = \"2s\"\n"
            )
        } else {
            format!("[volumes.data.image]\npath = \"{}\"\n", image.display())
        };
        let backend_name = if nbd { "nbd" } else { "image" };
        let nodes = (1..=n)
            .map(|i| {
                let name = format!("n{i}");
                let ndir = dir.path().join(&name);
                fs::create_dir_all(ndir.join("mnt")).expect("node dir");
                let (proxy, netns) = match &hub {
                    Some(h) => (None, Some(h.ns(&name))),
                    None => (Some(Proxy::start(&zk_addr)), None),
                };
                let x = extra(i - 1);
                let node = Node {
                    name: name.clone(),
                    dir: ndir,
                    proxy,
                    netns,
                    child: None,
                    env: x.env.clone(),
                };
                let task = x.task.clone().unwrap_or_else(|| {
                    format!(
                        r#"exec = ["{BIN}", "testkit", "writer", "--ack", "{}", "--node", "{name}", "--interval-ms", "10"]"#,
                        node.ack().display()
                    )
                });
                let cfg = format!(
                    r#"[node]
id = "{tag}-{name}"
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

[volumes.data]
backend = "{backend_name}"
mount_path = "{mnt}"
filesystem = "ext4"
{volume_extra}

{backend_toml}

[volumes.data.task]
{task}
{top_extra}"#,
                    volume_extra = x.volume,
                    top_extra = x.top,
                    d = node.dir.display(),
                    zk = node.proxy.as_ref().map_or(zk_addr.clone(), |p| p.address()),
                    mnt = node.mnt().display(),
                );
                fs::write(node.cfg(), cfg).expect("config");
                let check = Command::new(BIN)
                    .arg("check-config")
                    .arg(node.cfg())
                    .output()
                    .expect("check-config");
                assert!(
                    check.status.success(),
                    "{}",
                    String::from_utf8_lossy(&check.stderr)
                );
                node
            })
            .collect();
        Cluster {
            zk,
            hub,
            dir,
            image,
            nbd: nbd_child,
            nodes,
        }
    }

    /// Waits until `cond` holds, polling every 20 ms; panics with every node's log after `limit`.
    fn wait(
        &self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut(&Cluster) -> bool,
    ) -> Duration {
        let start = Instant::now();
        while !cond(self) {
            if start.elapsed() > limit {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- {} ---\n{}", n.name, n.log_tail()))
                    .collect();
                panic!(
                    "timed out after {limit:?} waiting for {what}\n{}\n--- zookeeper ---\n{}",
                    logs.join("\n"),
                    match (&self.zk, &self.hub) {
                        (Some(z), _) => z.log_tail(),
                        (None, Some(h)) => h.log_tail(),
                        (None, None) => String::new(),
                    }
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }

    /// Starts n1, waits until its writer runs, then starts n2 and waits until it queues.
    fn start_holder_and_standby(&mut self) {
        self.nodes[0].start();
        self.wait("n1 to run its writer", Duration::from_secs(40), |c| {
            grows(&c.nodes[0], 0, 20)
        });
        self.nodes[1].start();
        self.wait("n2 to queue", Duration::from_secs(20), |c| {
            log_has(&c.nodes[1], "contending for the lease")
        });
    }

    /// After a fault at `t0`: waits until n2 attaches, noting when n1's log
    /// showed `fence_marker`; returns both instants relative to `t0`, and
    /// fails if n1 had not finished its fence by the time n2 attached.
    fn fence_then_attach(&self, t0: Instant, fence_marker: &str) -> (Duration, Duration) {
        let mut fenced_at = None;
        let mut attach_at = None;
        self.wait("n2 to attach", Duration::from_secs(30), |c| {
            if fenced_at.is_none() && log_has(&c.nodes[0], fence_marker) {
                fenced_at = Some(t0.elapsed());
            }
            if attach_at.is_none() && log_has(&c.nodes[1], "attaching under generation") {
                attach_at = Some(t0.elapsed());
            }
            attach_at.is_some()
        });
        let fenced = fenced_at.unwrap_or_else(|| {
            panic!(
                "n1 had not finished its fence when n2 attached\n--- n1:\n{}\n--- n2:\n{}",
                self.nodes[0].log_tail(),
                self.nodes[1].log_tail()
            )
        });
        (fenced, attach_at.expect("n2 attached"))
    }

    /// Stops every daemon, then checks the history and the filesystem.
    fn finish(mut self) -> String {
        for n in &mut self.nodes {
            if n.child.is_some() {
                let st = n.sigterm(Duration::from_secs(20));
                assert!(
                    st.success(),
                    "{} exited with {st} on SIGTERM:\n{}",
                    n.name,
                    n.log_tail()
                );
            }
        }
        if let Some(mut q) = self.nbd.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        let probe = self.dir.path().join("probe");
        fs::create_dir_all(&probe).expect("probe dir");
        let st = Command::new("mount")
            .args(["-o", "ro,loop"])
            .arg(&self.image)
            .arg(&probe)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mounting the image read-only for the check failed (still attached somewhere?)"
        );
        let mut check = Command::new(BIN);
        check
            .args(["testkit", "check"])
            .arg(probe.join("records.log"));
        for n in &self.nodes {
            if n.ack().exists() {
                check.arg(n.ack());
            }
        }
        let out = check.output().expect("checker");
        let _ = Command::new("umount").arg(&probe).status();
        let verdict = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(out.status.success(), "history check failed: {verdict}");
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&self.image)
            .output()
            .expect("e2fsck");
        assert!(
            fsck.status.success(),
            "e2fsck -fn found problems:\n{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        verdict
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut q) = self.nbd.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("umount")
                .arg("-l")
                .arg(n.mnt())
                .stderr(Stdio::null())
                .status();
        }
        // Loop devices still bound to our image (a failed test) are freed.
        if let Ok(out) = Command::new("losetup").arg("-j").arg(&self.image).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some(dev) = line.split(':').next() {
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            }
        }
    }
}

/// Seconds since midnight UTC of a daemon log line (`2026-11-26T13:45:47.016474Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let time = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

fn now_of_day() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock");
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_micros()) / 1e6
}

/// The new holder's failover split into phases, from its log after `fault_at`
/// (seconds of day): detection (fault → lease won), lock-delay, attach, fsck,
/// mount and task start. Printed, never asserted (timings are the machine's).
fn phases(n: &Node, fault_at: f64) -> String {
    let log = n.log_text();
    let first = |needle: &str| {
        log.lines()
            .filter(|l| l.contains(needle))
            .filter_map(log_time)
            .find(|t| *t >= fault_at)
    };
    let marks = [
        ("detection", first("lease won")),
        ("lock-delay", first("attaching under generation")),
        ("attach", first("device attached")),
        ("fsck", first("filesystem clean")),
        ("mount", first("mounted: starting the task")),
        ("start", first("task started")),
    ];
    let mut prev = fault_at;
    let mut out = Vec::new();
    for (name, t) in marks {
        match t {
            Some(t) => {
                out.push(format!("{name} {:.3}s", t - prev));
                prev = t;
            }
            None => out.push(format!("{name} ?")),
        }
    }
    format!("{} = {:.3}s", out.join(" + "), prev - fault_at)
}

fn grows(n: &Node, from: usize, by: usize) -> bool {
    n.acks() >= from + by
}

fn log_has(n: &Node, s: &str) -> bool {
    n.log_text().contains(s)
}

#[test]
fn clean_hand_over_then_kill_9_of_the_holder() {
    let mut c = Cluster::new("handover", 2);
    c.nodes[0].start();
    let up = c.wait("n1 to run its writer", Duration::from_secs(30), |c| {
        grows(&c.nodes[0], 0, 20)
    });
    println!(
        "n1: daemon start to 20 acknowledged records: {:.2}s",
        up.as_secs_f64()
    );
    c.nodes[1].start();
    c.wait("n2 to queue", Duration::from_secs(20), |c| {
        log_has(&c.nodes[1], "contending for the lease")
    });

    // Clean hand-over: SIGTERM n1; n2 takes over without lock-delay.
    let t0 = Instant::now();
    let fault_t0 = now_of_day();
    let st = c.nodes[0].sigterm(Duration::from_secs(20));
    assert!(
        st.success(),
        "n1 exit status {st}:\n{}",
        c.nodes[0].log_tail()
    );
    let n2_before = c.nodes[1].acks();
    c.wait("n2 to take over", Duration::from_secs(20), |c| {
        grows(&c.nodes[1], n2_before, 1)
    });
    let handover = t0.elapsed();
    println!("clean hand-over: SIGTERM of the holder to the new holder's first acknowledged record: {:.3}s", handover.as_secs_f64());
    assert!(
        log_has(&c.nodes[1], "predecessor released cleanly"),
        "{}",
        c.nodes[1].log_tail()
    );
    assert!(
        !log_has(&c.nodes[1], "lock-delay"),
        "a clean hand-over must not wait for the lock-delay"
    );

    // n1 queues again; kill -9 the holder n2: its writer dies with it.
    c.nodes[0].start();
    c.wait("n1 to queue", Duration::from_secs(20), |c| {
        c.nodes[0]
            .log_text()
            .matches("contending for the lease")
            .count()
            >= 2
    });
    c.wait("n2 to have written", Duration::from_secs(20), |c| {
        grows(&c.nodes[1], n2_before, 20)
    });
    let t1 = Instant::now();
    let fault_t1 = now_of_day();
    c.nodes[1].kill9();
    let frozen = c.nodes[1].acks();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.nodes[1].acks(),
        frozen,
        "n2's writer kept writing after its daemon was killed"
    );
    // systemd restarts the daemon: it fences its leftovers before contending.
    c.nodes[1].start();
    c.wait("n2 to fence its leftovers", Duration::from_secs(20), |c| {
        log_has(&c.nodes[1], "found leftovers")
    });
    let n1_before = c.nodes[0].acks();
    c.wait("n1 to take over", Duration::from_secs(30), |c| {
        grows(&c.nodes[0], n1_before, 1)
    });
    let failover = t1.elapsed();
    println!("kill -9 of the holder's daemon (restarted at once) to the next holder's first acknowledged record: {:.3}s", failover.as_secs_f64());
    assert!(
        log_has(&c.nodes[0], "after an unclean predecessor: lock-delay"),
        "{}",
        c.nodes[0].log_tail()
    );
    assert!(
        log_has(&c.nodes[1], "fence complete (leftovers of an earlier run)"),
        "{}",
        c.nodes[1].log_tail()
    );
    c.wait("n1 to have written", Duration::from_secs(20), |c| {
        grows(&c.nodes[0], n1_before, 20)
    });
    println!(
        "failover phases, clean hand-over (SIGTERM): {}",
        phases(&c.nodes[1], fault_t0)
    );
    println!(
        "failover phases, kill -9 of the holder's daemon: {}",
        phases(&c.nodes[0], fault_t1)
    );
    let verdict = c.finish();
    println!("history: {verdict}");
}

#[test]
fn a_holder_cut_from_zookeeper_fences_before_the_other_node_takes_over() {
    let mut c = Cluster::new("partition", 2);
    c.start_holder_and_standby();

    let t0 = Instant::now();
    let fault_t0 = now_of_day();
    c.nodes[0].proxy.as_ref().expect("proxy").blackhole();
    let (fenced, attached) = c.fence_then_attach(t0, "device detached: fence complete (suspended");
    println!(
        "partition: n1 fenced {:.3}s after the cut; n2 attached {:.3}s after the cut ({:.3}s later)",
        fenced.as_secs_f64(),
        attached.as_secs_f64(),
        (attached - fenced).as_secs_f64()
    );
    assert!(
        fenced < Duration::from_millis(3500),
        "fence later than T − margin after the cut: {fenced:?}"
    );
    assert!(
        log_has(&c.nodes[1], "after an unclean predecessor: lock-delay"),
        "{}",
        c.nodes[1].log_tail()
    );
    let n2_before = c.nodes[1].acks();
    c.wait("n2 to write", Duration::from_secs(20), |c| {
        grows(&c.nodes[1], n2_before, 20)
    });

    // Heal: n1 finds its session gone and queues again, without touching the volume.
    c.nodes[0].proxy.as_ref().expect("proxy").heal();
    c.wait("n1 to queue again", Duration::from_secs(30), |c| {
        c.nodes[0]
            .log_text()
            .matches("contending for the lease")
            .count()
            >= 2
    });
    println!(
        "failover phases, holder cut from ZooKeeper (proxy): {}",
        phases(&c.nodes[1], fault_t0)
    );
    let verdict = c.finish();
    println!("history: {verdict}");
}

#[test]
fn a_corrupted_filesystem_is_never_mounted_and_the_error_says_why() {
    let mut c = Cluster::new("corrupt", 2);
    // Clear the root inode: e2fsck -p cannot fix that unattended (exit 4).
    let img = c.image.display().to_string();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "debugfs -w -R 'clri <2>' {img} && debugfs -w -R 'ssv state 0' {img}"
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("debugfs");
    assert!(st.success(), "debugfs could not damage the image");
    c.nodes[0].start();
    c.nodes[1].start();
    c.wait(
        "both nodes to refuse the filesystem",
        Duration::from_secs(30),
        |c| {
            c.nodes
                .iter()
                .all(|n| log_has(n, "ALERT: fsck refused the filesystem"))
        },
    );
    for n in &c.nodes {
        let log = n.log_text();
        assert!(
            !log.contains("mounted: starting the task"),
            "{} mounted a damaged filesystem:\n{}",
            n.name,
            n.log_tail()
        );
        assert!(
            log.contains("not mounting; releasing and backing off"),
            "{}",
            n.log_tail()
        );
        assert!(
            log.contains("e2fsck") && log.contains("exit code 4"),
            "the error must say why:\n{}",
            n.log_tail()
        );
        assert_eq!(n.acks(), 0, "{}'s task ran on a damaged filesystem", n.name);
    }
    let line = c.nodes[0]
        .log_text()
        .lines()
        .find(|l| l.contains("ALERT: fsck refused"))
        .unwrap_or_default()
        .to_string();
    println!(
        "refusal as logged: {}",
        line.split("ALERT")
            .nth(1)
            .map_or(line.as_str(), |r| r)
            .chars()
            .take(240)
            .collect::<String>()
    );
    for n in &mut c.nodes {
        let st = n.sigterm(Duration::from_secs(20));
        assert!(st.success(), "{} exit {st}", n.name);
    }
    // Both detached again: nothing of ours is bound to the image.
    if nbd_backend() {
        let attached: Vec<String> = fs::read_dir("/sys/block")
            .expect("/sys/block")
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name().to_string_lossy().starts_with("nbd") && e.path().join("pid").exists()
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            attached.is_empty(),
            "NBD devices still attached: {attached:?}"
        );
        return;
    }
    let out = Command::new("losetup")
        .arg("-j")
        .arg(&c.image)
        .output()
        .expect("losetup");
    assert!(
        out.stdout.is_empty(),
        "still attached: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_crash_looping_task_is_restarted_then_the_volume_handed_over() {
    let mut c = Cluster::with("crashloop", 2, |i| {
        if i == 0 {
            Extra {
                task: Some(r#"exec = ["/bin/sh", "-c", "echo crashing; exit 3"]"#.to_string()),
                top: "[volumes.data.restart]\npolicy = \"on-failure\"\nmax_restarts = 2\nbackoff = \"100ms\"\n".to_string(),
                ..Extra::default()
            }
        } else {
            Extra::default()
        }
    });
    c.nodes[0].start();
    c.wait("n1 to win", Duration::from_secs(20), |c| {
        log_has(&c.nodes[0], "lease won")
    });
    c.nodes[1].start();
    let t = c.wait(
        "n2 to take over from the crash loop",
        Duration::from_secs(30),
        |c| grows(&c.nodes[1], 0, 10),
    );
    let n1 = c.nodes[0].log_text();
    assert!(
        n1.contains("task exited (exit code 3): restart 1/2"),
        "{}",
        c.nodes[0].log_tail()
    );
    assert!(
        n1.contains("task exited (exit code 3): restart 2/2"),
        "{}",
        c.nodes[0].log_tail()
    );
    assert!(
        n1.contains("after 2 restart(s): handing the volume over"),
        "{}",
        c.nodes[0].log_tail()
    );
    assert!(
        log_has(&c.nodes[1], "predecessor released cleanly"),
        "a hand-over is a clean release:\n{}",
        c.nodes[1].log_tail()
    );
    println!(
        "crash loop: n2 writing {:.2}s after it started (n1: 3 starts, then hand-over)",
        t.as_secs_f64()
    );
    let verdict = c.finish();
    println!("history: {verdict}");
}

/// Plays systemd for one daemon: receives its sd_notify datagrams and, like
/// `WatchdogSec=`, kills it when WATCHDOG=1 stops coming (its tasks die with it:
/// parent-death signal, as KillMode=control-group would).
struct FakeSystemd {
    last_pet: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    pets: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeSystemd {
    fn listen(path: &std::path::Path) -> FakeSystemd {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let _ = fs::remove_file(path);
        let sock = std::os::unix::net::UnixDatagram::bind(path).expect("notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let last_pet = Arc::new(Mutex::new(None));
        let pets = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (lp, pc, st) = (last_pet.clone(), pets.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !st.load(Ordering::Relaxed) {
                if let Ok(k) = sock.recv(&mut buf) {
                    if String::from_utf8_lossy(&buf[..k])
                        .lines()
                        .any(|l| l == "WATCHDOG=1")
                    {
                        *lp.lock().unwrap() = Some(Instant::now());
                        pc.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        FakeSystemd {
            last_pet,
            pets,
            stop,
        }
    }

    fn since_last_pet(&self) -> Option<Duration> {
        self.last_pet.lock().unwrap().map(|t| t.elapsed())
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn a_frozen_holder_is_killed_by_the_watchdog_before_another_node_can_win() {
    let dir = TempDir::new("wd-sock");
    let sock = dir.path().join("n1-notify.sock");
    let systemd = FakeSystemd::listen(&sock);
    let sock_s = sock.display().to_string();
    let mut c = Cluster::with("watchdog", 2, |i| {
        if i == 0 {
            Extra {
                top: "[watchdog]\nmode = \"systemd\"\ntimeout = \"2s\"\n".to_string(),
                env: vec![
                    ("NOTIFY_SOCKET".into(), sock_s.clone()),
                    ("WATCHDOG_USEC".into(), "2000000".into()),
                ],
                ..Extra::default()
            }
        } else {
            Extra::default()
        }
    });
    c.start_holder_and_standby();
    assert!(
        systemd.pets.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "n1 never petted the systemd watchdog"
    );

    // Freeze n1's daemon (its task keeps running, as with a GC pause or SIGSTOP).
    let pid = nix::unistd::Pid::from_raw(c.nodes[0].child.as_ref().expect("n1").id() as i32);
    let t0 = Instant::now();
    let fault_t0 = now_of_day();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    // systemd's watchdog: no WATCHDOG=1 for WatchdogSec (2 s) → kill the unit.
    c.wait("the watchdog to expire", Duration::from_secs(10), |_| {
        systemd
            .since_last_pet()
            .is_some_and(|d| d > Duration::from_secs(2))
    });
    let fired = t0.elapsed();
    c.nodes[0].kill9();
    let frozen = c.nodes[0].acks();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.nodes[0].acks(),
        frozen,
        "n1's task kept writing after the watchdog killed its daemon"
    );
    assert!(
        !log_has(&c.nodes[1], "attaching under generation"),
        "n2 attached before the frozen holder was stopped"
    );
    // ... and restarts it (Restart=always): it fences what the frozen run left.
    c.nodes[0].start();
    let n2_before = c.nodes[1].acks();
    c.wait("n2 to take over", Duration::from_secs(30), |c| {
        grows(&c.nodes[1], n2_before, 1)
    });
    let took_over = t0.elapsed();
    println!(
        "frozen holder: watchdog fired {:.2}s after SIGSTOP (WatchdogSec 2s, session timeout 4s); n2 wrote {:.2}s after SIGSTOP",
        fired.as_secs_f64(),
        took_over.as_secs_f64()
    );
    assert!(
        fired < Duration::from_secs(4),
        "the watchdog must fire before the session can expire"
    );
    assert!(
        log_has(&c.nodes[0], "found leftovers"),
        "{}",
        c.nodes[0].log_tail()
    );
    c.wait("n2 to write", Duration::from_secs(20), |c| {
        grows(&c.nodes[1], n2_before, 20)
    });
    println!(
        "failover phases, frozen holder, systemd watchdog: {}",
        phases(&c.nodes[1], fault_t0)
    );
    let verdict = c.finish();
    println!("history: {verdict}");
}

#[test]
fn in_network_namespaces_a_holder_whose_link_goes_down_fences_before_the_other_takes_over() {
    assert!(
        !nbd_backend(),
        "not with the nbd backend: the kernel's nbd generic-netlink family exists only in the \
         initial network namespace, so a daemon in another one cannot attach (vm-lab.sh skips this \
         test visibly)"
    );
    let mut c = Cluster::in_namespaces("netns", 2);
    c.start_holder_and_standby();

    let t0 = Instant::now();
    let fault_t0 = now_of_day();
    c.hub.as_ref().expect("hub").link(1, false);
    let (fenced, attached) = c.fence_then_attach(t0, "device detached: fence complete (suspended");
    println!(
        "netns link down: n1 fenced {:.3}s after the cut; n2 attached {:.3}s after it",
        fenced.as_secs_f64(),
        attached.as_secs_f64()
    );
    assert!(
        fenced < Duration::from_millis(3500),
        "fence later than T - margin after the cut: {fenced:?}"
    );
    let n2_before = c.nodes[1].acks();
    c.wait("n2 to write", Duration::from_secs(20), |c| {
        grows(&c.nodes[1], n2_before, 20)
    });
    c.hub.as_ref().expect("hub").link(1, true);
    c.wait("n1 to queue again", Duration::from_secs(30), |c| {
        c.nodes[0]
            .log_text()
            .matches("contending for the lease")
            .count()
            >= 2
    });
    println!(
        "failover phases, link down (network namespaces): {}",
        phases(&c.nodes[1], fault_t0)
    );
    let verdict = c.finish();
    println!("history: {verdict}");
}

#[test]
fn a_holder_paused_past_the_session_timeout_fences_on_resume_before_the_lock_delay_ends() {
    // No watchdog here: the daemon is SIGSTOPped for longer than T (its task
    // keeps running, still under the lease until the server expires it). On
    // SIGCONT its core sees that ZooKeeper has not answered for longer than
    // suspend_grace and fences at once, starting nothing new; the other node,
    // which won after the expiry from an unclean predecessor, waits out the
    // lock-delay first. (With the watchdog on, the frozen daemon would have
    // been killed after WatchdogSec instead: see the watchdog test.)
    let mut c = Cluster::with("pause", 2, |_| Extra {
        volume: "lock_delay = \"4s\"".to_string(),
        ..Extra::default()
    });
    c.start_holder_and_standby();
    let pid = nix::unistd::Pid::from_raw(c.nodes[0].child.as_ref().expect("n1").id() as i32);
    let t0 = Instant::now();
    let fault_t0 = now_of_day();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    c.wait(
        "n2 to win (after the server expired n1's session)",
        Duration::from_secs(20),
        |c| log_has(&c.nodes[1], "after an unclean predecessor: lock-delay"),
    );
    let won = t0.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let resumed = t0.elapsed();
    let (fenced, attached) = c.fence_then_attach(t0, "device detached: fence complete");
    println!(
        "paused holder: n2 won {:.2}s after SIGSTOP; SIGCONT at {:.2}s; n1 fenced at {:.2}s; n2 attached at {:.2}s (lock-delay 4s)",
        won.as_secs_f64(),
        resumed.as_secs_f64(),
        fenced.as_secs_f64(),
        attached.as_secs_f64()
    );
    let n1 = c.nodes[0].log_text();
    // On resume either the core's own clock or the lease module's missing
    // answers (whichever is processed first) suspends it.
    let suspended = [
        "no answer from ZooKeeper since",
        "ZooKeeper disconnected (last contact",
    ]
    .iter()
    .filter_map(|m| n1.rfind(m))
    .max();
    let Some(at) = suspended else {
        panic!("n1 must suspend at resume:\n{}", c.nodes[0].log_tail());
    };
    let after_resume = &n1[at..];
    assert!(
        !after_resume.contains("attaching under") && !after_resume.contains("starting the task"),
        "n1 brought something up after resuming:\n{}",
        c.nodes[0].log_tail()
    );
    let n2_before = c.nodes[1].acks();
    c.wait("n2 to write", Duration::from_secs(20), |c| {
        grows(&c.nodes[1], n2_before, 20)
    });
    println!(
        "failover phases, holder paused past T, no watchdog: {}",
        phases(&c.nodes[1], fault_t0)
    );
    let verdict = c.finish();
    println!("history: {verdict}");
}
