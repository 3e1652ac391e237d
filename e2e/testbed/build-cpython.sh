#!/usr/bin/env bash
# Build a CPython newer than pyenv has here (3.14), for the Python kernel tests.
#
# Output: ${KPROF_CACHE:-/var/cache/kprof}/cpython/<version>/bin/python3.X (idempotent: a build
# stamped with the right version is kept and nothing is downloaded). Prints its path last.
#
# Where the source comes from: the Go module proxy serves any public GitHub repository at its
# semver tags as a module zip, and CPython's tags (v3.14.7) are semver, so
# github.com/python/cpython@v3.14.7+incompatible is the release source tree. The zip's digest is
# pinned below, so a changed download is refused rather than built.
#
# Configured as python.org's defaults (a statically linked interpreter, no PGO/LTO: the tests
# need its layout, not its speed), installed with `make altinstall` under the cache.
# Env knobs: CPYTHON_VERSION with CPYTHON_ZIP_SHA256, KPROF_CACHE, KPROF_BUILD_PARALLEL, GOPROXY.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CPYTHON_VERSION="${CPYTHON_VERSION:-3.14.7}"
CPYTHON_ZIP_SHA256="${CPYTHON_ZIP_SHA256:-e79b1270b4b62593f6686c8db8edd384b4a9b14e5824a8c9fce0a95656dd6321}"
MINOR="${CPYTHON_VERSION%.*}"
PREFIX="$KPROF_CACHE/cpython/$CPYTHON_VERSION"
EXE="$PREFIX/bin/python$MINOR"
T0=$(date +%s)
log() { printf '[build-cpython %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

if [[ -x "$EXE" && "$(cat "$PREFIX/.version" 2>/dev/null)" == "$CPYTHON_VERSION" ]]; then
  log "CPython $CPYTHON_VERSION already built: $EXE (cached)"
  echo "$EXE"
  exit 0
fi

# The first proxy of GOPROXY that is a URL (not "direct"/"off").
proxy="https://proxy.golang.org"
IFS=',|' read -ra proxies <<<"${GOPROXY:-}"
for p in "${proxies[@]}"; do
  if [[ "$p" == http* ]]; then proxy="${p%/}"; break; fi
done

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/kprof-cpython.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
zip="$SCRATCH/src.zip"
url="$proxy/github.com/python/cpython/@v/v$CPYTHON_VERSION+incompatible.zip"
log "downloading $url"
curl -fsS --retry 3 -o "$zip" "$url"
echo "$CPYTHON_ZIP_SHA256  $zip" | sha256sum -c --quiet - \
  || { echo "build-cpython: $url does not have the pinned digest $CPYTHON_ZIP_SHA256" >&2; exit 1; }
(cd "$SCRATCH" && python3 -m zipfile -e "$zip" . )
src="$SCRATCH/github.com/python/cpython@v$CPYTHON_VERSION+incompatible"
# Module zips keep no file modes: the build's own scripts must be executable.
chmod +x "$src/configure" "$src"/install-sh "$src"/config.sub "$src"/config.guess 2>/dev/null || true
find "$src" -name '*.sh' -o -name '*.py' -path '*/Tools/*' | xargs chmod +x 2>/dev/null || true

log "configuring CPython $CPYTHON_VERSION into $PREFIX"
mkdir -p "$SCRATCH/build"
cd "$SCRATCH/build"
"$src/configure" --prefix="$PREFIX" --without-ensurepip --disable-test-modules >"$SCRATCH/configure.log" 2>&1 \
  || { tail -30 "$SCRATCH/configure.log" >&2; exit 1; }
log "building (make -j${KPROF_BUILD_PARALLEL:-2})"
nice -n 5 make -j"${KPROF_BUILD_PARALLEL:-2}" >"$SCRATCH/make.log" 2>&1 \
  || { tail -40 "$SCRATCH/make.log" >&2; exit 1; }
rm -rf "$PREFIX"
make altinstall >"$SCRATCH/install.log" 2>&1 || { tail -30 "$SCRATCH/install.log" >&2; exit 1; }
"$EXE" -c 'import zlib, threading, sys; assert sys.version_info[:2] == tuple(map(int, "'"$MINOR"'".split(".")))'
echo "$CPYTHON_VERSION" >"$PREFIX/.version"
log "built in $(( $(date +%s) - T0 ))s: $EXE"
echo "$EXE"
