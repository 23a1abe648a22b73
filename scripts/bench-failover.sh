#!/usr/bin/env bash
# Failover benchmark: runs the end-to-end scenarios with real components and
# prints, per scenario, the failover time (fault -> task running elsewhere)
# split into detection, lock-delay, attach, fsck, mount and task start, from
# the new holder's own log.
#
#   sudo scripts/bench-failover.sh          # on the host (image volume, loop device)
#   sudo scripts/bench-failover.sh --vm     # in the VM lab (nbd volume, kernel NBD driver)
#
# Timings: T = 4 s, suspend_grace 1 s, lock_delay 2 s (tests/e2e_failover.rs).
# Numbers, not assertions: the machine's load moves them (TCG in the VM is slow).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench-failover: needs root (loop devices, mount): sudo $0" >&2; exit 1; }
if ! command -v cargo >/dev/null 2>&1; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    [ -x "$d/cargo" ] && { PATH="$d:$PATH"; export PATH; break; }
  done
fi
if [ "${1:-}" = --vm ]; then
  scripts/vm-lab.sh | grep -E '^(failover phases|vm: NOT RUN|test result|kernel-nbd:|bench )'
else
  cargo test --release --test e2e_failover -- --show-output --test-threads 1 2>&1 |
    grep -E '^(failover phases|test result)'
fi
