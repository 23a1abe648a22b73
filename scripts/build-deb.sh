#!/usr/bin/env bash
# Builds the Debian package of nbd-failover for agents, with dpkg-deb only (no
# debhelper, no debian/ source tree):
#
#   scripts/build-deb.sh            # -> target/debian/nbd-failover_<version>_<arch>.deb
#
# It runs `cargo build --release --locked`, stages the package tree under
# target/debian/, and prints the path of the .deb as its last line. Contents:
#   /usr/bin/nbd-failover                          the binary (stripped)
#   /usr/lib/nbd-failover/bin/dvdcli,              symlinks to it: the binary
#     nbd-failover-mesos-{prepare,cleanup,           dispatches on its argv[0]
#     remove-executor}                               (Mesos hooks, dvdcli contract)
#   /lib/systemd/system/nbd-failover.service       packaging/nbd-failover.service
#   /usr/lib/modules-load.d/nbd-failover.conf      packaging/modules-load.conf (nbd at boot)
#   /etc/nbd-failover/nbd-failover.toml            conffile: examples/nbd-failover.toml with
#                                                  the watchdog switched on (see below)
#   bash, zsh and fish completions                 from `nbd-failover completions SHELL`
#   /usr/share/doc/nbd-failover/                   README.md, docs/*.md, copyright
# Maintainer scripts: postinst and postrm run `systemctl daemon-reload` when
# systemd is running; prerm stops the daemon on removal (not on upgrade).
# Nothing enables or starts the service: the operator writes the config first.
#
# The shipped config differs from examples/nbd-failover.toml in one place:
# [watchdog] mode = "systemd", timeout = "8s" (the example has the watchdog
# off), because the unit sets WatchdogSec=8s: with the watchdog off the daemon
# would never pet it and systemd would kill it every 8 s. The script checks the
# result with `nbd-failover check-config --json`.
#
# Environment:
#   CARGO_TARGET_DIR      cargo's target dir (default: target); the package
#                         always goes to target/debian/ in the repository
#   DEB_OUT_DIR           where the .deb goes instead (default: target/debian)
#   DEB_SKIP_COMPLETIONS=1  build without shell completions (only while the
#                         binary has no `completions` subcommand; the package
#                         then lacks them and scripts/check-package.sh fails)
#   DEB_NO_BUILD=1        do not run cargo; package the existing release binary
#
# Needs: cargo, dpkg-deb, dpkg-shlibdeps (dpkg-dev), strip (binutils), python3
# (all installed by scripts/setup.sh).
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

say() { printf 'build-deb: %s\n' "$*" >&2; }
die() { printf 'build-deb: ERROR: %s\n' "$*" >&2; exit 1; }

# sudo's secure_path usually drops ~/.cargo/bin: look there too.
if ! command -v cargo >/dev/null 2>&1; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    if [ -x "$d/cargo" ]; then PATH="$d:$PATH"; export PATH; break; fi
  done
fi
for tool in cargo dpkg-deb dpkg-shlibdeps dpkg strip python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run scripts/setup.sh"
done

