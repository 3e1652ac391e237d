#!/usr/bin/env bash
# Storage for PersistentVolumeClaims on the test bed (called by up.sh; safe to run any time).
# There is no dynamic provisioner here, so this script makes:
#   * the StorageClass `testbed-local`, marked default: `kubernetes.io/no-provisioner`,
#     WaitForFirstConsumer (the scheduler binds a claim to a volume when its pod is placed);
#   * $KPROF_TESTBED_PVS (default 8) `local` PersistentVolumes `testbed-pv-<i>` of 10Gi each,
#     directories $KPROF_STATE/volumes/pv-<i> on this node, ReadWriteOnce and ReadWriteMany
#     (one node: every pod that mounts one sees the same directory), reclaim policy Retain;
#   * and recycles every *Released* one of them (its claim was deleted): the directory is
#     emptied and the claimRef removed, so the volume is Available again. (The Recycle reclaim
#     policy no longer exists; Delete needs a provisioner.)
# A claim kept across `helm uninstall` (helm.sh/resource-policy: keep) stays Bound with its data.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
(( EUID == 0 )) || { echo "storage.sh: must run as root" >&2; exit 1; }

kc() { "$KPROF_K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG" --request-timeout=20s "$@"; }
log() { echo "[storage] $*"; }

N="${KPROF_TESTBED_PVS:-8}"
VOL="$KPROF_STATE/volumes"
NODE="$(kc get nodes -o jsonpath='{.items[0].metadata.name}')"
[[ -n "$NODE" ]] || { echo "storage.sh: no node registered" >&2; exit 1; }

mkdir -p "$VOL"
{
  cat <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: testbed-local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
  labels: {kprof.io/testbed: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
EOF
  for ((i = 0; i < N; i++)); do
    mkdir -p "$VOL/pv-$i"
    cat <<EOF
---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: testbed-pv-$i
  labels: {kprof.io/testbed: "true"}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteOnce, ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: testbed-local
  volumeMode: Filesystem
  local: {path: $VOL/pv-$i}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions:
            - {key: kubernetes.io/hostname, operator: In, values: [$NODE]}
EOF
  done
} | kc apply -f - >/dev/null

# Released volumes (their claim is gone): empty them and make them Available again.
recycled=0
while read -r name phase path; do
  [[ "$phase" == Released && "$path" == "$VOL/"* ]] || continue
  find "$path" -mindepth 1 -delete
  kc patch pv "$name" --type json -p '[{"op":"remove","path":"/spec/claimRef"}]' >/dev/null
  recycled=$((recycled + 1))
done < <(kc get pv -l kprof.io/testbed=true \
           -o jsonpath='{range .items[*]}{.metadata.name} {.status.phase} {.spec.local.path}{"\n"}{end}')

log "StorageClass testbed-local (default), $N local volumes in $VOL ($(kc get pv -l kprof.io/testbed=true --no-headers 2>/dev/null | grep -c ' Available ' || true) available, $recycled recycled)"
