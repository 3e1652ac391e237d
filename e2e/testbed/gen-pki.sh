#!/usr/bin/env bash
# Generate the test bed's PKI with openssl: one CA, serving certs for the apiserver and the
# kubelet, client certs for every component, the ServiceAccount signing key and kubeconfigs.
# Usage: gen-pki.sh PKI_DIR NODE_NAME NODE_IP APISERVER_URL
# Idempotent: existing files are kept (delete PKI_DIR to regenerate).
set -euo pipefail

PKI="$1" NODE="$2" NODE_IP="$3" SERVER="$4"
SVC_IP="${KPROF_SERVICE_IP:-10.96.0.1}"
DAYS=3650
mkdir -p "$PKI"
chmod 700 "$PKI"
cd "$PKI"
umask 077

if [[ ! -f ca.key ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days "$DAYS" \
    -subj "/CN=kprof-testbed-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
fi

# The aggregation layer's own CA: the API server proxies to aggregated APIs (kprof's
# data.kprof.io) with a client certificate from it, which they verify.
if [[ ! -f front-proxy-ca.key ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt -days "$DAYS" \
    -subj "/CN=kprof-testbed-front-proxy-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
fi

# mkcert NAME SUBJECT KIND(server|client|both) [SAN...]  (signed by $SIGNER, default ca)
mkcert() {
  local name="$1" subj="$2" kind="$3"; shift 3
  [[ -f "$name.crt" && -f "$name.key" ]] && return 0
  local eku san=""
  case "$kind" in
    server) eku=serverAuth ;;
    client) eku=clientAuth ;;
    both) eku=serverAuth,clientAuth ;;
  esac
  if (( $# )); then san="subjectAltName=$(IFS=,; echo "$*")"; fi
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [[ -n "$san" ]] && echo "$san"
  } >"$name.ext"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
  local ca="${SIGNER:-ca}"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -out "$name.crt" \
    -days "$DAYS" -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

mkcert apiserver "/CN=kube-apiserver" server \
  DNS:localhost DNS:kubernetes DNS:kubernetes.default DNS:kubernetes.default.svc \
  DNS:kubernetes.default.svc.cluster.local "DNS:$NODE" IP:127.0.0.1 "IP:$NODE_IP" "IP:$SVC_IP"
mkcert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client
mkcert kubelet-serving "/O=system:nodes/CN=system:node:$NODE" server "DNS:$NODE" DNS:localhost IP:127.0.0.1 "IP:$NODE_IP"
mkcert kubelet "/O=system:nodes/CN=system:node:$NODE" client
mkcert admin "/O=system:masters/CN=kprof-testbed-admin" client
mkcert controller-manager "/CN=system:kube-controller-manager" client
mkcert scheduler "/CN=system:kube-scheduler" client
SIGNER=front-proxy-ca mkcert front-proxy-client "/CN=front-proxy-client" client

if [[ ! -f sa.key ]]; then
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
  openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
fi

# kubeconfig FILE USER CERTBASE  (embedded data so the file is self-contained)
kubeconfig() {
  local file="$1" user="$2" base="$3"
  [[ -f "$file" ]] && grep -q "server: $SERVER\$" "$file" && return 0
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kprof-testbed
  cluster:
    server: $SERVER
    certificate-authority-data: $(base64 -w0 ca.crt)
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$base.crt")
    client-key-data: $(base64 -w0 "$base.key")
contexts:
- name: kprof-testbed
  context:
    cluster: kprof-testbed
    user: $user
current-context: kprof-testbed
EOF
}
kubeconfig admin.kubeconfig kprof-testbed-admin admin
kubeconfig controller-manager.kubeconfig system:kube-controller-manager controller-manager
kubeconfig scheduler.kubeconfig system:kube-scheduler scheduler
kubeconfig kubelet.kubeconfig "system:node:$NODE" kubelet
chmod 600 ./*.key ./*.kubeconfig
chmod 644 ca.crt front-proxy-ca.crt
