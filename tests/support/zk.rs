//! Real ZooKeeper for tests: a standalone server or an ensemble, the java process itself, loopback ports, temp dirs, killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Where Debian's `zookeeper` package puts the server.
pub const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
/// Its example config dir (log4j settings) goes first on the class path.
pub const ZK_CONF: &str = "/etc/zookeeper/conf_example";
/// slf4j's simple logger (Debian's `libslf4j-java`, a dependency of `zookeeper`): without a
/// binding the server logs nothing, and a failed start would be a mystery.
pub const SLF4J_SIMPLE: &str = "/usr/share/java/slf4j-simple.jar";
/// Netty jars the TLS server needs beyond zookeeper.jar's manifest class path.
pub const NETTY_EXTRA: [&str; 3] = [
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
    "/usr/share/java/netty-transport-native-unix-common.jar",
];

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir, named after `tag`.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "nbdf-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        TempDir(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    ls.iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

/// Sends a four-letter command and returns the answer.
pub fn four_letter(port: u16, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().expect("addr"),
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(cmd.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// TLS settings of a server (PEM files).
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// Certificate chain and private key of the server, in one PEM file.
    pub keystore: PathBuf,
    /// CA certificate(s) the server trusts for client certificates.
    pub truststore: PathBuf,
}

/// One ZooKeeper server process.
pub struct ZkServer {
    child: Option<Child>,
    dir: TempDir,
    /// Plain client port.
    pub client_port: u16,
    /// TLS client port, if TLS is on.
    pub secure_port: Option<u16>,
    /// Its id in an ensemble (1 for a standalone server).
    pub id: u32,
}

struct Spec<'a> {
    id: u32,
    client_port: u16,
    secure_port: Option<u16>,
    /// `(quorum port, election port)` of every member, for an ensemble.
    peers: &'a [(u16, u16)],
    tls: Option<&'a ServerTls>,
}

impl ZkServer {
    /// A standalone server on a free port.
    pub fn start() -> ZkServer {
        let port = free_ports(1)[0];
        let s = Self::spawn(&Spec {
            id: 1,
            client_port: port,
            secure_port: None,
            peers: &[],
            tls: None,
        });
        s.wait_serving(Duration::from_secs(40));
        s
    }

    /// A standalone server with a plain and a TLS client port.
    pub fn start_tls(tls: &ServerTls) -> ZkServer {
        let ports = free_ports(2);
        let s = Self::spawn(&Spec {
            id: 1,
            client_port: ports[0],
            secure_port: Some(ports[1]),
            peers: &[],
            tls: Some(tls),
        });
        s.wait_serving(Duration::from_secs(40));
        s
    }

