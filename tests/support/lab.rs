//! A lab of real daemons for CLI, dvdcli and Mesos hook tests: one ZooKeeper server, nodes with a writer-task volume `db` (always) and an on-demand volume `web`, both `image` volumes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{TempDir, ZkServer};

pub const BIN: &str = env!("CARGO_BIN_EXE_nbd-failover");

pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the CLI tests need root (loop devices, mount): run them as root (CI does)"
    );
}

pub fn image(path: &Path) {
    let f = fs::File::create(path).expect("image");
    f.set_len(32 << 20).expect("size");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success());
}

/// One daemon node with a writer-task volume `db` (always) and an on-demand volume `web`.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub metrics_port: u16,
}

impl Node {
    pub fn cfg(&self) -> PathBuf {
        self.dir.join("node.toml")
    }
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }
    pub fn mnt(&self, v: &str) -> PathBuf {
        self.dir.join(format!("mnt-{v}"))
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/control.sock")
    }

    pub fn start(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("log");
        let child = Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(self.cfg())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("fd"))
            .stderr(log)
            .spawn()
            .expect("daemon");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (at most 30 s).
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 30s of SIGTERM:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(self.cfg())
            .output()
            .expect("cli")
    }

    pub fn status(&self) -> Value {
        let o = self.cli(&["status", "--json"]);
        assert!(
            o.status.success(),
            "status failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log_tail()
        );
        serde_json::from_slice(&o.stdout).expect("status json")
    }

    pub fn volume(&self, v: &str) -> Value {
        self.status()["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|x| x["name"] == v)
            .cloned()
            .expect("volume in status")
    }

    pub fn phase(&self, v: &str) -> String {
        self.volume(v)["phase"].as_str().unwrap_or("?").to_string()
    }

    pub fn log_tail(&self) -> String {
        let t = self.log();
        let l: Vec<&str> = t.lines().collect();
        l[l.len().saturating_sub(40)..].join("\n")
    }

    pub fn wait(&self, what: &str, limit: Duration, mut cond: impl FnMut(&Node) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(
                start.elapsed() < limit,
                "{}: timed out after {limit:?} waiting for {what}\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the daemon and waits until it answers and `volume` runs.
    pub fn start_running(&mut self, volume: &str) {
        self.start();
        self.wait_socket();
        self.wait(&format!("{volume} running"), Duration::from_secs(30), |n| {
            n.phase(volume) == "running"
        });
    }

    pub fn wait_socket(&self) {
        self.wait("the control socket", Duration::from_secs(30), |n| {
            n.cli(&["status", "--json"]).status.success()
        });
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        // Whatever the daemon left: fence it the way an operator would.
        let _ = Command::new(BIN)
            .args([
                "force-detach",
                "db",
                "--yes",
                "--daemon-timeout",
                "1s",
                "--config",
            ])
            .arg(self.cfg())
            .output();
        let _ = Command::new(BIN)
            .args([
                "force-detach",
                "web",
                "--yes",
                "--daemon-timeout",
                "1s",
                "--config",
            ])
            .arg(self.cfg())
            .output();
    }
}

pub struct Lab {
    pub zk: ZkServer,
    pub zk_addr: String,
    pub dir: TempDir,
    pub chroot: String,
    pub tag: String,
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        require_root();
        let zk = ZkServer::start();
        let dir = TempDir::new(tag);
        image(&dir.path().join("db.img"));
        image(&dir.path().join("web.img"));
        Lab {
            zk_addr: zk.address(),
            zk,
            chroot: format!("/cli-{tag}-{}", std::process::id()),
            dir,
            tag: tag.to_string(),
        }
    }

    pub fn node(&self, name: &str, extra: &str) -> Node {
        let dir = self.dir.path().join(name);
        fs::create_dir_all(&dir).expect("node dir");
        let port = super::zk::free_ports(1)[0];
        let node = Node {
            name: name.to_string(),
            dir: dir.clone(),
            child: None,
            metrics_port: port,
        };
        for v in ["db", "web"] {
            fs::create_dir_all(node.mnt(v)).expect("mnt");
        }
        let cfg = format!(
            r#"[node]
id = "{tag}-{name}"
state_dir = "{d}/state"
run_dir = "{d}/run"
shared_kernel = true

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

[metrics]
listen = "127.0.0.1:{port}"

[volumes.db]
backend = "image"
mount_path = "{mdb}"
filesystem = "ext4"

[volumes.db.image]
path = "{img}/db.img"

[volumes.db.task]
exec = ["/bin/sh", "-c", "while :; do date >> \"$NBD_FAILOVER_MOUNT/log\"; sleep 0.2; done"]

[volumes.web]
backend = "image"
mount_path = "{mweb}"
filesystem = "ext4"
activation = "on-demand"

[volumes.web.image]
path = "{img}/web.img"
{extra}"#,
            tag = self.tag,
            d = dir.display(),
            zk = self.zk_addr,
            chroot = self.chroot,
            mdb = node.mnt("db").display(),
            mweb = node.mnt("web").display(),
            img = self.dir.path().display(),
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
    }

    pub fn holder(&self, n: &Node, v: &str) -> Value {
        let o = n.cli(&["status", "--cluster", "--json"]);
        assert!(
            o.status.success(),
            "status --cluster: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let j: Value = serde_json::from_slice(&o.stdout).expect("json");
        j["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|x| x["name"] == v)
            .expect("volume")["holder"]
            .clone()
    }
}

pub fn mounted(p: &Path) -> bool {
    let m = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let p = p.display().to_string();
    m.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| mp == p))
}

pub fn loop_attached(image: &Path) -> bool {
    let o = Command::new("losetup")
        .arg("-j")
        .arg(image)
        .output()
        .expect("losetup");
    !String::from_utf8_lossy(&o.stdout).trim().is_empty()
}

/// Whether any live process is in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    fs::read_dir("/proc").expect("/proc").flatten().any(|e| {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            return false;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        f.len() > 2 && f[0] != "Z" && f[2].parse::<i32>().ok() == Some(pgid)
    })
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
