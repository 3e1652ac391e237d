#!/usr/bin/env bash
# Cost of the off-CPU source (wall and lock profiles) on a workload that switches context
# ~50,000 times a second (agent/bench/pingpong.c), beside the same runs unprofiled, with CPU
# profiles only, and under `perf record -e sched:sched_switch -g` (perf's off-CPU stacks); and
# the cost an untargeted context switch pays while kprof profiles another process.
#
#   sudo -E agent/bench/offcpu.sh [ROUNDS=3] [ROUND_TRIPS=150000] [WORK=22000]   (make bench)
#
# Environment: AGENT (path of a release kprof-agent; built when unset), PERF (default perf).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d /tmp/kprof-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

. "$here/agent.sh"
cc -O1 -g -fno-omit-frame-pointer -pthread -o "$work/pingpong" "$here/pingpong.c"
exec python3 "$here/offcpu.py" --agent "$AGENT" --perf "${PERF:-perf}" --workload "$work/pingpong" \
    --workdir "$work" --rounds "${1:-3}" --round-trips "${2:-150000}" --work "${3:-22000}"
