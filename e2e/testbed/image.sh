#!/usr/bin/env bash
# Build a minimal OCI image holding the given binaries under /usr/local/bin (plus the shared
# libraries ldd reports, at their host paths; nothing extra for static binaries) and import
# it into the test bed's containerd, so pods can use `image: NAME:TAG` with
# `imagePullPolicy: Never`. The first binary is the image's entrypoint.
# Usage: image.sh [--no-import] [--out FILE] [--user UID:GID] [--id-file F] [--host-path P]...
#                 NAME:TAG BINARY [BINARY...]
# (--user, --id-file and --host-path go to ociarchive.py: the image's user, where its ids are
# written, extra host files at their own paths.)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
. "$KPROF_TESTBED_DIR/image-lib.sh"

IMPORT=1 OUT=""
args=()
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --no-import) IMPORT=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --user|--id-file|--host-path) args+=("$1" "$2"); shift 2 ;;
    *) echo "image.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
(( $# >= 2 )) || { sed -n '2,10p' "$0" >&2; exit 2; }
NAME="$1"; shift
OUT="${OUT:-$(archive_path "$NAME")}"

first=""
for bin in "$@"; do
  [[ -f "$bin" && -x "$bin" ]] || { echo "image.sh: $bin is not an executable file" >&2; exit 1; }
  base="$(basename "$bin")"
  args+=(--file "$bin:/usr/local/bin/$base")
  first="${first:-/usr/local/bin/$base}"
done
while read -r lib; do
  [[ "$lib" == MISSING* ]] && { echo "image.sh: ldd: library ${lib#MISSING } not found" >&2; exit 1; }
  args+=(--host-path "$lib")
done < <(ldd_deps "$@")

python3 "$KPROF_TESTBED_DIR/ociarchive.py" --name "$NAME" --out "$OUT" --entrypoint "$first" "${args[@]}" >/dev/null
if (( IMPORT )); then
  import_archive "$OUT"
  echo "image.sh: imported $NAME ($(du -h "$OUT" | cut -f1) archive $OUT)"
else
  echo "image.sh: wrote $OUT"
fi
