#!/usr/bin/env bash
# Proves the failover core is pure, and that every Rust file says what lives in it.
#
# Usage:
#   scripts/check-core-purity.sh [DIR]              purity of DIR (default: src/core)
#   scripts/check-core-purity.sh --all-files [DIR…] every .rs file under the DIRs
#                                                   (default: src tests) starts with a //! line
#
# Purity: no file under DIR may use a clock (std::time::Instant, Instant::now,
# SystemTime, UNIX_EPOCH), threads, processes, the filesystem, the network,
# std::io, std::os, the environment, tokio, nix, libc, zookeeper*, unseeded
# randomness (thread_rng, rand::rng, rand::random, OsRng, getrandom), `unsafe`,
# printing (println!, eprintln!, print!, eprint!, dbg!), tracing, `#[path]`,
# crate:: paths that leave the core (anything but crate::core), super::super,
# or super:: in DIR/mod.rs outside an inline module. Every file must start with a //! line. Comments, string and
# char literals are blanked before matching, so prose may name these things.
# Each hit is listed as file:line: rule: source line. Exit 0 clean, 1 on hits,
# 2 on usage errors. Self-test: scripts/check-core-purity-selftest.sh.
set -euo pipefail

mode=core
if [ "${1:-}" = "--all-files" ]; then
  mode=headers
  shift
fi
case "${1:-}" in
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac

