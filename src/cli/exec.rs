//! `nbd-failover exec`: the wrapper for Marathon/Mesos command tasks (one volume, its own ZooKeeper session, the command as the task).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::config::{Activation, TaskConfig, TaskRun};
use crate::control::{self, Request, Response};
use crate::core::policy::RestartMode;
use crate::daemon::wrapper::{Wrap, EXIT_LEASE_LOST, EXIT_NOT_ACQUIRED};

use super::{code, load_config, runtime, DEFAULT_CONFIG};

pub(crate) const EXEC_HELP: &str = "\
Run CMD on a volume, for Marathon apps and other command tasks:

  nbd-failover exec --config /etc/nbd-failover/nbd-failover.toml --volume db \\
      -- /usr/sbin/mysqld --datadir=/srv/volumes/db/data

The wrapper holds its own ZooKeeper session (node id <node.id>.exec-<volume>),
waits for the volume's lease, attaches the device, checks and mounts the
filesystem, then runs CMD as its child in its own process group with the
environment it was given plus NBD_FAILOVER_VOLUME, NBD_FAILOVER_MOUNT and
NBD_FAILOVER_GENERATION. CMD's stdout and stderr are passed through.

It ends when:
  - CMD exits: the volume is unmounted, detached and released cleanly, and
    the wrapper exits with CMD's status (128+N when killed by signal N);
  - the lease is lost while CMD runs (ZooKeeper unreachable past
    suspend_grace, session expired, lock broken, volume force-detached):
    CMD is stopped (SIGTERM, SIGKILL after stop_grace), the volume fenced,
    and the wrapper exits 75 so the scheduler restarts the task elsewhere;
  - --wait runs out before the volume came up: exit 69.
SIGTERM and SIGINT stop CMD the same way (its status is passed through);
SIGHUP, SIGUSR1, SIGUSR2 and SIGQUIT are forwarded to CMD's process group.

The volume's fencing settings come from the config. A volume run by the
wrapper must not also be served by the node daemon: the wrapper refuses when
the local daemon serves it (activation = \"always\").";

/// `exec` arguments.
#[derive(Args, Debug)]
pub(crate) struct ExecArgs {
    /// The config file (ZooKeeper, node, the volume's settings).
    #[arg(long, short, env = "NBD_FAILOVER_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The volume to run CMD on.
    #[arg(long)]
    volume: String,
    /// Give up (exit 69) if the volume is not up within this long (default: wait for the lease as long as it takes).
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
    /// Run CMD as this user.
    #[arg(long)]
    user: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// Runs the wrapper; returns its exit status.
pub(crate) fn run(a: ExecArgs) -> i32 {
    crate::logging::init("info");
    let mut cfg = match load_config(&a.config, "exec") {
        Ok(c) => c,
        Err(c) => return c,
    };
    let Some(mut v) = cfg.volume(&a.volume).cloned() else {
        eprintln!("exec: no volume {:?} in {}", a.volume, cfg.file);
        return 3;
    };
    // The local daemon must not serve the same volume.
    if let Ok(Response::Status(s)) =
        control::call(&cfg.control.socket, Request::Status, Duration::from_secs(3))
    {
        if s.volumes.iter().any(|x| x.name == a.volume) {
            eprintln!(
                "exec: the node daemon (pid {}) manages volume {} on this host: the two would fence each other's mounts. Run the command as that volume's [task], or give the wrapper a config the daemon does not load",
                s.pid, a.volume
            );
            return code::USAGE;
        }
    }
    let env = std::env::vars()
        .filter(|(k, _)| !k.starts_with("NBD_FAILOVER_"))
        .collect();
    v.task = Some(TaskConfig {
        run: TaskRun::Exec(a.command.clone()),
        user: a.user.clone(),
        env,
    });
    v.restart.mode = RestartMode::Never;
    v.policy.restart.mode = RestartMode::Never;
    v.policy.has_task = true;
    v.policy.start_out = false;
    v.activation = Activation::Always;
    // The wrapper is not under the daemon unit's watchdog (see docs/mesos.md:
    // route 1 has no watchdog backstop).
    v.policy.timings.watchdog_timeout = None;
    cfg.watchdog = crate::config::WatchdogConfig::Off;
    cfg.node.id = format!("{}.exec-{}", cfg.node.id, a.volume);
    let pid_file = cfg.node.run_dir.join(format!("{}.task", a.volume));
    cfg.volumes = vec![v];
    let wrap = Wrap::new(&a.volume, a.wait, pid_file);
    let rt = match runtime() {
        Ok(r) => r,
        Err(c) => return c,
    };
    match rt.block_on(crate::daemon::run::run_mode(
        cfg,
        crate::daemon::run::Mode::Exec(wrap),
    )) {
        Ok(status) => {
            let how = match status {
                EXIT_LEASE_LOST => " (lease lost)",
                EXIT_NOT_ACQUIRED => " (volume not acquired in time)",
                _ => "",
            };
            tracing::info!(status, "exec: exiting with {status}{how}");
            status
        }
        Err(e) => {
            eprintln!("exec: {e:#}");
            code::ERROR
        }
    }
}
