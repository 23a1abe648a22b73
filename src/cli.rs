//! Command-line interface: subcommands of the `nbd-failover` binary.

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
}

/// Parses arguments, runs the subcommand, returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("nbd-failover {}", env!("CARGO_PKG_VERSION"));
            0
        }
    }
}
