#!/usr/bin/env bash
# The README's "main job": watch a failover happen.
#
#   sudo scripts/demo.sh [extra args for `nbd-failover simulate --demo`]
#
# For now this is the SIMULATED demo: the deterministic simulation of a
# three-node cluster (virtual clock, a lease service with ZooKeeper's timing),
# narrated step by step: one node wins the lease and starts the task, gets
# partitioned from ZooKeeper, fences itself (stop task, unmount, detach) on its
# own clock, and another node takes over once the session has expired.
# The real-component demo (a ZooKeeper server, an NBD export, two nodes running
# the daemon) replaces it as the lifecycle issue lands.
set -euo pipefail

cd "$(dirname "$0")/.."

banner() {
  cat <<'MSG'
=====================================================================
 nbd-failover demo: SIMULATED cluster failover
 Three simulated nodes on a virtual clock, no real ZooKeeper, no NBD,
 nothing touched on this machine. The demo with real components
 (ZooKeeper, an NBD export, two nodes) replaces this one when the
 daemon's lifecycle issue lands.
=====================================================================
MSG
}

banner
echo
echo "demo: installing what is missing (scripts/setup.sh)"
scripts/setup.sh

# sudo's secure_path usually drops ~/.cargo/bin (setup.sh found cargo there).
if ! command -v cargo >/dev/null 2>&1; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    if [ -x "$d/cargo" ]; then
      PATH="$d:$PATH"
      export PATH
      break
    fi
  done
fi

echo
echo "demo: building and running: cargo run --release -- simulate --demo${*:+ $*}"
echo
cargo run --release --quiet -- simulate --demo "$@"
echo
echo "demo: that was the simulated failover; see README.md for what the real demo will show."
