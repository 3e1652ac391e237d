#!/usr/bin/env bash
# Build MinIO (an S3-compatible server) from the Go module proxy, for the store's S3 test
# (operator/tests/store_s3.rs runs it on 127.0.0.1 with a temp dir).
#
# Output: ${KPROF_CACHE:-/var/cache/kprof}/minio/<MINIO_VERSION>/bin/minio (idempotent: a binary
# stamped with the right version is kept and nothing is downloaded). Prints its path last.
#
# Why a pseudo-version: MinIO tags its releases RELEASE.<date>, which are not semantic versions,
# so the module proxy only knows commits as v0.0.0-<time>-<hash>; we pin one. Its go.mod has no
# replace directives, so `go install module@version` builds it as released.
#
# Go's module and build caches are a scratch directory beside the binary, removed after a
# successful build (they are ~1.5 GB and only needed again for another version);
# KPROF_KEEP_GO_CACHE=1 keeps them.
#
# Env knobs: MINIO_VERSION, KPROF_CACHE, GO (go binary), KPROF_BUILD_PARALLEL (go build -p,
#            default 2), KPROF_KEEP_GO_CACHE.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
MINIO_VERSION="${MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
PAR="${KPROF_BUILD_PARALLEL:-2}"

if [[ -z "${GO:-}" ]]; then
  if command -v go >/dev/null 2>&1; then GO="$(command -v go)"; else GO=/usr/local/go/bin/go; fi
fi

VDIR="$KPROF_CACHE/minio/$MINIO_VERSION"
BIN="$VDIR/bin"
T0=$(date +%s)
log() { printf '[build-s3 %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

if [[ -x "$BIN/minio" && "$(cat "$BIN/.minio.version" 2>/dev/null)" == "$MINIO_VERSION" ]]; then
  log "minio $MINIO_VERSION already built: $BIN/minio (cached)"
  exit 0
fi
[[ -x "$GO" ]] || { echo "build-s3: no Go toolchain (set GO=/path/to/go)" >&2; exit 1; }

SCRATCH="$VDIR/.go"
mkdir -p "$BIN" "$SCRATCH"
export GOTOOLCHAIN=local
export GOMODCACHE="$SCRATCH/mod" GOCACHE="$SCRATCH/build" GOPATH="$SCRATCH/path"
export GOFLAGS="-buildvcs=false -modcacherw"
export CGO_ENABLED=0

log "building github.com/minio/minio@$MINIO_VERSION with $("$GO" version), go build -p $PAR"
log "scratch Go caches: $SCRATCH (removed afterwards unless KPROF_KEEP_GO_CACHE=1)"
# GOBIN in a temporary directory, then an atomic rename: an interrupted build leaves no binary
# that the stamp check could take for a finished one.
GOBIN="$BIN/.gobin" nice -n 5 "$GO" install -p "$PAR" -trimpath -ldflags "-s -w" \
  "github.com/minio/minio@$MINIO_VERSION"
mv -f "$BIN/.gobin/minio" "$BIN/minio"
rmdir "$BIN/.gobin"
echo "$MINIO_VERSION" >"$BIN/.minio.version"
log "built in $(( $(date +%s) - T0 ))s ($(du -h "$BIN/minio" | cut -f1))"

if [[ "${KPROF_KEEP_GO_CACHE:-0}" != 1 ]]; then
  log "removing scratch Go caches ($(du -sh "$SCRATCH" | cut -f1))"
  rm -rf "$SCRATCH"
fi
log "minio: $BIN/minio"
