#!/usr/bin/env bash
# Checks the Debian package of nbd-failover (what scripts/build-deb.sh makes):
#
#   scripts/check-package.sh            # builds it first (scripts/build-deb.sh)
#   scripts/check-package.sh PATH.deb   # checks an existing package
#
# Checks, each printed as PASS, FAIL or NOT RUN (with the reason):
#   - `dpkg-deb --info`: the control fields (name, version = Cargo.toml's,
#     architecture, Depends), conffiles lists the config, the maintainer
#     scripts parse (sh -n) and none enables, starts or restarts the service;
#   - `dpkg-deb --contents`: every expected path, the symlinks and their targets;
#   - the unit passes `systemd-analyze verify` (in a root made of the package's
#     files and the host's units, so the ExecStart binary exists) with no
#     warning at all; NOT RUN, visibly, where systemd-analyze is missing;
#   - the package extracted with `dpkg-deb -x` into a temp dir: `bin --version`
#     prints the package version, `check-config` accepts the shipped config
#     (run exactly as the unit's ExecStartPre runs it), whose watchdog matches
#     the unit's WatchdogSec; `help daemon` knows the unit's `--config`; every
#     symlink resolves to the extracted binary; the completions are not empty.
# Ends with "check-package: N passed, N failed, N skipped" and exits non-zero if
# any check failed. A skipped (NOT RUN) check does not fail the run but is
# listed above the summary.
#
# Environment: as scripts/build-deb.sh when it builds (CARGO_TARGET_DIR,
# DEB_SKIP_COMPLETIONS=1: the completion checks are then NOT RUN, not passed).
set -uo pipefail
# "COND && pass ... || fail ..." is used throughout: pass always returns 0.
# shellcheck disable=SC2015

cd "$(dirname "$0")/.." || exit 2

passed=0 failed=0 skipped=0
notrun=()
pass() { printf 'PASS     %s\n' "$1"; passed=$((passed + 1)); }
fail() { printf 'FAIL     %s: %s\n' "$1" "$2"; failed=$((failed + 1)); }
skip() { printf 'NOT RUN  %s: %s\n' "$1" "$2"; skipped=$((skipped + 1)); notrun+=("$1 ($2)"); }
finish() {
  echo
  for n in "${notrun[@]}"; do echo "check-package: NOT RUN: $n"; done
  echo "check-package: $passed passed, $failed failed, $skipped skipped"
  [ "$failed" -eq 0 ]
  exit
}

for tool in dpkg-deb python3; do
  command -v "$tool" >/dev/null 2>&1 || { fail "tools" "$tool not found (scripts/setup.sh installs it)"; finish; }
done

