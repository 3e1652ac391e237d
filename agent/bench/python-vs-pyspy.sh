#!/usr/bin/env bash
# kprof vs py-spy on the same Python workload at the same rate (see python_vs_pyspy.py).
#
#   agent/bench/python-vs-pyspy.sh [PYTHON] [SECONDS] [HZ] [ROUNDS]
#
# PYTHON defaults to the newest pyenv CPython, else python3. Needs root (eBPF) and py-spy
# (`pip install py-spy`). KPROF_AGENT=path uses an existing kprof-agent binary; otherwise it is
# built in release mode.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

if [[ $(id -u) -ne 0 ]]; then
    echo "python-vs-pyspy: needs root (eBPF and py-spy attach)" >&2
    exit 1
fi
PYSPY=${PYSPY:-$(command -v py-spy || true)}
if [[ -z $PYSPY ]]; then
    echo "python-vs-pyspy: py-spy not found; install it with: pip install py-spy" >&2
    exit 1
fi
AGENT=${KPROF_AGENT:-}
. "$here/agent.sh"
PY=${1:-}
if [[ -z $PY ]]; then
    PY=$(ls -d "${HOME:-/root}"/.pyenv/versions/3.1[0-9].*/bin/python3 2>/dev/null | sort -V | tail -1 || true)
    PY=${PY:-$(command -v python3)}
fi
exec python3 "$here/python_vs_pyspy.py" --agent "$AGENT" --pyspy "$PYSPY" --python "$PY" \
    --seconds "${2:-10}" --hz "${3:-99}" --rounds "${4:-3}"
