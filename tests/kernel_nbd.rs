//! Kernel NBD suite: real attach/detach through the kernel driver (and the watchdog device the daemon sets up); runs only inside the VM lab.
//!
//! Built only with `--features kernel-tests` (so a plain `cargo test` on a
//! host without the NBD driver leaves it out on purpose), run by
//! `scripts/vm-lab.sh` inside a virtme-ng VM. Anywhere else it refuses to
//! run and exits 2 with the reason: it never skips silently.
//!
//! Its own harness (no libtest): scenarios run one after another against
//! real `qemu-nbd` servers on 127.0.0.1, each line `test NAME ... ok (T)`,
//! then `kernel-nbd: N passed, N failed` and the wall time. Arguments:
//! `[FILTER]` runs scenarios whose name contains FILTER; `--bench N` runs
//! the attach→detach benchmark instead; `--helper-attach ADDR EXPORT VOLUME
//! GENERATION` is the stand-in daemon of the daemon-death scenario.

mod nbd_support;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nbd_failover::nbd::{
    AttachRequest, Attachment, BackendId, BlockDevices, DetachOptions, Detached, DeviceChoice,
    Generation, KernelNbd, NbdAddress, NbdError,
};
use nbd_support::{make_image, Kind, Opts, Server};

/// Set by the VM lab's script inside the VM.
const VM_ENV: &str = "NBD_FAILOVER_VM";
/// A scenario that takes longer than this is reported and the suite exits.
const SCENARIO_LIMIT: Duration = Duration::from_secs(180);
const IMAGE_SIZE: u64 = 64 << 20;

type Scenario = fn();

const SCENARIOS: &[(&str, Scenario)] = &[
    ("attach_right_after_modprobe", attach_right_after_modprobe),
    (
        "full_cycle_and_reattach_reads_back",
        full_cycle_and_reattach_reads_back,
    ),
    ("two_exports_on_two_devices", two_exports_on_two_devices),
    ("multi_connection_attach", multi_connection_attach),
    (
        "busy_device_is_retried_and_any_picks_another",
        busy_device_is_retried_and_any_picks_another,
    ),
    (
        "discovery_sees_backend_after_attach_none_after_detach",
        discovery_sees_backend_after_attach_none_after_detach,
    ),
    (
        "detach_refused_while_mounted_unless_forced",
        detach_refused_while_mounted_unless_forced,
    ),
    (
        "server_killed_under_io_gives_eio_within_timeout",
        server_killed_under_io_gives_eio_within_timeout,
    ),
    (
        "server_stalled_under_io_gives_eio_within_timeout",
        server_stalled_under_io_gives_eio_within_timeout,
    ),
    (
        "daemon_death_leaves_attachment_until_recovery",
        daemon_death_leaves_attachment_until_recovery,
    ),
    (
        "watchdog_device_gets_the_configured_timeout_and_disarms",
        watchdog_device_gets_the_configured_timeout_and_disarms,
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--helper-attach") {
        helper_attach(&args[1..]);
        return;
    }
    preflight();
    if args.first().map(String::as_str) == Some("--bench") {
        let n = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20);
        bench(n);
        return;
    }
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    let t0 = Instant::now();
    let (mut passed, mut failed) = (0, 0);
    let mut failures = Vec::new();
    for (name, f) in SCENARIOS {
        if filter
            .as_ref()
            .is_some_and(|flt| !name.contains(flt.as_str()))
        {
            continue;
        }
        print!("test {name} ... ");
        let _ = std::io::stdout().flush();
        let started = Instant::now();
        let watchdog = arm_watchdog(name);
        let r = catch_unwind(AssertUnwindSafe(f));
        drop(watchdog);
        let took = started.elapsed();
        match r {
            Ok(()) => {
                passed += 1;
                println!("ok ({:.2}s)", took.as_secs_f64());
            }
            Err(e) => {
                failed += 1;
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                println!("FAILED ({:.2}s)", took.as_secs_f64());
                failures.push(format!("{name}: {msg}"));
            }
        }
    }
    for f in &failures {
        println!("failure: {f}");
    }
    println!("kernel-nbd: wall time {:.1}s", t0.elapsed().as_secs_f64());
    println!("kernel-nbd: {passed} passed, {failed} failed");
    if passed + failed == 0 {
        println!("kernel-nbd: no scenario matched {filter:?}");
        std::process::exit(1);
    }
    std::process::exit(i32::from(failed > 0));
}

