#!/usr/bin/env bash
# scripts/provision/nbd-module.sh: loads the kernel NBD driver the way the VM
# lab and the demo do (`modprobe nbd nbds_max=16`), on a machine whose kernel
# has it as a module. Idempotent: an already loaded driver is left alone.
#
#   nbd-module.sh            load it now
#   nbd-module.sh --persist  also load it at every boot, with the same option
#                            (/etc/modules-load.d, /etc/modprobe.d)
set -euo pipefail
PROVISION_NAME=nbd-module
# shellcheck source=scripts/provision/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_root
if [ -d /sys/module/nbd ]; then
  say "nbd driver already loaded (nbds_max=$(cat /sys/module/nbd/parameters/nbds_max 2>/dev/null || echo '?'))"
else
  modprobe nbd nbds_max=16 || die "modprobe nbd failed: this kernel ($(uname -r)) has no nbd module"
  say "nbd driver loaded (nbds_max=16)"
fi
if [ "${1:-}" = --persist ]; then
  printf '# Written by scripts/provision/nbd-module.sh (nbd-failover labs).\nnbd\n' >/etc/modules-load.d/nbd-failover-lab.conf
  printf '# Written by scripts/provision/nbd-module.sh (nbd-failover labs).\noptions nbd nbds_max=16\n' >/etc/modprobe.d/nbd-failover-lab.conf
  say "nbd loaded at boot with nbds_max=16 (/etc/modules-load.d, /etc/modprobe.d)"
fi
