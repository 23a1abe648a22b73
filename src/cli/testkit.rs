//! The hidden `testkit` subcommands: the record writer task, the history checker, and the node-config generator of the demo and lab scripts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::testkit::node_config::{Backend, Fencing, NodeConfig, Restart, Task, Volume, Watchdog};

#[derive(Subcommand, Debug)]
pub(super) enum Testkit {
    /// Append fsync'd records to VOLUME_DIR/records.log, acknowledging each in ACK.
    Writer {
        /// The mounted volume (default: $NBD_FAILOVER_MOUNT).
        #[arg(long, env = "NBD_FAILOVER_MOUNT")]
        dir: PathBuf,
        /// Acknowledgement log outside the volume.
        #[arg(long)]
        ack: PathBuf,
        /// Node name to tag records with.
        #[arg(long)]
        node: String,
        /// Lease generation (default: $NBD_FAILOVER_GENERATION).
        #[arg(long, env = "NBD_FAILOVER_GENERATION")]
        generation: u64,
        /// Pause between records, in milliseconds.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// Check a volume's records.log against acknowledgement logs.
    Check {
        /// The volume's records.log.
        log: PathBuf,
        /// Acknowledgement logs.
        acks: Vec<PathBuf>,
    },
    /// Print a node config file for a lab or demo node (one volume), checked by the config parser.
    #[command(long_about = NODE_CONFIG_HELP)]
    NodeConfig(Box<NodeConfigArgs>),
}

pub(super) fn run(t: Testkit) -> i32 {
    use crate::testkit;
    match t {
        Testkit::NodeConfig(a) => node_config(*a),
        Testkit::Writer {
            dir,
            ack,
            node,
            generation,
            interval_ms,
        } => {
            let interval = std::time::Duration::from_millis(interval_ms);
            match testkit::writer::run(&dir, &ack, &node, generation, interval) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("writer: {e}");
                    1
                }
            }
        }
        Testkit::Check { log, acks } => {
            let read = |p: &PathBuf| {
                std::fs::read(p)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .map_err(|e| format!("{}: {e}", p.display()))
            };
            let texts: Result<Vec<String>, String> =
                std::iter::once(&log).chain(acks.iter()).map(read).collect();
            match texts {
                Err(e) => {
                    eprintln!("check: {e}");
                    2
                }
                Ok(texts) => {
                    let ack_refs: Vec<&str> = texts[1..].iter().map(String::as_str).collect();
                    let v = testkit::records::check(&texts[0], &ack_refs);
                    println!("{v}");
                    i32::from(!v.ok())
                }
            }
        }
    }
}

const NODE_CONFIG_HELP: &str = "\
Print a node config for a lab, demo or provisioning script: the shell scripts'
way to the typed builder the Rust labs use (src/testkit/node_config.rs), so
every harness writes its configs from one place. One volume per call; the text
is checked with the config parser before it is printed, and a config the
parser refuses is an error (exit 1) naming the rule broken.

