#!/usr/bin/env bash
# Stop the test bed (make cluster-down): kubelet, containers and their shims, containerd,
# scheduler, controller manager, apiserver, etcd — by the pids up.sh recorded — then unmount
# what the kubelet/containerd mounted and restore the sysctls the kubelet changed.
# Leaves no cluster process behind, so up.sh can start again.
#   --wipe   also delete the state dir ($KPROF_STATE: PKI, etcd data, images, logs).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

WIPE=0
for arg in "$@"; do
  case "$arg" in
    --wipe) WIPE=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "down.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
(( EUID == 0 )) || { echo "down.sh: must run as root" >&2; exit 1; }

T0=$(date +%s)
log() { printf '[down %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
S="$KPROF_STATE"; PIDS="$S/pids"

recorded_pid() { # name -> pid if it still runs the expected binary
  local f="$PIDS/$1.pid" pid exe
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  [[ "$exe" == *"/$1" || "$exe" == *"/$1 (deleted)" ]] || return 1
  echo "$pid"
}
wait_gone() { # timeout pid...
  local deadline=$(( $(date +%s) + $1 )); shift
  local p alive
  while :; do
    alive=0
    for p in "$@"; do [[ -d /proc/$p ]] && alive=1; done
    (( alive )) || return 0
    (( $(date +%s) >= deadline )) && return 1
    sleep 0.2
  done
}
stop() { # name [grace seconds]
  local name="$1" grace="${2:-15}" pid
  if pid="$(recorded_pid "$name")"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    if ! wait_gone "$grace" "$pid"; then
      log "$name did not exit within ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null; wait_gone 5 "$pid"
    fi
  fi
  rm -f "$PIDS/$name.pid"
}

# Processes that belong to the cluster's containers: everything in a kubelet pod cgroup,
# plus the runc shims of *our* containerd (identified by our socket path in their cmdline).
pod_pids() {
  grep -lE ':/kubepods(/|$)' /proc/[0-9]*/cgroup 2>/dev/null | sed -E 's#/proc/([0-9]+)/cgroup#\1#'
}
shim_pids() {
  local f pid
  for f in /proc/[0-9]*/cmdline; do
    pid="${f#/proc/}"; pid="${pid%/cmdline}"
    if { tr '\0' ' ' <"$f"; } 2>/dev/null | grep -q -- "containerd-shim.*$KPROF_CONTAINERD_SOCK"; then echo "$pid"; fi
  done
}

# 1. kubelet first, so it does not restart containers we are about to kill.
stop kubelet 20

# 2. containers: ask containerd to kill every task, then kill stragglers directly.
if recorded_pid containerd >/dev/null && [[ -S "$KPROF_CONTAINERD_SOCK" ]]; then
  tasks="$(timeout 10 ctr --address "$KPROF_CONTAINERD_SOCK" -n k8s.io tasks ls -q 2>/dev/null)"
  if [[ -n "$tasks" ]]; then
    log "killing $(wc -w <<<"$tasks") container task(s)"
    for t in $tasks; do timeout 10 ctr --address "$KPROF_CONTAINERD_SOCK" -n k8s.io tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    for t in $tasks; do timeout 10 ctr --address "$KPROF_CONTAINERD_SOCK" -n k8s.io tasks delete -f "$t" >/dev/null 2>&1; done
  fi
fi
mapfile -t left < <(pod_pids)
if (( ${#left[@]} )); then
  log "killing ${#left[@]} leftover container process(es)"
  kill -KILL "${left[@]}" 2>/dev/null; wait_gone 10 "${left[@]}"
fi

# 3. containerd and its shims.
stop containerd 15
mapfile -t shims < <(shim_pids)
if (( ${#shims[@]} )); then
  log "killing ${#shims[@]} containerd shim(s)"
  kill -KILL "${shims[@]}" 2>/dev/null; wait_gone 10 "${shims[@]}"
fi

# 4. control plane.
stop kube-scheduler 10
stop kube-controller-manager 10
stop kube-apiserver 20
stop etcd 15

# 5. mounts made for pods (volumes, sandbox shm, rootfs overlays, netns), innermost first.
umount_under() {
  local root="$1" m
  [[ -e "$root" ]] || return 0
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done < <(awk -v r="$root" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r)
}
umount_under "$S/kubelet"
umount_under "$S/containerd"
umount_under "$KPROF_RUN_DIR"
for ns in /run/netns/cni-*; do
  [[ -e "$ns" ]] || continue
  umount "$ns" 2>/dev/null; rm -f "$ns"
done

# 6. empty pod cgroups the kubelet created (v1 hierarchies and the unified mount).
for h in /sys/fs/cgroup/* /sys/fs/cgroup/unified; do
  [[ -d "$h/kubepods" ]] || continue
  find "$h/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
done

# 7. sysctls the kubelet rewrote.
if [[ -f "$S/sysctl.orig" ]]; then
  while IFS='=' read -r k v; do [[ -n "$k" ]] && sysctl -qw "$k=$v" 2>/dev/null; done <"$S/sysctl.orig"
  rm -f "$S/sysctl.orig"
fi

if (( WIPE )); then
  log "wiping $S, pod logs, the pod bridge and the service-range route"
  rm -rf "$S" "$KPROF_RUN_DIR" /var/log/pods /var/log/containers
  ip link del kprof0 2>/dev/null
  ip route del blackhole "$KPROF_SERVICE_CIDR" 2>/dev/null
fi

# 8. verify nothing is left.
rc=0
for n in kubelet containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do
  if [[ -f "$PIDS/$n.pid" ]] && recorded_pid "$n" >/dev/null; then log "WARNING: $n still running"; rc=1; fi
done
if [[ -n "$(pod_pids)$(shim_pids)" ]]; then log "WARNING: container processes still running"; rc=1; fi
log "test bed stopped in $(( $(date +%s) - T0 ))s"
exit "$rc"
