#!/usr/bin/env bash
# Start-up cost of `kprof-agent record` on a Python program: the agent's CPU before sampling
# starts (programs loaded and verified, BTF offsets, the interpreter found) and over the whole
# run, from summary.json (`startup_cpu_s`, `agent_cpu_s`). Target: <= 0.3 s CPU to the first
# sample.
#
#   sudo -E agent/bench/startup.sh [ROUNDS=3] [SECONDS=15] [PYTHON=python3]
#
# Environment: AGENT (path of a release kprof-agent; built when unset).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
rounds=${1:-3}
secs=${2:-15}
py=${3:-python3}
if [[ $(id -u) -ne 0 ]]; then
    echo "startup: needs root (eBPF)" >&2
    exit 1
fi
. "$here/agent.sh"
work=$(mktemp -d /tmp/kprof-startup.XXXXXX)
trap 'rm -rf "$work"' EXIT
for r in $(seq 1 "$rounds"); do
    "$AGENT" record -d "${secs}s" --hz 99 -o "$work/$r" -- \
        "$py" "$root/agent/tests/workloads/python/split.py" "$secs" >/dev/null 2>"$work/$r.err" ||
        { cat "$work/$r.err" >&2; exit 1; }
done
python3 - "$work" "$rounds" "$secs" <<'PY'
import json, statistics, sys
work, rounds, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs = [json.load(open(f"{work}/{r}/summary.json")) for r in range(1, rounds + 1)]
med = lambda k: statistics.median(s.get(k, float("nan")) for s in runs)
print(f"kprof start-up ({rounds} runs of a {secs} s record of a Python program, medians):")
print(f"  CPU before sampling {med('startup_cpu_s'):.3f} s (target <= 0.3 s), "
      f"wall before sampling {med('startup_wall_s'):.3f} s")
print(f"  CPU outside sampling (start-up + writing the outputs: agent_cpu_s - loop_cpu_s) "
      f"{statistics.median(s['agent_cpu_s'] - s['loop_cpu_s'] for s in runs):.3f} s")
print(f"  CPU over the whole run {med('agent_cpu_s'):.3f} s, {med('events'):.0f} samples, "
      f"peak RSS {med('peak_rss_kib') / 1024:.1f} MiB")
PY
