# Shared by image.sh and python-image.sh (sourced, not executed).
# ldd_deps FILE... : print the host paths of the shared libraries (and loader) the files need.
ldd_deps() {
  local f
  for f in "$@"; do
    LC_ALL=C ldd "$f" 2>/dev/null | awk '
      /not found/ { print "MISSING " $1; next }
      $2 == "=>" && $3 ~ /^\// { print $3; next }
      $1 ~ /^\// { print $1 }'
  done | sort -u
}
# import_archive ARCHIVE : load an OCI archive into the test bed's containerd (CRI namespace).
import_archive() {
  if [[ ! -S "$KPROF_CONTAINERD_SOCK" ]]; then
    echo "image: the test bed's containerd is not running ($KPROF_CONTAINERD_SOCK); run e2e/testbed/up.sh, or pass --no-import" >&2
    return 1
  fi
  ctr --address "$KPROF_CONTAINERD_SOCK" -n k8s.io images import "$1" >/dev/null
}
archive_path() { # NAME:TAG -> archive file under the state dir
  mkdir -p "$KPROF_STATE/images"
  echo "$KPROF_STATE/images/$(echo "$1" | tr '/:@' '___').tar"
}
