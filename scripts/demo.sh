#!/usr/bin/env bash
# The README's "main job": watch a failover happen on this machine, with real components.
#
#   sudo scripts/demo.sh [--backend nbd|image]
#
# It installs what is missing (scripts/setup.sh), builds the release binary,
# then starts a real ZooKeeper server (loopback), makes a 128 MiB ext4 volume
# exported by qemu-nbd (the nbd backend: the kernel NBD driver attaches it),
# and runs two real `nbd-failover daemon` nodes whose task is a writer
# appending fsync'd, checksummed records to the volume. Where this kernel has
# no NBD driver (our build machines: no modules at all), the demo boots the
# Debian kernel in a VM (virtme-ng under TCG, as scripts/vm-lab.sh does) and
# runs there; `--backend image` runs on the host with the volume as an image on
# a loop device instead. Then:
#   1. a clean hand-over: SIGTERM the holder; the other takes over at once;
#   2. kill -9 of the holder's daemon (its task dies with it), restarted as
#      systemd would: it fences its leftovers, the other node takes over after
#      the lock-delay;
#   3. the history check: records ordered by generation, nothing acknowledged
#      lost, e2fsck clean.
# Everything is cleaned up at the end (or on Ctrl-C). Logs stay in the work dir
# if KEEP=1. The simulated cluster demo is `nbd-failover simulate --demo`.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

[ "$(id -u)" -eq 0 ] || { echo "demo: needs root (loop devices, mount): sudo $0" >&2; exit 1; }

BACKEND=""
IN_VM=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) BACKEND=${2:?--backend needs nbd or image}; shift 2 ;;
    --in-vm) IN_VM=1; shift ;;
    *) echo "demo: unknown argument $1 (use --backend nbd|image)" >&2; exit 2 ;;
  esac
done

if [ "$IN_VM" = 1 ]; then
  export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TMPDIR=/tmp
  ip link set lo up
  modprobe nbd nbds_max=16
  BIN=${DEMO_BIN:?}
else
  echo "demo: installing what is missing (scripts/setup.sh)"
  scripts/setup.sh >/dev/null
  if ! command -v cargo >/dev/null 2>&1; then
    for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
      [ -x "$d/cargo" ] && { PATH="$d:$PATH"; export PATH; break; }
    done
  fi
  echo "demo: building (cargo build --release)"
  cargo build --release --quiet
  BIN="$ROOT/${CARGO_TARGET_DIR:-target}/release/nbd-failover"
  [ -x "$BIN" ] || BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/nbd-failover"
  if [ -z "$BACKEND" ]; then
    if [ -d /sys/module/nbd ] || modprobe nbd nbds_max=16 2>/dev/null; then BACKEND=nbd; else BACKEND=vm; fi
  fi
  if [ "$BACKEND" = vm ]; then
    kernel=${VM_KERNEL:-$(ls -v /boot/vmlinuz-* 2>/dev/null | tail -n 1)}
    vng=${VNG:-/opt/nbd-failover-venv/bin/vng}
    [ -n "$kernel" ] && [ -x "$vng" ] || { echo "demo: no NBD driver here and no VM (kernel or virtme-ng missing: scripts/setup.sh)" >&2; exit 1; }
    echo "demo: this kernel has no NBD driver: booting $kernel in a VM (virtme-ng, TCG) and running the demo there"
    PATH="$(dirname "$vng"):$PATH" timeout --kill-after=10 600 "$vng" --run "$kernel" --disable-kvm --force-9p -m 2G --cpus 2 \
      --exec "env DEMO_BIN=$BIN bash $ROOT/scripts/demo.sh --in-vm --backend nbd" </dev/null 2>&1 | cat
    exit "${PIPESTATUS[0]}"
  fi
fi
[ -n "$BACKEND" ] || BACKEND=nbd

WORK=$(mktemp -d /tmp/nbd-failover-demo.XXXXXX)
ZK_PID=""
NBD_PID=""
declare -A DAEMON
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
T0=$(now_ms)
secs() { local d=$(( $(now_ms) - $1 )); printf '%d.%03d' $((d / 1000)) $((d % 1000)); }
say() { printf '[%8ss] %s\n' "$(secs "$T0")" "$*"; }