/// Refuses to run outside the VM lab (loudly, exit 2).
fn preflight() {
    let mut why = Vec::new();
    if std::env::var(VM_ENV).as_deref() != Ok("1") {
        why.push(format!(
            "{VM_ENV}=1 is not set (only scripts/vm-lab.sh sets it, inside the VM)"
        ));
    }
    let euid =
        std::os::unix::fs::MetadataExt::uid(&fs::metadata("/proc/self").expect("/proc/self"));
    if euid != 0 {
        why.push("not running as root".to_string());
    }
    if !Path::new("/sys/module/nbd").exists() {
        why.push("the nbd module is not loaded (/sys/module/nbd missing)".to_string());
    }
    if !why.is_empty() {
        eprintln!("kernel-nbd: REFUSING TO RUN: this suite needs the kernel NBD driver and runs inside the VM lab:");
        for w in &why {
            eprintln!("kernel-nbd:   - {w}");
        }
        eprintln!("kernel-nbd: run it with: scripts/vm-lab.sh");
        std::process::exit(2);
    }
}

/// Exits the process if a scenario overruns (a hang must not eat the CI hour).
fn arm_watchdog(name: &'static str) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(SCENARIO_LIMIT) {
            println!("TIMEOUT: scenario {name} still running after {SCENARIO_LIMIT:?}");
            println!("kernel-nbd: 0 passed, 1 failed (scenario {name} hung)");
            std::process::exit(3);
        }
    });
    tx
}

// ---------------------------------------------------------------------------
// helpers