# --- what to build -------------------------------------------------------------
# The [package] version, not a dependency's.
version=$(awk '/^\[/ { sect = $0 } sect == "[package]" && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }' Cargo.toml)
[ -n "$version" ] || die "no version in Cargo.toml's [package] table"
arch=$(dpkg --print-architecture)
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$repo/$target ;; esac
out_dir=${DEB_OUT_DIR:-$repo/target/debian}
case $out_dir in /*) ;; *) out_dir=$repo/$out_dir ;; esac
pkg=nbd-failover
deb=$out_dir/${pkg}_${version}_${arch}.deb

if [ "${DEB_NO_BUILD:-0}" = 1 ]; then
  say "DEB_NO_BUILD=1: packaging the existing $target/release/nbd-failover"
else
  say "building: cargo build --release --locked (target dir $target)"
  CARGO_TARGET_DIR=$target cargo build --release --locked --bin nbd-failover
fi
bin=$target/release/nbd-failover
[ -x "$bin" ] || die "no release binary at $bin"
bin_version=$("$bin" --version) || die "$bin --version failed"
case $bin_version in
  *" $version") ;;
  *) die "$bin says '$bin_version', Cargo.toml says $version: stale binary? (run without DEB_NO_BUILD)" ;;
esac

# --- the package tree ----------------------------------------------------------
mkdir -p "$out_dir"
root=$out_dir/${pkg}_${version}_${arch}
rm -rf "$root"
mkdir -p "$root/DEBIAN"
d() { install -d -m 0755 "$root/$1"; }
f() { install -D -m "$1" "$2" "$root/$3"; } # f MODE SRC DEST

d usr/bin
install -m 0755 "$bin" "$root/usr/bin/nbd-failover"
strip --strip-unneeded "$root/usr/bin/nbd-failover"

# The names the binary answers to besides its own. Relative links (Debian
# policy within /usr), so they also resolve in a tree extracted elsewhere.
d usr/lib/nbd-failover/bin
for name in dvdcli nbd-failover-mesos-prepare nbd-failover-mesos-cleanup nbd-failover-mesos-remove-executor; do
  ln -s ../../../bin/nbd-failover "$root/usr/lib/nbd-failover/bin/$name"
done

f 0644 packaging/nbd-failover.service lib/systemd/system/nbd-failover.service
f 0644 packaging/modules-load.conf usr/lib/modules-load.d/nbd-failover.conf

# The conffile: the example, with the watchdog on to match WatchdogSec=8s.
conf=$root/etc/nbd-failover/nbd-failover.toml
install -d -m 0755 "$root/etc/nbd-failover"
python3 - examples/nbd-failover.toml "$conf" <<'PY'
import sys
src, dst = sys.argv[1], sys.argv[2]
lines = open(src).read().split("\n")
section, done = None, {"mode": 0, "timeout": 0}
for i, line in enumerate(lines):
    s = line.strip()
    if s.startswith("[") and not s.startswith("#"):
        section = s
    if section != "[watchdog]":
        continue
    if s == 'mode = "off"':
        lines[i] = 'mode = "systemd"   # the package: on, to match WatchdogSec=8s in nbd-failover.service'
        done["mode"] += 1
    elif s == '# timeout = "8s"':
        lines[i] = 'timeout = "8s"     # the package: MUST equal WatchdogSec in nbd-failover.service'
        done["timeout"] += 1
if done != {"mode": 1, "timeout": 1}:
    sys.exit('build-deb: ERROR: examples/nbd-failover.toml changed: expected exactly one '
             'mode = "off" and one # timeout = "8s" line in [watchdog], found %r' % done)
header = """# /etc/nbd-failover/nbd-failover.toml: the nbd-failover daemon's config, as
# shipped by the Debian package (a conffile: your edits survive upgrades).
# It is the annotated example (examples/nbd-failover.toml) with one change:
# [watchdog] mode = "systemd", timeout = "8s", to match WatchdogSec=8s in
# /lib/systemd/system/nbd-failover.service. Change both together (the unit
# with a drop-in: systemctl edit nbd-failover).
#
# Before `systemctl enable --now nbd-failover`: set [zookeeper] hosts, replace
# the example volumes with yours, and check the file:
#   nbd-failover check-config /etc/nbd-failover/nbd-failover.toml
#
"""
open(dst, "w").write(header + "\n".join(lines))
PY
chmod 0644 "$conf"
wd=$("$bin" check-config --json "$conf" | python3 -c 'import json,sys; w=json.load(sys.stdin)["watchdog"]; print(w.get("mode"), w.get("timeout"))') ||
  die "the shipped config fails check-config: $("$bin" check-config "$conf" 2>&1 | tail -n 5)"
[ "$wd" = "systemd 8s" ] || die "the shipped config's watchdog is '$wd', expected 'systemd 8s' (WatchdogSec=8s in the unit)"
unit_wd=$(sed -n 's/^WatchdogSec=//p' packaging/nbd-failover.service)
[ "$unit_wd" = 8s ] || die "packaging/nbd-failover.service has WatchdogSec=$unit_wd; the shipped config says 8s"

# Shell completions, generated by the binary itself.
if [ "${DEB_SKIP_COMPLETIONS:-0}" = 1 ]; then
  say "DEB_SKIP_COMPLETIONS=1: building WITHOUT shell completions"
else
  for sh in bash zsh fish; do
    case $sh in
      bash) dest=usr/share/bash-completion/completions/nbd-failover ;;
      zsh) dest=usr/share/zsh/vendor-completions/_nbd-failover ;;
      fish) dest=usr/share/fish/vendor_completions.d/nbd-failover.fish ;;
    esac
    install -d -m 0755 "$root/$(dirname "$dest")"
    if ! "$bin" completions "$sh" >"$root/$dest" 2>"$out_dir/completions.err" || [ ! -s "$root/$dest" ]; then
      die "'nbd-failover completions $sh' failed or printed nothing: $(head -c 600 "$out_dir/completions.err")
  The package ships completions generated by the binary. If this binary has no
  'completions' subcommand yet, build without them: DEB_SKIP_COMPLETIONS=1 $0"
    fi
    chmod 0644 "$root/$dest"
  done
  rm -f "$out_dir/completions.err"
fi

# Documentation.
doc=usr/share/doc/$pkg
f 0644 README.md "$doc/README.md"
for md in docs/*.md; do f 0644 "$md" "$doc/$(basename "$md")"; done
cat >"$root/$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: nbd-failover
Comment: The binary statically links Rust crates from crates.io (see
 Cargo.lock in the source); their licences are not listed here.

Files: *
Copyright: the nbd-failover authors
License: $(sed -n 's/^license *= *"\(.*\)"/\1/p' Cargo.toml)
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
chmod 0644 "$root/$doc/copyright"

# --- control data --------------------------------------------------------------
# Shared-library dependencies of the binary (libc6, libgcc-s1, ...), computed by
# dpkg-shlibdeps, which wants a debian/control to read: give it a minimal one.
shl=$(mktemp -d)
trap 'rm -rf "$shl"' EXIT
mkdir -p "$shl/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$pkg" "$pkg" >"$shl/debian/control"
shlibs=$(cd "$shl" && dpkg-shlibdeps -O "-e$root/usr/bin/nbd-failover" 2>"$shl/err" | sed -n 's/^shlibs:Depends=//p') ||
  die "dpkg-shlibdeps failed: $(cat "$shl/err")"
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no library dependencies: $(cat "$shl/err")"

# Depends: what the daemon runs or the unit needs on every node.
#   e2fsprogs  e2fsck: fsck before mounting ext2/3/4 volumes (the default fs)
#   mount      umount/findmnt/losetup for operators following the runbook (the
#              daemon itself mounts with mount(2) and finds holders via /proc)
#   kmod       modprobe in the unit's ExecStartPre (the nbd driver)
# util-linux is Essential in Debian, so it is not listed.
# Recommends: xfsprogs (xfs_repair -n: only for xfs volumes), systemd (the unit,
# and `systemctl` for systemd_unit tasks; the exec wrapper and the CLI run
# without it).
# Not nbd-client: the daemon attaches devices itself over the kernel's netlink
# interface. Suggests: the serving side, usually on other machines.
installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: nbd-failover developers <nbd-failover@localhost>
Installed-Size: $installed_kb
Depends: $shlibs, e2fsprogs, mount, kmod
Recommends: systemd, xfsprogs
Suggests: zookeeperd, qemu-utils | nbd-server | nbdkit, libnbd-bin
Section: admin
Priority: optional
Description: lease-gated failover of network block devices for stateful services
 nbd-failover is a node-local controller that moves a stateful service's
 volume (an NBD export, an image file on a loop device, or a shared-filesystem
 directory) between machines safely. Each node contends for a ZooKeeper lease
 per volume; only the holder attaches, checks (fsck), mounts and starts the
 task, and a holder that loses contact with ZooKeeper fences itself (stop the
 task, unmount, detach) before its session can expire. A systemd watchdog,
 lock-delay and start-up recovery back this up.
 .
 This package ships the daemon (systemd unit nbd-failover.service, not enabled
 on install), the operator CLI, the exec wrapper and the Mesos hooks (dvdcli).
EOF
printf '/etc/nbd-failover/nbd-failover.toml\n' >"$root/DEBIAN/conffiles"

cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# postinst of nbd-failover: make systemd see the (new) unit file. Deliberately
# does NOT enable or start nbd-failover.service: the shipped config is an
# example (its volumes and ZooKeeper address are placeholders), so the operator
# writes /etc/nbd-failover/nbd-failover.toml first and then runs
#   systemctl enable --now nbd-failover
# Nor does it restart a running daemon on upgrade: a restart fences every
# volume this node holds (its tasks stop and the volumes move); the operator
# chooses when (systemctl restart nbd-failover).
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
exit 0
EOF
cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# prerm of nbd-failover: on removal, stop the daemon while its binary is still
# here; stopping fences every volume it holds and releases it cleanly (the
# tasks stop, another node takes over without lock-delay). On upgrade the
# running daemon is left alone (see postinst).
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop nbd-failover.service || true
fi
exit 0
EOF
cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# postrm of nbd-failover: forget the removed unit; on purge also remove the
# state directory (clean-release records). dpkg itself purges the conffile.
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
if [ "$1" = purge ]; then
  rm -rf /var/lib/nbd-failover
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

# --- the .deb ------------------------------------------------------------------
find "$root" -type d -exec chmod 0755 {} +
rm -f "$deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
say "built $deb ($(du -h "$deb" | cut -f1), version $version, $arch; Depends: $shlibs, e2fsprogs, mount, kmod)"
echo "$deb"
