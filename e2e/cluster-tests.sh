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

# The e2e tests run the agent and the plugin binaries from target/debug.
cargo build --bins -p kprof-agent -p kprof-operator
KPROF_REQUIRE_CLUSTER=1 cargo test -p kprof-e2e "$@" -- --test-threads=1
