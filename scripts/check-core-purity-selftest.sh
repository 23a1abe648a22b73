#!/usr/bin/env bash
# Self-test of scripts/check-core-purity.sh: a tiny fake core in a temp dir,
# first clean (the check must pass, although its comments, strings and names
# come close to the rules), then once per rule with one violating file (the
# check must fail and name that file and line). Same for --all-files.
set -euo pipefail

check="$(cd "$(dirname "$0")" && pwd)/check-core-purity.sh"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A clean core that exercises the allowed look-alikes.
mkdir -p "$tmp/clean/core/sub"
cat >"$tmp/clean/core/mod.rs" <<'RS'
//! Fake core: comments may say tokio, unsafe, println!, std::fs and crate::config.
/* A block comment /* nested */ naming std::process and SystemTime. */
pub mod machine;
pub mod sub;
use std::fmt::{self, Write as _};
use std::time::Duration;
use std::{collections::BTreeMap, ops::Add};
use crate::core::machine::Thing;
use crate::{core::sub::Other, core::machine};
#[cfg(test)]
mod tests { use super::machine::reason; }
RS
cat >"$tmp/clean/core/machine.rs" <<'RS'
//! Fake machine: strings and chars must not trip the check.
use super::sub::Other;
use crate::core::sub;
pub struct Thing<'a> { reason: &'a str, tracing_id: u64, unsafe_count: u32, nixon: bool }
pub fn reason() -> String {
    let quote = '"';
    let tick = '\'';
    let s = "no std::fs, no tokio, no println!(\"x\") \" here";
    let r = r#"raw "unsafe" crate::sim zookeeper"#;
    let b = br"thread_rng";
    format!("{quote}{tick}{s}{r}{b:?} {}", Instant::ZERO)
}
fn reprint(x: u32) -> u32 { x }
#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn t() { assert_eq!(reprint(1), 1); }
}
RS
cat >"$tmp/clean/core/sub/mod.rs" <<'RS'
//! Fake sub-module.
use super::machine as _; // a comment may mention super::super
pub struct Other;
RS

