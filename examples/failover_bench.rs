//! Benchmark behind docs/benchmarks.md: real ZooKeeper and real `nbd-failover daemon` processes with the default timings; failover after holder death split by phase, graceful hand-over, lease-won-to-task-started overhead, daemon memory and idle CPU with N volumes.
//!
//! ```text
//! cargo build --release --bin nbd-failover --example failover_bench
//! sudo target/release/examples/failover_bench [--node-lost-runs N] [--restart-runs N]
//!     [--handover-runs N] [--volumes 1,64,256] [--idle-secs S] [--summary FILE] [--keep-logs DIR]
//! ```
//!
//! Run by `scripts/bench-report.sh`, which turns its output into
//! docs/benchmarks.md. It prints Markdown sections on stdout (progress goes to
//! stderr) and, with `--summary`, writes the headline figures as `KEY=VALUE`
//! lines for the report's comparison table. Numbers are printed, never
//! asserted: the machine's load moves them.
//!
//! What it drives (needs root: loop devices, mount):
//!
//! - one standalone ZooKeeper (Debian's `zookeeper` package, the test
//!   harness's launcher: loopback only, `tickTime=500`);
//! - **failover**: two daemons (`n1`, `n2`) on one `image` volume (a 64 MiB
//!   ext4 image on a loop device, `fsck = "auto"`, so `e2fsck -p` runs), the
//!   test writer as the task, and *no* `[fencing]` table and no
//!   `session_timeout`: every timing is the default. Both share this kernel,
//!   so they run with `node.shared_kernel = true` and mount at their own
//!   paths. Three faults, alternating the holder:
//!   - *node lost*: `kill -9` of the holder's daemon (its task dies with it),
//!     not restarted; its session must expire on the server. Its mount and
//!     loop device are removed by hand right after the kill, as they would
//!     vanish with a dead machine (the new holder's `e2fsck -p` therefore sees
//!     a cleanly unmounted filesystem; after a real crash it also replays the
//!     journal);
//!   - *daemon crash, restarted at once* (systemd `Restart=always`): `kill -9`
//!     and an immediate restart, which fences its leftovers and gives the
//!     lease up uncleanly;
//!   - *graceful hand-over*: SIGTERM of the holder's daemon.
//!
//!   Each phase comes from the new holder's own log: detection (fault ->
//!   `lease won`), lock-delay (-> `attaching under generation`), attach
//!   (-> `device attached`), fsck (-> `filesystem clean`), mount
//!   (-> `mounted: starting the task`), start (-> `task started`).
//! - **footprint**: one daemon with N `dir` volumes (each directory a small
//!   tmpfs mount, standing in for a shared filesystem), each running
//!   `/bin/sleep infinity` as its task, all on one ZooKeeper session. Once
//!   every task runs and a settle time has passed, it reads the daemon's RSS
//!   and PSS (`/proc/PID/status`, `/proc/PID/smaps_rollup`) and its CPU time
//!   and context switches over an idle window (`/proc/PID/stat`, every
//!   thread's `status`). The tasks are not counted.

#[path = "../tests/support/zk.rs"]
#[allow(dead_code)]
mod zk;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zk::{TempDir, ZkServer};

struct Args {
    node_lost_runs: usize,
    restart_runs: usize,
    handover_runs: usize,
    volumes: Vec<usize>,
    idle_secs: u64,
    settle_secs: u64,
    bin: PathBuf,
    summary: Option<PathBuf>,
    keep_logs: Option<PathBuf>,
}

fn usage() -> String {
    "usage: failover_bench [--node-lost-runs N] [--restart-runs N] [--handover-runs N] \
     [--volumes 1,64,256] [--idle-secs S] [--settle-secs S] [--bin PATH] [--summary FILE] \
     [--keep-logs DIR]"
        .to_string()
}

