#!/usr/bin/env bash
# scripts/provision/nbd-export.sh: an ext4 image exported over NBD by qemu-nbd,
# for the labs (the same qemu-nbd invocation the demo uses).
#
#   nbd-export.sh image PATH SIZE
#       create PATH (e.g. SIZE 1G) and make ext4 on it; an existing image is
#       left alone (never reformatted)
#   nbd-export.sh run PATH NAME ADDRESS PORT
#       exec qemu-nbd in the foreground: raw, export NAME, persistent (-t),
#       up to 8 clients at once (the old and the new holder may overlap on
#       the TCP level during a failover; fencing happens on the nodes)
#   nbd-export.sh service --address ADDR [--port PORT] [--name NAME]
#                         [--image PATH] [--size SIZE]
#       the Vagrant storage machine: installs qemu-utils and e2fsprogs, makes
#       the image, writes the unit nbd-failover-lab-nbd-NAME.service (running
#       `nbd-export.sh run` from /usr/local/lib/nbd-failover-lab), starts it
#       and waits for the port. Defaults: port 10809, name data,
#       image /var/lib/nbd-failover-lab/NAME.img, size 1G.
set -euo pipefail
PROVISION_NAME=nbd-export
# shellcheck source=scripts/provision/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LAB_LIB=/usr/local/lib/nbd-failover-lab

make_image() { # PATH SIZE
  if [ -e "$1" ]; then
    say "image $1 exists: left as it is"
    return 0
  fi
  install -d -m 0755 "$(dirname "$1")"
  truncate -s "$2" "$1"
  mkfs.ext4 -q -F -L lab-data "$1"
  say "made $1: $2, ext4"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  image)
    make_image "${1:?image needs PATH SIZE}" "${2:?image needs PATH SIZE}"
    ;;
  run)
    [ $# -eq 4 ] || die "run needs PATH NAME ADDRESS PORT"
    [ -f "$1" ] || die "no such image: $1"
    exec qemu-nbd -f raw -x "$2" -b "$3" -p "$4" -t --shared=8 "$1"
    ;;
  service)
    need_root
    addr="" port=10809 name=data image="" size=1G
    while [ $# -gt 0 ]; do
      case $1 in
        --address) addr=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --image) image=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        *) die "service: unknown argument $1" ;;
      esac
    done
    [ -n "$addr" ] || die "service needs --address (the address agents reach it on)"
    [ -n "$image" ] || image=/var/lib/nbd-failover-lab/$name.img
    apt_install qemu-utils e2fsprogs
    install_self "$LAB_LIB"
    make_image "$image" "$size"
    unit=nbd-failover-lab-nbd-$name.service
    cat >"/etc/systemd/system/$unit" <<UNIT
# $unit: the lab's NBD export "$name" ($image), written by
# scripts/provision/nbd-export.sh service (nbd-failover Vagrant lab).
[Unit]
Description=qemu-nbd export "$name" for the nbd-failover lab ($addr:$port)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=$LAB_LIB/nbd-export.sh run $image $name $addr $port
Restart=on-failure
RestartSec=2s

[Install]
WantedBy=multi-user.target
UNIT
    say "wrote /etc/systemd/system/$unit"
    start_unit "$unit"
    if [ "${PROVISION_NO_START:-0}" != 1 ]; then
      wait_tcp "$addr" "$port" 30 || die "qemu-nbd does not listen on $addr:$port"
      say "export \"$name\" served on $addr:$port"
    fi
    ;;
  *)
    die "usage: nbd-export.sh image|run|service ... (see the header of $0)"
    ;;
esac