fn sh(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn sh_ok(program: &str, args: &[&str]) {
    let out = sh(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Lab {
    dir: tempfile::TempDir,
    nbd: KernelNbd,
}

impl Lab {
    fn new() -> Lab {
        Lab {
            dir: tempfile::Builder::new()
                .prefix("kernel-nbd")
                .tempdir()
                .expect("tempdir"),
            nbd: KernelNbd::new(),
        }
    }

    fn server(&self, name: &str) -> Server {
        let image = make_image(self.dir.path(), &format!("{name}.img"), IMAGE_SIZE);
        Server::start(Kind::QemuNbd, &image, name, &Opts::default())
    }

    fn request(&self, server: &Server, volume: &str, generation: u64) -> AttachRequest {
        let mut r = AttachRequest::new(
            server.address.clone(),
            server.export.clone(),
            BackendId::new(volume, Generation(generation)).expect("backend id"),
        );
        r.request_timeout = Duration::from_secs(5);
        r.dead_conn_timeout = Duration::from_secs(2);
        r
    }

    fn attach(&self, r: &AttachRequest) -> Attachment {
        self.nbd
            .attach(r)
            .unwrap_or_else(|e| panic!("attach {}: {e}", r.backend))
    }

    fn detach_free(&self, index: u32) {
        match self.nbd.detach(index, &DetachOptions::safe()) {
            Ok(Detached::Free) => {}
            other => panic!("detach nbd{index}: expected Free, got {other:?}"),
        }
        let st = self.nbd.status(index).expect("status");
        assert!(
            !st.attached && st.size_bytes == 0,
            "nbd{index} not free: {st:?}"
        );
    }

    fn mountpoint(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

fn read_sector(device: &Path, sector: u64) -> Vec<u8> {
    let mut f = File::open(device).unwrap_or_else(|e| panic!("open {}: {e}", device.display()));
    let mut buf = vec![0u8; 512];
    f.seek(SeekFrom::Start(sector * 512)).expect("seek");
    f.read_exact(&mut buf).expect("read sector");
    buf
}

fn image_sector(image: &Path, sector: u64) -> Vec<u8> {
    let f = File::open(image).expect("open image");
    let mut buf = vec![0u8; 512];
    f.read_exact_at(&mut buf, sector * 512).expect("read image");
    buf
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add((i >> 9) as u8))
        .collect()
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

// ---------------------------------------------------------------------------
// scenarios

/// Reload the module and attach at once to nbd0, the device udev probes first.
fn attach_right_after_modprobe() {
    // udev may still be probing the devices the VM script's modprobe made: retry.
    let mut last = String::new();
    wait_until("rmmod nbd", Duration::from_secs(30), || {
        let out = sh("rmmod", &["nbd"]);
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success() || !Path::new("/sys/module/nbd").exists()
    });
    let _ = last;
    sh_ok("modprobe", &["nbd", "nbds_max=16"]);
    let lab = Lab::new();
    let server = lab.server("early");
    let mut r = lab.request(&server, "early", 1);
    r.device = DeviceChoice::Index(0);
    let a = lab.attach(&r);
    assert_eq!(a.index, 0);
    assert_eq!(read_sector(&a.device, 3), image_sector(&server.image, 3));
    lab.detach_free(a.index);
}

/// attach → mkfs.ext4 → e2fsck → mount → write + fsync → unmount → detach →
/// reattach → e2fsck → mount → read back identical → unmount → detach.
fn full_cycle_and_reattach_reads_back() {
    let lab = Lab::new();
    let server = lab.server("cycle");
    let a = lab.attach(&lab.request(&server, "cycle", 10));
    let dev = a.device.to_str().expect("utf8").to_string();
    assert_eq!(a.export.size, IMAGE_SIZE);
    let st = lab.nbd.status(a.index).expect("status");
    assert!(st.attached && st.size_bytes == IMAGE_SIZE, "{st:?}");
    assert_eq!(
        st.pid,
        Some(std::process::id()),
        "pid file names the attacher"
    );

    sh_ok("mkfs.ext4", &["-q", "-F", &dev]);
    sh_ok("e2fsck", &["-f", "-p", &dev]);
    let mnt = lab.mountpoint("cycle-mnt");
    let mnt_s = mnt.to_str().expect("utf8");
    sh_ok("mount", &["-t", "ext4", &dev, mnt_s]);
    let data = payload(3 << 20, 7);
    {
        let mut f = File::create(mnt.join("data.bin")).expect("create");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
    }
    assert_eq!(
        lab.nbd.status(a.index).expect("status").mounts,
        vec![mnt.clone()]
    );
    sh_ok("umount", &[mnt_s]);
    lab.detach_free(a.index);

    let b = lab.attach(&lab.request(&server, "cycle", 11));
    let dev = b.device.to_str().expect("utf8").to_string();
    sh_ok("e2fsck", &["-f", "-n", &dev]);
    sh_ok("mount", &["-t", "ext4", &dev, mnt_s]);
    let back = fs::read(mnt.join("data.bin")).expect("read back");
    sh_ok("umount", &[mnt_s]);
    assert!(back == data, "data read back after reattach differs");
    lab.detach_free(b.index);
}

/// Two servers, two devices attached at the same time (from two threads).
fn two_exports_on_two_devices() {
    let lab = Lab::new();
    let sa = lab.server("vol-a");
    let sb = lab.server("vol-b");
    let (ra, rb) = (lab.request(&sa, "vol-a", 21), lab.request(&sb, "vol-b", 22));
    let (a, b) = thread::scope(|s| {
        let ha = s.spawn(|| lab.attach(&ra));
        let hb = s.spawn(|| lab.attach(&rb));
        (ha.join().expect("attach a"), hb.join().expect("attach b"))
    });
    assert_ne!(a.index, b.index);
    for (att, server) in [(&a, &sa), (&b, &sb)] {
        for sector in [0, 1000, IMAGE_SIZE / 512 - 1] {
            assert!(
                read_sector(&att.device, sector) == image_sector(&server.image, sector),
                "{} sector {sector} is not {}'s",
                att.device.display(),
                server.export
            );
        }
    }
    let found = lab.nbd.discover().expect("discover");
    for (att, vol, g) in [(&a, "vol-a", 21), (&b, "vol-b", 22)] {
        let d = found
            .iter()
            .find(|d| d.index == att.index)
            .unwrap_or_else(|| panic!("nbd{} not discovered: {found:?}", att.index));
        assert_eq!(
            (d.backend.volume.as_str(), d.backend.generation),
            (vol, Generation(g))
        );
    }
    lab.detach_free(a.index);
    lab.detach_free(b.index);
}

/// Two connections to one export (qemu-nbd advertises NBD_FLAG_CAN_MULTI_CONN):
/// writes through the device reach the image.
fn multi_connection_attach() {
    let lab = Lab::new();
    let server = lab.server("multi");
    let mut r = lab.request(&server, "multi", 25);
    r.connections = 2;
    let a = lab.attach(&r);
    assert_eq!(a.connections, 2);
    assert!(a.export.can_multi_conn());
    let data = payload(1 << 20, 5);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .open(&a.device)
            .expect("open device");
        f.seek(SeekFrom::Start(8 << 20)).expect("seek");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
    }
    lab.detach_free(a.index);
    let mut back = vec![0u8; data.len()];
    File::open(&server.image)
        .expect("image")
        .read_exact_at(&mut back, 8 << 20)
        .expect("read image");
    assert!(
        back == data,
        "data written over two connections is not in the image"
    );
}

/// A device held open (as udev does after modprobe) answers EBUSY: an explicit
/// index is retried until it is released; "any" takes another device at once.
fn busy_device_is_retried_and_any_picks_another() {
    let lab = Lab::new();
    let server = lab.server("busy");
    let k = lab
        .nbd
        .list()
        .expect("list")
        .iter()
        .rev()
        .find(|d| !d.attached)
        .map(|d| d.index)
        .expect("a free device");
    let dev = lab.nbd.status(k).expect("status").device;
    let holder = File::open(&dev).expect("hold the device open");

    let a = lab.attach(&lab.request(&server, "busy-any", 30));
    assert_ne!(
        a.index, k,
        "the kernel must not pick a device someone holds"
    );
    lab.detach_free(a.index);

    let mut quick = lab.request(&server, "busy-quick", 31);
    quick.device = DeviceChoice::Index(k);
    quick.attach_timeout = Duration::from_millis(500);
    match lab.nbd.attach(&quick) {
        Err(NbdError::DeviceBusy { index, .. }) => assert_eq!(index, Some(k)),
        other => panic!("expected DeviceBusy for held nbd{k}, got {other:?}"),
    }

    let mut patient = lab.request(&server, "busy-index", 32);
    patient.device = DeviceChoice::Index(k);
    patient.attach_timeout = Duration::from_secs(20);
    let release = thread::spawn(move || {
        thread::sleep(Duration::from_millis(1500));
        drop(holder);
    });
    let t0 = Instant::now();
    let b = lab.attach(&patient);
    let waited = t0.elapsed();
    release.join().expect("release");
    assert_eq!(b.index, k);
    assert!(
        waited >= Duration::from_millis(1400),
        "attached after {waited:?}, while held?"
    );
    lab.detach_free(b.index);
}

fn discovery_sees_backend_after_attach_none_after_detach() {
    let lab = Lab::new();
    let server = lab.server("disc");
    assert!(
        lab.nbd
            .discover()
            .expect("discover")
            .iter()
            .all(|d| d.backend.volume != "disc-vol"),
        "leftover before the test"
    );
    let a = lab.attach(&lab.request(&server, "disc-vol", 42));
    let raw =
        fs::read_to_string(format!("/sys/block/nbd{}/backend", a.index)).expect("sysfs backend");
    assert_eq!(raw.trim_end(), "nbd-failover:disc-vol:42");
    let found: Vec<_> = lab
        .nbd
        .discover()
        .expect("discover")
        .into_iter()
        .filter(|d| d.backend.volume == "disc-vol")
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].index, a.index);
    assert_eq!(found[0].backend.generation, Generation(42));
    assert!(found[0].attacher_alive);
    lab.detach_free(a.index);
    assert!(
        lab.nbd
            .discover()
            .expect("discover")
            .iter()
            .all(|d| d.backend.volume != "disc-vol"),
        "still discovered after detach"
    );
    let listed = lab.nbd.list().expect("list");
    let me = listed
        .iter()
        .find(|d| d.index == a.index)
        .expect("device still listed");
    assert!(!me.attached && me.backend.is_none(), "{me:?}");
}

fn detach_refused_while_mounted_unless_forced() {
    let lab = Lab::new();
    let server = lab.server("mounted");
    let a = lab.attach(&lab.request(&server, "mounted", 50));
    let dev = a.device.to_str().expect("utf8").to_string();
    sh_ok("mkfs.ext4", &["-q", "-F", &dev]);
    let mnt = lab.mountpoint("mounted-mnt");
    let mnt_s = mnt.to_str().expect("utf8").to_string();
    sh_ok("mount", &["-t", "ext4", &dev, &mnt_s]);

    match lab.nbd.detach(a.index, &DetachOptions::safe()) {
        Err(NbdError::InUse { mounts, .. }) => assert_eq!(mounts, vec![mnt.clone()]),
        other => panic!("safe detach of a mounted device: expected InUse, got {other:?}"),
    }
    // Still attached and working.
    {
        let mut f = File::create(mnt.join("before")).expect("create");
        f.write_all(b"still attached").expect("write");
        f.sync_all().expect("fsync while attached");
    }
    match lab.nbd.detach(a.index, &DetachOptions::force()) {
        Ok(Detached::ShutDownHeldOpen { mounts }) => assert_eq!(mounts, vec![mnt.clone()]),
        other => panic!("forced detach: expected ShutDownHeldOpen, got {other:?}"),
    }
    // The sockets are gone: a write that must reach the disk fails.
    let t0 = Instant::now();
    let res = File::create(mnt.join("after")).and_then(|mut f| {
        f.write_all(&payload(1 << 20, 3))?;
        f.sync_all()
    });
    assert!(res.is_err(), "fsync after a forced detach succeeded");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "fsync took {:?}",
        t0.elapsed()
    );
    sh_ok("umount", &[&mnt_s]);
    wait_until(
        "device freed after the unmount",
        Duration::from_secs(20),
        || {
            lab.nbd
                .status(a.index)
                .is_ok_and(|s| !s.attached && s.size_bytes == 0)
        },
    );
}

/// The server dies while a writer is busy: the kernel sees the connection
/// close, waits the dead-connection timeout for a replacement, then fails
/// the writer's fsync with an I/O error (bound: request + dead-conn timeout + slack).
fn server_killed_under_io_gives_eio_within_timeout() {
    writer_loses_server(Loss::Killed);
}

/// The server stops answering (SIGSTOP: the connection stays open): the
/// request times out, then the dead-connection timeout passes, then EIO.
fn server_stalled_under_io_gives_eio_within_timeout() {
    writer_loses_server(Loss::Stalled);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Loss {
    Killed,
    Stalled,
}

fn writer_loses_server(loss: Loss) {
    let lab = Lab::new();
    let mut server = lab.server("dying");
    let mut r = lab.request(&server, "dying", 60);
    r.request_timeout = Duration::from_secs(3);
    r.dead_conn_timeout = Duration::from_secs(2);
    let a = lab.attach(&r);
    let dev = a.device.clone();
    let (tx, rx) = mpsc::channel::<Result<Instant, String>>();
    let (first_tx, first_rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        let mut f = match OpenOptions::new().write(true).open(&dev) {
            Ok(f) => f,
            Err(e) => return drop(tx.send(Err(format!("open: {e}")))),
        };
        let chunk = payload(1 << 20, 11);
        let mut first = Some(first_tx);
        for i in 0u64.. {
            let off = (i % 60) << 20;
            let r = f
                .seek(SeekFrom::Start(off))
                .and_then(|_| f.write_all(&chunk))
                .and_then(|_| f.sync_data());
            match r {
                Ok(()) => {
                    if let Some(t) = first.take() {
                        let _ = t.send(());
                    }
                }
                Err(e) => {
                    eprintln!("    writer: {e} after {i} chunks");
                    return drop(tx.send(Ok(Instant::now())));
                }
            }
        }
    });
    first_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the writer never completed a first fsync");
    let killed = Instant::now();
    match loss {
        Loss::Killed => server.kill(),
        Loss::Stalled => nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server.pid()),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .expect("SIGSTOP the server"),
    }
    let bound = r.request_timeout + r.dead_conn_timeout + Duration::from_secs(10);
    match rx.recv_timeout(bound + Duration::from_secs(30)) {
        Ok(Ok(at)) => {
            let took = at - killed;
            println!(
                "    (server {loss:?}: I/O error {:.2}s later; request timeout 3s, dead-connection timeout 2s)",
                took.as_secs_f64()
            );
            assert!(
                took <= bound,
                "I/O error only after {took:?} (bound {bound:?})"
            );
        }
        Ok(Err(e)) => panic!("writer: {e}"),
        Err(_) => panic!(
            "writer still blocked {:?} after the server died: unbounded hang",
            killed.elapsed()
        ),
    }
    let d = lab
        .nbd
        .detach(a.index, &DetachOptions::safe())
        .unwrap_or_else(|e| panic!("detach after server death: {e}"));
    assert_eq!(d, Detached::Free);
}

