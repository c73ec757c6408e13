#!/bin/sh
# Installs the Debian packages the build, the daemons and the tests need.
# Idempotent and quiet when everything is there already.
set -e
PKGS="build-essential pkg-config libucx-dev ucx-utils libuv1-dev libprotobuf-c-dev
protobuf-c-compiler libcjson-dev libopenblas-dev libpcre2-dev libcmocka-dev node-llhttp
python3 python3-numpy prometheus
clang libclang-rt-14-dev"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# kubectl renders the Kubernetes overlays (tests/integration/test_k8s.py): any kubectl
# will do, else Debian's kubernetes-client; tests/k8s holds the manifest validator
command -v kubectl >/dev/null 2>&1 || missing="$missing kubernetes-client"
command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
# the independent tokenizer.json implementation the tokenizer tests compare with
tokref() {
    d="$(dirname "$0")/../tests/tokref"
    [ -d "$d/node_modules/@huggingface/tokenizers" ] && return 0
    echo "deps: npm ci in tests/tokref"
    (cd "$d" && npm ci --no-audit --no-fund --silent >/dev/null) ||
        echo "deps: npm ci failed in tests/tokref: the tokenizer reference check will fail"
}
k8svalidate() {
    d="$(dirname "$0")/../tests/k8s"
    [ -d "$d/node_modules/kubernetes-models" ] && return 0
    echo "deps: npm ci in tests/k8s"
    (cd "$d" && npm ci --no-audit --no-fund --silent >/dev/null) ||
        echo "deps: npm ci failed in tests/k8s: the Kubernetes manifest checks will fail"
}
[ -z "$missing" ] && { tokref; k8svalidate; exit 0; }
echo "deps: installing$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
tokref
k8svalidate
