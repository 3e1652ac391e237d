#!/usr/bin/env bash
# Slowdown of the demo service (e2e/demo/shop: two load threads calling its own /checkout) while
# kprof profiles it with cpu, wall and lock on: checkouts served per second over SECONDS,
# unprofiled and under `kprof-agent record --types cpu,wall,lock --pid`, alternating ROUNDS
# times. Target: <= 1 % fewer checkouts.
#
#   sudo -E agent/bench/shop.sh [ROUNDS=3] [SECONDS=20] [PYTHON=python3]   (make bench)
#
# Environment: AGENT (path of a release kprof-agent; built when unset).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
rounds=${1:-3}
secs=${2:-20}
python=${3:-python3}
work=$(mktemp -d /tmp/kprof-bench.XXXXXX)
pid=""
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
. "$here/agent.sh"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PORT=$port "$python" "$root/e2e/demo/shop/main.py" >/dev/null &
pid=$!
served() { python3 -c "import json,urllib.request; print(json.load(urllib.request.urlopen('http://127.0.0.1:$port/stats'))['checkouts'])"; }
for _ in $(seq 50); do served >/dev/null 2>&1 && break; sleep 0.2; done
sleep 3 # warm up
rate() { # checkouts per second over $secs, with kprof recording when $1 = kprof
    local a b
    if [[ $1 == kprof ]]; then
        "$AGENT" record --types cpu,wall,lock -d "$((secs + 4))s" -p "$pid" -o "$work/k" >/dev/null 2>&1 &
        local k=$!
        sleep 2
    fi
    a=$(served); sleep "$secs"; b=$(served)
    if [[ $1 == kprof ]]; then wait "$k"; fi
    python3 -c "print(f'{($b - $a) / $secs:.2f}')"
}
none=(); kprof=()
for r in $(seq "$rounds"); do
    none+=("$(rate none)"); kprof+=("$(rate kprof)")
    echo "round $r: unprofiled ${none[-1]}/s, kprof cpu,wall,lock ${kprof[-1]}/s" >&2
done
python3 - "${none[*]}" "${kprof[*]}" <<'PY'
import statistics, sys
none = [float(x) for x in sys.argv[1].split()]
kprof = [float(x) for x in sys.argv[2].split()]
n, k = statistics.median(none), statistics.median(kprof)
print(f"\ndemo service (e2e/demo/shop), checkouts/s, medians: unprofiled {n:.2f}, "
      f"kprof cpu,wall,lock {k:.2f} ({k / n - 1:+.1%}; target >= -1 %)")
PY
