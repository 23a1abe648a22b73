//! A typed builder of node config files for labs, tests, benchmarks and demo scripts, checked by the config parser itself.
//!
//! Every harness that starts real daemons writes their config through
//! [`NodeConfig`]: the lab crate (tests, benchmarks, the fault campaign) uses
//! it directly, and shell scripts (the demo, the Vagrant provisioning) call
//! `nbd-failover testkit node-config`, which renders one. A key renamed in the
//! schema is then renamed here once, and [`NodeConfig::render`] proves the
//! text it writes is a valid config by parsing it with [`crate::config::parse`].
//!
//! Only the keys the labs use are typed; anything else goes into
//! [`NodeConfig::extra`] verbatim (it is parsed with the rest, so a typo there
//! is still an error with its line).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{fmt_config_duration, Config, ConfigErrors};

/// One node's config file.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    /// A comment written at the top of the file (one `#` line per line).
    pub comment: Option<String>,
    /// `node.id` (default: the host name).
    pub id: Option<String>,
    /// `node.state_dir`.
    pub state_dir: Option<PathBuf>,
    /// `node.run_dir`.
    pub run_dir: Option<PathBuf>,
    /// `node.shared_kernel`: several daemons on one kernel (labs only).
    pub shared_kernel: bool,
    /// `[zookeeper]`.
    pub zookeeper: ZooKeeper,
    /// `[fencing]`; `None` keeps every default.
    pub fencing: Option<Fencing>,
    /// `[watchdog]`; `None` is mode "off".
    pub watchdog: Option<Watchdog>,
    /// `metrics.listen` ("IP:PORT" or "off"); `None` keeps the default.
    pub metrics: Option<String>,
    /// `[mesos]`.
    pub mesos: Mesos,
    /// The `[volumes.NAME]` tables, in order.
    pub volumes: Vec<Volume>,
    /// TOML appended verbatim (keys not typed here).
    pub extra: String,
}

/// `[zookeeper]`.
#[derive(Clone, Debug, Default)]
pub struct ZooKeeper {
    /// `hosts`, HOST:PORT each.
    pub hosts: Vec<String>,
    /// `chroot`.
    pub chroot: Option<String>,
    /// `session_timeout` (T).
    pub session_timeout: Option<Duration>,
}

/// `[fencing]`: all six budget keys (a lab either sets them all or none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fencing {
    /// `suspend_grace`.
    pub suspend_grace: Duration,
    /// `stop_grace`.
    pub stop_grace: Duration,
    /// `unmount_budget`.
    pub unmount_budget: Duration,
    /// `detach_budget`.
    pub detach_budget: Duration,
    /// `margin`.
    pub margin: Duration,
    /// `lock_delay`.
    pub lock_delay: Duration,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl Fencing {
    /// The tests' quick timings, for a 4 s session timeout: 1 + 1 + 0.5 + 0.5 + 0.5 = 3.5 s ≤ 4 s,
    /// lock-delay 2 s.
    pub fn quick() -> Fencing {
        Fencing {
            suspend_grace: ms(1000),
            stop_grace: ms(1000),
            unmount_budget: ms(500),
            detach_budget: ms(500),
            margin: ms(500),
            lock_delay: ms(2000),
        }
    }

    /// The session timeout [`Fencing::quick`] is made for.
    pub const QUICK_SESSION_TIMEOUT: Duration = Duration::from_secs(4);

    /// The product's defaults spelled out (2 + 3 + 2 + 1 + 1 = 9 s ≤ 10 s, lock-delay 5 s).
    pub fn defaults() -> Fencing {
        Fencing {
            suspend_grace: ms(2000),
            stop_grace: ms(3000),
            unmount_budget: ms(2000),
            detach_budget: ms(1000),
            margin: ms(1000),
            lock_delay: ms(5000),
        }
    }

    /// The sum that must fit in the session timeout.
    pub fn budget(&self) -> Duration {
        self.suspend_grace
            + self.stop_grace
            + self.unmount_budget
            + self.detach_budget
            + self.margin
    }

    /// `key=value` pairs (durations as in the config): `suspend_grace=1s,lock_delay=2s`;
    /// keys not named keep `base`'s value.
    pub fn parse_pairs(base: Fencing, pairs: &str) -> Result<Fencing, String> {
        let mut f = base;
        for pair in pairs.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}': expected KEY=DURATION"))?;
            let d = humantime::parse_duration(v.trim())
                .map_err(|e| format!("'{pair}': {e} (durations look like \"500ms\", \"3s\")"))?;
            let slot = match k.trim() {
                "suspend_grace" => &mut f.suspend_grace,
                "stop_grace" => &mut f.stop_grace,
                "unmount_budget" => &mut f.unmount_budget,
                "detach_budget" => &mut f.detach_budget,
                "margin" => &mut f.margin,
                "lock_delay" => &mut f.lock_delay,
                other => {
                    return Err(format!(
                        "'{other}' is not a fencing key (suspend_grace, stop_grace, \
                         unmount_budget, detach_budget, margin, lock_delay)"
                    ))
                }
            };
            *slot = d;
        }
        Ok(f)
    }
}

