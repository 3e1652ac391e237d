#!/usr/bin/env bash
# Start the single-node test bed cluster (make cluster-up):
#   etcd -> kube-apiserver -> kube-controller-manager -> kube-scheduler
#   -> containerd (own config/socket) -> pause image -> CNI config -> kubelet -> node Ready
#   -> storage.sh (default StorageClass + local PersistentVolumes for PVCs).
# Idempotent: on a running, healthy cluster it says so and exits 0; a half-started one is
# torn down (down.sh) and started again. Every wait has a timeout; nothing sleeps blindly.
# Options: --no-node   control plane only (etcd, apiserver, KCM, scheduler).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

NO_NODE=0
for arg in "$@"; do
  case "$arg" in
    --no-node) NO_NODE=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "up.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
(( EUID == 0 )) || { echo "up.sh: must run as root" >&2; exit 1; }

T0=$(date +%s)
log() { printf '[up %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { printf '[up %3ss] ERROR: %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; exit 1; }

S="$KPROF_STATE"
PKI="$S/pki"; LOGS="$S/logs"; PIDS="$S/pids"
mkdir -p "$S" "$LOGS" "$PIDS" "$KPROF_RUN_DIR"
B="$KPROF_K8S_BIN"

# --- inputs: binaries and packages -----------------------------------------------------------
CP_BINS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
NODE_BINS=(kubelet)
need=("${CP_BINS[@]}"); (( NO_NODE )) || need+=("${NODE_BINS[@]}")
for b in "${need[@]}"; do
  if [[ ! -x "$B/$b" ]]; then
    log "missing $B/$b: running build-binaries.sh (cold build takes 20-45 min)"
    "$KPROF_TESTBED_DIR/build-binaries.sh"
    break
  fi
done
(( NO_NODE )) || "$KPROF_TESTBED_DIR/install-deps.sh"

NODE_NAME="${KPROF_NODE_NAME:-$(hostname -s | tr '[:upper:]' '[:lower:]')}"
dev="$(ip -4 route show default | awk '{for(i=1;i<NF;i++) if($i=="dev"){print $(i+1); exit}}')"
NODE_IP="${KPROF_NODE_IP:-$(ip -4 -o addr show dev "${dev:-eth0}" 2>/dev/null | awk '{split($4,a,"/"); print a[1]; exit}')}"
[[ -n "$NODE_IP" ]] || die "cannot determine the node IP (no default route); set KPROF_NODE_IP"
PORT="$KPROF_APISERVER_PORT"
SERVER="https://127.0.0.1:$PORT"

pid_alive() { # name -> 0 if the recorded pid runs the expected binary
  local f="$PIDS/$1.pid" pid exe
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ -d "/proc/$pid" ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ "$exe" == *"/$1" || "$exe" == *"/$1 (deleted)" ]]
}
kc() { "$B/kubectl" --kubeconfig "$PKI/admin.kubeconfig" --request-timeout=10s "$@"; }
api_ready() {
  curl -fsS -m 5 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "$SERVER/readyz" >/dev/null 2>&1
}
# Ready, and (when KUBELET_STARTED is set) reported by the kubelet we just started, not a
# stale status left in etcd by a previous run.
KUBELET_STARTED=""
node_ready() {
  local out
  out="$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}' 2>/dev/null)" || return 1
  [[ "${out%% *}" == True ]] || return 1
  [[ -z "$KUBELET_STARTED" || ! "${out#* }" < "$KUBELET_STARTED" ]]
}
# wait_for DESCRIPTION TIMEOUT_S COMMAND... (polls every 0.5 s; dumps the log tail on timeout)
wait_for() {
  local what="$1" timeout="$2"; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) >= deadline )); then
      log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
  log "$what: ok"
}
start() { # name logfile command...
  local name="$1"; shift
  if pid_alive "$name"; then log "$name already running (pid $(cat "$PIDS/$name.pid"))"; return 0; fi
  log "starting $name"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}
fail_with_log() { # name
  echo "---- last lines of $LOGS/$1.log ----" >&2
  tail -n 40 "$LOGS/$1.log" >&2 || true
  die "$1 did not come up (full log: $LOGS/$1.log)"
}

