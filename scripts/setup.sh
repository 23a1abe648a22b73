#!/usr/bin/env bash
# Installs what nbd-failover's build, demo and tests need on a Debian 12 machine.
# Idempotent: checks first, installs only what is missing, says what it does.
#
# - Rust: cargo must already be installed (rustup); this script does not
#   install a toolchain. It adds the rustfmt and clippy components if missing.
# - apt packages: the list below, one package per line. `apt-get update` runs
#   at most once, and only when something is missing. Installing needs root.
# - virtme-ng (for scripts/vm-lab.sh): pip-installed into a venv, by default
#   /opt/nbd-failover-venv (VNG_VENV), if its `vng` is not there yet.
set -euo pipefail

# One package per line, with what needs it.
# Keep qemu-utils named explicitly whenever qemu-system-x86 is added: installing
# qemu-system-x86 alone replaces the machine's newer qemu-utils.
APT_PACKAGES=(
  e2fsprogs # mkfs.ext4, e2fsck: fsck and mount tests
  xfsprogs  # mkfs.xfs, xfs_repair, xfs_io: xfs fsck tests (tests/exec_fsck.rs)
  iproute2  # ip netns, veth: network partition tests
  zookeeper         # ZooKeeper 3.8 (with Java): lease tests and benchmark (tests/support/zk.rs)
  qemu-utils        # qemu-nbd: NBD server of the handshake tests and the VM lab
  nbd-server        # NBD server of the handshake tests
  nbdkit            # NBD server of the handshake tests (oldstyle, strict export names)
  libnbd-bin        # nbdinfo: the reference client the handshake tests compare with
  linux-image-amd64 # the kernel the VM lab boots (it has the nbd module; the host has none)
  qemu-system-x86   # the VM lab's emulator (TCG); see the qemu-utils note below
  busybox-static    # virtme-ng builds the VM's initramfs with busybox
  python3-venv      # the venv virtme-ng is installed into (below)
  dpkg-dev          # dpkg-shlibdeps: the Debian package's library dependencies (scripts/build-deb.sh)
  binutils          # strip: the packaged binary
  systemd           # systemd-analyze verify: the packaged unit (scripts/check-package.sh)
)
# virtme-ng (the VM lab's `vng`) comes from PyPI into this venv; vm-lab.sh looks here.
VNG_VENV=${VNG_VENV:-/opt/nbd-failover-venv}
VIRTME_NG_VERSION=1.42

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# --- Rust toolchain -------------------------------------------------------
# sudo's secure_path usually drops ~/.cargo/bin: look there too.
if ! command -v cargo >/dev/null 2>&1; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    if [ -x "$d/cargo" ]; then
      PATH="$d:$PATH"
      export PATH
      break
    fi
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  die "cargo not found (looked in PATH, \$CARGO_HOME/bin, ~/.cargo/bin, /root/.cargo/bin).
  Install the Rust toolchain with rustup for the user that runs this script (root for
  'sudo scripts/...'), see https://rustup.rs, then run this again.
  The crate needs Rust $(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml" 2>/dev/null || echo 1.80) or newer."
fi
say "cargo: $(command -v cargo) ($(cargo --version))"

for comp in rustfmt:fmt clippy:clippy; do
  name=${comp%%:*}
  sub=${comp#*:}
  if cargo "$sub" --version >/dev/null 2>&1; then
    say "$name: present ($(cargo "$sub" --version 2>/dev/null))"
  else
    command -v rustup >/dev/null 2>&1 ||
      die "'cargo $sub' is missing and rustup is not available to add the $name component"
    say "$name: missing, running: rustup component add $name"
    rustup component add "$name"
    cargo "$sub" --version >/dev/null 2>&1 || die "'cargo $sub' still does not work after adding $name"
  fi
done

# --- apt packages ---------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  # shellcheck disable=SC2016 # ${Status} is dpkg-query's format, not a shell variable
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    :
  else
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  say "apt packages: all present (${APT_PACKAGES[*]})"
else
  say "apt packages missing: ${missing[*]}"
  [ "$(id -u)" -eq 0 ] || die "installing packages needs root: run 'sudo $0' (or the script that called it with sudo)"
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script expects Debian 12"
  export DEBIAN_FRONTEND=noninteractive
  say "running: apt-get update"
  apt-get update -q
  install=("${missing[@]}")
  extra=()
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
    # The machine's qemu-utils may be newer (backports) than the distribution's
    # qemu-system-x86, whose qemu-system-common it Breaks: apt would remove it.
    # Name qemu-utils from the distribution's own suite, so both come together.
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    install=()
    for pkg in "${missing[@]}"; do
      [ "$pkg" = qemu-utils ] || install+=("$pkg")
    done
    install+=("qemu-utils/$suite")
    extra=(--allow-downgrades)
  fi
  say "running: apt-get install -y --no-install-recommends ${extra[*]} ${install[*]}"
  apt-get install -y -q --no-install-recommends "${extra[@]}" "${install[@]}"
fi

# --- virtme-ng (VM lab) ---------------------------------------------------
if [ -x "$VNG_VENV/bin/vng" ] && "$VNG_VENV/bin/vng" --version >/dev/null 2>&1; then
  say "virtme-ng: present ($("$VNG_VENV/bin/vng" --version 2>&1 | head -n 1), $VNG_VENV)"
else
  [ "$(id -u)" -eq 0 ] || die "installing virtme-ng into $VNG_VENV needs root: run 'sudo $0'"
  # Debian's python3 (with python3-venv), not whatever python3 comes first in PATH.
  py=/usr/bin/python3
  [ -x "$py" ] || py=$(command -v python3) || die "python3 not found"
  say "virtme-ng: missing, creating $VNG_VENV and running: pip install virtme-ng==$VIRTME_NG_VERSION"
  "$py" -m venv "$VNG_VENV"
  "$VNG_VENV/bin/pip" install -q "virtme-ng==$VIRTME_NG_VERSION"
  "$VNG_VENV/bin/vng" --version >/dev/null 2>&1 || die "virtme-ng installed into $VNG_VENV but 'vng --version' fails"
fi
say "done"
