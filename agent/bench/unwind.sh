#!/usr/bin/env bash
# Native unwinding (issue #15): kprof's .eh_frame unwinder beside its frame-pointer-only walk, on
# a C program built without frame pointers and on Python calling zlib and NumPy (Debian's
# python3.11: Python + libpython + libz + libc, none with frame pointers). Prints the in-kernel
# and agent cost per sample, the share of samples whose stack reaches the program's entry, the
# unwind-table memory, the agent's peak RSS and the time from a process's first sample to its
# first fully unwound one, as medians of ROUNDS runs.
#
#   sudo -E agent/bench/unwind.sh [ROUNDS=3] [SECONDS=8]   (make bench)
#
# Environment: AGENT (path of a release kprof-agent; built when unset), KPROF_CACHE (NumPy
# wheels from e2e/testbed/install-pylibs.sh, default /var/cache/kprof).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d /tmp/kprof-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

. "$here/agent.sh"
cc -O2 -fomit-frame-pointer -pthread -o "$work/nofp" "$root/agent/tests/workloads/nofp.c"
exec python3 "$here/unwind.py" --agent "$AGENT" --nofp "$work/nofp" \
    --python-workload "$root/agent/tests/workloads/python/native_libs.py" \
    --pylibs "${KPROF_CACHE:-/var/cache/kprof}/pylibs/3.11" \
    --workdir "$work" --rounds "${1:-3}" --seconds "${2:-8}"
