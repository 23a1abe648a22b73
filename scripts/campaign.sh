#!/usr/bin/env bash
# The seeded fault campaign (tests/campaign.rs): three daemons, one volume, the
# record writer as the task, a random schedule of partitions, kills, pauses and
# server restarts; writes history.jsonl and verdict.json to the output dir and
# exits non-zero when a safety or liveness check fails.
#
#   sudo scripts/campaign.sh [--seed N] [--faults N] [--duration S] [--mode host|vm]
#                            [--watchdog device|systemd] [--out DIR]
#
#   --seed N      RNG seed of the schedule (default: from the clock; always printed
#                 first, with the command that replays it)
#   --faults N    at most N faults (default 50)
#   --duration S  faults are scheduled over S seconds (default 150)
#   --mode host   (default) the `image` backend (loop devices) on the host, each
#                 daemon in its own network namespace
#   --mode vm     the `nbd` backend (qemu-nbd and the kernel NBD driver) inside a
#                 virtme-ng VM (TCG), with storage faults and NBD server restarts
#   --watchdog device   the daemons pet a watchdog device (a FIFO per node); the
#                 harness plays the kernel's watchdog core and, when one expires,
#                 resets that node (kills its processes, disconnects its devices,
#                 unmounts, "reboots" it). Default in vm mode.
#   --watchdog systemd  the daemons use systemd's watchdog (WATCHDOG=1); the
#                 harness plays systemd and kills the daemon. Default in host mode.
#   --out DIR     where history.jsonl, verdict.json and the daemons' logs go
#                 (default /tmp/nbd-campaign-<seed>; in vm mode copied back there)
#
# Environment: CARGO_TARGET_DIR (default target), CI=true (cargo --locked),
# VNG / VM_KERNEL / VM_TIMEOUT as for scripts/vm-lab.sh. docs/campaign.md has the details.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

if ! command -v cargo >/dev/null 2>&1; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    if [ -x "$d/cargo" ]; then PATH="$d:$PATH"; export PATH; break; fi
  done
fi

say() { printf 'campaign: %s\n' "$*"; }
die() { printf 'campaign: ERROR: %s\n' "$*" >&2; exit 2; }

seed=""
faults=50
duration=150
mode=host
watchdog=""
out=""
while [ $# -gt 0 ]; do
  case $1 in
    --seed) seed=${2:?--seed needs a number}; shift 2 ;;
    --faults) faults=${2:?--faults needs a number}; shift 2 ;;
    --duration) duration=${2:?--duration needs seconds}; shift 2 ;;
    --mode) mode=${2:?--mode needs host or vm}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --watchdog) watchdog=${2:?--watchdog needs device or systemd}; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case $mode in host|vm) ;; *) die "--mode must be host or vm, got '$mode'" ;; esac
if [ -z "$watchdog" ]; then
  if [ "$mode" = vm ]; then watchdog=device; else watchdog=systemd; fi
fi
case $watchdog in device|systemd) ;; *) die "--watchdog must be device or systemd, got '$watchdog'" ;; esac
for v in "$faults" "$duration" ${seed:+"$seed"}; do
  case $v in ''|*[!0-9.]*) die "not a number: '$v'" ;; esac
done
if [ -z "$seed" ]; then
  seed=$(( $(date +%s%N) % 1000000007 ))
fi
out=${out:-/tmp/nbd-campaign-$seed}
case $out in /*) ;; *) out=$repo/$out ;; esac
say "seed $seed, watchdog $watchdog (replay: scripts/campaign.sh --seed $seed --faults $faults --duration $duration --mode $mode --watchdog $watchdog)"

[ "$(id -u)" -eq 0 ] || die "the campaign needs root (namespaces, loop devices, mount): run 'sudo $0'"
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$repo/$target ;; esac
export CARGO_TARGET_DIR=$target
locked=()
[ "${CI:-}" = true ] && locked=(--locked)

say "building (target dir $target)"
cargo build "${locked[@]}" --release --bins
build_json=$(mktemp)
trap 'rm -f "$build_json"' EXIT
cargo test "${locked[@]}" --release --test campaign --no-run --message-format=json >"$build_json"
bin=$(grep -o '"executable":"[^"]*campaign-[^"]*"' "$build_json" | tail -n 1 |
  sed 's/^"executable":"//; s/"$//' || true)
[ -n "$bin" ] && [ -x "$bin" ] || die "cargo built the campaign but named no executable for it"
mkdir -p "$out"

if [ "$mode" = host ]; then
  CAMPAIGN_SEED=$seed CAMPAIGN_FAULTS=$faults CAMPAIGN_SECONDS=$duration CAMPAIGN_OUT=$out \
    CAMPAIGN_WATCHDOG=$watchdog E2E_BACKEND=image RUST_BACKTRACE=1 "$bin" --ignored --exact campaign --nocapture --test-threads 1
  exit $?
fi

# VM mode: boot the Debian kernel under TCG (as scripts/vm-lab.sh does) and run there.
vng=${VNG:-/opt/nbd-failover-venv/bin/vng}
[ -x "$vng" ] || die "virtme-ng not found at $vng: run scripts/setup.sh, or set VNG"
kernel=${VM_KERNEL:-$(ls -v /boot/vmlinuz-* 2>/dev/null | tail -n 1)}
[ -n "$kernel" ] && [ -f "$kernel" ] || die "no kernel image in /boot: run scripts/setup.sh"
vm_timeout=${VM_TIMEOUT:-$(awk -v d="$duration" 'BEGIN { printf "%d", d * 3 + 600 }')}
lab=$(mktemp -d /tmp/nbd-campaign-vm.XXXXXX)
trap 'rm -f "$build_json"; rm -rf "$lab"' EXIT
cat >"$lab/inner.sh" <<INNER
#!/bin/bash
# Runs inside the VM (generated by scripts/campaign.sh).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export TMPDIR=/tmp RUST_BACKTRACE=1
ip link set lo up
modprobe nbd nbds_max=16 && modprobe loop && modprobe veth || { echo 1 >"$lab/rc"; exit 1; }
CAMPAIGN_SEED=$seed CAMPAIGN_FAULTS=$faults CAMPAIGN_SECONDS=$duration CAMPAIGN_OUT=$lab/out \
  CAMPAIGN_WATCHDOG=$watchdog E2E_BACKEND=nbd "$bin" --ignored --exact campaign --nocapture --test-threads 1
echo \$? >"$lab/rc"
INNER
say "booting $kernel under TCG (virtme-ng, 2 CPUs, 2 GiB; limit ${vm_timeout}s)"
set +e
PATH="$(dirname "$vng"):$PATH" timeout --kill-after=10 "$vm_timeout" \
  "$vng" --run "$kernel" --disable-kvm --force-9p -m 2G --cpus 2 \
  --rwdir "$lab" --exec "bash $lab/inner.sh" </dev/null 2>&1 | cat
set -e
if [ -d "$lab/out" ]; then cp -r "$lab/out/." "$out/"; fi
rc=$(cat "$lab/rc" 2>/dev/null || echo 1)
say "history and verdict in $out"
exit "$rc"
