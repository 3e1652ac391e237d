#!/usr/bin/env bash
# make demo: the kprof user journey on a local single-node cluster.
#   test bed up -> images -> helm install -> sample Python service -> ProfilingTarget
#   -> first Profiles -> kubectl get / kubectl kprof top / flame graph file.
set -euo pipefail
cd "$(dirname "$0")/../.."
. e2e/testbed/env.sh

OUT="${KPROF_DEMO_OUT:-out/demo}"
NS=kprof-demo
SYS=kprof-system
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
mkdir -p "$OUT"

step "1/8 Installing what this machine lacks (first run: about 20 minutes for Kubernetes)"
e2e/testbed/install-deps.sh
agent/install-toolchain.sh >/dev/null
e2e/testbed/build-binaries.sh

step "2/8 Starting the local single-node cluster (or reusing it)"
e2e/testbed/up.sh

# KPROF_DEBUG_IMAGES=1 make demo: debug builds (tag VERSION-debug) instead of the release images.
step "3/8 Building kprof's release images and importing them into the cluster's containerd"
version=$(e2e/testbed/version.sh)
set_tags=()
if [[ "${KPROF_DEBUG_IMAGES:-0}" == 1 ]]; then
  e2e/testbed/build-images.sh --debug
  set_tags=(--set "operator.image.tag=$version-debug" --set "agent.image.tag=$version-debug")
  bin=target/debug
else
  e2e/testbed/build-images.sh
  bin=target/image
fi
e2e/testbed/python-image.sh kprof/demo-shop:dev e2e/demo/shop >/dev/null
# kubectl finds plugins on PATH: make `kubectl kprof` the one just built.
export PATH="$PWD/$bin:$PATH"

step "4/8 helm install kprof $version (the chart packaged by make chart) into $SYS"
chart=$(e2e/testbed/package-chart.sh)
# Helm installs CRDs only when missing: a test bed that ran an older kprof gets the new schema.
helm show crds "$chart" | kubectl apply --server-side --force-conflicts -f - >/dev/null
# The test bed has no kube-proxy and no cluster DNS: pods use the host network and reach the
# API server on 127.0.0.1; everything else is the chart's defaults.
helm upgrade --install kprof "$chart" -n "$SYS" --create-namespace --wait --timeout 3m \
  -f e2e/demo/testbed-values.yaml "${set_tags[@]}"
kubectl -n "$SYS" get pods -o wide

step "5/8 Starting the sample Python service (e2e/demo/shop) in namespace $NS"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -f e2e/demo/shop.yaml
kubectl -n "$NS" rollout status deploy/shop --timeout=120s

step "6/8 kubectl apply the ProfilingTarget (e2e/demo/target.yaml: cpu, wall, lock, threads and memory, 99 Hz, 10 s windows)"
kubectl -n "$NS" delete profilingtarget shop --ignore-not-found --wait >/dev/null
applied=$(date +%s.%N)
kubectl apply -f e2e/demo/target.yaml

step "7/8 Waiting for the first Profile"
first=""
for _ in $(seq 1 90); do
  first=$(kubectl -n "$NS" get profiles -l kprof.io/target=shop,kprof.io/type=cpu --sort-by=.metadata.creationTimestamp \
            -o jsonpath='{range .items[?(@.spec.samples>0)]}{.metadata.name}{"\n"}{end}' 2>/dev/null | tail -n 1)
  [[ -n "$first" ]] && break
  sleep 2
done
if [[ -z "$first" ]]; then
  echo "no Profile with samples after 180 s; what the cluster says:" >&2
  kubectl -n "$NS" get profilingtarget shop -o yaml >&2 || true
  kubectl -n "$SYS" get pods -o wide >&2 || true
  kubectl -n "$SYS" logs daemonset/kprof-agent --tail=50 >&2 || true
  exit 1
fi
took=$(python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.1f}')" "$(date +%s.%N)" "$applied")
echo "first Profile $first: ${took} s after kubectl apply (window 10 s)"

step "8/8 What a user sees"
echo "\$ kubectl get profilingtargets -n $NS"
kubectl get profilingtargets -n "$NS"
echo
echo "\$ kubectl get profiles -n $NS"
kubectl get profiles -n "$NS"
newest_of() {
  kubectl -n "$NS" get profiles -l "kprof.io/target=shop,kprof.io/type=$1" --sort-by=.metadata.creationTimestamp \
    -o jsonpath='{range .items[?(@.spec.samples>0)]}{.metadata.name}{"\n"}{end}' | tail -n 1
}
newest=$(newest_of cpu)
echo
echo "\$ kubectl kprof top -n $NS $newest        # CPU: where the service burns CPU"
kubectl kprof top -n "$NS" "$newest" | head -n 20
for type in wall lock threads memory; do
  p=$(newest_of "$type")
  [[ -n "$p" ]] || continue
  echo
  case $type in
    threads) what="which code creates the threads still alive" ;;
    memory) what="which code holds the memory (in use, by the code that first touched it)" ;;
    *) what="where the threads wait (by wait site)" ;;
  esac
  echo "\$ kubectl kprof top -n $NS $p        # $type: $what"
  kubectl kprof top -n "$NS" "$p" | head -n 12
  if [[ $type == memory ]]; then
    echo
    echo "\$ kubectl kprof top -n $NS --sample-index probed_inuse_space $p        # memory, allocation probes: the buffers the shop reports to tracemalloc"
    kubectl kprof top -n "$NS" --sample-index probed_inuse_space "$p" | head -n 8
  fi
done
# A window's threads Profile arrives a few seconds after its cpu one: wait for it (an empty
# list has no last item for `{.items[-1:]}`, hence the range).
p=""
for _ in $(seq 30); do
  p=$(kubectl -n "$NS" get profiles -l kprof.io/target=shop,kprof.io/type=threads \
        --sort-by=.metadata.creationTimestamp \
        -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | tail -n 1)
  [[ -n "$p" ]] && break
  sleep 1
done
if [[ -n "$p" ]]; then
  echo
  echo "\$ kubectl get profile -n $NS $p -o jsonpath='{.spec.threadSummary}'        # threads: counts, who creates them"
  kubectl get profile -n "$NS" "$p" -o jsonpath='{.spec.threadSummary}' | python3 -c "$(cat <<'PY'
import json, sys
t = json.load(sys.stdin)
print("alive {} -> {} (min {}, max {}), created {}, exited {}".format(
    t["aliveAtStart"], t["aliveAtEnd"], t["min"], t["max"], t["created"], t["exited"]))
for r in t.get("threads", [])[:8]:
    print("  {:>8} {:<20} {} cpu {:.3f}s off-cpu {:.3f}s  {}".format(
        r["tid"], r["name"], r["state"], r["cpuSeconds"], r["offCpuSeconds"], r.get("createdBy") or ""))
PY
)"
fi
kubectl kprof flamegraph -n "$NS" "$newest" -o "$OUT/flamegraph.svg"
echo
echo "Flame graph of $newest: $OUT/flamegraph.svg (open it in a browser: search and zoom work)"
echo
# Profile data is served through the Kubernetes API: whoever may view $NS reads it, nobody else.
echo "\$ kubectl get apiservice v1alpha1.data.kprof.io"
kubectl get apiservice v1alpha1.data.kprof.io
kubectl kprof open -n "$NS" "$newest"
cat <<MSG

Clean up:
  kubectl delete namespace $NS          # the service, its target and its profiles
  helm uninstall kprof -n $SYS          # the operator, store and agents
  make cluster-down                     # the local cluster
MSG
