#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each on its seeds (fuzz/seeds/<target>,
# committed) plus what earlier runs found (fuzz/corpus/<target>, not committed), and prints
# the executions and time per target. A crash fails the run; its input is in
# fuzz/artifacts/<target>/ (add it to the seeds with the fix and a regression test).
# Usage: fuzz/run.sh SECONDS [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${1:?usage: fuzz/run.sh SECONDS [TARGET...]}"; shift || true
# The nightly the eBPF build pins (sanitizers need a nightly); the fuzz build skips the eBPF.
NIGHTLY="${KPROF_EBPF_TOOLCHAIN:-$(sed -n 's/^const EBPF_TOOLCHAIN: &str = "\(.*\)";/\1/p' ../agent/build.rs)}"
export AYA_BUILD_SKIP=1
# The store target keeps its server for the whole run: no leak report at exit.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
if (( ${#targets[@]} == 0 )); then
  mapfile -t targets < <(cargo +"$NIGHTLY" fuzz list)
fi
# Every target is built once, up front (cargo fuzz run would build each on its turn).
build_log="$(mktemp)"
if ! cargo +"$NIGHTLY" fuzz build -O --debug-assertions >"$build_log" 2>&1; then
  cat "$build_log"
  exit 1
fi
grep -E "^ *Finished" "$build_log" || true
rm -f "$build_log"
report=()
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
  log="$(mktemp)"
  start=$(date +%s)
  # Memory capped, and time per input (a slow input is a bug too); the store's in-process
  # server keeps buffers for the run (no leak checks).
  if cargo +"$NIGHTLY" fuzz run -O --debug-assertions "$t" "corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -max_len=262144 -timeout=30 \
      -detect_leaks=0 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH
    status=1
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -5
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  report+=("$(printf '%-14s %-6s %10s runs %5ss' "$t" "$result" "${runs:-?}" "$(( $(date +%s) - start ))")")
  rm -f "$log"
done
echo "==> fuzzing, $SECONDS_EACH s per target"
printf '  %s\n' "${report[@]}"
exit "$status"
