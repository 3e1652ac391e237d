#!/usr/bin/env bash
# Installs what building and testing the kprof eBPF sampler needs on a fresh Debian 12 machine.
# Idempotent: every step checks first and is skipped when already satisfied.
#
#   agent/install-toolchain.sh            # as root (apt-get); rustup/cargo steps for the current user
#
# What it installs:
#   - the pinned nightly (aya-build compiles agent/ebpf with -Z build-std=core) + rust-src
#   - LLVM 22 development libraries (bpf-linker links against libLLVM)
#   - bpf-linker (built against LLVM 22)
#   - bpftool (kernel tests, bpf_stats), linux-perf (the overhead benchmark compares against perf)
set -euo pipefail

# Keep in step with EBPF_TOOLCHAIN in agent/build.rs.
NIGHTLY="${KPROF_EBPF_TOOLCHAIN:-nightly-2026-05-20}"
BPF_LINKER_VERSION="0.13.0"
LLVM_MAJOR=22

log() { printf '[install-toolchain] %s\n' "$*"; }

# --- apt packages -------------------------------------------------------------------------------
apt_pkgs=(llvm-${LLVM_MAJOR}-dev libpolly-${LLVM_MAJOR}-dev bpftool linux-perf build-essential pkg-config)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    log "apt-get install ${missing[*]}"
    if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
        log "apt-get install failed; refreshing package lists once"
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    fi
else
    log "apt packages present"
fi

# --- pinned nightly + rust-src ----------------------------------------------------------------------
if ! command -v rustup >/dev/null; then
    log "rustup not found: install Rust first (https://rustup.rs)" >&2
    exit 1
fi
if rustup toolchain list | grep -q "^${NIGHTLY}"; then
    log "toolchain ${NIGHTLY} present"
else
    log "rustup toolchain install ${NIGHTLY}"
    rustup toolchain install "${NIGHTLY}" --profile minimal --component rust-src
fi
if ! rustup component list --installed --toolchain "${NIGHTLY}" | grep -q '^rust-src'; then
    rustup component add rust-src --toolchain "${NIGHTLY}"
fi

# --- bpf-linker ----------------------------------------------------------------------------------
export PATH="/usr/lib/llvm-${LLVM_MAJOR}/bin:${HOME}/.cargo/bin:${PATH}"
have=""
if command -v bpf-linker >/dev/null; then
    have=$(bpf-linker --version 2>/dev/null | awk '{print $2}')
fi
if [[ "${have}" == "${BPF_LINKER_VERSION}" ]]; then
    log "bpf-linker ${have} present"
else
    log "cargo install bpf-linker ${BPF_LINKER_VERSION} (llvm-${LLVM_MAJOR}); takes a few minutes"
    cargo install bpf-linker --locked --version "${BPF_LINKER_VERSION}" \
        --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

log "done: $(rustc +"${NIGHTLY}" -V), $(bpf-linker --version), $(bpftool version | head -1)"
