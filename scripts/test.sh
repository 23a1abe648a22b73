#!/usr/bin/env bash
# The project's test command (the README's second command; .ci/run calls it).
#
#   sudo scripts/test.sh
#
# Runs every step below even when an earlier one fails, so one run shows
# everything; each step is announced with a header and timed, and a summary
# lists PASS/FAIL per step and ends with a line "N passed, N failed".
# Exits non-zero if any step failed.
#
# Steps: setup (scripts/setup.sh installs what is missing), cargo fmt --check,
# cargo clippy --all-targets -D warnings, the core purity check, its self-test,
# //! headers on every .rs file, cargo test --release --all-targets (release
# because the deterministic simulation runs >= 10,000 seeds), doc tests, and
# the VM lab (scripts/vm-lab.sh: the kernel NBD suite and the attach->detach
# benchmark inside a virtme-ng VM, since the host kernel has no NBD driver).
#
# Environment:
#   SIM_SEEDS=N        number of seeds for the deterministic simulation test
#                      (passed through to it; default: the test's own, >= 10,000)
#   STEP_TIMEOUT=SECS  kill a step that runs longer (0 = no limit). Default: 1200
#                      when CI=true (so a hang cannot eat the CI hour), else 0.
#   CI=true            set by .ci/run: also passes --locked to cargo, so a
#                      Cargo.lock that does not match Cargo.toml fails the run.
set -euo pipefail

cd "$(dirname "$0")/.."

# sudo's secure_path usually drops ~/.cargo/bin: look there too (setup.sh
# reports clearly if cargo is nowhere).
if ! command -v cargo >/dev/null 2>&1; then
  for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
    if [ -x "$d/cargo" ]; then
      PATH="$d:$PATH"
      export PATH
      break
    fi
  done
fi

if [ -n "${SIM_SEEDS:-}" ]; then
  case $SIM_SEEDS in
    *[!0-9]*) echo "test.sh: SIM_SEEDS must be a number, got '$SIM_SEEDS'" >&2; exit 2 ;;
  esac
  export SIM_SEEDS
fi
case ${STEP_TIMEOUT:-0} in
  *[!0-9]*) echo "test.sh: STEP_TIMEOUT must be a number of seconds, got '$STEP_TIMEOUT'" >&2; exit 2 ;;
esac
if [ "${CI:-}" = true ]; then
  step_timeout=${STEP_TIMEOUT:-1200}
  locked=(--locked)
else
  step_timeout=${STEP_TIMEOUT:-0}
  locked=()
fi
# rustfmt colours its diff even into a pipe or a log file: only on a terminal.
fmt_color=()
[ -t 1 ] || fmt_color=(-- --color never)

now_us() { local t=${EPOCHREALTIME//[.,]/}; echo "$((10#$t))"; }
fmt_us() {
  local ds=$(($1 / 100000)) # tenths of a second
  if [ "$ds" -ge 600 ]; then
    printf '%dm%02ds' $((ds / 600)) $((ds / 10 % 60))
  else
    printf '%d.%ds' $((ds / 10)) $((ds % 10))
  fi
}

names=()
results=()
times=()
run_step() {
  local name=$1
  shift
  local n=$((${#names[@]} + 1))
  echo
  echo "==> [$n] $name: $*"
  local t0 rc=0
  t0=$(now_us)
  if [ "$step_timeout" -gt 0 ]; then
    timeout --kill-after=10 "$step_timeout" "$@" || rc=$?
  else
    "$@" || rc=$?
  fi
  local dt verdict=PASS
  dt=$(($(now_us) - t0))
  if [ "$rc" -ne 0 ]; then
    verdict=FAIL
    if [ "$rc" -eq 124 ] && [ "$step_timeout" -gt 0 ]; then
      echo "test.sh: $name timed out after ${step_timeout}s (STEP_TIMEOUT)"
    fi
  fi
  echo "<== [$n] $name: $verdict (exit $rc, $(fmt_us "$dt"))"
  names+=("$name")
  results+=("$verdict")
  times+=("$dt")
}

t_start=$(now_us)
echo "nbd-failover tests: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git') on $(uname -srm)," \
  "CI=${CI:-unset}, SIM_SEEDS=${SIM_SEEDS:-default}, STEP_TIMEOUT=${step_timeout}"

run_step setup scripts/setup.sh
run_step fmt cargo fmt --check "${fmt_color[@]}"
run_step clippy cargo clippy "${locked[@]}" --all-targets -- -D warnings
run_step core-purity scripts/check-core-purity.sh
run_step purity-selftest scripts/check-core-purity-selftest.sh
run_step file-headers scripts/check-core-purity.sh --all-files
run_step tests cargo test "${locked[@]}" --release --all-targets -- --show-output
run_step doctests cargo test "${locked[@]}" --release --doc
run_step package scripts/check-package.sh
run_step campaign scripts/campaign.sh --faults 50 --duration 150
run_step bench-report-quick env CI=true scripts/bench-report.sh --quick --out "$(mktemp /tmp/benchmarks-quick.XXXXXX.md)"
run_step vm-lab scripts/vm-lab.sh

passed=0
failed=0
echo
echo "==== summary ===="
for i in "${!names[@]}"; do
  printf '%-4s  %-16s %8s\n' "${results[$i]}" "${names[$i]}" "$(fmt_us "${times[$i]}")"
  if [ "${results[$i]}" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "total wall time: $(fmt_us $(($(now_us) - t_start)))"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