/// The stand-in daemon: attach, report the index, then wait to be killed.
fn helper_attach(args: &[String]) {
    let [addr, export, volume, generation] = args else {
        eprintln!("usage: --helper-attach ADDR EXPORT VOLUME GENERATION");
        std::process::exit(2);
    };
    let mut r = AttachRequest::new(
        NbdAddress::Tcp(addr.clone()),
        export.clone(),
        BackendId::new(
            volume.clone(),
            Generation(generation.parse().expect("generation")),
        )
        .expect("id"),
    );
    r.request_timeout = Duration::from_secs(5);
    match KernelNbd::new().attach(&r) {
        Ok(a) => {
            println!("attached {}", a.index);
            let _ = std::io::stdout().flush();
            // Block until killed (or the parent closes our stdin).
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        }
        Err(e) => {
            println!("error {e}");
            std::process::exit(1);
        }
    }
}

/// The decision in docs/nbd.md: the attachment outlives the process that made
/// it (the kernel owns the sockets); it stays discoverable by its backend id,
/// with the dead attacher's pid, until recovery detaches it.
fn daemon_death_leaves_attachment_until_recovery() {
    let lab = Lab::new();
    let server = lab.server("orphan");
    let NbdAddress::Tcp(addr) = &server.address else {
        unreachable!("tcp")
    };
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--helper-attach", addr, &server.export, "orphan-vol", "77"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn helper");
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("helper output");
    let index: u32 = line
        .strip_prefix("attached ")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("helper said {line:?}"));
    assert_eq!(lab.nbd.status(index).expect("status").pid, Some(pid));

    child.kill().expect("SIGKILL the daemon");
    child.wait().expect("reap");

    let st = lab.nbd.status(index).expect("status");
    assert!(st.attached, "attachment vanished with its process: {st:?}");
    let found: Vec<_> = lab
        .nbd
        .discover()
        .expect("discover")
        .into_iter()
        .filter(|d| d.index == index)
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].backend.to_string(), "nbd-failover:orphan-vol:77");
    assert_eq!(found[0].pid, Some(pid));
    assert!(
        !found[0].attacher_alive,
        "the dead attacher must show as dead"
    );
    // The data path still works: this is why recovery must fence it.
    assert_eq!(
        read_sector(&found[0].device, 5),
        image_sector(&server.image, 5)
    );

    // Recovery (a new incarnation): detach what discovery found.
    lab.detach_free(index);
    assert!(lab
        .nbd
        .discover()
        .expect("discover")
        .iter()
        .all(|d| d.backend.volume != "orphan-vol"));
}

