# Sourced by build-s3.sh and build-otelcol.sh: a Go program built from the module proxy into
# $KPROF_CACHE/<name>/<version>/bin, stamped with its version, with Go caches in a scratch
# directory that is removed after a successful build (KPROF_KEEP_GO_CACHE=1 keeps it).
# Env knobs: GO (go binary), KPROF_BUILD_PARALLEL (go build -p, default 2), KPROF_KEEP_GO_CACHE.

# gobuild_begin TOOL NAME VDIR STAMP: sets BIN, SCRATCH, PAR, GO and log(); exits 0 when
# $VDIR/bin/NAME is already built with STAMP; otherwise prepares an isolated Go environment.
gobuild_begin() {
  GOBUILD_TOOL=$1 GOBUILD_NAME=$2 GOBUILD_STAMP=$4
  BIN="$3/bin" SCRATCH="$3/.go" PAR="${KPROF_BUILD_PARALLEL:-2}" GOBUILD_T0=$(date +%s)
  if [[ -z "${GO:-}" ]]; then
    if command -v go >/dev/null 2>&1; then GO="$(command -v go)"; else GO=/usr/local/go/bin/go; fi
  fi
  if [[ -x "$BIN/$GOBUILD_NAME" && "$(cat "$BIN/.$GOBUILD_NAME.version" 2>/dev/null)" == "$GOBUILD_STAMP" ]]; then
    log "$GOBUILD_NAME $GOBUILD_STAMP already built: $BIN/$GOBUILD_NAME (cached)"
    exit 0
  fi
  [[ -x "$GO" ]] || { echo "$GOBUILD_TOOL: no Go toolchain (set GO=/path/to/go)" >&2; exit 1; }
  mkdir -p "$BIN" "$SCRATCH"
  export GOTOOLCHAIN=local
  export GOMODCACHE="$SCRATCH/mod" GOCACHE="$SCRATCH/build" GOPATH="$SCRATCH/path"
  export GOFLAGS="-buildvcs=false -modcacherw -p=$PAR"
  export CGO_ENABLED=0
}

log() { printf '[%s %4ss] %s\n' "$GOBUILD_TOOL" "$(( $(date +%s) - GOBUILD_T0 ))" "$*"; }

# gobuild_finish BUILT_BINARY [EXTRA_SCRATCH_DIR...]: moves the binary into place (a rename, so
# an interrupted build never leaves a binary the stamp check could take for a finished one),
# stamps it and removes the scratch directories.
gobuild_finish() {
  mv -f "$1" "$BIN/$GOBUILD_NAME"
  shift
  echo "$GOBUILD_STAMP" >"$BIN/.$GOBUILD_NAME.version"
  log "built in $(( $(date +%s) - GOBUILD_T0 ))s ($(du -h "$BIN/$GOBUILD_NAME" | cut -f1))"
  if [[ "${KPROF_KEEP_GO_CACHE:-0}" != 1 ]]; then
    log "removing scratch Go caches ($(du -sh "$SCRATCH" | cut -f1))"
    rm -rf "$SCRATCH" "$@"
  fi
  log "$GOBUILD_NAME: $BIN/$GOBUILD_NAME"
}
