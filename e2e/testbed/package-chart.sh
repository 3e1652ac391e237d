#!/usr/bin/env bash
# Package the Helm chart as target/chart/kprof-VERSION.tgz (chart version = appVersion = the
# workspace version, which is also the images' tag) and print the file's path.
# Refuses when charts/kprof/Chart.yaml names another version: the tree and the package must
# install the same thing.
set -euo pipefail
cd "$(dirname "$0")/../.."
. e2e/testbed/env.sh
VERSION=$(e2e/testbed/version.sh)
for key in version appVersion; do
  got=$(sed -n "s/^$key: *\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" charts/kprof/Chart.yaml)
  [[ "$got" == "$VERSION" ]] || {
    echo "package-chart.sh: charts/kprof/Chart.yaml has $key $got, Cargo.toml has version $VERSION: make them equal" >&2
    exit 1
  }
done
out="${CARGO_TARGET_DIR:-$PWD/target}/chart"
mkdir -p "$out"
helm package charts/kprof --version "$VERSION" --app-version "$VERSION" -d "$out" >/dev/null
echo "$out/kprof-$VERSION.tgz"