cleanup() {
  for n in "${!DAEMON[@]}"; do kill -9 "${DAEMON[$n]}" 2>/dev/null || true; done
  if [ -n "$ZK_PID" ]; then kill -9 "$ZK_PID" 2>/dev/null || true; wait "$ZK_PID" 2>/dev/null || true; fi
  if [ -n "$NBD_PID" ]; then kill -9 "$NBD_PID" 2>/dev/null || true; wait "$NBD_PID" 2>/dev/null || true; fi
  for n in n1 n2; do umount -l "$WORK/$n/mnt" 2>/dev/null || true; done
  umount "$WORK/probe" 2>/dev/null || true
  losetup -j "$WORK/volume.img" 2>/dev/null | cut -d: -f1 | xargs -r -n1 losetup -d 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "demo: logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- ZooKeeper ---------------------------------------------------------------
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$WORK/zk"
cat > "$WORK/zk/zoo.cfg" <<EOF
tickTime=500
dataDir=$WORK/zk/data
clientPort=$PORT
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok
minSessionTimeout=1000
maxSessionTimeout=60000
EOF
CP=/etc/zookeeper/conf_example:/usr/share/java/zookeeper.jar
[ -f /usr/share/java/slf4j-simple.jar ] && CP="$CP:/usr/share/java/slf4j-simple.jar"
java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Dzookeeper.admin.enableServer=false \
  -cp "$CP" org.apache.zookeeper.server.quorum.QuorumPeerMain "$WORK/zk/zoo.cfg" >"$WORK/zk/zk.log" 2>&1 &
ZK_PID=$!
for _ in $(seq 600); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT" && echo ruok >&3 && timeout 1 cat <&3) 2>/dev/null | grep -q imok; then break; fi
  sleep 0.1
done
say "ZooKeeper 3.8 serving on 127.0.0.1:$PORT (pid $ZK_PID)"

# --- the volume and two nodes ---------------------------------------------------
truncate -s 128M "$WORK/volume.img"
mkfs.ext4 -q -F "$WORK/volume.img"
if [ "$BACKEND" = nbd ]; then
  NBD_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  qemu-nbd -f raw -x data -b 127.0.0.1 -p "$NBD_PORT" -t --shared=8 "$WORK/volume.img" >"$WORK/qemu-nbd.log" 2>&1 &
  NBD_PID=$!
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$NBD_PORT") 2>/dev/null && break; sleep 0.1; done
  say "volume: 128 MiB ext4, exported by qemu-nbd as \"data\" on 127.0.0.1:$NBD_PORT (kernel NBD driver: $(uname -r))"
  BACKEND_TOML="[volumes.data.nbd]
server = \"127.0.0.1:$NBD_PORT\"
export = \"data\"
timeout = \"3s\"
dead_conn_timeout = \"2s\""
else
  say "volume: 128 MiB ext4 image $WORK/volume.img on a loop device (--backend image)"
  BACKEND_TOML="[volumes.data.image]
path = \"$WORK/volume.img\""
fi
for n in n1 n2; do
  mkdir -p "$WORK/$n/mnt"
  cat > "$WORK/$n/node.toml" <<EOF
[node]
id = "$n"
state_dir = "$WORK/$n/state"
run_dir = "$WORK/$n/run"
shared_kernel = true   # both demo nodes share this machine's kernel

[zookeeper]
hosts = ["127.0.0.1:$PORT"]
chroot = "/nbd-failover-demo"
session_timeout = "6s"

[fencing]
suspend_grace = "1s"
stop_grace = "2s"
unmount_budget = "1s"
detach_budget = "500ms"
margin = "1s"
lock_delay = "3s"

[metrics]
listen = "off"   # two daemons on one host would share the default port

[volumes.data]
backend = "$BACKEND"
mount_path = "$WORK/$n/mnt"
filesystem = "ext4"

$BACKEND_TOML

[volumes.data.task]
exec = ["$BIN", "testkit", "writer", "--ack", "$WORK/$n/ack", "--node", "$n", "--interval-ms", "20"]
EOF
  "$BIN" check-config "$WORK/$n/node.toml" >/dev/null
done
say "configs checked (nbd-failover check-config): fencing budget 5.5s <= session timeout 6s"

start() { "$BIN" daemon --config "$WORK/$1/node.toml" >>"$WORK/$1/daemon.log" 2>&1 & DAEMON[$1]=$!; }
acks() { [ -f "$WORK/$1/ack" ] && wc -l <"$WORK/$1/ack" || echo 0; }
wait_for() { # wait_for DESC CMD...
  local desc=$1; shift
  for _ in $(seq 1200); do "$@" && return 0; sleep 0.05; done
  echo "demo: timed out waiting for $desc; logs in $WORK (KEEP=1 keeps them)" >&2; KEEP=1; exit 1
}
grows() { [ "$(acks "$1")" -gt "$2" ]; }
said() { grep -q "$2" "$WORK/$1/daemon.log" 2>/dev/null; }
decisions() { # the core's decisions, one line each
  grep 'daemon::driver' "$WORK/$1/daemon.log" | grep -v 'nothing to do' | sed -E 's/^[^ ]+ +INFO nbd_failover::daemon::driver: //; s/ volume=data.*//' | sed "s/^/        $1: /"
}

start n1
wait_for "n1 to run its task" grows n1 10
say "n1 won the lease and runs the writer:"
decisions n1
start n2
wait_for "n2 to queue" said n2 "contending for the lease"
say "n2 started and waits in the lock queue (one watch on its predecessor)"

wait_for "n1 to write some records" grows n1 50
echo
say "STEP 1: clean hand-over - SIGTERM to n1's daemon"
before=$(acks n2); t=$(now_ms)
kill -TERM "${DAEMON[n1]}"; wait "${DAEMON[n1]}" || true; unset 'DAEMON[n1]'
wait_for "n2 to take over" grows n2 "$before"
say "n2 writes again $(secs "$t")s after the SIGTERM (clean release: no lock-delay)"
decisions n1 | tail -5
decisions n2 | tail -5

wait_for "n2 to write some records" grows n2 $(( $(acks n2) + 50 ))
echo
start n1
wait_for "n1 to queue" bash -c "[ \$(grep -c 'contending for the lease' '$WORK/n1/daemon.log') -ge 2 ]"
say "STEP 2: kill -9 of the holder's daemon (n2); its writer dies with it"
before=$(acks n1); t=$(now_ms)
kill -9 "${DAEMON[n2]}"; wait "${DAEMON[n2]}" 2>/dev/null || true
sleep 0.5
start n2
say "n2's daemon restarted (as systemd would): it fences what the killed one left"
wait_for "n1 to take over" grows n1 "$before"
say "n1 writes again $(secs "$t")s after the kill (unclean predecessor: lock-delay 3s)"
decisions n2 | grep -A3 leftovers | head -4
decisions n1 | tail -5

wait_for "n1 to write some records" grows n1 $(( $(acks n1) + 50 ))
echo
say "STEP 3: stop both daemons and check the history"
for n in n1 n2; do kill -TERM "${DAEMON[$n]}"; wait "${DAEMON[$n]}" || true; unset "DAEMON[$n]"; done
if [ -n "$NBD_PID" ]; then kill "$NBD_PID"; wait "$NBD_PID" 2>/dev/null || true; NBD_PID=""; fi
mkdir -p "$WORK/probe"
modprobe loop 2>/dev/null || true
mount -o ro,loop "$WORK/volume.img" "$WORK/probe"
"$BIN" testkit check "$WORK/probe/records.log" "$WORK/n1/ack" "$WORK/n2/ack" | sed 's/^/        checker: /'
umount "$WORK/probe"
e2fsck -fn "$WORK/volume.img" 2>&1 | tail -1 | sed 's/^/        e2fsck -fn: /'
say "done: never two writers, nothing acknowledged lost, filesystem clean"
