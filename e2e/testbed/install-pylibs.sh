#!/usr/bin/env bash
# Install the third-party Python packages the kernel tests load (NumPy, for the native-unwinding
# tests in agent/tests/native_unwind.rs), for Debian's /usr/bin/python3.11 and the newest pyenv
# CPython 3.12, each into its own directory that the tests put on PYTHONPATH:
#
#   ${KPROF_CACHE:-/var/cache/kprof}/pylibs/<major.minor>/numpy
#
# Neither the system's nor pyenv's site-packages is touched (`pip install --target`). The wheels
# are the manylinux ones from PyPI, their digests pinned below: a changed download is refused.
# Idempotent: a directory stamped with the pinned requirement whose NumPy imports is kept, and
# nothing is downloaded. Env knobs: KPROF_CACHE, PYENV_ROOT.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

NUMPY_VERSION=2.2.6
# sha256 of numpy-2.2.6-cp3XX-cp3XX-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
declare -A NUMPY_SHA256=(
  [3.11]=ba10f8411898fc418a521833e014a77d3ca01c15b0c6cdcce6a0d2897e6dbbdf
  [3.12]=fd83c01228a688733f1ded5201c678f0c53ecc1006ffbc404db9f7a899ac6249
)
T0=$(date +%s)
log() { printf '[install-pylibs %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

# The newest <root>/3.<minor>.<patch>/bin/python3.<minor>, as the tests' harness picks it.
newest_pyenv() {
  local minor=$1 root="${PYENV_ROOT:-$HOME/.pyenv}/versions"
  local best="" best_patch=-1 d patch
  for d in "$root"/3."$minor".*; do
    patch="${d##*/3."$minor".}"
    [[ "$patch" =~ ^[0-9]+$ && -x "$d/bin/python3.$minor" ]] || continue
    if (( patch > best_patch )); then best="$d/bin/python3.$minor"; best_patch=$patch; fi
  done
  [[ -n "$best" ]] && echo "$best"
}

install_for() {
  local py=$1
  local ver
  ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  local sha="${NUMPY_SHA256[$ver]:-}"
  if [[ -z "$sha" ]]; then
    echo "install-pylibs: no pinned NumPy wheel for Python $ver ($py)" >&2
    return 1
  fi
  local dir="$KPROF_CACHE/pylibs/$ver"
  local want="numpy==$NUMPY_VERSION"
  if [[ "$(cat "$dir/.requirement" 2>/dev/null)" == "$want" ]] \
     && PYTHONPATH="$dir" "$py" -c "import numpy; assert numpy.__version__ == '$NUMPY_VERSION'" 2>/dev/null; then
    log "$want for $py already in $dir (cached)"
    return 0
  fi
  if ! "$py" -m pip --version >/dev/null 2>&1; then
    echo "install-pylibs: $py has no pip (Debian: apt-get install python3-pip)" >&2
    return 1
  fi
  log "installing $want for $py into $dir"
  local scratch
  scratch="$(mktemp -d "${TMPDIR:-/tmp}/kprof-pylibs.XXXXXX")"
  printf '%s --hash=sha256:%s\n' "$want" "$sha" >"$scratch/requirements.txt"
  # Into a fresh directory, then swapped in: an interrupted install never looks complete.
  if ! "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
      --no-deps --only-binary=:all: --require-hashes -r "$scratch/requirements.txt" \
      --target "$scratch/lib" >"$scratch/pip.log" 2>&1; then
    cat "$scratch/pip.log" >&2
    rm -rf "$scratch"
    return 1
  fi
  PYTHONPATH="$scratch/lib" "$py" -c "import numpy; assert numpy.__version__ == '$NUMPY_VERSION'"
  echo "$want" >"$scratch/lib/.requirement"
  mkdir -p "$KPROF_CACHE/pylibs"
  rm -rf "$dir"
  mv "$scratch/lib" "$dir"
  rm -rf "$scratch"
  log "installed $want for $py into $dir"
}

status=0
if [[ -x /usr/bin/python3.11 ]]; then
  install_for /usr/bin/python3.11 || status=1
else
  log "no /usr/bin/python3.11: skipped"
fi
if py312="$(newest_pyenv 12)"; then
  install_for "$py312" || status=1
else
  log "no pyenv CPython 3.12 under ${PYENV_ROOT:-$HOME/.pyenv}/versions: skipped"
fi
exit "$status"
