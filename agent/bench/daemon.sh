#!/usr/bin/env bash
# What the agent costs as a cluster runs it: CPU seconds per second and memory (RSS now, peak)
# of the kprof-agent daemon from the release image on the test bed while it profiles the demo
# service (e2e/demo: the shop, e2e/demo/target.yaml: every profile type at 99 Hz, 10 s
# windows), beside `kprof-agent record` (the same binary, types and rate) on the same pod.
# Both are measured the same way, from /proc/<pid>/stat and status over SECONDS of steady
# state (after the first Profile for the daemon, 5 s in for record); the cost per event (a CPU
# sample, a switch-out or its end, a thread event, a page fault) divides that CPU by the records
# read from the kernel (the daemon's kprof_agent_samples_total, record's summary.json records).
#
#   sudo -E agent/bench/daemon.sh [SECONDS=60]   (make bench; starts the test bed if needed)
#   KPROF_DEBUG_IMAGES=1 ...: the debug images (make images-debug) and debug record instead.
#
# Leaves the test bed up but uninstalls the release and deletes the namespace it made.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
secs=${1:-60}
cd "$root"
. e2e/testbed/env.sh
NS=kprof-bench SYS=kprof-system
e2e/testbed/up.sh >/dev/null
version=$(e2e/testbed/version.sh)
# record takes the types the demo's target asks for.
types=$(sed -n 's/^ *profileTypes: *\[\(.*\)\]/\1/p' e2e/demo/target.yaml | tr -d ' ')
[[ -n "$types" ]] || { echo "daemon.sh: no profileTypes in e2e/demo/target.yaml" >&2; exit 1; }
if [[ "${KPROF_DEBUG_IMAGES:-0}" == 1 ]]; then
  e2e/testbed/build-images.sh --debug >&2
  variant="debug image" record_bin=target/debug/kprof-agent
  set_tags=(--set "operator.image.tag=$version-debug" --set "agent.image.tag=$version-debug")
else
  e2e/testbed/build-images.sh >&2
  variant="release image" record_bin=target/image/kprof-agent set_tags=()
fi
e2e/testbed/python-image.sh kprof/demo-shop:dev e2e/demo/shop >/dev/null
chart=$(e2e/testbed/package-chart.sh)
cleanup() {
  kubectl delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  helm uninstall kprof -n "$SYS" --wait --timeout 2m >/dev/null 2>&1 || true
}
trap cleanup EXIT
# A shop left by `make demo` would be profiled (and load the CPUs) too; a namespace of an
# earlier run may still be going away.
kubectl delete namespace kprof-demo "$NS" --ignore-not-found --wait --timeout 2m >/dev/null
helm show crds "$chart" | kubectl apply --server-side --force-conflicts -f - >/dev/null
helm upgrade --install kprof "$chart" -n "$SYS" --create-namespace --wait --timeout 3m \
  -f e2e/demo/testbed-values.yaml "${set_tags[@]}" >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
sed "s/namespace: kprof-demo/namespace: $NS/" e2e/demo/shop.yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" rollout status deploy/shop --timeout=120s >/dev/null
sed "s/namespace: kprof-demo/namespace: $NS/" e2e/demo/target.yaml | kubectl apply -f - >/dev/null

echo "waiting for the first Profile of the demo service ($variant, 99 Hz)" >&2
for _ in $(seq 90); do
  n=$(kubectl -n "$NS" get profiles -l kprof.io/target=shop,kprof.io/type=cpu -o name 2>/dev/null | wc -l)
  (( n > 0 )) && break
  sleep 2
done
(( n > 0 )) || { echo "daemon.sh: no Profile after 180 s" >&2; exit 1; }
agent=$(pgrep -x kprof-agent | head -n 1)
pods=$(kubectl -n "$NS" get pods -l app=shop -o name | wc -l)
shop_pids=$(pgrep -f "/app/main.py" | paste -sd' ')
[[ -n "$agent" && -n "$shop_pids" ]] || { echo "daemon.sh: agent ($agent) or shop ($shop_pids) process not found" >&2; exit 1; }

