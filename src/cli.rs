//! Command-line interface: subcommands of the `nbd-failover` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Lease-gated failover of network block devices for stateful services.
#[derive(Parser, Debug)]
#[command(name = "nbd-failover", version, about, long_about = None)]
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
    /// Test tooling: the record writer task and the history checker.
    #[command(hide = true, subcommand)]
    Testkit(Testkit),
}

#[derive(Subcommand, Debug)]
enum Testkit {
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

Logs go to stderr (RUST_LOG sets the level, default info).

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

/// Parses arguments, runs the subcommand, returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
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
        Command::Testkit(t) => testkit(t),
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

fn testkit(t: Testkit) -> i32 {
    use crate::testkit;
    match t {
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

fn daemon(path: &std::path::Path) -> i32 {
    init_logging();
    let cfg = match crate::config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "daemon: {} error(s) in {}; nothing started",
                errors.len(),
                path.display()
            );
            return 1;
        }
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
