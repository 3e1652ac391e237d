#!/usr/bin/env bash
# Overhead benchmark of kprof-agent against perf, on one CPU workload with a fixed amount of work.
#
#   sudo -E agent/bench/overhead.sh [ROUNDS=3] [WORK=3000]   (make bench; WORK 3000 ≈ 20 s of CPU)
#
# Runs the workload unprofiled, under `perf record -F 99 -g` and under `kprof-agent record --hz 99`,
# alternating the order, ROUNDS times (default 3), and prints medians and ratios: workload
# slowdown (CPU and wall), profiler CPU per sample (user+sys of the profiler process, plus the
# eBPF program's run time from BPF_ENABLE_STATS for kprof), and the profiler's peak RSS.
# Environment: AGENT (path of a release kprof-agent; built when unset), PERF (default perf).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d /tmp/kprof-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

. "$here/agent.sh"
cc -O1 -fno-omit-frame-pointer -g -o "$work/hot" "$root/agent/tests/workloads/hot.c"
exec python3 "$here/overhead.py" --agent "$AGENT" --perf "${PERF:-perf}" --workload "$work/hot" \
    --workdir "$work" --rounds "${1:-3}" --work "${2:-3000}"