# measure PID SECONDS: "cpu_per_s rss_mib hwm_mib" over SECONDS from now.
measure() {
  python3 - "$1" "$2" <<'PY'
import os, sys, time
pid, secs = sys.argv[1], float(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick  # utime + stime of all threads
def mem(key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
a, t = cpu(), time.monotonic()
time.sleep(secs)
b, t2 = cpu(), time.monotonic()
print(f"{(b - a) / (t2 - t):.4f} {mem('VmRSS'):.1f} {mem('VmHWM'):.1f}")
PY
}
# Events the daemon took in, from its metrics (host network on the test bed).
events() { curl -fsS "http://127.0.0.1:9464/metrics" | awk '/^kprof_agent_samples_total / {v = $2} END {print v + 0}' || echo 0; }
echo "measuring the daemon (pid $agent) for $secs s" >&2
e0=$(events)
read -r d_cpu d_rss d_hwm < <(measure "$agent" "$secs")
e1=$(events)
d_rate=$(python3 -c "print(($e1 - $e0) / $secs)")
profiles=$(kubectl -n "$NS" get profiles -l kprof.io/target=shop -o name | wc -l)
operator=$(pgrep -x kprof-operator | head -n 1)
o_rss=$(awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$operator/status")

# The same pod under `record`, with the daemon gone (deleting the target removes the agent).
kubectl -n "$NS" delete profilingtarget shop --wait >/dev/null
for _ in $(seq 60); do pgrep -x kprof-agent >/dev/null || break; sleep 1; done
rec_pids=()
for p in $shop_pids; do rec_pids+=(-p "$p"); done
out=$(mktemp -d /tmp/kprof-bench.XXXXXX)
"$record_bin" record --types "$types" --hz 99 -d "$((secs + 15))s" \
  "${rec_pids[@]}" -o "$out" >/dev/null 2>"$out/record.log" &
rec=$!
sleep 5
echo "measuring record (pid $rec) for $secs s" >&2
read -r r_cpu r_rss r_hwm < <(measure "$rec" "$secs")
wait "$rec" || { cat "$out/record.log" >&2; exit 1; }
r_rate=$(python3 -c "import json; s = json.load(open('$out/summary.json')); print(s['records'] / s['wall_s'])")
rm -rf "$out"

python3 - "$variant" "$types" "$o_rss" "$pods" "$profiles" "$d_cpu" "$d_rss" "$d_hwm" "$r_cpu" "$r_rss" "$r_hwm" "$d_rate" "$r_rate" <<'PY'
import sys
variant, types, o_rss = sys.argv[1], sys.argv[2].replace(",", "+"), float(sys.argv[3])
pods, profiles = int(sys.argv[4]), int(sys.argv[5])
d_cpu, d_rss, d_hwm, r_cpu, r_rss, r_hwm, d_rate, r_rate = map(float, sys.argv[6:])
print(f"\nagent on the test bed, demo service, {types} at 99 Hz, {pods} targeted pod(s), "
      f"{profiles} Profiles written:")
us = lambda cpu, rate: cpu / rate * 1e6 if rate else float("nan")
print(f"  {'':34} {'CPU s/s':>9} {'RSS MiB':>9} {'peak MiB':>9} {'events/s':>9} {'µs/event':>9}")
print(f"  {'daemon (' + variant + ', DaemonSet)':34} {d_cpu:9.4f} {d_rss:9.1f} {d_hwm:9.1f} "
      f"{d_rate:9.0f} {us(d_cpu, d_rate):9.1f}")
print(f"  {'record (same binary)':34} {r_cpu:9.4f} {r_rss:9.1f} {r_hwm:9.1f} "
      f"{r_rate:9.0f} {us(r_cpu, r_rate):9.1f}")
print(f"  {'daemon / record':34} {d_cpu / r_cpu if r_cpu else float('nan'):9.2f} "
      f"{d_rss / r_rss:9.2f} {d_hwm / r_hwm:9.2f} {'':9} "
      f"{us(d_cpu, d_rate) / us(r_cpu, r_rate):9.2f}")
print(f"  per targeted pod: daemon {d_cpu / pods:.4f} CPU s/s, {d_rss / pods:.1f} MiB")
print(f"  operator (with the store, {variant}): RSS {o_rss:.1f} MiB")
PY
