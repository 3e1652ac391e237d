#!/usr/bin/env bash
# Install the Debian packages the test bed's node needs (container runtime, CNI plugins,
# iptables, PKI tooling) and the browser the web page tests use. Idempotent and quiet when everything is already there.
# Package postinst scripts must not start daemons (no systemd here; up.sh runs containerd
# with its own config), so a policy-rc.d that denies service starts is put in place for the
# duration of the install when none exists.
set -euo pipefail

PKGS=(containerd runc containernetworking-plugins iptables openssl ca-certificates
      gcc libc6-dev python3 iproute2 procps util-linux curl
      # the store's web page is checked in a real headless browser; the embedded-libpython
      # Python test links against Debian's libpython3.11
      chromium libpython3.11-dev
      # NumPy for the native-unwinding tests goes in with python3.11's own pip (install-pylibs.sh)
      python3-pip
      # the Helm journey pushes the release images to a registry as a cluster admin would
      skopeo)

missing=()
for p in "${PKGS[@]}"; do
  st="$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)"
  [[ "$st" == installed ]] || missing+=("$p")
done
if (( ${#missing[@]} == 0 )); then
  exit 0
fi
if (( EUID != 0 )); then
  echo "install-deps: need root to install: ${missing[*]}" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\n# temporary, from kprof e2e/testbed/install-deps.sh: no service starts\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  created_policy=1
fi
cleanup() { if (( created_policy )); then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt_install() {
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/kprof-install-deps.log 2>&1
}
if ! apt_install; then
  echo "install-deps: install failed, refreshing package lists" >&2
  apt-get update -q >/tmp/kprof-install-deps-update.log 2>&1 || { cat /tmp/kprof-install-deps-update.log >&2; exit 1; }
  apt_install || { tail -30 /tmp/kprof-install-deps.log >&2; exit 1; }
fi

# Debian's containerd package may have left a daemon running if some init system started it
# anyway; we never want the distro's instance (up.sh starts its own with its own config).
echo "install-deps: done ($(containerd --version 2>/dev/null | awk '{print $3}'), runc $(runc --version 2>/dev/null | awk 'NR==1{print $3}'))"