fn args() -> Result<Args, String> {
    let default_bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("nbd-failover")))
        .unwrap_or_else(|| PathBuf::from("target/release/nbd-failover"));
    let mut a = Args {
        node_lost_runs: 5,
        restart_runs: 5,
        handover_runs: 10,
        volumes: vec![1, 64, 256],
        idle_secs: 60,
        settle_secs: 5,
        bin: default_bin,
        summary: None,
        keep_logs: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("{k} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--node-lost-runs" => a.node_lost_runs = num(val()?)?,
            "--restart-runs" => a.restart_runs = num(val()?)?,
            "--handover-runs" => a.handover_runs = num(val()?)?,
            "--idle-secs" => a.idle_secs = num(val()?)? as u64,
            "--settle-secs" => a.settle_secs = num(val()?)? as u64,
            "--volumes" => {
                a.volumes = val()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.trim().parse::<usize>().map_err(|e| format!("{k}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--bin" => a.bin = PathBuf::from(val()?),
            "--summary" => a.summary = Some(PathBuf::from(val()?)),
            "--keep-logs" => a.keep_logs = Some(PathBuf::from(val()?)),
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    if a.volumes.contains(&0) {
        return Err("--volumes: counts must be at least 1".into());
    }
    Ok(a)
}

fn main() {
    let mut a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("failover_bench: {e}");
            std::process::exit(2);
        }
    };
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("failover_bench: needs root (loop devices, mount)");
        std::process::exit(2);
    }
    if !a.bin.exists() {
        eprintln!(
            "failover_bench: {} not found (build it: cargo build --release --bin nbd-failover, or pass --bin)",
            a.bin.display()
        );
        std::process::exit(2);
    }
    // The daemons' task runs it too, and a task must be an absolute path.
    a.bin = match a.bin.canonicalize() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("failover_bench: {}: {e}", a.bin.display());
            std::process::exit(2);
        }
    };
    let zk = ZkServer::start();
    progress(&format!("ZooKeeper up at {}", zk.address()));
    let mut summary = Summary::default();
    let mut out = String::new();
    failover(&a, &zk, &mut out, &mut summary);
    footprint(&a, &zk, &mut out, &mut summary);
    drop(zk);
    print!("{out}");
    if let Some(p) = &a.summary {
        fs::write(p, summary.0).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}

fn progress(msg: &str) {
    eprintln!("failover_bench: {msg}");
}

/// Headline figures as `KEY=VALUE` lines (shell-sourceable; values never contain spaces).
#[derive(Default)]
struct Summary(String);

impl Summary {
    fn set(&mut self, key: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{key}={value}");
    }
}

// ---------------------------------------------------------------------------
// Clock and log helpers

/// Seconds since the Unix epoch, now.
fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Days from 1970-01-01 to the civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Epoch seconds of a daemon log line (`2026-11-26T13:45:47.016474Z  INFO ...`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|s| s.parse::<i64>());
    let (y, mo, da) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.trim_end_matches('Z');
    let mut t = time.split(':');
    let h: f64 = t.next()?.parse().ok()?;
    let mi: f64 = t.next()?.parse().ok()?;
    let s: f64 = t.next()?.parse().ok()?;
    Some(days_from_civil(y, mo, da) as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + s)
}

/// The first log line containing `needle` at or after `after` (epoch seconds).
fn first_after(log: &str, needle: &str, after: f64) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(log_time)
        .find(|t| *t >= after)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank: p50 of an even count is the lower middle.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `p50 / max` of `xs` in seconds, formatted.
fn p50_max(xs: &[f64]) -> (f64, f64) {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    (quantile(&v, 0.5), v.last().copied().unwrap_or(f64::NAN))
}

fn secs(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3} s")
    } else {
        "–".to_string()
    }
}

