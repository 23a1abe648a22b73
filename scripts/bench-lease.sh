#!/usr/bin/env bash
# The lease benchmark: 100 contenders (one ZooKeeper session each, as on 100
# nodes) on one volume against a real ZooKeeper; prints the watch notifications
# per release (a herd-free lock: exactly 1) and the acquire-after-release
# latency p50/p99.
#
#   scripts/bench-lease.sh [--contenders N] [--releases R] [--hosts H:P,...]
#
# Without --hosts the benchmark starts its own standalone ZooKeeper (Debian's
# `zookeeper` package, installed by scripts/setup.sh) on a free loopback port
# and stops it at the end. Exits non-zero if a release woke more or fewer than
# one contender. Not part of scripts/test.sh: a benchmark, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# sudo's secure_path usually drops ~/.cargo/bin (setup.sh found cargo there).
if ! command -v cargo >/dev/null 2>&1; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    if [ -x "$d/cargo" ]; then PATH="$d:$PATH"; export PATH; break; fi
  done
fi
cargo build --release --example lease_bench
exec "${CARGO_TARGET_DIR:-target}/release/examples/lease_bench" "$@"
