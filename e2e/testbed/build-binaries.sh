#!/usr/bin/env bash
# Build the pinned Kubernetes binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kubectl) and helm from the Go module proxy.
#
# Output: ${KPROF_CACHE:-/var/cache/kprof}/k8s/v<K8S_VERSION>/bin  (idempotent; an existing
# binary of the right version is kept). Go's module and build caches live under
# ${KPROF_CACHE}/go so a later run is warm.
#
# Why a wrapper module: k8s.io/kubernetes requires its staging modules at v0.0.0 and maps them
# with `replace => ./staging/...`, which is ignored for dependencies. We generate a tiny module
# that requires k8s.io/kubernetes vX.Y.Z and replaces every staging module (list derived from
# the downloaded go.mod, never hard-coded) by its published tag v0.Y.Z. etcd is built from the
# same module graph via a 3-line main that calls etcdmain.Main (etcd's own main does the same).
#
# Env knobs: K8S_VERSION, HELM_VERSION (defaults in env.sh), KPROF_CACHE, GO (go binary),
#            KPROF_BUILD_PARALLEL (go build -p, default 2), ONLY="kube-apiserver etcd ..."
set -euo pipefail
# Pinned versions and locations come from env.sh (the single place to bump them).
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
K8S_VERSION="${K8S_VERSION#v}"
HELM_VERSION="${HELM_VERSION#v}"
PAR="${KPROF_BUILD_PARALLEL:-2}"

if [[ -z "${GO:-}" ]]; then
  if command -v go >/dev/null 2>&1; then GO="$(command -v go)"; else GO=/usr/local/go/bin/go; fi
fi
[[ -x "$GO" ]] || { echo "build-binaries: no Go toolchain (set GO=/path/to/go)" >&2; exit 1; }

VDIR="$KPROF_CACHE/k8s/v$K8S_VERSION"
BIN="$VDIR/bin"
WRAP="$VDIR/wrapper"
mkdir -p "$BIN" "$WRAP" "$KPROF_CACHE/go/mod" "$KPROF_CACHE/go/build"

export GOTOOLCHAIN=local
export GOMODCACHE="$KPROF_CACHE/go/mod"
export GOCACHE="$KPROF_CACHE/go/build"
export GOFLAGS="-buildvcs=false -modcacherw"
export GOPATH="$KPROF_CACHE/go/path"

MINOR="${K8S_VERSION#*.}"; MINOR="${MINOR%%.*}"
MAJOR="${K8S_VERSION%%.*}"
STAGING_TAG="v0.${K8S_VERSION#*.}"

