//! The dvdcli contract of Mesos' `docker/volume` isolator: `mount` prints only the mount point, `unmount` drops a reference; both as `nbd-failover dvdcli …` and as a symlink named `dvdcli`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::control::{self, Request, Response};

use super::{code, load_config, DEFAULT_CONFIG};

/// The driver name Mesos passes in `--volumedriver`.
pub(crate) const DRIVER: &str = "nbd-failover";

pub(crate) const DVDCLI_HELP: &str = "\
The command-line contract Mesos' docker/volume isolator runs on the agent
(it execs `dvdcli` from the agent's PATH; link it to this binary):

  dvdcli mount   --volumedriver=nbd-failover --volumename=db [--volumeopts=wait=30s]
  dvdcli unmount --volumedriver=nbd-failover --volumename=db

mount asks the local daemon to acquire the on-demand volume (activation =
\"on-demand\" in the config) and waits until it is mounted here, at most
mesos.acquire_wait (or the wait= volume option), always below Mesos' 120 s
kill. On success it prints only the mount point on stdout and exits 0; on
failure it prints the reason on stderr and exits non-zero (4: the lease is
held elsewhere or the volume did not come up in time; 5: it came up and
failed, e.g. fsck refused; 3: unknown volume; 2: bad arguments or a volume
that is not on demand; 6: no daemon).

Mounts are reference-counted: with mesos.dvdcli_references = \"per-mount\"
(the default) each mount adds one and each unmount drops one; with
\"per-volume\" a mount is idempotent and an unmount releases (what Mesos'
docker/volume isolator expects: it calls mount for every container and
unmount once, after the last container using the volume). Containers of the
Mesos hooks hold their own references beside dvdcli's. The last reference
fences the volume here and releases its lease cleanly. References are on disk before the volume is acquired, so a restart of
the daemon or the agent does not forget a mount: the restarted daemon fences
what its dead predecessor left (the lease went with its session) and then
acquires the volume again.

Volume options (--volumeopts, repeatable, KEY=VALUE): wait=DURATION.
The config file is $NBD_FAILOVER_CONFIG or /etc/nbd-failover/nbd-failover.toml.";

/// `dvdcli` arguments.
#[derive(Args, Debug)]
pub(crate) struct DvdcliArgs {
    #[command(subcommand)]
    op: Op,
    /// The daemon's config file.
    #[arg(long, env = "NBD_FAILOVER_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
}

/// Parsed when called as `dvdcli`.
#[derive(Parser, Debug)]
#[command(name = "dvdcli", about = "nbd-failover's dvdcli contract for the Mesos docker/volume isolator", long_about = DVDCLI_HELP)]
struct AsDvdcli {
    #[command(flatten)]
    args: DvdcliArgs,
}

#[derive(Subcommand, Debug)]
enum Op {
    /// Acquire and mount a volume here; print its mount point.
    Mount {
        /// Must be `nbd-failover`.
        #[arg(long)]
        volumedriver: String,
        /// The volume.
        #[arg(long)]
        volumename: String,
        /// KEY=VALUE (repeatable): wait=DURATION.
        #[arg(long)]
        volumeopts: Vec<String>,
    },
    /// Drop one reference; the last one unmounts, detaches and releases.
    Unmount {
        /// Must be `nbd-failover`.
        #[arg(long)]
        volumedriver: String,
        /// The volume.
        #[arg(long)]
        volumename: String,
        /// Accepted and ignored (Mesos does not pass any to unmount).
        #[arg(long)]
        volumeopts: Vec<String>,
    },
}

/// Entry point when the binary is called as `dvdcli`.
pub(crate) fn main_as_dvdcli() -> i32 {
    run(AsDvdcli::parse().args)
}

/// Runs one dvdcli operation.
pub(crate) fn run(a: DvdcliArgs) -> i32 {
    let (driver, volume, opts, mount) = match &a.op {
        Op::Mount {
            volumedriver,
            volumename,
            volumeopts,
        } => (volumedriver, volumename, volumeopts, true),
        Op::Unmount {
            volumedriver,
            volumename,
            volumeopts,
        } => (volumedriver, volumename, volumeopts, false),
    };
    if driver != DRIVER {
        eprintln!("dvdcli: --volumedriver={driver} is not handled here: this dvdcli serves --volumedriver={DRIVER} only");
        return code::USAGE;
    }
    let cfg = match load_config(&a.config, "dvdcli") {
        Ok(c) => c,
        Err(c) => return c,
    };
    let mut wait = cfg.mesos.acquire_wait;
    if mount {
        for o in opts {
            match o.split_once('=') {
                Some(("wait", v)) => match humantime::parse_duration(v) {
                    Ok(d) if d < crate::config::MESOS_KILL_AFTER => wait = d,
                    Ok(_) => {
                        eprintln!("dvdcli: volume option wait={v} must be below 120s (Mesos kills dvdcli after 120s)");
                        return code::USAGE;
                    }
                    Err(e) => {
                        eprintln!("dvdcli: volume option wait={v}: {e}");
                        return code::USAGE;
                    }
                },
                _ => {
                    eprintln!("dvdcli: unknown volume option {o:?} (known: wait=DURATION)");
                    return code::USAGE;
                }
            }
        }
    }
    let socket = cfg.control.socket.clone();
    let (req, timeout) = if mount {
        (
            Request::Acquire {
                volume: volume.clone(),
                holder: "dvdcli".to_string(),
                counted: cfg.mesos.dvdcli_counted,
                wait_ms: wait.as_millis() as u64,
                alias: None,
            },
            wait + Duration::from_secs(5),
        )
    } else {
        let limit = cfg.volume(volume).map_or(Duration::from_secs(60), |v| {
            v.policy.timings.fence_budget().total + Duration::from_secs(30)
        });
        (
            Request::Unacquire {
                volume: Some(volume.clone()),
                holder: "dvdcli".to_string(),
                wait_ms: limit.as_millis() as u64,
            },
            limit + Duration::from_secs(5),
        )
    };
    match control::call(&socket, req, timeout) {
        Ok(Response::Acquired { mount_path, .. }) => {
            println!("{mount_path}");
            code::OK
        }
        Ok(Response::Ok { message }) => {
            eprintln!("dvdcli: {message}");
            code::OK
        }
        Ok(Response::Error { kind, message }) => {
            eprintln!("dvdcli: {message}");
            kind.exit_code()
        }
        Ok(other) => {
            eprintln!("dvdcli: unexpected answer from the daemon: {other:?}");
            code::ERROR
        }
        Err(e) => {
            eprintln!("dvdcli: {e}");
            code::UNAVAILABLE
        }
    }
}
