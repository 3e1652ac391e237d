#!/usr/bin/env bash
# Runs the tests that need the real cluster: brings the test bed up when it is not running and,
# in that case only, down again afterwards (a cluster you started yourself is left running).
# Usage: e2e/cluster-tests.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."
. e2e/testbed/env.sh

started=0
if ! kubectl get --raw /readyz >/dev/null 2>&1; then
  echo "==> test bed not running: starting it (stopped again when the tests end)"
  e2e/testbed/up.sh
  started=1
fi
cleanup() { if (( started )); then echo "==> stopping the test bed"; e2e/testbed/down.sh || true; fi; }
trap cleanup EXIT

# The e2e tests run the agent and the plugin binaries from target/debug; the Helm tests install
# the release images (KPROF_DEBUG_IMAGES=1: the debug ones) and the journey the packaged chart.
cargo build --bins -p kprof-agent -p kprof-operator -p kprof-plugin
if [[ "${KPROF_DEBUG_IMAGES:-0}" == 1 ]]; then
  e2e/testbed/build-images.sh --debug
  export KPROF_IMAGE_TAG="$(e2e/testbed/version.sh)-debug"
else
  e2e/testbed/build-images.sh
fi
KPROF_CHART_PACKAGE=$(e2e/testbed/package-chart.sh)
export KPROF_CHART_PACKAGE
# Tests run their own operator and store on this host: a release left by `make demo` would
# reconcile their targets too.
if helm status kprof -n kprof-system >/dev/null 2>&1; then
  echo "==> uninstalling the Helm release kprof (from make demo) so the tests own the cluster"
  helm uninstall kprof -n kprof-system --wait --timeout 2m
fi
if kubectl get namespace kprof-demo >/dev/null 2>&1; then
  echo "==> deleting the make demo namespace kprof-demo (its service would load the CPUs)"
  kubectl delete namespace kprof-demo --wait --timeout 2m
fi
KPROF_REQUIRE_CLUSTER=1 cargo test -p kprof-e2e "$@" -- --test-threads=1