fn millis(x: f64) -> String {
    if x.is_finite() {
        format!("{:.0} ms", x * 1e3)
    } else {
        "–".to_string()
    }
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn free_port() -> u16 {
    zk::free_ports(1)[0]
}

// ---------------------------------------------------------------------------
// Daemons

struct Daemon {
    name: String,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn new(name: &str, dir: PathBuf, bin: &Path, config: &str) -> Daemon {
        fs::create_dir_all(&dir).expect("daemon dir");
        let d = Daemon {
            name: name.to_string(),
            dir,
            bin: bin.to_path_buf(),
            child: None,
        };
        fs::write(d.cfg(), config).expect("config");
        let check = Command::new(&d.bin)
            .arg("check-config")
            .arg(d.cfg())
            .output()
            .expect("check-config");
        assert!(
            check.status.success(),
            "{}: check-config failed:\n{}",
            d.name,
            String::from_utf8_lossy(&check.stderr)
        );
        d
    }
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
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("daemon log");
        let child = Command::new(&self.bin)
            .args(["daemon", "--config"])
            .arg(self.cfg())
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
    }

    /// SIGTERM, then waits for the exit; returns how long that took and whether it exited 0.
    fn sigterm(&mut self, limit: Duration) -> (Duration, bool) {
        let mut child = self.child.take().expect("running");
        let t = Instant::now();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return (t.elapsed(), st.success());
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {limit:?} after SIGTERM:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    fn log_text(&self) -> String {
        fs::read(self.log())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    fn acks(&self) -> usize {
        fs::read_to_string(self.ack())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `cond` every 10 ms until it holds; panics with `what` and `logs` after `limit`.
fn wait_until(what: &str, limit: Duration, logs: &[&Daemon], mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            let tails: Vec<String> = logs
                .iter()
                .map(|d| format!("--- {} ---\n{}", d.name, d.log_tail()))
                .collect();
            panic!(
                "timed out after {limit:?} waiting for {what}\n{}",
                tails.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Failover

const PHASES: [(&str, &str); 6] = [
    ("detection", "lease won"),
    ("lock-delay", "attaching under generation"),
    ("attach", "device attached"),
    ("fsck", "filesystem clean"),
    ("mount", "mounted: starting the task"),
    ("start", "task started"),
];

/// One failover as seen in the new holder's log: each phase's length (NaN if missing) and the total.
struct Phases {
    phase: [f64; 6],
    total: f64,
    /// Fault to the new holder's first acknowledged record.
    first_ack: f64,
    /// The new holder found no clean release of its predecessor (so it waited out the lock-delay).
    unclean: bool,
}

fn phases(log: &str, fault: f64) -> Phases {
    let mut phase = [f64::NAN; 6];
    let mut prev = fault;
    for (i, (_, needle)) in PHASES.iter().enumerate() {
        if let Some(t) = first_after(log, needle, prev) {
            phase[i] = t - prev;
            prev = t;
        }
    }
    let total = if phase.iter().all(|p| p.is_finite()) {
        prev - fault
    } else {
        f64::NAN
    };
    Phases {
        phase,
        total,
        first_ack: f64::NAN,
        unclean: first_after(log, "after an unclean predecessor", fault).is_some(),
    }
}

fn node_config(name: &str, dir: &Path, zk: &str, chroot: &str, image: &Path, bin: &Path) -> String {
    format!(
        r#"# Benchmark node {name}: every timing is the default (no [fencing], no session_timeout).
[node]
id = "bench-{name}"
state_dir = "{d}/state"
run_dir = "{d}/run"
shared_kernel = true

[zookeeper]
hosts = ["{zk}"]
chroot = "{chroot}"

[metrics]
listen = "127.0.0.1:{port}"

[volumes.data]
backend = "image"
mount_path = "{d}/mnt"
filesystem = "ext4"
fsck = "auto"

[volumes.data.image]
path = "{image}"

[volumes.data.task]
exec = ["{bin}", "testkit", "writer", "--ack", "{d}/ack", "--node", "{name}", "--interval-ms", "10"]
"#,
        d = dir.display(),
        image = image.display(),
        port = free_port(),
        bin = bin.display(),
    )
}

/// Removes what a dead holder left on this kernel: its mount and its loop device.
fn clear_leftovers(mnt: &Path, image: &Path) {
    let t = Instant::now();
    loop {
        let st = run("umount", &[&mnt.display().to_string()]);
        if st.status.success() || !is_mounted(mnt) {
            break;
        }
        // The task (killed with its daemon) may still be closing its files.
        if t.elapsed() > Duration::from_secs(5) {
            let _ = run("umount", &["-l", &mnt.display().to_string()]);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    detach_loops(image);
}

fn detach_loops(image: &Path) {
    let out = run("losetup", &["-j", &image.display().to_string()]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(dev) = line.split(':').next() {
            let _ = run("losetup", &["-d", dev]);
        }
    }
}

fn is_mounted(p: &Path) -> bool {
    let want = p.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(want.as_str()))
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    NodeLost,
    DaemonRestart,
    Handover,
}

fn failover(a: &Args, zk: &ZkServer, out: &mut String, summary: &mut Summary) {
    let tmp = TempDir::new("bench-failover");
    let image = tmp.path().join("volume.img");
    let f = fs::File::create(&image).expect("image");
    f.set_len(64 << 20).expect("size the image");
    drop(f);
    let st = run("mkfs.ext4", &["-q", "-F", &image.display().to_string()]);
    assert!(st.status.success(), "mkfs.ext4 failed");
    let chroot = format!("/bench-failover-{}", std::process::id());
    let mut nodes: Vec<Daemon> = ["n1", "n2"]
        .iter()
        .map(|n| {
            let dir = tmp.path().join(n);
            fs::create_dir_all(dir.join("mnt")).expect("mnt");
            let cfg = node_config(n, &dir, &zk.address(), &chroot, &image, &a.bin);
            Daemon::new(n, dir, &a.bin, &cfg)
        })
        .collect();

    // Cold start on a clean volume: n1 alone.
    let t0 = now_epoch();
    nodes[0].start();
    wait_until(
        "n1 to start its task",
        Duration::from_secs(60),
        &[&nodes[0]],
        || nodes[0].acks() >= 5,
    );
    let cold = phases(&nodes[0].log_text(), t0);
    let cold_won = first_after(&nodes[0].log_text(), "lease won", t0).unwrap_or(f64::NAN);
    let cold_started = first_after(&nodes[0].log_text(), "task started", t0).unwrap_or(f64::NAN);
    progress(&format!(
        "cold start: daemon start to task started {}, lease won to task started {}",
        secs(cold.total),
        millis(cold_started - cold_won)
    ));
    nodes[1].start();
    wait_until("n2 to queue", Duration::from_secs(30), &[&nodes[1]], || {
        nodes[1].count("contending for the lease") >= 1
    });

    let mut plan = Vec::new();
    plan.extend(std::iter::repeat(Fault::Handover).take(a.handover_runs));
    plan.extend(std::iter::repeat(Fault::DaemonRestart).take(a.restart_runs));
    plan.extend(std::iter::repeat(Fault::NodeLost).take(a.node_lost_runs));
    // (fault, phases, old holder's stop time on SIGTERM, whether it exited 0,
    // whether its log gained the "still shared at shutdown" error)
    let mut results: Vec<(Fault, Phases, f64, bool, bool)> = Vec::new();
    let mut holder = 0usize;
    for (i, fault) in plan.iter().enumerate() {
        let standby = 1 - holder;
        // The standby must be queued and the holder's task writing.
        let acks_before = nodes[holder].acks();
        wait_until(
            "the holder's task to write",
            Duration::from_secs(30),
            &[&nodes[holder]],
            || nodes[holder].acks() >= acks_before + 3,
        );
        let contend_before = nodes[holder].count("contending for the lease");
        let s_acks = nodes[standby].acks();
        let t_fault = now_epoch();
        let t_inst = Instant::now();
        const SHARED: &str = "lease service still shared at shutdown";
        let shared_before = nodes[holder].count(SHARED);
        let mut holder_stop = f64::NAN;
        let mut holder_exit_ok = true;
        match fault {
            Fault::Handover => {
                let (d, ok) = nodes[holder].sigterm(Duration::from_secs(30));
                holder_stop = d.as_secs_f64();
                holder_exit_ok = ok;
            }
            Fault::DaemonRestart => {
                nodes[holder].kill9();
                nodes[holder].start();
            }
            Fault::NodeLost => {
                nodes[holder].kill9();
                clear_leftovers(&nodes[holder].mnt(), &image);
            }
        }
        let mut first_ack = f64::NAN;
        {
            let (h, s) = (&nodes[holder], &nodes[standby]);
            wait_until(
                "the standby to take over",
                Duration::from_secs(90),
                &[h, s],
                || {
                    if s.acks() > s_acks {
                        first_ack = t_inst.elapsed().as_secs_f64();
                        true
                    } else {
                        false
                    }
                },
            );
        }
        let mut p = phases(&nodes[standby].log_text(), t_fault);
        p.first_ack = first_ack;
        progress(&format!(
            "run {}/{} {}: task started {} after the fault, first acknowledged write {}{}{}",
            i + 1,
            plan.len(),
            fault_name(*fault),
            secs(p.total),
            secs(p.first_ack),
            if holder_exit_ok {
                ""
            } else {
                "; the old holder's daemon exited non-zero"
            },
            if p.unclean && *fault == Fault::Handover {
                "; no clean release seen: lock-delay"
            } else {
                ""
            }
        ));
        let shared = nodes[holder].count(SHARED) > shared_before;
        results.push((*fault, p, holder_stop, holder_exit_ok, shared));
        // The old holder comes back as the standby.
        match fault {
            Fault::DaemonRestart => {}
            Fault::Handover | Fault::NodeLost => nodes[holder].start(),
        }
        let h = &nodes[holder];
        wait_until(
            "the old holder to queue again",
            Duration::from_secs(60),
            &[h],
            || h.count("contending for the lease") > contend_before,
        );
        holder = standby;
    }
    for n in &mut nodes {
        if n.child.is_some() {
            n.sigterm(Duration::from_secs(60));
        }
    }
    for n in &nodes {
        if is_mounted(&n.mnt()) {
            let _ = run("umount", &["-l", &n.mnt().display().to_string()]);
        }
    }
    detach_loops(&image);
    let fsck = run("e2fsck", &["-fn", &image.display().to_string()]);
    keep_logs(a, &nodes);

    // --- Report
    let _ = writeln!(
        out,
        "## Failover after the holder's death (default timings)\n"
    );
    let _ = writeln!(
        out,
        "Two daemons, one `image` volume (64 MiB ext4 on a loop device, `fsck = \"auto\"`, \
         so `e2fsck -p` runs before every mount), the test writer as the task. No `[fencing]` \
         table and no `session_timeout` in the configs: session timeout T = 10 s, \
         suspend_grace 2 s, stop_grace 3 s, lock_delay 5 s (`src/core/policy.rs`, \
         `src/config/schema.rs`). Phases are read from the new holder's log: detection = fault → \
         `lease won`; lock-delay → `attaching under generation`; attach → `device attached`; \
         fsck → `filesystem clean`; mount → `mounted: starting the task`; start → `task started`. \
         \"First write\" is the fault → the new holder's task's first acknowledged (fsync'd) record.\n"
    );
    let _ = writeln!(
        out,
        "- **node lost**: `kill -9` of the holder's daemon, not restarted (as when the machine \
         dies): the other node wins once ZooKeeper expires the dead session, then waits out the \
         lock-delay because the predecessor did not release cleanly. The dead node's mount and \
         loop device are removed by the benchmark right after the kill, as they would vanish \
         with the machine, so `e2fsck -p` sees a cleanly unmounted filesystem (after a real crash \
         it also replays the journal).\n\
         - **daemon crash, restarted at once** (systemd `Restart=always`): `kill -9` and an \
         immediate restart; the restarted daemon fences its leftovers (task, mount, loop device) \
         and deletes its old lock node without a clean record, so the other node wins at once \
         and waits out the lock-delay.\n\
         - **graceful hand-over**: SIGTERM of the holder's daemon; it stops its task, unmounts, \
         detaches and releases cleanly, so the other node skips the lock-delay.\n"
    );
    let _ = writeln!(
        out,
        "| fault | runs | detection | lock-delay | attach | fsck | mount | start | **total** (fault → task started) | first write |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for f in [Fault::NodeLost, Fault::DaemonRestart, Fault::Handover] {
        let rs: Vec<&Phases> = results.iter().filter(|r| r.0 == f).map(|r| &r.1).collect();
        if rs.is_empty() {
            continue;
        }
        let mut row = format!("| {} | {} ", fault_name(f), rs.len());
        for i in 0..6 {
            let (p50, max) = p50_max(&rs.iter().map(|p| p.phase[i]).collect::<Vec<_>>());
            let _ = write!(row, "| {} / {} ", secs(p50), secs(max));
        }
        let (t50, tmax) = p50_max(&rs.iter().map(|p| p.total).collect::<Vec<_>>());
        let (w50, wmax) = p50_max(&rs.iter().map(|p| p.first_ack).collect::<Vec<_>>());
        let _ = writeln!(
            row,
            "| **{} / {}** | {} / {} |",
            secs(t50),
            secs(tmax),
            secs(w50),
            secs(wmax)
        );
        out.push_str(&row);
        let key = match f {
            Fault::NodeLost => "NODE_LOST",
            Fault::DaemonRestart => "DAEMON_RESTART",
            Fault::Handover => "HANDOVER",
        };
        summary.set(&format!("{key}_RUNS"), rs.len());
        summary.set(&format!("{key}_P50"), format!("{t50:.2}"));
        summary.set(&format!("{key}_MAX"), format!("{tmax:.2}"));
        summary.set(&format!("{key}_FIRST_WRITE_P50"), format!("{w50:.2}"));
    }
    let _ = writeln!(
        out,
        "\nEach cell is p50 / max over the runs (nearest rank; with few runs the p50 is one of \
         them). The detection of a lost node is the server-side session expiry: T = 10 s after \
         the last packet the server received from the dead daemon (its last ping, sent a \
         moment before the kill, so detection can be a little under T), rounded up to \
         ZooKeeper's expiry tick (500 ms here; with `tickTime=2000`, ZooKeeper's sample value, \
         up to 2 s).\n"
    );

    // Graceful hand-over detail.
    let hand: Vec<&(Fault, Phases, f64, bool, bool)> =
        results.iter().filter(|r| r.0 == Fault::Handover).collect();
    if !hand.is_empty() {
        let (stop50, stopmax) = p50_max(&hand.iter().map(|r| r.2).collect::<Vec<_>>());
        let (tot50, totmax) = p50_max(&hand.iter().map(|r| r.1.total).collect::<Vec<_>>());
        let (w50, wmax) = p50_max(&hand.iter().map(|r| r.1.first_ack).collect::<Vec<_>>());
        let clean_totals: Vec<f64> = hand
            .iter()
            .filter(|r| !r.1.unclean)
            .map(|r| r.1.total)
            .collect();
        let (c50, cmax) = p50_max(&clean_totals);
        let _ = writeln!(out, "## Graceful hand-over\n");
        let _ = writeln!(
            out,
            "SIGTERM of the holder's daemon, {} runs (p50 / max):\n\n\
             | | p50 | max |\n|---|---|---|\n\
             | old holder: SIGTERM → daemon exited (task stopped, unmounted, detached, lease released) | {} | {} |\n\
             | SIGTERM → new holder's task started | {} | {} |\n\
             | SIGTERM → new holder's first acknowledged write | {} | {} |\n\
             | SIGTERM → new holder's task started, clean releases only ({} runs) | {} | {} |\n",
            hand.len(),
            secs(stop50),
            secs(stopmax),
            secs(tot50),
            secs(totmax),
            secs(w50),
            secs(wmax),
            clean_totals.len(),
            secs(c50),
            secs(cmax)
        );
        summary.set("HANDOVER_CLEAN_P50", format!("{c50:.2}"));
        summary.set("HANDOVER_CLEAN_MAX", format!("{cmax:.2}"));
        let _ = writeln!(
            out,
            "The writer task stops at once on SIGTERM; a database's own shutdown time adds to \
             the first line (up to `stop_grace`, default 3 s, before SIGKILL).\n"
        );
        let unclean = hand.iter().filter(|r| r.1.unclean).count();
        let bad_exit = hand.iter().filter(|r| !r.3).count();
        let shared = hand.iter().filter(|r| r.4).count();
        let _ = writeln!(
            out,
            "Hand-overs the new holder saw as a clean release: **{} of {}**. The old holder's \
             daemon exited non-zero after SIGTERM in {} of {}; its log ended with `daemon: lease \
             service still shared at shutdown` in {} of {}.{}\n",
            hand.len() - unclean,
            hand.len(),
            bad_exit,
            hand.len(),
            shared,
            hand.len(),
            if unclean > 0 {
                " A hand-over not seen as clean makes the new holder wait until the old session \
                 expires on the server (T) and then for the lock-delay, as after a crash: that \
                 is the max above. It is a defect (the daemon exits without its lease service \
                 sending the clean release), not a cost of the design."
            } else {
                ""
            }
        );
        summary.set("HANDOVER_STOP_P50", format!("{stop50:.2}"));
        summary.set("HANDOVER_CLEAN", hand.len() - unclean);
    }

    // Controller overhead: lease won -> task started without lock-delay.
    let clean_hand: Vec<&&(Fault, Phases, f64, bool, bool)> =
        hand.iter().filter(|r| !r.1.unclean).collect();
    let mut overhead: Vec<f64> = clean_hand.iter().map(|r| overhead_of(&r.1)).collect();
    let cold_over = cold_started - cold_won;
    overhead.push(cold_over);
    let (o50, omax) = p50_max(&overhead);
    let parts = |i: usize| p50_max(&clean_hand.iter().map(|r| r.1.phase[i]).collect::<Vec<_>>());
    let _ = writeln!(out, "## Controller overhead: lease won → task started\n");
    let _ = writeln!(
        out,
        "On a clean volume with no lock-delay to wait (the hand-overs released cleanly, and the \
         first start), from the `lease won` log line to `task started`: loop attach, `e2fsck -p`, \
         mount, spawning the task, and the daemon's own scheduling in between. {} samples.\n\n\
         | | p50 | max |\n|---|---|---|\n\
         | attach (loop device) | {} | {} |\n\
         | fsck (`e2fsck -p`) | {} | {} |\n\
         | mount | {} | {} |\n\
         | task start (spawn) | {} | {} |\n\
         | **lease won → task started** | **{}** | **{}** |\n\
         | first start on a fresh volume (lease won → task started) | {} | |\n",
        overhead.len(),
        millis(parts(2).0),
        millis(parts(2).1),
        millis(parts(3).0),
        millis(parts(3).1),
        millis(parts(4).0),
        millis(parts(4).1),
        millis(parts(5).0),
        millis(parts(5).1),
        millis(o50),
        millis(omax),
        millis(cold_over),
    );
    summary.set("OVERHEAD_P50_MS", format!("{:.0}", o50 * 1e3));
    summary.set("OVERHEAD_MAX_MS", format!("{:.0}", omax * 1e3));
    let fsck_ok = fsck.status.success();
    let _ = writeln!(
        out,
        "After the runs: `e2fsck -fn` on the image: {}.\n",
        if fsck_ok {
            "clean".to_string()
        } else {
            format!("**problems** (exit {})", fsck.status.code().unwrap_or(-1))
        }
    );
}

/// Copies the daemons' logs to `--keep-logs DIR`, if given.
fn keep_logs(a: &Args, daemons: &[Daemon]) {
    let Some(dir) = &a.keep_logs else { return };
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for d in daemons {
        let to = dir.join(format!("{}.log", d.name));
        if let Err(e) = fs::copy(d.log(), &to) {
            progress(&format!("cannot keep {}: {e}", to.display()));
        }
    }
}

fn overhead_of(p: &Phases) -> f64 {
    p.phase[2] + p.phase[3] + p.phase[4] + p.phase[5] + p.phase[1]
}

fn fault_name(f: Fault) -> &'static str {
    match f {
        Fault::NodeLost => "node lost (kill -9, not restarted)",
        Fault::DaemonRestart => "daemon crash, restarted at once",
        Fault::Handover => "graceful hand-over (SIGTERM)",
    }
}

// ---------------------------------------------------------------------------
// Footprint

/// Tmpfs mounts standing in for shared filesystems; unmounted on drop.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = run("umount", &["-l", &p.display().to_string()]);
        }
    }
}

struct Sample {
    cpu_ticks: u64,
    ctx_switches: u64,
}

fn sample(pid: u32) -> Sample {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f[11].parse().expect("utime");
    let stime: u64 = f[12].parse().expect("stime");
    let mut ctx = 0;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = fs::read_to_string(t.path().join("status")).unwrap_or_default();
            for l in s.lines() {
                if l.starts_with("voluntary_ctxt_switches:")
                    || l.starts_with("nonvoluntary_ctxt_switches:")
                {
                    ctx += l
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    Sample {
        cpu_ticks: utime + stime,
        ctx_switches: ctx,
    }
}

/// A `Key:   N kB` field of a /proc file, in kB.
fn kb_field(path: &str, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn clk_tck() -> f64 {
    let out = run("getconf", &["CLK_TCK"]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0)
}

fn footprint(a: &Args, zk: &ZkServer, out: &mut String, summary: &mut Summary) {
    let hz = clk_tck();
    let _ = writeln!(
        out,
        "## Daemon footprint: memory and idle CPU\n\n\
         One daemon, N `dir` volumes, one ZooKeeper session. Each volume's directory is its own \
         small tmpfs mount (standing in for an NFS or GlusterFS mount; a `dir` volume's \
         \"mount\" step checks that the directory is a mount point) and each runs \
         `/bin/sleep infinity` as its task, so every volume is held, checked and serving. \
         Default timings. Measured after every task has started and {} s have passed: RSS and \
         PSS of the daemon process (`/proc/PID/status` VmRSS, `/proc/PID/smaps_rollup` Pss; the \
         tasks are separate processes and not counted), its peak RSS (VmHWM), and its CPU time \
         (user + system, all threads, `/proc/PID/stat`) and context switches (all threads) over \
         an idle window of {} s in which nothing changes. CPU is in % of one core.\n",
        a.settle_secs, a.idle_secs
    );
    let _ = writeln!(
        out,
        "| volumes | start → all tasks running | RSS | PSS | peak RSS | threads | idle CPU (% of one core) | wake-ups/s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for &n in &a.volumes {
        let tmp = TempDir::new(&format!("bench-fp{n}"));
        let mut mounts = Mounts(Vec::new());
        let mut cfg = format!(
            "# Benchmark: {n} dir volumes, default timings.\n\
             [node]\nid = \"bench-fp{n}\"\nstate_dir = \"{d}/state\"\nrun_dir = \"{d}/run\"\n\n\
             [zookeeper]\nhosts = [\"{zk}\"]\nchroot = \"/bench-fp{n}-{pid}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            d = tmp.path().display(),
            zk = zk.address(),
            pid = std::process::id(),
            port = free_port()
        );
        for i in 0..n {
            let data = tmp.path().join(format!("shared/v{i}"));
            fs::create_dir_all(&data).expect("volume dir");
            let st = run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=1m",
                    "tmpfs",
                    &data.display().to_string(),
                ],
            );
            assert!(
                st.status.success(),
                "mount tmpfs: {}",
                String::from_utf8_lossy(&st.stderr)
            );
            mounts.0.push(data.clone());
            let _ = write!(
                cfg,
                "\n[volumes.v{i}]\nbackend = \"dir\"\nmount_path = \"{m}\"\n\n\
                 [volumes.v{i}.dir]\npath = \"{p}\"\n\n\
                 [volumes.v{i}.task]\nexec = [\"/bin/sleep\", \"infinity\"]\n",
                m = data.display(),
                p = data.display()
            );
        }
        let mut d = Daemon::new(&format!("fp{n}"), tmp.path().join("daemon"), &a.bin, &cfg);
        let t = Instant::now();
        d.start();
        wait_until(
            &format!("all {n} tasks to start"),
            Duration::from_secs(120 + n as u64),
            &[&d],
            || d.count("task started") >= n,
        );
        let up = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(a.settle_secs));
        let pid = d.pid();
        let s0 = sample(pid);
        let w0 = Instant::now();
        std::thread::sleep(Duration::from_secs(a.idle_secs));
        let s1 = sample(pid);
        let window = w0.elapsed().as_secs_f64();
        let status = format!("/proc/{pid}/status");
        let rss = kb_field(&status, "VmRSS").unwrap_or(0);
        let hwm = kb_field(&status, "VmHWM").unwrap_or(0);
        let threads = kb_field(&status, "Threads").unwrap_or(0);
        let pss = kb_field(&format!("/proc/{pid}/smaps_rollup"), "Pss").unwrap_or(0);
        let cpu = (s1.cpu_ticks - s0.cpu_ticks) as f64 / hz / window * 100.0;
        let wakeups = (s1.ctx_switches - s0.ctx_switches) as f64 / window;
        let (stopped, _) = d.sigterm(Duration::from_secs(120));
        keep_logs(a, std::slice::from_ref(&d));
        progress(&format!(
            "{n} volumes: up in {up:.2}s, RSS {rss} kB, PSS {pss} kB, CPU {cpu:.3}%, {wakeups:.1} wake-ups/s; stopped in {:.2}s",
            stopped.as_secs_f64()
        ));
        let _ = writeln!(
            out,
            "| {n} | {up:.2} s | {:.1} MiB | {:.1} MiB | {:.1} MiB | {threads} | {cpu:.3} % | {wakeups:.1} |",
            rss as f64 / 1024.0,
            pss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        summary.set(
            &format!("RSS_{n}_MIB"),
            format!("{:.1}", rss as f64 / 1024.0),
        );
        summary.set(
            &format!("PSS_{n}_MIB"),
            format!("{:.1}", pss as f64 / 1024.0),
        );
        summary.set(&format!("CPU_{n}_PCT"), format!("{cpu:.3}"));
        drop(d);
        drop(mounts);
    }
    let _ = writeln!(
        out,
        "\nCPU time is counted in clock ticks ({hz:.0} per second), so over a {} s window the \
         resolution is {:.3} % of one core; 0.000 % means less than one tick in the window. \
         Wake-ups are context switches of the daemon's threads per second: what an idle daemon \
         still does (ZooKeeper pings, timers).\n",
        a.idle_secs,
        100.0 / hz / a.idle_secs as f64
    );
}
