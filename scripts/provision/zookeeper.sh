#!/usr/bin/env bash
# scripts/provision/zookeeper.sh: a standalone ZooKeeper 3.8 (Debian's
# `zookeeper` package) for the labs, with the settings the project's tests and
# demo use: tickTime 500 ms, sessions 1 s..60 s, no admin server (Jetty would
# take :8080), four-letter words on, java started without a wrapper shell (so
# the pid is java's: SIGSTOP/SIGCONT on it freezes the ensemble).
#
#   zookeeper.sh config FILE --data-dir DIR --port PORT [--address ADDR]
#       write a zoo.cfg (ADDR default 127.0.0.1)
#   zookeeper.sh run FILE
#       exec java on that zoo.cfg, in the foreground (demo.sh can run this in
#       the background and wait on $!: it is java's pid)
#   zookeeper.sh wait HOST PORT [SECS]
#       until the server answers `ruok` with `imok` (default 60 s)
#   zookeeper.sh service --address ADDR [--port PORT] [--data-dir DIR]
#       the Vagrant storage machine: installs the package, writes
#       /etc/nbd-failover-lab/zoo.cfg and the unit
#       nbd-failover-lab-zookeeper.service (running `zookeeper.sh run` from
#       /usr/local/lib/nbd-failover-lab), starts it and waits for imok.
#       Defaults: port 2181, data dir /var/lib/nbd-failover-lab/zookeeper.
set -euo pipefail
PROVISION_NAME=zookeeper
# shellcheck source=scripts/provision/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LAB_LIB=/usr/local/lib/nbd-failover-lab

write_config() { # FILE DATA_DIR PORT ADDRESS
  install -d -m 0755 "$(dirname "$1")"
  cat >"$1" <<CFG
# zoo.cfg written by scripts/provision/zookeeper.sh (nbd-failover labs): standalone, no admin server.
tickTime=500
dataDir=$2
clientPort=$3
clientPortAddress=$4
admin.enableServer=false
4lw.commands.whitelist=ruok,stat,srvr,mntr,cons
minSessionTimeout=1000
maxSessionTimeout=60000
CFG
  install -d -m 0755 "$2"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  config)
    file=${1:?config needs FILE}; shift
    data="" port="" addr=127.0.0.1
    while [ $# -gt 0 ]; do
      case $1 in
        --data-dir) data=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --address) addr=$2; shift 2 ;;
        *) die "config: unknown argument $1" ;;
      esac
    done
    [ -n "$data" ] && [ -n "$port" ] || die "config needs --data-dir and --port"
    write_config "$file" "$data" "$port" "$addr"
    say "wrote $file (${addr}:${port}, data in $data)"
    ;;
  run)
    file=${1:?run needs the zoo.cfg}
    [ -f "$file" ] || die "no such file: $file"
    cp=/etc/zookeeper/conf_example:/usr/share/java/zookeeper.jar
    [ -f /usr/share/java/slf4j-simple.jar ] && cp="$cp:/usr/share/java/slf4j-simple.jar"
    [ -f /usr/share/java/zookeeper.jar ] || die "/usr/share/java/zookeeper.jar missing: apt-get install zookeeper"
    # Quick-starting JVM flags (ZooKeeper starts in ~1 s on a host, ~11 s under TCG).
    exec java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Dzookeeper.admin.enableServer=false \
      -cp "$cp" org.apache.zookeeper.server.quorum.QuorumPeerMain "$file"
    ;;
  wait)
    host=${1:?wait needs HOST PORT}; port=${2:?wait needs HOST PORT}; secs=${3:-60}
    for ((i = 0; i < secs * 10; i++)); do
      if (exec 3<>"/dev/tcp/$host/$port" && echo ruok >&3 && timeout 1 cat <&3) 2>/dev/null | grep -q imok; then
        say "ZooKeeper on $host:$port answers imok"
        exit 0
      fi
      sleep 0.1
    done
    die "ZooKeeper on $host:$port did not answer imok within ${secs}s"
    ;;
  service)
    need_root
    addr="" port=2181 data=/var/lib/nbd-failover-lab/zookeeper
    while [ $# -gt 0 ]; do
      case $1 in
        --address) addr=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --data-dir) data=$2; shift 2 ;;
        *) die "service: unknown argument $1" ;;
      esac
    done
    [ -n "$addr" ] || die "service needs --address (the address agents reach it on)"
    apt_install zookeeper
    install_self "$LAB_LIB"
    write_config /etc/nbd-failover-lab/zoo.cfg "$data" "$port" "$addr"
    cat >/etc/systemd/system/nbd-failover-lab-zookeeper.service <<UNIT
# nbd-failover-lab-zookeeper.service: the lab's standalone ZooKeeper, written by
# scripts/provision/zookeeper.sh service (nbd-failover Vagrant lab).
[Unit]
Description=ZooKeeper for the nbd-failover lab ($addr:$port)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=$LAB_LIB/zookeeper.sh run /etc/nbd-failover-lab/zoo.cfg
Restart=on-failure
RestartSec=2s

[Install]
WantedBy=multi-user.target
UNIT
    say "wrote /etc/systemd/system/nbd-failover-lab-zookeeper.service"
    start_unit nbd-failover-lab-zookeeper.service
    if [ "${PROVISION_NO_START:-0}" != 1 ]; then "$0" wait "$addr" "$port" 120; fi
    ;;
  *)
    die "usage: zookeeper.sh config|run|wait|service ... (see the header of $0)"
    ;;
esac
