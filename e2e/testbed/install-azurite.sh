#!/usr/bin/env bash
# Install Azurite (Microsoft's Azure Storage emulator, an npm package) for the store's Azure
# test (store/tests/store_azure.rs runs its blob service on 127.0.0.1 with a temp dir).
#
# Output: ${KPROF_CACHE:-/var/cache/kprof}/azurite/<AZURITE_VERSION>/bin/azurite-blob
# (idempotent: an install stamped with the right version is kept). Prints its path last.
# Needs node and npm (on the machine, like Go and Rust). Knobs: AZURITE_VERSION, KPROF_CACHE.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
AZURITE_VERSION="${AZURITE_VERSION:-3.37.0}"
DIR="$KPROF_CACHE/azurite/$AZURITE_VERSION"
log() { printf '[install-azurite] %s\n' "$*"; }
if [[ -x "$DIR/bin/azurite-blob" && "$(cat "$DIR/.version" 2>/dev/null)" == "$AZURITE_VERSION" ]]; then
  log "azurite $AZURITE_VERSION already installed (cached)"
  echo "$DIR/bin/azurite-blob"
  exit 0
fi
command -v npm >/dev/null || { echo "install-azurite: npm is missing (Node.js is expected on the machine)" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR/bin"
log "npm install azurite@$AZURITE_VERSION into $DIR ($(node --version))"
# Only the runtime dependencies; no audit or funding calls; the npm cache in a scratch dir
# removed afterwards (nothing a fresh machine would not have is kept).
scratch="$(mktemp -d)"
npm install --prefix "$DIR" --no-audit --no-fund --omit=dev --cache "$scratch" \
  "azurite@$AZURITE_VERSION" >"$scratch/npm.log" 2>&1 || { cat "$scratch/npm.log" >&2; rm -rf "$scratch"; exit 1; }
rm -rf "$scratch"
ln -sf ../node_modules/.bin/azurite-blob "$DIR/bin/azurite-blob"
echo "$AZURITE_VERSION" >"$DIR/.version"
log "installed ($(du -sh "$DIR" | cut -f1))"
echo "$DIR/bin/azurite-blob"
