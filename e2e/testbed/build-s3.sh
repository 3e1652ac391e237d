#!/usr/bin/env bash
# Build MinIO (an S3-compatible server) from the Go module proxy, for the store's S3 test
# (store/tests/store_s3.rs runs it on 127.0.0.1 with a temp dir).
#
# Output: ${KPROF_CACHE:-/var/cache/kprof}/minio/<MINIO_VERSION>/bin/minio (idempotent: a binary
# stamped with the right version is kept and nothing is downloaded). Prints its path last.
#
# Why a pseudo-version: MinIO tags its releases RELEASE.<date>, which are not semantic versions,
# so the module proxy only knows commits as v0.0.0-<time>-<hash>; we pin one. Its go.mod has no
# replace directives, so `go install module@version` builds it as released.
#
# Go caches, stamp and knobs: go-build-lib.sh (the scratch caches are ~1.5 GB). Also:
# MINIO_VERSION, KPROF_CACHE.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
MINIO_VERSION="${MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
. "$(dirname "${BASH_SOURCE[0]}")/go-build-lib.sh"
gobuild_begin build-s3 minio "$KPROF_CACHE/minio/$MINIO_VERSION" "$MINIO_VERSION"

log "building github.com/minio/minio@$MINIO_VERSION with $("$GO" version), go build -p $PAR"
log "scratch Go caches: $SCRATCH (removed afterwards unless KPROF_KEEP_GO_CACHE=1)"
GOBIN="$BIN/.gobin" nice -n 5 "$GO" install -trimpath -ldflags "-s -w" \
  "github.com/minio/minio@$MINIO_VERSION"
gobuild_finish "$BIN/.gobin/minio" "$BIN/.gobin"