/// `[watchdog]` when it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watchdog {
    /// mode "systemd": WATCHDOG=1 to systemd every so often.
    Systemd {
        /// `timeout` (the unit's WatchdogSec).
        timeout: Duration,
    },
    /// mode "device": a watchdog device (or a lab's emulation of one).
    Device {
        /// `device`.
        device: PathBuf,
        /// `timeout`.
        timeout: Duration,
    },
}

/// `[mesos]` keys the labs set.
#[derive(Clone, Debug, Default)]
pub struct Mesos {
    /// `acquire_wait`.
    pub acquire_wait: Option<Duration>,
    /// `dvdcli_references`: "per-mount" or "per-volume".
    pub dvdcli_references: Option<String>,
}

/// One `[volumes.NAME]` table and its subtables.
#[derive(Clone, Debug)]
pub struct Volume {
    /// NAME.
    pub name: String,
    /// The backend and its subtable.
    pub backend: Backend,
    /// `mount_path`.
    pub mount_path: PathBuf,
    /// `filesystem` (not for `dir`).
    pub filesystem: Option<String>,
    /// `fsck` ("auto", "off", …).
    pub fsck: Option<String>,
    /// `mount_options`.
    pub mount_options: Vec<String>,
    /// `activation = "on-demand"` when true.
    pub on_demand: bool,
    /// The volume's own `lock_delay`.
    pub lock_delay: Option<Duration>,
    /// `[volumes.NAME.task]`.
    pub task: Option<Task>,
    /// `[volumes.NAME.restart]`.
    pub restart: Option<Restart>,
}

/// Where a volume's data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `backend = "image"`: an image file on a loop device.
    Image {
        /// `image.path`.
        path: PathBuf,
    },
    /// `backend = "nbd"`: an NBD export.
    Nbd {
        /// `nbd.server`, HOST:PORT.
        server: String,
        /// `nbd.export`.
        export: String,
        /// `nbd.timeout`.
        timeout: Option<Duration>,
        /// `nbd.dead_conn_timeout`.
        dead_conn_timeout: Option<Duration>,
    },
    /// `backend = "dir"`: a directory on a shared filesystem.
    Dir {
        /// `dir.path`.
        path: PathBuf,
    },
}

impl Backend {
    /// The `backend` keyword.
    pub fn keyword(&self) -> &'static str {
        match self {
            Backend::Image { .. } => "image",
            Backend::Nbd { .. } => "nbd",
            Backend::Dir { .. } => "dir",
        }
    }
}

/// `[volumes.NAME.task]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Task {
    /// `exec = [argv…]`.
    Exec(Vec<String>),
    /// `systemd_unit = "NAME"`.
    SystemdUnit(String),
}

impl Task {
    /// The test record writer as the task (`testkit writer`), acknowledging into `ack`.
    pub fn writer(
        bin: &std::path::Path,
        ack: &std::path::Path,
        node: &str,
        interval_ms: u64,
    ) -> Task {
        Task::Exec(vec![
            bin.display().to_string(),
            "testkit".into(),
            "writer".into(),
            "--ack".into(),
            ack.display().to_string(),
            "--node".into(),
            node.into(),
            "--interval-ms".into(),
            interval_ms.to_string(),
        ])
    }

    /// `/bin/sh -c SCRIPT` as the task.
    pub fn shell(script: &str) -> Task {
        Task::Exec(vec!["/bin/sh".into(), "-c".into(), script.into()])
    }
}

/// `[volumes.NAME.restart]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restart {
    /// `policy`: "never", "on-failure" or "always".
    pub policy: String,
    /// `max_restarts`.
    pub max_restarts: Option<u32>,
    /// `backoff`.
    pub backoff: Option<Duration>,
}

