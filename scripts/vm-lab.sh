#!/usr/bin/env bash
# The VM lab: runs the kernel NBD suite (tests/kernel_nbd.rs) inside a VM.
#
#   sudo scripts/vm-lab.sh [FILTER]
#
# The host kernel has no NBD driver, so this builds the binaries and the
# suite's test binary on the host (cargo, release, --features kernel-tests),
# boots the Debian kernel (linux-image-amd64) with virtme-ng under TCG on the
# host's root filesystem (read-only; a scratch dir is shared read-write),
# loads nbd, runs the suite, the attach->detach benchmark and the end-to-end
# failover scenarios (tests/e2e_failover.rs, E2E_BACKEND=nbd) and a brief
# seeded fault campaign (tests/campaign.rs; CAMPAIGN_SEED, CAMPAIGN_FAULTS
# (default 12), CAMPAIGN_SECONDS (default 45) pass through) inside, and
# exits with the suite's status. It ends by printing the suite's summary line
# ("kernel-nbd: N passed, N failed"), the benchmark line and the wall time.
# FILTER runs only the scenarios whose name contains it.
#
# Environment:
#   CARGO_TARGET_DIR  cargo's target dir (default: target)
#   VNG               virtme-ng's vng (default: /opt/nbd-failover-venv/bin/vng,
#                     installed by scripts/setup.sh)
#   VM_KERNEL         kernel image to boot (default: the newest /boot/vmlinuz-*)
#   VM_TIMEOUT        seconds before the whole VM run is killed (default: 900)
#   BENCH_ROUNDS      attach->detach rounds of the benchmark (default: 20)
#   CI=true           cargo gets --locked
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

if ! command -v cargo >/dev/null 2>&1; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    if [ -x "$d/cargo" ]; then PATH="$d:$PATH"; export PATH; break; fi
  done
fi

say() { printf 'vm-lab: %s\n' "$*"; }
die() { printf 'vm-lab: ERROR: %s\n' "$*" >&2; exit 1; }

