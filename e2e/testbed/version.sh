#!/usr/bin/env bash
# Print kprof's version: the workspace version in Cargo.toml, which the images, the chart and
# its appVersion all carry.
set -euo pipefail
sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$(dirname "$0")/../../Cargo.toml"
