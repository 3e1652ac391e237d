#!/usr/bin/env bash
# Build fake-gcs-server (a Google Cloud Storage emulator) from the Go module proxy, for the
# store's GCS test (store/tests/store_gcs.rs runs it on 127.0.0.1 with a temp dir).
#
# Output: ${KPROF_CACHE:-/var/cache/kprof}/fake-gcs-server/<FAKE_GCS_VERSION>/bin/fake-gcs-server
# (idempotent: a binary stamped with the right version is kept). Prints its path last.
#
# Go caches, stamp and knobs: go-build-lib.sh. Also: FAKE_GCS_VERSION, KPROF_CACHE.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
FAKE_GCS_VERSION="${FAKE_GCS_VERSION:-v1.56.1}"
. "$(dirname "${BASH_SOURCE[0]}")/go-build-lib.sh"
gobuild_begin build-gcs fake-gcs-server "$KPROF_CACHE/fake-gcs-server/$FAKE_GCS_VERSION" "$FAKE_GCS_VERSION"

log "building github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION with $("$GO" version), go build -p $PAR"
GOBIN="$BIN/.gobin" nice -n 5 "$GO" install -trimpath -ldflags "-s -w" \
  "github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION"
gobuild_finish "$BIN/.gobin/fake-gcs-server" "$BIN/.gobin"
