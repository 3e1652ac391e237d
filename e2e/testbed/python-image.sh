#!/usr/bin/env bash
# Build an OCI image with a working CPython (interpreter + stdlib + the shared libraries of the
# interpreter and its extension modules, all at their host paths) plus an application
# directory copied to /app, and import it into the test bed's containerd.
# Entrypoint: python3 /app/SCRIPT (default: main.py, else app.py; override with `command:`).
# The interpreter is $PYTHON (default Debian's /usr/bin/python3.11; a pyenv build such as
# ~/.pyenv/versions/3.12.1/bin/python3.12 works too). `/usr/local/bin/python3` always points at it.
# Usage: python-image.sh [--no-import] [--out FILE] NAME:TAG APP_DIR [SCRIPT]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
. "$KPROF_TESTBED_DIR/image-lib.sh"

IMPORT=1 OUT=""
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --no-import) IMPORT=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "python-image.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
(( $# >= 2 )) || { sed -n '2,9p' "$0" >&2; exit 2; }
NAME="$1" APP="$2" SCRIPT="${3:-}"
[[ -d "$APP" ]] || { echo "python-image.sh: $APP is not a directory" >&2; exit 1; }
if [[ -z "$SCRIPT" ]]; then
  for c in main.py app.py; do [[ -f "$APP/$c" ]] && { SCRIPT="$c"; break; }; done
fi
[[ -n "$SCRIPT" ]] || { echo "python-image.sh: no SCRIPT given and no main.py/app.py in $APP" >&2; exit 1; }
OUT="${OUT:-$(archive_path "$NAME")}"

PY="$(realpath "${PYTHON:-/usr/bin/python3.11}")"
[[ -x "$PY" ]] || { echo "python-image.sh: no interpreter at $PY" >&2; exit 1; }
# stdlib and extension-module directories as the interpreter itself reports them
mapfile -t dirs < <("$PY" -S -c '
import sysconfig
p = sysconfig.get_paths()
for k in ("stdlib", "platstdlib"):
    print(p[k])
' | sort -u)
mapfile -t exts < <(find "${dirs[@]}" -name '*.so' -not -path '*/test/*' -not -path '*/config-*' 2>/dev/null)

args=(--host-path "$PY" --link "/usr/local/bin/python3:$PY" --link "/usr/local/bin/python:$PY")
for d in "${dirs[@]}"; do args+=(--host-tree "$d"); done
while read -r lib; do
  [[ "$lib" == MISSING* ]] && continue # an extension module whose library isn't installed: skip
  args+=(--host-path "$lib")
done < <(ldd_deps "$PY" "${exts[@]}")

python3 "$KPROF_TESTBED_DIR/ociarchive.py" --name "$NAME" --out "$OUT" \
  --exclude 'config-*' --exclude test --exclude tests --exclude idlelib --exclude tkinter \
  --exclude turtledemo --exclude ensurepip --exclude site-packages --exclude dist-packages \
  --tree "$APP:/app" --workdir /app \
  --env PATH=/usr/local/bin:/usr/bin:/bin --env PYTHONUNBUFFERED=1 --env PYTHONDONTWRITEBYTECODE=1 \
  --entrypoint /usr/local/bin/python3 --cmd "/app/$SCRIPT" "${args[@]}" >/dev/null
if (( IMPORT )); then
  import_archive "$OUT"
  echo "python-image.sh: imported $NAME ($("$PY" -S -c 'import sys; print("python", sys.version.split()[0])'), $(du -h "$OUT" | cut -f1) archive $OUT)"
else
  echo "python-image.sh: wrote $OUT"
fi
