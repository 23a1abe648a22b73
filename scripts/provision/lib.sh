# scripts/provision/lib.sh: helpers shared by the provisioning scripts in this
# directory (sourced, not run): messages, root check, idempotent apt installs,
# systemd unit start, TCP wait. The scripts serve the Vagrant lab
# (vagrant/Vagrantfile) and the local labs (scripts/demo.sh, scripts/vm-lab.sh
# can call them too); see vagrant/README.md.
#
# Environment honoured by every script that sources this:
#   PROVISION_NO_START=1  write files and units but do not enable/start
#                         services; each skipped start is printed as NOT
#                         STARTED (used to check the scripts where systemd is
#                         not running, e.g. a container)
# shellcheck shell=bash

say() { printf '%s: %s\n' "${PROVISION_NAME:-provision}" "$*"; }
die() { printf '%s: ERROR: %s\n' "${PROVISION_NAME:-provision}" "$*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "needs root: run it with sudo"
}

# apt_install PKG...: installs the packages dpkg does not report installed,
# running `apt-get update` at most once per process and only when needed.
# Keeps qemu-utils from the distribution's suite when qemu-system-x86 comes
# too (installing qemu-system-x86 alone replaces a newer qemu-utils).
_apt_updated=0
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    # shellcheck disable=SC2016 # ${Status} is dpkg-query's format
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "apt packages present: $*"
    return 0
  fi
  need_root
  export DEBIAN_FRONTEND=noninteractive
  if [ "$_apt_updated" = 0 ]; then
    say "running: apt-get update"
    apt-get update -q
    _apt_updated=1
  fi
  local install=("${missing[@]}") extra=()
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
    local suite
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    install=()
    for pkg in "${missing[@]}"; do [ "$pkg" = qemu-utils ] || install+=("$pkg"); done
    install+=("qemu-utils/$suite")
    extra=(--allow-downgrades)
  fi
  say "running: apt-get install -y --no-install-recommends ${extra[*]} ${install[*]}"
  apt-get install -y -q --no-install-recommends "${extra[@]}" "${install[@]}"
}

systemd_running() { [ -d /run/systemd/system ]; }

# start_unit UNIT: daemon-reload, enable and (re)start UNIT, or say NOT STARTED.
start_unit() {
  if [ "${PROVISION_NO_START:-0}" = 1 ]; then
    say "NOT STARTED: $1 (PROVISION_NO_START=1)"
    return 0
  fi
  systemd_running || die "systemd is not running here: cannot start $1 (PROVISION_NO_START=1 writes the files only)"
  systemctl daemon-reload
  systemctl enable "$1" >/dev/null 2>&1 || die "systemctl enable $1 failed"
  systemctl restart "$1" || { systemctl status --no-pager "$1" >&2 || true; die "$1 did not start"; }
  say "started $1"
}

# wait_tcp HOST PORT SECS: until something accepts connections there.
wait_tcp() {
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# install_self DIR: copies this directory's scripts to DIR (units refer to them
# there, not to a checkout that may move), and prints DIR.
install_self() {
  local here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  install -d -m 0755 "$1"
  install -m 0755 "$here"/*.sh "$1/"
  chmod 0644 "$1/lib.sh"
}