impl Volume {
    /// A volume with ext4 on `backend` mounted at `mount_path`, no task.
    pub fn new(name: &str, backend: Backend, mount_path: impl Into<PathBuf>) -> Volume {
        let filesystem = (!matches!(backend, Backend::Dir { .. })).then(|| "ext4".to_string());
        Volume {
            name: name.to_string(),
            backend,
            mount_path: mount_path.into(),
            filesystem,
            fsck: None,
            mount_options: Vec::new(),
            on_demand: false,
            lock_delay: None,
            task: None,
            restart: None,
        }
    }

    /// With `task`.
    pub fn task(mut self, task: Task) -> Volume {
        self.task = Some(task);
        self
    }
}

/// A TOML basic string: quoted, with `"` and `\` escaped (and control characters).
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn qp(p: &std::path::Path) -> String {
    q(&p.display().to_string())
}

fn qd(d: Duration) -> String {
    q(&fmt_config_duration(d))
}

fn array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", quoted.join(", "))
}

impl NodeConfig {
    /// A node with id `id` and its state and run directories under `dir`
    /// (`dir/state`, `dir/run`), on the ZooKeeper at `hosts` under `chroot`.
    pub fn new(id: &str, dir: &std::path::Path, hosts: &[String], chroot: &str) -> NodeConfig {
        NodeConfig {
            id: Some(id.to_string()),
            state_dir: Some(dir.join("state")),
            run_dir: Some(dir.join("run")),
            zookeeper: ZooKeeper {
                hosts: hosts.to_vec(),
                chroot: Some(chroot.to_string()),
                session_timeout: None,
            },
            ..NodeConfig::default()
        }
    }

    /// The quick timings of the tests: T = 4 s and [`Fencing::quick`].
    pub fn quick(mut self) -> NodeConfig {
        self.zookeeper.session_timeout = Some(Fencing::QUICK_SESSION_TIMEOUT);
        self.fencing = Some(Fencing::quick());
        self
    }

    /// The volume named `name`, to adjust it.
    pub fn volume_mut(&mut self, name: &str) -> &mut Volume {
        self.volumes
            .iter_mut()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no volume {name} in this node config"))
    }

    /// The config file's text.
    pub fn to_toml(&self) -> String {
        let mut o = String::new();
        if let Some(c) = &self.comment {
            for l in c.lines() {
                let _ = writeln!(o, "# {l}");
            }
            o.push('\n');
        }
        o.push_str("[node]\n");
        if let Some(id) = &self.id {
            let _ = writeln!(o, "id = {}", q(id));
        }
        if let Some(d) = &self.state_dir {
            let _ = writeln!(o, "state_dir = {}", qp(d));
        }
        if let Some(d) = &self.run_dir {
            let _ = writeln!(o, "run_dir = {}", qp(d));
        }
        if self.shared_kernel {
            o.push_str("shared_kernel = true\n");
        }
        let z = &self.zookeeper;
        let _ = writeln!(o, "\n[zookeeper]\nhosts = {}", array(&z.hosts));
        if let Some(c) = &z.chroot {
            let _ = writeln!(o, "chroot = {}", q(c));
        }
        if let Some(t) = z.session_timeout {
            let _ = writeln!(o, "session_timeout = {}", qd(t));
        }
        if let Some(f) = &self.fencing {
            let _ = writeln!(
                o,
                "\n[fencing]\nsuspend_grace = {}\nstop_grace = {}\nunmount_budget = {}\n\
                 detach_budget = {}\nmargin = {}\nlock_delay = {}",
                qd(f.suspend_grace),
                qd(f.stop_grace),
                qd(f.unmount_budget),
                qd(f.detach_budget),
                qd(f.margin),
                qd(f.lock_delay)
            );
        }
        match &self.watchdog {
            None => {}
            Some(Watchdog::Systemd { timeout }) => {
                let _ = writeln!(
                    o,
                    "\n[watchdog]\nmode = \"systemd\"\ntimeout = {}",
                    qd(*timeout)
                );
            }
            Some(Watchdog::Device { device, timeout }) => {
                let _ = writeln!(
                    o,
                    "\n[watchdog]\nmode = \"device\"\ndevice = {}\ntimeout = {}",
                    qp(device),
                    qd(*timeout)
                );
            }
        }
        if let Some(l) = &self.metrics {
            let _ = writeln!(o, "\n[metrics]\nlisten = {}", q(l));
        }
        let m = &self.mesos;
        if m.acquire_wait.is_some() || m.dvdcli_references.is_some() {
            o.push_str("\n[mesos]\n");
            if let Some(w) = m.acquire_wait {
                let _ = writeln!(o, "acquire_wait = {}", qd(w));
            }
            if let Some(r) = &m.dvdcli_references {
                let _ = writeln!(o, "dvdcli_references = {}", q(r));
            }
        }
        for v in &self.volumes {
            v.write(&mut o);
        }
        if !self.extra.is_empty() {
            o.push('\n');
            o.push_str(&self.extra);
            if !self.extra.ends_with('\n') {
                o.push('\n');
            }
        }
        o
    }