# --- already up? -----------------------------------------------------------------------------
all=(etcd kube-apiserver kube-controller-manager kube-scheduler)
(( NO_NODE )) || all+=(containerd kubelet)
running=0; for n in "${all[@]}"; do pid_alive "$n" && running=$((running + 1)); done
# An API server started by an older up.sh has no aggregation layer: restart it with one.
aggregation_on() { tr '\0' ' ' <"/proc/$(cat "$PIDS/kube-apiserver.pid")/cmdline" 2>/dev/null | grep -q -- --requestheader-client-ca-file; }
if (( running == ${#all[@]} )) && api_ready && aggregation_on && { (( NO_NODE )) || node_ready; }; then
  log "test bed already running and healthy (node $NODE_NAME)"
  # Volumes whose claims were deleted since: Available again.
  (( NO_NODE )) || "$KPROF_TESTBED_DIR/storage.sh"
  (( NO_NODE )) || kc get nodes -o wide
  echo "export KUBECONFIG=$KUBECONFIG"
  exit 0
fi
if (( running > 0 )) || compgen -G "$PIDS/*.pid" >/dev/null; then
  log "found a partial/unhealthy test bed ($running of ${#all[@]} daemons alive): restarting it"
  "$KPROF_TESTBED_DIR/down.sh"
fi

log "Kubernetes v$K8S_VERSION from $B; node $NODE_NAME ($NODE_IP); state $S"

# --- PKI -------------------------------------------------------------------------------------
if [[ -f "$PKI/.node" && "$(cat "$PKI/.node")" != "$NODE_NAME $NODE_IP" ]]; then
  log "node name/IP changed: regenerating PKI"; rm -rf "$PKI"
fi
"$KPROF_TESTBED_DIR/gen-pki.sh" "$PKI" "$NODE_NAME" "$NODE_IP" "$SERVER"
echo "$NODE_NAME $NODE_IP" >"$PKI/.node"
install -m 600 "$PKI/admin.kubeconfig" "$KUBECONFIG"
log "PKI ready in $PKI"

# Without kube-proxy nothing implements ClusterIPs: make sure a packet to the service range
# can never leave through the default route.
ip route replace blackhole "$KPROF_SERVICE_CIDR"

# --- etcd ------------------------------------------------------------------------------------
mkdir -p "$S/etcd"; chmod 700 "$S/etcd"
start etcd "$B/etcd" --name kprof-testbed --data-dir "$S/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster kprof-testbed=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
  --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn
wait_for "etcd /health" 60 curl -fsS -m 2 http://127.0.0.1:2379/health -o /dev/null || fail_with_log etcd

# --- kube-apiserver --------------------------------------------------------------------------
# The aggregation layer (front-proxy flags) serves kprof's data.kprof.io APIService; without
# kube-proxy, --enable-aggregator-routing makes it dial an endpoint IP rather than the ClusterIP.
start kube-apiserver "$B/kube-apiserver" \
  --etcd-servers=http://127.0.0.1:2379 \
  --bind-address=0.0.0.0 --secure-port="$PORT" --advertise-address="$NODE_IP" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range="$KPROF_SERVICE_CIDR" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$PKI/ca.crt" \
  --kubelet-preferred-address-types=Hostname,InternalIP \
  --enable-bootstrap-token-auth=false --profiling=false \
  --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
  --enable-aggregator-routing=true --v=1
wait_for "kube-apiserver /readyz" 120 api_ready || fail_with_log kube-apiserver

# --- controller manager and scheduler ----------------------------------------------------------
start kube-controller-manager "$B/kube-controller-manager" \
  --kubeconfig="$PKI/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$PKI/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$PKI/controller-manager.kubeconfig" \
  --root-ca-file="$PKI/ca.crt" --service-account-private-key-file="$PKI/sa.key" \
  --use-service-account-credentials=true \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
  --service-cluster-ip-range="$KPROF_SERVICE_CIDR" \
  --leader-elect=false --bind-address=127.0.0.1 --profiling=false --v=1
start kube-scheduler "$B/kube-scheduler" \
  --kubeconfig="$PKI/scheduler.kubeconfig" \
  --authentication-kubeconfig="$PKI/scheduler.kubeconfig" \
  --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
  --leader-elect=false --bind-address=127.0.0.1 --profiling=false --v=1
wait_for "kube-controller-manager /healthz" 60 curl -fsSk -m 2 https://127.0.0.1:10257/healthz -o /dev/null \
  || fail_with_log kube-controller-manager
wait_for "kube-scheduler /healthz" 60 curl -fsSk -m 2 https://127.0.0.1:10259/healthz -o /dev/null \
  || fail_with_log kube-scheduler
wait_for "ServiceAccount default/default" 60 kc get serviceaccount default -n default -o name \
  || fail_with_log kube-controller-manager

if (( NO_NODE )); then
  log "control plane up in $(( $(date +%s) - T0 ))s (no node)"
  echo "export KUBECONFIG=$KUBECONFIG"
  exit 0
fi

# --- containerd ------------------------------------------------------------------------------
CD="$S/containerd"; CNI_CONF="$S/cni/net.d"
mkdir -p "$CD/root" "$CD/opt" "$CNI_CONF" "$KPROF_RUN_DIR/containerd"
CNI_BIN=/usr/lib/cni; [[ -x "$CNI_BIN/bridge" ]] || CNI_BIN=/opt/cni/bin
cat >"$CD/config.toml" <<EOF
# kprof test bed containerd (generated by e2e/testbed/up.sh)
version = 2
root = "$CD/root"
state = "$KPROF_RUN_DIR/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$KPROF_CONTAINERD_SOCK"
[ttrpc]
  address = "$KPROF_RUN_DIR/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$CD/opt"
[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.02
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "kprof.local/testbed/pause:1"
  enable_cdi = false
  disable_apparmor = true
  # this sandbox lacks CAP_SYS_RESOURCE: clamp the kubelet's negative oom_score_adj (e.g. -998
  # for pause) to containerd's own, or runc fails with "can't get final child's PID"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$CNI_CONF"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
EOF
pid_alive containerd || rm -f "$KPROF_CONTAINERD_SOCK" "$KPROF_RUN_DIR/containerd.sock.ttrpc"  # stale sockets
start containerd containerd --config "$CD/config.toml" --log-level warn
ctr_ok() { ctr --address "$KPROF_CONTAINERD_SOCK" version >/dev/null 2>&1; }
wait_for "containerd" 60 ctr_ok || fail_with_log containerd

# --- pause (sandbox) image, built from pause.c ------------------------------------------------
IMG="$S/images"; mkdir -p "$IMG"
phash="$(cat "$KPROF_TESTBED_DIR/pause.c" "$KPROF_TESTBED_DIR/ociarchive.py" | sha256sum | cut -c1-16)"
if [[ ! -f "$IMG/pause-$phash.tar" ]]; then
  gcc -Os -static -o "$IMG/pause" "$KPROF_TESTBED_DIR/pause.c"
  strip "$IMG/pause" 2>/dev/null || true
  python3 "$KPROF_TESTBED_DIR/ociarchive.py" --name kprof.local/testbed/pause:1 --no-base \
    --file "$IMG/pause:/pause" --entrypoint /pause --out "$IMG/pause-$phash.tar" >/dev/null 2>>"$LOGS/images.log"
fi
if ! kprof_ctr images check "name==kprof.local/testbed/pause:1" 2>/dev/null | grep -q complete; then
  kprof_ctr images import "$IMG/pause-$phash.tar" >/dev/null
fi
log "pause image kprof.local/testbed/pause:1 imported"

# --- the test image: Debian's python3.11 + stdlib + testapp/ (a tiny HTTP server) --------------
TEST_IMAGE=kprof.local/testbed/python:1
thash="$(cat "$KPROF_TESTBED_DIR"/{python-image.sh,image-lib.sh,ociarchive.py} "$KPROF_TESTBED_DIR"/testapp/* | sha256sum | cut -c1-16)"
if [[ ! -f "$IMG/python-$thash.tar" ]]; then
  "$KPROF_TESTBED_DIR/python-image.sh" --no-import --out "$IMG/python-$thash.tar" "$TEST_IMAGE" "$KPROF_TESTBED_DIR/testapp" >/dev/null 2>>"$LOGS/images.log"
fi
if ! kprof_ctr images check "name==$TEST_IMAGE" 2>/dev/null | grep -q complete \
   || [[ "$(cat "$IMG/python.imported" 2>/dev/null)" != "$thash" ]]; then
  kprof_ctr images import "$IMG/python-$thash.tar" >/dev/null
  echo "$thash" >"$IMG/python.imported"
fi
log "test image $TEST_IMAGE imported"

# --- CNI: needed for NetworkReady even though test pods use hostNetwork --------------------------
# Non-hostNetwork pods get an address on a private bridge and a route to the node only:
# no default route and no masquerading, so their traffic cannot leave the machine.
cat >"$CNI_CONF/10-kprof-testbed.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "kprof-testbed",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "kprof0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.0.0/24", "gateway": "10.244.0.1"}]],
        "routes": [{"dst": "$NODE_IP/32"}],
        "dataDir": "$S/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

# --- kubelet ---------------------------------------------------------------------------------
# The kubelet rewrites a few kernel sysctls at start; remember the originals so down.sh can
# put them back.
if [[ ! -f "$S/sysctl.orig" ]]; then
  for k in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes; do
    v="$(sysctl -n "$k" 2>/dev/null)" && echo "$k=$v"
  done >"$S/sysctl.orig"
fi
KL="$S/kubelet"; mkdir -p "$KL"
cat >"$S/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$KPROF_CONTAINERD_SOCK
imageServiceEndpoint: unix://$KPROF_CONTAINERD_SOCK
address: 0.0.0.0
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true, cacheTTL: 30s}
  x509: {clientCAFile: $PKI/ca.crt}
authorization:
  mode: Webhook
  webhook: {cacheAuthorizedTTL: 30s, cacheUnauthorizedTTL: 5s}
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
rotateCertificates: false
serverTLSBootstrap: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# The journey pulls kprof's images from a private registry with a pull secret; the other tests
# and make demo run the same images (same image ids) imported, with imagePullPolicy Never. By
# default (KubeletEnsureSecretPulledImages) the kubelet would then refuse those pods, which have
# no credentials for an image once pulled with some: verify nothing, as before Kubernetes 1.33.
imagePullCredentialsVerificationPolicy: NeverVerify
# images are imported by hand and cannot be pulled again: never garbage-collect them
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imageMinimumGCAge: 87600h
# absolute floors, not percentages: the test bed shares a large disk that other work fills, and
# 1 % of it (GBs) would put the node under DiskPressure and evict the pods under test
evictionHard: {memory.available: "100Mi", nodefs.available: "200Mi", nodefs.inodesFree: "1%", imagefs.available: "200Mi"}
evictionPressureTransitionPeriod: 30s
protectKernelDefaults: false
registerNode: true
maxPods: 110
serializeImagePulls: false
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 5s
shutdownGracePeriod: 0s
containerLogMaxSize: 10Mi
containerLogMaxFiles: 3
EOF
KUBELET_STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
start kubelet "$B/kubelet" --config="$S/kubelet-config.yaml" \
  --kubeconfig="$PKI/kubelet.kubeconfig" --root-dir="$KL" --cert-dir="$KL/pki" \
  --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
kubelet_healthy() { curl -fsS -m 2 http://127.0.0.1:10248/healthz -o /dev/null 2>&1; }
wait_for "kubelet /healthz" 90 kubelet_healthy || fail_with_log kubelet
wait_for "node $NODE_NAME Ready" 180 node_ready || { kc describe node "$NODE_NAME" >&2 || true; fail_with_log kubelet; }
# Node Ready can briefly precede the controller manager removing the not-ready taint.
no_taints() { [[ -z "$(kc get node "$NODE_NAME" -o jsonpath='{.spec.taints}' 2>/dev/null)" ]]; }
wait_for "node $NODE_NAME untainted (schedulable)" 60 no_taints || kc get node "$NODE_NAME" -o jsonpath='{.spec.taints}' >&2

# --- storage: a default StorageClass and local PersistentVolumes (no provisioner here) ---------
"$KPROF_TESTBED_DIR/storage.sh" || die "storage.sh failed"

log "test bed up in $(( $(date +%s) - T0 ))s"
kc get nodes -o wide
echo "export KUBECONFIG=$KUBECONFIG"
