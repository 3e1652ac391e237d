#!/usr/bin/env bash
# Build kprof's images, ghcr.io/kprof/kprof-operator (the operator with the store) and
# ghcr.io/kprof/kprof-agent, tagged with the workspace version, as OCI archives in
# target/images/; import them into the test bed's containerd when it runs.
#
#   build-images.sh [--debug] [--no-import]
#
# Release (default): the `image` cargo profile (optimized, stripped), tag VERSION. Each image
# holds its binary, the shared libraries it links (glibc's), a CA bundle for https stores and
# exporters, and /etc/passwd; no shell. The operator runs as 65532 (nonroot); the agent starts
# as root and drops to the chart's runAsUser itself. Paths are remapped and archives written
# with fixed times and order, so the same source built in the same checkout path on the same
# toolchain and base packages gives the same image digests (printed at the end; see
# docs/decisions.md for what another path changes).
# --debug: debug builds tagged VERSION-debug (backtraces with line numbers; quicker to build).
set -euo pipefail
cd "$(dirname "$0")/../.."
. e2e/testbed/env.sh

DEBUG=0 IMPORT=1
for arg in "$@"; do
  case "$arg" in
    --debug) DEBUG=1 ;;
    --no-import) IMPORT=0 ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
  esac
done
VERSION=$(e2e/testbed/version.sh)
target="${CARGO_TARGET_DIR:-$PWD/target}"
if (( DEBUG )); then
  TAG="$VERSION-debug" BIN="$target/debug"
  cargo build --bins -p kprof-operator -p kprof-agent -p kprof-plugin
else
  TAG="$VERSION" BIN="$target/image"
  # Absolute source paths end up in panic messages: remap them so the binary does not depend
  # on where the checkout or the cargo home is.
  CARGO_ENCODED_RUSTFLAGS="--remap-path-prefix=$PWD=/kprof"$'\x1f'"--remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
    cargo build --profile image --bins -p kprof-operator -p kprof-agent -p kprof-plugin
fi

out="$target/images"
mkdir -p "$out"
CA=/etc/ssl/certs/ca-certificates.crt
[[ -s "$CA" ]] || { echo "build-images.sh: no CA bundle at $CA (apt-get install ca-certificates)" >&2; exit 1; }
import=(--no-import)
if (( IMPORT )); then
  if [[ -S "$KPROF_CONTAINERD_SOCK" ]]; then
    import=()
  else
    echo "build-images.sh: the test bed is not running: images not imported (e2e/testbed/up.sh)" >&2
  fi
fi
# name binary user
for spec in "kprof-operator kprof-operator 65532:65532" "kprof-agent kprof-agent 0:0"; do
  read -r name bin user <<<"$spec"
  ref="ghcr.io/kprof/$name:$TAG"
  archive="$out/$name-$TAG.oci.tar"
  e2e/testbed/image.sh "${import[@]}" --out "$archive" --user "$user" --id-file "$archive.id" \
    --host-path "$CA" "$ref" "$BIN/$bin" >/dev/null 2>"$archive.log" || { cat "$archive.log" >&2; exit 1; }
  rm -f "$archive.log"
  # The archive is the compressed layer plus two small JSON blobs: what a registry stores.
  printf '%-44s %s compressed, manifest %s\n' "$ref" "$(numfmt --to=iec --suffix=B "$(stat -c %s "$archive")")" \
    "$(sed -n 2p "$archive.id")"
done
