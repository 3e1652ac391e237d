#!/usr/bin/env bash
# Cost of the memory profile against tracemalloc and memray: an allocation-heavy Python
# workload (well above 50 MB/s of short-lived objects and buffers, plus what it keeps), timed
# unprofiled, under `kprof-agent record --types memory`, under `python -X tracemalloc` and
# under `memray run`, side by side, with the agent's CPU and peak memory.
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
exec "$py" "$here/memory.py" --agent "$AGENT" --python "$py" --workdir "$work" \
    --rounds "${1:-3}" --seconds "${2:-6}"