    fn spawn(spec: &Spec<'_>) -> ZkServer {
        for f in [ZK_JAR, ZK_CONF] {
            assert!(
                Path::new(f).exists(),
                "ZooKeeper is not installed: {f} is missing. Run scripts/setup.sh (it installs \
                 Debian's `zookeeper` package) — the lease tests need a real server"
            );
        }
        let dir = TempDir::new(&format!("zk{}", spec.id));
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir data");
        std::fs::write(data.join("myid"), format!("{}\n", spec.id)).expect("write myid");
        let mut cfg = format!(
            "tickTime=500\ninitLimit=20\nsyncLimit=4\ndataDir={}\nclientPort={}\n\
             clientPortAddress=127.0.0.1\nadmin.enableServer=false\n4lw.commands.whitelist=*\n\
             minSessionTimeout=1000\nmaxSessionTimeout=60000\nmaxClientCnxns=0\n\
             snapCount=100000\npreAllocSize=1024\n",
            data.display(),
            spec.client_port
        );
        if let Some(p) = spec.secure_port {
            cfg.push_str(&format!(
                "secureClientPort={p}\nsecureClientPortAddress=127.0.0.1\n"
            ));
        }
        for (i, (q, e)) in spec.peers.iter().enumerate() {
            cfg.push_str(&format!("server.{}=127.0.0.1:{q}:{e}\n", i + 1));
        }
        let cfg_path = dir.path().join("zoo.cfg");
        std::fs::write(&cfg_path, cfg).expect("write zoo.cfg");
        let log = std::fs::File::create(dir.path().join("zk.log")).expect("create zk.log");
        let mut cmd = Command::new("java");
        cmd.args([
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-Xms32m",
            "-Xmx256m",
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.jmx.log4j.disable=true",
        ]);
        if let Some(t) = spec.tls {
            cmd.arg(
                "-Dzookeeper.serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
            )
            .arg(format!(
                "-Dzookeeper.ssl.keyStore.location={}",
                t.keystore.display()
            ))
            .arg("-Dzookeeper.ssl.keyStore.type=PEM")
            .arg(format!(
                "-Dzookeeper.ssl.trustStore.location={}",
                t.truststore.display()
            ))
            .arg("-Dzookeeper.ssl.trustStore.type=PEM")
            .arg("-Dzookeeper.ssl.clientAuth=need");
        }
        let mut cp = format!("{ZK_CONF}:{ZK_JAR}");
        let mut extra = vec![SLF4J_SIMPLE];
        if spec.tls.is_some() {
            // The Netty connection factory (needed for TLS) uses jars that zookeeper.jar's
            // manifest class path leaves out.
            extra.extend(NETTY_EXTRA);
        }
        for jar in extra {
            if Path::new(jar).exists() {
                cp.push(':');
                cp.push_str(jar);
            }
        }
        cmd.arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=info")
            .arg("-Dorg.slf4j.simpleLogger.showDateTime=true")
            .arg("-cp")
            .arg(cp)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            // Its own process group, so drop can kill everything it started.
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start ZooKeeper (java): {e}. Is Java installed (scripts/setup.sh)?")
        });
        ZkServer {
            child: Some(child),
            dir,
            client_port: spec.client_port,
            secure_port: spec.secure_port,
            id: spec.id,
        }
    }

    /// `127.0.0.1:<client port>`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `127.0.0.1:<TLS port>`.
    pub fn secure_address(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.secure_port.expect("this server has no TLS port")
        )
    }

    /// The java process id (also its process group id); `None` once killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("zk.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `srvr`'s "Mode:" (standalone, leader, follower), if it serves.
    pub fn mode(&self) -> Option<String> {
        let out = four_letter(self.client_port, "srvr").ok()?;
        out.lines()
            .find_map(|l| l.strip_prefix("Mode: "))
            .map(|m| m.trim().to_string())
    }

    /// Waits until it serves requests; panics with the reason (and its log) otherwise.
    pub fn wait_serving(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.mode().is_some() {
                return;
            }
            self.check_alive();
            if Instant::now() > deadline {
                panic!(
                    "ZooKeeper server {} (port {}) did not start serving within {limit:?}; its log:\n{}",
                    self.id,
                    self.client_port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_alive(&self) {
        // A `&self` check: try_wait needs `&mut`, so look at /proc instead.
        if let Some(pid) = self.pid() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or("X");
            if state == "Z" || state == "X" {
                panic!(
                    "ZooKeeper server {} exited during start; its log:\n{}",
                    self.id,
                    self.log_tail()
                );
            }
        }
    }

    /// SIGSTOP the whole server (it answers nothing, expires nothing).
    pub fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`ZkServer::freeze`].
    pub fn thaw(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, s: Signal) {
        if let Some(pid) = self.pid() {
            let _ = killpg(Pid::from_raw(pid as i32), s);
        }
    }

    /// SIGKILL its process group and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A 3-server (or n-server) ensemble on loopback.
pub struct ZkEnsemble {
    /// The members; index i has id i+1.
    pub servers: Vec<ZkServer>,
}

impl ZkEnsemble {
    /// Starts `n` servers and waits until all serve (one leader, the rest followers).
    pub fn start(n: usize) -> ZkEnsemble {
        let ports = free_ports(3 * n);
        let peers: Vec<(u16, u16)> = (0..n)
            .map(|i| (ports[3 * i + 1], ports[3 * i + 2]))
            .collect();
        let servers: Vec<ZkServer> = (0..n)
            .map(|i| {
                ZkServer::spawn(&Spec {
                    id: i as u32 + 1,
                    client_port: ports[3 * i],
                    secure_port: None,
                    peers: &peers,
                    tls: None,
                })
            })
            .collect();
        for s in &servers {
            s.wait_serving(Duration::from_secs(90));
        }
        ZkEnsemble { servers }
    }

    /// `h:p,h:p,h:p` of the members still running.
    pub fn connect_string(&self) -> String {
        self.servers
            .iter()
            .filter(|s| s.pid().is_some())
            .map(ZkServer::address)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the current leader.
    pub fn leader(&self) -> Option<usize> {
        self.servers
            .iter()
            .position(|s| s.pid().is_some() && s.mode().as_deref() == Some("leader"))
    }

    /// Waits until some running member is leader again.
    pub fn wait_leader(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no leader within {limit:?}; logs:\n{}",
                self.servers
                    .iter()
                    .map(|s| format!("--- server {}\n{}", s.id, s.log_tail()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