// ---------------------------------------------------------------------------
// benchmark

fn bench(n: usize) {
    let lab = Lab::new();
    let server = lab.server("bench");
    let r = lab.request(&server, "bench", 1);
    // Warm-up (first attach creates kernel state, page tables, …).
    let a = lab.attach(&r);
    lab.detach_free(a.index);
    let (mut rounds, mut attaches, mut detaches) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let t0 = Instant::now();
        let a = lab
            .nbd
            .attach(&r)
            .unwrap_or_else(|e| panic!("bench attach: {e}"));
        let t1 = Instant::now();
        let d = lab
            .nbd
            .detach(a.index, &DetachOptions::safe())
            .unwrap_or_else(|e| panic!("bench detach: {e}"));
        let t2 = Instant::now();
        assert_eq!(d, Detached::Free);
        attaches.push(t1 - t0);
        detaches.push(t2 - t1);
        rounds.push(t2 - t0);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        (ms(v[0]), ms(p(0.5)), ms(p(0.9)), ms(v[v.len() - 1]))
    };
    let (min, med, p90, max) = stats(&mut rounds);
    let (_, amed, _, _) = stats(&mut attaches);
    let (_, dmed, _, _) = stats(&mut detaches);
    println!(
        "bench attach->detach round trip (qemu-nbd on 127.0.0.1, TCG VM): n={n} \
         median {med:.1} ms, min {min:.1} ms, p90 {p90:.1} ms, max {max:.1} ms \
         (attach median {amed:.1} ms, detach-until-free median {dmed:.1} ms)"
    );
}

