#!/usr/bin/env bash
# Cost of the memory profile against tracemalloc and memray: an allocation-heavy Python
# workload (well above 50 MB/s of short-lived objects and buffers, plus what it keeps), timed
# unprofiled, under `kprof-agent record --types memory`, under `python -X tracemalloc` and
# under `memray run`, side by side, with the agent's CPU and peak memory; and what a memory
# profile costs the node's other processes: a syscall loop's ns per call with and without one.
#
#   sudo -E agent/bench/memory.sh [ROUNDS=3] [SECONDS_OF_WORK=6]   (make bench)
#
# Environment: AGENT (path of a release kprof-agent; built when unset), PYTHON (default python3;
# memray is installed into it from PyPI when missing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d /tmp/kprof-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

. "$here/agent.sh"
py=${PYTHON:-python3}
"$py" -m memray --version >/dev/null 2>&1 || "$py" -m pip install --quiet memray >&2
# A syscall loop: what the memory source (sys_exit) costs every other process on the node.
cat > "$work/syscalls.c" <<'C'
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    struct timespec a, b;
    long n = 5000000;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("ns_per_syscall=%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return 0;
}
C
cc -O2 -o "$work/syscalls" "$work/syscalls.c"
exec "$py" "$here/memory.py" --agent "$AGENT" --python "$py" --workdir "$work" \
    --rounds "${1:-3}" --seconds "${2:-6}" --syscalls "$work/syscalls"
