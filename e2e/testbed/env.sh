# Source me: `. e2e/testbed/env.sh` — the test bed's locations and tools.
# Exports KUBECONFIG (the test bed's admin kubeconfig), PATH with the cached, version-matched
# kubectl/helm/k8s binaries first, and the cache/state variables every script uses.
# Safe to source repeatedly and from any shell option set (no `set -e` side effects).
KPROF_TESTBED_DIR="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
export KPROF_TESTBED_DIR
export K8S_VERSION="${K8S_VERSION:-1.35.4}"
K8S_VERSION="${K8S_VERSION#v}"
export HELM_VERSION="${HELM_VERSION:-3.22.0}"
export KPROF_CACHE="${KPROF_CACHE:-/var/cache/kprof}"
export KPROF_STATE="${KPROF_STATE:-/var/lib/kprof-testbed}"
export KPROF_K8S_BIN="$KPROF_CACHE/k8s/v$K8S_VERSION/bin"
export KPROF_RUN_DIR="${KPROF_RUN_DIR:-/run/kprof-testbed}"
export KPROF_CONTAINERD_SOCK="$KPROF_RUN_DIR/containerd.sock"
export KPROF_SERVICE_CIDR="${KPROF_SERVICE_CIDR:-10.96.0.0/16}"
export KPROF_SERVICE_IP="${KPROF_SERVICE_IP:-10.96.0.1}"
export KPROF_APISERVER_PORT="${KPROF_APISERVER_PORT:-6443}"
export KUBECONFIG="$KPROF_STATE/kubeconfig"
case ":$PATH:" in
  *":$KPROF_K8S_BIN:"*) ;;
  *) export PATH="$KPROF_K8S_BIN:$PATH" ;;
esac
# `ctr` against the test bed's own containerd, in the namespace the CRI uses.
kprof_ctr() { ctr --address "$KPROF_CONTAINERD_SOCK" --namespace k8s.io "$@"; }