now_us() { local t=${EPOCHREALTIME//[.,]/}; echo "$((10#$t))"; }
secs() { local ds=$(($1 / 100000)); printf '%d.%ds' $((ds / 10)) $((ds % 10)); }

target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$repo/$target ;; esac
export CARGO_TARGET_DIR=$target
vng=${VNG:-/opt/nbd-failover-venv/bin/vng}
vm_timeout=${VM_TIMEOUT:-900}
rounds=${BENCH_ROUNDS:-20}
filter=${1:-}
locked=()
[ "${CI:-}" = true ] && locked=(--locked)

[ "$(id -u)" -eq 0 ] || die "the VM lab needs root (the suite attaches devices, mounts, loads modules): run 'sudo $0'"
[ -x "$vng" ] || die "virtme-ng not found at $vng: run scripts/setup.sh (it creates the venv), or set VNG"
kernel=${VM_KERNEL:-$(ls -v /boot/vmlinuz-* 2>/dev/null | tail -n 1)}
[ -n "$kernel" ] && [ -f "$kernel" ] || die "no kernel image in /boot: run scripts/setup.sh (installs linux-image-amd64)"
kver=${kernel##*/vmlinuz-}
[ -d "/lib/modules/$kver/kernel/drivers/block" ] || die "no modules for $kver under /lib/modules"
for tool in qemu-system-x86_64 qemu-nbd busybox mkfs.ext4 e2fsck; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool missing: run scripts/setup.sh"
done

t_start=$(now_us)
say "building on the host (target dir $target)"
cargo build "${locked[@]}" --release --bins
lab=$(mktemp -d /tmp/nbd-vm-lab.XXXXXX)
trap 'rm -rf "$lab"' EXIT
if ! cargo test "${locked[@]}" --release --features kernel-tests --test kernel_nbd --no-run \
  --message-format=json >"$lab/build.json" 2>"$lab/build.err"; then
  cat "$lab/build.err" >&2
  die "could not build the kernel suite (cargo test --release --features kernel-tests --test kernel_nbd --no-run)"
fi
suite=$(grep -o '"executable":"[^"]*kernel_nbd-[^"]*"' "$lab/build.json" | tail -n 1 |
  sed 's/^"executable":"//; s/"$//' || true)
[ -n "$suite" ] && [ -x "$suite" ] || die "cargo built the kernel suite but named no executable for it"
say "suite binary: $suite"
# The end-to-end failover scenarios (tests/e2e_failover.rs) run in the VM too,
# with the nbd backend: qemu-nbd and the real kernel driver.
if ! cargo test "${locked[@]}" --release --test e2e_failover --no-run \
  --message-format=json >"$lab/e2e-build.json" 2>"$lab/e2e-build.err"; then
  cat "$lab/e2e-build.err" >&2
  die "could not build the end-to-end tests (cargo test --release --test e2e_failover --no-run)"
fi
e2e=$(grep -o '"executable":"[^"]*e2e_failover-[^"]*"' "$lab/e2e-build.json" | tail -n 1 |
  sed 's/^"executable":"//; s/"$//' || true)
[ -n "$e2e" ] && [ -x "$e2e" ] || die "cargo built the end-to-end tests but named no executable for them"
say "e2e binary: $e2e"
# A short seeded fault campaign (tests/campaign.rs) with kernel NBD runs last;
# scripts/campaign.sh --mode vm runs a longer one on demand.
if ! cargo test "${locked[@]}" --release --test campaign --no-run \
  --message-format=json >"$lab/campaign-build.json" 2>"$lab/campaign-build.err"; then
  cat "$lab/campaign-build.err" >&2
  die "could not build the fault campaign (cargo test --release --test campaign --no-run)"
fi
campaign=$(grep -o '"executable":"[^"]*campaign-[^"]*"' "$lab/campaign-build.json" | tail -n 1 |
  sed 's/^"executable":"//; s/"$//' || true)
[ -n "$campaign" ] && [ -x "$campaign" ] || die "cargo built the fault campaign but named no executable for it"
# CI pins the brief campaign's seed to 795713989 (12 faults, 45 s): the seed
# that found a storage-side overlap of 0.66 s before the device watchdog was
# modelled (a daemon killed -9 and restarted at once fenced its leftovers while
# a storage drop-out stalled that unmount past T + lock_delay). With the
# watchdog device emulated (the default in VM mode) the node is reset instead:
# the replay is this finding's regression run. CAMPAIGN_SEED=random picks a seed
# from the clock; CAMPAIGN_SEED=N replays N.
campaign_seed=${CAMPAIGN_SEED:-795713989}
[ "$campaign_seed" = random ] && campaign_seed=$(( $(date +%s) % 1000000007 ))
say "campaign binary: $campaign (seed $campaign_seed)"
cat >"$lab/inner.sh" <<INNER
#!/bin/bash
# Runs inside the VM (generated by scripts/vm-lab.sh).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export NBD_FAILOVER_VM=1 TMPDIR=/tmp RUST_BACKTRACE=1
echo "vm: kernel \$(uname -r), \$(nproc) cpus, \$(free -m | awk '/Mem:/ {print \$2}') MiB"
ip link set lo up
modprobe nbd nbds_max=16 || { echo "vm: modprobe nbd failed"; echo 1 >"$lab/rc"; exit 1; }
rc=0
"$suite" $filter 2>&1 | tee "$lab/suite.log" || true
rc=\${PIPESTATUS[0]}
echo "\$rc" >"$lab/rc"
if [ -z "$filter" ]; then
  "$suite" --bench "$rounds" 2>&1 | tee "$lab/bench.log" || true
  echo "\${PIPESTATUS[0]}" >"$lab/bench_rc"
  modprobe loop; modprobe veth; modprobe bridge
  # Not run here: the namespace scenario (the kernel's nbd netlink family exists
  # only in the initial network namespace; the proxy scenario cuts a node instead).
  echo "vm: NOT RUN in the VM: in_network_namespaces_* (nbd netlink is init-namespace only)" | tee "$lab/e2e.log"
  E2E_BACKEND=nbd "$e2e" --test-threads 1 --show-output --skip in_network_namespaces 2>&1 | tee -a "$lab/e2e.log" || true
  echo "\${PIPESTATUS[0]}" >"$lab/e2e_rc"
  # The brief fault campaign: 3 daemons, kernel NBD, ${CAMPAIGN_FAULTS:-12} faults over ${CAMPAIGN_SECONDS:-45}s.
  CAMPAIGN_SEED=$campaign_seed CAMPAIGN_FAULTS=${CAMPAIGN_FAULTS:-12} CAMPAIGN_SECONDS=${CAMPAIGN_SECONDS:-45} \
    CAMPAIGN_OUT="$lab/campaign" E2E_BACKEND=nbd "$campaign" --ignored --exact campaign --nocapture 2>&1 |
    tee "$lab/campaign.log" || true
  echo "\${PIPESTATUS[0]}" >"$lab/campaign_rc"
fi
INNER
chmod +x "$lab/inner.sh"

say "booting $kernel under TCG (virtme-ng, 2 CPUs, 2 GiB)"
t_vm=$(now_us)
# Through a pipe: qemu reopens its output, which would overwrite a redirected log file.
set +e
PATH="$(dirname "$vng"):$PATH" timeout --kill-after=10 "$vm_timeout" \
  "$vng" --run "$kernel" --disable-kvm --force-9p -m 2G --cpus 2 \
  --rwdir "$lab" --exec "bash $lab/inner.sh" </dev/null 2>&1 | cat
vm_rc=${PIPESTATUS[0]}
set -e
t_end=$(now_us)

rc=1
if [ -f "$lab/rc" ]; then
  rc=$(cat "$lab/rc")
else
  say "the suite did not finish inside the VM (vng exit $vm_rc$([ "$vm_rc" -eq 124 ] && echo ", killed after ${vm_timeout}s"))"
fi
if [ -z "$filter" ] && [ "$(cat "$lab/bench_rc" 2>/dev/null || echo 1)" != 0 ]; then
  say "the benchmark failed"
  [ "$rc" -ne 0 ] || rc=1
fi
if [ -z "$filter" ] && [ "$(cat "$lab/e2e_rc" 2>/dev/null || echo 1)" != 0 ]; then
  say "the end-to-end scenarios failed inside the VM (nbd backend)"
  grep -E -A30 '^failures:' "$lab/e2e.log" 2>/dev/null | head -n 80 || true
  [ "$rc" -ne 0 ] || rc=1
fi
if [ -z "$filter" ] && [ "$(cat "$lab/campaign_rc" 2>/dev/null || echo 1)" != 0 ]; then
  say "the fault campaign failed inside the VM (seed $campaign_seed; replay: scripts/campaign.sh --mode vm --seed $campaign_seed --faults ${CAMPAIGN_FAULTS:-12} --duration ${CAMPAIGN_SECONDS:-45})"
  [ "$rc" -ne 0 ] || rc=1
fi

echo
say "==== kernel NBD suite (inside the VM) ===="
grep -E '^(failure:|TIMEOUT)' "$lab/suite.log" 2>/dev/null || true
grep -E '^bench ' "$lab/bench.log" 2>/dev/null || true
if [ -z "$filter" ]; then
  say "==== end-to-end failover scenarios, nbd backend (inside the VM) ===="
  grep -E '^(vm: NOT RUN|test |failover phases|history|test result)' "$lab/e2e.log" 2>/dev/null || true
  say "==== fault campaign, nbd backend (inside the VM) ===="
  grep -E '^campaign: (seed|replay)|SAFETY|LIVENESS' "$lab/campaign.log" 2>/dev/null || true
fi
say "wall time $(secs $((t_end - t_start))) (VM boot + suite + benchmark $(secs $((t_end - t_vm))))"
summary=$(grep -E '^kernel-nbd: [0-9]+ passed, [0-9]+ failed$' "$lab/suite.log" 2>/dev/null | tail -n 1 || true)
echo "${summary:-kernel-nbd: 0 passed, 1 failed}"
exit "$rc"