T0=$(date +%s)
log() { printf '[build-binaries %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }

stamp_ok() { # binary expected-version-substring
  [[ -x "$BIN/$1" && -f "$BIN/.$1.version" && "$(cat "$BIN/.$1.version")" == "$2" ]]
}

want() { # is this binary in ONLY (or ONLY unset)?
  [[ -z "${ONLY:-}" ]] && return 0
  [[ " $ONLY " == *" $1 "* ]]
}

K8S_BINS=(kube-apiserver etcd kubectl kube-controller-manager kube-scheduler kubelet)
need_k8s=0
for b in "${K8S_BINS[@]}"; do
  want "$b" || continue
  stamp_ok "$b" "v$K8S_VERSION" || need_k8s=1
done
need_helm=0
if want helm && ! stamp_ok helm "v$HELM_VERSION+k8s$K8S_VERSION"; then need_helm=1; fi

if (( need_k8s == 0 && need_helm == 0 )); then
  log "all binaries for Kubernetes v$K8S_VERSION / helm v$HELM_VERSION already built in $BIN (cached)"
  exit 0
fi

# --- checksum database -------------------------------------------------------------------
# The go command verifies new modules against sum.golang.org (through the proxy's /sumdb/
# endpoint when it offers one). If neither is reachable, fall back to trusting the proxy
# (GOSUMDB=off) and say so loudly; the go.sum then records what the proxy served.
sumdb_ok() {
  local proxy="${GOPROXY:-$("$GO" env GOPROXY)}"; proxy="${proxy%%,*}"; proxy="${proxy%%|*}"
  [[ "$("$GO" env GOSUMDB)" == off ]] && return 0
  command -v curl >/dev/null || return 0
  if [[ "$proxy" == http* ]] && curl -fsS -m 15 -o /dev/null "$proxy/sumdb/sum.golang.org/supported" 2>/dev/null; then
    return 0
  fi
  curl -fsS -m 15 -o /dev/null https://sum.golang.org/latest 2>/dev/null
}
if ! sumdb_ok; then
  log "WARNING: checksum database unreachable (proxy /sumdb and sum.golang.org); using GOSUMDB=off (hashes come from the proxy only)"
  export GOSUMDB=off
fi

log "Kubernetes v$K8S_VERSION, helm v$HELM_VERSION, $("$GO" version), go build -p $PAR"
log "cache: $VDIR  (GOMODCACHE/GOCACHE under $KPROF_CACHE/go)"

if (( need_k8s )); then
  # --- 1. fetch k8s.io/kubernetes' go.mod and derive the wrapper module ---------------------
  log "downloading k8s.io/kubernetes@v$K8S_VERSION module metadata"
  info_json="$(cd "$WRAP" && GOFLAGS="$GOFLAGS" "$GO" mod download -json "k8s.io/kubernetes@v$K8S_VERSION")"
  k8s_gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$info_json" | head -1)"
  k8s_dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$info_json" | head -1)"
  git_commit="$(sed -n 's/^[[:space:]]*"Hash": "\([0-9a-f]\{40\}\)",\{0,1\}$/\1/p' <<<"$info_json" | head -1)"
  [[ -f "$k8s_gomod" ]] || { echo "no go.mod for k8s.io/kubernetes@v$K8S_VERSION: $info_json" >&2; exit 1; }
  git_commit="${git_commit:-0000000000000000000000000000000000000000}"
  release_time="$(sed -n 's/^[[:space:]]*"Time": "\(.*\)",\{0,1\}$/\1/p' <<<"$info_json" | head -1)"
  build_date="${release_time:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}"

  mapfile -t staging < <(sed -n 's#^[[:space:]]*\(replace[[:space:]]\{1,\}\)\{0,1\}\(k8s\.io/[A-Za-z0-9._-]*\)[[:space:]]*=>[[:space:]]*\./staging/src/.*#\2#p' "$k8s_gomod" | sort -u)
  (( ${#staging[@]} > 20 )) || { echo "could not derive staging modules from $k8s_gomod (got ${#staging[@]})" >&2; exit 1; }
  go_line="$(grep -m1 '^go ' "$k8s_gomod")"
  log "derived ${#staging[@]} staging modules -> $STAGING_TAG; k8s $go_line; commit ${git_commit:0:12}"

  {
    echo "// Generated by e2e/testbed/build-binaries.sh - do not edit."
    echo "module kprof.local/k8sbins"
    echo
    echo "$go_line"
    grep '^godebug' "$k8s_gomod" || true
    echo
    echo "require k8s.io/kubernetes v$K8S_VERSION"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do echo "	$m => $m $STAGING_TAG"; done
    echo ")"
  } >"$WRAP/go.mod.new"
  mkdir -p "$WRAP/cmd/etcd"
  cat >"$WRAP/cmd/etcd/main.go" <<'EOF'
// Command etcd is the etcd server, built from the module graph pinned by k8s.io/kubernetes.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  cat >"$WRAP/tools.go" <<'EOF'
//go:build tools

// Package tools keeps the Kubernetes commands in the wrapper's module graph for `go mod tidy`.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
EOF
  if ! cmp -s "$WRAP/go.mod.new" "$WRAP/go.mod.base" 2>/dev/null || [[ ! -f "$WRAP/go.sum" ]]; then
    cp "$WRAP/go.mod.new" "$WRAP/go.mod"
    cp "$WRAP/go.mod.new" "$WRAP/go.mod.base"
    rm -f "$WRAP/go.sum"
    log "go mod tidy (downloads the module graph: several hundred MB on a cold cache)"
    (cd "$WRAP" && nice -n 5 "$GO" mod tidy) || { rm -f "$WRAP/go.mod.base"; exit 1; }
    log "module graph ready: $(grep -c . "$WRAP/go.sum") go.sum lines"
  else
    log "wrapper module unchanged (go.mod/go.sum cached)"
  fi
  rm -f "$WRAP/go.mod.new"

  vpkg_flags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    vpkg_flags+=" -X '$pkg.gitVersion=v$K8S_VERSION' -X '$pkg.gitMajor=$MAJOR' -X '$pkg.gitMinor=$MINOR'"
    vpkg_flags+=" -X '$pkg.gitCommit=$git_commit' -X '$pkg.gitTreeState=clean' -X '$pkg.buildDate=$build_date'"
  done
  LDFLAGS="-s -w$vpkg_flags"
  TAGS="selinux,notest,grpcnotrace"

  build_one() { # name pkg cgo
    local name="$1" pkg="$2" cgo="$3" t1
    want "$name" || return 0
    if stamp_ok "$name" "v$K8S_VERSION"; then log "$name: cached"; return 0; fi
    t1=$(date +%s)
    log "$name: building $pkg (CGO_ENABLED=$cgo) ..."
    (cd "$WRAP" && CGO_ENABLED="$cgo" nice -n 5 "$GO" build -p "$PAR" -trimpath -tags "$TAGS" \
        -ldflags "$LDFLAGS" -o "$BIN/.$name.tmp" "$pkg")
    mv -f "$BIN/.$name.tmp" "$BIN/$name"
    echo "v$K8S_VERSION" >"$BIN/.$name.version"
    log "$name: done in $(( $(date +%s) - t1 ))s ($(du -h "$BIN/$name" | cut -f1))"
  }
  # apiserver + etcd first: control-plane-only tests can start as soon as these two exist.
  build_one kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver 0
  build_one etcd ./cmd/etcd 0
  build_one kubectl k8s.io/kubernetes/cmd/kubectl 0
  build_one kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager 0
  build_one kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler 0
  build_one kubelet k8s.io/kubernetes/cmd/kubelet 1
fi

if (( need_helm )); then
  t1=$(date +%s)
  log "helm: downloading helm.sh/helm/v3@v$HELM_VERSION"
  hdir="$(cd "$WRAP" && "$GO" mod download -json "helm.sh/helm/v3@v$HELM_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' | head -1)"
  [[ -d "$hdir" ]] || { echo "helm module not downloaded" >&2; exit 1; }
  # Stamp the version and the default Kubernetes version used by offline `helm template/lint`
  # (it would otherwise be v1.20). The variables moved between helm releases, so find them.
  hflags="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  while IFS= read -r f; do
    rel="${f#"$hdir"/}"; pkg="helm.sh/helm/v3/$(dirname "$rel")"
    hflags+=" -X $pkg.k8sVersionMajor=$MAJOR -X $pkg.k8sVersionMinor=$MINOR"
  done < <(grep -rl --include='*.go' --exclude='*_test.go' -E '^[[:space:]]*k8sVersionM(ajor|inor)[[:space:]]*=' "$hdir/pkg" "$hdir/internal" 2>/dev/null || true)
  log "helm: building (ldflags: $hflags)"
  (cd "$WRAP" && CGO_ENABLED=0 GOBIN="$BIN/.helm-gobin" nice -n 5 "$GO" install -p "$PAR" -trimpath \
      -ldflags "$hflags" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION")
  mv -f "$BIN/.helm-gobin/helm" "$BIN/helm"; rmdir "$BIN/.helm-gobin" 2>/dev/null || true
  echo "v$HELM_VERSION+k8s$K8S_VERSION" >"$BIN/.helm.version"
  log "helm: done in $(( $(date +%s) - t1 ))s"
fi

log "all done in $(( $(date +%s) - T0 ))s; binaries in $BIN:"
ls -la "$BIN" | sed 's/^/    /'
"$BIN/kubectl" version --client 2>/dev/null | sed 's/^/    /' || true
