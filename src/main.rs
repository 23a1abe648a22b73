//! The `nbd-failover` binary: a thin entry point into [`nbd_failover::cli`].

fn main() {
    std::process::exit(nbd_failover::cli::main());
}
