#!/usr/bin/env bash
# Build the CNCF Distribution registry from the Go module proxy, for the Helm journey
# (e2e/tests/journey.rs): the release images are pushed to it as a cluster admin pushes them to
# their own registry, and the chart is installed pulling them from it with a pull secret.
#
# Output: ${KPROF_CACHE:-/var/cache/kprof}/registry/<REGISTRY_VERSION>/bin/registry
# (idempotent: a binary stamped with the right version is kept). Prints its path last.
#
# Go caches, stamp and knobs: go-build-lib.sh. Also: REGISTRY_VERSION, KPROF_CACHE.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
REGISTRY_VERSION="${REGISTRY_VERSION:-v3.1.2}"
. "$(dirname "${BASH_SOURCE[0]}")/go-build-lib.sh"
gobuild_begin build-registry registry "$KPROF_CACHE/registry/$REGISTRY_VERSION" "$REGISTRY_VERSION"

log "building github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION with $("$GO" version), go build -p $PAR"
GOBIN="$BIN/.gobin" nice -n 5 "$GO" install -trimpath -ldflags "-s -w" \
  "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
gobuild_finish "$BIN/.gobin/registry" "$BIN/.gobin"
