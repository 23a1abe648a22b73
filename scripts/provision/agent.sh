#!/usr/bin/env bash
# scripts/provision/agent.sh: makes a machine an nbd-failover agent of the lab:
# installs the Debian package (scripts/build-deb.sh), loads the NBD driver,
# writes /etc/nbd-failover/nbd-failover.toml for one nbd volume and enables
# and starts nbd-failover.service.
#
#   agent.sh --deb PATH --node-id ID --zookeeper HOST:PORT --nbd-server HOST:PORT
#            [--export NAME] [--volume NAME]
#
# PATH is the .deb, or a directory holding exactly one nbd-failover_*.deb.
# The volume (default "data", export default "data") is mounted at
# /srv/volumes/VOLUME on the holder; its task is the project's test writer
# (`nbd-failover testkit writer`), which appends a fsync'd, checksummed record
# every 500 ms to records.log on the volume and acknowledges each one in
# /var/lib/nbd-failover-lab/ack on this machine, so `nbd-failover testkit
# check` can prove afterwards that no acknowledged write was lost.
#
# The package never starts the service on its own (the operator writes the
# config first); here the config is the lab's, so this script does start it.
# PROVISION_NO_START=1 stops short of that (NOT STARTED is printed).
set -euo pipefail
PROVISION_NAME=agent
# shellcheck source=scripts/provision/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

deb="" node="" zk="" nbd="" export_name=data volume=data
while [ $# -gt 0 ]; do
  case $1 in
    --deb) deb=$2; shift 2 ;;
    --node-id) node=$2; shift 2 ;;
    --zookeeper) zk=$2; shift 2 ;;
    --nbd-server) nbd=$2; shift 2 ;;
    --export) export_name=$2; shift 2 ;;
    --volume) volume=$2; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done
[ -n "$deb" ] && [ -n "$node" ] && [ -n "$zk" ] && [ -n "$nbd" ] ||
  die "usage: agent.sh --deb PATH --node-id ID --zookeeper HOST:PORT --nbd-server HOST:PORT [--export NAME] [--volume NAME]"
need_root

if [ -d "$deb" ]; then
  shopt -s nullglob
  debs=("$deb"/nbd-failover_*.deb)
  shopt -u nullglob
  [ ${#debs[@]} -eq 1 ] || die "expected exactly one nbd-failover_*.deb in $deb, found ${#debs[@]}: run scripts/build-deb.sh on the host first (and remove old ones)"
  deb=${debs[0]}
fi
[ -f "$deb" ] || die "no package at $deb: run scripts/build-deb.sh on the host first"

# The package; apt resolves its Depends (e2fsprogs, mount, kmod, libc6, ...).
export DEBIAN_FRONTEND=noninteractive
say "installing $deb"
# --reinstall: a rebuilt package of the same version is installed too.
# --force-confold: keep the config this script wrote (it is rewritten below
# anyway) instead of asking about the package's new example.
apt-get install -y -q --no-install-recommends --reinstall \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$(realpath "$deb")"
command -v nbd-failover >/dev/null || die "nbd-failover not on PATH after installing $deb"
say "installed: $(nbd-failover --version)"

# The kernel NBD driver (the package also loads it at boot via modules-load.d).
if [ "${PROVISION_NO_START:-0}" = 1 ] && ! modprobe -n nbd 2>/dev/null; then
  say "NOT LOADED: nbd driver (this kernel has no nbd module; PROVISION_NO_START=1)"
else
  "$(dirname "${BASH_SOURCE[0]}")/nbd-module.sh"
fi

install -d -m 0755 "/srv/volumes/$volume" /var/lib/nbd-failover-lab
conf=/etc/nbd-failover/nbd-failover.toml
cat >"$conf" <<CONF
# $conf: written by scripts/provision/agent.sh for the nbd-failover Vagrant lab.
# See /usr/share/doc/nbd-failover and examples/nbd-failover.toml for every key.

[node]
id = "$node"

[zookeeper]
hosts = ["$zk"]
chroot = "/nbd-failover-lab"
session_timeout = "10s"

# Matches WatchdogSec=8s in nbd-failover.service (8s <= 10s - margin 1s).
[watchdog]
mode = "systemd"
timeout = "8s"

# The defaults, spelled out: budget 2s + 3s + 2s + 1s + 1s = 9s <= 10s.
[fencing]
suspend_grace = "2s"
stop_grace = "3s"
unmount_budget = "2s"
detach_budget = "1s"
margin = "1s"
lock_delay = "5s"

[volumes.$volume]
backend = "nbd"
mount_path = "/srv/volumes/$volume"
filesystem = "ext4"
mount_options = ["noatime"]

[volumes.$volume.nbd]
server = "$nbd"
export = "$export_name"
timeout = "10s"
dead_conn_timeout = "5s"

# The test writer: one fsync'd record every 500 ms on the volume, acknowledged
# in /var/lib/nbd-failover-lab/ack (check with: nbd-failover testkit check).
[volumes.$volume.task]
exec = ["/usr/bin/nbd-failover", "testkit", "writer", "--ack", "/var/lib/nbd-failover-lab/ack", "--node", "$node", "--interval-ms", "500"]

[volumes.$volume.restart]
policy = "always"
max_restarts = 3
CONF
chmod 0644 "$conf"
nbd-failover check-config "$conf" >/dev/null || { nbd-failover check-config "$conf" || true; die "the generated config fails check-config"; }
say "wrote $conf (node $node, ZooKeeper $zk, volume $volume = nbd $nbd export $export_name); check-config passes"

start_unit nbd-failover.service
