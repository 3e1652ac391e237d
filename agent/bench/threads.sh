#!/usr/bin/env bash
# Cost of the threads profile: a Python workload that creates (and joins) ~1,000 threads a
# second, timed unprofiled, with a CPU profile, and with a threads profile (every creation
# recorded with its Python and native stacks).
#
#   sudo -E agent/bench/threads.sh [ROUNDS=3] [THREADS=8000]   (make bench)
#
# Environment: AGENT (path of a release kprof-agent; built when unset), PYTHON (default python3).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$(mktemp -d /tmp/kprof-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

. "$here/agent.sh"
exec python3 "$here/threads.py" --agent "$AGENT" --python "${PYTHON:-python3}" --workdir "$work" \
    --rounds "${1:-3}" --threads "${2:-8000}"