if [ $# -ge 1 ]; then
  deb=$1
else
  echo "check-package: building the package (scripts/build-deb.sh)"
  deb=$(scripts/build-deb.sh | tail -n 1) || { fail "build" "scripts/build-deb.sh failed (its output is above)"; finish; }
fi
[ -f "$deb" ] || { fail "package" "no such file: $deb"; finish; }
echo "check-package: checking $deb"

work=$(mktemp -d /tmp/nbd-failover-check-package.XXXXXX)
trap 'rm -rf "$work"' EXIT

version=$(awk '/^\[/ { sect = $0 } sect == "[package]" && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }' Cargo.toml)
arch=$(dpkg --print-architecture)

# --- control data ----------------------------------------------------------------
dpkg-deb --info "$deb" >"$work/info" 2>&1 || { fail "dpkg-deb --info" "$(head -c 400 "$work/info")"; finish; }
field() { dpkg-deb --field "$deb" "$1" 2>/dev/null; }
[ "$(field Package)" = nbd-failover ] && pass "control: Package nbd-failover" || fail "control: Package" "'$(field Package)'"
[ "$(field Version)" = "$version" ] && pass "control: Version $version (Cargo.toml)" || fail "control: Version" "'$(field Version)', Cargo.toml says $version"
[ "$(field Architecture)" = "$arch" ] && pass "control: Architecture $arch" || fail "control: Architecture" "'$(field Architecture)'"
deps=$(field Depends)
missing=""
for p in libc6 e2fsprogs mount kmod; do
  [[ ", $deps," == *", $p "* || ", $deps," == *", $p,"* ]] || missing="$missing $p"
done
[ -z "$missing" ] && pass "control: Depends: $deps" || fail "control: Depends" "missing$missing in '$deps'"
dpkg-deb --ctrl-tarfile "$deb" | tar -x -C "$work" --one-top-level=ctrl 2>"$work/ctrl.err" ||
  fail "control tarball" "$(cat "$work/ctrl.err")"
if [ "$(cat "$work/ctrl/conffiles" 2>/dev/null)" = /etc/nbd-failover/nbd-failover.toml ]; then
  pass "conffiles: /etc/nbd-failover/nbd-failover.toml"
else
  fail "conffiles" "expected exactly /etc/nbd-failover/nbd-failover.toml, got '$(cat "$work/ctrl/conffiles" 2>/dev/null)'"
fi
for s in postinst prerm postrm; do
  if [ ! -f "$work/ctrl/$s" ]; then
    fail "maintainer script $s" "missing"
  elif ! sh -n "$work/ctrl/$s" 2>"$work/sh.err"; then
    fail "maintainer script $s" "does not parse: $(cat "$work/sh.err")"
  elif grep -Ev '^\s*#' "$work/ctrl/$s" | grep -Eq 'systemctl +(--[a-z-]+ +)*(enable|start|restart|reload-or-restart|try-restart)|deb-systemd-(helper|invoke)'; then
    fail "maintainer script $s" "enables, starts or restarts the service: $(grep -E 'systemctl|deb-systemd' "$work/ctrl/$s" | grep -v '^\s*#')"
  else
    pass "maintainer script $s parses, never enables/starts the service"
  fi
done
grep -q 'systemctl daemon-reload' "$work/ctrl/postinst" 2>/dev/null && grep -q '/run/systemd/system' "$work/ctrl/postinst" &&
  pass "postinst: daemon-reload only when systemd runs" || fail "postinst" "no daemon-reload guarded by /run/systemd/system"

# --- contents ---------------------------------------------------------------------
dpkg-deb --contents "$deb" >"$work/contents" 2>&1 || { fail "dpkg-deb --contents" "$(head -c 400 "$work/contents")"; finish; }
# Path column: everything after the 5th field (a symlink adds " -> TARGET").
awk '{ $1=$2=$3=$4=$5=""; sub(/^ +/, ""); print }' "$work/contents" >"$work/paths"
has() { grep -qxF "$1" "$work/paths"; }
expect=(
  ./usr/bin/nbd-failover
  ./lib/systemd/system/nbd-failover.service
  ./usr/lib/modules-load.d/nbd-failover.conf
  ./etc/nbd-failover/nbd-failover.toml
  ./usr/share/doc/nbd-failover/README.md
  ./usr/share/doc/nbd-failover/copyright
)
for md in docs/*.md; do expect+=("./usr/share/doc/nbd-failover/$(basename "$md")"); done
completions=(
  ./usr/share/bash-completion/completions/nbd-failover
  ./usr/share/zsh/vendor-completions/_nbd-failover
  ./usr/share/fish/vendor_completions.d/nbd-failover.fish
)
links=(dvdcli nbd-failover-mesos-prepare nbd-failover-mesos-cleanup nbd-failover-mesos-remove-executor)
for p in "${expect[@]}"; do
  has "$p" && pass "contents: $p" || fail "contents: $p" "not in the package"
done
skip_completions=0
if [ "${DEB_SKIP_COMPLETIONS:-0}" = 1 ] && ! has "${completions[0]}"; then
  skip_completions=1
  skip "contents: shell completions" "DEB_SKIP_COMPLETIONS=1: the package was built without them"
else
  for p in "${completions[@]}"; do
    has "$p" && pass "contents: $p" || fail "contents: $p" "not in the package (the binary's 'completions' subcommand?)"
  done
fi
for l in "${links[@]}"; do
  p=./usr/lib/nbd-failover/bin/$l
  if has "$p -> ../../../bin/nbd-failover"; then
    pass "contents: $p -> ../../../bin/nbd-failover (symlink)"
  else
    fail "contents: $p" "not a symlink to ../../../bin/nbd-failover: $(grep -F "$p" "$work/paths" || echo absent)"
  fi
done
owners=$(awk '{ print $2 }' "$work/contents" | sort -u | tr '\n' ' ')
[ "$owners" = "root/root " ] && pass "contents: every file owned by root/root" || fail "contents: owners" "$owners"

# --- the extracted package ------------------------------------------------------------
x=$work/root
if ! dpkg-deb -x "$deb" "$x" 2>"$work/x.err"; then
  fail "dpkg-deb -x" "$(cat "$work/x.err")"
  finish
fi
bin=$x/usr/bin/nbd-failover
out=$("$bin" --version 2>&1)
[ "$out" = "nbd-failover $version" ] && pass "extracted: bin --version: $out" || fail "extracted: bin --version" "'$out', expected 'nbd-failover $version'"

# check-config exactly as the unit's ExecStartPre runs it, with the paths moved into the tree.
unit=$x/lib/systemd/system/nbd-failover.service
pre=$(sed -n 's/^ExecStartPre=\(\/usr\/bin\/nbd-failover .*\)$/\1/p' "$unit" | head -n 1)
if [ -z "$pre" ]; then
  fail "unit ExecStartPre check-config" "no ExecStartPre=/usr/bin/nbd-failover ... line in the unit"
else
  # shellcheck disable=SC2086 # the unit's command line, split as systemd splits it (no quoting in it)
  set -- ${pre//\/usr\/bin\/nbd-failover/$bin}
  set -- "${@//\/etc\/nbd-failover\//$x/etc/nbd-failover/}"
  if "$@" >"$work/cc.out" 2>&1; then
    pass "extracted: the unit's ExecStartPre (${pre#/usr/bin/}) accepts the shipped config"
  else
    fail "extracted: the unit's ExecStartPre (${pre#/usr/bin/})" "$(tail -n 5 "$work/cc.out")"
  fi
fi
wd=$("$bin" check-config --json "$x/etc/nbd-failover/nbd-failover.toml" 2>/dev/null |
  python3 -c 'import json,sys; w=json.load(sys.stdin)["watchdog"]; print(w.get("mode"), w.get("timeout"))' 2>/dev/null)
unit_wd=$(sed -n 's/^WatchdogSec=//p' "$unit")
[ "$wd" = "systemd $unit_wd" ] && pass "shipped config's watchdog (systemd, $unit_wd) = the unit's WatchdogSec=$unit_wd" ||
  fail "watchdog config vs unit" "config says '$wd', unit WatchdogSec=$unit_wd"
start=$(sed -n 's/^ExecStart=//p' "$unit")
[ "$start" = "/usr/bin/nbd-failover daemon --config /etc/nbd-failover/nbd-failover.toml" ] &&
  "$bin" help daemon 2>/dev/null | grep -q -- '--config' &&
  pass "unit ExecStart: $start (the binary's daemon takes --config)" || fail "unit ExecStart" "'$start' or 'help daemon' has no --config"

for l in "${links[@]}"; do
  p=$x/usr/lib/nbd-failover/bin/$l
  r=$(readlink -f "$p" 2>/dev/null)
  if [ -L "$p" ] && [ "$r" = "$bin" ] && [ -x "$r" ]; then
    pass "extracted: $l resolves to usr/bin/nbd-failover"
  else
    fail "extracted: $l" "resolves to '${r:-nothing}', not $bin"
  fi
done
if [ "$skip_completions" = 0 ]; then
  for p in "${completions[@]}"; do
    [ -s "$x/$p" ] && grep -q nbd-failover "$x/$p" && pass "extracted: ${p#./} is a completion script" ||
      fail "extracted: ${p#./}" "missing, empty or does not mention nbd-failover"
  done
  if command -v bash >/dev/null && [ -s "$x/${completions[0]}" ]; then
    bash -n "$x/${completions[0]}" 2>"$work/bc.err" && pass "extracted: bash completion parses (bash -n)" ||
      fail "extracted: bash completion" "$(cat "$work/bc.err")"
  fi
fi

# --- systemd-analyze verify -----------------------------------------------------------------
if ! command -v systemd-analyze >/dev/null 2>&1; then
  skip "systemd-analyze verify" "systemd-analyze is not installed (package systemd)"
else
  # A root with the package's files and the host's units (targets the unit
  # pulls in), so verify also finds the ExecStart binary.
  va=$work/verify-root
  mkdir -p "$va/lib/systemd/system"
  cp -a "$x/." "$va/"
  for dir in /lib/systemd/system /usr/lib/systemd/system; do
    [ -d "$dir" ] && cp -an "$dir/." "$va/lib/systemd/system/" 2>/dev/null
  done
  if systemd-analyze verify --root="$va" nbd-failover.service >"$work/verify.out" 2>&1; then
    if [ -s "$work/verify.out" ]; then
      # verify exits 0 even on "Failed to parse ..., ignoring" warnings: any output fails.
      fail "systemd-analyze verify" "warnings: $(head -n 10 "$work/verify.out")"
    else
      pass "systemd-analyze verify nbd-failover.service ($(systemd-analyze --version | head -n 1)), no warnings"
    fi
  else
    if grep -qiE 'not booted|Failed to (initialize|connect)|Operation not permitted|No such file or directory.*(sysinit|basic)\.target' "$work/verify.out"; then
      skip "systemd-analyze verify" "systemd-analyze cannot run here: $(head -n 3 "$work/verify.out")"
    else
      fail "systemd-analyze verify" "$(head -n 10 "$work/verify.out")"
    fi
  fi
fi

finish