pass=0
fail=0
ok() { pass=$((pass + 1)); printf 'ok   %s\n' "$1"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$1"; printf '%s\n' "$2" | sed 's/^/     | /'; }

if out=$("$check" "$tmp/clean/core" 2>&1); then ok "clean core passes"; else bad "clean core passes" "$out"; fi

# Each case: the rule it targets, and the lines of a violating file (the
# violation is on line 3, after the //! line and a blank line).
case_no=0
expect_hit() {
  local name=$1 body=$2 want_line=${3:-3}
  case_no=$((case_no + 1))
  local dir="$tmp/case$case_no/core"
  mkdir -p "$(dirname "$dir")"
  cp -r "$tmp/clean/core" "$dir"
  printf '%b\n' "$body" >"$dir/bad.rs"
  local out rc=0
  out=$("$check" "$dir" 2>&1) || rc=$?
  if [ "$rc" -eq 1 ] && grep -q "/bad\.rs:$want_line: " <<<"$out"; then
    ok "catches $name"
  else
    bad "catches $name (exit $rc, want 1 and bad.rs:$want_line)" "$out"
  fi
}

H='//! Bad file.\n'
expect_hit "std::time::Instant"           "$H\nuse std::time::Instant;"
expect_hit "grouped std::time::{Instant}" "$H\nuse std::time::{Duration, Instant};"
expect_hit "std::{time::Instant}"         "$H\nuse std::{fmt, time::{Duration, Instant}};"
expect_hit "Instant::now()"               "$H\nfn f() { let _ = Instant::now(); }"
expect_hit "SystemTime"                   "$H\nfn f() { let _ = std::time::SystemTime::now(); }"
expect_hit "UNIX_EPOCH"                   "$H\nuse std::time::UNIX_EPOCH;"
expect_hit "std::thread"                  "$H\nfn f() { std::thread::sleep(D); }"
expect_hit "std::process"                 "$H\nuse std::process::Command;"
expect_hit "std::fs"                      "$H\nuse std::fs;"
expect_hit "std::net"                     "$H\nuse std::net::TcpStream;"
expect_hit "std::io"                      "$H\nuse std::io::Write;"
expect_hit "std::os"                      "$H\nuse std::os::unix::io::RawFd;"
expect_hit "std::env"                     "$H\nfn f() { let _ = std::env::var(\"X\"); }"
expect_hit "grouped std::{fmt, io}"       "$H\nuse std::{fmt, io};"
expect_hit "multi-line std::{ … fs }"     "$H\nuse std::{\n    fmt,\n    fs,\n};"
expect_hit "::std::fs"                    "$H\nfn f() { let _ = ::std::fs::read(\"x\"); }"
expect_hit "tokio"                        "$H\nuse tokio::time::sleep;"
expect_hit "nix"                          "$H\nuse nix::unistd::getpid;"
expect_hit "libc"                         "$H\nextern crate libc;"
expect_hit "zookeeper"                    "$H\nuse zookeeper_client::Client;"
expect_hit "rand::thread_rng"             "$H\nfn f() { let _ = rand::thread_rng(); }"
expect_hit "rand::rng"                    "$H\nfn f() { let _ = rand::rng(); }"
expect_hit "rand::random"                 "$H\nfn f() -> u8 { rand::random() }"
expect_hit "OsRng"                        "$H\nuse rand::rngs::OsRng;"
expect_hit "getrandom"                    "$H\nfn f(b: &mut [u8]) { getrandom::fill(b).ok(); }"
expect_hit "unsafe"                       "$H\nfn f() { unsafe { g() } }"
expect_hit "println!"                     "$H\nfn f() { println!(\"x\"); }"
expect_hit "eprintln!"                    "$H\nfn f() { eprintln!(\"x\"); }"
expect_hit "print!"                       "$H\nfn f() { print!(\"x\"); }"
expect_hit "dbg!"                         "$H\nfn f(x: u8) -> u8 { dbg!(x) }"
expect_hit "tracing"                      "$H\nuse tracing::info;"
expect_hit "#[path]"                      "$H\n#[path = \"../sim/x.rs\"]\nmod x;"
expect_hit "crate::config"                "$H\nuse crate::config::Config;"
expect_hit "crate::sim"                   "$H\nfn f() { crate::sim::run(); }"
expect_hit "crate::cli"                   "$H\nuse crate::cli;"
expect_hit "crate::{core, config}"        "$H\nuse crate::{core::Event, config::Config};"
expect_hit "crate::{…} over lines"        "$H\nuse crate::{\n    core::{Event, Effect},\n    sim,\n};"
expect_hit "super::super"                 "$H\nuse super::super::config;"
case_no=$((case_no + 1))
mkdir -p "$tmp/case$case_no"
cp -r "$tmp/clean/core" "$tmp/case$case_no/core"
printf 'fn f() { super::config::load(); }\n' >>"$tmp/case$case_no/core/mod.rs"
want_line=$(wc -l <"$tmp/case$case_no/core/mod.rs")
rc=0
out=$("$check" "$tmp/case$case_no/core/" 2>&1) || rc=$?
if [ "$rc" -eq 1 ] && grep -q "/core/mod\.rs:$want_line: " <<<"$out"; then
  ok "catches super:: from the core root (mod.rs)"
else
  bad "catches super:: from the core root (mod.rs) (exit $rc, want 1 and mod.rs:$want_line)" "$out"
fi
expect_hit "missing //! line"             "// not a doc line\nuse std::fmt;" 1
expect_hit "blank first line"             "" 1

# --all-files: every .rs under the given dirs starts with //!.
mkdir -p "$tmp/tree/src/a" "$tmp/tree/tests"
printf '//! Lib.\n' >"$tmp/tree/src/lib.rs"
printf '//! A.\nuse std::fs;\n' >"$tmp/tree/src/a/mod.rs"
printf '//! Test.\n' >"$tmp/tree/tests/t.rs"
if out=$("$check" --all-files "$tmp/tree/src" "$tmp/tree/tests" 2>&1); then
  ok "--all-files passes on documented files (and ignores purity)"
else
  bad "--all-files passes on documented files (and ignores purity)" "$out"
fi
printf '\n//! Late doc line.\n' >"$tmp/tree/tests/late.rs"
rc=0
out=$("$check" --all-files "$tmp/tree/src" "$tmp/tree/tests" 2>&1) || rc=$?
if [ "$rc" -eq 1 ] && grep -q '/tests/late\.rs:1: ' <<<"$out"; then
  ok "--all-files catches a file without a leading //! line"
else
  bad "--all-files catches a file without a leading //! line (exit $rc)" "$out"
fi

rc=0
out=$("$check" "$tmp/does-not-exist" 2>&1) || rc=$?
if [ "$rc" -eq 2 ]; then ok "missing directory is an error"; else bad "missing directory is an error (exit $rc)" "$out"; fi

echo "check-core-purity self-test: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