    /// Checks the text with the config parser, as `check-config` would read it from `file_name`.
    pub fn check(&self, file_name: &str) -> Result<Config, ConfigErrors> {
        crate::config::parse(&self.to_toml(), file_name)
    }

    /// The text, once the config parser accepts it; otherwise every error, then the text with
    /// line numbers (so a lab's mistake points at its line).
    pub fn render(&self, file_name: &str) -> Result<String, String> {
        let text = self.to_toml();
        match crate::config::parse(&text, file_name) {
            Ok(_) => Ok(text),
            Err(e) => {
                let numbered: Vec<String> = text
                    .lines()
                    .enumerate()
                    .map(|(i, l)| format!("{:>4} | {l}", i + 1))
                    .collect();
                Err(format!(
                    "{e}\nthe generated config:\n{}",
                    numbered.join("\n")
                ))
            }
        }
    }
}

impl Volume {
    fn write(&self, o: &mut String) {
        let n = &self.name;
        let _ = writeln!(
            o,
            "\n[volumes.{n}]\nbackend = {}",
            q(self.backend.keyword())
        );
        let _ = writeln!(o, "mount_path = {}", qp(&self.mount_path));
        if let Some(fs) = &self.filesystem {
            let _ = writeln!(o, "filesystem = {}", q(fs));
        }
        if let Some(f) = &self.fsck {
            let _ = writeln!(o, "fsck = {}", q(f));
        }
        if !self.mount_options.is_empty() {
            let _ = writeln!(o, "mount_options = {}", array(&self.mount_options));
        }
        if self.on_demand {
            o.push_str("activation = \"on-demand\"\n");
        }
        if let Some(d) = self.lock_delay {
            let _ = writeln!(o, "lock_delay = {}", qd(d));
        }
        match &self.backend {
            Backend::Image { path } => {
                let _ = writeln!(o, "\n[volumes.{n}.image]\npath = {}", qp(path));
            }
            Backend::Dir { path } => {
                let _ = writeln!(o, "\n[volumes.{n}.dir]\npath = {}", qp(path));
            }
            Backend::Nbd {
                server,
                export,
                timeout,
                dead_conn_timeout,
            } => {
                let _ = writeln!(
                    o,
                    "\n[volumes.{n}.nbd]\nserver = {}\nexport = {}",
                    q(server),
                    q(export)
                );
                if let Some(t) = timeout {
                    let _ = writeln!(o, "timeout = {}", qd(*t));
                }
                if let Some(t) = dead_conn_timeout {
                    let _ = writeln!(o, "dead_conn_timeout = {}", qd(*t));
                }
            }
        }
        match &self.task {
            None => {}
            Some(Task::Exec(argv)) => {
                let _ = writeln!(o, "\n[volumes.{n}.task]\nexec = {}", array(argv));
            }
            Some(Task::SystemdUnit(u)) => {
                let _ = writeln!(o, "\n[volumes.{n}.task]\nsystemd_unit = {}", q(u));
            }
        }
        if let Some(r) = &self.restart {
            let _ = writeln!(o, "\n[volumes.{n}.restart]\npolicy = {}", q(&r.policy));
            if let Some(m) = r.max_restarts {
                let _ = writeln!(o, "max_restarts = {m}");
            }
            if let Some(b) = r.backoff {
                let _ = writeln!(o, "backoff = {}", qd(b));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn lab_node() -> NodeConfig {
        let dir = Path::new("/tmp/lab/n1");
        let mut c = NodeConfig::new("lab-n1", dir, &["127.0.0.1:2181".into()], "/lab").quick();
        c.shared_kernel = true;
        c.volumes.push(
            Volume::new(
                "data",
                Backend::Image {
                    path: "/tmp/lab/volume.img".into(),
                },
                dir.join("mnt"),
            )
            .task(Task::writer(
                Path::new("/usr/bin/nbd-failover"),
                &dir.join("ack"),
                "n1",
                10,
            )),
        );
        c
    }

    #[test]
    fn a_lab_node_renders_to_a_config_the_parser_accepts_with_the_values_set() {
        let c = lab_node();
        let cfg = c.check("n1.toml").expect("valid");
        assert_eq!(cfg.node.id, "lab-n1");
        assert!(cfg.node.shared_kernel);
        assert_eq!(cfg.zookeeper.session_timeout, Duration::from_secs(4));
        assert_eq!(cfg.volumes.len(), 1);
        let v = &cfg.volumes[0];
        assert_eq!(v.name, "data");
        assert_eq!(v.mount_path, Path::new("/tmp/lab/n1/mnt"));
        assert_eq!(v.fencing.lock_delay, Duration::from_secs(2));
        assert_eq!(v.fencing.unmount_budget, Duration::from_millis(500));
    }

    #[test]
    fn every_typed_table_renders_and_parses() {
        let mut c = lab_node();
        c.comment = Some("two\nlines".into());
        c.watchdog = Some(Watchdog::Device {
            device: "/tmp/lab/n1/watchdog".into(),
            timeout: Duration::from_secs(2),
        });
        c.metrics = Some("off".into());
        c.mesos = Mesos {
            acquire_wait: Some(Duration::from_secs(3)),
            dvdcli_references: Some("per-volume".into()),
        };
        c.volumes[0].restart = Some(Restart {
            policy: "on-failure".into(),
            max_restarts: Some(2),
            backoff: Some(Duration::from_millis(100)),
        });
        c.volumes[0].lock_delay = Some(Duration::from_secs(4));
        c.volumes[0].fsck = Some("auto".into());
        c.volumes[0].mount_options = vec!["noatime".into()];
        let mut web = Volume::new(
            "web",
            Backend::Nbd {
                server: "127.0.0.1:10809".into(),
                export: "web".into(),
                timeout: Some(Duration::from_secs(3)),
                dead_conn_timeout: Some(Duration::from_secs(2)),
            },
            "/tmp/lab/n1/web",
        );
        web.on_demand = true;
        c.volumes.push(web);
        c.volumes.push(
            Volume::new(
                "files",
                Backend::Dir {
                    path: "/tmp/lab/shared".into(),
                },
                "/tmp/lab/shared",
            )
            .task(Task::SystemdUnit("files.service".into())),
        );
        let text = c.render("n1.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(text.starts_with("# two\n# lines\n"), "{text}");
        let cfg = c.check("n1.toml").expect("valid");
        assert_eq!(cfg.volumes.len(), 3);
        assert_eq!(cfg.mesos.acquire_wait, Duration::from_secs(3));
        assert_eq!(cfg.volumes[0].fencing.lock_delay, Duration::from_secs(4));
    }

    #[test]
    fn a_config_the_parser_refuses_is_an_error_with_the_rule_and_the_numbered_text() {
        let mut c = lab_node();
        c.fencing = Some(Fencing {
            stop_grace: Duration::from_secs(30),
            ..Fencing::quick()
        });
        let e = c.render("n1.toml").expect_err("budget over T");
        assert!(e.contains("n1.toml:"), "{e}");
        assert!(e.contains("   1 | [node]"), "{e}");
        let mut c = lab_node();
        c.extra = "[volumes.data.task2]\n".into();
        let e = c.render("n1.toml").expect_err("unknown table");
        assert!(e.contains("task2"), "{e}");
    }

    #[test]
    fn strings_are_escaped_so_any_path_stays_one_toml_string() {
        let mut c = lab_node();
        c.volumes[0].task = Some(Task::shell(
            "while :; do date >> \"$NBD_FAILOVER_MOUNT/log\"; sleep 0.2; done",
        ));
        let cfg = c.check("n1.toml").expect("valid");
        let text = c.to_toml();
        assert!(
            text.contains(r#"date >> \"$NBD_FAILOVER_MOUNT/log\""#),
            "{text}"
        );
        assert_eq!(cfg.volumes.len(), 1);
    }

    #[test]
    fn fencing_pairs_override_the_base_and_bad_ones_say_why() {
        let f = Fencing::parse_pairs(Fencing::defaults(), "stop_grace=2s, lock_delay=3s").unwrap();
        assert_eq!(f.stop_grace, Duration::from_secs(2));
        assert_eq!(f.lock_delay, Duration::from_secs(3));
        assert_eq!(f.margin, Duration::from_secs(1));
        assert!(Fencing::parse_pairs(Fencing::defaults(), "grace=1s")
            .unwrap_err()
            .contains("not a fencing key"));
        assert!(Fencing::parse_pairs(Fencing::defaults(), "margin")
            .unwrap_err()
            .contains("KEY=DURATION"));
        assert!(Fencing::parse_pairs(Fencing::defaults(), "margin=soon")
            .unwrap_err()
            .contains("margin=soon"));
    }
}
