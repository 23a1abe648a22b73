#!/usr/bin/env bash
# Installs what nbd-failover's build, demo and tests need on a Debian 12 machine.
# Idempotent: checks first, installs only what is missing, says what it does.
#
# - Rust: cargo must already be installed (rustup); this script does not
#   install a toolchain. It adds the rustfmt and clippy components if missing.
# - apt packages: the list below, one package per line. `apt-get update` runs
#   at most once, and only when something is missing. Installing needs root.
set -euo pipefail

# One package per line, with what needs it. The coming issues add:
#   zookeeper (lease tests), qemu-utils nbd-server nbdkit libnbd-bin (NBD
#   servers and a reference client), xfsprogs (xfs volumes).
# Keep qemu-utils named explicitly whenever qemu-system-x86 is added: installing
# qemu-system-x86 alone replaces the machine's newer qemu-utils.
APT_PACKAGES=(
  e2fsprogs # mkfs.ext4, e2fsck: fsck and mount tests
  iproute2  # ip netns, veth: network partition tests
)

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
  say "running: apt-get install -y --no-install-recommends ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
say "done"
