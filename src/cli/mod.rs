//! Command-line interface: subcommands of the `nbd-failover` binary, and dispatch on the name it was called by (`dvdcli`, Mesos hooks).

mod dvdcli;
mod exec;
mod mesos;
mod ops;
mod testkit;

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// Where the daemon's config (and so its control socket) is.
#[derive(Args, Debug, Clone)]
pub(crate) struct Target {
    /// The daemon's config file (its control socket and volumes are read from it).
    #[arg(long, short, env = "NBD_FAILOVER_CONFIG", default_value = DEFAULT_CONFIG)]
    pub(crate) config: PathBuf,
    /// Talk to the daemon on this socket instead of the config's control.socket.
    #[arg(long)]
    pub(crate) socket: Option<PathBuf>,
}

/// The default config file.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/nbd-failover/nbd-failover.toml";

/// Lease-gated failover of network block devices for stateful services.
#[derive(Parser, Debug)]
#[command(name = "nbd-failover", version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print version information.
    Version,
    /// Check a config file; print the effective config and each volume's fencing budget.
    #[command(long_about = CHECK_CONFIG_HELP)]
    CheckConfig {
        /// The config file (TOML), e.g. /etc/nbd-failover/nbd-failover.toml.
        file: PathBuf,
        /// Print the effective config, with each volume's fencing budget, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the deterministic cluster simulation (the failover demo, or a seed sweep).
    #[command(long_about = SIMULATE_HELP)]
    Simulate {
        /// Narrated demo: a partition, a daemon kill, a pause and a hand-over.
        #[arg(long, conflicts_with_all = ["seeds", "trace"])]
        demo: bool,
        /// First seed (or the only one with --trace).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of seeds to run.
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        /// Print the full trace of the single seed given by --seed.
        #[arg(long)]
        trace: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the node daemon: contend for every configured volume, bring up what it wins, fence what it loses.
    #[command(long_about = DAEMON_HELP)]
    Daemon {
        /// The config file (TOML).
        #[arg(long, short, default_value = "/etc/nbd-failover/nbd-failover.toml")]
        config: PathBuf,
    },
    /// Show this node's volumes (state, generation, since, ZooKeeper contact, fence deadline); --cluster reads every holder from ZooKeeper.
    #[command(long_about = ops::STATUS_HELP)]
    Status {
        #[command(flatten)]
        target: Target,
        /// Every volume's holder and contenders, read from ZooKeeper (works without the daemon).
        #[arg(long)]
        cluster: bool,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Graceful hand-over: fence here, release cleanly (the next holder skips the lock-delay), contend again.
    #[command(long_about = ops::RELEASE_HELP)]
    Release {
        /// The volume.
        volume: String,
        #[command(flatten)]
        target: Target,
        /// How long to wait for the fence to finish.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Fence and release cleanly, then stay out until `resume` (one volume, or --all for node maintenance).
    #[command(long_about = ops::DRAIN_HELP)]
    Drain {
        /// The volume (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        volume: Option<String>,
        /// Every volume of this node.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        target: Target,
        /// How long to wait for the fences to finish.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Let a drained or force-detached volume contend again (one, or --all).
    Resume {
        /// The volume (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        volume: Option<String>,
        /// Every volume of this node.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        target: Target,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Kill the task, unmount and detach NOW, with or without a live daemon; stays out until `resume`.
    #[command(long_about = ops::FORCE_DETACH_HELP)]
    ForceDetach {
        /// The volume.
        volume: String,
        /// Allow killing a task that still runs (SIGKILL to its process group).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        target: Target,
        /// How long to wait for a live daemon's answer before acting without it.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        daemon_timeout: std::time::Duration,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Admin: delete a volume's current lock node in ZooKeeper (a dead holder's). Read the risk first.
    #[command(long_about = ops::BREAK_LOCK_HELP)]
    BreakLock {
        /// The volume.
        volume: String,
        /// Confirm you have read the risk (required).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        target: Target,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Run a command on a volume: acquire, attach, check, mount, run it; pass its exit status through.
    #[command(long_about = exec::EXEC_HELP)]
    Exec(exec::ExecArgs),
    /// The Mesos docker/volume isolator's dvdcli contract (also reachable as a symlink named `dvdcli`).
    #[command(long_about = dvdcli::DVDCLI_HELP)]
    Dvdcli(dvdcli::DvdcliArgs),
    /// Mesos command-module hooks: isolator prepare/cleanup and the remove-executor hook (also as symlinks).
    #[command(long_about = mesos::MESOS_HELP)]
    Mesos(mesos::MesosArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(long_about = COMPLETIONS_HELP)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Test tooling: the record writer task and the history checker.
    #[command(hide = true, subcommand)]
    Testkit(testkit::Testkit),
}

const DAEMON_HELP: &str = "\
Run the node daemon for every volume in the config: one ZooKeeper session,
one lease per volume. For each volume it wins it attaches the device, checks
and mounts the filesystem and starts the task; when it loses the lease, or
cannot reach ZooKeeper for suspend_grace, it stops the task (SIGTERM, then
SIGKILL after stop_grace), unmounts and detaches before another node can win.

Before contending it fences whatever an earlier run left (devices carrying
our backend identifier, mounts at the volume paths, task process groups).
SIGTERM or SIGINT fences every volume, releases each lease cleanly (the next
holder skips the lock-delay) and exits 0. Under systemd (Type=notify) it
sends READY=1, STATUS= and, with watchdog.mode = \"systemd\", WATCHDOG=1
only while every held lease is fresh.

Logs go to the journal under systemd (stderr connected to it), else to stderr;
RUST_LOG sets the level (default info).

Exit status: 0 after a clean shutdown, 1 on a start-up error (config, ZooKeeper
unreachable, node id already in use, budget broken by the negotiated timeout).";

const SIMULATE_HELP: &str = "\
Run the deterministic simulation of three nodes contending for one volume:
the real per-volume state machine on each node, a simulated ZooKeeper with its
session timing, a virtual clock, and seeded random faults (partitions, daemon
kills, power loss, pauses, crash loops, failing and hanging effects). After
every step it checks that no two nodes have the volume attached at once, that
nothing is brought up without the current lease generation, and that a node
runs the task again once faults stop.

  nbd-failover simulate --demo              narrated failover demo
  nbd-failover simulate --seeds 10000       sweep seeds 1..10000
  nbd-failover simulate --seed 42 --trace   replay one seed with its trace

Exit status: 0 when every invariant held, 1 when one broke (the seed and the
end of its trace are printed).";

const CHECK_CONFIG_HELP: &str = "\
Check a config file and print the effective configuration: every value, defaults
included, and for each volume its fencing budget, term by term.

Checked: TOML syntax; unknown keys (every table has a fixed set); required keys
and tables; value types; durations (humantime strings: \"500ms\", \"3s\", \"1m\");
enum values; ZooKeeper hosts as HOST:PORT and the chroot as an absolute ZooKeeper
path; absolute paths; node id and volume names; one backend table matching each
volume's backend; mount paths unique and not nested; no two volumes on the same
NBD export, image or directory; and the safety rules:

  - fencing budget, per volume: suspend_grace + stop_grace + unmount_budget
    + detach_budget + margin <= zookeeper.session_timeout, so that a holder cut
    off from ZooKeeper has fenced (task killed, unmounted, detached) before
    another node can win the lease;
  - watchdog.timeout <= session_timeout - margin, so that a holder too stuck
    to fence itself is reset before another node can win.

Every problem is reported, not only the first, one per line as
FILE:LINE:COLUMN: error: <rule broken>, followed by a summary line.

Exit status: 0 when the file is valid, 1 otherwise (including a file that
cannot be read).

See examples/nbd-failover.toml for every key, its default and its meaning.";

const EXIT_CODES: &str = "\
Exit status (all subcommands):
  0  done
  1  error: bad config, I/O, ZooKeeper unreachable, a step failed
  2  usage error, or the request does not apply (e.g. acquire of an `always` volume)
  3  unknown volume
  4  timed out (lease held elsewhere, fence still running)
  5  the volume came up and failed (fsck refusal, mount failure)
  6  the daemon is not running, not reachable or shutting down
  7  refused: needs --yes
  exec passes the command's status through; 75 = lease lost, 69 = not acquired in time";

const COMPLETIONS_HELP: &str = "\
Print a shell completion script on stdout.

  nbd-failover completions bash > /usr/share/bash-completion/completions/nbd-failover
  nbd-failover completions zsh  > /usr/share/zsh/vendor-completions/_nbd-failover
  nbd-failover completions fish > /usr/share/fish/vendor_completions.d/nbd-failover.fish

The Debian package installs the bash, zsh and fish scripts.";

/// Exit codes shared by the subcommands (see `EXIT_CODES`).
pub(crate) mod code {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const NEEDS_YES: i32 = 7;
    pub const UNAVAILABLE: i32 = 6;
}

/// Parses arguments, runs the subcommand, returns the process exit code.
/// Called as `dvdcli` (a symlink), it speaks the dvdcli contract.
pub fn main() -> i32 {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name == "dvdcli" {
        return dvdcli::main_as_dvdcli();
    }
    if let Some(status) = mesos::main_as(&name) {
        return status;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Status {
            target,
            cluster,
            json,
        } => ops::status(&target, cluster, json),
        Command::Release {
            volume,
            target,
            wait,
            json,
        } => ops::release(&target, &volume, wait, json),
        Command::Drain {
            volume,
            all: _,
            target,
            wait,
            json,
        } => ops::drain(&target, volume, wait, json),
        Command::Resume {
            volume,
            all: _,
            target,
            json,
        } => ops::resume(&target, volume, json),
        Command::ForceDetach {
            volume,
            yes,
            target,
            daemon_timeout,
            json,
        } => ops::force_detach(&target, &volume, yes, daemon_timeout, json),
        Command::BreakLock {
            volume,
            yes,
            target,
            json,
        } => ops::break_lock(&target, &volume, yes, json),
        Command::Exec(args) => exec::run(args),
        Command::Dvdcli(args) => dvdcli::run(args),
        Command::Mesos(args) => mesos::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "nbd-failover",
                &mut std::io::stdout(),
            );
            0
        }
        Command::Version => {
            println!("nbd-failover {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Command::CheckConfig { file, json } => crate::config::check_config(
            &file,
            json,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        ),
        Command::Simulate {
            demo,
            seed,
            seeds,
            trace,
            json,
        } => simulate(demo, seed, seeds, trace, json),
        Command::Daemon { config } => daemon(&config),
        Command::Testkit(t) => testkit::run(t),
    }
}

fn simulate(demo: bool, seed: u64, seeds: u64, trace: bool, json: bool) -> i32 {
    use crate::sim;
    if demo {
        let (lines, outcome) = sim::demo::demo(seed);
        if json {
            let v = serde_json::json!({
                "seed": seed,
                "faults": outcome.faults,
                "failovers": outcome.failovers,
                "watchdog_resets": outcome.watchdog_resets,
                "downtimes_ms": outcome.downtimes.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
                "violation": outcome.violation.as_ref().map(|v| v.what.clone()),
                "trace": lines,
            });
            println!("{v:#}");
        } else {
            for l in &lines {
                println!("{l}");
            }
        }
        return i32::from(outcome.violation.is_some());
    }
    let mut cfg = sim::SimConfig::standard();
    if trace {
        cfg.trace = true;
        let o = sim::run(seed, &cfg);
        for l in &o.trace {
            println!("{l}");
        }
        return match o.violation {
            None => {
                println!(
                    "seed {seed}: every invariant held ({} steps, {} faults)",
                    o.steps, o.faults
                );
                0
            }
            Some(v) => {
                println!("seed {seed}: INVARIANT BROKEN at {}: {}", v.at, v.what);
                1
            }
        };
    }
    let started = std::time::Instant::now();
    let (ran, failed, stats) = sim::sweep(seed, seeds, &cfg);
    let wall = started.elapsed().as_secs_f64();
    if json {
        let v = serde_json::json!({
            "first_seed": seed, "seeds": ran, "wall_s": wall, "steps": stats.steps,
            "faults": stats.faults, "failovers": stats.failovers,
            "watchdog_resets": stats.watchdog_resets,
            "failed_seed": failed.as_ref().map(|o| o.seed),
            "violation": failed.as_ref().and_then(|o| o.violation.as_ref()).map(|v| v.what.clone()),
        });
        println!("{v:#}");
    } else {
        println!(
            "{ran} seeds from {seed} in {wall:.1}s: {} steps, {} faults, {} failovers, {} watchdog resets",
            stats.steps, stats.faults, stats.failovers, stats.watchdog_resets
        );
        if let Some(o) = &failed {
            if let Some(v) = &o.violation {
                println!("seed {} broke an invariant at {}: {}", o.seed, v.at, v.what);
                println!("replay: nbd-failover simulate --seed {} --trace", o.seed);
            }
        }
    }
    i32::from(failed.is_some())
}

/// Loads the config or prints its errors (`what` names the subcommand).
pub(crate) fn load_config(
    path: &std::path::Path,
    what: &str,
) -> Result<crate::config::Config, i32> {
    crate::config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!(
            "{what}: {} error(s) in {}; nothing done",
            errors.len(),
            path.display()
        );
        code::ERROR
    })
}

/// A tokio runtime for one command.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, i32> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the runtime: {e}");
            code::ERROR
        })
}

fn daemon(path: &std::path::Path) -> i32 {
    crate::logging::init("info");
    let cfg = match load_config(path, "daemon") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("daemon: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(crate::daemon::run::run(cfg)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("daemon: {e:#}");
            1
        }
    }
}