if [ $# -eq 0 ]; then
  cd "$(dirname "$0")/.."
  if [ "$mode" = core ]; then set -- src/core; else set -- src tests; fi
fi

files=()
for dir in "$@"; do
  if [ ! -d "$dir" ]; then
    if [ "$mode" = headers ] && [ "$dir" = tests ]; then
      continue # a fresh checkout may have no tests/ yet
    fi
    echo "check-core-purity: no such directory: $dir" >&2
    exit 2
  fi
  while IFS= read -r -d '' f; do files+=("$f"); done < <(find "$dir" -type f -name '*.rs' -print0 | sort -z)
done
if [ ${#files[@]} -eq 0 ]; then
  echo "check-core-purity: no .rs files under: $*" >&2
  exit 2
fi

# The checker proper. Reads the files named in @ARGV; $ENV{MODE} is core or headers.
# shellcheck disable=SC2016 # the Perl program is single-quoted on purpose
prog='
use strict;
use warnings;

sub blank { my $t = shift; $t =~ s/[^\n]/ /g; return $t }

# Blank comments, string literals and char literals, keeping line structure.
sub strip_rust {
    my $s = shift;
    my $o = "";
    pos($s) = 0;
    my $n = length $s;
    while (pos($s) < $n) {
        if ($s =~ /\G(\/\/[^\n]*)/gc) {
            $o .= blank($1);
        } elsif ($s =~ /\G\/\*/gc) {
            my ($buf, $depth) = ("/*", 1);
            while ($depth > 0 && $s =~ /\G(.*?)(\/\*|\*\/)/gcs) {
                $buf .= $1 . $2;
                $depth += $2 eq "/*" ? 1 : -1;
            }
            if ($depth > 0) { $buf .= substr($s, pos($s)); pos($s) = $n; }
            $o .= blank($buf);
        } elsif ($s =~ /\G(?<![\w])((?:b|c)?r(#*)".*?"\2)/gcs) {
            $o .= blank($1);
        } elsif ($s =~ /\G("(?:[^"\\]|\\.)*")/gcs) {
            $o .= blank($1);
        } elsif ($s =~ /\G(\x27(?:[^\x27\\\n]|\\u\{[0-9a-fA-F]{1,6}\}|\\x[0-9a-fA-F]{2}|\\.)\x27)/gc) {
            $o .= blank($1);
        } elsif ($s =~ /\G([A-Za-z0-9_]+|.)/gcs) {
            $o .= $1;
        }
    }
    return $o;
}

my $M = qr/(?:thread|process|fs|net|io|os|env)/;
my @rules = (
    [ "clock read (std::time::Instant)", qr/\bstd::time::Instant\b|\bstd::time::\{[^;]*?\bInstant\b|\bstd::\{[^;]*?\btime::[^;]*?\bInstant\b/ ],
    [ "clock read (Instant::now)",       qr/\bInstant::now\b/ ],
    [ "clock read (SystemTime)",         qr/\bSystemTime\b|\bUNIX_EPOCH\b/ ],
    [ "threads, processes or IO (std::thread/process/fs/net/io/os/env)",
                                         qr/\bstd::$M\b|\bstd::\{[^;]*?(?<![\w:])$M\b/ ],
    [ "tokio",                           qr/\btokio\b/ ],
    [ "nix",                             qr/\bnix\b/ ],
    [ "libc",                            qr/\blibc\b/ ],
    [ "ZooKeeper client types",          qr/\bzookeeper\w*/ ],
    [ "unseeded randomness",             qr/\bthread_rng\b|\brand::(?:rng|random)\b|\bOsRng\b|\bgetrandom\b/ ],
    [ "unsafe",                          qr/\bunsafe\b/ ],
    [ "printing (use the returned reason)", qr/\b(?:e?println|e?print|dbg)!/ ],
    [ "tracing (logging belongs to the caller)", qr/\btracing\b/ ],
    [ "#[path] pulls in a file from elsewhere", qr/#\s*!?\s*\[\s*path\b/ ],
    [ "path leaves the core (only crate::core)", qr/\bcrate::(?!core\b)(?!\s*\{)/ ],
    [ "path leaves the core (super::super)", qr/\bsuper::super\b/ ],
);

my $hits = 0;
sub report {
    my ($file, $raw_lines, $line, $rule) = @_;
    my $src = $raw_lines->[$line - 1] // "";
    $src =~ s/^\s+|\s+$//g;
    print "$file:$line: $rule: $src\n";
    $hits++;
}

my $mode = $ENV{MODE};
for my $file (@ARGV) {
    open(my $fh, "<", $file) or die "check-core-purity: cannot read $file: $!\n";
    my $text = do { local $/; <$fh> };
    close $fh;
    my @raw = split /\n/, $text, -1;
    if ($text !~ /\A\/\/!/) {
        report($file, \@raw, 1, "does not start with a //! line saying what lives in it");
    }
    next if $mode ne "core";

    my $code = strip_rust($text);
    my $line_of = sub { 1 + (substr($code, 0, $_[0]) =~ tr/\n//) };
    for my $r (@rules) {
        my ($name, $re) = @$r;
        while ($code =~ /$re/g) {
            report($file, \@raw, $line_of->($-[0]), $name);
        }
    }
    # crate::{a, b}: every top-level item of the group must be core.
    while ($code =~ /\bcrate::\s*\{/g) {
        my $start = $-[0];
        my ($i, $depth, $item, @items) = (pos($code), 1, "");
        while ($i < length $code && $depth > 0) {
            my $c = substr($code, $i++, 1);
            if ($c eq "{") { $depth++ } elsif ($c eq "}") { $depth--; last if $depth == 0 }
            if ($c eq "," && $depth == 1) { push @items, $item; $item = ""; } else { $item .= $c }
        }
        push @items, $item;
        my @out = grep { my $t = $_; $t =~ s/^\s+|\s+$//g; $t ne "" && $t !~ /^core\b/ } @items;
        report($file, \@raw, $line_of->($start), "path leaves the core (only crate::core)") if @out;
    }
    # In the root of the core (DIR/mod.rs), super:: outside an inline `mod x { }` is the crate root.
    if ($file eq $ENV{ROOT_MOD}) {
        my @spans;
        while ($code =~ /\bmod\s+\w+\s*\{/g) {
            my ($s0, $i, $depth) = ($-[0], pos($code), 1);
            while ($i < length $code && $depth > 0) {
                my $c = substr($code, $i++, 1);
                $depth++ if $c eq "{";
                $depth-- if $c eq "}";
            }
            push @spans, [$s0, $i];
            pos($code) = $i;
        }
        while ($code =~ /\bsuper\s*::/g) {
            my $at = $-[0];
            next if grep { $at > $_->[0] && $at < $_->[1] } @spans;
            report($file, \@raw, $line_of->($at), "path leaves the core (super:: from the core root)");
        }
    }
}
exit($hits ? 1 : 0);
'

set +e
root_mod=
[ "$mode" = core ] && [ $# -eq 1 ] && root_mod="${1%/}/mod.rs"
out=$(MODE=$mode ROOT_MOD=$root_mod perl -e "$prog" "${files[@]}")
rc=$?
set -e
[ -n "$out" ] && printf '%s\n' "$out"
if [ "$mode" = core ]; then what="core purity ($*)"; else what="//! file headers ($*)"; fi
case $rc in
  0) echo "$what: OK, ${#files[@]} files checked" ;;
  1) echo "$what: FAILED, $(printf '%s\n' "$out" | grep -c .) problem(s) in ${#files[@]} files"; exit 1 ;;
  *) echo "$what: checker error (exit $rc)" >&2; exit 2 ;;
esac