Example (the demo's node):
  nbd-failover testkit node-config --id n1 --dir /tmp/demo/n1 --shared-kernel \\
    --zookeeper 127.0.0.1:2181 --chroot /demo --session-timeout 6s \\
    --fencing suspend_grace=1s,stop_grace=2s,unmount_budget=1s,detach_budget=500ms,margin=1s,lock_delay=3s \\
    --metrics off --volume data --mount-path /tmp/demo/n1/mnt \\
    --nbd 127.0.0.1:10809 --export data --nbd-timeout 3s --dead-conn-timeout 2s \\
    --task-writer /tmp/demo/n1/ack --writer-interval-ms 20";

/// `testkit node-config`: flags for one node with one volume.
#[derive(Args, Debug)]
pub(super) struct NodeConfigArgs {
    /// node.id (default: the host name).
    #[arg(long)]
    id: Option<String>,
    /// Puts node.state_dir and node.run_dir under DIR (DIR/state, DIR/run).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// node.shared_kernel = true (several nodes on one kernel: labs only).
    #[arg(long)]
    shared_kernel: bool,
    /// zookeeper.hosts (HOST:PORT; repeat for an ensemble).
    #[arg(long = "zookeeper", value_name = "HOST:PORT", required = true)]
    zookeeper: Vec<String>,
    /// zookeeper.chroot.
    #[arg(long)]
    chroot: Option<String>,
    /// zookeeper.session_timeout (T).
    #[arg(long, value_parser = humantime::parse_duration)]
    session_timeout: Option<Duration>,
    /// [fencing] as KEY=DURATION pairs, comma-separated; keys not named keep the defaults.
    #[arg(long, value_name = "PAIRS")]
    fencing: Option<String>,
    /// [watchdog] mode: systemd or device (needs --watchdog-timeout).
    #[arg(long, value_parser = ["systemd", "device"])]
    watchdog: Option<String>,
    /// watchdog.timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    watchdog_timeout: Option<Duration>,
    /// watchdog.device (mode device).
    #[arg(long)]
    watchdog_device: Option<PathBuf>,
    /// metrics.listen ("IP:PORT" or "off").
    #[arg(long)]
    metrics: Option<String>,
    /// A comment for the top of the file.
    #[arg(long)]
    comment: Option<String>,
    /// The volume's name.
    #[arg(long, required = true)]
    volume: String,
    /// The volume's mount_path.
    #[arg(long, required = true)]
    mount_path: PathBuf,
    /// backend nbd: the server, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["image", "shared_dir"])]
    nbd: Option<String>,
    /// backend nbd: the export name.
    #[arg(long, requires = "nbd")]
    export: Option<String>,
    /// backend nbd: nbd.timeout.
    #[arg(long, requires = "nbd", value_parser = humantime::parse_duration)]
    nbd_timeout: Option<Duration>,
    /// backend nbd: nbd.dead_conn_timeout.
    #[arg(long, requires = "nbd", value_parser = humantime::parse_duration)]
    dead_conn_timeout: Option<Duration>,
    /// backend image: the image file.
    #[arg(long, conflicts_with = "shared_dir")]
    image: Option<PathBuf>,
    /// backend dir: the shared directory.
    #[arg(long = "shared-dir")]
    shared_dir: Option<PathBuf>,
    /// The volume's filesystem (default ext4; not for dir).
    #[arg(long)]
    filesystem: Option<String>,
    /// A mount option (repeatable).
    #[arg(long = "mount-option")]
    mount_options: Vec<String>,
    /// The task: the test record writer acknowledging into ACK.
    #[arg(long, value_name = "ACK", conflicts_with = "task_unit")]
    task_writer: Option<PathBuf>,
    /// The writer's pause between records.
    #[arg(long, default_value_t = 20, requires = "task_writer")]
    writer_interval_ms: u64,
    /// The writer binary (default: this one).
    #[arg(long, requires = "task_writer")]
    writer_bin: Option<PathBuf>,
    /// The task: a systemd unit.
    #[arg(long)]
    task_unit: Option<String>,
    /// restart.policy (never, on-failure, always).
    #[arg(long)]
    restart: Option<String>,
    /// restart.max_restarts.
    #[arg(long, requires = "restart")]
    max_restarts: Option<u32>,
}

fn node_config(a: NodeConfigArgs) -> i32 {
    match build(a).and_then(|c| c.render("<testkit node-config>")) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("node-config: {e}");
            1
        }
    }
}

fn build(a: NodeConfigArgs) -> Result<NodeConfig, String> {
    let backend = match (a.nbd, a.image, a.shared_dir) {
        (Some(server), None, None) => Backend::Nbd {
            export: a.export.unwrap_or_else(|| a.volume.clone()),
            server,
            timeout: a.nbd_timeout,
            dead_conn_timeout: a.dead_conn_timeout,
        },
        (None, Some(path), None) => Backend::Image { path },
        (None, None, Some(path)) => Backend::Dir { path },
        _ => return Err("give the volume's backend: one of --nbd, --image or --shared-dir".into()),
    };
    let mut v = Volume::new(&a.volume, backend, a.mount_path);
    if a.filesystem.is_some() {
        v.filesystem = a.filesystem;
    }
    v.mount_options = a.mount_options;
    if let Some(ack) = a.task_writer {
        let bin = match a.writer_bin {
            Some(b) => b,
            None => std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?,
        };
        let node = a.id.clone().unwrap_or_else(|| "node".into());
        v.task = Some(Task::writer(&bin, &ack, &node, a.writer_interval_ms));
    } else if let Some(u) = a.task_unit {
        v.task = Some(Task::SystemdUnit(u));
    }
    if let Some(policy) = a.restart {
        v.restart = Some(Restart {
            policy,
            max_restarts: a.max_restarts,
            backoff: None,
        });
    }
    let watchdog = match (a.watchdog.as_deref(), a.watchdog_timeout) {
        (None, None) => None,
        (None, Some(_)) => return Err("--watchdog-timeout needs --watchdog systemd|device".into()),
        (Some(_), None) => return Err("--watchdog needs --watchdog-timeout".into()),
        (Some("systemd"), Some(timeout)) => Some(Watchdog::Systemd { timeout }),
        (Some(_), Some(timeout)) => Some(Watchdog::Device {
            device: a
                .watchdog_device
                .unwrap_or_else(|| crate::config::DEFAULT_WATCHDOG_DEVICE.into()),
            timeout,
        }),
    };
    let fencing = match a.fencing {
        Some(p) => Some(
            Fencing::parse_pairs(Fencing::defaults(), &p).map_err(|e| format!("--fencing: {e}"))?,
        ),
        None => None,
    };
    let mut c = NodeConfig {
        comment: a.comment,
        id: a.id,
        state_dir: a.dir.as_ref().map(|d| d.join("state")),
        run_dir: a.dir.as_ref().map(|d| d.join("run")),
        shared_kernel: a.shared_kernel,
        fencing,
        watchdog,
        metrics: a.metrics,
        volumes: vec![v],
        ..NodeConfig::default()
    };
    c.zookeeper.hosts = a.zookeeper;
    c.zookeeper.chroot = a.chroot;
    c.zookeeper.session_timeout = a.session_timeout;
    Ok(c)
}
