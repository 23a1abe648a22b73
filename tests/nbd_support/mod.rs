//! Shared helpers for the NBD tests: real servers (qemu-nbd, nbd-server, nbdkit) on loopback, killed on drop.
//!
//! Each server gets a free port on 127.0.0.1 (or a unix socket in a temp
//! dir) and is ready when it accepts a connection, polled with a deadline; if
//! it exits first, the test fails with the server's log. A missing tool fails
//! the test and names `scripts/setup.sh`: nothing is skipped silently.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nbd_failover::nbd::NbdAddress;

/// Fails the test if `tool` is not on PATH.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("{tool} is not installed (PATH={path:?}): run scripts/setup.sh, which installs it");
}

/// A free TCP port on 127.0.0.1 (the kernel's pick; released for the server to take).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A file of `size` bytes with a recognisable pattern: each 512-byte sector
/// starts with its file name and number, and the rest varies with the number.
pub fn make_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).expect("create image");
    // 256 sectors of filler (the pattern repeats every 256 sectors), labelled per sector.
    let mut buf = vec![0u8; 256 * 512];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((i / 512) as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    let mut sector = 0u64;
    let mut written = 0u64;
    while written < size {
        for s in 0..256 {
            let label = format!("{name} sector {:010}\n", sector + s as u64);
            let at = s * 512;
            buf[at..at + 64].fill(0);
            buf[at..at + label.len().min(64)]
                .copy_from_slice(&label.as_bytes()[..label.len().min(64)]);
        }
        let n = (buf.len() as u64).min(size - written) as usize;
        f.write_all(&buf[..n]).expect("write image");
        written += n as u64;
        sector += 256;
    }
    path
}

/// Which server program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// qemu-nbd (qemu-utils).
    QemuNbd,
    /// nbd-server.
    NbdServer,
    /// nbdkit.
    Nbdkit,
}

impl Kind {
    /// All three.
    pub const ALL: [Kind; 3] = [Kind::QemuNbd, Kind::NbdServer, Kind::Nbdkit];
    /// Program name.
    pub fn program(self) -> &'static str {
        match self {
            Kind::QemuNbd => "qemu-nbd",
            Kind::NbdServer => "nbd-server",
            Kind::Nbdkit => "nbdkit",
        }
    }
}

/// Server options.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    /// Listen on a unix socket instead of TCP.
    pub unix: bool,
    /// Export read-only.
    pub read_only: bool,
    /// nbdkit: refuse other export names (exportname filter, strict).
    pub strict_name: bool,
    /// nbdkit: speak the oldstyle protocol.
    pub oldstyle: bool,
}

/// A running server, killed (with its process group) on drop.
pub struct Server {
    /// Which program.
    pub kind: Kind,
    /// Where it listens.
    pub address: NbdAddress,
    /// The export name.
    pub export: String,
    /// The exported file.
    pub image: PathBuf,
    /// The process group to kill (the daemon's own group for nbd-server).
    pgid: i32,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `kind` exporting `image` as `export`.
    pub fn start(kind: Kind, image: &Path, export: &str, opts: &Opts) -> Server {
        require_tool(kind.program());
        let dir = tempfile::Builder::new()
            .prefix("nbd-test-server")
            .tempdir()
            .expect("tempdir");
        let log = dir.path().join("server.log");
        let sock = dir.path().join("nbd.sock");
        let port = free_port();
        let address = if opts.unix {
            NbdAddress::Unix(sock.clone())
        } else {
            NbdAddress::Tcp(format!("127.0.0.1:{port}"))
        };
        let mut cmd;
        match kind {
            Kind::QemuNbd => {
                cmd = Command::new("qemu-nbd");
                cmd.args(["--format=raw", "--persistent", "--shared=16"])
                    .arg(format!("--export-name={export}"));
                if opts.unix {
                    cmd.arg(format!("--socket={}", sock.display()));
                } else {
                    cmd.args(["--bind=127.0.0.1", &format!("--port={port}")]);
                }
                if opts.read_only {
                    cmd.arg("--read-only");
                }
                cmd.arg(image);
            }
            Kind::NbdServer => {
                let conf = dir.path().join("nbd-server.conf");
                let listen = if opts.unix {
                    format!("unixsock = {}\n", sock.display())
                } else {
                    format!("listenaddr = 127.0.0.1\n    port = {port}\n")
                };
                let ro = if opts.read_only {
                    "    readonly = true\n"
                } else {
                    ""
                };
                fs::write(
                    &conf,
                    format!(
                        "[generic]\n    {listen}    allowlist = true\n[{export}]\n    exportname = {}\n{ro}",
                        image.display()
                    ),
                )
                .expect("write nbd-server config");
                cmd = Command::new("nbd-server");
                // Daemonises (new session): the pid file names the group to kill.
                cmd.arg("-C")
                    .arg(&conf)
                    .arg("-p")
                    .arg(dir.path().join("pid"));
            }
            Kind::Nbdkit => {
                cmd = Command::new("nbdkit");
                cmd.args(["--foreground", "--exit-with-parent"]);
                if opts.unix {
                    cmd.arg(format!("--unix={}", sock.display()));
                } else {
                    cmd.args(["--ipaddr=127.0.0.1", &format!("--port={port}")]);
                }
                if opts.read_only {
                    cmd.arg("--readonly");
                }
                if opts.oldstyle {
                    cmd.arg("--oldstyle");
                }
                if opts.strict_name {
                    cmd.args(["--filter=exportname"]);
                }
                cmd.arg("file").arg(format!("file={}", image.display()));
                if opts.strict_name {
                    cmd.arg(format!("exportname={export}"))
                        .arg("exportname-strict=true");
                }
            }
        }
        let logf = fs::File::create(&log).expect("server log");
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", kind.program()));
        let pgid = child.id() as i32;
        let mut server = Server {
            kind,
            address,
            export: export.to_string(),
            image: image.to_path_buf(),
            pgid,
            child,
            log,
            _dir: dir,
        };
        server.wait_ready(Duration::from_secs(20));
        server
    }

    fn wait_ready(&mut self, budget: Duration) {
        let deadline = Instant::now() + budget;
        loop {
            if self.kind == Kind::NbdServer {
                // The foreground process exits after daemonising; the pid file names the daemon.
                if let Ok(pid) = fs::read_to_string(self._dir.path().join("pid")) {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        self.pgid = pid;
                    }
                }
            } else if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited before it was ready ({status}); log:\n{}",
                    self.kind.program(),
                    self.log_text()
                );
            }
            let up = match &self.address {
                NbdAddress::Tcp(a) => TcpStream::connect(a).is_ok(),
                NbdAddress::Unix(p) => UnixStream::connect(p).is_ok(),
            };
            if up && (self.kind != Kind::NbdServer || self.pgid != self.child.id() as i32) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} not listening on {} within {budget:?}; log:\n{}",
                    self.kind.program(),
                    self.address,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's output so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server (and, for nbd-server, its per-client children) now.
    pub fn kill(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's main pid.
    pub fn pid(&self) -> i32 {
        self.pgid
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