/// softdog, as the daemon arms it: the configured timeout replaces the
/// module's (60 s here), pets keep it alive, the magic close disarms it.
fn watchdog_device_gets_the_configured_timeout_and_disarms() {
    use nbd_failover::daemon::devwatchdog::DeviceWatchdog;
    use nbd_failover::daemon::Watchdog;
    let o = sh("modprobe", &["softdog", "soft_margin=60"]);
    assert!(
        o.status.success(),
        "modprobe softdog: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let sys = Path::new("/sys/class/watchdog/watchdog0");
    wait_until("/dev/watchdog", Duration::from_secs(10), || {
        Path::new("/dev/watchdog").exists() && sys.join("state").exists()
    });
    let attr = |name: &str| {
        fs::read_to_string(sys.join(name))
            .unwrap_or_else(|e| panic!("{}/{name}: {e}", sys.display()))
            .trim()
            .to_string()
    };
    assert_eq!(attr("state"), "inactive");
    let mut wd = DeviceWatchdog::arm(Path::new("/dev/watchdog"), Duration::from_secs(7))
        .expect("arming softdog");
    assert_eq!(attr("state"), "active");
    assert_eq!(
        attr("timeout"),
        "7",
        "the daemon's timeout, not soft_margin"
    );
    wd.pet();
    // A second opener is refused while the daemon has it (single opener).
    assert!(DeviceWatchdog::open(Path::new("/dev/watchdog")).is_err());
    Watchdog::disarm(&mut wd);
    drop(wd);
    assert_eq!(attr("state"), "inactive", "the magic close disarmed it");
}
